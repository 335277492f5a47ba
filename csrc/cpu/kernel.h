// The CPU kernel's torch-free interface: what the dispatcher (adam_cpu.cpp, threads over the chunk table) hands
// to the per-ISA element loops (kernel_impl.h, compiled once per ISA by kernel_{avx512,avx2,baseline}.cpp).
//
// NOTE [cpu ISA dispatch]: the package may not be built with -march=native, so the loop is compiled three times
// under `#pragma GCC target` (AVX-512, AVX2+FMA+F16C, baseline x86-64) and one is picked at run time with
// __builtin_cpu_supports. Each ISA's instantiations live in their own namespace, and the loops are `flatten`
// (everything they call from adam_math.h is inlined), so no AVX-512 code can leak into another ISA's path
// through a shared weak symbol. The per-ISA translation units include no torch header for the same reason.
// A fourth, AVX-512 with AVX512_BF16 (kernel_avx512bf16.cpp, its own runtime check: Zen 4/5, Cooper Lake,
// Sapphire Rapids have it, Ice Lake and Skylake-X do not), replaces only the bf16 loops (torch parity; bf16 params
// with bf16 states, no master) with ones written with intrinsics (bf16_avx512.h) and hands every other mode to the
// AVX-512 build.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "adam_math.h"
#include "common/dtype.h"
#include "common/static_switch.h"
#include "rounding.h"

namespace fused_adam {
namespace cpu {

enum class Isa : uint8_t { kBaseline, kAvx2, kAvx512, kAvx512Bf16 };

// One tensor of a multi-tensor step as raw memory: all six arrays share one flat layout (NOTE [flat layout] in
// csrc/common/tensor_pass.h). max_exp_avg_sq is null unless amsgrad, master null unless master weights.
struct TensorPtrs {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* master;     // master weights: the fp32 copy the update runs on; `param` gets its rounding to nearest
  uint32_t salt[4];  // stochastic rounding: sr_salt (csrc/rounding.h) of this tensor's step, per Stream
};

// The compile-time modes of one step; each combination is its own instantiation of the loop.
struct Mode {
  DType dtype;        // params and grads
  DType state_dtype;  // exp_avg, exp_avg_sq, max_exp_avg_sq
  WeightDecay weight_decay;
  bool amsgrad;
  bool maximize;
  bool unscale;              // grad_scale given: grads are divided by it and the quotient is stored back
  bool master;               // master weights (bf16/fp16 params only)
  bool sr_param;             // the param stores round stochastically (StepOptions::sr_param)
  bool sr_state;             // the state stores round stochastically (StepOptions::sr_state)
  bool clip;                 // the grad is multiplied by StepArgs::grad_mul for the update (clip_grad_norm_)
};

// NOTE [cpu feature loops]: a step with none of the options beyond torch runs the torch-parity loop, one
// instantiation per (dtype, weight decay, amsgrad, maximize, unscale). A step with any of them (state_dtype,
// master weights, stochastic rounding, clip) runs the feature loop, which is templated on the storage types
// instead, and keeps its mode count down with two exact rewrites:
//   * maximize and clip are one multiply, grad * (maximize ? -c : c) with c = 1 when not clipping
//     (-(g * c) == g * -c in round-to-nearest; only the sign of a NaN can differ from torch's -g);
//   * no weight decay is decoupled decay by 1 - lr * 0 = 1 (p * 1 == p).
// Only the storage combinations below are instantiated; adam_cpu.cpp declines the others with a reason, and the
// Python backend (backends/cpu.py) declines them before the call so that auto falls back to the reference.
// X(param dtype, state dtype, master, sr_param, sr_state): the stores that round stochastically are the caller's
// decision (StepOptions, from PartOptions); the list has the combinations PartOptions makes.
#define FA_CPU_FEATURE_KINDS(X)                                                                \
  X(DType::kFloat32, DType::kFloat32, false, false, false)     /* fp32, clip */                \
  X(DType::kFloat64, DType::kFloat64, false, false, false)     /* fp64, clip */                \
  X(DType::kBFloat16, DType::kBFloat16, false, false, false)   /* bf16, clip */                \
  X(DType::kBFloat16, DType::kBFloat16, false, true, true)     /* bf16, SR: 14 B/param */      \
  X(DType::kFloat16, DType::kFloat16, false, false, false)     /* fp16, clip */                \
  X(DType::kFloat32, DType::kBFloat16, false, false, false)    /* 20 B/param */                \
  X(DType::kFloat32, DType::kBFloat16, false, false, true)                                     \
  X(DType::kBFloat16, DType::kFloat32, false, false, false)    /* 22 B/param */                \
  X(DType::kBFloat16, DType::kFloat32, false, true, false)                                     \
  X(DType::kFloat16, DType::kFloat32, false, false, false)                                     \
  X(DType::kBFloat16, DType::kFloat32, true, false, false)     /* master: 28 B/param */        \
  X(DType::kFloat16, DType::kFloat32, true, false, false)                                      \
  X(DType::kBFloat16, DType::kBFloat16, true, false, false)    /* master, bf16 states */       \
  X(DType::kBFloat16, DType::kBFloat16, true, false, true)

// Whether a step needs the feature loop, and whether its storage combination is instantiated.
inline bool uses_feature_loop(const Mode& m) {
  return m.state_dtype != m.dtype || m.master || m.sr_param || m.sr_state || m.clip;
}
inline bool feature_kind_instantiated(const Mode& m) {
#define FA_CPU_IS_KIND(PK, SK, MASTER, SR_PARAM, SR_STATE)                                                 \
  if (m.dtype == PK && m.state_dtype == SK && m.master == MASTER && m.sr_param == SR_PARAM && m.sr_state == SR_STATE) \
    return true;
  FA_CPU_FEATURE_KINDS(FA_CPU_IS_KIND)
#undef FA_CPU_IS_KIND
  return false;
}

// Runtime arguments of one step, the same for every tensor.
struct StepArgs {
  double grad_scale;  // read only when mode.unscale
  double grad_mul;    // feature loop only: (maximize ? -1 : 1) * clip coefficient
};

// Elements [begin, begin + n) of one tensor. `scalars` points to the tensor's StepScalars<opmath> (float for
// fp32/bf16/fp16 params, double for fp64).
using ChunkFn = void (*)(const TensorPtrs& t, int64_t begin, int64_t n, const void* scalars, const StepArgs& args);

// The loop for `mode`, compiled for one ISA. Defined in kernel_<isa>.cpp.
ChunkFn adam_chunk_fn_avx512bf16(const Mode& mode);
ChunkFn adam_chunk_fn_avx512(const Mode& mode);
ChunkFn adam_chunk_fn_avx2(const Mode& mode);
ChunkFn adam_chunk_fn_baseline(const Mode& mode);

// The bandwidth probe: fp32, Adam's access pattern (read p, g, m, v; write p, m, v), trivial arithmetic.
ChunkFn roofline_chunk_fn_avx512bf16();
ChunkFn roofline_chunk_fn_avx512();
ChunkFn roofline_chunk_fn_avx2();
ChunkFn roofline_chunk_fn_baseline();

// The AVX512_BF16 loop's bf16 stores against Storage<kBFloat16>::store, for the float bit patterns [begin, end):
// the number of mismatches (bf16_avx512.h). Only on a CPU with AVX512_BF16.
uint64_t bf16_store_mismatches_avx512bf16(uint64_t begin, uint64_t end);

}  // namespace cpu
}  // namespace fused_adam
