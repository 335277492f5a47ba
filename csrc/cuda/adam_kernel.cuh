// Multi-tensor-apply Adam/AdamW kernel: one block per chunk of a chunk table spanning all tensors of a group
// (NOTE [chunk table], NOTE [launch plan]); per element it runs fused_adam::adam_update from adam_math.h, the
// same code the CPU kernel runs, and reads/writes every byte once (28 B/param for fp32, 14 B for bf16, 20 B for
// fp32 params with bf16 states, 28 B for bf16 params with an fp32 master and fp32 states: DESIGN.md's cost model).
// Structure after PyTorch's multi_tensor_apply.cuh / apex: the launch metadata (tensor addresses, sizes, per-tensor
// scalars, block -> (tensor, chunk) map) travels in the kernel parameters, so a step needs no host-to-device copy
// and can be captured in a CUDA graph.
// The options beyond torch (backends/__init__.py): states in their own dtype (a state type S beside the param type
// P), fp32 master weights (the update reads and writes the master; the param gets it rounded to nearest), stochastic
// rounding of bf16 stores that are the only copy of a value (csrc/rounding.h: per-tensor salt, per-element bits),
// and gradient clipping by a coefficient read from device memory.
// Torch-free (CUDA runtime, cuda_fp16.h, cuda_bf16.h). Included by the .cu files of csrc/cuda, and compiled as host
// C++ by the CPU emulation test (tests/test_cuda_build.py), which runs plan_step, run_plan and the kernel body on
// CPU tensors: only the `<<<>>>` launches in launch_adam are CUDA-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "adam_math.h"
#include "cuda/adam_cuda.h"
#include "cuda/launch_plan.h"
#include "rounding.h"

