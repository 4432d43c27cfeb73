"""The DDPM baseline (Ho et al. 2020) and DDIM (Song et al. 2021): schedule, loss, samplers.

The baseline of both papers (method.md section 6): epsilon prediction, ``T = 1000`` steps,
linear betas from ``1e-4`` to ``0.02`` (CIFAR-10) or to ``0.002`` (CelebA); DDIM with the same
trained network.

Index convention (as in Ho et al.'s code). The forward chain has states ``x_0`` (data) to
``x_T``; ``q(x_k | x_0) = N(sqrt(abar_k) x_0, (1 - abar_k) I)``. The schedule arrays have length
``T`` and are indexed by the *step index* ``i = k - 1`` in ``{0, ..., T - 1}``: ``betas[i]`` is
``beta_{i+1}``, ``alpha_bars[i] = prod_{j <= i} (1 - betas[j])`` is ``abar_{i+1}``. The network
is called as ``eps_fn(x [B, C, H, W], i [B] int32) -> eps [B, C, H, W]`` with the step index
``i`` of its input state ``x_{i+1}``. ``SampleResult.times`` of the samplers here hold the state
index ``k`` (``T`` for pure noise, ``0`` for the final output), as int32.

Images are ``[B, C, H, W]``; how data in ``[0, 1]`` is mapped to the network's range (Ho et al.
use ``2x - 1``) is the caller's choice, and so is ``clip_x0`` (Ho et al. clip the predicted
``x_0`` to ``[-1, 1]``). Computation runs in the dtype of the images (float32 or float64).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax._checks import check_finite, check_images, check_key, is_concrete
from krylovjax.sampling import (
    SampleResult,
    _bcast,
    _check_clip,
    _check_num_steps,
    _finite_rows,
    _frame_slots,
    _init_frames,
    frame_positions,
)

__all__ = [
    "DDPMSchedule",
    "EpsilonLoss",
    "q_sample",
    "epsilon_loss",
    "ddpm_ancestral_sample",
    "ddim_timesteps",
    "ddim_sample",
    "denoise_start_step",
    "ddpm_denoise",
]

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

_FIELDS = (
    "betas",
    "alphas",
    "alpha_bars",
    "alpha_bars_prev",
    "sqrt_alpha_bars",
    "sqrt_one_minus_alpha_bars",
    "sqrt_recip_alpha_bars",
    "sqrt_recipm1_alpha_bars",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_FIELDS), meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """Noise schedule of a DDPM and the closed-form quantities derived from it (Ho et al.).

    All fields are ``[T]`` arrays indexed by the step index ``i`` (see the module docstring):

    * ``betas``: ``beta_{i+1}``; ``alphas = 1 - betas``;
    * ``alpha_bars``: ``abar_{i+1} = prod_{j<=i} alphas[j]``; ``alpha_bars_prev``: ``abar_i``
      (1 for ``i = 0``);
    * ``sqrt_alpha_bars``, ``sqrt_one_minus_alpha_bars``: the coefficients of
      ``q(x_k | x_0)``; ``sqrt_recip_alpha_bars = 1/sqrt(abar)``, ``sqrt_recipm1_alpha_bars =
      sqrt(1/abar - 1)`` give ``x_0 = sqrt_recip * x_k - sqrt_recipm1 * eps``;
    * posterior ``q(x_{k-1} | x_k, x_0) = N(coef1 x_0 + coef2 x_k, posterior_variance)`` with
      ``posterior_variance = beta (1 - abar_prev) / (1 - abar)``, ``coef1 = beta sqrt(abar_prev)
      / (1 - abar)``, ``coef2 = (1 - abar_prev) sqrt(alpha) / (1 - abar)``, and
      ``posterior_log_variance_clipped = log(posterior_variance)`` with its first entry (0)
      replaced by the second (Ho et al.).

    Build it with :meth:`linear` or :meth:`from_betas`; the derived quantities are computed in
    float64 (numpy) and stored in ``dtype``. It is a pytree (pass it to jitted functions).
    """

    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array
    alpha_bars_prev: jax.Array
    sqrt_alpha_bars: jax.Array
    sqrt_one_minus_alpha_bars: jax.Array
    sqrt_recip_alpha_bars: jax.Array
    sqrt_recipm1_alpha_bars: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_steps(self) -> int:
        """``T``, the number of diffusion steps."""
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas, dtype=None) -> "DDPMSchedule":
        """Schedule from a concrete ``[T]`` vector of betas in ``(0, 1)``, ``T >= 2``."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.shape[0] < 2:
            raise ValueError(f"betas: expected a vector of shape [T] with T >= 2, got shape {b.shape}")
        if not (np.all(np.isfinite(b)) and np.all(b > 0) and np.all(b < 1)):
            raise ValueError("betas: expected finite values in (0, 1)")
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        a = 1.0 - b
        ab = np.cumprod(a)
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        vals = dict(
            betas=b,
            alphas=a,
            alpha_bars=ab,
            alpha_bars_prev=ab_prev,
            sqrt_alpha_bars=np.sqrt(ab),
            sqrt_one_minus_alpha_bars=np.sqrt(1.0 - ab),
            sqrt_recip_alpha_bars=np.sqrt(1.0 / ab),
            sqrt_recipm1_alpha_bars=np.sqrt(1.0 / ab - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
            posterior_mean_coef1=b * np.sqrt(ab_prev) / (1.0 - ab),
            posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(a) / (1.0 - ab),
        )
        return cls(**{k: jnp.asarray(v, dtype) for k, v in vals.items()})

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               dtype=None) -> "DDPMSchedule":
        """Ho et al.'s linear schedule ``betas = linspace(beta_start, beta_end, num_steps)``.

        Defaults are the CIFAR-10 baseline; method.md section 6 uses ``beta_end = 0.002`` for
        CelebA.
        """
        num_steps = _check_num_steps("num_steps", num_steps)
        if num_steps < 2:
            raise ValueError(f"num_steps: expected T >= 2, got {num_steps}")
        if not (0 < beta_start <= beta_end < 1):
            raise ValueError(
                f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
            )
        return cls.from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64), dtype)

    @property
    def noise_to_signal(self) -> jax.Array:
        """``(1 - abar) / abar`` per step index, ``[T]``: the variance of ``x_k / sqrt(abar_k)
        - x_0``, increasing in ``k``."""
        return (1.0 - self.alpha_bars) / self.alpha_bars


