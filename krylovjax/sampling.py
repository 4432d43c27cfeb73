"""Samplers for score models: reverse-SDE Euler-Maruyama, probability-flow ODE, denoise, generate.

A score function has the signature ``score_fn(x [B, C, H, W], t [B]) -> [B, C, H, W]`` (a
trained network wrapped by the caller; for per-image time intervals the caller closes over the
image index, or passes it as ``score_args``, which ``probability_flow(step_control="per_image")``
needs). An SDE is any object with the interface of :mod:`krylovjax.sde` (duck typing):
``g2(t)`` (the squared diffusion coefficient ``g(t)^2``), ``drift(x, t)`` (``f(x, t)``) and
``perturbation_std(t)`` (``lambda(t)``, the standard deviation of the perturbation kernel).
The samplers call these per example, with a scalar ``t`` and ``x`` of shape ``[C, H, W]``
(through ``jax.vmap``), so an SDE written for scalar times works unchanged.

Equations (method.md section 2.1), with ``s = grad_x log p(x, t)``:

* reverse SDE (Anderson):  ``dx = [f(x, t) - g(t)^2 s] dt + g(t) dW``, integrated backwards in
  time from ``t_start`` to ``t_end`` (:func:`euler_maruyama`);
* probability-flow ODE:   ``dx/dt = f(x, t) - g(t)^2 / 2 * s``, integrated backwards with diffrax
  (:func:`probability_flow`), as Paper B's sampler (method.md section 6: RK45, rtol = atol = 1e-3);
* the final denoising step (:func:`tweedie_denoise`, Tweedie's formula ``E[x0 | x_t] = (x_t +
  lambda(t)^2 s) / alpha(t)``): the samplers stop at ``t_end > 0``, where the marginal still holds
  noise of std ``lambda(t_end)`` (0.032 for Paper B's VE SDE at ``t_end = 1e-3``); one more score
  evaluation removes it (score_sde's ``denoise`` option, Karras et al.'s last step to sigma 0).
  :func:`generate` and :func:`denoise` apply it with ``final_denoise=True`` (default off: Paper
  B's sampler has none).

Every sampler returns a :class:`SampleResult`. The network's output is not checked inside the
samplers (that would need a host sync in jitted code): NaN or Inf from ``score_fn`` propagates into
the samples it touches, and ``SampleResult.finite`` flags them per image (the adaptive ODE solver
cannot finish then and raises instead, :func:`probability_flow`). Step counts are static, loops
are ``lax.scan`` (or diffrax's ``while_loop``), so the samplers can be wrapped in ``jax.jit`` with
``score_fn``, ``sde`` and the keyword options static. Computation runs in the floating dtype of
the input images (float32 or float64).

Time convention for batched start times: ``t_start`` may be a scalar or one time per image,
shape ``[B]``. Each image then gets its own time grid from its ``t_start`` to the common
``t_end``; :func:`denoise` uses this to start every image at the time matching its noise level.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from krylovjax._checks import check_finite, check_images, check_key, is_concrete

__all__ = [
    "SampleResult",
    "euler_maruyama",
    "probability_flow",
    "start_time",
    "noise_range",
    "denoise",
    "generate",
    "tweedie_denoise",
    "with_final_denoise",
    "frame_positions",
    "ODE_SOLVERS",
]

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


class SampleResult(NamedTuple):
    """Output of every sampler (a pytree).

    Attributes:
      x: final samples, ``[B, C, H, W]``, dtype of the input.
      trajectory: ``[num_frames, B, C, H, W]`` frames of the path (frame 0 is the starting
        state, the last frame equals ``x``), or ``None`` when ``return_trajectory=False``.
      times: ``[num_frames, B]`` the time of each frame for each image (continuous ``t`` for the
        samplers of this module; the DDPM state index for :mod:`krylovjax.ddpm`), or ``None``.
      num_score_evals: int32 scalar, number of batched calls of the score (or epsilon)
        network, i.e. function evaluations of the whole batch.
      t_start: ``[B]`` the start time of each image (``t*`` for :func:`denoise`).
      finite: ``[B]`` bool, True where the sample ``x[b]`` holds only finite values. The samplers
        do not check the network's output (that would need a host sync inside jitted code): a
        score / epsilon network that returns NaN or Inf makes the samples it touches NaN, and
        this flag (computed on the device, as part of the result) is how to find them, e.g.
        ``assert bool(r.finite.all())``. ``None`` only for results built by other code.
    """

    x: jax.Array
    trajectory: jax.Array | None
    times: jax.Array | None
    num_score_evals: jax.Array
    t_start: jax.Array
    finite: jax.Array | None = None


# --------------------------------------------------------------------------------------------
# Input checks and small helpers shared with krylovjax.ddpm
# --------------------------------------------------------------------------------------------


def _check_num_steps(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name}: expected a Python int >= 1, got {n!r}")
    if n < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {n}")
    return int(n)


def frame_positions(num_steps: int, num_frames: int) -> np.ndarray:
    """Which states of an ``num_steps``-step path are kept as trajectory frames.

    States are numbered ``0`` (the start) to ``num_steps`` (the end). Frames are spread evenly:
    frame ``k`` is state ``round(k * num_steps / (num_frames - 1))``, so frame 0 is the start and
    the last frame the end; with ``num_frames == 1`` only the end is kept.

    Returns:
      int array ``[num_frames]`` of strictly increasing state indices.
    """
    num_steps = _check_num_steps("num_steps", num_steps)
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")
    if num_frames > num_steps + 1:
        raise ValueError(
            f"num_frames: expected at most num_steps + 1 = {num_steps + 1} frames, got {num_frames}"
        )
    if num_frames == 1:
        return np.array([num_steps], dtype=np.int64)
    pos = np.floor(np.arange(num_frames) * num_steps / (num_frames - 1) + 0.5).astype(np.int64)
    return pos


def _frame_slots(num_steps: int, positions: np.ndarray) -> np.ndarray:
    """Slot of the state reached after step ``k`` (state ``k + 1``) in the frame buffer.

    States that are not frames write to the extra slot ``len(positions)``, dropped at the end.
    """
    slots = np.full(num_steps, len(positions), dtype=np.int32)
    for f, j in enumerate(positions):
        if j >= 1:
            slots[j - 1] = f
    return slots


def _init_frames(x: jax.Array, positions: np.ndarray | None):
    """Frame buffer ``[num_frames + 1, *x.shape]`` with the start state in slot 0 if it is a frame."""
    if positions is None:
        return None
    buf = jnp.zeros((len(positions) + 1,) + x.shape, x.dtype)
    if positions[0] == 0:
        buf = buf.at[0].set(x)
    return buf


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a per-example ``[B]`` vector to broadcast against ``x [B, ...]``."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def _batch_times(name: str, t, batch: int, dtype) -> jax.Array:
    """A scalar or ``[B]`` time as a ``[B]`` array of ``dtype``."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        t = jnp.full((batch,), t, dtype)
    elif t.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or shape [B] = ({batch},), got shape {tuple(t.shape)}")
    check_finite(name, t)
    return t.astype(dtype)


