"""The Pallas kernel itself, in interpret mode on CPU: every format, tile option and ragged shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantize_jax as qj
from quantize_jax.kernels import pallas_gpu
from quantize_jax.matmul import _grid, _pallas_kernel

from . import ptx
from .conftest import FORMATS, PRODUCTS, TRITON_CALL, product_operands


def _run(x, q, **blocks):
    return _pallas_kernel(x, q, grid=_grid(q), interpret=True, **blocks)


def _reference(x, q):
    return np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q, jnp.float32), np.float64)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "m, k, n, group, blocks",
    [
        (1, 200, 37, 64, dict(split_k=2, gemv=True)),
        (3, 256, 64, 32, dict(block_n=16, split_k=4)),
        (2, 300, 21, None, dict(split_k=3, atomic=True)),  # the splits add into the output atomically
        (1, 256, 40, 128, dict(split_k=2, gemv=True, atomic=True)),
        (20, 130, 50, None, dict(block_m=16, block_n=32, block_k=32)),
        (5, 96, 18, 48, dict()),
        (40, 512, 72, 64, dict()),  # default tiles past 16 rows: 64 x 128, K split 8 (a one-tile grid)
    ],
)
def test_kernel_matches_the_reference(fmt, m, k, n, group, blocks):
    w = jax.random.normal(jax.random.key(k + n), (k, n))
    x = jax.random.normal(jax.random.key(m), (m, k))
    spec = qj.QuantSpec(format=fmt, axis=0, group_size=group)
    q = qj.quantize(w, spec)
    y = _run(x, q, **blocks)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _reference(x, q), rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_bfloat16_activations_multiply_in_bfloat16():
    w = jax.random.normal(jax.random.key(0), (256, 64))
    q = qj.quantize(w, qj.QuantSpec(axis=0, group_size=128))
    x = jax.random.normal(jax.random.key(1), (4, 256)).astype(jnp.bfloat16)
    ref = _reference(np.asarray(x.astype(jnp.float32)), q)  # bf16 x is exact in f32; codes are small integers
    np.testing.assert_allclose(_run(x, q), ref, rtol=1e-4, atol=1e-3)


def test_block_k_must_divide_the_group():
    q = qj.quantize(jnp.ones((128, 8)), qj.QuantSpec(axis=0, group_size=64))
    with pytest.raises(ValueError, match="block_k 128 must divide group_size 64"):
        _run(jnp.ones((1, 128)), q, block_k=128)


@pytest.mark.parametrize("k", [4096, 8192, 11008, 14336])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_default_tiles_split_k_evenly(m, k):
    """Splits cut K into whole blocks (padding K would copy the whole weight), one row is a GEMV."""
    tiles = pallas_gpu.default_blocks(m, k, 8192, 128, per_group=True)
    assert tiles["gemv"] == (m == 1)
    assert k % (tiles["block_k"] * tiles["split_k"]) == 0
    if k % 1024 == 0 and m <= 16:  # about 8 K blocks per split
        assert k // (tiles["block_k"] * tiles["split_k"]) == 8


@pytest.mark.parametrize("m, n, tile, splits", [(17, 8192, (32, 128), 4), (64, 8192, (64, 128), 4),
                                               (128, 8192, (64, 128), 2), (1024, 8192, (64, 128), 1),
                                               (64, 14336, (64, 128), 2)])
def test_more_rows_split_k_until_the_grid_fills(m, n, tile, splits):
    """Past 16 rows: 32- or 64-row tiles, K split until about 256 programs (M x N tiles x splits) run."""
    tiles = pallas_gpu.default_blocks(m, 8192, n, 128, per_group=True)
    assert (tiles["block_m"], tiles["block_n"], tiles["split_k"], tiles["gemv"]) == (*tile, splits, False)


@pytest.mark.parametrize("m, n, tile, splits", [(1, 8192, (16, 256), 8), (16, 8192, (16, 256), 8),
                                               (32, 8192, (32, 128), 4), (64, 8192, (64, 128), 4),
                                               (65, 8192, (128, 128), 2), (128, 8192, (128, 128), 2),
                                               (1, 14336, (16, 256), 4), (16, 4096, (16, 256), 16)])
def test_ptx_dot_tiles_split_k_until_the_grid_fills(m, n, tile, splits):
    """The PTX dot: 16-row tiles over 256 columns up to 16 rows, then 32 / 64 / 128 x 128, K split until
    about 256 programs run, 128 for 128-row tiles (as measured best on an H200 at K = N = 8192)."""
    k = 4096 if n == 14336 else 8192
    tiles = pallas_gpu.default_blocks(m, k, n, 128, per_group=True, ptx=True)
    assert (tiles["block_m"], tiles["block_n"], tiles["block_k"], tiles["split_k"], tiles["gemv"]) == (
        *tile, 128, splits, False)
    assert tiles.get("num_warps") == (8 if tile[0] == 128 else None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_ptx_dot_is_the_default_for_integer_codes_and_16_bit_activations(fmt, dtype):
    chosen = [pallas_gpu.default_ptx(m, qj.get_format(fmt), dtype) for m in (1, pallas_gpu.PTX_MAX_M,
                                                                               pallas_gpu.PTX_MAX_M + 1)]
    assert chosen == [fmt in ("int4", "uint4") and dtype != jnp.float32] * 2 + [False]


def test_default_kernel_is_the_ptx_dot_unless_a_byte_kernel_option_is_asked_for():
    q = qj.quantize(jax.random.normal(jax.random.key(6), (256, 40)), qj.QuantSpec(axis=0, group_size=128))
    x = jax.random.normal(jax.random.key(7), (3, 256)).astype(jnp.bfloat16)

    def program(**options):
        return str(jax.make_jaxpr(lambda x: _run(x, q, **options))(x))

    assert program() == program(ptx=True) != program(ptx=False)
    for options in (dict(gemv=True), dict(magic=True), dict(atomic=True, split_k=2)):
        assert program(**options) == program(ptx=False, **options)
    np.testing.assert_allclose(_run(x, q), _reference(np.asarray(x.astype(jnp.float32)), q), rtol=1e-4, atol=1e-3)


def test_one_row_through_the_dot_takes_a_whole_dot_tile():
    q = qj.quantize(jax.random.normal(jax.random.key(2), (256, 40)), qj.QuantSpec(axis=0, group_size=64))
    x = jax.random.normal(jax.random.key(3), (1, 256))
    np.testing.assert_allclose(_run(x, q, gemv=False), _reference(x, q), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "fmt, dtype, gemv",
    [(f, d, g) for f in ("int4", "uint4") for d in (jnp.float32, jnp.bfloat16, jnp.float16) for g in (False, True)]
    + [("nf4", jnp.bfloat16, False), ("fp4", jnp.float32, True)],
)
def test_magic_decode_matches_the_converting_decode(fmt, dtype, gemv):
    """Codes ORed into a float's mantissa decode to the same values: the same product. (The table formats
    have no magic decode: the same kernel, checked once each.)"""
    m = 1 if gemv else 5
    w = jax.random.normal(jax.random.key(4), (384, 42))
    x = jax.random.normal(jax.random.key(5), (m, 384)).astype(dtype)
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=128))
    plain, magic = _run(x, q, gemv=gemv, split_k=3, ptx=False), _run(x, q, gemv=gemv, split_k=3, magic=True)
    np.testing.assert_array_equal(magic, plain)
    kernels = [str(jax.make_jaxpr(lambda x, magic=magic: _run(x, q, gemv=gemv, split_k=3, magic=magic, ptx=False))(x))
               for magic in (False, True)]
    assert (kernels[0] != kernels[1]) == (fmt in ("int4", "uint4"))  # the magic decode ran, for integer codes
    if fmt != "nf4":  # its levels round to bf16 / f16; every other format's are exact there
        np.testing.assert_allclose(magic, _reference(np.asarray(x.astype(jnp.float32)), q), rtol=1e-4, atol=1e-3)


def test_magic_decode_names_an_unsupported_activation_dtype():
    q = qj.quantize(jnp.ones((128, 8)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match="magic=True .* not int32"):
        _run(jnp.ones((1, 128), jnp.int32), q, magic=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "m, k, n, group, dtype, blocks",
    [
        (1, 200, 37, 64, jnp.float32, dict(gemv=True, split_k=2, block_k=16)),  # GEMV, a ragged last group
        (2, 300, 21, None, jnp.bfloat16, dict(gemv=True, split_k=3, ahead=1)),  # GEMV, per channel, padded K
        (3, 256, 64, 32, jnp.bfloat16, dict(gemv=False, block_n=16, split_k=4)),  # dot, bf16 pairs
        (17, 384, 50, 128, jnp.float16, dict(gemv=False, ahead=3)),  # dot, f16 pairs, two M tiles
        (5, 256, 40, 64, jnp.float32, dict(gemv=False, split_k=2)),  # dot in float32
        (70, 256, 40, 128, jnp.bfloat16, dict()),  # the default past 64 rows: one 128-row tile, 8 warps
    ],
)
def test_ptx_kernel_matches_the_reference(fmt, m, k, n, group, dtype, blocks):
    """Codes decoded as the inline PTX does (jnp ops here), plane by plane, the planes' columns joined back."""
    w = jax.random.normal(jax.random.key(k + n), (k, n))
    x = jax.random.normal(jax.random.key(m), (m, k)).astype(dtype)
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=group))
    y = _run(x, q, ptx=True, **blocks)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    if fmt == "nf4" and dtype != jnp.float32 and not blocks.get("gemv", False):
        ref = _run(x, q, gemv=False)  # a 16-bit dot rounds nf4's levels to the activations' dtype, as here
    else:
        ref = _reference(np.asarray(x.astype(jnp.float32)), q)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_ptx_kernel_names_what_it_cannot_do():
    q = qj.quantize(jnp.ones((128, 16)), qj.QuantSpec(axis=0))
    with pytest.raises(ValueError, match="ptx=True .* got atomic=True, block_n=256, ahead=4"):
        _run(jnp.ones((1, 128)), q, ptx=True, atomic=True)
    with pytest.raises(ValueError, match="ptx=True .* got atomic=False, block_n=12, ahead=4"):
        _run(jnp.ones((1, 128)), q, ptx=True, block_n=12)
    with pytest.raises(ValueError, match="ptx=True .* got atomic=False, block_n=256, ahead=0"):
        _run(jnp.ones((1, 128)), q, ptx=True, ahead=0)


