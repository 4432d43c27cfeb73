"""Tests for krylovjax.transport.embed: identities, linearity, loops, closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import sde as S
from krylovjax.transport import embed, paper_a_indices

B, C, N, H, W = 2, 3, 6, 5, 7


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (B, C, H, W))
    scores = rng.standard_normal((B, C, N, 2, H, W))
    t, dt = S.time_grid(N)
    return images, scores, np.asarray(t), dt


def _loop(images, scores, sde, t, dt, component="sum"):
    """Hand-written reference: x^n = x^{n-1} + (f(x^{n-1}, t_n) - g(t_n)^2/2 s^n) dt."""
    s = {"sum": scores[:, :, :, 0] + scores[:, :, :, 1], "x": scores[:, :, :, 0]}[component]
    out = np.zeros((B, N, C, H, W))
    for b in range(B):
        x = images[b].copy()
        out[b, 0] = x
        for n in range(1, N):
            f = np.asarray(sde.drift(jnp.asarray(x), t[n]))
            x = x + (f - 0.5 * float(sde.g2(t[n])) * s[b, :, n]) * dt
            out[b, n] = x
    return out


@pytest.mark.parametrize("sde", [S.VESDE(5.0), S.ConstantSDE(), S.VPSDE(0.1, 20.0)])
@pytest.mark.parametrize("component", ["sum", "x"])
def test_matches_python_loop(setup, sde, component):
    images, scores, t, dt = setup
    x = np.asarray(embed(images, scores, sde, t, dt, component=component))
    assert x.shape == (B, N, C, H, W)
    np.testing.assert_allclose(x, _loop(images, scores, sde, t, dt, component), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde", [S.VESDE(2.0), S.ConstantSDE()])
def test_zero_score_is_identity(setup, sde):
    images, scores, t, dt = setup
    x = np.asarray(embed(images, np.zeros_like(scores), sde, t, dt))
    np.testing.assert_array_equal(x, np.broadcast_to(images[:, None], x.shape))


def test_zero_score_vp_is_euler_of_the_drift(setup):
    images, scores, t, dt = setup
    vp = S.VPSDE(0.1, 20.0)
    x = np.asarray(embed(images, np.zeros_like(scores), vp, t, dt))
    factors = np.cumprod(np.concatenate([[1.0], 1 - 0.5 * np.asarray(vp.beta(t[1:])) * dt]))
    np.testing.assert_allclose(x, factors[None, :, None, None, None] * images[:, None], rtol=1e-13)


@pytest.mark.parametrize("sde", [S.VESDE(5.0), S.VPSDE(0.1, 20.0)])
def test_linear_in_the_score(setup, sde):
    images, s1, t, dt = setup
    s2 = np.random.default_rng(1).standard_normal(s1.shape)
    a, b = 0.7, -1.9
    base = np.asarray(embed(images, np.zeros_like(s1), sde, t, dt))
    d1 = np.asarray(embed(images, s1, sde, t, dt)) - base
    d2 = np.asarray(embed(images, s2, sde, t, dt)) - base
    d12 = np.asarray(embed(images, a * s1 + b * s2, sde, t, dt)) - base
    np.testing.assert_allclose(d12, a * d1 + b * d2, rtol=1e-10, atol=1e-12)


def test_score_index_used_at_each_step(setup):
    """Step n -> uses s^n (score at t_n); s^0 is never used."""
    images, _, t, dt = setup
    s = np.zeros((B, C, N, 2, H, W))
    s[:, :, 0] = 5.0  # the initial score: no effect
    x = np.asarray(embed(images, s, S.VESDE(5.0), t, dt))
    np.testing.assert_array_equal(x, np.broadcast_to(images[:, None], x.shape))
    s[:, :, 0] = 0.0
    s[:, :, 3, 0] = 1.0
    x = np.asarray(embed(images, s, S.VESDE(5.0), t, dt))
    np.testing.assert_array_equal(x[:, :3], np.broadcast_to(images[:, None], (B, 3, C, H, W)))
    np.testing.assert_allclose(x[:, 3:] - images[:, None], -0.5 * 5.0 ** (2 * t[3]) * dt, rtol=1e-13)


def test_constant_score_closed_form_geometric_series():
    """VE, time-independent score field c: x^n = x^0 - c/2 dt sum_{k=1}^n sigma^(2 t_k)."""
    sigma, n_t = 5.0, 9
    t, dt = S.time_grid(n_t, eps=1e-3)
    rng = np.random.default_rng(2)
    img = rng.uniform(size=(1, 1, 4, 4))
    c = rng.standard_normal((4, 4))
    scores = np.zeros((1, 1, n_t, 2, 4, 4))
    scores[0, 0, :, 0] = c
    x = np.asarray(embed(img, scores, S.VESDE(sigma), t, dt))
    r = sigma ** (2 * dt)
    n = np.arange(n_t)
    geom = sigma ** (2 * 1e-3) * r * (r**n - 1) / (r - 1)  # sum_{k=1}^n sigma^(2 (eps + k dt))
    np.testing.assert_allclose(x[0, :, 0], img[0, 0] - 0.5 * dt * geom[:, None, None] * c, rtol=1e-12)


def test_float32_and_jit(setup):
    images, scores, t, dt = setup
    sde = S.VESDE(2.0)
    x32 = embed(images.astype(np.float32), scores.astype(np.float32), sde, t.astype(np.float32), dt)
    assert x32.dtype == jnp.float32
    f = jax.jit(lambda im, s, tt: embed(im, s, sde, tt, dt))
    np.testing.assert_allclose(f(images, scores, t), embed(images, scores, sde, t, dt), rtol=1e-13)


def test_paper_a_indices():
    assert paper_a_indices(101, 10) == (1, 12, 23, 34, 45, 56, 67, 78, 89, 100)
    assert paper_a_indices(6, 3) == (1, 3, 5)
    assert paper_a_indices(5, 1) == (4,)
    assert paper_a_indices(3, 4) == (1, 1, 2, 2)


def test_paper_a_variant_matches_loop(setup):
    images, scores, t, dt = setup
    sde = S.ConstantSDE()
    key = jax.random.PRNGKey(7)
    K = 3
    out = np.asarray(embed(images, scores, sde, t, dt, variant="paper_a", component="x", key=key, num_embed=K))
    assert out.shape == (B, K + 1, C, H, W)
    idx = paper_a_indices(N, K)
    xi = np.asarray(jax.random.normal(key, (B, K, C, H, W), jnp.float64))
    ref = np.zeros_like(out)
    for b in range(B):
        x = images[b].copy()
        ref[b, 0] = x
        for k, n in enumerate(idx):
            x = x - 0.5 * 0.25 * scores[b, :, n, 0] * dt + 0.1 * 0.5 * np.sqrt(dt) * xi[b, k]
            x = np.clip(x, 0.0, 1.0)
            ref[b, k + 1] = x
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # The clamp is active: a huge score pins pixels to the range ends.
    big = np.asarray(embed(images, 1e3 * scores, sde, t, dt, variant="paper_a", component="x", key=key, num_embed=K))
    assert np.isin(big[:, 1:], [0.0, 1.0]).mean() > 0.9
    # Without noise, with no clamping active, it equals the selected deterministic steps.
    quiet = np.asarray(
        embed(images, 1e-3 * scores, sde, t, dt, variant="paper_a", component="x", key=key, num_embed=K, noise_scale=0.0)
    )
    steps = np.cumsum([-0.5 * 0.25 * 1e-3 * scores[:, :, n, 0] * dt for n in idx], axis=0)
    np.testing.assert_allclose(quiet[:, 1:], images[:, None] + np.moveaxis(steps, 0, 1), rtol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(scores=np.zeros((B, C, N, 3, H, W))), "scores must have shape"),
        (dict(scores=np.zeros((B, C, N, 2, H, W + 1))), "scores must have shape"),
        (dict(t=np.zeros(N + 1)), "t must have shape"),
        (dict(dt=0.0), "dt: expected finite values > 0"),
        (dict(variant="ddim"), "variant"),
        (dict(component="norm"), "component"),
        (dict(variant="paper_a"), "key must be given"),
        (dict(images=np.full((B, C, H, W), 2.0)), r"\[0, 1\]"),
        (dict(scores=np.zeros((B, C, 1, 2, H, W)), t=np.zeros(1)), "N >= 2"),
    ],
)
def test_bad_input(setup, kw, match):
    images, scores, t, dt = setup
    args = dict(images=images, scores=scores, t=t, dt=dt)
    kw = dict(kw)
    opts = {k: kw.pop(k) for k in ("variant", "component") if k in kw}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        embed(args["images"], args["scores"], S.VESDE(2.0), args["t"], args["dt"], **opts)



def _spoil(scores, t, what):
    """Copies of (scores, t) with one defect."""
    scores, t = scores.copy(), t.copy()
    if what == "scores_nan":
        scores[1, 2, 3, 0, 4, 5] = np.nan
    elif what == "scores_inf":
        scores[0, 0, 1, 1, 0, 0] = -np.inf
    elif what == "t_nan":
        t[2] = np.nan
    elif what == "t_reversed":
        t = t[::-1].copy()
    elif what == "t_repeat":
        t[3] = t[2]
    return scores, t


@pytest.mark.parametrize(
    "what,dt,match",
    [
        (None, np.float32(-0.25), r"dt: expected finite values > 0, got -0.25"),
        (None, jnp.asarray(0.0), r"dt: expected finite values > 0"),
        (None, np.float64(np.nan), r"dt: expected finite values > 0"),
        (None, np.float64(np.inf), r"dt: expected finite values > 0"),
        (None, np.array([0.1, 0.2]), r"dt: expected a scalar time step, got shape \(2,\)"),
        ("scores_nan", None, r"scores: expected finite values, found NaN or Inf"),
        ("scores_inf", None, r"scores: expected finite values, found NaN or Inf"),
        ("t_nan", None, r"t: expected finite values, found NaN or Inf"),
        ("t_reversed", None, r"t: expected strictly increasing time levels \(sde.time_grid\), got t\[1\]"),
        ("t_repeat", None, r"t: expected strictly increasing time levels \(sde.time_grid\), got t\[3\] = "),
    ],
)
def test_bad_values_are_refused(setup, what, dt, match):
    """NumPy/JAX scalar dt <= 0 and NaN/inf in dt, scores or t, or a t that does not increase,
    are refused naming the argument; they used to give NaN or wrong trajectories silently."""
    images, scores, t, dt0 = setup
    scores, t = _spoil(scores, t, what)
    dt = dt0 if dt is None else dt
    with pytest.raises(ValueError, match=match):
        embed(images, scores, S.VESDE(2.0), t, dt)
    if what in ("scores_nan", "scores_inf"):  # traced scores are not inspected (no error in jit)
        jax.jit(lambda s: embed(images, s, S.VESDE(2.0), t, dt))(jnp.asarray(scores))
