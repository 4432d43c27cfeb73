"""What to tell a user whose run could not write a file (a full disk above all).

Orbax and tensorstore report a full disk as ``ValueError: RESOURCE_EXHAUSTED: ... No space left
on device [os_error_code='28']`` (measured on a full tmpfs, 2026-12-06), not as an ``OSError``
with ``errno.ENOSPC``; both forms are recognised.
"""
from __future__ import annotations

import errno
from typing import Iterator

__all__ = ["write_failure_cause", "plain_file_mode", "atomic_write_text", "atomic_write"]


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its causes and contexts."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def write_failure_cause(err: BaseException) -> tuple[str, bool]:
    """(the cause in a few words, whether the disk is full) of a failed write."""
    full = any("No space left on device" in str(e) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)
               for e in _chain(err))
    if full:
        return "the disk is full (No space left on device)", True
    return f"{type(err).__name__}: {err}".splitlines()[0][:400], False


def plain_file_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file (``0o666`` less the umask).

    The atomic writers create their temporary file with :func:`tempfile.mkstemp`, which makes it
    readable by its owner only (0600), and rename it into place: results, configs and manifests
    came out 0600 where a figure written by matplotlib is 0644 (a walkthrough found it). They set
    this mode on the temporary file. The umask is read from ``/proc/self/status`` where Linux gives
    it, else by setting and restoring it (not thread-safe, hence the first way)."""
    import os

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str, text: str, *, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`). The one writer of the
    binaries' results, the training run's records and the store's manifest and markers."""
    atomic_write(path, lambda f: f.write(text), durable=durable)


def atomic_write(path: str, write, *, binary: bool = False, durable: bool = False) -> None:
    """``write(f)`` into a temporary file in ``path``'s directory (text, UTF-8, or ``binary``),
    with the mode ``open()`` would give (:func:`plain_file_mode`), renamed into place; ``durable``
    also fsyncs it before the rename. A failure removes the temporary file and raises."""
    import os
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, plain_file_mode())  # mkstemp's 0600 would outlive the rename
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
