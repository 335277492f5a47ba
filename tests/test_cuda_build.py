"""Build checks of the CUDA backend that need no GPU (docs/design.md, "Verifying GPU code without a GPU").

* every csrc/cuda/*.cu compiles for sm_80 and sm_90 with the flags setup.py uses, and ptxas reports no spill
  stores/loads and no stack frame for any function;
* the SASS of every kernel instantiation has 128-bit global loads and stores of every array (the path of 16-byte
  aligned chunks) and element-wise loads (the path of the others);
* the device table (csrc/cuda/device_table.h, plain C++: the tensor and chunk tables, the patch of moved entries,
  the grid size) is right for 2^31+ element tensors, more than 65,535 chunks and 100,000 tensors (a g++ driver);
* the step runs on the CPU: csrc/cuda's host code and kernel compiled as host C++ (g++, CUDA headers only), a
  partition's table patched and "uploaded" into a second buffer the kernel reads, one launch a step whose
  persistent blocks and threads run one after another, on CPU tensors, through FusedAdam(backend="cuda")
  (backends/cuda.py's CudaBackend on an emulated binding): tests/parity.py's table and FEATURE_CASES against torch
  and the reference backend, moved grads, per-tensor steps, capturable steps, stochastic rounding bitwise the
  reference's; everything of the CUDA path runs except the `<<<>>>` launch and the torch binding;
* the torch binding (csrc/cuda/ops_cuda.cpp) passes a syntax check against this torch's headers (CPU torch ships
  the ATen/c10 CUDA headers; the CUDA math libraries' headers are stubbed).

The .cu files are compiled once per session into a temporary directory, all of them in parallel: 204 kernels x 2
archs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import ctypes
from types import SimpleNamespace

import pytest
import torch

from conftest import requires_nvcc
from fused_adam import FusedAdam, FusedAdamW, backends
from fused_adam.backends import PartOptions, TensorHyper
from fused_adam.backends.cuda import CudaBackend
from fused_adam.plan import dense
from parity import (DTYPES, FEATURE_CASES, OPTIM_INPUTS, SHAPES, TENSOR_HYPER_INPUTS, assert_parity,
                    assert_tensor_hyper_per_tensor_steps, bits, feature_id, make_grads, make_params, train)

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
MODES = 3 * 2 * 2  # weight decay x amsgrad x unscale (maximize and clipping are a runtime coefficient; the vector
# and scalar paths are both in every kernel, picked per chunk)
# adam_cuda_<stem>.cu: (param, state) storage types.
PAIRS = {
    "f32": ("float", "float"), "f64": ("double", "double"), "bf16": ("bf16", "bf16"), "f16": ("half", "half"),
    "f32_bf16": ("float", "bf16"), "bf16_f32": ("bf16", "float"), "f16_f32": ("half", "float"),
}
SIZE = {"float": 4, "double": 8, "bf16": 2, "half": 2}


def layouts(stem: str) -> list[tuple[bool, bool, bool]]:
    """(master, sr_param, sr_state) compiled for a pair: adam_kernel.cuh's Layout::kValid (masters for 16-bit params,
    stochastic rounding of bf16 stores, the param's only without a master)."""
    p, s = PAIRS[stem]
    return [(m, sp, ss) for m in (False, True) for sp in (False, True) for ss in (False, True)
            if (not m or SIZE[p] == 2) and (not sp or (p == "bf16" and not m)) and (not ss or s == "bf16")]


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
    assert sum(kernels_per_file(p) for p in PAIRS) == 204  # compile time: see the module's docstring


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_or_stack(compiled, arch):
    for cu in CU_FILES:
        _, log = compiled[cu.stem]
        funcs = {name: f for (a, name), f in _ptxas_functions(log).items() if a == arch}
        assert funcs or cu.stem == "adam_cuda", f"no ptxas report for {cu.name} ({arch}):\n{log}"
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
    """The per-dtype instantiations and extern templates resolve: what is left
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
GENERIC_128 = re.compile(r"\b(?:LD|ST)\.E(?:\.\w+)*\.128\b")  # through the generic address space
# adam_step_kernel<P, S, WD, AMSGRAD, UNSCALE, MASTER, SR, VECTOR>, mangled; S is a back reference when it is P.
_TYPE = r"(f|d|13__nv_bfloat16|6__half|S\d*_)"
KERNEL_ARGS = re.compile(r"adam_step_kernelI" + _TYPE + _TYPE + r"LNS_11WeightDecayE(\d)E" + r"Lb([01])E" * 5)
_MANGLED = {"f": "float", "d": "double", "13__nv_bfloat16": "bf16", "6__half": "half"}


def _kernel_args(name: str) -> dict:
    m = KERNEL_ARGS.search(name)
    assert m, name
    p = _MANGLED[m.group(1)]
    s = p if m.group(2).startswith("S") else _MANGLED[m.group(2)]
    amsgrad, unscale, master, sr_param, sr_state = (m.group(i) == "1" for i in range(4, 9))
    return dict(p=p, s=s, amsgrad=amsgrad, unscale=unscale, master=master, sr_param=sr_param, sr_state=sr_state)


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
def test_every_kernel_has_128bit_accesses_and_a_scalar_path(compiled, arch, stem):
    """Every kernel takes 128-bit accesses on its aligned chunks, every array (fp32 params and states:
    LDG.E.128/STG.E.128; fp32 beside 16-bit arrays: two per thread), and has the element-wise path for the others."""
    obj, _ = compiled[f"adam_cuda_{stem}"]
    sass = subprocess.run([_cuobjdump(), "--dump-sass", str(obj)], check=True, capture_output=True, text=True).stdout
    funcs = {name: body for name, body in _sass_functions(sass, arch).items() if "adam_step_kernel" in name}
    assert len(funcs) == kernels_per_file(stem), sorted(funcs)
    for name, body in funcs.items():
        k = _kernel_args(name)
        assert (k["p"], k["s"]) == PAIRS[stem], (name, k)
        loads, stores = _pieces(k)
        assert len(LDG_128.findall(body)) >= loads, f"{arch} {name} {k}: fewer than {loads} 128-bit loads\n{body[:4000]}"
        assert len(STG_128.findall(body)) >= stores, f"{arch} {name} {k}: fewer than {stores} 128-bit stores"
        assert SCALAR_LDG.search(body), f"{arch} {name}: no element-wise loads for unaligned chunks"
        # The addresses come from the device table: without FA_ASSUME_GLOBAL the vector accesses would be generic.
        assert not GENERIC_128.search(body), f"{arch} {name}: 128-bit accesses through generic addresses"


# ---- the device table, on the host --------------------------------------------------------------------------------

TABLE_DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include "cuda/device_table.h"
using namespace fused_adam::cuda;
// stdin: chunk_size count, then count numels, then commands: "s i grad" sets tensor i's entry with that grad address
// (its other fields zero), "t" takes the dirty range, "g sms per_sm" prints grid_size. stdout: "T tensors chunks
// bytes tensors_offset chunks_offset", the check of the chunk list ("C ok" or "C bad ..."), then one line per
// command; or "E message".
int main() {
  long long chunk_size, count;
  std::cin >> chunk_size >> count;
  std::vector<int64_t> numels(count);
  for (auto& n : numels) { long long v; std::cin >> v; n = v; }
  try {
    DeviceTable table(numels, chunk_size);
    std::printf("T %lld %lld %zu %zu %zu\n", (long long)table.num_tensors(), (long long)table.num_chunks(),
                table.bytes(), table.tensors_offset(), table.chunks_offset());
    // Every tensor's chunks 0..ceil(numel / chunk_size) - 1, in tensor order, each once; the entries' numels.
    int64_t c = 0;
    for (int64_t t = 0; t < table.num_tensors(); ++t) {
      if (table.entry(t).numel != numels[t]) { std::printf("C bad numel %lld\n", (long long)t); return 0; }
      for (int64_t k = 0; k * chunk_size < numels[t]; ++k, ++c) {
        const ChunkEntry& e = table.chunk(c);
        if (e.tensor != t || e.chunk != k) {
          std::printf("C bad chunk %lld: (%d, %d), expected (%lld, %lld)\n", (long long)c, e.tensor, e.chunk,
                      (long long)t, (long long)k);
          return 0;
        }
      }
    }
    std::printf(c == table.num_chunks() ? "C ok\n" : "C bad count\n");
    std::string cmd;
    while (std::cin >> cmd) {
      if (cmd == "s") {
        long long i; unsigned long long grad;
        std::cin >> i >> grad;
        TensorEntry e{};
        e.numel = table.entry(i).numel;
        e.buf[kGrad] = reinterpret_cast<void*>(grad);
        table.set(i, e);
      } else if (cmd == "t") {
        const auto r = table.take_dirty();
        std::printf("D %zu %zu\n", r.first, r.second);
      } else if (cmd == "g") {
        int sms, per_sm;
        std::cin >> sms >> per_sm;
        std::printf("G %u\n", grid_size(table.num_chunks(), sms, per_sm));
      }
    }
  } catch (const std::invalid_argument& e) { std::printf("E %s\n", e.what()); }
  return 0;
}
"""


