"""The resumable pipeline (krylovjax.pipeline) and the pre-computation binary.

A killed run resumes where it stopped (finished chunks untouched) and ends with the same arrays
as an uninterrupted run; other configs / images are refused; bad images are refused with nothing
written; the stored fields equal the library calls they come from and the spsolve reference.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from krylovjax import data, pipeline, transport
from krylovjax.precompute import PrecomputeConfig, precompute_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, NUM = 10, 4
CFG = PrecomputeConfig(num_steps=4, strategy="gmres", outer_tol=1e-7, chunk_size=6)
ARRAY_FIELDS = ("log_density", "scores", "embedded", "t")


@pytest.fixture(scope="module")
def images():
    return data.builtin_dataset(SIZE, NUM, seed=0).astype(np.float64)


def _markers(workdir):
    """The completion markers on disk. The store writes each one atomically through a hidden
    temporary file (``.chunk_...json.XXXX.tmp``) that is then renamed; a poll can see that file
    for a moment, and it is not a marker (the store's own listing ignores it too)."""
    d = os.path.join(workdir, "store", "complete")
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []


def _all_fields(workdir, images, cfg=CFG, **kw):
    store = pipeline.open_store(workdir, images, cfg, **kw)
    assert store.is_complete()
    return {name: store.read_all(name) for name in store.fields}


@pytest.fixture(scope="module")
def reference_run(images, tmp_path_factory):
    """An uninterrupted run: chunks of one image, float64 store."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = pipeline.run_precompute(images, CFG, workdir, chunk_images=1,
                                      store_dtype=np.float64, progress=False)
    return workdir, summary, _all_fields(workdir, images, chunk_images=1, store_dtype=np.float64)


def test_store_equals_library_calls_and_spsolve(images, reference_run):
    workdir, summary, fields = reference_run
    assert summary.chunks_computed == NUM and summary.chunks_skipped == 0 and summary.complete
    assert fields["log_density"].shape == (NUM, 3, 4, SIZE, SIZE)
    assert fields["scores"].shape == (NUM, 3, 4, 2, SIZE, SIZE)
    assert fields["embedded"].shape == (NUM, 4, 3, SIZE, SIZE)
    # Chunk 2 recomputed directly with the library: identical.
    one = images[2:3]
    res = precompute_scores(one, CFG)
    x = transport.embed(one, res.scores, CFG.make_sde(), res.t, res.dt)
    np.testing.assert_allclose(fields["log_density"][2:3], res.log_density, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fields["scores"][2:3], res.scores, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fields["embedded"][2:3], x, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(fields["t"][2], np.asarray(res.t))
    assert fields["sweeps"][2] == res.stats["sweeps"][0]
    assert fields["matvecs"][2] == res.stats["matvecs"] > 0
    assert fields["systems"][2] == res.stats["systems_solved"] == 3 * 3 * res.stats["sweeps"][0]
    assert fields["outer_converged"].all() and (fields["nonconverged"] == 0).all()
    assert fields["sweeps"].dtype == np.int32 and fields["matvecs"].dtype == np.int64
    assert fields["outer_converged"].dtype == np.bool_
    # The whole store against the spsolve reference on all images at once (another batching).
    ref = precompute_scores(images, PrecomputeConfig(num_steps=4, strategy="spsolve",
                                                     outer_tol=1e-7))
    scale = np.abs(np.asarray(ref.scores)).max()
    assert np.abs(fields["scores"] - np.asarray(ref.scores)).max() / scale < 1e-8
    np.testing.assert_array_equal(fields["sweeps"], ref.stats["sweeps"])
    # Totals from the store's statistics fields.
    tot = pipeline.summarize_store(pipeline.open_store(workdir, images, CFG, chunk_images=1,
                                                       store_dtype=np.float64))
    assert tot["images"] == NUM and tot["systems_solved"] == summary.systems_solved
    assert tot["matvecs"] == summary.matvecs and tot["sweeps_max"] == summary.sweeps_max


def test_store_readable_by_training(images, reference_run):
    from krylovjax import training

    workdir, _, fields = reference_run
    traj = training.trajectories_from_store(os.path.join(workdir, "store"))
    np.testing.assert_array_equal(traj.x, fields["embedded"])
    np.testing.assert_allclose(traj.t, fields["t"][0], rtol=1e-15)
    assert traj.sde == {"name": "ve", "kwargs": {"sigma": 5.0}}


_WORKER = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from krylovjax import data, pipeline, store
    from krylovjax.precompute import PrecomputeConfig

    original = store.ScoreStore.write_chunk
    def slow_write_chunk(self, index, arrays):  # a long computation after every chunk
        original(self, index, arrays)
        time.sleep(60)
    store.ScoreStore.write_chunk = slow_write_chunk
    images = data.builtin_dataset({size}, {num}, seed=0).astype(np.float64)
    cfg = PrecomputeConfig(num_steps=4, strategy="gmres", outer_tol=1e-7, chunk_size=6)
    pipeline.run_precompute(images, cfg, sys.argv[1], chunk_images=1, store_dtype=np.float64,
                            progress=False)
""")


