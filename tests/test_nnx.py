import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantize_jax as qj
from quantize_jax import demo

from .conftest import FORMATS, SIXTEEN_BIT_MODELS, assert_serves_like_16_bit_qat


def _mlp(**dtypes):
    return nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0), **dtypes), nnx.relu,
                          nnx.Linear(32, 6, rngs=nnx.Rngs(1), **dtypes))


def test_state_tree_is_the_flax_one_and_float_checkpoints_load():
    ref = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    q = qj.nnx.QuantLinear(8, 4, rngs=nnx.Rngs(0))
    paths = lambda m: sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param)))
    assert paths(ref) == paths(q)
    nnx.update(q, nnx.state(ref, nnx.Param))
    np.testing.assert_array_equal(q.kernel[...], ref.kernel[...])
    x = jnp.ones((2, 8))
    np.testing.assert_array_equal(q(x), x @ qj.fake_quant(ref.kernel[...], q.weight_spec) + ref.bias[...][None])


def test_gradients_reach_kernel_and_learned_scale_not_the_observer():
    layer = qj.nnx.QuantLinear(8, 4, learn_scale=True, act_spec=qj.QuantSpec(format="int4"),
                               act_calibration="static", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 8))
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(layer)
    assert float(jnp.abs(grads["kernel"][...]).sum()) > 0
    assert float(jnp.abs(grads["weight_scale"][...]).sum()) > 0
    assert "act_range" not in grads  # QuantStat is not a Param: optimizers never see it
    assert float(jnp.abs(layer.act_range[...]).sum()) > 0  # the observer was updated in training mode
    before = layer.act_range[...]
    layer.eval()
    layer(x * 10)
    np.testing.assert_array_equal(layer.act_range[...], before)  # eval() freezes it


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", [{}, {"learn_scale": True}, {"act_spec": "int8"},
                                     {"act_spec": qj.QuantSpec(format="int4", axis=-1)}])
def test_serving_equals_qat_and_holds_no_float_weights(fmt, options):
    spec = qj.QuantSpec(format=fmt, axis=0, group_size=8)
    qat = qj.nnx.quantize_model(_mlp(), weight_spec=spec, **options)
    x = jax.random.normal(jax.random.key(1), (7, 16))
    if fmt == "nf4" and options.get("act_spec") == "int8":
        with pytest.raises(ValueError, match=r"format 'nf4' has none"):
            qj.nnx.to_serving(qat)(x)  # W4A8 needs integer levels
        return
    served = qj.nnx.to_serving(qat)
    ref, out = qat(x), served(x)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) <= 1e-6
    for _, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(served)):
        assert leaf.ndim < 2 or leaf.dtype == jnp.uint8 or leaf.shape[0] <= 4  # packed codes or scales only
    kinds = [type(m).__name__ for _, m in nnx.iter_modules(served)]
    assert kinds.count("ServingLinear") == 2 and "QuantLinear" not in kinds


class _Stacked(nnx.Module):
    """Three layers made by nnx.vmap (by default Linear, kernels stacked (3, 16, 16)) and run by nnx.scan."""

    def __init__(self, rngs, layer=lambda rngs: nnx.Linear(16, 16, rngs=rngs)):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return layer(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(layer, x):
            return jax.nn.relu(layer(x))

        return step(self.layers, x)


@pytest.mark.parametrize("options", [{}, {"learn_scale": True},
                                     {"act_spec": qj.QuantSpec(format="int4"), "act_calibration": "static"}])
def test_stacked_layers_quantize_each_layer_on_its_own(options):
    model = _Stacked(nnx.Rngs(0))
    kernels, biases = model.layers.kernel[...], model.layers.bias[...]
    qat = qj.nnx.quantize_model(model, **options)
    assert qat.layers.weight_spec == qj.QuantSpec(axis=0)  # the layer's own (16, 16) kernel: per output channel
    x = jax.random.normal(jax.random.key(1), (4, 16))
    if options.get("learn_scale"):
        expect = jnp.stack([qj.compute_scale(k, qj.QuantSpec(axis=0))[0] for k in kernels])
        np.testing.assert_array_equal(qat.layers.weight_scale[...], expect)
    if "act_spec" in options:
        assert qat.layers.act_range.shape == (3, 2)
    else:  # the same as quantizing each layer by itself
        ref = x
        for k, b in zip(kernels, biases):
            ref = jax.nn.relu(ref @ qj.fake_quant(k, qj.QuantSpec(axis=0)) + b[None])
        np.testing.assert_allclose(qat(x), ref, rtol=1e-6, atol=1e-6)
    qat(x)
    qat.eval()
    served = qj.nnx.to_serving(qat)
    q = served.layers.qarray
    assert q.packed.shape == (3, 16, 8) and q.scale.shape == (3, 1, 16)
    assert q.shape == (3, 16, 16) and q.spec == qj.QuantSpec(axis=1)  # the stack as a whole, sliced per layer
    assert q.nbytes == 3 * qj.quantize(kernels[0], qj.QuantSpec(axis=0)).nbytes
    np.testing.assert_allclose(served(x), qat(x), rtol=1e-6, atol=1e-6)


def test_a_bare_layer_converts_itself():
    layer = nnx.Einsum("btd,dnh->btnh", (16, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 3, 16))
    qat = qj.nnx.quantize_model(layer)
    assert type(qat) is qj.nnx.QuantEinsum and type(layer) is nnx.Einsum
    served = qj.nnx.to_serving(qat)
    np.testing.assert_allclose(served(x), qat(x), rtol=1e-6, atol=1e-6)
    linear = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"quantize_model: the Linear layer: .*group_size 64 is larger"):
        qj.nnx.quantize_model(linear, weight_spec=qj.QuantSpec(axis=0, group_size=64), inplace=True)
    assert type(linear) is nnx.Linear  # a failed conversion leaves the layer as it was
    assert qj.nnx.quantize_model(linear, inplace=True) is linear and type(linear) is qj.nnx.QuantLinear


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", [{}, {"learn_scale": True}, {"act_spec": qj.QuantSpec(format="int4", axis=-1)},
                                     {"act_spec": "int8"}])
def test_serving_with_the_xla_backend_is_bit_for_bit(fmt, options):
    qat = qj.nnx.quantize_model(_mlp(), weight_spec=qj.QuantSpec(format=fmt, axis=0, group_size=8), **options)
    served = qj.nnx.to_serving(qat, backend="xla")
    x = jax.random.normal(jax.random.key(1), (7, 16))
    np.testing.assert_array_equal(served(x), qat(x))
    run = nnx.jit(lambda model, x: model(x))
    np.testing.assert_array_equal(run(served, x), run(qat, x))


