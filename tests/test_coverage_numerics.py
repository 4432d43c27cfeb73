"""Coverage audit of the numerics (krylov, cross_matrix, preconditioners, fokker_planck, sde,
scores, transport, initial, reference, precompute, pipeline, store): the options and code paths
no other test ran, each checked against an independent reference (scipy on assembled matrices,
numpy loops, closed forms, the Gaussian oracle, hand computations).

The option space is crossed where a value of one option could hide a wrong assumption about
another: a drift (the VP SDE) with the reflect and Dirichlet boundaries, non-square grids, one
channel and a batch of one, h != 1, Paper B's time grid, float32, the constant SDE, Paper A's
time-step-wise fixed point, BiCGStab inside the seed-basis methods, the Jacobi preconditioner.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from krylovjax import (cross_matrix, data, fokker_planck, initial, krylov, pipeline, preconditioners,
                       reference, scores, sde as sde_lib, store, transport)
from krylovjax.cross_matrix import SolverConfig, solve_fp
from krylovjax.fokker_planck import FPOperator, fp_operator
from krylovjax.precompute import PrecomputeConfig, precompute_scores

import _store_worker as W
from _linalg import dense_matvec, random_well_conditioned


# ----------------------------------------------------------------------------------------------
# Independent references: the log-FP step assembled with scipy Kronecker products, numpy scores.
# ----------------------------------------------------------------------------------------------


def _second_difference(n, reflect):
    """Unscaled 1-D negative Laplacian tridiag(-1, 2, -1); half-sample reflection (ghost = node)
    takes one off the two corner entries."""
    L = sp.diags([-np.ones(n - 1), 2.0 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1]).tolil()
    if reflect:
        L[0, 0] = L[n - 1, n - 1] = 1.0
    return L.tocsr()


def _central_difference(n, h, reflect):
    """1-D central difference (u_{i+1} - u_{i-1}) / 2h: zero ghosts, or ghost = node (reflect)."""
    D = sp.diags([-np.ones(n - 1), np.ones(n - 1)], [-1, 1]).tolil()
    if reflect:
        D[0, 0], D[n - 1, n - 1] = -1.0, 1.0
    return D.tocsr() / (2.0 * h)


def _consistent_step(g2, dt, h, lag, drift, m_prev, reflect):
    """One backward-Euler step of the consistent scheme for one system [H, W], assembled as
    I + k (I (x) L_x + L_y (x) I) + dt (diag(v_x) D_x + diag(v_y) D_y) with v = f - g2/2 s, and
    the right-hand side m_prev - dt div_h(f), with f extrapolated linearly to the ghosts for
    every boundary (BUILD_NOTES "Drift"): central differences inside, one-sided at the border,
    numpy.gradient with edge_order=1."""
    H, W = m_prev.shape
    k = dt * g2 / (2.0 * h * h)
    Ix, Iy = sp.identity(W), sp.identity(H)
    Dx = sp.kron(Iy, _central_difference(W, h, reflect))
    Dy = sp.kron(_central_difference(H, h, reflect), Ix)
    L = sp.kron(Iy, _second_difference(W, reflect)) + sp.kron(_second_difference(H, reflect), Ix)
    vx = (drift[0] - 0.5 * g2 * lag[0]).ravel()
    vy = (drift[1] - 0.5 * g2 * lag[1]).ravel()
    A = sp.identity(H * W) + k * L + dt * (sp.diags(vx) @ Dx + sp.diags(vy) @ Dy)
    div = np.gradient(drift[0], h, axis=1, edge_order=1) + np.gradient(drift[1], h, axis=0, edge_order=1)
    b = m_prev.ravel() - dt * div.ravel()
    return spla.spsolve(A.tocsc(), b).reshape(H, W)


def _one_sided_score(m, h):
    """numpy.gradient (edge_order=1) along x (last axis) and y: ``[..., 2, H, W]``."""
    return np.stack([np.gradient(m, h, axis=-1, edge_order=1),
                     np.gradient(m, h, axis=-2, edge_order=1)], axis=-3)


def _zero_padded_score(m, h):
    """Central differences with m = 0 outside the grid (numpy.pad): ``[..., 2, H, W]``."""
    p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    sx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / (2.0 * h)
    sy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / (2.0 * h)
    return np.stack([sx, sy], axis=-3)


def _pixel_positions(H, W, h):
    """[2, H, W]: x (column) and y (row) relative to the grid centre, times h."""
    x = (np.arange(W) - (W - 1) / 2) * h
    y = (np.arange(H) - (H - 1) / 2) * h
    return np.stack([np.broadcast_to(x[None, :], (H, W)), np.broadcast_to(y[:, None], (H, W))])


def _crops(B, C, H, W, seed=1):
    """B real photographs (16x16, C channels) cropped to a non-square H x W."""
    imgs = data.builtin_dataset(16, B, seed=seed)[:, :C, :H, :W]
    return np.ascontiguousarray(imgs, np.float64)


# ----------------------------------------------------------------------------------------------
# fokker_planck: the drift with the Dirichlet boundary (a defect), hand-built operators
# ----------------------------------------------------------------------------------------------


def _ou_gaussian(xx, yy, v):
    return -(xx ** 2 + yy ** 2) / (2 * v) - np.log(2 * np.pi * v)


@jax.jit
def _dirichlet_step(g2, dt, h, lag, drift, ghost, m_prev):
    op = fp_operator(g2, dt, h, lag, drift, boundary="dirichlet", boundary_values=ghost)
    return op, op.rhs(m_prev)


def _ou_error(n, c=1.0, s0=0.3, g2=1.0, T=0.2, L=2.0):
    """Max error of m at T for the Ornstein-Uhlenbeck drift f = -c x: a centred Gaussian stays
    Gaussian with variance v' = g2 - 2 c v (closed form below), so m is known exactly; Dirichlet
    data from it, lagged score from the previous step, dt ~ h^2 (as test_fokker_planck's
    drift-free oracle)."""
    h = 2 * L / (n + 1)
    xs = -L + h * np.arange(n + 2)
    yy, xx = np.meshgrid(xs, xs, indexing="ij")
    steps = int(np.ceil(T / (h * h)))
    dt = T / steps

    def var(t):
        return g2 / (2 * c) + (s0 - g2 / (2 * c)) * np.exp(-2 * c * t)

    f = np.stack([-c * xx[1:-1, 1:-1], -c * yy[1:-1, 1:-1]])
    m_pad = _ou_gaussian(xx, yy, s0)
    for step in range(1, steps + 1):
        sx = (m_pad[1:-1, 2:] - m_pad[1:-1, :-2]) / (2 * h)
        sy = (m_pad[2:, 1:-1] - m_pad[:-2, 1:-1]) / (2 * h)
        ghost = _ou_gaussian(xx, yy, var(step * dt))
        op, b = _dirichlet_step(g2, dt, h, np.stack([sx, sy]), f, ghost, m_pad[1:-1, 1:-1])
        m_new = spla.spsolve(op.to_scipy().tocsc(), np.asarray(b).ravel()).reshape(n, n)
        m_pad = ghost.copy()
        m_pad[1:-1, 1:-1] = m_new
    return np.abs(m_pad[1:-1, 1:-1] - _ou_gaussian(xx, yy, var(T))[1:-1, 1:-1]).max()


def test_dirichlet_with_a_drift_converges_at_second_order():
    """Dirichlet data fix m, not the drift: div_h(f) at the border used f = 0 on the ghost ring
    (before 2026-12-06), a source error ~ f / 2h that grows as h shrinks (errors 0.37, 0.32,
    0.18: no convergence).
    With f extrapolated linearly (exact for this linear drift) the error falls like h^2."""
    errors = np.array([_ou_error(n) for n in (11, 23, 47)])
    orders = np.log2(errors[:-1] / errors[1:])
    assert errors[-1] < 1.5e-2, errors
    assert np.all(orders > 1.7), (errors, orders)


def test_dirichlet_drift_source_is_the_one_sided_difference_at_the_border():
    """The source -dt div_h(f) for boundary="dirichlet": central differences inside, the
    one-sided difference (f_1 - f_0) / h at each border (the central difference with the ghost
    2 f_0 - f_1), as for every boundary since 2026-12-06 (zero and reflect:
    tests/test_mutation_numerics.py). Hand-written numpy reference."""
    rng = np.random.default_rng(5)
    H, Wd, h, dt = 4, 6, 0.7, 0.05
    f = rng.normal(size=(2, H, Wd))
    gv = rng.normal(size=(H + 2, Wd + 2))
    for scheme in ("consistent", "fitted"):
        op = fp_operator(1.3, dt, h, drift=f, scheme=scheme, boundary="dirichlet", boundary_values=gv)
        fx = np.pad(f[0], ((0, 0), (1, 1)))
        fx[:, 0], fx[:, -1] = 2 * f[0][:, 0] - f[0][:, 1], 2 * f[0][:, -1] - f[0][:, -2]
        fy = np.pad(f[1], ((1, 1), (0, 0)))
        fy[0], fy[-1] = 2 * f[1][0] - f[1][1], 2 * f[1][-1] - f[1][-2]
        div = (fx[:, 2:] - fx[:, :-2] + fy[2:] - fy[:-2]) / (2 * h)
        np.testing.assert_allclose(np.asarray(op.source), -dt * div, rtol=0, atol=1e-14)
        np.testing.assert_allclose(div[1:-1, 0], (f[0][1:-1, 1] - f[0][1:-1, 0]) / h
                                   + (f[1][2:, 0] - f[1][:-2, 0]) / (2 * h), rtol=1e-12)


def test_hand_built_dirichlet_operator_without_ghosts_and_diffusion_coefficient():
    """An FPOperator built by hand with boundary="dirichlet" and no ghost ring reads zero
    ghosts (its right-hand side is m_prev + source); diffusion_coefficient is dt g2 / (2 h^2)."""
    rng = np.random.default_rng(6)
    op = fp_operator(2.0, 0.1, 0.5, rng.normal(size=(2, 2, 4, 5)))
    hand = FPOperator(op.centre, op.east, op.west, op.south, op.north, source=None, ghost=None,
                      diffusion=op.diffusion, scheme="consistent", boundary="dirichlet")
    m = rng.normal(size=(2, 4, 5))
    np.testing.assert_array_equal(np.asarray(hand.rhs(jnp.asarray(m))), m)
    np.testing.assert_allclose(np.asarray(hand.matvec(jnp.asarray(m))),
                               np.asarray(op.matvec(jnp.asarray(m))), rtol=0, atol=0)
    assert float(fokker_planck.diffusion_coefficient(3.0, 0.2, 0.5)) == pytest.approx(0.2 * 3.0 / (2 * 0.25))
    np.testing.assert_allclose(np.asarray(fokker_planck.diffusion_coefficient(2.0, 0.1, 0.5)),
                               np.asarray(op.diffusion)[0, 0, 0])


# ----------------------------------------------------------------------------------------------
# cross_matrix / krylov / preconditioners: the solvers on systems with a drift, the reflect
# boundary and a non-square grid, against scipy
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_systems():
    """A VP step at t = 0.5 (beta 10.05, drift -beta/2 times the pixel position): fitted scheme,
    reflect boundary, three channels of a photograph on a non-square 7 x 10 grid; the lagged
    score of the intensity log-density. Reference: scipy's spsolve on the assembled matrices."""
    imgs = _crops(1, 3, 7, 10)
    m0 = np.asarray(initial.intensity_log_density(imgs))[0]  # [3, 7, 10]
    lag = 3.0 * np.asarray(scores.score(m0, boundary="one_sided"))
    beta, dt = float(sde_lib.VPSDE().beta(0.5)), 1.0 / 19
    f = np.broadcast_to(-0.5 * beta * _pixel_positions(7, 10, 1.0), (3, 2, 7, 10))
    op = fp_operator(beta, dt, 1.0, lag, f, scheme="fitted", boundary="reflect")
    b = op.rhs(jnp.asarray(m0))
    return op, b, jnp.asarray(m0), reference.spsolve(op, np.asarray(b)).x


