"""A served nnx.Conv (its kernel packed int4, dequantized inside each call) against the float one.

    python benchmarks/conv.py [--out benchmarks/results/conv_cpu.json]

3x3 convolutions of ResNet-like sizes, one jitted call each, timed in interleaved rounds: the float
layer and the served layer (``to_serving``; ``ServingConv`` decodes the packed kernel in every call and
runs Flax's convolution over it, so its time over the float layer's is what the decoding costs).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

import quantize_jax as qj
from _timing import interleaved_seconds, machine, print_table, write_json

# (batch, height = width, channels in = out)
SHAPES = [(1, 56, 64), (1, 28, 128), (1, 14, 256), (1, 7, 512), (8, 28, 128), (8, 7, 512)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/conv_cpu.json")
    args = ap.parse_args()
    run = nnx.jit(lambda m, x: m(x))
    rows = []
    for batch, size, channels in SHAPES:
        conv = nnx.Conv(channels, channels, (3, 3), rngs=nnx.Rngs(0))
        served = qj.nnx.to_serving(qj.nnx.quantize_model(conv))  # int4, one scale per output channel
        x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
        times = interleaved_seconds({"float32": (run, (conv, x)), "served int4": (run, (served, x))},
                                    rounds=5, calls=5)
        rows.append({"batch": batch, "size": size, "channels": channels,
                     "float32 ms": round(1e3 * times["float32"], 3), "served ms": round(1e3 * times["served int4"], 3),
                     "x_float32": round(times["served int4"] / times["float32"], 2),
                     "kernel bytes float32 / int4": f"{conv.kernel[...].nbytes} / {served.qarray.nbytes}"})
        print(rows[-1], flush=True)
    print(f"3x3 nnx.Conv, float32 against served int4 (per output channel), on {machine()}")
    print_table(rows, ["batch", "size", "channels", "float32 ms", "served ms", "x_float32", "kernel bytes float32 / int4"])
    write_json(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
