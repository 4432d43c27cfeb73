"""``experiments.restore``: denoising your own noisy images with a trained model.

The models here are exact: the score of a one-image data set under the VE SDE,
``-(x - y0) / lambda(t)^2``, and DDPM's exact epsilon of it, so a correct start time (or step)
and sampler must carry a noisy copy back to the clean image ``y0`` (SSIM 1 up to the ODE's
tolerance). Through a real checkpoint and the binary's flags: tests/test_experiments.py.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_coverage_experiments import _FakeModel

from _fs import snapshot
from experiments import restore
from krylovjax import experiment_utils as eu
from krylovjax import metrics, training
from krylovjax.data import load_images


def _clean(n=1, size=16):
    """The first ``n`` built-in photos; the first is ``builtin:astronaut``."""
    return np.asarray(load_images("builtin", size=size, num_images=n), np.float64)


def _ve_model(tc, y0, size=16, channels=3):
    """The exact VE score of the images ``y0 [N, C, H, W]`` (image ``idx`` for a per-image model)."""
    sde = tc.make_sde()
    y0 = jnp.asarray(y0)

    def score(x, t, idx=None):
        lam = sde.perturbation_std(jnp.broadcast_to(t, (x.shape[0],)))[:, None, None, None]
        target = y0[0] if idx is None else y0[jnp.asarray(idx)]
        return -(x - target) / lam**2

    return _FakeModel(score, tc, channels, size, num_images=y0.shape[0])


def _ddpm_model(tc, y0, size=16, channels=3):
    sched = tc.ddpm_schedule(dtype=jnp.float64)
    z0 = jnp.asarray(2 * y0 - 1)

    def eps(x, i, idx=None):
        ab = sched.alpha_bars[i][:, None, None, None]
        target = z0[0] if idx is None else z0[jnp.asarray(idx)]
        return (x - jnp.sqrt(ab) * target) / jnp.sqrt(1 - ab)

    return _FakeModel(eps, tc, channels, size, num_images=y0.shape[0])


def _workdir(tmp_path, monkeypatch, model):
    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: model)
    return str(wd)


def test_compute_dtype_reaches_the_model_and_the_records(tmp_path, monkeypatch):
    """``--compute_dtype`` / ``run(compute_dtype=...)`` is handed to load_score_fn (whose effect
    test_training checks), recorded, and part of the settings: an output directory of another
    compute dtype is refused. A stand-in records what it was asked; the binary's flag is passed in
    test_experiments' restore test."""
    clean = _clean()
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    model = _ve_model(tc, clean)
    asked = []

    def load(workdir, step=None, compute_dtype=None):
        asked.append(compute_dtype)
        model.model_def.unet.dtype = "float32" if compute_dtype is None else jnp.dtype(compute_dtype).name
        model.trained_dtype = "float32"
        return model

    wd = _workdir(tmp_path, monkeypatch, model)
    monkeypatch.setattr(training, "load_score_fn", load)
    out = str(tmp_path / "r")
    kw = dict(add_noise=0.2, sampler="ode", num_frames=2, baseline="none")
    res = restore.run(wd, "builtin:astronaut", out, compute_dtype=jnp.bfloat16, **kw)
    assert asked == [jnp.bfloat16] and res["compute_dtype"] == "bfloat16"
    assert res["settings"]["compute_dtype"] == "bfloat16"  # its name: a dtype object was not JSON
    with pytest.raises(ValueError, match="already holds"):  # the same settings, asked by name
        restore.run(wd, "builtin:astronaut", out, compute_dtype="bfloat16", **kw)
    assert " network evaluations in bfloat16, " in open(os.path.join(out, "restore.md")).read()
    with pytest.raises(ValueError, match=r"another run's config \(differs at: compute_dtype\)"):
        restore.run(wd, "builtin:astronaut", out, **kw)
    res = restore.run(wd, "builtin:astronaut", str(tmp_path / "r2"), **kw)
    assert asked[-1] is None and res["compute_dtype"] == "float32" and res["settings"]["compute_dtype"] == "model"
    # the training's own dtype, asked by name or by the flag's "model": the same run as the default
    for same in ("float32", "model"):
        with pytest.raises(ValueError, match="already holds"):
            restore.run(wd, "builtin:astronaut", str(tmp_path / "r2"), compute_dtype=same, **kw)
    assert asked[-2:] == ["float32", None]


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_ours_returns_the_clean_image_and_writes_every_output(sampler, tmp_path, monkeypatch):
    """``--add_noise``: Paper A's noisy copy (eu.noisy_copy) is denoised from the time matching its
    noise level; the exact score returns the photo (``sde``: its own noise is 0 at the end, since
    Tweedie's step removes what the last step leaves). Every output agrees with the others."""
    clean = _clean()
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, clean))
    out = str(tmp_path / "r")
    res = restore.run(wd, "builtin:astronaut", out, add_noise=0.2, sampler=sampler, num_frames=3, num_steps=40)
    assert res["sampler"] == sampler and res["shape"] == [1, 3, 16, 16]
    (rec,) = res["images"]
    assert rec["noise_std"] == 0.2 and rec["file"] == "000.png"
    assert rec["ssim_output"] == pytest.approx(1.0, abs=2e-3 if sampler == "ode" else 5e-2)
    assert rec["ssim_input"] < 0.8 and rec["psnr_output"] > rec["psnr_input"] + 10
    noisy = np.load(os.path.join(out, "noisy.npy"))
    np.testing.assert_array_equal(noisy, eu.noisy_copy(clean.astype(np.float32), 0.2, 0))
    den = np.load(os.path.join(out, "denoised.npy"))
    assert den.dtype == np.float32 and den.shape == (1, 3, 16, 16)
    assert float(metrics.ssim(jnp.asarray(den), jnp.asarray(clean, jnp.float32))[0]) == pytest.approx(
        rec["ssim_output"], abs=1e-5)
    png = np.asarray(Image.open(os.path.join(out, "denoised", "000.png")))
    np.testing.assert_array_equal(png, np.round(den[0] * 255).astype(np.uint8).transpose(1, 2, 0))
    assert res["summary"]["ssim_output"] == pytest.approx(rec["ssim_output"])
    text = open(os.path.join(out, "restore.md")).read()
    assert f"SSIM {rec['ssim_input']:.4f} (input) -> {rec['ssim_output']:.4f} (output)" in text
    assert os.path.getsize(os.path.join(out, "restore.png")) > 1000
    assert json.load(open(os.path.join(out, "restore.json")))["images"] == res["images"]
    # the classical baseline beside it, on the same noisy pixels and noise level
    base = np.load(os.path.join(out, "baseline.npy"))
    np.testing.assert_array_equal(base, restore.nl_means(noisy, 0.2))
    assert rec["ssim_baseline"] == pytest.approx(
        float(metrics.ssim(jnp.asarray(base), jnp.asarray(clean, jnp.float32))[0]), abs=1e-5)
    assert rec["ssim_input"] < rec["ssim_baseline"] < rec["ssim_output"]  # the exact model knows the photo
    assert "| SSIM input | SSIM output | SSIM NL-means | PSNR input |" in text
    assert f"non-local means: SSIM {res['summary']['ssim_baseline']:.4f}" in text
    assert res["baseline"] == "nl_means" and res["baseline_seconds"] >= 0 and res["trained_images"] is None

    # the same command again: refused; --overwrite redoes it; other settings: refused
    before = snapshot(out)
    with pytest.raises(eu.WorkdirConflictError, match="already holds these results; pass --overwrite"):
        restore.run(wd, "builtin:astronaut", out, add_noise=0.2, sampler=sampler, num_frames=3, num_steps=40)
    with pytest.raises(ValueError, match=r"another run's config \(differs at: add_noise"):
        restore.run(wd, "builtin:astronaut", out, add_noise=0.3, sampler=sampler, num_frames=3, num_steps=40)
    assert snapshot(out) == before
    again = restore.run(wd, "builtin:astronaut", out, add_noise=0.2, sampler=sampler, num_frames=3, num_steps=40,
                        overwrite=True)
    assert again["images"] == res["images"]
    # --fresh (a walkthrough had to delete the directory by hand for other settings): a bad flag
    # moves nothing; good ones move the old results to <outdir>.prev and start afresh
    with pytest.raises(ValueError, match="num_frames"):
        restore.run(wd, "builtin:astronaut", out, add_noise=0.3, sampler=sampler, num_frames=1, fresh=True)
    assert not os.path.exists(out + ".prev")
    other = restore.run(wd, "builtin:astronaut", out, add_noise=0.3, sampler=sampler, num_frames=3, num_steps=40,
                        fresh=True)
    assert json.load(open(os.path.join(out + ".prev", "restore.json")))["images"] == res["images"]
    assert json.load(open(os.path.join(out, "restore.json")))["settings"]["add_noise"] == 0.3 == other["settings"][
        "add_noise"]


