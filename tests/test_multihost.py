"""Multi-host pre-computation: two processes under jax.distributed (CPU backend, localhost
coordinator) run the unchanged binary; each writes only its own chunks (chunk % 2), process 0
creates the manifest and the summary, and the combined store equals a one-process run."""
import dataclasses
import json
import os
import re
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


@pytest.mark.parametrize("local_devices, shard", [(1, False), (2, True)])
def test_two_processes_equal_one(tmp_path, local_devices, shard):
    """With one device per process, and with two per process splitting each chunk over them
    (``precompute.shard=True``, which failed in every job of several processes: jit refused the
    host arrays of a sharded program; a walkthrough, 2026-12-07)."""
    workdir = str(tmp_path / "two")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(local_devices)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.precompute", "--config=experiments/configs/demo.py",
         f"--workdir={workdir}", "--noprogress", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", "--wait_s=120", *OVERRIDES,
         f"--config.precompute.shard={shard}"],
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
    for out, _ in outs:  # each chunk's systems over this process's devices
        assert re.search(rf"devices per chunk +{local_devices if shard else 1} of {local_devices} local\n", out), \
            out[-2000:]

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
    pcfg = dataclasses.replace(pcfg, shard=shard)  # (recorded in the store's config: the same run)
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


def test_a_process_that_stops_is_named_and_the_others_do_not_wait_for_it(tmp_path):
    """SIGTERM to process 1 of a two-process pre-computation before its chunks are done:
    process 1 ends with status 130 and leaves a note; process 0, done with its own chunks, stops
    waiting for process 1's (``--wait_s``, an hour by default) and ends with one line naming
    it, the chunks complete and what to do. Before, process 0 waited without a word, and process 1
    hung in JAX's shutdown barrier until both aborted minutes later (a walkthrough, 2026-12-07)."""
    import time

    from _multiprocess import cpu_env, free_port, process_flags, run_all, running, sigterm_one

    workdir = str(tmp_path / "run")
    over = ["--config.num_images=8", "--config.image_size=8", "--config.chunk_images=1",
            "--config.precompute.num_steps=3", "--config.precompute.strategy=gmres"]

    def commands():
        port = free_port()
        return [["-m", "experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={workdir}",
                 "--noprogress", *process_flags(2, port, i), *over] for i in range(2)]

    with running(commands(), [cpu_env(1)] * 2) as procs:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # process 1 has its images and starts on its chunks
            line = procs[1].stderr.readline()
            seen.append(line)
            if "process(es)" in line or not line:
                break
        assert "process(es)" in seen[-1], "".join(seen)[-2000:]
        outs, waited = sigterm_one(procs, 1)
    assert procs[1].returncode == 130, outs[1][1][-2000:]
    assert procs[0].returncode == 1, outs[0][1][-3000:]
    last = outs[0][1].strip().splitlines()[-1]
    assert last.startswith("error: the store is incomplete (") and "process 1 stopped (interrupted)" in last, last
    assert last.endswith("run the same command on every process again to complete it (the complete chunks are kept)")
    assert waited < 60  # not --wait_s (3600 s), nor JAX's shutdown timeout (300 s)
    # the same command on both processes completes the store
    outs = run_all(commands(), [cpu_env(1)] * 2, timeout=240)
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    assert "store: images              8 (complete)" in outs[0][1], outs[0][1][-2000:]


def test_a_second_job_is_refused_by_every_process(tmp_path):
    """A one-process run holds the workdir (process 0's lock); a two-process job started there:
    its process 0 is refused, and its process 1, whose own lock was free, is refused with it
    (before, it went on writing chunks beside the first run until the store refused a chunk
    written twice; a walkthrough, 2026-12-07)."""
    from _multiprocess import cpu_env, free_port, process_flags, run_all

    from krylovjax import workdir_lock

    workdir = str(tmp_path / "run")
    port = free_port()
    cmds = [["-m", "experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={workdir}",
             "--noprogress", *process_flags(2, port, i), *OVERRIDES] for i in range(2)]
    with workdir_lock.hold(workdir):  # the first run (this test's process)
        outs = run_all(cmds, [cpu_env(1)] * 2, timeout=120)
    for rc, _, err in outs:
        assert rc == 1, err[-3000:]
    assert "is in use by another run" in outs[0][2].strip().splitlines()[-1], outs[0][2][-2000:]
    assert outs[1][2].strip().splitlines()[-1] == (
        f"error: workdir: {workdir!r}: process 0 of this job could not take it (see its own message); nothing was "
        "done here"), outs[1][2][-2000:]
    assert not os.path.exists(os.path.join(workdir, "store"))


def test_a_process_without_a_chunk_is_told_why(tmp_path):
    """Five images in one chunk of eight for two processes: process 1 has nothing to do, and says
    why and what shares the work (it printed "0 of 5" alone; a walkthrough, 2026-12-07)."""
    from _multiprocess import cpu_env, free_port, process_flags, run_all

    port = free_port()
    cmds = [["-m", "experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={tmp_path / 'w'}",
             "--noprogress", *process_flags(2, port, i), *OVERRIDES, "--config.chunk_images=8"] for i in range(2)]
    outs = run_all(cmds, [cpu_env(1)] * 2, timeout=120)
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    assert "process 1 owns no chunk: 1 chunk(s) of 8 image(s) for 2 processes; a smaller --config.chunk_images " \
           "shares the work" in outs[1][2], outs[1][2][-2000:]
    assert "owns no chunk" not in outs[0][2]
