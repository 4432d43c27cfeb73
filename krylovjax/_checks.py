"""Input checks shared by the library: clear errors naming the argument, never silent NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_float(name: str, x) -> None:
    """Raise TypeError unless ``x`` has a floating dtype."""
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {dtype}")


def check_finite(name: str, x) -> None:
    """Raise ValueError if a concrete ``x`` holds NaN or Inf (skipped under tracing). A JAX
    array is reduced where it lives: only one bool comes back to the host, not the array."""
    if not is_concrete(x):
        return
    if isinstance(x, jax.Array):
        with jax.ensure_compile_time_eval():  # a concrete array closed over inside a jit trace
            finite = jnp.isfinite(x).all()
    else:
        finite = np.isfinite(np.asarray(x)).all()
    if not bool(finite):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


def check_positive(name: str, x) -> None:
    """Raise ValueError if a concrete ``x`` has a non-positive or non-finite entry."""
    if is_concrete(x):
        a = np.asarray(x)
        if not bool(np.all(np.isfinite(a))) or not bool(np.all(a > 0)):
            raise ValueError(f"{name}: expected finite values > 0, got {a if a.size < 8 else 'an array with some <= 0'}")


def check_rank(name: str, x, min_rank: int, what: str) -> None:
    """Raise ValueError if ``x`` has fewer than ``min_rank`` axes."""
    if jnp.ndim(x) < min_rank:
        raise ValueError(f"{name}: expected {what}, got shape {jnp.shape(x)}")
