"""experiments/precompute.py and experiments/train.py: findings of a walkthrough of the two
binaries (2026-12-07).

A  a train --data=builtin rerun with another config.precompute is refused naming it, before
   pre-computing, and the kept trajectories are not replaced;
B  train --store refuses --config.data.* / --config.precompute.* overrides (unused there);
C  config.store_dtype, config.data_seed and config.data.seed are checked always, named;
D  precompute_summary.json keeps the runs that computed the store ("runs");
E  precompute --workdir that is, or lies inside, a score store is refused;
F  images short of outer_tol and non-converged solves: a warning line, and the table's store rows;
G  train with --config.num_steps the run has reached says so before compiling anything.

The helpers are called in-process; the refusals and the runs of the binaries in subprocesses
(the refusals end before any computation; the training run is marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from _fs import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE = ["--config=experiments/configs/demo.py", "--progress=false", "--config.num_images=2",
       "--config.image_size=8", "--config.chunk_images=1", "--config.precompute.num_steps=3"]
TRAIN = ["--config=experiments/configs/train_tiny.py", "--data=builtin", "--config.data.image_size=16",
         "--config.data.num_images=2", "--config.model_overrides.ch=8", "--config.model_overrides.ch_mult=(1,)",
         "--config.model_overrides.attn_resolutions=()", "--config.batch_size=4", "--config.progress=False",
         "--config.precompute.num_steps=3", "--config.checkpoint_every=2", "--config.log_every=1"]


def _run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _fake_store(path) -> None:
    """A directory a score store is recognised by (krylovjax.store: its manifest's format)."""
    from krylovjax.store import MANIFEST_NAME, STORE_FORMAT

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MANIFEST_NAME), "w") as f:
        json.dump({"format": STORE_FORMAT, "version": 1}, f)


def _train_config():
    from experiments.configs import train_tiny

    cfg = train_tiny.get_config()
    cfg.data.image_size, cfg.batch_size = 8, 4
    cfg.model_overrides.ch_mult, cfg.model_overrides.attn_resolutions = (1,), ()
    return cfg


def _train_cfg(cfg):
    from krylovjax import training

    return training.TrainConfig.from_dict({k: v for k, v in cfg.items() if k not in ("data", "precompute")})


# ----------------------------------------------------------------------------------------------
# C: the seeds and the store dtype, named, checked always
# ----------------------------------------------------------------------------------------------


def test_store_dtype_and_data_seed_are_checked_and_named():
    from experiments import precompute, train
    from experiments.configs import demo

    precompute.check_config(demo.get_config())  # the demo's own
    cfg = types.SimpleNamespace(store_dtype="float32", data_seed=0)  # (a ConfigDict keeps each key's type)
    for value in ("float16", "float64"):
        cfg.store_dtype = value
        precompute.check_config(cfg)
    for value in ("bogus", "int32", "bool", None):
        cfg.store_dtype = value
        with pytest.raises(ValueError, match=r"^config\.store_dtype: expected a float dtype \(float16, float32 or "
                                             rf"float64\), got {value!r}$"):
            precompute.check_config(cfg)
    cfg.store_dtype = "float32"
    for seed in (-1, True, 1.5, "3"):
        cfg.data_seed = seed
        with pytest.raises(ValueError, match=r"^config\.data_seed: expected an int >= 0"):
            precompute.check_config(cfg)
    train._check_data_seed(0)
    for seed in (-1, True, 2.0):
        with pytest.raises(ValueError, match=r"^config\.data\.seed: expected an int >= 0"):
            train._check_data_seed(seed)


def test_unused_with_store_names_the_data_and_precompute_overrides():
    from experiments import train

    got = train.unused_with_store({"lr": 0.1, "data.image_size": 32, "precompute.tol": 1e-3, "num_steps": 2,
                                   "model_overrides.ch": 8})
    assert got == ["data.image_size", "precompute.tol"]
    assert train.unused_with_store({"lr": 0.1}) == []


