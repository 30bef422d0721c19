"""A PTX interpreter for the few instructions of the kernel's inline assembly, over numpy arrays.

It runs :func:`quantize_jax.kernels.pallas_gpu.nibble_ptx`'s text on this CPU, so that the bit tricks the
GPU will run are tested without a GPU. Each instruction follows the PTX ISA's definition: ``lop3`` applies
its 8-bit truth table to each bit (``a``, ``b``, ``c`` select the table's index ``4a + 2b + c``); ``prmt``
picks each result byte from the eight bytes of ``{b, a}`` by a selector nibble (bit 3: replicate that
byte's sign); ``fma.rn`` rounds ``a * b + c`` once (computed in float64, exact for the operands here).
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            terms = [x if i >> shift & 1 else ~x for x, shift in ((a, 2), (b, 1), (c, 0))]
            out |= terms[0] & terms[1] & terms[2]
    return out


def _prmt(a, b, selector):
    pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        sel = selector >> 4 * i & 0xF
        byte = pool[sel & 7]
        if sel & 8:
            byte = np.where(byte & 0x80, np.uint32(0xFF), np.uint32(0))
        out |= byte << np.uint32(8 * i)
    return out


def _halves(x, dtype):
    return [((x >> np.uint32(16 * i)) & 0xFFFF).astype(np.uint16).view(dtype).astype(np.float64) for i in range(2)]


def _fma(kind, a, b, c):
    if kind == "f32":
        f = [v.view(np.float32).astype(np.float64) for v in (a, b, c)]
        return (f[0] * f[1] + f[2]).astype(np.float32).view(np.uint32)
    dtype = ml_dtypes.bfloat16 if kind == "bf16x2" else np.float16
    out = np.zeros_like(a)
    for i, (x, y, z) in enumerate(zip(*(_halves(v, dtype) for v in (a, b, c)))):
        out |= (x * y + z).astype(dtype).view(np.uint16).astype(np.uint32) << np.uint32(16 * i)
    return out


def run(asm: str, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Run ``asm`` with operands ``$i`` given by ``inputs`` (uint32 arrays); returns every ``$i`` it wrote."""
    regs = {f"${i}": np.asarray(v, np.uint32) for i, v in inputs.items()}
    written = {}

    def value(operand: str, like):
        if operand in regs:
            return regs[operand]
        if operand.startswith("0f"):
            return np.full_like(like, int(operand[2:], 16))
        return np.full_like(like, int(operand, 0))

    like = next(iter(regs.values()))
    for statement in re.split(r";\s*", asm.strip().strip("{}").strip()):
        if not statement or statement.startswith(".reg"):
            continue
        op, rest = statement.split(None, 1)
        dest, *args = [a.strip() for a in rest.split(",")]
        v = [value(a, like) for a in args]
        if op == "mov.b32":
            out = v[0]
        elif op == "shr.b32":
            out = v[0] >> v[1]
        elif op == "prmt.b32":
            out = _prmt(v[0], v[1], int(args[2], 0))
        elif op == "lop3.b32":
            out = _lop3(v[0], v[1], v[2], int(args[3], 0))
        elif op.startswith("fma.rn."):
            out = _fma(op.removeprefix("fma.rn."), *v)
        else:
            raise NotImplementedError(f"ptx: no emulation of {op!r}")
        regs[dest] = out
        if dest.startswith("$"):
            written[int(dest[1:])] = out
    return written
