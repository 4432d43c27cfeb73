"""Input checks shared by the library: clear errors naming the argument, never silent NaN."""

from __future__ import annotations

import functools
import operator

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


def channels_last_hint(shape) -> str:
    """``"; ... transpose ..."`` when a ``[B, C, H, W]`` argument's ``shape`` looks channels-last
    (``[B, H, W, C]``: a last axis of 1, 3 or 4 after larger ones), else ``""``."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and min(shape[1], shape[2]) > 4:
        return ("; it looks channels-last [B, H, W, C], and the library takes [B, C, H, W]: "
                "x.transpose(0, 3, 1, 2)")
    return ""


@functools.lru_cache(maxsize=None)
def _raw_key_shape(impl: str) -> tuple:
    """The shape of a raw key (``jax.random.PRNGKey``) of the PRNG implementation ``impl``."""
    return jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape


def check_key(name: str, key) -> None:
    """Raise TypeError unless ``key`` is one JAX PRNG key: a typed key (``jax.random.key``) or a raw
    one (``jax.random.PRNGKey``: ``uint32[2]`` for threefry, ``uint32[4]`` for rbg). ``None``
    reached JAX as "unexpected PRNG key type NoneType", naming no argument (a walkthrough,
    2026-12-07)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
        raise TypeError(f"{name}: expected one PRNG key, got an array of keys of shape {shape}")
    # a raw key's shape is its implementation's: (2,) for threefry, (4,) for rbg (a review)
    if dtype == jnp.uint32 and shape == _raw_key_shape(str(jax.config.jax_default_prng_impl)):
        return
    raise TypeError(f"{name}: expected a JAX PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
                    f"got {type(key).__name__}" + (f" of dtype {dtype} and shape {shape}" if dtype is not None else ""))


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


def check_images(name: str, x, *, finite: bool = True) -> jax.Array:
    """A floating image batch ``[B, C, H, W]`` as a JAX array; finite when concrete unless
    ``finite=False`` (a loaded model's score function, called at every sampler step, skips
    that device reduction)."""
    x = jnp.asarray(x)
    check_float(name, x)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected an image batch of shape [B, C, H, W], got shape {tuple(x.shape)}")
    if finite:
        check_finite(name, x)
    return x


def check_positive(name: str, x) -> None:
    """Raise ValueError if a concrete ``x`` has a non-positive or non-finite entry."""
    if is_concrete(x):
        a = np.asarray(x)
        if not bool(np.all(np.isfinite(a))) or not bool(np.all(a > 0)):
            raise ValueError(f"{name}: expected finite values > 0, got {a if a.size < 8 else 'an array with some <= 0'}")


def is_float32_or_64(dtype) -> bool:
    """True for float32 or float64 in either byte order: the dtypes the solvers' LAPACK calls
    support (not float16/bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" and dtype.itemsize in (4, 8)


def is_int(value) -> bool:
    """True for a Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """True for a real number (int, float, NumPy scalar), not a bool, a string or an array."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def as_real(name: str, value) -> float:
    """``value`` as a Python float: any real number (int, float, NumPy scalar), not a bool, a
    string or an array."""
    if not is_real(value):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    return float(value)


def as_int(name: str, value, minimum: int, *, what: str | None = None) -> int:
    """``value`` as a Python int >= ``minimum``: any integral (int, NumPy integer), not a bool or
    a float. ``what`` is the expectation the error states (default "an integer >= minimum")."""
    what = what or f"an integer >= {minimum}"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected {what}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return out


def as_sizes(name: str, shape, minimum: int, *, what: str | None = None) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints >= ``minimum`` (NumPy integers accepted; floats such
    as 8.7, bools and negative sizes refused); the error names the whole ``shape``."""
    what = what or f"a tuple of integers >= {minimum}"
    try:
        return tuple(as_int(name, d, minimum) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {what}, got {shape!r}") from None


def left_pad_rank(x, ndim: int):
    """``x`` with size-1 axes prepended up to rank ``ndim``: the rank promotion NumPy-style
    broadcasting does implicitly, made explicit (so ``jax_numpy_rank_promotion="raise"`` passes;
    values unchanged)."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (ndim - x.ndim) + x.shape) if x.ndim < ndim else x
