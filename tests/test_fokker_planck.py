"""The log-FP operator against independent references: hand-assembled scipy matrices, an
explicit stencil loop, and the analytic Gaussian (Cole-Hopf) solution with its convergence order.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from krylovjax.fokker_planck import fp_operator

SCHEMES = ["consistent", "fitted", "paper_b"]
BOUNDARIES = ["zero", "dirichlet", "reflect"]


def _random_operator(rng, scheme, boundary, batch=3, H=5, W=7, dtype=np.float64):
    s = rng.normal(size=(batch, 2, H, W)).astype(dtype)
    f = rng.normal(size=(batch, 2, H, W)).astype(dtype)
    gv = rng.normal(size=(batch, H + 2, W + 2)).astype(dtype) if boundary == "dirichlet" else None
    g2 = rng.uniform(0.5, 3.0, size=batch)
    dt = rng.uniform(0.01, 0.2, size=batch)
    h = rng.uniform(0.3, 1.5)
    op = fp_operator(g2, dt, h, s, f, scheme=scheme, boundary=boundary, boundary_values=gv)
    return op, dict(s=s, f=f, gv=gv, g2=g2, dt=dt, h=h)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("grid", [(5, 7), (8, 4), (6, 6)])
def test_matvec_equals_assembled_matrix(scheme, boundary, grid):
    rng = np.random.default_rng(hash((scheme, boundary, grid)) % 2**32)
    op, _ = _random_operator(rng, scheme, boundary, H=grid[0], W=grid[1])
    x = rng.normal(size=(3,) + grid)
    y = np.asarray(jax.jit(lambda o, v: o.matvec(v))(op, jnp.asarray(x)))
    for i in range(3):
        A = op.to_scipy(i)
        np.testing.assert_allclose(A @ x[i].ravel(), y[i].ravel(), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(A.diagonal(), np.asarray(op.diagonal()[i]).ravel(), atol=1e-14)


def _tridiag_1d(n, lower, diag, upper):
    return sp.diags([np.full(n - 1, float(lower)), np.full(n, float(diag)), np.full(n - 1, float(upper))], [-1, 0, 1])


def test_consistent_zero_matches_kron_assembly():
    """Independent assembly: I + k*(L_x (+) L_y) + dt*(diag(vx) D_x + diag(vy) D_y)."""
    rng = np.random.default_rng(1)
    H, W = 6, 9
    s = rng.normal(size=(2, H, W))
    f = rng.normal(size=(2, H, W))
    g2, dt, h = 2.5, 0.07, 0.8
    op = fp_operator(g2, dt, h, s, f)
    k = dt * g2 / (2 * h * h)
    lap_x = _tridiag_1d(W, -1, 2, -1)  # negative 1-D Laplacian, unscaled
    lap_y = _tridiag_1d(H, -1, 2, -1)
    d_x = _tridiag_1d(W, -1, 0, 1) / (2 * h)
    d_y = _tridiag_1d(H, -1, 0, 1) / (2 * h)
    I_h, I_w = sp.identity(H), sp.identity(W)
    L = sp.kron(I_h, lap_x) + sp.kron(lap_y, I_w)
    vx = (f[0] - 0.5 * g2 * s[0]).ravel()
    vy = (f[1] - 0.5 * g2 * s[1]).ravel()
    A_ref = (sp.identity(H * W) + k * L + dt * (sp.diags(vx) @ sp.kron(I_h, d_x)
                                                 + sp.diags(vy) @ sp.kron(d_y, I_w)))
    np.testing.assert_allclose(op.to_scipy().toarray(), A_ref.toarray(), atol=1e-14)
    # Right-hand side: m_prev - dt * div_h(f) with f extrapolated linearly outside the grid
    # (the boundary condition is one of m): numpy's odd reflection, ghost = 2 f_0 - f_1.
    m_prev = rng.normal(size=(H, W))
    fp = [np.pad(f[c], 1, mode="reflect", reflect_type="odd") for c in range(2)]
    div = ((fp[0][1:-1, 2:] - fp[0][1:-1, :-2]) + (fp[1][2:, 1:-1] - fp[1][:-2, 1:-1])).ravel() / (2 * h)
    np.testing.assert_allclose(np.asarray(op.rhs(jnp.asarray(m_prev))).ravel(),
                               m_prev.ravel() - dt * div, atol=1e-14)


def _fitted_reference(g2, dt, h, s, f):
    """Independent assembly of the fitted scheme: per node and direction the 1-D coefficients
    -k p coth p -+ k p of the Il'in-Allen-Southwell scheme, with p = v h / g2 (numpy's tanh)."""
    H, W = s.shape[-2:]
    k = dt * g2 / (2 * h * h)
    A = sp.lil_matrix((H * W, H * W))
    for i in range(H):
        for j in range(W):
            row = i * W + j
            diag = 1.0
            for comp, (di, dj) in ((0, (0, 1)), (1, (1, 0))):
                v = f[comp, i, j] - 0.5 * g2 * s[comp, i, j]
                p = v * h / g2
                sig = 1.0 if p == 0 else p / np.tanh(p)
                diag += 2 * k * sig
                for sign in (1, -1):
                    ii, jj = i + sign * di, j + sign * dj
                    if 0 <= ii < H and 0 <= jj < W:
                        A[row, ii * W + jj] = -k * sig + sign * k * p
            A[row, row] = diag
    return A.tocsr()


def test_fitted_matches_independent_assembly():
    rng = np.random.default_rng(11)
    H, W = 5, 6
    s = 4.0 * rng.normal(size=(2, H, W))
    f = rng.normal(size=(2, H, W))
    s[:, 0, 0] = 0.0  # a zero Peclet number (series branch) too
    f[:, 0, 0] = 0.0
    g2, dt, h = 2.5, 0.07, 0.8
    op = fp_operator(g2, dt, h, s, f, scheme="fitted")
    np.testing.assert_allclose(op.to_scipy().toarray(),
                               _fitted_reference(g2, dt, h, s, f).toarray(), atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bernoulli_pair_is_accurate_and_non_negative(dtype):
    """(B(x), B(-x)) with B(x) = x / (e^x - 1), against a reference in Python floats (series
    near 0), over |x| from 0 to beyond float32's overflow of e^x; both values stay >= 0."""
    from krylovjax.fokker_planck import _bernoulli_pair

    mags = np.concatenate([[0.0, 1e-9, 9.99e-4, 1e-3, 1.01e-3], np.logspace(-2, 3, 41)])
    x = np.concatenate([mags, -mags])

    def ref(v):
        if abs(v) < 1e-4:
            return 1.0 - v / 2 + v * v / 12 - v ** 4 / 720
        return v / math.expm1(v) if v < 0 else v * math.exp(-v) / -math.expm1(-v)

    got_p, got_m = (np.asarray(a, np.float64) for a in _bernoulli_pair(jnp.asarray(x, dtype)))
    want_p = np.array([ref(float(v)) for v in x.astype(dtype)])
    want_m = np.array([ref(-float(v)) for v in x.astype(dtype)])
    rtol = 2e-6 if dtype == np.float32 else 1e-14
    tiny = np.finfo(dtype).tiny / np.finfo(dtype).eps  # B(x) ~ x e^-x underflows for x >> 1
    np.testing.assert_allclose(got_p, want_p, rtol=rtol, atol=tiny)
    np.testing.assert_allclose(got_m, want_m, rtol=rtol, atol=tiny)
    assert got_p.min() >= 0.0 and got_m.min() >= 0.0
    if dtype == np.float64:  # derivatives, at 0 and on both branches

        def slope(v):  # B'(v) = (e^v - 1 - v e^v) / (e^v - 1)^2, B'(0) = -1/2
            return -0.5 if v == 0 else (math.expm1(v) - v * math.exp(v)) / math.expm1(v) ** 2

        for v in (0.0, 5e-4, -5e-4, 0.3, -0.3, 7.0, -7.0):
            d_plus, d_minus = (float(jax.grad(lambda t, i=i: _bernoulli_pair(t)[i])(v)) for i in (0, 1))
            assert d_plus == pytest.approx(slope(v), rel=1e-6)
            assert d_minus == pytest.approx(-slope(-v), rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fitted_is_an_m_matrix_where_central_is_not(dtype):
    """Off-diagonals <= 0 and diag - sum|offdiag| >= 1 (= 1 inside) for any score; the central
    scheme violates the sign condition once |score| > 2/h (cell Peclet number above 2)."""
    rng = np.random.default_rng(12)
    s = (30.0 * rng.normal(size=(3, 2, 8, 9))).astype(dtype)
    ops = {sc: fp_operator(jnp.array([0.5, 3.0, 30.0]), 0.05, 1.0, s, scheme=sc)
           for sc in ("fitted", "consistent")}
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for i in range(3):
        A = ops["fitted"].to_scipy(i).toarray()
        off = A - np.diag(np.diag(A))
        assert off.max() <= 0.0
        margin = np.diag(A) - np.abs(off).sum(axis=1)
        assert margin.min() >= 1.0 - tol
        inside = np.zeros((8, 9), bool)
        inside[1:-1, 1:-1] = True
        np.testing.assert_allclose(margin.reshape(8, 9)[inside], 1.0, rtol=tol)
        C = ops["consistent"].to_scipy(i).toarray()
        assert (C - np.diag(np.diag(C))).max() > 0.0


def test_fitted_tends_to_central_at_second_order():
    """sigma(p) = 1 + p^2/3 + O(p^4): scaling the score by e changes the fitted minus central
    coefficients by e^2, and the two schemes coincide for a zero score."""
    rng = np.random.default_rng(13)
    s = rng.normal(size=(2, 6, 6))
    diffs = []
    for e in (0.1, 0.05, 0.025):
        a = fp_operator(2.0, 0.1, 1.0, e * s, scheme="fitted").to_scipy().toarray()
        b = fp_operator(2.0, 0.1, 1.0, e * s, scheme="consistent").to_scipy().toarray()
        diffs.append(np.abs(a - b).max())
    ratios = np.array(diffs[:-1]) / np.array(diffs[1:])
    np.testing.assert_allclose(ratios, 4.0, rtol=0.01)
    zero = np.zeros((2, 6, 6))
    np.testing.assert_array_equal(
        fp_operator(2.0, 0.1, 1.0, zero, scheme="fitted").to_scipy().toarray(),
        fp_operator(2.0, 0.1, 1.0, zero, scheme="consistent").to_scipy().toarray())


def test_paper_b_matches_code_description():
    """method.md 3.2: diagonals at 0, +-1, +-W on the flat index, column-node coefficients."""
    rng = np.random.default_rng(2)
    H, W = 7, 7
    s = rng.normal(size=(2, H, W))
    g2, dt, h = 25.0 ** 0.6, 0.05, 1.0
    op = fp_operator(g2, dt, h, s, scheme="paper_b")
    n = H * W
    scalar = (s[0] + s[1]).ravel()
    alpha = -0.5 * g2 * scalar * dt / (2 * h)
    delta = 0.5 * g2 * dt / h**2
    a, c = alpha + delta, alpha - delta
    A_ref = ((1 + 2 * g2 * dt / h**2) * sp.identity(n)
             + sp.diags(a[1:], 1) + sp.diags(c[:-1], -1)
             + sp.diags(a[W:], W) + sp.diags(c[:-W], -W))
    np.testing.assert_allclose(op.to_scipy().toarray(), A_ref.toarray(), atol=1e-14)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dirichlet_rhs_equals_stencil_on_padded_field(scheme):
    """A m (homogeneous part) + ghost terms = the stencil applied to the field with its ring."""
    rng = np.random.default_rng(3)
    op, p = _random_operator(rng, scheme, "dirichlet", batch=2, H=4, W=5)
    m = rng.normal(size=(2, 4, 5))
    zero_rhs_shift = np.asarray(op.rhs(jnp.zeros((2, 4, 5))))  # = source - ghost terms
    source = np.asarray(op.source)
    ghost_terms = source - zero_rhs_shift
    full = np.asarray(op.matvec(jnp.asarray(m))) + ghost_terms
    # Explicit loop reference with the neighbour rule of each scheme.
    ref = np.zeros_like(m)
    H, W = 4, 5
    for b in range(2):
        pad = p["gv"][b].copy()
        pad[1:-1, 1:-1] = m[b]
        flat = m[b].ravel()
        for i in range(H):
            for j in range(W):
                if scheme != "paper_b":
                    e, w_ = pad[i + 1, j + 2], pad[i + 1, j]
                else:
                    k = i * W + j
                    e = flat[k + 1] if k + 1 < H * W else pad[H, W + 1]
                    w_ = flat[k - 1] if k - 1 >= 0 else pad[1, 0]
                s_, n_ = pad[i + 2, j + 1], pad[i, j + 1]
                ref[b, i, j] = (op.centre[b, i, j] * m[b, i, j] + op.east[b, i, j] * e
                                + op.west[b, i, j] * w_ + op.south[b, i, j] * s_
                                + op.north[b, i, j] * n_)
    np.testing.assert_allclose(full, ref, atol=1e-12)


def test_float32_and_scalar_batch():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(2, 6, 6)).astype(np.float32)
    op = fp_operator(1.5, 0.1, 1.0, s)
    assert op.dtype == jnp.float32 and op.batch_shape == ()
    x = rng.normal(size=(6, 6)).astype(np.float32)
    y = op.matvec(jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(op.to_scipy() @ x.ravel(), np.asarray(y).ravel(), rtol=1e-5,
                               atol=1e-5)
    # No score: a grid shape and batch shape must be given.
    op2 = fp_operator(jnp.array([1.0, 2.0]), 0.1, grid_shape=(4, 4))
    assert op2.batch_shape == (2,)


def _exact_gaussian(xx, yy, v):
    return -(xx**2 + yy**2) / (2 * v) - np.log(2 * np.pi * v)


def _gaussian_run(n, s0sq=0.3, g2=1.0, T=0.2, L=2.0, c_dt=1.0, scheme="consistent"):
    """Solve the log-FP equation (f = 0) for a 2-D Gaussian with Dirichlet data from the exact
    solution; lagged score = central-difference score of the previous time step."""
    h = 2 * L / (n + 1)
    xs = -L + h * np.arange(0, n + 2)  # including ghost ring
    yy, xx = np.meshgrid(xs, xs, indexing="ij")
    steps = int(np.ceil(T / (c_dt * h * h)))
    dt = T / steps
    m_pad = _exact_gaussian(xx, yy, s0sq)
    for step in range(1, steps + 1):
        t = step * dt
        m_int = m_pad[1:-1, 1:-1]
        sx = (m_pad[1:-1, 2:] - m_pad[1:-1, :-2]) / (2 * h)
        sy = (m_pad[2:, 1:-1] - m_pad[:-2, 1:-1]) / (2 * h)
        ghost = _exact_gaussian(xx, yy, s0sq + g2 * t)
        op = fp_operator(g2, dt, h, jnp.asarray(np.stack([sx, sy])), boundary="dirichlet",
                         boundary_values=jnp.asarray(ghost), scheme=scheme)
        b = np.asarray(op.rhs(jnp.asarray(m_int))).ravel()
        m_new = spla.spsolve(op.to_scipy().tocsc(), b).reshape(n, n)
        m_pad = ghost.copy()
        m_pad[1:-1, 1:-1] = m_new
    exact = _exact_gaussian(xx, yy, s0sq + g2 * T)[1:-1, 1:-1]
    return np.max(np.abs(m_pad[1:-1, 1:-1] - exact))


@pytest.mark.parametrize("scheme", ["consistent", "fitted"])
def test_gaussian_oracle_converges_at_second_order_in_h(scheme):
    """Cole-Hopf oracle (design.md decision 4): Gaussian variance grows by the integral of g^2.

    With dt proportional to h^2, the error of m must fall like h^2 (first order in dt); the
    fitted scheme's extra diffusion is O(h^2) where the score is resolved, so it keeps the
    order."""
    errors = [_gaussian_run(n, scheme=scheme) for n in (11, 23, 47)]  # h halves each time
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 2e-2, errors
    assert np.all(orders > 1.7), (errors, orders)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(g2=-1.0), "g2"),
        (dict(dt=0.0), "dt"),
        (dict(h=np.nan), "h"),
        (dict(lagged_score=np.zeros((3, 4, 4))), "lagged_score"),
        (dict(lagged_score=np.full((2, 4, 4), np.nan)), "lagged_score"),
        (dict(drift=np.zeros((2, 2, 5, 4))), "drift"),
        (dict(scheme="upwind"), "scheme"),
        (dict(boundary="periodic"), "boundary"),
        (dict(boundary="dirichlet"), "boundary_values"),
        (dict(boundary="dirichlet", boundary_values=np.zeros((4, 4))), "boundary_values"),
        (dict(g2=np.ones(3), lagged_score=np.zeros((2, 2, 4, 4))), "g2"),
    ],
)
def test_bad_input(kwargs, match):
    base = dict(g2=1.0, dt=0.1, h=1.0, lagged_score=np.zeros((2, 2, 4, 4)))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fp_operator(base.pop("g2"), base.pop("dt"), base.pop("h"), **base)


