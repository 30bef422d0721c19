import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantize_jax as qj

from .conftest import SIXTEEN_BIT_MODELS, assert_serves_like_16_bit_qat


class _MLP(nn.Module):
    spec: qj.QuantSpec
    act_spec: object = None
    learn_scale: bool = False
    dtype: object = None
    param_dtype: object = jnp.float32
    backend: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(weight_spec=self.spec, act_spec=self.act_spec, learn_scale=self.learn_scale, dtype=self.dtype,
                  param_dtype=self.param_dtype, backend=self.backend)
        return qj.linen.QuantDense(6, **kw)(nn.relu(qj.linen.QuantDense(32, **kw)(x)))


@pytest.mark.parametrize("dtype, param_dtype", SIXTEEN_BIT_MODELS)
@pytest.mark.parametrize("act_spec", [None, "int8"])
def test_16_bit_dense_layers_serve_in_their_own_dtype(dtype, param_dtype, act_spec):
    """Served QuantDense computes in the dtype nn.Dense would (it returned float32 for a bf16 layer with
    float32 parameters); ``backend="xla"``: bit for bit."""
    spec = qj.QuantSpec(format="uint4", axis=0, group_size=8)
    x = jax.random.normal(jax.random.key(1), (7, 16))
    model = _MLP(spec, act_spec, dtype=dtype, param_dtype=param_dtype)
    variables = model.init(jax.random.key(0), x)
    ref = model.apply(variables, x)
    served = qj.linen.to_serving_params(model, variables, x)
    assert_serves_like_16_bit_qat(model.apply(served, x), ref, dtype, param_dtype, act_spec)
    exact = _MLP(spec, act_spec, dtype=dtype, param_dtype=param_dtype, backend="xla")
    np.testing.assert_array_equal(exact.apply(served, x), ref)


def test_param_tree_is_dense_s():
    x = jnp.ones((2, 16))
    ref = nn.Dense(8).init(jax.random.key(0), x)
    q = qj.linen.QuantDense(8).init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(q)
    np.testing.assert_array_equal(ref["params"]["kernel"], q["params"]["kernel"])


@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4", "fp4"])
@pytest.mark.parametrize("options", [{}, {"learn_scale": True}, {"act_spec": "int8"}])
def test_serving_params_equal_qat(fmt, options):
    if fmt == "nf4" and options.get("act_spec") == "int8":
        return  # W4A8 needs integer levels (tested in test_matmul)
    model = _MLP(qj.QuantSpec(format=fmt, axis=0, group_size=8), **options)
    x = jax.random.normal(jax.random.key(1), (5, 16))
    variables = model.init(jax.random.key(0), x)
    served = qj.linen.to_serving_params(model, variables, x)
    kernels = [served["params"][k]["kernel"] for k in ("QuantDense_0", "QuantDense_1")]
    assert all(isinstance(k, qj.QArray) for k in kernels)
    assert all("weight_scale" not in served["params"][k] for k in ("QuantDense_0", "QuantDense_1"))
    ref, out = model.apply(variables, x), model.apply(served, x)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) <= 1e-6


def test_learned_scale_gets_gradients():
    model = _MLP(qj.QuantSpec(axis=0), learn_scale=True)
    x = jax.random.normal(jax.random.key(1), (5, 16))
    variables = model.init(jax.random.key(0), x)
    g = jax.grad(lambda v: (model.apply(v, x) ** 2).sum())(variables)
    assert float(jnp.abs(g["params"]["QuantDense_0"]["weight_scale"]).sum()) > 0
    assert float(jnp.abs(g["params"]["QuantDense_0"]["kernel"]).sum()) > 0


def test_injected_dot_general_and_conv_equal_fake_quant_weights():
    spec = qj.QuantSpec(axis=0)
    x = jax.random.normal(jax.random.key(2), (3, 16))
    dense = nn.Dense(8, dot_general=qj.linen.quant_dot_general(spec))
    v = dense.init(jax.random.key(0), x)
    expect = x @ qj.fake_quant(v["params"]["kernel"], spec) + v["params"]["bias"][None]
    np.testing.assert_allclose(dense.apply(v, x), expect, rtol=1e-6, atol=1e-6)
    conv_spec = qj.QuantSpec(axis=(0, 1, 2))
    conv = nn.Conv(4, (3, 3), conv_general_dilated=qj.linen.quant_conv_general_dilated(conv_spec))
    img = jax.random.normal(jax.random.key(3), (1, 6, 6, 2))
    cv = conv.init(jax.random.key(0), img)
    plain = nn.Conv(4, (3, 3))
    fq = {"params": {"kernel": qj.fake_quant(cv["params"]["kernel"], conv_spec), "bias": cv["params"]["bias"]}}
    np.testing.assert_allclose(conv.apply(cv, img), plain.apply(fq, img), rtol=1e-6, atol=1e-6)


