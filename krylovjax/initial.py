"""Initial log-densities m0 = m(., t_0) of the FP problem, one per image and channel.

method.md section 1 ("how the initial condition is obtained from an image")
lists incompatible constructions; all are here, computed in JAX, each returning
``[B, C, H, W]`` in the images' float dtype:

* :func:`paper_b_kde`  Paper B's code (item 2): per image and channel, the
  2-D Gaussian KDE (Scott bandwidth) of the R^2 value pairs (I[k, j], I[j, k])
  evaluated at those same pairs; m0 = log pdf.  What Paper B ran.
* :func:`paper_a_kde`  Paper A's script (item 4): a spatial KDE over the image
  plane [0, 1]^2 from 2,000 pixel positions drawn with probability
  proportional to the mean intensity + 0.1; one density per image shared by
  the channels.
* :func:`intensity_log_density`  a plain normalised-intensity density.

:func:`kde_log_density` is the batched JAX Gaussian KDE underneath (a
replica of ``scipy.stats.gaussian_kde(...).logpdf`` with Scott's factor plus a
documented bandwidth floor), chunked with ``lax.map`` so 128 x 128 images
(16,384^2 pairs per channel) fit in memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax._checks import check_finite, is_float32_or_64
from krylovjax.data import validate_images

__all__ = [
    "kde_log_density",
    "paper_b_kde",
    "paper_a_samples",
    "paper_a_kde",
    "intensity_log_density",
    "initial_log_density",
    "needs_key",
    "INITIAL_METHODS",
]

# Default number of pair terms evaluated per lax.map step (about 16-32 MB of
# temporaries in float64).
_CHUNK_ELEMS = 2**21


def _pairwise_logsumexp(zq: jnp.ndarray, zd: jnp.ndarray, chunk_elems: int) -> jnp.ndarray:
    """out[g, j] = logsumexp_i(-0.5 * ||zq[g, j] - zd[g, i]||^2).

    zq [G, q, d], zd [G, n, d].  The q queries are cut into chunks of
    ``c ~ chunk_elems / n``; the G * ceil(q / c) (group, chunk) tasks run under
    ``lax.map`` with ``batch_size`` tasks vectorised per step, so at most
    about ``chunk_elems`` pair terms are alive at once.
    """
    G, q, d = zq.shape
    n = zd.shape[1]
    if G * q == 0:  # no queries (or no groups): nothing to evaluate
        return jnp.zeros((G, q), zq.dtype)
    c0 = max(1, min(q, chunk_elems // max(n, 1)))
    n_chunks = -(-q // c0)
    c = -(-q // n_chunks)  # balance the chunks to minimise padding
    q_pad = n_chunks * c
    zq = jnp.pad(zq, ((0, 0), (0, q_pad - q), (0, 0)))
    tasks = zq.reshape(G * n_chunks, c, d)
    group = jnp.repeat(jnp.arange(G), n_chunks)
    batch = max(1, chunk_elems // (c * n))

    def one(task):
        gi, qc = task
        pts = zd[gi]  # [n, d]
        # Direct differences (not |a|^2 + |b|^2 - 2ab) keep full relative accuracy.
        diff = qc[:, None, :] - pts[None, :, :]
        return jax.nn.logsumexp(-0.5 * jnp.sum(diff * diff, axis=-1), axis=-1)

    if G * n_chunks == 1:
        out = one((group[0], tasks[0]))[None]
    else:
        out = jax.lax.map(one, (group, tasks), batch_size=min(batch, G * n_chunks))
    return out.reshape(G, q_pad)[:, :q]


def kde_log_density(
    data: jnp.ndarray,
    queries: jnp.ndarray,
    *,
    min_bandwidth: float = 1e-3,
    chunk_elems: int = _CHUNK_ELEMS,
) -> jnp.ndarray:
    """Gaussian KDE log-pdf with Scott's bandwidth, batched over leading axes.

    Replicates ``scipy.stats.gaussian_kde(data.T).logpdf(queries.T)`` (equal
    weights, ``bw_method="scott"``):

      Sigma = cov(data) * n^(-2 / (d + 4))      (unbiased data covariance)
      log p(x) = logsumexp_i(-(x - x_i)^T Sigma^-1 (x - x_i) / 2)
                 - log n - log det(2 pi Sigma) / 2.

    Regularisation (our addition): the eigenvalues of Sigma are floored at
    ``min_bandwidth**2``, i.e. every kernel has std >= ``min_bandwidth`` in
    every direction.  This keeps degenerate data (a constant channel, or
    collinear points such as a symmetric image in :func:`paper_b_kde`) finite
    instead of NaN/inf.  It changes the result only where the Scott kernel is
    narrower than the floor: nearly flat images, e.g. an 8-bit image at one
    level with a tenth of its pixels one level (1/255) brighter has a kernel
    std of about 5e-4, and there m0 differs from scipy's by O(1).  Ordinary
    photographs have kernels far wider than 1e-3 and are untouched.  The
    result is still a normalised density on R^d.

    Args:
      data: ``[..., n, d]`` sample points, n >= 2, float32/float64, finite.
      queries: ``[..., q, d]`` evaluation points, same leading axes, float32/float64,
        finite.  q = 0 gives an empty ``[..., 0]`` result.
      min_bandwidth: kernel std floor (> 0; static).
      chunk_elems: pair terms per ``lax.map`` step (memory bound; static).

    Raises:
      TypeError: a dtype other than float32/float64 (e.g. float16: no LAPACK ``eigh``).
      ValueError: NaN or inf in concrete ``data`` or ``queries`` (traced inputs, inside
        jit, are not inspected); bad shapes.

    Returns:
      ``[..., q]`` log-density, in the inputs' (promoted) dtype.
    """
    for name, x in (("data", data), ("queries", queries)):
        dtype = np.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)
        if not is_float32_or_64(dtype):
            raise TypeError(f"{name}: expected float32 or float64, got {dtype}")
        check_finite(name, x)
    return _kde_log_density(data, queries, min_bandwidth=min_bandwidth, chunk_elems=chunk_elems)


@functools.partial(jax.jit, static_argnames=("min_bandwidth", "chunk_elems"))
def _kde_log_density(data, queries, *, min_bandwidth, chunk_elems):
    """:func:`kde_log_density` after its dtype and value checks (jitted)."""
    data = jnp.asarray(data)
    queries = jnp.asarray(queries)
    dtype = jnp.result_type(data.dtype, queries.dtype)
    if data.ndim < 2 or queries.ndim < 2 or data.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"data [..., n, d] and queries [..., q, d] must share d; got {data.shape}, {queries.shape}"
        )
    if data.shape[:-2] != queries.shape[:-2]:
        raise ValueError(
            f"data and queries must share leading axes; got {data.shape[:-2]} vs {queries.shape[:-2]}"
        )
    n, d = data.shape[-2:]
    if n < 2:
        raise ValueError(f"data needs n >= 2 points for a covariance, got n={n}")
    if not min_bandwidth > 0:
        raise ValueError(f"min_bandwidth must be > 0, got {min_bandwidth}")
    data = data.astype(dtype)
    queries = queries.astype(dtype)
    lead = data.shape[:-2]
    G = math.prod(lead)
    data = data.reshape((G, n, d))
    queries = queries.reshape((G,) + queries.shape[-2:])
    hi = jax.lax.Precision.HIGHEST

    centred = data - jnp.mean(data, axis=1, keepdims=True)
    cov = jnp.einsum("gni,gnj->gij", centred, centred, precision=hi) / (n - 1)
    cov = cov * (float(n) ** (-2.0 / (d + 4)))
    lam, vec = jnp.linalg.eigh(cov)
    lam = jnp.maximum(lam, jnp.asarray(min_bandwidth, dtype) ** 2)
    whiten = jnp.einsum("gik,gk,gjk->gij", vec, lam**-0.5, vec, precision=hi)  # Sigma^{-1/2}
    zd = jnp.einsum("gni,gij->gnj", data, whiten, precision=hi)
    zq = jnp.einsum("gni,gij->gnj", queries, whiten, precision=hi)
    log_norm = -math.log(n) - 0.5 * d * math.log(2 * math.pi) - 0.5 * jnp.sum(jnp.log(lam), axis=-1)
    out = _pairwise_logsumexp(zq, zd, chunk_elems) + log_norm[:, None]
    return out.reshape(lead + (queries.shape[-2],))


def _check_images(images: Any) -> jnp.ndarray:
    return jnp.asarray(validate_images(images))


def paper_b_kde(images, *, min_bandwidth: float = 1e-3, chunk_elems: int = _CHUNK_ELEMS) -> jnp.ndarray:
    """Paper B's initial log-density (method.md section 1, item 2; B-code).

    For each image b and channel c with square channel I = images[b, c] of side
    R, the R^2 points p_{j,k} = (I[k, j], I[j, k]) (pixel value at the
    transposed position, pixel value) are fitted with a 2-D Gaussian KDE
    (Scott's bandwidth, :func:`kde_log_density`) and evaluated at the same
    points:  m0[b, c, j, k] = log KDE_{b,c}(I[k, j], I[j, k]).

    The pairing uses the transpose, so non-square images raise ValueError.
    Degenerate channels (constant, or symmetric I = I^T so all points lie on a
    line) are regularised by the kernel-std floor ``min_bandwidth`` and stay
    finite (a constant channel gives m0 = -log(2 pi min_bandwidth^2)).

    Args:
      images: ``[B, C, H, W]`` float32/float64 in [0, 1], H == W.
      min_bandwidth: kernel std floor, see :func:`kde_log_density`.
      chunk_elems: pair terms per chunk (memory bound).

    Returns:
      ``[B, C, H, W]`` log-density in the images' dtype.
    """
    images = _check_images(images)
    B, C, H, W = images.shape
    if H != W:
        raise ValueError(
            f"images must be square (H == W) for paper_b_kde's transposed pairing, got H={H}, W={W}"
        )
    return _paper_b_kde(images, min_bandwidth=float(min_bandwidth), chunk_elems=int(chunk_elems))


@functools.partial(jax.jit, static_argnames=("min_bandwidth", "chunk_elems"))
def _paper_b_kde(images, *, min_bandwidth, chunk_elems):
    B, C, H, W = images.shape
    u = jnp.swapaxes(images, -1, -2).reshape(B, C, H * W)  # I[k, j] at flat j*R + k
    v = images.reshape(B, C, H * W)  # I[j, k]
    pts = jnp.stack([u, v], axis=-1)
    # The point set is closed under swapping its coordinates (p_{j,k} = swap(p_{k,j})), so its
    # covariance, Scott's kernel and the KDE are swap-symmetric: m0[j, k] = m0[k, j]. Evaluate
    # the upper triangle (j <= k) only and mirror it: (R^2 + R) / 2 queries instead of R^2.
    j, k = np.triu_indices(H)
    half = _kde_log_density(pts, pts[:, :, j * H + k], min_bandwidth=min_bandwidth,
                            chunk_elems=chunk_elems)
    m0 = jnp.zeros((B, C, H, W), half.dtype).at[:, :, j, k].set(half)
    return m0.at[:, :, k, j].set(half)


def _plane_grid(H: int, W: int, dtype) -> jnp.ndarray:
    """[H*W, 2] points (i / (H-1), j / (W-1)) in row-major pixel order."""
    yi = jnp.arange(H, dtype=dtype) / (H - 1)
    xj = jnp.arange(W, dtype=dtype) / (W - 1)
    yy, xx = jnp.meshgrid(yi, xj, indexing="ij")
    return jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1)


def paper_a_samples(
    images, key, num_samples: int = 2000, jitter: float = 0.01, *, offset: float = 0.1
) -> jnp.ndarray:
    """The sample positions of Paper A's spatial KDE, ``[B, num_samples, 2]``.

    Per image: the weight of pixel (i, j) is mean_c images[b, c, i, j] + offset;
    ``num_samples`` pixels are drawn with replacement with probability
    proportional to it (``jax.random.categorical`` with key
    ``split(split(key)[0], B)[b]``), mapped to (i / (H-1), j / (W-1)) in
    [0, 1]^2 and moved by N(0, jitter^2) noise (key ``split(key)[1]``).
    Coordinate 0 is the row (y) position, coordinate 1 the column (x).
    """
    images = _check_images(images)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not (math.isfinite(float(jitter)) and float(jitter) >= 0):
        raise ValueError(f"jitter must be finite and >= 0, got {jitter!r}")
    if not (math.isfinite(float(offset)) and float(offset) > 0):
        raise ValueError(f"offset must be finite and > 0 (keeps every pixel drawable), got {offset!r}")
    return _paper_a_samples(images, key, num_samples, float(jitter), float(offset))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _paper_a_samples(images, key, num_samples, jitter, offset):
    B, C, H, W = images.shape
    dtype = images.dtype
    weights = jnp.mean(images, axis=1) + offset  # [B, H, W]
    logits = jnp.log(weights).reshape(B, H * W)
    k_idx, k_jit = jax.random.split(key)
    keys = jax.random.split(k_idx, B)
    idx = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, shape=(num_samples,)))(keys, logits)
    pos = jnp.stack([(idx // W).astype(dtype) / (H - 1), (idx % W).astype(dtype) / (W - 1)], axis=-1)
    return pos + jitter * jax.random.normal(k_jit, pos.shape, dtype)


def paper_a_kde(
    images,
    key,
    num_samples: int = 2000,
    jitter: float = 0.01,
    *,
    offset: float = 0.1,
    floor: float = 1e-10,
    min_bandwidth: float = 1e-3,
    chunk_elems: int = _CHUNK_ELEMS,
) -> jnp.ndarray:
    """Paper A's initial log-density (method.md section 1, item 4; A-code).

    A spatial density over the image plane [0, 1]^2: a Gaussian KDE (Scott) of
    :func:`paper_a_samples` evaluated on the H x W grid (i / (H-1), j / (W-1)),
    floored at ``floor`` (1e-10) and normalised so that the Riemann sum
    sum_{i,j} p[i, j] * dy * dx = 1 with dy = 1/(H-1), dx = 1/(W-1) (floor
    first, then normalise, so it integrates to exactly one on the grid), then
    logged.  All in log space (logsumexp), so it cannot underflow.

    One density per image, shared by the channels.

    Args:
      images: ``[B, C, H, W]`` in [0, 1].
      key: a ``jax.random`` key.
      num_samples: KDE sample count (Paper A: 2000).
      jitter: std of the position noise (Paper A: 0.01).
      offset: added to the mean intensity before sampling (Paper A: 0.1).
      floor: density floor before normalisation (Paper A: 1e-10).
      min_bandwidth: kernel std floor, see :func:`kde_log_density`.

    Returns:
      ``[B, C, H, W]`` (identical across C) in the images' dtype.
    """
    samples = paper_a_samples(images, key, num_samples, jitter, offset=offset)
    if not (math.isfinite(float(floor)) and float(floor) > 0):
        raise ValueError(f"floor must be finite and > 0, got {floor!r}")
    images = jnp.asarray(images)
    B, C, H, W = images.shape
    return _paper_a_density(
        samples, H, W, C, float(floor), float(min_bandwidth), int(chunk_elems)
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _paper_a_density(samples, H, W, C, floor, min_bandwidth, chunk_elems):
    B = samples.shape[0]
    dtype = samples.dtype
    grid = jnp.broadcast_to(_plane_grid(H, W, dtype), (B, H * W, 2))
    lp = _kde_log_density(samples, grid, min_bandwidth=min_bandwidth, chunk_elems=chunk_elems)
    lp = jnp.maximum(lp, math.log(floor))
    cell = math.log(1.0 / (H - 1)) + math.log(1.0 / (W - 1))
    lp = lp - (jax.nn.logsumexp(lp, axis=-1, keepdims=True) + cell)
    return jnp.broadcast_to(lp.reshape(B, 1, H, W), (B, C, H, W)).astype(dtype)


def intensity_log_density(images, *, floor: float = 1e-3, h: float = 1.0) -> jnp.ndarray:
    """A normalised-intensity log-density, per image and channel.

    p[b, c, i, j] = (images[b, c, i, j] + floor) / (h^2 * sum_{i,j}(images[b, c] + floor)),
    so sum_{i,j} p * h^2 = 1: with the pixel lattice's spacing h = 1 (method.md
    2.3, dh = 1) p sums to one over the grid.  m0 = log p.  ``floor`` > 0 keeps
    black pixels finite.

    Args:
      images: ``[B, C, H, W]`` in [0, 1].
      floor: added to every pixel (> 0).
      h: grid spacing of the FP lattice (> 0).

    Returns:
      ``[B, C, H, W]`` in the images' dtype.
    """
    images = _check_images(images)
    if not (math.isfinite(float(floor)) and float(floor) > 0):
        raise ValueError(f"floor must be finite and > 0, got {floor!r}")
    if not (math.isfinite(float(h)) and float(h) > 0):
        raise ValueError(f"h must be finite and > 0, got {h!r}")
    w = images + jnp.asarray(floor, images.dtype)
    total = jnp.sum(w, axis=(-2, -1), keepdims=True) * (float(h) ** 2)
    return jnp.log(w) - jnp.log(total)


INITIAL_METHODS: dict[str, Callable[..., jnp.ndarray]] = {
    "paper_b_kde": paper_b_kde,
    "paper_b": paper_b_kde,
    "paper_a_kde": paper_a_kde,
    "paper_a": paper_a_kde,
    "intensity": intensity_log_density,
}


def needs_key(method: str) -> bool:
    """Whether ``method`` (a key of :data:`INITIAL_METHODS`) draws random samples, so that
    :func:`initial_log_density` needs ``key=``."""
    return INITIAL_METHODS[method] is paper_a_kde


def initial_log_density(images, method: str = "paper_b_kde", **kwargs: Any) -> jnp.ndarray:
    """Dispatch on a config string; returns ``[B, C, H, W]`` in the images' dtype.

    Args:
      images: ``[B, C, H, W]`` in [0, 1].
      method: "paper_b_kde" (alias "paper_b"), "paper_a_kde" (alias "paper_a";
        needs ``key=``), or "intensity".
      **kwargs: passed to the method.
    """
    if method not in INITIAL_METHODS:
        raise ValueError(f"method must be one of {tuple(INITIAL_METHODS)}, got {method!r}")
    fn = INITIAL_METHODS[method]
    if needs_key(method):
        if kwargs.get("key") is None:
            raise ValueError("key must be given (a jax.random key) for method='paper_a_kde'")
        kwargs = dict(kwargs)
        key = kwargs.pop("key")
        return fn(images, key, **kwargs)
    return fn(images, **kwargs)
