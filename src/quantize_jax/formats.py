"""The four 4-bit formats: their levels, their codes, and how values map to codes.

Every format stores a 4-bit *code* per value; ``decode(code) * scale`` is the
value it stands for.

=========  ==========================================  ======================
format     levels (before scaling)                      code of a level
=========  ==========================================  ======================
``int4``   integers -8 .. 7                             the integer, two's
                                                        complement nibble
``uint4``  integers 0 .. 15, minus a zero point z       the integer
``nf4``    the 16 NormalFloat values of QLoRA, [-1, 1]  index into the table
``fp4``    OCP e2m1: +-{0, .5, 1, 1.5, 2, 3, 4, 6}      the e2m1 bit pattern
=========  ==========================================  ======================

Rounding to a level:

* ``int4`` / ``uint4``: half to even (``jnp.round``), then clip to
  ``[qmin, qmax]``.
* ``fp4``: saturate to [-6, 6], then round to nearest, ties to even mantissa
  (so 0.75 -> 1, 5 -> 4), as XLA's float -> float4_e2m1fn conversion does.
* ``nf4``: the nearest table value; a value exactly half way between two
  levels goes to the lower one, as in bitsandbytes' ``quantize_nf4``.

References:
  Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (nf4).
  OCP Microscaling Formats (MX) Specification v1.0, 2023 (e2m1).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

# The NF4 table of QLoRA / bitsandbytes (``bitsandbytes.functional.get_4bit_type('nf4')``).
_NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# e2m1 values by bit pattern: sign bit 3, exponent bits 2-1, mantissa bit 0.
_FP4_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclasses.dataclass(frozen=True)
class Format:
    """A 4-bit format.

    Attributes:
      name: ``"int4"``, ``"uint4"``, ``"nf4"`` or ``"fp4"``.
      levels: the 16 values that codes 0..15 decode to (before scaling); for
        ``int4`` code ``c`` is the nibble of the signed integer, so codes 8..15
        decode to -8..-1.
      is_integer: codes are integers ``q`` in ``[qmin, qmax]`` and decode to
        ``q - zero_point``.
      signed_codes: codes are stored as signed nibbles (``int4`` only).
      has_zero_point: the format carries an integer zero point (``uint4``).
      qmin, qmax: the integer range (integer formats), else the smallest and
        largest level.
    """

    name: str
    levels: tuple[float, ...]
    is_integer: bool
    signed_codes: bool
    has_zero_point: bool
    qmin: float
    qmax: float

    @property
    def max_abs_level(self) -> float:
        """The largest magnitude a symmetric scale maps ``absmax`` to."""
        return float(self.qmax) if self.is_integer else max(abs(v) for v in self.levels)

    def levels_array(self, dtype=jnp.float32) -> jnp.ndarray:
        """The 16 decoded levels, indexed by code (0..15)."""
        return jnp.asarray(np.asarray(self.levels, np.float32), dtype)

    def encode(self, y: jnp.ndarray, zero_point=None) -> jnp.ndarray:
        """Codes for ``y = x / scale`` (float32): int8 for ``int4``, else uint8.

        Integer formats give ``clip(round(y) + z, qmin, qmax)``.
        """
        if self.is_integer:
            q = jnp.round(y)
            if zero_point is not None:
                q = q + zero_point
            q = jnp.clip(q, self.qmin, self.qmax)
            return q.astype(jnp.int8 if self.signed_codes else jnp.uint8)
        if self.name == "fp4":
            return _encode_e2m1(y)
        # nf4: the number of midpoints strictly below y is the index of the nearest level.
        levels = np.asarray(self.levels, np.float32)
        midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
        return jnp.searchsorted(midpoints, y, side="left", method="compare_all").astype(jnp.uint8)

    def decode(self, codes: jnp.ndarray, zero_point=None) -> jnp.ndarray:
        """The float32 level of each code (``q - z`` for integer formats)."""
        if self.is_integer:
            q = codes.astype(jnp.float32)
            return q if zero_point is None else q - zero_point
        return jnp.take(self.levels_array(), codes.astype(jnp.int32), mode="clip")

    def in_range(self, y: jnp.ndarray, zero_point=None) -> jnp.ndarray:
        """Where ``y = x / scale`` is representable without clipping.

        Integer formats test the rounded code, as PyTorch's fake-quant mask
        does: ``qmin <= round(y) + z <= qmax``. Codebooks test
        ``min_level <= y <= max_level``.
        """
        if self.is_integer:
            q = jnp.round(y)
            if zero_point is not None:
                q = q + zero_point
            return (q >= self.qmin) & (q <= self.qmax)
        return (y >= self.qmin) & (y <= self.qmax)


def _encode_e2m1(y: jnp.ndarray) -> jnp.ndarray:
    """e2m1 bit patterns of ``y``: saturate to [-6, 6], round to nearest, ties to even mantissa.

    The same result as XLA's float32 -> float4_e2m1fn conversion, in plain
    arithmetic (that conversion fails to compile inside some fused loops on
    CPU): the grid step is 0.5 below 2, 1 below 4 and 2 up to 6, and
    ``round(|y| / step)`` is even exactly when the mantissa bit is 0.
    """
    a = jnp.minimum(jnp.abs(y), 6.0)
    step = jnp.where(a < 2.0, 0.5, jnp.where(a < 4.0, 1.0, 2.0))
    v = jnp.round(a / step) * step
    mag = jnp.where(v < 2.0, 2.0 * v, jnp.where(v < 4.0, v + 2.0, 0.5 * v + 4.0))
    return mag.astype(jnp.uint8) | jnp.where(jnp.signbit(y), jnp.uint8(8), jnp.uint8(0))


INT4 = Format("int4", tuple(float(v) for v in (*range(0, 8), *range(-8, 0))), True, True, False, -8.0, 7.0)
UINT4 = Format("uint4", tuple(float(v) for v in range(16)), True, False, True, 0.0, 15.0)
NF4 = Format("nf4", _NF4_LEVELS, False, False, False, -1.0, 1.0)
FP4 = Format("fp4", _FP4_LEVELS, False, False, False, -6.0, 6.0)

FORMATS: dict[str, Format] = {f.name: f for f in (INT4, UINT4, NF4, FP4)}


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name``.

    >>> get_format("fp4").max_abs_level
    6.0
    """
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"format: unknown 4-bit format {name!r}; expected one of {sorted(FORMATS)}") from None


def quantize_to_codes(x: jnp.ndarray, scale, zero_point, fmt: Format) -> jnp.ndarray:
    """The numerics contract, forward half: ``codes = encode(x * (1 / scale), z)``.

    ``x`` is float32; ``scale`` (and ``zero_point``, or ``None``) broadcast
    against it. For integer formats this is
    ``clip(round(x * (1 / s)) + z, qmin, qmax)``: multiply by the reciprocal,
    round half to even, then add the zero point, as PyTorch's fake-quant
    kernels do.
    """
    return fmt.encode(x * (1.0 / _f32(scale)), _f32(zero_point))


def dequantize_codes(codes: jnp.ndarray, scale, zero_point, fmt: Format) -> jnp.ndarray:
    """The numerics contract, backward half: ``decode(codes) * scale`` in float32,
    that is ``(q - z) * s`` for integer formats."""
    return fmt.decode(codes, _f32(zero_point)) * _f32(scale)


def _f32(v):
    return None if v is None else jnp.asarray(v, jnp.float32)
