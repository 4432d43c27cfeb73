"""Small helpers shared by the solver tests: dense batched operators and one system of a batch."""
import jax
import jax.numpy as jnp
import numpy as np


def dense_matvec(A):
    """``[B, N, N]`` matrices acting on ``[B, N]`` vectors."""
    A = jnp.asarray(A)
    return lambda x: jnp.einsum("bij,bj->bi", A, x, precision=jax.lax.Precision.HIGHEST)


def random_well_conditioned(seed, B, N, scale=0.3):
    """``I + scale G / sqrt(N)`` per system, ``G`` standard normal: nonsymmetric, its
    eigenvalues in a disc of radius about ``scale`` around 1."""
    rng = np.random.default_rng(seed)
    return np.eye(N)[None] + scale * rng.standard_normal((B, N, N)) / np.sqrt(N)


def take_system(op, i):
    """System ``i`` of a batched operator (a pytree of ``[B, ...]`` arrays), kept as a batch of one."""
    return jax.tree_util.tree_map(lambda a: a[i:i + 1], op)