_SOLVER_CASES = {
    # one preset per preconditioner (each reads the reflect boundary its own way)
    "preconditioned": SolverConfig(**cross_matrix.PRESETS["preconditioned"]),
    "preconditioned_line": SolverConfig(**cross_matrix.PRESETS["preconditioned_line"]),
    "preconditioned_block": SolverConfig(**cross_matrix.PRESETS["preconditioned_block"]),
    "fast": SolverConfig(**cross_matrix.PRESETS["fast"]),
    # not presets: BiCGStab refining a seed projection, with the Jacobi preconditioner
    "cross_matrix_bicgstab_jacobi": SolverConfig(method="cross_matrix", krylov="bicgstab",
                                                 precondition="jacobi", seed_index=1),
}


@pytest.mark.parametrize("name", sorted(_SOLVER_CASES))
def test_solvers_with_drift_reflect_and_a_non_square_grid_match_spsolve(drift_systems, name):
    op, b, m0, x_ref = drift_systems
    cfg = dataclasses.replace(_SOLVER_CASES[name], tol=1e-11)
    res = solve_fp(op, b, cfg, x0=m0)
    assert bool(jnp.all(res.converged)), res.status
    err = np.abs(np.asarray(res.x) - x_ref).max() / np.abs(x_ref).max()
    assert err < 1e-9, err
    # the reported residual is the true one of the assembled system
    for i in range(3):
        bi = np.asarray(b[i]).ravel()
        true = np.linalg.norm(bi - op.to_scipy(i) @ np.asarray(res.x[i]).ravel()) / np.linalg.norm(bi)
        assert true <= 1e-11 and float(res.residual[i]) == pytest.approx(true, rel=1e-2, abs=1e-15)


