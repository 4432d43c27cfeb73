"""Tests of krylovjax.sampling against closed forms for Gaussian data.

For data N(mu, s0^2 I) and an SDE with marginal x(t) = alpha(t) x0 + lambda(t) z, the marginal
is N(alpha mu, V(t)), V = alpha^2 s0^2 + lambda^2, its score is -(x - alpha mu) / V, and the
probability-flow map is the monotone transport between Gaussians: the standardised value
(x - alpha mu) / sqrt(V) is constant along every characteristic. The SDEs are small stand-ins
defined here (the same interface as krylovjax.sde), so these tests do not depend on sde.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import sampling


# ------------------------------------------------------------------------ stand-in SDEs


class VESDE:
    """Paper B's VE SDE: f = 0, g = sigma^t, lambda^2 = (sigma^(2t) - 1) / (2 ln sigma).

    Named like krylovjax.sde.VESDE so that start_time takes its closed-form path.
    """

    def __init__(self, sigma):
        self.sigma = sigma

    def g2(self, t):
        return jnp.exp(2.0 * t * math.log(self.sigma))

    def drift(self, x, t):
        return jnp.zeros_like(x)

    def perturbation_std(self, t):
        return jnp.sqrt(jnp.expm1(2.0 * t * math.log(self.sigma)) / (2.0 * math.log(self.sigma)))


class SqrtSDE:
    """f = 0, constant g: lambda = g sqrt(t) (start_time must bisect: t* = (std / g)^2)."""

    def __init__(self, g):
        self.gc = g

    def g2(self, t):
        return jnp.full_like(t, self.gc**2)

    def drift(self, x, t):
        return jnp.zeros_like(x)

    def perturbation_std(self, t):
        return self.gc * jnp.sqrt(t)


class ConstLambdaSDE(SqrtSDE):
    """Paper A's script: constant lambda = 0.1 (no start time matches a noise level)."""

    def perturbation_std(self, t):
        return jnp.full_like(t, 0.1)


class VPSDE:
    """Variance preserving: beta(t) linear, f = -beta x / 2, alpha = exp(-B/2), lambda^2 = 1 - exp(-B)."""

    def __init__(self, bmin=0.1, bmax=20.0):
        self.bmin, self.bmax = bmin, bmax

    def _B(self, t):
        return self.bmin * t + 0.5 * (self.bmax - self.bmin) * t**2

    def g2(self, t):
        return self.bmin + t * (self.bmax - self.bmin)

    def drift(self, x, t):
        return -0.5 * self.g2(t) * x

    def perturbation_std(self, t):
        return jnp.sqrt(-jnp.expm1(-self._B(t)))

    def marginal_mean_coeff(self, t):
        return jnp.exp(-0.5 * self._B(t))


def ve_lambda2(sigma, t):
    return (sigma ** (2 * np.asarray(t, np.float64)) - 1) / (2 * math.log(sigma))


def gaussian_score(sde, mu, s0):
    """Exact score of the marginal of N(mu, s0^2 I) data: -(x - alpha mu) / (alpha^2 s0^2 + lambda^2)."""

    def score(x, t):
        lam = jax.vmap(sde.perturbation_std)(t)
        alpha = jax.vmap(sde.marginal_mean_coeff)(t) if hasattr(sde, "marginal_mean_coeff") else jnp.ones_like(t)
        V = (alpha**2 * s0**2 + lam**2)[:, None, None, None]
        return -(x - alpha[:, None, None, None] * mu) / V

    return score


MU = jnp.asarray([[[0.2, 0.5], [0.7, 0.4]]])  # [C=1, H=2, W=2]: a different mean per pixel


def marginal_samples(key, n, sigma, s0, t):
    """n draws of the exact VE marginal at time t, [n, 1, 2, 2]."""
    std = math.sqrt(s0**2 + ve_lambda2(sigma, t))
    return MU + std * jax.random.normal(key, (n, 1, 2, 2), jnp.float64)


def standardised_moments(x, sigma, s0, t):
    """Mean and variance of (x - mu) / sqrt(V(t)) pooled over all pixels (N(0, 1) if correct)."""
    z = (np.asarray(x) - np.asarray(MU)) / math.sqrt(s0**2 + ve_lambda2(sigma, t))
    return z.mean(), z.var(), z.size


def pf_characteristic(x_start, t_start, t_end, sigma, s0):
    """Closed-form probability-flow solution for VE and Gaussian data."""
    t_start = np.reshape(np.asarray(t_start, np.float64), (-1, 1, 1, 1))
    ratio = np.sqrt((s0**2 + ve_lambda2(sigma, t_end)) / (s0**2 + ve_lambda2(sigma, t_start)))
    return np.asarray(MU) + (np.asarray(x_start) - np.asarray(MU)) * ratio


# ------------------------------------------------------------------------ reverse SDE


def test_euler_maruyama_reproduces_gaussian_marginal():
    """From the exact marginal at t = 1, EM ends in N(mu, s0^2 + lambda(t_end)^2) (MC error).

    Bias of EM on this problem is O(dt): for N = 1000 and s0 = 0.5 it is ~0.2% of the variance
    (from the discrete variance recursion), below the Monte-Carlo standard error of ~1.1%.
    """
    sigma, s0, t_end = 5.0, 0.5, 1e-3
    sde = VESDE(sigma)
    x1 = marginal_samples(jax.random.PRNGKey(0), 4096, sigma, s0, 1.0)
    res = sampling.euler_maruyama(gaussian_score(sde, MU, s0), sde, x1, jax.random.PRNGKey(1),
                                  num_steps=1000, t_end=t_end)
    m, v, n = standardised_moments(res.x, sigma, s0, t_end)
    assert abs(m) < 4.5 / math.sqrt(n)
    assert abs(v - 1) < 4.5 * math.sqrt(2 / n)
    assert int(res.num_score_evals) == 1000
    # a wrong sampler (e.g. the probability-flow factor 1/2 without noise) would miss by far:
    assert abs(v - 1) < 0.05


