import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
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


@settings(max_examples=12)  # each example compiles; CI time (session 15's VM: 16 min at 20)
@given(_array_and_spec())
def test_dequantize_of_quantize_equals_fake_quant_bit_for_bit(case):
    x, spec = case
    q = qj.quantize(x, spec)
    np.testing.assert_array_equal(qj.dequantize(q), qj.fake_quant(x, spec))


@settings(max_examples=12)  # each example compiles; CI time (session 15's VM: 16 min at 20)
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
    assert stacked.packed.shape == (3, 8, 3) and stacked.shape == (3, 8, 6)
    out = jax.vmap(qj.dequantize)(stacked)
    np.testing.assert_array_equal(out[1], qj.dequantize(qj.quantize(w[1], spec)))
    _, ys = jax.lax.scan(lambda c, qi: (c, qj.dequantize(qi).sum()), 0.0, stacked)
    assert ys.shape == (3,)
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 2  # packed and scale; no zero point


@pytest.mark.parametrize("fmt, layer_axis, group, n", [("int4", 0, 16, 24), ("uint4", 0, None, 23), ("nf4", None, None, 24),
                                                     ("int4", -1, 8, 24)])
def test_a_stack_of_layers_scans_and_vmaps_into_per_layer_qarrays(fmt, layer_axis, group, n):
    """A QArray over stacked layers ``(L, K, N)`` (quantized whole, under ``vmap``, or stacked by a tree
    map) is one and the same, and ``scan`` / ``vmap`` over it hand each step the layer's own QArray:
    shape ``(K, N)`` and the per-layer spec, as ``quantize(w[i], spec)`` gives."""
    layer_spec = qj.QuantSpec(format=fmt, axis=layer_axis, group_size=group)
    w = jax.random.normal(jax.random.key(5), (3, n, n))
    layers = [qj.quantize(w[i], layer_spec) for i in range(3)]
    by_vmap = jax.vmap(lambda a: qj.quantize(a, layer_spec))(w)
    by_stack = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    stacked_axis = None if layer_axis is None else layer_axis if layer_axis < 0 else layer_axis + 1
    whole = qj.quantize(w, qj.QuantSpec(format=fmt, axis=(1, 2) if layer_axis is None else stacked_axis, group_size=group))
    for q in (by_vmap, by_stack, whole):
        assert q.shape == (3, n, n) and q.nbytes == sum(layer.nbytes for layer in layers)
        assert jax.tree.structure(q) == jax.tree.structure(whole)
        jax.tree.map(np.testing.assert_array_equal, q, whole)
    specs = []

    def step(x, q):
        specs.append((q.shape, q.spec))
        return jnp.tanh(qj.qdot(x, q)), None

    x = jax.random.normal(jax.random.key(6), (2, n))
    y, _ = jax.lax.scan(step, x, whole)
    assert specs == [((n, n), layer_spec)]
    expected = x
    for layer in layers:
        expected = jnp.tanh(qj.qdot(expected, layer))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    per_layer = jax.vmap(qj.qdot, in_axes=(None, 0))(x, whole)
    np.testing.assert_allclose(per_layer, jnp.stack([qj.qdot(x, layer) for layer in layers]), rtol=1e-6, atol=1e-6)
    first_two = jax.tree.map(lambda a: a[:2], whole)  # a slice of the stack, and one layer of it
    assert first_two.shape == (2, n, n) and first_two.spec == whole.spec
    np.testing.assert_array_equal(qj.dequantize(first_two), qj.dequantize(whole)[:2])
    assert jax.tree.structure(jax.tree.map(lambda a: a[2], whole)) == jax.tree.structure(layers[2])
    assert jax.tree.map(lambda a: a.sum(), whole).shape == whole.shape  # leaves that fit no stack: as they were


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


def test_repr_names_the_leaves_a_tree_map_left():
    q = qj.quantize(jnp.ones((4, 6)), qj.QuantSpec(axis=1))
    assert repr(q).endswith("group_size=None, nbytes=28)")
    shapes = jax.tree.map(lambda a: a.shape, q)  # a common way to look at a tree: leaves are tuples now
    assert repr(shapes).endswith("packed=(4, 3), scale=(4, 1), zero_point=None)")


@st.composite
def _table_spec_and_indices(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    fmt = draw(st.sampled_from(FORMATS))
    axis = draw(st.integers(0, len(shape) - 1))
    kind = draw(st.sampled_from(["tensor", "axis", "group"]))
    spec = {"tensor": qj.QuantSpec(format=fmt), "axis": qj.QuantSpec(format=fmt, axis=axis),
            "group": qj.QuantSpec(format=fmt, axis=axis, group_size=draw(st.integers(1, 4)))}[kind]
    take_axis = draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[take_axis]
    idx = draw(hnp.arrays(np.int32, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
                          elements=st.integers(-n - 2, n + 1)))  # in range, from the end, and out of range
    return jnp.asarray(x), spec, take_axis, jnp.asarray(idx)


@settings(max_examples=12)  # each example compiles its shapes; CI time (40 took 34 s, 20: 21 s)
@given(_table_spec_and_indices())
def test_take_equals_take_of_the_dequantized_array(case):
    x, spec, axis, idx = case
    q = qj.quantize(x, spec)
    expected = jnp.take(qj.dequantize(q), idx, axis=axis)  # NaN rows for indices outside [-n, n)
    np.testing.assert_array_equal(qj.take(q, idx, axis=axis), expected)
    np.testing.assert_array_equal(jax.jit(qj.take, static_argnames="axis")(q, idx, axis=axis), expected)


def test_take_decodes_only_the_rows_it_returns():
    table = jax.random.normal(jax.random.key(0), (4096, 64), jnp.bfloat16)
    ids = jnp.array([[7, 4095, 0]])
    for spec in (qj.QuantSpec(axis=1, group_size=32), qj.QuantSpec(format="nf4", axis=0)):
        q = qj.quantize(table, spec)
        rows = qj.take(q, ids)
        assert rows.shape == (1, 3, 64) and rows.dtype == jnp.bfloat16
        np.testing.assert_array_equal(rows, qj.dequantize(q)[ids])
        assert qj.take(q, ids, dtype=jnp.float32).dtype == jnp.float32
        # The decoding is fused into the gather: no buffer for the decoded table, not even a row of it.
        memory = jax.jit(qj.take).lower(q, ids).compile().memory_analysis()
        assert memory.temp_size_in_bytes < 64 * 4


def test_take_bad_input_is_named():
    q = qj.quantize(jnp.ones((4, 6)), qj.QuantSpec(axis=1))
    with pytest.raises(ValueError, match=r"take: axis 2 is out of range for q of shape \(4, 6\)"):
        qj.take(q, jnp.array([0]), axis=2)
    with pytest.raises(TypeError, match="take: indices must be integers, got dtype float32"):
        qj.take(q, jnp.array([0.0]))
    with pytest.raises(TypeError, match="take: dtype must be a floating-point dtype, got int8"):
        qj.take(q, jnp.array([0]), dtype=jnp.int8)
    with pytest.raises(TypeError, match="take: expected a QArray, got ArrayImpl"):
        qj.take(jnp.ones((4, 6)), jnp.array([0]))


def test_import_does_not_load_flax_until_asked():
    import subprocess
    import sys

    code = ("import sys, quantize_jax as qj; a = 'flax' in sys.modules; qj.nnx; qj.linen; "
            "print(a, 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
