"""Test settings, as equinox does: warnings are errors (pyproject), implicit rank promotion raises."""

import os

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import quantize_jax as qj

jax.config.update("jax_numpy_rank_promotion", "raise")

# No shrinking: every example compiles, so shrinking a failure can take minutes; the report shows the example.
_PHASES = (hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate)
hypothesis.settings.register_profile(
    "ci", max_examples=40, deadline=None, phases=_PHASES, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.register_profile("dev", max_examples=15, deadline=None, phases=_PHASES)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")

FORMATS = ("int4", "uint4", "nf4", "fp4")
# The Pallas kernels' custom call, which jax.export checks for unless told it may: exported here without a GPU.
TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# ``x @ W`` over shapes that are multiples of no block: ``group`` None is per tensor, 0 per output channel.
PRODUCTS = dict(m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 70), fmt=st.sampled_from(FORMATS),
                group=st.sampled_from([None, 0, 32, 48, 64, 128, 256]))


def product_operands(m, k, n, fmt, group):
    """Activations ``(m, k)`` and the quantized weight ``(k, n)`` of a :data:`PRODUCTS` example."""
    w = jax.random.normal(jax.random.key(k * 1000 + n), (k, n))
    x = jax.random.normal(jax.random.key(m), (m, k))
    if group is None:
        return x, qj.quantize(w, qj.QuantSpec(format=fmt))
    return x, qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=group or None))


# Roles of an einsum's letters, "x,w->y": batch (in all three), contracted (x and w), produced (w and y),
# free (x and y), summed (x alone).
_ROLES = ("batch", "contracted", "produced", "free", "summed")


@st.composite
def einsums(draw, roles=_ROLES[:4]):
    """A random einsum ``"x,w->y"`` that contracts and produces at least one axis of ``w``: each letter's
    role, order and size (1-3) drawn; returns ``(einsum_str, {letter: size})``."""
    letters = "ABCDEF"[: draw(st.integers(2, 6))]
    drawn = draw(st.lists(st.sampled_from(roles), min_size=len(letters), max_size=len(letters)))
    role = dict(zip(letters, drawn))
    role[letters[0]], role[letters[1]] = "contracted", "produced"
    on = lambda *kinds: [c for c in letters if role[c] in kinds]  # noqa: E731
    x, w, y = (draw(st.permutations(on(*kinds))) for kinds in (("batch", "contracted", "free", "summed"),
                                                                ("batch", "contracted", "produced"),
                                                                ("batch", "produced", "free")))
    sizes = {c: draw(st.integers(1, 3)) for c in letters}
    return "".join(x) + "," + "".join(w) + "->" + "".join(y), sizes


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Run a function eagerly and under jax.jit (static args by keyword through functools.partial)."""
    return jax.jit if request.param else (lambda f, **kw: f)


# (dtype, param_dtype) of 16-bit models: compute in bf16 over float32 or bf16 parameters, bf16 parameters
# promoted to float32 inputs, and float16 throughout.
SIXTEEN_BIT_MODELS = [(jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (None, jnp.bfloat16),
                      (jnp.float16, jnp.float16)]


def assert_serves_like_16_bit_qat(out, ref, dtype, param_dtype, act_spec):
    """A served 16-bit model's outputs against its QAT model's: the dtype the Flax layer computes in, and
    values within a few roundings of the 16-bit dtype (QAT rounds the decoded kernel and its products to
    it, the packed products sum ``(q - z) * s`` in float32); for W4A8 an int8 token may move by one (taken
    from the inputs before or after their 16-bit cast)."""
    assert ref.dtype == (dtype or jnp.float32) and out.dtype == ref.dtype
    eps = float(jnp.finfo(dtype or param_dtype).eps)
    if act_spec == "int8":
        eps = max(eps, 1 / 127)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.abs(out - ref).max() <= 8 * eps * np.abs(ref).max()
