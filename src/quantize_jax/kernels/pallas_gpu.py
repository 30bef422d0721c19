"""Pallas kernels for ``x @ W`` with a packed 4-bit weight (Triton on GPU; ``interpret=True`` on CPU).

The kernel reads the packed uint8 weight ``(K, ceil(N / 2))`` block by
block, splits each byte into its two codes in registers, converts them to the
activations' dtype (or, with ``magic=True``, ORs them into a float's mantissa:
no conversion instructions) and accumulates ``x @ low`` and ``x @ high`` (the
even and odd output columns) in float32, one K block at a time; the two
accumulators are interleaved back into column order once, at the end (a
Triton ``join``), so no weight tile is reshuffled. Per K block (``block_k``
divides the group size, so a block never straddles two groups)::

    acc += (x_blk @ u_blk - rowsum(x_blk) * c_g) * s_g

where ``u`` are the unsigned nibbles, ``c = z`` for ``uint4`` and ``c = 8 + z``
for ``int4`` (whose nibbles are flipped by ``^ 0x88`` so that ``u = q + 8``),
and ``s_g``, ``z_g`` the group's scale and zero point. So integer codes cost
one mask or shift and one convert each; ``nf4`` / ``fp4`` decode by a select
chain (Triton has no table lookups). Codes and ``fp4`` levels are exact in
bf16; ``nf4`` levels are rounded to the activations' dtype.

Small M is a GEMV: the K axis is split over ``split_k`` program instances,
whose partial sums XLA adds (or, with ``atomic=True``, each adds into the
output with a float32 atomic add: no partials array and no second pass, but
the order of the adds, and so the last bits, vary from run to run), so a
1-row product still fills the GPU; with ``gemv=True`` the product is a
broadcast multiply and sum instead of a ``tl.dot`` (whose smallest tile has
16 rows).

``ptx=True`` decodes integer codes with inline PTX (:func:`nibble_ptx`): each
code's nibble masked, flipped and ORed into a float's bits by one ``lop3``, then
one exact ``fma`` (16-bit pairs: two codes a ``lop3`` and a paired ``fma``); no
integer-to-float conversion (see :class:`_PtxDecode`). Its dot path runs one
``tl.dot`` per plane (low and high codes); its GEMV accumulates over K
elementwise and reduces once, with the next K blocks loading while one computes.
The dot is the default for integer codes and bf16 / f16 activations up to
``PTX_MAX_M`` rows (:func:`default_ptx`), the fastest measured there: on an H200
at K = N = 8192, 22.8 / 23.2 us at 1 / 16 rows, 1.6x bf16 x bf16 (the byte
kernel: 35.9 / 33.7 us; the PTX GEMV at one row: 26.1 at best).

The wrapper pads M, K and N to whole blocks (zero activations, zero codes,
unit scales), so any shape works; the PTX dot masks the rows past M instead.

:func:`matmul_transposed` is the backward pass's ``g @ W.T``: contracted over
the packed axis, each output tile inside one scale group, the gradient times
the scales multiplying the PTX-decoded codes (on an H200, 1.19-1.65x faster
than bf16's own backward up to 128 rows: benchmarks/RESULTS.md, session 19).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from quantize_jax.formats import Format


# Per float dtype: the unsigned integer of its width, the bits of b, and b, for the magic decode below.
_MAGIC = {jnp.float32: (jnp.uint32, 0x4B000000, 2.0**23), jnp.bfloat16: (jnp.uint16, 0x4300, 128.0),
          jnp.float16: (jnp.uint16, 0x6400, 1024.0)}


def _nibbles(p):
    """Bytes (uint8, or widened to uint32) -> their low and high nibbles: the codes of the even and the odd
    columns."""
    return p & 15, lax.shift_right_logical(p, jnp.asarray(4, p.dtype))


def _levels(codes, fmt: Format, dtype, magic: bool = False):
    """Codes ``0..15`` -> ``dtype``: the unsigned integer itself, or the format's level (a select chain).

    ``magic`` decodes integer codes without a conversion instruction (GPUs convert integers to floats at a
    fraction of their add rate): the code is ORed into the low mantissa bits of a float ``b`` (float32
    ``2**23``, bf16 128, f16 1024, whose mantissa spacing is 1), the bits read as a float give ``b + u``
    exactly, and one exact subtraction of ``b`` leaves ``u``."""
    if fmt.is_integer and magic:
        bits, pattern, bias = _MAGIC[jnp.dtype(dtype).type]
        return lax.bitcast_convert_type(codes.astype(bits) | bits(pattern), dtype) - jnp.asarray(bias, dtype)
    if fmt.is_integer:
        return codes.astype(dtype)
    out = jnp.zeros(codes.shape, jnp.float32)
    for code, level in enumerate(fmt.levels):
        if level != 0.0:
            out = jnp.where(codes == code, jnp.float32(level), out)
    return out.astype(dtype)


_TF32_DROPPED = 0x1FFF  # the 13 low mantissa bits of a float32 that TF32 does not keep


def _tf32_exact(fmt: Format) -> bool:
    """Whether every level of ``fmt`` has at most 11 significant bits (TF32's): integers and fp4, not nf4."""
    return not np.any(np.asarray(fmt.levels, np.float32).view(np.uint32) & _TF32_DROPPED)


def _tf32_truncate(v):
    """float32 ``v`` with the mantissa bits TF32 drops set to zero."""
    return lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(~_TF32_DROPPED & 0xFFFFFFFF),
                                    jnp.float32)


