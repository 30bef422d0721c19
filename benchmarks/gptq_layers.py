"""GPTQ for convolutions and expert einsums: digits CNNs and a mixture of experts' layers served int4
by rounding or by GPTQ.

    python benchmarks/gptq_layers.py [--epochs 30] [--batches 4]

Trains two float CNNs on scikit-learn's digits (the CNN of ``quantize-jax
demo``: two convolutions and a Linear head; and a MobileNet-style one with
a depthwise convolution), then serves each int4 without QAT: rounded to nearest
(``to_serving``), GPTQ for the Linear head alone (what ``to_serving_gptq``
covered before it took convolutions), and GPTQ for every layer, in one pass
and layer by layer (``sequential=True``); calibrated on training images.
Reports held-out accuracy, the mean squared error of the logits against
the float model's, and each layer's output error on the held-out images
relative to rounding's (layer by layer, on the float model's inputs). Then
the expert layers of a mixture of experts (``"ECD,EDF->ECF"`` and back, 8
experts, each with tokens correlated its own way) served by rounding and by
GPTQ, each expert walked on its own tokens: output error against float.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

import quantize_jax as qj
from _timing import machine, write_json
from quantize_jax import demo


def _cnn_inputs(model, x):
    """The float demo CNN's inputs to each layer, as its forward pass computes them."""
    images = x.reshape(x.shape[:-1] + (8, 8, 1))
    h1 = nnx.relu(model.conv1(images))
    h2 = nnx.relu(model.conv2(h1))
    return {"conv1": images, "conv2": h1, "out": h2.reshape(h2.shape[0], -1)}