def test_files_with_estimated_noise_per_image_offsets_and_clean_references(tmp_path, monkeypatch):
    """Noisy photos as files (names kept), each image's own estimated noise level and start time,
    a per-image model told which training image each input is, and the clean files as references."""
    clean = _clean(2, 32)
    rng = np.random.default_rng(0)
    stds = (0.05, 0.15)
    (tmp_path / "noisy").mkdir()
    (tmp_path / "clean").mkdir()
    for k, (name, s) in enumerate(zip(("b_cat", "a_rocket"), stds)):  # file order: a_rocket, b_cat
        noisy = np.clip(clean[k] + s * rng.standard_normal(clean[k].shape), 0, 1)
        Image.fromarray(np.round(noisy * 255).astype(np.uint8).transpose(1, 2, 0)).save(tmp_path / "noisy" / f"{name}.png")
        Image.fromarray(np.round(clean[k] * 255).astype(np.uint8).transpose(1, 2, 0)).save(tmp_path / "clean" / f"{name}.png")
    refs = np.asarray(load_images(f"files:{tmp_path / 'clean'}"), np.float64)  # a_rocket, b_cat
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=True)
    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, refs, size=32))
    out = str(tmp_path / "r")
    kw = dict(noise_std="auto", clean=f"files:{tmp_path / 'clean'}", num_frames=2)
    with pytest.raises(ValueError, match=r"image_index: this model was trained with per-image time intervals on 2 "):
        restore.run(wd, f"files:{tmp_path / 'noisy'}", out, **kw)
    with pytest.raises(ValueError, match=r"image_index: expected indices in \[0, 2\), got \[2\]"):
        restore.run(wd, f"files:{tmp_path / 'noisy'}", out, image_index=[0, 2], **kw)
    assert not os.path.exists(out)
    (tmp_path / "noisy" / "readme.txt").write_text("not an image")
    res = restore.run(wd, f"files:{tmp_path / 'noisy'}", out, image_index=[0, 1], **kw)
    assert [r["file"] for r in res["images"]] == ["000_a_rocket.png", "001_b_cat.png"]
    # the file left out is in the results' notes (it reached the log only)
    left = [n for n in res["notes"] if "left out" in n]
    assert len(left) == 1 and "readme.txt" in left[0] and left[0].startswith(
        f"input: {str(tmp_path / 'noisy')!r}: 1 file(s) left out, their names not ending in an image extension"), left
    assert sorted(os.listdir(os.path.join(out, "denoised"))) == ["000_a_rocket.png", "001_b_cat.png"]
    used = [r["noise_std"] for r in res["images"]]
    assert used == [r["noise_std_estimated"] for r in res["images"]]
    want = restore.estimate_noise(load_images(f"files:{tmp_path / 'noisy'}"))
    assert used == pytest.approx(want.tolist(), rel=1e-6) and used[0] > 2 * used[1]  # 0.15 and 0.05 were added
    for r in res["images"]:
        assert r["ssim_output"] > 0.995 and r["ssim_output"] > r["ssim_input"]
    # a changed input file: not taken for the finished run
    edited = np.asarray(Image.open(tmp_path / "noisy" / "b_cat.png")).copy()
    edited[0, 0] ^= 1
    Image.fromarray(edited).save(tmp_path / "noisy" / "b_cat.png")
    with pytest.raises(ValueError, match=r"holds this restore run of other pixels: the --input images changed "
                                         r"since it ran \(all flags are the same\); use another --outdir, or --fresh"):
        restore.run(wd, f"files:{tmp_path / 'noisy'}", out, image_index=[0, 1], **kw)
    # an image without noise has no estimate to start from: refused naming its file
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "noisy" / "b_cat.png")
    with pytest.raises(ValueError, match=r"noise_std: 'auto' found no noise in 001_b_cat.png \(estimate 0\); "
                                         "give --noise_std"):
        restore.run(wd, f"files:{tmp_path / 'noisy'}", str(tmp_path / "r2"), image_index=[0, 1], **kw)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_ddpm_from_the_matching_step(sampler, tmp_path, monkeypatch):
    clean = _clean()
    tc = training.TrainConfig(method="ddpm", per_image_offset=False, ddpm_num_steps=100)
    wd = _workdir(tmp_path, monkeypatch, _ddpm_model(tc, clean))
    res = restore.run(wd, "builtin:astronaut", str(tmp_path / "r"), add_noise=0.2, sampler=sampler, num_frames=2)
    (rec,) = res["images"]
    assert res["sampler"] == sampler and rec["ssim_output"] == pytest.approx(1.0, abs=1e-4)
    # the chain ran from the step whose noise level is 2 * 0.2 in the [-1, 1] range, not from T
    from krylovjax import ddpm
    start = int(ddpm.denoise_start_step(0.4, schedule=tc.ddpm_schedule(dtype=jnp.float64)))
    assert res["network_evals"] == start + 1 < 100


