import jax
import jax.numpy as jnp
import pytest

import quantize_jax as qj


def test_defaults_and_format_default_method():
    s = qj.QuantSpec()
    assert (s.format, s.axis, s.group_size, s.method, s.scale_dtype) == ("int4", None, None, "absmax", "float32")
    assert qj.QuantSpec(format="uint4").method == "minmax"
    assert qj.QuantSpec(format="nf4", method="mse").method == "mse"


def test_frozen_hashable_and_normalised():
    a = qj.QuantSpec(axis=[0, 1])
    b = qj.QuantSpec(axis=(0, 1))
    assert a == b and hash(a) == hash(b) and a.axis == (0, 1)
    assert qj.QuantSpec(axis=(1,)).axis == 1
    assert qj.QuantSpec(scale_dtype=jnp.bfloat16).scale_dtype == "bfloat16"
    with pytest.raises(Exception):
        a.format = "nf4"


def test_static_argument_of_jit_does_not_retrace():
    traces = []

    def g(x, spec):
        traces.append(spec)
        return qj.fake_quant(x, spec)

    x = jnp.ones((4, 8))
    for f in (jax.jit(g, static_argnums=1), jax.jit(g)):  # a static argument, or a pytree without leaves
        traces.clear()
        f(x, qj.QuantSpec(axis=0))
        f(x, qj.QuantSpec(axis=0))
        assert len(traces) == 1
        f(x, qj.QuantSpec(axis=1))
        assert len(traces) == 2
    assert jax.tree_util.tree_leaves(qj.QuantSpec()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "int8"}, r"format: unknown 4-bit format 'int8'"),
        ({"axis": "0"}, r"axis: expected an int, a tuple of ints or None, got '0'"),
        ({"axis": (0, 0)}, r"axis: repeated axes in \(0, 0\)"),
        ({"axis": (0, 1), "group_size": 32}, r"group_size: grouping needs a single reduced axis, got axis=\(0, 1\)"),
        ({"group_size": 32}, r"group_size: grouping needs a single reduced axis, got axis=None"),
        ({"axis": 0, "group_size": 0}, r"group_size: expected a positive int or None, got 0"),
        ({"axis": 0, "group_size": 2.5}, r"group_size: expected a positive int or None, got 2.5"),
        ({"method": "max"}, r"method: unknown calibration method 'max'"),
        ({"method": "minmax"}, r"method: 'minmax' needs a format with a zero point \('uint4'\), got format='int4'"),
        ({"scale_dtype": "int8"}, r"scale_dtype: expected float32, bfloat16 or float16, got 'int8'"),
        ({"percentile": 20}, r"percentile: expected a value in \(50, 100\], got 20"),
        ({"mse_steps": 0}, r"mse_steps: expected a positive int, got 0"),
        ({"mse_min_ratio": 0.0}, r"mse_min_ratio: expected a value in \(0, 1\], got 0.0"),
    ],
)
def test_bad_fields_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qj.QuantSpec(**kwargs)


def test_axis_out_of_range_names_shape():
    with pytest.raises(ValueError, match=r"axis: axis 2 is out of range for x of shape \(3, 7\)"):
        qj.quantize(jnp.ones((3, 7)), qj.QuantSpec(axis=2))
