"""Multi-host training: the unchanged train binary on 2 jax.distributed processes x 2 CPU devices
(localhost coordinator) equals one process with 4 devices, each process reading only its own
images of the ScoreStore, and the 2-process run resumes from its checkpoint.

Proof that a process reads only its shard: each process is given its own copy of the store in
which only *its* images' chunks are complete; reading any other image raises (ScoreStore refuses
incomplete chunks). The one-process reference reads the complete store.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from krylovjax import experiment_utils as eu
from krylovjax import training as tr
from krylovjax.store import ScoreStore, hash_inputs

from _multiprocess import ROOT, compile_cache_env, cpu_env, free_port, process_flags, run_all, running, sigterm_one

B, N, C, S = 6, 4, 3, 16  # 6 images over 4 devices: rows [0, 2) [2, 4) | [4, 6) [6, 8) (padding)
STORE_CFG = {"sde": "ve", "sde_kwargs": {"sigma": 5.0}, "num_steps": N, "eps": 1e-3}
OWN_ROWS = [[0, 4], [4, 6]]  # process 0 holds devices 0, 1; process 1 devices 2, 3

TRAIN = ["-m", "experiments.train", "--config=experiments/configs/train_tiny.py", "--data=store",
         "--config.method=ours", "--config.model_overrides.ch=16", "--config.model_overrides.ch_mult=(1,)",
         "--config.model_overrides.attn_resolutions=()", "--config.lr=0.002", "--config.warmup_steps=2",
         "--config.batch_size=8", "--config.progress=False", "--config.log_every=1",
         "--config.checkpoint_every=2"]


_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """One persistent XLA compilation cache for this module's runs: the segments and tests
    compile the same train step (a hit saves about 6 s per process)."""
    _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    _CACHE.clear()


def _env(local_devices: int) -> dict:
    return cpu_env(local_devices, **(compile_cache_env(_CACHE["dir"]) if "dir" in _CACHE else {}))


def _trajectories() -> np.ndarray:
    rng = np.random.default_rng(7)
    base = rng.random((B, 1, C, S, S))
    return (base * (1 - 0.2 * np.arange(N))[None, :, None, None, None]).astype(np.float32)  # [B, N, C, H, W]


def _store(path, x, images) -> str:
    """A store of ``x`` in which only the chunks (1 image each) of ``images`` are complete."""
    store = ScoreStore.create_or_open(path, config=STORE_CFG, inputs_hash=hash_inputs(x[:, 0], STORE_CFG),
                                      num_images=B, chunk_size=1, fields={"embedded": (x.shape[1:], np.float32, 0)})
    for i in images:
        store.write_chunk(i, {"embedded": x[i:i + 1]})
    return str(path)


def _run(workdirs, stores, num_steps, *, processes):
    """One run per (workdir, store) pair: ``processes`` = 2 -> one 2-process run over the pairs,
    ``processes`` = 1 -> the first pair as one process with 4 devices."""
    cmds, envs = [], []
    if processes == 2:
        port = free_port()
        for i in range(2):
            cmds.append(TRAIN + [f"--workdir={workdirs[i]}", f"--store={stores[i]}",
                                 f"--config.num_steps={num_steps}", *process_flags(2, port, i)])
            envs.append(_env(2))
    else:
        cmds.append(TRAIN + [f"--workdir={workdirs[0]}", f"--store={stores[0]}", f"--config.num_steps={num_steps}"])
        envs.append(_env(4))
    return cmds, envs


def _records(wd):
    """The records of a run's metrics.jsonl (a last line still being written is left out)."""
    out = []
    for line in open(os.path.join(wd, "metrics.jsonl")):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_two_processes_equal_one_and_resume(tmp_path):
    x = _trajectories()
    full = _store(tmp_path / "full", x, range(B))
    own = [_store(tmp_path / f"own{p}", x, range(*OWN_ROWS[p])) for p in range(2)]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")

    # Segment 1: the 2-process run to step 4 and the one-process reference to step 6, at once.
    c2, e2 = _run([two, two], own, 4, processes=2)
    c1, e1 = _run([one], [full], 6, processes=1)
    outs = run_all(c2 + c1, e2 + e1, timeout=240)
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    for p in range(2):  # what each process read, from its own log
        assert f"process {p}/2: read images [{OWN_ROWS[p]}] of {B}" in outs[p][2], outs[p][2][-2000:]
    assert f"process 0/1: read images [[0, {B}]] of {B}" in outs[2][2]

    # Segment 2: the 2-process run resumes from its step-4 checkpoint and goes on to step 6.
    c2, e2 = _run([two, two], own, 6, processes=2)
    outs = run_all(c2, e2, timeout=240)
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]

    # Only process 0 wrote records: one start per segment, one train record per step.
    recs = _records(two)
    starts = [r for r in recs if r["kind"] == "start"]
    assert [(r["step"], r["resumed_from"], r["num_processes"]) for r in starts] == [(0, None, 2), (4, 4, 2)]
    assert all(r["data_rows"] == OWN_ROWS and r["num_devices"] == 4 for r in starts)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    result = json.load(open(os.path.join(two, "result.json")))
    assert result["step"] == 6 and result["resumed_from"] == 4
    ref = _records(one)
    assert [r["data_rows"] for r in ref if r["kind"] == "start"] == [[[0, B]]]
    # Same batches, same losses (float32 rounding of the cross-process all-reduce aside).
    np.testing.assert_allclose([r["loss"] for r in recs if r["kind"] == "train"],
                               [r["loss"] for r in ref if r["kind"] == "train"], rtol=1e-5)

    # Final parameters, EMA and optimiser state equal to the one-process run. The batches are the
    # same bit for bit; what differs is the summation order of the gradient all-reduce (gloo
    # across processes, XLA within one), float32 rounding of ~1e-7 relative, which moves an Adam
    # update (at most ~lr per step) by a tiny fraction of it (measured: 1.2e-6 after 6 steps).
    # A wrong batch or shard changes every update by O(lr) = 2e-3, so the tolerance lr / 100
    # separates the two by two orders of magnitude each way.
    a, b = tr.load_checkpoint(two), tr.load_checkpoint(one)
    assert int(a.state.step) == int(b.state.step) == 6
    assert a.record["data"]["fingerprint"] == b.record["data"]["fingerprint"]
    lr = 2e-3
    for u, v in zip(jax.tree.leaves((a.state.params, a.state.ema_params)), jax.tree.leaves((b.state.params, b.state.ema_params))):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=lr / 100)
    for u, v in zip(jax.tree.leaves(a.state.opt_state), jax.tree.leaves(b.state.opt_state)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-7)  # Adam moments
    np.testing.assert_array_equal(np.asarray(a.state.rng), np.asarray(b.state.rng))
    init = tr.load_checkpoint(two, step=2).state.params  # the runs did move: the check can fail
    moved = max(float(np.abs(np.asarray(u) - np.asarray(v)).max())
                for u, v in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(init)))
    assert moved > 100 * lr / 100