@pytest.mark.parametrize("method, kw, match", [
    ("ours", {}, "noise_std: required for the ode sampler .* unless --add_noise is given; --sampler=flow or paper_a"),
    ("ours", {"noise_std": "loud"}, "noise_std: expected a number or 'auto', got 'loud'"),
    ("ours", {"noise_std": -0.1}, r"noise_std: expected a finite noise level > 0, got -0.1"),
    ("ours", {"noise_std": 50.0},
     r"noise_std: the model cannot start from 50 \(on the \[0, 1\] pixel scale: 0.1961 for 50 on a 0-255 scale\): "
     r"its noise levels span \[0.03163, 1.471\] on the \[0, 1\] pixel scale; --sampler=flow or paper_a"),
    ("ours", {"add_noise": 2.0}, r"add_noise: the model cannot start from 2: its noise levels span"),
    ("ddpm", {"noise_std": 500.0},
     r"noise_std: the model cannot start from 500 \(.*\): its noise levels span \[0, \d+\.\d+\] on the \[0, 1\] pixel "
     r"scale$"),
    ("ours", {"add_noise": 0.1, "clean": "builtin:astronaut"}, "clean: --add_noise scores against the inputs"),
    ("ours", {"add_noise": -1.0}, "add_noise: expected a finite noise level >= 0"),
    ("ours", {"noise_std": 0.1, "clean": "builtin"}, r"clean: \d+ images for the 1 inputs"),
    ("ours", {"noise_std": 0.1, "input": "files:/nonexistent/x"}, r"input: 'files:/nonexistent/x': .*no such file"),
    ("ours", {"noise_std": 0.1, "image_index": [0]}, "image_index: this model was not trained with per-image"),
    ("ours", {"noise_std": 0.1, "sampler": "ddim"}, r"sampler: a score model takes one of \('ode', 'sde', 'flow'"),
    ("ddpm", {"noise_std": 0.1, "sampler": "ode"}, r"sampler: a DDPM model takes one of \('ancestral', 'ddim'\)"),
    ("constant", {"noise_std": 0.1, "sampler": "ode"}, "perturbation std is constant .* use paper_a or flow"),
    ("ours", {"noise_std": 0.1, "num_frames": 1}, "num_frames: expected an int >= 2, got 1"),
    ("ours", {"noise_std": 0.1, "num_frames": 65}, r"num_frames: expected at most 64 \(each frame is a column of "
                                                   r"restore.png\), got 65"),
    ("ours", {"noise_std": 0.1, "seed": 2**64}, r"seed: expected an int in \[0, 2\*\*32\)"),  # (a traceback)
])
def test_refused_before_anything_is_written(method, kw, match, tmp_path, monkeypatch):
    clean = _clean()
    if method == "constant":
        tc = training.TrainConfig(method="ours", sde="constant", sde_kwargs=(("std", 0.1),), per_image_offset=False)
    elif method == "ours":
        tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    else:
        tc = training.TrainConfig(method="ddpm", per_image_offset=False, ddpm_num_steps=50)
    model = _ddpm_model(tc, clean) if tc.method == "ddpm" else _ve_model(tc, clean)
    wd = _workdir(tmp_path, monkeypatch, model)
    monkeypatch.setattr(restore, "restore_arrays", lambda *a, **k: pytest.fail("denoised"))
    source = kw.pop("input", "builtin:astronaut")
    out = tmp_path / "r"
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        restore.run(wd, source, str(out), **kw)
    assert not out.exists()


