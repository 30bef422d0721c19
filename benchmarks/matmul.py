"""int4 matmul speed on the CPU: quantize_jax's backends against float, XLA-native int4 and Qwix, in one process.

    python benchmarks/matmul.py      # M = 8, K = N = 4096, float32 activations; then 4096x14336, 14336x4096

The GPU benchmark is ``benchmarks/matmul_gpu.py``.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

import quantize_jax as qj
from _timing import interleaved_rounds, interleaved_seconds, machine, print_table, write_json


# Cross-core over same-core transfer time above which a round counts as slow (measured: about 1.5 in
# normal rounds, 7-8 in the slow episodes).
SLOW_TRANSFER = 3.0
SPECS = {"per-channel": qj.QuantSpec(axis=0), "group 128": qj.QuantSpec(axis=0, group_size=128)}


def _qdot(backend, act_quant):
    return jax.jit(lambda x, q: qj.qdot(x, q, backend=backend, act_quant=act_quant))


def split_rounds(per_round: dict, probes: list) -> tuple[dict, dict, list]:
    """Medians over the "normal" rounds and over the "slow" ones, whose cross-core probe took over
    ``SLOW_TRANSFER`` times the same bytes on one core (this VM's episodes of slow transfers between its
    cores, in which the chunked paths run about 5x slower and the float32 matmul does not), and each
    round's probe and verdict."""
    slow = [p is not None and p[0] > SLOW_TRANSFER * p[1] for p in probes]

    def medians(keep):
        return {name: statistics.median(t for t, s in zip(ts, slow) if s == keep)
                for name, ts in per_round.items()} if keep in slow else {}

    rounds = [{"cross_core_ms": None if p is None else [round(v, 3) for v in p], "slow": s}
              for p, s in zip(probes, slow)]
    return medians(False), medians(True), rounds


def fast_paths(m, k, n, rounds):
    """The float32 matmul and ``auto`` (exact and W4A8) at ``(m, k) @ (k, n)``, interleaved: name -> seconds
    over the normal rounds, over the slow ones, and the rounds' cross-core probes (:func:`split_rounds`)."""
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
    fns = {"float32 x float32": (jax.jit(jnp.matmul), (x, w))}
    for label, spec in SPECS.items():
        q = qj.quantize(w, spec)
        fns[f"qdot {label} backend=auto"] = (_qdot("auto", None), (x, q))
        fns[f"qdot {label} backend=auto W4A8"] = (_qdot("auto", "int8"), (x, q))
    return split_rounds(*interleaved_rounds(fns, rounds=rounds)), (x, w)


def cpu(args):
    """The fast paths and the float32 matmul timed in interleaved rounds (the rounds of slow transfers
    between the cores apart, :func:`split_rounds`), then the slow references apart (on this VM, 20-50 ms
    products interleaved with them slowed the float32 matmul to 1.7x and the fast paths up to 2.6x); every
    ratio is to the float32 time of its shape. Then the Llama-like shapes, fast paths only."""
    m, k, n = args.m, args.k, args.n
    timed, (x, w) = fast_paths(m, k, n, args.rounds)
    reference_fns = {}
    for label, spec in SPECS.items():
        q = qj.quantize(w, spec)
        for backend in ("xla", "native"):
            reference_fns[f"qdot {label} backend={backend}"] = (_qdot(backend, None), (x, q))
    try:
        import qwix  # the optional "benchmark" extra
    except ImportError:
        qwix = None
    if qwix is not None:
        qw = jax.jit(lambda w: qwix.quantize(w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}))(w)
        reference_fns["qwix int4 dot (group 128, prequantized)"] = (jax.jit(qwix.dot), (x, qw))
    references = interleaved_seconds(reference_fns, rounds=3)

    def rows(seconds):
        f32 = seconds.get("float32 x float32")
        return [{"method": name, "ms": round(t * 1e3, 3), "vs_float32": round(t / f32, 2) if f32 else None}
                for name, t in seconds.items()]

    def report(title, timed, references=None) -> dict:
        """Prints and returns the normal rounds' rows (with ``references``), the slow rounds' and every
        round's probe."""
        normal, slow_rounds, rounds = timed
        part = {"rows": rows(normal | (references or {})), "slow_rounds": rows(slow_rounds), "rounds": rounds}
        print(f"\n{title}: cross-core probe per round (ms) {[r['cross_core_ms'] for r in rounds]}")
        print_table(part["rows"], ["method", "ms", "vs_float32"])
        if slow_rounds:
            print(f"{sum(r['slow'] for r in rounds)} slow round(s), apart:")
            print_table(part["slow_rounds"], ["method", "ms", "vs_float32"])
        return part

    result = {"machine": machine(), "shape": [m, k, n], "timing": f"fast paths: median of the normal rounds of "
              f"{args.rounds} interleaved rounds of 7 calls (slow rounds: cross-core probe over "
              f"{SLOW_TRANSFER}x the same-core one, apart); references: 3 rounds, apart", "llama": {}}
    result |= report(f"M={m} K={k} N={n} on {machine()}", timed, references)
    for lk, ln in () if args.no_llama else ((4096, 14336), (14336, 4096)):
        result["llama"][f"{m}x{lk}x{ln}"] = report(f"M={m} K={lk} N={ln}", fast_paths(m, lk, ln, args.rounds)[0])
    write_json(args.out, result)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    ap.add_argument("--no-llama", action="store_true", help="skip the Llama-like shapes (4096x14336, 14336x4096)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or "benchmarks/results/matmul_cpu.json"
    cpu(args)


if __name__ == "__main__":
    main()