def test_solvers_in_float32_on_the_same_systems(drift_systems):
    """float32 operators and right-hand sides (the accelerators' dtype) with the line
    preconditioner and BiCGStab: converged at the float32 default tolerance, within 1e-4 of
    float64 scipy."""
    op, b, _, x_ref = drift_systems
    op32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), op)
    res = solve_fp(op32, b.astype(jnp.float32),
                   SolverConfig(method="gmres", precondition="line", krylov="bicgstab", tol=1e-6))
    assert res.x.dtype == jnp.float32 and bool(jnp.all(res.converged))
    assert np.abs(np.asarray(res.x, np.float64) - x_ref).max() / np.abs(x_ref).max() < 1e-4


def test_auto_chunk_size_of_the_line_and_block_preconditioners():
    """The documented working set by hand, 11 x 12 grid (132 unknowns), float64, restart 20:
    plain GMRES 20 + 11 + 6 = 37 fields -> 768 KiB / (37 * 132 * 8 B) = 20 systems -> 16;
    line +7 = 44 fields -> 16.9 -> 16; block_line + 2 * 5 + 1 + 2 = 50 fields -> 14.9 -> 8;
    on an accelerator: None (the whole batch)."""
    grid = (11, 12)
    assert cross_matrix.auto_chunk_size(SolverConfig(precondition=None), grid, jnp.float64, "cpu") == 16
    assert cross_matrix.auto_chunk_size(SolverConfig(precondition="line"), grid, jnp.float64, "cpu") == 16
    assert cross_matrix.auto_chunk_size(SolverConfig(precondition="block_line"), grid, jnp.float64,
                                        "cpu") == 8
    assert preconditioners.BLOCK_BANDWIDTH == 5
    assert cross_matrix.auto_chunk_size(SolverConfig(precondition="block_line"), grid, jnp.float32,
                                        "cpu") == 16
    assert cross_matrix.auto_chunk_size(SolverConfig(precondition="line"), grid, jnp.float64, "gpu") is None


def test_linear_solve_uses_the_transpose_preconditioner():
    """Gradients of sum(w * A^{-1} b) w.r.t. b and A are A^{-T} w and -(A^{-T} w) x^T (numpy).
    One GMRES step per solve (restart 1, one cycle): exact only with the exact inverse as the
    preconditioner, A^{-1} forward and A^{-T} for the transpose solves, so a transpose solve
    that kept the forward one would give a wrong gradient."""
    A = random_well_conditioned(3, 2, 6, scale=0.6)
    Ainv = np.linalg.inv(A)
    AinvT = np.swapaxes(Ainv, 1, 2)
    rng = np.random.default_rng(4)
    b, w = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))

    def loss(A_, b_):
        x = krylov.linear_solve(dense_matvec(A_), b_, precondition=dense_matvec(Ainv),
                                transpose_precondition=dense_matvec(AinvT), tol=1e-12, restart=1,
                                max_restarts=1)
        return jnp.sum(jnp.asarray(w) * x)

    gA, gb = jax.grad(loss, argnums=(0, 1))(jnp.asarray(A), jnp.asarray(b))
    lam = np.linalg.solve(np.swapaxes(A, 1, 2), w[..., None])[..., 0]
    x = np.linalg.solve(A, b[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(gb), lam, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gA), -lam[:, :, None] * x[:, None, :], rtol=1e-10, atol=1e-12)


def test_gmres_under_jit_with_traced_tolerances():
    """tol, atol and stagnation_tol may be traced (only their shapes are checked then)."""
    A = random_well_conditioned(7, 3, 8)
    b = np.random.default_rng(7).normal(size=(3, 8))
    run = jax.jit(lambda b_, tol, stag: krylov.gmres(dense_matvec(A), b_, tol=tol, stagnation_tol=stag,
                                                     atol=tol * 0.0))
    res = run(jnp.asarray(b), jnp.asarray([1e-12, 1e-11, 1e-12]), jnp.asarray(1e-3))
    assert bool(jnp.all(res.converged))
    np.testing.assert_allclose(np.asarray(res.x), np.linalg.solve(A, b[..., None])[..., 0], rtol=1e-9,
                               atol=1e-11)


# ----------------------------------------------------------------------------------------------
# precompute / pipeline: the VP SDE with the reflect boundary on a non-square single-channel
# image, h != 1, Paper B's time grid; the constant SDE with Paper A's fixed point in float32
# ----------------------------------------------------------------------------------------------

_VP_H, _VP_W = 6, 9
_VP = PrecomputeConfig(sde="vp", sde_kwargs=(("beta_min", 0.5), ("beta_max", 6.0)), num_steps=4,
                       paper_b_time_grid=True, h=0.5, scheme="consistent", boundary="reflect",
                       initial="intensity", score_boundary="one_sided", max_sweeps=2,
                       outer_tol=1e-14, strategy="fast", tol=1e-12)


