"""One run at a time in a run directory (krylovjax.workdir_lock).

Before the lock, two trainings started on one workdir both ran: one died in orbax
(``FileNotFoundError: .../checkpoints/140.orbax-checkpoint-tmp/...``) after both had written
records into the same ``metrics.jsonl``; a second ``make demo`` moved the running demo's
directory away. Each test below holds a directory from another process (or thread) and checks
that the second run is refused at once, names the holder, and changes nothing.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from krylovjax import experiment_utils as eu
from krylovjax import workdir_lock as wl
from _fs import snapshot as _snapshot
from test_cli_audit import _run  # a binary in a subprocess, on the CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process that holds a directory until its stdin closes (no JAX import: starts in ~1 s).
_HOLDER = """
import sys
from krylovjax import workdir_lock
with workdir_lock.hold(sys.argv[1], process_index=int(sys.argv[2])):
    print("held", flush=True)
    sys.stdin.read()
"""


class _Holder:
    """Another process holding ``path`` (as process ``index`` of its job) while in the block."""

    def __init__(self, path, index=0):
        self.args = [sys.executable, "-c", _HOLDER, os.fspath(path), str(index)]

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "held", self.proc.stderr.read()
        return self.proc

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _refused_elsewhere(path) -> None:
    """Another process trying to hold ``path`` is refused."""
    proc = subprocess.run([sys.executable, "-c", _HOLDER, os.fspath(path), "0"], cwd=ROOT, input="", text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode != 0 and "WorkdirBusyError" in proc.stderr, proc.stderr[-2000:]
    assert f"(process {os.getpid()} on " in proc.stderr


# ----------------------------------------------------------------------------------------------
# The lock itself
# ----------------------------------------------------------------------------------------------


def test_lock_file_lies_beside_the_directory(tmp_path):
    assert wl.lock_path(tmp_path / "run") == os.path.join(str(tmp_path), ".run.lock")
    assert wl.lock_path(str(tmp_path / "run") + "/") == os.path.join(str(tmp_path), ".run.lock")
    assert wl.lock_path(tmp_path / "run", np.int64(3)) == os.path.join(str(tmp_path), ".run.process3.lock")
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(ValueError, match="process_index: expected an int >= 0"):
            wl.lock_path(tmp_path / "run", bad)
    with pytest.raises(ValueError, match="workdir: expected a directory below the root"):
        wl.lock_path("/")


def test_second_process_is_refused_and_told_who_holds(tmp_path):
    wd = tmp_path / "run"
    with _Holder(wd) as holder:
        with pytest.raises(wl.WorkdirBusyError) as err:
            with wl.hold(wd):
                pytest.fail("took a directory another process holds")
        msg = str(err.value)
        assert f"workdir: '{wd}' is in use by another run (process {holder.pid} on " in msg
        assert "use another --workdir" in msg
        # the holder's own lock is untouched by the refusal
        assert os.path.exists(wl.lock_path(wd))
    # released: taken at once, and the lock file is removed again after
    with wl.hold(wd) as path:
        assert os.path.exists(path)
        with open(path) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not os.path.exists(wl.lock_path(wd))
    assert not wd.exists()  # the lock never makes the directory itself (an empty one is a new run's)


def test_a_symlinked_path_to_the_same_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with _Holder(tmp_path / "real" / "run"):
        with pytest.raises(wl.WorkdirBusyError):
            with wl.hold(tmp_path / "alias" / "run"):
                pass


def test_a_symlink_named_as_the_directory_itself_is_refused(tmp_path):
    """``--workdir=other/link`` where ``link`` -> ``real``: the lock followed the parent's links only,
    so a second run through the link was not refused and both wrote one store (a walkthrough)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "link").symlink_to(tmp_path / "real")
    assert wl.lock_path(tmp_path / "other" / "link") == wl.lock_path(tmp_path / "real")
    with _Holder(tmp_path / "real"):
        with pytest.raises(wl.WorkdirBusyError):
            with wl.hold(tmp_path / "other" / "link"):
                pass


def test_killed_holder_frees_the_directory_at_once(tmp_path):
    wd = tmp_path / "run"
    with _Holder(wd) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        assert os.path.exists(wl.lock_path(wd))  # a stale file, not a stale lock
        with wl.hold(wd):
            pass


def test_processes_of_one_job_do_not_refuse_each_other(tmp_path):
    wd = tmp_path / "store_run"
    with _Holder(wd, index=1):
        with wl.hold(wd, process_index=0):  # process 0 of the same job
            pass
        with pytest.raises(wl.WorkdirBusyError):  # process 1 of a second job
            with wl.hold(wd, process_index=1):
                pass


