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
_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _legacy_emitters_supported() -> bool:
    """Whether this jaxlib's XLA takes ``--xla_cpu_use_fusion_emitters`` (an unknown flag in
    XLA_FLAGS aborts every process at start): asked once per jaxlib version, in a subprocess,
    and remembered under .pytest_cache."""
    from importlib import metadata

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    path = os.path.join(ROOT, ".pytest_cache", f"xla_cpu_use_fusion_emitters-{version}")
    try:
        with open(path) as f:
            known = f.read().strip()
        if known in ("0", "1"):
            return known == "1"
    except OSError:
        pass
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_LEGACY_EMITTERS)
    try:
        ok = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                            capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False
    try:  # through a temporary file: a process reading it meanwhile sees all or nothing
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as f:
            f.write("1" if ok else "0")
        os.replace(f"{path}.{os.getpid()}", path)
    except OSError:  # a read-only checkout: ask again next time
        pass
    return ok


# The tests' XLA CPU code generation, KRYLOVJAX_TEST_CODEGEN:
# - "fast" (the default): LLVM at -O0 and XLA's older loop emitters instead of its fusion
#   emitters. The suite's time is mostly compiling small programs once: -O0 halved it (each
#   program runs ~10% slower), the older emitters compile 3x faster again (the seed-basis solve
#   at 16 x 16: 3.3 s -> 1.1 s; programs run 20-40% slower; the suite from a clean clone
#   1204-1259 s -> 784-824 s, 2026-12-07). The HLO is the same, so results differ from XLA's
#   default code generation in rounding only, and every comparison within the suite is between
#   programs built the same way, except where two *different* programs (a batch and one of its
#   systems alone, say) are compared bit for bit or to a few ulps: that equality holds with the
#   fusion emitters, not with the older ones, whose reductions depend on the batch's shape.
#   Those tests are marked ``default_codegen``: left out here, run by ``make test``'s second
#   session under "default".
# - "default": LLVM at -O0 only (the older default, and the fallback where this XLA lacks the
#   emitter flag).
# The first process to import this (pytest's controller) decides, and exports its decision: the
# xdist workers and the binaries inherit it, so every process builds alike and every worker
# deselects the same tests. XLA_FLAGS of your own are kept (tests/conftest.py); the decision
# then follows them.
CODEGEN = os.environ.get("KRYLOVJAX_TEST_CODEGEN", "fast")
if CODEGEN not in ("fast", "default"):
    raise ValueError(f"KRYLOVJAX_TEST_CODEGEN: expected 'fast' or 'default', got {CODEGEN!r}")
if "KRYLOVJAX_TEST_CODEGEN_RESOLVED" not in os.environ:
    if "XLA_FLAGS" in os.environ:
        CODEGEN = "fast" if _LEGACY_EMITTERS in os.environ["XLA_FLAGS"] else "default"
    elif CODEGEN == "fast" and not _legacy_emitters_supported():
        CODEGEN = "default"
os.environ["KRYLOVJAX_TEST_CODEGEN"] = CODEGEN
os.environ["KRYLOVJAX_TEST_CODEGEN_RESOLVED"] = "1"
FAST_COMPILE = "--xla_backend_optimization_level=0" + (f" {_LEGACY_EMITTERS}" if CODEGEN == "fast" else "")


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
