"""Write and execute the notebooks in notebooks/ (their outputs are committed so readers see results).

    python tools/build_notebooks.py            # all
    python tools/build_notebooks.py 02         # the ones whose name starts with 02

Each notebook's cells are the lists below; edit them here, not in the .ipynb.
"""

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parent.parent / "notebooks"

BASICS = [
    ("md", """# int4 basics: formats, scales, rounding, packing

quantize_jax stores every value as a 4-bit **code** and one **scale** per group of values:
`x ≈ decode(code) * scale`. This notebook shows the four formats, the calibration methods, the
straight-through gradient, and what packing two codes per byte does to memory."""),
    ("code", """import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import quantize_jax as qj

for name, fmt in qj.FORMATS.items():
    print(f"{name:6}", sorted(set(np.round(fmt.levels, 3).tolist())))"""),
    ("md", """## The 16 levels of each format, scaled to the same largest magnitude

`int4` and `uint4` are uniform; `nf4` (QLoRA) puts more levels near zero, where normally distributed
weights are dense; `fp4` (e2m1) is a tiny float with levels that double in spacing."""),
    ("code", """fig, ax = plt.subplots(figsize=(8, 2.6))
for i, (name, fmt) in enumerate(qj.FORMATS.items()):
    lv = np.array(fmt.levels)
    lv = lv - 7.5 if name == "uint4" else lv   # uint4 with zero point 7.5 for the picture
    ax.scatter(lv / np.abs(lv).max(), np.full(16, i), marker="|", s=300)
ax.set_yticks(range(4), list(qj.FORMATS)); ax.set_xlabel("level / largest level"); ax.set_title("4-bit levels")
plt.tight_layout(); plt.show()"""),
    ("md", """## Calibration methods side by side

Heavy-tailed weights (a Student-t sample stands in for trained weights), int4 with groups of 128.
`mse` searches, per group, the clipping ratio that minimises the squared error."""),
    ("code", """w = jnp.asarray(np.random.default_rng(0).standard_t(4, size=(1024, 512)).astype(np.float32))

def sqnr(x, x_hat):
    return float(10 * jnp.log10(jnp.sum(x**2) / jnp.sum((x - x_hat) ** 2)))

rows = []
for fmt in ("int4", "uint4", "nf4", "fp4"):
    for method in ("absmax", "minmax", "percentile", "mse"):
        if method == "minmax" and fmt != "uint4":
            continue
        spec = qj.QuantSpec(format=fmt, axis=0, group_size=128, method=method)
        rows.append((fmt, method, sqnr(w, qj.fake_quant(w, spec))))
for fmt, method, db in rows:
    print(f"{fmt:6} {method:10} SQNR {db:6.2f} dB")"""),
    ("code", """spec_a = qj.QuantSpec(axis=0, group_size=128, method="absmax")
spec_m = qj.QuantSpec(axis=0, group_size=128, method="mse")
err_a = np.asarray(qj.fake_quant(w, spec_a) - w).ravel()
err_m = np.asarray(qj.fake_quant(w, spec_m) - w).ravel()
fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(err_a, bins=200, range=(-0.6, 0.6), alpha=0.6, label="absmax")
ax.hist(err_m, bins=200, range=(-0.6, 0.6), alpha=0.6, label="mse")
ax.set_yscale("log"); ax.set_xlabel("quantization error"); ax.legend(); ax.set_title("int4 error distribution")
plt.tight_layout(); plt.show()"""),
    ("md", """## SQNR against group size and bits per weight

Smaller groups track the data better but store more scales: the bits per weight include them
(float32 scales)."""),
    ("code", """groups = [16, 32, 64, 128, 256, 512, None]
fig, ax = plt.subplots(figsize=(7, 3.5))
for fmt in ("int4", "nf4", "fp4"):
    bits, dbs = [], []
    for g in groups:
        spec = qj.QuantSpec(format=fmt, axis=0, group_size=g, method="mse")
        q = qj.quantize(w, spec)
        bits.append(q.bits_per_value); dbs.append(sqnr(w, qj.dequantize(q)))
    ax.plot(bits, dbs, "o-", label=fmt)
ax.set_xlabel("bits per weight (codes + float32 scales)"); ax.set_ylabel("SQNR (dB)")
ax.set_title("group size 16 ... per channel, mse calibration"); ax.legend(); plt.tight_layout(); plt.show()"""),
    ("md", """## Rounding and the straight-through gradient

`fake_quant` rounds half to even in the forward pass; its gradient for `x` is 1 inside the range and 0
where the code was clipped (PyTorch's mask). A learned scale gets the LSQ gradient."""),
    ("code", """x = jnp.linspace(-1.5, 1.5, 601)
spec = qj.QuantSpec()
y = qj.fake_quant(x, spec, scale=0.125)
g = jax.vmap(jax.grad(lambda v: qj.fake_quant(v, spec, scale=0.125)))(x)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(x, y); axes[0].set_title("forward: int4, scale 0.125")
axes[1].plot(x, g); axes[1].set_title("d fake_quant / dx (straight through, clipped)")
plt.tight_layout(); plt.show()"""),
    ("md", """## Packing: two codes per byte

Even elements go to the low nibble, odd ones to the high nibble: XLA's own `jnp.int4` layout, so the
packed bytes bitcast to `jnp.int4` for free."""),
    ("code", """codes = jnp.array([[1, -2, 3, -8], [7, 0, -1, 5]], jnp.int8)
packed = qj.pack_int4(codes)
print("packed bytes:", [[hex(b) for b in row] for row in packed.tolist()])
print("unpacked:    ", qj.unpack_int4(packed).tolist())
q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=128))
print(f"float32: {w.nbytes:,} bytes; QArray: {q.nbytes:,} bytes ({w.nbytes / q.nbytes:.2f}x smaller)")
print("as jnp.int4:", q.as_int4().dtype, q.as_int4().shape)"""),
]

