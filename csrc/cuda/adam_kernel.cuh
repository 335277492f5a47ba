// Multi-tensor-apply Adam/AdamW kernel: one block per chunk of a chunk table spanning all tensors of a group
// (NOTE [chunk table], NOTE [launch plan]); per element it runs fused_adam::adam_update from adam_math.h, the
// same code the CPU kernel runs, and reads/writes every byte once (28 B/param for fp32, 14 B for bf16).
// Structure after PyTorch's multi_tensor_apply.cuh / apex: the launch metadata (tensor addresses, sizes, per-tensor
// scalars, block -> (tensor, chunk) map) travels in the kernel parameters, so a step needs no host-to-device copy
// and can be captured in a CUDA graph.
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
#include <vector>

#include "adam_math.h"
#include "cuda/adam_cuda.h"
#include "cuda/launch_plan.h"

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

constexpr int kBlockThreads = 512;
constexpr int kScalarILP = 4;  // scalar path: elements in flight per thread per array
// Launch capacity. sizeof(LaunchArgs<double>) = 3,800 B (<float>: 3,512 B): under the 4 KB kernel-parameter
// limit of pre-12.1 toolkits and pre-Volta archs (static_assert below). A slot is 64 B (5 pointers, numel, two
// opmath scalars or the step pointer), a block 5 B (uint8 slot, int32 chunk).
constexpr int kMaxTensors = 32;  // also the thread count of the increment kernel
constexpr int kMaxBlocks = 320;

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

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

