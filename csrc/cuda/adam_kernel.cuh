// Multi-tensor Adam/AdamW kernel: one launch per step over a partition's device tables (NOTE [device table],
// device_table.h): a grid of persistent blocks strides the chunk list, a block steps one chunk at a time; per
// element it runs fused_adam::adam_update from adam_math.h, the same code the CPU kernel runs, and reads/writes every
// byte once (28 B/param for fp32, 14 B for bf16, 20 B for fp32 params with bf16 states, 28 B for bf16 params with an
// fp32 master and fp32 states: docs/design.md's cost model). Each chunk takes 128-bit accesses if every one of its
// buffers is 16-byte aligned (decided per chunk, in the kernel), else element-wise accesses; a chunk's tail that
// does not fill a vector runs element by element.
// The options beyond torch (backends/__init__.py): states in their own dtype (a state type S beside the param type
// P), fp32 master weights (the update reads and writes the master; the param gets it rounded to nearest), stochastic
// rounding of bf16 stores that are the only copy of a value (csrc/rounding.h: per-tensor salt, per-element bits),
// and gradient clipping by a coefficient read from device memory.
// Torch-free (CUDA runtime, cuda_fp16.h, cuda_bf16.h). Included by the .cu files of csrc/cuda, and compiled as host
// C++ by the CPU emulation test (tests/test_cuda_build.py), which runs run_step and the kernel body on CPU tensors
// (blocks one after another): only the `<<<>>>` launch in launch_adam is CUDA-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "adam_math.h"
#include "common/static_switch.h"
#include "cuda/adam_cuda.h"
#include "cuda/device_table.h"
#include "rounding.h"

