"""The demo behind ``quantize-jax demo``: int4 QAT on scikit-learn's 8x8 digits, then packed serving.

Trains an MLP and a small CNN in float, then compares int4 post-training
rounding, int4 QAT (per channel), int4 QAT with learned scales and W4A8 QAT;
each QAT model is converted to a packed int4 serving model and checked
against it. Data: the 1,797 digits that ship inside scikit-learn (no download).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import quantize_jax as qj


def load_digits(seed: int = 0):
    """Digits scaled to [0, 1], split 75/25 with a fixed permutation."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.75 * len(x))
    tr, te = perm[:cut], perm[cut:]
    return (x[tr], y[tr]), (x[te], y[te])


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 128):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.out = nnx.Linear(32 * 4 * 4, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv1(x.reshape(x.shape[:-1] + (8, 8, 1))))
        h = nnx.relu(self.conv2(h))
        return self.out(h.reshape(h.shape[0], -1))


def train(model, data, *, epochs: int, lr: float, desc: str = "train", batch: int = 64, seed: int = 0,
          progress: bool = True, wrt=nnx.Param) -> list[float]:
    """Adam on cross-entropy over minibatches, in place, of the variables ``wrt`` selects (``nnx.LoRAParam``:
    the adapters only); a tqdm bar per run. Returns the mean loss per epoch."""
    (x, y), _ = data
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    n = len(x) // batch
    curve = []
    with tqdm(total=epochs * n, desc=desc, leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            perm = rng.permutation(len(x))
            losses = []
            for i in range(n):
                idx = perm[i * batch : (i + 1) * batch]
                losses.append(step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx])))
                bar.update()
            curve.append(float(np.mean(losses)))
            bar.set_postfix(loss=curve[-1])
    return curve


def accuracy(model, data) -> float:
    _, (x, y) = data
    return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == jnp.asarray(y)))


def weight_bytes(model) -> int:
    """Bytes of the weights (float kernels, or packed QArrays with their scales), biases excluded."""
    total = 0
    for _, m in nnx.iter_modules(model):
        kernel = getattr(m, "kernel", None)
        if isinstance(kernel, qj.nnx.QuantizedWeight):
            total += kernel.get_value().nbytes
        elif isinstance(kernel, nnx.Param):
            total += kernel[...].nbytes
    return total


def _n_weights(model) -> int:
    return sum(m.kernel.size for _, m in nnx.iter_modules(model) if isinstance(getattr(m, "kernel", None), nnx.Param))


def compare(name: str, make, data, *, epochs: int, qat_epochs: int) -> list[dict]:
    """Float training, PTQ and the QAT variants of one architecture; one row each."""
    float_model = make()
    train(float_model, data, epochs=epochs, lr=2e-3, desc=f"{name} float")
    rows = [{"net": name, "model": "float32", "acc": accuracy(float_model, data), "bytes": weight_bytes(float_model),
             "n_weights": _n_weights(float_model)}]
    ptq = qj.nnx.to_serving(qj.nnx.quantize_model(float_model))
    rows.append({"net": name, "model": "int4 round-to-nearest (PTQ)", "acc": accuracy(ptq, data),
                 "bytes": weight_bytes(ptq), "n_weights": rows[0]["n_weights"]})
    variants = {
        "int4 QAT": {},
        "int4 QAT, learned scales": {"learn_scale": True},
        "W4A8 QAT (int8 tokens)": {"act_spec": "int8"},
    }
    x_test = jnp.asarray(data[1][0])
    for label, kw in variants.items():
        qat = qj.nnx.quantize_model(float_model, **kw)
        train(qat, data, epochs=qat_epochs, lr=5e-4, desc=f"{name} {label}")
        served = qj.nnx.to_serving(qat)
        ref, out = qat(x_test), served(x_test)
        rows.append({
            "net": name, "model": label, "acc": accuracy(qat, data), "served_acc": accuracy(served, data),
            "max_rel_diff": float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))),
            "bytes": weight_bytes(served), "n_weights": rows[0]["n_weights"],
        })
    return rows


def run(quick: bool = False) -> list[dict]:
    """Train, quantize, serve both networks; print the table and return its rows.

    Every layer is int4 with one scale per output channel.
    """
    data = load_digits()
    epochs, qat_epochs = (8, 3) if quick else (30, 10)
    rows = compare("MLP", lambda: MLP(nnx.Rngs(0)), data, epochs=epochs, qat_epochs=qat_epochs)
    rows += compare("CNN", lambda: CNN(nnx.Rngs(0)), data, epochs=epochs, qat_epochs=qat_epochs)
    print(f"\nscikit-learn digits, {len(data[1][1])} test images; int4 weights, one scale per output channel")
    print(f"{'net':4} {'model':28} {'test acc':>8} {'served':>8} {'served vs QAT':>13} {'weight bytes':>12} {'bits/w':>6}")
    for r in rows:
        served = f"{r['served_acc']:8.4f}" if "served_acc" in r else f"{'':8}"
        diff = f"{r['max_rel_diff']:13.1e}" if "max_rel_diff" in r else f"{'':13}"
        bits = 8 * r["bytes"] / r["n_weights"]
        print(f"{r['net']:4} {r['model']:28} {r['acc']:8.4f} {served} {diff} {r['bytes']:12d} {bits:6.2f}")
    return rows


if __name__ == "__main__":
    run()