@settings(max_examples=4)  # each example compiles; CI time (session 15's VM: 16 min at 6)
@given(**PRODUCTS, gemv=st.booleans())
def test_ptx_kernel_over_random_shapes(m, k, n, fmt, group, gemv):
    """No shape is a multiple of the tiles: K and N padded, the planes' columns joined back in order."""
    x, q = product_operands(m, k, n, fmt, group)
    y = _run(x, q, ptx=True, gemv=gemv)
    assert y.shape == (m, n)
    np.testing.assert_allclose(y, _reference(x, q), rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("high", [False, True])
def test_decode_ptx_gives_every_byte_its_codes(dtype, signed, high):
    """The kernel's inline PTX, run by a PTX interpreter over every byte (every pair of bytes for the
    16-bit pairs), gives the codes that interpret mode computes with jnp ops (and that match unpack_int4)."""
    asm, constraints, pack = pallas_gpu.nibble_ptx(dtype, signed, high)
    assert constraints.split(",").count("r") == pack  # one input register per byte
    byte = np.arange(256, dtype=np.uint32)
    bytes_in = [byte] if pack == 1 else list(np.meshgrid(byte, byte, indexing="ij"))
    out = ptx.run(asm, {1 + i: b.ravel() for i, b in enumerate(bytes_in)})[0]
    if pack == 1:
        got = [out.view(np.float32)]
    else:
        got = [(out >> np.uint32(16 * i) & 0xFFFF).astype(np.uint16).view(jnp.dtype(dtype)) for i in range(2)]
    for b, values in zip(bytes_in, got):
        want = pallas_gpu.nibble_values(jnp.asarray(b.ravel().astype(np.uint8)), signed, dtype)[int(high)]
        np.testing.assert_array_equal(np.asarray(values, np.float32), np.asarray(want, np.float32))
        codes = qj.unpack_int4(b.ravel().astype(np.uint8)[:, None], axis=-1, signed=signed)[:, int(high)]
        np.testing.assert_array_equal(np.asarray(values, np.float32), np.asarray(codes, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("fmt", ["int4", "uint4", "nf4"])
def test_ptx_kernel_lowers_for_cuda_on_this_machine(fmt, gemv, dtype):
    """Pallas lowers the PTX kernel, inline assembly included, to a Triton call for CUDA without a GPU (as
    ``tools/kernel_ptx.py`` does before compiling it): what fails here fails on every GPU."""
    q = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), qj.QuantSpec(format=fmt, axis=0, group_size=128))
    x = jnp.ones((3, 256), dtype)
    product = jax.jit(lambda x, q: _pallas_kernel(x, q, grid=_grid(q), interpret=False, ptx=True, gemv=gemv))
    exported = jax.export.export(product, platforms=["cuda"], disabled_checks=[TRITON_CALL])
    assert "xla.gpu.triton" in exported(x, q).mlir_module()


@pytest.mark.parametrize("m", [1, 5, 16])
def test_ptx_dot_reads_few_activation_rows_in_place(m):
    """Under a whole dot tile of rows the PTX dot masks the rows past M itself: the activations reach the
    Triton call as given and its output is summed over the K splits with no row slice (on the H200,
    padding one row to 16 and slicing the output took 1.5 us each of the 23.0 a product)."""
    q = qj.quantize(jax.random.normal(jax.random.key(0), (4096, 512)), qj.QuantSpec(axis=0, group_size=128))
    product = jax.jit(lambda x, q: _pallas_kernel(x, q, grid=_grid(q), interpret=False, ptx=True))
    exported = jax.export.export(product, platforms=["cuda"], disabled_checks=[TRITON_CALL])
    module = exported(jnp.ones((m, 4096), jnp.bfloat16), q).mlir_module()
    (call,) = [line for line in module.splitlines() if "xla.gpu.triton" in line]
    assert f"tensor<{m}x4096xbf16>" in call.rsplit(" : (", 1)[1]  # the Triton call's activations operand
    assert "stablehlo.pad" not in module and "stablehlo.slice" not in module


def test_tf32_parts_add_up_to_float32_exactly():
    """The float32 dot's split: three parts that TF32 keeps whole (13 low mantissa bits zero), whose sum
    is the activation itself, over small and huge values of both signs (down to 2**-90: below about
    2**-102 the last part is subnormal and XLA flushes it to zero, a relative error of 2**-22 at most)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-90, 100, 4096))).astype(np.float32)
    parts = [np.asarray(part) for part in pallas_gpu.tf32_parts(jnp.asarray(x))]
    for part in parts:
        assert np.all(part.view(np.uint32) & 0x1FFF == 0)
    np.testing.assert_array_equal(parts[0] + parts[1] + parts[2], x)  # each partial sum exact
    assert np.count_nonzero(parts[2]) > 0  # the last part is needed


@pytest.mark.parametrize("fmt, exact", [("int4", True), ("uint4", True), ("fp4", True), ("nf4", False)])
def test_which_levels_are_exact_in_tf32(fmt, exact):
    assert pallas_gpu._tf32_exact(qj.QuantSpec(format=fmt).fmt) == exact


def _run_transposed(g, q, **blocks):
    grid = _grid(q)
    return pallas_gpu.matmul_transposed(g, q.packed, grid.scale, grid.zero_point, n=q.shape[1], fmt=q.spec.fmt,
                                        group_size=grid.group_rows, interpret=True, **blocks)


@pytest.mark.parametrize(
    "fmt, m, k, n, group, dtype, blocks",
    [
        ("int4", 3, 256, 300, 128, jnp.float32, dict()),  # columns split over the grid, each split several steps
        ("uint4", 20, 200, 37, 64, jnp.float32, dict(block_m=16, block_k=32, block_n=16, split_n=2)),  # ragged
        ("uint4", 24, 256, 96, 128, jnp.bfloat16, dict()),  # the zero points' share rounded as the codes' is
        ("nf4", 2, 96, 50, None, jnp.bfloat16, dict()),  # one scale row for every output tile
        ("fp4", 5, 128, 64, 32, jnp.bfloat16, dict(block_k=16)),
    ],
)
def test_transposed_kernel_matches_the_reference(fmt, m, k, n, group, dtype, blocks):
    """``g @ W.T`` over W's packed axis against float64 (uint4: zero points; every format also in the random
    shapes below); bf16: within the rounding of ``g * s`` to bf16, ``2**-9 |g| |W|`` a term (nf4: its
    levels rounded too), the float32 sums' error besides."""
    w = jax.random.normal(jax.random.key(k + n), (k, n))
    g = jax.random.normal(jax.random.key(m), (m, n))
    q = qj.quantize(w, qj.QuantSpec(format=fmt, axis=0, group_size=group) if group else qj.QuantSpec(format=fmt))
    y = _run_transposed(g, q, dtype=dtype, **blocks)
    assert y.shape == (m, k) and y.dtype == jnp.float32
    w_hat = np.asarray(qj.dequantize(q, jnp.float32), np.float64)
    want = np.asarray(g, np.float64) @ w_hat.T
    eps = 1e-6 if dtype == jnp.float32 else 2.0**-8 if fmt == "nf4" else 2.0**-9 + 2.0**-20
    bound = eps * (np.abs(np.asarray(g, np.float64)) @ np.abs(w_hat).T) + 1e-6
    assert (np.abs(np.asarray(y, np.float64) - want) <= bound).all()


