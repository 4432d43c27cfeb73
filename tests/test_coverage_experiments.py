"""Coverage audit of the experiment binaries and their configs (experiments/*.py,
experiments/configs/*.py; 2026-12-06).

What no other test ran: every config file through its own binary's checks (no data loaded, no
network); ours' samplers of ``experiments.denoise`` and ``experiments.generate`` with the SDEs
that have a drift (VP) or none (VE, constant g), against the exact score of one image or of
Gaussian data in closed form (or Euler-Maruyama's recursion written out in numpy); models trained
with per-image time intervals in the binaries; the pre-computation binary's config and data
helpers; the Colab helpers' run, figures and results with scripted stand-ins for the
pre-computation and the training (the style of tests/test_mutation_experiments.py: nothing trains
here).
"""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import skimage.metrics as skm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDES = {"ve": {"sigma": 2.0}, "vp": {"beta_min": 0.1, "beta_max": 20.0}, "constant": {"g": 0.5, "std": None}}


# ----------------------------------------------------------------------------------------------
# Independent references: the SDEs' coefficients by hand (method.md 2.1), scikit-image's SSIM
# ----------------------------------------------------------------------------------------------


def _alpha_lam(xp, sde: str, t):
    """``(alpha(t), lambda(t))``, the forward marginal ``alpha x0 + lambda z``, in ``xp`` (np/jnp)."""
    kw = SDES[sde]
    if sde == "vp":
        b0, b1 = kw["beta_min"], kw["beta_max"]
        big_b = b0 * t + 0.5 * (b1 - b0) * t * t
        return xp.exp(-0.5 * big_b), xp.sqrt(-xp.expm1(-big_b))
    if sde == "ve":
        s = kw["sigma"]
        return xp.ones_like(t), xp.sqrt(xp.expm1(2.0 * t * math.log(s)) / (2.0 * math.log(s)))
    return xp.ones_like(t), kw["g"] * xp.sqrt(t)


def _g2_drift(sde: str, x, t):
    """``(g(t)^2, f(x, t))`` by hand, numpy."""
    kw = SDES[sde]
    if sde == "vp":
        beta = kw["beta_min"] + t * (kw["beta_max"] - kw["beta_min"])
        return beta, -0.5 * beta * x
    if sde == "ve":
        return kw["sigma"] ** (2.0 * t), 0.0 * x
    return kw["g"] ** 2 + 0.0 * t, 0.0 * x


def _matched_time(sde: str, m: float) -> float:
    """``t*`` with ``lambda(t*) / alpha(t*) = m`` in closed form."""
    kw = SDES[sde]
    if sde == "vp":  # lambda^2 / alpha^2 = e^B - 1, so B(t*) = log(1 + m^2): a quadratic in t*
        b0, b1 = kw["beta_min"], kw["beta_max"]
        big_l = math.log1p(m * m)
        return (-b0 + math.sqrt(b0 * b0 + 2.0 * (b1 - b0) * big_l)) / (b1 - b0)
    if sde == "ve":
        ls = math.log(kw["sigma"])
        return math.log1p(2.0 * ls * m * m) / (2.0 * ls)
    return (m / kw["g"]) ** 2


def _point_score(sde: str, x0):
    """The exact score of the forward marginal of one image ``x0``: ``-(x - alpha x0) / lambda^2``."""
    import jax.numpy as jnp

    x0 = jnp.asarray(x0)

    def score(x, t, idx=None):
        a, lam = _alpha_lam(jnp, sde, t)
        return -(x - a[:, None, None, None] * x0) / lam[:, None, None, None] ** 2

    return score


def _sk_ssim(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array([skm.structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, channel_axis=0)
                     for i in range(a.shape[0])])


def _demo_config(sde: str = "constant", kind: str = "flow"):
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.data.size = 16
    cfg.common.model_overrides.update(ch=8, ch_mult=(1,), attn_resolutions=())
    cfg.ddpm.train.ddpm_num_steps = 1000
    cfg.num_frames = 3
    cfg.ours.sampler.kind = kind
    if sde != "constant":
        cfg.ours.train.sde = sde
        cfg.ours.train.sde_kwargs = dict(SDES[sde])
    return cfg


def _set(cfg, key: str, value):
    """``cfg`` with ``key`` (dotted) set to ``value``, past the field's type where needed (as a
    config file or a program could set it)."""
    import ml_collections

    d = cfg.to_dict()
    *path, leaf = key.split(".")
    node = d
    for k in path:
        node = node[k]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


# ----------------------------------------------------------------------------------------------
# Every config file passes its own binary's checks, with no data loaded
# ----------------------------------------------------------------------------------------------

_PRECOMPUTE_CONFIGS = ("demo", "cifar10", "celeba64", "celeba128")


def _config_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))
                  if not p.endswith("__init__.py"))


def _binary_of(name: str) -> str:
    for prefix, binary in (("denoise_", "denoise"), ("budget_", "budget"), ("train_", "train"),
                           ("colab_", "notebook")):
        if name.startswith(prefix):
            return binary
    if name in _PRECOMPUTE_CONFIGS:
        return "precompute"
    raise AssertionError(f"experiments/configs/{name}.py: no binary is known for it; add it to this test")


@pytest.fixture()
def no_data(monkeypatch):
    """Any attempt to load images (built-in photos or a tfds dataset) fails the test."""
    import krylovjax.data as data

    def refuse(*args, **kwargs):
        raise AssertionError(f"a config check loaded data: {args} {kwargs}")

    for name in ("load_images", "load_tfds", "builtin_dataset", "_import_tfds"):
        monkeypatch.setattr(data, name, refuse)


@pytest.mark.parametrize("name", _config_names())
def test_every_config_passes_its_binarys_checks_without_loading_data(name, no_data):
    """Each file under experiments/configs/ is loaded and run through the checks its binary makes
    before any work (the denoise / budget config checks, the training and pre-computation
    configs, DDPM's and ours' noise ranges, the U-Net sized to the configured images), with
    every data loader replaced by a failure: the CIFAR-10 / CelebA configs start no download."""
    from krylovjax import training
    from krylovjax.precompute import PrecomputeConfig

    binary = _binary_of(name)
    cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
    if binary in ("denoise", "budget"):
        from experiments import budget, denoise, generate

        gen = binary == "budget" and cfg.task == "generate"
        if binary == "budget":
            assert budget.check_budget_config(cfg) == cfg.budget_seconds > 0
        else:
            denoise.check_config(cfg)
        tcs = {m: denoise.train_config(cfg, m) for m in cfg.methods}
        assert tcs["ours"].sde == cfg.ours.train.sde and tcs["ddpm"].method == "ddpm"
        pc = denoise.precompute_config(cfg, tcs["ours"])
        assert pc.make_sde() == tcs["ours"].make_sde()  # one SDE for the pre-computation and training
        if not gen:
            denoise.check_ours_sampler_with_sde(cfg, tcs["ours"])
            denoise.check_ddpm_range(cfg, tcs["ddpm"])
        else:
            generate.check_generates(tcs["ddpm"])
        kw = dict(cfg.data.get("kwargs") or {})
        n = 1 if cfg.data.get("index") is not None else int(kw.get("num_images", 1))
        denoise.check_fits(tcs, np.zeros((n, 3, cfg.data.size, cfg.data.size), np.float32), n)
    elif binary == "precompute":
        from experiments import precompute

        assert cfg.dtype in ("float32", "float64") and cfg.dataset in ("builtin", "cifar10", "celeb_a")
        pc = precompute.precompute_config(cfg.precompute)
        assert pc.make_sde().name == cfg.precompute.sde
        pc.resolve(np.dtype(cfg.dtype))  # a tolerance its compute dtype can verify
        assert cfg.chunk_images >= 1 and cfg.num_images >= 1
    elif binary == "train":
        tc = training.TrainConfig.from_dict({k: v for k, v in cfg.items() if k not in ("data", "precompute")})
        if tc.method == "ours":
            pc = PrecomputeConfig(sde=tc.sde, sde_kwargs=tc.sde_kwargs, **cfg.precompute.to_dict())
            assert pc.make_sde() == tc.make_sde()
            pc.resolve(np.float32)  # experiments.train computes in float32 (x64 off): a tol it can verify
        training.model_config(tc, (3, cfg.data.image_size, cfg.data.image_size), cfg.data.num_images)
    else:
        from experiments import denoise, notebook

        cfg = notebook.get_config(name.split("_", 1)[1])
        tc = notebook.train_config(cfg)
        pcfg, kw = notebook._precompute_args(cfg)
        assert pcfg.make_sde() == tc.make_sde() and kw["chunk_images"] == cfg.chunk_images
        notebook.check_sharding(cfg, 1)
        denoise.check_ours_sampler_fields(cfg.ours.sampler)
        denoise.check_ours_sampler_with_sde(cfg, tc)
        training.model_config(tc, (3, cfg.image_size, cfg.image_size), cfg.num_images)


