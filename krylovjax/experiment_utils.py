"""Helpers for the experiment binaries: run directories, timing, tables, JSON and figures.

Nothing here is numerics of the method; these are the small pieces every experiment binary
(``experiments/denoise.py``, ``budget.py``, ``generate.py``) shares:

* :func:`claim_workdir`: a run directory remembers the config it was made for
  (``<workdir>/experiment.json``); another config is refused with the differing keys named,
  before anything in the directory is touched; :func:`run_claimed` runs in it holding it
  (one run at a time), :func:`move_aside` starts a directory afresh;
* :func:`noisy_copy`: Paper A's test input ``clamp(x + std z, 0, 1)`` with a fixed seed;
* :func:`first_reaching`, :func:`read_metrics`: time-to-target from the ``metrics.jsonl`` of a
  :func:`krylovjax.training.train` run;
* :class:`Stopwatch`, :func:`markdown_table`, :func:`write_json`, :func:`image_grid`,
  :func:`plot_curves` (matplotlib with the Agg backend, PNG).
* flag checks for the binaries' ``main`` (``absl.app.UsageError`` naming the flag, before any
  work): :func:`check_no_args`, :func:`check_flag`, :func:`int_list_flag`,
  :func:`word_or_int_flag`, :func:`choice_list_flag`, :func:`check_dir_arg` (a directory flag that is a file),
  :func:`refuse_other_runs` (a directory holding another binary's run),
  :func:`checking_arguments` and :func:`exit_on_run_errors` (a bad config value, a directory
  another run holds, :mod:`krylovjax.workdir_lock`, or a checkpoint that cannot be restored or
  written: an error message and status 1, no traceback), and
  :func:`sigterm_as_interrupt` (SIGTERM checkpoints a training run like Ctrl-C; an interrupt
  Python could not raise is acted on at the next :func:`raise_if_signalled`).

Images are ``[B, C, H, W]`` (or ``[C, H, W]``) float arrays in [0, 1], as everywhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "Stopwatch",
    "WorkdirConflictError",
    "claim_workdir",
    "check_claim",
    "run_claimed",
    "move_aside",
    "source_root",
    "sources_kept",
    "distributed_args",
    "init_distributed",
    "check_same_config",
    "process_values",
    "multiprocess_environment",
    "config_diff",
    "check_target",
    "check_positive_seconds",
    "noisy_copy",
    "standard_noise",
    "read_metrics",
    "first_reaching",
    "markdown_table",
    "format_seconds",
    "write_json",
    "write_images",
    "warn_fewer_images",
    "write_text",
    "benchmark_machine",
    "cpu_model",
    "machine_info",
    "image_grid",
    "plot_curves",
    "quiet_orbax_logs",
    "raise_if_signalled",
    "sigterm_as_interrupt",
    "interrupts_between_steps",
    "check_dir_arg",
    "refuse_other_runs",
    "check_training_run",
    "check_seed",
    "load_for_model",
    "finished_step",
    "short_paths",
    "check_no_args",
    "parse_flags",
    "int_list_flag",
    "word_or_int_flag",
    "choice_list_flag",
    "check_flag",
    "check_config_kind",
    "checking_arguments",
    "exit_on_run_errors",
]

_CLAIM_FILE = "experiment.json"


class WorkdirConflictError(ValueError):
    """The work directory holds another run (another config or another experiment)."""


class Stopwatch:
    """Wall-clock timer (``time.perf_counter``) as a context manager: ``with Stopwatch() as sw:``
    ... ``sw.seconds``. While running, ``seconds`` is the time so far."""

    def __init__(self):
        self._start: float | None = None
        self._stop: float | None = None

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        self._stop = None
        return self

    def __exit__(self, *exc) -> None:
        self._stop = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self._start is None:
            return 0.0
        end = self._stop if self._stop is not None else time.perf_counter()
        return end - self._start


# ----------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-plain copy: ConfigDicts and mappings to dicts, tuples to lists, numpy scalars out."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def config_diff(stored: Any, given: Any, prefix: str = "", *,
                legacy: Mapping[str, Any] | None = None) -> list[str]:
    """Dotted keys at which two (nested) configs differ, e.g. ``["ours.train.lr"]``.

    ``legacy`` maps dotted keys added to a config after runs were made without them to the value
    that reproduces those runs: a key of ``legacy`` missing from ``stored`` is no difference when
    ``given`` holds that value there (any other value is one)."""
    stored, given = _plain(stored), _plain(given)
    legacy = legacy or {}
    if isinstance(stored, dict) and isinstance(given, dict):
        out: list[str] = []
        for k in sorted(set(stored) | set(given)):
            key = f"{prefix}.{k}" if prefix else k
            if k not in stored and key in legacy and not config_diff(legacy[key], given[k]):
                continue
            if k not in stored or k not in given:
                out.append(key)
            else:
                out.extend(config_diff(stored[k], given[k], key, legacy=legacy))
        return out
    if isinstance(stored, float) or isinstance(given, float):
        try:
            if float(stored) == float(given):
                return []
        except (TypeError, ValueError):
            pass
    return [] if stored == given else [prefix or "<root>"]


def claim_workdir(workdir: str | os.PathLike, experiment: str, config: Any, *,
                  legacy: Mapping[str, Any] | None = None, arg: str = "workdir",
                  may_change: Iterable[str] = (), fresh_flag: bool = False,
                  env_var: str | None = None) -> bool:
    """Make ``workdir`` the run directory of ``experiment`` with ``config``, or refuse.

    The first call writes ``<workdir>/experiment.json`` (``{"experiment": ..., "config": ...}``).
    A later call with the same experiment and config succeeds (a re-run or resume); one with
    another experiment or config raises :class:`WorkdirConflictError` (a ``ValueError``) naming
    the differing keys, and leaves the directory untouched. A non-empty directory without the
    claim file is refused too (it holds something else).

    Args:
      workdir: the run directory (created if missing).
      experiment: the binary's name, e.g. ``"denoise"``.
      config: its config (``ml_collections.ConfigDict`` or a JSON-able mapping).
      legacy: the binary's config keys added after runs were made without them, each with the
        value that reproduces such runs (:func:`config_diff`): a directory claimed before a key
        existed is this run when ``config`` holds that value there. The claim file is left as it
        was.
      arg: the flag the directory came from, for the messages (``"outdir"`` for ``generate``).
      may_change: dotted keys that may differ from the claim's on a later call (e.g. a training
        budget raised to train longer); the claim file keeps the first call's values.
      fresh_flag: the binary takes ``--fresh`` (:func:`move_aside`): a refusal names it too.
      env_var: the environment variable ``workdir`` came from, when not a flag ``--<arg>`` (the
        Colab notebook's ``KRYLOVJAX_NB_WORKDIR``): a refusal names it and says to set it.

    Returns:
      True if the directory was claimed now (fresh), False if it already held this run.
    """
    if check_claim(workdir, experiment, config, legacy=legacy, arg=arg, may_change=may_change,
                   fresh_flag=fresh_flag, env_var=env_var):
        return False
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, _CLAIM_FILE), {"experiment": experiment, "config": _plain(config)})
    return True


def _not_a_directory(path: str) -> str | None:
    """Why ``path`` cannot be a run directory (it is a file, or lies under one), else None."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    if os.path.isdir(probe):
        return None
    return "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe!r}"


def check_claim(workdir: str | os.PathLike, experiment: str, config: Any, *,
                legacy: Mapping[str, Any] | None = None, arg: str = "workdir",
                may_change: Iterable[str] = (), fresh_flag: bool = False, env_var: str | None = None) -> bool:
    """:func:`claim_workdir`'s checks without writing anything: True if ``workdir`` already holds
    this run, False if it is free (missing or empty); :class:`WorkdirConflictError` otherwise."""
    may_change = frozenset(may_change)

    def choose(which: str) -> str:  # the advice, in the words of wherever the directory came from
        return f"set {env_var} to {which} directory" if env_var else f"use {which} --{arg}"

    if env_var:
        arg = env_var
    # the other way out, for a binary that has it (a walkthrough, 2026-12-07, found it unsaid)
    fresh = f", or --fresh to move it to {os.path.abspath(workdir) + '.prev'!r} first" if fresh_flag else ""
    workdir = os.fspath(workdir)
    record = {"experiment": experiment, "config": _plain(config)}
    path = os.path.join(workdir, _CLAIM_FILE)
    problem = _not_a_directory(workdir)
    if problem:
        raise WorkdirConflictError(f"{arg}: {workdir!r} {problem}, expected a directory (new or a run's)")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise WorkdirConflictError(
                f"{arg}: {path!r} is unreadable ({err}); refusing to write into {workdir!r}") from err
        if not isinstance(stored, dict):
            raise WorkdirConflictError(
                f"{arg}: {path!r} does not hold a run's claim (a JSON object), got {type(stored).__name__}; "
                f"refusing to write into {workdir!r}")
        if stored.get("experiment") != experiment:
            raise WorkdirConflictError(
                f"{arg}: {workdir!r} holds a {stored.get('experiment')!r} run, not {experiment!r}; "
                f"{choose('another')}{fresh}")
        diff = [k for k in config_diff(stored.get("config"), record["config"], legacy=legacy) if k not in may_change]
        if diff:
            shown = ", ".join(diff[:12]) + (" ..." if len(diff) > 12 else "")
            from krylovjax.store import _lookup, _short  # the store's conflict message shows them alike

            values = "; ".join(f"{k}: stored {_short(_lookup(_plain(stored.get('config')), k))}, given "
                               f"{_short(_lookup(_plain(record['config']), k))}" for k in diff[:4] if k != "<root>")
            raise WorkdirConflictError(
                f"{arg}: {workdir!r} holds another run's config (differs at: {shown})"
                + (f" ({values})" if values else "") + f"; {choose('another')}{fresh} (nothing there was changed)")
        return True
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise WorkdirConflictError(
            f"{arg}: {workdir!r} is not empty and is not a {experiment!r} run directory "
            f"(no {_CLAIM_FILE}); {choose('an empty or new')}")
    return False


def run_claimed(workdir: str | os.PathLike, experiment: str, config: Any, body: Callable[[], Any], *,
                legacy: Mapping[str, Any] | None = None, arg: str = "workdir", fresh: bool = False,
                may_change: Iterable[str] = (), keep: Mapping[str, str] | None = None) -> Any:
    """:func:`claim_workdir`, then ``body()``, holding ``workdir`` throughout
    (:func:`krylovjax.workdir_lock.hold`: a second run there is refused with
    :class:`~krylovjax.workdir_lock.WorkdirBusyError`). When ``body`` fails (bad input found late,
    an interrupt) while a fresh claim is all the directory holds, the claim is withdrawn: the
    corrected command may then use the directory. Once anything else is written there, the claim
    stays and protects it.

    ``fresh=True`` first moves an existing ``workdir`` aside to ``<workdir>.prev`` (deleting an
    older ``<workdir>.prev``), holding both names, so the run starts afresh (``make demo``);
    ``keep`` (:func:`move_aside`) names what the run reads, which that must not move or delete."""
    from krylovjax import workdir_lock

    with workdir_lock.hold(workdir, arg=arg):
        if fresh:
            move_aside(workdir, kind=experiment, arg=arg, keep=keep)
        claimed_now = claim_workdir(workdir, experiment, config, legacy=legacy, arg=arg, fresh_flag=True,
                                    may_change=may_change)
        try:
            return body()
        except BaseException:
            workdir = os.fspath(workdir)
            if claimed_now and os.listdir(workdir) == [_CLAIM_FILE]:
                os.remove(os.path.join(workdir, _CLAIM_FILE))
            raise


def _within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies inside it (symbolic links resolved)."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def source_root(source: Any) -> str | None:
    """The file or directory a :func:`krylovjax.data.load_images` source reads: the path of a
    ``files:`` or ``array:`` source (``~`` expanded, an array's options dropped), or None for the
    others (built-in photos, tfds). For :func:`move_aside`'s ``keep``. A glob pattern (a path
    that does not exist and has wildcards, as :func:`krylovjax.data.image_paths` reads it) gives
    the directory before its first wildcard followed by ``/**``: the files it reads may lie
    anywhere below, so nothing below may be moved either."""
    import glob

    if not isinstance(source, str) or not source.startswith(("files:", "array:")):
        return None
    path = source.split(":", 1)[1]
    if source.startswith("array:"):
        from krylovjax.data import _source_options

        with contextlib.suppress(ValueError):
            path = _source_options(source, path)[0]
    path = os.path.expanduser(path)
    if not path:
        return None
    if os.path.exists(path) or not glob.has_magic(path):  # "shots [2024]" that exists is itself
        return os.path.abspath(path)
    parts = path.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.path.abspath(os.sep.join(parts[:fixed]) or (os.sep if path.startswith(os.sep) else "."))
    return os.path.join(root, "**")


def sources_kept(*sources: tuple[Any, str]) -> dict[str, str]:
    """:func:`move_aside`'s ``keep`` for the ``(source, what it is)`` pairs a run reads: the
    :func:`source_root` of each ``files:`` / ``array:`` source, the others (None, built-in
    photos, tfds) left out."""
    return {root: what for root, what in ((source_root(src), what) for src, what in sources) if root}


def run_kind(path: str | os.PathLike) -> str | None:
    """What run the directory ``path`` holds, from the files each binary leaves at its top:
    the experiment named in its claim (``experiment.json``: ``"denoise"``, ``"budget"``,
    ``"generate"``, ``"restore"``), ``"train"`` (``checkpoints/``, or ``config.json`` with
    ``metrics.jsonl``), ``"precompute"`` (``precompute_summary.json``, or a score store in
    ``store/``), ``"store"`` (a score store itself); None for none of these (an empty directory,
    a user's files), and ``"unreadable"`` for a claim that cannot be read."""
    from krylovjax.store import MANIFEST_NAME

    path = os.fspath(path)
    claim = os.path.join(path, _CLAIM_FILE)
    if os.path.isfile(claim):
        try:
            with open(claim) as f:
                kind = json.load(f).get("experiment")
            return kind if isinstance(kind, str) else "unreadable"
        except (OSError, ValueError, AttributeError):
            return "unreadable"
    if os.path.isdir(os.path.join(path, "checkpoints")) or all(
            os.path.isfile(os.path.join(path, n)) for n in ("config.json", "metrics.jsonl")):
        return "train"
    if os.path.isfile(os.path.join(path, "precompute_summary.json")) or os.path.isfile(
            os.path.join(path, "store", MANIFEST_NAME)):
        return "precompute"
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return "store"
    return None


def fresh_path(path: str | os.PathLike) -> str:
    """The directory a binary's ``--fresh`` works on: ``path`` absolute (``--workdir=.`` would
    move the process's own directory and name the moved one afterwards) and with its symlinks
    resolved, so that a ``runs/x`` linked to another disk moves the directory there to its
    ``.prev`` and the new run goes there too (the link was renamed to ``runs/x.prev`` and the run
    written to the local disk; a walkthrough, 2026-12-07)."""
    return os.path.realpath(os.fspath(path))  # (realpath makes it absolute too)


def move_aside(workdir: str | os.PathLike, *, kind: str, arg: str = "workdir",
               keep: Mapping[str, str] | None = None) -> str | None:
    """Move the directory ``workdir`` to ``<workdir>.prev``, deleting an older one there; returns
    the new path, or None when ``workdir`` did not exist. Refuses (nothing moved) a ``workdir``
    or ``.prev`` that is not a directory, a ``.prev`` that another run holds, a ``.prev`` that is
    neither empty nor an earlier run of this binary (``kind``, :func:`run_kind`: ``"precompute"``
    or the experiment's name), and a ``workdir`` or ``.prev`` that is or holds a path of ``keep``
    (what the run reads, mapped to what it is: a training run sampled from, the images read).
    ``generate --workdir=W --outdir=W --fresh`` moved the training run it sampled from aside, and
    a second such command with ``--workdir=W.prev`` deleted it (a walkthrough, 2026-12-07); a
    second ``precompute --workdir=B --fresh`` deleted the user's files the first had moved to
    ``B.prev``, and one over a training run copied to ``A.prev`` deleted that run (a walkthrough,
    the thirty-seventh session). The caller should hold ``workdir`` (:func:`run_claimed` does)."""
    import shutil

    from krylovjax import workdir_lock

    given = os.fspath(workdir)
    workdir = os.path.abspath(given)
    if not os.path.isabs(given) and os.path.exists(workdir) and _within(os.getcwd(), workdir):
        # the caller's relative path would name the moved directory afterwards (a review: with
        # --outdir=. the run went on in <outdir>.prev, over the run --fresh had moved there)
        raise WorkdirConflictError(
            f"{arg}: {given!r} holds the current directory, which --fresh would move with it; give --{arg} "
            "as an absolute path, or run from outside it (nothing was moved)")
    prev = workdir + ".prev"
    for path in (workdir, prev):
        if os.path.lexists(path) and not os.path.isdir(path):
            raise WorkdirConflictError(f"{arg}: {path!r} is not a directory; refusing to move or delete it")
    if not os.path.exists(workdir):  # nothing is moved or deleted
        return None
    names = sorted(os.listdir(prev)) if os.path.isdir(prev) else []
    found = run_kind(prev) if names else kind  # an empty or missing .prev: nothing of another's deleted
    if found != kind:
        held = {None: "files of no run (" + ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
                + ")", "unreadable": "a run whose experiment.json cannot be read",
                "store": "a score store"}.get(found, f"a {found} run")
        raise WorkdirConflictError(
            f"{arg}: {prev!r} holds {held}, not an earlier {kind} run that --fresh may replace; --fresh would "
            f"delete it: move or delete it yourself, or use another --{arg} (nothing was moved)")
    for path in (workdir, prev):
        for kept, what in (keep or {}).items():
            kept = os.fspath(kept)
            tree = kept.endswith(os.sep + "**")  # a glob's folder: whatever lies below it is read too
            root = kept[:-3] if tree else kept
            if os.path.lexists(path) and (_within(root, path) or (tree and _within(path, root))):
                deed = "move it aside" if path == workdir else "delete it (the older one moved aside)"
                raise WorkdirConflictError(
                    f"{arg}: {path!r} {'lies in' if tree and not _within(root, path) else 'holds'} {what} "
                    f"({kept!r}); --fresh would {deed}: use another --{arg} (nothing was moved)")
    with workdir_lock.hold(prev, arg=arg):
        if os.path.exists(prev):
            shutil.rmtree(prev)
        os.replace(workdir, prev)
    return prev


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


_PATH_FLAGS = ("workdir", "outdir", "store", "json_out")  # "~" expanded by parse_flags


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``) with a config override
    that names no key of the config (``--config.num_stepz=3``, or ``--config.train.num_steps=3``
    where the config has no ``train``) reported like any bad flag: one line naming the flag and
    ml_collections' suggestion, exit status 1, instead of an ``AttributeError`` or ``KeyError``
    traceback from inside ml_collections."""
    import sys
    import warnings

    from absl import app, flags

    if "config" in flags.FLAGS and "show_config" not in flags.FLAGS:
        flags.DEFINE_bool("show_config", False, "Print the config (--config with the --config.<key> overrides "
                          "given), every key that --config.<key>=<value> can set, and exit; nothing is run.",
                          module_name=sys.argv[0])
    try:
        with warnings.catch_warnings():
            # ml_collections loads --config's file with importlib's deprecated load_module(): with
            # PYTHONWARNINGS=error that warning ended every binary with --config in a traceback (a
            # walkthrough, 2026-12-07); it is ml_collections' to change, not the user's
            warnings.filterwarnings("ignore", message=r"the load_module\(\) method is deprecated",
                                    category=DeprecationWarning)
            rest = _parse_for_show(argv) if "show_config" in flags.FLAGS and _asks_show(argv) else \
                app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        # a key missing at the end of the path (--config.num_stepz) comes as an AttributeError
        # holding the KeyError, one missing in the middle (--config.train.num_steps where there
        # is no 'train') as the KeyError itself
        inner = err if isinstance(err, KeyError) else (err.args[0] if err.args else None)
        if not (isinstance(inner, KeyError) and inner.args and isinstance(inner.args[0], str)):
            raise
        first, _, hint = inner.args[0].partition("\n")
        key = first.strip("'\"")
        named = [a.split("=", 1)[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
        flag = named[0] if named else "--config.*"
        if not hint and named:
            hint = _config_key_hint(argv, flag[len("--config."):], key)
        sys.stderr.write(f"FATAL Flags parsing error: {flag}: the config has no key {key!r}"
                         f"{'. ' + hint if hint else ''}\nPass --helpshort or --helpfull to see help on flags, "
                         f"--show_config to see every key of the config.\n")
        sys.exit(1)
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        _split_word_lists(flags.FLAGS["config"].value, argv)
    # a shell leaves "~" of --workdir=~/run alone (no word start): it was refused as no training run,
    # and --outdir=~/out made a directory named "~" (a walkthrough, 2026-12-07)
    for name in _PATH_FLAGS:
        value = flags.FLAGS[name].value if name in flags.FLAGS else None
        if isinstance(value, str) and value.startswith("~"):
            flags.FLAGS[name].value = os.path.expanduser(value)
    show = flags.FLAGS["show_config"].value if "show_config" in flags.FLAGS else False
    if show:
        config = flags.FLAGS["config"].value
        if config is None:
            sys.stderr.write("FATAL Flags parsing error: --show_config: give --config=<file> to show\n")
            sys.exit(1)
        sys.stdout.write(f"# {flags.FLAGS['config'].config_filename}, with the overrides given; set a key with "
                         "--config.<key>=<value>\n" + "".join(
                             f"{p} = {v!r}\n" for p, v in _config_items(config)))
        sys.exit(0)
    return rest


def _split_word_lists(config, argv: Sequence[str]) -> None:
    """``--config.methods=ours,ddpm`` as the tuple ``('ours', 'ddpm')``. ml_collections reads a
    tuple override as a Python literal (``1,2`` is ``(1, 2)``); words are no literal, so it kept
    the whole string as one entry, ``('ours,ddpm',)``, which the run then refused as an unknown
    method (a walkthrough, 2026-12-07). Only an override whose value became that one-entry tuple
    of the very string given is split, at its commas (brackets and quotes around it dropped); the
    value may follow its flag as the next argument too (``--config.methods ours,ddpm``)."""
    args = list(argv[1:])
    for i, a in enumerate(args):
        flag, eq, raw = a.partition("=")
        if not eq and i + 1 < len(args):
            raw = args[i + 1]
        if not (flag.startswith("--config.") and "," in raw):
            continue
        *path, leaf = flag[len("--config."):].split(".")
        node = config
        try:
            for part in path:
                node = node[part]
            value = node[leaf]
        except (KeyError, TypeError, AttributeError):
            continue
        if isinstance(value, (tuple, list)) and len(value) == 1 and value[0] == raw:
            words = tuple(w.strip().strip("'\"") for w in raw.strip().strip("()[]").split(","))
            node[leaf] = type(value)(w for w in words if w)


def _asks_show(argv: Sequence[str]) -> bool:
    """Whether ``argv``'s last ``--show_config`` (``=<bool>`` as absl reads it) is on."""
    from absl import flags

    on = False
    for a in argv[1:]:
        name, eq, value = a.lstrip("-").partition("=")
        if a.startswith("-") and name == "show_config":
            try:
                on = flags.BooleanParser().parse(value) if eq else True
            except ValueError:
                on = False  # absl refuses the value itself
        elif a.startswith("-") and name == "noshow_config":
            on = False
    return on


