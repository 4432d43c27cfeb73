r"""Sample from a trained model with the denoising trajectory shown (Paper B Figure 3 / 8 style).

Usage::

    python -m experiments.generate --workdir=runs/demo/ours [--outdir=runs/demo/ours/generate] \
        [--num_samples=4] [--num_frames=10] [--sampler=auto] [--seed=0] [--reference=builtin:chelsea]

``--workdir`` is the directory of a training run (``experiments.train``, or the ``ours/`` /
``ddpm/`` run inside an ``experiments.denoise`` or ``experiments.budget`` work directory); its
latest checkpoint's EMA weights are loaded (:func:`krylovjax.training.load_score_fn`).

Samplers (``--sampler``):

* ours (score model): ``ode`` = the probability-flow ODE (Paper B's sampler,
  :func:`krylovjax.sampling.probability_flow`) from the prior ``N(alpha(1) 0.5, lambda(1)^2 I)`` at t = 1
  (centred on mid-grey, the centre of the data range [0, 1], carried to t = 1 by the SDE's mean
  coefficient alpha: 1 for VE and the constant g, ``exp(-B(1)/2)`` for VP; Paper B's code starts
  from N(0, I))
  down to t = 1e-3, then Tweedie's denoising step (``--final_denoise``, on by default: the
  marginal at 1e-3 still holds noise of std ``lambda(1e-3)``, and one more evaluation removes
  it; not in Paper B's sampler); ``sde`` = the reverse SDE with ``--num_steps`` Euler-Maruyama steps
  from the same prior (and the same last step); ``paper_a`` = Paper A's damped reverse SDE (50 steps
  from t = 1 to 0, noise 0.1 g sqrt(dt), clamped to [0, 1]) from a pure-noise image
  ``clamp(0.5 + 0.5 z, 0, 1)`` (our choice of start for generation: Paper A's sampler starts
  from the noisy test image). ``auto`` = ``paper_a`` for the constant-g SDE with a constant
  perturbation ``std`` (it has no prior at t = 1), else ``ode``. A model trained with per-image time
  intervals (``per_image_offset``) draws sample ``k`` for image ``k mod num_images``.
* DDPM (epsilon model): ``ancestral`` (Ho et al., ``T`` steps, predicted x0 clipped) or
  ``ddim`` (deterministic, ``--num_steps`` steps; all ``T`` when 0); ``auto`` = ``ancestral``.
  A DDPM trained with ``per_image_offset`` (``train_tiny.py``'s default) draws sample ``k`` for
  image ``k mod num_images`` as ours does.

Sample ``k`` depends on ``--seed`` and ``k`` only, not on ``--num_samples``: asking for more
samples with the same seed keeps the first ones (the ODE steps each sample on its own, and JAX's
partitionable Threefry, the default since JAX 0.5, draws row ``k``'s noise independently of the
rows after it).

``--compute_dtype``: the U-Net's compute dtype for sampling, by default the training's. A model
trained in bfloat16 (``model_overrides.dtype``) samples in float32 with ``--compute_dtype=float32``
(its weights are float32 either way, and its score is then not rounded to bfloat16's precision,
about 4e-3), and a float32 model in bfloat16, where an accelerator computes that faster. The
adaptive ``ode`` sampler's step count changes with it, either way (BUILD_NOTES).

Outputs in ``--outdir`` (default ``<workdir>/generate``): ``samples.png`` (one row per sample,
``--num_frames`` frames from the prior to the sample), ``samples.npy`` (float32 ``[M, C, H, W]``
in [0, 1]), ``samples/sample_<k>.png`` (8-bit, one per sample), ``samples.json`` and ``samples.md``
(per-sample statistics; with ``--reference`` (a :func:`krylovjax.data.load_images` source) the
SSIM of each sample to its nearest reference image, and their mean with its standard error and
how many samples are nearest each reference). The output directory is tied to its
settings; other settings are refused, a finished one is redone only with ``--overwrite``; ``--fresh``
moves whatever the directory holds to ``<outdir>.prev`` and starts afresh (after the other flags are
checked).
"""

from __future__ import annotations