def _default(schedule: DDPMSchedule | None) -> DDPMSchedule:
    if schedule is None:
        return DDPMSchedule.linear()
    if not isinstance(schedule, DDPMSchedule):
        raise TypeError(f"schedule: expected a DDPMSchedule, got {type(schedule).__name__}")
    return schedule


def _take(v: jax.Array, i, x: jax.Array) -> jax.Array:
    """``v[i]`` cast to ``x``'s dtype, shaped to broadcast against ``x [B, ...]`` (``i`` scalar or [B])."""
    out = jnp.take(v, i).astype(x.dtype)
    return _bcast(out, x) if jnp.ndim(out) == 1 else out


def _check_step_index(t, batch: int, num_steps: int) -> jax.Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t: expected integer step indices, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t: expected shape [B] = ({batch},), got shape {tuple(t.shape)}")
    if is_concrete(t) and (np.any(np.asarray(t) < 0) or np.any(np.asarray(t) >= num_steps)):
        raise ValueError(f"t: expected step indices in [0, {num_steps - 1}], got {np.asarray(t)}")
    return t


def q_sample(x0, t, noise, *, schedule: DDPMSchedule | None = None) -> jax.Array:
    """Forward marginal ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise`` (Ho et al. eq. 4).

    Args:
      x0: ``[B, C, H, W]`` clean data.
      t: ``[B]`` integer step indices ``i = k - 1`` in ``[0, T - 1]``.
      noise: ``[B, C, H, W]`` standard normal noise.
      schedule: the :class:`DDPMSchedule` (default: ``DDPMSchedule.linear()``).

    Returns:
      ``[B, C, H, W]`` in ``x0``'s dtype.

    Raises:
      ValueError: bad shapes, step indices outside ``[0, T - 1]`` or, for concrete arrays, NaN/Inf
        in ``x0`` or ``noise``.
    """
    schedule = _default(schedule)
    x0 = check_images("x0", x0)
    noise = jnp.asarray(noise)
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {tuple(x0.shape)} (that of x0), got {tuple(noise.shape)}")
    check_finite("noise", noise)
    t = _check_step_index(t, x0.shape[0], schedule.num_steps)
    return _take(schedule.sqrt_alpha_bars, t, x0) * x0 + _take(schedule.sqrt_one_minus_alpha_bars, t, x0) * noise.astype(x0.dtype)


