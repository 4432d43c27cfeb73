"""Training of the score network on score-embedded trajectories, and of the DDPM baseline.

Two methods share one training loop (method.md sections 4.2, 4.3 and 6):

* ``method="ours"`` (Paper B's Algorithm 2, method.md 4.2-4.3). The data are the embedded
  trajectories ``x^n_i`` ``[B, N, C, H, W]`` at the time levels ``t [N]``
  (:func:`krylovjax.transport.embed`, or the ``"embedded"`` field of a
  :class:`krylovjax.store.ScoreStore`). A batch draws ``batch_size`` pairs ``(i, n)`` uniformly
  with replacement, a time ``t`` in the jitter window of ``t_n`` (below), ``z ~ N(0, I)``, and
  minimises (method.md 4.2, [B-code])::

      loss = mean_b [ 1 / (2 g(t_b)^2) * sum_{c,h,w} (s_theta(x^n_b + lambda(t_b) z_b, t_b) lambda(t_b) + z_b)^2 ]

  (``loss_reduction="sum"``, the paper's). With ``scale_by_sigma`` the score is the network's
  output over ``lambda(t)`` (score_sde's option), so the network predicts ``-z`` on DDPM's
  epsilon scale; Paper B's output is unscaled (the default). ``loss_reduction="mean"``
  replaces the sum over ``c, h, w`` by the mean, i.e. divides the loss by ``C H W``; with Adam
  that changes only the effective ``eps`` and how often gradient clipping is active (the summed
  loss has gradient norms of tens, so ``grad_clip = 1`` normalises every step). On 2 photos at 16x16, 300 steps,
  the summed loss reached an equal or lower loss (19.6 vs 20.5 at lr 1e-3, 36.6 vs 41.0 at
  3e-4), so the paper's sum stays the default.

  Pairs are drawn i.i.d. uniform over all ``B * N`` (image, level) pairs (Paper B's code
  repeats every level ``ceil(B/N)`` times and subsamples; the two agree in expectation).

  Time jitter ([B-code] draws ``t`` in a window of width ``dt/2`` next to each node; method.md
  4.3). Our rule, for a possibly non-uniform grid: the window of level ``n`` is
  ``[t_n - w (t_n - t_{n-1}) / 2, t_n + w (t_{n+1} - t_n) / 2]`` with ``w = time_jitter``
  (default 0.5, the same width as Paper B's), cut at ``t_0`` and ``t_{N-1}`` (the window of
  ``n = 0`` starts at ``t_0``, that of ``n = N-1`` ends at ``t_{N-1}``), and ``t`` is uniform on
  it. It is centred on the time that ``x^n`` represents (Paper B's window sits after the node)
  and never leaves ``[t_0, t_{N-1}]``, so ``lambda(t) > 0`` is always defined. ``w = 0`` trains
  at the nodes exactly.

* ``method="ddpm"`` (the baseline, method.md 6; Ho et al.): epsilon prediction on the clean
  images mapped to ``2x - 1``, ``T = ddpm_num_steps`` (1000) steps of a linear beta schedule
  (:meth:`krylovjax.ddpm.DDPMSchedule.linear`), loss :func:`krylovjax.ddpm.epsilon_loss`. The
  same U-Net with the sinusoidal ("fourier") time embedding, ``centered_input=True`` and
  ``time_multiplier = T``: the network is called with ``t = i / T`` for the step index ``i``, so
  its time input ``T * t = i`` is the integer step DDPM's embedding expects.

Optimiser: optax Adam with a linear warm-up ``lr * min(1, (k + 1) / warmup_steps)`` at update
``k`` (0-based, so the first update is not a no-op), after clipping the gradient to global norm
``grad_clip``. EMA of the weights with decay ``min(ema_decay, (1 + k) / (10 + k))`` (the
TensorFlow ``num_updates`` warm-up, so short runs are not dominated by the initial weights);
evaluation and :func:`load_score_fn` use the EMA weights.

Everything random in step ``k`` comes from ``fold_in(rng, k)`` with ``rng`` a key derived from
``PRNGKey(seed)`` and stored in the train state (the parameters use another), so a run is a pure
function of its config, data and step count: the same seed gives bit-identical parameters on
CPU, and a run resumed from a checkpoint continues exactly like an uninterrupted one.

Data parallelism, one or several processes: a ``jax.sharding.Mesh`` over ``jax.devices()`` (all
processes' devices after ``jax.distributed.initialize()``) with one axis ``"data"``. The
parameters and optimiser state are replicated; the data set is *sharded by images*: with ``D``
devices, device ``k`` holds image rows ``[k S, (k+1) S)``, ``S = ceil(B / D)`` (zero rows pad
``B`` to ``D S``), and each process reads (from its arrays or the ScoreStore) only its devices'
rows (:func:`shard_data`). Minibatch sampling is *global*: the ``batch_size`` indices are drawn
uniformly over all ``B`` images (and levels) from the step's key, as with one device; each
device picks the drawn rows it holds (zeros elsewhere) and a reduce-scatter over ``"data"``
assembles the batch, already sharded along ``"data"`` (each sum has one non-zero term, so it
is exact). Why global and not per-process sampling: the batches, hence the run, are then the
same for every number of devices and processes (only the gradient all-reduce's summation
order differs), a run may resume on another layout, and the sampling distribution is exactly
Paper B's; the price is one reduce-scatter of the batch per step, small next to the gradient
all-reduce. ``batch_size`` must be divisible by the number of devices.

Work directory layout::

    <workdir>/config.json          the run's config (train config, model config, data summary)
    <workdir>/checkpoints/<step>/  orbax CheckpointManager steps: "state" (params, EMA params,
                                   optimiser state, step, RNG key), "config", "meta" (sha256 of
                                   the state, train time, data fingerprint)
    <workdir>/metrics.jsonl        one JSON object per line: kind="start" (step, resumed_from,
                                   compile_seconds, num_devices), kind="train" (step, loss:
                                   the mean over its loss_steps updates since the last record
                                   or the resume, images_per_s, lr, grad_norm, train_seconds), kind="eval"
                                   (step, the eval callback's metrics, e.g. ssim); on resume
                                   the records after the restored step are dropped first

Multi-process: every process runs :func:`train` (and saves/restores checkpoints; orbax writes
from process 0, from host copies of the replicated state); only process 0 writes
``config.json``, ``metrics.jsonl`` and a progress bar. The ``"start"`` record names each
process's image rows (``data_rows``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from krylovjax import ddpm as ddpm_lib
from krylovjax import sde as sde_lib
from krylovjax import workdir_lock
from krylovjax._checks import check_finite, check_images, is_concrete, is_int, is_real
from krylovjax._io_errors import atomic_write_text, write_failure_cause
from krylovjax.experiment_utils import (_INTERRUPT_CHECKS, _SWALLOWED, checking_arguments, drop_closed_loop_reports,
                                        process_values)
from krylovjax.models import PRESETS, UNet, UNetConfig, get_config
from krylovjax.models.unet import _dtype_name

__all__ = [
    "TrainConfig",
    "TrainState",
    "ModelDef",
    "StepMetrics",
    "Trajectories",
    "TrainResult",
    "CheckpointError",
    "NonFiniteLossError",
    "METHODS",
    "RUN_CONTROL_KEYS",
    "DEFER_IN_TRAIN",
    "embedding_loss",
    "jitter_windows",
    "learning_rate",
    "ema_decay_at",
    "make_mesh",
    "check_mesh",
    "make_optimizer",
    "model_config",
    "create_train_state",
    "make_train_step",
    "compile_train_step",
    "resolve_unroll",
    "resolve_steps_per_call",
    "AUTO_STEPS_PER_CALL",
    "eval_loss",
    "prepare_data",
    "shard_data",
    "ShardedData",
    "trajectories_from_store",
    "train",
    "check_workdir",
    "check_store",
    "load_checkpoint",
    "LoadedCheckpoint",
    "load_score_fn",
]

METHODS = ("ours", "ddpm")
LOSS_REDUCTIONS = ("sum", "mean")

#: Config keys that only steer the run (how long, how often to log/evaluate/save); they may
#: change when a run is resumed. Every other key changes the mathematics and must match.
RUN_CONTROL_KEYS = frozenset({
    "num_steps", "budget_seconds", "checkpoint_every", "max_to_keep", "log_every",
    "eval_every", "target_metric", "progress", "steps_per_call", "unroll_steps",
})

_CONFIG_FILE = "config.json"
_METRICS_FILE = "metrics.jsonl"
_CKPT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (unreadable, incomplete or corrupt), or cannot
    be written (a full disk)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high, bad data); the
    update is not checkpointed and the message names its step."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """dict -> sorted tuple of (key, value) pairs, list -> tuple, recursively (hashable)."""
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _pairs_to_dict(pairs: tuple) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pairs}


def _check_time_jitter(w: Any) -> None:
    if not (is_real(w) and 0.0 <= w <= 1.0):  # NaN fails the comparison
        raise ValueError(f"time_jitter: expected a window fraction in [0, 1], got {w!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (immutable, hashable; JSON via :meth:`to_dict`).

    Attributes:
      method: ``"ours"`` (score-embedded trajectories, method.md 4.2) or ``"ddpm"`` (baseline).
      model: U-Net preset of :func:`krylovjax.models.get_config` (``"tiny"`` or ``"paper"``).
      model_overrides: extra :class:`~krylovjax.models.UNetConfig` fields, as a dict or a tuple
        of ``(key, value)`` pairs (stored as sorted pairs). ``image_size``/``in_channels``/
        ``out_channels`` come from the data; giving them is allowed only if they agree.
      lr: peak Adam learning rate (Paper B: 1e-4, cifar1 8e-5; DDPM 2e-4).
      warmup_steps: linear warm-up length in updates (0: none).
      grad_clip: global-norm clipping threshold (``None`` or 0: no clipping).
      ema_decay: EMA decay in [0, 1) (DDPM: 0.9999); warmed up as in the module docstring.
      batch_size: global batch size, divisible by the number of devices.
      num_steps: total number of optimiser updates of the run.
      seed: seeds the parameters and every random draw of training.
      checkpoint_every: save a checkpoint every this many updates (and at the end / at a stop).
      max_to_keep: checkpoints kept (older ones are removed by orbax), >= 1.
      log_every: write a training record to ``metrics.jsonl`` every this many updates.
      eval_every: call the evaluation callback every this many updates (0: never, except once at
        the end when a callback is given).
      budget_seconds: stop once the run's training time (summed over resumed segments, compile,
        evaluation and checkpoint time excluded) reaches this many seconds; ``None``: no budget.
      target_metric: key of the eval callback's dict compared with ``target``.
      sde: SDE name for :func:`krylovjax.sde.get_sde` (``"ours"``: g(t) and lambda(t)).
      sde_kwargs: its keyword arguments (dict or pairs), e.g. ``{"sigma": 5.0}``.
      loss_reduction: ``"sum"`` over ``c, h, w`` (method.md 4.2, the paper's) or ``"mean"``.
      time_jitter: ``w``, the jitter window width as a fraction of the neighbouring steps
        (module docstring); 0 trains at the grid nodes.
      per_image_offset: Paper B's disjoint per-image time intervals: the model gets the image
        index (``UNetConfig.per_image_offset`` with ``num_images`` from the data).
      scale_by_sigma: ``method="ours"`` only: the score is the network's output divided by
        ``lambda(t)``, ``s_theta(x, t) = net(x, t) / lambda(t)`` (score_sde's ``scale_by_sigma``,
        NCSNv2's parameterisation). The loss of method.md 4.2 then reads
        ``||net + z||^2 / (2 g^2)``: the network predicts ``-z``, as DDPM's predicts epsilon,
        instead of values up to ``1 / lambda_min`` in size. False (the default) is Paper B's
        unscaled output; BUILD_NOTES has the measured effect.
      ddpm_num_steps, ddpm_beta_start, ddpm_beta_end: the DDPM baseline's linear schedule.
      ddpm_max_train_step: ``method="ddpm"`` only: train on the step indices ``0 .. M-1`` instead
        of all ``ddpm_num_steps`` (:func:`krylovjax.ddpm.epsilon_loss`'s ``max_step``): a DDPM
        restricted to the noise levels a task needs, as ours' ``lambda(t)`` range is (an
        ablation, BUILD_NOTES); ``None`` (the default): every step, Ho et al.'s.
      progress: show a tqdm progress bar.
      steps_per_call: updates per dispatched program (a ``lax.scan`` of the step): fewer host
        round trips where one step is latency-bound (accelerators, small models). The calls
        never cross a log, checkpoint, evaluation or ``num_steps`` boundary (single steps fill
        the gaps; a cadence shorter than ``steps_per_call`` leaves one update per call, with a
        warning), the budget is checked between calls (it may overshoot by up to
        ``steps_per_call - 1`` updates), and the updates are those of single steps (to float32
        rounding: XLA compiles them apart). 1: one update per call. 0 (the default): automatic
        (:func:`resolve_steps_per_call`): one on CPU devices, on accelerators up to
        :data:`AUTO_STEPS_PER_CALL` (the largest that divides the log, checkpoint and
        evaluation cadences). Only the programs the run will call are compiled.
      unroll_steps: unroll the scan of ``steps_per_call`` updates into straight-line code
        (compile time grows with ``steps_per_call``). ``None``: unroll on CPU, where XLA runs
        the convolution gradients inside a loop body 5-25x slower (jax-ml/jax#12868, measured
        in BUILD_NOTES), and loop elsewhere.
    """

    method: str = "ours"
    model: str = "tiny"
    model_overrides: Any = ()
    lr: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    batch_size: int = 16
    num_steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 500
    max_to_keep: int = 3
    log_every: int = 50
    eval_every: int = 0
    budget_seconds: float | None = None
    target_metric: str = "ssim"
    sde: str = "ve"
    sde_kwargs: Any = (("sigma", 5.0),)
    loss_reduction: str = "sum"
    time_jitter: float = 0.5
    per_image_offset: bool = False
    scale_by_sigma: bool = False
    ddpm_num_steps: int = 1000
    ddpm_beta_start: float = 1e-4
    ddpm_beta_end: float = 0.02
    ddpm_max_train_step: int | None = None
    progress: bool = True
    steps_per_call: int = 0
    unroll_steps: bool | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for k in ("model_overrides", "sde_kwargs"):
            v = getattr(self, k)
            if v is None:
                v = ()
            if not isinstance(v, (Mapping, tuple, list)) and not hasattr(v, "to_dict"):
                raise ValueError(f"{k}: expected a dict or a tuple of (key, value) pairs, got {v!r}")
            if isinstance(v, (tuple, list)):
                if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) for p in v):
                    raise ValueError(f"{k}: expected (key, value) pairs with str keys, got {v!r}")
                v = {p[0]: p[1] for p in v}
            set_(k, _freeze(v))
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: expected one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if not isinstance(self.model, str) or self.model not in PRESETS:
            raise ValueError(f"model: expected a preset name, one of {tuple(PRESETS)}, got {self.model!r}")
        if not isinstance(self.sde, str) or self.sde.lower() not in sde_lib.sde_names():
            raise ValueError(f"sde: expected an SDE name, one of {sde_lib.sde_names()}, got {self.sde!r}")
        try:
            self.make_sde()
        except (TypeError, ValueError) as err:
            # names of another SDE's settings (train_tiny.py's VE sigma after --config.sde=vp):
            # say how to clear them (a walkthrough found the fix only in docs/experiments_cpu.md)
            hint = (f" (sde_kwargs {dict(self.sde_kwargs)} belong to another SDE: give {self.sde!r}'s own, or "
                    "an empty dict, {}, for its defaults)" if "bad keyword arguments" in str(err) else "")
            raise ValueError(f"sde_kwargs: not accepted by the SDE {self.sde!r}: {err}{hint}") from err
        for k in ("batch_size", "num_steps", "checkpoint_every", "max_to_keep", "log_every", "ddpm_num_steps"):
            v = getattr(self, k)
            if not is_int(v) or v < 1:
                raise ValueError(f"{k}: expected an integer >= 1, got {v!r}")
            set_(k, int(v))
        if self.ddpm_num_steps < 2:  # the schedule's own check named its num_steps, another field here
            raise ValueError(f"ddpm_num_steps: expected an integer >= 2 (DDPM's number of noise levels), "
                             f"got {self.ddpm_num_steps!r}")
        if not is_int(self.steps_per_call) or self.steps_per_call < 0:
            raise ValueError(f"steps_per_call: expected an integer >= 1, or 0 for automatic, got {self.steps_per_call!r}")
        set_("steps_per_call", int(self.steps_per_call))
        for k in ("warmup_steps", "eval_every", "seed"):
            v = getattr(self, k)
            if not is_int(v) or v < 0:
                raise ValueError(f"{k}: expected an integer >= 0, got {v!r}")
            set_(k, int(v))
        if not (is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite learning rate > 0, got {self.lr!r}")
        if self.grad_clip is not None:
            if not (is_real(self.grad_clip) and math.isfinite(self.grad_clip) and self.grad_clip >= 0):
                raise ValueError(f"grad_clip: expected None or a finite value >= 0, got {self.grad_clip!r}")
            set_("grad_clip", float(self.grad_clip) if self.grad_clip > 0 else None)
        if not (is_real(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay: expected a value in [0, 1), got {self.ema_decay!r}")
        if self.budget_seconds is not None:
            if not (is_real(self.budget_seconds) and math.isfinite(self.budget_seconds) and self.budget_seconds > 0):
                raise ValueError(f"budget_seconds: expected None or a finite number of seconds > 0, got {self.budget_seconds!r}")
            set_("budget_seconds", float(self.budget_seconds))
        _check_time_jitter(self.time_jitter)
        if not (is_real(self.ddpm_beta_start) and is_real(self.ddpm_beta_end)
                and 0 < self.ddpm_beta_start <= self.ddpm_beta_end < 1):
            raise ValueError(
                "ddpm_beta_start, ddpm_beta_end: expected 0 < ddpm_beta_start <= ddpm_beta_end < 1, "
                f"got {self.ddpm_beta_start!r}, {self.ddpm_beta_end!r}")
        if self.ddpm_max_train_step is not None:
            if self.method != "ddpm":
                raise ValueError(f"ddpm_max_train_step: only for method='ddpm', got method={self.method!r}")
            if not is_int(self.ddpm_max_train_step) or not 1 <= self.ddpm_max_train_step <= self.ddpm_num_steps:
                raise ValueError("ddpm_max_train_step: expected None or an integer in [1, ddpm_num_steps = "
                                 f"{self.ddpm_num_steps}], got {self.ddpm_max_train_step!r}")
            set_("ddpm_max_train_step", int(self.ddpm_max_train_step))
        if not isinstance(self.target_metric, str) or not self.target_metric:
            raise ValueError(f"target_metric: expected a non-empty str, got {self.target_metric!r}")
        for k in ("per_image_offset", "scale_by_sigma", "progress"):
            if not isinstance(getattr(self, k), (bool, np.bool_)):
                raise ValueError(f"{k}: expected a bool, got {getattr(self, k)!r}")
            set_(k, bool(getattr(self, k)))
        if self.unroll_steps is not None:
            if not isinstance(self.unroll_steps, (bool, np.bool_)):
                raise ValueError(f"unroll_steps: expected None or a bool, got {self.unroll_steps!r}")
            set_("unroll_steps", bool(self.unroll_steps))
        if self.scale_by_sigma and self.method != "ours":
            raise ValueError("scale_by_sigma: only for method='ours' (DDPM's network predicts epsilon, "
                             f"already scaled), got method={self.method!r}")
        for k in ("lr", "ema_decay", "time_jitter", "ddpm_beta_start", "ddpm_beta_end"):
            set_(k, float(getattr(self, k)))

    # -- conversions --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> "TrainConfig":
        """From a dict or an ``ml_collections.ConfigDict`` with (a subset of) the fields."""
        if isinstance(d, TrainConfig):
            return d
        if hasattr(d, "to_dict") and callable(d.to_dict):
            d = d.to_dict()
        if not isinstance(d, Mapping):
            raise TypeError(f"config: expected a TrainConfig, dict or ConfigDict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        """Plain JSON types (``model_overrides`` and ``sde_kwargs`` as dicts)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model_overrides"] = _pairs_to_dict(self.model_overrides)
        d["sde_kwargs"] = _pairs_to_dict(self.sde_kwargs)
        return json.loads(json.dumps(d))

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def make_sde(self) -> sde_lib.SDE:
        """The :mod:`krylovjax.sde` SDE named by ``sde`` / ``sde_kwargs``."""
        return sde_lib.get_sde(self.sde, **dict(self.sde_kwargs))

    def ddpm_schedule(self, dtype=jnp.float32) -> ddpm_lib.DDPMSchedule:
        """The DDPM baseline's linear schedule in ``dtype``."""
        return ddpm_lib.DDPMSchedule.linear(self.ddpm_num_steps, self.ddpm_beta_start, self.ddpm_beta_end,
                                            dtype=dtype)

    def _math_key(self) -> "TrainConfig":
        """This config with the run-control keys at their defaults (the compile-cache key)."""
        defaults = TrainConfig()
        return self.replace(**{k: getattr(defaults, k) for k in RUN_CONTROL_KEYS})


# ----------------------------------------------------------------------------------------------
# Pure pieces: loss, jitter windows, schedules
# ----------------------------------------------------------------------------------------------


def embedding_loss(score_fn: Callable[[jax.Array, jax.Array], jax.Array], x, t, z, sde, *,
                   reduction: str = "sum") -> tuple[jax.Array, jax.Array]:
    """The score-embedding loss of method.md 4.2 (Paper B, multiplied-out form).

    ``loss = mean_b [ 1/(2 g(t_b)^2) * R_{c,h,w} (s_theta(x_b + lambda(t_b) z_b, t_b) lambda(t_b)
    + z_b)^2 ]`` with ``R`` the sum (``reduction="sum"``, the paper's) or the mean (``"mean"``)
    over channels and pixels.

    Args:
      score_fn: ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``, the network ``s_theta``.
      x: ``[B, C, H, W]`` embedded images ``x^n`` (floating).
      t: ``[B]`` times ``> 0`` where the SDE's ``lambda(t)`` and ``g(t)^2`` are finite and ``> 0``.
      z: ``[B, C, H, W]`` standard normal noise.
      sde: an SDE of :mod:`krylovjax.sde` (``g2`` and ``perturbation_std`` = lambda).
      reduction: ``"sum"`` or ``"mean"``.

    Returns:
      ``(loss, per_example [B])``, in the dtype of ``x``.

    Raises:
      ValueError: bad shapes or ``reduction``; for concrete inputs, NaN/Inf in ``x``, ``t`` or
        ``z``, a time ``<= 0``, or a time where ``lambda(t)`` or ``g(t)^2`` is not finite and
        positive. The value checks are skipped for traced inputs (inside the jitted train step),
        so they cost nothing there.
      TypeError: a non-floating ``x``.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {LOSS_REDUCTIONS}, got {reduction!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"x: expected shape [B, C, H, W], got {tuple(x.shape)}")
    z = jnp.asarray(z, x.dtype)
    if z.shape != x.shape:
        raise ValueError(f"z: expected shape {tuple(x.shape)} (that of x), got {tuple(z.shape)}")
    t = jnp.asarray(t, x.dtype)
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected shape [B] = ({x.shape[0]},), got {tuple(t.shape)}")
    for name, v in (("x", x), ("t", t), ("z", z)):
        check_finite(name, v)  # skipped for traced values
    if is_concrete(t) and not bool(np.all(np.asarray(t) > 0)):
        raise ValueError(f"t: expected times > 0 (lambda(t) > 0), got {np.asarray(t)}")
    lam = sde.perturbation_std(t).astype(x.dtype)
    g2 = sde.g2(t).astype(x.dtype)
    for what, v in (("lambda(t)", lam), ("g(t)^2", g2)):
        if is_concrete(v):
            a = np.asarray(v)
            if not (np.all(np.isfinite(a)) and np.all(a > 0)):
                raise ValueError(f"t: expected times in the SDE's range, where {what} is finite and > 0; "
                                 f"got {what} = {a} at t = {np.asarray(t)}")
    lam = lam[:, None, None, None]
    s = score_fn(x + lam * z, t)
    if jnp.shape(s) != x.shape:
        raise ValueError(f"score_fn: expected an output of shape {tuple(x.shape)}, got {tuple(jnp.shape(s))}")
    r = (s.astype(x.dtype) * lam + z) ** 2
    red = jnp.sum(r, axis=(1, 2, 3)) if reduction == "sum" else jnp.mean(r, axis=(1, 2, 3))
    per_example = red / (2.0 * g2)
    return jnp.mean(per_example), per_example


def jitter_windows(t, time_jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-level jitter window ``[lo_n, hi_n]`` of the training times (module docstring).

    Args:
      t: ``[N]`` strictly increasing time levels (concrete), ``N >= 1``.
      time_jitter: ``w`` in [0, 1] (a real scalar).

    Returns:
      ``(lo [N], hi [N])`` float64 numpy arrays with ``t_0 <= lo_n <= t_n <= hi_n <= t_{N-1}``.

    Raises:
      ValueError: ``t`` not finite, ``<= 0`` or not strictly increasing; a concrete
        ``time_jitter`` outside [0, 1] or NaN (the guarantee above needs ``w <= 1``).
    """
    if is_concrete(time_jitter):
        _check_time_jitter(time_jitter.item() if isinstance(time_jitter, (np.ndarray, np.generic, jax.Array))
                           and np.ndim(time_jitter) == 0 else time_jitter)
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 1 or t.size < 1:
        raise ValueError(f"t: expected time levels of shape [N] with N >= 1, got shape {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("t: expected finite times > 0 (lambda(t) must be positive)")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        raise ValueError("t: expected strictly increasing time levels")
    gaps = np.diff(t)
    lo = t - 0.5 * time_jitter * np.concatenate([[0.0], gaps])
    hi = t + 0.5 * time_jitter * np.concatenate([gaps, [0.0]])
    return lo, hi


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """``k -> lr * min(1, (k + 1) / warmup_steps)`` (``lr`` when ``warmup_steps == 0``)."""
    lr, warm = config.lr, config.warmup_steps

    def schedule(count):
        if warm == 0:
            return jnp.asarray(lr, jnp.float32)
        return lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / warm)

    return schedule


def ema_decay_at(step, ema_decay: float):
    """EMA decay at update ``step`` (0-based): ``min(ema_decay, (1 + step) / (10 + step))``."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless disabled), then Adam with :func:`learning_rate`."""
    parts = []
    if config.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(optax.adam(learning_rate(config)))
    return optax.chain(*parts)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: ``jax.devices()``, the devices of
    all processes after ``jax.distributed.initialize()``, in process order)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices: expected at least one device")
    return Mesh(np.asarray(devices), ("data",))


def check_mesh(config: TrainConfig, mesh: Mesh | None = None) -> Mesh:
    """The checks :func:`train` makes of its mesh (default :func:`make_mesh`), returned: the
    batch a multiple of its devices, and devices of every process. Raises ValueError."""
    mesh = make_mesh() if mesh is None else mesh
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size: expected a multiple of the number of devices ({mesh.size}), "
                         f"got {config.batch_size}")
    nproc = jax.process_count()
    if {d.process_index for d in mesh.devices.flat} != set(range(nproc)):
        raise ValueError(f"mesh: expected devices of all {nproc} processes (make_mesh() with jax.devices()), got "
                         f"devices of processes {sorted({d.process_index for d in mesh.devices.flat})}")
    return mesh


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class Trajectories(NamedTuple):
    """Training data of ``method="ours"``.

    Attributes:
      x: ``[B, N, C, H, W]`` embedded trajectories (``x[:, 0]`` the clean images), any floating
        dtype (converted to the model's compute dtype on the devices).
      t: ``[N]`` their time levels, strictly increasing, > 0.
      sde: optional ``{"name": str, "kwargs": dict}`` of the SDE the embedding used; when given,
        :func:`train` refuses a config with another SDE.
    """

    x: Any
    t: Any
    sde: dict | None = None


def _check_meta(name: str, a, rank: int, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype checks that need no values (every process can do them on any data)."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise ValueError(f"{name}: expected an array of shape {what}, got {type(a).__name__}")
    if len(a.shape) != rank:
        raise ValueError(f"{name}: expected shape {what}, got {tuple(a.shape)}")
    if not np.issubdtype(np.dtype(a.dtype), np.floating):
        raise TypeError(f"{name}: expected a floating dtype (float16 to float64: converted to the model's "
                        f"compute dtype), got {a.dtype}")
    if min(a.shape) < 1:
        raise ValueError(f"{name}: expected a non-empty array of shape {what}, got {tuple(a.shape)}")
    return tuple(int(s) for s in a.shape), np.dtype(a.dtype)


class _Meta(NamedTuple):
    """Shape and dtype of an array not read yet (a ScoreStore field)."""

    shape: tuple
    dtype: np.dtype


class _Source(NamedTuple):
    """Training data before it is read: metadata, and a reader of image rows ``[start, stop)``."""

    key: str  # "x" (ours) or "images" (ddpm): the key in the arrays dict
    name: str  # what error messages call it
    shape: tuple  # global shape, images first
    read: Callable[[int, int], np.ndarray]
    t: np.ndarray | None
    lo: np.ndarray | None
    hi: np.ndarray | None


def _check_loss_weights(config: TrainConfig, lo: np.ndarray, hi: np.ndarray, shape: tuple) -> None:
    """The loss' ``g(t)^2`` (> 0) and ``lambda(t)`` (>= 0) finite in the model's compute dtype
    (float32, or float64 for a float64 model with x64) over the times training draws (the jitter
    windows ``[lo, hi]`` of the levels): time levels where the SDE overflows (``t = 500`` for VE
    sigma 2: ``sigma^(2t)``) stopped training at step 1 with "loss is nan ... lower lr or check the
    data", which named neither the times nor the SDE (a walkthrough)."""
    try:
        dtype = _compute_dtype(model_config(config, tuple(shape[-3:]), shape[0]))
    except (TypeError, ValueError):  # images the model cannot take: said by the checks that follow
        dtype = jnp.float32
    dtype = jnp.dtype(dtype) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)
    sde = config.make_sde()
    ends = jnp.asarray(np.concatenate([lo, hi]), dtype)
    with jax.ensure_compile_time_eval():
        g2, lam = np.asarray(sde.g2(ends)), np.asarray(sde.perturbation_std(ends))
    bad = ~(np.isfinite(g2) & np.isfinite(lam) & (g2 > 0) & (lam >= 0))
    if bad.any():
        at = np.asarray(ends)[bad]
        raise ValueError(
            f"data.t: the SDE {config.sde!r} {dict(_pairs_to_dict(config.sde_kwargs))} has a g(t)^2 or lambda(t) that is "
            f"not finite (or g(t)^2 not > 0) in {dtype.name} at t = {float(at.min()):.6g}..{float(at.max()):.6g} (the time levels "
            f"with their jitter windows span {float(lo.min()):.6g}..{float(hi.max()):.6g}); the embedded "
            "trajectories' times must be where the training SDE is finite (those of the pre-computation's grid)")


def _source(config: TrainConfig, data) -> _Source:
    """Validate everything about ``data`` that needs no values; nothing is read yet."""
    if config.method == "ours":
        if isinstance(data, (str, os.PathLike)) or type(data).__name__ == "ScoreStore":
            store, t, sde = _open_store(data)
            n_img = store.num_images
            shape = (n_img, *store.fields["embedded"].shape)
            data = Trajectories(x=_Meta(shape, np.dtype(store.fields["embedded"].dtype)), t=t, sde=sde)
            # checked against the chunks' checksums (ScoreStore.read_range: whole chunks read, each hashed once)
            read = lambda a, b: store.read_range("embedded", a, b)  # noqa: E731
        else:
            if isinstance(data, tuple) and not isinstance(data, Trajectories):
                if len(data) not in (2, 3):
                    raise ValueError("data: expected Trajectories(x [B, N, C, H, W], t [N]) for method='ours'")
                data = Trajectories(*data)
            if not isinstance(data, Trajectories):
                raise ValueError(
                    f"data: expected Trajectories(x [B, N, C, H, W], t [N]) (or a ScoreStore) for method='ours', "
                    f"got {type(data).__name__}")
            x = data.x
            read = lambda a, b: np.asarray(x[a:b])  # noqa: E731
        shape, _ = _check_meta("data.x", data.x, 5, "[B, N, C, H, W]")
        t = np.asarray(data.t, dtype=np.float64)
        if t.shape != (shape[1],):
            raise ValueError(f"data.t: expected shape [N] = ({shape[1]},) (one time per level of x), got {t.shape}")
        lo, hi = jitter_windows(t, config.time_jitter)
        if data.sde is not None:
            # names in lower case, as get_sde reads them ("VE" is "ve"; TrainConfig and PrecomputeConfig
            # accept either)
            want = {"name": config.sde.lower(), "kwargs": _pairs_to_dict(config.sde_kwargs)}
            got = {"name": str(data.sde.get("name")).lower(), "kwargs": dict(data.sde.get("kwargs") or {})}
            plain = lambda d: json.loads(json.dumps(d, default=float))  # noqa: E731 - tuples, numpy scalars
            if plain(want) != plain(got):  # compared as values: sigma 5 is sigma 5.0
                raise ValueError(
                    f"sde: the config's SDE {want} differs from the SDE of the embedded data {got}; "
                    "set config.sde / config.sde_kwargs to the embedding's")
        _check_loss_weights(config, lo, hi, shape)
        return _Source("x", "data.x", shape, read, t, lo, hi)
    if isinstance(data, Trajectories):
        raise ValueError("data: method='ddpm' trains on clean images [B, C, H, W], got Trajectories")
    if isinstance(data, (str, os.PathLike)) or type(data).__name__ == "ScoreStore":
        # the store's images: the first level of each embedded trajectory is the image itself
        # (x^0 = x, krylovjax.transport.embed), so ours and DDPM train on the same images
        store = _open_store(data)[0]
        shape = (store.num_images, *store.fields["embedded"].shape[1:])
        data = _Meta(shape, np.dtype(store.fields["embedded"].dtype))
        read = lambda a, b: _first_levels(store, a, b)  # noqa: E731
    else:
        read = lambda a, b: np.asarray(data[a:b])  # noqa: E731
    shape, _ = _check_meta("data", data, 4, "[B, C, H, W] (clean images for method='ddpm')")
    return _Source("images", "data", shape, read, None, None, None)


def _first_levels(store, start: int, stop: int) -> np.ndarray:
    """Images ``[start, stop)`` of a store for DDPM: level 0 of their embedded trajectories, read a
    chunk at a time with ``read_range`` and so checked against the chunks' checksums. A checksum
    covers a chunk's whole trajectories, so this reads ``N`` times the images' bytes (once, at the
    start of training), one chunk in memory at a time."""
    out, i, size = [], start, store.chunk_size
    while i < stop:
        j = min(stop, (i // size + 1) * size)
        out.append(np.array(store.read_range("embedded", i, j)[:, 0]))  # a copy: the chunk is freed
        i = j
    spec = store.fields["embedded"]
    return np.concatenate(out) if out else np.zeros((0, *spec.shape[1:]), spec.dtype)


# One row per image: sha256 of its float64 bytes (32), then int64 count of NaN/Inf, float64 min and
# max over its finite values (8 bytes each): what the data checks and the fingerprint need.
_ROW_BYTES = 56


def _row_summaries(block: np.ndarray) -> np.ndarray:
    """``[k, ...]`` image rows -> ``[k, 56]`` uint8 summaries (digest, non-finite count, min, max)."""
    out = np.zeros((block.shape[0], _ROW_BYTES), np.uint8)
    for i, row in enumerate(block):  # once per image at start-up, not in a hot path
        a = np.ascontiguousarray(row, dtype=np.float64)
        out[i, :32] = np.frombuffer(hashlib.sha256(memoryview(a.reshape(-1).view(np.uint8))).digest(), np.uint8)
        finite = np.isfinite(a)
        vals = a[finite]
        stats = (np.asarray([(~finite).sum()], np.int64).view(np.uint8),
                 np.asarray([vals.min() if vals.size else 0.0, vals.max() if vals.size else 0.0]).view(np.uint8))
        out[i, 32:] = np.concatenate(stats)
    return out


def _check_values_and_fingerprint(config: TrainConfig, src: _Source, rows: np.ndarray) -> dict:
    """The value checks (on every process alike) and ``info`` from the ``[B, 56]`` row summaries.

    The fingerprint is the sha256 of the per-image digests (and the time levels): independent of
    how the images are split between processes, so a run may resume with another layout.
    """
    n_bad = rows[:, 32:40].copy().view(np.int64)[:, 0]
    mins, maxs = (rows[:, 40:48].copy().view(np.float64)[:, 0], rows[:, 48:56].copy().view(np.float64)[:, 0])
    if n_bad.any():
        which = np.flatnonzero(n_bad)
        raise ValueError(f"{src.name}: expected finite values, found {int(n_bad.sum())} NaN/Inf "
                         f"(in image(s) {which[:10].tolist()})")
    if src.key == "images" and (mins.min() < 0 or maxs.max() > 1):
        raise ValueError(f"data: expected images in [0, 1], got values in [{mins.min():.4g}, {maxs.max():.4g}]")
    h = hashlib.sha256(f"{src.key}|{list(src.shape)}|".encode())
    h.update(rows[:, :32].tobytes())
    info: dict[str, Any] = {"num_images": int(src.shape[0])}
    if src.t is not None:
        h.update(np.ascontiguousarray(src.t, np.float64).tobytes())
        info.update(num_times=int(src.shape[1]), t=src.t.tolist())
    info.update(sample_shape=[int(s) for s in src.shape[-3:]], fingerprint=h.hexdigest(), method=config.method)
    return info


def prepare_data(config: TrainConfig, data) -> tuple[dict, dict]:
    """Validate the training data of ``config.method`` and bring it into the step's form (all of
    it, in this process; :func:`shard_data` reads only this process's images).

    Args:
      config: the :class:`TrainConfig`.
      data: ``"ours"``: :class:`Trajectories` (or a ``(x [B, N, C, H, W], t [N])`` pair, or a
        :class:`krylovjax.store.ScoreStore` / store path, see :func:`trajectories_from_store`);
        ``"ddpm"``: clean images ``[B, C, H, W]`` in [0, 1], or a ScoreStore / store path,
        whose images it trains on (the first level of each embedded trajectory, the image
        itself: the images ours trains on). A store's chunks are checked against their
        checksums as they are read (DDPM reads whole trajectories for that, a chunk at a time).

    Returns:
      ``(arrays, info)``: ``arrays`` numpy arrays for the step (``"ours"``: ``x`` as given,
      ``lo``, ``hi`` float64 ``[N]`` jitter windows; ``"ddpm"``: ``images``); ``info`` a JSON
      summary (``sample_shape`` ``[C, H, W]``, ``num_images``, ``num_times``, ``t``,
      ``fingerprint`` = sha256 of the per-image sha256 digests of the float64 data and of ``t``).

    Raises:
      ValueError: wrong shapes, NaN/Inf (the images are named), images outside [0, 1] (ddpm),
        ``t`` not matching ``x`` or not increasing, an SDE other than the embedding's.
        :class:`krylovjax.store.StoreDamagedError` (a ValueError): a store chunk that fails its
        checksum or cannot be read.
      TypeError: a non-floating dtype.
    """
    src = _source(config, data)
    block = src.read(0, src.shape[0])
    info = _check_values_and_fingerprint(config, src, _row_summaries(block))
    arrays = {src.key: block} if src.t is None else {"x": block, "lo": src.lo, "hi": src.hi}
    return arrays, info


class ShardedData(NamedTuple):
    """Training data on a mesh (:func:`shard_data`).

    Attributes:
      arrays: the step's data dict of global ``jax.Array`` s: the table (``"x"``
        ``[B', N, C, H, W]`` or ``"images"`` ``[B', C, H, W]``, ``B'`` = ``B`` rounded up to a
        multiple of the mesh size, zero rows after ``B``) sharded along ``"data"`` (device ``k``
        holds rows ``[k B'/D, (k+1) B'/D)``), and ``"lo"``, ``"hi"`` ``[N]`` replicated.
      info: as :func:`prepare_data`'s, identical on every process.
      local_rows: the image rows ``((start, stop), ...)`` this process read.
      rows_per_process: ``[[start, stop], ...]`` per process index (each process's rows as one
        range, the union of its devices' rows).
    """

    arrays: dict
    info: dict
    local_rows: tuple
    rows_per_process: list


# What shard_data puts in the NaN/Inf count of the rows a process could not read (see _unread).
_UNREAD_DAMAGED, _UNREAD_OTHER = -1, -2


def _unread(err: BaseException) -> int:
    from krylovjax.store import StoreDamagedError
    return _UNREAD_DAMAGED if isinstance(err, StoreDamagedError) else _UNREAD_OTHER


def _merge(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _global_from_blocks(mesh: Mesh, shape: tuple, blocks: dict, dtype) -> jax.Array:
    """A global array sharded along ``"data"`` from this process's row blocks {(start, stop): rows}."""
    def cb(index):
        sl = index[0]
        return np.asarray(blocks[(sl.start or 0, shape[0] if sl.stop is None else sl.stop)], dtype)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, P("data")), cb)


def _replicate(mesh: Mesh, arr: jax.Array) -> np.ndarray:
    """All of a global array, on every process (an all-gather over the mesh)."""
    out = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(arr)
    return np.asarray(out.addressable_data(0))


def shard_data(config, data, mesh: Mesh | None = None, *, dtype=None) -> ShardedData:
    """Validate the training data and place it on ``mesh``, each process reading only its rows.

    The image axis is split into ``D`` (mesh size) equal blocks of ``ceil(B / D)`` rows (zero
    padding after ``B``), device ``k`` of the ``"data"`` axis holding block ``k``; a process reads
    (from the arrays, or from the ScoreStore, checked against its chunks' checksums) only the
    blocks of its own devices. The value checks and the fingerprint run on per-image summaries
    (sha256, NaN/Inf count, min, max) gathered from all processes, so every process raises the
    same error; a process that cannot read its rows (a damaged or incomplete store chunk) raises
    its own error after that gather, and the others an error naming it.
    The train step draws image indices over all ``B`` images and fetches the rows from the
    owning devices (:func:`make_train_step`), so the batches do not depend on the layout.

    Args:
      config: :class:`TrainConfig` (or dict / ConfigDict).
      data: as for :func:`prepare_data`.
      mesh: a :func:`make_mesh` mesh (default: all devices of all processes).
      dtype: the array dtype on the devices (default: the model's compute dtype).

    Returns:
      :class:`ShardedData`.

    Raises:
      ValueError, TypeError: as :func:`prepare_data`, and images that do not fit the model.
    """
    config = TrainConfig.from_dict(config)
    mesh = make_mesh() if mesh is None else mesh
    src = _source(config, data)
    b, item = src.shape[0], src.shape[1:]
    if dtype is None:  # also checks that the images fit the model before anything is read
        dtype = _compute_dtype(model_config(config, tuple(src.shape[-3:]), b))
    d = mesh.size
    padded = -(-b // d) * d
    sharding = NamedSharding(mesh, P("data"))

    def rows_of(sl):
        return (sl.start or 0, padded if sl.stop is None else sl.stop)

    ranges = sorted({rows_of(idx[0]) for idx in sharding.addressable_devices_indices_map((padded,)).values()})
    blocks, summaries, failed = {}, {}, None
    for a, c in ranges:
        lo, hi = min(a, b), min(c, b)
        if failed is None:
            try:
                rows = src.read(lo, hi) if hi > lo else np.zeros((0, *item), np.float64)
                if rows.shape != (hi - lo, *item):
                    raise ValueError(
                        f"{src.name}: rows [{lo}, {hi}) read with shape {rows.shape}, expected {(hi - lo, *item)}")
            except Exception as err:  # said to every process after the gather below, not raised here alone
                failed = err
        if failed is not None:  # no rows (nothing more allocated); their NaN/Inf count says why (_unread)
            summaries[(a, c)] = np.zeros((c - a, _ROW_BYTES), np.uint8)
            summaries[(a, c)][:, 32:40] = np.full((c - a, 1), _unread(failed), np.int64).view(np.uint8)
            continue
        pad = c - a - (hi - lo)
        blocks[(a, c)] = np.concatenate([rows, np.zeros((pad, *item), rows.dtype)]) if pad else rows
        summaries[(a, c)] = np.concatenate([_row_summaries(rows), np.zeros((pad, _ROW_BYTES), np.uint8)])
    local = tuple(_merge((min(a, b), min(c, b)) for a, c in ranges))
    per_process: dict[int, list] = {}
    for dev, idx in sharding.devices_indices_map((padded,)).items():
        a, c = rows_of(idx[0])
        per_process.setdefault(dev.process_index, []).append((min(a, b), min(c, b)))
    rows_per_process = [[min(a for a, _ in r), max(c for _, c in r)] for _, r in sorted(per_process.items())]
    # what each row is, with its size (a walkthrough trained a 32x32 model config on 128x128 data,
    # which the log never said, 2026-12-07)
    logging.info("process %d/%d: read images %s of %d (%s, each %s)", jax.process_index(), jax.process_count(),
                 [list(r) for r in local], b, {"x": "embedded trajectories"}.get(src.key, src.key),
                 " x ".join(str(d) for d in item))

    summary = _replicate(mesh, _global_from_blocks(mesh, (padded, _ROW_BYTES), summaries, np.uint8))
    # A process that could not read its rows (a damaged store chunk, an incomplete one) raises its
    # own error, and every other process one naming it, after the gather: raised before it, the
    # others waited in the gather until gloo's deadline (30 s), then a traceback.
    if failed is not None:
        raise failed
    code = summary[:b, 32:40].copy().view(np.int64)[:, 0]
    if (code < 0).any():
        said = []
        for proc, (lo, hi) in enumerate(rows_per_process):
            which = lo + np.flatnonzero(code[lo:hi] < 0)
            if which.size:
                kind = "a damaged chunk of the store" if code[which[0]] == _UNREAD_DAMAGED else "an error"
                said.append(f"process {proc} could not read its images {int(which[0])}..{int(which[-1])} ({kind})")
        msg = (f"{src.name}: {'; '.join(said)}; each process's own message says which and what to do; "
               "every process stops")
        if (code == _UNREAD_DAMAGED).any():
            from krylovjax.store import StoreDamagedError
            raise StoreDamagedError(msg)
        raise ValueError(msg)
    info = _check_values_and_fingerprint(config, src, summary[:b])
    arrays = {src.key: _global_from_blocks(mesh, (padded, *item), blocks, dtype)}
    if src.t is not None:
        repl = NamedSharding(mesh, P())
        arrays.update(lo=jax.device_put(jnp.asarray(src.lo, dtype), repl),
                      hi=jax.device_put(jnp.asarray(src.hi, dtype), repl))
    return ShardedData(arrays, info, local, rows_per_process)


def _find_key(cfg: Mapping, key: str) -> Any:
    if key in cfg:
        return cfg[key]
    for sub in ("precompute", "config"):
        if isinstance(cfg.get(sub), Mapping) and key in cfg[sub]:
            return cfg[sub][key]
    return None


def check_store(store) -> tuple[int, tuple[int, int, int]]:
    """The checks :func:`train` makes of a :class:`~krylovjax.store.ScoreStore` (or its path)
    before any work: a store (its manifest) holding embedded trajectories and their time levels.
    Reads the manifest and the time levels only.

    Returns:
      ``(number of images, image shape (C, H, W))``, e.g. for :func:`model_config`.

    Raises:
      FileNotFoundError: no store there. ValueError: no ``embedded`` field, or no time levels;
        :class:`krylovjax.store.StoreDamagedError` (a ValueError): a damaged manifest, array or
        chunk 0 of the time levels (the message names the file).
    """
    opened = _open_store(store)[0]
    return opened.num_images, tuple(int(d) for d in opened.fields["embedded"].shape[1:])


def _open_store(store):
    """``(ScoreStore, t [N] float64, sde dict or None)`` of a store or its path; reads no trajectories.
    A damaged manifest or array is refused with :class:`krylovjax.store.StoreDamagedError` naming its file."""
    from krylovjax.store import ScoreStore, read_manifest  # local: store pulls in tensorstore

    if not isinstance(store, ScoreStore):
        path = os.fspath(store)
        m = read_manifest(path, arg="store")  # FileNotFoundError: no manifest.json
        fields = {k: (v["shape"], v["dtype"], v["time_axis"]) for k, v in m["fields"].items()}
        store = ScoreStore.create_or_open(path, config=m["config"], inputs_hash=m["inputs_hash"],
                                          num_images=m["num_images"], chunk_size=m["chunk_size"],
                                          fields=fields)
    if "embedded" not in store.fields:
        raise ValueError(f"store: {store.path!r} has no 'embedded' field (fields: {list(store.fields)})")
    n = store.fields["embedded"].shape[0]
    cfg = store.config or {}
    if "t" in store.fields:
        t = np.asarray(store.read_range("t", 0, 1)[0], dtype=np.float64).reshape(-1)  # chunk 0, checked
    else:
        num_steps = _find_key(cfg, "num_steps")
        if num_steps is None:
            raise ValueError(f"store: {store.path!r} has neither a 't' field nor a 'num_steps' config key; "
                             "cannot tell the time levels of the embedded trajectories")
        eps = _find_key(cfg, "eps")
        big_t = _find_key(cfg, "T")
        t, _ = sde_lib.time_grid(int(num_steps), 1e-3 if eps is None else float(eps),
                                 1.0 if big_t is None else float(big_t),
                                 paper_b=bool(_find_key(cfg, "paper_b_time_grid") or False),
                                 dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
        t = np.asarray(t, dtype=np.float64)
    if t.shape != (n,):
        raise ValueError(f"store: time levels have shape {t.shape}, but 'embedded' has N = {n} levels")
    sde = None
    name = _find_key(cfg, "sde")
    if isinstance(name, str):
        kw = _find_key(cfg, "sde_kwargs") or {}
        if isinstance(kw, (list, tuple)):
            kw = {k: v for k, v in kw}
        sde = {"name": name, "kwargs": dict(kw)}
    return store, t, sde


def trajectories_from_store(store) -> Trajectories:
    """The embedded trajectories of a :class:`krylovjax.store.ScoreStore` (all in memory).

    Reads the field ``"embedded"`` (per-image shape ``[N, C, H, W]``). The time levels come from
    a field ``"t"`` (per-image ``[N]``; image 0's is used) if the store has one, else from the
    store's config: ``num_steps``, ``eps`` (default 1e-3), ``T`` (default 1) and
    ``paper_b_time_grid`` (:func:`krylovjax.sde.time_grid`), at the top level or under
    ``"precompute"``. The SDE (``sde``, ``sde_kwargs``) is taken from the config when present.
    (:func:`train` / :func:`shard_data` given a store read only each process's images.)

    Args:
      store: a ScoreStore or the path of one.

    Returns:
      :class:`Trajectories` with ``x`` float numpy ``[B, N, C, H, W]``.
    """
    store, t, sde = _open_store(store)
    return Trajectories(x=store.read_all("embedded"), t=t, sde=sde)


# ----------------------------------------------------------------------------------------------
# Model and train state
# ----------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; what a checkpoint holds).

    Attributes:
      step: int32 scalar, number of updates done.
      params: ``nnx.State`` of the U-Net's parameters.
      ema_params: ``nnx.State``, EMA of ``params``.
      opt_state: the optax state.
      rng: uint32 ``[2]`` PRNG key; step ``k`` draws from ``fold_in(rng, k)``.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


class ModelDef(NamedTuple):
    """The static part of the model: ``nnx`` graph definition, non-parameter state, config."""

    graphdef: Any
    rest: Any
    unet: UNetConfig


class StepMetrics(NamedTuple):
    """Per-step scalars returned by the train step (with a leading axis ``[steps]`` from a
    multi-step call, :func:`make_train_step`)."""

    loss: jax.Array
    grad_norm: jax.Array
    lr: jax.Array


def model_config(config: TrainConfig, sample_shape, num_images: int = 1) -> UNetConfig:
    """The U-Net config of a run: preset + method defaults + overrides, sized to the data.

    Args:
      config: the :class:`TrainConfig`.
      sample_shape: ``(C, H, W)`` of one training image.
      num_images: images in the data set (for ``per_image_offset``).

    Raises:
      ValueError: non-square images, or images whose size or channels disagree with the model
        (``model_overrides``) or that the U-Net cannot take (``H`` not divisible by
        ``2**(len(ch_mult) - 1)``); the message names ``data``.
    """
    if len(sample_shape) != 3:
        raise ValueError(f"sample_shape: expected (C, H, W), got {tuple(sample_shape)}")
    c, h, w = (int(s) for s in sample_shape)
    if h != w:
        raise ValueError(f"data: the U-Net takes square images, got H x W = {h} x {w}")
    over = dict(config.model_overrides)
    for k, v in (("image_size", h), ("in_channels", c), ("out_channels", c)):
        if k in over and int(over.pop(k)) != v:
            raise ValueError(
                f"data: images of shape [C, H, W] = {[c, h, w]} do not fit the model: "
                f"model_overrides sets {k} = {dict(config.model_overrides)[k]}, the data need {v}")
    base: dict[str, Any] = dict(in_channels=c, out_channels=c)
    if config.method == "ddpm":
        base.update(time_embedding="fourier", time_multiplier=float(config.ddpm_num_steps), centered_input=True)
    if config.per_image_offset:
        base.update(per_image_offset=True, num_images=int(num_images))
    base.update({k: tuple(v) if isinstance(v, list) else v for k, v in over.items()})
    try:
        return get_config(config.model, image_size=h, **base)
    except ValueError as err:
        if "image_size" in str(err):
            raise ValueError(f"data: images of size {h} x {w} do not fit the model: {err}") from err
        raise
    except TypeError as err:
        raise ValueError(f"model_overrides: {err}") from err


def _compute_dtype(unet: UNetConfig):
    """The dtype of the network's inputs, outputs and loss: float32, or ``param_dtype`` if wider
    (not ``unet.dtype``, the convolutions' and matmuls' compute dtype, which may be bfloat16)."""
    return jnp.promote_types(jnp.dtype(unet.param_dtype), jnp.float32)


def create_train_state(config: TrainConfig, sample_shape, *, num_images: int = 1) -> tuple[TrainState, ModelDef]:
    """A fresh train state (step 0, EMA = params) and the model definition.

    Args:
      config: the :class:`TrainConfig` (``seed`` seeds the parameters and the training RNG).
      sample_shape: ``(C, H, W)`` of one training image.
      num_images: images in the data set (``per_image_offset`` needs it).

    Returns:
      ``(TrainState, ModelDef)``; the state lives on the default device (:func:`train` places it
      on the mesh).
    """
    unet = model_config(config, sample_shape, num_images)
    root = jax.random.PRNGKey(config.seed)
    k_params, k_dropout, k_train = jax.random.split(root, 3)
    graphdef, params, ema, opt_state, rest = _init_fn(config._math_key(), unet)(k_params, k_dropout)
    state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, ema_params=ema,
                       opt_state=opt_state, rng=k_train)
    return state, ModelDef(graphdef, rest, unet)


_INIT_CACHE: dict = {}


def _graphdef(unet: UNetConfig):
    """The ``nnx`` graph definition of the U-Net of ``unet`` (traced abstractly: no arrays)."""
    return nnx.split(nnx.eval_shape(lambda: UNet(unet, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]


def _init_fn(config: TrainConfig, unet: UNetConfig):
    """``(k_params, k_dropout) -> (graphdef, params, ema, opt_state, rest)``, the state arrays made
    by one jitted program (eager initialisation compiles every small op separately: seconds)."""
    key = (config, unet)
    if key not in _INIT_CACHE:
        graphdef = _graphdef(unet)
        tx = make_optimizer(config)

        def init(k_params, k_dropout):
            model = UNet(unet, rngs=nnx.Rngs(params=k_params, dropout=k_dropout))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return params, jax.tree.map(jnp.copy, params), tx.init(params), rest

        k = jax.random.PRNGKey(0)
        lowered = jax.jit(init).lower(k, k)
        try:  # a one-off program: optimising it costs seconds of compile and saves microseconds
            init = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
        except Exception:  # noqa: BLE001 - a backend without the option
            init = lowered.compile()
        _INIT_CACHE[key] = (graphdef, init)
    graphdef, init = _INIT_CACHE[key]
    return lambda kp, kd: (graphdef, *init(kp, kd))


def _apply(model_def: ModelDef, params, x, t, idx, *, train: bool, dropout_key=None):
    model = nnx.merge(model_def.graphdef, params, model_def.rest)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    return model(x, t, idx if model_def.unet.per_image_offset else None, train=train, rngs=rngs)


def _score_of(config: TrainConfig):
    """``(out [B, C, H, W], t [B]) -> s_theta``: the network output as ours' score (``out`` itself,
    or ``out / lambda(t)`` with ``scale_by_sigma``)."""
    if not config.scale_by_sigma:
        return lambda out, t: out
    sde = config.make_sde()
    return lambda out, t: out / sde.perturbation_std(t).astype(out.dtype)[:, None, None, None]


def _take_rows(mesh: Mesh | None, table, rows, lev=None):
    """``table[rows]`` (or ``table[rows, lev]``) for a table sharded along ``"data"`` by rows.

    ``rows [bs]`` are global image indices (the same on every device). Each device looks up the
    rows it holds and writes zeros for the others; a reduce-scatter (``psum_scatter``) over
    ``"data"`` then sums the D candidates of each batch row, of which exactly one is non-zero (so
    the result is exact), and leaves each device its ``bs / D`` rows: the batch arrives sharded
    along ``"data"``, and no device ever holds the whole data set. Without a mesh: a plain gather.
    """
    if mesh is None:
        return table[rows] if lev is None else table[rows, lev]
    pad = (-table.shape[0]) % mesh.size  # unpadded (e.g. replicated) tables are padded here
    if pad:
        table = jnp.pad(table, [(0, pad)] + [(0, 0)] * (table.ndim - 1))

    def local(tab, r, *maybe_lev):
        s = tab.shape[0]
        j = r - jax.lax.axis_index("data") * s
        inside = (j >= 0) & (j < s)
        jj = jnp.clip(j, 0, s - 1)
        v = tab[jj] if not maybe_lev else tab[jj, maybe_lev[0]]
        v = jnp.where(inside.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros((), v.dtype))
        return jax.lax.psum_scatter(v, "data", scatter_dimension=0, tiled=True)

    args = (table, rows) if lev is None else (table, rows, lev)
    specs = (P("data"),) + (P(),) * (len(args) - 1)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P("data"))(*args)


def _loss_fn(config: TrainConfig, model_def: ModelDef, mesh: Mesh | None, num_images: int | None = None):
    """``batch_loss(params, key, data, train) -> (loss, per_example)``: draw a batch, its loss.

    Image indices are drawn over ``num_images`` images (default: the table's leading axis; a
    :func:`shard_data` table is padded, so :func:`train` passes the real count)."""
    batch_sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
    bs = config.batch_size
    sde = config.make_sde() if config.method == "ours" else None
    as_score = _score_of(config)
    dtype = _compute_dtype(model_def.unet)
    schedule = config.ddpm_schedule(dtype) if config.method == "ddpm" else None
    big_t = config.ddpm_num_steps

    def shard(a):
        return a if batch_sharding is None else jax.lax.with_sharding_constraint(a, batch_sharding)

    def batch_loss(params, key, data, train):
        k_pair, k_t, k_noise, k_drop = jax.random.split(key, 4)
        drop = k_drop if train else None
        if config.method == "ours":
            xs = data["x"]
            n_img = xs.shape[0] if num_images is None else num_images
            n_lev = xs.shape[1]
            flat = jax.random.randint(k_pair, (bs,), 0, n_img * n_lev, dtype=jnp.int32)
            idx, lev = flat // n_lev, flat % n_lev
            x = shard(_take_rows(mesh, xs, idx, lev))
            u = jax.random.uniform(k_t, (bs,), dtype)
            t = shard(data["lo"][lev] + u * (data["hi"][lev] - data["lo"][lev]))
            z = shard(jax.random.normal(k_noise, x.shape, dtype))
            idx = shard(idx)
            fn = lambda xx, tt: as_score(_apply(model_def, params, xx, tt, idx, train=train, dropout_key=drop), tt)  # noqa: E731
            return embedding_loss(fn, x, t, z, sde, reduction=config.loss_reduction)
        imgs = data["images"]
        n_img = imgs.shape[0] if num_images is None else num_images
        idx = jax.random.randint(k_pair, (bs,), 0, n_img, dtype=jnp.int32)
        x0 = shard(2.0 * _take_rows(mesh, imgs, idx) - 1.0)
        idx = shard(idx)

        def eps_fn(xx, i):
            return _apply(model_def, params, xx, i.astype(dtype) / big_t, idx, train=train, dropout_key=drop)
        out = ddpm_lib.epsilon_loss(eps_fn, x0, k_noise, schedule=schedule, max_step=config.ddpm_max_train_step)
        return out.mean, out.per_example

    return batch_loss


def _step_fn(config: TrainConfig, model_def: ModelDef, mesh: Mesh, num_images: int | None = None):
    """The un-jitted train step ``(state, data) -> (state, StepMetrics)``."""
    tx = make_optimizer(config)
    sched = learning_rate(config)
    batch_loss = _loss_fn(config, model_def, mesh, num_images)

    def step(state: TrainState, data: dict):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params, key, data, True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, config.ema_decay)
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema_params, params)
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, rng=state.rng)
        return new, StepMetrics(loss=loss, grad_norm=optax.tree.norm(grads), lr=jnp.asarray(sched(state.step)))

    return step


def eval_loss(config: TrainConfig, model_def: ModelDef, params, data: dict, key) -> jax.Array:
    """The training loss of ``params`` on the batch drawn from ``key``, without dropout.

    The batch is drawn exactly as the train step draws it (``batch_size`` pairs, jittered
    times, noise); ``data`` is the arrays dict of :func:`prepare_data`. Returns a scalar.
    """
    dtype = _compute_dtype(model_def.unet)
    data = {k: jnp.asarray(v, dtype) for k, v in data.items()}
    cache_key = (config._math_key(), model_def.unet)
    if cache_key not in _EVAL_LOSS:
        batch_loss = _loss_fn(config, model_def, None)
        _EVAL_LOSS[cache_key] = jax.jit(lambda p, k, d: batch_loss(p, k, d, False)[0])
    return _EVAL_LOSS[cache_key](params, key, data)


_EVAL_LOSS: dict = {}


def make_train_step(config: TrainConfig, model_def: ModelDef, mesh: Mesh | None = None, *, donate: bool = False,
                    num_images: int | None = None, steps: int = 1, unroll: bool | None = None):
    """The jitted, data-parallel train step ``train_step(state, data) -> (state, StepMetrics)``.

    One update: draw the batch from ``fold_in(state.rng, state.step)`` (module docstring), the
    loss of ``config.method``, its gradient, clipping + Adam, the EMA update. ``data`` is the
    dict of device arrays of :func:`shard_data` (table sharded by image rows) or of
    :func:`prepare_data` (any placement, e.g. replicated); the state is replicated; the batch
    is sharded along the mesh's ``"data"`` axis, its rows fetched from the devices holding them
    (``_take_rows``), so the drawn batch is the same for every mesh and process layout.

    Args:
      config: the :class:`TrainConfig`.
      model_def: from :func:`create_train_state`.
      mesh: a mesh from :func:`make_mesh` (default: all devices).
      donate: donate the input state's buffers (the caller must not reuse the old state).
      num_images: images in the data set (default: the table's leading axis; needed for a padded
        :func:`shard_data` table).
      steps: updates per call (``TrainConfig.steps_per_call``): a ``lax.scan`` of the update,
        whose :class:`StepMetrics` fields then have a leading axis ``[steps]``; the updates
        are those of ``steps`` single calls (each draws its batch from its own step number), to
        float32 rounding.
      unroll: unroll that scan (``None``: on CPU only; ``TrainConfig.unroll_steps``).
    """
    mesh = make_mesh() if mesh is None else mesh
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size: expected a multiple of the number of devices ({mesh.size}), "
                         f"got {config.batch_size}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    step = _step_fn(config, model_def, mesh, num_images)
    if steps > 1:
        one, unrolled = step, resolve_unroll(mesh, unroll)

        def step(state, data):
            return jax.lax.scan(lambda s, _: one(s, data), state, None, length=steps, unroll=steps if unrolled else 1)
    repl = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(repl, None), out_shardings=(repl, repl),
                   donate_argnums=(0,) if donate else ())


#: The most updates per call that ``steps_per_call = 0`` picks on an accelerator: on one H100
#: the demo's U-Net at batch 8 took 11.4 / 4.2 / 3.0 ms per update at 1 / 5 / 25 updates per
#: call (ours; DDPM 12.8 / 4.8 / 2.9 ms; BUILD_NOTES, 2026-11-27).
AUTO_STEPS_PER_CALL = 25


def resolve_steps_per_call(config: TrainConfig, mesh: Mesh, *, evaluating: bool = False) -> int:
    """Updates per call of a :func:`train` run: ``config.steps_per_call`` if >= 1; for 0
    (automatic), 1 on CPU devices (where an unrolled call of 5 saves 5-16% of a step at 3x the
    compile time, and a loop is slower than single steps, :func:`resolve_unroll`) and on
    accelerators the largest divisor of the log, checkpoint and (``evaluating``) evaluation
    cadences up to :data:`AUTO_STEPS_PER_CALL`, so that every call between two boundaries has
    the same length."""
    if config.steps_per_call >= 1:
        return config.steps_per_call
    if _on_cpu(mesh):
        return 1
    g = math.gcd(*_cadences(config, evaluating))
    return max(d for d in range(1, AUTO_STEPS_PER_CALL + 1) if g % d == 0)


def _cadences(config: TrainConfig, evaluating: bool) -> list[int]:
    """The boundaries a call never crosses: every ``log_every``, ``checkpoint_every`` and, in a
    run with an evaluation callback, ``eval_every`` updates."""
    return [config.log_every, config.checkpoint_every] + ([config.eval_every] if evaluating and config.eval_every else [])


def resolve_unroll(mesh: Mesh, unroll: bool | None = None) -> bool:
    """Whether multi-step calls (``steps_per_call > 1``) on ``mesh`` are unrolled: ``unroll``
    (``TrainConfig.unroll_steps``) if given; for None, on CPU devices, where XLA runs
    convolution gradients inside a loop body 5-25x slower than outside (jax-ml/jax#12868;
    BUILD_NOTES), and not on accelerators."""
    return _on_cpu(mesh) if unroll is None else bool(unroll)


def _on_cpu(mesh: Mesh) -> bool:
    """Whether ``mesh`` is made of CPU devices (both defaults above depend on it)."""
    return mesh.devices.flat[0].platform == "cpu"


_COMPILED: dict = {}


def compile_train_step(config: TrainConfig, model_def: ModelDef, mesh: Mesh, state: TrainState, data: dict, *,
                       num_images: int | None = None, steps: int = 1, unroll: bool | None = None):
    """The train step of :func:`make_train_step` compiled ahead of time for these arguments.

    Cached per (config without run-control keys, model, mesh, shapes, ``steps``, unrolling), so
    repeated runs in one process compile once. The compiled step donates its input state.

    Returns:
      ``(compiled_step, compile_seconds)`` (0 seconds on a cache hit).
    """
    shapes = tuple((k, v.shape, str(v.dtype), str(getattr(getattr(v, "sharding", None), "spec", None)))
                   for k, v in sorted(data.items()))
    unroll = resolve_unroll(mesh, unroll) if steps > 1 else False
    key = (config._math_key(), model_def.unet, tuple(d.id for d in mesh.devices.flat), mesh.axis_names, shapes,
           str(jax.tree.structure(state)), num_images, steps, unroll)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    fn = make_train_step(config, model_def, mesh, donate=True, num_images=num_images, steps=steps,
                         unroll=unroll).lower(state, data).compile()
    sec = time.perf_counter() - t0
    if len(_COMPILED) > 8:
        _COMPILED.clear()
    _COMPILED[key] = fn
    return fn, sec


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _host(tree):
    """A numpy copy of a pytree; replicated arrays (also ones spanning several processes) are
    read from this process's first replica."""
    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:
                raise ValueError(f"state: expected replicated arrays, got one sharded as {a.sharding}")
            return np.asarray(a.addressable_data(0))
        return np.asarray(jax.device_get(a))
    return jax.tree.map(get, tree)


def _state_digest(state: TrainState) -> str:
    """sha256 over the state's leaves (dtype, shape and bytes, in pytree order)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(_host(state))[0]:
        a = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _run_record(config: TrainConfig, unet: UNetConfig, info: dict) -> dict:
    model = dataclasses.asdict(unet)
    return json.loads(json.dumps({"train": config.to_dict(), "model": model, "data": info}))


def _diff(stored: Any, given: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for k in sorted(set(stored) | set(given)):
            key = f"{prefix}.{k}" if prefix else k
            if k not in stored or k not in given:
                out.append(f"{key} (only in {'given' if k not in stored else 'stored'})")
            else:
                out.extend(_diff(stored[k], given[k], key))
        return out
    return [] if stored == given else [f"{prefix}: stored {_short(stored)}, given {_short(given)}"]


def _short(v: Any, limit: int = 70) -> str:
    s = json.dumps(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


#: ``model_overrides`` entries that equal :class:`UNetConfig`'s defaults (no preset sets them): a
#: run made with one of them resumes with a config without it, and the other way round (the
#: shipped configs gained ``dtype`` in the thirty-ninth session, for ``--config....dtype=bfloat16``).
_NEUTRAL_OVERRIDES = {"dtype": "float32", "param_dtype": "float32"}


def _check_record(workdir: str, stored: dict, given: dict) -> None:
    """Raise ValueError naming the keys (run-control keys excepted) where the records differ.

    A train key missing from ``stored`` (a run made before that key existed) counts as its
    default, which is the behaviour such runs had."""
    defaults = TrainConfig().to_dict()
    stored = {**stored, "train": {**{k: v for k, v in defaults.items() if k in given.get("train", {})},
                                  **stored.get("train", {})}}

    def strip(r):
        train = {k: v for k, v in r.get("train", {}).items() if k not in RUN_CONTROL_KEYS}
        if isinstance(train.get("model_overrides"), dict):  # a default dtype set or not: one model
            train["model_overrides"] = {k: v for k, v in train["model_overrides"].items()
                                        if (k, v) not in _NEUTRAL_OVERRIDES.items()}
        return {**r, "train": train}
    diffs = _diff(strip(stored), strip(given))
    if diffs:
        data = any(d.startswith("data.fingerprint") for d in diffs)
        raise ValueError(
            f"workdir: {workdir!r} holds a run with a different config; differing keys: " + "; ".join(diffs)
            + (" (data.fingerprint: the training data differ, another store or other images)" if data else "")
            + ". Use a new workdir, or the stored config (only " + ", ".join(sorted(RUN_CONTROL_KEYS))
            + " may change on resume).")


def check_new_seed(workdir: str | os.PathLike, config: "TrainConfig") -> None:
    """ValueError naming ``seed`` when a new run in ``workdir`` (no saved config) has a seed
    outside ``[0, 2**32)``: without x64 ``PRNGKey(2**32 + k)`` is ``PRNGKey(k)`` (another seed
    silently repeats one), and from ``2**63`` on it is an OverflowError. A run saved with such a
    seed still resumes: its config is read back through ``from_dict``, which does not bound it."""
    if not 0 <= config.seed < 2**32 and not os.path.exists(os.path.join(os.fspath(workdir), _CONFIG_FILE)):
        raise ValueError(f"seed: expected an int in [0, 2**32) for a new run (JAX's random keys keep 32 bits "
                         f"of it without x64), got {config.seed}")


def check_workdir(workdir: str | os.PathLike, config: "TrainConfig") -> None:
    """Refuse, before any work, a ``workdir`` whose run was made with another train config.

    :func:`train` checks the whole record (train config, model and data) once the data are
    known; this checks the train keys alone (run-control keys excepted, as there), so a caller
    that must prepare its data first (the train binary pre-computes the built-in photos' scores)
    can fail at once. No run there, or the same train config: returns None. Raises ValueError
    naming the differing keys, or for an unreadable ``config.json``."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    path = os.path.join(os.fspath(workdir), _CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            stored = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"workdir: {path!r} is not valid JSON ({err}); refusing to use this workdir") from err
    if not isinstance(stored, dict):
        raise ValueError(f"workdir: {path!r} does not hold a run record; refusing to use this workdir")
    _check_record(os.fspath(workdir), {"train": stored.get("train", {})}, {"train": config.to_dict()})


def _atomic_write(path: str, text: str) -> None:
    atomic_write_text(path, text, durable=True)


class _NoReadOnlyNote:
    """A logging filter for orbax's "Given directory is read only" warning: a reader opens the
    checkpoints read-only on purpose (every load_checkpoint printed it; a walkthrough)."""

    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


def _manager(ckpt_dir: str, *, read_only: bool, max_to_keep: int = 3) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a writer removes the half-written step of a killed save on opening.
    # A reader: no saving interval and no max_to_keep, which orbax would reset with a warning each.
    opts = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep, create=not read_only,
                                        read_only=read_only, save_interval_steps=0 if read_only else 1,
                                        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    if not read_only:
        return ocp.CheckpointManager(ckpt_dir, options=opts, item_names=("state", "config", "meta"))
    absl_logger = logging.get_absl_logger()
    absl_logger.addFilter(_NoReadOnlyNote)
    try:
        return ocp.CheckpointManager(ckpt_dir, options=opts, item_names=("state", "config", "meta"))
    finally:
        absl_logger.removeFilter(_NoReadOnlyNote)


def _abstract(state: TrainState, sharding) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def _restore(mngr: ocp.CheckpointManager, step: int, template: TrainState, sharding, where: str):
    """Restore and verify one step: (state, record, meta), or CheckpointError."""
    path = os.path.join(where, str(step))
    try:
        r = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template, sharding)),
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state, record, meta = r["state"], r["config"], r["meta"]
    except Exception as err:  # orbax / tensorstore raise many types for damaged files
        # orbax's reads in flight then report "Event loop is closed" as unraisable exceptions,
        # hundreds of tracebacks after this one line (a walkthrough, a truncated file)
        drop_closed_loop_reports()
        raise CheckpointError(
            f"checkpoint {path!r} cannot be restored ({type(err).__name__}: {' '.join(str(err).split())[:300]}). "
            "Nothing was changed on disk; move this step directory away to resume from an earlier "
            "checkpoint, or use a new workdir.") from err
    if not isinstance(meta, dict) or "sha256" not in meta or not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path!r} is incomplete (no meta/config); nothing was changed on disk")
    state = TrainState(*state) if not isinstance(state, TrainState) else state
    digest = _state_digest(state)
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt: the sha256 of its state ({digest[:16]}...) differs from the one "
            f"recorded when it was saved ({meta['sha256'][:16]}...). Nothing was changed on disk; move this step "
            "directory away to resume from an earlier checkpoint.")
    if int(state.step) != step:
        raise CheckpointError(f"checkpoint {path!r} holds step {int(state.step)}, not {step}")
    return state, record, meta


