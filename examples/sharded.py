"""A sharded QAT step and a sharded int4 serving step on a (data, model) mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded.py

On a real TPU slice or multi-GPU host, drop XLA_FLAGS: the same code runs on the real devices.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import quantize_jax as qj  # noqa: E402


class MLP(nnx.Module):
    """Megatron-style tensor parallel MLP: the up projection split by columns, the down one by rows."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(d, 4 * d, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)
        self.down = nnx.Linear(4 * d, d, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def main():
    n = jax.device_count()
    mesh = jax.make_mesh((2, n // 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(0), (64, 256))
    with jax.set_mesh(mesh):
        model = qj.nnx.quantize_model(MLP(256, nnx.Rngs(0)), weight_spec=qj.QuantSpec(axis=0, group_size=128))
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))

        @nnx.jit
        def train_step(model, opt, x):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x) ** 2))(model)
            opt.update(model, grads)
            return loss

        for i in range(3):
            print(f"QAT step {i}: loss {float(train_step(model, opt, xs)):.4f}")
        print("up kernel sharding:", model.up.kernel[...].sharding.spec)

        served = qj.nnx.to_serving(model)
        q = served.up.qarray
        print("served up weight:", q, "| packed sharding:", q.packed.sharding.spec)
        per_device = {s.device.id: s.data.nbytes for s in q.packed.addressable_shards}
        print("packed bytes per device:", per_device)
        y = nnx.jit(lambda m, x: m(x))(served, xs)
        print("serving step output:", y.shape, y.sharding.spec)


if __name__ == "__main__":
    main()
