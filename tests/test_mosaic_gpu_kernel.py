"""The Mosaic GPU (TMA + WGMMA) kernels ``x @ W`` and ``x @ W.T``: in Mosaic GPU's interpreter on CPU, and
lowered for CUDA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import quantize_jax as qj
from quantize_jax.kernels import mosaic_gpu


PRODUCTS = {"matmul": (mosaic_gpu.matmul, 0), "matmul_nt": (mosaic_gpu.matmul_nt, 1)}  # name: (kernel, contracted axis)


def _operands(product, m, k, n, group, seed=0):
    """Activations ``(m, k)`` and a weight of ``n`` output columns, ``(k, n)`` or ``(n, k)`` as ``product``
    contracts it, each output column at its own scale."""
    axis = PRODUCTS[product][1]
    column_scales = jax.random.uniform(jax.random.key(seed + 1), (n, 1), minval=0.1, maxval=3)
    w = jax.random.normal(jax.random.key(seed), (n, k)) * column_scales
    x = jax.random.normal(jax.random.key(seed + 2), (m, k), jnp.bfloat16)
    return x, qj.quantize(w if axis else w.T, qj.QuantSpec(axis=axis, group_size=group))


def _reference(product, x, q):
    w = np.asarray(qj.dequantize(q), np.float64)
    return np.asarray(x, np.float64) @ (w.T if PRODUCTS[product][1] else w)


def _check(product, m, k, n, group, options, seed=0, interpret=True):
    x, q = _operands(product, m, k, n, group, seed=seed)
    y = PRODUCTS[product][0](x, q, interpret=interpret, **options)
    ref = _reference(product, x, q)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    # int4 codes times bf16 activations are exact; only the float32 sums' order differs
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max() * np.sqrt(k))


@pytest.mark.parametrize(
    "m, k, n, group, options",
    [
        (1, 256, 64, 128, dict()),
        (3, 512, 128, 128, dict(splits=2, stages=2)),  # two splits of two steps, each step its own group
        (16, 512, 64, 256, dict(splits=2)),  # two steps a group
        (9, 256, 128, None, dict(splits=2)),  # one scale a row
        (8, 192, 64, 64, dict(splits=3, stages=1)),  # groups under 128 columns: a step per group
        (64, 384, 64, 64, dict(stages=3)),
        (5, 1024, 256, 128, dict(block_rows=128, block_k=256, splits=2)),  # two WGMMAs a sub-step, two groups a step
        (2, 1024, 128, 256, dict(block_k=512)),  # two groups a step, two sub-steps a group
        (12, 512, 128, 64, dict(block_rows=128, block_k=256, stages=2)),  # four groups a step
        (1, 768, 128, None, dict(block_rows=128, block_k=256)),  # one scale a row, three steps
        (3, 576, 64, 64, dict(block_k=192, splits=3)),  # three groups a step: matmul_nt's 12-group boxes past G = 9
    ],
)
@pytest.mark.parametrize("product", PRODUCTS)
def test_matches_the_reference(product, m, k, n, group, options):
    _check(product, m, k, n, group, options, seed=m + k)


@st.composite
def _problems(draw):
    """A random product the kernel takes: its rows, row blocks, groups, step widths, splits and stages."""
    group = draw(st.sampled_from([64, 128, 256, None]))
    part = 64 if group == 64 else 128  # columns per WGMMA
    block_k = draw(st.sampled_from([c for c in (64, 128, 256, 512)
                                    if c % part == 0 and (group is None or group % c == 0 or c % group == 0)]))
    steps = draw(st.integers(1, 2)) * (group // block_k if group and group > block_k else 1)  # whole groups
    splits = draw(st.integers(1, 3))
    m, n = draw(st.integers(1, 64)), draw(st.sampled_from([64, 128])) * draw(st.integers(1, 2))
    options = dict(block_rows=draw(st.sampled_from([r for r in (64, 128) if n % r == 0])), block_k=block_k,
                   splits=splits, stages=draw(st.integers(1, 4)))
    return m, splits * steps * block_k, n, group, options


@settings(max_examples=8)  # each example interprets a kernel; CI time
@given(product=st.sampled_from(list(PRODUCTS)), problem=_problems(), seed=st.integers(0, 2**16),
       specialized=st.booleans())
def test_random_products_match_the_reference(product, problem, seed, specialized):
    m, k, n, group, options = problem
    x, q = _operands(product, m, k, n, group)
    try:  # (tiles whose stages overflow an SM's shared memory are refused, as on a GPU)
        mosaic_gpu._plan(product, x, q, PRODUCTS[product][1], **options)
    except ValueError as e:
        assert "bytes of shared memory" in str(e)
        assume(False)
    if product == "matmul_nt":  # (its warp-specialized pipeline, half the time)
        options = dict(options, specialized=specialized)
    _check(product, m, k, n, group, options, seed=seed)


@pytest.mark.parametrize(
    "m, k, n, group, options",
    [
        (3, 512, 128, 128, dict(splits=2, stages=2)),
        (200, 512, 64, 64, dict(block_k=256)),  # four groups a step
        (120, 1024, 256, 256, dict(block_rows=128, block_k=128, splits=2)),  # two steps a group, 2 stages fit
        (256, 256, 64, 128, dict()),
    ],
)
def test_scaled_decoding_matches_the_rounded_weight(m, k, n, group, options):
    """``matmul(exact=False)``: the scaled weight rounded to bf16, as ``dequant`` rounds it, then exact
    products summed in float32; up to 256 rows."""
    x, q = _operands("matmul", m, k, n, group, seed=m)
    y = mosaic_gpu.matmul(x, q, exact=False, interpret=True, **options)
    ref = np.asarray(x, np.float64) @ np.asarray(qj.dequantize(q, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max() * np.sqrt(k))
    exported = jax.export.export(jax.jit(functools.partial(mosaic_gpu.matmul, exact=False, **options)),
                                 platforms=["cuda"])(x, q)  # the compiled branch lowers too
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("m, k, n, options", [(200, 512, 128, dict(splits=2)), (256, 256, 64, dict(stages=2)),
                                              (100, 384, 256, dict(block_rows=128))])
def test_one_scale_per_column_is_exact_up_to_256_rows(product, m, k, n, options):
    """One scale per output column: the kernel sums the codes' products (one accumulator per 64 columns) and
    XLA scales the sums, exact for ``exact=True`` past 64 rows; lowered for CUDA too."""
    _check(product, m, k, n, None, options, seed=m)
    x, q = _operands(product, m, k, n, None)
    kernel = functools.partial(PRODUCTS[product][0], **options)
    assert "mosaic_gpu" in jax.export.export(jax.jit(kernel), platforms=["cuda"])(x, q).mlir_module()


def test_scaled_decoding_takes_up_to_256_rows():
    x, q = _operands("matmul", 257, 256, 128, 128)
    with pytest.raises(ValueError, match="1 to 256 rows"):
        mosaic_gpu.matmul(x, q, exact=False, interpret=True)
    with pytest.raises(ValueError, match="1 to 128 rows"):  # two accumulators of 128 registers each
        mosaic_gpu.matmul(x[:200], q, exact=False, block_rows=128, interpret=True)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        mosaic_gpu.matmul(x[:65], q, interpret=True)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("m, block_rows, block_k", [(1, 64, 128), (64, 128, 256), (64, 64, 256), (200, 64, 128)])
def test_smem_bytes_is_what_mosaic_gpu_counts(monkeypatch, product, m, block_rows, block_k):
    """:func:`mosaic_gpu.smem_bytes` against Mosaic GPU's own count, which its lowering checks against the
    card's shared memory: the default stages lower, one stage more is refused (counted within 512 bytes;
    the kernel's own check, which would refuse it first, lifted)."""
    import re

    forward = PRODUCTS[product][1] == 0
    if m > mosaic_gpu.MAX_M and not forward:
        pytest.skip("matmul_nt takes up to 64 rows")
    x, q = _operands(product, m, 2048, 256, 128)
    tiles = mosaic_gpu._Tiles(block_rows, block_k, 128, 128, 1)
    stages = mosaic_gpu.default_stages(tiles, m, forward, most=8)
    kernel = functools.partial(PRODUCTS[product][0], block_rows=block_rows, block_k=block_k, splits=1,
                               **({"exact": False} if m > mosaic_gpu.MAX_M else {}))
    jax.export.export(jax.jit(functools.partial(kernel, stages=stages)), platforms=["cuda"])(x, q)
    if stages < 8:
        monkeypatch.setattr(mosaic_gpu, "SMEM_BYTES", 2**30)
        with pytest.raises(ValueError, match="exceeds available shared memory") as info:
            jax.export.export(jax.jit(functools.partial(kernel, stages=stages + 1)), platforms=["cuda"])(x, q)
        counted = int(re.search(r"smem_bytes=(\d+)", str(info.value)).group(1))
        assert 0 <= counted - mosaic_gpu.smem_bytes(tiles, m, stages + 1, forward) <= 512