# ----------------------------------------------------------------------------------------------
# experiments.denoise: ours' samplers with and without drift, against closed forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde", ["ve", "vp", "constant"])
def test_ours_flow_denoiser_follows_the_exact_flow_of_one_image(sde):
    """``ours.sampler.kind = "flow"`` from the noisy image at t_start = 1 to t_end = 0.05 with the
    exact score of one image x0: the probability flow keeps ``z = (x - alpha x0) / lambda``, so the
    output is ``alpha(t_end) x0 + lambda(t_end) / lambda(1) (noisy - alpha(1) x0)`` (VP:
    alpha(0.05) = 0.985, so a drift left out would show)."""
    from experiments import denoise
    from krylovjax import experiment_utils as eu

    cfg = _demo_config(sde, "flow")
    cfg.ours.sampler.update(t_start=1.0, t_end=0.05, rtol=1e-8, atol=1e-8)
    denoise.check_config(cfg)
    tc = denoise.train_config(cfg, "ours")
    x0 = np.random.default_rng(3).uniform(0.3, 0.7, (2, 3, 8, 8))
    noisy = eu.noisy_copy(x0, 0.2, 0)
    out, _, nfe = denoise.ours_denoiser(cfg, tc, noisy)(_point_score(sde, x0))
    (a1, ae), (l1, le) = _alpha_lam(np, sde, np.array([1.0, 0.05]))
    want = ae * x0 + le / l1 * (noisy - a1 * x0)
    assert 0 < want.min() and want.max() < 1  # the clamp of the output does not act
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
    assert nfe > 6


@pytest.mark.parametrize("sde, scale", [("ve", 0.75), ("vp", 0.75), ("vp", 1.0), ("constant", 0.75)])
def test_ours_denoise_ode_starts_at_the_matched_time_for_every_sde(sde, scale):
    """``ours.sampler.kind = "denoise"`` (method "ode") on ``s x0 + std z``: the sampler takes
    ``x0 + (std / s) z``, starts at t* with ``lambda(t*) / alpha(t*) = std / s`` from
    ``alpha(t*) (x0 + (std / s) z) = alpha(t*) x0 + lambda(t*) z`` (VP scales the input, zero-drift
    SDEs do not) and the exact flow of one image ends at ``alpha(t_end) x0 + lambda(t_end) z``."""
    from experiments import denoise

    cfg = _demo_config(sde, "denoise")
    cfg.ours.sampler.update(method="ode", t_end=0.05, rtol=1e-8, atol=1e-8)
    cfg.noise.update(std=0.3 * scale / 0.75, clamp=False, signal_scale=scale, seed=5)
    denoise.check_config(cfg)
    tc = denoise.train_config(cfg, "ours")
    denoise.check_ours_sampler_with_sde(cfg, tc)
    x0 = np.random.default_rng(4).uniform(0.3, 0.7, (2, 3, 8, 8))
    noisy = denoise.noisy_input(cfg, x0)
    z = np.random.default_rng(5).standard_normal(x0.shape)
    np.testing.assert_allclose(noisy, scale * x0 + cfg.noise.std * z, atol=1e-12)
    out, _, _ = denoise.ours_denoiser(cfg, tc, noisy)(_point_score(sde, x0))
    ae, le = _alpha_lam(np, sde, np.array(0.05))
    np.testing.assert_allclose(np.asarray(out), np.clip(ae * x0 + le * z, 0, 1), atol=1e-6)


def _em_by_hand(sde, x, x0, t_start, t_end, n):
    """Euler-Maruyama's recursion without noise, by hand: ``x <- x + (f - g^2 s) dt`` at
    ``t_k = t_start + k dt``, ``dt = (t_end - t_start) / n``, with the exact score of ``x0``."""
    dt = (t_end - t_start) / n
    for k in range(n):
        t = t_start + k * dt
        a, lam = _alpha_lam(np, sde, np.array(t))
        g2, f = _g2_drift(sde, x, t)
        x = x + (f - g2 * (-(x - a * x0) / lam**2)) * dt
    return x


@pytest.mark.parametrize("kind, sde", [("denoise", "vp"), ("denoise", "ve"), ("paper_a", "vp")])
def test_ours_fixed_step_samplers_are_euler_maruyama_from_the_right_start(kind, sde):
    """``ours.sampler.kind = "denoise"`` with method "sde", and Paper A's sampler, without noise
    (``noise_scale = 0``) and without the clamp: the recursion of Euler-Maruyama written out by
    hand, from ``alpha(t*) noisy`` at the closed-form t* ("denoise") or from the noisy image at
    t_start = 1 down to 0 ("paper_a"), with the exact score of one image and VP's drift."""
    from experiments import denoise
    from krylovjax import experiment_utils as eu

    cfg = _demo_config(sde, kind)
    cfg.ours.sampler.update(method="sde", num_steps=40, noise_scale=0.0, clip=False, t_start=1.0,
                            t_end=0.0 if kind == "paper_a" else 1e-3)
    cfg.noise.update(std=0.4, clamp=False)
    denoise.check_config(cfg)
    tc = denoise.train_config(cfg, "ours")
    x0 = np.random.default_rng(6).uniform(0.3, 0.7, (1, 3, 8, 8))
    noisy = eu.noisy_copy(x0, 0.4, 0, clamp=False)
    out, frames, nfe = denoise.ours_denoiser(cfg, tc, noisy)(_point_score(sde, x0), return_trajectory=True)
    if kind == "denoise":
        t0 = _matched_time(sde, 0.4)
        a0 = float(_alpha_lam(np, sde, np.array(t0))[0])
        want = _em_by_hand(sde, a0 * noisy, x0, t0, 1e-3, 40)
    else:
        want = _em_by_hand(sde, noisy, x0, 1.0, 0.0, 40)
    assert nfe == 40
    np.testing.assert_allclose(np.asarray(out), np.clip(want, 0, 1), atol=1e-9)
    np.testing.assert_allclose(np.asarray(frames[-1]), np.clip(want, 0, 1), atol=1e-9)


