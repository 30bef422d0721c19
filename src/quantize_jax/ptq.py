"""Post-training quantization of whole parameter trees, with a per-leaf report, and GPTQ.

``quantize_params(params)`` walks any pytree (plain dicts, Flax Linen
params, NNX state), quantizes the leaves chosen by rules into QArrays, one
leaf at a time under ``jit`` (peak memory stays near the largest leaf), and
reports per leaf: path, shape, spec, SQNR and bytes before and after.

``gptq(w, x, spec)`` quantizes a ``(K, N)`` Dense kernel column by column
with error compensation (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"): minimising
``||x @ w - x @ w_hat||^2`` instead of ``||w - w_hat||^2``; ``gptq_kernel``
does the same for kernels of any layout, and ``conv_rows`` gives a
convolution's inputs as the rows its kernel multiplies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quantize_jax import _layout
from quantize_jax.calibrate import check_float_array, compute_scale, grouped_scale
from quantize_jax.qarray import QArray, dequantize, quantize
from quantize_jax.rules import compile_rules
from quantize_jax.spec import QuantSpec
from quantize_jax.formats import dequantize_codes, quantize_to_codes

_SKIP_BY_DEFAULT = re.compile(r"(^|/)(bias|scale|norm|ln|layernorm|rmsnorm|embedding_norm)[^/]*$", re.I)


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """What happened to one leaf: its path, shape, spec (None: kept as it was), SQNR and bytes."""

    path: str
    shape: tuple[int, ...]
    spec: QuantSpec | None
    sqnr_db: float | None
    bytes_before: int
    bytes_after: int
    method: str = ""


@dataclasses.dataclass(frozen=True)
class PTQReport:
    """The per-leaf report of :func:`quantize_params`; ``str()`` gives a table."""

    leaves: tuple[LeafReport, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.leaves)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.leaves)

    @property
    def quantized(self) -> tuple[LeafReport, ...]:
        return tuple(r for r in self.leaves if r.spec is not None)

    def __str__(self) -> str:
        lines = [f"{'path':40} {'shape':>16} {'format':>6} {'group':>5} {'method':>10} {'SQNR dB':>8} "
                 f"{'bytes before':>12} {'bytes after':>12}"]
        for r in self.leaves:
            fmt = r.spec.format if r.spec else "-"
            group = str(r.spec.group_size or "-") if r.spec else "-"
            sqnr = f"{r.sqnr_db:8.2f}" if r.sqnr_db is not None else f"{'-':>8}"
            lines.append(f"{r.path[:40]:40} {str(r.shape):>16} {fmt:>6} {group:>5} {r.method or '-':>10} {sqnr} "
                         f"{r.bytes_before:12d} {r.bytes_after:12d}")
        ratio = self.bytes_before / max(self.bytes_after, 1)
        lines.append(f"total: {len(self.quantized)} of {len(self.leaves)} leaves quantized, "
                     f"{self.bytes_before} -> {self.bytes_after} bytes ({ratio:.2f}x smaller)")
        return "\n".join(lines)


def default_spec(shape, path: str = "") -> QuantSpec:
    """int4 with the ``mse`` clipping search, one scale per output channel, groups of 128 along the input
    axis of a 2-D kernel of at least 256 rows (kernels: inputs on the leading axes, outputs last).

    A Flax embedding table (a 2-D leaf named ``embedding``, ``(vocab, features)``) is read by rows: one
    scale per row, groups of 128 along its features when it has at least 256 (so a lookup reads one
    row's codes and scales, see :func:`~quantize_jax.take`)."""
    if len(shape) == 2 and path.rsplit("/", 1)[-1] == "embedding":
        return QuantSpec(format="int4", axis=1, group_size=128 if shape[1] >= 256 else None, method="mse")
    if len(shape) == 2:
        group = 128 if shape[0] >= 256 else None
        return QuantSpec(format="int4", axis=0, group_size=group, method="mse")
    return QuantSpec(format="int4", axis=tuple(range(len(shape) - 1)), method="mse")


def path_str(path) -> str:
    """``"layers/0/kernel"`` for a ``jax.tree_util`` key path."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(p for p in parts if p not in ("value", "raw_value"))


def quantize_params(params, rules=None, *, min_size: int = 4096, calibration: Mapping | None = None,
                    progress: bool = True):
    """Quantize the float leaves of a parameter tree into QArrays.

    Args:
      params: any pytree of arrays (dicts, Linen params, NNX state).
      rules: ``{regex: QuantSpec | None}`` or a list of pairs over the leaf
        paths (``"layers/0/kernel"``); the first rule whose regex
        ``re.search``-es the path decides (``None`` or ``"skip"`` keeps the
        leaf). Leaves no rule matches get the default: float arrays with at
        least 2 dimensions and ``min_size`` elements, not biases or norms, with
        :func:`default_spec`.
      min_size: the size below which the default leaves a leaf float.
      calibration: ``{path: x}`` with calibration inputs ``x`` of shape
        ``(n, K)`` for 2-D kernels ``(K, N)`` to quantize with :func:`gptq`
        instead of rounding to nearest.
      progress: show a tqdm progress bar.

    Layers stacked for ``lax.scan`` (kernels ``(L, K, N)``): the default
    reduces every axis but the last, so the layers would share each output
    channel's scale; a rule with ``axis=1`` (and any ``group_size``) keeps
    each layer's own scales, and ``scan`` then hands each step that layer's
    QArray, as ``quantize(kernel[i], QuantSpec(axis=0, ...))`` gives it.

    Returns:
      ``(quantized_params, report)``: the same tree with QArray leaves, and a
      :class:`PTQReport` (``print(report)`` gives the table).

    Raises:
      ValueError: a leaf chosen for quantization holds NaN or Inf (its path is
        named), or a rule's spec does not fit its leaf.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 64)), "bias": jnp.zeros(64)}}
      >>> qparams, report = qj.quantize_params(params, progress=False)
      >>> type(qparams["dense"]["kernel"]).__name__, report.quantized[0].spec.group_size
      ('QArray', 128)
    """
    compiled = compile_rules(rules) if rules is not None else []
    calibration = dict(calibration or {})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda a: isinstance(a, QArray))
    out, reports = [], []
    for key_path, leaf in progress_bar(leaves, progress, "quantize_params", "leaf"):
        path = path_str(key_path)
        spec = _choose(path, leaf, compiled, min_size)
        nbytes = _nbytes(leaf)
        if spec is None:
            out.append(leaf)
            reports.append(LeafReport(path, tuple(np.shape(leaf)), None, None, nbytes, nbytes))
            continue
        x = jnp.asarray(leaf)
        try:
            if path in calibration:
                if not bool(jnp.all(jnp.isfinite(x))):
                    raise _NonFinite
                q = gptq(x, calibration.pop(path), spec)
                sqnr, method = float(_sqnr_jit(x, dequantize(q, jnp.float32))), "gptq"
            else:
                q, finite, sqnr = _quantize_and_measure(x, spec)  # one pass, one host sync per leaf
                if not bool(finite):
                    raise _NonFinite
                sqnr, method = float(sqnr), spec.method
        except _NonFinite:
            raise ValueError(f"quantize_params: leaf {path!r} of shape {x.shape} holds NaN or Inf; refusing to quantize")
        except ValueError as e:
            raise ValueError(f"quantize_params: leaf {path!r}: {e}") from None
        out.append(q)
        reports.append(LeafReport(path, tuple(x.shape), spec, sqnr, nbytes, q.nbytes, method))
    if calibration:
        raise ValueError(f"quantize_params: calibration given for paths that were not quantized: {sorted(calibration)}")
    return jax.tree_util.tree_unflatten(treedef, out), PTQReport(tuple(reports))


def progress_bar(items, show: bool, desc: str, unit: str):
    """``items`` behind a tqdm progress bar when ``show``, else as they are."""
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def moment_passes(layers, nbytes, max_bytes, batches, fn: str, *, sequential: bool = False) -> list[list]:
    """``layers`` split, in order, into passes over the calibration ``batches`` whose recorded moments
    (``nbytes(layer)`` each) add up to at most ``max_bytes`` (one pass when None; a layer larger than
    that alone), or one layer per pass when ``sequential``. Several passes read ``batches`` again: an
    iterator (read once) is refused."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"{fn}: max_moment_bytes must be a positive int or None, got {max_bytes!r}")
    if sequential or max_bytes is None:
        passes = [[layer] for layer in layers] if sequential else [list(layers)]
    else:
        passes, used = [], 0
        for layer in layers:
            size = nbytes(layer)
            if not passes or used + size > max_bytes:
                passes.append([])
                used = 0
            passes[-1].append(layer)
            used += size
    if len(passes) > 1 and iter(batches) is batches:
        why = "sequential=True" if sequential else f"max_moment_bytes={max_bytes}"
        raise ValueError(f"{fn}: {why} needs {len(passes)} passes over the batches, which is an iterator "
                         f"({type(batches).__name__}) and can be read once; give a list")
    return passes


class _NonFinite(Exception):
    pass


@functools.partial(jax.jit, static_argnums=1)
def _quantize_and_measure(x, spec):
    """The QArray, whether ``x`` is all finite, and the SQNR (dB) of its dequantized values."""
    q = quantize(x, spec)
    return q, jnp.all(jnp.isfinite(x)), _sqnr(x, dequantize(q, jnp.float32))


def _sqnr(x, x_hat):
    x = x.astype(jnp.float32)
    err = jnp.sum(jnp.square(x - x_hat.astype(jnp.float32)))
    return 10.0 * jnp.log10(jnp.sum(jnp.square(x)) / err)


_sqnr_jit = jax.jit(_sqnr)


def _nbytes(leaf) -> int:
    if isinstance(leaf, QArray):
        return leaf.nbytes
    if hasattr(leaf, "nbytes"):
        return int(leaf.nbytes)
    return 0


def _choose(path, leaf, compiled, min_size):
    if isinstance(leaf, QArray) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return None
    for regex, spec in compiled:
        if regex.search(path):
            return spec
    shape = tuple(leaf.shape)
    if len(shape) < 2 or math.prod(shape) < min_size or _SKIP_BY_DEFAULT.search(path):
        return None
    return default_spec(shape, path)


def gptq(w, x, spec: QuantSpec, *, damp: float = 0.01, act_order: bool = False) -> QArray:
    """GPTQ: quantize a Dense kernel ``w`` ``(K, N)`` for inputs ``x`` ``(n, K)`` with error compensation.

    Rows of ``w`` (input features) are quantized in order; after each, the
    remaining rows absorb the error weighted by the inverse Hessian
    ``H = x^T x / n + damp * mean(diag) * I`` (its upper Cholesky factor, as in
    the paper). Group scales are fixed when the walk reaches their group,
    from the weights as updated so far.

    With ``act_order`` the rows are walked by decreasing ``diag(H)`` (the
    inputs with the most energy first, while most rows remain to absorb
    their error: AutoGPTQ's ``desc_act``); groups then take their scales
    from the weights before the walk ("static groups"), since a group's
    rows are scattered over it.

    Args:
      w: ``(K, N)`` float kernel.
      x: ``(..., K)`` calibration inputs of the layer (leading axes are
        flattened into samples).
      spec: scales along K: per output channel (``axis=0``) or groups along
        axis 0; any format and method.
      damp: the dampening, relative to the mean diagonal of ``H``.
      act_order: walk the rows by decreasing ``diag(H)``.

    Returns:
      A QArray whose ``x @ dequantize(q)`` approximates ``x @ w`` better than
      rounding to nearest.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> x = jax.random.normal(jax.random.key(0), (512, 64)) @ jax.random.normal(jax.random.key(1), (64, 64))
      >>> w = jax.random.normal(jax.random.key(2), (64, 32))
      >>> spec = qj.QuantSpec(axis=0, group_size=32)
      >>> err = lambda q: float(jnp.sum((x @ w - x @ qj.dequantize(q)) ** 2))
      >>> err(qj.ptq.gptq(w, x, spec)) < err(qj.quantize(w, spec))
      True
    """
    x = check_float_array(x, "x", "gptq")
    if x.ndim < 2 or jnp.ndim(w) != 2 or x.shape[-1] != jnp.shape(w)[0]:
        raise ValueError(f"gptq: expected w of shape (K, N) and x of shape (..., K), got w {jnp.shape(w)} and "
                         f"x {x.shape}")
    _check_finite(x, "x")
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return gptq_from_hessian(w, gram(x) / x.shape[0], spec, damp=damp, act_order=act_order)


def gptq_from_hessian(w, h, spec: QuantSpec, *, damp: float = 0.01, act_order: bool = False) -> QArray:
    """:func:`gptq` from the inputs' second moment ``h = x^T x / n`` ``(K, K)`` instead of the inputs:
    for inputs seen in batches (sum each batch's ``x^T x``, divide by the rows), as
    :func:`quantize_jax.nnx.to_serving_gptq` does. ``gptq(w, x, spec)`` is
    ``gptq_from_hessian(w, x.T @ x / n, spec)``.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> x = jax.random.normal(jax.random.key(0), (256, 64))
      >>> w = jax.random.normal(jax.random.key(1), (64, 16))
      >>> q = qj.ptq.gptq_from_hessian(w, x.T @ x / 256, qj.QuantSpec(axis=0))
      >>> q.shape
      (64, 16)
    """
    w, h = _checked_matrix(w, h)
    lay = _layout.layout(w.shape, spec, "w")
    if not (lay.group_axis == 0 or (lay.group_axis is None and lay.reduced == (0,))):
        raise ValueError(f"gptq: the spec must put scales along axis 0 (axis=0, optionally grouped), got axis={spec.axis!r}")
    s, z, w_hat = _gptq_jit(w.astype(jnp.float32), h.astype(jnp.float32), spec, float(damp), None, bool(act_order))
    return quantize(w_hat.astype(w.dtype), spec, scale=s, zero_point=z)  # w_hat's values lie on the grid


def _checked_matrix(w, h):
    """``w`` ``(K, N)`` and ``h`` ``(K, K)`` as float arrays, checked for shape and for NaN / Inf."""
    w = check_float_array(w, "w", "gptq")
    h = check_float_array(h, "h", "gptq")
    if w.ndim != 2 or h.shape != (w.shape[0],) * 2:
        raise ValueError(f"gptq: expected w of shape (K, N) and h of shape (K, K), got w {w.shape} and h {h.shape}")
    _check_finite(w, "w")
    _check_finite(h, "h")
    return w, h


def gptq_kernel(w, h, spec: QuantSpec, *, input_axes, groups: int = 1, damp: float = 0.01,
                act_order: bool = False) -> QArray:
    """GPTQ for a kernel of any layout: ``w``'s ``input_axes`` (in the order the inputs are flattened)
    are contracted with the inputs, whose second moment ``h`` is ``(K, K)``; the rest are outputs.

    The kernel is viewed as ``(K, N)`` (input axes first, flattened; the others in their order),
    quantized by :func:`gptq_from_hessian` per output feature (or in groups along a single input axis),
    and returned in its own layout and ``spec``, which must reduce the input axes: for
    ``"BTD,NDH->BTNH"`` (kernel ``(N, D, H)``), ``input_axes=(1,)`` and ``QuantSpec(axis=1)``. A spec
    that also reduces output axes (``QuantSpec(axis=(0, 1))``: one scale per ``H``, shared by the heads;
    or per tensor) is computed from the whole kernel first and held fixed while GPTQ walks the inputs
    ("static groups"), since a scale cannot be chosen when one of its columns is reached. ``damp`` and
    ``act_order`` are :func:`gptq`'s. ``groups`` (a grouped convolution's ``feature_group_count``):
    the single output axis splits into that many contiguous groups, each multiplying inputs of its own,
    whose moments ``h`` ``(groups, K, K)`` holds (:func:`gram` with ``groups``); the spec must then
    reduce exactly the input axes.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> w = jax.random.normal(jax.random.key(0), (4, 64, 8))  # (heads, features, head features)
      >>> x = jax.random.normal(jax.random.key(1), (256, 64))
      >>> q = qj.ptq.gptq_kernel(w, x.T @ x / 256, qj.QuantSpec(axis=1), input_axes=(1,))
      >>> q.shape, q.scale.shape
      ((4, 64, 8), (4, 1, 8))
    """
    w = check_float_array(w, "w", "gptq")
    input_axes = tuple(a % w.ndim for a in input_axes)
    reduced = spec.reduced_axes(w.ndim, name="w", shape=w.shape)  # axes out of range: named
    if not gptq_applies(spec, w.ndim, input_axes):
        raise ValueError(f"gptq: the spec must reduce the input axes {input_axes} of w of shape {w.shape} (and "
                         f"may reduce output axes too, without groups), got axis={spec.axis!r}, "
                         f"group_size={spec.group_size!r}")
    if groups != 1:
        return _gptq_groups(w, h, spec, input_axes, reduced, groups, damp, act_order)
    n_in = len(input_axes)
    axes = input_axes + tuple(a for a in range(w.ndim) if a not in input_axes)
    viewed = tuple(w.shape[a] for a in axes)
    back = tuple(int(a) for a in np.argsort(axes))
    matrix = w.transpose(axes).reshape(math.prod(viewed[:n_in]), -1)
    by_column = dataclasses.replace(spec, axis=0)
    if reduced != tuple(sorted(input_axes)):  # scales shared across outputs: fixed first
        scale, zero_point = compute_scale(w, spec)

        def columns(a):  # the kernel's scale broadcast to every output feature, as a (1, N) row of the view
            return jnp.broadcast_to(a, w.shape).transpose(axes)[(0,) * n_in].reshape(1, -1)

        matrix, h = _checked_matrix(matrix, h)
        fixed = tuple(None if a is None else columns(a) for a in (scale, zero_point))
        on_grid = _gptq_jit(matrix.astype(jnp.float32), h.astype(jnp.float32), by_column, float(damp), fixed,
                            bool(act_order))[2]
        return quantize(on_grid.reshape(viewed).transpose(back).astype(w.dtype), spec, scale=scale,
                        zero_point=zero_point)
    flat = gptq_from_hessian(matrix, h, by_column, damp=damp, act_order=act_order)
    scale_shape = _layout.layout(w.shape, spec).scale_shape

    def placed(a):  # the (groups, N) scales of the (K, N) view -> the kernel's own scale layout
        if a is None:
            return None
        return a.reshape(a.shape[:1] + (1,) * (n_in - 1) + viewed[n_in:]).transpose(back).reshape(scale_shape)

    on_grid = dequantize(flat, jnp.float32).reshape(viewed).transpose(back)  # GPTQ's values lie on its grid
    return quantize(on_grid.astype(w.dtype), spec, scale=placed(flat.scale), zero_point=placed(flat.zero_point))


def _gptq_groups(w, h, spec, input_axes, reduced, groups, damp, act_order) -> QArray:
    """:func:`gptq_kernel` of each output group of a grouped convolution's kernel on its own moments
    ``h[g]``, in one vmapped walk; the groups' values and scales put back side by side."""
    outputs = [a for a in range(w.ndim) if a not in input_axes]
    if (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or len(outputs) != 1
            or w.shape[outputs[0]] % groups):
        raise ValueError(f"gptq: groups={groups!r} must divide the single output axis of w of shape {w.shape} "
                         f"(input axes {input_axes})")
    (out,) = outputs
    k = math.prod(w.shape[a] for a in input_axes)
    h = check_float_array(h, "h", "gptq")
    if h.shape != (groups, k, k) or reduced != tuple(sorted(input_axes)):
        raise ValueError(f"gptq: with groups={groups}, expected h of shape {(groups, k, k)} and a spec reducing the "
                         f"input axes {input_axes} alone, got h {h.shape} and axis={spec.axis!r}")
    _check_finite(w, "w")
    _check_finite(h, "h")
    split = jnp.moveaxis(w.reshape(w.shape[:out] + (groups, -1) + w.shape[out + 1:]), out, 0)

    def one(w_g, h_g):  # one group: its values on the grid and its scales, in the kernel's layout
        q = gptq_kernel(w_g, h_g, spec, input_axes=input_axes, damp=damp, act_order=act_order)
        return dequantize(q, jnp.float32), q.scale, q.zero_point

    on_grid, scale, zero_point = jax.vmap(one)(split, h)

    def joined(a):  # (groups, ..., n / groups, ...) -> (..., n, ...), the groups side by side
        return None if a is None else jnp.moveaxis(a, 0, out).reshape(a.shape[1:out + 1] + (-1,) + a.shape[out + 2:])

    return quantize(joined(on_grid).astype(w.dtype), spec, scale=joined(scale), zero_point=joined(zero_point))


def conv_rows(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count: int = 1, batch_group_count: int = 1, **options) -> tuple[jax.Array, tuple[int, ...]]:
    """The rows a convolution multiplies its kernel with (im2col), for GPTQ of a conv kernel.

    Takes :func:`jax.lax.conv_general_dilated`'s arguments (``options`` such as
    ``precision`` do not change the rows) and returns ``(rows, input_axes)``:
    ``rows`` ``(n, K)`` float32, one per output position, with
    ``conv(lhs, rhs) == rows @ rhs.transpose(input_axes + (out,)).reshape(K, -1)``
    (up to float reassociation), and ``input_axes`` the kernel axes ``K``
    flattens, in order (the input channels, then the spatial axes): what
    :func:`gptq_kernel` takes with ``h = rows^T rows / n``. Memory: the
    inputs times the kernel's spatial size. For a grouped convolution
    (``feature_group_count=G``, depthwise when ``G`` is the channel count)
    the ``K`` columns are ``G`` contiguous blocks, one per group of input
    channels, the inputs of that group's outputs: ``gram(rows, groups=G)``
    holds their moments and :func:`gptq_kernel` takes them with ``groups=G``.

    Example:
      >>> import jax, quantize_jax as qj
      >>> x = jax.random.normal(jax.random.key(0), (8, 10, 10, 4))   # NHWC
      >>> w = jax.random.normal(jax.random.key(1), (3, 3, 4, 16))    # HWIO
      >>> rows, axes = qj.ptq.conv_rows(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> rows.shape, axes
      ((800, 36), (2, 0, 1))
      >>> h = qj.ptq.gram(rows) / len(rows)
      >>> qj.ptq.gptq_kernel(w, h, qj.QuantSpec(axis=(0, 1, 2)), input_axes=axes).shape
      (3, 3, 4, 16)
    """
    if batch_group_count != 1:
        raise ValueError(f"conv_rows: convolutions grouped over the batch are not supported, got batch_group_count="
                         f"{batch_group_count}")
    dn = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers)
    spatial = tuple(jnp.shape(rhs)[a] for a in dn.rhs_spec[2:])
    patches = lax.conv_general_dilated_patches(lhs, spatial, window_strides, padding, lhs_dilation, rhs_dilation,
                                               dn, precision=lax.Precision.HIGHEST)  # one-hot filters: exact copies
    rows = jnp.moveaxis(patches, dn.out_spec[1], -1)
    return rows.reshape(-1, rows.shape[-1]).astype(jnp.float32), tuple(int(a) for a in dn.rhs_spec[1:])


