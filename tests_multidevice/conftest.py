"""Multi-device tests: 8 simulated CPU devices, in their own pytest invocation (see the README's test command)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", params=["auto", "explicit"])
def mesh(request):
    """A (data=2, model=4) mesh with Auto axes (GSPMD propagation) or Explicit ones (JAX's default)."""
    if jax.device_count() != 8:
        pytest.fail(f"these tests need 8 devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                    f"(found {jax.device_count()})")
    kind = jax.sharding.AxisType.Auto if request.param == "auto" else jax.sharding.AxisType.Explicit
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
