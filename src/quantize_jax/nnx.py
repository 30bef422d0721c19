"""Flax NNX: quantization-aware training layers, model conversion, and QAT -> packed int4 serving.

* :class:`QuantLinear`, :class:`QuantConv`, :class:`QuantEinsum`,
  :class:`QuantLinearGeneral` are drop-ins for ``nnx.Linear`` / ``nnx.Conv`` /
  ``nnx.Einsum`` / ``nnx.LinearGeneral`` (same arguments, same ``kernel`` /
  ``bias`` parameters, so a float checkpoint loads as is) whose forward pass
  fake-quantizes the kernel (and optionally the inputs).
* :class:`QuantEmbed` does the same for ``nnx.Embed``'s table (lookups and
  tied ``attend`` logits); served, a lookup decodes only the rows it reads.
* :func:`quantize_model` swaps those Flax layers of an existing model (the
  projections of ``nnx.MultiHeadAttention`` are ``LinearGeneral`` s) for
  their QAT versions by path rules, copying the parameters (``nnx.Embed``
  with ``quantize_embeddings=True``).
* :func:`to_serving` turns a QAT model into one whose weights are packed
  :class:`~quantize_jax.QArray` s used through :func:`~quantize_jax.qdot`; its
  outputs equal the QAT model's, and no float weight matrix is left.
* :func:`to_serving_gptq`: the same with GPTQ kernels, for the inputs each
  Linear, Conv, LinearGeneral or Einsum layer sees on calibration batches
  (a convolution's patches; each expert of an expert einsum on its tokens).
* :func:`add_lora` / :func:`merge_lora`: QLoRA, ``nnx.LoRA`` adapters over
  the packed Linear, LinearGeneral and Einsum layers of a served model, and
  folded back into packed layers.

Activation quantization (``act_spec``):

* ``"int8"``: dynamic per-token int8 (absmax over the features), the W4A8
  numerics of ``qdot(..., act_quant="int8")``;
* a 4-bit :class:`~quantize_jax.QuantSpec`: dynamic (its own calibration on
  each batch, e.g. ``axis=-1`` for per token), or, with
  ``act_calibration="static"``, a per-tensor range tracked by a moving
  average in a :class:`QuantStat` variable, which optimizers over
  ``nnx.Param`` never touch. ``model.eval()`` freezes it.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding

from quantize_jax import matmul
from quantize_jax.calibrate import compute_scale, range_to_scale
from quantize_jax.lora import LowRankEinsum, gptq_einsum_axes, merge_low_rank
from quantize_jax.ptq import GptqView, conv_input_axes, conv_rows, gptq_stacked, moment_passes, progress_bar
from quantize_jax.qarray import QArray, dequantize, quantize, take
from quantize_jax.rules import Rules, compile_rules
from quantize_jax.sharding import qarray_shardings
from quantize_jax.spec import QuantSpec
from quantize_jax.ste import fake_quant

class QuantStat(nnx.Variable):
    """Calibration statistics (an activation range): state, not a trainable parameter."""


class QuantizedWeight(nnx.Variable):
    """A packed 4-bit weight (a :class:`~quantize_jax.QArray`) of a serving layer.

    Indexing it (``w[...]``, as Flax layers read their kernel) gives the
    dequantized values, so a Flax layer's own forward works over it. The
    float kernel's logical sharding annotation, if it had one, is kept as
    the metadata ``weight_sharding`` (see :func:`quantize_jax.sharding.partition_specs`).
    """

    def __getitem__(self, index):
        return dequantize(self.get_value())[index]


def _lsq_grad_scale(s, n_per_scale: int, qmax: float):
    """Scale the gradient reaching ``s`` by ``1 / sqrt(n * qmax)`` (LSQ, Esser et al., 2019); value unchanged."""
    g = 1.0 / float(max(n_per_scale, 1) * max(qmax, 1.0)) ** 0.5
    return s * g + jax.lax.stop_gradient(s - s * g)


class _ActQuant:
    """Activation fake-quant shared by the QAT and the serving layers."""

    # Mixins add no slots and come after the Flax class in the bases, so that a Flax layer's object can be
    # switched to its QAT or serving class (same memory layout); the layers call the Flax forward explicitly.
    __slots__ = ()
    _weight_name = "kernel"  # the Flax layer's weight variable

    act_spec: QuantSpec | str | None
    act_calibration: str

    @property
    def _weight(self) -> nnx.Variable:
        return getattr(self, self._weight_name)

    def _init_act(self, act_spec, act_calibration: str, act_momentum: float, stack: tuple = ()):
        if act_spec is not None and act_spec != "int8" and not isinstance(act_spec, QuantSpec):
            raise ValueError(f"act_spec: expected None, 'int8' or a QuantSpec, got {act_spec!r}")
        if act_calibration not in ("dynamic", "static"):
            raise ValueError(f"act_calibration: expected 'dynamic' or 'static', got {act_calibration!r}")
        if act_calibration == "static" and not isinstance(act_spec, QuantSpec):
            raise ValueError("act_calibration: 'static' needs a 4-bit QuantSpec as act_spec")
        self.act_spec = act_spec
        self.act_calibration = act_calibration
        self.act_momentum = act_momentum
        self.use_running_average = False
        # one observed range per layer of a stack (nnx.vmap), as nnx.scan slices it
        self.act_range = QuantStat(jnp.zeros(stack + (2,), jnp.float32)) if act_calibration == "static" else nnx.data(None)

    def _quant_inputs(self, x):
        """The layer's inputs as its product sees them: ``_quant_act``, then per-token int8 for W4A8."""
        x = self._quant_act(x)
        return matmul.fake_int8_tokens(x) if self.act_spec == "int8" else x

    def _quant_act(self, x):
        spec = self.act_spec
        if spec is None or spec == "int8":
            return x  # int8 is per token, inside the product: qdot's act_quant, or _quant_inputs
        if self.act_calibration == "dynamic":
            return fake_quant(x, spec)
        if not self.use_running_average:
            x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
            new = jnp.stack([jnp.minimum(jnp.min(x32), 0.0), jnp.maximum(jnp.max(x32), 0.0)])
            old = self.act_range[...]
            fresh = jnp.all(old == 0.0)
            self.act_range[...] = jnp.where(fresh, new, self.act_momentum * old + (1 - self.act_momentum) * new)
        lo, hi = self.act_range[0], self.act_range[1]
        s, z = range_to_scale(lo, hi, QuantSpec(format=spec.format, scale_dtype=spec.scale_dtype))
        return fake_quant(x, QuantSpec(format=spec.format), scale=s, zero_point=z)


