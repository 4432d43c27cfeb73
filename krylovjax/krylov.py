"""Batched Krylov solvers: Arnoldi (CGS2), restarted GMRES with per-system masks, GCRO recycling,
BiCGStab.

Every function here solves *many independent systems at once*: the systems are the leading
batch axis of one array, never a ``vmap`` over a single-system solver (design.md decision 6).
A ``matvec`` is any callable mapping ``[B, *shape] -> [B, *shape]`` (for this project the
5-point log-FP stencil on ``[B, H, W]``); internally fields are flattened to ``[B, N]`` with
``N = prod(shape)``.

Equations (method.md section 5, design.md decisions 5-7; standard Krylov theory):

* Arnoldi (method.md 5.3 step 1, "seed basis"): ``A M^{-1} V_k = V_{k+1} H`` with ``V`` having
  orthonormal rows and ``H`` upper Hessenberg, built with classical Gram-Schmidt applied twice.
* GMRES(m) with right preconditioning (method.md 5.3 step 3, "refine"): solve
  ``A M^{-1} u = b``, ``x = x0 + M^{-1} V_m y`` with ``y = argmin ||beta e1 - H y||``; the small
  least-squares problem is reduced by Givens rotations, one per inner step and per system, so
  each system's residual estimate ``|g_{j+1}|`` is known after every step.
* GCRO augmentation with a fixed recycled space ``(U, C)``, ``C = A U`` with orthonormal rows
  (design.md decision 7, "seed basis as a recycled, augmented space"):
  ``x0 <- x0 + U^T C r0``, ``r0 <- (I - C^T C) r0``, Arnoldi on ``(I - C^T C) A M^{-1}``,
  update ``x <- x + M^{-1} V y - U^T (B y)`` with ``B = C A M^{-1} V``.
* BiCGStab (van der Vorst), right-preconditioned (method.md 5.3 step 3, "BiCGSTAB is the valid
  fallback"): short recurrences, two operator applications per iteration and no basis, so
  nothing has to be re-read from memory; true residual at the end of each cycle.

Every dot product / matmul uses ``precision=jax.lax.Precision.HIGHEST`` (design.md decision 5).
All functions work in float32 and float64 (whichever dtype ``b`` has) and are jit-able.
Called outside ``jax.jit``, every call traces and compiles its loops anew (JAX keys its cache
on the loop bodies, which close over ``matvec``): about a second per call on a CPU, and each
compiled program stays loaded. In a loop, call them inside your own ``jax.jit`` (with the
operator as an argument) or use :func:`krylovjax.solve_fp`, which is jitted.
The Givens rotations of each system are accumulated in a small orthogonal ``[m+1, m+1]`` matrix
(``Q^T``), so applying all previous rotations to a new Hessenberg column is one tiny batched
matvec instead of a sequential loop. :func:`gmres` contains ``lax.while_loop``s and cannot be
reverse-differentiated; :func:`linear_solve` gives implicit gradients.

Large batches: XLA on CPU is bound by re-reading the Krylov basis from memory; solving
cache-sized chunks of the batch one after the other is much faster (design.md, "Performance
facts"). :func:`map_in_chunks` does that for any solver call whose operator is a pytree with a
leading batch axis (e.g. ``fokker_planck.FPOperator``). Inside the loops every operator input
and output is materialised (:func:`_materialise`) and every reduction is a ``dot_general``
(:func:`_dot`): XLA's CPU fusion otherwise recomputes stencils per consumer.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from krylovjax import _checks

Array = jax.Array
MatVec = Callable[[Array], Array]

_HI = lax.Precision.HIGHEST

# A new Arnoldi vector whose norm after CGS2 is below ``_BREAKDOWN_EPS * eps * ||A M^{-1} v_j||``
# is round-off: the Krylov space is (numerically) invariant -> breakdown.
_BREAKDOWN_EPS = 32.0
# CGS2 projects against a static prefix of the basis; at most this many prefix lengths (lax.switch
# branches) are compiled per Arnoldi step.
_MAX_BRANCHES = 8
_PREFIX_MIN_SIZE = 8192  # (m+1)*N per system from which prefix projections pay off


class Status(enum.IntEnum):
    """Per-system outcome of :func:`gmres` (``KrylovResult.status``)."""

    CONVERGED = 0       # ||b - A x|| <= max(tol ||b||, atol), checked with a true residual
    MAX_ITERATIONS = 1  # max_restarts cycles used without converging
    STAGNATION = 2      # gmres: a whole cycle reduced the true residual by less than stagnation_tol;
    #                     bicgstab: stagnation_patience cycles in a row did so for its best residual
    BREAKDOWN = 3       # Krylov space exhausted with a singular projected problem, non-finite
    #                     values, a vector whose sum of squares left the normal range (an operator
    #                     of extreme norm), or a bicgstab cycle that could not take a step


class KrylovResult(NamedTuple):
    """Result of a batched solve (a pytree; every field has the batch axis first).

    Attributes:
      x: ``[B, *shape]`` solution, dtype of ``b``.
      converged: ``[B]`` bool, ``status == Status.CONVERGED``.
      num_matvecs: ``[B]`` int32, operator applications this system needed: one true residual
        at the start (none when ``x0`` is None: then ``r0 = b`` exactly) and after every cycle,
        plus one per inner Arnoldi step while the system was
        still iterating. (In a batch, steps run while *other* systems iterate are not counted:
        they are computed on a zero vector and discarded.) Matvecs spent building a recycled
        space are reported by :func:`make_recycle_space`, not here.
      residual: ``[B]`` final *true* relative residual ``||b - A x|| / ||b||`` (0 where b = 0).
      num_restarts: ``[B]`` int32, number of GMRES cycles (Arnoldi restarts) run on the system;
        0 if ``x0`` already met the tolerance.
      status: ``[B]`` int32, a :class:`Status` value.
    """

    x: Array
    converged: Array
    num_matvecs: Array
    residual: Array
    num_restarts: Array
    status: Array


class RecycleSpace(NamedTuple):
    """A recycled space for :func:`gmres` (``recycle=``), built by :func:`make_recycle_space`.

    Attributes:
      U: ``[B, k, N]`` (or ``[k, N]`` shared by all systems) flattened fields.
      C: same shape as ``U``, ``C = A U`` row by row, rows orthonormal per system.
      num_matvecs: ``[B]`` int32, matvecs spent building it (k per system).
    """

    U: Array
    C: Array
    num_matvecs: Array


# ----------------------------------------------------------------------------------------------
# Input checks (shapes / dtypes at trace time, values only when concrete).


def _check_int(name: str, value, minimum: int, *, static: bool) -> None:
    if not _checks.is_concrete(value):
        if static:
            raise ValueError(f"{name}: expected a static Python int >= {minimum}, got a traced "
                             "value (mark it static under jit)")
        return
    a = np.asarray(value)
    if a.ndim != 0 or not np.issubdtype(a.dtype, np.integer) or isinstance(value, bool):
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if int(a) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {int(a)}")


def _check_real(name: str, value) -> None:
    """Refuse a bool, a string or an array of neither integers nor floats for a tolerance, in
    :class:`krylovjax.SolverConfig`'s words: ``tol=True`` was taken as 1.0 (every system
    "converged" at ``x = 0``) and ``tol="1e-8"`` as 1e-8. Only the dtype is looked at, so a
    traced value (static dtype) is checked too."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        got = repr(value) if _checks.is_concrete(value) and np.size(value) < 8 else f"dtype {dtype}"
        raise ValueError(f"{name}: expected a real number or an array of real numbers, got {got}")


def _check_scalar(name: str, value, *, positive: bool) -> None:
    _check_real(name, value)
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {jnp.shape(value)}")
    if not _checks.is_concrete(value):
        return
    v = float(np.asarray(value))
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {v}")


def _check_tolerance(name: str, value, batch: int, *, positive: bool) -> None:
    """A tolerance: a scalar or one value per system (shape ``[B]``)."""
    _check_real(name, value)
    shape = jnp.shape(value)
    if shape not in ((), (batch,)):
        raise ValueError(f"{name}: expected a scalar or an array of shape [B={batch}] (one "
                         f"per system), got shape {shape}")
    if not _checks.is_concrete(value):
        return
    v = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(v <= 0 if positive else v < 0):
        raise ValueError(f"{name}: expected finite values {'> 0' if positive else '>= 0'}, "
                         f"got {value}")