def _check_interval(t0: jax.Array, t_end) -> None:
    """``0 <= t_end < t_start`` for every image (checked when concrete)."""
    if not is_concrete(t_end):
        return
    te = float(t_end)
    if not (np.isfinite(te) and te >= 0):
        raise ValueError(f"t_end: expected a finite time >= 0, got {t_end!r}")
    if is_concrete(t0) and not bool(np.all(np.asarray(t0) > te)):
        raise ValueError(f"t_start: expected every t_start > t_end = {te}, got {np.asarray(t0)}")


def _finite_rows(x: jax.Array) -> jax.Array:
    """``[B]`` bool: which samples of ``x [B, ...]`` hold only finite values (no host sync)."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _check_score_output(s, x) -> None:
    if jnp.shape(s) != x.shape:
        raise ValueError(
            f"score_fn: expected an output of the input's shape {tuple(x.shape)}, got shape {tuple(jnp.shape(s))}"
        )


def _sde_g2(sde, t: jax.Array) -> jax.Array:
    """``g(t)^2`` per example, ``t [B] -> [B]``."""
    return jax.vmap(sde.g2)(t).astype(t.dtype)


def _sde_drift(sde, x: jax.Array, t: jax.Array) -> jax.Array:
    """``f(x, t)`` per example, ``x [B, C, H, W]``, ``t [B]``."""
    return jax.vmap(sde.drift)(x, t).astype(x.dtype)


def _sde_std(sde, t: jax.Array) -> jax.Array:
    """``lambda(t)`` per example, ``t [B] -> [B]``."""
    return jax.vmap(sde.perturbation_std)(t).astype(t.dtype)


def _as_float(v) -> float:
    """``float(v)``, or NaN for something that is not a real number (a str, None, an array)."""
    if isinstance(v, (str, bytes, bool)):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _check_clip(clip):
    if clip is None:
        return None
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip: expected None or a pair (low, high), got {clip!r}") from None
    if not lo < hi:
        raise ValueError(f"clip: expected low < high, got {clip!r}")
    return lo, hi


# --------------------------------------------------------------------------------------------
# Reverse-SDE Euler-Maruyama
# --------------------------------------------------------------------------------------------


def _euler_maruyama(score_fn, sde, x, key, t0, t_end, num_steps, clip, positions, noise_scale):
    """Core of :func:`euler_maruyama` for checked inputs; ``t0 [B]``."""
    dtype = x.dtype
    dt = (jnp.asarray(t_end, dtype) - t0) / num_steps  # [B], negative: backwards in time
    keys = jax.random.split(key, num_steps)
    noise_on = np.ones(num_steps, dtype=np.float64)
    noise_on[-1] = 0.0  # no noise at the last step
    slots = _frame_slots(num_steps, positions) if positions is not None else np.zeros(num_steps, np.int32)
    buf = _init_frames(x, positions)

    def step(carry, inp):
        x, buf = carry
        k, k_key, slot, on = inp
        t = t0 + k.astype(dtype) * dt
        s = score_fn(x, t)
        _check_score_output(s, x)
        g2 = _sde_g2(sde, t)
        mean_drift = _sde_drift(sde, x, t) - _bcast(g2, x) * s.astype(dtype)
        z = jax.random.normal(k_key, x.shape, dtype)
        noise = (noise_scale * on.astype(dtype)) * _bcast(jnp.sqrt(g2 * -dt), x) * z
        x = x + _bcast(dt, x) * mean_drift + noise
        if clip is not None:
            x = jnp.clip(x, clip[0], clip[1])
        x = x.astype(dtype)
        if buf is not None:
            buf = buf.at[slot].set(x)
        return (x, buf), None

    inputs = (jnp.arange(num_steps), keys, jnp.asarray(slots), jnp.asarray(noise_on))
    (x, buf), _ = jax.lax.scan(step, (x, buf), inputs)
    nfe = jnp.asarray(num_steps, jnp.int32)
    if positions is None:
        return SampleResult(x, None, None, nfe, t0, _finite_rows(x))
    times = t0[None, :] + jnp.asarray(positions, dtype)[:, None] * dt[None, :]
    return SampleResult(x, buf[:-1], times, nfe, t0, _finite_rows(x))


def euler_maruyama(
    score_fn: ScoreFn,
    sde: Any,
    x_T,
    key,
    *,
    t_start=1.0,
    t_end: float = 1e-3,
    num_steps: int,
    clip: tuple[float, float] | None = None,
    return_trajectory: bool = False,
    num_frames: int = 10,
    noise_scale: float = 1.0,
) -> SampleResult:
    """Euler-Maruyama for the reverse SDE ``dx = [f - g^2 s] dt + g dW`` (method.md 2.1).

    With ``t_k = t_start + k (t_end - t_start) / num_steps`` and ``dt = (t_end - t_start) /
    num_steps < 0``, each step is::

        x <- x + [f(x, t_k) - g(t_k)^2 score_fn(x, t_k)] dt + noise_scale * g(t_k) sqrt(|dt|) z

    with ``z ~ N(0, I)``, no noise at the last step, then ``x <- clip(x, *clip)`` if ``clip`` is
    given. Paper A's sampler (method.md section 6) is ``t_start=1, t_end=0, num_steps=50,
    noise_scale=0.1, clip=(0, 1)``; ``noise_scale=1`` is the consistent reverse SDE.

    Args:
      score_fn: ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``.
      sde: object with ``g2(t)`` and ``drift(x, t)`` (see the module docstring).
      x_T: ``[B, C, H, W]`` float32/float64 start state at ``t_start``.
      key: PRNG key for the noise.
      t_start: scalar or ``[B]`` start time(s), each ``> t_end``.
      t_end: final time, ``>= 0``.
      num_steps: number of steps (score evaluations), ``>= 1``.
      clip: ``None`` or ``(low, high)``: clamp after every step.
      return_trajectory: keep ``num_frames`` evenly spaced states (see :func:`frame_positions`).
      num_frames: number of frames, ``1 <= num_frames <= num_steps + 1``.
      noise_scale: multiplies the diffusion noise, ``>= 0``.

    Returns:
      :class:`SampleResult` with ``num_score_evals = num_steps``. A non-finite ``score_fn``
      output is not checked: it propagates into the samples, which ``finite`` flags.
    """
    x = check_images("x_T", x_T)
    check_key("key", key)
    num_steps = _check_num_steps("num_steps", num_steps)
    t0 = _batch_times("t_start", t_start, x.shape[0], x.dtype)
    _check_interval(t0, t_end)
    clip = _check_clip(clip)
    if is_concrete(noise_scale) and not (np.isfinite(float(noise_scale)) and float(noise_scale) >= 0):
        raise ValueError(f"noise_scale: expected a finite value >= 0, got {noise_scale!r}")
    positions = frame_positions(num_steps, num_frames) if return_trajectory else None
    return _euler_maruyama(score_fn, sde, x, key, t0, t_end, num_steps, clip, positions, noise_scale)


# --------------------------------------------------------------------------------------------
# Probability-flow ODE with diffrax
# --------------------------------------------------------------------------------------------

#: name -> (diffrax solver class, adaptive?, new evaluations per step, evaluations at init).
#: The two FSAL Runge-Kutta pairs re-use the last stage, so 6 new evaluations per (accepted or
#: rejected) step, plus the first-stage evaluation at the start.
ODE_SOLVERS = {
    "dopri5": (diffrax.Dopri5, True, 6, 1),
    "tsit5": (diffrax.Tsit5, True, 6, 1),
    "heun": (diffrax.Heun, False, 2, 0),
    "euler": (diffrax.Euler, False, 1, 0),
}

def _probability_flow(score_fn, sde, x, t0, t_end, *, rtol, atol, solver, num_steps, frame_u,
                      max_steps, dt0):
    """Core of :func:`probability_flow` for checked inputs.

    The ODE is solved in a normalised time ``u in [0, 1]``, ``t_b(u) = t0_b + u (t_end - t0_b)``,
    so that every image may have its own start time and one solve handles the batch:
    ``dx_b/du = (t_end - t0_b) (f - g^2/2 s)(x_b, t_b(u))``. ``frame_u`` (or ``None``) are the
    normalised times of the saved frames.
    """
    dtype = x.dtype
    span = jnp.asarray(t_end, dtype) - t0  # [B], negative

    def vector_field(u, y, args):
        return _flow_velocity(score_fn, sde, y, t0 + jnp.asarray(u, dtype) * span, span)

    solver_cls, adaptive, per_step, at_init = ODE_SOLVERS[solver]
    if adaptive:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
    else:
        controller = diffrax.ConstantStepSize()
        dt0 = 1.0 / num_steps
    # Times in the dtype of x: diffrax promotes y to the dtype of the time variable. t1=True also
    # saves the last state reached when the solve stops early (for the diagnosis below).
    ts = None if frame_u is None else jnp.asarray(frame_u, dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver_cls(),
        t0=jnp.asarray(0.0, dtype),
        t1=jnp.asarray(1.0, dtype),
        dt0=jnp.asarray(dt0, dtype),
        y0=x,
        saveat=diffrax.SaveAt(ts=ts, t1=True),
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,  # failures are reported below, with their likely cause
    )
    failed = sol.result != diffrax.RESULTS.successful
    x_end, frames = _split_saves(sol.ys, frame_u)
    if is_concrete(failed):
        if bool(failed):
            # The t1 save holds the last state reached; it follows the frames reached (the
            # unreached ones, after it, are inf).
            k = int(np.sum(np.isfinite(np.asarray(sol.ts)))) - 1
            _raise_solve_failure(score_fn, sde, sol.ys[k], sol.ts[k], t0, span, max_steps)
    else:  # under tracing: a runtime error, as diffrax's own (throw=True), with a truthful message
        x_end, frames = eqx.error_if((x_end, frames), failed, _FAILED_UNDER_JIT.format(max_steps=max_steps))
    nfe = (per_step * sol.stats["num_steps"] + at_init).astype(jnp.int32)
    return _flow_result(x_end, frames, frame_u, nfe, t0, span)


def _flow_velocity(score_fn, sde, y, t, span):
    """The normalised probability-flow ODE's right-hand side ``span (f - g^2/2 s)(y, t)`` for a
    batch ``y [B, C, H, W]`` at times ``t [B]``, in ``y``'s dtype."""
    s = score_fn(y, t)
    _check_score_output(s, y)
    v = _sde_drift(sde, y, t) - 0.5 * _bcast(_sde_g2(sde, t), y) * s.astype(y.dtype)
    return (_bcast(span, y) * v).astype(y.dtype)