class _QuantLayer(_ActQuant):
    """QAT behaviour shared by the layers: the Flax layer's own forward, run with a fake-quantized kernel.

    The kernel variable holds the float weight; for the duration of a call
    its value is swapped for ``fake_quant(kernel)`` (a function of the float
    value, so gradients reach it straight through) and restored after, so
    the Flax layer's forward (padding, masks, einsum parsing, ...) is reused
    as it is.
    """

    __slots__ = ()

    def _init_quant(self, weight_spec, act_spec, act_calibration, act_momentum, learn_scale):
        stack, shape = _split_stack(self)
        weight_spec = self.default_weight_spec(shape) if weight_spec is None else weight_spec
        _check_weight_spec(weight_spec, shape, type(self).__name__, self._weight_name)
        self.weight_spec = weight_spec
        self._init_act(act_spec, act_calibration, act_momentum, stack)
        self.learn_scale = learn_scale
        self.weight_scale = nnx.data(None)
        self.weight_zero_point = nnx.data(None)
        if learn_scale:
            self.init_scale_from_kernel()

    @staticmethod
    def default_weight_spec(kernel_shape) -> QuantSpec:
        """int4, one scale per output channel: every kernel axis but the last is reduced."""
        return QuantSpec(format="int4", axis=tuple(range(len(kernel_shape) - 1)) if len(kernel_shape) > 1 else None)

    def init_scale_from_kernel(self) -> None:
        """(Re)initialise the learned scale (and zero point) from the current kernel."""
        stack, _ = _split_stack(self)
        s, z = _over_stack(lambda k: compute_scale(k, self.weight_spec), len(stack))(self._weight[...])
        self.weight_scale = nnx.Param(s.astype(jnp.float32))
        self.weight_zero_point = nnx.data(None) if z is None else nnx.Param(z.astype(jnp.float32))

    def _scale_and_zero(self):
        """The learned scale and zero point as the forward pass uses them (or ``(None, None)``)."""
        if not self.learn_scale:
            return None, None
        spec = self.weight_spec
        s = self.weight_scale[...]
        n_per_scale = max(1, self._weight.size // max(s.size, 1))
        s = _lsq_grad_scale(s, n_per_scale, spec.fmt.max_abs_level).astype(spec.scale_dtype)
        z = None if self.weight_zero_point is None else self.weight_zero_point[...]
        return s, z

    def quantized_kernel(self):
        """The fake-quantized kernel of the forward pass."""
        s, z = self._scale_and_zero()
        return fake_quant(self._weight[...], self.weight_spec, scale=s, zero_point=z)

    def _qat_call(self, flax_call, inputs, *args, **kwargs):
        kernel_q = self.quantized_kernel()
        x = self._quant_inputs(inputs)
        weight = self._weight
        original = weight.get_value()
        weight.set_value(kernel_q)
        try:
            return flax_call(self, x, *args, **kwargs)
        finally:
            weight.set_value(original)


class QuantLinear(nnx.Linear, _QuantLayer):
    """``nnx.Linear`` with a fake-quantized 4-bit kernel, for quantization-aware training.

    ``y = act(x) @ fake_quant(kernel, weight_spec) + bias``, with
    straight-through gradients to the kernel (and LSQ gradients to a learned
    scale). The parameters are ``nnx.Linear``'s (plus ``weight_scale`` with
    ``learn_scale``), so a float checkpoint loads as is.

    Args:
      in_features, out_features, **kwargs: as for ``nnx.Linear``.
      weight_spec: how the kernel ``(in, out)`` is quantized; default int4 per
        output channel (``axis=0``). ``group_size`` must not exceed ``in_features``.
      act_spec: ``None``, ``"int8"`` or a 4-bit ``QuantSpec`` (module docstring).
      act_calibration: ``"dynamic"`` or ``"static"``.
      act_momentum: the moving-average momentum of the static observer.
      learn_scale: learn the weight scale (and zero point) as ``nnx.Param`` s,
        initialised from the kernel with ``weight_spec.method``.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> layer = qj.nnx.QuantLinear(8, 4, weight_spec=qj.QuantSpec(axis=0), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 8))).shape
      (2, 4)
    """

    __slots__ = ()

    def __call__(self, inputs, *args, **kwargs):
        return self._qat_call(nnx.Linear.__call__, inputs, *args, **kwargs)

    def __init__(self, in_features: int, out_features: int, *, weight_spec: QuantSpec | None = None,
                 act_spec=None, act_calibration: str = "dynamic", act_momentum: float = 0.99,
                 learn_scale: bool = False, **kwargs):
        nnx.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_quant(weight_spec, act_spec, act_calibration, act_momentum, learn_scale)


class QuantConv(nnx.Conv, _QuantLayer):
    """``nnx.Conv`` with a fake-quantized 4-bit kernel; arguments as :class:`QuantLinear`.

    The default ``weight_spec`` gives one scale per output channel (all
    kernel axes but the last reduced).

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> conv = qj.nnx.QuantConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((1, 6, 6, 3))).shape
      (1, 6, 6, 8)
    """

    __slots__ = ()

    def __call__(self, inputs, *args, **kwargs):
        return self._qat_call(nnx.Conv.__call__, inputs, *args, **kwargs)

    def __init__(self, in_features: int, out_features: int, kernel_size, *, weight_spec: QuantSpec | None = None,
                 act_spec=None, act_calibration: str = "dynamic", act_momentum: float = 0.99,
                 learn_scale: bool = False, **kwargs):
        nnx.Conv.__init__(self, in_features, out_features, kernel_size, **kwargs)
        self._init_quant(weight_spec, act_spec, act_calibration, act_momentum, learn_scale)


class QuantEinsum(nnx.Einsum, _QuantLayer):
    """``nnx.Einsum`` with a fake-quantized 4-bit kernel; arguments as :class:`QuantLinear`.

    The default ``weight_spec`` reduces every kernel axis but the last.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> layer = qj.nnx.QuantEinsum("nta,hab->nthb", (8, 2, 4), (8, 4), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((16, 11, 2))).shape
      (16, 11, 8, 4)
    """

    __slots__ = ()

    def __call__(self, inputs, *args, **kwargs):
        return self._qat_call(nnx.Einsum.__call__, inputs, *args, **kwargs)

    def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *, weight_spec: QuantSpec | None = None,
                 act_spec=None, act_calibration: str = "dynamic", act_momentum: float = 0.99,
                 learn_scale: bool = False, **kwargs):
        nnx.Einsum.__init__(self, einsum_str, kernel_shape, bias_shape, **kwargs)
        self._init_quant(weight_spec, act_spec, act_calibration, act_momentum, learn_scale)