@pytest.mark.parametrize("sde, edit, match", [
    # the demo's SDE (lambda(1) = g = 0.5) cannot match its own noise std 0.506
    ("constant", {}, r"noise\.std: ours\.sampler\.kind = 'denoise' .*'constant'.* 0\.506.*range \[0\.0158114, 0\.5\]"),
    # Paper A's constant perturbation matches no level
    ("constant", {"ours.train.sde_kwargs.std": 0.1}, r"noise\.std: .*'constant' \{'g': 0\.5, 'std': 0\.1\}.*"
                                                     r"not increasing"),
    # VP: lambda(1) / alpha(1) = exp(B(1) / 2) sqrt(1 - exp(-B(1))) = 152.167, B(1) = 10.05
    ("vp", {"noise.std": 200.0}, r"noise\.std: .*'vp'.* 200.*range \[.*, 152\.167\]"),
    # a level below lambda(t_end)
    ("ve", {"noise.std": 0.1, "ours.sampler.t_end": 0.5}, r"noise\.std: .*'ve'.* 0\.1,.*range"),
    # the flow's last evaluation at t_end = 0, where the scaled score is the network over lambda(0) = 0
    ("constant", {"ours.sampler.kind": "flow", "ours.sampler.t_end": 0.0},
     r"ours\.sampler\.t_end: the probability flow of ours\.sampler\.kind = 'flow' .*lambda\(t_end\), which is 0 "
     r"at t_end = 0 for ours\.train\.sde = 'constant': expected t_end > 0"),
    ("vp", {"ours.sampler.method": "ode", "ours.sampler.t_end": 0.0}, r"ours\.sampler\.t_end: .*kind = 'denoise'"),
])
def test_ours_sampler_the_sde_cannot_run_is_refused_before_any_work(sde, edit, match, tmp_path):
    """The "denoise" sampler's start time is found, and a probability flow down to t_end = 0 with
    the network scaled by 1 / lambda refused, before the pre-computation (both failed at the first
    evaluation, after the pre-computation and training: the whole budget in a budget run; the
    second with an equinox runtime error); both binaries refuse before the work directory is
    claimed."""
    from experiments import budget, denoise
    from experiments.configs import budget_demo

    for mod, runner in ((None, denoise.run), (budget_demo, budget.run)):
        cfg = _demo_config(sde, "denoise") if mod is None else mod.get_config()
        if mod is not None and sde != "constant":
            cfg.ours.train.sde, cfg.ours.train.sde_kwargs = sde, dict(SDES[sde])
        cfg.ours.sampler.kind = "denoise"
        for key, v in edit.items():
            cfg = _set(cfg, key, v)
        wd = tmp_path / ("d" if mod is None else "b")
        with pytest.raises(ValueError, match=match):
            runner(cfg, str(wd))
        assert not wd.exists()


@pytest.mark.parametrize("sde, edit", [
    ("constant", {"ours.sampler.kind": "flow"}),  # the demo's sampler: starts at t_start, ends at 1e-3
    ("constant", {"ours.sampler.kind": "flow", "ours.sampler.t_end": 0.0, "ours.train.scale_by_sigma": False}),
    ("constant", {"ours.sampler.kind": "flow", "ours.sampler.t_end": 0.0, "ours.train.sde_kwargs.std": 0.1}),
    ("constant", {"ours.sampler.kind": "paper_a", "ours.sampler.t_end": 0.0}),  # never evaluates at t_end
    ("vp", {"ours.sampler.method": "sde", "ours.sampler.t_end": 0.0}),
    ("vp", {"noise.std": 150.0}),
])
def test_ours_sampler_settings_the_sde_can_run_pass(sde, edit):
    from experiments import denoise

    cfg = _demo_config(sde, "denoise")
    for key, v in edit.items():
        cfg = _set(cfg, key, v)
    denoise.check_config(cfg)
    denoise.check_ours_sampler_with_sde(cfg, denoise.train_config(cfg, "ours"))


def test_ddpm_with_per_image_offsets_is_refused_by_the_config_check():
    """The experiments' DDPM samplers take no image index: a DDPM with per-image time intervals
    failed at its first evaluation, after training; the config check refuses it."""
    from experiments import budget, denoise
    from experiments.configs import budget_demo

    for cfg in (_demo_config(), budget_demo.get_config()):
        cfg.ddpm.train.per_image_offset = True
        check = denoise.check_config if cfg.get("task") is None else budget.check_budget_config
        with pytest.raises(ValueError, match=r"ddpm\.train\.per_image_offset: .*expected False, got True"):
            check(cfg)
        cfg.methods = ("ours",)  # without DDPM the key is not used
        check(cfg)


def _prepared_ours(cfg_, tc, images):
    """A stand-in for ``denoise.prepare_ours``: no pre-computation, fixed timings."""
    return "trajectories", {"precompute_seconds": 1.0, "embed_seconds": 0.5, "compile_seconds": 0.0,
                            "solver_stats": {}, "precompute_config": None, "num_levels": 3}


def _one_evaluation(workdir, eval_fn, model, step, seconds, stop_reason):
    """A scripted ``training.train`` run: one evaluation of ``model`` at ``step`` after ``seconds``
    of training, its record appended to the run's metrics, and train's result."""
    os.makedirs(workdir, exist_ok=True)
    rec = eval_fn(model, step)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"kind": "eval", "step": step, "train_seconds": seconds, **rec}) + "\n")
    return types.SimpleNamespace(step=step, stop_reason=stop_reason, train_seconds=seconds, compile_seconds=0.0,
                                 eval_seconds=0.1, checkpoint_seconds=0.0, wall_seconds=seconds + 0.5,
                                 steps_per_call=1, resumed_from=None)


def test_denoise_run_gives_a_per_image_model_its_images_index(tmp_path, monkeypatch):
    """``ours.train.per_image_offset = True`` in the denoise binary: the model is called with the
    one image's index 0 (before, without any, and the first evaluation failed after training). A
    scripted training run evaluates an exact score that needs the index once; the flow's output
    is the closed form of ``test_ours_flow_denoiser_follows_the_exact_flow_of_one_image`` and its
    SSIM scikit-image's."""
    import jax.numpy as jnp

    from experiments import denoise
    from krylovjax import training

    cfg = _demo_config("constant", "flow")
    cfg.methods = ("ours",)
    cfg.ours.train.per_image_offset = True
    cfg.ours.sampler.update(rtol=1e-8, atol=1e-8)
    clean = denoise.load_clean(cfg.data)
    x0 = clean.astype(np.float64)
    seen = []

    def score(x, t, idx=None):
        seen.append(None if idx is None else np.asarray(idx).tolist())
        if idx is None:
            raise ValueError("idx: required")
        return -(x - jnp.asarray(x0, x.dtype)) / (0.25 * t[:, None, None, None])

    def train(tc, data, workdir, *, eval_fn=None, target=None, mesh=None):
        assert tc.per_image_offset and data == "trajectories"
        return _one_evaluation(workdir, eval_fn, score, 4, 2.0, "num_steps")

    monkeypatch.setattr(denoise, "prepare_ours", _prepared_ours)
    monkeypatch.setattr(training, "train", train)
    out = denoise.run(cfg, str(tmp_path / "w"))
    assert seen and all(s == [0] for s in seen)
    noisy = denoise.noisy_input(cfg, clean).astype(np.float64)
    want = np.clip(x0 + math.sqrt(1e-3) * (noisy - x0), 0, 1)  # constant g: lambda^2 = g^2 t
    res = out["methods"]["ours"]
    assert res["final"]["ssim"] == pytest.approx(_sk_ssim(want, clean)[0], abs=1e-5)
    assert res["targets"][0]["seconds"] == (3.5 if res["targets"][0]["reached"] else None)


