import jax.numpy as jnp
import numpy as np
import pytest

import quantize_jax as qj
from quantize_jax.formats import dequantize_codes, quantize_to_codes


def test_levels_and_ranges():
    assert qj.get_format("int4").decode(jnp.arange(-8, 8)).tolist() == list(range(-8, 8))
    assert sorted(qj.get_format("fp4").levels) == sorted(
        [-6, -4, -3, -2, -1.5, -1, -0.5, -0.0, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    )
    nf4 = qj.get_format("nf4").levels
    assert nf4[0] == -1.0 and nf4[7] == 0.0 and nf4[15] == 1.0 and list(nf4) == sorted(nf4)
    assert (qj.get_format("uint4").qmin, qj.get_format("uint4").qmax) == (0.0, 15.0)


def test_int4_rounds_half_to_even_and_clips():
    y = jnp.array([-9.0, -8.5, -7.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.5, 100.0])
    codes = quantize_to_codes(y, 1.0, None, qj.get_format("int4"))
    assert codes.dtype == jnp.int8
    assert codes.tolist() == [-8, -8, -8, 0, 0, 2, 2, 6, 7, 7]


def test_uint4_adds_zero_point_after_rounding():
    fmt = qj.get_format("uint4")
    codes = quantize_to_codes(jnp.array([-3.5, -0.5, 0.5, 2.5, 12.0]), 1.0, 3.0, fmt)
    # round(-3.5) = -4 -> -1 -> clip 0; round(-.5) = 0 -> 3; round(.5) = 0 -> 3; round(2.5) = 2 -> 5; 15 -> 15
    assert codes.tolist() == [0, 3, 3, 5, 15]
    assert dequantize_codes(codes, 2.0, 3.0, fmt).tolist() == [-6.0, 0.0, 0.0, 4.0, 24.0]


def test_fp4_codes_are_e2m1_bit_patterns_with_ties_to_even():
    fmt = qj.get_format("fp4")
    y = jnp.array([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, -0.3, -100.0])
    codes = quantize_to_codes(y, 1.0, None, fmt)
    # 0.25 -> 0 (even), 0.75 -> 1.0, 1.25 -> 1.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 7 -> 6 (saturates), -0.3 -> -0.5
    assert codes.tolist() == [0b0000, 0b0010, 0b0010, 0b0100, 0b0110, 0b0110, 0b0111, 0b1001, 0b1111]
    import ml_dtypes

    as_e2m1 = np.asarray(codes, np.uint8).view(np.uint8)
    assert [float(ml_dtypes.float4_e2m1fn(v)) for v in [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, -0.5, -6.0]] == (
        dequantize_codes(jnp.asarray(as_e2m1), 1.0, None, fmt).tolist()
    )


def test_nf4_nearest_level_ties_go_down():
    fmt = qj.get_format("nf4")
    lv = np.asarray(fmt.levels, np.float32)
    mid = (lv[7] + lv[8]) / 2
    y = jnp.array([-2.0, lv[3], mid, np.nextafter(mid, np.float32(1)), 0.99, 5.0], jnp.float32)
    assert quantize_to_codes(y, 1.0, None, fmt).tolist() == [0, 3, 7, 8, 15, 15]


def test_unknown_format_names_it():
    with pytest.raises(ValueError, match=r"format: unknown 4-bit format 'int3'"):
        qj.get_format("int3")


def test_fp4_matches_ml_dtypes_conversion_everywhere():
    import ml_dtypes

    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(size=20000) * 4, np.arange(-64, 65) / 8, [-0.0, 0.0, -0.1, 1e-30, -7.0, 100.0]])
    y = y.astype(np.float32)
    ref = np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    np.testing.assert_array_equal(quantize_to_codes(jnp.asarray(y), 1.0, None, qj.get_format("fp4")), ref)
