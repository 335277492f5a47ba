"""Build checks of the CUDA backend that need no GPU (DESIGN.md, "Verifying GPU code without a GPU").

* every csrc/cuda/*.cu compiles for sm_80 and sm_90 with the flags setup.py uses, and ptxas reports no spill
  stores/loads and no stack frame for any function;
* the SASS of every (param, state) dtype pair's kernels has 128-bit global loads and stores of every array on the
  vector (16-byte aligned) path, and the scalar path exists;
* the launch planner (csrc/cuda/launch_plan.h, plain C++) packs chunks into launches correctly, 2^31+ element
  tensors included (compiled with g++ into a small driver);
* the kernel and its launcher run on the CPU: csrc/cuda's host code and kernel body compiled as host C++ (g++, CUDA
  headers only), blocks and threads run one after another, on CPU tensors, through FusedAdam and the parity table;
  everything of the CUDA path runs except the `<<<>>>` launches and the torch binding; the options beyond torch
  (master weights, state dtypes, stochastic rounding, clipping) against the reference backend and
  tests/test_beyond_torch.py's torch compositions, and the stochastic rounding bitwise the reference's;
* the torch binding (csrc/cuda/ops_cuda.cpp) passes a syntax check against this torch's headers (CPU torch ships
  the ATen/c10 CUDA headers; the CUDA math libraries' headers are stubbed).

The .cu files are compiled once per session into a temporary directory, all of them in parallel: 360 kernels x 2
archs, ~3 min of CPU (~4 min on this machine's 2 cores while other builds ran).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import ctypes

import pytest
import torch

from conftest import requires_nvcc
from fused_adam import FusedAdam, backends
from fused_adam.backends import cuda as cuda_backend
from parity import DTYPES, OPTIM_INPUTS, assert_parity, make_grads, make_params

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")

def _nvcc_flags() -> list[str]:
    """setup.py's nvcc flags plus the ones torch's CUDAExtension adds (no implicit half/bfloat16 conversions)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:  # pragma: no cover - older torch
        COMMON_NVCC_FLAGS = []
    return ["-O3", "-std=c++17", "--fmad=false", *COMMON_NVCC_FLAGS]


NVCC_FLAGS = _nvcc_flags()
MODES = 3 * 2 * 2 * 2  # weight decay x amsgrad x unscale x vector (maximize and clipping are a runtime coefficient)
# adam_cuda_<stem>.cu: (param, state) storage types and the (master, stochastic rounding) layouts compiled for them,
# as adam_kernel.cuh's Layout::kValid has it: masters for 16-bit params, stochastic rounding where a bf16 store is
# the only copy of a value (a param without a master, a state).
PAIRS = {
    "f32": ("float", "float"), "f64": ("double", "double"), "bf16": ("bf16", "bf16"), "f16": ("half", "half"),
    "f32_bf16": ("float", "bf16"), "bf16_f32": ("bf16", "float"), "f16_f32": ("half", "float"),
}
SIZE = {"float": 4, "double": 8, "bf16": 2, "half": 2}


def layouts(stem: str) -> list[tuple[bool, bool]]:
    p, s = PAIRS[stem]
    return [(master, sr) for master in (False, True) for sr in (False, True)
            if (not master or SIZE[p] == 2) and (not sr or (p == "bf16" and not master) or s == "bf16")]


def kernels_per_file(stem: str) -> int:
    return MODES * len(layouts(stem))

requires_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


def _cuobjdump() -> str | None:
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except Exception:
        pass
    return shutil.which("cuobjdump")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """{file stem: (object path, ptxas report)}: every .cu file compiled once for all ARCHS, in parallel."""
    out = tmp_path_factory.mktemp("cuda_build")
    gencodes = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    jobs = {}
    for cu in CU_FILES:
        obj = out / f"{cu.stem}.o"  # a host object with the cubins embedded, as setup.py builds
        cmd = ["nvcc", "-c", *gencodes, *NVCC_FLAGS, "-Xcompiler", "-fPIC", f"-I{CSRC}", "-Xptxas", "-v", str(cu), "-o", str(obj)]
        jobs[cu.stem] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for stem, (obj, proc) in jobs.items():
        log, _ = proc.communicate()
        assert proc.returncode == 0, f"nvcc failed on {stem}:\n{log}"
        results[stem] = (obj, log)
    return results


