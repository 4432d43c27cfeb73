"""Tests of krylovjax.training and experiments/train.py.

Compilations dominate the runtime, so the tests share two configs (``OURS`` and ``DDPM``, tiny
U-Net at 16x16, batch 8 on the 4 forced CPU devices) whose compiled steps are cached in-process.
Two subprocesses run the absl binary: a DDPM run that is SIGKILLed after its second checkpoint
and resumed in-process (compared bit for bit with an uninterrupted run), and a short ``ours`` run
that pre-computes the scores of the built-in photos on the fly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from krylovjax import sde as sde_lib
from krylovjax import training as tr
from krylovjax.data import builtin_dataset

from _fs import snapshot as _snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, NUM_IMAGES, N_LEVELS = 16, 2, 5
# One resolution level and only the middle attention block: compiles ~40% faster than "tiny".
MODEL = {"ch": 16, "ch_mult": (1,), "attn_resolutions": ()}


def _tiny_config(**overrides) -> tr.TrainConfig:
    """experiments/configs/train_tiny.py made small; the binary is given the same values."""
    sys.path.insert(0, REPO)
    from experiments.configs import train_tiny

    c = train_tiny.get_config().to_dict()
    for k in ("data", "precompute"):
        c.pop(k)
    c.update(model_overrides=dict(c["model_overrides"], **MODEL), lr=2e-3, warmup_steps=5, batch_size=8,
             checkpoint_every=1000, log_every=5, progress=False)
    c.update(overrides)
    return tr.TrainConfig.from_dict(c)


OURS = _tiny_config(method="ours")
DDPM = _tiny_config(method="ddpm")


@pytest.fixture(scope="module")
def images():
    return builtin_dataset(SIZE, NUM_IMAGES)  # float32 [2, 3, 16, 16], what the binary uses


@pytest.fixture(scope="module")
def trajectories(images):
    # A smooth synthetic trajectory (the embedding itself is tested in test_transport.py).
    x = np.stack([images * (1 - 0.1 * n) + 0.05 * n for n in range(N_LEVELS)], axis=1).astype(np.float32)
    return tr.Trajectories(x=x, t=np.linspace(1e-3, 1.0, N_LEVELS))


def _data(cfg, images, trajectories):
    return trajectories if cfg.method == "ours" else images


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_embedding_loss_equals_hand_computed_value(reduction):
    rng = np.random.default_rng(1)
    B, C, H, W = 3, 2, 4, 5
    x = rng.uniform(0, 1, (B, C, H, W))
    z = rng.standard_normal((B, C, H, W))
    t = np.array([0.05, 0.4, 0.9])
    a, b = 0.7, -0.3
    seen = {}

    def fake_score(xt, tt):  # output depends on its input, so the perturbation is checked too
        seen["t"] = tt
        return a * xt + b

    sigma = 5.0
    loss, per = tr.embedding_loss(fake_score, jnp.asarray(x), jnp.asarray(t), jnp.asarray(z),
                                  sde_lib.VESDE(sigma), reduction=reduction)
    lam = np.sqrt((sigma ** (2 * t) - 1) / (2 * np.log(sigma)))  # method.md 4.2
    g2 = sigma ** (2 * t)
    want_per = np.empty(B)
    for i in range(B):
        s = a * (x[i] + lam[i] * z[i]) + b
        r = (s * lam[i] + z[i]) ** 2
        want_per[i] = (r.sum() if reduction == "sum" else r.mean()) / (2 * g2[i])
    np.testing.assert_allclose(np.asarray(per), want_per, rtol=1e-12)
    np.testing.assert_allclose(float(loss), want_per.mean(), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(seen["t"]), t)

    # Constant model output c and Paper A's constant SDE (g = 0.5, lambda = 0.1): closed form.
    c = 2.0
    loss_c, _ = tr.embedding_loss(lambda xt, tt: jnp.full_like(xt, c), jnp.asarray(x), jnp.asarray(t),
                                  jnp.asarray(z), sde_lib.ConstantSDE(0.5, 0.1), reduction=reduction)
    red = ((c * 0.1 + z) ** 2).reshape(B, -1)
    red = red.sum(1) if reduction == "sum" else red.mean(1)
    np.testing.assert_allclose(float(loss_c), np.mean(red / (2 * 0.25)), rtol=1e-12)

    # The exact score of the perturbation kernel, -z / lambda, makes the loss zero.
    lam_b = lam[:, None, None, None]
    zero, _ = tr.embedding_loss(lambda xt, tt: -(xt - jnp.asarray(x)) / lam_b**2, jnp.asarray(x),
                                jnp.asarray(t), jnp.asarray(z), sde_lib.VESDE(sigma), reduction=reduction)
    assert abs(float(zero)) < 1e-20


def test_embedding_loss_rejects_bad_shapes():
    x = jnp.zeros((2, 1, 4, 4))
    with pytest.raises(ValueError, match="z"):
        tr.embedding_loss(lambda a, b: a, x, jnp.ones(2), jnp.zeros((2, 1, 4, 5)), sde_lib.VESDE())
    with pytest.raises(ValueError, match="t"):
        tr.embedding_loss(lambda a, b: a, x, jnp.ones(3), jnp.zeros_like(x), sde_lib.VESDE())
    with pytest.raises(ValueError, match="score_fn"):
        tr.embedding_loss(lambda a, b: a[:, :, :2], x, jnp.ones(2), jnp.zeros_like(x), sde_lib.VESDE())
    with pytest.raises(ValueError, match="reduction"):
        tr.embedding_loss(lambda a, b: a, x, jnp.ones(2), jnp.zeros_like(x), sde_lib.VESDE(), reduction="max")


def test_jitter_windows_schedule_and_ema_closed_forms():
    t = np.array([0.001, 0.2, 0.5, 1.0])
    lo, hi = tr.jitter_windows(t, 0.5)
    np.testing.assert_allclose(lo, [0.001, 0.2 - 0.25 * 0.199, 0.5 - 0.25 * 0.3, 1.0 - 0.25 * 0.5], rtol=1e-15)
    np.testing.assert_allclose(hi, [0.001 + 0.25 * 0.199, 0.2 + 0.25 * 0.3, 0.5 + 0.25 * 0.5, 1.0], rtol=1e-15)
    lo0, hi0 = tr.jitter_windows(t, 0.0)
    np.testing.assert_array_equal(lo0, t)
    np.testing.assert_array_equal(hi0, t)
    with pytest.raises(ValueError, match="increasing"):
        tr.jitter_windows([0.1, 0.1, 0.3], 0.5)
    with pytest.raises(ValueError, match="t"):
        tr.jitter_windows([0.0, 0.5], 0.5)

    sched = tr.learning_rate(tr.TrainConfig(lr=1e-3, warmup_steps=4))
    np.testing.assert_allclose([float(sched(k)) for k in range(6)], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    assert float(tr.learning_rate(tr.TrainConfig(lr=3e-4, warmup_steps=0))(7)) == pytest.approx(3e-4)
    np.testing.assert_allclose([float(tr.ema_decay_at(k, 0.999)) for k in (0, 10, 10**6)],
                               [0.1, 11 / 20, 0.999], rtol=1e-6)


def test_jitter_windows_rejects_a_time_jitter_outside_0_1():
    t = np.linspace(0.1, 1.0, 4)
    for w in (5.0, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"^time_jitter: expected a window fraction in \[0, 1\]"):
            tr.jitter_windows(t, w)
    for w in (1.0, np.float32(0.5), np.asarray(0.25)):
        lo, hi = tr.jitter_windows(t, w)
        assert np.all(t[0] <= lo) and np.all(lo <= t) and np.all(t <= hi) and np.all(hi <= t[-1])


def test_embedding_loss_checks_concrete_values_and_costs_nothing_traced():
    x = jnp.ones((2, 1, 4, 4))
    z = jnp.zeros_like(x)
    sde = sde_lib.VESDE(5.0)
    score = lambda a, b: -a  # noqa: E731
    for args, msg in [((x, jnp.array([-0.1, 0.5]), z), r"^t: expected times > 0"),
                      ((x, jnp.array([0.0, 0.5]), z), r"^t: expected times > 0"),
                      ((x, jnp.array([np.nan, 0.5]), z), "^t: expected finite"),
                      ((x.at[0, 0, 0, 0].set(np.nan), jnp.array([0.1, 0.5]), z), "^x: expected finite"),
                      ((x, jnp.array([0.1, 0.5]), z.at[1, 0, 0, 0].set(np.inf)), "^z: expected finite")]:
        with pytest.raises(ValueError, match=msg):
            tr.embedding_loss(score, *args, sde)

    class HalfRange(sde_lib.VESDE):  # an SDE whose lambda(t) is NaN beyond t = 1
        def perturbation_std(self, t):
            return jnp.where(t > 1.0, jnp.nan, super().perturbation_std(t))

    with pytest.raises(ValueError, match=r"^t: expected times in the SDE's range, where lambda\(t\)"):
        tr.embedding_loss(score, x, jnp.array([0.5, 1.5]), z, HalfRange())
    # Traced inputs (the jitted train step) skip the value checks: no error, no host callback.
    fn = lambda xx, tt, zz: tr.embedding_loss(score, xx, tt, zz, sde)[0]  # noqa: E731
    assert np.isnan(float(jax.jit(fn)(x, jnp.array([-0.1, 0.5]), z)))
    assert "callback" not in str(jax.make_jaxpr(fn)(x, jnp.array([0.1, 0.5]), z))


def test_config_validates_sde_and_model_names_and_stores_python_ints():
    with pytest.raises(ValueError, match=r"^sde: expected an SDE name, one of \('constant', 've', 'vp'\), got 'foo'"):
        tr.TrainConfig(sde="foo")
    with pytest.raises(ValueError, match=r"^model: expected a preset name, one of \('paper', 'tiny'\), got 'foo'"):
        tr.TrainConfig(model="foo")
    with pytest.raises(ValueError, match="^sde_kwargs: .*sigma") as bad_value:
        tr.TrainConfig(sde_kwargs={"sigma": -1.0})
    assert "belong to another SDE" not in str(bad_value.value)  # the SDE's own key with a bad value
    # the default kwargs are the VE SDE's sigma: the fix is named (a walkthrough)
    with pytest.raises(ValueError, match=r"^sde_kwargs: not accepted by the SDE 'vp': bad keyword arguments \['sigma'\]"
                                         r".* \(sde_kwargs \{'sigma': 5\.0\} belong to another SDE: give 'vp''s own, "
                                         r"or an empty dict, \{\}, for its defaults\)$"):
        tr.TrainConfig(sde="vp")
    assert tr.TrainConfig(sde="vp", sde_kwargs={}).make_sde() == sde_lib.VPSDE()
    assert tr.TrainConfig(sde="constant", sde_kwargs={"g": 0.5, "std": None}).make_sde() == sde_lib.ConstantSDE(0.5, None)
    cfg = tr.TrainConfig(batch_size=np.int64(4), num_steps=np.int32(7), seed=np.uint8(3))
    assert type(cfg.batch_size) is int and type(cfg.num_steps) is int and type(cfg.seed) is int
    assert json.loads(json.dumps(cfg.to_dict()))["batch_size"] == 4


def test_config_round_trip_and_validation():
    cfg = tr.TrainConfig(model_overrides={"ch": 16, "ch_mult": [1, 2]}, sde_kwargs={"sigma": 2.0})
    assert tr.TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(tr.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    assert cfg.make_sde() == sde_lib.VESDE(2.0)
    with pytest.raises(ValueError, match="unknown keys"):
        tr.TrainConfig.from_dict({"lrr": 1.0})
    for bad, name in [({"budget_seconds": 0}, "budget_seconds"), ({"budget_seconds": -5.0}, "budget_seconds"),
                      ({"method": "vae"}, "method"), ({"batch_size": 0}, "batch_size"), ({"lr": float("nan")}, "lr"),
                      ({"ema_decay": 1.0}, "ema_decay"), ({"loss_reduction": "max"}, "loss_reduction"),
                      ({"time_jitter": 2.0}, "time_jitter"), ({"steps_per_call": -1}, "steps_per_call"),
                      ({"steps_per_call": 2.5}, "steps_per_call"), ({"unroll_steps": "yes"}, "unroll_steps")]:
        with pytest.raises(ValueError, match=name):
            tr.TrainConfig(**bad)


def test_bad_inputs_raise_before_training(tmp_path, images, trajectories):
    data = trajectories
    with pytest.raises(ValueError, match="batch_size"):
        tr.train(OURS.replace(batch_size=6), data, tmp_path / "a")  # 4 devices
    with pytest.raises(ValueError, match="target"):
        tr.train(OURS, data, tmp_path / "a", eval_fn=lambda f, s: {"ssim": 1.0}, target=0.0)
    with pytest.raises(ValueError, match="target"):
        tr.train(OURS, data, tmp_path / "a", eval_fn=lambda f, s: {"ssim": 1.0}, target=1.5)
    with pytest.raises(ValueError, match="budget_seconds"):
        tr.train(OURS.to_dict() | {"budget_seconds": 0.0}, data, tmp_path / "a")
    # images of the wrong size for the model
    with pytest.raises(ValueError, match="data"):
        tr.train(OURS.replace(model_overrides=dict(MODEL, image_size=32)), data, tmp_path / "a")
    with pytest.raises(ValueError, match="data"):
        x18 = np.zeros((1, 3, 3, 18, 18), np.float32)
        tr.train(OURS.replace(model_overrides=dict(MODEL, ch_mult=(1, 2, 2))),
                 tr.Trajectories(x18, [0.1, 0.5, 1.0]), tmp_path / "a")
    with pytest.raises(ValueError, match="data"):
        tr.train(DDPM, np.zeros((2, 3, 16, 12), np.float32), tmp_path / "a")
    with pytest.raises(ValueError, match="data.t"):
        tr.train(OURS, tr.Trajectories(data.x, data.t[:-1]), tmp_path / "a")
    with pytest.raises(ValueError, match="increasing"):
        tr.train(OURS, tr.Trajectories(data.x, data.t[::-1]), tmp_path / "a")
    bad = data.x.copy()
    bad[0, 1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tr.train(OURS, tr.Trajectories(bad, data.t), tmp_path / "a")
    with pytest.raises(TypeError, match="dtype"):
        tr.train(DDPM, (images * 255).astype(np.uint8), tmp_path / "a")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tr.train(DDPM, images * 2.0, tmp_path / "a")
    with pytest.raises(ValueError, match="sde"):
        tr.train(OURS, tr.Trajectories(data.x, data.t, {"name": "ve", "kwargs": {"sigma": 2.0}}), tmp_path / "a")
    assert not os.path.exists(tmp_path / "a" / "checkpoints")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours_run(tmp_path_factory, trajectories):
    """20 steps of OURS with a checkpoint every 10, evaluated every 10 steps."""
    wd = tmp_path_factory.mktemp("ours_run")
    evals = []

    def eval_fn(fn, step):
        x = jnp.asarray(trajectories.x[:, 2])
        s = fn(x, jnp.full((NUM_IMAGES,), 0.5), idx=jnp.arange(NUM_IMAGES))
        evals.append((step, s.shape, np.asarray(s)))
        return {"ssim": step / 100.0, "score_norm": float(jnp.linalg.norm(s))}

    res = tr.train(OURS.replace(num_steps=20, checkpoint_every=10, eval_every=10), trajectories, wd, eval_fn=eval_fn)
    return wd, res, evals


# ddpm is slow (9 s): its training runs in the denoise/budget smoke tests and its loss is
# checked against the closed form in test_ddpm.py
@pytest.mark.parametrize("method", ["ours", pytest.param("ddpm", marks=pytest.mark.slow)])
def test_training_lowers_the_loss(tmp_path, method, images, trajectories, ours_run):
    cfg = OURS if method == "ours" else DDPM
    data = _data(cfg, images, trajectories)
    arrays, info = tr.prepare_data(cfg, data)
    state0, model_def = tr.create_train_state(cfg, tuple(info["sample_shape"]), num_images=NUM_IMAGES)
    keys = [jax.random.PRNGKey(1000 + i) for i in range(4)]  # fixed evaluation batches

    def mean_loss(params):
        return float(np.mean([float(tr.eval_loss(cfg, model_def, params, arrays, k)) for k in keys]))

    before = mean_loss(state0.params)
    if method == "ours":
        wd, res = ours_run[0], ours_run[1]
    else:
        wd = tmp_path / "wd"
        res = tr.train(cfg.replace(num_steps=20), data, wd)
    after, after_ema = mean_loss(res.state.params), mean_loss(res.state.ema_params)
    # The last conv starts at zero, so the initial loss is the noise term alone:
    # ours: mean 1/(2 g^2) * |z|^2 ~ C H W / (2 g^2); DDPM: mean z^2 = 1.
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.7 * before, (before, after)
    assert after_ema < 0.85 * before, (before, after_ema)
    assert res.step == 20 and res.stop_reason == "num_steps"
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    for r in train_recs:
        assert {"loss", "images_per_s", "lr", "train_seconds"} <= set(r) and r["images_per_s"] > 0
        assert r["loss_steps"] == 5  # the updates the logged loss averages
    assert train_recs[-1]["lr"] == pytest.approx(cfg.lr)


def test_eval_callback_uses_ema_and_load_score_fn(ours_run, trajectories):
    wd, res, evals = ours_run
    assert [e[0] for e in evals] == [10, 20]
    assert all(e[1] == (NUM_IMAGES, 3, SIZE, SIZE) for e in evals)
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["ssim"] for r in recs if r["kind"] == "eval"] == [0.1, 0.2]
    assert res.last_eval["ssim"] == 0.2 and res.compile_seconds >= 0 and res.train_seconds > 0

    fn = tr.load_score_fn(wd)  # EMA weights restored from disk
    assert fn.step == 20 and fn.config == OURS.replace(num_steps=20, checkpoint_every=10, eval_every=10)
    x = jnp.asarray(trajectories.x[:, 2])
    t = jnp.full((NUM_IMAGES,), 0.5)
    idx = jnp.arange(NUM_IMAGES)
    got = np.asarray(fn(x, t, idx=idx))
    np.testing.assert_array_equal(got, evals[-1][2])  # what the callback saw at step 20
    raw = tr._eval_fn_for(res.model_def, res.state.params, OURS)(x, t, idx=idx)
    ema = tr._eval_fn_for(res.model_def, res.state.ema_params, OURS)(x, t, idx=idx)
    np.testing.assert_array_equal(got, np.asarray(ema))
    assert float(jnp.max(jnp.abs(raw - ema))) > 1e-4  # the EMA weights, not the raw ones
    assert float(jnp.max(jnp.abs(ema))) > 1e-3  # the model has moved away from its zero output
    with pytest.raises(ValueError, match="idx"):
        fn(x, t)
    with pytest.raises(FileNotFoundError):
        tr.load_score_fn(os.path.join(wd, "nowhere"))


def test_a_loaded_model_evaluates_in_another_compute_dtype(ours_run, trajectories):
    """``load_score_fn(compute_dtype=...)``: a model trained in one compute dtype evaluated in
    another (a bfloat16 TPU run sampled in float32, whose adaptive ODE then takes fewer steps;
    left open by the thirty-ninth session's walkthrough). The reference is a model built with
    that dtype from the run's config (create_train_state), given the run's EMA weights."""
    wd = ours_run[0]
    x = jnp.asarray(trajectories.x[:, 2])
    t = jnp.full((NUM_IMAGES,), 0.5)
    idx = jnp.arange(NUM_IMAGES)
    f32 = tr.load_score_fn(wd)
    bf16 = tr.load_score_fn(wd, compute_dtype="bfloat16")
    assert f32.model_def.unet.dtype == "float32" and bf16.model_def.unet.dtype == "bfloat16"
    assert bf16.config == f32.config and bf16.step == f32.step  # as trained
    assert bf16.trained_dtype == f32.trained_dtype == "float32"
    cfg = f32.config.replace(model_overrides={**dict(f32.config.model_overrides), "dtype": "bfloat16"})
    _, model_def = tr.create_train_state(cfg, x.shape[1:], num_images=NUM_IMAGES)
    want = tr._eval_fn_for(model_def, tr.load_checkpoint(wd).state.ema_params, cfg)(x, t, idx=idx)
    got = bf16(x, t, idx=idx)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref = np.asarray(f32(x, t, idx=idx))
    rel = float(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref))
    assert 1e-4 < rel < 5e-2  # bfloat16's 8 mantissa bits: different, but close
    same = tr.load_score_fn(wd, compute_dtype=jnp.float32)  # the training's own: the same function
    np.testing.assert_array_equal(np.asarray(same(x, t, idx=idx)), ref)
    assert same.model_def.unet.dtype == "float32"
    for bad in ("int8", "float8", 3):
        with pytest.raises(TypeError, match=r"^compute_dtype: expected one of \('float32', 'float64', 'bfloat16', "
                                            r"'float16'\), got"):
            tr.load_score_fn(wd, compute_dtype=bad)
    with pytest.raises(TypeError, match="^compute_dtype:"):  # checked before the checkpoint is looked for
        tr.load_score_fn(os.path.join(wd, "nowhere"), compute_dtype="int8")


def test_a_resume_past_num_steps_says_so(ours_run, trajectories, tmp_path, monkeypatch):
    """Resuming a 20-step run with num_steps=10 returned step 20 without a word (a walkthrough)."""
    import shutil

    wd = tmp_path / "copy"
    shutil.copytree(ours_run[0], wd)
    warned = []
    monkeypatch.setattr(tr.logging, "warning", lambda msg, *a: warned.append(msg % a))
    res = tr.train(OURS.replace(num_steps=10, checkpoint_every=10, eval_every=10), trajectories, wd)
    assert res.step == 20 and res.resumed_from == 20
    assert [w for w in warned if "past num_steps" in w] == [f"{wd}: its checkpoint is at step 20, past num_steps=10: nothing to train, and the result is "
                      "that step's (load_checkpoint(step=...) reads an earlier one)"]


def test_reading_a_checkpoint_logs_none_of_orbax_read_only_warnings(ours_run, caplog):
    """Every load_checkpoint printed three orbax warnings: "Given directory is read only",
    "read_only=True, setting save_interval_steps=0" and "... max_to_keep=None" (a walkthrough)."""
    import logging

    with caplog.at_level(logging.WARNING):
        tr.load_checkpoint(ours_run[0])
        tr.load_score_fn(ours_run[0])
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "read only" in m or "read_only=True" in m], said


def test_a_loaded_model_refuses_arguments_it_would_misread(ours_run, trajectories):
    """A walkthrough (2026-12-07): an int ``x`` gave an int (truncated, all zero) score; image
    indices outside [0, num_images), float indices and DDPM step indices outside [0, T) were
    taken; a ``t`` or ``idx`` of another length than 1 or B failed in a broadcast naming neither. Now each is
    refused naming the argument; inside a jitted sampler (traced values) only shapes and dtypes
    are checked, and a concrete ``idx`` closed over by a scan is still checked (no tracer error)."""
    wd = ours_run[0]
    fn = tr.load_score_fn(wd)
    x = jnp.asarray(trajectories.x[:, 2])
    t = jnp.full((NUM_IMAGES,), 0.5)
    idx = jnp.arange(NUM_IMAGES)
    for call, err, pattern in [
        (lambda: fn(x.astype(jnp.int32), t, idx), TypeError, r"^x: expected a floating-point array, got dtype int32"),
        (lambda: fn(x[0], t, idx), ValueError, r"^x: expected an image batch of shape \[B, C, H, W\]"),
        (lambda: fn(x, jnp.full((3,), 0.5), idx), ValueError,
         r"^t: expected a scalar or shape \[B\] = \(2,\) of times, got shape \(3,\)"),
        (lambda: fn(x, t, jnp.arange(3)), ValueError, r"^idx: expected a scalar or shape \[B\] = \(2,\)"),
        (lambda: fn(x, t, jnp.array([0, NUM_IMAGES])), ValueError,
         rf"^idx: expected image indices in \[0, num_images={NUM_IMAGES}\), got values in \[0, {NUM_IMAGES}\]"),
        (lambda: fn(x, t, jnp.array([-1, 0])), ValueError, r"got values in \[-1, 0\]"),
        (lambda: fn(x, t, jnp.array([0.0, 1.0])), TypeError, r"^idx: expected integer image indices, got dtype float"),
    ]:
        with pytest.raises(err, match=pattern):
            call()
    want = np.asarray(fn(x, t, idx))
    np.testing.assert_array_equal(np.asarray(fn(x, 0.5, idx)), want)  # a scalar time is every image's
    np.testing.assert_array_equal(np.asarray(fn(x, t[:1], idx)), want)  # so is one of shape [1]
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, i: fn(a, t, i))(x, idx)), want)
    scanned = jax.lax.scan(lambda c, _: (c, fn(x, t, idx)), 0, None, length=2)[1]  # idx concrete, in a trace
    np.testing.assert_array_equal(np.asarray(scanned[1]), want)

    # DDPM's eps_fn: integer step indices in [0, ddpm_num_steps)
    state, model_def = tr.create_train_state(DDPM, (3, SIZE, SIZE), num_images=NUM_IMAGES)
    eps = tr._eval_fn_for(model_def, state.params, DDPM)
    xd = 2 * x - 1
    kw = {"idx": idx} if model_def.unet.per_image_offset else {}
    assert eps(xd, jnp.array([0, DDPM.ddpm_num_steps - 1]), **kw).shape == x.shape
    with pytest.raises(ValueError, match=rf"^i: expected step indices in \[0, ddpm_num_steps={DDPM.ddpm_num_steps}\), "
                                         rf"got values in \[-5, {DDPM.ddpm_num_steps}\]"):
        eps(xd, jnp.array([DDPM.ddpm_num_steps, -5]), **kw)
    with pytest.raises(TypeError, match=r"^i: expected integer step indices, got dtype float"):
        eps(xd, jnp.array([1.0, 2.0]), **kw)


def test_ddpm_max_train_step_is_validated_and_reaches_the_loss(monkeypatch, images):
    with pytest.raises(ValueError, match="ddpm_max_train_step: only for method='ddpm'"):
        tr.TrainConfig(method="ours", ddpm_max_train_step=10)
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match=r"ddpm_max_train_step: expected None or an integer in \[1, ddpm_num_steps = 1000\]"):
            tr.TrainConfig(method="ddpm", ddpm_max_train_step=bad)
    with pytest.raises(ValueError, match="ddpm_num_steps = 50"):
        tr.TrainConfig(method="ddpm", ddpm_num_steps=50, ddpm_max_train_step=51)
    cfg = DDPM.replace(ddpm_max_train_step=300)
    assert tr.TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg._math_key() != DDPM._math_key()  # another loss: another compiled program
    seen = []
    orig = tr.ddpm_lib.epsilon_loss

    def spy(*a, **kw):
        seen.append(kw.get("max_step"))
        return orig(*a, **kw)

    monkeypatch.setattr(tr.ddpm_lib, "epsilon_loss", spy)
    arrays, info = tr.prepare_data(cfg, images)
    state, model_def = tr.create_train_state(cfg, tuple(info["sample_shape"]), num_images=NUM_IMAGES)
    tr.eval_loss(cfg, model_def, state.params, arrays, jax.random.PRNGKey(1))
    assert seen == [300]


def test_scale_by_sigma_divides_the_score_by_lambda(monkeypatch, ours_run, trajectories):
    with pytest.raises(ValueError, match="scale_by_sigma"):
        tr.TrainConfig(method="ddpm", scale_by_sigma=True)
    with pytest.raises(ValueError, match="scale_by_sigma"):
        tr.TrainConfig(scale_by_sigma=1)
    scaled = OURS.replace(scale_by_sigma=True)
    sde = OURS.make_sde()
    _, res, _ = ours_run
    x = jnp.asarray(trajectories.x[:, 2])
    t = jnp.array([0.3, 0.7])
    idx = jnp.arange(NUM_IMAGES)
    lam = np.asarray(sde.perturbation_std(t))[:, None, None, None]
    # The samplers' score: the network's output over lambda(t).
    plain = np.asarray(tr._eval_fn_for(res.model_def, res.state.ema_params, OURS)(x, t, idx=idx))
    got = np.asarray(tr._eval_fn_for(res.model_def, res.state.ema_params, scaled)(x, t, idx=idx))
    np.testing.assert_allclose(got, plain / lam, rtol=1e-5)
    assert np.max(np.abs(got - plain)) > 1e-3

    # The training loss: a network answering ones, scaled, is the same score as an unscaled one
    # answering 1 / lambda(t) (same batch from the same key), and not the same as unscaled ones.
    arrays, _ = tr.prepare_data(OURS, trajectories)
    key = jax.random.PRNGKey(7)

    def loss_with(cfg, net):
        monkeypatch.setattr(tr, "_EVAL_LOSS", {})  # trace afresh with this network
        monkeypatch.setattr(tr, "_apply", lambda md, p, xx, tt, i, **kw: net(xx, tt))
        return float(tr.eval_loss(cfg, res.model_def, res.state.params, arrays, key))

    ones = lambda xx, tt: jnp.ones_like(xx)  # noqa: E731
    inv_lam = lambda xx, tt: jnp.ones_like(xx) / sde.perturbation_std(tt).astype(xx.dtype)[:, None, None, None]  # noqa: E731
    l_scaled, l_inv, l_ones = loss_with(scaled, ones), loss_with(OURS, inv_lam), loss_with(OURS, ones)
    assert l_scaled == pytest.approx(l_inv, rel=1e-5)
    assert abs(l_scaled - l_ones) > 1e-2 * l_ones


def test_records_from_before_a_new_key_resume_as_its_default():
    given = {"train": OURS.to_dict(), "model": {"ch": 16}, "data": {"fingerprint": "f"}}
    old = {**given, "train": {k: v for k, v in given["train"].items() if k != "scale_by_sigma"}}
    tr._check_record("wd", old, given)  # the key did not exist: its default, the old behaviour
    changed = {**given, "train": OURS.replace(scale_by_sigma=True).to_dict()}
    with pytest.raises(ValueError, match="scale_by_sigma: stored false, given true"):
        tr._check_record("wd", old, changed)


def test_a_default_compute_dtype_given_or_not_is_the_same_run():
    """The shipped configs gained ``model_overrides.dtype = "float32"`` (so that
    ``--config.model_overrides.dtype=bfloat16`` exists): runs made without the key resume with
    them, and the other way round; another dtype is another run, refused naming the key."""
    given = {"train": OURS.replace(model_overrides={"ch": 16, "dtype": "float32"}).to_dict(),
             "model": {"ch": 16}, "data": {"fingerprint": "f"}}
    old = {**given, "train": OURS.replace(model_overrides={"ch": 16}).to_dict()}
    tr._check_record("wd", old, given)
    tr._check_record("wd", given, old)
    tr._check_record("wd", {**old, "train": OURS.replace(model_overrides={"ch": 16, "param_dtype": "float32"}).to_dict()}, old)
    bf16 = {**given, "train": OURS.replace(model_overrides={"ch": 16, "dtype": "bfloat16"}).to_dict()}
    for stored, new in ((old, bf16), (bf16, old), (bf16, given)):
        with pytest.raises(ValueError, match=r"model_overrides\.dtype"):
            tr._check_record("wd", stored, new)
    with pytest.raises(ValueError, match=r"model_overrides\.ch"):  # other keys are compared as before
        tr._check_record("wd", old, {**given, "train": OURS.replace(model_overrides={"ch": 8, "dtype": "float32"}).to_dict()})


def test_data_parallel_step_matches_single_device(images, trajectories):
    arrays, info = tr.prepare_data(OURS, trajectories)
    out = {}
    for nd in (1, 4):
        mesh = tr.make_mesh(jax.devices()[:nd])
        repl = NamedSharding(mesh, P())
        runs = []
        for _ in range(2 if nd == 1 else 1):  # same seed twice: bit-identical on CPU
            state, model_def = tr.create_train_state(OURS, tuple(info["sample_shape"]), num_images=NUM_IMAGES)
            s = jax.device_put(state, repl)
            data = jax.device_put({k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}, repl)
            step, _ = tr.compile_train_step(OURS, model_def, mesh, s, data)  # cached; donates s
            if nd == 4:  # the gradient really is reduced across the 4 shards of the batch
                assert "all-reduce" in step.as_text()
            ms = []
            for _ in range(2):
                s, m = step(s, data)
                ms.append(m)
            runs.append((jax.device_get(s), jax.device_get(ms)))
        if nd == 1:
            assert _leaves_equal(runs[0][0], runs[1][0])
        out[nd] = runs[0]
    (s1, m1), (s4, m4) = out[1], out[4]
    assert int(s1.step) == int(s4.step) == 2
    for a, b in zip(m1, m4):
        np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-5)
        np.testing.assert_allclose(float(a.grad_norm), float(b.grad_norm), rtol=1e-5)
    for a, b in zip(jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state)),
                    jax.tree.leaves((s4.params, s4.ema_params, s4.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # updates are ~1e-3


def test_budget_stop_then_resume_equals_uninterrupted(tmp_path, trajectories):
    full = tr.train(OURS.replace(num_steps=6), trajectories, tmp_path / "full")
    first = tr.train(OURS.replace(num_steps=6, budget_seconds=1e-9), trajectories, tmp_path / "cut")
    assert first.stop_reason == "budget" and first.step == 1  # the budget is checked before each step
    assert _complete_steps(tmp_path / "cut" / "checkpoints") == [1]
    second = tr.train(OURS.replace(num_steps=6), trajectories, tmp_path / "cut")
    assert second.resumed_from == 1 and second.step == 6 and second.stop_reason == "num_steps"
    assert second.train_seconds > first.train_seconds  # accumulated over both segments
    assert _leaves_equal(full.state, second.state)
    # the metrics file: one start record per segment, then the resumed segment's records
    recs = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [(r["step"], r["resumed_from"]) for r in recs if r["kind"] == "start"] == [(0, None), (1, 1)]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [5, 6]


def test_multi_step_calls_equal_single_steps_and_resume(tmp_path, trajectories, monkeypatch):
    """``steps_per_call``: the same updates as single steps to float32 rounding (each draws its
    batch from its own step number), unrolled (CPU's default) or as a loop; calls that never
    cross a log boundary, a budget checked between calls, and a resumed run bit for bit the
    uninterrupted one."""
    calls, programs = [], []
    compile_step = tr.compile_train_step

    def counting(*a, steps=1, **kw):
        programs.append(steps)
        fn, sec = compile_step(*a, steps=steps, **kw)

        def run(state, data):
            calls.append(steps)
            return fn(state, data)
        return run, sec

    monkeypatch.setattr(tr, "compile_train_step", counting)
    single = tr.train(OURS.replace(num_steps=12), trajectories, tmp_path / "single")
    assert calls == [1] * 12
    recs = lambda wd: [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / wd / "metrics.jsonl"))  # noqa: E731
                       if r["kind"] == "train"]
    runs = {}
    for unroll in (None, False):
        calls.clear()
        wd = f"multi_{unroll}"
        multi = tr.train(OURS.replace(num_steps=12, steps_per_call=3, unroll_steps=unroll), trajectories, tmp_path / wd)
        # log_every 5: a call of 3 from 0 and 5, single steps up to 5, 10 and 12
        assert calls == [3, 1, 1, 3, 1, 1, 1, 1] and multi.step == 12
        runs[unroll] = multi
        # XLA compiles the calls' updates apart from the single step's: float32 rounding (another
        # batch would move the parameters by ~lr = 2e-3; the largest difference here is 5e-7, in
        # Adam moments of gradients that are rounding noise, e.g. of biases ahead of a GroupNorm)
        for a, b in zip(jax.tree.leaves(jax.device_get(single.state)), jax.tree.leaves(jax.device_get(multi.state))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(recs(wd), recs("single"), rtol=1e-6)
        assert [s for s, _ in recs(wd)] == [5, 10, 12]
        assert multi.last_loss_step == 12 and multi.last_loss == pytest.approx(recs(wd)[-1][1])
    calls.clear()
    cut = tr.train(OURS.replace(num_steps=12, steps_per_call=3, budget_seconds=1e-9), trajectories, tmp_path / "cut")
    assert cut.stop_reason == "budget" and cut.step == 3 and calls == [3]  # the budget overshoots by a call
    # no log step reached (log_every 5): no last loss, and none claimed for step 3
    assert cut.last_loss is None and cut.last_loss_step is None
    rest = tr.train(OURS.replace(num_steps=12, steps_per_call=3), trajectories, tmp_path / "cut")
    assert rest.resumed_from == 3 and rest.step == 12 and calls == [3, 1, 1, 3, 1, 1, 1, 1]
    assert _leaves_equal(runs[None].state, rest.state)  # the same calls as the uninterrupted run
    calls.clear()  # a call of 6 never fits between log boundaries 5 apart: not even compiled
    programs.clear()
    tr.train(OURS.replace(num_steps=12, steps_per_call=6), trajectories, tmp_path / "wide")
    assert calls == [1] * 12 and programs == [1]
    calls.clear()  # every call fits (cadences multiples of 3): the single step is not compiled
    programs.clear()
    aligned = tr.train(OURS.replace(num_steps=12, steps_per_call=3, log_every=3, checkpoint_every=6), trajectories,
                       tmp_path / "aligned")
    assert calls == [3] * 4 and programs == [3] and aligned.steps_per_call == 3
    for a, b in zip(jax.tree.leaves(jax.device_get(single.state)), jax.tree.leaves(jax.device_get(aligned.state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
    starts = [r for r in map(json.loads, open(tmp_path / "aligned" / "metrics.jsonl")) if r["kind"] == "start"]
    assert [r["steps_per_call"] for r in starts] == [3]
    calls.clear()  # automatic (0) on CPU devices: one update per call
    auto = tr.train(OURS.replace(num_steps=4, steps_per_call=0), trajectories, tmp_path / "auto")
    assert calls == [1] * 4 and auto.steps_per_call == 1


def test_automatic_steps_per_call():
    """``steps_per_call = 0``: 1 on CPU devices; on an accelerator the largest divisor of the
    cadences (evaluation only when evaluating) up to AUTO_STEPS_PER_CALL; a set value is kept."""
    from types import SimpleNamespace

    def mesh_on(platform):
        return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)] * 2, dtype=object))

    gpu, cpu = mesh_on("gpu"), mesh_on("cpu")
    cfg = lambda **kw: OURS.replace(steps_per_call=0, **kw)  # noqa: E731
    assert tr.resolve_steps_per_call(cfg(log_every=25, checkpoint_every=100000, eval_every=25), cpu, evaluating=True) == 1
    assert tr.resolve_steps_per_call(cfg(log_every=25, checkpoint_every=100000, eval_every=25), gpu, evaluating=True) == 25
    assert tr.resolve_steps_per_call(cfg(log_every=100, checkpoint_every=1000, eval_every=500), gpu, evaluating=True) == 25
    assert tr.resolve_steps_per_call(cfg(log_every=60, checkpoint_every=120), gpu) == 20
    assert tr.resolve_steps_per_call(cfg(log_every=50, checkpoint_every=30), gpu) == 10
    assert tr.resolve_steps_per_call(cfg(log_every=7, checkpoint_every=14), gpu) == 7
    assert tr.resolve_steps_per_call(cfg(log_every=50, checkpoint_every=100, eval_every=3), gpu) == 25  # not evaluating
    assert tr.resolve_steps_per_call(cfg(log_every=50, checkpoint_every=100, eval_every=3), gpu, evaluating=True) == 1
    assert tr.resolve_steps_per_call(OURS.replace(steps_per_call=4), gpu) == 4
    assert tr.resolve_steps_per_call(OURS.replace(steps_per_call=4), cpu) == 4
    assert tr.AUTO_STEPS_PER_CALL == 25


def test_a_non_finite_loss_names_its_step(tmp_path, trajectories, monkeypatch):
    """A NaN loss (here made at the 6th update, the second of the third call of 2) stops the run
    with that update's number, before any checkpoint of the bad state."""
    step_fn = tr._step_fn

    def nan_at_6(*a, **kw):
        one = step_fn(*a, **kw)

        def step(state, data):
            new, m = one(state, data)
            return new, m._replace(loss=jnp.where(state.step == 5, jnp.nan, m.loss))
        return step

    monkeypatch.setattr(tr, "_step_fn", nan_at_6)
    cfg = OURS.replace(num_steps=8, log_every=100, seed=1000, steps_per_call=2)  # seed: a new compile
    with pytest.raises(tr.NonFiniteLossError, match="loss is nan at step 6 "):
        tr.train(cfg, trajectories, tmp_path / "nan")
    assert not os.path.isdir(tmp_path / "nan" / "checkpoints") or _complete_steps(tmp_path / "nan" / "checkpoints") == []


def test_stop_decisions_are_process_0s(tmp_path, trajectories, monkeypatch):
    """Budget and target stops go through the processes' agreement (process 0's decision): with
    process 0 saying "go on" (the stand-ins for ``broadcast_one_to_all`` and the all-gather of
    ``_agree`` return 0) a run whose own clock is over its budget and whose own metric is over its
    target trains to ``num_steps``; an interrupt of another process (the all-gather says one)
    stops this one after the same update, with a checkpoint."""
    asked, agreed = [], []

    def process_0_says(v):
        asked.append(int(v))
        return int(v) if len(asked) == 1 else 0  # the first question: the step to resume from

    def agree(budget_hit, interrupted):
        agreed.append((bool(budget_hit), bool(interrupted)))
        return False, False

    monkeypatch.setattr(tr, "_from_process_0", process_0_says)
    monkeypatch.setattr(tr, "_agree", agree)
    res = tr.train(OURS.replace(num_steps=3, eval_every=1, budget_seconds=1e-9), trajectories,
                   tmp_path / "p", eval_fn=lambda fn, step: {"ssim": 1.0}, target=0.5)
    assert res.stop_reason == "num_steps" and res.step == 3
    # no checkpoint to resume (-1), then the target check after each step, all "stop" on this
    # process's own values; the budget check before each step (0 s before the first: not over)
    # and once more after the loop, no interrupt here
    assert asked == [-1, 1, 1, 1]
    assert agreed == [(False, False), (True, False), (True, False), (False, False)]
    # another process interrupted before update 3: this one stops after update 2 and saves it
    checks = []

    def other_process_interrupted(budget_hit, interrupted):
        checks.append(interrupted)
        return False, len(checks) == 3  # the third check comes before update 3

    monkeypatch.setattr(tr, "_agree", other_process_interrupted)
    monkeypatch.setattr(tr, "_from_process_0", int)  # this process's own answers again
    with pytest.raises(KeyboardInterrupt) as err:
        tr.train(OURS.replace(num_steps=3), trajectories, tmp_path / "q")
    assert _complete_steps(tmp_path / "q" / "checkpoints") == [2]
    # the class itself: Python ends a script with the SIGINT status (130) for exactly that class, and a
    # subclass (the agreed stop's own) with status 1 (a walkthrough)
    assert type(err.value) is KeyboardInterrupt
    assert any(f.co_name == "_train" for f in traceback_frames(err.value.__traceback__))


def traceback_frames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def test_target_stops_training(tmp_path, trajectories):
    res = tr.train(OURS.replace(num_steps=50, eval_every=2), trajectories, tmp_path / "t",
                   eval_fn=lambda fn, step: {"ssim": 0.1 * step}, target=0.6)
    assert res.stop_reason == "target" and res.step == 6 and res.step_at_target == 6
    assert res.time_to_target == pytest.approx(res.train_seconds)
    assert tr.load_checkpoint(tmp_path / "t").meta["step"] == 6
    with pytest.raises(ValueError, match="target_metric"):
        tr.train(OURS.replace(num_steps=50, eval_every=2), trajectories, tmp_path / "t2",
                 eval_fn=lambda fn, step: {"psnr": 1.0}, target=0.6)


def _records(wd, kind):
    return [r["step"] for r in (json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl")))
            if r["kind"] == kind]


def test_killed_during_an_evaluation_resumes_with_it(tmp_path, trajectories):
    """A kill between a checkpoint and the evaluation of its step: the resumed run evaluates that
    step first (its record, and a target met there, are not lost), and a rerun of a finished run
    calls the evaluation again (its callers need the outputs) without a second record."""
    cfg = OURS.replace(num_steps=8, checkpoint_every=4, eval_every=4, log_every=4)

    def killed_at_4(fn, step):
        if step == 4:
            raise KeyboardInterrupt  # Ctrl-C or a kill during the evaluation
        return {"ssim": 0.1 * step}

    calls = []

    def ev(fn, step):
        calls.append(step)
        return {"ssim": 0.1 * step}

    for name, target, want in (("plain", None, (8, [4, 8], [4, 8])), ("target", 0.35, (4, [4], [4]))):
        wd = str(tmp_path / name)
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg, trajectories, wd, eval_fn=killed_at_4, target=target)
        assert _complete_steps(os.path.join(wd, "checkpoints")) == [4] and _records(wd, "eval") == []
        calls.clear()
        res = tr.train(cfg, trajectories, wd, eval_fn=ev, target=target)
        assert res.resumed_from == 4 and (res.step, calls, _records(wd, "eval")) == want
        ref = tr.train(cfg, trajectories, str(tmp_path / (name + "_ref")), eval_fn=ev, target=target)
        assert (res.stop_reason, res.step_at_target) == (ref.stop_reason, ref.step_at_target)
        calls.clear()
        again = tr.train(cfg, trajectories, wd, eval_fn=ev, target=target)  # a finished run, rerun
        assert again.step == res.step and again.stop_reason == res.stop_reason and calls == [res.step]
        assert again.last_eval == {"ssim": pytest.approx(0.1 * res.step)}
        assert _records(wd, "eval") == want[2]  # no second record of the same step


def test_ctrl_c_finishes_the_update_and_saves_it(tmp_path, trajectories):
    """SIGINT during training: the update in flight gets its records and a checkpoint, and the
    resumed run continues from it without a gap in the records."""
    wd = str(tmp_path / "c")
    # The budget only bounds a run whose interrupt is never acted on: it then fails, not hangs.
    cfg = OURS.replace(num_steps=100_000, log_every=1, budget_seconds=600)

    done = threading.Event()

    def interrupt_once_training():  # never after train() has returned or raised
        while not done.wait(0.1):
            if os.path.exists(os.path.join(wd, "metrics.jsonl")) and _records(wd, "train"):
                os.kill(os.getpid(), signal.SIGINT)
                return

    # `train` acts on Ctrl-C only over Python's default handler, as in an interactive process. A
    # test run started in the background by a non-interactive shell inherits SIGINT ignored
    # (POSIX), and Python keeps it so: this test then waited for an interrupt that never came.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_once_training, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg, trajectories, wd)
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)
    saved = _complete_steps(os.path.join(wd, "checkpoints"))
    trained = _records(wd, "train")
    assert len(saved) == 1 and saved[0] == trained[-1] == len(trained)  # every step recorded, the last saved
    res = tr.train(cfg.replace(num_steps=saved[0] + 2), trajectories, wd)
    assert res.resumed_from == saved[0] and _records(wd, "train") == list(range(1, saved[0] + 3))


def test_an_interrupt_swallowed_in_the_final_evaluation_still_stops_the_run(tmp_path, trajectories):
    """Ctrl-C during the final evaluation (where train lets it interrupt at once) whose handler
    ran inside a gc callback: Python printed the KeyboardInterrupt and ran on, and train returned
    as if finished (a review, 2026-12-07). It is marked pending and acted on after the evaluation:
    the checkpoint of the last step is saved and the interrupt raised."""
    import gc

    calls = []

    def in_gc(phase, info):  # the handler runs between these bytecodes, inside the callback
        if phase == "start" and len(calls) == 1:
            calls.append("signalled")
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):
                pass

    def eval_fn(fn, step):
        calls.append(step)
        gc.callbacks.append(in_gc)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(in_gc)
        return {"ssim": 0.5}

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    swallowed = []
    hook, sys.unraisablehook = sys.unraisablehook, swallowed.append
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train(OURS.replace(num_steps=3, eval_every=100, checkpoint_every=100), trajectories, tmp_path / "r",
                     eval_fn=eval_fn)
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGINT, previous)
    assert calls == [3, "signalled"] and [u.exc_type for u in swallowed] == [KeyboardInterrupt]
    assert _complete_steps(os.path.join(tmp_path, "r", "checkpoints")) == [3]


