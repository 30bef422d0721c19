import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantize_jax as qj

from .conftest import FLOAT_DTYPES, FORMATS

GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "golden_torch.json").read_text())


def _unhex(values, shape=None):
    a = np.array([float.fromhex(v) for v in values], np.float32)
    return a if shape is None else a.reshape(shape)


def test_round_ste_rounds_half_to_even_with_unit_gradient(maybe_jit):
    x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49])
    assert maybe_jit(qj.round_ste)(x).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0]
    assert jax.grad(lambda v: (qj.round_ste(v) * jnp.arange(7.0)).sum())(x).tolist() == list(range(7))


def test_stochastic_round_is_unbiased_and_reproducible():
    x = jnp.full((20000,), -1.3)
    key = jax.random.key(7)
    r = qj.stochastic_round(x, key)
    assert set(np.unique(r).tolist()) == {-2.0, -1.0}
    assert abs(float(r.mean()) + 1.3) < 0.02
    np.testing.assert_array_equal(r, jax.jit(qj.stochastic_round)(x, key))
    assert jax.grad(lambda v: qj.stochastic_round(v, key).sum())(x[:3]).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"q{c['qmin']}_{c['qmax']}")
def test_fake_quant_equals_torch_bit_for_bit(case, maybe_jit):
    shape = tuple(GOLDEN["shape"])
    x = jnp.asarray(_unhex(GOLDEN["x"], shape))
    scale = _unhex(GOLDEN["scale"])
    fmt = "int4" if case["qmin"] == -8 else "uint4"
    spec = qj.QuantSpec(format=fmt, axis=1)  # one scale per row: torch's channel axis 0
    zp = np.asarray(case["zero_point"], np.float32)[:, None]
    kw = {"zero_point": zp} if fmt == "uint4" else {}
    fq = maybe_jit(lambda x, s, **k: qj.fake_quant(x, spec, scale=s, **k))
    y = fq(x, jnp.asarray(scale[:, None]), **kw)
    np.testing.assert_array_equal(np.asarray(y), _unhex(case["per_channel"], shape))
    per_tensor = qj.QuantSpec(format=fmt)
    kw_t = {"zero_point": float(zp[1, 0])} if fmt == "uint4" else {}
    yt = qj.fake_quant(x, per_tensor, scale=float(scale[1]), **kw_t)
    np.testing.assert_array_equal(np.asarray(yt), _unhex(case["per_tensor"], shape))
    # PyTorch's gradient mask for x.
    gx = jax.grad(lambda x: qj.fake_quant(x, spec, scale=jnp.asarray(scale[:, None]), **kw).sum())(x)
    np.testing.assert_array_equal(np.asarray(gx).ravel(), np.asarray(case["grad_mask"], np.float32))


def test_x_gradient_is_the_clipping_mask():
    x = jnp.array([-10.0, -8.4, -8.6, 0.3, 7.4, 7.6, 20.0])
    g = jax.grad(lambda x: (qj.fake_quant(x, qj.QuantSpec(), scale=1.0) * jnp.arange(1.0, 8.0)).sum())(x)
    # round(-8.4) = -8 is inside, round(-8.6) = -9 is not; round(7.4) = 7 inside, round(7.6) = 8 not.
    assert g.tolist() == [0.0, 2.0, 0.0, 4.0, 5.0, 0.0, 0.0]


def test_lsq_scale_gradient_matches_the_formula():
    x = jnp.array([[0.26, -1.0, 0.74, 2.0, -5.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    s = jnp.array([[0.25], [0.1]])
    g = jax.grad(lambda s: qj.fake_quant(x, qj.QuantSpec(axis=1), scale=s).sum())(s)
    y = np.asarray(x, np.float64) / np.asarray(s, np.float64)
    q = np.round(y)
    inside = (q >= -8) & (q <= 7)
    per_elem = np.where(inside, q - y, np.where(q < -8, -8.0, 7.0))
    np.testing.assert_allclose(g, per_elem.sum(axis=1, keepdims=True), rtol=1e-5)
    assert g.shape == s.shape


def test_lsq_zero_point_gradient_and_grouped_scale_gradient():
    x = jnp.array([-3.0, 0.1, 0.9, 2.0, 40.0, 0.2])
    spec = qj.QuantSpec(format="uint4", axis=0, group_size=4)
    s = jnp.array([0.5, 1.0])
    z = jnp.array([2.0, 3.0])
    gs, gz = jax.grad(lambda s, z: qj.fake_quant(x, spec, scale=s, zero_point=z).sum(), argnums=(0, 1))(s, z)
    # group 0: x/s = [-6, .2, 1.8, 4] -> codes [-4->clip, 2, 4, 6]: first below range
    # group 1: x/s = [40, .2] -> codes [43->clip, 3]: first above range
    np.testing.assert_allclose(gs, [(0 - 2) + (0 - 0.2) + (2 - 1.8) + 0.0, (15 - 3) + (0 - 0.2)], rtol=1e-6)
    np.testing.assert_allclose(gz, [-0.5, -1.0], rtol=1e-6)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_lsq_gradient(fmt):
    x = jnp.array([0.3, -0.9, 10.0])
    levels = np.asarray(qj.get_format(fmt).levels, np.float64)
    top = levels.max()
    s = 1.0
    g = jax.grad(lambda s: qj.fake_quant(x, qj.QuantSpec(format=fmt), scale=s).sum())(jnp.float32(s))
    y = np.asarray(x, np.float64)
    near = np.array([levels[np.argmin(np.abs(levels - v))] for v in y])
    expect = sum(near[i] - y[i] if abs(y[i]) <= top else top for i in range(3))
    np.testing.assert_allclose(float(g), expect, rtol=1e-5)


def test_computed_scale_gets_no_gradient_and_x_is_straight_through():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    g = jax.grad(lambda x: (qj.fake_quant(x, qj.QuantSpec(axis=0)) * 3.0).sum())(x)
    np.testing.assert_array_equal(g, jnp.full_like(x, 3.0))  # absmax never clips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtype_is_kept_and_jit_equals_eager(fmt, dtype):
    x = (jax.random.normal(jax.random.key(1), (6, 20)) * 3).astype(dtype)
    spec = qj.QuantSpec(format=fmt, axis=1, group_size=8)
    y = qj.fake_quant(x, spec)
    assert y.dtype == jnp.dtype(dtype) and y.shape == x.shape
    np.testing.assert_array_equal(y, jax.jit(qj.fake_quant, static_argnums=1)(x, spec))
    g = jax.grad(lambda x: qj.fake_quant(x, spec).astype(jnp.float32).sum())(x)
    assert g.dtype == jnp.dtype(dtype)


def test_bad_explicit_scales_are_refused_with_their_shape():
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"scale: shape \(3,\) does not fit x of shape \(4, 6\) with this spec"):
        qj.fake_quant(x, qj.QuantSpec(axis=0), scale=jnp.ones(3))
    with pytest.raises(ValueError, match=r"needs zero_point when scale is given"):
        qj.fake_quant(x, qj.QuantSpec(format="uint4"), scale=1.0)
    with pytest.raises(ValueError, match=r"is symmetric and takes no zero_point"):
        qj.fake_quant(x, qj.QuantSpec(), scale=1.0, zero_point=0.0)
    with pytest.raises(TypeError, match=r"fake_quant: x must be a floating-point array, got dtype int8"):
        qj.fake_quant(jnp.ones(3, jnp.int8))