def _parse_for_show(argv: Sequence[str]) -> list[str]:
    """The flags parsed for ``--show_config``, which needs no ``--workdir``: a required flag left
    out is let pass; any other bad flag is reported as usual."""
    import sys

    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as err:
        if isinstance(err, flags.IllegalFlagValueError) and "must have a value other than None" in str(err):
            return list(argv[:1])
        sys.stderr.write(f"FATAL Flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def _config_items(config, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of a config's leaves (``("ours.train.lr", 0.001)``), in order;
    an empty nested config is a leaf."""
    out = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        if hasattr(v, "items") and len(v):
            out.extend(_config_items(v, path + "."))
        else:
            out.append((path, v.to_dict() if hasattr(v, "to_dict") else v))
    return out


def _config_leaves(config) -> list[str]:
    """Every dotted path of a config's keys, the nested configs' own included."""
    paths = set()
    for path, _ in _config_items(config):
        parts = path.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(paths)


def _load_config_arg(argv: Sequence[str]):
    """The config of ``--config=<file>[:<arg>]`` in ``argv``, loaded as ml_collections does, or
    None where that fails (the hint is then left out)."""
    import importlib.util

    args = list(argv[1:])
    value = None
    for i, a in enumerate(args):
        if a.startswith("--config="):
            value = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(args):
            value = args[i + 1]
    if not value:
        return None
    path, _, arg = value.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_krylovjax_config_hint", os.path.expanduser(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - only a hint; the error itself is reported anyway
        return None


def _config_key_hint(argv: Sequence[str], path: str, key: str) -> str:
    """``Did you mean --config.ours.train.learning_rate?`` for a key misspelt or put at the wrong
    level (``--config.common.lerning_rate``), from every key of the config; else the keys that
    the level named holds."""
    import difflib

    config = _load_config_arg(argv)
    if config is None:
        return ""
    leaves = _config_leaves(config)
    last = {p: p.rsplit(".", 1)[-1] for p in leaves}
    close = difflib.get_close_matches(key, sorted(set(last.values())), n=3, cutoff=0.75)
    found = [p for p in leaves if last[p] in close]
    if found:
        found.sort(key=lambda p: (last[p] != key, -difflib.SequenceMatcher(None, path, p).ratio()))
        return "Did you mean " + " or ".join(f"--config.{p}" for p in found[:4]) + "?"
    parts = path.split(".")
    level = parts[:parts.index(key)] if key in parts else parts[:-1]
    node = config
    for part in level:
        node = node.get(part) if hasattr(node, "get") else None
    if hasattr(node, "keys"):
        where = "config." + ".".join(level) if level else "the config"
        return f"Keys of {where}: {', '.join(sorted(node.keys()))}"
    return ""


def one_line_usage_errors(main: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
    """``app.run(one_line_usage_errors(main), ...)``: a flag refused by ``main``'s checks
    (``absl.app.UsageError``: the helpers below, a positional argument, flags that contradict
    each other) ends the binary with ``error: <message>`` and exit status 1, the form of every
    other refusal (:func:`exit_on_run_errors`), instead of absl's module doc and flag help (some
    40 lines) above the message. ``--helpshort`` / ``--helpfull`` still print the help."""
    import functools

    from absl import app

    @functools.wraps(main)
    def run(argv):
        plain_warnings()
        try:
            return main(argv)
        except app.UsageError as err:
            raise SystemExit(f"error: {err}") from None
        except (RuntimeError, AssertionError) as err:
            said = backend_error(err)
            if said is None:
                raise
            raise SystemExit(f"error: {said}") from None

    return run


def backend_error(err: BaseException) -> str | None:
    """The one line for JAX failing to start the platform asked for (``JAX_PLATFORMS=tpu`` without
    a TPU, ``=cuda`` without the CUDA plugin), or None for any other error. JAX raises a
    RuntimeError (its message ends a 50-line traceback) or, for a platform it has no plugin for at
    all, a bare AssertionError naming nothing (a walkthrough, 2026-12-07)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if isinstance(err, RuntimeError) and str(err).startswith("Unable to initialize backend"):
        return f"{str(err).splitlines()[0]} (JAX_PLATFORMS={platforms!r})"
    tb = _innermost(err.__traceback__)
    if (isinstance(err, AssertionError) and tb is not None and tb.tb_frame.f_code.co_name == "backends"
            and os.path.basename(tb.tb_frame.f_code.co_filename) == "xla_bridge.py"):
        return (f"JAX could not start any platform of JAX_PLATFORMS={platforms!r}: this JAX installation has no "
                "backend of that name (for a GPU: pip install 'jax[cuda12]'); unset JAX_PLATFORMS to use "
                "what is there")
    return None


