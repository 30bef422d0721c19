"""Hopper kernels (Pallas Mosaic GPU: TMA copies, WGMMA) for ``x @ W`` and ``x @ W.T`` with ``W`` int4.

A QArray's int4 bytes are XLA's own ``jnp.int4`` layout of its shape (low nibble first along the last
axis). Each program takes ``block_rows`` (64 or 128) output columns and copies its code tiles and
``(M, block_k)`` activation tiles into shared memory with the bulk tensor copy engine (TMA, a pipeline of
``stages`` steps in flight). Per 64 output columns and ``sub`` (128, or a group of 64) contracted columns
one WGMMA multiplies the codes in bf16 (A: WGMMA's 64 rows) by the activations (B, transposed in shared
memory, ``M`` padded to a multiple of 8, under 8 rows by TMA's zero fill): the "swapped" product ``W^T x^T``, in which the weight fills
WGMMA's rows, so a few activation rows waste no tensor-core work. Each such part lies inside one scale
group ``g``::

    y^T[n, m] += s[g, n] * sum_{k in part} c[k, n] x[m, k]

the products exact (int4 codes times bf16 activations), summed in float32. The K axis is split over
``splits`` programs per column block, whose partial sums XLA adds.

* :func:`matmul`, ``x @ W`` for ``W`` ``(K, N)`` as stored (``QuantSpec(axis=0)``): the codes run along N,
  so A would need them transposed, which Mosaic GPU's register loads refuse for packed tiles; each step
  instead decodes its ``(block_k, block_rows)`` tile to bf16 (Mosaic GPU's int4 -> bf16 bit trick) into
  shared memory, and the WGMMA reads it transposed from there (a hardware option for 16-bit operands).
  With ``exact=False`` the scales multiply the decoded codes instead (the weight rounded once to bf16),
  and one accumulator per 64 columns takes every part: up to 256 rows. With one scale per output column
  (either kernel) the kernel sums the codes' products that way and XLA scales the sums: exact, 256 rows.
* :func:`matmul_nt`, ``x @ W.T`` for ``W`` ``(N, K)`` (``QuantSpec(axis=1)``): the codes run along K, the
  layout of Mosaic GPU's mixed-input WGMMA, so they are upcast in registers (``WGMMA_UPCAST_4X``) as A
  with no trip through shared memory. Its scales ``(N, G)`` are read as stored: each step's TMA box is
  ``block_rows`` rows of its groups, widened to 16 bytes (4 groups: TMA's unit), and each part's scales
  are a column of it. Uses: tied-embedding logits ``x @ E.T`` over a table grouped along ``d``, and weights
  stored transposed.

Timed on an H200 (session 19, ``benchmarks/matmul_gpu.py --tma``, K = N = 8192, groups of 128, the
kernel alone): :func:`matmul` 22.1 / 23.6 / 46.7 us at M = 1 / 16 / 64, slower than the Triton PTX
kernel ``qdot`` takes (19.3 / 19.4 / 32.9), so ``qdot`` does not use it; :func:`matmul_nt` 16.0 / 17.0 /
26.3, the fastest of all, is what :func:`quantize_jax.qeinsum`'s ``auto`` takes for tied logits on Hopper
GPUs (bf16, up to 64 rows; :func:`fits`). Those timings had XLA transpose its scales to ``(G, N)`` first
(2.3 us a call at that shape, 8.4 over a 128256 x 4096 table); the boxes that read them as stored are
lowered and interpreted here, not yet run on a GPU. Where ``G`` is not a multiple of the boxes' width
(256000 x 2304 in groups of 128: 18), XLA still pads the scales once a call.

On the CPU they run in Mosaic GPU's interpreter (``interpret=True``), which simulates the TMA copies, the
pipeline and shared memory; four steps differ there because the interpreter lacks them: WGMMA with A in
registers or read through a transposed view (a ``dot_general`` instead), loads with an explicit register
layout and ``layout_cast`` (plain reads). ``jax.export(..., platforms=["cuda"])`` lowers the compiled
branch on any machine (tested), so its layouts are checked without a GPU.

Example (interpreted on a CPU)::

    >>> import jax, jax.numpy as jnp, quantize_jax as qj
    >>> from quantize_jax.kernels import mosaic_gpu
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=128))
    >>> x = jax.random.normal(jax.random.key(1), (2, 256), jnp.bfloat16)
    >>> y = mosaic_gpu.matmul(x, q, interpret=True)
    >>> bool(jnp.allclose(y, x.astype(jnp.float32) @ qj.dequantize(q), rtol=1e-4, atol=1e-3))
    True
    >>> q_t = qj.quantize(w.T, qj.QuantSpec(axis=1, group_size=128))
    >>> y = mosaic_gpu.matmul_nt(x, q_t, interpret=True)
    >>> bool(jnp.allclose(y, x.astype(jnp.float32) @ qj.dequantize(q_t).T, rtol=1e-4, atol=1e-3))
    True
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..qarray import QArray

WGMMA_ROWS = 64  # one warpgroup's WGMMA tile: the output columns each tensor-core product covers
MAX_M = 64  # activation rows: WGMMA's N (a multiple of 8); its float32 accumulators take M / 2 registers a thread
MAX_M_SCALED = 256  # matmul(exact=False): WGMMA's largest N, its one accumulator per 64 columns 128 registers
_SUB = 128  # columns of K per WGMMA (inside one scale group; 64 for groups of 64)
_PROGRAMS = 528  # about 4 programs per SM of an H100 / H200 (132 SMs)


def _interpreter(detect_races: bool = False, read_past: bool = False):
    """Mosaic GPU's interpreter's parameters (jax 0.10.2 has no public name for them): out-of-bounds reads
    raise (``read_past``: read NaN, where TMA would read zeros), shared memory starts as NaN;
    ``detect_races`` adds its happens-before race detector."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # a private path, as of jax 0.10.2
        raise NotImplementedError(f"Mosaic GPU's interpreter was not found in jax {jax.__version__}: {e}") from e
    return InterpretGPUParams(detect_races=detect_races, out_of_bounds_reads="uninitialized" if read_past else "raise")