def test_constant_perturbation_model_takes_paper_a_by_default(tmp_path, monkeypatch):
    """Paper A's literal model (constant perturbation std) has no start time for a noise level:
    ``auto`` picks Paper A's sampler from t = 1, the noisy image as it is."""
    clean = _clean()
    tc = training.TrainConfig(method="ours", sde="constant", sde_kwargs=(("std", 0.1),), per_image_offset=False)
    assert restore.resolve_sampler(tc, "auto") == "paper_a"
    seen = {}

    def spy(fn, tc_, noisy, noise_std, key, **k):
        seen.update(k, noisy=noisy)
        return jnp.asarray(noisy), jnp.stack([jnp.asarray(noisy)] * k["num_frames"]), jnp.asarray(0)

    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, clean))
    monkeypatch.setattr(restore, "restore_arrays", spy)
    restore.run(wd, "builtin:astronaut", str(tmp_path / "r"), noise_std=0.3, num_frames=2)
    assert seen["sampler"] == "paper_a"
    np.testing.assert_array_equal(seen["noisy"], load_images("builtin:astronaut", size=16))


def test_estimate_noise():
    """Donoho's estimate: on pure Gaussian noise within a few per cent of the truth; image content
    of the form f(row) + g(column) leaves it unchanged; on noisy photos it errs upwards, by the
    photos' own texture."""
    rng = np.random.default_rng(1)
    for s in (0.01, 0.1, 0.5):
        z = s * rng.standard_normal((4, 3, 64, 64))
        np.testing.assert_allclose(restore.estimate_noise(z), s, rtol=0.08)
        ramp = np.linspace(0, 1, 64)[:, None] + np.sin(np.arange(64))[None, :]
        np.testing.assert_allclose(restore.estimate_noise(z + ramp), restore.estimate_noise(z), rtol=1e-9)
    photos = _clean(4, 64)
    for s in (0.05, 0.1):
        est = restore.estimate_noise(eu.noisy_copy(photos, s, 3, clamp=False))
        assert np.all(est >= s * 0.9) and np.all(est <= s * 1.25)  # texture adds to it, at 64x64 up to 22 %
    assert restore.estimate_noise(_clean(1, 15)).shape == (1,)  # odd sizes: the last row and column left out


