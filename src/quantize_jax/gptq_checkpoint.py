"""4-bit GPTQ checkpoints in AutoGPTQ's layout (what Hugging Face transformers, vLLM and AutoGPTQ read
and write), to and from QArrays.

A GPTQ linear layer of ``K`` inputs and ``N`` outputs is stored as four tensors:

* ``qweight`` int32 ``(K / 8, N)``: eight 4-bit codes ``q`` per word along ``K``, row ``8i + j`` in bits
  ``4j .. 4j + 3`` of word row ``i``;
* ``qzeros`` int32 ``(G, N / 8)``: each group's zero point ``z`` of eight outputs per word, in the same
  nibble order; ``checkpoint_format="gptq"`` (AutoGPTQ's v1, the common one) stores ``z - 1``,
  ``"gptq_v2"`` stores ``z``;
* ``scales`` float16 ``(G, N)``; ``g_idx`` int32 ``(K,)``: the group of each input row;

and the weight is ``w[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``, the ``(K, N)`` kernel
``y = x @ w`` multiplies (a Flax Dense kernel's layout). As a :class:`~quantize_jax.QArray` that is a
``uint4`` array with one scale and zero point per group along axis 0, or, when every zero point is 8
(GPTQ's ``sym=True``), the ``int4`` array of codes ``q - 8`` without zero points: the same values, and
what ``qdot``'s fast paths read. Only checkpoints whose groups are contiguous runs of rows
(``desc_act=False``) map onto a QArray; act-order checkpoints are refused.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from quantize_jax.packing import pack_int4
from quantize_jax.qarray import QArray
from quantize_jax.spec import QuantSpec

FORMATS = ("gptq", "gptq_v2")
_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _unpack_words(words: np.ndarray, axis: int) -> np.ndarray:
    """Eight 4-bit codes per int32 word, the low nibble first, laid out along ``axis``."""
    u = np.asarray(words).astype(np.uint32)
    nibbles = np.stack([(u >> (4 * j)) & 0xF for j in range(8)], axis=axis + 1)  # (..., words, 8, ...)
    shape = list(u.shape)
    shape[axis] *= 8
    return nibbles.reshape(shape).astype(np.uint8)


def _pack_words(codes: np.ndarray, axis: int) -> np.ndarray:
    """:func:`_unpack_words` reversed: codes in ``[0, 15]``, eight per int32 word along ``axis``."""
    c = np.moveaxis(np.asarray(codes, np.uint32), axis, 0)
    c = c.reshape((c.shape[0] // 8, 8) + c.shape[1:])
    words = np.zeros(c.shape[:1] + c.shape[2:], np.uint32)
    for j in range(8):
        words |= c[:, j] << np.uint32(4 * j)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), 0, axis))


def _check_format(checkpoint_format: str, fn: str) -> None:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"{fn}: checkpoint_format must be one of {list(FORMATS)}, got {checkpoint_format!r}")


def from_gptq(qweight, qzeros, scales, g_idx=None, *, dtype=jnp.float16, checkpoint_format: str = "gptq") -> QArray:
    """A 4-bit GPTQ layer (module docstring) as a ``(K, N)`` QArray with the same values.

    Args:
      qweight, qzeros, scales, g_idx: the layer's tensors (numpy or JAX arrays); ``g_idx`` may be
        omitted when the groups are ``arange(K) // (K / G)``.
      dtype: the QArray's dtype (``dequantize``'s default; float16 as GPTQ computes).
      checkpoint_format: ``"gptq"`` (zero points stored minus one) or ``"gptq_v2"``.

    Returns:
      ``int4`` with float16 scales when every zero point is 8, else ``uint4`` with float16 scales and
      zero points; per channel for one group, else groups of ``K / G`` rows along axis 0.
      ``dequantize`` gives ``scales[g_idx] * (q - z[g_idx])`` rounded once to ``dtype``.

    Raises:
      ValueError: shapes that do not fit together, a ``g_idx`` whose groups are not contiguous runs
        of equal length (act order), or an unknown ``checkpoint_format``.

    Example:
      >>> import jax, quantize_jax as qj
      >>> from quantize_jax.gptq_checkpoint import from_gptq, to_gptq
      >>> w = jax.random.normal(jax.random.key(0), (64, 16))
      >>> q = qj.quantize(w, qj.QuantSpec(format="uint4", axis=0, group_size=32, scale_dtype="float16"))
      >>> tensors = to_gptq(q)
      >>> {k: v.shape for k, v in tensors.items()}
      {'qweight': (8, 16), 'qzeros': (2, 2), 'scales': (2, 16), 'g_idx': (64,)}
      >>> bool((qj.dequantize(from_gptq(**tensors)) == qj.dequantize(q, "float16")).all())
      True
    """
    _check_format(checkpoint_format, "from_gptq")
    qweight, qzeros, scales = (np.asarray(a) for a in (qweight, qzeros, scales))
    for name, a in (("qweight", qweight), ("qzeros", qzeros)):
        if a.ndim != 2 or a.dtype not in (np.int32, np.uint32):
            raise ValueError(f"from_gptq: {name} must be a 2-D int32 array, got {a.dtype} of shape {a.shape}")
    k, n = 8 * qweight.shape[0], qweight.shape[1]
    groups = scales.shape[0] if scales.ndim == 2 else 0
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // 8) or not groups or k % groups or n % 8:
        raise ValueError(f"from_gptq: expected qweight (K / 8, N), qzeros (G, N / 8) and scales (G, N) with G "
                         f"dividing K and N a multiple of 8, got qweight {qweight.shape}, qzeros {qzeros.shape} "
                         f"and scales {scales.shape}")
    size = k // groups
    if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(k) // size):
        raise ValueError(f"from_gptq: g_idx must put rows in contiguous groups of {size} (arange(K) // {size}); "
                         f"this checkpoint's groups are permuted (act order, desc_act=True), which a QArray's "
                         f"contiguous groups cannot hold")
    codes = _unpack_words(qweight, axis=0)
    zeros = _unpack_words(qzeros, axis=1).astype(np.int32) + (checkpoint_format == "gptq")
    spec = dict(axis=0, group_size=None if groups == 1 else size, scale_dtype="float16")
    scale = jnp.asarray(scales, jnp.float16)
    if np.all(zeros == 8):  # symmetric: q - 8 are int4 codes, no zero points needed
        return QArray(pack_int4(jnp.asarray(codes.astype(np.int8) - 8)), scale, None, (k, n), jnp.dtype(dtype),
                      QuantSpec(format="int4", **spec))
    if np.any(zeros > 15):
        raise ValueError("from_gptq: a stored zero point is 15, which checkpoint_format='gptq' reads as 16: out of "
                         "the 4-bit range (a 'gptq_v2' checkpoint read as 'gptq'?)")
    return QArray(pack_int4(jnp.asarray(codes)), scale, jnp.asarray(zeros, jnp.float16), (k, n), jnp.dtype(dtype),
                  QuantSpec(format="uint4", **spec))


def to_gptq(q: QArray, *, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """A ``(K, N)`` int4 or uint4 QArray with scales along axis 0 as a GPTQ layer's tensors.

    ``int4`` codes ``c`` become ``q = c + 8`` with zero point 8 (GPTQ's ``sym=True``); ``uint4`` keeps its
    codes and integer zero points. Scales are stored as float16, GPTQ's dtype (exact when the QArray's
    ``scale_dtype`` is float16; otherwise each scale is rounded once, as GPTQ tools round theirs).

    Returns:
      ``{"qweight", "qzeros", "scales", "g_idx"}`` as numpy arrays (int32, int32, float16, int32).

    Raises:
      ValueError: ``q`` is not 2-D, its format is not int4 / uint4, its scales do not run along axis 0
        (per output channel or in groups that divide ``K``), ``K`` or ``N`` is not a multiple of 8, a
        zero point is not an integer in the range the format stores (``"gptq"`` cannot store 0), or a
        scale overflows or vanishes in float16.
    """
    _check_format(checkpoint_format, "to_gptq")
    if not isinstance(q, QArray) or len(q.shape) != 2:
        raise ValueError(f"to_gptq: expected a 2-D QArray (K, N), got {q!r}")
    k, n = q.shape
    spec = q.spec
    grouped = spec.group_size is not None and spec.axis == 0 and spec.group_size < k
    per_channel = spec.axis == 0 and not grouped
    if spec.format not in ("int4", "uint4") or not (per_channel or grouped) or k % 8 or n % 8 or (
            grouped and k % spec.group_size):
        raise ValueError(f"to_gptq: expected int4 or uint4 with scales along axis 0 (per output channel or groups "
                         f"dividing K) and K, N multiples of 8, got format={spec.format!r}, axis={spec.axis!r}, "
                         f"group_size={spec.group_size!r} for shape {q.shape}")
    size = spec.group_size if grouped else k
    scale = np.asarray(q.scale, np.float32)
    scales = scale.astype(np.float16)
    if not np.all(np.isfinite(scales)) or np.any((scales == 0) != (scale == 0)):
        raise ValueError(f"to_gptq: scales from {scale.min():.3g} to {scale.max():.3g} overflow or vanish in float16")
    codes = np.asarray(q.codes())
    if spec.format == "int4":
        codes, zeros = (codes.astype(np.int32) + 8).astype(np.uint8), np.full(scales.shape, 8, np.int32)
    else:
        z = np.asarray(q.zero_point, np.float32)
        zeros = np.rint(z).astype(np.int32)
        low = 1 if checkpoint_format == "gptq" else 0
        if np.any(zeros != z) or np.any(zeros < low) or np.any(zeros > 15):
            raise ValueError(f"to_gptq: zero points must be integers in [{low}, 15] for checkpoint_format="
                             f"{checkpoint_format!r}, got values from {z.min():g} to {z.max():g}"
                             + (" ('gptq' stores z - 1: use 'gptq_v2' for a zero point of 0)" if low else ""))
    stored = zeros - (checkpoint_format == "gptq")
    return {"qweight": _pack_words(codes, axis=0), "qzeros": _pack_words(stored, axis=1), "scales": scales,
            "g_idx": (np.arange(k) // size).astype(np.int32)}


def load_gptq(path, *, dtype=jnp.float16, checkpoint_format: str = "gptq") -> dict:
    """A GPTQ safetensors file (Hugging Face names) as ``{name: array or QArray}``.

    Every layer stored as ``PREFIX.qweight`` / ``.qzeros`` / ``.scales`` (/ ``.g_idx``) becomes one
    QArray under ``PREFIX`` (its ``(in, out)`` kernel, :func:`from_gptq`); every other tensor (biases,
    embeddings, norms) is returned as the numpy array it is, under its own name.
    """
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    prefixes = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")}
    out = {name: a for name, a in tensors.items() if name.rsplit(".", 1)[0] not in prefixes
           or name.rsplit(".", 1)[1] not in _TENSORS}
    for prefix in sorted(prefixes):
        missing = [t for t in _TENSORS[:3] if f"{prefix}.{t}" not in tensors]
        if missing:
            raise ValueError(f"load_gptq: layer {prefix!r} in {path} has a qweight but no {', '.join(missing)}")
        parts = {t: tensors[f"{prefix}.{t}"] for t in _TENSORS if f"{prefix}.{t}" in tensors}
        try:
            out[prefix] = from_gptq(**parts, dtype=dtype, checkpoint_format=checkpoint_format)
        except ValueError as e:
            raise ValueError(f"load_gptq: layer {prefix!r}: {e}") from None
    return out


def save_gptq(path, tensors: dict, *, checkpoint_format: str = "gptq") -> dict:
    """Write ``{name: array or QArray}`` as a GPTQ safetensors file that :func:`load_gptq` (and
    AutoGPTQ-format readers) read: each QArray as ``NAME.qweight`` / ``.qzeros`` / ``.scales`` /
    ``.g_idx`` (:func:`to_gptq`), arrays under their names.

    Returns:
      The ``quantization_config`` entry of a Hugging Face ``config.json`` for these layers
      (``bits``, ``group_size``, ``sym``, ``desc_act``, ``checkpoint_format``, ``quant_method``).

    Raises:
      ValueError: the QArrays differ in group size, or one cannot be stored (:func:`to_gptq`).
    """
    from safetensors.numpy import save_file

    flat, sizes, symmetric = {}, set(), True
    for name, value in tensors.items():
        if isinstance(value, QArray):
            try:
                parts = to_gptq(value, checkpoint_format=checkpoint_format)
            except ValueError as e:
                raise ValueError(f"save_gptq: {name!r}: {e}") from None
            flat.update({f"{name}.{t}": a for t, a in parts.items()})
            sizes.add(-1 if value.spec.group_size in (None, value.shape[0]) else value.spec.group_size)
            symmetric &= value.spec.format == "int4"
        else:
            flat[name] = np.ascontiguousarray(np.asarray(value))
    if len(sizes) > 1:
        raise ValueError(f"save_gptq: a checkpoint has one group size, got {sorted(sizes)} (-1: per channel)")
    save_file(flat, str(path), metadata={"format": "pt"})
    return {"quant_method": "gptq", "bits": 4, "group_size": sizes.pop() if sizes else -1, "sym": symmetric,
            "desc_act": False, "checkpoint_format": checkpoint_format}
