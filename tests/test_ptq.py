import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

import quantize_jax as qj


def _params():
    k = jax.random.key(0)
    return {
        "embed": jax.random.normal(k, (300, 64)),
        "blocks": [{"mlp": {"kernel": jax.random.normal(k, (256, 128)), "bias": jnp.zeros(128)},
                    "norm": {"scale": jnp.ones(256)}}],
        "head": {"kernel": jax.random.normal(k, (64, 10))},  # below min_size: stays float
        "step": jnp.array(3, jnp.int32),
    }


def test_default_rules_report_and_sizes():
    q, report = qj.quantize_params(_params(), progress=False)
    assert isinstance(q["blocks"][0]["mlp"]["kernel"], qj.QArray)
    assert isinstance(q["embed"], qj.QArray)
    assert not isinstance(q["head"]["kernel"], qj.QArray) and not isinstance(q["blocks"][0]["mlp"]["bias"], qj.QArray)
    by = {r.path: r for r in report.leaves}
    mlp = by["blocks/0/mlp/kernel"]
    assert mlp.spec.group_size == 128 and mlp.spec.method == "mse" and 15 < mlp.sqnr_db < 30
    assert mlp.bytes_before == 256 * 128 * 4 and mlp.bytes_after == q["blocks"][0]["mlp"]["kernel"].nbytes
    assert report.bytes_after < report.bytes_before / 5
    text = str(report)
    assert "blocks/0/mlp/kernel" in text and "total: 2 of 6 leaves quantized" in text


def test_storage_is_at_most_4_25_bits_at_group_128():
    w = jax.random.normal(jax.random.key(1), (4096, 512))
    q, _ = qj.quantize_params({"w": w}, progress=False)
    assert q["w"].bits_per_value <= 4.25
    qb, _ = qj.quantize_params({"w": w}, {"w": qj.QuantSpec(axis=0, group_size=128, scale_dtype="bfloat16")},
                               progress=False)
    assert qb["w"].bits_per_value <= 4.125


def test_rules_first_match_and_skip():
    rules = [("embed", None), ("mlp/kernel", qj.QuantSpec(format="nf4", axis=0)), ("head", qj.QuantSpec(axis=0))]
    q, report = qj.quantize_params(_params(), rules, progress=False)
    assert not isinstance(q["embed"], qj.QArray)
    assert q["blocks"][0]["mlp"]["kernel"].spec.format == "nf4"
    assert isinstance(q["head"]["kernel"], qj.QArray)


def test_layers_stacked_for_scan_keep_their_own_scales_with_an_axis_1_rule():
    w = jax.random.normal(jax.random.key(2), (4, 256, 256)) / 16
    params = {"layers": {"kernel": w, "bias": jnp.zeros((4, 256))}}
    spec = qj.QuantSpec(axis=1, group_size=128, method="mse")
    q, _ = qj.quantize_params(params, {"layers/kernel": spec}, progress=False)
    assert q["layers"]["kernel"].scale.shape == (4, 2, 256)

    def serve(p, x):
        return jax.lax.scan(lambda h, layer: (jnp.tanh(qj.qdot(h, layer["kernel"]) + layer["bias"][None]), None), x, p)[0]

    x = jax.random.normal(jax.random.key(3), (2, 256))
    expected = x
    for i in range(4):  # each layer quantized by itself
        expected = jnp.tanh(qj.qdot(expected, qj.quantize(w[i], qj.QuantSpec(axis=0, group_size=128, method="mse"))))
    np.testing.assert_allclose(jax.jit(serve)(q["layers"], x), expected, rtol=1e-6, atol=1e-6)


