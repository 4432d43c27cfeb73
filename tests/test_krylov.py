"""Tests for krylovjax.krylov: batched Arnoldi (CGS2), restarted GMRES, recycling, linear_solve.

Every solver result is checked against an independent reference: scipy.sparse.linalg.spsolve on
the same 5-point operators assembled with scipy.sparse (written here, independently of the
library), numpy dense solves, closed-form Krylov facts (breakdown on invariant subspaces,
stagnation of GMRES on a cyclic shift), and central finite differences for gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from krylovjax import krylov
from krylovjax.krylov import Status

from _linalg import dense_matvec, random_well_conditioned

# ----------------------------------------------------------------------------------------------
# Test operators.


def stencil_coeffs(seed, B, H, W, *, k=1.0, adv=0.3, diag_extra=0.1):
    """Random nonsymmetric 5-point coefficients ``[5, B, H, W]`` (centre, E, W, S, N)."""
    rng = np.random.default_rng(seed)
    c = 1 + 4 * k + diag_extra * rng.random((B, H, W))
    nb = [-k + adv * rng.standard_normal((B, H, W)) for _ in range(4)]
    return np.stack([c] + nb)


def stencil_matvec(coef):
    """Matrix-free 5-point operator on ``[B, H, W]`` with zero values outside the grid."""
    coef = jnp.asarray(coef)

    def mv(x):
        c, e, w, s, n = coef
        zc = jnp.zeros_like(x[..., :, :1])
        zr = jnp.zeros_like(x[..., :1, :])
        xe = jnp.concatenate([x[..., :, 1:], zc], axis=-1)
        xw = jnp.concatenate([zc, x[..., :, :-1]], axis=-1)
        xs = jnp.concatenate([x[..., 1:, :], zr], axis=-2)
        xn = jnp.concatenate([zr, x[..., :-1, :]], axis=-2)
        return c * x + e * xe + w * xw + s * xs + n * xn

    return mv


def stencil_scipy(coef, i):
    """The same operator for system ``i`` as a scipy CSR matrix (row-major pixel order)."""
    c, e, w, s, n = (np.asarray(a[i], dtype=np.float64) for a in coef)
    H, W = c.shape
    idx = np.arange(H * W).reshape(H, W)
    rows = [idx.ravel(), idx[:, :-1].ravel(), idx[:, 1:].ravel(), idx[:-1].ravel(),
            idx[1:].ravel()]
    cols = [idx.ravel(), idx[:, 1:].ravel(), idx[:, :-1].ravel(), idx[1:].ravel(),
            idx[:-1].ravel()]
    vals = [c.ravel(), e[:, :-1].ravel(), w[:, 1:].ravel(), s[:-1].ravel(), n[1:].ravel()]
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(H * W, H * W))


@functools.partial(jax.jit, static_argnames=("restart",))
def solve_stencil(coef, b, x0=None, tol=1e-10, max_restarts=50, recycle=None, *, restart=8):
    """Jitted GMRES on stencil operators: coefficients, tol and budget are traced arguments,
    so tests with equal shapes share one compilation."""
    return krylov.gmres(stencil_matvec(coef), b, x0=x0, tol=tol, restart=restart,
                        max_restarts=max_restarts, recycle=recycle)


@jax.jit
def recycle_space_stencil(coef, U):
    return krylov.make_recycle_space(stencil_matvec(coef), U)


def spsolve_all(coef, b):
    B = b.shape[0]
    return np.stack([spla.spsolve(stencil_scipy(coef, i).tocsc(), np.asarray(b[i]).ravel())
                     for i in range(B)]).reshape(b.shape)


def true_rel_residual(coef, x, b):
    """float64 ||b - A x|| / ||b|| per system with the scipy matrices."""
    out = []
    for i in range(b.shape[0]):
        A = stencil_scipy(coef, i)
        bi = np.asarray(b[i], np.float64).ravel()
        out.append(np.linalg.norm(bi - A @ np.asarray(x[i], np.float64).ravel())
                   / np.linalg.norm(bi))
    return np.array(out)


def rel_err(x, ref):
    x = np.asarray(x, np.float64).reshape(len(ref), -1)
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)


# ----------------------------------------------------------------------------------------------
# GMRES against spsolve.


def test_gmres_matches_spsolve_float64():
    # 24 x 24 with restart 15: large enough for the prefix-projection (lax.switch) path
    assert 16 * 24 * 24 >= krylov._PREFIX_MIN_SIZE
    coef = stencil_coeffs(0, 4, 24, 24, k=2.0)
    b = np.random.default_rng(1).standard_normal((4, 24, 24))
    res = krylov.gmres(stencil_matvec(coef), jnp.asarray(b), tol=1e-12, restart=15)
    ref = spsolve_all(coef, b)
    assert res.x.dtype == jnp.float64 and res.x.shape == b.shape
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    assert np.all(np.asarray(res.converged))
    assert np.all(rel_err(res.x, ref) < 1e-10)
    # the reported residual is the true one
    np.testing.assert_allclose(np.asarray(res.residual), true_rel_residual(coef, res.x, b),
                               rtol=1e-3, atol=1e-16)
    assert np.all(np.asarray(res.residual) <= 1e-12)
    # honest matvec count: per cycle (inner steps + 1 true residual); x0 = 0 needs no initial
    # residual matvec (r0 = b)
    assert np.all(np.asarray(res.num_matvecs) >= 2 * np.asarray(res.num_restarts))
    assert np.all(np.asarray(res.num_matvecs) <= (15 + 1) * np.asarray(res.num_restarts))


def test_gmres_float32_reaches_1e5_and_reports_honestly():
    coef = stencil_coeffs(2, 3, 10, 9, k=2.0)
    b = np.random.default_rng(3).standard_normal((3, 10, 9))
    res = krylov.gmres(stencil_matvec(coef.astype(np.float32)), jnp.asarray(b, jnp.float32),
                       tol=1e-5, restart=10)
    assert res.x.dtype == jnp.float32 and res.residual.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    reported = np.asarray(res.residual, np.float64)
    true64 = true_rel_residual(coef.astype(np.float32), res.x, b.astype(np.float32))
    assert np.all(reported <= 1e-5)
    assert np.all(true64 <= 1.5e-5)
    np.testing.assert_allclose(reported, true64, atol=2e-6)
    assert np.all(rel_err(res.x, spsolve_all(coef.astype(np.float32), b)) < 1e-4)


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
@pytest.mark.parametrize("dtype, scales", [(np.float32, (1e19, 1e-24)), (np.float64, (1e155, 1e-160))])
def test_right_hand_sides_whose_squared_norm_overflows_or_underflows(solver, dtype, scales):
    """||b||^2 out of range used to give x = 0 reported as converged. The solvers work on b
    divided by a power of two, so the answer is the unscaled one times the scale, bit for bit."""
    A = random_well_conditioned(5, 2, 24).astype(dtype)
    b = np.random.default_rng(6).standard_normal((2, 24)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    solve = getattr(krylov, solver)
    base = solve(dense_matvec(A), jnp.asarray(b), tol=tol)
    ref = np.linalg.solve(A.astype(np.float64), b.astype(np.float64)[..., None])[..., 0]
    for scale in scales:
        k = int(np.round(np.log2(scale)))
        res = solve(dense_matvec(A), jnp.asarray(b * dtype(2.0) ** k), tol=tol)
        assert np.all(np.asarray(res.converged)) and np.all(np.asarray(res.x) != 0)
        np.testing.assert_array_equal(np.asarray(res.x), np.asarray(base.x) * dtype(2.0) ** k)
        np.testing.assert_array_equal(np.asarray(res.residual), np.asarray(base.residual))
        np.testing.assert_array_equal(np.asarray(res.num_matvecs), np.asarray(base.num_matvecs))
        assert np.all(rel_err(np.asarray(res.x, np.float64) / 2.0 ** k, ref) < 30 * tol)
    # atol is an absolute threshold: scaled with the system, the same stop
    res = solve(dense_matvec(A), jnp.asarray(b * dtype(2.0) ** 60), tol=1e-30 if dtype == np.float64 else 1e-12,
                atol=float(dtype(2.0) ** 60) * 1e-3)
    assert np.all(np.asarray(res.converged)) and np.all(np.asarray(res.residual) * np.linalg.norm(b, axis=1) <= 1e-3)
    # a huge start vector for the Arnoldi basis normalises like an ordinary one
    V, _ = krylov.arnoldi(dense_matvec(A), jnp.asarray(b * dtype(2.0) ** k), 4)
    V1, _ = krylov.arnoldi(dense_matvec(A), jnp.asarray(b), 4)
    np.testing.assert_array_equal(np.asarray(V), np.asarray(V1))


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
@pytest.mark.parametrize("dtype, exponents", [(np.float32, (-66, 66)), (np.float64, (-532, 532))])
def test_operators_of_tiny_or_huge_norm_say_breakdown_after_one_cycle(solver, dtype, exponents):
    """A review (2026-12-07): an operator of norm about 1e-160 (float64; 1e-20 in float32) made
    every Arnoldi step a breakdown (its squares flushed to zero), so GMRES(20) ran as GMRES(1)
    and ended in STAGNATION at residual 0.3 after 10 cycles, and BiCGStab's <t, t> = 0 ended
    each cycle after one step (MAX_ITERATIONS after 150 matvecs). Both now say BREAKDOWN after
    the first cycle, as for 1e160, with a finite x no worse than the start (rescaling inside
    the loops cost 2-11% of every solve). A norm of 1 converges (the same matrices)."""
    rng = np.random.default_rng(11)
    N = 60
    A = (np.diag(np.linspace(0.05, 10, N)) + 0.5 * np.triu(rng.standard_normal((N, N)), 1) / np.sqrt(N))
    A = np.stack([A, random_well_conditioned(12, 1, N)[0]]).astype(dtype)
    b = jnp.asarray(rng.standard_normal((2, N)).astype(dtype))
    tol = 1e-5 if dtype == np.float32 else 1e-9
    solve = functools.partial(getattr(krylov, solver), tol=tol, restart=20, max_restarts=50)
    assert np.all(np.asarray(solve(dense_matvec(A), b).converged))
    for k in exponents:
        res = solve(dense_matvec(A * dtype(2.0) ** k), b)
        np.testing.assert_array_equal(np.asarray(res.status), Status.BREAKDOWN)
        np.testing.assert_array_equal(np.asarray(res.num_restarts), 1)
        assert np.all(np.isfinite(np.asarray(res.x))) and np.all(np.asarray(res.residual) <= 1.0)


def test_bicgstab_small_residuals_of_a_tolerance_below_eps_are_no_breakdown():
    """A review: with a float32 tolerance below eps (never met: verifiable_tol) and an operator
    of norm 0.2, the recursive residual shrank until <t, t> fell below the smallest normal number,
    and the first version of the scale flag called that BREAKDOWN (residual 5e-8 against 2.7e-8).
    The flag now needs <s, s> far above it: MAX_ITERATIONS, as before, at the same residuals."""
    rng = np.random.default_rng(0)
    N, B = 40, 3
    A = (0.1 * (2 * np.eye(N)[None] + 0.3 * rng.standard_normal((B, N, N)) / np.sqrt(N))).astype(np.float32)
    b = jnp.asarray(rng.standard_normal((B, N)).astype(np.float32))
    for s, tol in ((1.0, 1e-7), (1e-4, 1e-9)):
        res = krylov.bicgstab(dense_matvec(A * np.float32(s)), b, tol=tol, restart=30, max_restarts=5)
        np.testing.assert_array_equal(np.asarray(res.status), Status.MAX_ITERATIONS)
        assert np.all(np.asarray(res.residual) < 1e-7)


@pytest.mark.parametrize("solver", [krylov.gmres, krylov.bicgstab])
def test_a_start_worse_than_zero_is_replaced_by_zero(solver):
    """A review (2026-12-07): GMRES cannot go below its start's residual within a cycle (and
    drops a cycle that raises it), so from a start far worse than x = 0 it returned residual 10
    where x = 0 reaches 7e-2; an x0 of 1e10 with b of 1e-300 overflowed in x0 / s and returned
    x = inf. Such a start is replaced by 0: the cold solve, one matvec more (the start's
    residual); a good start is kept."""
    A = random_well_conditioned(21, 3, 30, scale=0.6)
    rng = np.random.default_rng(22)
    b = jnp.asarray(rng.standard_normal((3, 30)))
    cold = solver(dense_matvec(A), b, tol=1e-10)
    xs = np.linalg.solve(A, np.asarray(b)[..., None])[..., 0]
    x0 = np.stack([1e3 * rng.standard_normal(30), xs[1] * (1 + 1e-3), -xs[2]])  # worse, good, worse
    res = solver(dense_matvec(A), b, x0=jnp.asarray(x0), tol=1e-10)
    for i in (0, 2):
        np.testing.assert_array_equal(np.asarray(res.x[i]), np.asarray(cold.x[i]))
        assert int(res.num_matvecs[i]) == int(cold.num_matvecs[i]) + 1
    assert int(res.num_matvecs[1]) < int(cold.num_matvecs[1])  # kept: fewer matvecs from it
    assert np.all(np.asarray(res.converged))
    # x0 / s overflows (b of 1e-300 scales by 2^-997): the answer, not x = inf
    res = solver(lambda x: 2.0 * x, jnp.asarray([[1e-300, 1e-300]]), x0=jnp.asarray([[1e10, 1e10]]), tol=1e-10)
    assert bool(res.converged[0])
    np.testing.assert_allclose(np.asarray(res.x), 5e-301, rtol=1e-12)


def test_batched_equals_one_by_one():
    coef = stencil_coeffs(4, 3, 8, 8, k=1.5, adv=0.5)
    b = np.random.default_rng(5).standard_normal((3, 8, 8))
    kw = dict(tol=1e-11, restart=3, max_restarts=100)
    res = krylov.gmres(stencil_matvec(coef), jnp.asarray(b), **kw)  # eager
    for i in range(3):
        alone = solve_stencil(coef[:, i:i + 1], jnp.asarray(b[i:i + 1]), **kw)  # jitted
        assert rel_err(res.x[i:i + 1], alone.x)[0] < 1e-12
        assert int(res.num_matvecs[i]) == int(alone.num_matvecs[0])
        assert int(res.num_restarts[i]) == int(alone.num_restarts[0])


# ----------------------------------------------------------------------------------------------
# Arnoldi.


@pytest.mark.parametrize("precondition,H,W,k", [(False, 7, 6, 9), (True, 7, 6, 9),
                                                (False, 24, 24, 20)])
def test_arnoldi_relation_and_orthonormality(precondition, H, W, k):
    B = 3
    coef = stencil_coeffs(6, B, H, W, k=1.0, adv=0.6)
    mv = stencil_matvec(coef)
    d = jnp.asarray(coef[0])
    pre = (lambda x: x / d) if precondition else None
    v = jnp.asarray(np.random.default_rng(7).standard_normal((B, H, W)))
    V, Hm = krylov.arnoldi(mv, v, k, precondition=pre)
    assert V.shape == (B, k + 1, H * W) and Hm.shape == (B, k + 1, k)
    # reference A M^{-1} V_k with scipy matrices
    for i in range(B):
        A = stencil_scipy(coef, i).toarray()
        if precondition:
            A = A / coef[0, i].ravel()[None, :]
        Vi, Hi = np.asarray(V[i]), np.asarray(Hm[i])
        np.testing.assert_allclose(A @ Vi[:k].T, Vi.T @ Hi, atol=1e-12)
        np.testing.assert_allclose(Vi @ Vi.T, np.eye(k + 1), atol=1e-12)
        np.testing.assert_allclose(Vi[0], np.asarray(v[i]).ravel()
                                   / np.linalg.norm(np.asarray(v[i])), atol=1e-15)
        assert np.all(np.tril(Hi, -2) == 0)  # upper Hessenberg


def test_arnoldi_breakdown_invariant_subspace():
    N, k = 12, 5
    rng = np.random.default_rng(8)
    v = jnp.asarray(rng.standard_normal((3, N)))
    two_values = np.where(np.arange(N) % 2 == 0, 2.0, 5.0)
    diag = jnp.asarray(np.stack([np.ones(N), two_values, np.zeros(N)]))
    V, Hm = krylov.arnoldi(lambda x: diag * x, v, k)
    V, Hm = np.asarray(V), np.asarray(Hm)
    assert np.all(np.isfinite(V)) and np.all(np.isfinite(Hm))
    # identity: one-dimensional invariant space
    assert np.abs(Hm[0, 0, 0] - 1.0) < 1e-14 and Hm[0, 1, 0] == 0.0
    assert np.all(V[0, 1:] == 0) and np.all(Hm[0, :, 1:] == 0)
    # two distinct eigenvalues: breakdown at step 1 (K_2 invariant)
    assert Hm[1, 1, 0] > 0.1 and Hm[1, 2, 1] == 0.0
    assert np.all(V[1, 2:] == 0) and np.all(Hm[1, :, 2:] == 0)
    A1 = np.diag(two_values)
    np.testing.assert_allclose(A1 @ V[1, :k].T, V[1].T @ Hm[1], atol=1e-13)
    np.testing.assert_allclose(V[1, :2] @ V[1, :2].T, np.eye(2), atol=1e-14)
    # zero operator: immediate breakdown, H = 0
    assert np.all(Hm[2] == 0) and np.all(V[2, 1:] == 0)
    # zero starting vector -> zeros, never NaN
    V0, H0 = krylov.arnoldi(lambda x: diag * x, jnp.zeros((3, N)), k)
    assert np.all(np.asarray(V0) == 0) and np.all(np.asarray(H0) == 0)


def test_gmres_lucky_breakdown_is_convergence():
    N = 12
    two_values = np.where(np.arange(N) % 2 == 0, 2.0, 5.0)
    b = np.random.default_rng(9).standard_normal((2, N))
    diag = jnp.asarray(np.stack([np.ones(N), two_values]))
    res = krylov.gmres(lambda x: diag * x, jnp.asarray(b), tol=1e-13, restart=8)
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    np.testing.assert_allclose(np.asarray(res.x), b / np.asarray(diag), rtol=1e-13)
    # (1 resp. 2 inner steps) + 1 true residual; x0 = 0 costs no initial residual
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), [2, 3])
    # a non-zero initial guess costs one more matvec for its residual
    res0 = krylov.gmres(lambda x: diag * x, jnp.asarray(b), x0=jnp.zeros((2, N)), tol=1e-13,
                        restart=8)
    np.testing.assert_array_equal(np.asarray(res0.num_matvecs), [3, 4])


# ----------------------------------------------------------------------------------------------
# Masks, freezing, failures.


def _easy_hard_batch():
    H = W = 8
    easy = stencil_coeffs(10, 1, H, W, k=0.2, adv=0.05)
    hard = stencil_coeffs(11, 1, H, W, k=3.0, adv=1.0)
    coef = np.concatenate([easy, hard], axis=1)
    b = np.random.default_rng(12).standard_normal((2, H, W))
    return coef, b


def test_converged_systems_are_frozen_bit_for_bit():
    coef, b = _easy_hard_batch()
    kw = dict(tol=1e-9, restart=3)
    full = solve_stencil(coef, jnp.asarray(b), max_restarts=200, **kw)
    n_easy = int(full.num_restarts[0])
    assert int(full.num_restarts[1]) > n_easy + 2  # the hard one keeps going for a while
    np.testing.assert_array_equal(np.asarray(full.status), Status.CONVERGED)
    # same batch stopped right when the easy one converged: its x is bit-identical
    early = solve_stencil(coef, jnp.asarray(b), max_restarts=n_easy, **kw)
    assert bool(early.converged[0]) and not bool(early.converged[1])
    np.testing.assert_array_equal(np.asarray(full.x[0]), np.asarray(early.x[0]))
    # and it equals the easy system solved alone
    alone = solve_stencil(coef[:, :1], jnp.asarray(b[:1]), max_restarts=200, **kw)
    assert rel_err(full.x[:1], alone.x)[0] < 1e-13
    assert int(alone.num_matvecs[0]) == int(full.num_matvecs[0])


def test_per_system_stop_inside_a_cycle_no_oversolve():
    coef, b = _easy_hard_batch()
    tol = 1e-6
    res = solve_stencil(coef, jnp.asarray(b), tol=tol, restart=60, max_restarts=5)
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    assert int(res.num_restarts[0]) == 1
    assert int(res.num_matvecs[0]) < int(res.num_matvecs[1])
    true = true_rel_residual(coef, res.x, b)
    # the easy system stopped at its own tolerance: not over-solved to round-off
    assert 1e-3 * tol < true[0] <= tol


def test_budget_exhausted_is_reported():
    coef = stencil_coeffs(13, 2, 8, 8, k=3.0, adv=0.8)
    b = np.random.default_rng(14).standard_normal((2, 8, 8))
    res = krylov.gmres(stencil_matvec(coef), jnp.asarray(b), tol=1e-10, restart=2,
                       max_restarts=2)
    assert not np.any(np.asarray(res.converged))
    assert set(np.asarray(res.status).tolist()) <= {Status.MAX_ITERATIONS, Status.STAGNATION}
    true = true_rel_residual(coef, res.x, b)
    np.testing.assert_allclose(np.asarray(res.residual), true, rtol=1e-10)
    assert np.all(true > 1e-3)
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 2)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 2 * (2 + 1))


def test_max_iterations_status():
    # SPD diagonal with spread spectrum: restarted GMRES decreases steadily but slowly
    N = 40
    d = np.linspace(1.0, 50.0, N)[None]
    b = np.ones((1, N))
    res = krylov.gmres(lambda x: jnp.asarray(d) * x, jnp.asarray(b), tol=1e-12, restart=2,
                       max_restarts=3)
    assert int(res.status[0]) == Status.MAX_ITERATIONS and not bool(res.converged[0])
    true = np.linalg.norm(b - d * np.asarray(res.x)) / np.linalg.norm(b)
    assert abs(float(res.residual[0]) - true) < 1e-12 and 1e-6 < true < 1.0


def test_stagnation_on_cyclic_shift():
    # GMRES on the cyclic shift with b = e_1 makes no progress before step N (closed form)
    N = 8
    P = np.roll(np.eye(N), 1, axis=0)[None]
    b = np.zeros((1, N))
    b[0, 0] = 1.0
    res = krylov.gmres(dense_matvec(P), jnp.asarray(b), tol=1e-8, restart=3, max_restarts=10)
    assert int(res.status[0]) == Status.STAGNATION and not bool(res.converged[0])
    assert int(res.num_restarts[0]) == 1
    np.testing.assert_allclose(float(res.residual[0]), 1.0, atol=1e-14)
    # with a full Krylov space it is solved exactly
    full = krylov.gmres(dense_matvec(P), jnp.asarray(b), tol=1e-10, restart=N)
    assert int(full.status[0]) == Status.CONVERGED
    np.testing.assert_allclose(np.asarray(full.x[0]), np.linalg.solve(P[0], b[0]), atol=1e-12)


def test_singular_breakdown_status():
    # A = diag(0, 1, 2, 3): Krylov space becomes invariant with a singular projected matrix
    d = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
    b = jnp.ones((1, 4))
    res = krylov.gmres(lambda x: d * x, b, tol=1e-10, restart=10)
    assert int(res.status[0]) == Status.BREAKDOWN and not bool(res.converged[0])
    assert np.all(np.isfinite(np.asarray(res.x)))
    # least-squares optimum leaves exactly the null component: residual 1/2
    np.testing.assert_allclose(float(res.residual[0]), 0.5, atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.x[0, 1:]), [1.0, 0.5, 1 / 3], atol=1e-12)
    # an operator producing non-finite values is reported, not propagated silently
    bad = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, jnp.inf, 3.0, 4.0]])
    res = krylov.gmres(lambda x: bad * x, jnp.ones((2, 4)), tol=1e-10, restart=4)
    np.testing.assert_array_equal(np.asarray(res.status), [Status.CONVERGED, Status.BREAKDOWN])
    assert np.all(np.isfinite(np.asarray(res.x)))


def test_zero_rhs_rows_and_x0():
    coef = stencil_coeffs(15, 3, 8, 8)
    b = np.random.default_rng(16).standard_normal((3, 8, 8))
    b[1] = 0.0
    x0 = np.random.default_rng(17).standard_normal((3, 8, 8))
    res = solve_stencil(coef, jnp.asarray(b), jnp.asarray(x0), tol=1e-12)
    assert np.all(np.isfinite(np.asarray(res.x)))
    assert np.all(np.asarray(res.x[1]) == 0) and float(res.residual[1]) == 0.0
    assert bool(res.converged[1]) and int(res.num_restarts[1]) == 0
    keep = np.array([0, 2])
    assert np.all(rel_err(res.x[keep], spsolve_all(coef[:, keep], b[keep])) < 1e-10)


def test_x0_exact_solution_needs_no_cycle():
    coef = stencil_coeffs(18, 3, 8, 8)
    b = np.random.default_rng(19).standard_normal((3, 8, 8))
    xs = spsolve_all(coef, b)
    res = solve_stencil(coef, jnp.asarray(b), jnp.asarray(xs), tol=1e-10)
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 0)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 1)
    np.testing.assert_array_equal(np.asarray(res.x), xs)


# ----------------------------------------------------------------------------------------------
# Preconditioning.


def test_exact_inverse_preconditioner_one_iteration():
    B, N = 3, 20
    A = random_well_conditioned(20, B, N)
    Ainv = np.linalg.inv(A)
    b = np.random.default_rng(21).standard_normal((B, N))
    res = krylov.gmres(dense_matvec(A), jnp.asarray(b), tol=1e-10,
                       precondition=dense_matvec(Ainv))
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 1)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 2)  # 1 step + check (x0 = 0)
    np.testing.assert_allclose(np.asarray(res.x), np.linalg.solve(A, b[..., None])[..., 0],
                               rtol=1e-10, atol=1e-12)


def test_jacobi_preconditioner_matches_spsolve():
    coef = stencil_coeffs(22, 3, 10, 8, k=2.0, diag_extra=4.0)
    b = np.random.default_rng(23).standard_normal((3, 10, 8))
    d = jnp.asarray(coef[0])
    res = krylov.gmres(stencil_matvec(coef), jnp.asarray(b), tol=1e-12, restart=10,
                       precondition=lambda x: x / d)
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    assert np.all(rel_err(res.x, spsolve_all(coef, b)) < 1e-10)


# ----------------------------------------------------------------------------------------------
# Recycling (GCRO augmentation).


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_orthonormalise_rows_matches_numpy_qr(dtype, atol):
    """CGS2 thin QR (no LAPACK: jaxlib's batched LAPACK kernels deadlocked XLA's CPU pool)
    against numpy's Householder QR, the R^{-T} Y companion and a dropped dependent row."""
    rng = np.random.default_rng(40)
    B, k, N = 2, 5, 40
    Y = rng.standard_normal((B, k, N))
    Y[1, 3] = Y[1, 0] + 2.0 * Y[1, 2]  # dependent row in system 1
    M = rng.standard_normal((N, N)) + 4.0 * np.eye(N)
    W = Y @ M.T  # W_i = M y_i row by row, as (A U) in make_recycle_space
    eps = float(np.finfo(dtype).eps)
    Q, Yp, good = (np.asarray(a, np.float64) for a in krylov.orthonormalise_rows(
        jnp.asarray(W, dtype), jnp.asarray(Y, dtype), drop_tol=32 * eps))
    np.testing.assert_array_equal(good, [[True] * 5, [True, True, True, False, True]])
    # system 0 against numpy: W^T = Qn Rn; Gram-Schmidt's R has a positive diagonal
    Qn, Rn = np.linalg.qr(W[0].T)
    S = np.sign(np.diag(Rn))
    np.testing.assert_allclose(Q[0], (Qn * S).T, atol=atol * 10)
    np.testing.assert_allclose(Yp[0], np.linalg.solve((S[:, None] * Rn).T, Y[0]),
                               rtol=atol * 100, atol=atol * 100)
    for i in range(B):
        np.testing.assert_allclose(Q[i] @ Q[i].T, np.diag(good[i].astype(float)), atol=atol)
        np.testing.assert_allclose(Yp[i] @ M.T, Q[i], atol=atol * 100)  # contract Q = M Y'
        np.testing.assert_allclose((W[i] @ Q[i].T) @ Q[i], W[i], atol=atol * 100 * np.abs(
            W).max())  # every row of W lies in the span of Q
    assert np.all(Q[1, 3] == 0) and np.all(Yp[1, 3] == 0)


