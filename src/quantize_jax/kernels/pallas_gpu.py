"""A Pallas kernel for ``x @ W`` with a packed 4-bit weight (Triton on GPU; ``interpret=True`` on CPU).

The kernel reads the packed uint8 weight, unpacks each byte into its two
codes in registers, decodes them (``q - z`` or a codebook level), and
accumulates ``x @ codes`` in float32 one K block at a time; each group's
partial product is multiplied by that group's scale (``bk`` divides the group
size, so a K block never straddles two groups). The even and odd output
columns are accumulated separately, because the low and high nibbles of a
byte hold columns ``2j`` and ``2j + 1``, and interleaved by XLA afterwards.

Small M is a GEMV: the K axis is split over ``split_k`` program instances,
whose partial sums XLA adds, so that a 1-row product still fills the GPU.

The wrapper pads M, K and N to whole blocks (zero activations, zero codes,
unit scales), so any shape works.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from quantize_jax.formats import Format


def _decode(codes_u8, fmt: Format, zero_point):
    """Codes (uint8 nibble values 0..15, or int8 for signed) -> float32 levels, without gathers."""
    if fmt.is_integer:
        v = codes_u8.astype(jnp.float32)
        return v - zero_point if zero_point is not None else v
    out = jnp.zeros(codes_u8.shape, jnp.float32)
    for code, level in enumerate(fmt.levels):  # a select chain: Triton has no table lookups
        if level != 0.0:
            out = jnp.where(codes_u8 == code, jnp.float32(level), out)
    return out


def _kernel(x_ref, p_ref, se_ref, so_ref, *rest, fmt: Format, bk: int, nk: int, group_rows: int,
            per_group: bool, has_zero: bool):
    # Scales and zero points arrive split into even- and odd-column arrays, so the kernel only loads
    # whole blocks from refs and never slices a loaded value (Triton cannot).
    if has_zero:
        ze_ref, zo_ref, oe_ref, oo_ref = rest
    else:
        ze_ref = zo_ref = None
        oe_ref, oo_ref = rest
    split = pl.program_id(2)
    bm = x_ref.shape[0]
    bnh = p_ref.shape[1]

    def body(k, carry):
        acc_e, acc_o = carry
        x = x_ref[:, pl.ds(k * bk, bk)]
        p = p_ref[pl.ds(k * bk, bk), :]
        if fmt.signed_codes:
            p8 = p.astype(jnp.int8)
            lo = lax.shift_right_arithmetic(lax.shift_left(p8, jnp.int8(4)), jnp.int8(4))
            hi = lax.shift_right_arithmetic(p8, jnp.int8(4))
        else:
            lo, hi = p & jnp.uint8(15), lax.shift_right_logical(p, jnp.uint8(4))
        g = (split * nk + k) * bk // group_rows if per_group else 0
        ze = ze_ref[pl.ds(g, 1), :] if has_zero else None
        zo = zo_ref[pl.ds(g, 1), :] if has_zero else None
        de = jnp.dot(x, _decode(lo, fmt, ze).astype(x.dtype), preferred_element_type=jnp.float32)
        do = jnp.dot(x, _decode(hi, fmt, zo).astype(x.dtype), preferred_element_type=jnp.float32)
        if per_group:
            de, do = de * se_ref[pl.ds(g, 1), :], do * so_ref[pl.ds(g, 1), :]
        return acc_e + de, acc_o + do

    zeros = jnp.zeros((bm, bnh), jnp.float32)
    acc_e, acc_o = lax.fori_loop(0, nk, body, (zeros, zeros))
    if not per_group:
        acc_e, acc_o = acc_e * se_ref[...], acc_o * so_ref[...]
    oe_ref[...] = acc_e
    oo_ref[...] = acc_o


def matmul(x, packed, scale, zero_point, *, n: int, fmt: Format, group_size: int, block_m: int | None = None,
           block_n: int = 128, block_k: int | None = None, split_k: int | None = None, interpret: bool = False):
    """``x @ W`` for ``W`` of shape ``(K, n)`` given as packed codes ``(K, ceil(n / 2))``.

    Args:
      x: ``(M, K)`` activations (their dtype is the dot's input dtype).
      packed: uint8 codes, two per byte along the last axis.
      scale, zero_point: ``(G, n)`` float32, one row per group of
        ``group_size`` rows of ``W`` (``G = 1`` for per-channel); zero_point
        may be ``None``.
      fmt: the 4-bit format of the codes.
      block_m, block_n, block_k, split_k: tile sizes (``block_n`` counts
        packed columns, so ``2 * block_n`` outputs); defaults suit decode.
      interpret: run the kernel in Pallas' interpreter (CPU tests).

    Returns:
      ``(M, n)`` float32.
    """
    m, k = x.shape
    per_group = scale.shape[0] > 1
    if per_group:
        bk = block_k or math.gcd(group_size, 128)
        if group_size % bk:
            raise ValueError(f"pallas: block_k {bk} must divide group_size {group_size}")
    else:
        bk = block_k or 128
    if not interpret and bk < 16:
        raise ValueError(f"pallas: the K block must be at least 16 for the GPU dot; group_size {group_size} is too small")
    bm = block_m or max(16, min(64, pl.next_power_of_2(m)))
    nh = (n + 1) // 2
    bnh = min(block_n, max(16, pl.next_power_of_2(nh)))
    if split_k is None:
        split_k = max(1, min(8, k // (4 * bk))) if m <= 64 else 1
    k_whole = pl.cdiv(k, group_size) * group_size if per_group else k  # whole groups first
    kp = pl.cdiv(k_whole, bk * split_k) * bk * split_k
    mp, nhp = pl.cdiv(m, bm) * bm, pl.cdiv(nh, bnh) * bnh
    xp = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    pp = jnp.pad(packed, ((0, kp - k), (0, nhp - nh)))
    groups = pl.cdiv(kp, group_size) if per_group else 1

    def even_odd(a, fill):  # (G, n) -> even and odd columns, each (groups, nhp)
        a = jnp.pad(a.astype(jnp.float32), ((0, groups - a.shape[0]), (0, 2 * nhp - n)), constant_values=fill)
        return a[:, 0::2], a[:, 1::2]

    row_block = pl.BlockSpec((groups, bnh), lambda i, j, s: (0, j))
    operands = [xp, pp, *even_odd(scale, 1.0)]
    in_specs = [
        pl.BlockSpec((bm, kp // split_k), lambda i, j, s: (i, s)),
        pl.BlockSpec((kp // split_k, bnh), lambda i, j, s: (s, j)),
        row_block,
        row_block,
    ]
    if zero_point is not None:
        operands += even_odd(zero_point, 0.0)
        in_specs += [row_block, row_block]
    kernel = functools.partial(
        _kernel, fmt=fmt, bk=bk, nk=kp // split_k // bk, group_rows=group_size, per_group=per_group,
        has_zero=zero_point is not None,
    )
    out_block = pl.BlockSpec((None, bm, bnh), lambda i, j, s: (s, i, j))
    even, odd = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((split_k, mp, nhp), jnp.float32)] * 2,
        grid=(mp // bm, nhp // bnh, split_k),
        in_specs=in_specs,
        out_specs=[out_block, out_block],
        interpret=interpret,
        name="qdot_int4",
    )(*operands)
    out = jnp.stack([even.sum(0), odd.sum(0)], axis=-1).reshape(mp, 2 * nhp)
    return out[:m, :n]