def plain_warnings() -> None:
    """Python warnings as one line, ``warning: <message>`` (``<Category>: <message>`` for other
    categories than ``UserWarning``), without the file, line and source line that Python prints
    (a walkthrough: a folder's skipped files were reported with ``images = load_files(path,
    **kwargs)`` echoed under them). The binaries' wrapper :func:`one_line_usage_errors` sets it."""
    import warnings

    def one_line(message, category, filename, lineno, line=None):
        kind = "warning" if category is UserWarning else category.__name__
        return f"{kind}: {message}\n"

    warnings.formatwarning = one_line


def check_no_args(argv: Sequence[str]) -> None:
    """Refuse positional arguments left over after the flags (``--sizes=32 64`` leaves ``64``
    behind, which would otherwise be dropped without a word). Raises ``absl.app.UsageError``."""
    if len(argv) > 1:
        from absl import app

        raise app.UsageError(f"unexpected arguments: {list(argv[1:])} (flags take --name=value; "
                             "list flags take comma-separated values, e.g. --sizes=32,64)")


#: binary -> (the top-level keys its configs have, keys they must not have, its configs' files).
_CONFIG_KINDS = {
    "precompute": ({"dataset", "precompute", "image_size", "num_images"}, set(),
                   "experiments/configs/demo.py, cifar10.py, celeba64.py, celeba128.py or colab_*.py"),
    "train": ({"method", "lr", "num_steps", "batch_size"}, set(), "experiments/configs/train_*.py"),
    "denoise": ({"common", "data", "ours", "ddpm", "targets", "noise"}, {"budget_seconds", "task"},
                "experiments/configs/denoise_*.py"),
    "budget": ({"common", "data", "ours", "ddpm", "budget_seconds", "task"}, set(),
               "experiments/configs/budget_*.py"),
}


