"""The pre-computation pipeline: Krylov strategies equal the spsolve reference on real images."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import data, initial
from krylovjax.precompute import PrecomputeConfig, precompile, precompute_scores

from _compiles import compiled_programs


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(data.builtin_dataset(12, 3, seed=0), jnp.float64)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def references(images):
    out = {}
    for outer, scheme in [("sweeps", "consistent"), ("sweeps", "fitted"), ("sweeps", "paper_b"),
                          ("timestep", "consistent"), ("timestep", "paper_b")]:
        cfg = PrecomputeConfig(num_steps=5, outer=outer, scheme=scheme, strategy="spsolve",
                               max_sweeps=12)
        out[outer, scheme] = precompute_scores(images, cfg)
    return out


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("outer,scheme,strategy", [
    ("sweeps", "consistent", "gmres"),
    ("sweeps", "consistent", "cross_matrix_precond"),
    ("sweeps", "consistent", "fast"),
    ("sweeps", "fitted", "fast"),
    ("sweeps", "fitted", "cross_matrix_precond"),
    ("sweeps", "fitted", "cross_matrix_block"),
    ("sweeps", "paper_b", "cross_matrix"),
    ("timestep", "consistent", "cross_matrix_precond"),
    ("timestep", "paper_b", "cross_matrix"),
    pytest.param("sweeps", "consistent", "cross_matrix", marks=_SLOW),
    pytest.param("timestep", "consistent", "gmres", marks=_SLOW),
    pytest.param("timestep", "consistent", "cross_matrix", marks=_SLOW),
    pytest.param("timestep", "consistent", "fast", marks=_SLOW),
])
def test_krylov_strategies_equal_spsolve(images, references, outer, scheme, strategy):
    """Every strategy's pre-computation equals spsolve's (a preset with its own seed projection,
    cross_matrix_block, included)."""
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


def test_stalled_solver_never_counts_as_converged(images, references):
    """A sweep whose solves did not converge proves nothing: a failed solve returns about its
    warm start, so the outer change can look tiny. With a solver budget too small to reach
    tol, no image may be reported converged; with enough budget, the same images converge
    and match spsolve."""
    ref = references["sweeps", "fitted"]  # the default scheme
    assert np.all(ref.stats["outer_converged"])
    starved = PrecomputeConfig(num_steps=5, strategy="gmres", tol=1e-13, restart=2,
                               max_restarts=1, max_sweeps=12, compact=None)
    res = precompute_scores(images, starved)
    assert res.stats["nonconverged"] > 0
    assert np.all(res.stats["nonconverged_per_image"] > 0)
    assert not np.any(res.stats["outer_converged"])
    fine = precompute_scores(images, PrecomputeConfig(num_steps=5, strategy="gmres",
                                                      max_sweeps=12))
    assert np.all(fine.stats["outer_converged"]) and fine.stats["nonconverged"] == 0
    assert _rel(fine.scores, ref.scores) < 1e-6


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
    # (a walkthrough) a dict was an AttributeError "'dict' object has no attribute 'shard'"
    from krylovjax.precompute import precompile

    hint = r"^config: expected a PrecomputeConfig, got dict; build one from a dict with PrecomputeConfig\(\*\*d\)$"
    with pytest.raises(TypeError, match=hint):
        precompute_scores(np.zeros((1, 3, 8, 8)), {"num_steps": 3})
    with pytest.raises(TypeError, match=hint):
        precompile((1, 3, 8, 8), np.float64, {"num_steps": 3})
    with pytest.raises(TypeError, match=r"^config: expected a PrecomputeConfig, got str$"):
        precompute_scores(np.zeros((1, 3, 8, 8)), "fast")
    # projection=None keeps the preset's own projection; a named one overrides it.
    assert PrecomputeConfig(strategy="cross_matrix_block").solver_config(3).projection == \
        "seed_hessenberg"
    assert PrecomputeConfig(strategy="cross_matrix_precond").solver_config(3).projection == \
        "minres"
    assert PrecomputeConfig(strategy="cross_matrix_block", projection="minres").solver_config(
        3).projection == "minres"
    with pytest.raises(ValueError, match="strategy"):
        PrecomputeConfig(scheme="paper_b", strategy="cross_matrix_precond")
    with pytest.raises(ValueError, match="red_black"):
        PrecomputeConfig(scheme="paper_b", strategy="fast")
    with pytest.raises(ValueError, match="'line'"):
        PrecomputeConfig(scheme="paper_b", strategy="preconditioned_line")
    with pytest.raises(ValueError, match="chunk_size"):
        PrecomputeConfig(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        PrecomputeConfig(chunk_size="big")
    with pytest.raises(ValueError, match="outer"):
        PrecomputeConfig(outer="both")
    with pytest.raises(ValueError, match="num_steps"):
        PrecomputeConfig(num_steps=1)
    with pytest.raises(ValueError, match="seed_image"):
        precompute_scores(np.zeros((1, 3, 8, 8)), PrecomputeConfig(num_steps=3, seed_image=2))
    with pytest.raises(ValueError, match="initial: expected one of"):
        PrecomputeConfig(initial="gaussian")
    for key, value, match in (("scheme", "upwind", "scheme: expected one of"),
                              ("boundary", "dirichlet", "boundary: expected 'zero' or 'reflect'"),
                              ("score_method", "sobel", "score_method: expected one of"),
                              ("score_boundary", "wrap", "score_boundary: expected one of")):
        with pytest.raises(ValueError, match=match):
            PrecomputeConfig(**{key: value})
    for name in ("paper_a_kde", "paper_a"):  # the alias needs the key too
        with pytest.raises(ValueError, match="key"):
            precompute_scores(np.zeros((1, 3, 8, 8)), PrecomputeConfig(num_steps=3, initial=name))


def test_paper_a_alias_uses_the_key(images):
    cfg = PrecomputeConfig(num_steps=3, strategy="gmres", initial="paper_a")
    key = jax.random.key(3)
    res = precompute_scores(images[:1], cfg, key=key)
    ref = initial.paper_a_kde(images[:1], key)
    np.testing.assert_array_equal(res.log_density[:, :, 0], ref)


def test_precompile_leaves_no_program_to_compile(images):
    """After precompile, precompute_scores compiles nothing (initial density, sweeps, best
    iterates, scores, result layout), so its stats["seconds"] is run time; without precompile
    it does compile them (the check can fail)."""
    cfg = PrecomputeConfig(num_steps=3, strategy="fast", lag_init="march", compact=2)
    with compiled_programs() as cold:  # shapes no other test compiles
        precompute_scores(images[:, :, :7, :7], cfg)
    for name in ("_initial_fn", "sweep", "_score", "_result_layout"):
        assert any(name in c for c in cold), (name, cold)
    x = images[:, :, :9, :9]
    precompile(x.shape, x.dtype, cfg)
    with compiled_programs() as warm:
        precompute_scores(x, cfg)
    assert warm == []


def test_per_image_stats(images, references):
    ref = references["sweeps", "consistent"]
    st = ref.stats
    B, C, N = 3, 3, 5
    np.testing.assert_array_equal(st["systems_per_image"], C * (N - 1) * st["sweeps"])
    assert st["systems_per_image"].sum() == st["systems_solved"]
    assert st["matvecs_per_image"].shape == (B,) and st["nonconverged_per_image"].shape == (B,)
    assert st["initial_seconds"] > 0 and st["devices"] == 1
    cfg = PrecomputeConfig(num_steps=5, strategy="gmres", max_sweeps=12, chunk_size=4)
    res = precompute_scores(images, cfg)
    assert res.stats["matvecs_per_image"].sum() == res.stats["matvecs"]
    # Image 1 alone: its per-image count is the same as in the batch (gmres has no seed).
    alone = precompute_scores(images[1:2], cfg)
    assert alone.stats["matvecs"] == res.stats["matvecs_per_image"][1]
    tstep = references["timestep", "consistent"].stats
    assert tstep["fixed_point_iterations"].shape == (N - 1,)
    assert np.all(tstep["sweeps"] <= (N - 1) * 5) and np.all(tstep["sweeps"] >= N - 1)
    np.testing.assert_array_equal(tstep["systems_per_image"], C * tstep["sweeps"])


def _one_step(images):
    """The systems of the first step of sweep 1 for `images`: (op [S], b [S, H, W])."""
    from krylovjax import initial, scores, sde as sde_lib
    from krylovjax.fokker_planck import fp_operator

    m0 = initial.initial_log_density(images)
    S, H, W = m0.shape[0] * m0.shape[1], m0.shape[2], m0.shape[3]
    t, dt = sde_lib.time_grid(5)
    op = fp_operator(sde_lib.VESDE(5.0).g2(t[1]), dt, 1.0,
                     scores.score(m0).reshape(S, 2, H, W))
    return op, op.rhs(m0.reshape(S, H, W))


def _scipy_step(g2, dt, lag, m_prev):
    """One backward-Euler step of the fitted scheme for systems ``m_prev [S, H, W]`` with the
    lagged scores ``lag [S, 2, H, W]``, solved system by system with scipy's spsolve."""
    import scipy.sparse.linalg as spla

    from krylovjax.fokker_planck import fp_operator

    op = fp_operator(g2, dt, 1.0, lag, scheme="fitted")
    b = np.asarray(op.rhs(jnp.asarray(m_prev)))
    S, H, W = b.shape
    return np.stack([spla.spsolve(op.to_scipy(i).tocsc(), b[i].ravel()).reshape(H, W)
                     for i in range(S)])