def test_tiles_over_the_shared_memory_are_named():
    x, q = _operands("matmul", 64, 2048, 256, 128)
    with pytest.raises(ValueError, match="matmul: 128 x 512 blocks at 64 rows take 264200 bytes"):
        mosaic_gpu.matmul(x, q, block_rows=128, block_k=512, interpret=True)


@pytest.mark.parametrize("product", PRODUCTS)
def test_stages_asked_for_are_counted_as_the_pipeline_keeps_them(product):
    """Stages over the shared memory are named before Mosaic GPU's lowering refuses them (as it did on an H200:
    264216 bytes for 128 x 512 tiles in 3 stages at one row); a pipeline of fewer steps keeps only as many
    stages as it has steps, so the same tiles over 2 steps a program fit."""
    x, q = _operands(product, 1, 8192, 128, 128)
    tiles = dict(block_rows=128, block_k=512, stages=3)
    forward = PRODUCTS[product][1] == 0
    if forward:
        with pytest.raises(ValueError, match="128 x 512 blocks at 1 rows take 264216 bytes .* with 3 stage"):
            mosaic_gpu.matmul(x, q, splits=4, **tiles, interpret=True)
    assert mosaic_gpu._plan(product, x, q, 1 - forward, splits=8, block_k=512, block_rows=128, stages=3)[2] == 2


