"""A Hopper kernel (Pallas Mosaic GPU: TMA copies, WGMMA) for ``x @ W.T`` with ``W`` int4, packed along the contraction.

``W`` is a QArray ``(N, K)`` of ``int4`` codes scaled along ``K``, in groups or one scale per row, so its
bytes are XLA's own ``jnp.int4`` layout of ``(N, K)`` (low nibble first along ``K``). That is the layout
Hopper's mixed-input WGMMA wants for its A operand: each program copies ``(64, tk)`` code tiles and
``(M, tk)`` activation tiles into shared memory with the bulk tensor copy engine (TMA, a pipeline of
``stages`` steps in flight), converts the codes to bf16 in registers (Mosaic GPU's ``WGMMA_UPCAST_4X``
layout and its int4 -> bf16 bit trick) and multiplies them by the activations (B, transposed in shared
memory) on the tensor cores, ``M`` padded to a multiple of 8 (the "swapped" product ``W x^T``: the weight
fills WGMMA's 64 rows, so a few activation rows waste no tensor-core work). Per step of ``tk`` columns,
inside one scale group ``g``::

    y^T[n, m] += s[n, g] * sum_{k in step} c[n, k] x[m, k]

the products exact (int4 codes times bf16 activations), summed in float32. The K axis is split over
``splits`` programs per 64 rows, whose partial sums XLA adds.

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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..qarray import QArray, int4_view

ROWS = 64  # rows of W per program: one warpgroup's WGMMA tile
MAX_M = 64  # activation rows: WGMMA's N (a multiple of 8); its float32 accumulators take M / 2 registers a thread
_STEP = 128  # columns of K per pipeline step (inside one scale group)
_PROGRAMS = 528  # about 4 programs per SM of an H100 / H200 (132 SMs)


def default_splits(n: int, k: int, tk: int, programs: int = _PROGRAMS) -> int:
    """The most K splits (a power of two, each a whole number of steps) that keep the programs
    ``n / 64 * splits`` at most ``programs``: a decode-sized product still fills the GPU."""
    splits = 1
    while n // ROWS * splits * 2 <= programs and k % (splits * 2 * tk) == 0:
        splits *= 2
    return splits


def _step_and_group(q: QArray) -> tuple[int, int]:
    """``(tk, group)``: the columns per pipeline step and per scale group (all of K for one scale a row)."""
    k = q.shape[1]
    group = q.spec.group_size or k
    return (_STEP if group % _STEP == 0 else group), group


def _check(x, q: QArray, splits: int, tk: int, group: int) -> None:
    def bad(why):
        return ValueError(f"matmul_nt: {why} (x of shape {x.shape} and dtype {x.dtype}, q of shape {q.shape}, "
                          f"spec {q.spec}, splits={splits})")

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
    if n % ROWS:
        raise bad(f"q's rows must be a multiple of {ROWS}")
    if tk % 64 or k % (splits * tk) or group % tk:  # 32 bytes a tile row at least: TMA's narrowest swizzle
        raise bad(f"K must split into {splits} whole steps of {tk} columns inside groups of {group} "
                  f"(a multiple of 64)")


def matmul_nt(x, q: QArray, *, splits: int | None = None, stages: int = 4, interpret: bool = False) -> jax.Array:
    """``x @ dequantize(q).T`` in float32 for ``x`` ``(M, K)`` bf16 and ``q`` ``(N, K)`` int4 scaled along K.

    ``splits``: programs per 64 rows of ``q`` along K (default :func:`default_splits`); ``stages``: pipeline
    steps in flight (TMA copies issued ahead of the compute); ``interpret``: run in Mosaic GPU's interpreter
    (any machine, for tests). Needs ``M <= 64``, ``N`` a multiple of 64 and ``K`` a multiple of
    ``splits`` steps of 128 columns (or of the group, for groups of 64).
    """
    tk, group = _step_and_group(q)
    splits = splits or default_splits(q.shape[0], q.shape[1], tk)
    _check(x, q, splits, tk, group)
    return _matmul_nt(x, int4_view(q.packed, True).reshape(q.shape), q.scale, tk=tk, group=group, splits=splits,
                      stages=stages, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("tk", "group", "splits", "stages", "interpret"))
def _matmul_nt(x, codes, scale, *, tk: int, group: int, splits: int, stages: int, interpret: bool):
    (m, k), n = x.shape, codes.shape[0]
    mp = -(-m // 8) * 8
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    scale_t = scale.T.astype(jnp.float32)  # (G, N): a step's scales are one row (a copy per call; free for G = 1)
    k_split = k // splits
    w_swizzle = plgpu.find_swizzle(tk * 4, "codes")  # bits per row of a tile
    x_swizzle = plgpu.find_swizzle(tk * 16, "activations")

    def kernel(w_gmem, x_gmem, s_gmem, o_gmem, o_smem):
        j, split = lax.axis_index("n"), lax.axis_index("split")
        first_group = split * k_split // group

        def step(idx, w_smem, x_smem, s_smem, total):
            a = w_smem[...].astype(jnp.bfloat16)  # (64, tk) codes, exact in bf16
            if interpret:
                part = lax.dot_general(a, x_smem[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                s = s_smem[0]
            else:
                def mma(acc):
                    plgpu.wgmma(acc, a, plgpu.transpose_ref(x_smem, (1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc[...]

                part = pl.run_scoped(mma, plgpu.ACC((ROWS, mp), jnp.float32))
                s = plgpu.load(s_smem, (0, slice(None)), layout=plgpu.Layout.WGMMA.reduce(1))
            return total + part * lax.broadcast_in_dim(s, (ROWS, mp), (0,))

        zeros = jnp.zeros((ROWS, mp), jnp.float32)
        columns = pl.ds(split * k_split, k_split)
        total = plgpu.emit_pipeline(
            step, grid=(k_split // tk,), max_concurrent_steps=stages,
            in_specs=[
                plgpu.BlockSpec((ROWS, tk), lambda i: (0, i), transforms=(
                    plgpu.TilingTransform((8, w_swizzle * 2)), plgpu.SwizzleTransform(w_swizzle))),
                plgpu.BlockSpec((mp, tk), lambda i: (0, i), transforms=(
                    plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))),
                plgpu.BlockSpec((1, ROWS), lambda i: (first_group + i * tk // group, j)),
            ],
            init_carry=zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA),
        )(w_gmem.at[pl.ds(j * ROWS, ROWS), columns], x_gmem.at[:, columns], s_gmem)
        o_smem[...] = total
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, pl.ds(j * ROWS, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    parts = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
        grid=(n // ROWS, splits), grid_names=("n", "split"),
        scratch_types=[plgpu.SMEM((ROWS, mp), jnp.float32)],
        interpret=InterpretGPUParams() if interpret else None,
    )(codes, xp, scale_t)
    return parts.sum(0)[:, :m].T