@pytest.mark.parametrize("binary, key, value, match", [
    ("denoise", "metric", "psnr", r"metric: expected one of \('ssim', 'global_ssim', 'ssim_uniform'\), got 'psnr'"),
    ("denoise", "methods", ("ours", "ours"), r"methods: expected distinct entries of \('ours', 'ddpm'\)"),
    ("denoise", "methods", ("gan",), r"methods: expected distinct entries .*\('gan',\)"),
    ("denoise", "methods", (), r"methods: expected distinct entries .*\(\)"),
    ("denoise", "num_frames", 1, "num_frames: expected an int >= 2, got 1"),
    ("denoise", "num_frames", True, "num_frames: expected an int >= 2, got True"),
    # (below the SSIM's 11x11 window: a traceback after the claim; budget first trained ours)
    ("denoise", "data.size", 8, r"data.size: expected images of at least 11x11 pixels \(the SSIM's window\), got 8x8"),
    ("budget", "data.size", 10, r"data.size: expected images of at least 11x11 pixels"),
    ("denoise", "num_frames", 65, r"num_frames: expected at most 64 \(each frame is a column of trajectory.png\)"),
    ("denoise", "eval_seed", 2**32, r"eval_seed: expected an int in \[0, 2\*\*32\)"),  # (32 bits without x64)
    ("denoise", "ours.train.budget_seconds", -5.0, "ours.train.budget_seconds: expected a finite number of seconds"),
    ("denoise", "ddpm.sampler.method", "plms", r"ddpm.sampler.method: expected one of \('ancestral', 'ddim'\)"),
    ("denoise", "ddpm.sampler.clip_x0", "yes", "ddpm.sampler.clip_x0: expected a bool, got 'yes'"),
    ("denoise", "ours.sampler.kind", "euler", r"ours.sampler.kind: expected one of \('paper_a', 'flow', 'denoise'\)"),
    ("denoise", "ours.sampler.noise_scale", -0.1, "ours.sampler.noise_scale: expected a finite value >= 0"),
    ("denoise", "ours.sampler.atol", float("inf"), "ours.sampler.atol: expected a finite tolerance > 0"),
    ("denoise", "ours.train.lr", -1.0, r"ours.train / common: lr"),
    ("denoise", "ours.precompute.sde", "vp", "ours.precompute.sde: the SDE is set by ours.train.sde"),
    ("denoise", "ours.precompute.strategy", "nosuch", "ours.precompute: strategy: expected one of"),
    ("denoise", "ours.precompute.nosuch", 1, "ours.precompute: .*nosuch"),
    ("denoise", "data.index", 5, r"data.index: expected indices in \[0, 1\) of the loaded images, got 5"),
    ("denoise", "data.index", [0, 0], "data.index: the denoise experiment takes one image, got 2"),
    ("budget", "task", "classify", r"task: expected one of \('denoise', 'generate'\), got 'classify'"),
    ("budget", "samples_per_image", 0, "samples_per_image: expected an int >= 1, got 0"),
    ("budget", "ddpm.train.budget_seconds", 10.0, r"ddpm.train.budget_seconds: set by budget_seconds \(leave it None\)"),
])
def test_bad_config_values_are_named_before_the_workdir_is_claimed(binary, key, value, match, tmp_path):
    from experiments import budget, denoise
    from experiments.configs import budget_demo, denoise_demo

    cfg = _set((denoise_demo if binary == "denoise" else budget_demo).get_config(), key, value)
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        (denoise.run if binary == "denoise" else budget.run)(cfg, str(wd))
    assert not wd.exists()


@pytest.mark.parametrize("binary", ["denoise", "budget"])
def test_fresh_through_a_symlinked_workdir_moves_the_directory_it_names(binary, tmp_path, monkeypatch):
    """``runs/x`` -> a directory on another disk: ``--fresh`` renamed the link to ``runs/x.prev``
    and wrote the new run into a new local ``runs/x`` (a walkthrough). Now the linked directory is
    moved to its own ``.prev`` and the run goes on there, the link left as it was."""
    from experiments import budget, denoise
    from experiments.configs import budget_demo, denoise_demo

    mod = denoise if binary == "denoise" else budget
    cfg = (denoise_demo if binary == "denoise" else budget_demo).get_config()
    cfg.data.size = 16
    far = tmp_path / "disk" / "x"
    far.mkdir(parents=True)
    (far / "experiment.json").write_text(json.dumps({"experiment": binary, "config": {}}))
    (far / "results.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x").symlink_to(far)
    seen = []
    monkeypatch.setattr(mod, "_run_claimed", lambda cfg, workdir, *a: seen.append(workdir) or {"ok": 1})
    assert mod.run(cfg, str(tmp_path / "runs" / "x"), fresh=True) == {"ok": 1}
    assert seen == [str(far)]
    assert (tmp_path / "disk" / "x.prev" / "results.json").exists() and not (far / "results.json").exists()
    assert os.path.islink(tmp_path / "runs" / "x") and not os.path.lexists(tmp_path / "runs" / "x.prev")


@pytest.mark.parametrize("binary", ["denoise", "budget"])
def test_fresh_from_inside_the_run_directory(binary, tmp_path, monkeypatch):
    """(A walkthrough.) ``cd run && denoise --workdir=. --fresh`` moved ``run`` to ``run.prev`` and,
    the process's directory having moved with it, claimed and refused the moved one ("already
    holds the finished results ... nothing was changed"): the run now goes on in a new ``run``."""
    from experiments import budget, denoise
    from experiments.configs import budget_demo, denoise_demo

    mod = denoise if binary == "denoise" else budget
    cfg = (denoise_demo if binary == "denoise" else budget_demo).get_config()
    cfg.data.size = 16
    run = tmp_path / "run"
    run.mkdir()
    (run / "experiment.json").write_text(json.dumps({"experiment": binary, "config": {}}))
    (run / "results.json").write_text("{}")
    seen = []
    monkeypatch.setattr(mod, "_run_claimed", lambda cfg, workdir, *a: seen.append(workdir) or {"ok": 1})
    monkeypatch.chdir(run)
    assert mod.run(cfg, ".", fresh=True) == {"ok": 1}
    assert seen == [str(run)]
    assert (tmp_path / "run.prev" / "results.json").exists() and not (run / "results.json").exists()
    assert json.loads((run / "experiment.json").read_text())["experiment"] == binary


@pytest.mark.parametrize("binary, methods", [("denoise", ("ours", "ddpm")), ("denoise", ("ddpm",)),
                                             ("budget", ("ours", "ddpm")), ("budget", ("ddpm",))])
