r"""Train the score model on embedded trajectories (ours) or the DDPM baseline.

Usage::

    python -m experiments.train --config=experiments/configs/train_tiny.py --workdir=runs/tiny \
        [--store=runs/pre/store] [--data=builtin] [--config.num_steps=500]

Data: ``--data=store`` (the default when ``--store`` is given) trains ``method=ours`` on the
``"embedded"`` field of a pre-computed :class:`krylovjax.store.ScoreStore` (e.g. of your own
images, ``experiments.precompute --config.dataset=files:<path>``), and ``method=ddpm`` on the
same store's images (the first level of each trajectory, the image itself);
``--data=builtin`` uses ``config.data.num_images`` built-in photos at ``config.data.image_size``:
for ``ours`` it pre-computes their scores (``config.precompute``) and embeds them on the fly
(kept in ``<workdir>/builtin_trajectories.npz``: a resumed or finished run reads them instead of
pre-computing again), for ``ddpm`` it trains on the photos. With ``--store`` the store's images
and pre-computation are used: ``--config.data.*`` and ``--config.precompute.*`` overrides are
refused there. Re-running with the same ``--workdir`` resumes; a rerun whose ``config.data`` or
``config.precompute`` differ from the run's is refused naming them, before pre-computing (the
kept trajectories are not replaced), and one whose ``--config.num_steps`` the run has reached
says so at once, before compiling or pre-computing anything. A second run started there while
one runs is refused at once (:mod:`krylovjax.workdir_lock`), and a checkpoint that cannot be
written (a full disk) ends the run naming the last complete one.

Multi-host (as ``experiments/precompute.py``): run one copy per process with
``--coordinator_address=host:port --num_processes=P --process_id=i`` (or the environment
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; flags win), or
``--coordinator_address=auto`` on a TPU pod, SLURM or Open MPI, where JAX finds the layout itself.
The mesh spans every process's devices, each process reads only its own images' rows of the
store (or of the built-in data, which every process builds alike), and the run equals a
one-process run on as many devices; process 0 writes ``metrics.jsonl`` and ``result.json``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
if __name__ == "__main__":  # (as experiments.denoise: the module imports alongside the other binaries,
    # whose --config would clash, e.g. in a test process)
    config_flags.DEFINE_config_file("config", None, "Training config file (see experiments/configs/train_*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, result.json.")
    flags.DEFINE_string("store", None, "ScoreStore directory with an 'embedded' field: ours trains on its "
                        "trajectories, ddpm on their first level (the images).")
    flags.DEFINE_enum("data", "auto", ["auto", "store", "builtin"],
                      "Training data: a ScoreStore, or built-in photos ('auto': store if --store is set).")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for jax.distributed (multi-host runs), or 'auto': JAX takes "
                        "the process layout from the cluster (TPU pod, SLURM, Open MPI).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (multi-host runs).")
    flags.mark_flags_as_required(["config", "workdir"])

_NON_TRAIN_KEYS = ("data", "precompute")


def unused_with_store(overrides) -> list[str]:
    """The ``--config.<key>`` overrides given (``config_flags.get_override_values``: a flat dict
    of dotted keys) that a ``--store`` run does not use: the ``data`` and ``precompute`` blocks."""
    return sorted(k for k in overrides if str(k).split(".", 1)[0] in _NON_TRAIN_KEYS)


def _check_data_seed(seed) -> None:
    """ValueError naming ``config.data.seed`` unless it is an int >= 0 (it was refused by numpy
    only beyond the 8 built-in photos, and accepted and unused below)."""
    from krylovjax import _checks

    _checks.as_int("config.data.seed", seed, 0, what="an int >= 0 (the built-in photos' crops)")


def _builtin_inputs(cfg, train_cfg):
    """The built-in photos and, for ours, the pre-computation's config, checked before the
    pre-computation: the config keys, and that the photos fit the model."""
    from krylovjax import training
    from krylovjax.data import builtin_dataset

    _check_data_seed(cfg.data.seed)
    try:
        images = builtin_dataset(cfg.data.image_size, cfg.data.num_images, seed=cfg.data.seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data: {err}") from err
    training.model_config(train_cfg, tuple(images.shape[1:]), images.shape[0])
    if train_cfg.method == "ddpm":
        return images, None
    from krylovjax.precompute import PrecomputeConfig

    import jax

    try:
        pc = PrecomputeConfig(sde=train_cfg.sde, sde_kwargs=train_cfg.sde_kwargs, **cfg.precompute.to_dict())
        pc.resolve(jax.dtypes.canonicalize_dtype(images.dtype))  # a tol the compute dtype can verify
        return images, pc
    except (TypeError, ValueError) as err:
        raise ValueError(f"precompute: {err}") from err


_BUILTIN_CACHE = "builtin_trajectories.npz"  # in --workdir: ours' pre-computed built-in data


def _builtin_key(images, pc, sde) -> str:
    """What the built-in trajectories depend on: the photos, the pre-computation's config, the
    SDE and the precision JAX computes in (sha256)."""
    import hashlib

    import jax
    import numpy as np

    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(json.dumps([list(images.shape), str(images.dtype), pc.to_dict(), sde,
                         bool(jax.config.jax_enable_x64)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _builtin_settings(cfg, pc) -> dict:
    """What the built-in data were made with, as plain JSON: ``config.data`` and the
    pre-computation's config (``config.precompute`` with its defaults), kept in the cache so a
    rerun with other ones is refused naming the keys (:func:`_check_builtin_settings`)."""
    return json.loads(json.dumps({"data": cfg.data.to_dict(), "precompute": pc.to_dict()}, default=str))


def _run_fingerprint(workdir) -> str | None:
    """The training data's fingerprint in the run record ``<workdir>/config.json``, or None."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            fp = json.load(f)["data"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fp if isinstance(fp, str) else None


