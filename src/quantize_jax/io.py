"""Checkpoints of trees holding QArrays: safetensors files with a checksum, written atomically.

File layout (``save``): one safetensors file. Every array leaf is a tensor
named by its tree path (``"layers/0/kernel"``); a QArray leaf is stored as
``PATH.packed`` (uint8, two codes per byte along the last axis, even element
in the low nibble), ``PATH.scale`` and, for uint4, ``PATH.zero_point``. The
metadata entry ``quantize_jax`` holds JSON: the format version, the tree
structure (dicts, lists, tuples, None, scalars and leaf references), each
QArray's logical shape, dtype and spec, and the nibble order. The entry
``sha256`` is the digest of that JSON and of every tensor's name, dtype,
shape and bytes, so a truncated or altered file is refused on ``load``
(safetensors alone does not notice changed bytes).

Orbax: a QArray is a pytree, so ``orbax.checkpoint.StandardCheckpointer``
saves a tree of QArrays as is; restore it with a target tree of the same
structure (for example ``jax.eval_shape`` of the function that quantized it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from quantize_jax.qarray import QArray, spec_from_dict, spec_to_dict

FORMAT_VERSION = 1
_META_KEY = "quantize_jax"
# dtypes safetensors' numpy API does not take; stored as same-width unsigned integers.
_VIEW_AS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, altered, or not written by :func:`save`."""


def save(path, tree) -> None:
    """Save a tree of arrays, QArrays and scalars to ``path`` (safetensors), atomically.

    Args:
      path: the file to write; written to a temporary file in the same
        folder and renamed, so a crash never leaves a half-written file.
      tree: nested dicts (string or int keys), lists and tuples of arrays,
        QArrays, Python scalars, strings and None; or a Flax ``nnx.State``
        (``nnx.state(model)``), saved as ``nnx.to_pure_dict(state)``: ``load``
        returns that dict, which ``nnx.replace_by_pure_dict`` puts back into
        a model's state.

    In a multi-process run, when an array spans devices of several
    processes, every process must call ``save``: the arrays are gathered,
    process 0 writes the file, and all return once it is written. (For
    checkpoints too large to gather, use Orbax.)

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, quantize_jax as qj
      >>> tree = {"w": qj.quantize(jnp.ones((4, 8)), qj.QuantSpec(axis=0)), "b": jnp.zeros(8)}
      >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
      >>> qj.save(path, tree)
      >>> qj.load(path)["w"].shape
      (4, 8)
    """
    tensors = _Tensors()
    structure = _encode(tree, (), tensors)
    if tensors.gathered:
        from jax.experimental import multihost_utils

        try:
            if jax.process_index() == 0:
                _write(path, structure, tensors)
        finally:  # the others wait for the file, and are released even if writing fails
            multihost_utils.sync_global_devices(f"quantize_jax.save {path}")
    else:
        _write(path, structure, tensors)


def _write(path, structure, tensors) -> None:
    from safetensors.numpy import save_file

    meta = {"version": FORMAT_VERSION, "nibble_order": "even-low", "tree": structure}
    meta_json = json.dumps(meta, sort_keys=True)
    metadata = {_META_KEY: meta_json, "sha256": _digest(meta_json, tensors)}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save: {path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path, *, verify: bool = True):
    """Load a tree saved by :func:`save`, bit for bit.

    Arrays come back as ``jax.Array``, except 64-bit ones (int64, float64, ...) while
    ``jax_enable_x64`` is off: JAX would narrow those to 32 bits (2**40 as int32 is 0), so they come
    back as the numpy arrays they were saved as.

    Args:
      path: the file.
      verify: check the content checksum (default).

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is truncated, altered, or not a quantize_jax
        checkpoint; the message says which.
    """
    tensors, meta_json, digest = read_raw(path)
    if verify and not checksum_matches(tensors, meta_json, digest):
        raise CheckpointError(f"load: {path}: checksum mismatch: the file was altered after it was written")
    meta = json.loads(meta_json)
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"load: {path}: unsupported format version {meta.get('version')!r}")
    return _decode(meta["tree"], tensors)