import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
SAMPLERS_OURS = ("ode", "sde", "paper_a")
SAMPLERS_DDPM = ("ancestral", "ddim")
RESULT_FILES = ("samples.png", "samples.json", "samples.md", "samples.npy", "samples/")
T_END = 1e-3  # ours' ode and sde samplers stop here (Paper B's epsilon)
# Settings added after output directories were made without them (denoise.LEGACY_CONFIG).
LEGACY_SETTINGS = {"final_denoise": False, "compute_dtype": "model"}

if __name__ == "__main__":
    from krylovjax import experiment_utils as eu

    flags.DEFINE_string("workdir", None, "Training run directory (with checkpoints/).")
    flags.DEFINE_string("outdir", None, "Output directory (default: <workdir>/generate).")
    flags.DEFINE_integer("num_samples", 4, "Number of samples.")
    flags.DEFINE_integer("num_frames", 10, "Frames of each trajectory shown (2 to 64).")
    flags.DEFINE_enum("sampler", "auto", ("auto",) + SAMPLERS_OURS + SAMPLERS_DDPM, "Sampler (see module doc).")
    flags.DEFINE_integer("num_steps", 50, "Steps of the fixed-step samplers (sde, paper_a, ddim; ddim: 0 = all).")
    flags.DEFINE_integer("seed", 0, "PRNG seed of the prior and the sampler noise.")
    flags.DEFINE_bool("final_denoise", True, "Ours' ode/sde samplers: end with Tweedie's denoising step at "
                      "t = 1e-3 (one more network evaluation).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_string("reference", None, "Optional load_images source to compare samples with, "
                        "e.g. builtin:chelsea or builtin (resized to the model's size).")
    flags.DEFINE_integer("reference_count", 3, "Images of a multi-image --reference source (builtin, "
                         "cifar10, celeb_a, files:<path>, array:<path>): its first ones; 0 = all of them "
                         "(files, arrays and tfds datasets).")
    flags.DEFINE_enum("compute_dtype", "model", eu.COMPUTE_DTYPES, eu.COMPUTE_DTYPE_HELP)
    flags.DEFINE_bool("overwrite", False, "Redo a finished run with the same settings in --outdir.")
    flags.DEFINE_bool("fresh", False, "Start afresh whatever --outdir holds: move it to <outdir>.prev first (an "
                      "older <outdir>.prev is deleted if it is an earlier run of this binary, "
                      "refused if it is anything else), after the other flags are checked.")
    flags.mark_flags_as_required(["workdir"])


def check_generates(tc) -> None:
    """A DDPM trained on the first steps only (``ddpm_max_train_step`` M < T, an ablation for
    denoising) cannot generate from noise: the chain starts at step T - 1.

    Raises:
      ValueError: naming ``ddpm_max_train_step``.
    """
    m = tc.ddpm_max_train_step
    if tc.method == "ddpm" and m is not None and m < tc.ddpm_num_steps:
        raise ValueError(f"ddpm_max_train_step: this DDPM was trained on the steps 0 .. {m - 1} only, but "
                         f"generation from noise starts at step {tc.ddpm_num_steps - 1}; train it on every step "
                         "(ddpm_max_train_step None) to generate")


def constant_perturbation(tc) -> bool:
    """Whether the model's SDE has a constant perturbation std (Paper A's constant-g SDE with
    ``std`` set): no noise-level schedule, so no prior at t = 1 and no start time for a noise level."""
    return tc.sde == "constant" and dict(tc.sde_kwargs).get("std", 0.1) is not None


def with_indices(fn, tc, idx, rows: str = "M"):
    """The model ``fn`` with the image indices ``idx`` closed over (``(x, t) -> ...``), as the
    samplers call it; ``idx`` is required for a model trained with per-image time intervals."""
    if tc.per_image_offset and idx is None:
        raise ValueError(f"idx: required ([{rows}] image indices) for a model trained with per_image_offset")
    return fn if idx is None else (lambda x, t: fn(x, t, idx=idx))


