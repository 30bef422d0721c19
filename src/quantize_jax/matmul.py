"""``qdot`` and ``qeinsum``: matrix products whose weight is a packed 4-bit ``QArray``.

Backends (``backend=``):

* ``"xla"`` — the reference: ``x @ dequantize(q)`` in float32 at the highest
  precision. Exact, and it materialises the float weight.
* ``"chunked"`` — the CPU fast path: the weight is unpacked one cache-sized
  block of K rows at a time inside a ``lax.scan``, the low and high nibbles
  (even and odd output columns) each feeding a float32 dot, so the float
  weight never exists in memory.
* ``"native"`` — XLA's own int4: the packed bytes bitcast to ``jnp.int4``
  (free), converted inside the dot (GPU, TPU). ``nf4`` / ``fp4`` decode by
  table lookup instead.
* ``"dequant"`` — the weight decoded and scaled to x's dtype (bf16, f16 or
  f32), then one dot, which XLA fuses into its GEMM where it can: for large M
  on GPU, where the product is compute-bound. With bf16 / f16 activations
  the scaled weight is rounded to that dtype (as in a bf16 model).
* ``"pallas"`` — the Pallas kernel of :mod:`quantize_jax.kernels.pallas_gpu`
  (GPU; interpreted on CPU, for tests).
* ``"auto"`` (default) — chosen per platform when lowering: ``chunked`` on
  CPU; on NVIDIA GPUs ``pallas`` up to ``PALLAS_MAX_M`` rows (float32
  activations: ``PALLAS_MAX_M_FLOAT32``), then ``native`` up to
  ``NATIVE_MAX_M`` and ``dequant`` above (the weight decoded by the Pallas
  decoding kernel, the same weight bit for bit, for a known M); on TPU and ROCm ``native``
  while its per-group sums ``(M, G, N)`` take no more memory than the
  decoded weight (``M <= group rows * itemsize / 4``: 64 rows for bf16 and
  groups of 128; per channel at any M), then ``dequant``.
  Each platform's code is lowered for that platform only, so one jitted
  function exports for all of them.

All backends compute ``sum_k x[m, k] * (q[k, n] - z) * s`` and agree with the
reference up to float reassociation, except with bf16 / f16 activations in
``dequant`` (the scaled weight rounded to that dtype; ``auto`` takes it on
NVIDIA GPUs above ``PALLAS_MAX_M`` rows, on TPU as above) and for ``nf4`` in ``native`` and
``pallas`` (its levels rounded to that dtype): about 2**-9 relative per weight.

``act_quant="int8"`` selects W4A8: the activations are quantized per token
(absmax over K) to int8, multiplied with the integer codes accumulating in
int32 per scale group (exact up to 2**31 / (127 * 15), about 1.1 million
rows per group), and scaled after — it changes the numerics, so it is
opt-in. With ``auto`` on CPU (and ``chunked``) the int8 codes are unpacked
one chunk of K rows at a time, as in ``chunked``, into int8 dots (XLA's
YNNPACK kernels; per channel bit for bit the int32 result), or for groups
under 64 rows into float32 dots (exact products). On NVIDIA GPUs (and with
``pallas``) they run through the Pallas kernel (int8 values are exact in
bf16): exact where the sums fit float32's 24-bit mantissa; per-channel
weights past ``PALLAS_MAX_M`` rows take one int8 x int8 -> int32 dot in XLA.

Gradients flow to ``x`` (``g @ dequantize(q).T``, forward and reverse mode;
on the CPU block by block over the weight's rows, so the backward pass never
decodes the whole weight; elsewhere one product over the decoded weight,
rematerialized: in bf16 / f16 for such activations, with ``dequant``'s
rounding, else the reference); the weight gets none. Reverse mode's
``g @ W.T`` takes the transposed Pallas kernel (contracted over the packed
axis, the weight never decoded to memory) with ``pallas``, and with ``auto``
on NVIDIA GPUs for bf16 / f16 activations up to ``PALLAS_TRANSPOSED_MAX_M``
rows (``g * s`` rounded to that dtype, as the decoded weight would be);
forward mode's ``dx @ W`` with ``pallas``, and with ``auto`` on NVIDIA
GPUs, takes the forward product's own choice (the kernel at small M).

:func:`qeinsum`'s tied logits ``"...d,vd->...v"`` (an embedding table
``(vocab, d)`` contracted over its packed axis) take the same transposed
kernel with ``auto`` on NVIDIA GPUs (bf16 / f16, up to
``PALLAS_TRANSPOSED_MAX_M`` rows) and with ``pallas``, for tables scaled
per row (the embedding default: the codes' product is scaled after the
kernel) or per column; tables in groups along ``d`` decode as before.
Lowered on a machine with a Hopper GPU (H100, H200), ``auto`` takes Mosaic
GPU's TMA + WGMMA kernel instead (:func:`quantize_jax.kernels.mosaic_gpu.matmul_nt`)
for int4 tables without zero points, per row or in groups of 64 or more
along ``d``, and bf16 activations up to ``MOSAIC_LOGITS_MAX_M`` rows.
On TPU (and with ``native`` anywhere) a table scaled per row is read as
int4 codes inside the dot (XLA's native int4), its row scales after.
Their backward pass ``c @ table`` runs the forward kernel over the
codes (for tables scaled per row: ``c * s`` rounded once to the 16-bit
dtype, up to ``PALLAS_MAX_M`` rows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec

from quantize_jax import _layout
from quantize_jax.calibrate import true_divide
from quantize_jax.formats import Format, dequantize_codes
from quantize_jax.kernels import mosaic_gpu, pallas_gpu
from quantize_jax.qarray import QArray, dequantize, int4_view

BACKENDS = ("auto", "xla", "chunked", "native", "dequant", "pallas")
ACT_QUANT = (None, "int8")
# Rows up to which auto uses the Pallas kernel on NVIDIA GPUs; then ``dequant`` (``native`` up to
# NATIVE_MAX_M rows where the kernel's K block cannot reach 16 rows). On an H200 (session 14,
# benchmarks/RESULTS.md; K = N = 8192, bf16, device time) the kernel (its PTX dot) took 22.8-36.4 us at
# M = 1-64, 1.1-1.6x bf16 x bf16, and 59.7 at M = 128 (bf16 41.4), where dequant took 99-100 us at
# every M up to 128 and native 45-154; at M = 1024 the kernel's best tile took 427 us, dequant 246.
PALLAS_MAX_M = 128
NATIVE_MAX_M = 32
# float32 activations: the kernel's float32 dots (three TF32 dots a block since session 6; full precision
# before, which spilled registers) were never timed; they keep the first bound.
PALLAS_MAX_M_FLOAT32 = 16
# Rows up to which auto's reverse mode on NVIDIA GPUs multiplies ``g @ W.T`` by the transposed kernel (bf16 /
# f16 activations). On an H200 (session 19, K = N = 8192, groups of 128, device time) it took 23.4, 25.2,
# 29.8, 50.9 and 84.7 us at M = 1, 16, 32, 64 and 128, where the decoded product it replaces took 200-204
# at every M and bf16 x bf16's own backward 36.8-107.3 (the kernel 1.19-1.65x faster); past 128 rows untimed.
PALLAS_TRANSPOSED_MAX_M = 128
# Rows up to which auto's tied logits on Hopper GPUs take Mosaic GPU's TMA + WGMMA kernel (int4 tables
# without zero points, bf16; :func:`_mosaic_logits_fit`). On an H200 (session 19; 128256 x 4096 and 256000 x
# 2304 tables, device time) it took 113-210 us at M = 1-64 over tables scaled per row, 1.16-1.75x faster
# than the transposed Triton kernel, and 132-236 us over tables in groups of 128 along d, 7-12x faster
# than the decoded dot those took (1493-1711 us); bf16 x bf16 took 246-312.
MOSAIC_LOGITS_MAX_M = 64
# The CPU paths unpack the weight one chunk of _CHUNK_ROWS K rows at a time (512 x 4096 float32 = 8 MiB
# over two dots); the float32 path cuts packed rows over 2 * _COL_BLOCK bytes (4096 columns) into tiles of
# _COL_BLOCK bytes.
_CHUNK_ROWS = 512
_COL_BLOCK = 1024
# Scale groups below this many rows take CPU W4A8 through float32 dots: one int8 dot per group costs
# more there (benchmarks/RESULTS.md).
_INT8_MIN_GROUP_ROWS = 64


class _Grid(NamedTuple):
    """A 2-D weight's scales as one row per group of ``group_rows`` K rows: ``(G, N)``."""

    scale: jax.Array
    zero_point: jax.Array | None
    group_rows: int