def test_short_chains_show_fewer_frames_a_failure_withdraws_the_claim_and_a_newer_model_is_named(
        tmp_path, monkeypatch):
    """(A review.) DDPM at a small noise level runs a chain of few steps: the default 6 frames were
    refused after the output directory was claimed, a traceback, and the claim then refused the
    corrected command. Now the frames shown are at most the chain's states; a failure while the
    claim is all the directory holds withdraws it; and a finished directory whose results came
    from an older checkpoint says so."""
    from krylovjax import ddpm

    clean = _clean()
    tc = training.TrainConfig(method="ddpm", per_image_offset=False, ddpm_num_steps=100)
    model = _ddpm_model(tc, clean)
    wd = _workdir(tmp_path, monkeypatch, model)
    start = int(ddpm.denoise_start_step(0.02, schedule=tc.ddpm_schedule(dtype=jnp.float64)))
    assert start + 2 < 6
    out = str(tmp_path / "r")
    res = restore.run(wd, "builtin:astronaut", out, noise_std=0.01, sampler="ddim")
    assert res["frames"] == start + 2 and res["network_evals"] == start + 1
    assert restore.frames_shown(tc, "ddim", [0.01], 50, 6) == start + 2
    ours = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),))
    assert restore.frames_shown(ours, "sde", [0.1], 3, 6) == 4
    assert restore.frames_shown(ours, "ode", [0.1], 3, 6) == 6

    model.step = 9  # trained further since
    with pytest.raises(eu.WorkdirConflictError, match=r"already holds these results, from step 5 of the model "
                                                      r"\(its checkpoint now is step 9\); pass --overwrite"):
        restore.run(wd, "builtin:astronaut", out, noise_std=0.01, sampler="ddim")

    def boom(*a, **k):
        raise RuntimeError("failed while denoising")

    monkeypatch.setattr(restore, "restore_arrays", boom)
    fresh = tmp_path / "r2"
    with pytest.raises(RuntimeError, match="failed while denoising"):
        restore.run(wd, "builtin:astronaut", str(fresh), noise_std=0.01, sampler="ddim")
    assert not fresh.exists() or os.listdir(fresh) == []  # the claim withdrawn
    monkeypatch.undo()
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: model)
    again = restore.run(wd, "builtin:astronaut", str(fresh), noise_std=0.02, sampler="ddim")  # other settings
    assert again["images"][0]["noise_std"] == 0.02


def test_the_start_step_counted_for_the_frames_is_the_samplers(tmp_path, monkeypatch):
    """(A review.) The frames were counted from a start step found in float64 while the sampler
    finds it in the images' float32: near the middle of two levels they differed by one, and
    the run failed after its checks. And a finished ``restore.json`` that is no JSON object is
    reported as finished, not as an AttributeError."""
    from krylovjax import ddpm

    clean = _clean()
    tc = training.TrainConfig(method="ddpm", per_image_offset=False, ddpm_num_steps=100)
    sched = tc.ddpm_schedule(dtype=jnp.float32)
    nsr = np.asarray(sched.noise_to_signal, np.float64)
    found = None  # a level whose start step differs between float64 and float32
    for k in range(30):
        mid = np.sqrt((nsr[k] + nsr[k + 1]) / 2) / 2
        for d in np.linspace(-3e-9, 3e-9, 601):
            s64 = mid + d
            a = int(ddpm.denoise_start_step(2.0 * np.asarray([s64]), schedule=sched)[0])
            b = int(ddpm.denoise_start_step(2.0 * np.asarray([s64], np.float32), schedule=sched)[0])
            if a == b + 1:  # float64 counts one more state than the sampler runs
                found = (k, float(s64))
                break
        if found:
            break
    assert found is not None
    k, s64 = found
    wd = _workdir(tmp_path, monkeypatch, _ddpm_model(tc, clean))
    out = str(tmp_path / "r")
    res = restore.run(wd, "builtin:astronaut", out, noise_std=repr(s64), sampler="ddim", num_frames=k + 3)
    assert res["frames"] <= res["network_evals"] + 1
    with open(os.path.join(out, "restore.json"), "w") as f:
        f.write("[1]")
    with pytest.raises(eu.WorkdirConflictError, match="already holds these results; pass --overwrite"):
        restore.run(wd, "builtin:astronaut", out, noise_std=repr(s64), sampler="ddim", num_frames=k + 3)


def test_nl_means_baseline():
    """scikit-image's non-local means at the gallery's settings: better than the noisy input on
    every built-in photo at two noise levels, each image with its own level, a constant image kept."""
    clean = _clean(8, 32)
    for s in (0.1, 0.2):
        noisy = eu.noisy_copy(clean.astype(np.float32), s, 1)
        out = restore.nl_means(noisy, s)
        assert out.dtype == np.float32 and out.shape == clean.shape and out.min() >= 0 and out.max() <= 1
        gain = np.asarray(metrics.ssim(out, clean.astype(np.float32))) - np.asarray(
            metrics.ssim(noisy, clean.astype(np.float32)))
        assert np.all(gain > 0.05), gain
    pair = eu.noisy_copy(clean[:2].astype(np.float32), 0.1, 2)
    np.testing.assert_array_equal(restore.nl_means(pair, [0.02, 0.3]), np.concatenate(
        [restore.nl_means(pair[:1], 0.02), restore.nl_means(pair[1:], 0.3)]))
    flat = np.full((1, 1, 16, 16), 0.4)
    np.testing.assert_allclose(restore.nl_means(flat, 0.1), 0.4, atol=1e-6)


