"""Tests for krylovjax.scores against analytic gradients and hand-built numpy versions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax.scores import scalar_score, score


def _grid(H, W, h):
    y = np.arange(H) * h
    x = np.arange(W) * h
    return np.meshgrid(y, x, indexing="ij")  # Y [H, W] along axis -2, X along -1


def _numpy_central(m, h, mode):
    """Hand-built reference: pad, then central differences everywhere."""
    if mode == "zero":
        p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], mode="constant")
    else:
        p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], mode="reflect")
    sx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / (2 * h)
    sy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / (2 * h)
    return np.stack([sx, sy], axis=-3)


@pytest.mark.parametrize("boundary", ["zero", "one_sided", "reflect"])
def test_quadratic_exact_in_interior(boundary):
    h = 0.1
    Y, X = _grid(9, 12, h)
    m = 1.5 * X**2 - 0.7 * X * Y + 2.0 * Y**2 + 0.3 * X - 1.1 * Y + 0.2
    s = np.asarray(score(jnp.asarray(m), h=h, boundary=boundary))
    assert s.shape == (2, 9, 12)
    dx = 3.0 * X - 0.7 * Y + 0.3
    dy = -0.7 * X + 4.0 * Y - 1.1
    np.testing.assert_allclose(s[0, 1:-1, 1:-1], dx[1:-1, 1:-1], atol=1e-12)
    np.testing.assert_allclose(s[1, 1:-1, 1:-1], dy[1:-1, 1:-1], atol=1e-12)
    # x-derivative is also exact on the top/bottom rows (it is central along W there).
    np.testing.assert_allclose(s[0, [0, -1], 1:-1], dx[[0, -1], 1:-1], atol=1e-12)


def test_second_order_convergence_smooth_field():
    errs = []
    for n in (17, 33, 65):
        h = 1.0 / (n - 1)
        Y, X = _grid(n, n, h)
        m = np.sin(2 * X + 0.5) * np.cos(3 * Y)
        s = np.asarray(score(jnp.asarray(m), h=h, boundary="one_sided"))
        ex = 2 * np.cos(2 * X + 0.5) * np.cos(3 * Y)
        ey = -3 * np.sin(2 * X + 0.5) * np.sin(3 * Y)
        errs.append(max(np.abs(s[0, 1:-1, 1:-1] - ex[1:-1, 1:-1]).max(), np.abs(s[1, 1:-1, 1:-1] - ey[1:-1, 1:-1]).max()))
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(orders - 2.0) < 0.1), orders


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_boundary_matches_padded_numpy(mode):
    rng = np.random.default_rng(0)
    m = rng.standard_normal((2, 3, 7, 5))
    s = np.asarray(score(jnp.asarray(m), h=0.5, boundary=mode))
    np.testing.assert_allclose(s, _numpy_central(m, 0.5, mode), rtol=1e-14, atol=1e-14)
    if mode == "reflect":  # zero normal derivative on the border
        np.testing.assert_array_equal(s[..., 0, :, [0, -1]], 0.0)
        np.testing.assert_array_equal(s[..., 1, [0, -1], :], 0.0)


def test_one_sided_matches_numpy_gradient():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((4, 6, 8))
    s = np.asarray(score(jnp.asarray(m), h=0.25, boundary="one_sided"))
    gy, gx = np.gradient(m, 0.25, axis=(-2, -1), edge_order=1)
    np.testing.assert_allclose(s[:, 0], gx, rtol=1e-14, atol=1e-13)
    np.testing.assert_allclose(s[:, 1], gy, rtol=1e-14, atol=1e-13)


def test_paper_b_flat_index_loop():
    rng = np.random.default_rng(2)
    m = rng.standard_normal((2, 5, 6))
    h = 2.0
    s = np.asarray(score(jnp.asarray(m), h=h, method="paper_b"))
    ref = np.zeros_like(m)
    for b in range(2):
        flat = m[b].reshape(-1)
        K = flat.size
        out = np.zeros(K)
        for k in range(K):
            left = flat[k - 1] if k > 0 else 0.0
            right = flat[k + 1] if k < K - 1 else 0.0
            out[k] = (right - left) / (2 * h)
        ref[b] = out.reshape(5, 6)
    np.testing.assert_allclose(s[:, 0], ref, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(s[:, 1], 0.0)
    np.testing.assert_allclose(scalar_score(s), ref, rtol=1e-14, atol=1e-14)
    # Row ends couple across rows, unlike the 2-D zero-boundary x-derivative ...
    central = np.asarray(score(jnp.asarray(m), h=h, boundary="zero"))[:, 0]
    assert np.abs(s[:, 0, 1:, 0] - central[:, 1:, 0]).max() > 1e-3
    # ... while inside each row the two agree.
    np.testing.assert_allclose(s[:, 0, :, 1:-1], central[:, :, 1:-1], rtol=1e-14)


def test_dtype_jit_and_batching():
    rng = np.random.default_rng(3)
    m32 = jnp.asarray(rng.standard_normal((3, 2, 6, 6)), jnp.float32)
    s = score(m32)
    assert s.dtype == jnp.float32 and s.shape == (3, 2, 2, 6, 6)
    f = jax.jit(lambda x, h: score(x, h=h, boundary="reflect"))
    np.testing.assert_allclose(f(m32, 0.5), score(m32, h=0.5, boundary="reflect"), rtol=1e-6)
    v = jax.vmap(lambda x: score(x, boundary="one_sided"))(m32)
    np.testing.assert_allclose(v, score(m32, boundary="one_sided"), rtol=1e-6)


def test_scalar_score_components():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((2, 3, 2, 4, 5))
    np.testing.assert_allclose(scalar_score(s), s[:, :, 0] + s[:, :, 1])
    np.testing.assert_allclose(scalar_score(s, "x"), s[:, :, 0])
    np.testing.assert_allclose(scalar_score(s, "y"), s[:, :, 1])


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: score(jnp.ones((4, 4)), method="upwind"), ValueError, "method"),
        (lambda: score(jnp.ones((4, 4)), boundary="periodic"), ValueError, "boundary"),
        (lambda: score(jnp.ones((4, 4)), h=0.0), ValueError, "h must"),
        (lambda: score(jnp.ones((4, 4)), h=float("nan")), ValueError, "h must"),
        (lambda: score(jnp.ones((4,))), ValueError, r"\[..., H, W\]"),
        (lambda: score(jnp.ones((1, 4))), ValueError, "H, W >= 2"),
        (lambda: score(jnp.ones((4, 4), jnp.int32)), TypeError, "floating"),
        (lambda: score(jnp.ones((4, 4)), method="paper_b", boundary="reflect"), ValueError, "boundary"),
        (lambda: scalar_score(jnp.ones((3, 4, 4))), ValueError, "2, H, W"),
        (lambda: scalar_score(jnp.ones((2, 4, 4)), "z"), ValueError, "component"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("h", [jnp.asarray(-1.0), np.float32(0.0), np.float64(np.nan), jnp.asarray(np.inf),
                               np.asarray(-0.5)])
def test_array_scalar_h_is_checked(h):
    """A NumPy/JAX scalar h <= 0 (or NaN/inf) is refused like a Python float; it used to give a
    sign-flipped or infinite score. A traced h stays unchecked (no error under jit)."""
    with pytest.raises(ValueError, match="h must be a finite grid spacing > 0, got"):
        score(jnp.ones((4, 4)), h=h)
    with pytest.raises(ValueError, match="h must be a scalar"):
        score(jnp.ones((4, 4)), h=jnp.ones(2))
    s = jax.jit(lambda h: score(jnp.ones((4, 4)), h=h))(h)  # traced: not inspected
    assert s.shape == (2, 4, 4)
    np.testing.assert_allclose(score(jnp.ones((4, 4)), h=np.float32(0.5)), score(jnp.ones((4, 4)), h=0.5))
