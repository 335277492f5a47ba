"""The Triton kernels compiled ahead of time for sm_80 and sm_90 (no GPU needed): 128-bit global accesses on the
16-byte-aligned path (the whole launch, or per chunk), and no spills, from the PTX and the ptxas shipped in the
triton wheel.

Each variant is compiled once per session (about 0.5 s each). Run with the interpreter off.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from functools import lru_cache

import pytest
import torch

from conftest import requires_triton

pytestmark = [
    requires_triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="ahead-of-time compilation, not the interpreter"),
]

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16", "fp64")
# Every mode flag off (AdamW, decoupled weight decay), and every flag on (the widest kernel: 5 arrays, grad store).
MODES = {
    "plain": dict(WD_MODE=2, AMSGRAD=False, MAXIMIZE=False, UNSCALE=False, HAS_FOUND_INF=False, SCALARS=0),
    "everything": dict(WD_MODE=1, AMSGRAD=True, MAXIMIZE=True, UNSCALE=True, HAS_FOUND_INF=True, SCALARS=2),
}
# 128-bit accesses: v4 of 32-bit words, or v2 of 64-bit words (fp64).
_VEC4_LOAD = re.compile(r"ld\.global(?:\.[\w:]+)*\.(?:v4\.(?:b32|f32|u32)|v2\.(?:b64|f64|u64))")
_VEC4_STORE = re.compile(r"st\.global(?:\.[\w:]+)*\.(?:v4\.(?:b32|f32|u32)|v2\.(?:b64|f64|u64))")
_SCALAR_LOAD = re.compile(r"ld\.global(?:\.(?!v[24]\b)[\w:]+)*\.[bfu](?:16|32|64)\b")


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, enable_fp_fusion=False, **options))


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of the kernel, from `ptxas -v` (the ptxas triton itself uses)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", path + ".o"],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    assert regs and spills and stack, log
    return dict(regs=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                stack=int(stack.group(1)), log=log)


def _adam_signature(math: str = "fp32") -> dict:
    signature = {"table": "*i64", "n_tensors": "i32", "n_chunks": "i32", "scal": f"*{math}", "grad_scale_ptr": "*fp32",
                 "found_inf_ptr": "*fp32", "clip_coef_ptr": "*fp32"}
    for name in ("neg_step_size", "bc2_sqrt", "one_minus_beta1", "beta2", "one_minus_beta2", "decay", "eps", "weight_decay"):
        signature[name] = "fp32"
    signature["sr_seed_key"] = "i32"
    signature["sr_step"] = "fp32"
    return signature


@lru_cache(maxsize=None)
def _adam_variant(types: tuple, aligned: bool, flags: tuple, arch: int):
    """types: dtype names of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq; flags: (name, value) constexprs."""
    import triton.language as tl

    from fused_adam.backends import triton as tb

    tl_types = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    tys = [tl_types[t] for t in types]
    math = "fp64" if types[0] == "fp64" else "fp32"
    flags = {"MASTER": False, "CLIP": False, "SR": False, **dict(flags)}
    if math == "fp64":
        flags["SCALARS"] = max(flags["SCALARS"], 1)  # fp64 scalars come from the device buffer
    constexprs = dict(zip(("P_TY", "G_TY", "M_TY", "V_TY", "X_TY"), tys), MATH_TY=tl_types[math], **flags, ALIGNED=aligned,
                      CHUNK=tb.GPU_CHUNK, BLOCK=tb.GPU_BLOCK, SOFT_BF16=False)
    options = tb._compile_options(torch.device("cuda"), flags["MASTER"], flags["SR"], aligned)  # as step() launches it
    k = _compile(tb._adam_kernel, _adam_signature(math), constexprs, arch, tb.GPU_WARPS, **options)
    return k.asm["ptx"], _ptxas_report(k.asm["ptx"], arch)


def _adam(dtype: str, aligned: bool, mode: str, arch: int):
    return _adam_variant((dtype,) * 5, aligned, tuple(MODES[mode].items()), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_path_is_128_bit(dtype, mode, arch):
    """Full tiles of the aligned variant load and store every array with 128-bit accesses (v4 of b32: 4 fp32 or
    8 bf16/fp16 per access; v2 of b64: 2 fp64); the masked tail tile stays scalar."""
    from fused_adam.backends import triton as tb

    ptx, _ = _adam(dtype, True, mode, arch)
    n_arrays_read = 5 if MODES[mode]["AMSGRAD"] else 4  # p, g, m, v (+ vmax)
    n_arrays_written = n_arrays_read - 1 + (1 if MODES[mode]["UNSCALE"] else 0)
    bytes_per_thread = tb.GPU_BLOCK // (32 * tb.GPU_WARPS) * {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[dtype]
    per_array = bytes_per_thread // 16
    assert len(_VEC4_LOAD.findall(ptx)) == n_arrays_read * per_array
    assert len(_VEC4_STORE.findall(ptx)) == n_arrays_written * per_array


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_launch_decides_per_chunk(dtype, mode, arch):
    """The variant that runs when some address of a launch is not 16-byte aligned checks each chunk's addresses:
    its aligned branch has exactly the aligned variant's 128-bit accesses, its other branch only scalar ones."""
    ptx, report = _adam(dtype, False, mode, arch)
    aligned, _ = _adam(dtype, True, mode, arch)
    assert len(_VEC4_LOAD.findall(ptx)) == len(_VEC4_LOAD.findall(aligned)) > 0
    assert len(_VEC4_STORE.findall(ptx)) == len(_VEC4_STORE.findall(aligned)) > 0
    assert len(_SCALAR_LOAD.findall(ptx)) > len(_SCALAR_LOAD.findall(aligned))
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report["log"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_spills(dtype, mode, arch):
    _, report = _adam(dtype, True, mode, arch)
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report["log"]
    assert report["regs"] <= 128, report["log"]  # 4 warps: well inside the 255-register limit, full occupancy at <= 64


# The options beyond torch (backends/__init__.py's FEATURES): dtype combinations (param, grad, exp_avg, exp_avg_sq,
# max_exp_avg_sq) x flags, plain and with every other flag on.
_EVERYTHING = MODES["everything"]
FEATURE_VARIANTS = {
    "fp32 params, bf16 states": (("fp32", "fp32", "bf16", "bf16", "bf16"), MODES["plain"]),
    "fp32 params, bf16 states, clip, SR, everything": (("fp32", "fp32", "bf16", "bf16", "bf16"), dict(_EVERYTHING, CLIP=True, SR=True)),
    "bf16 params, fp32 states": (("bf16", "bf16", "fp32", "fp32", "fp32"), MODES["plain"]),
    "fp32, clip, everything": (("fp32",) * 5, dict(_EVERYTHING, CLIP=True)),
    "bf16 params, fp32 states, clip, everything": (("bf16", "bf16", "fp32", "fp32", "fp32"), dict(_EVERYTHING, CLIP=True)),
    "bf16 params, fp32 master and states": (("bf16", "bf16", "fp32", "fp32", "fp32"), dict(MODES["plain"], MASTER=True)),
    "bf16 params, fp32 master and states, clip, everything": (("bf16", "bf16", "fp32", "fp32", "fp32"), dict(_EVERYTHING, MASTER=True, CLIP=True)),
    "fp16 params, fp32 master and states, clip, everything": (("fp16", "fp16", "fp32", "fp32", "fp32"), dict(_EVERYTHING, MASTER=True, CLIP=True)),
    "bf16, SR": (("bf16",) * 5, dict(MODES["plain"], SR=True)),
    "bf16, SR, clip, everything": (("bf16",) * 5, dict(_EVERYTHING, SR=True, CLIP=True)),
    "bf16 params, fp32 master, bf16 states, SR, everything": (("bf16",) * 5, dict(_EVERYTHING, MASTER=True, SR=True, CLIP=True)),
}


def _feature_variant(name: str, aligned: bool, arch: int):
    types, flags = FEATURE_VARIANTS[name]
    return _adam_variant(types, aligned, tuple(flags.items()), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(FEATURE_VARIANTS))
def test_feature_variants_aligned_path_is_128_bit(name, arch):
    """Every array of a full tile moves in 128-bit accesses whatever its own width: an fp32 array takes two v4
    per thread (8 elements), a bf16/fp16 array one. With MASTER the fp32 master is read instead of the param and
    both are written; SR's bit mixing happens in registers and leaves the stores vectorized."""
    from fused_adam.backends import triton as tb

    types, flags = FEATURE_VARIANTS[name]
    ptx, _ = _feature_variant(name, True, arch)
    per_thread = tb.GPU_BLOCK // (32 * tb.GPU_WARPS)
    v4 = {t: per_thread * {"fp32": 4, "bf16": 2, "fp16": 2}[t] // 16 for t in ("fp32", "bf16", "fp16")}
    p, g, m, v, x = (v4[t] for t in types)
    w = v4["fp32"] if flags.get("MASTER") else 0
    amsgrad = x if flags["AMSGRAD"] else 0
    reads = g + (w if w else p) + m + v + amsgrad
    writes = p + m + v + amsgrad + w + (g if flags["UNSCALE"] else 0)
    assert (len(_VEC4_LOAD.findall(ptx)), len(_VEC4_STORE.findall(ptx))) == (reads, writes)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "generic"])