def test_nnx_state_and_linen_params_trees():
    model = nnx.Sequential(nnx.Linear(256, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    q, report = qj.quantize_params(state, progress=False)
    paths = [r.path for r in report.quantized]
    assert paths == ["layers/0/kernel"]
    assert isinstance(jax.tree_util.tree_leaves(q, is_leaf=lambda a: isinstance(a, qj.QArray))[1], qj.QArray)


def test_non_finite_leaves_are_refused_by_path():
    p = _params()
    p["blocks"][0]["mlp"]["kernel"] = p["blocks"][0]["mlp"]["kernel"].at[3, 4].set(jnp.nan)
    with pytest.raises(ValueError, match=r"leaf 'blocks/0/mlp/kernel' of shape \(256, 128\) holds NaN or Inf"):
        qj.quantize_params(p, progress=False)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    key = jax.random.key(3)
    mix = jax.random.normal(key, (128, 128))
    x = jax.random.normal(jax.random.key(4), (1024, 128)) @ mix  # correlated features
    w = jax.random.normal(jax.random.key(5), (128, 64))
    for spec in (qj.QuantSpec(axis=0), qj.QuantSpec(format="uint4", axis=0, group_size=32),
                 qj.QuantSpec(format="nf4", axis=0, group_size=48)):  # 128 rows: a short last group
        err = lambda q: float(jnp.sum((x @ w - x @ qj.dequantize(q)) ** 2))
        g = qj.ptq.gptq(w, x, spec)
        assert g.spec == spec and g.scale.shape == qj.quantize(w, spec).scale.shape
        assert err(g) < 0.7 * err(qj.quantize(w, spec))
    q, report = qj.quantize_params({"w": w}, {"w": qj.QuantSpec(axis=0)}, calibration={"w": x}, progress=False)
    assert report.leaves[0].method == "gptq"
    np.testing.assert_array_equal(q["w"].packed, qj.ptq.gptq(w, x, qj.QuantSpec(axis=0)).packed)


def test_gptq_without_calibration_signal_rounds_to_nearest_and_keeps_the_dtype():
    w = jax.random.normal(jax.random.key(5), (64, 32)).astype(jnp.bfloat16)
    spec = qj.QuantSpec(axis=0, group_size=16)
    # inputs that are always zero carry no information: GPTQ must not blow up (a singular Hessian), but
    # round those rows to nearest, as a zero-input Hessian's dead diagonal is set to one
    q = qj.ptq.gptq(w, jnp.zeros((10, 64)), spec)
    assert q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(q.packed, qj.quantize(w, spec).packed)
    x = jax.random.normal(jax.random.key(6), (4, 25, 64))  # (batch, tokens, K): flattened into samples
    np.testing.assert_array_equal(qj.ptq.gptq(w, x, spec).packed, qj.ptq.gptq(w, x.reshape(100, 64), spec).packed)


def test_gptq_bad_input():
    with pytest.raises(ValueError, match=r"gptq: expected w of shape \(K, N\) and x of shape \(\.\.\., K\)"):
        qj.ptq.gptq(jnp.ones((8, 4)), jnp.ones((3, 7)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match=r"gptq: x of shape \(3, 8\) holds NaN or Inf"):
        qj.ptq.gptq(jnp.ones((8, 4)), jnp.ones((3, 8)).at[1, 2].set(jnp.inf), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match=r"gptq: the spec must put scales along axis 0"):
        qj.ptq.gptq(jnp.ones((8, 4)), jnp.ones((3, 8)), qj.QuantSpec(axis=1))
    with pytest.raises(ValueError, match=r"calibration given for paths that were not quantized: \['nope'\]"):
        qj.quantize_params({"w": jnp.ones((8, 4))}, calibration={"nope": jnp.ones((2, 8))}, progress=False)


def test_embedding_tables_default_to_one_scale_per_row():
    model = nnx.Embed(1000, 384, rngs=nnx.Rngs(0))
    q, report = qj.quantize_params(nnx.state(model, nnx.Param), progress=False)
    table = q["embedding"].get_value()
    assert table.spec == qj.QuantSpec(axis=1, group_size=128, method="mse")  # rows: groups along the features
    assert table.scale.shape == (1000, 3)
    ids = jnp.array([[5, 999]])
    np.testing.assert_array_equal(qj.take(table, ids), qj.dequantize(table)[ids])
    assert qj.ptq.default_spec((1000, 64), "tok/embedding") == qj.QuantSpec(axis=1, method="mse")
    assert qj.ptq.default_spec((1000, 64), "tok/kernel").axis == 0  # other 2-D leaves: per output channel


def test_gptq_kernel_needs_a_spec_over_the_input_axes():
    w, h = jnp.ones((4, 16, 8)), jnp.eye(16)
    for bad in (qj.QuantSpec(axis=2), qj.QuantSpec(axis=0, group_size=2)):  # not the input axis; grouped outputs
        with pytest.raises(ValueError, match=re.escape(
                f"gptq: the spec must reduce the input axes (1,) of w of shape (4, 16, 8) (and may reduce output "
                f"axes too, without groups), got axis={bad.axis!r}, group_size={bad.group_size!r}")):
            qj.ptq.gptq_kernel(w, h, bad, input_axes=(1,))
    with pytest.raises(ValueError, match=r"axis: axis 3 is out of range for w of shape \(4, 16, 8\)"):
        qj.ptq.gptq_kernel(w, h, qj.QuantSpec(axis=3), input_axes=(1,))
    q = qj.ptq.gptq_kernel(w, h, qj.QuantSpec(axis=-2), input_axes=(-2,))  # negative axes as numpy counts them
    assert q.shape == (4, 16, 8) and bool((qj.dequantize(q) == 1).all())


def _textbook_gptq(w, h, scale, zero_point, qmin, qmax, order=None, damp=0.01):
    """GPTQ as the paper's Algorithm 1 writes it, one row at a time in float64, with scales and zero points
    given for every element beforehand (``(K, N)``, or rows that broadcast), the rows walked in ``order``:
    the reference for scales chosen before the walk."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    scale, zero_point = (np.broadcast_to(np.asarray(a, np.float64), w.shape) for a in (scale, zero_point))
    order = np.arange(len(w)) if order is None else np.asarray(order)
    w, h, scale, zero_point = w[order], h[order][:, order], scale[order], zero_point[order]
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    for i in range(len(w)):
        q = (np.clip(np.round(w[i] / scale[i]) + zero_point[i], qmin, qmax) - zero_point[i]) * scale[i]
        err = (w[i] - q) / u[i, i]
        w[i] = q
        w[i + 1:] -= np.outer(u[i, i + 1:], err)
    return w[np.argsort(order)]


def test_gptq_kernel_with_scales_shared_across_outputs_holds_them_fixed():
    """A spec that also reduces output axes (one scale per H, shared by the heads N; or per tensor): the
    scales are quantize's own, fixed before the walk, and each output feature is the textbook GPTQ walk
    with its scale; the outputs' error falls below rounding's."""
    x = jax.random.normal(jax.random.key(0), (1024, 48)) @ jax.random.normal(jax.random.key(1), (48, 48))
    w = jax.random.normal(jax.random.key(2), (3, 48, 8))  # "BTD,NDH->BTNH": (heads, D, head features)
    h = x.T @ x / x.shape[0]
    out = lambda kernel: jnp.einsum("bd,ndh->bnh", x, kernel)  # noqa: E731
    for spec, (qmin, qmax) in ((qj.QuantSpec(axis=(0, 1)), (-8, 7)), (qj.QuantSpec(format="uint4"), (0, 15))):
        q, rounded = qj.ptq.gptq_kernel(w, h, spec, input_axes=(1,)), qj.quantize(w, spec)
        assert q.spec == spec
        np.testing.assert_array_equal(q.scale, rounded.scale)
        zero = 0.0 if q.zero_point is None else q.zero_point
        scale, zero = (np.broadcast_to(a, w.shape).transpose(1, 0, 2).reshape(48, -1) for a in (q.scale, zero))
        expected = _textbook_gptq(w.transpose(1, 0, 2).reshape(48, -1), h, scale, zero, qmin, qmax)
        got = np.asarray(qj.dequantize(q)).transpose(1, 0, 2).reshape(48, -1)
        assert np.mean(got == expected.astype(np.float32)) > 0.99  # float32 against float64: rare ties differ
        err = lambda k: float(jnp.sum((out(w) - out(k)) ** 2))  # noqa: E731
        assert err(qj.dequantize(q)) < 0.7 * err(qj.dequantize(rounded))


def test_gptq_act_order_walks_rows_by_decreasing_energy_with_static_groups():
    """act_order: the textbook walk over rows sorted by decreasing diag(H), every group's scale taken from
    the weights before the walk (so equal to rounding's); on inputs whose energies differ it has less
    output error than the walk in order (here 0.68x and 0.80x; 0.41-0.44x at K = 256, RESULTS.md)."""
    energy = jnp.exp(1.5 * jax.random.normal(jax.random.key(0), (64,)))
    x = jax.random.normal(jax.random.key(1), (2048, 64)) * energy[None] @ (
        jnp.eye(64) + 0.03 * jax.random.normal(jax.random.key(2), (64, 64)))
    w = jax.random.normal(jax.random.key(3), (64, 32))
    h = np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / len(x)
    err = lambda q: float(jnp.sum((x @ w - x @ qj.dequantize(q)) ** 2))  # noqa: E731
    for spec, (qmin, qmax) in ((qj.QuantSpec(axis=0), (-8, 7)),  # groups of 24 over 64 rows: a short last one
                               (qj.QuantSpec(format="uint4", axis=0, group_size=24), (0, 15))):
        q, rounded = qj.ptq.gptq(w, x, spec, act_order=True), qj.quantize(w, spec)
        np.testing.assert_array_equal(q.scale, rounded.scale)
        rows = np.arange(64) // (spec.group_size or 64)  # each row's scale
        zero = 0.0 if q.zero_point is None else np.asarray(q.zero_point)[rows]
        expected = _textbook_gptq(w, h, np.asarray(q.scale)[rows], zero, qmin, qmax,
                                  order=np.argsort(-np.diag(h), kind="stable"))
        assert np.mean(np.asarray(qj.dequantize(q)) == expected.astype(np.float32)) > 0.99
        assert err(q) < 0.9 * err(qj.ptq.gptq(w, x, spec))


def test_moment_passes_fill_each_pass_in_order_and_give_a_large_layer_its_own():
    sizes = {"a": 3, "b": 3, "c": 10, "d": 1}
    assert qj.ptq.moment_passes(list(sizes), sizes.get, 6, [], "f") == [["a", "b"], ["c"], ["d"]]
    assert qj.ptq.moment_passes(list(sizes), sizes.get, None, [], "f") == [["a", "b", "c", "d"]]
    assert qj.ptq.moment_passes(list(sizes), sizes.get, None, [], "f", sequential=True) == [["a"], ["b"], ["c"], ["d"]]
    with pytest.raises(ValueError, match=r"f: max_moment_bytes must be a positive int or None, got 2.5"):
        qj.ptq.moment_passes(list(sizes), sizes.get, 2.5, [], "f")
    assert qj.ptq.moment_passes(list(sizes), sizes.get, 100, iter([1]), "f") == [["a", "b", "c", "d"]]  # one pass
    with pytest.raises(ValueError, match=r"f: max_moment_bytes=6 needs 3 passes over the batches, which is an iter"):
        qj.ptq.moment_passes(list(sizes), sizes.get, 6, iter([1]), "f")
    with pytest.raises(ValueError, match=r"f: sequential=True needs 4 passes over the batches, which is an iter"):
        qj.ptq.moment_passes(list(sizes), sizes.get, None, iter([1]), "f", sequential=True)


def test_conv_rows_in_pytorch_s_layout():
    """NCHW inputs and an OIHW kernel: rows @ (the kernel, its input axes first and flattened) is the
    convolution, and the input axes are the kernel's channels, then its spatial axes (Flax's layouts:
    over random convolutions below)."""
    dims, options = ("NCHW", "OIHW", "NCHW"), dict(window_strides=(1, 2), padding="VALID")
    x = jax.random.normal(jax.random.key(0), (2, 4, 7, 6))
    w = jax.random.normal(jax.random.key(1), (5, 4, 2, 3))
    rows, axes = qj.ptq.conv_rows(x, w, dimension_numbers=dims, precision="highest", **options)
    assert axes == (1, 2, 3) and rows.dtype == jnp.float32
    matrix = np.asarray(w, np.float64).transpose(1, 2, 3, 0).reshape(24, 5)
    y = jax.lax.conv_general_dilated(x, w, dimension_numbers=dims, precision="highest", **options)
    np.testing.assert_allclose(np.asarray(rows, np.float64) @ matrix, np.moveaxis(np.asarray(y), 1, -1).reshape(-1, 5),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=10)
@given(st.data())
def test_conv_rows_over_random_convolutions(data):
    """Any spatial rank up to 2, kernel size, stride, padding, dilations and channel groups: each group's
    block of rows times that group's kernel view is the convolution's output for that group."""
    d = data.draw(st.integers(1, 2), label="spatial axes")
    size = tuple(data.draw(st.integers(1, 3)) for _ in range(d))
    groups, c_in, c_out = (data.draw(st.integers(1, 3)) for _ in range(3))
    lhs_dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(d))
    padding = data.draw(st.sampled_from(["SAME", "VALID", "explicit"] if max(lhs_dilation) == 1 else ["explicit"]))
    if padding == "explicit":  # lax takes no padding by name with input dilation
        padding = tuple((data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))) for _ in range(d))
    options = dict(window_strides=tuple(data.draw(st.integers(1, 2)) for _ in range(d)), padding=padding,
                   lhs_dilation=lhs_dilation, rhs_dilation=tuple(data.draw(st.integers(1, 2)) for _ in range(d)),
                   feature_group_count=groups)
    dims = ("NWC", "WIO", "NWC") if d == 1 else ("NHWC", "HWIO", "NHWC")
    x = jax.random.normal(jax.random.key(0), (2,) + (7,) * d + (groups * c_in,))
    w = jax.random.normal(jax.random.key(1), size + (c_in, groups * c_out))
    rows, axes = qj.ptq.conv_rows(x, w, dimension_numbers=dims, **options)
    assert axes == (d,) + tuple(range(d))
    y = jax.lax.conv_general_dilated(x, w, dimension_numbers=dims, precision="highest", **options)
    matrix = np.asarray(w, np.float64).transpose(axes + (d + 1,)).reshape(-1, groups, c_out)
    blocks = np.asarray(rows, np.float64).reshape(len(rows), groups, -1)
    np.testing.assert_allclose(np.einsum("ngk,kgo->ngo", blocks, matrix).reshape(-1, groups * c_out),
                               np.asarray(y).reshape(-1, groups * c_out), rtol=1e-5, atol=1e-5)


def test_gptq_kernel_of_a_grouped_convolution_walks_each_group_on_its_own_inputs():
    """feature_group_count=G: conv_rows' columns are G blocks, each the inputs of one group of outputs;
    gptq_kernel(groups=G) equals each group's own walk on gram(rows, G)[g], the groups side by side."""
    dims, groups = ("NHWC", "HWIO", "NHWC"), 4
    x = jnp.cumsum(jax.random.normal(jax.random.key(0), (4, 9, 9, 8)), axis=1)
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 12))  # 8 input channels in 4 groups of 2; 3 outputs each
    rows, axes = qj.ptq.conv_rows(x, w, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=groups)
    conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims,  # noqa: E731
                                                  feature_group_count=groups, precision="highest")
    blocks = rows.reshape(len(rows), groups, -1)
    matrix = w.transpose(2, 0, 1, 3).reshape(18, groups, 3)
    by_group = jnp.einsum("ngk,kgo->ngo", blocks, matrix, precision="highest").reshape(-1, 12)
    np.testing.assert_allclose(by_group, conv(w).reshape(-1, 12), rtol=1e-5, atol=1e-4)
    h = qj.ptq.gram(rows, groups=groups) / len(rows)
    assert h.shape == (groups, 18, 18)
    spec = qj.QuantSpec(axis=(0, 1, 2))
    q = qj.ptq.gptq_kernel(w, h, spec, input_axes=axes, groups=groups)
    assert (q.shape, q.spec, q.scale.shape) == ((3, 3, 2, 12), spec, (1, 1, 1, 12))
    for g in range(groups):
        alone = qj.ptq.gptq_kernel(w[..., 3 * g:3 * g + 3], h[g], spec, input_axes=axes)
        np.testing.assert_allclose(qj.dequantize(q)[..., 3 * g:3 * g + 3], qj.dequantize(alone), rtol=1e-6, atol=1e-6)
    error = lambda k: float(jnp.mean((conv(k) - conv(w)) ** 2))  # noqa: E731
    assert error(qj.dequantize(q)) < 0.85 * error(qj.dequantize(qj.quantize(w, spec)))
    with pytest.raises(ValueError, match=re.escape("gptq: groups=5 must divide the single output axis of w of shape "
                                                   "(3, 3, 2, 12) (input axes (2, 0, 1))")):
        qj.ptq.gptq_kernel(w, h, spec, input_axes=axes, groups=5)
    with pytest.raises(ValueError, match=re.escape("gptq: with groups=4, expected h of shape (4, 18, 18) and a spec "
                                                   "reducing the input axes (2, 0, 1) alone, got h (4, 18, 18) and "
                                                   "axis=None")):
        qj.ptq.gptq_kernel(w, h, qj.QuantSpec(), input_axes=axes, groups=groups)
    with pytest.raises(ValueError, match="conv_rows: convolutions grouped over the batch are not supported, got "
                                         "batch_group_count=2"):
        qj.ptq.conv_rows(x, w, (1, 1), "SAME", dimension_numbers=dims, batch_group_count=2)
