"""One run at a time in a run directory.

Two runs writing one directory corrupt each other: two trainings of one workdir save the same
checkpoint steps (orbax fails on the other's temporary directory), interleave their records in
``metrics.jsonl`` and race on resumption; two pre-computations rewrite each other's chunks; a
second ``make demo`` used to move the first one's directory away under it. :func:`hold` makes a
directory exclusive to one run for the duration of a ``with`` block, and refuses a second one at
once with :class:`WorkdirBusyError`, naming the process that holds it.

The lock is an advisory ``flock`` on a file *beside* the directory, ``<parent>/.<name>.lock``
(``<parent>/.<name>.process<i>.lock`` for process ``i > 0`` of a multi-process job, so that the
processes of one job, which write their own parts, never refuse each other, while a second job's
process ``i`` is refused by the first job's). Beside, not inside: the directory's own contents
(an empty directory is a new run's) are not changed, and the lock covers the *name*, so a run
that moves the directory aside (``--fresh``) and makes a new one keeps it throughout. The path
is resolved first (its symlinks, the directory's own name included), so every name that leads to
one directory takes one lock: for a ``runs/x`` linked to ``/disk/x`` the file is
``/disk/.x.lock`` (since 2026-12-07; before, a link named as the directory itself had its own lock
in ``runs/``, and a second run through it was not refused).

- The operating system drops the lock when its process ends in any way (SIGKILL included), so a
  killed run never leaves a stale lock behind: its resume takes the lock at once. The file is
  deleted when the lock is released (while still held, so a waiting process notices the
  change and takes the new file instead).
- The same thread may take a lock it holds again (a binary holds its workdir and calls
  :func:`krylovjax.training.train` on it); another thread of the same process is refused like
  another process.
- Where the file system cannot lock (``ENOLCK``/``EOPNOTSUPP``: some network and FUSE mounts)
  or the file cannot be made beside the directory (a read-only parent), the run goes on without
  a lock after one warning, as it would have before locks existed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import operator
import os
import socket
import sys
import threading
import time
from typing import Iterator

from absl import logging

try:  # POSIX; elsewhere runs are not locked (one warning)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["WorkdirBusyError", "WorkdirUnwritableError", "hold", "hold_in_every_process", "lock_path"]

# errno values meaning "this file system cannot lock" / "cannot make the lock file here".
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_FILE = {errno.EACCES, errno.EPERM, errno.EROFS}

_held: dict[str, int] = {}  # lock path -> the thread holding it in this process
_mutex = threading.Lock()


class WorkdirBusyError(RuntimeError):
    """Another run (process or thread) holds the directory."""


class WorkdirUnwritableError(OSError):
    """The directory can neither be made nor written (a missing or read-only parent, ``/proc``):
    said naming the argument, before any work, instead of a traceback from the first write."""


def _unwritable(workdir, arg: str, err: OSError) -> WorkdirUnwritableError:
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return WorkdirUnwritableError(f"{arg}: {os.fspath(workdir)!r} cannot be made or written: "
                                  f"{err.strerror or err}{where}")


def _usable(workdir) -> bool:
    """An existing directory this process can write in (a writable mount under a read-only
    parent runs unlocked, with a warning)."""
    return os.path.isdir(workdir) and os.access(workdir, os.W_OK | os.X_OK)


def lock_path(workdir: str | os.PathLike, process_index: int = 0) -> str:
    """The lock file of ``workdir`` for process ``process_index`` of a job."""
    # one lock whichever symlinked path leads to the directory: its parent's links and a link of
    # its own name resolved (a run through a linked name was not refused; a walkthrough, 2026-12-07)
    path = os.path.realpath(os.fspath(workdir))  # (absolute too)
    parent, name = os.path.split(path)
    if not name:  # the file system's root
        raise ValueError(f"workdir: expected a directory below the root, got {os.fspath(workdir)!r}")
    try:
        index = -1 if isinstance(process_index, bool) else operator.index(process_index)
    except TypeError:
        index = -1
    if index < 0:
        raise ValueError(f"process_index: expected an int >= 0, got {process_index!r}")
    suffix = "" if index == 0 else f".process{index}"
    return os.path.join(parent, f".{name}{suffix}.lock")


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, arg: str = "workdir", process_index: int = 0) -> Iterator[str]:
    """Hold ``workdir`` for this run for the ``with`` block (see the module doc).

    Args:
      workdir: the run directory (need not exist yet; its parent is created).
      arg: the flag or argument the directory came from, for the message.
      process_index: this process's index in a multi-process job (``jax.process_index()``).

    Yields:
      The lock file's path.

    Raises:
      WorkdirBusyError: another process, or another thread of this one, holds ``workdir``.
      WorkdirUnwritableError: ``workdir`` cannot be made or written.
    """
    path = lock_path(workdir, process_index)
    me = threading.get_ident()
    with _mutex:  # claimed for this thread before its file is locked: no other thread gets past
        owner = _held.get(path)
        if owner is None:
            _held[path] = me
    if owner is not None and owner != me:
        raise WorkdirBusyError(
            f"{arg}: {os.fspath(workdir)!r} is in use by another thread of this process; "
            f"wait for that run to finish or use another --{arg}")
    if owner == me:  # re-entered by its holder: the outermost block releases it
        yield path
        return
    try:
        fd = _acquire(path, workdir, arg)
    except BaseException:
        with _mutex:
            del _held[path]
        raise
    try:
        yield path
    finally:
        with _mutex:
            del _held[path]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: see the module doc
            os.close(fd)


@contextlib.contextmanager
def hold_in_every_process(workdir: str | os.PathLike, *, arg: str = "workdir") -> Iterator[str]:
    """:func:`hold` by every process of a ``jax.distributed`` job, each its own lock, agreed on:
    when one process cannot take its lock, every process of the job refuses (one all-gather),
    naming the processes refused. Alone, a refused process ended while the others went on: a
    second job's process 1 wrote chunks beside a first, one-process run (whose lock is process
    0's), until the store refused a chunk written twice (a walkthrough, 2026-12-07). One process:
    :func:`hold`."""
    import jax

    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        with hold(workdir, arg=arg) as path:
            yield path
        return
    import numpy as np

    from krylovjax.experiment_utils import process_values

    with contextlib.ExitStack() as stack:
        refused = None
        try:
            path = stack.enter_context(hold(workdir, arg=arg, process_index=index))
        except Exception as err:  # noqa: BLE001 - any failure is agreed on, then raised here
            refused = err
        ok = process_values(refused is None)[:, 0]
        if refused is not None:
            raise refused
        if not ok.all():
            bad = [int(i) for i in np.flatnonzero(ok == 0)]
            raise WorkdirBusyError(
                f"{arg}: {os.fspath(workdir)!r}: process{'es' if len(bad) > 1 else ''} "
                f"{', '.join(map(str, bad))} of this job could not take it (see "
                f"{'their' if len(bad) > 1 else 'its'} own message); nothing was done here")
        yield path


def _warn_unlocked(path: str, why: str) -> None:
    logging.warning("cannot lock %s (%s): this run is not protected against a second run in the same "
                    "directory", path, why)


def _acquire(path: str, workdir, arg: str) -> int | None:
    if fcntl is None:  # pragma: no cover - Windows
        _warn_unlocked(path, "no fcntl on this platform")
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as err:  # a file in the way, a read-only parent
        if _usable(workdir):
            _warn_unlocked(path, str(err))
            return None
        raise _unwritable(workdir, arg, err) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in _NO_FILE | {errno.ENOENT} and _usable(workdir):
                _warn_unlocked(path, str(err))
                return None
            if err.errno in _NO_FILE | {errno.ENOENT, errno.ENOTDIR}:
                raise _unwritable(workdir, arg, err) from None
            if err.errno == errno.ENAMETOOLONG:  # (a traceback; a walkthrough, 2026-12-07)
                lock = os.path.basename(path)
                what = (f"the name of its lock file {lock[:40]!r}... ({len(lock)} characters: the directory's name "
                        "with '.' and '.lock' around it)" if len(lock) > 255 else
                        f"the path of its lock file ({len(path)} characters)")
                raise WorkdirUnwritableError(
                    f"{arg}: {what} is too long for this file system (and --fresh adds '.prev' to the directory's "
                    f"name); use a shorter --{arg}") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{arg}: {os.fspath(workdir)!r} is in use by another run ({holder}); wait for it to finish "
                f"(a killed run frees it at once) or use another --{arg}") from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_LOCKING:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # nobody can lock it on this file system
                _warn_unlocked(path, str(err))
                return None
            raise
        # The previous holder may have deleted this file between our open and our lock: then
        # the lock guards nothing and a newer file may already be held. Take the path's file.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    """The holder's description from its lock file, as far as it is written."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "a process that has not yet said which"
    return (f"process {info.get('pid')} on {info.get('host')} since {info.get('since')}: "
            f"{info.get('command') or '?'}")