def _dot(x, w, fmt: Format, transposed: bool = False):
    """``x @ w`` (``transposed``: ``w @ x.T``, the decoded weight the dot's first operand) accumulated in
    float32 on tensor cores. 16-bit inputs as they are. float32 activations
    with TF32-exact levels: ``x`` split into three parts exact in TF32, ``x = h + m + l`` (``h``, ``m``
    truncations to TF32's 11 significant bits, ``l`` the last 2 bits), so each part's products with the
    decoded weight are exact and three TF32 dots give float32's accuracy; with full-precision float32
    dots (no tensor cores) Triton spilled 10-33 KB of registers (``tools/kernel_ptx.py``). nf4's levels
    are not TF32-exact: a full-precision float32 dot."""
    def dot(a, b, **precision):
        operands, dims = ((b, a), ((1,), (1,))) if transposed else ((a, b), ((1,), (0,)))
        return lax.dot_general(*operands, (dims, ((), ())), preferred_element_type=jnp.float32, **precision)

    if x.dtype != jnp.float32:
        return dot(x, w.astype(x.dtype))
    if not _tf32_exact(fmt):
        return dot(x, w, precision=lax.Precision.HIGHEST)
    w = w.astype(jnp.float32)
    return sum(dot(part, w) for part in tf32_parts(x))


def tf32_parts(x):
    """float32 ``x`` -> ``(h, m, l)`` with ``x = h + m + l`` exactly, each part exact in TF32: ``h`` and
    ``m`` truncations to 11 significant bits (``x - h`` and ``x - h - m`` are exact float32
    differences), ``l`` the 2 bits left of float32's 24 (flushed to zero where it is subnormal, below
    about ``|x| = 2**-102``: then the sum is off by at most ``2**-22`` relative)."""
    high = _tf32_truncate(x)
    middle = _tf32_truncate(x - high)
    return high, middle, x - high - middle


def _kernel(x_ref, p_ref, s_ref, *rest, fmt: Format, bk: int, nk: int, group_rows: int, per_group: bool,
            has_zero: bool, gemv: bool, atomic: bool, magic: bool):
    z_ref, o_ref = rest[0] if has_zero else None, rest[-1]  # (an atomic kernel's zeros input in between)
    split = pl.program_id(2)
    bm = x_ref.shape[0]
    bnh = p_ref.shape[1]

    def body(k, acc):
        x = x_ref[:, pl.ds(k * bk, bk)]
        p = p_ref[pl.ds(k * bk, bk), :]
        if fmt.signed_codes:
            p = p ^ jnp.uint8(0x88)  # two's complement nibble q -> q + 8, unsigned
        g = (split * nk + k) * bk // group_rows if per_group else 0
        offset = None
        if fmt.signed_codes or has_zero:  # the per-column offset c of the nibbles: 8 for int4, plus z
            c = _plane_rows(z_ref, g) if has_zero else (jnp.float32(0.0),) * 2
            offset = [ci + 8.0 if fmt.signed_codes else ci for ci in c]
            rowsum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
        scales = _plane_rows(s_ref, g) if per_group else None
        out = []
        for half, nibbles in enumerate(_nibbles(p)):
            # the even (low nibble) or odd (high nibble) columns (a magic GEMV decodes straight to float32)
            w = _levels(nibbles, fmt, jnp.float32 if gemv and magic and fmt.is_integer else x.dtype, magic)
            if gemv:
                part = jnp.sum(x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)[None], axis=1)
            else:
                part = _dot(x, w, fmt)
            if offset is not None:
                part = part - rowsum * offset[half]
            out.append(acc[half] + (part * scales[half] if per_group else part))
        return tuple(out)

    zeros = jnp.zeros((bm, bnh), jnp.float32)
    even, odd = lax.fori_loop(0, nk, body, (zeros, zeros))
    if not per_group:
        s_even, s_odd = _planes(s_ref[...])
        even, odd = even * s_even, odd * s_odd
    acc = _column_order([even, odd])  # back to column order, once per program
    if atomic:
        pl_triton.atomic_add(o_ref, (slice(None), slice(None)), acc)
    else:
        o_ref[...] = acc


# lop3's truth table for ``b ? a ^ c : c`` (its operands' tables are 0xF0, 0xCC, 0xAA): with ``b`` a mask and
# ``c`` the bits to set outside it (and to flip inside it), one instruction masks, flips and ORs in a float.
_LOP3_SELECT = (0xCC & (0xF0 ^ 0xAA)) | (~0xCC & 0xAA & 0xFF)


def _bits(value: float, dtype) -> int:
    """The bits of ``value`` in the float ``dtype`` (as an unsigned integer)."""
    width = jnp.dtype(dtype).itemsize
    return int(np.asarray(value, dtype).view(f"<u{width}"))


def _ptx_float(value: float, dtype) -> str:
    """A PTX immediate: float32 ``0fXXXXXXXX``; for 16-bit floats, the two-copy ``.b32`` pair."""
    if jnp.dtype(dtype) == jnp.float32:
        return f"0f{_bits(value, dtype):08X}"
    return f"{_bits(value, dtype) * 0x10001:#010x}"


def nibble_ptx(dtype, signed: bool, high: bool) -> tuple[str, str, int]:
    """Inline PTX, its constraints and its ``pack``: bytes, one per 32-bit register (zero-extended), ->
    each byte's low (or ``high``) code as ``dtype``.

    A code's nibble, masked where it sits (``int4``'s sign bit flipped: ``q + 8``) and ORed into the bits
    of a float ``b`` whose mantissa spacing is 1, reads as ``b + 2**s * n`` (``s`` = 0, or 4 for the high
    nibble); one exact ``fma`` by ``2**-s`` minus ``b * 2**-s`` (plus 8 for ``int4``) leaves the code.
    The mask, the flip and the OR are one ``lop3``. float32 (``b = 2**23``): one byte a call, ``lop3`` and
    ``fma`` per code. bf16 / f16 (``b`` = 128 / 1024; a high nibble shifted down first, their 7-bit
    mantissa has no room for it in place): two bytes a call (``pack=2``), one ``prmt`` puts them into the
    two halves of a word, and one ``lop3`` and one paired ``fma`` decode both: 3 (high: 4) instructions
    per two codes. Each output comes from its own byte, whichever bytes a call is handed.
    """
    dtype = jnp.dtype(dtype)
    flip = 0x88888888 if signed else 0
    offset = 8.0 if signed else 0.0
    _, pattern, base = _MAGIC[dtype.type]
    if dtype == jnp.float32:
        place = 4 * high
        mask = 0xF << place
        fill = (flip & mask) | pattern
        scale, bias = _ptx_float(2.0**-place, dtype), _ptx_float(-(base * 2.0**-place + offset), dtype)
        asm = f"{{ .reg .b32 t; lop3.b32 t, $1, {mask:#x}, {fill:#x}, {_LOP3_SELECT:#x}; fma.rn.f32 $0, t, {scale}, {bias}; }}"
        return asm, "=r,r", 1
    mask = 0x000F000F
    fill = (flip & mask) | pattern * 0x10001
    kind = "bf16x2" if dtype == jnp.bfloat16 else "f16x2"
    asm = ("{ .reg .b32 s, t, one, bias; "  # (16-bit pairs take no immediates: the constants go in registers)
           f"mov.b32 one, {_ptx_float(1.0, dtype)}; mov.b32 bias, {_ptx_float(-(base + offset), dtype)}; "
           "prmt.b32 s, $1, $2, 0x0400; "  # the first byte into bits 0-7, the second into bits 16-23
           + ("shr.b32 s, s, 4; " if high else "")
           + f"lop3.b32 t, s, {mask:#x}, {fill:#x}, {_LOP3_SELECT:#x}; fma.rn.{kind} $0, t, one, bias; }}")
    return asm, "=r,r,r", 2