def _save_failure(ckpt_dir: str, step: int, last_saved: int, err: BaseException) -> str:
    """The message of a checkpoint that could not be written: the cause (a full disk named as
    such), the last complete checkpoint, and how to go on."""
    cause, full = write_failure_cause(err)
    last = (f"the last complete checkpoint is step {last_saved}, and the same call again resumes from it"
            if last_saved >= 0 else "there is no complete checkpoint yet; the same call again starts afresh")
    return (f"checkpoint of step {step} could not be written to {ckpt_dir!r}: {cause}. The earlier ones are "
            f"intact: {last}" + (" once space is freed (a smaller TrainConfig.max_to_keep keeps fewer "
                                   "checkpoints)" if full else "") + ".")


def _save(mngr, state: TrainState, record: dict, meta: dict) -> int:
    # A host copy of the replicated state (this process's replica): orbax writes numpy arrays
    # several times faster than replicated device arrays, and treats them as replicated: with
    # several processes every process calls save and process 0 writes the files.
    host = _host(state)
    step = int(host.step)
    meta = dict(meta, sha256=_state_digest(host), step=step, saved_unix=time.time())
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host), config=ocp.args.JsonSave(record),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
    return step


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
      state: the final :class:`TrainState` (replicated on the mesh).
      model_def: the :class:`ModelDef`.
      step: updates done in total.
      stop_reason: ``"num_steps"``, ``"budget"`` or ``"target"``.
      resumed_from: the checkpoint step the run resumed from, or None.
      train_seconds: training time of the whole run (all segments; compile, evaluation and
        checkpoint time excluded).
      compile_seconds: compile time of this segment (0 when the step was cached).
      eval_seconds, checkpoint_seconds: time in evaluation / checkpoint writing (this segment).
      wall_seconds: wall time of this call of :func:`train`.
      time_to_target: ``train_seconds`` when the target was reached, else None.
      step_at_target: the step at which it was reached, else None.
      last_eval: the last evaluation dict (or None).
      last_loss: the mean loss over the last logging window (or None).
      last_loss_step: the step that window ended at (a run stopped by its time budget or a
        target between two log steps ends after it), or None.
      steps_per_call: the updates per call this segment used (``TrainConfig.steps_per_call``
        resolved, :func:`resolve_steps_per_call`).
    """

    state: TrainState
    model_def: ModelDef
    step: int
    stop_reason: str
    resumed_from: int | None
    train_seconds: float
    compile_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    wall_seconds: float
    time_to_target: float | None = None
    step_at_target: int | None = None
    last_eval: dict | None = None
    last_loss: float | None = None
    steps_per_call: int = 1
    last_loss_step: int | None = None


_MODEL_FNS: dict = {}


def _eval_fn_for(model_def: ModelDef, params, config: TrainConfig):
    """The user-facing function (``score_fn`` or ``eps_fn``) of given parameters.

    It is a :class:`jax.tree_util.Partial` of one function per model and method (cached here)
    with ``params`` as its pytree leaves. Called directly it runs the jitted network; passed as
    an argument to a jitted sampler (``jax.jit(lambda fn, x: sampler(fn, x))``), it makes the
    parameters an input of the compiled program instead of constants baked into it, so the
    program is compiled once for every parameter set of the same model (every evaluation of a
    training run, experiments.denoise) instead of once per set.
    """
    key = (model_def.unet, config.scale_by_sigma, config.sde, config.sde_kwargs, config.method,
           config.ddpm_num_steps)
    if key not in _MODEL_FNS:
        if len(_MODEL_FNS) > 8:
            _MODEL_FNS.clear()
        _MODEL_FNS[key] = _model_fn(model_def, config)
    return jax.tree_util.Partial(_MODEL_FNS[key], params)


def _model_fn(model_def: ModelDef, config: TrainConfig) -> Callable:
    """``fn(params, x, t_or_i, idx=None)``: the network of ``model_def`` as the score (ours) or
    the epsilon prediction (DDPM), jitted; inputs and output in :func:`_compute_dtype`."""
    dtype = _compute_dtype(model_def.unet)
    as_score = _score_of(config)
    apply = jax.jit(lambda p, x, t, idx: as_score(_apply(model_def, p, x, t, idx, train=False), t))
    ddpm_steps = config.ddpm_num_steps

    if config.method == "ours":
        def score_fn(params, x, t, idx=None):
            """``s_theta(x [B, C, H, W], t [B]) -> [B, C, H, W]`` (``idx [B]`` for per-image offsets)."""
            x = check_images("x", x, finite=False)  # (an int x gave an int, truncated score)
            idx = _idx_for(model_def, x, idx)
            t = jnp.broadcast_to(_check_per_image("t", t, x, "times"), (x.shape[0],)).astype(x.dtype)
            return apply(params, x.astype(dtype), t.astype(dtype), idx).astype(x.dtype)
        return score_fn

    def eps_fn(params, x, i, idx=None):
        """``eps_theta(x [B, C, H, W] in [-1, 1], i [B] int step index) -> [B, C, H, W]``."""
        x = check_images("x", x, finite=False)  # (an int x gave an int, truncated score)
        idx = _idx_for(model_def, x, idx)
        i = _check_per_image("i", i, x, "step indices", integer=True, upper=(ddpm_steps, "ddpm_num_steps"))
        t = jnp.broadcast_to(i, (x.shape[0],)).astype(dtype) / ddpm_steps
        return apply(params, x.astype(dtype), t, idx).astype(x.dtype)
    return eps_fn


def _check_per_image(name: str, v, x, what: str, *, integer: bool = False, upper=None) -> jax.Array:
    """A loaded model's per-image argument: a scalar, shape ``[1]`` or ``[B]`` (another length named,
    instead of a broadcast error), integer where ``integer``, and, for concrete values, in
    ``[0, upper[0])``."""
    v = jnp.asarray(v)
    if v.shape not in ((), (1,), (x.shape[0],)):  # (1,) broadcasts, as it always did
        raise ValueError(f"{name}: expected a scalar or shape [B] = ({x.shape[0]},) of {what}, got shape {tuple(v.shape)}")
    if integer and not jnp.issubdtype(v.dtype, jnp.integer):
        raise TypeError(f"{name}: expected integer {what}, got dtype {v.dtype}")
    if upper is not None and is_concrete(v) and v.size:
        a = np.asarray(v)  # numpy: a concrete array closed over inside a trace (a sampler's scan) too
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= upper[0]:
            raise ValueError(f"{name}: expected {what} in [0, {upper[1]}={upper[0]}), got values in [{lo}, {hi}]")
    return v


def _idx_for(model_def: ModelDef, x, idx):
    if not model_def.unet.per_image_offset:
        return None  # ignored, as the U-Net does
    if idx is None:
        raise ValueError("idx: required ([B] int image indices) for a model trained with per_image_offset")
    idx = _check_per_image("idx", idx, x, "image indices", integer=True,
                           upper=(model_def.unet.num_images, "num_images"))
    return jnp.broadcast_to(idx.astype(jnp.int32), (x.shape[0],))


def _from_process_0(value: int) -> int:
    """Process 0's ``value`` on every process (so all processes take the same decision); the
    value itself with one process."""
    return int(process_values(value)[0, 0])


def _agree(budget_hit: bool, interrupted: bool) -> tuple[bool, bool]:
    """``(process 0's budget_hit, whether any process was interrupted)``, the same on every
    process (one collective per call); the values themselves with one process. An interrupt of
    one process (a node's SIGTERM) then stops every process after the same update, where they
    save the checkpoint together (a save is collective); alone it left the others blocked in the
    next all-reduce until JAX's timeout aborted them, with no checkpoint (a walkthrough,
    2026-12-07)."""
    flags = process_values(budget_hit, interrupted)
    return bool(flags[0, 0]), bool(flags[:, 1].any())


class _AgreedInterrupt(KeyboardInterrupt):
    """Every process of the job stops after the same update (:func:`_agree`): the checkpoint,
    collective, can be saved."""


#: A signal handler with this attribute set true asks :func:`train` to defer that signal like
#: Ctrl-C while it trains (``experiment_utils.sigterm_as_interrupt`` sets it on its SIGTERM handler).
DEFER_IN_TRAIN = "defer_in_train"


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) during :func:`train`: the update in flight and its records finish, then
    ``KeyboardInterrupt`` is raised at the next step boundary (where the handler saves that step).
    A second SIGINT, or one during an evaluation (``immediate()``), interrupts at once. Installed
    only from the main thread over Python's default handler; otherwise SIGINT is left alone
    (ignored, as in a job started with ``&``, or the caller's own handler). SIGTERM is deferred
    the same way when its handler asks for it (:data:`DEFER_IN_TRAIN`), whatever SIGINT's state."""

    def __init__(self):
        self.pending = False
        self._immediate = False
        self._hold_off = False
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        h = signal.getsignal(signal.SIGINT)
        # Python's own handler, or experiment_utils' stand-in for it (sigterm_as_interrupt)
        if h is signal.default_int_handler or getattr(h, DEFER_IN_TRAIN, False):
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        if getattr(signal.getsignal(signal.SIGTERM), DEFER_IN_TRAIN, False):
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        if _SWALLOWED:  # an interrupt before training that Python could not raise: stop at the first boundary
            _SWALLOWED.clear()
            self.pending = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame):
        if self._hold_off:
            logging.warning("interrupt: the processes are saving the checkpoint they agreed on; the run ends then")
            return
        if self._immediate or self.pending:
            self.pending = True  # raised inside a gc callback, Python would print it and run on
            raise KeyboardInterrupt
        self.pending = True
        logging.warning("interrupt: stopping after the update in flight and saving a checkpoint "
                        "(interrupt again to stop at once)")

    @contextlib.contextmanager
    def holding_off(self, on: bool = True):
        """A stretch no interrupt may cut short (the processes' collective checkpoint)."""
        self._hold_off = on
        try:
            yield
        finally:
            self._hold_off = False

    @contextlib.contextmanager
    def immediate(self):
        """A stretch where an interrupt may land at once (the state and its records agree)."""
        self._immediate = True
        try:
            yield
        finally:
            self._immediate = False

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt


# "interrupted in" names the run's frame, not the handler or the check that raised
_INTERRUPT_CHECKS.update({_DeferredInterrupt._handle.__code__, _DeferredInterrupt.check.__code__})


def _rewrite_metrics(path: str, keep_upto: int, aside_from: int | None = None) -> set[int]:
    """Drop records of steps after ``keep_upto`` (written by a killed segment) before resuming.
    With no checkpoint (``keep_upto`` 0) and records reaching ``aside_from`` (a step that had a
    checkpoint: the run's ``checkpoint_every``), the file is first copied to
    ``metrics.jsonl.orphaned`` (``.orphaned2``, ...): the checkpoints were lost, and those records
    are all that is left of that run. A run killed before its first checkpoint leaves no copy.

    Returns:
      the steps of the evaluation records kept.
    """
    if not os.path.exists(path):
        return set()
    kept, evals, dropped = [], set(), 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line of a killed run
            if int(rec.get("step", 0)) <= keep_upto:
                kept.append(json.dumps(rec))
                if rec.get("kind") == "eval":
                    evals.add(int(rec["step"]))
            else:
                dropped = max(dropped, int(rec.get("step", 0)))
    if keep_upto == 0 and dropped and aside_from is not None and dropped >= aside_from:
        # (the checkpoints emptied: it restarted without a word and dropped the records; walkthroughs)
        aside, k = f"{path}.orphaned", 1
        while os.path.exists(aside):
            k += 1
            aside = f"{path}.orphaned{k}"
        with open(path) as f:
            _atomic_write(aside, f.read())
        logging.warning("%s: records up to step %d, but no checkpoint to resume from: training starts again "
                        "from step 0; those records are moved to %s", path, dropped, aside)
    _atomic_write(path, "".join(s + "\n" for s in kept))
    return evals


