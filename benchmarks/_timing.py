"""Shared timing helpers for the benchmark scripts: warm up, block, median of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time

import jax
import numpy as np


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


def interleaved_rounds(fns: dict, rounds: int = 9, calls: int = 7, warmup: int = 3,
                       probe: bool = True) -> tuple[dict, list]:
    """``({name: [median seconds per call, one per round]}, [cross_core_ms() at each round's start, or None
    without probe])`` for ``{name: (fn, args)}``: each round times ``calls`` calls of every entry in turn
    and keeps their median. On a shared machine whose speed drifts, the drift hits every entry of a round
    alike, so their ratios hold better than with each entry timed in one block."""
    for fn, args in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    per_round, probes = {name: [] for name in fns}, []
    for _ in range(rounds):
        probes.append(cross_core_ms() if probe else None)
        for name, (fn, args) in fns.items():
            per_round[name].append(median_seconds(fn, *args, repeats=calls, warmup=0))
    return per_round, probes


def interleaved_seconds(fns: dict, rounds: int = 9, calls: int = 7, warmup: int = 3) -> dict:
    """``{name: median seconds per call}`` over :func:`interleaved_rounds`."""
    per_round, _ = interleaved_rounds(fns, rounds, calls, warmup, probe=False)
    return {name: statistics.median(ts) for name, ts in per_round.items()}


def cross_core_ms(nbytes: int = 4 << 20, trips: int = 10) -> tuple[float, float] | None:
    """Milliseconds per trip to write ``nbytes`` on one CPU and read them on another (two threads pinned
    to the first two CPUs this process may use), and to write and read them on one; ``None`` with fewer
    than two CPUs.

    On the project's 2-core VM the two take about 0.35 and 0.24 ms, but for seconds at a time the first
    takes about 1.8 ms: then the CPU paths that decode a chunk on one core for a dot that reads it on the
    other run about 5x slower, while a float32 matmul, whose cores read only their own rows, does not
    change (benchmarks/RESULTS.md). Timing scripts record it to tell such rounds apart.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None
    data = np.ones(nbytes // 4, np.float32)  # (its pages touched before timing)
    written, read, elapsed = threading.Event(), threading.Event(), []

    def reader():
        os.sched_setaffinity(0, {cpus[1]})  # 0: the calling thread
        for _ in range(trips):
            written.wait()
            written.clear()
            data.sum()
            read.set()

    def writer():
        os.sched_setaffinity(0, {cpus[0]})
        start = time.perf_counter()
        for i in range(trips):
            data.fill(i)
            written.set()
            read.wait()
            read.clear()
        elapsed.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(trips):
            data.fill(i)
            data.sum()
        elapsed.append(time.perf_counter() - start)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return elapsed[0] / trips * 1e3, elapsed[1] / trips * 1e3


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