@pytest.mark.parametrize("name", list(FEATURE_VARIANTS))
def test_feature_variants_no_spills(name, aligned, arch):
    ptx, report = _feature_variant(name, aligned, arch)
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report["log"]
    # 4 warps: full occupancy at <= 64; the unaligned variant holds both branches of the per-chunk decision
    assert report["regs"] <= (128 if aligned else 255), report["log"]
    if not aligned:  # decided per chunk: the aligned branch's 128-bit accesses, and scalar ones
        vectorized, _ = _feature_variant(name, True, arch)
        assert len(_VEC4_LOAD.findall(ptx)) == len(_VEC4_LOAD.findall(vectorized))
        assert len(_SCALAR_LOAD.findall(ptx)) > len(_SCALAR_LOAD.findall(vectorized))


@pytest.mark.parametrize("arch", ARCHS)
def test_stochastic_rounding_multiplies_wrap_mod_2_32(arch):
    """fmix32's and sr_bits' multiplies are 32-bit (mul.lo of 32-bit operands, which wraps mod 2^32 as
    csrc/rounding.h's uint32_t): no 64-bit widening of the hash."""
    ptx, _ = _feature_variant("bf16, SR", True, arch)
    muls = re.findall(r"mul\.lo\.(\w+)\s+[^,]+,\s*[^,]+,\s*(-?\w+);", ptx)
    constants = {str(c) for c in (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F)} | {str(c - (1 << 32)) for c in (0x85EBCA6B, 0xC2B2AE35)}
    hashed = [ty for ty, operand in muls if operand in constants]
    assert hashed and all(ty in ("s32", "u32") for ty in hashed), muls