# slow (32 s of the default suite's time on the 2-core CI-like VM): the two-process run and its
# resume are tested above, the budget stop and that its decision is process 0's in test_training
@pytest.mark.slow
def test_two_processes_stop_together_at_the_budget(tmp_path):
    """A wall-clock budget across processes: each process times its own steps, so their clocks
    can cross the budget at different steps; the stop follows process 0's clock (its records
    straddle the budget), both processes leave the loop after the same step (a process that
    left alone would leave the other blocked in the next step's all-reduce) and the final
    checkpoint is that step. test_training checks that the decision is process 0's."""
    x = _trajectories()
    own = [_store(tmp_path / f"own{p}", x, range(*OWN_ROWS[p])) for p in range(2)]
    wd, budget = str(tmp_path / "budget"), 1.5
    cmds, envs = _run([wd, wd], own, 100000, processes=2)
    cmds = [c + [f"--config.budget_seconds={budget}", "--config.checkpoint_every=100000"] for c in cmds]
    outs = run_all(cmds, envs, timeout=240)
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    result = json.load(open(os.path.join(wd, "result.json")))
    assert result["stop_reason"] == "budget"
    step = result["step"]
    for p in range(2):  # both processes report the same last step
        done = [line for line in outs[p][2].splitlines() if f"done (process {p}/2)" in line]
        assert len(done) == 1 and f"'step': {step}," in done[0] and "'budget'" in done[0], outs[p][2][-2000:]
    train = [r for r in _records(wd) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, step + 1))
    # Process 0's clock: below the budget before the last step, at or above it after.
    assert train[-2]["train_seconds"] < budget <= train[-1]["train_seconds"]
    assert int(tr.load_checkpoint(wd).state.step) == step