QAT = [
    ("md", """# Quantization-aware training with Flax NNX on digits

Train a small MLP on scikit-learn's 8x8 digits (shipped with scikit-learn, no download) in float, then
compare int4 round-to-nearest, int4 QAT and QAT with learned scales, convert to a packed int4 serving
model, and look at memory."""),
    ("code", """import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from flax import nnx
import quantize_jax as qj
from quantize_jax.demo import MLP, load_digits, accuracy, train, weight_bytes

data = load_digits()
(x_train, y_train), (x_test, y_test) = data
print(x_train.shape, x_test.shape)"""),
    ("code", """def fit(model, epochs, lr):
    return train(model, data, epochs=epochs, lr=lr, progress=False)   # Adam, minibatches of 64; loss per epoch

float_model = MLP(nnx.Rngs(0))
float_curve = fit(float_model, epochs=30, lr=2e-3)
print("float accuracy", accuracy(float_model, data))"""),
    ("code", """rtn = qj.nnx.to_serving(qj.nnx.quantize_model(float_model))
print("int4 round-to-nearest accuracy", accuracy(rtn, data))

curves, models = {}, {}
for name, kw in {"int4 QAT": {}, "int4 QAT + learned scales": {"learn_scale": True}}.items():
    models[name] = qj.nnx.quantize_model(float_model, **kw)
    curves[name] = fit(models[name], epochs=10, lr=5e-4)
    print(name, "accuracy", accuracy(models[name], data))"""),
    ("code", """fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(range(1, 31), float_curve, label="float (from scratch)")
for name, c in curves.items():
    ax.plot(range(31, 31 + len(c)), c, label=name + " (fine-tune)")
ax.set_yscale("log"); ax.set_xlabel("epoch"); ax.set_ylabel("training loss"); ax.legend()
plt.tight_layout(); plt.show()"""),
    ("md", """## Convert to serving and compare

`to_serving` replaces each `QuantLinear` by a `ServingLinear` holding a packed `QArray`; the forward pass
uses `qdot`. The outputs equal the QAT model's, and no float weight matrix is left."""),
    ("code", """qat = models["int4 QAT"]
served = qj.nnx.to_serving(qat)
ref, out = qat(jnp.asarray(x_test)), served(jnp.asarray(x_test))
print("max relative difference served vs QAT:", float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))))
print("served accuracy", accuracy(served, data), "QAT accuracy", accuracy(qat, data))
sizes = {"float32": weight_bytes(float_model), "int4 served": weight_bytes(served)}
print(sizes)
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.barh(list(sizes), list(sizes.values())); ax.set_xlabel("weight bytes"); plt.tight_layout(); plt.show()"""),
]