@settings(max_examples=3)  # each example compiles; CI time
@given(**PRODUCTS)
def test_transposed_kernel_over_random_shapes(m, k, n, fmt, group):
    _, q = product_operands(m, k, n, fmt, group)
    g = jax.random.normal(jax.random.key(k), (m, n))
    y = _run_transposed(g, q)
    want = np.asarray(g, np.float64) @ np.asarray(qj.dequantize(q, jnp.float32), np.float64).T
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(n))


def test_transposed_kernel_names_bad_tiles():
    q = qj.quantize(jnp.ones((128, 8)), qj.QuantSpec(axis=0, group_size=64))
    with pytest.raises(ValueError, match="block_k 128 must divide group_size 64"):
        _run_transposed(jnp.ones((1, 8)), q, block_k=128)
    with pytest.raises(ValueError, match="block_n must be a multiple of 8 for matmul_transposed, got 12"):
        _run_transposed(jnp.ones((1, 8)), q, block_n=12)


@pytest.mark.parametrize("m, tile, splits, warps", [(1, 16, 4, None), (16, 16, 4, None), (32, 32, 4, None),
                                                    (64, 64, 4, 8), (128, 64, 2, 8), (2048, 64, 1, 8)])
def test_transposed_tiles_split_columns_until_the_grid_fills(m, tile, splits, warps):
    """K = N = 8192, groups of 128: 64 output tiles of W's rows per tile of gradient rows, the 4096 bytes of
    each row split until about 256 programs (none at 32 tiles of gradient rows)."""
    tiles = pallas_gpu.default_transposed_blocks(m, 8192, 8192, 128, per_group=True)
    assert (tiles["block_m"], tiles["block_k"], tiles["block_n"], tiles["split_n"]) == (tile, 128, 256, splits)
    assert tiles.get("num_warps") == warps