@pytest.mark.parametrize("flags, environ, match", [
    ((None, 2, 1), {}, "--coordinator_address"),
    (("127.0.0.1", 2, None), {}, "host:port"),
    (("127.0.0.1:1234", 2, 2), {}, r"--process_id: expected an integer in [0, 2)"),
    (("127.0.0.1:1234", 0, None), {}, "--num_processes"),
    (("auto", 2, 3), {}, r"--process_id: expected an integer in [0, 2)"),
    ((None, None, None), {"JAX_NUM_PROCESSES": "2"}, "--coordinator_address"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "x"}, "from $JAX_PROCESS_ID"),
    # the variables that were set are named (the message named only the flags)
    ((None, None, None), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "--num_processes/--process_id (from $JAX_NUM_PROCESSES and $JAX_PROCESS_ID): a multi-process run needs"),
    # a host:port without the layout: named (JAX said "Number of processes must be defined.")
    (("127.0.0.1:1234", None, None), {}, "--num_processes: expected the job's number of processes with "
                                         "--coordinator_address=127.0.0.1:1234"),
    (("127.0.0.1:1234", 2, None), {}, "--process_id: expected this process's index in [0, 2)"),
])
def test_bad_process_flags_are_refused(flags, environ, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        eu.distributed_args(*flags, environ=environ)


def test_process_flags_and_auto_detection(monkeypatch, caplog):
    assert eu.distributed_args(None, None, None, environ={}) is None
    assert eu.distributed_args("h:1", 2, 1, environ={}) == {"coordinator_address": "h:1", "num_processes": 2,
                                                            "process_id": 1}
    assert eu.distributed_args(None, None, None, environ={"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "3",
                                                          "JAX_PROCESS_ID": "2"})["process_id"] == 2
    # auto: JAX detects the cluster; the flags given are passed on, the others left to JAX
    assert eu.distributed_args("auto", None, None, environ={}) == {"coordinator_address": None,
                                                                   "num_processes": None, "process_id": None}
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert eu.init_distributed("auto", 4, None) is True and calls == [{"num_processes": 4}]

    def no_cluster(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ValueError, match="--coordinator_address=auto: JAX found no cluster"):
        eu.init_distributed("auto", None, None)
    # several processes in the environment but no coordinator: each copy would run the whole job
    assert eu.multiprocess_environment({"SLURM_NTASKS": "4"}) == "$SLURM_NTASKS=4 says this job has 4 processes"
    assert "2 TPU hosts" in eu.multiprocess_environment({"TPU_WORKER_HOSTNAMES": "a,b"})
    for env in ({}, {"SLURM_NTASKS": "1"}, {"TPU_WORKER_HOSTNAMES": "localhost"}, {"OMPI_COMM_WORLD_SIZE": "x"}):
        assert eu.multiprocess_environment(env) is None, env
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="krylovjax.experiment_utils"):
        assert eu.init_distributed(None, None, None) is False
    assert "--coordinator_address=auto" in caplog.text and "OMPI_COMM_WORLD_SIZE=2" in caplog.text


