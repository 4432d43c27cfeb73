"""Gaps found by hand-made mutation testing of the numerical modules (2026-12, see the report).

Each test pins down behaviour that a silently wrong variant of the code (a "mutant") used to
get past the rest of the suite, against an independent reference: a numpy / scipy assembly,
the closed form of the documented formula, or an invariant. The mutant each test kills is
named in its docstring.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.special import logsumexp

from krylovjax import ddpm
from krylovjax import initial as I
from krylovjax import metrics, sampling
from krylovjax.fokker_planck import fp_operator
from krylovjax.sde import VESDE, VPSDE


# ------------------------------------------------------------------------ log-FP operator


def _central_div(fx, fy, h):
    """div f by central differences on a field padded with one ghost ring ([H+2, W+2])."""
    return ((fx[1:-1, 2:] - fx[1:-1, :-2]) + (fy[2:, 1:-1] - fy[:-2, 1:-1])) / (2 * h)


@pytest.mark.parametrize("boundary", ["zero", "reflect"])
@pytest.mark.parametrize("scheme", ["consistent", "fitted"])
def test_drift_source_extrapolates_the_drift_linearly(scheme, boundary):
    """div_h(f) reads the ghost f as the linear extrapolation 2 f_0 - f_1 for every boundary (the
    boundary condition is one of m, BUILD_NOTES "Drift"); numpy's pad(mode="reflect",
    reflect_type="odd") is the reference. Mutants: zero ghosts (div f at the border off by
    f/2h), edge replication (half the border's normal derivative; the rule before 2026-12-06
    for reflect). The Dirichlet case is in tests/test_coverage_numerics.py."""
    rng = np.random.default_rng(21)
    H, W = 5, 7
    f = rng.normal(size=(2, H, W))
    g2, dt, h = 1.3, 0.05, 0.7
    op = fp_operator(g2, dt, h, drift=jnp.asarray(f), scheme=scheme, boundary=boundary)
    odd = lambda a: np.pad(a, 1, mode="reflect", reflect_type="odd")  # noqa: E731
    div = _central_div(odd(f[0]), odd(f[1]), h)
    m_prev = rng.normal(size=(H, W))
    np.testing.assert_allclose(np.asarray(op.rhs(jnp.asarray(m_prev))), m_prev - dt * div,
                               rtol=0, atol=1e-14)


def test_paper_b_drift_source_uses_the_flat_coupling():
    """scheme="paper_b": the scalar drift F = f_x + f_y is differenced like the unknowns, +-1
    along the row-major flat index (across row ends, zero beyond the two ends of the vector)
    and +-W vertically (zero outside), method.md 3.1-3.2. Explicit loop over the flat index.
    Mutant: the 2-D neighbours (a break at row ends) for the paper_b source."""
    rng = np.random.default_rng(22)
    H, W = 4, 5
    f = rng.normal(size=(2, H, W))
    g2, dt, h = 2.0, 0.1, 1.0
    op = fp_operator(g2, dt, h, drift=jnp.asarray(f), scheme="paper_b")
    F = (f[0] + f[1]).ravel()
    n = H * W

    def at(k):
        return F[k] if 0 <= k < n else 0.0

    div = np.array([(at(k + 1) - at(k - 1) + at(k + W) - at(k - W)) / (2 * h) for k in range(n)])
    np.testing.assert_allclose(np.asarray(op.rhs(jnp.zeros((H, W)))).ravel(), -dt * div,
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("scheme", ["consistent", "fitted"])
def test_operator_diffusion_number_is_the_shared_part(scheme):
    """FPOperator.diffusion is k = dt g2 / (2 h^2) per system, and I + k L (L the unscaled
    5-point negative Laplacian, a Kronecker sum) is the operator at zero score and drift: the
    part all systems share, which the preconditioners invert. Mutant: diffusion = 2k."""
    rng = np.random.default_rng(23)
    H, W = 4, 6
    g2, dt, h = np.array([0.7, 2.5]), np.array([0.1, 0.03]), 0.8
    op = fp_operator(jnp.asarray(g2), jnp.asarray(dt), h, jnp.asarray(rng.normal(size=(2, 2, H, W))),
                     scheme=scheme)
    zero = fp_operator(jnp.asarray(g2), jnp.asarray(dt), h, jnp.zeros((2, 2, H, W)), scheme=scheme)

    def lap(n):
        return sp.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1])

    L = sp.kron(sp.identity(H), lap(W)) + sp.kron(lap(H), sp.identity(W))
    k = np.asarray(op.diffusion).reshape(2)
    np.testing.assert_allclose(k, dt * g2 / (2 * h * h), rtol=1e-14)
    for b in range(2):
        np.testing.assert_allclose(zero.to_scipy(b).toarray(), (sp.identity(H * W) + k[b] * L).toarray(),
                                   rtol=0, atol=1e-14)


def test_paper_b_matrix_with_grid_spacing_and_non_square_grid():
    """method.md 3.2 with h = dh != 1 (the 2026 ablations use 0.5 to 4) and H != W:
    alpha = (f - g2/2 s) dt/(2h), delta = g2/2 dt/h^2, A = (1 + 2 g2 dt/h^2) I
    + diag_{+1}(a[k+1]) + diag_{-1}(c[k-1]) + diag_{+W}(a[k+W]) + diag_{-W}(c[k-W]),
    a = alpha + delta, c = alpha - delta (column node), assembled with scipy.sparse.diags.
    The suite checked this matrix at h = 1 only. Mutants: h instead of h^2 in the diffusion
    or the diagonal; h dropped from the advection."""
    rng = np.random.default_rng(24)
    H, W = 5, 7
    s = rng.normal(size=(2, 2, H, W))
    f = rng.normal(size=(2, 2, H, W))
    g2, dt, h = np.array([1.7, 4.0]), np.array([0.05, 0.02]), 0.6
    op = fp_operator(jnp.asarray(g2), jnp.asarray(dt), h, jnp.asarray(s), jnp.asarray(f), scheme="paper_b")
    n = H * W
    for b in range(2):
        alpha = ((f[b, 0] + f[b, 1]) - 0.5 * g2[b] * (s[b, 0] + s[b, 1])).ravel() * dt[b] / (2 * h)
        delta = 0.5 * g2[b] * dt[b] / h**2
        a, c = alpha + delta, alpha - delta
        A_ref = ((1 + 2 * g2[b] * dt[b] / h**2) * sp.identity(n) + sp.diags(a[1:], 1) + sp.diags(c[:-1], -1)
                 + sp.diags(a[W:], W) + sp.diags(c[:-W], -W))
        np.testing.assert_allclose(op.to_scipy(b).toarray(), A_ref.toarray(), rtol=0, atol=1e-14)


def test_non_finite_dirichlet_values_are_refused():
    """A NaN or Inf in the Dirichlet ghost ring would make every right-hand side NaN without
    a word; fp_operator refuses it as it does for the score and the drift.
    Mutant: the finite check on boundary_values dropped."""
    for bad in (np.nan, np.inf):
        gv = np.zeros((6, 6))
        gv[0, 2] = bad
        with pytest.raises(ValueError, match="boundary_values"):
            fp_operator(1.0, 0.1, 1.0, np.zeros((2, 4, 4)), boundary="dirichlet", boundary_values=gv)


# ------------------------------------------------------------------------ initial densities


def test_paper_a_kde_floor_where_the_density_underflows():
    """Paper A's density is floored at 1e-10 before normalising (A-code, method.md 1 item 4).
    On photographs the KDE never gets that low; here all samples sit on one corner pixel, so
    most of the grid is floored. Reference: scipy's gaussian_kde on the same samples.
    Mutant: the floor dropped (the far grid points get log-densities of about -1e5)."""
    H, W = 9, 9
    img = np.zeros((1, 1, H, W))
    img[0, 0, 0, 0] = 1.0
    key = jax.random.PRNGKey(4)
    kw = dict(num_samples=64, jitter=0.01, offset=1e-9)
    m = np.asarray(I.paper_a_kde(img, key, **kw))
    samples = np.asarray(I.paper_a_samples(img, key, **kw))
    dy, dx = 1 / (H - 1), 1 / (W - 1)
    Y, X = np.meshgrid(np.arange(H) * dy, np.arange(W) * dx, indexing="ij")
    raw = stats.gaussian_kde(samples[0].T).logpdf(np.stack([Y.ravel(), X.ravel()]))
    assert np.mean(raw < np.log(1e-10)) > 0.5  # the floor is what matters here
    lp = np.maximum(raw, np.log(1e-10))
    ref = lp - logsumexp(lp) - np.log(dx * dy)
    np.testing.assert_allclose(m[0, 0].ravel(), ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.exp(m[0, 0]).sum() * dx * dy, 1.0, rtol=1e-12)


def test_paper_a_samples_jitter_has_the_requested_std():
    """Sample positions are pixel centres (i/(H-1), j/(W-1)) plus N(0, jitter^2) noise per
    coordinate (A-code). All weight on one pixel: the offsets from it are the noise itself.
    Mutant: the jitter dropped (every sample exactly on the pixel)."""
    H, W = 6, 9
    img = np.zeros((1, 1, H, W))
    img[0, 0, 2, 5] = 1.0
    n, jit = 4000, 0.02
    s = np.asarray(I.paper_a_samples(img, jax.random.PRNGKey(7), num_samples=n, jitter=jit, offset=1e-12))
    d = s[0] - np.array([2 / (H - 1), 5 / (W - 1)])
    assert np.all(np.abs(d) < 6 * jit)  # every draw is the bright pixel
    np.testing.assert_allclose(d.mean(axis=0), 0.0, atol=5 * jit / math.sqrt(n))
    np.testing.assert_allclose(d.std(axis=0), jit, rtol=5 * math.sqrt(0.5 / n))


# ------------------------------------------------------------------------ DDPM / DDIM


def test_ddim_noise_scale_for_fractional_eta():
    """DDIM's sigma^2 = eta^2 (1 - abar') / (1 - abar) (1 - abar / abar') (Song et al. eq. 16).
    The suite checked eta = 0 and eta = 1 only, where eta and eta^2 agree. With eps_fn = 0 and
    two DDIM steps (T-1 -> 0 -> final) the output is x_T / sqrt(abar_T) + sigma_1 z /
    sqrt(abar_0): its spread over many draws from one x_T gives sigma_1 (numpy schedule).
    Mutant: sigma^2 proportional to eta (4096 draws: 2x the variance at eta = 0.5)."""
    T, n, eta = 50, 4096, 0.5
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1.0 - betas)
    sig2 = eta**2 * (1 - ab[0]) / (1 - ab[-1]) * (1 - ab[-1] / ab[0])
    want_var = sig2 / ab[0]
    x_T = jnp.full((n, 1, 2, 2), 0.3)
    r = ddpm.ddim_sample(lambda x, i: jnp.zeros_like(x), x_T,
                         schedule=ddpm.DDPMSchedule.linear(T), num_steps=2, eta=eta,
                         key=jax.random.PRNGKey(0))
    x = np.asarray(r.x)
    assert int(r.num_score_evals) == 2
    np.testing.assert_allclose(x.mean(), 0.3 / math.sqrt(ab[-1]), atol=5 * math.sqrt(want_var / x.size))
    assert abs(x.var() / want_var - 1) < 5 * math.sqrt(2 / x.size)


@pytest.mark.parametrize("variance", ["large", "small"])
def test_ancestral_two_step_chain_moments(variance):
    """Ho et al.'s Algorithm 2 on T = 2 with eps_fn = 0, from one x_T drawn many times: step
    i = 1 gives mean (coef1 / sqrt(abar_2) + coef2) x_T and variance sigma_1^2 (beta_2 for
    "large", the posterior variance for "small"); step i = 0 is x / sqrt(abar_1) with no noise.
    Reference: the posterior of q(x_1 | x_2, x_0) written out in numpy. The T = 200 Monte-Carlo
    test could not see noise added at the final step (std ~0.007 there).
    Mutant: noise at the last step (i >= 0)."""
    betas = np.array([0.1, 0.3])
    ab = np.cumprod(1 - betas)
    pvar1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    coef1 = betas[1] * math.sqrt(ab[0]) / (1 - ab[1])
    coef2 = (1 - ab[0]) * math.sqrt(1 - betas[1]) / (1 - ab[1])
    var1 = betas[1] if variance == "large" else pvar1
    n, xT = 8192, 0.7
    r = ddpm.ddpm_ancestral_sample(lambda x, i: jnp.zeros_like(x), jnp.full((n, 1, 1, 2), xT),
                                   jax.random.PRNGKey(1), schedule=ddpm.DDPMSchedule.from_betas(betas),
                                   variance=variance)
    x = np.asarray(r.x)
    want_mean = (coef1 / math.sqrt(ab[1]) + coef2) * xT / math.sqrt(ab[0])
    want_var = var1 / ab[0]
    assert abs(x.mean() - want_mean) < 5 * math.sqrt(want_var / x.size)
    assert abs(x.var() / want_var - 1) < 5 * math.sqrt(2 / x.size)


def test_denoise_start_step_is_nearest_in_variance():
    """denoise_start_step picks the step whose noise-to-signal (1 - abar)/abar is closest to
    noise_std^2 (docstring). Noise levels between the midpoint of two neighbouring steps' stds
    and the midpoint of their variances tell that rule apart from "closest in std"; numpy's
    running-product schedule is the reference. Mutant: nearest in std."""
    T = 1000
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    nsr = (1 - ab) / ab
    ks = np.array([3, 40, 300, 700, 990])
    lo, hi = np.sqrt(nsr[ks]), np.sqrt(nsr[ks + 1])
    s = np.sqrt(0.5 * ((lo + hi) / 2) ** 2 + 0.5 * (lo**2 + hi**2) / 2)  # between the midpoints
    want = np.array([np.argmin(np.abs(nsr - v**2)) for v in s])
    np.testing.assert_array_equal(want, ks)  # the variance rule keeps the lower step here
    np.testing.assert_array_equal(ddpm.denoise_start_step(s, schedule=ddpm.DDPMSchedule.linear(T)), want)


def test_ddim_step_with_clipped_x0_uses_the_matching_noise():
    """DDIM with clip_x0: after clipping the predicted x0 the step uses the noise consistent
    with it, eps' = (x - sqrt(abar) x0_clipped) / sqrt(1 - abar), so the update is
    x' = sqrt(abar') x0_clipped + sqrt(1 - abar') eps' (numpy reference on T = 3 with large
    betas; the state after the first of two steps, where 1 - abar' is not small).
    Mutants: the network's eps kept after clipping; the clip of x0 dropped (clip_x0 had no
    numerical test)."""
    betas = np.array([0.2, 0.3, 0.4])
    ab = np.cumprod(1 - betas)
    x_T = np.linspace(-3, 3, 8).reshape(2, 1, 2, 2)
    r = ddpm.ddim_sample(lambda x, i: 0.2 * x, jnp.asarray(x_T), schedule=ddpm.DDPMSchedule.from_betas(betas),
                         num_steps=2, clip_x0=(-1.0, 1.0), return_trajectory=True, num_frames=3)
    np.testing.assert_array_equal(np.asarray(r.times)[:, 0], [3, 1, 0])
    a, a_prev = ab[2], ab[0]  # step index 2 -> 0
    x0c = np.clip((x_T - math.sqrt(1 - a) * 0.2 * x_T) / math.sqrt(a), -1, 1)
    eps = (x_T - math.sqrt(a) * x0c) / math.sqrt(1 - a)
    want = math.sqrt(a_prev) * x0c + math.sqrt(1 - a_prev) * eps
    assert np.any(np.abs(x0c) == 1.0)  # the clip is active
    np.testing.assert_allclose(np.asarray(r.trajectory[1]), want, rtol=0, atol=1e-13)
    # the ancestral chain clips too: denoising from step 0 is one step, x0_clipped itself
    sch = ddpm.DDPMSchedule.linear(50)
    ab0 = 1 - 1e-4
    noisy = np.linspace(-3, 3, 8).reshape(2, 1, 2, 2)
    d = ddpm.ddpm_denoise(lambda x, i: 0.2 * x, jnp.asarray(noisy), 0.01, jax.random.PRNGKey(0),
                          schedule=sch, clip_x0=(-1.0, 1.0))
    assert np.all(np.asarray(d.t_start) == 1)
    x = math.sqrt(ab0) * noisy
    want = np.clip((x - math.sqrt(1 - ab0) * 0.2 * x) / math.sqrt(ab0), -1, 1)
    # atol: coef1 = beta / (1 - abar) at step 0 is 1 + 1e-13 in floating point
    np.testing.assert_allclose(np.asarray(d.x), want, rtol=0, atol=1e-12)


def test_ddim_timesteps_single_step_starts_at_start():
    """One DDIM step from step index ``start`` is just [start] (docstring), for every start.
    Mutant: the single step always taken from T - 1."""
    for start in (0, 7, 99):
        np.testing.assert_array_equal(ddpm.ddim_timesteps(100, 1, start=start), [start])
    np.testing.assert_array_equal(ddpm.ddim_timesteps(100, 1), [99])


# ------------------------------------------------------------------------ samplers


def test_euler_maruyama_steps_are_the_documented_recursion():
    """Euler-Maruyama evaluates f, g^2 and the score at the start of each step, t_k = t_start +
    k dt (docstring), with per-image dt; a numpy loop of that recursion is the reference. The
    Gaussian-marginal and first-order checks cannot see at which end of the step the score is
    taken (both variants converge at order 1; only a 3e-2 float32 tolerance elsewhere caught
    it). noise_scale = 0, VP SDE so f matters.
    Mutant: the score and g^2 taken at t_{k+1}."""
    sde = VPSDE(0.1, 20.0)
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=(2, 1, 3, 3))
    t_start, t_end, n = np.array([1.0, 0.6]), 0.05, 7

    def score(x, t):
        return -(x - 0.2) * (1.0 + t)[:, None, None, None] ** 2

    r = sampling.euler_maruyama(score, sde, jnp.asarray(x0), jax.random.PRNGKey(0),
                                t_start=jnp.asarray(t_start), t_end=t_end, num_steps=n,
                                noise_scale=0.0)
    beta = lambda t: 0.1 + t * (20.0 - 0.1)  # noqa: E731
    ref = x0.copy()
    for b in range(2):
        dt = (t_end - t_start[b]) / n
        x = x0[b]
        for k in range(n):
            t = t_start[b] + k * dt
            x = x + dt * (-0.5 * beta(t) * x - beta(t) * (-(x - 0.2) * (1.0 + t) ** 2))
        ref[b] = x
    np.testing.assert_allclose(np.asarray(r.x), ref, rtol=1e-12, atol=1e-12)


def test_euler_maruyama_adds_no_noise_at_the_last_step():
    """One step from t_start: no noise (docstring: "no noise at the last step"), so the result
    is x + dt (f - g^2 s) whatever the key. Mutant: noise at the last step too."""
    sde = VESDE(2.0)
    x0 = jnp.asarray(np.random.default_rng(6).normal(size=(3, 1, 2, 2)))
    score = lambda x, t: -x  # noqa: E731
    outs = [np.asarray(sampling.euler_maruyama(score, sde, x0, jax.random.PRNGKey(k), t_start=0.5,
                                               t_end=0.1, num_steps=1).x) for k in (0, 1)]
    dt = 0.1 - 0.5
    np.testing.assert_allclose(outs[0], np.asarray(x0) * (1 + dt * 2.0 ** (2 * 0.5)), rtol=1e-13)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_euler_maruyama_frame_times_follow_each_images_own_grid():
    """With t_start [B], image b's frames sit at t_start[b] + k (t_end - t_start[b]) / n for the
    kept states k (frame_positions): evenly spaced from its own start to t_end.
    Mutant: every image's frame times built with image 0's step."""
    t0, t_end, n = np.array([1.0, 0.5, 0.3]), 0.02, 12
    x = jnp.zeros((3, 1, 2, 2))
    r = sampling.euler_maruyama(lambda y, t: -y, VESDE(2.0), x, jax.random.PRNGKey(0),
                                t_start=jnp.asarray(t0), t_end=t_end, num_steps=n,
                                return_trajectory=True, num_frames=5)
    states = np.array([0, 3, 6, 9, 12])  # round(k * 12 / 4)
    want = t0[None, :] + states[:, None] * (t_end - t0[None, :]) / n
    np.testing.assert_allclose(np.asarray(r.times), want, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(r.times)[[0, -1]], [t0, [t_end] * 3], atol=1e-14)


def test_denoise_at_the_noise_level_of_t_end():
    """noise_std = lambda(t_end) is in range; its start time equals t_end in floating point
    (VE closed form, sigma 5, t_end 0.01 or 0.2), and denoise must still run (t_start nudged
    just above t_end: nothing left to integrate, so a zero score returns the input). The nudge
    is shared by both methods; the Euler-Maruyama one is the cheap one to compile.
    Mutant: no nudge, so the sampler refuses t_start == t_end."""
    sde = VESDE(5.0)
    noisy = jnp.asarray(np.random.default_rng(9).uniform(size=(2, 1, 3, 3)))
    for t_end in (0.01, 0.2):
        std = float(sde.perturbation_std(t_end))
        r = sampling.denoise(lambda y, t: jnp.zeros_like(y), sde, noisy, noise_std=std, method="sde",
                             key=jax.random.PRNGKey(0), t_end=t_end, num_steps=2, noise_scale=0.0)
        assert np.all(np.asarray(r.t_start) > t_end)
        np.testing.assert_allclose(np.asarray(r.t_start), t_end, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(r.x), np.asarray(noisy), rtol=0, atol=1e-12)


def test_start_time_sigma_one_under_jit():
    """VESDE(sigma = 1) is g = 1, lambda = sqrt(t), so t* = noise_std^2. Under jit the
    closed form is returned unchecked (the concrete path would fall back to bisection and hide
    a wrong closed form). Mutant: t* = noise_std for sigma = 1."""
    std = jnp.asarray([0.1, 0.4, 0.9])
    t = jax.jit(lambda s: sampling.start_time(VESDE(1.0), s))(std)
    np.testing.assert_allclose(np.asarray(t), np.asarray(std) ** 2, rtol=1e-12)
    concrete = sampling.start_time(VESDE(1.0), std)
    np.testing.assert_allclose(np.asarray(concrete), np.asarray(std) ** 2, rtol=1e-10)


def test_infinite_times_are_refused():
    """t_start = +inf passes "t_start > t_end" but makes every step NaN; the samplers refuse
    it (and tweedie_denoise an infinite t) up front. NaN is caught by the interval check too.
    Mutant: the finite check on the batch times dropped."""
    sde = VESDE(2.0)
    x = jnp.zeros((2, 1, 2, 2))
    score = lambda y, t: -y  # noqa: E731
    with pytest.raises(ValueError, match="t_start"):
        sampling.euler_maruyama(score, sde, x, jax.random.PRNGKey(0), t_start=np.inf, num_steps=2)
    with pytest.raises(ValueError, match="t_start"):
        sampling.probability_flow(score, sde, x, t_start=jnp.asarray([1.0, np.inf]))
    with pytest.raises(ValueError, match="^t"):
        sampling.tweedie_denoise(score, sde, x, np.inf)


def test_euler_maruyama_clip_uses_both_given_bounds():
    """clip=(low, high) clamps every state to [low, high]; the suite only used (0, 1), where
    high = low + 1. A score pushing the states outward reaches both bounds.
    Mutant: the upper bound taken as low + 1."""
    x = jnp.asarray(np.linspace(-1.0, 1.0, 8).reshape(2, 1, 2, 2))
    r = sampling.euler_maruyama(lambda y, t: 5.0 * y, VESDE(2.0), x, jax.random.PRNGKey(0),
                                t_start=1.0, t_end=0.5, num_steps=4, clip=(-0.5, 0.25),
                                noise_scale=0.0, return_trajectory=True, num_frames=5)
    traj = np.asarray(r.trajectory[1:])
    assert traj.min() == -0.5 and traj.max() == 0.25


def test_frame_positions_round_to_the_nearest_state():
    """Frame k is state round(k n / (F - 1)) (docstring); the suite's cases divide evenly,
    where rounding and truncation agree. Mutant: truncation."""
    for n, f in ((10, 4), (7, 4), (20, 7)):
        want = np.rint(np.arange(f) * n / (f - 1)).astype(int)  # no .5 ties in these cases
        np.testing.assert_array_equal(sampling.frame_positions(n, f), want)
    np.testing.assert_array_equal(sampling.frame_positions(10, 4), [0, 3, 7, 10])


# ------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("fn", ["psnr", "ssim", "global_ssim"])
def test_range_check_has_only_a_rounding_slack(fn):
    """Images must lie in [0, data_range] up to 1e-6 of it (metrics._check_range): a value
    1e-4 outside, above or below, is refused, for data_range 1 and 255.
    Mutants: a 1e-2 slack; no lower bound."""
    f = getattr(metrics, fn)
    rng = np.random.default_rng(8)
    for L in (1.0, 255.0):
        a = rng.uniform(0.1, 0.9, size=(1, 1, 16, 16)) * L
        for bad_value in (L * (1 + 1e-4), -1e-4 * L):
            b = a.copy()
            b[0, 0, 3, 4] = bad_value
            with pytest.raises(ValueError, match=r"b: expected values in \[0, data_range\]"):
                f(a, b, data_range=L)
        ok = a.copy()
        ok[0, 0, 3, 4] = L * (1 + 1e-7)
        assert np.all(np.isfinite(np.asarray(f(a, ok, data_range=L))))
