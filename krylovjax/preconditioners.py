"""Preconditioners for the log-FP systems.

The part every image shares at a time step is the diffusion operator
``P = I - dt*(g2/2)*Lap_h = I + k L`` with ``k = dt*g2/(2 h^2)`` and ``L`` the unscaled 5-point
negative Laplacian with the operator's boundary rule (design.md decision 7). ``P`` is separable:
``L = L_y (+) L_x`` with 1-D second-difference matrices whose eigenvectors are the discrete sine
transform (DST-I: zero / Dirichlet ghosts) or the cosine transform (DCT-II: half-sample reflect).
So ``P^{-1} x = Q_y [ (Q_y^T x Q_x) / (1 + k (lam_y + lam_x)) ] Q_x^T`` exactly.

We apply the transforms as dense matrix products with the orthogonal transform matrices: on
GPUs and TPUs batched matmuls run on the matrix units (not compared with an FFT there), and on
the CPU they beat an FFT-based DST-I (odd extension, ``jnp.fft.rfft``) 2.6-4x at 32, 64 and 128
pixels (``experiments/study_dst_fft.py``, BUILD_NOTES.md Preconditioners; the same results to 2e-14).
All products use ``precision=HIGHEST``.

The fastest exact tool on CPU is not a preconditioner but a reduction: :func:`red_black_reduction`
eliminates the red pixels of the checkerboard exactly (Schur complement, i.e. red-black
Gauss-Seidel applied exactly), halving the unknowns and about halving the Krylov iterations at
the cost of one full-grid matvec per reduced application (:class:`RedBlackSystem`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax import _checks, krylov
from krylovjax.fokker_planck import FPOperator, _shift

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=64)
def _eigenbasis(n: int, boundary: str):
    """Orthogonal eigenvectors (columns) and eigenvalues of the 1-D negative Laplacian."""
    i = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    if boundary in ("zero", "dirichlet"):  # DST-I
        q = np.sqrt(2.0 / (n + 1)) * np.sin(np.pi * (i + 1) * (k + 1) / (n + 1))
        lam = 2.0 - 2.0 * np.cos(np.pi * (np.arange(n) + 1) / (n + 1))
    elif boundary == "reflect":  # DCT-II (half-sample symmetric ghosts)
        q = np.sqrt(2.0 / n) * np.cos(np.pi * k * (i + 0.5) / n)
        q[:, 0] = np.sqrt(1.0 / n)
        lam = 2.0 - 2.0 * np.cos(np.pi * np.arange(n) / n)
    else:
        raise ValueError(f"boundary: expected 'zero', 'dirichlet' or 'reflect', got {boundary!r}")
    return q, lam


def shared_diffusion_inverse(k, grid_shape, boundary="zero", dtype=None):
    """``x -> (I + k L)^{-1} x`` for fields ``[*batch, H, W]``; ``k`` scalar or ``[*batch]``.

    This is the exact inverse of the operator all images share at a time step (the FP operator
    with zero score and zero drift, consistent or fitted scheme).
    """
    H, W = (int(s) for s in grid_shape)
    qy, ly = _eigenbasis(H, boundary)
    qx, lx = _eigenbasis(W, boundary)
    k = jnp.asarray(k)
    dtype = dtype or (k.dtype if jnp.issubdtype(k.dtype, jnp.floating) else jnp.result_type(float))
    qy, qx = jnp.asarray(qy, dtype), jnp.asarray(qx, dtype)
    lam = jnp.asarray(ly[:, None] + lx[None, :], dtype)
    kb = k.astype(dtype)[..., None, None]
    denom = 1.0 + kb * _checks.left_pad_rank(lam, kb.ndim)

    def apply(x):
        xt = jnp.einsum("ji,...jk,kl->...il", qy, x.astype(dtype), qx, precision=_HI)
        xt = _checks.left_pad_rank(xt, denom.ndim) / _checks.left_pad_rank(denom, xt.ndim)
        return jnp.einsum("ij,...jk,lk->...il", qy, xt, qx, precision=_HI).astype(x.dtype)

    return apply


def _checked(apply, op: FPOperator, name: str):
    """``apply`` refusing fields that are not on the operator's grid or whose batch the
    operator's does not broadcast to (a check on static shapes: free under jit)."""
    batch, grid = tuple(op.batch_shape), tuple(op.grid_shape)

    def checked(x):
        shape = tuple(jnp.shape(x))
        try:
            ok = shape[-2:] == grid and jnp.broadcast_shapes(shape[:-2], batch) == shape[:-2]
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{name}(op): expected fields of shape {batch + grid} (the operator's "
                             f"batch and grid), got {shape}")
        return apply(x)

    return checked


