import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantize_jax as qj


def _served_mlp(act_spec=None):
    model = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    qat = qj.nnx.quantize_model(model, weight_spec=qj.QuantSpec(axis=0, group_size=16), act_spec=act_spec)
    return qj.nnx.to_serving(qat)


@pytest.mark.parametrize("weights", ["inputs", "constants"])
def test_nnx_serving_model_exports_for_cpu_and_tpu_and_reproduces(weights):
    served = _served_mlp()
    x = jax.random.normal(jax.random.key(0), (3, 32))
    blob, params = qj.export.export_nnx(served, x, platforms=["cpu", "tpu"], weights=weights)
    exported = jax.export.deserialize(bytearray(blob))
    assert exported.platforms == ("cpu", "tpu")
    run = qj.export.load_serving(blob)
    out = run(params, x) if weights == "inputs" else run(x)
    np.testing.assert_allclose(out, served(x), rtol=1e-6, atol=1e-6)
    if weights == "inputs":  # the packed weights are inputs: 4-bit bytes, not float matrices
        assert jnp.dtype(jnp.uint8) in {a.dtype for a in exported.in_avals}
        assert not [a for a in exported.in_avals if a.dtype == jnp.float32 and len(a.shape) == 2 and a.shape[0] > 3]


@pytest.mark.parametrize("act_spec", [None, "int8"])
def test_one_artifact_for_every_batch_size_and_cuda_too(act_spec):
    served = _served_mlp(act_spec)
    batch = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, t, 32"), jnp.bfloat16)
    # cuda: the Pallas kernel's Triton call needs export_serving's permission to be serialized
    blob, params = qj.export.export_nnx(served, batch, platforms=["cpu", "cuda", "tpu"])
    run = qj.export.load_serving(blob)
    for shape in [(1, 1, 32), (2, 5, 32)]:
        x = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
        out = run(params, x)
        assert out.shape == shape[:2] + (4,)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(served(x), np.float32), rtol=1e-2, atol=1e-2)


def test_a_served_embedding_exports_with_symbolic_token_shapes():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 16, rngs=rngs)
            self.mix = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.mix(self.embed(ids)))

    served = qj.nnx.to_serving(qj.nnx.quantize_model(Tied(nnx.Rngs(0)), quantize_embeddings=True), backend="xla")
    ids = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, t"), jnp.int32)
    blob, params = qj.export.export_nnx(served, ids, platforms=["cpu", "tpu"])
    run = qj.export.load_serving(blob)
    for shape in [(1, 1), (2, 7)]:
        tokens = jax.random.randint(jax.random.key(1), shape, 0, 50)
        np.testing.assert_array_equal(run(params, tokens), served(tokens))


def test_bad_arguments():
    q = qj.quantize(jnp.ones((8, 4)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match=r"platforms must be a non-empty subset"):
        qj.export.export_serving(lambda p, x: qj.qdot(x, p), q, jnp.ones((1, 8)), platforms=["metal"])
    with pytest.raises(ValueError, match=r"weights must be 'inputs' or 'constants', got 'both'"):
        qj.export.export_serving(lambda p, x: qj.qdot(x, p), q, jnp.ones((1, 8)), weights="both")
