"""Forward SDEs dx = f(x, t) dt + g(t) dW and the time grid of the FP solve.

Three SDEs (method.md section 2.1), each a frozen, hashable dataclass so it can
be passed to ``jax.jit`` as a static argument or closed over:

* :class:`VESDE`        Paper B: f = 0, g(t) = sigma**t,
                        lambda(t) = sqrt((sigma**(2t) - 1) / (2 ln sigma)).
* :class:`ConstantSDE`  Paper A's script: f = 0, g(t) = g (0.5), lambda = 0.1.
* :class:`VPSDE`        Song et al.: f = -beta(t) x / 2, g = sqrt(beta(t)),
                        beta(t) = beta_min + t (beta_max - beta_min).

Every method takes ``t`` as a Python scalar or an array of any shape and returns
an array of the same shape, in the floating dtype of ``t`` (integer ``t`` is
promoted to JAX's default float dtype: float32, or float64 with x64 on).  The
SDEs are defined for t >= 0 (the forward process starts at t = 0; the time
grid of :func:`time_grid` lies in [eps, T] with eps >= 0): a concrete ``t``
(Python, NumPy or JAX, not traced) with a negative, NaN or inf entry raises
ValueError instead of returning NaN; a traced ``t`` (inside jit/vmap/grad) is
not inspected.

``perturbation_std(t)`` is the lambda(t) used to perturb the embedded images in
training (method.md section 4.2).  For VE and VP it is the exact marginal std of
x(t) given x(0), i.e. d(lambda^2)/dt = g^2 - 2 * (linear drift rate) * lambda^2
with lambda(0) = 0; for the constant SDE it is Paper A's fixed 0.1 unless
``std=None`` asks for the marginal std g sqrt(t).

:func:`time_grid` fixes the time levels t_0 .. t_{N-1} and the step dt used by
the backward-Euler FP solve and the transport embedding (method.md 2.3, 3.4).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from krylovjax._checks import check_finite, is_concrete

__all__ = [
    "SDE",
    "VESDE",
    "ConstantSDE",
    "VPSDE",
    "get_sde",
    "register_sde",
    "sde_names",
    "time_grid",
]


def _as_time(t: Any) -> jnp.ndarray:
    """``t`` as a floating JAX array (ints promoted to the default float); a concrete ``t``
    must be finite and >= 0 (the SDEs start at t = 0)."""
    if is_concrete(t):
        a = np.asarray(t)  # one copy to the host for both checks
        check_finite("t", a)
        if np.any(a < 0):
            raise ValueError(f"t: expected times >= 0 (the SDE starts at t = 0), got "
                             f"{a if a.size < 8 else f'an array with minimum {a.min()}'}")
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, (bool, np.bool_, str, bytes)):  # float("5") and float(True) would pass
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {value!r}") from err
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def _time_for(x: jnp.ndarray, t: Any) -> jnp.ndarray:
    """Broadcast ``t`` against ``x``: scalar, or [B] with one time per x[b]."""
    t = _as_time(t)
    if t.ndim == 0:
        return t
    if t.ndim == 1 and x.ndim >= 1 and t.shape[0] == x.shape[0]:
        return t.reshape((t.shape[0],) + (1,) * (x.ndim - 1))
    raise ValueError(
        f"t must be a scalar or have shape [B] = ({x.shape[0] if x.ndim else '?'},) "
        f"matching x's leading axis; got t.shape={t.shape}, x.shape={x.shape}"
    )


class SDE:
    """Interface shared by the SDEs below (documentation only)."""

    #: True when f(x, t) == 0 identically (enables cumulative-sum transport).
    has_zero_drift: bool = True
    name: str = "sde"

    def g(self, t):  # pragma: no cover - interface
        raise NotImplementedError

    def g2(self, t):
        """g(t)**2, same shape as ``t``."""
        return self.g(t) ** 2

    def drift(self, x, t):  # pragma: no cover - interface
        raise NotImplementedError

    def perturbation_std(self, t):  # pragma: no cover - interface
        raise NotImplementedError

    def marginal_mean_coeff(self, t):
        """E[x(t) | x(0)] = marginal_mean_coeff(t) * x(0); 1 for zero drift."""
        return jnp.ones_like(_as_time(t))


_REGISTRY: dict[str, Callable[..., SDE]] = {}


def register_sde(name: str) -> Callable[[type], type]:
    """Class decorator adding an SDE to the registry under ``name``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"SDE name {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return wrap