def test_overwrite_redoes_a_finished_run_from_the_start(binary, methods, tmp_path, monkeypatch):
    """``--overwrite`` (never run by a test before): the finished run of the same config is redone
    from the start, its training runs and result files deleted before anything trains again;
    without it the finished run is refused untouched. Scripted stand-ins for the pre-computation,
    the denoisers (the clean image) and the training (one evaluation)."""
    from experiments import budget, denoise
    from experiments.configs import budget_demo
    from krylovjax import experiment_utils as eu
    from krylovjax import training

    cfg = _demo_config() if binary == "denoise" else budget_demo.get_config()
    cfg.methods = methods
    if binary == "budget":
        cfg.data.size, cfg.data.kwargs.num_images, cfg.budget_seconds = 16, 2, 30.0
    cfg.data.kwargs = None if binary == "denoise" else cfg.data.kwargs  # no load_images kwargs
    wd = str(tmp_path / "w")
    clean = denoise.load_clean(cfg.data)
    calls = []

    def den_for(cfg_, tc, noisy, method=None, *, idx=None):
        n = len(noisy)

        def den(fn, return_trajectory=False):
            out = np.concatenate([clean] * (n // len(clean)))
            return out, np.stack([np.asarray(noisy), out]), 1
        return den

    def train(tc, data, workdir, *, eval_fn=None, target=None, mesh=None):
        calls.append((tc.method, os.path.exists(os.path.join(workdir, "stale"))))
        return _one_evaluation(workdir, eval_fn, "model", 1, 0.5, "target")

    monkeypatch.setattr(denoise, "prepare_ours", _prepared_ours)
    monkeypatch.setattr(denoise, "ours_denoiser", den_for)
    monkeypatch.setattr(denoise, "ddpm_denoiser", den_for)
    monkeypatch.setattr(training, "train", train)
    runner = denoise.run if binary == "denoise" else budget.run
    first = runner(cfg, wd)
    assert calls == [(m, False) for m in methods]
    for m in methods:  # a finished run: its methods' scores are those of the clean image
        r = first["methods"][m]
        assert (r["final"]["ssim"] if binary == "denoise" else r["ssim"]) == pytest.approx(1.0)
        with open(os.path.join(wd, m, "stale"), "w") as f:
            f.write("from the first run")
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write("first")
    with pytest.raises(eu.WorkdirConflictError, match="already holds the finished results of this config"):
        runner(cfg, wd)
    assert open(os.path.join(wd, "results.md")).read() == "first" and len(calls) == len(methods)
    again = runner(cfg, wd, overwrite=True)
    assert calls[len(methods):] == [(m, False) for m in methods]  # trained again, from an empty directory
    for m in methods:
        assert not os.path.exists(os.path.join(wd, m, "stale"))
    assert open(os.path.join(wd, "results.md")).read() != "first"
    assert list(again["methods"]) == list(first["methods"])


# ----------------------------------------------------------------------------------------------
# experiments.generate: the reverse SDE with a drift, DDPM with per-image offsets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_generate_ours_reverse_sde_from_the_prior_with_gaussian_data(sde_name):
    """Ours' ``sde`` sampler (Euler-Maruyama of the reverse SDE, full noise but none at the last
    step) from the prior ``N(alpha(1) 0.5, lambda(1)^2)``, with the exact score of Gaussian data
    ``N(0.5, s0^2)`` per pixel, ``-(x - alpha 0.5) / (alpha^2 s0^2 + lambda^2)``. Every step is
    affine in x plus Gaussian noise, so each pixel of the output is Gaussian with a mean and
    variance that follow the recursion by hand: ``m <- c m + d``, ``v <- c^2 v + g^2 |dt|``. The
    prior itself (frame 0, clipped for the figure) has the share of pixels below 0 of
    ``N(alpha(1) 0.5, lambda(1)^2)``: half for VP (a centre at 0.5, as before 2026-12-06, gives 0.31)."""
    import jax
    import jax.numpy as jnp

    from experiments import generate
    from krylovjax import training

    s0, n, steps = 0.1, 2048, 100
    tc = training.TrainConfig(method="ours", sde=sde_name, sde_kwargs=tuple(SDES[sde_name].items()))

    def exact(x, t):
        a, lam = _alpha_lam(jnp, sde_name, t)
        a, lam = a[:, None, None, None], lam[:, None, None, None]
        return -(x - 0.5 * a) / (a**2 * s0**2 + lam**2)

    out, frames, nfe = generate.sample(exact, tc, (8, 1, 16, 16), jax.random.PRNGKey(1), sampler="sde",
                                       num_steps=steps, final_denoise=False, num_frames=2)
    assert nfe == steps
    a1, l1 = (float(w) for w in _alpha_lam(np, sde_name, np.array(1.0)))
    m, var = 0.5 * a1, l1**2
    dt = (generate.T_END - 1.0) / steps
    for k in range(steps):
        t = 1.0 + k * dt
        a, lam = (float(w) for w in _alpha_lam(np, sde_name, np.array(t)))
        g2, f_of_1 = _g2_drift(sde_name, 1.0, t)  # the drift is linear: f(x) = f(1) x
        big_v = a * a * s0 * s0 + lam * lam
        c = 1.0 + dt * (f_of_1 + g2 / big_v)
        m, var = c * m - dt * g2 * 0.5 * a / big_v, c * c * var + (g2 * -dt if k < steps - 1 else 0.0)
    v = np.asarray(out, np.float64).ravel()  # clipping at [0, 1] is 5 std away
    assert v.size == n and abs(v.mean() - m) < 5 * math.sqrt(var / n), (v.mean(), m)
    assert abs(v.std() / math.sqrt(var) - 1.0) < 5 / math.sqrt(2 * n), (v.std(), math.sqrt(var))
    below = float(np.mean(np.asarray(frames[0]) <= 0.0))
    want = 0.5 * (1.0 + math.erf(-0.5 * a1 / l1 / math.sqrt(2.0)))
    assert abs(below - want) < 5 * math.sqrt(want * (1 - want) / n), (below, want)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_generate_ddpm_with_per_image_offsets_draws_each_samples_image(sampler):
    """A DDPM trained with per-image time intervals (train_tiny.py's default, with
    ``--config.method=ddpm``) takes the image index like ours: with the exact epsilon of image
    ``idx`` every predicted x0 is that image, so sample ``k`` is image ``idx[k]``. Before, the
    DDPM samplers were handed the model without the index and generation failed."""
    import jax
    import jax.numpy as jnp

    from experiments import generate
    from krylovjax import training

    tc = training.TrainConfig(method="ddpm", per_image_offset=True, ddpm_num_steps=50)
    sched = tc.ddpm_schedule(dtype=jnp.float64)
    images = np.random.default_rng(8).uniform(0.2, 0.8, (2, 1, 8, 8))
    y0 = jnp.asarray(2 * images - 1)

    def eps(x, i, idx=None):
        assert idx is not None
        ab = sched.alpha_bars[i][:, None, None, None]
        return (x - jnp.sqrt(ab) * y0[jnp.asarray(idx)]) / jnp.sqrt(1 - ab)

    idx = jnp.asarray([0, 1, 1, 0], jnp.int32)
    out, _, nfe = generate.sample(eps, tc, (4, 1, 8, 8), jax.random.PRNGKey(0), idx=idx, sampler=sampler,
                                  num_steps=0)
    assert nfe == 50
    np.testing.assert_allclose(np.asarray(out), images[[0, 1, 1, 0]], atol=1e-9)
    with pytest.raises(ValueError, match=r"idx: required \(\[M\] image indices\)"):
        generate.sample(eps, tc, (4, 1, 8, 8), jax.random.PRNGKey(0), sampler=sampler)


class _FakeModel:
    """What :func:`krylovjax.training.load_score_fn` returns, for a model function ``fn``."""

    def __init__(self, fn, tc, channels, size, num_images=1, step=5):
        self.fn, self.config, self.step, self.trained_dtype = fn, tc, step, "float32"
        self.model_def = types.SimpleNamespace(unet=types.SimpleNamespace(
            in_channels=channels, image_size=size, per_image_offset=tc.per_image_offset, num_images=num_images,
            dtype="float32"))

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def test_generate_run_per_image_ddpm_against_multi_image_references(tmp_path, monkeypatch):
    """``experiments.generate.run`` on a DDPM with per-image time intervals (as
    ``train_tiny.py --config.method=ddpm`` trains one), through its settings, sampling, scoring and
    outputs, with the exact epsilon of the reference photos themselves (``--reference=builtin
    --reference_count=2``): sample ``k`` is photo ``k mod 2``, its nearest reference, at SSIM 1.
    ``--overwrite`` redoes the finished outputs."""
    import jax.numpy as jnp

    from experiments import generate
    from krylovjax import training
    from krylovjax.data import load_images

    refs = np.asarray(load_images("builtin", size=16, num_images=2), np.float64)
    tc = training.TrainConfig(method="ddpm", per_image_offset=True, ddpm_num_steps=20)
    sched = tc.ddpm_schedule(dtype=jnp.float64)
    y0 = jnp.asarray(2 * refs - 1)

    def eps(x, i, idx=None):
        ab = sched.alpha_bars[i][:, None, None, None]
        return (x - jnp.sqrt(ab) * y0[jnp.asarray(idx)]) / jnp.sqrt(1 - ab)

    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: _FakeModel(eps, tc, 3, 16, 2))
    out = str(tmp_path / "gen")
    kw = dict(num_samples=3, num_frames=2, reference="builtin", reference_count=2)
    res = generate.run(str(wd), out, **kw)
    assert res["settings"]["sampler"] == "ancestral" and res["network_evals"] == 20
    assert [r["image_index"] for r in res["samples"]] == [0, 1, 0]
    assert [r["nearest_reference"] for r in res["samples"]] == [0, 1, 0]
    for r, k in zip(res["samples"], [0, 1, 0]):
        assert r["ssim_to_nearest"] == pytest.approx(1.0, abs=1e-6)
        assert r["mean"] == pytest.approx(refs[k].mean(), abs=1e-6)
    assert res["summary"] == {"ssim_to_nearest_mean": pytest.approx(1.0, abs=1e-6), "ssim_to_nearest_se":
                              pytest.approx(0.0, abs=1e-6), "samples_per_reference": [2, 1], "references_covered": 2}
    assert "2 of 2 references are some sample's nearest; samples nearest each reference: 2, 1." in \
        open(os.path.join(out, "samples.md")).read()
    with open(os.path.join(out, "samples.json"), "w") as f:
        f.write("{}")
    again = generate.run(str(wd), out, overwrite=True, **kw)
    assert again["samples"] == res["samples"] and json.load(open(os.path.join(out, "samples.json")))["samples"]
    # DDIM with more steps than the model has runs them all, and says so (it was cut without a word)
    ddim = generate.run(str(wd), str(tmp_path / "ddim"), num_samples=2, num_frames=2, sampler="ddim", num_steps=50)
    assert ddim["network_evals"] == 20
    assert ddim["notes"] == ["num_steps: 50 asked; DDIM takes at most the model's 20 steps, and ran 20"]


@pytest.mark.parametrize("method, kw, error, match", [
    ("ours", {"sampler": "bogus"}, ValueError, r"sampler: expected auto or one of \('ode', 'sde', 'paper_a', "
                                               r"'ancestral', 'ddim'\), got 'bogus'"),
    ("ours", {"final_denoise": "yes"}, TypeError, "final_denoise: expected a bool, got 'yes'"),
    ("ours", {"sampler": "ddim"}, ValueError, r"sampler: a score model takes one of \('ode', 'sde', 'paper_a'\)"),
    ("ddpm", {"sampler": "ode"}, ValueError, r"sampler: a DDPM model takes one of \('ancestral', 'ddim'\)"),
    ("ours", {"sampler": "sde", "num_steps": 0}, ValueError, "num_steps: the 'sde' sampler needs >= 1 steps, got 0"),
    ("ours", {"sampler": "paper_a", "num_steps": 0}, ValueError, "num_steps: the 'paper_a' sampler needs >= 1"),
    ("ours", {"reference": "builtin", "reference_count": 2}, ValueError,
     "reference: its images have 3 channels, the model 1"),  # (builtin:<name> is converted, with a note)
    ("ours", {"sampler": "sde", "num_steps": 3, "num_frames": 5}, ValueError,
     r"num_frames: the sde chain has 3 steps, so at most 4 frames, got 5"),
    ("ddpm", {"sampler": "ddim", "num_steps": 2, "num_frames": 4}, ValueError,
     r"num_frames: the ddim chain has 2 steps, so at most 3 frames, got 4"),
    ("ours", {"no_checkpoints": True}, FileNotFoundError, "does not exist; expected a training run"),
    # a seed JAX keeps 32 bits of (a larger one repeated a smaller one; from 2**63 a traceback)
    ("ours", {"seed": 2**32 + 5}, ValueError, r"seed: expected an int in \[0, 2\*\*32\) \(JAX's random keys keep 32 "
                                               r"bits of it\), got 4294967301"),
    ("ours", {"seed": -1}, ValueError, r"seed: expected an int in \[0, 2\*\*32\)"),
    # 1001 frames of ancestral DDPM drew a 143 000-pixel-wide figure
    ("ddpm", {"num_frames": 65}, ValueError, r"num_frames: expected at most 64 \(each frame is a column of samples.png\), "
                                             r"got 65"),
])
def test_generate_run_refuses_bad_settings_before_sampling(method, kw, error, match, tmp_path, monkeypatch):
    from experiments import generate
    from krylovjax import training

    tc = training.TrainConfig(method=method, sde="ve", sde_kwargs=(("sigma", 2.0),))
    wd = tmp_path / "train"
    if not kw.pop("no_checkpoints", False):
        (wd / "checkpoints").mkdir(parents=True)

    def never(*a, **k):
        raise AssertionError("sampled")

    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: _FakeModel(never, tc, 1, 8))
    monkeypatch.setattr(generate, "sample", never)
    out = tmp_path / "gen"
    with pytest.raises(error, match=match):
        generate.run(str(wd), str(out), **kw)
    assert not out.exists()