def _check_field_batch(name: str, x, *, what: str = "[B, *shape]") -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array {what}, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected rank >= 2 {what} (batch axis + field), "
                         f"got shape {x.shape}")
    if x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name}: expected at least one system with at least one unknown "
                         f"{what}, got shape {x.shape}")
    _checks.check_finite(name, x)


def _as_array(x):
    """A NumPy array (or scalar) as a JAX array, in JAX's dtype for it (float64 NumPy input is
    float32 while ``jax_enable_x64`` is off, as under ``jax.jit``); anything else unchanged."""
    return jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x


def _check_callable_shape(name: str, fn: MatVec, shape, dtype) -> None:
    """Trace ``fn`` abstractly and check it maps ``[B, *shape]`` to the same shape and dtype."""
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable [B, *shape] -> [B, *shape], "
                        f"got {type(fn).__name__}")
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: failed on an input of shape {tuple(shape)} and dtype {dtype} "
                         f"(that of b; does it belong to another batch or grid?): {err}") from err
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected it to map an array of shape {tuple(shape)} to the "
                         f"same shape, got {getattr(out, 'shape', type(out).__name__)}")
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected output dtype {dtype} (that of b), got {out.dtype}")


# ----------------------------------------------------------------------------------------------
# Small batched linear-algebra helpers.


def _dot(a: Array, b: Array) -> Array:
    """Per-system dot product ``[B, N] x [B, N] -> [B]`` (``precision=HIGHEST``).

    A ``dot_general``, not a ``reduce``: on CPU, XLA hands reductions to a library fusion that
    absorbs the whole producer expression (a stencil, say) and runs it several times slower;
    dot operands are materialised first."""
    return jnp.einsum("bn,bn->b", a, b, precision=_HI)


def _norm(x: Array) -> Array:
    """Euclidean norm over the last axis ``[B, N] -> [B]``."""
    return jnp.sqrt(_dot(x, x))


