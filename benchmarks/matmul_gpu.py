"""int4 matmul on a GPU: every backend checked on the device, the Pallas kernel's tiles swept, and timings
against bf16 x bf16, XLA-native int4 and Qwix, all in one process.

    python benchmarks/matmul_gpu.py --out benchmarks/results/matmul_gpu.json [--budget 300]

Timing: a product is timed inside one jit that runs it over 16 pairs of distinct activations and weights
(16 x 33.5 MB of int4 do not fit the 50 MB L2; no shared operand, so XLA cannot merge the products), every
output reduced so none is dead code. The time per product is the difference between the 16-pair and a
4-pair program, divided by 12: dispatch and the host sync cancel. The GPU is kept busy for 0.3 s before
each measurement so its clocks have ramped up. The reduction (one max per product) stays in, for every
method alike. Each such time (``*_us``) comes with a device time (``*_dev_us``): the 16-pair program run
3 times under ``jax.profiler.trace``, the union of its kernels' intervals on the GPU's stream lines (CUPTI
timestamps), per product. The device time is what the kernel costs; the host difference also holds
launch gaps, and varied by up to 2x between runs of the same configuration.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import quantize_jax as qj
from _timing import machine, median_seconds, print_table, write_json
from quantize_jax.kernels import mosaic_gpu
from quantize_jax.kernels.pallas_gpu import PTX_MAX_M, default_transposed_blocks, dequantize, matmul_transposed
from quantize_jax.matmul import PALLAS_MAX_M, _grid, _pallas_kernel, _w4a8_kernel, fake_int8_tokens

N_PAIRS = 16
# Tied-embedding logits timed by --grad-only (--logits): Llama 3's vocabulary x 4096 features, Gemma 2 2B's x 2304.
LOGITS_SHAPES = ("128256x4096", "256000x2304")
PROFILE_LINES = set()  # the (plane, line) names the device traces held, recorded in the JSON


def device_busy_us(f, args, runs: int = 3) -> tuple[float, dict]:
    """GPU-busy microseconds per call of the jitted ``f(*args)``, from the profiler's device trace: the union
    of the kernel intervals on the GPU planes' stream lines (all lines if none is named ``Stream...``); and
    each kernel's microseconds per call by name (its first 60 characters), the busiest first."""
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(runs):
                jax.block_until_ready(f(*args))
        data = jax.profiler.ProfileData.from_file(str(next(pathlib.Path(d).rglob("*.xplane.pb"))))
    spans, kernels = [], {}
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            lines = list(plane.lines)
            PROFILE_LINES.update((plane.name, line.name) for line in lines)
            lines = [line for line in lines if line.name.startswith("Stream")] or lines
            for e in (e for line in lines for e in line.events):
                spans.append((e.start_ns, e.end_ns))
                kernels[e.name[:60]] = kernels.get(e.name[:60], 0.0) + (e.end_ns - e.start_ns) / runs / 1e3
    if not spans:
        raise RuntimeError("the profile holds no GPU events")
    busy, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > end:
            busy, end = busy + e - max(s, end), e
    return busy / runs / 1e3, dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def per_product_us(fn, xs, ws, few: int = 4) -> tuple[float, float | str | None, dict]:
    """Microseconds per ``fn(x, w)``: host-timed, (time of all pairs - time of the first ``few``) / the
    difference; device-timed (:func:`device_busy_us` of all pairs / their number; None on a CPU, the error
    where the trace failed); and the device time per product of each kernel by name (empty on a CPU).

    Every product has its own activations and weight (``xs[i]``, ``ws[i]``): no two share an operand,
    so XLA cannot merge them into one larger product.
    """

    def program(xs, ws):
        total = jnp.zeros((), jnp.float32)
        for x, w in zip(xs, ws):
            total = total + jnp.max(fn(x, w)).astype(jnp.float32)
        return total

    f = jax.jit(program)
    times = []
    for sub in (few, len(xs)):
        args = (xs[:sub], ws[:sub])
        busy_until = time.perf_counter() + 0.3  # let the clocks ramp up after compiling
        while time.perf_counter() < busy_until:
            jax.block_until_ready(f(*args))
        times.append(median_seconds(f, *args, repeats=21, warmup=1))
    device, kernels = None, {}
    if jax.default_backend() != "cpu":
        try:
            device, kernels = device_busy_us(f, (xs, ws))
            device, kernels = device / len(xs), {k: round(v / len(xs), 2) for k, v in kernels.items()}
        except Exception as e:  # the host-timed number stands without it
            device = f"error: {type(e).__name__}: {str(e)[:200]}"
    return (times[1] - times[0]) / (len(xs) - few) * 1e6, device, kernels


def bf16_dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def reference(x, q, transposed=False, weight_dtype=jnp.float32):
    """``x @ dequantize(q)`` (``transposed``: ``x @ dequantize(q).T``) in float64, the weight rounded to
    ``weight_dtype`` first."""
    w = np.asarray(qj.dequantize(q, weight_dtype), np.float64)
    return np.asarray(x.astype(jnp.float32), np.float64) @ (w.T if transposed else w)


def kernel_fn(**blocks):
    """``x, q -> x @ q`` through the Pallas kernel with the given tiles."""
    interpret = jax.default_backend() == "cpu"  # a dry run of this script on a CPU

    def fn(x, q):
        return _pallas_kernel(x, q, grid=_grid(q), interpret=interpret, **blocks)

    return fn


def measure_error(row: dict, product, ref, log) -> dict:
    """``row`` with ``product()``'s relative error against ``ref()``, or its failure (logged), so one failure
    does not hide the rest."""
    try:
        row["rel_err"] = rel_err(product(), ref())
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(traceback.format_exc())
    return row


