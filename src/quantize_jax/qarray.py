"""``QArray``: a quantized array that really stores 4 bits per value.

A QArray holds the packed codes (uint8, two codes per byte along the last
axis), the scale and, for ``uint4``, the zero point. Its logical shape,
original dtype and :class:`QuantSpec` are static metadata, so a QArray is a
pytree that passes through ``jit``, ``vmap``, ``scan`` and ``jax.export``.
Layers stacked along leading axes are one QArray: ``vmap(quantize)`` over
the layers, ``quantize`` of the stack with the spec's axes moved past the
layer axes, and ``jnp.stack`` of the layers' QArrays (a tree map) give the
same ``(L, K, N)`` array, and ``scan`` / ``vmap`` over it hand each step the
layer's own ``(K, N)`` QArray with the layer's spec.

Packing along the last axis is XLA's own packed int4 layout, so
``lax.bitcast_convert_type(q.packed, jnp.int4)`` reshaped to ``q.shape`` gives
the codes of an ``int4`` QArray as ``jnp.int4`` without moving a byte (see
:meth:`QArray.as_int4`). Every other axis keeps its place, so a sharded weight
stays sharded after quantization.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
from jax import lax

from quantize_jax import _layout
from quantize_jax.calibrate import check_float_array, grouped_scale
from quantize_jax.formats import dequantize_codes, quantize_to_codes
from quantize_jax.packing import pack_int4, unpack_int4
from quantize_jax.spec import QuantSpec, spec_or_default


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QArray:
    """A 4-bit quantized array.

    Attributes:
      packed: uint8 codes, two per byte along the last axis; shape
        ``shape[:-1] + (ceil(shape[-1] / 2),)``.
      scale: the scales, shaped like ``compute_scale(x, spec)[0]``.
      zero_point: the zero points (``uint4``), or ``None``.
      shape: the logical shape (static).
      dtype: the dtype ``dequantize`` returns by default (static).
      spec: the :class:`QuantSpec` it was quantized with (static).
    """

    packed: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    shape: tuple[int, ...]
    dtype: jnp.dtype
    spec: QuantSpec

    def tree_flatten(self):
        return (self.packed, self.scale, self.zero_point), (self.shape, jnp.dtype(self.dtype).name, self.spec)

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, spec = aux
        shape, spec = _restacked(shape, spec, *children)
        return cls(*children, shape=shape, dtype=jnp.dtype(dtype), spec=spec)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """The bytes really stored: packed codes + scale (+ zero point)."""
        arrays = (self.packed, self.scale) if self.zero_point is None else (self.packed, self.scale, self.zero_point)
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays)

    @property
    def bits_per_value(self) -> float:
        """``8 * nbytes / size``: 4 plus the cost of the scales."""
        return 8.0 * self.nbytes / max(self.size, 1)

    def codes(self) -> jax.Array:
        """The unpacked codes, of shape ``shape``: int8 in [-8, 7] for ``int4``,
        else uint8 in [0, 15] (``uint4`` integers, ``nf4`` table indices,
        ``fp4`` e2m1 bit patterns)."""
        return unpack_int4(self.packed, axis=-1, signed=self.spec.fmt.signed_codes, length=self.shape[-1])

    def as_int4(self) -> jax.Array:
        """The codes as ``jnp.int4`` (``int4``) or ``jnp.uint4`` (other formats), by a
        free bitcast of the packed bytes (XLA's packed layout). Needs an even last axis."""
        if self.shape[-1] % 2:
            raise ValueError(f"as_int4: the last axis of shape {self.shape} is odd; the bytes hold a padding nibble")
        return int4_view(self.packed, self.spec.fmt.signed_codes).reshape(self.shape)

    def dequantize(self, dtype=None) -> jax.Array:
        """Same as :func:`dequantize`."""
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        head = (f"QArray(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, format={self.spec.format!r}, "
                f"axis={self.spec.axis!r}, group_size={self.spec.group_size!r}")
        leaves = (self.packed, self.scale) if self.zero_point is None else (self.packed, self.scale, self.zero_point)
        if all(hasattr(a, "size") and hasattr(a, "dtype") for a in leaves):
            return f"{head}, nbytes={self.nbytes})"
        # e.g. jax.tree.map(lambda a: a.shape, tree): the leaves are whatever the map returned
        return f"{head}, packed={self.packed!r}, scale={self.scale!r}, zero_point={self.zero_point!r})"


def _restacked(shape, spec: QuantSpec, packed, scale, zero_point):
    """The logical shape and spec of leaves whose leading axes changed (``vmap`` and ``scan`` over layers,
    a ``jax.tree.map`` that stacks QArrays or slices a stack): ``d`` axes put in front of, or taken off,
    ``shape``, the spec's reduced axes moved by ``d``, where the packed codes, scale and zero point all
    fit that. Anything else (leaves that are not arrays, or do not fit) keeps ``shape`` and ``spec``."""
    lead = getattr(packed, "shape", None)
    if (not isinstance(lead, tuple) or not lead or lead[:-1] == tuple(shape[:-1])
            or not isinstance(getattr(scale, "shape", None), tuple)):
        return shape, spec
    d = len(lead) - len(shape)
    new_shape = tuple(lead[:-1]) + (shape[-1],)
    axes = tuple(range(len(shape))) if spec.axis is None else (spec.axis,) if isinstance(spec.axis, int) else spec.axis
    axes = tuple(a if a < 0 else a + d for a in axes)  # counted from the end, an axis stays where it was
    if not all(-len(new_shape) <= a < len(new_shape) for a in axes):
        return shape, spec  # a reduced axis was sliced off: its scale could not have been sliced
    whole = spec.group_size is None and len({a % len(new_shape) for a in axes}) == len(new_shape)
    new_spec = dataclasses.replace(spec, axis=None if whole else axes[0] if len(axes) == 1 else axes)
    lay = _layout.layout(new_shape, new_spec)
    fits = (lead[-1] == -(-shape[-1] // 2)
            and all(a is None or tuple(getattr(a, "shape", ())) == lay.scale_shape for a in (scale, zero_point)))
    return (new_shape, new_spec) if fits else (shape, spec)


def int4_view(packed: jax.Array, signed: bool) -> jax.Array:
    """Packed bytes ``(..., B)`` as ``jnp.int4`` (``signed``) or ``jnp.uint4`` codes ``(..., B, 2)``, low nibble
    first: a bitcast. The bytes pass an ``optimization_barrier`` first: XLA's constant folding of a uint8 ->
    int4 bitcast (jax 0.10.2) keeps only each byte's low nibble, so a jitted function that closed over a
    QArray (its bytes a compile-time constant) read wrong codes (found in session 16: 245817 of 262144 codes
    of a 512 x 256 byte array)."""
    return lax.bitcast_convert_type(lax.optimization_barrier(packed), jnp.int4 if signed else jnp.uint4)


def quantize(x: jax.Array, spec: QuantSpec | None = None, *, scale=None, zero_point=None) -> QArray:
    """Quantize ``x`` to a packed 4-bit :class:`QArray`.

    ``codes = clip(round(x * (1 / s)) + z, qmin, qmax)`` (or the nearest level
    for ``nf4`` / ``fp4``) with ``s, z = compute_scale(x, spec)``, packed two
    per byte along the last axis.

    Args:
      x: a floating-point array with at least one dimension.
      spec: the :class:`QuantSpec` (default ``QuantSpec()``: int4, one scale).
      scale, zero_point: explicit (for example learned) scale and zero point,
        shaped like ``compute_scale(x, spec)``'s; stored in
        ``spec.scale_dtype`` (the zero point rounded).

    Returns:
      A :class:`QArray`; ``dequantize(quantize(x, spec, ...))`` equals
      ``fake_quant(x, spec, ...)`` bit for bit.

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> w = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
      >>> q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=32))
      >>> q.packed.shape, q.scale.shape, q.nbytes
      ((64, 32), (2, 64), 2560)
    """
    spec = spec_or_default(spec, "quantize")
    x = check_float_array(x, "x", "quantize")
    if x.ndim == 0:
        raise ValueError("quantize: x must have at least one dimension, got a scalar")
    if scale is None and zero_point is not None:
        raise ValueError("quantize: zero_point given without scale; pass both or neither")
    packed, s, z = _quantized_arrays(x, spec, scale, zero_point)
    return QArray(packed=packed, scale=s, zero_point=z, shape=tuple(x.shape), dtype=x.dtype, spec=spec)


@functools.partial(jax.jit, static_argnums=1)
def _quantized_arrays(x, spec: QuantSpec, scale, zero_point):
    """:func:`quantize`'s packed codes, scale and zero point, compiled as one program. Op by op, the
    same work took 4-20x as long on the project's 2-core CPU VM: ``mse`` quantization of six weights
    of new shapes (about 0.5M values each, groups of 64): 11.1 s against 2.5; 21 more of one shape:
    2.9 s against 0.14. The result is the same either way (``calibrate._mse_search`` is what made it
    so)."""
    lay = _layout.layout(x.shape, spec, "x")
    xg = _layout.to_groups(x.astype(jnp.float32), lay)
    if scale is None:
        s, z = grouped_scale(xg, lay, spec)
    else:
        s, z = _explicit_scale(scale, zero_point, lay, spec)
    codes = _layout.from_groups(quantize_to_codes(xg, s, z, spec.fmt), lay)
    return (pack_int4(codes, axis=-1), _layout.scale_from_groups(s, lay),
            None if z is None else _layout.scale_from_groups(z, lay))


def _explicit_scale(scale, zero_point, lay, spec: QuantSpec):
    """An explicit scale (and zero point) in the grouped view, as fake_quant uses them."""
    dt = jnp.dtype(spec.scale_dtype)
    if spec.fmt.has_zero_point != (zero_point is not None):
        raise ValueError(f"quantize: format {spec.format!r} {'needs' if spec.fmt.has_zero_point else 'takes no'} zero_point")
    out = []
    for v, name in ((scale, "scale"), (zero_point, "zero_point")):
        if v is None:
            out.append(None)
            continue
        _layout.check_scale_shape(v, lay, name)
        v = jnp.broadcast_to(jnp.asarray(v), lay.scale_shape)
        v = jnp.round(v.astype(jnp.float32)).astype(dt) if name == "zero_point" else v.astype(dt)
        if name == "scale":
            v = jnp.maximum(v, jnp.finfo(dt).tiny)
        out.append(_layout.scale_to_groups(v, lay))
    return out[0], out[1]


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """The values a :class:`QArray` stands for: ``(q - z) * s`` (or ``level * s``).

    Computed in float32, then cast to ``dtype`` (a floating dtype; default: the
    dtype ``x`` had).

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> x = jnp.array([0.0, 0.5, -1.0, 7.0])
      >>> qj.dequantize(qj.quantize(x)).tolist()
      [0.0, 0.0, -1.0, 7.0]
    """
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize: expected a QArray, got {type(q).__name__}")
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"dequantize: dtype must be a floating-point dtype, got {jnp.dtype(dtype).name}")
    lay = _layout.layout(q.shape, q.spec, "q")
    sg = _layout.scale_to_groups(q.scale, lay)
    zg = None if q.zero_point is None else _layout.scale_to_groups(q.zero_point, lay)
    codes = _layout.to_groups(q.codes(), lay, pad_value=0)
    x = _layout.from_groups(dequantize_codes(codes, sg, zg, q.spec.fmt), lay)
    return x.astype(q.dtype if dtype is None else dtype)


def take(q: QArray, indices, axis: int = 0, *, dtype=None) -> jax.Array:
    """``jnp.take(dequantize(q, dtype), indices, axis)``: an int4 embedding lookup.

    Compiled as one XLA program in which the decoding is fused into the
    gather: only the taken rows' bytes and scales are read and decoded, and
    the float table is never built, eagerly or inside ``jit`` (checked on
    the CPU: no temporary buffer; timings in benchmarks/RESULTS.md).
    Bit for bit ``jnp.take``'s result over the dequantized array, including
    its index rules: ``-n <= i < 0`` counts from the end, an index outside
    ``[-n, n)`` gives NaN.

    Args:
      q: a QArray.
      indices: an integer array of any shape.
      axis: the axis to take along.
      dtype: the floating dtype of the result (default: ``q.dtype``).

    Returns:
      An array of shape ``q.shape[:axis] + indices.shape + q.shape[axis + 1:]``.

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> table = jnp.arange(12.0).reshape(4, 3)
      >>> q = qj.quantize(table, qj.QuantSpec(axis=1))      # one scale per row
      >>> qj.take(q, jnp.array([[3, 0]])).shape
      (1, 2, 3)
      >>> bool((qj.take(q, jnp.array([3, 0])) == qj.dequantize(q)[jnp.array([3, 0])]).all())
      True
    """
    if not isinstance(q, QArray):
        raise TypeError(f"take: expected a QArray, got {type(q).__name__}")
    idx = jnp.asarray(indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"take: indices must be integers, got dtype {idx.dtype.name}")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -q.ndim <= axis < q.ndim:
        raise ValueError(f"take: axis {axis!r} is out of range for q of shape {q.shape}")
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"take: dtype must be a floating-point dtype, got {jnp.dtype(dtype).name}")
    return _take(q, idx, axis % q.ndim, jnp.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _take(q, idx, axis, dtype):
    return jnp.take(dequantize(q, dtype), idx, axis=axis)


def _serialize_aux(aux) -> bytes:
    shape, dtype, spec = aux
    return json.dumps({"shape": list(shape), "dtype": dtype, "spec": spec_to_dict(spec)}).encode()


def _deserialize_aux(data: bytes):
    d = json.loads(data.decode())
    return tuple(d["shape"]), d["dtype"], spec_from_dict(d["spec"])


def spec_to_dict(spec: QuantSpec) -> dict:
    """A JSON-ready dict of ``spec``'s fields (tuples become lists)."""
    d = dataclasses.asdict(spec)
    if isinstance(d["axis"], tuple):
        d["axis"] = list(d["axis"])
    return d


def spec_from_dict(d: dict) -> QuantSpec:
    """Inverse of :func:`spec_to_dict`."""
    return QuantSpec(**d)


jax.export.register_pytree_node_serialization(
    QArray,
    serialized_name="quantize_jax.QArray",
    serialize_auxdata=_serialize_aux,
    deserialize_auxdata=_deserialize_aux,
)
