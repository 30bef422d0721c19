"""quantize_jax: 4-bit quantization for JAX — formats, scales, straight-through
rounding, real bit packing, int4 matmuls, and Flax quantization-aware training.

>>> import jax.numpy as jnp, quantize_jax as qj
>>> w = jnp.arange(-4.0, 4.0).reshape(2, 4)
>>> q = qj.quantize(w, qj.QuantSpec(format="int4", axis=0))
>>> bool((qj.dequantize(q) == qj.fake_quant(w, q.spec)).all())
True
"""

import importlib

from quantize_jax.calibrate import compute_scale
from quantize_jax import export
from quantize_jax import hf_checkpoints
from quantize_jax import lora
from quantize_jax import sharding
from quantize_jax.formats import FORMATS
from quantize_jax.formats import Format
from quantize_jax.formats import get_format
from quantize_jax.packing import pack_int4
from quantize_jax.packing import unpack_int4
from quantize_jax.ptq import quantize_params
from quantize_jax.qarray import QArray
from quantize_jax.qarray import dequantize
from quantize_jax.qarray import quantize
from quantize_jax.qarray import take
from quantize_jax.spec import QuantSpec
from quantize_jax.io import CheckpointError
from quantize_jax.io import load
from quantize_jax.io import save
from quantize_jax.matmul import qdot
from quantize_jax.matmul import qeinsum
from quantize_jax.ste import fake_quant
from quantize_jax.ste import round_ste
from quantize_jax.ste import stochastic_round

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("nnx", "linen")


def __getattr__(name):
    # Flax is imported only when qj.nnx / qj.linen is first used.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"quantize_jax.{name}")
    raise AttributeError(f"module 'quantize_jax' has no attribute {name!r}")


__all__ = (
    "CheckpointError",
    "FORMATS",
    "Format",
    "QArray",
    "QuantSpec",
    "compute_scale",
    "dequantize",
    "fake_quant",
    "get_format",
    "load",
    "pack_int4",
    "qdot",
    "quantize_params",
    "qeinsum",
    "quantize",
    "round_ste",
    "save",
    "stochastic_round",
    "take",
    "unpack_int4",
)
