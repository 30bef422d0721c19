"""The Pallas kernel's GPU code, read without a GPU: registers, spills and instruction mix on an H100 (sm_90).

    pip install -e ".[ptx]"            # Triton's compiler and its ptxas run on a CPU machine
    python tools/kernel_ptx.py 1,ptx=False 16,ptx=False 1 16 [--kn 8192] [--format uint4] [--dtype float16] [--keep DIR]

Each argument is M followed by ``pallas_gpu.matmul`` tile arguments (``name=value``; ``transposed=True``
compiles ``pallas_gpu.matmul_transposed``, ``g @ W.T``, with its own tile arguments instead, ``decode=True``
``pallas_gpu.dequantize``, the weight decoded to ``--dtype``, M unused); the weight is
``kn x kn`` int4 (``--format``) with group 128, the activations bf16 (``--dtype``). The kernel is lowered
for CUDA through ``jax.export`` (no GPU needed; the Triton IR is taken from Pallas' lowering, a private
JAX module), compiled by Triton for sm_90, and ``ptxas -v`` reports registers and spills (with Triton's
shared memory, ``programs_per_sm``: how many programs an SM holds at once, what the loads in flight scale
with); the PTX and the machine code (``cuobjdump -sass``) give instruction counts. Integer-to-float conversions (PTX ``cvt.rn.<float>.<int>``,
SASS ``I2F``) are counted apart: GPUs run them at a fraction of their add rate. ``wgmma_waits`` lists how
many Hopper ``wgmma`` groups each wait leaves in flight: ``[0]`` alone means every dot is waited for
before the loop goes on (no overlap of the next tile's decode with the tensor cores). ``inner_loop`` counts the
machine instructions of the shortest loop (the K loop, or one group of it where the compiler unrolled the
K loop): divided by the codes each thread decodes per pass, the instructions each code costs. ``loops``
lists every loop's instruction count, innermost first (the PTX GEMV's second is one group: its K loop
once plus the group's reduction and scaling).
Static facts only: times come from ``benchmarks/matmul_gpu.py`` on a device.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration

import quantize_jax as qj
from quantize_jax.formats import FORMATS
from quantize_jax.kernels import pallas_gpu

ARCH = 90


def triton_ir(m: int, kn: int, blocks: dict, fmt: str = "int4", dtype=jnp.bfloat16) -> tuple[str, dict]:
    """The Triton IR (text) of the kernel for an ``(m, kn) @ (kn, kn)`` product with ``blocks``: a ``fmt``
    weight in groups of 128 rows, ``dtype`` activations; and the ``num_warps`` / ``num_stages`` the kernel
    asked Triton for (the defaults' too: 8 warps for 128-row PTX tiles)."""
    captured, params = [], []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module
    compiler_params = pallas_gpu.pl_triton.CompilerParams

    def record(**kwargs):
        params.append(kwargs)
        return compiler_params(**kwargs)

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    spec = qj.QuantSpec(format=fmt, axis=0, group_size=128)
    q = jax.eval_shape(lambda w: qj.quantize(w, spec), jax.ShapeDtypeStruct((kn, kn), jnp.float32))
    x = jax.ShapeDtypeStruct((m, kn), dtype)

    blocks = dict(blocks)
    if blocks.pop("decode", False):  # the weight decoded to ``dtype`` (M unused)
        def product(x, q):
            return pallas_gpu.dequantize(q.packed, q.scale, q.zero_point, n=kn, fmt=spec.fmt, group_size=128,
                                         dtype=dtype, **blocks)
    elif blocks.pop("transposed", False):  # g @ W.T: float32 gradients, dots in ``dtype``
        x = jax.ShapeDtypeStruct((m, kn), jnp.float32)

        def product(g, q):
            return pallas_gpu.matmul_transposed(g, q.packed, q.scale, q.zero_point, n=kn, fmt=spec.fmt,
                                                group_size=128, dtype=dtype, **blocks)
    else:
        def product(x, q):
            return pallas_gpu.matmul(x, q.packed, q.scale, q.zero_point, n=kn, fmt=spec.fmt, group_size=128,
                                     **blocks)

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    pallas_gpu.pl_triton.CompilerParams = record
    try:
        jax.export.export(jax.jit(product), platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, q)
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
        pallas_gpu.pl_triton.CompilerParams = compiler_params
    return captured[-1], params[-1]


def report(ir: str, num_warps: int, num_stages: int, keep: pathlib.Path | None = None) -> dict:
    """Compile Triton IR for sm_90; registers and spills from ptxas, instruction counts from the PTX
    (the PTX and the machine code written to ``keep.ptx`` / ``keep.sass`` where given)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d) / "kernel.ttir"
        src.write_text(_ttir_passes(ir, pathlib.Path(d) / "pallas.ttir"))
        kernel = triton.compile(str(src), target=GPUTarget("cuda", ARCH, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        ptx = kernel.asm["ptx"]
        (pathlib.Path(d) / "kernel.ptx").write_text(ptx)
        tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        cubin = str(pathlib.Path(d) / "kernel.cubin")
        out = subprocess.run([_ptxas(tools), f"-arch=sm_{ARCH}a", "-v", str(pathlib.Path(d) / "kernel.ptx"),
                              "-o", cubin], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    if keep:
        keep.with_suffix(".ptx").write_text(ptx)
        keep.with_suffix(".sass").write_text(sass)
    used = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    ops = collections.Counter(line.split()[0] for line in ptx.splitlines()
                              if re.match(r"\s+[a-z]", line) and not line.strip().startswith("//"))
    lines = sass_lines(sass)
    machine = collections.Counter(op for _, op, _ in lines)
    loops = loop_bodies(lines)
    loop = loops[0] if loops else collections.Counter()
    registers = int(used.group(1)) if used else None
    return {
        "registers": registers,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": kernel.metadata.shared,
        "programs_per_sm": programs_per_sm(registers, num_warps, kernel.metadata.shared),
        "int_to_float": sum(c for op, c in ops.items() if re.match(r"cvt\.rn\.(f|bf)\d+(x2)?\.[su]\d+$", op)),
        "conversions": sum(c for op, c in ops.items() if op.startswith("cvt.")),
        "mma": sum(c for op, c in ops.items() if "mma" in op),
        "bf16x2_arith": sum(c for op, c in ops.items() if "bf16x2" in op and not op.startswith("cvt")),
        "vector_loads": sum(c for op, c in ops.items() if op.startswith("ld.global") and ".v4" in op),
        "cp_async": sum(c for op, c in ops.items() if op.startswith("cp.async")),
        # Hopper wgmma: how many groups each wait leaves in flight (only 0: every dot waited for, no overlap)
        "wgmma_waits": sorted({int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+);", ptx)}),
        "sass": {op: machine[op] for op in ("I2F", "F2F", "HADD2", "FADD", "FFMA", "HMMA", "HGMMA", "LOP3")
                 if machine[op]},
        "inner_loop": {"instructions": sum(loop.values()), **dict(loop.most_common(6)), "BAR": loop["BAR"]},
        "loops": [sum(body.values()) for body in loops],
    }


def _ptxas(tools: pathlib.Path) -> str:
    """The ptxas Triton itself runs for sm_90, which reads the PTX version it writes (Triton 3.9 writes PTX
    9.4 and bundles a CUDA 12.8 ``ptxas`` beside a CUDA 13 ``ptxas-blackwell``, which it picks)."""
    from triton.backends.nvidia import compiler

    if not hasattr(compiler, "get_ptxas"):
        return str(tools / "ptxas")
    try:
        return compiler.get_ptxas(ARCH).path
    except TypeError:  # (Triton releases whose get_ptxas takes no architecture)
        return compiler.get_ptxas().path


def _ttir_passes(ir: str, path: pathlib.Path) -> str:
    """``ir`` after Triton's own Triton-IR passes (canonicalize, combine -- which folds ``acc + dot(a, b, 0)``
    into ``dot(a, b, acc)`` --, broadcast reordering, CSE, loop unrolling). ``triton.compile`` skips the first
    stage's passes for an IR file, but the device's compiler (XLA's Triton pipeline, modelled on
    ``make_ttir``) runs them on what Pallas hands it."""
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    context = triton_ir.context()
    triton_ir.load_dialects(context)
    backend.load_dialects(context)
    path.write_text(ir)
    module = triton_ir.parse_mlir_module(str(path), context)
    module.context = context
    return str(type(backend).make_ttir(module, {}, None, ARCH))


def programs_per_sm(registers: int | None, num_warps: int, shared: int) -> int | None:
    """How many programs (CTAs) of ``num_warps`` warps an H100 SM holds at once: 64K registers, allocated
    per warp in units of 256 (8 per thread), 64 warps, 227 KB of shared memory, 32 CTAs. What the
    loads in flight per SM scale with."""
    if registers is None:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    limits = [65536 // (per_warp * num_warps), 64 // num_warps, 32]
    if shared:
        limits.append(227 * 1024 // shared)
    return min(limits)


def sass_lines(sass: str) -> list[tuple[int, str, str]]:
    """``cuobjdump -sass`` text -> ``(address, opcode without modifiers, operands)`` per instruction,
    predicated ones included."""
    return [(int(a, 16), op.split(".")[0], rest) for a, op, rest in
            re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\d+\s+)?([A-Z0-9_.]+)([^;]*);", sass)]


def loop_bodies(lines: list[tuple[int, str, str]]) -> list[collections.Counter]:
    """The machine instructions of each loop (a branch back to a lower address) by opcode, innermost
    (shortest) first; an outer loop's count includes its inner loops' bodies once."""
    spans = sorted(((int(rest.split()[-1], 16), a) for a, op, rest in lines
                    if op == "BRA" and re.fullmatch(r"0x[0-9a-f]+", rest.strip()) and int(rest.split()[-1], 16) < a),
                   key=lambda span: span[1] - span[0])
    return [collections.Counter(op for a, op, _ in lines if lo <= a <= hi) for lo, hi in spans]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="M[,name=value...], e.g. 16,magic=True,block_n=128")
    ap.add_argument("--kn", type=int, default=8192)
    ap.add_argument("--format", default="int4", choices=list(FORMATS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--keep", type=pathlib.Path, help="a folder to write each kernel's PTX and SASS into")
    args = ap.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    for spec in args.specs:
        m, *pairs = spec.split(",")
        blocks = {}
        for pair in pairs:
            name, value = pair.split("=")
            blocks[name] = value == "True" if value in ("True", "False") else int(value)
        ir, params = triton_ir(int(m), args.kn, blocks, args.format, jnp.dtype(args.dtype))
        keep = args.keep / spec.replace(",", "_").replace("=", "-") if args.keep else None
        facts = report(ir, params.get("num_warps") or 4, params.get("num_stages") or 3, keep)  # (None: Triton's defaults)
        print(f"M={m} {blocks or 'default tiles'}: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)


if __name__ == "__main__":
    main()
