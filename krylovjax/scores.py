"""Scores s = grad m of log-density fields on the pixel lattice (method.md 3.3).

Convention (whole team): ``m`` is ``[..., H, W]``; a score field is
``[..., 2, H, W]`` with component 0 = dm/dx (x along W, the last axis) and
component 1 = dm/dy (y along H).  Grid spacing ``h`` is the same in x and y
(method.md 2.3: dx = dy, ``dh`` in Paper B's configs).

All functions are pure ``jnp`` code (jit/vmap/grad friendly) and keep the
floating dtype of their input.  The values of ``m`` are not inspected (that would
break tracing); shapes, dtypes and option names are, and so is the value of a
concrete (non-traced) grid spacing ``h``.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from krylovjax._checks import is_concrete

__all__ = ["score", "scalar_score", "SCORE_METHODS", "SCORE_BOUNDARIES"]

SCORE_METHODS = ("central", "paper_b")
SCORE_BOUNDARIES = ("zero", "one_sided", "reflect")


def _check_field(m: Any, name: str, min_size: int = 2) -> jnp.ndarray:
    m = jnp.asarray(m)
    if not jnp.issubdtype(m.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {m.dtype}")
    if m.ndim < 2:
        raise ValueError(f"{name} must have shape [..., H, W] (ndim >= 2), got shape {m.shape}")
    if m.shape[-1] < min_size or m.shape[-2] < min_size:
        raise ValueError(
            f"{name} needs H, W >= {min_size} for finite differences, got [H, W] = {list(m.shape[-2:])}"
        )
    return m


def _check_h(h: Any) -> None:
    """``h`` must be a scalar; a concrete one (Python, NumPy or JAX) finite and > 0."""
    if jnp.ndim(h) != 0:
        raise ValueError(f"h must be a scalar grid spacing, got shape {jnp.shape(h)}")
    if is_concrete(h) and not isinstance(h, bool):
        v = float(np.asarray(h))
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"h must be a finite grid spacing > 0, got {v!r}")


def _central_1d(m: jnp.ndarray, axis: int, h, boundary: str) -> jnp.ndarray:
    """Central difference along ``axis`` (negative) with the given border rule."""
    n = m.shape[axis]

    def sl(start, stop):
        idx = [slice(None)] * m.ndim
        idx[axis] = slice(start, stop)
        return m[tuple(idx)]

    interior = (sl(2, n) - sl(0, n - 2)) / (2 * h)  # i = 1 .. n-2
    if boundary == "zero":
        # m = 0 outside the grid: d_0 = (m_1 - 0) / 2h, d_{n-1} = (0 - m_{n-2}) / 2h.
        first = sl(1, 2) / (2 * h)
        last = -sl(n - 2, n - 1) / (2 * h)
    elif boundary == "one_sided":
        # First-order one-sided differences (numpy.gradient, edge_order=1).
        first = (sl(1, 2) - sl(0, 1)) / h
        last = (sl(n - 1, n) - sl(n - 2, n - 1)) / h
    elif boundary == "reflect":
        # Node-centred mirror m_{-1} = m_1, m_n = m_{n-2}: zero normal derivative.
        first = jnp.zeros_like(sl(0, 1))
        last = jnp.zeros_like(sl(0, 1))
    else:  # pragma: no cover - checked by the caller
        raise ValueError(boundary)
    return jnp.concatenate([first, interior, last], axis=axis)


def score(m, *, h=1.0, method: str = "central", boundary: str = "zero") -> jnp.ndarray:
    """Score field s = grad m by finite differences (method.md 3.3).

    Args:
      m: log-density field(s), ``[..., H, W]``, float32 or float64, H, W >= 2.
      h: grid spacing (dx = dy = h), a scalar > 0: Python float or a NumPy/JAX
        scalar array (checked when concrete: ValueError if <= 0, NaN or inf;
        a traced ``h`` is not checked).
      method:
        ``"central"``: second-order central differences
          s_x[i, j] = (m[i, j+1] - m[i, j-1]) / 2h, s_y[i, j] = (m[i+1, j] - m[i-1, j]) / 2h
          in the interior; the border follows ``boundary``.  Summing the two
          components gives Paper B's printed scalar score (B-tex, 3.3).
        ``"paper_b"``: Paper B's code (B-code, 3.3): a 1-D central difference
          along the row-major flattened pixel index k = i W + j,
          s_k = (m_{k+1} - m_{k-1}) / 2h with m = 0 beyond both ends of the flat
          vector, so the last pixel of row i couples to the first of row i+1.
          Returned as component 0; component 1 is 0, so ``scalar_score(s, "sum")``
          is Paper B's scalar score.  Only ``boundary="zero"`` is allowed.
      boundary: border rule for ``"central"``:
        ``"zero"``: m = 0 outside the grid (the papers' zero padding);
        ``"one_sided"``: first-order one-sided differences at the border
          (Paper A's script; equals ``numpy.gradient(m, h, edge_order=1)``);
        ``"reflect"``: zero normal derivative, via the node-centred mirror
          m[-1] = m[1] (``numpy.pad(mode="reflect")``), so the normal component
          is exactly 0 on the border.

    Returns:
      ``[..., 2, H, W]`` in m's dtype: [..., 0, :, :] = dm/dx (along W),
      [..., 1, :, :] = dm/dy (along H).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
    if boundary not in SCORE_BOUNDARIES:
        raise ValueError(f"boundary must be one of {SCORE_BOUNDARIES}, got {boundary!r}")
    _check_h(h)
    m = _check_field(m, "m")
    h = jnp.asarray(h, dtype=m.dtype)
    if method == "paper_b":
        if boundary != "zero":
            raise ValueError(
                f"boundary must be 'zero' for method='paper_b' (m = 0 beyond the flat vector), got {boundary!r}"
            )
        H, W = m.shape[-2:]
        flat = m.reshape(m.shape[:-2] + (H * W,))
        sx = _central_1d(flat, -1, h, "zero").reshape(m.shape)
        return jnp.stack([sx, jnp.zeros_like(sx)], axis=-3)
    sx = _central_1d(m, -1, h, boundary)
    sy = _central_1d(m, -2, h, boundary)
    return jnp.stack([sx, sy], axis=-3)


def scalar_score(s, component: str = "sum") -> jnp.ndarray:
    """Reduce a score field ``[..., 2, H, W]`` to one scalar per pixel ``[..., H, W]``.

    Args:
      s: score field from :func:`score`, component axis at -3.
      component: ``"sum"``: dm/dx + dm/dy, Paper B's scalar "gradient"
        (B-tex 2.2/3.3: nabla p = dp/dx + dp/dy); ``"x"``: dm/dx only (Paper A's
        script embeds only d/dx); ``"y"``: dm/dy only.

    Returns:
      ``[..., H, W]`` in s's dtype.
    """
    s = jnp.asarray(s)
    if s.ndim < 3 or s.shape[-3] != 2:
        raise ValueError(f"s must have shape [..., 2, H, W], got shape {s.shape}")
    if component == "sum":
        return s[..., 0, :, :] + s[..., 1, :, :]
    if component == "x":
        return s[..., 0, :, :]
    if component == "y":
        return s[..., 1, :, :]
    raise ValueError(f"component must be one of ('sum', 'x', 'y'), got {component!r}")
