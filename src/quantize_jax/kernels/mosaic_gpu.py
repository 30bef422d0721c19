"""A Hopper kernel (Pallas Mosaic GPU: TMA copies, WGMMA) for ``x @ W.T`` with ``W`` int4, packed along the contraction.

``W`` is a QArray ``(N, K)`` of ``int4`` codes scaled along ``K``, in groups or one scale per row, so its
bytes are XLA's own ``jnp.int4`` layout of ``(N, K)`` (low nibble first along ``K``). That is the layout
Hopper's mixed-input WGMMA wants for its A operand: each program takes ``block_rows`` (64 or 128) rows of
``W`` and copies ``(block_rows, block_k)`` code tiles and ``(M, block_k)`` activation tiles into shared
memory with the bulk tensor copy engine (TMA, a pipeline of ``stages`` steps in flight). Per 64 rows and
``sub`` (128, or a group of 64) columns it converts the codes to bf16 in registers (Mosaic GPU's
``WGMMA_UPCAST_4X`` layout and its int4 -> bf16 bit trick) and multiplies them by the activations (B,
transposed in shared memory) on the tensor cores, ``M`` padded to a multiple of 8 (the "swapped" product
``W x^T``: the weight fills WGMMA's 64 rows, so a few activation rows waste no tensor-core work). Each
such part lies inside one scale group ``g``::

    y^T[n, m] += s[n, g] * sum_{k in part} c[n, k] x[m, k]

the products exact (int4 codes times bf16 activations), summed in float32. The K axis is split over
``splits`` programs per row block, whose partial sums XLA adds.

Uses: tied-embedding logits ``x @ E.T`` over a table ``(vocab, d)`` grouped along ``d``, and any weight
stored transposed, ``(N, K)``: ``x @ W`` then reads the same 4-bit bytes as the forward product. Not used by
``qdot`` / ``qeinsum``'s ``auto`` until timed on a GPU (``benchmarks/matmul_gpu.py --tma``).

On the CPU it runs in Mosaic GPU's interpreter (``interpret=True``), which simulates the TMA copies, the
pipeline and shared memory; three steps differ there because the interpreter lacks them: WGMMA with A in
registers (a ``dot_general`` instead), loads with an explicit register layout and ``layout_cast`` (plain
reads). ``jax.export(..., platforms=["cuda"])`` lowers the compiled branch on any machine (tested), so its
layouts are checked without a GPU.

Example (interpreted on a CPU)::

    >>> import jax, jax.numpy as jnp, quantize_jax as qj
    >>> from quantize_jax.kernels import mosaic_gpu
    >>> w = jax.random.normal(jax.random.key(0), (64, 256))
    >>> q = qj.quantize(w, qj.QuantSpec(axis=1, group_size=128))
    >>> x = jax.random.normal(jax.random.key(1), (2, 256), jnp.bfloat16)
    >>> y = mosaic_gpu.matmul_nt(x, q, interpret=True)
    >>> ref = x.astype(jnp.float32) @ qj.dequantize(q).T
    >>> bool(jnp.allclose(y, ref, rtol=1e-4, atol=1e-3))
    True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..qarray import QArray, int4_view

WGMMA_ROWS = 64  # one warpgroup's WGMMA tile: the rows of W each tensor-core product covers
MAX_M = 64  # activation rows: WGMMA's N (a multiple of 8); its float32 accumulators take M / 2 registers a thread
_SUB = 128  # columns of K per WGMMA (inside one scale group; 64 for groups of 64)
_PROGRAMS = 528  # about 4 programs per SM of an H100 / H200 (132 SMs)


def _interpreter(detect_races: bool = False):
    """Mosaic GPU's interpreter's parameters (jax 0.10.2 has no public name for them): out-of-bounds reads
    raise, shared memory starts as NaN; ``detect_races`` adds its happens-before race detector."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(detect_races=detect_races)