def test_make_recycle_space_contract():
    B, k, H, W = 2, 4, 6, 5
    coef = stencil_coeffs(24, B, H, W)
    mv = stencil_matvec(coef)
    U = np.random.default_rng(25).standard_normal((B, k, H, W))
    U[1, 3] = 2.0 * U[1, 0] - U[1, 1]  # dependent direction in system 1
    rs = krylov.make_recycle_space(mv, jnp.asarray(U))
    Up, C = np.asarray(rs.U), np.asarray(rs.C)
    assert np.all(np.isfinite(Up)) and np.all(np.isfinite(C))
    np.testing.assert_array_equal(np.asarray(rs.num_matvecs), k)
    for i in range(B):
        A = stencil_scipy(coef, i)
        np.testing.assert_allclose((A @ Up[i].T).T, C[i], atol=1e-12)
        gram = C[i] @ C[i].T
        expect = np.eye(k) if i == 0 else np.diag([1.0, 1.0, 1.0, 0.0])
        np.testing.assert_allclose(gram, expect, atol=1e-12)
        # span(U') subset of span(U): least-squares residual of U' in U is zero
        Ui = U[i].reshape(k, -1)
        coeffs = np.linalg.lstsq(Ui.T, Up[i].T, rcond=None)[0]
        np.testing.assert_allclose(Ui.T @ coeffs, Up[i].T, atol=1e-10)