class QuantLinearGeneral(nnx.LinearGeneral, _QuantLayer):
    """``nnx.LinearGeneral`` with a fake-quantized 4-bit kernel; arguments as :class:`QuantLinear`.

    The kernel is ``batch + in_features + out_features``; the default
    ``weight_spec`` reduces the ``in_features`` (contracted) axes: one scale
    per batch entry and output feature (per head and head dimension in an
    attention projection).

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> layer = qj.nnx.QuantLinearGeneral(16, (4, 8), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 16))).shape, layer.weight_spec.axis
      ((2, 4, 8), 0)
    """

    __slots__ = ()

    def __call__(self, inputs, *args, **kwargs):
        return self._qat_call(nnx.LinearGeneral.__call__, inputs, *args, **kwargs)

    def __init__(self, in_features, out_features, *, weight_spec: QuantSpec | None = None,
                 act_spec=None, act_calibration: str = "dynamic", act_momentum: float = 0.99,
                 learn_scale: bool = False, **kwargs):
        nnx.LinearGeneral.__init__(self, in_features, out_features, **kwargs)
        self._init_quant(weight_spec, act_spec, act_calibration, act_momentum, learn_scale)

    def default_weight_spec(self, kernel_shape) -> QuantSpec:
        """int4 with the ``in_features`` axes reduced: one scale per batch entry and output feature."""
        start = len(self.batch_axis)
        axes = tuple(range(start, start + len(self.in_features)))
        return QuantSpec(format="int4", axis=axes[0] if len(axes) == 1 else axes)


class QuantEmbed(nnx.Embed, _QuantLayer):
    """``nnx.Embed`` with a fake-quantized 4-bit table, for quantization-aware training.

    Lookups and ``attend`` (tied output logits, ``query @ table.T``) both read
    ``fake_quant(embedding, weight_spec)``, with straight-through gradients to
    the table (and LSQ gradients to a learned scale). Its inputs are token
    ids, so it takes no activation quantization.

    Args:
      num_embeddings, features, **kwargs: as for ``nnx.Embed``.
      weight_spec: how the table ``(num_embeddings, features)`` is quantized;
        default int4 with one scale per row (``axis=1``), so a lookup reads
        each row's codes and its one scale.
      learn_scale: learn the scale (and zero point) as ``nnx.Param`` s.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> embed = qj.nnx.QuantEmbed(100, 16, rngs=nnx.Rngs(0))
      >>> embed(jnp.array([[1, 2, 3]])).shape, embed.attend(jnp.ones((2, 16))).shape
      ((1, 3, 16), (2, 100))
    """

    __slots__ = ()
    _weight_name = "embedding"

    def __call__(self, inputs, *args, **kwargs):
        return self._qat_call(nnx.Embed.__call__, inputs, *args, **kwargs)

    def attend(self, query, *args, **kwargs):
        """``query @ fake_quant(embedding).T``, as ``nnx.Embed.attend``."""
        return self._qat_call(nnx.Embed.attend, query, *args, **kwargs)

    def __init__(self, num_embeddings: int, features: int, *, weight_spec: QuantSpec | None = None,
                 learn_scale: bool = False, **kwargs):
        nnx.Embed.__init__(self, num_embeddings, features, **kwargs)
        self._init_quant(weight_spec, None, "dynamic", 0.99, learn_scale)

    @staticmethod
    def default_weight_spec(table_shape) -> QuantSpec:
        """int4, one scale per row (per token): the features axis is reduced."""
        return QuantSpec(format="int4", axis=len(table_shape) - 1)


class _ServingLayer(_ActQuant):
    """Serving behaviour: the kernel is a :class:`QuantizedWeight`, read as its dequantized value."""

    __slots__ = ()

    def _serving_call(self, flax_call, inputs, *args, **kwargs):
        return flax_call(self, self._quant_inputs(inputs), *args, **kwargs)

    def _packed_product(self, custom: bool, out_sharding, last_axis_only: bool) -> bool:
        """Whether the forward pass multiplies by the packed kernel (``qeinsum``) rather than running the
        Flax forward over the dequantized kernel: not for ``backend="xla"`` (bit for bit with QAT),
        customised products or an explicit output sharding, nor for W4A8 unless the product contracts
        the inputs' last axis alone (QAT's int8 tokens are per last axis; ``qeinsum``'s per contraction)."""
        return not (self.backend == "xla" or (self.act_spec == "int8" and not last_axis_only) or custom
                    or out_sharding is not None or getattr(self, "preferred_element_type", None) is not None)

    @property
    def _act_quant(self):
        """``qdot``'s ``act_quant`` for this layer: ``"int8"`` for W4A8, else None."""
        return "int8" if self.act_spec == "int8" else None

    def _promoted(self, inputs):
        """The quantized inputs and the bias, promoted as the Flax layer promotes them (the kernel's dtype
        taking part as the packed weight's)."""
        x = self._quant_act(inputs)
        probe = jnp.zeros((), self.qarray.dtype)
        bias = self.bias[...] if self.bias is not None else None
        x, _, bias = self.promote_dtype((x, probe, bias), dtype=self.dtype)
        return x, bias

    @property
    def qarray(self) -> QArray:
        """The packed weight."""
        return self._weight.get_value()


class ServingLinear(nnx.Linear, _ServingLayer):
    """The serving form of :class:`QuantLinear`: ``qdot`` over the packed weight, no float matrix, in the
    dtype ``nnx.Linear`` computes in (``nnx.Linear``'s forward over the dequantized kernel with
    ``backend="xla"``, a custom ``dot_general``, ``preferred_element_type`` or ``out_sharding``: the QAT
    outputs bit for bit)."""

    __slots__ = ()

    def __call__(self, inputs, out_sharding=None):
        if not self._packed_product(self.dot_general is not lax.dot_general, out_sharding, True):
            return self._serving_call(nnx.Linear.__call__, inputs, out_sharding=out_sharding)
        x, bias = self._promoted(inputs)
        y = matmul.qdot(x, self.qarray, backend=self.backend, act_quant=self._act_quant).astype(x.dtype)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class ServingConv(nnx.Conv, _ServingLayer):
    """The serving form of :class:`QuantConv`: the packed kernel is dequantized inside the forward pass."""

    __slots__ = ()

    def __call__(self, inputs, *args, **kwargs):
        return self._serving_call(nnx.Conv.__call__, inputs, *args, **kwargs)