def qdot(x: jax.Array, q: QArray, *, backend: str = "auto", act_quant: str | None = None) -> jax.Array:
    """``x @ W`` for a 2-D weight ``QArray`` ``W`` of shape ``(K, N)``.

    Contracts ``x``'s last axis with ``W``'s axis 0, like ``jnp.matmul``.

    Args:
      x: activations ``(..., K)``; integer inputs are promoted as
        ``jnp.matmul`` would, complex ones multiplied part by part (real,
        imaginary).
      q: the quantized weight, a 2-D :class:`QArray`.
      backend: ``"auto"``, ``"xla"``, ``"chunked"``, ``"native"``,
        ``"dequant"`` or ``"pallas"`` (see the module docstring).
      act_quant: ``None`` (exact), or ``"int8"`` for W4A8 (``int4``,
        ``uint4`` and ``fp4`` weights).

    Returns:
      ``(..., N)`` in ``jnp.result_type(x, q.dtype)``.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=16))
      >>> x = jnp.ones((2, 64))
      >>> y = qj.qdot(x, q)
      >>> bool(jnp.allclose(y, x @ qj.dequantize(q), atol=1e-4))
      True
    """
    if not isinstance(q, QArray):
        raise TypeError(f"qdot: q must be a QArray, got {type(q).__name__}")
    if q.ndim != 2:
        raise ValueError(f"qdot: q must be a 2-D weight (K, N), got shape {q.shape}; use qeinsum for others")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"qdot: x of shape {x.shape} does not contract with q of shape {q.shape} (K = {q.shape[0]})")
    if backend not in BACKENDS:
        raise ValueError(f"qdot: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if act_quant not in ACT_QUANT:
        raise ValueError(f"qdot: act_quant must be None or 'int8', got {act_quant!r}")
    if act_quant == "int8" and q.spec.format == "nf4":
        raise ValueError("qdot: act_quant='int8' needs integer levels; format 'nf4' has none (use int4, uint4 or fp4)")
    if jnp.iscomplexobj(x):
        return _complex_parts(functools.partial(qdot, q=q, backend=backend, act_quant=act_quant), x, q)
    out_dtype = jnp.result_type(x.dtype, q.dtype)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(out_dtype)
    lead = x.shape[:-1]

    def product(x, q):
        y = _qdot2d(x.reshape(math.prod(lead), q.shape[0]), q, backend, act_quant)
        return y.reshape(lead + (q.shape[1],)).astype(out_dtype)

    return _with_natural_sharding(product, x, q, weight_axis=1)


def _with_natural_sharding(product, x, q, weight_axis: int):
    """``product(x, q)``; on an explicit-sharding mesh computed with GSPMD-propagated (auto) axes inside,
    handing back the natural sharding: x's leading axes, and the weight's output axis ``weight_axis``."""
    explicit = _explicit_out_spec(x, q, weight_axis)
    if explicit is None:
        return product(x, q)
    mesh, out_spec = explicit
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(product, out_sharding=out_spec)(x, q)


def _complex_parts(product, x, q):
    """A real weight times complex activations, as ``jnp.matmul`` computes it: the real and the imaginary
    parts each through ``product``, joined in ``jnp.result_type(x, q.dtype)``."""
    real, imag = (product(part).astype(x.real.dtype) for part in (x.real, x.imag))
    return lax.complex(real, imag).astype(jnp.result_type(x.dtype, q.dtype))


def _explicit_out_spec(x, q, weight_axis: int):
    """``(abstract mesh, output PartitionSpec)`` when x or the weight lives on an explicit-sharding mesh, else
    None: x's leading axes, then the weight's output axis (``weight_axis``: 1 for ``x @ W``, 0 for ``x @ W.T``)."""
    try:
        xs, ws = jax.typeof(x).sharding, jax.typeof(q.packed).sharding
    except AttributeError:
        return None
    mesh = xs.mesh if not xs.mesh.empty else ws.mesh
    if mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    x_spec = tuple(xs.spec) + (None,) * (x.ndim - len(tuple(xs.spec)))
    w_spec = tuple(ws.spec) + (None,) * (2 - len(tuple(ws.spec)))
    used = {a for entry in x_spec[:-1] if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}
    n_entry = w_spec[weight_axis]
    n_axes = () if n_entry is None else (n_entry if isinstance(n_entry, tuple) else (n_entry,))
    return mesh, PartitionSpec(*x_spec[:-1], None if used & set(n_axes) else n_entry)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _qdot2d(x, q, backend, act_quant):
    grid = _grid(q)
    if x.shape[0] == 0 or q.size == 0:  # no rows, no columns, or nothing to contract: as jnp.matmul, zeros
        return jnp.zeros_like(x, jnp.float32, shape=(x.shape[0], q.shape[1]))
    if grid is None:
        return _reference(x if act_quant is None else fake_int8_tokens(x), q)
    if backend in ("auto", "pallas") or (backend == "native" and act_quant is None):
        return _per_platform(x, q, backend, act_quant)
    if act_quant == "int8":  # xla, chunked, native, dequant
        return _w4a8_cpu(x, q, grid=grid) if backend == "chunked" else _w4a8(x, q, grid)
    if backend == "xla":
        return _reference(x, q)
    return {"chunked": _chunked, "dequant": _dequant}[backend](x, q, grid=grid)


def _choose(platform: str, backend: str, act_quant, m, dtype, grid: _Grid):
    """The implementation ``(x, q, *, grid) -> y`` that ``backend`` (auto, pallas, native) means on ``platform``.

    ``m``, the rows, may be a symbolic dimension (a shape-polymorphic ``jax.export``): ``auto`` then
    takes the paths that suit every M, XLA's own (``dequant``; ``native`` per channel on TPU)."""
    gpu = platform in ("cuda", "rocm")
    if backend == "pallas":
        if not gpu and platform != "cpu":
            raise NotImplementedError(f"qdot: backend='pallas' has no kernel for platform {platform!r}; use 'auto'")
        return functools.partial(_w4a8_kernel if act_quant else _pallas_kernel, interpret=not gpu)
    if backend == "native":  # XLA's CPU runtime has no bf16 x bf16 -> f32 batched dot: float32 there
        return functools.partial(_native, dtype=jnp.float32) if platform == "cpu" else _native
    if platform == "cpu":
        return _w4a8_cpu if act_quant else _chunked
    if platform == "cuda" and act_quant:
        # groups: the kernel at any M (H100, M = 1024: 610-633 us, the int32 path 1665); per channel past
        # PALLAS_MAX_M rows one int8 x int8 -> int32 dot (H200, M = 1024: 337 us, the kernel 592)
        grouped = grid.scale.shape[0] > 1
        kernel = _pallas_fits(grid) and not jax.export.is_symbolic_dim(m) and (grouped or m <= PALLAS_MAX_M)
        return functools.partial(_w4a8_kernel, interpret=False) if kernel else _w4a8
    if platform == "cuda":
        most = PALLAS_MAX_M if jnp.dtype(dtype).itemsize <= 2 else PALLAS_MAX_M_FLOAT32
        if _at_most(m, most) and _pallas_fits(grid):  # bound by the weight's bytes (one or two passes)
            return functools.partial(_pallas_kernel, interpret=False)
        # above: bound by the arithmetic, XLA's GEMM (over the weight decoded as _kernel_decodes says)
        if _at_most(m, NATIVE_MAX_M) and _native_is_smaller(m, dtype, grid):
            return _native
        return functools.partial(_dequant, kernel=_kernel_decodes(platform, m, grid))
    if act_quant:
        return _w4a8
    return _native if _native_is_smaller(m, dtype, grid) else _dequant


def _at_most(m, bound: int) -> bool:
    """``m <= bound`` for a known M; False for a symbolic one."""
    return not jax.export.is_symbolic_dim(m) and m <= bound


def _native_is_smaller(m, dtype, grid: _Grid) -> bool:
    """Whether ``native``'s per-group sums, ``(M, G, N)`` float32, take no more memory than ``dequant``'s
    decoded weight, ``(K, N)`` in the dot's dtype, all at once (:func:`_groups_per_step`):
    ``M <= rows * itemsize / 4`` (64 rows for bf16 and groups of 128), or per channel (one group: no
    per-group sums). Past that ``native`` writes and rereads ``4 M / rows`` bytes per weight: at M = 1024
    and groups of 32, 1 GiB for a 2048 x 2048 weight (compiled for the project's CPU VM), which a prompt
    on a TPU cannot afford."""
    g = grid.scale.shape[0]
    return _groups_per_step(m, g, grid.group_rows, jnp.dtype(_dot_dtype(dtype)).itemsize) == g


_per_platform_p = jex_core.Primitive("qdot_per_platform")  # x @ W, float32
_tangent_p = jex_core.Primitive("qdot_tangent")  # dx @ W, float32: qdot's tangent
_transposed_tangent_p = jex_core.Primitive("qdot_tangent_transposed")  # g @ W.T in x's dtype: its transpose
_transposed_p = jex_core.Primitive("qdot_transposed_per_platform")  # x @ W.T (tied logits), float32


def _per_platform(x, q, backend, act_quant):
    """Binds the primitive whose lowering picks the implementation per platform. Unlike
    ``lax.platform_dependent``, each platform's code is lowered for that platform only, so the
    Triton kernel can sit beside the CPU path in one multi-platform export."""
    return _bind(_per_platform_p, x, q, backend=backend, act_quant=act_quant)


def _bind(primitive, x, q: QArray, **params):
    """``primitive`` over ``x`` and the weight's arrays (made to vary alike inside ``shard_map``), the rest of
    the weight as parameters."""
    zero_point = q.zero_point if q.zero_point is not None else jnp.zeros((0,), jnp.float32)
    x, packed, scale, zero_point = _vary_alike(x, q.packed, q.scale, zero_point)
    return primitive.bind(x, packed, scale, zero_point, shape=q.shape, dtype=np.dtype(q.dtype), spec=q.spec,
                          has_zero=q.zero_point is not None, **params)


def _vary_alike(*arrays):
    """Inside ``shard_map``: each array cast to vary over every manual axis any of them varies over, as
    JAX's own binary operations do, so that the product's one output has the right type."""
    axes = [_varying_axes(a) for a in arrays]
    union = frozenset().union(*axes)
    return tuple(a if ax == union else lax.pcast(a, tuple(union - ax), to="varying") for a, ax in zip(arrays, axes))


def _varying_axes(a) -> frozenset:
    aval = jax.typeof(a)
    manual = getattr(aval, "mat", None)  # jax 0.10: the manual axis type; elsewhere ``vma``
    return frozenset(getattr(manual, "varying", None) or getattr(aval, "vma", ()))


def _weight(packed, scale, zero_point, *, shape, dtype, spec, has_zero) -> QArray:
    return QArray(packed, scale, zero_point if has_zero else None, shape, dtype, spec)


def _per_platform_impl(platform, x, packed, scale, zero_point, *, backend, act_quant, **weight):
    q = _weight(packed, scale, zero_point, **weight)
    grid = _grid(q)
    return _choose(platform, backend, act_quant, x.shape[0], x.dtype, grid)(x, q, grid=grid)


def _tangent(dx, q: QArray, backend: str):
    """:func:`qdot`'s tangent ``dx @ dequantize(q)`` (float32), forward mode, and transposed by its primitive's
    rule into ``g @ dequantize(q).T`` for reverse mode (:func:`_transposed_tangent_impl`), so that the
    backward pass never keeps the decoded weight: on the CPU :func:`_blocked_product`, elsewhere
    :func:`_decoded_product` (rematerialized: the weight decoded again in the backward pass)."""
    return _bind(_tangent_p, dx, q, backend=backend)


def _tangent_impl(platform, dx, packed, scale, zero_point, *, backend, **weight):
    """``dx @ dequantize(q)`` (float32). With ``pallas`` (interpreted on the CPU) and with ``auto`` on NVIDIA
    GPUs, the forward product's own choice (the Pallas kernel at small M); for weights scaled per row (a
    table's ``ct @ W``, the tied logits' backward pass) :func:`_row_scaled_kernel`, with ``auto`` for bf16 /
    f16 up to ``PALLAS_MAX_M`` rows. Else :func:`_decoded_product` off the CPU; on the CPU
    :func:`_blocked_product`, or for weights scaled along their rows the transpose of
    :func:`_chunked_transposed` (32000 x 2048 per row, M = 1 / 8: 10 / 14 ms against 23 / 21 on the
    project's CPU VM)."""
    q = _weight(packed, scale, zero_point, **weight)
    grid, m = _grid(q), dx.shape[0]
    if _kernels_may_run(platform, backend) and q.size and not _at_most(m, 0):
        if grid is not None:
            return _choose(platform, backend, None, m, dx.dtype, grid)(dx, q, grid=grid)
        rows = _row_scales(q)
        if rows is not None and (backend == "pallas" or _small_16_bit(m, dx.dtype, PALLAS_MAX_M)):
            return _row_scaled_kernel(dx, q, *rows, interpret=platform != "cuda")
    if platform == "cpu" and grid is None and q.size:
        return _transpose_of(_chunked_transposed, dx.astype(jnp.float32), q, q.shape[1], jnp.float32)
    return (_blocked_product if platform == "cpu" else _decoded_product)(dx, q)


def _row_scaled_kernel(dx, q: QArray, scale, zero_point, interpret: bool):
    """``dx @ dequantize(q)`` for ``q`` scaled per row (``scale``, ``zero_point``: ``(1, K)``) by the forward
    Pallas kernel over the codes alone (unit scales): ``dx * s``, rounded once to dx's dtype (as the
    transposed kernel rounds ``g * s``), times the codes, less ``(dx s) . z``. The zero points' share takes
    the same rounded ``dx s`` by ``lax.reduce_precision``, which XLA keeps: a plain round trip through
    dx's dtype, fused into the sum, may be skipped on GPUs (XLA's excess precision), and the share's
    difference from the kernel's then cancels badly (seen on an H200: 5.5e-3 relative error for uint4)."""
    k, n = q.shape
    info = jnp.finfo(dx.dtype)
    xs = lax.reduce_precision(dx.astype(jnp.float32) * scale, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    y = pallas_gpu.matmul(xs.astype(dx.dtype), q.packed, jnp.ones((1, n), jnp.float32), None, n=n, fmt=q.spec.fmt,
                          group_size=k, interpret=interpret)
    if zero_point is None:
        return y
    return y - jnp.sum(xs * zero_point, axis=1, keepdims=True)


def _transposed_tangent_impl(platform, g, packed, scale, zero_point, *, backend, x_dtype, **weight):
    """Reverse mode's ``g @ dequantize(q).T`` in x's dtype: the transposed Pallas kernel
    (:func:`pallas_gpu.matmul_transposed`, contracted over the packed axis, the weight never decoded to
    memory) with ``pallas`` (interpreted on the CPU), and with ``auto`` on NVIDIA GPUs for bf16 / f16
    activations up to ``PALLAS_TRANSPOSED_MAX_M`` rows; else the transpose of the tangent's own product
    (on the CPU block by block over the weight's rows; elsewhere one product over the weight decoded to
    bf16 / f16, in that dtype, or the reference for float32)."""
    q = _weight(packed, scale, zero_point, **weight)
    if _transposed_kernel_runs(platform, backend, g, q, x_dtype):
        y = _kernel_transposed(g, q, _dot_dtype(x_dtype), interpret=platform != "cuda")
    elif platform == "cpu":
        y = _transpose_of(_blocked_product, g, q, q.shape[0], x_dtype)
    else:
        kernel = _kernel_decodes(platform, g.shape[0], _grid(q))
        y = _transpose_of(functools.partial(_decoded_product, kernel=kernel), g, q, q.shape[0], x_dtype)
    return y.astype(x_dtype)


def _transpose_of(product, ct, q: QArray, width: int, dtype):
    """The transpose of the linear ``x -> product(x, q)``, ``x`` of shape ``(M, width)`` in ``dtype``, at ``ct``.
    (The example ``x`` varies as ``ct`` does inside ``shard_map``: else the transpose would psum it.)"""
    x = _vary_alike(jnp.zeros((ct.shape[0], width), dtype), ct)[0]
    (y,) = jax.linear_transpose(lambda x: product(x, q), x)(ct)
    return y


def _transposed_kernel_runs(platform, backend, x, q: QArray, x_dtype) -> bool:
    """Whether ``x @ W.T`` (over W's packed axis) takes the transposed Pallas kernel: with ``pallas`` on the
    CPU (interpreted) and NVIDIA GPUs, with ``auto`` on NVIDIA GPUs for bf16 / f16 up to
    ``PALLAS_TRANSPOSED_MAX_M`` rows; where the weight's scales fit it (:func:`_kernel_transposed`)."""
    grid = _grid(q)
    fits = (_pallas_fits(grid) if grid is not None else _row_scales(q) is not None) and q.size > 0
    return fits and not _at_most(x.shape[0], 0) and _kernels_may_run(platform, backend) and (
        backend == "pallas" or _small_16_bit(x.shape[0], x_dtype, PALLAS_TRANSPOSED_MAX_M))


def _kernels_may_run(platform, backend) -> bool:
    """Whether ``backend`` may take a Pallas kernel on ``platform``: ``pallas`` on the CPU (interpreted) and
    NVIDIA GPUs, ``auto`` on NVIDIA GPUs (where :func:`_small_16_bit` products take it)."""
    return (backend == "pallas" and platform in ("cpu", "cuda")) or (backend == "auto" and platform == "cuda")


def _small_16_bit(m, dtype, most: int) -> bool:
    """bf16 / f16 activations of at most ``most`` rows (a known M): what ``auto``'s kernels take."""
    return _dot_dtype(dtype) != jnp.float32 and _at_most(m, most)


def _row_scales(q: QArray):
    """``(scale, zero_point or None)``, float32 ``(1, K)``, of a 2-D weight ``(K, N)`` scaled per row (one scale
    for all of a row's N values: an embedding table's default); else None."""
    lay = _layout.layout(q.shape, q.spec)
    if lay.group_axis is not None or 1 not in lay.reduced:
        return None

    def row(a):
        return None if a is None else jnp.broadcast_to(a.astype(jnp.float32), (q.shape[0], 1)).T

    return row(q.scale), row(q.zero_point)


def _kernel_transposed(x, q: QArray, dtype, interpret: bool):
    """``x @ dequantize(q).T`` (float32) by :func:`pallas_gpu.matmul_transposed`, dots in ``dtype``. Scales
    along N (per column, or in groups of K rows) multiply ``x`` inside the kernel; one scale per row of
    ``q`` multiplies the codes' product after it, its zero point taken off as ``z * sum(x)``:
    ``y = (x @ c.T - z sum_n x) s``."""
    grid, fmt, (k, n) = _grid(q), q.spec.fmt, q.shape
    if grid is not None:
        return pallas_gpu.matmul_transposed(x, q.packed, grid.scale, grid.zero_point, n=n, fmt=fmt,
                                            group_size=grid.group_rows, dtype=dtype, interpret=interpret)
    y = pallas_gpu.matmul_transposed(x, q.packed, jnp.ones((1, n), jnp.float32), None, n=n, fmt=fmt, group_size=k,
                                     dtype=dtype, interpret=interpret)
    return _scaled_rows(y, x, *_row_scales(q))


def _scaled_rows(y, x, scale, zero_point):
    """``x @ c.T`` over a weight's codes ``c`` -> ``x @ W.T`` for ``W`` scaled per row (``scale``,
    ``zero_point``: ``(1, K)``): ``(y - z sum(x)) s``."""
    if zero_point is not None:
        y = y - zero_point * jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
    return y * scale


def _transposed_impl(platform, x, packed, scale, zero_point, *, backend, **weight):
    """``x @ dequantize(q).T`` (float32) over the weight's packed axis, for ``auto``, ``pallas`` and
    ``native``: the transposed Pallas kernel where :func:`_transposed_kernel_runs`; XLA's int4
    (:func:`_native_transposed`) with ``native`` for tables scaled per row, and with ``auto`` for them on
    TPU; else with ``auto`` :func:`_chunked_transposed` on the CPU and :func:`_dequant_transposed`
    elsewhere; with ``pallas`` or ``native`` the reference (``pallas``: a NotImplementedError on platforms
    other than the CPU and NVIDIA GPUs, as :func:`qdot`'s)."""
    q = _weight(packed, scale, zero_point, **weight)
    if backend == "pallas" and platform not in ("cpu", "cuda"):
        raise NotImplementedError(f"qeinsum: backend='pallas' has no kernel for platform {platform!r}; use 'auto'")
    if backend == "auto" and platform == "cuda" and _mosaic_logits_fit(x, q):
        return mosaic_gpu.matmul_nt(x, q)
    if _transposed_kernel_runs(platform, backend, x, q, x.dtype):
        return _kernel_transposed(x, q, _dot_dtype(x.dtype), interpret=platform != "cuda")
    rows = _row_scales(q)
    native = backend == "native" or (backend == "auto" and platform not in ("cpu", "cuda", "rocm"))
    if native and rows is not None:
        return _native_transposed(x, q, *rows, dtype=jnp.float32 if platform == "cpu" else _dot_dtype(x.dtype))
    if backend in ("pallas", "native"):
        return _reference_transposed(x, q)
    return _chunked_transposed(x.astype(jnp.float32), q) if platform == "cpu" else _dequant_transposed(x, q)


def _mosaic_logits_fit(x, q: QArray) -> bool:
    """Whether ``auto``'s ``x @ W.T`` on CUDA takes :func:`mosaic_gpu.matmul_nt`: when lowered on a machine
    with a Hopper GPU (:func:`_hopper_present`; its WGMMA exists on no other generation), for bf16 ``x`` of
    at most ``MOSAIC_LOGITS_MAX_M`` rows (known) and tables the kernel takes with its default tiles (int4
    without zero points, scaled per row or in groups of 64 or more along ``d``; vocab a multiple of 64)."""
    if x.dtype != jnp.bfloat16 or not _at_most(x.shape[0], MOSAIC_LOGITS_MAX_M) or not _hopper_present():
        return False
    return mosaic_gpu.fits(x, q, transposed=True)


@functools.cache
def _hopper_present() -> bool:
    """Whether this process sees a CUDA GPU of compute capability 9.x (H100, H200)."""
    try:
        devices = jax.devices("cuda")
    except RuntimeError:  # no CUDA backend
        return False
    return any(str(getattr(d, "compute_capability", "")).startswith("9.") for d in devices)


def _native_transposed(x, q: QArray, scale, zero_point, *, dtype):
    """XLA's int4 for ``x @ W.T`` over a weight scaled per row (``scale``, ``zero_point``: ``(1, K)``): the
    codes bitcast to int4 and converted to ``dtype`` inside one dot with ``x``, the row scales after it,
    ``y = (x @ c.T - z sum(x)) s`` (``native`` on any platform; ``auto`` on TPU, where XLA reads the 4-bit
    table in the dot, as for :func:`qdot`'s ``native``)."""
    k, n = q.shape
    codes = _grouped_codes(q, _Grid(jnp.ones((1, n), jnp.float32), None, k), dtype)[0]
    y = lax.dot_general(x.astype(dtype), codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    return _scaled_rows(y, x, scale, zero_point)


def _transposed_transpose(ct, x, packed, scale, zero_point, **params):
    """``ct @ W`` (:func:`_tangent`), the cotangent first rounded to x's dtype, as a bf16 model's backward
    pass multiplies it."""
    if type(ct) is ad.Zero:
        return [ad.Zero(x.aval), None, None, None]
    dtype = x.aval.dtype
    return [_tangent_p.bind(ct.astype(dtype), packed, scale, zero_point, **params).astype(dtype), None, None, None]


def _tangent_transpose(ct, dx, packed, scale, zero_point, **params):
    if type(ct) is ad.Zero:
        return [ad.Zero(dx.aval), None, None, None]
    x_dtype = np.dtype(dx.aval.dtype)
    return [_transposed_tangent_p.bind(ct, packed, scale, zero_point, x_dtype=x_dtype, **params), None, None, None]


def _transposed_tangent_transpose(ct, g, packed, scale, zero_point, *, x_dtype, **params):
    if type(ct) is ad.Zero:
        return [ad.Zero(g.aval), None, None, None]
    return [_tangent_p.bind(ct, packed, scale, zero_point, **params).astype(g.aval.dtype), None, None, None]


def _linear_jvp(primitive, primals, tangents, **params):
    """Linear in the first operand; the weight's tangents are ignored (a constant, as in :func:`qdot`)."""
    return primitive.bind(*primals, **params), primitive.bind(ad.instantiate_zeros(tangents[0]), *primals[1:], **params)


@functools.lru_cache(maxsize=None)
def _jitted_bind(primitive, **params):
    return jax.jit(functools.partial(primitive.bind, **params))


def _per_platform_batch(primitive, args, dims, **params):
    """vmap: a batch of activations folds into M; batched weights run one at a time (``lax.map``)."""
    if all(d is None for d in dims[1:]):
        x = jnp.moveaxis(args[0], dims[0], 0)
        y = primitive.bind(x.reshape(-1, x.shape[-1]), *args[1:], **params)
        return y.reshape(x.shape[:2] + y.shape[-1:]), 0
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(sliced):
        full = list(moved)
        for i, a in zip(mapped, sliced):
            full[i] = a
        return primitive.bind(*full, **params)

    return lax.map(one, [moved[i] for i in mapped]), 0


def _abstract_eval(x, *_, out_axis: int, shape, x_dtype=None, **__):
    """``(M, shape[out_axis])``: ``(M, N)`` for ``x @ W``, ``(M, K)`` for ``x @ W.T``; float32, or for the
    transposed tangent x's dtype; x's type otherwise (inside ``shard_map``, the manual axes it varies over)."""
    return x.update(shape=(x.shape[0], shape[out_axis]), dtype=jnp.dtype(x_dtype or jnp.float32), weak_type=False)


for _primitive, _impl, _out_axis in ((_per_platform_p, _per_platform_impl, 1), (_tangent_p, _tangent_impl, 1),
                                     (_transposed_tangent_p, _transposed_tangent_impl, 0),
                                     (_transposed_p, _transposed_impl, 0)):
    _primitive.def_impl(functools.partial(lambda primitive, *args, **params: _jitted_bind(primitive, **params)(*args),
                                          _primitive))
    _primitive.def_abstract_eval(functools.partial(_abstract_eval, out_axis=_out_axis))
    batching.primitive_batchers[_primitive] = functools.partial(_per_platform_batch, _primitive)
    for _platform in ("cpu", "cuda", "rocm", "tpu"):  # "tpu" is also the rule for any other platform
        mlir.register_lowering(
            _primitive, mlir.lower_fun(functools.partial(_impl, _platform), multiple_results=False),
            platform=None if _platform == "tpu" else _platform,
        )
for _primitive in (_tangent_p, _transposed_tangent_p, _transposed_p):
    ad.primitive_jvps[_primitive] = functools.partial(_linear_jvp, _primitive)
ad.primitive_transposes[_transposed_p] = _transposed_transpose
ad.primitive_transposes[_tangent_p] = _tangent_transpose
ad.primitive_transposes[_transposed_tangent_p] = _transposed_tangent_transpose


@_qdot2d.defjvp
def _qdot2d_jvp(backend, act_quant, primals, tangents):
    """Forward mode (and, transposed, reverse mode): the tangent is ``dx @ dequantize(q)`` (:func:`_tangent`);
    the weight's tangent is ignored (a constant), int8 activations pass straight through."""
    x, q = primals
    return _qdot2d(x, q, backend, act_quant), _tangent(tangents[0], q, backend)


def _decoded_product(x, q: QArray, kernel: bool = False, interpret: bool = False):
    """Off the CPU, :func:`qdot`'s tangent ``x @ dequantize(q)``. bf16 / f16 tangents multiply the weight
    decoded to their own dtype, in that dtype (float32 sums inside the dot, rounded once at the end), so
    that reverse mode transposes it into ``g @ W.T`` on the tensor cores, as a bf16 model's backward pass
    runs: about 2**-9 relative per weight, the size of the bf16 gradient's own rounding. float32 tangents
    take the reference (float32 at the highest precision). ``kernel``: the weight (scaled along K) decoded
    by :func:`_kernel_decoded` instead of by XLA, the same bit for bit."""
    dtype = _dot_dtype(x.dtype)
    if dtype == jnp.float32:
        return _reference(x, q)
    w = _kernel_decoded(q, _grid(q), dtype, interpret) if kernel else dequantize(q, dtype)
    return jnp.dot(x.astype(dtype), w).astype(jnp.float32)


def _grid(q: QArray) -> _Grid | None:
    """The weight's scales as ``(G, N)`` rows over K, or None where they vary along N in groups or per K row."""
    lay = _layout.layout(q.shape, q.spec)
    k, n = q.shape
    if lay.group_axis == 0:
        rows = lay.group_size
    elif lay.group_axis is None and 0 in lay.reduced:
        rows = k
    else:
        return None

    def full(a):
        return None if a is None else jnp.broadcast_to(a.astype(jnp.float32), (a.shape[0], n))

    return _Grid(full(q.scale), full(q.zero_point), rows)


def _reference(x, q):
    return jnp.dot(x.astype(jnp.float32), dequantize(q, jnp.float32), precision=lax.Precision.HIGHEST)


def _reference_transposed(x, q):
    return jnp.dot(x.astype(jnp.float32), dequantize(q, jnp.float32).T, precision=lax.Precision.HIGHEST)


def _nibbles(packed, fmt: Format):
    """Low and high nibbles of each byte: signed int8 for int4, else uint8."""
    if fmt.signed_codes:
        p8 = lax.bitcast_convert_type(packed, jnp.int8)
        return (p8 << 4) >> 4, p8 >> 4
    return packed & 0xF, packed >> 4


def _even_odd(a, n):
    """Split the columns of ``(..., n)`` into the even and odd ones (odd padded to ``ceil(n / 2)``)."""
    if n % 2:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, 1)])
    return a[..., 0::2], a[..., 1::2]


