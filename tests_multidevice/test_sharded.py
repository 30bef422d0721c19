import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import quantize_jax as qj


def _per_device_bytes(a):
    return {s.device: s.data.nbytes for s in a.addressable_shards}


@pytest.mark.parametrize("pspec, spec", [
    (P(None, "model"), qj.QuantSpec(axis=0)),
    (P(None, "model"), qj.QuantSpec(axis=0, group_size=64)),
    (P("model", None), qj.QuantSpec(axis=0, group_size=64)),
    (P("data", "model"), qj.QuantSpec(format="uint4", axis=0, group_size=32)),
])
def test_quantize_keeps_the_sharding_without_gathering(mesh, pspec, spec):
    w = jax.random.normal(jax.random.key(0), (256, 128))
    sharding = NamedSharding(mesh, pspec)
    ws = jax.device_put(w, sharding)
    q = qj.sharding.quantize_sharded(ws, spec)
    assert q.packed.sharding.spec == pspec
    n_shards = np.prod([mesh.shape[a] for a in pspec if a is not None])
    assert set(_per_device_bytes(q.packed).values()) == {q.packed.nbytes // n_shards}
    ref = qj.quantize(w, spec)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)
    hlo = jax.jit(qj.quantize, static_argnums=1, out_shardings=qj.sharding.qarray_shardings(w.shape, spec, sharding)
                  ).lower(ws, spec).compile().as_text()
    if pspec[0] is None:  # nothing reduced across devices: no communication at all
        assert "all-gather" not in hlo and "all-reduce" not in hlo and "collective-permute" not in hlo
    else:  # a scale reduced over a sharded axis needs a max across devices, never a gather of the weight
        assert "all-gather" not in hlo