@pytest.mark.parametrize("dtype, param_dtype", SIXTEEN_BIT_MODELS)
@pytest.mark.parametrize("act_spec", [None, "int8"])
def test_16_bit_models_serve_in_their_own_dtype(dtype, param_dtype, act_spec):
    """A served Linear computes in the dtype ``nnx.Linear`` would (it returned float32 for a bf16 model with
    float32 parameters); ``backend="xla"`` gives the QAT outputs bit for bit in every dtype."""
    qat = qj.nnx.quantize_model(_mlp(dtype=dtype, param_dtype=param_dtype),
                                weight_spec=qj.QuantSpec(format="uint4", axis=0, group_size=8), act_spec=act_spec)
    x = jax.random.normal(jax.random.key(1), (7, 16))
    ref = qat(x)
    assert_serves_like_16_bit_qat(qj.nnx.to_serving(qat)(x), ref, dtype, param_dtype, act_spec)
    np.testing.assert_array_equal(qj.nnx.to_serving(qat, backend="xla")(x), ref)


def test_rules_first_match_wins_and_errors_name_layers():
    model = qj.nnx.quantize_model(_mlp(), [("layers/2", None), (".*", qj.QuantSpec(axis=0))])
    assert type(model.layers[0]) is qj.nnx.QuantLinear and type(model.layers[2]) is nnx.Linear
    with pytest.raises(ValueError, match=r"quantize_model: rule 'attention' matches no Linear, Conv, Einsum or LinearGeneral layer"):
        qj.nnx.quantize_model(_mlp(), {"attention": qj.QuantSpec(axis=0)})
    with pytest.raises(ValueError, match=r"layer 'layers/0': .*group_size 64 is larger than axis 0 of the kernel of shape \(16, 32\)"):
        qj.nnx.quantize_model(_mlp(), weight_spec=qj.QuantSpec(axis=0, group_size=64))
    with pytest.raises(ValueError, match=r"layer 'layers/0': axis: axis 3 is out of range for QuantLinear kernel of shape \(16, 32\)"):
        qj.nnx.quantize_model(_mlp(), weight_spec=qj.QuantSpec(axis=3))
    with pytest.raises(ValueError, match=r"to_serving: the model holds no quantized layer"):
        qj.nnx.to_serving(_mlp())


def test_quantize_model_copies_unless_inplace():
    m = _mlp()
    q = qj.nnx.quantize_model(m)
    assert type(m.layers[0]) is nnx.Linear and type(q.layers[0]) is qj.nnx.QuantLinear
    qj.nnx.quantize_model(m, inplace=True)
    assert type(m.layers[0]) is qj.nnx.QuantLinear


@pytest.mark.slow
def test_digits_qat_reaches_float_accuracy_and_serves_identically():
    rows = demo.run(quick=True)
    for net in ("MLP", "CNN"):
        by = {r["model"]: r for r in rows if r["net"] == net}
        float_acc = by["float32"]["acc"]
        assert by["int4 QAT"]["acc"] >= float_acc - 0.005, (net, by)
        assert by["W4A8 QAT (int8 tokens)"]["acc"] >= float_acc - 0.01, (net, by)
        for name in ("int4 QAT", "int4 QAT, learned scales", "W4A8 QAT (int8 tokens)"):
            assert by[name]["served_acc"] == by[name]["acc"]
            assert by[name]["bytes"] * 6 < by["float32"]["bytes"]
        assert by["int4 QAT"]["max_rel_diff"] <= 1e-6
        # W4A8: a 1e-7 reassociation difference in one layer can move a next-layer activation across an int8
        # rounding boundary (one level, 1/127 of its token's range), so serving equals QAT only that closely.
        assert by["W4A8 QAT (int8 tokens)"]["max_rel_diff"] <= 1e-2


class _CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.mix = nnx.Einsum("bhwc,cd->bhwd", (4, 6), (6,), rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.mix(nnx.relu(self.conv(x)))).mean(axis=(1, 2)))


@pytest.mark.parametrize("options", [{}, {"learn_scale": True}, {"act_spec": "int8"},
                                     {"act_spec": qj.QuantSpec(format="int4"), "act_calibration": "static"}])
def test_conv_and_einsum_qat_and_serving(options):
    model = _CNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 1))
    qat = qj.nnx.quantize_model(model, **options)
    assert [type(m).__name__ for m in (qat.conv, qat.mix, qat.head)] == ["QuantConv", "QuantEinsum", "QuantLinear"]
    assert qat.conv.weight_spec.axis == (0, 1, 2)  # one scale per output channel
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(qat)
    assert float(jnp.abs(grads["conv"]["kernel"][...]).sum()) > 0
    qat.eval()
    ref = qat(x)
    served = qj.nnx.to_serving(qat)
    assert [type(m).__name__ for m in (served.conv, served.mix, served.head)] == [
        "ServingConv", "ServingEinsum", "ServingLinear"]
    np.testing.assert_allclose(served(x), ref, rtol=1e-5, atol=1e-6)
    # The conv kernel is stored packed: a QArray of uint8 codes, 4 bits per weight.
    q = served.conv.qarray
    assert q.packed.dtype == jnp.uint8 and q.shape == (3, 3, 1, 4)


def test_standalone_layers_match_their_flax_twins():
    conv = qj.nnx.QuantConv(2, 5, (3,), weight_spec=qj.QuantSpec(format="nf4", axis=(0, 1)), rngs=nnx.Rngs(0))
    ref = nnx.Conv(2, 5, (3,), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 7, 2))
    ref.kernel[...] = qj.fake_quant(ref.kernel[...], conv.weight_spec)
    np.testing.assert_array_equal(conv(x), ref(x))
    general = qj.nnx.QuantLinearGeneral((2, 8), 6, axis=(-2, -1), rngs=nnx.Rngs(0))
    assert general.weight_spec == qj.QuantSpec(axis=(0, 1))  # the contracted axes: one scale per output
    ref = nnx.LinearGeneral((2, 8), 6, axis=(-2, -1), rngs=nnx.Rngs(0))
    ref.kernel[...] = qj.fake_quant(ref.kernel[...], general.weight_spec)
    x = jax.random.normal(jax.random.key(4), (3, 2, 8))
    np.testing.assert_array_equal(general(x), ref(x))