def gram(rows, groups: int | None = None) -> jax.Array:
    """``rows^T rows`` in float32 at the highest precision: the second moment calibration adds up over
    batches (divided by the row count, GPTQ's ``h``) for rows ``(..., n, K)`` (leading axes: one moment
    each). With ``groups``, the columns split into that many contiguous blocks and each block's own:
    ``(..., groups, K / groups, K / groups)`` (a grouped convolution's, :func:`conv_rows`)."""
    rows = jnp.asarray(rows, jnp.float32)
    if groups is None:
        return jnp.einsum("...nk,...nl->...kl", rows, rows, precision=lax.Precision.HIGHEST)
    blocks = rows.reshape(rows.shape[:-1] + (groups, -1))
    return jnp.einsum("...ngk,...ngl->...gkl", blocks, blocks, precision=lax.Precision.HIGHEST)


def conv_input_axes(spatial_dims: int) -> tuple[int, ...]:
    """The input axes of a Flax convolution kernel ``(spatial..., in, out)`` in the order of
    :func:`conv_rows`' patches: the input channels, then the spatial axes."""
    return (spatial_dims,) + tuple(range(spatial_dims))


class GptqView(NamedTuple):
    """How GPTQ sees the kernel of one layer (of a stack): its weight ``spec``; its ``input_axes``, the
    kernel axes that meet the inputs, in the order the inputs flatten them; ``batch``, the inputs' axes
    holding the kernel's leading batch axes (an einsum's experts or heads: each entry walked on its own
    inputs, :func:`~quantize_jax.lora.gptq_einsum_axes`); ``groups``, a grouped convolution's."""

    spec: QuantSpec
    input_axes: tuple[int, ...]
    batch: tuple[int, ...] = ()
    groups: int = 1

    def rows(self, inputs) -> jax.Array:
        """The inputs (contracted axes last) as rows ``(batch..., n, K)``."""
        kb, n_in = len(self.batch), len(self.input_axes)
        x = jnp.moveaxis(inputs, self.batch, tuple(range(kb)))
        return x.reshape(x.shape[:kb] + (-1, math.prod(x.shape[x.ndim - n_in:])))

    def moments(self, rows) -> tuple[jax.Array, jax.Array]:
        """What a layer adds up per batch: ``x^T x`` of :meth:`rows` (each group's, for a grouped
        convolution) and the row count of each batch entry."""
        xtx = gram(rows, self.groups if self.groups > 1 else None)
        return xtx, jnp.full(jnp.shape(rows)[:-2], jnp.shape(rows)[-2], jnp.float32)

    def entry(self, ndim: int) -> tuple[QuantSpec, tuple[int, ...]] | None:
        """The spec and input axes of one batch entry of a kernel of rank ``ndim`` (its leading batch
        axes dropped), or None where the spec reduces a batch axis or GPTQ cannot take the entry."""
        kb = len(self.batch)
        if any(a < kb for a in self.spec.reduced_axes(ndim)):
            return None
        spec = self.spec
        if kb:  # no batch axis is reduced, so the spec names axes; counted from the front, they move
            axes = (spec.axis,) if isinstance(spec.axis, int) else spec.axis
            spec = dataclasses.replace(spec, axis=tuple(a - kb if a >= 0 else a for a in axes))
        input_axes = tuple(a - kb for a in self.input_axes)
        if self.groups > 1:  # each group walks on its own: no scale may span groups
            return (spec, input_axes) if set(spec.reduced_axes(ndim - kb)) == set(input_axes) else None
        return (spec, input_axes) if gptq_applies(spec, ndim - kb, input_axes) else None


