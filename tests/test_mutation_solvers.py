"""Tests found by hand-made mutation testing of krylov.py, cross_matrix.py, preconditioners.py.

Each pins behaviour that a plausible wrong edit of the solvers left unnoticed by the rest of
the suite. References are independent of the code under test: numpy least squares over an
explicit Krylov basis, scipy's BiCGStab, the assembled scipy matrices, closed-form matvec counts
from the documented contracts, and invariances (scaling by a power of two).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as spla

from krylovjax import krylov
from krylovjax.cross_matrix import SolverConfig, cross_matrix_solve, seed_basis, solve_fp
from krylovjax.fokker_planck import fp_operator
from krylovjax.krylov import Status
from krylovjax.preconditioners import block_line_preconditioner, diffusion_preconditioner, jacobi

from _linalg import dense_matvec, random_well_conditioned, take_system

def krylov_lstsq_basis(A, r0, m):
    """An orthonormal basis of K_m(A, r0) (numpy: explicit normalised powers, QR)."""
    K = np.empty((len(r0), m))
    v = r0 / np.linalg.norm(r0)
    for j in range(m):
        K[:, j] = v
        v = A @ v
        v = v / np.linalg.norm(v)
    return np.linalg.qr(K)[0]


def krylov_lstsq(A, r0, m):
    """argmin over u in K_m(A, r0) of ||r0 - A u|| (numpy least squares over the basis)."""
    Q = krylov_lstsq_basis(A, r0, m)
    y = np.linalg.lstsq(A @ Q, r0, rcond=None)[0]
    return Q @ y


def fp_systems(B, grid, seed, scheme="consistent"):
    """Small log-FP operators with random scores and right-hand sides (float64)."""
    rng = np.random.default_rng(seed)
    lag = 0.8 * rng.standard_normal((B, 2) + grid)
    op = fp_operator(4.0, 0.1, 1.0, lag, scheme=scheme)
    m_prev = 1.0 + 0.3 * rng.standard_normal((B,) + grid)
    return op, op.rhs(jnp.asarray(m_prev))


def spsolve_ops(op, b):
    b = np.asarray(b)
    return np.stack([spla.spsolve(op.to_scipy(i).tocsc(), b[i].ravel())
                     for i in range(b.shape[0])]).reshape(b.shape)


# ----------------------------------------------------------------------------------------------
# GMRES: one cycle is the minimal-residual iterate over the Krylov space.


@pytest.mark.parametrize("variant", ["plain", "x0", "preconditioned"])
def test_gmres_one_cycle_is_the_krylov_minimal_residual_iterate(variant):
    """One GMRES(m) cycle from x0 returns x0 + M^{-1} u with u = argmin ||r0 - A M^{-1} u|| over
    K_m(A M^{-1}, r0) (right preconditioning minimises the *unpreconditioned* residual), and
    costs m inner matvecs + 1 true residual (+ 1 initial residual when x0 is given)."""
    B, N, m = 3, 30, 6
    A = random_well_conditioned(1, B, N, scale=0.6)
    rng = np.random.default_rng(2)
    b = rng.standard_normal((B, N))
    # a start better than x = 0 (a worse one is replaced by 0: test_krylov)
    x0 = np.linalg.solve(A, b[..., None])[..., 0] + 0.1 * rng.standard_normal((B, N)) if variant == "x0" else None
    Minv = None
    if variant == "preconditioned":  # a nonsymmetric, non-diagonal right preconditioner
        Minv = np.linalg.inv(np.eye(N)[None] + 0.3 * rng.standard_normal((B, N, N)) / np.sqrt(N))
    res = krylov.gmres(dense_matvec(A), jnp.asarray(b), x0=None if x0 is None else jnp.asarray(x0),
                       tol=1e-15, restart=m, max_restarts=1,
                       precondition=None if Minv is None else dense_matvec(Minv))
    for i in range(B):
        AM = A[i] if Minv is None else A[i] @ Minv[i]
        start = np.zeros(N) if x0 is None else x0[i]
        r0 = b[i] - A[i] @ start
        u = krylov_lstsq(AM, r0, m)
        ref = start + (u if Minv is None else Minv[i] @ u)
        np.testing.assert_allclose(np.asarray(res.x[i]), ref, rtol=1e-9, atol=1e-11)
        true = np.linalg.norm(b[i] - A[i] @ np.asarray(res.x[i])) / np.linalg.norm(b[i])
        np.testing.assert_allclose(float(res.residual[i]), true, rtol=1e-9)
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 1)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), m + 1 + (x0 is not None))
    assert not np.any(np.asarray(res.converged))


# ----------------------------------------------------------------------------------------------
# BiCGStab: the iterates are van der Vorst's (scipy's implementation of the same method).


@pytest.mark.parametrize("preconditioned", [False, True])
def test_bicgstab_iterates_match_scipy(preconditioned):
    """Three right-preconditioned BiCGStab iterations (one cycle, nothing converged) give
    scipy.sparse.linalg.bicgstab's iterate after three iterations; 2 matvecs per iteration +
    1 true residual."""
    B, N, its = 2, 24, 3
    A = random_well_conditioned(3, B, N, scale=0.6)
    rng = np.random.default_rng(4)
    b = rng.standard_normal((B, N))
    Minv = (np.linalg.inv(np.eye(N)[None] + 0.3 * rng.standard_normal((B, N, N)) / np.sqrt(N))
            if preconditioned else None)
    res = krylov.bicgstab(dense_matvec(A), jnp.asarray(b), tol=1e-15, restart=its,
                          max_restarts=1,
                          precondition=None if Minv is None else dense_matvec(Minv))
    for i in range(B):
        M = None if Minv is None else spla.aslinearoperator(Minv[i])
        ref, _ = spla.bicgstab(A[i], b[i], x0=np.zeros(N), rtol=1e-15, atol=0.0, maxiter=its,
                               M=M)
        np.testing.assert_allclose(np.asarray(res.x[i]), ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 2 * its + 1)


def test_bicgstab_discards_a_cycle_that_increases_the_residual():
    """A = I + 10 J (J a rotation by 90 degrees on each pair of unknowns): alpha = 1 and one
    BiCGStab iteration multiplies the residual by about 9.95 (closed form). The solver must
    keep the previous iterate (x = 0) and report stagnation with the true residual of what it
    returns."""
    N = 8
    J = np.zeros((N, N))
    for p in range(0, N, 2):
        J[p, p + 1], J[p + 1, p] = -1.0, 1.0
    A = (np.eye(N) + 10.0 * J)[None]
    b = np.random.default_rng(7).standard_normal((1, N))
    # the closed-form growth of one iteration, so the test exercises what it claims
    r = b[0]
    s = r - (r @ r) / (r @ (A[0] @ r)) * (A[0] @ r)
    t = A[0] @ s
    assert np.linalg.norm(s - (t @ s) / (t @ t) * t) > 5 * np.linalg.norm(r)
    res = krylov.bicgstab(dense_matvec(A), jnp.asarray(b), tol=1e-10, restart=1,
                          max_restarts=3)
    assert int(res.status[0]) == Status.STAGNATION
    x = np.asarray(res.x[0])
    true = np.linalg.norm(b[0] - A[0] @ x) / np.linalg.norm(b[0])
    np.testing.assert_allclose(float(res.residual[0]), true, rtol=1e-12)
    assert true <= 1.0
    np.testing.assert_array_equal(x, 0.0)


# ----------------------------------------------------------------------------------------------
# Tolerances, scaling.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_tolerance_equal_to_eps_is_verifiable(dtype):
    """Only a tol *below* machine epsilon is switched off (docstring of verifiable_tol)."""
    eps = jnp.finfo(dtype).eps
    out = np.asarray(krylov.verifiable_tol(jnp.asarray([eps, eps * 0.999, 1e-3], dtype), dtype))
    np.testing.assert_array_equal(out, np.asarray([eps, 0.0, 1e-3], dtype))


def test_orthonormalise_rows_is_scale_invariant_and_keeps_ill_conditioned_rows_orthonormal():
    """Q of W equals Q of 2^-70 W (the drop test is relative to max ||W_i||), and classical
    Gram-Schmidt applied twice keeps rows of a W with condition number ~1e7 orthonormal to
    round-off (once would lose orthogonality like eps cond^2)."""
    rng = np.random.default_rng(11)
    B, k, N = 2, 5, 40
    base = rng.standard_normal((B, 1, N))
    W = base + np.geomspace(1.0, 1e-7, k)[None, :, None] * rng.standard_normal((B, k, N))
    Y = rng.standard_normal((B, k, 7))
    Q, _, good = krylov.orthonormalise_rows(jnp.asarray(W), jnp.asarray(Y), drop_tol=32 * 2.2e-16)
    assert np.all(np.asarray(good))
    for i in range(B):
        np.testing.assert_allclose(np.asarray(Q[i]) @ np.asarray(Q[i]).T, np.eye(k), atol=1e-12)
        # rows span what W's rows span (numpy's QR)
        Qn, _ = np.linalg.qr(W[i].T)
        np.testing.assert_allclose(np.abs(np.asarray(Q[i]) @ Qn), np.eye(k), atol=1e-6)
    small = 2.0 ** -70
    Qs, Ys, goods = krylov.orthonormalise_rows(jnp.asarray(W * small), jnp.asarray(Y),
                                               drop_tol=32 * 2.2e-16)
    np.testing.assert_array_equal(np.asarray(goods), np.asarray(good))
    np.testing.assert_allclose(np.asarray(Qs), np.asarray(Q), rtol=1e-12, atol=1e-12)


def test_arnoldi_stays_orthonormal_on_a_wide_spectrum():
    """Krylov vectors of diag(1 .. 1e8) align with the top eigenvectors within a few steps:
    CGS applied twice keeps V orthonormal and the Arnoldi relation holds (numpy)."""
    N, k = 60, 25
    d = np.geomspace(1.0, 1e8, N)
    v = np.random.default_rng(12).standard_normal((1, N))
    V, H = krylov.arnoldi(lambda x: jnp.asarray(d) * x, jnp.asarray(v), k)
    V, H = np.asarray(V[0]), np.asarray(H[0])
    live = np.abs(np.diag(H, -1)) > 0  # columns before a breakdown (none expected)
    assert np.all(live)
    np.testing.assert_allclose(V @ V.T, np.eye(k + 1), atol=1e-10)
    np.testing.assert_allclose(d[:, None] * V[:k].T, V.T @ H, atol=1e-6 * d.max())


def test_gcro_cycle_is_the_minimal_residual_over_the_augmented_space():
    """One GCRO cycle with a fixed recycled space (C = A U) minimises ||b - A x|| over
    x0 + span(U) + K_m((I - C^T C) A, (I - C^T C) r0) (numpy least squares over that basis):
    the update needs its correction - U^T B y, not only V y."""
    B, N, k, m = 2, 30, 3, 4
    A = random_well_conditioned(5, B, N, scale=0.6)
    rng = np.random.default_rng(6)
    b = rng.standard_normal((B, N))
    U = rng.standard_normal((B, k, N))
    space = krylov.make_recycle_space(dense_matvec(A), jnp.asarray(U))
    res = krylov.gmres(dense_matvec(A), jnp.asarray(b), tol=1e-15, restart=m, max_restarts=1,
                       recycle=space)
    for i in range(B):
        Q, _ = np.linalg.qr((A[i] @ U[i].T))         # orthonormal basis of span(A U)
        P = np.eye(N) - Q @ Q.T
        S = np.concatenate([U[i].T, krylov_lstsq_basis(P @ A[i], P @ b[i], m)], axis=1)
        ref = S @ np.linalg.lstsq(A[i] @ S, b[i], rcond=None)[0]
        np.testing.assert_allclose(np.asarray(res.x[i]), ref, rtol=1e-8, atol=1e-10)


def test_recycle_pair_of_different_sizes_is_refused_by_name():
    """A recycled pair (U, C) whose shapes differ is refused before any tracing, naming it."""
    mv = lambda x: 2.0 * x  # noqa: E731
    b = jnp.ones((2, 4, 4))
    U, C = jnp.ones((2, 3, 16)), jnp.ones((2, 2, 16))
    with pytest.raises(ValueError, match="recycle: U and C must have the same shape"):
        krylov.gmres(mv, b, recycle=(U, C))
    with pytest.raises(ValueError, match="recycle: U and C must have the same shape"):
        krylov.gmres(mv, b, recycle=(U[0], C[0]))


# ----------------------------------------------------------------------------------------------
# Cross-matrix projection: the warm start, the seed basis, the counts.


def test_seed_basis_from_a_warm_start_with_a_preconditioner():
    """With seed_x0 the basis starts from the seed's residual b - A x0 (scipy), the extra matvec
    is counted, and Z = M^{-1} V_k satisfies A Z^T = V^T H (the preconditioned Arnoldi
    relation, with A assembled by scipy)."""
    op, b = fp_systems(1, (8, 8), 20)
    x0 = 0.5 * np.asarray(b)
    k = 5
    basis = jax.jit(lambda o, bb, xx: seed_basis(o.matvec, bb[0], k, seed_x0=xx[0],
                                                 precondition=diffusion_preconditioner(o)))(
        op, b, jnp.asarray(x0))
    A = op.to_scipy(0)
    r0 = np.asarray(b[0]).ravel() - A @ x0[0].ravel()
    V, H, Z = np.asarray(basis.V), np.asarray(basis.H), np.asarray(basis.Z)
    np.testing.assert_allclose(V[0], r0 / np.linalg.norm(r0), atol=1e-13)
    np.testing.assert_allclose(V @ V.T, np.eye(k + 1), atol=1e-12)
    np.testing.assert_allclose((A @ Z.T), V.T @ H, atol=1e-11)
    assert int(basis.num_matvecs) == k + 1


@pytest.mark.parametrize("projection", ["minres", "seed_hessenberg"])
def test_cross_matrix_exact_warm_start_costs_the_documented_matvecs(projection):
    """From the exact solution (spsolve) the projection moves nothing and the refinement stops
    at its initial check: 1 (x0's residual) + k (minres only) + 1 (the check) matvecs, no
    cycle. A wrong sign in the warm start's residual would move x away and need cycles."""
    op, b = fp_systems(3, (8, 8), 21)
    xs = spsolve_ops(op, b)
    k = 4
    seed = take_system(op, 0)

    @jax.jit
    def run(op, b, x0):
        basis = seed_basis(seed.matvec, b[0], k)
        return cross_matrix_solve(op.matvec, b, basis, x0=x0, projection=projection, tol=1e-10)

    res = run(op, b, jnp.asarray(xs))
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 0)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs),
                                  1 + (k if projection == "minres" else 0) + 1)
    np.testing.assert_allclose(np.asarray(res.x), xs, rtol=1e-10, atol=1e-12)