@pytest.mark.parametrize("lag_init", ["initial", "ones"])
def test_sweeps_equal_a_scipy_loop_of_algorithm_1(images, lag_init):
    """Paper B's Algorithm 1 written out with scipy: sweep k solves every step n with the score
    of sweep k-1's m^n (the first sweep: the score of m0, or a field of ones) and the new m^{n-1}
    on the right-hand side; the scores returned are those of the last sweep's m."""
    from krylovjax import initial, scores, sde as sde_lib

    x, N, sweeps = images[:2], 4, 2
    got = precompute_scores(x, PrecomputeConfig(num_steps=N, strategy="fast", tol=1e-13,
                                                lag_init=lag_init, max_sweeps=sweeps,
                                                outer_tol=1e-14, chunk_size=4))
    assert np.all(got.stats["sweeps"] == sweeps)
    m0 = np.asarray(initial.initial_log_density(x))
    B, C, H, W = m0.shape
    m0 = m0.reshape(B * C, H, W)
    t, dt = sde_lib.time_grid(N)
    g2 = sde_lib.VESDE(5.0).g2(t)
    m_old = [m0] * N
    for k in range(sweeps):
        m_new = [m0]
        for n in range(1, N):
            lag = (np.ones((B * C, 2, H, W)) if k == 0 and lag_init == "ones"
                   else np.asarray(scores.score(jnp.asarray(m_old[n]))))
            m_new.append(_scipy_step(g2[n], dt, lag, m_new[-1]))
        m_old = m_new
    want = np.stack(m_old, axis=1).reshape(B, C, N, H, W)
    np.testing.assert_allclose(np.asarray(got.log_density), want, rtol=0, atol=1e-9 * np.abs(want).max())
    want_s = np.asarray(scores.score(jnp.asarray(want)))
    np.testing.assert_allclose(np.asarray(got.scores), want_s, rtol=0, atol=1e-9 * np.abs(want_s).max())


