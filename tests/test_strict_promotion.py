"""The solver entry points under JAX's strict promotion settings.

``jax.numpy_dtype_promotion("strict")`` refuses implicit dtype promotion (int64 with int32, bool
with float, a Python float with an int array) and ``jax.numpy_rank_promotion("raise")`` refuses
implicit rank promotion (``(1, 1) * (B, H, W)``). A user running with either setting must get
exactly the result of the default settings: every promotion in the library is explicit, so
the programs compute the same values. Each call here is traced under both settings at once (an
implicit promotion of either kind fails the trace; the error names which), with
``jax.clear_caches()`` and the pre-computation's program cache cleared first, and compared bit
for bit with the same call traced in the default settings. (One trace under both instead of one
under each: the file's time is tracing and compiling, and it halves it.)
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import krylovjax as kj
from krylovjax import precompute

MODES = {
    "dtype_strict": lambda: jax.numpy_dtype_promotion("strict"),
    "rank_raise": lambda: jax.numpy_rank_promotion("raise"),
}


@contextlib.contextmanager
def _strict():
    """Both settings in effect."""
    with MODES["dtype_strict"](), MODES["rank_raise"]():
        yield


def _problem(dtype, n=8, B=2, scheme="consistent"):
    rng = np.random.default_rng(0)
    score = jnp.asarray(0.5 * rng.standard_normal((B, 2, n, n)), dtype)
    m = jnp.asarray(np.cos(np.linspace(0, 3, n))[None, None, :] * np.ones((B, n, n)), dtype)
    op = kj.fp_operator(9.0, 0.05, 1.0, score, scheme=scheme)
    return op, op.rhs(m)


def _fields(res):
    return {k: np.asarray(v) for k, v in res._asdict().items()}


def _gmres(dtype):
    op, b = _problem(dtype)
    return _fields(kj.gmres(op.matvec, b, restart=6, precondition=kj.diffusion_preconditioner(op)))


def _bicgstab(dtype):
    op, b = _problem(dtype)
    return _fields(kj.bicgstab(op.matvec, b, x0=0.5 * b, precondition=kj.line_preconditioner(op)))


def _linear_solve(dtype):
    op, b = _problem(dtype)
    x, res = kj.linear_solve(op.matvec, b, return_result=True, restart=6)
    score = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 8, 8)), dtype)

    def loss(g2):
        return jnp.sum(kj.linear_solve(kj.fp_operator(g2, 0.05, 1.0, score).matvec, b) ** 2)

    return dict(x=np.asarray(x), grad=np.asarray(jax.grad(loss)(jnp.asarray(4.0, dtype))),
                **{"res_" + k: v for k, v in _fields(res).items()})


def _cross_matrix_solve(dtype):
    op, b = _problem(dtype)
    seed = jax.tree_util.tree_map(lambda a: a[:1], op)
    basis = kj.seed_basis(seed.matvec, b[0], k=4)
    return dict(V=np.asarray(basis.V), H=np.asarray(basis.H),
                **_fields(kj.cross_matrix_solve(op.matvec, b, basis, restart=6)))


def _solve_fp(preset):
    def run(dtype):
        op, b = _problem(dtype, scheme="fitted")
        return _fields(kj.solve_fp(op, b, kj.SolverConfig(**kj.PRESETS[preset], basis_size=4)))
    return run


def _precompute(strategy):
    def run(dtype):
        images = np.random.default_rng(0).uniform(0.0, 1.0, size=(2, 1, 8, 8)).astype(dtype)
        cfg = kj.PrecomputeConfig(num_steps=3, strategy=strategy, outer_tol=1e-5, max_sweeps=3,
                                  basis_size=4, tol=1e-6 if dtype == np.float32 else None)
        out = kj.precompute_scores(images, cfg)
        return dict(log_density=np.asarray(out.log_density), scores=np.asarray(out.scores),
                    t=np.asarray(out.t), dt=np.asarray(out.dt),
                    **{k: np.asarray(out.stats[k]) for k in (
                        "sweeps", "outer_converged", "outer_change", "nonconverged", "matvecs")})
    return run


ENTRIES = {
    "gmres": _gmres,
    "bicgstab": _bicgstab,
    "linear_solve": _linear_solve,
    "cross_matrix_solve": _cross_matrix_solve,
    "solve_fp_cross_matrix_precond": _solve_fp("cross_matrix_precond"),
    "solve_fp_fast": _solve_fp("fast"),
    "precompute_fast": _precompute("fast"),
    "precompute_cross_matrix_precond": _precompute("cross_matrix_precond"),
}
# Every entry point in float64 (the suite runs with x64: its integer counters are int64 there,
# the case that met int32 ones); float32 too for the solvers and solve_fp (kept short: the
# file's time is compile time).
FLOAT32 = ("gmres", "solve_fp_cross_matrix_precond", "solve_fp_fast")
CASES = [(e, "float64") for e in ENTRIES] + [(e, "float32") for e in FLOAT32]

_REFERENCE = {}


def _traced_fresh(fn, dtype, setting):
    """``fn(dtype)`` traced and compiled anew under ``setting`` (a context manager)."""
    jax.clear_caches()
    precompute._build.cache_clear()  # the pre-computation's per-shape programs
    with setting():
        return fn(np.dtype(dtype).type)


def _reference(entry, dtype):
    if (entry, dtype) not in _REFERENCE:
        _REFERENCE[entry, dtype] = _traced_fresh(ENTRIES[entry], dtype, contextlib.nullcontext)
    return _REFERENCE[entry, dtype]


@pytest.mark.parametrize("entry,dtype", CASES)
def test_same_result_under_strict_promotion(entry, dtype):
    want = _reference(entry, dtype)
    got = _traced_fresh(ENTRIES[entry], dtype, _strict)
    assert set(got) == set(want)
    for key in ("converged", "res_converged", "outer_converged", "nonconverged", "status"):
        if key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{entry}: {key}")
    for key, value in want.items():
        assert got[key].dtype == value.dtype, (entry, key)
        np.testing.assert_array_equal(got[key], value, err_msg=f"{entry}: {key} under strict promotion")


def test_strict_settings_are_in_effect():
    """The settings do refuse an implicit promotion when a function is traced under them (so the
    tests above trace the library under them, not a cached program)."""
    for setting in (MODES["dtype_strict"], _strict):
        jax.clear_caches()
        with setting(), pytest.raises(Exception, match="promotion"):
            jax.jit(lambda a, b: a + b)(jnp.ones(2, jnp.int32), jnp.ones(2, jnp.int64))
    for setting in (MODES["rank_raise"], _strict):
        jax.clear_caches()
        with setting(), pytest.raises(ValueError, match="rank_promotion"):
            jax.jit(lambda a, b: a * b)(jnp.ones((1, 1)), jnp.ones((2, 3, 3)))
