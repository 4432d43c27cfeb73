"""Experiment binaries (denoise, budget, generate) and their helpers (krylovjax.experiment_utils).

The smoke tests run the binaries through their flags in subprocesses on a tiny problem (16x16
photo, a one-level U-Net with 8 channels, a few steps): they check the outputs exist, that the
JSON holds the expected keys and that its numbers are consistent with each other and with the
training records. The bad-input tests call the binaries' ``run`` functions in-process (they fail
before any training) and check that nothing already in the work directory changed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from krylovjax import experiment_utils as eu

from _fs import snapshot as _snapshot
from _multiprocess import compile_cache_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny problem, as --config.* flags of denoise_demo / budget_demo.
TINY = [
    "--config.data.size=16",
    "--config.common.model_overrides.ch=8",
    "--config.common.model_overrides.ch_mult=(1,)",
    "--config.common.model_overrides.attn_resolutions=()",
    "--config.ours.train.batch_size=1",  # the demo's batches: on the 4 test devices, a mesh of
    "--config.ddpm.train.batch_size=2",  # gcd(batch, 4) devices (denoise.batch_mesh)
    "--config.ours.precompute.num_steps=3",
    "--config.ours.precompute.max_sweeps=2",
    "--config.ours.sampler.kind=paper_a",  # a 5-step scan compiles faster than the adaptive ODE
    "--config.ours.sampler.num_steps=5",
    "--config.ddpm.train.ddpm_num_steps=100",
    "--config.num_frames=3",
]


_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the binaries of this module (they compile the
    same U-Net steps and samplers; a cache hit saves seconds per subprocess)."""
    _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    _CACHE.clear()


def _run(module: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    if "dir" in _CACHE:
        env.update(compile_cache_env(_CACHE["dir"]))
    proc = subprocess.run([sys.executable, "-m", module] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def test_noisy_copy_is_papers_clamped_gaussian_noise():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    got = eu.noisy_copy(x, 0.506, seed=7)
    ref = np.clip(x.astype(np.float64) + 0.506 * np.random.default_rng(7).standard_normal(x.shape), 0, 1)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, ref.astype(np.float32), rtol=0, atol=0)
    # without the clamp the residual is N(0, std^2): sample std within 4 standard errors
    raw = eu.noisy_copy(x.astype(np.float64), 0.3, seed=1, clamp=False) - x.astype(np.float64)
    n = raw.size
    assert abs(raw.std() - 0.3) < 4 * 0.3 / math.sqrt(2 * n)
    assert abs(raw.mean()) < 4 * 0.3 / math.sqrt(n)
    # same seed, same noise in float32 and float64
    np.testing.assert_allclose(eu.noisy_copy(x.astype(np.float64), 0.506, seed=7), ref, atol=0)
    with pytest.raises(ValueError, match="std"):
        eu.noisy_copy(x, 0.0, seed=0)
    with pytest.raises(ValueError, match="images"):
        eu.noisy_copy(x[0], 0.1, seed=0)
    with pytest.raises(TypeError, match="images"):
        eu.noisy_copy(np.zeros((1, 1, 4, 4), np.int32), 0.1, seed=0)
    # scale: Paper B's conditional start w x + (1 - w) sigma z, with the same z
    z7 = np.random.default_rng(7).standard_normal(x.shape)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(eu.noisy_copy(x64, 0.8, seed=7, clamp=False, scale=0.6), 0.6 * x64 + 0.8 * z7,
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(eu.noisy_copy(x64, 0.8, seed=7, scale=0.6), np.clip(0.6 * x64 + 0.8 * z7, 0, 1),
                               rtol=0, atol=1e-15)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="scale: expected a finite factor > 0"):
            eu.noisy_copy(x, 0.1, seed=0, scale=bad)


def test_first_reaching_and_targets():
    recs = [{"step": 5, "train_seconds": 1.0, "ssim": 0.5}, {"step": 10, "train_seconds": 2.0},
            {"step": 15, "train_seconds": 3.0, "ssim": 0.96}, {"step": 20, "train_seconds": 4.0, "ssim": 0.99}]
    assert eu.first_reaching(recs, "ssim", 0.95)["step"] == 15
    assert eu.first_reaching(recs, "ssim", 0.99)["train_seconds"] == 4.0
    assert eu.first_reaching(recs, "ssim", 0.995) is None
    assert eu.check_target(1) == 1.0
    for bad in (0.0, -0.1, 1.0001, float("nan"), "0.9", True, None):
        with pytest.raises(ValueError, match="target"):
            eu.check_target(bad)
    for bad in (0, -1.0, float("inf"), None):
        with pytest.raises(ValueError, match="budget_seconds"):
            eu.check_positive_seconds(bad)


def test_markdown_table_and_config_diff():
    t = eu.markdown_table(["a", "b"], [[1, 0.123456], ["x|y", None]])
    lines = t.strip().split("\n")
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2] == "| 1 | 0.1235 |" and lines[3] == "| x\\|y | - |"
    with pytest.raises(ValueError, match="rows"):
        eu.markdown_table(["a", "b"], [[1]])
    a = {"x": 1, "y": {"z": (1, 2), "w": 1.0}}
    assert eu.config_diff(a, {"x": 1, "y": {"z": [1, 2], "w": 1}}) == []
    assert eu.config_diff(a, {"x": 2, "y": {"z": (1, 3)}}) == ["x", "y.w", "y.z"]


def test_claim_workdir_refuses_other_configs_without_touching(tmp_path):
    wd = str(tmp_path / "run")
    assert eu.claim_workdir(wd, "denoise", {"lr": 1e-3, "model": {"ch": 8}}) is True
    with open(os.path.join(wd, "results.json"), "w") as f:
        f.write("{}")
    before = _snapshot(wd)
    assert eu.claim_workdir(wd, "denoise", {"lr": 1e-3, "model": {"ch": 8}}) is False
    # with the values (a walkthrough: the keys alone, where train's message gave both)
    with pytest.raises(ValueError, match=r"another run's config \(differs at: lr, model.ch\) \(lr: stored 0\.001, "
                                         r"given 0\.002; model\.ch: stored 8, given 16\); use another --workdir"):
        eu.claim_workdir(wd, "denoise", {"lr": 2e-3, "model": {"ch": 16}})
    # a binary with --fresh names it as the other way out (a walkthrough, 2026-12-07)
    with pytest.raises(ValueError, match=r"given 16\); use another --workdir, or --fresh to move it to "
                                         + re.escape(repr(wd + ".prev")) + r" first \(nothing there was changed\)$"):
        eu.claim_workdir(wd, "denoise", {"lr": 2e-3, "model": {"ch": 16}}, fresh_flag=True)
    with pytest.raises(ValueError, match=r"holds a 'denoise' run, not 'budget'; use another --workdir, or --fresh"):
        eu.claim_workdir(wd, "budget", {}, fresh_flag=True)
    with pytest.raises(ValueError, match=r"\(differs at: extra, lr\) \(extra: stored <absent>, given \"xxxx.*\.\.\.; "
                                         r"lr: stored 0\.001, given 0\.003\)"):
        eu.claim_workdir(wd, "denoise", {"lr": 3e-3, "model": {"ch": 8}, "extra": "x" * 80})
    with pytest.raises(ValueError, match="'budget'"):
        eu.claim_workdir(wd, "budget", {"lr": 1e-3, "model": {"ch": 8}})
    assert _snapshot(wd) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        eu.claim_workdir(str(other), "denoise", {})
    assert sorted(os.listdir(other)) == ["data.txt"]


def test_claim_workdir_legacy_keys(tmp_path):
    """A key added after a directory was claimed without it matches only its legacy value."""
    stored = {"lr": 1e-3, "ours": {"ch": 8}}
    legacy = {"ours.embed": True, "tag": None}
    assert eu.config_diff(stored, {"lr": 1e-3, "ours": {"ch": 8, "embed": True}, "tag": None}, legacy=legacy) == []
    assert eu.config_diff(stored, {"lr": 1e-3, "ours": {"ch": 8, "embed": False}}, legacy=legacy) == ["ours.embed"]
    assert eu.config_diff(stored, {"lr": 1e-3, "ours": {"ch": 8}, "embed": True}, legacy=legacy) == ["embed"]
    # a key the stored config has is compared as ever, whatever legacy says
    assert eu.config_diff({**stored, "tag": 1}, {**stored, "tag": None}, legacy=legacy) == ["tag"]
    assert eu.config_diff(stored, {"lr": 1e-3, "ours": {"ch": 8, "embed": True}}) == ["ours.embed"]
    wd = str(tmp_path / "run")
    assert eu.claim_workdir(wd, "denoise", stored) is True
    before = _snapshot(wd)
    assert eu.claim_workdir(wd, "denoise", {**stored, "ours": {"ch": 8, "embed": True}}, legacy=legacy) is False
    with pytest.raises(ValueError, match=r"differs at: ours.embed\)"):
        eu.claim_workdir(wd, "denoise", {**stored, "ours": {"ch": 8, "embed": False}}, legacy=legacy)
    assert _snapshot(wd) == before  # the claim file is left as it was


def _old_run_dir(path, experiment, config, drop, finished):
    """A run directory claimed by an older version: ``config`` without the dotted keys ``drop``,
    and the result file ``finished`` (so an accepted claim stops at "already holds")."""
    import copy

    cfg = copy.deepcopy(eu._plain(config))
    for key in drop:
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]
    os.makedirs(path)
    eu.write_json(os.path.join(path, "experiment.json"), {"experiment": experiment, "config": cfg})
    eu.write_json(os.path.join(path, finished), {})
    return str(path)


def test_a_moved_tfds_dataset_is_the_same_run(tmp_path):
    """The tfds data directory may change between runs of one work directory (the data moved, or
    ``""`` became an explicit path); any other key may not."""
    from experiments import denoise
    from experiments.configs import denoise_cifar10

    cfg = denoise_cifar10.get_config()
    wd = str(tmp_path / "w")
    assert eu.claim_workdir(wd, "denoise", cfg, may_change=denoise.MAY_CHANGE) is True
    moved = denoise_cifar10.get_config()
    moved.data.kwargs.data_dir = str(tmp_path / "tfds")
    assert eu.claim_workdir(wd, "denoise", moved, may_change=denoise.MAY_CHANGE) is False
    with pytest.raises(ValueError, match=r"differs at: data.kwargs.data_dir\)"):
        eu.claim_workdir(wd, "denoise", moved)  # without it: refused, as before the review
    moved.data.kwargs.split = "test"
    with pytest.raises(ValueError, match=r"differs at: data.kwargs.split\)"):
        eu.claim_workdir(wd, "denoise", moved, may_change=denoise.MAY_CHANGE)


def test_run_directories_from_before_a_key_existed(tmp_path, monkeypatch):
    """denoise, budget and generate accept a directory claimed before a config key existed when
    the key holds the value that reproduces such runs, and refuse it otherwise (nothing changed)."""
    import types

    from experiments import budget, denoise, generate
    from experiments.configs import budget_generate, denoise_demo
    from krylovjax import training

    from experiments.configs import denoise_cifar10

    for key in {**denoise.LEGACY_CONFIG, **budget.LEGACY_CONFIG}:  # every legacy key is a config key
        # (data.kwargs.data_dir: of the tfds configs alone)
        node = (denoise_cifar10 if key.startswith("data.kwargs.") else budget_generate).get_config()
        for p in key.split("."):
            assert p in node, key
            node = node[p]
    assert budget_generate.get_config().final_denoise is True
    # A denoise directory of 2026-11-27 (before ours.embed, ddpm_max_train_step, embed_variant).
    added = ("ours.embed", "ddpm.train.ddpm_max_train_step", "ours.embed_variant", "ours.embed_noise_scale",
             "ours.precompute.initial", "ours.precompute.h", "ours.precompute.outer")
    wd = _old_run_dir(tmp_path / "d", "denoise", denoise_demo.get_config(), added, "results.json")
    before = _snapshot(wd)
    with pytest.raises(ValueError, match="already holds the finished results"):
        denoise.run(denoise_demo.get_config(), wd)
    cfg = denoise_demo.get_config()
    cfg.ours.embed_variant = "paper_a"
    with pytest.raises(ValueError, match=r"another run's config \(differs at: ours.embed_variant\)"):
        denoise.run(cfg, wd)
    assert _snapshot(wd) == before
    # A generation budget from before Tweedie's last step: its equivalent now is final_denoise=False.
    cfg = budget_generate.get_config()
    wd = _old_run_dir(tmp_path / "b", "budget", cfg, added + ("final_denoise",), "results.json")
    before = _snapshot(wd)
    with pytest.raises(ValueError, match=r"another run's config \(differs at: final_denoise\)"):
        budget.run(cfg, wd)
    cfg.final_denoise = False
    with pytest.raises(ValueError, match="already holds the finished results"):
        budget.run(cfg, wd)
    assert _snapshot(wd) == before
    # generate's output directory (the same settings as generate.run records; from before
    # --compute_dtype too: these settings have no compute_dtype, LEGACY_SETTINGS' "model")
    run = tmp_path / "train"
    (run / "checkpoints").mkdir(parents=True)
    settings = {"workdir": os.path.abspath(run), "step": None, "num_samples": 2, "num_frames": 3, "sampler": "auto",
                "num_steps": 50, "seed": 0, "reference": None, "reference_count": 3, "final_denoise": False}
    out = _old_run_dir(tmp_path / "g", "generate", settings, ("final_denoise",), "samples.json")
    before = _snapshot(out)
    # generate reads the model before the output directory's claim: a stand-in for it
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: types.SimpleNamespace(
        step=5, model_def=types.SimpleNamespace(unet=types.SimpleNamespace(dtype="float32")), trained_dtype="float32"))
    with pytest.raises(ValueError, match=r"differs at: final_denoise\)"):
        generate.run(str(run), out, num_samples=2, num_frames=3)
    with pytest.raises(ValueError, match="already holds these samples"):
        generate.run(str(run), out, num_samples=2, num_frames=3, final_denoise=False)
    assert _snapshot(out) == before


