"""Input checks of the public solver API found by a walkthrough (2026-12-07): each error names
the argument the user passed, and settings a method does not use are not checked.

Small grids (6 x 6, a batch of 3): every test runs in seconds."""
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import krylovjax as kj
from krylovjax import krylov
from krylovjax.cross_matrix import seed_basis, solve_fp, SolverConfig, PRESETS
from krylovjax.fokker_planck import DTypeError, fp_operator
from krylovjax.precompute import PrecomputeConfig, precompute_scores

B, H, W = 3, 6, 6


@pytest.fixture(scope="module")
def system():
    score = jnp.asarray(0.5 * np.random.default_rng(0).standard_normal((B, 2, H, W)))
    op = fp_operator(9.0, 0.05, 1.0, score)
    b = op.rhs(jnp.asarray(np.random.default_rng(1).standard_normal((B, H, W))))
    return score, op, b


# 1. README: the number of programs that exhaust vm.max_map_count, and what happens then


def test_readme_states_measured_program_count_and_crash():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    para = next(p for p in readme.split("\n\n") if "vm.max_map_count" in p)
    assert "thousands" not in para  # about 350 eager calls were enough
    assert "A few hundred programs" in para and "segfault" in para
    assert "jax.clear_caches()" in para and "jax.jit" in para


# 2. float16: refused by fp_operator and solve_fp, naming the argument; no bare KeyError


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_fp_operator_refuses_half_precision(system, dtype):
    score = system[0]
    for kw, name in (({"lagged_score": score.astype(dtype)}, "lagged_score"),
                     ({"drift": score.astype(dtype)}, "drift"),
                     ({"lagged_score": score, "dtype": dtype}, "dtype")):
        for exc in (ValueError, TypeError):  # DTypeError is both
            with pytest.raises(exc, match=rf"^{name}: expected a floating dtype, float32 or float64 "
                                          rf".*got {jnp.dtype(dtype).name}$"):
                fp_operator(9.0, 0.05, 1.0, **kw)
    # the dtype is static: refused under jit too (value checks are skipped there)
    with pytest.raises(DTypeError, match="^lagged_score: .*got float16"):
        jax.jit(lambda s: fp_operator(9.0, 0.05, 1.0, s))(score.astype(jnp.float16))
    # float32 fields with an explicit float64 operator, or the other way round, still work
    assert fp_operator(9.0, 0.05, 1.0, score.astype(jnp.float32), dtype=jnp.float64).dtype == jnp.float64
    assert fp_operator(9.0, 0.05, 1.0, score.astype(jnp.float16), dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(TypeError, match="^dtype: expected a floating dtype"):  # as before
        fp_operator(9.0, 0.05, grid_shape=(4, 4), dtype=np.int32)


@pytest.mark.parametrize("preset", ["gmres", "cross_matrix", "fast"])
def test_solve_fp_refuses_a_float16_operator_naming_op(system, preset):
    _, op, b = system
    op16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), op)  # built by hand
    with pytest.raises(ValueError, match=r"^op: expected dtype float32 or float64 .*got float16"):
        solve_fp(op16, b.astype(jnp.float16), SolverConfig(**PRESETS[preset]))
    with pytest.raises(TypeError, match=r"^b: expected dtype float64 \(that of op\), got float16"):
        solve_fp(op, b.astype(jnp.float16), SolverConfig(**PRESETS[preset]))


def test_pow2_scale_refuses_other_dtypes_without_a_bare_keyerror():
    for dtype in (jnp.float16, jnp.bfloat16):
        with pytest.raises(TypeError, match=f"expected dtype float32 or float64 .*got {jnp.dtype(dtype).name}"):
            krylov.scaled_norm(jnp.ones((2, 5), dtype))
    np.testing.assert_array_equal(krylov.scaled_norm(jnp.full((2, 4), 3.0)), [6.0, 6.0])


# 3. tolerances: bools and strings refused as SolverConfig does; traced values still work


@pytest.mark.parametrize("solver", [kj.gmres, kj.bicgstab])
@pytest.mark.parametrize("name, value", [
    ("tol", True), ("tol", np.bool_(True)), ("tol", "1e-8"), ("atol", False), ("atol", "0"),
    ("stagnation_tol", True), ("stagnation_tol", "1e-3")])
def test_tolerance_refuses_bool_and_str(system, solver, name, value):
    _, op, b = system
    with pytest.raises(ValueError, match=rf"^{name}: expected a real number, got {value!r}$"):
        solver(op.matvec, b, **{name: value})


