import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantize_jax as qj
from quantize_jax.lora import LowRankEinsum

from .conftest import einsums

@settings(max_examples=12)  # each example compiles its shapes; CI time (40 took 32 s, 20: 26 s)
@given(einsums(), st.integers(1, 3))
def test_the_adapter_is_the_einsum_over_its_low_rank_kernel(einsum, rank):
    """einsum(einsum(x, a), b) == einsum(x, W) with W = einsum(a, b) in the kernel's own axis order."""
    einsum_str, sizes = einsum
    lr = LowRankEinsum.of(einsum_str)
    (x_sub, w_sub), _ = einsum_str.split("->")[0].split(","), None
    a_shape, b_shape = lr.adapter_shapes(tuple(sizes[c] for c in w_sub), rank)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], tuple(sizes[c] for c in x_sub))
    a, b = jax.random.normal(keys[1], a_shape), jax.random.normal(keys[2], b_shape)
    w = jnp.einsum(lr.kernel_delta, a, b)
    assert w.shape == tuple(sizes[c] for c in w_sub)
    np.testing.assert_allclose(lr(x, a, b), jnp.einsum(einsum_str, x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lr)(x, a, b), lr(x, a, b), rtol=1e-6, atol=1e-6)
    a_al, b_al = (jax.random.normal(k, s) for k, s in zip(keys[1:], lr.aligned_shapes(w.shape, rank)))
    w_al = qj.lora.low_rank_weight(a_al, b_al, w.shape)  # in the kernel's own axes: broadcast, sum over r
    np.testing.assert_allclose(w_al, (np.asarray(a_al) * np.asarray(b_al)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lr(x, a_al, b_al), jnp.einsum(einsum_str, x, w_al), rtol=1e-5, atol=1e-5)


def test_subscripts_of_gemma_style_projections():
    lr = LowRankEinsum.of("BTNH, NHD -> BTD")  # spaces are ignored
    assert (lr.batch, lr.contracted, lr.produced, lr.a, lr.b) == ("", "NH", "D", "NHa", "aD")
    heads = LowRankEinsum.of("BNTH,NHD->BNTD")
    assert (heads.batch, heads.a, heads.b, heads.kernel_delta) == ("N", "NHa", "NaD", "NHa,NaD->NHD")
    assert LowRankEinsum.of("abc,cd->abd").rank == "e"  # a letter the einsum does not use
    with pytest.raises(ValueError, match=r"kernel_shape=\(4, 8\) does not match the subscripts 'NHD'"):
        lr.adapter_shapes((4, 8), 2)


@pytest.mark.parametrize("einsum_str, message", [
    ("BTD,DF", "must read 'inputs,kernel->output'"),
    ("BTD,DF,FG->BTG", "must read 'inputs,kernel->output'"),
    ("BTD,D...F->BTF", "must be distinct letters"),
    ("BTD,DDF->BTF", "must be distinct letters"),
    ("BTD,DFZ->BTF", r"kernel axes \['Z'\] of 'BTD,DFZ->BTF' are summed over the kernel alone"),
    ("BTD,D->BT", "must contract an axis of the inputs and produce one of the output"),
    ("BTF,F->BTF", "must contract an axis of the inputs and produce one of the output"),
])
def test_low_rank_einsum_refuses_what_has_no_rank_r_adapter(einsum_str, message):
    with pytest.raises(ValueError, match=message):
        LowRankEinsum.of(einsum_str)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4", "fp4"])
def test_merge_low_rank_rounds_the_sum_to_the_weights_own_spec(fmt):
    w = jax.random.normal(jax.random.key(0), (4, 16, 8))  # kernel "NDH"
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=(0, 1)))
    a, b = jax.random.normal(jax.random.key(1), (16, 2)), jax.random.normal(jax.random.key(2), (2, 4, 8))
    merged = qj.lora.merge_low_rank(q, a, b, subscripts="Dr,rNH->NDH")
    expected = qj.quantize(qj.dequantize(q) + jnp.einsum("dr,rnh->ndh", a, b), q.spec)
    assert merged.spec == q.spec and merged.shape == q.shape
    np.testing.assert_allclose(qj.dequantize(merged), qj.dequantize(expected), rtol=1e-6)  # up to the sums' order
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), q, q)  # two layers: "..." takes the stack axis
    both = qj.lora.merge_low_rank(stacked, jnp.stack([a, 0 * a]), jnp.stack([b, b]), subscripts="Dr,rNH->NDH")
    np.testing.assert_allclose(qj.dequantize(both)[0], qj.dequantize(merged), rtol=1e-6)  # a batched dot's sums
    unchanged = qj.quantize(qj.dequantize(q), q.spec)  # a zero adapter: q re-rounded (fp4's -0 becomes +0)
    np.testing.assert_array_equal(qj.dequantize(both)[1], qj.dequantize(unchanged))


def test_merge_low_rank_names_the_shapes_that_do_not_fit():
    q = qj.quantize(jnp.ones((8, 6)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match=r"low_rank_weight: the adapters a \(8, 2\) and b \(2, 5\) make no weight of "
                                         r"the kernel's shape \(8, 6\)"):
        qj.lora.merge_low_rank(q, jnp.ones((8, 2)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"a \(8, 2\) and b \(2, 6\) make no weight of the kernel's shape \(8, 6\)"):
        qj.lora.merge_low_rank(q, jnp.ones((8, 2)), jnp.ones((2, 6)), subscripts="kr,rn->nk")
