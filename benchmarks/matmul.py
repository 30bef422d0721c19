"""int4 matmul speed: quantize_jax's backends against float, XLA-native int4 and Qwix, in one process.

    python benchmarks/matmul.py                 # CPU: M = 8, K = N = 4096, float32 activations
    python benchmarks/matmul.py --gpu           # GPU: bf16, K = N = 8192, M in 1, 16, 1024, rotating weights

On GPU each call is timed inside one jit over several rotating weights (a
weight would otherwise sit in L2), so the number is device time per product,
not host dispatch.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import quantize_jax as qj
from _timing import machine, median_seconds, print_table, write_json


def _qwix_dot():
    try:
        import qwix
    except ImportError:
        return None
    return lambda x, w: qwix.dot(x, qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}))


def cpu(args):
    m, k, n = args.m, args.k, args.n
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
    rows = []
    f32 = median_seconds(jax.jit(jnp.matmul), x, w)
    rows.append({"method": "float32 x float32", "ms": f32})
    for label, spec in {"per-channel": qj.QuantSpec(axis=0), "group 128": qj.QuantSpec(axis=0, group_size=128)}.items():
        q = qj.quantize(w, spec)
        for backend, act in (("auto", None), ("xla", None), ("native", None), ("auto", "int8")):
            name = f"qdot {label} backend={backend}" + (" W4A8" if act else "")
            f = jax.jit(lambda x, q, b=backend, a=act: qj.qdot(x, q, backend=b, act_quant=a))
            rows.append({"method": name, "ms": median_seconds(f, x, q)})
    qwix_dot = _qwix_dot()
    if qwix_dot is not None:
        import qwix

        qw = jax.jit(lambda w: qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}))(w)
        rows.append({"method": "qwix int4 dot (group 128, prequantized)",
                     "ms": median_seconds(jax.jit(qwix.dot), x, qw)})
    for r in rows:
        r["vs_float32"] = round(r["ms"] / f32, 2)
        r["ms"] = round(r["ms"] * 1e3, 3)
    print(f"M={m} K={k} N={n} on {machine()}")
    print_table(rows, ["method", "ms", "vs_float32"])
    write_json(args.out, {"machine": machine(), "shape": [m, k, n], "rows": rows})


def gpu(args):
    k = n = args.gpu_kn
    n_weights = 4
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.float32) for i in range(n_weights)]
    spec = qj.QuantSpec(axis=0, group_size=128)
    qs = [qj.quantize(w, spec) for w in ws]
    wbf = [w.astype(jnp.bfloat16) for w in ws]
    rows = []

    def timed(fn, weights, x, reps=8):
        def body(x, weights):
            out = 0.0
            for _ in range(reps):
                for w in weights:
                    out = out + fn(x, w)[0, 0].astype(jnp.float32)
            return out

        t = median_seconds(jax.jit(body), x, weights, repeats=5)
        return t / (reps * len(weights)) * 1e6

    for m in args.gpu_m:
        x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
        base = timed(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), wbf, x)
        row = {"M": m, "bf16_us": round(base, 1)}
        for backend in ("native", "pallas", "auto"):
            try:
                t = timed(lambda x, q, b=backend: qj.qdot(x, q, backend=b), qs, x)
                row[f"{backend}_us"] = round(t, 1)
            except Exception as e:  # a backend that fails on this device is reported, not hidden
                row[f"{backend}_us"] = f"error: {type(e).__name__}"
        rows.append(row)
    print(f"K=N={k}, bf16 activations, group 128, on {machine()}")
    print_table(rows, list(rows[0]))
    write_json(args.out, {"machine": machine(), "k": k, "n": n, "rows": rows})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpu-kn", type=int, default=8192)
    ap.add_argument("--gpu-m", type=int, nargs="+", default=[1, 16, 1024])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or f"benchmarks/results/matmul_{'gpu' if args.gpu else 'cpu'}.json"
    (gpu if args.gpu else cpu)(args)


if __name__ == "__main__":
    main()
