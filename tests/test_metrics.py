"""Metrics against independent references: scikit-image SSIM/PSNR/MSE and a numpy global SSIM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.metrics as skm

from krylovjax import metrics

# Achieved: |ours - skimage| ~ 1e-16 (float64); ~ 1e-7 (float32, x64 off). Asserted with margin.
SSIM_TOL_F64 = 1e-10
SSIM_TOL_F32 = 1e-5
PSNR_RTOL_F64 = 1e-10
PSNR_RTOL_F32 = 1e-6


def _sk_ssim(a, b, data_range=1.0):
    return np.array(
        [
            skm.structural_similarity(
                a[i], b[i], data_range=data_range, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, channel_axis=0,
            )
            for i in range(a.shape[0])
        ]
    )


def _sk_psnr(a, b, data_range=1.0):
    return np.array([skm.peak_signal_noise_ratio(a[i], b[i], data_range=data_range) for i in range(a.shape[0])])


def _random_pair(seed, shape, noise=0.1):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + noise * rng.standard_normal(shape), 0.0, 1.0)
    return a, b


def _photos(size=64):
    """Real photographs shipped with scikit-image (offline), as [B, 3, size, size] in [0, 1]."""
    imgs = []
    for name in ("astronaut", "coffee", "chelsea"):
        im = getattr(skimage.data, name)().astype(np.float64) / 255.0
        h, w, _ = im.shape
        s = min(h, w)
        im = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        step = s // size
        im = im[: step * size: step, : step * size: step][:size, :size]
        imgs.append(np.transpose(im, (2, 0, 1)))
    return np.stack(imgs)


@pytest.mark.parametrize("shape", [(3, 3, 32, 40), (2, 1, 11, 17), (2, 2, 64, 64)])
def test_ssim_matches_skimage_random(shape):
    a, b = _random_pair(0, shape)
    ours = np.asarray(metrics.ssim(jnp.asarray(a), jnp.asarray(b)))
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours, _sk_ssim(a, b), rtol=0, atol=SSIM_TOL_F64)


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_ssim_psnr_match_skimage_on_noisy_photos(noise):
    clean = _photos()
    rng = np.random.default_rng(1)
    noisy = np.clip(clean + noise * rng.standard_normal(clean.shape), 0.0, 1.0)
    ours = np.asarray(metrics.ssim(clean, noisy))
    ref = _sk_ssim(clean, noisy)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=SSIM_TOL_F64)
    # the SSIM must actually drop with the noise level (guards against a constant output)
    assert np.all(ref < 0.999)
    np.testing.assert_allclose(np.asarray(metrics.psnr(clean, noisy)), _sk_psnr(clean, noisy), rtol=PSNR_RTOL_F64)
    np.testing.assert_allclose(
        np.asarray(metrics.mse(clean, noisy)),
        [skm.mean_squared_error(clean[i], noisy[i]) for i in range(3)],
        rtol=1e-12,
    )


@pytest.mark.parametrize("shape", [(3, 3, 32, 40), (2, 1, 7, 9), (2, 2, 64, 64)])
def test_uniform_window_ssim_is_scikit_images_default(shape):
    """``window="uniform"`` is ``structural_similarity``'s default (7x7 mean, sample covariances):
    the SSIM Paper B's code reports; it differs from the Gaussian form by far more than round-off."""
    a, b = _random_pair(3, shape)
    ours = np.asarray(metrics.ssim(a, b, window="uniform"))
    ref = np.array([skm.structural_similarity(a[i], b[i], data_range=1.0, channel_axis=0) for i in range(shape[0])])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=SSIM_TOL_F64)
    clean = _photos(32)
    noisy = np.clip(clean + 0.05 * np.random.default_rng(4).standard_normal(clean.shape), 0.0, 1.0)
    uni, gau = np.asarray(metrics.ssim(clean, noisy, window="uniform")), np.asarray(metrics.ssim(clean, noisy))
    np.testing.assert_allclose(uni, [skm.structural_similarity(clean[i], noisy[i], data_range=1.0, channel_axis=0)
                                     for i in range(3)], rtol=0, atol=SSIM_TOL_F64)
    assert np.max(np.abs(uni - gau)) > 5e-3  # two different metrics (cat 0.975 against 0.966)
    # float32, x64 off: as close as the Gaussian form
    with jax.enable_x64(False):
        f32 = np.asarray(metrics.ssim(clean.astype(np.float32), noisy.astype(np.float32), window="uniform"))
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, uni, rtol=0, atol=SSIM_TOL_F32)
    with pytest.raises(ValueError, match=r"^window: expected one of \('gaussian', 'uniform'\), got 'box'"):
        metrics.ssim(a, b, window="box")
    with pytest.raises(ValueError, match=r"^a: .*7x7 SSIM window"):
        metrics.ssim(a[:, :, :6], b[:, :, :6], window="uniform")