def test_lag_init_march(images):
    """``lag_init="march"``: the first sweep lags the score by one time step (m^n solved with
    the score of m^{n-1}), checked against scipy step by step; the sweeps then reach the same
    fixed point as with ``"initial"`` in fewer sweeps or as many."""
    from krylovjax import initial, scores, sde as sde_lib

    x = images[:2]
    first = precompute_scores(x, PrecomputeConfig(num_steps=4, strategy="spsolve",
                                                  lag_init="march", max_sweeps=1))
    m = initial.initial_log_density(x)
    B, C, H, W = m.shape
    m = np.asarray(m).reshape(B * C, H, W)
    t, dt = sde_lib.time_grid(4)
    g2 = sde_lib.VESDE(5.0).g2(t)
    for n in range(1, 4):
        m = _scipy_step(g2[n], dt, scores.score(jnp.asarray(m)), m)
        got = np.asarray(first.log_density[:, :, n]).reshape(B * C, H, W)
        np.testing.assert_allclose(got, m, rtol=1e-10, atol=1e-10)
    base = dict(num_steps=5, strategy="fast", chunk_size=4, outer_tol=1e-8, max_sweeps=20)
    march = precompute_scores(images, PrecomputeConfig(**base, lag_init="march"))
    plain = precompute_scores(images, PrecomputeConfig(**base))
    assert march.stats["outer_converged"].all() and plain.stats["outer_converged"].all()
    assert march.stats["sweeps"].sum() <= plain.stats["sweeps"].sum()
    assert _rel(march.scores, plain.scores) < 1e-6
    with pytest.raises(ValueError, match="lag_init"):
        PrecomputeConfig(lag_init="zeros")


