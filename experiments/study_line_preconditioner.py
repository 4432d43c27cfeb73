r"""Study: line (tridiagonal) preconditioners for the log-FP systems, against cold GMRES.

Issue 2 asks that preconditioned target systems need at most half the matvecs of cold GMRES.
The exact inverse of the shared diffusion part ``I + k L`` gets about half at the late step
but not at the early one, where each image's advection dominates. This program measures, in
scipy on the assembled matrices (independent of krylovjax's solvers), preconditioners that
capture the advection too. With ``A = D + Lx + Ly`` (diagonal, couplings along W, couplings
along H), applied from the right:

- ``diffusion``: the exact inverse of ``I + k L`` (the library's ``precondition="diffusion"``).
- ``adi``: ``(I + X)(I + Y)``, X and Y the couplings with the diagonal excess ``D - I`` split
  between the directions in proportion to their coupling weights; its error is ``X Y``.
- ``line``: ``(D + Lx) D^{-1} (D + Ly)``; its error ``Lx D^{-1} Ly`` couples diagonal
  neighbours only and holds no diagonal terms, so it is much smaller than ``X Y``.
- ``line_mod``: the same with ``D`` replaced by ``T = D - rowsum(Lx T^{-1} Ly)`` (fixed point),
  so that ``P`` has ``A``'s row sums (the "modified" incomplete factorisation idea). This is
  the library's ``precondition="line"`` (:func:`krylovjax.preconditioners.line_preconditioner`).
- ``block``: block incomplete factorisation by grid rows, ``(T + L) T^{-1} (T + U)`` with
  ``L``, ``U`` the couplings between rows, ``T_j = B_j - N_j G_{j-1} S_{j-1}`` and ``G_j`` the
  band (half-width 5) of ``T_j^{-1}``, used in place of ``T_j^{-1}`` in the sweeps too (dense
  algebra row by row, :func:`krylovjax.reference.block_rows_scipy`); the library's
  ``precondition="block_line"`` (:func:`krylovjax.preconditioners.block_line_preconditioner`).
  Its error is the part of each ``T_j^{-1}`` outside the band, which falls geometrically with
  the band's width.

Each application is two sets of tridiagonal solves (lines along W, then along H). Iterations
are scipy GMRES's inner steps on ``A P^{-1}`` to ``||b - A x|| <= tol ||b||``; "matvecs" count
them as krylovjax does (one per inner step plus one true residual per cycle; x0 = 0 needs no
initial residual).

``--time_chunks`` also times, in the same run, what one application costs in matvecs for
chunks of that many systems (the solver's ``lax.map`` chunks), chained in a jitted loop as
inside a solve: the library's diffusion preconditioner, the line preconditioner by LAPACK's
gtsv (``jax.lax.linalg.tridiagonal_solve``) and by the library's Thomas scans.

Usage::

    python -m experiments.study_line_preconditioner --sizes=32 --batch=4 --scheme=fitted \
        --json_out=runs/line.json
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import bench_solvers  # noqa: F401  (defines the shared flags)
from krylovjax import experiment_utils as eu
from krylovjax.experiment_utils import benchmark_machine
from krylovjax.preconditioners import BLOCK_BANDWIDTH

FLAGS = flags.FLAGS
# Shared with the solver benchmark (same systems): --sizes, --batch, --time_steps, --scheme,
# --num_steps, --sigma, --tol, --restart, --json_out. Its defaults are the benchmark's; this
# study's tables (BUILD_NOTES.md, docs) used --sizes=32,64 --batch=16 --scheme=fitted.
flags.DEFINE_list("preconditioners", ["none", "diffusion", "adi", "line", "line_mod", "block"],
                  "Preconditioners to compare.")
flags.DEFINE_list("time_chunks", ["2", "8", "192"],
                  "Systems per chunk for the per-application timings (empty: no timing).")
flags.DEFINE_integer("time_repeats", 20,
                     "Repeats of each timing (20 chained applications each).")

PRECONDITIONERS = ("none", "diffusion", "adi", "line", "line_mod", "block")


def split_lines(A, grid_shape):
    """``A = diag(D) + Lx + Ly`` for a 5-point matrix on a ``[H, W]`` grid (row-major)."""
    import numpy as np
    import scipy.sparse as sp

    W = grid_shape[1]
    coo = A.tocoo()
    r, c, v = coo.row, coo.col, coo.data
    same_row = r // W == c // W
    diag = r == c
    along_w = same_row & ~diag
    along_h = ~same_row
    n = A.shape[0]
    D = np.zeros(n)
    np.add.at(D, r[diag], v[diag])
    Lx = sp.csr_matrix((v[along_w], (r[along_w], c[along_w])), shape=(n, n))
    Ly = sp.csr_matrix((v[along_h], (r[along_h], c[along_h])), shape=(n, n))
    return D, Lx, Ly


def scipy_preconditioner(A, grid_shape, kind, diffusion_matrix=None):
    """``y -> P^{-1} y`` for one of :data:`PRECONDITIONERS` (scipy, on the assembled ``A``)."""
    import numpy as np
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    if kind == "none":
        return lambda y: y
    if kind == "diffusion":
        lu = spla.splu(diffusion_matrix.tocsc())
        return lu.solve
    if kind == "block":
        from krylovjax.reference import block_rows_scipy

        return block_rows_scipy(A, grid_shape, BLOCK_BANDWIDTH)
    D, Lx, Ly = split_lines(A, grid_shape)
    n = A.shape[0]
    if kind == "adi":
        wx = np.abs(Lx).sum(axis=1).A1
        wy = np.abs(Ly).sum(axis=1).A1
        share = np.where(wx + wy > 0, wx / np.maximum(wx + wy, 1e-300), 0.5)
        eye = sp.identity(n, format="csr")
        fx = spla.splu((eye + sp.diags((D - 1.0) * share) + Lx).tocsc())
        fy = spla.splu((eye + sp.diags((D - 1.0) * (1.0 - share)) + Ly).tocsc())
        return lambda y: fy.solve(fx.solve(y))
    if kind == "line":
        T = D
    elif kind == "line_mod":
        T = D.copy()
        ones = np.ones(n)
        for _ in range(10):
            T = D - Lx @ ((Ly @ ones) / T)
    else:
        raise ValueError(f"kind: expected one of {PRECONDITIONERS}, got {kind!r}")
    fx = spla.splu((sp.diags(T) + Lx).tocsc())
    fy = spla.splu((sp.diags(T) + Ly).tocsc())
    return lambda y: fy.solve(T * fx.solve(y))


def study_tol() -> float:
    """--tol, or the float64 default of the library's solvers (the study runs in float64)."""
    from krylovjax.krylov import default_tol

    return default_tol(FLAGS.tol, "float64")


