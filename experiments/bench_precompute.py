r"""The paper's claim end to end: the whole score pre-computation with spsolve vs Krylov.

Runs :func:`krylovjax.precompute.precompute_scores` (initial KDE log-density, Paper B's outer
sweeps, scores; method.md 3.1-3.4) on the same built-in photographs with the linear solver
``"spsolve"`` (scipy, one system at a time: the papers' baseline) and with each Krylov strategy
(:data:`krylovjax.cross_matrix.PRESETS`). Every strategy is compiled first (``precompile``
plus a one-sweep warm-up run, timed apart as ``compile_s``), then timed. Per strategy: total
seconds, speed-up vs spsolve, the largest per-image relative difference of the scores to the
spsolve run (``max_i ||s_i - s_i^ref||_inf / ||s_i^ref||_inf`` over images whose outer
iteration converged in both runs; ``max_rel_diff_all`` over all images), non-converged linear
solves and images, sweeps.

``--subsets=all,converged``: "converged" repeats everything on the images whose outer iteration
converged in the spsolve run of "all" (Paper B's sweeps do not converge on every image; see
docs/bench_precompute_cpu.md).

Usage::

    python -m experiments.bench_precompute --sizes=32 --images=64 --json_out=runs/bench_pre.json
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from krylovjax import experiment_utils as eu
from krylovjax.experiment_utils import benchmark_machine, write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["32"], "Image sizes (pixels per side).")
flags.DEFINE_integer("images", 64, "Number of built-in images (RGB: 3 systems per image and step).")
flags.DEFINE_list("strategies", ["all"],
                  "Strategies: 'all' (spsolve and every cross_matrix.PRESETS entry) or names.")
flags.DEFINE_list("subsets", ["all", "converged"],
                  "Image sets: 'all', and 'converged' (images spsolve's sweeps converged on).")
flags.DEFINE_integer("num_steps", 20, "N, FP time levels.")
flags.DEFINE_float("sigma", 5.0, "VE SDE sigma (g = sigma^t).")
flags.DEFINE_enum("scheme", "fitted", ["fitted", "consistent"],
                  "FP scheme (fokker_planck.fp_operator): 'fitted', the library default, or "
                  "'consistent' (central differences).")
flags.DEFINE_float("outer_tol", 1e-6, "Relative change at which an image's sweeps stop.")
flags.DEFINE_integer("max_sweeps", 30, "Sweep budget.")
flags.DEFINE_float("tol", None, "Relative residual of the Krylov solves; default: the dtype's "
                   "(precompute.DEFAULT_TOL: 1e-10 in float64, 1e-6 in float32).")
flags.DEFINE_float("forcing", 0.0, "Inexact sweeps (PrecomputeConfig.forcing), 0 = off.")
flags.DEFINE_integer("divergence_patience", 5,
                     "Stop wandering images (PrecomputeConfig.divergence_patience) in both "
                     "pipelines, as the experiment configs do; 0 = Paper B's literal Algorithm 1 "
                     "(every image that never settles runs to --max_sweeps).")
flags.DEFINE_integer("restart", 20, "GMRES restart length.")
flags.DEFINE_integer("basis_size", 8, "Seed basis size of the cross-matrix strategies.")
flags.DEFINE_string("chunk_size", "auto", "Systems per solver chunk, 'auto' or 'none'.")
flags.DEFINE_string("compact", "8",
                    "PrecomputeConfig.compact: smallest batch (images) the sweeps shrink to once "
                    "images converge, or 'none' (always the whole batch).")
flags.DEFINE_enum("dtype", "float64", ["float32", "float64"], "Floating-point type.")
flags.DEFINE_integer("repeats", 3, "Timed runs per Krylov strategy (the fastest is reported).")
flags.DEFINE_integer("spsolve_repeats", 1, "Timed runs of spsolve (the fastest is reported).")
flags.DEFINE_integer("seed", 0, "Crop seed of the built-in data set.")
flags.DEFINE_string("json_out", None,
                    "Write {'machine': ..., 'flags': ..., 'complete': ..., 'rows': [...]} here, after "
                    "every row ('complete' false until the end: a run cut off keeps its rows).")
FLAG_NAMES = ("sizes", "images", "strategies", "subsets", "num_steps", "sigma", "scheme",
              "outer_tol", "max_sweeps", "tol", "forcing", "divergence_patience", "restart",
              "basis_size", "chunk_size", "compact", "dtype", "repeats", "spsolve_repeats", "seed")


def _per_image_rel_diff(s, ref):
    """``[B]``: ||s_i - ref_i||_inf / ||ref_i||_inf."""
    import numpy as np

    s, ref = np.asarray(s, np.float64), np.asarray(ref, np.float64)
    B = s.shape[0]
    num = np.abs(s - ref).reshape(B, -1).max(1)
    return num / np.maximum(np.abs(ref).reshape(B, -1).max(1), np.finfo(np.float64).tiny)


def run_strategy(images, cfg, repeats):
    """Compile (ahead of time, then a one-sweep warm-up), then time ``repeats`` full runs."""
    import dataclasses

    from krylovjax.precompute import precompile, precompute_scores

    t0 = time.perf_counter()
    precompile(images.shape, images.dtype, cfg)
    precompute_scores(images, dataclasses.replace(cfg, max_sweeps=1))
    compile_s = time.perf_counter() - t0
    best = None
    for _ in range(repeats):
        res = precompute_scores(images, cfg)
        if best is None or res.stats["seconds"] < best.stats["seconds"]:
            best = res
    return best, compile_s


def _krylov_tol() -> float:
    """The Krylov tolerance the runs use (--tol, or the dtype's default)."""
    import numpy as np

    from krylovjax.precompute import DEFAULT_TOL
    return FLAGS.tol if FLAGS.tol is not None else DEFAULT_TOL[np.dtype(FLAGS.dtype)]


def check_flags() -> tuple[list[int], str | int | None, int | None]:
    """The list and string flags checked before any work (PrecomputeConfig checks the numbers
    of each run); returns the parsed sizes, chunk size and compact. Raises
    ``absl.app.UsageError`` naming the flag."""
    from krylovjax.precompute import STRATEGIES

    sizes = eu.int_list_flag("sizes", FLAGS.sizes, 4)
    if FLAGS.strategies != ["all"]:
        eu.choice_list_flag("strategies", FLAGS.strategies, STRATEGIES)
    eu.choice_list_flag("subsets", FLAGS.subsets, ("all", "converged"))
    for name, lo in (("images", 1), ("repeats", 1), ("spsolve_repeats", 1)):
        eu.check_flag(FLAGS[name].value >= lo, name, f"an integer >= {lo}", FLAGS[name].value)
    chunk = eu.word_or_int_flag("chunk_size", FLAGS.chunk_size, ("auto", "none"))
    compact = eu.word_or_int_flag("compact", FLAGS.compact, ("none",))
    # The numbers of every run's config, now (a bad --outer_tol ended in a traceback after the
    # images were made, until a walkthrough of 2026-12-07).
    for strategy in ("spsolve", "gmres"):  # spsolve takes no forcing; the Krylov strategies all alike
        try:
            precompute_config(strategy, chunk, compact)
        except (ValueError, TypeError) as err:
            raise app.UsageError(str(err).replace("sde_kwargs", "sigma (sde_kwargs)", 1)) from None
    return sizes, chunk, compact


def precompute_config(strategy: str, chunk, compact):
    """The :class:`krylovjax.precompute.PrecomputeConfig` of a run of ``strategy`` with the flags."""
    from krylovjax.precompute import PrecomputeConfig

    return PrecomputeConfig(
        sde_kwargs=(("sigma", FLAGS.sigma),), num_steps=FLAGS.num_steps, scheme=FLAGS.scheme,
        outer_tol=FLAGS.outer_tol, max_sweeps=FLAGS.max_sweeps, strategy=strategy,
        tol=FLAGS.tol, restart=FLAGS.restart, basis_size=FLAGS.basis_size,
        chunk_size=chunk, forcing=0.0 if strategy == "spsolve" else FLAGS.forcing,
        divergence_patience=FLAGS.divergence_patience, compact=compact)


def main(argv):
    eu.check_no_args(argv)
    sizes, chunk, compact = check_flags()
    import jax

    jax.config.update("jax_enable_x64", FLAGS.dtype == "float64")
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import cross_matrix, data

    strategies = (["spsolve"] + list(cross_matrix.PRESETS) if FLAGS.strategies == ["all"]
                  else [s for s in FLAGS.strategies if s != "spsolve"])
    if strategies[0] != "spsolve":
        strategies = ["spsolve"] + strategies
    info = benchmark_machine()
    logging.info("machine: %s", info)
    rows = []

    def dump(complete: bool) -> None:
        if FLAGS.json_out:
            flag_values = {k: FLAGS[k].value for k in FLAG_NAMES}
            flag_values["tol"] = _krylov_tol()  # the one the runs used
            write_json(FLAGS.json_out, {"machine": info, "flags": flag_values,
                                        "complete": complete, "rows": rows})
    for size in sizes:
        all_images = jnp.asarray(data.builtin_dataset(size, FLAGS.images, seed=FLAGS.seed),
                                 FLAGS.dtype)
        converged_idx = None
        for subset in FLAGS.subsets:
            if subset == "all":
                images = all_images
            elif subset == "converged":
                if converged_idx is None:
                    raise app.UsageError("--subsets: 'converged' needs 'all' before it")
                if len(converged_idx) == all_images.shape[0]:
                    print("every image converged: the 'converged' subset is 'all'", flush=True)
                    continue
                images = all_images[converged_idx]
            else:
                raise app.UsageError(f"--subsets: unknown subset {subset!r}")
            ref = None
            for strategy in strategies:
                cfg = precompute_config(strategy, chunk, compact)
                res, compile_s = run_strategy(
                    images, cfg, FLAGS.spsolve_repeats if strategy == "spsolve" else FLAGS.repeats)
                st = res.stats
                if ref is None:
                    ref = res
                    if subset == "all":
                        converged_idx = np.flatnonzero(st["outer_converged"])
                both = np.asarray(st["outer_converged"]) & np.asarray(ref.stats["outer_converged"])
                diff = _per_image_rel_diff(res.scores, ref.scores)
                row = dict(
                    strategy=strategy, size=size, subset=subset, images=int(images.shape[0]),
                    scheme=FLAGS.scheme,
                    dtype=FLAGS.dtype, systems=st["systems_solved"], seconds=st["seconds"],
                    compile_seconds=compile_s, initial_seconds=st["initial_seconds"],
                    ms_per_system=1e3 * st["seconds"] / max(st["systems_solved"], 1),
                    seconds_per_image=st["seconds"] / images.shape[0],
                    matvecs_per_system=st["matvecs_per_system"],
                    speedup_vs_spsolve=ref.stats["seconds"] / st["seconds"],
                    max_rel_diff_vs_spsolve=float(diff[both].max()) if both.any() else None,
                    max_rel_diff_all=float(diff.max()),
                    nonconverged=st["nonconverged"],
                    outer_nonconverged=int((~np.asarray(st["outer_converged"])).sum()),
                    sweeps_mean=float(np.mean(st["sweeps"])), sweeps_max=int(np.max(st["sweeps"])),
                    compact=FLAGS.compact, batch_images=st["batch_images"].tolist())
                rows.append(row)
                dump(complete=False)
                logging.info("%s", row)
                print(f"{strategy:>22s} {subset:>9s} {row['seconds']:8.2f} s "
                      f"x{row['speedup_vs_spsolve']:.1f}", flush=True)

    header = ("strategy", "size", "images", "seconds", "compile s", "ms/system", "matvecs",
              "speed-up", "max rel. diff", "(all images)", "non-conv. solves",
              "non-conv. images", "sweeps mean/max")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        d = r["max_rel_diff_vs_spsolve"]
        lines.append(
            f"| {r['strategy']} | {r['size']} | {r['images']} ({r['subset']}) | "
            f"{r['seconds']:.2f} | {r['compile_seconds']:.1f} | {r['ms_per_system']:.3f} | "
            f"{r['matvecs_per_system']:.1f} | {r['speedup_vs_spsolve']:.1f}x | "
            f"{'-' if d is None else f'{d:.1e}'} | {r['max_rel_diff_all']:.1e} | "
            f"{r['nonconverged']} | {r['outer_nonconverged']} | "
            f"{r['sweeps_mean']:.1f}/{r['sweeps_max']} |")
    table = "\n".join(lines)
    print(f"\nMachine: {info['cpu']} ({info['cpu_count']} cores, load {info['load_average']}), "
          f"jax {info['jax']} on {info['platform']}, {info['date']}; {FLAGS.dtype}, VE sigma "
          f"{FLAGS.sigma:g}, N {FLAGS.num_steps}, outer tol {FLAGS.outer_tol:g}, Krylov tol "
          f"{_krylov_tol():g}, forcing {FLAGS.forcing:g}, divergence patience "
          f"{FLAGS.divergence_patience}, chunk {FLAGS.chunk_size}, compact {FLAGS.compact}\n")
    print(table)

    # Whole-dataset estimate from the measured throughput per image (CIFAR-10: 50,000 x 32^2).
    est = []
    for r in rows:
        if r["size"] == 32:
            est.append(f"  {r['strategy']} ({r['subset']}): {r['seconds_per_image']:.3f} s/image "
                       f"-> {50000 * r['seconds_per_image'] / 3600:.1f} h for 50,000 images")
    if est:
        print("\nCIFAR-10 train set (50,000 images at 32x32), one process on this machine:")
        print("\n".join(est))
    if FLAGS.json_out:
        dump(complete=True)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