namespace fused_adam {
namespace cuda {

// flash-attention's BOOL_SWITCH: a runtime bool becomes the constexpr NAME inside the lambda body.
#define FA_BOOL_SWITCH(COND, NAME, ...)   \
  [&] {                                   \
    if (COND) {                           \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();               \
    }                                     \
  }()

#define FA_WEIGHT_DECAY_SWITCH(MODE, NAME, ...)                                    \
  [&] {                                                                            \
    if ((MODE) == WeightDecay::kDecoupled) {                                       \
      constexpr static WeightDecay NAME = WeightDecay::kDecoupled;                 \
      return __VA_ARGS__();                                                        \
    } else if ((MODE) == WeightDecay::kL2) {                                       \
      constexpr static WeightDecay NAME = WeightDecay::kL2;                        \
      return __VA_ARGS__();                                                        \
    } else {                                                                       \
      constexpr static WeightDecay NAME = WeightDecay::kNone;                      \
      return __VA_ARGS__();                                                        \
    }                                                                              \
  }()

// Named slots of a tensor's buffers (PyTorch's kParamIdx habit).
enum Buf : int { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kNumBufs = 5 };
constexpr int kNumStreams = 4;  // csrc/rounding.h's Stream: param, exp_avg, exp_avg_sq, max_exp_avg_sq

constexpr int kBlockThreads = 512;
constexpr int kScalarILP = 4;  // scalar path: elements in flight per thread per array
// Launch capacity. Kernel parameters are limited to 4 KB on pre-12.1 toolkits and pre-Volta archs (static_asserts
// below). A block is 5 B (uint8 slot, int32 chunk). A slot is 56 B for float opmath, 64 B for double (5 pointers,
// numel, two opmath scalars or the step pointer): 32 slots, sizeof(LaunchArgs<double, false>) = 3,816 B (<float>:
// 3,528 B). Launches with master weights or stochastic rounding (float opmath only) have 80 B slots (+ the master
// pointer, and four salts or the tensor id): 28 slots, sizeof(LaunchArgs<float, true>) = 3,976 B.
constexpr int kMaxTensors = 32;  // also the thread count of the increment kernel
constexpr int kMaxTensorsExt = 28;
constexpr int kMaxBlocks = 320;
constexpr size_t kParamBytes = 4096 - 64;  // what a launch may use of the 4 KB, with room for the ABI's own

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

// What one instantiation stores: params and grads of P, states of S, an fp32 master (MASTER), stochastic rounding (SR).
template <typename P, typename S, bool MASTER, bool SR>
struct Layout {
  using O = opmath_t<P>;
  static_assert(std::is_same<O, opmath_t<S>>::value, "params and states share one opmath type");
  // Stochastic rounding applies to the bf16 stores that are the only copy of a value.
  static constexpr bool kSrParam = SR && std::is_same<P, __nv_bfloat16>::value && !MASTER;
  static constexpr bool kSrState = SR && std::is_same<S, __nv_bfloat16>::value;
  // Compiled: masters of 16-bit params only; SR only where it rounds something (plan_step turns it off elsewhere).
  static constexpr bool kValid = (!MASTER || sizeof(P) == 2) && (!SR || kSrParam || kSrState);
  static constexpr bool kExtSlot = MASTER || SR;
  // Vector path: elements per thread per access, 16 B of the narrowest array. Every array's access is then a whole
  // number of 16 B (fp32 arrays beside 16-bit ones move 32 B: two 128-bit accesses) and stays 16-byte aligned.
  static constexpr int kVec = 16 / static_cast<int>(sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S));
  // __launch_bounds__' minimum blocks per SM. Layouts with an fp32 array beside 16-bit ones hold 8 elements of up
  // to 6 arrays per thread; left to itself ptxas squeezes some of them into 64 registers (two 512-thread blocks per
  // SM) with a few bytes of spills. 1 lets them take what they need (one block of 16 warps per SM, each thread with
  // 7 to 9 128-bit loads in flight: ~64 KB per SM, several times what bandwidth x latency asks for). 0: no minimum,
  // ptxas' own choice, as before these layouts existed.
  static constexpr int kMinBlocks = (kVec == 8 && (MASTER || sizeof(P) == 4 || sizeof(S) == 4)) ? 1 : 0;
};

template <typename O>
struct TensorSlot {
  void* buf[kNumBufs];
  int64_t numel;
  union {
    struct {
      O neg_step_size;          // host-computed (not capturable), see StepScalars
      O bias_correction2_sqrt;
    } host;
    float* step;                // capturable: read on the device
  };
};

// A slot of a launch with master weights or stochastic rounding.
template <typename O>
struct TensorSlotExt : TensorSlot<O> {
  float* master;                 // MASTER: the fp32 master, read and written instead of the param
  union {
    uint32_t salt[kNumStreams];  // SR, not capturable: sr_salt(seed, step, tensor, stream), indexed by Stream
    uint64_t tensor;             // SR, capturable: the tensor id; the block computes the salts from the device step
  };
};

template <typename O, bool EXT>
struct LaunchArgs {
  static constexpr int kTensors = EXT ? kMaxTensorsExt : kMaxTensors;
  typename std::conditional<EXT, TensorSlotExt<O>, TensorSlot<O>>::type tensors[kTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_slot[kMaxBlocks];
  StepScalars<O> scalars;  // not capturable: the step-independent fields (the rest are per slot)
  AdamHyper hyper;         // capturable: the block computes its tensor's StepScalars from these and the step
  const double* lr;        // capturable: lr on the device, or null (hyper.lr)
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;  // or null: no clipping
  int64_t chunk_size;
  uint64_t seed;           // SR, capturable
  bool device_scalars;     // capturable
  bool maximize;
};
static_assert(sizeof(LaunchArgs<double, false>) <= kParamBytes, "launch metadata must fit the 4 KB parameter limit");
static_assert(sizeof(LaunchArgs<float, false>) <= kParamBytes, "launch metadata must fit the 4 KB parameter limit");
static_assert(sizeof(LaunchArgs<float, true>) <= kParamBytes, "launch metadata must fit the 4 KB parameter limit");
static_assert(kMaxTensors <= 256 && kMaxTensorsExt <= kMaxTensors, "block_slot is a uint8_t; IncrementArgs has 32");

struct IncrementArgs {
  float* step[kMaxTensors];
  const float* found_inf;
  int32_t count;
};

// Storage <-> opmath conversions: one rounding per store (to nearest, or stochastic to bf16).
__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ double to_op(double x) { return x; }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_op(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_op(opmath_t<T> x);
template <> __device__ __forceinline__ float from_op<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_op<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_op<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T: stochastically to bf16 with element `index`'s bits of `salt` (bitwise the reference backend's
// bf16_stochastic), else to nearest.
template <typename T, bool STOCHASTIC>
__device__ __forceinline__ T round_store(opmath_t<T> x, uint32_t salt, int64_t index) {
  if constexpr (STOCHASTIC) {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "stochastic rounding is to bf16");
    __nv_bfloat16_raw r;
    r.x = bf16_bits_sr(x, sr_bits(salt, index));
    return __nv_bfloat16(r);
  } else {
    return from_op<T>(x);
  }
}

// A thread's N consecutive elements of one array on the vector path, as 16-byte pieces loaded and stored with
// 128-bit accesses (aggregates of T: no type punning). A piece is stored as soon as its last element is computed,
// so an fp32 array beside 16-bit ones (N = 8: two pieces) frees its first piece's registers half way.
template <typename T, int N>
struct Pieces {
  struct alignas(16) Vec16 {
    T v[16 / sizeof(T)];
  };
  static constexpr int kPer = 16 / sizeof(T);
  static constexpr int kCount = N / kPer;
  static_assert(N % kPer == 0, "a thread's elements are whole 16-byte pieces");
  Vec16 piece[kCount];

