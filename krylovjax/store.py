"""Resumable, chunked on-disk store for pre-computed score fields.

The pre-computation pipeline (method.md sections 3-4: log-densities ``m``, scores ``s = grad m``,
embedded trajectories ``x^n``; hyper-parameters as in section 8) is expensive and runs for hours
on real data sets.  :class:`ScoreStore` keeps its output on disk, one chunk of images at a time, so
a killed run restarts where it stopped and a training run can read single images (or single time
steps of them) at random.

Layout of a store directory::

    <path>/manifest.json              run config, inputs hash, fields, chunking (written once)
    <path>/arrays/<field>/            one zarr v3 array per field (tensorstore, ``file`` kvstore)
    <path>/complete/chunk_00000007.json   completion marker of chunk 7 (one file per chunk)

Every field is an array ``[num_images, *shape]`` chunked along the image axis: chunk ``i`` holds
images ``[i * chunk_size, min((i + 1) * chunk_size, num_images))`` and is what the pipeline
writes at once.  Large per-image fields are zarr *shards* (one file per chunk) whose inner chunks
are one image, and one time step of it when the field declares a time axis, so a training read
touches only the bytes it needs.  Small per-image fields (solver statistics) are plain chunks.

Crash safety: ``write_chunk`` validates everything first, writes every field of the chunk (data
files fsync'd by tensorstore's ``file_io_sync``), and only then publishes the chunk's marker file
through a temporary file, ``fsync`` and ``os.replace`` (atomic on POSIX).  A process killed at any
point leaves the chunk either complete (marker present, all data durable) or incomplete (no
marker); incomplete chunks are simply rewritten on resume, which overwrites any partial data.

Integrity: each marker records the sha256 of every field of its chunk.  A resumed pre-computation
checks the chunks it takes as done (:meth:`ScoreStore.recheck_owned_chunks`) and computes a chunk
that fails again; whole-chunk reads (:meth:`ScoreStore.read_range`, :meth:`ScoreStore.read_all`,
what training reads) check the chunks they read and refuse a mismatch (:class:`StoreDamagedError`).
A damaged file (manifest, an array's ``zarr.json``, a marker, a data file) is refused with one line
naming it.  Random access (:meth:`ScoreStore.read`, :meth:`ScoreStore.read_batch`) reads parts of
chunks and cannot check them.

Multi-host: chunk ``i`` belongs to host ``i % process_count``.  Host 0 creates (or checks and
reopens) the store; the other hosts wait for its manifest and then open it.  Hosts only ever
write their own chunks' data files and marker files, so no file has two writers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import re
import socket
import time
from typing import Any, Mapping, Sequence

import numpy as np
import tensorstore as ts

from krylovjax._io_errors import atomic_write_text, write_failure_cause

__all__ = [
    "FieldSpec",
    "ScoreStore",
    "StoreConflictError",
    "StoreDamagedError",
    "StoreWriteError",
    "canonical_config",
    "hash_inputs",
    "read_manifest",
    "MANIFEST_NAME",
    "STORE_FORMAT",
]

MANIFEST_NAME = "manifest.json"
STORE_FORMAT = "krylovjax.score_store"
STORE_VERSION = 1
_ARRAYS_DIR = "arrays"
_COMPLETE_DIR = "complete"
_MARKER_RE = re.compile(r"^chunk_(\d{8})\.json$")
_FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# Per-image fields at most this many bytes are stored as plain chunks (no sharding): sharding a
# field of one scalar per image would cost a 16-byte index entry per 4-byte value.
_SHARD_MIN_BYTES_PER_IMAGE = 4096
_INPUTS_HASH_TAG = b"krylovjax.hash_inputs.v1\0"


# ----------------------------------------------------------------------------------------------
# Hashing and canonical config
# ----------------------------------------------------------------------------------------------


def _to_json_value(obj: Any, where: str) -> Any:
    """Recursively converts ``obj`` to plain JSON types (dict, list, str, int, float, bool, None)."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"config: keys must be str, got {type(key).__name__} key {key!r} at {where or '<root>'}"
                )
            out[key] = _to_json_value(value, f"{where}.{key}" if where else key)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_json_value(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        if obj.size > 1024:
            raise TypeError(
                f"config: {where} is an array of {obj.size} elements; configs hold small values, "
                "pass large arrays as inputs instead"
            )
        return _to_json_value(obj.tolist(), where)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"config: {where} is {obj!r}; config values must be finite numbers")
        return float(obj)
    raise TypeError(
        f"config: {where or '<root>'} has type {type(obj).__name__}, which is not JSON-serialisable "
        "(expected dict, list, tuple, str, int, float, bool or None)"
    )


def canonical_config(config: Mapping[str, Any]) -> dict:
    """Returns ``config`` as plain JSON types (tuples -> lists, numpy scalars -> Python).

    Accepts a dict or an ``ml_collections.ConfigDict``. Raises ``TypeError`` naming the key of a
    value that is not JSON-serialisable and ``ValueError`` for non-finite floats.
    """
    if not (isinstance(config, Mapping) or hasattr(config, "to_dict")):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    return _to_json_value(config, "")