def test_default_splits_fill_the_gpu():
    assert mosaic_gpu.default_splits(8192, 8192, 64, 128) == 4  # 128 programs of 64 rows, times 4
    assert mosaic_gpu.default_splits(8192, 8192, 128, 256) == 8  # 64 programs of 128 rows, times 8
    assert mosaic_gpu.default_splits(64, 8192, 64, 128) == 64  # one row block: K split into 64 steps
    assert mosaic_gpu.default_splits(64, 384, 64, 128) == 1  # three steps do not halve


def test_warp_specialized_matmul_nt_matches_the_reference():
    """Two computing warpgroups, each its 64 columns (test_random_products_match_the_reference draws the
    warp-specialized pipeline for half of matmul_nt's products)."""
    _check("matmul_nt", 5, 512, 256, 128, dict(block_rows=128, block_k=256, splits=2, specialized=True))


@pytest.mark.parametrize("group", [128, None])
def test_warp_specialized_matmul_nt_lowers_for_cuda(group):
    """Its compiled branch (a memory warpgroup and two computing ones; WGMMAs into accumulators that live
    through the pipeline for one scale a row), which the interpreter does not run in full."""
    x, q = _operands("matmul_nt", 16, 8192, 256, group)
    kernel = functools.partial(mosaic_gpu.matmul_nt, block_rows=128, specialized=True)
    exported = jax.export.export(jax.jit(kernel), platforms=["cuda"])(x, q)
    assert "mosaic_gpu" in exported.mlir_module() and exported.out_avals[0].shape == (16, 256)


@pytest.mark.parametrize("product", PRODUCTS)
def test_pipeline_has_no_races(product):
    """The interpreter's happens-before race detector over the TMA copies into the pipeline's buffers and
    the compute's reads of them: two splits, two stages, two WGMMAs and two groups a step. (It simulates a
    program's warpgroup as one thread, so it cannot see a missing barrier among the warpgroup's threads:
    without ``matmul``'s ``commit_smem`` after storing the decoded tile, this still passes.)"""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    _check(product, 3, 1024, 256, 128, dict(block_rows=128, block_k=256, splits=2, stages=2), interpret="races")
    assert not interpret_pallas_call.get_races().races_found
    if product == "matmul_nt":  # and warp-specialized: a warpgroup copying, two computing
        _check(product, 3, 1024, 256, 128, dict(block_rows=128, block_k=256, splits=2, stages=2, specialized=True),
               interpret="races")
        assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("m, k, group, options", [(1, 8192, 128, {}), (64, 1024, None, {}), (20, 512, 64, {}),
                                                   (16, 8192, 128, dict(block_rows=128, block_k=512)),
                                                   (3, 576, 64, dict(block_k=192, splits=3))])
