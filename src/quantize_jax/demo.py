"""The demo behind ``quantize-jax demo``: the four formats on a real weight-like matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import quantize_jax as qj


def _sqnr_db(x, x_hat) -> float:
    return float(10 * jnp.log10(jnp.sum(x**2) / jnp.sum((x - x_hat) ** 2)))


def run(quick: bool = False) -> list[dict]:
    """Quantize a heavy-tailed 1024x1024 matrix with each format and method; print a table."""
    n = 256 if quick else 1024
    w = jnp.asarray(np.random.default_rng(0).standard_t(4, size=(n, n)).astype(np.float32))
    rows = []
    for fmt in ("int4", "uint4", "nf4", "fp4"):
        for method in ("absmax" if fmt != "uint4" else "minmax", "mse"):
            spec = qj.QuantSpec(format=fmt, axis=0, group_size=128, method=method)
            q = jax.jit(qj.quantize, static_argnums=1)(w, spec)
            rows.append({"format": fmt, "method": method, "sqnr_db": _sqnr_db(w, qj.dequantize(q)),
                         "bits": q.bits_per_value, "bytes": q.nbytes})
    print(f"{n}x{n} float32 weight ({w.nbytes} bytes), group 128 along the input axis")
    print(f"{'format':7} {'method':7} {'SQNR dB':>8} {'bits/w':>7} {'bytes':>9}")
    for r in rows:
        print(f"{r['format']:7} {r['method']:7} {r['sqnr_db']:8.2f} {r['bits']:7.3f} {r['bytes']:9d}")
    return rows