def count_gmres(A, b, apply_pinv, tol, restart):
    """Right-preconditioned scipy GMRES from x0 = 0: (inner steps, cycles, true residual)."""
    import numpy as np
    import scipy.sparse.linalg as spla

    n = A.shape[0]
    op = spla.LinearOperator((n, n), matvec=lambda y: A @ apply_pinv(y), dtype=A.dtype)
    steps = [0]

    def count(_):
        steps[0] += 1

    y, _ = spla.gmres(op, b, rtol=tol, atol=0.0, restart=restart, maxiter=50, callback=count,
                      callback_type="pr_norm")
    x = apply_pinv(y)
    res = float(np.linalg.norm(b - A @ x) / np.linalg.norm(b))
    cycles = max(1, -(-steps[0] // restart))
    return steps[0], cycles, res


def jax_line_apply(op, y):
    """``P^{-1} y`` of the ``line`` preconditioner, ``P = (D + Lx) D^{-1} (D + Ly)``, in JAX
    with ``jax.lax.linalg.tridiagonal_solve`` (LAPACK gtsv on the CPU) along W, then along H:
    the library's couplings and diagonal, another tridiagonal solver."""
    import jax
    import jax.numpy as jnp

    from krylovjax.preconditioners import _in_grid_couplings

    def solve(lower, diag, upper, rhs):  # lines along the last axis
        return jax.lax.linalg.tridiagonal_solve(lower, diag, upper, rhs[..., None])[..., 0]

    t = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731
    c = _in_grid_couplings(op)
    D = op.diagonal()
    z = D * solve(c["west"], D, c["east"], y)
    return t(solve(t(c["north"]), t(D), t(c["south"]), t(z)))


def time_applications(op, chunk, repeats, inner=20):
    """Seconds per system of one batched matvec, one application of the library's diffusion
    preconditioner and one line application (LAPACK gtsv through
    ``jax.lax.linalg.tridiagonal_solve``, and the library's Thomas scans,
    :func:`krylovjax.preconditioners.line_preconditioner`) on ``chunk`` systems: ``inner``
    chained applications in one jitted ``fori_loop`` (as inside the solver, no dispatch per
    application), median of ``repeats``."""
    import statistics

    import jax
    import jax.numpy as jnp

    S = op.batch_shape[0]
    idx = jnp.arange(chunk) % S
    sub = jax.tree_util.tree_map(lambda a: a[idx] if a is not None and a.ndim > 2 else a, op)
    x = jnp.ones((chunk,) + op.grid_shape, op.dtype)

    from krylovjax.preconditioners import diffusion_preconditioner, line_preconditioner

    def chained(make):
        # 0.5 * keeps the chain bounded (the matvec's norm is at most 1 + 8k); the dependence
        # between applications keeps XLA from hoisting them out of the loop.
        # make(o) builds the application once per call (the preconditioners' set-up, e.g. the
        # Thomas factors, is amortised over the ``inner`` applications, as over a solve's).
        return jax.jit(lambda o, y: jax.lax.fori_loop(
            0, inner, lambda _, z, f=make(o): 0.5 * f(z), y))

    out = {}
    for name, fn in (("matvec", chained(lambda o: o.matvec)),
                     ("diffusion", chained(diffusion_preconditioner)),
                     ("gtsv", chained(lambda o: lambda y: jax_line_apply(o, y))),
                     ("thomas", chained(lambda o: line_preconditioner(o, modified=False)))):
        jax.block_until_ready(fn(sub, x))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(sub, x))
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) / (chunk * inner)
    return out


