"""The pre-computation pipeline: Krylov strategies equal the spsolve reference on real images."""
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import data
from krylovjax.precompute import PrecomputeConfig, precompute_scores


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(data.builtin_dataset(12, 3, seed=0), jnp.float64)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def references(images):
    out = {}
    for outer in ("sweeps", "timestep"):
        for scheme in ("consistent", "paper_b"):
            cfg = PrecomputeConfig(num_steps=5, outer=outer, scheme=scheme, strategy="spsolve",
                                   max_sweeps=12)
            out[outer, scheme] = precompute_scores(images, cfg)
    return out


@pytest.mark.parametrize("outer", ["sweeps", "timestep"])
@pytest.mark.parametrize("scheme,strategy", [
    ("consistent", "gmres"),
    ("consistent", "cross_matrix"),
    ("consistent", "cross_matrix_precond"),
    ("paper_b", "cross_matrix"),
])
def test_krylov_strategies_equal_spsolve(images, references, outer, scheme, strategy):
    ref = references[outer, scheme]
    cfg = PrecomputeConfig(num_steps=5, outer=outer, scheme=scheme, strategy=strategy,
                           max_sweeps=12, chunk_size=4)
    res = precompute_scores(images, cfg)
    assert res.log_density.shape == (3, 3, 5, 12, 12)
    assert res.scores.shape == (3, 3, 5, 2, 12, 12)
    assert res.stats["nonconverged"] == 0
    assert _rel(res.log_density, ref.log_density) < 1e-8
    assert _rel(res.scores, ref.scores) < 1e-8
    # Level 0 is the initial log-density, untouched.
    np.testing.assert_array_equal(res.log_density[:, :, 0], ref.log_density[:, :, 0])
    if outer == "sweeps":
        np.testing.assert_array_equal(res.stats["sweeps"], ref.stats["sweeps"])
        assert res.stats["matvecs"] > 0


def test_paper_b_reference_behaviour_converges(images):
    """Paper B's code settings: its scheme, scores, lagged score 1, time grid, sigma 5."""
    cfg = PrecomputeConfig(num_steps=10, scheme="paper_b", score_method="paper_b",
                           lag_init="ones", paper_b_time_grid=True, strategy="gmres",
                           outer_tol=1e-6, max_sweeps=30)
    res = precompute_scores(images, cfg)
    sweeps = res.stats["sweeps"]
    assert np.all(res.stats["outer_converged"]), res.stats
    assert np.all(sweeps >= 2) and np.all(sweeps <= 30)
    assert np.all(res.stats["outer_change"] <= 1e-6)


def test_converged_images_are_frozen(images):
    """Per-image masks: an image stops at its own sweep; the others go on without changing it."""
    cfg = PrecomputeConfig(num_steps=4, strategy="gmres", outer_tol=1e-4, max_sweeps=20)
    both = precompute_scores(images, cfg)
    alone = precompute_scores(images[:1], cfg)
    assert both.stats["sweeps"][0] == alone.stats["sweeps"][0]
    assert _rel(both.log_density[:1], alone.log_density) < 1e-9


def test_sweep_budget_reported(images):
    cfg = PrecomputeConfig(num_steps=4, strategy="gmres", outer_tol=1e-14, max_sweeps=2)
    res = precompute_scores(images, cfg)
    assert not np.any(res.stats["outer_converged"])
    assert np.all(res.stats["sweeps"] == 2)


def test_float32(images):
    cfg = PrecomputeConfig(num_steps=4, strategy="cross_matrix_precond", tol=1e-5,
                           outer_tol=1e-4, max_sweeps=10)
    res32 = precompute_scores(images.astype(jnp.float32), cfg)
    res64 = precompute_scores(images, cfg)
    assert res32.scores.dtype == jnp.float32
    assert _rel(res32.scores.astype(jnp.float64), res64.scores) < 1e-3


@pytest.mark.parametrize("bad, match", [
    (np.full((1, 3, 8, 8), 1.5), "images"),
    (np.full((1, 3, 8, 8), np.nan), "images"),
    (np.zeros((3, 8, 8)), "images"),
    (np.zeros((1, 2, 8, 8)), "images"),
    (np.zeros((1, 3, 3, 3)), "images"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        precompute_scores(bad, PrecomputeConfig(num_steps=3))


def test_bad_config():
    with pytest.raises(ValueError, match="strategy"):
        PrecomputeConfig(strategy="lu")
    with pytest.raises(ValueError, match="strategy"):
        PrecomputeConfig(scheme="paper_b", strategy="cross_matrix_precond")
    with pytest.raises(ValueError, match="outer"):
        PrecomputeConfig(outer="both")
    with pytest.raises(ValueError, match="num_steps"):
        PrecomputeConfig(num_steps=1)
    with pytest.raises(ValueError, match="seed_image"):
        precompute_scores(np.zeros((1, 3, 8, 8)), PrecomputeConfig(num_steps=3, seed_image=2))
