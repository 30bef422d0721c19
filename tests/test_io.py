import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantize_jax as qj

from .conftest import FORMATS


def _tree():
    w = jax.random.normal(jax.random.key(0), (6, 7))
    return {
        "layers": [
            {fmt: qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=4)) for fmt in FORMATS},
            {"kernel": qj.quantize(w.astype(jnp.bfloat16), qj.QuantSpec(axis=(0, 1), scale_dtype="bfloat16")),
             "bias": jnp.arange(3, dtype=jnp.bfloat16)},
        ],
        "step": 12,
        "name": "mlp",
        "extra": (jnp.ones((2,), jnp.int32), None, 0.5, jnp.float32(2.5)),  # a 0-d array keeps its shape
    }


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))
        else:
            assert x == y


def test_round_trip_is_bit_exact(tmp_path):
    tree = _tree()
    path = tmp_path / "ckpt.safetensors"
    qj.save(path, tree)
    back = qj.load(path)
    _assert_same(tree, back)
    assert back["layers"][0]["uint4"].spec == tree["layers"][0]["uint4"].spec
    np.testing.assert_array_equal(qj.dequantize(back["layers"][0]["nf4"]), qj.dequantize(tree["layers"][0]["nf4"]))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # the temporary file was renamed


def test_64_bit_arrays_come_back_whole_without_x64(tmp_path):
    # JAX without jax_enable_x64 narrows int64 / float64 to 32 bits: 2**40 would load as 0.
    tree = {"step": np.array([2**40 + 3, -1], np.int64), "lr": np.array([1 / 3], np.float64),
            "seed": np.uint64(2**63 + 5)}
    qj.save(tmp_path / "c.safetensors", tree)
    back = qj.load(tmp_path / "c.safetensors")
    _assert_same(tree, back)


def test_file_is_plain_safetensors_with_packed_codes(tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / "ckpt.safetensors"
    qj.save(path, {"w": qj.quantize(jnp.ones((4, 8)), qj.QuantSpec(axis=0))})
    raw = load_file(path)
    assert raw["w.packed"].dtype == np.uint8 and raw["w.packed"].shape == (4, 4)
    assert raw["w.scale"].shape == (1, 8)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    qj.save(path, _tree())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(qj.CheckpointError, match=r"truncated"):
        qj.load(path)
    path.write_bytes(data[:5])
    with pytest.raises(qj.CheckpointError, match=r"not a readable safetensors file"):
        qj.load(path)


def test_altered_bytes_are_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    qj.save(path, _tree())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(qj.CheckpointError, match=r"checksum mismatch: the file was altered"):
        qj.load(path)


def test_other_files_and_bad_trees_are_named(tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, other)
    with pytest.raises(qj.CheckpointError, match=r"not a quantize_jax checkpoint"):
        qj.load(other)
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        qj.load(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match=r"save: unsupported leaf of type object at 'a'"):
        qj.save(tmp_path / "x.safetensors", {"a": object()})
    with pytest.raises(FileNotFoundError, match=r"save: .*x.safetensors: the folder .*nowhere does not exist"):
        qj.save(tmp_path / "nowhere" / "x.safetensors", {"a": np.zeros(3)})


def test_int_and_str_keys_side_by_side(tmp_path):
    """A dict mixing int and str keys (JAX's own tree functions cannot sort it) round trips; two keys that
    are the same string in the file are refused rather than one silently dropped."""
    tree = {"layers": {0: jnp.arange(3.0), "head": jnp.ones(2), 1: 7}}
    path = tmp_path / "mixed.safetensors"
    qj.save(path, tree)
    back = qj.load(path)
    assert set(back["layers"]) == {0, 1, "head"} and back["layers"][1] == 7
    np.testing.assert_array_equal(back["layers"][0], tree["layers"][0])
    with pytest.raises(ValueError, match=r"save: keys 1 and '1' at 'layers' are both '1' in the file"):
        qj.save(path, {"layers": {1: 5, "1": 6}})
    assert qj.load(path)["layers"][1] == 7  # the refused save left the file as it was


def test_an_nnx_serving_model_state_round_trips(tmp_path):
    from flax import nnx

    def served():
        model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
        return qj.nnx.to_serving(qj.nnx.quantize_model(model, weight_spec=qj.QuantSpec(axis=0, group_size=8)))

    model = served()
    qj.save(tmp_path / "m.safetensors", nnx.state(model))  # Sequential's layers are keyed by int
    loaded = qj.load(tmp_path / "m.safetensors")
    assert sorted(loaded["layers"]) == [0, 2] and isinstance(loaded["layers"][0]["kernel"], qj.QArray)
    graphdef, state = nnx.split(nnx.eval_shape(served))
    nnx.replace_by_pure_dict(state, loaded)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), model(x))


def test_orbax_saves_and_restores_qarrays(tmp_path):
    import orbax.checkpoint as ocp

    tree = {"w": qj.quantize(jax.random.normal(jax.random.key(1), (8, 6)), qj.QuantSpec(format="uint4", axis=0))}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "orbax", tree)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "orbax", jax.eval_shape(lambda: tree))
    _assert_same(tree, back)