def gptq_stacked(kernel, xtx, rows, view: GptqView, *, fn: str, where: str, damp: float = 0.01,
                 act_order: bool = False) -> QArray:
    """:func:`gptq_kernel` for a layer's kernel from its recorded ``xtx`` (``sum x^T x``) and ``rows``: a
    layer stacked by ``vmap`` / ``scan`` (``rows`` of shape ``stack``, the kernel and ``xtx`` with those
    leading axes), and each entry of its kernel's batch axes, quantized on its own inputs and returned
    stacked. ``fn`` and ``where`` (the layer's path) name a layer that recorded no row."""
    stack = tuple(jnp.shape(rows))
    if tuple(jnp.shape(kernel)[:len(stack)]) != stack or tuple(jnp.shape(xtx)[:len(stack)]) != stack:
        raise ValueError(f"{fn}: layer {where!r} recorded inputs for layers stacked {stack}, but its kernel has "
                         f"shape {tuple(jnp.shape(kernel))}: stack its parameters along the same leading axes")
    spec, input_axes = view.entry(jnp.ndim(kernel) - len(stack) + len(view.batch))
    quantized = []
    for index in np.ndindex(*stack):
        if not float(rows[index]):
            which = f"{where!r}" + (f", stacked layer or entry {index}" if stack else "")
            raise ValueError(f"{fn}: layer {which} was never called on the batches")
        quantized.append(gptq_kernel(kernel[index], xtx[index] / rows[index], spec, input_axes=input_axes,
                                     groups=view.groups, damp=damp, act_order=act_order))
    if not stack:
        return quantized[0]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves).reshape(stack + leaves[0].shape), *quantized)