class ServingEinsum(nnx.Einsum, _ServingLayer):
    """The serving form of :class:`QuantEinsum`: :func:`~quantize_jax.qeinsum` over the packed kernel
    (``nnx.Einsum``'s forward over the dequantized kernel with ``backend="xla"``, a custom ``einsum_op``,
    ``preferred_element_type`` or ``out_sharding``, and for W4A8 contracting more than the inputs' last
    axis: the QAT outputs bit for bit)."""

    __slots__ = ()

    def __call__(self, inputs, einsum_str=None, out_sharding=None):
        einsum_str = (einsum_str or self.einsum_str or "").replace(" ", "")
        if not self._packed_product(self.einsum_op is not jnp.einsum, out_sharding,
                                    matmul.contracts_last_axis_only(einsum_str)):
            return self._serving_call(nnx.Einsum.__call__, inputs, einsum_str or None, out_sharding=out_sharding)
        self._einsum_str_check(einsum_str)
        x, bias = self._promoted(inputs)
        y = matmul.qeinsum(einsum_str, x, self.qarray, backend=self.backend, act_quant=self._act_quant).astype(x.dtype)
        if bias is None:
            return y
        shape = self._infer_broadcasted_bias_shape(einsum_str, x, jax.ShapeDtypeStruct(self.qarray.shape, x.dtype))
        return y + jnp.reshape(bias, shape)


class ServingLinearGeneral(nnx.LinearGeneral, _ServingLayer):
    """The serving form of :class:`QuantLinearGeneral`: :func:`~quantize_jax.qeinsum` over the packed
    kernel (``nnx.LinearGeneral``'s forward over the dequantized kernel with ``backend="xla"``, batch
    axes, a custom ``dot_general``, ``preferred_element_type`` or ``out_sharding``, and for W4A8
    contracting more than the inputs' last axis: the QAT outputs bit for bit)."""

    __slots__ = ()

    def __call__(self, inputs, out_sharding=None):
        custom = self.batch_axis or self.dot_general is not None or self.dot_general_cls is not None
        axes = [a % jnp.ndim(inputs) for a in self.axis]
        if not self._packed_product(custom, out_sharding, axes == [jnp.ndim(inputs) - 1]):
            return self._serving_call(nnx.LinearGeneral.__call__, inputs, out_sharding=out_sharding)
        x, bias = self._promoted(inputs)
        subscripts, n_free = matmul.dense_general_subscripts(x.ndim, axes, len(self.out_features))
        y = matmul.qeinsum(subscripts, x, self.qarray, backend=self.backend, act_quant=self._act_quant).astype(x.dtype)
        return y if bias is None else y + jnp.reshape(bias, (1,) * n_free + tuple(self.out_features))


class ServingEmbed(nnx.Embed, _ServingLayer):
    """The serving form of :class:`QuantEmbed`: a lookup decodes only the rows it reads
    (:func:`~quantize_jax.take` over the packed table); ``attend`` is
    ``qeinsum("...d,vd->...v", query, table)`` (on the CPU one block of rows
    decoded at a time; on NVIDIA GPUs at small M the transposed Pallas
    kernel over the packed bytes), or with ``backend="xla"`` ``nnx.Embed.attend`` over
    the dequantized table (the QAT outputs bit for bit)."""

    __slots__ = ()
    _weight_name = "embedding"

    def __call__(self, inputs, out_sharding=None):
        if not jnp.issubdtype(jnp.asarray(inputs).dtype, jnp.integer):
            raise ValueError(f"ServingEmbed: inputs must be integer token ids, got dtype {jnp.asarray(inputs).dtype}")
        q = self.qarray
        dtype = self.dtype or q.dtype
        if self.num_embeddings == 1:  # as nnx.Embed: the one row, whatever the ids
            return jnp.broadcast_to(dequantize(q, dtype), jnp.shape(inputs) + (self.features,))

        def lookup(q, ids):
            return take(q, ids, dtype=dtype)

        if out_sharding is not None:
            return jax.sharding.auto_axes(lookup, out_sharding=out_sharding)(q, inputs)
        return lookup(q, inputs)

    def attend(self, query, out_sharding=None):
        """``query @ table.T`` over the packed table (``nnx.Embed.attend``'s over the dequantized one with
        ``backend="xla"`` or an ``out_sharding``)."""
        if self.backend == "xla" or out_sharding is not None:
            return self._serving_call(nnx.Embed.attend, query, out_sharding=out_sharding)
        return matmul.embedding_logits(query, self.qarray, dtype=self.dtype, backend=self.backend)


_SERVING = {QuantLinear: ServingLinear, QuantConv: ServingConv, QuantEinsum: ServingEinsum,
            QuantLinearGeneral: ServingLinearGeneral, QuantEmbed: ServingEmbed}
_FLAX_TO_QUANT = {nnx.Linear: QuantLinear, nnx.Conv: QuantConv, nnx.Einsum: QuantEinsum,
                  nnx.LinearGeneral: QuantLinearGeneral}


def _serving_layer(layer: _QuantLayer, backend: str):
    """A copy of ``layer`` turned into its serving class, its kernel replaced by the packed QArray."""
    s, z = layer._scale_and_zero()
    kernel = jax.lax.stop_gradient(layer._weight[...])
    stack, _ = _split_stack(layer)
    spec = layer.weight_spec
    q = _over_stack(lambda k, s, z: quantize(k, spec, scale=s, zero_point=z), len(stack))(kernel, s, z)
    placement = getattr(kernel, "sharding", None)
    if not stack and isinstance(placement, NamedSharding) and any(p is not None for p in placement.spec):
        q = jax.device_put(q, qarray_shardings(q.shape, q.spec, placement, q.dtype))  # each device keeps its share
    names = layer._weight.get_metadata().get("out_sharding")
    served = nnx.clone(layer)
    served.__class__ = _SERVING[type(layer)]
    setattr(served, layer._weight_name, QuantizedWeight(q, weight_sharding=tuple(names)) if names else QuantizedWeight(q))
    served.weight_scale = nnx.data(None)
    served.weight_zero_point = nnx.data(None)
    served.use_running_average = True
    served.backend = backend
    return served


def _split_stack(layer) -> tuple[tuple, tuple]:
    """``(stack axes, the layer's own kernel shape)``: layers made by ``nnx.vmap`` (run by ``nnx.scan``) hold
    their kernels stacked along leading axes, and each layer quantizes its own slice."""
    if isinstance(layer, nnx.Conv):
        own = len(layer.kernel_size) + 2
    elif isinstance(layer, nnx.Einsum):
        own = len(layer.kernel_shape)
    elif isinstance(layer, nnx.LinearGeneral):
        own = len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
    else:
        own = 2
    shape = tuple(layer._weight.shape)
    return shape[: len(shape) - own], shape[len(shape) - own:]


