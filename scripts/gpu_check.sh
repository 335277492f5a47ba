#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA device and a CUDA torch already installed (it installs
# nothing): build both extensions against that torch, run every GPU test of the triton and cuda backends, then
# time bench/gpu_step.py. Each stage has its own time limit, so one that hangs still leaves the others' results.
#
#   bash scripts/gpu_check.sh [OUTDIR]      # logs and the benchmark's JSON/CSV/PNG go to OUTDIR (8 files at most:
#                                           # the device tool brings back 8)
#
# Environment: PYTHON (default python3), WORKERS (pytest-xdist workers, default 6; 0 = no xdist),
# BENCH_ARGS (default empty: the full 64M run; --quick for 16M), TORCH_CUDA_ARCH_LIST (default: the device's),
# PROFILE (default empty: no profile; else space-separated scenario substrings of bench/gpu_step.py, e.g. "bf16 1x64M":
# each is run under ncu, all reports in ncu.txt, with the kernels of our two backends and torch fused).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-6}
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
fi
rc=0
stage() { echo; echo "== $1 ($(date +%T))"; }

stage "environment (the head of build.log)"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
    nvcc --version | tail -1
    gcc --version | head -1
    echo "CXX=${CXX:-c++}: $("${CXX:-c++}" --version | head -1); its libstdc++.so: $("${CXX:-c++}" -print-file-name=libstdc++.so)"
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} 2>&1 | tee "$OUT/build.log"

stage "build (log: build.log)"
SECONDS=0
timeout 200 "$PY" setup.py build_ext --inplace -q >>"$OUT/build.log" 2>&1 || { rc=1; echo "build failed:"; tail -30 "$OUT/build.log"; }
sed -n '/^running build_ext/,$p' "$OUT/build.log" | grep -i "warn" | head -10
echo "build: ${SECONDS}s"
"$PY" -c "from fused_adam import backends
for n in backends.BACKEND_NAMES: print(f'  {n}: {backends.unavailable(n) or \"available\"}')"

stage "GPU tests (log: tests.log)"
xdist=()
if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "$WORKERS"); fi
SECONDS=0
# Every test that runs on a GPU (the cuda and triton backends' GPU files; test_beyond_torch and test_native_link, the
# shared-libstdc++ link of both extensions). -m '': the 2^31-element test (slow-marked, ~20 GiB) runs here too.
# --timeout needs pytest-timeout.
timeout_arg=()
"$PY" -c "import pytest_timeout" 2>/dev/null && timeout_arg=(--timeout 200)
timeout 240 "$PY" -m pytest -q -m '' -p no:cacheprovider "${xdist[@]}" "${timeout_arg[@]}" -rfEs --tb=short \
    tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_cuda_graph_recipe.py \
    tests/test_beyond_torch.py tests/test_native_link.py \
    >"$OUT/tests.log" 2>&1
trc=$?
[ $trc = 0 ] || rc=1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
grep -E "^SKIPPED" "$OUT/tests.log" | head -10
tail -1 "$OUT/tests.log"
echo "tests: rc $trc, ${SECONDS}s"

# A binding error that kills the process instead of raising (seen in the first two GPU sessions, from a static
# libstdc++ linked into the extensions; bench/NOTES.md, "GPU machine, second session"): the
# native stack of a minimal call that must raise, from gdb or cuda-gdb (the lent machines have only cuda-gdb,
# which debugs host code too).
debugger=$(command -v gdb || command -v cuda-gdb)
if grep -q "Segmentation fault\|crashed while running" "$OUT/tests.log" && [ -n "$debugger" ]; then
    stage "native backtrace of a binding call that must raise (log: crash.txt)"
    timeout 90 "$debugger" -batch -ex run -ex bt -ex "info sharedlibrary" --args "$PY" -c "
import torch
from fused_adam import _C_cuda
from fused_adam.backends import Hyper, PartOptions
g = dict(lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False, capturable=False,
         differentiable=False)
p = [torch.zeros(4, device='cuda')]
_C_cuda.Partition(p, p, p, [], [torch.zeros((), device='cuda')], options=PartOptions.of(g, torch.float32, False)
                  ).step_(p, Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0))
" >"$OUT/crash.txt" 2>&1
    grep -E -A25 "SIG[A-Z]+|RuntimeError" "$OUT/crash.txt" | head -40
fi

stage "benchmark (log: bench.log)"
SECONDS=0
# shellcheck disable=SC2086
timeout 140 "$PY" bench/gpu_step.py --no-progress --out "$OUT" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 || rc=1
tail -32 "$OUT/bench.log"
echo "bench: ${SECONDS}s"

# ncu: --clock-control none leaves the clocks as the benchmark saw them (device METHOD.md); each NVTX range is one
# contender's 3 profiled steps (gpu_step.py --profile), the first 24 kernels in all are enough to read.
for scn in ${PROFILE:-}; do
    command -v ncu >/dev/null || { echo "no ncu on this machine"; break; }
    stage "ncu: $scn (log: ncu.txt)"
    SECONDS=0
    timeout 120 ncu --clock-control none --nvtx --launch-count 24 \
        --nvtx-include "fused_adam cuda/" --nvtx-include "fused_adam triton/" --nvtx-include "torch fused/" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        "$PY" bench/gpu_step.py --profile "$scn" >"$OUT/ncu_one.txt" 2>&1 || rc=1
    grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|profiled" \
        "$OUT/ncu_one.txt" | head -60
    { echo "== ncu: $scn"; cat "$OUT/ncu_one.txt"; } >>"$OUT/ncu.txt" && rm "$OUT/ncu_one.txt"
    echo "ncu $scn: ${SECONDS}s"
done
exit $rc