def _split_saves(ys, frame_u):
    """``(x_end, frames)`` of diffrax's saves (the frames, then the t1 save)."""
    frames = None if frame_u is None else ys[:-1]
    return (ys[-1] if frame_u is None else frames[-1]), frames


def _flow_result(x_end, frames, frame_u, nfe, t0, span) -> SampleResult:
    if frame_u is None:
        return SampleResult(x_end, None, None, nfe, t0, _finite_rows(x_end))
    times = t0[None, :] + jnp.asarray(frame_u, x_end.dtype)[:, None] * span[None, :]
    return SampleResult(x_end, frames, times, nfe, t0, _finite_rows(x_end))


def _probability_flow_rows(score_fn, score_args, sde, x, t0, t_end, *, rtol, atol, solver, frame_u,
                           max_steps, dt0):
    """:func:`_probability_flow` with every image its own adaptive steps (``step_control="per_image"``).

    The solve of one image is vmapped over the batch: diffrax's loop then runs until the image
    needing the most steps is done, evaluating ``score_fn`` on the whole batch at each step (each
    image at its own time, an image already done left unchanged), so an image's result does not
    depend on the other images. ``score_fn`` is called on single rows, ``(x [1, C, H, W], t [1],
    *args)`` with each of ``score_args`` sliced to its row, and so must compute each row alone
    (a network does; a closure over per-image data does not: pass that data as ``score_args``).
    """
    dtype = x.dtype
    solver_cls, _, per_step, at_init = ODE_SOLVERS[solver]
    ts = None if frame_u is None else jnp.asarray(frame_u, dtype)
    end = jnp.asarray(t_end, dtype)

    def solve_one(xb, t0b, args):
        spanb = (end - t0b)[None]

        def row_score(y, t):
            return score_fn(y, t, *[a[None] for a in args])

        def vector_field(u, y, _):
            return _flow_velocity(row_score, sde, y[None], t0b + jnp.asarray(u, dtype) * spanb, spanb)[0]

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field), solver_cls(), t0=jnp.asarray(0.0, dtype), t1=jnp.asarray(1.0, dtype),
            dt0=jnp.asarray(dt0, dtype), y0=xb, saveat=diffrax.SaveAt(ts=ts, t1=True),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps, throw=False)
        return sol.ys, sol.ts, sol.stats["num_steps"], sol.result != diffrax.RESULTS.successful

    ys, us, steps, failed = jax.vmap(solve_one)(x, t0, tuple(score_args))
    ys = jnp.swapaxes(ys, 0, 1)  # [saves, B, C, H, W]
    x_end, frames = _split_saves(ys, frame_u)
    span = end - t0
    if is_concrete(failed):
        if bool(jnp.any(failed)):
            b = int(np.flatnonzero(np.asarray(failed))[0])
            k = int(np.sum(np.isfinite(np.asarray(us[b])))) - 1
            row_args = [a[b:b + 1] for a in score_args]
            _raise_solve_failure(lambda y, t: score_fn(y, t, *row_args), sde, ys[k, b:b + 1], us[b, k],
                                 t0[b:b + 1], span[b:b + 1], max_steps, rows=[b])
    else:
        x_end, frames = eqx.error_if((x_end, frames), jnp.any(failed), _FAILED_UNDER_JIT.format(max_steps=max_steps))
    nfe = (per_step * jnp.max(steps) + at_init).astype(jnp.int32)
    return _flow_result(x_end, frames, frame_u, nfe, t0, span)