def _over_stack(f, n: int):
    """``f`` mapped over ``n`` leading axes of all its arguments (``None`` arguments pass through)."""
    for _ in range(n):
        f = jax.vmap(f)
    return f


def _check_weight_spec(spec: QuantSpec, shape, where: str, weight: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: weight_spec must be a QuantSpec, got {type(spec).__name__}")
    spec.reduced_axes(len(shape), name=f"{where} {weight}", shape=shape)
    if spec.group_size is not None:
        axis = spec.reduced_axes(len(shape))[0]
        if spec.group_size > shape[axis]:
            raise ValueError(
                f"{where}: group_size {spec.group_size} is larger than axis {axis} of the {weight} of shape {shape}"
            )



def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _rules(rules, weight_spec):
    """Compiled ``(regex, spec, skip)`` triples; ``spec=None`` with ``skip=False`` means the layer default."""
    if rules is None:
        return [(re.compile(".*"), weight_spec, False)]
    return [(regex, spec, spec is None) for regex, spec in compile_rules(rules)]


def quantize_model(model: nnx.Module, rules: Rules | None = None, *, weight_spec: QuantSpec | None = None,
                   act_spec=None, act_calibration: str = "dynamic", act_momentum: float = 0.99,
                   learn_scale: bool = False, quantize_embeddings: bool = False,
                   inplace: bool = False) -> nnx.Module:
    """Replace the ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum`` / ``nnx.LinearGeneral`` layers of ``model``
    (and, on request, its ``nnx.Embed`` tables) by their QAT versions.

    Each replaced layer keeps its configuration and its parameters (it is a
    copy of the Flax layer, turned into :class:`QuantLinear`,
    :class:`QuantConv`, :class:`QuantEinsum`, :class:`QuantLinearGeneral`
    or :class:`QuantEmbed`).

    Args:
      model: an NNX model, or a single Linear / Conv / Einsum /
        LinearGeneral (/ Embed) layer (its path is ``""``).
      rules: ``{regex: QuantSpec | None}`` (or a list of pairs) over the layer
        paths (``"blocks/0/mlp"``); the first rule whose regex
        ``re.search``-es the path decides: a spec quantizes the layer with
        that weight spec, ``None`` leaves it float. Unmatched layers stay
        float. Default: every layer with ``weight_spec``.
      weight_spec: the spec of the default rule; ``None``: int4 per output
        channel for each layer.
      act_spec, act_calibration, act_momentum, learn_scale: as for QuantLinear
        (embeddings take no activation quantization).
      quantize_embeddings: also quantize ``nnx.Embed`` tables (by the same
        rules; default one scale per row). Off by default: embeddings are
        often kept in float, and a tied table also computes the logits.
      inplace: modify ``model`` itself instead of a copy.

    Returns:
      The QAT model.

    Raises:
      ValueError: a rule matches no layer (its regex is named), or a spec
        does not fit a layer (its path is named).

    Example:
      >>> from flax import nnx
      >>> import quantize_jax as qj
      >>> mlp = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> qat = qj.nnx.quantize_model(mlp, {"layers/1": None, ".*": qj.QuantSpec(axis=0)})
      >>> [type(l).__name__ for l in qat.layers]
      ['QuantLinear', 'Linear']
    """
    compiled = _rules(rules, weight_spec)
    if not inplace:
        model = nnx.clone(model)
    used = [False] * len(compiled)
    targets = []
    convert = {**_FLAX_TO_QUANT, **({nnx.Embed: QuantEmbed} if quantize_embeddings else {})}
    for path, module in nnx.iter_modules(model):
        if type(module) not in convert:
            continue
        p = _path_str(path)
        for i, (regex, spec, skip) in enumerate(compiled):
            if regex.search(p):
                used[i] = True
                if not skip:
                    targets.append((path, module, spec))
                break
    for (regex, _, _), u in zip(compiled, used):
        if not u:
            raise ValueError(f"quantize_model: rule {regex.pattern!r} matches no Linear, Conv, Einsum or LinearGeneral "
                             f"layer{' or Embed' if quantize_embeddings else ' (Embed tables need quantize_embeddings=True)'}")
    for path, layer, spec in targets:
        flax_class = type(layer)
        new = nnx.clone(layer) if path else layer  # a bare layer is converted itself (a copy unless inplace)
        new.__class__ = convert[flax_class]
        try:
            if flax_class is nnx.Embed:
                new._init_quant(spec, None, "dynamic", act_momentum, learn_scale)
            else:
                new._init_quant(spec, act_spec, act_calibration, act_momentum, learn_scale)
        except ValueError as e:
            new.__class__ = flax_class
            where = f"layer {_path_str(path)!r}" if path else f"the {flax_class.__name__} layer"
            raise ValueError(f"quantize_model: {where}: {e}") from None
        if path:
            _replace(model, path, new)
    return model


def to_serving(model: nnx.Module, *, backend: str = "auto", inplace: bool = False) -> nnx.Module:
    """A QAT model -> a serving model whose weights are packed QArrays, no float weights left.

    ``QuantLinear`` becomes :class:`ServingLinear` (``qdot`` over the packed
    weight); ``QuantEinsum`` / ``QuantLinearGeneral`` become
    :class:`ServingEinsum` / :class:`ServingLinearGeneral` (``qeinsum``);
    ``QuantConv`` becomes :class:`ServingConv` (the packed kernel dequantized
    inside the forward pass); ``QuantEmbed`` becomes :class:`ServingEmbed`
    (lookups decode only their rows). Outputs have the QAT model's dtypes and
    equal its values up to float reassociation (the packed products sum in
    their own order, in float32, or for W4A8 in integers); learned scales
    carry over. With ``backend="xla"`` every layer runs the Flax forward of
    its QAT layer over the dequantized weight, which equals the
    fake-quantized kernel bit for bit: the served model then gives the QAT
    model's outputs bit for bit, in any dtype, W4A8 included.

    Args:
      model: a model holding QAT layers (or a single QAT layer).
      backend: the ``qdot`` backend of the Linear layers.
      inplace: convert ``model`` itself instead of a copy.

    Raises:
      ValueError: the model holds no QAT layer.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> qat = qj.nnx.quantize_model(nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
      >>> served = qj.nnx.to_serving(qat)
      >>> type(served.layers[0]).__name__, served.layers[0].qarray.packed.dtype
      ('ServingLinear', dtype('uint8'))
      >>> bool(jnp.allclose(served(jnp.ones((2, 8))), qat(jnp.ones((2, 8))), rtol=1e-6))
      True
    """
    if isinstance(model, _QuantLayer):
        return _serving_layer(model, backend)
    if not inplace:
        model = nnx.clone(model)
    targets = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, _QuantLayer)]
    if not targets:
        raise ValueError("to_serving: the model holds no quantized layer; quantize it with quantize_model first")
    for path, layer in targets:
        _replace(model, path, _serving_layer(layer, backend))
    return model