def test_recycle_fewer_matvecs_same_solution():
    B, H, W = 3, 10, 10
    coef = stencil_coeffs(26, B, H, W, k=2.0, adv=0.5)
    b = np.random.default_rng(27).standard_normal((B, H, W))
    xs = spsolve_all(coef, b)
    mv = stencil_matvec(coef)
    # recycled space: a perturbed solution plus a few random directions
    rng = np.random.default_rng(28)
    U = np.concatenate([(xs + 1e-4 * rng.standard_normal(xs.shape))[:, None],
                        rng.standard_normal((B, 3, H, W))], axis=1)
    rs = recycle_space_stencil(coef, jnp.asarray(U))
    kw = dict(tol=1e-11, restart=8)
    plain = solve_stencil(coef, jnp.asarray(b), **kw)
    rec = krylov.gmres(mv, jnp.asarray(b), recycle=rs, **kw)  # eager
    np.testing.assert_array_equal(np.asarray(rec.status), Status.CONVERGED)
    assert np.all(rel_err(rec.x, xs) < 1e-10)
    np.testing.assert_allclose(np.asarray(rec.residual), true_rel_residual(coef, rec.x, b),
                               rtol=1e-3)
    total = np.asarray(rec.num_matvecs) + np.asarray(rs.num_matvecs)
    assert np.all(total < np.asarray(plain.num_matvecs))