def test_euler_maruyama_drift_only_converges_first_order():
    """noise_scale = 0 is Euler for dx/dt = -g^2 s; for the Gaussian x - mu is proportional to V(t)."""
    sigma, s0, t_end = 2.0, 0.3, 1e-3
    sde = VESDE(sigma)
    x1 = marginal_samples(jax.random.PRNGKey(2), 8, sigma, s0, 1.0)
    exact = np.asarray(MU) + (np.asarray(x1) - np.asarray(MU)) * (
        (s0**2 + ve_lambda2(sigma, t_end)) / (s0**2 + ve_lambda2(sigma, 1.0)))
    errs = []
    for n in (200, 400):
        res = sampling.euler_maruyama(gaussian_score(sde, MU, s0), sde, x1, jax.random.PRNGKey(3),
                                      num_steps=n, t_end=t_end, noise_scale=0.0)
        errs.append(np.abs(np.asarray(res.x) - exact).max())
    assert 0 < errs[1] < 1e-2
    np.testing.assert_allclose(np.log2(errs[0] / errs[1]), 1.0, atol=0.1)


def test_euler_maruyama_paper_a_options_and_trajectory():
    """clip keeps every frame in range; frames are evenly spaced states; noise is seeded."""
    sigma, s0 = 2.0, 0.3
    sde = VESDE(sigma)
    x1 = marginal_samples(jax.random.PRNGKey(4), 16, sigma, s0, 1.0)
    run = functools.partial(sampling.euler_maruyama, gaussian_score(sde, MU, s0), sde, x1,
                            t_end=0.0, num_steps=50, noise_scale=0.1, clip=(0.0, 1.0))
    res = run(jax.random.PRNGKey(5), return_trajectory=True, num_frames=11)
    assert res.trajectory.shape == (11, 16, 1, 2, 2)
    assert float(res.trajectory[1:].min()) >= 0.0 and float(res.trajectory[1:].max()) <= 1.0
    np.testing.assert_array_equal(res.trajectory[0], x1)
    np.testing.assert_array_equal(res.trajectory[-1], res.x)
    np.testing.assert_allclose(res.times[:, 0], np.linspace(1.0, 0.0, 11), atol=1e-12)
    other = run(jax.random.PRNGKey(6))
    assert not np.allclose(other.x, res.x)


# ------------------------------------------------------------------------ probability flow


def test_probability_flow_follows_exact_characteristic():
    sigma, s0, t_end = 5.0, 0.3, 1e-3
    sde = VESDE(sigma)
    x1 = marginal_samples(jax.random.PRNGKey(7), 4, sigma, s0, 1.0)
    res = sampling.probability_flow(gaussian_score(sde, MU, s0), sde, x1, t_end=t_end, rtol=1e-9,
                                    atol=1e-9, return_trajectory=True, num_frames=5)
    exact = pf_characteristic(x1, 1.0, t_end, sigma, s0)
    np.testing.assert_allclose(res.x, exact, rtol=0, atol=1e-7)
    # dense-output frames against the closed form at the frame times
    times = np.asarray(res.times)
    np.testing.assert_allclose(times[:, 0], np.linspace(1.0, t_end, 5), atol=1e-12)
    for f in range(5):
        ref = pf_characteristic(x1, 1.0, times[f, 0], sigma, s0)
        np.testing.assert_allclose(res.trajectory[f], ref, rtol=0, atol=1e-6)
    # the loose default tolerances of Paper B still land within about 1e-2 (and use few evaluations)
    loose = sampling.probability_flow(gaussian_score(sde, MU, s0), sde, x1, t_end=t_end)
    assert np.abs(np.asarray(loose.x) - exact).max() < 3e-2
    assert 10 < int(loose.num_score_evals) < int(res.num_score_evals)


def test_probability_flow_reproduces_gaussian_marginal():
    sigma, s0, t_end = 5.0, 0.3, 1e-3
    sde = VESDE(sigma)
    x1 = marginal_samples(jax.random.PRNGKey(8), 2048, sigma, s0, 1.0)
    res = sampling.probability_flow(gaussian_score(sde, MU, s0), sde, x1, t_end=t_end, rtol=1e-5, atol=1e-5)
    m, v, n = standardised_moments(res.x, sigma, s0, t_end)
    assert abs(m) < 4.5 / math.sqrt(n)
    assert abs(v - 1) < 4.5 * math.sqrt(2 / n)


def test_fixed_step_solvers_converge_with_their_order():
    sigma, s0, t_end = 2.0, 0.3, 1e-3
    sde = VESDE(sigma)
    x1 = marginal_samples(jax.random.PRNGKey(9), 4, sigma, s0, 1.0)
    exact = pf_characteristic(x1, 1.0, t_end, sigma, s0)
    for solver, order in (("euler", 1.0), ("heun", 2.0)):
        errs = []
        for n in (50, 100):
            res = sampling.probability_flow(gaussian_score(sde, MU, s0), sde, x1, t_end=t_end,
                                            solver=solver, num_steps=n)
            assert int(res.num_score_evals) == n * (1 if solver == "euler" else 2)
            errs.append(np.abs(np.asarray(res.x) - exact).max())
        np.testing.assert_allclose(np.log2(errs[0] / errs[1]), order, atol=0.1)


