"""What to tell a user whose run could not write a file (a full disk above all).

Orbax and tensorstore report a full disk as ``ValueError: RESOURCE_EXHAUSTED: ... No space left
on device [os_error_code='28']`` (measured on a full tmpfs, 2026-12-06), not as an ``OSError``
with ``errno.ENOSPC``; both forms are recognised.
"""
from __future__ import annotations

import errno
from typing import Iterator

__all__ = ["write_failure_cause"]


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