def test_shard_boundaries_that_split_bytes_or_groups_are_refused(mesh):
    with pytest.raises(ValueError, match=r"axis 1 of length 12 over 4 shards \('model'\) gives 3 elements per shard; "
                                         r"a shard boundary would split a byte"):
        qj.sharding.qarray_partition_specs((8, 12), qj.QuantSpec(axis=0), P(None, "model"), mesh)
    with pytest.raises(ValueError, match=r"axis 0 of length 256 over 4 shards \('model'\) gives 64 elements per shard; "
                                         r"a shard boundary would split a group of 128"):
        qj.sharding.qarray_partition_specs((256, 8), qj.QuantSpec(axis=0, group_size=128), P("model", None), mesh)


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_qdot_tensor_parallel_and_contraction_sharded_equal_one_device(mesh, backend):
    w = jax.random.normal(jax.random.key(1), (256, 128))
    x = jax.random.normal(jax.random.key(2), (16, 256))
    spec = qj.QuantSpec(axis=0, group_size=64)
    ref = qj.qdot(x, qj.quantize(w, spec), backend=backend)
    f = jax.jit(lambda x, q: qj.qdot(x, q, backend=backend))
    # tensor parallel: output axis sharded
    q_tp = qj.sharding.quantize_sharded(jax.device_put(w, NamedSharding(mesh, P(None, "model"))), spec)
    x_dp = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    np.testing.assert_allclose(f(x_dp, q_tp), ref, rtol=1e-5, atol=1e-4)
    # contraction axis sharded: partial sums reduced across devices
    q_k = qj.sharding.quantize_sharded(jax.device_put(w, NamedSharding(mesh, P("model", None))), spec)
    x_k = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    np.testing.assert_allclose(f(x_k, q_k), ref, rtol=1e-5, atol=1e-4)
    # gradients to x (the CPU's tangent: block by block over the weight's rows), either weight split
    g = jax.random.normal(jax.random.key(3), (16, 128))
    grad = jax.jit(jax.grad(lambda x, q: jnp.vdot(qj.qdot(x, q, backend=backend), g)))
    expected = np.asarray(g, np.float64) @ np.asarray(qj.dequantize(qj.quantize(w, spec)), np.float64).T
    for x_s, q_s in ((x_dp, q_tp), (x_k, q_k)):
        np.testing.assert_allclose(grad(x_s, q_s), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_quant", [None, "int8"])
def test_qdot_inside_shard_map(mesh, act_quant):
    # The per-device code of shard_map: x's rows split over "data"; the weight's columns over "model"
    # (varying weights) or its rows (partial sums reduced by psum); gradients through both.
    w = jax.random.normal(jax.random.key(1), (256, 128))
    x = jax.random.normal(jax.random.key(2), (16, 256))
    spec = qj.QuantSpec(axis=0, group_size=64)
    q = qj.quantize(w, spec)
    ref = qj.qdot(x, q, act_quant=act_quant)

    def local(x, q, shape):
        return qj.qdot(x, qj.QArray(q.packed, q.scale, None, shape, q.dtype, q.spec), act_quant=act_quant)

    def placed(a, pspecs):  # explicit meshes want the operands where in_specs says they are
        return jax.tree_util.tree_map(lambda a, p: jax.device_put(a, NamedSharding(mesh, p)), a, pspecs)

    columns = qj.QArray(P(None, "model"), P(None, "model"), None, q.shape, q.dtype, q.spec)
    f = jax.jit(jax.shard_map(lambda x, q: local(x, q, (256, 32)), mesh=mesh,
                              in_specs=(P("data"), columns), out_specs=P("data", "model")))
    x_rows, q_columns = placed(x, P("data")), placed(q, columns)
    np.testing.assert_allclose(f(x_rows, q_columns), ref, rtol=1e-5, atol=1e-4)
    rows = qj.QArray(P("model"), P("model"), None, q.shape, q.dtype, q.spec)
    g = jax.jit(jax.shard_map(lambda x, q: jax.lax.psum(local(x, q, (64, 128)), "model"), mesh=mesh,
                              in_specs=(P("data", "model"), rows), out_specs=P("data")))
    if act_quant is None:  # W4A8's tokens are per row of all of K: a K shard has its own
        np.testing.assert_allclose(g(placed(x, P("data", "model")), placed(q, rows)), ref, rtol=1e-5, atol=1e-4)
    with jax.set_mesh(mesh):
        grad = jax.grad(lambda x: (f(x, q_columns) ** 2).sum())(x_rows)
    expect = jax.grad(lambda x: (qj.qdot(x, q, act_quant=act_quant) ** 2).sum())(x)
    np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-3)


class _MLP(nnx.Module):
    def __init__(self, rngs, explicit=False):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(32, 64, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)
        self.down = nnx.Linear(64, 8, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs)
        self.explicit = explicit

    def __call__(self, x):
        # On an explicit-sharding mesh a product over a sharded contraction axis needs its output
        # sharding named (Flax's own layers too, float or not).
        kw = {"out_sharding": P("data", None)} if self.explicit else {}
        return self.down(nnx.relu(self.up(x)), **kw)


def _nnx_step(model, x, y):
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    loss = step(model, opt, x, y)
    return loss, model