def checks(log, formats=("int4", "uint4", "nf4", "fp4"), backends=("pallas", "native", "dequant", "auto"),
           variants=True):
    """Backends against a float64 reference on this device: formats, groups, ragged shapes, dtypes; with
    ``variants``, the kernel's opt-in variants too (GEMV, atomic split-K, the PTX GEMV, the magic decode)."""
    rows = []

    def check(row, product, ref):
        rows.append(measure_error(row, product, ref, log))

    # (24 and 33 rows: auto's 32- and 64-row kernel tiles)
    cases = [(1, 200, 37, 64), (16, 256, 96, 128), (24, 256, 96, 128), (33, 384, 50, None)]
    for fmt in formats:
        for m, k, n, group in cases:
            w = jax.random.normal(jax.random.key(k + n), (k, n))
            q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=group))
            for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
                x = jax.random.normal(jax.random.key(m), (m, k)).astype(dtype)
                ref = reference(x, q)
                for backend in backends:
                    row = dict(fmt=fmt, shape=f"{m}x{k}x{n}", group=group or "channel", dtype=dtype.__name__,
                               backend=backend)
                    check(row, lambda: jax.jit(functools.partial(qj.qdot, backend=backend))(x, q), lambda: ref)
    transposed_checks(check, formats)
    x = jax.random.normal(jax.random.key(7), (16, 512)).astype(jnp.bfloat16)  # W4A8 on the device
    q = qj.quantize(jax.random.normal(jax.random.key(8), (512, 256)), qj.QuantSpec(axis=0, group_size=128))
    row = dict(fmt="int4", shape="16x512x256", group=128, dtype="bfloat16", backend="auto W4A8")
    check(row, lambda: jax.jit(functools.partial(qj.qdot, act_quant="int8"))(x, q),
          lambda: reference(fake_int8_tokens(x.astype(jnp.float32)), q))
    for fmt in formats:  # auto past the kernel's rows: XLA's dot over the weight the Pallas kernel decodes
        q = qj.quantize(jax.random.normal(jax.random.key(11), (384, 96)), qj.QuantSpec(format=fmt, axis=0, group_size=64))
        for dtype in (jnp.float32, jnp.bfloat16):
            x = jax.random.normal(jax.random.key(12), (160, 384)).astype(dtype)
            row = dict(fmt=fmt, shape="160x384x96", group=64, dtype=dtype.__name__, backend="auto dequant")
            check(row, lambda: jax.jit(qj.qdot)(x, q), lambda: reference(x, q))
    x = jax.random.normal(jax.random.key(9), (160, 512)).astype(jnp.bfloat16)  # per channel: XLA's int32 dot
    q = qj.quantize(jax.random.normal(jax.random.key(10), (512, 256)), qj.QuantSpec(axis=0))
    row = dict(fmt="int4", shape="160x512x256", group="channel", dtype="bfloat16", backend="auto W4A8")
    check(row, lambda: jax.jit(functools.partial(qj.qdot, act_quant="int8"))(x, q),
          lambda: reference(fake_int8_tokens(x.astype(jnp.float32)), q))
    if not variants:
        return rows
    q = qj.quantize(jax.random.normal(jax.random.key(5), (512, 256)), qj.QuantSpec(axis=0, group_size=128))
    for m in (1, 4):  # the GEMV variant (no tl.dot)
        x = jax.random.normal(jax.random.key(6), (m, 512)).astype(jnp.bfloat16)
        row = dict(fmt="int4", shape=f"{m}x512x256", group=128, dtype="bfloat16", backend="pallas gemv")
        check(row, lambda: jax.jit(kernel_fn(gemv=True, split_k=2))(x, q), lambda: reference(x, q))
        row = dict(fmt="int4", shape=f"{m}x512x256", group=128, dtype="bfloat16", backend="pallas atomic split-K")
        check(row, lambda: jax.jit(kernel_fn(split_k=4, atomic=True))(x, q), lambda: reference(x, q))
    for fmt in formats:  # the PTX kernel (a GEMV at 1 row, tl.dot at 3) and the magic decode: new to the device
        for m, k, n, group in ((1, 200, 37, 64), (3, 384, 50, None)):
            q = qj.quantize(jax.random.normal(jax.random.key(k + n), (k, n)),
                            qj.QuantSpec(format=fmt, axis=0, group_size=group))
            for dtype in (jnp.float32, jnp.bfloat16):
                x = jax.random.normal(jax.random.key(m), (m, k)).astype(dtype)
                for variant in ("ptx", "magic"):
                    row = dict(fmt=fmt, shape=f"{m}x{k}x{n}", group=group or "channel", dtype=dtype.__name__,
                               backend=f"pallas {variant}")
                    check(row, lambda: jax.jit(kernel_fn(**{variant: True}))(x, q), lambda: reference(x, q))
    return rows


def transposed_fn(**blocks):
    """``g, q -> g @ q.T`` through the transposed kernel (the backward pass's product), bf16 dots unless
    ``blocks`` name a ``dtype``."""
    interpret = jax.default_backend() == "cpu"

    def fn(g, q):
        grid = _grid(q)
        return matmul_transposed(g, q.packed, grid.scale, grid.zero_point, n=q.shape[1], fmt=q.spec.fmt,
                                 group_size=grid.group_rows, interpret=interpret, **{"dtype": jnp.bfloat16, **blocks})

    return fn


def decoded(q, dtype, **blocks):
    """``q`` decoded to ``dtype`` by ``pallas_gpu.dequantize`` with the given tiles (interpreted on a CPU)."""
    grid = _grid(q)
    return dequantize(q.packed, grid.scale, grid.zero_point, n=q.shape[1], fmt=q.spec.fmt, group_size=grid.group_rows,
                      dtype=dtype, interpret=jax.default_backend() == "cpu", **blocks)


def decoded_dot(**blocks):
    """``x, q -> x @ W`` with ``W`` decoded to x's dtype by :func:`decoded`: a candidate for ``dequant``'s
    decoding (XLA's fusion of it took about 90 us at 8192 x 8192)."""
    def fn(x, q):
        return jnp.dot(x, decoded(q, x.dtype, **blocks), preferred_element_type=jnp.float32)

    return fn


# (block_k, block_n, num_warps) of the decoding kernel timed at DECODE_SWEEP_M rows by --decode
DECODE_SWEEP = ((16, 256, 4), (32, 256, 4), (64, 256, 8), (32, 512, 8), (64, 512, 8), (128, 256, 8))
DECODE_M, DECODE_SWEEP_M = (128, 256, 1024), 256