class EpsilonLoss(NamedTuple):
    """Output of :func:`epsilon_loss`; a pair, so ``jax.value_and_grad(..., has_aux=True)`` works."""

    mean: jax.Array  # scalar: mean over the batch
    per_example: jax.Array  # [B]: mean over C, H, W of (eps - eps_fn(x_k, i))^2


def epsilon_loss(eps_fn: EpsFn, x0, key, *, schedule: DDPMSchedule | None = None,
                 max_step: int | None = None) -> EpsilonLoss:
    """Ho et al.'s simple loss ``E_{i, eps} |eps - eps_fn(sqrt(abar) x0 + sqrt(1-abar) eps, i)|^2``.

    One uniform step index ``i ~ U{0, ..., T-1}`` and one ``eps ~ N(0, I)`` per example; the
    squared error is averaged over ``C, H, W`` (as Ho et al.'s ``mean_flat``). With ``max_step
    = M`` the index is drawn from ``U{0, ..., M-1}`` only: a network trained for the noise
    levels up to step ``M`` (e.g. for denoising from a known noise level, see
    :func:`denoise_start_step`); ``None``: all ``T`` steps, Ho et al.'s.

    Args:
      eps_fn: ``(x [B, C, H, W], i [B] int32) -> [B, C, H, W]``.
      x0: ``[B, C, H, W]`` data (in the network's range).
      key: PRNG key.
      schedule: the :class:`DDPMSchedule`.

    Returns:
      :class:`EpsilonLoss` ``(mean, per_example [B])``.
    """
    schedule = _default(schedule)
    x0 = check_images("x0", x0)
    if max_step is None:
        max_step = schedule.num_steps
    elif isinstance(max_step, bool) or not isinstance(max_step, (int, np.integer)) or not 1 <= max_step <= schedule.num_steps:
        raise ValueError(f"max_step: expected None or an integer in [1, {schedule.num_steps}] (the schedule's "
                         f"num_steps), got {max_step!r}")
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, int(max_step), dtype=jnp.int32)
    noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = q_sample(x0, t, noise, schedule=schedule)
    pred = eps_fn(x_t, t)
    if jnp.shape(pred) != x0.shape:
        raise ValueError(f"eps_fn: expected an output of shape {tuple(x0.shape)}, got {tuple(jnp.shape(pred))}")
    per_example = jnp.mean((noise - pred) ** 2, axis=(1, 2, 3))
    return EpsilonLoss(jnp.mean(per_example), per_example)


# --------------------------------------------------------------------------------------------
# Reverse chains
# --------------------------------------------------------------------------------------------


def _predict_x0(schedule, x, i, eps, clip_x0):
    x0 = _take(schedule.sqrt_recip_alpha_bars, i, x) * x - _take(schedule.sqrt_recipm1_alpha_bars, i, x) * eps
    if clip_x0 is not None:
        x0 = jnp.clip(x0, clip_x0[0], clip_x0[1])
    return x0


def _call_eps(eps_fn, x, i):
    eps = eps_fn(x, jnp.full((x.shape[0],), i, jnp.int32))
    if jnp.shape(eps) != x.shape:
        raise ValueError(f"eps_fn: expected an output of shape {tuple(x.shape)}, got {tuple(jnp.shape(eps))}")
    return eps.astype(x.dtype)