@pytest.mark.parametrize("options", [{}, {"learn_scale": True}, {"act_spec": "int8"}])
def test_attention_projections_quantize_and_serve(options):
    attention = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32, decode=False, rngs=nnx.Rngs(0))
    qat = qj.nnx.quantize_model(attention, **options)
    layers = {path: type(m).__name__ for path, m in nnx.iter_modules(qat) if path}
    assert layers == {(p,): "QuantLinearGeneral" for p in ("query", "key", "value", "out")}
    assert qat.query.weight_spec.axis == 0 and qat.out.weight_spec.axis == (0, 1)  # per head and feature
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    served = qj.nnx.to_serving(qat)
    assert type(served.query).__name__ == "ServingLinearGeneral"
    assert served.query.qarray.packed.shape == (32, 4, 4) and served.query.qarray.scale.shape == (1, 4, 8)
    np.testing.assert_allclose(served(x), qat(x), rtol=1e-6, atol=1e-6)


class _TiedLM(nnx.Module):
    """Token embedding, one Linear, logits from the same (tied) table."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(40, 16, rngs=rngs)
        self.mix = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jax.nn.gelu(self.mix(self.embed(ids))))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", [{}, {"learn_scale": True},
                                     {"weight_spec": qj.QuantSpec(axis=0, group_size=16)}])
def test_embeddings_quantize_on_request_and_serve_bit_for_bit(fmt, options):
    model = _TiedLM(nnx.Rngs(0))
    assert type(qj.nnx.quantize_model(model).embed) is nnx.Embed  # off by default
    options = dict(options)
    spec = options.pop("weight_spec", None)
    spec = spec and qj.QuantSpec(format=fmt, axis=spec.axis, group_size=spec.group_size)
    qat = qj.nnx.quantize_model(model, weight_spec=spec or qj.QuantSpec(format=fmt, axis=1),
                                quantize_embeddings=True, **options)
    assert type(qat.embed) is qj.nnx.QuantEmbed and type(qat.mix) is qj.nnx.QuantLinear
    ids = jnp.array([[0, 39, 7, -1], [3, 3, 40, 12]])  # 40 is out of range: a NaN row, as nnx.Embed gives
    ref = nnx.clone(model)
    ref.embed.embedding[...] = qat.embed.quantized_kernel()
    np.testing.assert_array_equal(qat.embed(ids), ref.embed(ids))
    served = qj.nnx.to_serving(qat, backend="xla")
    assert type(served.embed) is qj.nnx.ServingEmbed
    q = served.embed.qarray
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (40, 8)
    np.testing.assert_array_equal(served(ids), qat(ids))
    run = nnx.jit(lambda model, ids: model(ids))
    np.testing.assert_array_equal(run(served, ids), run(qat, ids))
    assert bool(jnp.isnan(served(ids)[1, 2]).all()) and not bool(jnp.isnan(served(ids)[1, :2]).any())
    fast = qj.nnx.to_serving(qat)  # attend over the packed table, block by block on the CPU
    np.testing.assert_allclose(fast(ids), qat(ids), rtol=1e-5, atol=1e-5)


def test_embedding_gradients_and_errors():
    qat = qj.nnx.QuantEmbed(10, 8, learn_scale=True, rngs=nnx.Rngs(0))
    assert qat.weight_spec == qj.QuantSpec(axis=1) and qat.weight_scale.shape == (10, 1)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.array([1, 1, 4])) ** 2))(qat)
    rows = jnp.abs(grads.embedding[...]).sum(axis=1)
    assert bool((rows[jnp.array([1, 4])] > 0).all()) and int((rows > 0).sum()) == 2  # straight through, looked-up rows
    assert int((grads.weight_scale[...][:, 0] != 0).sum()) == 2  # LSQ: the scales of the rows looked up
    with pytest.raises(ValueError, match=r"rule 'embed' matches no .*quantize_embeddings=True"):
        qj.nnx.quantize_model(_TiedLM(nnx.Rngs(0)), {"embed": qj.QuantSpec(axis=1)})
    with pytest.raises(ValueError, match=r"QuantEmbed: group_size 32 is larger than axis 1 of the embedding"):
        qj.nnx.QuantEmbed(10, 8, weight_spec=qj.QuantSpec(axis=1, group_size=32), rngs=nnx.Rngs(0))
    served = qj.nnx.to_serving(qat)
    with pytest.raises(ValueError, match="ServingEmbed: inputs must be integer token ids, got dtype float32"):
        served(jnp.ones((2,)))
    one = qj.nnx.to_serving(qj.nnx.QuantEmbed(1, 8, rngs=nnx.Rngs(0)))  # nnx.Embed broadcasts its one row
    assert one(jnp.array([[0, 5]])).shape == (1, 2, 8)


def test_gptq_serving_beats_rounding_to_nearest_on_correlated_inputs():
    """to_serving_gptq: each Linear kernel quantized by GPTQ for the inputs recorded over the batches (the
    first layer's are the batches themselves, so its QArray is ptq.gptq of them all); less output error;
    where= picks the layers, act_order= reaches GPTQ; sequential: the second layer's inputs come through
    the first one's GPTQ kernel."""
    model = _mlp()
    mix = jax.random.normal(jax.random.key(2), (16, 16))
    batches = [jax.random.normal(jax.random.key(10 + i), (64, 16)) @ mix for i in range(4)]
    test = jax.random.normal(jax.random.key(3), (256, 16)) @ mix
    spec = qj.QuantSpec(axis=0, group_size=8)
    qat = qj.nnx.quantize_model(model, weight_spec=spec)
    gptq = qj.nnx.to_serving_gptq(qat, batches, progress=False)
    assert type(qat.layers[0]) is qj.nnx.QuantLinear  # the QAT model is left as it was
    assert type(gptq.layers[0]) is qj.nnx.ServingLinear and type(gptq.layers[2]) is qj.nnx.ServingLinear
    first, expected = gptq.layers[0].qarray, qj.ptq.gptq(qat.layers[0].kernel[...], jnp.concatenate(batches), spec)
    assert first.spec == spec and float(jnp.mean(first.packed == expected.packed)) > 0.99  # batch sums: last bits
    np.testing.assert_allclose(first.scale, expected.scale, rtol=1e-5)
    error = lambda m: float(jnp.mean((m(test) - model(test)) ** 2))  # noqa: E731
    assert error(gptq) < 0.85 * error(qj.nnx.to_serving(qat))
    only_first = qj.nnx.to_serving_gptq(qat, iter(batches), where="layers/0", act_order=True,  # any iterable
                                        progress=False)
    jax.tree.map(np.testing.assert_array_equal, only_first.layers[2].qarray, qj.nnx.to_serving(qat).layers[2].qarray)
    expected = qj.ptq.gptq(qat.layers[0].kernel[...], jnp.concatenate(batches), spec, act_order=True)
    assert float(jnp.mean(only_first.layers[0].qarray.packed == expected.packed)) > 0.99
    assert float(jnp.mean(only_first.layers[0].qarray.packed == first.packed)) < 0.9  # another walk
    in_order = qj.nnx.to_serving_gptq(qat, batches, sequential=True, progress=False)
    np.testing.assert_array_equal(in_order.layers[0].qarray.packed, first.packed)
    hidden = jnp.concatenate([nnx.relu(in_order.layers[0](b)) for b in batches])  # through its GPTQ kernel
    expected = qj.ptq.gptq(qat.layers[2].kernel[...], hidden, spec)
    assert float(jnp.mean(in_order.layers[2].qarray.packed == expected.packed)) > 0.99
    with pytest.raises(ValueError, match=r"sequential=True needs 2 passes over the batches, which is an iterator"):
        qj.nnx.to_serving_gptq(qat, iter(batches), sequential=True, progress=False)


def test_gptq_serving_of_attention_projections_and_stacked_layers():
    """LinearGeneral projections (inputs' trailing axes flattened into K, outputs into N) and layers stacked
    by nnx.vmap (each on the inputs nnx.scan hands it): the QArrays keep to_serving's layout and spec.
    Calibrated in passes of at most two layers' moments, the projections come out the same."""
    mix = jax.random.normal(jax.random.key(2), (32, 32))
    batches = [jax.random.normal(jax.random.key(10 + i), (4, 8, 32)) @ mix for i in range(3)]
    mha = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=nnx.Rngs(0))
    qat = qj.nnx.quantize_model(mha)
    served, rounded = qj.nnx.to_serving_gptq(qat, batches, progress=False), qj.nnx.to_serving(qat)
    for name in ("query", "key", "value", "out"):
        q, r = getattr(served, name).qarray, getattr(rounded, name).qarray
        assert (q.shape, q.spec, q.scale.shape) == (r.shape, r.spec, r.scale.shape)
    x = jnp.concatenate(batches).reshape(-1, 32)  # the query's inputs: the batches themselves
    expected = qj.ptq.gptq(qat.query.kernel[...].reshape(32, 32), x, qj.QuantSpec(axis=0))
    np.testing.assert_allclose(qj.dequantize(served.query.qarray).reshape(32, 32), qj.dequantize(expected),
                               rtol=1e-5, atol=1e-6)
    test = jax.random.normal(jax.random.key(3), (4, 8, 32)) @ mix
    error = lambda m: float(jnp.mean((m(test) - mha(test)) ** 2))  # noqa: E731
    assert error(served) < error(rounded)
    moment = 32 * 32 * 4  # each projection's x^T x, float32: two per pass
    two_passes = qj.nnx.to_serving_gptq(qat, batches, max_moment_bytes=2 * moment + 1, progress=False)
    for name in ("query", "key", "value", "out"):
        assert float(jnp.mean(getattr(two_passes, name).qarray.packed == getattr(served, name).qarray.packed)) > 0.99
    with pytest.raises(ValueError, match=r"to_serving_gptq: max_moment_bytes=8193 needs 2 passes over the batches, "
                                         r"which is an iterator \(list_iterator\) and can be read once; give a list"):
        qj.nnx.to_serving_gptq(qat, iter(batches), max_moment_bytes=2 * moment + 1, progress=False)
    with pytest.raises(ValueError, match=r"max_moment_bytes must be a positive int or None, got 0"):
        qj.nnx.to_serving_gptq(qat, batches, max_moment_bytes=0, progress=False)

    floats = _Stacked(nnx.Rngs(0))
    stacked = qj.nnx.quantize_model(floats, weight_spec=qj.QuantSpec(axis=0, group_size=8))
    x = jax.random.normal(jax.random.key(4), (64, 16)) @ mix[:16, :16]
    served, rounded = qj.nnx.to_serving_gptq(stacked, [x], progress=False), qj.nnx.to_serving(stacked)
    q, r = served.layers.qarray, rounded.layers.qarray
    assert (q.shape, q.spec, q.scale.shape) == (r.shape, r.spec, r.scale.shape) == ((3, 16, 16), r.spec, (3, 2, 16))
    first = qj.ptq.gptq(stacked.layers.kernel[...][0], x, qj.QuantSpec(axis=0, group_size=8))
    np.testing.assert_allclose(qj.dequantize(q)[0], qj.dequantize(first), rtol=1e-5, atol=1e-6)
    assert not np.allclose(qj.dequantize(q)[1], qj.dequantize(r)[1])  # the later layers too, on their own inputs
    assert float(jnp.mean((served(x) - floats(x)) ** 2)) < float(jnp.mean((rounded(x) - floats(x)) ** 2))