def test_recycle_random_space_and_shared_space():
    B, H, W, k = 2, 8, 7, 3
    coef = stencil_coeffs(29, 1, H, W, k=1.5, adv=0.4)
    coef_b = np.repeat(coef, B, axis=1)  # identical operators: a shared recycled space is valid
    b = np.random.default_rng(30).standard_normal((B, H, W))
    U1 = np.random.default_rng(31).standard_normal((1, k, H, W))
    rs = recycle_space_stencil(coef, jnp.asarray(U1))
    shared = (rs.U[0], rs.C[0])  # [k, N]
    res = solve_stencil(coef_b, jnp.asarray(b), tol=1e-12, restart=6, recycle=shared)
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    assert np.all(rel_err(res.x, spsolve_all(coef_b, b)) < 1e-10)
    # budget exhausted with recycling: residual still the true one
    short = solve_stencil(coef_b, jnp.asarray(b), tol=1e-12, restart=6, max_restarts=1,
                          recycle=shared)
    assert not np.any(np.asarray(short.converged))
    np.testing.assert_allclose(np.asarray(short.residual), true_rel_residual(coef_b, short.x, b),
                               rtol=1e-8)


# ----------------------------------------------------------------------------------------------
# linear_solve gradients.


def test_linear_solve_gradients_match_finite_differences():
    B, H, W = 2, 5, 6
    coef = stencil_coeffs(32, B, H, W, k=1.0, adv=0.5)
    D = np.random.default_rng(33).standard_normal((5, B, H, W)) * 0.1
    b = np.random.default_rng(34).standard_normal((B, H, W))
    wts = np.random.default_rng(35).standard_normal((B, H, W))

    def loss_fn(theta, bb, **kw):
        mv = stencil_matvec(jnp.asarray(coef) + theta * jnp.asarray(D))
        x = krylov.linear_solve(mv, bb, tol=1e-13, restart=30, **kw)
        return jnp.sum(jnp.asarray(wts) * x)

    loss = jax.jit(loss_fn)  # one compilation for all finite-difference evaluations
    theta, bj = 0.3, jnp.asarray(b)
    g_theta, g_b = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(theta, bj)
    eps = 1e-6
    fd = (loss(theta + eps, bj) - loss(theta - eps, bj)) / (2 * eps)
    assert abs(float(g_theta) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))
    # gradient w.r.t. b is A^{-T} w: check against scipy and a finite difference
    A_t = [stencil_scipy(coef + theta * D, i) for i in range(B)]
    ref = np.stack([spla.spsolve(A_t[i].T.tocsc(), wts[i].ravel()) for i in range(B)])
    np.testing.assert_allclose(np.asarray(g_b).reshape(B, -1), ref, rtol=1e-9, atol=1e-11)
    dirn = jnp.asarray(np.random.default_rng(36).standard_normal((B, H, W)))
    fd_b = (loss(theta, bj + eps * dirn) - loss(theta, bj - eps * dirn)) / (2 * eps)
    assert abs(float(jnp.sum(g_b * dirn)) - float(fd_b)) <= 1e-6 * max(1.0, abs(float(fd_b)))
    # forward mode agrees too
    _, jvp = jax.jit(lambda t: jax.jvp(lambda s: loss_fn(s, bj), (t,), (1.0,)))(theta)
    assert abs(float(jvp) - float(g_theta)) <= 1e-9 * max(1.0, abs(float(g_theta)))
    # explicit transpose_matvec gives the same gradient
    coefs = jnp.asarray(coef + theta * D)

    def transpose_mv(y):
        # A^T of the 5-point stencil: entries of A's east neighbour become west ones, etc.
        c, e, w, s, n = coefs
        zc, zr = jnp.zeros_like(y[..., :, :1]), jnp.zeros_like(y[..., :1, :])
        ey = jnp.concatenate([zc, (e * y)[..., :, :-1]], axis=-1)
        wy = jnp.concatenate([(w * y)[..., :, 1:], zc], axis=-1)
        sy = jnp.concatenate([zr, (s * y)[..., :-1, :]], axis=-2)
        ny = jnp.concatenate([(n * y)[..., 1:, :], zr], axis=-2)
        return c * y + ey + wy + sy + ny

    g_b2 = jax.jit(jax.grad(lambda bb: loss_fn(theta, bb, transpose_matvec=transpose_mv)))(bj)
    np.testing.assert_allclose(np.asarray(g_b2), np.asarray(g_b), rtol=1e-9, atol=1e-11)


