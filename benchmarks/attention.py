"""A served nnx.MultiHeadAttention (its four LinearGeneral projections packed int4) against the float one.

    python benchmarks/attention.py [--features 2048] [--heads 16] [--tokens 8] [--out benchmarks/results/attention_cpu.json]

Self-attention over one sequence of ``--tokens`` tokens, one jitted call, timed in interleaved rounds:
the float model, the served model (``to_serving``: the projections through ``qeinsum`` over the packed
kernels) and the served model with ``backend="xla"`` (each projection's kernel dequantized, then Flax's
own product: bit for bit the QAT model).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

import quantize_jax as qj
from _timing import interleaved_seconds, machine, print_table, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--out", default="benchmarks/results/attention_cpu.json")
    args = ap.parse_args()
    model = nnx.MultiHeadAttention(num_heads=args.heads, in_features=args.features, decode=False, rngs=nnx.Rngs(0))
    qat = qj.nnx.quantize_model(model)
    served = {"packed (auto)": qj.nnx.to_serving(qat), "dequantized (xla)": qj.nnx.to_serving(qat, backend="xla")}
    run = nnx.jit(lambda m, x: m(x))
    rows = []
    for t in args.tokens:
        x = jax.random.normal(jax.random.key(1), (1, t, args.features))
        times = interleaved_seconds({"float32": (run, (model, x)), **{k: (run, (m, x)) for k, m in served.items()}},
                                    rounds=5, calls=5)
        for name, s in times.items():
            rows.append({"tokens": t, "model": name, "ms": round(1e3 * s, 2), "x_float32": round(s / times["float32"], 2)})
        print(rows[-3:], flush=True)
    print(f"MultiHeadAttention {args.features} features, {args.heads} heads, int4 per head and feature, on {machine()}")
    print_table(rows, ["tokens", "model", "ms", "x_float32"])
    write_json(args.out, {"machine": machine(), "features": args.features, "heads": args.heads, "rows": rows})


if __name__ == "__main__":
    main()