_FAILED_UNDER_JIT = (
    "probability_flow: the ODE solver stopped before t_end after max_steps = {max_steps} steps. "
    "The likely cause is a non-finite vector field: score_fn returned NaN or Inf (or t_start is NaN, "
    "as start_time returns under jit for an unattainable noise level), so every step is rejected; "
    "otherwise the solve needs more steps (increase max_steps). Call probability_flow outside jit "
    "for a precise diagnosis."
)


def _raise_solve_failure(score_fn, sde, y, u, t0, span, max_steps, rows=None) -> None:
    """Why a concrete solve stopped early at the normalised time ``u`` in the state ``y``.

    The step-size controller rejects every step whose error estimate is NaN, so a score that is
    non-finite from some time on makes the solver creep towards that time with ever smaller
    steps until ``max_steps``. Before blaming ``max_steps``, the score (and the SDE) is checked
    at the last state reached, at its time and at a few times just past it (where the rejected
    steps evaluated it) and at ``t_end``: at most 9 score evaluations, only when a concrete
    solve has failed. ``rows``: the batch index of each row of ``y`` (default: its own).
    """
    u = float(u)
    t = t0 + jnp.asarray(u, y.dtype) * span
    probes = [u, float(np.nextafter(np.asarray(u, y.dtype), np.asarray(np.inf, y.dtype)))]
    probes += [u + d for d in (1e-13, 1e-11, 1e-9, 1e-7, 1e-5, 1e-3) if u + d <= 1.0]
    if 1.0 not in probes:
        # the end point t_end too: every step that reaches it evaluates the score there (e.g. a
        # network over lambda(t), infinite at t_end = 0), so the solve cannot end, whatever max_steps
        probes.append(1.0)
    for uu in probes:
        tt = t0 + jnp.asarray(uu, y.dtype) * span  # as in the vector field
        s = np.asarray(score_fn(y, tt))
        if not np.all(np.isfinite(s)):
            bad = np.flatnonzero(~np.all(np.isfinite(s.reshape(s.shape[0], -1)), axis=1))
            bad_t = np.asarray(tt)[bad]
            if rows is not None:
                bad = np.asarray(rows)[bad]
            if uu == 1.0 and u + 1e-3 < 1.0:
                raise ValueError(
                    f"score_fn: returned non-finite values (NaN or Inf) for images {bad.tolist()} at t = "
                    f"{bad_t}, t_end itself: every step that reaches t_end is rejected, so the "
                    f"ODE solver cannot finish whatever max_steps (it stopped at t = {np.asarray(t)}); choose a "
                    "t_end where the score is finite (t_end > 0 for a score scaled by 1 / lambda(t))"
                )
            raise ValueError(
                f"score_fn: returned non-finite values (NaN or Inf) for images {bad.tolist()} at t = "
                f"{bad_t}, where the ODE solver stopped: its step-size controller rejects "
                f"every step with a non-finite error estimate, so it ran out of steps (max_steps = "
                f"{max_steps} is not the problem)"
            )
        v = np.asarray(_sde_drift(sde, y, tt)) - 0.5 * np.asarray(_bcast(_sde_g2(sde, tt), y))
        if not np.all(np.isfinite(v)):
            raise ValueError(f"sde: its drift or g(t)^2 is not finite at t = {np.asarray(tt)}, where the "
                             "ODE solver stopped")
    raise RuntimeError(
        f"max_steps: the ODE solver took max_steps = {max_steps} steps and stopped at t = {np.asarray(t)} "
        "before t_end; increase max_steps (or loosen rtol / atol). The score was finite where it stopped; "
        "if score_fn returns NaN or Inf somewhat later, the step-size controller rejects every step there."
    )