def test_linear_solve_symmetric_and_result():
    B, N = 2, 10
    rng = np.random.default_rng(37)
    G = rng.standard_normal((B, N, N))
    A = np.einsum("bij,bkj->bik", G, G) / N + np.eye(N)  # SPD
    b = rng.standard_normal((B, N))
    wts = rng.standard_normal((B, N))

    def loss(bb):
        x, res = krylov.linear_solve(dense_matvec(A), bb, symmetric=True, return_result=True,
                                     tol=1e-13)
        return jnp.sum(jnp.asarray(wts) * x), res

    (val, res), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(b))
    assert np.all(np.asarray(res.converged))
    np.testing.assert_allclose(np.asarray(g), np.linalg.solve(A, wts[..., None])[..., 0],
                               rtol=1e-10)
    assert abs(float(val) - float(np.sum(wts * np.linalg.solve(A, b[..., None])[..., 0]))) \
        < 1e-10


# ----------------------------------------------------------------------------------------------
# jit, vmap, chunks.


def test_jit_and_vmap():
    B, H, W = 3, 6, 7
    coef = jnp.asarray(stencil_coeffs(38, B, H, W, k=1.5))
    b = jnp.asarray(np.random.default_rng(39).standard_normal((B, H, W)))
    ref = spsolve_all(np.asarray(coef), np.asarray(b))

    @jax.jit
    def solve(cf, bb, tol):
        return krylov.gmres(stencil_matvec(cf), bb, tol=tol, restart=8)

    res = solve(coef, b, 1e-12)
    assert np.all(np.asarray(res.converged))
    assert np.all(rel_err(res.x, ref) < 1e-10)
    eager = krylov.gmres(stencil_matvec(coef), b, tol=1e-12, restart=8)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), np.asarray(eager.num_matvecs))
    assert np.all(rel_err(res.x, eager.x) < 1e-13)
    # vmap from outside over batch-of-1 problems
    cf1 = coef[:, :, None]  # [5, B, 1, H, W]
    b1 = b[:, None]         # [B, 1, H, W]
    out = jax.jit(jax.vmap(lambda c, bb: krylov.gmres(stencil_matvec(c), bb, tol=1e-12,
                                                      restart=8), in_axes=(1, 0)))(cf1, b1)
    assert out.x.shape == (B, 1, H, W) and out.converged.shape == (B, 1)
    assert np.all(np.asarray(out.converged))
    assert np.all(rel_err(out.x[:, 0], ref) < 1e-10)
    np.testing.assert_array_equal(np.asarray(out.num_matvecs[:, 0]),
                                  np.asarray(eager.num_matvecs))