def diffusion_preconditioner(op: FPOperator):
    """The shared-diffusion preconditioner ``M^{-1} = (I + k L)^{-1}`` of an FP operator.

    ``k`` is the operator's ``diffusion`` field (per system), so this works for per-system
    ``g2``, ``dt`` and ``h``. ``I + k L`` is the operator with zero score and drift of the
    consistent and the fitted scheme alike (``sigma(0) = 1``). Paper B's literal scheme has no
    such symmetric part (use :func:`jacobi`).
    """
    if op.scheme == "paper_b":
        raise ValueError(
            f"op: the diffusion preconditioner needs scheme='consistent' or 'fitted', got "
            f"{op.scheme!r}; use jacobi(op) for Paper B's scheme")
    if op.diffusion is not None:
        k = op.diffusion[..., 0, 0]
    elif op.scheme == "consistent":
        k = (op.centre[..., 0, 0] - 1.0) / 4.0
        _check_recovered_diffusion(op, k)
    else:
        raise ValueError(
            f"op: a {op.scheme!r} operator without its diffusion number; build it with "
            "fp_operator")
    return _checked(shared_diffusion_inverse(k, op.grid_shape, op.boundary, op.dtype), op,
                    "diffusion_preconditioner")


def _check_recovered_diffusion(op: FPOperator, k) -> None:
    """Refuse a hand-built operator (no ``diffusion`` field) that is not the consistent scheme's
    ``I + k L`` plus a skew part: centre ``1 + 4k`` everywhere with ``k > 0`` and opposite
    couplings summing to ``-2k`` (checked on the pixels away from the border, where ghost rules
    may fold couplings into the centre). Without it, ``k`` read off the centre was used whatever
    it was: ``-0.125`` for a centre of 0.5 (a walkthrough: 1050 matvecs against 114 without the
    preconditioner, one system not converged). Traced values are not checked."""
    if not all(_checks.is_concrete(a) for a in (op.centre, op.east, op.west, op.south, op.north)):
        return
    kk = np.asarray(k, np.float64)[..., None, None]
    centre, east, west, south, north = (np.asarray(a, np.float64)[..., 1:-1, 1:-1] for a in
                                        (op.centre, op.east, op.west, op.south, op.north))
    # rounding of the coefficients in their dtype: east = -k + a rounds with |a| (a strong drift)
    eps = 64.0 * float(np.finfo(np.dtype(op.dtype)).eps)
    ok = (np.all(kk > 0) and np.all(np.abs(centre - (1.0 + 4.0 * kk)) <= eps * (1.0 + 4.0 * np.abs(kk)))
          and np.all(np.abs(east + west + 2.0 * kk) <= eps * (2.0 * np.abs(kk) + np.abs(east) + np.abs(west)))
          and np.all(np.abs(south + north + 2.0 * kk) <= eps * (2.0 * np.abs(kk) + np.abs(south) + np.abs(north))))
    if not ok:
        raise ValueError(
            "op: built without its diffusion number, and not of the consistent scheme's form that "
            "lets it be read off (centre 1 + 4k with k > 0 everywhere, east + west = south + north "
            f"= -2k; the corner's centre gives k = {np.ravel(kk)[:4].tolist()}): set FPOperator(diffusion=k) "
            "(shape [..., 1, 1]), build it with fp_operator, or use another preconditioner "
            "(jacobi, line_preconditioner)")


def jacobi(op: FPOperator):
    """Diagonal (Jacobi) preconditioner ``x -> x / diag(A)``."""
    d = op.diagonal()
    return _checked(lambda x: x / d, op, "jacobi")


# ----------------------------------------------------------------------------------------------
# Line (alternating-direction) factorisation.


def _in_grid_couplings(op: FPOperator) -> dict[str, Array]:
    """The stencil's couplings to nodes inside the grid (those to ghost nodes are zeroed: with
    zero/Dirichlet ghosts they are not in the matrix, with reflection ``diagonal()`` holds
    them), each ``[..., H, W]``."""
    h, w = op.grid_shape
    j = jnp.arange(w)
    i = jnp.arange(h)[:, None]
    inside = {"east": j < w - 1, "west": j > 0, "south": i < h - 1, "north": i > 0}
    return {d: jnp.where(inside[d], getattr(op, d), 0.0) for d in inside}