def probability_flow(
    score_fn: ScoreFn,
    sde: Any,
    x_T,
    *,
    t_start=1.0,
    t_end: float = 1e-3,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    solver: str = "dopri5",
    num_steps: int | None = None,
    return_trajectory: bool = False,
    num_frames: int = 10,
    max_steps: int = 4096,
    dt0: float = 0.01,
    step_control: str = "batch",
    score_args: tuple = (),
) -> SampleResult:
    """Integrate the probability-flow ODE ``dx/dt = f - g^2/2 s`` backwards (method.md 2.1, 6).

    Paper B's sampler: adaptive Dormand-Prince 5(4) (``solver="dopri5"``, a PID step-size
    controller with ``rtol``, ``atol``), from ``t_start`` down to ``t_end``. With
    ``step_control="batch"`` (the default) the batch is one ODE, its error norm diffrax's RMS over
    all images, so an image's result depends (within the tolerance) on the other images in the
    batch; ``"per_image"`` gives every image its own steps and a result of its own, at the
    number of batched score calls of the image needing the most steps (often more than
    ``"batch"``'s, whose RMS lets a hard image take the steps of easier ones: 187 against 175 in
    the example of tests/test_sampling.py, 32 against 20 for the demo's model on eight photos at
    noise 0.1). "Of its own" holds to rounding: a score whose batched kernels round differently
    with the batch's size (some GPU convolutions) can still, rarely, tip an accepted step.
    ``solver="euler"`` or ``"heun"`` are fixed-step options with ``num_steps`` equal steps
    (``step_control`` changes nothing there); ``"tsit5"`` is another adaptive pair.

    Args:
      score_fn: ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``.
      sde: object with ``g2(t)`` and ``drift(x, t)``.
      x_T: ``[B, C, H, W]`` float32/float64 start state at ``t_start``.
      t_start: scalar or ``[B]`` start time(s), each ``> t_end``.
      t_end: final time, ``>= 0``.
      rtol, atol: tolerances of the adaptive solvers (> 0).
      solver: one of :data:`ODE_SOLVERS` (``"dopri5"``, ``"tsit5"``, ``"heun"``, ``"euler"``).
      num_steps: steps of the fixed-step solvers (required for them, ignored otherwise).
      return_trajectory: keep ``num_frames`` frames; adaptive solvers save at evenly spaced times
        (dense output), fixed-step solvers at the states of :func:`frame_positions`.
      num_frames: number of frames, ``>= 1`` (and ``<= num_steps + 1`` for fixed steps).
      max_steps: bound on the solver steps (accepted and rejected).
      dt0: first trial step of the adaptive solvers, in the normalised time ``[0, 1]`` (the
        controller adapts it at once; an explicit value keeps the evaluation count exact).
      step_control: ``"batch"`` or ``"per_image"`` (above). ``"per_image"`` calls ``score_fn`` on
        single rows (``[1, C, H, W]``, ``[1]``), so ``score_fn`` must compute each row alone: a
        closure over per-image data (image indices of a per-image-offset model) must pass that
        data as ``score_args`` instead.
      score_args: arrays with the batch as leading axis, passed on as ``score_fn(x, t, *score_args)``
        (each sliced to the rows of ``x``), e.g. ``(idx,)`` for a model trained with per-image
        time intervals.

    Returns:
      :class:`SampleResult`; ``num_score_evals`` counts every evaluation of the vector field
      (accepted and rejected steps and the first FSAL stage). A fixed-step solver does not check
      the score: a non-finite ``score_fn`` output propagates into the samples (see ``finite``).

    Raises:
      ValueError: bad arguments (named), or, for a concrete solve that stopped before ``t_end``,
        ``score_fn`` returning NaN/Inf where it stopped: an adaptive controller rejects every
        step whose error estimate is NaN, so a non-finite score shows up as running out of steps.
        Diagnosing it costs at most 8 extra score evaluations, only when the solve fails.
      RuntimeError: a concrete solve that used up ``max_steps`` with a finite score.
      Under ``jax.jit`` a solve that stops early raises at run time (an equinox runtime error,
      as diffrax itself does) with a message naming both possible causes.
    """
    x = check_images("x_T", x_T)
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver: expected one of {sorted(ODE_SOLVERS)}, got {solver!r}")
    if step_control not in ("batch", "per_image"):
        raise ValueError(f"step_control: expected 'batch' or 'per_image', got {step_control!r}")
    score_args = _check_score_args(score_args, x.shape[0])
    adaptive = ODE_SOLVERS[solver][1]
    if adaptive:
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not 0 < _as_float(v) < np.inf:  # NaN fails too
                raise ValueError(f"{name}: expected a finite tolerance > 0 (a real number), got {v!r}")
        _check_num_steps("max_steps", max_steps)
        if not 0 < _as_float(dt0) <= 1:
            raise ValueError(f"dt0: expected a step in (0, 1] of the normalised time, got {dt0!r}")
        steps = None
        frame_u = None
        if return_trajectory:
            if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
                raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")
            frame_u = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.array([1.0])
    else:
        if num_steps is None:
            raise ValueError(f"num_steps: required (an int >= 1) for the fixed-step solver {solver!r}")
        steps = _check_num_steps("num_steps", num_steps)
        frame_u = frame_positions(steps, num_frames) / steps if return_trajectory else None
    t0 = _batch_times("t_start", t_start, x.shape[0], x.dtype)
    _check_interval(t0, t_end)
    if adaptive and step_control == "per_image":
        return _probability_flow_rows(score_fn, score_args, sde, x, t0, t_end, rtol=rtol, atol=atol,
                                      solver=solver, frame_u=frame_u, max_steps=max_steps, dt0=dt0)
    return _probability_flow(_bind(score_fn, score_args), sde, x, t0, t_end, rtol=rtol, atol=atol,
                             solver=solver, num_steps=steps, frame_u=frame_u, max_steps=max_steps, dt0=dt0)


# --------------------------------------------------------------------------------------------
# Start time of a noise level, denoise, generate
# --------------------------------------------------------------------------------------------

_BISECTION_ITERS = 60
_RANGE_RTOL = 1e-6  # a noise level this far (relatively) outside the SDE's range still counts


def _is_ve(sde) -> bool:
    """Paper B's VE SDE (krylovjax.sde.VESDE or a look-alike with ``sigma``), recognised by name."""
    return type(sde).__name__ == "VESDE" and hasattr(sde, "sigma")


def _mean_coeff_fn(sde) -> Callable | None:
    """``alpha(t)`` with ``E[x(t) | x(0)] = alpha(t) x(0)``, or ``None`` when it is 1 (zero drift).

    Uses the SDE's ``marginal_mean_coeff`` when it has one. Otherwise the drift is probed at a few
    times: a zero drift gives ``None``; a non-zero drift without ``marginal_mean_coeff`` raises.
    """
    if getattr(sde, "has_zero_drift", False) is True:
        return None
    fn = getattr(sde, "marginal_mean_coeff", None)
    if fn is not None:
        return fn
    with jax.ensure_compile_time_eval():
        probe = jnp.ones((2, 2), jnp.result_type(float))
        f = jax.vmap(lambda t: sde.drift(probe, t))(jnp.asarray([0.1, 0.5, 1.0]))
        zero = is_concrete(f) and not bool(jnp.any(f != 0))
    if zero:
        return None
    raise ValueError(
        "sde: an SDE with a non-zero drift needs marginal_mean_coeff(t) (E[x(t)|x(0)] = "
        "alpha(t) x(0)) to match a noise level"
    )