  __device__ __forceinline__ void load(const T* base, int iv) {
#pragma unroll
    for (int c = 0; c < kCount; ++c) piece[c] = reinterpret_cast<const Vec16*>(base)[iv * kCount + c];
  }
  __device__ __forceinline__ T& operator[](int k) { return piece[k / kPer].v[k % kPer]; }
  // Stores the piece that element k completes, if it does (k is a compile-time constant of an unrolled loop).
  __device__ __forceinline__ void store_if_complete(T* base, int iv, int k) const {
    if ((k + 1) % kPer == 0) reinterpret_cast<Vec16*>(base)[iv * kCount + k / kPer] = piece[k / kPer];
  }
};

// One element's update and the values it stores, shared by the vector and scalar paths.
template <typename P, typename S, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool MASTER, bool SR>
struct Elementwise {
  using L = Layout<P, S, MASTER, SR>;
  using O = typename L::O;
  // maximize and clipping are one signed coefficient on the grad: g * (-c) is -(g * c) bitwise (IEEE multiplication
  // is sign-symmetric), and g * 1 is g, so one instantiation serves all four (one FMUL per element).
  __device__ __forceinline__ static void update(O& p, O& g, O& m, O& v, O& vmax, const StepScalars<O>& s, O scale,
                                                O coef) {
    adam_update<O, WD, AMSGRAD, /*MAXIMIZE=*/false, UNSCALE, /*CLIP=*/true>(p, g, m, v, vmax, s, scale, coef);
  }
  __device__ __forceinline__ static P param(O x, const uint32_t* salt, int64_t index) {
    return round_store<P, L::kSrParam>(x, salt[static_cast<int>(Stream::kParam)], index);
  }
  __device__ __forceinline__ static S state(O x, const uint32_t* salt, Stream stream, int64_t index) {
    return round_store<S, L::kSrState>(x, salt[static_cast<int>(stream)], index);
  }
};

// One block = one chunk. VECTOR: every buffer of the launch is 16-byte aligned and chunk_size is a multiple of 8,
// so each thread moves whole 16 B per buffer per access (Layout::kVec elements: 4 fp32, 8 bf16/fp16, 2 fp64, 8 when
// any array is 16-bit); the chunk's tail that does not fill a vector runs element by element. Otherwise
// kScalarILP strided elements per thread are loaded before any is computed. Indices inside a chunk are int
// (chunk_size <= 2^30); tensor offsets and the element index of stochastic rounding are int64.
template <typename P, typename S, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool MASTER, bool SR, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads, (Layout<P, S, MASTER, SR>::kMinBlocks))
    adam_step_kernel(const LaunchArgs<opmath_t<P>, MASTER || SR> args) {
  using L = Layout<P, S, MASTER, SR>;
  using O = typename L::O;
  using E = Elementwise<P, S, WD, AMSGRAD, UNSCALE, MASTER, SR>;
  static_assert(L::kValid, "no such layout (plan_step)");
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;  // uniform over the grid

  const int slot = args.block_slot[blockIdx.x];
  const auto& ts = args.tensors[slot];
  const int64_t start = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * args.chunk_size;
  const int64_t left = ts.numel - start;
  const int n = static_cast<int>(left < args.chunk_size ? left : args.chunk_size);

  StepScalars<O> s;
  uint32_t salt[kNumStreams] = {0, 0, 0, 0};
  if (args.device_scalars) {
    // The step was incremented by increment_steps_kernel before this launch (NOTE [launch plan]).
    __shared__ StepScalars<O> shared;
    __shared__ uint32_t shared_salt[kNumStreams];
    if (threadIdx.x == 0) {
      AdamHyper h = args.hyper;
      if (args.lr != nullptr) h.lr = *args.lr;
      const float step = *ts.step;
      shared = make_step_scalars<O>(h, static_cast<double>(step));
      if constexpr (SR) {
        for (int k = 0; k < kNumStreams; ++k) {
          shared_salt[k] = sr_salt(args.seed, static_cast<uint64_t>(step), ts.tensor, static_cast<Stream>(k));
        }
      }
    }
    __syncthreads();
    s = shared;
    if constexpr (SR) {
      for (int k = 0; k < kNumStreams; ++k) salt[k] = shared_salt[k];
    }
  } else {
    s = args.scalars;
    s.neg_step_size = ts.host.neg_step_size;
    s.bias_correction2_sqrt = ts.host.bias_correction2_sqrt;
    if constexpr (SR) {
      for (int k = 0; k < kNumStreams; ++k) salt[k] = ts.salt[k];
    }
  }
  const O scale = UNSCALE ? static_cast<O>(*args.grad_scale) : O(1);
  O coef = args.clip_coef != nullptr ? static_cast<O>(*args.clip_coef) : O(1);
  if (args.maximize) coef = -coef;

  P* __restrict__ p = static_cast<P*>(ts.buf[kParam]) + start;
  P* __restrict__ g = static_cast<P*>(ts.buf[kGrad]) + start;
  S* __restrict__ m = static_cast<S*>(ts.buf[kExpAvg]) + start;
  S* __restrict__ v = static_cast<S*>(ts.buf[kExpAvgSq]) + start;
  S* __restrict__ vmax = AMSGRAD ? static_cast<S*>(ts.buf[kMaxExpAvgSq]) + start : nullptr;
  float* __restrict__ master = nullptr;
  if constexpr (MASTER) master = ts.master + start;

  // Stores element i's opmath values, each rounded once (scalar path and the vector path's tail).
  const auto store = [&](int i, O rp, O rg, O rm, O rv, O rvmax) {
    const int64_t index = start + i;
    if constexpr (MASTER) {
      master[i] = rp;
      p[i] = from_op<P>(rp);
    } else {
      p[i] = E::param(rp, salt, index);
    }
    if (UNSCALE) g[i] = from_op<P>(rg);
    m[i] = E::state(rm, salt, Stream::kExpAvg, index);
    v[i] = E::state(rv, salt, Stream::kExpAvgSq, index);
    if (AMSGRAD) vmax[i] = E::state(rvmax, salt, Stream::kMaxExpAvgSq, index);
  };

  if (VECTOR) {
    constexpr int kVec = L::kVec;
    const int n_vec = n / kVec;
    for (int iv = threadIdx.x; iv < n_vec; iv += kBlockThreads) {
      Pieces<P, kVec> vp, vg;
      Pieces<S, kVec> vm, vv, vvmax;
      typename std::conditional<MASTER, Pieces<float, kVec>, Pieces<P, kVec>>::type vmaster;  // unused if !MASTER
      if constexpr (MASTER) {
        vmaster.load(master, iv);
      } else {
        vp.load(p, iv);
      }
      vg.load(g, iv);
      vm.load(m, iv);
      vv.load(v, iv);
      if (AMSGRAD) vvmax.load(vmax, iv);
      const int64_t index0 = start + static_cast<int64_t>(iv) * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        O rp;
        if constexpr (MASTER) {
          rp = vmaster[k];
        } else {
          rp = to_op(vp[k]);
        }
        O rg = to_op(vg[k]), rm = to_op(vm[k]), rv = to_op(vv[k]);
        O rvmax = AMSGRAD ? to_op(vvmax[k]) : O(0);
        E::update(rp, rg, rm, rv, rvmax, s, scale, coef);
        if constexpr (MASTER) {
          vmaster[k] = rp;
          vmaster.store_if_complete(master, iv, k);
          vp[k] = from_op<P>(rp);
        } else {
          vp[k] = E::param(rp, salt, index0 + k);
        }
        vp.store_if_complete(p, iv, k);
        if (UNSCALE) {
          vg[k] = from_op<P>(rg);
          vg.store_if_complete(g, iv, k);
        }
        vm[k] = E::state(rm, salt, Stream::kExpAvg, index0 + k);
        vm.store_if_complete(m, iv, k);
        vv[k] = E::state(rv, salt, Stream::kExpAvgSq, index0 + k);
        vv.store_if_complete(v, iv, k);
        if (AMSGRAD) {
          vvmax[k] = E::state(rvmax, salt, Stream::kMaxExpAvgSq, index0 + k);
          vvmax.store_if_complete(vmax, iv, k);
        }
      }
    }
    for (int i = n_vec * kVec + static_cast<int>(threadIdx.x); i < n; i += kBlockThreads) {
      O rp;
      if constexpr (MASTER) {
        rp = master[i];
      } else {
        rp = to_op(p[i]);
      }
      O rg = to_op(g[i]), rm = to_op(m[i]), rv = to_op(v[i]);
      O rvmax = AMSGRAD ? to_op(vmax[i]) : O(0);
      E::update(rp, rg, rm, rv, rvmax, s, scale, coef);
      store(i, rp, rg, rm, rv, rvmax);
    }
  } else {
    for (int base = 0; base < n; base += kBlockThreads * kScalarILP) {
      O rp[kScalarILP], rg[kScalarILP], rm[kScalarILP], rv[kScalarILP], rvmax[kScalarILP];
#pragma unroll
      for (int k = 0; k < kScalarILP; ++k) {
        const int i = base + k * kBlockThreads + static_cast<int>(threadIdx.x);
        if (i < n) {
          if constexpr (MASTER) {
            rp[k] = master[i];
          } else {
            rp[k] = to_op(p[i]);
          }
          rg[k] = to_op(g[i]);
          rm[k] = to_op(m[i]);
          rv[k] = to_op(v[i]);
          rvmax[k] = AMSGRAD ? to_op(vmax[i]) : O(0);
        }
      }
#pragma unroll
      for (int k = 0; k < kScalarILP; ++k) {
        if (base + k * kBlockThreads + static_cast<int>(threadIdx.x) < n) {
          E::update(rp[k], rg[k], rm[k], rv[k], rvmax[k], s, scale, coef);
        }
      }
#pragma unroll
      for (int k = 0; k < kScalarILP; ++k) {
        const int i = base + k * kBlockThreads + static_cast<int>(threadIdx.x);
        if (i < n) store(i, rp[k], rg[k], rm[k], rv[k], rvmax[k]);
      }
    }
  }
}