def test_probability_flow_counts_every_score_evaluation():
    """num_score_evals equals the calls actually made (counted with a host callback)."""
    sde = VESDE(2.0)
    score = gaussian_score(sde, MU, 0.3)
    calls = [0]

    def counting(x, t):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return score(x, t)

    x1 = marginal_samples(jax.random.PRNGKey(10), 3, 2.0, 0.3, 1.0)
    for solver in ("dopri5", "heun"):
        calls[0] = 0
        res = sampling.probability_flow(counting, sde, x1, solver=solver, num_steps=7, rtol=1e-6, atol=1e-6)
        jax.effects_barrier()
        assert int(res.num_score_evals) == calls[0] > 0


def test_per_image_start_times():
    """t_start [B]: each image follows its own characteristic from its own start time."""
    sigma, s0, t_end = 2.0, 0.3, 1e-3
    sde = VESDE(sigma)
    t0 = jnp.asarray([1.0, 0.5, 0.2])
    x0 = MU + jnp.asarray([0.4, -0.8, 1.1])[:, None, None, None]
    res = sampling.probability_flow(gaussian_score(sde, MU, s0), sde, x0, t_start=t0, t_end=t_end,
                                    rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.x, pf_characteristic(x0, t0, t_end, sigma, s0), atol=1e-7)
    np.testing.assert_array_equal(res.t_start, t0)


def test_samplers_jit_and_float32():
    sigma, s0 = 2.0, 0.3
    sde = VESDE(sigma)
    score = gaussian_score(sde, MU, s0)
    x1 = marginal_samples(jax.random.PRNGKey(11), 8, sigma, s0, 1.0)
    em = functools.partial(sampling.euler_maruyama, score, sde, num_steps=20)
    eager = em(x1, jax.random.PRNGKey(1))
    jitted = jax.jit(em)(x1, jax.random.PRNGKey(1))
    np.testing.assert_allclose(jitted.x, eager.x, rtol=1e-12, atol=1e-12)
    drift_only = em(x1.astype(jnp.float32), jax.random.PRNGKey(1), noise_scale=0.0)
    assert drift_only.x.dtype == jnp.float32
    ratio = (s0**2 + ve_lambda2(sigma, 1e-3)) / (s0**2 + ve_lambda2(sigma, 1.0))
    np.testing.assert_allclose(drift_only.x, np.asarray(MU) + (np.asarray(x1) - np.asarray(MU)) * ratio, atol=3e-2)
    pf = jax.jit(functools.partial(sampling.probability_flow, score, sde, rtol=1e-5, atol=1e-5))
    r64 = pf(x1)
    r32 = pf(x1.astype(jnp.float32))
    assert r32.x.dtype == jnp.float32 and r64.x.dtype == jnp.float64
    np.testing.assert_allclose(r32.x, r64.x, atol=1e-4)
    np.testing.assert_allclose(r64.x, pf_characteristic(x1, 1.0, 1e-3, sigma, s0), atol=1e-3)


# ------------------------------------------------------------------------ start time, denoise


def test_start_time_matches_lambda():
    std = jnp.asarray([0.05, 0.3, 1.0, 2.5])
    ve = VESDE(5.0)
    t = sampling.start_time(ve, std)
    # closed form, checked against lambda^2 = (sigma^(2t) - 1) / (2 ln sigma) in numpy
    np.testing.assert_allclose(np.sqrt(ve_lambda2(5.0, t)), std, rtol=1e-12)
    sq = SqrtSDE(0.5)  # bisection: t* = (std / g)^2
    np.testing.assert_allclose(sampling.start_time(sq, jnp.asarray([0.1, 0.3, 0.45])),
                               (np.asarray([0.1, 0.3, 0.45]) / 0.5) ** 2, rtol=1e-10)
    vp = VPSDE()  # lambda / alpha = sqrt(exp(B) - 1)
    t_vp = np.asarray(sampling.start_time(vp, std))
    B = 0.1 * t_vp + 0.5 * 19.9 * t_vp**2
    np.testing.assert_allclose(np.sqrt(np.expm1(B)), std, rtol=1e-10)
    # jit-compatible (no validation under tracing, same value)
    np.testing.assert_allclose(jax.jit(lambda s: sampling.start_time(ve, s))(std), t, rtol=1e-12)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_denoise_gaussian_exact_map(method):
    """noisy = x0 + std z: denoise starts at lambda(t*) = std and follows the exact transport."""
    sigma, s0, t_end, std = 2.0, 0.3, 1e-3, 0.4
    sde = VESDE(sigma)
    x0 = MU + s0 * jax.random.normal(jax.random.PRNGKey(12), (6, 1, 2, 2))
    noisy = x0 + std * jax.random.normal(jax.random.PRNGKey(13), x0.shape)
    if method == "ode":
        res = sampling.denoise(gaussian_score(sde, MU, s0), sde, noisy, noise_std=std, rtol=1e-9, atol=1e-9)
        ratio = math.sqrt((s0**2 + ve_lambda2(sigma, t_end)) / (s0**2 + std**2))
        np.testing.assert_allclose(res.x, np.asarray(MU) + (np.asarray(noisy) - np.asarray(MU)) * ratio, atol=1e-7)
    else:
        res = sampling.denoise(gaussian_score(sde, MU, s0), sde, noisy, noise_std=std, method="sde",
                               key=jax.random.PRNGKey(14), num_steps=100, noise_scale=0.0)
        # drift-only EM: x - mu proportional to V(t); first order, so about 1% at 100 steps
        ratio = (s0**2 + ve_lambda2(sigma, t_end)) / (s0**2 + std**2)
        np.testing.assert_allclose(res.x, np.asarray(MU) + (np.asarray(noisy) - np.asarray(MU)) * ratio, atol=1e-2)
    np.testing.assert_allclose(np.sqrt(ve_lambda2(sigma, res.t_start)), std, rtol=1e-10)