def test_binaries_refuse_bad_process_flags(tmp_path):
    base = [sys.executable, *TRAIN, f"--workdir={tmp_path / 'w'}", f"--store={tmp_path / 's'}"]
    out = subprocess.run(base + ["--num_processes=2", "--process_id=1"], cwd=ROOT, env=cpu_env(1),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--coordinator_address" in out.stderr, out.stderr[-1500:]
    # the pre-computation binary takes the same flags: without a coordinator every copy would
    # compute every chunk, so process flags alone are refused there too
    pre = [sys.executable, "-m", "experiments.precompute", "--config=experiments/configs/demo.py",
           f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=1"]
    out = subprocess.run(pre, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--coordinator_address" in out.stderr, out.stderr[-1500:]
    # --data=builtin with a --store: which data was meant? refused
    builtin = [a for a in base if a != "--data=store"] + ["--data=builtin"]
    out = subprocess.run(builtin, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--data=builtin trains on the built-in photos" in out.stderr, out.stderr[-1500:]
    assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------------------------
# The sharded loader and the row gather, in this process (4 CPU devices)
# ----------------------------------------------------------------------------------------------


class _Spy:
    """An array-like that records which rows are read."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, sl):
        self.reads.append((sl.start, sl.stop))
        return self.a[sl]


@pytest.mark.parametrize("ndev", [1, 3, 4])
def test_shard_data_reads_each_device_block_once(ndev):
    x = _trajectories().astype(np.float64)
    cfg = tr.TrainConfig(model="tiny", model_overrides={"ch": 16, "ch_mult": (1,), "attn_resolutions": ()},
                         per_image_offset=True)
    mesh = tr.make_mesh(jax.devices()[:ndev])
    spy = _Spy(x)
    sd = tr.shard_data(cfg, tr.Trajectories(spy, np.linspace(1e-3, 1.0, N)), mesh, dtype=np.float64)
    rows = -(-B // ndev)
    want = [(k * rows, min((k + 1) * rows, B)) for k in range(ndev) if k * rows < B]
    assert sorted(spy.reads) == want  # each device's block read once; padding never read
    assert sd.local_rows == ((0, B),) and sd.rows_per_process == [[0, B]]
    table = sd.arrays["x"]
    assert table.shape == (rows * ndev, N, C, S, S) and table.sharding.spec == jax.sharding.PartitionSpec("data")
    for shard in table.addressable_shards:
        lo = shard.index[0].start or 0
        want_block = np.zeros((rows, N, C, S, S))
        want_block[: max(0, min(B - lo, rows))] = x[lo:lo + rows]
        np.testing.assert_array_equal(np.asarray(shard.data), want_block)
    # the summary (fingerprint, sizes) does not depend on the layout
    _, info = tr.prepare_data(cfg, tr.Trajectories(x, np.linspace(1e-3, 1.0, N)))
    assert sd.info == info


def test_take_rows_equals_fancy_indexing_exactly():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, N, C, 4, 4))
    mesh = tr.make_mesh()
    sd = tr.shard_data(tr.TrainConfig(), tr.Trajectories(x, np.linspace(1e-3, 1.0, N)), mesh, dtype=np.float64)
    rows = jax.numpy.asarray(rng.integers(0, B, 16), jax.numpy.int32)  # repeats, any order
    lev = jax.numpy.asarray(rng.integers(0, N, 16), jax.numpy.int32)
    got = jax.jit(lambda t, r, v: tr._take_rows(mesh, t, r, v))(sd.arrays["x"], rows, lev)
    assert got.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(got), x[np.asarray(rows), np.asarray(lev)])
    imgs = jax.jit(lambda t, r: tr._take_rows(mesh, t, r))(jax.numpy.asarray(x[:, 0]), rows)  # unpadded, replicated
    np.testing.assert_array_equal(np.asarray(imgs), x[np.asarray(rows), 0])


def test_shard_data_names_bad_images_and_refuses_other_chunks(tmp_path):
    x = _trajectories()
    bad = x.copy()
    bad[5, 2, 0, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN/Inf \(in image\(s\) \[5\]\)"):
        tr.shard_data(tr.TrainConfig(), tr.Trajectories(bad, np.linspace(1e-3, 1.0, N)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tr.shard_data(tr.TrainConfig(method="ddpm"), x[:, 0] * 3.0)
    # A store missing some images cannot be read by a process that owns them.
    part = _store(tmp_path / "part", x, range(4))
    with pytest.raises(ValueError, match="complete"):
        tr.shard_data(tr.TrainConfig(), part)
    # DDPM trains on a store's images, level 0 of each trajectory, read and checked a chunk at a time
    full = _store(tmp_path / "full", x, range(B))
    cfg = tr.TrainConfig(method="ddpm", model="tiny", model_overrides={"ch": 16, "ch_mult": (1,), "attn_resolutions": ()})
    sd = tr.shard_data(cfg, full, tr.make_mesh(jax.devices()[:1]))
    np.testing.assert_array_equal(np.asarray(sd.arrays["images"]), x[:, 0])
    assert sd.info == tr.prepare_data(cfg, x[:, 0])[1]


def test_an_interrupt_of_one_process_stops_both_with_a_checkpoint(tmp_path):
    """SIGTERM to one process of a two-process run (a node's preemption): both processes stop
    after the same update, save that checkpoint together and end with status 130 at once.
    Before, the interrupted process could not save alone (a save is collective) and the other
    one waited in the next all-reduce until JAX's timeout aborted both, minutes later (a
    walkthrough, 2026-12-07)."""
    import time

    x = _trajectories()
    own = [_store(tmp_path / f"own{p}", x, range(*OWN_ROWS[p])) for p in range(2)]
    wd = str(tmp_path / "run")
    cmds, envs = _run([wd, wd], own, 100000, processes=2)
    cmds = [c + ["--config.checkpoint_every=100000"] for c in cmds]
    with running(cmds, envs) as procs:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if os.path.exists(os.path.join(wd, "metrics.jsonl")) and \
                    any(r["kind"] == "train" and r["step"] >= 3 for r in _records(wd)):
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        outs, waited = sigterm_one(procs, 1)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 130, err[-3000:]
        assert "interrupted in " in err and "Traceback" not in err, err[-3000:]
    assert "another process of the job was interrupted: stopping after update" in outs[0][1], outs[0][1][-2000:]
    assert waited < 60  # JAX's timeout would be 100-300 s
    last = max(r["step"] for r in _records(wd) if r["kind"] == "train")
    assert int(tr.load_checkpoint(wd).state.step) == last >= 3


def test_a_damaged_chunk_read_by_one_process_stops_every_process_at_once(tmp_path):
    """A store chunk failing its checksum on one process of a two-process run: that process raised
    alone, before the gather of the data summaries, and the other one waited in it until gloo's
    30 s deadline, then a traceback (2026-12-07). Now the reader names the chunk, the other process names it, and both
    end at once with one line."""
    import time

    x = _trajectories()
    own = [_store(tmp_path / f"own{p}", x, range(*OWN_ROWS[p])) for p in range(2)]
    with open(os.path.join(own[1], "arrays", "embedded", "c", "5", "0", "0", "0", "0"), "r+b") as f:
        f.seek(64)  # image 5's chunk: a finite value changed
        f.write(np.float32(0.25).tobytes())
    wd = str(tmp_path / "run")
    cmds, envs = _run([wd, wd], own, 4, processes=2)
    t0 = time.monotonic()
    outs = run_all(cmds, envs, timeout=240)
    took = time.monotonic() - t0
    last = [err.strip().splitlines()[-1] for _, _, err in outs]
    assert [rc for rc, _, _ in outs] == [1, 1], [err[-3000:] for _, _, err in outs]
    assert last[1].startswith(f"error: store {own[1]!r} is damaged: field 'embedded' of chunk 5 (images 5..5) "
                              "does not match the checksum in its marker"), outs[1][2][-2000:]
    assert last[0] == ("error: data.x: process 1 could not read its images 4..5 (a damaged chunk of the store); "
                       "each process's own message says which and what to do; every process stops"), outs[0][2][-2000:]
    # both processes' start-up (seconds); before, process 0 waited for gloo's 30 s deadline and
    # ended with its traceback (the line above tells the two apart; this bound is loose for a busy CI)
    assert took < 90
    assert not os.path.exists(os.path.join(wd, "checkpoints"))


def test_processes_given_different_configs_are_refused_at_once(tmp_path):
    """Every process of a job must run the same config: one given another batch size started
    another job and the first collective hung (30 s to minutes, then a traceback or JAX's abort;
    a walkthrough, 2026-12-07). Now every process ends at once with one line naming the others."""
    x = _trajectories()
    own = [_store(tmp_path / f"own{p}", x, range(*OWN_ROWS[p])) for p in range(2)]
    wd = str(tmp_path / "run")
    cmds, envs = _run([wd, wd], own, 4, processes=2)
    cmds[1] = cmds[1] + ["--config.lr=0.001"]
    outs = run_all(cmds, envs, timeout=120)
    for rc, _, err in outs:
        assert rc == 1, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "error: --config: process 1 of this job was given another config than process 0; every --config.* value "
            "must be the same on every process"), err[-2000:]
    assert not os.path.exists(os.path.join(wd, "checkpoints"))