def test_map_in_chunks_equals_direct():
    B, H, W = 5, 6, 6
    coef = jnp.asarray(stencil_coeffs(40, B, H, W, k=1.5))
    b = jnp.asarray(np.random.default_rng(41).standard_normal((B, H, W)))

    def solve(cf, bb):
        return krylov.gmres(stencil_matvec(jnp.moveaxis(cf, 1, 0)), bb, tol=1e-12, restart=8)

    cfb = jnp.moveaxis(coef, 0, 1)  # [B, 5, H, W]: batch axis first for chunking
    chunked = jax.jit(lambda c, bb: krylov.map_in_chunks(solve, c, bb, chunk_size=2))(cfb, b)
    direct = solve(cfb, b)
    assert chunked.x.shape == (B, H, W)
    assert np.all(rel_err(chunked.x, direct.x) < 1e-13)
    np.testing.assert_array_equal(np.asarray(chunked.num_matvecs),
                                  np.asarray(direct.num_matvecs))
    with pytest.raises(ValueError, match="chunk_size"):
        krylov.map_in_chunks(solve, cfb, b, chunk_size=0)
    with pytest.raises(ValueError, match="args"):
        krylov.map_in_chunks(solve, cfb, b[:3], chunk_size=2)


# ----------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_naming_the_argument():
    mv = lambda x: 2.0 * x  # noqa: E731
    b = jnp.ones((2, 4, 4))
    with pytest.raises(ValueError, match="b"):
        krylov.gmres(mv, jnp.ones((16,)))
    with pytest.raises(TypeError, match="b"):
        krylov.gmres(mv, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="b"):
        krylov.gmres(mv, b.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="x0"):
        krylov.gmres(mv, b, x0=jnp.ones((2, 16)))
    with pytest.raises(TypeError, match="x0"):
        krylov.gmres(mv, b, x0=jnp.ones((2, 4, 4), jnp.float32))
    with pytest.raises(ValueError, match="x0"):
        krylov.gmres(mv, b, x0=jnp.full((2, 4, 4), jnp.inf))
    for bad_tol in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol"):
            krylov.gmres(mv, b, tol=bad_tol)
    with pytest.raises(ValueError, match="atol"):
        krylov.gmres(mv, b, atol=-1.0)
    with pytest.raises(ValueError, match="restart"):
        krylov.gmres(mv, b, restart=0)
    with pytest.raises(ValueError, match="max_restarts"):
        krylov.gmres(mv, b, max_restarts=0)
    with pytest.raises(ValueError, match="matvec"):
        krylov.gmres(lambda x: x[:, :2], b)
    with pytest.raises(ValueError, match="precondition"):
        krylov.gmres(mv, b, precondition=lambda x: x.reshape(2, 16))
    with pytest.raises(ValueError, match="recycle"):
        krylov.gmres(mv, b, recycle=(jnp.ones((2, 3, 15)), jnp.ones((2, 3, 15))))
    with pytest.raises(ValueError, match="k"):
        krylov.arnoldi(mv, b, 0)
    with pytest.raises(ValueError, match="v"):
        krylov.arnoldi(mv, jnp.ones((4,)), 3)
    with pytest.raises(ValueError, match="U"):
        krylov.make_recycle_space(mv, jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="gmres_kwargs"):
        krylov.linear_solve(mv, b, tolerance=1e-3)


# ----------------------------------------------------------------------------------------------
# BiCGStab.


@functools.partial(jax.jit, static_argnames=("restart",))
def bicgstab_stencil(coef, b, x0=None, tol=1e-10, max_restarts=50, *, restart=20):
    """Jitted BiCGStab on stencil operators (shared compilations, like solve_stencil)."""
    return krylov.bicgstab(stencil_matvec(coef), b, x0=x0, tol=tol, restart=restart,
                           max_restarts=max_restarts)


def test_bicgstab_matches_spsolve_float64():
    coef = stencil_coeffs(50, 4, 12, 10, k=2.0, adv=0.6)
    b = np.random.default_rng(51).standard_normal((4, 12, 10))
    res = bicgstab_stencil(coef, jnp.asarray(b), tol=1e-12)
    ref = spsolve_all(coef, b)
    assert res.x.dtype == jnp.float64 and res.x.shape == b.shape
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    assert np.all(rel_err(res.x, ref) < 1e-10)
    # the reported residual is the true one, and meets the tolerance
    true = true_rel_residual(coef, res.x, b)
    np.testing.assert_allclose(np.asarray(res.residual), true, rtol=1e-3, atol=1e-16)
    assert np.all(true <= 1e-12)
    # honest counts: per cycle at most 2 per iteration + 1 true residual (x0 = 0: no initial)
    mv, cyc = np.asarray(res.num_matvecs), np.asarray(res.num_restarts)
    assert np.all(mv >= 2 * cyc) and np.all(mv <= (2 * 20 + 1) * cyc)


def test_bicgstab_float32_reaches_1e5():
    coef = stencil_coeffs(52, 3, 10, 9, k=2.0)
    b = np.random.default_rng(53).standard_normal((3, 10, 9))
    res = krylov.bicgstab(stencil_matvec(coef.astype(np.float32)),
                          jnp.asarray(b, jnp.float32), tol=1e-5)
    assert res.x.dtype == jnp.float32 and res.residual.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    true64 = true_rel_residual(coef.astype(np.float32), res.x, b.astype(np.float32))
    assert np.all(true64 <= 1.5e-5)
    assert np.all(rel_err(res.x, spsolve_all(coef.astype(np.float32), b)) < 1e-4)


def test_bicgstab_batched_equals_one_by_one_and_freezes():
    coef, b = _easy_hard_batch()
    res = bicgstab_stencil(coef, jnp.asarray(b), tol=1e-9)
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    assert int(res.num_matvecs[0]) < int(res.num_matvecs[1])  # per-system stop
    for i in range(2):
        alone = bicgstab_stencil(coef[:, i:i + 1], jnp.asarray(b[i:i + 1]), tol=1e-9)
        assert rel_err(res.x[i:i + 1], alone.x)[0] < 1e-13
        assert int(res.num_matvecs[i]) == int(alone.num_matvecs[0])
    assert np.all(rel_err(res.x, spsolve_all(coef, b)) < 1e-7)


def test_bicgstab_exact_preconditioner_stops_at_the_half_step():
    """With M = A^{-1}, A M^{-1} = I: v = p = r, alpha = 1, s = 0, so the first half step
    solves the system: 1 matvec in the iteration + 1 true residual."""
    B, N = 3, 20
    A = random_well_conditioned(54, B, N)
    b = np.random.default_rng(55).standard_normal((B, N))
    res = krylov.bicgstab(dense_matvec(A), jnp.asarray(b), tol=1e-10,
                          precondition=dense_matvec(np.linalg.inv(A)))
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 2)
    np.testing.assert_allclose(np.asarray(res.x), np.linalg.solve(A, b[..., None])[..., 0],
                               rtol=1e-10, atol=1e-12)


