r"""Krylov vs the sparse direct solver on real log-FP systems (the paper's "Krylov vs SpSolve").

Builds the systems of one backward-Euler step of the log-FP equation for real photographs
(``skimage.data``, resized): VE SDE ``g = sigma^t`` (sigma = 5), N = 20 steps, lagged score from
the initial log-density, at an early and a late time step; every image and channel is a system.
Solves them with scipy ``spsolve`` and ``splu`` (one system at a time, as the papers do), vmapped
``jax.scipy.sparse.linalg.gmres``, and our batched solvers, and prints one table:

    time per system (median of repeats, compile time apart), matvecs per system, achieved
    relative residual, max relative difference to spsolve, speed-up vs spsolve.

Usage::

    python -m experiments.bench_solvers --sizes=32,64 --batch=64 --json_out=runs/bench.json
"""

from __future__ import annotations

import functools
import os
import statistics
import time

from absl import app, flags, logging

from krylovjax import experiment_utils as eu
from krylovjax.experiment_utils import benchmark_machine, write_json, write_text

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["32", "64", "128"], "Image sizes (pixels per side).")
flags.DEFINE_integer("batch", 64, "Number of images (each has 3 channels: 3x systems).")
flags.DEFINE_enum("dtype", "float64", ["float32", "float64"], "Floating-point type.")
flags.DEFINE_float("tol", None, "Relative residual tolerance of the Krylov solvers (default: the library's "
                   "for the dtype, krylovjax.krylov.DEFAULT_TOL: 1e-8 in float64, 1e-6 in float32; a "
                   "tolerance below the dtype's resolution is refused: no solve could be shown to meet it).")
flags.DEFINE_list(
    "methods",
    ["spsolve", "splu", "jax_gmres_vmap", "gmres", "cross_matrix", "recycled", "preconditioned",
     "cross_matrix_precond", "cross_matrix_precond_warm", "cross_matrix_precond_sh",
     "preconditioned_line", "cross_matrix_line", "cross_matrix_line_sh", "preconditioned_block",
     "cross_matrix_block", "bicgstab",
     "red_black_gmres", "fast", "fast_warm"],
    "Methods to run (spsolve always runs: it is the reference).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per method (median reported).")
flags.DEFINE_integer("direct_repeats", 1, "Timed repeats of the scipy direct solvers (the fastest reported: "
                     "the baseline at its best, so the speed-ups are conservative).")
flags.DEFINE_list("time_steps", ["early", "late"], "Which time steps: early (n=1), late (n=N-1).")
flags.DEFINE_integer("num_steps", 20, "N, the number of FP time steps.")
flags.DEFINE_float("sigma", 5.0, "VE SDE sigma (g = sigma^t).")
flags.DEFINE_enum("scheme", "consistent", ["consistent", "fitted"],
                  "FP scheme of the systems (fokker_planck.fp_operator). consistent: the systems of "
                  "the tables recorded since the first session; the pre-computation's default is fitted "
                  "(bench_precompute's too).")
flags.DEFINE_integer("basis_size", 8, "Seed basis size k for the cross-matrix methods.")
flags.DEFINE_integer("restart", 20, "GMRES restart length.")
flags.DEFINE_string("chunk_size", "auto",
                    "Systems per chunk (lax.map), 'none', or 'auto' (cross_matrix.auto_chunk_size:"
                    " cache-sized per method and grid on CPU, none elsewhere).")
flags.DEFINE_enum("projection", "minres", ["minres", "seed_hessenberg"],
                  "Seed projection of the cross-matrix methods.")
flags.DEFINE_integer("jax_gmres_max_systems", 48,
                     "vmapped jax.scipy gmres is slow: time it on at most this many systems.")
flags.DEFINE_string("json_out", None, "Write the rows as JSON here.")
flags.DEFINE_string("workdir", None, "If set, also write bench_solvers.{json,md} here.")


