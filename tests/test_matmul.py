import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantize_jax as qj
from quantize_jax import matmul
from quantize_jax.matmul import PALLAS_MAX_M, PALLAS_MAX_M_FLOAT32

from .conftest import FORMATS, PRODUCTS, TRITON_CALL, einsums, product_operands

BACKENDS = ("xla", "chunked", "native", "dequant", "pallas", "auto")


def _reference(x, q):
    return np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q, jnp.float32), np.float64)


@settings(max_examples=6)  # each example compiles; CI time (session 14's VM: 15 min at the previous counts)
@given(**PRODUCTS, backend=st.sampled_from(BACKENDS))
def test_every_backend_matches_the_reference(m, k, n, fmt, group, backend):
    x, q = product_operands(m, k, n, fmt, group)
    y = jax.jit(lambda x, q: qj.qdot(x, q, backend=backend))(x, q)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _reference(x, q), rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [0, 96, 384, 1024])  # per channel; several groups, one, part of one per chunk
def test_cpu_chunks_cover_long_k(fmt, group):
    w = jax.random.normal(jax.random.key(21), (1100, 19))  # K over three 512-row chunks, not a multiple of them
    x = jax.random.normal(jax.random.key(22), (4, 1100))
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=group or None))
    np.testing.assert_allclose(qj.qdot(x, q, backend="chunked"), _reference(x, q), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group", [0, 64, 128])
def test_cpu_column_blocks_cover_wide_weights(group):
    w = jax.random.normal(jax.random.key(23), (130, 4099))  # 2050 packed columns: three tiles, the last 2 wide
    x = jax.random.normal(jax.random.key(24), (3, 130))
    q = qj.quantize(w, qj.QuantSpec(format="uint4", axis=0, group_size=group or None))
    np.testing.assert_allclose(qj.qdot(x, q, backend="chunked"), _reference(x, q), rtol=1e-5, atol=1e-4)
    integer = qj.qdot(x, q, backend="xla", act_quant="int8")
    y = qj.qdot(x, q, backend="chunked", act_quant="int8")
    np.testing.assert_allclose(y, integer, rtol=1e-5, atol=1e-5 * np.abs(integer).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_scales_along_other_axes_fall_back_exactly(backend):
    w = jax.random.normal(jax.random.key(0), (40, 24))
    x = jax.random.normal(jax.random.key(1), (3, 40))
    for spec in (qj.QuantSpec(axis=1), qj.QuantSpec(axis=1, group_size=8)):
        q = qj.quantize(w, spec)
        np.testing.assert_allclose(qj.qdot(x, q, backend=backend), _reference(x, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "fp4"])
def test_w4a8_equals_int8_activations_times_the_dequantized_weight(fmt):
    w = jax.random.normal(jax.random.key(2), (200, 30))
    x = jax.random.normal(jax.random.key(3), (5, 200)) * 3
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=64))
    sx = np.abs(np.asarray(x)).max(-1, keepdims=True) / 127
    xq = np.clip(np.round(np.asarray(x) / sx), -127, 127) * sx
    y = qj.qdot(x, q, act_quant="int8")
    np.testing.assert_allclose(y, _reference(xq, q), rtol=1e-4, atol=1e-3)
    rel = np.abs(np.asarray(y) - _reference(x, q)).max() / np.abs(_reference(x, q)).max()
    assert 0 < rel < 0.03  # W4A8 changes the numerics, by little


@settings(max_examples=6)  # each example compiles; CI time (session 14's VM: 15 min at the previous counts)
@given(m=st.integers(1, 9), vocab=st.integers(1, 700), d=st.integers(1, 70), fmt=st.sampled_from(FORMATS),
       layout=st.sampled_from(["row", "row_groups", "column", "column_groups", "tensor"]),
       backend=st.sampled_from(["auto", "chunked", "dequant", "xla", "native"]))
def test_products_over_the_packed_axis_match_the_reference(m, vocab, d, fmt, layout, backend):
    """``"md,vd->mv"`` (tied embedding logits): the weight contracted over its last, packed axis."""
    spec = {"row": qj.QuantSpec(format=fmt, axis=1), "row_groups": qj.QuantSpec(format=fmt, axis=1, group_size=5),
            "column": qj.QuantSpec(format=fmt, axis=0), "column_groups": qj.QuantSpec(format=fmt, axis=0, group_size=7),
            "tensor": qj.QuantSpec(format=fmt)}[layout]
    q = qj.quantize(jax.random.normal(jax.random.key(vocab), (vocab, d)), spec)
    x = jax.random.normal(jax.random.key(m), (m, d))
    y = jax.jit(lambda x, q: qj.qeinsum("md,vd->mv", x, q, backend=backend))(x, q)
    ref = np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q), np.float64).T
    assert y.shape == (m, vocab) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.sqrt(d))