def test_denoise_vp_scales_by_mean_coefficient():
    """VP: lambda(t*)/alpha(t*) = std, start from alpha(t*) noisy; standardised value preserved."""
    s0, std, t_end = 0.3, 0.5, 1e-3
    sde = VPSDE()
    x0 = MU + s0 * jax.random.normal(jax.random.PRNGKey(15), (4, 1, 2, 2))
    noisy = x0 + std * jax.random.normal(jax.random.PRNGKey(16), x0.shape)
    res = sampling.denoise(gaussian_score(sde, MU, s0), sde, noisy, noise_std=std, rtol=1e-9, atol=1e-9)
    ts = float(res.t_start[0])
    a = lambda t: math.exp(-0.5 * (0.1 * t + 0.5 * 19.9 * t * t))  # noqa: E731
    V = lambda t: a(t) ** 2 * s0**2 + 1 - math.exp(-(0.1 * t + 0.5 * 19.9 * t * t))  # noqa: E731
    np.testing.assert_allclose(math.sqrt(1 / a(ts) ** 2 - 1), std, rtol=1e-9)
    z = (a(ts) * np.asarray(noisy) - a(ts) * np.asarray(MU)) / math.sqrt(V(ts))
    np.testing.assert_allclose(res.x, a(t_end) * np.asarray(MU) + z * math.sqrt(V(t_end)), atol=1e-7)


def test_denoise_per_image_noise_levels():
    sigma, s0 = 2.0, 0.3
    sde = VESDE(sigma)
    std = jnp.asarray([0.1, 0.4, 0.9])
    noisy = MU + jnp.asarray([0.2, -0.3, 0.5])[:, None, None, None]
    res = sampling.denoise(gaussian_score(sde, MU, s0), sde, noisy, noise_std=std, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(ve_lambda2(sigma, res.t_start)), std, rtol=1e-10)
    ratio = np.sqrt((s0**2 + ve_lambda2(sigma, 1e-3)) / (s0**2 + np.asarray(std) ** 2))[:, None, None, None]
    np.testing.assert_allclose(res.x, np.asarray(MU) + (np.asarray(noisy) - np.asarray(MU)) * ratio, atol=1e-7)


def test_generate_starts_from_the_prior():
    sigma, s0 = 5.0, 0.3
    sde = VESDE(sigma)
    score = gaussian_score(sde, MU, s0)
    res = sampling.generate(score, sde, (512, 1, 2, 2), jax.random.PRNGKey(17), rtol=1e-8, atol=1e-8,
                            return_trajectory=True, num_frames=2)
    start = np.asarray(res.trajectory[0])
    n = start.size
    assert abs(start.std() / math.sqrt(ve_lambda2(sigma, 1.0)) - 1) < 4.5 * math.sqrt(0.5 / n)
    assert abs(start.mean()) < 4.5 * math.sqrt(ve_lambda2(sigma, 1.0) / n)
    np.testing.assert_allclose(res.x, pf_characteristic(start, 1.0, 1e-3, sigma, s0), atol=1e-6)
    unit = sampling.generate(score, sde, (512, 1, 2, 2), jax.random.PRNGKey(17), method="sde",
                             num_steps=10, prior_std=1.0, return_trajectory=True, num_frames=2)
    assert abs(np.asarray(unit.trajectory[0]).std() - 1) < 4.5 * math.sqrt(0.5 / n)


def test_tweedie_denoise_is_the_posterior_mean():
    """Gaussian data: E[x0 | x_t] = mu + alpha s0^2 / V (x_t - alpha mu), VE (alpha = 1) and VP."""
    s0 = 0.3
    x = MU + 0.8 * jax.random.normal(jax.random.PRNGKey(21), (5, 1, 2, 2), jnp.float64)
    t = jnp.asarray([1e-3, 0.05, 0.2, 0.5, 1.0], jnp.float64)
    for sde in (VESDE(2.0), VPSDE()):
        out = np.asarray(sampling.tweedie_denoise(gaussian_score(sde, MU, s0), sde, x, t))
        lam = np.asarray(jax.vmap(sde.perturbation_std)(t), np.float64)
        a = (np.asarray(jax.vmap(sde.marginal_mean_coeff)(t), np.float64) if hasattr(sde, "marginal_mean_coeff")
             else np.ones_like(lam))
        V = a**2 * s0**2 + lam**2
        w = (a * s0**2 / V)[:, None, None, None]
        want = np.asarray(MU) + w * (np.asarray(x) - a[:, None, None, None] * np.asarray(MU))
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    # a scalar time broadcasts, and the result keeps float32 inputs float32
    x32 = x.astype(jnp.float32)
    sde = VESDE(2.0)
    out32 = sampling.tweedie_denoise(gaussian_score(sde, MU, s0), sde, x32, 0.5)
    assert out32.dtype == jnp.float32 and out32.shape == x.shape


