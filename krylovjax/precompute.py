"""Score pre-computation: solve the log-FP equation for a batch of images (method.md 3.4).

``precompute_scores(images, config)`` takes images ``[B, C, H, W]`` in [0, 1] and returns the
log-densities ``m`` ``[B, C, N, H, W]``, the scores ``[B, C, N, 2, H, W]`` and solver statistics.
Every image and channel is one system per time step; all of them are solved together at each
step. A whole sweep over the time steps is one compiled program (``lax.scan``); the outer loop
is one of

- ``outer="sweeps"``: Paper B's Algorithm 1 (policy iteration). Sweep k solves every time step
  with the lagged score of sweep k-1, then updates all scores; an image stops when the relative
  change ``||m^(k) - m^(k-1)|| / ||m^(k-1)||`` over its (channel, time, pixel) values is at most
  ``outer_tol`` (per-image convergence masks: converged images are frozen).
- ``outer="timestep"``: Paper A's time-step-wise fixed point: at each step iterate
  ``solve -> update lagged score`` at most ``max_fixed_point`` times, until the relative change
  of that step's solution is at most ``outer_tol``.

The linear solver of each step is a strategy: ``"spsolve"`` (the reference, scipy on the host
through a callback), ``"gmres"``, ``"cross_matrix"`` (the paper's method, reconstructed),
``"recycled"``, ``"preconditioned"`` and ``"cross_matrix_precond"`` (see
:data:`krylovjax.cross_matrix.PRESETS`). Warm starts from the previous sweep are on by default.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax import cross_matrix, initial, reference, scores as scores_lib, sde as sde_lib
from krylovjax.data import validate_images
from krylovjax.fokker_planck import fp_operator

STRATEGIES = ("spsolve",) + tuple(cross_matrix.PRESETS)
OUTER = ("sweeps", "timestep")


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    """Settings of the pre-computation (immutable, hashable).

    Attributes:
      sde: SDE name for :func:`krylovjax.sde.get_sde` ("ve", "constant", "vp").
      sde_kwargs: its keyword arguments as a tuple of pairs, e.g. ``(("sigma", 5.0),)``.
      num_steps: N time levels (t_0 = eps holds m0).
      eps: first time.
      paper_b_time_grid: reproduce Paper B's (t, dt) (dt = 1/N).
      h: grid spacing of the pixel lattice.
      scheme, boundary: of the FP operator (:func:`krylovjax.fokker_planck.fp_operator`).
      initial: initial log-density method (:func:`krylovjax.initial.initial_log_density`).
      score_method, score_boundary: how scores are taken from m (:func:`krylovjax.scores.score`).
      outer: "sweeps" (Paper B) or "timestep" (Paper A).
      outer_tol: relative-change tolerance of the outer iteration.
      max_sweeps: sweep budget ("sweeps").
      max_fixed_point: iterations per step ("timestep").
      lag_init: initial lagged score for the first sweep: "initial" (score of m0) or "ones"
        (Paper B's code: every score 1).
      strategy: linear solver strategy (see module docstring).
      tol, restart, max_restarts, basis_size, chunk_size, projection: Krylov settings.
      seed_image: index of the seed image of the cross-matrix strategies.
      warm_start: start each solve from the previous sweep's (or iterate's) solution.
    """

    sde: str = "ve"
    sde_kwargs: tuple = (("sigma", 5.0),)
    num_steps: int = 20
    eps: float = 1e-3
    paper_b_time_grid: bool = False
    h: float = 1.0
    scheme: str = "consistent"
    boundary: str = "zero"
    initial: str = "paper_b_kde"
    score_method: str = "central"
    score_boundary: str = "zero"
    outer: str = "sweeps"
    outer_tol: float = 1e-6
    max_sweeps: int = 30
    max_fixed_point: int = 5
    lag_init: str = "initial"
    strategy: str = "cross_matrix_precond"
    tol: float = 1e-10
    restart: int = 20
    max_restarts: int = 50
    basis_size: int = 8
    chunk_size: int | None = 16
    projection: str = "minres"
    seed_image: int = 0
    warm_start: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.outer not in OUTER:
            raise ValueError(f"outer: expected one of {OUTER}, got {self.outer!r}")
        if (self.scheme != "consistent" and self.strategy != "spsolve"
                and cross_matrix.PRESETS[self.strategy]["precondition"] == "diffusion"):
            raise ValueError(
                f"strategy: {self.strategy!r} uses the diffusion preconditioner, which needs "
                f"scheme='consistent' (got {self.scheme!r}); use 'gmres' or 'cross_matrix'")
        if self.lag_init not in ("initial", "ones"):
            raise ValueError(f"lag_init: expected 'initial' or 'ones', got {self.lag_init!r}")
        for name in ("num_steps", "max_sweeps", "max_fixed_point"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (2 if name == "num_steps" else 1):
                raise ValueError(f"{name}: expected an integer >= "
                                 f"{2 if name == 'num_steps' else 1}, got {v!r}")
        for name in ("outer_tol", "tol", "h"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")

    def make_sde(self):
        return sde_lib.get_sde(self.sde, **dict(self.sde_kwargs))

    def solver_config(self, num_channels: int) -> cross_matrix.SolverConfig:
        if self.strategy == "spsolve":
            raise ValueError("strategy: 'spsolve' has no Krylov solver config")
        return cross_matrix.SolverConfig(
            **cross_matrix.PRESETS[self.strategy], projection=self.projection,
            basis_size=self.basis_size, seed_index=self.seed_image * num_channels,
            tol=self.tol, restart=self.restart, max_restarts=self.max_restarts,
            chunk_size=self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sde_kwargs"] = dict(self.sde_kwargs)
        return d


class PrecomputeResult(NamedTuple):
    """Output of :func:`precompute_scores`.

    Attributes:
      log_density: ``[B, C, N, H, W]`` m at every time level (level 0 is m0).
      scores: ``[B, C, N, 2, H, W]`` score fields (component 0 = d/dx along W).
      t: ``[N]`` time levels; dt: the step.
      stats: dict of solver statistics (see :func:`precompute_scores`).
    """

    log_density: Any
    scores: Any
    t: Any
    dt: float
    stats: dict


def _step_solver(config: PrecomputeConfig, num_channels: int):
    """(op, b, x0) -> (x, converged [S], matvecs [S]) for one step's batch of systems."""
    if config.strategy == "spsolve":
        def solve(op, b, x0):
            x = reference.spsolve_in_jit(op, b)
            S = b.shape[0]
            return x, jnp.ones((S,), bool), jnp.zeros((S,), jnp.int32)
        return solve
    scfg = config.solver_config(num_channels)

    def solve(op, b, x0):
        res = cross_matrix.solve_fp(op, b, scfg, x0=x0)
        return res.x, res.converged, res.num_matvecs
    return solve