def _thomas_factor(lower: Array, diag: Array, upper: Array, axis: int):
    """The Thomas algorithm's factors of tridiagonal systems along ``axis`` (-1 or -2), as
    ``(lower, c, 1/denominator)``, each with ``axis`` moved to the front for ``lax.scan``.
    No pivoting: the line systems must be diagonally dominant (see :func:`line_preconditioner`)."""
    lower, diag, upper = (jnp.moveaxis(a, axis, 0) for a in (lower, diag, upper))

    def step(c_prev, xs):
        a, d, c = xs
        inv = 1.0 / (d - a * c_prev)
        return c * inv, (c * inv, inv)

    _, (c, inv) = jax.lax.scan(step, jnp.zeros_like(diag[0]), (lower, diag, upper))
    return lower, c, inv


def _thomas_solve(factors, rhs: Array, axis: int) -> Array:
    lower, c, inv = factors
    d = jnp.moveaxis(rhs, axis, 0)
    _, y = jax.lax.scan(lambda y_prev, xs: ((xs[1] - xs[0] * y_prev) * xs[2],) * 2,
                        jnp.zeros_like(d[0]), (lower, d, inv))
    _, x = jax.lax.scan(lambda x_next, xs: (xs[1] - xs[0] * x_next,) * 2,
                        jnp.zeros_like(d[0]), (c, y), reverse=True)
    return jnp.moveaxis(x, 0, axis)


def line_preconditioner(op: FPOperator, *, modified: bool = True,
                        fixed_point_iterations: int = 10):
    """Line factorisation ``M = (T + L_x) T^{-1} (T + L_y)`` of each system's own operator.

    With ``A = D + L_x + L_y`` (diagonal, couplings along W, couplings along H), ``M``
    differs from ``A`` by ``L_x T^{-1} L_y - (T - D)``: couplings between diagonal neighbours
    only, so ``M`` captures each image's advection along both axes, not only the diffusion all
    images share. ``modified=False`` takes ``T = D``; ``modified=True`` (default) solves
    ``T = D - rowsum(L_x T^{-1} L_y)`` by ``fixed_point_iterations`` sweeps, so that ``M`` has
    ``A``'s row sums (the idea of modified incomplete factorisations).

    ``M^{-1}`` is two sets of tridiagonal solves, lines along W and then along H, by the
    Thomas algorithm (factors computed here, once per operator; each solve two ``lax.scan``
    sweeps along the line, vectorised over all lines and systems), about the cost of
    :func:`diffusion_preconditioner` on the CPU. Measured on the solver benchmark's 32x32 and
    64x64 systems (scipy study, ``experiments/study_line_preconditioner.py``): GMRES needs 3
    iterations at the early step (diffusion preconditioner 5.2, none 6.8) and 8 late (11-12,
    22-23).

    The Thomas algorithm does not pivot: the line systems should be diagonally dominant. They
    were at all 19 steps of 16 built-in 32x32 images (VE sigma 5, N 20), by at least 1.06
    (fitted) and 0.71 (central) in ``T - |couplings|``, most of it backward Euler's identity
    term. A singular line shows as a non-finite preconditioner, which the Krylov solvers
    report as not converged (tested). Not for Paper B's scheme (its W couplings run along
    the flattened index).
    """
    if op.scheme == "paper_b":
        raise ValueError(
            f"op: the line preconditioner needs scheme='consistent' or 'fitted', got "
            f"{op.scheme!r}; use jacobi(op) for Paper B's scheme")
    if not (isinstance(fixed_point_iterations, int) and fixed_point_iterations >= 0):
        raise ValueError(f"fixed_point_iterations: expected an integer >= 0, got "
                         f"{fixed_point_iterations!r}")
    c = _in_grid_couplings(op)
    D = op.diagonal()
    T = D
    if modified:
        # rowsum(L_x T^{-1} L_y)_ij = sum over the W neighbours q of (L_x)_iq (L_y 1)_q / T_q.
        ly_ones = c["south"] + c["north"]
        pad = [(0, 0)] * (D.ndim - 1) + [(1, 1)]
        for _ in range(fixed_point_iterations):
            r = jnp.pad(ly_ones / T, pad)
            T = D - (c["east"] * r[..., 2:] + c["west"] * r[..., :-2])
    along_w = _thomas_factor(c["west"], T, c["east"], -1)
    along_h = _thomas_factor(c["north"], T, c["south"], -2)

    def apply(x):
        return _thomas_solve(along_h, T * _thomas_solve(along_w, x, -1), -2)

    return _checked(apply, op, "line_preconditioner")