def test_nnx_qat_step_data_and_model_parallel_equals_one_device(mesh):
    x = jax.random.normal(jax.random.key(3), (16, 32))
    y = jax.random.normal(jax.random.key(4), (16, 8))
    spec = qj.QuantSpec(axis=0, group_size=16)
    explicit = mesh.axis_types[0] == jax.sharding.AxisType.Explicit
    with jax.set_mesh(mesh):
        sharded = qj.nnx.quantize_model(_MLP(nnx.Rngs(0), explicit), weight_spec=spec, learn_scale=True)
        assert sharded.up.kernel[...].sharding.spec == P(None, "model")
        xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
        loss_s, sharded = _nnx_step(sharded, xs, ys)
    auto = jax.sharding.AxisType.Auto
    one = jax.make_mesh((1, 1), ("data", "model"), axis_types=(auto, auto), devices=jax.devices()[:1])
    with jax.set_mesh(one):
        single = qj.nnx.quantize_model(_MLP(nnx.Rngs(0)), weight_spec=spec, learn_scale=True)
        loss_1, single = _nnx_step(single, x, y)
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5)
    np.testing.assert_allclose(sharded.up.kernel[...], single.up.kernel[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded.down.weight_scale[...], single.down.weight_scale[...], rtol=1e-5, atol=1e-7)
    assert sharded.up.kernel[...].sharding.spec == P(None, "model")

    # serving: packed weights keep the kernel's sharding, outputs equal, save / load onto a sharding
    with jax.set_mesh(mesh):
        served = qj.nnx.to_serving(sharded)
        q = served.up.qarray
        assert q.packed.sharding.spec == P(None, "model") and len(set(_per_device_bytes(q.packed).values())) == 1
        assert served.up.kernel.get_metadata()["weight_sharding"] == (None, "model")
        np.testing.assert_allclose(served(xs), sharded(xs), rtol=1e-5, atol=1e-6)
        specs = qj.sharding.partition_specs(nnx.state(served))
    assert specs["up"]["kernel"].packed == P(None, "model")
    assert specs["down"]["kernel"].scale == P("model", None)  # groups of 16 along the sharded input axis


def test_save_and_load_onto_a_sharding(mesh, tmp_path):
    w = jax.random.normal(jax.random.key(5), (128, 64))
    spec = qj.QuantSpec(axis=0, group_size=32)
    sharding = NamedSharding(mesh, P("data", "model"))
    q = qj.sharding.quantize_sharded(jax.device_put(w, sharding), spec)
    qj.save(tmp_path / "w.safetensors", {"w": q})
    back = qj.sharding.shard_qarray(qj.load(tmp_path / "w.safetensors")["w"], sharding)
    assert back.packed.sharding.spec == P("data", "model") and back.scale.sharding.spec == P("data", "model")
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)


def _linen_sgd_step(model):
    """One jittable SGD step of a Linen model on a squared error: ``(variables, x, y) -> (loss, variables)``."""

    def step(variables, x, y):
        loss, g = jax.value_and_grad(lambda v: jnp.mean((model.apply(v, x) - y) ** 2))(variables)
        return loss, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables, g)

    return step


def test_linen_qat_step_data_parallel_equals_one_device(mesh):
    model = qj.linen.QuantDense(8, weight_spec=qj.QuantSpec(axis=0, group_size=16))
    x = jax.random.normal(jax.random.key(6), (16, 32))
    y = jax.random.normal(jax.random.key(7), (16, 8))
    params = model.init(jax.random.key(0), x)
    step = _linen_sgd_step(model)
    replicated = NamedSharding(mesh, P())
    ps = jax.device_put(params, replicated)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "model"), None)))
    ys = jax.device_put(y, NamedSharding(mesh, P(("data", "model"), None)))
    loss_s, new_s = jax.jit(step)(ps, xs, ys)
    loss_1, new_1 = jax.jit(step)(params, x, y)
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(new_s), jax.tree_util.tree_leaves(new_1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_linen_qat_step_model_parallel_equals_one_device(mesh):
    model = qj.linen.QuantDense(16, weight_spec=qj.QuantSpec(axis=0, group_size=16), learn_scale=True)
    x = jax.random.normal(jax.random.key(8), (8, 32))
    y = jax.random.normal(jax.random.key(9), (8, 16))
    params = model.init(jax.random.key(1), x)["params"]
    shardings = {"kernel": P(None, "model"), "bias": P("model"), "weight_scale": P(None, "model")}
    assert set(params) == set(shardings)
    step = _linen_sgd_step(model)
    with jax.set_mesh(mesh):
        ps = {k: jax.device_put(v, NamedSharding(mesh, shardings[k])) for k, v in params.items()}
        loss_s, new_s = jax.jit(step)({"params": ps}, x, y)
    loss_1, new_1 = jax.jit(step)({"params": params}, x, y)
    new_s, new_1 = new_s["params"], new_1["params"]
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(new_s[k], new_1[k], rtol=1e-5, atol=1e-6)
    assert new_s["kernel"].sharding.spec == P(None, "model")
    assert len(set(_per_device_bytes(new_s["kernel"]).values())) == 1  # each device holds its quarter

    with jax.set_mesh(mesh):  # serving: the packed kernel stays on the kernel's sharding
        served = qj.linen.to_serving_params(model, {"params": new_s}, x)
        q = served["params"]["kernel"]
        assert q.packed.sharding.spec == P(None, "model") and len(set(_per_device_bytes(q.packed).values())) == 1
        np.testing.assert_allclose(model.apply(served, x), model.apply({"params": new_s}, x), rtol=1e-5, atol=1e-6)


def test_the_sharded_example_runs():
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).parent.parent / "examples" / "sharded.py"
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "packed sharding: P(None, 'model')" in proc.stdout and "QAT step 2" in proc.stdout