@pytest.mark.parametrize("arch", ARCHS)
def test_capturable_step_kernel_compiles(arch):
    from fused_adam.backends import triton as tb

    signature = {"table": "*i64", "n_tensors": "i32", "scal": "*fp32", "found_inf_ptr": "*fp32", "lr_ptr": "*fp32",
                 "beta1_ptr": "*fp64", "beta2_ptr": "*fp64", "hyper_ptr": "*fp64"}
    k = _compile(tb._capturable_step_kernel, signature, dict(HAS_FOUND_INF=True, BLOCK=tb.STEP_BLOCK), arch, 4)
    report = _ptxas_report(k.asm["ptx"], arch)
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report["log"]


def test_aligned_fp32_sass_uses_128_bit_instructions():
    """The same promise one level down: the sm_90 cubin's SASS has LDG.E.128 / STG.E.128."""
    import triton.language as tl

    from fused_adam.backends import triton as tb

    cuobjdump = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("cuobjdump not shipped with this triton")
    signature = _adam_signature()
    ty = tl.float32
    constexprs = dict(P_TY=ty, G_TY=ty, M_TY=ty, V_TY=ty, X_TY=ty, MATH_TY=ty, **MODES["plain"], MASTER=False, CLIP=False,
                      SR=False, ALIGNED=True,
                      CHUNK=tb.GPU_CHUNK, BLOCK=tb.GPU_BLOCK, SOFT_BF16=False)
    k = _compile(tb._adam_kernel, signature, constexprs, 90, tb.GPU_WARPS)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cuobjdump cannot read this cubin: {out.stderr.strip()[:200]}")
    assert re.search(r"LDG\.E\.128", out.stdout), out.stdout[:2000]
    assert re.search(r"STG\.E\.128", out.stdout), out.stdout[:2000]
