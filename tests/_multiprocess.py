"""Helpers for tests that run binaries as several jax.distributed processes on this machine
(CPU backend, localhost coordinator)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLVM at -O0 for every test process (tests/conftest.py): the suite's time is mostly compiling
# small programs once, which this halves, while each runs ~10% slower; the HLO is the same.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(local_devices: int) -> str:
    """``XLA_FLAGS`` of a test process with ``local_devices`` CPU devices."""
    return f"--xla_force_host_platform_device_count={local_devices} {FAST_COMPILE}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(local_devices: int, **extra: str) -> dict:
    """The environment of one CPU process with ``local_devices`` devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = xla_flags(local_devices)
    return env


def compile_cache_env(cache_dir: str) -> dict:
    """Environment variables that give a binary JAX's persistent compilation cache in
    ``cache_dir`` (tests that run the same programs in several subprocesses share one)."""
    return {"JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}


def process_flags(num_processes: int, port: int, process_id: int) -> list[str]:
    """The multi-host flags the binaries take (experiments/precompute.py, experiments/train.py)."""
    return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
            f"--process_id={process_id}"]


@contextlib.contextmanager
def running(commands: list[list[str]], envs: list[dict]):
    """Start every command at once (``python -m ...`` argument lists, run from the repository
    root, stdout and stderr piped) and yield the processes; any still running when the block
    ends (the test failed or timed out) is killed."""
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env in zip(commands, envs)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def sigterm_one(procs, index: int, timeout: float = 120) -> tuple[list[tuple[str, str]], float]:
    """SIGTERM to ``procs[index]`` (a node's preemption), then wait for every process: their
    ``(stdout, stderr)`` and the seconds they took to end."""
    procs[index].send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    outs = [p.communicate(timeout=timeout) for p in procs]
    return outs, time.monotonic() - t0


def run_all(commands: list[list[str]], envs: list[dict], timeout: float) -> list[tuple[int, str, str]]:
    """Start every command at once (:func:`running`), wait for all, and return ``(returncode,
    stdout, stderr)`` each; a process still running at ``timeout`` seconds is killed."""
    outs = []
    deadline = time.monotonic() + timeout
    with running(commands, envs) as procs:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out, err))
    return outs