def test_same_thread_reenters_other_threads_are_refused(tmp_path):
    wd = tmp_path / "run"
    errors = []

    def other():
        try:
            with wl.hold(wd):
                errors.append(None)
        except wl.WorkdirBusyError as e:
            errors.append(str(e))

    with wl.hold(wd) as path:
        with wl.hold(wd) as again:  # a binary holding its workdir calls training.train on it
            assert again == path
        assert os.path.exists(path)  # the inner exit kept the lock
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors and errors[0] and "in use by another thread of this process" in errors[0]
        _refused_elsewhere(wd)  # and another process is still refused
    assert not os.path.exists(path)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors[1] is None


def test_lock_file_deleted_under_a_waiter_is_not_trusted(tmp_path, monkeypatch):
    """The releaser deletes the file while still holding it; a process that opened the old file
    just before gets the lock of a deleted file and must take the path's new file instead."""
    wd = tmp_path / "run"
    path = wl.lock_path(wd)
    real_flock = wl.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            os.unlink(path)  # the previous holder's release, between our open and our lock
        return real_flock(fd, op)

    monkeypatch.setattr(wl.fcntl, "flock", flock)
    with wl.hold(wd):
        assert len(calls) == 2
        assert os.stat(path).st_ino == calls[1]  # holding the file that is at the path


@pytest.mark.parametrize("where, err", [("flock", errno.ENOLCK), ("flock", errno.EOPNOTSUPP),
                                        ("open", errno.EROFS), ("open", errno.EACCES)])
def test_no_locking_possible_runs_unlocked_with_a_warning(tmp_path, monkeypatch, where, err):
    def refuse(*a, **k):
        raise OSError(err, os.strerror(err))

    real_open = os.open
    if where == "flock":
        monkeypatch.setattr(wl.fcntl, "flock", refuse)
    else:
        monkeypatch.setattr(wl.os, "open", lambda p, *a, **k: refuse() if p.endswith(".lock") else real_open(p, *a, **k))
    warned = []
    monkeypatch.setattr(wl.logging, "warning", lambda fmt, *a: warned.append(fmt % a))
    if where == "open":  # no lock file beside it: only a directory there that can be written runs
        (tmp_path / "run").mkdir()
    with wl.hold(tmp_path / "run"):
        pass
    assert len(warned) == 1 and "not protected against a second run" in warned[0]
    assert not os.path.exists(wl.lock_path(tmp_path / "run"))


@pytest.mark.parametrize("err", [errno.ENOENT, errno.EROFS, errno.EACCES])
def test_a_directory_that_cannot_be_made_is_said_to_be_so(tmp_path, monkeypatch, err):
    """(A walkthrough: --workdir=/proc/nope ended in a FileNotFoundError traceback from the lock
    file, or in one line naming only the lock file.) No lock file and no directory to write in:
    WorkdirUnwritableError names the argument and the directory; nothing is made."""
    real_open = os.open
    monkeypatch.setattr(wl.os, "open", lambda p, *a, **k: (_ for _ in ()).throw(OSError(err, os.strerror(err), p))
                        if p.endswith(".lock") else real_open(p, *a, **k))
    with pytest.raises(wl.WorkdirUnwritableError, match=rf"^outdir: '{tmp_path / 'run'}' cannot be made or written: "
                                                        rf"{os.strerror(err)} \(.*\.run\.lock\)$"):
        with wl.hold(tmp_path / "run", arg="outdir"):
            pass
    assert os.listdir(tmp_path) == []
    # a parent that is a file: the lock file's folder cannot be made
    (tmp_path / "f").write_text("x")
    monkeypatch.undo()
    with pytest.raises(wl.WorkdirUnwritableError, match=r"^workdir: '.*/f/a/run' cannot be made or written: "):
        with wl.hold(tmp_path / "f" / "a" / "run"):
            pass


def test_binaries_say_a_workdir_cannot_be_made(tmp_path):
    proc = _run("experiments.budget", "--config=experiments/configs/budget_demo.py", "--workdir=/proc/nope")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: workdir: '/proc/nope' cannot be made or written: No such file or directory (/proc/.nope.lock)")