def ddpm_frames(r, sched):
    """A DDPM trajectory ``r`` (states in the network's [-1, 1] range) shown on the data scale:
    each state divided by ``sqrt(abar_k)`` of its step, mapped by ``(x + 1) / 2`` and clipped to
    [0, 1], so the frames of a figure are comparable."""
    import jax.numpy as jnp

    abar = jnp.concatenate([jnp.ones((1,), sched.alpha_bars.dtype), sched.alpha_bars])
    scale = jnp.sqrt(abar[r.times]).astype(r.trajectory.dtype)[:, :, None, None, None]
    return jnp.clip((r.trajectory / scale + 1.0) / 2.0, 0.0, 1.0)


def resolve_sampler(tc, sampler: str) -> str:
    """The concrete sampler for a model of ``tc`` (``auto`` resolved), or ValueError."""
    check_generates(tc)
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
    return sampler


def ssim_to_each(samples, refs):
    """Windowed SSIM of every sample ``[M, C, H, W]`` to every reference ``[R, C, H, W]``
    (references cast to the samples' dtype): numpy ``[M, R]``."""
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import metrics

    x = jnp.asarray(samples)
    refs = np.asarray(refs)
    return np.stack([np.asarray(metrics.ssim(x, jnp.asarray(np.broadcast_to(refs[j], x.shape), x.dtype)))
                     for j in range(refs.shape[0])], axis=1)


def nearest_reference(samples, refs):
    """``(nearest [M], ssim [M], counts [R])``: the reference each sample ``[M, C, H, W]`` is most
    similar to (windowed SSIM, :func:`ssim_to_each`), its SSIM to that reference, and how many
    samples have each reference ``[R, C, H, W]`` as their nearest (numpy)."""
    import numpy as np

    s_all = ssim_to_each(samples, refs)
    nearest = np.argmax(s_all, axis=1)
    return nearest, s_all.max(axis=1), np.bincount(nearest, minlength=np.shape(refs)[0])


def sample(fn, tc, shape, key, *, idx=None, sampler: str = "auto", num_steps: int = 50, num_frames: int = 10,
           final_denoise: bool = True, step_control: str = "per_image"):
    """Draw samples ``[M, C, H, W]`` in [0, 1] from a trained model, with trajectory frames.

    :func:`sample_arrays` with the number of network evaluations as a Python int.
    """
    out, frames, nfe = sample_arrays(fn, tc, shape, key, idx=idx, sampler=sampler, num_steps=num_steps,
                                     num_frames=num_frames, final_denoise=final_denoise, step_control=step_control)
    return out, frames, int(nfe)


