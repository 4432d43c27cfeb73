"""Sharded pre-computation (PrecomputeConfig(shard=True)) on the 4 CPU devices of conftest.py.

Each device solves its own shard of the systems (jax.shard_map over the system axis); the
results equal the single-device run to the solver tolerance (bit for bit for seedless
strategies), with batches padded when the image count does not divide the device count.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import data, pipeline
from krylovjax.precompute import PrecomputeConfig, _programs, precompile, precompute_scores

from _compiles import compiled_programs

NDEV = 4


@pytest.fixture(scope="module")
def images():
    assert jax.local_device_count() == NDEV, "tests/conftest.py forces 4 CPU devices"
    # Photo 6 (nearly flat at 10x10) makes the central scheme's sweeps wander without
    # converging, where round-off differences grow without bound; the fitted default converges
    # on it, but it stays out so that these comparisons do not depend on the scheme.
    x = data.builtin_dataset(10, 10, seed=4)
    return jnp.asarray(x[[0, 1, 2, 3, 4, 5, 7, 8]], jnp.float64)


def _rel(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("strategy,outer,num", [
    ("gmres", "sweeps", 8),
    # slow: the padded 6-image run below covers the same strategy, gmres-8 the unpadded path
    pytest.param("cross_matrix_precond", "sweeps", 8, marks=pytest.mark.slow),
    ("cross_matrix_precond", "sweeps", 6),  # 6 images on 4 devices: padded to 8
    ("cross_matrix", "timestep", 5),
    ("spsolve", "sweeps", 4),
])
def test_sharded_equals_unsharded(images, strategy, outer, num):
    cfg = PrecomputeConfig(num_steps=4, strategy=strategy, outer=outer, max_sweeps=12,
                           chunk_size=4)
    x = images[:num]
    ref = precompute_scores(x, cfg)
    res = precompute_scores(x, dataclasses.replace(cfg, shard=True))
    assert outer == "timestep" or ref.stats["outer_converged"].all()
    assert res.stats["devices"] == NDEV and ref.stats["devices"] == 1
    assert res.log_density.shape == ref.log_density.shape == (num, 3, 4, 10, 10)
    assert res.scores.dtype == jnp.float64
    assert _rel(res.log_density, ref.log_density) < 1e-8
    assert _rel(res.scores, ref.scores) < 1e-8
    np.testing.assert_array_equal(res.stats["sweeps"], ref.stats["sweeps"])
    np.testing.assert_array_equal(res.stats["outer_converged"], ref.stats["outer_converged"])
    assert res.stats["nonconverged"] == 0
    assert res.stats["systems_per_image"].shape == (num,)  # padding excluded
    np.testing.assert_array_equal(res.stats["systems_per_image"], ref.stats["systems_per_image"])
    if strategy in ("gmres", "spsolve"):  # no seed: each system's solve is the same
        np.testing.assert_array_equal(res.stats["matvecs_per_image"],
                                      ref.stats["matvecs_per_image"])
        assert _rel(res.scores, ref.scores) < 1e-13


def test_sharded_unconverged_returns_the_best_iterate(images):
    """An image that runs out of sweeps returns its best iterate and that iterate's scores
    (computed by the sharded scores program): equal to the single-device run."""
    cfg = PrecomputeConfig(num_steps=3, strategy="gmres", max_sweeps=1, chunk_size=4)
    ref = precompute_scores(images[:4], cfg)
    res = precompute_scores(images[:4], dataclasses.replace(cfg, shard=True))
    assert not ref.stats["outer_converged"].any() and not res.stats["outer_converged"].any()
    assert _rel(res.log_density, ref.log_density) < 1e-12
    assert _rel(res.scores, ref.scores) < 1e-12


def test_programs_run_on_all_devices(images):
    cfg = PrecomputeConfig(num_steps=4, strategy="gmres", chunk_size=4, shard=True)
    precompile(images.shape, np.float64, cfg)
    progs = _programs(cfg, 8, 3, 10, 10, np.float64)
    compiled = progs.sweep.lower(*progs.arg_specs["sweep"]).compile()
    for sharding in jax.tree_util.tree_leaves(compiled.input_shardings):
        assert len(sharding.device_set) == NDEV
    for sharding in jax.tree_util.tree_leaves(compiled.output_shardings):
        assert len(sharding.device_set) == NDEV
        assert "data" in str(sharding.spec)
    # Second call: the cached program, nothing compiled.
    assert precompile(images.shape, np.float64, cfg) < 0.5


def test_precompile_covers_the_sharded_run(images):
    """A sharded run after precompile compiles nothing: m0 is placed on the mesh from the host,
    and the programs are compiled for the iterates' concrete layouts too (which a plain
    ahead-of-time compilation does not match). Three images: padded to four."""
    x = images[:3, :, :9, :9]  # a shape no other test compiles
    for cfg in (PrecomputeConfig(num_steps=3, strategy="gmres", shard=True, max_sweeps=3),
                PrecomputeConfig(num_steps=3, strategy="gmres", shard=True, outer="timestep")):
        precompile(x.shape, x.dtype, cfg)
        with compiled_programs() as names:
            precompute_scores(x, cfg)
        assert names == [], cfg.outer


def test_float32_sharded(images):
    cfg = PrecomputeConfig(num_steps=4, strategy="preconditioned", tol=1e-5, outer_tol=1e-4,
                           chunk_size=4)
    x = images[:4].astype(jnp.float32)
    ref = precompute_scores(x, cfg)
    res = precompute_scores(x, dataclasses.replace(cfg, shard=True))
    assert res.scores.dtype == jnp.float32
    assert _rel(res.scores, ref.scores) < 1e-5


def test_seed_must_exist_on_every_device(images):
    # 8 images on 4 devices: 2 per device, so seed_image 2 does not exist locally.
    cfg = PrecomputeConfig(num_steps=3, strategy="cross_matrix", seed_image=2, shard=True)
    with pytest.raises(ValueError, match=r"seed_image.*sharded over 4 devices"):
        precompute_scores(images, cfg)
    # Unsharded the same seed is fine.
    precompute_scores(images[:3], dataclasses.replace(cfg, shard=False, max_sweeps=1))


def test_sharded_pipeline_store_equals_unsharded(images, tmp_path):
    cfg = PrecomputeConfig(num_steps=3, strategy="preconditioned", chunk_size=4)
    x = np.asarray(images)
    stores = {}
    for shard in (False, True):
        c = dataclasses.replace(cfg, shard=shard)
        workdir = str(tmp_path / f"shard{shard}")
        summary = pipeline.run_precompute(x, c, workdir, chunk_images=4, store_dtype=np.float64,
                                          progress=False)
        assert summary.chunks_computed == 2
        store = pipeline.open_store(workdir, x, c, chunk_images=4, store_dtype=np.float64)
        stores[shard] = {name: store.read_all(name) for name in store.fields}
    for name in ("log_density", "scores", "embedded"):
        assert _rel(stores[True][name], stores[False][name]) < 1e-12, name
    for name in ("sweeps", "systems", "matvecs", "outer_converged"):
        np.testing.assert_array_equal(stores[True][name], stores[False][name])
