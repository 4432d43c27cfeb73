"""Helpers of the Colab notebook ``experiments/colab.ipynb``: settings, platform, checks, the run.

The notebook is parametrised by environment variables, read in its first code cell (the
defaults are the real Colab run; each value is checked here, and a bad one raises a
``ValueError`` naming the variable and what to change):

============================ ============================================ ==================
variable                     meaning                                      default
============================ ============================================ ==================
``KRYLOVJAX_NB_CONFIG``      ``full`` (CIFAR-10 subset on an accelerator, ``full``
                             ``experiments/configs/colab_full.py``) or
                             ``tiny`` (a CPU smoke run, ``colab_tiny.py``)
``KRYLOVJAX_NB_DATASET``     ``builtin`` (scikit-image photographs,       the config's
                             offline) or ``cifar10`` (tfds)
``KRYLOVJAX_NB_NUM_IMAGES``  size of the image subset                     the config's
``KRYLOVJAX_NB_DATA_DIR``    tfds data directory                          tfds's default
``KRYLOVJAX_NB_DOWNLOAD``    ``auto`` (download and prepare a missing     ``auto``
                             tfds dataset only inside Colab), ``yes``,
                             ``no``
``KRYLOVJAX_NB_PLATFORM``    ``auto``, ``cpu``, ``gpu`` or ``tpu``        ``auto``
``KRYLOVJAX_NB_DEVICES``     ``all`` or N (CPU: N host devices are        ``all``
                             created; GPU: the first N are used; TPU: N
                             must be all of them)
``KRYLOVJAX_NB_WORKDIR``     run directory (store, checkpoints, figures,  ``krylovjax_colab``
                             ``results.json``)
``KRYLOVJAX_NB_DTYPE``       the U-Net's compute dtype: ``float32`` or    the config's
                             ``bfloat16`` (TPUs; parameters, optimiser    (``float32``)
                             and loss stay float32)
============================ ============================================ ==================

Every stage is a call into the library or the experiment binaries (nothing here is numerics):
the images come from ``experiments.precompute.load``; the scores from
:func:`krylovjax.pipeline.run_precompute` (cross-matrix Krylov solver, each chunk sharded over
all devices, resumable store); training from :func:`krylovjax.training.train` on
:func:`krylovjax.training.trajectories_from_store`; denoising and its SSIM from
``experiments.denoise`` (``ours_denoiser``, ``make_eval_fn``, ``image_metrics``); figures with
:mod:`krylovjax.experiment_utils`. Re-running the notebook on the same work directory resumes
(finished chunks and checkpoints are kept); another config there is refused.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CONFIGS", "DATASETS", "PLATFORMS", "DOWNLOADS", "PlatformInfo", "PrecomputeRun", "DenoiseRun",
    "get_config", "select_platform", "check_sharding", "in_colab", "prepare_dataset", "load_images",
    "claim_workdir", "workdir_note", "precompute", "train_config", "train_and_denoise", "write_figures",
    "write_results", "show",
]

CONFIGS = ("full", "tiny")
DATASETS = ("builtin", "cifar10")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
DOWNLOADS = ("auto", "yes", "no")
EXPERIMENT = "colab"  # the name claimed in <workdir>/experiment.json


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def _positive_int(value: Any, var: str) -> int | None:
    """'' / None -> None; else an int >= 1, or a ValueError naming the variable."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{var}: expected an integer >= 1 (or empty for the default), got {value!r}")
    return n


DTYPES = ("float32", "bfloat16")
# Config keys added after run directories were made without them, with the value that reproduces
# those runs (experiment_utils.claim_workdir's ``legacy``; a review found the notebook without it).
LEGACY_CONFIG = {"train.model_overrides.dtype": "float32"}