@pytest.mark.parametrize("module, args, message", [
    # C: a numpy TypeError, without the key
    ("experiments.precompute", [*PRE, "--config.store_dtype=bogus"],
     "error: config.store_dtype: expected a float dtype (float16, float32 or float64), got 'bogus'"),
    # C: accepted (and unused) with 8 images or fewer; numpy's "expected non-negative integer" above
    ("experiments.precompute", [*PRE, "--config.data_seed=-1"],
     "error: config.data_seed: expected an int >= 0 (the built-in photos' crops), got -1"),
    ("experiments.train", [*TRAIN, "--config.data.seed=-1"],
     "error: config.data.seed: expected an int >= 0 (the built-in photos' crops), got -1"),
    # B: trained at the store's size without a word
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--store=/nonexistent/kj",
                           "--config.data.image_size=32", "--config.precompute.outer_tol=0.01"],
     "error: --config.data.image_size, --config.precompute.outer_tol: not used with --store (the store's images "
     "and the settings experiments.precompute computed it with are); drop them, or train on the built-in photos "
     "with --data=builtin"),
    # ddpm on the built-in photos pre-computes nothing: its precompute overrides were ignored too
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--config.method=ddpm",
                           "--config.precompute.outer_tol=0.01"],
     "error: --config.precompute.outer_tol: not used by ddpm, which trains on the photos themselves (no "
     "pre-computation); drop them"),
])
def test_refused_before_any_work_in_one_line(module, args, message, tmp_path):
    wd = tmp_path / "run"
    proc = _run(module, *args, f"--workdir={wd}", timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert _last_line(proc) == message, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# E: --workdir in a store
# ----------------------------------------------------------------------------------------------


def test_enclosing_store(tmp_path):
    from experiments import precompute

    _fake_store(tmp_path / "run" / "store")
    assert precompute.enclosing_store(str(tmp_path / "run")) is None  # a precompute run's workdir: fine
    assert precompute.enclosing_store(str(tmp_path / "run" / "store")) == str(tmp_path / "run" / "store")
    assert precompute.enclosing_store(str(tmp_path / "run" / "store" / "a" / "b")) == str(tmp_path / "run" / "store")
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text('{"name": "an app"}')  # another tool's manifest
    assert precompute.enclosing_store(str(tmp_path / "web" / "x")) is None


@pytest.mark.parametrize("inner, fresh", [("", False), ("", True), ("arrays", False)])
def test_precompute_refuses_a_workdir_in_a_store(tmp_path, inner, fresh):
    """Built a second store inside the first (store/store); --fresh moved the first run's store away."""
    store = tmp_path / "run" / "store"
    _fake_store(store)
    (store / "arrays").mkdir()
    before = snapshot(tmp_path)
    wd = store / inner if inner else store
    proc = _run("experiments.precompute", *PRE, f"--workdir={wd}", *(["--fresh"] if fresh else []), timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    where = "is" if not inner else f"lies inside {str(store)!r},"
    assert _last_line(proc) == (
        f"error: --workdir: {str(wd)!r} {where} a score store (its manifest.json); experiments.precompute writes its "
        "store to <workdir>/store: pass that run's work directory (the store's parent) to resume it, or a new one "
        "(nothing was changed)"), proc.stderr[-2000:]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# D, F: the summary's runs; non-converged results said
# ----------------------------------------------------------------------------------------------


def _run_block(computed, skipped, seconds):
    return {"chunks_computed": computed, "chunks_skipped": skipped, "seconds": seconds, "images_computed": computed}


def test_summary_runs_keeps_the_runs_that_computed(tmp_path):
    from experiments import precompute

    path = str(tmp_path / "precompute_summary.json")
    first = _run_block(1, 0, 5.0)
    runs = precompute.summary_runs(path, first, {"run": first, "config": {"a": 1}})
    assert runs == [{"run": first, "config": {"a": 1}}]
    (tmp_path / "precompute_summary.json").write_text(json.dumps({"run": first, "runs": runs}))
    noop = _run_block(0, 2, 0.03)
    assert precompute.summary_runs(path, noop, {"run": noop}) == runs  # a no-op adds nothing, loses nothing
    second = _run_block(1, 1, 4.0)  # resumed: computed the chunk left
    assert precompute.summary_runs(path, second, {"run": second}) == runs + [{"run": second}]
    # found no chunk done (all failed their checksums, a review): the same store, the entries kept
    again = _run_block(2, 0, 9.0)
    assert precompute.summary_runs(path, again, {"run": again}) == runs + [{"run": again}]
    # a summary written before "runs": its run block, if it computed
    (tmp_path / "precompute_summary.json").write_text(json.dumps({"run": first, "config": {"a": 1}, "machine": {}}))
    assert precompute.summary_runs(path, noop, {"run": noop}) == [{"run": first, "config": {"a": 1}, "machine": {}}]
    (tmp_path / "precompute_summary.json").write_text(json.dumps({"run": noop, "config": {}}))
    assert precompute.summary_runs(path, noop, {"run": noop}) == []
    (tmp_path / "precompute_summary.json").write_text("{not json")
    assert precompute.summary_runs(path, second, {"run": second}) == [{"run": second}]


def test_precompute_flags_misses_and_keeps_the_first_runs_record(tmp_path):
    """Every solve fails and every image misses outer_tol: exit 0 with no warning, and the table's
    store rows left them out; a no-op rerun overwrote the summary's run with zeros."""
    wd = tmp_path / "run"
    args = [*PRE, f"--workdir={wd}", "--config.precompute.max_sweeps=2", "--config.precompute.restart=2",
            "--config.precompute.max_restarts=1"]
    proc = _run("experiments.precompute", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(wd / "precompute_summary.json"))
    store, run = summary["store"], summary["run"]
    assert store["outer_nonconverged"] == 2 and store["nonconverged"] == store["systems_solved"] > 0
    assert f"  store: short of outer_tol  {store['outer_nonconverged']}\n" in proc.stdout, proc.stdout
    assert f"  store:   of them diverged  {store['outer_diverged']}\n" in proc.stdout, proc.stdout
    warning = [ln for ln in proc.stderr.splitlines() if "missed outer_tol" in ln]
    assert len(warning) == 1 and warning[0].startswith("W"), proc.stderr[-3000:]
    assert (f"2 of the store's 2 images missed outer_tol=1e-06 ({store['outer_diverged']} of them diverged) and "
            f"{store['nonconverged']} of {store['systems_solved']} solves did not converge") in warning[0]
    assert summary["runs"] == [{"run": run, "config": summary["config"], "machine": summary["machine"]}]
    # the same command again: nothing computed; the first run's record is kept
    proc = _run("experiments.precompute", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to compute (2 chunk(s) already done): precompute_summary.json keeps the 1 earlier run(s)" \
        in proc.stderr, proc.stderr[-3000:]
    again = json.load(open(wd / "precompute_summary.json"))
    assert again["run"]["chunks_computed"] == 0 and again["run"]["chunks_skipped"] == 2
    assert again["runs"] == summary["runs"] and again["runs"][0]["run"]["seconds"] == run["seconds"]
    assert again["store"] == store


# ----------------------------------------------------------------------------------------------
# A: another config.precompute / config.data on a built-in run
# ----------------------------------------------------------------------------------------------


def _record(wd, fingerprint):
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump({"train": {}, "model": {}, "data": {"fingerprint": fingerprint}}, f)


def _cache(wd, key, settings, fingerprint):
    np.savez(os.path.join(wd, "builtin_trajectories.npz"), x=np.zeros(1), t=np.zeros(1), key=np.asarray(key),
             settings=np.asarray(json.dumps(settings)), fingerprint=np.asarray(fingerprint))


def test_builtin_settings_of_the_run_are_compared_before_precomputing(tmp_path):
    from experiments import train
    from krylovjax.precompute import PrecomputeConfig

    cfg = _train_config()
    pc = PrecomputeConfig(sde="ve", sde_kwargs=(("sigma", 5.0),), **cfg.precompute.to_dict())
    settings = train._builtin_settings(cfg, pc)
    assert settings["data"] == {"image_size": 8, "num_images": 2, "seed": 0}
    assert settings["precompute"]["outer_tol"] == 1e-4
    wd = str(tmp_path / "run")
    train._check_builtin_settings(wd, settings, "k1")  # no run there
    _record(wd, "fp")
    train._check_builtin_settings(wd, settings, "k1")  # no kept data: compared once computed
    run_settings = json.loads(json.dumps(settings))
    run_settings["precompute"]["outer_tol"] = 1e-2
    run_settings["data"]["seed"] = 3
    _cache(wd, "k0", run_settings, "other-fp")  # another run's kept data: cannot tell here
    train._check_builtin_settings(wd, settings, "k1")
    _cache(wd, "k1", run_settings, "fp")  # the same key: the same data
    train._check_builtin_settings(wd, settings, "k1")
    _cache(wd, "k0", run_settings, "fp")
    with pytest.raises(ValueError, match=(
            r"^config\.data, config\.precompute: differ from the settings the run in '.*run' pre-computed its "
            r"built-in data with \(config\.data\.seed: the run's 3, given 0; config\.precompute\.outer_tol: the "
            r"run's 0\.01, given 0\.0001\); use the run's settings, or a new --workdir \(nothing was pre-computed "
            r"or changed\)$")):
        train._check_builtin_settings(wd, settings, "k1")
    run_settings["data"]["seed"] = 0
    _cache(wd, "k0", run_settings, "fp")
    with pytest.raises(ValueError, match=r"^config\.precompute: differs from .*\(config\.precompute\.outer_tol: "):
        train._check_builtin_settings(wd, settings, "k1")


def test_builtin_data_other_than_the_runs_is_refused_and_the_kept_file_stays(tmp_path, monkeypatch):
    """The kept data cannot tell (none, or an older file): the trajectories are computed, and the
    fingerprint the run trained on is compared before the file is replaced."""
    import krylovjax.precompute as kp
    from experiments import train
    from krylovjax import training, transport
    from krylovjax.precompute import PrecomputeConfig

    cfg = _train_config()
    tc = _train_cfg(cfg)
    pc = PrecomputeConfig(sde="ve", sde_kwargs=(("sigma", 5.0),), **cfg.precompute.to_dict())
    images = np.full((2, 3, 8, 8), 0.5)
    n = pc.num_steps + 1
    res = types.SimpleNamespace(scores=None, t=np.linspace(1e-3, 1.0, n), dt=None, stats={})
    monkeypatch.setattr(kp, "precompute_scores", lambda x, c: res)
    x = np.random.default_rng(0).standard_normal((2, n, 3, 8, 8))
    monkeypatch.setattr(transport, "embed", lambda *a: x)
    wd = str(tmp_path / "run")
    settings = train._builtin_settings(cfg, pc)
    data = train._builtin_data(images, pc, tc, wd, settings)  # no run: computed and kept
    fp = training.prepare_data(tc, data)[1]["fingerprint"]
    with np.load(os.path.join(wd, "builtin_trajectories.npz")) as z:
        assert str(z["fingerprint"]) == fp and json.loads(str(z["settings"])) == settings
    _record(wd, "the run's")
    os.remove(os.path.join(wd, "builtin_trajectories.npz"))
    np.savez(os.path.join(wd, "builtin_trajectories.npz"), x=x, t=res.t, key=np.asarray("older"))
    before = snapshot(wd)
    with pytest.raises(ValueError, match=r"^config\.data, config\.precompute: the built-in trajectories computed "
                                         r"now differ from those the run in .* trained on \(data\.fingerprint\)"):
        train._builtin_data(images, pc, tc, wd, settings)
    assert snapshot(wd) == before
    _record(wd, fp)  # the run's own data: computed again and kept
    train._builtin_data(images, pc, tc, wd, settings)
    with np.load(os.path.join(wd, "builtin_trajectories.npz")) as z:
        assert str(z["fingerprint"]) == fp


def test_ddpm_builtin_photos_of_another_config_data_named(tmp_path):
    from experiments import train
    from krylovjax import training

    cfg = _train_config()
    cfg.method = "ddpm"
    tc = _train_cfg(cfg)
    images = np.full((2, 3, 8, 8), 0.5)
    wd = str(tmp_path / "run")
    train._check_builtin_photos(wd, tc, images)  # no run
    _record(wd, training.prepare_data(tc, images)[1]["fingerprint"])
    train._check_builtin_photos(wd, tc, images)
    with pytest.raises(ValueError, match=r"^config\.data: the built-in photos \(image_size, num_images, seed\) "
                                         r"differ from those the run in .* trained on"):
        train._check_builtin_photos(wd, tc, images * 0.5)


# ----------------------------------------------------------------------------------------------
# G: nothing to train, said at once
# ----------------------------------------------------------------------------------------------


def test_already_done_needs_the_step_reached_its_result_and_the_runs_data(tmp_path):
    from experiments import train

    cfg = _train_config()
    cfg.num_steps = 4
    tc = _train_cfg(cfg)
    wd = tmp_path / "run"
    calls = []

    def same():
        calls.append(1)
        return "fp"

    assert train._already_done(str(wd), tc, same) is None
    (wd / "checkpoints" / "2").mkdir(parents=True)
    (wd / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save not finished
    assert train._checkpoint_step(str(wd)) == 2
    assert train._already_done(str(wd), tc, same) is None  # 2 < 4: training to do
    (wd / "checkpoints" / "6").mkdir()
    assert train._already_done(str(wd), tc, same) is None  # no result.json of that step (killed before it)
    result = {"step": 6, "resumed_from": None, "last_loss": 1.5, "last_loss_step": 6, "train_seconds": 3.0,
              "compile_seconds": 12.0}
    (wd / "result.json").write_text(json.dumps(result))
    assert train._already_done(str(wd), tc, same) is None and not calls  # no run record: training.train decides
    _record(str(wd), "fp")
    assert train._already_done(str(wd), tc, lambda: "other data") is None  # refused by training.train
    assert train._already_done(str(wd), tc, lambda: None) is None  # not known without pre-computing
    done = train._already_done(str(wd), tc, same)
    assert done == (6, result) and calls == [1]
    train._keep_result(str(wd), done, tc)
    assert json.load(open(wd / "result.json")) == dict(result, resumed_from=6)


@pytest.mark.slow
def test_train_builtin_rerun_with_other_precompute_refused_and_past_num_steps_at_once(tmp_path):
    """A: pre-computed again, replaced builtin_trajectories.npz, then refused by training's record
    check ("another store or other images"). G: compiled ~13 s before "nothing was trained"."""
    wd = tmp_path / "bi"
    proc = _run("experiments.train", *TRAIN, f"--workdir={wd}", "--config.num_steps=2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = snapshot(wd)
    proc = _run("experiments.train", *TRAIN, f"--workdir={wd}", "--config.num_steps=4",
                "--config.precompute.outer_tol=1e-2", timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _last_line(proc) == (
        f"error: config.precompute: differs from the settings the run in {str(wd)!r} pre-computed its built-in data "
        "with (config.precompute.outer_tol: the run's 0.0001, given 0.01); use the run's settings, or a new "
        "--workdir (nothing was pre-computed or changed)"), proc.stderr[-3000:]
    assert "pre-computed scores of" not in proc.stderr
    assert snapshot(wd) == kept
    first = json.load(open(wd / "result.json"))
    t0 = time.perf_counter()
    proc = _run("experiments.train", *TRAIN, f"--workdir={wd}", "--config.num_steps=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already stood at step 2 (--config.num_steps=1): nothing was trained" in proc.stderr
    for work in ("pre-computed", "read the pre-computed", "training ours on", "resuming"):
        assert work not in proc.stderr, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    assert json.load(open(wd / "result.json")) == dict(first, resumed_from=2)
    assert {k: v for k, v in snapshot(wd).items() if k != "result.json"} == \
        {k: v for k, v in kept.items() if k != "result.json"}  # metrics.jsonl: no "start" record added