def check_config_kind(config: Any, binary: str) -> None:
    """Refuse a config made for another binary (``experiments.precompute`` given
    ``train_tiny.py`` ended in ``AttributeError: 'dtype'``; ``denoise`` given ``demo.py`` in
    ``AttributeError: 'targets'``): ``absl.app.UsageError`` naming the binary the config looks
    made for and the files meant for this one."""
    from absl import app

    need, refuse, files = _CONFIG_KINDS[binary]
    keys = set(config.keys()) if hasattr(config, "keys") else set()
    missing, extra = sorted(need - keys), sorted(refuse & keys)
    if not missing and not extra:
        return
    owners = [b for b, (n, r, _) in _CONFIG_KINDS.items() if b != binary and n <= keys and not (r & keys)]
    whose = f"; it looks like a config of experiments.{owners[0]}" if owners else ""
    why = f"it has no {', '.join(missing)}" if missing else f"it has {', '.join(extra)}"
    raise app.UsageError(f"--config: not a config of experiments.{binary} ({why}){whose}; this binary takes "
                         f"{files}")


def check_flag(ok: bool, name: str, expected: str, value: Any) -> None:
    """``absl.app.UsageError`` ``--<name>: expected <expected>, got <value>`` unless ``ok``."""
    if not ok:
        from absl import app

        raise app.UsageError(f"--{name}: expected {expected}, got {value!r}")


def int_list_flag(name: str, values: Sequence[str], minimum: int) -> list[int]:
    """A comma-separated list flag of integers ``>= minimum`` (at least one), parsed, or
    ``absl.app.UsageError`` naming ``--<name>``."""
    out = []
    for v in values:
        try:
            i = int(v)
        except (TypeError, ValueError):
            i = None
        check_flag(i is not None and i >= minimum, name,
                   f"comma-separated integers >= {minimum}", ",".join(map(str, values)))
        out.append(i)
    check_flag(bool(out), name, f"at least one integer >= {minimum}", "")
    return out


def word_or_int_flag(name: str, value: str, words: Sequence[str], minimum: int = 1) -> str | int | None:
    """A string flag that is one of ``words`` or an integer ``>= minimum``, parsed: ``"none"`` as
    None, another word as itself, digits as an int; else ``absl.app.UsageError`` naming
    ``--<name>``."""
    ok = value in words or (value.isdigit() and int(value) >= minimum)
    check_flag(ok, name, " or ".join(repr(w) for w in words) + f" or an integer >= {minimum}", value)
    return None if value == "none" else value if value in words else int(value)


def choice_list_flag(name: str, values: Sequence[str], choices: Iterable[str]) -> list[str]:
    """A comma-separated list flag whose entries (at least one, distinct) are among ``choices``,
    or ``absl.app.UsageError`` naming ``--<name>`` and the unknown entries."""
    choices = list(choices)
    values = list(values)
    unknown = [v for v in values if v not in choices]
    check_flag(not unknown, name, f"entries of {choices}; unknown: {unknown}", ",".join(values))
    check_flag(bool(values) and len(set(values)) == len(values), name,
               f"at least one entry, each once, of {choices}", ",".join(values))
    return values


def check_dir_arg(path: str | os.PathLike | None, arg: str = "workdir") -> str:
    """A run/output directory flag: refuse a path that is a file (or lies under one) with a message
    naming ``--<arg>``, before any work is done. Returns the path. Raises ``absl.app.UsageError``."""
    from absl import app

    if path is None or not os.fspath(path):
        raise app.UsageError(f"--{arg}: expected a directory path, got {path!r}")
    path = os.fspath(path)
    if not os.path.basename(fresh_path(path)):  # the root (a traceback from the lock)
        raise app.UsageError(f"--{arg}: {path!r} is the file system's root; expected a directory below it")
    problem = _not_a_directory(path)
    if problem:
        raise app.UsageError(f"--{arg}: {path!r} {problem}; expected a directory (new or a run's)")
    return path


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _innermost(tb):
    """The last entry of a traceback (where the exception was raised), or None."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _where(tb):
    """The last entry of a traceback in this project's code (krylovjax/, experiments/): where
    the project was when the exception came (from inside JAX or the standard library, their
    frames would not tell the user where the run was); the last entry of all where none is.
    The checkpoints of :func:`interrupts_between_steps` are passed over for their callers."""
    last = mine = None
    roots = tuple(os.path.join(_PROJECT_ROOT, d) + os.sep for d in ("krylovjax", "experiments"))
    while tb is not None:
        if tb.tb_frame.f_code not in _INTERRUPT_CHECKS:  # a checkpoint: its caller says where the run was
            last = tb
            if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(roots):
                mine = tb
        tb = tb.tb_next
    return mine or last


_INTERRUPT_CHECKS: set = set()  # the code of interrupts_between_steps' check: its caller is where the run was


@contextlib.contextmanager
def interrupts_between_steps(interrupted: str) -> Iterator[Callable[[], None]]:
    """For a binary whose work is a few long computations that cannot be cut short (a jitted
    sampler runs as one program): Ctrl-C is said at once and acted on between them.

    A KeyboardInterrupt is raised by Python only when the main thread runs Python code again,
    after the computation in flight, and raised inside JAX's own code (while it compiles) it can
    crash the interpreter. Here SIGINT only records the interrupt; a watcher thread (woken through
    :func:`signal.set_wakeup_fd` while the main thread waits on the computation) writes at once
    that the run stops after the computation in flight, and the yielded ``check()`` raises
    ``KeyboardInterrupt`` where the binary calls it (between computations, before writing
    results). A second Ctrl-C ends the process at once (``os._exit(130)``, which leaves the run
    directory's claim in place: the same command runs again there) with ``interrupted (a second
    Ctrl-C): <interrupted>`` on stderr. An interrupt that no check acted on (it came during the
    last step) is said on leaving: the run finished. SIGTERM is taken the same way where
    :func:`sigterm_as_interrupt` handles it. Where SIGINT is ignored (a job started with ``&`` by
    a non-interactive shell) it is left alone; off the main thread (no signal handlers there),
    nothing is installed and ``check()`` never raises. Restores the handlers on exit."""
    import sys
    import threading

    # SIGINT unless ignored; SIGTERM where sigterm_as_interrupt handles it (as Ctrl-C: a second
    # one ends the process at once): generate and restore ended without a word at SIGTERM, leaving
    # their claim (a walkthrough, 2026-12-07)
    sigs = [] if threading.current_thread() is not threading.main_thread() else \
        [sig for sig, ok in ((signal.SIGINT, signal.getsignal(signal.SIGINT) is not signal.SIG_IGN),
                             (signal.SIGTERM, getattr(signal.getsignal(signal.SIGTERM), "defer_in_train", False)))
         if ok]
    if not sigs:
        yield lambda: None
        return
    state = {"count": 0, "done": False, "acted": False}
    r, w = os.pipe()
    os.set_blocking(w, False)

    def on_sigint(signum, frame):  # runs in the main thread, between bytecodes: record only
        state["pending"] = True

    def watch():
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if state["done"] or not data:
                return
            for byte in data:
                if byte not in sigs:
                    continue
                state["count"] += 1
                name = "Ctrl-C" if byte == signal.SIGINT else "SIGTERM"  # (a kill was told to press Ctrl-C)
                if state["count"] == 1:
                    again = "Ctrl-C again" if byte == signal.SIGINT else "a second SIGTERM (or Ctrl-C)"
                    sys.stderr.write("interrupt: stopping when the computation in flight ends (it cannot be cut "
                                     f"short); {again} to stop at once\n")
                    sys.stderr.flush()
                else:
                    sys.stderr.write(f"interrupted (a second {name}): {interrupted}\n")
                    sys.stderr.flush()
                    os._exit(130)

    def check():
        if state.get("pending") or state["count"]:
            state["acted"] = True
            raise KeyboardInterrupt

    _INTERRUPT_CHECKS.add(check.__code__)

    old_handlers = {sig: signal.signal(sig, on_sigint) for sig in sigs}
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    thread = threading.Thread(target=watch, name="krylovjax-interrupts", daemon=True)
    thread.start()
    try:
        yield check
        state["finished"] = True
    finally:
        state["done"] = True
        signal.set_wakeup_fd(old_fd)
        for sig, old_handler in old_handlers.items():
            signal.signal(sig, old_handler)
        os.write(w, b"\0")  # wake the watcher to end
        thread.join(timeout=5)
        os.close(w)
        os.close(r)
        if state.get("finished") and (state.get("pending") or state["count"]) and not state["acted"]:
            sys.stderr.write("interrupt: it came during the last step; the run finished\n")


_BAD_ARGUMENT = "_krylovjax_bad_argument"


@contextlib.contextmanager
def checking_arguments() -> Iterator[None]:
    """Around a run's checks of its config, flags and inputs, before any work: a ``ValueError``,
    ``TypeError`` or ``FileNotFoundError`` raised there is the user's bad argument (every check
    names the config key or flag and what it expected), and :func:`exit_on_run_errors` ends the
    binary with that one line instead of a traceback. The exception itself is unchanged (marked,
    not wrapped), so a library caller of the run function still gets it whole; outside such a block
    those errors are the code's own and keep their tracebacks."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:
        setattr(err, _BAD_ARGUMENT, True)
        raise


