"""Tests for krylovjax.sde: closed forms, marginal ODEs, registry, time grid."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from krylovjax import sde as S

TS = np.array([0.0, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0])


@pytest.mark.parametrize("sigma", [2.0, 5.0, 25.0, 0.5])
def test_ve_g_closed_form(sigma):
    ve = S.VESDE(sigma)
    np.testing.assert_allclose(ve.g(TS), sigma**TS, rtol=1e-13)
    np.testing.assert_allclose(ve.g2(TS), sigma ** (2 * TS), rtol=1e-13)
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(ve.drift(x, 0.3), np.zeros((2, 3)))
    np.testing.assert_array_equal(ve.marginal_mean_coeff(TS), np.ones_like(TS))


@pytest.mark.parametrize("sigma", [2.0, 5.0, 25.0, 0.5])
def test_ve_lambda_is_integral_of_g2_from_zero(sigma):
    """lambda(t)^2 = int_0^t g^2 (offset lambda(0) = 0), i.e. d(lambda^2)/dt = g^2."""
    ve = S.VESDE(sigma)
    lam = np.asarray(ve.perturbation_std(TS))
    ref = np.sqrt((sigma ** (2 * TS) - 1) / (2 * math.log(sigma)))
    np.testing.assert_allclose(lam, ref, rtol=1e-12, atol=1e-15)
    for t, l in zip(TS, lam):
        quad, _ = integrate.quad(lambda s: sigma ** (2 * s), 0.0, t, epsabs=1e-14, epsrel=1e-13)
        assert l**2 == pytest.approx(quad, rel=1e-11, abs=1e-15)
    # The relation does NOT hold with the lower limit eps: lambda(eps)^2 is the missing offset.
    eps, t = 1e-3, 0.7
    from_eps, _ = integrate.quad(lambda s: sigma ** (2 * s), eps, t)
    lam_eps, lam_t = float(ve.perturbation_std(eps)), float(ve.perturbation_std(t))
    assert lam_t**2 - from_eps == pytest.approx(lam_eps**2, rel=1e-9)
    assert abs(lam_t**2 - from_eps) > 1e-4
    # Derivative check by central differences.
    h = 1e-5
    for t in (0.2, 0.8):
        d = (float(ve.perturbation_std(t + h)) ** 2 - float(ve.perturbation_std(t - h)) ** 2) / (2 * h)
        assert d == pytest.approx(sigma ** (2 * t), rel=1e-8)


def test_ve_float32_small_t_accuracy_and_dtype():
    ve = S.VESDE(5.0)
    t32 = jnp.asarray([1e-3, 1e-5], jnp.float32)
    lam32 = ve.perturbation_std(t32)
    assert lam32.dtype == jnp.float32 and ve.g(t32).dtype == jnp.float32
    exact = np.sqrt(np.expm1(2 * math.log(5.0) * np.array([1e-3, 1e-5])) / (2 * math.log(5.0)))
    np.testing.assert_allclose(np.asarray(lam32), exact, rtol=2e-6)
    # Integer times are promoted to a float.
    assert jnp.issubdtype(ve.g(jnp.arange(3)).dtype, jnp.floating)


def test_ve_sigma_one_limit():
    t = np.array([0.1, 0.5, 1.0])
    np.testing.assert_allclose(S.VESDE(1.0).perturbation_std(t), np.sqrt(t), rtol=1e-14)
    np.testing.assert_allclose(S.VESDE(1.0 + 1e-7).perturbation_std(t), np.sqrt(t), rtol=1e-6)
    np.testing.assert_allclose(S.VESDE(1.0).g(t), np.ones(3))


def test_constant_sde():
    c = S.ConstantSDE()  # Paper A: g = 0.5, lambda = 0.1
    np.testing.assert_allclose(c.g(TS), 0.5)
    np.testing.assert_allclose(c.g2(TS), 0.25)
    np.testing.assert_allclose(c.perturbation_std(TS), 0.1)
    assert c.g(TS).shape == TS.shape
    c2 = S.ConstantSDE(g=0.3, std=None)
    lam = np.asarray(c2.perturbation_std(TS))
    np.testing.assert_allclose(lam**2, 0.09 * TS, rtol=1e-13, atol=1e-16)  # = int_0^t g^2
    assert dataclasses.replace(c2, std=0.2) == S.ConstantSDE(g=0.3, std=0.2)


@pytest.mark.parametrize("bmin,bmax", [(0.1, 20.0), (0.5, 3.0), (0.0, 1.0)])
def test_vp_mean_and_variance_odes(bmin, bmax):
    """E x and Var x of dx = -beta/2 x dt + sqrt(beta) dW, integrated numerically."""
    vp = S.VPSDE(bmin, bmax)
    beta = lambda t: bmin + t * (bmax - bmin)  # noqa: E731

    def rhs(t, y):
        mu, var = y
        return [-0.5 * beta(t) * mu, -beta(t) * var + beta(t)]

    sol = integrate.solve_ivp(rhs, (0.0, 1.0), [1.0, 0.0], t_eval=TS, rtol=1e-11, atol=1e-13, method="DOP853")
    np.testing.assert_allclose(vp.marginal_mean_coeff(TS), sol.y[0], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(np.asarray(vp.perturbation_std(TS)) ** 2, sol.y[1], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(vp.g2(TS), beta(TS), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(vp.g(TS)) ** 2, beta(TS), rtol=1e-13)


def test_vp_drift_broadcasting():
    vp = S.VPSDE(0.1, 20.0)
    x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(vp.drift(x, 0.5), -0.5 * (0.1 + 0.5 * 19.9) * np.asarray(x), rtol=1e-6)
    t = jnp.array([0.2, 0.8])
    ref = -0.5 * (0.1 + np.array([0.2, 0.8])[:, None, None] * 19.9) * np.asarray(x)
    out = vp.drift(x, t)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        vp.drift(x, jnp.ones(3))


def test_registry_and_hashing():
    assert set(S.sde_names()) == {"ve", "constant", "vp"}
    assert S.get_sde("ve", sigma=2.0) == S.VESDE(2.0)
    assert S.get_sde("VP", beta_min=0.2, beta_max=5.0) == S.VPSDE(0.2, 5.0)
    assert S.get_sde("constant", g=0.4, std=0.2) == S.ConstantSDE(0.4, 0.2)
    assert hash(S.VESDE(2.0)) == hash(S.VESDE(2)) and S.VESDE(2.0) != S.VESDE(3.0)
    with pytest.raises(ValueError, match="name must be one of"):
        S.get_sde("subvp")
    with pytest.raises(ValueError, match="bad keyword arguments"):
        S.get_sde("ve", beta=1.0)

    g2 = jax.jit(lambda t, sde: sde.g2(t), static_argnums=1)
    np.testing.assert_allclose(g2(jnp.asarray(0.3), S.VESDE(2.0)), 2.0**0.6, rtol=1e-12)
    np.testing.assert_allclose(g2(jnp.asarray(0.3), S.VPSDE()), 0.1 + 0.3 * 19.9, rtol=1e-12)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: S.VESDE(0.0), "sigma"),
        (lambda: S.VESDE(float("nan")), "sigma"),
        (lambda: S.ConstantSDE(g=-1.0), "g must"),
        (lambda: S.ConstantSDE(std=0.0), "std"),
        (lambda: S.VPSDE(1.0, 0.5), "beta_max must be >= beta_min"),
        (lambda: S.VPSDE(-0.1, 1.0), "beta_min"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_time_grid_consistent():
    t, dt = S.time_grid(11, eps=1e-3, T=1.0)
    t = np.asarray(t)
    assert t.shape == (11,) and t[0] == pytest.approx(1e-3) and t[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(t), dt, rtol=1e-12)
    assert dt == pytest.approx(0.999 / 10)
    t2, dt2 = S.time_grid(4, eps=0.0, T=2.0, dtype=jnp.float32)
    assert t2.dtype == jnp.float32 and dt2 == pytest.approx(2.0 / 3)


def test_time_grid_paper_b():
    t, dt = S.time_grid(20, paper_b=True)
    np.testing.assert_allclose(t, np.linspace(1e-3, 1.0, 20), rtol=1e-14)
    assert dt == 1.0 / 20
    assert not np.allclose(np.diff(np.asarray(t)), dt)  # the code's inconsistency


@pytest.mark.parametrize(
    "kw,err",
    [
        (dict(num_steps=1), ValueError),
        (dict(num_steps=5, eps=1.0, T=1.0), ValueError),
        (dict(num_steps=5, eps=-0.1), ValueError),
        (dict(num_steps=5, T=2.0, paper_b=True), ValueError),
        (dict(num_steps=5.0), TypeError),
        (dict(num_steps=5, dtype=jnp.int32), TypeError),
    ],
)
def test_time_grid_bad_input(kw, err):
    with pytest.raises(err):
        S.time_grid(**kw)


@pytest.mark.parametrize("sde", [S.VESDE(5.0), S.VESDE(1.0), S.VPSDE(), S.ConstantSDE(std=None)],
                         ids=["ve", "ve1", "vp", "constant"])
@pytest.mark.parametrize("method", ["g", "g2", "perturbation_std", "marginal_mean_coeff"])
def test_concrete_time_outside_range_is_refused(sde, method):
    """A concrete t < 0 (or NaN/inf) is refused with a message naming t; it used to give NaN
    (VESDE(5).perturbation_std(-0.1), VPSDE().g(-1.0)). Traced t is not inspected."""
    fn = getattr(sde, method)
    for bad in (-0.1, np.float32(-1.0), jnp.asarray([0.5, -1e-3])):
        with pytest.raises(ValueError, match=r"t: expected times >= 0 \(the SDE starts at t = 0\), got"):
            fn(bad)
    for bad in (np.nan, jnp.asarray([0.5, np.inf])):
        with pytest.raises(ValueError, match="t: expected finite values"):
            fn(bad)
    assert np.isfinite(fn(0.0)) and np.isfinite(fn(jnp.asarray(1.0)))
    jax.jit(fn)(jnp.asarray(-0.1))  # traced: unchecked, no error


def test_vp_drift_checks_concrete_time():
    with pytest.raises(ValueError, match="t: expected times >= 0"):
        S.VPSDE().drift(jnp.ones((2, 3)), jnp.asarray([0.1, -0.2]))