DEPLOY = [
    ("md", """# From trained parameters to a TPU artifact

Post-training quantization of a parameter tree with a report, `mse` and GPTQ against round-to-nearest,
a checksummed checkpoint, a GPTQ checkpoint in AutoGPTQ's layout, and `jax.export` for TPU — all on a
CPU."""),
    ("code", """import os, tempfile
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import quantize_jax as qj

key = jax.random.key(0)
params = {f"layer{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (512, 512)) / 512**0.5,
                        "bias": jnp.zeros(512)} for i in range(4)}
params["head"] = {"kernel": jax.random.normal(key, (512, 10)) / 512**0.5, "bias": jnp.zeros(10)}
qparams, report = qj.quantize_params(params, progress=False)
print(report)"""),
    ("md", "## Round to nearest, `mse` clipping, and GPTQ on a layer with correlated inputs"),
    ("code", """x = jax.random.normal(jax.random.key(1), (2048, 512)) @ jax.random.normal(jax.random.key(2), (512, 512)) / 512**0.5
w = params["layer0"]["kernel"]
out_err = lambda q: float(jnp.sum((x @ w - x @ qj.dequantize(q)) ** 2) / jnp.sum((x @ w) ** 2))
results = {
    "absmax RTN": qj.quantize(w, qj.QuantSpec(axis=0, group_size=128)),
    "mse RTN": qj.quantize(w, qj.QuantSpec(axis=0, group_size=128, method="mse")),
    "GPTQ": qj.ptq.gptq(w, x, qj.QuantSpec(axis=0, group_size=128)),
}
for name, q in results.items():
    print(f"{name:11} relative output error {out_err(q):.5f}")"""),
    ("md", "## Save, load, verify"),
    ("code", """path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
qj.save(path, qparams)
back = qj.load(path)
same = all(bool((a == b).all()) for a, b in zip(jax.tree_util.tree_leaves(qparams), jax.tree_util.tree_leaves(back)))
print("bytes on disk:", os.path.getsize(path), "| round trip bit-exact:", same)
data = bytearray(open(path, "rb").read()); data[-1] ^= 1; open(path, "wb").write(data)
try:
    qj.load(path)
except qj.CheckpointError as e:
    print("altered file refused:", e)"""),
    ("md", """## A GPTQ checkpoint in AutoGPTQ's layout

The GPTQ layer above with float16 scales, written as AutoGPTQ writes GPTQ layers (`qweight`, `qzeros`,
`scales`, `g_idx`: the layout Hugging Face transformers and vLLM load, with the `quantization_config`
entry returned for `config.json`), and read back as a QArray with the same values."""),
    ("code", """gptq_path = os.path.join(tempfile.mkdtemp(), "gptq.safetensors")
layer = qj.ptq.gptq(w, x, qj.QuantSpec(axis=0, group_size=128, scale_dtype="float16"))
print(qj.hf_checkpoints.save(gptq_path, {"layer0": layer, "layer0.bias": np.zeros(512, np.float32)}))
back = qj.hf_checkpoints.load(gptq_path, dtype=jnp.float32)
print(back["layer0"], "| same values:", bool((qj.dequantize(back["layer0"]) == qj.dequantize(layer)).all()))"""),
    ("md", "## Export the serving function for CPU and TPU"),
    ("code", """def serve(p, x):
    h = x
    for i in range(4):
        h = jax.nn.relu(qj.qdot(h, p[f"layer{i}"]["kernel"]) + p[f"layer{i}"]["bias"])
    return qj.qdot(h, p["head"]["kernel"]) + p["head"]["bias"]

x_example = jnp.ones((8, 512))
blob = qj.export.export_serving(serve, qparams, x_example, platforms=["cpu", "tpu"])
exported = jax.export.deserialize(bytearray(blob))
print("platforms:", exported.platforms, "| artifact bytes:", len(blob))
run = qj.export.load_serving(blob)
print("CPU artifact reproduces:", bool(jnp.allclose(run(qparams, x_example), jax.jit(serve)(qparams, x_example))))"""),
    ("code", """names = [r.path for r in report.leaves if r.path.endswith("kernel")]
before = [r.bytes_before for r in report.leaves if r.path.endswith("kernel")]
after = [r.bytes_after for r in report.leaves if r.path.endswith("kernel")]
pos = np.arange(len(names))
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(pos - 0.2, before, 0.4, label="float32"); ax.bar(pos + 0.2, after, 0.4, label="int4 QArray")
ax.set_xticks(pos, names, rotation=20); ax.set_ylabel("bytes"); ax.legend(); ax.set_title("bytes per layer")
plt.tight_layout(); plt.show()"""),
]