def test_products_over_the_packed_axis_block_by_block():
    table = jax.random.normal(jax.random.key(7), (3000, 2048))  # 256-row blocks: 12, the last one short
    q = qj.quantize(table, qj.QuantSpec(format="uint4", axis=1, group_size=128))
    x = jax.random.normal(jax.random.key(8), (2, 5, 2048)).astype(jnp.bfloat16)
    y = qj.qeinsum("btd,vd->btv", x, q)
    assert y.shape == (2, 5, 3000) and y.dtype == jnp.float32
    ref = np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q), np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(qj.qeinsum("btd,vd->vbt", x, q), np.moveaxis(ref, -1, 0), rtol=1e-4, atol=1e-3)
    # dequant (auto off the CPU): the table rounded to bf16 like the activations, float32 sums
    y16 = qj.qeinsum("btd,vd->btv", x, q, backend="dequant")
    ref16 = np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q, jnp.bfloat16), np.float64).T
    np.testing.assert_allclose(y16, ref16, rtol=1e-4, atol=1e-3)
    # The decoded table never exists: no float array of its size in the compiled CPU program.
    hlo = jax.jit(lambda x, q: qj.qeinsum("btd,vd->btv", x, q)).lower(x, q).compile().as_text()
    float_sizes = [np.prod([int(v) for v in dims.split(",") if v]) for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
    assert max(float_sizes) < table.size // 8
    grad = jax.grad(lambda x: qj.qeinsum("btd,vd->btv", x, q).sum())(x.astype(jnp.float32))
    np.testing.assert_allclose(grad, np.broadcast_to(np.asarray(qj.dequantize(q)).sum(0), x.shape), rtol=1e-4, atol=1e-3)


def test_batch_dims_dtype_promotion_and_gradient():
    w = jax.random.normal(jax.random.key(4), (16, 8))
    q = qj.quantize(w, qj.QuantSpec(axis=0))
    x = jax.random.normal(jax.random.key(5), (2, 3, 16)).astype(jnp.bfloat16)
    y = qj.qdot(x, q)
    assert y.shape == (2, 3, 8) and y.dtype == jnp.float32  # promoted as jnp.matmul(bf16, f32)
    assert qj.qdot(jnp.ones((2, 16), jnp.int32), q).dtype == jnp.float32
    g = jax.grad(lambda x: qj.qdot(x, q).sum())(jnp.ones((3, 16)))
    np.testing.assert_allclose(g, np.tile(np.asarray(qj.dequantize(q)).sum(1), (3, 1)), rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis, group", [(0, None), (0, 96), (1, None), (1, 4), (None, None)])
def test_gradients_for_every_format_and_scale_layout(fmt, axis, group):
    """The tangent ``dx @ dequantize(q)``, forward and reverse, over K that spans several blocks of rows."""
    w = jax.random.normal(jax.random.key(31), (1100, 13))
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=axis, group_size=group))
    x = jax.random.normal(jax.random.key(32), (3, 1100))
    g = jax.random.normal(jax.random.key(33), (3, 13))
    w_hat = np.asarray(qj.dequantize(q), np.float64)
    _, pullback = jax.vjp(lambda x: qj.qdot(x, q), x)
    np.testing.assert_allclose(pullback(g)[0], np.asarray(g, np.float64) @ w_hat.T, rtol=1e-5, atol=1e-5)
    _, tangent = jax.jit(lambda x, dx: jax.jvp(lambda x: qj.qdot(x, q), (x,), (dx,)))(x, x)
    np.testing.assert_allclose(tangent, np.asarray(x, np.float64) @ w_hat, rtol=1e-5, atol=1e-4)


