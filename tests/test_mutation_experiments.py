"""Tests found by hand-made mutation testing of the code that turns training runs into the
experiments' reported figures (time to a target SSIM, speed-ups, SSIM under a fixed budget).

Each test checks against an independent reference: scikit-image's SSIM / PSNR, a numpy global
SSIM, or times and steps worked out by hand from a scripted run. The binaries' ``run``
functions are driven in-process with the expensive parts replaced by scripted stand-ins (the
pre-computation, the denoisers, :func:`krylovjax.training.train`, which here follows its
documented contract: an "eval" record per evaluation with the training time so far, a stop at
the first evaluation whose ``target_metric`` reaches the target or when the training time
reaches the budget), so the bookkeeping between the training records and ``results.json`` /
``results.md`` is checked exactly, in seconds. :func:`krylovjax.training.train` itself is run
for real on a tiny U-Net with a fake clock whose evaluations take 1000 s, to check that the
evaluation time stays out of the reported training time, the time to target and the budget.
"""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest
import skimage.metrics as skm

# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------


def _sk_ssim(a, b) -> np.ndarray:
    """Per-image windowed SSIM by scikit-image (the settings tests/test_metrics.py checks
    krylovjax.metrics.ssim against)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array([skm.structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, channel_axis=0)
                     for i in range(a.shape[0])])


def _sk_psnr(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array([skm.peak_signal_noise_ratio(b[i], a[i], data_range=1.0) for i in range(a.shape[0])])


def _np_global_ssim(a, b) -> np.ndarray:
    """Global SSIM of each image pair from its whole-image statistics (numpy)."""
    out = []
    for x, y in zip(np.asarray(a, np.float64), np.asarray(b, np.float64)):
        x, y = x.ravel(), y.ravel()
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        mx, my = x.mean(), y.mean()
        cxy = np.mean((x - mx) * (y - my))
        out.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (x.var() + y.var() + c2)))
    return np.array(out)


def _hand_se(values) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) over sqrt(n), by hand."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    return math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) / math.sqrt(n)


def _tiny_model(cfg) -> None:
    cfg.data.size = 16
    cfg.common.model_overrides.update(ch=8, ch_mult=(1,), attn_resolutions=())


def _scripted_train(calls: list, seconds_per_step: dict):
    """A stand-in for :func:`krylovjax.training.train` that follows its contract without a
    network: ``seconds_per_step[method]`` of training time per update, ``eval_fn(step, step)``
    (the "model" handed to the denoisers is the step) every ``eval_every`` updates and at the
    end, one "eval" record each with the training time so far, a stop at the first evaluation
    whose ``target_metric`` reaches ``target``, and a budget checked before every update."""

    def train(tc, data, workdir, *, eval_fn=None, target=None, mesh=None):
        calls.append({"method": tc.method, "target": target, "budget_seconds": tc.budget_seconds, "data": data})
        os.makedirs(workdir, exist_ok=True)
        step, secs, stop, last = 0, 0.0, "num_steps", None
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            def evaluate():
                out = eval_fn(step, step)
                f.write(json.dumps({"step": step, "kind": "eval", **out, "train_seconds": secs}) + "\n")
                return out

            while step < tc.num_steps:
                if tc.budget_seconds is not None and secs >= tc.budget_seconds:
                    stop = "budget"
                    break
                step += 1
                secs += seconds_per_step[tc.method]
                if tc.eval_every and step % tc.eval_every == 0:
                    out, last = evaluate(), step
                    if target is not None and out[tc.target_metric] >= target:
                        stop = "target"
                        break
            if last != step:
                evaluate()
        return types.SimpleNamespace(step=step, stop_reason=stop, train_seconds=secs, compile_seconds=0.25,
                                     eval_seconds=0.5, checkpoint_seconds=0.0, wall_seconds=secs + 1.0,
                                     steps_per_call=1, resumed_from=None)

    return train


def _patch_scripted(monkeypatch, ours_denoiser, ddpm_denoiser, seconds_per_step: dict) -> list:
    """Stand-ins for the pre-computation (7 s + 3 s of embedding), both denoisers and
    ``training.train``; returns the list the scripted ``train`` appends its calls to."""
    from experiments import denoise
    from krylovjax import training

    calls: list = []
    monkeypatch.setattr(denoise, "prepare_ours", _prep(7.0, 3.0))
    monkeypatch.setattr(denoise, "ours_denoiser", ours_denoiser)
    monkeypatch.setattr(denoise, "ddpm_denoiser", ddpm_denoiser)
    monkeypatch.setattr(training, "train", _scripted_train(calls, seconds_per_step))
    return calls


def _prep(pre: float, emb: float):
    def prepare_ours(cfg, tc, images):
        return "ours-trajectories", {"precompute_seconds": pre, "embed_seconds": emb, "compile_seconds": 0.5,
                                     "solver_stats": {}, "precompute_config": None, "num_levels": 3}

    return prepare_ours


# ----------------------------------------------------------------------------------------------
# experiments.denoise
# ----------------------------------------------------------------------------------------------


def test_image_metrics_are_means_of_independent_per_image_metrics():
    """The reported SSIM, global SSIM and PSNR are means over the images (not medians or a best
    image): images of very different quality, checked against scikit-image and numpy."""
    from experiments import denoise

    rng = np.random.default_rng(11)
    clean = rng.uniform(0.1, 0.9, (4, 3, 16, 16))
    amps = np.array([0.01, 0.05, 0.2, 0.6])[:, None, None, None]
    out = np.clip(clean + amps * rng.standard_normal(clean.shape), 0.0, 1.0)
    m = denoise.image_metrics(out, clean)
    s, p, g = _sk_ssim(out, clean), _sk_psnr(out, clean), _np_global_ssim(out, clean)
    np.testing.assert_allclose(m["ssim_per_image"], s, rtol=0, atol=1e-9)
    assert m["ssim"] == pytest.approx(s.mean(), abs=1e-9)
    assert m["psnr"] == pytest.approx(p.mean(), rel=1e-9)
    assert m["global_ssim"] == pytest.approx(g.mean(), rel=1e-9)
    assert m["mse"] == pytest.approx(np.mean((out - clean) ** 2), rel=1e-12)
    # the data discriminate: mean, median and best differ
    for v in (s, p, g):
        assert abs(v.mean() - np.median(v)) > 1e-3 and abs(v.mean() - v.max()) > 1e-3


def test_denoise_time_to_target_table_from_scripted_runs(tmp_path, monkeypatch):
    """denoise.run end to end with a scripted training run: each row's time to target is the
    training time at the first evaluation whose SSIM reaches the target (ours plus its 7 s of
    pre-computation and 3 s of embedding), the step is that evaluation's, the caps are the
    final training times (plus ours' offset), both methods train to the largest target however
    the targets are ordered, and the comparison is the baseline's time over ours' with the
    bounds of censored rows. Expected values worked out by hand below."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    _tiny_model(cfg)
    cfg.ddpm.train.ddpm_num_steps = 100
    cfg.common.eval_every = 5
    cfg.ours.train.num_steps = cfg.ddpm.train.num_steps = 20
    cfg.ours.train.budget_seconds = cfg.ddpm.train.budget_seconds = None
    assert denoise.ddpm_rows(cfg) == {"ddpm": "ancestral", "ddim": "ddim"}
    clean = denoise.load_clean(cfg.data)
    assert clean.shape == (1, 3, 16, 16) and clean.dtype == np.float32

    # Output quality levels 0..3 (noise amplitude 0.5, 0.25, 0.1, 0) and targets between them.
    pattern = np.random.default_rng(21).standard_normal(clean.shape)
    outputs = [np.clip(clean + a * pattern, 0, 1).astype(np.float32) for a in (0.5, 0.25, 0.1, 0.0)]
    lvl = np.array([_sk_ssim(o, clean)[0] for o in outputs])
    t1, t2, t3 = (round((lvl[i] + lvl[i + 1]) / 2, 3) for i in range(3))
    assert lvl[0] < t1 < lvl[1] < t2 < lvl[2] < t3 < lvl[3]
    cfg.targets = (t2, t3, t1)  # not in order: the largest is the stop target all the same
    # the level of each row's output at the evaluations of steps 5, 10, 15, 20
    levels = {"ours": [1, 2, 2, 2], "ddpm": [0, 1, 3, 3], "ddim": [1, 1, 1, 1]}
    given = {}

    def denoiser(row):
        def den(fn, return_trajectory=False):
            out = outputs[levels[row][fn // 5 - 1]]
            return out, np.stack([given[row], out]), 3
        return den

    def ours_denoiser(cfg_, tc, noisy, *, idx=None):
        given["ours"] = noisy
        return denoiser("ours")

    def ddpm_denoiser(cfg_, tc, noisy, method=None):
        row = {"ancestral": "ddpm", "ddim": "ddim"}[method]
        given[row] = noisy
        return denoiser(row)

    calls = _patch_scripted(monkeypatch, ours_denoiser, ddpm_denoiser, {"ours": 0.5, "ddpm": 2.0})
    wd = str(tmp_path / "d")
    out = denoise.run(cfg, wd)

    # Paper A's input clamp(x + 0.506 z, 0, 1) with the configured seed, for both methods
    want_noisy = np.clip(clean.astype(np.float64) + 0.506 * np.random.default_rng(0).standard_normal(clean.shape),
                         0, 1).astype(np.float32)
    for row in ("ours", "ddpm", "ddim"):
        np.testing.assert_array_equal(given[row], want_noisy)
    assert out["noisy"]["ssim"] == pytest.approx(_sk_ssim(want_noisy, clean)[0], abs=1e-5)
    assert [(c["method"], c["target"]) for c in calls] == [("ours", t3), ("ddpm", t3)]
    assert calls[0]["data"] == "ours-trajectories"
    np.testing.assert_array_equal(calls[1]["data"], clean)
    assert out["targets"] == [t1, t2, t3]

    # ours: 0.5 s per step, + 10 s; DDPM: 2 s per step. Neither training run stops early (ours
    # never reaches t3, DDIM never t2), so both caps are the 20-step run.
    want = {"ours": [(5, 2.5, 12.5), (10, 5.0, 15.0), None],
            "ddpm": [(10, 20.0, 20.0), (15, 30.0, 30.0), (15, 30.0, 30.0)],
            "ddim": [(5, 10.0, 10.0), None, None]}
    caps = {"ours": 20.0, "ddpm": 40.0, "ddim": 40.0}
    for m, rows in want.items():
        r = out["methods"][m]
        assert r["steps"] == 20 and r["stop_reason"] == "num_steps"
        assert r["train_seconds"] == {"ours": 10.0, "ddpm": 40.0, "ddim": 40.0}[m]
        for i, w in enumerate(rows):
            row = r["targets"][i]
            assert row["target"] == [t1, t2, t3][i]
            assert row["reached"] is (w is not None), (m, i)
            if w is None:
                assert row["step"] is None and row["seconds"] is None and row["train_seconds"] is None
            else:
                assert (row["step"], row["train_seconds"], row["seconds"]) == pytest.approx(w), (m, i)
            assert (row["cap_seconds"], row["cap_step"]) == (pytest.approx(caps[m]), 20), (m, i)
        # each row's evaluations are its own sampler's SSIMs (scikit-image)
        assert [e["step"] for e in r["evals"]] == [5, 10, 15, 20]
        np.testing.assert_allclose([e["ssim"] for e in r["evals"]], lvl[levels[m]], rtol=0, atol=1e-5)
        assert r["final"]["step"] == 20 and r["final"]["ssim"] == pytest.approx(lvl[levels[m][-1]], abs=1e-5)
    assert out["methods"]["ours"]["precompute_seconds"] == 7.0 and out["methods"]["ours"]["embed_seconds"] == 3.0
    assert out["methods"]["ddpm"]["precompute_seconds"] == 0.0

    cmp = out["comparison"]
    assert [c["target"] for c in cmp] == [t1, t2, t3]
    assert cmp[0] == {"target": t1, "ours_seconds": 12.5, "ddpm_seconds": 20.0, "speedup": pytest.approx(1.6),
                      "note": "", "ddim_seconds": 10.0, "ddim_speedup": pytest.approx(0.8), "ddim_note": ""}
    assert cmp[1] == {"target": t2, "ours_seconds": 15.0, "ddpm_seconds": 30.0, "speedup": pytest.approx(2.0),
                      "note": "", "ddim_seconds": None, "ddim_speedup": None,
                      "ddim_note": ">= 2.67x (DDIM did not reach it within its cap)"}  # 40 / 15
    assert cmp[2] == {"target": t3, "ours_seconds": None, "ddpm_seconds": 30.0, "speedup": None,
                      "note": "<= 1.5x (ours did not reach it within its cap)",  # 30 / ours' cap 10 + 10
                      "ddim_seconds": None, "ddim_speedup": None, "ddim_note": "neither method reached the target"}

    text = open(os.path.join(wd, "results.md")).read()
    kind = cfg.ours.sampler.kind
    assert f"| ours | {kind} | {t1:.4g} | 12.5 s | 5 | 10.00 s | 2.5 s |" in text
    assert f"| ours | {kind} | {t3:.4g} | not reached in 20 steps / 20.0 s | - | 10.00 s | - |" in text
    assert f"| ddim | ddim | {t1:.4g} | 10.0 s | 5 | - | 10.0 s |" in text
    assert f"| {t1:.4g} | 12.5 s | 20.0 s | 1.60x | 10.0 s | 0.80x |" in text
    assert f"| {t2:.4g} | 15.0 s | 30.0 s | 2.00x | - | >= 2.67x (DDIM did not reach it within its cap) |" in text


def test_ours_denoiser_minmax_normalises_the_flow_output():
    """normalise = "minmax" for ours: with the exact score of a point mass x0 outside [0, 1] the
    flow ends at y = x0 + sqrt(t_end / t_start) (noisy - x0) (constant g, lambda^2 = g^2 t); the
    output is each sample's (y - min) / (max - min), not y clipped."""
    import jax.numpy as jnp

    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.ours.sampler.kind = "flow"
    cfg.ours.sampler.rtol = cfg.ours.sampler.atol = 1e-8
    cfg.normalise = "minmax"
    assert cfg.ours.train.sde == "constant" and cfg.ours.train.sde_kwargs.std is None
    tc = denoise.train_config(cfg, "ours")
    g = cfg.ours.train.sde_kwargs.g
    rng = np.random.default_rng(7)
    x0 = rng.uniform(-0.6, 1.6, (2, 3, 8, 8))
    noisy = np.clip(rng.uniform(0, 1, x0.shape) + 0.3 * rng.standard_normal(x0.shape), 0, 1)

    def score_fn(x, t):
        return -(x - jnp.asarray(x0)) / (g ** 2 * t[:, None, None, None])

    out = np.asarray(denoise.ours_denoiser(cfg, tc, noisy)(score_fn)[0])
    y = x0 + math.sqrt(cfg.ours.sampler.t_end / cfg.ours.sampler.t_start) * (noisy - x0)
    assert y.min() < -0.1 and y.max() > 1.1  # clipping would differ
    lo, hi = y.min(axis=(1, 2, 3), keepdims=True), y.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, (y - lo) / (hi - lo), rtol=0, atol=1e-6)


def test_ddpm_matched_start_divides_the_input_by_signal_scale():
    """ddpm.sampler.start = "matched" with noise.signal_scale s: DDPM's chain starts from
    2 noisy / s - 1 at noise level 2 std / s (the matched form), checked with a model that is not
    exact (an exact epsilon ends at the image from any start and would not tell)."""
    import jax
    import jax.numpy as jnp

    from experiments import denoise
    from experiments.configs import denoise_demo
    from krylovjax import ddpm

    cfg = denoise_demo.get_config()
    cfg.noise.update(std=0.4, clamp=False, signal_scale=0.6, seed=3)
    cfg.ddpm.train.ddpm_num_steps = 200
    cfg.num_frames = 3
    denoise.check_config(cfg)
    tc = denoise.train_config(cfg, "ddpm")
    denoise.check_ddpm_range(cfg, tc)
    sched = tc.ddpm_schedule(dtype=jnp.float64)
    clean = np.random.default_rng(5).uniform(0, 1, (2, 3, 8, 8))
    noisy = denoise.noisy_input(cfg, clean)
    np.testing.assert_allclose(noisy, 0.6 * clean + 0.4 * np.random.default_rng(3).standard_normal(clean.shape),
                               rtol=0, atol=1e-12)

    def eps_fn(x, i):  # any smooth function of (x, i)
        return jnp.tanh(0.5 * x) * (1.0 + i[:, None, None, None] / 200.0)

    out = np.asarray(denoise.ddpm_denoiser(cfg, tc, noisy, "ancestral")(eps_fn)[0])
    key = jax.random.PRNGKey(int(cfg.eval_seed))

    def chain(x_start, level):
        r = ddpm.ddpm_denoise(eps_fn, jnp.asarray(x_start), level, key, schedule=sched, method="ancestral",
                              variance="large", clip_x0=(-1.0, 1.0))
        return np.clip((np.asarray(r.x) + 1.0) / 2.0, 0, 1)

    np.testing.assert_allclose(out, chain(2.0 * noisy / 0.6 - 1.0, 2.0 * 0.4 / 0.6), rtol=0, atol=1e-12)
    assert np.abs(out - chain(2.0 * noisy - 1.0, 2.0 * 0.4 / 0.6)).max() > 1e-2  # the division matters


# ----------------------------------------------------------------------------------------------
# experiments.budget
# ----------------------------------------------------------------------------------------------


def test_budget_denoise_figures_from_scripted_runs(tmp_path, monkeypatch):
    """budget.run (task "denoise", two draws of two images, DDPM's prior_mix start) with scripted
    training runs: ours' training budget is the budget less its pre-computation and embedding
    (10 s of 100 s), also when a resumed run's pre-computation takes another time; the quality
    curve's seconds include them; DDPM gets its own start (Paper B's recipe at its prior's
    scale); the mean SSIM, its standard error, each image's mean, the outputs nearest their own
    image and the table are those of scikit-image on the scripted outputs."""
    from experiments import budget, denoise
    from experiments.configs import budget_conditional_literal

    cfg = budget_conditional_literal.get_config()
    _tiny_model(cfg)
    cfg.data.kwargs.num_images = 2
    cfg.noise.draws = 2
    cfg.ddpm.sampler.start = "prior_mix"
    cfg.budget_seconds = 100.0
    cfg.common.eval_every = 20
    w, std, seed = cfg.noise.signal_scale, cfg.noise.std, cfg.noise.seed
    assert (w, std, cfg.noise.clamp) == (0.6, 0.8, False)
    clean = denoise.load_clean(cfg.data)
    assert clean.shape == (2, 3, 16, 16)
    src = np.array([0, 1, 0, 1])  # the image of each input: draw by draw
    rng = np.random.default_rng(31)
    # ours: input 3 (a copy of image 1) lands on image 0; DDPM's outputs all on their own image
    ours_target = clean[[0, 1, 0, 0]]
    outs = {"ours": np.clip(ours_target + np.array([0.02, 0.1, 0.3, 0.05])[:, None, None, None]
                            * rng.standard_normal(ours_target.shape), 0, 1).astype(np.float32),
            "ddpm": np.clip(clean[src] + np.array([0.2, 0.15, 0.4, 0.05])[:, None, None, None]
                            * rng.standard_normal(ours_target.shape), 0, 1).astype(np.float32)}
    given = {}

    def den(m):
        return lambda fn, return_trajectory=False: (outs[m], np.stack([outs[m], outs[m]]), 5)

    def ours_denoiser(cfg_, tc, noisy, *, idx=None):
        given["ours"] = noisy
        return den("ours")

    def ddpm_denoiser(cfg_, tc, noisy, method=None):
        given["ddpm"] = noisy
        return den("ddpm")

    calls = _patch_scripted(monkeypatch, ours_denoiser, ddpm_denoiser, {"ours": 2.0, "ddpm": 5.0})
    wd = str(tmp_path / "b")
    out = budget.run(cfg, wd)

    # the inputs: draw d from the noise seed seed + d; DDPM's start from the same z
    z = np.concatenate([np.random.default_rng(seed + d).standard_normal(clean.shape) for d in range(2)])
    c64 = clean[src].astype(np.float64)
    np.testing.assert_allclose(given["ours"], w * c64 + std * z, rtol=0, atol=1e-6)
    np.testing.assert_allclose(given["ddpm"], (w * (2 * c64 - 1) + (1 - w) * z + 1) / 2, rtol=0, atol=1e-6)

    # budgets: ours 100 - 7 - 3 = 90 s of training (45 steps of 2 s), DDPM 100 s (20 steps of 5 s)
    assert [(c["method"], c["budget_seconds"]) for c in calls] == [("ours", 90.0), ("ddpm", 100.0)]
    o, d = out["methods"]["ours"], out["methods"]["ddpm"]
    assert (o["train_budget_seconds"], o["train_seconds"], o["steps"], o["used_seconds"]) == (90.0, 90.0, 45, 100.0)
    assert (d["train_budget_seconds"], d["train_seconds"], d["steps"], d["used_seconds"]) == (100.0, 100.0, 20, 100.0)
    assert o["stop_reason"] == d["stop_reason"] == "budget"
    assert [(c["step"], c["seconds"]) for c in o["curve"]] == [(20, 50.0), (40, 90.0), (45, 100.0)]
    assert [(c["step"], c["seconds"]) for c in d["curve"]] == [(20, 100.0)]

    text = open(os.path.join(wd, "results.md")).read()
    for m, r in out["methods"].items():
        s = _sk_ssim(outs[m], clean[src])
        np.testing.assert_allclose(r["ssim_per_image"], s, rtol=0, atol=1e-5)
        assert r["ssim"] == pytest.approx(s.mean(), abs=1e-5)
        assert r["ssim_se"] == pytest.approx(_hand_se(s), abs=1e-5)
        per_source = [s[src == b].mean() for b in range(2)]
        assert r["ssim_per_source"] == pytest.approx(per_source, abs=1e-5)
        s_all = np.stack([_sk_ssim(outs[m], np.repeat(clean[b:b + 1], 4, axis=0)) for b in range(2)], axis=1)
        nearest = s_all.argmax(axis=1)
        assert r["nearest_source"] == nearest.tolist()
        assert r["nearest_own_source"] == int((nearest == src).sum()) == {"ours": 3, "ddpm": 4}[m]
        assert r["psnr"] == pytest.approx(_sk_psnr(outs[m], clean[src]).mean(), rel=1e-5)
        assert r["curve"][-1]["ssim_se"] == pytest.approx(r["ssim_se"])
        assert r["curve"][-1]["nearest_own_source"] == r["nearest_own_source"]
        pre = "10.00 s" if m == "ours" else "-"
        train = {"ours": "90.0 s | 45", "ddpm": "100.0 s | 20"}[m]
        row = (f"| {m} | 100.0 s | {pre} | {train} | {s.mean():.4f} | {_hand_se(s):.4f} | "
               f"{r['nearest_own_source']} of 4 | {per_source[0]:.3f}, {per_source[1]:.3f} |")
        assert row in text, (row, text)

    # Killed before results.json: the rerun's pre-computation takes other times, but ours is
    # charged the first run's (ours/budget_prep.json), so its training budget stays 90 s.
    os.remove(os.path.join(wd, "results.json"))
    calls.clear()
    monkeypatch.setattr(denoise, "prepare_ours", _prep(20.0, 5.0))
    again = budget.run(cfg, wd)
    assert [(c["method"], c["budget_seconds"]) for c in calls] == [("ours", 90.0), ("ddpm", 100.0)]
    assert (again["methods"]["ours"]["precompute_seconds"], again["methods"]["ours"]["embed_seconds"]) == (7.0, 3.0)


def test_fmt_se_and_values():
    from experiments import budget

    assert budget._fmt_se(None) == "-"
    assert budget._fmt_se(0.0) == "0.0000" and budget._fmt_se(0.012345) == "0.0123"


# ----------------------------------------------------------------------------------------------
# krylovjax.training: evaluation time stays out of the training time
# ----------------------------------------------------------------------------------------------


def _tiny_train_config(**overrides):
    """tests/test_training.py's ``OURS`` config (its compiled step is cached)."""
    from experiments.configs import train_tiny
    from krylovjax import training as tr

    c = train_tiny.get_config().to_dict()
    for k in ("data", "precompute"):
        c.pop(k)
    c.update(model_overrides=dict(c["model_overrides"], ch=16, ch_mult=(1,), attn_resolutions=()), lr=2e-3,
             warmup_steps=5, batch_size=8, checkpoint_every=1000, log_every=5, progress=False, method="ours")
    c.update(overrides)
    return tr.TrainConfig.from_dict(c)


@pytest.fixture(scope="module")
def _trajectories():
    from krylovjax import training as tr
    from krylovjax.data import builtin_dataset

    images = builtin_dataset(16, 2)
    x = np.stack([images * (1 - 0.1 * n) + 0.05 * n for n in range(5)], axis=1).astype(np.float32)
    return tr.Trajectories(x=x, t=np.linspace(1e-3, 1.0, 5))


def test_train_excludes_evaluation_time_from_time_to_target_and_budget(tmp_path, monkeypatch, _trajectories):
    """train() with a clock on which every evaluation takes 1000 s: the training time, the time
    to target, the "eval" records' training time and the budget see none of it (the evaluation
    time is reported apart); a metric equal to the target reaches it, at that evaluation's step."""
    import time as real_time

    from krylovjax import training as tr

    clock = {"offset": 0.0}
    fake_time = types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + clock["offset"],
                                      time=real_time.time, sleep=real_time.sleep, monotonic=real_time.monotonic)
    monkeypatch.setattr(tr, "time", fake_time)
    EVAL = 1000.0

    def ev(fn, step):
        clock["offset"] += EVAL
        return {"ssim": step / 8.0}  # exact in binary: 0.25, 0.5, 0.75

    res = tr.train(_tiny_train_config(num_steps=6, eval_every=2, log_every=1), _trajectories, tmp_path / "t",
                   eval_fn=ev, target=0.5)
    assert res.stop_reason == "target" and res.step == 4 and res.step_at_target == 4
    assert 0 < res.train_seconds < EVAL and res.eval_seconds >= 2 * EVAL
    assert res.time_to_target == res.train_seconds
    recs = [json.loads(line) for line in open(tmp_path / "t" / "metrics.jsonl")]
    train_t = {r["step"]: r["train_seconds"] for r in recs if r["kind"] == "train"}
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # an evaluation's record holds the training time of its step, no more
        assert r["train_seconds"] == train_t[r["step"]] < EVAL
    # a budget of 500 s of training: evaluations of 1000 s each do not use it up
    res = tr.train(_tiny_train_config(num_steps=3, eval_every=1, log_every=1, budget_seconds=EVAL / 2),
                   _trajectories, tmp_path / "b", eval_fn=ev)
    assert res.stop_reason == "num_steps" and res.step == 3 and res.eval_seconds >= 3 * EVAL


def test_train_does_not_count_a_non_finite_metric_as_reaching_the_target(tmp_path, _trajectories):
    """An evaluation that returns +inf (or NaN) does not stop training at the target, as
    experiment_utils.first_reaching skips it when the tables are made."""
    from krylovjax import training as tr

    seen = []

    def ev(fn, step):
        seen.append(step)
        return {"ssim": math.inf if step == 1 else math.nan}

    res = tr.train(_tiny_train_config(num_steps=2, eval_every=1, log_every=1), _trajectories, tmp_path / "t",
                   eval_fn=ev, target=0.9)
    assert seen == [1, 2] and res.stop_reason == "num_steps" and res.time_to_target is None


# ----------------------------------------------------------------------------------------------
# krylovjax.reference: the baseline's timing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["spsolve", "splu"])
def test_reference_times_the_solves_apart_from_the_assembly(monkeypatch, solver):
    """On a clock where each assembly takes 1 s and each solve 2 s, four systems report 8 s of
    solving and 4 s of assembly (the baseline's time is the solves' alone, all of them)."""
    from krylovjax import reference
    from krylovjax.fokker_planck import FPOperator, fp_operator

    clock = [0.0]
    monkeypatch.setattr(reference, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    to_scipy = FPOperator.to_scipy

    def slow_assembly(self, *a, **k):
        clock[0] += 1.0
        return to_scipy(self, *a, **k)

    monkeypatch.setattr(FPOperator, "to_scipy", slow_assembly)
    import scipy.sparse.linalg as spla  # (reference imports it at its first solve)

    real = getattr(spla, solver)

    def slow_solve(*a, **k):
        clock[0] += 2.0
        return real(*a, **k)

    monkeypatch.setattr(spla, solver, slow_solve)
    rng = np.random.default_rng(0)
    op = fp_operator(2.0, 0.1, 1.0, rng.normal(size=(4, 2, 6, 5)))
    b = rng.normal(size=(4, 6, 5))
    res = getattr(reference, solver)(op, b)
    assert res.seconds == 8.0 and res.assembly_seconds == 4.0
    for i in range(4):
        np.testing.assert_allclose(to_scipy(op, i) @ res.x[i].ravel(), b[i].ravel(), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# krylovjax.data
# ----------------------------------------------------------------------------------------------


def test_builtin_image_wide_output_takes_the_centred_band_of_a_square_photo():
    """A wider-than-square size from the square astronaut (512 x 512): the centred 256-row band
    (rows 128:384), checked against an independent block-mean downsampling of it."""
    import skimage.data as skd

    from krylovjax import data as D

    x = D.builtin_image("astronaut", (16, 32))
    assert x.shape == (3, 16, 32)
    photo = skd.astronaut() / 255.0

    def block_mean(img):  # [256, 512, 3] -> [3, 16, 32]
        return img.reshape(16, 16, 32, 16, 3).mean(axis=(1, 3)).transpose(2, 0, 1)

    assert np.abs(x - block_mean(photo[128:384])).mean() < 0.05
    assert np.abs(x - block_mean(photo[:256])).mean() > 0.08  # the top band is another picture
