import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantize_jax as qj


def test_golden_bytes_even_element_in_low_nibble():
    codes = jnp.array([[1, -2, 3, -8], [7, 0, -1, 5]], jnp.int8)
    packed = qj.pack_int4(codes, axis=-1)
    # 1 | (0xE << 4) = 0xE1, 3 | (0x8 << 4) = 0x83; 7 | 0 = 0x07, 0xF | (5 << 4) = 0x5F
    assert packed.tolist() == [[0xE1, 0x83], [0x07, 0x5F]]
    assert qj.pack_int4(codes, axis=0).tolist() == [[0x71, 0x0E, 0xF3, 0x58]]
    assert qj.unpack_int4(packed, signed=False).tolist() == [[1, 14, 3, 8], [7, 0, 15, 5]]


def test_packing_matches_xla_int4_layout():
    codes = jnp.arange(-8, 8, dtype=jnp.int8).reshape(2, 8)
    as_int4 = jax.lax.bitcast_convert_type(qj.pack_int4(codes), jnp.int4).reshape(2, 8)
    np.testing.assert_array_equal(as_int4.astype(jnp.int8), codes)


@settings(max_examples=12)  # each example compiles; CI time (session 15's VM: 16 min at 20)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9),
    data=st.data(),
    signed=st.booleans(),
)
def test_round_trip_any_shape_and_axis(shape, data, signed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = data.draw(hnp.arrays(np.int8 if signed else np.uint8, shape, elements=st.integers(lo, hi)))
    packed = qj.pack_int4(jnp.asarray(codes), axis=axis)
    n = shape[axis]
    assert packed.dtype == jnp.uint8 and packed.shape[axis] == (n + 1) // 2
    back = qj.unpack_int4(packed, axis=axis, signed=signed, length=n)
    np.testing.assert_array_equal(back, codes)
    jitted = jax.jit(qj.unpack_int4, static_argnames=("axis", "signed", "length"))
    np.testing.assert_array_equal(jitted(jax.jit(qj.pack_int4, static_argnames="axis")(codes, axis=axis),
                                         axis=axis, signed=signed, length=n), codes)


def test_odd_length_pads_one_zero_nibble():
    packed = qj.pack_int4(jnp.array([[-1, -1, -1]], jnp.int8))
    assert packed.tolist() == [[0xFF, 0x0F]]
    assert qj.unpack_int4(packed).tolist() == [[-1, -1, -1, 0]]


def test_out_of_range_codes_are_refused_eagerly_and_masked_under_jit():
    with pytest.raises(ValueError, match=r"pack_int4: codes of dtype int32 must lie in \[-8, 7\], found 9"):
        qj.pack_int4(jnp.array([1, 9], jnp.int32))
    with pytest.raises(ValueError, match=r"pack_int4: codes of dtype uint8 must lie in \[0, 15\], found 16"):
        qj.pack_int4(jnp.array([16, 0], jnp.uint8))
    # Under jit each code is masked to 4 bits: 0x19 -> 0x9 in its own nibble, the neighbour untouched.
    packed = jax.jit(qj.pack_int4)(jnp.array([0x19, 0x3], jnp.int32))
    assert packed.tolist() == [0x39]


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match=r"pack_int4: codes must be an integer array .* got dtype float32 of shape \(2,\)"):
        qj.pack_int4(jnp.ones(2))
    with pytest.raises(ValueError, match=r"pack_int4: axis 2 is out of range for shape \(3, 7\)"):
        qj.pack_int4(jnp.zeros((3, 7), jnp.int8), axis=2)
    with pytest.raises(TypeError, match=r"unpack_int4: packed must be uint8, got dtype int8"):
        qj.unpack_int4(jnp.zeros(3, jnp.int8))
    with pytest.raises(ValueError, match=r"unpack_int4: length 9 does not fit axis -1 of packed shape \(3,\)"):
        qj.unpack_int4(jnp.zeros(3, jnp.uint8), length=9)