def test_integer_dtype_rejected():
    with pytest.raises(TypeError, match="lagged_score"):
        fp_operator(1.0, 0.1, 1.0, np.zeros((2, 4, 4), dtype=np.int32))


def test_matvec_shape_check():
    op = fp_operator(1.0, 0.1, 1.0, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="m:"):
        op.matvec(jnp.zeros((4, 5)))


def test_to_scipy_refuses_an_index_outside_the_batch():
    """JAX clamps an out-of-range index: to_scipy(5) on a batch of 2 used to return system 1."""
    op = fp_operator(4.0, 0.1, 1.0, np.random.default_rng(0).normal(size=(2, 2, 8, 8)))
    assert (op.to_scipy(np.int64(1)) != op.to_scipy(-1)).nnz == 0
    for bad in (5, -3, (1, 0), (), True, 1.0):
        with pytest.raises(ValueError, match=r"index: expected a full batch index into batch shape \(2,\)"):
            op.to_scipy(bad)
    op2 = fp_operator(4.0, 0.1, 1.0, np.zeros((2, 3, 2, 4, 4)))
    with pytest.raises(ValueError, match="index"):
        op2.to_scipy((1, 7))


def test_grid_and_batch_shapes_must_be_integer_sizes():
    """A grid of 8.7 used to become 8 silently, a negative batch failed inside broadcast_in_dim."""
    op = fp_operator(1.0, 0.1, grid_shape=(np.int64(8), 8), batch_shape=(np.int32(2),))
    assert op.grid_shape == (8, 8) and op.batch_shape == (2,)
    for kw, match in ((dict(grid_shape=(8.7, 8)), "grid_shape: expected a tuple of integers >= 2"),
                      (dict(grid_shape=(8, 8), batch_shape=(-2,)), "batch_shape: expected a tuple of integers >= 0"),
                      (dict(grid_shape=(8, True)), "grid_shape")):
        with pytest.raises(ValueError, match=match):
            fp_operator(1.0, 0.1, **kw)
    with pytest.raises(ValueError, match=r"batch_shape: \(3,\) does not broadcast"):
        fp_operator(1.0, 0.1, 1.0, np.zeros((2, 2, 4, 4)), batch_shape=(3,))