def _vp_reference(image, cfg=_VP):
    """Algorithm 1 for one channel [H, W], written out: t = linspace(eps, 1, N), dt = 1/N
    (Paper B's grid); beta(t) = 0.5 + 5.5 t; f^n = -beta(t_n)/2 (pixel position - centre) h;
    m0 the intensity density on the lattice of spacing h; sweep k solves step n with the
    one-sided score of sweep k-1's m^n and the new m^{n-1}; consistent scheme, reflect."""
    N, h = cfg.num_steps, cfg.h
    t = np.linspace(cfg.eps, 1.0, N)
    dt = 1.0 / N
    beta = 0.5 + t * (6.0 - 0.5)
    w = image + 1e-3
    m0 = np.log(w / (h * h * w.sum()))
    pos = _pixel_positions(*image.shape, h)
    m_old = [m0] * N
    for _ in range(cfg.max_sweeps):
        m_new = [m0]
        for n in range(1, N):
            m_new.append(_consistent_step(beta[n], dt, h, _one_sided_score(m_old[n], h),
                                          -0.5 * beta[n] * pos, m_new[-1], reflect=True))
        m_old = m_new
    return np.stack(m_old), t, dt


def test_vp_reflect_non_square_one_channel_batch_of_one_equals_the_written_out_sweeps():
    image = _crops(1, 1, _VP_H, _VP_W)
    res = precompute_scores(image, _VP)
    want, t, dt = _vp_reference(image[0, 0])
    assert res.log_density.shape == (1, 1, 4, _VP_H, _VP_W) and res.dt == dt
    np.testing.assert_allclose(np.asarray(res.t), t, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(res.stats["sweeps"], [2])
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(res.log_density)[0, 0], want, rtol=0, atol=1e-9 * scale)
    want_s = _one_sided_score(want, _VP.h)
    np.testing.assert_allclose(np.asarray(res.scores)[0, 0], want_s, rtol=0,
                               atol=1e-9 * np.abs(want_s).max())


def test_pipeline_with_the_vp_sde_embeds_with_its_drift_and_resumes_a_complete_store(tmp_path):
    """Two images in chunks of one (the compiled programs of the test above): the stored
    embedding is x^n = x^{n-1} + (-beta(t_n)/2 x^{n-1} - beta(t_n)/2 s_y^n) dt from the stored
    y-component scores (numpy loop); a second run on the complete store computes nothing."""
    images = np.concatenate([_crops(1, 1, _VP_H, _VP_W, seed=s) for s in (1, 2)])
    first = pipeline.run_precompute(images, _VP, tmp_path, chunk_images=1, store_dtype=np.float64,
                                    embed_component="y", progress=False)
    assert first.chunks_computed == 2 and first.complete
    st = pipeline.open_store(tmp_path, images, _VP, chunk_images=1, store_dtype=np.float64,
                             embed_component="y")
    s_y = st.read_all("scores")[:, 0, :, 1]  # [B, N, H, W]
    t = st.read_all("t")[0]
    beta = 0.5 + t * 5.5
    dt = 1.0 / _VP.num_steps
    x = images[:, 0].copy()
    want = [x]
    for n in range(1, _VP.num_steps):
        x = x + (-0.5 * beta[n] * x - 0.5 * beta[n] * s_y[:, n]) * dt
        want.append(x)
    np.testing.assert_allclose(st.read_all("embedded")[:, :, 0], np.stack(want, axis=1), rtol=1e-12,
                               atol=1e-12)
    again = pipeline.run_precompute(images, _VP, tmp_path, chunk_images=1, store_dtype=np.float64,
                                    embed_component="y", progress=False)
    summary = again.to_dict()
    assert summary["chunks_computed"] == 0 and summary["chunks_skipped"] == 2 and summary["complete"]
    assert summary["images_computed"] == 0 and summary["sweeps_max"] == 0
    assert set(summary) == {f.name for f in dataclasses.fields(pipeline.PipelineSummary)}


def test_pipeline_runs_the_paper_a_alias_with_the_documented_keys(tmp_path):
    """initial="paper_a" (the alias of "paper_a_kde") draws random samples too: the pipeline gave
    it no key and every run failed. Chunk i's m0 is Paper A's density with key
    fold_in(key(seed), i) (the documented derivation). The constant SDE (g = 0.7, std=None) and
    one sweep: m^1 is one fitted step with g^2 = 0.49 and the score of m0 (scipy)."""
    images = np.concatenate([_crops(1, 1, 4, 5, seed=s) for s in (3, 4)])
    cfg = PrecomputeConfig(sde="constant", sde_kwargs=(("g", 0.7), ("std", None)), num_steps=2,
                           initial="paper_a", strategy="gmres", max_sweeps=1, tol=1e-12)
    summary = pipeline.run_precompute(images, cfg, tmp_path, chunk_images=1, seed=5, progress=False,
                                      store_dtype=np.float64)
    assert summary.complete and summary.chunks_computed == 2
    m = pipeline.open_store(tmp_path, images, cfg, chunk_images=1, seed=5,
                            store_dtype=np.float64).read_all("log_density")[:, 0]  # [B, N, H, W]
    _, dt = sde_lib.time_grid(2)
    for i in range(2):
        key = jax.random.fold_in(jax.random.key(5), i)
        m0 = np.asarray(initial.paper_a_kde(images[i:i + 1], key))[0]  # [1, H, W]
        np.testing.assert_allclose(m[i, 0], m0[0], rtol=1e-12, atol=1e-12)
        op = fp_operator(0.49, dt, 1.0, _zero_padded_score(m0, 1.0), scheme="fitted")
        m1 = reference.spsolve(op, np.asarray(op.rhs(jnp.asarray(m0)))).x[0]
        np.testing.assert_allclose(m[i, 1], m1, rtol=0, atol=1e-9 * np.abs(m1).max())


