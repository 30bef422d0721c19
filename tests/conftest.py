"""Test settings, as equinox does: warnings are errors (pyproject), implicit rank promotion raises."""

import os

import hypothesis
import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# No shrinking: every example compiles, so shrinking a failure can take minutes; the report shows the example.
_PHASES = (hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate)
hypothesis.settings.register_profile(
    "ci", max_examples=40, deadline=None, phases=_PHASES, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.register_profile("dev", max_examples=15, deadline=None, phases=_PHASES)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")

FORMATS = ("int4", "uint4", "nf4", "fp4")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Run a function eagerly and under jax.jit (static args by keyword through functools.partial)."""
    return jax.jit if request.param else (lambda f, **kw: f)
