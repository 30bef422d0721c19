"""Reproduces XLA's wrong constant folding of ``bitcast_convert_type(uint8 -> int4)`` (for an upstream report).

    python tools/xla_int4_bitcast_fold.py    # exit 0: folding is right on this jax; 1: the bug is present

Each uint8 byte holds two int4 codes, the low nibble first. Bitcasting a byte array passed in as an
argument gives them; bitcasting the same bytes closed over by a jitted function (so a compile-time
constant that XLA folds) did not on jax 0.10.2 (found in session 16; on the CPU, XLA's folding pass
itself is platform-independent). ``quantize_jax.qarray.int4_view`` puts an ``optimization_barrier`` on
the bytes before the bitcast for this reason; once this script exits 0 on the pinned jax, the barrier
can go.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def codes(packed):
    return lax.bitcast_convert_type(packed, jnp.int4).astype(jnp.int32)


def main() -> int:
    packed = np.array([[0x21, 0xF8]], np.uint8)  # codes 1, 2 and -8, -1
    expected = [[[1, 2], [-8, -1]]]
    as_argument = jax.jit(codes)(packed).tolist()
    folded = jax.jit(lambda: codes(jnp.asarray(packed)))().tolist()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: bytes {[hex(b) for b in packed[0]]}")
    print(f"  expected     {expected}")
    print(f"  as argument  {as_argument}")
    print(f"  closed over  {folded}")
    return 0 if as_argument == folded == expected else 1


if __name__ == "__main__":
    sys.exit(main())
