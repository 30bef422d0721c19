"""``QuantSpec``: how to quantize an array, as a frozen, hashable value."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantize_jax.formats import FORMATS, Format, get_format

METHODS = ("absmax", "minmax", "percentile", "mse")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize an array to 4 bits.

    A spec is frozen and hashable, so it can be a static argument of
    ``jax.jit`` without retracing; it is also a pytree with no leaves, so a
    jitted function takes it as a plain argument too
    (``jax.jit(qj.fake_quant)(x, spec)``).

    Attributes:
      format: ``"int4"`` (default, [-8, 7]), ``"uint4"`` ([0, 15] with a zero
        point), ``"nf4"`` (QLoRA NormalFloat) or ``"fp4"`` (OCP e2m1).
      axis: the axis, or tuple of axes, **reduced** to compute one scale, as in
        ``jnp.max(x, axis=...)``. ``None`` (default): one scale for the whole
        array. For a Dense kernel ``(in, out)``, ``axis=0`` gives one scale per
        output channel.
      group_size: split the (single) reduced axis into consecutive groups of
        this many elements, each with its own scale. A size that does not divide
        the axis is allowed: the last group is shorter.
      method: how the scale is calibrated: ``"absmax"`` (default for symmetric
        formats), ``"minmax"`` (default for ``uint4``; zero-point formats
        only), ``"percentile"`` or ``"mse"`` (search of the clipping ratio
        that minimises the squared error of each group).
      scale_dtype: the dtype scales (and zero points) are stored in; the scale
        is rounded to it before quantizing, so stored values reproduce exactly.
      percentile: for ``method="percentile"``, the percentile of ``|x|`` (or of
        ``x`` at both ends for ``uint4``) that maps to the largest level.
      mse_steps, mse_min_ratio: for ``method="mse"``, the clipping ratios tried
        are ``mse_steps`` values evenly spaced in ``[mse_min_ratio, 1]``
        times the ``absmax`` (or ``minmax``) range.

    Example:
      >>> import quantize_jax as qj
      >>> spec = qj.QuantSpec(format="int4", axis=0, group_size=128)
      >>> spec.method
      'absmax'
      >>> qj.QuantSpec(format="uint4").method
      'minmax'
    """

    format: str = "int4"
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    method: str | None = None
    scale_dtype: str = "float32"
    percentile: float = 99.9
    mse_steps: int = 32
    mse_min_ratio: float = 0.3

    def __post_init__(self):
        fmt = get_format(self.format)  # raises ValueError naming the format
        object.__setattr__(self, "format", fmt.name)
        axis = self.axis
        if axis is not None:
            if isinstance(axis, (Sequence, np.ndarray)) and not isinstance(axis, str):
                axis = tuple(axis)
                if not axis or not all(_is_int(a) for a in axis):
                    raise ValueError(f"axis: expected an int, a non-empty tuple of ints or None, got {self.axis!r}")
                if len(set(axis)) != len(axis):
                    raise ValueError(f"axis: repeated axes in {self.axis!r}")
                axis = tuple(int(a) for a in axis)
                if len(axis) == 1:
                    axis = axis[0]
            elif _is_int(axis):
                axis = int(axis)
            else:
                raise ValueError(f"axis: expected an int, a tuple of ints or None, got {self.axis!r}")
        object.__setattr__(self, "axis", axis)
        if self.group_size is not None:
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(f"group_size: expected a positive int or None, got {self.group_size!r}")
            if not isinstance(self.axis, int):
                raise ValueError(
                    f"group_size: grouping needs a single reduced axis, got axis={self.axis!r} "
                    f"with group_size={self.group_size}"
                )
            object.__setattr__(self, "group_size", int(self.group_size))
        method = self.method
        if method is None:
            method = "minmax" if fmt.has_zero_point else "absmax"
        if method not in METHODS:
            raise ValueError(f"method: unknown calibration method {method!r}; expected one of {list(METHODS)}")
        if method == "minmax" and not fmt.has_zero_point:
            raise ValueError(
                f"method: 'minmax' needs a format with a zero point ('uint4'), got format={fmt.name!r}; "
                "use 'absmax' for symmetric formats"
            )
        object.__setattr__(self, "method", method)
        try:
            dt = jnp.dtype(self.scale_dtype)
        except TypeError:
            raise ValueError(f"scale_dtype: not a dtype: {self.scale_dtype!r}") from None
        if not jnp.issubdtype(dt, jnp.floating) or dt.itemsize < 2:
            raise ValueError(f"scale_dtype: expected float32, bfloat16 or float16, got {self.scale_dtype!r}")
        object.__setattr__(self, "scale_dtype", dt.name)
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile: expected a value in (50, 100], got {self.percentile!r}")
        if not _is_int(self.mse_steps) or self.mse_steps < 1:
            raise ValueError(f"mse_steps: expected a positive int, got {self.mse_steps!r}")
        if not 0.0 < float(self.mse_min_ratio) <= 1.0:
            raise ValueError(f"mse_min_ratio: expected a value in (0, 1], got {self.mse_min_ratio!r}")

    @property
    def fmt(self) -> Format:
        """The :class:`~quantize_jax.formats.Format` object of ``format``."""
        return FORMATS[self.format]

    def reduced_axes(self, ndim: int, *, name: str = "x", shape=None) -> tuple[int, ...]:
        """The reduced axes as non-negative ints for an array of rank ``ndim``.

        Raises:
          ValueError: an axis is out of range; the message names ``name`` and
            its shape.
        """
        if self.axis is None:
            return tuple(range(ndim))
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        out = []
        for a in axes:
            if not -ndim <= a < ndim:
                shown = f"shape {tuple(shape)}" if shape is not None else f"rank {ndim}"
                raise ValueError(f"axis: axis {a} is out of range for {name} of {shown}")
            out.append(a % ndim)
        if len(set(out)) != len(out):
            raise ValueError(f"axis: {self.axis!r} names the same axis twice for {name} of rank {ndim}")
        return tuple(sorted(out))


def spec_or_default(spec, fn: str) -> QuantSpec:
    """``spec``, or ``QuantSpec()`` for None; a TypeError naming ``fn`` for anything else."""
    if spec is None:
        return QuantSpec()
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec (or None), got {type(spec).__name__} {spec!r}")
    return spec


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
