"""Reference direct solvers on the assembled matrices (the paper's "SpSolve" baseline).

These run on the host with scipy, one system at a time, exactly as Paper B's code does
(``scipy.sparse.linalg.spsolve`` per system, method.md 3.4), and ``splu`` (factorise, then
solve) for comparison. They are the ground truth for the Krylov solvers' tests and benchmarks.
:func:`block_rows_scipy` is the dense, row-by-row reference of the block line preconditioner
(:func:`krylovjax.preconditioners.block_line_preconditioner`) from an assembled matrix.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from krylovjax.fokker_planck import FPOperator


class DirectResult(NamedTuple):
    x: np.ndarray          # [*batch, H, W] float64
    residual: np.ndarray   # [*batch] relative residual ||b - A x|| / ||b||
    seconds: float         # wall time of the solves alone (assembly excluded)
    assembly_seconds: float


def _direct(op: FPOperator, b, solver: str, active=None):
    """Assemble (``to_scipy(ix).tocsc()``) and solve the systems one at a time: every one, or
    those where ``active`` (``[*batch]`` bool) is True.

    Yields ``(ix, A, x_ix [H, W] float64, assembly_seconds, solve_seconds)`` per system.
    scipy.sparse is imported here, not with the module: it takes 0.15 s, and every process
    that imports :mod:`krylovjax.precompute` imports this module whether or not it solves
    with spsolve.
    """
    import scipy.sparse.linalg as spla

    for ix in np.ndindex(*op.batch_shape):
        if active is not None and not active[ix]:
            continue
        t0 = time.perf_counter()
        A = op.to_scipy(ix).tocsc()
        t1 = time.perf_counter()
        rhs = np.asarray(b[ix], np.float64).ravel()
        x = spla.spsolve(A, rhs) if solver == "spsolve" else spla.splu(A).solve(rhs)
        yield ix, A, x.reshape(op.grid_shape), t1 - t0, time.perf_counter() - t1


def _solve_all(op: FPOperator, b, solver: str) -> DirectResult:
    b = np.asarray(b, np.float64)
    batch = op.batch_shape
    if b.shape != batch + op.grid_shape:
        raise ValueError(f"b: expected shape {batch + op.grid_shape}, got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("b: expected finite values, found NaN or Inf")
    x, res = np.zeros(b.shape), np.zeros(batch)
    assembly_s = solve_s = 0.0
    for ix, A, xi, ta, ts in _direct(op, b, solver):
        x[ix] = xi
        assembly_s, solve_s = assembly_s + ta, solve_s + ts
        rhs = b[ix].ravel()
        nb = np.linalg.norm(rhs)
        r = A @ x[ix].ravel()
        res[ix] = np.linalg.norm(rhs - r) / nb if nb > 0 else np.linalg.norm(r)
    return DirectResult(x=x, residual=res, seconds=solve_s, assembly_seconds=assembly_s)


def spsolve(op: FPOperator, b) -> DirectResult:
    """Solve ``A_i x_i = b_i`` for every system with ``scipy.sparse.linalg.spsolve`` (SuperLU).

    Args:
      op: the batch of operators (any batch shape).
      b: right-hand sides ``[*batch, H, W]``.
    """
    return _solve_all(op, b, "spsolve")


def splu(op: FPOperator, b) -> DirectResult:
    """As :func:`spsolve` but with an explicit ``scipy.sparse.linalg.splu`` factorisation."""
    return _solve_all(op, b, "splu")


def spsolve_in_jit(op: FPOperator, b, active=None, *, check_finite: bool = True):
    """``spsolve`` callable from jitted code (a ``jax.pure_callback`` to the host).

    Lets the pre-computation pipeline run its reference strategy through the same compiled time
    loop as the Krylov strategies. One ``to_scipy(i).tocsc()`` assembly and
    ``scipy.sparse.linalg.spsolve`` per system, as :func:`spsolve`.

    Args:
      op: the batch of operators (any batch shape).
      b: right-hand sides ``[*batch, H, W]``.
      active: optional ``[*batch]`` bool: only these systems are solved (as Paper B's code
        skips converged images); the others come back as 0. Default: all.
      check_finite: raise ``ValueError`` (from the callback, so the caller sees JAX's
        ``JaxRuntimeError``, a ``RuntimeError`` whose message holds it) when an active ``b``
        holds NaN or Inf; False passes them to scipy (the pipeline then sees a non-finite
        solution and reports the image, instead of aborting the run).

    Returns ``x`` with ``b``'s shape and dtype.
    """
    import jax
    import jax.numpy as jnp
    import scipy.sparse.linalg  # noqa: F401 - here, at trace time (precompile), not in the first timed solve

    if active is None:
        active = jnp.ones(op.batch_shape, bool)
    leaves, treedef = jax.tree_util.tree_flatten(op)

    def host(b_host, active_host, *leaves_host):
        op_host = jax.tree_util.tree_unflatten(treedef, [np.asarray(a) for a in leaves_host])
        b_host, active_host = np.asarray(b_host), np.asarray(active_host, bool)
        if check_finite and not np.all(np.isfinite(b_host[active_host])):
            raise ValueError("b: expected finite values, found NaN or Inf")
        x = np.zeros(b_host.shape, b_host.dtype)
        for ix, _, xi, _, _ in _direct(op_host, b_host, "spsolve", active_host):
            x[ix] = xi
        return x

    return jax.pure_callback(host, jax.ShapeDtypeStruct(b.shape, b.dtype), b, active, *leaves,
                             vmap_method="sequential")


def block_rows_scipy(A, grid_shape, bandwidth: int, newton: int = 8):
    """``y -> M^{-1} y`` of the block factorisation by grid rows with banded approximate
    inverses, from an assembled (scipy) matrix ``A`` in dense algebra, row by row: the
    independent reference of :func:`krylovjax.preconditioners.block_line_preconditioner`.

    The rows' ``T_j = A_jj - N_j G_{j-1} S_{j-1}`` are formed in order (``N_j``, ``S_j`` the
    diagonal blocks coupling row ``j`` to rows ``j-1`` and ``j+1``), each ``G_j`` by ``newton``
    Newton-Schulz steps ``G <- band(2G - G T_j G)`` from the diagonal's inverse (half-width
    ``bandwidth``), then ``M^{-1} y`` by the forward and backward sweeps over the rows.
    """
    H, W = (int(s) for s in grid_shape)
    A = A.tocsr()
    band = np.abs(np.subtract.outer(np.arange(W), np.arange(W))) <= bandwidth
    G, N, S = [], [], []
    for j in range(H):
        rows = slice(j * W, (j + 1) * W)
        T = A[rows, rows].toarray()
        N.append(A[rows, (j - 1) * W:j * W].diagonal() if j > 0 else np.zeros(W))
        S.append(A[rows, (j + 1) * W:(j + 2) * W].diagonal() if j < H - 1 else np.zeros(W))
        if j > 0:
            T -= N[j][:, None] * G[j - 1] * S[j - 1][None, :]
        g = np.diag(1.0 / np.diag(T))
        for _ in range(newton):
            g = np.where(band, 2 * g - g @ T @ g, 0.0)
        G.append(g)

    def apply(y):
        r = np.asarray(y, np.float64).reshape(H, W)
        z, x = np.zeros_like(r), np.zeros_like(r)
        for j in range(H):
            z[j] = G[j] @ (r[j] - (N[j] * z[j - 1] if j else 0.0))
        for j in reversed(range(H)):
            x[j] = z[j] - (G[j] @ (S[j] * x[j + 1]) if j < H - 1 else 0.0)
        return x.ravel()

    return apply