SPEED = [
    ("md", """# Speed: where int4 matmuls stand

Int4 stores a weight in 4.25 bits (group 128 with float32 scales) instead of 16 for bf16. At decode batch
sizes a matmul reads every weight byte once and does little arithmetic, so reading 3.8x fewer bytes could
make it up to 3.8x faster; at large batch the arithmetic dominates and the bytes matter less. This
notebook plots the measurements committed under `benchmarks/results/` (an H200 lent in session 14, an H100
in session 4) and times the CPU path on the machine running it."""),
    ("code", """import json, pathlib, time
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import quantize_jax as qj

RESULTS = pathlib.Path("..") / "benchmarks" / "results"
gpu = {name: json.loads((RESULTS / f"matmul_gpu_h100_s4_{name}.json").read_text())
       for name in ("run2_sweep", "run3_defaults", "run4_probes")}
print(gpu["run3_defaults"]["machine"])"""),
    ("md", """## H100 (session 4), K = N = 8192, bf16 activations, int4 group 128

Device time per product (lower is better): the GPU-busy time of the product's kernels from a profiler
trace. `native` is XLA's own `jnp.int4` dot, `dequant` the weight dequantized into XLA's GEMM, `auto`
what `qdot` picks (this package's Triton kernel up to 16 rows, `dequant` at 1024). M = 1, 4 and 16 come
from the run with the current default tiles, M = 1024 from the sweep run before it. The dashed line marks
what reading 4.25-bit weights at about 3 TB/s would take."""),
    ("code", """methods = [("bf16", "bf16 x bf16"), ("native", "native int4"), ("dequant", "dequant"),
           ("auto", "auto"), ("qwix", "Qwix int4 dot")]
fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
for ax, m in zip(axes, (1, 4, 16, 1024)):
    run = gpu["run3_defaults" if m <= 16 else "run2_sweep"]
    row = next(t for t in run["table"] if t["M"] == m)
    vals = [row[f"{k}_dev_us"] if isinstance(row.get(f"{k}_dev_us"), float) else np.nan for k, _ in methods]
    ax.bar(range(len(methods)), vals, color=["k", "C1", "C2", "C0", "C3"])
    if m <= 16:
        ax.axhline(8192 * 8192 * 4.25 / 8 / 3e12 * 1e6, ls="--", c="k", lw=1, label="int4 bytes at 3 TB/s")
    ax.set_yscale("log"); ax.set_title(f"M = {m}"); ax.set_xticks(range(len(methods)), [l for _, l in methods], rotation=35)
axes[0].set_ylabel("us per product (device)"); axes[0].legend(); plt.tight_layout(); plt.show()"""),
    ("md", """## The kernel's tiles at M = 1, and what loading alone costs

Left: each point is one tile configuration of the sweep (device time). Right: load-only probes, Pallas
kernels with no decode and no dot that only sum the packed bytes, over tile shapes, warps and pipeline
depths: the best reaches about 2 TB/s, so with this load pattern no kernel reads the weight faster
than about 17 us, while the kernel itself takes about twice that."""),
    ("code", """sweep = [e for e in gpu["run2_sweep"]["sweep"] if e["M"] == 1 and isinstance(e.get("dev_us"), float)]
# every kernel entry of this run at M = 1 is a GEMV (the default there when an entry names no gemv)
kinds = {"gemv": lambda e: not e.get("probe") and not e.get("atomic"),
         "gemv, atomic split-K": lambda e: e.get("atomic"), "load-only probe": lambda e: e.get("probe")}
bf16 = next(t for t in gpu["run2_sweep"]["table"] if t["M"] == 1)["bf16_dev_us"]
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 3.4))
for label, keep in kinds.items():
    pts = [e for e in sweep if keep(e)]
    ax.scatter([e["block_n"] for e in pts], [e["dev_us"] for e in pts], label=label, s=30)
ax.axhline(bf16, c="k", lw=1, label="bf16")
ax.set_xscale("log", base=2); ax.set_xlabel("block_n (output columns per program)"); ax.set_ylabel("us (device)")
ax.legend(fontsize=8); ax.set_title("M = 1, K = N = 8192: tiles")
probes = [p for p in gpu["run4_probes"]["probes"] if "block_n" in p and isinstance(p.get("dev_TB_per_s"), float)]
labels = [f"{p['block_n']}x{p['block_k']}/{p['split_k']} w{p['num_warps'] or '-'} s{p['num_stages'] or '-'}"
          + ("" if p["fold_rows"] else " (kernel's)") for p in probes]
bx.barh(labels, [p["dev_TB_per_s"] for p in probes]); bx.invert_yaxis(); bx.tick_params(labelsize=7)
bx.set_xlabel("TB/s of packed weight read (load only)"); bx.set_title("load probes: block_n x block_k / splits")
plt.tight_layout(); plt.show()"""),
    ("md", """## H200 (session 14): the PTX kernel, time against rows

Three runs on one H200 (K = N = 8192, bf16 activations, int4 group 128, device time per product).
`auto` is what `qdot` picks now: the kernel's PTX dot (codes decoded by inline PTX, no integer-to-float
conversions) up to 128 rows, then `dequant`. The byte kernel is the kernel `auto` took before this
session; Qwix's int4 dot and `dequant` were timed in the first run. The dotted line marks reading the
4.25-bit weight at 4.8 TB/s, the card's rated bandwidth; no Pallas load pattern measured so far read it
faster than 12.9 us (2.6 TB/s)."""),
    ("code", """h200 = {name: json.loads((RESULTS / f"matmul_gpu_h200_s14_{name}.json").read_text())
        for name in ("run1_sweep", "run1_m1024", "run2_ptx_defaults", "run3_validation")}
print(h200["run2_ptx_defaults"]["machine"])

def series(column, runs):
    # {M: device us} of one column over runs, later runs first
    out = {}
    for run in runs:
        for row in h200[run]["table"]:
            value = row.get(f"{column}_dev_us")
            if isinstance(value, float):
                out.setdefault(row["M"], value)
    return dict(sorted(out.items()))

new_runs = ("run3_validation", "run2_ptx_defaults")
lines = {"bf16 x bf16": series("bf16", new_runs), "auto (PTX dot, then dequant)": series("auto", new_runs),
         "byte kernel (auto before)": dict(sorted({**series("pallas", ("run1_sweep", "run1_m1024")),
                                                   **series("pallas_bytes", new_runs)}.items())),
         "dequant": series("dequant", new_runs + ("run1_sweep", "run1_m1024")),
         "Qwix int4 dot": series("qwix", ("run1_sweep", "run1_m1024"))}
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 3.8))
for (label, pts), style in zip(lines.items(), ("k-o", "C0-o", "C1--s", "C2:^", "C3:v")):
    ax.plot(list(pts), list(pts.values()), style, label=label)
ax.axhline(8192 * 8192 * 4.25 / 8 / 4.8e12 * 1e6, ls=":", c="gray", lw=1, label="int4 bytes at 4.8 TB/s")
ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("M (rows)"); ax.set_ylabel("us per product (device)")
ax.legend(fontsize=8); ax.set_title("K = N = 8192")
bf16 = lines["bf16 x bf16"]
auto = {m: bf16[m] / us for m, us in lines["auto (PTX dot, then dequant)"].items() if m in bf16}
bx.bar([str(m) for m in auto], list(auto.values()), color=["C0" if v >= 1 else "C3" for v in auto.values()])
bx.axhline(1, c="k", lw=1); bx.axhline(3, c="gray", ls="--", lw=1, label="the 3x goal at decode")
bx.set_xlabel("M (rows)"); bx.set_ylabel("speed-up of auto over bf16"); bx.legend(fontsize=8)
plt.tight_layout(); plt.show()
for m, v in auto.items():
    print(f"M = {m:5}: auto {lines['auto (PTX dot, then dequant)'][m]:6.1f} us, bf16 {bf16[m]:6.1f} us, {v:.2f}x")"""),
    ("md", """The PTX dot's tiles at M = 1 and 16 (both runs' sweeps): 256 output columns, 128-row K blocks and 8
splits of 1024 rows (256 programs) were best; narrower, wider or more finely split tiles, and the PTX
GEMV, were slower. The load-only probes (no decode, no dot: they only sum the packed bytes) bound what
this way of loading reaches: 12.9 us at best."""),
    ("code", """pts = [e for run in ("run1_sweep", "run2_ptx_defaults") for e in h200[run]["sweep"]
       if e["M"] in (1, 16) and isinstance(e.get("dev_us"), float)]
def kind(e):
    if e.get("probe"):
        return "load-only probe"
    return "PTX dot" if e.get("ptx") and not e.get("gemv") else "PTX GEMV" if e.get("ptx") else "byte kernel"

fig, ax = plt.subplots(figsize=(8, 3.6))
for i, label in enumerate(("PTX dot", "PTX GEMV", "byte kernel", "load-only probe")):
    for m, marker in ((1, "o"), (16, "s")):
        sel = [e for e in pts if kind(e) == label and e["M"] == m]
        if sel:
            ax.scatter([e["block_n"] * (1.06 if m == 16 else 1) for e in sel], [e["dev_us"] for e in sel], c=f"C{i}",
                       marker=marker, label=f"{label}, M = {m}", s=28)
ax.axhline(series("bf16", ("run2_ptx_defaults",))[1], c="k", lw=1, label="bf16, M = 1")
ax.set_xscale("log", base=2); ax.set_xlabel("block_n"); ax.set_ylabel("us (device)"); ax.legend(fontsize=7, ncol=2)
plt.tight_layout(); plt.show()"""),
    ("md", """## The CPU paths

`auto` on the CPU unpacks 512 rows of the weight at a time into two float32 dots (even and odd
columns), so the float weight never exists whole. W4A8 (`act_quant="int8"`) unpacks them to int8
instead and runs one int8 dot per scale group (XLA hands those to YNNPACK, fast on cache-sized
operands). First the committed run on the project's 2-core CPU VM (M = 8, K = N = 4096; time relative
to the float32 matmul, lower is better):"""),
    ("code", """cpu = json.loads((RESULTS / "matmul_cpu.json").read_text())
rows = cpu["rows"]
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.barh([r["method"] for r in rows], [r["vs_float32"] for r in rows])
ax.axvline(1, c="k", lw=1); ax.set_xscale("log"); ax.invert_yaxis()
ax.set_xlabel("time / float32 matmul time"); ax.set_title(cpu["machine"], fontsize=9)
plt.tight_layout(); plt.show()"""),
    ("md", """And the same paths timed on the machine running this notebook (median of 15, M = 8, K = N = 4096).
Int4 pays where the float32 weight does not stay in cache between calls: a 64 MB weight here; at
K = N = 2048 (16 MB, inside this VM's 32 MB L3) the float32 matmul measured 0.4-0.5 ms and every int4
path was slower than it. Live timings on a shared 2-core VM are noisy: in session 14 the per-channel `qdot`
took 2.4-3.0 ms in a plain Python process but 2.4-15 ms across four builds of this notebook, in the
Jupyter kernel."""),
    ("code", """def median_ms(f, *args, n=15):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))

k = n = 4096
w = jax.random.normal(jax.random.key(0), (k, n))
x = jax.random.normal(jax.random.key(1), (8, k))
live = {"float32 matmul": median_ms(jax.jit(jnp.matmul), x, w)}
for label, spec in {"per-channel": qj.QuantSpec(axis=0), "group 128": qj.QuantSpec(axis=0, group_size=128)}.items():
    q = qj.quantize(w, spec)
    live[f"qdot {label}"] = median_ms(jax.jit(qj.qdot), x, q)
    live[f"qdot {label} W4A8"] = median_ms(jax.jit(lambda x, q: qj.qdot(x, q, act_quant="int8")), x, q)
for name, ms in live.items():
    print(f"{name:26} {ms:7.3f} ms  ({ms / live['float32 matmul']:.2f}x float32)")
print(f"weight bytes: float32 {w.nbytes:,}, int4 QArray (group 128) {q.nbytes:,}")"""),
]