def test_sigkill_then_resume(images, reference_run, tmp_path):
    """A process killed (SIGKILL) after its first chunk resumes from chunk 1 and ends with the
    same arrays as the uninterrupted run; chunk 0 is not recomputed."""
    workdir = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(size=SIZE, num=NUM), workdir],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _markers(workdir) == [] and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        assert _markers(workdir) == ["chunk_00000000.json"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _markers(workdir) == ["chunk_00000000.json"]
    marker_path = os.path.join(workdir, "store", "complete", "chunk_00000000.json")
    with open(marker_path) as f:
        marker = json.load(f)
    assert marker["pid"] == proc.pid

    summary = pipeline.run_precompute(images, CFG, workdir, chunk_images=1,
                                      store_dtype=np.float64, progress=False)
    assert (summary.chunks_skipped, summary.chunks_computed) == (1, NUM - 1)
    assert summary.images_computed == NUM - 1 and summary.complete
    with open(marker_path) as f:
        assert json.load(f) == marker  # chunk 0 untouched: the killed process's marker
    store = pipeline.open_store(workdir, images, CFG, chunk_images=1, store_dtype=np.float64)
    assert all(store.verify_chunk(i) for i in range(NUM))
    fields = _all_fields(workdir, images, chunk_images=1, store_dtype=np.float64)
    for name, ref in reference_run[2].items():
        np.testing.assert_array_equal(fields[name], ref, err_msg=name)


def _two_kept_then_resumed(images, reference_run, tmp_path):
    """After a run stopped in its third chunk: two chunks are complete, and the same call
    computes the other two and ends with the uninterrupted run's arrays."""
    assert _markers(str(tmp_path)) == ["chunk_00000000.json", "chunk_00000001.json"]
    summary = pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=1,
                                      store_dtype=np.float64, progress=False)
    assert (summary.chunks_skipped, summary.chunks_computed) == (2, 2)
    fields = _all_fields(str(tmp_path), images, chunk_images=1, store_dtype=np.float64)
    for name, ref in reference_run[2].items():
        np.testing.assert_array_equal(fields[name], ref, err_msg=name)


def test_exception_between_chunks_then_resume(images, reference_run, tmp_path, monkeypatch):
    """An exception after two chunks (e.g. a solver crash): resume computes only the rest."""
    calls = []
    real = pipeline._compute_chunk

    def failing(*args, **kw):
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "_compute_chunk", failing)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=1,
                                store_dtype=np.float64, progress=False)
    monkeypatch.setattr(pipeline, "_compute_chunk", real)
    _two_kept_then_resumed(images, reference_run, tmp_path)


def test_an_interrupt_python_swallowed_stops_the_chunk_at_its_next_sweep(images, reference_run, tmp_path,
                                                                          monkeypatch):
    """An interrupt Python could not raise where it came (inside a gc callback: experiment_utils
    remembers it, a SIGTERM in CI, 2026-12-07) stops the run between two sweeps of the chunk in
    flight: the two chunks done are kept, and the same call completes the store exactly."""
    from krylovjax import experiment_utils as eu

    calls = []
    real = pipeline._compute_chunk

    def swallowed_in_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # as sys.unraisablehook leaves it (sigterm_as_interrupt's)
            eu._SWALLOWED.append("_xla_gc_callback")
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "_compute_chunk", swallowed_in_the_third)
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=1,
                                    store_dtype=np.float64, progress=False)
        assert not eu._SWALLOWED  # acted on, once
    finally:
        eu._SWALLOWED.clear()
    monkeypatch.setattr(pipeline, "_compute_chunk", real)
    _two_kept_then_resumed(images, reference_run, tmp_path)


def test_failed_background_write_raises_then_resume(images, reference_run, tmp_path, monkeypatch):
    """Chunk writes run in a background thread: a write that fails (disk full, say) is raised
    by run_precompute once the next chunk is computed; the chunks written before it are
    complete, the failed one is absent, and a rerun computes only what is missing."""
    from krylovjax.store import ScoreStore

    real = ScoreStore.write_chunk

    def failing(self, index, values):
        if index == 1:
            raise OSError("injected write failure")
        return real(self, index, values)

    monkeypatch.setattr(ScoreStore, "write_chunk", failing)
    with pytest.raises(OSError, match="injected"):
        pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=1,
                                store_dtype=np.float64, progress=False)
    assert _markers(str(tmp_path)) == ["chunk_00000000.json"]
    monkeypatch.setattr(ScoreStore, "write_chunk", real)
    summary = pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=1,
                                      store_dtype=np.float64, progress=False)
    assert (summary.chunks_skipped, summary.chunks_computed) == (1, NUM - 1)
    fields = _all_fields(str(tmp_path), images, chunk_images=1, store_dtype=np.float64)
    for name, ref in reference_run[2].items():
        np.testing.assert_array_equal(fields[name], ref, err_msg=name)


