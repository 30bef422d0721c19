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

``words=True`` reads the packed weight as 32-bit words (eight codes each; the
bytes reinterpreted, not moved) and decodes each of a word's eight 4-bit planes
where it sits: one ``lop3`` and one exact float subtraction per code, no byte
extraction and no integer-to-float conversion (see :class:`_Words`). Its GEMV
accumulates over K elementwise and reduces once, with the next K blocks
loading while one computes; its dot path runs one ``tl.dot`` per plane.

The wrapper pads M, K and N to whole blocks (zero activations, zero codes,
unit scales), so any shape works.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from quantize_jax.formats import Format


# Per float dtype: the unsigned integer of its width, the bits of b, and b, for the magic decode below.
_MAGIC = {jnp.float32: (jnp.uint32, 0x4B000000, 2.0**23), jnp.bfloat16: (jnp.uint16, 0x4300, 128.0),
          jnp.float16: (jnp.uint16, 0x6400, 1024.0)}


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


def _kernel(x_ref, p_ref, s_ref, *rest, fmt: Format, bk: int, nk: int, group_rows: int, per_group: bool,
            has_zero: bool, gemv: bool, atomic: bool, magic: bool):
    z_ref, o_ref = rest[0] if has_zero else None, rest[-1]  # (an atomic kernel's zeros input in between)
    split = pl.program_id(2)
    bm = x_ref.shape[0]
    bnh = p_ref.shape[1]
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def body(k, acc):
        x = x_ref[:, pl.ds(k * bk, bk)]
        p = p_ref[pl.ds(k * bk, bk), :]
        if fmt.signed_codes:
            p = p ^ jnp.uint8(0x88)  # two's complement nibble q -> q + 8, unsigned
        g = (split * nk + k) * bk // group_rows if per_group else 0
        offset = None
        if fmt.signed_codes or has_zero:  # the per-column offset c of the nibbles: 8 for int4, plus z
            c = _planes(z_ref[pl.ds(g, 1), :], 2) if has_zero else (jnp.float32(0.0),) * 2
            offset = [ci + 8.0 if fmt.signed_codes else ci for ci in c]
            rowsum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
        scales = _planes(s_ref[pl.ds(g, 1), :], 2) if per_group else None
        out = []
        for half, nibbles in enumerate((p & jnp.uint8(15), lax.shift_right_logical(p, jnp.uint8(4)))):
            # the even (low nibble) or odd (high nibble) columns (a magic GEMV decodes straight to float32)
            w = _levels(nibbles, fmt, jnp.float32 if gemv and magic and fmt.is_integer else x.dtype, magic)
            if gemv:
                part = jnp.sum(x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)[None], axis=1)
            else:
                part = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)
            if offset is not None:
                part = part - rowsum * offset[half]
            out.append(acc[half] + (part * scales[half] if per_group else part))
        return tuple(out)

    zeros = jnp.zeros((bm, bnh), jnp.float32)
    even, odd = lax.fori_loop(0, nk, body, (zeros, zeros))
    if not per_group:
        s_even, s_odd = _planes(s_ref[...], 2)
        even, odd = even * s_even, odd * s_odd
    acc = _column_order([even, odd])  # back to column order, once per program
    if atomic:
        pl_triton.atomic_add(o_ref, (slice(None), slice(None)), acc)
    else:
        o_ref[...] = acc