def _check_finite(a, name: str) -> None:
    if not isinstance(a, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a))):
        raise ValueError(f"gptq: {name} of shape {a.shape} holds NaN or Inf")


def gptq_applies(spec: QuantSpec, ndim: int, input_axes) -> bool:
    """Whether :func:`gptq_kernel` can quantize a kernel of rank ``ndim`` whose ``input_axes`` meet the
    inputs with ``spec``: its scales reduce exactly the input axes (per output feature, or groups along
    a single input axis), or, without groups, the input axes and some output axes (scales shared across
    outputs, fixed from the whole kernel before the walk, as "static groups")."""
    reduced = set(spec.reduced_axes(ndim, name="w"))
    wanted = {a % ndim for a in input_axes}
    return reduced == wanted or (spec.group_size is None and reduced > wanted)


@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _gptq_jit(w, h, spec, damp, fixed=None, act_order=False):
    """GPTQ with lazy batch updates: rows are quantized one by one inside a block (a scale group, or
    128 rows), and the block's accumulated errors reach the later rows in one matmul.

    Scales are per channel from the weights as they are, or ``fixed`` (``(scale, zero_point)`` rows
    ``(1, N)``); groups take theirs when the walk reaches them, or, with ``act_order`` (rows walked by
    decreasing ``diag(H)``, so a group's rows are scattered over the walk), from the weights before it."""
    k, n = w.shape
    lay = _layout.layout(w.shape, spec)
    grouped = lay.group_axis == 0
    dynamic = grouped and not act_order  # a block is a group: its scale is set when the walk reaches it
    block = lay.group_size if dynamic else min(128, k)
    n_blocks = -(-k // block)
    kp = n_blocks * block
    fmt = spec.fmt
    sdt = jnp.dtype(spec.scale_dtype)
    one_group = QuantSpec(format=spec.format, axis=0, method=spec.method, scale_dtype=spec.scale_dtype,
                          percentile=spec.percentile, mse_steps=spec.mse_steps, mse_min_ratio=spec.mse_min_ratio)
    if dynamic:
        s0 = z0 = jnp.zeros((lay.n_groups, n))
    elif grouped:
        s0, z0 = (_layout.scale_from_groups(a, lay) if a is not None else None
                  for a in grouped_scale(_layout.to_groups(w, lay), lay, spec))
    else:
        s0, z0 = fixed or grouped_scale(w, _layout.layout((k, n), one_group), one_group)
    scales0, zeros0 = s0.astype(sdt), (jnp.zeros_like(s0) if z0 is None else z0).astype(sdt)
    group_of_row = jnp.arange(k) // lay.group_size if grouped else jnp.zeros(k, jnp.int32)
    h = h + jnp.diag((jnp.diag(h) == 0).astype(h.dtype))  # inputs the calibration never sets: rounded to nearest
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
    if act_order:
        order = jnp.argsort(-jnp.diag(h), stable=True)
        w, h, group_of_row = w[order], h[order][:, order], group_of_row[order]
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T  # upper factor: H^-1 = U^T U
    pad = kp - k
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(kp) >= k).astype(u.dtype))  # padded rows: inert
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    group_of_row = jnp.pad(group_of_row, (0, pad))
    block_lay = _layout.layout((block, n), one_group)

    def run_block(b, carry):
        wc, scales, zeros = carry
        i0 = b * block
        wb = lax.dynamic_slice_in_dim(wc, i0, block, axis=0)
        if dynamic:
            valid = (i0 + jnp.arange(block)) < k
            s_g, z_g = grouped_scale(jnp.where(valid[:, None], wb, 0.0), block_lay, one_group)
            scales = lax.dynamic_update_slice_in_dim(scales, s_g.astype(sdt), b, axis=0)
            if z_g is not None:
                zeros = lax.dynamic_update_slice_in_dim(zeros, z_g.astype(sdt), b, axis=0)
        ub = lax.dynamic_slice(u, (i0, i0), (block, block))
        groups = lax.dynamic_slice_in_dim(group_of_row, i0, block)

        def row(r, c):
            wb, errs = c
            w_r, g = wb[r], groups[r]
            s_row, z_row = scales[g], (zeros[g] if fmt.has_zero_point else None)
            q_r = dequantize_codes(quantize_to_codes(w_r, s_row, z_row, fmt), s_row, z_row, fmt)
            e = (w_r - q_r) / ub[r, r]
            wb = (wb - ub[r][:, None] * e[None, :]).at[r].set(q_r)
            return wb, errs.at[r].set(e)

        wb, errs = lax.fori_loop(0, block, row, (wb, jnp.zeros((block, n), wc.dtype)))
        wc = lax.dynamic_update_slice_in_dim(wc, wb, i0, axis=0)
        later = (jnp.arange(kp) >= i0 + block).astype(u.dtype)
        u_rows = lax.dynamic_slice_in_dim(u, i0, block, axis=0) * later[None, :]
        return wc - u_rows.T @ errs, scales, zeros

    wq, scales, zeros = lax.fori_loop(0, n_blocks, run_block, (wp, scales0, zeros0))
    wq = wq[:k][jnp.argsort(order)] if act_order else wq[:k]
    return scales, (zeros if fmt.has_zero_point else None), wq
