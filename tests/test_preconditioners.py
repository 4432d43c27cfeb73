"""The shared-diffusion preconditioner is the exact inverse of the zero-score operator."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as spla

from krylovjax.fokker_planck import fp_operator
from krylovjax.preconditioners import diffusion_preconditioner, jacobi, shared_diffusion_inverse


@pytest.mark.parametrize("boundary", ["zero", "dirichlet", "reflect"])
@pytest.mark.parametrize("grid", [(6, 9), (8, 8)])
def test_exact_inverse_of_shared_part(boundary, grid):
    rng = np.random.default_rng(0)
    gv = np.zeros((3, grid[0] + 2, grid[1] + 2)) if boundary == "dirichlet" else None
    op = fp_operator(jnp.array([0.5, 2.0, 25.0]), 0.05, jnp.array([1.0, 0.5, 2.0]),
                     grid_shape=grid, batch_shape=(3,), boundary=boundary, boundary_values=gv)
    P = diffusion_preconditioner(op)
    x = rng.normal(size=(3,) + grid)
    for i in range(3):  # against scipy's solve of the assembled matrix
        ref = spla.spsolve(op.to_scipy(i).tocsc(), x[i].ravel())
        np.testing.assert_allclose(np.asarray(P(jnp.asarray(x)))[i].ravel(), ref, atol=1e-12)


def test_float32_and_scalar_k():
    P = shared_diffusion_inverse(jnp.float32(0.3), (5, 4))
    x = jnp.ones((2, 5, 4), jnp.float32)
    assert P(x).dtype == jnp.float32


def test_paper_b_rejected_and_jacobi():
    op = fp_operator(1.0, 0.1, 1.0, np.zeros((2, 2, 4, 4)), scheme="paper_b")
    with pytest.raises(ValueError, match="scheme"):
        diffusion_preconditioner(op)
    x = jnp.ones((2, 4, 4))
    np.testing.assert_allclose(jacobi(op)(x), 1.0 / (1 + 2 * 0.1))