@pytest.mark.parametrize("names", [(None, "model"), ("model", None)])  # features, or vocabulary, split
def test_sharded_embedding_lookups_and_logits(mesh, names):
    with jax.set_mesh(mesh):
        embed = nnx.Embed(64, 32, embedding_metadata={"out_sharding": names}, rngs=nnx.Rngs(0))
        qat = qj.nnx.quantize_model(embed, quantize_embeddings=True)
        exact, fast = qj.nnx.to_serving(qat, backend="xla"), qj.nnx.to_serving(qat)
        assert exact.qarray.packed.sharding.spec == P(*names)  # each device keeps its share of the bytes
        ids = jax.device_put(jnp.arange(16).reshape(2, 8) * 4, NamedSharding(mesh, P("data", None)))
        out = P("data", None, names[1])
        lookup = nnx.jit(lambda model, ids: model(ids, out_sharding=out))
        rows = lookup(exact, ids)
        assert rows.sharding.is_equivalent_to(NamedSharding(mesh, out), rows.ndim)
        np.testing.assert_array_equal(rows, lookup(qat, ids))
        np.testing.assert_array_equal(lookup(fast, ids), rows)
        h = jax.device_put(jax.random.normal(jax.random.key(0), (2, 8, 32)), NamedSharding(mesh, P("data", None, None)))
        attend = nnx.jit(lambda model, h: model.attend(h))
        logits = attend(qat, h)
        np.testing.assert_array_equal(attend(exact, h), logits)
        fast_logits = attend(fast, h)  # block by block over the packed table, the vocabulary split or not
        assert fast_logits.sharding.is_equivalent_to(logits.sharding, logits.ndim)
        np.testing.assert_allclose(fast_logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pspec", [P(None, None, "model"), P(None, "data", "model")])
def test_scan_over_a_sharded_stack_of_layers(mesh, pspec):
    """A stacked (layers, K, N) weight quantized where it lies, scanned layer by layer: each step's QArray
    is that layer's, sharded as the stack was (the stack's shape and spec used to stay on the slices)."""
    w = jax.random.normal(jax.random.key(1), (3, 128, 128)) / 11
    q = qj.sharding.quantize_sharded(jax.device_put(w, NamedSharding(mesh, pspec)), qj.QuantSpec(axis=1, group_size=64))
    assert q.shape == (3, 128, 128) and q.packed.sharding.spec == pspec
    carry = NamedSharding(mesh, P("data", None))
    x = jax.device_put(jax.random.normal(jax.random.key(2), (16, 128)), carry)

    explicit = mesh.axis_types[0] == jax.sharding.AxisType.Explicit

    def layer(h, qi):  # an explicit mesh keeps the output split as the weight's columns: gathered for the carry
        y = jnp.tanh(qj.qdot(h, qi))
        return (jax.sharding.reshard(y, carry) if explicit else y), None

    y = jax.jit(lambda x, q: jax.lax.scan(layer, x, q)[0])(x, q)
    expected = np.asarray(x)
    for i in range(3):
        expected = np.tanh(expected @ np.asarray(qj.dequantize(qj.quantize(w[i], qj.QuantSpec(axis=0, group_size=64)))))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