namespace fused_adam {
namespace cuda {

// NOTE [emulation]: the CPU emulation (tests/test_cuda_build.py) compiles this file as host C++ with FA_EMULATION
// and runs a block's threads one after another, each through all of the block's chunks. There every thread computes
// the values a block shares through shared memory itself (FA_SHARED_WRITER: the same function of the same inputs),
// and the emulator runs count_device_steps for each block after all of its threads have stepped their chunks (on
// the device, the kernel's barrier orders them).
#if defined(FA_EMULATION)
#define FA_SHARED_WRITER true
#else
#define FA_SHARED_WRITER (threadIdx.x == 0)
#endif

constexpr int kNumStreams = 4;  // csrc/rounding.h's Stream: param, exp_avg, exp_avg_sq, max_exp_avg_sq

constexpr int kBlockThreads = 512;
// Element-wise path (unaligned chunks): elements in flight per thread per array. It shares its kernel with the
// vector path, and the kernel's registers are the larger path's: 4 took the fp32 kernels from 64 to 102 registers
// (one 512-thread block per SM instead of two), 2 keeps them at the vector path's 48-74. fp64 values take two
// registers each: 1 (2 spilled 16 bytes in the fp64 AdamW amsgrad unscale kernel on sm_80 at 128 registers).
template <typename O> constexpr int kScalarILP = sizeof(O) == 8 ? 1 : 2;

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

// What one instantiation stores: params and grads of P, states of S, an fp32 master (MASTER), and which stores round
// stochastically (SR_PARAM, SR_STATE: StepOptions' sr_param / sr_state, decided once by PartOptions).
template <typename P, typename S, bool MASTER, bool SR_PARAM, bool SR_STATE>
struct Layout {
  using O = opmath_t<P>;
  static_assert(std::is_same<O, opmath_t<S>>::value, "params and states share one opmath type");
  // Compiled: masters of 16-bit params only; stochastic rounding of bf16 stores, the param's only without a master.
  static constexpr bool kValid = (!MASTER || sizeof(P) == 2) &&
                                 (!SR_PARAM || (std::is_same<P, __nv_bfloat16>::value && !MASTER)) &&
                                 (!SR_STATE || std::is_same<S, __nv_bfloat16>::value);
  static constexpr bool kSr = SR_PARAM || SR_STATE;
  // Vector path: elements per thread per access, 16 B of the narrowest array. Every array's access is then a whole
  // number of 16 B (fp32 arrays beside 16-bit ones move 32 B: two 128-bit accesses) and stays 16-byte aligned.
  static constexpr int kVec = 16 / static_cast<int>(sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S));
  // __launch_bounds__' minimum blocks per SM: 1 lets every layout take the registers it needs, up to 128 (one
  // 512-thread block per SM; each thread keeps 4 to 9 128-bit loads in flight). Left to itself (0) ptxas squeezes
  // some layouts (bf16, fp64, an fp32 array beside 16-bit ones) into 64 or 128 registers with a few bytes of spills.
  static constexpr int kMinBlocks = 1;
};

// The kernel parameters: the tables' addresses and what is the same for every tensor of the step.
template <typename O>
struct KernelArgs {
  const TensorEntry* tensors;
  const ChunkEntry* chunks;
  TableHeader* header;     // kDevice: the finished-blocks counter
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_size;
  StepScalars<O> scalars;  // kUniform: every tensor's; kPerTensor: the step-independent fields
  AdamHyper hyper;         // kDevice: the block computes its tensor's StepScalars from these and the step
  const double* lr;        // kDevice: lr on the device, or null (hyper.lr)
  const double* decay;     // kDevice: AdamW's decay factor on the device, or null (from hyper and lr)
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;  // or null: no clipping
  uint64_t seed;           // stochastic rounding
  uint64_t step;           // kUniform: the step (stochastic rounding's salts)
  StepSource steps;
  bool maximize;
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
template <typename P, typename S, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool MASTER, bool SR_PARAM, bool SR_STATE>
struct Elementwise {
  using L = Layout<P, S, MASTER, SR_PARAM, SR_STATE>;
  using O = typename L::O;
  // maximize and clipping are one signed coefficient on the grad: g * (-c) is -(g * c) bitwise (IEEE multiplication
  // is sign-symmetric), and g * 1 is g, so one instantiation serves all four (one FMUL per element).
  __device__ __forceinline__ static void update(O& p, O& g, O& m, O& v, O& vmax, const StepScalars<O>& s, O scale,
                                                O coef) {
    adam_update<O, WD, AMSGRAD, /*MAXIMIZE=*/false, UNSCALE, /*CLIP=*/true>(p, g, m, v, vmax, s, scale, coef);
  }
  __device__ __forceinline__ static P param(O x, const uint32_t* salt, int64_t index) {
    return round_store<P, SR_PARAM>(x, salt[static_cast<int>(Stream::kParam)], index);
  }
  __device__ __forceinline__ static S state(O x, const uint32_t* salt, Stream stream, int64_t index) {
    return round_store<S, SR_STATE>(x, salt[static_cast<int>(stream)], index);
  }
};

// The buffers' addresses come from the device table, not from the kernel parameters, so the compiler cannot see
// they are global memory and would use generic loads and stores (LD/ST); asserting it gives LDG/STG.
#if defined(__CUDA_ARCH__)
#define FA_ASSUME_GLOBAL(ptr) __builtin_assume(__isGlobal(ptr))
#else
#define FA_ASSUME_GLOBAL(ptr) static_cast<void>(ptr)
#endif

// One chunk: elements [start, start + n) of every buffer of `t`. VECTOR: every buffer is 16-byte aligned at `start`,
// so each thread moves whole 16 B per buffer per access (Layout::kVec elements: 4 fp32, 8 bf16/fp16, 2 fp64, 8 when
// any array is 16-bit); the tail that does not fill a vector runs element by element. Otherwise kScalarILP<O>
// strided elements per thread are loaded before any is computed. Indices inside a chunk are int (chunk_size <= 2^30);
// tensor offsets and the element index of stochastic rounding are int64.
template <typename P, typename S, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool MASTER, bool SR_PARAM, bool SR_STATE,
          bool VECTOR>
__device__ __forceinline__ void step_chunk(const TensorEntry& t, int64_t start, int n,
                                           const StepScalars<opmath_t<P>>& s,
                                           const uint32_t* salt, opmath_t<P> scale, opmath_t<P> coef) {
  using L = Layout<P, S, MASTER, SR_PARAM, SR_STATE>;
  using O = typename L::O;
  using E = Elementwise<P, S, WD, AMSGRAD, UNSCALE, MASTER, SR_PARAM, SR_STATE>;
  P* __restrict__ p = static_cast<P*>(t.buf[kParam]) + start;
  P* __restrict__ g = static_cast<P*>(t.buf[kGrad]) + start;
  S* __restrict__ m = static_cast<S*>(t.buf[kExpAvg]) + start;
  S* __restrict__ v = static_cast<S*>(t.buf[kExpAvgSq]) + start;
  S* __restrict__ vmax = AMSGRAD ? static_cast<S*>(t.buf[kMaxExpAvgSq]) + start : nullptr;
  float* __restrict__ master = MASTER ? static_cast<float*>(t.buf[kMaster]) + start : nullptr;
  FA_ASSUME_GLOBAL(p);
  FA_ASSUME_GLOBAL(g);
  FA_ASSUME_GLOBAL(m);
  FA_ASSUME_GLOBAL(v);
  if (AMSGRAD) FA_ASSUME_GLOBAL(vmax);
  if (MASTER) FA_ASSUME_GLOBAL(master);

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
    constexpr int kILP = kScalarILP<O>;
    for (int base = 0; base < n; base += kBlockThreads * kILP) {
      O rp[kILP], rg[kILP], rm[kILP], rv[kILP], rvmax[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
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
      for (int k = 0; k < kILP; ++k) {
        if (base + k * kBlockThreads + static_cast<int>(threadIdx.x) < n) {
          E::update(rp[k], rg[k], rm[k], rv[k], rvmax[k], s, scale, coef);
        }
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const int i = base + k * kBlockThreads + static_cast<int>(threadIdx.x);
        if (i < n) store(i, rp[k], rg[k], rm[k], rv[k], rvmax[k]);
      }
    }
  }
}

__device__ __forceinline__ bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// kDevice: the last block of the launch to finish counts every tensor's step: every block has read its steps by
// then (each thread's reads are done before the block's barrier; the fence orders the block's count after them).
template <typename O>
__device__ __forceinline__ void count_device_steps(const KernelArgs<O>& args) {
  if (args.steps != StepSource::kDevice || (args.found_inf != nullptr && *args.found_inf != 0.0f)) return;
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&args.header->blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    __threadfence();
    for (int64_t i = threadIdx.x; i < args.num_tensors; i += kBlockThreads) *args.tensors[i].step += 1.0f;
    if (threadIdx.x == 0) args.header->blocks_done = 0;  // the next launch (a graph replay too) counts from 0
  }
}

// The step: block b steps chunks b, b + gridDim.x, ... of the chunk table (NOTE [device table]).
template <typename P, typename S, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool MASTER, bool SR_PARAM, bool SR_STATE>
__global__ void __launch_bounds__(kBlockThreads, (Layout<P, S, MASTER, SR_PARAM, SR_STATE>::kMinBlocks))
    adam_step_kernel(const KernelArgs<opmath_t<P>> args) {
  using L = Layout<P, S, MASTER, SR_PARAM, SR_STATE>;
  using O = typename L::O;
  static_assert(L::kValid, "no such layout (check_step)");
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;  // uniform over the grid: no step counted

  const O scale = UNSCALE ? static_cast<O>(*args.grad_scale) : O(1);
  O coef = args.clip_coef != nullptr ? static_cast<O>(*args.clip_coef) : O(1);
  if (args.maximize) coef = -coef;
  __shared__ StepScalars<O> shared_scalars;  // kDevice: thread 0 computes them from the tensor's device step
  __shared__ float shared_step;

  for (int64_t c = blockIdx.x; c < args.num_chunks; c += gridDim.x) {
    const ChunkEntry chunk = args.chunks[c];
    const TensorEntry& t = args.tensors[chunk.tensor];
    const int64_t start = static_cast<int64_t>(chunk.chunk) * args.chunk_size;
    const int64_t left = t.numel - start;
    const int n = static_cast<int>(left < args.chunk_size ? left : args.chunk_size);

    StepScalars<O> s = args.scalars;
    uint64_t step = args.step;
    if (args.steps == StepSource::kPerTensor) {
      s.neg_step_size = static_cast<O>(t.neg_step_size);
      s.bias_correction2_sqrt = static_cast<O>(t.bias_correction2_sqrt);
      step = static_cast<uint64_t>(t.host_step);
    } else if (args.steps == StepSource::kDevice) {
      __syncthreads();  // every thread has read the previous chunk's values
      if (FA_SHARED_WRITER) {
        AdamHyper h = args.hyper;
        if (args.lr != nullptr) h.lr = *args.lr;
        const float next = *t.step + 1.0f;  // stored by the launch's last block, after every block has read it
        shared_scalars = make_step_scalars<O>(h, static_cast<double>(next));
        if (args.decay != nullptr) shared_scalars.decay = static_cast<O>(*args.decay);
        shared_step = next;
      }
      __syncthreads();
      s = shared_scalars;
      step = static_cast<uint64_t>(shared_step);
    }
    uint32_t salt[kNumStreams] = {0, 0, 0, 0};
    if constexpr (L::kSr) {
      for (int k = 0; k < kNumStreams; ++k) salt[k] = sr_salt(args.seed, step, t.tensor_id, static_cast<Stream>(k));
    }

    bool vector = aligned16(static_cast<P*>(t.buf[kParam]) + start) &&
                  aligned16(static_cast<P*>(t.buf[kGrad]) + start) &&
                  aligned16(static_cast<S*>(t.buf[kExpAvg]) + start) &&
                  aligned16(static_cast<S*>(t.buf[kExpAvgSq]) + start);
    if (AMSGRAD) vector = vector && aligned16(static_cast<S*>(t.buf[kMaxExpAvgSq]) + start);
    if (MASTER) vector = vector && aligned16(static_cast<float*>(t.buf[kMaster]) + start);
    if (vector) {
      step_chunk<P, S, WD, AMSGRAD, UNSCALE, MASTER, SR_PARAM, SR_STATE, true>(t, start, n, s, salt, scale, coef);
    } else {
      step_chunk<P, S, WD, AMSGRAD, UNSCALE, MASTER, SR_PARAM, SR_STATE, false>(t, start, n, s, salt, scale, coef);
    }
  }

#if !defined(FA_EMULATION)
  count_device_steps(args);
#endif
}

// Host side, shared by the launcher and the CPU emulation test (tests/test_cuda_build.py): fills the kernel
// parameters of a step and hands `launch(kernel, const KernelArgs<O>&)` the kernel instantiation of its options.
template <typename P, typename S, typename Launch>
cudaError_t run_step(const DeviceTableRef& table, const StepOptions& o, const HostSteps& host, Launch&& launch) {
  using O = opmath_t<P>;
  const StepSource steps = o.capturable ? StepSource::kDevice : host.source;
  KernelArgs<O> args{};
  unsigned char* base = static_cast<unsigned char*>(table.base);
  args.header = reinterpret_cast<TableHeader*>(base);
  args.tensors = reinterpret_cast<const TensorEntry*>(base + table.tensors_offset);
  args.chunks = reinterpret_cast<const ChunkEntry*>(base + table.chunks_offset);
  args.num_tensors = table.num_tensors;
  args.num_chunks = table.num_chunks;
  args.chunk_size = table.chunk_size;
  // kPerTensor: the entries carry the step-dependent pair; kDevice: the block computes the scalars (o.decay and
  // o.tensor_hyper are not set for capturable steps)
  const bool uniform = steps == StepSource::kUniform;
  args.scalars = host_step_scalars<O>(o, uniform ? host.step : 1.0, /*with_pair=*/uniform);
  args.hyper = o.hyper;
  args.lr = o.lr_device;
  args.decay = o.decay_device;
  args.grad_scale = o.grad_scale;
  args.found_inf = o.found_inf;
  args.clip_coef = o.clip_coef;
  args.seed = o.seed;
  args.step = static_cast<uint64_t>(host.step);
  args.steps = steps;
  args.maximize = o.maximize;
  if (table.num_chunks == 0 && steps != StepSource::kDevice) return cudaSuccess;  // nothing to do
  return FA_BOOL_SWITCH(o.master, kMaster, [&] {
    return FA_BOOL_SWITCH(o.sr_param, kSrParam, [&] {
      return FA_BOOL_SWITCH(o.sr_state, kSrState, [&] {
        if constexpr (Layout<P, S, kMaster, kSrParam, kSrState>::kValid) {
          return FA_WEIGHT_DECAY_SWITCH(o.wd_mode, kWD, [&] {
            return FA_BOOL_SWITCH(o.amsgrad, kAmsgrad, [&] {
              return FA_BOOL_SWITCH(o.unscale(), kUnscale, [&] {
                return launch(adam_step_kernel<P, S, kWD, kAmsgrad, kUnscale, kMaster, kSrParam, kSrState>,
                              static_cast<const KernelArgs<O>&>(args));
              });
            });
          });
        } else {
          return cudaErrorInvalidValue;  // unreachable: check_step refuses what no layout has
        }
      });
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
// Resident blocks per SM of `kernel` on `device` (its registers and __launch_bounds__ decide), asked of the runtime
// once per (kernel, device) and kept.
template <typename Query>
cudaError_t blocks_per_sm(const void* kernel, int device, int* out, Query&& query) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find({kernel, device});
  if (it != known.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  const cudaError_t err = query(out);
  if (err == cudaSuccess) known[{kernel, device}] = *out;
  return err;
}

// Enqueues the step of one (param, state) dtype pair on `stream`: one launch of as many blocks as fit on the device
// at once. Instantiated once per pair in adam_cuda_<pair>.cu, so the pairs compile in parallel.
template <typename P, typename S>
cudaError_t launch_adam(const DeviceTableRef& table, const StepOptions& o, const HostSteps& host, int sm_count,
                        cudaStream_t stream) {
  return run_step<P, S>(table, o, host, [&](auto kernel, const auto& args) {
    int device = 0, per_sm = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = blocks_per_sm(reinterpret_cast<const void*>(kernel), device, &per_sm, [&](int* out) {
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, kBlockThreads, 0);
      });
    }
    if (err != cudaSuccess) return err;
    kernel<<<grid_size(table.num_chunks, sm_count, per_sm), kBlockThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace fused_adam