def default_splits(n: int, k: int, block_rows: int, block_k: int, programs: int = _PROGRAMS) -> int:
    """The most K splits (a power of two, each a whole number of steps) that keep the programs
    ``n / block_rows * splits`` at most ``programs``: a decode-sized product still fills the GPU."""
    splits = 1
    while n // block_rows * splits * 2 <= programs and k % (splits * 2 * block_k) == 0:
        splits *= 2
    return splits


class _Tiles(NamedTuple):
    block_rows: int  # output columns (rows of the codes' A operand) per program: one or two WGMMAs a part
    block_k: int  # contracted columns per pipeline step (one TMA copy of codes, one of activations)
    sub: int  # contracted columns per WGMMA, inside one scale group
    group: int  # contracted columns per scale (all of K for one scale per output column)
    splits: int

    @property
    def scale_rows(self) -> int:
        """Groups a pipeline step spans: rows of scales :func:`matmul` reads a step."""
        return max(1, self.block_k // self.group)

    @property
    def scale_cols(self) -> int:
        """Columns of the stored ``(N, G)`` scales :func:`matmul_nt` reads a step: its groups in a box a
        whole number of 16 bytes wide (TMA's unit), the box holding whole steps."""
        return math.lcm(self.scale_rows, 4)


def _padded(m: int) -> int:
    """Activation rows padded to WGMMA's N, a multiple of 8."""
    return -(-m // 8) * 8


SMEM_BYTES = 232448  # shared memory a program may take on an H100 / H200 (227 KB)
_SMEM_SLACK = 1024  # for Mosaic GPU's alignment of some buffers (up to 512 bytes more than smem_bytes measured)


def smem_bytes(t: _Tiles, m: int, stages: int, forward: bool, scales: bool = True) -> int:
    """Shared memory a program takes, as Mosaic GPU counts it: per stage the buffers of codes, activations
    and (``scales``: in the kernel) scales and an 8-byte barrier; the output tile; and (``forward``) the
    decoded tile. Mosaic GPU refuses a kernel over :data:`SMEM_BYTES`."""
    mp = _padded(m)
    scale_bytes = (t.scale_rows if forward else t.scale_cols) * t.block_rows * 4 if scales else 0
    step = t.block_rows * t.block_k // 2 + mp * t.block_k * 2 + scale_bytes + 8
    return stages * step + t.block_rows * mp * 4 + (t.block_k * t.block_rows * 2 if forward else 0)


def default_stages(t: _Tiles, m: int, forward: bool, most: int = 4, scales: bool = True) -> int:
    """The most pipeline stages, up to ``most``, whose buffers fit :data:`SMEM_BYTES` with a KB to spare
    (Mosaic GPU aligns some buffers: up to 512 bytes more than :func:`smem_bytes` measured); 0 if none."""
    return max([s for s in range(1, most + 1) if smem_bytes(t, m, s, forward, scales) + _SMEM_SLACK <= SMEM_BYTES]
               or [0])


def _plan(name: str, x, q: QArray, axis: int, block_rows: int, block_k: int | None, splits: int | None,
          stages: int | None, exact: bool = True) -> tuple[_Tiles, str, int]:
    """The tiles, the mode (:func:`_product`) and the pipeline stages (default :func:`default_stages`) for
    ``x`` ``(M, K)`` times ``q`` contracted over its ``axis`` (and scaled along it), once both fit the
    kernel and its shared memory; else a ValueError that names them."""
    def bad(why, t=None):
        tiles = "" if t is None else f", {t.block_rows} x {t.block_k} blocks, splits={t.splits}"
        x_is = f"x of shape {getattr(x, 'shape', None)} and dtype {getattr(x, 'dtype', None)}"
        return ValueError(f"{name}: {why} ({x_is}, q of shape {getattr(q, 'shape', None)}, "
                          f"spec {getattr(q, 'spec', None)}{tiles})")

    if not isinstance(q, QArray) or q.ndim != 2 or getattr(x, "ndim", None) != 2:
        raise bad("expected x (M, K) and a 2-D QArray q")
    (m, k), kq, n = x.shape, q.shape[axis], q.shape[1 - axis]
    if k != kq:
        raise bad(f"x has {k} columns, q {kq} along its axis {axis}")
    if q.spec.format != "int4" or q.zero_point is not None:
        raise bad("only int4 codes without zero points are supported")
    if q.spec.axis not in (axis, axis - 2):
        raise bad(f"q must be scaled along the axis it is contracted over (QuantSpec(axis={axis}))")
    if x.dtype != jnp.bfloat16:
        raise bad("x must be bfloat16 (WGMMA's operand)")
    mode = "after" if q.scale.shape[axis] == 1 else ("parts" if exact else "decoded")
    max_m = MAX_M if mode == "parts" else MAX_M_SCALED * WGMMA_ROWS // max(block_rows, WGMMA_ROWS)
    if not 1 <= m <= max_m:
        raise bad(f"x must have 1 to {max_m} rows")
    group = q.spec.group_size or k
    sub = _SUB if group % _SUB == 0 else group
    block_k = block_k or sub
    sub = min(sub, block_k)
    t = _Tiles(block_rows, block_k, sub, group, splits or default_splits(n, k, block_rows, block_k))
    if t.block_rows not in (64, 128) or n % t.block_rows:
        raise bad(f"block_rows must be 64 or 128, and the {n} output columns a multiple of it", t)
    # 64 columns at least: 32 bytes a row of codes, TMA's narrowest swizzle
    if t.sub % 64 or t.block_k % t.sub or (t.block_k > t.group and t.block_k % t.group) or k % (t.splits * t.block_k):
        raise bad(f"K must split into {t.splits} whole steps of {t.block_k} columns, each whole groups of "
                  f"{t.group} or inside one, in parts of a multiple of 64", t)
    forward, scales = axis == 0, mode != "after"
    steps = k // (t.splits * t.block_k)  # (the pipeline keeps no more stages than it has steps)
    stages = min(stages or default_stages(t, m, forward, scales=scales) or 1, steps)
    if smem_bytes(t, m, stages, forward, scales) + _SMEM_SLACK > SMEM_BYTES:
        raise ValueError(f"{name}: {t.block_rows} x {t.block_k} blocks at {m} rows take "
                         f"{smem_bytes(t, m, stages, forward, scales)} bytes of shared memory with {stages} "
                         f"stage(s), over {SMEM_BYTES - _SMEM_SLACK}; take smaller blocks or fewer stages")
    return t, mode, stages


def fits(x, q: QArray, *, transposed: bool = False, exact: bool = True) -> bool:
    """Whether :func:`matmul` (``transposed``: :func:`matmul_nt`) takes ``x`` and ``q`` with its default tiles
    (where it would raise the ValueError that names why not)."""
    try:
        _plan("fits", x, q, 1 if transposed else 0, 64, None, None, None, exact)
    except ValueError:
        return False
    return True


def matmul(x, q: QArray, *, block_rows: int = 64, block_k: int | None = None, splits: int | None = None,
           stages: int | None = None, exact: bool = True, interpret=False) -> jax.Array:
    """``x @ dequantize(q)`` in float32 for ``x`` ``(M, K)`` bf16 and ``q`` ``(K, N)`` int4 scaled along K
    (``QuantSpec(axis=0)``, groups or per column): each step's codes decoded to bf16 into shared memory, the
    WGMMA reading them transposed from there.

    With groups, each part's product is scaled in registers (up to ``MAX_M`` rows); ``exact=False`` takes
    up to ``MAX_M_SCALED`` rows (half that with 128-column blocks): the scales multiply the decoded codes,
    rounded once to bf16 as ``qdot(..., backend="dequant")`` rounds its weight, and one float32 accumulator
    per 64 columns takes every part. With one scale per column the product is exact up to ``MAX_M_SCALED``
    rows either way: the kernel sums the codes' products and XLA scales the sums.

    ``block_rows``: output columns per program (64 or 128); ``block_k``: contracted columns per pipeline
    step (default 128, or the group for groups of 64), whole groups or inside one; ``splits``: programs per
    column block along K (default :func:`default_splits`); ``stages``: pipeline steps in flight (TMA copies
    issued ahead of the compute; default :func:`default_stages`: up to 4 in the shared memory);
    ``interpret``: run in Mosaic GPU's interpreter (any machine, for tests; ``"races"`` also runs its race
    detector). Needs the output columns a multiple of ``block_rows`` and ``K`` of ``splits`` steps.
    """
    t, mode, stages = _plan("matmul", x, q, 0, block_rows, block_k, splits, stages, exact)
    return _product(x, q.as_int4(), q.scale, tiles=t, stages=stages, interpret=interpret, forward=True, mode=mode)


def matmul_nt(x, q: QArray, *, block_rows: int = 64, block_k: int | None = None, splits: int | None = None,
              stages: int | None = None, specialized: bool = False, interpret=False) -> jax.Array:
    """``x @ dequantize(q).T`` in float32 for ``x`` ``(M, K)`` bf16 and ``q`` ``(N, K)`` int4 scaled along K
    (``QuantSpec(axis=1)``, groups or per row): each step's codes upcast in registers as WGMMA's A operand.
    The options and limits are :func:`matmul`'s (always exact). ``specialized``: a warpgroup of the program
    only issues the TMA copies, and each 64 output columns have a warpgroup of their own that computes (a
    warp-specialized pipeline, as Hopper GEMMs have), instead of one warpgroup issuing the copies between
    its steps (lowered and interpreted, not yet timed on a GPU).
    """
    t, mode, stages = _plan("matmul_nt", x, q, 1, block_rows, block_k, splits, stages)
    return _product(x, q.as_int4(), q.scale, tiles=t, stages=stages, interpret=interpret, forward=False,
                    mode=mode, specialized=specialized)


def _swizzled(swizzle: int, bits: int) -> tuple:
    """The transforms of a shared-memory tile whose rows are ``swizzle`` bytes of ``bits``-bit elements."""
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


@functools.partial(jax.jit, static_argnames=("tiles", "stages", "interpret", "forward", "mode", "specialized"))
def _product(x, codes, scale, *, tiles: _Tiles, stages: int, interpret, forward: bool, mode: str,
             specialized: bool = False):
    """``x @ (codes * scales)``, contracted over ``codes``' axis 0 (``forward``) or 1, ``scale`` as stored
    (``(G, N)`` or ``(N, G)``).

    ``mode``: ``"parts"``, each part's product scaled in float32 in registers; ``"decoded"`` (``forward``
    only), the scales multiply the decoded tile (rounded once to bf16); ``"after"`` (one scale per output
    column), the kernel sums the codes' products and XLA scales the sums. The last two accumulate every
    part in one WGMMA accumulator per 64 columns.

    ``specialized`` (not ``forward``): a warpgroup of its own issues the TMA copies and each 64 columns
    have a computing warpgroup of their own (``plgpu.emit_pipeline_warp_specialized``), instead of one
    warpgroup issuing each step's copies after computing every column of its previous step."""
    m, k = x.shape
    n = codes.shape[1 if forward else 0]
    rows, bk, sub, group, splits = tiles
    mp = _padded(m)
    # Under 8 rows TMA reads the missing rows as zeros (a box may run past a dimension shorter than its
    # 8-row tile); XLA pads the activations where Mosaic GPU tiles them (over 8 rows, not a multiple of 8)
    read_past = m < 8
    xp = x if read_past or m == mp else jnp.pad(x, ((0, mp - m), (0, 0)))
    k_split = k // splits
    scale_rows, scale_cols = tiles.scale_rows, tiles.scale_cols
    halves = rows // WGMMA_ROWS
    x_swizzle = plgpu.find_swizzle(sub * 16, "activations")  # a WGMMA's slice of a tile starts on a swizzle tile
    if forward:  # (bk, rows) code tiles, decoded into a (bk, rows) bf16 tile
        code_block = (bk, rows)
        code_transforms = _swizzled(plgpu.find_swizzle(rows * 4, "codes"), 4)
        decoded_transforms = _swizzled(plgpu.find_swizzle(rows * 16, "decoded"), 16)
        scratch = [plgpu.SMEM((rows, mp), jnp.float32),
                   plgpu.SMEM((bk, rows), jnp.bfloat16, transforms=decoded_transforms)]
    else:  # (rows, bk) code tiles, upcast in registers
        code_block = (rows, bk)
        code_transforms = _swizzled(plgpu.find_swizzle(sub * 4, "codes"), 4)
        scratch = [plgpu.SMEM((rows, mp), jnp.float32)]
    scales_in = mode != "after"  # the scales travel through the pipeline
    accumulate = mode != "parts" and not interpret  # WGMMAs into accumulators that live through the pipeline

    def kernel(w_gmem, x_gmem, *refs):
        s_gmem, (o_gmem, o_smem, *decoded) = (refs[0], refs[1:]) if scales_in else (None, refs)
        j, split = lax.axis_index("n"), lax.axis_index("split")
        if specialized:  # this warpgroup's 64 columns
            mine = [pl.ds(pl.multiple_of(lax.axis_index("wg") * WGMMA_ROWS, WGMMA_ROWS), WGMMA_ROWS)]
        else:
            mine = [pl.ds(h * WGMMA_ROWS, WGMMA_ROWS) for h in range(halves)]

        def decode(w_smem, s_smem):  # the step's codes, or (decoded) scaled weights, bf16, into shared memory
            if mode != "decoded":
                decoded[0][...] = w_smem[...].astype(jnp.bfloat16)
                plgpu.commit_smem()  # the WGMMA reads what every thread stored
                return
            for c in range(bk // sub):  # a part inside one group: a row of scales
                cols = pl.ds(c * sub, sub)
                if interpret:
                    w, s = w_smem.at[cols][...].astype(jnp.float32), s_smem[c * sub // group]
                else:  # (the int4 -> bf16 bit trick, then exact to float32)
                    w = plgpu.load(w_smem.at[cols], (), layout=plgpu.Layout.WGMMA).astype(jnp.bfloat16)
                    w = w.astype(jnp.float32)
                    s = plgpu.load(s_smem.at[c * sub // group], (), layout=plgpu.Layout.WGMMA.reduce(0))
                decoded[0].at[cols][...] = (w * lax.broadcast_in_dim(s, (sub, rows), (1,))).astype(jnp.bfloat16)
            plgpu.commit_smem()  # the WGMMA reads what every thread stored

        def issue(accs, codes, xs):  # one WGMMA per 64 columns: the codes (A) times the activations (B)
            for acc, a in zip(accs, codes):
                plgpu.wgmma(acc, plgpu.transpose_ref(a, (1, 0)) if forward else a, plgpu.transpose_ref(xs, (1, 0)))

        def part_scales(s_smem, idx, c, r):
            """Part ``c``'s scales of the columns ``r``: a row of :func:`matmul`'s ``(G, N)`` step, or a column of
            :func:`matmul_nt`'s ``(N, G)`` box (which may start groups before the step's first)."""
            g = c * sub // group
            if forward:
                return s_smem.at[g, r]
            return s_smem.at[r, (split * k_split + idx[0] * bk) // group % scale_cols + g]

        def step(idx, w_smem, x_smem, *rest, accs=()):
            s_smem, totals = (rest[0] if scales_in else None), list(rest[-1])
            if forward:
                decode(w_smem, s_smem)
            for c in range(bk // sub):
                cols = pl.ds(c * sub, sub)
                xs = x_smem.at[:, cols]
                if forward:  # (sub, 64) views of the decoded tile, read transposed
                    codes = [decoded[0].at[cols, r] for r in mine]
                else:  # (64, sub) codes in registers, exact in bf16
                    codes = [w_smem.at[r, cols][...].astype(jnp.bfloat16) for r in mine]
                if interpret:  # (the interpreter reads no transposed views)
                    codes = [a[...].T for a in codes] if forward else codes
                    parts = [lax.dot_general(a, xs[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                             for a in codes]
                    if mode == "parts":
                        parts = [part * lax.broadcast_in_dim(part_scales(s_smem, idx, c, r)[...], (WGMMA_ROWS, mp), (0,))
                                 for part, r in zip(parts, mine)]
                elif accumulate:
                    issue(accs, codes, xs)
                    continue
                else:
                    def mma(*accs):  # every half's WGMMA issued, then one wait
                        issue(accs, codes, xs)
                        plgpu.wgmma_wait(0)
                        return [acc[...] for acc in accs]

                    parts = pl.run_scoped(mma, *[plgpu.ACC((WGMMA_ROWS, mp), jnp.float32)] * len(mine))
                    # (matmul_nt's: a strided column, loaded element by element; 64 values a part)
                    scales = [plgpu.load(part_scales(s_smem, idx, c, r), (), layout=plgpu.Layout.WGMMA.reduce(1),
                                         optimized=forward) for r in mine]
                    parts = [part * lax.broadcast_in_dim(s, (WGMMA_ROWS, mp), (0,)) for part, s in zip(parts, scales)]
                totals = [total + part for total, part in zip(totals, parts)]
            if accumulate:
                plgpu.wgmma_wait(0)  # before the next step overwrites what the WGMMAs read
            return tuple(totals)

        contracted, produced = pl.ds(split * k_split, k_split), pl.ds(j * rows, rows)
        in_specs = [
            plgpu.BlockSpec(code_block, (lambda i: (i, 0)) if forward else (lambda i: (0, i)),
                            transforms=code_transforms),
            plgpu.BlockSpec((mp, bk), lambda i: (0, i), transforms=_swizzled(x_swizzle, 16)),
        ]
        if scales_in and forward:
            in_specs.append(plgpu.BlockSpec((scale_rows, rows),
                                            lambda i: ((split * k_split + i * bk) // group // scale_rows, j)))
        elif scales_in:
            in_specs.append(plgpu.BlockSpec((rows, scale_cols),
                                            lambda i: (j, (split * k_split + i * bk) // group // scale_cols)))

        operands = (w_gmem.at[contracted, produced] if forward else w_gmem.at[produced, contracted],
                    x_gmem.at[:, contracted], *([s_gmem] if scales_in else []))
        steps = dict(grid=(k_split // bk,), max_concurrent_steps=stages, in_specs=in_specs)
        accumulators = [plgpu.ACC((WGMMA_ROWS, mp), jnp.float32)] * len(mine)

        def zeros():
            z = jnp.zeros((WGMMA_ROWS, mp), jnp.float32)
            return [z if interpret else plgpu.layout_cast(z, plgpu.Layout.WGMMA)] * len(mine)

        def store(totals):  # each warpgroup's columns, through shared memory
            for r, total in zip(mine, totals):
                o_smem[r] = total
            plgpu.commit_smem()
            for r in mine:
                plgpu.copy_smem_to_gmem(o_smem.at[r], o_gmem.at[split, produced].at[r])
            plgpu.wait_smem_to_gmem(0)

        if specialized:  # the body's carry: the accumulators' refs, or the totals in registers
            def body(idx, *refs):  # the step's buffers, then the carry
                *buffers, carry = refs
                if accumulate:
                    step(idx, *buffers, (), accs=carry)
                    return carry
                return step(idx, *buffers, carry)

            def context(run):
                if accumulate:
                    pl.run_scoped(lambda *accs: store([acc[...] for acc in run(accs)]), *accumulators)
                else:
                    store(run(tuple(zeros())))

            plgpu.emit_pipeline_warp_specialized(body, memory_registers=40, wg_axis="wg", num_compute_wgs=halves,
                                                 compute_context=context, **steps)(*operands)
            return

        def pipeline(*accs):
            totals = plgpu.emit_pipeline(lambda *refs: step(*refs, accs=accs), init_carry=() if accumulate else
                                         tuple(zeros()), **steps)(*operands)
            return [acc[...] for acc in accs] if accumulate else totals

        store(pl.run_scoped(pipeline, *accumulators) if accumulate else pipeline())

    parts = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
        grid=(n // rows, splits), grid_names=("n", "split"), scratch_types=scratch,
        interpret=_interpreter(interpret == "races", read_past) if interpret else None,
        **(dict(num_threads=halves + 1, thread_name="wg") if specialized else {}),
    )(codes, xp, *([scale.astype(jnp.float32) if forward else _whole_boxes(scale.astype(jnp.float32), scale_cols)]
                   if scales_in else []))
    y = parts[:, :, :m].sum(0).T  # (the rows sliced before the sum: XLA reads them in the sum's fusion)
    return y if scales_in else y * scale.reshape(1, n).astype(jnp.float32)  # one scale per output column


def _whole_boxes(scale, box: int):
    """:func:`matmul_nt`'s scales ``(N, G)`` with ``G`` padded to a multiple of its boxes' ``box`` columns (a
    multiple of 4: TMA reads rows that start on 16 bytes); an XLA copy only where ``G`` is not one."""
    return jnp.pad(scale, ((0, 0), (0, -scale.shape[1] % box))) if scale.shape[1] % box else scale