def test_pallas_backward_is_the_transposed_kernel():
    """With ``backend="pallas"`` reverse mode's ``g @ W.T`` runs the transposed kernel (interpreted here);
    its primitive's own rules give a Hessian-vector product (forward over reverse) and vmap. (bf16 dots:
    the kernel's own tests.)"""
    w = jax.random.normal(jax.random.key(40), (200, 40))
    q = qj.quantize(w, qj.QuantSpec(format="uint4", axis=0, group_size=64))  # zero points too
    x = jax.random.normal(jax.random.key(41), (5, 200))
    c = jax.random.normal(jax.random.key(42), (5, 40))
    w_hat = np.asarray(qj.dequantize(q), np.float64)
    grad = jax.jit(jax.grad(lambda x: (qj.qdot(x, q, backend="pallas").astype(jnp.float32) * c).sum()))
    assert "qdot_int4_transposed" in grad.lower(x).as_text(debug_info=True)
    want = np.asarray(c, np.float64) @ w_hat.T
    assert (np.abs(np.asarray(grad(x), np.float64) - want) <= 1e-6 * (np.abs(c) @ np.abs(w_hat).T) + 1e-6).all()
    f = lambda x: (qj.qdot(x, q, backend="pallas") ** 2).sum()  # noqa: E731
    _, hv = jax.jvp(jax.grad(f), (x,), (c @ w_hat.T.astype(np.float32),))  # H v = 2 (v W) W.T
    v = np.asarray(c, np.float64) @ w_hat.T
    want = 2 * (v @ w_hat) @ w_hat.T
    np.testing.assert_allclose(hv, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    batched = jax.vmap(jax.grad(lambda x: qj.qdot(x, q, backend="pallas").sum()))(x[:, None])
    np.testing.assert_allclose(batched[:, 0], np.broadcast_to(w_hat.sum(1), x.shape), rtol=1e-5, atol=1e-5)


def test_pallas_gradients_of_a_weight_scaled_per_row_run_the_kernels():
    """``qdot`` over ``W`` with one scale per row (``axis=1``: the forward is the reference), ``pallas``:
    reverse mode's ``g @ W.T`` is the transposed kernel, forward mode's ``dx @ W`` the forward kernel over
    the codes (both interpreted here), each with the row scales applied outside it."""
    q = qj.quantize(jax.random.normal(jax.random.key(60), (96, 40)), qj.QuantSpec(format="uint4", axis=1))
    x, c = jax.random.normal(jax.random.key(61), (4, 96)), jax.random.normal(jax.random.key(62), (4, 40))
    f = lambda x: qj.qdot(x, q, backend="pallas")  # noqa: E731
    w_hat = np.asarray(qj.dequantize(q), np.float64)
    grad = jax.jit(lambda x, c: jax.vjp(f, x)[1](c)[0])
    assert "qdot_int4_transposed" in grad.lower(x, c).as_text(debug_info=True)
    np.testing.assert_allclose(grad(x, c), np.asarray(c, np.float64) @ w_hat.T, rtol=1e-5, atol=1e-5)
    tangent = jax.jit(lambda x: jax.jvp(f, (x,), (x,))[1])
    assert "qdot_int4" in tangent.lower(x).as_text(debug_info=True)
    np.testing.assert_allclose(tangent(x), np.asarray(x, np.float64) @ w_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["row", "row_groups", "column_groups", "tensor"])
def test_tied_logits_with_pallas_run_the_transposed_kernel(fmt, layout):
    """``"md,vd->mv"`` with ``backend="pallas"`` (interpreted here): tables scaled per row (the embedding
    default: the codes' product scaled after the kernel, zero points taken off as ``z * sum(x)``), per
    column in groups of rows, or per tensor; groups along the contracted axis do not fit the kernel and
    take the reference. Forward, reverse (``ct @ W``) and forward mode."""
    spec = {"row": qj.QuantSpec(format=fmt, axis=1), "row_groups": qj.QuantSpec(format=fmt, axis=1, group_size=32),
            "column_groups": qj.QuantSpec(format=fmt, axis=0, group_size=64), "tensor": qj.QuantSpec(format=fmt)}[layout]
    q = qj.quantize(jax.random.normal(jax.random.key(50), (300, 72)), spec)
    x, c = jax.random.normal(jax.random.key(51), (5, 72)), jax.random.normal(jax.random.key(52), (5, 300))
    f = jax.jit(lambda x: qj.qeinsum("md,vd->mv", x, q, backend="pallas"))
    assert ("qdot_int4_transposed" in f.lower(x).as_text(debug_info=True)) == (layout != "row_groups")
    w_hat, x64, c64 = (np.asarray(a, np.float64) for a in (qj.dequantize(q), x, c))
    bound = 1e-6 * (np.abs(x64) @ np.abs(w_hat).T) + 1e-6
    assert (np.abs(np.asarray(f(x), np.float64) - x64 @ w_hat.T) <= bound).all()
    _, pullback = jax.vjp(f, x)
    np.testing.assert_allclose(pullback(c)[0], c64 @ w_hat, rtol=1e-5, atol=1e-5)
    _, tangent = jax.jvp(f, (x,), (2 * x,))
    assert (np.abs(np.asarray(tangent, np.float64) - 2 * x64 @ w_hat.T) <= 2 * bound).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tables_16_bit_backward_pass_runs_the_forward_kernel_over_its_codes(fmt):
    """The tied logits' backward pass ``c @ table`` over a table scaled per row, bf16, with ``pallas``
    (interpreted here; ``auto`` on CUDA): ``c * s`` in bf16 times the codes' values (nf4's rounded to
    bf16), float32 sums, less ``(c s) . z``, returned in bf16: within bf16's rounding of that model, and
    within 1% of the float64 product."""
    table = qj.quantize(jax.random.normal(jax.random.key(53), (300, 72)), qj.QuantSpec(format=fmt, axis=1))
    x = jax.random.normal(jax.random.key(54), (6, 72)).astype(jnp.bfloat16)
    c = jax.random.normal(jax.random.key(55), (6, 300))
    _, pullback = jax.vjp(lambda x: qj.qeinsum("md,vd->mv", x, table, backend="pallas"), x)
    got = np.asarray(pullback(c)[0], np.float64)
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)  # noqa: E731
    z = None if table.zero_point is None else jnp.zeros_like(table.zero_point)
    levels = bf16(qj.dequantize(qj.QArray(table.packed, jnp.ones_like(table.scale), z, table.shape, table.dtype,
                                          table.spec)))  # the codes' values: (c - 0) * 1
    cs = bf16(bf16(c) * np.asarray(table.scale, np.float64)[:, 0][None, :])
    want = cs @ levels - (0 if z is None else cs @ np.asarray(table.zero_point, np.float64))
    np.testing.assert_allclose(got, bf16(want), rtol=8e-3, atol=1e-6)
    reference = np.asarray(c, np.float64) @ np.asarray(qj.dequantize(table), np.float64)
    assert np.linalg.norm(got - reference) <= 1e-2 * np.linalg.norm(reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_operands_give_zeros_as_jnp_matmul(backend):
    for k, n in [(0, 4), (4, 0)]:  # nothing to contract; no output columns
        q = qj.quantize(jnp.zeros((k, n)), qj.QuantSpec(axis=0))
        x = jnp.ones((2, k))
        np.testing.assert_array_equal(qj.qdot(x, q, backend=backend), jnp.zeros((2, n)))
        assert jax.grad(lambda x: qj.qdot(x, q, backend=backend).sum())(x).shape == (2, k)
    table = qj.quantize(jnp.zeros((0, 4)), qj.QuantSpec(axis=1))
    assert qj.qeinsum("md,vd->mv", jnp.ones((2, 4)), table, backend=backend).shape == (2, 0)


@pytest.mark.parametrize("act_quant", [None, "int8"])
def test_forward_mode_and_what_reverse_mode_keeps(act_quant):
    w = jax.random.normal(jax.random.key(4), (64, 24))
    q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=16))
    x = jax.random.normal(jax.random.key(5), (3, 64))
    dx = jax.random.normal(jax.random.key(6), (3, 64))
    f = lambda x: qj.qdot(x, q, act_quant=act_quant)  # noqa: E731
    _, ty = jax.jvp(f, (x,), (dx,))  # straight through the int8 tokens, as the gradient
    np.testing.assert_allclose(ty, np.asarray(dx) @ np.asarray(qj.dequantize(q)), rtol=1e-5, atol=1e-5)
    hess = jax.hessian(lambda x: (f(x) ** 2).sum())(x[:1])
    assert hess.shape == (1, 64, 1, 64)
    _, pullback = jax.vjp(f, x)
    kept = [(a.size, a.dtype) for a in jax.tree_util.tree_leaves(pullback)]
    assert (64 * 12, jnp.uint8) in kept and not [n for n, d in kept if n >= 64 * 24]  # packed, not decoded


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_off_the_cpu_a_16_bit_gradient_multiplies_in_its_own_dtype(dtype, tied):
    """On GPU and TPU, the backward pass of a bf16 / f16 qdot (or tied logits ``"md,vd->mv"``) is one
    ``g @ W.T`` (``g @ W``) in that dtype over the decoded weight (lowered here for both), not a float32
    product; float32 keeps the highest precision. Its values: within the 16-bit rounding of the weight and
    of the gradient. (On NVIDIA GPUs a 16-bit qdot's backward takes the transposed kernel up to
    ``PALLAS_TRANSPOSED_MAX_M`` rows: the product here has one row more.)"""
    w = jax.random.normal(jax.random.key(8), (384, 256) if tied else (256, 384))
    q = qj.quantize(w, qj.QuantSpec(axis=1 if tied else 0, group_size=128))
    x = jax.random.normal(jax.random.key(9), (matmul.PALLAS_TRANSPOSED_MAX_M + 1, 256)).astype(dtype)
    product = (lambda x: qj.qeinsum("md,vd->mv", x, q)) if tied else (lambda x: qj.qdot(x, q))
    grad = jax.jit(jax.grad(lambda x: product(x).astype(jnp.float32).sum()))
    name = {jnp.bfloat16: "bf16", jnp.float16: "f16", jnp.float32: "f32"}[dtype]
    for platform in ("tpu", "cuda"):
        text = jax.export.export(grad, platforms=[platform], disabled_checks=[TRITON_CALL])(x).mlir_module()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) == 1 and "qdot_int4" not in text, dots
        # (on CUDA qdot's 16-bit weight, scaled along K, is decoded by the Pallas kernel; the table by XLA)
        kernel = platform == "cuda" and not tied and dtype != jnp.float32
        assert ('name = "dequantize_int4"' in text) == kernel
        assert re.findall(r"tensor<[\dx]+x(\w+)>", dots[0]) == [name] * 3, dots[0]
        assert ("HIGHEST" in dots[0]) == (dtype == jnp.float32), dots[0]
    if tied:  # the backward pass off the CPU, run here: ct @ W, the cotangent rounded to x's dtype
        g = matmul._decoded_product(jnp.ones((x.shape[0], 384), dtype), q)
    else:
        g = jax.grad(lambda x: matmul._decoded_product(x, q).sum())(x)
    w_hat = np.asarray(qj.dequantize(q), np.float64)
    eps = 1e-7 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)  # each weight and each sum rounded once
    error = np.abs(np.asarray(g, np.float64) - w_hat.sum(1 - tied))
    assert (error <= eps * 2 * np.abs(w_hat).sum(1 - tied)).all(), error.max()


