r"""Denoise your own noisy images with a trained model (Paper A's task, on your images).

Usage::

    python -m experiments.restore --workdir=runs/mine_ours --input=files:~/noisy --noise_std=auto
    python -m experiments.restore --workdir=runs/demo/ours --input=builtin:chelsea --add_noise=0.3

``--workdir`` is a training run (``experiments.train``, or the ``ours/`` / ``ddpm/`` run inside
an ``experiments.denoise`` or ``experiments.budget`` work directory); its latest checkpoint's EMA
weights are loaded (:func:`krylovjax.training.load_score_fn`).

``--input`` is a :func:`krylovjax.data.load_images` source: ``files:<folder, glob pattern or
file>``, ``array:<file.npy or .npz>``, ``builtin:<name>``, ... Each image is centre-cropped and
resized to the model's size (``--num_images``: its first ones, 0 = all).

``--noise_std`` is the standard deviation of the Gaussian noise in the inputs on the [0, 1] pixel
scale, as the model sees them (after the resize, which averages noise away when the files are
larger than the model): a number, or ``auto``, each image's own estimate
(:func:`krylovjax.metrics.estimate_noise`: Donoho's median absolute deviation of its finest diagonal wavelet
coefficients, for Gaussian noise). The estimate is reported for every image either way.
``--add_noise=S`` first adds ``N(0, S^2)`` noise (``--noise_seed``) to the inputs and clamps to
[0, 1], Paper A's test input, and scores the outputs against the inputs: a demonstration on clean
images (``--noise_std`` then defaults to ``S``). ``--clean`` is a source of the clean images, in the
inputs' order, to score against otherwise.

Samplers (``--sampler``):

* ours (score model): ``ode`` = :func:`krylovjax.sampling.denoise`, the probability-flow ODE
  (Dormand-Prince, rtol = atol = 1e-3) from the time whose noise level is ``--noise_std`` (each
  image its own with ``auto``) down to t = 1e-3, then Tweedie's step (``--final_denoise``);
  ``sde`` = the same start with ``--num_steps`` Euler-Maruyama steps; ``flow`` = the
  probability-flow ODE from t = 1 whatever the noise level (Paper B's sampler, the
  ``experiments.denoise`` demo's); ``paper_a`` = Paper A's damped reverse SDE from t = 1 to 0
  (``--num_steps`` steps, noise 0.1 g sqrt(dt), clamped to [0, 1]). ``auto`` = ``paper_a`` for a
  model trained with a fixed perturbation std (``sde="constant"`` with ``std`` set, Paper A's
  script: it has no noise-level schedule to start from), else ``ode`` (also for the demo's
  ``sde="constant"`` with ``std=None``, whose std grows as ``g sqrt(t)``).
* DDPM: ``ancestral`` (the default) or ``ddim``: :func:`krylovjax.ddpm.ddpm_denoise` from the
  step whose noise level matches ``2 noise_std`` (the network's [-1, 1] range).

``--baseline=nl_means`` (the default; ``none`` leaves it out) also denoises each input with a
classical method that needs no training, scikit-image's non-local means (:func:`nl_means`, with
``--noise_std`` when given, else each image's estimate, unraised), and reports it beside the model: a yardstick that shows when the model does
not know images like the inputs. A model trained on few images has learnt those images, not
photos in general: it restores noisy copies of them and draws other images towards them (the
demo's one-photo model turns a noisy astronaut into a blend with the cat it was trained on). The
run says how many images the model was trained on, and warns below 100.

A model trained with per-image time intervals (``per_image_offset``) needs the training image
each input is a noisy copy of: ``--image_index=k`` (one for all inputs, or one per input; 0 when
the model was trained on one image).

Outputs in ``--outdir`` (default ``<workdir>/restore``): ``denoised/<k>_<name>.png`` (8-bit, named
after the input files), ``denoised.npy`` (float32 ``[B, C, H, W]`` in [0, 1]), ``noisy.npy`` (the
inputs as denoised: resized, with the added noise), ``baseline.npy`` (the non-local means
outputs), ``restore.png`` (per image: the input, frames of its trajectory, the output, the
baseline's output and the clean image when known), ``restore.md`` and ``restore.json`` (written
last: it marks a finished run; SSIM and PSNR of input, output and baseline against the clean
images when known; each input's file, its size as read (``input_size``: width, height) and its
clean file; the notes), and
``experiment.json`` (the run's settings, written first: another run's settings are refused there). One run at a time per output directory; other settings
or other input pixels are refused there, a finished run is redone only with ``--overwrite``;
``--fresh`` moves whatever the directory holds to ``<outdir>.prev`` and starts afresh.

``--compute_dtype``: the U-Net's compute dtype, by default the training's (float32 for a model
trained in bfloat16: see ``experiments.generate``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from absl import app, flags, logging

FLAGS = flags.FLAGS
SAMPLERS_OURS = ("ode", "sde", "flow", "paper_a")
SAMPLERS_DDPM = ("ancestral", "ddim")
RESULT_FILES = ("restore.png", "restore.md", "restore.json", "denoised.npy", "noisy.npy", "baseline.npy",
                "denoised/")
BASELINES = ("nl_means", "none")
# output directories of the code before --baseline had none, and before --compute_dtype
LEGACY_SETTINGS = {"baseline": "none", "compute_dtype": "model"}
FEW_IMAGES = 100  # a model trained on fewer images than this is warned about (module docstring)
T_END = 1e-3  # the ode, sde and flow samplers stop here (Paper B's epsilon)
ODE_TOL = 1e-3  # Paper B's rtol and atol

if __name__ == "__main__":
    from krylovjax import experiment_utils as eu

    flags.DEFINE_string("workdir", None, "Training run directory (with checkpoints/).")
    flags.DEFINE_string("input", None, "load_images source of the noisy images (files:<path>, array:<path>, "
                        "builtin:<name>, ...).")
    flags.DEFINE_string("noise_std", None, "Noise standard deviation of the inputs on the [0, 1] scale, or "
                        "'auto' (estimated per image). Default: --add_noise when given, else required.")
    flags.DEFINE_float("add_noise", 0.0, "Add N(0, S^2) noise to the inputs first (clamped to [0, 1]) and score "
                       "against them: a demonstration on clean images.")
    flags.DEFINE_integer("noise_seed", 0, "Seed of --add_noise's noise.")
    flags.DEFINE_string("clean", None, "Optional load_images source of the clean images, in the inputs' order.")
    flags.DEFINE_integer("num_images", 0, "Denoise the first N images of --input (0: all).")
    flags.DEFINE_list("image_index", [], "Training image of each input for a per_image_offset model "
                      "(one for all, or one per input).")
    flags.DEFINE_string("outdir", None, "Output directory (default: <workdir>/restore).")
    flags.DEFINE_enum("sampler", "auto", ("auto",) + SAMPLERS_OURS + SAMPLERS_DDPM, "Sampler (see module doc).")
    flags.DEFINE_integer("num_steps", 50, "Steps of the sde and paper_a samplers.")
    flags.DEFINE_integer("num_frames", 6, "Trajectory frames shown per image (2 to 64).")
    flags.DEFINE_integer("seed", 0, "PRNG seed of the stochastic samplers.")
    flags.DEFINE_bool("final_denoise", True, "Ours' ode/sde/flow samplers: end with Tweedie's denoising step.")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_enum("baseline", "nl_means", BASELINES, "Also denoise with scikit-image's non-local means "
                      "(no training) and report it beside the model; none: leave it out.")
    flags.DEFINE_enum("compute_dtype", "model", eu.COMPUTE_DTYPES, eu.COMPUTE_DTYPE_HELP)
    flags.DEFINE_bool("overwrite", False, "Redo a finished run with the same settings in --outdir.")
    flags.DEFINE_bool("fresh", False, "Start afresh whatever --outdir holds: move it to <outdir>.prev first (an "
                      "older <outdir>.prev is deleted if it is an earlier run of this binary, "
                      "refused if it is anything else), after the other flags are checked.")
    flags.mark_flags_as_required(["workdir", "input"])


def resolve_sampler(tc, sampler: str) -> str:
    """The concrete denoising sampler for a model of ``tc`` (``auto`` resolved), or ValueError."""
    from experiments.generate import constant_perturbation

    if tc.method == "ddpm":
        if sampler == "auto":
            return "ancestral"
        if sampler not in SAMPLERS_DDPM:
            raise ValueError(f"sampler: a DDPM model takes one of {SAMPLERS_DDPM} (or auto), got {sampler!r}")
        return sampler
    if sampler == "auto":
        return "paper_a" if constant_perturbation(tc) else "ode"
    if sampler not in SAMPLERS_OURS:
        raise ValueError(f"sampler: a score model takes one of {SAMPLERS_OURS} (or auto), got {sampler!r}")
    if sampler in ("ode", "sde") and constant_perturbation(tc):
        raise ValueError(f"sampler: {sampler!r} starts at the time matching the noise level, but this model's "
                         "perturbation std is constant (no noise-level schedule); use paper_a or flow")
    return sampler


def estimate_noise(images):
    """:func:`krylovjax.metrics.estimate_noise`, the estimate of ``--noise_std=auto`` (imported when
    called: the binary's flag errors come before JAX is imported)."""
    from krylovjax.metrics import estimate_noise as estimate

    return estimate(images)


def nl_means(noisy, noise_std):
    """The classical baseline: scikit-image's non-local means of each image ``[B, C, H, W]`` with its
    noise level ``noise_std`` (scalar or ``[B]``), at the settings of scikit-image's gallery
    example with the noise level known: 5x5 patches searched within 6 pixels, Gaussian patch
    weights (``fast_mode=False``), ``h = 0.8 sigma``, the noise variance subtracted from the patch
    distances. On the eight built-in colour photos at 32 and 64 pixels and noise 0.05-0.3 it is
    within 0.01 mean SSIM of the best of 36 settings of non-local means and total variation tried
    (BUILD_NOTES.md). Returns float32 in [0, 1]."""
    import numpy as np
    from skimage.restoration import denoise_nl_means

    x = np.asarray(noisy, np.float64)
    std = np.broadcast_to(np.asarray(noise_std, np.float64), (x.shape[0],))
    out = [denoise_nl_means(img.transpose(1, 2, 0), patch_size=5, patch_distance=6, h=0.8 * s, sigma=s,
                            fast_mode=False, channel_axis=-1).reshape(img.shape[1:] + img.shape[:1]).transpose(2, 0, 1)
           for img, s in zip(x, std)]  # (one channel comes back as [H, W])
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32)


