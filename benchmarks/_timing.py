"""Shared timing helpers for the benchmark scripts: warm up, block, median of repeats."""

from __future__ import annotations

import json
import platform
import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int = 21, warmup: int = 3) -> float:
    """Median wall time of ``fn(*args)`` with its outputs blocked on, after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_seconds(fns: dict, rounds: int = 9, calls: int = 7, warmup: int = 3) -> dict:
    """``{name: median seconds per call}`` for ``{name: (fn, args)}``, timed in interleaved rounds.

    Each round times ``calls`` calls of every entry in turn and keeps their median; the result is the median
    over rounds. On a shared machine whose speed drifts, the drift hits every entry alike, so their ratios
    hold better than with each entry timed in one block.
    """
    for fn, args in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            per_round[name].append(median_seconds(fn, *args, repeats=calls, warmup=0))
    return {name: statistics.median(ts) for name, ts in per_round.items()}


def machine() -> str:
    """The device and host this run measured on."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    import os

    return f"{dev.platform}:{kind}, {os.cpu_count()} host cores, {platform.processor() or platform.machine()}, jax {jax.__version__}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def write_json(path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")