@pytest.mark.parametrize("trained, noted", [(1, True), (3, True), (500, False), (None, False)])
def test_the_training_set_size_is_said_and_few_images_warned(trained, noted, tmp_path, monkeypatch):
    """A model trained on few images has learnt them (the demo's one photo): the run says how many,
    warns below FEW_IMAGES, and the baseline can be left out."""
    clean = _clean()
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, clean))
    if trained is not None:
        with open(os.path.join(wd, "config.json"), "w") as f:
            json.dump({"data": {"num_images": trained}, "train": {}}, f)
    out = str(tmp_path / "r")
    res = restore.run(wd, "builtin:astronaut", out, add_noise=0.1, num_frames=2, baseline="none")
    text = open(os.path.join(out, "restore.md")).read()
    assert res["trained_images"] == trained and restore.trained_images(wd) == trained
    assert ("Note: this model was trained on" in text) == noted
    if trained == 1:
        assert "trained on 1 image; it has learnt that image" in text and "baseline's" not in text
    if trained == 3:
        assert "trained on 3 images; it has learnt those images" in text
    assert res["baseline"] == "none" and res["baseline_seconds"] is None
    assert not os.path.exists(os.path.join(out, "baseline.npy")) and "NL-means" not in text
    assert "ssim_baseline" not in res["images"][0] and "ssim_output" in res["images"][0]
    with pytest.raises(ValueError, match=r"baseline: expected one of \('nl_means', 'none'\), got 'bm3d'"):
        restore.run(wd, "builtin:astronaut", str(tmp_path / "r2"), add_noise=0.1, baseline="bm3d")


# default_codegen: alone and among others within 1e-6 (float32) with XLA's fusion emitters; with
# its older ones (the suite's fast code generation) 2e-6, the batch's shape changing the rounding.
@pytest.mark.default_codegen
@pytest.mark.parametrize("sampler", ["ode", "flow"])
def test_an_images_output_does_not_depend_on_the_other_inputs(sampler, tmp_path, monkeypatch):
    """(A walkthrough: an image denoised in a folder of three came out different from the same
    image alone, by up to 0.011.) The ODE samplers give every image its own steps: the output of
    an input is the same alone and among others. The model: the exact VE score of data spread over
    three photos, which draws each input towards the photos near it."""
    clean = jnp.asarray(_clean(3, 16))
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    sde = tc.make_sde()

    def score(x, t, idx=None):
        lam2 = sde.perturbation_std(jnp.broadcast_to(t, (x.shape[0],))) ** 2
        d = x[:, None] - clean[None]
        w = jax.nn.softmax(-jnp.sum(d**2, axis=(2, 3, 4)) / (2 * lam2[:, None]), axis=1)
        return -jnp.sum(w[:, :, None, None, None] * d, axis=1) / lam2[:, None, None, None]

    model = _FakeModel(score, tc, 3, 16)
    noisy = eu.noisy_copy(np.asarray(clean, np.float32), 0.3, 5)
    key = jax.random.PRNGKey(0)
    kw = dict(sampler=sampler, num_frames=2, final_denoise=False)  # (Tweedie's step would hide the paths)
    many, _, _ = restore.restore_arrays(model, tc, noisy, np.asarray([0.3, 0.05, 0.2], np.float32), key, **kw)
    one, _, _ = restore.restore_arrays(model, tc, noisy[1:2], np.asarray([0.05], np.float32), key, **kw)
    np.testing.assert_allclose(np.asarray(many[1]), np.asarray(one[0]), rtol=0, atol=1e-6)  # shared steps: 6e-5


def test_noise_levels_given_estimated_or_none():
    """(A walkthrough: --noise_std=25, a 0-255 value, denoised an image whose noise was estimated at
    0.2 without a word; a nearly clean image under auto stopped the whole run, without its name.)"""
    names = ["a.png", "b.png", "c.png"]
    est = np.asarray([0.2, 0.01, 0.1])
    std, notes = restore.noise_levels("auto", est, (0.03, 1.5), names)
    np.testing.assert_allclose(std, [0.2, 0.03, 0.1])  # the nearly clean one from the smallest level
    assert len(notes) == 1 and "below the model's smallest level 0.03" in notes[0] and "b.png (0.01)" in notes[0]
    with pytest.raises(ValueError, match=r"noise_std: 'auto' estimated noise above the model's largest level 0.15 "
                                         r"in a.png \(0.2\)"):
        restore.noise_levels("auto", est, (0.03, 0.15), names)
    std, notes = restore.noise_levels(0.1, est, (0.03, 1.5), names)
    np.testing.assert_array_equal(std, 0.1)
    assert notes == ["--noise_std=0.1 is more than 3x from the noise estimated in b.png (0.01)"]
    _, notes = restore.noise_levels(25, est, None, names, arg="noise_std")  # flow: any level, still noted
    assert "a.png (0.2), b.png (0.01), c.png (0.1); the scale is [0, 1] pixel values (0.09804 for 25" in notes[0]
    std, notes = restore.noise_levels(None, est, None, names)
    np.testing.assert_array_equal(std, est)
    assert not notes
    with pytest.raises(ValueError, match="add_noise: the model cannot start from 2: its noise levels span"):
        restore.noise_levels(2.0, est, (0.03, 1.5), names, arg="add_noise")