def test_the_data_sde_is_compared_by_value(trajectories):
    x, t = trajectories.x, trajectories.t
    for kwargs in ({"sigma": 5.0}, {"sigma": 5}, {"sigma": np.float32(5.0)}):  # the same SDE
        assert tr._source(OURS, tr.Trajectories(x, t, sde={"name": "ve", "kwargs": kwargs})).shape == x.shape
    for name, kwargs in (("ve", {"sigma": 4}), ("vp", {"sigma": 5.0}), ("ve", {})):
        with pytest.raises(ValueError, match="sde: the config's SDE .* differs from the SDE of the embedded data"):
            tr._source(OURS, tr.Trajectories(x, t, sde={"name": name, "kwargs": kwargs}))


def test_mismatched_config_and_data_are_refused(ours_run, trajectories):
    wd = ours_run[0]
    with pytest.raises(ValueError, match=r"lr: stored 0\.002, given 0\.001"):
        tr.train(OURS.replace(num_steps=30, lr=1e-3, checkpoint_every=10, eval_every=10), trajectories, wd)
    with pytest.raises(ValueError, match="ch"):
        tr.train(OURS.replace(model_overrides=dict(MODEL, ch=8)), trajectories, wd)
    other = tr.Trajectories(trajectories.x * 0.5, trajectories.t)
    with pytest.raises(ValueError, match="fingerprint"):
        tr.train(OURS.replace(num_steps=30), other, wd)
    assert tr.load_checkpoint(wd).meta["step"] == 20  # nothing was written
    # the same refusal before any data are prepared (the train keys alone; run-control keys may change)
    with pytest.raises(ValueError, match=r"lr: stored 0\.002, given 0\.001"):
        tr.check_workdir(wd, OURS.replace(lr=1e-3))
    assert tr.check_workdir(wd, OURS.replace(num_steps=30, checkpoint_every=10, eval_every=10)) is None
    assert tr.check_workdir(str(wd) + "_new", OURS.replace(lr=1e-3)) is None  # no run there yet