def test_generate_and_restore_fresh_from_inside_the_output_directory(tmp_path, monkeypatch):
    """(A review.) ``--outdir=. --fresh`` from inside the output directory: the run went on in
    <outdir>.prev, over the run --fresh had moved there. generate and restore now give
    run_claimed (and its body) the absolute path."""
    from experiments import generate, restore
    from krylovjax import experiment_utils as eu
    from krylovjax import training

    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: _FakeModel(None, tc, 3, 16))
    seen = []

    def claimed(outdir, experiment, *a, **k):
        seen.append((experiment, outdir, k.get("fresh")))
        return {}

    monkeypatch.setattr(eu, "run_claimed", claimed)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    generate.run(str(wd), ".", num_samples=1, num_frames=2, sampler="paper_a", num_steps=2, fresh=True)
    restore.run(str(wd), "builtin:astronaut", ".", noise_std=0.1, num_frames=2, baseline="none", fresh=True)
    assert seen == [("generate", str(out), True), ("restore", str(out), True)]


# ----------------------------------------------------------------------------------------------
# experiments.precompute and experiments.train: helpers and refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk, want", [("auto", "auto"), ("none", None), ("None", None), (None, None),
                                         (0, None), ("4", 4), (4, 4)])
def test_precompute_config_chunk_size_forms(chunk, want):
    """``precompute.chunk_size`` of a config: "auto", "none" / 0 / None for one chunk, or an
    integer (given as text on the command line)."""
    from experiments import precompute
    from experiments.configs import demo

    import ml_collections

    cfg = demo.get_config()
    cfg.precompute = ml_collections.ConfigDict({**cfg.precompute.to_dict(), "chunk_size": chunk})
    pc = precompute.precompute_config(cfg.precompute)
    assert pc.chunk_size == want
    assert pc.sde_kwargs == (("sigma", 5.0),)