class _Words(NamedTuple):
    """How the word kernels decode (``words=True``): a word holds eight codes, plane ``j`` (bits
    ``4j..4j+3``) column ``8i + j`` of word ``i``; the planes' sums are put back in column order once,
    at the end (:func:`_column_order`).

    Integer codes decode without a conversion instruction, to float32 or to 16-bit pairs:

    * float32 (the GEMV, and float32 activations): the word masked to plane ``j``'s bits and ORed into
      the bits of ``2**23`` reads as ``2**23 + 16**(j % 4) * u`` (planes 4-7 from the word shifted by
      16); subtracting ``2**23 + 16**(j % 4) * c`` leaves ``16**(j % 4) * (u - c)`` exactly, and
      ``16**-(j % 4)`` goes into the scale (:meth:`unit`);
    * bf16 / f16 pairs (``tl.dot`` with 16-bit activations): ``(w >> 4j) & 0x000F000F`` ORed into two
      copies of the bits of ``b`` (bf16 128, f16 1024) holds planes ``j`` and ``j + 4`` as two 16-bit
      floats ``b + u``; subtracting ``b + c`` leaves ``u - c``.

    The mask and the OR are one ``lop3`` (inline PTX; ptxas makes two of ``(w & m) | b``). ``nf4`` and
    ``fp4`` decode each plane's codes by a select chain, to float32."""

    fmt: Format
    dtype: jnp.dtype  # the activations' dtype
    gemv: bool
    interpret: bool  # (the inline PTX has no interpreter: plain jnp ops there, the same values)

    @property
    def pairs(self) -> bool:
        return self.fmt.is_integer and not self.gemv and jnp.dtype(self.dtype).itemsize == 2

    def unit(self, j: int) -> float:
        return 16.0 ** -(j % 4) if self.fmt.is_integer and not self.pairs else 1.0

    def flip(self, w):  # int4's two's complement nibbles q -> q + 8, unsigned
        return w ^ jnp.uint32(0x88888888) if self.fmt.signed_codes else w

    def offsets(self, zero_rows):
        """Per plane, what decoding subtracts: the magic number and the code offset ``c`` (8 for int4, plus
        the plane's zero points ``zero_rows[j]`` where given)."""
        c = [jnp.float32(8.0 if self.fmt.signed_codes else 0.0)] * 8
        if zero_rows is not None:
            c = [ci + z for ci, z in zip(c, zero_rows)]
        if self.pairs:
            return [(ci + _MAGIC[jnp.dtype(self.dtype).type][2]).astype(self.dtype) for ci in c]
        return [2.0**23 + ci * 16.0 ** (j % 4) for j, ci in enumerate(c)]

    def mask_or(self, bits, mask: int, magic: int):  # (bits & mask) | magic
        if self.interpret:
            return (bits & jnp.uint32(mask)) | jnp.uint32(magic)
        bits = lax.bitcast_convert_type(bits, jnp.int32)  # (the asm's operands are signless integers)
        out = pl_triton.elementwise_inline_asm(
            f"lop3.b32 $0, $1, {mask:#x}, {magic:#x}, 0xea;", args=[bits], constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(bits.shape, jnp.int32)])[0]
        return lax.bitcast_convert_type(out, jnp.uint32)

    def planes(self, w, offset):
        """The eight planes' values of the words ``w`` (float32, or the activations' dtype for pairs)."""
        if not self.fmt.is_integer:
            return [_levels(lax.shift_right_logical(w, jnp.uint32(4 * j)) & jnp.uint32(15), self.fmt, jnp.float32)
                    for j in range(8)]
        out = [None] * 8
        if self.pairs:
            uint, pattern, _ = _MAGIC[jnp.dtype(self.dtype).type]
            for j in range(4):
                bits = self.mask_or(lax.shift_right_logical(w, jnp.uint32(4 * j)) if j else w, 0x000F000F,
                                    pattern << 16 | pattern)
                for plane, half in ((j, bits), (j + 4, lax.shift_right_logical(bits, jnp.uint32(16)))):
                    out[plane] = lax.bitcast_convert_type(half.astype(uint), self.dtype) - offset[plane]
            return out
        for j in range(8):
            bits = self.mask_or(lax.shift_right_logical(w, jnp.uint32(16)) if j >= 4 else w, 15 << 4 * (j % 4),
                                0x4B000000)
            out[j] = lax.bitcast_convert_type(bits, jnp.float32) - offset[j]
        return out


def _planes(row, count: int):
    """A ``(rows, count * w)`` tile whose column ``count * i + j`` belongs to plane ``j`` -> the ``count``
    planes ``(rows, w)`` (``count`` 2 or 8), split in registers: Triton splits two at a time."""
    if count == 1:
        return [row]
    even, odd = jnp.unstack(row.reshape(row.shape[0], -1, 2), axis=-1)
    evens, odds = _planes(even, count // 2), _planes(odd, count // 2)
    return [plane for pair in zip(evens, odds) for plane in pair]  # plane j: j even from evens[j // 2]


def _column_order(planes):
    """The inverse of :func:`_planes`: ``count`` planes ``(rows, w)`` -> ``(rows, count * w)`` with column
    ``count * i + j`` from plane ``j``, joined two at a time."""
    if len(planes) == 1:
        return planes[0]
    even, odd = _column_order(planes[0::2]), _column_order(planes[1::2])
    return jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)


def _plane_rows(ref, g):
    """The eight planes' ``(1, bw)`` rows of row ``g`` of a ``(groups, 8 * bw)`` per-column ref: one
    contiguous load, split in registers (eight strided loads cost more in the GEMV: 519 instructions per
    group against 109, ``tools/kernel_ptx.py``)."""
    return _planes(ref[pl.ds(g, 1), :], 8)


