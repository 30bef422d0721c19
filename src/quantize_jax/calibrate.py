"""Scales and zero points from data: ``absmax``, ``minmax``, ``percentile``, ``mse``.

For a group of values with range ``[lo, hi]`` (``lo <= 0 <= hi``):

* symmetric formats: ``s = a / L`` with ``a = max(|lo|, |hi|)`` and ``L`` the
  format's largest level magnitude (7 for ``int4``, 1 for ``nf4``, 6 for
  ``fp4``), so ``+a`` maps to the top level and nothing is clipped;
* ``uint4``: ``s = (hi - lo) / 15`` and ``z = clip(-round(lo / s), 0, 15)``,
  so 0.0 is exactly representable.

The methods choose the range: ``absmax`` (``[-max|x|, max|x|]``), ``minmax``
(``[min(x, 0), max(x, 0)]``), ``percentile`` (the ``spec.percentile``-th
percentile instead of the maximum) and ``mse`` (the absmax / minmax range
shrunk by the ratio in ``[mse_min_ratio, 1]`` that minimises each group's
squared quantization error; a vectorised, jit-able grid search).

The quotients are rounded once (:func:`true_divide`), as numpy computes them,
then rounded to ``spec.scale_dtype`` and kept at least that dtype's smallest
normal number, so an all-zero group gets a tiny positive scale and quantizes
to exact zeros, never NaN (so does an empty one, where the reduced axis has
length 0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quantize_jax import _layout
from quantize_jax.formats import dequantize_codes, quantize_to_codes
from quantize_jax.spec import QuantSpec, spec_or_default


def compute_scale(x: jnp.ndarray, spec: QuantSpec | None = None):
    """Calibrate the scale (and zero point) of ``x`` for ``spec``.

    Args:
      x: a floating-point array.
      spec: the :class:`QuantSpec` (default ``QuantSpec()``: int4, one scale).

    Returns:
      ``(scale, zero_point)``. ``scale`` has ``x``'s shape with the reduced
      axes kept as size 1, or, with ``group_size``, the number of groups on
      the grouped axis; it has dtype ``spec.scale_dtype``. ``zero_point`` has
      the same shape and dtype with integer values (``uint4``), or is ``None``
      for symmetric formats.

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> w = jnp.array([[1.0, -2.0], [0.5, 7.0]])
      >>> s, z = qj.compute_scale(w, qj.QuantSpec(axis=0))
      >>> s.tolist(), z
      ([[0.1428571492433548, 1.0]], None)
    """
    spec = spec_or_default(spec, "compute_scale")
    x = check_float_array(x, "x", "compute_scale")
    lay = _layout.layout(x.shape, spec, "x")
    s, z = grouped_scale(_layout.to_groups(x.astype(jnp.float32), lay), lay, spec)
    return _layout.scale_from_groups(s, lay), None if z is None else _layout.scale_from_groups(z, lay)


def check_float_array(x, name: str, fn: str) -> jnp.ndarray:
    """``x`` as a jax array, or a TypeError naming ``fn`` and ``name`` if it is not floating point."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {x.dtype} of shape {tuple(x.shape)}")
    return jnp.asarray(x)