def get_config(name: str = "full", *, dataset: str = "", num_images: Any = "", data_dir: str = "",
               dtype: str = ""):
    """The notebook's config ``experiments/configs/colab_<name>.py`` with the overrides applied.

    Args:
      name: ``KRYLOVJAX_NB_CONFIG``: one of :data:`CONFIGS`.
      dataset: ``KRYLOVJAX_NB_DATASET``: ``""`` (the config's), one of :data:`DATASETS`, or your
        own images, ``"files:<directory, glob pattern or file>"`` or ``"array:<.npy/.npz>"``
        (:func:`krylovjax.data.load_images`; the config's tfds class filter is dropped).
      num_images: ``KRYLOVJAX_NB_NUM_IMAGES``: ``""`` or an int >= 1 (the subset size; the
        denoised images are the first ``min(denoise.num_images, num_images)``).
      data_dir: ``KRYLOVJAX_NB_DATA_DIR``: the tfds data directory (``""``: tfds's default).
      dtype: ``KRYLOVJAX_NB_DTYPE``: ``""`` (the config's, float32) or one of :data:`DTYPES`, the
        U-Net's compute dtype (``train.model_overrides.dtype``).

    Returns:
      An ``ml_collections.ConfigDict`` (see ``colab_full.py`` for its keys).
    """
    key = str(name).strip().lower()
    if key not in CONFIGS:
        raise ValueError(f"KRYLOVJAX_NB_CONFIG: expected one of {CONFIGS}, got {name!r}")
    cfg = importlib.import_module(f"experiments.configs.colab_{key}").get_config()
    raw = str(dataset or "").strip()
    ds = raw.lower()
    if ds.startswith(("files:", "array:")):  # your own images (e.g. uploaded to Colab); the path keeps its case
        kind, path = raw.split(":", 1)
        if not path.strip():
            raise ValueError(f"KRYLOVJAX_NB_DATASET: {raw!r} names no path; expected {kind.lower()}:<path>")
        cfg.dataset = f"{kind.lower()}:{os.path.expanduser(path.strip())}"
        cfg.class_filter = ""  # the tfds-only keys of the config (the full config's "dog")
        cfg.data_dir = ""
    elif ds:
        if ds not in DATASETS:
            raise ValueError(f"KRYLOVJAX_NB_DATASET: expected one of {DATASETS}, 'files:<path>' or "
                             f"'array:<path>' (or empty for the config's {cfg.dataset!r}), got {dataset!r}")
        cfg.dataset = ds
    n = _positive_int(num_images, "KRYLOVJAX_NB_NUM_IMAGES")
    if n is not None:
        cfg.num_images = n
        cfg.denoise.num_images = min(cfg.denoise.num_images, n)
    if data_dir:
        cfg.data_dir = os.path.expanduser(str(data_dir))
    dt = str(dtype or "").strip().lower()
    if dt:
        if dt not in DTYPES:
            raise ValueError(f"KRYLOVJAX_NB_DTYPE: expected one of {DTYPES} (or empty for the config's), got {dtype!r}")
        cfg.train.model_overrides.dtype = dt
    return cfg


# ----------------------------------------------------------------------------------------------
# Platform and devices
# ----------------------------------------------------------------------------------------------


class PlatformInfo(NamedTuple):
    """The JAX platform the notebook runs on.

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``jax.default_backend()``).
      num_devices: local devices of that platform (the pre-computation shards over all of them).
      device_kind: e.g. ``"cpu"``, ``"Tesla T4"``, ``"TPU v2"``.
      jax_version: ``jax.__version__``.
    """

    platform: str
    num_devices: int
    device_kind: str
    jax_version: str

    def summary(self) -> str:
        return (f"platform {self.platform.upper()}: {self.num_devices} device(s) "
                f"({self.device_kind}), jax {self.jax_version}")