def trained_images(workdir: str) -> int | None:
    """How many images the training run in ``workdir`` was trained on (its ``config.json``), or
    None where it does not say."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            n = json.load(f)["data"]["num_images"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def noise_range(tc, sampler: str, dtype="float32") -> tuple[float, float] | None:
    """The noise levels (on the [0, 1] pixel scale) ``sampler`` can start from with a model of
    ``tc``: ours' ``ode``/``sde`` those of its SDE on ``[T_END, 1]``; DDPM's up to its schedule's
    largest (half of it: the network's range is [-1, 1]; any smaller level starts at the nearest
    step); None for ``flow`` and ``paper_a``, which start at t = 1 whatever the level."""
    import numpy as np

    from krylovjax import sampling

    if tc.method == "ddpm":
        nsr = np.asarray(tc.ddpm_schedule(dtype=np.dtype(dtype)).noise_to_signal, np.float64)
        return 0.0, float(np.sqrt(nsr[-1])) / 2.0
    if sampler not in ("ode", "sde"):
        return None
    return sampling.noise_range(tc.make_sde(), t_min=T_END, t_max=1.0, dtype=dtype)


def noise_levels(given, estimated, span, names, arg: str = "noise_std"):
    """Each image's noise level to denoise from, and the notes to show: ``given`` is a number (the
    same for all), ``"auto"`` (the estimates) or None (none needed: ``span`` is None). ``span`` is
    :func:`noise_range`'s. A given level outside ``span`` is refused, naming ``arg``; an estimate
    below it is raised to its lower end (a nearly clean image), one above it refused naming the
    file; a given level more than 3x from an image's estimate is noted (a 0-255 value, a wrong
    image), as is the 0-255 scale for a level above 1."""
    import numpy as np

    est = np.asarray(estimated, np.float64)
    notes = []
    if given is None:
        return est.copy(), notes
    if given == "auto":
        std = est.copy()
        if span is not None:
            low, high = std < span[0], std > span[1] * (1 + 1e-6)
            if high.any():
                bad = [f"{names[k]} ({std[k]:.4g})" for k in np.flatnonzero(high)]
                raise ValueError(f"{arg}: 'auto' estimated noise above the model's largest level {span[1]:.4g} in "
                                 f"{', '.join(bad)}; --sampler=flow or paper_a start at t = 1 whatever the level")
            if low.any():
                notes.append(f"Estimated noise below the model's smallest level {span[0]:.4g}, denoised from that "
                             "level (nearly clean): " + ", ".join(f"{names[k]} ({std[k]:.3g})" for k in np.flatnonzero(low)))
                std = np.maximum(std, span[0])
        return std, notes
    value = float(given)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{arg}: expected a finite noise level > 0, got {given!r}")
    if span is not None and not span[0] * (1 - 1e-6) <= value <= span[1] * (1 + 1e-6):
        hint = "; --sampler=flow or paper_a start at t = 1 whatever the level" if span[0] > 0 else ""
        scale = (f" (on the [0, 1] pixel scale: {value / 255:.4g} for {value:g} on a 0-255 scale)"
                 if value > 1 and arg == "noise_std" else "")
        raise ValueError(f"{arg}: the model cannot start from {value:g}{scale}: its noise levels span "
                         f"[{span[0]:.4g}, {span[1]:.4g}] on the [0, 1] pixel scale{hint}")
    far = np.flatnonzero((value > 3 * est) | (value < est / 3))
    if far.size:
        notes.append(f"--{arg}={value:g} is more than 3x from the noise estimated in "
                     + ", ".join(f"{names[k]} ({est[k]:.3g})" for k in far)
                     + (f"; the scale is [0, 1] pixel values ({value / 255:.4g} for {value:g} on a 0-255 scale)"
                        if value > 1 else ""))
    return np.full(est.shape, value), notes


def restore_arrays(fn, tc, noisy, noise_std, key, *, idx=None, sampler: str = "auto", num_steps: int = 50,
                   num_frames: int = 6, final_denoise: bool = True):
    """Denoise ``noisy [B, C, H, W]`` in [0, 1] with a trained model.

    Args:
      fn: the model of :func:`krylovjax.training.load_score_fn` (``score_fn`` or ``eps_fn``).
      tc: its :class:`krylovjax.training.TrainConfig`.
      noisy: ``[B, C, H, W]`` noisy images on the [0, 1] scale.
      noise_std: their noise level, a scalar or ``[B]`` (not used by ``flow`` and ``paper_a``).
      key: PRNG key of the stochastic samplers.
      idx: ``[B]`` training image indices (models with per-image time intervals).
      sampler, num_steps, num_frames, final_denoise: see the module docstring.

    Returns:
      ``(denoised [B, C, H, W], frames [num_frames, B, C, H, W], network_evaluations)``, JAX
      arrays, the first two in [0, 1] (DDPM states shown rescaled by ``1 / sqrt(abar_k)``).
    """
    import jax.numpy as jnp

    from experiments.generate import ddpm_frames, with_indices
    from krylovjax import ddpm, sampling

    sampler = resolve_sampler(tc, sampler)
    x = jnp.asarray(noisy)
    f = with_indices(fn, tc, idx, rows="B")
    traj = {"return_trajectory": True, "num_frames": int(num_frames)}
    if tc.method == "ddpm":
        sched = tc.ddpm_schedule(dtype=x.dtype)
        r = ddpm.ddpm_denoise(f, 2.0 * x - 1.0, 2.0 * noise_std, key, schedule=sched, method=sampler,
                              clip_x0=(-1.0, 1.0), **traj)
        return jnp.clip((r.x + 1.0) / 2.0, 0.0, 1.0), ddpm_frames(r, sched), r.num_score_evals
    sde = tc.make_sde()
    # the adaptive ODE: every image its own steps, so that an image's output does not depend on the
    # other inputs (the network is called on single rows, the image indices passed with them)
    rows = {"step_control": "per_image", "score_args": () if idx is None else (jnp.asarray(idx),)}
    if sampler == "paper_a":
        r = sampling.euler_maruyama(f, sde, x, key, t_start=1.0, t_end=0.0, num_steps=int(num_steps),
                                    noise_scale=0.1, clip=(0.0, 1.0), **traj)
    elif sampler == "flow":
        r = sampling.probability_flow(fn, sde, x, t_start=1.0, t_end=T_END, rtol=ODE_TOL, atol=ODE_TOL, **rows,
                                      **traj)
        r = sampling.with_final_denoise(r, f, sde, T_END, bool(final_denoise))
    else:
        kw = {"rtol": ODE_TOL, "atol": ODE_TOL, **rows} if sampler == "ode" else {"num_steps": int(num_steps)}
        r = sampling.denoise(fn if sampler == "ode" else f, sde, x, noise_std=jnp.asarray(noise_std, x.dtype), method=sampler, key=key,
                             t_end=T_END, final_denoise=bool(final_denoise), **traj, **kw)
    return jnp.clip(r.x, 0.0, 1.0), jnp.clip(r.trajectory, 0.0, 1.0), r.num_score_evals


def frames_shown(tc, sampler: str, noise_std, num_steps: int, num_frames: int, dtype="float32") -> int:
    """The trajectory frames a run can show: at most the states of a fixed-length chain (DDPM's
    from the step matching the noise, ``sde``/``paper_a``'s ``num_steps``) plus its start;
    ``num_frames`` for the adaptive ODE samplers. ``noise_std`` and ``dtype`` (the images') as
    :func:`restore_arrays` is given them, so that the start step is found as it finds it."""
    import numpy as np

    from krylovjax import ddpm

    if tc.method == "ddpm":
        std = np.asarray(noise_std, dtype)
        start = ddpm.denoise_start_step(2.0 * std, schedule=tc.ddpm_schedule(dtype=np.dtype(dtype)))
        chain = int(np.max(start)) + 1
    elif sampler in ("sde", "paper_a"):
        chain = int(num_steps)
    else:
        return num_frames
    if num_frames > chain + 1:
        logging.info("num_frames: the %s chain has %d steps; showing %d frames, not %d", sampler, chain,
                     chain + 1, num_frames)
    return min(num_frames, chain + 1)


def _image_indices(image_index, per_image_offset: bool, num_trained: int, count: int):
    """``[count]`` int32 training image indices for a per-image-offset model (None otherwise)."""
    import numpy as np

    if not per_image_offset:
        if image_index:
            raise ValueError("image_index: this model was not trained with per-image time intervals; leave it out")
        return None
    if not image_index:
        if num_trained != 1:
            raise ValueError(f"image_index: this model was trained with per-image time intervals on {num_trained} "
                             "images; give the training image each input is a noisy copy of (one index for all "
                             "inputs, or one per input)")
        image_index = [0]
    if len(image_index) not in (1, count):
        raise ValueError(f"image_index: expected one index or one per input ({count}), got {len(image_index)}")
    bad = [k for k in image_index if not 0 <= k < num_trained]
    if bad:
        raise ValueError(f"image_index: expected indices in [0, {num_trained}), got {bad}")
    return np.broadcast_to(np.asarray(image_index, np.int32), (count,)).copy()


def _names(files: list) -> list[str]:
    """The output file names: ``<k>_<stem>.png`` after the input files (:func:`_files`), else
    ``<k>.png``."""
    return [f"{k:03d}" + ("" if p is None else "_" + os.path.splitext(os.path.basename(p))[0]) + ".png"
            for k, p in enumerate(files)]


def _mispaired(inputs: list, cleans: list) -> list[str]:
    """Inputs whose file name (stem) is not in the name of the clean file paired with them by order
    but is in another's: ``"cat.png with a_person.png (cat is in z_cat.png)"``."""
    def stem(p):
        return os.path.splitext(os.path.basename(p))[0].lower()

    if not (inputs and cleans and all(inputs) and all(cleans)):
        return []
    out = []
    for k, a in enumerate(inputs):
        others = [b for j, b in enumerate(cleans) if j != k and stem(a) in stem(b)]
        if stem(a) not in stem(cleans[k]) and others:
            out.append(f"{os.path.basename(a)} with {os.path.basename(cleans[k])} ({stem(a)} is in "
                       f"{os.path.basename(others[0])})")
    return out


def _files(source: str, arg: str, count: int, num_images: int | None, channels: int, notes: list,
           size: int | None = None):
    """Each image's file and its size as read (``files:`` sources; None otherwise), with notes on
    what the reading did to them: gray files in colour, centre crops of oblong files, and files
    smaller than the model's ``size`` enlarged to it."""
    from krylovjax import experiment_utils as eu
    from krylovjax.data import file_info, selected_paths

    if not source.startswith("files:"):
        return [None] * count, [None] * count, [None] * count
    paths = [os.path.abspath(p) for p in selected_paths(source[6:], num_images=num_images)]
    infos = [file_info(p) for p in paths]
    shown = eu.short_paths(paths)
    gray = [n for n, i in zip(shown, infos) if i["gray"]]
    if gray and channels == 3 and len(gray) < len(paths):
        notes.append(f"{arg}: grayscale files read in colour (R = G = B), among colour files: {', '.join(gray)}")
    oblong = [f"{n} ({i['size'][0]}x{i['size'][1]})" for n, i in zip(shown, infos) if i["size"][0] != i["size"][1]]
    if oblong:
        notes.append(f"{arg}: centre-cropped to a square before the resize (sizes W x H): {', '.join(oblong)}")
    small = [f"{n} ({i['size'][0]}x{i['size'][1]})" for n, i in zip(shown, infos)
             if size is not None and min(i["size"]) < size]
    if small:  # (a 2x2 file was restored at 32x32 without a word; a walkthrough)
        notes.append(f"{arg}: smaller than the model's {size}x{size}, enlarged to it (its noise then spans "
                     f"neighbouring pixels, unlike the noise the model knows; sizes W x H): {', '.join(small)}")
    return paths, [list(i["size"]) for i in infos], shown


def run(workdir: str, input: str, outdir: str | None = None, *, noise_std: Any = None, add_noise: float = 0.0,
        noise_seed: int = 0, clean: str | None = None, num_images: int = 0, image_index=(),
        sampler: str = "auto", num_steps: int = 50, num_frames: int = 6, seed: int = 0,
        final_denoise: bool = True, step: int | None = None, baseline: str = "nl_means",
        overwrite: bool = False, fresh: bool = False, check_interrupt: Callable[[], None] | None = None,
        compute_dtype: str | None = None) -> dict:
    """Denoise ``input`` with the training run in ``workdir``; write the images, figure, table and
    JSON to ``outdir`` (see the module docstring). ``compute_dtype``
    (:func:`krylovjax.training.load_score_fn`): the U-Net's compute dtype, None or ``"model"``
    for the training's (recorded as ``"model"``, as is the training's own dtype asked by name). ``check_interrupt`` (the binary's
    :func:`krylovjax.experiment_utils.interrupts_between_steps`) is called before the work
    directory is claimed and between the sampling and the writing."""
    check_interrupt = check_interrupt or (lambda: None)
    import jax
    import numpy as np

    from krylovjax import experiment_utils as eu
    from krylovjax import metrics, training, workdir_lock

    with eu.checking_arguments():
        for name, v, lo in (("num_images", num_images, 0), ("num_frames", num_frames, 2), ("num_steps", num_steps, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        eu.check_frames(num_frames, "restore.png")
        eu.check_seed(seed)
        if not isinstance(add_noise, (int, float)) or isinstance(add_noise, bool) or not (
                np.isfinite(add_noise) and add_noise >= 0):
            raise ValueError(f"add_noise: expected a finite noise level >= 0, got {add_noise!r}")
        if add_noise and clean:
            raise ValueError("clean: --add_noise scores against the inputs themselves; give one or the other")
        noise_arg = "noise_std"
        if noise_std is None or noise_std == "":
            noise_std, noise_arg = (float(add_noise), "add_noise") if add_noise else (None, noise_arg)
        elif isinstance(noise_std, str) and noise_std != "auto":
            try:
                noise_std = float(noise_std)
            except ValueError:
                raise ValueError(f"noise_std: expected a number or 'auto', got {noise_std!r}") from None
        if isinstance(noise_std, (int, float)) and not (np.isfinite(noise_std) and noise_std > 0):
            raise ValueError(f"noise_std: expected a finite noise level > 0, got {noise_std!r}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline: expected one of {BASELINES}, got {baseline!r}")
        if not isinstance(final_denoise, bool):
            raise TypeError(f"final_denoise: expected a bool, got {final_denoise!r}")
        image_index = [int(k) for k in image_index]
        eu.check_training_run(workdir)
        if sampler not in ("auto",) + SAMPLERS_OURS + SAMPLERS_DDPM:
            raise ValueError(f"sampler: expected auto or one of {SAMPLERS_OURS + SAMPLERS_DDPM}, got {sampler!r}")
    outdir = outdir or os.path.join(workdir, "restore")
    if fresh:  # --fresh from inside the directory (--outdir=.) moves the process's directory with it
        outdir = eu.fresh_path(outdir)
    with workdir_lock.hold(outdir, arg="outdir"):
        settings = {"workdir": os.path.abspath(workdir), "step": step, "input": input, "num_images": num_images,
                    "noise_std": noise_std, "add_noise": float(add_noise), "noise_seed": noise_seed, "clean": clean,
                    "image_index": image_index, "sampler": sampler, "num_steps": num_steps,
                    "num_frames": num_frames, "seed": seed, "final_denoise": final_denoise, "baseline": baseline,
                    "compute_dtype": "model"}  # (set once the model is loaded)
        with eu.checking_arguments():
            fn = training.load_score_fn(workdir, step=step, compute_dtype=eu.model_compute_dtype(compute_dtype))
            settings["compute_dtype"] = eu.compute_dtype_setting(fn)
            tc = fn.config
            sampler = resolve_sampler(tc, sampler)
            span = noise_range(tc, sampler, np.float32)
            if noise_std is None and span is not None:
                raise ValueError(f"noise_std: required for the {sampler} sampler (a number, or auto to estimate it "
                                 "per image), unless --add_noise is given; --sampler=flow or paper_a start at t = 1 "
                                 "and need none")
            unet = fn.model_def.unet
            count = num_images or None
            read_notes: list[str] = []
            source = eu.load_for_model(input, "input", unet.image_size, count, unet.in_channels, read_notes)
            ref = source if add_noise else (None if not clean else eu.load_for_model(
                clean, "clean", unet.image_size, count, unet.in_channels, read_notes))
            if ref is not None and ref.shape[0] != source.shape[0]:
                raise ValueError(f"clean: {ref.shape[0]} images for the {source.shape[0]} inputs")
            noisy = eu.noisy_copy(source, float(add_noise), noise_seed) if add_noise else source
            estimated = estimate_noise(noisy)
            files, sizes, shown = _files(input, "input", noisy.shape[0], count, unet.in_channels, read_notes,
                                         unet.image_size)
            names = _names(files)
            clean_files = ([None] * noisy.shape[0] if add_noise or not clean else
                           _files(clean, "clean", noisy.shape[0], count, unet.in_channels, read_notes)[0])
            odd = _mispaired(files, clean_files)
            if odd:
                read_notes.append("clean: paired with the inputs by their order, and the names suggest another "
                                  "pairing: " + ", ".join(odd))
            # flow and paper_a start at t = 1 whatever the level: a given level serves the baseline
            # only; with none it served nothing, and the table said it was used (a walkthrough, 2026-12-07)
            level_unused = span is None and baseline == "none"
            if level_unused and noise_std is not None:
                if noise_arg == "noise_std":
                    read_notes.append(f"--noise_std is not used: the {sampler} sampler starts at t = 1 whatever the "
                                      "noise level, and --baseline=none")
                noise_std = None
            if (noise_std == "auto" or (noise_std is None and baseline != "none")) and not np.all(estimated > 0):
                k = int(np.argmin(estimated))
                raise ValueError(f"noise_std: 'auto' found no noise in {names[k]} (estimate {estimated[k]:.3g}); "
                                 "give --noise_std" if noise_std else
                                 f"noise_std: no noise found in {names[k]} (estimate {estimated[k]:.3g}) for the "
                                 "baseline; give --noise_std")
            std, notes = noise_levels(noise_std, estimated, span, names, noise_arg)
            notes = read_notes + notes
            for note in notes:
                logging.warning("%s", note)
            std_run = std.astype(noisy.dtype)  # as the samplers get it
            num_frames = frames_shown(tc, sampler, std_run, num_steps, num_frames, noisy.dtype)
            idx = _image_indices(image_index, unet.per_image_offset, unet.num_images, noisy.shape[0])
            num_trained = trained_images(workdir)
            # the pixels denoised, so that a changed input file is not taken for a finished run
            settings["input_sha256"] = hashlib.sha256(np.ascontiguousarray(noisy).tobytes()).hexdigest()
            check_interrupt()
            try:
                if not fresh:  # (--fresh moves whatever is there aside, once the flags are found good)
                    eu.check_claim(outdir, "restore", settings, legacy=LEGACY_SETTINGS, arg="outdir", fresh_flag=True)
            except eu.WorkdirConflictError as err:
                if "differs at: input_sha256)" in str(err):  # (it showed the two hashes, cut; a walkthrough)
                    raise eu.WorkdirConflictError(
                        f"outdir: {outdir!r} holds this restore run of other pixels: the --input images changed "
                        "since it ran (all flags are the same); use another --outdir, or --fresh to move it to "
                        f"{os.path.abspath(outdir) + '.prev'!r} first (nothing there was changed)") from err
                if baseline == "none" or "differs at: baseline)" not in str(err):
                    raise
                raise eu.WorkdirConflictError(
                    f"outdir: {outdir!r} holds a run of restore from before --baseline (it has none); pass "
                    "--baseline=none to use it, or another --outdir (nothing there was changed)") from err
            if os.path.exists(os.path.join(outdir, "restore.json")) and not (overwrite or fresh):
                done_step = eu.finished_step(os.path.join(outdir, "restore.json"))
                newer = (f", from step {done_step} of the model (its checkpoint now is step {fn.step})"
                         if done_step is not None and done_step != int(fn.step) else "")
                raise eu.WorkdirConflictError(
                    f"outdir: {outdir!r} already holds these results{newer}; pass --overwrite to redo them, "
                    "--fresh to move them aside, or use another --outdir")

        few_images_note = None
        if num_trained is not None and num_trained < FEW_IMAGES:
            them = "it" if num_trained == 1 else "them"
            few_images_note = (
                f"Note: this model was trained on {num_trained} image{'s' if num_trained != 1 else ''}; it has "
                f"learnt {'that image' if num_trained == 1 else 'those images'}, not images in general: it "
                f"restores noisy copies of {them} and draws other images towards {them}"
                + ("" if baseline == "none" else "; compare its outputs with the non-local means baseline's") + ".")
            logging.warning("%s", few_images_note)

        def denoise_and_write():
            with eu.Stopwatch() as sw:
                out, frames, nfe = restore_arrays(fn, tc, noisy, std_run, jax.random.PRNGKey(seed),
                                                  idx=idx, sampler=sampler, num_steps=num_steps,
                                                  num_frames=num_frames, final_denoise=final_denoise)
                out, frames, nfe = np.asarray(out), np.asarray(frames), int(nfe)
            check_interrupt()
            base, base_seconds = None, None
            if baseline == "nl_means":
                with eu.Stopwatch() as bw:  # each image's own estimate where the level was not given
                    base = nl_means(noisy, estimated if noise_std in ("auto", None) else std)
                base_seconds = bw.seconds
                check_interrupt()
            per, rows = [], []
            refs = None if ref is None else ref.astype(out.dtype)
            outputs = {"input": np.clip(noisy, 0, 1).astype(out.dtype), "output": out}
            if base is not None:
                outputs["baseline"] = base.astype(out.dtype)
            if refs is not None:
                scores = {f"{m}_{k}": np.asarray(f(x, refs)) for m, f in (("ssim", metrics.ssim), ("psnr", metrics.psnr))
                          for k, x in outputs.items()}
            for k in range(out.shape[0]):
                rec = {"image": k, "file": names[k], "input_file": files[k], "input_size": sizes[k],
                       "clean_file": clean_files[k], "noise_std": None if noise_std is None else float(std[k]),
                       "noise_std_estimated": float(estimated[k]), "image_index": None if idx is None else int(idx[k])}
                if refs is not None:
                    rec.update({key: float(v[k]) for key, v in scores.items()})
                per.append(rec)
                rows.append([k, names[k]] + ([f"{shown[k]} ({sizes[k][0]}x{sizes[k][1]})"] if files[0] else [])
                            + ["-" if noise_std is None else f"{std[k]:.4f}", f"{estimated[k]:.4f}"]
                            + ([f"{rec[f'ssim_{o}']:.4f}" for o in outputs] + [f"{rec[f'psnr_{o}']:.2f}" for o in outputs]
                               if refs is not None else []))
            summary = None
            if refs is not None:
                summary = {key: float(np.mean(v)) for key, v in scores.items()}
                summary["ssim_output_se"] = eu.standard_error(scores["ssim_output"])
            eu.write_images(os.path.join(outdir, "denoised"), out, names)
            np.save(os.path.join(outdir, "denoised.npy"), out.astype(np.float32))
            np.save(os.path.join(outdir, "noisy.npy"), noisy.astype(np.float32))
            if base is not None:
                np.save(os.path.join(outdir, "baseline.npy"), base)
            result = {"experiment": "restore", "settings": settings, "method": tc.method, "sde": tc.sde,
                      "sampler": sampler, "model_step": int(fn.step), "compute_dtype": fn.model_def.unet.dtype,
                      "network_evals": nfe, "frames": num_frames,
                      "sampling_seconds": sw.seconds, "baseline": baseline, "baseline_seconds": base_seconds,
                      "trained_images": num_trained, "notes": notes, "images": per, "summary": summary, "shape": list(out.shape),
                      "machine": eu.machine_info()}
            n = noisy.shape[0]
            text = (f"# {n} image{'s' if n != 1 else ''} of {input} denoised by {os.path.abspath(workdir)} "
                    f"(step {fn.step}, "
                    f"method {tc.method}, sampler {sampler})\n\n{nfe} network evaluations in {fn.model_def.unet.dtype}, "
                    f"{sw.seconds:.1f} s "
                    "(compile included)" + ("" if base is None else
                                            f"; non-local means (scikit-image, the baseline) {base_seconds:.1f} s")
                    + ".\n\n")
            if few_images_note:
                text += few_images_note + "\n\n"
            text += "".join(f"Note: {n}.\n\n" for n in notes)
            if summary:
                text += (f"Against the clean images: SSIM {summary['ssim_input']:.4f} (input) -> "
                         f"{summary['ssim_output']:.4f} (output), PSNR {summary['psnr_input']:.2f} -> "
                         f"{summary['psnr_output']:.2f} dB" + ("" if base is None else
                         f"; non-local means: SSIM {summary['ssim_baseline']:.4f}, PSNR "
                         f"{summary['psnr_baseline']:.2f} dB") + "; means over the images.\n\n")
            heads = ["image", "file"] + (["input file (W x H)"] if files[0] else []) + [
                "noise std used" if span is not None else "noise std (NL-means)", "noise std estimated"]
            if refs is not None:
                label = {"input": "input", "output": "output", "baseline": "NL-means"}
                heads += [f"SSIM {label[o]}" for o in outputs] + [f"PSNR {label[o]}" for o in outputs]
            text += eu.markdown_table(heads, rows)
            eu.write_text(os.path.join(outdir, "restore.md"), text)
            grid = [[np.clip(noisy[k], 0, 1)] + [frames[i, k] for i in range(1, num_frames)] + [out[k]]
                    + ([base[k]] if base is not None else []) + ([refs[k]] if refs is not None else [])
                    for k in range(out.shape[0])]
            cols = (["input"] + [f"frame {i}" for i in range(1, num_frames)] + ["output"]
                    + (["NL-means"] if base is not None else []) + (["clean"] if refs is not None else []))
            eu.image_grid(os.path.join(outdir, "restore.png"), grid, row_labels=names, col_labels=cols,
                          title=f"{tc.method}: {sampler} sampler")
            eu.write_json(os.path.join(outdir, "restore.json"), result)  # last: marks the run finished
            return result

        # claimed with the settings; a failure while the claim is all the directory holds withdraws it
        # --fresh moves --outdir aside: never over the training run or the images read
        keep = {workdir: "the training run it restores with (--workdir)",
                **eu.sources_kept((input, "the noisy images (--input)"), (clean, "the clean images (--clean)"))}
        return eu.run_claimed(outdir, "restore", settings, denoise_and_write, legacy=LEGACY_SETTINGS, arg="outdir",
                              fresh=fresh, keep=keep)


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    eu.sigterm_as_interrupt()  # kill / timeout / schedulers: stop like Ctrl-C (it ended without a word)
    eu.quiet_orbax_logs()
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "restore")
    if FLAGS.fresh:  # (as run does: the outputs named at the end are the new run's)
        outdir = eu.fresh_path(outdir)
    kept = "restore.json, written last, marks a finished run: the same command denoises again"
    with eu.exit_on_run_errors(interrupted=kept), eu.interrupts_between_steps(kept) as check:
        with eu.checking_arguments():
            index = eu.int_list_flag("image_index", FLAGS.image_index, 0) if FLAGS.image_index else []
        run(FLAGS.workdir, FLAGS.input, outdir, noise_std=FLAGS.noise_std, add_noise=FLAGS.add_noise,
            noise_seed=FLAGS.noise_seed, clean=FLAGS.clean, num_images=FLAGS.num_images, image_index=index,
            sampler=FLAGS.sampler, num_steps=FLAGS.num_steps, num_frames=FLAGS.num_frames, seed=FLAGS.seed,
            final_denoise=FLAGS.final_denoise, step=FLAGS.step, baseline=FLAGS.baseline,
            overwrite=FLAGS.overwrite, fresh=FLAGS.fresh, check_interrupt=check,
            compute_dtype=FLAGS.compute_dtype)
    eu.print_outputs(outdir, "restore.md", RESULT_FILES)
    logging.info("done")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
