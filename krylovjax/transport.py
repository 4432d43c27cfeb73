"""Score embedding: transport the image along the probability flow (method.md 4.1).

x^0 = image and, for n = 1 .. N-1,

    x^n = x^{n-1} + ( f(x^{n-1}, t_n) - g(t_n)^2 / 2 * s^n ) * dt,

with s^n the (scalar) score of the FP solution m^n at time t_n.  This is the
forward Euler step of the probability-flow ODE dx = (f - g^2/2 grad log p) dt
with the drift coefficients and the score taken at the *end* of the step
(t_n), as in Paper B's code (B-code: ``x^n = x^{n-1} - g(t_n)^2/2 s^n dt``):
m^n is the backward-Euler solution at t_n, so the score available for the
step t_{n-1} -> t_n is the one at t_n, consistent with the implicit FP solve.
The initial score s^0 (of m0) is never used.  The printed B-tex formula uses
"a^{n-1}"; method.md 4.1 flags that as a typo.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax._checks import as_int, check_finite, check_positive, is_concrete, is_real
from krylovjax.data import validate_images
from krylovjax.scores import scalar_score

__all__ = ["embed", "paper_a_indices", "EMBED_VARIANTS"]

EMBED_VARIANTS = ("paper_b", "paper_a")


def paper_a_indices(num_times: int, num_embed: int = 10) -> tuple[int, ...]:
    """Time indices Paper A's script embeds: ``round(linspace(1, N-1, K))``.

    Paper A uses 10 indices out of 1..100 (A-code, method.md 4.1); with our N
    time levels 0..N-1 that is the same rule.  Duplicates (K > N-1) are kept
    in order, so the result always has K entries.
    """
    if num_times < 2:
        raise ValueError(f"num_times must be >= 2, got {num_times}")
    if num_embed < 1:
        raise ValueError(f"num_embed must be >= 1, got {num_embed}")
    if num_embed == 1:
        return (num_times - 1,)
    step = (num_times - 2) / (num_embed - 1)
    return tuple(int(math.floor(1 + k * step + 0.5)) for k in range(num_embed))


def embed(
    images,
    scores,
    sde,
    t,
    dt,
    *,
    component: str = "sum",
    variant: str = "paper_b",
    key=None,
    num_embed: int = 10,
    noise_scale: float = 0.1,
) -> jnp.ndarray:
    """Embedded trajectories ``[B, N, C, H, W]`` (``variant="paper_b"``).

    Args:
      images: ``[B, C, H, W]`` in [0, 1] (float32/float64).
      scores: ``[B, C, N, 2, H, W]`` score fields at the times ``t`` (from
        :func:`krylovjax.scores.score`, component 0 = d/dx, 1 = d/dy), finite.
      sde: a :mod:`krylovjax.sde` SDE (``g2``, ``drift``, ``has_zero_drift``).
      t: ``[N]`` time levels (:func:`krylovjax.sde.time_grid`): finite and
        strictly increasing.
      dt: the time step, finite and > 0 (Python float, or a NumPy/JAX scalar).
        The value checks (here and on ``scores``, ``t``, ``images``) apply to
        concrete inputs; traced ones (inside jit) are not inspected.
      component: how the 2-vector score becomes the per-pixel scalar s^n
        (:func:`krylovjax.scores.scalar_score`): "sum" (Paper B: d/dx + d/dy)
        or "x" (Paper A's script) or "y".
      variant:
        ``"paper_b"``: all steps n = 1 .. N-1 of
          x^n = x^{n-1} + (f(x^{n-1}, t_n) - g(t_n)^2/2 s^n) dt  (method.md 4.1),
          returned with x^0 = image as ``[B, N, C, H, W]``.  For zero drift
          (VE, constant) this is a cumulative sum over n; otherwise a
          ``lax.scan``.
        ``"paper_a"``: Paper A's script: only the K = ``num_embed`` indices
          n_k = :func:`paper_a_indices` (N, K) are applied, in order, each as
          x <- clip(x + (f(x, t_{n_k}) - g(t_{n_k})^2/2 s^{n_k}) dt
                    + noise_scale * g(t_{n_k}) sqrt(dt) xi_k, 0, 1),
          with xi = ``jax.random.normal(key, [B, K, C, H, W])``; returns the
          image and the K embedded images, ``[B, K + 1, C, H, W]``.  Needs
          ``key``.  (Paper A uses component="x".)
      key: ``jax.random`` key, required for "paper_a".
      num_embed: K for "paper_a" (Paper A: 10).
      noise_scale: noise factor for "paper_a" (Paper A: 0.1).

    Returns:
      ``[B, N, C, H, W]`` ("paper_b") or ``[B, K + 1, C, H, W]`` ("paper_a"),
      dtype = result type of images and scores.
    """
    if variant not in EMBED_VARIANTS:
        raise ValueError(f"variant must be one of {EMBED_VARIANTS}, got {variant!r}")
    images = jnp.asarray(validate_images(images))
    scores = jnp.asarray(scores)
    B, C, H, W = images.shape
    if scores.ndim != 6 or scores.shape[:2] != (B, C) or scores.shape[3:] != (2, H, W):
        raise ValueError(
            f"scores must have shape [B, C, N, 2, H, W] = [{B}, {C}, N, 2, {H}, {W}], got {scores.shape}"
        )
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"scores must have a floating dtype, got {scores.dtype}")
    N = scores.shape[2]
    t = jnp.asarray(t)
    if t.shape != (N,):
        raise ValueError(f"t must have shape [N] = [{N}] (one time per score level), got {t.shape}")
    if N < 2:
        raise ValueError(f"scores need N >= 2 time levels (x^0 plus one step), got N={N}")
    check_finite("scores", scores)
    check_finite("t", t)
    if is_concrete(t):
        tv = np.asarray(t)
        bad = np.flatnonzero(~(np.diff(tv) > 0))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"t: expected strictly increasing time levels (sde.time_grid), got "
                             f"t[{i + 1}] = {tv[i + 1]} <= t[{i}] = {tv[i]}")
    if jnp.ndim(dt) != 0:
        raise ValueError(f"dt: expected a scalar time step, got shape {jnp.shape(dt)}")
    check_positive("dt", dt)
    if component not in ("sum", "x", "y"):
        raise ValueError(f"component must be one of ('sum', 'x', 'y'), got {component!r}")
    dtype = jnp.result_type(images.dtype, scores.dtype)
    images = images.astype(dtype)
    s = scalar_score(scores.astype(dtype), component)  # [B, C, N, H, W]
    s = jnp.moveaxis(s, 2, 1)  # [B, N, C, H, W]
    t = t.astype(dtype)
    dt = jnp.asarray(dt, dtype)

    if variant == "paper_b":
        return _embed_paper_b(images, s, sde, t, dt)

    if key is None:
        raise ValueError("key must be given (a jax.random key) for variant='paper_a'")
    if not (is_real(noise_scale) and math.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(f"noise_scale must be finite and >= 0, got {noise_scale!r}")
    # an integer (NumPy too): int(2.7) would embed 2 steps without a word
    num_embed = as_int("num_embed", num_embed, 1)
    idx = jnp.asarray(paper_a_indices(N, num_embed))
    xi = jax.random.normal(key, (B, len(idx), C, H, W), dtype)
    return _embed_paper_a(images, s[:, idx], sde, t[idx], dt, xi, float(noise_scale))


def _embed_paper_b(x0, s, sde, t, dt):
    g2 = sde.g2(t).astype(x0.dtype)  # [N]
    if sde.has_zero_drift:
        inc = -0.5 * g2[None, 1:, None, None, None] * s[:, 1:] * dt  # [B, N-1, C, H, W]
        return jnp.concatenate([x0[:, None], x0[:, None] + jnp.cumsum(inc, axis=1)], axis=1)

    def step(x, inp):
        tn, g2n, sn = inp
        x = x + (sde.drift(x, tn).astype(x.dtype) - 0.5 * g2n * sn) * dt
        return x, x

    _, xs = jax.lax.scan(step, x0, (t[1:], g2[1:], jnp.moveaxis(s[:, 1:], 1, 0)))
    return jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)


def _embed_paper_a(x0, s, sde, t, dt, xi, noise_scale):
    g2 = sde.g2(t).astype(x0.dtype)  # [K]
    g = jnp.sqrt(g2)

    def step(x, inp):
        tn, g2n, gn, sn, xin = inp
        x = x + (sde.drift(x, tn).astype(x.dtype) - 0.5 * g2n * sn) * dt
        x = x + noise_scale * gn * jnp.sqrt(dt) * xin
        x = jnp.clip(x, 0.0, 1.0)
        return x, x

    _, xs = jax.lax.scan(step, x0, (t, g2, g, jnp.moveaxis(s, 1, 0), jnp.moveaxis(xi, 1, 0)))
    return jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