def test_vp_timestep_float32_paper_a_density_equals_the_fixed_point_loop():
    """outer="timestep" (Paper A) with the VP SDE (its defaults: beta 0.1 .. 20), the fitted
    scheme, the zero boundary, Paper A's spatial density on non-square float32 images, BiCGStab:
    each step runs the fixed point x <- solve(beta(t_n), f^n, score(x)) from m^{n-1} exactly
    max_fixed_point times (outer_tol out of reach), against float64 scipy on fp_operator's
    assembled matrices; the progress callback reports every solved system."""
    K, N = 2, 3
    images = _crops(2, 3, 5, 8).astype(np.float32)
    key = jax.random.key(3)
    cfg = PrecomputeConfig(sde="vp", sde_kwargs=(), num_steps=N, outer="timestep", max_fixed_point=K,
                           outer_tol=1e-15, initial="paper_a_kde", strategy="bicgstab", tol=1e-6)
    calls = []
    res = precompute_scores(images, cfg, key=key, progress=lambda *a: calls.append(a))
    assert res.log_density.dtype == jnp.float32
    m0 = np.asarray(initial.paper_a_kde(images, key), np.float64).reshape(6, 5, 8)
    t, dt = sde_lib.time_grid(N)
    beta = 0.1 + np.asarray(t) * 19.9
    ms = [m0]
    for n in range(1, N):
        f = np.broadcast_to(-0.5 * beta[n] * _pixel_positions(5, 8, 1.0), (6, 2, 5, 8))
        it = ms[-1]
        for _ in range(K):
            op = fp_operator(beta[n], dt, 1.0, _zero_padded_score(it, 1.0), f, scheme="fitted")
            it = reference.spsolve(op, np.asarray(op.rhs(jnp.asarray(ms[-1])))).x
        ms.append(it)
    want = np.stack(ms, axis=1).reshape(2, 3, N, 5, 8)
    got = np.asarray(res.log_density, np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    systems = 2 * 3 * (N - 1) * K
    assert calls == [(1, 1, {"systems": systems})] and res.stats["systems_solved"] == systems
    np.testing.assert_array_equal(res.stats["fixed_point_iterations"], [K] * (N - 1))


# ----------------------------------------------------------------------------------------------
# transport / sde: Paper A's embedding with a drift, the SDE interface's default g2
# ----------------------------------------------------------------------------------------------


def test_paper_a_embedding_with_the_vp_drift_equals_the_loop():
    """variant="paper_a" with the VP SDE (its tests used the constant SDE, f = 0): at each
    selected step x <- clip(x + (-beta/2 x - beta/2 s) dt + 0.1 sqrt(beta dt) xi, 0, 1), the
    drift taken at the current x and t_{n_k}; one channel, non-square, float32 images with
    float64 scores (computed in float64)."""
    rng = np.random.default_rng(9)
    B, C, N, H, Wd, K = 2, 1, 7, 4, 6, 3
    images = rng.uniform(0.2, 0.8, (B, C, H, Wd)).astype(np.float32)
    sc = rng.standard_normal((B, C, N, 2, H, Wd))
    t, dt = sde_lib.time_grid(N)
    vp = sde_lib.VPSDE(0.1, 20.0)
    key = jax.random.key(11)
    noise = np.float32(0.1)  # NumPy numbers for noise_scale and num_embed
    out = np.asarray(transport.embed(images, sc, vp, t, dt, variant="paper_a", component="y", key=key,
                                     num_embed=np.int64(K), noise_scale=noise))
    assert out.dtype == np.float64 and out.shape == (B, K + 1, C, H, Wd)
    idx = transport.paper_a_indices(N, K)
    xi = np.asarray(jax.random.normal(key, (B, K, C, H, Wd), jnp.float64))
    t = np.asarray(t)
    x = images.astype(np.float64)
    want = [x]
    for k, n in enumerate(idx):
        beta = 0.1 + t[n] * 19.9
        x = x + (-0.5 * beta * x - 0.5 * beta * sc[:, :, n, 1]) * dt + float(noise) * np.sqrt(beta * dt) * xi[:, k]
        x = np.clip(x, 0.0, 1.0)
        want.append(x)
    np.testing.assert_allclose(out, np.stack(want, axis=1), rtol=1e-12, atol=1e-14)


def test_sde_interface_g2_defaults_to_g_squared():
    """An SDE subclass that defines only g gets g2 = g^2 (the interface's default)."""
    class Linear(sde_lib.SDE):
        def g(self, t):
            return 3.0 * jnp.asarray(t)

    np.testing.assert_allclose(np.asarray(Linear().g2(jnp.asarray([0.5, 2.0]))), [2.25, 36.0])


def test_sde_keyword_errors_name_the_keyword_or_the_value():
    """get_sde told "bad keyword arguments ['sigma']" for a bad *value* of sigma (the class's
    TypeError was taken for an unknown keyword), listed ConstantSDE's field g_const instead of
    its argument g, and took sigma="5" or True as numbers."""
    with pytest.raises(TypeError, match="sigma must be a real number, got 'big'"):
        sde_lib.get_sde("ve", sigma="big")
    with pytest.raises(ValueError, match=r"bad keyword arguments \['gg'\] for SDE 'constant'; expected some of \['g', 'std'"):
        sde_lib.get_sde("constant", gg=0.5)
    for bad in ("5", True):
        with pytest.raises(TypeError, match="sigma must be a real number"):
            sde_lib.VESDE(sigma=bad)
    with pytest.raises(ValueError, match=r"sde_kwargs: beta_max must be a real number, got '20'"):
        PrecomputeConfig(sde="vp", sde_kwargs=(("beta_max", "20"),))
    assert sde_lib.get_sde("constant", g=np.float32(0.5), std=None) == sde_lib.ConstantSDE(0.5, None)


def test_paper_a_embedding_takes_integral_num_embed_and_real_noise_scale():
    """num_embed=2.7 embedded 2 steps without a word (int() truncation); noise_scale as a NumPy
    float was refused as if it were negative, a bool taken as 1."""
    args = (np.full((1, 1, 4, 4), 0.5), np.zeros((1, 1, 5, 2, 4, 4)), sde_lib.VESDE(), np.linspace(0.1, 1, 5), 0.1)
    kw = dict(variant="paper_a", key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_embed: expected an integer >= 1, got 2.7"):
        transport.embed(*args, num_embed=2.7, **kw)
    with pytest.raises(ValueError, match="noise_scale must be finite and >= 0, got True"):
        transport.embed(*args, noise_scale=True, **kw)
    # NumPy numbers are accepted: test_paper_a_embedding_with_the_vp_drift_equals_the_loop


def test_seed_basis_takes_a_batch_of_one():
    """seed_b as [1, H, W] (the documented alternative to [H, W]; that branch never ran): an
    orthonormal basis starting at b / ||b|| with the Arnoldi relation A V_k = V_{k+1} H on
    scipy's assembled matrix."""
    op = fp_operator(2.0, 0.1, 1.0, np.random.default_rng(8).normal(size=(1, 2, 4, 5)))
    b = np.random.default_rng(9).normal(size=(4, 5))
    basis = cross_matrix.seed_basis(op.matvec, jnp.asarray(b)[None], 3)
    V, Hs = np.asarray(basis.V), np.asarray(basis.H)
    np.testing.assert_allclose(V @ V.T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(V[0], b.ravel() / np.linalg.norm(b), rtol=1e-12)
    np.testing.assert_allclose(op.to_scipy(0) @ V[:3].T, V.T @ Hs, atol=1e-12)
    assert basis.Z.shape == (3, 20) and int(basis.num_matvecs) == 3


# ----------------------------------------------------------------------------------------------
# Bad input: each error path nobody ran, naming the argument
# ----------------------------------------------------------------------------------------------


def _op(batch=2, grid=(4, 4)):
    return fp_operator(1.0, 0.1, 1.0, np.zeros((batch, 2) + grid))


def _mv(b):
    return b


_BAD = [
    # sde
    ("sde sigma", lambda: sde_lib.VESDE(sigma="big"), TypeError, "sigma must be a real number"),
    ("sde sigma None", lambda: sde_lib.VESDE(sigma=None), TypeError, "sigma must be a real number, got None"),
    ("sde register twice", lambda: sde_lib.register_sde("ve")(sde_lib.VESDE), ValueError,
     "SDE name 've' is already registered"),
    # transport
    ("paper_a_indices num_times", lambda: transport.paper_a_indices(1), ValueError, "num_times must be >= 2"),
    ("paper_a_indices num_embed", lambda: transport.paper_a_indices(5, 0), ValueError, "num_embed must be >= 1"),
    ("embed integer scores", lambda: transport.embed(np.full((1, 1, 4, 4), 0.5), np.zeros((1, 1, 3, 2, 4, 4), int),
                                                     sde_lib.VESDE(), np.linspace(0.1, 1, 3), 0.1),
     TypeError, "scores must have a floating dtype"),
    ("embed noise_scale", lambda: transport.embed(np.full((1, 1, 4, 4), 0.5), np.zeros((1, 1, 3, 2, 4, 4)),
                                                  sde_lib.VESDE(), np.linspace(0.1, 1, 3), 0.1, variant="paper_a",
                                                  key=jax.random.key(0), noise_scale=-1.0),
     ValueError, "noise_scale must be finite and >= 0"),
    # fokker_planck
    ("rhs grid", lambda: _op().rhs(jnp.zeros((2, 4, 5))), ValueError, r"m_prev: expected grid shape \(4, 4\)"),
    ("g2 bool", lambda: fp_operator(True, 0.1, 1.0, np.zeros((2, 4, 4))), TypeError, "g2: expected a real number"),
    ("batch shapes", lambda: fp_operator(1.0, 0.1, 1.0, np.zeros((2, 2, 4, 4)), np.zeros((3, 2, 4, 4))),
     ValueError, "lagged_score, drift: batch shapes do not broadcast"),
    ("grid_shape mismatch", lambda: fp_operator(1.0, 0.1, 1.0, np.zeros((2, 4, 4)), grid_shape=(4, 5)),
     ValueError, r"grid_shape: \(4, 5\) does not match"),
    ("grid_shape missing", lambda: fp_operator(1.0, 0.1), ValueError, "grid_shape: required"),
    ("grid of one row", lambda: fp_operator(1.0, 0.1, 1.0, np.zeros((2, 1, 4))), ValueError,
     r"grid_shape: expected \(H, W\) with H, W >= 2"),
    ("dtype int", lambda: fp_operator(1.0, 0.1, grid_shape=(4, 4), dtype=np.int32), TypeError,
     "dtype: expected a floating dtype"),
    ("boundary_values batch", lambda: fp_operator(1.0, 0.1, 1.0, np.zeros((2, 2, 4, 4)), boundary="dirichlet",
                                                  boundary_values=np.zeros((3, 6, 6))),
     ValueError, r"boundary_values: batch shape \(3,\) does not broadcast"),
    ("boundary_values unused", lambda: fp_operator(1.0, 0.1, 1.0, np.zeros((2, 4, 4)),
                                                   boundary_values=np.zeros((6, 6))),
     ValueError, "boundary_values: only used with boundary='dirichlet'"),
    # preconditioners
    ("eigenbasis boundary", lambda: preconditioners.shared_diffusion_inverse(1.0, (4, 5), "periodic"),
     ValueError, "boundary: expected 'zero', 'dirichlet' or 'reflect'"),
    # cross_matrix
    ("seed_b rank", lambda: cross_matrix.seed_basis(_mv, jnp.ones(4), 2), ValueError, "seed_b: expected a field"),
    ("cross b rank", lambda: cross_matrix.cross_matrix_solve(_mv, jnp.ones(4), None), ValueError,
     r"b: expected \[T, \*shape\]"),
    ("SolverConfig precondition", lambda: SolverConfig(precondition="ilu"), ValueError, "precondition: expected one of"),
    ("SolverConfig projection", lambda: SolverConfig(projection="galerkin"), ValueError, "projection: expected one of"),
    ("solve_fp config", lambda: solve_fp(_op(), jnp.zeros((2, 4, 4)), {"method": "gmres"}), TypeError,
     "config: expected a SolverConfig"),
    ("solve_fp two batch axes", lambda: solve_fp(fp_operator(1.0, 0.1, 1.0, np.zeros((2, 3, 2, 4, 4))),
                                                 jnp.zeros((2, 3, 4, 4))),
     ValueError, "op: expected one leading batch axis"),
    ("solve_fp x0", lambda: solve_fp(_op(), jnp.zeros((2, 4, 4)), x0=jnp.zeros((2, 4, 5))), ValueError,
     r"x0: expected shape \(2, 4, 4\)"),
    # krylov
    ("restart traced", lambda: jax.jit(lambda b, r: krylov.gmres(_mv, b, restart=r))(jnp.ones((2, 3)), 3),
     ValueError, "restart: expected a static Python int"),
    ("max_restarts float", lambda: krylov.gmres(_mv, jnp.ones((2, 3)), max_restarts=1.5), ValueError,
     "max_restarts: expected an int >= 1"),
    ("stagnation_tol shape", lambda: krylov.gmres(_mv, jnp.ones((2, 3)), stagnation_tol=np.ones(2)), ValueError,
     "stagnation_tol: expected a scalar"),
    ("stagnation_tol negative", lambda: krylov.bicgstab(_mv, jnp.ones((2, 3)), stagnation_tol=-0.5), ValueError,
     "stagnation_tol: expected a finite number >= 0"),
    ("b a list", lambda: krylov.gmres(_mv, [[1.0, 2.0]]), TypeError, "b: expected an array"),
    ("matvec not callable", lambda: krylov.gmres(np.eye(3), jnp.ones((2, 3))), TypeError,
     "matvec: expected a callable"),
    ("matvec dtype", lambda: krylov.gmres(lambda v: v.astype(jnp.float32), jnp.ones((2, 3))), TypeError,
     r"matvec: expected output dtype float64 \(that of b\)"),
    ("recycle one array", lambda: krylov.gmres(_mv, jnp.ones((2, 3)), recycle=jnp.ones((2, 1, 3))), ValueError,
     r"recycle: expected a pair \(U, C\)"),
    ("recycle lists", lambda: krylov.gmres(_mv, jnp.ones((2, 3)), recycle=([1.0], [1.0])), ValueError,
     "recycle U: expected an array"),
    ("recycle dtype", lambda: krylov.gmres(_mv, jnp.ones((2, 3)), recycle=(jnp.ones((1, 3), jnp.float32),) * 2),
     TypeError, "recycle U: expected dtype float64"),
    ("map_in_chunks no args", lambda: krylov.map_in_chunks(_mv, chunk_size=2), ValueError,
     "args: expected at least one array"),
    # precompute
    ("shard", lambda: PrecomputeConfig(shard=1), ValueError, "shard: expected a bool"),
    ("h", lambda: PrecomputeConfig(h=0.0), ValueError, "h: expected a finite number > 0"),
    ("outer_tol", lambda: PrecomputeConfig(outer_tol=float("inf")), ValueError, "outer_tol: expected a finite"),
    ("resolve dtype", lambda: PrecomputeConfig().resolve(np.float16), TypeError,
     "dtype: expected float32 or float64"),
    ("spsolve solver_config", lambda: PrecomputeConfig(strategy="spsolve").solver_config(3), ValueError,
     "strategy: 'spsolve' has no Krylov solver config"),
    ("key data", lambda: precompute_scores(np.full((1, 1, 4, 4), 0.5),
                                           PrecomputeConfig(num_steps=2, initial="paper_a_kde"),
                                           key=np.zeros(3, np.uint32)),
     ValueError, "key: expected a jax.random key"),
    ("paper_b_kde non-square", lambda: precompute_scores(np.full((1, 1, 4, 6), 0.5), PrecomputeConfig(num_steps=2)),
     ValueError, "images must be square"),
    # reference
    ("spsolve_in_jit NaN", lambda: jax.block_until_ready(reference.spsolve_in_jit(_op(), jnp.full((2, 4, 4), np.nan))),
     RuntimeError, "b: expected finite values"),
    # initial
    ("kde leading axes", lambda: initial.kde_log_density(np.zeros((2, 5, 2)), np.zeros((3, 4, 2))), ValueError,
     "data and queries must share leading axes"),
    ("kde one point", lambda: initial.kde_log_density(np.zeros((1, 2)), np.zeros((4, 2))), ValueError,
     "data needs n >= 2 points"),
    ("paper_a offset", lambda: initial.paper_a_samples(np.full((1, 1, 4, 4), 0.5), jax.random.key(0), offset=0.0),
     ValueError, "offset must be finite and > 0"),
    ("intensity h", lambda: initial.intensity_log_density(np.full((1, 1, 4, 4), 0.5), h=0.0), ValueError,
     "h must be finite and > 0"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in _BAD], ids=[c[0] for c in _BAD])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# store: resume paths, the reads nobody ran, bad input
# ----------------------------------------------------------------------------------------------


def test_store_resumes_after_a_creator_died_before_its_manifest(tmp_path):
    """A creator killed before publishing the manifest leaves arrays/, complete/ (with a stale
    marker) and a hidden manifest temp file: the next process creates the store afresh, drops
    the stale marker (every chunk pending) and can fill it; a marker of a chunk index beyond the
    store is ignored; complete chunks read back the data written (numpy reference)."""
    path = tmp_path / "s"
    (path / "arrays").mkdir(parents=True)
    (path / "complete").mkdir()
    (path / "complete" / "chunk_00000001.json").write_text("{}")
    (path / ".manifest.json.abc.tmp").write_text("partial")
    st = W.open_store(path)
    assert os.listdir(path / "complete") == [] and st.pending_chunks() == [0, 1, 2, 3]
    for i in st.pending_chunks():
        st.write_chunk(i, W.make_fields(*st.chunk_bounds(i)))
    (path / "complete" / "chunk_00000099.json").write_text("{}")  # beyond num_chunks = 4
    again = W.open_store(path)
    assert again.completed_chunks() == [0, 1, 2, 3] and again.is_complete()
    assert [again.owner(i) for i in range(4)] == [0, 0, 0, 0]
    assert repr(again).startswith(f"ScoreStore({str(path)!r}, images=10, chunk_size=3")
    ref = W.make_fields(0, W.NUM_IMAGES)
    np.testing.assert_array_equal(again.read_all("m"), ref["m"])


def test_store_batch_reads_empty_and_bad(tmp_path):
    st = W.open_store(tmp_path / "s")
    with pytest.raises(ValueError, match="data: expected a dict"):
        st.write_chunk(0, [1, 2])
    for i in st.pending_chunks():
        st.write_chunk(i, W.make_fields(*st.chunk_bounds(i)))
    ref = W.make_fields(0, W.NUM_IMAGES)
    none = np.zeros(0, np.int64)
    assert st.read_batch("scores", none).shape == (0, W.C, W.N, 2, W.H, W.W)
    empty = st.read_batch("scores", none, none)
    assert empty.shape == (0, W.C, 2, W.H, W.W) and empty.dtype == np.float32
    np.testing.assert_array_equal(st.read_batch("matvecs", np.array([9, 0])), ref["matvecs"][[9, 0]])
    for args, match in [
        ((np.array([[0]]),), "image_indices: expected a 1-D int array"),
        ((np.array([0.0]),), "image_indices: expected a 1-D int array"),
        ((np.array([10]),), r"image_indices: values must lie in \[0, 10\)"),
        ((np.array([0]), np.array([0])), "time_indices: field 'matvecs' was declared without a time_axis"),
    ]:
        with pytest.raises(ValueError, match=match):
            st.read_batch("matvecs" if "time_axis" in match else "scores", *args)
    with pytest.raises(ValueError, match="time_indices: expected an int array of shape"):
        st.read_batch("scores", np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match=r"time_indices: values must lie in \[0, 4\)"):
        st.read_batch("scores", np.array([0]), np.array([4]))
    for call, match in [(lambda: st.chunk_bounds(True), "index: expected an int chunk index"),
                        (lambda: st.read("m", True), "image_index: expected an int"),
                        (lambda: st.read("m", 0, True), "time_index: expected an int")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_store_large_field_without_time_axis_and_small_byte_fields(tmp_path):
    """A per-image field over 4 KiB without a time axis is sharded with whole-image inner chunks,
    uint8 fields use the byte codec without an endianness: both read back what was written."""
    rng = np.random.default_rng(0)
    fields = {"big": ((40, 40), np.float32), "u8": ((3,), np.uint8)}
    data_ = {"big": rng.normal(size=(5, 40, 40)).astype(np.float32),
             "u8": rng.integers(0, 255, (5, 3)).astype(np.uint8)}
    kw = dict(config={"a": 1}, inputs_hash="0" * 64, num_images=5, chunk_size=5, fields=fields)
    st = store.ScoreStore.create_or_open(tmp_path / "s", **kw)
    st.write_chunk(0, data_)
    again = store.ScoreStore.create_or_open(tmp_path / "s", **kw)
    for name in fields:
        np.testing.assert_array_equal(again.read_all(name), data_[name])
    np.testing.assert_array_equal(again.read("big", 3), data_["big"][3])


def test_store_refuses_damaged_foreign_and_differently_typed_stores(tmp_path):
    kw = dict(config={"a": 1, "b": [1, 2]}, inputs_hash="0" * 64, num_images=2, chunk_size=1,
              fields={"x": ((3,), np.float64)})
    path = tmp_path / "s"
    store.ScoreStore.create_or_open(path, **kw)
    with pytest.raises(ValueError, match=r'config keys differ: config.a \(stored 1, given "1"\)'):
        store.ScoreStore.create_or_open(path, **{**kw, "config": {"a": "1", "b": [1, 2]}})
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="path: store .* has format version 99"):
        store.ScoreStore.create_or_open(path, **kw)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "zarr"}))
    with pytest.raises(ValueError, match="not a krylovjax.score_store manifest"):
        store.ScoreStore.create_or_open(path, **kw)
    (path / "manifest.json").write_text(json.dumps(manifest))
    os.remove(path / "arrays" / "x" / "zarr.json")
    with pytest.raises(ValueError, match="path: store .* is damaged: array 'x' cannot be opened"):
        store.ScoreStore.create_or_open(path, **kw)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        store.ScoreStore.create_or_open(tmp_path / "file", **kw)