def test_a_corrupted_chunk_is_refused_by_training_and_computed_again_on_resume(images, reference_run, tmp_path):
    """A finite value changed in a stored trajectory went unnoticed: a resumed run took the chunk
    as done and training read it (a walkthrough). Now training refuses it, naming the chunk and the
    field, and a resumed run checks its chunks against their markers' checksums and computes the
    damaged one again, with a warning, ending with the uninterrupted run's store bit for bit."""
    import shutil

    from krylovjax import training
    from krylovjax.store import StoreDamagedError

    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run[0], workdir)
    complete = os.path.join(workdir, "store", "complete")
    markers = {n: open(os.path.join(complete, n)).read() for n in _markers(workdir)}
    shard = os.path.join(workdir, "store", "arrays", "embedded", "c", "2", "0", "0", "0", "0")
    with open(shard, "r+b") as f:  # inside the first inner chunk (the shard index is at the end)
        f.seek(800)
        f.write(np.float64(0.5).tobytes())
    with pytest.raises(StoreDamagedError, match=r"field 'embedded' of chunk 2 \(images 2..2\) does not match the "
                                                r"checksum in its marker .*same flags to recompute it"):
        training.trajectories_from_store(os.path.join(workdir, "store"))
    with pytest.warns(UserWarning, match=r"store '.*': chunk 2 \(images 2..2\) was marked complete but the data "
                                         r"of field 'embedded' do not match the checksum in its marker .*it is "
                                         r"computed again"):
        summary = pipeline.run_precompute(images, CFG, workdir, chunk_images=1, store_dtype=np.float64,
                                          progress=False)
    assert (summary.chunks_skipped, summary.chunks_computed) == (NUM - 1, 1) and summary.complete
    for name in markers:  # the sound chunks untouched
        if name != "chunk_00000002.json":
            assert open(os.path.join(complete, name)).read() == markers[name]
    fields = _all_fields(workdir, images, chunk_images=1, store_dtype=np.float64)
    for name, ref in reference_run[2].items():
        assert fields[name].dtype == ref.dtype and fields[name].tobytes() == ref.tobytes(), name
    traj = training.trajectories_from_store(os.path.join(workdir, "store"))
    assert traj.x.tobytes() == reference_run[2]["embedded"].tobytes()


def test_binaries_refuse_a_damaged_manifest_in_one_line(tmp_path):
    """A truncated manifest.json gave JSONDecodeError tracebacks in both binaries; now one line
    naming the file and what to do."""
    store = tmp_path / "run" / "store"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text('{"format": "krylovjax.score_store", "vers')
    want = (f"'{store / 'manifest.json'}' is not valid JSON (Unterminated string starting at: line 1 column 37 "
            "(char 36)); the store is damaged: rerun the pre-computation (experiments.precompute) with --fresh")
    out = _binary(["--config=experiments/configs/demo.py", f"--workdir={tmp_path / 'run'}", "--noprogress",
                   "--config.num_images=2", "--config.image_size=8", "--config.precompute.num_steps=3"])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: path: {want}"), out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/train_tiny.py",
                          f"--store={store}", f"--workdir={tmp_path / 'train'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: store: {want}"), out.stderr[-3000:]


def test_other_config_or_images_refused(images, reference_run):
    workdir = reference_run[0]
    before = (_markers(workdir), open(os.path.join(workdir, "store", "manifest.json")).read())
    other = PrecomputeConfig(num_steps=4, strategy="spsolve", outer_tol=1e-7, chunk_size=6)
    with pytest.raises(ValueError, match=r"different run.*config\.precompute\.strategy"):
        pipeline.run_precompute(images, other, workdir, chunk_images=1, store_dtype=np.float64,
                                progress=False)
    changed = images.copy()
    changed[1, 0, 0, 0] = 0.5 * changed[1, 0, 0, 0]
    with pytest.raises(ValueError, match="inputs_hash differs"):
        pipeline.run_precompute(changed, CFG, workdir, chunk_images=1, store_dtype=np.float64,
                                progress=False)
    with pytest.raises(ValueError, match="chunk_size differs"):
        pipeline.run_precompute(images, CFG, workdir, chunk_images=2, store_dtype=np.float64,
                                progress=False)
    after = (_markers(workdir), open(os.path.join(workdir, "store", "manifest.json")).read())
    assert after == before