def test_image_grid_and_curves_write_pngs(tmp_path):
    import matplotlib.image as mpimg

    rows = [np.random.default_rng(0).uniform(0, 1, (3, 3, 8, 8)), np.zeros((2, 1, 8, 8))]
    p = tmp_path / "g.png"
    eu.image_grid(p, rows, row_labels=["a", "b"], col_labels=["1", "2", "3"], title="t")
    img = mpimg.imread(p)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 100
    q = tmp_path / "c.png"
    eu.plot_curves(q, {"m": ([0, 1], [0.1, 0.9])}, xlabel="s", ylabel="ssim", hlines=[0.5])
    assert mpimg.imread(q).shape[0] > 50
    with pytest.raises(ValueError, match="rows"):
        eu.image_grid(tmp_path / "e.png", [])


# ----------------------------------------------------------------------------------------------
# Smoke tests through the binaries' flags
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def denoise_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("exp") / "denoise")
    args = ["--config=experiments/configs/denoise_demo.py", f"--workdir={wd}", *TINY,
            "--config.common.eval_every=3", "--config.ours.train.num_steps=3", "--config.ddpm.train.num_steps=3",
            "--config.targets=(0.02,0.999)"]
    proc = _run("experiments.denoise", args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd, proc


def test_denoise_smoke(denoise_run):
    wd, proc = denoise_run
    for f in ("results.md", "results.json", "trajectory.png", "denoised.png", "ssim_curve.png",
              "experiment.json", "ours/metrics.jsonl", "ddpm/metrics.jsonl"):
        assert os.path.isfile(os.path.join(wd, f)), f
    assert os.path.abspath(os.path.join(wd, "results.md")) in proc.stdout  # says where outputs are
    with open(os.path.join(wd, "results.json")) as f:
        out = json.load(f)
    for k in ("experiment", "machine", "image", "noise", "noisy", "metric", "targets", "timing_convention",
              "methods", "comparison", "wall_seconds", "config"):
        assert k in out, k
    assert out["image"]["shape"] == [1, 3, 16, 16] and out["targets"] == [0.02, 0.999]
    # DDPM's network gives two rows: its ancestral sampler ("ddpm") and DDIM ("ddim", Paper B's row)
    assert list(out["methods"]) == ["ours", "ddpm", "ddim"]
    assert out["compute_dtype"] == {"ours": "float32", "ddpm": "float32"}  # the tables say so (bfloat16 too)
    assert ", U-Net compute float32, " in open(os.path.join(wd, "results.md")).read()
    assert [out["methods"][m]["sampler"] for m in ("ddpm", "ddim")] == ["ancestral", "ddim"]
    assert out["methods"]["ddim"]["training_run"] == "ddpm" and not os.path.exists(os.path.join(wd, "ddim"))
    for m in ("ours", "ddpm", "ddim"):
        r = out["methods"][m]
        for k in ("stop_reason", "steps", "train_seconds", "compile_seconds", "eval_seconds", "precompute_seconds",
                  "targets", "evals", "final"):
            assert k in r, (m, k)
        assert r["steps"] == 3 and r["stop_reason"] in ("num_steps", "target")
        assert r["train_seconds"] > 0 and r["compile_seconds"] > 0
        # the step cap was hit before SSIM 0.999: reported as not reached, no time
        hi = r["targets"][1]
        assert hi["reached"] is False and hi["seconds"] is None and hi["step"] is None
        # the records agree with the training run's own metrics.jsonl
        key = "ddim_ssim" if m == "ddim" else "ssim"
        evals = eu.read_metrics(os.path.join(wd, r["training_run"]), "eval")
        assert [e["step"] for e in r["evals"]] == [e["step"] for e in evals] == [3]
        assert r["evals"][0]["ssim"] == evals[0][key]
        lo = r["targets"][0]
        assert lo["reached"] == (evals[0][key] >= 0.02)
        if lo["reached"]:
            assert lo["seconds"] == pytest.approx(evals[0]["train_seconds"] + r["precompute_seconds"]
                                                  + r["embed_seconds"])
        # the final metrics are those of the last evaluation (same model, same sampler key)
        assert r["final"]["step"] == 3
        assert r["final"]["ssim"] == pytest.approx(evals[-1][key], abs=1e-5)
        assert r["evals"][0]["ssim_uniform"] == evals[0][key + "_uniform"]  # Paper B's SSIM, recorded too
        assert r["final"]["ssim_uniform"] == pytest.approx(evals[-1][key + "_uniform"], abs=1e-5)
        assert 0 < r["final"]["psnr"] < 60
    # DDPM stops when both of its samplers reached the target: the minimum of the two
    ev = eu.read_metrics(os.path.join(wd, "ddpm"), "eval")[0]
    assert ev["min_ssim"] == min(ev["ssim"], ev["ddim_ssim"])
    assert out["methods"]["ddpm"]["train_config"]["target_metric"] == "min_ssim"
    # the two DDPM samplers differ (stochastic ancestral vs deterministic DDIM)
    assert out["methods"]["ddpm"]["final"]["ssim"] != out["methods"]["ddim"]["final"]["ssim"]
    assert out["methods"]["ours"]["precompute_seconds"] > 0 and out["methods"]["ddpm"]["precompute_seconds"] == 0
    assert out["methods"]["ours"]["solver_stats"]["nonconverged"] == 0
    cmp = {c["target"]: c for c in out["comparison"]}
    assert cmp[0.999]["speedup"] is None and cmp[0.999]["note"]
    assert cmp[0.999]["ddim_speedup"] is None and cmp[0.999]["ddim_note"]
    o, d = out["methods"]["ours"]["targets"][0], out["methods"]["ddim"]["targets"][0]
    if o["reached"] and d["reached"]:
        assert cmp[0.02]["ddim_speedup"] == pytest.approx(d["seconds"] / o["seconds"])
    # the noisy input is Paper A's clamp(x + 0.506 z) with the configured seed
    from krylovjax.data import load_images

    clean = load_images("builtin:chelsea", size=16)
    noisy = eu.noisy_copy(clean, 0.506, 0)
    from krylovjax import metrics

    assert out["noisy"]["ssim"] == pytest.approx(float(metrics.ssim(noisy, clean)[0]), abs=1e-5)
    text = open(os.path.join(wd, "results.md")).read()
    assert "not reached in 3 steps" in text
    assert "| ddim | ddim |" in text and "speed-up (DDIM / ours)" in text
    assert os.path.isfile(os.path.join(wd, "ddpm", "denoise_result_ddim.json"))


def test_denoise_refuses_existing_results(denoise_run, monkeypatch):
    """Same config again without --overwrite, another config, a bad target: errors, no change."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    wd, _ = denoise_run
    before = _snapshot(wd)
    stored = json.load(open(os.path.join(wd, "experiment.json")))["config"]
    import ml_collections

    cfg = ml_collections.ConfigDict(stored)
    with pytest.raises(ValueError, match="already holds the finished results"):
        denoise.run(cfg, wd)
    cfg2 = ml_collections.ConfigDict(stored)
    cfg2.ours.train.lr = 5e-4
    with pytest.raises(ValueError, match=r"another run's config \(differs at: ours.train.lr\)"):
        denoise.run(cfg2, wd)
    for bad in ((0.0,), (0.9, 1.2), ()):
        cfg3 = denoise_demo.get_config()
        cfg3.targets = bad
        with pytest.raises(ValueError, match="target"):
            denoise.run(cfg3, wd)
    assert _snapshot(wd) == before
    # An interrupted run (no results.json yet) keeps the methods that had finished: nothing is
    # trained again and the results are rebuilt from their saved records.
    old = json.load(open(os.path.join(wd, "results.json")))
    os.remove(os.path.join(wd, "results.json"))
    # killed while drawing the figures: results.json (the finished mark) is written last
    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(eu, "plot_curves", killed)
        with pytest.raises(KeyboardInterrupt):
            denoise.run(ml_collections.ConfigDict(stored), wd)
    assert not os.path.exists(os.path.join(wd, "results.json"))
    new = denoise.run(ml_collections.ConfigDict(stored), wd)
    assert json.loads(json.dumps(new["methods"])) == old["methods"]
    assert new["comparison"] == old["comparison"]
    assert [e["step"] for e in eu.read_metrics(os.path.join(wd, "ours"), "eval")] == [3]


def test_denoise_bad_image_size_fails_before_writing(tmp_path):
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.data.size = 16
    cfg.common.model_overrides.image_size = 32  # the model wants 32x32 images
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match=r"data: images of shape \[C, H, W\] = \[3, 16, 16\] do not fit the model"):
        denoise.run(cfg, str(wd))
    cfg = denoise_demo.get_config()
    cfg.data.size = 18
    cfg.common.model_overrides.ch_mult = (1, 2, 2)  # needs a multiple of 4
    with pytest.raises(ValueError, match="data: images of size 18 x 18 do not fit the model"):
        denoise.run(cfg, str(wd))
    assert not wd.exists()


@pytest.mark.parametrize("key, value, match", [
    ("noise.seed", -1, "noise.seed: expected an int >= 0"),
    ("ours.embed_component", "bogus", "ours.embed_component: expected one of"),
    ("ours.sampler.num_steps", 0, "ours.sampler.num_steps: expected an int >= 1"),
    ("ours.sampler.t_end", 2.0, "ours.sampler.t_start, t_end: expected times with 0 <= t_end < t_start"),
    ("ours.sampler.method", "bogus", "ours.sampler.method: expected 'ode' or 'sde'"),
    ("ours.sampler.rtol", 0.0, "ours.sampler.rtol: expected a finite tolerance > 0"),
    ("ddpm.sampler.variance", "bogus", "ddpm.sampler.variance: expected one of"),
    ("targets", (0.9, 0.9), "targets: expected distinct SSIM targets"),
    ("common.eval_every", 0, "common.eval_every: the targets are checked at the evaluations"),
    ("noise.std", 0.9, r"noise.std: the matched start needs DDPM's noise level 2 \* 0.9, beyond the largest its "
                       r"schedule of ddpm.train.ddpm_num_steps = 100 steps reaches"),
])
def test_denoise_bad_values_are_refused_before_the_workdir_is_claimed(tmp_path, key, value, match):
    """Each of these used to fail after experiment.json was written (some after ours had
    trained), and the corrected command was then refused as another run's config."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.data.size = 16
    cfg.ddpm.train.ddpm_num_steps = 100
    *path, leaf = key.split(".")
    node = cfg
    for k in path:
        node = node[k]
    node[leaf] = value
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        denoise.run(cfg, str(wd))
    assert not wd.exists()


@pytest.mark.parametrize("key, value", [("normalise", "minmax"), ("noise.signal_scale", 0.6),
                                        ("ddpm.sampler.start", "prior_mix"), ("ddpm.sampler.variance", "small"),
                                        ("ddpm.sampler.clip_x0", False)])
def test_budget_generate_refuses_the_denoise_settings_it_does_not_use(key, value):
    from experiments import budget
    from experiments.configs import budget_generate

    cfg = budget_generate.get_config()
    budget.check_budget_config(cfg)  # the config as shipped passes
    *path, leaf = key.split(".")
    node = cfg
    for k in path:
        node = node[k]
    node[leaf] = value
    with pytest.raises(ValueError, match=f"{key}: the generate task does not use it"):
        budget.check_budget_config(cfg)


def test_a_failure_with_only_the_claim_written_withdraws_it(tmp_path):
    """A budget too small for ours' pre-computation is found after the claim: the claim is
    withdrawn (nothing else was written), so the corrected budget may use the directory."""
    from experiments import budget
    from experiments.configs import budget_demo
    from krylovjax import experiment_utils as eu

    cfg = budget_demo.get_config()
    cfg.data.size = 16
    cfg.ours.precompute.update(num_steps=3, max_sweeps=2)
    cfg.budget_seconds = 1e-6
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match="budget_seconds: 1e-06 s does not cover ours' pre-computation"):
        budget.run(cfg, str(wd))
    assert os.listdir(wd) == []
    # the same once anything else is in the directory: the claim stays and protects it
    def fails():
        (wd / "ours").mkdir()
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        eu.run_claimed(str(wd), "budget", {"a": 1}, fails)
    assert sorted(os.listdir(wd)) == ["experiment.json", "ours"]
    with pytest.raises(ValueError, match="holds another run's config"):
        eu.claim_workdir(str(wd), "budget", {"a": 2})
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="workdir: .* is a file, expected a directory"):
        eu.claim_workdir(str(afile), "budget", {"a": 1})


