"""Rounding with straight-through gradients, and ``fake_quant``.

``fake_quant(x, spec)`` is ``dequantize(quantize(x, spec))`` computed in one
pass, bit for bit, with gradients for training:

* for ``x``: straight through (identity), zeroed where the rounded code fell
  outside the format's range (PyTorch's fake-quant mask);
* for an explicit ``scale``: the LSQ gradient (Esser et al., 2019)

  .. math::

     \\frac{\\partial \\hat x}{\\partial s} =
     \\begin{cases} \\mathrm{round}(x/s) - x/s & \\text{inside the range} \\\\
     q_{min} - z & \\text{below it} \\\\ q_{max} - z & \\text{above it}
     \\end{cases}

  summed over the elements that share the scale (for ``nf4`` / ``fp4``,
  ``round`` is the nearest level and ``qmin``/``qmax`` the extreme levels);
* for an explicit ``zero_point``: ``0`` inside the range and ``-s`` outside
  (LSQ+, Bhalgat et al., 2020, with a straight-through round of ``z``).

No gradient flows through a scale that ``fake_quant`` computed itself.

References:
  Bengio et al., 2013, "Estimating or Propagating Gradients Through Stochastic
  Neurons for Conditional Computation" (straight-through estimator).
  Esser et al., 2019, "Learned Step Size Quantization", ICLR 2020.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from quantize_jax import _layout
from quantize_jax.calibrate import check_float_array, grouped_scale
from quantize_jax.formats import Format, dequantize_codes, quantize_to_codes
from quantize_jax.spec import QuantSpec, spec_or_default


@jax.custom_jvp
def round_ste(x: jnp.ndarray) -> jnp.ndarray:
    """Round half to even with a straight-through gradient (``d/dx = 1``).

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> qj.round_ste(jnp.array([0.5, 1.5, 2.4])).tolist()
      [0.0, 2.0, 2.0]
      >>> jax.grad(lambda x: qj.round_ste(x).sum())(jnp.array([0.3, 1.7])).tolist()
      [1.0, 1.0]
    """
    return jnp.round(x)


round_ste.defjvps(lambda g, ans, x: g)


def stochastic_round(x: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """Round up with probability ``x - floor(x)``, else down; gradient 1.

    ``E[stochastic_round(x)] = x``: unbiased rounding, as used for low-precision
    training (Gupta et al., 2015, "Deep Learning with Limited Numerical Precision").

    Args:
      x: a floating-point array.
      key: a ``jax.random`` key; the same key gives the same rounding.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> r = qj.stochastic_round(jnp.full((10000,), 0.25), jax.random.key(0))
      >>> bool(abs(r.mean() - 0.25) < 0.02), sorted(set(r.tolist()))
      (True, [0.0, 1.0])
    """
    x = check_float_array(x, "x", "stochastic_round")
    noise = jax.random.uniform(key, x.shape, jnp.float32).astype(x.dtype)
    return x + jax.lax.stop_gradient(jnp.floor(x + noise) - x)


def fake_quant(x: jnp.ndarray, spec: QuantSpec | None = None, *, scale=None, zero_point=None) -> jnp.ndarray:
    """Quantize and dequantize ``x`` in one pass, with training gradients.

    The forward value equals ``dequantize(quantize(x, spec))`` bit for bit:
    ``(clip(round(x * (1 / s)) + z, qmin, qmax) - z) * s`` computed in float32
    and cast back to ``x.dtype``. With the same ``s`` and ``z`` it equals
    ``torch.fake_quantize_per_channel_affine`` / ``per_tensor_affine`` with
    ``quant_min=-8, quant_max=7`` (``0, 15`` for ``uint4``).

    Args:
      x: a floating-point array.
      spec: the :class:`QuantSpec` (default ``QuantSpec()``).
      scale: an explicit (for example learned) scale, shaped like
        ``compute_scale(x, spec)[0]``, or a scalar. It gets the LSQ gradient.
        ``None``: calibrate from ``x`` with ``spec.method`` (no gradient).
      zero_point: an explicit zero point for ``uint4`` (rounded in the forward
        pass, LSQ+ gradient). ``None``: calibrated with the scale.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> x = jnp.array([0.26, -1.0, 0.74, 2.0])
      >>> qj.fake_quant(x, qj.QuantSpec(), scale=0.5).tolist()
      [0.5, -1.0, 0.5, 2.0]
      >>> jax.grad(lambda x: qj.fake_quant(x, qj.QuantSpec(), scale=0.1).sum())(x).tolist()
      [1.0, 0.0, 1.0, 0.0]
    """
    spec = spec_or_default(spec, "fake_quant")
    x = check_float_array(x, "x", "fake_quant")
    fmt = spec.fmt
    lay = _layout.layout(x.shape, spec, "x")
    xg = _layout.to_groups(x, lay)
    if scale is None:
        if zero_point is not None:
            raise ValueError("fake_quant: zero_point given without scale; pass both or neither")
        s, z = grouped_scale(jax.lax.stop_gradient(xg).astype(jnp.float32), lay, spec)
        s = jax.lax.stop_gradient(s)
        z = None if z is None else jax.lax.stop_gradient(z)
    else:
        s = _explicit(scale, lay, "scale")
        z = None
        if fmt.has_zero_point:
            if zero_point is None:
                raise ValueError(f"fake_quant: format {fmt.name!r} needs zero_point when scale is given")
            z = _explicit(zero_point, lay, "zero_point")
        elif zero_point is not None:
            raise ValueError(f"fake_quant: format {fmt.name!r} is symmetric and takes no zero_point")
    y = _fake_quant(fmt, xg, s, jnp.zeros((), jnp.float32) if z is None else z, z is not None)
    return _layout.from_groups(y, lay)


def _explicit(v, lay, name):
    """An explicit scale or zero point, checked against the layout, in the grouped view, floating."""
    _layout.check_scale_shape(v, lay, name)
    v = jnp.asarray(v)
    v = v if jnp.issubdtype(v.dtype, jnp.floating) else v.astype(jnp.float32)
    return _layout.scale_to_groups(v, lay) if v.ndim else v


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _fake_quant(fmt: Format, x, s, z, has_z: bool):
    return _forward(fmt, x, s, z, has_z)[0]


def _forward(fmt, x, s, z, has_z):
    """The forward value, and ``x / s``, the rounded level and ``round(z)`` for the gradients."""
    s32 = jnp.maximum(s.astype(jnp.float32), jnp.finfo(jnp.float32).tiny)
    z32 = jnp.round(z.astype(jnp.float32)) if has_z else None
    level = dequantize_codes(quantize_to_codes(x.astype(jnp.float32), s32, z32, fmt), 1.0, z32, fmt)
    return (level * s32).astype(x.dtype), (s32, z32, level)


def _fake_quant_fwd(fmt, x, s, z, has_z):
    return _fake_quant(fmt, x, s, z, has_z), (x, s, z)


def _fake_quant_bwd(fmt, has_z, residuals, g):
    x, s, z = residuals  # recomputed rather than stored: QAT keeps no float32 copies of the weights
    _, (s32, z32, level) = _forward(fmt, x, s, z, has_z)
    y = x.astype(jnp.float32) * (1.0 / s32)
    inside = fmt.in_range(y, z32)
    g32 = g.astype(jnp.float32)
    gx = jnp.where(inside, g, jnp.zeros_like(g))
    gs = _sum_to(g32 * (level - jnp.where(inside, y, 0.0)), s.shape).astype(s.dtype)
    gz = _sum_to(jnp.where(inside, 0.0, -g32 * s32), z.shape).astype(z.dtype) if has_z else jnp.zeros_like(z)
    return gx, gs, gz


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _sum_to(a: jnp.ndarray, shape) -> jnp.ndarray:
    """Sum ``a`` down to the broadcast-compatible ``shape`` (the reverse of broadcasting)."""
    lead = a.ndim - len(shape)
    a = jnp.sum(a, axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and a.shape[i] != 1)
    return jnp.sum(a, axis=axes, keepdims=True) if axes else a
