"""Test configuration: float64 on, several CPU devices for sharding tests."""
import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="session")
def _enable_x64():
    """x64 is on for every test; library code must still work in float32."""
    jax.config.update("jax_enable_x64", True)
    yield
