"""The benchmark binaries run through their flags on tiny problems and write the JSON rows the
issues name; their solutions agree with the spsolve reference they are timed against. (Speed is
never asserted here: it is measured by the binaries and recorded in BUILD_NOTES.md.)"""
import json
import os
import subprocess
import sys

import pytest
from _multiprocess import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
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
    assert "machine" in doc and doc["complete"] is True  # written after every row, complete at the end
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
    assert doc["flags"]["tol"] == 1e-8 and doc["flags"]["time_steps"] == ["early", "late"]  # the default used


def test_bench_solvers_says_which_solves_did_not_converge(tmp_path):
    """A row whose solver reported systems short of ``tol`` says so in its table row, with a note
    under the table; the ``--workdir`` table carries the machine line (a walkthrough, 2026-12-07,
    saw float32 speed-ups of solves that had all failed, shown as any other)."""
    # GMRES(1) within its 100-matvec cap: 4 of the 6 late-step systems at 16x16 do not converge
    proc = _run("experiments.bench_solvers", "--sizes=16", "--batch=2", "--repeats=1", "--restart=1",
                "--time_steps=late", "--methods=gmres,jax_gmres_vmap", f"--workdir={tmp_path}")
    doc = json.loads((tmp_path / "bench_solvers.json").read_text())
    md = (tmp_path / "bench_solvers.md").read_text()
    assert md.startswith("Machine: ") and "float64, tol 1e-08, scheme consistent" in md.splitlines()[0]
    assert f"wrote {tmp_path / 'bench_solvers.md'}" in proc.stdout
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert "| not converged | speed-up |" in table[0]
    rows = doc["rows"]
    assert [r["method"] for r in rows] == ["spsolve", "gmres", "jax_gmres_vmap"] and len(table) == 1 + 3
    assert rows[1]["nonconverged"] > 0 and rows[0]["nonconverged"] is None and rows[2]["nonconverged"] is None
    for r, line in zip(rows, table[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["method"]
        assert cells[-2] == ("-" if r["nonconverged"] is None else str(r["nonconverged"]))  # jax.scipy: unknown
        assert cells[-1].endswith("(not converged)") == bool(r["nonconverged"]), line
    assert "1 row(s) with systems that did not reach tol 1e-08" in md


def test_bench_precompute_json(tmp_path):
    out = tmp_path / "pre.json"
    _run("experiments.bench_precompute", "--sizes=8", "--images=2", "--num_steps=3",
         "--strategies=gmres,fast", "--repeats=1", "--subsets=all", f"--json_out={out}")
    doc = json.loads(out.read_text())
    assert "machine" in doc and doc["complete"] is True and doc["flags"]["sizes"] == ["8"]  # after every row
    assert doc["flags"]["tol"] == 1e-10  # the float64 default the runs used (--tol not given)
    rows = doc["rows"]
    assert [r["strategy"] for r in rows] == ["spsolve", "gmres", "fast"]
    for r in rows:
        for k in ("strategy", "size", "images", "seconds", "speedup_vs_spsolve",
                  "max_rel_diff_vs_spsolve", "nonconverged"):
            assert k in r, (k, r)
        assert r["images"] == 2 and r["size"] == 8 and r["seconds"] > 0
        assert r["max_rel_diff_vs_spsolve"] < 1e-6 and r["nonconverged"] == 0


def test_bench_train_step_json(tmp_path):
    out = tmp_path / "train_step.json"
    tiny = ["--config.data.size=16", "--config.common.model_overrides.ch=8", "--config.common.model_overrides.ch_mult=(1,)",
            "--config.common.model_overrides.attn_resolutions=()", "--config.ours.precompute.num_steps=3",
            "--config.ours.precompute.max_sweeps=2"]
    # ours only (its data need the pre-computation; DDPM runs the same loop): each method
    # compiles two train steps, most of this test's time
    _run("experiments.bench_train_step", *tiny, "--steps=4", "--steps_per_call=1,2", "--repeats=1", "--methods=ours",
         f"--json_out={out}")
    doc = json.loads(out.read_text())
    assert doc["machine"]["platform"] == "cpu" and doc["steps"] == 4 and doc["complete"] is True
    rows = doc["rows"]
    assert [(r["method"], r["steps_per_call"], r["unrolled"]) for r in rows] == [
        ("ours", 1, None), ("ours", 2, True)]  # unrolled on CPU
    assert [r["batch_size"] for r in rows] == [1, 1]  # the demo's batch for ours
    for r in rows:
        assert r["ms_per_step"] > 0 and r["ms_per_step"] == min(r["ms_per_step_runs"])
        assert r["compile_seconds"] > 0  # the single step, then only the 2-update program
    for base, r in zip(rows[::2], rows[1::2]):
        assert base["speedup"] == 1.0 and r["speedup"] == pytest.approx(base["ms_per_step"] / r["ms_per_step"])


def test_bench_load_images_json(tmp_path):
    """Three sources of the same photos: the PNG files and the array read back the same images,
    the JPEG files within its loss."""
    out = tmp_path / "load.json"
    proc = _run("experiments.bench_load_images", "--num_images=9", "--source_size=24", "--size=8",
                "--repeats=2", f"--json_out={out}")
    assert "| png | 9 | 24 -> 8 |" in proc.stdout
    doc = json.loads(out.read_text())
    rows = {r["source"]: r for r in doc["rows"]}
    assert list(rows) == ["png", "jpeg", "npy"] and doc["machine"]["platform"] == "cpu"
    for r in rows.values():
        assert r["images"] == 9 and r["size"] == 8 and len(r["seconds_runs"]) == 2
        assert r["seconds"] == min(r["seconds_runs"]) > 0 and r["disk_mb"] > 0
    assert rows["png"]["max_abs_diff_vs_png"] == 0.0 and rows["npy"]["max_abs_diff_vs_png"] == 0.0
    assert 0.0 < rows["jpeg"]["max_abs_diff_vs_png"] < 0.2


@pytest.mark.parametrize("module,args,match", [
    ("experiments.bench_solvers", ["--sizes=8", "--dtype=float16"], "dtype"),
    # below float32's resolution no solve can be shown to converge (the library never reports it met)
    ("experiments.bench_solvers", ["--dtype=float32", "--tol=1e-8"],
     "error: --tol: expected a tolerance at or above float32's machine epsilon 1.2e-07"),
    ("experiments.bench_solvers", ["--direct_repeats=0"], "error: --direct_repeats: expected an integer >= 1"),
    # the pre-computation's numbers, checked up front in one line (a traceback until 2026-12-07)
    ("experiments.bench_precompute", ["--outer_tol=0"], "error: outer_tol: expected a finite number > 0, got 0.0"),
    ("experiments.bench_precompute", ["--basis_size=0"], "error: basis_size: expected an integer >= 1, got 0"),
    ("experiments.bench_precompute", ["--subsets=converged"], "converged"),
    ("experiments.study_line_preconditioner", ["--preconditioners=none,ilu"], "preconditioners"),
    ("experiments.study_line_preconditioner", ["--preconditioners=line"], "cold baseline"),
    ("experiments.bench_train_step", ["--steps=10", "--steps_per_call=1,3"], "multiple of every"),
    ("experiments.study_dst_fft", ["--sizes=1,8"], "--sizes"),
    ("experiments.bench_load_images", ["--size=2"], "--size: expected an integer >= 4"),
    ("experiments.study_noise_estimate", ["--rho=2"], "--rho: expected comma-separated numbers in [0, 1]"),
])
def test_bench_bad_flags(module, args, match):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_study_line_preconditioner_json(tmp_path):
    out = tmp_path / "line.json"
    _run("experiments.study_line_preconditioner", "--sizes=12", "--batch=2", "--scheme=fitted",
         "--time_chunks=2", "--time_repeats=2", f"--json_out={out}")
    doc = json.loads(out.read_text())
    rows = {(r["step"], r["preconditioner"]): r for r in doc["rows"]}
    assert len(rows) == 12 and doc["timing"] and "machine" in doc
    for (step, p), r in rows.items():
        assert r["residual"] <= 1e-8, r  # every preconditioned solve reached the tolerance
        assert r["matvecs_per_system"] == pytest.approx(r["ratio_vs_cold"]
                                                        * rows[step, "none"]["matvecs_per_system"])
    for step in ("early", "late"):
        for p in ("diffusion", "adi", "line", "line_mod", "block"):
            assert rows[step, p]["iterations"] < rows[step, "none"]["iterations"], (step, p)
        # The block factorisation by rows drops only the far bands of each row's inverse.
        assert rows[step, "block"]["iterations"] < rows[step, "line_mod"]["iterations"], step
        # The line factorisation's error L_x D^-1 L_y has no diagonal part: smaller than ADI's.
        assert rows[step, "line"]["iterations"] < rows[step, "adi"]["iterations"], step
    # Early, where each image's advection dominates, capturing it beats the shared diffusion.
    assert rows["early", "line_mod"]["iterations"] < rows["early", "diffusion"]["iterations"]


_LINE_CHECK = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from experiments.bench_solvers import build_systems
from experiments.study_line_preconditioner import jax_line_apply, scipy_preconditioner
op, b, _ = build_systems(10, 1, num_steps=20, sigma=5.0, step="late", dtype=jnp.float64,
                         scheme="fitted")
y = np.random.default_rng(0).standard_normal(b.shape)
gtsv = np.asarray(jax_line_apply(op, jnp.asarray(y)))
from krylovjax.preconditioners import block_line_preconditioner
block = np.asarray(block_line_preconditioner(op, max_sweeps=60, sweep_tol=1e-15)(jnp.asarray(y)))
for i in range(op.batch_shape[0]):
    want = scipy_preconditioner(op.to_scipy(i), (10, 10), "line")(y[i].ravel())
    np.testing.assert_allclose(gtsv[i].ravel(), want, rtol=1e-12, atol=1e-12)
    want = scipy_preconditioner(op.to_scipy(i), (10, 10), "block")(y[i].ravel())
    np.testing.assert_allclose(block[i].ravel(), want, rtol=1e-10, atol=1e-12)
print("checked", op.batch_shape[0])
"""


def test_study_line_application_matches_scipy():
    """The timed gtsv form of the line preconditioner is the scipy study's ``line`` (the
    library's Thomas form is tested in test_preconditioners), and the library's block
    factorisation by rows is the study's ``block``. In a subprocess: the experiment
    modules define absl flags, which must not meet other binaries' in the test process."""
    proc = subprocess.run([sys.executable, "-c", _LINE_CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked 3" in proc.stdout


def test_study_dst_fft_json(tmp_path):
    out = tmp_path / "dst.json"
    _run("experiments.study_dst_fft", "--sizes=6,9", "--batch=3", "--rounds=1", f"--json_out={out}")
    doc = json.loads(out.read_text())
    assert "machine" in doc and [r["size"] for r in doc["rows"]] == [6, 9]
    for r in doc["rows"]:
        assert r["max_rel_diff"] < 1e-13  # the FFT form is the same operator
        assert r["matmul_us_per_system"] > 0 and r["fft_us_per_system"] > 0


def test_study_dst_fft_matches_the_assembled_inverse():
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse as sp

    from experiments.study_dst_fft import fft_inverse

    n, k = 7, 0.3
    t = sp.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1])
    A = (sp.identity(n * n) + k * (sp.kron(t, sp.identity(n)) + sp.kron(sp.identity(n), t))).toarray()
    x = np.random.default_rng(1).standard_normal((2, n, n))
    got = np.asarray(fft_inverse(k, n)(jnp.asarray(x)))
    want = np.linalg.solve(A, x.reshape(2, -1).T).T.reshape(2, n, n)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_study_noise_estimate_json(tmp_path):
    out = tmp_path / "noise.json"
    _run("experiments.study_noise_estimate", "--sizes=32", "--noise_std=0.1", "--rho=0,1",
         f"--json_out={out}")
    doc = json.loads(out.read_text())
    rows = {(r["rho"], r["photos"]): r for r in doc["rows"]}
    assert "machine" in doc and set(rows) == {(0.0, "colour"), (0.0, "gray"), (1.0, "colour")}
    for r in rows.values():
        assert 0 < r["haar_min"] <= r["haar_max"] and 0 < r["pca_min"] <= r["pca_max"]
    # i.i.d. noise: both within 20 % on every photo at s = 0.1; channel-correlated noise: PCA collapses
    assert rows[0.0, "colour"]["haar_worst"] < 0.2 and rows[0.0, "colour"]["pca_worst"] < 0.2
    assert rows[1.0, "colour"]["pca_max"] < 0.5 and rows[1.0, "colour"]["haar_worst"] < 0.2


def test_pca_noise_estimate_on_pure_and_correlated_noise():
    """Chen et al.'s estimate, calibrated, is within 5 % of the truth on pure noise of any shape;
    noise shared by all channels lies in a third of the patch space, so the smallest eigenvalues
    are zero and it reads far below the truth, while each channel's std is still s (the reason
    restore keeps the Haar estimate)."""
    import numpy as np

    from experiments.study_noise_estimate import correlated_noise, patch_size, pca_estimate

    rng = np.random.default_rng(3)
    for shape in ((3, 3, 32, 32), (3, 1, 48, 40), (2, 3, 96, 96)):
        np.testing.assert_allclose(pca_estimate(0.1 * rng.standard_normal(shape)), 0.1, rtol=0.05)
    z = correlated_noise((4, 3, 64, 64), 1.0, rng)
    np.testing.assert_allclose(z.std(axis=(2, 3)), 1.0, rtol=0.05)
    assert np.all(pca_estimate(0.1 * z) < 0.03)
    half = correlated_noise((4, 3, 64, 64), 0.5, rng)
    np.testing.assert_allclose(np.corrcoef(half[:, 0].ravel(), half[:, 1].ravel())[0, 1], 0.5, atol=0.03)
    assert (patch_size(3, 32, 32), patch_size(3, 64, 64), patch_size(1, 64, 64), patch_size(3, 8, 8)) == (3, 5, 8, 3)