def test_seed_hessenberg_projection_alone_solves_the_seed_system():
    """For the seed itself the seed-Hessenberg warm start is GMRES(k) on it (the Arnoldi
    relation is exact): with k = N it is the solution, and no cycle is needed."""
    op, b = fp_systems(1, (5, 5), 22)
    res = jax.jit(lambda o, bb: cross_matrix_solve(
        o.matvec, bb, seed_basis(o.matvec, bb[0], 25), projection="seed_hessenberg",
        tol=1e-9))(op, b)
    assert bool(res.converged[0]) and int(res.num_restarts[0]) == 0
    np.testing.assert_allclose(np.asarray(res.x), spsolve_ops(op, b), rtol=1e-8, atol=1e-10)


def test_solve_fp_counts_the_seed_basis_on_the_seed_system():
    """solve_fp adds the seed's k basis matvecs (+ 1 for its warm start's residual) to the
    system at seed_index only; from exact warm starts each system otherwise costs 1 + k + 1
    (minres)."""
    op, b = fp_systems(3, (8, 8), 23)
    xs = jnp.asarray(spsolve_ops(op, b))
    k = 3
    cfg = SolverConfig(method="cross_matrix", precondition=None, projection="minres",
                       basis_size=k, seed_index=1, tol=1e-10)
    res = solve_fp(op, b, cfg, x0=xs)
    target = 1 + k + 1
    np.testing.assert_array_equal(np.asarray(res.num_matvecs),
                                  [target, target + k + 1, target])
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 0)