def grouped_scale(xg: jnp.ndarray, lay: _layout.Layout, spec: QuantSpec):
    """Scale and zero point in the grouped view (kept dims), from float32 ``xg``."""
    fmt = spec.fmt
    red = lay.reduced
    if any(xg.shape[a] == 0 for a in red):  # groups without elements: scaled as all-zero ones
        nothing = jnp.zeros([1 if a in red else d for a, d in enumerate(xg.shape)], jnp.float32)
        return range_to_scale(nothing, nothing, spec)
    if spec.method == "percentile":
        lo, hi = _percentile_range(xg, lay, spec)
    elif spec.method == "minmax" or (spec.method == "mse" and fmt.has_zero_point):
        lo = jnp.minimum(jnp.min(xg, axis=red, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(xg, axis=red, keepdims=True), 0.0)
    else:  # absmax; also where the symmetric mse search starts
        hi = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
        lo = -hi
    if spec.method == "mse":
        return _mse_search(xg, lo, hi, red, spec)
    return range_to_scale(lo, hi, spec)


def range_to_scale(lo: jnp.ndarray, hi: jnp.ndarray, spec: QuantSpec):
    """Scale (and zero point) that map ``[lo, hi]`` onto the format's levels."""
    fmt = spec.fmt
    dt = jnp.dtype(spec.scale_dtype)
    if fmt.has_zero_point:
        s = _clean_scale(true_divide(hi - lo, fmt.qmax - fmt.qmin), dt)
        z = jnp.clip(fmt.qmin - jnp.round(lo * (1.0 / s.astype(jnp.float32))), fmt.qmin, fmt.qmax)
        return s, z.astype(dt)
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _clean_scale(true_divide(a, fmt.max_abs_level), dt), None


def true_divide(a: jnp.ndarray, divisor: float) -> jnp.ndarray:
    """``a / divisor`` in float32, rounded once (to nearest, ties to even) as numpy and PyTorch compute
    it, eagerly and under ``jit``, on every backend.

    XLA turns a division by a constant (or a broadcast scalar) into a product with the divisor's
    rounded reciprocal: ``a / 7`` becomes ``a * 0.14285715``, one ulp off for about half of all ``a``.
    So that quotient ``q`` is taken as a guess (within one ulp), and of ``q`` and its neighbour on the
    side of the remainder ``a - q * divisor``, the one with the smaller remainder is kept. Remainders are
    exact: ``q`` is split into two halves of 12 significant bits, so that each half times ``divisor`` and
    both subtractions (Sterbenz) are exact for a divisor of at most 12 significant bits (every format's:
    7, 15, 6, 1); tiny ``|a|`` is scaled up first so that they stay normal. A longer divisor is divided
    by plainly.

    Example:
      >>> import jax, numpy as np
      >>> a = np.float32(2.910885)
      >>> bool(jax.jit(lambda a: a / 6)(a) == a / np.float32(6))  # XLA's rewrite
      False
      >>> bool(jax.jit(lambda a: true_divide(a, 6))(a) == a / np.float32(6))
      True
    """
    a = jnp.asarray(a, jnp.float32)
    if not _short(divisor):
        return a / divisor
    q = _divide_rounded(a, abs(float(divisor)))
    return q if divisor > 0 else -q


_TINY = 2.0**-90  # below this, |a| * 2**-24 (a remainder) would leave float32's normal range
_LIFT = 2.0**60


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _divide_rounded(a, divisor):
    magnitude = jnp.abs(a)
    tiny = magnitude < _TINY
    m = jnp.where(tiny, magnitude * _LIFT, magnitude)  # exact: a power of two
    guess = m / divisor

    def remainder(q):  # m - q * divisor, exactly
        high = lax.bitcast_convert_type(lax.bitcast_convert_type(q, jnp.uint32) & np.uint32(0xFFFFF000), jnp.float32)
        return (m - high * divisor) - (q - high) * divisor

    r0 = remainder(guess)
    bits = lax.bitcast_convert_type(guess, jnp.int32)
    neighbour_bits = bits + jnp.where(r0 > 0, 1, -1).astype(jnp.int32)  # the next float up or down (q > 0)
    neighbour = lax.bitcast_convert_type(neighbour_bits, jnp.float32)
    r1 = remainder(neighbour)
    closer = (jnp.abs(r1) < jnp.abs(r0)) | ((jnp.abs(r1) == jnp.abs(r0)) & (neighbour_bits % 2 == 0))
    q = jnp.where((r0 != 0) & closer, neighbour, guess)
    q = jnp.where(tiny, q * (1.0 / _LIFT), q)
    # Dividing by a one XLA cannot see through ends the chain with a division, which XLA's fusion does
    # not copy into consumers: without it, the ~40 operations above ran again for every element a scale
    # multiplies (a QAT step over a 1024 x 1024 kernel: 2.9 -> 3.8 ms).
    one = magnitude * 0.0 + 1.0
    q = jnp.where(jnp.signbit(a), -q, q) / one
    return jnp.where(jnp.isfinite(a), q, a / divisor)


@_divide_rounded.defjvp
def _divide_rounded_jvp(divisor, primals, tangents):
    return _divide_rounded(primals[0], divisor), tangents[0] / divisor


def _short(divisor: float) -> bool:
    """Whether ``divisor`` is a finite, non-zero float32 of at most 12 significant bits."""
    if not math.isfinite(divisor) or float(np.float32(divisor)) != float(divisor):
        return False
    mantissa = math.frexp(float(divisor))[0] * 2**12
    return mantissa != 0 and mantissa == int(mantissa)


def _clean_scale(s: jnp.ndarray, dt) -> jnp.ndarray:
    # At least the smallest normal number: 1 / s stays finite, and zero groups give zeros. NaN stays NaN.
    return jnp.maximum(s.astype(dt), jnp.finfo(dt).tiny)


def _percentile_range(xg, lay, spec):
    red = lay.reduced
    if lay.pad:  # padded elements must not count: mark them NaN and use nanquantile
        n = lay.shape[lay.group_axis]
        pos = lax.broadcasted_iota(jnp.int32, xg.shape, lay.group_axis) * lay.group_size
        pos = pos + lax.broadcasted_iota(jnp.int32, xg.shape, lay.group_axis + 1)
        xg = jnp.where(pos < n, xg, jnp.nan)
    q = spec.percentile / 100.0
    if spec.fmt.has_zero_point:
        lo = jnp.nanquantile(xg, 1.0 - q, axis=red, keepdims=True)
        hi = jnp.nanquantile(xg, q, axis=red, keepdims=True)
        return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    a = jnp.nanquantile(jnp.abs(xg), q, axis=red, keepdims=True)
    return -a, a


def _mse_search(xg, lo, hi, red, spec):
    """Grid search of the clipping ratio ``r``: keep, per group, the ``r * [lo, hi]``
    with the smallest ``sum((fake_quant(x) - x) ** 2)``. Memory stays O(size of x).

    Every candidate is scored by the same scan body, and the ratios are numpy constants,
    so the chosen scales are the same eagerly and under any enclosing ``jit``
    (``jnp.linspace`` traced under a jit gave a different float32 ratio than eagerly).
    """
    fmt = spec.fmt
    ratios = np.linspace(1.0, spec.mse_min_ratio, spec.mse_steps, dtype=np.float32)

    def step(best, r):
        best_err, best_s, best_z = best
        s, z = range_to_scale(lo * r, hi * r, spec)
        x_hat = dequantize_codes(quantize_to_codes(xg, s, z, fmt), s, z, fmt)
        err = jnp.sum(jnp.square(x_hat - xg), axis=red, keepdims=True)
        better = err < best_err
        best_z = None if z is None else jnp.where(better, z, best_z)
        return (jnp.where(better, err, best_err), jnp.where(better, s, best_s), best_z), None

    s, z = range_to_scale(lo, hi, spec)  # replaced by the first candidate: every error is < inf
    (_, s, z), _ = lax.scan(step, (jnp.full(s.shape, jnp.inf, jnp.float32), s, z), ratios)
    return s, z
