// The CPU kernel's torch-free interface: what the dispatcher (adam_cpu.cpp, threads over the chunk table) hands
// to the per-ISA element loops (kernel_impl.h, compiled once per ISA by kernel_{avx512,avx2,baseline}.cpp).
//
// NOTE [cpu ISA dispatch]: the package may not be built with -march=native, so the loop is compiled three times
// under `#pragma GCC target` (AVX-512, AVX2+FMA+F16C, baseline x86-64) and one is picked at run time with
// __builtin_cpu_supports. Each ISA's instantiations live in their own namespace, and the loops are `flatten`
// (everything they call from adam_math.h is inlined), so no AVX-512 code can leak into another ISA's path
// through a shared weak symbol. The per-ISA translation units include no torch header for the same reason.
#pragma once

#include <cstdint>

#include "adam_math.h"

namespace fused_adam {
namespace cpu {

enum class ScalarKind : uint8_t { kFloat, kDouble, kBFloat16, kHalf };
enum class Isa : uint8_t { kBaseline, kAvx2, kAvx512 };

// One tensor of a multi-tensor step as raw memory: all five arrays share one flat layout (NOTE [cpu layout] in
// adam_cpu.cpp). max_exp_avg_sq is null unless amsgrad.
struct TensorPtrs {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
};

// The compile-time modes of one step; each combination is its own instantiation of the loop.
struct Mode {
  ScalarKind dtype;
  WeightDecay weight_decay;
  bool amsgrad;
  bool maximize;
  bool unscale;  // grad_scale given: grads are divided by it and the quotient is stored back
};

// Elements [begin, begin + n) of one tensor. `scalars` points to the tensor's StepScalars<opmath> (float for
// fp32/bf16/fp16, double for fp64); grad_scale is read only when mode.unscale.
using ChunkFn = void (*)(const TensorPtrs& t, int64_t begin, int64_t n, const void* scalars, double grad_scale);

// The loop for `mode`, compiled for one ISA. Defined in kernel_<isa>.cpp.
ChunkFn adam_chunk_fn_avx512(const Mode& mode);
ChunkFn adam_chunk_fn_avx2(const Mode& mode);
ChunkFn adam_chunk_fn_baseline(const Mode& mode);

// The bandwidth probe: fp32, Adam's access pattern (read p, g, m, v; write p, m, v), trivial arithmetic.
ChunkFn roofline_chunk_fn_avx512();
ChunkFn roofline_chunk_fn_avx2();
ChunkFn roofline_chunk_fn_baseline();

}  // namespace cpu
}  // namespace fused_adam