def _run_chain(step_fn, x, key, indices: np.ndarray, start, positions):
    """Scan ``step_fn(x, i, i_prev, key) -> x_prev`` over the descending step ``indices``.

    ``start [B]`` (step index per image, or ``None``): an image is updated only at steps
    ``i <= start[b]`` (for per-image start steps); ``positions``: frame positions or ``None``.
    """
    n = len(indices)
    prev = np.concatenate([indices[1:], [-1]]).astype(np.int32)
    keys = jax.random.split(key, n)
    slots = _frame_slots(n, positions) if positions is not None else np.zeros(n, np.int32)
    buf = _init_frames(x, positions)

    def body(carry, inp):
        x, buf = carry
        i, i_prev, k, slot = inp
        x_new = step_fn(x, i, i_prev, k)
        if start is not None:
            x_new = jnp.where(_bcast(i <= start, x), x_new, x)
        x_new = x_new.astype(x.dtype)
        if buf is not None:
            buf = buf.at[slot].set(x_new)
        return (x_new, buf), None

    inputs = (jnp.asarray(indices, jnp.int32), jnp.asarray(prev), keys, jnp.asarray(slots))
    (x, buf), _ = jax.lax.scan(body, (x, buf), inputs)
    if positions is None:
        return x, None, None
    states = np.concatenate([[indices[0] + 1], prev + 1])  # state index k after each step
    times = jnp.broadcast_to(jnp.asarray(states[positions], jnp.int32)[:, None], (len(positions), x.shape[0]))
    if start is not None:  # an image waits at its own start state start[b] + 1 until its first step
        times = jnp.minimum(times, jnp.asarray(start, jnp.int32)[None, :] + 1)
    return x, buf[:-1], times


def _ancestral_step(eps_fn, schedule, variance, clip_x0):
    if variance == "small":
        var = schedule.posterior_variance
    else:  # "large": beta_k, with Ho et al.'s posterior variance at the first step index
        var = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])

    def step(x, i, i_prev, k):
        del i_prev
        eps = _call_eps(eps_fn, x, i)
        x0 = _predict_x0(schedule, x, i, eps, clip_x0)
        mean = _take(schedule.posterior_mean_coef1, i, x) * x0 + _take(schedule.posterior_mean_coef2, i, x) * x
        z = jax.random.normal(k, x.shape, x.dtype)
        noise_on = (i > 0).astype(x.dtype)  # no noise when producing x_0
        return mean + noise_on * jnp.sqrt(_take(var, i, x)) * z

    return step


def _check_frames(return_trajectory, n, num_frames):
    return frame_positions(n, num_frames) if return_trajectory else None


def _check_variance(variance):
    if variance not in ("large", "small"):
        raise ValueError(f"variance: expected 'large' (beta) or 'small' (posterior variance), got {variance!r}")