def train(config, data, workdir: str | os.PathLike, *, eval_fn: Callable | None = None,
          target: float | None = None, mesh: Mesh | None = None) -> TrainResult:
    """Train (or resume training) a score model or the DDPM baseline.

    Resumes from the latest checkpoint in ``workdir/checkpoints`` if there is one; the continued
    run is identical to an uninterrupted one (same params, optimiser state and step). Stops at
    ``config.num_steps`` updates, when the training time reaches ``config.budget_seconds``, or
    when ``eval_fn``'s ``config.target_metric`` reaches ``target``; a checkpoint is saved every
    ``config.checkpoint_every`` updates and at the stop.

    A resumed run evaluates its checkpoint's step first when that evaluation was due and has no
    record (killed during it), or when ``target`` is set and that step was evaluated (it may have
    stopped there); a rerun of a finished run calls ``eval_fn`` again at its last step (its
    callers read the outputs) without a second record. Ctrl-C (SIGINT, from the main thread) lets
    the update in flight finish with its records, saves a checkpoint of that step and raises
    ``KeyboardInterrupt``; a second Ctrl-C, or one during an evaluation, stops at once.
    SIGTERM (``kill``, ``timeout``, a scheduler's preemption) is Python's default: the process
    ends at once, and a rerun resumes from the last periodic checkpoint. To have SIGTERM
    checkpoint like Ctrl-C, as the binaries do, call
    ``krylovjax.experiment_utils.sigterm_as_interrupt()`` once before ``train``.

    Args:
      config: :class:`TrainConfig` (or a dict / ConfigDict of its fields).
      data: see :func:`prepare_data` (``"ours"``: :class:`Trajectories` ``x [B, N, C, H, W]``,
        ``t [N]``, or a ScoreStore; ``"ddpm"``: images ``[B, C, H, W]`` in [0, 1], or a
        ScoreStore's images).
      workdir: the run directory (created if missing).
      eval_fn: optional ``eval_fn(fn, step) -> dict[str, float]`` called every
        ``config.eval_every`` updates and at the end, with ``fn`` the EMA model as returned by
        :func:`load_score_fn` (``score_fn(x, t, idx=None)`` or ``eps_fn(x, i, idx=None)``).
      target: stop once ``eval_fn(...)[config.target_metric] >= target``; in (0, 1] (an SSIM).
      mesh: a :func:`make_mesh` mesh (default: all devices of all processes).

    Multi-process (after ``jax.distributed.initialize()``): every process calls :func:`train`
    with the same arguments (``data`` may be a ScoreStore, or arrays of which each process reads
    only its rows, :func:`shard_data`); the mesh must span all processes. Every process saves
    and restores the checkpoints (orbax writes from process 0); only process 0 writes
    ``config.json``, ``metrics.jsonl`` and the progress bar; stops (budget, target) are decided
    by process 0 and shared; ``eval_fn`` runs on every process with a process-local copy of the
    EMA weights. The result equals a one-process run on as many devices (to float rounding of
    the cross-process gradient all-reduce).

    Returns:
      :class:`TrainResult`.

    Raises:
      ValueError: bad config or data, ``batch_size`` not divisible by the device count, images
        that do not fit the model, ``target`` outside (0, 1] or without ``eval_fn``, or a
        ``workdir`` holding a run with another config or other data (the keys are named).
      CheckpointError: the latest checkpoint cannot be restored or fails its checksum (nothing on
        disk is changed).
      WorkdirBusyError: another run holds ``workdir`` (:mod:`krylovjax.workdir_lock`; nothing
        there is changed).
    """
    with workdir_lock.hold_in_every_process(workdir):
        return _train(config, data, workdir, eval_fn=eval_fn, target=target, mesh=mesh)


