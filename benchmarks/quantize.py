"""Quantize (+pack) and unpack+dequantize throughput, against Qwix in the same run.

    python benchmarks/quantize.py [--out benchmarks/results/quantize_cpu.json]

Throughput is float32 bytes per second of the 4096x4096 weight: read by
quantize, written by dequantize. Qwix (``pip install .[bench]``) is measured
if installed.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import quantize_jax as qj
from _timing import machine, median_seconds, print_table, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/quantize_cpu.json")
    args = ap.parse_args()
    n = args.size
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    gb = w.nbytes / 1e9
    configs = {"per-channel": qj.QuantSpec(axis=0), "group 128": qj.QuantSpec(axis=0, group_size=128)}
    rows = []
    for name, spec in configs.items():
        quant = jax.jit(functools.partial(qj.quantize, spec=spec))
        deq = jax.jit(qj.dequantize)
        q = quant(w)
        tq, td = median_seconds(quant, w), median_seconds(deq, q)
        rows.append({"library": "quantize_jax", "config": name, "quantize_GBps": round(gb / tq, 2),
                     "dequantize_GBps": round(gb / td, 2), "bits_per_weight": round(q.bits_per_value, 3)})
    try:
        import qwix
    except ImportError:
        qwix = None
    if qwix is not None:
        for name, tiles in {"per-channel": None, "group 128": {0: 128}}.items():
            quant = jax.jit(lambda w, tiles=tiles: qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes=tiles))
            deq = jax.jit(qwix.dequantize)
            q = quant(w)
            tq, td = median_seconds(quant, w), median_seconds(deq, q)
            stored = sum(a.nbytes for a in jax.tree_util.tree_leaves(q))
            rows.append({"library": f"qwix {qwix.__version__ if hasattr(qwix, '__version__') else ''}".strip(),
                         "config": name, "quantize_GBps": round(gb / tq, 2), "dequantize_GBps": round(gb / td, 2),
                         "bits_per_weight": round(8 * stored / w.size, 3)})
    print(f"{n}x{n} float32 weight on {machine()}")
    print_table(rows, ["library", "config", "quantize_GBps", "dequantize_GBps", "bits_per_weight"])
    write_json(args.out, {"machine": machine(), "shape": [n, n], "rows": rows})


if __name__ == "__main__":
    main()
