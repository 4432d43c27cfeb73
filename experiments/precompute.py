r"""Pre-compute scores and embedded trajectories of a set of images into a resumable store.

Usage::

    python -m experiments.precompute --config=experiments/configs/demo.py --workdir=runs/pre \
        [--config.num_images=8 --config.precompute.strategy=spsolve ...]

Writes ``<workdir>/store`` (a :class:`krylovjax.store.ScoreStore`: log-densities, scores,
embedded trajectories, per-image solver statistics) and ``<workdir>/precompute_summary.json``
(with ``files``, the file of each store image in order, for a ``files:`` dataset), and prints a
summary table. Re-running with the same workdir resumes: finished chunks are
skipped; another config or other images are refused (``--fresh`` moves the old run to
``<workdir>.prev`` and starts again), and so is a second run started there while one runs
(:mod:`krylovjax.workdir_lock`), and a ``--workdir`` that is, or lies inside, a store (a
directory with a store's ``manifest.json``). A chunk that cannot be written (a full disk)
ends the run; it stays missing, and the same command computes it once space is freed. Images
short of ``outer_tol`` (diverged ones among them) and solves that did not converge are kept in
the store, flagged in its statistics, and said in a warning line at the end (exit status 0).

``precompute_summary.json``::

    {"run":     this invocation: images_computed, num_images, chunks_computed, chunks_skipped,
                systems_solved, matvecs, nonconverged, sweeps_mean, sweeps_max, outer_nonconverged,
                outer_diverged, seconds, compile_seconds, systems_per_second, ... (zeros for a
                rerun that found every chunk done),
     "runs":    [{"run": ..., "config": ..., "machine": ...}, ...]: every invocation in this
                workdir that computed chunks, oldest first (a resumed run's earlier parts and a
                no-op rerun lose nothing; a no-op rerun adds no entry, it is logged),
     "store":   totals over the complete store (pipeline.summarize_store), or null while incomplete,
     "config":  this invocation's config, "files": the files: dataset's files in store order
                (or null), "machine": this invocation's platform, backend, devices, jax version}

Multi-host: run one copy per process with ``--coordinator_address=host:port
--num_processes=P --process_id=i`` (or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or with ``--coordinator_address=auto`` on a TPU pod,
SLURM or Open MPI, where JAX finds the layout itself; each process computes the chunks
``i % P == id`` on its local devices, process 0 creates the store and, once every chunk is done,
writes the summary (the others write ``precompute_summary_process<i>.json``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: store/ and precompute_summary.json.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed (multi-host runs), or 'auto': JAX takes "
                    "the process layout from the cluster (TPU pod, SLURM, Open MPI).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.DEFINE_float("wait_s", 3600.0,
                   "Multi-host: how long process 0 waits for the other processes' chunks.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("fresh", False, "Start afresh: move an existing --workdir to <workdir>.prev first (an older "
                  "<workdir>.prev is deleted if it is an earlier run of this binary, "
                  "refused if it is anything else). One-process runs only.")
flags.mark_flags_as_required(["config", "workdir"])


def _init_distributed():
    """jax.distributed.initialize from the flags or the JAX_* environment variables (refused:
    process flags without a coordinator, which would make every copy compute every chunk)."""
    from krylovjax import experiment_utils as eu

    try:
        eu.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        eu.check_same_config(FLAGS.config)
    except ValueError as err:
        raise app.UsageError(str(err)) from None


def precompute_config(p):
    """The ``precompute`` block of a config file -> :class:`PrecomputeConfig`."""
    from krylovjax.precompute import PrecomputeConfig

    d = dict(p.to_dict())
    d["sde_kwargs"] = tuple(sorted(dict(d.get("sde_kwargs") or {}).items()))
    chunk = d.get("chunk_size")
    if chunk in (0, "none", "None", None):
        d["chunk_size"] = None
    elif isinstance(chunk, str) and chunk.isdigit():
        d["chunk_size"] = int(chunk)
    try:
        return PrecomputeConfig(**d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"precompute: {err}") from err


def check_config(cfg) -> None:
    """ValueError naming the top-level key for a ``store_dtype`` that is no float dtype or a
    ``data_seed`` that is no int >= 0 (checked for every dataset and number of images: a negative
    seed was refused by numpy only beyond the 8 built-in photos, and accepted below)."""
    import numpy as np

    try:
        ok = isinstance(cfg.store_dtype, str) and np.dtype(cfg.store_dtype).kind == "f"
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"config.store_dtype: expected a float dtype (float16, float32 or float64), "
                         f"got {cfg.store_dtype!r}")
    from krylovjax import _checks

    _checks.as_int("config.data_seed", cfg.data_seed, 0, what="an int >= 0 (the built-in photos' crops)")


def enclosing_store(workdir: str) -> str | None:
    """The score store that ``workdir`` is or lies in (the nearest directory from ``workdir`` up
    holding a :data:`krylovjax.store.MANIFEST_NAME` of the store's format), or None."""
    import json

    from krylovjax.store import MANIFEST_NAME, STORE_FORMAT

    d = os.path.abspath(workdir)
    while True:
        try:
            with open(os.path.join(d, MANIFEST_NAME)) as f:
                if json.load(f).get("format") == STORE_FORMAT:
                    return d
        except (OSError, ValueError, AttributeError):  # none, unreadable, or not a dict
            pass
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def load(cfg):
    """The config's images as numpy ``[B, C, H, W]`` in the computation dtype."""
    import numpy as np

    from krylovjax.data import load_images

    n = cfg.num_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (n == 0 and cfg.dataset == "builtin"):
        raise ValueError(f"num_images: expected an int >= 1, or 0 for all the images of a files:, array: or tfds "
                         f"dataset, got {n!r}")
    try:
        if cfg.dataset == "builtin":
            images = load_images("builtin", size=cfg.image_size, num_images=cfg.num_images,
                                 seed=cfg.data_seed)
        elif isinstance(cfg.dataset, str) and cfg.dataset.startswith(("files:", "array:")):
            for k in ("class_filter", "data_dir"):  # not silently ignored
                if cfg.get(k):
                    raise ValueError(f"{k} is for tfds datasets only; got {k}={cfg.get(k)!r}")
            try:
                images = load_images(cfg.dataset, size=cfg.image_size, num_images=cfg.num_images or None)
            except FileNotFoundError as err:  # no such path, or no image there
                raise FileNotFoundError(f"dataset {cfg.dataset!r}: {err}") from err
        else:
            images = load_images(cfg.dataset, split=cfg.split, data_dir=cfg.data_dir or None,
                                 size=cfg.image_size, class_filter=cfg.class_filter or None,
                                 num_images=cfg.num_images or None)
    except (TypeError, ValueError) as err:  # the keys are the config's: dataset, image_size, ...
        raise ValueError(f"dataset {cfg.dataset!r}: {err}") from err
    from krylovjax import experiment_utils as eu

    eu.warn_fewer_images(cfg.num_images, images.shape[0], "num_images", cfg.dataset)
    return images.astype(np.dtype(cfg.dtype))


def image_files(cfg) -> list[str] | None:
    """For a ``files:`` dataset, the absolute path of each image of the store, in the store's
    order (the files ``load`` read: :func:`krylovjax.data.selected_paths` with ``num_images``, 0
    for all); None for the other datasets."""
    from krylovjax.data import selected_paths

    if not (isinstance(cfg.dataset, str) and cfg.dataset.startswith("files:")):
        return None
    path = cfg.dataset.split(":", 1)[1]
    return [os.path.abspath(p) for p in selected_paths(path, num_images=cfg.num_images or None)]


def _table(rows):
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    eu.check_config_kind(FLAGS.config, "precompute")
    eu.check_dir_arg(FLAGS.workdir, "workdir")
    if FLAGS.fresh:  # --fresh from inside the run (--workdir=.) moves the process's directory with it
        FLAGS.workdir = eu.fresh_path(FLAGS.workdir)
    eu.refuse_other_runs(FLAGS.workdir, {"experiment.json": "another experiment's run",
                                         "checkpoints": "a training run"})
    cfg = FLAGS.config
    if cfg.dtype not in ("float32", "float64"):
        raise app.UsageError(f"--config.dtype: expected float32 or float64, got {cfg.dtype!r}")
    try:
        check_config(cfg)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    store_dir = enclosing_store(FLAGS.workdir)
    if store_dir is not None:  # a second store was built inside it (--fresh moved it away)
        where = "is" if os.path.abspath(FLAGS.workdir) == store_dir else f"lies inside {store_dir!r},"
        raise app.UsageError(f"--workdir: {FLAGS.workdir!r} {where} a score store (its manifest.json); "
                             "experiments.precompute writes its store to <workdir>/store: pass that run's "
                             "work directory (the store's parent) to resume it, or a new one (nothing was changed)")
    _init_distributed()
    import jax

    if FLAGS.fresh and jax.process_count() > 1:
        raise app.UsageError("--fresh: one-process runs only (the processes would move the work directory "
                             "under each other); move it aside yourself")
    jax.config.update("jax_enable_x64", cfg.dtype == "float64")
    # kill / timeout / batch schedulers: stop like Ctrl-C (complete chunks kept, one line, status
    # 130); SIGTERM's default ended the run without a word (a walkthrough, 2026-12-07)
    eu.sigterm_as_interrupt()
    from krylovjax import workdir_lock

    # One run at a time in the workdir, to its summary (a second run there is refused at once).
    oom = ("lower --config.precompute.chunk_size (systems solved at once) or --config.chunk_images (images per "
           "chunk: a store with no complete chunk takes a new one); the complete chunks are kept")
    index = jax.process_index()
    with eu.exit_on_run_errors(out_of_memory=oom), workdir_lock.hold_in_every_process(FLAGS.workdir):
        token = _run_token()  # this job's, the same on every process (under the locks: not a refused job's)
        if jax.process_count() > 1:
            with contextlib.suppress(FileNotFoundError):
                os.remove(_left_path(FLAGS.workdir, index))  # an earlier run's
        try:
            _precompute(cfg, token)
        except BaseException as err:  # process 0 waits for this one's chunks: say it left
            if jax.process_count() > 1 and index > 0:
                why = ("interrupted" if isinstance(err, KeyboardInterrupt) else
                       f"exit status {err.code}" if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}")
                eu.write_json(_left_path(FLAGS.workdir, index), {"process": index, "run": token, "why": why})
            raise


def _precompute(cfg, token: int):
    """main's run, holding --workdir (``token``: this run's, :func:`_run_token`)."""
    import jax

    from krylovjax import experiment_utils as eu
    from krylovjax import pipeline

    # a bad value ends the binary with its message alone, as does a dataset not prepared on disk
    # (DatasetNotPreparedError, a FileNotFoundError)
    with eu.checking_arguments():
        pcfg = precompute_config(cfg.precompute)
        images = load(cfg)
        pipeline.check_run_args(images, pcfg, cfg.chunk_images, cfg.store_dtype, cfg.embed_component,
                                jax.process_index(), jax.process_count())
    if FLAGS.fresh:  # once the config and the images are found good: a refused command moves nothing
        moved = eu.move_aside(FLAGS.workdir, kind="precompute",
                              keep=eu.sources_kept((cfg.dataset, "the images it reads (--config.dataset)")))
        if moved:
            logging.info("--fresh: moved the previous run to %s", moved)
    logging.info("%d images %s (%s), %d process(es), %d local device(s)", images.shape[0],
                 images.shape[1:], cfg.dataset, jax.process_count(), jax.local_device_count())
    used = jax.local_device_count() if pcfg.shard else 1
    if used < jax.local_device_count():  # a multi-GPU host's other devices idle without a word
        logging.warning("each chunk runs on one of this process's %d devices: --config.precompute.shard=True "
                        "splits it over all of them (or start one process per device)", jax.local_device_count())

    summary = pipeline.run_precompute(
        images, pcfg, FLAGS.workdir, chunk_images=cfg.chunk_images, store_dtype=cfg.store_dtype,
        embed_component=cfg.embed_component, seed=cfg.seed, progress=FLAGS.progress)
    run = summary.to_dict()
    if summary.chunks_owned == 0:
        logging.warning("process %d owns no chunk: %d chunk(s) of %d image(s) for %d processes; a smaller "
                        "--config.chunk_images shares the work", summary.process_index, summary.chunks_total,
                        cfg.chunk_images, summary.process_count)
    store = pipeline.open_store(FLAGS.workdir, images, pcfg, chunk_images=cfg.chunk_images,
                                store_dtype=cfg.store_dtype, embed_component=cfg.embed_component,
                                seed=cfg.seed, process_index=summary.process_index,
                                process_count=summary.process_count)
    gone: list[dict] = []
    if summary.process_index == 0 and not store.is_complete():
        logging.info("waiting up to %s for the other processes' chunks (%d of %d complete)",
                     eu.format_seconds(FLAGS.wait_s), len(store.completed_chunks()), store.num_chunks)
        deadline = time.monotonic() + FLAGS.wait_s
        while not store.is_complete() and time.monotonic() < deadline:
            # a process that left with chunks of its own not done: they will not come
            pending = set(store.pending_chunks(all_hosts=True))
            gone = [g for g in _left(FLAGS.workdir, jax.process_count(), token)
                    if pending & set(range(g["process"], store.num_chunks, jax.process_count()))]
            if gone:
                break
            eu.raise_if_signalled()
            time.sleep(0.5)
    totals = pipeline.summarize_store(store) if store.is_complete() else None

    rows = [("images (this run)", f"{run['images_computed']} of {run['num_images']} "
             f"({run['chunks_skipped']} chunk(s) already done)"),
            ("systems solved", f"{run['systems_solved']}"),
            ("matvecs / system", f"{run['matvecs'] / max(run['systems_solved'], 1):.1f}"),
            ("non-converged solves", f"{run['nonconverged']}"),
            ("sweeps / image", f"mean {run['sweeps_mean']:.2f}, max {run['sweeps_max']}"),
            ("images short of outer_tol", f"{run['outer_nonconverged']}"),
            ("  of them diverged", f"{run['outer_diverged']}"),
            ("seconds", f"{run['seconds']:.2f} (compile {run['compile_seconds']:.2f})"),
            ("systems / s", f"{run['systems_per_second']:.1f}"),
            ("devices per chunk", f"{used} of {jax.local_device_count()} local"
             + (" (--config.precompute.shard=True uses all)" if used < jax.local_device_count() else ""))]
    if totals is not None:
        rows += [("store: images", f"{totals['images']} (complete)"),
                 ("store: systems solved", f"{totals['systems_solved']}"),
                 ("store: matvecs / system", f"{totals['matvecs_per_system']:.1f}"),
                 ("store: non-converged", f"{totals['nonconverged']}"),
                 ("store: sweeps / image", f"mean {totals['sweeps_mean']:.2f}, "
                                           f"max {totals['sweeps_max']}"),
                 ("store: short of outer_tol", f"{totals['outer_nonconverged']}"),
                 ("store:   of them diverged", f"{totals['outer_diverged']}")]
    print(f"\nprecompute summary ({pcfg.strategy}, process {summary.process_index}/"
          f"{summary.process_count}):\n" + _table(rows), flush=True)

    machine = {"platform": platform.platform(), "backend": jax.default_backend(),
               "local_devices": jax.local_device_count(), "jax": jax.__version__}
    name = ("precompute_summary.json" if summary.process_index == 0
            else f"precompute_summary_process{summary.process_index}.json")
    path = os.path.join(FLAGS.workdir, name)
    runs = summary_runs(path, run, {"run": run, "config": cfg.to_dict(), "machine": machine})
    out = {"run": run, "runs": runs, "store": totals, "config": cfg.to_dict(), "files": image_files(cfg),
           "machine": machine}
    eu.write_json(path, out)  # atomic; NaN/Inf as null (strict JSON)
    logging.info("wrote %s", path)
    flagged = totals if totals is not None else run
    if flagged["outer_nonconverged"] or flagged["nonconverged"]:
        # valid, flagged results (exit status 0): said here, not only in the table above
        scope = (f"of the store's {totals['images']} images" if totals is not None
                 else f"of the {run['images_computed']} images computed in this run")
        logging.warning("%d %s missed outer_tol=%g (%d of them diverged) and %d of %d solves did not converge "
                        "(tol=%g); they are kept, flagged in the store's statistics and %s (more "
                        "--config.precompute.max_sweeps, restart or max_restarts may reach them)",
                        flagged["outer_nonconverged"], scope, pcfg.outer_tol, flagged["outer_diverged"],
                        flagged["nonconverged"], flagged["systems_solved"], pcfg.tol, name)
    if summary.process_index == 0 and totals is None:
        left = "; ".join(f"process {g['process']} stopped ({g['why']})" for g in gone)
        msg = (f"the store is incomplete ({len(store.completed_chunks())} of {store.num_chunks} chunks)"
               + (f": {left}" if left else f" after waiting {eu.format_seconds(FLAGS.wait_s)} (--wait_s)")
               + "; run the same command on every process again to complete it (the complete chunks are kept)")
        if gone:
            raise SystemExit(f"error: {msg}")
        logging.warning("%s", msg)


def summary_runs(path: str, run: dict, entry: dict) -> list[dict]:
    """The ``runs`` of the summary at ``path`` after this invocation (``run``, and its ``entry``:
    ``{"run", "config", "machine"}``): the earlier invocations that computed chunks (read from
    the summary there, an older one's ``run`` block where it has no ``runs``), and this one if it
    computed any. The earlier entries are kept whatever this one found done: a resumed run whose
    chunks all failed their checksums computes them all again in the same store (a review: that
    dropped the record of the runs before it); ``--fresh`` moves the summary aside with the store."""
    import json

    earlier: list[dict] = []
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as err:
        logging.warning("%s cannot be read (%s): its record of the earlier runs is lost", path, err)
        old = None
    if isinstance(old, dict):
        if isinstance(old.get("runs"), list):
            earlier = [r for r in old["runs"] if isinstance(r, dict)]
        elif isinstance(old.get("run"), dict) and (old["run"].get("chunks_computed") or 0) > 0:
            earlier = [{k: old.get(k) for k in ("run", "config", "machine")}]
    if run["chunks_computed"] == 0:
        if earlier:
            logging.info("nothing to compute (%d chunk(s) already done): %s keeps the %d earlier run(s) that "
                         "computed them under \"runs\"", run["chunks_skipped"], os.path.basename(path), len(earlier))
        return earlier
    return earlier + [entry]


def _left_path(workdir: str, index: int) -> str:
    """The note a process of a multi-process run leaves when it stops before its chunks are done."""
    return os.path.join(workdir, f".precompute_process{index}_left.json")


def _run_token() -> int:
    """A number naming this run of the job, process 0's, the same on every process (one
    broadcast): the notes of processes that left carry it, so process 0 reads only this run's
    (clocks of other hosts, an earlier run's note: not compared)."""
    from krylovjax.experiment_utils import process_values

    return int(process_values(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF)[0, 0])


def _left(workdir: str, count: int, token: int) -> list[dict]:
    """The notes of the processes that stopped in this run (``token``: :func:`_run_token`)."""
    import json

    notes = []
    for i in range(1, count):
        try:
            with open(_left_path(workdir, i)) as f:
                note = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(note, dict) and note.get("run") == token:
            notes.append(note)
    return notes


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