def test_flow_needs_no_noise_level_and_a_far_one_is_noted(tmp_path, monkeypatch):
    clean = _clean()
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, clean))
    noisy = eu.noisy_copy(clean.astype(np.float32), 0.1, 0)
    np.save(tmp_path / "noisy.npy", noisy)
    res = restore.run(wd, f"array:{tmp_path / 'noisy.npy'}", str(tmp_path / "f"), sampler="flow", num_frames=2)
    (rec,) = res["images"]
    assert rec["noise_std"] is None and rec["noise_std_estimated"] > 0 and res["notes"] == []
    assert "| 0 | 000.png | - |" in open(tmp_path / "f" / "restore.md").read()
    assert "noise std (NL-means)" in open(tmp_path / "f" / "restore.md").read()  # flow does not use it
    # a level given with no baseline serves nothing: said so, and not reported as used
    # (the table said "noise std used 0.5" and noted it was far from the estimate; a walkthrough)
    res = restore.run(wd, f"array:{tmp_path / 'noisy.npy'}", str(tmp_path / "n"), sampler="flow", num_frames=2,
                      noise_std=0.5, baseline="none")
    assert res["notes"] == ["--noise_std is not used: the flow sampler starts at t = 1 whatever the noise level, "
                            "and --baseline=none"]
    assert res["images"][0]["noise_std"] is None
    # more images asked than the source holds: all of them, said so (it was silent)
    res = restore.run(wd, f"array:{tmp_path / 'noisy.npy'}", str(tmp_path / "m"), sampler="flow", num_frames=2,
                      num_images=3)
    assert res["notes"] == [f"input: 3 images asked, 'array:{tmp_path / 'noisy.npy'}' holds 1: all 1 used"]
    np.testing.assert_array_equal(np.load(tmp_path / "f" / "baseline.npy"),
                                  restore.nl_means(noisy, restore.estimate_noise(noisy)))  # the estimate serves it
    res = restore.run(wd, f"array:{tmp_path / 'noisy.npy'}", str(tmp_path / "g"), noise_std=0.5, num_frames=2)
    assert res["notes"] and "--noise_std=0.5 is more than 3x from the noise estimated in 000.png" in res["notes"][0]
    assert "Note: --noise_std=0.5 is more than 3x" in open(tmp_path / "g" / "restore.md").read()