def test_qeinsum_layouts():
    w = jax.random.normal(jax.random.key(6), (8, 3, 4))
    x = jax.random.normal(jax.random.key(7), (2, 5, 8))
    # per (h, k); groups along d; per d row (reference path); one scale per k shared by the heads
    # (QuantEinsum's default, broadcast over h for the flattened product); per tensor (uint4: zero points too)
    for spec in (qj.QuantSpec(axis=0), qj.QuantSpec(axis=0, group_size=4), qj.QuantSpec(axis=2),
                 qj.QuantSpec(axis=(0, 1)), qj.QuantSpec(format="uint4", axis=(0, 1)), qj.QuantSpec(format="uint4")):
        q = qj.quantize(w, spec)
        ref = jnp.einsum("btd,dhk->bthk", x, qj.dequantize(q))
        np.testing.assert_allclose(qj.qeinsum("btd,dhk->bthk", x, q), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(qj.qeinsum("btd,dhk->hbtk", x, q), jnp.einsum("btd,dhk->hbtk", x, qj.dequantize(q)),
                                   rtol=1e-5, atol=1e-5)
    w2 = jax.random.normal(jax.random.key(8), (3, 8, 4))  # contracted axis in the middle: reference path
    q2 = qj.quantize(w2, qj.QuantSpec(axis=1))
    np.testing.assert_allclose(qj.qeinsum("btd,hdk->bthk", x, q2),
                               jnp.einsum("btd,hdk->bthk", x, qj.dequantize(q2)), rtol=1e-5, atol=1e-5)


@st.composite
def _specs(draw, ndim: int, sizes):
    """A QuantSpec for a weight of ``sizes``: per tensor, some reduced axes, or groups along one axis."""
    fmt = draw(st.sampled_from(FORMATS))
    kind = draw(st.sampled_from(["tensor", "axes", "group"]))
    if kind == "tensor":
        return qj.QuantSpec(format=fmt)
    if kind == "group":
        axis = draw(st.integers(0, ndim - 1))
        return qj.QuantSpec(format=fmt, axis=axis, group_size=draw(st.integers(1, max(1, sizes[axis]))))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return qj.QuantSpec(format=fmt, axis=tuple(sorted(axes)))


@settings(max_examples=6)  # each example compiles; CI time (session 14's VM: 15 min at the previous counts)
@given(einsums(roles=("batch", "contracted", "produced", "free", "summed")), st.data(),
       st.sampled_from(("auto", "xla", "chunked", "dequant", "native")))
def test_qeinsum_of_any_layout_equals_the_einsum_over_the_dequantized_weight(einsum, data, backend):
    """Random einsums (kernel batch axes, axes summed over x alone, any order) and scale layouts: the fast
    paths (flattened qdot, transposed logits) where they apply, the reference elsewhere."""
    subscripts, sizes = einsum
    x_sub, w_sub = subscripts.split("->")[0].split(",")
    x = jax.random.normal(jax.random.key(0), tuple(sizes[c] for c in x_sub))
    w_shape = tuple(sizes[c] for c in w_sub)
    q = qj.quantize(jax.random.normal(jax.random.key(1), w_shape), data.draw(_specs(len(w_shape), w_shape)))
    ref = np.einsum(subscripts, np.asarray(x, np.float64), np.asarray(qj.dequantize(q), np.float64))
    y = jax.jit(lambda x, q: qj.qeinsum(subscripts, x, q, backend=backend))(x, q)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("subscripts", ["...d,dhk->...hk", "...d,dhk->hk...", "btd,dhk", "b...,dhk->b...hk",
                                        "...,dhk->...hk"])
def test_qeinsum_ellipsis_and_implicit_output_as_jnp_einsum(subscripts):
    q = qj.quantize(jax.random.normal(jax.random.key(6), (8, 3, 4)), qj.QuantSpec(axis=0, group_size=4))
    x = jax.random.normal(jax.random.key(7), (2, 5, 8))
    ref = jnp.einsum(subscripts, x, qj.dequantize(q), precision="highest")
    y = qj.qeinsum(subscripts, x, q)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("subscripts,message", [
    ("bd,df,fg->bg", "expected two operands"), ("b..d,df->bf", "'b..d' is not letters with at most one '...'"),
    ("bd,...f->bf", "an ellipsis in the QArray's subscripts"), ("bd,df->bz", "output 'bz' repeats a letter or names"),
    ("bcd,df->bf", "3 and 2 letters for 2 and 2 axes"), ("bd,df->...f", "an ellipsis in the output but not in x"),
])
def test_qeinsum_bad_subscripts_are_named(subscripts, message):
    q = qj.quantize(jnp.ones((8, 4)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match=re.escape(f"qeinsum: {message}") + ".*" + re.escape(repr(subscripts))):
        qj.qeinsum(subscripts, jnp.ones((2, 8)), q)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_weight_closed_over_by_jit_gives_the_products_of_a_weight_passed_in(fmt):
    """A jitted function that closes over a QArray makes its bytes compile-time constants. XLA's constant
    folding of the uint8 -> int4 bitcast (jax 0.10.2) kept only each byte's low nibble: ``native``,
    ``dequant`` and W4A8 read wrong codes (errors of 40 on products of size 10) until the bytes passed an
    optimization barrier first."""
    q = qj.quantize(jax.random.normal(jax.random.key(70), (72, 300)), qj.QuantSpec(format=fmt, axis=0, group_size=36))
    table = qj.quantize(jax.random.normal(jax.random.key(71), (300, 72)), qj.QuantSpec(format=fmt, axis=1))
    x = jax.random.normal(jax.random.key(72), (5, 72))
    products = {b: lambda x, q, b=b: qj.qdot(x, q, backend=b) for b in ("native", "dequant", "auto")}
    if fmt != "nf4":
        products["w4a8"] = lambda x, q: qj.qdot(x, q, act_quant="int8", backend="native")
    for name, product in products.items():  # (the same up to the sums' order: constants compile otherwise)
        np.testing.assert_allclose(jax.jit(lambda x: product(x, q))(x), jax.jit(product)(x, q), rtol=1e-5, atol=1e-4,
                                   err_msg=name)
    tied = lambda x, t: qj.qeinsum("md,vd->mv", x, t, backend="native")  # noqa: E731
    np.testing.assert_allclose(jax.jit(lambda x: tied(x, table))(x), jax.jit(tied)(x, table), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(jax.jit(lambda: q.as_int4().astype(jnp.int8))(), q.as_int4().astype(jnp.int8))


def test_export_for_cpu_and_tpu_reproduces_on_cpu():
    w = jax.random.normal(jax.random.key(9), (64, 32))
    q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=32))
    x = jax.random.normal(jax.random.key(10), (4, 64))
    f = jax.jit(qj.qdot)
    exp = jax.export.export(f, platforms=["cpu", "tpu"])(x, q)
    back = jax.export.deserialize(exp.serialize())
    np.testing.assert_array_equal(back.call(x, q), f(x, q))


@pytest.mark.parametrize("act_quant", [None, "int8"])
def test_auto_exports_cpu_cuda_and_tpu_together_with_the_kernel_for_cuda_alone(act_quant):
    w = jax.random.normal(jax.random.key(13), (256, 48))
    q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=128))
    f = jax.jit(lambda x, q: qj.qdot(x, q, act_quant=act_quant))
    for m, dtype in itertools.product((16, 64, 256), (jnp.bfloat16, jnp.float32)):
        # the Triton kernel on CUDA: up to PALLAS_MAX_M rows (float32: PALLAS_MAX_M_FLOAT32), any M for W4A8
        x = jax.random.normal(jax.random.key(m), (m, 256)).astype(dtype)
        exp = jax.export.export(f, platforms=["cpu", "cuda", "tpu"], disabled_checks=[TRITON_CALL])(x, q)
        most = PALLAS_MAX_M if dtype == jnp.bfloat16 else PALLAS_MAX_M_FLOAT32
        text = exp.mlir_module()
        kernel = m <= most or act_quant is not None
        assert ('name = "qdot_int4' in text) == kernel  # past it, dequant: the Pallas decoding kernel, XLA's dot
        assert ('name = "dequantize_int4"' in text) == (not kernel)
        np.testing.assert_array_equal(exp.call(x, q), f(x, q))  # the CPU branch, here