def _train(config, data, workdir, *, eval_fn, target, mesh) -> TrainResult:
    """:func:`train` holding ``workdir``."""
    wall0 = time.perf_counter()
    # The config, the data and the run already in workdir are the user's input: a ValueError or
    # TypeError found here is marked as such (checking_arguments; unchanged for a library caller),
    # and the binaries end with its one line instead of a traceback.
    with checking_arguments():
        config = TrainConfig.from_dict(config)
        if target is not None:
            if not (is_real(target) and math.isfinite(target) and 0.0 < target <= 1.0):
                raise ValueError(f"target: expected a value in (0, 1] (e.g. an SSIM), got {target!r}")
            if eval_fn is None:
                raise ValueError("target: needs an eval_fn returning the target metric")
            if config.eval_every < 1:
                raise ValueError("eval_every: must be >= 1 when a target is given")
        if eval_fn is not None and not callable(eval_fn):
            raise ValueError(f"eval_fn: expected a callable eval_fn(fn, step) -> dict, got {type(eval_fn).__name__}")
        check_new_seed(workdir, config)
        mesh = check_mesh(config, mesh)
        nproc, primary = jax.process_count(), jax.process_index() == 0
        sharded = shard_data(config, data, mesh)
        info = sharded.info
        unet = model_config(config, tuple(info["sample_shape"]), info["num_images"])
        record = _run_record(config, unet, info)

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.abspath(os.path.join(workdir, _CKPT_DIR))
    cfg_path = os.path.join(workdir, _CONFIG_FILE)
    metrics_path = os.path.join(workdir, _METRICS_FILE)
    if os.path.exists(cfg_path):
        with open(cfg_path) as f, checking_arguments():
            try:
                stored = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"workdir: {cfg_path!r} is not valid JSON ({err}); refusing to use this workdir") from err
            _check_record(workdir, stored, record)
    fresh, model_def = create_train_state(config, tuple(info["sample_shape"]), num_images=info["num_images"])

    repl = NamedSharding(mesh, P())
    state = None
    resumed_from = None
    prior_seconds = 0.0
    latest = None
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        reader = _manager(ckpt_dir, read_only=True)
        latest = reader.latest_step()
        reader.close()
    latest = _from_process_0(-1 if latest is None else latest)  # all processes resume alike
    latest = None if latest < 0 else latest
    if latest is not None:
        reader = _manager(ckpt_dir, read_only=True)
        try:
            state, stored_record, meta = _restore(reader, latest, fresh, repl, ckpt_dir)
        finally:
            reader.close()
        with checking_arguments():
            _check_record(workdir, stored_record, record)
        resumed_from = latest
        prior_seconds = float(meta.get("train_seconds", 0.0))
    if primary and not os.path.exists(cfg_path):
        _atomic_write(cfg_path, json.dumps(record, indent=1, sort_keys=True))
    recorded_evals: set[int] = set()  # steps whose evaluation record is in metrics.jsonl (process 0)
    if state is None:
        state = jax.device_put(fresh, repl)
        if primary and os.path.exists(metrics_path):
            _rewrite_metrics(metrics_path, 0, aside_from=config.checkpoint_every)
    else:
        if primary:
            recorded_evals = _rewrite_metrics(metrics_path, resumed_from)
        logging.info("resuming %s from step %d", workdir, resumed_from)
        if primary and resumed_from > config.num_steps:  # (returned without a word; a walkthrough, 2026-12-07)
            logging.warning("%s: its checkpoint is at step %d, past num_steps=%d: nothing to train, and the "
                            "result is that step's (load_checkpoint(step=...) reads an earlier one)",
                            workdir, resumed_from, config.num_steps)
    del fresh
    dev_data = sharded.arrays
    step = int(_host(state.step))
    evaluating = eval_fn is not None and config.eval_every > 0
    k_call = resolve_steps_per_call(config, mesh, evaluating=evaluating)
    cadences = _cadences(config, evaluating)
    use_chunk = k_call > 1 and min(cadences) >= k_call and config.num_steps - step >= k_call
    if k_call > 1 and min(cadences) < k_call:
        logging.warning("steps_per_call=%d: no call of that many updates fits between the log, checkpoint and "
                        "evaluation boundaries (every %s updates); one update per call", k_call, sorted(set(cadences)))

    def call_length(at: int) -> int:
        """Updates of the next call: ``k_call`` unless that would cross a log, checkpoint,
        evaluation or ``num_steps`` boundary (a function of the step and the config alone, so a
        resumed run makes the same calls as an uninterrupted one)."""
        if not use_chunk:
            return 1
        room = min([config.num_steps - at] + [c - at % c for c in cadences])
        return k_call if room >= k_call else 1

    at, single_needed = step, not use_chunk  # compile only the programs the calls to num_steps use
    while use_chunk and at < config.num_steps and not single_needed:
        n = call_length(at)
        single_needed, at = n == 1, at + n
    step_fn = chunk_fn = None
    compile_seconds = 0.0
    if single_needed:
        step_fn, compile_seconds = compile_train_step(config, model_def, mesh, state, dev_data,
                                                      num_images=info["num_images"])
    if use_chunk:
        chunk_fn, sec = compile_train_step(config, model_def, mesh, state, dev_data, num_images=info["num_images"],
                                           steps=k_call, unroll=config.unroll_steps)
        compile_seconds += sec
    writer = _manager(ckpt_dir, read_only=False, max_to_keep=config.max_to_keep)

    if primary:
        for note in (model_def.unet.attention_note(), model_def.unet.unused_attention_note()):
            if note:
                logging.warning("model: %s", note)
        per_call = k_call if use_chunk else 1  # (calls of k_call updates only where they fit the cadences)
        logging.info("training %s on %d device%s (%s), %s update%s per call, %s compute, from step %d to %d",
                     config.method, mesh.size, "s" if mesh.size != 1 else "",
                     f"data parallel: the batch of {config.batch_size} split {mesh.size} ways" if mesh.size > 1 else
                     "no data parallelism", f"up to {per_call}" if per_call > 1 else "1",
                     "s" if per_call != 1 else "", model_def.unet.dtype, step, config.num_steps)
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "kind": "start", "resumed_from": resumed_from,
                                "compile_seconds": compile_seconds, "num_devices": mesh.size,
                                "num_processes": nproc, "data_rows": sharded.rows_per_process,
                                "steps_per_call": k_call, "compute_dtype": model_def.unet.dtype,
                                "train_seconds": prior_seconds}) + "\n")
    train_seconds = prior_seconds
    eval_seconds = ckpt_seconds = 0.0
    stop_reason = "num_steps"
    time_to_target = step_at_target = None
    last_eval = last_loss = last_loss_step = None
    last_saved = step if resumed_from is not None else -1
    last_eval_step = -1
    win_loss, win_steps, win_time = [], 0, 0.0
    meta_base = {"data_fingerprint": info["fingerprint"]}

    def save():
        nonlocal ckpt_seconds, last_saved
        t0 = time.perf_counter()
        try:
            last_saved = _save(writer, state, record, dict(meta_base, train_seconds=train_seconds))
        except Exception as err:  # orbax / tensorstore raise many types (a full disk: ValueError)
            with contextlib.suppress(Exception):
                writer.close()  # its background threads finish before the error goes up
            raise CheckpointError(_save_failure(ckpt_dir, step, last_saved, err)) from err
        ckpt_seconds += time.perf_counter() - t0

    interrupts = _DeferredInterrupt()

    def evaluate():
        if nproc > 1:  # every process evaluates at the same steps: agree, as at each call
            if _agree(False, interrupts.pending)[1]:
                raise _AgreedInterrupt
            return _evaluate()  # (not at once: one process leaving would block the others)
        interrupts.check()  # an interrupt while saving: stop before the evaluation
        with interrupts.immediate():  # an evaluation may be long: Ctrl-C stops it at once
            return _evaluate()

    def _evaluate():
        nonlocal eval_seconds, last_eval, last_eval_step, time_to_target, step_at_target
        t0 = time.perf_counter()
        ema = state.ema_params if nproc == 1 else _host(state.ema_params)  # process-local copy
        fn = _eval_fn_for(model_def, ema, config)
        out = eval_fn(fn, step)
        if not isinstance(out, Mapping):
            raise ValueError(f"eval_fn: expected a dict of metrics, got {type(out).__name__}")
        out = {str(k): float(v) for k, v in out.items()}
        eval_seconds += time.perf_counter() - t0
        last_eval, last_eval_step = out, step
        if primary and step not in recorded_evals:  # a resumed run redoes an evaluation it has recorded
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "kind": "eval", **out, "train_seconds": train_seconds}) + "\n")
            recorded_evals.add(step)
        if target is not None:
            if config.target_metric not in out:
                raise ValueError(f"target_metric: eval_fn returned {sorted(out)}, without {config.target_metric!r}")
            # a non-finite metric (a failed sample) reaches nothing, as in first_reaching
            v = out[config.target_metric]
            if _from_process_0(int(math.isfinite(v) and v >= target)):
                time_to_target, step_at_target = train_seconds, step
                return True
        return False

    bar = None
    if config.progress and primary:
        from krylovjax.experiment_utils import progress_bar

        bar = progress_bar(total=config.num_steps, initial=step, desc=f"train[{config.method}]"
                           + (f" (budget {config.budget_seconds:g} s)" if config.budget_seconds is not None else ""))
    first_step = step  # this call's rate for the budget's bar: (step - first_step) / (train_seconds - prior_seconds)
    # A resumed run first evaluates its checkpoint's step when that evaluation was due but has no
    # record (the earlier run was killed between the save and the evaluation's end), or when a
    # target is set and the earlier run evaluated this step (it may have stopped there at the
    # target): the resumed run then takes the decisions of an uninterrupted one.
    redo_eval = resumed_from is not None and eval_fn is not None and _from_process_0(int(
        (bool(config.eval_every) and step % config.eval_every == 0 and step not in recorded_evals)
        or (target is not None and step in recorded_evals)))
    try:
        interrupts.install()
        if redo_eval and evaluate():
            stop_reason = "target"
        while step < config.num_steps and stop_reason != "target":
            # process 0's clock decides the budget; any process's interrupt stops all of them here
            budget_hit, stop_all = _agree(
                config.budget_seconds is not None and train_seconds >= config.budget_seconds, interrupts.pending)
            if stop_all:
                if not interrupts.pending:
                    logging.warning("another process of the job was interrupted: stopping after update %d and "
                                    "saving a checkpoint", step)
                raise _AgreedInterrupt
            if budget_hit:
                stop_reason = "budget"
                break
            n = call_length(step)
            t0 = time.perf_counter()
            state, m = (chunk_fn if n > 1 else step_fn)(state, dev_data)
            losses = np.asarray(m.loss, np.float64).reshape(-1)  # blocks: the time is the run's, not the dispatch's
            dt = time.perf_counter() - t0
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                raise NonFiniteLossError(f"loss is {losses[bad[0]]} at step {step + bad[0] + 1} (not checkpointed); "
                                         "lower lr or check the data")
            step += n
            train_seconds += dt
            win_loss.extend(losses.tolist())
            win_steps += n
            win_time += dt
            if bar is not None:
                if config.budget_seconds is not None:
                    # The budget stops the run first when its rate reaches it before num_steps:
                    # then the bar's end is the budget's step (a walkthrough saw an ETA of 57 hours
                    # from the step cap of a 300 s run), re-estimated from this call's rate.
                    per_second = (step - first_step) / max(train_seconds - prior_seconds, 1e-12)
                    left = max(config.budget_seconds - train_seconds, 0.0) * per_second
                    bar.total = min(config.num_steps, step + max(int(math.ceil(left)), 1))
                bar.update(n)
            if step % config.log_every == 0 or step == config.num_steps:
                last_loss, last_loss_step = float(np.mean(win_loss)), step
                # loss_steps: the updates the loss averages (fewer than log_every in the first
                # window after a resume from a checkpoint between log steps; a walkthrough took
                # such a record for the uninterrupted run's, 2026-12-07)
                rec = {"step": step, "kind": "train", "loss": last_loss, "loss_steps": len(win_loss),
                       "images_per_s": config.batch_size * win_steps / max(win_time, 1e-12),
                       "lr": float(np.asarray(m.lr).reshape(-1)[-1]),
                       "grad_norm": float(np.asarray(m.grad_norm).reshape(-1)[-1]), "train_seconds": train_seconds}
                if primary:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4g}", refresh=False)
                win_loss, win_steps, win_time = [], 0, 0.0
            if step % config.checkpoint_every == 0:
                save()
            if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
                if evaluate():
                    stop_reason = "target"
                    break
        if _agree(False, interrupts.pending)[1]:
            raise _AgreedInterrupt
        if eval_fn is not None and last_eval_step != step and stop_reason != "target":
            if evaluate() and target is not None:
                stop_reason = "target"
            if nproc == 1:  # an interrupt the final evaluation's code swallowed (it came in a gc callback)
                interrupts.check()
    except KeyboardInterrupt as interrupt:
        _SWALLOWED.clear()  # acted on: a later train() in this process starts clean
        try:  # the state may be mid-update (its buffers donated to a step in flight)
            if nproc > 1 and not isinstance(interrupt, _AgreedInterrupt):  # a save is collective
                raise RuntimeError("several processes, interrupted at once (a second interrupt, or during an "
                                   "evaluation): only the processes' agreed stop saves a checkpoint")
            at = int(_host(state.step))
            if at != step:  # the interrupt fell between an update and its bookkeeping (records, time)
                raise RuntimeError(f"interrupted between update {at} and its records; the resume point "
                                   "stays " + (f"the checkpoint of step {last_saved}" if last_saved >= 0
                                               else "the start (no checkpoint yet)"))
            if at != last_saved:
                with interrupts.holding_off(nproc > 1):  # the processes save together: no one may leave
                    save()
        except Exception as err:  # noqa: BLE001 - keep the interrupt as the error
            logging.warning("no checkpoint at the interrupt (%s: %s)", type(err).__name__, err)
        if isinstance(interrupt, _AgreedInterrupt):
            # out of train() as a plain KeyboardInterrupt: Python ends an uncaught one with the
            # SIGINT status (130), but a subclass with status 1 (a walkthrough's script, 2026-12-07)
            raise KeyboardInterrupt(*interrupt.args).with_traceback(interrupt.__traceback__) from None
        raise
    finally:
        interrupts.restore()
        if bar is not None:
            if stop_reason == "budget":  # the budget's end is the bar's: full at the last update
                bar.total = step
                bar.refresh()
            bar.close()
    if last_saved != step:
        save()
    writer.close()
    return TrainResult(state=state, model_def=model_def, step=step, stop_reason=stop_reason,
                       resumed_from=resumed_from, train_seconds=train_seconds, compile_seconds=compile_seconds,
                       eval_seconds=eval_seconds, checkpoint_seconds=ckpt_seconds,
                       wall_seconds=time.perf_counter() - wall0, time_to_target=time_to_target,
                       step_at_target=step_at_target, last_eval=last_eval, last_loss=last_loss,
                       steps_per_call=k_call, last_loss_step=last_loss_step)