def test_final_denoise_recovers_a_point_mass():
    """Data at one point (s0 = 0): the ODE ends at x0 + lambda(t_end)/lambda(1) (x_T - x0), still
    off by the residual noise; Tweedie's last step lands on x0 exactly, with one more evaluation."""
    sigma, t_end = 2.0, 1e-3
    sde = VESDE(sigma)
    score = gaussian_score(sde, MU, 0.0)
    kw = dict(rtol=1e-9, atol=1e-9, return_trajectory=True, num_frames=3, t_end=t_end)
    plain = sampling.generate(score, sde, (8, 1, 2, 2), jax.random.PRNGKey(22), **kw)
    final = sampling.generate(score, sde, (8, 1, 2, 2), jax.random.PRNGKey(22), final_denoise=True, **kw)
    start = np.asarray(plain.trajectory[0])
    np.testing.assert_allclose(plain.x, pf_characteristic(start, 1.0, t_end, sigma, 0.0), atol=1e-7)
    assert np.abs(np.asarray(plain.x) - np.asarray(MU)).max() > 1e-2  # lambda(1e-3) = 0.032 of noise left
    np.testing.assert_allclose(final.x, np.broadcast_to(np.asarray(MU), final.x.shape), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(final.trajectory[-1]), np.asarray(final.x))
    np.testing.assert_array_equal(np.asarray(final.trajectory[:-1]), np.asarray(plain.trajectory[:-1]))
    assert int(final.num_score_evals) == int(plain.num_score_evals) + 1
    # denoise (ODE and SDE) takes the same last step
    noisy = MU + 0.4 * jax.random.normal(jax.random.PRNGKey(23), (3, 1, 2, 2), jnp.float64)
    d = sampling.denoise(score, sde, noisy, noise_std=0.4, final_denoise=True, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d.x, np.broadcast_to(np.asarray(MU), d.x.shape), atol=1e-7)
    e = sampling.denoise(score, sde, noisy, noise_std=0.4, method="sde", key=jax.random.PRNGKey(24),
                         num_steps=20, final_denoise=True)
    assert int(e.num_score_evals) == 21
    np.testing.assert_allclose(e.x, np.broadcast_to(np.asarray(MU), e.x.shape), atol=1e-6)


