"""QArrays on device meshes: the partition specs of a quantized weight from the weight's own.

A QArray packs its last axis two codes per byte and keeps every other axis
in place, so its parts shard like the weight:

* ``packed`` takes the weight's ``PartitionSpec`` as it is (its last axis
  is half as long: each shard must hold whole bytes, an even number of
  elements);
* ``scale`` / ``zero_point`` take it too, except on axes the scale was
  reduced over (size 1 there: replicated); a grouped axis keeps its mesh
  axis when every shard holds whole groups.

``quantize_sharded`` quantizes under ``jit`` with those output shardings, so
each device computes and keeps only its share of the bytes (no gather).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from quantize_jax import _layout
from quantize_jax.qarray import QArray, quantize
from quantize_jax.spec import QuantSpec


def qarray_partition_specs(shape, spec: QuantSpec, weight_pspec: PartitionSpec, mesh=None, dtype="float32") -> QArray:
    """The ``PartitionSpec`` s of the parts of ``quantize(w, spec)`` for a weight ``w`` sharded as ``weight_pspec``.

    Args:
      shape: the weight's shape.
      spec: the QuantSpec.
      weight_pspec: the weight's PartitionSpec.
      mesh: the mesh, to check that shard boundaries fall between bytes and
        between groups (skipped when None).
      dtype: the weight's dtype (part of the QArray's static structure).

    Returns:
      A QArray-shaped pytree whose leaves are PartitionSpecs (use it as
      ``out_shardings`` or with ``jax.device_put`` after wrapping each in a
      ``NamedSharding``).

    Raises:
      ValueError: a shard boundary would split a byte (an odd number of
        elements of the last axis per shard) or a scale group.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> import quantize_jax as qj
      >>> ps = qj.sharding.qarray_partition_specs((512, 256), qj.QuantSpec(axis=0, group_size=128), P("data", "model"))
      >>> ps.packed, ps.scale
      (P('data', 'model'), P('data', 'model'))
      >>> qj.sharding.qarray_partition_specs((512, 256), qj.QuantSpec(axis=0), P("data", "model")).scale
      P(None, 'model')
    """
    shape = tuple(shape)
    names = tuple(weight_pspec) + (None,) * (len(shape) - len(tuple(weight_pspec)))
    if len(names) != len(shape):
        raise ValueError(f"weight_pspec {weight_pspec} has more entries than the weight of shape {shape} has axes")
    lay = _layout.layout(shape, spec, "weight")
    if mesh is not None:
        _check(shape, names, lay, mesh)
    scale_names = []
    for axis, name in enumerate(names):
        if lay.group_axis == axis:
            scale_names.append(name)
        elif lay.group_axis is None and axis in lay.reduced:
            scale_names.append(None)
        else:
            scale_names.append(name)
    scale_spec = PartitionSpec(*scale_names)
    return QArray(PartitionSpec(*names), scale_spec, scale_spec if spec.fmt.has_zero_point else None,
                  shape, jax.numpy.dtype(dtype), spec)


def _shards(mesh, name) -> int:
    if name is None:
        return 1
    names = name if isinstance(name, tuple) else (name,)
    n = 1
    for a in names:
        n *= mesh.shape[a]
    return n


def _check(shape, names, lay, mesh) -> None:
    last = len(shape) - 1
    n = _shards(mesh, names[last])
    if n > 1 and (shape[last] % n or (shape[last] // n) % 2):
        raise ValueError(
            f"sharding: axis {last} of length {shape[last]} over {n} shards ({names[last]!r}) gives "
            f"{shape[last] / n:g} elements per shard; a shard boundary would split a byte (need an even count)"
        )
    if lay.group_axis is not None:
        a = lay.group_axis
        n = _shards(mesh, names[a])
        if n > 1 and (shape[a] % n or (shape[a] // n) % lay.group_size):
            raise ValueError(
                f"sharding: axis {a} of length {shape[a]} over {n} shards ({names[a]!r}) gives "
                f"{shape[a] / n:g} elements per shard; a shard boundary would split a group of {lay.group_size}"
            )


def qarray_shardings(shape, spec: QuantSpec, sharding: NamedSharding, dtype="float32") -> QArray:
    """Like :func:`qarray_partition_specs`, with ``NamedSharding`` leaves on ``sharding.mesh``."""
    specs = qarray_partition_specs(shape, spec, sharding.spec, sharding.mesh, dtype)
    return jax.tree_util.tree_map(lambda p: NamedSharding(sharding.mesh, p), specs,
                                  is_leaf=lambda a: isinstance(a, PartitionSpec))


def quantize_sharded(x: jax.Array, spec: QuantSpec, sharding: NamedSharding | None = None) -> QArray:
    """``quantize(x, spec)`` whose parts are sharded like ``x`` (or ``sharding``), computed where they live.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P(None, "model")))
      >>> qj.sharding.quantize_sharded(w, qj.QuantSpec(axis=0)).packed.sharding.spec
      P(None, 'model')
    """
    sharding = sharding or x.sharding
    if not isinstance(sharding, NamedSharding):
        raise ValueError(f"quantize_sharded: x must carry a NamedSharding (or pass sharding=), got {sharding!r}")
    out = qarray_shardings(x.shape, spec, sharding, x.dtype)
    return jax.jit(quantize, static_argnums=1, in_shardings=sharding, out_shardings=out)(x, spec)


def shard_qarray(q: QArray, sharding: NamedSharding) -> QArray:
    """Place an existing QArray (for example one just loaded) on ``sharding``, the weight's sharding."""
    return jax.device_put(q, qarray_shardings(q.shape, q.spec, sharding, q.dtype))


def partition_specs(state):
    """PartitionSpecs for an NNX state, QArray-aware: like ``nnx.get_partition_spec``, but a serving
    layer's packed weight (its ``weight_sharding`` metadata, carried over from the float kernel's
    annotation) gets per-part specs from :func:`qarray_partition_specs`."""
    from flax import nnx

    def spec_of(v):
        if not isinstance(v, nnx.Variable):
            return PartitionSpec()
        meta = v.get_metadata()
        value = v.get_value()
        if isinstance(value, QArray):
            names = meta.get("weight_sharding") or ()
            return qarray_partition_specs(value.shape, value.spec, PartitionSpec(*names), dtype=value.dtype)
        names = meta.get("out_sharding")
        return PartitionSpec(*names) if names else PartitionSpec()

    return jax.tree_util.tree_map(spec_of, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
