"""int4 matmul speed on the CPU: quantize_jax's backends against float, XLA-native int4 and Qwix, in one process.

    python benchmarks/matmul.py                 # M = 8, K = N = 4096, float32 activations

The GPU benchmark is ``benchmarks/matmul_gpu.py``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import quantize_jax as qj
from _timing import interleaved_seconds, machine, print_table, write_json


def _qwix_dot():
    try:
        import qwix
    except ImportError:
        return None
    return lambda x, w: qwix.dot(x, qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}))


def cpu(args):
    """Two groups, each timed in interleaved rounds: the float32 matmul and the fast paths, then the slow
    references, apart (on this VM, 20-50 ms products interleaved with them slowed the float32 matmul to
    1.7x and the fast paths up to 2.6x). Every ratio is to the first group's float32 time."""
    m, k, n = args.m, args.k, args.n
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
    fast, slow = {"float32 x float32": (jax.jit(jnp.matmul), (x, w))}, {}
    for label, spec in {"per-channel": qj.QuantSpec(axis=0), "group 128": qj.QuantSpec(axis=0, group_size=128)}.items():
        q = qj.quantize(w, spec)
        for backend, act, group in (("auto", None, fast), ("auto", "int8", fast), ("xla", None, slow),
                                    ("native", None, slow)):
            name = f"qdot {label} backend={backend}" + (" W4A8" if act else "")
            group[name] = (jax.jit(lambda x, q, b=backend, a=act: qj.qdot(x, q, backend=b, act_quant=a)), (x, q))
    qwix_dot = _qwix_dot()
    if qwix_dot is not None:
        import qwix

        qw = jax.jit(lambda w: qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}))(w)
        slow["qwix int4 dot (group 128, prequantized)"] = (jax.jit(qwix.dot), (x, qw))
    seconds = interleaved_seconds(fast, rounds=args.rounds) | interleaved_seconds(slow, rounds=3)
    f32 = seconds["float32 x float32"]
    rows = [{"method": name, "ms": round(t * 1e3, 3), "vs_float32": round(t / f32, 2)} for name, t in seconds.items()]
    print(f"M={m} K={k} N={n} on {machine()}")
    print_table(rows, ["method", "ms", "vs_float32"])
    write_json(args.out, {"machine": machine(), "shape": [m, k, n], "timing": f"fast paths: median of {args.rounds} "
                          "interleaved rounds of 7 calls; references: 3 rounds, apart",
                          "rows": rows})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or "benchmarks/results/matmul_cpu.json"
    cpu(args)


if __name__ == "__main__":
    main()