# ------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise():
    sde = VESDE(2.0)
    score = gaussian_score(sde, MU, 0.3)
    x = jnp.zeros((2, 1, 2, 2))
    key = jax.random.PRNGKey(0)
    lam1 = float(np.sqrt(ve_lambda2(2.0, 1.0)))
    cases = [
        (lambda: sampling.denoise(score, sde, x, noise_std=0.0), "noise_std"),
        (lambda: sampling.denoise(score, sde, x, noise_std=-0.1), "noise_std"),
        (lambda: sampling.denoise(score, sde, x, noise_std=float("nan")), "noise_std"),
        (lambda: sampling.denoise(score, sde, x, noise_std=1.01 * lam1), "noise_std"),
        (lambda: sampling.denoise(score, sde, x, noise_std=0.001), "noise_std"),  # below lambda(t_end)
        (lambda: sampling.denoise(score, sde, x, noise_std=jnp.ones(3) * 0.3), "noise_std"),
        (lambda: sampling.denoise(score, ConstLambdaSDE(0.5), x, noise_std=0.1), "sde"),
        (lambda: sampling.denoise(score, sde, x, noise_std=0.3, method="sde"), "key"),
        (lambda: sampling.denoise(score, sde, x, noise_std=0.3, method="magic"), "method"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=0), "num_steps"),
        (lambda: sampling.euler_maruyama(score, sde, x[0], key, num_steps=5), "x_T"),
        (lambda: sampling.euler_maruyama(score, sde, x.at[0, 0, 0, 0].set(jnp.nan), key, num_steps=5), "x_T"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=5, t_start=1e-3, t_end=1e-3), "t_start"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=5, t_start=jnp.ones(3)), "t_start"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=5, t_end=-0.1), "t_end"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=5, clip=(1.0, 0.0)), "clip"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=5, noise_scale=-1.0), "noise_scale"),
        (lambda: sampling.euler_maruyama(score, sde, x, key, num_steps=5, return_trajectory=True,
                                         num_frames=7), "num_frames"),
        (lambda: sampling.euler_maruyama(lambda x, t: x[:, :1, :1], sde, x, key, num_steps=5), "score_fn"),
        (lambda: sampling.probability_flow(score, sde, x, solver="rk4"), "solver"),
        (lambda: sampling.probability_flow(score, sde, x, solver="euler"), "num_steps"),
        (lambda: sampling.probability_flow(score, sde, x, solver="euler", num_steps=0), "num_steps"),
        (lambda: sampling.probability_flow(score, sde, x, rtol=0.0), "rtol"),
        (lambda: sampling.generate(score, sde, (2, 1, 2), key), "shape"),
        (lambda: sampling.generate(score, sde, (2, 1, 2, 2), key, prior_std=0.0), "prior_std"),
        (lambda: sampling.generate(score, sde, (2, 1, 2, 2), key, t_end=0.0, final_denoise=True), "final_denoise"),
        (lambda: sampling.denoise(score, sde, x, noise_std=0.3, t_end=0.0, final_denoise=True), "final_denoise"),
        (lambda: sampling.tweedie_denoise(score, sde, x, 0.0), "t: expected times > 0"),
        (lambda: sampling.tweedie_denoise(score, sde, x, jnp.ones(3)), "t"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
    with pytest.raises(TypeError, match="x_T"):
        sampling.euler_maruyama(score, sde, jnp.zeros((2, 1, 2, 2), jnp.int32), key, num_steps=5)
    with pytest.raises(TypeError, match="final_denoise"):
        sampling.generate(score, sde, (2, 1, 2, 2), key, final_denoise="yes")


def test_with_team_sde_module():
    """The same closed forms with krylovjax.sde's classes (skipped until that module exists)."""
    sde_mod = pytest.importorskip("krylovjax.sde")
    sigma, s0 = 2.0, 0.3
    ve = sde_mod.VESDE(sigma)
    std = jnp.asarray([0.2, 0.7])
    np.testing.assert_allclose(np.sqrt(ve_lambda2(sigma, sampling.start_time(ve, std))), std, rtol=1e-10)
    noisy = MU + jnp.asarray([0.3, -0.5])[:, None, None, None]
    res = sampling.denoise(gaussian_score(ve, MU, s0), ve, noisy, noise_std=std, rtol=1e-9, atol=1e-9)
    ratio = np.sqrt((s0**2 + ve_lambda2(sigma, 1e-3)) / (s0**2 + np.asarray(std) ** 2))[:, None, None, None]
    np.testing.assert_allclose(res.x, np.asarray(MU) + (np.asarray(noisy) - np.asarray(MU)) * ratio, atol=1e-7)
    vp = sde_mod.VPSDE()
    t_vp = sampling.start_time(vp, std)
    np.testing.assert_allclose(vp.perturbation_std(t_vp) / vp.marginal_mean_coeff(t_vp), std, rtol=1e-9)
    with pytest.raises(ValueError, match="sde"):
        sampling.denoise(gaussian_score(ve, MU, s0), sde_mod.ConstantSDE(0.5, 0.1), noisy, noise_std=0.1)


# ------------------------------------------------------------------------ non-finite values


def test_start_time_under_jit_marks_an_unattainable_noise_level_nan():
    """Eagerly such a noise level raises; under jit it cannot, so t* is NaN (never t_min / t_max)."""
    ve = VESDE(5.0)
    with pytest.raises(ValueError, match="^noise_std: expected values in the SDE's range"):
        sampling.start_time(ve, 50.0)
    jitted = jax.jit(lambda s: sampling.start_time(ve, s))
    assert np.isnan(float(jitted(50.0)))
    t = np.asarray(jitted(jnp.asarray([0.3, 50.0, -1.0, np.nan])))
    np.testing.assert_allclose(t[0], sampling.start_time(ve, 0.3), rtol=1e-12)
    assert np.all(np.isnan(t[1:]))
    # the bisection path (VP) too, and a level below the SDE's range on [t_min, t_max]
    t_vp = np.asarray(jax.jit(lambda s: sampling.start_time(VPSDE(), s, t_min=0.5))(jnp.asarray([10.0, 1e6, 1e-3])))
    np.testing.assert_allclose(t_vp[0], sampling.start_time(VPSDE(), 10.0, t_min=0.5), rtol=1e-10)
    assert np.all(np.isnan(t_vp[1:]))


def _nan_below(t_cut, image):
    """An exact-looking score that is NaN for one image at times below ``t_cut``."""
    def score(x, t):
        bad = (t < t_cut)[:, None, None, None] & (jnp.arange(x.shape[0]) == image)[:, None, None, None]
        return jnp.where(bad, jnp.nan, -x)
    return score


def test_probability_flow_reports_a_non_finite_score_not_max_steps():
    sde = VESDE(5.0)
    x = jnp.zeros((2, 1, 8, 8))
    nan_score = lambda x, t: x * jnp.nan  # noqa: E731
    with pytest.raises(ValueError, match=r"^score_fn: returned non-finite values .* images \[0, 1\]"):
        sampling.probability_flow(nan_score, sde, x, max_steps=20)
    # NaN only from t = 0.5 on, for image 1; with frames (their unreached entries are inf)
    with pytest.raises(ValueError, match=r"^score_fn: returned non-finite values .* images \[1\]"):
        sampling.probability_flow(_nan_below(0.5, 1), sde, x + 1.0, max_steps=200, return_trajectory=True,
                                  num_frames=4)
    # a finite score that needs more steps is a max_steps problem
    with pytest.raises(RuntimeError, match="^max_steps: .* increase max_steps"):
        sampling.probability_flow(lambda x, t: -x, sde, x + 1.0, max_steps=3)
    # under jit: a run-time error whose message names the score first
    with pytest.raises(Exception, match="score_fn returned NaN or Inf"):
        jax.block_until_ready(jax.jit(lambda x: sampling.probability_flow(nan_score, sde, x, max_steps=20).x)(x))
    # a successful solve is unaffected, jitted or not
    r = jax.jit(lambda x: sampling.probability_flow(lambda x, t: -x, sde, x, return_trajectory=True, num_frames=3))(x + 1)
    assert r.trajectory.shape == (3, 2, 1, 8, 8) and bool(r.finite.all())
    np.testing.assert_array_equal(r.trajectory[-1], r.x)


def test_probability_flow_names_a_score_infinite_only_at_t_end():
    """A score scaled by 1 / lambda(t) (scale_by_sigma) is infinite at t_end = 0 only, where
    lambda(0) = 0: every step reaching t_end is rejected and the solver runs out of steps before
    it, however many it has. The message names the score at t_end (before 2026-12-06 it said the
    score was finite and blamed max_steps); t_end = 1e-3 solves."""
    sde = VESDE(2.0)
    x = jnp.ones((2, 1, 4, 4))

    def scaled(x, t):
        return -x / jax.vmap(sde.perturbation_std)(t)[:, None, None, None]

    for max_steps in (64, 4096):  # more steps only creep closer to t_end
        with pytest.raises(ValueError, match=r"^score_fn: returned non-finite values .* images \[0, 1\] at "
                                             r"t = \[0\. 0\.\], t_end itself: .* whatever max_steps"):
            sampling.probability_flow(scaled, sde, x, t_end=0.0, max_steps=max_steps)
    r = sampling.probability_flow(scaled, sde, x, t_end=1e-3)
    assert bool(r.finite.all())


def test_probability_flow_tolerances_name_the_argument():
    sde = VESDE(2.0)
    x = jnp.zeros((2, 1, 2, 2))
    for kw, name in (({"rtol": "a"}, "rtol"), ({"atol": None}, "atol"), ({"atol": float("nan")}, "atol"),
                     ({"dt0": "x"}, "dt0")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            sampling.probability_flow(lambda x, t: -x, sde, x, **kw)


def test_samplers_flag_samples_a_non_finite_score_reached():
    sde = VESDE(2.0)
    x = jnp.ones((3, 1, 2, 2))
    key = jax.random.PRNGKey(0)
    score = _nan_below(0.5, 1)
    em = sampling.euler_maruyama(score, sde, x, key, num_steps=10)
    np.testing.assert_array_equal(em.finite, [True, False, True])
    assert np.isnan(np.asarray(em.x[1])).all() and np.isfinite(np.asarray(em.x[0])).all()
    jitted = jax.jit(lambda x: sampling.euler_maruyama(score, sde, x, key, num_steps=10))(x)
    np.testing.assert_array_equal(jitted.finite, [True, False, True])
    for solver in ("euler", "heun"):  # fixed steps: no solver failure, the flag tells
        r = sampling.probability_flow(score, sde, x, solver=solver, num_steps=10)
        np.testing.assert_array_equal(r.finite, [True, False, True])
    good = sampling.generate(gaussian_score(sde, MU, 0.3), sde, (2, 1, 2, 2), key, method="sde", num_steps=5,
                             final_denoise=True)
    np.testing.assert_array_equal(good.finite, [True, True])
    assert good.finite.dtype == jnp.bool_


def _mixture_score(sde, centres):
    """The exact score of the VE marginal of data spread evenly over ``centres [K, C, H, W]``: each
    image is drawn towards the centres near it, so different images need different steps."""
    def score(x, t):
        lam2 = jax.vmap(sde.perturbation_std)(t) ** 2
        d = x[:, None] - centres[None]
        w = jax.nn.softmax(-jnp.sum(d**2, axis=(2, 3, 4)) / (2 * lam2[:, None]), axis=1)
        return -jnp.sum(w[:, :, None, None, None] * d, axis=1) / lam2[:, None, None, None]
    return score


def test_per_image_step_control_makes_each_image_independent_of_the_batch():
    """With the batch as one ODE (the default), diffrax's error norm is an RMS over all images: an
    image's result moves (by ~1e-2 at rtol = atol = 1e-3) with the other images. ``per_image``
    solves each image with its own steps: the batch's result is that of each image alone (to
    rounding), jitted or not, with the batch's score calls those of the image needing the most steps."""
    sde = VESDE(2.0)
    rng = np.random.default_rng(0)
    centres = jnp.asarray(rng.uniform(0, 1, (3, 1, 6, 6)))
    score = _mixture_score(sde, centres)
    x = jnp.asarray(rng.standard_normal((4, 1, 6, 6)))
    t0 = jnp.asarray([1.0, 0.4, 0.8, 0.2])
    kw = dict(t_end=1e-3, return_trajectory=True, num_frames=3)
    alone = [sampling.probability_flow(score, sde, x[b:b + 1], t_start=t0[b:b + 1], **kw) for b in range(4)]
    batch = sampling.probability_flow(score, sde, x, t_start=t0, **kw)
    rows = sampling.probability_flow(score, sde, x, t_start=t0, step_control="per_image", **kw)
    jitted = jax.jit(lambda x: sampling.probability_flow(score, sde, x, t_start=t0, step_control="per_image", **kw))(x)
    for b in range(4):  # the same steps; the batched reductions of the score round differently (1e-14)
        np.testing.assert_allclose(rows.x[b], alone[b].x[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(rows.trajectory[:, b], alone[b].trajectory[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(jitted.x[b], alone[b].x[0], rtol=0, atol=1e-12)
    assert float(jnp.max(jnp.abs(batch.x - rows.x))) > 1e-4  # the shared steps' effect
    assert int(rows.num_score_evals) == max(int(a.num_score_evals) for a in alone)
    np.testing.assert_array_equal(rows.times, batch.times)
    assert bool(rows.finite.all())
    # fixed steps: per image changes nothing
    e1 = sampling.probability_flow(score, sde, x, t_start=t0, solver="heun", num_steps=10)
    e2 = sampling.probability_flow(score, sde, x, t_start=t0, solver="heun", num_steps=10, step_control="per_image")
    np.testing.assert_array_equal(e1.x, e2.x)


def test_score_args_carry_per_image_data_into_the_rows():
    """Per-image data (a per-image-offset model's indices) goes in ``score_args``: each row gets its
    own; denoise passes them on to the ODE, the SDE sampler and Tweedie's step alike. The exact
    score of image ``idx`` carries each noisy copy back to its own image."""
    sde = VESDE(2.0)
    rng = np.random.default_rng(1)
    clean = jnp.asarray(rng.uniform(0, 1, (3, 1, 5, 5)))

    def score(x, t, idx):
        lam2 = jax.vmap(sde.perturbation_std)(t)[:, None, None, None] ** 2
        return -(x - clean[idx]) / lam2

    idx = jnp.asarray([2, 0, 1, 2])
    noisy = clean[idx] + 0.2 * jnp.asarray(rng.standard_normal((4, 1, 5, 5)))
    for control in ("batch", "per_image"):
        r = sampling.denoise(score, sde, noisy, noise_std=0.2, score_args=(idx,), step_control=control,
                             final_denoise=True)
        np.testing.assert_allclose(r.x, clean[idx], atol=2e-3)
    r = sampling.denoise(score, sde, noisy, noise_std=0.2, method="sde", key=jax.random.PRNGKey(0), num_steps=50,
                         score_args=(idx,), final_denoise=True)
    np.testing.assert_allclose(r.x, clean[idx], atol=2e-3)  # Tweedie's step removes what the last step leaves
    with pytest.raises(ValueError, match=r"score_args\[0\]: expected the batch \(4\) as leading axis, got shape \(3,\)"):
        sampling.probability_flow(score, sde, noisy, score_args=(idx[:3],))
    with pytest.raises(TypeError, match="score_args: expected a tuple of arrays"):
        sampling.denoise(score, sde, noisy, noise_std=0.2, score_args=idx)
    with pytest.raises(ValueError, match="step_control: expected 'batch' or 'per_image', got 'image'"):
        sampling.probability_flow(score, sde, noisy, score_args=(idx,), step_control="image")


def test_per_image_step_control_names_the_image_whose_score_is_not_finite():
    """The diagnosis of a failed solve names the batch index of the image that failed."""
    sde = VESDE(5.0)
    x = jnp.ones((3, 1, 4, 4))

    def score(x, t, image):
        return jnp.where(((t < 0.5) & (image == 2))[:, None, None, None], jnp.nan, -x)

    with pytest.raises(ValueError, match=r"^score_fn: returned non-finite values .* images \[2\] at t = \[0\.5\]"):
        sampling.probability_flow(score, sde, x, max_steps=200, step_control="per_image",
                                  score_args=(jnp.arange(3),))
    with pytest.raises(Exception, match="score_fn returned NaN or Inf"):
        jax.block_until_ready(jax.jit(lambda x: sampling.probability_flow(
            score, sde, x, max_steps=200, step_control="per_image", score_args=(jnp.arange(3),)).x)(x))


def test_noise_range_is_the_start_times_range():
    """noise_range gives the closed-form ends (VE: lambda; VP: lambda / alpha), and start_time
    accepts exactly that range."""
    lo, hi = sampling.noise_range(VESDE(2.0), t_min=1e-3, t_max=1.0, dtype=jnp.float64)
    np.testing.assert_allclose([lo, hi], np.sqrt(ve_lambda2(2.0, [1e-3, 1.0])), rtol=1e-12)
    vp = VPSDE()
    lo, hi = sampling.noise_range(vp, t_min=0.01, t_max=1.0, dtype=jnp.float64)
    t = jnp.asarray([0.01, 1.0], jnp.float64)
    np.testing.assert_allclose([lo, hi], vp.perturbation_std(t) / vp.marginal_mean_coeff(t), rtol=1e-12)
    sampling.start_time(vp, jnp.asarray([lo, hi]), t_min=0.01, t_max=1.0)
    with pytest.raises(ValueError, match="expected values in the SDE's range"):
        sampling.start_time(vp, jnp.asarray([hi * 1.01]), t_min=0.01, t_max=1.0)


def test_keys_sde_steps_and_noise_range_bounds_are_named():
    """A walkthrough (2026-12-07): ``key=None`` reached JAX ("unexpected PRNG key type NoneType");
    ``method="sde"`` without ``num_steps`` failed in euler_maruyama's signature; ``noise_range`` with
    ``t_min > t_max`` returned the pair reversed. Each is refused naming the argument."""
    from krylovjax import ddpm
    from krylovjax import sde as sde_lib

    sde = sde_lib.VESDE(2.0)
    x = jnp.zeros((2, 1, 8, 8))
    score = lambda x, t: -x  # noqa: E731
    key_msg = r"^key: expected a JAX PRNG key \(jax.random.key\(seed\) or jax.random.PRNGKey\(seed\)\), got "
    for call, name in [(lambda k: sampling.euler_maruyama(score, sde, x, k, num_steps=3), "euler_maruyama"),
                       (lambda k: sampling.generate(score, sde, (2, 1, 8, 8), k), "generate"),
                       (lambda k: ddpm.ddpm_ancestral_sample(lambda x, i: 0 * x, x, k,
                                                             schedule=ddpm.DDPMSchedule.linear(10)), "ancestral")]:
        with pytest.raises(TypeError, match=key_msg + "NoneType"):
            call(None)
        with pytest.raises(TypeError, match=key_msg + "int"):
            call(7)
        with pytest.raises(TypeError, match=key_msg + "ndarray of dtype float"):
            call(np.zeros(2))
        with pytest.raises(TypeError, match=r"^key: expected one PRNG key, got an array of keys of shape \(3,\)"):
            call(jax.random.split(jax.random.key(0), 3))
        for key in (jax.random.PRNGKey(0), jax.random.key(0)):  # both kinds of key are taken
            assert call(key).x.shape == x.shape, name
    # a raw key of another default implementation (rbg: uint32[4], common on TPUs; a review)
    impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        assert sampling.euler_maruyama(score, sde, x, jax.random.PRNGKey(0), num_steps=3).x.shape == x.shape
    finally:
        jax.config.update("jax_default_prng_impl", impl)
    # DDIM uses no key: one given is left alone
    sched = ddpm.DDPMSchedule.linear(10)
    assert ddpm.ddpm_denoise(lambda x, i: 0 * x, x, 0.1, key=3, schedule=sched, method="ddim").x.shape == x.shape
    assert ddpm.ddim_sample(lambda x, i: 0 * x, x, schedule=sched, num_steps=5, key=3).x.shape == x.shape
    with pytest.raises(TypeError, match=key_msg + "int"):
        ddpm.ddpm_denoise(lambda x, i: 0 * x, x, 0.1, key=3, schedule=ddpm.DDPMSchedule.linear(10))
    for call in (lambda: sampling.denoise(score, sde, x, noise_std=0.1, method="sde", key=jax.random.PRNGKey(0)),
                 lambda: sampling.generate(score, sde, (2, 1, 8, 8), jax.random.PRNGKey(0), method="sde")):
        with pytest.raises(ValueError, match=r"^num_steps: required for method='sde'"):
            call()
    with pytest.raises(ValueError, match=r"^t_min, t_max: expected 0 <= t_min < t_max, got 1.0, 0.1"):
        sampling.noise_range(sde, t_min=1.0, t_max=0.1)
    lo, hi = sampling.noise_range(sde, t_min=0.1, t_max=1.0)
    assert 0 < lo < hi
    # a key traced inside jit is still taken
    assert jax.jit(lambda k: sampling.euler_maruyama(score, sde, x, k, num_steps=3).x)(jax.random.PRNGKey(1)).shape == x.shape