def default_splits(n: int, k: int, block_rows: int, block_k: int, programs: int = _PROGRAMS) -> int:
    """The most K splits (a power of two, each a whole number of steps) that keep the programs
    ``n / block_rows * splits`` at most ``programs``: a decode-sized product still fills the GPU."""
    splits = 1
    while n // block_rows * splits * 2 <= programs and k % (splits * 2 * block_k) == 0:
        splits *= 2
    return splits


class _Tiles(NamedTuple):
    block_rows: int  # rows of W per program (64 or 128: one or two WGMMAs a sub-step)
    block_k: int  # columns of K per pipeline step (one TMA copy of codes, one of activations)
    sub: int  # columns per WGMMA, inside one scale group
    group: int  # columns per scale (all of K for one scale a row)
    splits: int


def _tiles(q: QArray, block_rows: int, block_k: int | None, splits: int | None) -> _Tiles:
    k = q.shape[1]
    group = q.spec.group_size or k
    sub = _SUB if group % _SUB == 0 else group
    block_k = block_k or sub
    sub = min(sub, block_k)
    splits = splits or default_splits(q.shape[0], k, block_rows, block_k)
    return _Tiles(block_rows, block_k, sub, group, splits)


def _check(x, q: QArray, t: _Tiles) -> None:
    def bad(why):
        return ValueError(f"matmul_nt: {why} (x of shape {x.shape} and dtype {x.dtype}, q of shape {q.shape}, "
                          f"spec {q.spec}, {t.block_rows} x {t.block_k} blocks, splits={t.splits})")

    if not isinstance(q, QArray) or q.ndim != 2 or x.ndim != 2:
        raise bad("expected x (M, K) and a 2-D QArray q (N, K)")
    (m, k), (n, kq) = x.shape, q.shape
    if k != kq:
        raise bad(f"x has {k} columns, q {kq}")
    if q.spec.format != "int4" or q.zero_point is not None:
        raise bad("only int4 codes without zero points are supported")
    if q.spec.axis not in (1, -1):
        raise bad("q must be scaled along its last axis (QuantSpec(axis=1)), the one contracted")
    if x.dtype != jnp.bfloat16:
        raise bad("x must be bfloat16 (WGMMA's operand)")
    if not 1 <= m <= MAX_M:
        raise bad(f"x must have 1 to {MAX_M} rows")
    if t.block_rows not in (64, 128) or n % t.block_rows:
        raise bad("block_rows must be 64 or 128, and q's rows a multiple of it")
    # 64 columns at least: 32 bytes a row of codes, TMA's narrowest swizzle
    if t.sub % 64 or t.block_k % t.sub or (t.block_k > t.group and t.block_k % t.group) or k % (t.splits * t.block_k):
        raise bad(f"K must split into {t.splits} whole steps of {t.block_k} columns, each whole groups of "
                  f"{t.group} or inside one, in parts of a multiple of 64")


def matmul_nt(x, q: QArray, *, block_rows: int = 64, block_k: int | None = None, splits: int | None = None,
              stages: int = 4, interpret=False) -> jax.Array:
    """``x @ dequantize(q).T`` in float32 for ``x`` ``(M, K)`` bf16 and ``q`` ``(N, K)`` int4 scaled along K.

    ``block_rows``: rows of ``q`` per program (64 or 128); ``block_k``: columns per pipeline step (default
    128, or the group for groups of 64), whole groups or inside one; ``splits``: programs per row block
    along K (default :func:`default_splits`); ``stages``: pipeline steps in flight (TMA copies issued ahead
    of the compute); ``interpret``: run in Mosaic GPU's interpreter (any machine, for tests; ``"races"``
    also runs its race detector). Needs ``M <= 64``, ``N`` a multiple of ``block_rows`` and ``K`` a
    multiple of ``splits`` steps.
    """
    t = _tiles(q, block_rows, block_k, splits)
    _check(x, q, t)
    return _matmul_nt(x, int4_view(q.packed, True).reshape(q.shape), q.scale, tiles=t, stages=stages,
                      interpret=interpret)


