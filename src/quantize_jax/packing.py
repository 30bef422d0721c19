"""Two 4-bit codes per byte, along any axis, and back.

Codes are paired along the packing axis: element ``2i`` goes to the low
nibble and element ``2i + 1`` to the high nibble of byte ``i`` (the ONNX /
torchao "plain" order, and XLA's own layout of ``jnp.int4`` arrays). An odd
length is padded with one zero nibble. Every other axis keeps its place.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import core, lax

def pack_int4(codes: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Pack 4-bit codes two per byte along ``axis``.

    Args:
      codes: an integer array: signed codes in ``[-8, 7]`` (int8, int4, ...)
        or unsigned codes in ``[0, 15]`` (uint8, uint4, ...).
      axis: the axis to pack along.

    Returns:
      A uint8 array with ``ceil(n / 2)`` elements on ``axis`` (``n`` its
      length in ``codes``): ``low nibble = codes[2i] & 0xF``,
      ``high nibble = codes[2i + 1] & 0xF``.

    Raises:
      TypeError: ``codes`` is not an integer array.
      ValueError: ``axis`` is out of range; or, in eager mode, a code is out
        of its 4-bit range. Under ``jit`` values cannot be checked: each code
        is masked to its low 4 bits, so a bad code never spills into its
        neighbour's nibble.

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> qj.pack_int4(jnp.array([1, -2, 3], jnp.int8)).tolist()
      [225, 3]
    """
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(
            f"pack_int4: codes must be an integer array (int8 in [-8, 7] or uint8 in [0, 15]), "
            f"got dtype {codes.dtype} of shape {codes.shape}"
        )
    ax = _axis(axis, codes.shape, "pack_int4")
    _check_range(codes)
    n = codes.shape[ax]
    u = lax.convert_element_type(codes, jnp.uint8) & 0xF  # two's complement nibble for signed codes
    if n % 2:
        widths = [(0, 0)] * u.ndim
        widths[ax] = (0, 1)
        u = jnp.pad(u, widths)
    # Pairs as a reshape (n) -> (n / 2, 2), not strided slices: a sharded axis stays sharded, with no
    # communication, whenever each shard holds whole bytes.
    pairs = u.reshape(u.shape[:ax] + (u.shape[ax] // 2, 2) + u.shape[ax + 1 :])
    lo = lax.index_in_dim(pairs, 0, ax + 1, keepdims=False)
    hi = lax.index_in_dim(pairs, 1, ax + 1, keepdims=False)
    return lo | (hi << 4)


def unpack_int4(packed: jnp.ndarray, axis: int = -1, signed: bool = True, length: int | None = None) -> jnp.ndarray:
    """Unpack bytes into two 4-bit codes each along ``axis``.

    Args:
      packed: a uint8 array from :func:`pack_int4`.
      axis: the packed axis.
      signed: give int8 codes in ``[-8, 7]`` (sign-extended nibbles); else
        uint8 codes in ``[0, 15]``.
      length: the true length of ``axis`` before packing (drops the padding
        nibble of an odd length). Default: twice the packed length.

    Returns:
      int8 (``signed``) or uint8 codes, ``length`` elements on ``axis``.

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> p = qj.pack_int4(jnp.array([1, -2, 3], jnp.int8))
      >>> qj.unpack_int4(p, length=3).tolist()
      [1, -2, 3]
    """
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_int4: packed must be uint8, got dtype {packed.dtype} of shape {packed.shape}")
    ax = _axis(axis, packed.shape, "unpack_int4")
    full = 2 * packed.shape[ax]
    if length is None:
        length = full
    if not isinstance(length, (int, np.integer)) or not full - 1 <= length <= full:
        raise ValueError(
            f"unpack_int4: length {length!r} does not fit axis {axis} of packed shape {packed.shape} "
            f"(expected {full - 1} or {full})"
        )
    if signed:
        s = lax.bitcast_convert_type(packed, jnp.int8)
        lo = (s << 4) >> 4  # arithmetic shifts sign-extend the low nibble
        hi = s >> 4
    else:
        lo = packed & 0xF
        hi = packed >> 4
    both = jnp.stack([lo, hi], axis=ax + 1)
    out = both.reshape(packed.shape[:ax] + (full,) + packed.shape[ax + 1 :])
    return lax.slice_in_dim(out, 0, int(length), axis=ax) if length != full else out


def _axis(axis, shape, fn: str) -> int:
    ndim = len(shape)
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: axis {axis!r} is out of range for shape {tuple(shape)}")
    return int(axis) % ndim


def _check_range(codes) -> None:
    """In eager mode, refuse codes outside both 4-bit ranges' union for the dtype's signedness."""
    if isinstance(codes, core.Tracer):
        return
    lo, hi = (-8, 7) if jnp.issubdtype(codes.dtype, jnp.signedinteger) else (0, 15)
    if codes.size == 0:
        return
    cmin, cmax = int(jnp.min(codes)), int(jnp.max(codes))
    if cmin < lo or cmax > hi:
        bad = cmin if cmin < lo else cmax
        raise ValueError(
            f"pack_int4: codes of dtype {codes.dtype} must lie in [{lo}, {hi}], found {bad} "
            f"(codes of shape {codes.shape})"
        )