def sample_arrays(fn, tc, shape, key, *, idx=None, sampler: str = "auto", num_steps: int = 50,
                  num_frames: int = 10, final_denoise: bool = True, step_control: str = "per_image"):
    """Draw samples ``[M, C, H, W]`` in [0, 1] from a trained model, with trajectory frames
    (traceable: under ``jax.jit`` with ``fn`` an input, one program serves every weight set).

    Args:
      fn: the model of :func:`krylovjax.training.load_score_fn` (``score_fn`` or ``eps_fn``).
      tc: its :class:`krylovjax.training.TrainConfig`.
      shape: ``(M, C, H, W)``.
      key: PRNG key.
      idx: ``[M]`` image indices (models with per-image time intervals).
      sampler, num_steps, num_frames: see the module docstring.
      final_denoise: ours' ``ode`` and ``sde`` samplers end with Tweedie's denoising step at
        ``t_end`` (:func:`krylovjax.sampling.tweedie_denoise`, one more network evaluation);
        ignored by ``paper_a`` (which ends at t = 0) and by DDPM's samplers (whose last step
        is already their clipped x0 prediction).
      step_control: ours' ``ode``: ``"per_image"`` (each sample its own adaptive steps, so that
        sample k does not depend on the number drawn; the binary's) or ``"batch"`` (one step
        size for all, :func:`krylovjax.sampling.probability_flow`'s default; the budget
        experiment's, whose recorded figures were made with it).

    Returns:
      ``(samples [M, C, H, W], frames [num_frames, M, C, H, W], network_evaluations)``, JAX
      arrays, the first two in [0, 1] (DDPM states shown rescaled by ``1 / sqrt(abar_k)``).
    """
    import jax
    import jax.numpy as jnp

    from krylovjax import ddpm, sampling

    sampler = resolve_sampler(tc, sampler)
    # a model's dtype (its parameters', the leaves of load_score_fn's Partial, also under jit: float32
    # unless trained in float64), not JAX's default float: with JAX_ENABLE_X64=1 the prior and the
    # noise were drawn in float64, other numbers, and the samples differed by up to 1.0 (a
    # walkthrough, 2026-12-07); a score function without parameters (an exact one, the tests')
    # runs in JAX's default float
    params = [a for a in jax.tree.leaves(fn) if jnp.issubdtype(getattr(a, "dtype", jnp.int32), jnp.floating)]
    dtype = jnp.promote_types(jnp.result_type(*params), jnp.float32) if params else jnp.result_type(float)
    # A model trained with per-image time intervals takes the image index, DDPM's as ours' (before
    # 2026-12-06 DDPM's samplers were handed the model without it: a DDPM of train_tiny.py, whose
    # per_image_offset is on, could not generate).
    f = with_indices(fn, tc, idx)
    if tc.method == "ddpm":
        sched = tc.ddpm_schedule(dtype=dtype)
        k_prior, k_run = jax.random.split(key)
        x_T = jax.random.normal(k_prior, shape, dtype)
        if sampler == "ancestral":
            r = ddpm.ddpm_ancestral_sample(f, x_T, k_run, schedule=sched, clip_x0=(-1.0, 1.0),
                                           return_trajectory=True, num_frames=num_frames)
        else:
            steps = int(num_steps) if num_steps else sched.num_steps
            r = ddpm.ddim_sample(f, x_T, schedule=sched, num_steps=min(steps, sched.num_steps),
                                 clip_x0=(-1.0, 1.0), return_trajectory=True, num_frames=num_frames)
        return jnp.clip((r.x + 1.0) / 2.0, 0.0, 1.0), ddpm_frames(r, sched), r.num_score_evals

    sde = tc.make_sde()
    if sampler == "paper_a":
        k_prior, k_run = jax.random.split(key)
        x_T = jnp.clip(0.5 + 0.5 * jax.random.normal(k_prior, shape, dtype), 0.0, 1.0)
        r = sampling.euler_maruyama(f, sde, x_T, k_run, t_start=1.0, t_end=0.0, num_steps=int(num_steps),
                                    noise_scale=0.1, clip=(0.0, 1.0), return_trajectory=True,
                                    num_frames=num_frames)
    else:
        # Prior N(alpha(1) 0.5, lambda(1)^2 I): the forward marginal at t = 1 is alpha(1) x0 +
        # lambda(1) z (alpha = 1 without drift; VP's exp(-B(1)/2)), centred on the data's mean
        # carried forward; mid-grey is the centre of [0, 1] (sampling.generate centres at 0, which
        # matters when lambda(1) is not large against the data range, e.g. the demo's
        # lambda(1) = 0.5). Before 2026-12-06 the centre was 0.5 for every SDE, off by 0.5 for VP.
        k_prior, k_run = jax.random.split(key)
        t1 = jnp.asarray([1.0], dtype)
        lam1 = sde.perturbation_std(t1)[0]
        alpha_fn = sampling._mean_coeff_fn(sde)  # None: zero drift, alpha = 1
        centre = 0.5 if alpha_fn is None else 0.5 * alpha_fn(t1)[0].astype(dtype)
        x_T = centre + lam1 * jax.random.normal(k_prior, shape, dtype)
        if sampler == "ode":
            # per_image: every sample its own adaptive steps (the network called on single rows, the
            # image indices passed with them), so that sample k is the same whatever num_samples is;
            # the noise draws already are (JAX's partitionable Threefry: row k's numbers do not
            # depend on the rows after it)
            rows = step_control == "per_image"
            r = sampling.probability_flow(fn if rows else f, sde, x_T, t_start=1.0, t_end=T_END,
                                          return_trajectory=True, num_frames=num_frames, step_control=step_control,
                                          score_args=() if idx is None or not rows else (jnp.asarray(idx),))
        else:
            r = sampling.euler_maruyama(f, sde, x_T, k_run, t_start=1.0, t_end=T_END, num_steps=int(num_steps),
                                        return_trajectory=True, num_frames=num_frames)
        r = sampling.with_final_denoise(r, f, sde, T_END, bool(final_denoise))
    return jnp.clip(r.x, 0.0, 1.0), jnp.clip(r.trajectory, 0.0, 1.0), r.num_score_evals