def test_tolerance_refuses_bool_arrays_also_traced(system):
    _, op, b = system
    flags = jnp.array([True, False, True])
    with pytest.raises(ValueError, match="^tol: expected a real number or an array of real numbers, got"):
        kj.gmres(op.matvec, b, tol=flags)
    with pytest.raises(ValueError, match="^tol: expected a real number or an array of real numbers, got "
                                         "dtype bool"):
        jax.jit(lambda t: kj.gmres(op.matvec, b, tol=t))(flags)
    with pytest.raises(ValueError, match="^tol: expected a real number, got True"):  # SolverConfig's words
        SolverConfig(tol=True)


def test_traced_tolerances_still_work(system):
    _, op, b = system
    ref = kj.gmres(op.matvec, b, tol=1e-9, atol=0.0, stagnation_tol=1e-3)
    res = jax.jit(lambda t, a, s: kj.gmres(op.matvec, b, tol=t, atol=a, stagnation_tol=s))(
        1e-9, 0.0, 1e-3)
    assert bool(res.converged.all())
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-12)
    per = jax.jit(lambda t: kj.bicgstab(op.matvec, b, tol=t))(jnp.array([1e-9, 1e-8, 1e-7]))
    assert bool(per.converged.all())
    # integers are real numbers
    assert bool(kj.gmres(op.matvec, b, tol=1e-9, atol=0).converged.all())


# 4. seed_index checked only where a seed is used; an empty batch said to be empty


def test_plain_gmres_ignores_seed_index(system):
    _, op, b = system
    ref = solve_fp(op, b, SolverConfig(method="gmres", tol=1e-10, seed_index=0))
    res = solve_fp(op, b, SolverConfig(method="gmres", tol=1e-10, seed_index=5))
    assert bool(res.converged.all())
    for a, c in zip(res, ref):
        np.testing.assert_array_equal(a, c)
    for method in ("cross_matrix", "recycled"):  # these use the seed: still checked
        with pytest.raises(ValueError, match=r"^config.seed_index: expected in \[0, 3\), got 5"):
            solve_fp(op, b, SolverConfig(method=method, seed_index=5))


@pytest.mark.parametrize("method", ["gmres", "cross_matrix"])
def test_solve_fp_empty_batch(system, method):
    score = system[0]
    op0 = fp_operator(9.0, 0.05, 1.0, score[:0])
    with pytest.raises(ValueError, match=r"^b: expected at least one system \(B >= 1\), got shape "
                                         r"\(0, 6, 6\): the batch is empty"):
        solve_fp(op0, jnp.ones((0, H, W)), SolverConfig(method=method))


# 5. precompute_scores documents the square images of its default initial density and stats


def test_precompute_docstrings_state_square_images_and_strategy():
    doc = inspect.getdoc(precompute_scores)
    assert "square (H == W)" in doc and 'initial="intensity"' in doc
    assert "``strategy``" in doc
    assert "square images" in inspect.getdoc(PrecomputeConfig)
    cfg = PrecomputeConfig(num_steps=3, max_sweeps=1)
    assert cfg.initial == "paper_b_kde"
    with pytest.raises(ValueError, match="images must be square"):
        precompute_scores(np.full((1, 1, 6, 8), 0.5), cfg)


# 6. seed_basis: a batch's b given whole to a seed operator of batch 1


def test_seed_basis_refuses_a_batch_b_for_an_operator(system):
    _, op, b = system
    seed = jax.tree_util.tree_map(lambda a: a[:1], op)
    msg = (r"^seed_b: expected shape \(6, 6\) or \(1, 6, 6\) \(the grid of seed_matvec's operator\), "
           r"got \(3, 6, 6\); if it is a batch's b, give the seed's own right-hand side, b\[i\] of "
           r"shape \(6, 6\)$")
    for mv in (seed.matvec, seed, seed.__call__):
        with pytest.raises(ValueError, match=msg):
            seed_basis(mv, b, 3)
    with pytest.raises(ValueError, match=r"^seed_b: expected shape \(6, 6\) or \(1, 6, 6\) .*got \(6, 7\)$"):
        seed_basis(seed.matvec, jnp.ones((6, 7)), 3)
    # the red-black reduced operator: its packed grid
    rb = kj.preconditioners.red_black_reduction(seed)
    with pytest.raises(ValueError, match=r"^seed_b: expected shape \(6, 3\) or \(1, 6, 3\) .*got \(6, 6\)$"):
        seed_basis(rb.matvec, b[0], 3)
    # valid calls unchanged: [H, W] and [1, H, W] give the same basis
    a, c = seed_basis(seed.matvec, b[0], 3), seed_basis(seed.matvec, b[:1], 3)
    assert a.V.shape == (4, H * W)
    np.testing.assert_array_equal(a.V, c.V)
    assert seed_basis(rb.matvec, rb.rhs(b[:1])[0], 3).V.shape == (4, H * 3)