def _ve_start_time(sigma, std):
    """Closed form inverse of ``lambda(t)^2 = (sigma^(2t) - 1) / (2 ln sigma)`` (method.md 2.1)."""
    log_s = math.log(float(sigma))
    if log_s == 0.0:
        return std**2  # sigma = 1: g = 1, lambda = sqrt(t)
    return jnp.log1p(2.0 * log_s * std**2) / (2.0 * log_s)


def _noise_to_signal(sde, alpha_fn, t: jax.Array) -> jax.Array:
    """``lambda(t) / alpha(t)`` per entry of a ``[B]`` vector of times."""
    r = _sde_std(sde, t)
    if alpha_fn is not None:
        r = r / jax.vmap(alpha_fn)(t).astype(t.dtype)
    return r


def _bisect_start_time(fn, target, t_min, t_max):
    """Bisection for ``fn(t) = target`` on ``[t_min, t_max]``, ``fn`` increasing; ``target [B]``."""
    lo = jnp.full(target.shape, t_min, target.dtype)
    hi = jnp.full(target.shape, t_max, target.dtype)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = fn(mid) >= target
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_ITERS, body, (lo, hi))
    return 0.5 * (lo + hi)


def tweedie_denoise(score_fn: ScoreFn, sde: Any, x, t) -> jax.Array:
    """The posterior mean ``E[x0 | x_t = x] = (x + lambda(t)^2 s(x, t)) / alpha(t)`` (Tweedie).

    For the marginal ``x_t = alpha(t) x0 + lambda(t) z`` (``alpha = 1`` for zero-drift SDEs such as
    VE and constant g; VP SDEs supply ``marginal_mean_coeff``), exact when ``s`` is the exact score
    of ``p_t``. One batched score evaluation.

    Args:
      score_fn: ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``.
      sde: object with ``perturbation_std`` (and ``marginal_mean_coeff`` if it has a drift).
      x: ``[B, C, H, W]`` states at time ``t``.
      t: scalar or ``[B]`` times, ``> 0`` where concrete.

    Returns:
      ``[B, C, H, W]`` in the dtype of ``x``.
    """
    x = check_images("x", x)
    tb = _batch_times("t", t, x.shape[0], x.dtype)
    if is_concrete(tb) and not bool(np.all(np.asarray(tb) > 0)):
        raise ValueError(f"t: expected times > 0 (lambda(0) = 0 leaves nothing to remove), got {np.asarray(tb)}")
    s = score_fn(x, tb)
    _check_score_output(s, x)
    lam = _sde_std(sde, tb)
    out = x + _bcast(lam * lam, x) * s.astype(x.dtype)
    alpha_fn = _mean_coeff_fn(sde)
    if alpha_fn is not None:
        out = out / _bcast(jax.vmap(alpha_fn)(tb).astype(x.dtype), x)
    return out.astype(x.dtype)


def with_final_denoise(r: SampleResult, score_fn: ScoreFn, sde: Any, t_end, final_denoise: bool = True) -> SampleResult:
    """A sampler's result ``r`` (ended at ``t_end``) with :func:`tweedie_denoise` applied to ``x``
    and to the last trajectory frame, ``num_score_evals`` one higher; ``r`` itself when
    ``final_denoise`` is false. ``times`` is unchanged: its last entry stays ``t_end``, the time
    of the state the posterior mean is taken from."""
    if not final_denoise:
        return r
    x = tweedie_denoise(score_fn, sde, r.x, t_end)
    traj = None if r.trajectory is None else r.trajectory.at[-1].set(x)
    return r._replace(x=x, trajectory=traj, num_score_evals=r.num_score_evals + 1, finite=_finite_rows(x))


def _check_sde_steps(method: str, sampler_kwargs: dict) -> None:
    """``method="sde"`` needs ``num_steps`` (euler_maruyama's own TypeError named no caller's argument)."""
    if method == "sde" and "num_steps" not in sampler_kwargs:
        raise ValueError("num_steps: required for method='sde' (the reverse SDE's fixed steps)")


def _check_t_range(t_min, t_max) -> tuple[float, float]:
    t_min, t_max = float(t_min), float(t_max)
    if not (0.0 <= t_min < t_max and np.isfinite(t_max)):
        raise ValueError(f"t_min, t_max: expected 0 <= t_min < t_max, got {t_min}, {t_max}")
    return t_min, t_max


def noise_range(sde: Any, *, t_min: float = 0.0, t_max: float = 1.0, dtype=None) -> tuple[float, float]:
    """The noise levels ``lambda(t) / alpha(t)`` of ``sde`` at ``t_min`` and ``t_max`` (``lambda(t)``
    for a zero-drift SDE): the range of ``noise_std`` that :func:`start_time` and :func:`denoise`
    accept on ``[t_min, t_max]``, in ``dtype`` (default: the default float dtype)."""
    t_min, t_max = _check_t_range(t_min, t_max)  # (reversed, it returned the pair reversed)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    with jax.ensure_compile_time_eval():
        ends = np.asarray(_noise_to_signal(sde, _mean_coeff_fn(sde), jnp.asarray([t_min, t_max], dtype)))
    return float(ends[0]), float(ends[1])