def test_ddpm_max_train_step_must_cover_the_denoising_chain(tmp_path):
    """The demo's chain starts at step 260 (noise std 0.506 -> 1.012 in [-1, 1]): a DDPM trained
    on fewer steps is refused before anything is written; 261 is accepted."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    assert cfg.ddpm.train.ddpm_max_train_step is None
    cfg.ddpm.train.ddpm_max_train_step = 260
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match=r"ddpm.train.ddpm_max_train_step: .* starts at step 260, .* >= 261, got 260"):
        denoise.run(cfg, str(wd))
    assert not wd.exists()
    cfg.ddpm.train.ddpm_max_train_step = 261
    denoise.check_ddpm_range(cfg, denoise.train_config(cfg, "ddpm"))
    cfg.ddpm.train.ddpm_max_train_step = None
    denoise.check_ddpm_range(cfg, denoise.train_config(cfg, "ddpm"))
    # the budget binary: the same check when it denoises; generation needs every step
    from experiments import budget, generate
    from experiments.configs import budget_demo

    cfg = budget_demo.get_config()
    cfg.ddpm.train.ddpm_max_train_step = 260
    with pytest.raises(ValueError, match="ddpm.train.ddpm_max_train_step: .* >= 261, got 260"):
        budget.run(cfg, str(wd))
    cfg.task = "generate"
    cfg.ddpm.train.ddpm_max_train_step = 999
    with pytest.raises(ValueError, match=r"ddpm_max_train_step: .* steps 0 \.\. 998 only, .* starts at step 999"):
        budget.run(cfg, str(wd))
    assert not wd.exists()
    tc = denoise.train_config(cfg, "ddpm")
    with pytest.raises(ValueError, match="generation from noise"):
        generate.resolve_sampler(tc, "auto")
    assert generate.resolve_sampler(tc.replace(ddpm_max_train_step=1000), "auto") == "ancestral"


def test_ours_without_embedding_trains_on_the_clean_image():
    """``ours.embed = False`` (the ablation): the clean image at every level, on the time levels
    the pre-computation uses (for the VP SDE scaled by its mean coefficient), and nothing timed;
    a non-bool is refused."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.data.size = 16
    cfg.ours.precompute.num_steps = 4
    cfg.ours.precompute.max_sweeps = 2
    tc = denoise.train_config(cfg, "ours")
    clean = denoise.load_clean(cfg.data)
    emb, info = denoise.prepare_ours(cfg, tc, clean)
    cfg.ours.embed = False
    plain, pinfo = denoise.prepare_ours(cfg, tc, clean)
    np.testing.assert_allclose(plain.t, emb.t, rtol=1e-6)
    assert plain.x.shape == emb.x.shape == (1, 4, 3, 16, 16) and plain.sde == emb.sde
    for n in range(4):
        np.testing.assert_array_equal(plain.x[:, n], clean)
    assert np.abs(emb.x[:, -1] - clean).max() > 1e-3  # the embedding does move the image
    assert pinfo["precompute_seconds"] == pinfo["embed_seconds"] == 0.0 and info["precompute_seconds"] > 0
    # The VP SDE has a drift: the forward marginal's mean at t is exp(-B(t)/2) x0, by hand.
    vp = denoise.train_config(cfg, "ours").replace(sde="vp", sde_kwargs=(("beta_min", 0.1), ("beta_max", 20.0)))
    vplain, _ = denoise.prepare_ours(cfg, vp, clean)
    assert vplain.sde == {"name": "vp", "kwargs": {"beta_min": 0.1, "beta_max": 20.0}}
    for n, tn in enumerate(np.asarray(vplain.t, np.float64)):
        alpha = math.exp(-0.5 * (0.1 * tn + 0.5 * (20.0 - 0.1) * tn**2))
        np.testing.assert_allclose(vplain.x[:, n], alpha * np.asarray(clean), rtol=1e-5, atol=1e-7)
    assert float(np.asarray(vplain.t)[-1]) == pytest.approx(1.0) and np.abs(vplain.x[:, -1]).max() < 0.01
    cfg.ours.embed = None  # (ml_collections refuses other types already)
    with pytest.raises(ValueError, match="ours.embed: expected a bool, got None"):
        denoise.check_config(cfg)


def test_paper_a_precomputation_in_the_experiments():
    """Paper A's formulation from the config (``ours.precompute.initial = "paper_a_kde"``, its
    spacing 1 / (H - 1), a fixed point per time step): one density of the image plane shared by
    the channels, its samples drawn from the training seed's stream (the same seed, the same
    trajectories; another seed, others), and recorded in the run's pre-computation config."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.data.size = 16
    cfg.ours.precompute.num_steps = 4
    cfg.ours.precompute.initial = "paper_a_kde"
    cfg.ours.precompute.h = 1.0 / 15
    cfg.ours.precompute.outer = "timestep"
    cfg.ours.embed_component = "x"
    denoise.check_config(cfg)
    tc = denoise.train_config(cfg, "ours")
    clean = denoise.load_clean(cfg.data)
    a, info = denoise.prepare_ours(cfg, tc, clean)
    again, _ = denoise.prepare_ours(cfg, tc, clean)
    other, _ = denoise.prepare_ours(cfg, tc.replace(seed=tc.seed + 1), clean)
    pc = info["precompute_config"]
    assert (pc["initial"], pc["h"], pc["outer"]) == ("paper_a_kde", 1.0 / 15, "timestep")
    assert info["solver_stats"]["nonconverged"] == 0
    np.testing.assert_array_equal(a.x, again.x)
    assert np.abs(a.x - other.x).max() > 1e-6
    # one density for the three channels: the same displacement in each (x-derivative only)
    d = a.x[:, -1] - a.x[:, 0]
    np.testing.assert_allclose(d[:, 1], d[:, 0], atol=1e-6)
    np.testing.assert_allclose(d[:, 2], d[:, 0], atol=1e-6)
    assert np.abs(d).max() > 1e-3


def test_paper_a_embedding_in_the_experiments():
    """``ours.embed_variant = "paper_a"``: Paper A's clamped embedding on the same time levels.
    Without its noise it is Paper B's trajectory with every step clamped to [0, 1] (built here
    from Paper B's increments); with it, the levels differ and stay in [0, 1]; bad values raise."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.data.size = 16
    cfg.ours.precompute.num_steps = 4
    cfg.ours.precompute.max_sweeps = 2
    cfg.ours.train.sde = "ve"
    cfg.ours.train.sde_kwargs = ml_collections.ConfigDict({"sigma": 50.0})  # large steps: clamps
    tc = denoise.train_config(cfg, "ours")
    clean = denoise.load_clean(cfg.data)
    b, _ = denoise.prepare_ours(cfg, tc, clean)
    cfg.ours.embed_variant, cfg.ours.embed_noise_scale = "paper_a", 0.0
    a0, _ = denoise.prepare_ours(cfg, tc, clean)
    cfg.ours.embed_noise_scale = 0.1
    a1, _ = denoise.prepare_ours(cfg, tc, clean)
    assert a0.x.shape == a1.x.shape == b.x.shape == (1, 4, 3, 16, 16)
    np.testing.assert_allclose(a0.t, b.t)
    np.testing.assert_allclose(a1.t, b.t)
    ref = [np.asarray(clean)]
    for n in range(1, 4):
        ref.append(np.clip(ref[-1] + (b.x[:, n] - b.x[:, n - 1]), 0.0, 1.0))
    np.testing.assert_allclose(a0.x, np.stack(ref, axis=1), atol=1e-5)
    assert np.abs(b.x).max() > 1.0 + 1e-3  # Paper B's levels leave [0, 1] here; Paper A's do not
    assert a1.x.min() >= 0.0 and a1.x.max() <= 1.0 and np.abs(a1.x - a0.x).max() > 1e-3
    np.testing.assert_array_equal(a1.x[:, 0], clean)
    for key, value, match in (("embed_variant", "paper_c", "ours.embed_variant: expected one of"),
                              ("embed_noise_scale", -0.1, "ours.embed_noise_scale: expected a finite")):
        bad = denoise_demo.get_config()
        bad.ours[key] = value
        with pytest.raises(ValueError, match=match):
            denoise.check_config(bad)


def test_paper_ddpm_config_is_the_demo_with_the_papers_baseline():
    """denoise_demo_paper_ddpm changes only DDPM's optimiser settings (to the papers' baseline,
    the same as the CIFAR-10 config's), its caps, and both batches (8, as measured)."""
    from experiments.configs import denoise_cifar10, denoise_demo, denoise_demo_paper_ddpm

    paper = denoise_demo_paper_ddpm.get_config()
    assert set(eu.config_diff(denoise_demo.get_config(), paper)) == {
        "ddpm.train.lr", "ddpm.train.warmup_steps", "ddpm.train.ema_decay", "ddpm.train.num_steps",
        "ddpm.train.budget_seconds", "ours.train.batch_size", "ddpm.train.batch_size"}
    assert paper.ours.train.batch_size == paper.ddpm.train.batch_size == 8
    ddpm = paper.ddpm.train
    assert (ddpm.lr, ddpm.warmup_steps, ddpm.ema_decay) == (2e-4, 5000, 0.9999)
    cifar = denoise_cifar10.get_config().ddpm.train
    for k in ("lr", "warmup_steps", "ema_decay", "ddpm_num_steps", "ddpm_beta_start", "ddpm_beta_end"):
        assert ddpm[k] == cifar[k], k


def test_batches_are_per_method_and_any_batch_gets_a_mesh():
    """The demo and the budget demo tune each method's batch (ours 1, DDPM 2); configs that share
    one batch set both; a one-image run trains on the first gcd(batch, devices) devices."""
    import jax

    from experiments import denoise
    from experiments.configs import budget_demo, denoise_celeba128, denoise_cifar10, denoise_demo

    cfg = denoise_demo.get_config()
    assert "batch_size" not in cfg.common
    assert [denoise.train_config(cfg, m).batch_size for m in ("ours", "ddpm")] == [1, 2]
    # the budget demo's batches and learning rates, tuned for the budget on three photos
    bud = budget_demo.get_config()
    assert [(denoise.train_config(bud, m).batch_size, denoise.train_config(bud, m).lr)
            for m in ("ours", "ddpm")] == [(1, 2e-3), (2, 5e-4)]
    for mod, b in ((denoise_cifar10, 16), (denoise_celeba128, 8)):
        c = mod.get_config()
        assert [denoise.train_config(c, m).batch_size for m in ("ours", "ddpm")] == [b, b]
    n = jax.device_count()
    assert n == 4  # tests/conftest.py forces 4 CPU devices
    for b, want in ((1, 1), (2, 2), (3, 1), (6, 2), (8, 4)):
        mesh = denoise.batch_mesh(b)
        assert mesh.size == want and list(mesh.devices.flat) == jax.devices()[:want]


def test_demo128_config_is_the_demo_at_128_with_four_levels():
    """denoise_demo128 changes only the size, the target, the U-Net's depth, the evaluation cadence
    and the caps (the batches and learning rates are the demo's, as measured); its config is
    valid, the photo loads at 128x128 and fits the U-Net, whose middle attention then runs at
    16x16."""
    from experiments import denoise
    from experiments.configs import denoise_demo, denoise_demo128
    from krylovjax import training

    cfg = denoise_demo128.get_config()
    assert set(eu.config_diff(denoise_demo.get_config(), cfg)) == {
        "data.size", "targets", "common.model_overrides.ch_mult", "common.eval_every",
        "ours.train.num_steps", "ddpm.train.num_steps"}
    assert (cfg.ours.train.batch_size, cfg.ddpm.train.batch_size) == (1, 2)  # as measured
    assert (cfg.ours.train.lr, cfg.ddpm.train.lr) == (1e-3, 1.25e-4)
    assert (cfg.data.size, tuple(cfg.targets)) == (128, (0.90,))
    denoise.check_config(cfg)
    clean = denoise.load_clean(cfg.data)
    assert clean.shape == (1, 3, 128, 128)
    tcs = {m: denoise.train_config(cfg, m) for m in cfg.methods}
    denoise.check_fits(tcs, clean, 1)
    mc = training.model_config(tcs["ours"], tuple(clean.shape[1:]), 1)
    middle = mc.image_size // 2 ** (len(mc.ch_mult) - 1)  # the resolution of the middle block
    assert len(mc.ch_mult) == 4 and middle == 16 and middle in mc.attn_resolutions


def test_denoise_binary_reports_bad_target(tmp_path):
    wd = tmp_path / "w"
    proc = _run("experiments.denoise", ["--config=experiments/configs/denoise_demo.py", f"--workdir={wd}",
                                        "--config.targets=(1.5,)"], timeout=120)
    assert proc.returncode != 0
    assert "targets[0]: expected an SSIM target in (0, 1], got 1.5" in proc.stderr
    assert not wd.exists()