def test_red_black_exact_warm_start_count_and_power_of_two_scaling():
    """The red-black path: from the exact solution BiCGStab stops at its initial check, so the
    count is 1 + 2 (right-hand side and recovery, final true residual). In float32 a right-hand
    side scaled by 2^70 (its squared norm, about 1e42, overflows) gives the same residuals and
    statuses and the solution scaled by 2^70 exactly."""
    op, b = fp_systems(2, (8, 8), 24)
    xs = jnp.asarray(spsolve_ops(op, b))
    fast = SolverConfig(method="gmres", precondition="red_black", krylov="bicgstab", tol=1e-10)
    res = solve_fp(op, b, fast, x0=xs)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 3)
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 0)
    assert np.all(np.asarray(res.converged))

    op32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), op)
    b32 = b.astype(jnp.float32)
    cfg = dataclasses.replace(fast, tol=1e-5)
    base = solve_fp(op32, b32, cfg)
    assert np.all(np.asarray(base.converged))
    assert float(jnp.max(jnp.sum(b32.astype(jnp.float64) ** 2 * 2.0 ** 140, axis=(1, 2)))) > 3.4e38
    big = solve_fp(op32, b32 * jnp.float32(2.0 ** 70), cfg)
    np.testing.assert_array_equal(np.asarray(big.status), np.asarray(base.status))
    np.testing.assert_allclose(np.asarray(big.residual), np.asarray(base.residual), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(big.x), np.asarray(base.x) * np.float32(2.0 ** 70))