def _score(config, m):
    return scores_lib.score(m, h=config.h, method=config.score_method,
                            boundary=config.score_boundary)


def _drift(sde, t, shape, h, dtype):
    """The drift field f on the pixel lattice, ``[2, H, W]``, or None when it is zero.

    For an SDE with a linear drift f(x) = -c(t) x (VP) we take x to be the pixel position
    relative to the grid centre [INF, the papers use f = 0]."""
    H, W = shape
    yy, xx = jnp.meshgrid((jnp.arange(H) - (H - 1) / 2) * h, (jnp.arange(W) - (W - 1) / 2) * h,
                          indexing="ij")
    pos = jnp.stack([xx, yy]).astype(dtype)
    f = sde.drift(pos, t)
    return f


def _relative_change(new, old, axes):
    num = jnp.sqrt(jnp.sum((new - old) ** 2, axis=axes))
    den = jnp.sqrt(jnp.sum(old ** 2, axis=axes))
    return num / jnp.maximum(den, jnp.finfo(new.dtype).tiny)


def _build(config: PrecomputeConfig, B: int, C: int, H: int, W: int, dtype):
    """Compile the per-sweep / per-run programs for a given problem shape."""
    sde = config.make_sde()
    t, dt = sde_lib.time_grid(config.num_steps, config.eps, paper_b=config.paper_b_time_grid,
                              dtype=dtype)
    g2s = sde.g2(t).astype(dtype)
    has_drift = not isinstance(sde, (sde_lib.VESDE, sde_lib.ConstantSDE))
    drifts = (jax.vmap(lambda tt: _drift(sde, tt, (H, W), config.h, dtype))(t)
              if has_drift else None)
    solve = _step_solver(config, C)
    S = B * C

    def make_op(g2, lag, f):
        return fp_operator(g2, dt, config.h, lag,
                           None if f is None else jnp.broadcast_to(f, (S, 2, H, W)),
                           scheme=config.scheme, boundary=config.boundary, dtype=dtype)

    @jax.jit
    def sweep(m0, lag, m_old, active):
        """One Algorithm-1 sweep. m0 [S,H,W]; lag [N,S,2,H,W]; m_old [N,S,H,W]; active [S]."""
        def step(m_prev, xs):
            g2, lag_n, x_old, f = xs
            op = make_op(g2, lag_n, f)
            b = op.rhs(m_prev)
            x0 = x_old if config.warm_start else None
            x, conv, mv = solve(op, b, x0)
            x = jnp.where(active[:, None, None], x, x_old)
            return x, (x, conv | ~active, jnp.where(active, mv, 0))
        xs = (g2s[1:], lag[1:], m_old[1:], None if drifts is None else drifts[1:])
        _, (ms, conv, mv) = jax.lax.scan(step, m0, xs)
        return jnp.concatenate([m0[None], ms]), conv, mv

    @jax.jit
    def timestep_run(m0):
        """Paper A's time-step-wise fixed point over all steps. m0 [S, H, W]."""
        def step(m_prev, xs):
            g2, f = xs

            def body(state):
                it, x, lag, act, conv, mv = state
                op = make_op(g2, lag, f)
                xn, c, m = solve(op, op.rhs(m_prev), x if config.warm_start else None)
                xn = jnp.where(act[:, None, None], xn, x)
                change = _relative_change(xn.reshape(B, -1), x.reshape(B, -1), 1)
                img_act = act.reshape(B, C)[:, 0] & (change > config.outer_tol)
                return (it + 1, xn, _score(config, xn), jnp.repeat(img_act, C),
                        conv & (c | ~act), mv + jnp.where(act, m, 0))

            def cond(state):
                return (state[0] < config.max_fixed_point) & jnp.any(state[3])

            init = (0, m_prev, _score(config, m_prev), jnp.ones((S,), bool),
                    jnp.ones((S,), bool), jnp.zeros((S,), jnp.int32))
            it, x, _, act, conv, mv = jax.lax.while_loop(cond, body, init)
            return x, (x, conv, mv, it, act.reshape(B, C)[:, 0])
        xs = (g2s[1:], None if drifts is None else drifts[1:])
        _, (ms, conv, mv, its, unconverged) = jax.lax.scan(step, m0, xs)
        return jnp.concatenate([m0[None], ms]), conv, mv, its, unconverged

    return t, dt, sweep, timestep_run