def test_corrupt_checkpoint_gives_clear_error_and_touches_nothing(tmp_path, ours_run, trajectories):
    import shutil

    wd = tmp_path / "copy"
    shutil.copytree(ours_run[0], wd)
    state_dir = wd / "checkpoints" / "20" / "state"
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs
                  if os.path.basename(d) == "d"]
    biggest = max(data_files, key=os.path.getsize)
    raw = bytearray(open(biggest, "rb").read())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    open(biggest, "wb").write(bytes(raw))
    before = _snapshot(str(wd))
    with pytest.raises(tr.CheckpointError, match="20"):
        tr.train(OURS.replace(num_steps=30, checkpoint_every=10, eval_every=10), trajectories, wd)
    with pytest.raises(tr.CheckpointError) as err:
        tr.load_score_fn(wd)
    # one line, naming the earlier checkpoints a reader can take (generate/restore --step) instead of
    # only "move this step directory away" (a walkthrough, 2026-12-07)
    assert "\n" not in str(err.value)
    assert str(err.value).endswith("Or read an earlier checkpoint: give its step (generate's and restore's "
                                   "--step), one of [10].")
    assert _snapshot(str(wd)) == before  # nothing overwritten, deleted or added

    # a missing state item (e.g. deleted by hand) is refused the same way
    shutil.rmtree(state_dir)
    with pytest.raises(tr.CheckpointError, match="20"):
        tr.load_checkpoint(wd)
    # an earlier intact checkpoint is still readable explicitly
    assert tr.load_checkpoint(wd, step=10).meta["step"] == 10


