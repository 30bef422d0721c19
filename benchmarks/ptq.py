"""quantize_params over a ~100M-parameter float32 tree: throughput and peak memory; GPTQ vs round-to-nearest.

    python benchmarks/ptq.py [--layers 12] [--method mse]

Peak memory is the process's maximum resident set size (ru_maxrss) above
what it held just before quantizing (the input tree already in memory).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp

import quantize_jax as qj
from _timing import machine, write_json


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--method", default="mse")
    ap.add_argument("--out", default="benchmarks/results/ptq_cpu.json")
    args = ap.parse_args()
    d = args.d
    params = {f"block{i}": {"up": {"kernel": jax.random.normal(jax.random.key(2 * i), (d, 4 * d))},
                            "down": {"kernel": jax.random.normal(jax.random.key(2 * i + 1), (4 * d, d))},
                            "norm": {"scale": jnp.ones(d)}}
              for i in range(args.layers)}
    jax.block_until_ready(params)
    n = sum(a.size for a in jax.tree_util.tree_leaves(params))
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    spec = qj.QuantSpec(axis=0, group_size=128, method=args.method)
    rules = [("kernel", spec)]
    warm = {"up": params["block0"]["up"]["kernel"], "down": params["block0"]["down"]["kernel"]}
    qj.quantize_params(warm, rules=[(".*", spec)], progress=False)  # compile for both shapes
    base = _rss_mb()
    t0 = time.perf_counter()
    q, report = qj.quantize_params(params, rules, progress=False)
    jax.block_until_ready(q)
    seconds = time.perf_counter() - t0
    peak = _rss_mb() - base
    result = {
        "machine": machine(), "parameters": n, "input_MB": nbytes / 1e6, "output_MB": report.bytes_after / 1e6,
        "seconds": seconds, "GBps": nbytes / 1e9 / seconds, "peak_extra_MB": peak,
        "peak_extra_vs_input": peak * 1024 * 1024 / nbytes, "method": args.method,
        "bits_per_weight_fp32_scales": 8 * report.bytes_after / n,
    }
    bf16 = qj.quantize(params["block0"]["up"]["kernel"], qj.QuantSpec(axis=0, group_size=128, scale_dtype="bfloat16"))
    result["bits_per_weight_bf16_scales_2d"] = bf16.bits_per_value
    # GPTQ vs round to nearest: d x d layers with correlated inputs (2048 calibration rows).
    for size in (d, 4 * d):
        x = jax.random.normal(jax.random.key(7), (2048, size)) @ jax.random.normal(jax.random.key(8), (size, size))
        w = jax.random.normal(jax.random.key(9), (size, size))
        for fmt in ("int4", "nf4"):
            s = qj.QuantSpec(format=fmt, axis=0, group_size=128)
            err = lambda qa: float(jnp.sum((x @ w - x @ qj.dequantize(qa)) ** 2))  # noqa: E731
            jax.block_until_ready(qj.ptq.gptq(w[:256, :256], x[:, :256], s))  # compile the small case away
            t0 = time.perf_counter()
            g = jax.block_until_ready(qj.ptq.gptq(w, x, s))
            result[f"gptq_{fmt}_{size}x{size}_seconds"] = time.perf_counter() - t0
            result[f"gptq_{fmt}_{size}x{size}_output_error_vs_rtn"] = err(g) / err(qj.quantize(w, s))
    for k, v in result.items():
        print(f"{k:36} {v:.4g}" if isinstance(v, float) else f"{k:36} {v}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