// Capturable steps: thread i increments the step of the launch's i-th `first` slot, unless found_inf is set.
// Runs as its own kernel before the launch's update kernel (NOTE [launch plan]).
__device__ __forceinline__ void increment_steps(const IncrementArgs& args, int thread) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  if (thread < args.count) *args.step[thread] += 1.0f;
}

// Host side, shared by the launcher and the CPU emulation test (tests/test_cuda_build.py): checks the raw
// arguments, turns stochastic rounding off where it rounds nothing, picks the vector path per tensor and packs the
// chunk table into launches.
inline std::vector<PlannedLaunch> plan_step(const AdamTensor* tensors, int64_t num_tensors, DType param_dtype,
                                            DType state_dtype, AdamStepOptions& o) {
  if (num_tensors < 0) throw std::invalid_argument("adam_step_cuda: negative num_tensors");
  if (o.chunk_size == 0) o.chunk_size = kDefaultChunkSize;
  if (o.chunk_size <= 0 || o.chunk_size % 8 != 0 || o.chunk_size > (int64_t{1} << 30)) {
    throw std::invalid_argument("adam_step_cuda: chunk_size must be a positive multiple of 8 up to 2^30, got " +
                                std::to_string(o.chunk_size));
  }
  if (!o.capturable && o.lr_device != nullptr) {
    throw std::invalid_argument("adam_step_cuda: lr_device needs capturable (else the host computes the scalars)");
  }
  if (!compiled_pair(param_dtype, state_dtype)) {
    throw std::invalid_argument(std::string("adam_step_cuda: no kernel for ") + dtype_name(param_dtype) +
                                " params with " + dtype_name(state_dtype) +
                                " states (states take the param's dtype, or float32 params have bfloat16 states, or "
                                "bfloat16/float16 params have float32 states)");
  }
  if (o.master_weights && param_dtype != DType::kBFloat16 && param_dtype != DType::kFloat16) {
    throw std::invalid_argument(std::string("adam_step_cuda: master weights need bfloat16 or float16 params, got ") +
                                dtype_name(param_dtype));
  }
  o.stochastic_rounding = o.stochastic_rounding && ((param_dtype == DType::kBFloat16 && !o.master_weights) ||
                                                    state_dtype == DType::kBFloat16);
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  std::vector<int64_t> numels(static_cast<size_t>(num_tensors));
  std::vector<bool> vector_ok(static_cast<size_t>(num_tensors));
  for (int64_t i = 0; i < num_tensors; ++i) {
    const AdamTensor& t = tensors[i];
    const std::string which = "adam_step_cuda: tensor " + std::to_string(i) + ": ";
    if (t.numel < 0) throw std::invalid_argument(which + "negative numel " + std::to_string(t.numel));
    if (o.capturable && t.step_device == nullptr) throw std::invalid_argument(which + "capturable needs step_device");
    numels[i] = t.numel;
    if (t.numel == 0) {
      vector_ok[i] = true;
      continue;
    }
    if (!t.param || !t.grad || !t.exp_avg || !t.exp_avg_sq || (o.amsgrad && !t.max_exp_avg_sq) ||
        (o.master_weights && !t.master)) {
      throw std::invalid_argument(which + "null buffer pointer");
    }
    vector_ok[i] = aligned16(t.param) && aligned16(t.grad) && aligned16(t.exp_avg) && aligned16(t.exp_avg_sq) &&
                   (!o.amsgrad || aligned16(t.max_exp_avg_sq)) && (!o.master_weights || aligned16(t.master));
  }
  const bool ext = o.master_weights || o.stochastic_rounding;
  return plan_launches(numels, vector_ok, o.chunk_size, ext ? kMaxTensorsExt : kMaxTensors, kMaxBlocks);
}