def transposed_checks(check, formats):
    """The transposed kernel (never run on a GPU before session 15) against float64: every format, groups,
    ragged shapes, bf16 and float32 dots; and ``auto``'s gradient through it."""
    for fmt in formats:
        for m, k, n, group in ((1, 200, 37, 64), (24, 256, 96, 128), (70, 384, 50, None)):
            q = qj.quantize(jax.random.normal(jax.random.key(k + n), (k, n)), qj.QuantSpec(format=fmt, axis=0,
                                                                                           group_size=group))
            g = jax.random.normal(jax.random.key(m), (m, n))
            for dtype in (jnp.float32, jnp.bfloat16):
                row = dict(fmt=fmt, shape=f"{m}x{k}x{n}", group=group or "channel", dtype=dtype.__name__,
                           backend="pallas transposed")
                check(row, lambda: jax.jit(transposed_fn(dtype=dtype))(g, q), lambda: reference(g, q, transposed=True))
    q = qj.quantize(jax.random.normal(jax.random.key(11), (512, 256)), qj.QuantSpec(format="uint4", axis=0,
                                                                                    group_size=128))
    x = jax.random.normal(jax.random.key(12), (16, 512)).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(13), (16, 256)).astype(jnp.bfloat16).astype(jnp.float32)  # (y: float32)
    row = dict(fmt="uint4", shape="16x512x256", group=128, dtype="bfloat16", backend="auto grad")
    check(row, lambda: jax.jit(lambda x, g: jax.vjp(lambda x: qj.qdot(x, q), x)[1](g)[0])(x, g),
          lambda: reference(g, q, transposed=True))
    for fmt in formats:  # the decoding kernel: bit for bit qj.dequantize's (rel_err 0), ragged and grouped
        q = qj.quantize(jax.random.normal(jax.random.key(17), (200, 37)), qj.QuantSpec(format=fmt, axis=0,
                                                                                     group_size=64))
        for dtype in (jnp.bfloat16, jnp.float32):
            row = dict(fmt=fmt, shape="200x37", group=64, dtype=dtype.__name__, backend="pallas dequantize")
            check(row, lambda: jax.jit(lambda q: decoded(q, dtype))(q), lambda: qj.dequantize(q, dtype))
    for fmt in formats:  # tied logits over tables scaled per row: the codes' product scaled after the kernel
        table = qj.quantize(jax.random.normal(jax.random.key(14), (300, 200)), qj.QuantSpec(format=fmt, axis=1))
        x = jax.random.normal(jax.random.key(15), (5, 200)).astype(jnp.bfloat16)
        for backend in ("pallas", "auto"):
            row = dict(fmt=fmt, shape="5x200 @ (300x200).T", group="row", dtype="bfloat16", backend=f"{backend} logits")
            check(row, lambda: jax.jit(lambda x, e: qj.qeinsum("md,vd->mv", x, e, backend=backend))(x, table),
                  lambda: reference(x, table, transposed=True))
            c = jax.random.normal(jax.random.key(16), (5, 300)).astype(jnp.bfloat16)  # the backward pass c @ table
            row = dict(row, backend=f"{backend} logits grad")
            check(row, lambda: jax.jit(logits_backward(
                lambda x, e: qj.qeinsum("md,vd->mv", x, e, backend=backend)))(c, table), lambda: reference(c, table))


def kernel_fn_w4a8(x, q):
    """W4A8 through the Pallas kernel whatever M (``auto`` takes XLA's int32 dot per channel past
    ``PALLAS_MAX_M`` rows)."""
    return _w4a8_kernel(x, q, grid=_grid(q), interpret=jax.default_backend() == "cpu")


def compiled_program(fn, x, q) -> str:
    """The optimized HLO of ``fn(x, q)`` under jit: which kernels run (for the PTX kernel: that nothing
    but the kernel reads the packed weight, no copy or conversion of it before the call)."""
    return jax.jit(fn).lower(x, q).compile().as_text()