def test_atomic_json_write_that_fails_leaves_no_file_and_fsync_errors_are_ignored(tmp_path, monkeypatch):
    """A marker write that fails at the rename (disk full, killed) raises and leaves neither the
    marker nor its temporary file; a directory fsync the file system refuses, or of a directory
    gone, is skipped (the data files are fsync'd by tensorstore)."""
    target = tmp_path / "chunk_00000000.json"

    def refuse(src, dst):
        raise OSError("no space left on device")

    with monkeypatch.context() as m:
        m.setattr(store.os, "replace", refuse)
        with pytest.raises(OSError, match="no space left"):
            store._atomic_write_json(str(target), {"chunk": 0})
    assert os.listdir(tmp_path) == []
    store._fsync_dir(str(tmp_path / "gone"))

    def no_fsync(fd):
        raise OSError("fsync not supported")

    with monkeypatch.context() as m:
        m.setattr(store.os, "fsync", no_fsync)
        store._fsync_dir(str(tmp_path))
    store._atomic_write_json(str(target), {"chunk": 0})
    assert json.loads(target.read_text()) == {"chunk": 0}


class _ConfigDictLike:
    def to_dict(self):
        return {"sde": "vp", "grid": np.array([2, 3]), "n": np.int64(4)}


@pytest.mark.parametrize("call, exc, match", [
    (lambda: store.FieldSpec.parse("m", ((2.5, 3), np.float32)), ValueError, r"fields\['m'\]: shape must be a sequence of ints"),
    (lambda: store.FieldSpec.parse("m", ((True, 3), np.float32)), ValueError, r"fields\['m'\]: shape must be"),
    (lambda: store.FieldSpec.parse("m", ("ab", np.float32)), ValueError, r"fields\['m'\]: shape must be"),
    (lambda: store.FieldSpec.parse("m", (5, np.float32)), ValueError, r"fields\['m'\]: shape must be"),
    (lambda: store.FieldSpec.parse("m", ((2,),)), ValueError, r"fields\['m'\]: expected \(shape, dtype\)"),
    (lambda: store.FieldSpec.parse("m", ((2,), "no_such_dtype")), TypeError, r"fields\['m'\]: 'no_such_dtype' is not a numpy dtype"),
    (lambda: store.FieldSpec.parse("m", ((2,), np.float32, True)), ValueError, r"fields\['m'\]: time_axis must be an int"),
    (lambda: store.canonical_config({1: 2}), TypeError, "config: keys must be str, got int key 1 at <root>"),
    (lambda: store.canonical_config({"a": np.zeros(2000)}), TypeError, "config: a is an array of 2000 elements"),
    (lambda: store.canonical_config([1, 2]), TypeError, "config: expected a dict, got list"),
    (lambda: store.ScoreStore.create_or_open("", config={}, inputs_hash="0" * 64, num_images=1, chunk_size=1,
                                             fields={"x": ((1,), np.float32)}), ValueError, "path: expected a non-empty"),
    (lambda: store.ScoreStore.create_or_open("unused", config={}, inputs_hash="0" * 64, num_images=1, chunk_size=1,
                                             fields={}), ValueError, "fields: expected a non-empty dict"),
], ids=["float size", "bool size", "string shape", "int shape", "one-tuple", "dtype", "time_axis bool",
        "int key", "big array", "list config", "empty path", "no fields"])
def test_store_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_store_canonical_config_of_a_config_dict_and_field_specs():
    """A ConfigDict-like object (to_dict) and small numpy values become plain JSON; a FieldSpec
    passes through parse; numpy integer sizes are accepted."""
    assert store.canonical_config(_ConfigDictLike()) == {"sde": "vp", "grid": [2, 3], "n": 4}
    spec = store.FieldSpec.parse("m", ((np.int64(2), 3), np.float32, 1))
    assert spec == store.FieldSpec((2, 3), np.dtype(np.float32), 1)
    assert store.FieldSpec.parse("m", spec) == spec