def test_precompute_load_passes_the_tfds_settings_and_casts(monkeypatch):
    """``experiments.precompute.load``: a tfds dataset with its split, data directory (None for
    ""), class filter (None for "") and count (a stand-in loader: nothing is read), the built-in
    photos with their seed; both cast to ``dtype``."""
    import krylovjax.data as data
    from experiments import precompute
    from experiments.configs import cifar10, demo

    calls = []

    def fake(source, **kw):
        calls.append((source, kw))
        return np.full((kw["num_images"], 3, kw["size"], kw["size"]), 0.25, np.float64)

    monkeypatch.setattr(data, "load_images", fake)
    cfg = cifar10.get_config()
    cfg.num_images, cfg.dtype = 3, "float32"
    x = precompute.load(cfg)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    assert calls[-1] == ("cifar10", {"split": "train", "data_dir": None, "size": 32, "class_filter": "dog",
                                     "num_images": 3})
    cfg.class_filter, cfg.data_dir = "", "/nowhere"
    precompute.load(cfg)
    assert calls[-1][1]["class_filter"] is None and calls[-1][1]["data_dir"] == "/nowhere"
    monkeypatch.undo()
    from krylovjax.data import builtin_dataset

    cfg = demo.get_config()
    cfg.num_images, cfg.image_size, cfg.data_seed, cfg.dtype = 2, 8, 3, "float32"
    x = precompute.load(cfg)
    np.testing.assert_array_equal(x, builtin_dataset(8, 2, seed=3).astype(np.float32))
    assert x.dtype == np.float32


def _run_binary(module, *args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("module, args, message", [
    ("experiments.precompute", ["--config=experiments/configs/demo.py", "--config.dtype=float16"],
     "--config.dtype: expected float32 or float64, got 'float16'"),
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--config.method=ddpm", "--store=S"],
     "error: store: 'S' has no manifest.json; not a ScoreStore"),
])
def test_binaries_refuse_bad_settings_before_any_work(module, args, message, tmp_path):
    wd = tmp_path / "w"
    proc = _run_binary(module, *args, f"--workdir={wd}")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not wd.exists()


# ----------------------------------------------------------------------------------------------
# experiments.notebook: the Colab run with scripted stand-ins
# ----------------------------------------------------------------------------------------------


def test_notebook_prepare_dataset_downloads_only_when_asked(monkeypatch):
    """``KRYLOVJAX_NB_DOWNLOAD=yes`` (or ``auto`` inside Colab) asks tfds to prepare a missing
    dataset, with the config's split and directory and never GCS; a prepared one is left alone.
    tfds is a stand-in: nothing is downloaded."""
    from experiments import notebook

    calls = []

    class Builder:
        def __init__(self, prepared):
            self.prepared, self.data_dir = prepared, "/data/cifar10/3.0.2"

        def is_prepared(self):
            return self.prepared

    state = {"prepared": True}
    tfds = types.ModuleType("tensorflow_datasets")
    tfds.builder = lambda name, **kw: calls.append(("builder", name, kw)) or Builder(state["prepared"])
    tfds.data_source = lambda name, **kw: calls.append(("data_source", name, kw))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", tfds)
    cfg = notebook.get_config("tiny", dataset="cifar10", data_dir="/tfds")
    assert notebook.prepare_dataset(cfg, "yes") == "cifar10 is prepared in /data/cifar10/3.0.2"
    assert calls == [("builder", "cifar10", {"data_dir": "/tfds", "try_gcs": False})]
    state["prepared"] = False
    assert not notebook.in_colab()
    assert "no download" in notebook.prepare_dataset(cfg, "auto") and len(calls) == 1
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert notebook.in_colab()
    assert notebook.prepare_dataset(cfg, "auto") == "downloaded and prepared cifar10 (array_record) in /tfds"
    assert calls[-1] == ("data_source", "cifar10", {"split": "train", "data_dir": "/tfds", "download": True,
                                                   "try_gcs": False})
    cfg.data_dir = ""
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert notebook.prepare_dataset(cfg, "yes").endswith(f"in {os.path.expanduser('~/tensorflow_datasets')}")
    assert calls[-1][2]["data_dir"] is None


def test_notebook_bad_settings_are_named_before_any_work(tmp_path):
    """The Colab helpers name a bad dtype, a bad training setting, and, before training, a bad
    sampler kind (it ran as "denoise") and a "denoise" start the SDE cannot match (the tiny
    config's lambda(1) = 0.5 against its noise std 0.506; it failed at the first evaluation)."""
    from experiments import notebook

    cfg = notebook.get_config("tiny")
    cfg.dtype = "float16"
    with pytest.raises(ValueError, match="dtype: expected float32 or float64, got 'float16'"):
        notebook.load_images(cfg)
    cfg = notebook.get_config("tiny")
    cfg.train.lr = -1.0
    with pytest.raises(ValueError, match=r"^train: lr"):
        notebook.train_config(cfg)
    images = np.full((4, 3, 16, 16), 0.5, np.float32)
    for kind, match in (("flw", r"ours\.sampler\.kind: expected one of \('paper_a', 'flow', 'denoise'\), got 'flw'"),
                        ("denoise", r"noise\.std: ours\.sampler\.kind = 'denoise' .* 0\.506")):
        cfg = notebook.get_config("tiny")
        cfg.ours.sampler.kind = kind
        with pytest.raises(ValueError, match=match):
            notebook.train_and_denoise(cfg, str(tmp_path), str(tmp_path / "no_store"), images)
    assert os.listdir(tmp_path) == []