def test_generate_from_train_run(denoise_run, tmp_path, monkeypatch):
    wd, _ = denoise_run
    out = tmp_path / "gen"
    proc = _run("experiments.generate", [f"--workdir={wd}/ours", f"--outdir={out}", "--num_samples=2",
                                         "--num_frames=3", "--num_steps=4", "--sampler=paper_a",
                                         "--reference=builtin:chelsea"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for f in ("samples.png", "samples.json", "samples.md", "samples.npy"):
        assert os.path.isfile(out / f)
    res = json.load(open(out / "samples.json"))
    # the samples themselves: the array (until the thirty-third session only the figure had them)
    # and one 8-bit PNG each, which the array rounds to
    from PIL import Image

    arr = np.load(out / "samples.npy")
    assert arr.shape == (2, 3, 16, 16) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert sorted(os.listdir(out / "samples")) == ["sample_000.png", "sample_001.png"]
    for k in range(2):
        png = np.asarray(Image.open(out / "samples" / f"sample_{k:03d}.png"))
        assert png.shape == (16, 16, 3) and png.dtype == np.uint8
        np.testing.assert_array_equal(png, np.round(arr[k].transpose(1, 2, 0) * 255).astype(np.uint8))
        assert res["samples"][k]["mean"] == pytest.approx(float(arr[k].mean()), abs=1e-6)
    for k in ("settings", "method", "sde", "network_evals", "samples", "shape"):
        assert k in res
    assert res["method"] == "ours" and res["shape"] == [2, 3, 16, 16]
    assert res["settings"]["sampler"] == "paper_a" and res["network_evals"] == 4
    for s in res["samples"]:
        assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 1 and -1 <= s["ssim_to_nearest"] <= 1
    assert res["settings"]["step"] == 3
    best = [s["ssim_to_nearest"] for s in res["samples"]]
    assert res["summary"] == {"ssim_to_nearest_mean": pytest.approx(np.mean(best)),
                              "ssim_to_nearest_se": pytest.approx(abs(best[0] - best[1]) / 2),  # two samples
                              "samples_per_reference": [2], "references_covered": 1}
    assert f"mean over the 2 samples: {np.mean(best):.4f}" in open(out / "samples.md").read()
    # the same outdir with other settings, or again without --overwrite: refused, nothing changed
    from experiments import generate

    before = _snapshot(str(out))
    with pytest.raises(ValueError, match=r"another run's config \(differs at: num_samples\)"):
        generate.run(f"{wd}/ours", str(out), num_samples=3, num_frames=3, num_steps=4, sampler="paper_a",
                     reference="builtin:chelsea")
    with pytest.raises(ValueError, match="already holds these samples"):
        generate.run(f"{wd}/ours", str(out), num_samples=2, num_frames=3, num_steps=4, sampler="paper_a",
                     reference="builtin:chelsea")
    with pytest.raises(ValueError, match="num_frames"):
        generate.run(f"{wd}/ours", str(tmp_path / "g2"), num_frames=1)
    with pytest.raises(ValueError, match="reference_count: expected an int >= 0, got -1"):
        generate.run(f"{wd}/ours", str(tmp_path / "g2"), reference="builtin", reference_count=-1)
    # a bad reference source is refused before any sampling
    def no_sampling(*a, **k):
        raise AssertionError("sampled before the reference was checked")

    monkeypatch.setattr(generate, "sample", no_sampling)
    with pytest.raises(ValueError, match="reference: 'builtin:nosuch': name must be one of"):
        generate.run(f"{wd}/ours", str(tmp_path / "g3"), num_samples=2, num_frames=3, num_steps=4,
                     sampler="paper_a", reference="builtin:nosuch")
    with pytest.raises(FileNotFoundError, match="step: no checkpoint for step 7"):
        generate.run(f"{wd}/ours", str(tmp_path / "g3"), step=7)
    assert not os.path.exists(tmp_path / "g3")  # refused before the output directory was claimed
    with pytest.raises(FileNotFoundError, match="step: no checkpoint for step 7"):  # not "another run's config"
        generate.run(f"{wd}/ours", str(out), num_samples=2, num_frames=3, num_steps=4, sampler="paper_a", step=7)
    with pytest.raises(ValueError, match=f"outdir: '{out}' holds another run's config .*use another --outdir, or "
                                         "--fresh to move it to"):
        generate.run(f"{wd}/ours", str(out), num_samples=2, num_frames=3, num_steps=5, sampler="paper_a")
    assert _snapshot(str(out)) == before
    # --fresh over the training run itself (or a directory holding it): refused, the run intact
    run_before = _snapshot(f"{wd}/ours")
    for outdir in (f"{wd}/ours", str(wd)):
        with pytest.raises(eu.WorkdirConflictError, match="holds the training run it samples from .* --fresh would "
                                                          "move it aside: use another --outdir"):
            generate.run(f"{wd}/ours", outdir, num_samples=2, num_frames=3, num_steps=4, sampler="paper_a",
                         fresh=True)
    assert _snapshot(f"{wd}/ours") == run_before and not os.path.exists(f"{wd}.prev")


def test_generate_samples_in_another_compute_dtype(denoise_run, tmp_path):
    """``--compute_dtype``: the float32 model of the run sampled with its convolutions and matmuls
    in bfloat16 (the flag's use is the reverse, a bfloat16 TPU run sampled in float32; the
    library's equality with a model built in that dtype is in test_training). The same seed in
    float32 gives close samples, not the same; the dtype is recorded and is part of the settings."""
    from experiments import generate

    wd, _ = denoise_run
    kw = dict(num_samples=2, num_frames=2, num_steps=4, sampler="paper_a")
    out = tmp_path / "bf16"
    proc = _run("experiments.generate", [f"--workdir={wd}/ours", f"--outdir={out}", "--num_samples=2",
                                         "--num_frames=2", "--num_steps=4", "--sampler=paper_a",
                                         "--compute_dtype=bfloat16"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    bf16 = json.load(open(out / "samples.json"))
    assert bf16["compute_dtype"] == "bfloat16" and bf16["settings"]["compute_dtype"] == "bfloat16"
    assert "4 network evaluations in bfloat16" in open(out / "samples.md").read()
    f32 = generate.run(f"{wd}/ours", str(tmp_path / "f32"), **kw)  # the training's dtype
    assert f32["compute_dtype"] == "float32" and f32["settings"]["compute_dtype"] == "model"
    a, b = np.load(out / "samples.npy"), np.load(tmp_path / "f32" / "samples.npy")
    assert 0 < np.abs(a - b).max() < 0.05, np.abs(a - b).max()
    before = _snapshot(str(out))
    with pytest.raises(ValueError, match=r"another run's config \(differs at: compute_dtype\)"):
        generate.run(f"{wd}/ours", str(out), **kw)
    with pytest.raises(ValueError, match="already holds these samples"):
        generate.run(f"{wd}/ours", str(out), compute_dtype="bfloat16", **kw)
    assert _snapshot(str(out)) == before
    bad = _run("experiments.generate", [f"--workdir={wd}/ours", f"--outdir={tmp_path / 'bad'}",
                                        "--compute_dtype=int8"], timeout=120)
    assert bad.returncode != 0 and "compute_dtype" in bad.stderr and not (tmp_path / "bad").exists()


def test_restore_reproduces_the_denoise_runs_outputs(denoise_run, tmp_path):
    """``experiments.restore`` on the denoise run's two models, given the run's noisy input
    (``--add_noise`` = its noise std and seed), against the denoise experiment's own denoisers:
    DDPM (ancestral, the run's ``eval_seed`` 1) gives the run's final SSIM, PSNR and number of
    network evaluations; ours with ``flow`` (no Tweedie step) gives what
    ``experiments.denoise.ours_denoiser`` gives with ``ours.sampler.kind = "flow"`` (the demo
    config's sampler; this run used ``paper_a`` to compile faster), computed here."""
    from experiments import denoise
    from experiments.configs import denoise_demo
    from krylovjax import metrics, training
    from krylovjax.data import load_images

    wd, _ = denoise_run
    ref = load_images("builtin:chelsea", size=16)
    final = json.load(open(os.path.join(wd, "results.json")))["methods"]["ddpm"]["final"]
    fn = training.load_score_fn(f"{wd}/ours")
    cfg = denoise_demo.get_config()
    noisy = denoise.noisy_input(cfg, ref)
    x, _, nfe = denoise.ours_denoiser(cfg, fn.config, noisy)(fn)
    ours = {"ssim": float(metrics.ssim(x, ref)[0]), "psnr": float(metrics.psnr(x, ref)[0]), "network_evals": nfe}
    # (--compute_dtype=float32, the model's own: the flag reaches run(), and is recorded as the
    # default "model", the same run (a review: it was refused against the default); its effect
    # is tested in test_training and test_generate_samples_in_another_compute_dtype)
    for method, extra, want in (("ours", ["--sampler=flow", "--final_denoise=false", "--compute_dtype=float32"], ours),
                                ("ddpm", ["--seed=1"], final)):
        out = tmp_path / method
        proc = _run("experiments.restore", [f"--workdir={wd}/{method}", "--input=builtin:chelsea", "--add_noise=0.506",
                                            f"--outdir={out}", "--num_frames=3", *extra])
        assert proc.returncode == 0, proc.stderr[-4000:]
        res = json.load(open(out / "restore.json"))
        assert res["settings"]["compute_dtype"] == "model" and res["compute_dtype"] == "float32"
        (rec,) = res["images"]
        assert rec["ssim_output"] == pytest.approx(want["ssim"], abs=1e-4), method
        assert rec["psnr_output"] == pytest.approx(want["psnr"], abs=1e-2), method
        assert res["network_evals"] == want["network_evals"], method
        np.testing.assert_array_equal(np.load(out / "noisy.npy"), noisy)
        den = np.load(out / "denoised.npy")
        assert den.shape == (1, 3, 16, 16)
        assert float(metrics.ssim(den, ref)[0]) == pytest.approx(rec["ssim_output"], abs=1e-6)
        assert str(out / "restore.md") in proc.stdout
        assert os.path.isfile(out / "denoised" / "000.png") and os.path.isfile(out / "restore.png")
        # the run's one training photo is said, and the classical baseline given beside the model
        assert res["trained_images"] == 1 and "this model was trained on 1 image" in proc.stderr
        assert "trained on 1 image; it has learnt that image" in open(out / "restore.md").read()
        assert np.load(out / "baseline.npy").shape == (1, 3, 16, 16) and 0 < rec["ssim_baseline"] < 1
    # a bad flag: one line, nothing created
    bad = tmp_path / "bad"
    proc = _run("experiments.restore", [f"--workdir={wd}/ours", "--input=builtin:chelsea", "--noise_std=-1",
                                        f"--outdir={bad}"])
    assert proc.returncode != 0 and "noise_std: expected a finite noise level > 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr and not bad.exists()


def test_budget_smoke_and_bad_budget(tmp_path):
    from experiments import budget
    from experiments.configs import budget_demo

    wd = str(tmp_path / "b")
    # One image without per-image offsets: the training and sampling programs are those of the
    # denoise smoke run (the compilation cache serves them); the per-image path of the denoiser
    # is tested in-process (test_ours_denoiser_passes_image_indices).
    args = ["--config=experiments/configs/budget_demo.py", f"--workdir={wd}", *TINY,
            "--config.data.kwargs.num_images=1", "--config.ours.train.per_image_offset=False",
            "--config.budget_seconds=3"]
    proc = _run("experiments.budget", args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for f in ("results.md", "results.json", "grid.png"):
        assert os.path.isfile(os.path.join(wd, f))
    out = json.load(open(os.path.join(wd, "results.json")))
    for k in ("experiment", "task", "budget_seconds", "machine", "images", "budget_convention", "methods"):
        assert k in out
    assert out["budget_seconds"] == 3 and out["images"]["shape"] == [1, 3, 16, 16]
    assert out["noise"] == {"std": 0.506, "seed": 0, "signal_scale": 1.0, "draws": 1}
    for m in ("ours", "ddpm"):
        r = out["methods"][m]
        assert r["stop_reason"] == "budget" and r["steps"] >= 1 and r["resumed_from"] is None
        # it stops at the first step past its budget: used <= budget + one step
        assert r["train_budget_seconds"] - 1e-9 <= r["train_seconds"] <= r["train_budget_seconds"] + 3 * r["seconds_per_step"] + 1.0
        assert len(r["ssim_per_image"]) == 1 and r["ssim"] == pytest.approx(np.mean(r["ssim_per_image"]))
    o = out["methods"]["ours"]
    assert o["train_budget_seconds"] == pytest.approx(3 - o["precompute_seconds"] - o["embed_seconds"])
    # Killed before results.json: the rerun redoes ours' pre-computation but charges the first
    # run's times (ours/budget_prep.json), so its training budget, and every step, stay the same.
    import ml_collections

    os.remove(os.path.join(wd, "results.json"))
    again = budget.run(ml_collections.ConfigDict(json.load(open(os.path.join(wd, "experiment.json")))["config"]), wd)
    for m in ("ours", "ddpm"):
        keep = ("steps", "train_seconds", "train_budget_seconds", "precompute_seconds", "embed_seconds")
        assert {k: again["methods"][m][k] for k in keep} == {k: out["methods"][m][k] for k in keep}
        assert again["methods"][m]["resumed_from"] == out["methods"][m]["steps"]  # it says it took them up
        # the same weights, evaluated in this process instead of the binary's (float32 rounding)
        assert again["methods"][m]["ssim"] == pytest.approx(out["methods"][m]["ssim"], abs=1e-5)
    # a budget of zero (or below), and another config in this workdir: errors, nothing changed
    before = _snapshot(wd)
    for bad in (0.0, -3.0):
        cfg = budget_demo.get_config()
        cfg.budget_seconds = bad
        with pytest.raises(ValueError, match="budget_seconds: expected a finite number of seconds > 0"):
            budget.run(cfg, wd)
    cfg = budget_demo.get_config()
    with pytest.raises(ValueError, match="another run's config"):
        budget.run(cfg, wd)
    assert _snapshot(wd) == before


def test_budget_conditional_config_is_paper_b_conditional_start():
    """budget_conditional's input, divided by w, is Paper B's conditional start w clean + (1 - w)
    sigma z (method.md 6) for the same z; ours' SDE and DDPM's schedule both reach its noise level,
    ours below t = 1 (its prior's level lambda(1))."""
    from experiments import budget, denoise
    from experiments.configs import budget_conditional as bc
    from krylovjax import ddpm, sampling

    cfg = bc.get_config()
    budget.check_budget_config(cfg)
    sigma = cfg.ours.train.sde_kwargs.sigma
    assert (cfg.task, bc.W, sigma, cfg.noise.clamp) == ("denoise", 0.6, 2.0, False)
    clean = np.random.default_rng(3).uniform(0.0, 1.0, (3, 3, 8, 8))
    z = np.random.default_rng(cfg.noise.seed).standard_normal(clean.shape)
    start = bc.W * clean + (1.0 - bc.W) * sigma * z
    np.testing.assert_allclose(eu.noisy_copy(clean, cfg.noise.std, cfg.noise.seed, clamp=cfg.noise.clamp),
                               start / bc.W, rtol=0, atol=1e-12)
    ours = denoise.train_config(cfg, "ours")
    sde = ours.make_sde()
    t_star = float(sampling.start_time(sde, cfg.noise.std))
    assert 0.89 < t_star < 0.90 and abs(float(sde.perturbation_std(t_star)) - 4.0 / 3.0) < 1e-9
    sched = denoise.train_config(cfg, "ddpm").ddpm_schedule()
    k = int(ddpm.denoise_start_step(2.0 * cfg.noise.std, schedule=sched))
    abar = float(sched.alpha_bars[k])
    assert 0 < k < len(sched.alpha_bars) - 1 and abs(math.sqrt((1 - abar) / abar) / (8.0 / 3.0) - 1) < 0.01
    assert cfg.ours.sampler.kind == "denoise" and cfg.ddpm.train.ddpm_max_train_step is None


def test_budget_conditional_literal_config_is_paper_b_code():
    """The literal form: the input is w clean + (1 - w) sigma z itself (the matched config's input
    times w, the same z), ours starts it at t = 1, DDPM at the top of its chain, outputs min-max
    normalised; the networks' configs are the matched config's."""
    from experiments import budget, denoise
    from experiments.configs import budget_conditional as bc
    from experiments.configs import budget_conditional_literal as bl

    cfg, matched = bl.get_config(), bc.get_config()
    budget.check_budget_config(cfg)
    clean = np.random.default_rng(3).uniform(0.0, 1.0, (3, 3, 8, 8))
    z = np.random.default_rng(cfg.noise.seed).standard_normal(clean.shape)
    sigma = cfg.ours.train.sde_kwargs.sigma
    np.testing.assert_allclose(denoise.noisy_input(cfg, clean), bc.W * clean + (1 - bc.W) * sigma * z,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(denoise.noisy_input(cfg, clean), bc.W * denoise.noisy_input(matched, clean),
                               rtol=0, atol=1e-12)
    assert abs(denoise.matched_std(cfg) - matched.noise.std) < 1e-12
    assert (cfg.ours.sampler.kind, cfg.ours.sampler.t_start, cfg.ddpm.sampler.start, cfg.normalise) == (
        "flow", 1.0, "top", "minmax")
    for m in ("ours", "ddpm"):
        assert denoise.train_config(cfg, m) == denoise.train_config(matched, m)
    denoise.check_ddpm_range(cfg, denoise.train_config(cfg, "ddpm"))


def test_budget_generate_task_records_the_quality_curve(tmp_path, monkeypatch):
    """task="generate" with common.eval_every > 0: both methods generate at every evaluation and
    at the end; the curve in results.json has one point per evaluation, its seconds are the
    budget used (ours: pre-computation and embedding included), its last point is the reported
    score, and results.md / quality_curve.png show it; with more samples than grid.png shows, the
    grid holds the first GRID_PANELS and results.md their range, and both report the standard
    error and how many samples are nearest each source."""
    from experiments import budget
    from experiments.configs import budget_generate

    cfg = budget_generate.get_config()
    cfg.data.size = 16
    cfg.data.kwargs.num_images = 2
    cfg.common.model_overrides.update(ch=8, ch_mult=(1,), attn_resolutions=())
    cfg.common.eval_every = 2
    cfg.ours.precompute.update(num_steps=3, max_sweeps=2)
    cfg.ddpm.train.ddpm_num_steps = 20
    cfg.ours.train.num_steps = cfg.ddpm.train.num_steps = 5  # the step cap stops first
    cfg.budget_seconds = 600.0
    cfg.samples_per_image = 7  # 14 samples: more than grid.png and the table show one by one
    grids, image_grid = [], eu.image_grid

    def record(path, rows, **kw):
        grids.append((rows, kw.get("title")))
        image_grid(path, rows, **kw)

    monkeypatch.setattr(eu, "image_grid", record)
    assert 2 * cfg.samples_per_image > budget.GRID_PANELS
    wd = str(tmp_path / "g")
    out = budget.run(cfg, wd)
    assert out["task"] == "generate" and out["noisy"] is None
    for m, r in out["methods"].items():
        assert r["stop_reason"] == "num_steps" and r["steps"] == 5
        assert [c["step"] for c in r["curve"]] == [2, 4, 5]
        secs = [c["seconds"] for c in r["curve"]]
        assert secs == sorted(secs) and secs[-1] == pytest.approx(r["used_seconds"])
        assert r["curve"][-1]["ssim"] == pytest.approx(r["ssim"]) and len(r["ssim_per_image"]) == 14
        assert len(r["nearest_source"]) == 14 and r["sources_covered"] == len(set(r["nearest_source"]))
        assert r["samples_per_source"] == np.bincount(r["nearest_source"], minlength=2).tolist()
        assert r["curve"][-1]["sources_covered"] == r["sources_covered"]
        assert r["ssim_se"] == pytest.approx(np.std(r["ssim_per_image"], ddof=1) / np.sqrt(14))
        assert all("ssim_se" in c for c in r["curve"]) and r["curve"][-1]["ssim_se"] == pytest.approx(r["ssim_se"])
    o = out["methods"]["ours"]
    assert o["curve"][0]["seconds"] > o["precompute_seconds"] + o["embed_seconds"] > 0
    assert out["methods"]["ddpm"]["network_evals"] == 20  # the ancestral chain from step T - 1
    text = open(os.path.join(wd, "results.md")).read()
    assert "Quality during training" in text and "generated samples" in text
    v = np.asarray(o["ssim_per_image"])
    assert (f"| {o['ssim']:.4f} | {o['ssim_se']:.4f} | 14 values: min {v.min():.3f}, median {np.median(v):.3f}, "
            f"max {v.max():.3f} | {o['psnr']:.2f} | {o['sources_covered']} of 2 | "
            f"{o['samples_per_source'][0]}, {o['samples_per_source'][1]} |") in text
    c = o["curve"][0]
    assert f"| {c['ssim']:.4f} | {c['ssim_se']:.4f} | {c['psnr']:.2f} | {c['sources_covered']} |" in text
    for f in budget.RESULT_FILES:
        assert os.path.isfile(os.path.join(wd, f)), f
    # grid.png: the sources' row, then the first GRID_PANELS of the 14 samples of each method
    rows, title = grids[-1]
    assert [len(r) for r in rows] == [2, budget.GRID_PANELS, budget.GRID_PANELS]
    assert title.endswith(f"the first {budget.GRID_PANELS} of 14 samples")


def test_generate_eval_scores_samples_against_their_sources():
    """Without image indices a sample counts against the source most similar to it (SSIM); with
    them, against its own; the metrics are those of experiments.denoise.image_metrics."""
    from experiments import budget, denoise
    from krylovjax import metrics

    rng = np.random.default_rng(3)
    clean = rng.uniform(0.0, 1.0, (3, 3, 16, 16)).astype(np.float32)
    order = np.array([2, 0, 2, 1])
    samples = np.clip(clean[order] + 0.05 * rng.standard_normal((4, 3, 16, 16)), 0, 1).astype(np.float32)

    def gen(fn, return_trajectory=False):
        return samples, None, 7

    last = {}
    res = budget.make_generate_eval_fn(gen, clean, None, last)(None, 4)
    np.testing.assert_array_equal(last["pairs"], clean[order])
    np.testing.assert_array_equal(last["nearest"], order)
    want = denoise.image_metrics(samples, clean[order])
    s = np.asarray(want["ssim_per_image"])
    # the standard error by hand: sample standard deviation over sqrt(4)
    se = math.sqrt(sum((x - s.mean()) ** 2 for x in s) / 3) / 2
    want.update(sources_covered=3, ssim_se=pytest.approx(se, rel=1e-12), samples_per_source=[1, 1, 2])
    assert res == {**{k: want[k] for k in ("ssim", "global_ssim", "ssim_uniform", "psnr", "sources_covered")},
                   "ssim_se": want["ssim_se"]}
    assert last["metrics"] == want
    assert last["step"] == 4 and last["network_evals"] == 7
    # the nearest source's SSIM is each sample's best over all sources
    s_all = np.array([[float(metrics.ssim(samples[k][None], clean[j][None])[0]) for j in range(3)] for k in range(4)])
    np.testing.assert_allclose(want["ssim_per_image"], s_all.max(axis=1), rtol=1e-6)
    idx = np.array([0, 1, 2, 0])  # given sources: scored against them, not the nearest
    budget.make_generate_eval_fn(gen, clean, idx, last)(None, 5)
    np.testing.assert_array_equal(last["pairs"], clean[idx])
    assert last["metrics"]["ssim"] < want["ssim"] and last["metrics"]["sources_covered"] == 3
    samples = np.repeat(samples[:1], 4, axis=0)  # every sample copies source 2: one source covered
    assert budget.make_generate_eval_fn(gen, clean, None, last)(None, 6)["sources_covered"] == 1
    np.testing.assert_array_equal(last["nearest"], [2, 2, 2, 2])
    assert last["metrics"]["samples_per_source"] == [0, 0, 4] and last["metrics"]["ssim_se"] == 0.0
    samples = samples[:1]  # one sample: no standard error, none in the curve point
    assert "ssim_se" not in budget.make_generate_eval_fn(gen, clean, None, last)(None, 7)
    assert last["metrics"]["ssim_se"] is None and last["metrics"]["samples_per_source"] == [0, 0, 1]


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_budget_generator_returns_the_image_of_an_exact_model_and_compiles_once(method):
    """DDPM's exact epsilon of one training image: the sampler of ddpm.sampler.method (the
    ancestral chain, or DDIM with all T steps) ends at that image from any noise, so every sample
    scores SSIM 1; two models (Partials with their weights) share one compiled sampler."""
    import jax
    import jax.numpy as jnp

    from experiments import budget, denoise
    from experiments.configs import budget_generate

    cfg = budget_generate.get_config()
    cfg.ddpm.train.ddpm_num_steps = 50
    cfg.samples_per_image = 2
    cfg.ddpm.sampler.method = method
    tc = denoise.train_config(cfg, "ddpm")
    sched = tc.ddpm_schedule(dtype=jnp.float32)
    x0 = np.random.default_rng(0).uniform(0.1, 0.9, (1, 3, 16, 16)).astype(np.float32)
    y0 = jnp.asarray(2 * x0 - 1)

    def exact(shift, x, i):  # the exact epsilon of the one image 2 x0 - 1 + shift
        ab = sched.alpha_bars[i][:, None, None, None]
        return (x - jnp.sqrt(ab) * (y0 + shift)) / jnp.sqrt(1 - ab)

    gen, idx = budget.generator(cfg, tc, "ddpm", 1, (3, 16, 16))
    assert idx is None
    last = {}
    ev = budget.make_generate_eval_fn(gen, x0, idx, last)
    res = ev(jax.tree_util.Partial(exact, jnp.float32(0.0)), 1)
    assert last["out"].shape == (2, 3, 16, 16) and last["network_evals"] == 50
    np.testing.assert_allclose(last["out"], np.broadcast_to(x0, (2, 3, 16, 16)), atol=1e-5)
    assert res["ssim"] == pytest.approx(1.0, abs=1e-5)
    ev(jax.tree_util.Partial(exact, jnp.float32(-0.4)), 2)  # other weights: the same program
    assert gen.jitted._cache_size() == 1
    np.testing.assert_allclose(last["out"], np.broadcast_to(np.clip(x0 - 0.2, 0, 1), (2, 3, 16, 16)), atol=1e-5)


def test_budget_generator_ours_final_denoise_lands_on_the_image_of_an_exact_score():
    """Ours' generator with the exact VE score of one image: the probability flow ends at t = 1e-3
    with lambda(1e-3) of noise left; Tweedie's last step (``final_denoise``, the default) lands on
    the image (SSIM 1) for one more network evaluation."""
    import jax
    import jax.numpy as jnp

    from experiments import budget, denoise
    from experiments.configs import budget_generate

    cfg = budget_generate.get_config()
    assert cfg.final_denoise is True
    cfg.samples_per_image = 2
    tc = denoise.train_config(cfg, "ours")
    sde = tc.make_sde()
    x0 = np.random.default_rng(1).uniform(0.1, 0.9, (1, 3, 16, 16)).astype(np.float32)

    def exact(shift, x, t, idx=None):  # the exact score of the one image x0 + shift
        lam = jax.vmap(sde.perturbation_std)(t)[:, None, None, None]
        return -(x - (jnp.asarray(x0) + shift)) / lam**2

    outs, evals = {}, {}
    for fd in (True, False):
        cfg.final_denoise = fd
        gen, idx = budget.generator(cfg, tc, "ours", 1, (3, 16, 16))
        last = {}
        res = budget.make_generate_eval_fn(gen, x0, idx, last)(jax.tree_util.Partial(exact, jnp.float32(0.0)), 1)
        outs[fd], evals[fd] = np.asarray(last["out"]), int(last["network_evals"])
        if fd:
            assert res["ssim"] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(outs[True], np.broadcast_to(x0, (2, 3, 16, 16)), atol=1e-5)
    assert np.abs(outs[False] - x0).max() > 1e-2  # the residual noise of t = 1e-3
    assert evals[True] == evals[False] + 1
    cfg.final_denoise = None
    with pytest.raises(ValueError, match="final_denoise: expected a bool"):
        budget.check_budget_config(cfg)


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_generate_ours_prior_is_the_forward_marginal_at_t1(sde_name):
    """Ours' probability flow (``experiments.generate.sample``) with the exact score of Gaussian
    data N(0.5, s0^2) per pixel gives back that Gaussian, for an SDE without drift (VE) and with
    one (VP). The marginal at t is N(alpha(t) 0.5, alpha(t)^2 s0^2 + lambda(t)^2); the flow keeps
    each value's standard score, so a prior centred at 0.5 instead of alpha(1) 0.5 (VP:
    alpha(1) = exp(-B(1)/2) = 0.0066, lambda(1) = 1) would move every sample by about
    0.5 s0 / lambda(1) (the code before 2026-12-06 did, for every SDE)."""
    import jax

    from experiments import generate
    from krylovjax import training

    s0 = 0.1
    tc = training.TrainConfig(method="ours", sde=sde_name,
                              sde_kwargs=(("sigma", 2.0),) if sde_name == "ve" else ())
    sde = tc.make_sde()

    def exact(x, t):
        a = sde.marginal_mean_coeff(t)[:, None, None, None]
        lam = sde.perturbation_std(t)[:, None, None, None]
        return -(x - 0.5 * a) / (a**2 * s0**2 + lam**2)

    # Without Tweedie's last step (a posterior mean, narrower than the data) the flow ends at
    # t_end = 1e-3 on the marginal there, N(alpha 0.5, alpha^2 s0^2 + lambda^2), scaled by the
    # prior's std ratio lambda(1) / sqrt(alpha(1)^2 s0^2 + lambda(1)^2) (0.998 for VE, 1.0 for VP).
    out, _, _ = generate.sample(exact, tc, (8, 1, 16, 16), jax.random.PRNGKey(3), sampler="ode",
                                final_denoise=False)
    v = np.asarray(out, np.float64).ravel()  # 2048 independent pixels; clipping at [0, 1] is 5 s0 away
    t_end, t1 = np.asarray([generate.T_END]), np.asarray([1.0])
    a_end, lam_end = float(sde.marginal_mean_coeff(t_end)[0]), float(sde.perturbation_std(t_end)[0])
    a1, lam1 = float(sde.marginal_mean_coeff(t1)[0]), float(sde.perturbation_std(t1)[0])
    std = math.hypot(a_end * s0, lam_end) * lam1 / math.hypot(a1 * s0, lam1)
    assert abs(v.mean() - 0.5 * a_end) < 5 * std / math.sqrt(v.size), (v.mean(), 0.5 * a_end)
    assert abs(v.std() / std - 1.0) < 0.05, (v.std(), std)  # the std's standard error is 1.6%


@pytest.mark.parametrize("method,sampler", [("ours", "ode"), ("ours", "sde"), ("ddpm", "ancestral")])
def test_generate_draws_the_same_samples_with_x64_on(method, sampler):
    """With JAX_ENABLE_X64=1 a loaded model's samples were other numbers (the prior and the noise
    drawn in float64: up to 1.0 apart; a walkthrough). They are drawn in the model's float32 now."""
    import jax
    import jax.numpy as jnp

    from experiments import generate
    from krylovjax import training

    centres = np.random.default_rng(4).uniform(0.2, 0.8, (1, 1, 8, 8)).astype(np.float32)
    if method == "ours":
        tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)

        def fn(x, t, idx=None):
            return (jnp.asarray(centres, x.dtype) - x) / (tc.make_sde().perturbation_std(t)[:, None, None, None] ** 2 + 0.01)
    else:
        tc = training.TrainConfig(method="ddpm", ddpm_num_steps=40, per_image_offset=False)

        def fn(x, i, idx=None):
            ab = tc.ddpm_schedule(dtype=x.dtype).alpha_bars[i][:, None, None, None]
            return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * (2 * jnp.asarray(centres, x.dtype) - 1)) / (ab * 0.04 + 1 - ab)
    # a model as load_score_fn gives it: a Partial whose leaves are its float32 parameters
    model = jax.tree_util.Partial(lambda w, x, t, idx=None: fn(x, t, idx) * w, jnp.ones((), jnp.float32))
    out = {}
    for x64 in (False, True):
        with jax.enable_x64(x64):
            out[x64] = np.asarray(generate.sample(model, tc, (2, 1, 8, 8), jax.random.PRNGKey(3), sampler=sampler,
                                                  num_steps=20, num_frames=2)[0])
            # the same jitted with the model an input (budget's evaluation; a review: an attribute
            # of the function did not survive jit)
            jitted = jax.jit(lambda m: generate.sample_arrays(m, tc, (2, 1, 8, 8), jax.random.PRNGKey(3),
                                                              sampler=sampler, num_steps=20, num_frames=2)[0])(model)
            np.testing.assert_allclose(np.asarray(jitted), out[x64], rtol=0, atol=1e-5)
    assert out[True].dtype == np.float32
    np.testing.assert_allclose(out[True], out[False], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, sampler", [("ours", "ode"), ("ours", "sde"), ("ours", "paper_a"),
                                             ("ddpm", "ancestral"), ("ddpm", "ddim")])
def test_generate_sample_k_does_not_depend_on_the_number_of_samples(method, sampler):
    """``--num_samples=5`` gives the 2 samples of ``--num_samples=2`` (same seed) and 3 more. Until
    the thirty-third session ours' ODE stepped the whole batch with one adaptive step size (an RMS
    error over all samples), so the first samples moved with the number asked for (by 1.4e-4 here);
    the stochastic samplers' draws already kept them (JAX's partitionable Threefry)."""
    import jax
    import jax.numpy as jnp

    from experiments import generate
    from krylovjax import training

    assert jax.config.jax_threefry_partitionable  # the draws' row independence rests on it
    centres = jnp.asarray(np.random.default_rng(4).uniform(0.2, 0.8, (3, 1, 8, 8)))
    if method == "ours":
        tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=True)
        sde = tc.make_sde()

        def fn(x, t, idx=None):  # the exact score of a mixture of three narrow Gaussians
            lam2 = sde.perturbation_std(t)[:, None, None, None, None] ** 2 + 0.01
            d2 = jnp.sum((x[:, None] - centres[None]) ** 2, axis=(2, 3, 4))
            w = jax.nn.softmax(-d2 / (2 * lam2[:, :, 0, 0, 0]), axis=1)[:, :, None, None, None]
            return jnp.sum(w * (centres[None] - x[:, None]), axis=1) / lam2[:, 0]
    else:
        tc = training.TrainConfig(method="ddpm", ddpm_num_steps=40, per_image_offset=True)
        sched = tc.ddpm_schedule(dtype=jnp.float64)

        def fn(x, i, idx=None):  # the exact epsilon of Gaussian data around the centres
            ab = sched.alpha_bars[i][:, None, None, None]
            mu = 2 * centres[jnp.asarray(idx) % 3] - 1
            return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * 0.04 + 1 - ab)
    kw = dict(sampler=sampler, num_steps=20, num_frames=3)
    few = generate.sample(fn, tc, (2, 1, 8, 8), jax.random.PRNGKey(7), idx=jnp.arange(2) % 3, **kw)
    many = generate.sample(fn, tc, (5, 1, 8, 8), jax.random.PRNGKey(7), idx=jnp.arange(5) % 3, **kw)
    np.testing.assert_allclose(np.asarray(many[0][:2]), np.asarray(few[0]), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(many[1][:, :2]), np.asarray(few[1]), rtol=0, atol=1e-9)
    assert float(np.max(np.abs(np.asarray(many[0][2:]) - np.asarray(many[0][:3])))) > 1e-3  # not one sample
    if sampler == "ode":  # the budget experiment's one step size for the batch, as its figures were made
        few_b = generate.sample(fn, tc, (2, 1, 8, 8), jax.random.PRNGKey(7), idx=jnp.arange(2) % 3,
                                step_control="batch", **kw)
        many_b = generate.sample(fn, tc, (5, 1, 8, 8), jax.random.PRNGKey(7), idx=jnp.arange(5) % 3,
                                 step_control="batch", **kw)
        assert float(np.max(np.abs(np.asarray(many_b[0][:2]) - np.asarray(few_b[0])))) > 1e-5


# ----------------------------------------------------------------------------------------------
def test_denoise_extra_samplers_rows_and_bad_values():
    """ddpm.sampler.extra_methods: one row per further sampler of the same network; the eval
    callback returns each sampler's metrics under its prefix and their minimum as the stop
    metric; bad entries and a budget run with extra samplers are refused, naming the key."""
    from experiments import budget, denoise
    from experiments.configs import budget_demo, denoise_demo

    cfg = denoise_demo.get_config()
    assert denoise.ddpm_rows(cfg) == {"ddpm": "ancestral", "ddim": "ddim"}
    assert denoise.train_config(cfg, "ddpm").target_metric == "min_ssim"
    assert denoise.train_config(cfg, "ours").target_metric == "ssim"
    cfg.ddpm.sampler.extra_methods = ()
    assert denoise.ddpm_rows(cfg) == {"ddpm": "ancestral"}
    assert denoise.train_config(cfg, "ddpm").target_metric == "ssim"
    cfg.ddpm.sampler.method, cfg.ddpm.sampler.extra_methods = "ddim", ("ancestral",)
    assert denoise.ddpm_rows(cfg) == {"ddpm": "ddim", "ddpm_ancestral": "ancestral"}
    cfg.ddpm.sampler.extra_methods = ("ddim",)  # the primary sampler already: no second row
    assert denoise.ddpm_rows(cfg) == {"ddpm": "ddim"}
    assert denoise.train_config(cfg, "ddpm").target_metric == "ssim"
    denoise.check_config(cfg)
    for bad in (("euler",), ("ancestral", "ancestral")):
        cfg.ddpm.sampler.extra_methods = bad
        with pytest.raises(ValueError, match="ddpm.sampler.extra_methods: expected distinct entries"):
            denoise.check_config(cfg)
    cfg = denoise_demo.get_config()
    cfg.ddpm.sampler.method = "euler"
    with pytest.raises(ValueError, match="ddpm.sampler.method: expected one of"):
        denoise.check_config(cfg)
    b = budget_demo.get_config()
    budget.check_budget_config(b)
    b.ddpm.sampler.extra_methods = ("ddim",)
    with pytest.raises(ValueError, match="ddpm.sampler.extra_methods: the budget run reports one"):
        budget.check_budget_config(b)

    clean = np.full((1, 3, 16, 16), 0.5)
    rng = np.random.default_rng(0)
    # in [0, 1], as the denoisers' normalised outputs (the metrics refuse other values)
    imgs = {"a": np.clip(clean + 0.01 * rng.standard_normal(clean.shape), 0, 1),
            "b": np.clip(clean + 0.2 * rng.standard_normal(clean.shape), 0, 1)}

    def fake(img):
        return lambda fn, return_trajectory=False: (img, np.stack([img, img]), 7)

    last_a, last_b = {}, {}
    ev = denoise.make_eval_fn(fake(imgs["a"]), clean, "ddpm", last_a, others={"ddim": (fake(imgs["b"]), last_b)})(None, 5)
    ma, mb = denoise.image_metrics(imgs["a"], clean), denoise.image_metrics(imgs["b"], clean)
    assert ev["ssim"] == ma["ssim"] and ev["ddim_ssim"] == mb["ssim"] and ev["ddim_psnr"] == mb["psnr"]
    assert ev["min_ssim"] == min(ma["ssim"], mb["ssim"]) == mb["ssim"] < ma["ssim"]
    assert ev["min_global_ssim"] == min(ma["global_ssim"], mb["global_ssim"])
    # Paper B's SSIM (scikit-image's default window) too, with its own stop metric
    assert ev["ddim_ssim_uniform"] == mb["ssim_uniform"] != mb["ssim"]
    assert ev["min_ssim_uniform"] == min(ma["ssim_uniform"], mb["ssim_uniform"])
    cfg = denoise_demo.get_config()
    cfg.metric = "ssim_uniform"
    denoise.check_config(cfg)
    assert denoise.train_config(cfg, "ddpm").target_metric == "min_ssim_uniform"
    assert denoise.train_config(cfg, "ours").target_metric == "ssim_uniform"
    assert last_a["step"] == last_b["step"] == 5 and np.array_equal(last_b["out"], imgs["b"])
    # the speed-up note names the baseline that missed the target
    sp, note = denoise._speedup({"seconds": 2.0, "cap_seconds": 8.0}, {"seconds": None, "cap_seconds": 10.0}, "DDIM")
    assert sp is None and note == ">= 5x (DDIM did not reach it within its cap)"
    assert denoise._speedup({"seconds": 2.0}, {"seconds": 7.0}, "DDIM") == (3.5, "")


# The denoisers, with exact model functions (analytic references)
# ----------------------------------------------------------------------------------------------


def _point_config(kind="paper_a"):
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.ddpm.train.ddpm_num_steps = 100
    cfg.num_frames = 4
    cfg.ours.sampler.kind = kind
    if kind == "paper_a":  # Paper A's literal sampler: t = 1 -> 0 in 50 steps, noise 0.1
        cfg.ours.train.sde_kwargs.std = 0.1
        cfg.ours.sampler.update(t_start=1.0, t_end=0.0, num_steps=50, noise_scale=0.1, clip=True)
    return cfg


def test_ddpm_denoiser_with_exact_epsilon_returns_the_image():
    """One training image x0: eps(x_k, i) = (x - sqrt(abar_i) y0) / sqrt(1 - abar_i), y0 = 2 x0 - 1,
    is the exact epsilon; every predicted x0 is y0, so the chain ends exactly at x0, and frame 0
    (the start state rescaled by 1 / sqrt(abar)) is the noisy input itself."""
    import jax.numpy as jnp

    from experiments import denoise

    cfg = _point_config()
    tc = denoise.train_config(cfg, "ddpm")
    sched = tc.ddpm_schedule(dtype=jnp.float64)
    x0 = np.random.default_rng(0).uniform(0.1, 0.9, (1, 3, 16, 16))
    noisy = eu.noisy_copy(x0, cfg.noise.std, 0)
    y0 = jnp.asarray(2 * x0 - 1)

    def eps_fn(x, i):
        ab = sched.alpha_bars[i][:, None, None, None]
        return (x - jnp.sqrt(ab) * y0) / jnp.sqrt(1 - ab)

    out, frames, nfe = denoise.ddpm_denoiser(cfg, tc, noisy)(eps_fn, return_trajectory=True)
    from krylovjax.ddpm import denoise_start_step

    start = int(denoise_start_step(2 * cfg.noise.std, schedule=sched))
    assert nfe == start + 1
    np.testing.assert_allclose(np.asarray(out), x0, atol=1e-10)
    assert frames.shape == (4, 1, 3, 16, 16)
    np.testing.assert_allclose(np.asarray(frames[0]), noisy, atol=1e-10)
    np.testing.assert_allclose(np.asarray(frames[-1]), x0, atol=1e-10)


@pytest.mark.parametrize("row", ["ours", "ddpm", "ddim"])
def test_denoisers_compile_once_for_all_weights(row):
    """Every evaluation of a training run hands the denoiser a model with new weights
    (training._eval_fn_for: a jax.tree_util.Partial holding them). The sampler is compiled at the
    first evaluation only (once the weights were closed-over constants and every evaluation
    compiled it again, until long runs failed with LLVM's "Cannot allocate memory"), and with
    other weights it gives what the same sampler gives run eagerly with those weights."""
    import jax
    import jax.numpy as jnp

    from experiments import denoise
    from krylovjax import training

    cfg = _point_config()
    cfg.ours.sampler.num_steps = 5
    cfg.common.model_overrides.update(ch=8, ch_mult=(1,), attn_resolutions=())
    m = "ours" if row == "ours" else "ddpm"
    tc = denoise.train_config(cfg, m)
    x0 = np.random.default_rng(2).uniform(0.2, 0.8, (1, 3, 16, 16)).astype(np.float32)
    noisy = eu.noisy_copy(x0, cfg.noise.std, 0).astype(np.float32)
    den = (denoise.ours_denoiser(cfg, tc, noisy) if m == "ours"
           else denoise.ddpm_denoiser(cfg, tc, noisy, "ddim" if row == "ddim" else "ancestral"))
    state, model_def = training.create_train_state(tc, (3, 16, 16))

    def model(seed):  # random weights (the initial last layer is zero: every output would be 0)
        leaves, tree = jax.tree.flatten(state.params)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        noisy_leaves = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
        return training._eval_fn_for(model_def, jax.tree.unflatten(tree, noisy_leaves), tc)

    fn1, fn2 = model(1), model(2)
    assert isinstance(fn1, jax.tree_util.Partial)
    out1, frames1, nfe1 = den(fn1, return_trajectory=True)
    out2, frames2, nfe2 = den(fn2, return_trajectory=True)
    assert den.jitted._cache_size() == 1  # one program for both sets of weights
    assert nfe1 == nfe2 > 0 and frames2.shape[0] == cfg.num_frames
    assert not np.allclose(np.asarray(out1), np.asarray(out2), atol=1e-4)  # the weights are an input
    eager = den(lambda x, t: fn2(x, t), return_trajectory=True)  # a plain callable: no jit
    np.testing.assert_allclose(np.asarray(out2), np.asarray(eager[0]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(frames2), np.asarray(eager[1]), atol=2e-5)
    assert jnp.asarray(out2).dtype == jnp.float32


def test_ours_paper_a_denoiser_with_exact_score_converges_as_predicted():
    """Score of N(x0, lambda^2) with Paper A's constant g = 0.5, lambda = 0.1: each step of the
    damped reverse SDE is e <- e - g^2 dt / lambda^2 e + 0.1 g sqrt(dt) z = e / 2 + sigma z with
    dt = 1/50, sigma = 0.1 * 0.5 * sqrt(0.02); no noise at the last step. So the error after 50
    steps is e_50 = e_49 / 2 with e_49 ~ N(0, sigma^2 / (1 - 1/4)) (the start is forgotten)."""
    import jax.numpy as jnp

    from experiments import denoise

    cfg = _point_config("paper_a")
    tc = denoise.train_config(cfg, "ours")
    x0 = np.random.default_rng(1).uniform(0.3, 0.7, (1, 3, 32, 32))
    noisy = eu.noisy_copy(x0, cfg.noise.std, 0)
    lam2 = 0.1**2

    def score_fn(x, t):
        return -(x - jnp.asarray(x0)) / lam2

    out, frames, nfe = denoise.ours_denoiser(cfg, tc, noisy)(score_fn, return_trajectory=True)
    assert nfe == 50
    err = np.asarray(out) - x0
    sigma = 0.1 * 0.5 * math.sqrt(0.02)
    want = 0.5 * sigma / math.sqrt(0.75)
    n = err.size
    assert abs(err.std() - want) < 5 * want / math.sqrt(2 * n)
    assert abs(err.mean()) < 5 * want / math.sqrt(n)
    np.testing.assert_allclose(np.asarray(frames[0]), noisy, atol=1e-12)
    np.testing.assert_allclose(np.asarray(frames[-1]), np.asarray(out), atol=1e-12)


def test_ours_ode_denoiser_with_exact_score_of_a_point_mass():
    """VE SDE, data = one image x0: the exact score at time t is -(x - x0) / lambda(t)^2 and the
    probability flow from t* (lambda(t*) = std) maps x0 + std z to x0 + lambda(t_end) z."""
    import jax.numpy as jnp

    from experiments import denoise

    cfg = _point_config("denoise")
    cfg.ours.train.sde = "ve"
    cfg.ours.train.sde_kwargs = {"sigma": 5.0}
    cfg.ours.sampler.method = "ode"
    cfg.ours.sampler.clip = False
    cfg.ours.sampler.t_end = 1e-3
    cfg.ours.sampler.rtol = cfg.ours.sampler.atol = 1e-7
    cfg.noise.clamp = False
    tc = denoise.train_config(cfg, "ours")
    sde = tc.make_sde()
    x0 = np.random.default_rng(2).uniform(0.3, 0.7, (1, 3, 16, 16))
    noisy = eu.noisy_copy(x0, cfg.noise.std, 0, clamp=False)

    def score_fn(x, t):
        lam = sde.perturbation_std(t)[:, None, None, None]
        return -(x - jnp.asarray(x0)) / lam**2

    out, _, _ = denoise.ours_denoiser(cfg, tc, noisy)(score_fn)
    z = (noisy - x0) / cfg.noise.std
    want = np.clip(x0 + float(sde.perturbation_std(jnp.asarray(1e-3))) * z, 0, 1)  # the clamp of the output
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)


def test_signal_scale_matched_denoisers_equal_the_divided_input():
    """With noise.signal_scale s the matched denoisers see noisy / s at noise level std / s: ours'
    "denoise" sampler and DDPM's matched chain give on s x0 + std z exactly what they give with
    s = 1 on x0 + (std / s) z (the same z), for exact model functions of one image."""
    import jax.numpy as jnp

    from experiments import denoise

    x0 = np.random.default_rng(4).uniform(0.2, 0.8, (2, 3, 8, 8))
    z = np.random.default_rng(0).standard_normal(x0.shape)
    outs = {}
    for s, std in ((0.6, 0.8), (1.0, 0.8 / 0.6)):
        cfg = _point_config("denoise")
        cfg.ours.train.sde, cfg.ours.train.sde_kwargs = "ve", {"sigma": 2.0}
        cfg.ours.sampler.update(method="ode", rtol=1e-6, atol=1e-6)
        cfg.noise.update(std=std, clamp=False, signal_scale=s, seed=0)
        cfg.ddpm.train.ddpm_num_steps = 1000  # reaches noise level 2 * 4/3 in [-1, 1]
        denoise.check_config(cfg)
        noisy = denoise.noisy_input(cfg, x0)
        np.testing.assert_allclose(noisy, s * x0 + std * z, atol=1e-14)
        tc = denoise.train_config(cfg, "ours")
        sde = tc.make_sde()

        def score_fn(x, t):
            return -(x - jnp.asarray(x0)) / sde.perturbation_std(t)[:, None, None, None] ** 2

        tcd = denoise.train_config(cfg, "ddpm")
        sched = tcd.ddpm_schedule(dtype=jnp.float64)

        def eps_fn(x, i):
            ab = sched.alpha_bars[i][:, None, None, None]
            return (x - jnp.sqrt(ab) * (2 * x0 - 1)) / jnp.sqrt(1 - ab)

        outs[s] = (np.asarray(denoise.ours_denoiser(cfg, tc, noisy)(score_fn)[0]),
                   np.asarray(denoise.ddpm_denoiser(cfg, tcd, noisy)(eps_fn)[0]))
    np.testing.assert_allclose(outs[0.6][0], outs[1.0][0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(outs[0.6][1], outs[1.0][1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(outs[0.6][1], x0, atol=1e-10)  # the exact epsilon ends at x0


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_ddpm_top_start_runs_the_whole_chain_from_the_input(method):
    """ddpm.sampler.start = "top": the whole chain (ancestral, or DDIM through all T steps) from
    x_T = 2 noisy - 1, with the same key; the output is min-max normalised with normalise="minmax"."""
    import jax
    import jax.numpy as jnp

    from experiments import denoise
    from krylovjax import ddpm

    cfg = _point_config()
    cfg.noise.update(std=0.8, clamp=False, signal_scale=0.6)
    cfg.ddpm.sampler.start = "top"
    cfg.ddpm.sampler.clip_x0 = False  # outputs outside [0, 1], which min-max brings back
    cfg.normalise = "minmax"
    denoise.check_config(cfg)
    tc = denoise.train_config(cfg, "ddpm")
    sched = tc.ddpm_schedule(dtype=jnp.float64)
    noisy = denoise.noisy_input(cfg, np.random.default_rng(5).uniform(0, 1, (2, 3, 8, 8)))

    def eps_fn(x, i):  # any smooth function of (x, i)
        return jnp.tanh(0.5 * x) * (1.0 + i[:, None, None, None] / 100.0)

    out, frames, nfe = denoise.ddpm_denoiser(cfg, tc, noisy, method=method)(eps_fn, return_trajectory=True)
    xT = 2.0 * jnp.asarray(noisy) - 1.0
    key = jax.random.PRNGKey(int(cfg.eval_seed))
    if method == "ancestral":
        r = ddpm.ddpm_ancestral_sample(eps_fn, xT, key, schedule=sched, variance="large")
    else:
        r = ddpm.ddim_sample(eps_fn, xT, schedule=sched, num_steps=100)
    y = (np.asarray(r.x) + 1.0) / 2.0
    assert y.min() < -0.1 and y.max() > 1.1
    lo, hi = y.min(axis=(1, 2, 3), keepdims=True), y.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(out), (y - lo) / (hi - lo), rtol=0, atol=1e-12)
    assert nfe == 100 and frames.shape[0] == cfg.num_frames
    np.testing.assert_allclose(np.asarray(frames[-1]), np.clip(y, 0, 1), rtol=0, atol=1e-12)  # frames: clipped


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_ddpm_prior_mix_start_is_paper_b_recipe_at_ddpm_scale(method):
    """ddpm.sampler.start = "prior_mix": DDPM's whole chain from x_T = w (2 clean - 1) + (1 - w) z,
    w = noise.signal_scale and z the noisy input's own draw (recovered here from the unclamped
    input), where the other starts give DDPM the noisy input itself."""
    import jax
    import jax.numpy as jnp

    from experiments import denoise
    from krylovjax import ddpm

    cfg = _point_config()
    cfg.noise.update(std=0.8, clamp=False, signal_scale=0.6, seed=7)
    clean = np.random.default_rng(5).uniform(0, 1, (2, 3, 8, 8))
    noisy = denoise.noisy_input(cfg, clean)
    for start in ("matched", "top"):
        cfg.ddpm.sampler.start = start
        assert denoise.ddpm_input(cfg, clean, noisy) is noisy
    cfg.ddpm.sampler.start = "prior_mix"
    denoise.check_config(cfg)
    z = (noisy - 0.6 * clean) / 0.8
    x_top = 0.6 * (2.0 * clean - 1.0) + 0.4 * z
    given = denoise.ddpm_input(cfg, clean, noisy)
    assert given.dtype == noisy.dtype
    np.testing.assert_allclose(2.0 * given - 1.0, x_top, rtol=0, atol=1e-12)
    tc = denoise.train_config(cfg, "ddpm")
    sched = tc.ddpm_schedule(dtype=jnp.float64)

    def eps_fn(x, i):  # any smooth function of (x, i)
        return jnp.tanh(0.5 * x) * (1.0 + i[:, None, None, None] / 100.0)

    out, _, nfe = denoise.ddpm_denoiser(cfg, tc, given, method=method)(eps_fn)
    if method == "ancestral":
        r = ddpm.ddpm_ancestral_sample(eps_fn, jnp.asarray(x_top), jax.random.PRNGKey(int(cfg.eval_seed)),
                                       schedule=sched, variance="large", clip_x0=(-1.0, 1.0))
    else:
        r = ddpm.ddim_sample(eps_fn, jnp.asarray(x_top), schedule=sched, num_steps=100, clip_x0=(-1.0, 1.0))
    assert nfe == 100
    np.testing.assert_allclose(np.asarray(out), np.clip((np.asarray(r.x) + 1.0) / 2.0, 0, 1), rtol=0, atol=1e-12)
    # the whole chain: the network must know every step
    cfg.ddpm.train.ddpm_max_train_step = 99
    with pytest.raises(ValueError, match="start = 'prior_mix' runs the whole chain.*expected None or 100, got 99"):
        denoise.check_ddpm_range(cfg, denoise.train_config(cfg, "ddpm"))
    # a mix needs a share of the image in (0, 1)
    cfg.noise.signal_scale = 1.0
    with pytest.raises(ValueError, match=r"noise.signal_scale: ddpm.sampler.start = 'prior_mix'.*\(0, 1\), got 1.0"):
        denoise.check_config(cfg)


def test_budget_records_ddpm_prior_mix_start(tmp_path):
    """The budget binary with ddpm.sampler.start = "prior_mix" gives DDPM the recipe's start, says so
    in results.md and records that start's SSIM; DDPM alone, in-process, a 2 s budget."""
    from experiments import budget, denoise
    from experiments.configs import budget_conditional_literal

    cfg = budget_conditional_literal.get_config()
    cfg.data.size = 16
    cfg.data.kwargs.num_images = 1
    cfg.common.model_overrides.update(ch=8, ch_mult=(1,), attn_resolutions=())
    cfg.ddpm.train.update(batch_size=2, ddpm_num_steps=100)
    cfg.num_frames = 3
    cfg.methods = ("ddpm",)
    cfg.ddpm.sampler.update(start="prior_mix", method="ddim")
    cfg.budget_seconds = 2.0
    assert cfg.noise.draws == 10  # the config's; three copies here
    cfg.noise.draws = 3
    wd = str(tmp_path / "pm")
    out = budget.run(cfg, wd)
    clean = denoise.load_clean(cfg.data)
    # draw d: the recipe from the noise seed noise.seed + d, stacked draw by draw
    given = np.concatenate([denoise.ddpm_input(cfg, clean, denoise.noisy_input(cfg, clean, draw=d), draw=d)
                            for d in range(3)])
    assert out["ddpm_start"] == "prior_mix" and out["noise"]["draws"] == 3
    assert out["ddpm_input"]["ssim"] == pytest.approx(
        denoise.image_metrics(np.clip(given, 0, 1), np.concatenate([clean] * 3))["ssim"])
    assert out["ddpm_input"]["ssim"] > out["noisy"]["ssim"] + 0.05  # its noise is 0.2 z against 0.8 z
    r = out["methods"]["ddpm"]
    per = np.asarray(r["ssim_per_image"])
    assert per.shape == (3,) and r["ssim"] == pytest.approx(per.mean())
    assert r["ssim_se"] == pytest.approx(per.std(ddof=1) / math.sqrt(3))
    assert r["ssim_per_source"] == pytest.approx([per.mean()]) and r["nearest_own_source"] == 3  # one image
    # the evaluation's record (the quality curve's last point) holds the same statistics
    assert r["curve"][-1]["nearest_own_source"] == 3 and r["curve"][-1]["ssim_se"] == pytest.approx(r["ssim_se"])
    text = open(os.path.join(wd, "results.md")).read()
    assert "DDPM starts its whole chain from Paper B's recipe" in text
    assert "Inputs: 3 noisy copies of each image (noise seeds 0 to 2)" in text and "| own image nearest |" in text
    assert os.path.isfile(os.path.join(wd, "grid.png")) and r["steps"] >= 1


def test_budget_denoise_inputs_draw_by_draw():
    """noise.draws = D: D noisy copies of each image, draw d from the noise seed noise.seed + d
    (eu.noisy_copy directly), stacked draw by draw; D = 1 is the single input of before; DDPM's
    prior_mix start uses each draw's own z."""
    from experiments import budget, denoise
    from experiments.configs import budget_conditional_literal

    cfg = budget_conditional_literal.get_config()
    cfg.noise.seed = 5
    clean = np.random.default_rng(2).uniform(0.0, 1.0, (3, 3, 8, 8))
    noisy, ddpm_in, src = budget.denoise_inputs(cfg, clean)
    assert noisy.shape == (30, 3, 8, 8) and ddpm_in is noisy  # start = "top": the same array
    np.testing.assert_array_equal(src, np.tile(np.arange(3), 10))
    for d in (0, 4, 9):
        np.testing.assert_array_equal(noisy[3 * d:3 * d + 3], eu.noisy_copy(clean, 0.8, 5 + d, clamp=False, scale=0.6))
    cfg.ddpm.sampler.start = "prior_mix"
    _, ddpm_in, _ = budget.denoise_inputs(cfg, clean)
    z = np.random.default_rng(5 + 7).standard_normal(clean.shape)
    np.testing.assert_allclose(ddpm_in[21:24], (0.6 * (2 * clean - 1) + 0.4 * z + 1) / 2, rtol=0, atol=1e-12)
    cfg.noise.draws = 1
    noisy, ddpm_in, src = budget.denoise_inputs(cfg, clean)
    np.testing.assert_array_equal(noisy, denoise.noisy_input(cfg, clean))
    np.testing.assert_array_equal(ddpm_in, denoise.ddpm_input(cfg, clean, noisy))
    np.testing.assert_array_equal(src, np.arange(3))


def test_budget_input_stats_counts_outputs_on_another_image():
    """input_stats against hand-made outputs: copies of the right image except two that are
    copies of another one, which count as not their own; the per-image means and the standard
    error come from the given per-input SSIMs."""
    from experiments import budget

    rng = np.random.default_rng(8)
    clean = rng.uniform(0.0, 1.0, (3, 3, 16, 16))
    src = np.tile(np.arange(3), 4)
    out = clean[src].copy()
    out[3], out[8] = clean[1], clean[0]  # an image-0 input on image 1, an image-2 input on image 0
    per = rng.uniform(0.5, 1.0, 12)
    st = budget.input_stats(out, clean, src, per)
    want = src.copy()
    want[3], want[8] = 1, 0
    assert st["nearest_source"] == want.tolist() and st["nearest_own_source"] == 10
    assert st["ssim_per_source"] == pytest.approx([per[src == b].mean() for b in range(3)])
    assert st["ssim_se"] == pytest.approx(per.std(ddof=1) / math.sqrt(12))
    one = budget.input_stats(out[:1], clean, src[:1], per[:1])
    assert one["ssim_se"] is None and one["ssim_per_source"] == [pytest.approx(per[0]), None, None]


def test_budget_eval_records_input_stats():
    """_with_input_stats adds the s.e. and the outputs nearest their own image to each evaluation's
    metrics, from the outputs the wrapped eval_fn leaves in ``last``."""
    from experiments import budget

    clean = np.random.default_rng(9).uniform(0.0, 1.0, (2, 3, 16, 16))
    src = np.tile(np.arange(2), 3)
    last: dict = {}
    per = [0.9, 0.8, 0.7, 0.95, 0.6, 0.85]

    def eval_fn(fn, step):
        out = clean[src].copy()
        out[4] = clean[1]  # an image-0 input on image 1
        last.update(out=out, metrics={"ssim_per_image": per})
        return {"ssim": float(np.mean(per)), "psnr": 20.0}

    got = budget._with_input_stats(eval_fn, clean, src, last)(None, 7)
    assert got["ssim"] == pytest.approx(np.mean(per)) and got["psnr"] == 20.0
    assert got["nearest_own_source"] == 5 and got["ssim_se"] == pytest.approx(np.std(per, ddof=1) / math.sqrt(6))


def test_noise_draws_bad_values(tmp_path):
    from experiments import budget, denoise
    from experiments.configs import budget_generate, denoise_demo

    for bad in (0, -2, 1.5, True, "3"):
        cfg = _point_config()
        cfg.noise = ml_collections.ConfigDict({**cfg.noise.to_dict(), "draws": bad})  # past the int type
        with pytest.raises(ValueError, match=r"noise.draws: expected an int >= 1 \(noisy copies of each image\), got"):
            denoise.check_config(cfg)
    cfg = budget_generate.get_config()
    cfg.noise.draws = 2
    with pytest.raises(ValueError, match="noise.draws: the generate task has no noisy inputs.*expected 1, got 2"):
        budget.check_budget_config(cfg)
    cfg = budget_generate.get_config()
    cfg.task = "denoise"  # its samples_per_image (10) has no meaning there
    with pytest.raises(ValueError, match="samples_per_image: the denoise task draws no samples.*expected 1, got 10"):
        budget.check_budget_config(cfg)
    cfg = denoise_demo.get_config()
    cfg.noise.draws = 2
    wd = tmp_path / "d"
    with pytest.raises(ValueError, match="noise.draws: the denoise experiment times one noisy copy.*expected 1, got 2"):
        denoise.run(cfg, str(wd))
    assert not wd.exists()


def test_to_unit_clip_and_minmax():
    from experiments import denoise

    x = np.random.default_rng(6).normal(0.5, 0.7, (3, 2, 4, 4))
    x[2] = 0.25  # a constant sample
    np.testing.assert_array_equal(np.asarray(denoise.to_unit(x, "clip")), np.clip(x, 0, 1))
    got = np.asarray(denoise.to_unit(x, "minmax"))
    for b in range(2):
        np.testing.assert_allclose(got[b], (x[b] - x[b].min()) / (x[b].max() - x[b].min()), rtol=0, atol=1e-15)
        assert got[b].min() == 0.0 and got[b].max() == 1.0
    np.testing.assert_array_equal(got[2], 0.0)
    with pytest.raises(ValueError, match="normalise: expected one of"):
        denoise.to_unit(x, "scale")


def test_conditional_start_options_reject_bad_values():
    from experiments import denoise

    for key, bad, msg in (("noise.signal_scale", 0.0, "noise.signal_scale: expected a finite factor > 0"),
                          ("noise.signal_scale", float("nan"), "noise.signal_scale: expected a finite factor"),
                          ("normalise", "unit", "normalise: expected one of"),
                          ("ddpm.sampler.start", "middle", "ddpm.sampler.start: expected one of")):
        cfg = _point_config()
        head, _, last = key.rpartition(".")
        (cfg if not head else eval("cfg." + head))[last] = bad
        with pytest.raises(ValueError, match=msg):
            denoise.check_config(cfg)
    cfg = _point_config()
    cfg.ddpm.sampler.start = "top"
    cfg.ddpm.train.ddpm_max_train_step = 99  # of 100 steps
    with pytest.raises(ValueError, match="ddpm.sampler.start = 'top' runs the whole chain.*expected None or 100, got 99"):
        denoise.check_ddpm_range(cfg, denoise.train_config(cfg, "ddpm"))
    cfg.ddpm.train.ddpm_max_train_step = 100
    denoise.check_ddpm_range(cfg, denoise.train_config(cfg, "ddpm"))


def test_ours_flow_denoiser_with_exact_score_of_the_demo_sde():
    """The demo's SDE: constant g, lambda(t)^2 = g^2 t. For one image x0 the exact score is
    -(x - x0) / (g^2 t) and the probability flow dx/dt = (x - x0) / (2 t) gives
    x(t_end) = x0 + sqrt(t_end / t_start) (x(t_start) - x0)."""
    import jax.numpy as jnp

    from experiments import denoise

    cfg = _point_config("flow")
    assert cfg.ours.train.sde == "constant" and cfg.ours.train.sde_kwargs.std is None
    cfg.ours.sampler.rtol = cfg.ours.sampler.atol = 1e-8
    tc = denoise.train_config(cfg, "ours")
    g = cfg.ours.train.sde_kwargs.g
    x0 = np.random.default_rng(4).uniform(0.2, 0.8, (1, 3, 16, 16))
    noisy = eu.noisy_copy(x0, cfg.noise.std, 3)

    def score_fn(x, t):
        return -(x - jnp.asarray(x0)) / (g**2 * t[:, None, None, None])

    out, frames, _ = denoise.ours_denoiser(cfg, tc, noisy)(score_fn, return_trajectory=True)
    t0, t1 = cfg.ours.sampler.t_start, cfg.ours.sampler.t_end
    want = np.clip(x0 + math.sqrt(t1 / t0) * (noisy - x0), 0, 1)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
    # the frames are on the same path, at evenly spaced times
    ts = np.linspace(t0, t1, cfg.num_frames)
    for k in range(cfg.num_frames):
        np.testing.assert_allclose(np.asarray(frames[k]), np.clip(x0 + np.sqrt(ts[k] / t0) * (noisy - x0), 0, 1),
                                   atol=1e-6)


def test_ours_denoiser_passes_image_indices():
    """Per-image time intervals (budget runs): with the exact score of each of two images,
    selected by idx, each noisy image is denoised to its own source."""
    import jax.numpy as jnp

    from experiments import denoise

    cfg = _point_config("flow")
    cfg.ours.sampler.rtol = cfg.ours.sampler.atol = 1e-8
    tc = denoise.train_config(cfg, "ours")
    g = cfg.ours.train.sde_kwargs.g
    src = np.random.default_rng(5).uniform(0.2, 0.8, (2, 3, 16, 16))
    noisy = eu.noisy_copy(src[::-1].copy(), cfg.noise.std, 1)  # image k is a noisy copy of src[1 - k]
    idx = np.array([1, 0])

    def score_fn(x, t, idx=None):
        target = jnp.asarray(src)[idx]
        return -(x - target) / (g**2 * t[:, None, None, None])

    out, _, _ = denoise.ours_denoiser(cfg, tc, noisy, idx=idx)(score_fn)
    want = np.clip(src[idx] + math.sqrt(cfg.ours.sampler.t_end) * (noisy - src[idx]), 0, 1)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)


@pytest.mark.parametrize("name", ["denoise_cifar10", "denoise_celeba64", "denoise_celeba128",
                                  "budget_cifar10", "budget_celeba64"])
def test_paper_configs_fail_fast_without_tfds_data(name, tmp_path):
    import importlib

    from experiments import budget, denoise
    from krylovjax.data import DatasetNotPreparedError

    cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
    cfg.data.kwargs.data_dir = str(tmp_path / "no_tfds")  # never the machine's own data
    assert cfg.common.model == "paper"
    wd = tmp_path / "w"
    runner = budget.run if name.startswith("budget") else denoise.run
    with pytest.raises(DatasetNotPreparedError, match="tfds build"):
        runner(cfg, str(wd))
    assert not wd.exists()
