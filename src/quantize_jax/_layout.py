"""How a spec's scale groups lie over an array (private).

Every scale covers the elements of one *group*. Working on a "grouped view"
makes all cases one case: per tensor and per axis reduce the spec's axes of
``x`` itself; with ``group_size`` the grouped axis ``a`` of length ``n`` is
zero-padded to ``G * g`` and reshaped to ``(G, g)``, and the reduction is over
the new axis ``a + 1``. Scales live in the grouped view with kept dims; their
public shape drops the size-1 axis of the group elements.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from quantize_jax.spec import QuantSpec


class Layout(NamedTuple):
    shape: tuple[int, ...]
    reduced: tuple[int, ...]  # reduced axes of the grouped view
    group_axis: int | None  # the grouped axis of x, if grouping
    group_size: int  # elements per group along group_axis (1 when not grouping)
    n_groups: int

    @property
    def pad(self) -> int:
        return self.n_groups * self.group_size - self.shape[self.group_axis] if self.group_axis is not None else 0

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """The public shape of a scale: kept dims, or ``n_groups`` on the grouped axis."""
        if self.group_axis is None:
            return tuple(1 if i in self.reduced else d for i, d in enumerate(self.shape))
        a = self.group_axis
        return self.shape[:a] + (self.n_groups,) + self.shape[a + 1 :]


def layout(shape, spec: QuantSpec, name: str = "x") -> Layout:
    shape = tuple(int(d) for d in shape)
    axes = spec.reduced_axes(len(shape), name=name, shape=shape)
    if spec.group_size is None:
        return Layout(shape, axes, None, 1, 1)
    (a,) = axes
    n = shape[a]
    g = max(1, min(spec.group_size, n))
    return Layout(shape, (a + 1,), a, g, max(1, math.ceil(n / g)))


def to_groups(x: jnp.ndarray, lay: Layout, pad_value=0.0) -> jnp.ndarray:
    """``x`` in the grouped view (a reshape, plus a pad when groups do not divide)."""
    a = lay.group_axis
    if a is None:
        return x
    if lay.pad:
        widths = [(0, 0)] * x.ndim
        widths[a] = (0, lay.pad)
        x = jnp.pad(x, widths, constant_values=pad_value)
    return x.reshape(x.shape[:a] + (lay.n_groups, lay.group_size) + x.shape[a + 1 :])


def from_groups(xg: jnp.ndarray, lay: Layout) -> jnp.ndarray:
    """Inverse of :func:`to_groups`: back to ``lay.shape``."""
    a = lay.group_axis
    if a is None:
        return xg
    x = xg.reshape(xg.shape[:a] + (lay.n_groups * lay.group_size,) + xg.shape[a + 2 :])
    return x[(slice(None),) * a + (slice(0, lay.shape[a]),)] if lay.pad else x


def scale_to_groups(s: jnp.ndarray, lay: Layout) -> jnp.ndarray:
    """A public-shape scale (or zero point) in the grouped view."""
    return s if lay.group_axis is None else jnp.expand_dims(s, lay.group_axis + 1)


def scale_from_groups(sg: jnp.ndarray, lay: Layout) -> jnp.ndarray:
    return sg if lay.group_axis is None else jnp.squeeze(sg, lay.group_axis + 1)


def check_scale_shape(s, lay: Layout, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``s`` broadcasts as a scale of ``lay``."""
    want = lay.scale_shape
    got = tuple(jnp.shape(s))
    if got == want or got == ():
        return
    if lay.group_axis is None and len(got) <= len(want):
        padded = (1,) * (len(want) - len(got)) + got
        if all(g in (1, w) for g, w in zip(padded, want)):
            return
    raise ValueError(
        f"{name}: shape {got} does not fit x of shape {lay.shape} with this spec; expected {want} (or a scalar)"
    )