@pytest.mark.parametrize("power", [100, -100])
def test_red_black_residual_of_a_right_hand_side_scaled_by_a_power_of_two(power):
    """What the plain Krylov solvers guarantee (test_krylov.py, overflows_or_underflows): a
    right-hand side scaled by 2^power gives the same statuses and residuals. In float32 the
    red-black path's residual entries (about tol 2^100 |b|) squared to inf (a solved system
    reported STAGNATION with residual inf); at 2^-100 to 0 (fixed: the norm is scaled)."""
    op, b = fp_systems(2, (8, 8), 24)
    op32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), op)
    b32 = b.astype(jnp.float32)
    cfg = SolverConfig(method="gmres", precondition="red_black", krylov="bicgstab", tol=1e-5)
    base = solve_fp(op32, b32, cfg)
    scaled = solve_fp(op32, b32 * jnp.float32(2.0 ** power), cfg)
    np.testing.assert_array_equal(np.asarray(scaled.x),
                                  np.asarray(base.x) * np.float32(2.0 ** power))  # x is right
    np.testing.assert_array_equal(np.asarray(scaled.status), np.asarray(base.status))
    np.testing.assert_allclose(np.asarray(scaled.residual), np.asarray(base.residual), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Preconditioners.


def test_block_line_preconditioner_is_invariant_under_scaling_the_operator():
    """M(c A) = c M(A) for the banded approximate block factorisation: its set-up's stopping
    test is relative, so scaling the operator by 2^30 changes M^{-1} by exactly that factor
    (up to rounding)."""
    op, _ = fp_systems(2, (8, 8), 25)
    c = 2.0 ** 30
    scaled = dataclasses.replace(op, centre=op.centre * c, east=op.east * c, west=op.west * c,
                                 south=op.south * c, north=op.north * c)
    r = jnp.asarray(np.random.default_rng(26).standard_normal((2, 8, 8)))
    z = block_line_preconditioner(op, bandwidth=2)(r)
    zs = block_line_preconditioner(scaled, bandwidth=2)(r)
    np.testing.assert_allclose(np.asarray(zs) * c, np.asarray(z), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("boundary", ["zero", "reflect"])
def test_jacobi_divides_by_the_assembled_diagonal(boundary):
    """Jacobi is x / diag(A) of the assembled matrix; with reflecting ghosts the diagonal holds
    the folded ghost couplings too, so it is not the stencil's centre coefficient."""
    op = fp_operator(4.0, 0.1, 1.0, 0.8 * np.random.default_rng(27).standard_normal((2, 2, 6, 7)),
                     boundary=boundary)
    x = np.random.default_rng(28).standard_normal((2, 6, 7))
    out = np.asarray(jacobi(op)(jnp.asarray(x)))
    for i in range(2):
        d = op.to_scipy(i).diagonal()
        np.testing.assert_allclose(out[i].ravel(), x[i].ravel() / d, rtol=1e-13)


# ----------------------------------------------------------------------------------------------
# Second audit: the mutants the first one did not run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [krylov.gmres, krylov.bicgstab])
def test_non_finite_initial_residual_is_a_breakdown_before_any_cycle(solver):
    """A warm start whose residual b - A x0 overflows (A = 2 I, x0 = 1.5e308: A x0 = inf) is
    replaced by 0 (since 2026-12-07; it was a breakdown with x0 returned) and solved, its
    residual matvec counted. A residual that is non-finite from b itself (a NaN b under jit,
    where concrete values cannot be checked) is a breakdown from the start (_start's contract):
    no cycle, no matvec; the other system of the batch is solved as usual."""
    scale = 2.0
    b = jnp.ones((2, 4))
    x0 = jnp.array([[1.5e308] * 4, [0.0] * 4])
    res = solver(lambda x: scale * x, b, x0=x0, tol=1e-10, restart=4, max_restarts=3)
    np.testing.assert_array_equal(np.asarray(res.converged), True)
    np.testing.assert_allclose(np.asarray(res.x), 1.0 / scale, rtol=1e-12)
    cold = solver(lambda x: scale * x, b, tol=1e-10, restart=4, max_restarts=3)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs[0]), np.asarray(cold.num_matvecs[0]) + 1)
    b = b.at[0, 1].set(jnp.nan)
    res = jax.jit(lambda b: solver(lambda x: scale * x, b, tol=1e-10, restart=4, max_restarts=3))(b)
    assert int(res.status[0]) == Status.BREAKDOWN and not bool(res.converged[0])
    assert int(res.num_restarts[0]) == 0 and int(res.num_matvecs[0]) == 0
    assert bool(res.converged[1])
    np.testing.assert_allclose(np.asarray(res.x[1]), 1.0 / scale, rtol=1e-12)


@pytest.mark.parametrize("dtype, scale", [(jnp.float64, 1e-160), (jnp.float32, 1e-25)])
def test_gmres_solves_a_tiny_operator(dtype, scale):
    """A = scale I with scale^2 below the smallest normal: the Givens rotation's norm is a
    hypot, so the squares' underflow no longer ends the solve in BREAKDOWN with x = 0."""
    b = jnp.asarray(np.random.default_rng(29).standard_normal((2, 6)), dtype)
    s = jnp.asarray(scale, dtype)
    res = krylov.gmres(lambda x: s * x, b, tol=1e-5, restart=4)
    assert np.all(np.asarray(res.converged))
    np.testing.assert_allclose(np.asarray(res.x) * scale, np.asarray(b), rtol=1e-5)