def read_raw(path):
    """``(tensors, metadata JSON, stored sha256)`` of a checkpoint, without decoding the tree."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if not os.path.exists(path):
        raise FileNotFoundError(f"load: no such file: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        declared = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"load: {path}: not a readable safetensors file (truncated or corrupted): {e}") from None
    if len(data) != 8 + n + declared:
        raise CheckpointError(f"load: {path}: truncated or padded: {len(data)} bytes, header declares {8 + n + declared}")
    metadata = header.get("__metadata__") or {}
    if _META_KEY not in metadata or "sha256" not in metadata:
        raise CheckpointError(f"load: {path}: not a quantize_jax checkpoint (no '{_META_KEY}' metadata)")
    return tensors, metadata[_META_KEY], metadata["sha256"]


def checksum_matches(tensors, meta_json: str, digest: str) -> bool:
    """Whether the tensors and metadata of :func:`read_raw` still have the digest written by :func:`save`."""
    return _digest(meta_json, tensors) == digest


def _digest(meta_json: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")  # ascontiguousarray would make 0-d arrays 1-d
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _key(path) -> str:
    return "/".join(str(p) for p in path) or "_"


class _Tensors(dict):
    """The tensors to write, by name; ``gathered``: whether an array spanned several processes."""

    gathered = False


def _put(tensors: _Tensors, name, array) -> dict:
    if isinstance(array, jax.Array) and not array.is_fully_addressable:  # collective: every process is here
        from jax.experimental import multihost_utils

        array = multihost_utils.process_allgather(array, tiled=True)
        tensors.gathered = True
    a = np.asarray(array)
    dtype = jnp.dtype(a.dtype).name
    if dtype in _VIEW_AS:
        a = a.view(_VIEW_AS[dtype])
    if name in tensors:
        raise ValueError(f"save: two leaves map to the tensor name {name!r}; keys may not contain '/'")
    tensors[name] = np.asarray(a, order="C")
    return {"tensor": name, "dtype": dtype}


def _get(tensors, ref):
    a = tensors[ref["tensor"]]
    if ref["dtype"] in _VIEW_AS:
        a = a.view(jnp.dtype(ref["dtype"]))
    if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:  # 64-bit without jax_enable_x64: JAX would narrow it
        return a
    return jnp.asarray(a)


def _encode(node, path, tensors):
    if isinstance(node, QArray):
        name = _key(path)
        out = {"kind": "qarray", "shape": list(node.shape), "dtype": jnp.dtype(node.dtype).name,
               "spec": spec_to_dict(node.spec), "packed": _put(tensors, name + ".packed", node.packed),
               "scale": _put(tensors, name + ".scale", node.scale)}
        if node.zero_point is not None:
            out["zero_point"] = _put(tensors, name + ".zero_point", node.zero_point)
        return out
    state = _nnx_state_class()
    if state is not None and isinstance(node, state):  # saved as its pure dict
        from flax import nnx

        node = nnx.to_pure_dict(node)
    if isinstance(node, dict):
        as_text = {}  # the file's keys are strings
        for k in node:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"save: dict keys must be strings or ints, got {k!r} at {_key(path)!r}")
            if str(k) in as_text:
                raise ValueError(f"save: keys {as_text[str(k)]!r} and {k!r} at {_key(path)!r} are both {str(k)!r} in the file")
            as_text[str(k)] = k
        out = {"kind": "dict", "items": {str(k): _encode(v, path + (k,), tensors) for k, v in node.items()}}
        if any(isinstance(k, int) for k in node):  # JSON keys are strings: remember which were ints
            out["int_keys"] = [str(k) for k in node if isinstance(k, int)]
        return out
    if isinstance(node, (list, tuple)):
        return {"kind": type(node).__name__, "items": [_encode(v, path + (i,), tensors) for i, v in enumerate(node)]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"kind": "scalar", "value": node}
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        return {"kind": "array", **_put(tensors, _key(path), node)}
    raise TypeError(f"save: unsupported leaf of type {type(node).__name__} at {_key(path)!r}")


def _nnx_state_class():
    """``flax.nnx.State`` where Flax is already imported (this module never imports it itself), else None."""
    nnx = sys.modules.get("flax.nnx")
    return getattr(nnx, "State", None)


def _decode(node, tensors):
    kind = node["kind"]
    if kind == "qarray":
        zp = _get(tensors, node["zero_point"]) if "zero_point" in node else None
        return QArray(_get(tensors, node["packed"]), _get(tensors, node["scale"]), zp, tuple(node["shape"]),
                      jnp.dtype(node["dtype"]), spec_from_dict(node["spec"]))
    if kind == "dict":
        ints = set(node.get("int_keys", ()))
        return {int(k) if k in ints else k: _decode(v, tensors) for k, v in node["items"].items()}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in node["items"]]
        return items if kind == "list" else tuple(items)
    if kind == "scalar":
        return node["value"]
    return _get(tensors, node)