@register_sde("ve")
@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Paper B's variance-exploding SDE: f = 0, g(t) = sigma**t (method.md 2.1).

    lambda(t) = sqrt((sigma**(2t) - 1) / (2 ln sigma)) satisfies
    d(lambda^2)/dt = g(t)^2 with lambda(0) = 0, i.e. lambda(t)^2 is the variance
    of x(t) - x(0) integrated from t = 0 (not from eps).  Computed with expm1 so
    it keeps full relative accuracy at t = eps = 1e-3 in float32.  sigma = 1
    gives g = 1 and lambda = sqrt(t) (the limit).  This is *not* Song et al.'s
    VE SDE (sigma_min (sigma_max/sigma_min)^t); it is the one Paper B's code uses.

    Args:
      sigma: > 0.  Paper B uses 5 (cifar1) and 2 (all other configs).
    """

    sigma: float = 5.0
    has_zero_drift = True
    name = "ve"

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_positive("sigma", self.sigma))

    def g(self, t):
        """g(t) = sigma**t, shape of ``t``."""
        t = _as_time(t)
        return jnp.exp(t * math.log(self.sigma))

    def g2(self, t):
        """g(t)^2 = sigma**(2t), shape of ``t``."""
        t = _as_time(t)
        return jnp.exp(2.0 * t * math.log(self.sigma))

    def drift(self, x, t):
        """f(x, t) = 0, shape and dtype of ``x``."""
        del t
        return jnp.zeros_like(x)

    def perturbation_std(self, t):
        """lambda(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)), shape of ``t``."""
        t = _as_time(t)
        log_s = math.log(self.sigma)
        if log_s == 0.0:
            return jnp.sqrt(t)
        return jnp.sqrt(jnp.expm1(2.0 * log_s * t) / (2.0 * log_s))


@register_sde("constant")
@dataclasses.dataclass(frozen=True, init=False)
class ConstantSDE(SDE):
    """Paper A's script: f = 0, constant diffusion g (method.md 2.1, A-code).

    ``ConstantSDE(g=0.5, std=0.1)``.

    Args:
      g: the constant g > 0 (Paper A: 0.5); stored as the field ``g_const``
        because ``g(t)`` is the method.
      std: the constant training perturbation lambda > 0 (Paper A: 0.1), or
        None for the exact marginal std g * sqrt(t).
    """

    g_const: float
    std: float | None
    has_zero_drift = True
    name = "constant"

    def __init__(self, g: float = 0.5, std: float | None = 0.1, *, g_const: float | None = None):
        if g_const is not None:  # dataclasses.replace() passes field names
            g = g_const
        object.__setattr__(self, "g_const", _check_positive("g", g))
        object.__setattr__(self, "std", None if std is None else _check_positive("std", std))

    def g(self, t):
        """g(t) = g_const, shape of ``t``."""
        t = _as_time(t)
        return jnp.full_like(t, self.g_const)

    def g2(self, t):
        """g^2, shape of ``t``."""
        t = _as_time(t)
        return jnp.full_like(t, self.g_const**2)

    def drift(self, x, t):
        """f(x, t) = 0, shape and dtype of ``x``."""
        del t
        return jnp.zeros_like(x)

    def perturbation_std(self, t):
        """lambda(t): ``std`` (constant), or g sqrt(t) when ``std`` is None."""
        t = _as_time(t)
        if self.std is None:
            return self.g_const * jnp.sqrt(t)
        return jnp.full_like(t, self.std)


@register_sde("vp")
@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
    """Song et al.'s variance-preserving SDE (DDPM limit).

    beta(t) = beta_min + t (beta_max - beta_min), f(x, t) = -beta(t) x / 2,
    g(t) = sqrt(beta(t)).  With B(t) = int_0^t beta = beta_min t +
    (beta_max - beta_min) t^2 / 2 the marginal is
    x(t) | x(0) ~ N(exp(-B/2) x(0), (1 - exp(-B)) I).

    Args:
      beta_min: >= 0 (default 0.1).
      beta_max: >= beta_min, > 0 (default 20).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    has_zero_drift = False
    name = "vp"

    def __post_init__(self):
        bmin = _check_positive("beta_min", self.beta_min, allow_zero=True)
        bmax = _check_positive("beta_max", self.beta_max)
        if bmax < bmin:
            raise ValueError(
                f"beta_max must be >= beta_min, got beta_min={bmin}, beta_max={bmax}"
            )
        object.__setattr__(self, "beta_min", bmin)
        object.__setattr__(self, "beta_max", bmax)

    def beta(self, t):
        """beta(t) = beta_min + t (beta_max - beta_min), shape of ``t``."""
        t = _as_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _integrated_beta(self, t):
        t = _as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def g(self, t):
        """g(t) = sqrt(beta(t)), shape of ``t``."""
        return jnp.sqrt(self.beta(t))

    def g2(self, t):
        """g(t)^2 = beta(t), shape of ``t``."""
        return self.beta(t)

    def drift(self, x, t):
        """f(x, t) = -beta(t) x / 2.  x: any shape; t: scalar or [x.shape[0]]."""
        x = jnp.asarray(x)
        return -0.5 * self.beta(_time_for(x, t)).astype(x.dtype) * x

    def marginal_mean_coeff(self, t):
        """exp(-B(t)/2): E[x(t) | x(0)] = coeff * x(0), shape of ``t``."""
        return jnp.exp(-0.5 * self._integrated_beta(t))

    def perturbation_std(self, t):
        """Marginal std sqrt(1 - exp(-B(t))) (expm1 form), shape of ``t``."""
        return jnp.sqrt(-jnp.expm1(-self._integrated_beta(t)))