template <typename O>
struct LaunchArgs {
  TensorSlot<O> tensors[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_slot[kMaxBlocks];
  StepScalars<O> scalars;  // not capturable: the step-independent fields (the rest are per slot)
  AdamHyper hyper;         // capturable: the block computes its tensor's StepScalars from these and the step
  const double* lr;        // capturable: lr on the device, or null (hyper.lr)
  const float* grad_scale;
  const float* found_inf;
  int64_t chunk_size;
  bool device_scalars;     // capturable
};
static_assert(sizeof(LaunchArgs<double>) <= 4096 - 64, "launch metadata must fit the 4 KB kernel parameter limit");
static_assert(sizeof(LaunchArgs<float>) <= 4096 - 64, "launch metadata must fit the 4 KB kernel parameter limit");
static_assert(kMaxTensors <= 256, "block_slot is a uint8_t");

struct IncrementArgs {
  float* step[kMaxTensors];
  const float* found_inf;
  int32_t count;
};

// Storage <-> opmath conversions: one rounding per store.
__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ double to_op(double x) { return x; }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_op(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_op(opmath_t<T> x);
template <> __device__ __forceinline__ float from_op<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_op<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_op<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T, loaded and stored as one 128-bit access (an aggregate of T: no type punning).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE>
struct Elementwise {
  using O = opmath_t<T>;
  // One element at index i of each buffer.
  __device__ __forceinline__ static void scalar(T* __restrict__ p, T* __restrict__ g, T* __restrict__ m,
                                                T* __restrict__ v, T* __restrict__ vmax, int64_t i,
                                                const StepScalars<O>& s, O scale) {
    O rp = to_op(p[i]), rg = to_op(g[i]), rm = to_op(m[i]), rv = to_op(v[i]);
    O rvmax = AMSGRAD ? to_op(vmax[i]) : O(0);
    adam_update<O, WD, AMSGRAD, MAXIMIZE, UNSCALE>(rp, rg, rm, rv, rvmax, s, scale);
    p[i] = from_op<T>(rp);
    if (UNSCALE) g[i] = from_op<T>(rg);
    m[i] = from_op<T>(rm);
    v[i] = from_op<T>(rv);
    if (AMSGRAD) vmax[i] = from_op<T>(rvmax);
  }
};

// One block = one chunk. VECTOR: every buffer of the launch is 16-byte aligned and chunk_size is a multiple of 8,
// so each thread moves 16 B per buffer per access (4 fp32, 8 bf16/fp16, 2 fp64); the chunk's tail that does not
// fill 16 B runs element by element. Otherwise kScalarILP strided elements per thread are loaded before any is
// computed. Indices inside a chunk are int (chunk_size <= 2^30); tensor offsets are int64.
template <typename T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) adam_step_kernel(const LaunchArgs<opmath_t<T>> args) {
  using O = opmath_t<T>;
  using E = Elementwise<T, WD, AMSGRAD, MAXIMIZE, UNSCALE>;
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;  // uniform over the grid

  const int slot = args.block_slot[blockIdx.x];
  const TensorSlot<O>& ts = args.tensors[slot];
  const int64_t start = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * args.chunk_size;
  const int64_t left = ts.numel - start;
  const int n = static_cast<int>(left < args.chunk_size ? left : args.chunk_size);

  StepScalars<O> s;
  if (args.device_scalars) {
    // The step was incremented by increment_steps_kernel before this launch (NOTE [launch plan]).
    __shared__ StepScalars<O> shared;
    if (threadIdx.x == 0) {
      AdamHyper h = args.hyper;
      if (args.lr != nullptr) h.lr = *args.lr;
      shared = make_step_scalars<O>(h, static_cast<double>(*ts.step));
    }
    __syncthreads();
    s = shared;
  } else {
    s = args.scalars;
    s.neg_step_size = ts.host.neg_step_size;
    s.bias_correction2_sqrt = ts.host.bias_correction2_sqrt;
  }
  const O scale = UNSCALE ? static_cast<O>(*args.grad_scale) : O(1);

  T* __restrict__ p = static_cast<T*>(ts.buf[kParam]) + start;
  T* __restrict__ g = static_cast<T*>(ts.buf[kGrad]) + start;
  T* __restrict__ m = static_cast<T*>(ts.buf[kExpAvg]) + start;
  T* __restrict__ v = static_cast<T*>(ts.buf[kExpAvgSq]) + start;
  T* __restrict__ vmax = AMSGRAD ? static_cast<T*>(ts.buf[kMaxExpAvgSq]) + start : nullptr;

  if (VECTOR) {
    using V = Vec16<T>;
    constexpr int kVec = V::kSize;
    const int n_vec = n / kVec;
    for (int iv = threadIdx.x; iv < n_vec; iv += kBlockThreads) {
      const V vp = reinterpret_cast<const V*>(p)[iv];
      const V vg = reinterpret_cast<const V*>(g)[iv];
      const V vm = reinterpret_cast<const V*>(m)[iv];
      const V vv = reinterpret_cast<const V*>(v)[iv];
      V vvmax;
      if (AMSGRAD) vvmax = reinterpret_cast<const V*>(vmax)[iv];
      V op, og, om, ov, ovmax;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        O rp = to_op(vp.v[k]), rg = to_op(vg.v[k]), rm = to_op(vm.v[k]), rv = to_op(vv.v[k]);
        O rvmax = AMSGRAD ? to_op(vvmax.v[k]) : O(0);
        adam_update<O, WD, AMSGRAD, MAXIMIZE, UNSCALE>(rp, rg, rm, rv, rvmax, s, scale);
        op.v[k] = from_op<T>(rp);
        og.v[k] = from_op<T>(rg);
        om.v[k] = from_op<T>(rm);
        ov.v[k] = from_op<T>(rv);
        ovmax.v[k] = from_op<T>(rvmax);
      }
      reinterpret_cast<V*>(p)[iv] = op;
      if (UNSCALE) reinterpret_cast<V*>(g)[iv] = og;
      reinterpret_cast<V*>(m)[iv] = om;
      reinterpret_cast<V*>(v)[iv] = ov;
      if (AMSGRAD) reinterpret_cast<V*>(vmax)[iv] = ovmax;
    }
    for (int i = n_vec * kVec + static_cast<int>(threadIdx.x); i < n; i += kBlockThreads) {
      E::scalar(p, g, m, v, vmax, i, s, scale);
    }
  } else {
    for (int base = 0; base < n; base += kBlockThreads * kScalarILP) {
      O rp[kScalarILP], rg[kScalarILP], rm[kScalarILP], rv[kScalarILP], rvmax[kScalarILP];
#pragma unroll
      for (int k = 0; k < kScalarILP; ++k) {
        const int i = base + k * kBlockThreads + static_cast<int>(threadIdx.x);
        if (i < n) {
          rp[k] = to_op(p[i]);
          rg[k] = to_op(g[i]);
          rm[k] = to_op(m[i]);
          rv[k] = to_op(v[i]);
          rvmax[k] = AMSGRAD ? to_op(vmax[i]) : O(0);
        }
      }
#pragma unroll
      for (int k = 0; k < kScalarILP; ++k) {
        if (base + k * kBlockThreads + static_cast<int>(threadIdx.x) < n) {
          adam_update<O, WD, AMSGRAD, MAXIMIZE, UNSCALE>(rp[k], rg[k], rm[k], rv[k], rvmax[k], s, scale);
        }
      }
#pragma unroll
      for (int k = 0; k < kScalarILP; ++k) {
        const int i = base + k * kBlockThreads + static_cast<int>(threadIdx.x);
        if (i < n) {
          p[i] = from_op<T>(rp[k]);
          if (UNSCALE) g[i] = from_op<T>(rg[k]);
          m[i] = from_op<T>(rm[k]);
          v[i] = from_op<T>(rv[k]);
          if (AMSGRAD) vmax[i] = from_op<T>(rvmax[k]);
        }
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
// arguments, picks the vector path per tensor and packs the chunk table into launches.
inline std::vector<PlannedLaunch> plan_step(const AdamTensor* tensors, int64_t num_tensors, AdamStepOptions& o) {
  if (num_tensors < 0) throw std::invalid_argument("adam_step_cuda: negative num_tensors");
  if (o.chunk_size == 0) o.chunk_size = kDefaultChunkSize;
  if (o.chunk_size <= 0 || o.chunk_size % 8 != 0 || o.chunk_size > (int64_t{1} << 30)) {
    throw std::invalid_argument("adam_step_cuda: chunk_size must be a positive multiple of 8 up to 2^30, got " +
                                std::to_string(o.chunk_size));
  }
  if (!o.capturable && o.lr_device != nullptr) {
    throw std::invalid_argument("adam_step_cuda: lr_device needs capturable (else the host computes the scalars)");
  }
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
    if (!t.param || !t.grad || !t.exp_avg || !t.exp_avg_sq || (o.amsgrad && !t.max_exp_avg_sq)) {
      throw std::invalid_argument(which + "null buffer pointer");
    }
    vector_ok[i] = aligned16(t.param) && aligned16(t.grad) && aligned16(t.exp_avg) && aligned16(t.exp_avg_sq) &&
                   (!o.amsgrad || aligned16(t.max_exp_avg_sq));
  }
  return plan_launches(numels, vector_ok, o.chunk_size, kMaxTensors, kMaxBlocks);
}

// Fills the metadata of every planned launch and hands it over: `increment(const IncrementArgs&)` for the
// capturable step increments of the launch, then `update(kernel, grid, const LaunchArgs<O>&)` with the kernel
// instantiation of the options. Returns the first error either returns.
template <typename T, typename Update, typename Increment>
cudaError_t run_plan(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o,
                     Update&& update, Increment&& increment) {
  using O = opmath_t<T>;
  const WeightDecay wd = o.hyper.weight_decay == 0.0 ? WeightDecay::kNone
                         : o.decoupled                ? WeightDecay::kDecoupled
                                                      : WeightDecay::kL2;
  LaunchArgs<O> args{};
  args.hyper = o.hyper;
  args.lr = o.lr_device;
  args.grad_scale = o.grad_scale;
  args.found_inf = o.found_inf;
  args.chunk_size = o.chunk_size;
  args.device_scalars = o.capturable;
  args.scalars = make_step_scalars<O>(o.hyper, 1.0);  // step-independent fields; the others are per slot
  if (!std::isnan(o.decay)) args.scalars.decay = static_cast<O>(o.decay);
  for (const PlannedLaunch& launch : plan) {
    IncrementArgs inc{};
    inc.found_inf = o.found_inf;
    for (size_t i = 0; i < launch.slots.size(); ++i) {
      const AdamTensor& t = tensors[launch.slots[i].tensor];
      TensorSlot<O>& ts = args.tensors[i];
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
        return FA_BOOL_SWITCH(o.maximize, kMaximize, [&] {
          return FA_BOOL_SWITCH(o.grad_scale != nullptr, kUnscale, [&] {
            return FA_BOOL_SWITCH(launch.vector, kVector, [&] {
              return update(adam_step_kernel<T, kWD, kAmsgrad, kMaximize, kUnscale, kVector>, grid,
                            static_cast<const LaunchArgs<O>&>(args));
            });
          });
        });
      });
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#if defined(__CUDACC__)
__global__ void increment_steps_kernel(const IncrementArgs args);  // adam_cuda.cu

// Enqueues every planned launch of one dtype on `stream`. Instantiated once per dtype in adam_cuda_<dtype>.cu,
// so the dtypes compile in parallel.
template <typename T>
cudaError_t launch_adam(const AdamTensor* tensors, const std::vector<PlannedLaunch>& plan, const AdamStepOptions& o,
                        cudaStream_t stream) {
  using O = opmath_t<T>;
  return run_plan<T>(
      tensors, plan, o,
      [&](void (*kernel)(const LaunchArgs<O>), unsigned grid, const LaunchArgs<O>& args) {
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