def test_a_checkpoint_deleted_while_it_is_read_is_replaced_by_the_latest(tmp_path, ours_run, monkeypatch):
    """(A walkthrough.) Sampling from a run in progress: the training run deleted the checkpoint
    that load_checkpoint had chosen (max_to_keep) before it was read, and the error said to move
    the step directory away. The latest is now listed again; an explicit step says what happened."""
    import shutil

    wd = tmp_path / "copy"
    shutil.copytree(ours_run[0], wd)
    steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert len(steps) >= 2
    real = tr._load_step
    calls = []

    def rotating(reader, ckpt_dir, step):
        calls.append(step)
        if len(calls) == 1:  # the "training run" deletes the chosen step and writes none newer
            shutil.rmtree(os.path.join(ckpt_dir, str(step)))
            raise FileNotFoundError(f"Checkpoint at {ckpt_dir}/{step} not found.")
        return real(reader, ckpt_dir, step)

    monkeypatch.setattr(tr, "_load_step", rotating)
    ck = tr.load_checkpoint(wd)
    assert calls == [steps[-1], steps[-2]] and ck.meta["step"] == steps[-2]
    # a checkpoint still there that fails is an error as before (not retried)
    with monkeypatch.context() as m:
        m.setattr(tr, "_load_step", lambda *a: (_ for _ in ()).throw(tr.CheckpointError("bad")))
        with pytest.raises(tr.CheckpointError, match="^bad$"):
            tr.load_checkpoint(wd)
    calls.clear()
    with pytest.raises(FileNotFoundError, match=rf"^step: checkpoint {steps[-2]} of .* was deleted while it was read "
                                                rf"\(a training run writing there keeps its last max_to_keep "
                                                rf"checkpoints\); have \[{', '.join(map(str, steps[:-2]))}\]$"):
        tr.load_checkpoint(wd, step=steps[-2])