@contextlib.contextmanager
def exit_on_run_errors(interrupted: str = "what was saved (checkpoints, complete chunks of a store) is kept, "
                                          "and the same command resumes from it",
                       out_of_memory: str | None = None) -> Iterator[None]:
    """In a binary's ``main``: a bad config value or flag found by the run's checks
    (:func:`checking_arguments`), a work directory holding another run's config or finished
    results (:class:`WorkdirConflictError`) or held by another run
    (:class:`krylovjax.workdir_lock.WorkdirBusyError`), a checkpoint that cannot be restored or
    written (:class:`krylovjax.training.CheckpointError`: a corrupt one, a full disk), a loss
    that became NaN (:class:`krylovjax.training.NonFiniteLossError`), a store of
    another run (:class:`krylovjax.store.StoreConflictError`) or a store chunk that cannot be
    written (:class:`krylovjax.store.StoreWriteError`) ends the binary with
    ``error: <message>`` on stderr and exit status 1: the message says what to do, a traceback
    would bury it, and the flags' help would not help (none is printed).

    Ctrl-C (and SIGTERM, :func:`sigterm_as_interrupt`) ends it with ``interrupted in <function>
    (<file>:<line>): <interrupted>`` and status 130 (128 + SIGINT): where it was, for a run that
    seemed stuck, and what is kept, instead of a ``KeyboardInterrupt`` traceback.

    With ``out_of_memory`` (the binary's settings that size its arrays), XLA running out of
    memory (``RESOURCE_EXHAUSTED``) ends it with ``error: out of memory: <XLA's line>; <that
    advice>`` and status 1 instead of a page of JAX's traceback (a walkthrough at 128x128,
    2026-12-07)."""
    import sys

    from krylovjax.workdir_lock import WorkdirBusyError, WorkdirUnwritableError

    try:
        yield
    except KeyboardInterrupt as err:
        _SWALLOWED.clear()  # acted on
        tb = _where(err.__traceback__.tb_next)  # (its first entry is this function's own frame)
        code = None if tb is None else tb.tb_frame.f_code
        where = "" if code is None else f" in {code.co_name} ({code.co_filename}:{tb.tb_lineno})"
        sys.stderr.write(f"interrupted{where}: {interrupted}\n")
        raise SystemExit(130) from None
    except Exception as err:
        # the classes of modules not imported cannot have been raised (and stay unimported)
        kinds = (WorkdirBusyError, WorkdirConflictError, WorkdirUnwritableError) + tuple(
            getattr(sys.modules[module], name)
            for module, name in (("krylovjax.training", "CheckpointError"),
                                 ("krylovjax.training", "NonFiniteLossError"),
                                 ("krylovjax.store", "StoreWriteError"), ("krylovjax.store", "StoreConflictError"))
            if module in sys.modules)
        if isinstance(err, kinds) or getattr(err, _BAD_ARGUMENT, False):
            raise SystemExit(f"error: {err}") from None
        if out_of_memory is not None and _out_of_memory(err):
            first = next((ln.strip() for ln in str(err).splitlines() if "RESOURCE_EXHAUSTED" in ln),
                         str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise SystemExit(f"error: out of memory: {first}; {out_of_memory}") from None
        raise


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is XLA's out-of-memory error (a ``JaxRuntimeError`` saying RESOURCE_EXHAUSTED)."""
    return type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(err)


def load_for_model(source: str, arg: str, size: int, num_images: int | None, channels: int,
                   notes: list) -> np.ndarray:
    """The images of a :func:`krylovjax.data.load_images` ``source`` at a model's ``size``
    (``num_images``: a multi-image source's first ones, None for all). Images of another channel
    count are converted to the model's ``channels`` (gray as R = G = B, colour to its luminance)
    where the source can (files, arrays, a built-in photo), with a note appended to ``notes``, and
    refused otherwise. Errors (ValueError, FileNotFoundError for a missing path) start with ``arg``
    (restore's ``input`` and ``clean``, generate's ``reference``)."""
    import warnings

    from krylovjax.data import load_images

    kw: dict[str, Any] = {"size": size}
    if not source.startswith("builtin:") and num_images is not None:
        kw["num_images"] = num_images
    try:
        with warnings.catch_warnings(record=True) as caught:
            # the files cropped or converted: the callers' notes say it per file; the others (files
            # left out of a folder) go to the notes too (they reached the log only; a walkthrough)
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message=r".*: of \d+ images, ", category=UserWarning)
            x = np.asarray(load_images(source, **kw))
            if x.shape[1] != channels and source.startswith(("files:", "array:", "builtin:")):
                notes.append(f"{arg}: its images have {x.shape[1]} channel{'s' if x.shape[1] != 1 else ''}, "
                             f"converted to the model's {channels} "
                             f"({'R = G = B' if channels == 3 else 'their luminance'})")
                x = np.asarray(load_images(source, channels=channels, **kw))
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{arg}: {source!r}: {e}") from e
    for w in caught:
        if issubclass(w.category, UserWarning) and w.filename.endswith(os.path.join("krylovjax", "data.py")):
            notes.append(f"{arg}: {w.message}")
        else:  # not the reading's own: as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if x.shape[1] != channels:
        raise ValueError(f"{arg}: its images have {x.shape[1]} channels, the model {channels}")
    if num_images is not None and x.shape[0] < num_images and not source.startswith("builtin:"):
        # (restore --num_images=10 on 3 files ran the 3 without a word; a walkthrough, 2026-12-07)
        notes.append(f"{arg}: {num_images} images asked, {source!r} holds {x.shape[0]}: all {x.shape[0]} used")
    return x


def progress_bar(**kwargs):
    """A tqdm bar on stderr (``tqdm.auto``'s keywords), redrawn at most every 30 s when stderr
    is not a terminal: a log file gets a line now and then instead of a redraw per update (a
    walkthrough found logs filled with them)."""
    import sys

    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(dynamic_ncols=True, mininterval=0.1 if tty else 30.0, **kwargs)


def warn_fewer_images(asked: Any, got: int, key: str, source: Any) -> None:
    """A warning when a source held fewer images than ``key`` asked for (``num_images`` is an
    upper bound: 20 asked of a folder of 8 gives 8, which a walkthrough found said nowhere)."""
    if isinstance(asked, int) and not isinstance(asked, bool) and 0 < got < asked:
        logging.warning("%s: %d images asked for, %r holds %d; using those %d", key, asked, source, got, got)


def short_paths(paths: Sequence[str]) -> list[str]:
    """Files named as a user tells them apart: each path relative to the directory all of them
    share (``x/a.png``, ``y/a.png`` for a ``**`` pattern; the bare names for one folder)."""
    full = [os.path.abspath(p) for p in paths]
    if not full:
        return []
    base = os.path.commonpath([os.path.dirname(p) for p in full])
    return [os.path.relpath(p, base) for p in full]


