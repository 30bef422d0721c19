"""One of two processes (4 CPU devices each) of a multi-process run: python two_process_worker.py ID PORT DIR."""

import os
import sys


def main(process_id: int, port: str, folder: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import quantize_jax as qj

    assert jax.process_count() == 2 and jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    w = jax.random.normal(jax.random.key(0), (128, 64))
    x = jax.random.normal(jax.random.key(1), (8, 128))
    spec = qj.QuantSpec(axis=0, group_size=32)
    local = qj.quantize(w, spec)  # the same weight quantized in this process alone
    sharding = NamedSharding(mesh, P("data", "model"))  # each process holds half of the weight
    with jax.set_mesh(mesh):
        q = qj.sharding.quantize_sharded(jax.device_put(w, sharding), spec)
        assert not q.packed.is_fully_addressable
        y = jax.jit(qj.qdot)(jax.device_put(x, NamedSharding(mesh, P("data", None))), q)
    np.testing.assert_allclose(multihost_utils.process_allgather(y, tiled=True),
                               np.asarray(x) @ np.asarray(qj.dequantize(local)), rtol=1e-5, atol=1e-5)

    path = os.path.join(folder, "w.safetensors")
    qj.save(path, {"w": q})  # collective: gathered, written by process 0
    back = qj.load(path)["w"]
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(local)):
        np.testing.assert_array_equal(a, b)
    placed = qj.sharding.shard_qarray(back, sharding)
    for shard in placed.packed.addressable_shards:
        np.testing.assert_array_equal(shard.data, np.asarray(local.packed)[shard.index])
    print(f"process {process_id}: OK", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
