"""Tests for krylovjax.initial: scipy gaussian_kde replicas, normalisation, degeneracies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from krylovjax import data as D
from krylovjax import initial as I


@pytest.fixture(scope="module")
def photos():
    """Real photographs (skimage), 20 x 20, float64 [3, 3, 20, 20]."""
    return np.stack([D.builtin_image(n, 20) for n in ("astronaut", "coffee", "chelsea")]).astype(np.float64)


def _scipy_paper_b(channel):
    pts = np.stack([channel.T.ravel(), channel.ravel()])  # (I[k, j], I[j, k]) at flat j*R + k
    return stats.gaussian_kde(pts).logpdf(pts).reshape(channel.shape)


def test_paper_b_kde_equals_scipy_on_real_images(photos):
    m = np.asarray(I.paper_b_kde(photos))
    assert m.shape == photos.shape and m.dtype == np.float64
    for b in range(photos.shape[0]):
        for c in range(3):
            np.testing.assert_allclose(m[b, c], _scipy_paper_b(photos[b, c]), rtol=0, atol=1e-10)


def test_paper_b_kde_chunking_and_float32(photos):
    m = np.asarray(I.paper_b_kde(photos))
    small_chunks = np.asarray(I.paper_b_kde(photos, chunk_elems=777))  # many uneven lax.map steps
    np.testing.assert_allclose(small_chunks, m, rtol=0, atol=1e-12)
    m32 = I.paper_b_kde(photos.astype(np.float32))
    assert m32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(m32), m, rtol=0, atol=1e-4)


def test_kde_integrates_to_one_over_value_plane(photos):
    channel = photos[0, 1, :12, :12]
    data = np.stack([channel.T.ravel(), channel.ravel()], axis=-1)  # [144, 2]
    h = 4e-3
    ax = np.arange(-0.6, 1.6 + h / 2, h)
    U, V = np.meshgrid(ax, ax, indexing="ij")
    q = np.stack([U.ravel(), V.ravel()], axis=-1)
    lp = np.asarray(I.kde_log_density(jnp.asarray(data), jnp.asarray(q)))
    total = np.exp(lp).sum() * h * h
    assert total == pytest.approx(1.0, abs=1e-6)
    # And the KDE evaluated off-sample agrees with scipy too.
    ref = stats.gaussian_kde(data.T).logpdf(q[::997].T)
    np.testing.assert_allclose(lp[::997], ref, rtol=0, atol=1e-10)


def _numpy_floored_kde(data, queries, min_bw):
    """Independent numpy version of the floored-bandwidth KDE (eigen-floor of Sigma)."""
    n, d = data.shape
    cov = np.cov(data.T) * n ** (-2.0 / (d + 4))
    lam, vec = np.linalg.eigh(cov)
    lam = np.maximum(lam, min_bw**2)
    prec = vec @ np.diag(1 / lam) @ vec.T
    diff = queries[:, None, :] - data[None, :, :]
    quad = np.einsum("qni,ij,qnj->qn", diff, prec, diff)
    return logsumexp(-0.5 * quad, axis=1) - np.log(n) - 0.5 * np.log(np.prod(2 * np.pi * lam))


def test_degenerate_channels_are_finite():
    const = np.full((1, 3, 8, 8), 0.4)
    m = np.asarray(I.paper_b_kde(const))
    np.testing.assert_allclose(m, -np.log(2 * np.pi * 1e-3**2), rtol=1e-12)
    # A symmetric channel puts every (I[k, j], I[j, k]) on the diagonal: rank-1 covariance.
    rng = np.random.default_rng(0)
    a = rng.random((8, 8))
    sym = (a + a.T) / 2
    imgs = np.stack([sym, a, np.full((8, 8), 0.9)])[None]
    m = np.asarray(I.paper_b_kde(imgs, min_bandwidth=2e-3))
    assert np.isfinite(m).all()
    pts = np.stack([sym.T.ravel(), sym.ravel()], axis=-1)
    np.testing.assert_allclose(m[0, 0].ravel(), _numpy_floored_kde(pts, pts, 2e-3), rtol=1e-10)
    np.testing.assert_allclose(m[0, 1], _scipy_paper_b(a), atol=1e-10)  # untouched by the floor


def test_paper_a_kde_matches_scipy_and_integrates_to_one(photos):
    key = jax.random.PRNGKey(3)
    imgs = photos[:2, :, :, :16]  # non-square H=20, W=16
    m = np.asarray(I.paper_a_kde(imgs, key, num_samples=500))
    assert m.shape == imgs.shape and m.dtype == np.float64
    np.testing.assert_array_equal(m[:, 0], m[:, 1])
    np.testing.assert_array_equal(m[:, 0], m[:, 2])
    H, W = 20, 16
    dy, dx = 1 / (H - 1), 1 / (W - 1)
    np.testing.assert_allclose(np.exp(m[:, 0]).sum(axis=(-2, -1)) * dx * dy, 1.0, rtol=1e-12)
    samples = np.asarray(I.paper_a_samples(imgs, key, num_samples=500))
    assert samples.shape == (2, 500, 2)
    Y, X = np.meshgrid(np.arange(H) * dy, np.arange(W) * dx, indexing="ij")
    grid = np.stack([Y.ravel(), X.ravel()])
    for b in range(2):
        lp = np.maximum(stats.gaussian_kde(samples[b].T).logpdf(grid), np.log(1e-10))
        ref = lp - logsumexp(lp) - np.log(dx * dy)
        np.testing.assert_allclose(m[b, 0].ravel(), ref, rtol=0, atol=1e-10)


def test_paper_a_sampling_follows_intensity():
    """Bright block in the top-left of a non-square image: positions and density follow it."""
    H, W = 12, 20
    img = np.zeros((1, 3, H, W))
    img[0, :, :4, :5] = 1.0  # 20 pixels of weight 1.1, 220 of weight 0.1
    key = jax.random.PRNGKey(0)
    n = 4000
    s = np.asarray(I.paper_a_samples(img, key, num_samples=n, jitter=0.0))
    rows = np.rint(s[0, :, 0] * (H - 1)).astype(int)
    cols = np.rint(s[0, :, 1] * (W - 1)).astype(int)
    frac = np.mean((rows < 4) & (cols < 5))
    expected = 20 * 1.1 / (20 * 1.1 + 220 * 0.1)  # 0.5
    assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / n)
    m = np.asarray(I.paper_a_kde(img, key, num_samples=n))
    r, c = np.unravel_index(np.argmax(m[0, 0]), (H, W))
    assert r < 4 and c < 5
    # Deterministic given the key, different for another key.
    np.testing.assert_array_equal(m, np.asarray(I.paper_a_kde(img, key, num_samples=n)))
    assert np.abs(m - np.asarray(I.paper_a_kde(img, jax.random.PRNGKey(1), num_samples=n))).max() > 1e-6


def test_intensity_log_density(photos):
    m = np.asarray(I.intensity_log_density(photos))
    ref = np.log((photos + 1e-3) / (photos + 1e-3).sum(axis=(-2, -1), keepdims=True))
    np.testing.assert_allclose(m, ref, rtol=1e-13)
    np.testing.assert_allclose(np.exp(m).sum(axis=(-2, -1)), 1.0, rtol=1e-13)
    m_h = np.asarray(I.intensity_log_density(photos.astype(np.float32), floor=0.01, h=0.5))
    assert m_h.dtype == np.float32
    np.testing.assert_allclose(np.exp(m_h).sum(axis=(-2, -1)) * 0.25, 1.0, rtol=1e-5)


def test_dispatch(photos):
    x = photos[:1]
    np.testing.assert_array_equal(I.initial_log_density(x), I.paper_b_kde(x))
    np.testing.assert_array_equal(I.initial_log_density(x, "intensity", floor=0.1), I.intensity_log_density(x, floor=0.1))
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(
        I.initial_log_density(x, "paper_a", key=key, num_samples=100), I.paper_a_kde(x, key, num_samples=100)
    )
    with pytest.raises(ValueError, match="method must be one of"):
        I.initial_log_density(x, "histogram")
    with pytest.raises(ValueError, match="key must be given"):
        I.initial_log_density(x, "paper_a_kde")


@pytest.mark.parametrize(
    "images,err,match",
    [
        (np.full((1, 3, 8, 9), 0.5), ValueError, "square"),
        (np.full((3, 8, 8), 0.5), ValueError, "rank 4"),
        (np.full((1, 2, 8, 8), 0.5), ValueError, "C in"),
        (np.full((1, 1, 8, 8), np.nan), ValueError, "finite"),
        (np.full((1, 1, 8, 8), 1.5), ValueError, r"\[0, 1\]"),
        (np.ones((1, 1, 8, 8), np.uint8), TypeError, "floating"),
    ],
)
def test_bad_images(images, err, match):
    with pytest.raises(err, match=match):
        I.paper_b_kde(images)


def test_bad_parameters():
    x = np.full((1, 1, 8, 8), 0.5)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_samples"):
        I.paper_a_kde(x, key, num_samples=1)
    with pytest.raises(ValueError, match="jitter"):
        I.paper_a_kde(x, key, jitter=-1.0)
    with pytest.raises(ValueError, match="floor"):
        I.paper_a_kde(x, key, floor=0.0)
    with pytest.raises(ValueError, match="floor"):
        I.intensity_log_density(x, floor=-1.0)
    with pytest.raises(ValueError, match="min_bandwidth"):
        I.paper_b_kde(x, min_bandwidth=0.0)
    with pytest.raises(ValueError, match="share d"):
        I.kde_log_density(jnp.ones((5, 2)), jnp.ones((3, 3)))


def test_paper_b_kde_128_fits_and_matches_scipy():
    """16,384 points per channel (2.7e8 pairs): chunked evaluation, checked at sampled pixels."""
    img = D.builtin_image("rocket", 128)[None, :1].astype(np.float64)
    m = np.asarray(I.paper_b_kde(img))
    ch = img[0, 0]
    pts = np.stack([ch.T.ravel(), ch.ravel()])
    idx = np.random.default_rng(0).choice(pts.shape[1], 300, replace=False)
    ref = stats.gaussian_kde(pts).logpdf(pts[:, idx])
    np.testing.assert_allclose(m[0, 0].ravel()[idx], ref, rtol=0, atol=1e-10)


def test_kde_refuses_nan_inf_and_other_floats():
    """NaN/inf in data or queries used to give NaN silently; float16 crashed inside LAPACK."""
    data = np.random.default_rng(0).uniform(size=(10, 2))
    with pytest.raises(ValueError, match="data: expected finite values, found NaN or Inf"):
        I.kde_log_density(jnp.full((10, 2), jnp.nan), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="queries: expected finite values, found NaN or Inf"):
        I.kde_log_density(data, np.full((3, 2), np.inf))
    with pytest.raises(TypeError, match="data: expected float32 or float64, got float16"):
        I.kde_log_density(data.astype(np.float16), data)
    with pytest.raises(TypeError, match="queries: expected float32 or float64, got bfloat16"):
        I.kde_log_density(data, jnp.asarray(data, jnp.bfloat16))
    # Traced inputs are not inspected.
    out = jax.jit(lambda q: I.kde_log_density(data, q))(jnp.full((3, 2), jnp.nan))
    assert out.shape == (3,)


def test_kde_no_queries_gives_an_empty_result():
    """q = 0 queries: an empty [..., 0] result (it used to raise ZeroDivisionError)."""
    data = np.random.default_rng(0).uniform(size=(10, 2))
    out = I.kde_log_density(data, jnp.zeros((0, 2)))
    assert out.shape == (0,) and out.dtype == jnp.float64
    assert I.kde_log_density(np.stack([data, data]), np.zeros((2, 0, 2))).shape == (2, 0)


@pytest.mark.parametrize("fn", [I.paper_b_kde, lambda x: I.paper_a_kde(x, jax.random.PRNGKey(0))],
                         ids=["paper_b", "paper_a"])
def test_float16_images_refused(fn):
    with pytest.raises(TypeError, match=r"images must have a floating dtype \(float32/float64\), got float16"):
        fn(np.full((2, 1, 8, 8), 0.5, np.float16))