def test_bicgstab_breakdown_on_cyclic_shift_is_breakdown():
    """On the cyclic shift with b = e_1 the shadow residual is orthogonal to A r (closed form:
    <e_1, e_2> = 0), so the very first step breaks down and every restart repeats it: BREAKDOWN
    after one cycle, whatever the patience (it used to wait `stagnation_patience` cycles and say
    STAGNATION). A zero preconditioner is the same (GMRES says BREAKDOWN there too)."""
    N = 8
    P = np.roll(np.eye(N), 1, axis=0)[None]
    b = np.zeros((1, N))
    b[0, 0] = 1.0
    for patience in (1, 3):
        res = krylov.bicgstab(dense_matvec(P), jnp.asarray(b), tol=1e-8, restart=5,
                              max_restarts=10, stagnation_patience=patience)
        assert int(res.status[0]) == Status.BREAKDOWN and not bool(res.converged[0])
        assert int(res.num_restarts[0]) == 1
        np.testing.assert_allclose(float(res.residual[0]), 1.0, atol=1e-14)
        np.testing.assert_array_equal(np.asarray(res.x), 0.0)
    with pytest.raises(ValueError, match="stagnation_patience"):
        krylov.bicgstab(dense_matvec(P), jnp.asarray(b), stagnation_patience=0)
    A = random_well_conditioned(31, 2, 12)
    for solver in (krylov.gmres, krylov.bicgstab):
        res = solver(dense_matvec(A), jnp.ones((2, 12)), tol=1e-8, precondition=lambda v: 0.0 * v)
        np.testing.assert_array_equal(np.asarray(res.status), Status.BREAKDOWN)
        np.testing.assert_array_equal(np.asarray(res.x), 0.0)


def test_bicgstab_non_finite_operator_values_inside_a_cycle_are_a_breakdown():
    """A review (2026-12-07): an operator that returns NaN or Inf during the iteration (finite
    inputs) had its steps dropped silently and ended as STAGNATION at residual 7e-2; it is a
    BREAKDOWN now (as in GMRES), with the best finite iterate, and the other systems of the
    batch are bit for bit those of a clean run."""
    rng = np.random.default_rng(3)
    N, B = 30, 3
    A = random_well_conditioned(32, B, N)
    b = rng.standard_normal((B, N))
    b[:, 0] = np.abs(b[:, 0]) + 1
    Aj = jnp.asarray(A)

    def bad_mv(bad):  # system 1 turns non-finite once an iterate's first entry is negative
        def mv(x):
            y = jnp.einsum("bij,bj->bi", Aj, x, precision=jax.lax.Precision.HIGHEST)
            return jnp.where(((x[:, 0] < 0) & (jnp.arange(B) == 1))[:, None], bad, y)
        return mv

    clean = krylov.bicgstab(dense_matvec(A), jnp.asarray(b), tol=1e-10, restart=10)
    for bad in (jnp.nan, jnp.inf):
        res = krylov.bicgstab(bad_mv(bad), jnp.asarray(b), tol=1e-10, restart=10)
        np.testing.assert_array_equal(np.asarray(res.status),
                                      [Status.CONVERGED, Status.BREAKDOWN, Status.CONVERGED])
        assert np.all(np.isfinite(np.asarray(res.x)))
        x1 = np.asarray(res.x[1])
        true1 = np.linalg.norm(b[1] - A[1] @ x1) / np.linalg.norm(b[1])
        np.testing.assert_allclose(float(res.residual[1]), true1, rtol=1e-10)
        assert true1 <= 1.0  # the best finite iterate (x = 0 at worst)
        for i in (0, 2):
            np.testing.assert_array_equal(np.asarray(res.x[i]), np.asarray(clean.x[i]))


@pytest.mark.parametrize("solver", [krylov.gmres, krylov.bicgstab])
def test_default_tolerance_follows_the_dtype(solver):
    """``tol=None`` (the default): 1e-8 in float64, 1e-6 in float32 (:data:`krylov.DEFAULT_TOL`),
    where 1e-8 could never be verified and every float32 system ended with STAGNATION."""
    coef = stencil_coeffs(3, 4, 16, 16)
    b = np.random.default_rng(4).standard_normal((4, 16, 16))
    assert krylov.default_tol(None, jnp.float32) == 1e-6 and krylov.default_tol(None, np.float64) == 1e-8
    assert krylov.default_tol(3e-4, jnp.float32) == 3e-4
    for dtype, tol in ((np.float64, 1e-8), (np.float32, 1e-6)):
        res = solver(stencil_matvec(coef.astype(dtype)), jnp.asarray(b, dtype))
        assert np.all(np.asarray(res.status) == Status.CONVERGED), (dtype, res.status)
        assert float(jnp.max(res.residual)) <= tol
        A = [sp.csr_matrix(np.asarray(jax.jacfwd(lambda v: stencil_matvec(coef[:, i:i + 1])(v[None])[0])(
            jnp.zeros((16, 16)))).reshape(256, 256)) for i in range(4)]
        true = [np.linalg.norm(b[i].ravel() - A[i] @ np.asarray(res.x[i], np.float64).ravel()) / np.linalg.norm(b[i])
                for i in range(4)]
        assert max(true) <= 3 * tol, (dtype, true)
    # the default chosen before the argument checks: an int b is still refused by its dtype
    with pytest.raises(TypeError, match="b: expected"):
        solver(lambda v: v, jnp.ones((2, 4), jnp.int32))


def _convection_diffusion(n=12, eps=0.01, vx=1.0, vy=0.6):
    """-eps Laplace u + v . grad u with central differences on an n x n grid (cell Peclet number
    |v| h / (2 eps) about 3.8 at the defaults): nonsymmetric, not diagonally dominant."""
    import scipy.sparse as sp

    h = 1.0 / (n + 1)
    eye = sp.identity(n)
    d2 = sp.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(n, n)) / h**2
    d1 = sp.diags([-1.0, 0.0, 1.0], [-1, 0, 1], shape=(n, n)) / (2 * h)
    return (-eps * (sp.kron(eye, d2) + sp.kron(d2, eye)) + vx * sp.kron(eye, d1) + vy * sp.kron(d1, eye)).tocsr()


def test_bicgstab_goes_on_through_a_rise_of_the_residual():
    """(A walkthrough, thirty-third session.) On a convection-dominated system BiCGStab's true
    residual is 10-30x the start's after the first 20-iteration cycle and falls after; the solver
    stopped there with STAGNATION and returned x = 0 (stagnation_tol=0 too), where scipy's
    BiCGStab converges in 89 iterations. It now goes on from the cycle's iterate and returns the
    best one: converged, matching spsolve, its residual the true one."""
    import scipy.sparse.linalg as spla

    A = _convection_diffusion()
    b = np.random.default_rng(0).standard_normal((4, 144))
    # the rise, by scipy's BiCGStab: system 2's residual after 20 iterations (one cycle) is 34x b's
    hist = []
    spla.bicgstab(A, b[2], rtol=1e-12, maxiter=20, callback=lambda xk: hist.append(np.linalg.norm(b[2] - A @ xk)))
    assert len(hist) == 20 and hist[-1] > 10 * np.linalg.norm(b[2]) and min(hist) < np.linalg.norm(b[2])
    for st in (1e-3, 0.0):
        res = krylov.bicgstab(dense_matvec(np.broadcast_to(A.toarray(), (4, 144, 144))), jnp.asarray(b), tol=1e-9,
                              stagnation_tol=st)
        assert np.all(np.asarray(res.status) == Status.CONVERGED), (res.status, res.residual)
        want = np.stack([spla.spsolve(A, bi) for bi in b])
        np.testing.assert_allclose(np.asarray(res.x), want, rtol=0, atol=1e-8 * np.abs(want).max())
        true = np.linalg.norm(b - np.asarray(res.x) @ A.T.toarray(), axis=1) / np.linalg.norm(b, axis=1)
        np.testing.assert_allclose(np.asarray(res.residual), true, rtol=1e-6, atol=1e-15)