def ddpm_ancestral_sample(
    eps_fn: EpsFn,
    x_T,
    key,
    *,
    schedule: DDPMSchedule | None = None,
    variance: str = "large",
    clip_x0: tuple[float, float] | None = None,
    return_trajectory: bool = False,
    num_frames: int = 10,
) -> SampleResult:
    """Ho et al.'s ancestral sampler (Algorithm 2), from ``x_T`` through all ``T`` steps.

    For step index ``i = T-1, ..., 0``::

        eps  = eps_fn(x, i)
        x0   = sqrt(1/abar_i) x - sqrt(1/abar_i - 1) eps        (clipped to clip_x0 if given)
        x    = coef1_i x0 + coef2_i x + sigma_i z               (no noise at i = 0)

    which equals ``(x - beta/sqrt(1 - abar) eps) / sqrt(alpha) + sigma z`` without clipping.
    ``variance="large"``: ``sigma_i^2 = beta_i`` (Ho et al.'s CIFAR-10 setting, "fixedlarge");
    ``"small"``: the posterior variance ``beta~_i`` ("fixedsmall").

    Args:
      eps_fn: ``(x [B, C, H, W], i [B] int32) -> [B, C, H, W]``.
      x_T: ``[B, C, H, W]`` start state (``N(0, I)`` for generation).
      key: PRNG key (one split per step).
      schedule: the :class:`DDPMSchedule` (default: ``DDPMSchedule.linear()``).
      variance: ``"large"`` or ``"small"``.
      clip_x0: ``None`` or ``(low, high)`` for the predicted ``x_0`` (Ho et al.: ``(-1, 1)``).
      return_trajectory, num_frames: keep ``num_frames`` evenly spaced states.

    Returns:
      :class:`SampleResult` (``num_score_evals = T``; ``times`` are state indices). A non-finite
      ``eps_fn`` output is not checked: it propagates into the samples, which ``finite`` flags.
    """
    schedule = _default(schedule)
    x = check_images("x_T", x_T)
    check_key("key", key)
    _check_variance(variance)
    clip_x0 = _check_clip(clip_x0)
    T = schedule.num_steps
    positions = _check_frames(return_trajectory, T, num_frames)
    step = _ancestral_step(eps_fn, schedule, variance, clip_x0)
    x, traj, times = _run_chain(step, x, key, np.arange(T - 1, -1, -1), None, positions)
    return SampleResult(x, traj, times, jnp.asarray(T, jnp.int32), jnp.full((x.shape[0],), T, jnp.int32),
                        _finite_rows(x))


def ddim_timesteps(num_diffusion_steps: int, num_steps: int, start: int | None = None) -> np.ndarray:
    """The decreasing step indices ``tau`` DDIM visits: ``num_steps`` evenly spaced indices from
    ``start`` (default ``T - 1``) down to 0, rounded (``[start]`` when ``num_steps == 1``).

    ``T = num_diffusion_steps`` (an int >= 1), ``start`` an integer step index in ``[0, T - 1]``
    and ``1 <= num_steps <= start + 1``; anything else raises ValueError."""
    T = _check_num_steps("num_diffusion_steps", num_diffusion_steps)
    num_steps = _check_num_steps("num_steps", num_steps)
    if start is None:
        start = T - 1
    elif isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= T - 1:
        raise ValueError(f"start: expected None or an integer step index in [0, {T - 1}] (num_diffusion_steps "
                         f"= {T}), got {start!r}")
    start = int(start)
    if num_steps > start + 1:
        raise ValueError(f"num_steps: expected at most {start + 1} DDIM steps from step index {start}, got {num_steps}")
    if num_steps == 1:
        return np.array([start], dtype=np.int64)
    return np.floor(np.arange(num_steps - 1, -1, -1) * start / (num_steps - 1) + 0.5).astype(np.int64)


def _ddim_step(eps_fn, schedule, eta, clip_x0):
    def step(x, i, i_prev, k):
        eps = _call_eps(eps_fn, x, i)
        x0 = _predict_x0(schedule, x, i, eps, clip_x0)
        if clip_x0 is not None:  # the eps consistent with the clipped x0
            eps = (_take(schedule.sqrt_recip_alpha_bars, i, x) * x - x0) / _take(schedule.sqrt_recipm1_alpha_bars, i, x)
        ab = _take(schedule.alpha_bars, i, x)
        ab_prev = jnp.where(i_prev >= 0, jnp.take(schedule.alpha_bars, jnp.maximum(i_prev, 0)), 1.0).astype(x.dtype)
        sigma2 = eta**2 * (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
        dir_coef = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma2, 0.0))
        out = jnp.sqrt(ab_prev) * x0 + dir_coef * eps
        if eta != 0:
            out = out + jnp.sqrt(sigma2) * jax.random.normal(k, x.shape, x.dtype)
        return out

    return step