# ----------------------------------------------------------------------------------------------
# Block (row-wise) incomplete factorisation with banded approximate inverses.
#
# Banded matrices along W are stored by diagonals: ``G[..., d, i] = G_{i, i + d - q}`` for
# ``d = 0..2q`` (``q`` the half-bandwidth); entries whose column falls outside the grid are zero.

# Default half-bandwidth of the approximate inverses: the narrowest with which the cross-matrix
# path needs one iteration at the early step (BUILD_NOTES, Preconditioners).
BLOCK_BANDWIDTH = 5


def _previous_row(x: Array, axis: int) -> Array:
    """``y[j] = x[j - 1]`` along the grid's H ``axis``, zero for ``j = 0``."""
    return _shift(x, axis, -1, 0.0)


def _band_matvec(G: Array, x: Array) -> Array:
    """``G x`` for a banded ``G [..., 2q+1, W]`` and ``x [..., W]`` (one padded copy of ``x``,
    then offset slices)."""
    q = (G.shape[-2] - 1) // 2
    n = x.shape[-1]
    xp = _pad_shift_source(x, q)
    return sum(G[..., d, :] * xp[..., d:d + n] for d in range(2 * q + 1))


def _band_matmul(A: Array, B: Array, q_out: int) -> Array:
    """``A B`` truncated to half-bandwidth ``q_out``, all banded along the last axis."""
    qa, qb = (A.shape[-2] - 1) // 2, (B.shape[-2] - 1) // 2
    n = A.shape[-1]
    # B_{i+a, i+s} = B[s - a + qb, i + a] = Bp[s - a + qb, i + a + qa]
    Bp = _pad_shift_source(B, qa)
    out = []
    for s in range(-q_out, q_out + 1):  # C_{i, i+s} = sum_a A_{i, i+a} B_{i+a, i+s}
        terms = [A[..., a + qa, :] * Bp[..., s - a + qb, qa + a:qa + a + n]
                 for a in range(-qa, qa + 1) if abs(s - a) <= qb]
        out.append(sum(terms) if terms else jnp.zeros_like(A[..., 0, :]))
    return jnp.stack(out, axis=-2)


