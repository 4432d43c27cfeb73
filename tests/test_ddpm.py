"""Tests of krylovjax.ddpm: schedule closed forms, loss, and samplers with an exact epsilon.

For data N(mu, s^2 I): x_k = sqrt(abar) x0 + sqrt(1 - abar) eps has the marginal
N(sqrt(abar) mu, V), V = abar s^2 + 1 - abar, and the exact (MMSE) epsilon predictor is
eps*(x_k) = E[eps | x_k] = sqrt(1 - abar) (x_k - sqrt(abar) mu) / V.
With eps* every reverse step is affine in x plus Gaussian noise, so the discrete chain's output
moments follow an exact scalar recursion; the tests compare Monte-Carlo moments with it and the
recursion with (mu, s^2).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import ddpm

MU = jnp.asarray([[[0.2, -0.4], [0.6, 0.1]]])  # [C=1, H=2, W=2]
S2 = 0.25


def exact_eps(schedule, mu=MU, s2=S2):
    ab = schedule.alpha_bars

    def eps(x, i):
        assert i.shape == (x.shape[0],) and jnp.issubdtype(i.dtype, jnp.integer)
        a = ab[i][:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s2 + 1 - a)

    return eps


def np_schedule(T, b0=1e-4, b1=0.02):
    """Independent numpy reference: betas, abar (by a running product), abar_prev."""
    betas = np.linspace(b0, b1, T)
    ab = np.empty(T)
    run = 1.0
    for i in range(T):
        run *= 1.0 - betas[i]
        ab[i] = run
    return betas, ab, np.concatenate([[1.0], ab[:-1]])


def exact_marginal(key, schedule, n):
    """n draws of x_T from the exact marginal of N(MU, S2) data, [n, 1, 2, 2]."""
    abT = float(schedule.alpha_bars[-1])
    return math.sqrt(abT) * MU + math.sqrt(abT * S2 + 1 - abT) * jax.random.normal(key, (n, 1, 2, 2))


def chain_variance(T, variance):
    """Exact output variance of the ancestral chain with eps* from the exact marginal at T.

    Written from Bayes' rule for q(x_{k-1} | x_k, x0) (precision sum), not from the library.
    """
    betas, ab, abp = np_schedule(T)
    v = ab[-1] * S2 + 1 - ab[-1]
    for i in range(T - 1, -1, -1):
        alpha = 1 - betas[i]
        V = ab[i] * S2 + 1 - ab[i]
        # x0_hat - mu = c (x - sqrt(ab) mu), c = (1 - (1 - ab)/V)/sqrt(ab) = sqrt(ab) S2 / V
        c = math.sqrt(ab[i]) * S2 / V
        if i == 0:
            A = c  # x_0 = x0_hat exactly (posterior variance 0)
            v = A * A * v
            break
        pvar = 1.0 / (1.0 / (1.0 - abp[i]) + alpha / betas[i])
        coef1 = pvar * math.sqrt(abp[i]) / (1.0 - abp[i])
        coef2 = pvar * math.sqrt(alpha) / betas[i]
        A = coef1 * c + coef2
        v = A * A * v + (pvar if variance == "small" else betas[i])
    return v


# ------------------------------------------------------------------------ schedule


def test_schedule_closed_forms():
    T = 300
    sch = ddpm.DDPMSchedule.linear(T, 1e-4, 0.02)
    betas, ab, abp = np_schedule(T)
    assert sch.num_steps == T
    np.testing.assert_allclose(sch.betas, betas, rtol=1e-15)
    np.testing.assert_allclose(sch.alpha_bars, ab, rtol=1e-12)
    np.testing.assert_allclose(sch.alpha_bars_prev, abp, rtol=1e-12)
    np.testing.assert_allclose(sch.sqrt_alpha_bars**2 + sch.sqrt_one_minus_alpha_bars**2, 1.0, rtol=1e-14)
    # x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps inverts x = sqrt(abar) x0 + sqrt(1 - abar) eps
    np.testing.assert_allclose(sch.sqrt_recip_alpha_bars * sch.sqrt_alpha_bars, 1.0, rtol=1e-14)
    np.testing.assert_allclose(sch.sqrt_recipm1_alpha_bars * sch.sqrt_alpha_bars, sch.sqrt_one_minus_alpha_bars, rtol=1e-12)
    # posterior q(x_{k-1} | x_k, x0) by Bayes: precision 1/(1 - abar_prev) + alpha/beta
    alpha = 1 - betas
    pvar = 1.0 / (1.0 / (1.0 - abp[1:]) + alpha[1:] / betas[1:])
    np.testing.assert_allclose(sch.posterior_variance[1:], pvar, rtol=1e-10)
    np.testing.assert_allclose(sch.posterior_mean_coef1[1:], pvar * np.sqrt(abp[1:]) / (1 - abp[1:]), rtol=1e-10)
    np.testing.assert_allclose(sch.posterior_mean_coef2[1:], pvar * np.sqrt(alpha[1:]) / betas[1:], rtol=1e-10)
    # first step: q(x_0 | x_1, x0) is the point mass at x0
    assert float(sch.posterior_variance[0]) == 0.0
    np.testing.assert_allclose([sch.posterior_mean_coef1[0], sch.posterior_mean_coef2[0]], [1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(sch.posterior_log_variance_clipped[0], np.log(pvar[0]), rtol=1e-12)
    # CelebA variant and float32 storage
    celeb = ddpm.DDPMSchedule.linear(1000, 1e-4, 0.002, dtype=jnp.float32)
    assert celeb.alpha_bars.dtype == jnp.float32
    np.testing.assert_allclose(celeb.alpha_bars[-1], np.prod(1 - np.linspace(1e-4, 0.002, 1000)), rtol=1e-5)
    # a pytree: passes through jit
    out = jax.jit(lambda s: s.alpha_bars[-1])(sch)
    np.testing.assert_allclose(out, ab[-1], rtol=1e-12)


def test_q_sample_moments():
    sch = ddpm.DDPMSchedule.linear(200)
    n = 20000
    x0 = jnp.broadcast_to(MU, (n, 1, 2, 2))
    t = jnp.full((n,), 120, jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    xt = np.asarray(ddpm.q_sample(x0, t, noise, schedule=sch))
    _, ab, _ = np_schedule(200)
    np.testing.assert_allclose(xt, math.sqrt(ab[120]) * np.asarray(x0) + math.sqrt(1 - ab[120]) * np.asarray(noise), rtol=1e-12)
    z = (xt - math.sqrt(ab[120]) * np.asarray(MU)) / math.sqrt(1 - ab[120])
    assert abs(z.mean()) < 4.5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 4.5 * math.sqrt(2 / z.size)
    with pytest.raises(ValueError, match="t"):
        ddpm.q_sample(x0[:2], jnp.asarray([0, 200]), noise[:2], schedule=sch)
    with pytest.raises(TypeError, match="t"):
        ddpm.q_sample(x0[:2], jnp.asarray([0.0, 1.0]), noise[:2], schedule=sch)
    with pytest.raises(ValueError, match="noise"):
        ddpm.q_sample(x0[:2], jnp.asarray([0, 1]), noise[:3], schedule=sch)


def test_epsilon_loss_expected_value():
    """With eps*, E[loss] = E_k[1 - (1 - abar)/V] = E_k[abar s^2 / V] (the MMSE of eps)."""
    sch = ddpm.DDPMSchedule.linear(200)
    n = 8192
    x0 = MU + math.sqrt(S2) * jax.random.normal(jax.random.PRNGKey(1), (n, 1, 2, 2))
    out = ddpm.epsilon_loss(exact_eps(sch), x0, jax.random.PRNGKey(2), schedule=sch)
    assert out.per_example.shape == (n,)
    np.testing.assert_allclose(out.mean, np.mean(out.per_example), rtol=1e-12)
    _, ab, _ = np_schedule(200)
    expected = np.mean(ab * S2 / (ab * S2 + 1 - ab))
    se = np.std(np.asarray(out.per_example)) / math.sqrt(n)
    assert abs(float(out.mean) - expected) < 4.5 * se
    # a point-mass data set has eps* = the noise itself: loss 0
    point = jnp.broadcast_to(MU, (16, 1, 2, 2))
    zero = ddpm.epsilon_loss(exact_eps(sch, s2=0.0), point, jax.random.PRNGKey(3), schedule=sch)
    assert float(zero.mean) < 1e-20
    # usable with value_and_grad(has_aux=True); gradient matches a central difference
    f = lambda p: ddpm.epsilon_loss(lambda x, i: p * x, x0[:64], jax.random.PRNGKey(4), schedule=sch)  # noqa: E731
    (val, aux), grad = jax.value_and_grad(f, has_aux=True)(0.3)
    fd = (f(0.3 + 1e-5).mean - f(0.3 - 1e-5).mean) / 2e-5
    np.testing.assert_allclose(grad, fd, rtol=1e-7)


def test_epsilon_loss_max_step_draws_only_the_first_steps():
    """``max_step = M``: step indices from {0, ..., M-1} only, all of them, and E[loss] is the
    MMSE of eps averaged over those steps (the closed form of the test above, restricted)."""
    sch = ddpm.DDPMSchedule.linear(200)
    n, m = 8192, 37
    x0 = MU + math.sqrt(S2) * jax.random.normal(jax.random.PRNGKey(1), (n, 1, 2, 2))
    seen = []
    exact = exact_eps(sch)

    def eps(x, i):
        seen.append(np.asarray(i))
        return exact(x, i)

    out = ddpm.epsilon_loss(eps, x0, jax.random.PRNGKey(2), schedule=sch, max_step=m)
    i = seen[0]
    assert i.min() == 0 and i.max() == m - 1 and len(np.unique(i)) == m
    _, ab, _ = np_schedule(200)
    mmse = ab * S2 / (ab * S2 + 1 - ab)  # per step
    expected, full = np.mean(mmse[:m]), np.mean(mmse)
    se = np.std(np.asarray(out.per_example)) / math.sqrt(n)
    assert abs(float(out.mean) - expected) < 4.5 * se
    assert abs(full - expected) > 20 * se  # the restriction is visible in the loss
    # max_step = T is the default draw exactly
    a = ddpm.epsilon_loss(exact, x0[:64], jax.random.PRNGKey(3), schedule=sch, max_step=200)
    b = ddpm.epsilon_loss(exact, x0[:64], jax.random.PRNGKey(3), schedule=sch)
    np.testing.assert_array_equal(a.per_example, b.per_example)
    for bad in (0, 201, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"max_step: expected None or an integer in \[1, 200\]"):
            ddpm.epsilon_loss(exact, x0[:4], jax.random.PRNGKey(3), schedule=sch, max_step=bad)


# ------------------------------------------------------------------------ samplers


def test_chain_recursion_is_close_to_data():
    """The exact discrete chain reproduces s^2 to within its discretisation error, shrinking with T."""
    for variance in ("large", "small"):
        e200 = abs(chain_variance(200, variance) / S2 - 1)
        e1000 = abs(chain_variance(1000, variance) / S2 - 1)
        assert e200 < 0.04 and e1000 < 0.02 and e1000 < e200


@pytest.mark.parametrize("variance", ["large", "small"])
def test_ancestral_sampler_reproduces_gaussian(variance):
    T, n = 200, 4096
    sch = ddpm.DDPMSchedule.linear(T)
    xT = exact_marginal(jax.random.PRNGKey(5), sch, n)
    res = ddpm.ddpm_ancestral_sample(exact_eps(sch), xT, jax.random.PRNGKey(6), schedule=sch, variance=variance)
    assert int(res.num_score_evals) == T
    x = np.asarray(res.x)
    z = (x - np.asarray(MU)) / math.sqrt(S2)
    m = z.size
    # mean: exact for the chain (affine steps with the exact posterior mean)
    assert abs(z.mean()) < 4.5 / math.sqrt(m)
    # variance: MC error around the chain's exact variance, which is close to s^2
    v_chain = chain_variance(T, variance) / S2
    assert abs(z.var() - v_chain) < 4.5 * math.sqrt(2 / m) * v_chain
    assert abs(z.var() - 1) < 4.5 * math.sqrt(2 / m) + 0.04


def test_ddim_eta_one_equals_ancestral_with_posterior_variance():
    sch = ddpm.DDPMSchedule.linear(100)
    xT = exact_marginal(jax.random.PRNGKey(7), sch, 64)
    a = ddpm.ddim_sample(exact_eps(sch), xT, schedule=sch, num_steps=100, eta=1.0, key=jax.random.PRNGKey(8))
    b = ddpm.ddpm_ancestral_sample(exact_eps(sch), xT, jax.random.PRNGKey(8), schedule=sch, variance="small")
    np.testing.assert_allclose(a.x, b.x, rtol=0, atol=1e-12)


def test_ddim_reproduces_gaussian_and_converges_first_order():
    """eta = 0 DDIM is a deterministic affine map for Gaussian data; read it off two points."""
    sch = ddpm.DDPMSchedule.linear(1000)
    abT = float(sch.alpha_bars[-1])
    vT, mT = abT * S2 + 1 - abT, math.sqrt(abT) * np.asarray(MU)
    pts = jnp.stack([jnp.zeros((1, 2, 2)), jnp.ones((1, 2, 2))])
    errs = []
    for steps in (25, 50, 100):
        out = np.asarray(ddpm.ddim_sample(exact_eps(sch), pts, schedule=sch, num_steps=steps).x)
        b, A = out[0], out[1] - out[0]
        np.testing.assert_allclose(A * mT + b, MU, atol=1e-12)  # mean exact
        errs.append(abs(A[0, 0, 0] ** 2 * vT / S2 - 1))
    np.testing.assert_allclose(np.log2(np.asarray(errs[:-1]) / np.asarray(errs[1:])), 1.0, atol=0.15)
    # Monte Carlo with the full 1000-step sampler (the baseline's DDIM)
    xT = exact_marginal(jax.random.PRNGKey(9), sch, 4096)
    res = ddpm.ddim_sample(exact_eps(sch), xT, schedule=sch, num_steps=1000, return_trajectory=True, num_frames=5)
    z = (np.asarray(res.x) - np.asarray(MU)) / math.sqrt(S2)
    assert abs(z.mean()) < 4.5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 4.5 * math.sqrt(2 / z.size) + 0.01
    assert res.trajectory.shape == (5, 4096, 1, 2, 2)
    np.testing.assert_array_equal(res.trajectory[0], xT)
    np.testing.assert_array_equal(res.trajectory[-1], res.x)
    np.testing.assert_array_equal(res.times[:, 0], [1000, 750, 500, 250, 0])


# ------------------------------------------------------------------------ denoise


def test_denoise_start_step_selection():
    sch = ddpm.DDPMSchedule.linear(1000)
    _, ab, _ = np_schedule(1000)
    nsr = (1 - ab) / ab
    sig = np.asarray([0.012, 0.1, 0.506, 1.0, 5.0, 50.0])
    ref = np.asarray([min(range(1000), key=lambda k: abs(nsr[k] - s**2)) for s in sig])
    np.testing.assert_array_equal(ddpm.denoise_start_step(sig, schedule=sch), ref)
    # exact grid levels map to themselves
    ks = np.asarray([0, 10, 500, 999])
    np.testing.assert_array_equal(ddpm.denoise_start_step(np.sqrt(nsr[ks]), schedule=sch), ks)
    for bad in (0.0, -1.0, float("nan"), 1.01 * math.sqrt(nsr[-1])):
        with pytest.raises(ValueError, match="noise_std"):
            ddpm.denoise_start_step(bad, schedule=sch)
    # inside a jit trace with the schedule closed over: the same steps (numpy on its arrays)
    got = jax.jit(lambda x: x + ddpm.denoise_start_step(sig, schedule=sch))(np.zeros(len(sig), np.int32))
    np.testing.assert_array_equal(np.asarray(got), ref)
    with pytest.raises(ValueError, match="schedule: expected concrete"):  # the schedule traced
        jax.jit(lambda s: ddpm.denoise_start_step(0.5, schedule=s))(sch)


def test_ddpm_denoise_gaussian():
    """noisy = x0 + sigma z with x0 ~ N(mu, s^2): the denoised output is ~ N(mu, s^2)."""
    sch = ddpm.DDPMSchedule.linear(1000)
    sigma, n = 0.3, 4096
    x0 = MU + math.sqrt(S2) * jax.random.normal(jax.random.PRNGKey(10), (n, 1, 2, 2))
    noisy = x0 + sigma * jax.random.normal(jax.random.PRNGKey(11), x0.shape)
    res = ddpm.ddpm_denoise(exact_eps(sch), noisy, sigma, jax.random.PRNGKey(12), schedule=sch)
    k = int(ddpm.denoise_start_step(sigma, schedule=sch))
    assert int(res.num_score_evals) == k + 1 and int(res.t_start[0]) == k + 1
    z = (np.asarray(res.x) - np.asarray(MU)) / math.sqrt(S2)
    assert abs(z.mean()) < 4.5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 4.5 * math.sqrt(2 / z.size) + 0.02
    # ancestral sampling draws from p(x0 | noisy): E|x - x0|^2 = 2 Var(x0 | noisy) = 2 s^2 sigma^2 / (s^2 + sigma^2)
    # (0.132 here; ignoring the noisy image gives 2 s^2 = 0.5, returning it sigma^2 = 0.09)
    mse = np.mean((np.asarray(res.x) - np.asarray(x0)) ** 2)
    np.testing.assert_allclose(mse, 2 * S2 * sigma**2 / (S2 + sigma**2), rtol=0.05)


def test_ddpm_denoise_per_image_levels_match_single_runs():
    sch = ddpm.DDPMSchedule.linear(200)
    noisy = MU + jnp.asarray([0.3, -0.2, 0.8])[:, None, None, None]
    sig = np.asarray([0.05, 0.3, 1.2])
    res = ddpm.ddpm_denoise(exact_eps(sch), noisy, sig, schedule=sch, method="ddim",
                            return_trajectory=True, num_frames=3)
    for b in range(3):
        single = ddpm.ddpm_denoise(exact_eps(sch), noisy[b:b + 1], float(sig[b]), schedule=sch, method="ddim")
        np.testing.assert_allclose(res.x[b], single.x[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.t_start, ddpm.denoise_start_step(sig, schedule=sch) + 1)
    # each image's frame times are its own: its start state until its first step, then the chain's
    times, traj = np.asarray(res.times), np.asarray(res.trajectory)
    np.testing.assert_array_equal(times[0], res.t_start)
    assert np.all(times <= np.asarray(res.t_start)[None]) and np.all(times[-1] == 0)
    for b in range(3):
        for f in range(3):
            waiting = times[f, b] == int(res.t_start[b])
            assert waiting == np.array_equal(traj[f, b], traj[0, b]), (f, b)
    assert (times[1] == np.asarray(res.t_start)).any() and (times[1] < np.asarray(res.t_start)).any()
    with pytest.raises(ValueError, match="key"):
        ddpm.ddpm_denoise(exact_eps(sch), noisy, 0.3, schedule=sch)
    with pytest.raises(ValueError, match="noise_std"):
        ddpm.ddpm_denoise(exact_eps(sch), noisy, np.ones(2), schedule=sch, method="ddim")


def test_bad_sampler_inputs():
    sch = ddpm.DDPMSchedule.linear(50)
    x = jnp.zeros((2, 1, 2, 2))
    key = jax.random.PRNGKey(0)
    eps = exact_eps(sch)
    with pytest.raises(ValueError, match="x_T"):
        ddpm.ddpm_ancestral_sample(eps, x[0], key, schedule=sch)
    with pytest.raises(TypeError, match="x_T"):
        ddpm.ddpm_ancestral_sample(eps, x.astype(jnp.int32), key, schedule=sch)
    with pytest.raises(ValueError, match="variance"):
        ddpm.ddpm_ancestral_sample(eps, x, key, schedule=sch, variance="learned")
    with pytest.raises(ValueError, match="num_steps"):
        ddpm.ddim_sample(eps, x, schedule=sch, num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        ddpm.ddim_sample(eps, x, schedule=sch, num_steps=51)
    with pytest.raises(ValueError, match="key"):
        ddpm.ddim_sample(eps, x, schedule=sch, num_steps=5, eta=0.5)
    with pytest.raises(ValueError, match="eps_fn"):
        ddpm.ddim_sample(lambda x, i: x[:, :, :1], x, schedule=sch, num_steps=5)
    with pytest.raises(ValueError, match="betas"):
        ddpm.DDPMSchedule.from_betas(np.asarray([0.1, 1.5]))
    with pytest.raises(ValueError, match="beta_start"):
        ddpm.DDPMSchedule.linear(10, 0.02, 1e-4)
    with pytest.raises(TypeError, match="schedule"):
        ddpm.ddim_sample(eps, x, schedule="linear", num_steps=5)


def test_float32_and_jit():
    sch = ddpm.DDPMSchedule.linear(100)
    xT = exact_marginal(jax.random.PRNGKey(13), sch, 8)
    r64 = ddpm.ddim_sample(exact_eps(sch), xT, schedule=sch, num_steps=20)
    r32 = ddpm.ddim_sample(exact_eps(sch), xT.astype(jnp.float32), schedule=sch, num_steps=20)
    assert r32.x.dtype == jnp.float32
    np.testing.assert_allclose(r32.x, r64.x, atol=1e-4)
    f = jax.jit(lambda x, k, s: ddpm.ddpm_ancestral_sample(exact_eps(s), x, k, schedule=s))
    np.testing.assert_allclose(f(xT, jax.random.PRNGKey(1), sch).x,
                               ddpm.ddpm_ancestral_sample(exact_eps(sch), xT, jax.random.PRNGKey(1), schedule=sch).x,
                               rtol=1e-12, atol=1e-12)


def test_q_sample_and_ddim_timesteps_reject_bad_values():
    sch = ddpm.DDPMSchedule.linear(50)
    x = jnp.zeros((2, 1, 2, 2))
    with pytest.raises(ValueError, match="^noise: expected finite values"):
        ddpm.q_sample(x, jnp.array([1, 2]), x * jnp.nan, schedule=sch)
    with pytest.raises(ValueError, match="^x0: expected finite values"):
        ddpm.q_sample(x * jnp.nan, jnp.array([1, 2]), x, schedule=sch)
    # traced values are not checked (no host sync inside jit)
    jax.jit(lambda x0, n: ddpm.q_sample(x0, jnp.array([1, 2]), n, schedule=sch))(x, x * jnp.nan)
    for start in (100, 20, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"^start: expected None or an integer step index in \[0, 19\]"):
            ddpm.ddim_timesteps(20, 5, start=start)
    np.testing.assert_array_equal(ddpm.ddim_timesteps(20, 5, start=np.int64(19)), [19, 14, 10, 5, 0])
    np.testing.assert_array_equal(ddpm.ddim_timesteps(20, 5, start=10), [10, 8, 5, 3, 0])
    with pytest.raises(ValueError, match="^num_diffusion_steps"):
        ddpm.ddim_timesteps(0, 1)


def test_samplers_flag_samples_a_non_finite_eps_reached():
    sch = ddpm.DDPMSchedule.linear(50)
    x = jnp.zeros((3, 1, 2, 2))
    key = jax.random.PRNGKey(0)
    eps = exact_eps(sch)

    def bad_eps(x, i):  # NaN for image 1 from step index 20 down
        out = eps(x, i)
        return jnp.where(((i <= 20) & (jnp.arange(x.shape[0]) == 1))[:, None, None, None], jnp.nan, out)

    for r in (ddpm.ddpm_ancestral_sample(bad_eps, x, key, schedule=sch),
              ddpm.ddim_sample(bad_eps, x, schedule=sch, num_steps=10),
              ddpm.ddpm_denoise(bad_eps, x, 0.5, key, schedule=sch),
              jax.jit(lambda x: ddpm.ddim_sample(bad_eps, x, schedule=sch, num_steps=10))(x)):
        np.testing.assert_array_equal(r.finite, [True, False, True])
    np.testing.assert_array_equal(ddpm.ddim_sample(eps, x, schedule=sch, num_steps=10).finite, True)
