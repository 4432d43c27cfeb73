"""The resumable pre-computation pipeline: images -> scores -> embedded trajectories -> store.

For every chunk of images, :func:`run_precompute` solves the log-FP equation
(:func:`krylovjax.precompute.precompute_scores`, method.md 3.1-3.4), embeds the scores along the
probability flow (:func:`krylovjax.transport.embed`, method.md 4.1) and writes the chunk into a
:class:`krylovjax.store.ScoreStore` under ``<workdir>/store``:

==================== ===================== ========= =================================
field                per-image shape       time axis dtype
==================== ===================== ========= =================================
``log_density``      ``[C, N, H, W]``      1         ``store_dtype``
``scores``           ``[C, N, 2, H, W]``   1         ``store_dtype``
``embedded``         ``[N, C, H, W]``      0         ``store_dtype``
``t``                ``[N]``               0         ``store_dtype``
``sweeps``           ``[]``                -         int32 (outer sweeps / fixed-point its.)
``outer_converged``  ``[]``                -         bool
``outer_diverged``   ``[]``                -         bool (stopped by divergence_patience)
``systems``          ``[]``                -         int32 (linear systems solved)
``matvecs``          ``[]``                -         int64
``nonconverged``     ``[]``                -         int32 (solves that missed ``tol``)
==================== ===================== ========= =================================

The manifest holds the run config (:func:`store_config`: ``config.to_dict()`` under
``"precompute"``, the embedding and dtypes) and :func:`krylovjax.store.hash_inputs` of the
images and that config. So:

- a killed run restarts where it stopped: complete chunks (marker files) are skipped, an
  incomplete one is recomputed and overwritten; a complete chunk whose data no longer match the
  checksums in its marker (or whose files cannot be read) is computed again, with a warning;
- a run with other images or another config on the same workdir is refused with the store's
  message naming what differs, before anything is written;
- bad images are refused (:func:`krylovjax.data.validate_images`) before anything is written.

Multi-host: chunk ``i`` belongs to process ``i % process_count`` (default: JAX's
``jax.process_index()`` / ``jax.process_count()`` after ``jax.distributed.initialize()``).
Process 0 creates the manifest; the others wait for it. Each process solves its chunks on its
local devices (``PrecomputeConfig(shard=True)`` splits a chunk over them); no data crosses
processes.

Each chunk is a fixed batch of ``chunk_images`` images, so the cross-matrix seed is image
``config.seed_image`` of each chunk, and every chunk of that size reuses one compiled program.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from krylovjax.data import validate_images
from krylovjax.precompute import PrecomputeConfig, check_config, precompile, precompute_scores

__all__ = ["PipelineSummary", "run_precompute", "check_run_args", "store_config", "store_fields",
           "summarize_store", "open_store", "STORE_DIR", "STAT_FIELDS"]

STORE_DIR = "store"
#: Per-image statistics fields and their declared dtypes.
STAT_FIELDS = {"sweeps": np.int32, "outer_converged": np.bool_, "outer_diverged": np.bool_,
               "systems": np.int32, "matvecs": np.int64, "nonconverged": np.int32}
_COMPONENTS = ("sum", "x", "y")


@dataclasses.dataclass(frozen=True)
class PipelineSummary:
    """What one :func:`run_precompute` call did (this process only).

    Attributes:
      store_path: the store directory.
      num_images: images in the whole store.
      chunks_total, chunks_owned: chunks of the store, and of this process.
      chunks_skipped: owned chunks that were already complete (a resumed run).
      chunks_computed: chunks computed and written by this call.
      images_computed: images in those chunks.
      systems_solved, matvecs, nonconverged: totals over the computed images.
      sweeps_mean, sweeps_max: outer sweeps per computed image.
      outer_nonconverged: computed images that did not reach ``outer_tol``.
      outer_diverged: of them, those stopped by ``divergence_patience``.
      seconds: wall time of this call (store I/O and compilation included).
      compile_seconds: of it, compilation.
      systems_per_second: ``systems_solved / (seconds - compile_seconds)``.
      process_index, process_count: this process and the number of processes.
      complete: whether every chunk of the store (all processes) is complete now.
    """

    store_path: str
    num_images: int
    chunks_total: int
    chunks_owned: int
    chunks_skipped: int
    chunks_computed: int
    images_computed: int
    systems_solved: int
    matvecs: int
    nonconverged: int
    sweeps_mean: float
    sweeps_max: int
    outer_nonconverged: int
    outer_diverged: int
    seconds: float
    compile_seconds: float
    systems_per_second: float
    process_index: int
    process_count: int
    complete: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def store_config(config: PrecomputeConfig, *, embed_component: str = "sum",
                 compute_dtype: Any = np.float64, seed: int = 0) -> dict:
    """The run config recorded in (and hashed into) the store's manifest.

    ``{"precompute": config.to_dict(), "embed_component": ..., "compute_dtype": ..., "seed": ...}``
    (``seed`` matters only for the random ``paper_a_kde`` initial density). The config's default
    tolerance is resolved for ``compute_dtype`` first (:meth:`PrecomputeConfig.resolve`), so a
    float64 default config records ``tol=1e-10`` as it always did.
    """
    return {"precompute": check_config(config).resolve(compute_dtype).to_dict(), "embed_component": embed_component,
            "compute_dtype": np.dtype(compute_dtype).name, "seed": int(seed)}


def store_fields(images_shape, num_steps: int, store_dtype: Any = np.float32) -> dict:
    """The store's fields ``{name: (per-image shape, dtype, time_axis)}`` (module docstring).

    Args:
      images_shape: ``(B, C, H, W)``.
      num_steps: N time levels.
      store_dtype: float dtype of the arrays.
    """
    _, C, H, W = images_shape
    N = int(num_steps)
    f = np.dtype(store_dtype)
    fields = {"log_density": ((C, N, H, W), f, 1), "scores": ((C, N, 2, H, W), f, 1),
              "embedded": ((N, C, H, W), f, 0), "t": ((N,), f, 0)}
    fields.update({name: ((), dt) for name, dt in STAT_FIELDS.items()})
    return fields


def check_run_args(images, config, chunk_images, store_dtype, embed_component, process_index,
                   process_count):
    """The checks :func:`run_precompute` makes of its arguments before any work: (the validated
    images, the chunk size). Raises ValueError or TypeError naming the argument."""
    images = validate_images(images)
    import jax

    # a tolerance the compute dtype cannot verify (float32's 1e-10) is refused before any work
    check_config(config).resolve(jax.dtypes.canonicalize_dtype(images.dtype))
    if isinstance(chunk_images, bool) or not isinstance(chunk_images, (int, np.integer)) \
            or chunk_images < 1:
        raise ValueError(f"chunk_images: expected an integer >= 1, got {chunk_images!r}")
    if np.dtype(store_dtype).kind != "f":
        raise TypeError(f"store_dtype: expected a float dtype, got {np.dtype(store_dtype)}")
    if embed_component not in _COMPONENTS:
        raise ValueError(f"embed_component: expected one of {_COMPONENTS}, got {embed_component!r}")
    if not (isinstance(process_count, (int, np.integer)) and process_count >= 1):
        raise ValueError(f"process_count: expected an integer >= 1, got {process_count!r}")
    if not (isinstance(process_index, (int, np.integer)) and 0 <= process_index < process_count):
        raise ValueError(f"process_index: expected an integer in [0, {process_count}), got "
                         f"{process_index!r}")
    B = images.shape[0]
    chunk = min(int(chunk_images), B)
    smallest = B - (-(-B // chunk) - 1) * chunk  # the last chunk's size
    if config.seed_image >= smallest:
        raise ValueError(
            f"config.seed_image: {config.seed_image} is not an image of every chunk (the last "
            f"chunk of {B} images in chunks of {chunk} has {smallest}); use a smaller seed_image "
            f"or a chunk_images that divides the image count")
    return images, chunk


def open_store(workdir, images, config: PrecomputeConfig, *, chunk_images: int = 64,
               store_dtype: Any = np.float32, embed_component: str = "sum", seed: int = 0,
               process_index: int = 0, process_count: int = 1, open_timeout_s: float = 600.0):
    """Create (process 0) or reopen the run's :class:`~krylovjax.store.ScoreStore`.

    Arguments as :func:`run_precompute`. Raises ``ValueError`` if ``workdir/store`` holds a
    store of other images or another config (nothing is written then).
    """
    from krylovjax.store import ScoreStore, hash_inputs

    images, chunk = check_run_args(images, config, chunk_images, store_dtype, embed_component,
                                   process_index, process_count)
    import jax

    arr = np.asarray(images)
    # the dtype JAX computes in: float64 images are float32 there unless x64 is on
    cfg = store_config(config, embed_component=embed_component,
                       compute_dtype=jax.dtypes.canonicalize_dtype(arr.dtype), seed=seed)
    return ScoreStore.create_or_open(
        os.path.join(os.fspath(workdir), STORE_DIR), config=cfg, inputs_hash=hash_inputs(arr, cfg),
        num_images=arr.shape[0], chunk_size=chunk,
        fields=store_fields(arr.shape, config.num_steps, store_dtype),
        process_index=int(process_index), process_count=int(process_count),
        open_timeout_s=open_timeout_s)


def _compute_chunk(images, config, embed_component, key, sde, on_sweep):
    """Scores and embedding of one chunk -> ({field: numpy array}, stats)."""
    import jax.numpy as jnp

    from krylovjax.transport import embed

    res = precompute_scores(images, config, key=key, progress=on_sweep)
    x = embed(images, res.scores, sde, res.t, res.dt, component=embed_component)
    st = res.stats
    b = images.shape[0]
    out = {"log_density": res.log_density, "scores": res.scores, "embedded": x,
           "t": jnp.broadcast_to(res.t, (b,) + res.t.shape),
           "sweeps": st["sweeps"], "outer_converged": st["outer_converged"],
           "outer_diverged": st.get("outer_diverged", np.zeros(b, bool)),
           "systems": st["systems_per_image"], "matvecs": st["matvecs_per_image"],
           "nonconverged": st["nonconverged_per_image"]}
    return out, st


def _to_host(data: dict, fields: dict) -> dict:
    """The chunk's arrays as numpy arrays of the store's dtypes (blocks until computed)."""
    return {name: np.asarray(value).astype(fields[name].dtype, copy=False)
            for name, value in data.items()}


def run_precompute(images, config: PrecomputeConfig, workdir, *, chunk_images: int = 64,
                   store_dtype: Any = np.float32, embed_component: str = "sum", seed: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   progress: bool = True, open_timeout_s: float = 600.0) -> PipelineSummary:
    """Pre-compute scores and embedded trajectories of ``images`` into a resumable store.

    For each chunk of ``chunk_images`` images owned by this process and not yet complete:
    :func:`~krylovjax.precompute.precompute_scores` (log-FP solves, method.md 3.1-3.4), then
    :func:`~krylovjax.transport.embed` (``x^n = x^{n-1} + (f - g^2/2 s^n) dt``, method.md 4.1),
    then one atomic chunk write into ``<workdir>/store`` (see the module docstring for the
    fields). The write (device-to-host copy and disk) of chunk i runs in a background thread
    while chunk i+1 is computed; at most one write is in flight, and the call returns (or
    raises) only after it has finished, so a chunk is either complete in the store or absent.

    Args:
      images: ``[B, C, H, W]`` float32/float64 in [0, 1] (numpy or JAX); the computation runs in
        this dtype (float64 needs ``jax_enable_x64``). Every process passes all B images.
      config: a :class:`~krylovjax.precompute.PrecomputeConfig`.
      workdir: run directory; the store goes to ``<workdir>/store``.
      chunk_images: images per chunk: the unit of work, of resumption and of multi-host
        ownership.
      store_dtype: float dtype of the stored arrays (float32 halves the disk of float64).
      embed_component: how the 2-vector score enters the embedding (:func:`embed`): "sum"
        (Paper B), "x" (Paper A) or "y".
      seed: PRNG seed of the ``paper_a_kde`` (alias ``paper_a``) initial density (chunk ``i``
        uses ``fold_in(key(seed), i)``); unused otherwise.
      process_index, process_count: this process and the number of processes (default:
        ``jax.process_index()``, ``jax.process_count()``).
      progress: show a tqdm bar (images, with systems/s).
      open_timeout_s: how long a process other than 0 waits for process 0's manifest.

    Returns:
      A :class:`PipelineSummary` of this call.

    Raises:
      ValueError: bad images (nothing written), a ``seed_image`` missing from a chunk, or a
        store of other images / another config in ``workdir`` (the store's message names the
        differing keys; nothing written).
      TypeError: wrong config type or dtypes.
      WorkdirBusyError: another run holds ``workdir`` (:mod:`krylovjax.workdir_lock`).
    """
    import jax

    start = time.perf_counter()
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    from krylovjax import workdir_lock

    with workdir_lock.hold(workdir, process_index=process_index):
        return _run_precompute(images, config, workdir, chunk_images=chunk_images, store_dtype=store_dtype,
                               embed_component=embed_component, seed=seed, process_index=process_index,
                               process_count=process_count, progress=progress, open_timeout_s=open_timeout_s,
                               start=start)


def _run_precompute(images, config, workdir, *, chunk_images, store_dtype, embed_component, seed,
                    process_index, process_count, progress, open_timeout_s, start) -> PipelineSummary:
    """:func:`run_precompute` holding ``workdir``."""
    import jax

    store = open_store(workdir, images, config, chunk_images=chunk_images, store_dtype=store_dtype,
                       embed_component=embed_component, seed=seed, process_index=process_index,
                       process_count=process_count, open_timeout_s=open_timeout_s)
    arr = np.asarray(images)
    owned = store.owned_chunks()
    # The chunks this process takes as done are checked against their markers' checksums first
    # (one read and sha256 of each, ScoreStore.recheck_owned_chunks); a chunk that fails is made
    # incomplete and computed again below. Another process's chunks are its own to check.
    for index, why in store.recheck_owned_chunks().items():
        lo, hi = store.chunk_bounds(index)
        warnings.warn(f"store {store.path!r}: chunk {index} (images {lo}..{hi - 1}) was marked complete but "
                      f"{why}; it is computed again", stacklevel=3)
    pending = store.pending_chunks()
    sde = config.make_sde()
    from krylovjax import initial

    # every random initial density, its alias "paper_a" too (it failed for want of a key)
    key = jax.random.key(seed) if initial.needs_key(config.initial) else None

    from krylovjax.experiment_utils import interrupts_after, progress_bar, raise_if_signalled

    n_pending = sum(store.chunk_bounds(i)[1] - store.chunk_bounds(i)[0] for i in pending)
    drawn = [time.perf_counter()]  # when on_sweep last drew the bar
    bar = progress_bar(total=n_pending, unit="img", disable=not progress,
                       desc=f"precompute[{process_index}/{process_count}]" if process_count > 1
               else "precompute")
    totals = dict(systems=0, matvecs=0, nonconverged=0, compile=0.0, images=0, outer_bad=0,
                  diverged=0)
    sweeps_seen: list[np.ndarray] = []
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="krylovjax-store")
    in_flight = None

    def write(index, data):
        store.write_chunk(index, _to_host(data, store.fields))

    try:
        for index in pending:
            raise_if_signalled()  # a binary's SIGTERM that Python could not raise where it came
            lo, hi = store.chunk_bounds(index)
            chunk = arr[lo:hi]
            with interrupts_after("the complete chunks are kept, and the same command resumes from them"):
                # (an interrupt inside the compile: a crash at exit)
                totals["compile"] += precompile(chunk.shape, chunk.dtype, config)
            t_chunk = time.perf_counter()
            solved_before = totals["systems"]

            def on_sweep(k, kmax, info, _t=t_chunk, _s=solved_before):
                raise_if_signalled()  # between sweeps, where a Ctrl-C would land too
                run = totals["compile"]
                rate = (_s + info["systems"]) / max(time.perf_counter() - start - run, 1e-9)
                bar.set_postfix(chunk=index, sweep=f"{k}/{kmax}", systems_per_s=f"{rate:.0f}",
                                refresh=False)
                # drawn at most every mininterval, as tqdm draws its own updates: the bar moved only
                # at the end of a chunk, so a run of one chunk showed nothing until it finished
                # (a walkthrough at 128x128, 2026-12-07)
                now = time.perf_counter()
                if now - drawn[0] >= getattr(bar, "mininterval", 0.1):
                    drawn[0] = now
                    bar.refresh()

            ck = None if key is None else jax.random.fold_in(key, index)
            data, st = _compute_chunk(chunk, config, embed_component, ck, sde, on_sweep)
            # the cast runs on the device (half the bytes to copy for a float32 store)
            data = {name: (value.astype(store.fields[name].dtype)
                           if isinstance(value, jax.Array) else value)
                    for name, value in data.items()}
            if in_flight is not None:  # the previous chunk's write: raises if it failed
                in_flight.result()
            in_flight = writer.submit(write, index, data)
            totals["systems"] += st["systems_solved"]
            totals["matvecs"] += st["matvecs"]
            totals["nonconverged"] += st["nonconverged"]
            totals["images"] += hi - lo
            totals["outer_bad"] += int((~np.asarray(st["outer_converged"])).sum())
            totals["diverged"] += int(np.asarray(data["outer_diverged"]).sum())
            sweeps_seen.append(np.asarray(st["sweeps"]))
            bar.update(hi - lo)
        if in_flight is not None:
            in_flight.result()
        raise_if_signalled()
    finally:
        writer.shutdown(wait=True)  # an error elsewhere still lets the write in flight finish
        bar.close()
    seconds = time.perf_counter() - start
    sweeps = np.concatenate(sweeps_seen) if sweeps_seen else np.zeros(0, np.int32)
    run_s = max(seconds - totals["compile"], 1e-9)
    return PipelineSummary(
        store_path=store.path, num_images=store.num_images, chunks_total=store.num_chunks,
        chunks_owned=len(owned), chunks_skipped=len(owned) - len(pending),
        chunks_computed=len(pending), images_computed=totals["images"],
        systems_solved=totals["systems"], matvecs=totals["matvecs"],
        nonconverged=totals["nonconverged"],
        sweeps_mean=float(sweeps.mean()) if sweeps.size else 0.0,
        sweeps_max=int(sweeps.max()) if sweeps.size else 0,
        outer_nonconverged=totals["outer_bad"], outer_diverged=totals["diverged"],
        seconds=seconds,
        compile_seconds=totals["compile"],
        systems_per_second=totals["systems"] / run_s if totals["systems"] else 0.0,
        process_index=int(process_index), process_count=int(process_count),
        complete=store.is_complete())


def summarize_store(store) -> dict:
    """Totals over every image of a complete store, from its per-image statistics fields.

    Returns a dict: ``images``, ``systems_solved``, ``matvecs``, ``matvecs_per_system``,
    ``nonconverged``, ``sweeps_mean``, ``sweeps_max``, ``outer_nonconverged``,
    ``outer_diverged``.
    """
    stats = {name: store.read_all(name) for name in STAT_FIELDS}
    systems = int(stats["systems"].astype(np.int64).sum())
    matvecs = int(stats["matvecs"].sum())
    return {"images": int(store.num_images), "systems_solved": systems, "matvecs": matvecs,
            "matvecs_per_system": matvecs / max(systems, 1),
            "nonconverged": int(stats["nonconverged"].astype(np.int64).sum()),
            "sweeps_mean": float(stats["sweeps"].mean()), "sweeps_max": int(stats["sweeps"].max()),
            "outer_nonconverged": int((~stats["outer_converged"]).sum()),
            "outer_diverged": int(stats["outer_diverged"].sum())}