def start_time(sde: Any, noise_std, *, t_min: float = 0.0, t_max: float = 1.0) -> jax.Array:
    """The time ``t*`` whose forward marginal matches an image with additive noise ``noise_std``.

    For a zero-drift SDE (VE, constant g) ``x(t) = x(0) + lambda(t) z``, so ``t*`` solves
    ``lambda(t*) = noise_std``. For an SDE with the marginal ``alpha(t) x(0) + lambda(t) z`` (VP;
    the SDE supplies ``marginal_mean_coeff``) it solves ``lambda(t*) / alpha(t*) = noise_std``, and
    the noisy image must be scaled by ``alpha(t*)`` (as :func:`denoise` does).

    For :class:`krylovjax.sde.VESDE` the closed form ``t* = log(1 + 2 ln(sigma) noise_std^2) /
    (2 ln sigma)`` of ``lambda(t)^2 = (sigma^(2t) - 1) / (2 ln sigma)`` (method.md 2.1) is used,
    checked against the SDE's own ``perturbation_std`` when the values are concrete (bisection is
    the fallback). Otherwise the ratio is assumed increasing in ``t`` and ``t*`` is found by 60
    bisection steps on ``[t_min, t_max]`` (jit-compatible).

    Args:
      sde: object with ``perturbation_std(t)`` (and ``marginal_mean_coeff(t)`` if it has a drift).
      noise_std: scalar or ``[B]``; concrete values must lie in ``[r(t_min), r(t_max)]``, where
        ``r = lambda / alpha``.
      t_min, t_max: the admissible time interval, ``0 <= t_min < t_max``.

    Returns:
      ``t*`` with the shape of ``noise_std``, in the default float dtype (float64 under x64).
      Under tracing (``noise_std`` inside ``jax.jit``) the value checks below cannot raise:
      an entry that is not finite, ``<= 0`` or outside the SDE's range gives ``t* = NaN``
      (never a clipped ``t_min`` / ``t_max`` that could pass as a valid start time).

    Raises:
      ValueError: ``noise_std`` not finite, ``<= 0``, of rank > 1, or outside the SDE's range on
        ``[t_min, t_max]``; ``lambda / alpha`` constant or not increasing there (for concrete
        values; see Returns for traced ones).
    """
    std = jnp.asarray(noise_std)
    if std.ndim > 1:
        raise ValueError(f"noise_std: expected a scalar or a [B] vector, got shape {tuple(std.shape)}")
    std = std.astype(jnp.result_type(float))
    t_min, t_max = _check_t_range(t_min, t_max)
    alpha_fn = _mean_coeff_fn(sde)
    ratio = lambda t: _noise_to_signal(sde, alpha_fn, t)  # noqa: E731
    concrete = is_concrete(std)
    if concrete:
        a = np.asarray(std)
        if not (np.all(np.isfinite(a)) and np.all(a > 0)):
            raise ValueError(f"noise_std: expected finite values > 0, got {a}")
        ends = noise_range(sde, t_min=t_min, t_max=t_max, dtype=std.dtype)
        if not ends[1] > ends[0]:
            raise ValueError(
                f"sde: the noise level lambda(t)/alpha(t) = {ends[0]:.6g} is not increasing on "
                f"[{t_min}, {t_max}] (a constant perturbation_std?), so no start time matches a "
                "noise level; call the samplers with an explicit t_start instead"
            )
        if np.any(a < ends[0] * (1 - _RANGE_RTOL)) or np.any(a > ends[1] * (1 + _RANGE_RTOL)):
            raise ValueError(
                f"noise_std: expected values in the SDE's range [{ends[0]:.6g}, {ends[1]:.6g}] "
                f"(its noise level at t = {t_min} and t = {t_max}), got {a}"
            )
    t = None
    if _is_ve(sde):
        t = jnp.clip(_ve_start_time(sde.sigma, std), t_min, t_max)
        if concrete:
            with jax.ensure_compile_time_eval():
                lam = np.asarray(ratio(jnp.atleast_1d(t)))
            if not np.allclose(lam, np.atleast_1d(np.asarray(std)), rtol=1e-6, atol=0):
                t = None  # another lambda convention: fall back to bisection
    if t is None:
        flat = jnp.atleast_1d(std)
        t = jnp.reshape(_bisect_start_time(ratio, flat, t_min, t_max), std.shape)
        if concrete:
            with jax.ensure_compile_time_eval():
                lam = np.asarray(ratio(jnp.atleast_1d(t)))
            if not np.allclose(lam, np.atleast_1d(np.asarray(std)), rtol=1e-6, atol=0):
                raise ValueError(
                    "sde: lambda(t)/alpha(t) is not increasing on [t_min, t_max]; bisection found "
                    f"{lam} for noise_std = {np.asarray(std)}"
                )
    if not concrete:  # the checks above cannot raise: mark an unattainable level with NaN
        ends = ratio(jnp.asarray([t_min, t_max], std.dtype))
        ok = (std > 0) & (std >= ends[0] * (1 - _RANGE_RTOL)) & (std <= ends[1] * (1 + _RANGE_RTOL))
        t = jnp.where(ok & (ends[1] > ends[0]), t, jnp.asarray(jnp.nan, t.dtype))  # NaN std: ok is False
    return t


def denoise(
    score_fn: ScoreFn,
    sde: Any,
    noisy,
    *,
    noise_std,
    method: str = "ode",
    key=None,
    t_end: float = 1e-3,
    t_max: float = 1.0,
    final_denoise: bool = False,
    score_args: tuple = (),
    **sampler_kwargs,
) -> SampleResult:
    """Denoise ``noisy = x0 + noise_std z`` by integrating from ``t*`` down to ``t_end``.

    ``t*`` is the time whose forward marginal matches the noise level (:func:`start_time`):
    ``lambda(t*) = noise_std`` for zero-drift SDEs (VE, constant g; method.md 2.1), where
    ``noisy`` itself is a sample of the marginal at ``t*``. For an SDE with a drift and the
    marginal ``alpha(t) x0 + lambda(t) z`` (VP), ``lambda(t*) / alpha(t*) = noise_std`` and the
    sampler starts from ``alpha(t*) * noisy``. Each image may have its own noise level
    (``noise_std`` of shape ``[B]``) and then its own start time.

    Args:
      score_fn: ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``.
      sde: object with ``g2``, ``drift``, ``perturbation_std`` (and ``marginal_mean_coeff``).
      noisy: ``[B, C, H, W]`` noisy images.
      noise_std: scalar or ``[B]``, within the SDE's noise range on ``[t_end, t_max]``.
      method: ``"ode"`` (:func:`probability_flow`, Paper B) or ``"sde"`` (:func:`euler_maruyama`,
        which needs ``key`` and ``num_steps``; the steps span ``[t*, t_end]``).
      key: PRNG key (``method="sde"`` only).
      t_end: final time.
      t_max: largest admissible start time (the SDE's horizon, 1 in both papers).
      final_denoise: end with :func:`tweedie_denoise` at ``t_end`` (one more evaluation, counted).
      score_args: per-image arrays passed on as ``score_fn(x, t, *score_args)`` (see
        :func:`probability_flow`; needed there for ``step_control="per_image"``).
      **sampler_kwargs: passed to the sampler (``num_steps``, ``rtol``, ``clip``, ...; the ODE's
        ``step_control``).

    Returns:
      :class:`SampleResult` whose ``t_start`` holds ``t*`` per image. Under ``jax.jit`` an
      unattainable ``noise_std`` gives ``t* = NaN`` (:func:`start_time`): the ODE solver then
      raises at run time, ``method="sde"`` returns NaN samples (``finite`` False).

    Raises:
      ValueError: bad ``noise_std`` (see :func:`start_time`), unknown ``method``, missing
        ``key``, or a non-zero drift without ``marginal_mean_coeff``.
    """
    x = check_images("noisy", noisy)
    if method not in ("ode", "sde"):
        raise ValueError(f"method: expected 'ode' or 'sde', got {method!r}")
    if method == "sde":
        if key is None:
            raise ValueError("key: a PRNG key is required for method='sde'")
        check_key("key", key)
    _check_sde_steps(method, sampler_kwargs)
    final_denoise = _check_final_denoise(final_denoise, t_end)
    score_args = _check_score_args(score_args, x.shape[0])
    std = jnp.asarray(noise_std)
    if std.ndim == 1 and std.shape[0] != x.shape[0]:
        raise ValueError(
            f"noise_std: expected a scalar or shape [B] = ({x.shape[0]},), got shape {tuple(std.shape)}"
        )
    if is_concrete(t_end) and not (np.isfinite(float(t_end)) and float(t_end) >= 0):
        raise ValueError(f"t_end: expected a finite time >= 0, got {t_end!r}")
    t_star = start_time(sde, std, t_min=float(t_end), t_max=t_max)
    t0 = jnp.broadcast_to(t_star, (x.shape[0],)).astype(x.dtype)
    alpha_fn = _mean_coeff_fn(sde)
    if alpha_fn is not None:
        x = _bcast(jax.vmap(alpha_fn)(t0).astype(x.dtype), x) * x
    # t* may equal t_end up to round-off when noise_std = lambda(t_end): keep t_start > t_end.
    t0 = jnp.maximum(t0, jnp.nextafter(jnp.asarray(t_end, x.dtype), jnp.asarray(np.inf, x.dtype)))
    if method == "ode":
        r = probability_flow(score_fn, sde, x, t_start=t0, t_end=t_end, score_args=score_args, **sampler_kwargs)
    else:
        r = euler_maruyama(_bind(score_fn, score_args), sde, x, key, t_start=t0, t_end=t_end, **sampler_kwargs)
    return with_final_denoise(r, _bind(score_fn, score_args), sde, t_end, final_denoise)


