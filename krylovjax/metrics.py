"""Image-quality metrics: windowed SSIM, PSNR, MSE and Paper A's global SSIM.

All functions take two image batches ``a`` and ``b`` of shape ``[B, C, H, W]`` (the library's
layout; values in ``[0, data_range]``, checked for concrete inputs unless
``check_range=False``; ``mse`` takes any values), float32 or float64, and return one value per
image, shape ``[B]``, in the floating dtype of the inputs (an empty batch, ``B = 0``, gives an
empty ``[0]`` result). The numerical cores are jitted; the
public wrappers check shapes and dtypes first (and, for concrete arrays, NaN / Inf), so they can
also be called inside other jitted code, where only the static checks run.

Relation to scikit-image (Paper B's code scores with "skimage SSIM with ``data_range=1``",
method.md section 6, that is scikit-image's default window, :func:`ssim`'s ``window="uniform"``):

* :func:`ssim` (the default ``window="gaussian"``, Wang et al.'s and dm_pix's form, which the
  experiments use) equals ``skimage.metrics.structural_similarity(a_i, b_i, data_range=L,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0)`` for each
  image ``i``. Both use the same 11-tap Gaussian (radius ``int(3.5 * 1.5 + 0.5) = 5``, sigma 1.5,
  normalised), ``c1 = (0.01 L)^2``, ``c2 = (0.03 L)^2``, population (co)variances, and the mean
  of the SSIM map over channels and over the pixels at least 5 from every border. Border
  handling differs in form but not in value: scikit-image filters the whole image with
  ``mode='reflect'`` and then crops the 5-pixel border, while ``dm_pix`` uses a "valid"
  convolution that never touches the border; the retained pixels see exactly the same
  neighbourhoods. The only remaining difference is that ``dm_pix`` clamps local variances to at
  least ``float32.eps**2`` and local covariances to ``sqrt(var_a * var_b)`` (guards against
  round-off), which changes results only at round-off level: measured agreement is about
  1e-15 in float64 and 1e-6 in float32 (see tests/test_metrics.py). It is not the same number as
  the uniform window's: on the built-in cat photo at 32x32 with noise 0.02 / 0.05 / 0.1 (numpy
  seed 0, clipped) it gives 0.962 / 0.815 / 0.558 where the uniform window gives 0.966 / 0.829 /
  0.576 (on a coffee-cup photo the order can turn).
* ``ssim(..., window="uniform")`` equals scikit-image's default,
  ``structural_similarity(a_i, b_i, data_range=L, channel_axis=0)``: a 7x7 uniform window,
  sample (co)variances (``N / (N - 1)``, ``N = 49``), the mean over the pixels at least 3 from
  every border.
* :func:`psnr` equals ``skimage.metrics.peak_signal_noise_ratio(a_i, b_i, data_range=L)``,
  ``10 log10(L^2 / MSE)``; identical images give ``+inf`` (as scikit-image, which also warns
  about the division by zero).
* :func:`mse` equals ``skimage.metrics.mean_squared_error``.
* :func:`global_ssim` is Paper A's single, non-windowed SSIM used for early stopping
  (method.md section 6).
* :func:`estimate_noise` is not a comparison but a measurement of one image: the standard
  deviation of its Gaussian noise (``experiments.restore --noise_std=auto``).
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from krylovjax._checks import channels_last_hint, check_finite, check_float, is_concrete

__all__ = ["ssim", "psnr", "mse", "global_ssim", "estimate_noise", "SSIM_FILTER_SIZE", "SSIM_FILTER_SIGMA",
           "SSIM_WINDOWS"]

#: Gaussian window of the windowed SSIM (Wang et al. 2004; scikit-image with gaussian_weights).
SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: scikit-image's default window (``win_size=7``, uniform, sample covariances).
SSIM_UNIFORM_SIZE = 7
SSIM_WINDOWS = ("gaussian", "uniform")

_GLOBAL_SSIM_VARIANTS = ("consistent", "a_code")


def _check_pair(a, b, *, min_size: int = 1):
    """Validate a pair of image batches; return them as jax arrays of a common float dtype."""
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}; convert it, "
                            f"{name}.astype(jnp.float32) with data_range=255 for 8-bit values (65535 for 16-bit), or "
                            "divided by that for [0, 1]")
        check_float(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name}: expected an image batch of shape [B, C, H, W], got shape {tuple(x.shape)}")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"b: expected the same shape as a {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    _, _, h, w = a.shape
    if h < min_size or w < min_size:
        raise ValueError(
            f"a: images must be at least {min_size}x{min_size} pixels for the "
            f"{min_size}x{min_size} SSIM window, got H={h}, W={w}" + channels_last_hint(a.shape)
        )
    check_finite("a", a)
    check_finite("b", b)
    dtype = jnp.result_type(a.dtype, b.dtype)
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _check_range(a, b, data_range: float, check_range: bool) -> None:
    """Concrete images must lie in ``[0, data_range]`` (up to 1e-6 of it, for rounding):
    scored on the wrong range (images in [0, 255] with the default ``data_range=1``) PSNR and
    SSIM are numbers without meaning. ``check_range=False`` scores values outside as they are
    (e.g. a noisy input before clipping)."""
    if not check_range:
        return
    slack = 1e-6 * data_range
    for name, x in (("a", a), ("b", b)):
        if not is_concrete(x) or x.size == 0:
            continue
        with jax.ensure_compile_time_eval():
            lo, hi = np.asarray(jnp.stack([jnp.min(x), jnp.max(x)])).tolist()  # one transfer
        if lo < -slack or hi > data_range + slack:
            raise ValueError(
                f"{name}: expected values in [0, data_range] = [0, {data_range:g}], got [{lo:.4g}, "
                f"{hi:.4g}]; pass the images' range as data_range (255 for 8-bit values), or "
                "check_range=False to score them as they are")


def _check_data_range(data_range) -> float:
    try:
        value = float(data_range)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(f"data_range: expected a positive Python number, got {data_range!r}") from err
    if not value > 0 or value == float("inf"):
        raise ValueError(f"data_range: expected a finite value > 0, got {data_range!r}")
    return value


@functools.partial(jax.jit, static_argnames=("data_range",))
def _ssim(a, b, data_range):
    # dm_pix works channels-last: [B, H, W, C].
    a_nhwc = jnp.transpose(a, (0, 2, 3, 1))
    b_nhwc = jnp.transpose(b, (0, 2, 3, 1))
    return dm_pix.ssim(
        a_nhwc,
        b_nhwc,
        max_val=data_range,
        filter_size=SSIM_FILTER_SIZE,
        filter_sigma=SSIM_FILTER_SIGMA,
        k1=SSIM_K1,
        k2=SSIM_K2,
    ).astype(a.dtype)  # dm_pix's filter is float64 when x64 is on; keep the input dtype


@functools.partial(jax.jit, static_argnames=("data_range",))
def _ssim_uniform(a, b, data_range):
    """scikit-image's default SSIM: 7x7 mean filter ("valid": the map's pixels at least 3 from
    the border, which skimage's reflect-padded filter then crops), sample (co)variances."""
    n = SSIM_UNIFORM_SIZE

    def mean7(x):  # separable box filter over H and W, valid part only
        x = sum(x[:, :, i:x.shape[2] - n + 1 + i, :] for i in range(n)) / n
        return sum(x[:, :, :, j:x.shape[3] - n + 1 + j] for j in range(n)) / n

    mu_a, mu_b = mean7(a), mean7(b)
    norm = n * n / (n * n - 1.0)
    var_a = norm * (mean7(a * a) - mu_a * mu_a)
    var_b = norm * (mean7(b * b) - mu_b * mu_b)
    cov = norm * (mean7(a * b) - mu_a * mu_b)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(smap, axis=(1, 2, 3))