@pytest.mark.parametrize("failure", ["full_disk", "other"])
def test_checkpoint_that_cannot_be_written_says_so_and_resumes(tmp_path, trajectories, monkeypatch, failure):
    """A full disk used to end in orbax's ValueError among a hundred lines of its threads'
    tracebacks; now a CheckpointError names the step, the cause and the last complete checkpoint,
    and the same call again resumes from that checkpoint as if nothing had happened."""
    cfg = OURS.replace(num_steps=4, checkpoint_every=2)
    full = tr.train(cfg, trajectories, tmp_path / "full")
    real_save, calls = tr._save, []

    def save(mngr, state, record, meta):
        calls.append(int(jax.device_get(state.step)))
        if len(calls) == 1:
            return real_save(mngr, state, record, meta)
        tmp = tmp_path / "cut" / "checkpoints" / f"{calls[-1]}.orbax-checkpoint-tmp"
        tmp.mkdir()  # what orbax leaves of a failed write
        if failure == "full_disk":  # orbax's message on a full tmpfs (2026-12-06)
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file '
                             f'"{tmp}/state/": Failed to write 3334132 bytes to file 15: No space left on '
                             "device [os_error_code='28']")
        raise PermissionError(13, "Permission denied", str(tmp))

    monkeypatch.setattr(tr, "_save", save)
    with pytest.raises(tr.CheckpointError) as err:
        tr.train(cfg, trajectories, tmp_path / "cut")
    msg = str(err.value)
    assert f"checkpoint of step 4 could not be written to '{tmp_path / 'cut' / 'checkpoints'}'" in msg
    assert "the last complete checkpoint is step 2, and the same call again resumes from it" in msg
    if failure == "full_disk":
        assert "the disk is full (No space left on device)" in msg and "once space is freed" in msg
    else:
        assert "PermissionError: [Errno 13] Permission denied" in msg and "space" not in msg
    monkeypatch.undo()
    again = tr.train(cfg, trajectories, tmp_path / "cut")
    assert again.resumed_from == 2 and again.step == 4
    assert _leaves_equal(full.state, again.state)
    assert _complete_steps(tmp_path / "cut" / "checkpoints") == [2, 4]
    assert not (tmp_path / "cut" / "checkpoints" / "4.orbax-checkpoint-tmp").exists()