def sweep_configs(m: int, k: int):
    """Tiles to try, the likeliest first (the sweep stops when its share of the budget is spent); every
    entry names ``ptx`` and ``gemv``, whose defaults depend on M.

    Session 14's first H200 run (``benchmarks/results/matmul_gpu_h200_s14_run1_sweep.json``, the sweep of
    this function's previous version) tried the byte kernel with the magic decode, the PTX GEMV and the
    PTX dot at M = 1, 16 and 64; the PTX dot was fastest at each (23.0, 22.8 and 36.3 us, device time;
    the byte kernel's best 32.3 / 32.4 / 46.9, the PTX GEMV's 26.1). Its tiles (256 columns, 128-row K
    blocks, 8 splits of 1024 rows; 64 x 128 and 4 splits at M = 64) became the defaults. This sweep varies
    the PTX dot around them (widths, warps, stages, rows per split) and past 64 rows tries it on 128-row
    tiles."""

    def entry(bm, bn, bk, warps, stages, rows_per_split):
        return dict(ptx=True, gemv=False, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                    split_k=max(1, k // rows_per_split))

    if m <= 16:
        tiles = [(256, 128, 4, 3, 1024), (256, 128, 8, 3, 1024), (128, 128, 4, 3, 1024), (128, 128, 4, 3, 512),
                 (256, 128, 4, 2, 1024), (256, 256, 8, 3, 2048), (512, 128, 8, 3, 1024), (256, 64, 4, 4, 512),
                 (128, 64, 4, 4, 512), (256, 128, 4, 5, 1024)]
        return [entry(16, *t) for t in tiles]
    if m <= 64:
        bm = 32 if m <= 32 else 64
        tiles = [(128, 128, 4, 3, 2048), (128, 128, 8, 3, 2048), (128, 64, 4, 4, 2048), (128, 128, 4, 4, 2048),
                 (128, 128, 4, 3, 1024), (64, 128, 4, 3, 4096), (256, 128, 8, 3, 4096)]
        return [entry(bm, *t) for t in tiles]
    if m <= 128:
        return [entry(*t) for t in ((64, 128, 128, 4, 3, 4096), (128, 128, 64, 8, 3, 4096), (64, 128, 128, 4, 3, 2048),
                                    (128, 128, 128, 8, 3, 4096), (128, 128, 64, 8, 3, 2048), (128, 128, 64, 8, 4, 8192),
                                    (64, 128, 128, 8, 3, 4096))]
    return [entry(*t) for t in ((128, 128, 64, 8, 3, k), (128, 128, 64, 8, 4, k), (64, 128, 128, 4, 3, k))]


def transposed_sweep_configs(m: int, k: int):
    """Tiles of the transposed kernel to try (never timed before session 15), around its defaults
    (``pallas_gpu.default_transposed_blocks``): widths, column splits, warps, stages, and smaller row tiles."""
    bm = default_transposed_blocks(m, k, k, 128, per_group=True)["block_m"]
    tiles = [(bm, 256, 4, None, None), (bm, 256, 8, None, None), (bm, 256, 2, None, None), (bm, 128, 4, None, None),
             (bm, 512, 4, 8, None), (bm, 256, 4, 8, None), (bm, 256, 4, None, 2), (bm, 256, 4, None, 4)]
    if bm > 16:
        tiles += [(bm // 2, 256, 4, None, None), (16, 256, 4, None, None)]
    return [dict(block_m=b, block_n=bn, split_n=split, num_warps=warps, num_stages=stages)
            for b, bn, split, warps, stages in tiles]


def load_probe(block_n, block_k, split_k, num_warps=None, num_stages=None, fold_rows=False, integers=False):
    """A diagnostic Pallas kernel with the kernel's grid and loads but no decode or dot: it only sums the
    packed bytes (into a ``(block_k, block_n / 2)`` accumulator, or with ``fold_rows`` into one row per
    step, which keeps wide tiles in registers). Its time bounds what this grid and load pattern reach.
    The byte probes convert every byte to float32 (one ``I2F`` each), so they also pay for that; with
    ``integers`` the bytes are widened to uint32 and added as integers (one extraction and one ``IADD``
    per byte, reduced once at the end): closer to a pure load."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    def fn(x, q):
        kk, nh = q.packed.shape
        width = block_n // 2  # the tile's bytes per row
        nk = kk // split_k // block_k

        def kernel(p_ref, o_ref):
            def body(i, acc):
                tile = p_ref[pl.ds(i * block_k, block_k), :]
                if integers:
                    return acc + tile.astype(jnp.uint32)
                tile = tile.astype(jnp.float32)
                return acc + (jnp.sum(tile, axis=0, keepdims=True) if fold_rows else tile)

            rows = 1 if fold_rows and not integers else block_k
            acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((rows, width), jnp.uint32 if integers else jnp.float32))
            o_ref[...] = jnp.sum(acc, axis=0, keepdims=True).astype(jnp.float32)

        out = pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((split_k, 1, nh), jnp.float32), grid=(nh // width, split_k),
            in_specs=[pl.BlockSpec((kk // split_k, width), lambda j, s: (s, j))],
            out_specs=pl.BlockSpec((None, 1, width), lambda j, s: (s, 0, j)),
            compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            name="load_probe", interpret=jax.default_backend() == "cpu",
        )(q.packed)
        return out.sum(0) + x[:, :1].astype(jnp.float32)

    return fn


def tma_probe(block_rows, block_k, splits, stages, specialized=False):
    """A diagnostic Mosaic GPU kernel with :func:`mosaic_gpu.matmul_nt`'s grid and TMA pipeline over the
    ``(N, K)`` codes but an empty body: no register loads, no WGMMA, no scales, only each step's copy waited
    for. Its time bounds what that pipeline streams. ``specialized``: a warpgroup of its own issues the
    copies (``plgpu.emit_pipeline_warp_specialized``, as Hopper GEMMs do) while another takes the steps,
    instead of one warpgroup issuing each copy between its steps."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def fn(x, q):
        codes = q.as_int4()
        n, k = codes.shape
        k_split = k // splits
        swizzle = plgpu.find_swizzle(min(block_k, 128) * 4, "codes")  # matmul_nt's: a WGMMA part's 128 columns
        spec = plgpu.BlockSpec((block_rows, block_k), lambda i: (0, i),
                               transforms=(plgpu.TilingTransform((8, swizzle * 2)), plgpu.SwizzleTransform(swizzle)))
        steps = dict(grid=(k_split // block_k,), max_concurrent_steps=stages, in_specs=[spec])

        def kernel(w_gmem, o_gmem, o_smem):
            j, split = jax.lax.axis_index("n"), jax.lax.axis_index("split")
            w = w_gmem.at[pl.ds(j * block_rows, block_rows), pl.ds(split * k_split, k_split)]
            if specialized:
                plgpu.emit_pipeline_warp_specialized(lambda idx, w_smem: None, memory_registers=40, wg_axis="wg",
                                                     num_compute_wgs=1, **steps)(w)
            else:
                plgpu.emit_pipeline(lambda idx, w_smem: None, **steps)(w)

            @pl.when(jax.lax.axis_index("wg") == 0 if specialized else True)
            def _():
                o_smem[...] = jnp.zeros((block_rows, 8), jnp.float32)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, pl.ds(j * block_rows, block_rows)])
                plgpu.wait_smem_to_gmem(0)

        parts = plgpu.kernel(
            kernel, out_type=jax.ShapeDtypeStruct((splits, n, 8), jnp.float32), grid=(n // block_rows, splits),
            grid_names=("n", "split"), scratch_types=[plgpu.SMEM((block_rows, 8), jnp.float32)],
            interpret=mosaic_gpu._interpreter() if jax.default_backend() == "cpu" else None,
            **(dict(num_threads=2, thread_name="wg") if specialized else {}),
        )(codes)
        return parts.sum(0)[:, :1].T + x[:, :1].astype(jnp.float32)

    return fn


# --probes-only, the TMA pipelines: (block_rows, block_k, splits, stages); each also warp-specialized. The
# first is matmul_nt's default at K = N = 8192, the second its best tile in session 19's sweep
TMA_PROBES = [(64, 128, 4, 4), (128, 256, 8, 2), (64, 128, 8, 4), (128, 256, 8, 4), (64, 256, 8, 4),
              (128, 512, 8, 3), (256, 256, 8, 4), (128, 256, 4, 6)]


# load patterns to learn which reaches the card's bandwidth (--probes-only): (block_n, block_k, split_k,
# num_warps, num_stages, fold_rows); the first is the kernel's own pattern of the sweeps
PROBES = [(128, 128, 16, None, None, False), (128, 128, 16, None, None, True), (256, 128, 16, None, None, True),
          (512, 128, 16, None, None, True), (512, 64, 32, None, None, True), (1024, 64, 16, 8, None, True),
          (256, 256, 8, None, None, True), (512, 256, 8, 8, None, True), (256, 128, 32, None, None, True),
          (512, 128, 8, 8, None, True), (256, 128, 16, None, 4, True), (512, 128, 16, 8, 3, True),
          (1024, 32, 32, 8, 4, True), (2048, 32, 16, 8, 3, True)]
# the same with the bytes added as integers (no per-byte conversion): (block_n, block_k, split_k, num_warps)
INTEGER_PROBES = [(256, 16, 16, None), (512, 16, 16, 8), (256, 64, 16, None), (512, 64, 32, None),
                  (1024, 32, 16, 8), (256, 128, 16, None), (512, 128, 8, 8), (2048, 16, 16, 8)]


# --tma: the Mosaic GPU kernels x @ W (exact, and with the scales in the decoded weight: "scaled") and x @ W.T
# checked on the device at (M, K, N, group, options), then timed at K = N = --kn against bf16 x @ W and auto over
# the same 4-bit bytes, their tiles swept. The kernels: name -> (function, weight stored transposed, most rows)
TMA_KERNELS = {"tma": (mosaic_gpu.matmul, False, mosaic_gpu.MAX_M),
               "tma_scaled": (functools.partial(mosaic_gpu.matmul, exact=False), False, mosaic_gpu.MAX_M_SCALED),
               "tma_nt": (mosaic_gpu.matmul_nt, True, mosaic_gpu.MAX_M),
               "tma_nt_ws": (functools.partial(mosaic_gpu.matmul_nt, specialized=True), True, mosaic_gpu.MAX_M)}
TMA_CHECKS = [(1, 8192, 8192, 128, {}), (16, 4096, 1024, 128, dict(splits=2)), (5, 2048, 256, None, {}),
              (64, 1024, 512, 64, dict(stages=2)), (33, 4096, 4096, 256, dict(splits=8, stages=6)),
              (16, 8192, 1024, 128, dict(block_rows=128, block_k=256, stages=3)),
              (2, 4096, 512, 64, dict(block_rows=128, block_k=256)),
              (200, 4096, 1024, 128, {}), (256, 2048, 512, None, {}), (96, 1024, 512, 64, dict(block_k=256)),
              (3, 2304, 512, 128, {}), (7, 576, 256, 64, dict(block_k=192, splits=3))]  # (matmul_nt: G = 18, 9)
# (block_rows, block_k, splits, stages) swept at --sweep-m (default: every --m): 4-32 KB of codes a step
TMA_SWEEP = [dict(block_rows=r, block_k=bk, splits=sp, stages=st) for r, bk, sp, st in (
    (64, 128, 2, 4), (64, 128, 4, 4), (64, 128, 8, 4), (64, 128, 4, 2), (64, 128, 4, 6), (64, 256, 8, 4),
    (64, 512, 8, 3), (128, 256, 4, 4), (128, 256, 8, 4), (128, 256, 16, 4), (128, 256, 8, 2), (128, 256, 8, 6),
    (128, 512, 4, 3), (128, 512, 8, 3), (128, 512, 16, 3))]


def tma_run(args, result, timed, log, start, qs, bfs):
    """``--tma``: the Mosaic GPU kernels (TMA copies, WGMMA) checked on the device against float64 (the
    scaled one over groups against the weight rounded to bf16, as it rounds it), then timed per M against
    bf16 x bf16 and ``auto`` (over ``bfs``, ``qs``): :func:`mosaic_gpu.matmul` over the same stored weights
    ``qs`` (``tma_``: exact, up to 64 rows; ``tma_scaled_``: up to 256), and :func:`mosaic_gpu.matmul_nt`
    over ``W.T`` quantized along K in groups of 128 (``tma_nt_``): the same bytes and work, the codes upcast
    in registers instead of decoded through shared memory, and warp-specialized (``tma_nt_ws_``: a warpgroup
    issuing the copies, one computing per 64 columns). Their tiles are swept (:data:`TMA_SWEEP`) at
    ``--sweep-m``, each entry timed once it matched the reference; then the tied logits ``x @ E.T`` at
    ``--logits`` shapes over tables scaled per row or in groups of 128 along ``d``: bf16, ``auto`` and
    :func:`mosaic_gpu.matmul_nt` (both pipelines). A kernel with a failing or erring check is not timed. On
    a CPU (a dry run) the kernels run interpreted, and checks of over 2**20 weights are left out."""
    interpret = jax.default_backend() == "cpu"
    kernels = {name: functools.partial(fn, interpret=interpret) for name, (fn, _, _) in TMA_KERNELS.items()}

    def ref(name, x, q):  # float64; the scaled kernel's grouped weight rounded to bf16, as it rounds it
        rounded = jnp.bfloat16 if name == "tma_scaled" and q.scale.shape[0] > 1 else jnp.float32
        return reference(x, q, TMA_KERNELS[name][1], rounded)

    def error(entry, kernel, x, q, expected, **options):  # ``entry`` with the kernel's relative error
        return measure_error(entry, lambda: kernel(x, q, **options), lambda: expected, log)

    checked = []
    for name, kernel in kernels.items():
        transposed, most = TMA_KERNELS[name][1:]
        for m, k, n, group, options in TMA_CHECKS:
            if (interpret and k * n > 2**20) or m > most:
                continue
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            w = jax.random.normal(jax.random.key(k + n), (n, k))
            q = qj.quantize(w if transposed else w.T, qj.QuantSpec(axis=1 if transposed else 0, group_size=group))
            entry = {"kernel": name, "M": m, "K": k, "N": n, "group": group, **options}
            checked.append(error(entry, kernel, x, q, ref(name, x, q), **options))
            print(" ", checked[-1], flush=True)
    rows, sweep = [], []
    save = lambda: write_json(args.out, dict(result, tma_checks=checked, tma=rows, tma_sweep=sweep))  # noqa: E731
    save()
    failed = {e["kernel"] for e in checked if "error" in e or e["rel_err"] > 1e-5}
    kernels = {name: kernel for name, kernel in kernels.items() if name not in failed}
    if failed:
        print(f"tma: checks failed for {sorted(failed)}: not timed", flush=True)
    if not kernels:
        return
    k = n = args.kn
    transposed_ws = make_weights(n, k, qj.QuantSpec(axis=1, group_size=128))[0]  # W.T: (N, K)
    for m in [m for m in args.m if m <= mosaic_gpu.MAX_M_SCALED]:
        xs = activations(m, k)
        row = {"M": m, **timed(bf16_dot, xs, bfs, "bf16_"), **timed(lambda x, q: qj.qdot(x, q), xs, qs, "auto_")}
        fits = {name: kernel for name, kernel in kernels.items() if m <= TMA_KERNELS[name][2]}
        for name, kernel in fits.items():
            row.update(timed(kernel, xs, transposed_ws if TMA_KERNELS[name][1] else qs, f"{name}_"))
        add_speedups(row, "bf16")
        rows.append(row)
        print(row, flush=True)
        for name, kernel in fits.items():  # (tiles over the shared memory err, as recorded)
            ws = transposed_ws if TMA_KERNELS[name][1] else qs
            swept = TMA_SWEEP if not args.no_sweep and m in (args.sweep_m or args.m) else ()
            expected = ref(name, xs[0], ws[0]) if swept else None
            for options in swept:
                if time.time() - start > args.budget:
                    log(f"budget: tma sweep stopped at {name}, M={m} before {options}")
                    break
                entry = error({"kernel": name, "M": m, **options}, kernel, xs[0], ws[0], expected, **options)
                if entry.get("rel_err", 1.0) < 1e-5:  # timed only once it matches the reference
                    entry.update(timed(functools.partial(kernel, **options), xs, ws))
                sweep.append(entry)
                print(" ", entry, flush=True)
            save()
    print_table(rows, columns(rows))
    logits = []
    for vocab, d in (map(int, s.split("x")) for s in args.logits):  # tied logits x @ E.T, E per row or grouped
        for group in (None, 128):
            if time.time() - start > args.budget:
                log(f"budget: tma logits stopped before {vocab} x {d}, group {group}")
                break
            tables, bf_tables = make_weights(vocab, d, qj.QuantSpec(axis=1, group_size=group), count=4)
            for m in [m for m in args.m if m <= mosaic_gpu.MAX_M]:
                xs = activations(m, d, count=4)
                row = {"V": vocab, "d": d, "M": m, "group": group or "row",
                       **timed(lambda x, e: jax.lax.dot_general(x, e, (((1,), (1,)), ((), ())),
                                                                preferred_element_type=jnp.float32),
                               xs, bf_tables, "bf16_", few=2),
                       **timed(lambda x, e: qj.qeinsum("md,vd->mv", x, e), xs, tables, "auto_", few=2)}
                for name in ("tma_nt", "tma_nt_ws"):
                    if name in kernels:
                        row.update(timed(kernels[name], xs, tables, f"{name}_", few=2))
                add_speedups(row, "bf16")
                logits.append(row)
                print(row, flush=True)
                write_json(args.out, dict(result, tma_checks=checked, tma=rows, tma_sweep=sweep, tma_logits=logits))
            del tables, bf_tables
    if logits:
        print_table(logits, columns(logits))


def make_weights(k, n, spec, count=N_PAIRS):
    quantize = jax.jit(functools.partial(qj.quantize, spec=spec))
    qs, bfs = [], []
    for i in range(count):
        w = jax.random.normal(jax.random.key(i), (k, n), jnp.float32)
        qs.append(quantize(w))
        bfs.append(w.astype(jnp.bfloat16))
    return qs, bfs


def add_speedups(row: dict, base: str) -> None:
    """Each timed column's speed-up over ``base``'s, host time over host time (``*_x_faster``) and device
    time over device time (``*_x_faster_dev``)."""
    for key in [c for c in row if c.endswith("_us") and not c.startswith(base + "_") and isinstance(row[c], float)]:
        suffix = "_dev_us" if key.endswith("_dev_us") else "_us"
        if isinstance(row.get(base + suffix), float):
            name = key.removesuffix(suffix) + ("_x_faster_dev" if suffix == "_dev_us" else "_x_faster")
            row[name] = round(row[base + suffix] / row[key], 2)


def grad_x(f, x):
    """The gradient of ``f`` at ``x`` for the cotangent ``x`` itself (square weights): the backward product
    alone, with a cotangent XLA cannot fold (a gradient of a sum would be a dot with ones)."""
    y, pullback = jax.vjp(f, x)
    return pullback(x.astype(y.dtype))[0]


def logits_backward(product):
    """``c, e -> c @ e``: the tied logits' backward pass at the cotangent ``c`` of shape ``(M, vocab)`` (its
    primal, ``c``'s first ``d`` columns, is not needed by it)."""
    def fn(c, e):
        _, pullback = jax.vjp(lambda x: product(x, e), c[:, : e.shape[1]])
        return pullback(c.astype(jnp.float32))[0]

    return fn


def columns(rows: list[dict]) -> list:
    """Every row's keys, in order of first use (not the per-kernel breakdowns: the JSON has them)."""
    return list(dict.fromkeys(c for row in rows for c in row if not c.endswith("kernels")))


def activations(m, k, count=N_PAIRS):
    return [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16) for i in range(count)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kn", type=int, default=8192)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 1024])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run; the sweep stops early")
    ap.add_argument("--quick-checks", action="store_true",
                    help="check the pallas backend's default tiles only (and W4A8), not the other backends or variants")
    ap.add_argument("--lean", action="store_true",
                    help="time bf16, auto, the kernels and W4A8 only (not native, dequant below 64 rows, Qwix, "
                         "the magic decode, the gradients or per-channel W4A8)")
    ap.add_argument("--probes-only", action="store_true",
                    help="time bf16, matmul_nt, the TMA pipeline probes (TMA_PROBES) and the Triton load probes "
                         "(INTEGER_PROBES, PROBES) at M = 1")
    ap.add_argument("--grad-only", action="store_true",
                    help="time the backward pass g @ W.T at every --m (bf16's, auto's, the decoded product's, the "
                         "transposed kernel's tiles)")
    ap.add_argument("--logits", nargs="*", default=list(LOGITS_SHAPES), metavar="VOCABxFEATURES",
                    help="--grad-only also times the tied logits x @ E.T over per-row int4 tables of these shapes; "
                         "--tma over tables per row and in groups of 128 along d, with matmul_nt too")
    ap.add_argument("--decode", action="store_true",
                    help=f"--grad-only also times dequant's decoding by XLA against pallas_gpu.dequantize at M = "
                         f"{DECODE_M} (its tiles swept at {DECODE_SWEEP_M})")
    ap.add_argument("--tma", action="store_true",
                    help="check and time the Mosaic GPU kernels (TMA, WGMMA) over W and W.T at every --m up to 256 "
                         "rows (the exact ones up to 64)")
    ap.add_argument("--kernels", action="store_true",
                    help="record each timing's device time per product by kernel (the JSON's *_kernels)")
    ap.add_argument("--no-checks", action="store_true", help="time only (the kernel was checked on the device)")
    ap.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    ap.add_argument("--sweep-m", type=int, nargs="*", help="the rows whose tiles are swept (default: every --m)")
    ap.add_argument("--no-llama", action="store_true", help="skip the Llama-like shapes")
    ap.add_argument("--out", default="benchmarks/results/matmul_gpu.json")
    args = ap.parse_args()
    start = time.time()
    log_path = args.out.replace(".json", ".log")
    log_file = open(log_path, "w")

    def log(text):
        log_file.write(text + "\n")
        log_file.flush()

    result = {"machine": machine(), "group_size": 128, "timing": __doc__.split("Timing: ", 1)[1].strip()}
    print(result["machine"], flush=True)
    quick = dict(backends=("pallas",), variants=False) if args.quick_checks else {}
    result["checks"] = [] if args.no_checks or args.tma else checks(log, **quick)

    # (the scaled weight, or g * s, rounded to bf16)
    rounded = ("dequant", "auto dequant", "pallas transposed", "auto grad", "pallas logits grad", "auto logits grad")
    bad = [r for r in result["checks"] if "error" in r
           or r["rel_err"] > (5e-3 if r["backend"] in rounded and r["dtype"] == "bfloat16" else 2e-3)]
    print(f"checks: {len(result['checks'])} cases, {len(bad)} failing ({time.time() - start:.0f} s)", flush=True)
    for r in bad:
        print("  FAIL", r, flush=True)
    write_json(args.out, result)

    def timed(fn, xs, ws, name="", few=4) -> dict:
        """``{name_us: host-timed, name_dev_us: device-timed}`` per product (or the error)."""
        try:
            host, device, kernels = per_product_us(fn, xs, ws, few)
            device = round(device, 1) if isinstance(device, float) else device
            return {f"{name}us": round(host, 1), f"{name}dev_us": device,
                    **({f"{name}kernels": kernels} if args.kernels and kernels else {})}
        except Exception as e:
            log(traceback.format_exc())
            return {f"{name}us": f"error: {type(e).__name__}: {str(e)[:200]}"}

    def tiles_of(entry):  # a sweep entry's kernel arguments
        return {a: v for a, v in entry.items() if a not in ("M", "us", "dev_us", "rel_err")}

    def fastest(entry):  # the device time where there is one
        return entry.get("dev_us") if isinstance(entry.get("dev_us"), float) else entry.get("us")

    k = n = args.kn
    spec = qj.QuantSpec(axis=0, group_size=128)
    qs, bfs = make_weights(k, n, spec)
    if args.tma:
        return tma_run(args, result, timed, log, start, qs, bfs)
    if args.probes_only:
        xs = activations(1, k)
        probes = [{"bf16": True, **timed(bf16_dot, xs, bfs)}]
        patterns = [dict(block_n=bn, block_k=bk, split_k=split, num_warps=warps, integers=True)
                    for bn, bk, split, warps in INTEGER_PROBES]
        patterns += [dict(block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages, fold_rows=fold)
                     for bn, bk, split, warps, stages, fold in PROBES]
        nt_ws = make_weights(n, k, qj.QuantSpec(axis=1, group_size=128))[0]  # matmul_nt's layout, (N, K)
        row_ws = make_weights(n, k, qj.QuantSpec(axis=1))[0]
        for name, ws in (("matmul_nt", nt_ws), ("matmul_nt_per_row", row_ws)):  # the kernels the TMA probes bound
            probes.append({name: True, **timed(mosaic_gpu.matmul_nt, xs, ws)})
            print(" ", probes[-1], flush=True)
        for (rows, bk, splits, stages), specialized in itertools.product(TMA_PROBES, (False, True)):
            entry = dict(tma=True, block_rows=rows, block_k=bk, splits=splits, stages=stages, specialized=specialized)
            entry.update(timed(tma_probe(rows, bk, splits, stages, specialized), xs, nt_ws))
            entry["dev_TB_per_s"] = round(k * n / 2 / entry["dev_us"] / 1e6, 2) if isinstance(
                entry.get("dev_us"), float) else None
            probes.append(entry)
            print(" ", entry, flush=True)
            write_json(args.out, dict(result, probes=probes, profile_lines=sorted(PROFILE_LINES)))
        for entry in patterns:
            entry.update(timed(load_probe(**entry), xs, qs))
            entry["dev_TB_per_s"] = round(k * n / 2 / entry["dev_us"] / 1e6, 2) if isinstance(
                entry.get("dev_us"), float) else None
            probes.append(entry)
            print(" ", entry, flush=True)
        write_json(args.out, dict(result, probes=probes, profile_lines=sorted(PROFILE_LINES)))
        return
    if args.grad_only:
        parts = {"grads": [], "grad_sweep": [], "decode": [], "decode_sweep": [], "logits": []}  # the JSON's lists
        grads, grad_sweep, decode, decode_sweep, logits = parts.values()

        def save():
            write_json(args.out, dict(result, **parts, profile_lines=sorted(PROFILE_LINES)))

        def record(rows, row, base):  # a timed row, with its speed-ups over ``base``, printed and saved
            add_speedups(row, base)
            rows.append(row)
            print(row, flush=True)
            save()

        for i, m in enumerate(args.m):
            sweep_until = start + args.budget * (0.25 + 0.7 * (i + 1) / len(args.m))
            gs = activations(m, n)  # the cotangents (M, N); K = N
            row = {"M": m, **timed(lambda x, w: grad_x(lambda x: bf16_dot(x, w), x), gs, bfs, "grad_bf16_")}
            row.update(timed(lambda x, q: grad_x(lambda x: qj.qdot(x, q), x), gs, qs, "grad_auto_"))
            # the decoded product's transpose: auto's backward before session 15, and past its bound
            row.update(timed(lambda x, q: grad_x(lambda x: qj.qdot(x, q, backend="dequant"), x), gs, qs,
                             "grad_decoded_"))
            row.update(timed(transposed_fn(), gs, qs, "transposed_default_"))
            for blocks in transposed_sweep_configs(m, k) if not args.no_sweep else ():
                if time.time() > sweep_until:
                    log(f"budget: sweep stopped at M={m} before {blocks}")
                    break
                entry = {"M": m, **blocks}
                entry["rel_err"] = rel_err(jax.jit(transposed_fn(**blocks))(gs[0], qs[0]),
                                           reference(gs[0], qs[0], transposed=True))
                entry.update(timed(transposed_fn(**blocks), gs, qs))
                grad_sweep.append(entry)
                print(" ", entry, flush=True)
            record(grads, row, "grad_bf16")
        for m in DECODE_M if args.decode else ():  # dequant's decoding by XLA against the Pallas kernel
            if time.time() - start > args.budget:
                log(f"budget: decode stopped before M={m}")
                break
            xs = activations(m, k)
            row = {"M": m, **timed(bf16_dot, xs, bfs, "bf16_")}
            row.update(timed(lambda x, q: qj.qdot(x, q, backend="dequant"), xs, qs, "dequant_"))
            row.update(timed(decoded_dot(), xs, qs, "dequant_pallas_"))
            for bk, bn, warps in DECODE_SWEEP if m == DECODE_SWEEP_M and not args.no_sweep else ():
                entry = {"M": m, "block_k": bk, "block_n": bn, "num_warps": warps,
                         **timed(decoded_dot(block_k=bk, block_n=bn, num_warps=warps), xs, qs)}
                decode_sweep.append(entry)
                print(" ", entry, flush=True)
            record(decode, row, "bf16")
        del qs, bfs
        for vocab, d in (map(int, s.split("x")) for s in args.logits):  # tied logits x @ E.T over per-row int4 tables, 4 of each (none fits the L2)
            if time.time() - start > args.budget:
                log(f"budget: logits stopped before {vocab} x {d}")
                break
            tables, bf_tables = make_weights(vocab, d, qj.QuantSpec(axis=1), count=4)
            products = {"bf16": lambda x, e: jax.lax.dot_general(x, e, (((1,), (1,)), ((), ())),
                                                                 preferred_element_type=jnp.float32),
                        # auto: the transposed kernel up to PALLAS_TRANSPOSED_MAX_M rows; dequant: auto before
                        **{b: functools.partial(lambda x, e, b: qj.qeinsum("md,vd->mv", x, e, backend=b), b=b)
                           for b in ("auto", "dequant")}}
            for m in [m for m in args.m if m <= 128]:
                for direction, inputs in (("forward", activations(m, d, count=4)),
                                          ("backward", activations(m, vocab, count=4) if m <= 64 else None)):
                    if inputs is None:
                        continue
                    row = {"V": vocab, "d": d, "M": m, "pass": direction}
                    for name, product in products.items():
                        fn = product if direction == "forward" else logits_backward(product)
                        row.update(timed(fn, inputs, bf_tables if name == "bf16" else tables, f"{name}_", few=2))
                    record(logits, row, "bf16")
            del tables, bf_tables
        for rows in (grads, decode, logits):
            if rows:
                print_table(rows, columns(rows))
        print(f"total {time.time() - start:.0f} s", flush=True)
        return
    qwix_ws = None  # (--lean: no Qwix column)
    if not args.lean:
        try:  # Qwix's int4 weights, quantized once for every M
            import qwix

            qwix_ws = [jax.jit(lambda w: qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}))(w)
                       for w in bfs]
        except Exception as e:
            qwix_ws = f"unavailable: {type(e).__name__}"
    table, sweep, best = [], [], {}
    for i, m in enumerate(args.m):
        sweep_until = start + args.budget * (0.25 + 0.55 * (i + 1) / len(args.m))
        xs = activations(m, k)
        row = {"M": m, **timed(bf16_dot, xs, bfs, "bf16_")}
        ref = reference(xs[0], qs[0])
        if args.lean:  # (auto is the kernel up to PALLAS_MAX_M rows)
            backends = ("auto",) + (("dequant",) if m >= 64 else ()) + (("pallas",) if m > PALLAS_MAX_M else ())
        else:
            backends = ("native", "dequant", "auto", "pallas")
        for backend in backends:
            row.update(timed(lambda x, q, b=backend: qj.qdot(x, q, backend=b), xs, qs, f"{backend}_"))
        if m <= PALLAS_MAX_M:  # the byte kernel's default tiles: auto's kernel up to session 13
            row.update(timed(kernel_fn(ptx=False), xs, qs, "pallas_bytes_"))
        if not args.lean:
            row.update(timed(kernel_fn(magic=True), xs, qs, "pallas_magic_"))  # default tiles, magic decode
        if m > 128 and not args.lean:  # dequant's values through the public dequantize: no int4 bitcast or barrier
            row.update(timed(lambda x, q: jnp.dot(x, qj.dequantize(q, x.dtype), preferred_element_type=jnp.float32),
                             xs, qs, "dequant_shifts_"))
        if m <= PALLAS_MAX_M and (m > PTX_MAX_M or not args.lean):  # the PTX dot's default tiles (the kernel's below)
            row.update(timed(kernel_fn(ptx=True), xs, qs, "pallas_ptx_"))
        if m == 1:
            pathlib.Path(args.out).with_suffix(".ptx_hlo.txt").write_text(
                compiled_program(kernel_fn(ptx=True), xs[0], qs[0]))
        row.update(timed(lambda x, q: qj.qdot(x, q, act_quant="int8"), xs, qs, "w4a8_auto_"))
        if m > 128 and not args.lean:  # per channel W4A8: the kernel against one int8 x int8 -> int32 dot in XLA
            qs_channel = make_weights(k, n, qj.QuantSpec(axis=0))[0]
            row.update(timed(kernel_fn_w4a8, xs, qs_channel, "w4a8_channel_kernel_"))
            row.update(timed(lambda x, q: qj.qdot(x, q, act_quant="int8"), xs, qs_channel, "w4a8_channel_auto_"))
            row.update(timed(lambda x, q: qj.qdot(x, q, act_quant="int8", backend="native"), xs, qs_channel,
                             "w4a8_channel_int32_"))
            del qs_channel
        if m >= 64 and not args.lean:  # QLoRA's backward through a frozen packed weight, g @ W.T (g: the activations, K = N)
            row.update(timed(lambda x, q: grad_x(lambda x: qj.qdot(x, q), x), xs, qs, "grad_qdot_"))
            row.update(timed(lambda x, q: grad_x(lambda x: jnp.dot(  # what qdot's tangent ran before session 10
                x.astype(jnp.float32), qj.dequantize(q, jnp.float32), precision=jax.lax.Precision.HIGHEST), x),
                xs, qs, "grad_f32_reference_"))
            row.update(timed(lambda x, w: grad_x(lambda x: bf16_dot(x, w), x), xs, bfs, "grad_bf16_"))
        if isinstance(qwix_ws, str):
            row["qwix_us"] = qwix_ws
        elif qwix_ws is not None:
            row.update(timed(qwix.dot, xs, qwix_ws, "qwix_"))
        if not args.no_sweep and (args.sweep_m is None or m in args.sweep_m):
            for blocks in sweep_configs(m, k):
                if time.time() > sweep_until:
                    log(f"budget: sweep stopped at M={m} before {blocks}")
                    break
                entry = {"M": m, **blocks}
                fn = kernel_fn(**blocks)
                try:
                    entry["rel_err"] = rel_err(jax.jit(fn)(xs[0], qs[0]), ref)
                    entry.update(timed(fn, xs, qs) if entry["rel_err"] < 2e-3 else {"us": "wrong"})
                except Exception as e:
                    entry["us"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                    log(traceback.format_exc())
                sweep.append(entry)
                log(str(entry))
                print(" ", {a: v for a, v in entry.items() if a != "rel_err"}, flush=True)
            ok = [e for e in sweep if e["M"] == m and isinstance(fastest(e), float)]
            if ok:
                best[m] = min(ok, key=fastest)
                row["pallas_best_us"], row["pallas_best_dev_us"] = best[m]["us"], best[m].get("dev_us")
                row["best_tiles"] = tiles_of(best[m])
        add_speedups(row, "bf16")
        table.append(row)
        print(row, flush=True)
        result.update(table=table, sweep=sweep, profile_lines=sorted(PROFILE_LINES))
        write_json(args.out, result)
    del qs, bfs, qwix_ws

    llama = []
    for k, n in () if args.no_llama else ((4096, 14336), (14336, 4096)):
        if time.time() - start > args.budget:
            break
        qs, bfs = make_weights(k, n, spec)
        for m in (1, 16):
            xs = activations(m, k)
            row = {"K": k, "N": n, "M": m, **timed(bf16_dot, xs, bfs, "bf16_")}
            for b in ("auto",) if args.lean else ("native", "dequant", "auto"):
                row.update(timed(lambda x, q, b=b: qj.qdot(x, q, backend=b), xs, qs, f"{b}_"))
            row.update(timed(kernel_fn(ptx=False), xs, qs, "pallas_bytes_"))
            if m in best:
                # the best tiles of K = N = kn, with as many K rows per split
                tiles = tiles_of(best[m])
                tiles = row["best_tiles_per_k"] = dict(tiles, split_k=max(1, k * tiles["split_k"] // args.kn))
                row.update(timed(kernel_fn(**tiles), xs, qs, "pallas_best_tiles_"))
            llama.append(row)
            print(row, flush=True)
        del qs, bfs
        result["llama"] = llama
        write_json(args.out, result)

    print(f"\nK=N={args.kn}, bf16 activations, int4 group 128, microseconds per product, on {result['machine']}")
    print_table(table, [c for c in columns(table) if c != "best_tiles"])
    for m, b in best.items():
        print(f"best tiles M={m}: {b}")
    if llama:
        print_table(llama, [c for c in llama[0] if c != "best_tiles_per_k"])
    print(f"total {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