def _cache_meta(path) -> tuple[str, dict, str] | None:
    """``(key, settings, fingerprint)`` of the trajectories kept at ``path``, or None (no file, a
    damaged one, or one written before the settings and the fingerprint were kept)."""
    import numpy as np

    try:
        with np.load(path) as z:
            settings = json.loads(str(z["settings"]))
            return str(z["key"]), settings, str(z["fingerprint"])
    except Exception:  # noqa: BLE001 - zipfile, numpy, JSON and OS errors of many types
        return None


def _settings_diff(stored: dict, given: dict) -> tuple[str, str]:
    """``("config.precompute", "config.precompute.outer_tol: the run's 0.0001, given 0.01")``."""
    from krylovjax import experiment_utils as eu

    keys = eu.config_diff(stored, given)

    def at(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    blocks = sorted({"config." + k.split(".", 1)[0] for k in keys})
    return ", ".join(blocks), "; ".join(f"config.{k}: the run's {at(stored, k)!r}, given {at(given, k)!r}"
                                        for k in keys)


def _check_builtin_settings(workdir, settings, key) -> None:
    """Before pre-computing: ValueError naming ``config.precompute`` / ``config.data`` and the
    differing keys when the run in ``workdir`` (its ``config.json``) trained on built-in
    trajectories made with other settings (those kept with them in the cache, when the cache
    holds that run's data: the fingerprints agree). Without a run there, or a cache that cannot
    tell, nothing is said here; :func:`_builtin_data` compares the fingerprints once computed."""
    fp = _run_fingerprint(workdir)
    meta = _cache_meta(os.path.join(workdir, _BUILTIN_CACHE))
    if fp is None or meta is None or meta[2] != fp or meta[0] == key:
        return
    blocks, detail = _settings_diff(meta[1], settings)
    if not detail:  # the same settings, another key (the SDE, the precision): training's check names it
        return
    raise ValueError(f"{blocks}: {'differ' if ',' in blocks else 'differs'} from the settings the run in "
                     f"{workdir!r} pre-computed its built-in data "
                     f"with ({detail}); use the run's settings, or a new --workdir (nothing was pre-computed or "
                     f"changed)")


def _builtin_data(images, pc, train_cfg, workdir, settings=None):
    """The photos (DDPM), or ours' embedded trajectories of them (pre-computed with ``pc``).

    Ours' trajectories are kept in ``<workdir>/builtin_trajectories.npz`` with the key of what
    they depend on (:func:`_builtin_key`), the ``settings`` they were made with
    (:func:`_builtin_settings`) and their training fingerprint: a resumed or finished run reads
    them instead of pre-computing again (some 18 s for the demo's 32 photos on a 2-core CPU,
    minutes for more; a walkthrough, 2026-12-07). Other photos or another ``config.precompute``
    compute afresh; where a run in ``workdir`` trained on other data than those computed, that is
    refused (ValueError naming ``config.data`` / ``config.precompute``) and the file is kept."""
    if pc is None:
        return images
    import jax
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import experiment_utils as eu
    from krylovjax import training, transport
    from krylovjax.precompute import precompute_scores

    sde = {"name": train_cfg.sde, "kwargs": dict(train_cfg.sde_kwargs)}
    key = _builtin_key(images, pc, sde)
    path = os.path.join(workdir, _BUILTIN_CACHE)
    try:
        with np.load(path) as z:
            if str(z["key"]) == key:
                logging.info("read the pre-computed trajectories of %d images from %s", images.shape[0], path)
                return training.Trajectories(x=z["x"], t=z["t"], sde=sde)
            logging.info("%s holds other photos' or another config's trajectories: pre-computing", path)
    except FileNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001 - a damaged file: zipfile, numpy and OS errors of many types
        logging.warning("%s cannot be read (%s): pre-computing again", path, err)
    res = precompute_scores(jnp.asarray(images), pc)
    logging.info("pre-computed scores of %d images: %s", images.shape[0],
                 {k: v for k, v in res.stats.items() if np.ndim(v) == 0})
    x = np.asarray(transport.embed(images, res.scores, pc.make_sde(), res.t, res.dt))
    t = np.asarray(res.t)
    data = training.Trajectories(x=x, t=t, sde=sde)
    with eu.checking_arguments():  # (bad data: the message alone, as training's own check)
        fingerprint = training.prepare_data(train_cfg, data)[1]["fingerprint"]
        run_fp = _run_fingerprint(workdir)
        if run_fp is not None and run_fp != fingerprint:  # refused before the run's kept data are replaced
            raise ValueError(f"config.data, config.precompute: the built-in trajectories computed now differ from "
                             f"those the run in {workdir!r} trained on (data.fingerprint); use the run's "
                             f"config.data and config.precompute, or a new --workdir ({_BUILTIN_CACHE} was not "
                             "changed)")
    if jax.process_index() == 0:  # every process computes them alike
        from krylovjax._io_errors import atomic_write

        extra = {"settings": np.asarray(json.dumps(settings or {}, sort_keys=True)),
                 "fingerprint": np.asarray(fingerprint)}
        try:
            os.makedirs(workdir, exist_ok=True)
            atomic_write(path, lambda f: np.savez(f, x=x, t=t, key=np.asarray(key), **extra), binary=True)
        except OSError as err:  # a full disk: the run goes on (a resume pre-computes again)
            logging.warning("the pre-computed trajectories could not be kept in %s (%s); a resumed run "
                            "computes them again", path, err)
    return data


def _check_builtin_photos(workdir, train_cfg, images) -> None:
    """ddpm on the built-in photos: ValueError naming ``config.data`` when the run in
    ``workdir`` trained on other photos (its record's fingerprint)."""
    from krylovjax import training

    fp = _run_fingerprint(workdir)
    if fp is not None and training.prepare_data(train_cfg, images)[1]["fingerprint"] != fp:
        raise ValueError(f"config.data: the built-in photos (image_size, num_images, seed) differ from those the "
                         f"run in {workdir!r} trained on (data.fingerprint); use the run's config.data, or a new "
                         "--workdir")


def _checkpoint_step(workdir) -> int | None:
    """The latest step saved in ``<workdir>/checkpoints`` (orbax names each step's directory by
    its number, and writes it under a temporary name first), or None."""
    try:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(workdir, "checkpoints", n))]
    return max(steps, default=None)