def _check_score_args(score_args, batch: int) -> tuple:
    """``score_args`` as a tuple of arrays whose leading axis is the batch, or ValueError."""
    if not isinstance(score_args, (tuple, list)):
        raise TypeError(f"score_args: expected a tuple of arrays, got {type(score_args).__name__}")
    out = tuple(jnp.asarray(a) for a in score_args)
    for k, a in enumerate(out):
        if a.ndim == 0 or a.shape[0] != batch:
            raise ValueError(f"score_args[{k}]: expected the batch ({batch}) as leading axis, got shape {tuple(a.shape)}")
    return out


def _bind(score_fn: Callable, score_args: tuple) -> ScoreFn:
    """``score_fn`` with ``score_args`` passed on (itself when there are none)."""
    return score_fn if not score_args else (lambda x, t: score_fn(x, t, *score_args))


def _check_final_denoise(final_denoise, t_end) -> bool:
    if not isinstance(final_denoise, (bool, np.bool_)):
        raise TypeError(f"final_denoise: expected a bool, got {final_denoise!r}")
    if final_denoise and is_concrete(t_end) and not float(t_end) > 0:
        raise ValueError(f"final_denoise: needs t_end > 0 (nothing is left to remove at t_end = {t_end!r})")
    return bool(final_denoise)


def generate(
    score_fn: ScoreFn,
    sde: Any,
    shape: tuple[int, int, int, int],
    key,
    *,
    method: str = "ode",
    prior_std: float | None = None,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    dtype=None,
    final_denoise: bool = False,
    **sampler_kwargs,
) -> SampleResult:
    """Unconditional generation from the prior ``x(t_start) ~ N(0, prior_std^2 I)``.

    By default ``prior_std = lambda(t_start)``, the SDE's ``perturbation_std`` at ``t_start``: the
    spread of the forward marginal for the VE and VP SDEs (the usual VE prior, score_sde); Paper
    A's constant-g SDE with a fixed ``std`` returns that ``std`` instead, so pass ``prior_std``
    for it. Paper B's code starts from ``N(0, I)`` (method.md
    section 6): pass ``prior_std=1.0`` to reproduce it.

    Args:
      score_fn: ``(x [B, C, H, W], t [B]) -> [B, C, H, W]``.
      sde: object with ``g2``, ``drift``, ``perturbation_std``.
      shape: ``(B, C, H, W)``.
      key: PRNG key (split into the prior draw and, for ``"sde"``, the sampler noise).
      method: ``"ode"`` (:func:`probability_flow`) or ``"sde"`` (:func:`euler_maruyama`,
        requires ``num_steps``).
      prior_std: standard deviation of the prior, ``> 0``; ``None`` for ``lambda(t_start)``.
      t_start, t_end: time interval (scalars).
      dtype: floating dtype of the samples (default: the default float dtype).
      final_denoise: end with :func:`tweedie_denoise` at ``t_end`` (one more evaluation, counted).
      **sampler_kwargs: passed to the sampler.

    Returns:
      :class:`SampleResult`.
    """
    if method not in ("ode", "sde"):
        raise ValueError(f"method: expected 'ode' or 'sde', got {method!r}")
    check_key("key", key)
    _check_sde_steps(method, sampler_kwargs)
    final_denoise = _check_final_denoise(final_denoise, t_end)
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape):
        raise ValueError(f"shape: expected (B, C, H, W) of positive ints, got {shape!r}")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    if prior_std is None:
        with jax.ensure_compile_time_eval():
            prior_std = _sde_std(sde, jnp.asarray([t_start], dtype))[0]
    elif is_concrete(prior_std) and not (np.isfinite(float(prior_std)) and float(prior_std) > 0):
        raise ValueError(f"prior_std: expected a finite value > 0, got {prior_std!r}")
    k_prior, k_sample = jax.random.split(key)
    x_T = jnp.asarray(prior_std, dtype) * jax.random.normal(k_prior, shape, dtype)
    if method == "ode":
        r = probability_flow(score_fn, sde, x_T, t_start=t_start, t_end=t_end, **sampler_kwargs)
    else:
        r = euler_maruyama(score_fn, sde, x_T, k_sample, t_start=t_start, t_end=t_end, **sampler_kwargs)
    return with_final_denoise(r, score_fn, sde, t_end, final_denoise)