def _interleave(even, odd, n):
    out = jnp.stack([even, odd], axis=-1).reshape(even.shape[:-1] + (2 * even.shape[-1],))
    return out[..., :n]


def _pad_k(x, kp: int):
    """Zero-pads the last (contracted) axis of the ``(M, K)`` activations to ``kp``."""
    return jnp.pad(x, ((0, 0), (0, kp - x.shape[-1])))


class _Chunks(NamedTuple):
    """x and the packed weight cut along K into ``n`` chunks of whole scale groups (zero-padded); per
    channel, the one group is cut into chunks of ``rows`` rows."""

    xs: jax.Array  # (n, M, groups per chunk, group rows)
    packed: jax.Array  # (n, groups per chunk, group rows, N / 2)
    scale: tuple  # even and odd columns' scales, each (n, groups per chunk, 1, N / 2)
    zero_point: tuple | None  # as scale
    grouped: bool  # False: one scale for all K rows (the same in every chunk)


def _cut(x, q: QArray, grid: _Grid, rows: int = _CHUNK_ROWS) -> _Chunks:
    """Chunks of about ``rows`` K rows: as many whole groups as fit (at least one), or per channel ``rows``."""
    k, n = q.shape
    m, nh = x.shape[0], q.packed.shape[1]
    g = grid.scale.shape[0]
    if g > 1:
        per_chunk, group_rows = max(1, rows // grid.group_rows), grid.group_rows
        n_chunks = -(-g // per_chunk)
    else:
        per_chunk, group_rows = 1, min(rows, k)
        n_chunks = -(-k // group_rows)
    kp = n_chunks * per_chunk * group_rows
    xs = _pad_k(x, kp).reshape(m, n_chunks, per_chunk, group_rows).transpose(1, 0, 2, 3)
    ps = jnp.pad(q.packed, ((0, kp - k), (0, 0))).reshape(n_chunks, per_chunk, group_rows, nh)

    def split(a, fill):
        if a is None:
            return None
        a = jnp.pad(a, ((0, n_chunks * per_chunk - g), (0, 0)), constant_values=fill) if g > 1 else a
        return tuple(jnp.broadcast_to(h.reshape(-1, per_chunk, 1, nh), (n_chunks, per_chunk, 1, nh))
                     for h in _even_odd(a, n))

    return _Chunks(xs, ps, split(grid.scale, 1.0), split(grid.zero_point, 0.0), g > 1)


def _scan_halves(half, c: _Chunks, fmt: Format, acc_dtype, width: int | None = None):
    """Sums ``half(x chunk, nibbles, scales, zero points or None)`` over the chunks, for the even (low
    nibble) and the odd (high nibble) output columns.

    With ``width`` under the packed row's bytes, the scan runs over tiles of ``width`` columns of each
    chunk instead (every chunk of a column block, then the next), slicing its operands: a whole decoded
    row block of a wide weight outgrows the cache (float32, 4096 x 14336: 0.82-1.00x of the float32
    matmul tiled, 1.27-1.40x whole). Where whole rows fit, scanning over the chunks themselves measured
    faster (W4A8 group 128: 0.43-0.45x against 0.81-0.85x).
    """
    n_chunks, nh = c.packed.shape[0], c.packed.shape[-1]
    width = min(width or nh, nh)
    n_blocks = -(-nh // width)

    def padded(a, fill):  # whole tiles
        pad = n_blocks * width - nh
        return None if a is None else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)], constant_values=fill)

    packed = padded(c.packed, 0)
    scale = tuple(padded(a, 1.0) for a in c.scale)
    zero_point = (None, None) if c.zero_point is None else tuple(padded(a, 0.0) for a in c.zero_point)

    def add(acc, xc, pc, scales, zero_points, block=0):
        out = []
        for a, nibbles, s, z in zip(acc, _nibbles(pc, fmt), scales, zero_points):
            part = half(xc, nibbles, s, z)
            now = lax.dynamic_slice_in_dim(a, block * width, width, axis=-1)
            out.append(lax.dynamic_update_slice_in_dim(a, now + part, block * width, axis=-1))
        return tuple(out), None

    def tiles(acc, step):
        block, chunk = step // n_chunks, step % n_chunks

        def tile(a):  # (chunks, ..., columns) -> this step's (..., width)
            a = lax.dynamic_index_in_dim(a, chunk, 0, keepdims=False)
            return lax.dynamic_slice_in_dim(a, block * width, width, axis=-1)

        xc = lax.dynamic_index_in_dim(c.xs, chunk, 0, keepdims=False)
        zs = [None if z is None else tile(z) for z in zero_point]
        return add(acc, xc, tile(packed), [tile(s) for s in scale], zs, block)

    # zeros_like: inside shard_map the carry must vary over x's manual axes, as the sums it takes do
    zeros = jnp.zeros_like(c.xs, acc_dtype, shape=(c.xs.shape[1], n_blocks * width))
    if n_blocks == 1:
        steps, body = (c.xs, packed, scale, zero_point), lambda acc, chunk: add(acc, *chunk)
    else:
        steps, body = jnp.arange(n_blocks * n_chunks), tiles
    (even, odd), _ = lax.scan(body, (zeros, zeros), steps)
    return even[:, :nh], odd[:, :nh]


def _chunked(x, q, *, grid: _Grid):
    """CPU: unpack ``_CHUNK_ROWS`` rows at a time into two float32 dots (even / odd columns); group
    scales multiply the decoded chunk, a per-channel scale the sums."""
    fmt, c = q.spec.fmt, _cut(x.astype(jnp.float32), q, grid)
    m, rows = x.shape[0], c.packed.shape[1] * c.packed.shape[2]

    def half(xc, codes, s, z):
        w = fmt.decode(codes) if z is None else fmt.decode(codes) - z
        w = w * s if c.grouped else w
        return jnp.dot(xc.reshape(m, rows), w.reshape(rows, -1), precision=lax.Precision.HIGHEST)

    wide = c.packed.shape[-1] > 2 * _COL_BLOCK
    even, odd = _scan_halves(half, c, fmt, jnp.float32, width=_COL_BLOCK if wide else None)
    if not c.grouped:
        even, odd = even * c.scale[0][0, 0], odd * c.scale[1][0, 0]
    return _interleave(even, odd, q.shape[1])


def _grouped_codes(q: QArray, grid: _Grid, dtype):
    """The decoded codes (without scale) as ``(G, group_rows, N)`` in ``dtype``; K padded with zeros."""
    k, n = q.shape
    g, rows = grid.scale.shape[0], grid.group_rows
    packed = jnp.pad(q.packed, ((0, g * rows - k), (0, 0)))
    fmt = q.spec.fmt
    if fmt.is_integer and n % 2 == 0:
        int4 = int4_view(packed, fmt.signed_codes).reshape(g * rows, n)
        codes = lax.optimization_barrier(int4).astype(dtype)  # the barrier keeps XLA GPU's int4 dot fusion sound
    else:
        lo, hi = _nibbles(packed, fmt)
        codes = _interleave(fmt.decode(lo), fmt.decode(hi), n).astype(dtype)
    return codes.reshape(g, rows, n)


def _dot_dtype(dtype):
    """The dtype a GPU/TPU dot takes activations of ``dtype`` in: bf16 and f16 stay, anything else is float32."""
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _native(x, q, *, grid: _Grid, dtype=None):
    """XLA's int4: bitcast codes, converted to x's dtype (or ``dtype``) inside a grouped dot, scales
    applied per group."""
    dtype = dtype or _dot_dtype(x.dtype)
    return _group_sum(x.astype(dtype), _grouped_codes(q, grid, dtype), grid, jnp.float32)


def _kernel_decodes(platform: str, m, grid: _Grid | None) -> bool:
    """Whether products over the decoded weight (``dequant``, and the backward pass's past the transposed
    kernel's rows) decode it by :func:`_kernel_decoded` rather than by XLA: on CUDA, for a weight scaled
    along K (``grid``) and a known M (a symbolic one keeps XLA's decoding: no Triton call in a
    shape-polymorphic export). The same weight, bit for bit, decoded faster: on an H200 (session 19, K = N
    = 8192) the dot over it took 89.8 / 100.9 us at 128 / 256 rows against 99.9 / 107.7 over XLA's."""
    return platform == "cuda" and grid is not None and not jax.export.is_symbolic_dim(m)


def _kernel_decoded(q, grid: _Grid, dtype, interpret: bool = False):
    """``dequantize(q, dtype)`` for a weight scaled along K (``grid``), decoded by :func:`pallas_gpu.dequantize`:
    the same weight, bit for bit (``interpret``: in Pallas' interpreter, for tests)."""
    return pallas_gpu.dequantize(q.packed, grid.scale, grid.zero_point, n=q.shape[1], fmt=q.spec.fmt,
                                 group_size=grid.group_rows, dtype=dtype, interpret=interpret)


def _dequant(x, q, *, grid: _Grid, kernel: bool = False, interpret: bool = False):
    """The scaled weight in x's dtype, one dot accumulating in float32; ``kernel``: the weight decoded by
    :func:`_kernel_decoded` instead of by XLA."""
    dtype = _dot_dtype(x.dtype)
    if kernel:
        w = _kernel_decoded(q, grid, dtype, interpret)
    else:
        codes = _grouped_codes(q, grid, jnp.float32)
        if grid.zero_point is not None:
            codes = codes - grid.zero_point[:, None, :]
        w = (codes * grid.scale[:, None, :]).astype(dtype).reshape(-1, q.shape[1])[: q.shape[0]]
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32, precision=precision)