def sde_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_sde`."""
    return tuple(sorted(_REGISTRY))


def get_sde(name: str, **kwargs: Any) -> SDE:
    """Build an SDE from a config string: ``"ve"``, ``"constant"`` or ``"vp"``.

    Keyword arguments go to the class (``sigma`` for ve; ``g``/``std`` for
    constant; ``beta_min``/``beta_max`` for vp). An unknown name or keyword raises
    ValueError listing the accepted ones; a bad value raises the class's own
    TypeError/ValueError, which names the argument.
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"name must be one of {sde_names()}, got {name!r}")
    cls = _REGISTRY[key]
    # The names the class takes (ConstantSDE's ``g``, not its field ``g_const``); a bad *value*
    # of a known name raises the class's own error, which names it.
    sig = inspect.signature(cls).parameters
    params = [n for n, p in sig.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    any_name = any(p.kind == p.VAR_KEYWORD for p in sig.values())
    unknown = [] if any_name else sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"bad keyword arguments {unknown} for SDE {key!r}; expected some of {params}")
    return cls(**kwargs)


def time_grid(
    num_steps: int,
    eps: float = 1e-3,
    T: float = 1.0,
    *,
    paper_b: bool = False,
    dtype: Any = None,
) -> tuple[jnp.ndarray, float]:
    """Time levels of the FP solve: returns ``(t [N], dt)`` with N = num_steps.

    Default (consistent) grid: t_n = eps + n * dt for n = 0..N-1 with
    dt = (T - eps) / (N - 1), i.e. ``t = linspace(eps, T, N)`` and
    t_n - t_{n-1} == dt exactly.  m^0 lives at t_0 = eps; the backward-Euler
    steps n = 1..N-1 (method.md 3.4) each advance by dt and end at t_N-1 = T.

    ``paper_b=True`` reproduces Paper B's code: ``t = linspace(eps, 1, N)`` but
    dt = 1 / N (``T`` must be 1), which is inconsistent with the spacing
    (1 - eps) / (N - 1) of its own t_n.  Use it only to reproduce its numbers.

    Args:
      num_steps: N >= 2 time levels (Paper B: 10 or 20).
      eps: first time, 0 <= eps < T (Paper B: 1e-3).
      T: final time, > eps.
      paper_b: reproduce Paper B's (t, dt) exactly.
      dtype: float dtype of ``t`` (default: JAX's default float).

    Returns:
      t: [N] array; dt: Python float.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int, got {num_steps!r}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (t_0 plus one step), got {num_steps}")
    eps = float(eps)
    T = float(T)
    if not (math.isfinite(eps) and math.isfinite(T)) or eps < 0 or T <= eps:
        raise ValueError(f"need 0 <= eps < T (finite), got eps={eps}, T={T}")
    if dtype is None:
        dtype = jnp.result_type(float)
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if paper_b:
        if T != 1.0:
            raise ValueError(f"paper_b=True uses T = 1 (dt = 1/N), got T={T}")
        t = np.linspace(eps, 1.0, num_steps)
        dt = 1.0 / num_steps
    else:
        t = np.linspace(eps, T, num_steps)
        dt = (T - eps) / (num_steps - 1)
    return jnp.asarray(t, dtype=dtype), dt