class _InputMoment(nnx.Variable):
    """What :func:`to_serving_gptq` records of a layer's inputs: ``sum x^T x`` and the rows summed."""


class _InputRecorder(nnx.Module):
    """A layer that also adds up its inputs' ``x^T x`` (float32 at the highest precision; the rows of
    :meth:`~quantize_jax.ptq.GptqView.rows`) and their row count; stacked layers (``nnx.vmap``) each their
    own, under ``nnx.scan``, as does each entry of an einsum kernel's batch axes. A convolution's rows are
    the patches its kernel multiplies (:func:`~quantize_jax.ptq.conv_rows`), read off the arguments of
    its ``conv_general_dilated`` call; a grouped one keeps each group's moment."""

    def __init__(self, layer, view: GptqView):
        self.layer = layer
        self.view = view
        xtx_shape, rows_shape = _moment_shapes(layer, view)
        self.xtx = _InputMoment(jnp.zeros(xtx_shape, jnp.float32))
        self.rows = _InputMoment(jnp.zeros(rows_shape, jnp.float32))

    def _add(self, rows):
        xtx, n = self.view.moments(rows)
        self.xtx.set_value(self.xtx[...] + xtx)
        self.rows.set_value(self.rows[...] + n)

    def __call__(self, inputs, *args, **kwargs):
        if not isinstance(self.layer, nnx.Conv):
            self._add(self.view.rows(inputs))
            return self.layer(inputs, *args, **kwargs)
        conv = self.layer.conv_general_dilated

        def recording(lhs, rhs, *conv_args, **conv_kwargs):
            self._add(conv_rows(lhs, rhs, *conv_args, **conv_kwargs)[0])
            return conv(lhs, rhs, *conv_args, **conv_kwargs)

        self.layer.conv_general_dilated = recording
        try:
            return self.layer(inputs, *args, **kwargs)
        finally:
            self.layer.conv_general_dilated = conv