def nibble_values(p, signed: bool, dtype):
    """What :func:`nibble_ptx` computes, in jnp ops: bytes -> (low codes, high codes) as ``dtype``."""
    out = []
    for nibbles in _nibbles(p):
        codes = nibbles.astype(jnp.int32)
        out.append((codes - 16 * (codes >= 8) if signed else codes).astype(dtype))
    return out


class _PtxDecode(NamedTuple):
    """How the PTX kernels decode (``ptx=True``): bytes of the packed tile, widened to 32-bit registers,
    into the low and the high codes' values by :func:`nibble_ptx`: two planes, the even and odd output
    columns, joined back in order once, at the end (:func:`_column_order`).

    Integer codes decode to float32 (the GEMV, and float32 activations) or, for ``tl.dot`` with
    bf16 / f16 activations, to that dtype two codes at a time; ``nf4`` and ``fp4`` by a select chain.
    Zero points are subtracted by the kernels, after the products. (Reading the bytes as uint32 words
    instead would need XLA to reinterpret them outside the kernel: a ``bitcast_convert_type`` between
    widths, which XLA's CPU and GPU compilers expand into a copy of the whole weight.)"""

    fmt: Format
    dtype: jnp.dtype  # the activations' dtype
    gemv: bool
    interpret: bool  # (the inline PTX has no interpreter: the same values from jnp ops there)

    @property
    def value_dtype(self):
        """The decoded values' dtype: the activations' for a 16-bit dot (integer codes as pairs), else float32."""
        return self.dtype if not self.gemv and jnp.dtype(self.dtype).itemsize == 2 else jnp.float32

    def planes(self, p):
        """The low and the high codes' values of the bytes ``p`` (uint8, or zero-extended to uint32)."""
        if not self.fmt.is_integer:
            return [_levels(nibbles, self.fmt, self.value_dtype) for nibbles in _nibbles(p)]
        if self.interpret:
            return nibble_values(p, self.fmt.signed_codes, self.value_dtype)
        p = lax.bitcast_convert_type(p.astype(jnp.uint32), jnp.int32)  # (inline asm takes signless integers)
        out = []
        for high in (False, True):
            asm, constraints, pack = nibble_ptx(self.value_dtype, self.fmt.signed_codes, high)
            out += pl_triton.elementwise_inline_asm(asm, args=[p], constraints=constraints, pack=pack,
                                                    result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, self.value_dtype)])
        return out


def _planes(tile):
    """A ``(rows, 2 * w)`` tile -> its even and its odd columns ``(rows, w)``, split in registers."""
    return jnp.unstack(tile.reshape(tile.shape[0], -1, 2), axis=-1)


def _column_order(planes):
    """The inverse of :func:`_planes`: the even and the odd columns -> one ``(rows, 2 * w)`` tile."""
    even, odd = planes
    return jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)


def _plane_rows(ref, g):
    """The even and odd columns' ``(1, bnh)`` rows of row ``g`` of a ``(groups, 2 * bnh)`` per-column ref:
    one contiguous load, split in registers (strided loads cost more: in session 5's GEMV eight of them
    took 519 instructions per group against 109, ``tools/kernel_ptx.py``)."""
    return _planes(ref[pl.ds(g, 1), :])


