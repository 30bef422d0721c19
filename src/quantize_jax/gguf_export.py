"""Export of a parameter tree to a GGUF file with Q4_0 / Q4_1 4-bit blocks (llama.cpp's formats).

The blocks are made by the ``gguf`` package itself (``gguf.quants.quantize``:
blocks of 32 values along the last axis, an fp16 scale (and fp16 minimum for
Q4_1), 16 bytes of codes: the first 16 values in the low nibbles, the next 16
in the high ones), so the bytes are the reference's; the file is written with
``gguf.GGUFWriter``. QArray leaves are dequantized first and re-blocked (GGUF's
blocks have their own scales). Leaves whose last axis is not a multiple of 32,
and 1-D leaves, are stored as F32.
"""

from __future__ import annotations

import numpy as np

from quantize_jax.ptq import path_str
from quantize_jax.qarray import QArray, dequantize

QTYPES = ("q4_0", "q4_1")


def export_gguf(path, params, *, qtype: str = "q4_0", arch: str = "quantize_jax", min_size: int = 1024) -> dict:
    """Write the float (and QArray) leaves of ``params`` to a GGUF file.

    Args:
      path: the ``.gguf`` file to write.
      params: a pytree of arrays and QArrays.
      qtype: ``"q4_0"`` or ``"q4_1"``.
      arch: the ``general.architecture`` written in the header.
      min_size: leaves with fewer elements stay F32.

    Returns:
      ``{tensor name: "Q4_0" | "Q4_1" | "F32"}``, the type each leaf got.

    Example:
      >>> import os, tempfile, jax, quantize_jax as qj
      >>> from quantize_jax.gguf_export import export_gguf
      >>> path = os.path.join(tempfile.mkdtemp(), "w.gguf")
      >>> export_gguf(path, {"w": jax.random.normal(jax.random.key(0), (64, 64))})
      {'w': 'Q4_0'}
    """
    import gguf
    import jax

    if qtype not in QTYPES:
        raise ValueError(f"export_gguf: qtype must be one of {list(QTYPES)}, got {qtype!r}")
    ggml_type = getattr(gguf.GGMLQuantizationType, qtype.upper())
    writer = gguf.GGUFWriter(str(path), arch)
    written = {}
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda a: isinstance(a, QArray))
    for key_path, leaf in leaves:
        name = path_str(key_path)
        x = np.asarray(dequantize(leaf, np.float32) if isinstance(leaf, QArray) else leaf)
        if not np.issubdtype(x.dtype, np.floating):
            continue
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"export_gguf: leaf {name!r} of shape {x.shape} holds NaN or Inf")
        if x.ndim >= 2 and x.shape[-1] % 32 == 0 and x.size >= min_size:
            writer.add_tensor(name, gguf.quants.quantize(x, ggml_type), raw_dtype=ggml_type)
            written[name] = qtype.upper()
        else:
            writer.add_tensor(name, x)
            written[name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