def test_run_errors_end_a_binary_with_their_message():
    from krylovjax import experiment_utils as eu
    from krylovjax.store import StoreWriteError
    from krylovjax.workdir_lock import WorkdirBusyError

    for err in (tr.CheckpointError("checkpoint of step 4 could not be written"), WorkdirBusyError("held"),
                StoreWriteError("chunk 1 could not be written"),
                tr.NonFiniteLossError("loss is nan at step 6 (not checkpointed); lower lr or check the data")):
        with pytest.raises(SystemExit) as ex:
            with eu.exit_on_run_errors():
                raise err
        assert ex.value.code == f"error: {err}" and ex.value.__cause__ is None
    with pytest.raises(ValueError, match="other"):  # anything else keeps its traceback
        with eu.exit_on_run_errors():
            raise ValueError("other")


# ----------------------------------------------------------------------------------------------
# The binary (subprocesses)
# ----------------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["JAX_ENABLE_X64"] = "1"  # the same numerics as this process (conftest turns x64 on)
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    return env


_BINARY = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/train_tiny.py",
           "--data=builtin", f"--config.data.image_size={SIZE}", f"--config.data.num_images={NUM_IMAGES}",
           "--config.model_overrides.ch=16", "--config.model_overrides.ch_mult=(1,)",
           "--config.model_overrides.attn_resolutions=()", "--config.lr=0.002", "--config.warmup_steps=5",
           "--config.batch_size=8", "--config.progress=False", "--config.log_every=5"]