def _data_fingerprint(workdir, train_cfg, data, pc) -> str | None:
    """The training fingerprint of the data a run would train on, where known without
    pre-computing: a store's or the photos' (read and hashed as training does), or, for ours'
    built-in data, that of the trajectories kept in ``workdir`` when they are this config's; else
    None."""
    from krylovjax import training

    if pc is None:  # a store path, or ddpm's photos
        return training.prepare_data(train_cfg, data)[1]["fingerprint"]
    meta = _cache_meta(os.path.join(workdir, _BUILTIN_CACHE))
    key = _builtin_key(data, pc, {"name": train_cfg.sde, "kwargs": dict(train_cfg.sde_kwargs)})
    return meta[2] if meta is not None and meta[0] == key else None


def _already_done(workdir, train_cfg, fingerprint) -> tuple[int, dict] | None:
    """``(step, result)`` when the run in ``workdir`` already stands at ``num_steps`` or past it,
    its ``result.json`` records that step, and it trained on this data (``fingerprint()``, called
    only then: :func:`_data_fingerprint`, against the run record's): nothing is left to train.
    One process only (the processes of a multi-host run go through training.train together);
    else None, and training.train decides (and refuses other data naming data.fingerprint)."""
    import jax

    step = _checkpoint_step(workdir)
    if step is None or step < train_cfg.num_steps or jax.process_count() > 1:
        return None
    prev = _previous_result(workdir)
    if not isinstance(prev, dict) or prev.get("step") != step:
        return None
    run_fp = _run_fingerprint(workdir)
    if run_fp is None or fingerprint() != run_fp:
        return None
    return step, prev


