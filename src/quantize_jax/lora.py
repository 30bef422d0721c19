"""Low-rank adapters (LoRA) beside a packed weight, and folding them into it.

QLoRA (Dettmers et al., 2023) trains ``W + a @ b`` with ``W`` frozen in 4 bits.
For a Dense kernel ``(K, N)`` the adapters are ``a`` ``(K, r)`` and ``b``
``(r, N)``. :class:`LowRankEinsum` generalises that to any einsum layer
``y = einsum("x,w->y", x, W)``: each axis of the kernel is

* contracted (in ``x``, not in ``y``): on ``a``, which maps it to the rank;
* produced (in ``y``, not in ``x``): on ``b``, which maps the rank to it;
* a batch axis (in ``x`` and ``y``, e.g. heads): on both, one adapter each;

so ``a``'s axes are ``batch + contracted + r`` and ``b``'s ``batch + r + produced``,
the adapter's output ``einsum(einsum(x, a), b)`` (``x @ a`` first: the cheap
order) and its weight ``einsum(a, b)`` in the kernel's own axis order.
:func:`merge_low_rank` folds that weight into the packed one.
"""

from __future__ import annotations

import dataclasses
import string

import jax.numpy as jnp

from quantize_jax.qarray import QArray, dequantize, quantize


@dataclasses.dataclass(frozen=True)
class LowRankEinsum:
    """The subscripts of a rank-``r`` adapter beside the einsum ``"{inputs},{kernel}->{output}"``.

    Example:
      >>> from quantize_jax.lora import LowRankEinsum
      >>> lr = LowRankEinsum.of("BTD,NDH->BTNH")  # query heads N of size H from features D
      >>> lr.a, lr.b, lr.kernel_delta
      ('Da', 'aNH', 'Da,aNH->NDH')
      >>> lr.adapter_shapes((4, 32, 8), rank=2)
      ((32, 2), (2, 4, 8))
    """

    inputs: str
    kernel: str
    output: str
    rank: str  # a letter the einsum does not use

    @classmethod
    def of(cls, einsum_str: str) -> LowRankEinsum:
        """Parse ``"inputs,kernel->output"`` (spaces ignored, ``...`` allowed outside the kernel).

        Raises:
          ValueError: not two operands and an output, a kernel axis written with ``...`` or twice, or
            a kernel axis in neither the inputs nor the output, or none contracted or none produced
            (no rank-r factorisation of such a product).
        """
        s = einsum_str.replace(" ", "")
        lhs, arrow, output = s.partition("->")
        operands = lhs.split(",")
        if not arrow or len(operands) != 2:
            raise ValueError(f"LowRankEinsum: einsum_str={einsum_str!r} must read 'inputs,kernel->output'")
        inputs, kernel = operands
        if "." in kernel or len(set(kernel)) != len(kernel):
            raise ValueError(f"LowRankEinsum: the kernel's subscripts {kernel!r} in {einsum_str!r} must be distinct "
                             f"letters (no '...')")
        lone = [c for c in kernel if c not in inputs and c not in output]
        if lone:
            raise ValueError(f"LowRankEinsum: kernel axes {lone} of {einsum_str!r} are summed over the kernel alone")
        rank = next(c for c in string.ascii_letters if c not in s)
        lr = cls(inputs=inputs, kernel=kernel, output=output, rank=rank)
        if not lr.contracted or not lr.produced:
            raise ValueError(f"LowRankEinsum: {einsum_str!r} must contract an axis of the inputs and produce one "
                             f"of the output with its kernel (contracted {lr.contracted!r}, produced {lr.produced!r})")
        return lr

    @property
    def batch(self) -> str:
        """Kernel axes kept from the inputs to the output: one adapter per entry."""
        return "".join(c for c in self.kernel if c in self.inputs and c in self.output)

    @property
    def contracted(self) -> str:
        return "".join(c for c in self.kernel if c in self.inputs and c not in self.output)

    @property
    def produced(self) -> str:
        return "".join(c for c in self.kernel if c in self.output and c not in self.inputs)

    @property
    def a(self) -> str:
        return self.batch + self.contracted + self.rank

    @property
    def b(self) -> str:
        return self.batch + self.rank + self.produced

    @property
    def kernel_delta(self) -> str:
        """``einsum`` of ``a`` and ``b`` to the kernel's axes: the adapter's weight."""
        return f"{self.a},{self.b}->{self.kernel}"

    def adapter_shapes(self, kernel_shape, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``a`` and ``b`` for one kernel of ``kernel_shape``."""
        if len(kernel_shape) != len(self.kernel):
            raise ValueError(f"LowRankEinsum: kernel_shape={tuple(kernel_shape)} does not match the subscripts "
                             f"{self.kernel!r}")
        size = dict(zip(self.kernel, kernel_shape))
        sizes = lambda letters: tuple(size[c] for c in letters)  # noqa: E731
        return (sizes(self.batch + self.contracted) + (rank,),
                sizes(self.batch) + (rank,) + sizes(self.produced))

    def __call__(self, x, a, b):
        """The adapter's output ``einsum(einsum(x, a), b)``, in the einsum's output axes."""
        narrow = "".join(c for c in self.inputs if c not in self.contracted) + self.rank
        t = jnp.einsum(f"{self.inputs},{self.a}->{narrow}", x, a)
        return jnp.einsum(f"{narrow},{self.b}->{self.output}", t, b)


def merge_low_rank(q: QArray, a, b, *, subscripts: str | None = None) -> QArray:
    """``quantize(dequantize(q) + a @ b)`` with ``q``'s spec: a LoRA adapter folded into a packed weight.

    The sum is formed in float32 and rounded to the 4-bit grid again (its scales recomputed), so the
    merged weight differs from ``dequantize(q) + a @ b`` by about the quantization error. Stacked
    layers (``q`` of shape ``(L, K, N)``, ``a`` ``(L, K, r)``, ``b`` ``(L, r, N)``) merge layer by layer;
    a kernel with several input or output axes (a ``LinearGeneral``'s, ``(..., in axes, out axes)``)
    takes ``a @ b`` over those axes flattened, reshaped to its shape.

    Args:
      q: the packed weight.
      a, b: the adapters.
      subscripts: for an einsum layer's adapters, the einsum from ``a`` and ``b`` to one kernel's axes
        (:attr:`LowRankEinsum.kernel_delta`, e.g. ``"Da,aNH->NDH"``) instead of ``a @ b``; leading
        stacked-layer axes are added by ``...``.

    Example:
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> q = qj.quantize(jnp.eye(4), qj.QuantSpec(axis=0))
      >>> merged = qj.lora.merge_low_rank(q, jnp.ones((4, 1)), jnp.full((1, 4), 0.5))
      >>> [round(v, 3) for v in qj.dequantize(merged)[0].tolist()]  # 0.5 on the grid of steps 1.5 / 7
      [1.5, 0.429, 0.429, 0.429]
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if subscripts is None:
        delta = jnp.matmul(a, b)
        stack = delta.shape[:-2]
        fits = delta.size == q.size and tuple(q.shape[: len(stack)]) == stack
    else:
        lhs, _, k_sub = subscripts.replace(" ", "").partition("->")
        a_sub, b_sub = lhs.split(",")
        delta = jnp.einsum(f"...{a_sub},...{b_sub}->...{k_sub}", a, b)
        fits = delta.shape == q.shape
    if not fits:
        raise ValueError(f"merge_low_rank: the adapters a {a.shape} and b {b.shape} make a weight of shape "
                         f"{delta.shape}, which does not fit the packed weight {q.shape}")
    return quantize((dequantize(q, jnp.float32) + delta.reshape(q.shape)).astype(q.dtype), q.spec)
