"""Test configuration: float64 on, several CPU devices for sharding tests."""
import os

# Must be set before jax initialises its backends. LLVM at -O0 (_multiprocess.FAST_COMPILE, which
# with KRYLOVJAX_TEST_CODEGEN=fast, the default, also turns XLA's fusion emitters off): the
# suite is dominated by compiling small programs once (a tiny U-Net's train step: 11.5 s ->
# 6.2 s on the 2-core VM of 2026-11-28, the Picard sweep 6.4 s -> 3.5 s) while each program runs
# ~10% slower; the HLO is the same, so every comparison in the tests is between programs built
# the same way (the older emitters round differently where a batch's shape changes: the tests
# marked default_codegen compare such programs, and run under "default": tests/_multiprocess.py).
from _multiprocess import CODEGEN, xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the xdist workers and the binaries the tests start
# (they inherit the environment): many tests compile the same small programs (the tiny U-Net's
# step, the samplers) in separate processes. The cached executables are the ones XLA would
# build again, so no result changes. Under .pytest_cache (ignored by git), kept between runs
# (delete it to reclaim the space; jax's size cap would need the filelock package).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config, items):
    """Under the "fast" code generation the tests marked ``default_codegen`` are deselected:
    ``make test`` runs them in a second session under XLA's default code generation."""
    if CODEGEN == "default":
        return
    drop = [item for item in items if item.get_closest_marker("default_codegen")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if not item.get_closest_marker("default_codegen")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Says that tests marked ``default_codegen`` are left out, and how to run them (always under
    "fast": with xdist the workers deselect, and this process does not see which)."""
    if CODEGEN == "fast":
        terminalreporter.write_line(
            "tests marked default_codegen are left out under XLA's older CPU emitters (KRYLOVJAX_TEST_CODEGEN=fast): "
            "KRYLOVJAX_TEST_CODEGEN=default python -m pytest -m default_codegen runs them, as make test does")


def pytest_report_header(config):
    return (f"XLA CPU code generation: {CODEGEN} (KRYLOVJAX_TEST_CODEGEN; "
            + ("tests marked default_codegen are deselected: make test runs them in a second session)"
               if CODEGEN == "fast" else "every selected test runs)"))


@pytest.fixture(autouse=True, scope="session")
def _enable_x64():
    """x64 is on for every test; library code must still work in float32."""
    jax.config.update("jax_enable_x64", True)
    yield


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop the compiled programs and traces of each test module when it ends. Without this an
    xdist worker kept every executable it had built (6 GB per worker by the end of the suite,
    2026-12-05) and ran into the 65 530 memory mappings a Linux process may hold (each loaded CPU
    executable maps its own regions): workers died of failed allocations, as a segfault inside
    XLA or a MemoryError that hung a thread start. The largest module maps ~18 500. A program
    another module needs again comes back from the persistent cache."""
    yield
    jax.clear_caches()
    gc.collect()