// run_plan for one layout: fills the metadata of every planned launch and hands it over.
template <typename P, typename S, bool MASTER, bool SR, typename Update, typename Increment>
cudaError_t run_launches(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o,
                         Update&& update, Increment&& increment) {
  using O = opmath_t<P>;
  using Args = LaunchArgs<O, MASTER || SR>;
  static_assert(sizeof(Args) <= kParamBytes, "launch metadata must fit the 4 KB kernel parameter limit");
  const WeightDecay wd = o.hyper.weight_decay == 0.0 ? WeightDecay::kNone
                         : o.decoupled                ? WeightDecay::kDecoupled
                                                      : WeightDecay::kL2;
  Args args{};
  args.hyper = o.hyper;
  args.lr = o.lr_device;
  args.grad_scale = o.grad_scale;
  args.found_inf = o.found_inf;
  args.clip_coef = o.clip_coef;
  args.chunk_size = o.chunk_size;
  args.seed = o.seed;
  args.device_scalars = o.capturable;
  args.maximize = o.maximize;
  args.scalars = make_step_scalars<O>(o.hyper, 1.0);  // step-independent fields; the others are per slot
  if (!std::isnan(o.decay)) args.scalars.decay = static_cast<O>(o.decay);
  for (const PlannedLaunch& launch : plan) {
    if (launch.slots.size() > static_cast<size_t>(Args::kTensors)) {
      throw std::logic_error("adam_step_cuda: a launch has more tensors than its metadata holds");
    }
    IncrementArgs inc{};
    inc.found_inf = o.found_inf;
    for (size_t i = 0; i < launch.slots.size(); ++i) {
      const AdamTensor& t = tensors[launch.slots[i].tensor];
      auto& ts = args.tensors[i];
      ts.buf[kParam] = t.param;
      ts.buf[kGrad] = t.grad;
      ts.buf[kExpAvg] = t.exp_avg;
      ts.buf[kExpAvgSq] = t.exp_avg_sq;
      ts.buf[kMaxExpAvgSq] = o.amsgrad ? t.max_exp_avg_sq : nullptr;
      ts.numel = t.numel;
      if (o.capturable) {
        ts.step = t.step_device;
        if (launch.slots[i].first) inc.step[inc.count++] = t.step_device;
      } else {
        const StepScalars<O> s = make_step_scalars<O>(o.hyper, t.step);
        ts.host.neg_step_size = s.neg_step_size;
        ts.host.bias_correction2_sqrt = s.bias_correction2_sqrt;
      }
      if constexpr (MASTER || SR) {
        ts.master = MASTER ? t.master : nullptr;
        if (o.capturable) {
          ts.tensor = t.tensor_id;
        } else {
          for (int k = 0; k < kNumStreams; ++k) {
            ts.salt[k] = SR ? sr_salt(o.seed, static_cast<uint64_t>(t.step), t.tensor_id, static_cast<Stream>(k)) : 0u;
          }
        }
      }
    }
    for (size_t b = 0; b < launch.blocks.size(); ++b) {
      args.block_slot[b] = static_cast<uint8_t>(launch.blocks[b].slot);
      args.block_chunk[b] = launch.blocks[b].chunk;
    }
    if (inc.count > 0) {
      const cudaError_t err = increment(static_cast<const IncrementArgs&>(inc));
      if (err != cudaSuccess) return err;
    }
    if (launch.blocks.empty()) continue;
    const unsigned grid = static_cast<unsigned>(launch.blocks.size());
    const cudaError_t err = FA_WEIGHT_DECAY_SWITCH(wd, kWD, [&] {
      return FA_BOOL_SWITCH(o.amsgrad, kAmsgrad, [&] {
        return FA_BOOL_SWITCH(o.grad_scale != nullptr, kUnscale, [&] {
          return FA_BOOL_SWITCH(launch.vector, kVector, [&] {
            return update(adam_step_kernel<P, S, kWD, kAmsgrad, kUnscale, MASTER, SR, kVector>, grid,
                          static_cast<const Args&>(args));
          });
        });
      });
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Hands every planned launch (plan_step) to `increment(const IncrementArgs&)` for the capturable step increments of
// the launch, then to `update(kernel, grid, const LaunchArgs<O, EXT>&)` with the kernel instantiation of the
// options. Returns the first error either returns.
template <typename P, typename S, typename Update, typename Increment>
cudaError_t run_plan(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o,
                     Update&& update, Increment&& increment) {
  return FA_BOOL_SWITCH(o.master_weights, kMaster, [&] {
    return FA_BOOL_SWITCH(o.stochastic_rounding, kSr, [&] {
      if constexpr (Layout<P, S, kMaster, kSr>::kValid) {
        return run_launches<P, S, kMaster, kSr>(tensors, plan, o, update, increment);
      } else {
        return cudaErrorInvalidValue;  // unreachable: plan_step refuses or turns off what a layout cannot have
      }
    });
  });
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<P>(), TypeTag<S>()) with the storage types of a compiled (param, state) dtype pair
// (compiled_pair); throws std::invalid_argument for any other pair.
template <typename F>
auto dispatch_pair(DType param, DType state, F&& f) -> decltype(f(TypeTag<float>(), TypeTag<float>())) {
  using D = DType;
  using B = __nv_bfloat16;
  const auto pair = [](D p, D s) { return static_cast<int>(p) * 4 + static_cast<int>(s); };
  switch (pair(param, state)) {
    case pair(D::kFloat32, D::kFloat32): return f(TypeTag<float>(), TypeTag<float>());
    case pair(D::kFloat64, D::kFloat64): return f(TypeTag<double>(), TypeTag<double>());
    case pair(D::kBFloat16, D::kBFloat16): return f(TypeTag<B>(), TypeTag<B>());
    case pair(D::kFloat16, D::kFloat16): return f(TypeTag<__half>(), TypeTag<__half>());
    case pair(D::kFloat32, D::kBFloat16): return f(TypeTag<float>(), TypeTag<B>());
    case pair(D::kBFloat16, D::kFloat32): return f(TypeTag<B>(), TypeTag<float>());
    case pair(D::kFloat16, D::kFloat32): return f(TypeTag<__half>(), TypeTag<float>());
  }
  throw std::invalid_argument(std::string("adam_step_cuda: no kernel for ") + dtype_name(param) + " params with " +
                              dtype_name(state) + " states");
}

#if defined(__CUDACC__)
__global__ void increment_steps_kernel(const IncrementArgs args);  // adam_cuda.cu

// Enqueues every planned launch of one (param, state) dtype pair on `stream`. Instantiated once per pair in
// adam_cuda_<pair>.cu, so the pairs compile in parallel.
template <typename P, typename S>
cudaError_t launch_adam(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o,
                        cudaStream_t stream) {
  return run_plan<P, S>(
      tensors, plan, o,
      [&](auto kernel, unsigned grid, const auto& args) {
        kernel<<<grid, kBlockThreads, 0, stream>>>(args);
        return cudaGetLastError();
      },
      [&](const IncrementArgs& inc) {
        increment_steps_kernel<<<1, kMaxTensors, 0, stream>>>(inc);
        return cudaGetLastError();
      });
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace fused_adam
