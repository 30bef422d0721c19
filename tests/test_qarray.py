import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantize_jax as qj

from .conftest import FLOAT_DTYPES, FORMATS

_METHODS = {"int4": "absmax", "uint4": "minmax", "nf4": "absmax", "fp4": "absmax"}


@st.composite
def _array_and_spec(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    fmt = draw(st.sampled_from(FORMATS))
    kind = draw(st.sampled_from(["tensor", "axis", "group"]))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    if kind == "tensor":
        spec = qj.QuantSpec(format=fmt)
    elif kind == "axis":
        spec = qj.QuantSpec(format=fmt, axis=axis)
    else:
        spec = qj.QuantSpec(format=fmt, axis=axis, group_size=draw(st.integers(1, 8)))
    method = draw(st.sampled_from([_METHODS[fmt], "mse", "percentile"]))
    return jnp.asarray(x), qj.QuantSpec(format=fmt, axis=spec.axis, group_size=spec.group_size, method=method)


@given(_array_and_spec())
def test_dequantize_of_quantize_equals_fake_quant_bit_for_bit(case):
    x, spec = case
    q = qj.quantize(x, spec)
    np.testing.assert_array_equal(qj.dequantize(q), qj.fake_quant(x, spec))


@given(_array_and_spec())
def test_error_bound_inside_the_range(case):
    x, spec = case
    if spec.format not in ("int4", "uint4") or spec.method != _METHODS[spec.format]:
        return  # the bound holds where absmax / minmax guarantee no clipping
    q = qj.quantize(x, spec)
    from quantize_jax import _layout

    lay = _layout.layout(x.shape, spec)
    s = _layout.from_groups(
        jnp.broadcast_to(_layout.scale_to_groups(q.scale, lay), _layout.to_groups(x, lay).shape), lay
    )
    err = jnp.abs(qj.dequantize(q) - x)
    assert bool(jnp.all(err <= s * (0.5 + 1e-5) + 1e-30))


def test_structure_and_nbytes_of_a_grouped_weight():
    w = jax.random.normal(jax.random.key(0), (256, 96))
    q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=128))
    assert q.packed.shape == (256, 48) and q.packed.dtype == jnp.uint8
    assert q.scale.shape == (2, 96) and q.zero_point is None
    assert q.nbytes == 256 * 48 + 2 * 96 * 4
    assert q.bits_per_value == pytest.approx(4.25)
    q8 = qj.quantize(w, qj.QuantSpec(format="uint4", axis=0, group_size=128, scale_dtype="bfloat16"))
    assert q8.nbytes == 256 * 48 + 2 * 2 * 96 * 2


def test_odd_last_axis_keeps_its_true_length():
    x = jnp.arange(15.0).reshape(3, 5) - 7
    q = qj.quantize(x, qj.QuantSpec(axis=1))
    assert q.packed.shape == (3, 3) and q.codes().shape == (3, 5)
    np.testing.assert_array_equal(qj.dequantize(q), qj.fake_quant(x, q.spec))


def test_as_int4_is_a_free_bitcast_of_the_codes():
    w = jax.random.normal(jax.random.key(2), (8, 16))
    q = qj.quantize(w, qj.QuantSpec(axis=0))
    i4 = q.as_int4()
    assert i4.dtype == jnp.int4 and i4.shape == (8, 16)
    np.testing.assert_array_equal(i4.astype(jnp.int8), q.codes())
    with pytest.raises(ValueError, match=r"as_int4: the last axis of shape \(2, 3\) is odd"):
        qj.quantize(jnp.ones((2, 3))).as_int4()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dequantize_returns_the_original_dtype_or_the_given_one(dtype):
    x = jnp.linspace(-1, 1, 32, dtype=dtype).reshape(4, 8)
    q = qj.quantize(x, qj.QuantSpec(axis=1))
    assert qj.dequantize(q).dtype == jnp.dtype(dtype)
    assert qj.dequantize(q, jnp.float32).dtype == jnp.float32
    assert q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_pytree_through_jit_vmap_and_scan():
    spec = qj.QuantSpec(axis=0, group_size=4)
    w = jax.random.normal(jax.random.key(3), (3, 8, 6))
    q = jax.jit(qj.quantize, static_argnums=1)(w[0], spec)
    np.testing.assert_array_equal(jax.jit(qj.dequantize)(q), qj.dequantize(qj.quantize(w[0], spec)))
    stacked = jax.vmap(lambda a: qj.quantize(a, spec))(w)
    assert stacked.packed.shape == (3, 8, 3)
    out = jax.vmap(qj.dequantize)(stacked)
    np.testing.assert_array_equal(out[1], qj.dequantize(qj.quantize(w[1], spec)))
    _, ys = jax.lax.scan(lambda c, qi: (c, qj.dequantize(qi).sum()), 0.0, stacked)
    assert ys.shape == (3,)
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 2  # packed and scale; no zero point


def test_export_round_trip_with_a_qarray_argument():
    w = jax.random.normal(jax.random.key(4), (16, 8))
    q = qj.quantize(w, qj.QuantSpec(format="uint4", axis=0))
    x = jnp.ones((2, 16))
    f = jax.jit(lambda x, q: x @ qj.dequantize(q))
    exp = jax.export.export(f, platforms=["cpu", "tpu"])(x, q)
    restored = jax.export.deserialize(exp.serialize())
    np.testing.assert_array_equal(restored.call(x, q), f(x, q))


def test_bad_input_is_named():
    with pytest.raises(TypeError, match=r"quantize: x must be a floating-point array, got dtype int32 of shape \(4,\)"):
        qj.quantize(jnp.arange(4))
    with pytest.raises(ValueError, match=r"quantize: x must have at least one dimension"):
        qj.quantize(jnp.float32(1.0))
    with pytest.raises(TypeError, match=r"dequantize: expected a QArray, got ArrayImpl"):
        qj.dequantize(jnp.ones(3))
    with pytest.raises(TypeError, match=r"dequantize: dtype must be a floating-point dtype, got int32"):
        qj.dequantize(qj.quantize(jnp.ones(4)), jnp.int32)  # would truncate the values
    for fn in (qj.quantize, qj.fake_quant, qj.compute_scale):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: spec must be a QuantSpec \(or None\), got dict"):
            fn(jnp.ones((4, 4)), {"axis": 0})


def test_import_does_not_load_flax_until_asked():
    import subprocess
    import sys

    code = ("import sys, quantize_jax as qj; a = 'flax' in sys.modules; qj.nnx; qj.linen; "
            "print(a, 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
