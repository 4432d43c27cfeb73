"""The benchmark binaries run through their flags on tiny problems and write the JSON rows the
issues name; their solutions agree with the spsolve reference they are timed against. (Speed is
never asserted here: it is measured by the binaries and recorded in BUILD_NOTES.md.)"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_solvers_json(tmp_path):
    out = tmp_path / "solvers.json"
    _run("experiments.bench_solvers", "--sizes=8", "--batch=2", "--repeats=1",
         "--methods=splu,jax_gmres_vmap,gmres,cross_matrix_precond,fast",
         f"--json_out={out}")
    doc = json.loads(out.read_text())
    assert "machine" in doc
    rows = doc["rows"]
    keys = {"method", "size", "batch", "seconds_per_system", "matvecs_per_system", "residual",
            "max_rel_diff_vs_spsolve", "speedup_vs_spsolve"}
    methods = {r["method"] for r in rows}
    assert methods == {"spsolve", "splu", "jax_gmres_vmap", "gmres", "cross_matrix_precond", "fast"}
    for r in rows:
        assert keys <= set(r), r
        assert r["size"] == 8 and r["batch"] == 2
        assert r["seconds_per_system"] > 0 and r["speedup_vs_spsolve"] > 0
        assert r["max_rel_diff_vs_spsolve"] < 1e-7  # tol 1e-8 (default) in float64
        if r["method"] in ("gmres", "cross_matrix_precond", "fast"):
            assert r["residual"] <= 1.5e-8 and r["matvecs_per_system"] >= 1


def test_bench_precompute_json(tmp_path):
    out = tmp_path / "pre.json"
    _run("experiments.bench_precompute", "--sizes=8", "--images=2", "--num_steps=3",
         "--strategies=gmres,fast", "--repeats=1", "--subsets=all", f"--json_out={out}")
    rows = json.loads(out.read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["spsolve", "gmres", "fast"]
    for r in rows:
        for k in ("strategy", "size", "images", "seconds", "speedup_vs_spsolve",
                  "max_rel_diff_vs_spsolve", "nonconverged"):
            assert k in r, (k, r)
        assert r["images"] == 2 and r["size"] == 8 and r["seconds"] > 0
        assert r["max_rel_diff_vs_spsolve"] < 1e-6 and r["nonconverged"] == 0


@pytest.mark.parametrize("module,args,match", [
    ("experiments.bench_solvers", ["--sizes=8", "--dtype=float16"], "dtype"),
    ("experiments.bench_precompute", ["--subsets=converged"], "converged"),
])
def test_bench_bad_flags(module, args, match):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert match in proc.stderr
