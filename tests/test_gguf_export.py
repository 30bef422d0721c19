import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantize_jax as qj
from quantize_jax.gguf_export import export_gguf


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_blocks_equal_the_gguf_reference_and_read_back(tmp_path, qtype):
    w = np.asarray(jax.random.normal(jax.random.key(0), (48, 64)))
    q = qj.quantize(jnp.asarray(w), qj.QuantSpec(axis=0))
    params = {"w": w, "q": q, "bias": np.zeros(64, np.float32), "odd": np.ones((40, 30), np.float32)}
    path = tmp_path / "model.gguf"
    kinds = export_gguf(path, params, qtype=qtype)
    assert kinds == {"bias": "F32", "odd": "F32", "q": qtype.upper(), "w": qtype.upper()}
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    ggml_type = getattr(gguf.GGMLQuantizationType, qtype.upper())
    ref = gguf.quants.quantize(w, ggml_type)
    np.testing.assert_array_equal(np.asarray(tensors["w"].data).reshape(ref.shape), ref)
    back = gguf.quants.dequantize(np.asarray(tensors["w"].data), ggml_type).reshape(w.shape)
    assert np.abs(back - w).max() < np.abs(w).max() / 7
    np.testing.assert_array_equal(
        np.asarray(tensors["q"].data).reshape(ref.shape),
        gguf.quants.quantize(np.asarray(qj.dequantize(q)), ggml_type),
    )


def test_bad_qtype_and_nan(tmp_path):
    with pytest.raises(ValueError, match=r"export_gguf: qtype must be one of \['q4_0', 'q4_1'\], got 'q8_0'"):
        export_gguf(tmp_path / "x.gguf", {"w": np.ones((32, 32), np.float32)}, qtype="q8_0")
    with pytest.raises(ValueError, match=r"leaf 'w' of shape \(32, 32\) holds NaN or Inf"):
        export_gguf(tmp_path / "x.gguf", {"w": np.full((32, 32), np.inf, np.float32)})