def _keep_result(workdir, done, train_cfg) -> None:
    """A rerun with nothing to train: said before any compilation or pre-computation; result.json
    keeps the finished run's record (its losses and times), with ``resumed_from`` this call's
    start, as training.train's own no-op call wrote it."""
    import time

    from krylovjax import experiment_utils as eu

    t0 = time.perf_counter()
    step, prev = done
    logging.warning("the run in %s already stood at step %d (--config.num_steps=%d): nothing was trained",
                    workdir, step, train_cfg.num_steps)
    summary = dict(prev, resumed_from=step)
    eu.write_json(os.path.join(workdir, "result.json"), summary)
    logging.info("done (process 0/1, nothing to train: %.2f s): %s", time.perf_counter() - t0, summary)


def _previous_result(workdir):
    """The ``result.json`` of an earlier invocation in ``workdir``, or None."""
    try:
        with open(os.path.join(workdir, "result.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    eu.check_config_kind(FLAGS.config, "train")
    eu.check_dir_arg(FLAGS.workdir, "workdir")
    eu.refuse_other_runs(FLAGS.workdir, {"experiment.json": "another experiment's run",
                                         "precompute_summary.json": "an experiments.precompute run"})
    source = FLAGS.data if FLAGS.data != "auto" else ("store" if FLAGS.store else "builtin")
    if source == "builtin" and FLAGS.store:
        raise app.UsageError(f"--store={FLAGS.store}: --data=builtin trains on the built-in photos, not on a "
                             "store; drop --store or use --data=store")
    if source == "store" and not FLAGS.store:
        raise app.UsageError("--data=store needs --store=<ScoreStore directory>")
    if source == "store":
        unused = unused_with_store(config_flags.get_override_values(FLAGS["config"]))
        if unused:  # they were ignored without a word (a walkthrough: data.image_size=32 trained at 16x16)
            raise app.UsageError(
                f"{', '.join('--config.' + k for k in unused)}: not used with --store (the store's images and "
                "the settings experiments.precompute computed it with are); drop them, or train on the built-in "
                "photos with --data=builtin")
    if source == "builtin" and FLAGS.config.method == "ddpm":
        unused = [k for k in unused_with_store(config_flags.get_override_values(FLAGS["config"]))
                  if str(k).startswith("precompute")]
        if unused:  # (ignored without a word, as with --store)
            raise app.UsageError(f"{', '.join('--config.' + k for k in unused)}: not used by ddpm, which trains on "
                                 "the photos themselves (no pre-computation); drop them")
    eu.sigterm_as_interrupt()  # kill / timeout / schedulers: checkpoint like Ctrl-C, then exit non-zero
    eu.quiet_orbax_logs()
    cfg = FLAGS.config
    try:
        eu.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        eu.check_same_config(cfg)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    from krylovjax import workdir_lock

    # One run at a time in the workdir, from the pre-computation to result.json (a second run
    # there is refused at once, naming this one).
    oom = ("lower --config.batch_size or the model's width (--config.model_overrides.ch), in a new --workdir "
           "(both are part of the run); the checkpoints saved are kept")
    with eu.exit_on_run_errors(out_of_memory=oom), workdir_lock.hold_in_every_process(FLAGS.workdir):
        _train(cfg, source)


def _check_store_path(path):
    """A ``--store`` that is no store, said plainly: a path that does not exist, a file, or an
    ``experiments.precompute`` work directory (its store is ``<workdir>/store``: pass that).
    Raises FileNotFoundError; anything else is left to :func:`krylovjax.training.check_store`."""
    from krylovjax.store import MANIFEST_NAME

    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return
    head = f"store: {path!r} has no {MANIFEST_NAME}; not a ScoreStore"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{head}: {path!r} does not exist (experiments.precompute writes its store to "
                                "<its --workdir>/store)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{head}: {path!r} is a file; expected the store's directory")
    inner = os.path.join(path, "store")
    if os.path.isfile(os.path.join(inner, MANIFEST_NAME)):
        raise FileNotFoundError(f"{head}, but {inner!r} is one (experiments.precompute writes its store to "
                                f"<its --workdir>/store): pass --store={inner}")


def _train(cfg, source):
    """main's run, holding --workdir."""
    import jax

    from krylovjax import experiment_utils as eu
    from krylovjax import training

    with eu.checking_arguments():  # a bad value ends the binary with its message alone
        train_cfg = training.TrainConfig.from_dict({k: v for k, v in cfg.items() if k not in _NON_TRAIN_KEYS})
        if train_cfg.eval_every:  # (a walkthrough: accepted, and nothing was evaluated)
            raise ValueError(f"eval_every: expected 0, got {train_cfg.eval_every}; experiments.train has no "
                             "evaluation set and never evaluates (experiments.denoise and experiments.budget do, "
                             "on their noisy photos)")
        training.check_workdir(FLAGS.workdir, train_cfg)  # another run's config: refused before pre-computing
        training.check_new_seed(FLAGS.workdir, train_cfg)
        training.check_mesh(train_cfg)  # the batch against this machine's devices
        settings = None
        if source == "builtin":
            images, pc = _builtin_inputs(cfg, train_cfg)
            if pc is None:  # ddpm: the photos themselves; other ones named here, not as "other images"
                _check_builtin_photos(FLAGS.workdir, train_cfg, images)
            else:  # ours: another config.precompute / config.data refused before pre-computing
                settings = _builtin_settings(cfg, pc)
                _check_builtin_settings(FLAGS.workdir, settings, _builtin_key(
                    images, pc, {"name": train_cfg.sde, "kwargs": dict(train_cfg.sde_kwargs)}))
        else:
            _check_store_path(FLAGS.store)
            num_images, shape = training.check_store(FLAGS.store)
            training.model_config(train_cfg, shape, num_images)  # the store's images fit the model
    with eu.checking_arguments():  # (the store's SDE against the config's: one line, as training's check)
        done = _already_done(FLAGS.workdir, train_cfg, lambda: _data_fingerprint(
            FLAGS.workdir, train_cfg, FLAGS.store if source == "store" else images,
            None if source == "store" else pc))
    if done is not None:  # said at once: train() compiled the step (some 13 s) to train nothing
        _keep_result(FLAGS.workdir, done, train_cfg)
        return
    # the store: training reads each process's own images from it
    data = FLAGS.store if source == "store" else _builtin_data(images, pc, train_cfg, FLAGS.workdir, settings)

    result = training.train(train_cfg, data, FLAGS.workdir)
    summary = {k: getattr(result, k) for k in ("step", "stop_reason", "resumed_from", "train_seconds",
                                               "compile_seconds", "eval_seconds", "checkpoint_seconds",
                                               "wall_seconds", "last_loss", "last_loss_step", "steps_per_call")}
    if result.resumed_from == result.step:
        # Nothing trained in this invocation (the run already stood at --config.num_steps or past
        # it): keep the finished run's last loss instead of overwriting it with None.
        logging.warning("the run in %s already stood at step %d (--config.num_steps=%d): nothing was trained",
                        FLAGS.workdir, result.step, train_cfg.num_steps)
        prev = _previous_result(FLAGS.workdir)
        if prev is not None and prev.get("step") == result.step and summary["last_loss"] is None:
            summary["last_loss"] = prev.get("last_loss")
            summary["last_loss_step"] = prev.get("last_loss_step")
    if jax.process_index() == 0:
        eu.write_json(os.path.join(FLAGS.workdir, "result.json"), summary)
    logging.info("done (process %d/%d): %s", jax.process_index(), jax.process_count(), summary)


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
