"""int4 embedding tables: token lookups and tied output logits, against the float32 table in the same run.

    python benchmarks/embedding.py [--vocab 32000] [--features 2048 4096] [--out benchmarks/results/embedding_cpu.json]

Lookups: ``qj.take`` over the packed table (one program, the decoding fused
into the gather) against ``jnp.take`` of the float32 table and the table
decoded first by a program of its own (``dequantize``, then ``jnp.take``). Logits (``query @ table.T``, as
``nnx.Embed.attend``): ``qeinsum("md,vd->mv", ..., backend="auto")`` (on the
CPU block by block over the packed rows) against ``backend="xla"`` (the table
dequantized, then one dot) and the float32 product; and each one's backward
pass (``c @ table``, the gradient QLoRA takes through tied logits). Entries
are timed in interleaved rounds (benchmarks/_timing.py).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import quantize_jax as qj
from _timing import interleaved_seconds, machine, print_table, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--features", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 64], help="query rows of the logits product")
    ap.add_argument("--tokens", type=int, default=512, help="ids per lookup")
    ap.add_argument("--out", default="benchmarks/results/embedding_cpu.json")
    args = ap.parse_args()
    specs = {"per row": qj.QuantSpec(axis=1), "row groups of 128": qj.QuantSpec(axis=1, group_size=128)}
    ids = jax.random.randint(jax.random.key(2), (args.tokens,), 0, args.vocab)
    lookup_f32 = jax.jit(lambda t, i: jnp.take(t, i, axis=0))
    lookup_q = jax.jit(qj.take)
    decode, gather = jax.jit(qj.dequantize), jax.jit(lambda t, i: jnp.take(t, i, axis=0))

    def lookup_decoded(q, i):
        return gather(decode(q), i)

    def product(b):
        return (lambda x, t: jnp.dot(x, t.T)) if b == "float32" else (
            lambda x, q: qj.qeinsum("md,vd->mv", x, q, backend=b))

    def pullback(f):  # the logits' backward pass alone: the cotangent c times the table
        return jax.jit(lambda x, t, c: jax.vjp(lambda x: f(x, t), x)[1](c)[0])

    logits = {b: jax.jit(product(b)) for b in ("float32", "auto", "xla")}
    grads = {b: pullback(product(b)) for b in ("float32", "auto", "xla")}
    rows = []
    for d in args.features:
        table = jax.random.normal(jax.random.key(0), (args.vocab, d))
        for name, spec in specs.items():
            q = qj.quantize(table, spec)
            t = interleaved_seconds({"float32": (lookup_f32, (table, ids)), "take": (lookup_q, (q, ids)),
                                     "decode_then_take": (lookup_decoded, (q, ids))})
            rows.append({"op": f"lookup {args.tokens} ids", "table": f"{args.vocab}x{d}", "spec": name,
                         "float32_ms": round(1e3 * t["float32"], 3), "int4_ms": round(1e3 * t["take"], 3),
                         "before_ms": round(1e3 * t["decode_then_take"], 3),
                         "int4_x_float32": round(t["take"] / t["float32"], 2),
                         "table_MB": f"{table.nbytes / 1e6:.0f} -> {q.nbytes / 1e6:.1f}"})
            for m in args.m:
                x = jax.random.normal(jax.random.key(1), (m, d))
                c = jax.random.normal(jax.random.key(3), (m, args.vocab))
                for op, fns, extra in (("logits", logits, ()), ("logits grad", grads, (c,))):
                    t = interleaved_seconds({b: (f, (x, table if b == "float32" else q) + extra)
                                             for b, f in fns.items()}, rounds=5, calls=5)
                    rows.append({"op": f"{op} M={m}", "table": f"{args.vocab}x{d}", "spec": name,
                                 "float32_ms": round(1e3 * t["float32"], 2), "int4_ms": round(1e3 * t["auto"], 2),
                                 "before_ms": round(1e3 * t["xla"], 2),
                                 "int4_x_float32": round(t["auto"] / t["float32"], 2),
                                 "table_MB": f"{table.nbytes / 1e6:.0f} -> {q.nbytes / 1e6:.1f}"})
                    print(rows[-1], flush=True)
    print(f"on {machine()}; int4: take / qeinsum auto; before: decode the table first (take of dequantize / xla)")
    print_table(rows, ["op", "table", "spec", "float32_ms", "int4_ms", "before_ms", "int4_x_float32", "table_MB"])
    write_json(args.out, {"machine": machine(), "vocab": args.vocab, "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