def _backends_started() -> bool:
    """Whether JAX has initialised its backends (the platform can be chosen only before)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - cannot tell: leave JAX's configuration alone
        return True


def _available() -> str:
    """'cpu (1 device), gpu (2 devices)': the platforms JAX can start here."""
    import jax

    found = []
    for p in ("cpu", "gpu", "tpu"):
        try:
            n = len(jax.devices(p))
        except RuntimeError:
            continue
        found.append(f"{p} ({n} device{'s' if n != 1 else ''})")
    return ", ".join(found) or "none"


def _parse_devices(devices: Any) -> int | None:
    if devices is None or str(devices).strip().lower() in ("", "all"):
        return None
    return _positive_int(devices, "KRYLOVJAX_NB_DEVICES")


def select_platform(platform: str = "auto", devices: Any = "all") -> PlatformInfo:
    """Start JAX on the requested platform and report it.

    ``platform="auto"`` takes JAX's default (TPU, else GPU, else CPU). A named platform is
    selected through ``jax_platforms`` before JAX starts its backends. ``devices`` = N asks
    for N devices: on CPU N host devices are created (``jax_num_cpu_devices``: the sharded
    code path runs on a CPU runtime too), on GPU the first N are made visible, on TPU N must be
    the number present.

    Args:
      platform: ``KRYLOVJAX_NB_PLATFORM``: one of :data:`PLATFORMS`.
      devices: ``KRYLOVJAX_NB_DEVICES``: ``"all"`` or an int >= 1.

    Returns:
      A :class:`PlatformInfo`.

    Raises:
      ValueError: an unknown platform, a platform this runtime does not have (the message
        lists what it has), a device count it cannot give, or a platform that differs from the
        one JAX already runs on in this kernel (restart the kernel).
    """
    import jax

    req = str(platform or "auto").strip().lower()
    if req not in PLATFORMS:
        raise ValueError(f"KRYLOVJAX_NB_PLATFORM: expected one of {PLATFORMS}, got {platform!r}")
    n = _parse_devices(devices)
    started = _backends_started()
    previous = jax.config.jax_platforms
    if not started:
        if req != "auto":
            jax.config.update("jax_platforms", req)
        if n is not None:
            jax.config.update("jax_num_cpu_devices", n)
            jax.config.update("jax_cuda_visible_devices", ",".join(str(i) for i in range(n)))
    try:
        jax.devices() if req == "auto" else jax.devices(req)
    except RuntimeError as err:
        if not started:  # leave the kernel able to start JAX on what is there
            jax.config.update("jax_platforms", previous)
            import jax.extend.backend

            jax.extend.backend.clear_backends()
        raise ValueError(
            f"KRYLOVJAX_NB_PLATFORM={req}: this runtime has no {req.upper()} (JAX can start: "
            f"{_available()}). In Colab choose Runtime > Change runtime type > a {req.upper()} "
            f"accelerator and run the notebook again, or set KRYLOVJAX_NB_PLATFORM=auto to use "
            f"what is there. ({str(err).splitlines()[0]})") from None
    backend = jax.default_backend()
    if req != "auto" and backend != req:
        raise ValueError(
            f"KRYLOVJAX_NB_PLATFORM={req}: JAX already runs on {backend} in this kernel (a platform "
            f"can only be chosen before JAX starts); restart the kernel (Colab: Runtime > Restart "
            f"session) and run the notebook from the top, or set KRYLOVJAX_NB_PLATFORM=auto")
    devs = jax.local_devices()
    if n is not None and len(devs) != n:
        raise ValueError(
            f"KRYLOVJAX_NB_DEVICES={n}: JAX runs on {len(devs)} {backend} device(s) here"
            + (" (the count can only be chosen before JAX starts: restart the kernel)" if started
               else " (on TPU the count cannot be chosen: use all of them)")
            + "; set KRYLOVJAX_NB_DEVICES=all or a count this runtime has")
    return PlatformInfo(platform=backend, num_devices=len(devs), device_kind=str(devs[0].device_kind),
                        jax_version=jax.__version__)


def check_sharding(cfg, num_devices: int, *, platform: str | None = None) -> None:
    """Check that ``num_devices`` divide every batch that is split over them.

    The pre-computation splits each chunk of ``chunk_images`` images (the last chunk: what is
    left of ``num_images``) over all devices, and data-parallel training splits each batch of
    ``train.batch_size``. The library would pad a ragged chunk with copies of its last image;
    the notebook asks for an even split instead (no device solves padding) and says so before
    any work is done.

    ``platform``: the runtime's (:class:`PlatformInfo`); on ``"tpu"`` the device count cannot be
    chosen (all of them are used), so the advice is the config's numbers instead.

    Raises:
      ValueError: naming the numbers and the setting to change.
    """
    D = int(num_devices)
    if D < 1:
        raise ValueError(f"num_devices: expected an integer >= 1, got {num_devices!r}")
    B, chunk_images, bs = int(cfg.num_images), int(cfg.chunk_images), int(cfg.train.batch_size)

    def shard_sizes(n: int, chunk_images: int = chunk_images) -> list[int]:  # the chunks of n images
        chunk = min(chunk_images, n)
        return sorted({chunk} | ({n % chunk} if n % chunk else set()))

    def fits(d: int, n: int, bs: int = bs, chunk_images: int = chunk_images) -> bool:
        return bs % d == 0 and all(s % d == 0 for s in shard_sizes(n, chunk_images))

    def nearest(d: int, **kw) -> int | None:  # the image count nearest B that d devices divide (ties: more)
        return min((n for n in range(d, 2 * B + d + 1) if fits(d, n, **kw)), key=lambda n: (abs(n - B), -n),
                   default=None)

    if not fits(D, B):
        ragged = [s for s in shard_sizes(B) if s % D]
        what = ([f"the batch of {ragged[0]} images to shard (num_images={B} in chunks of chunk_images="
                 f"{chunk_images})"] if ragged else []) + \
               ([f"the training batch of {bs} (train.batch_size)"] if bs % D else [])
        # Advice that works for every batch at once (a walkthrough was sent from one refusal to
        # the next, 2026-12-07): a device count that divides them all (not on a TPU, whose count
        # is all of its cores), else the nearest image count that D devices divide, else the
        # config's batch sizes too.
        fixes = [] if platform == "tpu" else [f"set KRYLOVJAX_NB_DEVICES={max(d for d in range(1, D) if fits(d, B))}"]
        near = nearest(D)
        if near is not None:
            fixes.append(f"set KRYLOVJAX_NB_NUM_IMAGES={near}")
        else:
            new_bs = bs + (-bs) % D
            options = [{"bs": new_bs, "chunk_images": c} for c in {chunk_images, chunk_images + (-chunk_images) % D}]
            # the image count nearest B; on a tie, the config's chunk_images kept
            found = [(o, n) for o, n in ((o, nearest(D, **o)) for o in options) if n is not None]
            change, near = min(found, key=lambda on: (abs(on[1] - B), on[0]["chunk_images"] != chunk_images))
            sets = ([f"cfg.train.batch_size = {new_bs}"] if new_bs != bs else []) + \
                   ([f"cfg.chunk_images = {change['chunk_images']}"] if change["chunk_images"] != chunk_images else [])
            fixes.append("add " + " and ".join(sets) + " below cfg = nb.get_config(...)"
                         + (f" with KRYLOVJAX_NB_NUM_IMAGES={near}" if near != B else ""))
        raise ValueError(
            f"KRYLOVJAX_NB_NUM_IMAGES / KRYLOVJAX_NB_DEVICES: the {D} devices do not divide "
            + " nor ".join(what) + "; " + " or ".join(fixes))
    k = int(cfg.denoise.num_images)
    if not 1 <= k <= B:
        raise ValueError(f"denoise.num_images: expected an integer in [1, num_images={B}], got {k}")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def in_colab() -> bool:
    """Whether this kernel runs inside Google Colab."""
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_dataset(cfg, download: str = "auto") -> str:
    """Download and prepare the config's tfds dataset if asked to; returns what was done.

    ``download``: ``KRYLOVJAX_NB_DOWNLOAD``: ``"yes"`` prepares a missing dataset
    (``tfds.data_source(..., download=True)``, array_record files in ``cfg.data_dir``),
    ``"no"`` never downloads, ``"auto"`` downloads only inside Colab. Without a download a
    missing dataset is reported by :func:`load_images` at once.
    """
    mode = str(download or "auto").strip().lower()
    if mode not in DOWNLOADS:
        raise ValueError(f"KRYLOVJAX_NB_DOWNLOAD: expected one of {DOWNLOADS}, got {download!r}")
    if cfg.dataset == "builtin":
        return "built-in photographs (scikit-image, offline): nothing to prepare"
    if cfg.dataset.startswith(("files:", "array:")):
        return f"your own images ({cfg.dataset}): nothing to prepare"
    if mode == "no" or (mode == "auto" and not in_colab()):
        return f"no download (KRYLOVJAX_NB_DOWNLOAD={mode}): {cfg.dataset} must be prepared already"
    import tensorflow_datasets as tfds

    data_dir = cfg.data_dir or None
    builder = tfds.builder(cfg.dataset, data_dir=data_dir, try_gcs=False)
    if builder.is_prepared():
        return f"{cfg.dataset} is prepared in {builder.data_dir}"
    try:
        tfds.data_source(cfg.dataset, split=cfg.split, data_dir=data_dir, download=True, try_gcs=False)
    except ModuleNotFoundError as err:  # tfds's download imports modules it does not require
        raise ValueError(
            f"KRYLOVJAX_NB_DOWNLOAD={mode}: preparing {cfg.dataset} needs the module {err.name!r}, which is "
            f"not installed: pip install {err.name} (or krylovjax's extra: pip install '.[tf]'), or "
            f"prepare it elsewhere and set KRYLOVJAX_NB_DATA_DIR") from err
    from krylovjax.data import _data_dir_root

    return f"downloaded and prepared {cfg.dataset} (array_record) in {_data_dir_root(builder, data_dir)}"


def load_images(cfg) -> np.ndarray:
    """The config's images, numpy ``[B, C, H, W]`` in [0, 1] in ``cfg.dtype``.

    Through ``experiments.precompute.load`` (:func:`krylovjax.data.load_images`): a tfds dataset
    that is not prepared fails at once (nothing is downloaded here) with a ``ValueError`` that
    says how to prepare it or which setting to change. ``cfg.dtype == "float64"`` turns
    ``jax_enable_x64`` on.
    """
    import jax

    from experiments import precompute as binary
    from krylovjax.data import DatasetNotPreparedError

    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected float32 or float64, got {cfg.dtype!r}")
    if cfg.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
        return binary.load(cfg)
    except DatasetNotPreparedError as err:
        raise ValueError(
            f"KRYLOVJAX_NB_DATASET={cfg.dataset}: the dataset is not on disk. {err}\nTo change: set "
            f"KRYLOVJAX_NB_DATA_DIR to the directory that holds it, KRYLOVJAX_NB_DOWNLOAD=yes to "
            f"download and prepare it here (needs network access), or KRYLOVJAX_NB_DATASET=builtin "
            f"for the offline photographs.") from None


def claim_workdir(workdir: str, cfg) -> bool:
    """Make ``workdir`` this config's run directory (:func:`krylovjax.experiment_utils.claim_workdir`).

    Returns True for a new run directory, False when it resumes one of the same config;
    raises ``ValueError`` (naming the differing keys) for another config's directory. The
    training's run-control keys (``train.budget_seconds``, ``train.num_steps``, ``train.eval_every``,
    ... :data:`krylovjax.training.RUN_CONTROL_KEYS`) may change: a larger budget trains the same
    run on, from its last checkpoint and the same store.
    """
    from krylovjax import experiment_utils as eu
    from krylovjax.training import RUN_CONTROL_KEYS

    if not workdir or not str(workdir).strip():
        raise ValueError("KRYLOVJAX_NB_WORKDIR: expected a directory path, got an empty string")
    return eu.claim_workdir(os.path.expanduser(str(workdir)), EXPERIMENT, cfg, env_var="KRYLOVJAX_NB_WORKDIR",
                            legacy=LEGACY_CONFIG, may_change=[f"train.{k}" for k in RUN_CONTROL_KEYS])


def workdir_note(workdir: str) -> str:
    """A note when the run directory would not outlive the Colab runtime, else ``""``.

    In Colab, files outside Google Drive (``/content/...``) are deleted when the runtime is
    recycled (a disconnect, the idle limit), and the notebook cannot resume from them.
    """
    path = os.path.abspath(os.path.expanduser(str(workdir)))
    if not in_colab() or path.startswith("/content/drive/"):
        return ""
    return (f"note: {path} is on the Colab runtime's own disk, deleted when the runtime is recycled (a "
            f"disconnect, the idle limit); to resume after one, mount Google Drive (from google.colab import "
            f"drive; drive.mount('/content/drive')) and set KRYLOVJAX_NB_WORKDIR=/content/drive/MyDrive/krylovjax_colab")


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class PrecomputeRun(NamedTuple):
    """What :func:`precompute` did: the config, ``PipelineSummary.to_dict()`` of this call,
    :func:`krylovjax.pipeline.summarize_store` totals of the whole store, and its path."""

    config: Any
    summary: dict
    totals: dict
    store_path: str

    def table(self) -> str:
        from krylovjax import experiment_utils as eu

        s, t = self.summary, self.totals
        rows = [["images in the store", t["images"]],
                ["computed now / already done", f"{s['images_computed']} / "
                                                f"{s['num_images'] - s['images_computed']}"],
                ["strategy", self.config.strategy],
                ["sharded over devices", self.config.shard],
                ["linear systems solved", t["systems_solved"]],
                ["matvecs per system", f"{t['matvecs_per_system']:.1f}"],
                ["non-converged solves", t["nonconverged"]],
                ["sweeps per image (mean / max)", f"{t['sweeps_mean']:.2f} / {t['sweeps_max']}"],
                ["images short of outer_tol", t["outer_nonconverged"]],
                ["seconds (compile)", f"{s['seconds']:.1f} ({s['compile_seconds']:.1f})"],
                ["systems per second", f"{s['systems_per_second']:.0f}"]]
        return eu.markdown_table(["pre-computation", "value"], rows)


def _precompute_args(cfg) -> tuple[Any, dict]:
    from experiments import precompute as binary

    pcfg = binary.precompute_config(cfg.precompute)
    kw = dict(chunk_images=int(cfg.chunk_images), store_dtype=cfg.store_dtype,
              embed_component=cfg.embed_component, seed=int(cfg.seed))
    return pcfg, kw


def precompute(cfg, images, workdir: str, *, progress: bool = True) -> PrecomputeRun:
    """Pre-compute scores and embedded trajectories of ``images`` into ``<workdir>/precompute``.

    :func:`krylovjax.pipeline.run_precompute` with the config's ``precompute`` block (through
    ``experiments.precompute.precompute_config``): log-FP solves (method.md 3.1-3.4) by the
    cross-matrix strategy, each chunk sharded over all devices when ``precompute.shard``, the
    embedding ``x^n = x^{n-1} + (f - g^2/2 s^n) dt`` (method.md 4.1), a resumable store.

    Args:
      cfg: the notebook config.
      images: ``[B, C, H, W]`` in [0, 1] (:func:`load_images`).
      workdir: the run directory.
      progress: show a progress bar.
    """
    from krylovjax import pipeline

    pcfg, kw = _precompute_args(cfg)
    wd = os.path.join(os.path.expanduser(str(workdir)), "precompute")
    summary = pipeline.run_precompute(images, pcfg, wd, progress=progress, **kw)
    store = pipeline.open_store(wd, images, pcfg, **kw)
    return PrecomputeRun(pcfg, summary.to_dict(), pipeline.summarize_store(store), store.path)


def train_config(cfg):
    """The :class:`krylovjax.training.TrainConfig` of ``cfg.train`` (method "ours", the
    pre-computation's SDE, SSIM as the evaluation metric)."""
    from krylovjax import training

    d = cfg.train.to_dict()
    d.update(method="ours", sde=cfg.precompute.sde, sde_kwargs=dict(cfg.precompute.sde_kwargs),
             target_metric="ssim")
    try:
        return training.TrainConfig.from_dict(d)
    except ValueError as err:
        raise ValueError(f"train: {err}") from err


class DenoiseRun(NamedTuple):
    """What :func:`train_and_denoise` did.

    Attributes:
      train: the training run's numbers (steps, stop reason, seconds, last loss, ...).
      evals: the evaluation records (step, train_seconds, ssim, global_ssim, psnr).
      noisy, denoised: :func:`experiments.denoise.image_metrics` of the noisy inputs and of the
        final model's outputs against the clean images (``ssim``, ``global_ssim``, ``psnr``,
        ``mse``, ``ssim_per_image``).
      clean, noisy_images, denoised_images: ``[K, C, H, W]`` arrays.
      frames: ``[F, K, C, H, W]`` the denoising trajectory.
    """

    train: dict
    evals: list
    noisy: dict
    denoised: dict
    clean: np.ndarray
    noisy_images: np.ndarray
    denoised_images: np.ndarray
    frames: np.ndarray

    def summary(self) -> str:
        t = self.train
        if t["last_loss"] is not None:
            loss = f"last logged loss {t['last_loss']:.4g}"
        else:  # none in this call: it trained nothing, or fewer updates than train.log_every
            loss = f"no loss logged in this call (one every train.log_every={t['config']['log_every']} updates)"
        if t["resumed_from"] is not None and t["resumed_from"] == t["steps"]:
            on = ("it had reached the target" if t["stop_reason"] == "target" else
                  "to train it on, set a larger cfg.train.budget_seconds or cfg.train.num_steps below "
                  "cfg = nb.get_config(...) and run the notebook again")
            return (f"the run in this work directory already stood at step {t['steps']} ({t['train_seconds']:.1f} s "
                    f"of training; stop: {t['stop_reason']}): nothing trained now; {on}")
        return (f"trained {t['steps']} steps in {t['train_seconds']:.1f} s (stop: {t['stop_reason']}; "
                f"compile {t['compile_seconds']:.1f} s and evaluation {t['eval_seconds']:.1f} s apart), {loss}")

    def table(self) -> str:
        from krylovjax import experiment_utils as eu

        rows = [["noisy input", f"{self.noisy['ssim']:.4f}", f"{self.noisy['psnr']:.2f}",
                 ", ".join(f"{s:.3f}" for s in self.noisy["ssim_per_image"])],
                [f"ours (step {self.train['steps']})", f"{self.denoised['ssim']:.4f}",
                 f"{self.denoised['psnr']:.2f}",
                 ", ".join(f"{s:.3f}" for s in self.denoised["ssim_per_image"])]]
        return eu.markdown_table(["images", "mean SSIM", "mean PSNR (dB)", "SSIM per image"], rows)


def _quiet_orbax_notices() -> None:
    """Drop orbax's INFO chatter and read-only-manager notices (six ``Given directory is read
    only`` warnings on a resumed run) in a notebook kernel, where absl's records reach Python's
    handlers through the ``absl`` logger rather than absl's own handler (the binaries'
    :func:`krylovjax.experiment_utils.quiet_orbax_logs`)."""
    import logging

    from krylovjax import experiment_utils as eu

    logger = logging.getLogger("absl")
    if not any(isinstance(f, eu._QuietOrbax) for f in logger.filters):
        logger.addFilter(eu._QuietOrbax())


def train_and_denoise(cfg, workdir: str, store_path: str, images) -> DenoiseRun:
    """Train our score model on the store's embedded trajectories, then denoise.

    :func:`krylovjax.training.train` (score-embedding loss, method.md 4.2; resumes from
    ``<workdir>/train``; stops at ``train.budget_seconds`` of training time or
    ``train.num_steps``). Every ``train.eval_every`` updates and at the end the EMA model
    denoises the noisy copies ``clamp(x + noise.std z, 0, 1)`` of the first
    ``denoise.num_images`` images with ``experiments.denoise.ours_denoiser`` (sampler
    ``ours.sampler``), scored by SSIM against the clean images. The last evaluation is the
    result; the arrays are also saved in ``<workdir>/denoised.npz``.
    """
    from experiments import denoise
    from krylovjax import experiment_utils as eu
    from krylovjax import training

    wd = os.path.expanduser(str(workdir))
    _quiet_orbax_notices()
    tc = train_config(cfg)
    # The sampler's settings and what ours' SDE allows of them, before training (experiments.denoise
    # checks them before its runs; unchecked, an unknown kind ran as "denoise", and an unmatched
    # noise level failed at the first evaluation).
    denoise.check_ours_sampler_fields(cfg.ours.sampler)
    denoise.check_ours_sampler_with_sde(cfg, tc)
    k = int(cfg.denoise.num_images)
    clean = np.asarray(images)[:k]
    noisy = denoise.noisy_input(cfg, clean)
    den = denoise.ours_denoiser(cfg, tc, noisy, idx=np.arange(k) if tc.per_image_offset else None)
    last: dict = {}
    sub = os.path.join(wd, "train")
    res = training.train(tc, training.trajectories_from_store(store_path), sub,
                         eval_fn=denoise.make_eval_fn(den, clean, "ours", last))
    evals = [{key: e.get(key) for key in ("step", "train_seconds", "ssim", "global_ssim", "psnr")}
             for e in eu.read_metrics(sub, "eval")]
    train = {"steps": res.step, "stop_reason": res.stop_reason, "resumed_from": res.resumed_from,
             "train_seconds": res.train_seconds, "compile_seconds": res.compile_seconds,
             "eval_seconds": res.eval_seconds, "last_loss": res.last_loss,
             "seconds_per_step": res.train_seconds / max(res.step, 1),
             "network_evals": last["network_evals"], "config": tc.to_dict()}
    run = DenoiseRun(train=train, evals=evals, noisy=denoise.image_metrics(noisy, clean, in_range=False),
                     denoised=dict(last["metrics"]), clean=clean, noisy_images=noisy,
                     denoised_images=np.asarray(last["out"]), frames=np.asarray(last["frames"]))
    np.savez(os.path.join(wd, "denoised.npz"), clean=run.clean, noisy=run.noisy_images,
             denoised=run.denoised_images, frames=run.frames)
    return run


# ----------------------------------------------------------------------------------------------
# Figures and results
# ----------------------------------------------------------------------------------------------


def _levels(n: int, k: int) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(k, n))})


