"""4-bit checkpoints in the layouts Hugging Face models are published in (AutoGPTQ's and AutoAWQ's), to and
from QArrays.

Both store a linear layer of ``K`` inputs and ``N`` outputs as int32 words of eight 4-bit codes ``q``,
zero points ``z`` packed the same way, and float16 scales ``(G, N)`` for ``G`` groups of ``K / G`` input
rows, with ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` (``g`` the group of row ``k``): the
``(K, N)`` kernel ``y = x @ w`` multiplies, a Flax Dense kernel's layout.

* ``"gptq"`` (AutoGPTQ; transformers' and vLLM's GPTQ loaders read it): ``qweight`` ``(K / 8, N)``
  packs eight rows per word, row ``8i + j`` in bits ``4j .. 4j + 3``; ``qzeros`` ``(G, N / 8)`` packs
  eight outputs per word in the same order, storing ``z - 1`` (``checkpoint_format="gptq"``, AutoGPTQ's
  v1) or ``z`` (``"gptq_v2"``); ``g_idx`` ``(K,)`` gives each row's group.
* ``"awq"`` (AutoAWQ's GEMM layout): ``qweight`` ``(K, N / 8)`` packs eight outputs per word, output
  ``8c + order[i]`` in bits ``4i ..`` with ``order = (0, 2, 4, 6, 1, 3, 5, 7)``; ``qzeros`` ``(G, N / 8)``
  the same, storing ``z``; no ``g_idx`` (groups are contiguous). AWQ's activation scales are already
  folded into the previous layers of such a checkpoint.

As a :class:`~quantize_jax.QArray` a layer is ``uint4`` with one scale and zero point per group along
axis 0, or, when every zero point is 8 (GPTQ's ``sym=True``), the ``int4`` array of codes ``q - 8``
without zero points: the same values, and what ``qdot``'s fast paths read. Groups must be contiguous
runs of rows: GPTQ checkpoints made with act order (``desc_act=True``) are refused.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from quantize_jax.packing import pack_int4
from quantize_jax.qarray import QArray
from quantize_jax.spec import QuantSpec

LAYOUTS = ("gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word slot i holds output 8c + _AWQ_ORDER[i]
_TENSORS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


def _unpack_words(words, axis: int, order=tuple(range(8))) -> np.ndarray:
    """Eight 4-bit codes per int32 word laid out along ``axis``: code ``order[i]`` of each word's eight
    from bits ``4i .. 4i + 3``."""
    u = np.asarray(words).astype(np.uint32)
    slot_of = np.argsort(order)
    nibbles = np.stack([(u >> np.uint32(4 * slot_of[j])) & 0xF for j in range(8)], axis=axis + 1)
    shape = list(u.shape)
    shape[axis] *= 8
    return nibbles.reshape(shape).astype(np.uint8)


def _pack_words(codes, axis: int, order=tuple(range(8))) -> np.ndarray:
    """:func:`_unpack_words` reversed: codes in ``[0, 15]``, eight per int32 word along ``axis``."""
    c = np.moveaxis(np.asarray(codes, np.uint32), axis, 0)
    c = c.reshape((c.shape[0] // 8, 8) + c.shape[1:])
    words = np.zeros(c.shape[:1] + c.shape[2:], np.uint32)
    for i in range(8):
        words |= c[:, order[i]] << np.uint32(4 * i)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), 0, axis))


def _int32(name: str, a, fn: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.int32, np.uint32):
        raise ValueError(f"{fn}: {name} must be a 2-D int32 array, got {a.dtype} of shape {a.shape}")
    return a


def _qarray(codes, zeros, scales, dtype, fn: str) -> QArray:
    """The QArray of ``(K, N)`` codes in ``[0, 15]`` with ``(G, N)`` integer zero points and scales."""
    (k, n), groups = codes.shape, scales.shape[0]
    scale_dtype = jnp.dtype(scales.dtype) if jnp.dtype(scales.dtype).name in ("float32", "bfloat16") else jnp.float16
    spec = dict(axis=0, group_size=None if groups == 1 else k // groups, scale_dtype=jnp.dtype(scale_dtype).name)
    scale = jnp.asarray(scales, scale_dtype)
    if np.all(zeros == 8):  # symmetric: q - 8 are int4 codes, no zero points needed
        return QArray(pack_int4(jnp.asarray(codes.astype(np.int8) - 8)), scale, None, (k, n), jnp.dtype(dtype),
                      QuantSpec(format="int4", **spec))
    if np.any(zeros > 15):
        raise ValueError(f"{fn}: a stored zero point is 15, which checkpoint_format='gptq' reads as 16: out of the "
                         f"4-bit range (a 'gptq_v2' checkpoint read as 'gptq'?)")
    return QArray(pack_int4(jnp.asarray(codes)), scale, jnp.asarray(zeros, scale_dtype), (k, n), jnp.dtype(dtype),
                  QuantSpec(format="uint4", **spec))


def _check_shapes(k: int, n: int, qzeros, scales, fn: str) -> int:
    """The group count, after checking ``qzeros`` ``(G, N / 8)`` and ``scales`` ``(G, N)`` against ``K, N``."""
    scales = np.asarray(scales)
    groups = scales.shape[0] if scales.ndim == 2 else 0
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // 8) or not groups or k % groups or n % 8:
        raise ValueError(f"{fn}: expected qzeros (G, N / 8) and scales (G, N) with G dividing K = {k} and N = {n} "
                         f"a multiple of 8, got qzeros {qzeros.shape} and scales {scales.shape}")
    return groups


def from_gptq(qweight, qzeros, scales, g_idx=None, *, dtype=jnp.float16, checkpoint_format: str = "gptq") -> QArray:
    """An AutoGPTQ-layout layer (module docstring) as a ``(K, N)`` QArray with the same values.

    Args:
      qweight, qzeros, scales, g_idx: the layer's tensors (numpy or JAX arrays); ``g_idx`` may be
        omitted when the groups are ``arange(K) // (K / G)``.
      dtype: the QArray's dtype (``dequantize``'s default; float16 as GPTQ computes).
      checkpoint_format: ``"gptq"`` (zero points stored minus one) or ``"gptq_v2"``.

    Returns:
      ``int4`` when every zero point is 8, else ``uint4`` with zero points; per channel for one group,
      else groups of ``K / G`` rows along axis 0; scales (and zero points) in the checkpoint's float16,
      or its bfloat16 / float32 where a tool stored those.
      ``dequantize`` gives ``scales[g_idx] * (q - z[g_idx])`` rounded once to ``dtype``.

    Raises:
      ValueError: shapes that do not fit together, a ``g_idx`` whose groups are not contiguous runs
        of equal length (act order), or an unknown ``checkpoint_format``.

    Example:
      >>> import jax, quantize_jax as qj
      >>> from quantize_jax.hf_checkpoints import from_gptq, to_gptq
      >>> w = jax.random.normal(jax.random.key(0), (64, 16))
      >>> q = qj.quantize(w, qj.QuantSpec(format="uint4", axis=0, group_size=32, scale_dtype="float16"))
      >>> tensors = to_gptq(q)
      >>> {k: v.shape for k, v in tensors.items()}
      {'qweight': (8, 16), 'qzeros': (2, 2), 'scales': (2, 16), 'g_idx': (64,)}
      >>> bool((qj.dequantize(from_gptq(**tensors)) == qj.dequantize(q, "float16")).all())
      True
    """
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"from_gptq: checkpoint_format must be one of {list(GPTQ_FORMATS)}, got {checkpoint_format!r}")
    qweight, qzeros = _int32("qweight", qweight, "from_gptq"), _int32("qzeros", qzeros, "from_gptq")
    k, n = 8 * qweight.shape[0], qweight.shape[1]
    size = k // _check_shapes(k, n, qzeros, scales, "from_gptq")
    if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(k) // size):
        raise ValueError(f"from_gptq: g_idx must put rows in contiguous groups of {size} (arange(K) // {size}); "
                         f"this checkpoint's groups are permuted (act order, desc_act=True), which a QArray's "
                         f"contiguous groups cannot hold")
    zeros = _unpack_words(qzeros, axis=1).astype(np.int32) + (checkpoint_format == "gptq")
    return _qarray(_unpack_words(qweight, axis=0), zeros, np.asarray(scales), dtype, "from_gptq")


def from_awq(qweight, qzeros, scales, *, dtype=jnp.float16) -> QArray:
    """An AutoAWQ GEMM-layout layer (module docstring) as a ``(K, N)`` QArray with the same values;
    :func:`from_gptq`'s returns and errors.

    Example:
      >>> import jax, quantize_jax as qj
      >>> from quantize_jax.hf_checkpoints import from_awq, to_awq
      >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (64, 16)),
      ...                 qj.QuantSpec(format="uint4", axis=0, group_size=32, scale_dtype="float16"))
      >>> {k: v.shape for k, v in to_awq(q).items()}
      {'qweight': (64, 2), 'qzeros': (2, 2), 'scales': (2, 16)}
      >>> bool((qj.dequantize(from_awq(**to_awq(q))) == qj.dequantize(q, "float16")).all())
      True
    """
    qweight, qzeros = _int32("qweight", qweight, "from_awq"), _int32("qzeros", qzeros, "from_awq")
    k, n = qweight.shape[0], 8 * qweight.shape[1]
    _check_shapes(k, n, qzeros, scales, "from_awq")
    codes = _unpack_words(qweight, axis=1, order=_AWQ_ORDER)
    zeros = _unpack_words(qzeros, axis=1, order=_AWQ_ORDER).astype(np.int32)
    return _qarray(codes, zeros, np.asarray(scales), dtype, "from_awq")


def _codes_scales_zeros(q: QArray, fn: str, lowest_zero: int):
    """``(codes (K, N) in [0, 15], float16 scales (G, N), integer zero points (G, N), rows per group)``
    of a 2-D int4 / uint4 QArray with scales along axis 0, checked to fit the 4-bit layouts."""
    if not isinstance(q, QArray) or len(q.shape) != 2:
        raise ValueError(f"{fn}: expected a 2-D QArray (K, N), got {q!r}")
    (k, n), spec = q.shape, q.spec
    grouped = spec.group_size is not None and spec.axis == 0 and spec.group_size < k
    if spec.format not in ("int4", "uint4") or spec.axis != 0 or k % 8 or n % 8 or (grouped and k % spec.group_size):
        raise ValueError(f"{fn}: expected int4 or uint4 with scales along axis 0 (per output channel or groups "
                         f"dividing K) and K, N multiples of 8, got format={spec.format!r}, axis={spec.axis!r}, "
                         f"group_size={spec.group_size!r} for shape {q.shape}")
    scale = np.asarray(q.scale, np.float32)
    scales = scale.astype(np.float16)
    if not np.all(np.isfinite(scales)) or np.any((scales == 0) != (scale == 0)):
        raise ValueError(f"{fn}: scales from {scale.min():.3g} to {scale.max():.3g} overflow or vanish in float16")
    codes = np.asarray(q.codes())
    if spec.format == "int4":
        return (codes.astype(np.int32) + 8).astype(np.uint8), scales, np.full(scales.shape, 8, np.int32), \
            spec.group_size if grouped else k
    z = np.asarray(q.zero_point, np.float32)
    zeros = np.rint(z).astype(np.int32)
    if np.any(zeros != z) or np.any(zeros < lowest_zero) or np.any(zeros > 15):
        raise ValueError(f"{fn}: zero points must be integers in [{lowest_zero}, 15], got values from {z.min():g} "
                         f"to {z.max():g}" + (" (checkpoint_format='gptq' stores z - 1: use 'gptq_v2' for a zero "
                                              "point of 0)" if lowest_zero else ""))
    return codes, scales, zeros, spec.group_size if grouped else k


def to_gptq(q: QArray, *, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """A ``(K, N)`` int4 or uint4 QArray with scales along axis 0 as an AutoGPTQ-layout layer.

    ``int4`` codes ``c`` become ``q = c + 8`` with zero point 8 (GPTQ's ``sym=True``); ``uint4`` keeps its
    codes and integer zero points. Scales are stored as float16, the layout's dtype (exact when the
    QArray's ``scale_dtype`` is float16; otherwise each scale is rounded once, as GPTQ tools round theirs).

    Returns:
      ``{"qweight", "qzeros", "scales", "g_idx"}`` as numpy arrays (int32, int32, float16, int32).

    Raises:
      ValueError: ``q`` is not 2-D, its format is not int4 / uint4, its scales do not run along axis 0
        (per output channel or in groups that divide ``K``), ``K`` or ``N`` is not a multiple of 8, a
        zero point is not an integer in the range the format stores (``"gptq"`` cannot store 0), or a
        scale overflows or vanishes in float16.
    """
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"to_gptq: checkpoint_format must be one of {list(GPTQ_FORMATS)}, got {checkpoint_format!r}")
    v1 = checkpoint_format == "gptq"
    codes, scales, zeros, size = _codes_scales_zeros(q, "to_gptq", lowest_zero=int(v1))
    return {"qweight": _pack_words(codes, axis=0), "qzeros": _pack_words(zeros - v1, axis=1), "scales": scales,
            "g_idx": (np.arange(q.shape[0]) // size).astype(np.int32)}


def to_awq(q: QArray) -> dict[str, np.ndarray]:
    """A ``(K, N)`` int4 or uint4 QArray with scales along axis 0 as an AutoAWQ GEMM-layout layer
    (``{"qweight", "qzeros", "scales"}``); :func:`to_gptq`'s conversions and errors."""
    codes, scales, zeros, _ = _codes_scales_zeros(q, "to_awq", lowest_zero=0)
    return {"qweight": _pack_words(codes, axis=1, order=_AWQ_ORDER),
            "qzeros": _pack_words(zeros, axis=1, order=_AWQ_ORDER), "scales": scales}


def load(path, *, layout: str = "gptq", dtype=jnp.float16, checkpoint_format: str = "gptq") -> dict:
    """A safetensors file of GPTQ or AWQ layers (Hugging Face names) as ``{name: array or QArray}``.

    Every layer stored as ``PREFIX.qweight`` / ``.qzeros`` / ``.scales`` (/ ``.g_idx``) becomes one
    QArray under ``PREFIX`` (its ``(in, out)`` kernel, :func:`from_gptq` / :func:`from_awq`); every
    other tensor (biases, embeddings, norms) is returned as the numpy array it is, under its own name.
    ``checkpoint_format`` is GPTQ's (``"gptq"`` or ``"gptq_v2"``).
    """
    from safetensors.numpy import load_file

    if layout not in LAYOUTS:
        raise ValueError(f"load: layout must be one of {list(LAYOUTS)}, got {layout!r}")
    tensors = load_file(str(path))
    prefixes = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")}
    names = _TENSORS[layout]
    out = {name: a for name, a in tensors.items()
           if name.rsplit(".", 1)[0] not in prefixes or name.rsplit(".", 1)[1] not in names}
    for prefix in sorted(prefixes):
        missing = [t for t in names[:3] if f"{prefix}.{t}" not in tensors]
        if missing:
            raise ValueError(f"load: layer {prefix!r} in {path} has a qweight but no {', '.join(missing)}")
        parts = {t: tensors[f"{prefix}.{t}"] for t in names if f"{prefix}.{t}" in tensors}
        try:
            out[prefix] = (from_gptq(**parts, dtype=dtype, checkpoint_format=checkpoint_format) if layout == "gptq"
                           else from_awq(**parts, dtype=dtype))
        except ValueError as e:
            raise ValueError(f"load: layer {prefix!r}: {e}") from None
    return out


def save(path, tensors: dict, *, layout: str = "gptq", checkpoint_format: str = "gptq") -> dict:
    """Write ``{name: array or QArray}`` as a safetensors file of GPTQ or AWQ layers that :func:`load`
    (and readers of that layout) read: each QArray as ``NAME.qweight`` / ``.qzeros`` / ``.scales``
    (/ ``.g_idx``), arrays under their names.

    Returns:
      The ``quantization_config`` entry of a Hugging Face ``config.json`` for these layers.

    Raises:
      ValueError: the QArrays differ in group size, or one cannot be stored (:func:`to_gptq`).
    """
    from safetensors.numpy import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"save: layout must be one of {list(LAYOUTS)}, got {layout!r}")
    flat, sizes, symmetric = {}, set(), True
    for name, value in tensors.items():
        if isinstance(value, QArray):
            try:
                parts = to_gptq(value, checkpoint_format=checkpoint_format) if layout == "gptq" else to_awq(value)
            except ValueError as e:
                raise ValueError(f"save: {name!r}: {e}") from None
            flat.update({f"{name}.{t}": a for t, a in parts.items()})
            sizes.add(-1 if value.spec.group_size in (None, value.shape[0]) else value.spec.group_size)
            symmetric &= value.spec.format == "int4"
        else:
            flat[name] = np.ascontiguousarray(np.asarray(value))
    if len(sizes) > 1:
        raise ValueError(f"save: a checkpoint has one group size, got {sorted(sizes)} (-1: per channel)")
    save_file(flat, str(path), metadata={"format": "pt"})
    size = sizes.pop() if sizes else -1
    if layout == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": size, "zero_point": True, "version": "gemm"}
    return {"quant_method": "gptq", "bits": 4, "group_size": size, "sym": symmetric, "desc_act": False,
            "checkpoint_format": checkpoint_format}