def _ptx_gemv_kernel(x_ref, p_ref, s_ref, *rest, decode: _PtxDecode, bk: int, blocks_per_group: int, groups: int,
                     ahead: int):
    """The PTX GEMV: one ``(bm, block_n)`` output tile from ``groups`` groups of ``blocks_per_group`` K
    blocks of ``bk`` rows (see :class:`_PtxDecode` for the decode).

    Products accumulate elementwise in a ``(bk, bnh)`` tile per activation row and plane (no reduction
    inside the loop); at the end of a group that tile, less the zero points times the group's activation
    sums, times the group's scales, is added into a second tile, summed over its rows once, at the end
    (a reduction per group cost half as much again as the loop). The bytes of the next ``ahead`` blocks
    are loading while a block computes (carried through the loop: a GPU load does not wait until its
    value is used). The activations load where they are used: a few hundred bytes that every column tile
    reads (in cache); carried along too, Triton moved them through shared memory behind two barriers per
    block (``tools/kernel_ptx.py``)."""
    z_ref, o_ref = rest[0] if len(rest) == 2 else None, rest[-1]
    bm, bnh = x_ref.shape[0], p_ref.shape[1]
    split = pl.program_id(2)
    last = groups * blocks_per_group - 1

    def rows(b):
        return pl.ds(jnp.minimum(b, last) * bk, bk)

    def group(g, carry):
        acc, queue = carry

        def block(b, carry):
            part, xsum, queue = carry
            p, queue = queue[0], queue[1:] + (p_ref[rows(g * blocks_per_group + b + ahead), :].astype(jnp.uint32),)
            v = decode.planes(p)
            x = [x_ref[pl.ds(r, 1), rows(g * blocks_per_group + b)].astype(jnp.float32).reshape(bk, 1)
                 for r in range(bm)]
            part = tuple(part[r * 2 + j] + x[r] * v[j] for r in range(bm) for j in range(2))
            return part, tuple(s + xr for s, xr in zip(xsum, x)), queue

        zeros = (jnp.zeros((bk, bnh), jnp.float32),) * (2 * bm)
        xsum = (jnp.zeros((bk, 1), jnp.float32),) * bm if z_ref is not None else ()  # for the zero points
        part, xsum, queue = lax.fori_loop(0, blocks_per_group, block, (zeros, xsum, queue))
        gi = split * groups + g
        scales = _plane_rows(s_ref, gi)
        if z_ref is not None:
            points = _plane_rows(z_ref, gi)
            part = tuple(p - xsum[i // 2] * points[i % 2] for i, p in enumerate(part))
        return tuple(a + p * scales[i % 2] for i, (a, p) in enumerate(zip(acc, part))), queue

    queue = tuple(p_ref[rows(b), :].astype(jnp.uint32) for b in range(ahead))
    acc, _ = lax.fori_loop(0, groups, group, ((jnp.zeros((bk, bnh), jnp.float32),) * 2 * bm, queue))
    for r in range(bm):
        o_ref[pl.ds(r, 1), :] = _column_order([jnp.sum(a, axis=0, keepdims=True) for a in acc[r * 2:r * 2 + 2]])


def _ptx_dot_kernel(x_ref, p_ref, s_ref, *rest, decode: _PtxDecode, bk: int, nk: int, group_rows: int,
                    m: int | None = None):
    """The PTX kernel through ``tl.dot``: per K block, two ``(bm, bk) @ (bk, bnh)`` dots, one per plane,
    less the zero points times the block's activation row sums, scaled by the block's group (see
    :class:`_PtxDecode` for the decode). One flat loop over the split's ``nk`` blocks, loads where they are
    used: Triton pipelines them itself (``cp.async``; offline it also took fewer registers and
    instructions than tiles carried through the loop). ``m``: the activations' rows, where the last row
    block runs past them (not padded: its rows past ``m`` load as zeros, and their outputs are not stored)."""
    z_ref, o_ref = rest[0] if len(rest) == 2 else None, rest[-1]
    bm, bnh = x_ref.shape[0], p_ref.shape[1]
    split = pl.program_id(2)
    live = None if m is None else pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < m

    def block(k, acc):
        rows = pl.ds(k * bk, bk)
        g = (split * nk + k) * bk // group_rows
        x = x_ref[:, rows] if live is None else pl_triton.load(x_ref.at[:, rows], mask=jnp.broadcast_to(live, (bm, bk)),
                                                               other=0)
        v, scales = decode.planes(p_ref[rows, :]), _plane_rows(s_ref, g)
        part = [_dot(x, vj, decode.fmt) for vj in v]
        if z_ref is not None:
            rowsum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
            part = [pj - rowsum * zj for pj, zj in zip(part, _plane_rows(z_ref, g))]
        return tuple(a + pj * sj for a, pj, sj in zip(acc, part, scales))

    y = _column_order(lax.fori_loop(0, nk, block, (jnp.zeros((bm, bnh), jnp.float32),) * 2))
    if live is None:
        o_ref[...] = y
    else:
        pl_triton.store(o_ref, y, mask=jnp.broadcast_to(live, y.shape))


MIN_BLOCK_K = 16  # the fewest K rows a Triton dot takes


def _pad(a, rows: int, cols: int, fill=0):
    """A 2-D array filled with ``fill`` to ``(rows, cols)`` (whole blocks for the kernels); ``a`` itself if it
    has that shape."""
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])), constant_values=fill)


def _scale_operands(scale, zero_point, groups: int, cols: int, spec: pl.BlockSpec) -> tuple[list, list]:
    """The kernels' scale operand (padded with ones) and zero-point operand (with zeros, where there is one),
    float32 ``(groups, cols)``, and their BlockSpecs (``spec`` each)."""
    operands = [_pad(scale.astype(jnp.float32), groups, cols, 1.0)]
    if zero_point is not None:
        operands.append(_pad(zero_point.astype(jnp.float32), groups, cols))
    return operands, [spec] * len(operands)


def default_block_k(group_size: int, per_group: bool, most: int = 128) -> int:
    """The K block: ``most`` rows (a power of two), or the largest divisor of the group up to it."""
    return math.gcd(group_size, most) if per_group else most


# Programs that keep an H100 busy (two per SM on its 132 SMs): wider products split K until they have as many.
_PROGRAMS = 256
# Rows up to which integer codes times 16-bit activations take the PTX dot by default (an H200, session 14,
# benchmarks/RESULTS.md: 22.8 us at M = 1 and 23.2 at 16 against the byte kernel's 35.9 / 33.7 and bf16's
# 36.6 / 37.6; 36.4 at M = 64 against 51.3 and 40.2; at M = 128, 59.7 with 128 x 128 tiles against 95.0
# and 41.4). Float32 activations and nf4 / fp4 were not timed with it.
PTX_MAX_M = 128


def default_ptx(m: int, fmt: Format, dtype) -> bool:
    """Whether the kernel decodes with inline PTX by default: integer codes, bf16 / f16 activations, at most
    ``PTX_MAX_M`` rows (what was measured faster)."""
    return fmt.is_integer and jnp.dtype(dtype).itemsize == 2 and m <= PTX_MAX_M