def ssim(a, b, *, data_range: float = 1.0, check_range: bool = True, window: str = "gaussian"):
    """Windowed structural similarity (Wang et al. 2004), one value per image.

    ``window="gaussian"`` (default): a Gaussian window (11 taps, sigma 1.5), ``c1 = (0.01 L)^2``,
    ``c2 = (0.03 L)^2``, population covariances, averaged over channels and over the pixels at
    least 5 from the border (scikit-image with ``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False``; see the module docstring for the round-off level difference).
    ``window="uniform"``: scikit-image's default, a 7x7 mean window with sample covariances, the
    pixels at least 3 from the border: the SSIM Paper B's code reports (method.md section 6). On
    noisy photos the Gaussian form usually gives the lower value (module docstring); the
    experiments score with it.

    Args:
      a: images ``[B, C, H, W]``, float32/float64, ``H, W >= 11`` (``>= 7`` for the uniform
        window).
      b: images ``[B, C, H, W]``, same shape as ``a``.
      data_range: ``L``, the dynamic range of the data (1 for images in ``[0, 1]``).
      check_range: refuse concrete images outside ``[0, L]`` (default); False scores them as
        they are.
      window: ``"gaussian"`` or ``"uniform"``.

    Returns:
      ``[B]`` mean SSIM per image, in ``(-1, 1]``; 1 for identical images; an empty ``[0]``
      array for an empty batch (``B = 0``), as the other metrics.

    Raises:
      ValueError: wrong rank, mismatched shapes, images smaller than the window, NaN/Inf in a
        concrete input, ``data_range <= 0``, or another ``window``.
      TypeError: a non-floating dtype.
    """
    if window not in SSIM_WINDOWS:
        raise ValueError(f"window: expected one of {SSIM_WINDOWS}, got {window!r}")
    a, b = _check_pair(a, b, min_size=SSIM_FILTER_SIZE if window == "gaussian" else SSIM_UNIFORM_SIZE)
    data_range = _check_data_range(data_range)
    _check_range(a, b, data_range, check_range)
    if a.shape[0] == 0:  # dm_pix divides by the batch size
        return jnp.zeros((0,), a.dtype)
    return (_ssim if window == "gaussian" else _ssim_uniform)(a, b, data_range)