def ddim_sample(
    eps_fn: EpsFn,
    x_T,
    *,
    schedule: DDPMSchedule | None = None,
    num_steps: int,
    eta: float = 0.0,
    key=None,
    clip_x0: tuple[float, float] | None = None,
    return_trajectory: bool = False,
    num_frames: int = 10,
) -> SampleResult:
    """DDIM (Song, Meng, Ermon 2021, eq. 12) over ``num_steps`` indices :func:`ddim_timesteps`.

    From step index ``i`` to the next one ``i'`` (``abar_{-1} = 1``)::

        x0  = (x - sqrt(1 - abar_i) eps) / sqrt(abar_i),   eps = eps_fn(x, i)
        s^2 = eta^2 (1 - abar_i') / (1 - abar_i) (1 - abar_i / abar_i')
        x   = sqrt(abar_i') x0 + sqrt(1 - abar_i' - s^2) eps + s z

    ``eta = 0`` is the deterministic sampler of the baseline (method.md section 6: the same
    network, ``num_steps = T = 1000``); ``eta = 1`` with ``num_steps = T`` is the ancestral sampler
    with the posterior variance.

    Args:
      eps_fn: ``(x [B, C, H, W], i [B] int32) -> [B, C, H, W]``.
      x_T: ``[B, C, H, W]`` start state.
      schedule: the :class:`DDPMSchedule`.
      num_steps: ``1 <= num_steps <= T``.
      eta: ``>= 0``; a PRNG ``key`` is required when ``eta > 0``.
      key: PRNG key (one split per step, as :func:`ddpm_ancestral_sample`).
      clip_x0: ``None`` or ``(low, high)`` for the predicted ``x_0``.
      return_trajectory, num_frames: keep ``num_frames`` evenly spaced states.

    Returns:
      :class:`SampleResult` (``num_score_evals = num_steps``; ``times`` are state indices). A
      non-finite ``eps_fn`` output propagates into the samples, which ``finite`` flags.
    """
    schedule = _default(schedule)
    x = check_images("x_T", x_T)
    eta = float(eta)
    if not (np.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite value >= 0, got {eta}")
    if eta > 0 and key is None:
        raise ValueError("key: a PRNG key is required when eta > 0")
    if eta > 0:
        check_key("key", key)
    key = key if eta > 0 else jax.random.PRNGKey(0)  # split by the chain, used by no step when eta == 0
    clip_x0 = _check_clip(clip_x0)
    T = schedule.num_steps
    taus = ddim_timesteps(T, num_steps)
    positions = _check_frames(return_trajectory, len(taus), num_frames)
    step = _ddim_step(eps_fn, schedule, eta, clip_x0)
    x, traj, times = _run_chain(step, x, key, taus, None, positions)
    return SampleResult(x, traj, times, jnp.asarray(len(taus), jnp.int32), jnp.full((x.shape[0],), T, jnp.int32),
                        _finite_rows(x))


def denoise_start_step(noise_std, *, schedule: DDPMSchedule | None = None) -> np.ndarray:
    """The step index whose marginal matches ``x0 + noise_std z``.

    ``x_k / sqrt(abar_k) = x0 + sqrt((1 - abar_k) / abar_k) z``, so the start is the step index
    ``i`` with ``(1 - abar_i) / abar_i`` closest to ``noise_std^2``.

    Args:
      noise_std: concrete scalar or ``[B]`` of finite values ``> 0`` with ``noise_std^2 <= (1 -
        abar_T) / abar_T`` (the schedule's largest noise level).
      schedule: the :class:`DDPMSchedule`.

    Returns:
      numpy int array with the shape of ``noise_std``.
    """
    schedule = _default(schedule)
    if not is_concrete(noise_std):
        raise ValueError("noise_std: expected a concrete value (the start step fixes the loop length)")
    s = np.asarray(noise_std, dtype=np.float64)
    if s.ndim > 1:
        raise ValueError(f"noise_std: expected a scalar or a [B] vector, got shape {s.shape}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError(f"noise_std: expected finite values > 0, got {s}")
    if not is_concrete(schedule.alpha_bars):
        raise ValueError("schedule: expected concrete arrays (the start step fixes the loop length); close "
                         "over the schedule instead of passing it to a jitted function")
    with jax.ensure_compile_time_eval():  # concrete inside a jit trace too
        nsr = np.asarray(schedule.noise_to_signal, dtype=np.float64)
    if np.any(s**2 > nsr[-1] * (1 + 1e-6)):
        raise ValueError(
            f"noise_std: expected at most sqrt((1 - abar_T) / abar_T) = {np.sqrt(nsr[-1]):.6g} "
            f"(the schedule's largest noise level), got {s}"
        )
    return np.argmin(np.abs(nsr[None, :] - np.reshape(s, (-1, 1)) ** 2), axis=1).reshape(s.shape)


def ddpm_denoise(
    eps_fn: EpsFn,
    noisy,
    noise_std,
    key=None,
    *,
    schedule: DDPMSchedule | None = None,
    method: str = "ancestral",
    variance: str = "large",
    clip_x0: tuple[float, float] | None = None,
    return_trajectory: bool = False,
    num_frames: int = 10,
) -> SampleResult:
    """Denoise ``noisy = x0 + noise_std z`` with the reverse chain from the matching step.

    The start step index ``i*`` is :func:`denoise_start_step`; since ``sqrt(abar) noisy =
    sqrt(abar) x0 + sqrt(abar) noise_std z`` has the marginal of ``x_{i*+1}`` when ``abar
    noise_std^2 = 1 - abar``, the chain starts from ``sqrt(abar_{i*}) * noisy`` and runs the
    steps ``i*, ..., 0``. With per-image noise levels (``noise_std [B]``) the loop covers the
    largest ``i*``, and each image is updated only from its own start step on.

    Args:
      eps_fn: ``(x [B, C, H, W], i [B] int32) -> [B, C, H, W]``.
      noisy: ``[B, C, H, W]`` noisy images (in the network's range).
      noise_std: concrete scalar or ``[B]`` (see :func:`denoise_start_step`).
      key: PRNG key (required for ``method="ancestral"``).
      schedule: the :class:`DDPMSchedule`.
      method: ``"ancestral"`` (:func:`ddpm_ancestral_sample` steps) or ``"ddim"`` (the
        deterministic DDIM step through every index).
      variance, clip_x0: as :func:`ddpm_ancestral_sample`.
      return_trajectory, num_frames: frames over the steps taken.

    Returns:
      :class:`SampleResult` with ``t_start`` the start state index ``i* + 1`` per image; a
      non-finite ``eps_fn`` output propagates into the samples, which ``finite`` flags.
    """
    schedule = _default(schedule)
    x = check_images("noisy", noisy)
    if method not in ("ancestral", "ddim"):
        raise ValueError(f"method: expected 'ancestral' or 'ddim', got {method!r}")
    if method == "ancestral" and key is None:
        raise ValueError("key: a PRNG key is required for method='ancestral'")
    if method == "ancestral":  # (DDIM's steps use no key: one given is left alone)
        check_key("key", key)
    _check_variance(variance)
    clip_x0 = _check_clip(clip_x0)
    s = np.asarray(noise_std) if is_concrete(noise_std) else noise_std
    if np.ndim(s) == 1 and np.shape(s)[0] != x.shape[0]:
        raise ValueError(f"noise_std: expected a scalar or shape [B] = ({x.shape[0]},), got shape {np.shape(s)}")
    start = np.broadcast_to(denoise_start_step(noise_std, schedule=schedule), (x.shape[0],))
    top = int(start.max())
    start_j = jnp.asarray(start, jnp.int32)
    x = _take(schedule.sqrt_alpha_bars, start_j, x) * x
    n = top + 1
    positions = _check_frames(return_trajectory, n, num_frames)
    if method == "ancestral":
        step = _ancestral_step(eps_fn, schedule, variance, clip_x0)
    else:
        step = _ddim_step(eps_fn, schedule, 0.0, clip_x0)
        key = jax.random.PRNGKey(0)  # split by the chain, used by no step
    per_image = None if np.all(start == top) else start_j
    x, traj, times = _run_chain(step, x, key, np.arange(top, -1, -1), per_image, positions)
    return SampleResult(x, traj, times, jnp.asarray(n, jnp.int32), start_j + 1, _finite_rows(x))
