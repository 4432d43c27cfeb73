r"""Single-image denoising: time to a target SSIM, ours vs DDPM (Paper A Table 1, method.md 7.1).

Usage::

    python -m experiments.denoise --config=experiments/configs/denoise_demo.py --workdir=runs/demo \
        [--config.targets='(0.95, 0.99)'] [--overwrite | --fresh]

For one clean image ``x`` (``config.data``) and its noisy version ``clamp(x + std z, 0, 1)``
(``config.noise``; Paper A: std 0.506, fixed seed):

* **ours**: pre-compute the image's log-density and scores with the cross-matrix Krylov solver
  (:func:`krylovjax.precompute.precompute_scores`, timed), embed them along the probability flow
  (:func:`krylovjax.transport.embed`), and train the U-Net with the score-embedding loss
  (:func:`krylovjax.training.train`, method.md 4.2). Every ``eval_every`` updates the EMA model
  denoises the noisy image (``config.ours.sampler.kind``: ``flow``, the demo's, Paper B's
  probability-flow ODE from the noisy image; ``paper_a``, Paper A's damped reverse SDE; or
  ``denoise``, :func:`krylovjax.sampling.denoise` from the time matching the noise level) and the
  SSIM to the clean image is computed.
* **DDPM**: the same U-Net trained with epsilon prediction on the clean image, evaluated by
  :func:`krylovjax.ddpm.ddpm_denoise` from the same noisy image (mapped to [-1, 1], noise level
  ``2 std``), with the same cadence and target. ``ddpm.sampler.method`` is the sampler of the
  ``ddpm`` row (ancestral by default); each entry of ``ddpm.sampler.extra_methods`` (default
  ``("ddim",)``) is a further row of the same trained network denoised with that sampler at the
  same evaluations (Paper B's DDIM row: the deterministic sampler, the counterpart of ours'
  probability flow). DDPM trains until every one of its samplers has reached the target
  (``target_metric = "min_ssim"``); each row's time to target is read from its own records.

Training stops at the largest target in ``config.targets`` or at the method's step / time cap.

Timing convention (the table's "time to target"): training time as measured by
:func:`krylovjax.training.train` (the sum of the optimiser steps' wall times: JIT compile,
evaluation and checkpoint time excluded, reported separately), at the first evaluation whose
metric reaches the target; for ours plus the wall time of the pre-computation and of the
embedding. JIT compilation is excluded for every stage alike: the solver's programs are compiled
first (:func:`krylovjax.precompute.precompile`), the embedding is compiled ahead of time, and
:func:`~krylovjax.training.train` reports its compile time apart; all compile times are in the
table. Resolution: one evaluation interval.

Outputs in ``--workdir``: ``results.md`` (table), ``results.json``, ``trajectory.png`` (the
denoising trajectory, ``num_frames`` frames, one row per method and sampler: Figure 2),
``denoised.png`` (clean / noisy / ours / DDPM / DDIM), ``ssim_curve.png`` (metric vs time), and
the two training runs in ``ours/`` and ``ddpm/`` (checkpoints, ``metrics.jsonl`` with the DDIM
row's metrics as ``ddim_ssim`` etc.; ``experiments.generate`` can sample from them). A work
directory is tied to its config (``experiment.json``): another config is refused before anything
is written; a finished run of the same config is redone only with ``--overwrite``; an
interrupted one keeps the result of a method that had finished (``<method>/denoise_result.json``)
and resumes the other from its checkpoints. ``--fresh`` moves an existing work directory to
``<workdir>.prev`` first (``make demo``). One run at a time: a second run in a work directory that
a run holds is refused at once, naming that run (:mod:`krylovjax.workdir_lock`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Denoise config (experiments/configs/denoise_*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (results, figures, the two training runs).")
    flags.DEFINE_bool("overwrite", False, "Redo the run of the same config in --workdir from the start: its "
                      "results and training runs (finished or not) are deleted first. Another config is always "
                      "refused; without the flag an unfinished run resumes.")
    flags.DEFINE_bool("fresh", False, "Start afresh: move an existing --workdir to <workdir>.prev first (an older "
                      "<workdir>.prev is deleted if it is an earlier run of this binary, "
                      "refused if it is anything else), whatever its config; refused while another run holds either.")
    flags.mark_flags_as_required(["config", "workdir"])

METHODS = ("ours", "ddpm")
METRICS = ("ssim", "global_ssim", "ssim_uniform")
# What every evaluation records (with each sampler row's prefix).
EVAL_KEYS = ("ssim", "global_ssim", "ssim_uniform", "psnr")
OUR_SAMPLERS = ("paper_a", "flow", "denoise")
DDPM_SAMPLERS = ("ancestral", "ddim")
DDPM_VARIANCES = ("large", "small")  # krylovjax.ddpm.ddpm_ancestral_sample
EMBED_COMPONENTS = ("sum", "x", "y")  # krylovjax.transport.embed
# Where DDPM's chain starts on a noisy input: "matched" (the step of its noise level), "top"
# (the whole chain from x_T = 2 noisy - 1: Paper B's literal conditional start, the same array as
# ours') or "prior_mix" (the whole chain from Paper B's recipe in DDPM's own space,
# x_T = w (2 clean - 1) + (1 - w) z with w = noise.signal_scale and the input's own draw z).
DDPM_STARTS = ("matched", "top", "prior_mix")
WHOLE_CHAIN_STARTS = ("top", "prior_mix")
# How a denoised output is brought into [0, 1] before it is scored: clipped, or min-max
# normalised per sample (Paper B's code).
NORMALISE = ("clip", "minmax")
# The table row of a DDPM sampler in ``ddpm.sampler.extra_methods`` (the same trained network).
EXTRA_ROW = {"ddim": "ddim", "ancestral": "ddpm_ancestral"}
LABELS = {"ours": "ours", "ddpm": "DDPM", "ddim": "DDIM", "ddpm_ancestral": "DDPM (ancestral)"}
RESULT_FILES = ("results.md", "results.json", "trajectory.png", "denoised.png", "ssim_curve.png")
_DONE_JSON, _DONE_NPZ = "denoise_result.json", "denoise_output.npz"  # per method, in <workdir>/<method>/
# Config keys added after run directories were made without them, each with the value that
# reproduces those runs (eu.claim_workdir's ``legacy``): such a directory resumes or re-runs under
# the current code when the config holds that value. Directories from before 2026-11-27, when the
# batch size moved from ``common`` into each method's ``train``, stay another config.
LEGACY_CONFIG = {
    "common.model_overrides.dtype": "float32",  # the compute dtype's key (thirty-ninth session)
    "common.steps_per_call": 1,  # one update per call
    "ours.train.scale_by_sigma": False,
    "ours.embed": True,
    "ours.embed_variant": "paper_b",
    "ours.embed_noise_scale": 0.1,
    "ddpm.train.ddpm_max_train_step": None,
    "ddpm.sampler.extra_methods": (),
    "noise.signal_scale": 1.0,
    "ddpm.sampler.start": "matched",
    "normalise": "clip",
    "noise.draws": 1,
    "data.kwargs.data_dir": "",  # the tfds configs' data directory (tfds's default)
    # the pre-computation's formulation, settable since 2026-12-07 (PrecomputeConfig's defaults)
    "ours.precompute.initial": "paper_b_kde",
    "ours.precompute.h": 1.0,
    "ours.precompute.outer": "sweeps",
}
# Config keys a run directory's later runs may change: where the tfds data lie is no part of the
# run (the dataset, split and indices name its images; a review, 2026-12-07, found a moved
# dataset refused).
MAY_CHANGE = ("data.kwargs.data_dir",)
# What to lower when XLA runs out of memory (eu.exit_on_run_errors).
OUT_OF_MEMORY = ("lower the batch sizes (--config.ours.train.batch_size, --config.ddpm.train.batch_size) or the "
                 "model's width (--config.common.model_overrides.ch), with --fresh or a new --workdir (they are part "
                 "of the run)")


def _prefix(row: str, own: str) -> str:
    """The prefix of a table row's keys where rows share one record: none for ``own`` (the
    training run's own row in its eval records, DDPM's row in the comparison), ``<row>_`` for
    the others (``ddim_ssim``, ``ddim_speedup``)."""
    return "" if row == own else row + "_"


def _done_paths(sub: str, method: str, row: str) -> tuple[str, str]:
    """The files of a finished table row in its training run's directory ``sub``: the method's
    own row in ``denoise_result.json`` / ``denoise_output.npz``, a further sampler's row (DDIM)
    in ``denoise_result_<row>.json`` / ``denoise_output_<row>.npz`` (written before the own
    row's, so the own row's files mark the method as finished)."""
    if row == method:
        return os.path.join(sub, _DONE_JSON), os.path.join(sub, _DONE_NPZ)
    stem_j, stem_z = (os.path.splitext(f)[0] for f in (_DONE_JSON, _DONE_NPZ))
    return os.path.join(sub, f"{stem_j}_{row}.json"), os.path.join(sub, f"{stem_z}_{row}.npz")


# ----------------------------------------------------------------------------------------------
# Config checks (before anything is written)
# ----------------------------------------------------------------------------------------------


def _dict(c) -> dict:
    if c is None:
        return {}
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def check_config(cfg) -> None:
    """Validate the parts of a denoise / budget config the library does not check itself.

    Raises:
      ValueError: naming the key and what was expected.
    """
    from krylovjax import experiment_utils as eu

    targets = cfg.targets if isinstance(cfg.targets, (list, tuple)) else (cfg.targets,)
    if not targets:
        raise ValueError("targets: expected at least one SSIM target in (0, 1]")
    for i, t in enumerate(targets):
        eu.check_target(t, f"targets[{i}]")
    if len(set(float(t) for t in targets)) != len(targets):
        raise ValueError(f"targets: expected distinct SSIM targets, got {tuple(targets)!r}")
    if cfg.metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {cfg.metric!r}")
    noise = (("std", "noise level", cfg.noise.std), ("signal_scale", "factor", cfg.noise.get("signal_scale", 1.0)))
    for key, what, v in noise:
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"noise.{key}: expected a finite {what} > 0, got {v!r}")
    seed = cfg.noise.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"noise.seed: expected an int >= 0 (the noise draw's seed), got {seed!r}")
    draws = cfg.noise.get("draws", 1)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"noise.draws: expected an int >= 1 (noisy copies of each image), got {draws!r}")
    if normalise(cfg) not in NORMALISE:
        raise ValueError(f"normalise: expected one of {NORMALISE}, got {normalise(cfg)!r}")
    methods = tuple(cfg.methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected distinct entries of {METHODS}, got {methods!r}")
    embeds(cfg)
    embed_variant(cfg)
    if cfg.ours.get("embed_component", "sum") not in EMBED_COMPONENTS:
        raise ValueError(f"ours.embed_component: expected one of {EMBED_COMPONENTS}, "
                         f"got {cfg.ours.get('embed_component')!r}")
    check_ours_sampler_fields(cfg.ours.sampler)
    nf = cfg.num_frames
    if isinstance(nf, bool) or not isinstance(nf, int) or nf < 2:
        raise ValueError(f"num_frames: expected an int >= 2, got {nf!r}")
    eu.check_frames(nf, "trajectory.png")
    eu.check_seed(cfg.eval_seed, "eval_seed")  # the samplers' key (PRNGKey keeps 32 bits without x64)
    for m in ("ours", "ddpm"):
        b = cfg[m].train.get("budget_seconds")
        if b is not None:
            eu.check_positive_seconds(b, f"{m}.train.budget_seconds")
    sc = cfg.ddpm.sampler
    if sc.method not in DDPM_SAMPLERS:
        raise ValueError(f"ddpm.sampler.method: expected one of {DDPM_SAMPLERS}, got {sc.method!r}")
    if sc.get("variance", "large") not in DDPM_VARIANCES:
        raise ValueError(f"ddpm.sampler.variance: expected one of {DDPM_VARIANCES}, got {sc.get('variance')!r}")
    if not isinstance(sc.get("clip_x0", True), bool):
        raise ValueError(f"ddpm.sampler.clip_x0: expected a bool, got {sc.get('clip_x0')!r}")
    if ddpm_start(cfg) not in DDPM_STARTS:
        raise ValueError(f"ddpm.sampler.start: expected one of {DDPM_STARTS}, got {ddpm_start(cfg)!r}")
    if ddpm_start(cfg) == "prior_mix" and not signal_scale(cfg) < 1.0:
        raise ValueError("noise.signal_scale: ddpm.sampler.start = 'prior_mix' mixes that share of the clean image "
                         f"with 1 - it of DDPM's prior draw, so expected a value in (0, 1), got {signal_scale(cfg)!r}")
    extra = sc.get("extra_methods", ())
    extra = tuple(extra) if isinstance(extra, (list, tuple)) else extra
    if not isinstance(extra, tuple) or any(e not in DDPM_SAMPLERS for e in extra) or len(set(extra)) != len(extra):
        raise ValueError(f"ddpm.sampler.extra_methods: expected distinct entries of {DDPM_SAMPLERS}, got {extra!r}")
    if "ddpm" in methods and cfg.ddpm.train.get("per_image_offset", False) is not False:
        # Its samplers here take no image index (the model would refuse every evaluation after
        # training; before 2026-12-06 that was the first sign).
        raise ValueError("ddpm.train.per_image_offset: the experiments' DDPM has no image identity (its samplers "
                         f"take no image index), so expected False, got {cfg.ddpm.train.get('per_image_offset')!r}")


def check_ours_sampler_fields(sc) -> None:
    """``ours.sampler``: its kind, times, step count, tolerances and noise scale."""
    if sc.kind not in OUR_SAMPLERS:
        raise ValueError(f"ours.sampler.kind: expected one of {OUR_SAMPLERS}, got {sc.kind!r}")
    if sc.get("method", "ode") not in ("ode", "sde"):
        raise ValueError(f"ours.sampler.method: expected 'ode' or 'sde', got {sc.get('method')!r}")
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    t0, t1 = sc.get("t_start", 1.0), sc.get("t_end", 1e-3)
    if not (real(t0) and real(t1) and 0 <= t1 < t0):
        raise ValueError(f"ours.sampler.t_start, t_end: expected times with 0 <= t_end < t_start, got {t0!r}, {t1!r}")
    n = sc.get("num_steps", 50)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ours.sampler.num_steps: expected an int >= 1, got {n!r}")
    for key in ("rtol", "atol"):
        v = sc.get(key, 1e-3)
        if not (real(v) and v > 0):
            raise ValueError(f"ours.sampler.{key}: expected a finite tolerance > 0, got {v!r}")
    v = sc.get("noise_scale", 0.1)
    if not (real(v) and v >= 0):
        raise ValueError(f"ours.sampler.noise_scale: expected a finite value >= 0, got {v!r}")


def ddpm_rows(cfg) -> dict:
    """The table rows of the DDPM network: ``{"ddpm": ddpm.sampler.method}`` plus one row per
    entry of ``ddpm.sampler.extra_methods`` (``"ddim"`` for DDIM: Paper B's DDIM row, the same
    trained network denoised with the deterministic sampler); an entry equal to
    ``ddpm.sampler.method`` is that row already and adds none (so ``--config.ddpm.sampler.method=ddim``
    alone gives one DDIM row)."""
    method = cfg.ddpm.sampler.method
    extra = tuple(cfg.ddpm.sampler.get("extra_methods", ()))
    return {"ddpm": method, **{EXTRA_ROW[e]: e for e in extra if e != method}}


def train_config(cfg, method: str):
    """The :class:`krylovjax.training.TrainConfig` of ``method``: ``common`` + ``<method>.train``."""
    from krylovjax import training

    d = _dict(cfg.common)
    d.update(_dict(cfg[method].train))
    d["method"] = method
    metric = cfg.get("metric", "ssim")
    if method == "ddpm" and len(ddpm_rows(cfg)) > 1:
        metric = "min_" + metric  # stop when every DDPM sampler has reached the target (make_eval_fn)
    d.setdefault("target_metric", metric)
    try:
        return training.TrainConfig.from_dict(d)
    except ValueError as err:
        raise ValueError(f"{method}.train / common: {err}") from err


def check_ddpm_range(cfg, tc) -> None:
    """A DDPM trained on the steps below ``ddpm_max_train_step`` only must cover the denoising
    chain, which calls the network at the steps ``i*, ..., 0`` (:func:`krylovjax.ddpm.denoise_start_step`
    of the noise level ``2 std / signal_scale``; with ``ddpm.sampler.start`` "top" or "prior_mix"
    every step).

    With the matched start the noise level must also lie within the schedule's range (checked for
    every DDPM, before anything is trained).

    Raises:
      ValueError: naming ``ddpm.train.ddpm_max_train_step`` and the smallest value that covers it,
      or ``noise.std`` and the largest level ``ddpm.train.ddpm_num_steps`` steps reach.
    """
    import numpy as np

    from krylovjax import ddpm

    m = tc.ddpm_max_train_step
    if ddpm_start(cfg) not in WHOLE_CHAIN_STARTS:
        sched = tc.ddpm_schedule()
        top = float(np.sqrt(np.asarray(sched.noise_to_signal)[-1]))  # DDPM's space is 2 x - 1: twice the std
        if 2.0 * matched_std(cfg) > top:
            raise ValueError(
                f"noise.std: the matched start needs DDPM's noise level 2 * {matched_std(cfg):.6g}, "
                f"beyond the largest its schedule of ddpm.train.ddpm_num_steps = {int(tc.ddpm_num_steps)} steps reaches "
                f"({top:.6g}); lower noise.std or use more steps")
    if m is None:
        return
    if ddpm_start(cfg) in WHOLE_CHAIN_STARTS:
        if m < int(tc.ddpm_num_steps):
            raise ValueError(
                f"ddpm.train.ddpm_max_train_step: ddpm.sampler.start = {ddpm_start(cfg)!r} runs the whole chain, so the network "
                f"must be trained on every step: expected None or {int(tc.ddpm_num_steps)}, got {m}")
        return
    start = int(np.max(ddpm.denoise_start_step(2.0 * matched_std(cfg), schedule=tc.ddpm_schedule())))
    if m <= start:
        raise ValueError(
            f"ddpm.train.ddpm_max_train_step: the denoising chain for noise.std = {cfg.noise.std} starts at step "
            f"{start}, so the network must be trained up to it: expected an integer >= {start + 1}, got {m}")


def check_ours_sampler_with_sde(cfg, tc) -> None:
    """``ours.sampler`` against ours' SDE, before anything is computed: the sampler runs first at
    the first evaluation, after the pre-computation and the training up to it (the whole budget in
    ``experiments.budget``), which is where these failed before 2026-12-06.

    * ``kind = "denoise"`` starts at the time ``t*`` whose noise level ``lambda(t*) / alpha(t*)``
      matches ``noise.std / noise.signal_scale`` (:func:`krylovjax.sampling.start_time` on
      ``[ours.sampler.t_end, 1]``, as :func:`krylovjax.sampling.denoise` takes it): there must be
      one (not for the demo's SDE, lambda(1) = 0.5, with its noise std 0.506; nor for Paper A's
      constant perturbation, which matches no level). Other kinds start at ``t_start``.
    * The probability flow (``kind = "flow"``, or ``"denoise"`` with ``method = "ode"``)
      evaluates the score at ``t_end``; with ``ours.train.scale_by_sigma`` the score is the
      network over ``lambda(t_end)``, infinite at ``t_end = 0`` where ``lambda(0) = 0`` (every
      SDE but the constant perturbation). The fixed-step samplers stop short of ``t_end``.

    Raises:
      ValueError: naming ``noise.std`` or ``ours.sampler.t_end``.
    """
    import jax.numpy as jnp

    from krylovjax import sampling

    sc = cfg.ours.sampler
    t_end = float(sc.get("t_end", 1e-3))
    sde = tc.make_sde()
    flow = sc.kind == "flow" or (sc.kind == "denoise" and sc.get("method", "ode") == "ode")
    if flow and tc.scale_by_sigma and t_end == 0.0 and float(sde.perturbation_std(jnp.zeros(1))[0]) == 0.0:
        raise ValueError(
            f"ours.sampler.t_end: the probability flow of ours.sampler.kind = {sc.kind!r} evaluates the score at "
            "t_end, and with ours.train.scale_by_sigma the score is the network over lambda(t_end), which is 0 at "
            f"t_end = 0 for ours.train.sde = {tc.sde!r}: expected t_end > 0 (Paper B's 1e-3)")
    if sc.kind != "denoise":
        return
    level = matched_std(cfg)
    try:
        sampling.start_time(sde, level, t_min=t_end, t_max=1.0)
    except ValueError as err:
        raise ValueError(
            f"noise.std: ours.sampler.kind = 'denoise' starts where the noise level of ours.train.sde = {tc.sde!r} "
            f"{dict(tc.sde_kwargs)} matches noise.std / noise.signal_scale = {level:.6g}, and there is no such time: "
            f"{err}. Lower noise.std, change the SDE, or use ours.sampler.kind = 'flow' or 'paper_a'") from None


def precompute_config(cfg, tc):
    """The :class:`krylovjax.precompute.PrecomputeConfig` of ours (its SDE is the training's)."""
    from krylovjax.precompute import PrecomputeConfig

    d = _dict(cfg.ours.precompute)
    for k in ("sde", "sde_kwargs"):
        if k in d:
            raise ValueError(f"ours.precompute.{k}: the SDE is set by ours.train.{k}")
    try:
        return PrecomputeConfig(sde=tc.sde, sde_kwargs=tuple(sorted(dict(tc.sde_kwargs).items())), **d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"ours.precompute: {err}") from err


def batch_mesh(batch_size: int):
    """The data-parallel mesh of a one-image run: the first ``gcd(batch_size, device count)``
    devices, so any batch runs on any machine (the demo trains ours with batch 1 and DDPM with
    batch 2; :func:`krylovjax.training.train` needs a batch divisible by the mesh size). One
    process only, as this binary runs."""
    import jax

    from krylovjax import training

    return training.make_mesh(jax.devices()[:math.gcd(int(batch_size), jax.device_count())])


def check_fits(tcs: dict, images, num_images: int) -> None:
    """Raise ValueError (naming ``data``) if the images do not fit the configured U-Net."""
    from krylovjax import training

    for tc in tcs.values():
        training.model_config(tc, tuple(images.shape[1:]), num_images)


def _load_kwargs(data_cfg) -> dict:
    """``config.data``'s keyword arguments of ``load_images``: ``kwargs`` with ``size``;
    ``kwargs.num_images = 0`` is all the images of a ``files:``/``array:``/tfds source (as
    ``experiments.precompute``'s ``num_images``)."""
    kw = _dict(data_cfg.get("kwargs"))
    if data_cfg.get("size") is not None:
        kw.setdefault("size", data_cfg.size)
    if kw.get("num_images") == 0 and not str(data_cfg.source).startswith("builtin"):
        kw["num_images"] = None
    return kw


def load_clean(data_cfg):
    """The clean images of ``config.data``: ``load_images(source, size=..., **kwargs)``, then
    ``index`` (an int, a list of ints, or None for all). Returns numpy ``[B, C, H, W]``.

    A source that cannot be read or a bad value is refused naming the config key it comes from
    (``data.source``, ``data.size`` or ``data.kwargs.<name>``)."""
    import re

    import numpy as np

    from krylovjax.data import load_images

    kw = _load_kwargs(data_cfg)
    try:
        images = load_images(data_cfg.source, **kw)
    except (ValueError, FileNotFoundError) as err:
        msg = str(err)
        m = re.match(r"\w+", msg)
        name = m.group(0) if m else ""
        given = _dict(data_cfg.get("kwargs"))
        key = (f"data.kwargs.{name}" if name in given else
               "data.size" if name == "size" else f"data.source {data_cfg.source!r}")
        raise type(err)(f"{key}: {msg}") from err
    from krylovjax import experiment_utils as eu

    eu.warn_fewer_images(kw.get("num_images"), images.shape[0], "data.kwargs.num_images", data_cfg.source)
    idx = data_cfg.get("index")
    if idx is None:
        return images
    sel = [idx] if isinstance(idx, int) else list(idx)
    for i in sel:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < images.shape[0]:
            raise ValueError(f"data.index: expected indices in [0, {images.shape[0]}) of the loaded "
                             f"images, got {idx!r}")
    return np.ascontiguousarray(images[sel])


def check_scored_size(images) -> None:
    """ValueError naming ``data.size`` for images smaller than the SSIM's window, which every
    evaluation of denoise and budget computes (it failed after the claim, with a traceback;
    budget first pre-computed and trained ours for the whole budget)."""
    from krylovjax.metrics import SSIM_FILTER_SIZE

    if min(images.shape[-2:]) < SSIM_FILTER_SIZE:
        raise ValueError(f"data.size: expected images of at least {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} pixels (the "
                         f"SSIM's window), got {images.shape[-2]}x{images.shape[-1]}")


def clean_files(data_cfg) -> list[str] | None:
    """For a ``files:`` source, the absolute path of each image :func:`load_clean` returns, in its
    order (the results name them); None for the other sources."""
    from krylovjax.data import selected_paths

    src = data_cfg.source
    if not (isinstance(src, str) and src.startswith("files:")):
        return None
    kw = _load_kwargs(data_cfg)
    paths = selected_paths(src.split(":", 1)[1], kw.get("indices"), kw.get("num_images"))
    idx = data_cfg.get("index")
    if idx is not None:
        paths = [paths[i] for i in ([idx] if isinstance(idx, int) else idx)]
    return [os.path.abspath(p) for p in paths]


def images_kept(cfg) -> dict[str, str]:
    """``--fresh`` (:func:`krylovjax.experiment_utils.move_aside`) never moves or deletes the
    photos of a ``files:`` / ``array:`` source that lie in the work directory."""
    from krylovjax import experiment_utils as eu

    return eu.sources_kept((cfg.data.source, "the images it reads (--config.data.source)"))


def claim_record(cfg, clean):
    """The config a work directory is claimed with (:func:`run`, ``experiments.budget.run``):
    ``cfg``, plus ``data.images_sha256``, the sha256 of the loaded images, when they come from
    your own files (``files:`` / ``array:`` sources). Their config names a path, not its content,
    so a run over changed files is another run: it is refused in the directory of the old one
    instead of resuming (or reporting) the old images' results."""
    import copy
    import hashlib

    import numpy as np

    src = cfg.data.source
    if not (isinstance(src, str) and src.startswith(("files:", "array:"))):
        return cfg
    rec = copy.deepcopy(cfg)
    arr = np.ascontiguousarray(clean, np.float32)
    digest = hashlib.sha256(f"{list(arr.shape)}|".encode() + arr.tobytes()).hexdigest()
    with rec.unlocked():
        rec.data.images_sha256 = digest
    return rec


# ----------------------------------------------------------------------------------------------
# Ours: pre-computation and embedding
# ----------------------------------------------------------------------------------------------


def embeds(cfg) -> bool:
    """``ours.embed`` (default True). False is the ablation without pre-computed scores: ours
    trains on the clean image at every time level (``alpha(t) x0`` for an SDE with a drift, the
    forward marginal's mean; no pre-computation, no embedding), i.e. denoising score matching
    with ours' SDE, time sampling, loss and sampler."""
    v = cfg.ours.get("embed", True)
    if not isinstance(v, bool):
        raise ValueError(f"ours.embed: expected a bool, got {v!r}")
    return v


def embed_variant(cfg) -> tuple[str, float]:
    """``(ours.embed_variant, ours.embed_noise_scale)``, defaults ``("paper_b", 0.1)``.

    ``"paper_b"``: Paper B's embedding, every level ``x^n = x^{n-1} - g^2/2 s^n dt`` (method.md
    4.1). ``"paper_a"``: Paper A's script's, each level from the previous one plus
    ``noise_scale * g sqrt(dt) xi`` and clamped to [0, 1] (:func:`krylovjax.transport.embed`), on
    the same N levels (K = N - 1 embedded images), so the trajectories keep their time levels.
    """
    from krylovjax import transport

    variant = cfg.ours.get("embed_variant", "paper_b")
    if variant not in transport.EMBED_VARIANTS:
        raise ValueError(f"ours.embed_variant: expected one of {transport.EMBED_VARIANTS}, got {variant!r}")
    ns = cfg.ours.get("embed_noise_scale", 0.1)
    if isinstance(ns, bool) or not isinstance(ns, (int, float)) or not (math.isfinite(ns) and ns >= 0):
        raise ValueError(f"ours.embed_noise_scale: expected a finite number >= 0, got {ns!r}")
    return variant, float(ns)


def prepare_ours(cfg, tc, images) -> tuple[Any, dict]:
    """Pre-compute the scores of ``images`` ``[B, C, H, W]`` and embed them (method.md 3.4, 4.1);
    with ``ours.embed = False`` (:func:`embeds`) the clean images at every level instead.

    Returns:
      ``(Trajectories, info)`` with ``info`` the wall times of the pre-computation and the
      embedding (run time: both are compiled first, ``compile_seconds``) and the solver
      statistics.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import experiment_utils as eu
    from krylovjax import training, transport
    from krylovjax.precompute import precompile, precompute_scores

    pc = precompute_config(cfg, tc)
    sde_record = {"name": tc.sde, "kwargs": dict(tc.sde_kwargs)}
    if not embeds(cfg):
        # The ablation without pre-computed scores: the clean image at every time level, carried
        # there by the SDE's mean coefficient (alpha(t) x0, the forward marginal's mean: x0 itself
        # without drift; VP's exp(-B(t)/2) x0, which the image alone missed before 2026-12-06).
        from krylovjax import sampling
        from krylovjax import sde as sde_lib

        t, _ = sde_lib.time_grid(pc.num_steps, pc.eps, paper_b=pc.paper_b_time_grid)
        emb = np.repeat(np.asarray(images)[:, None], pc.num_steps, axis=1)
        alpha_fn = sampling._mean_coeff_fn(pc.make_sde())  # None: zero drift, alpha = 1
        if alpha_fn is not None:
            emb = emb * np.asarray(alpha_fn(jnp.asarray(t)), emb.dtype)[None, :, None, None, None]
        info = {"precompute_seconds": 0.0, "embed_seconds": 0.0, "compile_seconds": 0.0, "solver_stats": {},
                "precompute_config": None, "num_levels": int(emb.shape[1])}
        return training.Trajectories(x=emb, t=np.asarray(t), sde=sde_record), info
    x = jnp.asarray(images)
    sde = pc.make_sde()
    with eu.Stopwatch() as sw_compile:  # compile the solver's programs first: timed apart
        with eu.interrupts_after():  # the solver's compile (an interrupt inside it: a crash at exit)
            precompile(x.shape, x.dtype, pc)
    from krylovjax import initial

    # Paper A's density (ours.precompute.initial = "paper_a_kde") draws its pixel samples from the
    # training seed's own stream
    pkey = jax.random.fold_in(jax.random.key(int(tc.seed)), 0x4B444521) if initial.needs_key(pc.initial) else None
    with eu.Stopwatch() as sw_pre:
        res = precompute_scores(x, pc, key=pkey)
        jax.block_until_ready(res.scores)
    variant, noise_scale = embed_variant(cfg)
    ekey = jax.random.fold_in(jax.random.key(int(tc.seed)), 0x454D4244)  # Paper A's noise only
    embed = jax.jit(lambda im, s, t: transport.embed(
        im, s, sde, t, res.dt, component=cfg.ours.embed_component, variant=variant, key=ekey,
        num_embed=int(s.shape[2]) - 1, noise_scale=noise_scale))
    with eu.Stopwatch() as sw_ecompile:
        embed = embed.lower(x, res.scores, res.t).compile()
    with eu.Stopwatch() as sw_emb:
        emb = np.asarray(jax.block_until_ready(embed(x, res.scores, res.t)))
    stats = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in res.stats.items()}
    info = {"precompute_seconds": sw_pre.seconds, "embed_seconds": sw_emb.seconds,
            "compile_seconds": sw_compile.seconds + sw_ecompile.seconds + float(stats.get("compile_seconds", 0.0)),
            "solver_stats": stats, "precompute_config": pc.to_dict(), "num_levels": int(emb.shape[1])}
    return training.Trajectories(x=emb, t=np.asarray(res.t), sde=sde_record), info


# ----------------------------------------------------------------------------------------------
# Denoisers (model function -> denoised images in [0, 1], and the trajectory for the figure)
# ----------------------------------------------------------------------------------------------


def _with_idx(fn, idx):
    if idx is None:
        return fn
    return lambda x, t: fn(x, t, idx=idx)


def signal_scale(cfg) -> float:
    """``noise.signal_scale``: the clean image's factor in the noisy input (1 unless set)."""
    return float(cfg.noise.get("signal_scale", 1.0))


def matched_std(cfg) -> float:
    """The noise level of the matched form ``noisy / signal_scale = clean + (std / signal_scale) z``."""
    return float(cfg.noise.std) / signal_scale(cfg)


def ddpm_start(cfg) -> str:
    """``ddpm.sampler.start`` ("matched" unless set; :data:`DDPM_STARTS`)."""
    return str(cfg.ddpm.sampler.get("start", "matched"))


def noise_draws(cfg) -> int:
    """``noise.draws``: how many noisy copies of each image are scored (1 unless set; the budget
    binary's; draw ``d`` uses the noise seed :func:`noise_seed` ``(cfg, d)``)."""
    return int(cfg.noise.get("draws", 1))


def noise_seed(cfg, draw: int = 0) -> int:
    """The noise seed of draw ``draw``: ``noise.seed + draw``."""
    return int(cfg.noise.seed) + int(draw)


def normalise(cfg) -> str:
    """``normalise`` ("clip" unless set; :data:`NORMALISE`)."""
    return str(cfg.get("normalise", "clip"))


def noisy_input(cfg, clean, *, draw: int = 0):
    """The test input of ``cfg.noise``: ``clamp(signal_scale clean + std z, 0, 1)`` (without the
    clamp if ``noise.clamp`` is False), :func:`krylovjax.experiment_utils.noisy_copy`, with the
    noise seed ``noise.seed + draw``."""
    from krylovjax import experiment_utils as eu

    return eu.noisy_copy(clean, cfg.noise.std, noise_seed(cfg, draw), clamp=cfg.noise.clamp, scale=signal_scale(cfg))


def ddpm_input(cfg, clean, noisy, *, draw: int = 0):
    """The array DDPM's sampler is given (:func:`ddpm_denoiser`'s ``noisy``): the test input
    ``noisy`` itself, except with ``ddpm.sampler.start = "prior_mix"``: then ``(x_T + 1) / 2`` with
    ``x_T = w (2 clean - 1) + (1 - w) z`` in the network's [-1, 1] range, ``w = noise.signal_scale``
    and ``z`` the draw of ``noisy`` itself (:func:`krylovjax.experiment_utils.standard_noise` of
    :func:`noise_seed` ``(cfg, draw)``, the seed of :func:`noisy_input`'s ``draw``). That is Paper
    B's conditional recipe, ``w clean + (1 - w) * (a prior sample)``, with DDPM's own prior
    N(0, I), where ``noisy`` is the recipe with ours' prior N(0, sigma^2)."""
    import numpy as np

    from krylovjax import experiment_utils as eu

    if ddpm_start(cfg) != "prior_mix":
        return noisy
    c = np.asarray(clean)
    w = signal_scale(cfg)
    x_top = w * (2.0 * c.astype(np.float64) - 1.0) + (1.0 - w) * eu.standard_noise(c.shape, noise_seed(cfg, draw))
    return ((x_top + 1.0) / 2.0).astype(np.asarray(noisy).dtype)


def to_unit(x, mode: str = "clip"):
    """``x [B, C, H, W]`` into [0, 1]: ``"clip"``, or ``"minmax"``, each sample's
    ``(x - min) / (max - min)`` over all its channels and pixels (Paper B's scoring; a constant
    sample maps to 0)."""
    import jax.numpy as jnp

    if mode == "clip":
        return jnp.clip(x, 0.0, 1.0)
    if mode != "minmax":
        raise ValueError(f"normalise: expected one of {NORMALISE}, got {mode!r}")
    lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
    span = jnp.max(x, axis=(1, 2, 3), keepdims=True) - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def _compiled_once(sample: Callable) -> Callable:
    """``run(fn, return_trajectory=False) -> (out, frames, num_score_evals)`` of a denoiser's
    ``sample(fn, return_trajectory) -> (out, frames, num_score_evals array)``.

    A model from :mod:`krylovjax.training` (a :class:`jax.tree_util.Partial` holding its weights:
    ``eval_fn``'s ``fn``, :func:`~krylovjax.training.load_score_fn`) goes through one jitted
    ``sample`` with the weights as an input, so the sampler is compiled once per
    ``return_trajectory`` and reused at every evaluation of a training run. (With the weights
    closed over, every evaluation compiled the sampler again: seconds each, and the compiled
    programs' memory maps piled up until LLVM failed with "Cannot allocate memory" in long
    runs.) Any other callable (an exact score in the tests) runs eagerly. ``run.jitted`` is the
    jitted ``sample``.
    """
    import jax

    jitted = jax.jit(sample, static_argnums=1)

    def run(fn, return_trajectory=False):
        call = jitted if isinstance(fn, jax.tree_util.Partial) else sample
        out, frames, nfe = call(fn, bool(return_trajectory))
        return out, frames, int(nfe)

    run.jitted = jitted
    return run


def ours_denoiser(cfg, tc, noisy, *, idx=None) -> Callable:
    """``denoise(score_fn, return_trajectory=False) -> (x [B, C, H, W] in [0, 1], frames or None,
    num_score_evals)`` for ours, with the sampler of ``config.ours.sampler``.

    ``"paper_a"``: :func:`krylovjax.sampling.euler_maruyama` from the noisy image at ``t_start``
    to ``t_end`` with ``num_steps`` steps, noise multiplied by ``noise_scale`` and clamping to
    [0, 1] after each step (Paper A's sampler: 1 -> 0, 50 steps, 0.1). ``"flow"``:
    :func:`krylovjax.sampling.probability_flow` (adaptive Dormand-Prince, ``rtol``/``atol``, Paper
    B's sampler) from the noisy image at ``t_start`` down to ``t_end``. ``"denoise"``:
    :func:`krylovjax.sampling.denoise` of the matched form ``noisy / noise.signal_scale`` from the
    time whose noise level is ``noise.std / noise.signal_scale`` (``method`` "ode" = Paper B's
    probability flow, Dormand-Prince with ``rtol``/``atol``, or "sde" with ``num_steps``,
    ``noise_scale``, ``clip``). The output is brought into [0, 1] by ``normalise`` (clipped or
    min-max normalised per sample), the frames are clipped. ``idx [B]`` are image indices for a
    model trained with per-image time offsets.
    """
    import jax
    import jax.numpy as jnp

    from krylovjax import sampling

    sde = tc.make_sde()
    sc = cfg.ours.sampler
    x0 = jnp.asarray(noisy)
    if sc.kind == "denoise":  # the matched form (exact for signal_scale 1)
        x0 = x0 / signal_scale(cfg)
    mode = normalise(cfg)
    key = jax.random.PRNGKey(int(cfg.eval_seed))
    clip = (0.0, 1.0) if sc.clip else None

    def sample(fn, return_trajectory):
        f = _with_idx(fn, idx)
        if sc.kind == "paper_a":
            r = sampling.euler_maruyama(f, sde, x0, key, t_start=float(sc.t_start), t_end=float(sc.t_end),
                                        num_steps=int(sc.num_steps), noise_scale=float(sc.noise_scale),
                                        clip=clip, return_trajectory=return_trajectory,
                                        num_frames=int(cfg.num_frames))
        elif sc.kind == "flow":
            r = sampling.probability_flow(f, sde, x0, t_start=float(sc.t_start), t_end=float(sc.t_end),
                                          rtol=float(sc.rtol), atol=float(sc.atol),
                                          return_trajectory=return_trajectory, num_frames=int(cfg.num_frames))
        else:
            if sc.method == "sde":
                kw = {"num_steps": int(sc.num_steps), "noise_scale": float(sc.noise_scale), "clip": clip}
            else:
                kw = {"rtol": float(sc.get("rtol", 1e-3)), "atol": float(sc.get("atol", 1e-3))}
            r = sampling.denoise(f, sde, x0, noise_std=matched_std(cfg), method=sc.method, key=key,
                                 t_end=float(sc.t_end), return_trajectory=return_trajectory,
                                 num_frames=int(cfg.num_frames), **kw)
        out = to_unit(r.x, mode)
        frames = None if r.trajectory is None else jnp.clip(r.trajectory, 0.0, 1.0)
        return out, frames, r.num_score_evals

    return _compiled_once(sample)


def ddpm_denoiser(cfg, tc, noisy, method: str | None = None) -> Callable:
    """The same interface for DDPM. ``ddpm.sampler.start = "matched"``:
    :func:`krylovjax.ddpm.ddpm_denoise` of ``2 noisy / signal_scale - 1`` with noise level
    ``2 std / signal_scale`` (the network's [-1, 1] range), from the matching step. ``"top"`` and
    ``"prior_mix"``: the whole chain (:func:`krylovjax.ddpm.ddpm_ancestral_sample`, or DDIM
    through all ``T`` steps) from ``x_T = 2 noisy - 1``, Paper B's literal conditional start (give
    ``noisy`` = :func:`ddpm_input`, which for "prior_mix" is Paper B's recipe at DDPM's own prior
    scale). The output is mapped back
    with ``(x + 1) / 2`` and brought into [0, 1] by ``normalise``; the frames with
    ``(x / sqrt(abar_k) + 1) / 2``, clipped (the state rescaled to the data scale at its step
    ``k``, so the rows of the figure are comparable). ``method``: ``"ancestral"`` or ``"ddim"``
    (default ``ddpm.sampler.method``)."""
    import jax
    import jax.numpy as jnp

    from experiments import generate
    from krylovjax import ddpm

    sched = tc.ddpm_schedule(dtype=jnp.asarray(noisy).dtype)
    sc = cfg.ddpm.sampler
    top = ddpm_start(cfg) in WHOLE_CHAIN_STARTS
    x0 = 2.0 * jnp.asarray(noisy) / (1.0 if top else signal_scale(cfg)) - 1.0
    key = jax.random.PRNGKey(int(cfg.eval_seed))
    clip = (-1.0, 1.0) if sc.clip_x0 else None
    mode, meth = normalise(cfg), method or sc.method

    def sample(fn, return_trajectory):
        kw = {"clip_x0": clip, "return_trajectory": return_trajectory, "num_frames": int(cfg.num_frames)}
        if not top:
            r = ddpm.ddpm_denoise(fn, x0, 2.0 * matched_std(cfg), key, schedule=sched, method=meth,
                                  variance=sc.variance, **kw)
        elif meth == "ancestral":
            r = ddpm.ddpm_ancestral_sample(fn, x0, key, schedule=sched, variance=sc.variance, **kw)
        else:
            r = ddpm.ddim_sample(fn, x0, schedule=sched, num_steps=sched.num_steps, **kw)
        out = to_unit((r.x + 1.0) / 2.0, mode)
        frames = None if r.trajectory is None else generate.ddpm_frames(r, sched)
        return out, frames, r.num_score_evals

    return _compiled_once(sample)


def image_metrics(out, clean, *, in_range: bool = True) -> dict:
    """Mean windowed SSIM, global SSIM, PSNR and MSE of ``out`` vs ``clean`` (``[B, C, H, W]``),
    the SSIM with scikit-image's default 7x7 uniform window (``ssim_uniform``, Paper B's code's),
    plus the per-image SSIM list. ``in_range=False`` scores an ``out`` outside [0, 1] as it is
    (the noisy input without clamping); otherwise such values are refused by the metrics."""
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import metrics

    a, b = jnp.asarray(out), jnp.asarray(clean, jnp.asarray(out).dtype)
    s = np.asarray(metrics.ssim(a, b, check_range=in_range), np.float64)
    return {"ssim": float(s.mean()),
            "global_ssim": float(np.mean(metrics.global_ssim(a, b, check_range=in_range))),
            "ssim_uniform": float(np.mean(metrics.ssim(a, b, check_range=in_range, window="uniform"))),
            "psnr": float(np.mean(metrics.psnr(a, b, check_range=in_range))),
            "mse": float(np.mean(metrics.mse(a, b))),
            "ssim_per_image": s.tolist()}


def make_eval_fn(denoiser: Callable, clean, name: str, last: dict | None = None, *,
                 others: dict | None = None) -> Callable:
    """The ``eval_fn(fn, step) -> dict`` for :func:`krylovjax.training.train`.

    Each evaluation denoises with the trajectory kept; if ``last`` is a dict, it receives the
    latest evaluation's ``step``, ``out`` ``[B, C, H, W]``, ``frames`` ``[F, B, C, H, W]``,
    ``network_evals`` and metrics (``train`` evaluates at the final step, so this is the final
    model's result; no checkpoint reload or second sampler compile is needed).

    ``others`` ``{row: (denoiser, last)}`` are further samplers of the same network (DDPM's
    DDIM row), evaluated at the same steps: their metrics are returned as ``<row>_ssim``,
    ``<row>_global_ssim``, ``<row>_ssim_uniform``, ``<row>_psnr``, with ``min_ssim`` /
    ``min_global_ssim`` / ``min_ssim_uniform`` the minimum
    over all samplers (the stop criterion: every sampler has reached the target).
    """
    import numpy as np

    rows = {name: (denoiser, last), **(others or {})}

    def eval_fn(fn, step):
        res = {}
        for row, (den, lst) in rows.items():
            out, frames, nfe = den(fn, return_trajectory=True)
            m = image_metrics(out, clean)
            logging.info("[%s] step %d: SSIM %.4f  global SSIM %.4f  PSNR %.2f dB (%d network evaluations)",
                         row, step, m["ssim"], m["global_ssim"], m["psnr"], nfe)
            if lst is not None:
                lst.update(step=int(step), out=np.asarray(out), frames=np.asarray(frames), network_evals=nfe,
                           metrics=m)
            pre = _prefix(row, name)
            res.update({pre + k: m[k] for k in EVAL_KEYS})
        if others:
            for k in METRICS:
                res["min_" + k] = min(res[k], *(res[f"{r}_{k}"] for r in others))
        return res

    return eval_fn


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def _speedup(ours: dict | None, ddpm: dict | None, label: str = "DDPM") -> tuple[float | None, str]:
    """Speed-up baseline time / ours time at a target, with a note on censored runs."""
    o, d = ours, ddpm
    if o["seconds"] is not None and d["seconds"] is not None:
        return d["seconds"] / o["seconds"], ""
    if o["seconds"] is not None:
        return None, f">= {d['cap_seconds'] / o['seconds']:.3g}x ({label} did not reach it within its cap)"
    if d["seconds"] is not None:
        return None, f"<= {d['seconds'] / o['cap_seconds']:.3g}x (ours did not reach it within its cap)"
    return None, "neither method reached the target"


def _target_rows(records: list, targets, key: str, offset: float, cap_seconds: float, cap_step: int) -> list:
    from krylovjax import experiment_utils as eu

    out = []
    for tgt in targets:
        hit = eu.first_reaching(records, key, tgt)
        out.append({"target": float(tgt), "reached": hit is not None,
                    "step": None if hit is None else int(hit["step"]),
                    "train_seconds": None if hit is None else float(hit["train_seconds"]),
                    "seconds": None if hit is None else float(hit["train_seconds"]) + offset,
                    "cap_seconds": cap_seconds + offset, "cap_step": cap_step})
    return out


def run(cfg, workdir: str, *, overwrite: bool = False, fresh: bool = False) -> dict:
    """Run the experiment of ``cfg`` in ``workdir``; returns the results dict (also written)."""
    from krylovjax import experiment_utils as eu

    if fresh:  # --fresh from inside the run (--workdir=.) moves the process's directory with it
        workdir = eu.fresh_path(workdir)
    with eu.checking_arguments():  # a bad value ends the binary with its message alone
        check_config(cfg)
        methods = tuple(cfg.methods)
        targets = sorted(float(t) for t in (cfg.targets if isinstance(cfg.targets, (list, tuple)) else (cfg.targets,)))
        tcs = {m: train_config(cfg, m) for m in methods}
        if "ours" in tcs:
            precompute_config(cfg, tcs["ours"])
            check_ours_sampler_with_sde(cfg, tcs["ours"])
        if "ddpm" in tcs:
            check_ddpm_range(cfg, tcs["ddpm"])
        clean = load_clean(cfg.data)
        check_scored_size(clean)
        if clean.shape[0] != 1:
            raise ValueError(f"data.index: the denoise experiment takes one image, got {clean.shape[0]}")
        if noise_draws(cfg) != 1:
            raise ValueError(f"noise.draws: the denoise experiment times one noisy copy to its target, so expected 1, "
                             f"got {noise_draws(cfg)} (experiments.budget scores several draws)")
        check_fits(tcs, clean, 1)
        for m, tc in tcs.items():
            if tc.eval_every < 1:
                raise ValueError(f"common.eval_every: the targets are checked at the evaluations, so expected an int "
                                 f">= 1 ({m}), got {tc.eval_every}")

    # The work directory: refuse another run's config before writing anything (a failure while the
    # fresh claim is all the directory holds withdraws it).
    return eu.run_claimed(workdir, "denoise", claim_record(cfg, clean),
                          lambda: _run_claimed(cfg, workdir, overwrite, targets, tcs, clean),
                          legacy=LEGACY_CONFIG, fresh=fresh, may_change=MAY_CHANGE, keep=images_kept(cfg))


def _run_claimed(cfg, workdir: str, overwrite: bool, targets: list, tcs: dict, clean) -> dict:
    """:func:`run` in its claimed work directory."""
    import numpy as np

    from krylovjax import experiment_utils as eu
    from krylovjax import training

    methods = tuple(tcs)
    done = os.path.exists(os.path.join(workdir, "results.json"))
    if done and not overwrite:
        raise eu.WorkdirConflictError(
            f"workdir: {workdir!r} already holds the finished results of this config; pass --overwrite "
            "to redo them or use another --workdir (nothing was changed)")
    if overwrite:
        for m in METHODS:
            shutil.rmtree(os.path.join(workdir, m), ignore_errors=True)
        for f in RESULT_FILES:
            p = os.path.join(workdir, f)
            if os.path.exists(p):
                os.remove(p)

    noisy = noisy_input(cfg, clean)
    base = image_metrics(noisy, clean, in_range=False)
    logging.info("noisy input: SSIM %.4f, PSNR %.2f dB (std %.3f, seed %d)", base["ssim"], base["psnr"],
                 cfg.noise.std, cfg.noise.seed)
    wall = eu.Stopwatch()
    wall.__enter__()
    results: dict[str, Any] = {}
    denoisers: dict = {}
    outs: dict = {}
    frames: dict = {}
    for m in methods:
        tc = tcs[m]
        sub = os.path.join(workdir, m)
        # The table rows of this training run: ours, or DDPM with each of its samplers.
        rows = ddpm_rows(cfg) if m == "ddpm" else {m: None}
        done = {r: _done_paths(sub, m, r) for r in rows}
        if all(os.path.exists(j) and os.path.exists(z) for j, z in done.values()):
            # This method finished in an interrupted earlier run of this config: keep its result
            # (training it again from its final checkpoint would change it).
            for r, (done_json, done_npz) in done.items():
                with open(done_json) as f:
                    results[r] = json.load(f)
                with np.load(done_npz) as z:
                    outs[r], frames[r] = z["out"], z["frames"]
            logging.info("[%s] finished earlier in this workdir: result kept (%s)", m, done[m][0])
            continue
        prep: dict = {"precompute_seconds": 0.0, "embed_seconds": 0.0, "compile_seconds": 0.0}
        if m == "ours":
            data, prep = prepare_ours(cfg, tc, clean)
            logging.info("[ours] pre-computation %.2f s, embedding %.2f s (compile %.2f s apart): %s",
                         prep["precompute_seconds"], prep["embed_seconds"], prep["compile_seconds"],
                         {k: v for k, v in prep["solver_stats"].items() if np.ndim(v) == 0})
            # A model trained with per-image time intervals takes the image index: 0, the one image
            # (before 2026-12-06 it was not given, and the first evaluation failed).
            denoisers[m] = ours_denoiser(cfg, tc, noisy, idx=np.zeros(1, np.int32) if tc.per_image_offset else None)
        else:
            data = clean
            given = ddpm_input(cfg, clean, noisy)
            for r, method in rows.items():
                denoisers[r] = ddpm_denoiser(cfg, tc, given, method)
        lasts: dict = {r: {} for r in rows}
        others = {r: (denoisers[r], lasts[r]) for r in rows if r != m}
        eval_fn = make_eval_fn(denoisers[m], clean, m, lasts[m], others=others)
        res = training.train(tc, data, sub, eval_fn=eval_fn, target=targets[-1], mesh=batch_mesh(tc.batch_size))
        if lasts[m].get("step") != res.step:  # cannot happen with train()'s final evaluation; be safe
            fn = training.load_score_fn(sub)
            eval_fn(fn, res.step)
        offset = prep["precompute_seconds"] + prep["embed_seconds"]
        evals = eu.read_metrics(sub, "eval")
        for r, method in rows.items():
            pre = _prefix(r, m)
            row_evals = [{k: e.get(pre + k) for k in EVAL_KEYS}
                         | {"step": e.get("step"), "train_seconds": e.get("train_seconds")} for e in evals]
            outs[r], frames[r] = lasts[r]["out"], lasts[r]["frames"]
            results[r] = {
                "train_config": tc.to_dict(), "training_run": m,
                "sampler": method if method is not None else cfg.ours.sampler.kind,
                "stop_reason": res.stop_reason, "steps": res.step, "train_seconds": res.train_seconds,
                "compile_seconds": res.compile_seconds + prep["compile_seconds"],
                "train_compile_seconds": res.compile_seconds, "eval_seconds": res.eval_seconds,
                "checkpoint_seconds": res.checkpoint_seconds, "train_wall_seconds": res.wall_seconds,
                "precompute_seconds": prep["precompute_seconds"], "embed_seconds": prep["embed_seconds"],
                "seconds_per_step": res.train_seconds / max(res.step, 1),
                "steps_per_call": res.steps_per_call,
                "targets": _target_rows(row_evals, targets, cfg.metric, offset, res.train_seconds, res.step),
                "evals": [{k: e.get(k) for k in ("step", "train_seconds", *EVAL_KEYS)}
                          for e in row_evals],
                "resumed_from": res.resumed_from,
            }
            results[r]["final"] = dict(lasts[r]["metrics"], network_evals=lasts[r]["network_evals"],
                                       step=lasts[r]["step"])
        if m == "ours":
            results[m]["solver_stats"] = prep["solver_stats"]
            results[m]["precompute_config"] = prep["precompute_config"]
        logging.info("[%s] stopped (%s) after %d steps, %.1f s of training", m, res.stop_reason, res.step,
                     res.train_seconds)
        for r, (done_json, done_npz) in sorted(done.items(), key=lambda kv: kv[0] == m):  # the method's own last
            np.savez(done_npz, out=outs[r], frames=frames[r])
            eu.write_json(done_json, results[r])

    wall.__exit__()

    comparison = []
    baselines = [r for r in results if r != "ours"]
    if "ours" in results and baselines:
        for i, tgt in enumerate(targets):
            o = results["ours"]["targets"][i]
            c = {"target": tgt, "ours_seconds": o["seconds"]}
            for r in baselines:
                sp, note = _speedup(o, results[r]["targets"][i], LABELS.get(r, r))
                pre = _prefix(r, "ddpm")
                c.update({f"{r}_seconds": results[r]["targets"][i]["seconds"], pre + "speedup": sp, pre + "note": note})
            comparison.append(c)

    out = {
        "experiment": "denoise",
        "machine": eu.machine_info(),
        "compute_dtype": eu.compute_dtypes(tcs),
        "image": {"source": cfg.data.source, "shape": list(clean.shape), "dtype": str(clean.dtype),
                  "files": clean_files(cfg.data)},
        "noise": {"std": cfg.noise.std, "seed": cfg.noise.seed, "clamp": cfg.noise.clamp,
                  "signal_scale": signal_scale(cfg), "ddpm_start": ddpm_start(cfg)},
        "noisy": {k: base[k] for k in (*EVAL_KEYS, "mse")},
        "metric": cfg.metric, "targets": targets,
        "timing_convention": (
            "time to target = training time at the first evaluation reaching the target (optimiser steps "
            "only: JIT compile, evaluation and checkpoint time excluded, reported separately); for ours plus "
            "the pre-computation and embedding wall time (their JIT compile excluded too)"),
        "methods": results,
        "comparison": comparison,
        "wall_seconds": wall.seconds,
        "config": eu._plain(cfg),
    }
    _write_outputs(out, workdir, clean, noisy, outs, frames)
    return out


def _write_outputs(out: dict, workdir: str, clean, noisy, outs: dict, frames: dict) -> None:
    from krylovjax import experiment_utils as eu

    res = out["methods"]
    metric = out["metric"]
    rows = []
    for m, r in res.items():
        for t in r["targets"]:
            time_s = eu.format_seconds(t["seconds"]) if t["reached"] else (
                f"not reached in {r['steps']} steps / {eu.format_seconds(t['cap_seconds'])}")
            rows.append([m, r.get("sampler", "-"), t["target"], time_s, t["step"] if t["reached"] else "-",
                         eu.format_seconds(r["precompute_seconds"] + r["embed_seconds"], 2) if m == "ours" else "-",
                         eu.format_seconds(t["train_seconds"]) if t["reached"] else "-",
                         eu.format_seconds(r["compile_seconds"], 1), eu.format_seconds(r["eval_seconds"], 1),
                         f"{r['final']['ssim']:.4f}", f"{r['final']['global_ssim']:.4f}",
                         f"{r['final']['psnr']:.2f}", r["final"]["step"]])
    headers = ["method", "sampler", f"target {metric}", "time to target", "step", "pre-compute", "training",
               "compile (excl.)", "eval (excl.)", "final SSIM", "final global SSIM", "final PSNR (dB)",
               "final step"]
    seed = out["config"]["common"].get("seed")
    files = out["image"].get("files")
    source = out["image"]["source"] + (f": {', '.join(os.path.basename(f) for f in files)}" if files else "")
    text = [f"# Single-image denoising ({source}, {out['image']['shape'][2]}x"
            f"{out['image']['shape'][3]}, noise std {out['noise']['std']}, noise seed {out['noise']['seed']}, "
            f"training seed {seed})\n",
            f"Noisy input: SSIM {out['noisy']['ssim']:.4f}, PSNR {out['noisy']['psnr']:.2f} dB"
            + (" (DDPM starts its whole chain from Paper B's recipe at its own prior's scale instead, "
               "`ddpm.sampler.start = prior_mix`)" if out["noise"].get("ddpm_start") == "prior_mix" else "")
            + f". Timing: {out['timing_convention']}.\n", eu.markdown_table(headers, rows)]
    if out["comparison"]:
        base = [r for r in res if r != "ours"]
        crow, chead = [], [f"target {metric}", "ours"]
        for r in base:
            lab = LABELS.get(r, r)
            chead += [lab, f"speed-up ({lab} / ours)"]
        for c in out["comparison"]:
            row = [c["target"], eu.format_seconds(c["ours_seconds"])]
            for r in base:
                pre = _prefix(r, "ddpm")
                sp = c[pre + "speedup"]
                row += [eu.format_seconds(c[f"{r}_seconds"]), f"{sp:.2f}x" if sp is not None else c[pre + "note"]]
            crow.append(row)
        text.append("\n" + eu.markdown_table(chead, crow))
    mi = out["machine"]
    text.append(f"\nMachine: {mi['processor']}, {mi['cpu_count']} CPUs, backend {mi['backend']}, jax {mi['jax']}, "
                f"x64 {mi['x64']}, {eu.compute_dtype_note(out.get('compute_dtype'))}, load average at the end {mi['load_average']}; {mi['date']}; "
                f"wall time {out['wall_seconds']:.0f} s.\n")
    eu.write_text(os.path.join(workdir, "results.md"), "".join(text))

    names = [m for m in res if m in outs]
    label = {m: LABELS.get(m, m) for m in names}
    eu.image_grid(os.path.join(workdir, "trajectory.png"), [frames[m][:, 0] for m in names],
                  row_labels=[label[m] for m in names],
                  col_labels=[f"frame {i}" for i in range(frames[names[0]].shape[0])],
                  title="Denoising trajectory (frame 0 = noisy input, last = output)")
    panels = [clean[0], noisy[0]] + [outs[m][0] for m in names]
    labels = ["clean", f"noisy\nSSIM {out['noisy']['ssim']:.3f}"] + [
        f"{label[m]} (step {res[m]['final']['step']})\nSSIM {res[m]['final']['ssim']:.3f}" for m in names]
    eu.image_grid(os.path.join(workdir, "denoised.png"), [panels], col_labels=labels, panel_inches=1.6)
    curves = {}
    for m in names:
        off = res[m]["precompute_seconds"] + res[m]["embed_seconds"]
        ev = [e for e in res[m]["evals"] if e.get(metric) is not None]
        curves[label[m]] = ([e["train_seconds"] + off for e in ev], [e[metric] for e in ev])
    eu.plot_curves(os.path.join(workdir, "ssim_curve.png"), curves,
                   xlabel="time to evaluation (s; ours incl. pre-computation)", ylabel=metric,
                   hlines=out["targets"], title="Denoising quality during training")
    # Last: results.json marks the run finished, so a run killed while writing the figures redoes
    # them (from its kept per-method results) instead of standing as finished without them.
    eu.write_json(os.path.join(workdir, "results.json"), out)


def print_summary(out: dict, workdir: str) -> None:
    """Print the table and where the outputs are."""
    from krylovjax import experiment_utils as eu

    eu.print_outputs(workdir, "results.md", RESULT_FILES)
    runs = dict.fromkeys(r.get("training_run", m) for m, r in out["methods"].items())
    print("   training runs:", ", ".join(os.path.join(os.path.abspath(workdir), m) for m in runs))


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    eu.check_config_kind(FLAGS.config, "denoise")
    eu.check_dir_arg(FLAGS.workdir, "workdir")
    if FLAGS.fresh:  # (as run does: the results printed at the end are the new run's)
        FLAGS.workdir = eu.fresh_path(FLAGS.workdir)
    eu.quiet_orbax_logs()
    eu.sigterm_as_interrupt()  # kill / timeout / schedulers: checkpoint like Ctrl-C, then exit non-zero
    with eu.exit_on_run_errors(out_of_memory=OUT_OF_MEMORY):
        out = run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite, fresh=FLAGS.fresh)
    print_summary(out, FLAGS.workdir)


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
