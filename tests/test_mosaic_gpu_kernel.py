"""The Mosaic GPU (TMA + WGMMA) kernel ``x @ W.T``: in Mosaic GPU's interpreter on CPU, and lowered for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantize_jax as qj
from quantize_jax.kernels import mosaic_gpu


def _operands(m, k, n, group, seed=0):
    w = jax.random.normal(jax.random.key(seed), (n, k)) * jax.random.uniform(jax.random.key(seed + 1), (n, 1), minval=0.1, maxval=3)
    x = jax.random.normal(jax.random.key(seed + 2), (m, k), jnp.bfloat16)
    return x, qj.quantize(w, qj.QuantSpec(axis=1, group_size=group))


def _reference(x, q):
    return np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q), np.float64).T


@pytest.mark.parametrize(
    "m, k, n, group, options",
    [
        (1, 256, 64, 128, dict()),
        (3, 512, 128, 128, dict(splits=2, stages=2)),  # two splits of two steps, each step its own group
        (16, 512, 64, 256, dict(splits=2)),  # two steps a group
        (9, 256, 128, None, dict(splits=2)),  # one scale a row
        (8, 192, 64, 64, dict(splits=3, stages=1)),  # groups under 128 columns: a step per group
        (64, 384, 64, 64, dict(stages=3)),
    ],
)
def test_matches_the_reference(m, k, n, group, options):
    x, q = _operands(m, k, n, group, seed=m + k)
    y = mosaic_gpu.matmul_nt(x, q, interpret=True, **options)
    ref = _reference(x, q)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    # int4 codes times bf16 activations are exact; only the float32 sums' order differs
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max() * np.sqrt(k))


def test_default_splits_fill_the_gpu():
    assert mosaic_gpu.default_splits(8192, 8192, 128) == 4  # 128 programs of 64 rows, times 4
    assert mosaic_gpu.default_splits(64, 8192, 128) == 64  # one row block: K split into 64 steps
    assert mosaic_gpu.default_splits(64, 384, 128) == 1  # three steps do not halve


@pytest.mark.parametrize("m, k, group", [(1, 8192, 128), (64, 1024, None), (20, 512, 64)])
def test_lowers_for_cuda(m, k, group):
    """The compiled branch (WGMMA with A in registers, explicit layouts), which the interpreter does not run,
    lowers to a Mosaic GPU custom call on a machine without a GPU."""
    x, q = _operands(m, k, 128, group)
    exported = jax.export.export(jax.jit(mosaic_gpu.matmul_nt), platforms=["cuda"])(x, q)
    assert "mosaic_gpu" in exported.mlir_module()
    assert exported.out_avals[0].shape == (m, 128)


@pytest.mark.parametrize(
    "x_shape, x_dtype, w_shape, spec, match",
    [
        ((2, 256), jnp.bfloat16, (64, 128), qj.QuantSpec(axis=1), "x has 256 columns, q 128"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(format="nf4", axis=1), "only int4"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(format="uint4", axis=1), "only int4"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=0), "axis=1"),
        ((2, 256), jnp.float32, (64, 256), qj.QuantSpec(axis=1), "bfloat16"),
        ((65, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1), "1 to 64 rows"),
        ((2, 256), jnp.bfloat16, (96, 256), qj.QuantSpec(axis=1), "multiple of 64"),
        ((2, 200), jnp.bfloat16, (64, 200), qj.QuantSpec(axis=1), "whole steps"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1, group_size=48), "whole steps"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1, group_size=32), "a multiple of 64"),
    ],
)
def test_bad_input_names_it(x_shape, x_dtype, w_shape, spec, match):
    x = jnp.ones(x_shape, x_dtype)
    q = qj.quantize(jnp.ones(w_shape), spec)
    with pytest.raises(ValueError, match=match) as info:
        mosaic_gpu.matmul_nt(x, q, interpret=True)
    assert "matmul_nt" in str(info.value) and str(x_shape) in str(info.value)