# ----------------------------------------------------------------------------------------------
# Loading trained models
# ----------------------------------------------------------------------------------------------


class LoadedCheckpoint(NamedTuple):
    """A restored checkpoint: state, model definition, train config, run record, meta."""

    state: TrainState
    model_def: ModelDef
    config: TrainConfig
    record: dict
    meta: dict


def load_checkpoint(workdir: str | os.PathLike, *, step: int | None = None) -> LoadedCheckpoint:
    """Restore (and verify) a checkpoint of ``workdir`` (the latest unless ``step`` is given).

    Raises:
      FileNotFoundError: ``workdir`` has no checkpoint (or not ``step``).
      CheckpointError: the checkpoint cannot be restored or fails its checksum.
    """
    workdir = os.fspath(workdir)
    ckpt_dir = os.path.abspath(os.path.join(workdir, _CKPT_DIR))
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"workdir: {workdir!r} has no checkpoints directory ({ckpt_dir!r})")
    # A training run writing this directory deletes its older checkpoints (max_to_keep) and can
    # do so between the listing and the reading: the latest is then listed again (a walkthrough:
    # sampling from a run in progress failed with "move this step directory away").
    for _ in range(_LOAD_ATTEMPTS):
        reader = _manager(ckpt_dir, read_only=True)
        try:
            steps = reader.all_steps()
            if not steps:
                raise FileNotFoundError(f"workdir: {ckpt_dir!r} holds no complete checkpoint")
            chosen = max(steps) if step is None else step
            if chosen not in steps:
                raise FileNotFoundError(f"step: no checkpoint for step {step} in {ckpt_dir!r} (have {sorted(steps)})")
            try:
                return _load_step(reader, ckpt_dir, chosen)
            except Exception as err:
                if os.path.isdir(os.path.join(ckpt_dir, str(chosen))):
                    earlier = sorted(s for s in steps if s < chosen)
                    if isinstance(err, CheckpointError) and earlier:  # a reader need not move anything
                        raise CheckpointError(f"{err} Or read an earlier checkpoint: give its step (generate's and "
                                              f"restore's --step), one of {earlier}.") from err
                    raise
                if step is not None:
                    raise FileNotFoundError(
                        f"step: checkpoint {step} of {ckpt_dir!r} was deleted while it was read (a training run "
                        f"writing there keeps its last max_to_keep checkpoints); have {sorted(reader.all_steps(read=True))}"
                    ) from err
        finally:
            reader.close()
    raise CheckpointError(f"workdir: the latest checkpoint of {ckpt_dir!r} was deleted while it was read, "
                          f"{_LOAD_ATTEMPTS} times (a training run writing there keeps only its last max_to_keep); "
                          "try again, or give --step of a checkpoint it keeps")