def _moment_shapes(layer, view: GptqView) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of what a layer records for GPTQ: ``x^T x`` (stacked layers', batch entries' and
    groups' each their own ``(K, K)``) and the row counts."""
    stack, own = _split_stack(layer)
    entries = stack + tuple(own[:len(view.batch)])
    k = math.prod(own[a] for a in view.input_axes)
    return entries + ((view.groups,) if view.groups > 1 else ()) + (k, k), entries


def _gptq_view(layer) -> GptqView | None:
    """How GPTQ sees a layer's kernel, for a layer it can quantize, else None: a QuantLinear; a QuantConv
    without a mask (its inputs are its patches, channels first; a grouped one with scales per output
    channel); a QuantLinearGeneral contracting its inputs' trailing axes without batch axes; or a
    QuantEinsum whose inputs end with the contracted axes in the kernel's order and whose kernel batch
    axes, if any, lead it (``"BTD,NDH->BTNH"``, ``"ECD,EDF->ECF"``:
    :func:`~quantize_jax.lora.gptq_einsum_axes`); stacked or not, without learned scales, its weight spec
    one :meth:`~quantize_jax.ptq.GptqView.entry` accepts."""
    batch, groups = (), 1
    if type(layer) is QuantLinear:
        axes = (0,)
    elif type(layer) is QuantConv and layer.mask is None:
        axes, groups = conv_input_axes(len(layer.kernel_size)), layer.feature_group_count
    elif type(layer) is QuantLinearGeneral and not layer.batch_axis:
        axes = tuple(range(len(layer.in_features)))
        if tuple(layer.axis) != tuple(range(-len(axes), 0)):
            return None
    elif type(layer) is QuantEinsum and layer.einsum_str and gptq_einsum_axes(layer.einsum_str):
        batch, axes = gptq_einsum_axes(layer.einsum_str)
    else:
        return None
    _, own = _split_stack(layer)
    view = GptqView(layer.weight_spec, axes, batch, groups)
    return view if not layer.learn_scale and view.entry(len(own)) is not None else None


def to_serving_gptq(model: nnx.Module, batches, *, where: str = "", damp: float = 0.01, act_order: bool = False,
                    max_moment_bytes: int | None = None, sequential: bool = False, backend: str = "auto",
                    progress: bool = True) -> nnx.Module:
    """:func:`to_serving` with GPTQ kernels: each packed Linear or Conv kernel quantized for the inputs it sees.

    ``model(*batch)`` runs (in eval mode, jitted) over every batch, and each
    matched layer adds up its inputs' ``x^T x``; then
    :func:`~quantize_jax.ptq.gptq_from_hessian` quantizes its float kernel
    with its ``weight_spec`` for that second moment (Frantar et al., 2022),
    and the served model takes that QArray in place of rounding to nearest.
    By default the inputs are those of the QAT model, whose other layers are
    fake-quantized by rounding (one pass, not layer by layer). Memory is
    one ``(K, K)`` float32 matrix per layer, whatever the batches: for a
    large model (a 7B-parameter LLM's layers hold tens of GB of them), give
    ``max_moment_bytes`` and the layers are calibrated in several passes
    over the batches, each holding at most that many bytes of moments. With
    ``sequential=True`` each layer has a pass of its own, in the order
    ``nnx.iter_modules`` lists them, and the layers of earlier passes are
    served by their GPTQ kernels while later ones record (as GPTQ's paper
    quantizes a network layer after layer): one pass per layer, for inputs
    as the served model will see them where that order follows the data.

    GPTQ applies to :class:`QuantLinear` layers, :class:`QuantConv` layers
    without a mask (their inputs are the patches the kernel multiplies,
    :func:`~quantize_jax.ptq.conv_rows`; grouped and depthwise ones with one
    scale per output channel, each group on its own inputs), :class:`QuantLinearGeneral`
    layers that contract their inputs' trailing axes (the projections of
    ``nnx.MultiHeadAttention``) and :class:`QuantEinsum` layers whose inputs
    end with the contracted axes (Gemma's ``"BTD,NDH->BTNH"``,
    ``"BTNH,NHD->BTD"``; kernel batch axes, such as a mixture of experts'
    ``"ECD,EDF->ECF"``, leading the kernel: each expert on its own tokens),
    stacked by ``nnx.vmap`` or not (each layer of a stack on its own inputs),
    without learned scales, whose ``weight_spec`` reduces their input axes
    (never a kernel batch axis): one scale per output
    feature, groups splitting a single input axis, or (without groups)
    scales shared across outputs too, such as the default ``QuantEinsum``
    spec of ``"BTD,NDH->BTNH"`` (one scale per ``H``), fixed before GPTQ's
    walk. Every other layer is served as :func:`to_serving` serves it.

    Args:
      model: a QAT model (from :func:`quantize_model`), trained or not.
      batches: an iterable of calibration batches, each the model's argument
        or a tuple of its arguments.
      where: a regex over layer paths; default every layer GPTQ applies to.
      damp: GPTQ's dampening, relative to the mean diagonal of ``x^T x / n``.
      act_order: GPTQ walks each kernel's inputs by decreasing energy (groups
        then take their scales before the walk; :func:`~quantize_jax.ptq.gptq`).
      max_moment_bytes: the most bytes of recorded ``x^T x`` at a time (a
        layer larger than that gets a pass of its own); ``None``: one pass.
        Several passes need ``batches`` that can be iterated again (a list).
      sequential: one layer per pass, each recording its inputs with the
        layers before it already served by GPTQ (a list of batches, again).
      backend: the served layers' ``qdot`` backend.
      progress: tqdm progress bars over the batches and the layers.

    Returns:
      The served model (``model`` is left as it was).

    Raises:
      ValueError: no layer GPTQ applies to matches ``where``, ``batches`` is
        empty (or an iterator where several passes need it), a matched layer
        was never called, or ``max_moment_bytes`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> from flax import nnx
      >>> qat = qj.nnx.quantize_model(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))))
      >>> x = jax.random.normal(jax.random.key(1), (4, 32, 64))  # 4 batches of 32 rows
      >>> served = qj.nnx.to_serving_gptq(qat, x, progress=False)
      >>> type(served.layers[0]).__name__, served(x[0]).shape
      ('ServingLinear', (32, 8))
    """
    regex = re.compile(where)
    targets = [(p, view) for p, m in nnx.iter_modules(model)
               if (view := _gptq_view(m)) is not None and regex.search(_path_str(p))]
    if not targets:
        raise ValueError(f"to_serving_gptq: no QuantLinear, QuantConv, QuantLinearGeneral or QuantEinsum GPTQ "
                         f"can quantize matches where={where!r}: none has a weight_spec reducing its input axes "
                         f"without learned scales")

    def moment_bytes(target):
        path, view = target
        return 4 * math.prod(_moment_shapes(_module_at(model, path), view)[0])

    passes = moment_passes(targets, moment_bytes, max_moment_bytes, batches, "to_serving_gptq", sequential=sequential)
    served = to_serving(model, backend=backend)
    for number, chunk in enumerate(passes, 1):
        recording = nnx.clone(model)
        if sequential:  # the layers of the earlier passes, served by their GPTQ kernels already
            for ((path, _),) in passes[:number - 1]:
                _replace(recording, path, nnx.clone(_module_at(served, path)))
        for path, view in chunk:
            layer = _module_at(recording, path)
            _replace(recording, path, _InputRecorder(layer, view))
        recording.eval()
        seen = 0
        label = "to_serving_gptq" + (f" (pass {number} of {len(passes)})" if len(passes) > 1 else "")
        for batch in progress_bar(batches, progress, f"{label}: inputs", "batch"):
            _record(recording, batch if isinstance(batch, tuple) else (batch,))
            seen += 1
        if not seen:
            raise ValueError("to_serving_gptq: batches is empty; give at least one calibration batch")
        for path, view in progress_bar(chunk, progress, f"{label}: GPTQ", "layer"):
            recorder = _module_at(recording, path)
            q = gptq_stacked(_module_at(model, path).kernel[...], recorder.xtx[...], recorder.rows[...], view,
                             fn="to_serving_gptq", where=_path_str(path), damp=damp, act_order=act_order)
            rounded = _module_at(served, path).kernel
            rounded.set_value(jax.tree.map(lambda a, b: jax.device_put(a, b.sharding), q, rounded.get_value()))
    return served


@nnx.jit
def _record(model, args) -> None:
    """One calibration batch through a model whose layers record their inputs (the outputs are dropped)."""
    model(*args)


class LoRAGeneral(nnx.LoRA):
    """``nnx.LoRA`` around a :class:`ServingLinearGeneral` whose inputs contract over their trailing axes
    (the query / key / value / output projections of ``nnx.MultiHeadAttention``):
    ``base(x) + x' @ lora_a @ lora_b``, with ``x'`` the contracted axes flattened and the product
    reshaped to the base's output axes. :func:`add_lora` makes it."""

    def __call__(self, x, **kwargs):
        base = self.base_module
        lead = x.shape[: x.ndim - len(base.in_features)]
        x, lora_a, lora_b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        delta = (x.reshape(lead + (-1,)) @ lora_a @ lora_b).reshape(lead + tuple(base.out_features))
        return base(x, **kwargs) + delta


class LoRAEinsum(nnx.LoRA):
    """``nnx.LoRA`` around a :class:`ServingEinsum` (Gemma-style projections such as
    ``"BTD,NDH->BTNH"``): ``base(x)`` plus the adapter of
    :class:`~quantize_jax.lora.LowRankEinsum` for the base's ``einsum_str``. ``lora_a`` holds the
    kernel's batch and contracted axes and the rank, ``lora_b`` its batch axes, the rank and its
    produced axes (for ``"BTD,NDH->BTNH"``: ``(D, r)`` and ``(r, N, H)``), so a kernel axis sharded
    by name keeps its size on the adapter. :func:`add_lora` makes it."""

    def __call__(self, x, einsum_str=None, **kwargs):
        base = self.base_module
        if einsum_str is not None and einsum_str.replace(" ", "") != base.einsum_str.replace(" ", ""):
            raise ValueError(f"LoRAEinsum: adapters made for einsum_str={base.einsum_str!r} cannot run "
                             f"einsum_str={einsum_str!r}")
        x, lora_a, lora_b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return base(x, **kwargs) + LowRankEinsum.of(base.einsum_str)(x, lora_a, lora_b)


def _adapter_layout(layer) -> tuple[type, tuple, tuple, tuple] | None:
    """``(adapter class, batch axes, contracted axes, produced axes)`` of the kernel of a packed layer
    that :func:`add_lora` adapts, else None: a ServingLinear, a ServingLinearGeneral without batch axes
    contracting its inputs' trailing axes, or a ServingEinsum whose ``einsum_str`` factorises
    (:class:`~quantize_jax.lora.LowRankEinsum`)."""
    if type(layer) is ServingLinear:
        return nnx.LoRA, (), (layer.in_features,), (layer.out_features,)
    if type(layer) is ServingLinearGeneral and not layer.batch_axis:
        n_in = len(layer.in_features)
        if tuple(layer.axis) == tuple(range(-n_in, 0)):
            return LoRAGeneral, (), tuple(layer.in_features), tuple(layer.out_features)
    if type(layer) is ServingEinsum and layer.einsum_str:
        try:
            lr = LowRankEinsum.of(layer.einsum_str)
        except ValueError:
            return None
        a_shape, b_shape = lr.adapter_shapes(layer.qarray.shape[-len(lr.kernel):], rank=1)
        n_batch = len(lr.batch)
        return LoRAEinsum, a_shape[:n_batch], a_shape[n_batch:-1], b_shape[n_batch + 1:]
    return None


def add_lora(model: nnx.Module, rank: int, *, rngs: nnx.Rngs, where: str = "", inplace: bool = False,
             **lora_kwargs) -> nnx.Module:
    """QLoRA: wrap the packed Linear and Einsum layers of a served model in ``nnx.LoRA`` adapters.

    Each :class:`ServingLinear` whose path ``re.search``-es ``where``
    becomes ``nnx.LoRA(in, rank, out, base_module=layer)``: its output is
    ``layer(x) + x @ lora_a @ lora_b``, with ``lora_b`` zero at first (the
    model's outputs are unchanged) and both ``nnx.LoRAParam`` s, so an
    optimizer over ``nnx.LoRAParam`` trains the adapters while the 4-bit
    base stays packed and frozen (Dettmers et al., 2023, QLoRA). A
    :class:`ServingLinearGeneral` that contracts its inputs' trailing axes
    (the attention projections) becomes a :class:`LoRAGeneral`, the same
    over its input and output axes flattened; a :class:`ServingEinsum` a
    :class:`LoRAEinsum` (one adapter per entry of a kernel axis that the
    einsum keeps from inputs to output, such as heads in ``"BNTH,NHD->BNTD"``).

    Args:
      model: a served model (from :func:`to_serving`) or a single packed layer. Layers stacked by
        ``nnx.vmap`` (run by ``nnx.scan``) get one adapter each, stacked the same way.
      rank: the adapters' rank.
      rngs: for the adapters' initialisation.
      where: a regex over layer paths (``"blocks/0/mlp"``); default: every such layer.
      inplace: modify ``model`` itself instead of a copy (a single layer is always wrapped anew).
      **lora_kwargs: passed to ``nnx.LoRA`` (``dtype``, ``param_dtype``, initialisers).

    Raises:
      ValueError: no such layer matches.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, quantize_jax as qj
      >>> served = qj.nnx.to_serving(qj.nnx.quantize_model(nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))))
      >>> tuned = qj.nnx.add_lora(served, 2, rngs=nnx.Rngs(1))
      >>> type(tuned.layers[0]).__name__, bool((tuned(jnp.ones((1, 8))) == served(jnp.ones((1, 8)))).all())
      ('LoRA', True)
    """
    def wrap(layer):
        cls, batch, ins, outs = _adapter_layout(layer)
        shape = layer.qarray.shape
        stack = tuple(shape[: len(shape) - len(batch) - len(ins) - len(outs)])
        k, n = math.prod(ins), math.prod(outs)
        if cls is LoRAEinsum:  # a: batch + contracted + rank, b: batch + rank + produced
            a_shape, b_shape = batch + ins + (rank,), batch + (rank,) + outs
        else:  # nnx.LoRA's own (in, rank), (rank, out), over the axes flattened
            batch, a_shape, b_shape = (), (k, rank), (rank, n)

        @nnx.split_rngs(splits=math.prod(stack + batch))  # stacked layers and batch axes: one adapter each
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def adapters(rngs):
            return cls(k, rank, n, rngs=rngs, **lora_kwargs)

        lora = adapters(rngs) if stack + batch else cls(k, rank, n, rngs=rngs, **lora_kwargs)
        lora.lora_a.set_value(lora.lora_a[...].reshape(stack + a_shape))
        lora.lora_b.set_value(lora.lora_b[...].reshape(stack + b_shape))
        lora.base_module = nnx.data(layer)  # None (static) when the adapters were made
        return lora

    if _adapter_layout(model) is not None:
        return wrap(model)
    if not inplace:
        model = nnx.clone(model)
    regex = re.compile(where)
    targets = [(p, m) for p, m in nnx.iter_modules(model)
               if _adapter_layout(m) is not None and regex.search(_path_str(p))]
    if not targets:
        raise ValueError(f"add_lora: no ServingLinear, trailing-axes ServingLinearGeneral or ServingEinsum layer "
                         f"matches where={where!r}; serve the model with to_serving first")
    for path, layer in targets:
        _replace(model, path, wrap(layer))
    return model


def merge_lora(model: nnx.Module, *, inplace: bool = False) -> nnx.Module:
    """Fold the adapters of :func:`add_lora` back into packed layers: ``quantize(W + lora_a @ lora_b)``.

    Each ``nnx.LoRA`` (or :class:`LoRAGeneral`, :class:`LoRAEinsum`) over a packed layer becomes
    that layer, its weight the dequantized base plus the adapters' product
    (:func:`~quantize_jax.lora.merge_low_rank`), quantized again with the
    base's spec (its scales recomputed). The merged model is one packed
    model to save or export; it rounds the adapters' contribution to the
    4-bit grid, so its outputs differ from the adapted model's by about the
    quantization error (keep the adapters apart where that matters).

    Raises:
      ValueError: the model holds no LoRA over a packed layer.
    """
    def adapted(m) -> bool:
        layout = isinstance(m, nnx.LoRA) and _adapter_layout(m.base_module)
        return bool(layout) and isinstance(m, layout[0])

    def merged(lora):
        new = nnx.clone(lora.base_module)
        subscripts = LowRankEinsum.of(new.einsum_str).kernel_delta if isinstance(lora, LoRAEinsum) else None
        new.kernel.set_value(merge_low_rank(new.qarray, lora.lora_a[...], lora.lora_b[...], subscripts=subscripts))
        return new

    if adapted(model):
        return merged(model)
    if not inplace:
        model = nnx.clone(model)
    targets = [(p, m) for p, m in nnx.iter_modules(model) if adapted(m)]
    if not targets:
        raise ValueError("merge_lora: the model holds no nnx.LoRA over a packed layer (see add_lora)")
    for path, lora in targets:
        _replace(model, path, merged(lora))
    return model


def _module_at(model, path):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def _replace(model, path, new) -> None:
    parent = _module_at(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)
