r"""float32 numerics for accelerators: attainable solver tolerance and the effect on the scores.

TPUs have no fast float64 and GPUs are much faster in float32. This measures, on real FP systems
from built-in photographs:

1. the smallest relative residual batched GMRES reaches in float32 (asked for 1e-12; the solver
   reports where it stopped and why), per time step;
2. the pre-computed scores in float32 at several solver tolerances against a float64 reference
   run of the same pipeline (max relative difference), and whether every solve converged.

Usage::

    python -m experiments.bench_float32 --image_size=32 --num_images=8 --json_out=runs/float32.json
"""

from __future__ import annotations

from absl import app, flags

from experiments import bench_solvers  # shares its --json_out flag and helpers

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 32, "Image size.")
flags.DEFINE_integer("num_images", 8, "Number of built-in images.")
flags.DEFINE_integer("fp_steps", 20, "FP time steps N.")
flags.DEFINE_list("tolerances", ["1e-4", "1e-5", "1e-6", "1e-7"], "float32 solver tolerances.")
flags.DEFINE_string("solver_strategy", "preconditioned", "Solver strategy preset.")



def check_flags() -> list[float]:
    """Every flag of this binary checked before any work; returns the tolerances. Raises
    ``absl.app.UsageError`` naming the flag."""
    import math

    from krylovjax import experiment_utils as eu
    from krylovjax.cross_matrix import PRESETS

    # bench_solvers' flags are defined in this process too (it is imported for --json_out and its
    # helpers), but only --json_out is used here: any other is refused, not silently ignored.
    foreign = sorted(f.name for f in FLAGS.get_flags_for_module(bench_solvers)
                     if f.present and f.name != "json_out")
    if foreign:
        from absl import app

        raise app.UsageError(f"--{foreign[0]}: a flag of experiments.bench_solvers that bench_float32 does not "
                             "use (its flags: --image_size, --num_images, --fp_steps, --tolerances, "
                             "--solver_strategy, --json_out)")
    for name, lo in (("image_size", 4), ("num_images", 1), ("fp_steps", 2)):
        eu.check_flag(FLAGS[name].value >= lo, name, f"an integer >= {lo}", FLAGS[name].value)
    eu.check_flag(FLAGS.solver_strategy in PRESETS, "solver_strategy", f"one of {tuple(PRESETS)}",
                  FLAGS.solver_strategy)
    tols = []
    for t in FLAGS.tolerances:
        try:
            v = float(t)
        except ValueError:
            v = math.nan
        eu.check_flag(math.isfinite(v) and v > 0, "tolerances", "comma-separated finite numbers > 0",
                      ",".join(FLAGS.tolerances))
        tols.append(v)
    eu.check_flag(bool(tols), "tolerances", "at least one tolerance", "")
    return tols


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    tolerances = check_flags()
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench_solvers import build_systems
    from krylovjax.experiment_utils import benchmark_machine
    from krylovjax import data
    from krylovjax.cross_matrix import PRESETS, SolverConfig, solve_fp
    from krylovjax.precompute import PrecomputeConfig, precompute_scores

    rows = []
    print("1. attainable relative residual of batched GMRES in float32 (tol asked: 1e-12)")
    for step in ("early", "late"):
        op, b, _ = build_systems(FLAGS.image_size, FLAGS.num_images, num_steps=FLAGS.fp_steps, sigma=5.0,
                                 step=step, dtype=jnp.float32)
        res = solve_fp(op, b, SolverConfig(**PRESETS[FLAGS.solver_strategy], tol=1e-12,
                                           max_restarts=20))
        r = np.asarray(res.residual)
        row = dict(kind="attainable", step=step, median_residual=float(np.median(r)),
                   max_residual=float(r.max()), converged=int(res.converged.sum()),
                   statuses=sorted(set(np.asarray(res.status).tolist())))
        rows.append(row)
        print(f"  {step}: median {row['median_residual']:.2e}, max {row['max_residual']:.2e}, "
              f"statuses {row['statuses']} (0 converged, 1 max iterations, 2 stagnation)")

    images = np.asarray(data.builtin_dataset(FLAGS.image_size, FLAGS.num_images, seed=0), np.float64)
    base = dict(num_steps=FLAGS.fp_steps, strategy=FLAGS.solver_strategy, outer_tol=1e-5,
                max_sweeps=20)
    ref = precompute_scores(images, PrecomputeConfig(**base, tol=1e-10))
    ref_scores = np.asarray(ref.scores)
    scale = np.abs(ref_scores).max()
    print("\n2. float32 pipeline vs float64 reference (outer tol 1e-5)")
    print("| solver tol | non-converged solves | sweeps (max) | max rel. score diff |")
    print("|---|---|---|---|")
    for tol in tolerances:
        out = precompute_scores(images.astype(np.float32), PrecomputeConfig(**base, tol=tol))
        diff = float(np.abs(np.asarray(out.scores, np.float64) - ref_scores).max() / scale)
        row = dict(kind="pipeline", tol=tol, nonconverged=int(out.stats["nonconverged"]),
                   max_sweeps=int(np.max(out.stats["sweeps"])),
                   outer_converged=bool(np.all(out.stats["outer_converged"])),
                   max_rel_score_diff=diff)
        rows.append(row)
        print(f"| {tol:g} | {row['nonconverged']} | {row['max_sweeps']} | {diff:.2e} |")
    if FLAGS.json_out:
        # atomic, NaN/Inf as null (a float32 run that broke down must still give strict JSON)
        eu.write_json(FLAGS.json_out, {"machine": benchmark_machine(), "rows": rows})
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
