"""Mutation-audit tests of the training wiring, the pre-computation loop, the pipeline and the
store (hand-made mutants, /tmp/mut3/log.md). Each test checks against an independent reference
(numpy closed forms, hand-written optimiser steps, invariants), on tiny configurations.

The training tests replace the U-Net by a fake network (``training._apply`` monkeypatched) so
that every quantity the loss sees can be recovered exactly and compared with method.md 4.2 /
Ho et al.; nothing here compiles the U-Net.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from krylovjax import training as tr

B_IMG, N_LEV, C, HW = 3, 4, 3, 8


def _model_def(cfg: tr.TrainConfig, num_images: int = B_IMG) -> tr.ModelDef:
    """A ModelDef without a network (the tests monkeypatch ``_apply``): only its config is read."""
    return tr.ModelDef(None, None, tr.model_config(cfg, (C, HW, HW), num_images))


def _coded_trajectories():
    """x^n_i constant = 100 i + 10 n (every pixel): the pair (i, n) can be read back from the
    perturbed input, whose noise lambda(t) z has a pixel mean far below 5."""
    t = np.array([0.05, 0.2, 0.5, 1.0])
    code = 100.0 * np.arange(B_IMG)[:, None] + 10.0 * np.arange(N_LEV)[None, :]
    x = np.broadcast_to(code[:, :, None, None, None], (B_IMG, N_LEV, C, HW, HW)).astype(np.float64)
    return tr.Trajectories(x=np.ascontiguousarray(x), t=t), code


def _ve_lambda_g2(t, sigma=5.0):
    t = np.asarray(t, np.float64)
    return np.sqrt((sigma ** (2 * t) - 1) / (2 * np.log(sigma))), sigma ** (2 * t)


def _record_apply(monkeypatch, out):
    """Replace the U-Net (``training._apply``) by ``out(params, x)``; the returned dict holds the
    last call's x, t and image index."""
    seen = {}

    def fake_apply(md, params, xx, tt, idx, **kw):
        seen.update(x=np.asarray(xx), t=np.asarray(tt), idx=None if idx is None else np.asarray(idx))
        return out(params, xx)

    monkeypatch.setattr(tr, "_apply", fake_apply)
    return seen


def _affine(params, x):
    return params["a"] * x + params["b"]


def _zero(params, x):
    return jnp.zeros_like(x)


def _jitter_bounds(t, w):
    """Level n's time window by hand: w / 2 of the gap to each neighbour, cut at the two ends."""
    gaps = np.diff(t)
    return t - 0.5 * w * np.concatenate([[0.0], gaps]), t + 0.5 * w * np.concatenate([gaps, [0.0]])


@pytest.mark.parametrize("scale_by_sigma", [False, True])
def test_ours_batch_pairs_times_noise_and_loss(monkeypatch, scale_by_sigma):
    """The ``ours`` batch (method.md 4.2-4.3): each drawn x is x^n_i of one pair (i, n) plus
    lambda(t) z, its time t lies in level n's jitter window (not at its edge), the image index
    reaches the network, and the loss equals mean_b 1/(2 g^2) sum (s lambda + z)^2 computed by
    hand from the recovered z (s = the network's output, over lambda with scale_by_sigma)."""
    traj, code = _coded_trajectories()
    cfg = tr.TrainConfig(batch_size=64, time_jitter=0.5, per_image_offset=True,
                         scale_by_sigma=scale_by_sigma)
    arrays, _ = tr.prepare_data(cfg, traj)
    seen = _record_apply(monkeypatch, _affine)
    params = {"a": jnp.asarray(0.01), "b": jnp.asarray(-0.3)}
    loss_fn = tr._loss_fn(cfg, _model_def(cfg), None)
    tt = traj.t
    lo, hi = _jitter_bounds(tt, 0.5)
    us, levels = [], set()
    for k in range(3):
        loss, per = loss_fn(params, jax.random.PRNGKey(k), {k2: jnp.asarray(v) for k2, v in arrays.items()}, False)
        x, t, idx = seen["x"], seen["t"], seen["idx"]
        assert x.shape == (64, C, HW, HW)
        mean = x.reshape(64, -1).mean(1)
        pair = np.rint(mean / 10.0).astype(int)  # 10 i + n
        i, n = pair // 10, pair % 10
        np.testing.assert_array_equal(idx, i)  # the index of the image x was taken from
        assert np.all(n < N_LEV)
        np.testing.assert_allclose(mean, code[i, n], atol=1.0)
        assert np.all(t >= lo[n] - 1e-12) and np.all(t <= hi[n] + 1e-12)
        u = np.where(hi[n] > lo[n], (t - lo[n]) / (hi[n] - lo[n]), 0.5)
        us.append(u)
        levels |= set(pair.tolist())
        lam, g2 = _ve_lambda_g2(t)
        z = (x - code[i, n][:, None, None, None]) / lam[:, None, None, None]
        assert abs(z.std() - 1.0) < 0.05 and abs(z.mean()) < 0.05  # standard normal noise
        out = 0.01 * x - 0.3
        s = out / lam[:, None, None, None] if scale_by_sigma else out
        want = (((s * lam[:, None, None, None] + z) ** 2).sum(axis=(1, 2, 3))) / (2 * g2)
        np.testing.assert_allclose(np.asarray(per), want, rtol=1e-9)
        np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-9)
    u = np.concatenate(us)
    # every (image, level) pair is drawn (192 draws of 12 pairs: a pair is missed with p ~ 5e-8)
    assert levels == {10 * i + n for i in range(B_IMG) for n in range(N_LEV)}
    assert u.min() < 0.1 and u.max() > 0.9 and 0.4 < u.mean() < 0.6  # uniform in the window