def test_results_name_each_input_file_and_what_reading_did_to_it(tmp_path, monkeypatch):
    """(A walkthrough: the results named only the outputs, 000_a.png, 001_a.png, ..., for x/a.png,
    y/a.jpg and y/a.png; a gray file among colour ones came back in colour, an oblong one cropped,
    and clean files paired by order with the wrong inputs, all without a word; a gray --clean file
    was refused where the same in a folder was converted.)"""
    clean = _clean(2, 16)
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, clean[:1]))
    rng = np.random.default_rng(0)
    for d in ("in/x", "in/y", "ref"):
        (tmp_path / d).mkdir(parents=True)

    def save(path, img):
        Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8).squeeze()).save(path)

    noisy = [np.clip(c.transpose(1, 2, 0) + 0.1 * rng.standard_normal((16, 16, 3)), 0, 1) for c in clean]
    save(tmp_path / "in/x/a.png", noisy[0])
    save(tmp_path / "in/y/a.png", np.pad(noisy[1], ((0, 0), (2, 2), (0, 0)), mode="edge"))  # 20 wide, 16 high
    save(tmp_path / "in/y/b.png", noisy[1].mean(axis=2))  # one channel
    save(tmp_path / "ref/1_b.png", clean[1].transpose(1, 2, 0))  # sorted: 1_b, 2_a, 3_c
    save(tmp_path / "ref/2_a.png", clean[0].transpose(1, 2, 0))
    save(tmp_path / "ref/3_c.png", clean[1].mean(axis=0))
    res = restore.run(wd, f"files:{tmp_path}/in/**/*.png", str(tmp_path / "r"), noise_std=0.1, num_frames=2,
                      clean=f"files:{tmp_path / 'ref'}", baseline="none")
    recs = res["images"]
    assert [os.path.relpath(r["input_file"], tmp_path) for r in recs] == ["in/x/a.png", "in/y/a.png", "in/y/b.png"]
    assert [r["input_size"] for r in recs] == [[16, 16], [20, 16], [16, 16]]
    assert [os.path.basename(r["clean_file"]) for r in recs] == ["1_b.png", "2_a.png", "3_c.png"]
    text = open(tmp_path / "r" / "restore.md").read()
    assert "| 0 | 000_a.png | x/a.png (16x16) |" in text and "| 1 | 001_a.png | y/a.png (20x16) |" in text
    notes = "\n".join(res["notes"])
    assert "input: grayscale files read in colour (R = G = B), among colour files: y/b.png" in notes
    assert "input: centre-cropped to a square before the resize (sizes W x H): y/a.png (20x16)" in notes
    assert "| image | file | input file (W x H) |" in text
    assert "clean: grayscale files read in colour (R = G = B), among colour files: 3_c.png" in notes
    assert ("clean: paired with the inputs by their order, and the names suggest another pairing: a.png with "
            "1_b.png (a is in 2_a.png)") in notes
    for n in res["notes"]:
        assert f"Note: {n}." in text
    # one gray file for a colour model: converted, said (it was refused; in a folder it was converted)
    res = restore.run(wd, f"files:{tmp_path}/in/y/b.png", str(tmp_path / "g"), noise_std=0.1, num_frames=2,
                      baseline="none")
    assert res["shape"] == [1, 3, 16, 16]
    assert "input: its images have 1 channel, converted to the model's 3 (R = G = B)" in res["notes"]
    # a file smaller than the model's 16x16 (3 wide, 2 high): enlarged, said (it was silent unless cropped)
    (tmp_path / "tiny").mkdir()
    save(tmp_path / "tiny/t.png", noisy[0][:2, :3])
    res = restore.run(wd, f"files:{tmp_path}/tiny", str(tmp_path / "t"), noise_std=0.1, num_frames=2,
                      baseline="none")
    assert res["shape"] == [1, 3, 16, 16]
    assert ("input: smaller than the model's 16x16, enlarged to it (its noise then spans neighbouring pixels, "
            "unlike the noise the model knows; sizes W x H): t.png (3x2)") in res["notes"], res["notes"]
    assert not any("enlarged" in n for n in restore.run(
        wd, f"files:{tmp_path}/in/x/a.png", str(tmp_path / "u"), noise_std=0.1, num_frames=2, baseline="none")["notes"])
    # a source that cannot convert (the built-in data set) is refused, naming it
    gray = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: _ve_model(gray, clean[:1, :1], channels=1))
    with pytest.raises(ValueError, match="input: its images have 3 channels, the model 1"):
        restore.run(wd, "builtin", str(tmp_path / "h"), noise_std=0.1, num_images=1)


def test_an_output_directory_from_before_the_baseline_and_the_baselines_level(tmp_path, monkeypatch):
    """(A review.) A restore output directory claimed before ``--baseline`` existed reads as
    ``baseline=none``: that setting uses it, the default is refused saying so. Under ``auto`` an
    estimate below the model's smallest level raises the model's level, not the baseline's."""
    clean = _clean()
    tc = training.TrainConfig(method="ours", sde="ve", sde_kwargs=(("sigma", 2.0),), per_image_offset=False)
    wd = _workdir(tmp_path, monkeypatch, _ve_model(tc, clean))
    out = tmp_path / "old"
    res = restore.run(wd, "builtin:astronaut", str(out), add_noise=0.1, num_frames=2, baseline="none")
    claim = json.load(open(out / "experiment.json"))
    del claim["config"]["baseline"]  # as the code before --baseline wrote it
    with open(out / "experiment.json", "w") as f:
        json.dump(claim, f)
    with pytest.raises(eu.WorkdirConflictError, match=r"holds a run of restore from before --baseline \(it has none\); "
                                                      r"pass --baseline=none to use it"):
        restore.run(wd, "builtin:astronaut", str(out), add_noise=0.1, num_frames=2)
    again = restore.run(wd, "builtin:astronaut", str(out), add_noise=0.1, num_frames=2, baseline="none",
                        overwrite=True)
    assert again["images"] == res["images"]
    # a nearly clean image: the model from its smallest level, the baseline from the image's estimate
    ramp = np.broadcast_to(np.linspace(0.2, 0.8, 16)[None, None, :, None], clean.shape)  # no Haar HH content
    flat = np.clip(ramp + 0.004 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1).astype(np.float32)
    np.save(tmp_path / "flat.npy", flat)
    res = restore.run(wd, f"array:{tmp_path / 'flat.npy'}", str(tmp_path / "f"), noise_std="auto", num_frames=2)
    (rec,) = res["images"]
    assert rec["noise_std_estimated"] < rec["noise_std"] == pytest.approx(0.03163, rel=1e-3)
    np.testing.assert_array_equal(np.load(tmp_path / "f" / "baseline.npy"),
                                  restore.nl_means(flat, [rec["noise_std_estimated"]]))
