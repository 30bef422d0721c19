"""The ``quantize-jax`` command: ``demo``, ``quantize`` and ``inspect``.

Errors are one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

from quantize_jax.formats import FORMATS
from quantize_jax.spec import METHODS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, as argparse's own
        self.exit(2, f"{self.prog}: error: {message}\n")


class CommandError(Exception):
    """An error to report as one line."""


def _demo(args) -> int:
    from quantize_jax import demo

    demo.run(quick=args.quick)
    return 0


def _read_tensors(path: str) -> dict:
    import numpy as np

    if not os.path.exists(path):
        raise CommandError(f"no such file: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return dict(load_file(path))
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
    except Exception as e:  # a damaged input is reported in one line, whatever the reader raised
        raise CommandError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    raise CommandError(f"unsupported input {path!r}: expected a .safetensors or .npz file")


def _quantize(args) -> int:
    import jax.numpy as jnp

    from quantize_jax import io
    from quantize_jax.ptq import quantize_params
    from quantize_jax.spec import QuantSpec

    tensors = _read_tensors(args.input)
    try:
        spec = QuantSpec(format=args.format, axis=args.axis, group_size=args.group_size, method=args.method)
    except ValueError as e:
        raise CommandError(str(e)) from None
    rules = []
    for name, t in tensors.items():
        if t.ndim >= 2 and t.size >= args.min_size and jnp.issubdtype(t.dtype, jnp.floating):
            rules.append(("^" + re.escape(name) + "$", _spec_for(t.ndim, spec)))
    try:  # the tensors stay numpy arrays: those left float keep their dtype (jnp would narrow int64 to int32)
        qtree, report = quantize_params(tensors, rules, min_size=args.min_size, progress=not args.quiet)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(report)
    io.save(args.output, qtree)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes; input {os.path.getsize(args.input)} bytes)")
    return 0


def _spec_for(ndim: int, spec):
    """``spec`` (from ``--axis`` and ``--group-size``) for a 2-D weight. A tensor of more dimensions (a
    convolution kernel) keeps one scale per output channel, the last axis for ``--axis 0`` (Flax's
    ``(..., in, out)``), the first for ``--axis 1`` (PyTorch's ``(out, in, ...)``): its input-channel
    axis is reduced in groups of ``--group-size``, or without one every other axis (``--axis 0`` alone
    would reduce only the kernel's first spatial axis, and the scales would outweigh the codes)."""
    if ndim == 2 or spec.axis not in (0, 1):
        return spec
    out = ndim - 1 if spec.axis == 0 else 0
    if spec.group_size is not None:
        return dataclasses.replace(spec, axis=ndim - 2 if spec.axis == 0 else 1)
    return dataclasses.replace(spec, axis=tuple(a for a in range(ndim) if a != out))


def _inspect(args) -> int:
    import json

    from quantize_jax import io

    if not os.path.exists(args.file):
        raise CommandError(f"no such file: {args.file}")
    try:
        tensors, meta_json, digest = io.read_raw(args.file)
    except io.CheckpointError as e:
        raise CommandError(str(e)) from None
    ok = io.checksum_matches(tensors, meta_json, digest)
    meta = json.loads(meta_json)
    print(f"{args.file}: quantize_jax checkpoint, format version {meta['version']}, "
          f"nibble order {meta['nibble_order']}, checksum {'OK' if ok else 'MISMATCH (altered file)'}")
    rows = []
    _walk(meta["tree"], "", tensors, rows)
    print(f"{'path':40} {'kind':7} {'shape':>16} {'format':>6} {'group':>5} {'bytes':>10}")
    for path, kind, shape, fmt, group, nbytes in rows:
        print(f"{path[:40]:40} {kind:7} {str(shape):>16} {fmt:>6} {group:>5} {nbytes:10d}")
    print(f"total: {sum(r[5] for r in rows)} bytes in {len(rows)} leaves")
    return 0 if ok else 1


def _walk(node, path, tensors, rows) -> None:
    kind = node["kind"]
    if kind == "qarray":
        refs = [node["packed"], node["scale"]] + ([node["zero_point"]] if "zero_point" in node else [])
        nbytes = sum(tensors[r["tensor"]].nbytes for r in refs)
        spec = node["spec"]
        rows.append((path, "qarray", tuple(node["shape"]), spec["format"], str(spec["group_size"] or "-"), nbytes))
    elif kind == "array":
        t = tensors[node["tensor"]]
        rows.append((path, "array", t.shape, node["dtype"], "-", t.nbytes))
    elif kind == "dict":
        for k, v in node["items"].items():
            _walk(v, f"{path}/{k}" if path else k, tensors, rows)
    elif kind in ("list", "tuple"):
        for i, v in enumerate(node["items"]):
            _walk(v, f"{path}/{i}" if path else str(i), tensors, rows)


def main(argv=None) -> int:
    parser = _Parser(prog="quantize-jax", description="4-bit quantization for JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="int4 QAT on scikit-learn digits, then packed int4 serving")
    p.add_argument("--quick", action="store_true", help="a smaller run, for tests")
    p.set_defaults(func=_demo)
    p = sub.add_parser("quantize", help="quantize the tensors of a .safetensors or .npz file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--format", default="int4", choices=sorted(FORMATS))
    p.add_argument("--group-size", type=int, default=None, help="elements per scale along --axis")
    p.add_argument("--method", default=None, choices=list(METHODS))
    p.add_argument("--axis", type=int, default=0,
                   help="the reduced axis of 2-D weights: 0 for (in, out) kernels (Flax), 1 for (out, in) weights "
                        "(PyTorch); kernels of more dimensions keep one scale per output channel (last / first axis)")
    p.add_argument("--min-size", type=int, default=4096, help="tensors with fewer elements stay float")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_quantize)
    p = sub.add_parser("inspect", help="show the tree, formats, sizes and checksum status of a checkpoint")
    p.add_argument("file")
    p.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        print(f"quantize-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
