"""Flax Linen: quantization-aware training and packed int4 serving.

* :class:`QuantDense` — ``nn.Dense`` with a fake-quantized kernel (same
  ``kernel`` / ``bias`` parameters). When its ``kernel`` parameter is a
  :class:`~quantize_jax.QArray` (after :func:`to_serving_params`), the same
  module serves: ``qdot`` over the packed weight.
* :class:`QuantConv`, :class:`QuantDenseGeneral`, :class:`QuantEinsum` — the
  same for ``nn.Conv``, ``nn.DenseGeneral`` and ``nn.Einsum`` (serving:
  ``qeinsum`` over the packed kernel for DenseGeneral and Einsum, the packed
  kernel dequantized inside the forward pass for Conv and with ``backend="xla"``).
* :class:`QuantEmbed` — ``nn.Embed`` with a fake-quantized table; serving
  lookups decode only the rows they read (:func:`~quantize_jax.take`).
* :func:`quant_dot_general` / :func:`quant_conv_general_dilated` — functions
  to inject into a stock ``nn.Dense(dot_general=...)``,
  ``nn.DenseGeneral(dot_general=...)`` or
  ``nn.Conv(conv_general_dilated=...)`` for QAT of existing Linen models.
* :func:`to_serving_params` — QAT variables -> serving variables (packed
  QArrays in place of the kernels, learned scales folded in);
  :func:`to_serving_params_gptq` the same with GPTQ kernels calibrated on
  batches (Dense, Conv, DenseGeneral and Einsum layers, inside ``nn.scan`` too).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import re
from typing import Any

import flax.linen as nn
from flax.errors import ModifyScopeVariableError
import jax
import jax.numpy as jnp
from jax import lax

from quantize_jax import matmul
from quantize_jax.calibrate import compute_scale
from quantize_jax.lora import LowRankEinsum, gptq_einsum_axes, low_rank_weight, merge_low_rank
from quantize_jax.ptq import GptqView, conv_input_axes, conv_rows, gptq_stacked, moment_passes, progress_bar
from quantize_jax.qarray import QArray, dequantize, quantize, take
from quantize_jax.spec import QuantSpec
from quantize_jax.ste import fake_quant


def quant_dot_general(weight_spec: QuantSpec, act_spec: QuantSpec | str | None = None):
    """A ``lax.dot_general`` whose right operand (the kernel) is fake-quantized with ``weight_spec``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, quantize_jax as qj
      >>> dense = nn.Dense(4, dot_general=qj.linen.quant_dot_general(qj.QuantSpec(axis=0)))
      >>> params = dense.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> dense.apply(params, jnp.ones((1, 8))).shape
      (1, 4)
    """

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        return lax.dot_general(_act(lhs, act_spec), fake_quant(rhs, weight_spec), dimension_numbers,
                               precision=precision, preferred_element_type=preferred_element_type)

    return dot_general


def quant_conv_general_dilated(weight_spec: QuantSpec, act_spec: QuantSpec | str | None = None):
    """A ``lax.conv_general_dilated`` whose kernel is fake-quantized with ``weight_spec``
    (for ``nn.Conv(conv_general_dilated=...)``; HWIO kernels: ``axis=(0, 1, 2)`` is per output channel)."""

    def conv(lhs, rhs, *args, **kwargs):
        return lax.conv_general_dilated(_act(lhs, act_spec), fake_quant(rhs, weight_spec), *args, **kwargs)

    return conv


def _act(x, act_spec):
    if act_spec is None:
        return x
    if act_spec == "int8":
        return matmul.fake_int8_tokens(x)
    return fake_quant(x, act_spec)


class QuantDense(nn.Module):
    """``nn.Dense`` for quantization-aware training and packed serving.

    QAT: ``y = act(x) @ fake_quant(kernel, weight_spec) + bias`` with
    straight-through (and, with ``learn_scale``, LSQ) gradients. Serving: when
    the ``kernel`` parameter is a QArray (see :func:`to_serving_params`),
    ``y = qdot(act(x), kernel) + bias`` in the dtype ``nn.Dense`` computes in:
    the same outputs up to float reassociation, or with ``backend="xla"`` the
    QAT forward over the dequantized kernel, bit for bit.

    Attributes:
      features, use_bias, dtype, param_dtype, precision, kernel_init,
        bias_init, promote_dtype: as for ``nn.Dense`` (same parameter names
        and shapes).
      weight_spec: default int4 per output channel (``axis=0``).
      act_spec: ``None``, ``"int8"`` (W4A8, per token) or a 4-bit QuantSpec
        (dynamic).
      learn_scale: a ``weight_scale`` parameter (and ``weight_zero_point``
        for uint4), initialised from the kernel.
      backend: the ``qdot`` backend when serving.
      lora_rank: QLoRA: adapters of this rank in the ``"lora"`` collection,
        ``y += x @ a @ b`` (``a`` He-uniform, ``b`` zeros at init, as
        ``nnx.LoRA``). ``jax.grad`` over ``variables["lora"]`` trains them
        while a packed kernel stays frozen; :func:`merge_lora` folds them
        into the kernel. Without a ``"lora"`` collection (after the merge)
        the layer is the plain one.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> layer = qj.linen.QuantDense(4)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> served = qj.linen.to_serving_params(layer, variables, jnp.ones((1, 8)))
      >>> type(served["params"]["kernel"]).__name__
      'QArray'
      >>> bool(jnp.allclose(layer.apply(served, jnp.ones((1, 8))), layer.apply(variables, jnp.ones((1, 8)))))
      True
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    weight_spec: QuantSpec = QuantSpec(format="int4", axis=0)
    act_spec: QuantSpec | str | None = None
    learn_scale: bool = False
    backend: str = "auto"
    promote_dtype: Any = nn.dtypes.promote_dtype
    lora_rank: int = 0

    @nn.compact
    def __call__(self, inputs):
        return _with_lora(self, inputs, self._dense(inputs), (inputs.ndim - 1,), (self.features,))

    def _dense(self, inputs):
        """The layer without adapters: QAT over the float kernel, or serving from a packed one."""
        kernel = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if not isinstance(kernel, QArray):  # a packed kernel has no float shape to check against
            kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        bias_shape = (1,) * (jnp.ndim(inputs) - 1) + (-1,)
        if _served_kernel(self) is not None:
            return _packed_einsum(self, "...k,kn->...n", inputs, kernel, bias, bias_shape)
        if isinstance(kernel, QArray):  # serving with backend="xla": the QAT forward, bit for bit
            kernel_q = dequantize(kernel, kernel.dtype)
        else:
            s, z = self._scale_and_zero(kernel)
            kernel_q = fake_quant(kernel, self.weight_spec, scale=s, zero_point=z)
            if _collects_qarrays(self):  # to_serving_params collects
                self.put_variable("qarrays", "kernel", quantize(lax.stop_gradient(kernel), self.weight_spec,
                                                                scale=s, zero_point=z))
        x, kernel_q, bias = self.promote_dtype(_act(inputs, self.act_spec), kernel_q, bias, dtype=self.dtype)
        y = lax.dot_general(x, kernel_q, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + jnp.reshape(bias, bias_shape)

    def _scale_and_zero(self, kernel):
        if not self.learn_scale:
            return None, None
        spec = self.weight_spec

        def init(index):  # calibrated from the kernel, at init only
            return lambda _: compute_scale(lax.stop_gradient(kernel), spec)[index].astype(jnp.float32)

        s = self.param("weight_scale", init(0))
        z = self.param("weight_zero_point", init(1)) if spec.fmt.has_zero_point else None
        return s.astype(spec.scale_dtype), z


def _with_lora(module, inputs, y, axes, features):
    """``y`` plus the layer's QLoRA adapters (``lora_rank``), if it has them: ``x' @ a @ b``, with ``x'``
    the inputs' contracted ``axes`` moved last and flattened (``a`` ``(K, r)``, He-uniform; ``b``
    ``(r, N)``, zeros; as ``nnx.LoRA``) and the product reshaped to the output ``features``."""
    if not _adapted(module):
        return y
    x = jnp.moveaxis(inputs, axes, range(-len(axes), 0))
    lead = x.shape[: x.ndim - len(axes)]
    x = x.reshape(lead + (-1,))
    rank = module.lora_rank
    a, b = _lora_variables(module, (x.shape[-1], rank), (rank, math.prod(features)), nn.initializers.he_uniform())
    x, a, b = module.promote_dtype(x, a, b, dtype=module.dtype)
    return y + (x @ a @ b).reshape(lead + tuple(features)).astype(y.dtype)


def _adapted(module) -> bool:
    """Whether a layer with ``lora_rank`` has its adapters: at init, or when the ``"lora"`` collection
    holds them (after :func:`merge_lora`, without it, the layer is the plain one)."""
    return bool(module.lora_rank) and (module.is_initializing() or module.has_variable("lora", "a"))


def _lora_variables(module, a_shape, b_shape, a_init):
    """The adapters ``a`` (``a_init``) and ``b`` (zeros, so the adapted layer starts as the layer) in
    the ``"lora"`` collection."""
    def init(shape, fn):
        return lambda: fn(module.make_rng("params"), shape, module.param_dtype)

    return (module.variable("lora", "a", init(a_shape, a_init)).value,
            module.variable("lora", "b", init(b_shape, nn.initializers.zeros_init())).value)


def to_serving_params(module: nn.Module, variables, *args, **kwargs):
    """QAT variables -> serving variables for the same ``module``.

    Runs ``module`` once on sample ``args`` to collect, from every
    quantize_jax Linen layer (:class:`QuantDense`, :class:`QuantConv`,
    :class:`QuantDenseGeneral`, :class:`QuantEinsum`, :class:`QuantEmbed`), its kernel quantized to
    a packed QArray (with its learned scale); returns ``variables`` with those
    QArrays in place of the kernels and the learned scales removed.
    ``module.apply(serving, x)`` then serves: ``QuantDense`` through ``qdot``,
    ``QuantDenseGeneral`` / ``QuantEinsum`` through ``qeinsum``, ``QuantEmbed``
    by ``take``, ``QuantConv`` by dequantizing the packed kernel inside the
    forward pass.
    Layers stacked by ``nn.scan`` / ``nn.vmap`` collect stacked QArrays when
    the ``"qarrays"`` collection is scanned like ``"params"``
    (``variable_axes={"params": 0, "qarrays": 0}``).

    Raises:
      ValueError: the module holds no quantize_jax layer.
    """
    _, state = module.apply(variables, *args, mutable=["qarrays"], **kwargs)
    qarrays = state.get("qarrays", {})
    if not qarrays:
        raise ValueError("to_serving_params: the module holds no quantize_jax layer to convert (layers inside "
                         "nn.scan or nn.vmap need 'qarrays' in variable_axes, as 'params': {'params': 0, 'qarrays': 0})")
    params = dict(variables["params"])
    _merge(params, qarrays, path=())
    out = dict(variables)
    out["params"] = params
    return out


def to_serving_params_gptq(module: nn.Module, variables, batches, *, where: str = "", damp: float = 0.01,
                           act_order: bool = False, max_moment_bytes: int | None = None, sequential: bool = False,
                           progress: bool = True):
    """:func:`to_serving_params` with GPTQ kernels, each quantized for the inputs it sees.

    ``module.apply(variables, *batch)`` runs (jitted) over every batch while
    each eligible layer adds up its inputs' ``x^T x``; then
    :func:`~quantize_jax.ptq.gptq_kernel` quantizes its float kernel with its
    weight spec for that second moment, in place of rounding to nearest (as
    :func:`quantize_jax.nnx.to_serving_gptq` does for NNX). Eligible:
    :class:`QuantDense` without learned scales,
    :class:`QuantConv` without a mask (its inputs are the patches its kernel
    multiplies, :func:`~quantize_jax.ptq.conv_rows`; grouped ones with one
    scale per output channel),
    :class:`QuantDenseGeneral` contracting its inputs' trailing axes without
    batch dims, and :class:`QuantEinsum` (its ``einsum_str`` an attribute)
    whose inputs end with the contracted axes (kernel batch axes, such as
    experts, leading the kernel: each entry on its own inputs), when the
    weight spec reduces the kernel's input axes and no batch axis (one scale per output
    feature, groups along a single input axis, or, without groups, scales
    shared across outputs too, fixed before GPTQ's walk). Every other layer
    is served as :func:`to_serving_params` serves it. Layers stacked by
    ``nn.scan`` / ``nn.vmap`` record their inputs in the ``"qarrays"``
    collection, which must be scanned like ``"params"`` (as
    :func:`to_serving_params` needs): each layer of the stack is quantized
    for its own inputs.

    Args:
      module, variables: the QAT module and its variables.
      batches: an iterable of calibration batches, each the module's argument
        or a tuple of its arguments.
      where: a regex over layer paths (``"Block_0/QuantDense_1"``, scope names
        joined by ``/``); default every eligible layer.
      damp: GPTQ's dampening, relative to the mean diagonal of ``x^T x / n``.
      act_order: GPTQ walks each kernel's inputs by decreasing energy (groups
        then take their scales before the walk; :func:`~quantize_jax.ptq.gptq`).
      max_moment_bytes: the most bytes of recorded ``x^T x`` at a time: the
        layers are calibrated in passes over the batches (a layer larger than
        that alone), which must then be iterable again; ``None``: one pass.
      sequential: one layer per pass, in the order the module calls them,
        each recording its inputs through the served variables, the layers
        before it already GPTQ's (as the paper quantizes layer after layer).
      progress: tqdm progress bars.

    Raises:
      ValueError: ``batches`` is empty (or an iterator where several passes
        need it), no eligible layer matching ``where`` was called, one sits inside
        ``nn.scan`` / ``nn.vmap`` that do not stack ``"qarrays"``, or
        ``max_moment_bytes`` is not a positive int.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> layer = qj.linen.QuantDense(8)
      >>> x = jax.random.normal(jax.random.key(1), (4, 32, 64))  # 4 batches of 32 rows
      >>> variables = layer.init(jax.random.key(0), x[0])
      >>> served = qj.linen.to_serving_params_gptq(layer, variables, x, progress=False)
      >>> type(served["params"]["kernel"]).__name__
      'QArray'
    """
    views = {}  # path -> GptqView, in call order; filled while recording is traced
    regex = re.compile(where)

    def add(layer, view, x):  # into the "qarrays" collection, which nn.scan / nn.vmap stack like the params
        views.setdefault(layer.path, view)
        xtx, rows = view.moments(x)
        if layer.has_variable("qarrays", _XTX):  # a layer called twice adds both inputs up
            xtx, rows = xtx + layer.get_variable("qarrays", _XTX), rows + layer.get_variable("qarrays", _ROWS)
        layer.put_variable("qarrays", _XTX, xtx)
        layer.put_variable("qarrays", _ROWS, rows)

    def record(wanted, next_fun, args, kwargs, context):
        layer = context.module
        view = _gptq_view(layer, args[0]) if context.method_name == "__call__" else None
        if view is None or not regex.search("/".join(layer.path)) or (wanted is not None and layer.path not in wanted):
            return next_fun(*args, **kwargs)
        if isinstance(layer, QuantConv):  # its rows: the patches of its convolution's inputs
            token = _conv_recorder.set(lambda *conv_args, **conv_kwargs: add(layer, view, conv_rows(
                *conv_args, **conv_kwargs)[0]))
            try:
                return next_fun(*args, **kwargs)
            finally:
                _conv_recorder.reset(token)
        add(layer, view, view.rows(args[0]))
        return next_fun(*args, **kwargs)

    @functools.partial(jax.jit, static_argnums=2)
    def batch_moments(variables, args, wanted):  # wanted: the layer paths to record, None for all
        token = _recording.set(True)
        try:
            with nn.intercept_methods(functools.partial(record, wanted)):
                _, state = module.apply(variables, *args, mutable=["qarrays"])
        finally:
            _recording.reset(token)
        return dict(_recorded(state.get("qarrays", {}), ()))

    def as_args(batch):
        return batch if isinstance(batch, tuple) else (batch,)

    def moments_of(args, wanted, using):
        try:
            return batch_moments(using, args, wanted)
        except ModifyScopeVariableError:
            raise ValueError("to_serving_params_gptq: layers inside nn.scan / nn.vmap record their inputs in the "
                             "'qarrays' collection: scan it like 'params' (variable_axes={'params': 0, "
                             "'qarrays': 0}), as to_serving_params needs") from None

    def summed(wanted, label, using):  # every wanted layer's x^T x and rows over all batches; the first batch
        totals, first = {}, None
        for batch in progress_bar(batches, progress, f"{label}: inputs", "batch"):
            first = first or as_args(batch)
            for path, (xtx, rows) in moments_of(as_args(batch), wanted, using).items():
                total = totals.get(path, (0.0, 0.0))
                totals[path] = (total[0] + xtx, total[1] + rows)
        if first is None:
            raise ValueError("to_serving_params_gptq: batches is empty; give at least one calibration batch")
        return totals, first

    passes = [None]
    if max_moment_bytes is not None or sequential:  # the layers that record, from the first batch's shapes
        remaining = iter(batches)
        head = next(remaining, None)
        if head is None:
            raise ValueError("to_serving_params_gptq: batches is empty; give at least one calibration batch")
        if remaining is batches:  # an iterator: the batch read goes back in front
            batches = itertools.chain([head], remaining)
        shapes = jax.eval_shape(lambda args: moments_of(args, None, variables), as_args(head))
        passes = [frozenset(chunk) for chunk in moment_passes([p for p in views if p in shapes],  # call order
                                                              lambda p: 4 * shapes[p][0].size, max_moment_bytes,
                                                              batches, "to_serving_params_gptq",
                                                              sequential=sequential)]
    served = None
    for number, wanted in enumerate(passes, 1):
        label = "to_serving_params_gptq" + (f" (pass {number} of {len(passes)})" if len(passes) > 1 else "")
        totals, first = summed(wanted, label, served if sequential and served is not None else variables)
        if not totals:
            raise ValueError(f"to_serving_params_gptq: no layer GPTQ can quantize matching where={where!r} was "
                             f"called by the module (QuantDense, QuantConv, QuantDenseGeneral or QuantEinsum whose "
                             f"weight spec reduces its input axes)")
        if served is None:
            served = to_serving_params(module, variables, *first)
        for path, (xtx, rows) in progress_bar(list(totals.items()), progress, f"{label}: GPTQ", "layer"):
            kernel = functools.reduce(lambda tree, name: tree[name], path, variables["params"])["kernel"]
            layer = functools.reduce(lambda tree, name: tree[name], path, served["params"])
            layer["kernel"] = gptq_stacked(kernel, xtx, rows, views[path], fn="to_serving_params_gptq",
                                           where="/".join(path), damp=damp, act_order=act_order)
    return served


_XTX, _ROWS = "gptq_xtx", "gptq_rows"  # what to_serving_params_gptq records of a layer's inputs
_recording = contextvars.ContextVar("quantize_jax_recording_moments", default=False)


def _recorded(tree: dict, path: tuple):
    """``(layer path, (x^T x, rows))`` for every layer that recorded its inputs into ``tree`` (``"qarrays"``)."""
    if _XTX in tree:
        yield path, (tree[_XTX], tree[_ROWS])
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _recorded(value, path + (name,))


def _collects_qarrays(layer) -> bool:
    """Whether ``layer`` puts its quantized kernel into the ``"qarrays"`` collection (for
    :func:`to_serving_params`; not while :func:`to_serving_params_gptq` records inputs there)."""
    return layer.is_mutable_collection("qarrays") and not layer.is_initializing() and not _recording.get()


def _gptq_view(layer, inputs) -> GptqView | None:
    """How GPTQ sees the kernel of a Linen layer :func:`to_serving_params_gptq` can quantize (its inputs'
    trailing axes, or a convolution's patches, contracted with the view's input axes; an einsum's kernel
    batch axes leading it, :func:`~quantize_jax.lora.gptq_einsum_axes`), else None."""
    batch, groups = (), 1
    if type(layer) is QuantDense:
        spec, kernel_ndim, input_axes = layer.weight_spec, 2, (0,)
        if layer.learn_scale:
            return None
    elif type(layer) is QuantConv:
        if (layer.conv_general_dilated is not _recordable_conv or layer.conv_general_dilated_cls is not None
                or layer.mask is not None):
            return None
        d = 1 if isinstance(layer.kernel_size, int) else len(layer.kernel_size)
        spec, kernel_ndim, input_axes = layer.weight_spec, d + 2, conv_input_axes(d)
        groups = layer.feature_group_count
    elif type(layer) is QuantDenseGeneral:
        axes, features = layer._axes_and_features(inputs.ndim)
        if layer.batch_dims or axes != list(range(inputs.ndim - len(axes), inputs.ndim)):
            return None
        spec, kernel_ndim, input_axes = layer.weight_spec, len(axes) + len(features), tuple(range(len(axes)))
    elif type(layer) is QuantEinsum and layer.einsum_str and gptq_einsum_axes(layer.einsum_str):
        spec, kernel_ndim = layer.weight_spec, len(layer.shape)
        batch, input_axes = gptq_einsum_axes(layer.einsum_str)
    else:
        return None
    view = GptqView(_kernel_spec(spec, kernel_ndim), input_axes, batch, groups)
    return view if view.entry(kernel_ndim) is not None else None


def merge_lora(variables):
    """Fold the QLoRA adapters (``lora_rank``) of :class:`QuantDense`, :class:`QuantDenseGeneral` and
    :class:`QuantEinsum` layers into their kernels.

    For every layer with ``a`` and ``b`` in the ``"lora"`` collection, a packed kernel becomes
    ``quantize(dequantize(kernel) + a @ b)`` with its spec (:func:`~quantize_jax.lora.merge_low_rank`;
    re-rounded to the 4-bit grid), a float kernel ``kernel + a @ b`` (the product as
    :func:`~quantize_jax.lora.low_rank_weight` shapes it to the kernel). Returns ``variables`` without
    the ``"lora"`` collection: the same module then applies the merged kernels alone.

    Raises:
      ValueError: there is no ``"lora"`` collection, or an adapter has no kernel beside it.
    """
    if "lora" not in variables:
        raise ValueError("merge_lora: the variables hold no 'lora' collection (QuantDense(lora_rank=...) creates it)")
    out = {k: v for k, v in variables.items() if k != "lora"}
    out["params"] = _merged_params(variables["params"], variables["lora"], path=())
    return out


def _merged_params(params, lora, path):
    params = dict(params)
    for name, value in lora.items():
        if set(value) == {"a", "b"}:
            layer = params.get(name)
            kernel = layer.get("kernel") if isinstance(layer, dict) else None
            if kernel is None:
                raise ValueError(f"merge_lora: adapters at {'/'.join(path + (name,))} have no kernel beside them")
            if isinstance(kernel, QArray):
                merged = merge_low_rank(kernel, value["a"], value["b"])
            else:
                merged = kernel + low_rank_weight(value["a"], value["b"], kernel.shape).astype(kernel.dtype)
            params[name] = {**layer, "kernel": merged}
        else:
            params[name] = _merged_params(params.get(name, {}), value, path + (name,))
    return params


def _merge(params: dict, qarrays: dict, path) -> None:
    for name, value in qarrays.items():
        if isinstance(value, QArray):
            params[name] = value
            params.pop("weight_scale", None)
            params.pop("weight_zero_point", None)
        else:
            if name not in params:
                raise ValueError(f"to_serving_params: no parameters at {'/'.join(path + (name,))}")
            params[name] = dict(params[name])
            _merge(params[name], value, path + (name,))


def _kernel_spec(weight_spec: QuantSpec | None, ndim: int) -> QuantSpec:
    """A Linen layer's weight spec: its own, or one scale per last kernel axis entry."""
    return weight_spec or QuantSpec(axis=tuple(range(ndim - 1)) if ndim > 1 else None)


class _QuantKernel:
    """Mixin for Flax Linen layers: their ``kernel`` parameter is read fake-quantized (QAT), or, when the
    parameter is a QArray (serving variables from :func:`to_serving_params`), dequantized; the layer's
    own forward is otherwise untouched. Inputs are quantized first when ``act_spec`` is set."""

    def param(self, name, init_fn, *init_args, **init_kwargs):
        if name != "kernel":
            return super().param(name, init_fn, *init_args, **init_kwargs)
        if self.has_variable("params", "kernel"):
            stored = self.get_variable("params", "kernel")
            if isinstance(stored, QArray):
                return dequantize(stored, stored.dtype)
        kernel = super().param(name, init_fn, *init_args, **init_kwargs)
        spec = _kernel_spec(self.weight_spec, kernel.ndim)
        if _collects_qarrays(self):
            self.put_variable("qarrays", "kernel", quantize(lax.stop_gradient(kernel), spec))
        return fake_quant(kernel, spec)

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(_act(inputs, self.act_spec), *args, **kwargs)


_conv_recorder = contextvars.ContextVar("quantize_jax_conv_recorder", default=None)


def _recordable_conv(lhs, rhs, *args, **kwargs):
    """``lax.conv_general_dilated``, whose arguments :func:`to_serving_params_gptq` reads while it records
    a :class:`QuantConv`'s inputs (the recorder it sets for the duration of that layer's call)."""
    recorder = _conv_recorder.get()
    if recorder is not None:
        recorder(lhs, rhs, *args, **kwargs)
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


class QuantConv(_QuantKernel, nn.Conv):
    """``nn.Conv`` with a fake-quantized kernel (default: int4 per output channel); serves from QArray params.

    Its ``conv_general_dilated`` is ``lax.conv_general_dilated`` through a hook that lets
    :func:`to_serving_params_gptq` read the patches its kernel multiplies; a layer given another
    convolution function is served by rounding instead.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> conv = qj.linen.QuantConv(8, (3, 3))
      >>> v = conv.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
      >>> conv.apply(v, jnp.ones((1, 6, 6, 3))).shape
      (1, 6, 6, 8)
    """

    weight_spec: QuantSpec | None = None
    act_spec: QuantSpec | str | None = None
    conv_general_dilated: Any = _recordable_conv


def _served_kernel(module) -> QArray | None:
    """The packed kernel when ``module`` serves through ``qeinsum`` (a QArray ``kernel`` parameter and a
    backend other than ``"xla"``), else None: its Flax forward then runs over the dequantized kernel."""
    stored = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
    return stored if isinstance(stored, QArray) and module.backend != "xla" else None


def _packed_einsum(module, subscripts: str, inputs, q: QArray, bias, bias_shape):
    """``qeinsum`` over the packed kernel with the layer's activation quantization and dtype promotion."""
    int8 = module.act_spec == "int8"
    x = inputs if int8 else _act(inputs, module.act_spec)
    x, _, bias = module.promote_dtype(x, jnp.zeros((), q.dtype), bias, dtype=module.dtype)
    y = matmul.qeinsum(subscripts, x, q, backend=module.backend, act_quant="int8" if int8 else None).astype(x.dtype)
    return y if bias is None else y + jnp.reshape(bias, bias_shape)


class QuantDenseGeneral(_QuantKernel, nn.DenseGeneral):
    """``nn.DenseGeneral`` with a fake-quantized kernel (default: one scale per last kernel axis entry).

    Serving (a QArray kernel): :func:`~quantize_jax.qeinsum` over the packed kernel, or with
    ``backend="xla"`` (and for batch dims, a custom ``dot_general``, or W4A8 contracting more than the
    last axis) the Flax forward over the dequantized kernel, bit for bit the QAT outputs.

    ``lora_rank`` (without ``batch_dims``): QLoRA adapters as :class:`QuantDense`'s, over the
    contracted axes and the features each flattened (``a`` ``(prod(contracted), r)``, ``b``
    ``(r, prod(features))``, their product reshaped to the kernel), for attention projections.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> proj = qj.linen.QuantDenseGeneral((4, 8), lora_rank=2)  # 4 heads of 8 features
      >>> v = proj.init(jax.random.key(0), jnp.ones((1, 5, 32)))
      >>> v["params"]["kernel"].shape, v["lora"]["a"].shape, v["lora"]["b"].shape
      ((32, 4, 8), (32, 2), (2, 32))
    """

    weight_spec: QuantSpec | None = None
    act_spec: QuantSpec | str | None = None
    backend: str = "auto"
    lora_rank: int = 0

    @nn.compact
    def __call__(self, inputs):
        axes, features = self._axes_and_features(inputs.ndim)
        if self.lora_rank and self.batch_dims:
            raise ValueError(f"QuantDenseGeneral: lora_rank={self.lora_rank} needs batch_dims=(), "
                             f"got batch_dims={self.batch_dims!r}")
        return _with_lora(self, inputs, self._dense_general(inputs, axes, features), tuple(axes), features)

    def _axes_and_features(self, ndim: int) -> tuple[list[int], tuple[int, ...]]:
        """The inputs' contracted axes (sorted, non-negative) and the output features, as tuples would give."""
        axes = sorted(a % ndim for a in (self.axis if isinstance(self.axis, tuple) else (self.axis,)))
        return axes, self.features if isinstance(self.features, tuple) else (self.features,)

    def _dense_general(self, inputs, axes, features):
        """The layer without adapters: QAT over the float kernel, or serving from a packed one."""
        q = _served_kernel(self)
        custom = self.batch_dims or self.dot_general is not None or self.dot_general_cls is not None
        if q is None or custom or (self.act_spec == "int8" and axes != [inputs.ndim - 1]):
            return _QuantKernel.__call__(self, inputs)
        subscripts, n_free = matmul.dense_general_subscripts(inputs.ndim, axes, len(features))
        bias = self.get_variable("params", "bias") if self.use_bias else None
        return _packed_einsum(self, subscripts, inputs, q, bias, (1,) * n_free + features)


class QuantEinsum(_QuantKernel, nn.Einsum):
    """``nn.Einsum`` with a fake-quantized kernel (default: one scale per last kernel axis entry).

    Serving (a QArray kernel): :func:`~quantize_jax.qeinsum` over the packed kernel, or with
    ``backend="xla"`` (and for ``preferred_element_type``, or W4A8 contracting more than the inputs' last
    axis) the Flax forward over the dequantized kernel, bit for bit the QAT outputs.

    ``lora_rank``: QLoRA adapters in the ``"lora"`` collection, held in the kernel's own axes
    (:meth:`~quantize_jax.lora.LowRankEinsum.aligned_shapes`: ``a`` over the contracted and batch axes,
    ``b`` over the produced and batch axes, size 1 elsewhere, the rank last), so that
    :func:`merge_lora` finds their weight from the shapes alone.

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> q = qj.linen.QuantEinsum((4, 32, 8), "BTD,NDH->BTNH", use_bias=False, lora_rank=2)
      >>> v = q.init(jax.random.key(0), jnp.ones((1, 5, 32)))
      >>> v["lora"]["a"].shape, v["lora"]["b"].shape
      ((1, 32, 1, 2), (4, 1, 8, 2))
    """

    weight_spec: QuantSpec | None = None
    act_spec: QuantSpec | str | None = None
    backend: str = "auto"
    lora_rank: int = 0

    @nn.compact
    def __call__(self, inputs, einsum_str=None):
        subscripts = (einsum_str or self.einsum_str or "").replace(" ", "")
        y = self._einsum(inputs, einsum_str, subscripts)
        if not _adapted(self):
            return y
        lr = LowRankEinsum.of(subscripts)
        axes = lambda letters: tuple(i for i, c in enumerate(lr.kernel) if c in letters)  # noqa: E731
        a_init = nn.initializers.he_uniform(in_axis=axes(lr.contracted), out_axis=-1, batch_axis=axes(lr.batch))
        a, b = _lora_variables(self, *lr.aligned_shapes(self.shape, self.lora_rank), a_init)
        x, a, b = self.promote_dtype(inputs, a, b, dtype=self.dtype)
        return y + lr(x, a, b).astype(y.dtype)

    def _einsum(self, inputs, einsum_str, subscripts):
        """The layer without adapters: QAT over the float kernel, or serving from a packed one."""
        q = _served_kernel(self)
        last_only = matmul.contracts_last_axis_only(subscripts)
        if q is None or self.preferred_element_type is not None or (self.act_spec == "int8" and not last_only):
            return _QuantKernel.__call__(self, inputs, einsum_str)
        bias, shape = None, None
        if self.use_bias:
            _, shape = self._get_bias_shape(subscripts, inputs, jax.ShapeDtypeStruct(q.shape, q.dtype))
            bias = self.get_variable("params", "bias")
        return _packed_einsum(self, subscripts, inputs, q, bias, shape)


class QuantEmbed(nn.Embed):
    """``nn.Embed`` with a fake-quantized table (default: int4, one scale per row); serves from a QArray.

    QAT: lookups and ``attend`` read ``fake_quant(embedding, weight_spec)``
    (straight-through gradients). Serving (an ``embedding`` parameter that is
    a QArray, from :func:`to_serving_params`): a lookup decodes only the rows
    it reads (the QAT outputs bit for bit); ``attend`` is
    ``qeinsum("...d,vd->...v", query, table, backend=backend)`` (with
    ``backend="xla"``: the dequantized table, bit for bit).

    Example:
      >>> import jax, jax.numpy as jnp, quantize_jax as qj
      >>> embed = qj.linen.QuantEmbed(100, 16)
      >>> ids = jnp.array([[1, 2, 3]])
      >>> variables = embed.init(jax.random.key(0), ids)
      >>> served = qj.linen.to_serving_params(embed, variables, ids)
      >>> bool((embed.apply(served, ids) == embed.apply(variables, ids)).all())
      True
    """

    weight_spec: QuantSpec | None = None
    backend: str = "auto"

    def setup(self):
        stored = self.get_variable("params", "embedding") if self.has_variable("params", "embedding") else None
        self.served = stored if isinstance(stored, QArray) else None
        if self.served is not None:
            return
        table = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype)
        spec = self.weight_spec or QuantSpec(format="int4", axis=1)
        if _collects_qarrays(self):
            self.put_variable("qarrays", "embedding", quantize(lax.stop_gradient(table), spec))
        self.embedding = fake_quant(table, spec)

    def __call__(self, inputs):
        if self.served is None:
            return super().__call__(inputs)
        if not jnp.issubdtype(jnp.asarray(inputs).dtype, jnp.integer):
            raise ValueError(f"QuantEmbed: inputs must be integer token ids, got dtype {jnp.asarray(inputs).dtype}")
        dtype = self.dtype or self.served.dtype
        if self.num_embeddings == 1:
            return jnp.broadcast_to(dequantize(self.served, dtype), jnp.shape(inputs) + (self.features,))
        return take(self.served, inputs, dtype=dtype)

    def attend(self, query):
        """``query @ table.T`` over the fake-quantized (QAT) or the dequantized (serving) table."""
        if self.served is None:
            return super().attend(query)
        if self.backend != "xla":
            return matmul.embedding_logits(query, self.served, dtype=self.dtype, backend=self.backend)
        query, embedding = self.promote_dtype(query, dequantize(self.served), dtype=self.dtype)
        return jnp.dot(query, embedding.T)