def test_ddpm_batch_is_centred_images_at_integer_steps(monkeypatch):
    """The DDPM batch (Ho et al.): x_i = sqrt(abar_i) (2 x0 - 1) + sqrt(1 - abar_i) eps with the
    linear beta schedule written out in numpy, and the network's time is i / T for an integer
    step i < ddpm_max_train_step."""
    cfg = tr.TrainConfig(method="ddpm", batch_size=32, ddpm_max_train_step=40)
    vals = np.array([0.1, 0.5, 0.85])
    images = np.broadcast_to(vals[:, None, None, None], (3, C, HW, HW)).astype(np.float64)
    arrays, _ = tr.prepare_data(cfg, np.ascontiguousarray(images))
    seen = _record_apply(monkeypatch, _zero)
    loss_fn = tr._loss_fn(cfg, _model_def(cfg), None)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    drawn = set()
    for k in range(2):
        loss, per = loss_fn({}, jax.random.PRNGKey(k), {"images": jnp.asarray(arrays["images"])}, False)
        x, tau = seen["x"], seen["t"]
        step = tau * 1000.0
        i = np.rint(step).astype(int)
        np.testing.assert_allclose(step, i, atol=1e-6)
        assert np.all((0 <= i) & (i < 40)) and len(set(i.tolist())) > 5
        mean = x.reshape(32, -1).mean(1)
        centred = mean / np.sqrt(abar[i])  # 2 x0 - 1 up to the noise's mean
        noise = np.sqrt(1 - abar[i]) / np.sqrt(C * HW * HW) / np.sqrt(abar[i])
        j = np.argmin(np.abs(centred[:, None] - (2 * vals - 1)[None, :]), axis=1)
        assert np.all(np.abs(centred - (2 * vals - 1)[j]) < 6 * noise)
        drawn |= set(j.tolist())
        eps = (x - (np.sqrt(abar[i]) * (2 * vals - 1)[j])[:, None, None, None]) \
            / np.sqrt(1 - abar[i])[:, None, None, None]
        np.testing.assert_allclose(np.asarray(per), (eps ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)  # float32 compute
    assert drawn == {0, 1, 2}  # every image is drawn


def test_train_step_is_clipped_adam_with_warmup_and_ema(monkeypatch):
    """Three updates of the train step against the optimiser written out in numpy: the step-k
    gradient of the batch drawn from fold_in(rng, k), clipped to global norm ``grad_clip``,
    Adam (b1 0.9, b2 0.999, eps 1e-8, bias-corrected) at lr * min(1, (k + 1) / warmup), and the
    EMA with decay min(ema_decay, (1 + k) / (10 + k)) of the new parameters."""
    traj, _ = _coded_trajectories()
    cfg = tr.TrainConfig(batch_size=16, lr=0.1, warmup_steps=3, grad_clip=0.05, ema_decay=0.95)
    arrays, _ = tr.prepare_data(cfg, traj)
    data = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    monkeypatch.setattr(tr, "_apply", lambda md, p, xx, tt, idx, **kw: p["a"] * xx + p["b"])
    md = _model_def(cfg)
    params = {"a": jnp.asarray(0.01, jnp.float32), "b": jnp.asarray(-0.3, jnp.float32)}
    rng = jax.random.PRNGKey(5)
    state = tr.TrainState(step=jnp.asarray(0, jnp.int32), params=params, ema_params=params,
                          opt_state=tr.make_optimizer(cfg).init(params), rng=rng)
    step = jax.jit(tr._step_fn(cfg, md, None))
    loss_fn = tr._loss_fn(cfg, md, None)

    names = ("a", "b")
    p = np.array([0.01, -0.3])
    ema = p.copy()
    mu = np.zeros(2)
    nu = np.zeros(2)
    for k in range(3):
        key = jax.random.fold_in(rng, k)
        grads = jax.grad(lambda q: loss_fn(q, key, data, True)[0])({n: jnp.asarray(v, jnp.float32)
                                                                      for n, v in zip(names, p)})
        g = np.array([float(grads[n]) for n in names], np.float64)
        gnorm = np.linalg.norm(g)
        assert gnorm > 10 * cfg.grad_clip  # the clipping is active
        gc = g * cfg.grad_clip / gnorm
        mu = 0.9 * mu + 0.1 * gc
        nu = 0.999 * nu + 0.001 * gc ** 2
        lr = 0.1 * min(1.0, (k + 1) / 3)
        p = p - lr * (mu / (1 - 0.9 ** (k + 1))) / (np.sqrt(nu / (1 - 0.999 ** (k + 1))) + 1e-8)
        d = min(0.95, (1 + k) / (10 + k))
        ema = d * ema + (1 - d) * p
        state, metrics = step(state, data)
        assert int(state.step) == k + 1
        np.testing.assert_allclose([float(state.params[n]) for n in names], p, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose([float(state.ema_params[n]) for n in names], ema, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(float(metrics.grad_norm), gnorm, rtol=1e-4)
        np.testing.assert_allclose(float(metrics.lr), lr, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Pre-computation: time index of g and of the drift, Paper A's fixed point, the outer change
# ----------------------------------------------------------------------------------------------


def _pc_images(H=8, W=8, B=2):
    from krylovjax import data

    return jnp.asarray(data.builtin_dataset(8, B, seed=0)[:, :, :H, :W], jnp.float64)


def _spsolve_step(g2, dt, lag, m_prev, drift=None, scheme="fitted"):
    """One backward-Euler step for systems ``m_prev [S, H, W]``, system by system with scipy."""
    import scipy.sparse.linalg as spla

    from krylovjax.fokker_planck import fp_operator

    op = fp_operator(g2, dt, 1.0, jnp.asarray(lag), None if drift is None else jnp.asarray(drift),
                     scheme=scheme)
    b = np.asarray(op.rhs(jnp.asarray(m_prev)))
    S, H, W = b.shape
    return np.stack([spla.spsolve(op.to_scipy(i).tocsc(), b[i].ravel()).reshape(H, W)
                     for i in range(S)])


def test_vp_sweep_uses_the_drift_of_its_own_time_level():
    """The VP SDE (the only one with a drift): sweep 1 of Algorithm 1 written out with scipy,
    f^n = -beta(t_n) / 2 * (pixel position relative to the grid centre), component 0 along W
    (x = column), component 1 along H; g^2 and f both at the level t_n being solved."""
    from krylovjax import initial, scores, sde as sde_lib
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    x = _pc_images(8, 8)
    N = 4
    cfg = PrecomputeConfig(sde="vp", sde_kwargs=(), num_steps=N, strategy="spsolve", max_sweeps=1)
    got = precompute_scores(x, cfg)
    m0 = np.asarray(initial.initial_log_density(x))
    B, Cc, H, W = m0.shape
    m = m0.reshape(B * Cc, H, W)
    t, dt = sde_lib.time_grid(N)
    t = np.asarray(t)
    beta = 0.1 + t * (20.0 - 0.1)  # VPSDE() defaults: beta_min 0.1, beta_max 20
    assert sde_lib.VPSDE() == cfg.make_sde()
    cols = np.arange(W) - (W - 1) / 2
    rows = np.arange(H) - (H - 1) / 2
    pos = np.stack([np.broadcast_to(cols[None, :], (H, W)), np.broadcast_to(rows[:, None], (H, W))])
    want = [m]
    for n in range(1, N):
        f = np.broadcast_to(-0.5 * beta[n] * pos, (B * Cc, 2, H, W))
        lag = np.asarray(scores.score(jnp.asarray(m0.reshape(B * Cc, H, W))))
        want.append(_spsolve_step(beta[n], dt, lag, want[-1], f))
    want = np.stack(want, axis=1).reshape(B, Cc, N, H, W)
    np.testing.assert_allclose(np.asarray(got.log_density), want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_timestep_fixed_point_is_paper_a_loop():
    """``outer="timestep"`` (Paper A): at step n iterate x <- solve(g^2(t_n), score(x)) from
    x = m^{n-1}, exactly ``max_fixed_point`` times when ``outer_tol`` is out of reach, and report
    every step of every image as not fixed-point converged; the scores are those of the m."""
    from krylovjax import initial, scores, sde as sde_lib
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    x = _pc_images(6, 6, 1)
    N, K = 3, 2
    cfg = PrecomputeConfig(num_steps=N, outer="timestep", strategy="spsolve", max_fixed_point=K,
                           outer_tol=1e-15)
    got = precompute_scores(x, cfg)
    m0 = np.asarray(initial.initial_log_density(x))
    B, Cc, H, W = m0.shape
    t, dt = sde_lib.time_grid(N)
    g2 = np.asarray(sde_lib.VESDE(5.0).g2(t))
    ms = [m0.reshape(B * Cc, H, W)]
    for n in range(1, N):
        it = ms[-1]
        for _ in range(K):
            it = _spsolve_step(g2[n], dt, np.asarray(scores.score(jnp.asarray(it))), ms[-1])
        ms.append(it)
    want = np.stack(ms, axis=1).reshape(B, Cc, N, H, W)
    np.testing.assert_allclose(np.asarray(got.log_density), want, rtol=0, atol=1e-10 * np.abs(want).max())
    want_s = np.asarray(scores.score(jnp.asarray(want)))
    np.testing.assert_allclose(np.asarray(got.scores), want_s, rtol=0, atol=1e-10 * np.abs(want_s).max())
    st = got.stats
    np.testing.assert_array_equal(st["sweeps"], K * (N - 1))
    np.testing.assert_array_equal(st["fixed_point_iterations"], K)
    assert not st["outer_converged"].any() and st["fixed_point_unconverged_steps"] == B * (N - 1)


def test_outer_change_is_relative_to_the_previous_sweep():
    """The outer test of Algorithm 1: the change reported after sweep k is
    ||m^(k) - m^(k-1)|| / ||m^(k-1)|| over the image's (channel, level, pixel) values, checked
    with numpy against the iterates of runs cut after k - 1 and k sweeps."""
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    x = _pc_images(8, 8)
    base = dict(num_steps=4, strategy="spsolve", outer_tol=1e-15)
    runs = {k: precompute_scores(x, PrecomputeConfig(**base, max_sweeps=k)) for k in (1, 2, 3)}
    for k in (2, 3):
        new, old = np.asarray(runs[k].log_density), np.asarray(runs[k - 1].log_density)
        want = np.linalg.norm((new - old).reshape(2, -1), axis=1) / np.linalg.norm(old.reshape(2, -1), axis=1)
        assert np.all(want < runs[k - 1].stats["outer_change"])  # converging: the last is the best
        np.testing.assert_allclose(runs[k].stats["outer_change"], want, rtol=1e-8)


# ----------------------------------------------------------------------------------------------
# Pipeline and store
# ----------------------------------------------------------------------------------------------


def test_pipeline_chunk_keys_embedding_component_and_totals(tmp_path):
    """run_precompute with Paper A's random KDE, chunks of one image, embed_component="x" and
    one sweep (so no image converges): chunk i draws from fold_in(key(seed), i) (two identical
    images get different m0, each the library's result for its key); the stored trajectories
    are x^n = x^{n-1} - g(t_n)^2 / 2 * d_x m^n dt (method.md 4.1, f = 0) in numpy from the
    stored scores; the summary's outer_nonconverged counts the stored unconverged images."""
    from krylovjax import pipeline
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    one = np.asarray(_pc_images(8, 8, 1))
    images = np.concatenate([one, one])
    N = 3
    cfg = PrecomputeConfig(num_steps=N, strategy="spsolve", initial="paper_a_kde", max_sweeps=1,
                           outer_tol=1e-15)
    kw = dict(chunk_images=1, store_dtype=np.float64, embed_component="x", seed=3)
    summary = pipeline.run_precompute(images, cfg, tmp_path, progress=False, **kw)
    store = pipeline.open_store(tmp_path, images, cfg, **kw)
    m = store.read_all("log_density")
    assert np.abs(m[0, :, 0] - m[1, :, 0]).max() > 1e-3  # different random draws per chunk
    for i in range(2):
        res = precompute_scores(images[i:i + 1], cfg, key=jax.random.fold_in(jax.random.key(3), i))
        np.testing.assert_allclose(m[i], np.asarray(res.log_density[0]), rtol=1e-12, atol=1e-12)
    s = store.read_all("scores")  # [B, C, N, 2, H, W]
    t = store.read_all("t")[0]
    np.testing.assert_allclose(t, np.linspace(1e-3, 1.0, N), rtol=1e-15)
    dt = (1.0 - 1e-3) / (N - 1)
    want = [images]
    for n in range(1, N):
        want.append(want[-1] - 0.5 * 25.0 ** t[n] * s[:, :, n, 0] * dt)
    np.testing.assert_allclose(store.read_all("embedded"), np.stack(want, axis=1), rtol=1e-12, atol=1e-12)
    conv = store.read_all("outer_converged")
    assert not conv.any()
    assert summary.outer_nonconverged == 2 and summary.outer_diverged == 0
    tot = pipeline.summarize_store(store)
    assert tot["outer_nonconverged"] == 2 and tot["outer_diverged"] == 0


def test_summarize_store_totals_hand_written_statistics(tmp_path):
    """summarize_store over a store whose statistics are written by hand (3 images in chunks of
    2, the last chunk short): the totals are the plain sums / mean / max of the fields."""
    from krylovjax import pipeline
    from krylovjax.precompute import PrecomputeConfig

    imgs = np.full((3, 1, 4, 4), 0.5)
    store = pipeline.open_store(tmp_path, imgs, PrecomputeConfig(num_steps=2, strategy="spsolve"),
                                chunk_images=2)
    assert [store.chunk_bounds(i) for i in range(store.num_chunks)] == [(0, 2), (2, 3)]
    stats = dict(sweeps=[3, 5, 4], outer_converged=[True, False, False],
                 outer_diverged=[False, True, True], systems=[6, 10, 8], matvecs=[100, 250, 0],
                 nonconverged=[0, 2, 1])
    for i in range(store.num_chunks):
        lo, hi = store.chunk_bounds(i)
        chunk = {name: np.zeros((hi - lo,) + spec.shape, spec.dtype) for name, spec in store.fields.items()}
        chunk.update({k: np.asarray(v, store.fields[k].dtype)[lo:hi] for k, v in stats.items()})
        store.write_chunk(i, chunk)
    tot = pipeline.summarize_store(store)
    assert tot == {"images": 3, "systems_solved": 24, "matvecs": 350, "matvecs_per_system": 350 / 24,
                   "nonconverged": 3, "sweeps_mean": 4.0, "sweeps_max": 5, "outer_nonconverged": 2,
                   "outer_diverged": 2}


@contextlib.contextmanager
def _system_0_always_fails(monkeypatch):
    """``cross_matrix.solve_fp`` with system 0 of every batch (image 0, channel 0) failing: it
    returns its warm start (0 without one), unconverged. The pre-computation's programs are
    rebuilt with the patched solver and dropped afterwards."""
    from krylovjax import cross_matrix, precompute

    orig = cross_matrix.solve_fp

    def broken(op, b, cfg, x0=None):
        res = orig(op, b, cfg, x0=x0)
        bad = jnp.arange(b.shape[0]) == 0
        x = jnp.where(bad[:, None, None], 0.0 if x0 is None else x0, res.x)
        return res._replace(x=x, converged=res.converged & ~bad)

    monkeypatch.setattr(cross_matrix, "solve_fp", broken)
    precompute._build.cache_clear()
    try:
        yield
    finally:
        precompute._build.cache_clear()


def test_timestep_fixed_point_needs_every_channel_solved(monkeypatch):
    """Paper A's fixed point with three channels: an image whose channel-0 solve always fails
    (returns its warm start) is never fixed-point converged, although its other channels
    converge; the other image converges."""
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    with _system_0_always_fails(monkeypatch):
        images = np.asarray(_pc_images(6, 6, 2))
        cfg = PrecomputeConfig(num_steps=3, strategy="gmres", outer="timestep", max_fixed_point=8)
        st = precompute_scores(images, cfg).stats
        assert st["outer_converged"].tolist() == [False, True]
        assert st["fixed_point_unconverged_steps"] == 2  # both steps of image 0
        assert st["sweeps"][0] == 2 * 8 and st["nonconverged_per_image"][0] == 2 * 8


def test_sweeps_of_an_image_whose_solves_always_fail(monkeypatch):
    """Algorithm 1 with image 0's solve always returning its warm start (the first sweep's warm
    start is the previous level, so every level stays m0: its change is exactly 0 from sweep 1
    on, but no sweep is trusted): without a patience it is never converged and sweeps to
    ``max_sweeps`` (an untrusted sweep must not stop it); with ``divergence_patience = P`` it
    stops as diverged P sweeps after its last new minimum (sweep 1, change 0). Image 1
    converges either way."""
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    with _system_0_always_fails(monkeypatch):
        images = np.asarray(_pc_images(6, 6, 2))[:, :1]
        base = dict(num_steps=3, strategy="gmres", max_sweeps=8, compact=None)
        st = precompute_scores(images, PrecomputeConfig(**base)).stats
        assert st["outer_converged"].tolist() == [False, True]
        assert st["sweeps"][0] == 8 and st["sweeps"][1] < 8
        assert not st["outer_diverged"].any()
        st = precompute_scores(images, PrecomputeConfig(**base, divergence_patience=2)).stats
        assert st["outer_converged"].tolist() == [False, True]
        assert st["outer_diverged"].tolist() == [True, False]
        assert st["sweeps"][0] == 1 + 2


def test_seed_system_keeps_its_problem_when_its_image_is_inactive():
    """The cross-matrix seed basis serves every system of the step, so the seed system keeps its
    real problem when its own image has converged (only the solver's view changes): the other
    images' solutions and matvec counts are those of a step where the seed image is active,
    and they match scipy."""
    import scipy.sparse.linalg as spla

    from krylovjax.fokker_planck import fp_operator
    from krylovjax.precompute import PrecomputeConfig, _step_solver

    rng = np.random.default_rng(3)
    S, H, W = 6, 8, 8  # 2 images x 3 channels; the seed is image 0 = systems 0..2
    op = fp_operator(5.0, 0.1, 1.0, jnp.asarray(rng.normal(size=(S, 2, H, W))))
    b = jnp.asarray(rng.normal(size=(S, H, W)))
    solve = jax.jit(_step_solver(PrecomputeConfig(strategy="cross_matrix_precond", num_steps=3,
                                                  tol=1e-10, seed_image=0), 3))
    with_seed = solve(op, b, None, jnp.ones(S, bool))
    without = solve(op, b, None, jnp.array([False] * 3 + [True] * 3))
    np.testing.assert_array_equal(np.asarray(without[2])[3:], np.asarray(with_seed[2])[3:])
    np.testing.assert_allclose(np.asarray(without[0])[3:], np.asarray(with_seed[0])[3:], rtol=0, atol=1e-12)
    for i in range(3, S):
        ref = spla.spsolve(op.to_scipy(i).tocsc(), np.asarray(b[i]).ravel()).reshape(H, W)
        np.testing.assert_allclose(np.asarray(without[0][i]), ref, rtol=0, atol=1e-8 * np.abs(ref).max())
