"""Low-rank adapters (LoRA) beside a packed weight, and folding them into it.

QLoRA (Dettmers et al., 2023) trains ``W + a @ b`` with ``W`` frozen in 4 bits.
For a Dense kernel ``(K, N)`` the adapters are ``a`` ``(K, r)`` and ``b``
``(r, N)``. :class:`LowRankEinsum` generalises that to any einsum layer
``y = einsum("x,w->y", x, W)``: each axis of the kernel is

* contracted (in ``x``, not in ``y``): on ``a``, which maps it to the rank;
* produced (in ``y``, not in ``x``): on ``b``, which maps the rank to it;
* a batch axis (in ``x`` and ``y``, e.g. heads): on both, one adapter each;

so ``a``'s axes are ``batch + contracted + r`` and ``b``'s ``batch + r + produced``
(NNX's :class:`~quantize_jax.nnx.LoRAEinsum`), or both the kernel's own axes with
size 1 where they do not reach and the rank last (Linen's ``QuantEinsum``, whose
merge sees only arrays); the adapter's output is ``einsum(einsum(x, a), b)``
(``x @ a`` first: the cheap order), its weight (:func:`low_rank_weight`) ``einsum(a, b)``
in the kernel's own axis order. :func:`merge_low_rank` folds that weight into the packed one.
"""

from __future__ import annotations