def _words_gemv_kernel(x_ref, p_ref, s_ref, *rest, words: _Words, bk: int, blocks_per_group: int, groups: int,
                       ahead: int):
    """The word GEMV: one ``(bm, block_n)`` output tile from ``groups`` groups of ``blocks_per_group`` K
    blocks of ``bk`` rows (see :class:`_Words` for the decode).

    Products accumulate elementwise in a ``(bk, bw)`` tile per activation row and plane (no reduction
    inside the loop); at the end of a group that tile, times the group's scales, is added into a second
    tile, summed over its rows once, at the end (a reduction per group cost half as much again as the
    loop). The words of the next ``ahead`` blocks are loading while a block computes (carried through
    the loop: a GPU load does not wait until its value is used). The activations load where they are
    used: a few hundred bytes that every column tile reads (in cache); carried along too, Triton moved
    them through shared memory behind two barriers per block (``tools/kernel_ptx.py``)."""
    z_ref, o_ref = rest[0] if len(rest) == 2 else None, rest[-1]
    bm, bw = x_ref.shape[0], p_ref.shape[1]
    split = pl.program_id(2)
    last = groups * blocks_per_group - 1

    def rows(b):
        return pl.ds(jnp.minimum(b, last) * bk, bk)

    def group(g, carry):
        acc, queue = carry
        gi = split * groups + g
        offset = words.offsets(None if z_ref is None else _plane_rows(z_ref, gi))

        def block(b, carry):
            part, queue = carry
            ahead_words = words.flip(p_ref[rows(g * blocks_per_group + b + ahead), :])
            w, queue = queue[0], queue[1:] + (ahead_words,)
            v = words.planes(w, offset)
            x = [x_ref[pl.ds(r, 1), rows(g * blocks_per_group + b)].astype(jnp.float32).reshape(bk, 1)
                 for r in range(bm)]
            return tuple(part[r * 8 + j] + x[r] * v[j] for r in range(bm) for j in range(8)), queue

        zeros = (jnp.zeros((bk, bw), jnp.float32),) * (8 * bm)
        part, queue = lax.fori_loop(0, blocks_per_group, block, (zeros, queue))
        scales = _plane_rows(s_ref, gi)
        return tuple(a + p * (scales[i % 8] * words.unit(i % 8)) for i, (a, p) in enumerate(zip(acc, part))), queue

    queue = tuple(words.flip(p_ref[rows(b), :]) for b in range(ahead))
    acc, _ = lax.fori_loop(0, groups, group, ((jnp.zeros((bk, bw), jnp.float32),) * 8 * bm, queue))
    for r in range(bm):
        o_ref[pl.ds(r, 1), :] = _column_order([jnp.sum(a, axis=0, keepdims=True) for a in acc[r * 8:r * 8 + 8]])


def _words_dot_kernel(x_ref, p_ref, s_ref, *rest, words: _Words, bk: int, nk: int, group_rows: int):
    """The word kernel through ``tl.dot``: per K block, eight ``(bm, bk) @ (bk, bw)`` dots, one per plane,
    each scaled by its block's group (see :class:`_Words` for the decode). One flat loop over the split's
    ``nk`` blocks, loads where they are used: Triton pipelines them itself (``cp.async``; offline it also
    took fewer registers and instructions than words carried through the loop)."""
    z_ref, o_ref = rest[0] if len(rest) == 2 else None, rest[-1]
    bm, bw = x_ref.shape[0], p_ref.shape[1]
    split = pl.program_id(2)
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def block(k, acc):
        rows = pl.ds(k * bk, bk)
        g = (split * nk + k) * bk // group_rows
        offset = words.offsets(None if z_ref is None else _plane_rows(z_ref, g))
        v = words.planes(words.flip(p_ref[rows, :]), offset)
        x, scales = x_ref[:, rows], _plane_rows(s_ref, g)
        return tuple(a + jnp.dot(x, v[j].astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)
                     * (scales[j] * words.unit(j)) for j, a in enumerate(acc))

    o_ref[...] = _column_order(lax.fori_loop(0, nk, block, (jnp.zeros((bm, bw), jnp.float32),) * 8))


def as_words(packed):
    """Packed bytes ``(K, 4 * w)`` -> ``(K, w)`` uint32, four bytes a word, little-endian: the same bytes
    read as words (what the word kernels load)."""
    return lax.bitcast_convert_type(packed.reshape(packed.shape[0], -1, 4), jnp.uint32)


MIN_BLOCK_K = 16  # the fewest K rows a Triton dot takes


def default_block_k(group_size: int, per_group: bool, most: int = 128) -> int:
    """The K block: ``most`` rows (a power of two), or the largest divisor of the group up to it."""
    return math.gcd(group_size, most) if per_group else most