@pytest.fixture(scope="module")
def table_driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    src, exe = out / "table_driver.cpp", out / "table_driver"
    src.write_text(TABLE_DRIVER)
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)

    def run(numels, chunk_size, commands=""):
        stdin = f"{chunk_size} {len(numels)}\n" + " ".join(map(str, numels)) + "\n" + commands
        text = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout
        if text.startswith("E "):
            raise ValueError(text[2:].strip())
        lines = text.splitlines()
        tensors, chunks, size, t_off, c_off = map(int, lines[0].split()[1:])
        assert lines[1] == "C ok", lines[1]
        return dict(tensors=tensors, chunks=chunks, bytes=size, tensors_offset=t_off, chunks_offset=c_off,
                    out=[tuple(map(int, line.split()[1:])) for line in lines[2:]])

    return run


ENTRY, CHUNK_ENTRY, HEADER = 96, 8, 16  # sizeof(TensorEntry), sizeof(ChunkEntry), the header's aligned size


@requires_gxx
def test_table_small_sizes(table_driver):
    numels = [0, 1, 7, 8, 9, 15, 16, 17, 40, 65, 0]
    t = table_driver(numels, 8)
    assert t["tensors"] == len(numels) and t["chunks"] == sum(-(-n // 8) for n in numels)
    assert t["tensors_offset"] == HEADER and t["chunks_offset"] == HEADER + ENTRY * len(numels)
    assert t["bytes"] == t["chunks_offset"] + -(-CHUNK_ENTRY * t["chunks"] // 16) * 16


@requires_gxx
def test_table_tensor_over_2_31_elements(table_driver):
    numels = [5, 2**31 + 5, 3 * 2**31]
    t = table_driver(numels, 65536)  # the driver checks every chunk index, 2^31 / 65536 (the 5-element tail) included
    assert t["chunks"] == 1 + (2**31 // 65536 + 1) + 3 * 2**31 // 65536


@requires_gxx
def test_table_more_than_65535_chunks_and_100000_tensors(table_driver):
    t = table_driver([8 * 70_000 + 3], 8)
    assert t["chunks"] == 70_001  # beyond a grid's y/z limit and a uint16 index: the table has int32 indices
    numels = [(i * 37) % 300 for i in range(100_000)]
    t = table_driver(numels, 64, "g 132 4\n")
    assert t["tensors"] == 100_000 and t["chunks"] == sum(-(-n // 64) for n in numels)
    assert t["out"] == [(132 * 4,)]  # one wave of persistent blocks strides them all


@requires_gxx
def test_table_rejects_what_the_kernel_cannot_index(table_driver):
    with pytest.raises(ValueError, match="more than 2\\^31 chunks"):
        table_driver([8 * 2**31 + 1], 8)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of 8"):
        table_driver([8], 12)
    with pytest.raises(ValueError, match="tensor 1 has negative numel"):
        table_driver([8, -1], 8)


@requires_gxx
def test_table_patches_only_the_entries_that_moved(table_driver):
    """The first upload is the whole image; then only the byte range of entries whose addresses changed."""
    numels = [10, 0, 30, 7]
    entry = lambda i: HEADER + ENTRY * i  # noqa: E731
    cmds = ("t\n"                                  # the first upload: everything
            "s 0 0\ns 1 0\ns 2 0\ns 3 0\nt\n"       # the same entries (zero addresses): nothing
            "s 2 4096\nt\n"                         # one grad moved: its entry
            "s 0 64\ns 3 128\nt\n"                  # two: the range between them
            "s 0 64\ns 3 128\nt\n")                 # the same again: nothing
    t = table_driver(numels, 8, cmds)
    assert t["out"] == [(0, t["bytes"]), (0, 0), (entry(2), entry(3)), (entry(0), entry(4)), (0, 0)]


@requires_gxx
def test_grid_size(table_driver):
    assert table_driver([8 * 1000], 8, "g 132 4\n")["out"] == [(528,)]  # capped at one wave
    assert table_driver([8 * 5], 8, "g 132 4\n")["out"] == [(5,)]  # one block a chunk
    assert table_driver([0, 0], 8, "g 132 4\n")["out"] == [(1,)]  # capturable steps of empty tensors still count


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
// CPU emulation of the CUDA step (csrc/cuda): a partition's DeviceTable, its upload (the dirty range copied into a
// second buffer, the "device memory" the kernel reads), run_step and adam_step_kernel, compiled as host code; a
// launch runs its persistent blocks, and their threads, one after another. Everything of the CUDA path runs except
// the <<<>>> launch itself and the torch binding (whose staging the Python side mirrors).
#define __global__
#define __device__
#define __host__
#define __shared__ static  // one instance per kernel instantiation
#define FA_EMULATION  // NOTE [emulation] in adam_kernel.cuh
#include <cuda_runtime.h>
#undef __launch_bounds__
#define __launch_bounds__(...)
struct EmuIndex { unsigned x = 0, y = 0, z = 0; };
static EmuIndex threadIdx, blockIdx, gridDim;
static inline void __syncthreads() {}
static inline void __threadfence() {}
static inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address += value;
  return old;
}
#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include "cuda/adam_kernel.cuh"

using namespace fused_adam;
using namespace fused_adam::cuda;

namespace {
struct EmuPartition {
  DeviceTable table;
  std::vector<TableHeader> device;  // 16-byte units
  EmuPartition(const std::vector<int64_t>& numels, int64_t chunk_size)
      : table(numels, chunk_size), device((table.bytes() + 15) / 16) {}
};

// StepOptions::tensor_hyper from what the Python side computed (backends' TensorHyper, as py_options.h's TensorHyper
// computes it): [beta1 is a Tensor, 1 - beta2 (NaN: a number), k, then k rows of (step, -step_size, sqrt(bc2))].
struct EmuTensorHyper final : TensorHyperValues {
  std::vector<double> rows;
  explicit EmuTensorHyper(const double* t) {
    beta1_tensor = t[0] != 0;
    one_minus_beta2 = t[1];
    rows.assign(t + 3, t + 3 + 3 * static_cast<int64_t>(t[2]));
  }
  void step_pair(double step, double& neg_step_size, double& bias_correction2_sqrt) const override {
    for (size_t r = 0; r < rows.size(); r += 3) {
      if (rows[r] == step) {
        neg_step_size = rows[r + 1];
        bias_correction2_sqrt = rows[r + 2];
        return;
      }
    }
    throw std::invalid_argument("emulation: no tensor scalars for step " + std::to_string(step));
  }
};

void set_error(const std::exception& e, char* err, int err_len) {
  std::strncpy(err, e.what(), static_cast<size_t>(err_len) - 1);
  err[err_len - 1] = 0;
}
}  // namespace

extern "C" void* fa_emu_partition(const int64_t* numels, int64_t n, int64_t chunk_size, char* err, int err_len) {
  try {
    return new EmuPartition(std::vector<int64_t>(numels, numels + n), chunk_size ? chunk_size : kDefaultChunkSize);
  } catch (const std::exception& e) {
    set_error(e, err, err_len);
    return nullptr;
  }
}

extern "C" void fa_emu_free(void* part) { delete static_cast<EmuPartition*>(part); }

extern "C" void fa_emu_unsupported(int param_dtype, int state_dtype, int master, char* out, int out_len) {
  std::strncpy(out, unsupported(static_cast<DType>(param_dtype), static_cast<DType>(state_dtype), master).c_str(),
               static_cast<size_t>(out_len) - 1);
  out[out_len - 1] = 0;
}

// bufs: n x kNumBufs addresses. new_steps: not capturable, each tensor's step + 1. hyper: lr, beta1, beta2, eps,
// weight_decay, decay (NaN: none). tensor_hyper: EmuTensorHyper's table, or null. stats: [grid, chunks, first dirty
// byte, dirty bytes, step source, tensors].
extern "C" int fa_emu_step(void* handle, int param_dtype, int state_dtype, void** bufs, float** device_steps,
                           const double* new_steps, const uint64_t* tensor_ids, const double* hyper,
                           const double* tensor_hyper,
                           const double* lr_device, const double* decay_device, int wd_mode, int amsgrad, int maximize, int capturable,
                           const float* grad_scale, const float* found_inf, const float* clip_coef, int master,
                           int sr_param, int sr_state, uint64_t seed, int sm_count, int blocks_per_sm,
                           int64_t* stats, char* err, int err_len) {
  try {
    EmuPartition& part = *static_cast<EmuPartition*>(handle);
    DeviceTable& table = part.table;
    const int64_t n = table.num_tensors();
    StepOptions o;
    o.hyper = AdamHyper{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4]};
    o.decay = hyper[5];
    std::unique_ptr<EmuTensorHyper> tensors;
    if (tensor_hyper != nullptr) {
      tensors = std::make_unique<EmuTensorHyper>(tensor_hyper);
      o.tensor_hyper = tensors.get();
    }
    o.wd_mode = static_cast<WeightDecay>(wd_mode);
    o.amsgrad = amsgrad;
    o.maximize = maximize;
    o.capturable = capturable;
    o.lr_device = lr_device;
    o.decay_device = decay_device;
    o.grad_scale = grad_scale;
    o.found_inf = found_inf;
    o.clip_coef = clip_coef;
    o.master = master;
    o.sr_param = sr_param;
    o.sr_state = sr_state;
    o.seed = seed;
    HostSteps host;
    if (capturable) {
      host.source = StepSource::kDevice;
    } else {
      host = host_steps(std::vector<double>(new_steps, new_steps + n));
    }
    for (int64_t i = 0; i < n; ++i) {
      void* b[kNumBufs];
      for (int k = 0; k < kNumBufs; ++k) b[k] = bufs[i * kNumBufs + k];
      table.set(i, make_entry(b, table.entry(i).numel, capturable ? device_steps[i] : nullptr, tensor_ids[i],
                              host.source, o, capturable ? 0 : new_steps[i]));
    }
    const DType pd = static_cast<DType>(param_dtype), sd = static_cast<DType>(state_dtype);
    DeviceTableRef ref = DeviceTableRef::of(table, part.device.data());
    check_step(ref, pd, sd, o, host);
    const auto dirty = table.take_dirty();  // the binding's one stream-ordered copy
    std::memcpy(reinterpret_cast<unsigned char*>(part.device.data()) + dirty.first, table.image() + dirty.first,
                dirty.second - dirty.first);
    const unsigned grid = grid_size(table.num_chunks(), sm_count, blocks_per_sm);
    stats[0] = table.num_chunks() == 0 && host.source != StepSource::kDevice ? 0 : grid;
    stats[1] = table.num_chunks();
    stats[2] = static_cast<int64_t>(dirty.first);
    stats[3] = static_cast<int64_t>(dirty.second - dirty.first);
    stats[4] = static_cast<int64_t>(host.source);
    stats[5] = n;
    dispatch_pair(pd, sd, [&](auto param, auto state) {
      return run_step<typename decltype(param)::type, typename decltype(state)::type>(
          ref, o, host, [&](auto kernel, const auto& args) {
            gridDim.x = grid;
            for (unsigned b = 0; b < grid; ++b) {
              blockIdx.x = b;
              for (int t = 0; t < kBlockThreads; ++t) {
                threadIdx.x = static_cast<unsigned>(t);
                kernel(args);
              }
              for (int t = 0; t < kBlockThreads; ++t) {  // the kernel's epilogue, after the block's barrier
                threadIdx.x = static_cast<unsigned>(t);
                count_device_steps(args);
              }
            }
            return cudaSuccess;
          });
    });
  } catch (const std::exception& e) {
    set_error(e, err, err_len);
    return 1;
  }
  return 0;
}
"""

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # cuda::DType
_DTYPE_BY_NAME = {str(d).replace("torch.", ""): code for d, code in _DTYPE_CODES.items()}
NUM_BUFS = 6  # csrc/cuda/device_table.h's Buf: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master


def _same_layout(t, like) -> bool:
    return all(size == 1 or a == b for size, a, b in zip(t.shape, t.stride(), like.stride()))


class EmulatedPartition:
    """_C_cuda.Partition with "device memory" in CPU memory: ops_cuda.cpp's per-step pass (grads read from the params,
    staging of other layouts, host steps) written in Python, then the table patch and the launch in C++
    (fa_emu_step: DeviceTable, make_entry, run_step, the kernel)."""

    def __init__(self, native, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, master_params,
                 tensor_ids, options, chunk_size):
        self.native, self.lib = native, native.lib
        self.params, self.exp_avgs, self.exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
        self.max_exp_avg_sqs, self.state_steps = list(max_exp_avg_sqs), list(state_steps)
        self.master_params, self.tensor_ids = list(master_params), list(tensor_ids)
        o = options  # PartOptions, read as csrc/common/py_options.h's partition_options does
        self.wd_mode, self.amsgrad, self.maximize, self.capturable = int(o.wd_mode), o.amsgrad, o.maximize, o.capturable
        self.sr_param, self.sr_state, self.seed = o.sr_param, o.sr_state, o.seed & ((1 << 64) - 1)
        self.sr = o.sr_param or o.sr_state
        n = len(self.params)
        err = ctypes.create_string_buffer(512)
        self.handle = self.lib.fa_emu_partition((ctypes.c_int64 * n)(*(p.numel() for p in self.params)), n,
                                                chunk_size, err, 512)
        assert self.handle, err.value.decode()

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.fa_emu_free(self.handle)

    def check_(self, grads, hp, amp=None):
        return self.step_(grads, hp, amp, check_only=True)

    def step_(self, grads, hp, amp=None, check_only=False):
        params, n = self.params, len(self.params)
        # read_step (csrc/common/py_options.h), with this emulation's "device" memory the CPU's: a capturable step
        # reads a Tensor lr on the device; every other Tensor hyperparameter is read on the host.
        lr, lr_tensor, decay = hp.lr, None, None
        if isinstance(lr, torch.Tensor) and self.capturable:
            lr_tensor, lr = lr, 0.0
        elif isinstance(lr, torch.Tensor):
            if self.wd_mode == 2:
                decay = (1 - lr * hp.weight_decay).item()  # in lr's dtype, as torch.optim.AdamW computes it
            lr = lr.item()
        beta1, beta2, eps, weight_decay = (float(x) for x in (hp.beta1, hp.beta2, hp.eps, hp.weight_decay))
        # NOTE [tensor hyperparameters]: not capturable, the scalars torch computes from a Tensor lr or beta
        tensors = None if self.capturable else TensorHyper.of(hp)
        grad_scale, found_inf, clip_coef = (None, None, None) if amp is None else amp
        if grads is None:
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                return False
        dtype, state_dtype = params[0].dtype, self.exp_avgs[0].dtype
        for i, p in enumerate(params):
            for what, t, want in (("grad", grads[i], dtype), ("exp_avg", self.exp_avgs[i], state_dtype),
                                  ("exp_avg_sq", self.exp_avg_sqs[i], state_dtype)):
                assert t.dtype == want and t.shape == p.shape, f"{what} of param {i}: {t.dtype} {tuple(t.shape)}"
        if check_only:
            return True
        scalar = lambda t: t.to(torch.float32).reshape(()).clone() if t is not None else None  # noqa: E731
        scale, inf, clip = scalar(grad_scale), scalar(found_inf), scalar(clip_coef)
        lr_device = lr_tensor.to(torch.float64).reshape(()).clone() if lr_tensor is not None else None
        decay_device = None  # read_step's: AdamW's factor in the lr's dtype, "on the device"
        if lr_tensor is not None and self.wd_mode == 2:
            decay_device = (1 - lr_tensor.reshape(()) * weight_decay).to(torch.float64).clone()
        if not self.capturable and inf is not None:
            if inf.item() != 0:  # the steps live on the host and must not change: one host read
                return True
            inf = None
        master = bool(self.master_params)
        bufs, write_backs, keep = [], [], []
        for i in range(n):
            p = params[i]
            # Stochastic rounding's bits follow the row-major element index: the contiguous order.
            ok = p.is_contiguous() if self.sr else dense(p)
            layout = p if ok else p.contiguous()
            if layout is not p:
                write_backs.append((layout, p))
            roles = [(layout, False), (grads[i], scale is not None), (self.exp_avgs[i], True),
                     (self.exp_avg_sqs[i], True), (self.max_exp_avg_sqs[i] if self.amsgrad else None, True),
                     (self.master_params[i] if master else None, True)]
            for r, (t, written) in enumerate(roles):
                if t is None or p.numel() == 0:
                    bufs.append(None)
                    continue
                if r > 0 and not _same_layout(t, layout):
                    copy = torch.empty_strided(layout.shape, layout.stride(), dtype=t.dtype)
                    copy.copy_(t)
                    if written:
                        write_backs.append((copy, t))
                    t = copy
                keep.append(t)
                bufs.append(t.data_ptr())
        new_steps = None if self.capturable else [float(s.item() + 1) for s in self.state_steps]
        c = ctypes
        tensor_hyper = None
        if tensors is not None:
            table = [float(isinstance(tensors.beta1, torch.Tensor)),
                     tensors.one_minus_beta2() if isinstance(tensors.beta2, torch.Tensor) else float("nan")]
            distinct = sorted(set(new_steps))
            table += [len(distinct)] + [v for step in distinct for v in (step, *tensors.step_pair(step))]
            tensor_hyper = (c.c_double * len(table))(*table)
        stats, err = (c.c_int64 * 6)(), c.create_string_buffer(512)
        addr = lambda t: c.c_void_p(t.data_ptr() if t is not None else None)  # noqa: E731
        rc = self.lib.fa_emu_step(
            self.handle, _DTYPE_CODES[dtype], _DTYPE_CODES[state_dtype], (c.c_void_p * (n * NUM_BUFS))(*bufs),
            (c.c_void_p * n)(*(s.data_ptr() for s in self.state_steps)),
            (c.c_double * n)(*(new_steps or [0.0] * n)), (c.c_uint64 * n)(*(self.tensor_ids or [0] * n)),
            (c.c_double * 6)(lr, beta1, beta2, eps, weight_decay, float("nan") if decay is None else decay),
            tensor_hyper,
            addr(lr_device), addr(decay_device),
            self.wd_mode, int(self.amsgrad), int(self.maximize), int(self.capturable),
            addr(scale), addr(inf), addr(clip), int(master), int(self.sr_param), int(self.sr_state), self.seed,
            self.native.sm_count, self.native.blocks_per_sm, stats, err, 512,
        )
        if rc != 0:
            raise RuntimeError(f"fused_adam cuda: {err.value.decode()}")
        self.native.stats.append(list(stats))
        # Tensors whose chunks the kernel steps with 128-bit accesses (all buffers 16-byte aligned), and the others.
        nonempty = [bufs[i * NUM_BUFS:(i + 1) * NUM_BUFS] for i in range(n) if params[i].numel()]
        aligned = sum(all(b is None or b % 16 == 0 for b in bs) for bs in nonempty)
        self.native.aligned.append((aligned, len(nonempty) - aligned))
        for buf, target in write_backs:
            target.copy_(buf)
        if new_steps is not None:
            for s, v in zip(self.state_steps, new_steps):
                s.fill_(v)
        return True


class EmulatedNative:
    """What CudaBackend asks of fused_adam._C_cuda (Partition, unsupported), emulated on the CPU. The grid is
    sized for a device of `sm_count` SMs running `blocks_per_sm` blocks each."""

    def __init__(self, lib, sm_count: int = 3, blocks_per_sm: int = 2):
        self.lib, self.sm_count, self.blocks_per_sm = lib, sm_count, blocks_per_sm
        self.stats: list[list[int]] = []  # per step: grid, chunks, first dirty byte, dirty bytes, step source, tensors
        self.aligned: list[tuple[int, int]] = []  # per step: tensors on the 128-bit path, on the element-wise path

    def Partition(self, *args, **kwargs):  # noqa: N802 (the binding's class name)
        return EmulatedPartition(self, *args, **kwargs)

    def unsupported(self, param_dtype: str, state_dtype: str, master: bool) -> str:
        out = ctypes.create_string_buffer(512)
        self.lib.fa_emu_unsupported(_DTYPE_BY_NAME[param_dtype], _DTYPE_BY_NAME[state_dtype], int(master), out, 512)
        return out.value.decode()


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
    handle.fa_emu_partition.restype = c.c_void_p
    handle.fa_emu_partition.argtypes = [c.POINTER(c.c_int64), c.c_int64, c.c_int64, c.c_char_p, c.c_int]
    handle.fa_emu_free.argtypes = [c.c_void_p]
    handle.fa_emu_unsupported.argtypes = [c.c_int, c.c_int, c.c_int, c.c_char_p, c.c_int]
    handle.fa_emu_step.restype = c.c_int
    handle.fa_emu_step.argtypes = [
        c.c_void_p, c.c_int, c.c_int, c.POINTER(c.c_void_p), c.POINTER(c.c_void_p), c.POINTER(c.c_double),
        c.POINTER(c.c_uint64), c.POINTER(c.c_double), c.POINTER(c.c_double), c.c_void_p, c.c_void_p, c.c_int, c.c_int,
        c.c_int, c.c_int, c.c_void_p,
        c.c_void_p, c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_uint64, c.c_int, c.c_int, c.POINTER(c.c_int64),
        c.c_char_p, c.c_int,
    ]
    return handle


@pytest.fixture
def emulated(emulator_lib, monkeypatch):
    """Install the emulated backend as "cuda" for FusedAdam(backend="cuda"): backends/cuda.py's CudaBackend on the
    emulated binding, for CPU tensors."""

    def install(chunk_size: int = 0, sm_count: int = 3, blocks_per_sm: int = 2) -> EmulatedNative:
        native = EmulatedNative(emulator_lib, sm_count, blocks_per_sm)
        monkeypatch.setitem(backends._backends, "cuda", CudaBackend(native, device_type="cpu", chunk_size=chunk_size))
        return native

    return install


def _one_launch_each_step(native, since=0):
    """Every step since `since` was one launch of at most one wave (sm_count x blocks_per_sm) over all its chunks."""
    wave = native.sm_count * native.blocks_per_sm
    for grid, chunks, _, _, source, _ in native.stats[since:]:
        assert grid == (max(1, min(chunks, wave)) if chunks or source == 2 else 0), native.stats


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=repr)
def test_emulated_kernel_parity(emulated, optim_input, dtype, cls_name):
    """tests/parity.py's table, 20 steps, through FusedAdam(backend="cuda") with the emulated kernel: one launch a
    step, persistent blocks striding the chunks (chunk_size 8: the tensors have 1 to 9 chunks, a 3-SM device)."""
    native = emulated(chunk_size=8)
    assert_parity("cuda", cls_name, optim_input.kwargs, dtype)
    assert len(native.stats) == 20, native.stats
    _one_launch_each_step(native)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("optim_input", TENSOR_HYPER_INPUTS, ids=repr)
def test_emulated_tensor_hyper_parity(emulated, optim_input, dtype, cls_name):
    """Tensor lr / betas (NOTE [tensor hyperparameters]): the scalars the binding computes as torch does reach the
    kernel, every step at one count (kUniform)."""
    emulated(chunk_size=8)
    assert_parity("cuda", cls_name, optim_input.kwargs, dtype, steps=25, shapes=SHAPES + ((1024,),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_emulated_tensor_hyper_per_tensor_steps(emulated, dtype):
    """Tensor lr / betas with counts that differ within the partition (kPerTensor: each entry carries its pair)."""
    native = emulated(chunk_size=8)
    assert_tensor_hyper_per_tensor_steps("cuda", dtype)
    assert 1 in {s[4] for s in native.stats}, native.stats
    assert native.stats[-1][1] > native.sm_count * native.blocks_per_sm  # more chunks than blocks: they stride


def _assert_same_training(ours, ref, exact=False):
    (ours_p, ours_opt), (ref_p, ref_opt) = ours, ref
    tol = dict(atol=0, rtol=0) if exact else {}
    for i, (a, b) in enumerate(zip(ours_p, ref_p)):
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"param {i}: {m}")
        for k, v in ref_opt.state[b].items():
            torch.testing.assert_close(ours_opt.state[a][k].cpu(), v.cpu(), **tol, msg=lambda m: f"{k} of param {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_many_tensors_one_launch(emulated, dtype):
    """53 tensors (empty ones included) and 500+ chunks of 8 elements: one launch a step, 6 blocks striding them."""
    native = emulated(chunk_size=8)
    shapes = [(n,) for n in (1, 7, 8, 9, 15, 16, 17, 0, 67, 129)] * 5 + [(2, 3, 4), (0, 3), (3000,)]
    params0 = make_params(dtype, shapes)
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=True, cls=FusedAdam)
    _assert_same_training(train("cuda", params0, **kwargs), train("reference", params0, **kwargs))
    _one_launch_each_step(native)
    assert native.stats[-1][1] > 500 and native.stats[-1][5] == len(shapes), native.stats[-1]


def test_emulated_grid_sizes(emulated):
    """The grid is one wave of the device, or one block a chunk when there are fewer chunks."""
    params0 = make_params(torch.float32, [(64,), (7,)])
    for sm_count, blocks_per_sm, chunk_size, grid in ((1, 1, 8, 1), (2, 3, 8, 6), (132, 4, 8, 9), (4, 4, 0, 2)):
        native = emulated(chunk_size=chunk_size, sm_count=sm_count, blocks_per_sm=blocks_per_sm)
        _assert_same_training(train("cuda", params0), train("reference", params0))
        assert {s[0] for s in native.stats} == {grid}, (sm_count, blocks_per_sm, chunk_size, native.stats)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["new-grads", "static-grads"])
def test_emulated_patches_only_moved_grads(emulated, set_to_none):
    """The first step uploads the whole table; then grads that moved are patched (the entries between the first and
    the last that changed), and static grads (zero_grad(set_to_none=False)) need no copy at all."""
    native = emulated(chunk_size=8)
    params0 = make_params(torch.float32, [(5,), (40,), (0,), (17,)])
    params = [p.clone().requires_grad_() for p in params0]
    ref = [p.clone().requires_grad_() for p in params0]
    opt, ref_opt = FusedAdamW(params, backend="cuda"), FusedAdamW(ref, backend="reference")
    kept = []  # every grad made stays alive, so a new one never reuses a freed one's address
    for s in range(4):
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=set_to_none)
        for p, r, g in zip(params, ref, make_grads(params0, s)):
            if set_to_none:
                p.grad, r.grad = g.clone(), g.clone()
                kept.append(p.grad)
            else:
                p.grad.copy_(g) if p.grad is not None else setattr(p, "grad", g.clone())
                r.grad = g.clone()
        opt.step()
        ref_opt.step()
    _assert_same_training((params, opt), (ref, ref_opt))
    first, later = native.stats[0], native.stats[1:]
    assert first[2] == 0 and first[3] > 96 * 4, first  # the header, 4 entries, the chunks
    if set_to_none:
        assert all(0 < s[3] <= 96 * 4 and s[2] >= 16 for s in later), later  # entries only, never the chunk table
    else:
        assert all(s[3] == 0 for s in later), later


def test_emulated_steps_that_differ_per_tensor(emulated):
    """Step counts changed in place so that tensors are at different steps: each entry carries its own scalars
    (StepSource::kPerTensor), and the result is torch's."""
    native = emulated(chunk_size=8)
    params0 = make_params(torch.float32, [(5,), (40,), (17,)])
    runs = []
    for backend in ("cuda", None):
        params = [p.clone().requires_grad_() for p in params0]
        opt = (FusedAdam(params, backend=backend, weight_decay=0.1) if backend else
               torch.optim.Adam(params, weight_decay=0.1, foreach=False))
        for s in range(4):
            for p, g in zip(params, make_grads(params0, s)):
                p.grad = g.clone()
            opt.step()
            if s == 1:
                opt.state[params[1]]["step"].fill_(7.0)
        runs.append((params, opt))
    _assert_same_training(*runs)
    assert [s[4] for s in native.stats] == [0, 0, 1, 1], native.stats  # uniform, then per tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_misaligned_and_strided(emulated, dtype):
    """Views at odd offsets take the element-wise path, aligned tensors the 128-bit path, in the same launch;
    transposed params and grads with other strides are staged."""
    native = emulated(chunk_size=16)
    base0 = make_params(dtype, [(1000,)])[0]
    whole = make_params(dtype, [(5, 7), (33,)])

    def make():
        base = base0.clone()
        views = [base[1:40], base[48:112], base[200:260].view(6, 10).t(), base[300:400].view(10, 10)[:, ::2]]
        return views + [w.clone() for w in whole]

    kwargs = dict(weight_decay=0.1, amsgrad=True, cls=FusedAdam)
    ours = _train_made(make, "cuda", **kwargs)
    assert ours[0][0].storage_offset() == 1 and not ours[0][3].is_contiguous()
    _assert_same_training(ours, _train_made(make, "reference", **kwargs))
    assert all(a > 0 and u > 0 for a, u in native.aligned), native.aligned
    _one_launch_each_step(native)


def _train_made(make, backend, steps=4, cls=FusedAdamW, **kwargs):
    params = [p.requires_grad_() for p in make()]
    opt = cls(params, backend=backend, **kwargs)
    for s in range(steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = g.to(p.dtype)
        opt.step()
    return params, opt


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


# The host path computes lr / bias_correction1 in the Tensor lr's dtype, as torch's for-loop does (NOTE [tensor
# hyperparameters]), the device path in double: they agree bitwise for a float64 lr, or with beta1 = 0
# (bias_correction1 = 1), where a float32 lr still tells AdamW's factor in its dtype from one in double.
@pytest.mark.parametrize("hyper", [dict(lr=torch.tensor(0.01, dtype=torch.float64), betas=(0.8, 0.95)),
                                   dict(lr=torch.tensor(0.01), betas=(0.0, 0.95))], ids=["lr-fp64", "lr-fp32-beta1-0"])
@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_capturable_matches_host_scalars(emulated, dtype, cls, hyper):
    """capturable: step and lr read "on the device" (*step + 1), every step counted once by the launch's last block
    (empty tensors too); the same make_step_scalars on the same values, and AdamW's 1 - lr * wd in the Tensor lr's
    dtype on the device as on the host (torch's), so bitwise the non-capturable result."""
    native = emulated(chunk_size=8)
    params0 = make_params(dtype, [(1,), (7,), (0,), (67,), (3, 5)] * 8)
    kwargs = dict(weight_decay=0.1, amsgrad=True, cls=cls, **hyper)
    ours = train("cuda", params0, steps=4, capturable=True, **kwargs)
    _assert_same_training(ours, train("cuda", params0, steps=4, **kwargs), exact=True)
    assert all(float(ours[1].state[p]["step"]) == 4 for p in ours[0])
    assert {s[4] for s in native.stats} == {2, 0}, native.stats  # device steps, then host steps


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
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0))  # nothing changes, steps included
    for p, (p0, g0, st0) in zip(params, before):
        assert torch.equal(p.detach(), p0) and torch.equal(p.grad, g0)
        for k, v in st0.items():
            assert torch.equal(opt.state[p][k], v), k
    _assert_same_training((params, opt), (ref, ref_opt))


# ---- the options beyond torch, emulated --------------------------------------------------------------------------

from fused_adam.backends.reference import bf16_stochastic, sr_salt  # noqa: E402

# Sizes that find bugs at chunk_size 16 (the vector path moves 8 elements per thread where an array is 16-bit):
# 1, a vector -1/+1, a chunk -1/+1, an empty tensor, a 2-D tensor, many tensors.
FEATURE_SHAPES = [(1,), (7,), (9,), (15,), (17,), (0,), (3, 11), (67,)] + [(5,), (40,)] * 14


def _train_features(backend, kwargs, make, steps=4):
    params = [p.requires_grad_() for p in make()]
    opt = FusedAdam(params, backend=backend, **kwargs)
    for s in range(steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = (3 * g).to(p.dtype)
        opt.step()
    return params, opt


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
                same[name] = same.get(name, 0) + (bits(x) == bits(y)).sum().item()
                total[name] = total.get(name, 0) + x.numel()
    if not rounded_clip:
        for name in same:
            assert same[name] >= 0.95 * total[name], f"{name}: {same[name]} of {total[name]} bitwise the reference's"


@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, maximize=True),
                                     dict(weight_decay=0.1, decoupled_weight_decay=True, capturable=True)],
                         ids=["default", "l2-max", "adamw-capturable"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_id)
def test_emulated_features_match_reference(emulated, case, options):
    """tests/parity.py's FEATURE_CASES x modes, aligned and misaligned tensors in one launch."""
    dtype, kw = case
    native = emulated(chunk_size=16)
    kwargs = {"lr": 0.01, "seed": 7, **options, **kw}
    base0 = make_params(dtype, [(200,)])[0]
    whole0 = make_params(dtype, FEATURE_SHAPES)

    def make():
        base = base0.clone()  # views at odd offsets: the element-wise path
        return [base[1:40], base[41:58].view(1, 17)] + [w.clone() for w in whole0]

    ours = _train_features("cuda", kwargs, make)
    ref = _train_features("reference", kwargs, make)
    assert {d.backend for d in ours[1].dispatch[0]} == {"cuda"}
    _assert_features_match(ours, ref, rounded_clip="max_grad_norm" in kw and dtype != torch.float32)
    assert all(a > 0 and u > 0 for a, u in native.aligned), native.aligned
    _one_launch_each_step(native)


@pytest.mark.parametrize("capturable", [False, True], ids=["host-step", "device-step"])
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
        assert torch.equal(bits(opt.state[p]["exp_avg"]), bits(m)), tid
        assert torch.equal(bits(opt.state[p]["exp_avg_sq"]), bits(v)), tid


def test_emulated_stochastic_rounding_capturable_is_bitwise_host(emulated):
    """Salts computed on the device from the device step = salts from the host: the same training, bit for bit."""
    emulated(chunk_size=8)
    params0 = make_params(torch.bfloat16, [(1,), (7,), (0,), (67,), (3, 5)] * 7)
    # (parity.train's `seed` is the grads'; the optimizer's seed stays 0)
    kwargs = dict(lr=torch.tensor(0.01), weight_decay=0.1, amsgrad=True, stochastic_rounding=True)
    _assert_same_training(train("cuda", params0, steps=4, capturable=True, **kwargs),
                          train("cuda", params0, steps=4, **kwargs), exact=True)


def test_emulated_stochastic_rounding_resume_is_bitwise(emulated):
    """4 steps = 2 steps, state_dict, a new optimizer (a new partition and device table) loading it, 2 steps."""
    emulated(chunk_size=8)
    params0 = make_params(torch.bfloat16, [(7,), (67,), (3, 5)])
    kwargs = dict(lr=1e-3, stochastic_rounding=True, state_dtype=torch.bfloat16)  # (train's `seed` is the grads')
    whole = train("cuda", params0, steps=4, **kwargs)
    params = [p.clone().requires_grad_() for p in params0]
    opt = FusedAdamW(params, backend="cuda", **kwargs)
    for s in range(4):
        if s == 2:
            saved = opt.state_dict()
            opt = FusedAdamW(params, backend="cuda", **kwargs)
            opt.load_state_dict(saved)
        for p, g in zip(params, make_grads(params0, s)):
            p.grad = g.to(p.dtype)
        opt.step()
    _assert_same_training(whole, (params, opt), exact=True)


def test_emulated_stochastic_rounding_of_a_transposed_param(emulated):
    """Bits follow the row-major index: a transposed (dense, not contiguous) param rounds as the reference does."""
    emulated(chunk_size=8)
    base0 = make_params(torch.bfloat16, [(12, 10)])[0]
    make = lambda: [base0.clone().t()]  # noqa: E731
    kwargs = dict(lr=1e-3, stochastic_rounding=True, seed=11)
    ours = _train_features("cuda", kwargs, make)
    ref = _train_features("reference", kwargs, make)
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


def test_emulated_supports_is_the_launchers_rule(emulated):
    """supports() asks the C++ rule (adam_cuda.h, unsupported): a dtype pair without kernels, masters for fp32."""
    emulated()
    backend = backends.get("cuda")
    assert "no kernel for float32 params with float16 states" in backend.native.unsupported("float32", "float16", False)
    assert "master weights need bfloat16 or float16 params, got float32" in backend.native.unsupported(
        "float32", "float32", True)
    assert backend.native.unsupported("bfloat16", "float32", True) == ""
    group = {"lr": 1e-3, "weight_decay": 0.0, "decoupled_weight_decay": False, "amsgrad": False, "maximize": False,
             "capturable": False, "differentiable": False, "state_dtype": torch.float16}
    part = SimpleNamespace(device=torch.device("cpu"), options=PartOptions.of(group, torch.float32, clip=False))
    assert "no kernel for float32 params with float16 states" in backend.supports(part)
    part.options = PartOptions.of({**group, "state_dtype": None, "differentiable": True}, torch.float32, clip=False)
    assert "differentiable" in backend.supports(part)
