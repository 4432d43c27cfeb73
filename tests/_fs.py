"""A directory's contents, to check that a refused run left it exactly as it was."""
import hashlib
import os


def snapshot(root) -> dict:
    """Everything under ``root``: ``{relative path: None}`` for a directory and
    ``{relative path: (mtime_ns, sha256 of the bytes)}`` for a file (so a file rewritten with
    the same bytes differs too)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out