def test_gptq_serving_of_gemma_style_einsum_layers():
    """QuantEinsum layers whose inputs end with the contracted axes: the kernel's input axes moved first
    and flattened for GPTQ, its QArray back in the layer's layout (per output feature, or groups; the
    gate's spec, QuantEinsum's default, shares each scale across G too and keeps rounding's scales)."""
    model = _GemmaBlock(nnx.Rngs(0))
    rules = [("^q$", qj.QuantSpec(axis=1, group_size=16)), ("^kv$", qj.QuantSpec(axis=2)),
             ("^o$", qj.QuantSpec(axis=(0, 1))), ("^gate$", qj.QuantSpec(axis=(0, 1))),
             ("^down$", qj.QuantSpec(axis=0))]
    qat = qj.nnx.quantize_model(model, rules)
    ids = [jax.random.randint(jax.random.key(i), (4, 12), 0, 64) for i in range(3)]
    served, rounded = qj.nnx.to_serving_gptq(qat, ids, progress=False), qj.nnx.to_serving(qat)
    for name in ("q", "kv", "o", "gate", "down"):
        q, r = getattr(served, name).qarray, getattr(rounded, name).qarray
        assert (q.shape, q.spec, q.scale.shape) == (r.shape, r.spec, r.scale.shape)
        assert not np.allclose(qj.dequantize(q), qj.dequantize(r))
    assert served.gate.qarray.spec.axis == (0, 1)
    np.testing.assert_array_equal(served.gate.qarray.scale, rounded.gate.qarray.scale)
    x = jnp.concatenate([model.embed(i) for i in ids]).reshape(-1, 32)  # what q and kv multiply
    for name, spec, axes in (("q", qj.QuantSpec(axis=0, group_size=16), (1, 0, 2)),  # (N, D, H) -> (D, N, H)
                             ("kv", qj.QuantSpec(axis=0), (2, 0, 1, 3))):  # (C, K, D, H) -> (D, C, K, H)
        kernel = getattr(qat, name).kernel[...]
        expected = qj.dequantize(qj.ptq.gptq(kernel.transpose(axes).reshape(32, -1), x, spec))
        np.testing.assert_allclose(qj.dequantize(getattr(served, name).qarray),
                                   expected.reshape(tuple(kernel.shape[a] for a in axes)).transpose(np.argsort(axes)),
                                   rtol=1e-5, atol=1e-6)
    error = lambda m: sum(float(jnp.sum((m(i) - model(i)) ** 2)) for i in ids)  # noqa: E731
    assert error(served) < error(rounded)