@pytest.mark.parametrize("strategy", ["spsolve", "gmres", "cross_matrix_precond", "fast"])
def test_inactive_systems_are_not_solved(images, strategy):
    from krylovjax import reference
    from krylovjax.precompute import _step_solver

    op, b = _one_step(images)
    active = jnp.array([False, False, True, True, False, True, False, False, False])
    x0 = jnp.ones_like(b)
    cfg = PrecomputeConfig(strategy=strategy, num_steps=5, tol=1e-11, chunk_size=4)
    x, conv, mv = jax.jit(_step_solver(cfg, 3))(op, b, x0, active)
    ref = reference.spsolve(op, np.asarray(b)).x
    act = np.asarray(active)
    np.testing.assert_allclose(np.asarray(x)[act], ref[act], rtol=1e-9, atol=1e-9)
    assert np.all(np.asarray(conv))
    if strategy == "spsolve":
        np.testing.assert_array_equal(np.asarray(x)[~act], 0.0)
    else:
        from krylovjax import cross_matrix

        preset = cross_matrix.PRESETS[strategy]
        seed = 0 if preset["method"] != "gmres" else None  # the seed keeps its problem
        idle = [i for i in range(9) if not act[i] and i != seed]
        np.testing.assert_array_equal(np.asarray(x)[idle], 0.0)
        # The Krylov method does nothing for them, and nothing is counted for them: the fixed
        # per-system costs of the batch (the cross-matrix projection's k + 1 matvecs, the
        # red-black reduction's right-hand side and recovery) are not work on their problems.
        np.testing.assert_array_equal(np.asarray(mv)[idle], 0)
        extra = ((cfg.basis_size + 1 if seed is not None else 0)
                 + (2 if preset.get("precondition") == "red_black" else 0))
        assert np.all(np.asarray(mv)[act] > extra)
        if seed is not None:  # inactive, yet solved for its basis: its basis and solve count
            assert int(mv[seed]) > 2 * cfg.basis_size
            np.testing.assert_allclose(np.asarray(x)[seed], ref[seed], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("outer", ["sweeps", "timestep"])
def test_the_seeds_work_counts_after_its_image_converged(images, outer):
    """The seed system is solved in every step of every sweep (every fixed-point iteration), its
    basis serving the other images, after its own image has converged too; that work is counted
    (its image's count held only the solves until its image converged, until 2026-12-07)."""
    imgs = images.at[0].set(0.5)  # the seed: a constant image, whose log-density stays constant
    k, steps = PrecomputeConfig().basis_size, 5 - 1

    def run(**kw):
        return precompute_scores(imgs, PrecomputeConfig(num_steps=5, outer=outer, strategy="cross_matrix_precond",
                                                        chunk_size=4, **kw))

    if outer == "sweeps":
        out = run(max_sweeps=12)
        sweeps = out.stats["sweeps"]
        assert np.all(out.stats["outer_converged"]) and sweeps[0] < sweeps.max()  # the seed's image first
        # The sweeps up to the seed's image's last are those of a run stopped there (the same
        # solves); each later one adds at least the seed's basis (k) and its own projection
        # (k + 1) in each of the N - 1 steps.
        cut, extra = run(max_sweeps=int(sweeps[0])), int(sweeps.max() - sweeps[0]) * steps * (2 * k + 1)
    else:
        # The others' fixed points run to max_fixed_point (5) in every step, as spsolve's do
        # here; the seed's image has converged within 3 iterations of each step: its solves in
        # iterations 4 and 5 add at least its basis (k + 1 matvecs from a warm start) each.
        out = run(max_fixed_point=5)
        cut = run(max_fixed_point=3)
        assert cut.stats["outer_converged"][0] and not out.stats["outer_converged"][1:].any()
        np.testing.assert_array_equal(out.stats["fixed_point_iterations"], 5)
        extra = 2 * steps * (k + 1)
    per_image = out.stats["matvecs_per_image"]
    assert per_image[0] >= cut.stats["matvecs_per_image"][0] + extra
    assert out.stats["matvecs"] == per_image.sum()


def test_forcing_inexact_sweeps(images, references):
    """Inexact early sweeps: fewer matvecs, the same scores as spsolve to well below 1e-6."""
    ref = references["sweeps", "fitted"]  # the default scheme
    exact = precompute_scores(images, PrecomputeConfig(num_steps=5, strategy="preconditioned",
                                                       max_sweeps=12, chunk_size=4))
    inexact = precompute_scores(images, PrecomputeConfig(num_steps=5, strategy="preconditioned",
                                                         max_sweeps=12, chunk_size=4,
                                                         forcing=1e-3))
    assert np.all(inexact.stats["outer_converged"])
    assert inexact.stats["matvecs"] < 0.8 * exact.stats["matvecs"]
    assert _rel(inexact.scores, ref.scores) < 1e-6
    assert _rel(exact.scores, ref.scores) < 1e-8
    with pytest.raises(ValueError, match="forcing"):
        PrecomputeConfig(forcing=1e-3, outer="timestep")
    with pytest.raises(ValueError, match="forcing"):
        PrecomputeConfig(forcing=1.5)


def test_forcing_never_converges_an_image_at_a_loose_sweep():
    """A review (2026-12-07): with forcing 0.5 a sweep solved to a loose tolerance from a warm
    start that already met it returned that start; its change was 3e-17 and the image was
    reported converged 2.5e-2 from spsolve's fixed point (gmres; 5.3e-2 preconditioned). Only a
    sweep solved to `tol` itself can converge an image now. And tol above outer_tol, the same
    trap without forcing, is warned about."""
    x = np.random.default_rng(0).random((1, 1, 8, 8))
    ref = precompute_scores(x, PrecomputeConfig(strategy="spsolve", num_steps=5))
    for strategy in ("gmres", "preconditioned"):
        res = precompute_scores(x, PrecomputeConfig(strategy=strategy, num_steps=5, forcing=0.5))
        assert bool(res.stats["outer_converged"][0])
        assert _rel(res.log_density, ref.log_density) < 1e-6 and _rel(res.scores, ref.scores) < 1e-6
    exact = precompute_scores(x, PrecomputeConfig(strategy="spsolve", num_steps=5, forcing=0.5))
    np.testing.assert_array_equal(exact.scores, ref.scores)  # spsolve's solves are exact: no forcing
    with pytest.warns(UserWarning, match=r"tol=0\.001 is above outer_tol=1e-06"):
        precompute_scores(x, PrecomputeConfig(strategy="gmres", num_steps=5, tol=1e-3))


@pytest.mark.filterwarnings("ignore::scipy.sparse.linalg.MatrixRankWarning")
def test_spsolve_that_overflows_counts_its_failed_solves():
    """A review (2026-12-07): spsolve's solves were counted as converged whatever they gave; with
    sigma 1e200 its factorisation produced inf/NaN and `nonconverged` said 0. The image was (and
    is) reported not converged; now its failed solves are counted too."""
    x = np.random.default_rng(1).random((1, 1, 6, 6))
    res = precompute_scores(x, PrecomputeConfig(strategy="spsolve", num_steps=3, max_sweeps=2,
                                                sde_kwargs=(("sigma", 1e200),)))
    assert not bool(res.stats["outer_converged"][0]) and res.stats["nonconverged"] > 0
    assert int(res.stats["nonconverged_per_image"][0]) == res.stats["nonconverged"]


def test_divergence_patience_and_best_iterate():
    """A nearly flat photo (photo 6 at 10x10: cell Peclet number > 2) makes the sweeps of the
    central scheme wander. With a patience it stops as diverged; every image returns its
    iterate with the smallest change (the last one for converged images, untouched by the
    patience)."""
    x = jnp.asarray(data.builtin_dataset(10, 7, seed=0)[[0, 6]], jnp.float64)
    base = dict(num_steps=4, strategy="preconditioned", chunk_size=4, max_sweeps=14,
                scheme="consistent")
    plain = precompute_scores(x, PrecomputeConfig(**base))
    st = plain.stats
    assert st["outer_converged"].tolist() == [True, False] and not st["outer_diverged"].any()
    patient = precompute_scores(x, PrecomputeConfig(**base, divergence_patience=3))
    ps = patient.stats
    assert ps["outer_converged"].tolist() == [True, False]
    assert ps["outer_diverged"].tolist() == [False, True]
    assert ps["sweeps"][0] == st["sweeps"][0] and ps["sweeps"][1] < st["sweeps"][1]
    np.testing.assert_array_equal(patient.log_density[0], plain.log_density[0])
    # The diverged image's result is its best iterate: the last of a run cut off there (same
    # batch: its systems are so ill-conditioned that another batching changes the digits).
    best_sweep = int(ps["sweeps"][1]) - 3
    cut = precompute_scores(x, PrecomputeConfig(**dict(base, max_sweeps=best_sweep)))
    np.testing.assert_array_equal(patient.log_density[1], cut.log_density[1])
    np.testing.assert_array_equal(patient.scores[1], cut.scores[1])
    assert ps["outer_change"][1] == cut.stats["outer_change"][1] > 1e-3
    assert np.isfinite(np.asarray(plain.log_density)).all()
    with pytest.raises(ValueError, match="divergence_patience"):
        PrecomputeConfig(divergence_patience=-1)


def test_fitted_scheme_converges_where_central_wanders():
    """The same two photos with the fitted scheme (the default): an M-matrix at every step, so
    the lagged-score sweeps of the flat photo converge too, every solve converges, and the
    Krylov result equals spsolve's; the central scheme's sweeps of that photo do not settle."""
    x = jnp.asarray(data.builtin_dataset(10, 7, seed=0)[[0, 6]], jnp.float64)
    base = dict(num_steps=4, chunk_size=4, max_sweeps=14)
    central = precompute_scores(x, PrecomputeConfig(**base, strategy="fast",
                                                    scheme="consistent"))
    assert central.stats["outer_converged"].tolist() == [True, False]
    fitted = precompute_scores(x, PrecomputeConfig(**base, strategy="fast"))
    assert PrecomputeConfig().scheme == "fitted"
    st = fitted.stats
    assert st["outer_converged"].all() and st["nonconverged"] == 0, st
    assert st["sweeps"].max() < 14
    ref = precompute_scores(x, PrecomputeConfig(**base, strategy="spsolve"))
    np.testing.assert_array_equal(ref.stats["sweeps"], st["sweeps"])
    assert _rel(fitted.scores, ref.scores) < 1e-8
    # Where the score is resolved (photo 0) the two schemes give nearby solutions.
    assert _rel(fitted.log_density[0], central.log_density[0]) < 0.05


@pytest.mark.parametrize("strategy, seed_image", [("fast", 0), ("cross_matrix_precond", 1)])
def test_compaction_changes_nothing(images, references, strategy, seed_image):
    """``compact``: once images converge, the sweeps solve a smaller batch (the seed image
    first, even when it has converged); results and per-image counts are those of the whole
    batch."""
    base = dict(num_steps=5, strategy=strategy, max_sweeps=12, chunk_size=4,
                seed_image=seed_image)
    whole = precompute_scores(images, PrecomputeConfig(**base, compact=None))
    small = precompute_scores(images, PrecomputeConfig(**base, compact=1))
    sweeps = whole.stats["sweeps"]
    assert len(set(sweeps.tolist())) > 1  # images stop at different sweeps
    seeded = strategy != "fast"
    expected = []
    for k in range(int(sweeps.max())):
        act = sweeps > k
        need = int(act.sum()) + int(seeded and not act[seed_image])
        expected.append(3 if k == 0 else next((s for s in (1, 2) if s >= need), 3))
    assert min(expected) < 3
    np.testing.assert_array_equal(small.stats["batch_images"], expected)
    np.testing.assert_array_equal(whole.stats["batch_images"], 3)
    for key in ("sweeps", "systems_per_image", "matvecs_per_image", "nonconverged_per_image",
                "outer_converged"):
        np.testing.assert_array_equal(small.stats[key], whole.stats[key], err_msg=key)
    assert _rel(small.log_density, whole.log_density) < 1e-13
    assert _rel(small.scores, whole.scores) < 1e-13
    assert _rel(small.scores, references["sweeps", "fitted"].scores) < 1e-8


def test_compaction_keeps_best_iterates():
    """A wandering image (see the next test) left alone in a compacted batch: its best iterate
    and change are those of the whole-batch run, with and without a patience."""
    x = jnp.asarray(data.builtin_dataset(10, 7, seed=0)[[0, 6]], jnp.float64)
    base = dict(num_steps=4, strategy="preconditioned", chunk_size=4, max_sweeps=14,
                scheme="consistent")
    for patience in (0, 3):
        whole = precompute_scores(x, PrecomputeConfig(**base, divergence_patience=patience,
                                                      compact=None))
        small = precompute_scores(x, PrecomputeConfig(**base, divergence_patience=patience,
                                                      compact=1))
        assert small.stats["outer_converged"].tolist() == [True, False]
        assert small.stats["batch_images"].min() == 1
        np.testing.assert_array_equal(small.stats["sweeps"], whole.stats["sweeps"])
        # The change is a quotient of a difference (~7e-7 here): its rounding is ~eps / 7e-7.
        np.testing.assert_allclose(small.stats["outer_change"], whole.stats["outer_change"],
                                   rtol=1e-9)
        np.testing.assert_allclose(small.log_density, whole.log_density, rtol=0, atol=1e-13)
        np.testing.assert_allclose(small.scores, whole.scores, rtol=0, atol=1e-13)


def test_compact_batch_layout():
    from krylovjax.precompute import _compact_batch, _compact_sizes

    assert _compact_sizes(PrecomputeConfig(compact=8), 64) == (8, 16, 32)
    assert _compact_sizes(PrecomputeConfig(compact=1), 5) == (1, 2, 4)
    assert _compact_sizes(PrecomputeConfig(compact=8), 8) == ()
    assert _compact_sizes(PrecomputeConfig(compact=None), 64) == ()
    assert _compact_sizes(PrecomputeConfig(compact=1, shard=True), 64) == ()
    assert _compact_sizes(PrecomputeConfig(compact=1, outer="timestep"), 64) == ()
    active = np.zeros(10, bool)
    active[[1, 4, 7]] = True
    sizes = (2, 4, 8)
    np.testing.assert_array_equal(_compact_batch(active, sizes, None), [1, 4, 7, 0])
    # The seed first (active or not), then the active images, filled with other images.
    np.testing.assert_array_equal(_compact_batch(active, sizes, 3), [3, 1, 4, 7])
    np.testing.assert_array_equal(_compact_batch(active, sizes, 4), [4, 1, 7, 0])
    assert _compact_batch(active, (2,), 9) is None  # 4 images do not fit in 2
    active[[0, 2, 3, 5]] = True  # 7 active images and the seed fill 8
    assert _compact_batch(active, (2, 4), 9) is None
    np.testing.assert_array_equal(_compact_batch(active, sizes, 9), [9, 0, 1, 2, 3, 4, 5, 7])
    np.testing.assert_array_equal(_compact_batch(active, sizes, 7), [7, 0, 1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_bad_compact(bad):
    with pytest.raises(ValueError, match="compact"):
        PrecomputeConfig(compact=bad)


@pytest.mark.parametrize("failure", ["nan", "stall"])
def test_failed_solves_are_never_a_converged_fixed_point(monkeypatch, failure):
    """A linear solve that breaks down (NaN) or returns its warm start (a change of 0) used to
    count as fixed-point convergence with outer="timestep"; both outer modes now report the
    image unconverged, and count every failed solve."""
    from krylovjax import cross_matrix, precompute

    orig = cross_matrix.solve_fp

    def broken(op, b, cfg, x0=None):  # system 0 (image 0, one channel) fails
        res = orig(op, b, cfg, x0=x0)
        bad = jnp.arange(b.shape[0]) == 0
        x = jnp.where(bad[:, None, None], jnp.nan if failure == "nan" else (0.0 if x0 is None else x0), res.x)
        return res._replace(x=x, converged=res.converged & ~bad)

    monkeypatch.setattr(cross_matrix, "solve_fp", broken)
    precompute._build.cache_clear()  # the programs are built with the patched solver
    try:
        images = np.random.default_rng(0).uniform(0.0, 1.0, (2, 1, 8, 8))
        for outer in ("timestep", "sweeps"):
            cfg = PrecomputeConfig(num_steps=4, strategy="gmres", outer=outer, max_sweeps=30, max_fixed_point=30)
            st = precompute_scores(images, cfg).stats
            assert st["outer_converged"].tolist() == [False, True], outer
            assert st["nonconverged_per_image"][1] == 0
            assert st["nonconverged_per_image"][0] == st["systems_per_image"][0] > 0, outer  # every solve failed
    finally:
        precompute._build.cache_clear()


def test_lag_init_ones_is_paper_b_score_one():
    """Paper B's code starts from the scalar score 1; its scheme sums the two components, so the
    first sweep's operator is the one of method.md 3.2 with s = 1 (it used to get s = 2)."""
    from krylovjax import fokker_planck, precompute

    g2, dt, h = 3.0, 0.1, 1.0
    like = jnp.zeros((1, 2, 4, 4))
    lag = precompute._ones_score(PrecomputeConfig(scheme="paper_b", strategy="gmres", lag_init="ones"), like)
    op = fokker_planck.fp_operator(g2, dt, h, lag[0], scheme="paper_b")
    alpha, delta = -(g2 / 2) * 1.0 * dt / (2 * h), (g2 / 2) * dt / h**2
    assert float(op.east[1, 1]) == pytest.approx(alpha + delta)
    both = precompute._ones_score(PrecomputeConfig(lag_init="ones"), like)  # the other schemes: (1, 1)
    assert bool(jnp.all(both == 1.0))


def test_intensity_density_uses_the_grid_spacing():
    images = np.random.default_rng(2).uniform(0.1, 0.9, (1, 1, 6, 6))
    cfg = PrecomputeConfig(num_steps=2, strategy="gmres", initial="intensity", h=0.5)
    m0 = np.asarray(precompute_scores(images, cfg).log_density)[:, :, 0]
    np.testing.assert_allclose(m0, np.asarray(initial.intensity_log_density(images, h=0.5)), rtol=0, atol=1e-12)
    assert np.exp(m0).sum() * 0.5**2 == pytest.approx(1.0)  # a density on the lattice of spacing h


def test_relative_change_of_an_overflowed_iterate_is_not_a_number():
    """||old||^2 overflowing float32 (|m| ~ 1e20, a blown-up iterate) used to give a change of
    0, i.e. converged; it is NaN now, which no outer test accepts."""
    from krylovjax import precompute

    old = jnp.full((1, 16), 1e20, jnp.float32)
    assert bool(jnp.isnan(precompute._relative_change(old * 1.001, old, 1)[0]))
    ok = precompute._relative_change(jnp.full((1, 4), 2.0), jnp.ones((1, 4)), 1)
    assert float(ok[0]) == pytest.approx(1.0)


def test_config_checks_sde_on_construction():
    """A bad SDE name or SDE argument is refused by PrecomputeConfig itself, naming the field
    (it used to fail only when the programs were built)."""
    with pytest.raises(ValueError, match=r"sde: expected one of \('constant', 've', 'vp'\), got 'foo'"):
        PrecomputeConfig(sde="foo")
    with pytest.raises(ValueError, match=r"sde_kwargs: sigma must be finite and > 0, got -1.0"):
        PrecomputeConfig(sde_kwargs=(("sigma", -1.0),))
    with pytest.raises(ValueError, match=r"sde_kwargs: bad keyword arguments \['beta'\]"):
        PrecomputeConfig(sde_kwargs=(("beta", 1.0),))
    with pytest.raises(ValueError, match="sde_kwargs: expected a tuple of"):
        PrecomputeConfig(sde_kwargs={"sigma": 2.0})  # unhashable: the programs' cache key
    with pytest.raises(ValueError, match="sde_kwargs: beta_max must be >= beta_min"):
        PrecomputeConfig(sde="vp", sde_kwargs=(("beta_min", 2.0), ("beta_max", 1.0)))
    assert PrecomputeConfig(sde="VP", sde_kwargs=()).make_sde() == PrecomputeConfig(
        sde="vp", sde_kwargs=()).make_sde()


def test_basis_size_checked_against_the_image_size():
    """basis_size > H * W is refused naming basis_size (it used to fail inside the seed basis
    naming the internal ``k``); strategies without a seed basis do not use it."""
    x = np.full((1, 1, 8, 8), 0.5)
    cfg = PrecomputeConfig(num_steps=3, basis_size=1000)
    for call in (lambda: precompute_scores(x, cfg), lambda: precompile(x.shape, x.dtype, cfg)):
        with pytest.raises(ValueError, match=r"basis_size: expected at most H \* W = 64 .* got 1000"):
            call()
    precompile((1, 1, 4, 4), np.float64, PrecomputeConfig(num_steps=3, basis_size=1000,
                                                          strategy="gmres"))


@pytest.mark.parametrize("name", ["num_steps", "max_sweeps", "max_fixed_point", "restart",
                                  "max_restarts", "basis_size", "seed_image",
                                  "divergence_patience", "chunk_size", "compact"])
def test_numpy_integers_accepted_bools_refused(name):
    """Any integral value (numpy.int64 too) is accepted and stored as a Python int (it used to
    be refused with 'expected an integer ..., got 5'); a bool is refused."""
    cfg = PrecomputeConfig(**{name: np.int64(5)})
    assert getattr(cfg, name) == 5 and type(getattr(cfg, name)) is int
    assert cfg == PrecomputeConfig(**{name: 5}) and hash(cfg) == hash(PrecomputeConfig(**{name: 5}))
    for bad in (True, 5.0, "5"):
        with pytest.raises(ValueError, match=f"{name}: expected .*an integer >= .*, got {bad!r}"):
            PrecomputeConfig(**{name: bad})


@pytest.mark.parametrize("shape", [(0, 1, 8, 8), (1, 1, 8.5, 8), (1, 1, 8), (1, 0, 8, 8), "1188"])
def test_precompile_checks_images_shape(shape):
    """B = 0 used to be reported as a bad config.seed_image; a size 8.5 compiled for 8."""
    with pytest.raises(ValueError, match=r"images_shape: expected \(B, C, H, W\), integers >= 1, got"):
        precompile(shape, np.float64, PrecomputeConfig(num_steps=3))


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.longdouble, np.int32])
def test_float16_and_other_dtypes_refused(dtype):
    """Only float32/float64: float16 used to pass validation and crash inside LAPACK."""
    cfg = PrecomputeConfig(num_steps=3, max_sweeps=1)
    with pytest.raises(TypeError, match=f"dtype: expected float32 or float64, got {np.dtype(dtype).name}"):
        precompile((1, 1, 8, 8), dtype, cfg)
    if dtype is not np.int32:
        with pytest.raises(TypeError, match=r"images must have a floating dtype \(float32/float64\)"):
            precompute_scores(np.full((2, 1, 8, 8), 0.5).astype(dtype), cfg)


def test_precompile_compiles_what_x64_off_runs(images):
    """With x64 off, float64 images are computed in float32: precompile(images.shape,
    images.dtype) compiles those programs (it used to compile float64 ones, with JAX warning
    that float64 is not available, and precompute_scores compiled everything again)."""
    import warnings

    cfg = PrecomputeConfig(num_steps=3, strategy="gmres", compact=None)
    x = np.asarray(images[:1, :, :10, :10])  # float64 numpy, a shape no other test compiles
    with jax.enable_x64(False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Explicitly requested dtype float64 ..."
            precompile(x.shape, x.dtype, cfg)
        with compiled_programs() as warm:
            res = precompute_scores(x, cfg)
    assert warm == []
    assert res.scores.dtype == jnp.float32


def test_default_tol_follows_the_dtype(images):
    """tol=None (the default): 1e-10 in float64, exactly the old default (same programs, same
    results bit for bit), and 1e-6 in float32, where 1e-10 is out of reach: every solve then
    used to be reported non-converged and no image converged."""
    cfg = PrecomputeConfig(num_steps=4, strategy="gmres", outer_tol=1e-4, max_sweeps=10)
    assert cfg.tol is None and cfg.to_dict()["tol"] is None
    assert cfg.resolve(np.float64) == dataclasses.replace(cfg, tol=1e-10)
    assert cfg.resolve(np.float32).tol == 1e-6 and cfg.solver_config(3, np.float32).tol == 1e-6
    assert dataclasses.replace(cfg, tol=2e-7).resolve(np.float32).tol == 2e-7
    assert dataclasses.replace(cfg, tol=1e-8).resolve(np.float64).tol == 1e-8
    # below float32's epsilon no residual verifies it: every solve ran to its limit, unconverged
    # (the demo's tol=1e-10 with dtype=float32: 8x the matvecs, every image flagged)
    for t in (1e-10, 1e-8, 1.1e-7):
        with pytest.raises(ValueError, match=rf"^tol: {t:g} is below float32's machine epsilon 1.19e-07, where no "
                                             r"residual can verify it .*expected a tolerance >= 1.19e-07 in float32 "
                                             r"\(unset, it is 1e-06\), or float64$"):
            dataclasses.replace(cfg, tol=t).resolve(np.float32)
    with pytest.raises(ValueError, match="^tol: 1e-10 is below float32"):
        precompute_scores(images[:1].astype(jnp.float32), dataclasses.replace(cfg, tol=1e-10))
    spsolve = dataclasses.replace(cfg, tol=1e-10, strategy="spsolve")  # no Krylov tolerance to verify
    assert spsolve.resolve(np.float32) is spsolve
    x = images[:2]
    res = precompute_scores(x, cfg)
    old = precompute_scores(x, dataclasses.replace(cfg, tol=1e-10))
    np.testing.assert_array_equal(res.scores, old.scores)
    assert res.stats["sweeps"].tolist() == old.stats["sweeps"].tolist()
    res32 = precompute_scores(x.astype(jnp.float32), cfg)
    assert res32.stats["nonconverged"] == 0 and np.all(res32.stats["outer_converged"])
    assert _rel(res32.scores.astype(jnp.float64), res.scores) < 1e-3
    # forcing clips at the resolved tolerance too (an image converges only at a sweep solved to
    # it: one sweep more than the 10 of cfg here)
    forced = precompute_scores(x.astype(jnp.float32), dataclasses.replace(cfg, forcing=0.1, max_sweeps=20))
    assert forced.stats["nonconverged"] == 0 and np.all(forced.stats["outer_converged"])
    assert _rel(forced.scores, res32.scores) < 1e-4


def test_legacy_prng_key_runs_the_precompiled_programs():
    """A legacy jax.random.PRNGKey for paper_a_kde is the same key as jax.random.key: the same
    draws, and the programs precompile built serve it (it used to compile the initial density
    again, 1.3 s inside initial_seconds); anything else is refused naming key."""
    x = np.random.default_rng(0).uniform(0.1, 0.9, (2, 1, 8, 8))
    cfg = PrecomputeConfig(num_steps=3, initial="paper_a_kde", strategy="gmres", max_sweeps=2)
    precompile(x.shape, x.dtype, cfg)
    legacy, typed = jax.random.PRNGKey(3), jax.random.key(3)
    with compiled_programs() as names:
        a = precompute_scores(x, cfg, key=legacy)
    assert names == []
    b = precompute_scores(x, cfg, key=typed)
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    for bad in (np.zeros(2, np.int32), jnp.zeros((2, 2), jnp.uint32), 3,
                jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(ValueError, match="key: expected"):
            precompute_scores(x, cfg, key=bad)


def test_numpy_floats_accepted_and_eps_checked_on_construction():
    """NumPy floats are real numbers (stored as Python floats: one config, one cache key);
    eps outside [0, 1) was refused only when the time grid was built."""
    cfg = PrecomputeConfig(tol=np.float64(1e-8), outer_tol=np.float32(0.5), h=np.float64(1.0),
                           eps=np.float64(1e-3), forcing=np.float64(0.25))
    plain = PrecomputeConfig(tol=1e-8, outer_tol=0.5, h=1.0, eps=1e-3, forcing=0.25)
    assert cfg == plain and hash(cfg) == hash(plain) and type(cfg.tol) is float
    for kw, match in (({"eps": 1.5}, "eps: expected the first time in"), ({"eps": -0.1}, "eps:"),
                      ({"eps": float("nan")}, "eps:"), ({"tol": "a"}, "tol: expected a real"),
                      ({"h": True}, "h: expected a real"), ({"forcing": 1.0}, "forcing:")):
        with pytest.raises(ValueError, match=match):
            PrecomputeConfig(**kw)


def test_float64_images_with_x64_off_are_said_to_be_computed_in_float32():
    """With ``jax_enable_x64`` off (JAX's default), float64 images were computed and returned in
    float32 without a word, while the docstring promises the images' dtype (a walkthrough,
    2026-12-07). Now a warning says so and how to get float64."""
    import warnings

    from krylovjax import data
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    images = data.builtin_dataset(8, 1, seed=0).astype(np.float64)
    cfg = PrecomputeConfig(num_steps=2, max_sweeps=1, strategy="gmres")
    with jax.enable_x64(False):
        with pytest.warns(UserWarning, match=r"^images: float64 given with jax_enable_x64 off: computed \(and "
                                             r"returned\) in float32"):
            res = precompute_scores(images, cfg)
        assert res.scores.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # x64 on (the tests' setting): float64 as asked, no warning
        assert precompute_scores(images, cfg).scores.dtype == np.float64


def test_a_float32_solve_at_its_attainable_residual_counts_as_converged():
    """float32's tolerance 1e-6 is out of reach on stiff steps (sigma 25, 10 steps: the smallest
    residual float32 attains near the solution, about eps || |A| |x| ||, is above 1e-6 ||b||),
    and which solves still met it depended on rounding, so on the batch's chunking: a constant
    image alone failed 360 solves and never converged in 30 sweeps (a batch of 8 photos at
    sigma 8: 158 failed, 3 images not converged, one 5e-3 from float64). A solve that stops
    within twice that residual now counts as converged (forty-first session); its solution is
    unchanged. Alone, the image converges, as close to float64's spsolve as before."""
    img = np.full((1, 3, 16, 16), 0.5, np.float32)
    cfg = PrecomputeConfig(strategy="fast", sde_kwargs=(("sigma", 25.0),), num_steps=10)
    res = precompute_scores(img, cfg)
    st = res.stats
    assert bool(st["outer_converged"][0]) and int(st["sweeps"][0]) < 15, st
    assert st["nonconverged"] <= 2, st["nonconverged"]  # (360 before; 0 on this CPU)
    ref = precompute_scores(img.astype(np.float64), dataclasses.replace(cfg, strategy="spsolve"))
    m, m_ref = np.asarray(res.log_density, np.float64), np.asarray(ref.log_density)
    assert np.abs(m - m_ref).max() <= 2e-5 * np.abs(m_ref).max()


def test_the_attainable_residual_against_the_assembled_matrix():
    """``_at_precision``: ``r <= ATTAINABLE_SLACK eps || |A| |x| ||`` per system (normwise), the
    bound from scipy's assembled matrix with absolute values; a non-finite residual or solution
    is never at precision."""
    from krylovjax.fokker_planck import fp_operator
    from krylovjax import precompute as P
    from krylovjax.precompute import _at_precision

    rng = np.random.default_rng(3)
    op = fp_operator(5.0, 0.05, 1.0, rng.normal(size=(4, 2, 6, 5)))
    x = rng.normal(size=(4, 6, 5))
    floor = np.array([np.finfo(np.float64).eps * np.linalg.norm(abs(op.to_scipy(i)) @ np.abs(x[i]).ravel())
                      for i in range(4)])
    floor = floor * P.ATTAINABLE_SLACK
    r = floor * np.array([0.99, 1.01, 0.5, 2.0])
    np.testing.assert_array_equal(np.asarray(_at_precision(op, jnp.asarray(x), jnp.asarray(r))),
                                  [True, False, True, False])
    assert not bool(_at_precision(op, jnp.asarray(x), jnp.full(4, jnp.nan)).any())
    assert not bool(_at_precision(op, jnp.asarray(x).at[0, 0, 0].set(jnp.inf), jnp.zeros(4))[0])


@pytest.mark.parametrize("scale", [1.0, 1e-20])
def test_a_failed_float32_solve_is_not_at_precision_whatever_the_scale_of_b(scale):
    """A solve forced to fail (GMRES(1), one cycle) is not converged, also when ``||b||^2``
    underflows in float32 (b of 1e-20: the residual was measured against 0 and passed; a
    review, forty-first session)."""
    from krylovjax import precompute as P
    from krylovjax.fokker_planck import fp_operator

    rng = np.random.default_rng(0)
    op = fp_operator(400.0, 0.1, 1.0, rng.normal(size=(2, 2, 16, 16)), dtype=jnp.float32)
    solve = P._step_solver(PrecomputeConfig(strategy="gmres", restart=1, max_restarts=1), 1)
    b = jnp.asarray(scale * rng.normal(size=(2, 16, 16)), jnp.float32)
    x, conv, _ = solve(op, b, None, jnp.ones(2, bool))
    b64, x64 = np.asarray(b, np.float64).reshape(2, -1), np.asarray(op.matvec(x), np.float64).reshape(2, -1)
    assert np.all(np.linalg.norm(b64 - x64, axis=1) > 0.1 * np.linalg.norm(b64, axis=1))  # really failed
    assert not np.asarray(conv).any()
