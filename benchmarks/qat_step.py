"""Time of one QAT training step against the same float step and Qwix's QtProvider QAT, in one run.

    python benchmarks/qat_step.py [--hidden 1024] [--batch 256]

An MLP (784 -> hidden -> hidden -> 10) trained with Adam; each step is a
jitted nnx.jit update; median of repeats after warm-up. Also LoRA steps
(rank 16 adapters on every layer, only they trained): over the float layers,
and QLoRA over packed nf4 layers (``qj.nnx.add_lora``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import quantize_jax as qj
from _timing import machine, median_seconds, print_table, write_json


class MLP(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(784, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def step_time(model, x, y, wrt=nnx.Param) -> float:
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=wrt)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean(),
            argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return loss

    return median_seconds(lambda: step(model, opt, x, y), repeats=11, warmup=3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/qat_step_cpu.json")
    args = ap.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.batch, 784))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
    rows = []
    base = step_time(MLP(args.hidden, nnx.Rngs(0)), x, y)
    rows.append({"step": "float32", "ms": base})
    for name, kw in {"quantize_jax int4 QAT (per channel)": {},
                     "quantize_jax int4 QAT, group 128": {"weight_spec": qj.QuantSpec(axis=0, group_size=128)},
                     "quantize_jax int4 QAT, learned scales": {"learn_scale": True},
                     "quantize_jax W4A8 QAT": {"act_spec": "int8"}}.items():
        rows.append({"step": name, "ms": step_time(qj.nnx.quantize_model(MLP(args.hidden, nnx.Rngs(0)), **kw), x, y)})
    float_lora = MLP(args.hidden, nnx.Rngs(0))
    for name in ("fc1", "fc2", "out"):
        layer = getattr(float_lora, name)
        setattr(float_lora, name, nnx.LoRA(layer.in_features, 16, layer.out_features, base_module=layer,
                                           rngs=nnx.Rngs(1)))
    rows.append({"step": "LoRA rank 16 over float32 layers", "ms": step_time(float_lora, x, y, nnx.LoRAParam)})
    nf4 = qj.QuantSpec(format="nf4", axis=0, group_size=64)
    qlora = qj.nnx.add_lora(qj.nnx.to_serving(qj.nnx.quantize_model(MLP(args.hidden, nnx.Rngs(0)), weight_spec=nf4)),
                            16, rngs=nnx.Rngs(1))
    rows.append({"step": "QLoRA rank 16 over packed nf4 (group 64)", "ms": step_time(qlora, x, y, nnx.LoRAParam)})
    try:
        import qwix
    except ImportError:
        qwix = None
    if qwix is not None:
        for name, rule in {"qwix QtProvider int4 weights": qwix.QtRule(module_path=".*", weight_qtype=jnp.int4),
                           "qwix QtProvider int4 W / int8 A": qwix.QtRule(module_path=".*", weight_qtype=jnp.int4,
                                                                        act_qtype=jnp.int8)}.items():
            model = qwix.quantize_model(MLP(args.hidden, nnx.Rngs(0)), qwix.QtProvider([rule]), x)
            rows.append({"step": name, "ms": step_time(model, x, y)})
    for r in rows:
        r["vs_float"] = round(r["ms"] / base, 2)
        r["ms"] = round(r["ms"] * 1e3, 2)
    print(f"MLP 784-{args.hidden}-{args.hidden}-10, batch {args.batch}, Adam, on {machine()}")
    print_table(rows, ["step", "ms", "vs_float"])
    write_json(args.out, {"machine": machine(), "hidden": args.hidden, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