@jax.jit
def _mse(a, b):
    return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))


def mse(a, b):
    """Mean squared error per image: ``mean_{c,i,j} (a - b)^2``.

    Args:
      a, b: images ``[B, C, H, W]``, float32/float64, same shape.

    Returns:
      ``[B]`` mean squared error per image.
    """
    a, b = _check_pair(a, b)
    return _mse(a, b)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(a, b, data_range):
    err = _mse(a, b)
    # 10 log10(L^2 / mse); mse == 0 gives +inf, as scikit-image.
    return 10.0 * (2.0 * jnp.log10(jnp.asarray(data_range, err.dtype)) - jnp.log10(err))


def psnr(a, b, *, data_range: float = 1.0, check_range: bool = True):
    """Peak signal-to-noise ratio in dB per image: ``10 log10(L^2 / MSE)``.

    Args:
      a, b: images ``[B, C, H, W]``, float32/float64, same shape.
      data_range: ``L``, the dynamic range of the data (1 for images in ``[0, 1]``).
      check_range: refuse concrete images outside ``[0, L]`` (default); False scores them as
        they are.

    Returns:
      ``[B]`` PSNR in decibels; ``+inf`` where the two images are identical.
    """
    a, b = _check_pair(a, b)
    data_range = _check_data_range(data_range)
    _check_range(a, b, data_range, check_range)
    return _psnr(a, b, data_range)