# Benchmark method -> (SolverConfig keywords: a preset of krylovjax.cross_matrix.PRESETS or
# explicit settings, warm start from the previous time step's solution).
KRYLOV_METHODS = {
    "gmres": ("gmres", False),
    "cross_matrix": ("cross_matrix", False),
    "recycled": ("recycled", False),
    "preconditioned": ("preconditioned", False),
    "cross_matrix_precond": ("cross_matrix_precond", False),
    "recycled_precond": ("recycled_precond", False),
    "cross_matrix_precond_warm": ("cross_matrix_precond", True),
    # The seed's own Hessenberg relation as the projection: no target matvecs (beyond Paper A).
    "cross_matrix_precond_sh": (dict(method="cross_matrix", precondition="diffusion",
                                     projection="seed_hessenberg"), False),
    # Each system's line factorisation (fewest matvecs; krylovjax.preconditioners).
    "preconditioned_line": ("preconditioned_line", False),
    "cross_matrix_line": ("cross_matrix_line", False),
    "cross_matrix_line_sh": (dict(method="cross_matrix", precondition="line",
                                  projection="seed_hessenberg"), False),
    # Block incomplete factorisation by rows (banded approximate inverses): fewest matvecs.
    "preconditioned_block": ("preconditioned_block", False),
    "cross_matrix_block": ("cross_matrix_block", False),
    "bicgstab": ("bicgstab", False),
    "red_black_gmres": (dict(method="gmres", precondition="red_black", krylov="gmres"), False),
    "fast": ("fast", False),
    "fast_warm": ("fast", True),
}


def solver_settings(method):
    """SolverConfig keywords and warm-start flag of a Krylov benchmark method."""
    from krylovjax import cross_matrix

    spec, warm = KRYLOV_METHODS[method]
    return dict(cross_matrix.PRESETS[spec] if isinstance(spec, str) else spec), warm


@functools.lru_cache(maxsize=4)
def _initial(size, num_images, dtype, seed):
    """The images' initial log-density [B, C, H, W] (the library default, Paper B's KDE:
    O((H W)^2) per channel, minutes at 128x128, so it is computed once per size)."""
    import jax.numpy as jnp

    from krylovjax import data, initial

    images = jnp.asarray(data.builtin_dataset(size, num_images, seed=seed), dtype)
    return initial.initial_log_density(images)


def build_systems(size, num_images, *, num_steps, sigma, step, dtype, seed=0,
                  scheme="consistent"):
    """Real FP systems: returns (op [S], b [S, H, W], m_prev [S, H, W]) with S = 3 * images."""
    from krylovjax import scores, sde as sde_lib
    from krylovjax.fokker_planck import fp_operator

    m0 = _initial(size, num_images, dtype, seed)  # [B, C, H, W]
    lag = scores.score(m0)  # [B, C, 2, H, W]
    sde = sde_lib.VESDE(sigma)
    t, dt = sde_lib.time_grid(num_steps)
    if step not in ("early", "late"):
        raise ValueError(f"step: expected 'early' or 'late', got {step!r}")
    n = 1 if step == "early" else num_steps - 1
    g2 = sde.g2(t[n])
    S = m0.shape[0] * m0.shape[1]
    op = fp_operator(g2, dt, 1.0, lag.reshape((S, 2, size, size)), dtype=dtype, scheme=scheme)
    m_prev = m0.reshape(S, size, size)
    return op, op.rhs(m_prev), m_prev