@pytest.mark.parametrize("fmt, group, dtype", [("int4", 128, jnp.bfloat16), ("uint4", None, jnp.bfloat16),
                                               ("nf4", 32, jnp.float16), ("fp4", 64, jnp.float32)])
def test_dequant_over_the_decoding_kernel_is_dequant_bit_for_bit(fmt, group, dtype):
    """``auto`` past the kernels' rows on CUDA, ``x @ W`` and the backward's ``g @ W.T``: the weight decoded
    by the Pallas decoding kernel (interpreted here), then XLA's dot; the same weight as XLA's decoding, so
    the same products, bit for bit. (The kernel equals ``dequantize`` in every format, group and dtype:
    test_pallas_kernel.py.)"""
    q = qj.quantize(jax.random.normal(jax.random.key(25), (256, 40)), qj.QuantSpec(format=fmt, axis=0, group_size=group))
    x = jax.random.normal(jax.random.key(26), (3, 256)).astype(dtype)
    grid = matmul._grid(q)
    np.testing.assert_array_equal(matmul._dequant(x, q, grid=grid, kernel=True, interpret=True),
                                  matmul._dequant(x, q, grid=grid))
    # the backward pass's g @ W.T past the transposed kernel's rows: the transpose of the decoded product
    g = jax.random.normal(jax.random.key(27), (3, 40))  # (the products' cotangent: float32)
    backward = [matmul._transpose_of(functools.partial(matmul._decoded_product, kernel=kernel, interpret=True),
                                     g, q, 256, dtype) for kernel in (True, False)]
    np.testing.assert_array_equal(*backward)