def test_nnx_and_linen_agree_on_the_same_weights():
    spec = qj.QuantSpec(format="nf4", axis=0, group_size=4)
    x = jax.random.normal(jax.random.key(4), (3, 12))
    linen_layer = qj.linen.QuantDense(5, weight_spec=spec)
    v = linen_layer.init(jax.random.key(0), x)
    nnx_layer = qj.nnx.QuantLinear(12, 5, weight_spec=spec, rngs=nnx.Rngs(0))
    nnx_layer.kernel[...] = v["params"]["kernel"]
    nnx_layer.bias[...] = v["params"]["bias"]
    np.testing.assert_array_equal(nnx_layer(x), linen_layer.apply(v, x))
    served_nnx = qj.nnx.to_serving(nnx_layer)
    served_linen = qj.linen.to_serving_params(linen_layer, v, x)
    np.testing.assert_array_equal(served_nnx.qarray.packed, served_linen["params"]["kernel"].packed)


class _Cell(nn.Module):
    learn_scale: bool = False

    @nn.compact
    def __call__(self, x, _):
        return nn.relu(qj.linen.QuantDense(16, learn_scale=self.learn_scale)(x)), None


@pytest.mark.parametrize("learn_scale", [False, True])
def test_layers_stacked_by_nn_scan_serve_with_stacked_qarrays(learn_scale):
    def stack(collections):
        return nn.scan(_Cell, variable_axes=collections, split_rngs={"params": True}, length=3)(learn_scale)

    x = jax.random.normal(jax.random.key(1), (4, 16))
    model = stack({"params": 0, "qarrays": 0})
    variables = model.init(jax.random.key(0), x, None)
    served = qj.linen.to_serving_params(model, variables, x, None)
    q = served["params"]["QuantDense_0"]["kernel"]
    assert q.packed.shape == (3, 16, 8) and q.scale.shape == (3, 1, 16)  # one QArray per layer, stacked
    assert q.shape == (3, 16, 16) and q.spec.axis == 1
    np.testing.assert_allclose(model.apply(served, x, None)[0], model.apply(variables, x, None)[0], rtol=1e-6, atol=1e-6)
    only_params = stack({"params": 0})
    with pytest.raises(ValueError, match=r"need 'qarrays' in variable_axes"):
        qj.linen.to_serving_params(only_params, only_params.init(jax.random.key(0), x, None), x, None)


def test_conversion_without_quant_layers_is_refused():
    dense = nn.Dense(3)
    v = dense.init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"to_serving_params: the module holds no quantize_jax layer"):
        qj.linen.to_serving_params(dense, v, jnp.ones((1, 4)))


@pytest.mark.parametrize("make, shape", [
    (lambda: qj.linen.QuantConv(6, (3, 3)), (2, 6, 6, 3)),
    (lambda: qj.linen.QuantConv(6, (3, 3), weight_spec=qj.QuantSpec(format="nf4", axis=(0, 1, 2)),
                                act_spec="int8"), (2, 6, 6, 3)),
    (lambda: qj.linen.QuantDenseGeneral((2, 4)), (3, 8)),
    (lambda: qj.linen.QuantEinsum((8, 2, 4), "btd,dhk->bthk"), (2, 5, 8)),
])
def test_conv_densegeneral_einsum_qat_serving_and_params(make, shape):
    layer = make()
    x = jax.random.normal(jax.random.key(8), shape)
    v = layer.init(jax.random.key(0), x)
    base = {qj.linen.QuantConv: nn.Conv, qj.linen.QuantDenseGeneral: nn.DenseGeneral,
            qj.linen.QuantEinsum: nn.Einsum}[type(layer)]
    fields = {f: getattr(layer, f) for f in ("features", "kernel_size", "shape", "einsum_str", "axis")
              if hasattr(layer, f) and f in base.__dataclass_fields__}
    ref_layer = base(**fields)
    ref_v = ref_layer.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ref_v) == jax.tree_util.tree_structure(v)
    kernel = v["params"]["kernel"]
    spec = layer.weight_spec or qj.QuantSpec(axis=tuple(range(kernel.ndim - 1)))
    fq = {"params": {**v["params"], "kernel": qj.fake_quant(kernel, spec)}}
    x_in = qj.matmul.fake_int8_tokens(x) if layer.act_spec == "int8" else x
    np.testing.assert_allclose(layer.apply(v, x), ref_layer.apply(fq, x_in), rtol=1e-6, atol=1e-6)
    served = qj.linen.to_serving_params(layer, v, x)
    assert isinstance(served["params"]["kernel"], qj.QArray)
    np.testing.assert_allclose(layer.apply(served, x), layer.apply(v, x), rtol=1e-6, atol=1e-6)


