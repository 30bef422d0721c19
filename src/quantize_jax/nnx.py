"""Flax NNX: quantization-aware training layers, model conversion, and QAT -> packed int4 serving.

* :class:`QuantLinear` is a drop-in :class:`flax.nnx.Linear` (same arguments,
  same ``kernel`` / ``bias`` parameters, so a float checkpoint loads as is)
  whose forward pass fake-quantizes the kernel (and optionally the inputs).
* :func:`quantize_model` swaps the ``nnx.Linear`` layers of an existing model
  for ``QuantLinear`` by path rules, copying the parameters.
* :func:`to_serving` turns a QAT model into one whose weights are packed
  :class:`~quantize_jax.QArray` s used through :func:`~quantize_jax.qdot`; its
  outputs equal the QAT model's, and no float weight matrix is left.

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

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from quantize_jax import matmul
from quantize_jax.calibrate import compute_scale, range_to_scale
from quantize_jax.qarray import QArray, quantize
from quantize_jax.spec import QuantSpec
from quantize_jax.ste import fake_quant

DEFAULT_WEIGHT_SPEC = QuantSpec(format="int4", axis=0)


class QuantStat(nnx.Variable):
    """Calibration statistics (an activation range): state, not a trainable parameter."""


class QuantizedWeight(nnx.Variable):
    """A packed 4-bit weight (a :class:`~quantize_jax.QArray`) of a serving layer."""


def _lsq_grad_scale(s, n_per_scale: int, qmax: float):
    """Scale the gradient reaching ``s`` by ``1 / sqrt(n * qmax)`` (LSQ, Esser et al., 2019); value unchanged."""
    g = 1.0 / float(max(n_per_scale, 1) * max(qmax, 1.0)) ** 0.5
    return s * g + jax.lax.stop_gradient(s - s * g)


class _ActQuant:
    """Activation fake-quant shared by the QAT and the serving layers."""

    act_spec: QuantSpec | str | None
    act_calibration: str

    def _init_act(self, act_spec, act_calibration: str, act_momentum: float):
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
        self.act_range = QuantStat(jnp.zeros((2,), jnp.float32)) if act_calibration == "static" else nnx.data(None)

    def _quant_act(self, x):
        spec = self.act_spec
        if spec is None or spec == "int8":
            return x  # int8 is applied inside the product (qdot's act_quant), identically in QAT and serving
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


class QuantLinear(nnx.Linear, _ActQuant):
    """``nnx.Linear`` with a fake-quantized 4-bit kernel, for quantization-aware training.

    ``y = act(x) @ fake_quant(kernel, weight_spec) + bias``, with
    straight-through gradients to the kernel (and LSQ gradients to a learned
    scale).

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

    def __init__(self, in_features: int, out_features: int, *, weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                 act_spec=None, act_calibration: str = "dynamic", act_momentum: float = 0.99,
                 learn_scale: bool = False, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        _check_weight_spec(weight_spec, (in_features, out_features), type(self).__name__)
        self.weight_spec = weight_spec
        self._init_act(act_spec, act_calibration, act_momentum)
        self.learn_scale = learn_scale
        self.weight_scale = nnx.data(None)
        self.weight_zero_point = nnx.data(None)
        if learn_scale:
            self.init_scale_from_kernel()

    def init_scale_from_kernel(self) -> None:
        """(Re)initialise the learned scale (and zero point) from the current kernel."""
        s, z = compute_scale(self.kernel[...], self.weight_spec)
        self.weight_scale = nnx.Param(s.astype(jnp.float32))
        self.weight_zero_point = nnx.data(None) if z is None else nnx.Param(z.astype(jnp.float32))

    def _scale_and_zero(self):
        """The learned scale and zero point as the forward pass uses them (or ``(None, None)``)."""
        if not self.learn_scale:
            return None, None
        spec = self.weight_spec
        s = self.weight_scale[...]
        n_per_scale = max(1, self.kernel.size // max(s.size, 1))
        s = _lsq_grad_scale(s, n_per_scale, spec.fmt.max_abs_level).astype(spec.scale_dtype)
        z = None if self.weight_zero_point is None else self.weight_zero_point[...]
        return s, z

    def quantized_kernel(self):
        """The fake-quantized kernel of the forward pass."""
        s, z = self._scale_and_zero()
        return fake_quant(self.kernel[...], self.weight_spec, scale=s, zero_point=z)

    def __call__(self, inputs):
        kernel = self.quantized_kernel()
        bias = self.bias[...] if self.bias is not None else None
        x = self._quant_act(inputs)
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        if self.act_spec == "int8":
            x = matmul.fake_int8_tokens(x)
        y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class ServingLinear(nnx.Module, _ActQuant):
    """The serving form of :class:`QuantLinear`: a packed 4-bit weight used through ``qdot``.

    Holds ``weight`` (a :class:`QuantizedWeight` wrapping a QArray) and
    ``bias``; no float weight matrix.
    """

    def __init__(self, layer: QuantLinear, backend: str = "auto"):
        s, z = layer._scale_and_zero()
        kernel = jax.lax.stop_gradient(layer.kernel[...])
        self.weight = QuantizedWeight(quantize(kernel, layer.weight_spec, scale=s, zero_point=z))
        self.bias = nnx.data(None) if layer.bias is None else nnx.Param(layer.bias[...])
        self.dtype = layer.dtype
        self.backend = backend
        self.act_spec = layer.act_spec
        self.act_calibration = layer.act_calibration
        self.act_momentum = layer.act_momentum
        self.use_running_average = True
        self.act_range = nnx.data(None) if layer.act_range is None else QuantStat(layer.act_range[...])

    def __call__(self, inputs):
        x = self._quant_act(inputs)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        q: QArray = self.weight.get_value() if hasattr(self.weight, "get_value") else self.weight.value
        y = matmul.qdot(x, q, backend=self.backend, act_quant="int8" if self.act_spec == "int8" else None)
        if self.bias is not None:
            y = y + jnp.reshape(self.bias[...], (1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
        return y


def _check_weight_spec(spec: QuantSpec, shape, where: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: weight_spec must be a QuantSpec, got {type(spec).__name__}")
    spec.reduced_axes(len(shape), name=f"{where} kernel", shape=shape)
    if spec.group_size is not None:
        axis = spec.reduced_axes(len(shape))[0]
        if spec.group_size > shape[axis]:
            raise ValueError(
                f"{where}: group_size {spec.group_size} is larger than axis {axis} of the kernel of shape {shape}"
            )


Rules = Mapping[str, "QuantSpec | None"] | Sequence[tuple[str, "QuantSpec | None"]]


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _rules(rules, weight_spec):
    if rules is None:
        rules = [(".*", weight_spec)]
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"rules: each rule is (regex, QuantSpec or None), got {item!r}")
        pattern, spec = item
        if spec is not None and spec != "skip" and not isinstance(spec, QuantSpec):
            raise ValueError(f"rules: rule {pattern!r} maps to {spec!r}; expected a QuantSpec, None or 'skip'")
        out.append((re.compile(pattern), None if spec == "skip" else spec))
    return out


def quantize_model(model: nnx.Module, rules: Rules | None = None, *, weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                   act_spec=None, act_calibration: str = "dynamic", learn_scale: bool = False,
                   inplace: bool = False) -> nnx.Module:
    """Replace the ``nnx.Linear`` layers of ``model`` by :class:`QuantLinear`, parameters copied.

    Args:
      model: an NNX model.
      rules: ``{regex: QuantSpec | None}`` (or a list of pairs) over the layer
        paths (``"blocks/0/mlp"``); the first rule whose regex
        ``re.search``-es the path decides: a spec quantizes the layer with
        that weight spec, ``None`` leaves it float. Unmatched layers stay
        float. Default: every Linear with ``weight_spec``.
      weight_spec, act_spec, act_calibration, learn_scale: as for QuantLinear.
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
    for path, module in nnx.iter_modules(model):
        if type(module) is not nnx.Linear:
            continue
        p = _path_str(path)
        for i, (regex, spec) in enumerate(compiled):
            if regex.search(p):
                used[i] = True
                if spec is not None:
                    targets.append((path, module, spec))
                break
    for (regex, _), u in zip(compiled, used):
        if not u:
            raise ValueError(f"quantize_model: rule {regex.pattern!r} matches no nnx.Linear layer of the model")
    for path, lin, spec in targets:
        try:
            _check_weight_spec(spec, lin.kernel.shape, f"layer {_path_str(path)!r}")
        except ValueError as e:
            raise ValueError(f"quantize_model: {e}") from None
        new = QuantLinear(
            lin.in_features, lin.out_features, use_bias=lin.use_bias, dtype=lin.dtype, param_dtype=lin.param_dtype,
            precision=lin.precision, dot_general=lin.dot_general, rngs=nnx.Rngs(0), weight_spec=spec,
            act_spec=act_spec, act_calibration=act_calibration, learn_scale=learn_scale,
        )
        new.kernel[...] = lin.kernel[...]
        if lin.bias is not None:
            new.bias[...] = lin.bias[...]
        if learn_scale:
            new.init_scale_from_kernel()  # from the copied kernel
        _replace(model, path, new)
    return model


def to_serving(model: nnx.Module, *, backend: str = "auto", inplace: bool = False) -> nnx.Module:
    """A QAT model -> a serving model: each :class:`QuantLinear` becomes a :class:`ServingLinear`
    holding a packed QArray; outputs equal the QAT model's up to float reassociation.

    Raises:
      ValueError: the model holds no QuantLinear.
    """
    if not inplace:
        model = nnx.clone(model)
    targets = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)]
    if not targets:
        raise ValueError("to_serving: the model holds no QuantLinear layer; quantize it with quantize_model first")
    for path, layer in targets:
        _replace(model, path, ServingLinear(layer, backend=backend))
    return model


def _replace(model, path, new) -> None:
    if not path:
        raise ValueError("quantize_model: the model itself is a Linear layer; wrap it in a module")
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)