def test_a_16_bit_backward_on_cuda_is_the_transposed_kernel_up_to_its_rows():
    """Reverse mode's ``g @ W.T`` on CUDA: the transposed kernel for bf16 up to PALLAS_TRANSPOSED_MAX_M rows,
    not for float32 (past those rows: test_off_the_cpu_a_16_bit_gradient_multiplies_in_its_own_dtype)."""
    q = qj.quantize(jax.random.normal(jax.random.key(15), (256, 48)), qj.QuantSpec(axis=0, group_size=128))
    grad = jax.jit(jax.grad(lambda x: qj.qdot(x, q).astype(jnp.float32).sum()))
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.ones((matmul.PALLAS_TRANSPOSED_MAX_M, 256), dtype)
        text = jax.export.export(grad, platforms=["cuda"], disabled_checks=[TRITON_CALL])(x).mlir_module()
        assert ("qdot_int4_transposed" in text) == (dtype == jnp.bfloat16)


def test_tied_logits_on_cuda_take_the_transposed_kernel_up_to_its_rows():
    """``"md,vd->mv"`` over a table scaled per row (the embedding default) with ``auto``: on CUDA the transposed
    kernel for bf16 up to PALLAS_TRANSPOSED_MAX_M rows, in one export with the CPU's block-by-block path,
    which the CPU artifact runs; the kernel is lowered for CUDA alone."""
    q = qj.quantize(jax.random.normal(jax.random.key(16), (512, 128)), qj.QuantSpec(axis=1))
    f = jax.jit(lambda x: qj.qeinsum("md,vd->mv", x, q))
    for m, dtype in [(matmul.PALLAS_TRANSPOSED_MAX_M, jnp.bfloat16), (matmul.PALLAS_TRANSPOSED_MAX_M + 1, jnp.bfloat16),
                     (16, jnp.float32)]:
        x = jax.random.normal(jax.random.key(m), (m, 128)).astype(dtype)
        exp = jax.export.export(f, platforms=["cpu", "cuda"], disabled_checks=[TRITON_CALL])(x)
        assert ("qdot_int4_transposed" in exp.mlir_module()) == (m <= matmul.PALLAS_TRANSPOSED_MAX_M and dtype != jnp.float32)
        np.testing.assert_array_equal(exp.call(x), f(x))
    # the backward pass c @ table: the forward kernel over the codes, c * s rounded to bf16 (no decoded table)
    grad = jax.jit(jax.grad(lambda x: f(x).astype(jnp.float32).sum()))
    x = jnp.ones((matmul.PALLAS_TRANSPOSED_MAX_M, 128), jnp.bfloat16)
    text = jax.export.export(grad, platforms=["cuda"], disabled_checks=[TRITON_CALL])(x).mlir_module()
    assert "xla.gpu.triton" in text and "stablehlo.dot_general" not in text
    # a symbolic M (one artifact for every batch) takes XLA's paths, as qdot's auto does, forward and backward
    x = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 128"), jnp.bfloat16)
    for fn in (f, grad):
        assert "xla.gpu.triton" not in jax.export.export(fn, platforms=["cpu", "cuda", "tpu"])(x).mlir_module()


@pytest.mark.parametrize("spec", [qj.QuantSpec(axis=1), qj.QuantSpec(axis=1, group_size=128),
                                  qj.QuantSpec(format="uint4", axis=1)], ids=["row", "group128", "uint4"])
def test_tied_logits_lowered_beside_a_hopper_gpu_take_the_mosaic_gpu_kernel(monkeypatch, spec):
    """Where a Hopper GPU is present (faked here), ``auto``'s tied logits on CUDA over int4 tables without zero
    points, scaled per row or in groups along d, take Mosaic GPU's ``matmul_nt`` for bf16 up to
    MOSAIC_LOGITS_MAX_M rows; past them, for f16, or over uint4 tables, what they took before (the Triton
    kernel, or the dot over the decoded table). This machine has none, and takes none."""
    q = qj.quantize(jax.random.normal(jax.random.key(19), (512, 256)), spec)
    f = jax.jit(lambda x: qj.qeinsum("md,vd->mv", x, q))

    def lowered(m, dtype):
        x = jnp.ones((m, 256), dtype)
        return jax.export.export(f, platforms=["cuda"], disabled_checks=[TRITON_CALL])(x).mlir_module()

    mosaic_call = "custom_call @mosaic_gpu"  # (the text's locations name this test)
    assert not matmul._hopper_present() and mosaic_call not in lowered(16, jnp.bfloat16)
    monkeypatch.setattr(matmul, "_hopper_present", lambda: True)
    most = matmul.MOSAIC_LOGITS_MAX_M
    for m, dtype in [(1, jnp.bfloat16), (most, jnp.bfloat16), (most + 1, jnp.bfloat16), (16, jnp.float16)]:
        text = lowered(m, dtype)
        mosaic = spec.format == "int4" and m <= most and dtype == jnp.bfloat16
        assert (mosaic_call in text) == mosaic, (m, dtype)
        assert ("xla.gpu.triton" in text) == (not mosaic and spec.group_size is None and m <= matmul.PALLAS_TRANSPOSED_MAX_M)