class Separable(nnx.Module):
    """A MobileNet-style digits CNN: a 3x3 convolution, a depthwise 3x3 with stride 2 (one group per
    channel), a pointwise 1x1, global average pooling and a Linear head."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.depthwise = nnx.Conv(32, 32, (3, 3), strides=(2, 2), feature_group_count=32, rngs=rngs)
        self.pointwise = nnx.Conv(32, 64, (1, 1), rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def layer_inputs(self, x):
        images = x.reshape(x.shape[:-1] + (8, 8, 1))
        h1 = nnx.relu(self.stem(images))
        h2 = nnx.relu(self.depthwise(h1))
        return {"stem": images, "depthwise": h1, "pointwise": h2,
                "out": nnx.relu(self.pointwise(h2)).mean(axis=(1, 2))}

    def __call__(self, x):
        return self.out(self.layer_inputs(x)["out"])


NETWORKS = {"demo CNN": (demo.CNN, _cnn_inputs), "separable CNN": (Separable, Separable.layer_inputs)}


def _layer_error(served, model, layer: str, x) -> float:
    """Mean squared difference of one layer's outputs, served against float, on the same inputs."""
    return float(jnp.mean((getattr(served, layer)(x) - getattr(model, layer)(x)) ** 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of 128 training images")
    ap.add_argument("--out", default="benchmarks/results/gptq_layers_cpu.json")
    args = ap.parse_args()
    data = demo.load_digits()
    (x_train, _), (x_test, _) = data
    calibration = [jnp.asarray(x_train[i * 128:(i + 1) * 128]) for i in range(args.batches)]
    x_test = jnp.asarray(x_test)
    result = {"machine": machine(), "epochs": args.epochs, "calibration_images": 128 * args.batches,
              "test_images": len(x_test)}
    for net, (make, layer_inputs) in NETWORKS.items():
        model = make(nnx.Rngs(0))
        demo.train(model, data, epochs=args.epochs, lr=2e-3, desc=f"float {net}")
        reference, inputs = model(x_test), layer_inputs(model, x_test)
        result[f"{net}, float32 accuracy"] = demo.accuracy(model, data)
        print(f"\n{net}, float32: held-out accuracy {result[f'{net}, float32 accuracy']:.4f}")
        print(f"{'spec':18} {'serving':24} {'accuracy':>8} {'logit MSE':>10} {'seconds':>7}   layer error / rounding's")
        for fmt in ("int4", "nf4", "uint4"):
            label = f"{fmt} per channel"  # one scale per output channel: every kernel axis but the last reduced
            qat = qj.nnx.quantize_model(model, {"^out$": qj.QuantSpec(format=fmt, axis=0),
                                                ".*": qj.QuantSpec(format=fmt, axis=(0, 1, 2))})
            rounded = qj.nnx.to_serving(qat)
            servings = {"round to nearest": lambda: qj.nnx.to_serving(qat),
                        "GPTQ, Linear head only": lambda: qj.nnx.to_serving_gptq(qat, calibration, where="^out$",
                                                                                    progress=False),
                        "GPTQ, all layers": lambda: qj.nnx.to_serving_gptq(qat, calibration, progress=False),
                        "GPTQ, all, sequential": lambda: qj.nnx.to_serving_gptq(qat, calibration, sequential=True,
                                                                                progress=False)}
            for name, make_served in servings.items():
                t0 = time.perf_counter()
                served = make_served()
                seconds = time.perf_counter() - t0
                mse = float(jnp.mean((served(x_test) - reference) ** 2))
                ratios = {layer: _layer_error(served, model, layer, x) / _layer_error(rounded, model, layer, x)
                          for layer, x in inputs.items()}
                row = {"accuracy": demo.accuracy(served, data), "logit_mse": mse, "seconds": seconds,
                       "layer_error_vs_rounding": ratios}
                result[f"{net}, {label}, {name}"] = row
                shown = "  ".join(f"{k} {v:.2f}" for k, v in ratios.items())
                print(f"{label:18} {name:24} {row['accuracy']:8.4f} {mse:10.4g} {seconds:7.2f}   {shown}")
    result["experts"] = _experts(args.batches)
    write_json(args.out, result)


class Experts(nnx.Module):
    """The expert layers of a mixture of experts over dispatched tokens (E, C, D): up, ReLU, down."""

    def __init__(self, rngs: nnx.Rngs, experts: int = 8, d: int = 256, f: int = 512):
        self.up = nnx.Einsum("ECD,EDF->ECF", (experts, d, f), rngs=rngs)
        self.down = nnx.Einsum("ECF,EFD->ECD", (experts, f, d), rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _experts(n_batches: int) -> dict:
    """Rounding against GPTQ for the expert layers, on held-out tokens: relative output error."""
    model = Experts(nnx.Rngs(0))
    mixes = jax.random.normal(jax.random.key(1), (8, 256, 256)) / 16  # each expert's tokens correlated its own way
    tokens = lambda key: jnp.einsum("ecd,edk->eck", jax.random.normal(key, (8, 256, 256)), mixes)  # noqa: E731
    calibration = [tokens(jax.random.key(10 + i)) for i in range(n_batches)]
    test = tokens(jax.random.key(99))
    reference = model(test)
    error = lambda m: float(jnp.sum((m(test) - reference) ** 2) / jnp.sum(reference ** 2))  # noqa: E731
    out = {}
    print(f"\nexperts (8 x 256 -> 512 -> 256, {256 * n_batches} calibration tokens per expert): relative output error")
    for label, spec in (("int4 per expert and output", qj.QuantSpec(axis=1)),
                        ("int4, groups of 64", qj.QuantSpec(axis=1, group_size=64))):
        qat = qj.nnx.quantize_model(model, weight_spec=spec)
        t0 = time.perf_counter()
        gptq = qj.nnx.to_serving_gptq(qat, calibration, progress=False)
        seconds = time.perf_counter() - t0
        row = {"round_to_nearest": error(qj.nnx.to_serving(qat)), "gptq": error(gptq), "gptq_seconds": seconds}
        out[label] = row
        print(f"{label:28} rounding {row['round_to_nearest']:.4g}  GPTQ {row['gptq']:.4g} "
              f"({row['gptq'] / row['round_to_nearest']:.2f}x, {seconds:.1f} s)")
    return out


if __name__ == "__main__":
    main()