def _complete_steps(ckpt_dir) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.exists(os.path.join(ckpt_dir, n, "meta")))


def test_binary_killed_with_sigkill_resumes_identically(tmp_path, images):
    """SIGKILL at an arbitrary moment after the step-4 checkpoint, resume, compare bit for bit.

    The binary spends most of its time writing checkpoints (every 2 steps of ~30 ms each, ~250 ms
    per save), so the kill nearly always lands inside a save: a ``<step>.orbax-checkpoint-tmp``
    directory is left behind (or an old step half-deleted by orbax's garbage collection). Both
    are harmless: resuming reads the last complete step and the writer removes the leftovers.
    The only wall-clock assumption is the ceiling on the binary's start-up (JAX import and
    compilation, seconds when idle, minutes on a starved CPU), deliberately generous.
    """
    wd = tmp_path / "killed"
    cmd = _BINARY + [f"--workdir={wd}", "--config.method=ddpm", "--config.num_steps=100000",
                     "--config.checkpoint_every=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 900  # a ceiling for a starved machine, not an expected time
        while not [s for s in _complete_steps(wd / "checkpoints") if s >= 4]:
            if proc.poll() is not None:
                raise AssertionError(f"binary exited early ({proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 900 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = tr.load_checkpoint(wd).meta["step"]  # the last complete checkpoint (>= 4)
    assert latest >= 4 and latest % 2 == 0
    final = latest + 3
    resumed = tr.train(DDPM.replace(num_steps=final), images, wd)
    assert resumed.resumed_from == latest and resumed.step == final
    reference = tr.train(DDPM.replace(num_steps=final), images, tmp_path / "reference")
    assert reference.resumed_from is None
    # identical params, EMA params, optimiser state, step and RNG key, bit for bit
    assert _leaves_equal(resumed.state, reference.state)
    assert int(resumed.state.step) == final
    leftovers = [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]
    assert not leftovers, leftovers  # a killed save's temporary directory was removed on resume
    assert final in _complete_steps(wd / "checkpoints")


def test_binary_checkpoint_that_cannot_be_written_is_one_message(tmp_path):
    """The train binary on a checkpoint write that fails in orbax's threads (a file-size limit
    here, RLIMIT_FSIZE: the same failure as a full disk without mounting one). Until the
    twenty-ninth session the message came below 400-odd lines of orbax's logged thread tracebacks
    and of tensorstore's "Event loop is closed" callbacks; now below one line per orbax thread."""
    wd = tmp_path / "run"
    # the limit set by a shell (no preexec_fn: Python code between fork and exec can deadlock in a
    # process with JAX's threads); an ignored SIGXFSZ stays ignored across exec, so writes past
    # the limit fail with EFBIG instead of killing the binary
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 16; exec \"$@\"", "bash"]
    # Without the shared persistent compilation cache: the limit would truncate the entries this
    # process writes there, and the other tests would read them (on a cold cache in CI, a
    # 'jit_step' entry was cut short and then failed to decompress in another test).
    env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    proc = subprocess.run(limited + _BINARY + [f"--workdir={wd}", "--config.method=ddpm", "--config.num_steps=2",
                                               "--config.checkpoint_every=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: checkpoint of step 1 could not be written to '{wd / 'checkpoints'}': ValueError: " in proc.stderr, \
        proc.stderr[-3000:]
    assert "there is no complete checkpoint yet; the same call again starts afresh." in proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    others = [line for line in proc.stderr.splitlines() if not line.startswith(("I", "W")) and line.strip()]
    # orbax's error, once for its threads that failed alike (at most _QuietOrbax.SHOWN, then a line
    # saying the rest are not shown) and the message; all of them printed where it fails
    assert len(others) <= 4, "\n".join(others)
    assert _complete_steps(wd / "checkpoints") == []


def test_binary_ours_with_builtin_precompute(tmp_path):
    wd = tmp_path / "ours_bin"
    cmd = _BINARY + [f"--workdir={wd}", "--config.method=ours", "--config.num_steps=4",
                     "--config.precompute.num_steps=4", "--config.checkpoint_every=2"]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.load(open(wd / "result.json"))
    assert result["step"] == 4 and result["stop_reason"] == "num_steps" and math.isfinite(result["last_loss"])
    assert _complete_steps(wd / "checkpoints") == [2, 4]
    record = json.load(open(wd / "config.json"))
    assert record["data"]["sample_shape"] == [3, SIZE, SIZE] and record["data"]["num_times"] == 4
    assert record["train"]["method"] == "ours" and record["model"]["per_image_offset"] is True
    # the log says what the rows are and their size (the size was said nowhere)
    assert f"(embedded trajectories, each 4 x 3 x {SIZE} x {SIZE})" in out.stderr, \
        out.stderr[-3000:]
    # the pre-computed trajectories are kept: a resume reads them instead of pre-computing again
    # (the same data: train's fingerprint check passes), and a damaged file is computed again
    kept = wd / "builtin_trajectories.npz"
    from krylovjax._io_errors import plain_file_mode

    assert os.stat(kept).st_mode & 0o777 == plain_file_mode()  # written atomically, with open()'s mode
    assert [n for n in os.listdir(wd) if n.endswith(".tmp")] == []
    with np.load(kept) as z:
        assert z["x"].shape == (NUM_IMAGES, 4, 3, SIZE, SIZE) and z["t"].shape == (4,)
    more = subprocess.run([c.replace("--config.num_steps=4", "--config.num_steps=6") for c in cmd], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"read the pre-computed trajectories of {NUM_IMAGES} images from {kept}" in more.stderr
    assert "pre-computed scores of" not in more.stderr
    assert json.load(open(wd / "result.json"))["step"] == 6
    kept.write_bytes(kept.read_bytes()[:100])  # damaged on disk (its write is atomic: a kill leaves none)
    again = subprocess.run([c.replace("--config.num_steps=4", "--config.num_steps=6") for c in cmd], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cannot be read" in again.stderr and "pre-computed scores of" in again.stderr, again.stderr[-3000:]
    assert "nothing was trained" in again.stderr  # it stood at step 6 already
    with np.load(kept) as z:
        assert z["x"].shape == (NUM_IMAGES, 4, 3, SIZE, SIZE)
    # bad flags are refused with a usage error naming the problem
    bad = subprocess.run(_BINARY + [f"--workdir={tmp_path / 'x'}", "--data=store"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--store" in bad.stderr


def test_trajectories_from_store(tmp_path, trajectories):
    from krylovjax.store import ScoreStore, hash_inputs

    x = trajectories.x
    B, N = x.shape[:2]
    cfg = {"sde": "ve", "sde_kwargs": {"sigma": 5.0}, "num_steps": N, "eps": 1e-3}
    store = ScoreStore.create_or_open(tmp_path / "s", config=cfg, inputs_hash=hash_inputs(x[:, 0], cfg),
                                      num_images=B, chunk_size=1,
                                      fields={"embedded": (x.shape[1:], np.float32, 0)})
    for i in range(B):
        store.write_chunk(i, {"embedded": x[i:i + 1]})
    got = tr.trajectories_from_store(str(tmp_path / "s"))
    np.testing.assert_array_equal(got.x, x)
    np.testing.assert_allclose(got.t, np.linspace(1e-3, 1.0, N), rtol=1e-15)
    assert got.sde == {"name": "ve", "kwargs": {"sigma": 5.0}}
    arrays, info = tr.prepare_data(OURS, str(tmp_path / "s"))
    assert info["num_times"] == N and info["sample_shape"] == [3, SIZE, SIZE]
    with pytest.raises(ValueError, match="sde"):
        tr.prepare_data(OURS.replace(sde_kwargs={"sigma": 2.0}), got)
    with pytest.raises(FileNotFoundError):
        tr.trajectories_from_store(str(tmp_path / "missing"))


def test_train_logs_the_models_attention_note(tmp_path, trajectories, monkeypatch):
    from krylovjax.models import UNetConfig

    said = []
    monkeypatch.setattr(tr.logging, "warning", lambda msg, *a: said.append(msg % a))
    monkeypatch.setattr(UNetConfig, "attention_note", lambda self: f"attention of a {self.image_size}x{self.image_size} model")
    tr.train(OURS.replace(num_steps=1), trajectories, tmp_path / "run")
    size = trajectories.x.shape[-1]
    assert f"model: attention of a {size}x{size} model" in said, said
