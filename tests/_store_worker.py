"""Helper process for tests/test_store.py: writes a ScoreStore and gets killed on purpose.

Usage: python tests/_store_worker.py STORE_DIR SIGNAL_FILE MODE CHUNK [FIELD_COUNT]

MODE "pause_after": write chunks 0..CHUNK in order, touch SIGNAL_FILE, then sleep (to be killed).
MODE "die_inside": write chunks 0..CHUNK-1, then start chunk CHUNK with corrupted data (all -1),
  write only its first FIELD_COUNT fields, touch SIGNAL_FILE, then sleep before the marker.

The data are a deterministic function of the image index (``make_fields``), so the test can
compare a resumed store against an uninterrupted run.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

# Small problem shared by the test and this helper.
NUM_IMAGES, CHUNK_SIZE, C, N, H, W = 10, 3, 2, 4, 6, 5


def field_specs():
    return {
        "m": ((C, N, H, W), np.float64, 1),
        "scores": ((C, N, 2, H, W), np.float32, 1),
        "embedded": ((N, C, H, W), np.float32, 0),
        "matvecs": ((), np.int32),
        "nonconverged": ((), np.bool_),
    }


def run_config():
    return {"sde": {"name": "vesde", "sigma": 5.0}, "num_steps": N, "solver": {"tol": 2e-8, "restart": 8}}


def input_images():
    return np.random.default_rng(1234).random((NUM_IMAGES, C, H, W))


def make_fields(start: int, stop: int) -> dict:
    """Deterministic per-image data for images [start, stop)."""
    out = {"m": [], "scores": [], "embedded": [], "matvecs": [], "nonconverged": []}
    for i in range(start, stop):
        rng = np.random.default_rng(1000 + i)
        out["m"].append(rng.standard_normal((C, N, H, W)))
        out["scores"].append(rng.standard_normal((C, N, 2, H, W)).astype(np.float32))
        out["embedded"].append(rng.random((N, C, H, W)).astype(np.float32))
        out["matvecs"].append(np.int32(rng.integers(1, 500)))
        out["nonconverged"].append(bool(rng.integers(0, 2)))
    return {
        "m": np.stack(out["m"]).astype(np.float64),
        "scores": np.stack(out["scores"]),
        "embedded": np.stack(out["embedded"]),
        "matvecs": np.asarray(out["matvecs"], np.int32),
        "nonconverged": np.asarray(out["nonconverged"], np.bool_),
    }


def open_store(path, **kw):
    from krylovjax.store import ScoreStore, hash_inputs

    return ScoreStore.create_or_open(
        path, config=run_config(), inputs_hash=hash_inputs(input_images(), run_config()),
        num_images=NUM_IMAGES, chunk_size=CHUNK_SIZE, fields=field_specs(), **kw)


def _touch(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def main(argv):
    store_dir, signal_file, mode, chunk = argv[1], argv[2], argv[3], int(argv[4])
    store = open_store(store_dir)
    if mode == "pause_after":
        for i in range(chunk + 1):
            store.write_chunk(i, make_fields(*store.chunk_bounds(i)))
        _touch(signal_file)
        time.sleep(600)
    elif mode == "die_inside":
        field_count = int(argv[5])
        for i in range(chunk):
            store.write_chunk(i, make_fields(*store.chunk_bounds(i)))
        written = []
        original = store._write_field

        def write_then_stall(name, start, stop, arr):
            if len(written) == field_count:
                _touch(signal_file)
                time.sleep(600)  # killed here: some fields written, no marker
            original(name, start, stop, arr).result()
            written.append(name)

            class _Done:
                def result(self):
                    return None

            return _Done()

        store._write_field = write_then_stall
        bad = {k: (np.full_like(v, -1) if v.dtype != np.bool_ else ~v)
               for k, v in make_fields(*store.chunk_bounds(chunk)).items()}
        store.write_chunk(chunk, bad)
        raise AssertionError("write_chunk returned; the test should have killed this process")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
