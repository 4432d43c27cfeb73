"""Time embeddings of the score network (method.md sections 4.3 and 4.4).

Two embeddings of a scalar time input ``tau`` (one per image, shape ``[B]``) into a ``dim``-vector,
each followed in :class:`TimeEmbedding` by ``Linear(dim -> 4 dim), SiLU, Linear(4 dim -> 4 dim)``:

* ``"linear"`` (Paper B, [B-code]): ``tau`` broadcast to a ``dim``-vector, ``e = tau * 1``.
* ``"fourier"`` (DDPM's sinusoidal embedding): ``e = [sin(tau w_k), cos(tau w_k)]`` with
  ``w_k = 10000^(-k / (dim/2 - 1))``, ``k = 0 .. dim/2 - 1`` (zero-padded when ``dim`` is odd).

The time input itself is :func:`time_input`: ``mult * t`` or, with Paper B's per-image time
intervals, ``mult * (t + idx - num_images / 2)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["sinusoidal_embedding", "linear_embedding", "time_input", "TimeEmbedding", "TIME_EMBEDDINGS"]

TIME_EMBEDDINGS = ("linear", "fourier")


def sinusoidal_embedding(tau: jax.Array, dim: int, *, max_positions: float = 10000.0) -> jax.Array:
    """DDPM sinusoidal embedding of ``tau``.

    Args:
      tau: ``[B]`` real time inputs.
      dim: embedding width (>= 4: the frequency ladder needs two frequencies).
      max_positions: the base of the geometric frequency ladder (10000 as in DDPM).

    Returns:
      ``[B, dim]``: ``sin(tau w_k)`` for ``k < dim//2`` then ``cos(tau w_k)``, with
      ``w_k = max_positions^(-k / (dim//2 - 1))``; a zero column is appended if ``dim`` is odd.
    """
    if dim < 4:
        raise ValueError(f"dim: expected an embedding width >= 4, got {dim}")
    half = dim // 2
    dtype = jnp.result_type(tau.dtype, jnp.float32)
    freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=dtype))
    arg = tau.astype(dtype)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def linear_embedding(tau: jax.Array, dim: int) -> jax.Array:
    """Paper B's "linear" embedding: ``tau`` ``[B]`` broadcast to ``[B, dim]``."""
    dtype = jnp.result_type(tau.dtype, jnp.float32)
    return jnp.broadcast_to(tau.astype(dtype)[:, None], (tau.shape[0], dim))


def time_input(t: jax.Array, idx: jax.Array | None, *, multiplier: float, per_image_offset: bool, num_images: int) -> jax.Array:
    """The network's scalar time input (method.md section 4.3).

    ``multiplier * t``, or with per-image time intervals ``multiplier * (t + idx - num_images/2)``
    so that image ``idx`` occupies its own interval ``[idx - n/2, idx - n/2 + 1)``.

    Args:
      t: ``[B]`` diffusion times.
      idx: ``[B]`` integer image indices (used only when ``per_image_offset``).

    Returns:
      ``[B]`` time input in ``t``'s floating dtype (at least float32).
    """
    dtype = jnp.result_type(t.dtype, jnp.float32)
    t = t.astype(dtype)
    if per_image_offset:
        t = t + idx.astype(dtype) - num_images / 2.0
    return multiplier * t


class TimeEmbedding(nnx.Module):
    """``e(tau)`` then ``Linear(dim -> 4 dim), SiLU, Linear(4 dim -> 4 dim)`` (method.md 4.4).

    Kept in float32 (``param_dtype``) regardless of the network's compute dtype: it is a few
    thousand flops, and a bfloat16 time input would only resolve ``tau`` to about 3 digits.
    """

    def __init__(self, dim: int, kind: str, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding: expected one of {TIME_EMBEDDINGS}, got {kind!r}")
        self.dim = dim
        self.kind = kind
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.dense0 = nnx.Linear(dim, 4 * dim, kernel_init=init, param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
        self.dense1 = nnx.Linear(4 * dim, 4 * dim, kernel_init=init, param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)

    def __call__(self, tau: jax.Array) -> jax.Array:
        """``tau`` ``[B]`` -> ``[B, 4 dim]``."""
        if self.kind == "linear":
            emb = linear_embedding(tau, self.dim)
        else:
            emb = sinusoidal_embedding(tau, self.dim)
        return self.dense1(nnx.silu(self.dense0(emb)))