def main(argv):
    eu.check_no_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench_solvers import build_systems
    from krylovjax.fokker_planck import fp_operator

    for p in FLAGS.preconditioners:
        if p not in PRECONDITIONERS:
            raise app.UsageError(f"--preconditioners: expected names from {PRECONDITIONERS}, "
                                 f"got {p!r}")
    if "none" not in FLAGS.preconditioners:
        raise app.UsageError("--preconditioners: must include 'none' (the cold baseline)")
    info = benchmark_machine()
    rows, timing = [], []
    for size in [int(s) for s in FLAGS.sizes]:
        for step in FLAGS.time_steps:
            op, b, _ = build_systems(size, FLAGS.batch, num_steps=FLAGS.num_steps,
                                     sigma=FLAGS.sigma, step=step, dtype=jnp.float64,
                                     scheme=FLAGS.scheme)
            S = op.batch_shape[0]
            b = np.asarray(b).reshape(S, -1)
            zero = jnp.zeros((1, 2, size, size))
            diff = fp_operator(op.diffusion[0, 0, 0] * 2.0, 1.0, 1.0, zero,
                               scheme=FLAGS.scheme).to_scipy(0)
            per = {p: [] for p in FLAGS.preconditioners}
            for i in range(S):
                A = op.to_scipy(i)
                for p in FLAGS.preconditioners:
                    pinv = scipy_preconditioner(A, (size, size), p, diff)
                    per[p].append(count_gmres(A, b[i], pinv, study_tol(), FLAGS.restart))
            cold_mv = np.mean([s + c for s, c, _ in per["none"]])
            for p, runs in per.items():
                steps = np.array([s for s, _, _ in runs], float)
                mv = np.array([s + c for s, c, _ in runs], float)
                rows.append(dict(size=size, step=step, preconditioner=p, systems=S,
                                 scheme=FLAGS.scheme, iterations=float(steps.mean()),
                                 iterations_max=int(steps.max()),
                                 matvecs_per_system=float(mv.mean()),
                                 ratio_vs_cold=float(mv.mean() / cold_mv),
                                 residual=float(max(r for _, _, r in runs))))
            for c in FLAGS.time_chunks:
                t = time_applications(op, int(c), FLAGS.time_repeats)
                timing.append(dict(size=size, step=step, chunk=int(c),
                                   matvec_us_per_system=1e6 * t["matvec"],
                                   gtsv_us_per_system=1e6 * t["gtsv"],
                                   thomas_us_per_system=1e6 * t["thomas"],
                                   gtsv_in_matvecs=t["gtsv"] / t["matvec"],
                                   thomas_in_matvecs=t["thomas"] / t["matvec"],
                                   diffusion_us_per_system=1e6 * t["diffusion"],
                                   diffusion_in_matvecs=t["diffusion"] / t["matvec"]))

    lines = ["| size | step | preconditioner | iterations (max) | matvecs | ratio vs cold "
             "| max residual |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['step']} | {r['preconditioner']} | "
                     f"{r['iterations']:.2f} ({r['iterations_max']}) | "
                     f"{r['matvecs_per_system']:.2f} | {r['ratio_vs_cold']:.2f} | "
                     f"{r['residual']:.1e} |")
    if timing:
        lines += ["", "One application, us per system (= matvecs): the library's diffusion "
                  "preconditioner and the line preconditioner by gtsv and by Thomas scans:", "",
                  "| size | step | chunk | matvec | diffusion | line, gtsv | line, Thomas |",
                  "|---|---|---|---|---|---|---|"]
        for t in timing:
            lines.append(f"| {t['size']} | {t['step']} | {t['chunk']} | "
                         f"{t['matvec_us_per_system']:.2f} | "
                         f"{t['diffusion_us_per_system']:.2f} ({t['diffusion_in_matvecs']:.1f}) | "
                         f"{t['gtsv_us_per_system']:.2f} ({t['gtsv_in_matvecs']:.1f}) | "
                         f"{t['thomas_us_per_system']:.2f} ({t['thomas_in_matvecs']:.1f}) |")
    print(f"\nMachine: {info['cpu']} ({info['cpu_count']} cores), jax {info['jax']} on "
          f"{info['platform']}, {info['date']}; float64, tol {study_tol():g}, scheme "
          f"{FLAGS.scheme}, {FLAGS.batch} images x 3 channels, GMRES({FLAGS.restart})\n")
    print("\n".join(lines))
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"machine": info, "flags": {**{k: FLAGS[k].value for k in (
                "sizes", "batch", "time_steps", "scheme", "num_steps", "sigma",
                "restart", "preconditioners", "time_chunks")}, "tol": study_tol()}, "rows": rows,
                "timing": timing}, fh, indent=1)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors

    app.run(one_line_usage_errors(main))