def test_lowers_for_cuda(product, m, k, group, options):
    """The compiled branch (WGMMA with A in registers or read transposed from shared memory, explicit
    layouts), which the interpreter does not run, lowers to a Mosaic GPU custom call without a GPU."""
    x, q = _operands(product, m, k, 128, group)
    kernel = functools.partial(PRODUCTS[product][0], **options)
    exported = jax.export.export(jax.jit(kernel), platforms=["cuda"])(x, q)
    assert "mosaic_gpu" in exported.mlir_module()
    assert exported.out_avals[0].shape == (m, 128)


@pytest.mark.parametrize("m, group", [(1, 128), (5, 64), (16, 256)])
def test_matmul_nt_reads_its_operands_as_stored(m, group):
    """matmul_nt's TMA boxes read the activations and the ``(N, G)`` scales in place: the lowered program
    hands the kernel those arguments themselves. (Before, XLA padded the activations to 8 rows and
    transposed the scales to ``(G, N)``: 1.4 and 2.3 us of 22.2 a call on an H200.)"""
    x, q = _operands("matmul_nt", m, 8192, 256, group)
    module = jax.export.export(jax.jit(mosaic_gpu.matmul_nt), platforms=["cuda"])(x, q).mlir_module()
    header, body = module[module.rindex("func.func", 0, module.index("custom_call @mosaic_gpu")):].split("\n", 1)
    assert f"%arg0: tensor<{m}x8192xbf16>" in header and f"%arg2: tensor<256x{8192 // group}xf32>" in header
    call = next(line for line in body.splitlines() if "custom_call @mosaic_gpu" in line)
    codes, activations, scales = call.split("(", 1)[1].split(")")[0].split(", ")
    assert (activations, scales) == ("%arg0", "%arg2")  # handed to the kernel untouched


@pytest.mark.parametrize(
    "x_shape, x_dtype, w_shape, spec, match",  # (the weight as matmul_nt takes it: (N, K), scaled along K)
    [
        ((2, 256), jnp.bfloat16, (64, 128), qj.QuantSpec(axis=1), "x has 256 columns, q 128"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(format="nf4", axis=1), "only int4"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(format="uint4", axis=1), "only int4"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=0), "scaled along the axis it is contracted over"),
        ((2, 256), jnp.float32, (64, 256), qj.QuantSpec(axis=1), "bfloat16"),
        ((65, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1, group_size=128), "1 to 64 rows"),
        ((257, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1), "1 to 256 rows"),
        ((2, 256), jnp.bfloat16, (96, 256), qj.QuantSpec(axis=1), "the 96 output columns a multiple of it"),
        ((2, 200), jnp.bfloat16, (64, 200), qj.QuantSpec(axis=1), "whole steps"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1, group_size=48), "whole steps"),
        ((2, 256), jnp.bfloat16, (64, 256), qj.QuantSpec(axis=1, group_size=32), "a multiple of 64"),
    ],
)
@pytest.mark.parametrize("product", PRODUCTS)
def test_bad_input_names_it(product, x_shape, x_dtype, w_shape, spec, match):
    x = jnp.ones(x_shape, x_dtype)
    forward = PRODUCTS[product][1] == 0  # the same weight transposed, its scale axis flipped
    if forward:
        w_shape, spec = w_shape[::-1], dataclasses.replace(spec, axis=1 - spec.axis)
    q = qj.quantize(jnp.ones(w_shape), spec)
    with pytest.raises(ValueError, match=match) as info:
        PRODUCTS[product][0](x, q, interpret=True)
    assert product in str(info.value) and str(x_shape) in str(info.value)
    assert not mosaic_gpu.fits(x, q, transposed=not forward)  # what qeinsum's auto asks


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("m, group", [(1, None), (64, 128), (256, None)])
def test_fits_the_operands_the_kernel_takes(product, m, group):
    x, q = _operands(product, m, 256, 128, group)
    assert mosaic_gpu.fits(x, q, transposed=PRODUCTS[product][1] == 1)


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_float_weight_or_bad_tiles_are_named(product):
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{product}: expected x \\(M, K\\) and a 2-D QArray q"):
        PRODUCTS[product][0](x, jnp.ones((256, 256)), interpret=True)
    _, q = _operands(product, 2, 256, 128, 128)
    with pytest.raises(ValueError, match="block_rows must be 64 or 128.*96 x 128 blocks"):
        PRODUCTS[product][0](x, q, block_rows=96, interpret=True)
    with pytest.raises(ValueError, match="whole steps of 192 columns"):
        PRODUCTS[product][0](x, q, block_k=192, interpret=True)