def default_blocks(m: int, k: int, n: int, group_size: int, per_group: bool, ptx: bool = False) -> dict:
    """Tiles for an ``(m, k) @ (k, n)`` product: ``block_m, block_n, block_k, split_k, gemv`` and maybe
    ``num_warps`` (the best deterministic tiles of the sweeps in ``benchmarks/matmul_gpu.py``, K = N = 8192).

    The PTX dot (``ptx``; an H200, session 14): up to 16 rows one 16-row tile over 256 columns, then 32,
    64 or 128 rows over 128 columns (128 with 8 warps), 128-row K blocks, K split until the grid has about
    ``_PROGRAMS`` programs, half as many for 128-row tiles (8 splits of 1024 rows at M = 1 and 16: 22.8 us,
    against 24.4-27.5 with 4 or 16 splits, 128 or 512 columns; 4 splits at M = 64; at M = 128, 2 splits of
    128-row tiles: 59.7 us, against 61.6-82.6 for 64-row tiles or more splits).
    The byte kernel (an H100, session 4): one row is a GEMV (multiply and sum, 64-row K blocks); up to 16
    rows take ``tl.dot`` with 16 rows, K split into parts of about 8 blocks so that the GPU fills. More rows
    take 32- or 64-row tiles over 128 columns (64 x 128: the best tile measured at M = 1024, no spills;
    32 x 128 compiles without spills too), K split until the grid has about ``_PROGRAMS`` programs (none at
    M = 1024)."""
    bk = default_block_k(group_size, per_group)
    if ptx:
        if m <= 16:
            return dict(block_m=16, block_n=256, block_k=bk, split_k=_filling_splits(m, k, n, 16, 256, bk), gemv=False)
        bm = 32 if m <= 32 else 64 if m <= 64 else 128
        programs = _PROGRAMS // 2 if bm == 128 else _PROGRAMS
        return dict(block_m=bm, block_n=128, block_k=bk, split_k=_filling_splits(m, k, n, bm, 128, bk, programs),
                    gemv=False, **(dict(num_warps=8) if bm == 128 else {}))
    if m == 1:
        bk = default_block_k(group_size, per_group, most=64)
        return dict(block_m=1, block_n=256, block_k=bk, split_k=_split_k(k, bk), gemv=True)
    if m <= 16:
        return dict(block_m=16, block_n=256, block_k=bk, split_k=_split_k(k, bk), gemv=False)
    bm, bn = (32 if m <= 32 else 64), 128
    return dict(block_m=bm, block_n=bn, block_k=bk, split_k=_filling_splits(m, k, n, bm, bn, bk), gemv=False)