def finished_step(path: str) -> int | None:
    """The model step recorded (``model_step``) in a finished run's result JSON at ``path``, or None
    where it is unreadable or says none."""
    try:
        with open(path) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    step = done.get("model_step") if isinstance(done, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


#: The most trajectory frames a figure shows: each is a column of it (generate's and restore's
#: ``--num_frames``; 1001 frames of ancestral DDPM drew a 143 000-pixel-wide PNG, a walkthrough).
MAX_FRAMES = 64


def check_frames(num_frames: int, figure: str) -> None:
    """ValueError naming ``num_frames`` above :data:`MAX_FRAMES` (the columns of ``figure``)."""
    if num_frames > MAX_FRAMES:
        raise ValueError(f"num_frames: expected at most {MAX_FRAMES} (each frame is a column of {figure}), "
                         f"got {num_frames}")


#: ``--compute_dtype`` of the sampling binaries (generate, restore): ``model`` is the training's.
COMPUTE_DTYPES = ("model", "float32", "bfloat16")
COMPUTE_DTYPE_HELP = ("The U-Net's compute dtype (convolutions, matmuls): model = the training's; e.g. float32 "
                      "for a model trained in bfloat16 (its score is then not rounded to bfloat16's precision, "
                      "about 4e-3).")


def model_compute_dtype(value: Any) -> Any:
    """A sampling binary's ``compute_dtype`` for :func:`krylovjax.training.load_score_fn`: its
    flag's ``"model"`` (the training's) is None; anything else is passed on (and checked there)."""
    return None if isinstance(value, str) and value == "model" else value


def compute_dtype_setting(fn: Any) -> str:
    """What a sampling binary records as its ``compute_dtype`` setting for a model ``fn`` of
    :func:`krylovjax.training.load_score_fn`: ``"model"`` when it computes in its training's
    dtype, asked by name or not (the same run either way), else the dtype's name (a dtype object
    such as ``jnp.bfloat16`` is not JSON)."""
    dtype = fn.model_def.unet.dtype
    return "model" if dtype == fn.trained_dtype else dtype


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed of ``jax.random.PRNGKey``: an int in ``[0, 2**32)``, or ValueError naming ``name``.
    Without x64 JAX keeps 32 bits of it (``PRNGKey(2**32 + 5)`` is ``PRNGKey(5)``: another seed
    silently repeated one), and from ``2**63`` on it raised an ``OverflowError`` traceback after
    the model was loaded (a walkthrough of generate and restore, 2026-12-07)."""
    from krylovjax import _checks

    what = "an int in [0, 2**32) (JAX's random keys keep 32 bits of it)"
    seed = _checks.as_int(name, value, 0, what=what)
    if seed >= 2**32:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return seed


def check_training_run(workdir: str, arg: str = "workdir") -> None:
    """FileNotFoundError naming ``arg`` unless ``workdir`` is a training run (holds
    ``checkpoints/``); where it holds training runs itself (an ``experiments.denoise`` or
    ``budget`` work directory: ``ours/``, ``ddpm/``), the message names them."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    if not os.path.isdir(workdir):  # (it was said to be "not a training run" either way)
        what = "is a file" if os.path.exists(workdir) else "does not exist"
        raise FileNotFoundError(f"{arg}: {workdir!r} {what}; expected a training run (a directory with "
                                "checkpoints/, the --workdir of experiments.train)")
    inside = sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d, "checkpoints"))) \
        if os.path.isdir(workdir) else []
    hint = f"; the training runs inside it: {', '.join(os.path.join(workdir, d) for d in inside)}" if inside else ""
    raise FileNotFoundError(f"{arg}: {workdir!r} is not a training run (no checkpoints/ inside){hint}")


def refuse_other_runs(path: str | os.PathLike, markers: Mapping[str, str], arg: str = "workdir") -> None:
    """Refuse a run directory that holds another binary's run: ``markers`` maps a file or
    directory name that binary leaves in its run directory to what it is (e.g.
    ``{"experiment.json": "another experiment's run"}``); the first one found
    in ``path`` raises ``absl.app.UsageError`` naming ``--<arg>`` (nothing is written)."""
    path = os.fspath(path)
    for name, what in markers.items():
        if os.path.exists(os.path.join(path, name)):
            from absl import app

            detail = ""
            if name == _CLAIM_FILE:
                try:
                    with open(os.path.join(path, name)) as f:
                        detail = f", experiments.{json.load(f)['experiment']}"
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            raise app.UsageError(f"--{arg}: {path!r} holds {what} ({name}{detail}); use another --{arg} "
                                 "(nothing there was changed)")


@contextlib.contextmanager
def interrupts_after(interrupted: str = "nothing of it was saved; the same command starts it again") -> Iterator[None]:
    """Ctrl-C or SIGTERM (as :func:`sigterm_as_interrupt` handles it) inside the block is said at
    once and acted on when the block ends (``KeyboardInterrupt``); a second one ends the process
    at once with ``interrupted (a second Ctrl-C): <interrupted>`` (:func:`interrupts_between_steps`,
    whose watcher thread says it even while XLA compiles in C++). For XLA's compilations: a
    ``KeyboardInterrupt`` raised inside JAX's lowering, with flax and orbax imported, made the
    process crash with a segmentation fault at its exit (status 139 after the "interrupted in
    precompile" line; 4 of 5 tries, a walkthrough of denoise, the thirty-seventh session), where
    one raised after the compile exits with 130."""
    with interrupts_between_steps(interrupted) as check:
        yield
        check()


_INTERRUPT_CHECKS.add(interrupts_after.__wrapped__.__code__)


_SWALLOWED: list[str] = []  # interrupts Python printed as "Exception ignored" and ran on (what it was in)


def _interrupt_now(signum, frame):
    """Python's default SIGINT handler, as a function of our own (``sigterm_as_interrupt``)."""
    raise KeyboardInterrupt


_interrupt_now.defer_in_train = True  # training.DEFER_IN_TRAIN: train defers it like Python's own SIGINT


def _noting_swallowed(previous):
    """A ``sys.unraisablehook`` for :func:`sigterm_as_interrupt`: a ``KeyboardInterrupt`` Python
    could not raise is remembered for :func:`raise_if_signalled` and said in one line (instead of
    Python's traceback); anything else goes to ``previous``, the hook it replaces."""

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            where = getattr(unraisable.object, "__qualname__", None) or type(unraisable.object).__name__
            _SWALLOWED.append(where)
            import sys

            sys.stderr.write(f"interrupt: it came inside {where}, where Python cannot raise it; the run stops "
                             "at its next step\n")
            return
        previous(unraisable)

    hook.notes_swallowed = True
    hook.previous = previous
    return hook


def raise_if_signalled() -> None:
    """Raise ``KeyboardInterrupt`` where an interrupt came that Python could not raise: a signal's
    handler runs between any two bytecodes, and an exception it raises inside a garbage-collection
    callback (JAX runs one at every collection), a ``__del__`` or a weakref callback is printed
    as ``Exception ignored in ...`` and dropped. A SIGTERM to a two-process pre-computation was
    lost so, and the process ran its chunks to the end with status 0 (CI, 2026-12-07). With
    :func:`sigterm_as_interrupt` installed such interrupts are remembered, and the binaries'
    loops call this between their steps (the pre-computation's chunks); a no-op otherwise."""
    if _SWALLOWED:
        _SWALLOWED.clear()
        raise KeyboardInterrupt


_INTERRUPT_CHECKS.add(raise_if_signalled.__code__)


def sigterm_as_interrupt() -> None:
    """Handle SIGTERM (``kill``, ``timeout``, batch schedulers, ``docker stop``) as Ctrl-C.

    :func:`krylovjax.training.train` saves a checkpoint when interrupted with SIGINT; SIGTERM's
    default action ends the process at once and the updates since the last scheduled checkpoint
    are lost (the demos checkpoint only at the stop). With this handler the training loop defers
    SIGTERM as it does Ctrl-C (the update in flight finishes, a checkpoint is saved, the run exits
    non-zero; :data:`krylovjax.training.DEFER_IN_TRAIN`), also where SIGINT is ignored (a job
    started with ``&`` or ``nohup``). Outside training SIGTERM goes to SIGINT's Python handler,
    or raises ``KeyboardInterrupt`` where there is none. An interrupt (SIGTERM or Ctrl-C) that
    lands where Python cannot raise it (``sys.unraisablehook``) is acted on at the run's next
    :func:`raise_if_signalled` instead of being lost. Main thread only (the binaries' ``main``)."""
    import sys

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt_now)  # the same, but train defers it by its attribute
    if not _hook_chain_has("notes_swallowed"):
        sys.unraisablehook = _noting_swallowed(sys.unraisablehook)

    def handle(signum, frame):
        h = signal.getsignal(signal.SIGINT)
        if callable(h) and h is not _interrupt_now:
            h(signal.SIGINT, frame)
        else:  # SIGINT ignored (started in the background by a shell), default or ours: interrupt now
            _interrupt_now(signum, frame)

    handle.defer_in_train = True  # training.DEFER_IN_TRAIN (not imported: training pulls in flax)
    # "interrupted in" names the work, not these handlers
    _INTERRUPT_CHECKS.update({handle.__code__, _interrupt_now.__code__})
    signal.signal(signal.SIGTERM, handle)


