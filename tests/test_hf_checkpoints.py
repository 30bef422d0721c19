import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantize_jax as qj
from quantize_jax.hf_checkpoints import from_awq, from_gptq, load, save, to_awq, to_gptq


def _autogptq_pack(intweight, zeros, scales, group_size):
    """AutoGPTQ's ``QuantLinear.pack`` for 4 bits (v1), loop for loop: codes (K, N) and zero points (G, N)
    into int32 words, eight values per word, the zero points stored minus one."""
    k, n = intweight.shape
    qweight = np.zeros((k // 8, n), np.uint32)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= intweight[8 * row + j].astype(np.uint32) << (4 * j)
    stored = (zeros - 1).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], n // 8), np.uint32)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= stored[:, 8 * col + j] << (4 * j)
    g_idx = np.array([i // group_size for i in range(k)], np.int32)
    return {"qweight": qweight.astype(np.int32), "qzeros": qzeros.astype(np.int32), "scales": scales,
            "g_idx": g_idx}


def _autogptq_weight(intweight, zeros, scales, g_idx):
    """AutoGPTQ's dequantization in its forward pass: ``scales[g_idx] * (weight - zeros[g_idx])``, in float16."""
    return scales[g_idx] * (intweight.astype(np.float16) - zeros[g_idx].astype(np.float16))


def test_layers_packed_as_autogptq_packs_them_read_back_with_its_values():
    rng = np.random.default_rng(0)
    intweight = rng.integers(0, 16, (64, 16)).astype(np.uint8)
    zeros = rng.integers(1, 16, (2, 16))
    scales = rng.uniform(0.01, 0.1, (2, 16)).astype(np.float16)
    tensors = _autogptq_pack(intweight, zeros, scales, group_size=32)
    q = from_gptq(**tensors)
    assert (q.shape, q.spec) == ((64, 16), qj.QuantSpec(format="uint4", axis=0, group_size=32, scale_dtype="float16"))
    np.testing.assert_array_equal(np.asarray(qj.dequantize(q)), _autogptq_weight(intweight, zeros, scales,
                                                                              tensors["g_idx"]))
    for name, a in to_gptq(q).items():  # and written back word for word
        np.testing.assert_array_equal(a, tensors[name])
        assert a.dtype == tensors[name].dtype
    one = np.zeros((8, 8), np.uint8)
    one[:, 0] = np.arange(1, 9)  # rows 0..7 of column 0: one word, the first row in the lowest nibble
    packed = _autogptq_pack(one, np.ones((1, 8), np.int64), np.ones((1, 8), np.float16), group_size=8)
    assert packed["qweight"][0, 0] == np.uint32(0x87654321).view(np.int32)
    np.testing.assert_array_equal(np.asarray(from_gptq(**packed).codes())[:, 0], np.arange(1, 9))


def test_symmetric_checkpoints_read_as_int4_without_zero_points():
    """Every zero point 8 (GPTQ's sym=True, stored as 7): the int4 codes q - 8, the same values, and what
    qdot's fast paths read; per channel for one group."""
    rng = np.random.default_rng(1)
    intweight = rng.integers(0, 16, (32, 8)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (1, 8)).astype(np.float16)
    tensors = _autogptq_pack(intweight, np.full((1, 8), 8), scales, group_size=32)
    assert np.all(tensors["qzeros"] == np.uint32(0x77777777).view(np.int32))
    q = from_gptq(**tensors, dtype=jnp.float32)
    assert q.zero_point is None and q.spec == qj.QuantSpec(format="int4", axis=0, scale_dtype="float16")
    expected = scales.astype(np.float32) * (intweight.astype(np.float32) - 8)  # in float32: not rounded to float16
    np.testing.assert_array_equal(np.asarray(qj.dequantize(q)), expected)
    x = jax.random.normal(jax.random.key(0), (4, 32))
    np.testing.assert_allclose(qj.qdot(x, q), x @ expected, rtol=1e-5, atol=1e-5)
    for name, a in to_gptq(q).items():
        np.testing.assert_array_equal(a, tensors[name])
    as_bf16 = from_gptq(**{**tensors, "scales": jnp.asarray(scales, jnp.bfloat16)}, dtype=jnp.float32)
    assert as_bf16.spec.scale_dtype == "bfloat16" and as_bf16.scale.dtype == jnp.bfloat16  # kept, not cast


def test_gptq_quantized_layers_round_trip_through_a_checkpoint_file(tmp_path):
    """qj.ptq.gptq's QArrays saved in GPTQ's layout and loaded back: the same leaves; other tensors as
    they were; the config entry Hugging Face reads."""
    x = jax.random.normal(jax.random.key(0), (256, 64)) @ jax.random.normal(jax.random.key(1), (64, 64))
    w = jax.random.normal(jax.random.key(2), (64, 32))
    layers = {"model.up": qj.ptq.gptq(w, x, qj.QuantSpec(axis=0, group_size=32, scale_dtype="float16")),
              "model.down": qj.ptq.gptq(w, x, qj.QuantSpec(format="uint4", axis=0, group_size=32,
                                                           scale_dtype="float16")),
              "model.up.bias": np.arange(32, dtype=np.float32)}
    path = os.path.join(tmp_path, "model.safetensors")
    config = save(path, layers, checkpoint_format="gptq_v2")
    assert config == {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False,
                      "checkpoint_format": "gptq_v2"}
    loaded = load(path, dtype=jnp.float32, checkpoint_format="gptq_v2")
    assert sorted(loaded) == ["model.down", "model.up", "model.up.bias"]
    for name in ("model.up", "model.down"):
        a, b = loaded[name], layers[name]
        assert (a.shape, a.spec) == (b.shape, b.spec)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(loaded["model.up.bias"], layers["model.up.bias"])


def test_what_gptq_checkpoints_cannot_hold_is_refused():
    w = jax.random.normal(jax.random.key(0), (64, 16))
    with pytest.raises(ValueError, match=re.escape("to_gptq: expected int4 or uint4 with scales along axis 0")):
        to_gptq(qj.quantize(w, qj.QuantSpec(format="nf4", axis=0)))
    with pytest.raises(ValueError, match=re.escape("to_gptq: expected int4 or uint4 with scales along axis 0")):
        to_gptq(qj.quantize(w, qj.QuantSpec(axis=1)))  # scales along the outputs
    zero = qj.quantize(jnp.abs(w), qj.QuantSpec(format="uint4", axis=0))  # all positive: zero points 0
    with pytest.raises(ValueError, match=re.escape("to_gptq: zero points must be integers in [1, 15], got values "
                                                   "from 0")):
        to_gptq(zero)
    assert from_gptq(**to_gptq(zero, checkpoint_format="gptq_v2"), checkpoint_format="gptq_v2").spec.format == "uint4"
    tensors = to_gptq(qj.quantize(w, qj.QuantSpec(axis=0, group_size=32)))
    shuffled = np.random.default_rng(0).permutation(tensors["g_idx"])  # act order
    with pytest.raises(ValueError, match=r"from_gptq: g_idx must put rows in contiguous groups of 32 .*\(act order"):
        from_gptq(**{**tensors, "g_idx": shuffled})
    with pytest.raises(ValueError, match=r"from_gptq: expected qzeros \(G, N / 8\) and scales \(G, N\) with G "
                                         r"dividing K = 64 and N = 16"):
        from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"][:, :8])
    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        to_gptq(qj.quantize(w, qj.QuantSpec(axis=0)), checkpoint_format="awq")
    with pytest.raises(ValueError, match=r"load: layout must be one of \['gptq', 'awq'\], got 'exl2'"):
        load("model.safetensors", layout="exl2")


def _autoawq_pack(intweight, zeros):
    """AutoAWQ's GEMM ``pack`` for 4 bits, loop for loop: eight outputs per int32 word in the order
    (0, 2, 4, 6, 1, 3, 5, 7), for the codes (K, N) and the zero points (G, N) alike."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(values):
        packed = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
        for col in range(values.shape[1] // 8):
            for i in range(8):
                packed[:, col] |= values[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
        return packed.astype(np.int32)

    return pack(intweight), pack(zeros)


def test_awq_layers_packed_as_autoawq_packs_them_read_back_with_its_values(tmp_path):
    rng = np.random.default_rng(2)
    intweight = rng.integers(0, 16, (64, 16)).astype(np.uint8)
    zeros = rng.integers(0, 16, (2, 16))  # AWQ stores zero points as they are: 0 included
    scales = rng.uniform(0.01, 0.1, (2, 16)).astype(np.float16)
    qweight, qzeros = _autoawq_pack(intweight, zeros)
    q = from_awq(qweight, qzeros, scales)
    assert q.spec == qj.QuantSpec(format="uint4", axis=0, group_size=32, scale_dtype="float16")
    g = np.arange(64) // 32
    expected = (intweight.astype(np.float16) - zeros[g].astype(np.float16)) * scales[g]  # AutoAWQ's, in float16
    np.testing.assert_array_equal(np.asarray(qj.dequantize(q)), expected)
    back = to_awq(q)
    np.testing.assert_array_equal(back["qweight"], qweight)
    np.testing.assert_array_equal(back["qzeros"], qzeros)
    one = np.zeros((1, 8), np.uint8)
    one[0] = np.arange(1, 9)  # outputs 0..7 of one row: slots hold outputs 0, 2, 4, 6, 1, 3, 5, 7
    assert _autoawq_pack(one, one)[0][0, 0] == np.uint32(0x86427531).view(np.int32)
    path = os.path.join(tmp_path, "awq.safetensors")
    assert save(path, {"layer": q}, layout="awq") == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                                      "zero_point": True, "version": "gemm"}
    jax.tree.map(np.testing.assert_array_equal, load(path, layout="awq")["layer"], q)


def test_a_served_nnx_model_goes_out_as_a_gptq_checkpoint_and_back_into_an_abstract_one(tmp_path):
    """The packed kernels of a served model written in GPTQ's layout, read back and set into the same model
    built abstractly (nnx.eval_shape: no float weights made): the same outputs, bit for bit."""
    from flax import nnx

    spec = qj.QuantSpec(axis=0, group_size=8, scale_dtype="float16")

    def served():
        model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
        return qj.nnx.to_serving(qj.nnx.quantize_model(model, weight_spec=spec))

    model = served()
    tensors = {f"layers.{i}": model.layers[i].qarray for i in (0, 2)}
    tensors.update({f"layers.{i}.bias": np.asarray(model.layers[i].bias[...]) for i in (0, 2)})
    path = os.path.join(tmp_path, "model.safetensors")
    assert save(path, tensors)["sym"]
    loaded = load(path, dtype=jnp.float32)
    abstract = nnx.eval_shape(served)
    for i in (0, 2):
        assert loaded[f"layers.{i}"].spec == spec
        abstract.layers[i].kernel.set_value(loaded[f"layers.{i}"])
        abstract.layers[i].bias.set_value(jnp.asarray(loaded[f"layers.{i}.bias"]))
    x = jax.random.normal(jax.random.key(0), (4, 16))
    np.testing.assert_array_equal(abstract(x), model(x))