#: Listings of a checkpoint directory :func:`load_checkpoint` tries while a training run deletes
#: the checkpoint it chose.
_LOAD_ATTEMPTS = 5


def _load_step(reader, ckpt_dir: str, step: int) -> LoadedCheckpoint:
    """Checkpoint ``step`` through ``reader``: its config, then the verified state."""
    try:
        record = reader.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        cfg = TrainConfig.from_dict(record["train"])
        info = record["data"]
    except Exception as err:
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, str(step))!r}: cannot read its config "
                              f"({type(err).__name__}: {err})") from err
    template, model_def = create_train_state(cfg, tuple(info["sample_shape"]), num_images=info["num_images"])
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state, record, meta = _restore(reader, step, template, sharding, ckpt_dir)
    return LoadedCheckpoint(state, model_def, cfg, record, meta)


def load_score_fn(workdir: str | os.PathLike, *, step: int | None = None,
                  compute_dtype: str | None = None) -> Callable:
    """The trained model (EMA weights) of ``workdir`` as a function for the samplers.

    * ``method="ours"``: ``score_fn(x [B, C, H, W], t [B] or scalar, idx=None) -> [B, C, H, W]``,
      the score ``s_theta`` for :mod:`krylovjax.sampling` (``idx [B]`` image indices are required
      when the run used ``per_image_offset``; close over them for the samplers).
    * ``method="ddpm"``: ``eps_fn(x [B, C, H, W] in [-1, 1], i [B] int step index, idx=None)``
      for :mod:`krylovjax.ddpm` samplers (``x = 2 * image - 1``).

    The network is jitted; its convolutions and matmuls compute in the model's ``dtype`` (e.g.
    bfloat16, ``model_overrides``), its inputs, normalisations and output in float32 (or
    ``param_dtype`` if wider), and it returns ``x``'s dtype. A bfloat16 model's score is
    rounded to about 4e-3, above the probability-flow ODE's default tolerance 1e-3, so the
    adaptive solver's step count depends on the compute dtype, in either direction: one
    bfloat16-trained model denoising at noise 0.05 / 0.1 / 0.2 took 26 / 26 / 32 network calls
    in bfloat16 and 20 / 32 / 44 in float32, PSNR within 0.7 dB (BUILD_NOTES).
    ``compute_dtype`` (e.g. ``"float32"`` for a model trained in bfloat16, or ``"bfloat16"``
    for a float32 one on an accelerator) evaluates the same weights in another compute dtype:
    the parameters' dtype does not depend on it, so any run's weights load into any compute
    dtype. None: the training's.
    ``fn`` is a :class:`jax.tree_util.Partial` with the weights as its leaves: a jitted sampler
    that takes it as an argument is compiled once for any weights of the same model.
    Attributes ``fn.config`` (:class:`TrainConfig`, as trained), ``fn.step``, ``fn.model_def``
    (its ``unet.dtype`` the compute dtype evaluated in) and ``fn.trained_dtype`` (the training's
    compute dtype) are set.
    """
    if compute_dtype is not None:  # checked before the checkpoint is read
        compute_dtype = _dtype_name(compute_dtype, "compute_dtype")
    ck = load_checkpoint(workdir, step=step)
    trained_dtype = ck.model_def.unet.dtype
    if compute_dtype is not None and compute_dtype != trained_dtype:
        ck = ck._replace(model_def=_with_compute_dtype(ck.model_def, compute_dtype))
    fn = _eval_fn_for(ck.model_def, ck.state.ema_params, ck.config)
    fn.config = ck.config
    fn.step = int(ck.state.step)
    fn.model_def = ck.model_def
    fn.trained_dtype = trained_dtype
    return fn


def _with_compute_dtype(model_def: ModelDef, dtype: str) -> ModelDef:
    """``model_def`` computing in ``dtype``: a graph definition of the U-Net built with it (the
    modules keep their compute dtype there), the same non-parameter state. The parameters of the
    two have the same structure and dtypes (``param_dtype`` does not follow ``dtype``)."""
    unet = dataclasses.replace(model_def.unet, dtype=dtype)
    return ModelDef(_graphdef(unet), model_def.rest, unet)