def test_data_range_other_than_one():
    a, b = _random_pair(2, (2, 3, 24, 24))
    a, b = 255.0 * a, 255.0 * b
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, b, data_range=255.0)), _sk_ssim(a, b, 255.0), atol=SSIM_TOL_F64)
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, b, data_range=255.0)), _sk_psnr(a, b, 255.0), rtol=PSNR_RTOL_F64)


def test_float32_without_x64():
    a, b = _random_pair(3, (2, 3, 32, 32))
    ref_ssim, ref_psnr = _sk_ssim(a, b), _sk_psnr(a, b)
    with jax.enable_x64(False):
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        s = metrics.ssim(a32, b32)
        p = metrics.psnr(a32, b32)
        g = metrics.global_ssim(a32, b32)
        assert s.dtype == p.dtype == g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s), ref_ssim, atol=SSIM_TOL_F32)
        np.testing.assert_allclose(np.asarray(p), ref_psnr, rtol=PSNR_RTOL_F32)


def test_float32_inputs_keep_dtype_with_x64():
    a, b = _random_pair(4, (1, 3, 16, 16))
    s = metrics.ssim(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(s), _sk_ssim(a, b), atol=SSIM_TOL_F32)


def _numpy_global_ssim(x, y, L=1.0, cov_ddof=0):
    x, y = x.ravel(), y.ravel()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cxy = np.cov(x, y, ddof=cov_ddof)[0, 1]
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_global_ssim_matches_numpy_formula():
    a, b = _random_pair(5, (3, 3, 20, 12), noise=0.2)
    ours = np.asarray(metrics.global_ssim(a, b, check_range=False))
    np.testing.assert_allclose(ours, [_numpy_global_ssim(a[i], b[i]) for i in range(3)], rtol=1e-12)
    # Paper A's script: np.var (ddof 0) with np.cov (ddof 1)
    lit = np.asarray(metrics.global_ssim(a, b, variant="a_code", check_range=False))
    np.testing.assert_allclose(lit, [_numpy_global_ssim(a[i], b[i], cov_ddof=1) for i in range(3)], rtol=1e-12)
    assert np.all(lit != ours)
    g255 = np.asarray(metrics.global_ssim(7 * a, 7 * b, data_range=7.0, check_range=False))
    np.testing.assert_allclose(g255, ours, rtol=1e-12)  # scale invariant when L scales too
    # a shifted image is penalised in luminance only: closed form with zero-variance difference
    shifted = np.asarray(metrics.global_ssim(a, a + 0.1, check_range=False))
    mx = a.reshape(3, -1).mean(1)
    my = mx + 0.1
    c1 = 1e-4
    np.testing.assert_allclose(shifted, (2 * mx * my + c1) / (mx**2 + my**2 + c1), rtol=1e-12)


def test_identical_images():
    a, _ = _random_pair(6, (2, 3, 16, 16))
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(metrics.global_ssim(a, a)), 1.0, atol=1e-12)
    assert np.all(np.isposinf(np.asarray(metrics.psnr(a, a))))
    np.testing.assert_array_equal(np.asarray(metrics.mse(a, a)), 0.0)


def test_metrics_under_jit_and_vmap_free_batching():
    a, b = _random_pair(7, (4, 1, 16, 16))
    jitted = jax.jit(lambda x, y: (metrics.ssim(x, y), metrics.psnr(x, y), metrics.global_ssim(x, y)))
    s, p, g = jitted(a, b)
    np.testing.assert_allclose(np.asarray(s), _sk_ssim(a, b), atol=SSIM_TOL_F64)
    np.testing.assert_allclose(np.asarray(p), _sk_psnr(a, b), rtol=PSNR_RTOL_F64)
    # batching is independent: each entry equals the single-image call
    for i in range(4):
        np.testing.assert_allclose(np.asarray(metrics.ssim(a[i:i + 1], b[i:i + 1]))[0], np.asarray(s)[i], atol=1e-14)
        np.testing.assert_allclose(np.asarray(metrics.global_ssim(a[i:i + 1], b[i:i + 1]))[0], np.asarray(g)[i], rtol=1e-14)