def _filling_splits(m: int, k: int, n: int, bm: int, bn: int, bk: int, programs: int = _PROGRAMS) -> int:
    """The K splits that give the grid about ``programs`` programs of ``(bm, bn)`` tiles."""
    return _splits_near(k, bk, max(1, programs // (pl.cdiv(m, bm) * pl.cdiv(n, bn))))


def _split_k(k: int, bk: int, blocks_per_split: int = 8) -> int:
    """The number of K splits that gives each about ``blocks_per_split`` blocks of ``bk`` rows."""
    return _splits_near(k, bk, -(-k // bk) / blocks_per_split)


def _splits_near(k: int, bk: int, target: float) -> int:
    """The number of K splits nearest ``target`` (by ratio) among those that cut K's blocks of ``bk`` rows
    evenly (any other count makes the wrapper pad, which copies the whole weight)."""
    blocks = -(-k // bk)
    counts = [s for s in range(1, blocks + 1) if blocks % s == 0]
    return min(counts, key=lambda s: abs(math.log(s / target)))


def matmul(x, packed, scale, zero_point, *, n: int, fmt: Format, group_size: int, block_m: int | None = None,
           block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
           gemv: bool | None = None, atomic: bool = False, magic: bool = False, ptx: bool | None = None,
           ahead: int = 4, num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False):
    """``x @ W`` for ``W`` of shape ``(K, n)`` given as packed codes ``(K, ceil(n / 2))``.

    Args:
      x: ``(M, K)`` activations (their dtype is the dot's input dtype).
      packed: uint8 codes, two per byte along the last axis (low nibble first).
      scale, zero_point: ``(G, n)`` float32, one row per group of
        ``group_size`` rows of ``W`` (``G = 1`` for per-channel); zero_point
        may be ``None``.
      fmt: the 4-bit format of the codes.
      block_m, block_n, block_k, split_k: tile sizes (``block_n`` output
        columns, even); ``None`` takes :func:`default_blocks`.
      gemv: multiply and sum instead of ``tl.dot`` (for a few rows);
        ``None`` takes :func:`default_blocks`.
      atomic: the K splits add into the output atomically instead of
        writing partial sums for XLA to add (not bit-reproducible).
      magic: decode integer codes by ORing them into a float's mantissa
        instead of converting them (see :func:`_levels`); the same values.
      ptx: decode integer codes with inline PTX, without conversions (see
        :class:`_PtxDecode`), through ``tl.dot`` or as a GEMV (``gemv``);
        ``block_n`` a multiple of 8, the K splits summed by XLA; a GEMV's
        splits hold whole groups. ``None``: :func:`default_ptx` (the dot),
        unless ``gemv``, ``atomic`` or ``magic`` is asked for.
      ahead: for the PTX GEMV, how many K blocks load ahead of the one
        computing (at least 1; the dot path leaves that to Triton's
        ``num_stages``).
      num_warps, num_stages: Triton compiler parameters (``None``: Triton's).
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Returns:
      ``(M, n)`` float32.
    """
    m, k = x.shape
    per_group = scale.shape[0] > 1
    if ptx is None:  # (an explicit GEMV, atomic adds or the magic decode name the byte kernel)
        ptx = gemv is not True and not (atomic or magic) and default_ptx(m, fmt, x.dtype)
    blocks = default_blocks(m, k, n, group_size, per_group, ptx=ptx)
    bn = block_n or blocks["block_n"]
    if ptx and (atomic or bn % 8 or ahead < 1):
        raise ValueError(f"pallas: ptx=True sums K splits in XLA and takes block_n a multiple of 8 and ahead >= 1; "
                         f"got atomic={atomic}, block_n={bn}, ahead={ahead}")
    gemv = blocks["gemv"] if gemv is None else gemv
    bm = block_m or (pl.next_power_of_2(m) if gemv else max(blocks["block_m"], MIN_BLOCK_K))
    if ptx and gemv:
        bk = block_k or default_block_k(group_size, per_group, most=8)
    elif not gemv and (x.dtype == jnp.float32 or (ptx and not fmt.is_integer)):
        # (float32: three TF32 dots a block, and nf4 / fp4's select chains: 128-row blocks spill registers)
        bk = block_k or default_block_k(group_size, per_group, most=64)
    else:
        bk = block_k or blocks["block_k"]
    unit = group_size if ptx and gemv and per_group else bk  # a K split holds whole units
    split_k = split_k or (_split_k(k, unit, max(1, 512 // unit)) if ptx and gemv else blocks["split_k"])
    num_warps = num_warps or blocks.get("num_warps")
    if magic and jnp.dtype(x.dtype).type not in _MAGIC:
        raise ValueError(f"pallas: magic=True decodes into float32, bfloat16 or float16 activations, not {x.dtype}")
    if per_group and group_size % bk:
        raise ValueError(f"pallas: block_k {bk} must divide group_size {group_size}")
    if not (interpret or gemv) and bk < MIN_BLOCK_K:
        raise ValueError(
            f"pallas: the K block must be at least {MIN_BLOCK_K} for the GPU dot; group_size {group_size} is too small"
        )
    nh = (n + 1) // 2
    bnh = min(bn // 2, max(8, pl.next_power_of_2(nh)))
    k_whole = pl.cdiv(k, group_size) * group_size if per_group else k  # whole groups first
    kp = pl.cdiv(k_whole, unit * split_k) * unit * split_k
    mp, nhp = pl.cdiv(m, bm) * bm, pl.cdiv(nh, bnh) * bnh
    groups = pl.cdiv(kp, group_size) if per_group else 1
    masked = ptx and not gemv and m < mp  # the PTX dot masks the rows past m: x not padded, y not sliced
    xm = m if masked else mp

    scales, scale_specs = _scale_operands(scale, zero_point, groups, 2 * nhp,
                                          pl.BlockSpec((groups, 2 * bnh), lambda i, j, s: (0, j)))
    operands = [_pad(x, xm, kp), _pad(packed, kp, nhp), *scales]
    in_specs = [
        pl.BlockSpec((bm, kp // split_k), lambda i, j, s: (i, s)),
        pl.BlockSpec((kp // split_k, bnh), lambda i, j, s: (s, j)),
        *scale_specs,
    ]
    decode = _PtxDecode(fmt, x.dtype, gemv, interpret)
    if ptx and gemv:
        rows = group_size if per_group else kp // split_k  # the rows of one scale row within a split
        kernel = functools.partial(_ptx_gemv_kernel, decode=decode, bk=bk, blocks_per_group=rows // bk,
                                   groups=kp // split_k // rows, ahead=ahead)
    elif ptx:
        kernel = functools.partial(_ptx_dot_kernel, decode=decode, bk=bk, nk=kp // split_k // bk,
                                   group_rows=group_size, m=m if masked else None)
    else:
        kernel = functools.partial(
            _kernel, fmt=fmt, bk=bk, nk=kp // split_k // bk, group_rows=group_size, per_group=per_group,
            has_zero=zero_point is not None, gemv=gemv, atomic=atomic, magic=magic,
        )
    params = {}
    if not interpret:  # name Triton explicitly, whichever GPU backend this JAX defaults to
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if atomic:  # every split adds into one zero-initialised output
        out_block = pl.BlockSpec((bm, 2 * bnh), lambda i, j, s: (i, j))
        operands.append(jnp.zeros((mp, 2 * nhp), jnp.float32))
        in_specs.append(out_block)
        params["input_output_aliases"] = {len(operands) - 1: 0}
        out_shape = jax.ShapeDtypeStruct((mp, 2 * nhp), jnp.float32)
    else:
        out_block = pl.BlockSpec((None, bm, 2 * bnh), lambda i, j, s: (s, i, j))
        out_shape = jax.ShapeDtypeStruct((split_k, xm, 2 * nhp), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, nhp // bnh, split_k),
        in_specs=in_specs,
        out_specs=out_block,
        interpret=interpret,
        name="qdot_int4",
        **params,
    )(*operands)
    out = out if atomic else out.sum(0)
    return out[:m, :n]


def _transposed_kernel(ge_ref, go_ref, p_ref, s_ref, *rest, decode: _PtxDecode, bnh: int, nn: int):
    """``g @ W.T``, contracted over W's packed axis: one ``(bm, bk)`` output tile (``bk`` rows of ``W``,
    all in one scale group) from ``nn`` blocks of ``2 * bnh`` columns of ``W``. Per block, the gradient's
    even and odd columns (split in registers) times their columns' scales, rounded once to the dot's
    dtype, multiply the low and the high codes' values (see :class:`_PtxDecode`), transposed inside the
    dot, whose first operand is the decoded tile (Hopper's ``wgmma`` takes it from registers as it is; as
    the second operand, transposed, it cost 1118 instructions per block at 16 rows against 859,
    ``tools/kernel_ptx.py``)::

        acc.T += v_low @ (g_e * s_e).T + v_high @ (g_o * s_o).T

    and the zero points' share, ``sum_n g s z`` per row over the same rounded ``g s`` (so the two shares
    cancel exactly where ``c = z``; unrounded, uint4's error doubled), is taken off once, at the end."""
    z_ref, o_ref = rest[0] if len(rest) == 2 else None, rest[-1]
    bm, bk = ge_ref.shape[0], p_ref.shape[0]

    def block(c, carry):
        acc, shift = carry
        cols, half = pl.ds(c * 2 * bnh, 2 * bnh), pl.ds(c * bnh, bnh)
        scaled = [(r[:, half].astype(jnp.float32) * sj).astype(decode.dtype)  # (the zero points' share too)
                  for r, sj in zip((ge_ref, go_ref), _planes(s_ref[:, cols]))]
        v = decode.planes(p_ref[:, half])
        acc = acc + sum(_dot(a, vj, decode.fmt, transposed=True) for a, vj in zip(scaled, v))
        if z_ref is not None:
            shift = shift + sum(jnp.sum(a.astype(jnp.float32) * zj, axis=1, keepdims=True)
                                for a, zj in zip(scaled, _planes(z_ref[:, cols])))
        return acc, shift

    acc, shift = lax.fori_loop(0, nn, block, (jnp.zeros((bk, bm), jnp.float32), jnp.zeros((bm, 1), jnp.float32)))
    o_ref[...] = acc.T - shift if z_ref is not None else acc.T


def default_transposed_blocks(m: int, k: int, n: int, group_size: int, per_group: bool, dtype=jnp.bfloat16,
                              integer: bool = True) -> dict:
    """Tiles for ``g @ W.T`` (:func:`matmul_transposed`), ``g`` of shape ``(m, n)``, ``W`` ``(k, n)``, dots
    in ``dtype``, ``integer`` codes or not: ``block_m, block_k, block_n, split_n`` and maybe ``num_warps``. Not yet timed on a GPU:
    the forward PTX dot's tiles mirrored, 128 rows of ``W`` per output tile (or the largest divisor of the
    group), 256 of its columns per step, the columns split until the grid has about ``_PROGRAMS``
    programs; 16, 32 or 64 gradient rows, 64 with 8 warps. Read offline (``tools/kernel_ptx.py``, K = N =
    8192, bf16): no register spills for these; 4 warps over 64 rows spilled 220-472 bytes. float32 dots
    (three TF32 dots, or nf4's full float32 dot) take 64 x 128 tiles of ``W``: at 128 x 256 they asked for
    215-362 KB of shared memory, more than an SM has; at 64 x 128, 38-140 KB. nf4 / fp4 (select chains)
    take 64 rows of ``W``: 128 spilled 300-860 bytes at 16 and 32 gradient rows, 64 none."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    wide = jnp.dtype(dtype) == jnp.float32
    bk = default_block_k(group_size, per_group, most=64 if wide or not integer else 128)
    bn = 128 if wide else 256
    tiles = pl.cdiv(m, bm) * pl.cdiv(k, bk)
    split = _splits_near(-(-n // 2), bn // 2, max(1, _PROGRAMS // tiles))
    return dict(block_m=bm, block_k=bk, block_n=bn, split_n=split, **(dict(num_warps=8) if bm == 64 else {}))


def matmul_transposed(g, packed, scale, zero_point, *, n: int, fmt: Format, group_size: int, dtype=None,
                      block_m: int | None = None, block_k: int | None = None, block_n: int | None = None,
                      split_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                      interpret: bool = False):
    """``g @ W.T`` for ``W`` of shape ``(K, n)`` given as packed codes ``(K, ceil(n / 2))``: the product
    over W's packed axis, as the backward pass of ``x @ W`` needs it, without decoding ``W`` to memory.

    Each output tile covers ``block_k`` rows of ``W`` inside one scale group, so the group's scales
    (which vary along the contracted axis) multiply ``g`` before the dot; with bf16 / f16 ``dtype`` that
    product is rounded once to it (about ``2**-9`` relative, as a bf16 weight would be), integer codes and
    fp4 levels are exact, nf4's rounded to ``dtype``. float32 ``dtype``: three TF32 dots a block
    (TF32-exact levels), else a full float32 dot.

    Args:
      g: ``(M, n)`` gradients, read in ``dtype`` (the cotangent of a bf16 product is bf16 already) and
        multiplied by the scales in float32.
      packed, scale, zero_point, n, fmt, group_size: as :func:`matmul`.
      dtype: the dot's input dtype (default: ``g``'s).
      block_m, block_k, block_n, split_n: output rows, rows of ``W`` per output tile (dividing the group),
        columns of ``W`` per step (a multiple of 8), splits of the columns (their partial sums added by
        XLA); ``None`` takes :func:`default_transposed_blocks`.
      num_warps, num_stages: Triton compiler parameters (``None``: Triton's).
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Returns:
      ``(M, K)`` float32.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, quantize_jax as qj
      >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (64, 48)), qj.QuantSpec(axis=0, group_size=32))
      >>> g = jnp.ones((2, 48))
      >>> y = matmul_transposed(g, q.packed, q.scale, None, n=48, fmt=q.spec.fmt, group_size=32, interpret=True)
      >>> bool(np.allclose(y, g @ qj.dequantize(q).T, atol=1e-4))
      True
    """
    m, k = g.shape[0], packed.shape[0]
    dtype = jnp.dtype(dtype or g.dtype)
    per_group = scale.shape[0] > 1
    blocks = default_transposed_blocks(m, k, n, group_size, per_group, dtype, fmt.is_integer)
    bm, bk, bn = block_m or blocks["block_m"], block_k or blocks["block_k"], block_n or blocks["block_n"]
    if bn % 8:
        raise ValueError(f"pallas: block_n must be a multiple of 8 for matmul_transposed, got {bn}")
    if per_group and group_size % bk:
        raise ValueError(f"pallas: block_k {bk} must divide group_size {group_size}")
    if not interpret and min(bm, bk) < MIN_BLOCK_K:
        raise ValueError(f"pallas: the GPU dot needs block_m and block_k of at least {MIN_BLOCK_K}; got block_m "
                         f"{bm}, block_k {bk} (group_size {group_size})")
    nh = (n + 1) // 2
    bnh = min(bn // 2, max(MIN_BLOCK_K, pl.next_power_of_2(nh)))  # (the dot's contracted width: 16 at least)
    split = split_n or _splits_near(nh, bnh, blocks["split_n"])
    nhp = pl.cdiv(nh, bnh * split) * bnh * split
    k_whole = pl.cdiv(k, group_size) * group_size if per_group else k
    kp, mp = pl.cdiv(k_whole, bk) * bk, pl.cdiv(m, bm) * bm
    groups = kp // group_size if per_group else 1
    cols = nhp // split

    def group(i, j, s):  # the scale row of output tile j
        return (j * bk // group_size if per_group else 0, s)

    g = _pad(g.astype(dtype), mp, 2 * nhp)
    g_block = pl.BlockSpec((bm, cols), lambda i, j, s: (i, s))
    scales, scale_specs = _scale_operands(scale, zero_point, groups, 2 * nhp, pl.BlockSpec((1, 2 * cols), group))
    operands = [g[:, 0::2], g[:, 1::2], _pad(packed, kp, nhp), *scales]
    in_specs = [g_block, g_block, pl.BlockSpec((bk, cols), lambda i, j, s: (j, s)), *scale_specs]
    params = {}
    if not interpret:
        default_warps = blocks.get("num_warps") if bm == blocks["block_m"] else None  # (for the default tile only)
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=num_warps or default_warps, num_stages=num_stages)
    out = pl.pallas_call(
        functools.partial(_transposed_kernel, decode=_PtxDecode(fmt, dtype, False, interpret), bnh=bnh,
                          nn=cols // bnh),
        out_shape=jax.ShapeDtypeStruct((split, mp, kp), jnp.float32),
        grid=(mp // bm, kp // bk, split),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bk), lambda i, j, s: (s, i, j)),
        interpret=interpret,
        name="qdot_int4_transposed",
        **params,
    )(*operands)
    return out.sum(0)[:m, :k]


def _dequantize_kernel(p_ref, s_ref, *rest, decode: _PtxDecode, dtype):
    """One ``(bk, 2 * bnh)`` tile of the decoded weight: the bytes' low and high codes' float32 values (see
    :class:`_PtxDecode`), less their columns' zero points, times their scales, rounded once to ``dtype``,
    joined back in column order."""
    z_ref, o_ref = rest[0] if len(rest) == 2 else None, rest[-1]
    v = decode.planes(p_ref[...])
    if z_ref is not None:
        v = [vj - zj for vj, zj in zip(v, _plane_rows(z_ref, 0))]
    o_ref[...] = _column_order([(vj * sj).astype(dtype) for vj, sj in zip(v, _plane_rows(s_ref, 0))])


def default_dequantize_blocks(group_size: int, per_group: bool) -> dict:
    """Tiles for :func:`dequantize`: 32 rows (or the largest divisor of the group up to it) x 256 columns of
    the decoded weight, 16 KB of bf16 output per program. Not yet timed on a GPU; read offline
    (``tools/kernel_ptx.py 1,decode=True``, int4 to bf16, 4 warps, sm_90): 95 registers, 5 programs per
    SM, no spills; 64 rows took 166 registers (3 programs), 128 rows or 512 columns spilled."""
    return dict(block_k=default_block_k(group_size, per_group, most=32), block_n=256)


def dequantize(packed, scale, zero_point, *, n: int, fmt: Format, group_size: int, dtype=jnp.bfloat16,
               block_k: int | None = None, block_n: int | None = None, num_warps: int | None = None,
               interpret: bool = False):
    """The weight ``W`` of shape ``(K, n)`` decoded from its packed codes ``(K, ceil(n / 2))`` to ``dtype``:
    ``((c - z) * s)`` in float32, rounded once, as :func:`quantize_jax.dequantize` computes it (bit for
    bit). ``auto``'s decoding for ``dequant`` on NVIDIA GPUs (for a known M): on an H200 (session 19, K = N
    = 8192, bf16) the dot over the weight it decoded took 89.8 / 100.9 us at 128 / 256 rows against 99.9 /
    107.7 over XLA's decoding, its six tiles swept at 256 rows 99.4-101.0.

    Args:
      packed, scale, zero_point, n, fmt, group_size: as :func:`matmul`.
      dtype: the decoded weight's dtype.
      block_k, block_n: rows (dividing the group) and columns (a multiple of 16) per program; ``None``
        takes :func:`default_dequantize_blocks`.
      num_warps: Triton's (``None``: its default, 4).
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> q = qj.quantize(jax.random.normal(jax.random.key(0), (64, 48)), qj.QuantSpec(axis=0, group_size=32))
      >>> w = dequantize(q.packed, q.scale, None, n=48, fmt=q.spec.fmt, group_size=32, interpret=True)
      >>> bool((w == qj.dequantize(q, jnp.bfloat16)).all())
      True
    """
    k = packed.shape[0]
    per_group = scale.shape[0] > 1
    blocks = default_dequantize_blocks(group_size, per_group)
    bk, bn = block_k or blocks["block_k"], block_n or blocks["block_n"]
    if bn % 16:
        raise ValueError(f"pallas: block_n must be a multiple of 16 for dequantize, got {bn}")
    if per_group and group_size % bk:
        raise ValueError(f"pallas: block_k {bk} must divide group_size {group_size}")
    nh, bnh = (n + 1) // 2, bn // 2
    nhp = pl.cdiv(nh, bnh) * bnh
    k_whole = pl.cdiv(k, group_size) * group_size if per_group else k
    kp = pl.cdiv(k_whole, bk) * bk
    groups = kp // group_size if per_group else 1

    def group(i, j):  # the scale row of row block i
        return (i * bk // group_size if per_group else 0, j)

    scales, scale_specs = _scale_operands(scale, zero_point, groups, 2 * nhp, pl.BlockSpec((1, bn), group))
    operands = [_pad(packed, kp, nhp), *scales]
    in_specs = [pl.BlockSpec((bk, bnh), lambda i, j: (i, j)), *scale_specs]
    out = pl.pallas_call(
        functools.partial(_dequantize_kernel, decode=_PtxDecode(fmt, jnp.float32, False, interpret), dtype=dtype),
        out_shape=jax.ShapeDtypeStruct((kp, 2 * nhp), dtype),
        grid=(kp // bk, nhp // bnh),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bk, bn), lambda i, j: (i, j)),
        interpret=interpret,
        name="dequantize_int4",
        **({} if interpret else dict(compiler_params=pl_triton.CompilerParams(num_warps=num_warps))),  # (Triton)
    )(*operands)
    return out if out.shape == (k, n) else out[:k, :n]