def _pow2_scale(x: Array) -> Array:
    """Per-system power of two ``s [B]`` with ``max|x| / s`` in ``[1, 2)`` (1 where ``x [B, N]``
    is zero or not finite). Dividing by it is exact in floating point, and it keeps a sum of
    squares from overflowing (``||b||^2`` of entries near 1e19 in float32) or underflowing
    (near 1e-24), either of which made a solve report convergence with ``x = 0``."""
    if not _checks.is_float32_or_64(x.dtype):  # (float16 was a bare KeyError: 2 here)
        raise TypeError(f"x: expected dtype float32 or float64 (those of the solvers), got {x.dtype}")
    amax = jnp.max(jnp.abs(x), axis=1)
    # 2^floor(log2(amax)): amax's bits with the mantissa cleared (exact; no pow or frexp)
    info = jnp.finfo(x.dtype)
    uint = {4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    exponent_bits = ((1 << int(info.nexp)) - 1) << int(info.nmant)
    s = lax.bitcast_convert_type(lax.bitcast_convert_type(amax, uint) & uint(exponent_bits), x.dtype)
    # subnormal or 0: left unscaled. XLA flushes subnormals to zero on CPUs and GPUs (checked:
    # jit(lambda x: 2 * x)(1e-40 in float32) is 0), so a right-hand side of only subnormal
    # entries is the zero vector to every operation and is solved as such (x = 0).
    ok = jnp.isfinite(amax) & (amax >= info.smallest_normal)
    return jnp.where(ok, s, jnp.ones_like(s))


def scaled_norm(x: Array) -> Array:
    """Euclidean norm over the last axis ``[B, N] -> [B]`` without overflow or underflow of the
    squares (computed on ``x / s``, :func:`_pow2_scale`, times ``s``)."""
    s = _pow2_scale(x)
    return s * _norm(x / s[:, None])


def _project(V: Array, w: Array) -> Array:
    """``V w`` per system: ``V [B, k, N]`` (or shared ``[k, N]``), ``w [B, N]`` -> ``[B, k]``."""
    if V.ndim == 2:
        return jnp.einsum("kn,bn->bk", V, w, precision=_HI)
    return jnp.einsum("bkn,bn->bk", V, w, precision=_HI)


def _combine(V: Array, h: Array) -> Array:
    """``V^T h`` per system: ``V [B, k, N]`` (or ``[k, N]``), ``h [B, k]`` -> ``[B, N]``."""
    if V.ndim == 2:
        return jnp.einsum("bk,kn->bn", h, V, precision=_HI)
    return jnp.einsum("bk,bkn->bn", h, V, precision=_HI)


def _materialise(x: Array) -> Array:
    """Force ``x`` into memory: XLA must not fuse its producer into the consumers.

    On CPU, XLA otherwise fuses a stencil (or an expression feeding one) into every consumer,
    recomputing it per neighbour read or inside a reduction: measured 5-10x slower per Krylov
    step (a norm of a fused 5-point matvec was 10x the matvec itself). Numerically a no-op."""
    return lax.optimization_barrier(x)


def _flat_operator(matvec: MatVec, precondition: MatVec | None, shape) -> MatVec:
    """``v [B, N] -> A M^{-1} v [B, N]`` from field callables on ``[B, *shape]``.

    Input and output are materialised (:func:`_materialise`)."""

    def op(v):
        f = _materialise(v).reshape(shape)
        if precondition is not None:
            f = _materialise(precondition(f))
        return _materialise(matvec(f).reshape(v.shape))

    return op


def _cgs2_step(op: MatVec, V: Array, j, C: Array | None, eps: float):
    """One Arnoldi step with classical Gram-Schmidt applied twice.

    ``V [B, m+1, N]``: rows ``0..j`` hold the current orthonormal basis; rows ``> j`` are
    ignored (projections are masked by step). ``C`` (optional, ``[B, k, N]`` or ``[k, N]``)
    has orthonormal rows that are projected out too (GCRO).

    Returns ``(v_new [B, N], h [B, m+1], hc [B, k] | None, breakdown [B], unscaled [B])`` with
    ``A M^{-1} v_j = sum_{i <= j+1} h_i v_i + C^T hc`` (``v_{j+1} = v_new``, ``h[j+1]`` the norm
    of the orthogonalised vector); on breakdown ``v_new = 0`` and ``h[j+1] = 0``. ``unscaled``:
    ``||A M^{-1} v_j||`` is below ``sqrt(smallest normal)`` or not finite, where its squares are
    flushed to zero or overflow and the step's breakdown test means nothing (:func:`_unscaled`).
    """
    m1 = V.shape[1]
    v = lax.dynamic_index_in_dim(V, j, axis=1, keepdims=False)
    w = op(v)
    w_sq = _dot(w, w)
    w_norm = jnp.sqrt(w_sq)  # (= _norm(w))

    def cgs2(rows: int):
        # CGS2 against the leading ``rows`` rows of V (static), masked to rows <= j
        def branch(V, w, C):
            Vr = V[:, :rows]
            keep = (jnp.arange(rows, dtype=jnp.result_type(j)) <= j).astype(w.dtype)[None, :]
            h = jnp.zeros(w.shape[:1] + (rows,), w.dtype)
            hc = None
            for _ in range(2):  # classical Gram-Schmidt, twice
                dh = _project(Vr, w) * keep
                if C is not None:
                    dc = _project(C, w)
                    w = w - _combine(Vr, dh) - _combine(C, dc)
                    hc = dc if hc is None else hc + dc
                else:
                    w = w - _combine(Vr, dh)
                h = h + dh
            return w, jnp.pad(h, ((0, 0), (0, m1 - rows))), hc
        return branch

    # The basis is re-read four times per step and dominates the cost: project only against a
    # static prefix of V that covers rows 0..j (one of at most _MAX_BRANCHES prefix lengths)
    # instead of all m+1 rows. Small bases skip this (it only costs compile time there).
    big = m1 * V.shape[2] >= _PREFIX_MIN_SIZE
    block = -(-m1 // min(_MAX_BRANCHES if big else 1, m1))
    sizes = [min(m1, block * (q + 1)) for q in range(-(-m1 // block))]
    if len(sizes) == 1:
        w, h, hc = cgs2(sizes[0])(V, w, C)
    else:
        w, h, hc = lax.switch(j // block, [cgs2(r) for r in sizes], V, w, C)
    beta = _norm(w)
    breakdown = beta <= (_BREAKDOWN_EPS * eps) * w_norm
    safe = jnp.where(breakdown, jnp.ones_like(beta), beta)
    v_new = jnp.where(breakdown[:, None], jnp.zeros_like(w), w / safe[:, None])
    h = lax.dynamic_update_index_in_dim(h, jnp.where(breakdown, 0.0, beta).astype(h.dtype),
                                        j + 1, axis=1)
    return v_new, h, hc, breakdown, _unscaled(w_sq)


def _unscaled(sq: Array) -> Array:
    """Where a sum of squares ``sq [B]`` (``<w, w>``) is below the smallest normal number or
    not finite: the squares of the vector's entries were flushed to zero (XLA flushes
    subnormals on CPUs and GPUs) or overflowed, so what is computed from it is meaningless.
    Before (a review, 2026-12-07), an operator of norm about 1e-160 (float64; 1e-20 in float32)
    made every Arnoldi step a breakdown, so GMRES(20) ran as GMRES(1) and ended in STAGNATION
    at residual 0.3, and BiCGStab's ``<t, t> = 0`` ended each cycle after one step. Such
    systems now end in BREAKDOWN after one cycle. Rescaling those vectors by a power of two
    instead (a branch inside the solvers' loops) cost 2-11% of every GMRES solve and 5-9% of
    every BiCGStab solve on this CPU, for operators no one scales so."""
    info = jnp.finfo(sq.dtype)
    return ~((sq >= info.smallest_normal) & (sq <= info.max))


# ----------------------------------------------------------------------------------------------
# Arnoldi.


def arnoldi(matvec: MatVec, v: Array, k: int, *,
            precondition: MatVec | None = None) -> tuple[Array, Array]:
    """Batched Arnoldi process (CGS2): an orthonormal basis of ``K_{k+1}(A M^{-1}, v)``.

    Called outside ``jax.jit`` it traces and compiles anew on every call (the module
    docstring); in a loop, call it inside your own ``jax.jit``.

    Implements the seed-basis construction of method.md section 5.3 step 1:
    ``A M^{-1} V_k = V_{k+1} H`` (``M^{-1}`` = identity when ``precondition`` is None).

    Args:
      matvec: callable ``[B, *shape] -> [B, *shape]`` applying ``A`` to every system.
      v: ``[B, *shape]`` starting vectors, float32 or float64.
      k: number of Arnoldi steps (static Python int >= 1).
      precondition: optional callable ``[B, *shape] -> [B, *shape]`` applying ``M^{-1}``.

    Returns:
      ``(V, H)``: ``V [B, k+1, N]`` with orthonormal rows, ``V[:, 0] = v / ||v||``;
      ``H [B, k+1, k]`` upper Hessenberg. On a breakdown at step ``j`` (the Krylov space is
      invariant: ``H[:, j+1, j] == 0``) the remaining rows of ``V`` and columns of ``H`` are
      zero; a zero starting vector gives all-zero ``V`` and ``H``. Never NaN.
    """
    v = _as_array(v)
    _check_field_batch("v", v)
    _check_int("k", k, 1, static=True)
    _check_callable_shape("matvec", matvec, v.shape, v.dtype)
    if precondition is not None:
        _check_callable_shape("precondition", precondition, v.shape, v.dtype)
    B = v.shape[0]
    n = math.prod(v.shape[1:])
    k = int(k)
    dtype = v.dtype
    eps = float(jnp.finfo(dtype).eps)
    op = _flat_operator(matvec, precondition, v.shape)

    v0 = v.reshape(B, n)
    v0 = v0 / _pow2_scale(v0)[:, None]  # exact; a tiny or huge start vector normalises all the same
    nrm = _norm(v0)
    v0 = jnp.where((nrm > 0)[:, None], v0 / jnp.where(nrm > 0, nrm, 1.0)[:, None], 0.0)
    V = jnp.zeros((B, k + 1, n), dtype).at[:, 0].set(v0)
    Ht = jnp.zeros((B, k, k + 1), dtype)  # H transposed: row j = column j of H

    def body(j, carry):
        V, Ht = carry
        v_new, h, _, _, _ = _cgs2_step(op, V, j, None, eps)
        V = lax.dynamic_update_index_in_dim(V, v_new, j + 1, axis=1)
        Ht = lax.dynamic_update_index_in_dim(Ht, h, j, axis=1)
        return V, Ht

    V, Ht = lax.fori_loop(0, k, body, (V, Ht))
    return V, jnp.swapaxes(Ht, 1, 2)


# ----------------------------------------------------------------------------------------------
# Recycled spaces.


def orthonormalise_rows(W: Array, Y: Array, *, drop_tol: float) -> tuple[Array, Array, Array]:
    """Thin QR of the rows of ``W`` by classical Gram-Schmidt twice, in plain XLA ops.

    ``W [B, k, N]`` = ``R^T Q`` per system with ``Q [B, k, N]`` orthonormal rows and ``R``
    upper triangular; the same row operations are applied to ``Y [B, k, M]``, which returns
    ``R^{-T} Y`` without a triangular solve (``Y`` = identity gives ``R^{-T}`` itself; if
    ``W = A Y`` row by row, then ``Q = A (R^{-T} Y)``: the GCRO pair of
    :func:`make_recycle_space`). Row ``j`` is dropped (zero in both outputs, ``good[j]``
    False) when its part orthogonal to the previous rows has a norm ``|R_jj| <= drop_tol *
    max_i ||W_i||``: the Householder criterion on ``diag(R)``, as ``|R_jj|`` is that norm.

    Why not ``jnp.linalg.qr`` / ``solve_triangular``: jaxlib 0.10.2's CPU LAPACK kernels split
    a large batch over XLA's intra-op thread pool and *block* a pool thread until the pieces
    finish. Two such calls running at once (the ``geqrf`` -> ``orgqr`` and the ``trsm`` of
    this pair are independent, so XLA runs them concurrently) occupy both threads of a 2-core
    machine's pool and deadlock at 0 % CPU; it happened from ``N = 128 * 128``
    (docs/bench_solvers_cpu.md, BUILD_NOTES.md). ``k`` is small: the loop over rows is
    unrolled, each step is two batched projections.

    Returns:
      ``(Q [B, k, N], R^{-T} Y [B, k, M], good [B, k] bool)``, dtype of ``W``.
    """
    k = W.shape[1]
    scale = jnp.max(jnp.sqrt(jnp.einsum("bkn,bkn->bk", W, W, precision=_HI)), axis=1)
    qs, ys, goods = [], [], []
    for j in range(k):
        w, y = W[:, j], Y[:, j]
        if j:
            Qj, Yj = jnp.stack(qs, axis=1), jnp.stack(ys, axis=1)
            for _ in range(2):  # classical Gram-Schmidt, twice
                h = _project(Qj, w)
                w, y = w - _combine(Qj, h), y - _combine(Yj, h)
        nrm = _norm(w)
        good = nrm > drop_tol * scale
        safe = jnp.where(good, nrm, 1.0)[:, None]
        qs.append(jnp.where(good[:, None], w / safe, 0.0))
        ys.append(jnp.where(good[:, None], y / safe, 0.0))
        goods.append(good)
    return jnp.stack(qs, axis=1), jnp.stack(ys, axis=1), jnp.stack(goods, axis=1)


def make_recycle_space(matvec: MatVec, U: Array) -> RecycleSpace:
    """Build a recycled space ``(U', C)`` with ``C = A U'`` and orthonormal rows of ``C``.

    Computes ``A U`` (k matvecs per system), a batched thin QR ``(A U)^T = Q R`` (CGS2 in
    plain XLA ops, :func:`orthonormalise_rows`: no LAPACK call, which deadlocked XLA's CPU
    thread pool at 128x128) and returns ``U' = R^{-T} U`` (rows), ``C = Q^T``, so that
    ``A U'^T = C^T`` holds per system (the GCRO contract of :func:`gmres`'s ``recycle``).
    Directions of ``U`` that are (numerically) linearly dependent after ``A``
    (``|R_ii| <= max(k, 32) eps max_i ||(A U)_i||``) are dropped: their rows of ``U'`` and
    ``C`` are zero, which keeps the contract.

    Args:
      matvec: callable ``[B, *shape] -> [B, *shape]``.
      U: ``[B, k, *shape]`` k fields per system (e.g. a seed image's Krylov basis, reshaped).

    Returns:
      :class:`RecycleSpace` with ``U, C [B, k, N]`` and ``num_matvecs [B]`` (= k).
    """
    if not hasattr(U, "ndim") or U.ndim < 3:
        raise ValueError(f"U: expected shape [B, k, *shape] (rank >= 3), got "
                         f"{getattr(U, 'shape', type(U).__name__)}")
    _check_field_batch("U", U, what="[B, k, *shape]")
    B, k = U.shape[:2]
    fshape = (B,) + U.shape[2:]
    _check_callable_shape("matvec", matvec, fshape, U.dtype)
    n = math.prod(U.shape[2:])
    eps = float(jnp.finfo(U.dtype).eps)

    AU = lax.map(lambda u: matvec(u), jnp.moveaxis(U, 1, 0))  # k matvecs on the whole batch
    AU = jnp.moveaxis(AU, 0, 1).reshape(B, k, n)
    # No LAPACK here (see orthonormalise_rows): C = R^{-T} (A U), U' = R^{-T} U in one pass.
    C, Up, _ = orthonormalise_rows(AU, U.reshape(B, k, n),
                                   drop_tol=max(k, _BREAKDOWN_EPS) * eps)
    return RecycleSpace(U=Up, C=C, num_matvecs=jnp.full((B,), k, jnp.int32))


def _check_recycle(recycle, B: int, n: int, dtype):
    if not isinstance(recycle, (tuple, list)) or len(recycle) < 2:
        raise ValueError("recycle: expected a pair (U, C) or a RecycleSpace")
    U, C = recycle[0], recycle[1]
    for name, a in (("recycle U", U), ("recycle C", C)):
        if not hasattr(a, "shape"):
            raise ValueError(f"{name}: expected an array [B, k, N] or [k, N]")
        ok = (a.ndim == 3 and a.shape[0] == B and a.shape[2] == n) or (
            a.ndim == 2 and a.shape[1] == n)
        if not ok:
            raise ValueError(f"{name}: expected shape [B={B}, k, N={n}] or [k, N={n}], "
                             f"got {a.shape}")
        if a.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (that of b), got {a.dtype}")
        _checks.check_finite(name, a)
    if U.shape != C.shape:
        raise ValueError(f"recycle: U and C must have the same shape, got {U.shape} and "
                         f"{C.shape}")
    return U, C


def _flat_preconditioner(precondition: MatVec | None, shape) -> MatVec:
    """``M^{-1}`` on flat ``[B, n]`` vectors (the identity when there is no preconditioner)."""
    def M_flat(v):
        if precondition is None:
            return v
        return _materialise(precondition(_materialise(v).reshape(shape)).reshape(v.shape))
    return M_flat


class _Start(NamedTuple):
    """The state every batched solver starts from: flat right-hand sides, thresholds, the
    initial iterate and residual, per-system masks, statuses and matvec counts."""
    bf: Array
    b_norm: Array
    b_zero: Array
    thresh: Array
    stag_factor: Array
    x: Array
    r: Array
    r_norm: Array
    active: Array
    status: Array
    n_mv: Array
    scale: Array  # [B] the power of two b was divided by (:func:`_pow2_scale`); x is solved for x / scale


#: ``tol=None``: the relative tolerance of :func:`gmres` and :func:`bicgstab` for ``b``'s dtype.
#: float32 cannot verify 1e-8 (below its machine epsilon, :func:`verifiable_tol`): asked for it,
#: every system ended with STAGNATION at a residual of about 5e-8 (a thirty-third session
#: walkthrough); 1e-6 is what :data:`krylovjax.precompute.DEFAULT_TOL` uses for float32.
DEFAULT_TOL = {np.dtype(np.float64): 1e-8, np.dtype(np.float32): 1e-6}


def default_tol(tol, dtype):
    """``tol``, or for None the default of ``dtype`` (:data:`DEFAULT_TOL`; 1e-8 for a dtype the
    solvers refuse anyway)."""
    return DEFAULT_TOL.get(np.dtype(dtype), 1e-8) if tol is None else tol


def verifiable_tol(tol, dtype) -> Array:
    """``tol`` where the working precision can verify it, else 0 (the relative test is off).

    A relative residual below the dtype's machine epsilon (1.2e-7 in float32, 2.2e-16 in
    float64) cannot be checked in that dtype: the computed residual ``b - A x`` carries a
    rounding error of about that size. Asked for 7e-8 in float32, GMRES reported 13 of 16
    systems converged whose float64 residual was up to 1.27x the tolerance; from ``tol >= eps``
    on no system was (16 log-FP systems, five solvers, tol 1.2e-7 to 1e-6; BUILD_NOTES)."""
    tol = jnp.asarray(tol, dtype)
    return jnp.where(tol >= jnp.finfo(dtype).eps, tol, jnp.zeros_like(tol))


def _start(A_flat: MatVec, b: Array, x0: Array | None, tol, atol, stagnation_tol) -> _Start:
    """Initial iterate ``x0`` (zero where ``b = 0``) and residual; a zero initial guess needs
    no matvec (``r0 = b`` exactly); an ``x0`` whose residual exceeds ``||b||`` or is not
    finite is replaced by 0 (its matvec still counts). Systems already converged or with a
    non-finite residual (a traced non-finite ``b``) are inactive from the start (``CONVERGED`` /
    ``BREAKDOWN``), the others ``MAX_ITERATIONS`` until they stop.

    Each system is solved for ``x / s`` with ``b / s`` (``s`` a power of two near ``max|b|``,
    ``atol`` divided alike): exact in floating point, so the iterates are those of the unscaled
    system, but the norms can neither overflow nor underflow; :func:`_result` scales back."""
    dtype = b.dtype
    B = b.shape[0]
    bf = b.reshape(B, -1)
    scale = _pow2_scale(bf)
    bf = bf / scale[:, None]
    b_norm = _norm(bf)
    b_zero = b_norm == 0
    thresh = jnp.maximum(verifiable_tol(tol, dtype) * b_norm, jnp.asarray(atol, dtype) / scale)
    stag_factor = 1.0 - jnp.asarray(stagnation_tol, dtype)
    x = jnp.zeros_like(bf) if x0 is None else jnp.where(b_zero[:, None], 0.0,
                                                        x0.reshape(bf.shape) / scale[:, None])
    r = bf if x0 is None else jnp.where(b_zero[:, None], 0.0, bf - A_flat(x))
    r_norm = _norm(r)
    if x0 is not None:
        # A start worse than x = 0 (or whose residual is not finite: A x0 overflowed, or x0 / s
        # did) is replaced by 0. GMRES cannot go below the start's residual within a cycle and
        # discards a cycle that raises it, so from a cross-matrix warm start at 9e3 ||b|| it
        # returned residual 10 where x = 0 reaches 7e-2; an x0 of 1e10 with b of 1e-300
        # returned x = inf (a review, 2026-12-07).
        worse = ~(r_norm <= b_norm)
        x = jnp.where(worse[:, None], 0.0, x)
        r = jnp.where(worse[:, None], bf, r)
        r_norm = jnp.where(worse, b_norm, r_norm)
    ok0 = jnp.isfinite(r_norm) & jnp.isfinite(thresh)
    converged = ok0 & (r_norm <= thresh)
    status = jnp.where(converged, Status.CONVERGED,
                       jnp.where(ok0, Status.MAX_ITERATIONS, Status.BREAKDOWN)).astype(jnp.int32)
    n_mv = jnp.where(b_zero | (x0 is None), 0, 1).astype(jnp.int32)
    return _Start(bf, b_norm, b_zero, thresh, stag_factor, x, r, r_norm, ~converged & ok0,
                  status, n_mv, scale)


def _stop(status: Array, active: Array, conv: Array, brk: Array, stag: Array) -> Array:
    """The statuses after a cycle: active systems that converged, broke down or stagnated get
    that status; the others keep theirs."""
    return jnp.where(active & conv, Status.CONVERGED,
                     jnp.where(active & brk, Status.BREAKDOWN,
                               jnp.where(active & stag, Status.STAGNATION,
                                         status))).astype(jnp.int32)


def _result(b: Array, st: _Start, x: Array, r_norm: Array, status: Array, n_mv: Array,
            n_cyc: Array) -> KrylovResult:
    residual = r_norm / jnp.where(st.b_zero, 1.0, st.b_norm)
    return KrylovResult(x=(x * st.scale[:, None]).reshape(b.shape), converged=status == Status.CONVERGED,
                        num_matvecs=n_mv, residual=residual, num_restarts=n_cyc,
                        status=status)


def _check_solver_args(matvec, b, x0, tol, atol, restart, max_restarts, precondition,
                       stagnation_tol) -> None:
    """Checks shared by :func:`gmres` and :func:`bicgstab` (shapes, dtypes, ranges)."""
    _check_field_batch("b", b)
    if x0 is not None:
        if not hasattr(x0, "shape") or tuple(x0.shape) != tuple(b.shape):
            raise ValueError(f"x0: expected shape {tuple(b.shape)} (that of b), got "
                             f"{getattr(x0, 'shape', type(x0).__name__)}")
        if x0.dtype != b.dtype:
            raise TypeError(f"x0: expected dtype {b.dtype} (that of b), got {x0.dtype}")
        _checks.check_finite("x0", x0)
    _check_tolerance("tol", tol, b.shape[0], positive=True)
    _check_tolerance("atol", atol, b.shape[0], positive=False)
    _check_int("restart", restart, 1, static=True)
    _check_int("max_restarts", max_restarts, 1, static=False)
    _check_scalar("stagnation_tol", stagnation_tol, positive=False)
    if _checks.is_concrete(stagnation_tol) and not float(stagnation_tol) < 1.0:
        raise ValueError(f"stagnation_tol: expected a number in [0, 1), got {stagnation_tol}")
    _check_callable_shape("matvec", matvec, b.shape, b.dtype)
    if precondition is not None:
        _check_callable_shape("precondition", precondition, b.shape, b.dtype)


# ----------------------------------------------------------------------------------------------
# GMRES.


def gmres(matvec: MatVec, b: Array, *, x0: Array | None = None, tol: float | None = None,
          atol: float = 0.0, restart: int = 20, max_restarts: int = 50,
          precondition: MatVec | None = None, recycle=None,
          stagnation_tol: float = 1e-3) -> KrylovResult:
    """Batched restarted GMRES(restart) with right preconditioning and per-system masks.

    Called outside ``jax.jit`` it traces and compiles anew on every call (the module
    docstring); in a loop, call it inside your own ``jax.jit``.

    Solves ``A_i x_i = b_i`` for every system ``i`` of the batch at once (method.md section 5.3
    step 3; design.md decision 6). Each cycle: Arnoldi (CGS2) on ``A M^{-1}`` from the current
    residual, Givens rotations applied per system after every step (so each residual estimate
    is known at once), then ``x <- x + M^{-1} V y`` where each system uses only the steps up to
    the one at which *its* estimate met the tolerance (masked triangular solve). The inner loop
    exits as soon as every system's estimate met the tolerance (``lax.while_loop``). After each
    cycle the *true* residual ``b - A x`` is recomputed and decides convergence:

        system i converged  <=>  ||b_i - A_i x_i|| <= max(tol * ||b_i||, atol).

    Converged systems are frozen (bit for bit). A system whose true residual fell by less than
    a factor ``(1 - stagnation_tol)`` over a whole cycle stops with ``Status.STAGNATION`` (if
    the residual even grew, the cycle's update is discarded); an
    exhausted Krylov space with a singular projected problem, or a non-finite residual (the
    last finite iterate is kept), stops with ``Status.BREAKDOWN``; running out of cycles gives
    ``Status.MAX_ITERATIONS``. A lucky breakdown (the Krylov space contains the solution) is
    simply convergence. Rows with ``b_i = 0`` return ``x_i = 0``, converged, residual 0.
    ``b`` is rescaled by a power of two, the operator is not: a system whose Arnoldi vector
    ``A M^{-1} v`` has a sum of squares below the smallest normal number or above the largest
    (an ``A M^{-1}`` of norm below about 1e-154 or above 1e154 in float64, 1e-19 or 1e19 in
    float32) ends in ``Status.BREAKDOWN`` after that cycle: scale such an operator first (the
    log-FP operators, ``I`` plus a scaled stencil, are far from it). An ``x0`` whose residual
    exceeds ``||b||`` or is not finite is replaced by 0, the better start.

    With ``recycle=(U, C)`` (GCRO augmentation with a fixed space, ``C = A U``, orthonormal
    rows; see :func:`make_recycle_space`) every cycle starts with ``x += U^T C r``,
    ``r -= C^T C r``, runs Arnoldi on ``(I - C^T C) A M^{-1}`` while accumulating
    ``B = C A M^{-1} V`` and updates ``x += M^{-1} V y - U^T B y``.

    Args:
      matvec: callable ``[B, *shape] -> [B, *shape]`` applying ``A_i`` to system ``i``
        (closed over under jit; it must be linear).
      b: ``[B, *shape]`` right-hand sides, float32 or float64 (rank >= 2); sets the dtype.
      x0: optional ``[B, *shape]`` initial guesses (default 0), same dtype as ``b``.
      tol: relative tolerance > 0, a scalar or one per system ``[B]`` (may be traced), or
        None: 1e-8 for float64, 1e-6 for float32 (:data:`DEFAULT_TOL`). A system converges
        when its true residual, computed in ``b``'s dtype, is at most ``max(tol ||b||,
        atol)``. A ``tol`` below the dtype's machine epsilon (1.2e-7 in float32) cannot be
        verified in it and never counts as met: such a system stops by ``atol``, stagnation
        or the cycle limit, and says so (:func:`verifiable_tol`).
      atol: absolute tolerance >= 0, a scalar or ``[B]`` (may be traced).
      restart: Krylov dimension per cycle; static Python int >= 1 (clamped to N).
      max_restarts: maximum number of cycles >= 1 (may be traced).
      precondition: optional callable ``[B, *shape] -> [B, *shape]`` applying ``M^{-1}``
        (right preconditioning, must be linear).
      recycle: optional ``(U, C)`` pair or :class:`RecycleSpace`, each ``[B, k, N]`` or
        ``[k, N]`` (shared by all systems), same dtype as ``b``, with ``C = A_i U`` for every
        system ``i`` (:func:`make_recycle_space`): a shared ``[k, N]`` pair is valid only
        when all the systems have the same operator (one system's pair used for three
        different operators left two at residuals 2e-2 and 5e-3, reported as STAGNATION).
      stagnation_tol: minimum relative decrease of the true residual per cycle (in [0, 1)).

    Returns:
      :class:`KrylovResult`; ``x`` has the shape and dtype of ``b``, the other fields ``[B]``.

    Raises:
      ValueError / TypeError naming the argument for bad shapes, dtypes, ranges, non-finite
      concrete values.
    """
    b, x0 = _as_array(b), _as_array(x0)
    tol = default_tol(tol, getattr(b, "dtype", np.float64))
    _check_solver_args(matvec, b, x0, tol, atol, restart, max_restarts, precondition,
                       stagnation_tol)
    dtype = b.dtype
    B = b.shape[0]
    n = math.prod(b.shape[1:])
    m = min(int(restart), n)
    eps = float(jnp.finfo(dtype).eps)
    U = C = None
    if recycle is not None:
        U, C = _check_recycle(recycle, B, n, dtype)

    A_flat = _flat_operator(matvec, None, b.shape)          # x-space operator
    op = _flat_operator(matvec, precondition, b.shape)      # A M^{-1}
    M_flat = _flat_preconditioner(precondition, b.shape)
    st = _start(A_flat, b, x0, tol, atol, stagnation_tol)
    thresh, stag_factor = st.thresh, st.stag_factor
    x, r, r_norm, active, status, n_mv = st.x, st.r, st.r_norm, st.active, st.status, st.n_mv
    n_cyc = jnp.zeros((B,), jnp.int32)
    eye_m = jnp.eye(m, dtype=dtype)
    idx_m = jnp.arange(m, dtype=jnp.int32)  # compared with int32 counts (k_used)

    def recycle_project(x, r, mask):
        if U is None:
            return x, r
        cr = _project(C, r)
        cr = jnp.where(mask[:, None], cr, 0.0)
        return x + _combine(U, cr), r - _combine(C, cr)

    x, r = recycle_project(x, r, active)
    r_norm = jnp.where(active, _norm(r), r_norm)

    def cycle(state):
        it, x, r, r_norm, active, status, n_mv, n_cyc, V = state
        beta0 = jnp.where(active, r_norm, 0.0)
        v0 = jnp.where(active[:, None], r / jnp.where(active, r_norm, 1.0)[:, None], 0.0)
        V = lax.dynamic_update_index_in_dim(V, v0, 0, axis=1)
        QT = jnp.broadcast_to(jnp.eye(m + 1, dtype=dtype), (B, m + 1, m + 1))
        Rt = jnp.zeros((B, m, m), dtype)           # R transposed: row j = column j of R
        Bt = None if C is None else jnp.zeros((B, m, C.shape[-2]), dtype)
        done = ~active
        k_used = jnp.zeros((B,), jnp.int32)
        singular = jnp.zeros((B,), bool)

        def inner_cond(s):
            j, done = s[0], s[3]
            return (j < m) & ~jnp.all(done)

        def inner_body(s):
            j, V, QT, done, Rt, Bt, k_used, singular, est, n_mv, unscaled = s
            live = ~done
            v_new, h, hc, bd, out = _cgs2_step(op, V, j, C, eps)
            unscaled = unscaled | (live & out)
            h = jnp.where(live[:, None], h, 0.0)
            V = lax.dynamic_update_index_in_dim(
                V, jnp.where(live[:, None], v_new, 0.0), j + 1, axis=1)
            # previous Givens rotations (accumulated in QT) applied to the new column
            rcol = jnp.einsum("bij,bj->bi", QT, h, precision=_HI)
            a = lax.dynamic_index_in_dim(rcol, j, axis=1, keepdims=False)
            c_ = lax.dynamic_index_in_dim(rcol, j + 1, axis=1, keepdims=False)  # = h[j+1]
            rho = jnp.hypot(a, c_)  # no overflow of the squares
            nz = rho > 0
            safe = jnp.where(nz, rho, 1.0)
            cs = jnp.where(nz, a / safe, 1.0)
            sn = jnp.where(nz, c_ / safe, 0.0)
            rows = lax.dynamic_slice_in_dim(QT, j, 2, axis=1)              # [B, 2, m+1]
            new_rows = jnp.stack([cs[:, None] * rows[:, 0] + sn[:, None] * rows[:, 1],
                                  -sn[:, None] * rows[:, 0] + cs[:, None] * rows[:, 1]], 1)
            QT = lax.dynamic_update_slice_in_dim(QT, new_rows, j, axis=1)
            rcol = lax.dynamic_update_index_in_dim(rcol, rho, j, axis=1)
            Rt = lax.dynamic_update_index_in_dim(Rt, rcol[:, :m], j, axis=1)
            if Bt is not None:
                Bt = lax.dynamic_update_index_in_dim(
                    Bt, jnp.where(live[:, None], hc, 0.0), j, axis=1)
            # singular breakdown: invariant space and zero pivot -> this column is unusable
            sing = live & bd & (jnp.abs(a) <= (_BREAKDOWN_EPS * eps) * _norm(h))
            est_new = beta0 * jnp.abs(lax.dynamic_index_in_dim(QT[:, :, 0], j + 1, axis=1,
                                                               keepdims=False))
            est = jnp.where(live & ~sing, est_new, est)
            k_used = jnp.where(live, jnp.where(sing, j, j + 1), k_used).astype(jnp.int32)
            singular = singular | sing
            n_mv = n_mv + live.astype(jnp.int32)
            done = done | (live & (bd | out | (est <= thresh)))
            return j + 1, V, QT, done, Rt, Bt, k_used, singular, est, n_mv, unscaled

        s0 = (jnp.asarray(0, jnp.int32), V, QT, done, Rt, Bt, k_used, singular, beta0, n_mv,
              jnp.zeros((B,), bool))
        _, V, QT, _, Rt, Bt, k_used, singular, _, n_mv, unscaled = lax.while_loop(
            inner_cond, inner_body, s0)
        # masked triangular solve: columns past k_used -> identity, rhs -> 0
        use = idx_m[None, :] < k_used[:, None]                         # [B, m]
        R = jnp.where(use[:, None, :], jnp.swapaxes(Rt, 1, 2), eye_m)
        g = jnp.where(use, beta0[:, None] * QT[:, :m, 0], 0.0)
        y = jax.scipy.linalg.solve_triangular(R, g[..., None], lower=False)[..., 0]
        y = jnp.where(use, y, 0.0)
        z = _combine(V, jnp.pad(y, ((0, 0), (0, 1))))                 # V_m y
        dx = M_flat(z)
        if U is not None:
            dx = dx - _combine(U, jnp.einsum("bmk,bm->bk", Bt, y, precision=_HI))
        x_new = x + dx
        r_new = st.bf - A_flat(x_new)
        rn_new = _norm(r_new)
        n_mv = n_mv + active.astype(jnp.int32)
        finite = jnp.isfinite(rn_new)
        conv = finite & (rn_new <= thresh)
        brk = ~conv & (singular | ~finite | unscaled)
        stag = ~conv & ~brk & (rn_new > stag_factor * r_norm)
        # GMRES never increases the residual in exact arithmetic: an increase is round-off
        # damage (e.g. a nearly singular projected problem), so the previous iterate is kept.
        accept = active & finite & (conv | (rn_new <= r_norm))
        x = jnp.where(accept[:, None], x_new, x)
        r = jnp.where(accept[:, None], r_new, r)
        r_norm = jnp.where(accept, rn_new, r_norm)
        status = _stop(status, active, conv, brk, stag)
        n_cyc = n_cyc + active.astype(jnp.int32)
        active = active & ~conv & ~brk & ~stag
        # next cycle's recycled projection (not after the last one: x must keep the residual
        # just measured)
        more = active & (it + 1 < max_restarts)
        x, r = recycle_project(x, r, more)
        r_norm = jnp.where(more, _norm(r), r_norm)
        return it + 1, x, r, r_norm, active, status, n_mv, n_cyc, V

    def cycle_cond(state):
        return (state[0] < max_restarts) & jnp.any(state[4])

    V = jnp.zeros((B, m + 1, n), dtype)
    state = (jnp.asarray(0, jnp.int32), x, r, r_norm, active, status, n_mv, n_cyc, V)
    _, x, r, r_norm, active, status, n_mv, n_cyc, _ = lax.while_loop(cycle_cond, cycle, state)
    return _result(b, st, x, r_norm, status, n_mv, n_cyc)


# ----------------------------------------------------------------------------------------------
# BiCGStab.


def bicgstab(matvec: MatVec, b: Array, *, x0: Array | None = None, tol: float | None = None,
             atol: float = 0.0, restart: int = 20, max_restarts: int = 50,
             precondition: MatVec | None = None,
             stagnation_tol: float = 1e-3, stagnation_patience: int = 3) -> KrylovResult:
    """Batched right-preconditioned BiCGStab with per-system masks and true-residual cycles.

    Called outside ``jax.jit`` it traces and compiles anew on every call (the module
    docstring); in a loop, call it inside your own ``jax.jit``.

    Solves ``A_i x_i = b_i`` for every system ``i`` of the batch at once (method.md section 5.3
    step 3: "BiCGSTAB is the valid fallback"; design.md decision 6) with van der Vorst's
    short recurrences on ``A M^{-1}``: per iteration two operator and two preconditioner
    applications, no Krylov basis (memory: eight vectors per system, whatever the iteration
    count)::

        rho = <r^, r>,  p = r + (rho/rho_old)(alpha/omega)(p - omega v),  v = A M^{-1} p,
        alpha = rho / <r^, v>,  s = r - alpha v,  t = A M^{-1} s,  omega = <t, s>/<t, t>,
        x += alpha M^{-1} p + omega M^{-1} s,  r = s - omega t.

    Each system stops at its own tolerance, checked on the recursive residual after each
    half step (``||s||``) and full step (``||r||``); a stopped system is frozen. A *cycle* is at
    most ``restart`` iterations; it ends when every system of the batch stopped, then the
    *true* residual ``b - A x`` is computed and decides (as in :func:`gmres`):

        system i converged  <=>  ||b_i - A_i x_i|| <= max(tol * ||b_i||, atol).

    A system that is not converged starts another cycle from its true residual with a fresh
    shadow residual ``r^ = r`` (this also restarts after the method's breakdowns
    ``<r^, r> = 0``, ``<r^, v> = 0`` or ``omega = 0``), from the cycle's last iterate even when
    its residual is larger than the cycle's start: BiCGStab's residual is not monotone, and on
    a convection-dominated system it can rise 30-fold over the first 20 iterations before it
    falls. The iterate returned is the one with the smallest true residual seen. Statuses as in
    :func:`gmres`, except that stagnation needs ``stagnation_patience`` cycles in a row that do
    not reduce that smallest residual by the factor ``(1 - stagnation_tol)``; a non-finite
    residual ends with ``Status.BREAKDOWN`` (the best finite iterate is kept), running out of
    cycles with ``Status.MAX_ITERATIONS``. A non-finite value from the operator or the
    preconditioner inside a cycle, or a cycle that cannot take a single step (``<r^, A M^{-1}
    r^> = 0`` from a fresh shadow residual, which every restart would repeat: a zero
    preconditioner, a skew-symmetric operator), ends with ``Status.BREAKDOWN`` too, and so does
    a system whose ``<t, t>`` (``t = A M^{-1} s``) overflows, or falls below the smallest normal
    number while ``<s, s>`` is above it by ``1 / eps^2`` (an ``A M^{-1}`` of norm below about
    eps, or above 1e154 / 1e19 in float64 / float32, as in :func:`gmres`: scale such an operator
    first). ``x0`` is handled as in :func:`gmres`. (Before 2026-12-07 one cycle without that decrease
    ended the solve, and a rise stopped it with the start's iterate: a system scipy's BiCGStab
    solves in 89 iterations was returned as ``x = 0``.)

    ``num_matvecs`` counts per system: one initial residual when ``x0`` is given, one or two
    per iteration (one when the half step already met the tolerance or ``<r^, v> = 0``), and
    one true residual per cycle. Preconditioner applications are not counted (one per
    operator application inside the iterations).

    Args:
      matvec: callable ``[B, *shape] -> [B, *shape]`` applying ``A_i`` to system ``i``.
      b: ``[B, *shape]`` right-hand sides, float32 or float64 (rank >= 2); sets the dtype.
      x0: optional ``[B, *shape]`` initial guesses (default 0), same dtype as ``b``.
      tol, atol: the tolerances, as in :func:`gmres` (``tol=None``: 1e-8 for float64, 1e-6
        for float32).
      restart: BiCGStab iterations per cycle (static Python int >= 1).
      max_restarts: maximum number of cycles >= 1 (may be traced).
      precondition: optional callable ``[B, *shape] -> [B, *shape]`` applying ``M^{-1}``
        (right preconditioning; it must be linear).
      stagnation_tol: minimum relative decrease of the smallest true residual that counts as
        progress (in [0, 1); 0: any decrease).
      stagnation_patience: cycles in a row without progress that end with
        ``Status.STAGNATION`` (static Python int >= 1).

    Returns:
      :class:`KrylovResult`; ``x`` has the shape and dtype of ``b``, the other fields ``[B]``.

    Raises:
      ValueError / TypeError naming the argument for bad shapes, dtypes, ranges, non-finite
      concrete values.
    """
    b, x0 = _as_array(b), _as_array(x0)
    tol = default_tol(tol, getattr(b, "dtype", np.float64))
    _check_solver_args(matvec, b, x0, tol, atol, restart, max_restarts, precondition,
                       stagnation_tol)
    _check_int("stagnation_patience", stagnation_patience, 1, static=True)
    dtype = b.dtype
    B = b.shape[0]
    m = int(restart)
    A_flat = _flat_operator(matvec, None, b.shape)
    M_flat = _flat_preconditioner(precondition, b.shape)
    st = _start(A_flat, b, x0, tol, atol, stagnation_tol)
    thresh, stag_factor = st.thresh, st.stag_factor
    x, r, r_norm, active, status, n_mv = st.x, st.r, st.r_norm, st.active, st.status, st.n_mv
    n_cyc = jnp.zeros((B,), jnp.int32)
    one = jnp.ones((B,), dtype)
    patience = int(stagnation_patience)
    ss_floor = float(jnp.finfo(dtype).smallest_normal) / float(jnp.finfo(dtype).eps) ** 2

    def safe(d):
        return jnp.where(d != 0, d, 1.0)

    def cycle(state):
        it, x, r, best_x, best_rn, idle, active, status, n_mv, n_cyc = state

        def inner_cond(s):
            return (s[0] < m) & jnp.any(s[-4])

        def inner_body(s):
            j, x, r, rhat, p, v, rho, alpha, omega, live, n_mv, moved, broke = s
            rho_new = _dot(rhat, r)
            ok_rho = rho_new != 0
            beta = (rho_new / safe(rho)) * (alpha / safe(omega))
            p_new = r + beta[:, None] * (p - omega[:, None] * v)
            phat = M_flat(p_new)
            v_new = A_flat(phat)
            sigma = _dot(rhat, v_new)
            ok_sig = ok_rho & (sigma != 0)
            alpha_new = rho_new / safe(sigma)
            s_ = r - alpha_new[:, None] * v_new
            ss = _dot(s_, s_)
            half = jnp.sqrt(ss) <= thresh  # (= _norm(s_))
            shat = M_flat(s_)
            t = A_flat(shat)
            tt = _dot(t, t)
            omega_new = jnp.where(half | (tt == 0), 0.0, _dot(t, s_) / safe(tt))
            # (where: a non-finite t after a half step that met the tolerance is not used)
            x_new = jnp.where(half[:, None], x + alpha_new[:, None] * phat,
                              x + alpha_new[:, None] * phat + omega_new[:, None] * shat)
            r_new = jnp.where(half[:, None], s_, s_ - omega_new[:, None] * t)
            rn = _norm(r_new)
            upd = live & ok_sig & jnp.isfinite(rn)
            moved = moved | upd
            # broke: a non-finite value (the operator's or the preconditioner's), or
            # <t, t> flushed to zero or overflowed (_unscaled; or t = 0) while <s, s> is far
            # from it: the operator shrinks s by more than eps or overflows, omega means nothing.
            # (A tiny s of a tolerance below eps is no sign of that: a review found such solves
            # flagged.) A system that broke and does not converge in this cycle: BREAKDOWN.
            broke = broke | (live & ok_rho & (~jnp.isfinite(rn) | (
                ok_sig & ~half & _unscaled(tt) & (ss >= ss_floor))))
            n_mv = n_mv + jnp.where(live & ok_rho,
                                    jnp.where(ok_sig & ~half, 2, 1), 0).astype(jnp.int32)
            keep = upd[:, None]
            x = jnp.where(keep, x_new, x)
            r = jnp.where(keep, r_new, r)
            p = jnp.where(keep, p_new, p)
            v = jnp.where(keep, v_new, v)
            rho = jnp.where(upd, rho_new, rho)
            alpha = jnp.where(upd, alpha_new, alpha)
            omega = jnp.where(upd, omega_new, omega)
            # stop: converged (estimate), any breakdown of the recurrences, or non-finite
            live = live & upd & (rn > thresh) & (omega_new != 0)
            return j + 1, x, r, rhat, p, v, rho, alpha, omega, live, n_mv, moved, broke

        zeros = jnp.zeros_like(r)
        no = jnp.zeros((B,), bool)
        s0 = (jnp.asarray(0, jnp.int32), x, r, r, zeros, zeros, one, one, one, active, n_mv, no, no)
        s = lax.while_loop(inner_cond, inner_body, s0)
        x_new, n_mv, moved, broke = s[1], s[-3], s[-2], s[-1]
        r_new = st.bf - A_flat(x_new)
        rn_new = _norm(r_new)
        n_mv = n_mv + active.astype(jnp.int32)
        finite = jnp.isfinite(rn_new)
        conv = finite & (rn_new <= thresh)
        # breakdown: a non-finite value from the operator or preconditioner (the step is
        # dropped; before it ended as STAGNATION after `patience` idle cycles, a review of
        # 2026-12-07), or a cycle that could not take one step (<r, A M^{-1} r> = 0 from a fresh
        # shadow residual: every restart repeats it; a zero preconditioner, say)
        brk = ~conv & (~finite | broke | ~moved)
        progress = finite & (rn_new <= stag_factor * best_rn) & (rn_new < best_rn)  # stagnation_tol=0: any decrease
        idle = jnp.where(active, jnp.where(progress, 0, idle + 1), idle)
        stag = ~conv & ~brk & (idle >= patience)
        go_on = active & finite  # the next cycle starts here, a rise included
        x = jnp.where(go_on[:, None], x_new, x)
        r = jnp.where(go_on[:, None], r_new, r)
        better = go_on & (rn_new < best_rn)
        best_x = jnp.where(better[:, None], x_new, best_x)
        best_rn = jnp.where(better, rn_new, best_rn)
        status = _stop(status, active, conv, brk, stag)
        n_cyc = n_cyc + active.astype(jnp.int32)
        active = active & ~conv & ~brk & ~stag
        return it + 1, x, r, best_x, best_rn, idle, active, status, n_mv, n_cyc

    def cycle_cond(state):
        return (state[0] < max_restarts) & jnp.any(state[6])

    state = (jnp.asarray(0, jnp.int32), x, r, x, r_norm, jnp.zeros((B,), jnp.int32), active, status, n_mv, n_cyc)
    _, _, _, best_x, best_rn, _, _, status, n_mv, n_cyc = lax.while_loop(cycle_cond, cycle, state)
    return _result(b, st, best_x, best_rn, status, n_mv, n_cyc)


# ----------------------------------------------------------------------------------------------
# Differentiable solve, chunked batches.


def linear_solve(matvec: MatVec, b: Array, *, transpose_matvec: MatVec | None = None,
                 symmetric: bool = False, transpose_precondition: MatVec | None = None,
                 return_result: bool = False, **gmres_kwargs):
    """Differentiable batched solve ``x = A^{-1} b`` via ``jax.lax.custom_linear_solve``.

    Forward: :func:`gmres` with ``gmres_kwargs``. Derivatives are implicit (never through the
    iterations): ``dx = A^{-1} (db - dA x)`` forward, ``A^{-T}`` solves backward, so gradients
    flow to ``b`` and to any array closed over in ``matvec`` (e.g. stencil coefficients).

    Args:
      matvec: callable ``[B, *shape] -> [B, *shape]``, linear in its argument.
      b: ``[B, *shape]`` right-hand sides, float32 or float64.
      transpose_matvec: optional callable applying ``A^T``; default: ``jax.linear_transpose``
        of ``matvec`` (automatic). Ignored when ``symmetric``.
      symmetric: declare ``A = A^T`` (the transpose solve is then the forward solve).
      transpose_precondition: ``M^{-1}`` for the transpose solves; default: the forward
        ``precondition`` (any nonsingular one is valid; it is good when ``A`` is nearly
        symmetric). The forward ``recycle`` and ``x0`` are not used for transpose solves.
      return_result: also return the forward :class:`KrylovResult` (its fields carry no
        gradient).
      **gmres_kwargs: ``x0, tol, atol, restart, max_restarts, precondition, recycle,
        stagnation_tol`` of :func:`gmres`.

    Returns:
      ``x [B, *shape]``, or ``(x, KrylovResult)`` with ``return_result=True``. Convergence is
      NOT checked here: inspect the result (``return_result=True``) or call :func:`gmres`.
    """
    b = _as_array(b)
    _check_field_batch("b", b)
    unknown = set(gmres_kwargs) - {"x0", "tol", "atol", "restart", "max_restarts",
                                   "precondition", "recycle", "stagnation_tol"}
    if unknown:
        raise ValueError(f"gmres_kwargs: unknown gmres argument(s) {sorted(unknown)}")
    if transpose_matvec is not None:
        _check_callable_shape("transpose_matvec", transpose_matvec, b.shape, b.dtype)
    t_kwargs = {k: v for k, v in gmres_kwargs.items() if k not in ("x0", "recycle")}
    if transpose_precondition is not None:
        t_kwargs["precondition"] = transpose_precondition

    def solve(mv, rhs):
        res = gmres(mv, rhs, **gmres_kwargs)
        return res.x, res

    def transpose_solve(vecmat, rhs):
        res = gmres(transpose_matvec if transpose_matvec is not None else vecmat, rhs,
                    **t_kwargs)
        return res.x, res

    x, res = lax.custom_linear_solve(
        matvec, b, solve, transpose_solve=None if symmetric else transpose_solve,
        symmetric=symmetric, has_aux=True)
    return (x, res) if return_result else x


def map_in_chunks(fn: Callable[..., Any], *args, chunk_size: int) -> Any:
    """Apply a batched function to cache-sized chunks of the batch, one after the other.

    ``fn(*chunk_args)`` must map arguments whose leaves all have a leading batch axis of the
    chunk's size to a pytree of arrays with that leading axis (e.g. a :class:`KrylovResult`).
    The batch ``B`` is padded up to a multiple of ``chunk_size`` by repeating its last system
    (so padding is always a valid problem) and the padding is dropped from the output. Uses
    ``lax.map``, so one chunk is traced and compiled once, and every chunk's GMRES stops as soon
    as *its* systems converge.

    Choosing ``chunk_size``: on CPU the solve is bound by re-reading the Krylov basis
    (``chunk * (restart+1) * N`` values); keep it in the per-core cache. On the project's 2-core
    CPU (float64, restart 10-20) chunks of 1-4 systems were fastest for 32x32 to 128x128 grids,
    2-3x faster than one batch of 192 (design.md "Performance facts"). On accelerators use large
    chunks (or none).

    Example::

        res = map_in_chunks(lambda op, b: gmres(op.matvec, b, tol=1e-8), op, b, chunk_size=16)

    Args:
      fn: callable on chunks.
      *args: pytrees whose leaves are arrays ``[B, ...]`` with the same ``B``.
      chunk_size: static Python int >= 1.
    """
    _check_int("chunk_size", chunk_size, 1, static=True)
    leaves = jax.tree_util.tree_leaves(args)
    if not leaves:
        raise ValueError("args: expected at least one array with a leading batch axis")
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"args: expected every leaf to have the same leading batch axis, got "
                         f"sizes {sorted(map(str, sizes))}")
    B = sizes.pop()
    cs = int(chunk_size)
    if B <= cs:
        return fn(*args)
    nc = -(-B // cs)
    pad = nc * cs - B

    def split(a):
        a = jnp.asarray(a)
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0)
        return a.reshape((nc, cs) + a.shape[1:])

    out = lax.map(lambda a: fn(*a), jax.tree_util.tree_map(split, args))
    return jax.tree_util.tree_map(lambda o: o.reshape((nc * cs,) + o.shape[2:])[:B], out)