def test_tied_logits_on_tpu_read_the_int4_table_in_the_dot():
    """``auto`` on TPU over a table scaled per row: one bf16 dot whose table operand is the int4 codes
    converted (XLA's native int4, as qdot's there), the row scales after it; tables in groups along d keep
    the dot over the decoded table."""
    x = jnp.ones((8, 128), jnp.bfloat16)
    for spec, native in ((qj.QuantSpec(axis=1), True), (qj.QuantSpec(axis=1, group_size=64), False)):
        q = qj.quantize(jax.random.normal(jax.random.key(18), (512, 128)), spec)
        text = jax.export.export(jax.jit(lambda x: qj.qeinsum("md,vd->mv", x, q)), platforms=["tpu"])(x).mlir_module()
        assert len([line for line in text.splitlines() if "stablehlo.dot_general" in line]) == 1
        assert ("xi4>" in text) == native


def test_forward_mode_on_cuda_takes_the_forward_kernel():
    """A 16-bit tangent ``dx @ W`` at small M on CUDA is the forward product's own Pallas kernel: two kernels
    in a jvp (the primal and the tangent), not a product over the decoded weight."""
    q = qj.quantize(jax.random.normal(jax.random.key(17), (256, 48)), qj.QuantSpec(axis=0, group_size=128))
    jvp = jax.jit(lambda x, dx: jax.jvp(lambda x: qj.qdot(x, q), (x,), (dx,)))
    x = jnp.ones((16, 256), jnp.bfloat16)
    text = jax.export.export(jvp, platforms=["cuda"], disabled_checks=[TRITON_CALL])(x, x).mlir_module()
    assert text.count("xla.gpu.triton") == 2 and "stablehlo.dot_general" not in text
    symbolic = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 256"), jnp.bfloat16)
    assert "xla.gpu.triton" not in jax.export.export(jvp, platforms=["cuda"])(symbolic, symbolic).mlir_module()


def test_per_channel_w4a8_past_the_kernels_rows_is_one_int32_dot_on_cuda():
    q = qj.quantize(jax.random.normal(jax.random.key(14), (256, 48)), qj.QuantSpec(axis=0))
    f = jax.jit(lambda x, q: qj.qdot(x, q, act_quant="int8"))
    for m in (PALLAS_MAX_M, PALLAS_MAX_M + 1):
        x = jnp.ones((m, 256), jnp.bfloat16)
        text = jax.export.export(f, platforms=["cuda"], disabled_checks=[TRITON_CALL])(x, q).mlir_module()
        assert ("xla.gpu.triton" in text) == (m <= PALLAS_MAX_M)
        assert bool(re.search(r"dot_general .*xi8>.*xi8>\) -> tensor<[\dx]+xi32>", text)) == (m > PALLAS_MAX_M)


@pytest.mark.parametrize(("fmt", "act_quant"), [(f, a) for f in FORMATS for a in (None, "int8") if (f, a) != ("nf4", "int8")])
def test_per_group_sums_stay_about_the_weights_size_at_any_m(fmt, act_quant):
    # all 15 groups at once, 1024 rows would hold (M, G, N) sums: 30 MiB for a 480 x 512 weight (1 MiB as float32)
    q = qj.quantize(jax.random.normal(jax.random.key(23), (480, 512)), qj.QuantSpec(format=fmt, axis=0, group_size=32))
    x = jax.random.normal(jax.random.key(24), (1024, 480))
    f = jax.jit(lambda x, q: qj.qdot(x, q, backend="native", act_quant=act_quant))
    assert f.lower(x, q).compile().memory_analysis().temp_size_in_bytes < 8 * 2**20
    ref = _reference(x if act_quant is None else qj.matmul.fake_int8_tokens(x), q)
    np.testing.assert_allclose(f(x, q), ref, rtol=1e-4, atol=1e-4 * np.sqrt(480))


def test_auto_on_tpu_decodes_the_weight_once_past_a_few_rows_per_group():
    # bf16 and groups of 32: per-group sums (M, G, N) float32 up to 16 rows, then the weight decoded to bf16 (K, N)
    f = jax.jit(qj.qdot)
    for group, m, per_group_sums in ((32, 16, True), (32, 17, False), (32, 256, False), (None, 256, True)):
        q = qj.quantize(jax.random.normal(jax.random.key(25), (256, 48)), qj.QuantSpec(axis=0, group_size=group))
        x = jnp.ones((m, 256), jnp.bfloat16)
        text = jax.export.export(f, platforms=["tpu"])(x, q).mlir_module()
        assert ("batching_dims" in text) == per_group_sums, (group, m)


def test_pallas_backend_names_the_platform_it_cannot_serve():
    q = qj.quantize(jnp.ones((32, 8)), qj.QuantSpec(axis=0))
    with pytest.raises(NotImplementedError, match=r"backend='pallas' has no kernel for platform 'tpu'"):
        jax.export.export(jax.jit(lambda x, q: qj.qdot(x, q, backend="pallas")), platforms=["tpu"])(jnp.ones((1, 32)), q)
    table = qj.quantize(jnp.ones((32, 8)), qj.QuantSpec(axis=1))
    with pytest.raises(NotImplementedError, match=r"qeinsum: backend='pallas' has no kernel for platform 'tpu'"):
        jax.export.export(jax.jit(lambda x, t: qj.qeinsum("md,vd->mv", x, t, backend="pallas")),
                          platforms=["tpu"])(jnp.ones((1, 8)), table)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_activations_on_every_backend(backend):
    q = qj.quantize(jax.random.normal(jax.random.key(17), (96, 20)), qj.QuantSpec(axis=0, group_size=32))
    x = jax.random.normal(jax.random.key(18), (16, 96)).astype(jnp.bfloat16)
    y = qj.qdot(x, q, backend=backend)
    assert y.dtype == jnp.float32
    ref = _reference(x.astype(jnp.float32), q)  # bf16 x is exact in float32
    if backend == "dequant":  # rounds the scaled weight to bf16: about 2**-9 relative per weight
        assert 0 < np.linalg.norm(y - ref) / np.linalg.norm(ref) < 5e-3
    else:
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_give_an_empty_product(backend):
    q = qj.quantize(jnp.ones((64, 8)), qj.QuantSpec(axis=0, group_size=32))
    y = qj.qdot(jnp.ones((2, 0, 64)), q, backend=backend)
    assert y.shape == (2, 0, 8) and y.dtype == jnp.float32