class _ThreeConvs(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.down = nnx.Conv(8, 8, (3, 3), strides=2, padding="CIRCULAR", rngs=rngs)
        self.grouped = nnx.Conv(8, 8, (1, 1), feature_group_count=2, rngs=rngs)

    def __call__(self, x):
        return self.grouped(nnx.relu(self.down(nnx.relu(self.first(x)))))


def _smooth_images(key, n):
    """Images whose neighbouring pixels correlate (random walks along both axes): patches GPTQ can exploit."""
    return jnp.cumsum(jnp.cumsum(jax.random.normal(key, (n, 10, 10, 3)), axis=1), axis=2) / 4


def test_gptq_serving_of_conv_layers_calibrates_on_their_patches():
    """QuantConv kernels quantized by GPTQ for the patches they multiply (as the layer's convolution call
    sees them: after CIRCULAR padding, with its strides); a grouped convolution's groups each on their own
    inputs; with a scale shared across its groups it keeps rounding."""
    dims = ("NHWC", "HWIO", "NHWC")
    model = _ThreeConvs(nnx.Rngs(0))
    batches = [_smooth_images(jax.random.key(10 + i), 8) for i in range(3)]
    qat = qj.nnx.quantize_model(model)
    served, rounded = qj.nnx.to_serving_gptq(qat, batches, progress=False), qj.nnx.to_serving(qat)
    assert type(served.first) is qj.nnx.ServingConv
    hidden = [nnx.relu(qat.first(b)) for b in batches]  # the QAT model's (one pass, not sequential)
    for name, inputs, strides, padding in (
            ("first", batches, (1, 1), "SAME"),
            ("down", [jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap") for h in hidden], (2, 2), "VALID")):
        kernel = getattr(qat, name).kernel[...]
        rows, axes = qj.ptq.conv_rows(jnp.concatenate(inputs), kernel, strides, padding, dimension_numbers=dims)
        expected = qj.ptq.gptq_kernel(kernel, qj.ptq.gram(rows) / len(rows), qat.first.weight_spec, input_axes=axes)
        q = getattr(served, name).qarray
        assert q.spec == expected.spec and float(jnp.mean(q.packed == expected.packed)) > 0.99
        assert float(jnp.mean(q.packed == getattr(rounded, name).qarray.packed)) < 0.9
    inputs = jnp.concatenate([nnx.relu(qat.down(h)) for h in hidden])
    rows, axes = qj.ptq.conv_rows(inputs, qat.grouped.kernel[...], (1, 1), "SAME", dimension_numbers=dims,
                                  feature_group_count=2)
    expected = qj.ptq.gptq_kernel(qat.grouped.kernel[...], qj.ptq.gram(rows, groups=2) / len(rows),
                                  qat.grouped.weight_spec, input_axes=axes, groups=2)
    assert float(jnp.mean(served.grouped.qarray.packed == expected.packed)) > 0.99
    test = _smooth_images(jax.random.key(3), 16)
    error = lambda m: float(jnp.mean((m(test) - model(test)) ** 2))  # noqa: E731
    assert error(served) < 0.85 * error(rounded)
    shared = qj.nnx.quantize_model(model, {"grouped": qj.QuantSpec(axis=None), ".*": None})  # one scale, both groups
    with pytest.raises(ValueError, match="to_serving_gptq: no QuantLinear, QuantConv"):
        qj.nnx.to_serving_gptq(shared, batches, progress=False)


class _Experts(nnx.Module):
    """A mixture of experts' expert layers over tokens already dispatched (E, C, D), as einsums whose kernels
    lead with the expert axis, and a per-head output projection (heads a batch axis of its kernel)."""

    def __init__(self, rngs):
        self.up = nnx.Einsum("ECD,EDF->ECF", (4, 16, 24), rngs=rngs)
        self.down = nnx.Einsum("ECF,EFD->ECD", (4, 24, 16), rngs=rngs)
        self.heads = nnx.Einsum("...ED,EDH->...EH", (4, 16, 8), rngs=rngs)

    def __call__(self, x):
        h = self.down(nnx.relu(self.up(x)))
        return self.heads(jnp.swapaxes(h, 0, 1))


def test_gptq_serving_of_einsum_kernels_with_batch_axes_walks_each_entry_on_its_own_inputs():
    """Kernels whose leading axes are batch axes of the einsum (a mixture of experts' E): each expert's
    slice quantized by GPTQ on the tokens routed to it, the QArrays in the layer's layout and spec; a spec
    whose scales span the experts (QuantEinsum's default here) keeps rounding."""
    mix = jax.random.normal(jax.random.key(2), (4, 16, 16))  # each expert's tokens correlated their own way
    batches = [jnp.einsum("ecd,edk->eck", jax.random.normal(jax.random.key(10 + i), (4, 32, 16)), mix)
               for i in range(3)]
    model = _Experts(nnx.Rngs(0))
    per_expert = qj.QuantSpec(axis=1, group_size=8)
    qat = qj.nnx.quantize_model(model, {"^up$": per_expert, ".*": qj.QuantSpec(axis=1)})  # heads: per head, feature
    served, rounded = qj.nnx.to_serving_gptq(qat, batches, progress=False), qj.nnx.to_serving(qat)
    q, r = served.up.qarray, rounded.up.qarray
    assert (q.shape, q.spec, q.scale.shape) == (r.shape, r.spec, r.scale.shape) == ((4, 16, 24), per_expert,
                                                                                      (4, 2, 24))
    x = jnp.concatenate(batches, axis=1)
    for e in range(4):
        expected = qj.ptq.gptq(qat.up.kernel[...][e], x[e], qj.QuantSpec(axis=0, group_size=8))
        assert float(jnp.mean(q.packed[e] == expected.packed)) > 0.99
        np.testing.assert_allclose(q.scale[e], expected.scale, rtol=1e-5)
    hidden = jnp.swapaxes(jnp.concatenate([qat.down(nnx.relu(qat.up(b))) for b in batches], axis=1), 0, 1)
    expected = qj.ptq.gptq(qat.heads.kernel[...][2], hidden[:, 2], qj.QuantSpec(axis=0))  # "...ED": E from the end
    assert float(jnp.mean(served.heads.qarray.packed[2] == expected.packed)) > 0.99
    error = lambda m: sum(float(jnp.sum((m(b) - model(b)) ** 2)) for b in batches)  # noqa: E731
    assert error(served) < 0.85 * error(rounded)
    shared = qj.nnx.quantize_model(model, {"^heads$": qj.QuantSpec(axis=(0, 1)), ".*": None})  # one scale per H
    with pytest.raises(ValueError, match="to_serving_gptq: no QuantLinear, QuantConv"):
        qj.nnx.to_serving_gptq(shared, batches, progress=False)


class _TwoArgs(nnx.Module):
    def __init__(self):
        self.used = qj.nnx.QuantLinear(8, 8, rngs=nnx.Rngs(0))
        self.unused = qj.nnx.QuantLinear(8, 8, rngs=nnx.Rngs(1))

    def __call__(self, x, shift):
        return self.used(x + shift)


def test_gptq_serving_refuses_what_it_cannot_calibrate():
    model, x = _TwoArgs(), jnp.ones((4, 8))
    served = qj.nnx.to_serving_gptq(model, [(x, 1.0)], where="^used", progress=False)  # tuples: several arguments
    assert type(served.used) is qj.nnx.ServingLinear and type(served.unused) is qj.nnx.ServingLinear
    with pytest.raises(ValueError, match="to_serving_gptq: layer 'unused' was never called on the batches"):
        qj.nnx.to_serving_gptq(model, [(x, 1.0)], progress=False)
    with pytest.raises(ValueError, match="to_serving_gptq: batches is empty"):
        qj.nnx.to_serving_gptq(model, [], progress=False)
    learned = qj.nnx.quantize_model(_mlp(), learn_scale=True)
    with pytest.raises(ValueError, match=r"to_serving_gptq: no QuantLinear, QuantConv, QuantLinearGeneral or "
                                         r"QuantEinsum GPTQ can quantize matches where='': none has a weight_spec "
                                         r"reducing its input axes"):
        qj.nnx.to_serving_gptq(learned, [jnp.ones((2, 16))], progress=False)


def test_qlora_adapters_train_over_a_packed_nf4_base_and_merge():
    import optax

    served = qj.nnx.to_serving(qj.nnx.quantize_model(_mlp(), weight_spec=qj.QuantSpec(format="nf4", axis=0)))
    base = [jax.tree_util.tree_leaves(layer.qarray) for layer in (served.layers[0], served.layers[2])]
    x, y = jax.random.normal(jax.random.key(6), (32, 16)), jax.random.normal(jax.random.key(7), (32, 6))
    tuned = qj.nnx.add_lora(served, 4, rngs=nnx.Rngs(5))
    assert type(tuned.layers[0]) is nnx.LoRA and type(tuned.layers[2]) is nnx.LoRA
    np.testing.assert_array_equal(tuned(x), served(x))  # lora_b starts at zero
    only_first = qj.nnx.add_lora(served, 2, where="layers/0", rngs=nnx.Rngs(5))
    assert type(only_first.layers[2]) is qj.nnx.ServingLinear
    opt = nnx.Optimizer(tuned, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(tuned, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    for layer, before in zip((tuned.layers[0], tuned.layers[2]), base):  # the 4-bit base is untouched
        after = jax.tree_util.tree_leaves(layer.base_module.qarray)
        assert after[0].dtype == jnp.uint8 and all(np.array_equal(a, b) for a, b in zip(after, before))
    merged = qj.nnx.merge_lora(tuned)
    assert type(merged.layers[0]) is qj.nnx.ServingLinear and merged.layers[0].qarray.spec.format == "nf4"
    lora = tuned.layers[0]
    expected = qj.quantize(qj.dequantize(lora.base_module.qarray) + lora.lora_a[...] @ lora.lora_b[...],
                           lora.base_module.qarray.spec)
    for a, b in zip(jax.tree_util.tree_leaves(merged.layers[0].qarray), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.mean((merged(x) - y) ** 2)) < 0.5 * losses[0]  # the merge keeps most of what was learned
    with pytest.raises(ValueError, match=r"add_lora: no ServingLinear, trailing-axes ServingLinearGeneral or ServingEinsum layer matches where='attn'"):
        qj.nnx.add_lora(served, 4, where="attn", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="merge_lora: the model holds no nnx.LoRA over a packed layer"):
        qj.nnx.merge_lora(served)


def test_qlora_over_attention_projections():
    """add_lora adapts the LinearGeneral projections of a served MultiHeadAttention (LoRAGeneral: inputs'
    contracted axes flattened, the product reshaped to the output axes); merge_lora folds them back."""
    import optax

    mha = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=nnx.Rngs(0))
    served = qj.nnx.to_serving(qj.nnx.quantize_model(mha))
    tuned = qj.nnx.add_lora(served, 4, rngs=nnx.Rngs(1))
    assert {type(getattr(tuned, p)).__name__ for p in ("query", "key", "value", "out")} == {"LoRAGeneral"}
    assert tuned.query.lora_a.shape == (32, 4) and tuned.query.lora_b.shape == (4, 32)  # out (4 heads, 8)
    x = jax.random.normal(jax.random.key(2), (2, 5, 32))
    target = jax.random.normal(jax.random.key(3), (2, 5, 32))
    np.testing.assert_array_equal(tuned(x), served(x))
    loss = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    opt = nnx.Optimizer(tuned, optax.adam(1e-2), wrt=nnx.LoRAParam)
    before = float(loss(tuned))
    for _ in range(10):
        opt.update(tuned, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(tuned))
    assert float(loss(tuned)) < 0.9 * before
    lora = tuned.out  # contracts (heads, head features) = (4, 8) into 32
    delta = (x.reshape(2, 5, 32) @ lora.lora_a[...] @ lora.lora_b[...])
    np.testing.assert_allclose(lora(x.reshape(2, 5, 4, 8)), lora.base_module(x.reshape(2, 5, 4, 8)) + delta,
                               rtol=1e-5, atol=1e-5)
    merged = qj.nnx.merge_lora(tuned)
    assert type(merged.query) is qj.nnx.ServingLinearGeneral and merged.query.qarray.shape == (32, 4, 8)
    expected = qj.lora.merge_low_rank(served.query.qarray, tuned.query.lora_a[...], tuned.query.lora_b[...])
    jax.tree.map(np.testing.assert_array_equal, merged.query.qarray, expected)
    assert float(loss(merged)) < before


def test_qlora_over_stacked_layers_stacks_one_adapter_per_layer():
    """add_lora over layers made by nnx.vmap (it unpacked the stacked weight's shape as (K, N) and failed):
    adapters stacked (3, 16, r) / (3, r, 16), sliced by nnx.scan with the layers; merge_lora layer by layer."""
    import optax

    served = qj.nnx.to_serving(qj.nnx.quantize_model(_Stacked(nnx.Rngs(0))))
    tuned = qj.nnx.add_lora(served, 2, rngs=nnx.Rngs(1))
    assert tuned.layers.lora_a.shape == (3, 16, 2) and tuned.layers.lora_b.shape == (3, 2, 16)
    x, y = jax.random.normal(jax.random.key(2), (8, 16)), jax.random.normal(jax.random.key(3), (8, 16))
    np.testing.assert_array_equal(tuned(x), served(x))
    opt = nnx.Optimizer(tuned, optax.adam(1e-2), wrt=nnx.LoRAParam)
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    before = float(loss(tuned))
    for _ in range(5):
        opt.update(tuned, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(tuned))
    assert float(loss(tuned)) < before
    merged = qj.nnx.merge_lora(tuned)
    q = merged.layers.qarray
    assert q.shape == (3, 16, 16)
    expected = qj.lora.merge_low_rank(served.layers.qarray, tuned.layers.lora_a[...], tuned.layers.lora_b[...])
    jax.tree.map(np.testing.assert_array_equal, q, expected)
    np.testing.assert_allclose(qj.dequantize(q)[1], qj.dequantize(qj.lora.merge_low_rank(
        jax.tree.map(lambda a: a[1], served.layers.qarray), tuned.layers.lora_a[1], tuned.layers.lora_b[1])))


_EINSUM_SIZES = {"B": 2, "T": 3, "S": 3, "D": 16, "N": 4, "H": 8, "C": 2, "K": 2, "F": 12}


@pytest.mark.parametrize("einsum_str, kernel_delta, a_shape, b_shape", [
    ("BTD,NDH->BTNH", "Dr,rNH->NDH", (16, 3), (3, 4, 8)),  # Gemma's query heads
    ("BSD,CKDH->CBSKH", "Dr,rCKH->CKDH", (16, 3), (3, 2, 2, 8)),  # its keys and values together
    ("BTNH,NHD->BTD", "NHr,rD->NHD", (4, 8, 3), (3, 16)),  # its attention output
    ("BNTH,NHD->BNTD", "NHr,NrD->NHD", (4, 8, 3), (4, 3, 16)),  # heads as a batch axis: one adapter each
    ("...D,DF->...F", "Dr,rF->DF", (16, 3), (3, 12)),
])
def test_qlora_over_einsum_layers(einsum_str, kernel_delta, a_shape, b_shape):
    """add_lora adapts a served nnx.Einsum (LoRAEinsum): a holds the kernel's batch and contracted axes,
    b its batch and produced axes; the adapter adds einsum(x, a @ b as a kernel); merge_lora folds it in."""
    import optax

    x_sub, k_sub = einsum_str.split("->")[0].split(",")
    kernel_shape = tuple(_EINSUM_SIZES[c] for c in k_sub)
    x = jax.random.normal(jax.random.key(1), tuple(_EINSUM_SIZES[c] for c in x_sub.replace("...", "BT")))
    served = qj.nnx.to_serving(qj.nnx.quantize_model(nnx.Einsum(einsum_str, kernel_shape, rngs=nnx.Rngs(0))))
    tuned = qj.nnx.add_lora(served, 3, rngs=nnx.Rngs(2))
    assert type(tuned) is qj.nnx.LoRAEinsum
    assert tuned.lora_a.shape == a_shape and tuned.lora_b.shape == b_shape
    np.testing.assert_array_equal(tuned(x), served(x))  # lora_b starts at zero
    tuned.lora_b.set_value(jax.random.normal(jax.random.key(3), b_shape))
    a, b = tuned.lora_a[...], tuned.lora_b[...]
    delta = jnp.einsum(kernel_delta, a, b)  # the adapter as one kernel, by the hand-written subscripts
    np.testing.assert_allclose(tuned(x), served(x) + jnp.einsum(einsum_str, x, delta), rtol=1e-4, atol=1e-4)
    merged = qj.nnx.merge_lora(tuned)
    assert type(merged) is qj.nnx.ServingEinsum
    expected = qj.quantize(qj.dequantize(served.qarray) + delta, served.qarray.spec)
    jax.tree.map(np.testing.assert_array_equal, merged.qarray, expected)

    target = jax.random.normal(jax.random.key(4), served(x).shape)
    loss = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    opt = nnx.Optimizer(tuned, optax.adam(1e-2), wrt=nnx.LoRAParam)
    before = float(loss(tuned))
    for _ in range(5):
        opt.update(tuned, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(tuned))
    assert float(loss(tuned)) < before
    with pytest.raises(ValueError, match=r"LoRAEinsum: adapters made for einsum_str='.*' cannot run einsum_str='x'"):
        tuned(x, einsum_str="x")


def test_qlora_over_stacked_einsum_layers_with_a_batch_axis():
    """Stacked layers and a batch (heads) axis together: one adapter per layer and head, sliced by nnx.scan."""
    heads = lambda rngs: nnx.Einsum("BND,NDF->BNF", (2, 16, 16), rngs=rngs)  # noqa: E731  2 heads
    served = qj.nnx.to_serving(qj.nnx.quantize_model(_Stacked(nnx.Rngs(0), heads)))
    tuned = qj.nnx.add_lora(served, 2, rngs=nnx.Rngs(1))
    assert tuned.layers.lora_a.shape == (3, 2, 16, 2) and tuned.layers.lora_b.shape == (3, 2, 2, 16)
    a = tuned.layers.lora_a[...]
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0, 0], a[0, 1])  # each initialised on its own
    x = jax.random.normal(jax.random.key(2), (4, 2, 16))
    np.testing.assert_array_equal(tuned(x), served(x))
    tuned.layers.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(3), (3, 2, 2, 16)))
    h = x  # the scan by hand: each layer's packed kernel plus its per-head adapter product
    for i in range(3):
        kernel = qj.dequantize(served.layers.qarray)[i] + jnp.einsum("NDr,NrF->NDF", a[i], tuned.layers.lora_b[i])
        h = jax.nn.relu(jnp.einsum("BND,NDF->BNF", h, kernel))
    np.testing.assert_allclose(tuned(x), h, rtol=1e-4, atol=1e-4)
    merged = qj.nnx.merge_lora(tuned)
    assert merged.layers.qarray.shape == (3, 2, 16, 16)
    np.testing.assert_allclose(merged(x), h, rtol=0.2, atol=0.2)  # re-rounded to the 4-bit grid


class _GemmaBlock(nnx.Module):
    """A Gemma-style decoder: tied embeddings and one block of Einsum projections (grouped-query attention
    with keys and values in one kernel, a gated MLP with gate and up in one kernel)."""

    def __init__(self, rngs, vocab=64, d=32, heads=4, kv_heads=2, head_dim=8, hidden=48):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.q = nnx.Einsum("BTD,NDH->BTNH", (heads, d, head_dim), rngs=rngs)
        self.kv = nnx.Einsum("BSD,CKDH->CBSKH", (2, kv_heads, d, head_dim), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (heads, head_dim, d), rngs=rngs)
        self.gate = nnx.Einsum("BTD,GDF->GBTF", (2, d, hidden), rngs=rngs)
        self.down = nnx.Einsum("BTF,FD->BTD", (hidden, d), rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        k, v = self.kv(x)
        q = self.q(x).reshape(b, t, k.shape[-2], -1, k.shape[-1])
        w = jax.nn.softmax(jnp.einsum("BTKGH,BSKH->BKGTS", q, k) / np.sqrt(k.shape[-1]), axis=-1)
        x = x + self.o(jnp.einsum("BKGTS,BSKH->BTKGH", w, v).reshape(b, t, -1, k.shape[-1]))
        gate, up = self.gate(x)
        return self.embed.attend(x + self.down(jax.nn.gelu(gate) * up))


def test_a_gemma_style_model_from_qat_to_qlora_to_an_exported_artifact(tmp_path):
    """The whole journey over Einsum layers: QAT, packed serving equal to it, QLoRA on every projection
    under nnx.jit, adapters saved and loaded alone, merged into one packed model, exported for CPU + TPU."""
    import optax

    ids = jax.random.randint(jax.random.key(0), (4, 12), 0, 64)

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(ids[:, :-1]), ids[:, 1:]).mean()

    def train(model, wrt, steps):
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
        step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(m)))
        for _ in range(steps):
            step(model, opt)

    qat = qj.nnx.quantize_model(_GemmaBlock(nnx.Rngs(0)), quantize_embeddings=True)
    train(qat, nnx.Param, 3)
    served = qj.nnx.to_serving(qat)
    np.testing.assert_allclose(loss(served), loss(qat), rtol=1e-5)
    tuned = qj.nnx.add_lora(served, 4, rngs=nnx.Rngs(1))
    assert {type(getattr(tuned, p)).__name__ for p in ("q", "kv", "o", "gate", "down")} == {"LoRAEinsum"}
    train(tuned, nnx.LoRAParam, 8)
    assert float(loss(tuned)) < 0.98 * float(loss(served))
    qj.save(tmp_path / "adapters.safetensors", nnx.state(tuned, nnx.LoRAParam))
    fresh = qj.nnx.add_lora(served, 4, rngs=nnx.Rngs(7))
    nnx.update(fresh, qj.load(tmp_path / "adapters.safetensors"))
    np.testing.assert_array_equal(fresh(ids), tuned(ids))
    merged = qj.nnx.merge_lora(tuned)
    assert float(loss(merged)) < float(loss(served))
    blob, params = qj.export.export_nnx(merged, ids, platforms=["cpu", "tpu"])
    np.testing.assert_allclose(qj.export.load_serving(blob)(params, ids), merged(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, x_shape", [
    (lambda dtype: nnx.Einsum("btd,dhk->bthk", (2048, 4, 64), (4, 64), dtype=dtype, rngs=nnx.Rngs(0)), (2, 3, 2048)),
    (lambda dtype: nnx.LinearGeneral((16, 128), 256, axis=(-2, -1), dtype=dtype, rngs=nnx.Rngs(0)), (2, 3, 16, 128)),
    (lambda dtype: nnx.LinearGeneral(2048, (4, 64), dtype=dtype, rngs=nnx.Rngs(0)), (5, 2048)),
])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_einsum_and_linear_general_serve_through_the_packed_kernel(make, x_shape, dtype):
    layer = make(dtype)
    layer.bias[...] = jax.random.normal(jax.random.key(2), layer.bias.shape)
    qat = qj.nnx.quantize_model(layer)
    x = jax.random.normal(jax.random.key(1), x_shape)
    fast, exact = qj.nnx.to_serving(qat), qj.nnx.to_serving(qat, backend="xla")
    ref = qat(x)
    y = fast(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    tol = 1e-5 if dtype is None else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(exact(x), ref)
    # The fast path multiplies by the packed kernel, decoded a block of rows at a time: no float array as
    # large as the kernel is compiled.
    hlo = nnx.jit(lambda m, x: m(x)).lower(fast, x).compile().as_text()
    sizes = [np.prod([int(v) for v in dims.split(",") if v]) for dims in re.findall(r"(?:f32|bf16)\[([\d,]*)\]", hlo)]
    assert max(sizes) < layer.kernel.size
    hlo = nnx.jit(lambda m, x: m(x)).lower(exact, x).compile().as_text()
    assert f"f32[{','.join(map(str, layer.kernel.shape))}]" in hlo  # the xla path decodes the kernel


def test_w4a8_attention_projections_serve_through_the_packed_kernel_where_tokens_agree():
    """q / k / v contract the last axis: per-token int8 is the same per last axis (QAT) and per contraction
    (qeinsum), so they take the packed W4A8 product; the output projection contracts two axes and keeps
    the dequantizing forward."""
    attention = nnx.MultiHeadAttention(num_heads=4, in_features=64, qkv_features=64, decode=False, rngs=nnx.Rngs(0))
    qat = qj.nnx.quantize_model(attention, act_spec="int8")
    served = qj.nnx.to_serving(qat)
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    np.testing.assert_allclose(served(x), qat(x), rtol=1e-5, atol=1e-5)
    h = jax.random.normal(jax.random.key(2), (2, 5, 4, 16))
    for name in ("query", "out"):
        hlo = nnx.jit(lambda m, x: m(x)).lower(getattr(served, name), x if name == "query" else h).as_text()
        int8_dots = [ln for ln in hlo.splitlines() if "dot_general" in ln and "xi8>" in ln]
        assert bool(int8_dots) == (name == "query")  # the integer product, or the dequantizing forward