def test_store_records_the_dtype_jax_computes_in(images, tmp_path):
    """float64 images are computed in float32 when x64 is off: the store says so, and a store
    made that way is not resumed with x64 on (its chunks would mix the two precisions)."""
    m64 = pipeline.open_store(str(tmp_path / "a"), images, CFG).manifest
    assert m64["config"]["compute_dtype"] == "float64"
    with jax.enable_x64(False):
        m32 = pipeline.open_store(str(tmp_path / "b"), images, CFG).manifest
    assert m32["config"]["compute_dtype"] == "float32" and m32["inputs_hash"] != m64["inputs_hash"]
    with pytest.raises(ValueError, match="compute_dtype"):
        pipeline.open_store(str(tmp_path / "b"), images, CFG)


@pytest.mark.parametrize("bad, match", [
    (np.full((2, 3, 8, 8), np.nan), "finite"),
    (np.full((2, 3, 8, 8), 1.5), r"\[0, 1\]"),
    (np.zeros((3, 8, 8)), "rank 4"),
    (np.zeros((2, 2, 8, 8)), "C in"),
])
def test_bad_images_refused_nothing_written(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        pipeline.run_precompute(bad, CFG, str(tmp_path), chunk_images=1, progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_refused_nothing_written(images, tmp_path):
    with pytest.raises(ValueError, match="chunk_images"):
        pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=0, progress=False)
    with pytest.raises(ValueError, match="seed_image"):  # the last chunk has 1 image
        pipeline.run_precompute(images[:3], PrecomputeConfig(num_steps=4, seed_image=1),
                                str(tmp_path), chunk_images=2, progress=False)
    with pytest.raises(ValueError, match="embed_component"):
        pipeline.run_precompute(images, CFG, str(tmp_path), embed_component="z", progress=False)
    with pytest.raises(TypeError, match="store_dtype"):
        pipeline.run_precompute(images, CFG, str(tmp_path), store_dtype=np.int32, progress=False)
    with pytest.raises(TypeError, match="config"):
        pipeline.run_precompute(images, CFG.to_dict(), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def _binary(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.precompute", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_binary_runs_resumes_and_refuses(tmp_path):
    workdir = str(tmp_path / "run")
    flags = ["--config=experiments/configs/demo.py", f"--workdir={workdir}", "--noprogress",
             "--config.num_images=3", "--config.image_size=8", "--config.chunk_images=2",
             "--config.precompute.num_steps=3"]
    out = _binary(flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "precompute summary" in out.stdout and "systems / s" in out.stdout
    with open(os.path.join(workdir, "precompute_summary.json")) as f:
        summary = json.load(f)
    run, store = summary["run"], summary["store"]
    assert run["images_computed"] == 3 and run["chunks_computed"] == 2 and run["complete"]
    assert store["images"] == 3 and store["systems_solved"] == run["systems_solved"] > 0
    assert store["systems_solved"] == 3 * 2 * round(store["sweeps_mean"] * 3)
    assert summary["config"]["precompute"]["num_steps"] == 3
    # Same flags again: nothing left to do.
    out = _binary(flags)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "precompute_summary.json")) as f:
        run2 = json.load(f)["run"]
    assert run2["chunks_skipped"] == 2 and run2["chunks_computed"] == 0
    # Another strategy on the same workdir: refused with the store's message.
    out = _binary(flags + ["--config.precompute.strategy=spsolve"])
    assert out.returncode != 0
    assert "config.precompute.strategy" in out.stderr


def test_binary_tfds_config_fails_fast(tmp_path):
    out = _binary(["--config=experiments/configs/cifar10.py", f"--workdir={tmp_path / 'w'}",
                   f"--config.data_dir={tmp_path / 'no_data'}", "--noprogress"], timeout=120)
    assert out.returncode != 0
    assert "tfds build cifar10" in out.stderr
    assert not os.path.exists(tmp_path / "w" / "store")


def test_the_progress_bar_is_drawn_within_a_chunk(images, tmp_path, monkeypatch, capsys):
    """Each sweep's postfix is drawn (at most every mininterval, here every time), not only at
    the chunk's end: a run of one chunk showed 0/N with no rate until it finished (a walkthrough
    at 128x128, 2026-12-07)."""
    from krylovjax import experiment_utils as eu

    real = eu.progress_bar
    monkeypatch.setattr(eu, "progress_bar", lambda **kw: _eager_bar(real, **kw))
    pipeline.run_precompute(images, CFG, str(tmp_path), chunk_images=NUM, store_dtype=np.float64, progress=True)
    err = capsys.readouterr().err
    before_end = [ln for ln in err.replace("\r", "\n").splitlines() if f" 0/{NUM} " in ln]
    assert any("sweep=1/" in ln for ln in before_end), err[-2000:]


def _eager_bar(real, **kw):
    bar = real(**kw)
    bar.mininterval = 0.0
    return bar
