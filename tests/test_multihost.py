"""Multi-host pre-computation: two processes under jax.distributed (CPU backend, localhost
coordinator) run the unchanged binary; each writes only its own chunks (chunk % 2), process 0
creates the manifest and the summary, and the combined store equals a one-process run."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from _multiprocess import xla_flags

from krylovjax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.num_images=5", "--config.image_size=8", "--config.chunk_images=1",
             "--config.precompute.num_steps=3", "--config.precompute.strategy=gmres"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_config():
    """The same images and PrecomputeConfig as the binary with OVERRIDES (in this process)."""
    sys.path.insert(0, ROOT)
    try:
        from experiments import precompute as binary
        from experiments.configs import demo
    finally:
        sys.path.remove(ROOT)
    cfg = demo.get_config()
    cfg.num_images, cfg.image_size, cfg.chunk_images = 5, 8, 1
    cfg.precompute.num_steps, cfg.precompute.strategy = 3, "gmres"
    return cfg, binary.precompute_config(cfg.precompute), binary.load(cfg)


def test_two_processes_equal_one(tmp_path):
    workdir = str(tmp_path / "two")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(1)  # one CPU device per process
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.precompute", "--config=experiments/configs/demo.py",
         f"--workdir={workdir}", "--noprogress", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", "--wait_s=120", *OVERRIDES],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "process 0/2" in outs[0][0] and "process 1/2" in outs[1][0]

    # Ownership: chunk i was written by process i % 2; each process computed only its own.
    complete = os.path.join(workdir, "store", "complete")
    for name in sorted(os.listdir(complete)):
        with open(os.path.join(complete, name)) as f:
            marker = json.load(f)
        assert marker["process_index"] == marker["chunk"] % 2
    with open(os.path.join(workdir, "precompute_summary.json")) as f:
        s0 = json.load(f)
    with open(os.path.join(workdir, "precompute_summary_process1.json")) as f:
        s1 = json.load(f)
    assert s0["run"]["process_count"] == 2 and s0["run"]["chunks_computed"] == 3
    assert s1["run"]["process_index"] == 1 and s1["run"]["chunks_computed"] == 2
    assert s0["store"]["images"] == 5
    assert s0["store"]["systems_solved"] == s0["run"]["systems_solved"] + s1["run"]["systems_solved"]

    # The combined store equals a one-process run of the same config.
    import jax

    jax.config.update("jax_enable_x64", True)
    cfg, pcfg, images = _reference_config()
    one = str(tmp_path / "one")
    pipeline.run_precompute(images, pcfg, one, chunk_images=1, store_dtype=cfg.store_dtype,
                            progress=False)
    kw = dict(chunk_images=1, store_dtype=cfg.store_dtype)
    ref = pipeline.open_store(one, images, pcfg, **kw)
    two = pipeline.open_store(workdir, images, pcfg, **kw)  # same manifest: not refused
    assert two.manifest["inputs_hash"] == ref.manifest["inputs_hash"]
    for name in ref.fields:
        a, b = two.read_all(name), ref.read_all(name)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("index,count,match", [(2, 2, "process_index"), (0, 0, "process_count")])
def test_bad_process_arguments(tmp_path, index, count, match):
    cfg, pcfg, images = _reference_config()
    with pytest.raises(ValueError, match=match):
        pipeline.run_precompute(images, pcfg, str(tmp_path), process_index=index,
                                process_count=count, progress=False)
    assert os.listdir(tmp_path) == []