def _time(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_jax_gmres_vmap(op, b, tol, restart, max_systems):
    import jax

    S = min(op.batch_shape[0], max_systems)
    sub = jax.tree_util.tree_map(lambda a: a[:S], op)

    @jax.jit
    def solve(o, bb):
        def one(oi, bi):
            x, _ = jax.scipy.sparse.linalg.gmres(oi.matvec, bi, tol=tol, atol=0.0,
                                                 restart=restart, maxiter=50,
                                                 solve_method="batched")
            return x
        return jax.vmap(one)(o, bb)

    return sub, b[:S], solve


DIRECT_METHODS = ("spsolve", "splu", "jax_gmres_vmap")
TIME_STEPS = ("early", "late")


def check_flags() -> tuple[list[int], str | int | None]:
    """Every flag checked before any work (a bad value found after minutes of solves, or a
    misspelt time step silently run as the late one, is worse than an error now). Returns the
    parsed sizes and chunk size. Raises ``absl.app.UsageError`` naming the flag."""
    import math

    sizes = eu.int_list_flag("sizes", FLAGS.sizes, 4)
    eu.choice_list_flag("methods", FLAGS.methods, DIRECT_METHODS + tuple(KRYLOV_METHODS))
    eu.choice_list_flag("time_steps", FLAGS.time_steps, TIME_STEPS)
    for name, lo in (("batch", 1), ("repeats", 1), ("direct_repeats", 1), ("num_steps", 2), ("basis_size", 1),
                     ("restart", 1), ("jax_gmres_max_systems", 1)):
        eu.check_flag(FLAGS[name].value >= lo, name, f"an integer >= {lo}", FLAGS[name].value)
    v = FLAGS.sigma
    eu.check_flag(math.isfinite(v) and v > 0, "sigma", "a finite number > 0", v)
    if FLAGS.tol is not None:
        import numpy as np

        eps = float(np.finfo(FLAGS.dtype).eps)
        eu.check_flag(math.isfinite(FLAGS.tol) and FLAGS.tol > 0, "tol", "a finite number > 0", FLAGS.tol)
        # the solvers never report such a tolerance met (krylovjax.krylov): every row would be a
        # run to the iteration cap, timed and shown as if it had converged (a walkthrough, 2026-12-07)
        from krylovjax.krylov import default_tol

        eu.check_flag(FLAGS.tol >= eps, "tol", f"a tolerance at or above {FLAGS.dtype}'s machine epsilon {eps:.2g} "
                      f"(the solvers never report a smaller one met; near it many solves stagnate: the "
                      f"default is {default_tol(None, FLAGS.dtype):g})", FLAGS.tol)
    if FLAGS.workdir:
        eu.check_dir_arg(FLAGS.workdir, "workdir")
    return sizes, eu.word_or_int_flag("chunk_size", FLAGS.chunk_size, ("auto", "none"))


def krylov_tol() -> float:
    """The Krylov tolerance of the runs: --tol, or the library's default for --dtype."""
    from krylovjax.krylov import default_tol

    return default_tol(FLAGS.tol, FLAGS.dtype)


def main(argv):
    eu.check_no_args(argv)
    sizes, chunk_setting = check_flags()
    import jax

    if FLAGS.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from krylovjax import reference
    from krylovjax import cross_matrix
    from krylovjax.cross_matrix import SolverConfig, solve_fp

    dtype = jnp.dtype(FLAGS.dtype)
    tol = krylov_tol()
    rows = []
    info = benchmark_machine()
    logging.info("machine: %s", info)
    outs = [FLAGS.json_out] if FLAGS.json_out else []
    if FLAGS.workdir:
        outs.append(os.path.join(FLAGS.workdir, "bench_solvers.json"))

    def dump(complete: bool) -> None:  # after every row: a run cut off by a time cap keeps its rows
        flag_values = {k: FLAGS[k].value for k in (
            "sizes", "batch", "dtype", "tol", "methods", "repeats", "direct_repeats", "time_steps", "num_steps",
            "sigma", "scheme", "basis_size", "restart", "chunk_size", "projection", "jax_gmres_max_systems")}
        flag_values["tol"] = tol  # the one the runs used
        payload = {"machine": info, "flags": flag_values, "complete": complete, "rows": rows}
        for path in outs:
            write_json(path, payload)
    for size in sizes:
        for step in FLAGS.time_steps:
            op, b, m_prev = build_systems(size, FLAGS.batch, num_steps=FLAGS.num_steps,
                                          sigma=FLAGS.sigma, step=step, dtype=dtype,
                                          scheme=FLAGS.scheme)
            S = op.batch_shape[0]
            b_np = np.asarray(b, np.float64)
            refs = [reference.spsolve(op, b_np) for _ in range(max(1, FLAGS.direct_repeats))]
            ref = refs[0]
            x_ref = ref.x.reshape(S, -1)
            ref_norm = np.linalg.norm(x_ref, axis=1)
            sp_per = min(r.seconds for r in refs) / S
            bn = np.linalg.norm(b_np.reshape(S, -1), axis=1)

            def row(method, per_system, matvecs, x, nsys, compile_s=0.0, nonconv=0, chunk=None):
                x = np.asarray(x, np.float64).reshape(nsys, -1)
                A_res = []
                for i in range(nsys):
                    A = op.to_scipy(i)
                    A_res.append(np.linalg.norm(b_np[i].ravel() - A @ x[i]) / bn[i])
                diff = np.linalg.norm(x - x_ref[:nsys], axis=1) / ref_norm[:nsys]
                r = dict(method=method, size=size, step=step, batch=FLAGS.batch, systems=nsys,
                         dtype=FLAGS.dtype, scheme=FLAGS.scheme, seconds_per_system=per_system,
                         compile_seconds=compile_s,
                         matvecs_per_system=float(matvecs) if matvecs is not None else None,
                         residual=float(np.max(A_res)),
                         max_rel_diff_vs_spsolve=float(np.max(diff)),
                         speedup_vs_spsolve=sp_per / per_system,
                         nonconverged=None if nonconv is None else int(nonconv),
                         chunk_size=chunk)
                rows.append(r)
                logging.info("%s", r)
                dump(complete=False)

            row("spsolve", sp_per, None, ref.x, S, nonconv=None)
            for method in FLAGS.methods:
                if method == "spsolve":
                    continue
                if method == "splu":
                    lus = [reference.splu(op, b_np) for _ in range(max(1, FLAGS.direct_repeats))]
                    row("splu", min(r.seconds for r in lus) / S, None, lus[0].x, S, nonconv=None)
                    continue
                if method == "jax_gmres_vmap":
                    sub, bsub, solve = run_jax_gmres_vmap(op, b, tol, FLAGS.restart,
                                                          FLAGS.jax_gmres_max_systems)
                    t0 = time.perf_counter()
                    jax.block_until_ready(solve(sub, bsub))
                    comp = time.perf_counter() - t0
                    med, x = _time(lambda: jax.block_until_ready(solve(sub, bsub)),
                                   FLAGS.repeats)
                    # jax.scipy's gmres reports no convergence: its residual column is all there is
                    row(method, med / bsub.shape[0], None, x, bsub.shape[0], comp, nonconv=None)
                    continue
                settings, warm = solver_settings(method)  # --methods checked up front
                chunk = chunk_setting
                cfg = SolverConfig(**{**dict(tol=tol, restart=FLAGS.restart,
                                             projection=FLAGS.projection,
                                             basis_size=FLAGS.basis_size, chunk_size=chunk),
                                      **settings})
                if chunk == "auto":
                    chunk = cross_matrix.auto_chunk_size(cfg, (size, size), dtype)
                x0 = m_prev if warm else None
                solve = jax.jit(lambda o, bb, xx, c=cfg: solve_fp(o, bb, c, x0=xx))
                t0 = time.perf_counter()
                res = jax.block_until_ready(solve(op, b, x0))
                comp = time.perf_counter() - t0
                med, res = _time(lambda: jax.block_until_ready(solve(op, b, x0)), FLAGS.repeats)
                row(method, med / S, float(jnp.mean(res.num_matvecs)), res.x, S, comp,
                    int(jnp.sum(~res.converged)), chunk=chunk)

    header = ("method", "size", "step", "systems", "chunk", "ms/system", "matvecs", "residual",
              "rel.diff vs spsolve", "not converged", "speed-up")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mv = "-" if r["matvecs_per_system"] is None else f"{r['matvecs_per_system']:.1f}"
        nc = r["nonconverged"]
        lines.append(
            f"| {r['method']} | {r['size']} | {r['step']} | {r['systems']} | "
            f"{'-' if r.get('chunk_size') is None else r['chunk_size']} | "
            f"{1e3 * r['seconds_per_system']:.4f} | {mv} | {r['residual']:.1e} | "
            f"{r['max_rel_diff_vs_spsolve']:.1e} | {'-' if nc is None else nc} | "
            f"{r['speedup_vs_spsolve']:.1f}x" + (" (not converged)" if nc else "") + " |")
    table = "\n".join(lines)
    head = (f"Machine: {info['cpu']} ({info['cpu_count']} cores), jax {info['jax']} on "
            f"{info['platform']} / {info['device']}, {info['date']}, {FLAGS.dtype}, "
            f"tol {tol:g}, scheme {FLAGS.scheme}, {FLAGS.batch} images x 3 channels; Krylov times: "
            f"median of {FLAGS.repeats}; spsolve/splu: fastest of {FLAGS.direct_repeats}, in float64 (the reference)")
    bad = [r for r in rows if r["nonconverged"]]  # None (direct, jax.scipy) and 0 alike
    foot = (f"\n{len(bad)} row(s) with systems that did not reach tol {tol:g} (column 'not converged'): "
            "their times are of unfinished solves, not comparable to spsolve's" if bad else "")
    print(f"\n{head}\n")
    print(table + foot)
    if FLAGS.workdir:
        md = os.path.join(FLAGS.workdir, "bench_solvers.md")
        write_text(md, f"{head}\n\n{table}\n{foot.lstrip()}\n" if foot else f"{head}\n\n{table}\n")
    dump(complete=True)
    for path in outs + ([md] if FLAGS.workdir else []):
        print(f"wrote {path}")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