def test_vmap_over_activations_and_over_stacked_weights():
    spec = qj.QuantSpec(axis=0, group_size=16)
    q = qj.quantize(jax.random.normal(jax.random.key(14), (64, 30)), spec)
    xs = jax.random.normal(jax.random.key(15), (4, 3, 64))
    np.testing.assert_array_equal(jax.vmap(lambda x: qj.qdot(x, q), in_axes=1, out_axes=1)(xs), qj.qdot(xs, q))
    qs = jax.vmap(lambda w: qj.quantize(w, spec))(jax.random.normal(jax.random.key(16), (4, 64, 30)))
    ys = jax.vmap(qj.qdot)(xs, qs)
    for i in range(4):
        qi = jax.tree.map(lambda a: a[i], qs)
        np.testing.assert_allclose(ys[i], _reference(xs[i], qi), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_complex_activations_keep_their_imaginary_part(backend):
    q = qj.quantize(jax.random.normal(jax.random.key(26), (16, 6)), qj.QuantSpec(axis=0, group_size=8))
    x = jax.lax.complex(jax.random.normal(jax.random.key(27), (3, 16)), jax.random.normal(jax.random.key(28), (3, 16)))
    ref = np.asarray(x, np.complex128) @ np.asarray(qj.dequantize(q), np.float64)
    for y in (qj.qdot(x, q, backend=backend), qj.qeinsum("bk,kn->bn", x, q, backend=backend),
              qj.qeinsum("bk,kn->nb", x, q, backend=backend).T):
        assert y.dtype == jnp.complex64
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_bad_input_names_shapes_and_values():
    q = qj.quantize(jnp.ones((16, 8)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match=r"qdot: x of shape \(2, 15\) does not contract with q of shape \(16, 8\)"):
        qj.qdot(jnp.ones((2, 15)), q)
    with pytest.raises(ValueError, match=r"qdot: unknown backend 'cuda'"):
        qj.qdot(jnp.ones((2, 16)), q, backend="cuda")
    with pytest.raises(ValueError, match=r"qdot: act_quant must be None or 'int8', got 'int4'"):
        qj.qdot(jnp.ones((2, 16)), q, act_quant="int4")
    with pytest.raises(ValueError, match=r"format 'nf4' has none"):
        qj.qdot(jnp.ones((2, 16)), qj.quantize(jnp.ones((16, 8)), qj.QuantSpec(format="nf4")), act_quant="int8")
    with pytest.raises(ValueError, match=r"qdot: q must be a 2-D weight \(K, N\), got shape \(2, 8, 4\)"):
        qj.qdot(jnp.ones((2, 2)), qj.quantize(jnp.ones((2, 8, 4))))
    with pytest.raises(TypeError, match=r"qdot: q must be a QArray, got ArrayImpl"):
        qj.qdot(jnp.ones((2, 16)), jnp.ones((16, 8)))
    with pytest.raises(ValueError, match=r"qeinsum: axis 'd' has size 7 in x of shape \(2, 7\) but 16 in q"):
        qj.qeinsum("bd,dn->bn", jnp.ones((2, 7)), q)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "fp4"])
def test_w4a8_cpu_paths_equal_the_int32_path_per_channel(fmt):
    w = jax.random.normal(jax.random.key(11), (1100, 41))  # K over two CPU chunks, N odd
    x = jax.random.normal(jax.random.key(12), (6, 1100))
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0))
    integer = qj.qdot(x, q, backend="xla", act_quant="int8")  # int8 x int8 -> int32
    np.testing.assert_array_equal(qj.qdot(x, q, backend="chunked", act_quant="int8"), integer)
    np.testing.assert_array_equal(qj.qdot(x, q, act_quant="int8"), integer)  # auto on CPU
    np.testing.assert_array_equal(qj.qdot(x[2], q, act_quant="int8"), integer[2])  # one row (padded to two)
    if fmt == "int4":  # the kernel: exact products, but split-K scales each split's float32 sum
        y = qj.qdot(x, q, backend="pallas", act_quant="int8")
        np.testing.assert_allclose(y, integer, rtol=1e-6, atol=1e-6 * np.abs(integer).max())


@pytest.mark.parametrize("fmt", ["int4", "uint4", "fp4"])
@pytest.mark.parametrize("group", [32, 64, 384])  # float32 dots below 64 rows, an int8 dot per group from 64
def test_w4a8_cpu_paths_match_the_int32_path_with_groups(fmt, group):
    w = jax.random.normal(jax.random.key(19), (1000, 37))  # K not a multiple of the group or the chunk
    x = jax.random.normal(jax.random.key(20), (3, 1000)) * 5
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=group))
    integer = qj.qdot(x, q, backend="xla", act_quant="int8")
    for backend in ("chunked", "auto"):  # float32 sums of scaled groups: rounding only
        y = qj.qdot(x, q, backend=backend, act_quant="int8")
        np.testing.assert_allclose(y, integer, rtol=1e-5, atol=1e-5 * np.abs(integer).max())