def _group_sum(x, codes, grid: _Grid, acc_dtype):
    """``sum_g s[g, n] * sum_{k in g} x[m, k] (codes[g, k, n] - z[g, n])``: ``(M, N)`` float32.

    Each group's sums are formed in ``acc_dtype`` (int32 for W4A8: exact) as ``(M, G', N)`` for ``G'``
    groups at a time: all ``G`` at once where that takes no more memory than the codes themselves, else
    the largest divisor of ``G`` that does, one ``lax.scan`` step each. So memory stays about the
    weight's size at any M (all at once, M = 1024 rows in groups of 32 took 1 GiB for a 2048 x 2048
    weight, compiled for the project's CPU VM)."""
    g, rows, n = codes.shape
    m = x.shape[0]
    xg = _pad_k(x, g * rows).reshape(m, g, rows)
    zero_point = grid.zero_point

    def add(acc, step):
        xs, cs, ss, zs = step
        part = jnp.einsum("mgk,gkn->mgn", xs, cs, preferred_element_type=acc_dtype)
        if zs is not None:
            part = part - jnp.sum(xs.astype(acc_dtype), axis=-1, keepdims=True) * zs.astype(acc_dtype)[None]
        return acc + jnp.sum(part.astype(jnp.float32) * ss[None], axis=1), None

    per = _groups_per_step(m, g, rows, jnp.dtype(codes.dtype).itemsize)
    zeros = jnp.zeros_like(x, jnp.float32, shape=(m, n))  # varying as x inside shard_map (see _scan_halves)
    if per == g:
        return add(zeros, (xg, codes, grid.scale, zero_point))[0]
    steps = g // per

    def by_step(a, axis=0):  # (..., G, ...) -> (steps, ..., per, ...) with the group axis at ``axis``
        a = a.reshape(a.shape[:axis] + (steps, per) + a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    zs = None if zero_point is None else by_step(zero_point)
    return lax.scan(add, zeros, (by_step(xg, 1), by_step(codes), by_step(grid.scale), zs))[0]


def _groups_per_step(m, g: int, rows: int, itemsize: int) -> int:
    """The most of ``g`` groups (a divisor of ``g``, at least 1) whose per-group sums ``(m, per, N)``
    float32 / int32 take no more memory than all groups' codes ``(g, rows, N)`` of ``itemsize`` bytes;
    one for a symbolic ``m`` (any M)."""
    if jax.export.is_symbolic_dim(m):
        return 1
    fits = max(1, rows * itemsize * g // (4 * max(m, 1)))
    return max(d for d in range(1, min(g, fits) + 1) if g % d == 0)


def _pallas_kernel(x, q, *, grid: _Grid, interpret: bool, **blocks):
    """The Pallas kernel: compiled by Triton on GPU, interpreted on the CPU (tests); ``blocks`` are
    :func:`pallas_gpu.matmul`'s tile arguments."""
    return pallas_gpu.matmul(
        x, q.packed, grid.scale, grid.zero_point, n=q.shape[1], fmt=q.spec.fmt, group_size=grid.group_rows,
        interpret=interpret, **blocks,
    )


def _pallas_fits(grid: _Grid) -> bool:
    """Whether the kernel's K block (which divides the group) reaches the rows a GPU dot needs."""
    return pallas_gpu.default_block_k(grid.group_rows, grid.scale.shape[0] > 1) >= pallas_gpu.MIN_BLOCK_K


def _int8_tokens(x):
    """Per-token (row) absmax int8 quantization: ``x ~ x_q * s`` with ``x_q`` in [-127, 127]."""
    x32 = x.astype(jnp.float32)
    s = jnp.maximum(true_divide(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), 127), jnp.finfo(jnp.float32).tiny)
    return jnp.clip(jnp.round(x32 * (1.0 / s)), -127, 127).astype(jnp.int8), s


def fake_int8_tokens(x):
    """Per-token int8 fake quantization with a straight-through gradient: the activations W4A8 multiplies.

    ``round(x / s)`` clipped to [-127, 127], times ``s = max|x| / 127`` over the last axis, in ``x``'s dtype.
    """
    xq, s = _int8_tokens(x)
    return x + jax.lax.stop_gradient((xq.astype(jnp.float32) * s).astype(x.dtype) - x)


def _w4a8_cpu(x, q, *, grid: _Grid):
    """W4A8 on CPU: the int8 tokens times int8 codes unpacked one scale group (or, per channel,
    ``_CHUNK_ROWS`` rows) at a time, one int32 dot per group and half (even / odd columns), each
    group's sum scaled in float32; zero points subtracted as ``sum_g rowsum_g(x) (z s)_g`` after. Per
    channel the int32 sums run over all of K (zero point included), so the result equals
    :func:`_w4a8`'s bit for bit. Groups under ``_INT8_MIN_GROUP_ROWS`` rows take the tokens through
    the float32 :func:`_chunked` instead."""
    fmt = q.spec.fmt
    if x.shape[0] == 1:  # YNNPACK takes no vectors: two rows run its int8 kernel, one XLA's slower loop
        return _w4a8_cpu(jnp.pad(x, ((0, 1), (0, 0))), q, grid=grid)[:1]
    xq, sx = _int8_tokens(x)
    grouped = grid.scale.shape[0] > 1
    if grouped and grid.group_rows < _INT8_MIN_GROUP_ROWS:
        return _chunked(xq.astype(jnp.float32), q, grid=grid) * sx
    code_scale = 1.0 if fmt.is_integer else 0.5  # fp4: twice every e2m1 level is an integer in [-12, 12]
    c = _cut(xq, q, grid._replace(scale=grid.scale * code_scale), rows=grid.group_rows if grouped else _CHUNK_ROWS)

    def half(xc, nibbles, s, _):  # zero points: after the loop
        codes = nibbles.astype(jnp.int8) if fmt.is_integer else (fmt.decode(nibbles) * 2).astype(jnp.int8)
        acc = lax.dot(xc[:, 0], codes[0], preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * s[0] if grouped else acc

    even, odd = _scan_halves(half, c, fmt, jnp.float32 if grouped else jnp.int32)
    if grouped:
        y = _interleave(even, odd, q.shape[1])
        if grid.zero_point is not None:
            g = grid.scale.shape[0]
            rowsums = jnp.sum(_pad_k(xq, g * grid.group_rows).reshape(-1, g, grid.group_rows), -1, jnp.int32)
            y = y - jnp.dot(rowsums.astype(jnp.float32), grid.zero_point * grid.scale, precision=lax.Precision.HIGHEST)
        return y * sx
    if grid.zero_point is not None:  # integer zero points: sum x (c - z) in int32
        rowsum = jnp.sum(xq, axis=-1, keepdims=True, dtype=jnp.int32)
        even, odd = (h - rowsum * z[0, 0].astype(jnp.int32) for h, z in zip((even, odd), c.zero_point))
    even, odd = (h.astype(jnp.float32) * s[0, 0] for h, s in zip((even, odd), c.scale))
    return _interleave(even, odd, q.shape[1]) * sx


def _w4a8_kernel(x, q, *, grid: _Grid, interpret: bool):
    """W4A8 through the Pallas kernel: the integer-valued int8 tokens are exact in bf16, so the
    products are exact and the sums float32, as on the CPU."""
    xq, sx = _int8_tokens(x)
    return _pallas_kernel(xq.astype(jnp.bfloat16), q, grid=grid, interpret=interpret) * sx


def _w4a8(x, q, grid: _Grid):
    """int8 activations x 4-bit codes with int32 accumulation per scale group, scales applied after."""
    fmt = q.spec.fmt
    xq, sx = _int8_tokens(x)
    scale = grid.scale
    if fmt.is_integer:
        codes = _grouped_codes(q, grid, jnp.int8)
    else:  # fp4: twice every e2m1 level is an integer in [-12, 12]
        codes = (_grouped_codes(q, grid, jnp.float32) * 2).astype(jnp.int8)
        scale = scale * 0.5
    return _group_sum(xq, codes, grid._replace(scale=scale), jnp.int32) * sx


def qeinsum(subscripts: str, x: jax.Array, q: QArray, *, backend: str = "auto", act_quant: str | None = None):
    """``jnp.einsum(subscripts, x, W)`` with a ``QArray`` weight ``W`` as second operand.

    When ``W``'s contracted axes come first and its kept axes last (the
    layout of Flax's ``Einsum`` / ``DenseGeneral`` kernels), the product runs
    as a :func:`qdot` on the flattened weight (a free reshape of the packed
    bytes). A 2-D ``W`` contracted over its last (packed) axis,
    ``"...d,vd->...v"`` (the tied logits of an embedding table), runs on the
    CPU (``auto`` or ``chunked``) block by block over ``W``'s rows, each
    block's nibbles decoded straight into two dots; on NVIDIA GPUs
    (``auto``, bf16 / f16, up to ``PALLAS_TRANSPOSED_MAX_M`` rows; or
    ``pallas``) through the transposed Pallas kernel where the table is
    scaled per row or per column (with ``auto`` on Hopper GPUs, int4 tables
    and bf16 up to ``MOSAIC_LOGITS_MAX_M`` rows: Mosaic GPU's kernel, also for
    tables in groups along ``d``); otherwise (``auto`` or ``dequant``) as
    one dot over ``W`` decoded to x's dtype (as ``dequant`` does; its
    gradient too, with the decoding recomputed in the backward pass). For every other layout, or ``backend="xla"``, it
    is the reference ``jnp.einsum`` over the dequantized weight. As in ``jnp.einsum``, ``x``'s
    subscripts may hold an ellipsis (``"...d,df->...f"``) and ``->`` may be
    left out (the output is then the ellipsis and the letters that appear
    once, in alphabetical order).

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> w = jax.random.normal(jax.random.key(0), (8, 2, 4))
      >>> q = qj.quantize(w, qj.QuantSpec(axis=0))
      >>> x = jnp.ones((3, 5, 8))
      >>> y = qj.qeinsum("btd,dhk->bthk", x, q)
      >>> y.shape, bool(jnp.allclose(y, jnp.einsum("btd,dhk->bthk", x, qj.dequantize(q)), atol=1e-4))
      ((3, 5, 2, 4), True)
      >>> qj.qeinsum("...d,dhk->...hk", x, q).shape
      (3, 5, 2, 4)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"qeinsum: the second operand must be a QArray, got {type(q).__name__}")
    x = jnp.asarray(x)
    lhs, rhs, out = _einsum_letters(subscripts, x, q)
    subscripts = f"{lhs},{rhs}->{out}"
    for letter in set(lhs) & set(rhs):
        if x.shape[lhs.index(letter)] != q.shape[rhs.index(letter)]:
            raise ValueError(
                f"qeinsum: axis {letter!r} has size {x.shape[lhs.index(letter)]} in x of shape {x.shape} "
                f"but {q.shape[rhs.index(letter)]} in q of shape {q.shape}"
            )
    if jnp.iscomplexobj(x):
        return _complex_parts(lambda part: qeinsum(subscripts, part, q, backend=backend, act_quant=act_quant), x, q)
    contracted = [c for c in rhs if c in lhs and c not in out]
    kept = [c for c in rhs if c not in contracted]
    simple = (backend != "xla" and contracted and all(c in out for c in lhs if c not in contracted)
              and all(c not in lhs and c in out for c in kept))
    flat = simple and rhs[: len(contracted)] == "".join(contracted) and _flattenable(q, len(contracted))
    # "...d,vd->...v": a 2-D weight contracted over its last, packed axis (tied embedding logits)
    transposed = simple and act_quant is None and q.ndim == 2 and contracted == [rhs[1]]
    if not (flat or transposed):
        w = dequantize(q, jnp.float32)
        y = jnp.einsum(subscripts, x.astype(jnp.float32) if act_quant is None else fake_int8_tokens(x), w,
                       precision=lax.Precision.HIGHEST)
        return y.astype(jnp.result_type(x.dtype, q.dtype))
    free_x = [c for c in lhs if c not in contracted]
    xt = jnp.transpose(x, [lhs.index(c) for c in free_x + contracted])
    x2 = xt.reshape(xt.shape[: len(free_x)] + (-1,))
    if transposed:
        y = _qdot_transposed(x2, q, backend)
    else:
        y = qdot(x2, _flatten(q, len(contracted)), backend=backend, act_quant=act_quant)
    y = y.reshape(xt.shape[: len(free_x)] + tuple(q.shape[rhs.index(c)] for c in kept))
    return jnp.transpose(y, [(free_x + kept).index(c) for c in out])


def dense_general_subscripts(ndim: int, axes, n_features: int) -> tuple[str, int]:
    """``(einsum subscripts, number of free input axes)`` of a DenseGeneral / LinearGeneral product:
    inputs of ``ndim`` axes contracted over ``axes`` (in order) with a kernel ``in + features``.

    Example:
      >>> dense_general_subscripts(3, (2,), 2)
      ('abc,cde->abde', 2)
    """
    letters = string.ascii_letters[:ndim]
    free = "".join(c for i, c in enumerate(letters) if i not in axes)
    outs = string.ascii_letters[ndim: ndim + n_features]
    return f"{letters},{''.join(letters[a] for a in axes)}{outs}->{free}{outs}", len(free)


def contracts_last_axis_only(subscripts: str) -> bool:
    """Whether an ``"x,W->out"`` einsum contracts x's last axis and no other (then per-token int8 over
    the last axis, as QAT quantizes, is also per row of ``qeinsum``'s product)."""
    inputs, _, out = subscripts.replace(" ", "").partition("->")
    lhs, _, rhs = inputs.partition(",")
    return [c for c in lhs if c in rhs and c not in out] == [lhs[-1:]]


def embedding_logits(query, table: QArray, *, dtype=None, backend: str = "auto"):
    """``query @ dequantize(table).T`` in ``dtype`` (default: ``query``'s and the table's result type):
    the tied output logits of an embedding ``table`` of shape ``(vocab, features)``, as
    ``qeinsum("...d,vd->...v", ...)`` computes them."""
    dtype = dtype or jnp.result_type(query, table.dtype)
    return qeinsum("...d,vd->...v", jnp.asarray(query, dtype), table, backend=backend).astype(dtype)


def _qdot_transposed(x, q: QArray, backend: str):
    """``x @ dequantize(q).T`` for ``q`` of shape ``(N, K)``, contracted over its packed axis: ``chunked``
    by :func:`_chunked_transposed`, ``dequant`` by :func:`_dequant_transposed`, ``auto`` and ``pallas``
    per platform (:func:`_transposed_impl`: on NVIDIA GPUs the transposed Pallas kernel at small M);
    other backends the reference."""
    out_dtype = jnp.result_type(x.dtype, q.dtype)
    x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(out_dtype)
    lead = x.shape[:-1]
    if q.size == 0:  # an empty table, or nothing to contract: as jnp.matmul, zeros
        return jnp.zeros(lead + (q.shape[0],), out_dtype)

    def product(x, q):
        x2 = x.reshape(-1, q.shape[1])
        if backend == "chunked":
            y = _chunked_transposed(x2.astype(jnp.float32), q)
        elif backend == "dequant":
            y = _dequant_transposed(x2, q)
        elif backend in ("auto", "pallas", "native"):
            y = _bind(_transposed_p, x2, q, backend=backend)
        else:
            y = _reference_transposed(x2, q)
        return y.reshape(lead + (q.shape[0],)).astype(out_dtype)

    return _with_natural_sharding(product, x, q, weight_axis=0)


@jax.checkpoint  # reverse mode decodes the table again rather than keep it
def _dequant_transposed(x, q: QArray):
    """The table decoded to x's dtype (bf16, f16, else float32), one dot accumulating in float32: for
    bf16 / f16 activations half the memory of the float32 decoding, rounded as in ``dequant``; their
    derivatives multiply in that dtype too (:func:`_wide_dot`)."""
    dtype = _dot_dtype(x.dtype)
    if dtype == jnp.float32:
        return lax.dot_general(x.astype(dtype), dequantize(q, dtype), (((1,), (1,)), ((), ())),
                               precision=lax.Precision.HIGHEST)
    return _wide_dot(x.astype(dtype), dequantize(q, dtype))


@jax.custom_jvp
def _wide_dot(a, b):
    """``a @ b.T`` for bf16 / f16 operands, summed and returned in float32; its tangents are products in
    the operands' dtype, so reverse mode multiplies ``g @ b`` on the tensor cores (JAX's own transpose
    would multiply the float32 cotangent by ``b`` converted to float32)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(_wide_dot.defjvp, symbolic_zeros=True)
def _wide_dot_jvp(primals, tangents):
    (a, b), (da, db) = primals, tangents
    terms = []  # a symbolic zero (the table's, when only the query varies) costs no product
    if not isinstance(da, jax.custom_derivatives.SymbolicZero):
        terms.append(lax.dot_general(da, b, (((1,), (1,)), ((), ()))).astype(jnp.float32))
    if not isinstance(db, jax.custom_derivatives.SymbolicZero):
        terms.append(lax.dot_general(a, db, (((1,), (1,)), ((), ()))).astype(jnp.float32))
    return _wide_dot(a, b), sum(terms[1:], terms[0])


class _RowBlocks(NamedTuple):
    """A 2-D QArray's packed rows in zero-padded blocks, and for each row the row of its scales."""

    packed: jax.Array  # (blocks, rows, bytes)
    index: np.ndarray  # (blocks, rows), or (blocks, 1) where one scale row serves them all


def _row_blocks(q: QArray, rows: int) -> _RowBlocks:
    n = q.shape[0]
    lay = _layout.layout(q.shape, q.spec)
    n_blocks = -(-n // rows)
    packed = jnp.pad(q.packed, ((0, n_blocks * rows - n), (0, 0))).reshape(n_blocks, rows, -1)
    scale_rows = q.scale.shape[0]  # 1, n, or one per group of rows
    if scale_rows == 1:
        return _RowBlocks(packed, np.zeros((n_blocks, 1), np.int32))
    per_group = lay.group_size if lay.group_axis == 0 else 1
    index = np.minimum(np.arange(n_blocks * rows) // per_group, scale_rows - 1).reshape(n_blocks, rows)
    return _RowBlocks(packed, index.astype(np.int32))


def _decoded_halves(q: QArray, packed, index) -> tuple[jax.Array, jax.Array]:
    """A block of ``q``'s rows decoded to float32 as ``dequantize`` decodes them, as its even and its odd
    columns (the bytes' low and high nibbles): ``(rows, ceil(n / 2))`` each, the odd padded with zeros."""
    n = q.shape[1]
    lay = _layout.layout(q.shape, q.spec)
    col_group = lay.group_size if lay.group_axis == 1 else 1

    def halves(a):  # the block's scales (rows | 1, 1 | n | groups) -> the even and odd columns', broadcastable
        if a is None:
            return None, None
        a = jnp.take(a, index, axis=0)
        if a.shape[1] == 1:
            return a, a
        return _even_odd(jnp.repeat(a, col_group, axis=1)[:, :n] if col_group > 1 else a, n)

    fmt = q.spec.fmt
    return tuple(dequantize_codes(c, s, z, fmt)
                 for c, s, z in zip(_nibbles(packed, fmt), halves(q.scale), halves(q.zero_point)))


def _chunked_transposed(x, q: QArray):
    """CPU: ``x @ dequantize(q).T`` over blocks of ``q``'s rows (at most 256, and at most 2**20 decoded
    values: 4 MiB of float32); each byte's low and high nibbles (even and odd K) feed two dots with x's
    even and odd columns, so nothing is interleaved and the float weight never exists in memory. The
    decoded values are ``dequantize``'s own; only the sums' order differs from the reference.

    Block rows measured on the project's CPU VM (32000 x 2048 and x 4096, 16000 x 8192, M = 1, 8, 64;
    benchmarks/RESULTS.md): 256 rows up to K = 4096 and 128 at K = 8192 were the fastest or near it;
    512 rows at K = 2048 took 1.3-2.4x as long."""
    n, k = q.shape
    blocks = _row_blocks(q, int(min(256, max(8, 2**20 // k), n)))
    x_halves = _even_odd(x, k)

    @jax.checkpoint  # reverse mode keeps the packed blocks, not their decoding
    def block(p, i):
        return sum(lax.dot_general(xh, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)
                   for xh, w in zip(x_halves, _decoded_halves(q, p, i)))

    ys = lax.map(lambda c: block(*c), tuple(blocks))  # (blocks, M, rows)
    return jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], -1)[:, :n]


def _blocked_product(x, q: QArray):
    """``x @ dequantize(q)`` as a sum over blocks of ``q``'s rows, each decoded (``_decoded_halves``) into
    two dots for the even and odd output columns: linear in ``x``, so JAX transposes it block by block
    into ``g @ dequantize(q).T`` (the decoding recomputed per block, never the whole float weight). The
    CPU's tangent of :func:`qdot`, forward and reverse."""
    k, n = q.shape
    if q.size == 0:
        return jnp.zeros((x.shape[0], n), jnp.float32)
    rows = int(min(512, max(8, 2**20 // n), k))
    blocks = _row_blocks(q, rows)
    n_blocks = blocks.packed.shape[0]
    xs = _pad_k(x.astype(jnp.float32), n_blocks * rows).reshape(x.shape[0], n_blocks, rows).transpose(1, 0, 2)

    @jax.checkpoint
    def step(acc, c):
        xb, p, i = c
        return tuple(a + jnp.dot(xb, w, precision=lax.Precision.HIGHEST)
                     for a, w in zip(acc, _decoded_halves(q, p, i))), None

    # inside shard_map the carry must vary over the manual axes of x and the weight, as the sums it takes do
    zeros = jnp.zeros((x.shape[0], blocks.packed.shape[-1]), jnp.float32)
    zeros = _vary_alike(zeros, xs, q.packed, q.scale, *([] if q.zero_point is None else [q.zero_point]))[0]
    (even, odd), _ = lax.scan(step, (zeros, zeros), (xs, blocks.packed, blocks.index))
    return _interleave(even, odd, n)


def _einsum_letters(subscripts: str, x, q: QArray) -> tuple[str, str, str]:
    """``(x's, W's, output's)`` subscripts with the ellipsis spelled out and the output made explicit."""
    def bad(why):
        return ValueError(f"qeinsum: {why} in subscripts {subscripts!r} for x of shape {x.shape} and q of shape {q.shape}")

    spec = subscripts.replace(" ", "")
    inputs, arrow, out = spec.partition("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        raise bad("expected two operands, 'x,W->out'")
    lhs, rhs = operands
    for part in (lhs, rhs, out):
        if not re.fullmatch(r"[a-zA-Z]*(\.\.\.)?[a-zA-Z]*", part):
            raise bad(f"{part!r} is not letters with at most one '...'")
    if "..." in rhs:
        raise bad("an ellipsis in the QArray's subscripts is not supported (name its axes)")
    dots = ""
    if "..." in lhs:
        free = [c for c in string.ascii_letters if c not in spec]
        n = x.ndim - (len(lhs) - 3)
        if n < 0:
            raise bad(f"x has {x.ndim} axes, fewer than the {len(lhs) - 3} letters")
        dots = "".join(free[:n])
        lhs = lhs.replace("...", dots)
    if "..." in out and "..." not in inputs:
        raise bad("an ellipsis in the output but not in x")
    if not arrow:
        once = sorted(c for c in set(lhs + rhs) if (lhs + rhs).count(c) == 1 and c not in dots)
        out = dots + "".join(once)
    out = out.replace("...", dots)
    if len(lhs) != x.ndim or len(rhs) != q.ndim:
        raise bad(f"{len(lhs)} and {len(rhs)} letters for {x.ndim} and {q.ndim} axes")
    if len(set(out)) != len(out) or set(out) - set(lhs + rhs):
        raise bad(f"output {out!r} repeats a letter or names one no operand has")
    return lhs, rhs, out


def _flattenable(q: QArray, n_contracted: int) -> bool:
    """Whether ``q`` reshapes to 2-D ``(prod(contracted), prod(kept))`` with its bytes and scales as they are."""
    kept = q.shape[n_contracted:]
    if not kept or (len(kept) > 1 and kept[-1] % 2):
        return False
    lay = _layout.layout(q.shape, q.spec)
    if lay.group_axis is not None:
        return n_contracted == 1 and lay.group_axis == 0
    return set(range(n_contracted)) <= set(lay.reduced)  # kept axes may share scales too: broadcast then


def _flatten(q: QArray, n_contracted: int) -> QArray:
    k = 1
    for d in q.shape[:n_contracted]:
        k *= d
    n = q.size // k
    lay = _layout.layout(q.shape, q.spec)
    rows = lay.scale_shape[0] if lay.group_axis is not None else 1
    cols = 1 if set(lay.reduced) == set(range(q.ndim)) else n
    spec = q.spec if lay.group_axis is not None else dataclasses.replace(q.spec, axis=0 if cols > 1 else None)

    def scales(a):  # a scale shared along kept axes (e.g. over the heads of an einsum kernel) is repeated
        if a is None:
            return None
        if lay.group_axis is None and cols > 1:
            a = jnp.broadcast_to(a, (1,) * n_contracted + q.shape[n_contracted:])
        return a.reshape(rows, cols)

    return QArray(q.packed.reshape(k, -1), scales(q.scale), scales(q.zero_point), (k, n), q.dtype, spec)
