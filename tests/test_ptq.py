import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def test_gptq_kernel_needs_a_spec_over_exactly_the_input_axes():
    w, h = jnp.ones((4, 16, 8)), jnp.eye(16)
    with pytest.raises(ValueError, match=r"gptq: the spec must reduce exactly the input axes \(1,\) of w of shape "
                                         r"\(4, 16, 8\), got axis=\(0, 1\)"):
        qj.ptq.gptq_kernel(w, h, qj.QuantSpec(axis=(0, 1)), input_axes=(1,))
    q = qj.ptq.gptq_kernel(w, h, qj.QuantSpec(axis=-2), input_axes=(-2,))  # negative axes as numpy counts them
    assert q.shape == (4, 16, 8) and bool((qj.dequantize(q) == 1).all())
