"""Command-line behaviour of the experiment binaries found by an audit: bad flags are refused up
front with the flag named (not run silently, not a traceback after minutes of work), a work
directory that is a file is refused, SIGTERM saves a checkpoint like Ctrl-C, a re-run that
trains nothing keeps the finished run's record, and ``generate`` marks its outputs finished only
once every file is written.

The flag tests run the binaries in subprocesses and fail before any computation (seconds each);
the two training-binary tests are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from _fs import snapshot

from krylovjax import experiment_utils as eu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Flags checked before any work
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, args, message", [
    # a misspelt time step ran silently as the late one
    ("experiments.bench_solvers", ["--sizes=8", "--batch=1", "--methods=gmres", "--time_steps=early,middle"],
     "--time_steps: expected entries of ['early', 'late']; unknown: ['middle']"),
    # "--sizes=8 16": the 16 was dropped without a word
    ("experiments.bench_solvers", ["--sizes=8", "16", "--batch=1", "--methods=gmres"],
     "unexpected arguments: ['16']"),
    ("experiments.bench_solvers", ["--sizes=abc"], "--sizes: expected comma-separated integers >= 4, got 'abc'"),
    ("experiments.bench_solvers", ["--sizes=8", "--batch=1", "--methods=gmres", "--repeats=0"],
     "--repeats: expected an integer >= 1, got 0"),
    ("experiments.bench_solvers", ["--sizes=8", "--batch=1", "--methods=nosuch"], "unknown: ['nosuch']"),
    ("experiments.bench_solvers", ["--sizes=8", "--batch=1", "--methods=gmres", f"--workdir={__file__}"],
     f"--workdir: '{__file__}' is a file; expected a directory"),
    ("experiments.bench_float32", ["--image_size=8", "--num_images=1", "--fp_steps=3", "extra"],
     "unexpected arguments: ['extra']"),
    ("experiments.bench_float32", ["--solver_strategy=nosuch"], "--solver_strategy: expected one of"),
    ("experiments.bench_float32", ["--tolerances=1e-4,abc"], "--tolerances: expected comma-separated finite"),
    # bench_solvers' flags are defined in bench_float32's process but were silently ignored
    ("experiments.bench_float32", ["--dtype=float32"], "--dtype: a flag of experiments.bench_solvers"),
    ("experiments.bench_train_step", ["--methods=foo", "--steps=1", "--steps_per_call=1"],
     "--methods: expected entries of ['ours', 'ddpm']; unknown: ['foo']"),
    ("experiments.bench_train_step", ["--steps=2", "--steps_per_call=abc"],
     "--steps_per_call: expected comma-separated integers >= 1, got 'abc'"),
    ("experiments.bench_train_step", ["--steps=2", "--steps_per_call=0"],
     "--steps_per_call: expected comma-separated integers >= 1, got '0'"),
    ("experiments.bench_precompute", ["--sizes=abc"], "--sizes: expected comma-separated integers >= 4"),
    ("experiments.bench_precompute", ["--sizes=8", "--chunk_size=abc"], "--chunk_size: expected 'auto' or 'none'"),
    ("experiments.bench_precompute", ["--sizes=8", "--compact=abc"], "--compact: expected 'none' or an integer"),
    ("experiments.bench_precompute", ["--sizes=8", "--repeats=0"], "--repeats: expected an integer >= 1, got 0"),
    ("experiments.bench_precompute", ["--sizes=8", "--strategies=nosuch"], "unknown: ['nosuch']"),
    ("experiments.study_line_preconditioner", ["extra"], "unexpected arguments: ['extra']"),
])
def test_bench_flags_refused_up_front(module, args, message, tmp_path):
    """Each refusal is one line, ``error: <message>`` (eu.one_line_usage_errors; before, absl printed
    the module doc and the flag help, some 40 lines, above the message)."""
    out = tmp_path / "out.json"
    proc = _run(module, *args, f"--json_out={out}", timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("I1", "W1", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith(("error: --", "error: unexpected arguments")), \
        proc.stderr[-2000:]
    assert message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_build_systems_refuses_unknown_step():
    # In a subprocess: importing experiments.bench_solvers defines its absl flags (--workdir ...)
    # in this process, and a later import of another binary here would define them twice.
    code = ("import numpy as np\nfrom experiments.bench_solvers import build_systems\n"
            "build_systems(8, 1, num_steps=3, sigma=5.0, step='middle', dtype=np.float32)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ValueError: step: expected 'early' or 'late', got 'middle'" in proc.stderr, proc.stderr[-2000:]


def test_flag_helpers():
    from absl import app

    assert eu.int_list_flag("sizes", ["8", "16"], 4) == [8, 16]
    with pytest.raises(app.UsageError, match="--sizes: expected comma-separated integers >= 4, got '8,2'"):
        eu.int_list_flag("sizes", ["8", "2"], 4)
    with pytest.raises(app.UsageError, match="--sizes: expected at least one"):
        eu.int_list_flag("sizes", [], 4)
    assert eu.choice_list_flag("m", ["a"], ("a", "b")) == ["a"]
    with pytest.raises(app.UsageError, match="each once"):
        eu.choice_list_flag("m", ["a", "a"], ("a", "b"))
    with pytest.raises(app.UsageError, match="unexpected arguments"):
        eu.check_no_args(["prog", "x"])
    eu.check_no_args(["prog"])


# ----------------------------------------------------------------------------------------------
# Work directories that are files
# ----------------------------------------------------------------------------------------------


def test_dir_arg_that_is_a_file(tmp_path):
    from absl import app

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(app.UsageError, match=r"--workdir: '.*file' is a file; expected a directory"):
        eu.check_dir_arg(str(f))
    with pytest.raises(app.UsageError, match=r"--outdir: '.*file/sub' lies under the file"):
        eu.check_dir_arg(str(f / "sub"), "outdir")
    assert eu.check_dir_arg(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")
    # the root: a traceback from the lock (a walkthrough)
    with pytest.raises(app.UsageError, match=r"^--workdir: '/' is the file system's root; expected a directory below it"):
        eu.check_dir_arg("/")


def test_a_workdir_name_too_long_for_its_lock_file_is_one_line(tmp_path):
    """A 252-character name is a legal directory, but its lock file (6 more characters) is not: an
    OSError traceback (a walkthrough). Now WorkdirUnwritableError, which the binaries say in one line."""
    from krylovjax import workdir_lock

    wd = tmp_path / ("L" * 252)
    with pytest.raises(workdir_lock.WorkdirUnwritableError,
                       match=r"^workdir: the name of its lock file '\.L{39}'\.\.\. \(258 characters: the directory's name "
                             r"with '\.' and '\.lock' around it\) is too long for this file system"):
        with workdir_lock.hold(wd):
            pass


@pytest.mark.parametrize("platforms, message", [
    ("cuda", "error: JAX could not start any platform of JAX_PLATFORMS='cuda': this JAX installation has no backend "
             "of that name"),
    ("nonexistent", "error: Unable to initialize backend 'nonexistent': "),
])
def test_a_platform_jax_cannot_start_is_one_line(platforms, message, tmp_path):
    """JAX_PLATFORMS naming a platform this JAX lacks: a 50-line traceback ending in a RuntimeError,
    or for cuda a bare AssertionError naming nothing (a walkthrough). Now one line, status 1."""
    import importlib.util

    if platforms == "cuda" and any(importlib.util.find_spec(m) for m in ("jax_plugins", "jax_cuda12_plugin",
                                                                         "jax_cuda13_plugin")):
        pytest.skip("a CUDA plugin is installed here: JAX_PLATFORMS=cuda is a platform this JAX has")
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    proc = subprocess.run([sys.executable, "-m", "experiments.precompute", "--config=experiments/configs/demo.py",
                           f"--workdir={tmp_path / 'w'}", "--config.num_images=1", "--config.image_size=8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_claim_under_a_file_is_refused(tmp_path):
    """A run directory below a file was let through the claim check (the path does not "exist")
    and failed later with a NotADirectoryError from os.makedirs (generate: after loading the
    model)."""
    f = tmp_path / "afile"
    f.write_text("keep me")
    with pytest.raises(eu.WorkdirConflictError, match=r"outdir: '.*afile/sub' lies under the file '.*afile'"):
        eu.check_claim(str(f / "sub"), "generate", {"a": 1}, arg="outdir")
    with pytest.raises(eu.WorkdirConflictError, match=r"workdir: '.*afile/a/b' lies under the file"):
        eu.claim_workdir(str(f / "a" / "b"), "denoise", {"a": 1})
    assert f.read_text() == "keep me"
    assert eu.claim_workdir(str(tmp_path / "new" / "run"), "denoise", {"a": 1}) is True


@pytest.mark.parametrize("module, args", [
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--data=builtin",
                           "--config.data.image_size=16", "--config.num_steps=2"]),
    ("experiments.precompute", ["--config=experiments/configs/demo.py", "--noprogress",
                                "--config.num_images=1", "--config.image_size=8", "--config.precompute.num_steps=3"]),
])
def test_workdir_that_is_a_file_is_refused(module, args, tmp_path):
    """Was a FileExistsError / NotADirectoryError traceback from os.makedirs (train.py after the
    whole pre-computation of the built-in data)."""
    f = tmp_path / "afile"
    f.write_text("keep me")
    proc = _run(module, *args, f"--workdir={f}")
    assert proc.returncode != 0
    assert f"--workdir: '{f}' is a file; expected a directory" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("module, args, marker, message", [
    # experiments.train used to write checkpoints/, config.json, metrics.jsonl and result.json
    # into a denoise run's directory, experiments.precompute a store/ into a training run's
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--data=builtin", "--config.num_steps=2"],
     "experiment.json", "holds another experiment's run (experiment.json, experiments.denoise)"),
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--data=builtin", "--config.num_steps=2"],
     "precompute_summary.json", "holds an experiments.precompute run (precompute_summary.json)"),
    ("experiments.precompute", ["--config=experiments/configs/demo.py", "--noprogress", "--config.num_images=1",
                                "--config.image_size=8"], "checkpoints", "holds a training run (checkpoints)"),
])
def test_workdir_of_another_binary_is_refused(module, args, marker, message, tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    if marker == "checkpoints":
        (wd / marker).mkdir()
    else:
        (wd / marker).write_text(json.dumps({"experiment": "denoise", "config": {}}))
    before = sorted(os.listdir(wd))
    proc = _run(module, *args, f"--workdir={wd}")
    assert proc.returncode != 0
    assert message in proc.stderr and "use another --workdir" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(wd)) == before


# ----------------------------------------------------------------------------------------------
# SIGTERM
# ----------------------------------------------------------------------------------------------


def test_sigterm_goes_to_the_sigint_handler():
    got = []
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, lambda s, f: got.append(s))
        eu.sigterm_as_interrupt()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if got:
                break
            time.sleep(0.01)
        assert got == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. started in the background by a shell
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


_AFTER_SCRIPT = """
import os, signal, sys, time
from krylovjax import experiment_utils as eu
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (xdist's workers ignore it)
eu.sigterm_as_interrupt()
sig = int(sys.argv[1])
ran_on = []
try:
    with eu.interrupts_after("what it says"):
        os.kill(os.getpid(), sig)
        time.sleep(0.5)
        ran_on.append(1)  # not raised inside
        if len(sys.argv) > 2:  # a second one: the process ends at once
            os.kill(os.getpid(), sig)
            time.sleep(5)
            ran_on.append(2)
except KeyboardInterrupt:
    print("raised at the end, after", ran_on, flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_compile_is_raised_when_it_ends(sig):
    """(A walkthrough: Ctrl-C or SIGTERM inside denoise's precompile, with flax and orbax imported,
    crashed the process at its exit with a segmentation fault, status 139; raised after the
    compile, it exits with 130.) Inside interrupts_after the first interrupt is said at once and
    raised when the block ends; a second ends the process at once with status 130."""
    run = [sys.executable, "-c", _AFTER_SCRIPT, str(int(sig))]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert one.returncode == 3, one.stderr
    assert "raised at the end, after [1]" in one.stdout
    assert "interrupt: stopping when the computation in flight ends (it cannot be cut short)" in one.stderr
    two = subprocess.run(run + ["again"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert two.returncode == 130, (two.stdout, two.stderr)
    assert "raised at the end" not in two.stdout
    assert "interrupted (a second " in two.stderr and "): what it says" in two.stderr


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_training_defers_sigterm_whatever_sigint_is(sigint):
    """Inside train, SIGTERM from sigterm_as_interrupt is deferred to the step boundary like
    Ctrl-C, also where SIGINT is ignored (a job started with & or nohup), and put back after."""
    from krylovjax import training

    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler if sigint == "default" else signal.SIG_IGN)
        eu.sigterm_as_interrupt()
        ours = signal.getsignal(signal.SIGTERM)
        assert getattr(ours, training.DEFER_IN_TRAIN)
        deferred = training._DeferredInterrupt()
        deferred.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # lands in the handler, which only marks it
            for _ in range(100):
                if deferred.pending:
                    break
                time.sleep(0.01)
        except KeyboardInterrupt:
            deferred.restore()
            pytest.fail("SIGTERM interrupted at once instead of being deferred to the step boundary")
        assert deferred.pending
        with pytest.raises(KeyboardInterrupt):
            deferred.check()  # the step boundary
        deferred.restore()
        assert signal.getsignal(signal.SIGTERM) is ours
        # Python's default SIGINT handler was replaced by sigterm_as_interrupt's, which remembers it
        assert signal.getsignal(signal.SIGINT) is (eu._interrupt_now if sigint == "default" else signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


_TRAIN = ["--config=experiments/configs/train_tiny.py", "--data=builtin", "--config.data.image_size=16",
          "--config.data.num_images=2", "--config.model_overrides.ch=16", "--config.model_overrides.ch_mult=(1,)",
          "--config.model_overrides.attn_resolutions=()", "--config.lr=0.002", "--config.warmup_steps=5",
          "--config.batch_size=8", "--config.progress=False", "--config.log_every=5", "--config.method=ddpm"]


def _train_steps(wd) -> list[int]:
    try:
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if '"train"' in line]
    except OSError:
        return []


def _sigterm_once(proc, ready) -> None:
    """SIGTERM to ``proc`` once ``ready()`` (polled), then wait for it to end (killed if not)."""
    try:
        deadline = time.monotonic() + 600  # a ceiling for a starved machine
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_precompute_binary_stops_at_sigterm_like_ctrl_c(tmp_path):
    """SIGTERM ended a pre-computation silently (status 124 from ``timeout``, no line); now as
    Ctrl-C: the chunks complete are kept, one line, status 130, and the same command resumes."""
    wd = tmp_path / "pre"
    cmd = [sys.executable, "-m", "experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={wd}",
           "--config.num_images=4", "--config.chunk_images=1", "--config.image_size=16",
           "--config.precompute.num_steps=60", "--noprogress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _sigterm_once(proc, lambda: (wd / "store" / "complete").is_dir() and os.listdir(wd / "store" / "complete"))
    err = proc.stderr.read().decode()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted in " in err and "the same command resumes from it" in err and "Traceback" not in err, err[-3000:]
    done = len(os.listdir(wd / "store" / "complete"))
    assert 1 <= done < 4
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and f"({done} chunk(s) already done)" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_train_binary_sigterm_saves_a_checkpoint(tmp_path, sigint):
    """SIGTERM (kill, timeout, batch schedulers) used to end the run at once: with checkpoints only
    at the stop every update was lost. Now it is handled like Ctrl-C: a checkpoint of the step
    reached, and a non-zero exit; also where SIGINT is ignored (the child's SIGINT is set here,
    not inherited from however pytest was started)."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", *_TRAIN, f"--workdir={wd}", "--config.num_steps=100000",
           "--config.checkpoint_every=100000"]
    disposition = signal.SIG_DFL if sigint == "default" else signal.SIG_IGN
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    _sigterm_once(proc, lambda: len(_train_steps(wd)) >= 2)
    assert proc.returncode == 130
    err = proc.stderr.read().decode()
    assert "interrupted in " in err and "the same command resumes from it" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    steps = sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())
    assert steps and steps[-1] >= 10, steps  # the step reached (>= the 2nd log record at step 10)


def test_running_out_of_memory_is_one_line_with_what_to_lower():
    """XLA's RESOURCE_EXHAUSTED ended a binary in a page of JAX's traceback (a walkthrough at
    128x128 under a memory limit, 2026-12-07): with the binary's advice it is one line; without
    (a library caller's own use of the context) and for any other runtime error it is raised."""
    import jax

    from experiments import denoise

    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 581829624 bytes.")
    with pytest.raises(SystemExit) as exit_:
        with eu.exit_on_run_errors(out_of_memory=denoise.OUT_OF_MEMORY):
            raise oom
    assert str(exit_.value.code) == ("error: out of memory: RESOURCE_EXHAUSTED: Out of memory allocating 581829624 "
                                     "bytes.; lower the batch sizes (--config.ours.train.batch_size, "
                                     "--config.ddpm.train.batch_size) or the model's width "
                                     "(--config.common.model_overrides.ch), with --fresh or a new --workdir (they "
                                     "are part of the run)")
    with pytest.raises(jax.errors.JaxRuntimeError):
        with eu.exit_on_run_errors():
            raise oom
    with pytest.raises(jax.errors.JaxRuntimeError):
        with eu.exit_on_run_errors(out_of_memory="x"):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


def test_an_interrupt_ends_a_binary_with_where_it_was_and_what_is_kept(capsys):
    """Ctrl-C (or SIGTERM) ended every binary with a KeyboardInterrupt traceback."""

    def deep_in_the_run():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ex:
        with eu.exit_on_run_errors():
            deep_in_the_run()
    assert ex.value.code == 130 and ex.value.__cause__ is None
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted in deep_in_the_run ({__file__}:")
    assert err.endswith("what was saved (checkpoints, complete chunks of a store) is kept, and the same command "
                        "resumes from it\n")
    with pytest.raises(SystemExit):
        with eu.exit_on_run_errors(interrupted="nothing to keep"):
            raise KeyboardInterrupt
    assert capsys.readouterr().err.endswith(": nothing to keep\n")


def test_an_interrupt_inside_a_library_names_the_projects_code(tmp_path, monkeypatch, capsys):
    """(A walkthrough: the line named frames of JAX or the standard library, e.g. ``_value
    (.../jax/_src/array.py:623)``, which do not say where the run was.) The innermost frame of
    krylovjax/ or experiments/ is named."""
    import json as json_module

    def dumps(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json_module, "dumps", dumps)
    with pytest.raises(SystemExit):
        with eu.exit_on_run_errors(interrupted="kept"):
            eu.write_json(str(tmp_path / "x.json"), {"a": 1})
    err = capsys.readouterr().err
    assert err.startswith("interrupted in write_json (") and "krylovjax/experiment_utils.py:" in err, err


def test_a_sigterm_names_the_work_it_stopped_not_its_handler(capsys):
    """SIGTERM is raised as an interrupt inside sigterm_as_interrupt's handler; the line named
    that handler (``interrupted in handle (.../experiment_utils.py:...)``; a walkthrough,
    2026-12-07) instead of the work it stopped."""
    import signal

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # no Python handler for SIGINT: SIGTERM raises at once
        eu.sigterm_as_interrupt()

        def the_work():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs between these bytecodes
                pass

        with pytest.raises(SystemExit) as ex:
            with eu.exit_on_run_errors(interrupted="kept"):
                the_work()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    assert ex.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted in the_work ({__file__}:"), err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_an_interrupt_python_swallows_is_acted_on_at_the_next_check(sig, capsys):
    """An interrupt whose handler runs inside a garbage-collection callback (JAX has one) is
    printed by Python as ``Exception ignored in ...`` and lost: a two-process pre-computation sent
    SIGTERM ran to the end with status 0 (CI, 2026-12-07). With sigterm_as_interrupt installed
    it is said in one line and remembered, and raise_if_signalled (between a binary's steps)
    raises it there, once."""
    import gc

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_hook = sys.unraisablehook
    landed = []

    def in_gc(phase, info):  # the handler runs between these bytecodes, inside the callback
        if phase == "start" and not landed:
            landed.append(phase)
            os.kill(os.getpid(), getattr(signal, sig))
            for _ in range(10**6):
                pass

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        eu.sigterm_as_interrupt()
        gc.callbacks.append(in_gc)
        try:
            gc.collect()  # the KeyboardInterrupt is raised inside in_gc and swallowed
        finally:
            gc.callbacks.remove(in_gc)
        assert landed
        said = capsys.readouterr().err
        assert said == ("interrupt: it came inside test_an_interrupt_python_swallows_is_acted_on_at_the_next_check."
                        "<locals>.in_gc, where Python cannot raise it; the run stops at its next step\n"), said

        def the_work():
            for _ in range(3):
                eu.raise_if_signalled()  # a step boundary

        with pytest.raises(SystemExit) as ex:
            with eu.exit_on_run_errors(interrupted="kept"):
                the_work()
        assert ex.value.code == 130
        assert capsys.readouterr().err.startswith(f"interrupted in the_work ({__file__}:")
        eu.raise_if_signalled()  # acted on once: no second interrupt
    finally:
        eu._SWALLOWED.clear()
        sys.unraisablehook = old_hook
        for s, h in old.items():
            signal.signal(s, h)


def test_other_unraisable_exceptions_go_to_the_hook_before():
    """sigterm_as_interrupt's unraisablehook takes interrupts only; the rest reach the hook it replaced."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_hook = sys.unraisablehook
    seen = []
    try:
        sys.unraisablehook = seen.append
        eu.sigterm_as_interrupt()
        eu.sigterm_as_interrupt()  # twice: the hook before is still the one called, once

        class Broken:
            def __del__(self):
                raise ValueError("in __del__")

        Broken()
        assert [u.exc_type for u in seen] == [ValueError] and not eu._SWALLOWED
    finally:
        sys.unraisablehook = old_hook
        for s, h in old.items():
            signal.signal(s, h)


def test_an_interrupt_lost_before_training_stops_it_at_the_first_step_boundary():
    """A swallowed interrupt (above) that came before train installed its own handlers is not
    forgotten there: the run stops at its first step boundary, with a checkpoint."""
    from krylovjax import training

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        eu._SWALLOWED.append("_xla_gc_callback")  # as sys.unraisablehook leaves a swallowed interrupt
        deferred = training._DeferredInterrupt()
        deferred.install()
        deferred.restore()
        assert deferred.pending and not eu._SWALLOWED
        with pytest.raises(KeyboardInterrupt):
            deferred.check()
    finally:
        eu._SWALLOWED.clear()
        for s, h in old.items():
            signal.signal(s, h)


_LONG_RUN = r"""
import os, signal, sys
import jax, jax.numpy as jnp
from krylovjax import experiment_utils as eu

if os.environ.get("IGNORE_SIGINT"):  # as a background job of a non-interactive shell inherits it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:  # a foreground job's Ctrl-C, whatever the test run itself inherited (a suite started with nohup &)
    signal.signal(signal.SIGINT, signal.default_int_handler)
if os.environ.get("SIGTERM_AS_INTERRUPT"):  # as the binaries' main does
    eu.sigterm_as_interrupt()

@jax.jit
def long(x, n):
    return jax.lax.fori_loop(0, n, lambda i, v: jnp.sin(v) * 1.0000001 + 1e-9, x)

def steps(check):
    long(jnp.ones(256), 1).block_until_ready()
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        long(jnp.ones(256), int(sys.argv[1])).block_until_ready()
        check()
    if len(sys.argv) > 3:  # a last step without a check after it
        long(jnp.ones(256), int(sys.argv[3])).block_until_ready()
    print("finished", flush=True)

with eu.exit_on_run_errors(interrupted="kept"), eu.interrupts_between_steps("kept") as check:
    steps(check)
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_long_computation(presses, tmp_path):
    """(A walkthrough: restore ignored Ctrl-C until its sampling ended, 46 s, a second one too, and
    an interrupt while JAX compiled crashed the interpreter in 2 of 4 tries.) With
    ``interrupts_between_steps`` the first Ctrl-C is said at once and acted on at the next check
    (status 130, naming the caller of the check); a second one stops the process at once."""
    script = tmp_path / "long.py"
    script.write_text(_LONG_RUN)
    # one computation takes about a second (one press), or many minutes (two presses)
    loops = 10**9 if presses == 2 else 10**6
    proc = subprocess.Popen([sys.executable, str(script), str(loops), "1000"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        if presses == 2:
            time.sleep(1.0)
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupt: stopping when the computation in flight ends" in err
    assert "Traceback" not in err and "Fatal Python error" not in err
    if presses == 1:
        assert err.rstrip().endswith("kept") and f"interrupted in steps ({script}:22)" in err, err[-2000:]
    else:
        assert time.monotonic() - start < 60  # one computation alone takes many minutes
        assert err.rstrip().endswith("interrupted (a second Ctrl-C): kept"), err[-2000:]


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_during_a_long_computation_is_ctrl_c(sigint, tmp_path):
    """generate and restore (interrupts_between_steps) ended at SIGTERM with status 143 and no word,
    leaving their claim, which refused the next command with other settings (a walkthrough,
    2026-12-07). With sigterm_as_interrupt it is taken as Ctrl-C, also where SIGINT is ignored (a
    background job): said at once, acted on at the next check, status 130."""
    script = tmp_path / "long.py"
    script.write_text(_LONG_RUN)
    env = dict(os.environ, PYTHONPATH=ROOT, SIGTERM_AS_INTERRUPT="1")
    if sigint == "ignored":
        env["IGNORE_SIGINT"] = "1"
    proc = subprocess.Popen([sys.executable, str(script), str(10**6), "1000"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupt: stopping when the computation in flight ends (it cannot be cut short); a second SIGTERM " \
           "(or Ctrl-C) to stop at once" in err
    assert "Traceback" not in err and err.rstrip().endswith("kept")
    assert f"interrupted in steps ({script}:22)" in err, err[-2000:]


@pytest.mark.slow
def test_train_binary_rerun_past_num_steps_keeps_result(tmp_path):
    """A re-run with --config.num_steps at or below the run's step trains nothing; it used to
    overwrite result.json's last_loss with null."""
    wd = tmp_path / "run"
    args = [*_TRAIN, f"--workdir={wd}", "--config.checkpoint_every=2", "--config.log_every=1"]
    proc = _run("experiments.train", *args, "--config.num_steps=2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.load(open(wd / "result.json"))
    assert first["step"] == 2 and first["last_loss"] is not None
    proc = _run("experiments.train", *args, "--config.num_steps=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing was trained" in proc.stderr
    again = json.load(open(wd / "result.json"))
    assert again["step"] == 2 and again["resumed_from"] == 2
    assert again["last_loss"] == first["last_loss"] and again["last_loss_step"] == first["last_loss_step"] == 2


# ----------------------------------------------------------------------------------------------
# generate: samples.json last
# ----------------------------------------------------------------------------------------------


def test_generate_interrupted_while_drawing_the_figure_reruns(tmp_path, monkeypatch):
    """samples.json marks the outputs finished; it was written before samples.md and samples.png,
    so a run killed while drawing stood as finished and the same command was refused ("already
    holds these samples") with the figure missing."""
    from experiments import generate
    from krylovjax import training

    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    unet = types.SimpleNamespace(in_channels=1, image_size=8, per_image_offset=False, num_images=1, dtype="float32")
    tc = types.SimpleNamespace(method="ddpm", sde="ve", ddpm_max_train_step=None, ddpm_num_steps=10)
    fake = types.SimpleNamespace(config=tc, model_def=types.SimpleNamespace(unet=unet), step=3, trained_dtype="float32")
    monkeypatch.setattr(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: fake)

    def fake_sample(fn, tc, shape, key, **kw):
        x = np.full(shape, 0.5, np.float32)
        return x, np.stack([x] * kw["num_frames"]), 7

    monkeypatch.setattr(generate, "sample", fake_sample)
    out = tmp_path / "gen"

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(eu, "image_grid", killed)
        with pytest.raises(KeyboardInterrupt):
            generate.run(str(wd), str(out), num_samples=2, num_frames=2)
    assert not (out / "samples.json").exists()  # not marked finished
    res = generate.run(str(wd), str(out), num_samples=2, num_frames=2)  # the same command completes
    assert res["network_evals"] == 7
    for f in generate.RESULT_FILES:
        assert (out / f).is_dir() if f.endswith("/") else (out / f).is_file(), f
    # more samples: refused without --fresh (with the values), moved aside with it
    with pytest.raises(eu.WorkdirConflictError, match=r"differs at: num_samples\) \(num_samples: stored 2, given 3\)"):
        generate.run(str(wd), str(out), num_samples=3, num_frames=2)
    with pytest.raises(eu.WorkdirConflictError, match="already holds these samples; pass --overwrite to redo them, "
                                                      "--fresh to move them aside"):
        generate.run(str(wd), str(out), num_samples=2, num_frames=2)
    with pytest.raises(ValueError, match="num_frames"):  # a bad flag moves nothing
        generate.run(str(wd), str(out), num_samples=3, num_frames=1, fresh=True)
    assert not os.path.exists(str(out) + ".prev")
    more = generate.run(str(wd), str(out), num_samples=3, num_frames=2, fresh=True)
    assert len(more["samples"]) == 3 and np.load(out / "samples.npy").shape[0] == 3
    assert len(json.load(open(str(out) + ".prev/samples.json"))["samples"]) == 2


def test_train_binary_refuses_another_config_before_precomputing(tmp_path):
    """Was refused only inside training.train, after the built-in photos' scores were
    pre-computed; now training.check_workdir runs first (the pre-computation logs never start)."""
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"train": {"lr": 0.5}, "model": {}, "data": {}}))
    proc = _run("experiments.train", "--config=experiments/configs/train_tiny.py", "--data=builtin",
                "--config.method=ours", "--config.num_steps=2", f"--workdir={wd}")
    assert proc.returncode != 0
    assert "holds a run with a different config" in proc.stderr and "lr: stored 0.5" in proc.stderr, proc.stderr[-2000:]
    assert "pre-computed scores of" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(wd)) == ["config.json"]


@pytest.mark.parametrize("module, config, key, missing", [
    ("experiments.train", "train_tiny.py", "num_stepz", "num_stepz"),
    ("experiments.precompute", "demo.py", "precompute.tolx", "tolx"),
    ("experiments.denoise", "denoise_demo.py", "ours.train.lrx", "lrx"),
    # a key missing in the middle of the path: a KeyError traceback until 2026-12-06 (twenty-ninth session)
    ("experiments.budget", "budget_demo.py", "commonx.lr", "commonx"),
])
def test_misspelt_config_key_is_a_flag_error(module, config, key, missing, tmp_path):
    """Was an AttributeError (or KeyError) traceback from inside ml_collections' flag parsing."""
    wd = tmp_path / "run"
    proc = _run(module, f"--config=experiments/configs/{config}", f"--workdir={wd}", f"--config.{key}=3")
    assert proc.returncode == 1
    assert f"FATAL Flags parsing error: --config.{key}: the config has no key '{missing}'" in proc.stderr, \
        proc.stderr[-2000:]
    assert "Did you mean" in proc.stderr and "Traceback" not in proc.stderr
    assert not wd.exists()


def test_train_binary_refuses_eval_every_and_says_how_many_devices(tmp_path):
    """(A walkthrough.) --config.eval_every=20 was accepted and nothing was evaluated; the log
    never said how many devices trained (only metrics.jsonl's num_devices)."""
    wd = tmp_path / "run"
    proc = _run("experiments.train", *_TRAIN, f"--workdir={wd}", "--config.eval_every=20")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: eval_every: expected 0, got 20; experiments.train has no evaluation set and never evaluates "
        "(experiments.denoise and experiments.budget do, on their noisy photos)"), proc.stderr[-2000:]
    assert not wd.exists()
    proc = _run("experiments.train", *_TRAIN, f"--workdir={wd}", "--config.num_steps=2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    # (the suite may give the process several CPU devices: XLA_FLAGS)
    assert re.search(r"training ddpm on (1 device \(no data parallelism\)|(\d+) devices \(data parallel: the batch "
                     r"of 8 split \2 ways\)), 1 update per call, float32 compute, from step 0 to 2", proc.stderr), proc.stderr[-3000:]


def test_precompute_says_when_a_folder_holds_fewer_images_than_asked(tmp_path):
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i + 50, np.uint8)).save(pics / f"p{i}.png")
    proc = _run("experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={tmp_path / 'w'}",
                "--noprogress", f"--config.dataset=files:{pics}", "--config.num_images=5", "--config.image_size=8",
                "--config.chunk_images=2", "--config.precompute.num_steps=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"num_images: 5 images asked for, 'files:{pics}' holds 2; using those 2" in proc.stderr
    # Python's warnings as one line each (they came with the file, line and source line)
    (pics / "notes.txt").write_text("x")
    Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(pics / "p2.png")
    proc = _run("experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={tmp_path / 'w2'}",
                "--noprogress", f"--config.dataset=files:{pics}", "--config.num_images=0", "--config.image_size=8",
                "--config.chunk_images=2", "--config.precompute.num_steps=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert f"warning: '{pics}': of 3 images, 1 centre-cropped to the 8x8 aspect (p2.png)" in lines
    assert any(ln.startswith(f"warning: '{pics}': 1 file(s) left out") for ln in lines)
    assert "UserWarning" not in proc.stderr and "load_files(" not in proc.stderr


@pytest.mark.parametrize("module, config, lacks, owner, files", [
    # an AttributeError traceback ('dtype') until the thirty-third session
    ("experiments.precompute", "train_tiny.py", "it has no dataset, image_size, num_images", "train",
     "experiments/configs/demo.py, cifar10.py, celeba64.py, celeba128.py or colab_*.py"),
    ("experiments.denoise", "demo.py", "it has no common, data, ddpm, noise, ours, targets", "precompute",
     "experiments/configs/denoise_*.py"),  # AttributeError 'targets'
    ("experiments.budget", "train_tiny.py", "it has no common, ddpm, ours, task", "train",
     "experiments/configs/budget_*.py"),  # "budget_seconds: expected ... got None"
    ("experiments.denoise", "budget_demo.py", "it has budget_seconds, task", "budget", "experiments/configs/denoise_*.py"),
    ("experiments.train", "denoise_demo.py", "it has no batch_size, lr, method, num_steps", "denoise",
     "experiments/configs/train_*.py"),
])
def test_another_binarys_config_is_refused_naming_it(module, config, lacks, owner, files, tmp_path):
    wd = tmp_path / "run"
    proc = _run(module, f"--config=experiments/configs/{config}", f"--workdir={wd}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    binary = module.split(".")[1]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --config: not a config of experiments.{binary} ({lacks}); it looks like a config of "
        f"experiments.{owner}; this binary takes {files}"), proc.stderr[-1000:]
    assert not wd.exists()


@pytest.mark.parametrize("key, hint", [
    # the key exists at another level: named in full (ml_collections suggests only within the level)
    ("common.batch_size", "Did you mean --config.ddpm.train.batch_size or --config.ours.train.batch_size?"),
    # nothing close anywhere: the keys the level holds
    ("ours.train.learning_rate", "Keys of config.ours.train: batch_size, budget_seconds, ema_decay, "
                                 "loss_reduction, lr, num_steps,"),
    ("lerning_rate", "Keys of the config: common, data, ddpm,"),
])
def test_misspelt_config_key_names_the_keys_there_are(key, hint, tmp_path):
    """Until the thirty-third session a key with no close match at its level got no hint at all."""
    proc = _run("experiments.denoise", "--config=experiments/configs/denoise_demo.py", f"--workdir={tmp_path / 'r'}",
                f"--config.{key}=3")
    assert proc.returncode == 1
    missing = key.rsplit(".", 1)[-1]
    assert f"--config.{key}: the config has no key '{missing}'. {hint}" in proc.stderr, proc.stderr[-2000:]
    assert "--show_config to see every key of the config" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("module, config, override, line", [
    ("experiments.train", "train_tiny.py", "--config.lr=0.003", "lr = 0.003"),
    ("experiments.precompute", "demo.py", "--config.precompute.tol=1e-07", "precompute.tol = 1e-07"),
    ("experiments.denoise", "denoise_demo.py", "--config.ours.train.lr=0.0002", "ours.train.lr = 0.0002"),
    ("experiments.budget", "budget_demo.py", "--config.budget_seconds=7.0", "budget_seconds = 7.0"),
    # bfloat16 compute from the shipped configs (a walkthrough: no config had the key)
    ("experiments.denoise", "denoise_demo128.py", "--config.common.model_overrides.dtype=bfloat16",
     "common.model_overrides.dtype = 'bfloat16'"),
])
def test_show_config_prints_every_key_with_the_overrides_and_runs_nothing(module, config, override, line,
                                                                          tmp_path):
    """``--show_config``: the config as the run would get it, one ``<key> = <value>`` line per key
    (what ``--config.<key>=`` sets), without --workdir and touching nothing."""
    proc = _run(module, f"--config=experiments/configs/{config}", override, "--show_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"# experiments/configs/{config}, with the overrides given"), proc.stdout[:300]
    assert line in lines, proc.stdout
    keys = [ln.split(" = ", 1)[0] for ln in lines[1:]]
    assert len(keys) == len(set(keys)) > 5 and all(" " not in k for k in keys), lines
    if module != "experiments.train":  # the rest is the flag parsing all four share (one subprocess each)
        return
    # with a work directory given, nothing is written there either
    wd = tmp_path / "run"
    proc = _run(module, f"--config=experiments/configs/{config}", f"--workdir={wd}", "--show_config")
    assert proc.returncode == 0 and not wd.exists(), proc.stderr[-2000:]
    # a bad value is still refused, and --show_config=false runs the binary's usual checks
    proc = _run(module, f"--config=experiments/configs/{config}", override.split("=")[0] + "=x,y", "--show_config")
    assert proc.returncode == 1 and "FATAL Flags parsing error: flag " + override.split("=")[0] in proc.stderr, \
        proc.stderr[-2000:]
    proc = _run(module, f"--config=experiments/configs/{config}", "--show_config=false")
    assert proc.returncode == 1 and "Flag --workdir must have a value other than None" in proc.stderr


def test_a_tilde_in_a_path_flag_is_the_home_directory(tmp_path):
    """A shell leaves the ``~`` of ``--workdir=~/run`` alone (it is no word start): generate refused
    it as no training run, and ``--outdir=~/out`` made a directory named ``~`` in the current one (a
    walkthrough, 2026-12-07). The binaries' flag parser expands it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "experiments.generate", "--workdir=~/nope", "--outdir=~/out"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: workdir: '{tmp_path}/nope' does not exist; expected a training run (a directory with "
        "checkpoints/, the --workdir of experiments.train)"), proc.stderr[-2000:]
    # every path flag, as the binaries' parser leaves them (the one above fails before --outdir is used)
    script = ("from absl import flags\nfrom krylovjax import experiment_utils as eu\n"
              "for n in ('workdir', 'outdir', 'store', 'json_out', 'other'):\n"
              "    flags.DEFINE_string(n, None, '')\n"
              "eu.parse_flags(['x', '--workdir=~/a', '--outdir=~/b', '--store=~/c', '--json_out=~/d.json', "
              "'--other=~/e'])\n"
              "print([flags.FLAGS[n].value for n in ('workdir', 'outdir', 'store', 'json_out', 'other')])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == str([f"{tmp_path}/a", f"{tmp_path}/b", f"{tmp_path}/c", f"{tmp_path}/d.json",
                                      "~/e"]), out.stderr[-2000:]


@pytest.mark.parametrize("module, args, message", [
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--config.lr=nan"],
     "error: lr: expected a finite learning rate > 0, got nan"),
    # found only by training.train, after the whole pre-computation, until the twenty-ninth session
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--config.data.image_size=10",
                           "--config.model_overrides.ch_mult=(1,2,2)"],
     "error: data: images of size 10 x 10 do not fit the model: image_size: expected a multiple of "
     "2**(len(ch_mult)-1) = 4"),
    # a batch the devices do not divide: a traceback from training.train until the thirtieth session
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--config.batch_size=3"],
     "error: batch_size: expected a multiple of the number of devices (4), got 3"),
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--data=store", "--store=/nonexistent/kj"],
     "error: store: '/nonexistent/kj' has no manifest.json; not a ScoreStore"),
    ("experiments.precompute", ["--config=experiments/configs/demo.py", "--config.precompute.tol=-1"],
     "error: precompute: tol: expected None or a finite number > 0, got -1.0"),
    ("experiments.precompute", ["--config=experiments/configs/demo.py", "--config.dataset=nosuch"],
     "error: dataset 'nosuch': source must be 'builtin'"),
    # said "num_images must be an int >= 1" although 0 (all) is valid there
    ("experiments.precompute", ["--config=experiments/configs/demo.py", "--config.num_images=-1"],
     "error: num_images: expected an int >= 1, or 0 for all the images of a files:, array: or tfds dataset, got -1"),
    ("experiments.denoise", ["--config=experiments/configs/denoise_demo.py", "--config.noise.std=-1"],
     "error: noise.std: expected a finite noise level > 0, got -1.0"),
    ("experiments.budget", ["--config=experiments/configs/budget_demo.py", "--config.budget_seconds=0"],
     "error: budget_seconds: expected a finite number of seconds > 0, got 0.0"),
    ("experiments.generate", ["--num_samples=0"], "error: num_samples: expected an int >= 1, got 0"),
])
def test_bad_config_value_ends_the_binary_with_its_message(module, args, message, tmp_path):
    """A value the run's checks refuse (the config's, or generate's flags) was a ValueError
    traceback ending in the message; now the message alone, status 1, nothing created."""
    wd = tmp_path / "run"
    proc = _run(module, *args, f"--workdir={wd}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "pre-computed scores of" not in proc.stderr, proc.stderr[-3000:]
    assert not wd.exists() and os.listdir(tmp_path) == []


def test_another_runs_store_ends_precompute_with_its_message(tmp_path):
    """StoreConflictError (a store directory with other files, another config or other images)."""
    (tmp_path / "run" / "store").mkdir(parents=True)
    (tmp_path / "run" / "store" / "notes.txt").write_text("mine")
    proc = _run("experiments.precompute", "--config=experiments/configs/demo.py", "--config.num_images=1",
                f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: path: '{tmp_path / 'run' / 'store'}' is a non-empty directory without manifest.json" \
        in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path / "run" / "store")) == ["notes.txt"]


def test_checked_errors_keep_their_type_for_library_callers(tmp_path):
    """checking_arguments marks the error for the binaries and changes nothing else."""
    from experiments import denoise
    from experiments.configs import denoise_demo

    cfg = denoise_demo.get_config()
    cfg.noise.std = -1.0
    with pytest.raises(ValueError, match="noise.std: expected a finite noise level > 0") as err:
        denoise.run(cfg, str(tmp_path / "run"))
    assert type(err.value) is ValueError and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as ex:  # as a binary's main reports it
        with eu.exit_on_run_errors():
            raise err.value
    assert ex.value.code == f"error: {err.value}"
    with pytest.raises(TypeError, match="unmarked"):  # outside a checking block: the code's own error
        with eu.exit_on_run_errors():
            raise TypeError("unmarked")


# ----------------------------------------------------------------------------------------------
# experiments.train: the store and the workdir's run, refused in one line (a user review)
# ----------------------------------------------------------------------------------------------

# a model small enough that a one-step run on a tiny store takes seconds
_STORE_TRAIN = ["--config=experiments/configs/train_tiny.py", "--config.num_steps=1", "--config.progress=False",
                "--config.model_overrides.ch=8", "--config.model_overrides.ch_mult=(1,)",
                "--config.model_overrides.attn_resolutions=()", "--config.batch_size=4"]


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
    """``precomputed(name)``: an experiments.precompute work directory (``<dir>/store``) of two
    8x8 built-in photos, made once per module: ``"a"``, or ``"b"`` whose sweeps stop after two
    (the same photos, other trajectories: another data fingerprint)."""
    root = tmp_path_factory.mktemp("precomputed")
    extra = {"a": [], "b": ["--config.precompute.max_sweeps=2"]}

    def get(name):
        wd = root / name
        if not wd.exists():
            proc = _run("experiments.precompute", "--config=experiments/configs/demo.py", "--noprogress",
                        "--config.num_images=2", "--config.image_size=8", "--config.precompute.num_steps=3",
                        *extra[name], f"--workdir={wd}", timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        return wd

    return get


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_train_refuses_a_store_of_another_sde_in_one_line(tmp_path, precomputed):
    """The store's SDE against the config's is checked by training.train itself: that ValueError
    was a 25-line traceback."""
    store = precomputed("a") / "store"
    before = snapshot(store)
    wd = tmp_path / "run"
    proc = _run("experiments.train", *_STORE_TRAIN, f"--workdir={wd}", f"--store={store}",
                "--config.sde_kwargs.sigma=2.0")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == [
        "error: sde: the config's SDE {'name': 've', 'kwargs': {'sigma': 2.0}} differs from the SDE of the embedded "
        "data {'name': 've', 'kwargs': {'sigma': 5.0}}; set config.sde / config.sde_kwargs to the embedding's"], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == [] and snapshot(store) == before


def test_train_refuses_another_store_in_a_runs_workdir_in_one_line(tmp_path, precomputed):
    """A re-run with another --store: the workdir's record (the data fingerprint) is compared by
    training.train once it has read the data; that ValueError was a traceback."""
    wd = tmp_path / "run"
    proc = _run("experiments.train", *_STORE_TRAIN, f"--workdir={wd}", f"--store={precomputed('a') / 'store'}",
                timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = snapshot(tmp_path)
    proc = _run("experiments.train", *_STORE_TRAIN, f"--workdir={wd}", f"--store={precomputed('b') / 'store'}",
                timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        f"error: workdir: '{wd}' holds a run with a different config; differing keys: data.fingerprint: stored "), \
        proc.stderr[-3000:]
    assert "Use a new workdir" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "(data.fingerprint: the training data differ, another store or other images)" in lines[0]
    assert snapshot(tmp_path) == before  # the run is untouched


@pytest.mark.parametrize("args, message", [
    (["--data=builtin", "--store={tmp}/s"],
     "error: --store={tmp}/s: --data=builtin trains on the built-in photos, not on a store; drop --store or use "
     "--data=store"),
    (["--data=store"], "error: --data=store needs --store=<ScoreStore directory>"),
])
def test_train_refuses_contradicting_data_flags_in_one_line(args, message, tmp_path):
    """Were absl's usage errors: the module doc and the flag help (44 lines), a blank line, then
    the message without the binary's `error:` form."""
    wd = tmp_path / "run"
    proc = _run("experiments.train", "--config=experiments/configs/train_tiny.py", f"--workdir={wd}",
                *[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [message.format(tmp=tmp_path)], proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["precompute_workdir", "missing"])
def test_train_says_what_a_store_path_that_is_no_store_is(where, tmp_path, request):
    """--store=<precompute workdir> (not its store/) said only "has no manifest.json; not a
    ScoreStore", as did a path that does not exist."""
    if where == "precompute_workdir":
        path = request.getfixturevalue("precomputed")("a")
        message = (f"error: store: '{path}' has no manifest.json; not a ScoreStore, but '{path / 'store'}' is one "
                   f"(experiments.precompute writes its store to <its --workdir>/store): "
                   f"pass --store={path / 'store'}")
    else:
        path = tmp_path / "nosuch"
        message = (f"error: store: '{path}' has no manifest.json; not a ScoreStore: '{path}' does not exist "
                   "(experiments.precompute writes its store to <its --workdir>/store)")
    before = snapshot(path) if path.exists() else None
    wd = tmp_path / "run"
    proc = _run("experiments.train", *_STORE_TRAIN, f"--workdir={wd}", f"--store={path}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == [message], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == [] and (before is None or snapshot(path) == before)


def test_a_run_directory_holding_training_runs_is_named_with_them(tmp_path):
    """(A walkthrough: ``--workdir=runs/demo`` said "not a training run" without pointing to its
    ``ours/`` and ``ddpm/``.)"""
    for d in ("ours/checkpoints", "ddpm/checkpoints", "other"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"is not a training run \(no checkpoints/ inside\); the training runs "
                                                f"inside it: {tmp_path}/ddpm, {tmp_path}/ours$"):
        eu.check_training_run(str(tmp_path))
    # a path that does not exist, or a file, is said to be so (it was "not a training run" too)
    with pytest.raises(FileNotFoundError, match=r"^workdir: '/nonexistent' does not exist; expected a training run "
                                                r"\(a directory with checkpoints/, the --workdir of experiments.train\)$"):
        eu.check_training_run("/nonexistent")
    (tmp_path / "f").write_text("")
    with pytest.raises(FileNotFoundError, match=r"^workdir: '.*/f' is a file; expected a training run"):
        eu.check_training_run(str(tmp_path / "f"))
    with pytest.raises(FileNotFoundError, match=r"'.*/other' is not a training run \(no checkpoints/ inside\)$"):
        eu.check_training_run(str(tmp_path / "other"))
    eu.check_training_run(str(tmp_path / "ours"))


@pytest.mark.parametrize("case", ["ignored", "late"])
def test_ctrl_c_ignored_or_after_the_last_check(case, tmp_path):
    """(A review.) A job whose SIGINT is ignored (started with ``&`` by a non-interactive shell)
    keeps ignoring it: the handler is not installed. An interrupt during the last step, after the
    last check, is said on leaving (the run finished, status 0) rather than announced and dropped."""
    script = tmp_path / "long.py"
    script.write_text(_LONG_RUN)
    args = ["10", "0", str(10**7)]  # no checked steps, then one of seconds: any SIGINT after "ready" is late
    env = dict(os.environ, PYTHONPATH=ROOT, **({"IGNORE_SIGINT": "1"} if case == "ignored" else {}))
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "finished", err[-3000:]
    if case == "ignored":
        assert "interrupt" not in err, err[-2000:]
    else:
        assert "interrupt: stopping when the computation in flight ends" in err
        assert err.rstrip().endswith("interrupt: it came during the last step; the run finished"), err[-2000:]


def test_atomic_writes_give_files_the_usual_permissions(tmp_path):
    """(A walkthrough: experiment.json, samples.json and samples.md were 0600 while samples.png was
    0644: the atomic writers' mkstemp mode outlived the rename.)"""
    import stat

    from krylovjax import store, training
    from krylovjax._io_errors import plain_file_mode

    mask = os.umask(0o022)
    try:
        assert plain_file_mode() == 0o644
        eu.write_json(str(tmp_path / "a.json"), {"a": 1})
        training._atomic_write(str(tmp_path / "b.json"), "{}")
        store._atomic_write_json(str(tmp_path / "c.json"), {"c": 1})
        for name in ("a.json", "b.json", "c.json"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
        os.umask(0o077)
        assert plain_file_mode() == 0o600
    finally:
        os.umask(mask)


def test_denoise_and_budget_take_the_tfds_data_directory(tmp_path):
    """``--config.data.kwargs.data_dir``: the paper configs' tfds data directory (a walkthrough,
    2026-12-07, found no key for it in ``denoise`` and ``budget``, and a message pointing to a
    ``--data_dir`` flag that no binary has). Not prepared there: one line naming it, at once."""
    proc = _run("experiments.denoise", "--config=experiments/configs/denoise_cifar10.py",
                f"--workdir={tmp_path / 'w'}", f"--config.data.kwargs.data_dir={tmp_path / 'tfds'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: data.source 'cifar10': tfds dataset 'cifar10' is not prepared in the data directory " \
           f"{str(tmp_path / 'tfds')!r}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def test_a_tuple_of_words_given_with_commas_is_split(tmp_path):
    """``--config.methods=ours,ddpm`` (what the binaries' list flags take) is the tuple of the two
    words; ml_collections kept it as the one entry 'ours,ddpm', refused as an unknown method (a
    walkthrough, 2026-12-07), also with the value as the next argument. Numbers were already read
    as a tuple; a word that is no method is still refused by name."""
    proc = _run("experiments.budget", "--config=experiments/configs/budget_demo.py", "--config.methods=ours,ddpm",
                "--config.ddpm.sampler.extra_methods", "(ddim, ancestral)", "--config.common.model_overrides.ch_mult=1,2",
                "--show_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for line in ("methods = ('ours', 'ddpm')", "ddpm.sampler.extra_methods = ('ddim', 'ancestral')",
                 "common.model_overrides.ch_mult = (1, 2)"):
        assert line in lines, proc.stdout
    proc = _run("experiments.budget", "--config=experiments/configs/budget_demo.py", "--config.methods=ours,dpm",
                f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        "error: methods: expected distinct entries of ('ours', 'ddpm'), got ('ours', 'dpm')", proc.stderr[-2000:]


def test_a_config_flag_loads_with_warnings_as_errors():
    """With PYTHONWARNINGS=error every binary taking --config ended in a traceback: ml_collections
    loads the file with importlib's deprecated load_module() (a walkthrough, 2026-12-07)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="error")
    proc = subprocess.run([sys.executable, "-m", "experiments.denoise", "--config=experiments/configs/denoise_demo.py",
                           "--workdir=unused", "--show_config"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "targets = (0.95,)" in proc.stdout