def test_bicgstab_budget_nonfinite_zero_rhs_and_exact_x0():
    coef = stencil_coeffs(56, 2, 8, 8, k=3.0, adv=0.8)
    b = np.random.default_rng(57).standard_normal((2, 8, 8))
    res = bicgstab_stencil(coef, jnp.asarray(b), tol=1e-12, max_restarts=1, restart=1)
    np.testing.assert_array_equal(np.asarray(res.status), Status.MAX_ITERATIONS)
    true = true_rel_residual(coef, res.x, b)
    np.testing.assert_allclose(np.asarray(res.residual), true, rtol=1e-10)
    assert np.all(true > 1e-6)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), 2 + 1)
    # a non-finite operator is reported; the other system is unaffected
    bad = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, jnp.inf, 3.0, 4.0]])
    res = krylov.bicgstab(lambda x: bad * x, jnp.ones((2, 4)), tol=1e-10)
    np.testing.assert_array_equal(np.asarray(res.status), [Status.CONVERGED, Status.BREAKDOWN])
    assert np.all(np.isfinite(np.asarray(res.x)))
    # zero right-hand side rows and an exact initial guess
    b[1] = 0.0
    xs = spsolve_all(coef, b)
    res = bicgstab_stencil(coef, jnp.asarray(b), jnp.asarray(xs), tol=1e-10)
    np.testing.assert_array_equal(np.asarray(res.num_restarts), 0)
    np.testing.assert_array_equal(np.asarray(res.num_matvecs), [1, 0])
    assert np.all(np.asarray(res.x[1]) == 0) and bool(res.converged[1])


def test_per_system_tolerances():
    """tol may be one value per system; each system stops at its own tolerance."""
    coef = stencil_coeffs(58, 3, 10, 10, k=2.0, adv=0.4)
    b = np.random.default_rng(59).standard_normal((3, 10, 10))
    tol = np.array([1e-4, 1e-8, 1e-12])
    for solver in (krylov.gmres, krylov.bicgstab):
        res = solver(stencil_matvec(coef), jnp.asarray(b), tol=jnp.asarray(tol), restart=10)
        np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
        true = true_rel_residual(coef, res.x, b)
        assert np.all(true <= tol)
        mv = np.asarray(res.num_matvecs)
        assert mv[0] < mv[1] < mv[2]
        with pytest.raises(ValueError, match="tol"):
            solver(stencil_matvec(coef), jnp.asarray(b), tol=jnp.asarray([1e-4, 1e-8]))
        with pytest.raises(ValueError, match="atol"):
            solver(stencil_matvec(coef), jnp.asarray(b), atol=jnp.asarray([0.0, -1.0, 0.0]))


def test_bicgstab_bad_inputs():
    mv = lambda x: 2.0 * x  # noqa: E731
    b = jnp.ones((2, 4, 4))
    with pytest.raises(ValueError, match="b"):
        krylov.bicgstab(mv, jnp.ones((16,)))
    with pytest.raises(TypeError, match="x0"):
        krylov.bicgstab(mv, b, x0=jnp.ones((2, 4, 4), jnp.float32))
    with pytest.raises(ValueError, match="restart"):
        krylov.bicgstab(mv, b, restart=0)
    with pytest.raises(ValueError, match="stagnation_tol"):
        krylov.bicgstab(mv, b, stagnation_tol=1.0)
    with pytest.raises(ValueError, match="precondition"):
        krylov.bicgstab(mv, b, precondition=lambda x: x.reshape(2, 16))


# ----------------------------------------------------------------------------------------------
# Tolerances the working precision cannot verify; NumPy inputs; empty batches.


def _fp_systems_float32():
    """16 log-FP systems (fitted scheme) in float32: at tol = 7e-8 (0.59 eps) GMRES used to
    report 13 of them converged with a float64 residual of up to 1.27 tol."""
    from krylovjax import fokker_planck
    score = 0.5 * jax.random.normal(jax.random.key(0), (16, 2, 16, 16), jnp.float32)
    op = fokker_planck.fp_operator(9.0, 0.05, 1.0, score, scheme="fitted")
    b = op.rhs(3.0 + jnp.cos(jnp.linspace(0, 3, 16, dtype=jnp.float32))[None, None, :]
               * jnp.ones((16, 16, 16), jnp.float32))
    return op, b


def _fp_true_residual(op, x, b):
    x, b = np.asarray(x, np.float64), np.asarray(b, np.float64)
    return np.array([np.linalg.norm(op.to_scipy(i) @ x[i].ravel() - b[i].ravel())
                     / np.linalg.norm(b[i]) for i in range(b.shape[0])])


@pytest.mark.parametrize("solver", [krylov.gmres, krylov.bicgstab])
def test_tolerance_below_eps_is_never_reported_met(solver):
    op, b = _fp_systems_float32()
    eps = float(jnp.finfo(jnp.float32).eps)
    run = jax.jit(lambda op, b, tol: solver(op.matvec, b, tol=tol, max_restarts=10))
    for tol in (0.59 * eps, 0.84 * eps):
        for res in (run(op, b, tol), solver(op.matvec, b, tol=tol, max_restarts=10)):  # traced, concrete
            assert not np.any(np.asarray(res.converged)), tol
            assert set(np.asarray(res.status).tolist()) <= {Status.STAGNATION, Status.MAX_ITERATIONS}
    # from eps on the test is on, and what it reports holds in float64
    res = run(op, b, 1.01 * eps)
    assert np.all(np.asarray(res.converged))
    assert np.all(_fp_true_residual(op, res.x, b) <= 1.01 * eps)
    # atol still stops a system whatever tol is
    res = solver(op.matvec, b, tol=1e-12, atol=1e-3 * float(jnp.min(jnp.linalg.norm(b.reshape(16, -1), axis=1))))
    assert np.all(np.asarray(res.converged))
    np.testing.assert_array_equal(np.asarray(krylov.verifiable_tol(jnp.asarray([1e-7, 2e-7]), jnp.float32)),
                                  np.asarray([0.0, 2e-7], np.float32))


def test_numpy_float64_inputs_follow_jax_dtype_without_x64():
    mv = lambda x: x - 0.1 * jnp.roll(x, 1, axis=-1)  # noqa: E731
    b = np.ones((2, 8, 8))                             # NumPy's default float64
    with jax.enable_x64(False):
        for solver in (krylov.gmres, krylov.bicgstab):
            res = solver(mv, b, x0=np.zeros((2, 8, 8)), tol=1e-5)
            assert res.x.dtype == jnp.float32 and bool(np.all(np.asarray(res.converged)))
        V, _ = krylov.arnoldi(mv, b, 3)
        assert V.dtype == jnp.float32
        assert krylov.linear_solve(mv, b, tol=1e-5).dtype == jnp.float32


def test_empty_batches_and_mismatched_operators_name_the_argument():
    mv = lambda x: 2.0 * x  # noqa: E731
    for solver in (krylov.gmres, krylov.bicgstab):
        with pytest.raises(ValueError, match="b: expected at least one system"):
            solver(mv, jnp.ones((0, 8, 8)))
        with pytest.raises(ValueError, match="b: expected at least one system"):
            solver(mv, jnp.ones((2, 0)))
        coef = jnp.ones((2, 8, 8))                     # an operator for a batch of 2
        with pytest.raises(ValueError, match=r"matvec: failed on an input of shape \(3, 8, 8\)"):
            solver(lambda x: coef * x, jnp.ones((3, 8, 8)))