def _canonical_json(config: Mapping[str, Any]) -> str:
    return json.dumps(
        canonical_config(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def hash_inputs(images: np.ndarray, config: Mapping[str, Any]) -> str:
    """SHA-256 identifying a pre-computation run: its input images and its config.

    Args:
      images: array of any shape (typically ``[B, C, H, W]`` in [0, 1]) and numeric or bool dtype;
        numpy or jax arrays are accepted.
      config: JSON-serialisable dict (or ``ml_collections.ConfigDict``) of the run's settings.

    Returns:
      A 64-character hex digest of, in order (one sha256 stream): the tag
      ``b"krylovjax.hash_inputs.v1\\0"``; the image dtype as ``numpy.dtype.str`` (endianness
      included) and the shape as comma-separated decimals, as ASCII joined by ``"|"`` and ended by
      ``"\\n"``; the C-order bytes of the images; ``b"\\n"``; the canonical JSON of the config
      (sorted keys, separators ``(",", ":")``, ASCII) in UTF-8. Key order in ``config`` does not
      matter; any change of a pixel, the dtype, the shape or a config value changes the hash.
    """
    arr = np.asarray(images)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"images: expected a numeric or bool array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(_INPUTS_HASH_TAG)
    h.update(f"{arr.dtype.str}|{','.join(str(int(d)) for d in arr.shape)}\n".encode("ascii"))
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    h.update(b"\n")
    h.update(_canonical_json(config).encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Field specifications
# ----------------------------------------------------------------------------------------------

_SUPPORTED_KINDS = "biuf"


class StoreConflictError(ValueError):
    """The store's directory holds a store of other inputs or another config, or other files; nothing
    was written."""


class StoreDamagedError(StoreConflictError):
    """A store's file is damaged or missing: its manifest, an array's ``zarr.json``, a chunk's marker
    or data file cannot be read, or a chunk's data differ from the checksum in its marker. The
    message names the file (or the chunk and field) and what to do. A ``StoreConflictError`` (so a
    ``ValueError``), which the binaries end with in one line (``experiment_utils.exit_on_run_errors``)."""


#: What to do about a damaged chunk: a resumed pre-computation checks its chunks and redoes this one.
_REDO_CHUNK = ("rerun the pre-computation (experiments.precompute) with the same flags to recompute it "
               "(it checks its complete chunks and computes a damaged one again)")
#: What to do about a damaged manifest or array: the store cannot be trusted as a whole.
_REDO_STORE = ("the store is damaged: rerun the pre-computation (experiments.precompute) with --fresh "
               "(it moves this run aside and starts over), or restore the store from a copy")


class StoreWriteError(RuntimeError):
    """A chunk's data could not be written (a full disk, a lost mount); the chunk stays missing."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One stored field: its per-image shape, dtype and (optionally) which axis is time.

    Attributes:
      shape: per-image shape, without the image axis, e.g. ``(C, N, H, W)`` for ``m``,
        ``(C, N, 2, H, W)`` for scores, ``(N, C, H, W)`` for embedded trajectories, ``()`` for a
        per-image statistic.
      dtype: numpy dtype (bool, signed/unsigned int or float).
      time_axis: index into ``shape`` of the time axis (1 for ``m`` and scores, 0 for embedded
        trajectories), or None if the field has no time axis. Enables ``read(..., time_index=)``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    time_axis: int | None = None

    @classmethod
    def parse(cls, name: str, spec: Any) -> "FieldSpec":
        """Builds a FieldSpec from a FieldSpec, ``(shape, dtype)`` or ``(shape, dtype, time_axis)``."""
        if not isinstance(name, str) or not _FIELD_NAME_RE.match(name):
            raise ValueError(
                f"fields: name {name!r} must be a str matching {_FIELD_NAME_RE.pattern} (used as a directory name)"
            )
        if isinstance(spec, FieldSpec):
            shape, dtype, time_axis = spec.shape, spec.dtype, spec.time_axis
        elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
            shape, dtype = spec[0], spec[1]
            time_axis = spec[2] if len(spec) == 3 else None
        else:
            raise ValueError(
                f"fields[{name!r}]: expected (shape, dtype) or (shape, dtype, time_axis), got {spec!r}"
            )
        try:  # integers only: int(2.5) would truncate a float size without a word
            if isinstance(shape, (str, bytes)) or any(isinstance(d, (bool, np.bool_)) for d in shape):
                raise TypeError
            shape = tuple(operator.index(d) for d in shape)
        except TypeError as e:
            raise ValueError(f"fields[{name!r}]: shape must be a sequence of ints, got {shape!r}") from e
        if any(d <= 0 for d in shape):
            raise ValueError(f"fields[{name!r}]: shape dimensions must be positive, got {shape}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"fields[{name!r}]: {dtype!r} is not a numpy dtype") from e
        if dtype.kind not in _SUPPORTED_KINDS:
            raise TypeError(
                f"fields[{name!r}]: dtype {dtype} not supported; expected bool, int, uint or float"
            )
        dtype = dtype.newbyteorder("=")
        if time_axis is not None:
            if isinstance(time_axis, bool) or not isinstance(time_axis, (int, np.integer)):
                raise ValueError(f"fields[{name!r}]: time_axis must be an int or None, got {time_axis!r}")
            time_axis = int(time_axis)
            if not 0 <= time_axis < len(shape):
                raise ValueError(
                    f"fields[{name!r}]: time_axis {time_axis} out of range for per-image shape {shape}"
                )
        return cls(shape=shape, dtype=dtype, time_axis=time_axis)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype.name, "time_axis": self.time_axis}

    @property
    def bytes_per_image(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ----------------------------------------------------------------------------------------------
# Small file-system helpers
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically: temp file in the same dir, fsync, replace."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n", durable=True)
    _fsync_dir(os.path.dirname(path))


_MANIFEST_KEYS = {"config": dict, "inputs_hash": str, "num_images": int, "chunk_size": int,
                  "num_chunks": int, "fields": dict}


def read_manifest(path: str | os.PathLike, arg: str = "path") -> dict:
    """The manifest of the store at ``path``, checked to be a store manifest with its keys.

    Raises:
      FileNotFoundError: no manifest there (the message starts with ``arg``).
      StoreConflictError: a JSON object that is not a store manifest (another ``format``).
      StoreDamagedError: a manifest that cannot be read, is not valid JSON, or lacks keys.
    """
    mpath = os.path.join(os.fspath(path), MANIFEST_NAME)
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg}: {os.fspath(path)!r} has no {MANIFEST_NAME}; not a ScoreStore") from None
    except OSError as e:
        raise StoreDamagedError(f"{arg}: {mpath!r} cannot be read ({e.strerror or e}); {_REDO_STORE}") from e
    try:
        manifest = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreDamagedError(f"{arg}: {mpath!r} is not valid JSON ({e}); {_REDO_STORE}") from e
    if manifest is None:
        raise StoreDamagedError(f"{arg}: {mpath!r} is empty; {_REDO_STORE}")
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise StoreConflictError(
            f"{arg}: {os.fspath(path)!r} has a {MANIFEST_NAME} that is not a {STORE_FORMAT} manifest; "
            "refusing to write into it, use a new workdir"
        )
    if manifest.get("version") != STORE_VERSION:
        raise StoreConflictError(
            f"{arg}: store {os.fspath(path)!r} has format version {manifest.get('version')}, this code reads and "
            f"writes version {STORE_VERSION}; refusing to use it: use a new workdir, or the krylovjax that made it"
        )
    bad = [k for k, kind in _MANIFEST_KEYS.items()
           if not isinstance(manifest.get(k), kind) or isinstance(manifest.get(k), bool)]
    fields = manifest.get("fields")
    if isinstance(fields, dict):
        bad += [f"fields.{name}" for name, f in fields.items()
                if not (isinstance(f, dict) and {"shape", "dtype", "time_axis"} <= set(f))]
    if bad:
        raise StoreDamagedError(f"{arg}: {mpath!r} lacks (or has malformed) key(s) {bad}; {_REDO_STORE}")
    return manifest


def _ts_cause(err: BaseException, limit: int = 300) -> str:
    """A tensorstore error in one short line (its first line, without the spec it appends)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    text = text.split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_keys(stored: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON values differ (keys only on one side included)."""
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(stored) | set(given)):
            path = f"{prefix}.{key}" if prefix else key
            if key not in stored or key not in given:
                out.append(path)
            else:
                out.extend(_diff_keys(stored[key], given[key], path))
        return out
    if type(stored) is not type(given) and not (
        isinstance(stored, (int, float)) and isinstance(given, (int, float))
        and not isinstance(stored, bool) and not isinstance(given, bool)
    ):
        return [prefix or "<root>"]
    return [] if stored == given else [prefix or "<root>"]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if value is not _MISSING else "<absent>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MISSING = object()


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


class ScoreStore:
    """Chunked, resumable on-disk store of per-image fields (zarr v3 via tensorstore).

    Create or reopen one with :meth:`create_or_open`; do not call the constructor directly.

    Attributes:
      path: the store directory.
      config: the run config (canonical JSON types) stored in the manifest.
      inputs_hash: the :func:`hash_inputs` digest stored in the manifest.
      num_images, chunk_size, num_chunks: the chunking along the image axis.
      fields: ``{name: FieldSpec}`` in declaration order.
      process_index, process_count: this host and the number of hosts; chunk ``i`` is owned by
        host ``i % process_count``.
      chunks_written: number of chunks this object has written (a resume counter).
    """

    def __init__(self, path: str, manifest: dict, arrays: dict, process_index: int, process_count: int):
        self.path = path
        self._manifest = manifest
        self._arrays = arrays
        self.config = manifest["config"]
        self.inputs_hash = manifest["inputs_hash"]
        self.num_images = int(manifest["num_images"])
        self.chunk_size = int(manifest["chunk_size"])
        self.num_chunks = int(manifest["num_chunks"])
        self.fields = {name: FieldSpec.parse(name, (f["shape"], f["dtype"], f["time_axis"]))
                       for name, f in manifest["fields"].items()}
        self.process_index = process_index
        self.process_count = process_count
        self.chunks_written = 0
        self._complete_cache: set[int] = set()
        self._data_checked: set[int] = set()  # complete chunks whose data files were found (reads)
        self._markers: dict[int, dict] = {}  # parsed markers of complete chunks (reads)
        self._verified: set[tuple[str, int]] = set()  # (field, chunk) read and found to match its checksum

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike,
        *,
        config: Mapping[str, Any],
        inputs_hash: str,
        num_images: int,
        chunk_size: int,
        fields: Mapping[str, Any],
        process_index: int = 0,
        process_count: int = 1,
        open_timeout_s: float = 600.0,
        poll_interval_s: float = 0.2,
    ) -> "ScoreStore":
        """Creates a new store at ``path`` or reopens an identical one for resumption.

        Args:
          path: store directory (e.g. ``<workdir>/scores``); created if missing.
          config: the run config, JSON-serialisable dict or ``ConfigDict``.
          inputs_hash: :func:`hash_inputs` of the images and config (64 hex chars).
          num_images: total number of images B >= 1 (the leading axis of every field).
          chunk_size: images per chunk, >= 1: the block the pipeline computes and writes at once.
          fields: ``{name: (shape, dtype)}`` or ``{name: (shape, dtype, time_axis)}`` (or
            :class:`FieldSpec`), shapes without the image axis, e.g. ``"m": ((C, N, H, W),
            np.float32, 1)``, ``"scores": ((C, N, 2, H, W), np.float32, 1)``,
            ``"embedded": ((N, C, H, W), np.float32, 0)``, ``"matvecs": ((), np.int32)``.
          process_index: this host's index in ``[0, process_count)``.
          process_count: number of hosts writing into the store.
          open_timeout_s: how long a host other than 0 waits for host 0's manifest.
          poll_interval_s: polling period while waiting.

        Returns:
          The store. Host 0 creates the arrays and then the manifest (atomically); a host other
          than 0 waits for the manifest and opens it.

        Raises:
          ValueError: bad arguments, or ``path`` holds a store made with a different config,
            inputs hash, image count, chunk size or fields (the message names the keys that
            differ; nothing is written), or ``path`` is a non-empty directory that is not a store.
            Exception: with one process, a store that differs in its chunk size alone and has no
            complete chunk is made afresh in the new chunks (nothing computed is lost; a writer
            still filling its first chunk there would be: :func:`krylovjax.pipeline.run_precompute`
            holds its work directory against a second run).
          TypeError: unsupported field dtypes or a non-serialisable config.
          TimeoutError: a host other than 0 saw no manifest within ``open_timeout_s``.
        """
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise ValueError(f"path: expected a non-empty directory path, got {path!r}")
        if not isinstance(inputs_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", inputs_hash):
            raise ValueError(f"inputs_hash: expected a 64-character lowercase hex sha256 digest, got {inputs_hash!r}")
        num_images = _check_positive_int("num_images", num_images)
        chunk_size = _check_positive_int("chunk_size", chunk_size)
        process_count = _check_positive_int("process_count", process_count)
        if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)) or not (
            0 <= int(process_index) < process_count
        ):
            raise ValueError(f"process_index: expected an int in [0, {process_count}), got {process_index!r}")
        process_index = int(process_index)
        if not isinstance(fields, Mapping) or not fields:
            raise ValueError(f"fields: expected a non-empty dict {{name: (shape, dtype[, time_axis])}}, got {fields!r}")
        specs = {name: FieldSpec.parse(name, spec) for name, spec in fields.items()}
        config = canonical_config(config)
        num_chunks = -(-num_images // chunk_size)
        wanted = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "config": config,
            "config_sha256": hashlib.sha256(_canonical_json(config).encode("utf-8")).hexdigest(),
            "inputs_hash": inputs_hash,
            "num_images": num_images,
            "chunk_size": chunk_size,
            "num_chunks": num_chunks,
            "fields": {name: s.to_json() for name, s in specs.items()},
        }
        manifest_path = os.path.join(path, MANIFEST_NAME)

        if process_index != 0:
            deadline = time.monotonic() + float(open_timeout_s)
            while not os.path.exists(manifest_path):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"process {process_index}: no {MANIFEST_NAME} appeared in {path!r} within "
                        f"{open_timeout_s} s; process 0 creates the store"
                    )
                time.sleep(poll_interval_s)
            manifest = read_manifest(path)
            _check_compatible(path, manifest, wanted)
            arrays = _open_arrays(path, manifest, specs)
            return cls(path, manifest, arrays, process_index, process_count)

        if os.path.exists(manifest_path):
            manifest = read_manifest(path)
            if not (process_count == 1 and _rechunkable(path, manifest, wanted)):
                _check_compatible(path, manifest, wanted)
                arrays = _open_arrays(path, manifest, specs)
                return cls(path, manifest, arrays, process_index, process_count)
            # The same run's store with no complete chunk, asked for in chunks of another size
            # (the natural retry after running out of memory, which a walkthrough found refused,
            # 2026-12-07): nothing computed is lost by making it afresh in the new chunks. The
            # manifest goes first: a crash now leaves an unpublished store, made afresh next time.
            os.unlink(manifest_path)

        # Fresh store (or one whose creator died before publishing the manifest).
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise ValueError(f"path: {path!r} exists and is not a directory")
            foreign = [e for e in os.listdir(path)
                       if e not in (_ARRAYS_DIR, _COMPLETE_DIR) and not e.startswith("." + MANIFEST_NAME)]
            if foreign:
                raise StoreConflictError(
                    f"path: {path!r} is a non-empty directory without {MANIFEST_NAME} (found "
                    f"{sorted(foreign)[:5]}); refusing to write into it, use a new or empty directory"
                )
        os.makedirs(os.path.join(path, _ARRAYS_DIR), exist_ok=True)
        complete_dir = os.path.join(path, _COMPLETE_DIR)
        os.makedirs(complete_dir, exist_ok=True)
        for entry in os.listdir(complete_dir):  # stale markers of an unpublished store
            os.unlink(os.path.join(complete_dir, entry))
        arrays = {
            name: ts.open(
                _array_spec(path, name, spec, num_images, chunk_size),
                create=True, delete_existing=True, context=_CONTEXT,
            ).result()
            for name, spec in specs.items()
        }
        manifest = dict(wanted)
        manifest["created_unix"] = time.time()
        manifest["created_by"] = socket.gethostname()
        _atomic_write_json(manifest_path, manifest)
        return cls(path, manifest, arrays, process_index, process_count)

    # -- chunk bookkeeping ------------------------------------------------------------------------

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Image range ``[start, stop)`` of chunk ``index``."""
        index = self._check_chunk_index(index)
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.num_images)

    def owner(self, index: int) -> int:
        """The host that writes chunk ``index``: ``index % process_count``."""
        return self._check_chunk_index(index) % self.process_count

    def owned_chunks(self) -> list[int]:
        """Chunks this host writes, sorted."""
        return list(range(self.process_index, self.num_chunks, self.process_count))

    def completed_chunks(self) -> list[int]:
        """Sorted indices of all complete chunks (any host), from the marker files on disk."""
        done = set()
        for entry in os.listdir(os.path.join(self.path, _COMPLETE_DIR)):
            m = _MARKER_RE.match(entry)
            if m and int(m.group(1)) < self.num_chunks:
                done.add(int(m.group(1)))
        self._complete_cache = done
        return sorted(done)

    def pending_chunks(self, all_hosts: bool = False) -> list[int]:
        """Sorted incomplete chunks this host owns (or of every host with ``all_hosts=True``)."""
        done = set(self.completed_chunks())
        candidates = range(self.num_chunks) if all_hosts else self.owned_chunks()
        return [i for i in candidates if i not in done]

    def is_complete(self) -> bool:
        """True when every chunk of every host is complete."""
        return len(self.completed_chunks()) == self.num_chunks

    def is_chunk_complete(self, index: int) -> bool:
        index = self._check_chunk_index(index)
        if index in self._complete_cache:
            return True
        if os.path.exists(self._marker_path(index)):
            self._complete_cache.add(index)
            return True
        return False

    # -- writing ----------------------------------------------------------------------------------

    def write_chunk(self, index: int, data: Mapping[str, Any]) -> None:
        """Writes every field of chunk ``index``, then atomically marks the chunk complete.

        Args:
          index: chunk index in ``[0, num_chunks)``, owned by this host.
          data: ``{name: array}`` with exactly the store's fields; each array has shape
            ``[b, *fields[name].shape]`` with ``b = stop - start`` of :meth:`chunk_bounds` and the
            field's dtype (numpy or jax arrays). Floating arrays must be finite.

        All inputs are validated before anything is written. Writing a chunk that is incomplete
        overwrites whatever partial data a killed run left there.

        Raises:
          ValueError: bad index, a chunk owned by another host, a chunk already complete, missing
            or unknown fields, wrong shapes, or NaN/inf values.
          TypeError: an array whose dtype is not the field's dtype.
          StoreWriteError: the data could not be written (a full disk): the chunk is not marked
            complete.
        """
        index = self._check_chunk_index(index)
        owner = index % self.process_count
        if owner != self.process_index:
            raise ValueError(
                f"index: chunk {index} belongs to process {owner} (chunk i belongs to i % "
                f"process_count={self.process_count}), not to this process {self.process_index}"
            )
        if self.is_chunk_complete(index):
            raise ValueError(
                f"index: chunk {index} of {self.path!r} is already complete; refusing to write it again"
            )
        start, stop = self.chunk_bounds(index)
        arrays = self._validate_chunk(index, start, stop, data)

        try:
            futures = [self._write_field(name, start, stop, arr) for name, arr in arrays.items()]
            for future in futures:
                future.result()
        except Exception as err:  # tensorstore: ValueError("RESOURCE_EXHAUSTED ...") on a full disk
            cause, full = write_failure_cause(err)
            raise StoreWriteError(
                f"chunk {index} (images {start}..{stop - 1}) could not be written to {self.path!r}: {cause}. "
                f"It is not marked complete, so it counts as missing and the complete chunks are intact: "
                f"the same run again computes and writes only the missing chunks"
                + (" once space is freed" if full else "") + ".") from err

        marker = {
            "chunk": index,
            "images": [start, stop],
            "process_index": self.process_index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "written_unix": time.time(),
            "sha256": {name: _sha256(arr) for name, arr in arrays.items()},
        }
        _atomic_write_json(self._marker_path(index), marker)
        self._complete_cache.add(index)
        self.chunks_written += 1

    def _write_field(self, name: str, start: int, stop: int, arr: np.ndarray):
        """Starts writing one field of one chunk; returns a future (split out for crash tests)."""
        return self._arrays[name][start:stop].write(arr)

    def _validate_chunk(self, index: int, start: int, stop: int, data: Mapping[str, Any]) -> dict:
        if not isinstance(data, Mapping):
            raise ValueError(f"data: expected a dict {{field name: array}}, got {type(data).__name__}")
        missing = [n for n in self.fields if n not in data]
        extra = [n for n in data if n not in self.fields]
        if missing or extra:
            raise ValueError(
                f"data: chunk {index} must hold exactly the fields {list(self.fields)}; "
                f"missing {missing}, unknown {extra}"
            )
        out = {}
        for name, spec in self.fields.items():
            arr = np.asarray(data[name])
            expected = (stop - start, *spec.shape)
            if arr.shape != expected:
                raise ValueError(
                    f"data[{name!r}]: chunk {index} (images {start}..{stop - 1}) expects shape "
                    f"{expected}, got {arr.shape}"
                )
            if arr.dtype.newbyteorder("=") != spec.dtype:
                raise TypeError(f"data[{name!r}]: expected dtype {spec.dtype}, got {arr.dtype}")
            arr = np.ascontiguousarray(arr, dtype=spec.dtype)
            if spec.dtype.kind == "f":
                finite = np.isfinite(arr)
                if not finite.all():
                    bad = np.argwhere(~finite)
                    n_nan = int(np.isnan(arr).sum())
                    raise ValueError(
                        f"data[{name!r}]: chunk {index} has {bad.shape[0]} non-finite values "
                        f"({n_nan} NaN, {bad.shape[0] - n_nan} inf), first at image "
                        f"{start + int(bad[0][0])}, element {tuple(int(i) for i in bad[0][1:])}"
                    )
            out[name] = arr
        return out

    # -- reading ----------------------------------------------------------------------------------

    def read(self, name: str, image_index: int, time_index: int | None = None) -> np.ndarray:
        """Random access to one image's field, or one time step of it.

        Args:
          name: field name.
          image_index: image in ``[0, num_images)``.
          time_index: time step in ``[0, N)`` along the field's declared ``time_axis``, or None.

        Returns:
          numpy array of shape ``fields[name].shape`` (e.g. ``[C, N, 2, H, W]`` for scores), or
          that shape without the time axis (e.g. ``[C, 2, H, W]``) when ``time_index`` is given.

        Raises:
          ValueError: unknown field, index out of range, the image's chunk not complete, or a
            time index on a field without a time axis.
        """
        spec = self._check_field(name)
        image_index = self._check_image_index(image_index)
        chunk = image_index // self.chunk_size
        self._require_complete(chunk)
        if time_index is None:
            return self._result(name, [chunk], self._arrays[name][image_index].read())
        t = self._check_time_index(name, spec, time_index)
        idx = (image_index,) + (slice(None),) * spec.time_axis + (t,)
        return self._result(name, [chunk], self._arrays[name][idx].read())

    def read_batch(self, name: str, image_indices: Sequence[int],
                   time_indices: Sequence[int] | None = None) -> np.ndarray:
        """Reads several images (optionally one time step each) in one tensorstore request.

        Args:
          name: field name.
          image_indices: int array ``[K]`` of images.
          time_indices: optional int array ``[K]``; the k-th result is time step
            ``time_indices[k]`` of image ``image_indices[k]`` (for training on random pairs).

        Returns:
          ``[K, *shape]``, or ``[K, *shape without the time axis]`` with ``time_indices``.
        """
        spec = self._check_field(name)
        images = np.asarray(image_indices)
        if images.ndim != 1 or images.dtype.kind not in "iu":
            raise ValueError(f"image_indices: expected a 1-D int array, got shape {images.shape} dtype {images.dtype}")
        if images.size and (images.min() < 0 or images.max() >= self.num_images):
            raise ValueError(f"image_indices: values must lie in [0, {self.num_images}), got {images.min()}..{images.max()}")
        chunks = [int(c) for c in np.unique(images // self.chunk_size)]
        for chunk in chunks:
            self._require_complete(chunk)
        if time_indices is None:
            if images.size == 0:
                return np.zeros((0, *spec.shape), spec.dtype)
            return self._result(name, chunks, self._arrays[name].oindex[images].read())
        times = np.asarray(time_indices)
        if spec.time_axis is None:
            raise ValueError(f"time_indices: field {name!r} was declared without a time_axis")
        n_t = spec.shape[spec.time_axis]
        if times.shape != images.shape or times.dtype.kind not in "iu":
            raise ValueError(f"time_indices: expected an int array of shape {images.shape}, got {times.shape} {times.dtype}")
        if times.size and (times.min() < 0 or times.max() >= n_t):
            raise ValueError(f"time_indices: values must lie in [0, {n_t}), got {times.min()}..{times.max()}")
        out_shape = (images.size, *(d for a, d in enumerate(spec.shape) if a != spec.time_axis))
        if images.size == 0:
            return np.zeros(out_shape, spec.dtype)
        idx = (images,) + (slice(None),) * spec.time_axis + (times,)
        out = self._result(name, chunks, self._arrays[name].vindex[idx].read())
        assert out.shape == out_shape, (out.shape, out_shape)
        return out

    def read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """Images ``[start, stop)`` of a field, checked against their chunks' checksums.

        Reads the whole chunks the range touches in one request, and checks each of them that this
        object has not checked before (field and chunk) against the sha256 in its marker.

        Cost (the verification): the sha256 of the bytes read, which are read once and not copied:
        1.4 GB/s on one core of a 2-core CPU (2026-12-07: 0.044 s for a 63 MB field whose read took
        0.09 s; over 64 MB the chunks are hashed on several threads), plus, when ``start`` or
        ``stop`` falls inside a chunk, the rest of that chunk (at most two chunks more per call;
        none for a range of whole chunks, as training reads with one process).

        Returns:
          ``[stop - start, *fields[name].shape]`` (a view into the chunks read).

        Raises:
          ValueError: unknown field, a range outside ``[0, num_images]``, or a chunk not complete.
          StoreDamagedError: a chunk whose data differ from its marker's checksum, or whose marker
            or data file cannot be read (the message names the chunk, the field and what to do).
        """
        spec = self._check_field(name)
        for what, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{what}: expected an int image index, got {v!r}")
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_images:
            raise ValueError(f"start, stop: expected 0 <= start <= stop <= {self.num_images}, got {start}, {stop}")
        if start == stop:
            return np.zeros((0, *spec.shape), spec.dtype)
        chunks = range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1)
        for chunk in chunks:
            self._require_complete(chunk)
        lo, hi = self.chunk_bounds(chunks[0])[0], self.chunk_bounds(chunks[-1])[1]
        block = np.ascontiguousarray(self._result(name, chunks, self._arrays[name][lo:hi].read()), spec.dtype)
        todo = [c for c in chunks if (name, c) not in self._verified]
        views = [block[self.chunk_bounds(c)[0] - lo:self.chunk_bounds(c)[1] - lo] for c in todo]
        for chunk, digest in zip(todo, _sha256_many(views)):
            if digest != self._read_marker(chunk)["sha256"].get(name):
                a, b = self.chunk_bounds(chunk)
                raise StoreDamagedError(
                    f"store {self.path!r} is damaged: field {name!r} of chunk {chunk} (images {a}..{b - 1}) "
                    f"does not match the checksum in its marker {self._marker_path(chunk)!r}; {_REDO_CHUNK}"
                )
            self._verified.add((name, chunk))
        return block[start - lo:stop - lo]

    def read_all(self, name: str) -> np.ndarray:
        """The whole field ``[num_images, *shape]`` as numpy; only when every chunk is complete.
        Checked against the chunks' checksums as :meth:`read_range` (which see for the cost)."""
        self._check_field(name)
        missing = self.pending_chunks(all_hosts=True)
        if missing:
            raise ValueError(
                f"read_all({name!r}): store {self.path!r} is incomplete; missing chunks {missing[:20]}"
                + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
                + f" of {self.num_chunks}"
            )
        return self.read_range(name, 0, self.num_images)

    def verify_chunk(self, index: int) -> bool:
        """Re-reads a complete chunk and compares each field with the checksum in its marker; False
        also for a marker or data file that cannot be read."""
        index = self._check_chunk_index(index)
        self._require_complete(index, check_files=False)  # a missing file reads as fill: a mismatch
        return self._chunk_problem(index) is None

    def recheck_owned_chunks(self) -> dict[int, str]:
        """Checks this process's complete chunks against their markers' checksums and makes each
        one that fails incomplete again (its marker, then its data files, deleted), so that it is
        computed again: what a resumed pre-computation does before taking its chunks as done.
        Another process's chunks are left alone.

        Cost: one read of every field of those chunks and its sha256, once per resumed run; the
        hashing overlaps the reads (a 252 MB store: 0.30 s, as long as reading it alone, on a
        2-core CPU, 2026-12-07).

        Returns:
          ``{chunk: why it failed}`` of the chunks made incomplete (none for a sound store).
        """
        self.completed_chunks()  # the markers on disk now
        bad = {}
        for index in self.owned_chunks():
            if not self.is_chunk_complete(index):
                continue
            why = self._chunk_problem(index)
            if why is not None:
                self._forget_chunk(index)
                bad[index] = why
        return bad

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (config, inputs hash, fields, chunking)."""
        return json.loads(json.dumps(self._manifest))

    def __repr__(self) -> str:
        return (f"ScoreStore({self.path!r}, images={self.num_images}, chunk_size={self.chunk_size}, "
                f"fields={list(self.fields)}, process={self.process_index}/{self.process_count})")

    # -- helpers ----------------------------------------------------------------------------------

    def _marker_path(self, index: int) -> str:
        return os.path.join(self.path, _COMPLETE_DIR, f"chunk_{index:08d}.json")

    def _check_chunk_index(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"index: expected an int chunk index, got {index!r}")
        if not 0 <= int(index) < self.num_chunks:
            raise ValueError(f"index: chunk index must lie in [0, {self.num_chunks}), got {index}")
        return int(index)

    def _check_image_index(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"image_index: expected an int, got {index!r}")
        if not 0 <= int(index) < self.num_images:
            raise ValueError(f"image_index: must lie in [0, {self.num_images}), got {index}")
        return int(index)

    def _check_time_index(self, name: str, spec: FieldSpec, t: Any) -> int:
        if spec.time_axis is None:
            raise ValueError(f"time_index: field {name!r} was declared without a time_axis")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"time_index: expected an int, got {t!r}")
        n_t = spec.shape[spec.time_axis]
        if not 0 <= int(t) < n_t:
            raise ValueError(f"time_index: must lie in [0, {n_t}) for field {name!r}, got {t}")
        return int(t)

    def _check_field(self, name: str) -> FieldSpec:
        if name not in self.fields:
            raise ValueError(f"name: unknown field {name!r}; the store holds {list(self.fields)}")
        return self.fields[name]

    def _require_complete(self, chunk: int, check_files: bool = True) -> None:
        """A chunk to read: marked complete, and its data files present (checked once per chunk)."""
        if not self.is_chunk_complete(chunk):
            start, stop = self.chunk_bounds(chunk)
            raise ValueError(
                f"chunk {chunk} (images {start}..{stop - 1}) of {self.path!r} is not complete yet "
                f"({len(self.pending_chunks(all_hosts=True))} of {self.num_chunks} chunks are not); finish the store first: "
                "the command that made it (experiments.precompute) resumes from its complete chunks"
            )
        if check_files and chunk not in self._data_checked:
            self._check_chunk_files(chunk)
            self._data_checked.add(chunk)

    def _result(self, name: str, chunks: Sequence[int], future) -> np.ndarray:
        """A read's array, or StoreDamagedError naming the field, the chunk and the file."""
        try:
            return np.asarray(future.result())
        except Exception as err:  # tensorstore: ValueError("FAILED_PRECONDITION / DATA_LOSS: ...")
            m = re.search(re.escape(os.sep + os.path.join(_ARRAYS_DIR, name, "c") + os.sep) + r"(\d+)", str(err))
            chunks = [int(m.group(1))] if m else sorted(set(int(c) for c in chunks))
            if len(chunks) == 1:
                a, b = self.chunk_bounds(chunks[0])
                where = f"chunk {chunks[0]} (images {a}..{b - 1})"
            else:
                where = f"one of the chunks {chunks[:10]}" + (" ..." if len(chunks) > 10 else "")
            raise StoreDamagedError(
                f"store {self.path!r} is damaged: field {name!r} of {where} cannot be read "
                f"({_ts_cause(err)}); {_REDO_CHUNK}"
            ) from err

    def _read_marker(self, chunk: int) -> dict:
        """The parsed marker of a complete chunk (read once), or StoreDamagedError naming it."""
        if chunk not in self._markers:
            marker, why = _load_marker(self._marker_path(chunk))
            if why is not None:
                a, b = self.chunk_bounds(chunk)
                raise StoreDamagedError(
                    f"store {self.path!r} is damaged: chunk {chunk} (images {a}..{b - 1}) is marked complete "
                    f"but {why}; {_REDO_CHUNK}"
                )
            self._markers[chunk] = marker
        return self._markers[chunk]

    def _chunk_problem(self, index: int) -> str | None:
        """Why a complete chunk fails its marker's checksums (None if it does not): re-reads it."""
        marker, why = _load_marker(self._marker_path(index))
        if why is not None:
            return why
        start, stop = self.chunk_bounds(index)
        futures = {name: self._arrays[name][start:stop].read() for name in self.fields}  # read in parallel
        for name, spec in self.fields.items():
            try:
                arr = np.ascontiguousarray(futures[name].result(), dtype=spec.dtype)
            except Exception as err:  # a damaged data file (tensorstore's ValueError)
                if not any(code in str(err) for code in _DAMAGED_CODES):
                    # not the file's content (a lost mount, an I/O error): the run is refused, and
                    # the chunk, which may be sound, is not thrown away (a review)
                    a, b = self.chunk_bounds(index)
                    raise StoreDamagedError(
                        f"store {self.path!r}: field {name!r} of chunk {index} (images {a}..{b - 1}) cannot be "
                        f"read ({_ts_cause(err)}); nothing was deleted: rerun once the store can be read") from err
                return f"the data of field {name!r} cannot be read ({_ts_cause(err)})"
            if _sha256(arr) != marker["sha256"].get(name):  # a missing file reads as the fill value
                return f"the data of field {name!r} do not match the checksum in its marker (altered, or its file lost)"
        self._markers[index] = marker
        self._verified.update((name, index) for name in self.fields)
        return None

    def _chunk_keys(self, chunk: int) -> dict[str, str]:
        """The data file of each field of a chunk (zarr v3 default keys: one file per chunk)."""
        return {name: os.path.join(self.path, _ARRAYS_DIR, name, "c", str(chunk), *["0"] * len(spec.shape))
                for name, spec in self.fields.items()}

    def _forget_chunk(self, index: int) -> None:
        """Makes a complete chunk of this process incomplete: its marker, then its data files, go."""
        for path in [self._marker_path(index), *self._chunk_keys(index).values()]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            if path == self._marker_path(index):
                _fsync_dir(os.path.dirname(path))  # the chunk is incomplete before its data go
        self._complete_cache.discard(index)
        self._data_checked.discard(index)
        self._markers.pop(index, None)
        self._verified.difference_update((name, index) for name in self.fields)

    def _check_chunk_files(self, chunk: int) -> None:
        """Every field of a complete chunk has its data file, unless the marker's checksum is that
        of the fill value (tensorstore stores no file for a chunk equal to the fill value, and a
        missing file reads back as that fill value: a deleted or never-copied file would otherwise
        read as zeros without a word)."""
        marker = self._read_marker(chunk)
        start, stop = self.chunk_bounds(chunk)
        for name, key in self._chunk_keys(chunk).items():
            if os.path.exists(key):
                continue
            spec = self.fields[name]
            fill = np.zeros((stop - start, *spec.shape), spec.dtype)  # the fill value: 0 / False
            if _sha256(fill) != marker["sha256"].get(name):
                raise StoreDamagedError(
                    f"store {self.path!r} is damaged: chunk {chunk} (images {start}..{stop - 1}) is marked "
                    f"complete but the data of field {name!r} is missing ({key!r}); {_REDO_CHUNK}"
                )


# ----------------------------------------------------------------------------------------------
# Module-private helpers
# ----------------------------------------------------------------------------------------------

# fsync every file tensorstore writes, so data is durable before a chunk's marker is published.
_CONTEXT = ts.Context({"file_io_sync": True})


def _sha256(arr: np.ndarray) -> str:
    """Hex sha256 of a contiguous array's bytes (the chunk checksums of the markers)."""
    return hashlib.sha256(memoryview(arr.reshape(-1).view(np.uint8))).hexdigest()


#: tensorstore's status codes for a data file whose content is wrong (truncated, not the codec's,
#: a digest mismatch): a chunk read with one of them is damaged and computed again on resume;
#: any other read error (I/O, a lost mount) refuses the run instead of deleting the chunk.
_DAMAGED_CODES = ("DATA_LOSS", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "OUT_OF_RANGE")


def _sha256_many(arrays: Sequence[np.ndarray]) -> list[str]:
    """:func:`_sha256` of each array; on threads when there are several large ones (hashlib
    releases the GIL while it hashes)."""
    workers = min(len(arrays), os.cpu_count() or 1, 8)
    if workers < 2 or sum(a.nbytes for a in arrays) < (64 << 20):
        return [_sha256(a) for a in arrays]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="krylovjax-sha256") as pool:
        return list(pool.map(_sha256, arrays))


def _load_marker(path: str) -> tuple[dict | None, str | None]:
    """``(marker, None)``, or ``(None, why it cannot be used)`` naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, f"its marker {path!r} cannot be read ({e.strerror or e})"
    if not raw.strip():
        return None, f"its marker {path!r} is empty"
    try:
        marker = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return None, f"its marker {path!r} is not valid JSON ({e})"
    if not isinstance(marker, dict) or not isinstance(marker.get("sha256"), dict):
        return None, f"its marker {path!r} holds no checksums (no 'sha256' object)"
    return marker, None


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _array_spec(path: str, name: str, spec: FieldSpec, num_images: int, chunk_size: int) -> dict:
    """zarr v3 spec of one field: one chunk (or shard) per block of ``chunk_size`` images."""
    shape = [num_images, *spec.shape]
    chunk = [chunk_size, *spec.shape]
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    if spec.dtype.itemsize == 1:
        bytes_codec = {"name": "bytes"}
    if spec.bytes_per_image > _SHARD_MIN_BYTES_PER_IMAGE:
        inner = [1, *spec.shape]
        if spec.time_axis is not None:
            inner[1 + spec.time_axis] = 1
        codecs = [{"name": "sharding_indexed",
                   "configuration": {"chunk_shape": inner, "codecs": [bytes_codec]}}]
    else:
        codecs = [bytes_codec]
    fill = False if spec.dtype.kind == "b" else 0
    return {
        "driver": "zarr3",
        "kvstore": _kvstore(path, name),
        "metadata": {
            "shape": shape,
            "data_type": spec.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs,
            "fill_value": fill,
        },
    }


def _kvstore(path: str, name: str) -> dict:
    """Tensorstore's ``file`` kvstore of field ``name``, by absolute path: tensorstore refuses a
    path with ``.`` or ``..`` components ("Invalid file path"), which a store given as
    ``./run/store`` or ``../run/store`` was, then reported as damaged (a walkthrough, 2026-12-07)."""
    return {"driver": "file", "path": os.path.join(os.path.abspath(path), _ARRAYS_DIR, name) + "/"}


def _open_arrays(path: str, manifest: dict, specs: dict[str, FieldSpec]) -> dict:
    arrays = {}
    for name, spec in specs.items():
        try:
            arrays[name] = ts.open(
                {"driver": "zarr3",
                 "kvstore": _kvstore(path, name)},
                open=True, context=_CONTEXT,
                dtype=ts.dtype(spec.dtype.name),
                shape=[int(manifest["num_images"]), *spec.shape],
            ).result()
        except Exception as e:  # tensorstore raises ValueError / OSError subclasses
            zarr_json = os.path.join(path, _ARRAYS_DIR, name, "zarr.json")
            raise StoreDamagedError(
                f"path: store {path!r} is damaged: array {name!r} cannot be opened as described by "
                f"its manifest: {zarr_json!r} ({_ts_cause(e)}); {_REDO_STORE}"
            ) from e
    return arrays


def _rechunkable(path: str, stored: dict, wanted: dict) -> bool:
    """Whether ``stored`` differs from ``wanted`` in its chunk size alone and has no complete chunk."""
    if stored.get("chunk_size") == wanted["chunk_size"]:
        return False
    try:
        _check_compatible(path, stored, {**wanted, "chunk_size": stored.get("chunk_size"),
                                         "num_chunks": stored.get("num_chunks")})
    except StoreConflictError:
        return False
    complete = os.path.join(path, _COMPLETE_DIR)
    return not (os.path.isdir(complete) and any(_MARKER_RE.match(e) for e in os.listdir(complete)))


def _check_compatible(path: str, stored: dict, wanted: dict) -> None:
    """Raises StoreConflictError naming every manifest key where ``stored`` and ``wanted`` differ."""
    if stored.get("format") != STORE_FORMAT:
        raise StoreConflictError(
            f"path: {path!r} has a {MANIFEST_NAME} that is not a {STORE_FORMAT} manifest; "
            "refusing to write into it, use a new workdir"
        )
    if stored.get("version") != STORE_VERSION:
        raise StoreConflictError(
            f"path: store {path!r} has format version {stored.get('version')}, this code writes "
            f"version {STORE_VERSION}; refusing to write into it, use a new workdir"
        )
    problems = []
    config_keys = _diff_keys(stored.get("config"), wanted["config"])
    if config_keys:
        details = ", ".join(
            f"config.{k} (stored {_short(_lookup(stored.get('config'), k))}, "
            f"given {_short(_lookup(wanted['config'], k))})" for k in config_keys[:20]
        )
        problems.append(f"config keys differ: {details}")
    for key in ("inputs_hash", "num_images", "chunk_size"):
        if key == "inputs_hash" and config_keys:  # the hash covers the config: no news about the images
            continue
        if stored.get(key) != wanted[key]:
            what = "the images differ: " if key == "inputs_hash" else ""
            why = ("; images per chunk, experiments.precompute's --config.chunk_images (at most the number of "
                   "images): fixed once a chunk is complete" if key == "chunk_size" else "")
            problems.append(f"{what}{key} differs (stored {_short(stored.get(key))}, given {_short(wanted[key])}{why})")
    field_keys = _diff_keys(stored.get("fields"), wanted["fields"])
    if field_keys:
        problems.append("fields differ: " + ", ".join(f"fields.{k}" for k in field_keys))
    if problems:
        raise StoreConflictError(
            f"path: {path!r} holds a store from a different run: " + "; ".join(problems)
            + ". Refusing to write into it; use a new workdir, or move this one aside (experiments.precompute "
            "--fresh does)."
        )