def precompute_scores(images, config: PrecomputeConfig = PrecomputeConfig(), *,
                      key=None, progress=None) -> PrecomputeResult:
    """Pre-compute log-densities and scores for a batch of images (method.md 3.4).

    Args:
      images: ``[B, C, H, W]`` float in [0, 1], C in {1, 3}, H, W >= 4.
      config: a :class:`PrecomputeConfig`.
      key: PRNG key, needed only by the ``paper_a_kde`` initial density.
      progress: optional callable ``progress(done_sweeps, max_sweeps, info_dict)``.

    Returns:
      A :class:`PrecomputeResult`. ``stats`` holds: ``systems_solved`` (linear systems solved,
      frozen images excluded), ``matvecs`` (total), ``matvecs_per_system``, ``nonconverged``
      (linear solves that did not reach ``tol``), ``sweeps`` ([B] per image, or fixed-point
      iterations per step for "timestep"), ``outer_converged`` ([B] bool), ``outer_change``
      ([B] last relative change), ``seconds`` (wall time, compile included),
      ``seconds_per_system``.
    """
    images = validate_images(images)
    B, C, H, W = images.shape
    if not 0 <= config.seed_image < B:
        raise ValueError(f"config.seed_image: expected an index in [0, {B}), got "
                         f"{config.seed_image}")
    dtype = images.dtype
    start = time.perf_counter()
    kw = {"key": key} if config.initial == "paper_a_kde" else {}
    m0 = initial.initial_log_density(images, method=config.initial, **kw).astype(dtype)
    S, N = B * C, config.num_steps
    m0s = m0.reshape(S, H, W)
    t, dt, sweep, timestep_run = _build(config, B, C, H, W, dtype)

    stats: dict[str, Any] = {}
    if config.outer == "sweeps":
        if config.lag_init == "ones":
            lag = jnp.ones((N, S, 2, H, W), dtype)
        else:
            lag = jnp.broadcast_to(_score(config, m0s), (N, S, 2, H, W))
        m_old = jnp.broadcast_to(m0s, (N, S, H, W))
        active = np.ones(B, bool)
        sweeps = np.zeros(B, np.int32)
        change = np.full(B, np.inf)
        systems = matvecs = nonconv = 0
        for k in range(config.max_sweeps):
            act_s = jnp.asarray(np.repeat(active, C))
            m_new, conv, mv = sweep(m0s, lag, m_old, act_s)
            ch = np.asarray(_relative_change(
                jnp.swapaxes(m_new, 0, 1).reshape(B, -1), jnp.swapaxes(m_old, 0, 1).reshape(B, -1),
                1))
            change = np.where(active, ch, change)
            systems += int(active.sum()) * C * (N - 1)
            matvecs += int(np.asarray(mv).sum())
            nonconv += int((~np.asarray(conv)).sum())
            sweeps += active
            lag = _score(config, m_new)
            m_old = m_new
            active = active & ~(change <= config.outer_tol)
            if progress is not None:
                progress(k + 1, config.max_sweeps, dict(active=int(active.sum()),
                                                        max_change=float(change.max()),
                                                        systems=systems))
            if not active.any():
                break
        m_all = m_old
        stats.update(sweeps=sweeps, outer_converged=~active, outer_change=change)
    else:
        m_all, conv, mv, its, unconv = timestep_run(m0s)
        its = np.asarray(its)
        mvn = np.asarray(mv)
        systems = int(its.sum()) * S  # upper bound: frozen images counted per iteration
        matvecs = int(mvn.sum())
        nonconv = int((~np.asarray(conv)).sum())
        stats.update(fixed_point_iterations=its,
                     outer_converged=~np.asarray(unconv).any(axis=0),
                     fixed_point_unconverged_steps=int(np.asarray(unconv).sum()))
        if progress is not None:
            progress(1, 1, dict(systems=systems))
    m_all = jax.block_until_ready(m_all)
    seconds = time.perf_counter() - start
    scores = _score(config, m_all)  # [N, S, 2, H, W]
    log_density = jnp.moveaxis(m_all.reshape(N, B, C, H, W), 0, 2)
    scores = jnp.moveaxis(scores.reshape(N, B, C, 2, H, W), 0, 2)
    stats.update(systems_solved=systems, matvecs=matvecs,
                 matvecs_per_system=matvecs / max(systems, 1), nonconverged=nonconv,
                 seconds=seconds, seconds_per_system=seconds / max(systems, 1),
                 strategy=config.strategy)
    return PrecomputeResult(log_density=log_density, scores=scores, t=t, dt=dt, stats=stats)