@functools.partial(jax.jit, static_argnames=("tiles", "stages", "interpret"))
def _matmul_nt(x, codes, scale, *, tiles: _Tiles, stages: int, interpret):
    (m, k), n = x.shape, codes.shape[0]
    rows, bk, sub, group, splits = tiles
    mp = -(-m // 8) * 8
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    scale_t = scale.T.astype(jnp.float32)  # (G, N): a step's scales are rows (a copy per call; free for G = 1)
    k_split = k // splits
    scale_rows = max(1, bk // group)  # scale rows a step reads
    halves = rows // WGMMA_ROWS
    w_swizzle = plgpu.find_swizzle(sub * 4, "codes")  # a WGMMA's slice of a tile starts on a swizzle tile
    x_swizzle = plgpu.find_swizzle(sub * 16, "activations")

    def kernel(w_gmem, x_gmem, s_gmem, o_gmem, o_smem):
        j, split = lax.axis_index("n"), lax.axis_index("split")

        def step(idx, w_smem, x_smem, s_smem, totals):
            totals = list(totals)
            for c in range(bk // sub):
                cols = pl.ds(c * sub, sub)
                xs = x_smem.at[:, cols]
                halves_rows = [pl.ds(h * WGMMA_ROWS, WGMMA_ROWS) for h in range(halves)]
                # (64, sub) codes per half, exact in bf16
                codes = [w_smem.at[r, cols][...].astype(jnp.bfloat16) for r in halves_rows]
                srow = c * sub // group  # this part's row of the step's scales
                if interpret:
                    parts = [lax.dot_general(a, xs[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                             for a in codes]
                    scales = [s_smem.at[srow, r][...] for r in halves_rows]
                else:
                    def mma(*accs):  # every half's WGMMA issued, then one wait
                        for acc, a in zip(accs, codes):
                            plgpu.wgmma(acc, a, plgpu.transpose_ref(xs, (1, 0)))
                        plgpu.wgmma_wait(0)
                        return [acc[...] for acc in accs]

                    parts = pl.run_scoped(mma, *[plgpu.ACC((WGMMA_ROWS, mp), jnp.float32)] * halves)
                    scales = [plgpu.load(s_smem.at[srow, r], (), layout=plgpu.Layout.WGMMA.reduce(1))
                              for r in halves_rows]
                for h, (part, s) in enumerate(zip(parts, scales)):
                    totals[h] = totals[h] + part * lax.broadcast_in_dim(s, (WGMMA_ROWS, mp), (0,))
            return tuple(totals)

        zeros = jnp.zeros((WGMMA_ROWS, mp), jnp.float32)
        zeros = zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
        columns = pl.ds(split * k_split, k_split)
        totals = plgpu.emit_pipeline(
            step, grid=(k_split // bk,), max_concurrent_steps=stages,
            in_specs=[
                plgpu.BlockSpec((rows, bk), lambda i: (0, i), transforms=(
                    plgpu.TilingTransform((8, w_swizzle * 2)), plgpu.SwizzleTransform(w_swizzle))),
                plgpu.BlockSpec((mp, bk), lambda i: (0, i), transforms=(
                    plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))),
                plgpu.BlockSpec((scale_rows, rows), lambda i: ((split * k_split + i * bk) // group // scale_rows, j)),
            ],
            init_carry=(zeros,) * halves,
        )(w_gmem.at[pl.ds(j * rows, rows), columns], x_gmem.at[:, columns], s_gmem)
        for h, total in enumerate(totals):
            o_smem[pl.ds(h * WGMMA_ROWS, WGMMA_ROWS)] = total
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, pl.ds(j * rows, rows)])
        plgpu.wait_smem_to_gmem(0)

    parts = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
        grid=(n // rows, splits), grid_names=("n", "split"),
        scratch_types=[plgpu.SMEM((rows, mp), jnp.float32)],
        interpret=_interpreter(interpret == "races") if interpret else None,
    )(codes, xp, scale_t)
    return parts.sum(0)[:, :m].T