def _ptxas_functions(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """Per (arch, function) of a `-Xptxas -v` report: registers, stack, spill stores, spill loads. ptxas reports one
    arch after the other; a function is attributed to the arch of the last entry function named before it."""
    funcs: dict[tuple[str, str], dict[str, int]] = {}
    current, arch = None, "?"
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            arch = m.group(2)
            current = funcs.setdefault((arch, m.group(1)), {})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = funcs.setdefault((arch, m.group(1)), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return funcs


def test_there_are_cuda_sources():
    stems = {cu.stem for cu in CU_FILES}
    assert {"adam_cuda"} | {f"adam_cuda_{p}" for p in PAIRS} == stems, stems
    assert sum(kernels_per_file(p) for p in PAIRS) == 360  # compile time: see the module's docstring


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_or_stack(compiled, arch):
    for cu in CU_FILES:
        _, log = compiled[cu.stem]
        funcs = {name: f for (a, name), f in _ptxas_functions(log).items() if a == arch}
        assert funcs, f"no ptxas report for {cu.name} ({arch}):\n{log}"
        kernels = [f for f in funcs if "adam_step_kernel" in f]
        if cu.stem.startswith("adam_cuda_"):
            assert len(kernels) == kernels_per_file(cu.stem[len("adam_cuda_"):]), (cu.name, arch, len(kernels))
        for name, f in funcs.items():
            bad = {k: f.get(k) for k in ("stack", "spill_stores", "spill_loads") if f.get(k, 0) != 0}
            assert not bad, f"{cu.name} {arch}: {name} has {bad}"
            if "registers" in f:
                assert f["registers"] <= 128, (name, f)  # __launch_bounds__(512): 65536 / 512


@requires_nvcc
@requires_gxx
def test_objects_link_into_one_library(compiled, tmp_path):
    """The per-dtype instantiations, extern templates and the cross-file increment kernel resolve: what is left
    undefined in the shared library is the CUDA runtime's and the C++ runtime's, none of ours."""
    objs = [str(compiled[cu.stem][0]) for cu in CU_FILES]
    lib = tmp_path / "libfused_adam_cuda.so"
    subprocess.run(["g++", "-shared", *objs, "-o", str(lib)], check=True)
    undefined = subprocess.run(["nm", "-C", "-u", str(lib)], check=True, capture_output=True, text=True).stdout
    ours = [line for line in undefined.splitlines() if "fused_adam" in line]
    assert not ours, "\n".join(ours)
    defined = subprocess.run(["nm", "-C", "-D", "--defined-only", str(lib)], check=True, capture_output=True, text=True).stdout
    assert "fused_adam::cuda::adam_step_cuda" in defined


def _sass_functions(sass: str, arch: str) -> dict[str, str]:
    """Function name -> SASS text, for the cubin of `arch` in a cuobjdump --dump-sass listing."""
    sections = re.split(r"^\s*code for (sm_\d+)\s*$", sass, flags=re.M)
    text = "".join(body for a, body in zip(sections[1::2], sections[2::2]) if a == arch)
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


LDG_128 = re.compile(r"\bLDG\.E(?:\.\w+)*\.128\b")
STG_128 = re.compile(r"\bSTG\.E(?:\.\w+)*\.128\b")
SCALAR_LDG = re.compile(r"\bLDG\.E(?:\.(?!128\b)\w+)*\s")
# adam_step_kernel<P, S, WD, AMSGRAD, UNSCALE, MASTER, SR, VECTOR>, mangled; S is a back reference when it is P.
_TYPE = r"(f|d|13__nv_bfloat16|6__half|S\d*_)"
KERNEL_ARGS = re.compile(r"adam_step_kernelI" + _TYPE + _TYPE + r"LNS_11WeightDecayE(\d)E" + r"Lb([01])E" * 5)
_MANGLED = {"f": "float", "d": "double", "13__nv_bfloat16": "bf16", "6__half": "half"}


def _kernel_args(name: str) -> dict:
    m = KERNEL_ARGS.search(name)
    assert m, name
    p = _MANGLED[m.group(1)]
    s = p if m.group(2).startswith("S") else _MANGLED[m.group(2)]
    amsgrad, unscale, master, sr, vector = (m.group(i) == "1" for i in range(4, 9))
    return dict(p=p, s=s, amsgrad=amsgrad, unscale=unscale, master=master, sr=sr, vector=vector)


def _pieces(k: dict) -> tuple[int, int]:
    """128-bit accesses per vector iteration: (loads, stores). A thread moves 16 B of the narrowest array; an fp32
    array beside 16-bit ones moves 32 B (two pieces)."""
    vec = 16 // min(SIZE[k["p"]], SIZE[k["s"]])
    n = lambda t: vec * SIZE[t] // 16  # noqa: E731
    states = (3 if k["amsgrad"] else 2) * n(k["s"])
    loads = n(k["p"]) * (1 if k["master"] else 2) + states + (n("float") if k["master"] else 0)
    stores = n(k["p"]) * (2 if k["unscale"] else 1) + states + (n("float") if k["master"] else 0)
    return loads, stores


@requires_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (triton wheel or CUDA toolkit)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem", list(PAIRS))
def test_vector_path_has_128bit_accesses(compiled, arch, stem):
    """Every array of the aligned path moves in 128-bit accesses (fp32 params and states: LDG.E.128/STG.E.128 as
    before; fp32 beside 16-bit arrays: two per thread), and the unaligned path has none."""
    obj, _ = compiled[f"adam_cuda_{stem}"]
    sass = subprocess.run([_cuobjdump(), "--dump-sass", str(obj)], check=True, capture_output=True, text=True).stdout
    funcs = {name: body for name, body in _sass_functions(sass, arch).items() if "adam_step_kernel" in name}
    assert len(funcs) == kernels_per_file(stem), sorted(funcs)
    vector = {n: b for n, b in funcs.items() if _kernel_args(n)["vector"]}
    scalar = {n: b for n, b in funcs.items() if not _kernel_args(n)["vector"]}
    assert len(vector) == len(scalar) == kernels_per_file(stem) // 2
    for name, body in vector.items():
        k = _kernel_args(name)
        assert (k["p"], k["s"]) == PAIRS[stem], (name, k)
        loads, stores = _pieces(k)
        assert len(LDG_128.findall(body)) >= loads, f"{arch} {name} {k}: fewer than {loads} 128-bit loads\n{body[:4000]}"
        assert len(STG_128.findall(body)) >= stores, f"{arch} {name} {k}: fewer than {stores} 128-bit stores"
    for name, body in scalar.items():
        assert SCALAR_LDG.search(body), f"{arch} {name}: no element-wise loads on the unaligned path"
        assert not STG_128.search(body), f"{arch} {name}: 128-bit store on the unaligned path"


# ---- the launch planner, on the host ---------------------------------------------------------------------------

PLAN_DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include "cuda/launch_plan.h"
// stdin: chunk_size max_tensors max_blocks count, then count lines "numel vector_ok".
// stdout: per launch "L vector", then "S tensor first" per slot and "B slot chunk" per block; or "E message".
int main() {
  long long chunk_size; int max_tensors, max_blocks; long long count;
  std::cin >> chunk_size >> max_tensors >> max_blocks >> count;
  std::vector<int64_t> numels(count); std::vector<bool> ok(count);
  for (long long i = 0; i < count; ++i) { long long n; int v; std::cin >> n >> v; numels[i] = n; ok[i] = v != 0; }
  try {
    for (const auto& l : fused_adam::cuda::plan_launches(numels, ok, chunk_size, max_tensors, max_blocks)) {
      std::printf("L %d\n", l.vector ? 1 : 0);
      for (const auto& s : l.slots) std::printf("S %lld %d\n", (long long)s.tensor, s.first ? 1 : 0);
      for (const auto& b : l.blocks) std::printf("B %d %d\n", b.slot, b.chunk);
    }
  } catch (const std::invalid_argument& e) { std::printf("E %s\n", e.what()); }
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan_driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    src, exe = out / "plan_driver.cpp", out / "plan_driver"
    src.write_text(PLAN_DRIVER)
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)

    def plan(numels, vector_ok, chunk_size, max_tensors, max_blocks):
        stdin = f"{chunk_size} {max_tensors} {max_blocks} {len(numels)}\n" + "".join(
            f"{n} {int(v)}\n" for n, v in zip(numels, vector_ok)
        )
        text = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout
        if text.startswith("E "):
            raise ValueError(text[2:].strip())
        launches = []
        for line in text.splitlines():
            kind, *vals = line.split()
            if kind == "L":
                launches.append({"vector": vals[0] == "1", "slots": [], "blocks": []})
            elif kind == "S":
                launches[-1]["slots"].append((int(vals[0]), vals[1] == "1"))
            else:
                launches[-1]["blocks"].append((int(vals[0]), int(vals[1])))
        return launches

    return plan


def _check_plan(launches, numels, vector_ok, chunk_size, max_tensors, max_blocks):
    covered = {t: [] for t in range(len(numels))}
    firsts = {t: [] for t in range(len(numels))}
    for li, launch in enumerate(launches):
        slots, blocks = launch["slots"], launch["blocks"]
        assert slots, f"launch {li} is empty"
        assert len(slots) <= max_tensors and len(blocks) <= max_blocks, (li, len(slots), len(blocks))
        for si, (t, first) in enumerate(slots):
            assert vector_ok[t] == launch["vector"], (li, t)
            if first:
                firsts[t].append(li)
            if numels[t] > 0:
                assert any(b[0] == si for b in blocks), f"launch {li} slot {si} (tensor {t}) has no block"
        for slot, chunk in blocks:
            covered[slots[slot][0]].append(chunk)
    for t, n in enumerate(numels):
        assert len(firsts[t]) == 1, f"tensor {t} is first in launches {firsts[t]}"
        appearances = [li for li, l in enumerate(launches) if any(s[0] == t for s in l["slots"])]
        assert firsts[t][0] == appearances[0], f"tensor {t}: step incremented after a launch that reads it"
        assert sorted(covered[t]) == list(range(-(-n // chunk_size))), f"tensor {t}: chunks {covered[t][:10]}..."


@requires_gxx
def test_plan_small_tables(plan_driver):
    import random

    rng = random.Random(0)
    for trial in range(30):
        numels = [rng.choice([0, 1, 7, 8, 9, 15, 16, 17, 40, 65]) for _ in range(rng.randint(1, 12))]
        vector_ok = [rng.random() < 0.7 for _ in numels]
        args = (8, rng.randint(1, 4), rng.randint(1, 6))
        _check_plan(plan_driver(numels, vector_ok, *args), numels, vector_ok, *args)


@requires_gxx
def test_plan_real_limits_more_tensors_than_one_launch(plan_driver):
    numels = [1000] * 70 + [0] * 5 + [65536 * 3 + 1] * 3
    vector_ok = [i % 3 != 0 for i in range(len(numels))]
    args = (65536, 32, 320)
    launches = plan_driver(numels, vector_ok, *args)
    _check_plan(launches, numels, vector_ok, *args)
    assert [l["vector"] for l in launches] == sorted((l["vector"] for l in launches), reverse=True)
    assert len(launches) >= 3


@requires_gxx
def test_plan_tensor_over_2_31_elements(plan_driver):
    numels = [5, 2**31 + 5, 3]
    args = (65536, 32, 320)
    launches = plan_driver(numels, [True] * 3, *args)
    _check_plan(launches, numels, [True] * 3, *args)
    last = max(c for l in launches for s, c in l["blocks"] if l["slots"][s][0] == 1)
    assert last == 2**31 // 65536  # the 5-element tail chunk, at element offset 2^31
    assert len(launches) == -(-(2 + 2**31 // 65536 + 1) // 320)


@requires_gxx
def test_plan_rejects_what_the_kernel_cannot_index(plan_driver):
    with pytest.raises(ValueError, match="more than 2\\^31 chunks"):
        plan_driver([8 * 2**31 + 1], [True], 8, 32, 320)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        plan_driver([8], [True], 0, 32, 320)


# ---- the torch binding ------------------------------------------------------------------------------------------

# The CUDA library headers ATen/cuda/CUDAContext.h includes (declarations it needs only).
STUBS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
    "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\nconst char* cusparseGetErrorString(cusparseStatus_t);\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


@requires_gxx
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA runtime headers (nvcc's include dir)")
def test_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    for name, text in STUBS.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n" + text)
    cmd = [
        "g++", "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra",  # the standard setup.py builds the binding in
        *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
        f"-I{_cuda_include()}", f"-I{tmp_path}", f"-I{CSRC}",
        "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
        str(CSRC / "cuda" / "ops_cuda.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ours = [l for l in proc.stderr.splitlines() if "warning" in l and "ops_cuda.cpp" in l]
    assert not ours, "\n".join(ours)


# ---- the kernel, emulated on the CPU ------------------------------------------------------------------------------

EMULATOR = r"""
// CPU emulation of the CUDA launcher (csrc/cuda): plan_step + run_plan + adam_step_kernel and increment_steps,
// compiled as host code; a launch runs its blocks and their threads one after another. Everything of the CUDA
// path runs except the <<<>>> launches themselves.
#define __global__
#define __device__
#define __host__
#define __shared__ static  // one instance per kernel instantiation: thread 0 writes it before the others read
#include <cuda_runtime.h>
#undef __launch_bounds__
#define __launch_bounds__(...)
struct EmuIndex { unsigned x = 0, y = 0, z = 0; };
static EmuIndex threadIdx, blockIdx;
static inline void __syncthreads() {}
#include <algorithm>
#include <cstring>
#include <exception>
#include "cuda/adam_kernel.cuh"

using namespace fused_adam;
using namespace fused_adam::cuda;

template <typename P, typename S>
static void emulate(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o) {
  run_plan<P, S>(
      tensors, plan, o,
      [&](auto kernel, unsigned grid, const auto& args) {
        for (unsigned b = 0; b < grid; ++b) {
          blockIdx.x = b;
          for (int t = 0; t < kBlockThreads; ++t) {
            threadIdx.x = static_cast<unsigned>(t);
            kernel(args);
          }
        }
        return cudaSuccess;
      },
      [&](const IncrementArgs& inc) {
        for (int t = 0; t < kMaxTensors; ++t) increment_steps(inc, t);
        return cudaSuccess;
      });
}

// stats: [launches, vector launches with blocks, scalar launches with blocks, blocks, sizeof(LaunchArgs),
//         most slots in one launch].
extern "C" int fa_emulate_step(int param_dtype, int state_dtype, int64_t n, void** params, void** grads,
                               void** exp_avgs, void** exp_avg_sqs, void** max_exp_avg_sqs, void** masters,
                               const uint64_t* tensor_ids, const int64_t* numels, float** steps_device,
                               const double* steps, const double* hyper, const double* lr_device, int decoupled,
                               int amsgrad, int maximize, int capturable, const float* grad_scale,
                               const float* found_inf, const float* clip_coef, int master_weights,
                               int stochastic_rounding, uint64_t seed, int64_t chunk_size, int64_t* stats, char* err,
                               int err_len) {
  try {
    std::vector<AdamTensor> tensors(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      tensors[i] = AdamTensor{params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                              amsgrad ? max_exp_avg_sqs[i] : nullptr, numels[i],
                              capturable ? steps_device[i] : nullptr, capturable ? 0.0 : steps[i],
                              master_weights ? static_cast<float*>(masters[i]) : nullptr,
                              stochastic_rounding ? tensor_ids[i] : 0};
    }
    AdamStepOptions o;
    o.hyper = AdamHyper{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4]};
    o.decoupled = decoupled;
    o.amsgrad = amsgrad;
    o.maximize = maximize;
    o.capturable = capturable;
    o.lr_device = lr_device;
    o.grad_scale = grad_scale;
    o.found_inf = found_inf;
    o.clip_coef = clip_coef;
    o.master_weights = master_weights;
    o.stochastic_rounding = stochastic_rounding;
    o.seed = seed;
    o.chunk_size = chunk_size;
    o.decay = hyper[5];
    const DType pd = static_cast<DType>(param_dtype), sd = static_cast<DType>(state_dtype);
    const std::vector<PlannedLaunch> plan = plan_step(tensors.data(), n, pd, sd, o);
    stats[0] = static_cast<int64_t>(plan.size());
    stats[1] = stats[2] = stats[3] = stats[5] = 0;
    for (const PlannedLaunch& l : plan) {
      if (!l.blocks.empty()) ++stats[l.vector ? 1 : 2];
      stats[3] += static_cast<int64_t>(l.blocks.size());
      stats[5] = std::max(stats[5], static_cast<int64_t>(l.slots.size()));
    }
    const bool ext = o.master_weights || o.stochastic_rounding;
    dispatch_pair(pd, sd, [&](auto param, auto state) {
      using P = typename decltype(param)::type;
      using O = opmath_t<P>;
      emulate<P, typename decltype(state)::type>(tensors.data(), plan, o);
      stats[4] = ext ? sizeof(LaunchArgs<O, true>) : sizeof(LaunchArgs<O, false>);
      return 0;
    });
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), static_cast<size_t>(err_len) - 1);
    err[err_len - 1] = 0;
    return 1;
  }
  return 0;
}
"""

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # cuda::DType


def _dense(t) -> bool:
    """at::Tensor::is_non_overlapping_and_dense: some order of the dims makes the strides contiguous ones."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t, like) -> bool:
    return all(size == 1 or a == b for size, a, b in zip(t.shape, t.stride(), like.stride()))


class EmulatedCuda:
    """A backend module (NAME, FEATURES, unavailable, unsupported, step) whose step is ops_cuda.cpp's, written in
    Python, with the launcher and kernel emulated on CPU tensors ("device memory" is CPU memory). It declines what
    backends/cuda.py declines, except for the device."""

    NAME = "cuda"
    FEATURES = cuda_backend.FEATURES

    def __init__(self, lib, chunk_size: int = 0):
        self.lib, self.chunk_size, self.stats = lib, chunk_size, []

    def unavailable(self):
        return None

    def unsupported(self, device, dtype, hp):
        return cuda_backend.unsupported_options(dtype, hp)

    def step(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp, grad_scale, found_inf,
             *, master_params=None, tensor_ids=None, clip_coef=None):
        n = len(params)
        if n == 0:
            return
        lr, lr_device = hp.lr, None
        decay = float("nan")
        if isinstance(lr, torch.Tensor) and hp.decoupled and hp.weight_decay != 0 and not hp.capturable:
            decay = (1 - lr * hp.weight_decay).item()  # as backends/cuda.py: in lr's dtype, as torch does
        if isinstance(lr, torch.Tensor):
            if hp.capturable:
                lr_device, lr = lr.to(torch.float64).reshape(()).clone(), 0.0
            else:
                lr = lr.item()
        beta1, beta2 = (float(b) for b in (hp.beta1, hp.beta2))
        scale = grad_scale.to(torch.float32).reshape(()).clone() if grad_scale is not None else None
        inf = found_inf.to(torch.float32).reshape(()).clone() if found_inf is not None else None
        clip = clip_coef.to(torch.float32).reshape(()).clone() if clip_coef is not None else None
        if not hp.capturable and inf is not None:
            if inf.item() != 0:
                return
            inf = None
        master, sr = bool(master_params), hp.stochastic_rounding
        bufs, write_backs, keep = [[] for _ in range(6)], [], []
        for i in range(n):
            p = params[i]
            # Stochastic rounding's bits follow the row-major element index: the contiguous order.
            ok = p.is_contiguous() if sr else _dense(p)
            layout = p if ok else p.contiguous()
            if layout is not p:
                write_backs.append((layout, p))
            roles = [(layout, False), (grads[i], scale is not None), (exp_avgs[i], True), (exp_avg_sqs[i], True)]
            roles.append((max_exp_avg_sqs[i], True) if hp.amsgrad else (None, False))
            roles.append((master_params[i], True) if master else (None, False))
            for r, (t, written) in enumerate(roles):
                if t is None or p.numel() == 0:
                    bufs[r].append(None)
                    continue
                if r > 0 and not _same_layout(t, layout):
                    copy = torch.empty_strided(layout.shape, layout.stride(), dtype=t.dtype)
                    copy.copy_(t)
                    if written:
                        write_backs.append((copy, t))
                    t = copy
                keep.append(t)
                bufs[r].append(t.data_ptr())
        new_steps = [float(s.item() + 1) for s in state_steps] if not hp.capturable else None
        c = ctypes
        ptrs = lambda xs: (c.c_void_p * n)(*xs)  # noqa: E731
        addr = lambda t: c.c_void_p(t.data_ptr() if t is not None else None)  # noqa: E731
        stats, err = (c.c_int64 * 6)(), c.create_string_buffer(512)
        rc = self.lib.fa_emulate_step(
            _DTYPE_CODES[params[0].dtype], _DTYPE_CODES[exp_avgs[0].dtype], n, *(ptrs(b) for b in bufs),
            (c.c_uint64 * n)(*(tensor_ids if sr else [0] * n)),
            (c.c_int64 * n)(*(p.numel() for p in params)),
            ptrs([s.data_ptr() for s in state_steps]),
            (c.c_double * n)(*(new_steps or [0.0] * n)),
            (c.c_double * 6)(float(lr), beta1, beta2, float(hp.eps), float(hp.weight_decay), decay),
            addr(lr_device), int(hp.decoupled), int(hp.amsgrad), int(hp.maximize), int(hp.capturable),
            addr(scale), addr(inf), addr(clip), int(master), int(sr), hp.seed,
            self.chunk_size, stats, err, 512,
        )
        assert rc == 0, err.value.decode()
        self.stats.append(list(stats))
        for buf, target in write_backs:
            target.copy_(buf)
        if new_steps is not None:
            for s, v in zip(state_steps, new_steps):
                s.fill_(v)


@pytest.fixture(scope="session")
def emulator_lib(tmp_path_factory):
    if shutil.which("g++") is None or _cuda_include() is None:
        pytest.skip("needs g++ and the CUDA runtime headers")
    out = tmp_path_factory.mktemp("emulator")
    src, lib = out / "emulator.cpp", out / "libemulator.so"
    src.write_text(EMULATOR)
    # -ffp-contract=off: the device code is compiled with --fmad=false; fma only where adam_math.h asks for one.
    subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{CSRC}",
                    f"-I{_cuda_include()}", str(src), "-o", str(lib)], check=True)
    handle = ctypes.CDLL(str(lib))
    c = ctypes
    handle.fa_emulate_step.restype = c.c_int
    handle.fa_emulate_step.argtypes = [
        c.c_int, c.c_int, c.c_int64, *[c.POINTER(c.c_void_p)] * 6, c.POINTER(c.c_uint64), c.POINTER(c.c_int64),
        c.POINTER(c.c_void_p), c.POINTER(c.c_double), c.POINTER(c.c_double), c.c_void_p, c.c_int, c.c_int, c.c_int,
        c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int, c.c_int, c.c_uint64, c.c_int64, c.POINTER(c.c_int64),
        c.c_char_p, c.c_int,
    ]
    return handle


@pytest.fixture
def emulated(emulator_lib, monkeypatch):
    """Install the emulated backend as "cuda" for FusedAdam(backend="cuda")."""

    def install(chunk_size: int = 0) -> EmulatedCuda:
        emu = EmulatedCuda(emulator_lib, chunk_size)
        monkeypatch.setitem(backends._modules, "cuda", emu)
        return emu

    return install


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_emulated_kernel_parity(emulated, optim_input, dtype, cls_name):
    """tests/parity.py's table, 20 steps, through FusedAdam(backend="cuda") with the emulated kernel."""
    emu = emulated()
    assert_parity("cuda", cls_name, optim_input.kwargs, dtype)
    assert emu.stats and all(s[4] <= 4096 for s in emu.stats)  # sizeof(LaunchArgs): the 4 KB parameter limit


def _train(params0, backend, steps=4, make=None, **kwargs):
    """`make()` builds the params (e.g. views into one buffer); by default fresh copies of params0."""
    params = make() if make else [p.detach().clone() for p in params0]
    params = [p.requires_grad_() for p in params]
    opt = FusedAdam(params, backend=backend, **kwargs)
    for s in range(steps):
        for p, g in zip(params, make_grads(params0, s)):
            p.grad = g.to(p.dtype)
        opt.step()
    return params, opt


def _assert_same_training(ours, ref, exact=False):
    (ours_p, ours_opt), (ref_p, ref_opt) = ours, ref
    tol = dict(atol=0, rtol=0) if exact else {}
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"param {i}: {m}")
        for k, v in ref_opt.state[b].items():
            torch.testing.assert_close(ours_opt.state[a][k].cpu(), v.cpu(), **tol, msg=lambda m: f"{k} of param {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_many_tensors_and_launches(emulated, dtype):
    """More tensors than one launch holds (32) and more chunks than one launch runs (320): chunk_size 8."""
    emu = emulated(chunk_size=8)
    shapes = [(n,) for n in (1, 7, 8, 9, 15, 16, 17, 0, 67, 129)] * 5 + [(2, 3, 4), (0, 3), (3000,)]
    params0 = make_params(dtype, shapes)
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    _assert_same_training(_train(params0, "cuda", **kwargs), _train(params0, "reference", **kwargs))
    launches, vector, scalar, blocks, _, _ = emu.stats[-1]
    assert vector >= 2 and blocks > 320 and scalar == 0, emu.stats[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_misaligned_and_strided(emulated, dtype):
    """Views at odd offsets take the scalar path; transposed params and grads with other strides are handled."""
    emu = emulated(chunk_size=16)
    base0 = make_params(dtype, [(1000,)])[0]
    whole = make_params(dtype, [(5, 7), (33,)])

    def make():
        base = base0.clone()
        views = [base[1:40], base[48:112], base[200:260].view(6, 10).t(), base[300:400].view(10, 10)[:, ::2]]
        return views + [w.clone() for w in whole]

    params0 = make()
    kwargs = dict(weight_decay=0.1, amsgrad=True)
    ours = _train(params0, "cuda", make=make, **kwargs)
    assert ours[0][0].storage_offset() == 1 and not ours[0][3].is_contiguous()
    _assert_same_training(ours, _train(params0, "reference", make=make, **kwargs))
    assert any(s[1] for s in emu.stats) and any(s[2] for s in emu.stats), emu.stats


def test_emulated_transposed_grad(emulated):
    emulated(chunk_size=16)
    params0 = make_params(torch.float32, [(6, 10), (13, 3)])
    results = []
    for backend in ("cuda", "reference"):
        params = [p.detach().clone().requires_grad_() for p in params0]
        opt = FusedAdam(params, backend=backend, lr=0.01)
        for s in range(3):
            for p, g in zip(params, make_grads(params0, s)):
                p.grad = g.t().contiguous().t()  # same values, column-major
            opt.step()
        results.append((params, opt))
    _assert_same_training(*results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_capturable_matches_host_scalars(emulated, dtype):
    """capturable: step and lr read "on the device", steps incremented by the increment kernel; the same
    make_step_scalars on the same values, so the result is bitwise the non-capturable one."""
    emulated(chunk_size=8)
    params0 = make_params(dtype, [(1,), (7,), (0,), (67,), (3, 5)] * 8)
    kwargs = dict(lr=torch.tensor(0.01), weight_decay=0.1, amsgrad=True, betas=(0.8, 0.95))
    _assert_same_training(_train(params0, "cuda", capturable=True, **kwargs), _train(params0, "cuda", **kwargs), exact=True)


@pytest.mark.parametrize("capturable", [False, True])
def test_emulated_amp(emulated, capturable):
    emulated(chunk_size=8)
    params0 = make_params(torch.float32, [(7,), (67,), (0,)])
    params = [p.detach().clone().requires_grad_() for p in params0]
    ref = [p.detach().clone().requires_grad_() for p in params0]
    opt = FusedAdam(params, backend="cuda", capturable=capturable, weight_decay=0.1)
    ref_opt = FusedAdam(ref, backend="reference", capturable=capturable, weight_decay=0.1)
    scale = torch.tensor(1024.0)
    for s in range(3):
        for p, r, g in zip(params, ref, make_grads(params0, s)):
            p.grad, r.grad = g * 1024, g * 1024
        opt.step(grad_scale=scale, found_inf=torch.tensor(0.0))
        ref_opt.step(grad_scale=scale, found_inf=torch.tensor(0.0))
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.grad, r.grad)  # unscaled in place
    before = [(p.detach().clone(), p.grad.clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0))
    for p, (p0, g0, st0) in zip(params, before):
        assert torch.equal(p.detach(), p0) and torch.equal(p.grad, g0)
        for k, v in st0.items():
            assert torch.equal(opt.state[p][k], v), k
    _assert_same_training((params, opt), (ref, ref_opt))


# ---- the options beyond torch, emulated --------------------------------------------------------------------------

import test_beyond_torch as beyond  # noqa: E402  (a module attribute: its tests are not collected again here)
from fused_adam.backends.reference import bf16_stochastic, sr_salt  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_master_weights_match_fp32_adam_on_the_master(emulated, dtype):
    emulated(chunk_size=8)
    beyond.test_master_weights_match_fp32_adam_on_the_master("cuda", dtype)


@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                      (torch.float16, torch.float32)], ids=str)
def test_emulated_state_dtype_matches_torch_composition(emulated, param_dtype, state_dtype):
    emulated(chunk_size=8)
    beyond.test_state_dtype_matches_torch_composition("cuda", param_dtype, state_dtype)


def test_emulated_stochastic_rounding_resume_is_bitwise(emulated, tmp_path):
    emulated(chunk_size=8)
    beyond.test_stochastic_rounding_resume_is_bitwise("cuda", tmp_path)


def test_emulated_stochastic_rounding_keeps_small_updates(emulated):
    emulated()
    beyond.test_stochastic_rounding_keeps_small_updates("cuda")


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_emulated_max_grad_norm_matches_clip_grad_norm_then_adam(emulated, max_norm):
    emulated(chunk_size=8)
    beyond.test_max_grad_norm_matches_clip_grad_norm_then_adam("cuda", max_norm)


# (param dtype, options): every layout the kernels compile (csrc/cuda/adam_kernel.cuh, Layout).
FEATURE_CASES = [
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.float32, dict(state_dtype=torch.bfloat16, stochastic_rounding=True)),
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True)),  # the states round stochastically
    (torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.bfloat16, dict(state_dtype=torch.float32)),
    (torch.bfloat16, dict(state_dtype=torch.float32, stochastic_rounding=True)),  # the params round stochastically
    (torch.bfloat16, dict(state_dtype=torch.float32, master_weights=True)),
    (torch.float16, dict(master_weights=True)),
    (torch.float16, dict(state_dtype=torch.float32)),
    (torch.float16, dict(state_dtype=torch.float32, master_weights=True)),
]
# Sizes that find bugs at chunk_size 16 (the vector path moves 8 elements per thread where an array is 16-bit):
# 1, a vector -1/+1, a chunk -1/+1, an empty tensor, a 2-D tensor, more tensors than a launch holds (28 or 32).
FEATURE_SHAPES = [(1,), (7,), (9,), (15,), (17,), (0,), (3, 11), (67,)] + [(5,), (40,)] * 14


def _feature_id(case):
    dtype, kw = case
    return str(dtype).replace("torch.", "") + "-" + "-".join(
        f"{k}={str(v).replace('torch.', '')}" if not isinstance(v, bool) else k for k, v in kw.items())


def _train_features(backend, dtype, kwargs, make, steps=4, max_grad_norm=None):
    params = [p.requires_grad_() for p in make()]
    opt = FusedAdam(params, backend=backend, max_grad_norm=max_grad_norm, **kwargs)
    for s in range(steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = (3 * g).to(p.dtype)
        opt.step()
    return params, opt


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else t


def _assert_features_match(ours, ref, rounded_clip=False):
    """Params, masters and states against the reference backend. The fp32 math of a step differs from torch's ops
    by a few fp32 roundings (addcdiv's form, fma), so a stored value is within an ulp of its dtype (assert_close's
    tolerance for fp32), and a 16-bit store, one rounding of nearly the same fp32 value, is mostly bitwise the
    reference's: with stochastic rounding that is what shows the bits are the reference's (wrong bits would still
    give one of the two neighbours, but half of them different).
    Two things make fp32 states differ by more than fp32 roundings, by up to an ulp of the param's dtype relative to
    the values they come from: a 16-bit param without a master that rounded to the other neighbour once (L2 decay
    and the next steps read it), and rounded_clip: the reference rounds a 16-bit grad times clip_coef to the grad's
    dtype (clip_grad_norm_'s in-place mul), adam_math.h keeps it in fp32."""
    (ours_p, ours_opt), (ref_p, ref_opt) = ours, ref
    same, total = {}, {}
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        pairs = [("param", a.detach(), b.detach())] + [
            (k, ours_opt.state[a][k], v) for k, v in ref_opt.state[b].items() if torch.is_tensor(v) and k != "step"]
        for name, x, y in pairs:
            assert x.dtype == y.dtype and x.shape == y.shape, (name, i)
            narrow_param = a.dtype != torch.float32 and "master_param" not in ours_opt.state[a]
            ulp = torch.finfo(a.dtype if rounded_clip or narrow_param else x.dtype).eps
            tol = dict(atol=ulp, rtol=ulp) if rounded_clip or narrow_param or x.dtype != torch.float32 else {}
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name} of param {i}: {m}")
            if x.element_size() == 2:
                same[name] = same.get(name, 0) + (_bits(x) == _bits(y)).sum().item()
                total[name] = total.get(name, 0) + x.numel()
    if not rounded_clip:
        for name in same:
            assert same[name] >= 0.95 * total[name], f"{name}: {same[name]} of {total[name]} bitwise the reference's"


@pytest.mark.parametrize("capturable", [False, True], ids=["host-scalars", "capturable"])
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, amsgrad=True, maximize=True),
                                     dict(weight_decay=0.1, decoupled_weight_decay=True, max_grad_norm=0.5)],
                         ids=["default", "l2-ams-max", "adamw-clip"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=_feature_id)
def test_emulated_features_match_reference(emulated, case, options, capturable):
    """Every compiled layout x modes x host/device scalars, aligned and misaligned tensors, many launches."""
    dtype, kw = case
    emu = emulated(chunk_size=16)
    options = dict(options)
    max_grad_norm = options.pop("max_grad_norm", None)
    kwargs = dict(lr=0.01, seed=7, capturable=capturable, **kw, **options)
    base0 = make_params(dtype, [(200,)])[0]
    whole0 = make_params(dtype, FEATURE_SHAPES)

    def make():
        base = base0.clone()  # views at odd offsets: the scalar path
        return [base[1:40], base[41:58].view(1, 17)] + [w.clone() for w in whole0]

    ours = _train_features("cuda", dtype, kwargs, make, max_grad_norm=max_grad_norm)
    ref = _train_features("reference", dtype, kwargs, make, max_grad_norm=max_grad_norm)
    assert {d.backend for d in ours[1].dispatch[0]} == {"cuda"}
    _assert_features_match(ours, ref, rounded_clip=max_grad_norm is not None and dtype != torch.float32)
    ext = kw.get("master_weights") or kw.get("stochastic_rounding")
    assert any(s[1] for s in emu.stats) and any(s[2] for s in emu.stats), emu.stats  # vector and scalar launches
    assert all(s[4] <= 4096 - 64 for s in emu.stats), emu.stats  # sizeof(LaunchArgs): the 4 KB parameter limit
    assert max(s[5] for s in emu.stats) == (28 if ext else 32), emu.stats  # slots per launch


@pytest.mark.parametrize("capturable", [False, True], ids=["host-salt", "device-salt"])
def test_emulated_stochastic_rounding_is_the_references_rounding(emulated, capturable):
    """Bitwise: one step from zero states of fp32 params with bf16 states gives exp_avg = SR((1 - beta1) * g) and
    exp_avg_sq = SR((1 - beta2) * g * g), each product one fp32 rounding, with the reference's bits for
    (seed, step 1, tensor id, stream) at each element's row-major index. Sizes cover the vector path, its scalar
    tail and a chunk boundary; tensor ids count over param groups."""
    emulated(chunk_size=64)
    shapes = [(1,), (300,), (5, 13), (64 * 3 + 9,)]
    params = [p.requires_grad_() for p in make_params(torch.float32, shapes)]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}]
    opt = FusedAdam(groups, betas=(0.8, 0.95), state_dtype=torch.bfloat16, stochastic_rounding=True, seed=2**63 + 5,
                    capturable=capturable, backend="cuda")
    grads = make_grads(params, 0)
    for p, g in zip(params, grads):
        p.grad = g * 100
    opt.step()
    one_minus = (torch.tensor(1 - 0.8, dtype=torch.float64).float(), torch.tensor(1 - 0.95, dtype=torch.float64).float())
    for tid, (p, g) in enumerate(zip(params, grads)):
        g = g * 100
        m = bf16_stochastic(one_minus[0] * g, sr_salt(2**63 + 5, 1, tid, 1))
        v = bf16_stochastic((one_minus[1] * g) * g, sr_salt(2**63 + 5, 1, tid, 2))
        assert torch.equal(_bits(opt.state[p]["exp_avg"]), _bits(m)), tid
        assert torch.equal(_bits(opt.state[p]["exp_avg_sq"]), _bits(v)), tid


def test_emulated_stochastic_rounding_capturable_is_bitwise_host(emulated):
    """Salts computed on the device from the device step = salts from the host: the same training, bit for bit."""
    emulated(chunk_size=8)
    params0 = make_params(torch.bfloat16, [(1,), (7,), (0,), (67,), (3, 5)] * 7)
    kwargs = dict(lr=torch.tensor(0.01), weight_decay=0.1, amsgrad=True, stochastic_rounding=True, seed=3)
    _assert_same_training(_train(params0, "cuda", capturable=True, **kwargs), _train(params0, "cuda", **kwargs),
                          exact=True)


def test_emulated_stochastic_rounding_of_a_transposed_param(emulated):
    """Bits follow the row-major index: a transposed (dense, not contiguous) param rounds as the reference does."""
    emulated(chunk_size=8)
    base0 = make_params(torch.bfloat16, [(12, 10)])[0]
    make = lambda: [base0.clone().t()]  # noqa: E731
    kwargs = dict(lr=1e-3, stochastic_rounding=True, seed=11)
    ours = _train_features("cuda", torch.bfloat16, kwargs, make)
    ref = _train_features("reference", torch.bfloat16, kwargs, make)
    assert not ours[0][0].is_contiguous()
    _assert_features_match(ours, ref)


def test_emulated_clip_is_read_on_the_device_under_amp(emulated):
    """clip_coef and grad_scale together: the grads are stored unscaled and unclipped; the update is clipped."""
    emulated(chunk_size=8)
    params0 = make_params(torch.float32, [(7,), (67,), (0,)])
    runs = []
    for backend in ("cuda", "reference"):
        params = [p.clone().requires_grad_() for p in params0]
        opt = FusedAdam(params, lr=0.1, max_grad_norm=0.5, backend=backend)
        for s in range(3):
            for p, g in zip(params, make_grads(params0, s)):
                p.grad = g * 1024
            opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
        runs.append((params, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    _assert_same_training(*runs)


def test_emulated_launcher_refuses_what_is_not_compiled(emulated):
    """The launcher's own checks (plan_step): a dtype pair without kernels, masters for fp32 params."""
    emu = emulated()
    p = [torch.zeros(4)]
    hp = beyond._hp()
    with pytest.raises(AssertionError, match="no kernel for float32 params with float16 states"):
        emu.step(p, [torch.zeros(4)], [torch.zeros(4, dtype=torch.float16)], [torch.zeros(4, dtype=torch.float16)], [],
                 [torch.zeros(())], hp, None, None)
    with pytest.raises(AssertionError, match="master weights need bfloat16 or float16 params, got float32"):
        emu.step(p, [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], [], [torch.zeros(())], hp, None, None,
                 master_params=[torch.zeros(4)])