import dataclasses
import math
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
        size = self._sizes(kernel_shape)
        sizes = lambda letters: tuple(size[c] for c in letters)  # noqa: E731
        return (sizes(self.batch + self.contracted) + (rank,),
                sizes(self.batch) + (rank,) + sizes(self.produced))

    def aligned_shapes(self, kernel_shape, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``a`` and ``b`` held in the kernel's own axes, size 1 where they do not reach
        (``a`` the produced axes, ``b`` the contracted ones), and the rank last: a layout whose weight
        :func:`low_rank_weight` finds from the shapes alone (Linen's ``"lora"`` collection)."""
        size = self._sizes(kernel_shape)
        return (tuple(1 if c in self.produced else size[c] for c in self.kernel) + (rank,),
                tuple(1 if c in self.contracted else size[c] for c in self.kernel) + (rank,))

    def _sizes(self, kernel_shape) -> dict[str, int]:
        """Each kernel letter's size in ``kernel_shape``."""
        if len(kernel_shape) != len(self.kernel):
            raise ValueError(f"LowRankEinsum: kernel_shape={tuple(kernel_shape)} does not match the subscripts "
                             f"{self.kernel!r}")
        return dict(zip(self.kernel, kernel_shape))

    def __call__(self, x, a, b):
        """The adapter's output ``einsum(einsum(x, a), b)``, in the einsum's output axes; ``a`` and ``b``
        as :meth:`adapter_shapes` or as :meth:`aligned_shapes` give them."""
        a_sub, b_sub = self.a, self.b
        if jnp.ndim(a) == len(self.kernel) + 1:  # aligned: the kernel's axes they reach, in its order
            a_sub, b_sub = ("".join(c for c in self.kernel if c not in skip) + self.rank
                            for skip in (self.produced, self.contracted))
            a, b = (jnp.reshape(v, [d for c, d in zip(self.kernel, jnp.shape(v)) if c in sub] + [jnp.shape(v)[-1]])
                    for v, sub in ((a, a_sub), (b, b_sub)))
        narrow = "".join(c for c in self.inputs if c not in self.contracted) + self.rank
        t = jnp.einsum(f"{self.inputs},{a_sub}->{narrow}", x, a)
        return jnp.einsum(f"{narrow},{b_sub}->{self.output}", t, b)


def gptq_einsum_axes(einsum_str: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How GPTQ sees the kernel of an einsum layer ``"x,w->y"``: ``(batch, inputs)`` where ``inputs`` are
    the kernel axes that take the inputs' trailing axes, in the kernel's order, and ``batch`` the axes of
    ``x`` that hold the kernel's batch axes (kept from the inputs to the output, such as a mixture of
    experts' ``E`` in ``"ECD,EDF->ECF"``), in the kernel's order; those must lead the kernel, and each
    of their entries is a plain ``(M, K) @ (K, N)`` after reshapes. None for any other einsum.

    Example:
      >>> from quantize_jax.lora import gptq_einsum_axes
      >>> gptq_einsum_axes("BTD,NDH->BTNH"), gptq_einsum_axes("ECD,EDF->ECF"), gptq_einsum_axes("BNTH,NHD->BTD")
      (((), (1,)), ((0,), (1,)), None)
    """
    try:
        lr = LowRankEinsum.of(einsum_str)
    except ValueError:
        return None
    if not lr.inputs.endswith(lr.contracted) or lr.kernel[:len(lr.batch)] != lr.batch:
        return None
    head, dots, tail = lr.inputs.rpartition("...")  # letters before "..." count from the start, after it from the end
    batch = tuple(head.index(c) if c in head else tail.index(c) - len(tail) if dots else lr.inputs.index(c)
                  for c in lr.batch)
    return batch, tuple(lr.kernel.index(c) for c in lr.contracted)


def low_rank_weight(a, b, shape, *, subscripts: str | None = None):
    """The float32 weight a rank-r adapter adds to a kernel of ``shape``.

    * ``subscripts`` given: ``einsum(subscripts, a, b)`` per layer (:attr:`LowRankEinsum.kernel_delta`,
      e.g. ``"Da,aNH->NDH"``), leading stacked-layer axes added by ``...``;
    * ``a`` and ``b`` held in the kernel's own axes (:meth:`LowRankEinsum.aligned_shapes`: one more
      axis than the kernel, the rank): ``sum_r a[..., r] * b[..., r]``, axes of size 1 broadcast;
    * else ``a @ b`` (stacked layers batched), reshaped to ``shape`` (a kernel with several input or
      output axes takes ``a @ b`` over them flattened).

    Raises:
      ValueError: the adapters' weight does not fit ``shape``.
    """
    a, b, shape = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), tuple(shape)

    def misfit():
        return ValueError(f"low_rank_weight: the adapters a {a.shape} and b {b.shape} make no weight of the "
                          f"kernel's shape {shape}")

    if subscripts is not None:
        lhs, _, k_sub = subscripts.replace(" ", "").partition("->")
        a_sub, b_sub = lhs.split(",")
        delta = jnp.einsum(f"...{a_sub},...{b_sub}->...{k_sub}", a, b)
        if delta.shape != shape:
            raise misfit()
        return delta
    if a.ndim == b.ndim == len(shape) + 1:  # in the kernel's own axes, the rank last
        if a.shape[-1] != b.shape[-1] or not all(p in (1, d) and q in (1, d) and (d == 1 or d in (p, q))
                                                  for p, q, d in zip(a.shape, b.shape, shape)):
            raise misfit()
        letters, rank = string.ascii_letters[: len(shape)], string.ascii_letters[len(shape)]
        subs = ["".join(c for c, d in zip(letters, v.shape) if d != 1) for v in (a, b)]
        squeezed = [v.reshape([d for d in v.shape[:-1] if d != 1] + [v.shape[-1]]) for v in (a, b)]
        out = "".join(c for c in letters if c in subs[0] + subs[1])
        return jnp.einsum(f"{subs[0]}{rank},{subs[1]}{rank}->{out}", *squeezed).reshape(shape)
    delta = jnp.matmul(a, b)
    stack = delta.shape[:-2]
    if delta.size != math.prod(shape) or shape[: len(stack)] != stack:
        raise misfit()
    return delta.reshape(shape)


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
    delta = low_rank_weight(a, b, q.shape, subscripts=subscripts)
    return quantize((dequantize(q, jnp.float32) + delta).astype(q.dtype), q.spec)
