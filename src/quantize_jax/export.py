"""Export a serving function with int4 weights for CPU, GPU and TPU (``jax.export``), from any machine.

The weights travel either as *inputs* of the exported function (the
default: one artifact serves any checkpoint of the same shapes, and the
packed QArrays stay 4-bit in device memory) or as *constants* baked into it.
Lowering for ``"tpu"`` or ``"cuda"`` works on a CPU-only machine; ``qdot``'s
``backend="auto"`` picks each platform's path inside the one artifact. Example
inputs may have symbolic dimensions (``jax.export.symbolic_shape("b, 64")``):
one artifact then serves every batch size.

For ``"cuda"`` the artifact holds the Pallas kernel as Triton IR, a custom call
that ``jax.export`` makes no compatibility promise for across jaxlib versions
(it refuses to serialize one unless told): ``export_serving`` allows it, so serve
a CUDA artifact with the jaxlib it was exported with, or export a function whose
``qdot`` takes ``backend="dequant"`` (XLA only).
"""

from __future__ import annotations

import functools

import jax

from quantize_jax.qarray import QArray

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The Pallas kernel's Triton custom call (see the module docstring).
_TRITON = (jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),)


def export_serving(fn, params, *example_args, platforms=("cpu", "tpu"), weights: str = "inputs") -> bytes:
    """Export ``fn(params, *args)`` for ``platforms`` and serialize it.

    Args:
      fn: the serving function, ``fn(params, *args)``; ``params`` may hold
        QArrays.
      params: the (quantized) parameters.
      example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``) that
        fix the input shapes.
      platforms: any of ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``.
      weights: ``"inputs"`` (``params`` is the first argument of the
        artifact) or ``"constants"`` (baked in; the artifact takes only
        ``args``).

    Returns:
      The serialized artifact (bytes); :func:`load_serving` reads it back.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (16, 8)), qj.QuantSpec(axis=0))
      >>> blob = qj.export.export_serving(lambda p, x: qj.qdot(x, p), q, jnp.ones((2, 16)))
      >>> run = qj.export.load_serving(blob)
      >>> bool(jnp.allclose(run(q, jnp.ones((2, 16))), qj.qdot(jnp.ones((2, 16)), q)))
      True
    """
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ValueError(f"export_serving: platforms must be a non-empty subset of {list(PLATFORMS)}, got {platforms!r}")
    export = functools.partial(jax.export.export, platforms=tuple(platforms), disabled_checks=_TRITON)
    if weights == "inputs":
        exported = export(jax.jit(fn))(params, *example_args)
    elif weights == "constants":
        exported = export(jax.jit(lambda *a: fn(params, *a)))(*example_args)
    else:
        raise ValueError(f"export_serving: weights must be 'inputs' or 'constants', got {weights!r}")
    return bytes(exported.serialize())


def load_serving(blob: bytes):
    """The callable of a serialized artifact: ``run(params, *args)`` or ``run(*args)`` (constants)."""
    return jax.export.deserialize(bytearray(blob)).call


def export_nnx(model, *example_args, platforms=("cpu", "tpu"), weights: str = "inputs"):
    """Export an NNX (serving) model's ``__call__`` with :func:`export_serving`.

    The model's state travels as the flat list of its leaves (QArrays and
    arrays), which ``jax.export`` serializes.

    Returns:
      ``(blob, params)``: the serialized artifact and the parameter list to
      call it with, ``load_serving(blob)(params, *args)`` (or
      ``load_serving(blob)(*args)`` with ``weights="constants"``).
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    params, treedef = jax.tree_util.tree_flatten(state, is_leaf=lambda a: isinstance(a, QArray))

    def serve(params, *args):
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, params))(*args)

    return export_serving(serve, params, *example_args, platforms=platforms, weights=weights), params