def block_line_preconditioner(op: FPOperator, *, bandwidth: int = BLOCK_BANDWIDTH,
                              max_sweeps: int = 12, sweep_tol: float = 1e-5):
    """Block incomplete factorisation by grid rows with banded approximate inverses.

    Order the unknowns row by row (lines along W). ``A`` is block tridiagonal: ``B_j`` (row
    ``j``'s diagonal and its couplings along W, tridiagonal), ``N_j`` and ``S_j`` (its
    couplings to rows ``j-1`` and ``j+1``, diagonal). Exact block LU would be
    ``A = (T + L) T^{-1} (T + U)`` with ``T_j = B_j - N_j T_{j-1}^{-1} S_{j-1}`` (dense). Here
    ``T_j^{-1}`` is replaced by ``G_j``, its band of half-width ``bandwidth``, both in the
    recurrence (``T_j = B_j - N_j G_{j-1} S_{j-1}``) and in the application (Concus, Golub and
    Meurant's block preconditioners with banded approximate inverses). ``M^{-1} r`` is a
    forward sweep over the rows, ``z_j = G_j (r_j - N_j z_{j-1})``, and a backward one,
    ``x_j = z_j - G_j S_j x_{j+1}``: ``2 H`` sequential steps of banded products along W, no
    tridiagonal solves (not yet measured on an accelerator).

    The inverse of a diagonally dominant banded ``T_j`` decays geometrically away from the
    diagonal, so the error falls by about the coupling ratio per extra band. On the solver
    benchmark's systems (scipy study, ``experiments/study_line_preconditioner.py``) a
    half-width of 5 leaves about 1e-9 of the residual after one GMRES iteration at the early
    step: one iteration reaches 1e-8 even from the cross-matrix warm start.

    Set-up: fixed-point sweeps over all rows at once, each one Newton-Schulz step
    ``G <- 2G - band(G T G)`` per row with the recurrence's ``T`` from the previous sweep's
    ``G`` (the Newton-Schulz error squares each sweep; the rows' dependence falls by about
    the squared coupling ratio per sweep), until the largest relative change is below
    ``sweep_tol``, at most ``max_sweeps`` (3 sweeps at the benchmark's early step, 7 at the
    late one). Each sweep costs about ``2 (2q + 1)^2`` multiply-adds per pixel, all
    vectorised; each application about ``4 (q + 1)`` per pixel in ``2 H`` sequential steps.
    On the 2-core CPU this set-up dominates: the preconditioner needs the fewest matvecs but
    is not the fastest (docs/bench_solvers_cpu.md).

    Like :func:`line_preconditioner` it needs diagonally dominant rows (the Newton-Schulz
    iteration starts from the diagonal's inverse); without them the preconditioner turns
    non-finite and the Krylov solvers report no convergence. Not for Paper B's scheme.
    A ``bandwidth`` above ``W - 1`` is taken as ``W - 1`` (that band already holds the whole
    row block).
    """
    if op.scheme == "paper_b":
        raise ValueError(
            f"op: the block line preconditioner needs scheme='consistent' or 'fitted', got "
            f"{op.scheme!r}; use jacobi(op) for Paper B's scheme")
    if not (isinstance(bandwidth, int) and bandwidth >= 1):
        raise ValueError(f"bandwidth: expected an integer >= 1, got {bandwidth!r}")
    if not (isinstance(max_sweeps, int) and max_sweeps >= 1):
        raise ValueError(f"max_sweeps: expected an integer >= 1, got {max_sweeps!r}")
    if not (isinstance(sweep_tol, (int, float)) and 0 < sweep_tol < 1):
        raise ValueError(f"sweep_tol: expected a number in (0, 1), got {sweep_tol!r}")
    # A band of half-width W - 1 already holds every entry of a row block's inverse: a wider one
    # adds only zero diagonals (and unrolled compile time: q = 100 on an 8x8 grid ran for minutes).
    q = min(bandwidth, max(op.grid_shape[-1] - 1, 1))
    c = _in_grid_couplings(op)
    D = op.diagonal()
    zero = jnp.zeros_like(D)
    # B_j by diagonals [..., H, 2q+1, W]: T_{i,i-1} = west, T_{i,i} = D, T_{i,i+1} = east.
    B = jnp.stack([c["west"] if d == q - 1 else D if d == q else c["east"] if d == q + 1
                   else zero for d in range(2 * q + 1)], axis=-2)
    north = c["north"][..., None, :]                  # N_j, [..., H, 1, W]
    # (N G_{j-1} S_{j-1})_{i, i+s} = N_i G_{i,i+s} S_{i+s}: S_{j-1} shifted by s per diagonal.
    W = D.shape[-1]
    south_prev = _pad_shift_source(_previous_row(c["south"], -2), q)
    s_cols = jnp.stack([south_prev[..., q + s:q + s + W] for s in range(-q, q + 1)], axis=-2)
    G = jnp.stack([1.0 / D if d == q else zero for d in range(2 * q + 1)], axis=-2)
    # Sweeps until the largest change is below sweep_tol (relative), at most max_sweeps.
    tol = max(float(sweep_tol), 64 * float(jnp.finfo(D.dtype).eps))

    def sweep(carry):
        i, G, _ = carry
        T = B - north * _previous_row(G, -3) * s_cols
        new = 2.0 * G - _band_matmul(G, _band_matmul(T, G, 2 * q), q)
        change = jnp.max(jnp.abs(new - G)) / jnp.max(jnp.abs(new))
        return i + 1, new, change

    def more(carry):
        i, _, change = carry
        # not (change <= tol): a non-finite change stops too (reported by the solvers).
        return (i < max_sweeps) & (change > tol)

    _, G, _ = jax.lax.while_loop(more, sweep, (0, G, jnp.asarray(jnp.inf, D.dtype)))
    rows_first = jnp.moveaxis(G, -3, 0)               # [H, ..., 2q+1, W]
    n_rows = jnp.moveaxis(c["north"], -2, 0)          # [H, ..., W]
    s_rows = jnp.moveaxis(c["south"], -2, 0)

    def apply(r):
        r_rows = jnp.moveaxis(r, -2, 0)

        def forward(z_prev, xs):
            g, n, rj = xs
            z = _band_matvec(g, rj - n * z_prev)
            return z, z

        _, z = jax.lax.scan(forward, jnp.zeros_like(r_rows[0]), (rows_first, n_rows, r_rows))

        def backward(x_next, xs):
            g, s, zj = xs
            x = zj - _band_matvec(g, s * x_next)
            return x, x

        _, x = jax.lax.scan(backward, jnp.zeros_like(z[0]), (rows_first, s_rows, z),
                            reverse=True)
        return jnp.moveaxis(x, 0, -2)

    return _checked(apply, op, "block_line_preconditioner")


# ----------------------------------------------------------------------------------------------
# Red-black (Schur complement) reduction.