def init_distributed(address, num_processes, process_id) -> bool:
    """``jax.distributed.initialize`` with :func:`distributed_args` of the binaries' flags (or the
    ``JAX_*`` variables); False for a one-process run. Raises ValueError naming a bad flag.

    ``--coordinator_address=auto`` lets JAX take the process layout from the cluster (TPU pods,
    SLURM, Open MPI: ``jax.distributed.initialize()`` without arguments). A one-process run in an
    environment that looks like a job of several processes logs a warning: without a coordinator
    each copy would run the whole job on its own."""
    dist = distributed_args(address, num_processes, process_id)
    log = logging.getLogger(__name__)
    if dist is None:
        hint = multiprocess_environment()
        if hint:
            log.warning("%s, but no coordinator was given: this copy runs the whole job on its own. "
                        "Pass --coordinator_address=auto (or host:port) to share the work.", hint)
        return False
    import jax

    if dist["coordinator_address"] is not None:  # JAX says nothing while it waits for the others
        log.info("process %d of %d: connecting to the coordinator at %s; every process of the job must be "
                 "started (JAX waits up to 5 minutes for them, then stops this one)", dist["process_id"],
                 dist["num_processes"], dist["coordinator_address"])
    try:
        # the arguments not given are left to JAX, which takes them from the cluster
        jax.distributed.initialize(**{k: v for k, v in dist.items() if v is not None})
    except ValueError as err:
        if dist["coordinator_address"] is not None:
            raise
        raise ValueError(f"--coordinator_address=auto: JAX found no cluster to take the process layout "
                         f"from (a TPU pod, SLURM, Open MPI): {err}; pass host:port instead") from None
    log.info("process %d/%d, %d local device(s), %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def process_values(*values: int) -> np.ndarray:
    """Every process's ``values`` (small integers), ``[process_count, len(values)]`` int32, the
    same array on every process: one all-gather, which every process must reach; no collective
    with one process. The decisions several processes must take alike (training's stop, the
    workdir locks, the configs, a run's token) are read from it."""
    import jax

    mine = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return mine[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(values))


def check_same_config(config: Any, what: str = "--config") -> None:
    """In a job of several processes, refuse (on every process) a config that differs between
    them: each process would run another job (another store, another batch) and the first
    collective would hang until JAX's timeout aborted them (a walkthrough, 2026-12-07). One
    all-gather of a hash of the config, right after the processes connect; nothing with one
    process."""
    import hashlib

    import jax

    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(json.dumps(_plain(config), sort_keys=True, default=str).encode()).digest()
    every = process_values(*np.frombuffer(digest[:8], np.int32))
    differ = [i for i in range(1, len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ValueError(f"{what}: process{'es' if len(differ) > 1 else ''} {', '.join(map(str, differ))} of this "
                         f"job {'were' if len(differ) > 1 else 'was'} given another config than process 0; every "
                         f"{what}.* value must be the same on every process")


def multiprocess_environment(environ=None) -> str | None:
    """A description of the job's process count when the environment says it has several
    processes (SLURM, Open MPI / PMI, a multi-host TPU slice), else None."""
    environ = os.environ if environ is None else environ

    def count(var):
        try:
            return int(environ.get(var, ""))
        except ValueError:
            return 0

    for var in ("SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if count(var) > 1:
            return f"${var}={environ[var]} says this job has {count(var)} processes"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"$TPU_WORKER_HOSTNAMES names {len(hosts)} TPU hosts"
    return None


def distributed_args(address, num_processes, process_id, environ=None) -> dict | None:
    """``jax.distributed.initialize`` keyword arguments from the flags (or ``JAX_*`` variables).

    Returns None for a one-process run (no coordinator given). ``address="auto"`` gives
    ``coordinator_address=None`` (JAX detects the cluster; ``num_processes``/``process_id`` are
    passed on when given). Raises ValueError naming the flag for a malformed address,
    ``num_processes < 1``, ``process_id`` outside ``[0, num_processes)``, process flags
    without a coordinator, or a ``host:port`` without ``num_processes``/``process_id`` outside
    a cluster (:func:`multiprocess_environment`; in one, JAX takes them from it).
    """
    environ = os.environ if environ is None else environ

    def pick(value, var, name):
        if value is not None:
            return value
        raw = environ.get(var)
        if raw in (None, ""):
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"--{name} (from ${var}): expected an integer, got {raw!r}") from None

    address = address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    nproc = pick(num_processes, "JAX_NUM_PROCESSES", "num_processes")
    pid = pick(process_id, "JAX_PROCESS_ID", "process_id")
    if address is None:
        if nproc not in (None, 1) or pid not in (None, 0):
            given = [f"${v}" for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if environ.get(v)]
            raise ValueError("--num_processes/--process_id" + (f" (from {' and '.join(given)})" if given else "")
                             + ": a multi-process run needs --coordinator_address=host:port (process 0's address) or "
                             "--coordinator_address=auto (a TPU pod, SLURM, Open MPI)")
        return None
    if nproc is not None and nproc < 1:
        raise ValueError(f"--num_processes: expected an integer >= 1, got {nproc}")
    if pid is not None and (pid < 0 or (nproc is not None and pid >= nproc)):
        raise ValueError(f"--process_id: expected an integer in [0, {nproc if nproc is not None else 'num_processes'})"
                         f", got {pid}")
    if address == "auto":
        return {"coordinator_address": None, "num_processes": nproc, "process_id": pid}
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator_address: expected host:port with a port in [1, 65535] or 'auto', "
                         f"got {address!r}")
    # JAX's own words were "Number of processes must be defined." (a walkthrough, 2026-12-07);
    # in a cluster JAX takes them from it (SLURM, Open MPI, a TPU pod)
    cluster = multiprocess_environment(environ) is not None
    if nproc is None and not cluster:
        raise ValueError(f"--num_processes: expected the job's number of processes with --coordinator_address="
                         f"{address} (or --coordinator_address=auto, where the cluster gives it)")
    if pid is None and not cluster:
        raise ValueError(f"--process_id: expected this process's index in [0, {nproc}) with --coordinator_address="
                         f"{address} (or --coordinator_address=auto, where the cluster gives it)")
    return {"coordinator_address": address, "num_processes": nproc, "process_id": pid}


def _real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    """A real number, finite and > 0 (not a bool)."""
    return _real(v) and math.isfinite(float(v)) and float(v) > 0


def check_target(value: Any, name: str = "target") -> float:
    """An SSIM target: a finite number in (0, 1]; returns it as float, else ValueError."""
    if not (_real(value) and math.isfinite(float(value)) and 0.0 < float(value) <= 1.0):
        raise ValueError(f"{name}: expected an SSIM target in (0, 1], got {value!r}")
    return float(value)


def check_positive_seconds(value: Any, name: str = "budget_seconds") -> float:
    """A time budget: a finite number of seconds > 0; returns it as float, else ValueError."""
    if not _positive(value):
        raise ValueError(f"{name}: expected a finite number of seconds > 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def standard_noise(shape, seed: int) -> np.ndarray:
    """The draw ``z ~ N(0, I)`` of :func:`noisy_copy` for ``seed``: float64 from
    ``numpy.random.default_rng(seed)``, so ``noisy_copy(x, std, seed, clamp=False, scale=s)`` is
    ``s x + std standard_noise(x.shape, seed)`` whatever ``std`` and ``s``."""
    return np.random.default_rng(int(seed)).standard_normal(tuple(shape))


def noisy_copy(images, std: float, seed: int, *, clamp: bool = True, scale: float = 1.0) -> np.ndarray:
    """Paper A's noisy test input ``clamp(x + std z, 0, 1)``, ``z ~ N(0, I)`` (method.md 6), or
    with ``scale`` ``clamp(scale x + std z, 0, 1)`` (Paper B's conditional start ``w x + (1 - w)
    sigma z`` is ``scale = w``, ``std = (1 - w) sigma``).

    The noise comes from ``numpy.random.default_rng(seed)`` (standard normal, float64, then
    cast), so a seed gives the same noisy image in float32 and float64 and on every machine.

    Args:
      images: ``[B, C, H, W]`` float32/float64 in [0, 1].
      std: noise standard deviation, finite and > 0 (Paper A: 0.506).
      seed: integer seed.
      clamp: clamp to [0, 1] (Paper A does); False gives ``scale x + std z``.
      scale: the clean image's factor, finite and > 0 (default 1).

    Returns:
      numpy array like ``images`` (same shape and dtype).
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images: expected shape [B, C, H, W], got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"images: expected a floating dtype, got {x.dtype}")
    if not _positive(std):
        raise ValueError(f"std: expected a finite noise level > 0, got {std!r}")
    if not _positive(scale):
        raise ValueError(f"scale: expected a finite factor > 0, got {scale!r}")
    y = float(scale) * x.astype(np.float64) + float(std) * standard_noise(x.shape, seed)
    if clamp:
        y = np.clip(y, 0.0, 1.0)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Training records
# ----------------------------------------------------------------------------------------------


def standard_error(values) -> float | None:
    """The standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); None
    for fewer than two values."""
    v = np.asarray(values, np.float64).ravel()
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None


def read_metrics(train_workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of ``<train_workdir>/metrics.jsonl`` (of :func:`krylovjax.training.train`),
    optionally only those of ``kind`` ("start", "train", "eval"); a half-written line is skipped."""
    path = os.path.join(os.fspath(train_workdir), "metrics.jsonl")
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


def first_reaching(records: Iterable[Mapping], key: str, target: float) -> dict | None:
    """The first eval record (in order) whose ``key`` is ``>= target``, or None.

    ``records`` are dicts with ``step``, ``train_seconds`` and ``key`` (the "eval" records of a
    training run); records without ``key`` are skipped.
    """
    for rec in records:
        v = rec.get(key)
        if v is not None and math.isfinite(float(v)) and float(v) >= target:
            return dict(rec)
    return None


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def format_seconds(s: float | None, digits: int = 1) -> str:
    """``12.3 s``, or ``-`` for None."""
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "-"
    return f"{s:.{digits}f} s"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 4 significant digits, None becomes ``-``."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.4g}"
        return str(v).replace("|", "\\|")

    headers = [str(h) for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        r = list(r)
        if len(r) != len(headers):
            raise ValueError(f"rows: expected {len(headers)} cells per row, got {len(r)}: {r!r}")
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (temporary file + rename)."""
    from krylovjax._io_errors import atomic_write_text

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def print_outputs(directory: str | os.PathLike, table: str, names: Sequence[str]) -> None:
    """A binary's last words: the Markdown ``table`` file of ``directory`` printed, then where its
    outputs are: each of ``names`` that exists there (a figure made only with some settings is
    left out), as absolute paths."""
    root = os.path.abspath(os.fspath(directory))
    with open(os.path.join(root, table)) as f:
        print(f.read())
    print("Outputs in", root + ":")
    for name in names:
        path = os.path.join(root, name)
        if os.path.exists(path):
            print("  ", path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy values converted; NaN/Inf as null)."""

    def clean(v: Any) -> Any:
        v = _plain(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    write_text(path, json.dumps(clean(obj), indent=1, sort_keys=False) + "\n")


def write_images(folder: str | os.PathLike, images, names: Sequence[str]) -> list[str]:
    """Each image of ``images [B, C, H, W]`` (in [0, 1]; C = 1 or 3) as an 8-bit PNG
    ``<folder>/<names[k]>`` (the folder made), and the paths written."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(names) != images.shape[0]:
        raise ValueError(f"images: expected [B, C, H, W] with C 1 or 3 and {len(names)} names, got shape "
                         f"{images.shape}")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for img, name in zip(images, names):
        pixels = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
        path = os.path.join(folder, name)
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)
        paths.append(path)
    return paths


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark_machine() -> dict:
    """Machine, software, load and date of a benchmark run (the ``"machine"`` entry of the
    benchmark binaries' JSON): backend platform and device kind, CPU model and count, load
    average, jax and Python versions, date to the minute."""
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "jax": jax.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def compute_dtypes(train_configs: Mapping[str, Any]) -> dict:
    """``{method: the U-Net's compute dtype}`` of several training runs (``train_configs``:
    method -> TrainConfig), for the results: a bfloat16 table looked like a float32 one (a
    walkthrough)."""
    return {m: str(dict(tc.model_overrides).get("dtype", "float32")) for m, tc in train_configs.items()}


def compute_dtype_note(dtypes: Mapping[str, str] | None) -> str:
    """``"U-Net compute float32"``, naming each method's dtype where they differ (``dtypes`` of
    :func:`compute_dtypes`; results written before it was recorded say so)."""
    if not dtypes:
        return "U-Net compute not recorded"
    if len(set(dtypes.values())) == 1:
        return f"U-Net compute {next(iter(dtypes.values()))}"
    return "U-Net compute " + ", ".join(f"{m} {d}" for m, d in dtypes.items())


def machine_info() -> dict:
    """Machine, software and date for the tables."""
    import jax

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _to_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"images: expected [C, H, W] panels, got shape {img.shape}")
    img = np.clip(np.moveaxis(img, 0, -1), 0.0, 1.0)
    return img[..., 0] if img.shape[-1] == 1 else img


def image_grid(path: str | os.PathLike, rows: Sequence[Any], *, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[Sequence[str]] | Sequence[str] | None = None, title: str | None = None,
               panel_inches: float = 1.3) -> None:
    """Save a grid of images as a PNG (matplotlib, Agg backend).

    Args:
      path: output ``.png`` path.
      rows: a sequence of rows, each ``[K, C, H, W]`` (or a list of ``[C, H, W]``) in [0, 1];
        rows may have different lengths (missing panels stay blank). Values are clipped to
        [0, 1] for display; 1-channel images are shown in grey.
      row_labels: one label per row (left).
      col_labels: titles over the panels: one list for all rows, or one list per row.
      title: figure title.
      panel_inches: size of one panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[np.asarray(p) for p in r] for r in rows]
    if not rows or not any(rows):
        raise ValueError("rows: expected at least one image")
    nrow, ncol = len(rows), max(len(r) for r in rows)
    per_row = None
    if col_labels is not None and len(col_labels) and not isinstance(col_labels[0], str):
        per_row = [list(c) for c in col_labels]
    fig, axes = plt.subplots(nrow, ncol, figsize=(panel_inches * ncol + (0.9 if row_labels else 0.2),
                                                  panel_inches * nrow + (0.5 if title else 0.15)),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j >= len(r):
                ax.axis("off")
                continue
            img = _to_hwc(r[j])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            lab = None
            if per_row is not None and i < len(per_row) and j < len(per_row[i]):
                lab = per_row[i][j]
            elif per_row is None and col_labels is not None and i == 0 and j < len(col_labels):
                lab = col_labels[j]
            if lab:
                ax.set_title(str(lab), fontsize=7)
        if row_labels is not None and i < len(row_labels):
            axes[i][0].set_ylabel(str(row_labels[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def plot_curves(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                xlabel: str, ylabel: str, hlines: Sequence[float] = (), title: str | None = None) -> None:
    """Save line plots ``{label: (x, y)}`` as a PNG, with optional horizontal lines (targets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for label, (x, y) in curves.items():
        ax.plot(list(x), list(y), marker=".", label=str(label))
    for h in hlines:
        ax.axhline(float(h), color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


class _QuietOrbax(logging.Filter):
    """Drop orbax's per-save INFO chatter and its read-only-manager notices (other warnings and
    errors pass). Orbax's errors pass as one line each, without the traceback of its worker
    thread: a checkpoint that cannot be written (a full disk) is logged once per writer thread
    with some 90 lines of orbax's and asyncio's frames each, above the run's own
    ``CheckpointError`` that says what failed and how to go on. Within one orbax operation (its
    ``operation_id``: one save), an error line whose text was already shown (its threads fail
    with the same exception) is dropped, and after :attr:`SHOWN` lines one more says that the
    rest are not shown: a clean-clone CI run under load saw 12 lines where an idle run logs 3
    (2026-12-07); the run's own message follows them."""

    SHOWN = 2

    def __init__(self):
        super().__init__()
        self._seen: dict[str | None, set[str]] = {}  # per operation_id, the error texts shown

    def filter(self, record):
        if _orbax_task_never_retrieved(record):
            return False
        if "orbax" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR:
            record.exc_info = record.exc_text = None
            text = record.getMessage()
            # the same exception in another thread: "[process=0][thread=...][operation_id=1] ... : <error>"
            op = re.search(r"\[operation_id=([^\]]*)\]", text)
            seen = self._seen.setdefault(op.group(1) if op else None, set())
            key = text.split("] ", 3)[-1] if text.startswith("[process=") else text
            key = key.split("raised an exception: ", 1)[-1]
            if key in seen or len(seen) > self.SHOWN:
                return False
            seen.add(key)
            if len(seen) > self.SHOWN:
                record.msg, record.args = "orbax: its further errors are not shown (the run's own message follows)", ()
            elif "\n" in text:
                record.msg, record.args = text.splitlines()[0] + " [...]", ()
            return True
        msg = str(record.msg)
        return record.levelno >= logging.WARNING and "read_only" not in msg and "read only" not in msg


def _orbax_task_never_retrieved(record) -> bool:
    """asyncio's "Task exception was never retrieved" for an orbax write task: logged (with the
    task's traceback) whenever the garbage collector frees a failed write that orbax abandoned,
    after orbax's own error line for it; a clean-clone run met it once in the full-disk test
    (2026-12-07)."""
    if record.name != "asyncio" or "exception was never retrieved" not in str(record.msg) or not record.exc_info:
        return False
    tb = record.exc_info[2]
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _closed_loop_callback(unraisable) -> bool:
    """An exception of asyncio's ``call_soon_threadsafe`` on a closed event loop: tensorstore
    completing a write that orbax abandoned when another write of the checkpoint failed."""
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    tb = _innermost(unraisable.exc_traceback)
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def quiet_orbax_logs() -> None:
    """In a binary's ``main``: silence orbax's INFO messages and its worker threads' tracebacks
    on the absl handler (:class:`_QuietOrbax`), and drop the "Event loop is closed" exceptions that
    tensorstore's callbacks raise, one per abandoned write (17 for the tiny U-Net), after orbax
    gives up on a checkpoint; Python would print each as a traceback (``sys.unraisablehook``).
    Every other unraisable exception goes to the previous hook (:func:`drop_closed_loop_reports`)."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):  # once (binaries' main called in tests)
        handler.addFilter(_QuietOrbax())
    drop_closed_loop_reports()


def _hook_chain_has(attr: str) -> bool:
    """Whether ``sys.unraisablehook`` or a hook it wraps (their ``previous``) carries ``attr``:
    each of this module's hooks is installed once, in whichever order (a review: one wrapping the
    other hid the first one's mark, and they could stack)."""
    import sys

    hook, seen = sys.unraisablehook, 0
    while hook is not None and seen < 32:
        if getattr(hook, attr, False):
            return True
        hook, seen = getattr(hook, "previous", None), seen + 1
    return False


def drop_closed_loop_reports() -> None:
    """Drop the "Event loop is closed" exceptions of tensorstore's callbacks, which Python would
    print as tracebacks (``sys.unraisablehook``): after orbax gives up on a write (a failed save)
    or a read (:func:`krylovjax.training.load_checkpoint` on a truncated file: about 290 of them
    after its one-line error; a walkthrough, 2026-12-07). Every other unraisable exception goes to
    the previous hook. Installed once per process."""
    import sys

    if _hook_chain_has("drops_closed_loops"):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loops = True
    hook.previous = previous
    sys.unraisablehook = hook
