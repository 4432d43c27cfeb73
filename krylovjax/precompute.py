"""Score pre-computation: solve the log-FP equation for a batch of images (method.md 3.4).

``precompute_scores(images, config)`` takes images ``[B, C, H, W]`` in [0, 1] and returns the
log-densities ``m`` ``[B, C, N, H, W]``, the scores ``[B, C, N, 2, H, W]`` and solver statistics.
Every image and channel is one system per time step; all of them are solved together at each
step. A whole sweep over the time steps is one compiled program (``lax.scan``); the outer loop
is one of

- ``outer="sweeps"``: Paper B's Algorithm 1 (policy iteration). Sweep k solves every time step
  with the lagged score of sweep k-1 (the score of sweep k-1's m at that step, computed inside
  the step and never stored: only the ``[N, S, H, W]`` log-densities are carried between
  sweeps); an image stops when the relative
  change ``||m^(k) - m^(k-1)|| / ||m^(k-1)||`` over its (channel, time, pixel) values is at most
  ``outer_tol`` (per-image convergence masks: converged images are frozen).
- ``outer="timestep"``: Paper A's time-step-wise fixed point: at each step iterate
  ``solve -> update lagged score`` at most ``max_fixed_point`` times, until the relative change
  of that step's solution is at most ``outer_tol``.

The linear solver of each step is a strategy (:data:`STRATEGIES`): ``"spsolve"`` (the reference,
scipy on the host through a callback) or a preset of :data:`krylovjax.cross_matrix.PRESETS`:
``"gmres"``, ``"bicgstab"``, ``"cross_matrix"`` (the paper's method, reconstructed),
``"recycled"``, ``"preconditioned"``, ``"cross_matrix_precond"`` (the default), ``"fast"``
(BiCGStab on the exact red-black reduction, the fastest on a CPU), and the line and block
preconditioned variants (``"preconditioned_line"``, ``"cross_matrix_block"``, ...). Warm starts
from the previous sweep are on by default.

Sharding (``PrecomputeConfig(shard=True)``): the systems (images x channels) are split over all
local devices along a ``Mesh`` axis ``"data"`` and each device solves its own shard inside
``jax.shard_map``: no communication at all, since the systems are independent. Two consequences:

- the cross-matrix seed is *per device*: device d uses its own local image ``seed_image`` (global
  image ``d * B / D + seed_image``), so the seed basis differs from the single-device run and
  the results agree to the solver tolerance, not bit for bit. Seedless strategies solve the
  same systems, but each device runs a batch of another shape (the padding below changes it
  too), so XLA's reductions may round differently: they agree to rounding (6e-8 in float32
  for "fast" with B = 3 on 2 devices), not necessarily bit for bit;
- a batch whose image count B is not a multiple of the device count D is padded with copies of
  its last image up to the next multiple (the copies are solved and dropped; statistics exclude
  them). ``seed_image`` must be below ``ceil(B / D)``.

Compiled programs are cached per (config, shape, dtype, devices), so calling
:func:`precompute_scores` again on a batch of the same shape (the chunks of a large run, or a
timed benchmark after :func:`precompile`) does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax import _checks, cross_matrix, fokker_planck, initial, krylov, reference, scores as scores_lib, sde as sde_lib
from krylovjax.data import validate_images
from krylovjax.fokker_planck import fp_operator

STRATEGIES = ("spsolve",) + tuple(cross_matrix.PRESETS)
OUTER = ("sweeps", "timestep")
LAG_INITS = ("initial", "march", "ones")
#: ``PrecomputeConfig(tol=None)``: the linear solvers' relative tolerance for each compute dtype.
#: float32 cannot reach 1e-10 (BUILD_NOTES.md, "float32 (accelerators): attainable tolerance":
#: on the built-in photos 1e-6 gives no non-converged solve and scores within ~1e-5 of float64;
#: 1e-7 is at the edge; constant images and a checkerboard miss 1e-6 in some solves of `fast`,
#: which says so in its stats). On stiff steps (sigma 8-25) 1e-6 is below what float32 attains;
#: a solve that stops within that, 2 eps || |A| |x| ||, counts as converged (_at_precision).
DEFAULT_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-6}
# Integer fields of PrecomputeConfig and their smallest allowed value.
_INT_FIELDS = {"num_steps": 2, "max_sweeps": 1, "max_fixed_point": 1, "restart": 1,
               "max_restarts": 1, "basis_size": 1, "seed_image": 0, "divergence_patience": 0}


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
        The default ``"paper_b_kde"`` (alias ``"paper_b"``) pairs each image with its
        transpose and needs square images (H == W; :func:`precompute_scores` raises
        ValueError otherwise); ``"paper_a_kde"`` and ``"intensity"`` take any H x W.
      score_method, score_boundary: how scores are taken from m (:func:`krylovjax.scores.score`).
        ``score_boundary="reflect"`` mirrors about the boundary node, the operator's
        ``boundary="reflect"`` half a cell out: two different conditions, set separately.
      outer: "sweeps" (Paper B) or "timestep" (Paper A).
      outer_tol: relative-change tolerance of the outer iteration.
      max_sweeps: sweep budget ("sweeps").
      max_fixed_point: iterations per step ("timestep").
      lag_init: initial lagged score for the first sweep: "initial" (score of m0), "march"
        (the first sweep lags the score by one time step: m^n is solved with the score of the
        m^{n-1} just computed, Paper A's explicit lag as a predictor; about one sweep fewer
        on the built-in images) or "ones" (Paper B's code: every score 1; with the "paper_b"
        scheme, which sums the two components, the components (1, 0)).
      strategy: linear solver strategy (see module docstring).
      tol: relative residual tolerance of the linear solves, or None (default): the
        images' compute dtype decides, 1e-10 for float64 and 1e-6 for float32
        (:data:`DEFAULT_TOL`; float32 cannot reach 1e-10, BUILD_NOTES.md "float32
        (accelerators): attainable tolerance"). Resolved by :meth:`resolve` where the dtype is
        known (:func:`precompute_scores`, :func:`precompile`), so a float64 run with the default
        is the run with ``tol=1e-10``. ``to_dict()`` records None as None.
      restart, max_restarts, basis_size, chunk_size, projection: Krylov settings
        (:class:`krylovjax.cross_matrix.SolverConfig`; ``chunk_size="auto"`` picks
        cache-sized chunks on CPU and the whole batch on accelerators; ``projection=None``
        keeps the strategy's own, ``"minres"`` unless the preset names one).
      seed_image: index of the seed image of the cross-matrix strategies.
      warm_start: start each solve from the previous sweep's (or iterate's) solution.
      shard: split the systems over all local devices (see the module docstring).
      forcing: inexact sweeps ("sweeps" only, Krylov strategies): sweep k solves an image's
        systems to the relative residual ``clip(forcing * change_{k-1}, tol, forcing)``
        instead of ``tol``, where ``change_{k-1}`` is the image's last relative change (the
        first sweep uses ``forcing``). Early sweeps, whose lagged scores are still far from the
        fixed point, are then solved only as accurately as they are useful; an image converges
        only at a sweep solved to ``tol`` itself. 0 (default) solves every sweep to ``tol``.
      divergence_patience: ("sweeps") stop an image whose relative change has not reached a
        new minimum for this many consecutive sweeps (reported in ``outer_diverged``); 0
        (default, Paper B's Algorithm 1) iterates up to ``max_sweeps``. Either way the result
        of an image is its iterate with the smallest change: the last one when it converges.
      compact: ("sweeps", unsharded) after the first sweep, solve only the images still
        iterating: they are gathered into a smaller batch, their count rounded up to a power of
        two of at least ``compact`` images (one compiled sweep per such size), and scattered
        back. A converged image then costs nothing, as in Paper B's code; without it its
        systems are skipped but every step still pays its solver set-up (about half the cost
        of a solved system for the "fast" preset on CPU). The cross-matrix seed image is the
        first image of every compacted batch. None: always the whole batch.

    Checked on construction (ValueError naming the field): option names, ranges, ``sde`` and
    ``sde_kwargs`` (the SDE is built once). Integer fields accept any integral value
    (``numpy.int64`` too; not bools) and are stored as Python ints. ``basis_size`` must also
    be at most H * W (the unknowns of one system) for the strategies with a seed basis; that
    is checked once the images' shape is known (:func:`precompile`,
    :func:`precompute_scores`).
    """

    sde: str = "ve"
    sde_kwargs: tuple = (("sigma", 5.0),)
    num_steps: int = 20
    eps: float = 1e-3
    paper_b_time_grid: bool = False
    h: float = 1.0
    scheme: str = "fitted"
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
    tol: float | None = None
    restart: int = 20
    max_restarts: int = 50
    basis_size: int = 8
    chunk_size: int | str | None = "auto"
    projection: str | None = None
    seed_image: int = 0
    warm_start: bool = True
    shard: bool = False
    forcing: float = 0.0
    divergence_patience: int = 0
    compact: int | None = 8

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.scheme not in fokker_planck.SCHEMES:
            raise ValueError(f"scheme: expected one of {fokker_planck.SCHEMES}, got {self.scheme!r}")
        if self.boundary not in ("zero", "reflect"):  # "dirichlet" needs ghost values, which nothing supplies
            raise ValueError(f"boundary: expected 'zero' or 'reflect' (the pre-computation has no Dirichlet "
                             f"values), got {self.boundary!r}")
        if self.score_method not in scores_lib.SCORE_METHODS:
            raise ValueError(f"score_method: expected one of {scores_lib.SCORE_METHODS}, got {self.score_method!r}")
        if self.score_boundary not in scores_lib.SCORE_BOUNDARIES:
            raise ValueError(f"score_boundary: expected one of {scores_lib.SCORE_BOUNDARIES}, "
                             f"got {self.score_boundary!r}")
        if self.outer not in OUTER:
            raise ValueError(f"outer: expected one of {OUTER}, got {self.outer!r}")
        precondition = (None if self.strategy == "spsolve"
                        else cross_matrix.PRESETS[self.strategy].get("precondition"))
        if self.scheme == "paper_b" and precondition in cross_matrix.GRID_PRECONDITIONERS:
            raise ValueError(
                f"strategy: {self.strategy!r} uses the {precondition!r} preconditioner, which "
                f"needs scheme='consistent' or 'fitted' (got {self.scheme!r}); use 'gmres' or "
                f"'cross_matrix'")
        if self.initial not in initial.INITIAL_METHODS:
            raise ValueError(f"initial: expected one of {tuple(initial.INITIAL_METHODS)}, got "
                             f"{self.initial!r}")
        if self.lag_init not in LAG_INITS:
            raise ValueError(f"lag_init: expected one of {LAG_INITS}, got {self.lag_init!r}")
        for name, low in _INT_FIELDS.items():  # stored as Python ints
            object.__setattr__(self, name, _checks.as_int(name, getattr(self, name), low))
        if not (self.chunk_size is None or (isinstance(self.chunk_size, str)
                                            and self.chunk_size == "auto")):
            object.__setattr__(self, "chunk_size", _checks.as_int(
                "chunk_size", self.chunk_size, 1, what="None, 'auto' or an integer >= 1"))
        if self.compact is not None:
            object.__setattr__(self, "compact", _checks.as_int(
                "compact", self.compact, 1, what="None or an integer >= 1"))
        if not isinstance(self.shard, bool):
            raise ValueError(f"shard: expected a bool, got {self.shard!r}")
        for name in ("forcing", "eps", "outer_tol", "h") + (() if self.tol is None else ("tol",)):
            object.__setattr__(self, name, _checks.as_real(name, getattr(self, name)))  # NumPy floats too
        if not 0 <= self.forcing < 1:
            raise ValueError(f"forcing: expected a number in [0, 1), got {self.forcing!r}")
        if not 0 <= self.eps < 1:  # the time grid runs from eps to T = 1
            raise ValueError(f"eps: expected the first time in [0, 1), got {self.eps!r}")
        if self.forcing > 0 and self.outer != "sweeps":
            raise ValueError(f"forcing: inexact solves are for outer='sweeps', got outer="
                             f"{self.outer!r} (use forcing=0)")
        for name in ("outer_tol", "tol", "h"):  # Python floats by now (as_real above)
            v = getattr(self, name)
            if name == "tol" and v is None:  # the compute dtype's default (DEFAULT_TOL)
                continue
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected {'None or ' if name == 'tol' else ''}a "
                                 f"finite number > 0, got {v!r}")
        if str(self.sde).lower() not in sde_lib.sde_names():  # as get_sde reads it
            raise ValueError(f"sde: expected one of {sde_lib.sde_names()}, got {self.sde!r}")
        try:
            kwargs = dict(self.sde_kwargs)
            hash(self.sde_kwargs)  # the config keys the compiled programs' cache
        except (TypeError, ValueError) as err:
            raise ValueError(f"sde_kwargs: expected a tuple of (name, value) pairs, got "
                             f"{self.sde_kwargs!r}") from err
        try:
            sde_lib.get_sde(self.sde, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sde_kwargs: {err} (sde={self.sde!r}, sde_kwargs="
                             f"{self.sde_kwargs!r})") from err

    def make_sde(self):
        return sde_lib.get_sde(self.sde, **dict(self.sde_kwargs))

    def resolve(self, dtype=None) -> "PrecomputeConfig":
        """This config for images computed in ``dtype`` (float32 or float64; None: JAX's
        default float): ``tol=None`` replaced by :data:`DEFAULT_TOL` of that dtype (1e-10 for
        float64, 1e-6 for float32); a config with a tolerance is returned as it is, unless the
        tolerance is below ``dtype``'s machine epsilon (ValueError naming ``tol``): no residual
        computed in that dtype can verify it, so every Krylov solve would run to its iteration
        limit and be reported unconverged (a walkthrough: the demo's ``tol=1e-10`` with
        ``dtype=float32`` took 8x the matvecs and flagged every solve and image)."""
        dtype = jax.dtypes.canonicalize_dtype(np.float64 if dtype is None else dtype)
        if self.tol is not None:
            eps = float(np.finfo(dtype).eps) if dtype in DEFAULT_TOL else 0.0
            if self.tol < eps and self.strategy != "spsolve":
                raise ValueError(
                    f"tol: {self.tol:g} is below {dtype}'s machine epsilon {eps:.3g}, where no residual can "
                    f"verify it (every solve would run to its iteration limit, unconverged): expected a "
                    f"tolerance >= {eps:.3g} in {dtype} (unset, it is {DEFAULT_TOL[dtype]:g}), or float64")
            return self
        if dtype not in DEFAULT_TOL:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        return dataclasses.replace(self, tol=DEFAULT_TOL[dtype])

    @property
    def inexact(self) -> bool:
        """Whether sweeps solve to ``forcing``'s looser tolerances (a Krylov strategy with
        ``forcing > 0``; spsolve's solves are exact whatever ``forcing`` says)."""
        return self.forcing > 0 and self.strategy != "spsolve"

    def solver_config(self, num_channels: int, dtype=None) -> cross_matrix.SolverConfig:
        """The Krylov solver config; ``tol=None`` resolves for ``dtype`` (:meth:`resolve`)."""
        if self.strategy == "spsolve":
            raise ValueError("strategy: 'spsolve' has no Krylov solver config")
        preset = dict(cross_matrix.PRESETS[self.strategy])
        if self.projection is not None:
            preset["projection"] = self.projection
        return cross_matrix.SolverConfig(
            **preset, basis_size=self.basis_size, seed_index=self.seed_image * num_channels,
            tol=self.resolve(dtype).tol, atol=1.0 if self.forcing > 0 else 0.0,
            restart=self.restart, max_restarts=self.max_restarts,
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
      stats: dict of solver statistics (see :func:`precompute_scores`); entries ending in
        ``_per_image`` are numpy arrays ``[B]``.
    """

    log_density: Any
    scores: Any
    t: Any
    dt: float
    stats: dict


def _step_solver(config: PrecomputeConfig, num_channels: int):
    """(op, b, x0, active) -> (x, converged [S], matvecs [S]) for one step's batch of systems.

    Systems with ``active`` False (images whose outer iteration has converged) are not solved:
    spsolve skips them (as Paper B's code skips converged images), and the Krylov solvers get
    ``b = 0, x0 = 0`` for them, which they return at once with no matvec; only the cross-matrix
    seed system keeps its real problem, since its basis serves the other systems. The caller
    discards the results of inactive systems but counts the matvecs returned: those of the
    systems solved, the seed's (its basis and its solve) included when its image is inactive
    (they were dropped with its results until 2026-12-07: the seed's work went uncounted in the
    sweeps after its image converged)."""
    seed = config.seed_image * num_channels
    if config.strategy == "spsolve":
        def solve(op, b, x0, active, tol=None):
            x = reference.spsolve_in_jit(op, b, active, check_finite=False)
            S = b.shape[0]
            # a factorisation that produced inf/NaN (sigma 1e200, say) is a failed solve: it was
            # counted as converged, so `nonconverged` said 0 (a review, 2026-12-07)
            return x, jnp.isfinite(x).all(axis=(1, 2)), jnp.zeros((S,), jnp.int32)
        return solve
    scfg = config.solver_config(num_channels)

    def solve(op, b, x0, active, tol=None):
        solved = active if scfg.method == "gmres" else active.at[seed].set(True)
        keep = solved[:, None, None]
        b = jnp.where(keep, b, 0.0)
        x0 = None if x0 is None else jnp.where(keep, x0, 0.0)
        if tol is None:
            res = cross_matrix.solve_fp(op, b, scfg, x0=x0)
            x = res.x
        else:
            # Per-system tolerances through the static config: with atol = 1 the solver stops at
            # ||c r|| <= max(tol ||c b||, 1); the scale c = 1 / (tol_i ||b||) makes that
            # ||r|| <= tol_i ||b|| (tol_i >= tol). The systems are linear: solve for c x.
            bn = jnp.sqrt(jnp.sum(b * b, axis=(1, 2)))
            c = jnp.where(bn > 0, 1.0 / (tol.astype(b.dtype) * jnp.where(bn > 0, bn, 1.0)), 1.0)
            res = cross_matrix.solve_fp(op, b * c[:, None, None], scfg,
                                        x0=None if x0 is None else x0 * c[:, None, None])
            x = res.x / c[:, None, None]
        # (the residual's norm as the solver takes it: sqrt(sum(b * b)) underflowed to 0 for a
        # float32 b below about 1e-19, and every failed solve passed; a review)
        r = res.residual * krylov.scaled_norm(b.reshape(b.shape[0], -1))
        return x, res.converged | _at_precision(op, x, r), jnp.where(solved, res.num_matvecs, 0)
    return solve


#: ``_at_precision``'s slack on ``eps || |A| |x| ||``: the solvers' reported residuals near that
#: bound were 0.25-1.48 times the true (float64) ones, and with no slack a solve at 1.2 times it
#: still failed by rounding luck, leaving an image's best iterate 10x less accurate (a review).
ATTAINABLE_SLACK = 2.0


def _at_precision(op, x, r):
    """``[S]``: a solve that stopped short of its tolerance (STAGNATION, MAX_ITERATIONS) with a
    residual ``r = ||b - A x||`` within what its dtype attains near ``x``,
    ``ATTAINABLE_SLACK * eps * || |A| |x| ||`` (normwise), is as accurate as the dtype allows:
    it counts as converged. float32's tolerance 1e-6 is out of reach on stiff steps (sigma
    8-25), where which solves still met it depended on rounding, so on the batch's chunking
    (forty-first session). The solution is the solver's, unchanged; only the verdict is.
    Stopping the solves at that residual instead cost accuracy (measured), since solvers often
    get below it."""
    aop = dataclasses.replace(op, centre=jnp.abs(op.centre), east=jnp.abs(op.east),
                              west=jnp.abs(op.west), south=jnp.abs(op.south), north=jnp.abs(op.north))
    ax = aop.matvec(jnp.abs(x))
    floor = ATTAINABLE_SLACK * jnp.finfo(x.dtype).eps * krylov.scaled_norm(ax.reshape(ax.shape[0], -1))
    return jnp.isfinite(floor) & jnp.isfinite(r) & (r <= floor)


def _score(config, m):
    return scores_lib.score(m, h=config.h, method=config.score_method,
                            boundary=config.score_boundary)


def _drift(sde, t, shape, h, dtype):
    """The drift field f on the pixel lattice, ``[2, H, W]``, or None when it is zero.

    For an SDE with a linear drift f(x) = -c(t) x (VP) we take x to be the pixel position
    relative to the grid centre [INF, the papers use f = 0]."""
    H, W = shape
    yy, xx = jnp.meshgrid((jnp.arange(H, dtype=float) - (H - 1) / 2) * h,  # float: as promoted
                          (jnp.arange(W, dtype=float) - (W - 1) / 2) * h,
                          indexing="ij")
    pos = jnp.stack([xx, yy]).astype(dtype)
    f = sde.drift(pos, t)
    return f


def _relative_change(new, old, axes):
    """``||new - old|| / ||old||``; NaN (never converged) when ``||old||^2`` overflowed."""
    num = jnp.sqrt(jnp.sum((new - old) ** 2, axis=axes))
    den = jnp.sqrt(jnp.sum(old ** 2, axis=axes))
    return jnp.where(jnp.isfinite(den), num / jnp.maximum(den, jnp.finfo(new.dtype).tiny), jnp.nan)


def _devices(config: PrecomputeConfig):
    """The devices of the "data" mesh axis (all local devices), or None when not sharded."""
    return tuple(jax.local_devices()) if config.shard else None


class _Programs(NamedTuple):
    t: Any
    dt: float
    sweep: Any          # jitted (m0, m_old, active, tol, first) -> (m, conv, mv, dsq, osq)
    timestep_run: Any   # jitted m0 -> (m, scores, conv, mv, iterations, unconverged)
    scores: Any         # jitted m [N,S,H,W] -> scores [N,S,2,H,W] (the sweeps' result)
    initial: Any        # jitted (images [B,C,H,W], key) -> (m0 [S,H,W], m0 at every level)
    place: Any          # sharded runs: jitted host m0 [S,H,W] -> (m0, m0 at every level) on
                        # the mesh; None otherwise
    keep_improved: Any  # jitted (improved [S], m_new, m_best) -> the best iterates [N,S,H,W]
    arg_specs: dict     # ShapeDtypeStructs of the arguments, for ahead-of-time compilation


def _ones_score(config: PrecomputeConfig, like):
    """``lag_init="ones"``: Paper B's code starts from the score 1. Its scheme ("paper_b") uses
    the scalar sum of the two components, so that is (1, 0) there; the other schemes get 1 in
    both components."""
    ones = jnp.ones_like(like)
    return ones.at[:, 1].set(0.0) if config.scheme == "paper_b" else ones


@functools.lru_cache(maxsize=64)
def _build(config: PrecomputeConfig, B: int, C: int, H: int, W: int, dtype: np.dtype,
           devices: tuple | None) -> _Programs:
    """Compile-once programs for one problem shape: a whole sweep (``lax.scan`` over the time
    steps) and Paper A's time-step-wise run. ``B`` is the padded image count; with ``devices``
    the programs run per device on its shard of the S = B * C systems (``jax.shard_map``)."""
    sde = config.make_sde()
    t, dt = sde_lib.time_grid(config.num_steps, config.eps, paper_b=config.paper_b_time_grid,
                              dtype=dtype)
    g2s = sde.g2(t).astype(dtype)
    has_drift = not isinstance(sde, (sde_lib.VESDE, sde_lib.ConstantSDE))
    drifts = (jax.vmap(lambda tt: _drift(sde, tt, (H, W), config.h, dtype))(t)
              if has_drift else None)
    solve = _step_solver(config, C)
    S, N = B * C, config.num_steps

    def make_op(g2, lag, f):
        s_loc = lag.shape[0]
        return fp_operator(g2, dt, config.h, lag,
                           None if f is None else jnp.broadcast_to(f, (s_loc, 2, H, W)),
                           scheme=config.scheme, boundary=config.boundary, dtype=dtype)

    forcing = config.inexact

    def sweep_local(m0, m_old, active, tol, first):
        """One Algorithm-1 sweep on (a shard of) the systems.

        m0 [S,H,W]; m_old [N,S,H,W] the last sweep's iterate (m0 at every level before the
        first sweep); active [S]; tol [S] relative residual tolerances (used with ``forcing``
        only); first: scalar bool, the first sweep, whose solves start from the previous time
        step's solution. The lagged score of step n is the score of m_old[n], computed in the
        step (fused into the operator's coefficients; never stored), except in the first
        sweep with ``lag_init`` "ones" (a field of ones) or "march" (the score of the
        previous step's new solution). Returns the new m [N,S,H,W], converged and matvecs
        [N-1,S], and per system sum((m - m_old)^2), sum(m_old^2) [S] for the outer test."""
        def step(m_prev, xs):
            g2, x_old, f = xs
            lag_n = _score(config, x_old)
            if config.lag_init == "march":  # first sweep: lag the score by one time step
                lag_n = jax.lax.cond(first, lambda: _score(config, m_prev), lambda: lag_n)
            elif config.lag_init == "ones":
                lag_n = jax.lax.cond(first, lambda: _ones_score(config, lag_n), lambda: lag_n)
            op = make_op(g2, lag_n, f)
            b = op.rhs(m_prev)
            x0 = jnp.where(first, m_prev, x_old) if config.warm_start else None
            x, conv, mv = solve(op, b, x0, active, tol if forcing else None)
            x = jnp.where(active[:, None, None], x, x_old)
            return x, (x, conv | ~active, mv)  # mv: the systems solved (the seed's too)
        xs = (g2s[1:], m_old[1:], None if drifts is None else drifts[1:])
        _, (ms, conv, mv) = jax.lax.scan(step, m0, xs)
        m = jnp.concatenate([m0[None], ms])
        dsq = jnp.sum((m - m_old) ** 2, axis=(0, 2, 3))
        osq = jnp.sum(m_old ** 2, axis=(0, 2, 3))
        return m, conv, mv, dsq, osq

    def timestep_local(m0):
        """Paper A's time-step-wise fixed point over all steps on (a shard of) the systems.

        m0 [S, H, W]. Returns m [N,S,H,W], scores [N,S,2,H,W], and per step and system
        [N-1,S]: linear solves that did not reach tol, matvecs, fixed-point iterations, image
        not fixed-point converged. As in the sweeps, an image's fixed point counts as reached
        only from a trusted iteration: a finite change <= outer_tol with every solve of the
        image converged (a solve that fails and returns its warm start changes nothing)."""
        s_loc = m0.shape[0]
        b_loc = s_loc // C

        def step(m_prev, xs):
            g2, f = xs

            def body(state):
                it, x, lag, act, nfail, mv, nit = state
                op = make_op(g2, lag, f)
                xn, c, m = solve(op, op.rhs(m_prev), x if config.warm_start else None, act)
                xn = jnp.where(act[:, None, None], xn, x)
                change = _relative_change(xn.reshape(b_loc, -1), x.reshape(b_loc, -1), 1)
                trusted = (c | ~act).reshape(b_loc, C).all(axis=1)
                done = trusted & (change <= config.outer_tol)  # False for a NaN change
                img_act = act.reshape(b_loc, C)[:, 0] & ~done
                return (it + 1, xn, _score(config, xn), jnp.repeat(img_act, C),
                        nfail + (act & ~c).astype(jnp.int32), mv + m,
                        nit + act.astype(jnp.int32))

            def cond(state):
                return (state[0] < config.max_fixed_point) & jnp.any(state[3])

            init = (0, m_prev, _score(config, m_prev), jnp.ones((s_loc,), bool),
                    jnp.zeros((s_loc,), jnp.int32), jnp.zeros((s_loc,), jnp.int32),
                    jnp.zeros((s_loc,), jnp.int32))
            _, x, _, act, nfail, mv, nit = jax.lax.while_loop(cond, body, init)
            return x, (x, nfail, mv, nit, act)
        xs = (g2s[1:], None if drifts is None else drifts[1:])
        _, (ms, nfail, mv, nit, unconverged) = jax.lax.scan(step, m0, xs)
        m = jnp.concatenate([m0[None], ms])
        return m, _score(config, m), nfail, mv, nit, unconverged

    specs = dict(
        sweep=(jax.ShapeDtypeStruct((S, H, W), dtype),
               jax.ShapeDtypeStruct((N, S, H, W), dtype), jax.ShapeDtypeStruct((S,), jnp.bool_),
               jax.ShapeDtypeStruct((S,), dtype), jax.ShapeDtypeStruct((), jnp.bool_)),
        timestep_run=(jax.ShapeDtypeStruct((S, H, W), dtype),),
        scores=(jax.ShapeDtypeStruct((N, S, H, W), dtype),),
        initial=(jax.ShapeDtypeStruct((B, C, H, W), dtype),
                 jax.eval_shape(lambda: jax.random.key(0))
                 if initial.needs_key(config.initial) else None),
        keep_improved=(jax.ShapeDtypeStruct((S,), jnp.bool_),
                       jax.ShapeDtypeStruct((N, S, H, W), dtype),
                       jax.ShapeDtypeStruct((N, S, H, W), dtype)))
    scores_local = functools.partial(_score, config)
    levels = N if config.outer == "sweeps" else 1
    # The initial density runs on one device in sharded runs too: the same m0 bit for bit,
    # and XLA's partitioner would replicate the KDE's lax.map over the images on every device.
    initial_prog = jax.jit(functools.partial(_initial_fn, method=config.initial, h=config.h,
                                             levels=levels if devices is None else 1))
    if devices is None:
        return _Programs(t, dt, jax.jit(sweep_local), jax.jit(timestep_local),
                         jax.jit(scores_local), initial_prog, None, jax.jit(_keep_improved),
                         specs)

    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(devices), ("data",))
    sys0, sys1 = P("data"), P(None, "data")  # the system axis first / after the time axis

    def on_mesh(fn, ins, outs):
        return _OnMesh(jax.jit(fn, in_shardings=tuple(NamedSharding(mesh, p) for p in ins),
                               out_shardings=outs if isinstance(outs, NamedSharding) else
                               tuple(NamedSharding(mesh, p) for p in outs)),
                       tuple(NamedSharding(mesh, p) for p in ins))

    sweep = on_mesh(jax.shard_map(sweep_local, mesh=mesh, in_specs=(sys0, sys1, sys0, sys0, P()),
                                  out_specs=(sys1, sys1, sys1, sys0, sys0), check_vma=False),
                    (sys0, sys1, sys0, sys0, P()), (sys1, sys1, sys1, sys0, sys0))
    timestep_run = on_mesh(jax.shard_map(timestep_local, mesh=mesh, in_specs=(sys0,), out_specs=(sys1,) * 6,
                                         check_vma=False), (sys0,), (sys1,) * 6)
    scores = on_mesh(scores_local, (sys1,), NamedSharding(mesh, sys1))
    # m0 goes to the mesh once, from the host (no resharding program to compile), so that the
    # sweeps do not move it there every time.
    place = on_mesh(lambda m0: (m0, jnp.broadcast_to(m0, (levels,) + m0.shape)), (sys0,), (sys0, sys1))
    keep_improved = on_mesh(_keep_improved, (sys0, sys1, sys1), NamedSharding(mesh, sys1))
    return _Programs(t, dt, sweep, timestep_run, scores, initial_prog, place, keep_improved,
                     specs)


class _OnMesh:
    """A jitted program over the local devices' mesh that places its host (numpy) arguments on
    the mesh first: in a job of several processes jit refuses numpy inputs of a sharded program
    (a walkthrough, 2026-12-07: every ``shard=True`` run of two processes failed so)."""

    def __init__(self, fn, in_shardings):
        self.fn, self.in_shardings = fn, in_shardings

    def __call__(self, *args):
        if jax.process_count() == 1:  # jit places them itself, into the programs precompile made
            return self.fn(*args)
        return self.fn(*(jax.device_put(a, s) if isinstance(a, (np.ndarray, np.generic)) else a
                         for a, s in zip(args, self.in_shardings)))

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)


def _program_config(config: PrecomputeConfig) -> PrecomputeConfig:
    """The config with the fields its compiled programs do not read normalised (cache key):
    the sweep budget and the outer test of "sweeps" run on the host."""
    if config.outer == "sweeps":
        return dataclasses.replace(config, max_sweeps=1, outer_tol=1.0, max_fixed_point=1,
                                   divergence_patience=0, compact=None)
    return dataclasses.replace(config, max_sweeps=1, lag_init="initial", divergence_patience=0,
                               forcing=0.0, compact=None)


def _programs(config: PrecomputeConfig, B: int, C: int, H: int, W: int, dtype) -> _Programs:
    return _build(_program_config(config), B, C, H, W, np.dtype(dtype), _devices(config))


def _seeded(config: PrecomputeConfig) -> bool:
    """Whether the strategy builds a seed basis (the seed system is solved in every step)."""
    return (config.strategy != "spsolve"
            and cross_matrix.PRESETS[config.strategy]["method"] != "gmres")


def _compact_sizes(config: PrecomputeConfig, B: int) -> tuple[int, ...]:
    """Image counts of the compacted sweeps (``config.compact``): the powers of two in
    ``[compact, B)``; none for ``outer="timestep"``, sharded runs or ``compact=None``."""
    if config.compact is None or config.outer != "sweeps" or config.shard:
        return ()
    sizes, p = [], 1
    while p < B:
        if p >= config.compact:
            sizes.append(p)
        p *= 2
    return tuple(sizes)


def _compact_programs(config: PrecomputeConfig, size: int, C: int, H: int, W: int, dtype):
    """The programs of a compacted batch of ``size`` images: its seed is image 0."""
    return _programs(dataclasses.replace(config, seed_image=0), size, C, H, W, dtype)


def _compact_batch(active: np.ndarray, sizes: tuple[int, ...], seed: int | None):
    """The images of the next sweep: ``None`` for the whole batch, else the smallest
    compacted batch that holds the seed (first, when ``seed`` is not None) and every active
    image, filled up with distinct inactive images."""
    act = np.flatnonzero(active)
    head = act if seed is None else np.concatenate([[seed], act[act != seed]])
    size = next((s for s in sizes if s >= len(head)), None)
    if size is None:
        return None
    rest = np.setdiff1d(np.arange(len(active)), head)[:size - len(head)]
    return np.concatenate([head, rest]).astype(np.int32)


def _systems(images: np.ndarray, C: int) -> np.ndarray:
    """System indices (image-major, channel-minor) of the given images."""
    return (images[:, None] * C + np.arange(C)).reshape(-1).astype(np.int32)


@jax.jit
def _gather(m0, arrays, idx):
    """Systems ``idx`` of ``m0`` [S, ...] and of each of ``arrays`` [N, S, ...]."""
    return m0[idx], tuple(a[:, idx] for a in arrays)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(arrays, idx, values):
    """``arrays[i][:, idx] = values[i]``, in place (the arrays are donated)."""
    return tuple(a.at[:, idx].set(v) for a, v in zip(arrays, values))


_copy = jax.jit(jnp.copy)  # a new buffer (compiled by precompile, unlike Array.copy)


def _keep_improved(improved, m_new, m_best):
    """``m_new`` [N, S, ...] for the systems whose image improved (``improved`` [S] bool), else
    ``m_best``."""
    return jnp.where(improved.reshape((1, -1) + (1,) * (m_new.ndim - 2)), m_new, m_best)


def _write_back(full: tuple, cur: np.ndarray | None, working: tuple, C: int) -> tuple:
    """The full ``[N, S, ...]`` arrays after a sweep on the working batch: the working arrays
    themselves when it was the whole batch (``cur`` None), else ``full`` with the systems of
    the images ``cur`` replaced by ``working`` (in place)."""
    return working if cur is None else _scatter(full, _systems(cur, C), working)


def _padded_count(config: PrecomputeConfig, B: int) -> int:
    """Image count after padding to a multiple of the device count (sharded runs)."""
    devices = _devices(config)
    if devices is None:
        return B
    D = len(devices)
    return -(-B // D) * D


def _initial_fn(images, key, *, method: str, h: float, levels: int):
    """m0 ``[S, H, W]`` (S = B * C) and m0 at every level ``[levels, S, H, W]`` (the first
    sweep's lagged iterate): one program (``_Programs.initial``) that :func:`precompile`
    compiles too. ``h``, the grid spacing, normalises the intensity density on the lattice."""
    kw = {"key": key} if initial.needs_key(method) else {}
    if method == "intensity":
        kw["h"] = h
    m0 = initial.initial_log_density(images, method=method, **kw).astype(images.dtype)
    m0s = m0.reshape((-1,) + m0.shape[2:])
    return m0s, jnp.broadcast_to(m0s, (levels,) + m0s.shape)


@functools.partial(jax.jit, static_argnames=("B", "C"))
def _result_layout(m_all, scores, *, B: int, C: int):
    """``[N, S, ...]`` solver layout (padded batch) -> ``[B, C, N, ...]`` of the result."""
    N, S = m_all.shape[:2]
    m_all = m_all.reshape((N, S // C, C) + m_all.shape[2:])[:, :B]
    scores = scores.reshape((N, S // C, C) + scores.shape[2:])[:, :B]
    return jnp.moveaxis(m_all, 0, 2), jnp.moveaxis(scores, 0, 2)


def _initial_key(config: PrecomputeConfig, key):
    if not initial.needs_key(config.initial):
        return None
    if key is None:
        raise ValueError(f"key: initial={config.initial!r} draws random samples, so "
                         f"precompute_scores needs key= (a jax.random key)")
    if isinstance(key, (jax.Array, np.ndarray)) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key: expected one jax.random key, got shape {key.shape}")
        return key
    bad = ValueError(f"key: expected a jax.random key (jax.random.key, or a legacy "
                     f"jax.random.PRNGKey: uint32 key data), got {getattr(key, 'dtype', type(key))} "
                     f"of shape {getattr(key, 'shape', ())}")
    if getattr(key, "dtype", None) != np.uint32 or getattr(key, "ndim", 0) != 1:
        raise bad
    # A legacy PRNGKey holds the default implementation's key data: as a typed key the draws
    # are identical, and the programs compiled for typed keys (precompile) serve it.
    try:
        return jax.random.wrap_key_data(jnp.asarray(key))
    except (TypeError, ValueError) as err:
        raise bad from err


def _check_basis_size(config: PrecomputeConfig, H: int, W: int) -> None:
    """The seed basis has at most one direction per unknown of a system (H * W)."""
    if _seeded(config) and config.basis_size > H * W:
        raise ValueError(f"basis_size: expected at most H * W = {H * W} (the unknowns of one "
                         f"{H} x {W} system) for strategy {config.strategy!r}, got "
                         f"{config.basis_size}")


def _check_seed(config: PrecomputeConfig, B: int) -> None:
    devices = _devices(config)
    limit = B if devices is None else _padded_count(config, B) // len(devices)
    if not 0 <= config.seed_image < limit:
        where = ("" if devices is None else
                 f" (sharded over {len(devices)} devices: the seed is an index into each "
                 f"device's {limit} images)")
        raise ValueError(f"config.seed_image: expected an index in [0, {limit}){where}, got "
                         f"{config.seed_image}")


def check_config(config) -> PrecomputeConfig:
    """``config`` if it is a :class:`PrecomputeConfig`, else ``TypeError`` naming it (a dict of
    its fields: ``PrecomputeConfig(**d)``)."""
    if not isinstance(config, PrecomputeConfig):
        hint = "; build one from a dict with PrecomputeConfig(**d)" if isinstance(config, dict) else ""
        raise TypeError(f"config: expected a PrecomputeConfig, got {type(config).__name__}{hint}")
    return config


def precompile(images_shape, dtype, config: PrecomputeConfig = PrecomputeConfig()) -> float:
    """Compile the programs :func:`precompute_scores` will run for this shape, ahead of time.

    Args:
      images_shape: ``(B, C, H, W)``, integers, B >= 1.
      dtype: float32 or float64 (the images' dtype). Canonicalised as
        :func:`precompute_scores` will compute (float64 is float32 when x64 is off), so it
        compiles the programs that call runs.
      config: a :class:`PrecomputeConfig` (``tol=None`` resolves for that dtype).

    Returns:
      The compile time in seconds (about 0 when they were compiled already). A following
      :func:`precompute_scores` call with this shape, dtype and config reuses them, so its
      ``stats["seconds"]`` is run time only.
    """
    what = "(B, C, H, W), integers >= 1"
    shape = _checks.as_sizes("images_shape", images_shape, 1, what=what)
    if len(shape) != 4:
        raise ValueError(f"images_shape: expected {what}, got {images_shape!r}")
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))  # what precompute_scores computes in
    config = check_config(config).resolve(dtype)
    B, C, H, W = shape
    _check_seed(config, B)
    _check_basis_size(config, H, W)
    start = time.perf_counter()
    Bp = _padded_count(config, B)
    sizes = _compact_sizes(config, Bp)
    progs = [_programs(config, Bp, C, H, W, dtype)]
    progs += [_compact_programs(config, n, C, H, W, dtype) for n in sizes]
    sweeps = config.outer == "sweeps"
    names = ("sweep", "scores", "keep_improved") if sweeps else ("timestep_run",)
    whole = progs[0]
    whole.initial.lower(*whole.arg_specs["initial"]).compile()
    if _devices(config) is None:
        for p in progs:
            for name in names:
                getattr(p, name).lower(*p.arg_specs[name]).compile()
    else:
        placed = whole.place.lower(whole.arg_specs["timestep_run"][0]).compile()
        _compile_sharded(whole, sweeps, placed.output_formats)
    S, N = Bp * C, config.num_steps
    if sizes:  # the copy, gathers and scatters between whole and compacted batches
        m0, m = progs[0].arg_specs["sweep"][:2]
        _copy.lower(m).compile()
        for n in sizes:
            idx = jax.ShapeDtypeStruct((n * C,), jnp.int32)
            _, (m_c, _) = jax.eval_shape(_gather, m0, (m, m), idx)
            _gather.lower(m0, (m, m), idx).compile()
            _scatter.lower((m, m), idx, (m_c, m_c)).compile()
    # the result's layout program
    _result_layout.lower(jax.ShapeDtypeStruct((N, S, H, W), dtype),
                         jax.ShapeDtypeStruct((N, S, 2, H, W), dtype), B=B, C=C).compile()
    return time.perf_counter() - start


def _compile_sharded(p: _Programs, sweeps: bool, initial_out: tuple) -> None:
    """Compile sharded programs for the arrays they will be called with: m0 and its levels
    from ``place`` (``initial_out``: their formats), and the log-densities fed from one sweep
    to the next. Such arrays carry their concrete layout, which a plain ahead-of-time
    compilation does not match (the first call would compile again)."""
    def like(spec, fmt):
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=fmt)

    if not sweeps:
        p.timestep_run.lower(like(p.arg_specs["timestep_run"][0], initial_out[0])).compile()
        return
    m0, m, *rest = p.arg_specs["sweep"]
    improved = p.arg_specs["keep_improved"][0]
    formats, todo = [], [initial_out[1]]  # the formats the iterates can arrive in
    while todo and len(formats) < 4:  # one or two in practice; a bound all the same
        f = todo.pop()
        if f in formats:
            continue
        formats.append(f)
        out = p.sweep.lower(like(m0, initial_out[0]), like(m, f), *rest).compile()
        todo.append(out.output_formats[0])
        for g in formats:  # keep_improved(improved, m_new, m_best), either from either
            for a, b in ((f, g), (g, f)):
                out = p.keep_improved.lower(improved, like(m, a), like(m, b)).compile()
                todo.append(out.output_formats)
        p.scores.lower(like(m, f)).compile()


def _per_image(x, B: int, C: int):
    """``[..., S]`` per-system numbers -> ``[B]`` per-image sums (over channels and steps)."""
    x = np.asarray(x)
    return x.reshape(-1, B, C).sum(axis=(0, 2))


def precompute_scores(images, config: PrecomputeConfig = PrecomputeConfig(), *,
                      key=None, progress=None) -> PrecomputeResult:
    """Pre-compute log-densities and scores for a batch of images (method.md 3.4).

    Solves the backward-Euler log-FP systems (method.md 3.1-3.2) of every image and channel at
    each time step with Paper B's outer sweeps (Algorithm 1) or Paper A's time-step-wise fixed
    point, and takes the scores by central differences (method.md 3.3).

    Args:
      images: ``[B, C, H, W]`` float32 or float64 in [0, 1], C in {1, 3}, H, W >= 4, and
        square (H == W) for the default ``config.initial="paper_b_kde"`` (ValueError
        "images must be square"); for non-square images use ``initial="intensity"`` or
        ``"paper_a_kde"``.
      config: a :class:`PrecomputeConfig`.
      key: PRNG key, needed only by the ``paper_a_kde`` initial density.
      progress: optional callable ``progress(done_sweeps, max_sweeps, info_dict)``.

    Returns:
      A :class:`PrecomputeResult` (arrays in the images' dtype). ``stats`` holds:
      ``systems_solved`` (linear systems solved, frozen images excluded), ``matvecs`` (total:
      every solve's, the cross-matrix seed's included in the sweeps after its image froze,
      since its basis serves the others), ``matvecs_per_system`` (``matvecs`` over
      ``systems_solved``: the cost of an image's system, the seed's share included),
      ``nonconverged`` (linear solves that did not reach ``tol`` or, short of it, the residual
      their dtype attains, ``2 eps || |A| |x| ||``; not the frozen seed's, whose solution is
      discarded),
      ``sweeps`` ([B] per image: outer sweeps, or for ``outer="timestep"`` the fixed-point
      iterations summed over the steps), ``outer_converged`` ([B] bool), ``outer_change`` ([B]
      relative change of the returned iterate, "sweeps" only), ``outer_diverged`` ([B] bool,
      stopped by ``divergence_patience``, "sweeps" only), ``batch_images`` ([sweeps run]
      images in each sweep's batch, smaller than B once ``compact`` drops converged images;
      "sweeps" only), ``fixed_point_iterations`` ([N-1]
      most iterations of any image per step, "timestep" only), ``fixed_point_unconverged_steps``
      (steps, summed over the images, whose fixed point did not converge, "timestep" only),
      ``strategy`` (``config.strategy``, the linear solver strategy used), per image ``[B]``:
      ``systems_per_image``, ``matvecs_per_image``, ``nonconverged_per_image``; ``seconds``
      (wall time, compilation included unless :func:`precompile` ran first),
      ``seconds_per_system``, ``compile_seconds`` (compilation inside this call),
      ``initial_seconds`` (the initial log-density), ``devices`` (1, or the number of devices
      of a sharded run).

      With "sweeps", an image converges only at a sweep whose linear solves all converged and
      whose values are finite (a "trusted" sweep). The returned ``log_density`` / ``scores`` of
      an image are its best iterate: trusted sweeps before untrusted ones, then the smallest
      relative change: the last one when it converged; for an image that did not converge
      (``outer_converged`` False) the least bad one, which stays bounded where later iterates
      of a wandering outer iteration can grow without bound.
    """
    images = validate_images(images)
    check_config(config)
    B, C, H, W = images.shape
    _check_seed(config, B)
    init_key = _initial_key(config, key)
    start = time.perf_counter()
    devices = _devices(config)
    Bp = _padded_count(config, B)
    if Bp > B:  # pad with copies of the last image, on the host (no program to compile)
        images = np.asarray(images)
        images = np.concatenate([images, np.repeat(images[-1:], Bp - B, axis=0)])
    asked = np.dtype(images.dtype)
    images = jax.device_put(images)  # float64 becomes float32 when x64 is off; no compilation
    dtype = np.dtype(images.dtype)
    if asked == np.float64 and dtype != asked:  # said (a walkthrough, 2026-12-07, found it silent)
        warnings.warn("images: float64 given with jax_enable_x64 off: computed (and returned) in float32; "
                      "jax.config.update('jax_enable_x64', True) first for float64", stacklevel=2)
    config = config.resolve(dtype)  # tol=None: the default of the dtype computed in
    if config.outer == "sweeps" and config.strategy != "spsolve" and config.tol > config.outer_tol:
        warnings.warn(f"tol={config.tol:g} is above outer_tol={config.outer_tol:g}: a sweep whose solves start "
                      "within tol of their answer can return their start, so an image is reported converged "
                      "(change 0) where its fixed point is reached only to about tol; use tol <= outer_tol",
                      stacklevel=2)
    compile_seconds = precompile((B, C, H, W), dtype, config)
    start_initial = time.perf_counter()
    progs = _programs(config, Bp, C, H, W, dtype)
    m0s, m0_levels = progs.initial(images, init_key)
    if devices is not None:
        m0s, m0_levels = progs.place(np.asarray(m0s))
    m0s, m0_levels = jax.block_until_ready((m0s, m0_levels))
    initial_seconds = time.perf_counter() - start_initial
    N = config.num_steps

    stats: dict[str, Any] = {}
    if config.outer == "sweeps":
        m_old = m0_levels
        m_best = m_old
        active = np.ones(Bp, bool)
        sweeps = np.zeros(Bp, np.int32)
        change = np.full(Bp, np.inf)
        best = np.full(Bp, np.inf)
        best_trusted = np.zeros(Bp, bool)
        stall = np.zeros(Bp, np.int32)
        diverged = np.zeros(Bp, bool)
        systems = np.zeros(Bp, np.int64)
        matvecs = np.zeros(Bp, np.int64)
        nonconv = np.zeros(Bp, np.int64)
        # Working batch: the whole batch (cur None) or, with `compact`, the images still
        # iterating (cur, image indices); the full arrays are written back when it changes.
        sizes = _compact_sizes(config, Bp)
        seed = config.seed_image if _seeded(config) else None
        cur = None
        m0_w, mold_w, mbest_w = m0s, m_old, m_best
        batch_images = []
        for k in range(config.max_sweeps):
            nxt = _compact_batch(active, sizes, seed) if k > 0 and sizes else None
            if not (nxt is None and cur is None) and not (
                    nxt is not None and cur is not None and np.array_equal(nxt, cur)):
                m_old, m_best = _write_back((m_old, m_best), cur, (mold_w, mbest_w), C)
                if cur is None and m_best is m_old:  # the full arrays must not alias
                    m_best = _copy(m_old)
                cur = nxt
                if cur is None:
                    m0_w, mold_w, mbest_w = m0s, m_old, m_best
                else:
                    m0_w, (mold_w, mbest_w) = _gather(m0s, (m_old, m_best), _systems(cur, C))
            imgs = np.arange(Bp) if cur is None else cur
            n_w = len(imgs)
            prog_w = progs if cur is None else _compact_programs(config, n_w, C, H, W, dtype)
            batch_images.append(n_w)
            # (an unmeasured change, NaN, asks for the loosest solve, not a NaN tolerance)
            tol_img = (np.clip(config.forcing * np.nan_to_num(change, nan=np.inf), config.tol, config.forcing)
                       if config.inexact else np.full(Bp, config.tol))
            m_new, conv, mv, dsq, osq = prog_w.sweep(
                m0_w, mold_w, np.repeat(active[imgs], C),
                np.repeat(tol_img[imgs], C).astype(dtype), np.asarray(k == 0))
            dsq = np.asarray(dsq).reshape(n_w, C).sum(1)
            osq = np.asarray(osq).reshape(n_w, C).sum(1)
            ch = np.full(Bp, np.inf)
            # an iterate whose sum of squares overflowed is not measured (NaN: an untrusted sweep)
            with np.errstate(invalid="ignore"):
                ch[imgs] = np.where(np.isfinite(osq), np.sqrt(dsq) / np.maximum(np.sqrt(osq), np.finfo(dtype).tiny),
                                    np.nan)
            change = np.where(active, ch, change)  # every active image is in imgs
            systems += active * C * (N - 1)
            matvecs[imgs] += _per_image(mv, n_w, C)
            nc_img = np.zeros(Bp, np.int64)
            nc_img[imgs] = _per_image(~np.asarray(conv), n_w, C)
            nonconv += nc_img
            sweeps += active
            # A sweep is trusted for an image when every one of its solves converged and its
            # values are finite; only a trusted sweep can converge the image (a failed solve
            # returns about its warm start, so its change can look tiny). The result is the
            # best iterate: trusted before untrusted, then the smallest change (the last one
            # for every image that converges); an image that stops improving for `patience`
            # sweeps is declared diverged and stops.
            # With `forcing`, a sweep solved to a looser tolerance is not trusted either: from a
            # warm start that already met it the solver returns its start, the change is 0, and
            # an image 5e-2 from spsolve's was reported converged (a review, 2026-12-07).
            trusted = (nc_img == 0) & np.isfinite(ch) & (tol_img <= config.tol)
            improved = active & ((trusted & ~best_trusted)
                                 | ((trusted == best_trusted) & (change < best)))
            best = np.where(improved, change, best)
            best_trusted = np.where(improved, trusted, best_trusted)
            imp_w = improved[imgs]
            if imp_w.all():
                mbest_w = m_new
            elif imp_w.any():
                mbest_w = prog_w.keep_improved(np.repeat(imp_w, C), m_new, mbest_w)
            stall = np.where(improved, 0, stall + active)
            if config.divergence_patience > 0:
                diverged |= active & (stall >= config.divergence_patience)
            mold_w = m_new
            active = active & ~(trusted & (change <= config.outer_tol)) & ~diverged
            if progress is not None:
                progress(k + 1, config.max_sweeps, dict(active=int(active[:B].sum()),
                                                        max_change=float(change[:B].max()),
                                                        systems=int(systems[:B].sum()),
                                                        batch_images=n_w))
            if not active.any():
                break
        m_old, m_best = _write_back((m_old, m_best), cur, (mold_w, mbest_w), C)
        converged = best_trusted & (best <= config.outer_tol)
        m_all = m_old if converged.all() else m_best  # the last iterate of every image, or the best
        scores = progs.scores(m_all)
        stats.update(sweeps=sweeps[:B], outer_converged=converged[:B], outer_change=best[:B],
                     outer_diverged=diverged[:B], batch_images=np.asarray(batch_images))
    else:
        m_all, scores, nfail, mv, nit, unconv = progs.timestep_run(m0s)
        nit = np.asarray(nit)
        unconv_img = np.asarray(unconv).reshape(N - 1, Bp, C)[..., 0]  # [N-1, Bp]
        its_img = nit.reshape(N - 1, Bp, C)[..., 0].sum(axis=0)
        systems = _per_image(nit, Bp, C)
        matvecs = _per_image(mv, Bp, C)
        nonconv = _per_image(np.asarray(nfail), Bp, C)  # every failed solve of every iteration
        stats.update(sweeps=its_img[:B].astype(np.int32),
                     fixed_point_iterations=nit[:, :B * C].max(axis=1),
                     outer_converged=~unconv_img[:, :B].any(axis=0),
                     fixed_point_unconverged_steps=int(unconv_img[:, :B].sum()))
        if progress is not None:
            progress(1, 1, dict(systems=int(systems[:B].sum())))
    if devices is not None:  # gather the shards onto the default device
        m_all, scores = jax.device_put((np.asarray(m_all), np.asarray(scores)))
    log_density, scores = jax.block_until_ready(_result_layout(m_all, scores, B=B, C=C))
    seconds = time.perf_counter() - start
    systems, matvecs, nonconv = systems[:B], matvecs[:B], nonconv[:B]
    total = int(systems.sum())
    stats.update(systems_solved=total, matvecs=int(matvecs.sum()),
                 matvecs_per_system=int(matvecs.sum()) / max(total, 1),
                 nonconverged=int(nonconv.sum()), systems_per_image=systems,
                 matvecs_per_image=matvecs, nonconverged_per_image=nonconv,
                 seconds=seconds, seconds_per_system=seconds / max(total, 1),
                 compile_seconds=compile_seconds, initial_seconds=initial_seconds,
                 strategy=config.strategy,
                 devices=1 if devices is None else len(devices))
    t = progs.t
    return PrecomputeResult(log_density=log_density, scores=scores, t=t, dt=progs.dt, stats=stats)