def _sumsq(x: Array) -> Array:
    """``sum(x**2)`` over the last axis as a ``dot_general`` (``precision=HIGHEST``); see
    ``krylov._dot`` for why not a reduction."""
    return jnp.einsum("...n,...n->...", x, x, precision=_HI)


def _pad_shift_source(x: Array, margin: int) -> Array:
    """``x [..., n]`` padded with ``margin`` zeros on both sides of the last axis, materialised.

    The optimisation barrier keeps XLA from fusing the padding into the consumer: otherwise a
    stencil whose input is itself a fused expression recomputes that expression once per
    neighbour (measured 5-8x slower on CPU). The consumer then reads plain offset slices.
    """
    pad = [(0, 0)] * (x.ndim - 1) + [(margin, margin)]
    return jax.lax.optimization_barrier(jnp.pad(x, pad))


def _apply5(coef, x: Array, row: int) -> Array:
    """``sum_k coef[k] * x[q + o_k]`` for offsets ``(0, +1, -1, +row, -row)`` on flat packed
    fields ``[..., n]``; reads outside ``[0, n)`` are zero (their coefficients are zero too)."""
    n = x.shape[-1]
    xp = _pad_shift_source(x, row)

    def at(o):
        return jax.lax.slice_in_dim(xp, row + o, row + o + n, axis=-1)

    same, plus, minus, south, north = coef
    return same * at(0) + plus * at(1) + minus * at(-1) + south * at(row) + north * at(-row)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RedBlackSystem:
    """The FP system with its red unknowns eliminated exactly (red-black Schur complement).

    Colour the pixels like a checkerboard: red ``(i + j)`` even, black ``(i + j)`` odd. The
    consistent (or fitted) 5-point scheme couples only pixels of different colours, so with the
    red unknowns first ``A = [[D_r, A_rb], [A_br, D_b]]`` with diagonal ``D_r`` and ``D_b``.
    Eliminating the red unknowns exactly gives the reduced system on the black pixels

        S x_b = f,   S = D_b - A_br D_r^{-1} A_rb,   f = b_b - A_br D_r^{-1} b_r,
        x_r = D_r^{-1} (b_r - A_rb x_b),

    with half the unknowns and a better spectrum (for these systems about half the Krylov
    iterations of ``A``; it is the red-black Gauss-Seidel preconditioner applied exactly). The
    residual of ``A`` after :meth:`recover` is exactly ``f - S x_b`` on the black pixels and
    zero on the red ones (up to rounding), so a tolerance on ``||f - S x_b||`` is the same
    tolerance on ``||b - A x||``.

    Packed layout: along each row the pixels are taken in pairs ``(2J, 2J+1)``; a row holds one
    pixel of each colour per pair, so one colour is a field ``[..., H, Wp/2]`` (``Wp = W``
    rounded up to even: an odd ``W`` gets one decoupled extra column, ``A = I`` there, solution
    0). :meth:`matvec` applies ``S`` with two packed 5-offset stencils (about the cost of one
    full-grid matvec).

    Build it with :func:`red_black_reduction`. Attributes (flat packed ``[..., H*Wp/2]``):
    ``d_black`` (``D_b``), ``a_br`` / ``a_rb`` (5 coefficient fields each, the second scaled by
    ``D_r^{-1}``), ``d_red`` (``D_r``), ``d_red_inv`` (``D_r^{-1}``); ``grid_shape`` (H, W) is
    static.
    """

    d_black: Array
    a_br: tuple
    a_rb: tuple
    d_red: Array
    d_red_inv: Array
    grid_shape: tuple = dataclasses.field(metadata=dict(static=True), default=(2, 2))

    @property
    def half_width(self) -> int:
        return (self.grid_shape[1] + 1) // 2

    @property
    def packed_shape(self) -> tuple[int, int]:
        """Shape ``(H, Wp/2)`` of one colour's packed field."""
        return (self.grid_shape[0], self.half_width)

    def _flat(self, x):
        return x.reshape(x.shape[:-2] + (-1,))

    def _unflat(self, x):
        return x.reshape(x.shape[:-1] + self.packed_shape)

    def _check(self, name, x, shape):
        if tuple(x.shape[-2:]) != tuple(shape):
            raise ValueError(f"{name}: expected a field [..., {shape[0]}, {shape[1]}], got "
                             f"shape {x.shape}")

    def matvec(self, x_black: Array) -> Array:
        """``S x_b`` for packed black fields ``[..., H, Wp/2]``."""
        self._check("x_black", x_black, self.packed_shape)
        x = self._flat(x_black)
        wh = self.half_width
        y = self.d_black * x - _apply5(self.a_br, _apply5(self.a_rb, x, wh), wh)
        return self._unflat(y)

    __call__ = matvec

    def split(self, x: Array) -> tuple[Array, Array]:
        """The packed (black, red) parts ``[..., H, Wp/2]`` of a full field ``[..., H, W]``."""
        self._check("x", x, self.grid_shape)
        return _pack(_pad_even(x, self.grid_shape), self.grid_shape)

    def rhs(self, b: Array) -> Array:
        """Reduced right-hand side ``f = b_b - A_br D_r^{-1} b_r`` ``[..., H, Wp/2]`` from
        ``b [..., H, W]``."""
        bb, br = (self._flat(a) for a in self.split(b))
        return self._unflat(bb - _apply5(self.a_br, br * self.d_red_inv, self.half_width))

    def restrict(self, x: Array) -> Array:
        """The black part ``x_b [..., H, Wp/2]`` of a full field ``x [..., H, W]``."""
        return self.split(x)[0]

    def recover(self, x_black: Array, b: Array, *, with_residual: bool = False):
        """The full solution ``[..., H, W]`` from the black part: red part
        ``x_r = D_r^{-1}(b_r - A_rb x_b)``.

        With ``with_residual=True`` also returns the true residual norm ``||b - A x||``
        ``[...]`` of the full system, evaluated with the packed coefficients (both colours'
        rows: ``b_b - A_br x_r - D_b x_b`` and ``b_r - D_r x_r - A_rb x_b``).
        """
        self._check("x_black", x_black, self.packed_shape)
        bb, br = (self._flat(a) for a in self.split(b))
        xb = self._flat(x_black)
        wh = self.half_width
        ax = _apply5(self.a_rb, xb, wh)          # D_r^{-1} A_rb x_b
        xr = br * self.d_red_inv - ax
        full = _unpack(x_black, self._unflat(xr))[..., :self.grid_shape[1]]
        if not with_residual:
            return full
        r_black = bb - self.d_black * xb - _apply5(self.a_br, xr, wh)
        r_red = br - self.d_red * (xr + ax)
        # The squares are summed after dividing by a power of two of max|b| per system (exact):
        # unscaled, they overflowed to inf for float32 fields near 1e19 (a converged solve
        # reported STAGNATION) and underflowed to 0 near 1e-24 (a wrong x reported converged).
        # Only a residual some 1e19 times ||b|| (float32) still overflows: a failed solve.
        lead = b.shape[:-2]
        s = krylov._pow2_scale(b.reshape(-1, math.prod(b.shape[-2:]))).reshape(lead)[..., None]
        return full, s[..., 0] * jnp.sqrt(_sumsq(r_black / s) + _sumsq(r_red / s))


