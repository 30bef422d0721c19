"""Multi-device tests: 8 simulated CPU devices, in their own pytest invocation (see the README's test command)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def mesh():
    if jax.device_count() != 8:
        pytest.fail(f"these tests need 8 devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                    f"(found {jax.device_count()})")
    # Auto axes: GSPMD propagates shardings (explicit-sharding meshes are not supported by qdot yet).
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(auto, auto))