QLORA = [
    ("md", """# QLoRA with Flax NNX on digits: adapters over a packed 4-bit base

Pretrain a small MLP on scikit-learn's 8x8 digits (no download), then adapt it to a new task, the same
digits mirrored left to right, three ways: LoRA adapters over the float model, and QLoRA adapters over
the model served as packed nf4 and int4 weights (`qj.nnx.add_lora`: Flax's `nnx.LoRA` around each packed
layer; only the adapters train, the 4-bit base stays packed and frozen). Finally `qj.nnx.merge_lora`
folds the adapters back into one packed model."""),
    ("code", """import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
import quantize_jax as qj
from quantize_jax.demo import MLP, load_digits, accuracy, train, weight_bytes

digits = load_digits()
(x_train, y_train), (x_test, y_test) = digits


def mirror(x):
    return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)

mirrored = ((mirror(x_train), y_train), (mirror(x_test), y_test))     # the new task
base = MLP(nnx.Rngs(0))
train(base, digits, epochs=30, lr=2e-3, progress=False)
print(f"pretrained: digits {accuracy(base, digits):.3f}, mirrored digits {accuracy(base, mirrored):.3f}")"""),
    ("code", """def lora_over_float(model, rank, rngs):
    model = nnx.clone(model)
    for name in ("fc1", "fc2", "out"):
        layer = getattr(model, name)
        setattr(model, name, nnx.LoRA(layer.in_features, rank, layer.out_features, base_module=layer, rngs=rngs))
    return model

tuned = {"LoRA, float32 base": lora_over_float(base, 8, nnx.Rngs(1))}
for fmt in ("nf4", "int4"):
    served = qj.nnx.to_serving(qj.nnx.quantize_model(base, weight_spec=qj.QuantSpec(format=fmt, axis=0, group_size=32)))
    print(f"{fmt} base before adapting: digits {accuracy(served, digits):.3f}")
    tuned[f"QLoRA, {fmt} base"] = qj.nnx.add_lora(served, 8, rngs=nnx.Rngs(1))

curves = {name: train(m, mirrored, epochs=25, lr=3e-3, progress=False, wrt=nnx.LoRAParam) for name, m in tuned.items()}
for name, m in tuned.items():
    print(f"{name:20s} mirrored-digits accuracy {accuracy(m, mirrored):.3f}")"""),
    ("code", """fig, ax = plt.subplots(figsize=(7, 3))
for name, c in curves.items():
    ax.plot(range(1, len(c) + 1), c, label=name)
ax.set_yscale("log"); ax.set_xlabel("epoch (adapters only)"); ax.set_ylabel("training loss"); ax.legend()
plt.tight_layout(); plt.show()"""),
    ("md", """The three curves nearly coincide: adapting over a 4-bit base costs the adapters nothing on this task
(the accuracies above come from this run; they vary by a few tenths of a point with the seeds).

## What is stored, and merging

The QLoRA models keep each base weight as a packed QArray (two codes per byte plus one scale per 32 rows)
and train only the rank-8 matrices. `merge_lora` quantizes `dequantize(base) + A @ B` again with the base's
spec: one packed model to save or export, which re-rounds the adapters' contribution to the 4-bit grid."""),
    ("code", """def lora_bytes(model):
    return sum(v[...].nbytes for _, v in nnx.iter_graph(model) if isinstance(v, nnx.LoRAParam))

qlora = tuned["QLoRA, nf4 base"]
merged = qj.nnx.merge_lora(qlora)
print(f"nf4 QLoRA accuracy {accuracy(qlora, mirrored):.3f}, merged into packed nf4 {accuracy(merged, mirrored):.3f}")
sizes = {"float32 weights": weight_bytes(base), "nf4 packed weights": weight_bytes(merged),
         "adapters (rank 8, float32)": lora_bytes(qlora)}
for k, v in sizes.items():
    print(f"{k:28s} {v:8d} bytes")
fig, ax = plt.subplots(figsize=(5, 2.2))
ax.barh(list(sizes), list(sizes.values())); ax.set_xlabel("bytes"); plt.tight_layout(); plt.show()"""),
]