def write_figures(workdir: str, pre: PrecomputeRun, run: DenoiseRun, *, max_rows: int = 4) -> dict:
    """PNG figures in ``workdir``; returns ``{name: path}``.

    ``embedding``: the embedded trajectories x^n of the first images at a few time levels (what
    the model trains on); ``denoised``: clean / noisy / denoised images with their SSIM;
    ``trajectory``: the denoising trajectory of the first images; ``ssim_curve``: the SSIM of
    the denoised images at each evaluation during training.
    """
    from krylovjax import experiment_utils as eu
    from krylovjax import training

    wd = os.path.expanduser(str(workdir))
    paths = {name: os.path.join(wd, f"{name}.png")
             for name in ("embedding", "denoised", "trajectory", "ssim_curve")}
    traj = training.trajectories_from_store(pre.store_path)
    lv = _levels(traj.x.shape[1], 6)
    r = min(max_rows, traj.x.shape[0])
    eu.image_grid(paths["embedding"], [traj.x[i, lv] for i in range(r)],
                  row_labels=[f"image {i}" for i in range(r)],
                  col_labels=[f"n={n}, t={traj.t[n]:.3g}" for n in lv],
                  title="Score-embedded trajectories x^n (pre-computed, the training data)")
    k = run.clean.shape[0]
    ns, ds = run.noisy["ssim_per_image"], run.denoised["ssim_per_image"]
    eu.image_grid(paths["denoised"], [list(run.clean), list(run.noisy_images), list(run.denoised_images)],
                  row_labels=["clean", f"noisy\nSSIM {run.noisy['ssim']:.3f}",
                              f"ours\nSSIM {run.denoised['ssim']:.3f}"],
                  col_labels=[[f"image {i}" for i in range(k)], [f"{s:.3f}" for s in ns],
                              [f"{s:.3f}" for s in ds]],
                  title=f"Denoising after {run.train['steps']} training steps")
    rr = min(max_rows, k)
    F = run.frames.shape[0]
    eu.image_grid(paths["trajectory"], [run.frames[:, i] for i in range(rr)],
                  row_labels=[f"image {i}" for i in range(rr)],
                  col_labels=[f"frame {j}" for j in range(F)],
                  title="Denoising trajectory (frame 0 = noisy input, last = output)")
    ev = [e for e in run.evals if e.get("ssim") is not None]
    eu.plot_curves(paths["ssim_curve"], {"ours": ([e["train_seconds"] for e in ev], [e["ssim"] for e in ev])},
                   xlabel="training time (s)", ylabel="mean SSIM of the denoised images",
                   hlines=[run.noisy["ssim"]], title="Denoising quality during training "
                                                      "(dashed: the noisy input)")
    return paths