class _TiedLM(nn.Module):
    spec: qj.QuantSpec | None = None

    @nn.compact
    def __call__(self, ids):
        embed = qj.linen.QuantEmbed(40, 16, weight_spec=self.spec, backend="xla")
        return embed.attend(jax.nn.gelu(qj.linen.QuantDense(16, backend="xla")(embed(ids))))


@pytest.mark.parametrize("spec", [None, qj.QuantSpec(format="nf4", axis=0, group_size=16),
                                  qj.QuantSpec(format="uint4", axis=1)])
def test_embedding_qat_and_serving_bit_for_bit(spec):
    model = _TiedLM(spec)
    ids = jnp.array([[0, 39, 7, -1], [3, 3, 40, 12]])  # 40: out of range, a NaN row as nn.Embed gives
    v = model.init(jax.random.key(0), ids)
    table = v["params"]["QuantEmbed_0"]["embedding"]
    ref = nn.Embed(40, 16).apply({"params": {"embedding": qj.fake_quant(table, spec or qj.QuantSpec(axis=1))}}, ids)
    embed = qj.linen.QuantEmbed(40, 16, weight_spec=spec)
    np.testing.assert_array_equal(embed.apply({"params": v["params"]["QuantEmbed_0"]}, ids), ref)
    served = qj.linen.to_serving_params(model, v, ids)
    q = served["params"]["QuantEmbed_0"]["embedding"]
    assert isinstance(q, qj.QArray) and q.packed.shape == (40, 8)
    np.testing.assert_array_equal(model.apply(served, ids), model.apply(v, ids))
    np.testing.assert_array_equal(jax.jit(model.apply)(served, ids), jax.jit(model.apply)(v, ids))
    assert int(jnp.isnan(model.apply(served, ids)).any(axis=-1).sum()) == 1
    h = jax.random.normal(jax.random.key(1), (3, 16))  # default backend: attend over the packed table
    logits = embed.apply({"params": served["params"]["QuantEmbed_0"]}, h, method="attend")
    np.testing.assert_allclose(logits, h @ qj.dequantize(q).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, x_shape", [
    (lambda backend: qj.linen.QuantDenseGeneral((4, 64), backend=backend), (2, 3, 2048)),
    (lambda backend: qj.linen.QuantDenseGeneral(256, axis=(-2, -1), backend=backend), (2, 16, 128)),
    (lambda backend: qj.linen.QuantEinsum((2048, 4, 64), "btd,dhk->bthk", backend=backend), (2, 3, 2048)),
])
def test_dense_general_and_einsum_serve_through_the_packed_kernel(make, x_shape):
    x = jax.random.normal(jax.random.key(1), x_shape)
    layer = make("auto")
    v = layer.init(jax.random.key(0), x)
    v = {"params": {**v["params"], "bias": jax.random.normal(jax.random.key(2), v["params"]["bias"].shape)}}
    served = qj.linen.to_serving_params(layer, v, x)
    ref = layer.apply(v, x)
    np.testing.assert_allclose(layer.apply(served, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(make("xla").apply(served, x), ref)  # the dequantizing forward: bit for bit
    kernel_size = v["params"]["kernel"].size
    for backend, packed in (("auto", True), ("xla", False)):
        hlo = jax.jit(make(backend).apply).lower(served, x).compile().as_text()
        sizes = [np.prod([int(d) for d in dims.split(",") if d]) for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
        assert (max(sizes) < kernel_size) == packed  # packed: no float array as large as the kernel


def test_w4a8_dense_general_serves_through_the_packed_integer_product():
    layer = qj.linen.QuantDenseGeneral((4, 16), act_spec="int8")
    x = jax.random.normal(jax.random.key(1), (2, 3, 64))
    v = layer.init(jax.random.key(0), x)
    served = qj.linen.to_serving_params(layer, v, x)
    np.testing.assert_allclose(layer.apply(served, x), layer.apply(v, x), rtol=1e-5, atol=1e-5)
    hlo = jax.jit(layer.apply).lower(served, x).as_text()
    assert [ln for ln in hlo.splitlines() if "dot_general" in ln and "xi8>" in ln]  # int8 x int8 sums


def _train_adapters(model, served, x, target, steps):
    """Adam over the "lora" collection alone, the packed params frozen: (adapters, first loss, last loss)."""
    import optax

    def loss(lora):
        return jnp.mean((model.apply({"params": served["params"], "lora": lora}, x) - target) ** 2)

    opt = optax.adam(1e-2)
    lora, state = served["lora"], opt.init(served["lora"])
    first = float(loss(lora))
    for _ in range(steps):
        updates, state = opt.update(jax.grad(loss)(lora), state)
        lora = optax.apply_updates(lora, updates)
    return lora, first, float(loss(lora))


class _LoraMLP(nn.Module):
    rank: int = 4

    @nn.compact
    def __call__(self, x):
        spec = qj.QuantSpec(format="nf4", axis=0, group_size=16)
        h = nn.relu(qj.linen.QuantDense(32, weight_spec=spec, lora_rank=self.rank)(x))
        return qj.linen.QuantDense(6, weight_spec=spec, lora_rank=self.rank)(h)


def test_qlora_adapters_train_over_packed_dense_kernels_and_merge():
    model = _LoraMLP()
    x = jax.random.normal(jax.random.key(1), (16, 16))
    target = jax.random.normal(jax.random.key(2), (16, 6))
    variables = model.init(jax.random.key(0), x)
    assert variables["lora"]["QuantDense_0"]["a"].shape == (16, 4) and variables["lora"]["QuantDense_1"]["b"].shape == (4, 6)
    served = qj.linen.to_serving_params(model, variables, x)
    frozen = served["params"]
    assert isinstance(frozen["QuantDense_0"]["kernel"], qj.QArray)
    base = model.apply({"params": frozen}, x)  # no adapters: the plain served layers
    np.testing.assert_array_equal(model.apply(served, x), base)  # b starts at zero

    lora, first, last = _train_adapters(model, served, x, target, 30)
    assert last < 0.7 * first
    tuned = model.apply({"params": frozen, "lora": lora}, x)
    merged = qj.linen.merge_lora({"params": frozen, "lora": lora})
    assert "lora" not in merged
    q = frozen["QuantDense_0"]["kernel"]
    a, b = lora["QuantDense_0"]["a"], lora["QuantDense_0"]["b"]
    expect = qj.quantize(qj.dequantize(q) + a @ b, q.spec)
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["QuantDense_0"]["kernel"], expect)
    out = model.apply(merged, x)  # the adapters' product re-rounded to the nf4 grid
    assert float(jnp.mean((out - tuned) ** 2)) < 0.1 * float(jnp.mean((tuned - base) ** 2))
    with pytest.raises(ValueError, match=r"merge_lora: the variables hold no 'lora' collection"):
        qj.linen.merge_lora(merged)


class _LoraHeads(nn.Module):
    """Attention-like projections: 32 features to 4 heads of 8 and back, both QuantDenseGeneral with adapters."""

    @nn.compact
    def __call__(self, x):
        heads = qj.linen.QuantDenseGeneral((4, 8), lora_rank=3, name="heads")(x)
        return qj.linen.QuantDenseGeneral(32, axis=(-2, -1), lora_rank=3, name="out")(jnp.tanh(heads))


def test_qlora_over_dense_general_projections():
    """QuantDenseGeneral(lora_rank=r): adapters over the contracted axes and the features flattened,
    trained over a packed base, merged into packed kernels (and into float ones before serving)."""
    model = _LoraHeads()
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    target = jax.random.normal(jax.random.key(2), (2, 5, 32))
    variables = model.init(jax.random.key(0), x)
    assert variables["lora"]["heads"]["a"].shape == (32, 3) and variables["lora"]["heads"]["b"].shape == (3, 32)
    assert variables["lora"]["out"]["a"].shape == (32, 3)
    served = qj.linen.to_serving_params(model, variables, x)
    frozen = served["params"]
    np.testing.assert_array_equal(model.apply(served, x), model.apply({"params": frozen}, x))  # b starts at zero

    lora, first, last = _train_adapters(model, served, x, target, 10)
    assert last < 0.9 * first
    a, b = lora["out"]["a"], lora["out"]["b"]  # the output projection contracts (heads, features) = (4, 8)
    heads = qj.dequantize(frozen["heads"]["kernel"]) + (lora["heads"]["a"] @ lora["heads"]["b"]).reshape(32, 4, 8)
    h = jnp.tanh(jnp.einsum("btd,dhk->bthk", x, heads) + frozen["heads"]["bias"][None, None])
    expected = (jnp.einsum("bthk,hkd->btd", h, qj.dequantize(frozen["out"]["kernel"]))
                + frozen["out"]["bias"][None, None] + h.reshape(2, 5, 32) @ a @ b)
    np.testing.assert_allclose(model.apply({"params": frozen, "lora": lora}, x), expected, rtol=1e-4, atol=1e-4)
    merged = qj.linen.merge_lora({"params": frozen, "lora": lora})
    q = frozen["heads"]["kernel"]
    want = qj.quantize(qj.dequantize(q) + (lora["heads"]["a"] @ lora["heads"]["b"]).reshape(32, 4, 8), q.spec)
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["heads"]["kernel"], want)
    float_merged = qj.linen.merge_lora({"params": variables["params"], "lora": lora})  # QAT kernels: float sums
    np.testing.assert_allclose(float_merged["params"]["out"]["kernel"],
                               variables["params"]["out"]["kernel"] + (a @ b).reshape(4, 8, 32), rtol=1e-6)
    with pytest.raises(ValueError, match=r"QuantDenseGeneral: lora_rank=2 needs batch_dims=\(\), got batch_dims=\(0,\)"):
        qj.linen.QuantDenseGeneral(4, batch_dims=(0,), lora_rank=2).init(jax.random.key(0), jnp.ones((2, 3, 8)))


class _GptqMLP(nn.Module):
    learn_scale: bool = False

    @nn.compact
    def __call__(self, x):
        spec = qj.QuantSpec(axis=0, group_size=8)
        h = nn.relu(qj.linen.QuantDense(32, weight_spec=spec, learn_scale=self.learn_scale)(x))
        return qj.linen.QuantDense(6, weight_spec=spec, learn_scale=self.learn_scale)(h)


def test_gptq_serving_params_beat_rounding_to_nearest_on_correlated_inputs():
    """to_serving_params_gptq: each QuantDense kernel quantized by GPTQ for the inputs recorded over the
    batches (the first layer's are the batches: its QArray is ptq.gptq of them all); less output error.
    Sequential: the second layer's inputs come through the first one's GPTQ kernel."""
    model = _GptqMLP()
    mix = jax.random.normal(jax.random.key(2), (16, 16))
    batches = [jax.random.normal(jax.random.key(10 + i), (64, 16)) @ mix for i in range(4)]
    variables = model.init(jax.random.key(0), batches[0])
    served = qj.linen.to_serving_params_gptq(model, variables, iter(batches), progress=False)
    rounded = qj.linen.to_serving_params(model, variables, batches[0])
    assert isinstance(variables["params"]["QuantDense_0"]["kernel"], jax.Array)  # the QAT variables are left alone
    first = served["params"]["QuantDense_0"]["kernel"]
    expected = qj.ptq.gptq(variables["params"]["QuantDense_0"]["kernel"], jnp.concatenate(batches), first.spec)
    assert float(jnp.mean(first.packed == expected.packed)) > 0.99  # the batches' sums: last bits
    np.testing.assert_allclose(first.scale, expected.scale, rtol=1e-5)
    def float_forward(x):  # the float model: the kernels as trained, unquantized
        p = variables["params"]
        h = nn.relu(x @ p["QuantDense_0"]["kernel"] + p["QuantDense_0"]["bias"][None])
        return h @ p["QuantDense_1"]["kernel"] + p["QuantDense_1"]["bias"][None]

    test = jax.random.normal(jax.random.key(3), (256, 16)) @ mix
    error = lambda v: float(jnp.mean((model.apply(v, test) - float_forward(test)) ** 2))  # noqa: E731
    assert error(served) < 0.85 * error(rounded)
    only_second = qj.linen.to_serving_params_gptq(model, variables, batches, where="_1$", progress=False)
    jax.tree.map(np.testing.assert_array_equal, only_second["params"]["QuantDense_0"], rounded["params"]["QuantDense_0"])
    assert float(jnp.mean(only_second["params"]["QuantDense_1"]["kernel"].packed
                          == rounded["params"]["QuantDense_1"]["kernel"].packed)) < 0.9
    # sequential: the second layer records its inputs through the first one's GPTQ kernel
    in_order = qj.linen.to_serving_params_gptq(model, variables, batches, sequential=True, progress=False)
    np.testing.assert_array_equal(in_order["params"]["QuantDense_0"]["kernel"].packed, first.packed)
    layer0 = {"params": in_order["params"]["QuantDense_0"]}
    hidden = jnp.concatenate([nn.relu(qj.linen.QuantDense(32, weight_spec=first.spec).apply(layer0, b)) for b in batches])
    expected = qj.ptq.gptq(variables["params"]["QuantDense_1"]["kernel"], hidden, first.spec)
    assert float(jnp.mean(in_order["params"]["QuantDense_1"]["kernel"].packed == expected.packed)) > 0.99


def test_gptq_serving_params_refuse_what_they_cannot_calibrate():
    x = jnp.ones((4, 16))
    model = _GptqMLP(learn_scale=True)
    with pytest.raises(ValueError, match="to_serving_params_gptq: no layer GPTQ can quantize matching where='' was "
                                         "called"):
        qj.linen.to_serving_params_gptq(model, model.init(jax.random.key(0), x), [x], progress=False)
    with pytest.raises(ValueError, match="to_serving_params_gptq: batches is empty"):
        qj.linen.to_serving_params_gptq(_GptqMLP(), _GptqMLP().init(jax.random.key(0), x), [], progress=False)
    scanned = nn.scan(_Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    with pytest.raises(ValueError, match=re.escape(
            "to_serving_params_gptq: layers inside nn.scan / nn.vmap record their inputs in the 'qarrays' "
            "collection: scan it like 'params' (variable_axes={'params': 0, 'qarrays': 0})")):
        qj.linen.to_serving_params_gptq(scanned, scanned.init(jax.random.key(0), x, None), [(x, None)],
                                        progress=False)


class _ScannedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(_Cell, variable_axes={"params": 0, "qarrays": 0}, split_rngs={"params": True}, length=3)()(
            x, None)
        return qj.linen.QuantDense(4)(x)


def test_gptq_serving_params_of_layers_stacked_by_nn_scan():
    """Layers of an nn.scan record their inputs into the scanned "qarrays" collection: each layer of the
    stack is quantized by GPTQ for its own inputs, the QArrays stacked as to_serving_params stacks them."""
    mix = jax.random.normal(jax.random.key(2), (16, 16))
    batches = [jax.random.normal(jax.random.key(10 + i), (64, 16)) @ mix for i in range(3)]
    model = _ScannedMLP()
    variables = model.init(jax.random.key(0), batches[0])
    served = qj.linen.to_serving_params_gptq(model, variables, batches, progress=False)
    rounded = qj.linen.to_serving_params(model, variables, batches[0])
    q, r = (v["params"]["Scan_Cell_0"]["QuantDense_0"]["kernel"] for v in (served, rounded))
    assert (q.shape, q.spec, q.scale.shape) == (r.shape, r.spec, r.scale.shape) == ((3, 16, 16), r.spec, (3, 1, 16))
    cell = variables["params"]["Scan_Cell_0"]["QuantDense_0"]
    x = jnp.concatenate(batches)
    for i in range(2):  # each layer on its own inputs: the QAT model's, through the layers before it
        expected = qj.ptq.gptq(cell["kernel"][i], x, qj.QuantSpec(axis=0))
        assert float(jnp.mean(q.packed[i] == expected.packed)) > 0.99
        layer = {"params": {"kernel": cell["kernel"][i], "bias": cell["bias"][i]}}
        x = nn.relu(qj.linen.QuantDense(16).apply(layer, x))
    head, rounded_head = (v["params"]["QuantDense_0"]["kernel"] for v in (served, rounded))
    assert float(jnp.mean(head.packed == rounded_head.packed)) < 0.9  # the head too, outside the scan
    in_two = qj.linen.to_serving_params_gptq(model, variables, batches, max_moment_bytes=16 * 16 * 4 * 3,
                                             progress=False)
    assert float(jnp.mean(in_two["params"]["Scan_Cell_0"]["QuantDense_0"]["kernel"].packed == q.packed)) > 0.99


class _GptqCNN(nn.Module):
    conv: type = qj.linen.QuantConv

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(8, (3, 3), name="first")(x))
        x = nn.relu(self.conv(8, (3, 3), strides=2, padding="CIRCULAR", name="down")(x))
        x = nn.relu(self.conv(8, (3, 3), feature_group_count=8, name="depthwise")(x))
        return self.conv(8, (1, 1), conv_general_dilated=jax.lax.conv_general_dilated, name="custom")(x)


def test_gptq_serving_params_of_conv_layers_calibrate_on_their_patches():
    """QuantConv kernels quantized by GPTQ for the patches their convolution multiplies (after CIRCULAR
    padding, with strides; a depthwise one channel by channel); a layer with its own convolution function
    keeps rounding."""
    dims = ("NHWC", "HWIO", "NHWC")
    noise = [jax.random.normal(jax.random.key(10 + i), (8, 10, 10, 3)) for i in range(3)]
    batches = [jnp.cumsum(jnp.cumsum(b, axis=1), axis=2) / 4 for b in noise]  # neighbouring pixels correlate
    model = _GptqCNN()
    variables = model.init(jax.random.key(0), batches[0])
    served = qj.linen.to_serving_params_gptq(model, variables, batches, progress=False)
    rounded = qj.linen.to_serving_params(model, variables, batches[0])
    params = variables["params"]
    hidden = [nn.relu(qj.linen.QuantConv(8, (3, 3)).apply({"params": params["first"]}, b)) for b in batches]
    for name, inputs, strides, padding in (
            ("first", batches, (1, 1), "SAME"),
            ("down", [jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap") for h in hidden], (2, 2), "VALID")):
        kernel = params[name]["kernel"]
        rows, axes = qj.ptq.conv_rows(jnp.concatenate(inputs), kernel, strides, padding, dimension_numbers=dims)
        expected = qj.ptq.gptq_kernel(kernel, qj.ptq.gram(rows) / len(rows), qj.QuantSpec(axis=(0, 1, 2)),
                                      input_axes=axes)
        assert float(jnp.mean(served["params"][name]["kernel"].packed == expected.packed)) > 0.99
    down = qj.linen.QuantConv(8, (3, 3), strides=2, padding="CIRCULAR")
    inputs = jnp.concatenate([nn.relu(down.apply({"params": params["down"]}, h)) for h in hidden])
    kernel = params["depthwise"]["kernel"]
    rows, axes = qj.ptq.conv_rows(inputs, kernel, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=8)
    expected = qj.ptq.gptq_kernel(kernel, qj.ptq.gram(rows, groups=8) / len(rows), qj.QuantSpec(axis=(0, 1, 2)),
                                  input_axes=axes, groups=8)
    assert float(jnp.mean(served["params"]["depthwise"]["kernel"].packed == expected.packed)) > 0.99
    jax.tree.map(np.testing.assert_array_equal, served["params"]["custom"], rounded["params"]["custom"])
    test = jnp.cumsum(jnp.cumsum(jax.random.normal(jax.random.key(3), (16, 10, 10, 3)), axis=1), axis=2) / 4
    reference = _GptqCNN(conv=nn.Conv).apply(variables, test)  # the float model
    error = lambda v: float(jnp.mean((model.apply(v, test) - reference) ** 2))  # noqa: E731
    assert error(served) < 0.85 * error(rounded)


def test_gptq_serving_params_of_expert_einsums_walk_each_expert_on_its_own_tokens():
    """A QuantEinsum whose kernel leads with a batch axis of the einsum (experts): each expert's slice by
    GPTQ on its own tokens, the QArray in the layer's layout."""
    mix = jax.random.normal(jax.random.key(2), (3, 16, 16))
    batches = [jnp.einsum("ecd,edk->eck", jax.random.normal(jax.random.key(10 + i), (3, 32, 16)), mix)
               for i in range(2)]
    layer = qj.linen.QuantEinsum(shape=(3, 16, 8), einsum_str="ECD,EDF->ECF", weight_spec=qj.QuantSpec(axis=1))
    variables = layer.init(jax.random.key(0), batches[0])
    served = qj.linen.to_serving_params_gptq(layer, variables, batches, progress=False)
    q = served["params"]["kernel"]
    assert (q.shape, q.spec, q.scale.shape) == ((3, 16, 8), qj.QuantSpec(axis=1), (3, 1, 8))
    x = jnp.concatenate(batches, axis=1)
    for e in range(3):
        expected = qj.ptq.gptq(variables["params"]["kernel"][e], x[e], qj.QuantSpec(axis=0))
        assert float(jnp.mean(q.packed[e] == expected.packed)) > 0.99


class _Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = qj.linen.QuantDense(16)
        return shared(shared(x))


def test_gptq_serving_params_of_a_layer_called_twice_take_both_inputs():
    x = jax.random.normal(jax.random.key(0), (32, 16))
    model = _Twice()
    variables = model.init(jax.random.key(1), x)
    inner = qj.linen.QuantDense(16).apply({"params": variables["params"]["QuantDense_0"]}, x)
    for act_order in (False, True):
        served = qj.linen.to_serving_params_gptq(model, variables, [x], act_order=act_order, progress=False)
        expected = qj.ptq.gptq(variables["params"]["QuantDense_0"]["kernel"], jnp.concatenate([x, inner]),
                               qj.QuantSpec(axis=0), act_order=act_order)
        assert float(jnp.mean(served["params"]["QuantDense_0"]["kernel"].packed == expected.packed)) > 0.99


class _LoraEinsums(nn.Module):
    """Gemma-style einsum projections with adapters: query heads, per-head mixing (heads a batch axis), output."""

    @nn.compact
    def __call__(self, x):
        h = qj.linen.QuantEinsum((4, 32, 8), "BTD,NDH->BTNH", use_bias=False, lora_rank=3, name="q")(x)
        h = jnp.tanh(h).transpose(0, 2, 1, 3)  # (B, N, T, H)
        h = qj.linen.QuantEinsum((4, 8, 8), "BNTH,NHK->BNTK", use_bias=False, lora_rank=3, name="mix")(h)
        return qj.linen.QuantEinsum((4, 8, 32), "BNTK,NKD->BTD", lora_rank=3, name="o")(jnp.tanh(h))


def test_qlora_over_einsum_layers_held_in_the_kernels_axes():
    """QuantEinsum(lora_rank=r): a and b in the kernel's own axes (size 1 where they do not reach), their
    weight sum_r a[..., r] b[..., r]; trained over packed kernels and merged from the shapes alone."""
    model = _LoraEinsums()
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    target = jax.random.normal(jax.random.key(2), (2, 5, 32))
    variables = model.init(jax.random.key(0), x)
    lora = variables["lora"]
    assert (lora["q"]["a"].shape, lora["q"]["b"].shape) == ((1, 32, 1, 3), (4, 1, 8, 3))
    assert (lora["mix"]["a"].shape, lora["mix"]["b"].shape) == ((4, 8, 1, 3), (4, 1, 8, 3))  # N: one per head
    served = qj.linen.to_serving_params(model, variables, x)
    np.testing.assert_array_equal(model.apply(served, x), model.apply({"params": served["params"]}, x))
    lora, first, last = _train_adapters(model, served, x, target, 10)
    assert last < 0.9 * first
    frozen = served["params"]
    weight = {k: (np.asarray(v["a"]) * np.asarray(v["b"])).sum(-1) for k, v in lora.items()}  # broadcast by numpy
    kernel = {k: qj.dequantize(v["kernel"]) + weight[k] for k, v in frozen.items()}
    h = jnp.tanh(jnp.einsum("BTD,NDH->BTNH", x, kernel["q"])).transpose(0, 2, 1, 3)
    h = jnp.tanh(jnp.einsum("BNTH,NHK->BNTK", h, kernel["mix"]))
    expected = jnp.einsum("BNTK,NKD->BTD", h, kernel["o"]) + frozen["o"]["bias"][None, None]
    np.testing.assert_allclose(model.apply({"params": frozen, "lora": lora}, x), expected, rtol=1e-4, atol=1e-4)
    merged = qj.linen.merge_lora({"params": frozen, "lora": lora})
    q = frozen["mix"]["kernel"]
    np.testing.assert_allclose(qj.dequantize(merged["params"]["mix"]["kernel"]),
                               qj.dequantize(qj.quantize(qj.dequantize(q) + weight["mix"], q.spec)), rtol=1e-6)
    float_merged = qj.linen.merge_lora({"params": variables["params"], "lora": lora})
    np.testing.assert_allclose(float_merged["params"]["o"]["kernel"],
                               variables["params"]["o"]["kernel"] + weight["o"], rtol=1e-5, atol=1e-6)


class _GptqHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = qj.linen.QuantDenseGeneral((4, 8), weight_spec=qj.QuantSpec(axis=0), name="general")(x)
        b = qj.linen.QuantEinsum((4, 32, 8), "BTD,NDH->BTNH", weight_spec=qj.QuantSpec(axis=1, group_size=16),
                                 name="einsum")(x)
        c = qj.linen.QuantEinsum((4, 32, 8), "BTD,NDH->BTNH", name="shared")(x)  # default: one scale per H
        return a + b + c


def test_gptq_serving_params_of_dense_general_and_einsum_projections():
    """QuantDenseGeneral ((D, N, H): D first) and QuantEinsum ((N, D, H): D moved first for GPTQ, groups
    along it): each QArray is GPTQ of its kernel viewed as (D, N * H) for the inputs, in its own layout.
    QuantEinsum's default spec (scales shared across N) keeps rounding's scales, with less output error.
    Calibrated one layer per pass (max_moment_bytes), the kernels come out the same."""
    model = _GptqHeads()
    mix = jax.random.normal(jax.random.key(2), (32, 32))
    batches = [jax.random.normal(jax.random.key(10 + i), (2, 16, 32)) @ mix for i in range(2)]
    variables = model.init(jax.random.key(0), batches[0])
    served = qj.linen.to_serving_params_gptq(model, variables, batches, progress=False)
    rounded = qj.linen.to_serving_params(model, variables, batches[0])
    x = jnp.concatenate(batches).reshape(-1, 32)
    for name, axes, spec in (("general", (0, 1, 2), qj.QuantSpec(axis=0)),
                             ("einsum", (1, 0, 2), qj.QuantSpec(axis=0, group_size=16))):
        kernel, q = variables["params"][name]["kernel"], served["params"][name]["kernel"]
        r = rounded["params"][name]["kernel"]
        assert (q.shape, q.spec, q.scale.shape) == (r.shape, r.spec, r.scale.shape)
        expected = qj.dequantize(qj.ptq.gptq(kernel.transpose(axes).reshape(32, -1), x, spec))
        np.testing.assert_allclose(qj.dequantize(q), expected.reshape(32, 4, 8).transpose(np.argsort(axes)),
                                   rtol=1e-5, atol=1e-6)
    for one_each in (qj.linen.to_serving_params_gptq(model, variables, batches, max_moment_bytes=1, progress=False),
                     qj.linen.to_serving_params_gptq(model, variables, iter(batches), max_moment_bytes=10**9,
                                                     progress=False)):  # three passes; one over an iterator
        for name in ("general", "einsum", "shared"):
            got, want = one_each["params"][name]["kernel"].packed, served["params"][name]["kernel"].packed
            assert float(jnp.mean(got == want)) > 0.99
    with pytest.raises(ValueError, match=r"max_moment_bytes=1 needs 3 passes over the batches, which is an iterator"):
        qj.linen.to_serving_params_gptq(model, variables, iter(batches), max_moment_bytes=1, progress=False)
    kernel, q, r = (v["params"]["shared"]["kernel"] for v in (variables, served, rounded))
    np.testing.assert_array_equal(q.scale, r.scale)
    error = lambda k: float(jnp.sum((jnp.einsum("bd,ndh->bnh", x, kernel - qj.dequantize(k))) ** 2))  # noqa: E731
    assert error(q) < 0.8 * error(r)