def test_other_errors_are_not_swallowed(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(wl.fcntl, "flock", refuse)
    with pytest.raises(OSError, match="I/O error"):
        with wl.hold(tmp_path / "run"):
            pass
    monkeypatch.undo()
    with wl.hold(tmp_path / "run"):  # the failed attempt left nothing held
        pass


# ----------------------------------------------------------------------------------------------
# The library's and binaries' run directories
# ----------------------------------------------------------------------------------------------


def test_training_refuses_a_held_workdir_and_changes_nothing(tmp_path):
    from krylovjax import training as tr
    from test_training import _tiny_config

    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text('{"kind": "start", "step": 0}\n')
    before = _snapshot(tmp_path)
    images = np.full((2, 3, 16, 16), 0.5, np.float32)
    with _Holder(wd):
        with pytest.raises(wl.WorkdirBusyError, match="is in use by another run"):
            tr.train(_tiny_config(method="ddpm", num_steps=2), images, wd)
    assert _snapshot(tmp_path) == before


def test_precompute_refuses_a_held_workdir(tmp_path):
    from krylovjax import pipeline
    from krylovjax.precompute import PrecomputeConfig

    wd = tmp_path / "run"
    images = np.full((1, 1, 8, 8), 0.5, np.float32)
    with _Holder(wd):
        with pytest.raises(wl.WorkdirBusyError, match="is in use by another run"):
            pipeline.run_precompute(images, PrecomputeConfig(num_steps=3), wd, progress=False)
    assert not wd.exists()


def test_run_claimed_holds_the_directory(tmp_path):
    wd = tmp_path / "run"
    seen = []

    def body():
        seen.append(os.path.exists(wl.lock_path(wd)))
        _refused_elsewhere(wd)  # a second run from another process
        return "done"

    assert eu.run_claimed(wd, "denoise", {"a": 1}, body) == "done"
    assert seen == [True] and not os.path.exists(wl.lock_path(wd))
    with _Holder(wd):
        with pytest.raises(wl.WorkdirBusyError):
            eu.run_claimed(wd, "denoise", {"a": 1}, lambda: pytest.fail("ran in a held directory"))


def test_fresh_moves_the_old_run_aside(tmp_path):
    wd, prev = tmp_path / "demo", tmp_path / "demo.prev"
    prev.mkdir()
    (prev / "oldest.txt").write_text("oldest")
    (prev / "experiment.json").write_text('{"experiment": "denoise"}')  # an earlier denoise run
    wd.mkdir()
    (wd / "experiment.json").write_text(json.dumps({"experiment": "denoise", "config": {"a": 0}}))
    (wd / "results.md").write_text("last run")

    def body():
        assert sorted(os.listdir(wd)) == ["experiment.json"]  # a new claim (another config is fine)
        (wd / "results.md").write_text("this run")
        return 1

    assert eu.run_claimed(wd, "denoise", {"a": 1}, body, fresh=True) == 1
    assert (prev / "results.md").read_text() == "last run" and not (prev / "oldest.txt").exists()
    assert (wd / "results.md").read_text() == "this run"
    # nothing to move: runs in a new directory
    new = tmp_path / "new"
    assert eu.run_claimed(new, "denoise", {"a": 1}, lambda: 2, fresh=True) == 2
    assert not (tmp_path / "new.prev").exists()


def test_fresh_refuses_without_moving_anything(tmp_path):
    wd, prev = tmp_path / "demo", tmp_path / "demo.prev"
    wd.mkdir()
    (wd / "results.md").write_text("last run")
    prev.mkdir()
    (prev / "results.md").write_text("older run")
    (prev / "experiment.json").write_text('{"experiment": "denoise"}')
    before = _snapshot(tmp_path)
    body = lambda: pytest.fail("ran")  # noqa: E731
    with _Holder(prev):  # someone is running in the .prev directory: it is not deleted
        with pytest.raises(wl.WorkdirBusyError, match="demo.prev"):
            eu.run_claimed(wd, "denoise", {}, body, fresh=True)
    with _Holder(wd):  # a running demo is not moved away
        with pytest.raises(wl.WorkdirBusyError):
            eu.run_claimed(wd, "denoise", {}, body, fresh=True)
    assert _snapshot(tmp_path) == before
    f = tmp_path / "afile"
    f.write_text("keep")
    with pytest.raises(eu.WorkdirConflictError, match="is not a directory; refusing to move or delete it"):
        eu.move_aside(f, kind="denoise")
    (tmp_path / "x.prev").write_text("keep too")
    (tmp_path / "x").mkdir()
    with pytest.raises(eu.WorkdirConflictError, match="x.prev' is not a directory"):
        eu.move_aside(tmp_path / "x", kind="denoise")
    assert f.read_text() == "keep" and (tmp_path / "x.prev").read_text() == "keep too"


@pytest.mark.parametrize("where", ["itself", "inside", "prev", "inside_prev"])
def test_fresh_never_moves_or_deletes_what_the_run_reads(tmp_path, where):
    """generate --workdir=W --outdir=W --fresh moved the training run it sampled from aside, and
    a second command with --workdir=W.prev deleted it (a walkthrough, 2026-12-07): a path the run
    reads (keep) that is, or lies in, the directory or its .prev is refused, nothing moved."""
    out, prev = tmp_path / "out", tmp_path / "out.prev"
    out.mkdir()
    prev.mkdir()
    (out / "a.txt").write_text("a")
    (prev / "b.txt").write_text("b")
    (prev / "experiment.json").write_text('{"experiment": "generate"}')  # an earlier generate run
    kept = {"itself": out, "inside": out / "run", "prev": prev, "inside_prev": prev / "run"}[where]
    kept.mkdir(exist_ok=True)
    before = _snapshot(tmp_path)
    deed = "move it aside" if where in ("itself", "inside") else "delete it"
    with pytest.raises(eu.WorkdirConflictError, match=f"holds the training run .*; --fresh would {deed}") as err:
        eu.run_claimed(out, "generate", {}, lambda: pytest.fail("ran"), arg="outdir", fresh=True,
                       keep={str(kept): "the training run it samples from (--workdir)"})
    assert "use another --outdir (nothing was moved)" in str(err.value)
    assert _snapshot(tmp_path) == before
    # elsewhere: moved as before
    assert eu.move_aside(out, kind="generate", keep={str(tmp_path / "elsewhere"): "x"}) == str(prev)


def test_fresh_never_moves_what_a_glob_reads_and_a_missing_directory_moves_nothing(tmp_path):
    """(A review.) An outdir inside a glob's folder holds files the pattern may read
    (files:photos/**/*.png): moved by --fresh, and deleted by the next one, until then only an
    outdir holding the folder was refused. And a missing outdir moves nothing, so a kept path in
    its .prev is no reason to refuse."""
    photos = tmp_path / "photos"
    (photos / "batch2").mkdir(parents=True)
    (photos / "batch2" / "a.png").write_bytes(b"")
    keep = {eu.source_root(f"files:{photos}/**/*.png"): "the noisy images (--input)"}
    before = _snapshot(tmp_path)
    with pytest.raises(eu.WorkdirConflictError, match=r"'.*/photos/batch2' lies in the noisy images \(--input\) "
                                                      r"\('.*/photos/\*\*'\); --fresh would move it aside"):
        eu.move_aside(photos / "batch2", kind="restore", arg="outdir", keep=keep)
    with pytest.raises(eu.WorkdirConflictError, match="holds the noisy images"):  # holding it: as before
        eu.move_aside(tmp_path, kind="restore", arg="outdir", keep=keep)
    assert _snapshot(tmp_path) == before
    assert eu.move_aside(tmp_path / "elsewhere", kind="restore", keep=keep) is None  # nothing there
    (tmp_path / "out.prev" / "checkpoints").mkdir(parents=True)
    assert eu.move_aside(tmp_path / "out", kind="restore", keep={str(tmp_path / "out.prev"): "the training run"}) is None


@pytest.mark.parametrize("held, found", [
    ({"notes.txt": "precious"}, r"files of no run \('notes.txt'\)"),
    ({"checkpoints/1/x": "", "config.json": "{}"}, "a train run"),
    ({"experiment.json": '{"experiment": "denoise"}'}, "a denoise run"),
    ({"experiment.json": "{not json"}, "a run whose experiment.json cannot be read"),
    ({"manifest.json": "{}"}, "a score store"),
    ({"sub/run/checkpoints/1/x": ""}, r"files of no run \('sub'\)"),  # a parent of runs, moved aside earlier
])
def test_fresh_deletes_only_an_earlier_run_of_its_own_binary(tmp_path, held, found):
    """(A walkthrough, thirty-seventh session.) precompute --workdir=B --fresh moved a user's folder
    to B.prev and the next one deleted it; one over a training run copied to A.prev deleted the
    run: the .prev is replaced only when it is empty or an earlier run of the same binary."""
    wd, prev = tmp_path / "w", tmp_path / "w.prev"
    (wd / "store").mkdir(parents=True)
    (wd / "precompute_summary.json").write_text("{}")
    for name, text in held.items():
        (prev / name).parent.mkdir(parents=True, exist_ok=True)
        (prev / name).write_text(text)
    before = _snapshot(tmp_path)
    with pytest.raises(eu.WorkdirConflictError, match=f"holds {found}, not an earlier precompute run that --fresh "
                                                      "may replace; --fresh would delete it: move or delete it "
                                                      r"yourself, or use another --workdir \(nothing was moved\)"):
        eu.move_aside(wd, kind="precompute")
    assert _snapshot(tmp_path) == before
    # an earlier run of its own, or an empty .prev: replaced
    shutil.rmtree(prev)
    prev.mkdir()
    assert eu.move_aside(wd, kind="precompute") == str(prev)
    assert eu.run_kind(prev) == "precompute" and not wd.exists()
    wd.mkdir()
    (wd / "notes.txt").write_text("a user's folder is moved, not deleted")
    assert eu.move_aside(wd, kind="precompute") == str(prev)
    assert (prev / "notes.txt").exists()


def test_fresh_refuses_a_relative_path_holding_the_current_directory(tmp_path, monkeypatch):
    """(A review.) With --outdir=. from inside it, --fresh moved the directory and the relative
    path then named the moved one: the run went on in <outdir>.prev, over the run moved there.
    Refused, nothing moved; the same directory given as an absolute path is moved as before."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "experiment.json").write_text('{"experiment": "generate", "config": {}}')
    before = _snapshot(tmp_path)
    for cwd, given in ((out, "."), (out / "sub", "..")):
        monkeypatch.chdir(cwd)
        with pytest.raises(eu.WorkdirConflictError, match=rf"outdir: '{re.escape(given)}' holds the current directory, "
                                                          r"which --fresh would move with it; give --outdir as an "
                                                          r"absolute path, or run from outside it \(nothing was moved\)"):
            eu.run_claimed(given, "generate", {}, lambda: pytest.fail("ran"), arg="outdir", fresh=True)
        assert _snapshot(tmp_path) == before
    monkeypatch.chdir(out)
    assert eu.run_claimed(str(out), "generate", {}, lambda: os.listdir(out), arg="outdir", fresh=True) == [
        "experiment.json"]
    assert (tmp_path / "out.prev" / "sub").is_dir()


def test_source_root_names_what_a_source_reads(tmp_path):
    (tmp_path / "a,b.npy").write_bytes(b"")
    (tmp_path / "shots [2024]").mkdir()  # an existing path is itself, wildcard characters and all
    assert eu.source_root(f"files:{tmp_path}/shots [2024]") == str(tmp_path / "shots [2024]")
    assert eu.source_root(f"files:{tmp_path}/photos/*.png") == str(tmp_path / "photos" / "**")  # a glob's tree
    assert eu.source_root(f"files:{tmp_path}/p/**/x?.jpg") == str(tmp_path / "p" / "**")
    assert eu.source_root(f"files:{tmp_path}/one.png") == str(tmp_path / "one.png")
    assert eu.source_root(f"array:{tmp_path}/x.npz,key=images,layout=NHWC") == str(tmp_path / "x.npz")
    assert eu.source_root(f"array:{tmp_path}/a,b.npy") == str(tmp_path / "a,b.npy")  # a comma of the name
    assert eu.source_root("files:~/photos") == os.path.join(os.path.expanduser("~"), "photos")
    assert eu.source_root("files:*.png") == os.path.join(os.getcwd(), "**")
    for other in ("builtin", "builtin:astronaut", "cifar10", None, "files:"):
        assert eu.source_root(other) is None
    assert eu.sources_kept(("builtin", "a"), (f"files:{tmp_path}/one.png", "b"), (None, "c"),
                           (f"files:{tmp_path}/photos/*.png", "d")) == {
        str(tmp_path / "one.png"): "b", str(tmp_path / "photos" / "**"): "d"}


def test_generate_refuses_a_held_outdir(tmp_path):
    sys.path.insert(0, ROOT)
    from experiments import generate

    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    with _Holder(wd / "generate"):
        with pytest.raises(wl.WorkdirBusyError, match="outdir: .* is in use by another run"):
            generate.run(str(wd))
    assert os.listdir(wd) == ["checkpoints"]


@pytest.mark.parametrize("module, args", [
    ("experiments.train", ["--config=experiments/configs/train_tiny.py", "--data=builtin",
                           "--config.data.image_size=16", "--config.num_steps=2"]),
    ("experiments.denoise", ["--config=experiments/configs/denoise_demo.py", "--fresh"]),
])
def test_binary_refuses_a_held_workdir_cleanly(module, args, tmp_path):
    """The binary ends with the message (no traceback, no flag help, status 1) before any work;
    a held demo is neither moved aside by --fresh nor written into."""
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "keep.txt").write_text("a run's file")
    before = _snapshot(tmp_path)
    with _Holder(wd) as holder:
        proc = _run(module, *args, f"--workdir={wd}")
    assert proc.returncode == 1
    assert f"error: workdir: '{wd}' is in use by another run (process {holder.pid} on " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "--workdir: Run directory" not in proc.stderr  # no flag help
    assert _snapshot(tmp_path) == before