def write_results(workdir: str, cfg, platform: PlatformInfo, pre: PrecomputeRun, run: DenoiseRun,
                  figures: dict) -> str:
    """``<workdir>/results.json``: platform, machine, config, pre-computation, training, SSIMs,
    figures. Returns its path."""
    from krylovjax import experiment_utils as eu

    path = os.path.join(os.path.expanduser(str(workdir)), "results.json")
    eu.write_json(path, {
        "experiment": EXPERIMENT, "platform": platform._asdict(), "machine": eu.machine_info(),
        "config": eu._plain(cfg), "dataset": {"name": cfg.dataset, "num_images": int(cfg.num_images),
                                              "image_size": int(cfg.image_size)},
        "precompute": {"config": pre.config.to_dict(), "run": pre.summary, "store": pre.totals,
                       "store_path": pre.store_path},
        "train": run.train, "evals": run.evals,
        "noise": {"std": cfg.noise.std, "seed": cfg.noise.seed, "clamp": cfg.noise.clamp},
        "noisy": run.noisy, "denoised": run.denoised,
        "figures": {k: os.path.basename(v) for k, v in figures.items()},
    })
    return path


def show(path: str) -> None:
    """Display a PNG inline (an ``image/png`` output of the notebook)."""
    from IPython.display import Image, display

    display(Image(filename=os.fspath(path)))