def _pad_even(a: Array, grid_shape) -> Array:
    """Append one zero column when ``W`` is odd (the decoupled extra column)."""
    if grid_shape[1] % 2 == 0:
        return a
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, 1)])


def _even_rows(H: int, half_width: int) -> np.ndarray:
    """``[H * Wp/2]`` bool: packed position ``q`` lies in an even row."""
    return np.repeat(np.arange(H) % 2 == 0, half_width)


def _pack(a: Array, grid_shape) -> tuple[Array, Array]:
    """Split ``a [..., H, Wp]`` into packed (black, red) fields ``[..., H, Wp/2]``.

    In row ``i`` the pair ``(2J, 2J+1)`` holds red at ``2J + i%2`` and black at the other.
    Works on the pair layout ``[..., H*Wp/2, 2]``: XLA's CPU loops are much slower when a
    fusion mixes differently shaped views of one buffer."""
    H, wh = grid_shape[0], a.shape[-1] // 2
    p = a.reshape(a.shape[:-2] + (H * wh, 2))
    even = _even_rows(H, wh)
    black = jnp.where(even, p[..., 1], p[..., 0])
    red = jnp.where(even, p[..., 0], p[..., 1])
    return black.reshape(a.shape[:-1] + (wh,)), red.reshape(a.shape[:-1] + (wh,))


def _unpack(black: Array, red: Array) -> Array:
    """Inverse of :func:`_pack`: ``[..., H, Wp/2]`` twice -> ``[..., H, Wp]``."""
    shape = jnp.broadcast_shapes(black.shape, red.shape)
    black, red = jnp.broadcast_to(black, shape), jnp.broadcast_to(red, shape)
    H, wh = black.shape[-2:]
    lead = black.shape[:-2]
    first = np.repeat(np.arange(H) % 2 == 0, wh)[:, None] == (np.arange(2) == 0)[None, :]
    out = jnp.where(first, red.reshape(lead + (H * wh, 1)), black.reshape(lead + (H * wh, 1)))
    return out.reshape(lead + (H, 2 * wh))