def test_notebook_run_figures_and_results_from_scripted_stages(tmp_path, monkeypatch):
    """The Colab helpers after the data: ``precompute`` hands the config's pre-computation
    settings to the pipeline, ``train_and_denoise`` trains on the store's trajectories and denoises
    the first ``denoise.num_images`` noisy copies, ``write_figures`` / ``write_results`` /
    ``show`` write and show them. The pipeline and the training are scripted stand-ins; the
    score is zero and Paper A's sampler runs without noise, so the denoised images are the noisy
    ones exactly, and every SSIM is scikit-image's of the noisy copies against the clean images."""
    from experiments import notebook
    from krylovjax import experiment_utils as eu
    from krylovjax import pipeline, training

    cfg = notebook.get_config("tiny", num_images="4")
    cfg.denoise.num_images = 3
    cfg.ours.sampler.noise_scale = 0.0
    images = np.random.default_rng(9).uniform(0.1, 0.9, (4, 3, 16, 16)).astype(np.float32)
    wd = str(tmp_path / "colab")
    store_path = os.path.join(wd, "precompute", "store")
    t = np.array([1e-3, 0.5, 1.0])
    traj = training.Trajectories(x=np.repeat(images[:, None], 3, axis=1), t=t,
                                 sde={"name": "constant", "kwargs": {"g": 0.5, "std": None}})
    calls = {}
    totals = {"images": 4, "systems_solved": 96, "matvecs": 960, "matvecs_per_system": 10.0, "nonconverged": 0,
              "sweeps_mean": 2.5, "sweeps_max": 3, "outer_nonconverged": 1, "outer_diverged": 0}
    summary = {"images_computed": 4, "num_images": 4, "seconds": 2.0, "compile_seconds": 1.0,
               "systems_per_second": 48.0}

    def run_precompute(imgs, pcfg, path, progress=True, **kw):
        calls["run"] = (pcfg, path, kw)
        return types.SimpleNamespace(to_dict=lambda: dict(summary))

    monkeypatch.setattr(pipeline, "run_precompute", run_precompute)
    monkeypatch.setattr(pipeline, "open_store", lambda path, imgs, pcfg, **kw: types.SimpleNamespace(path=store_path))
    monkeypatch.setattr(pipeline, "summarize_store", lambda store: dict(totals))
    monkeypatch.setattr(training, "trajectories_from_store", lambda path: traj if path == store_path else None)

    def train(tc, data, workdir, *, eval_fn=None, **kw):
        calls["train"] = (tc, data)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step in (3, 6):
                rec = eval_fn(lambda x, t: 0.0 * x, step)
                f.write(json.dumps({"kind": "eval", "step": step, "train_seconds": step / 2, **rec}) + "\n")
        return types.SimpleNamespace(step=6, stop_reason="num_steps", resumed_from=None, train_seconds=3.0,
                                     compile_seconds=0.5, eval_seconds=0.25, last_loss=1.5)

    monkeypatch.setattr(training, "train", train)
    import IPython.display as display
    shown = []
    monkeypatch.setattr(display, "display", shown.append)

    pre = notebook.precompute(cfg, images, wd, progress=False)
    pcfg, path, kw = calls["run"]
    assert path == os.path.join(wd, "precompute") and pre.store_path == store_path
    assert pcfg.sde == "constant" and pcfg.num_steps == cfg.precompute.num_steps and pcfg.shard is True
    assert kw == {"chunk_images": 4, "store_dtype": "float32", "embed_component": "sum", "seed": 0}
    table = pre.table()
    assert "| computed now / already done | 4 / 0 |" in table and "| matvecs per system | 10.0 |" in table
    assert "| sweeps per image (mean / max) | 2.50 / 3 |" in table and "| systems per second | 48 |" in table

    run = notebook.train_and_denoise(cfg, wd, store_path, images)
    tc, data = calls["train"]
    assert tc.method == "ours" and tc.sde == "constant" and data is traj
    clean = images[:3]
    noisy = eu.noisy_copy(clean, cfg.noise.std, cfg.noise.seed)
    np.testing.assert_array_equal(run.noisy_images, noisy)
    np.testing.assert_allclose(run.denoised_images, noisy, atol=1e-7)  # zero score, no noise: unchanged
    want = _sk_ssim(noisy, clean)
    np.testing.assert_allclose(run.denoised["ssim_per_image"], want, atol=1e-5)
    np.testing.assert_allclose(run.noisy["ssim_per_image"], want, atol=1e-5)
    assert [e["step"] for e in run.evals] == [3, 6] and run.evals[1]["train_seconds"] == 3.0
    assert run.frames.shape == (cfg.num_frames, 3, 3, 16, 16)
    assert run.train["network_evals"] == cfg.ours.sampler.num_steps and run.train["seconds_per_step"] == 0.5
    assert "trained 6 steps in 3.0 s (stop: num_steps" in run.summary() and "last logged loss 1.5" in run.summary()
    assert f"| ours (step 6) | {want.mean():.4f} |" in run.table()
    with np.load(os.path.join(wd, "denoised.npz")) as z:
        np.testing.assert_array_equal(z["noisy"], noisy)

    figs = notebook.write_figures(wd, pre, run)
    assert sorted(figs) == ["denoised", "embedding", "ssim_curve", "trajectory"]
    for p in figs.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    platform = notebook.PlatformInfo("cpu", 1, "cpu", "0")
    path = notebook.write_results(wd, cfg, platform, pre, run, figs)
    with open(path) as f:
        res = json.load(f)
    assert res["experiment"] == "colab" and res["platform"]["num_devices"] == 1
    assert res["dataset"] == {"name": "builtin", "num_images": 4, "image_size": 16}
    assert res["precompute"]["store"] == totals and res["precompute"]["store_path"] == store_path
    assert res["denoised"]["ssim"] == pytest.approx(want.mean(), abs=1e-5)
    assert res["figures"] == {k: f"{k}.png" for k in figs}
    notebook.show(figs["denoised"])
    assert len(shown) == 1 and shown[0].filename == figs["denoised"]
    assert notebook._levels(3, 6) == [0, 1, 2] and notebook._levels(10, 3) == [0, 4, 9]


def test_generate_names_its_references_and_the_step_of_finished_samples(tmp_path, monkeypatch):
    """(A walkthrough.) The references compared are named (files), those left out by
    --reference_count said; finished samples from an older checkpoint say which step; a failure
    after the claim withdraws it (a traceback used to leave the claim, refusing a corrected command)."""
    from PIL import Image

    from experiments import generate
    from krylovjax import training

    tc = training.TrainConfig(method="ddpm", per_image_offset=False, ddpm_num_steps=4)
    model = _FakeModel(lambda x, i: 0.0 * x, tc, 3, 16)
    model.step = 100
    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    (tmp_path / "refs" / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "refs" / name)
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: model)
    out = tmp_path / "g"
    res = generate.run(str(wd), str(out), num_samples=2, num_frames=2, reference=f"files:{tmp_path}/refs/**/*.png",
                       reference_count=2)
    assert res["references"] == ["a.png", "b.png"] and res["model_step"] == 100
    assert res["notes"] == ["reference: compared with the first 2 of the 3 files (--reference_count=0 for all)"]
    assert all(r["nearest_reference_file"] in ("a.png", "b.png") for r in res["samples"])
    text = open(out / "samples.md").read()
    assert "Note: reference: compared with the first 2 of the 3 files" in text and "(a.png)" in text + "(b.png)"
    model.step = 110
    with pytest.raises(Exception, match=r"already holds these samples, from step 100 of the model \(its checkpoint "
                                        r"now is step 110\); pass --overwrite"):
        generate.run(str(wd), str(out), num_samples=2, num_frames=2, reference=f"files:{tmp_path}/refs/**/*.png",
                     reference_count=2)

    def broken(*a, **k):
        raise RuntimeError("the sampler failed")

    monkeypatch.setattr(generate, "sample", broken)
    with pytest.raises(RuntimeError, match="the sampler failed"):
        generate.run(str(wd), str(tmp_path / "h"), num_samples=2, num_frames=2)
    assert not (tmp_path / "h" / "experiment.json").exists()  # the claim withdrawn