@pytest.mark.parametrize("fmt, dtype", [("int4", jnp.bfloat16), ("uint4", jnp.float16), ("nf4", jnp.float32)])
def test_transposed_kernel_lowers_for_cuda_on_this_machine(fmt, dtype):
    q = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), qj.QuantSpec(format=fmt, axis=0, group_size=128))
    grid = _grid(q)
    product = jax.jit(lambda g, q: pallas_gpu.matmul_transposed(
        g, q.packed, grid.scale, grid.zero_point, n=64, fmt=q.spec.fmt, group_size=128, dtype=dtype))
    exported = jax.export.export(product, platforms=["cuda"], disabled_checks=[TRITON_CALL])
    assert "qdot_int4_transposed" in exported(jnp.ones((3, 64)), q).mlir_module()


def test_transposed_tiles_narrow_for_float32_dots_and_select_chains():
    """float32 dots: 64 x 128 tiles of W (128 x 256 asked for more shared memory than an SM has); nf4 / fp4:
    64 rows of W (128 spilled registers; both read offline with tools/kernel_ptx.py)."""
    f32 = pallas_gpu.default_transposed_blocks(16, 8192, 8192, 128, True, jnp.float32)
    levels = pallas_gpu.default_transposed_blocks(16, 8192, 8192, 128, True, jnp.bfloat16, integer=False)
    assert (f32["block_k"], f32["block_n"]) == (64, 128) and (levels["block_k"], levels["block_n"]) == (64, 256)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, n, group, blocks", [(200, 37, 64, dict()), (256, 96, None, dict(block_k=32, block_n=32)),
                                                 (130, 50, 32, dict(block_k=16)), (128, 512, 128, dict())])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dequantize_kernel_equals_dequantize_bit_for_bit(fmt, k, n, group, blocks, dtype):
    """The decoding kernel: ``(c - z) * s`` in float32 rounded once, as ``qj.dequantize`` computes it; ragged
    rows and columns (odd ``n``), groups that end inside the last block, per channel."""
    q = qj.quantize(jax.random.normal(jax.random.key(k + n), (k, n)), qj.QuantSpec(format=fmt, axis=0, group_size=group))
    grid = _grid(q)
    w = pallas_gpu.dequantize(q.packed, grid.scale, grid.zero_point, n=n, fmt=q.spec.fmt, group_size=grid.group_rows,
                              dtype=dtype, interpret=True, **blocks)
    assert w.shape == (k, n) and w.dtype == dtype
    np.testing.assert_array_equal(np.asarray(w, np.float32), np.asarray(qj.dequantize(q, dtype), np.float32))


def test_dequantize_kernel_names_bad_tiles_and_lowers_for_cuda():
    q = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), qj.QuantSpec(format="uint4", axis=0, group_size=64))
    grid = _grid(q)
    decode = lambda q, **blocks: pallas_gpu.dequantize(  # noqa: E731
        q.packed, grid.scale, grid.zero_point, n=64, fmt=q.spec.fmt, group_size=64, **blocks)
    with pytest.raises(ValueError, match="block_k 128 must divide group_size 64"):
        decode(q, block_k=128, interpret=True)
    with pytest.raises(ValueError, match="block_n must be a multiple of 16 for dequantize, got 24"):
        decode(q, block_n=24, interpret=True)
    exported = jax.export.export(jax.jit(decode), platforms=["cuda"], disabled_checks=[TRITON_CALL])
    assert "dequantize_int4" in exported(q).mlir_module()