TINY_LM = [
    ("md", """# A tiny language model: scanned layers, int4 QAT, packed serving, a TPU artifact

A character-level causal transformer in Flax NNX, built the way larger ones are: its blocks stacked by
`nnx.vmap` and run by `nnx.scan`, tied input and output embeddings, `nnx.MultiHeadAttention`. It
trains for 200 steps on the source code of Python's own `json` package (no download), then:

1. round to nearest: `quantize_model` + `to_serving` straight away;
2. GPTQ, also without training: `to_serving_gptq` over a few batches of training text;
3. QAT: `quantize_model`, a short fine-tune with int4 fake-quantized kernels and embedding table;
4. the QAT model served with packed int4 weights (`to_serving`): each stacked weight becomes one
   `(layers, ...)` QArray that `nnx.scan` slices layer by layer;
5. the served model exported for CPU and TPU with a symbolic batch size, and run from the artifact."""),
    ("code", """import inspect, json.decoder, json.encoder
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from flax import nnx
import quantize_jax as qj

text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
chars = sorted(set(text))
ids = np.array([chars.index(c) for c in text], np.int32)
train_ids, test_ids = ids[: int(0.9 * len(ids))], ids[int(0.9 * len(ids)):]
VOCAB, SEQ, D, HEADS, LAYERS = len(chars), 64, 128, 4, 3
print(f"{len(text)} characters, {VOCAB} distinct; {len(train_ids)} to train on, {len(test_ids)} held out")


def batch(data, key, n=32):
    start = jax.random.randint(key, (n,), 0, len(data) - SEQ - 1)
    return jnp.asarray(data)[start[:, None] + jnp.arange(SEQ + 1)]"""),
    ("code", """class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 4 * D, rngs=rngs)
        self.down = nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, D)))

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)          # every block's weights stacked along a leading axis of LAYERS
        self.norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        mask = nnx.make_causal_mask(tokens)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x, mask)

        return self.embed.attend(self.norm(run(x, self.blocks)))   # tied output embedding


def loss_fn(model, seqs):
    logits = model(seqs[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()


def fit(model, steps, lr, seed):
    opt = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, seqs):
        loss, grads = nnx.value_and_grad(loss_fn)(model, seqs)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, batch(train_ids, k))) for k in jax.random.split(jax.random.key(seed), steps)]


held_out = [batch(test_ids, jax.random.key(100 + i), 64) for i in range(4)]
evaluate = nnx.jit(loss_fn)


def test_loss(model):
    return float(np.mean([evaluate(model, b) for b in held_out]))


model = TinyLM(nnx.Rngs(0))
float_curve = fit(model, 200, 3e-3, seed=1)
print(f"float32: held-out loss {test_loss(model):.4f} nats per character")"""),
    ("md", """## Round to nearest, GPTQ, then QAT

`quantize_embeddings=True` also quantizes the embedding table (one scale per row), which the tied
output layer reads too. Everything else uses the defaults: int4, one scale per output channel (per
head and feature for the attention projections), each layer of the stack on its own. GPTQ runs the
model over 8 batches of 32 training sequences; each Linear layer and attention projection of each
block records its inputs' `x^T x`, and its kernel is quantized for them (the embedding table is
rounded to nearest)."""),
    ("code", """rtn = qj.nnx.to_serving(qj.nnx.quantize_model(model, quantize_embeddings=True))
calibration = [batch(train_ids, k)[:, :-1] for k in jax.random.split(jax.random.key(7), 8)]
gptq = qj.nnx.to_serving_gptq(qj.nnx.quantize_model(model, quantize_embeddings=True), calibration, progress=False)
qat = qj.nnx.quantize_model(model, quantize_embeddings=True)
qat_curve = fit(qat, 60, 1e-3, seed=2)
longer = nnx.clone(model)                 # the fair baseline for QAT: float32 trained as many more steps
fit(longer, 60, 1e-3, seed=2)
served = qj.nnx.to_serving(qat)
losses = {"float32": test_loss(model), "int4 round to nearest": test_loss(rtn), "int4 GPTQ": test_loss(gptq),
          "float32, 60 more steps": test_loss(longer), "int4 QAT, 60 steps": test_loss(qat),
          "int4 QAT, served packed": test_loss(served)}
for name, value in losses.items():
    print(f"{name:26s} held-out loss {value:.4f}")
print()
print("query projection of all blocks:", served.blocks.attn.query.qarray)
print("embedding table:               ", served.embed.qarray)"""),
    ("md", """In this run, rounding to nearest costs 0.044 nats per character over the float32 model it came from;
GPTQ, from the same weights and a few seconds of calibration, cuts that to 0.027; after 60 steps of QAT
the int4 model sits 0.028 nats behind float32 trained for the same 60 more steps; and the served model, every weight packed, gives the QAT model's loss to the fourth decimal
(its products sum in another order). A tiny model over 28k characters is a hard case for 4 bits: every
layer is 128 wide, so each output channel's scale covers only 128 weights and there is no redundancy
to spare."""),
    ("code", """def state_bytes(m):
    leaves = jax.tree.leaves(nnx.state(m), is_leaf=lambda a: isinstance(a, qj.QArray))
    return sum(int(a.nbytes) for a in leaves)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3))
ax1.plot(float_curve, label="float32 training")
ax1.plot(range(len(float_curve), len(float_curve) + len(qat_curve)), qat_curve, label="int4 QAT fine-tune")
ax1.axhline(losses["int4 round to nearest"], color="gray", ls=":", label="int4 round to nearest (held out)")
ax1.set_yscale("log"); ax1.set_xlabel("step"); ax1.set_ylabel("loss (nats / char)"); ax1.legend(fontsize=8)
sizes = {"float32": state_bytes(model), "served int4": state_bytes(served)}
ax2.barh(list(sizes), list(sizes.values())); ax2.set_xlabel("bytes of the model's state")
plt.tight_layout(); plt.show()
print({k: v for k, v in sizes.items()}, f"{sizes['float32'] / sizes['served int4']:.1f}x smaller "
      "(LayerNorms, biases and positions stay float32)")"""),
    ("md", """## Export for CPU and TPU, and generate

`qj.export.export_nnx` exports the served model's forward pass with the packed weights as inputs; a
symbolic batch size makes one artifact serve every batch. On this CPU the artifact's CPU code runs;
the TPU code is in the same file. Generation below slides a 64-character window over the text and
samples the next character from the artifact's output each time."""),
    ("code", """tokens = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 64"), jnp.int32)
blob, params = qj.export.export_nnx(served, tokens, platforms=["cpu", "tpu"])
run = jax.jit(qj.export.load_serving(blob))
print(f"artifact: {len(blob)} bytes, platforms {jax.export.deserialize(bytearray(blob)).platforms}")
window = jnp.asarray(test_ids[:SEQ])[None]
assert bool(jnp.allclose(run(params, window), served(window), atol=1e-5))
out = list(test_ids[:SEQ])
for key in jax.random.split(jax.random.key(3), 160):   # sampled at temperature 0.7
    logits = run(params, jnp.asarray(out[-SEQ:])[None])
    out.append(int(jax.random.categorical(key, logits[0, -1] / 0.7)))
print("prompt:   ", repr("".join(chars[i] for i in out[:SEQ])))
print("generated:", repr("".join(chars[i] for i in out[SEQ:])))"""),
]

NOTEBOOKS = {"01_int4_basics.ipynb": BASICS, "02_qat_nnx_digits.ipynb": QAT, "03_params_to_tpu.ipynb": DEPLOY,
             "04_speed.ipynb": SPEED, "05_qlora_digits.ipynb": QLORA, "06_tiny_lm.ipynb": TINY_LM}


def build(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nbformat.write(nb, ROOT / name)
    print("wrote", ROOT / name)


if __name__ == "__main__":
    prefix = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, cells in NOTEBOOKS.items():
        if name.startswith(prefix):
            build(name, cells)
