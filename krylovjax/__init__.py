"""krylovjax: score pre-computation for diffusion models via the log-density Fokker-Planck
equation and cross-matrix Krylov projection, in JAX.

The operators, solvers and preconditioners are imported eagerly; the scipy reference solvers
(``reference``), the pre-computation (``precompute``, ``initial``, ``transport``) and the
heavier stages (``models``, ``training``, ``sampling``, ``metrics``, ``ddpm``, ``store``,
``data``) load on first access. Importing
krylovjax never imports TensorFlow or the experiment binaries.
"""

import importlib

from krylovjax import fokker_planck, krylov, preconditioners, scores, sde
from krylovjax.cross_matrix import (
    PRESETS,
    SeedBasis,
    SolverConfig,
    cross_matrix_solve,
    seed_basis,
    solve_fp,
)
from krylovjax.fokker_planck import FPOperator, fp_operator
from krylovjax.krylov import KrylovResult, Status, arnoldi, bicgstab, gmres, linear_solve
from krylovjax.preconditioners import (block_line_preconditioner, diffusion_preconditioner, jacobi,
                                       line_preconditioner)
from krylovjax.sde import ConstantSDE, VESDE, VPSDE, get_sde, time_grid

__version__ = "0.1.0"

_LAZY_MODULES = ("reference", "data", "initial", "transport", "precompute", "store", "metrics", "sampling", "workdir_lock",
                 "ddpm", "models", "training", "cross_matrix")
_LAZY_ATTRS = {
    "precompute_scores": "precompute",
    "precompile": "precompute",
    "PrecomputeConfig": "precompute",
    "PrecomputeResult": "precompute",
    "embed": "transport",
    "initial_log_density": "initial",
    "ScoreStore": "store",
}


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"krylovjax.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"krylovjax.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module 'krylovjax' has no attribute {name!r}")


__all__ = [
    "ConstantSDE", "FPOperator", "KrylovResult", "PRESETS", "SeedBasis", "SolverConfig",
    "Status", "VESDE", "VPSDE", "arnoldi", "bicgstab", "block_line_preconditioner", "cross_matrix_solve",
    "diffusion_preconditioner",
    "fp_operator", "get_sde", "gmres", "jacobi", "line_preconditioner", "linear_solve",
    "seed_basis", "solve_fp",
    "time_grid", "precompute_scores", "precompile", "PrecomputeConfig", "PrecomputeResult", "embed",
    "initial_log_density", "ScoreStore",
] + list(_LAZY_MODULES)
