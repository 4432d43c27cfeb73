"""Cross-matrix Krylov projection: reuse a seed system's Krylov basis for similar systems.

At one time step every image's system ``A_i m_i = b_i`` shares the diagonal and the diffusion
stencil; the images differ only through the lagged-score advection (method.md 3.2, 5). Paper A
(Lau, Na, Wan 2025) builds a Krylov subspace from a *seed* image and transfers it to the other
(*target*) images. Its exact construction is unpublished (method.md 5.2); what follows is OUR
RECONSTRUCTION (method.md 5.3), and it is what this library calls "the paper's method":

1. :func:`seed_basis`: Arnoldi on the seed system from its initial residual gives an
   orthonormal ``V`` (``k`` directions, plus the Hessenberg matrix of the seed).
2. :func:`cross_matrix_solve`: for all targets at once, ``W_t = A_t Z`` with ``Z = M^{-1} V``
   (one batched stencil application of ``k`` columns), ``y_t = argmin ||r0_t - W_t y||``, the
   warm start ``x_t = x0_t + Z y_t``, then GMRES refinement to tolerance.

Beyond the paper, each selectable (design.md decision 7):

- ``projection="seed_hessenberg"``: a free warm start that uses the seed's own Arnoldi relation
  ``A_s V_k = V_{k+1} H`` as a proxy for ``A_t V_k`` (no target matvecs at all).
- ``recycle=True``: the seed directions stay in the targets' GMRES as a fixed augmentation space
  (GCRO style), not just a warm start.
- ``precondition``: a right preconditioner, e.g. the exact inverse of the shared diffusion part
  (:func:`krylovjax.preconditioners.diffusion_preconditioner`) or each system's own line
  factorisation (:func:`krylovjax.preconditioners.line_preconditioner`), or its block
  incomplete factorisation by rows (:func:`krylovjax.preconditioners.block_line_preconditioner`).
- warm starts ``x0`` from a previous sweep or time step.
- ``precondition="red_black"``: the exact red-black Schur reduction
  (:func:`krylovjax.preconditioners.red_black_reduction`): the Krylov method runs on the black
  pixels only; with ``krylov="bicgstab"`` this is the ``"fast"`` preset, the fastest
  configuration on CPU (docs/bench_solvers_cpu.md).

:func:`solve_fp` wires these together for an :class:`~krylovjax.fokker_planck.FPOperator` batch
with a :class:`SolverConfig`, including cache-sized chunking of the batch.

:func:`seed_basis` and :func:`cross_matrix_solve` take the user's callables: called outside
``jax.jit``, each call traces and compiles its loops anew (about a second on a CPU) and the
program stays loaded, so in a loop call them inside your own ``jax.jit`` with the operator as an
argument. :func:`solve_fp` is jitted itself (``config`` static) and compiles once per shape,
dtype and config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from krylovjax import _checks, krylov
from krylovjax.fokker_planck import DTypeError, FPOperator
from krylovjax import preconditioners

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

METHODS = ("gmres", "cross_matrix", "recycled")
PROJECTIONS = ("minres", "seed_hessenberg")
PRECONDITIONERS = (None, "diffusion", "line", "block_line", "jacobi", "red_black")
# Those built from the 2-D grid structure of the consistent and fitted schemes (not Paper B's).
GRID_PRECONDITIONERS = ("diffusion", "line", "block_line", "red_black")
KRYLOV_SOLVERS = ("gmres", "bicgstab")

# Named strategies: SolverConfig keyword arguments (used by the pipeline and the benchmarks).
PRESETS = {
    "gmres": dict(method="gmres", precondition=None),
    "cross_matrix": dict(method="cross_matrix", precondition=None),
    "recycled": dict(method="recycled", precondition=None),
    "preconditioned": dict(method="gmres", precondition="diffusion"),
    "cross_matrix_precond": dict(method="cross_matrix", precondition="diffusion"),
    "recycled_precond": dict(method="recycled", precondition="diffusion"),
    # Each system's own line factorisation (captures its advection too; fewest matvecs).
    "preconditioned_line": dict(method="gmres", precondition="line"),
    "cross_matrix_line": dict(method="cross_matrix", precondition="line"),
    # Block incomplete factorisation by rows with banded approximate inverses: one or two
    # iterations at the early step, so the seed projection is the free one (no k matvecs).
    "preconditioned_block": dict(method="gmres", precondition="block_line"),
    "cross_matrix_block": dict(method="cross_matrix", precondition="block_line",
                               projection="seed_hessenberg"),
    # BiCGStab (no Krylov basis to re-read) on the full system.
    "bicgstab": dict(method="gmres", precondition=None, krylov="bicgstab"),
    # The fastest on CPU (docs/bench_solvers_cpu.md): BiCGStab on the exact red-black Schur
    # complement (half the unknowns, about half the iterations).
    "fast": dict(method="gmres", precondition="red_black", krylov="bicgstab"),
}


class SeedBasis(NamedTuple):
    """A seed system's Krylov basis.

    Attributes:
      V: ``[k+1, N]`` orthonormal Arnoldi vectors (rows) of the seed system.
      H: ``[k+1, k]`` upper Hessenberg matrix, ``A_s M^{-1} V_k^T = V_{k+1}^T H``.
      Z: ``[k, N]`` the search directions ``M^{-1} V_k`` (``V_k`` without a preconditioner).
      num_matvecs: matvecs spent on the seed (``k``, and one more for the residual of a given
        ``seed_x0``).
    """

    V: Array
    H: Array
    Z: Array
    num_matvecs: Array


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _operator_shapes(matvec: Callable):
    """``(batch_shape, field_shape)`` of a ``matvec`` that is an :class:`FPOperator`'s or a
    :class:`~krylovjax.preconditioners.RedBlackSystem`'s (bound method or the object itself),
    else None (any other callable: only its output shape can be checked)."""
    obj = matvec if isinstance(matvec, (FPOperator, preconditioners.RedBlackSystem)) else None
    if obj is None and getattr(matvec, "__func__", None) in (
            FPOperator.matvec, preconditioners.RedBlackSystem.matvec):
        obj = matvec.__self__
    if isinstance(obj, FPOperator):
        return tuple(obj.batch_shape), tuple(obj.grid_shape)
    if isinstance(obj, preconditioners.RedBlackSystem):
        return tuple(obj.d_black.shape[:-1]), tuple(obj.packed_shape)
    return None


def seed_basis(seed_matvec: Callable, seed_b: Array, k: int, *, seed_x0: Array | None = None,
               precondition: Callable | None = None) -> SeedBasis:
    """Arnoldi basis (``k`` directions) of one seed system at one time step (method.md 5.3.1).

    Args:
      seed_matvec: ``[1, *shape] -> [1, *shape]``, the seed's operator on a batch of one.
      seed_b: ``[*shape]`` or ``[1, *shape]`` the seed's right-hand side (for an operator's
        ``matvec``, ``*shape`` is its grid: a batch's ``b`` given whole is refused).
      k: number of Krylov directions (>= 1, at most the number of unknowns).
      seed_x0: optional warm start of the seed; the basis starts from its residual.
      precondition: optional right preconditioner ``M^{-1}`` on ``[1, *shape]`` fields.

    Eager calls compile again each time (the module docstring); in a loop, call it inside
    ``jax.jit``.
    """
    b = jnp.asarray(seed_b)
    if b.ndim < 2:
        raise ValueError(f"seed_b: expected a field [*shape] or [1, *shape], got shape {b.shape}")
    krylov._check_field_batch("seed_b", b, what="[*shape] or [1, *shape]")  # dtype, values
    given = tuple(b.shape)
    shapes = _operator_shapes(seed_matvec)
    if shapes is not None and given not in (shapes[1], (1,) + shapes[1]):
        # FPOperator.matvec broadcasts its batch: a batch's b [T, H, W] given whole to a seed
        # operator of batch 1 made a basis of T*H*W unknowns, refused only by cross_matrix_solve
        field = shapes[1]
        hint = (f"; if it is a batch's b, give the seed's own right-hand side, b[i] of shape {field}"
                if given[1:] == field else "")
        raise ValueError(f"seed_b: expected shape {field} or {(1,) + field} (the grid of "
                         f"seed_matvec's operator), got {given}{hint}")
    if b.shape[0] != 1:
        b = b[None]
    try:
        krylov._check_callable_shape("seed_matvec", seed_matvec, b.shape, b.dtype)
    except (TypeError, ValueError) as err:
        if len(given) >= 3 and given[0] != 1:  # a batch's b given whole, taken as one 3-D field
            raise type(err)(f"{err}; seed_b of shape {given} was taken as one field of that shape: if it is "
                            f"a batch's b, give the seed's own right-hand side, b[i] of shape {given[1:]}") from err
        raise
    n = int(b[0].size)
    k = _checks.as_int("k", k, 1, what=f"an integer in [1, {n}] (the number of unknowns)")
    if k > n:
        raise ValueError(f"k: expected an integer in [1, {n}] (the number of unknowns), got {k}")
    if seed_x0 is not None:
        seed_x0 = jnp.asarray(seed_x0, b.dtype)
        if seed_x0.shape not in (b.shape, b.shape[1:]):
            raise ValueError(f"seed_x0: expected shape {b.shape[1:]} or {b.shape} (that of seed_b), "
                             f"got {seed_x0.shape}")
        _checks.check_finite("seed_x0", seed_x0)
    r0 = b if seed_x0 is None else b - seed_matvec(seed_x0.reshape(b.shape))
    V, H = krylov.arnoldi(seed_matvec, r0, k, precondition=precondition)
    V, H = V[0], H[0]
    Vk = V[:k].reshape((k,) + b.shape[1:])
    Z = Vk if precondition is None else jax.vmap(lambda v: precondition(v[None])[0])(Vk)
    return SeedBasis(V=V, H=H, Z=Z.reshape(k, -1),
                     num_matvecs=jnp.asarray(k + (seed_x0 is not None), jnp.int32))


def _masked_lstsq(W: Array, r: Array) -> Array:
    """``argmin_y ||r_t - W_t^T y||`` per target, via a batched thin QR; ``W`` ``[T, k, N]``.

    Directions that are numerically zero (an Arnoldi breakdown; ``|R_jj| <= N eps max|W_i|``)
    get coefficient 0. The QR is :func:`krylov.orthonormalise_rows` (CGS2 in XLA ops, no
    LAPACK call: jaxlib's batched LAPACK kernels can deadlock XLA's CPU thread pool); with
    ``W = R^T Q`` and ``E = R^{-T}`` from the same pass, ``y = E^T Q r``.
    """
    T, k = W.shape[:2]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=W.dtype), (T, k, k))
    Q, E, _ = krylov.orthonormalise_rows(W, eye, drop_tol=jnp.finfo(W.dtype).eps * W.shape[-1])
    c = jnp.einsum("tkn,tn->tk", Q, r, precision=_HI)
    return jnp.einsum("tkj,tk->tj", E, c, precision=_HI)


def apply_columns(matvec: Callable, Z: Array, batch: int, shape) -> Array:
    """``A_t Z`` for every target ``t`` and every basis row of ``Z`` ``[k, N]`` -> ``[T, k, N]``:
    one batched stencil application (vmapped over the ``k`` columns)."""
    k = Z.shape[0]
    cols = jnp.broadcast_to(Z.reshape((1, k) + tuple(shape)), (batch, k) + tuple(shape))
    out = jax.vmap(matvec, in_axes=1, out_axes=1)(cols)
    return out.reshape(batch, k, -1)


def cross_matrix_solve(
    matvec: Callable,
    b: Array,
    basis: SeedBasis,
    *,
    x0: Array | None = None,
    projection: str = "minres",
    recycle: bool = False,
    precondition: Callable | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    restart: int = 20,
    max_restarts: int = 50,
    solver: str = "gmres",
) -> krylov.KrylovResult:
    """Solve all target systems at one time step from a seed basis (method.md 5.3).

    Args:
      matvec: ``[T, *shape] -> [T, *shape]``, the targets' operators.
      b: ``[T, *shape]`` right-hand sides.
      basis: the seed's :class:`SeedBasis` (built with the same ``precondition``).
      x0: optional warm starts ``[T, *shape]`` (e.g. the previous sweep's solutions).
      projection: ``"minres"`` (the paper, reconstructed: ``y = argmin ||r0 - A_t Z y||``,
        ``k`` matvecs per target) or ``"seed_hessenberg"`` (free: ``y = argmin ||V^T r0 - H y||``
        from the seed's Arnoldi relation).
      recycle: keep the seed directions as a GCRO augmentation space inside GMRES instead of a
        one-off warm start (costs the same ``k`` matvecs per target once).
      precondition: right preconditioner for the refinement (and the basis).
      tol, atol, restart, max_restarts: refinement settings (see :func:`krylov.gmres`).
      solver: the refinement's Krylov method, ``"gmres"`` or ``"bicgstab"`` (method.md 5.3
        step 3; recycling needs ``"gmres"``).

    Returns:
      A :class:`krylov.KrylovResult`; ``num_matvecs`` includes the projection's matvecs.

    Eager calls compile again each time (the module docstring); in a loop, call it inside
    ``jax.jit``.
    """
    b = jnp.asarray(b)
    if b.ndim < 2:
        raise ValueError(f"b: expected [T, *shape] with a leading batch axis, got {b.shape}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
    if solver not in KRYLOV_SOLVERS:
        raise ValueError(f"solver: expected one of {KRYLOV_SOLVERS}, got {solver!r}")
    if recycle and solver != "gmres":
        raise ValueError(f"solver: recycling (GCRO) needs 'gmres', got {solver!r}")
    krylov._check_field_batch("b", b, what="[T, *shape]")  # dtype, values
    T, shape = b.shape[0], b.shape[1:]
    N = math.prod(shape)
    if basis.Z.shape[-1] != N:
        raise ValueError(
            f"basis: its vectors have {basis.Z.shape[-1]} entries but the systems have {N}")
    k = basis.Z.shape[0]
    _checks.check_finite("basis", basis.Z)
    # before the projection, whose result would otherwise be refused as the refinement's x0
    krylov._check_callable_shape("matvec", matvec, b.shape, b.dtype)
    Z = basis.Z.astype(b.dtype)
    if x0 is not None:
        x0 = jnp.asarray(x0, b.dtype)
        if x0.shape != b.shape:
            raise ValueError(f"x0: expected shape {b.shape} (that of b), got {x0.shape}")
    x = jnp.zeros_like(b) if x0 is None else x0
    extra = jnp.zeros((T,), jnp.int32)

    if recycle:
        # GCRO augmentation; make_recycle_space drops directions made dependent by A_t.
        U = jnp.broadcast_to(Z.reshape((1, k) + tuple(shape)), (T, k) + tuple(shape))
        space = krylov.make_recycle_space(matvec, U)
        res = krylov.gmres(matvec, b, x0=x0 if x0 is None else x, tol=tol, atol=atol,  # no matvec for 0
                           restart=restart, max_restarts=max_restarts, precondition=precondition,
                           recycle=space)
        return res._replace(num_matvecs=res.num_matvecs + space.num_matvecs)

    r0 = _flat(b)
    if x0 is not None:
        r0 = r0 - _flat(matvec(x))
        extra = extra + 1
    if projection == "minres":
        W = apply_columns(matvec, Z, T, shape)
        extra = extra + k
        y = _masked_lstsq(W, r0)
    else:
        V = basis.V.astype(b.dtype)
        c = jnp.einsum("jn,tn->tj", V, r0, precision=_HI)  # [T, k+1]
        Hb = jnp.broadcast_to(basis.H.astype(b.dtype), (T,) + basis.H.shape)
        y = _masked_lstsq(jnp.swapaxes(Hb, -1, -2), c)
    x = x + jnp.einsum("tk,kn->tn", y, Z, precision=_HI).reshape(b.shape)
    refine = krylov.gmres if solver == "gmres" else krylov.bicgstab
    res = refine(matvec, b, x0=x, tol=tol, atol=atol, restart=restart,
                 max_restarts=max_restarts, precondition=precondition)
    return res._replace(num_matvecs=res.num_matvecs + extra)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """How to solve one time step's batch of FP systems (immutable and hashable: jit-static).

    Attributes:
      method: ``"gmres"`` (a plain Krylov solve, cold or warm; the name is historical: the
        Krylov method is ``krylov``), ``"cross_matrix"`` (seed basis as a projected warm
        start, the paper's method as reconstructed), ``"recycled"`` (seed basis as a GCRO
        augmentation space; GMRES only).
      precondition: None, ``"diffusion"`` (exact inverse of the shared diffusion part, sine or
        cosine transforms), ``"line"`` (each system's line factorisation,
        :func:`krylovjax.preconditioners.line_preconditioner`), ``"block_line"`` (block
        incomplete factorisation by rows with banded approximate inverses,
        :func:`krylovjax.preconditioners.block_line_preconditioner`), ``"jacobi"``, or
        ``"red_black"`` (exact red-black Schur complement reduction: the Krylov method runs on
        the black pixels only, see :class:`krylovjax.preconditioners.RedBlackSystem`).
        The grid preconditioners (:data:`GRID_PRECONDITIONERS`) are not for Paper B's scheme.
      krylov: the Krylov method, ``"gmres"`` or ``"bicgstab"``.
      projection: ``"minres"`` or ``"seed_hessenberg"`` (see :func:`cross_matrix_solve`); the
        ``"recycled"`` method augments GMRES with the seed space instead and does not use it.
      basis_size: ``k``, the number of seed directions.
      seed_index: which system of the batch is the seed (methods ``"cross_matrix"`` and
        ``"recycled"``; ``"gmres"`` uses no seed and ignores it).
      tol, atol, restart, max_restarts: Krylov settings (for BiCGStab ``restart`` is the number
        of iterations between true-residual checks); ``tol=None`` (the default) is 1e-8 for
        float64 systems and 1e-6 for float32 (:data:`krylovjax.krylov.DEFAULT_TOL`).
      chunk_size: solve the batch in chunks of this many systems (``lax.map``), which keeps
        the Krylov vectors in cache on CPUs; None solves the whole batch as one array;
        ``"auto"``: :func:`auto_chunk_size` (cache-sized chunks on CPU, None elsewhere).
    """

    method: str = "cross_matrix"
    precondition: str | None = "diffusion"
    projection: str = "minres"
    basis_size: int = 8
    seed_index: int = 0
    tol: float | None = None
    atol: float = 0.0
    restart: int = 20
    max_restarts: int = 50
    chunk_size: int | str | None = None
    krylov: str = "gmres"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(
                f"precondition: expected one of {PRECONDITIONERS}, got {self.precondition!r}")
        if self.krylov not in KRYLOV_SOLVERS:
            raise ValueError(f"krylov: expected one of {KRYLOV_SOLVERS}, got {self.krylov!r}")
        if self.method == "recycled" and self.krylov != "gmres":
            raise ValueError(f"krylov: method 'recycled' (GCRO) needs 'gmres', got "
                             f"{self.krylov!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection: expected one of {PROJECTIONS}, got {self.projection!r}")
        for name, minimum in (("basis_size", 1), ("seed_index", 0), ("restart", 1),
                              ("max_restarts", 1)):
            object.__setattr__(self, name, _checks.as_int(name, getattr(self, name), minimum))
        for name, positive in (("tol", True), ("atol", False)):
            if name == "tol" and self.tol is None:
                continue
            value = _checks.as_real(name, getattr(self, name))
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{name}: expected a finite tolerance {'> 0' if positive else '>= 0'}, "
                                 f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)  # a Python float: one hash for 1e-8 and np.float64(1e-8)
        if self.chunk_size is not None and self.chunk_size != "auto":
            object.__setattr__(self, "chunk_size", _checks.as_int(
                "chunk_size", self.chunk_size, 1, what="None, 'auto' or an integer >= 1"))


# Per-core cache budget for one chunk's working set (the 2-core AMD EPYC of the benchmarks has
# 2 MiB of L2 per core; docs/bench_solvers_cpu.md has the chunk-size measurements).
_CHUNK_BYTES = 768 * 1024


def auto_chunk_size(config: SolverConfig, grid_shape, dtype=jnp.float64,
                    backend: str | None = None) -> int | None:
    """A chunk size for :func:`solve_fp`: None (the whole batch) on accelerators; on CPU the
    largest power of two of systems whose Krylov working set fits a core's cache, clipped to
    [2, 16].

    Working set per system, in fields of ``N = H*W`` values: GMRES ``restart + 1`` basis
    vectors plus about 10 others; BiCGStab about 10; with the red-black reduction every field
    has ``N/2`` values. (On the benchmark CPU a chunk of 1 was always slower than 2.)
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return None
    fields = (config.restart + 11) if config.krylov == "gmres" else 10
    if config.precondition == "red_black":
        fields = fields / 2 + 6  # half-size vectors, 11 half-size coefficient fields
    else:
        fields += 6              # 5 coefficient fields and b
    if config.precondition == "line":
        fields += 7              # T and the Thomas factors of both directions
    if config.precondition == "block_line":
        # the banded approximate inverses (2q + 1 diagonals), N and S
        fields += 2 * preconditioners.BLOCK_BANDWIDTH + 1 + 2
    per_system = fields * math.prod(grid_shape) * jnp.dtype(dtype).itemsize
    fit = max(1, int(_CHUNK_BYTES // per_system))
    return int(min(16, max(2, 1 << (fit.bit_length() - 1))))  # a power of two


def _preconditioner(op: FPOperator, name: str | None):
    if name is None:
        return None
    if name == "diffusion":
        return preconditioners.diffusion_preconditioner(op)
    if name == "line":
        return preconditioners.line_preconditioner(op)
    if name == "block_line":
        return preconditioners.block_line_preconditioner(op)
    return preconditioners.jacobi(op)


def _take(op: FPOperator, index) -> FPOperator:
    return jax.tree_util.tree_map(lambda a: a[index], op)


def _norms(x: Array) -> Array:
    return krylov.scaled_norm(x.reshape(x.shape[0], -1))


class _Problem(NamedTuple):
    """The Krylov problem for a batch: plain (``A``, ``b``) or red-black reduced (``S``, ``f``).

    ``operator`` has a ``matvec`` method (an :class:`FPOperator` or a
    :class:`~krylovjax.preconditioners.RedBlackSystem`); ``tol`` ``[B]`` per system;
    ``finish`` maps the Krylov result back to the full grid (red pixels and the true residual
    of the full system for the reduced form).
    """

    operator: object
    b: Array
    x0: Array | None
    tol: Array
    atol: Array | float
    finish: Callable


def _problem(op: FPOperator, b: Array, x0: Array | None, config: SolverConfig) -> _Problem:
    B = b.shape[0]
    tol = krylov.default_tol(config.tol, b.dtype)
    if config.precondition != "red_black":
        return _Problem(op, b, x0, jnp.full((B,), tol, b.dtype), config.atol,
                        lambda res: res)
    rb = preconditioners.red_black_reduction(op)
    f = rb.rhs(b)
    b_norm = _norms(b)
    # ||b - A x|| equals ||f - S x_b|| exactly, so the reduced solve gets the same absolute
    # threshold max(tol ||b||, atol) (tol only where b's dtype can verify it), as its atol;
    # its relative test is off (a tol below eps: krylov.verifiable_tol).
    thresh = jnp.maximum(krylov.verifiable_tol(tol, b.dtype) * b_norm,
                         jnp.asarray(config.atol, b.dtype))
    tol = jnp.full((B,), jnp.finfo(b.dtype).tiny, b.dtype)

    def finish(res: krylov.KrylovResult) -> krylov.KrylovResult:
        x, r_norm = rb.recover(res.x, b, with_residual=True)  # true residual of A
        status = jnp.where(res.converged & (r_norm > thresh), krylov.Status.STAGNATION,
                           res.status).astype(jnp.int32)
        # + 1 for rhs and recovery (two half-grid stencils), + 1 for the final true residual
        n_mv = res.num_matvecs + 2
        # The Krylov method keeps its best iterate of the reduced system, whose recovery can
        # be a worse full iterate than the start: from x_b = 0 the first residual is
        # ||f|| = ||b - A x(0)||, x(0) = (D_r^{-1} b_r, 0), above ||b|| on hard systems (relative
        # 1.1-1.8 at score amplitudes 6-12, 16x16). A system that did not converge keeps the
        # start (x0, or 0) where that is better. With x0 its residual costs one matvec, run
        # only when some system of the batch did not converge, and counted for those that did
        # not (a converged system's count does not depend on its batch-mates or the chunking).
        failed = status != krylov.Status.CONVERGED
        if x0 is None:
            start, start_norm = jnp.zeros_like(b), b_norm
        else:
            start = x0
            start_norm = jax.lax.cond(jnp.any(failed), lambda: _norms(b - op.matvec(x0)),
                                      lambda: jnp.full_like(b_norm, jnp.inf))
            n_mv = n_mv + failed.astype(n_mv.dtype)
        back = failed & (start_norm < r_norm)
        x = jnp.where(back[:, None, None], start, x)
        r_norm = jnp.where(back, start_norm, r_norm)
        status = jnp.where(back & (r_norm <= thresh), krylov.Status.CONVERGED, status).astype(jnp.int32)
        return res._replace(x=x, converged=status == krylov.Status.CONVERGED,
                            residual=r_norm / jnp.where(b_norm > 0, b_norm, 1.0),
                            num_matvecs=n_mv, status=status)

    return _Problem(rb, f, None if x0 is None else rb.restrict(x0), tol, thresh, finish)


def solve_fp(op: FPOperator, b: Array, config: SolverConfig = SolverConfig(), *,
             x0: Array | None = None) -> krylov.KrylovResult:
    """Solve every system of a batch of FP operators at one time step.

    Args:
      op: an :class:`FPOperator` with one leading batch axis ``[B]`` (flatten images and
        channels into it).
      b: ``[B, H, W]`` right-hand sides (``op.rhs(m_prev)``).
      config: a :class:`SolverConfig`.
      x0: optional warm starts ``[B, H, W]``.

    Returns:
      A :class:`krylov.KrylovResult` for the ``B`` systems (``x`` ``[B, H, W]``). For the
      cross-matrix methods the seed's ``k`` basis matvecs are added to the seed system's count.
      With ``precondition="red_black"`` the counts are applications of the reduced operator
      (each about one full-grid matvec) plus 2 (right-hand side and recovery, final true
      residual), and ``residual`` is the true residual of the full system; a system that
      did not converge returns its start (``x0``, or zero) where the reduced solve's best
      iterate, recovered, has a larger full residual (one more matvec where ``x0`` is given).

    It is jitted (``op``, ``b``, ``x0`` traced, ``config`` static): calling it again with the
    same shapes, dtypes and config compiles nothing, eagerly too.
    """
    if not isinstance(op, FPOperator):
        raise TypeError(f"op: expected an FPOperator (krylovjax.fp_operator), got {type(op).__name__}")
    if not isinstance(config, SolverConfig):
        raise TypeError(f"config: expected a SolverConfig, got {type(config).__name__}")
    if len(op.batch_shape) != 1:
        raise ValueError(f"op: expected one leading batch axis, got batch shape {op.batch_shape}")
    if not _checks.is_float32_or_64(op.dtype):  # float16 failed later, naming seed_b or KeyError: 2
        raise DTypeError(f"op: expected dtype float32 or float64 (those of the solvers), got "
                         f"{op.dtype}; build it with fp_operator(..., dtype=jnp.float32)")
    B = op.batch_shape[0]
    b = krylov._as_array(b)
    if not hasattr(b, "shape") or b.shape != (B,) + op.grid_shape:
        raise ValueError(f"b: expected shape {(B,) + op.grid_shape}, got {getattr(b, 'shape', type(b).__name__)}")
    if b.dtype != op.dtype:
        raise TypeError(f"b: expected dtype {op.dtype} (that of op), got {b.dtype}")
    if B == 0:
        raise ValueError(f"b: expected at least one system (B >= 1), got shape {b.shape}: the batch is "
                         f"empty")
    _checks.check_finite("b", b)
    if x0 is not None:
        x0 = krylov._as_array(x0)
        if not hasattr(x0, "shape") or x0.shape != b.shape:
            raise ValueError(f"x0: expected shape {b.shape}, got {getattr(x0, 'shape', type(x0).__name__)}")
        if x0.dtype != b.dtype:
            raise TypeError(f"x0: expected dtype {b.dtype} (that of b), got {x0.dtype}")
        _checks.check_finite("x0", x0)
    if config.method != "gmres" and not 0 <= config.seed_index < B:  # plain Krylov: no seed
        raise ValueError(f"config.seed_index: expected in [0, {B}), got {config.seed_index}")
    if config.precondition in GRID_PRECONDITIONERS and op.scheme == "paper_b":
        raise ValueError(
            f"config.precondition: {config.precondition!r} needs scheme='consistent' or "
            f"'fitted', got {op.scheme!r}")
    if config.method != "gmres" and config.basis_size > math.prod(op.grid_shape):
        raise ValueError(f"config.basis_size: expected at most {math.prod(op.grid_shape)} (the "
                         f"unknowns of one system), got {config.basis_size}")
    if config.precondition == "diffusion" and op.diffusion is None:  # a hand-built operator's k, outside the jit
        preconditioners.diffusion_preconditioner(op)
    return _solve_fp(op, b, x0, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _solve_fp(op: FPOperator, b: Array, x0: Array | None, config: SolverConfig) -> krylov.KrylovResult:
    kw = dict(restart=config.restart, max_restarts=config.max_restarts)
    solver = krylov.gmres if config.krylov == "gmres" else krylov.bicgstab

    def precondition(A):
        return None if config.precondition == "red_black" else _preconditioner(
            A, config.precondition)

    basis = None
    if config.method != "gmres":
        i = config.seed_index
        seed = _problem(_take(op, slice(i, i + 1)), b[i:i + 1],
                        None if x0 is None else x0[i:i + 1], config)
        basis = seed_basis(seed.operator.matvec, seed.b[0], config.basis_size,
                           seed_x0=None if seed.x0 is None else seed.x0[0],
                           precondition=precondition(seed.operator))

    def solve_chunk(op_c, b_c, x0_c):
        # The reduction (if any), the solve and the recovery all run chunk by chunk: on a CPU
        # every intermediate of a chunk stays in the core's private caches (whole-batch
        # passes were measured 2x slower on this 2-core machine).
        p = _problem(op_c, b_c, x0_c, config)
        A, M = p.operator, precondition(p.operator)
        if basis is None:
            res = solver(A.matvec, p.b, x0=p.x0, precondition=M, tol=p.tol, atol=p.atol, **kw)
        else:
            res = cross_matrix_solve(A.matvec, p.b, basis, x0=p.x0, precondition=M,
                                     projection=config.projection,
                                     recycle=config.method == "recycled", tol=p.tol, atol=p.atol,
                                     solver=config.krylov, **kw)
        return p.finish(res)

    chunk = config.chunk_size
    if chunk == "auto":
        chunk = auto_chunk_size(config, op.grid_shape, op.dtype)
    if chunk is None:
        res = solve_chunk(op, b, x0)
    else:
        res = krylov.map_in_chunks(solve_chunk, op, b, x0, chunk_size=chunk)
    if basis is not None:
        res = res._replace(num_matvecs=res.num_matvecs.at[config.seed_index].add(
            basis.num_matvecs))
    return res