@functools.partial(jax.jit, static_argnames=("data_range", "variant"))
def _global_ssim(a, b, data_range, variant):
    n = a.shape[1] * a.shape[2] * a.shape[3]
    x = a.reshape(a.shape[0], n)
    y = b.reshape(b.shape[0], n)
    mu_x = jnp.mean(x, axis=1)
    mu_y = jnp.mean(y, axis=1)
    dx = x - mu_x[:, None]
    dy = y - mu_y[:, None]
    var_x = jnp.mean(dx * dx, axis=1)
    var_y = jnp.mean(dy * dy, axis=1)
    cov_xy = jnp.sum(dx * dy, axis=1)
    # "a_code": np.var (divides by n) but np.cov (divides by n - 1), as in Paper A's script.
    cov_xy = cov_xy / (n - 1 if variant == "a_code" else n)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def global_ssim(a, b, *, data_range: float = 1.0, variant: str = "consistent",
                check_range: bool = True):
    """Paper A's single global (non-windowed) SSIM per image (method.md section 6).

    With all ``C*H*W`` values of an image pooled::

        SSIM = (2 mu_a mu_b + c1)(2 cov_ab + c2) / ((mu_a^2 + mu_b^2 + c1)(var_a + var_b + c2)),
        c1 = (0.01 L)^2, c2 = (0.03 L)^2.

    ``variant="consistent"`` (default) uses population variance and covariance (divide by
    ``n``), so identical images give exactly 1. ``variant="a_code"`` reproduces Paper A's script
    literally: ``np.var`` (divide by ``n``) for the variances but ``np.cov`` (divide by
    ``n - 1``) for the covariance, so identical images give slightly more than 1. Paper A clips
    both images to ``[0, 1]`` before calling it; that is left to the caller.

    Args:
      a, b: images ``[B, C, H, W]``, float32/float64, same shape, ``C*H*W >= 2``.
      data_range: ``L``.
      variant: ``"consistent"`` or ``"a_code"``.
      check_range: refuse concrete images outside ``[0, L]`` (default); False scores them as
        they are.

    Returns:
      ``[B]`` global SSIM per image.
    """
    if variant not in _GLOBAL_SSIM_VARIANTS:
        raise ValueError(f"variant: expected one of {_GLOBAL_SSIM_VARIANTS}, got {variant!r}")
    a, b = _check_pair(a, b)
    if a.shape[1] * a.shape[2] * a.shape[3] < 2:
        raise ValueError(f"a: expected at least 2 values per image, got shape {tuple(a.shape)}")
    data_range = _check_data_range(data_range)
    _check_range(a, b, data_range, check_range)
    return _global_ssim(a, b, data_range, variant)


def estimate_noise(images) -> np.ndarray:
    """Each image's Gaussian noise standard deviation ``[B]`` (float64, numpy), Donoho's wavelet
    estimate: the median absolute value of the finest diagonal (HH) Haar coefficients
    ``(a - b - c + d) / 2`` of the 2x2 blocks, divided by 0.6745 (the median of ``|N(0, 1)|``),
    averaged over the channels (an odd last row or column is left out).

    Haar's orthonormal HH coefficient of i.i.d. noise has the noise's variance, and it cancels any
    image content of the form ``f(row) + g(column)``; edges and texture bias it upwards (on the
    built-in colour photos at 64x64 by up to 23 % at noise 0.05 and 64 % at 0.02; gray ones 30 %
    and 135 %), and a clamp to
    [0, 1] that removed noise biases it downwards. A patch-PCA estimate is far less biased on
    i.i.d. colour noise but fails on noise correlated between the channels, as camera noise is
    (``experiments/study_noise_estimate.py``, BUILD_NOTES.md).

    Args:
      images: ``[B, C, H, W]`` real array (numpy or JAX, concrete), ``H, W >= 2``, finite.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"images: expected a real array, got dtype {x.dtype}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"images: expected H, W >= 2, got shape {x.shape}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("images: contain NaN or Inf")
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = x[:, :, :h, :w]
    hh = (x[:, :, 0::2, 0::2] - x[:, :, 0::2, 1::2] - x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) / 2.0
    return np.median(np.abs(hh), axis=(2, 3)).mean(axis=1) / 0.6744897501960817