def run(workdir: str, outdir: str | None = None, *, num_samples: int = 4, num_frames: int = 10,
        sampler: str = "auto", num_steps: int = 50, seed: int = 0, step: int | None = None,
        reference: str | None = None, reference_count: int = 3, overwrite: bool = False, fresh: bool = False,
        final_denoise: bool = True, compute_dtype: str | None = None, check_interrupt=None) -> dict:
    """Sample from the training run in ``workdir``; write the grid, table and JSON to ``outdir``.
    ``compute_dtype`` (:func:`krylovjax.training.load_score_fn`): the U-Net's compute dtype,
    None or ``"model"`` for the training's (recorded as ``"model"``, as is the training's own
    dtype asked by name).
    ``check_interrupt`` (the binary's :func:`krylovjax.experiment_utils.interrupts_between_steps`)
    is called before the output directory is claimed and between the sampling and the writing."""
    check_interrupt = check_interrupt or (lambda: None)
    from krylovjax import experiment_utils as eu
    from krylovjax import training, workdir_lock

    with eu.checking_arguments():  # a bad flag ends the binary with its message alone
        for name, v, lo in (("num_samples", num_samples, 1), ("num_frames", num_frames, 2), ("num_steps", num_steps, 0),
                            ("reference_count", reference_count, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        eu.check_frames(num_frames, "samples.png")
        eu.check_seed(seed)
        eu.check_training_run(workdir)
        if sampler not in ("auto",) + SAMPLERS_OURS + SAMPLERS_DDPM:
            raise ValueError(f"sampler: expected auto or one of {SAMPLERS_OURS + SAMPLERS_DDPM}, got {sampler!r}")
        if not isinstance(final_denoise, bool):
            raise TypeError(f"final_denoise: expected a bool, got {final_denoise!r}")
    outdir = outdir or os.path.join(workdir, "generate")
    if fresh:  # --fresh from inside the directory (--outdir=.) moves the process's directory with it
        outdir = eu.fresh_path(outdir)
    # One run at a time in outdir (a second generate there is refused at once, naming this one).
    with workdir_lock.hold(outdir, arg="outdir"):
        # The settings as asked: an output directory of other settings is refused at once, and it is
        # claimed once the model, sampler and reference are found good (a bad flag leaves no claim
        # behind that would refuse the corrected command).
        settings = {"workdir": os.path.abspath(workdir), "step": step, "num_samples": num_samples,
                    "num_frames": num_frames, "sampler": sampler, "num_steps": num_steps, "seed": seed,
                    "reference": reference, "reference_count": reference_count, "final_denoise": final_denoise,
                    "compute_dtype": "model"}  # (set once the model is loaded)
        with eu.checking_arguments():
            # The model first (as restore does): a --step with no checkpoint is said to be so, not
            # refused as other settings than the output directory's (a walkthrough).
            fn = training.load_score_fn(workdir, step=step, compute_dtype=eu.model_compute_dtype(compute_dtype))
            settings["compute_dtype"] = eu.compute_dtype_setting(fn)
            if not fresh:  # (--fresh moves whatever is there aside, once the flags are found good)
                eu.check_claim(outdir, "generate", settings, legacy=LEGACY_SETTINGS, arg="outdir", fresh_flag=True)
            if os.path.exists(os.path.join(outdir, "samples.json")) and not (overwrite or fresh):
                done_step, newer = eu.finished_step(os.path.join(outdir, "samples.json")), ""
                now = int(fn.step)  # samples of an older checkpoint are said to be so
                if done_step is not None and now != done_step:
                    newer = f", from step {done_step} of the model (its checkpoint now is step {now})"
                raise eu.WorkdirConflictError(
                    f"outdir: {outdir!r} already holds these samples{newer}; pass --overwrite to redo them, "
                    "--fresh to move them aside, or use another --outdir")
            tc = fn.config
            sampler = resolve_sampler(tc, sampler)
            if sampler in ("sde", "paper_a") and num_steps < 1:
                raise ValueError(f"num_steps: the {sampler!r} sampler needs >= 1 steps, got {num_steps}")
            chain = chain_steps(tc, sampler, num_steps)
            if chain is not None and num_frames > chain + 1:
                raise ValueError(f"num_frames: the {sampler} chain has {chain} steps, so at most {chain + 1} frames, "
                                 f"got {num_frames}")
            unet = fn.model_def.unet
            shape = (num_samples, unet.in_channels, unet.image_size, unet.image_size)
            settings_asked, settings = settings, dict(settings, step=int(fn.step), sampler=sampler)  # as resolved
            ref, notes, ref_names = None, [], None
            if sampler == "ddim" and num_steps > tc.ddpm_num_steps:  # (it was cut without a word)
                notes.append(f"num_steps: {num_steps} asked; DDIM takes at most the model's {tc.ddpm_num_steps} "
                             f"steps, and ran {tc.ddpm_num_steps}")
            if reference:  # loaded before sampling: a bad source fails at once, not after the chain
                if reference_count == 0 and reference == "builtin":
                    raise ValueError("reference_count: 0 (all) is for files, arrays and tfds datasets; "
                                     "the built-in set has no fixed size: give a count")
                count = None if reference.startswith("builtin:") else (reference_count or None)
                ref = eu.load_for_model(reference, "reference", unet.image_size, count, unet.in_channels, notes)
                if reference.startswith("files:"):
                    from krylovjax.data import image_paths

                    paths = image_paths(reference[6:])
                    ref_names = eu.short_paths(paths)[:ref.shape[0]]
                    if len(paths) > ref.shape[0]:
                        notes.append(f"reference: compared with the first {ref.shape[0]} of the {len(paths)} files "
                                     "(--reference_count=0 for all)")
            for note in notes:
                logging.warning("%s", note)
        check_interrupt()

        def sample_and_write():
            return _sample_and_write(fn, tc, workdir, outdir, settings, shape, sampler, num_samples, num_frames,
                                     num_steps, seed, final_denoise, ref, ref_names, notes, check_interrupt)

        # claimed with the settings asked; a failure while the claim is all the directory holds withdraws it
        # --fresh moves --outdir aside: never over the training run or the reference images
        keep = {workdir: "the training run it samples from (--workdir)",
                **eu.sources_kept((reference, "the reference images (--reference)"))}
        return eu.run_claimed(outdir, "generate", settings_asked, sample_and_write, legacy=LEGACY_SETTINGS,
                              arg="outdir", fresh=fresh, keep=keep)


def chain_steps(tc, sampler: str, num_steps: int) -> int | None:
    """The steps of the sampler's fixed-length chain (its frames are at most these plus one), or
    None for the adaptive ODE."""
    if tc.method == "ddpm":
        total = tc.ddpm_num_steps
        return total if sampler == "ancestral" else min(int(num_steps) if num_steps else total, total)
    return int(num_steps) if sampler in ("sde", "paper_a") else None


def _sample_and_write(fn, tc, workdir, outdir, settings, shape, sampler, num_samples, num_frames, num_steps, seed,
                      final_denoise, ref, ref_names, notes, check_interrupt):
    """:func:`run`'s work once the output directory is claimed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import experiment_utils as eu

    unet = fn.model_def.unet
    idx = None
    if unet.per_image_offset:
        idx = jnp.arange(num_samples, dtype=jnp.int32) % unet.num_images
    with eu.Stopwatch() as sw:
        out, frames, nfe = sample(fn, tc, shape, jax.random.PRNGKey(seed), idx=idx, sampler=sampler,
                                  num_steps=num_steps, num_frames=num_frames, final_denoise=final_denoise)
        out, frames = np.asarray(out), np.asarray(frames)
    check_interrupt()
    if ref is not None:
        ref = ref.astype(out.dtype)
    rows = []
    per = []
    summary = None
    if ref is not None:
        nearest, best, counts = nearest_reference(out, ref)
        summary = {"ssim_to_nearest_mean": float(best.mean()), "ssim_to_nearest_se": eu.standard_error(best),
                   "samples_per_reference": counts.tolist(), "references_covered": int((counts > 0).sum())}
    for k in range(num_samples):
        rec = {"sample": k, "image_index": None if idx is None else int(idx[k]), "mean": float(out[k].mean()),
               "std": float(out[k].std()), "min": float(out[k].min()), "max": float(out[k].max())}
        if ref is not None:
            rec.update(nearest_reference=int(nearest[k]), ssim_to_nearest=float(best[k]),
                       nearest_reference_file=None if ref_names is None else ref_names[int(nearest[k])])
        per.append(rec)
        shown = rec.get("nearest_reference") if ref_names is None or ref is None else (
            f"{rec['nearest_reference']} ({rec['nearest_reference_file']})")
        rows.append([k, rec["image_index"], f"{rec['mean']:.3f}", f"{rec['std']:.3f}",
                     shown, None if ref is None else f"{rec['ssim_to_nearest']:.4f}"])
    result = {"experiment": "generate", "settings": settings, "method": tc.method, "sde": tc.sde,
              "model_step": int(fn.step), "compute_dtype": unet.dtype, "network_evals": nfe,
              "sampling_seconds": sw.seconds, "samples": per,
              "summary": summary, "references": ref_names, "notes": notes, "shape": list(out.shape),
              "machine": eu.machine_info()}
    text = (f"# Samples of {os.path.abspath(workdir)} (step {fn.step}, method {tc.method}, sampler {sampler})\n\n"
            f"{nfe} network evaluations in {unet.dtype}, {sw.seconds:.1f} s (compile included).\n\n")
    if summary:
        se = summary["ssim_to_nearest_se"]
        text += (f"SSIM to the nearest reference, mean over the {num_samples} samples: "
                 f"{summary['ssim_to_nearest_mean']:.4f}" + ("" if se is None else f" (s.e. {se:.4f})")
                 + f"; {summary['references_covered']} of {ref.shape[0]} references are some sample's nearest; "
                 f"samples nearest each reference: {', '.join(str(c) for c in summary['samples_per_reference'])}.\n\n")
    text += "".join(f"Note: {n}.\n\n" for n in notes)
    text += eu.markdown_table(["sample", "image index", "mean", "std", "nearest reference", "SSIM to nearest"], rows)
    eu.write_text(os.path.join(outdir, "samples.md"), text)
    np.save(os.path.join(outdir, "samples.npy"), out.astype(np.float32))
    eu.write_images(os.path.join(outdir, "samples"), out, [f"sample_{k:03d}.png" for k in range(num_samples)])
    eu.image_grid(os.path.join(outdir, "samples.png"), [frames[:, k] for k in range(num_samples)],
                  row_labels=[f"sample {k}" for k in range(num_samples)],
                  col_labels=[f"frame {i}" for i in range(num_frames)],
                  title=f"{tc.method}: {sampler} sampler, frame 0 = prior, last = sample")
    # Last: samples.json marks the outputs finished (a run killed while writing the table or the
    # figure redoes them instead of standing as finished without them).
    eu.write_json(os.path.join(outdir, "samples.json"), result)
    return result


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    eu.sigterm_as_interrupt()  # kill / timeout / schedulers: stop like Ctrl-C (it ended without a word)
    eu.quiet_orbax_logs()
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "generate")
    if FLAGS.fresh:  # (as run does: the outputs named at the end are the new run's)
        outdir = eu.fresh_path(outdir)
    kept = "samples.json, written last, marks a finished run: the same command samples again"
    with eu.exit_on_run_errors(interrupted=kept), eu.interrupts_between_steps(kept) as check:
        run(FLAGS.workdir, outdir, num_samples=FLAGS.num_samples, num_frames=FLAGS.num_frames,
            sampler=FLAGS.sampler, num_steps=FLAGS.num_steps, seed=FLAGS.seed, step=FLAGS.step,
            reference=FLAGS.reference, reference_count=FLAGS.reference_count, overwrite=FLAGS.overwrite,
            fresh=FLAGS.fresh,
            final_denoise=FLAGS.final_denoise, check_interrupt=check,
            compute_dtype=FLAGS.compute_dtype)
    eu.print_outputs(outdir, "samples.md", RESULT_FILES)
    logging.info("done")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