def default_blocks(m: int, k: int, group_size: int, per_group: bool) -> dict:
    """Tiles for an ``(m, k)`` input: ``block_m, block_n, block_k, split_k, gemv`` (the best deterministic
    tiles of the H100 sweep in ``benchmarks/matmul_gpu.py``, K = N = 8192). One row is a GEMV (multiply
    and sum, 64-row K blocks); up to 16 rows take ``tl.dot`` with 16 rows; for both, K is split into
    parts of about 8 blocks so that the GPU fills."""
    if m == 1:
        bk = default_block_k(group_size, per_group, most=64)
        return dict(block_m=1, block_n=256, block_k=bk, split_k=_split_k(k, bk), gemv=True)
    bk = default_block_k(group_size, per_group)
    if m <= 16:
        return dict(block_m=16, block_n=256, block_k=bk, split_k=_split_k(k, bk), gemv=False)
    return dict(block_m=64, block_n=128, block_k=bk, split_k=1, gemv=False)


def _split_k(k: int, bk: int, blocks_per_split: int = 8) -> int:
    """The number of K splits that gives each about ``blocks_per_split`` blocks of ``bk`` rows, among those
    that cut K's blocks evenly (any other count makes the wrapper pad, which copies the whole weight)."""
    blocks = -(-k // bk)
    counts = [s for s in range(1, blocks + 1) if blocks % s == 0]
    return min(counts, key=lambda s: abs(math.log(blocks / s / blocks_per_split)))


def matmul(x, packed, scale, zero_point, *, n: int, fmt: Format, group_size: int, block_m: int | None = None,
           block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
           gemv: bool | None = None, atomic: bool = False, magic: bool = False, words: bool = False,
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
      words: read the weight as 32-bit words of eight codes, decoded plane
        by plane without conversions (see :class:`_Words`), as a GEMV or
        through ``tl.dot`` (``gemv``); ``block_n`` a multiple of 8, the K
        splits summed by XLA; a GEMV's splits hold whole groups.
      ahead: for the word GEMV, how many K blocks load ahead of the one
        computing (at least 1; the dot path leaves that to Triton's
        ``num_stages``).
      num_warps, num_stages: Triton compiler parameters (``None``: Triton's).
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Returns:
      ``(M, n)`` float32.
    """
    m, k = x.shape
    per_group = scale.shape[0] > 1
    blocks = default_blocks(m, k, group_size, per_group)
    bn = block_n or blocks["block_n"]
    if words and (atomic or bn % 8 or ahead < 1):
        raise ValueError(f"pallas: words=True sums K splits in XLA and takes block_n a multiple of 8 and ahead >= 1; "
                         f"got atomic={atomic}, block_n={bn}, ahead={ahead}")
    gemv = blocks["gemv"] if gemv is None else gemv
    bm = block_m or (pl.next_power_of_2(m) if gemv else max(blocks["block_m"], MIN_BLOCK_K))
    bk = block_k or (default_block_k(group_size, per_group, most=8) if words and gemv else blocks["block_k"])
    unit = group_size if words and gemv and per_group else bk  # a K split holds whole units
    split_k = split_k or (_split_k(k, unit, max(1, 512 // unit)) if words else blocks["split_k"])
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

    def pad(a, rows, cols, fill=0):
        return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])), constant_values=fill)

    codes = as_words(pad(packed, kp, nhp)) if words else pad(packed, kp, nhp)
    lanes = 4 if words else 1  # bytes per element of the codes' tile
    operands = [pad(x, mp, kp), codes, pad(scale.astype(jnp.float32), groups, 2 * nhp, 1.0)]
    row_block = pl.BlockSpec((groups, 2 * bnh), lambda i, j, s: (0, j))
    in_specs = [
        pl.BlockSpec((bm, kp // split_k), lambda i, j, s: (i, s)),
        pl.BlockSpec((kp // split_k, bnh // lanes), lambda i, j, s: (s, j)),
        row_block,
    ]
    if zero_point is not None:
        operands.append(pad(zero_point.astype(jnp.float32), groups, 2 * nhp))
        in_specs.append(row_block)
    if words and gemv:
        rows = group_size if per_group else kp // split_k  # the rows of one scale row within a split
        kernel = functools.partial(_words_gemv_kernel, words=_Words(fmt, x.dtype, gemv, interpret), bk=bk,
                                   blocks_per_group=rows // bk, groups=kp // split_k // rows, ahead=ahead)
    elif words:
        kernel = functools.partial(_words_dot_kernel, words=_Words(fmt, x.dtype, gemv, interpret), bk=bk,
                                   nk=kp // split_k // bk, group_rows=group_size)
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
        out_shape = jax.ShapeDtypeStruct((split_k, mp, 2 * nhp), jnp.float32)
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
