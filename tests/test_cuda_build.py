"""Build checks of the CUDA backend that need no GPU (DESIGN.md, "Verifying GPU code without a GPU").

* every csrc/cuda/*.cu compiles for sm_80 and sm_90 with the flags setup.py uses, and ptxas reports no spill
  stores/loads and no stack frame for any function;
* the SASS of the fp32 kernels has 128-bit global loads and stores on the vector (16-byte aligned) path, and the
  scalar path exists;
* the launch planner (csrc/cuda/launch_plan.h, plain C++) packs chunks into launches correctly, 2^31+ element
  tensors included (compiled with g++ into a small driver);
* the kernel and its launcher run on the CPU: csrc/cuda's host code and kernel body compiled as host C++ (g++, CUDA
  headers only), blocks and threads run one after another, on CPU tensors, through FusedAdam and the parity table;
  everything of the CUDA path runs except the `<<<>>>` launches and the torch binding;
* the torch binding (csrc/cuda/ops_cuda.cpp) passes a syntax check against this torch's headers (CPU torch ships
  the ATen/c10 CUDA headers; the CUDA math libraries' headers are stubbed).

The .cu files are compiled once per session into a temporary directory, all of them in parallel (~25 s on 2 cores).
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
KERNELS_PER_DTYPE = 3 * 2 * 2 * 2 * 2  # weight decay x amsgrad x maximize x unscale x vector

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
    assert {"adam_cuda", "adam_cuda_f32", "adam_cuda_f64", "adam_cuda_bf16", "adam_cuda_f16"} <= stems, stems


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_or_stack(compiled, arch):
    for cu in CU_FILES:
        _, log = compiled[cu.stem]
        funcs = {name: f for (a, name), f in _ptxas_functions(log).items() if a == arch}
        assert funcs, f"no ptxas report for {cu.name} ({arch}):\n{log}"
        kernels = [f for f in funcs if "adam_step_kernel" in f]
        if cu.stem.startswith("adam_cuda_"):
            assert len(kernels) == KERNELS_PER_DTYPE, (cu.name, arch, len(kernels))
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
SCALAR_LDG = re.compile(r"\bLDG\.E(?:\.CONSTANT)?\s")
# adam_step_kernel<T, WD, AMSGRAD, MAXIMIZE, UNSCALE, VECTOR>: the last template bool is VECTOR.
VECTOR_FLAG = re.compile(r"adam_step_kernelI.*Lb([01])EEEv")


@requires_nvcc
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (triton wheel or CUDA toolkit)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem", ["adam_cuda_f32", "adam_cuda_bf16"])
def test_vector_path_has_128bit_accesses(compiled, arch, stem):
    obj, _ = compiled[stem]
    sass = subprocess.run([_cuobjdump(), "--dump-sass", str(obj)], check=True, capture_output=True, text=True).stdout
    funcs = {name: body for name, body in _sass_functions(sass, arch).items() if "adam_step_kernel" in name}
    assert len(funcs) == KERNELS_PER_DTYPE, sorted(funcs)
    vector = {n: b for n, b in funcs.items() if VECTOR_FLAG.search(n).group(1) == "1"}
    scalar = {n: b for n, b in funcs.items() if VECTOR_FLAG.search(n).group(1) == "0"}
    assert len(vector) == len(scalar) == KERNELS_PER_DTYPE // 2
    for name, body in vector.items():
        # p, g, m, v (+ vmax) are read 16 B at a time; p, m, v (+ g, vmax) are written 16 B at a time.
        assert len(LDG_128.findall(body)) >= 4, f"{arch} {name}: no 128-bit loads\n{body[:4000]}"
        assert len(STG_128.findall(body)) >= 3, f"{arch} {name}: no 128-bit stores"
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
        "g++", "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra",
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
#include <cstring>
#include <exception>
#include "cuda/adam_kernel.cuh"

using namespace fused_adam;
using namespace fused_adam::cuda;

template <typename T>
static void emulate(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o) {
  using O = opmath_t<T>;
  run_plan<T>(
      tensors, plan, o,
      [&](void (*kernel)(const LaunchArgs<O>), unsigned grid, const LaunchArgs<O>& args) {
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

// stats: [launches, vector launches with blocks, scalar launches with blocks, blocks, sizeof(LaunchArgs<O>)].
extern "C" int fa_emulate_step(int dtype, int64_t n, void** params, void** grads, void** exp_avgs, void** exp_avg_sqs,
                               void** max_exp_avg_sqs, const int64_t* numels, float** steps_device,
                               const double* steps, const double* hyper, const double* lr_device, int decoupled,
                               int amsgrad, int maximize, int capturable, const float* grad_scale,
                               const float* found_inf, int64_t chunk_size, int64_t* stats, char* err, int err_len) {
  try {
    std::vector<AdamTensor> tensors(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      tensors[i] = AdamTensor{params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                              amsgrad ? max_exp_avg_sqs[i] : nullptr, numels[i],
                              capturable ? steps_device[i] : nullptr, capturable ? 0.0 : steps[i]};
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
    o.chunk_size = chunk_size;
    o.decay = hyper[5];
    const std::vector<PlannedLaunch> plan = plan_step(tensors.data(), n, o);
    stats[0] = static_cast<int64_t>(plan.size());
    stats[1] = stats[2] = stats[3] = 0;
    for (const PlannedLaunch& l : plan) {
      if (!l.blocks.empty()) ++stats[l.vector ? 1 : 2];
      stats[3] += static_cast<int64_t>(l.blocks.size());
    }
    switch (static_cast<DType>(dtype)) {
      case DType::kFloat32: emulate<float>(tensors.data(), plan, o); stats[4] = sizeof(LaunchArgs<float>); break;
      case DType::kFloat64: emulate<double>(tensors.data(), plan, o); stats[4] = sizeof(LaunchArgs<double>); break;
      case DType::kBFloat16: emulate<__nv_bfloat16>(tensors.data(), plan, o); stats[4] = sizeof(LaunchArgs<float>); break;
      case DType::kFloat16: emulate<__half>(tensors.data(), plan, o); stats[4] = sizeof(LaunchArgs<float>); break;
      default: throw std::invalid_argument("unknown dtype");
    }
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
    """A backend module (NAME, unavailable, unsupported, step) whose step is ops_cuda.cpp's, written in Python, with
    the launcher and kernel emulated on CPU tensors ("device memory" is CPU memory)."""

    NAME = "cuda"

    def __init__(self, lib, chunk_size: int = 0):
        self.lib, self.chunk_size, self.stats = lib, chunk_size, []

    def unavailable(self):
        return None

    def unsupported(self, device, dtype, hp):
        return "differentiable=True" if hp.differentiable else None

    def step(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp, grad_scale, found_inf):
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
        if not hp.capturable and inf is not None:
            if inf.item() != 0:
                return
            inf = None
        bufs, write_backs, keep = [[] for _ in range(5)], [], []
        for i in range(n):
            p = params[i]
            layout = p if _dense(p) else p.contiguous()
            if layout is not p:
                write_backs.append((layout, p))
            roles = [(layout, False), (grads[i], scale is not None), (exp_avgs[i], True), (exp_avg_sqs[i], True)]
            roles.append((max_exp_avg_sqs[i], True) if hp.amsgrad else (None, False))
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
        stats, err = (c.c_int64 * 5)(), c.create_string_buffer(512)
        rc = self.lib.fa_emulate_step(
            _DTYPE_CODES[params[0].dtype], n, *(ptrs(b) for b in bufs),
            (c.c_int64 * n)(*(p.numel() for p in params)),
            ptrs([s.data_ptr() for s in state_steps]),
            (c.c_double * n)(*(new_steps or [0.0] * n)),
            (c.c_double * 6)(float(lr), beta1, beta2, float(hp.eps), float(hp.weight_decay), decay),
            c.c_void_p(lr_device.data_ptr() if lr_device is not None else None),
            int(hp.decoupled), int(hp.amsgrad), int(hp.maximize), int(hp.capturable),
            c.c_void_p(scale.data_ptr() if scale is not None else None),
            c.c_void_p(inf.data_ptr() if inf is not None else None),
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
        c.c_int, c.c_int64, *[c.POINTER(c.c_void_p)] * 5, c.POINTER(c.c_int64), c.POINTER(c.c_void_p),
        c.POINTER(c.c_double), c.POINTER(c.c_double), c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_int, c.c_void_p,
        c.c_void_p, c.c_int64, c.POINTER(c.c_int64), c.c_char_p, c.c_int,
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
    launches, vector, scalar, blocks, _ = emu.stats[-1]
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