@pytest.mark.parametrize("fn", [metrics.ssim, metrics.psnr, metrics.mse, metrics.global_ssim])
def test_bad_inputs(fn):
    a, b = _random_pair(8, (2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"^b: .*shape"):
        fn(a, b[:, :, :15])
    with pytest.raises(ValueError, match=r"^a: .*\[B, C, H, W\]"):
        fn(a[0], b[0])
    with pytest.raises(TypeError, match=r"^a: .*floating"):
        fn((a * 255).astype(np.uint8), b)
    bad = b.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^b: .*NaN"):
        fn(a, bad)


def test_integer_and_channels_last_images_are_refused_with_the_fix():
    """(A walkthrough.) ``ssim(uint8, uint8, data_range=255)`` said only "expected a
    floating-point array"; a channels-last batch said only "got H=16, W=3"."""
    a = np.random.default_rng(1).uniform(size=(2, 3, 16, 16))
    u8 = (a * 255).astype(np.uint8)
    with pytest.raises(TypeError, match=r"a: expected a floating-point array, got dtype uint8; convert it, "
                                        r"a.astype\(jnp.float32\) with data_range=255 for 8-bit values"):
        metrics.ssim(u8, u8, data_range=255)
    ok = metrics.ssim(u8.astype(np.float32), (a * 255).astype(np.float32), data_range=255)
    assert np.all(np.asarray(ok) > 0.99)
    with pytest.raises(ValueError, match=r"got H=16, W=3; it looks channels-last \[B, H, W, C\]"):
        metrics.ssim(a.transpose(0, 2, 3, 1), a.transpose(0, 2, 3, 1))


def test_bad_data_range_and_small_images():
    a, b = _random_pair(9, (1, 1, 16, 16))
    for fn in (metrics.ssim, metrics.psnr, metrics.global_ssim):
        with pytest.raises(ValueError, match="data_range"):
            fn(a, b, data_range=0.0)
        with pytest.raises(ValueError, match="data_range"):
            fn(a, b, data_range=-1.0)
    with pytest.raises(ValueError, match=r"^a: .*11x11"):
        metrics.ssim(a[:, :, :10], b[:, :, :10])
    with pytest.raises(ValueError, match="variant"):
        metrics.global_ssim(a, b, variant="windowed")


def test_empty_batch_gives_an_empty_result():
    z = np.zeros((0, 1, 16, 16))
    for fn in (metrics.ssim, metrics.psnr, metrics.mse, metrics.global_ssim):
        out = fn(z, z)
        assert out.shape == (0,) and out.dtype == z.dtype
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(z, z, data_range=0.0)


def test_values_outside_the_data_range_are_refused_unless_asked():
    """8-bit values scored with the default data_range=1 gave ~0 dB (48 dB is right)."""
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(1, 1, 16, 16)) * 255
    b = np.clip(a + 1.0, 0, 255)
    for fn in (metrics.psnr, metrics.ssim, metrics.global_ssim):
        with pytest.raises(ValueError, match=r"a: expected values in \[0, data_range\] = \[0, 1\]"):
            fn(a, b)
        with pytest.raises(ValueError, match="b: expected values in"):
            fn(a / 255, b)
        ok = fn(a, b, data_range=255.0)
        assert np.all(np.isfinite(np.asarray(ok)))
        fn(a, b, check_range=False)                   # scored as they are, on request
    assert float(metrics.psnr(a, b, data_range=255.0)[0]) > 45
    # rounding above 1 is tolerated, and traced values are not inspected
    c = np.full((1, 1, 16, 16), 1.0 + 1e-9)
    metrics.psnr(c, np.ones_like(c))
    jax.jit(lambda x: metrics.psnr(x, x))(jnp.asarray(a))


def test_estimate_noise_checks_its_input_and_reads_pure_noise():
    from krylovjax.metrics import estimate_noise

    rng = np.random.default_rng(4)
    np.testing.assert_allclose(estimate_noise(0.05 * rng.standard_normal((3, 2, 64, 64))), 0.05, rtol=0.08)
    with pytest.raises(ValueError, match=r"images: expected \[B, C, H, W\], got shape \(64, 64\)"):
        estimate_noise(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="images: expected H, W >= 2"):
        estimate_noise(np.zeros((1, 1, 1, 8)))
    with pytest.raises(ValueError, match="images: contain NaN or Inf"):
        estimate_noise(np.full((1, 1, 4, 4), np.nan))
    with pytest.raises(TypeError, match="images: expected a real array, got dtype complex128"):
        estimate_noise(np.zeros((1, 1, 4, 4), complex))