def red_black_reduction(op: FPOperator) -> RedBlackSystem:
    """The exact red-black reduction of a batch of FP operators (see :class:`RedBlackSystem`).

    Works for every boundary rule of the consistent and fitted schemes (zero, dirichlet: the
    ghost values are in ``op.rhs``; reflect: the folded ghost coefficients are in the
    diagonal) and any ``H, W >= 2``, with any leading batch shape. The couplings are read off
    the operator's own coefficient fields: ``A = diag(op.diagonal()) +`` the
    east/west/south/north coefficients of the neighbours inside the grid, which is exactly
    ``op.to_scipy()``.

    Args:
      op: an :class:`FPOperator` with ``scheme="consistent"`` or ``"fitted"``.

    Returns:
      A :class:`RedBlackSystem`; use ``rhs(b)``, ``matvec`` (``S``) and ``recover(x_b, b)``.

    Raises:
      ValueError: for ``scheme="paper_b"``, whose flattened +-1 coupling joins pixels of the
        same colour across row ends (the stencil is not two-colourable).
    """
    if op.scheme == "paper_b":
        raise ValueError(
            f"op: the red-black reduction needs scheme='consistent' or 'fitted' (a "
            f"two-colourable stencil), got {op.scheme!r}")
    H, W = op.grid_shape
    dtype = op.dtype
    wh = (W + 1) // 2
    grid = (H, W)
    # Everything below works on the pair layout [..., H*Wp/2, 2] (a free reshape of the
    # fields): masks are constants of that shape, so XLA's fused loops need no index
    # arithmetic between differently shaped views (that made them 20x slower).
    q = np.arange(H * wh)
    i = (q // wh)[:, None]
    j = 2 * (q % wh)[:, None] + np.arange(2)[None, :]
    inside = {"east": j < W - 1, "west": (j > 0) & (j < W), "south": (i < H - 1) & (j < W),
              "north": (i > 0) & (j < W)}

    def pairs(a):
        a = _pad_even(jnp.asarray(a, dtype), grid)
        return a.reshape(a.shape[:-2] + (H * wh, 2))

    coef = {d: jnp.where(inside[d], pairs(getattr(op, d)), 0.0) for d in inside}
    diag = pairs(op.centre)
    if op.boundary == "reflect":  # the ghost is the node itself: its coupling folds in
        for d in inside:
            diag = diag + jnp.where(~inside[d] & (j < W), pairs(getattr(op, d)), 0.0)
    if W % 2:  # the decoupled extra column: A = I there
        diag = jnp.where(j < W, diag, 1.0)
    even = _even_rows(H, wh)

    def split(p):
        return jnp.where(even, p[..., 1], p[..., 0]), jnp.where(even, p[..., 0], p[..., 1])

    black, red = {}, {}
    for d, c in coef.items():
        black[d], red[d] = split(c)
    d_black, d_red = split(diag)
    d_red_inv = 1.0 / d_red
    zero = jnp.zeros((), dtype)
    # black pixel (i, J): its east/west red neighbours are packed at J+1 / J in even rows and
    # at J / J-1 in odd rows; south/north at the same J in rows i+-1.
    a_br = (jnp.where(even, black["west"], black["east"]),
            jnp.where(even, black["east"], zero),
            jnp.where(even, zero, black["west"]),
            black["south"], black["north"])
    # red pixel (i, J): east/west black neighbours at J / J-1 in even rows, J+1 / J in odd rows.
    rs = {d: red[d] * d_red_inv for d in red}
    a_rb = (jnp.where(even, rs["east"], rs["west"]),
            jnp.where(even, zero, rs["east"]),
            jnp.where(even, rs["west"], zero),
            rs["south"], rs["north"])
    # Materialised once: otherwise XLA fuses the packing (strided selects) into every stencil
    # that reads a coefficient and redoes it per use (measured 4x slower outside loops).
    d_black, a_br, a_rb, d_red, d_red_inv = jax.lax.optimization_barrier(
        (d_black, a_br, a_rb, d_red, d_red_inv))
    return RedBlackSystem(d_black=d_black, a_br=a_br, a_rb=a_rb, d_red=d_red,
                          d_red_inv=d_red_inv, grid_shape=grid)
