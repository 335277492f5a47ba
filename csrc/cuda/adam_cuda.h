// Host API of the CUDA Adam/AdamW step: raw device pointers, no torch. The torch binding (ops_cuda.cpp) validates
// tensors and calls adam_step_cuda on the current stream; the .cu files include only the CUDA runtime and this
// header, so they compile with a bare toolkit (see DESIGN.md, "Verifying GPU code without a GPU").
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "adam_math.h"

namespace fused_adam {
namespace cuda {

// Storage dtypes. Params and grads share one dtype, the states (exp_avg, exp_avg_sq, max_exp_avg_sq) another or the
// same: float32/float32, float64/float64, bfloat16/bfloat16, float16/float16, float32 params with bfloat16 states,
// bfloat16 or float16 params with float32 states. Math runs in float (double for float64), one rounding per store.
enum class DType : uint8_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

// The (param, state) dtype pairs with kernels (one adam_cuda_<pair>.cu each).
inline bool compiled_pair(DType param, DType state) {
  return param == state || (param == DType::kFloat32 && state == DType::kBFloat16) ||
         ((param == DType::kBFloat16 || param == DType::kFloat16) && state == DType::kFloat32);
}

// One parameter's tensors: dense device buffers of `numel` elements, all with the same element order (the logical,
// row-major order with stochastic rounding: its random bits are drawn per element index). The binding makes them so
// (contiguous copies where strides differ).
struct AdamTensor {
  void* param;
  void* grad;            // written back unscaled when grad_scale is given
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad only, else ignored
  int64_t numel;
  float* step_device;    // capturable: the float32 step on the device, incremented by the launch
  double step;           // not capturable: the step value the update uses (the caller has already incremented it)
  float* master = nullptr;  // master_weights: the fp32 copy the update runs on; the param gets it rounded to nearest
  uint64_t tensor_id = 0;   // stochastic_rounding: the tensor's id in sr_salt (its index over all param groups)
};

struct AdamStepOptions {
  AdamHyper hyper;                   // lr (unless lr_device), betas, eps, weight_decay
  bool decoupled = false;            // AdamW
  bool amsgrad = false;
  bool maximize = false;
  bool capturable = false;           // steps (and lr_device if set) are read on the device; no host sync
  const double* lr_device = nullptr; // capturable only: lr as a float64 scalar on the device
  const float* grad_scale = nullptr; // AMP: grads are divided by *grad_scale (and stored back unscaled)
  const float* found_inf = nullptr;  // AMP: if *found_inf != 0 the launch changes nothing, steps included
  const float* clip_coef = nullptr;  // gradient clipping: the (unscaled) grad is multiplied by *clip_coef for the
                                     // update (the stored grad stays unclipped); read on the device, no host sync
  bool master_weights = false;       // every tensor has `master` (bfloat16/float16 params only)
  bool stochastic_rounding = false;  // bfloat16 stores that are the only copy of a value (params without a master,
                                     // states) round stochastically (csrc/rounding.h); ignored where there is none
  uint64_t seed = 0;                 // stochastic rounding's seed
  int64_t chunk_size = 0;            // elements per block; 0 picks kDefaultChunkSize (must be a multiple of 8)
  // AdamW's decay factor 1 - lr*wd when the caller computed it (with a Tensor lr torch computes it in the lr's
  // dtype, and fp64 parity needs the same value); NaN: computed from `hyper` in double. Not capturable.
  double decay = NAN;
};

constexpr int64_t kDefaultChunkSize = 65536;

// Enqueues the step of `num_tensors` tensors on `stream`: params and grads of `param_dtype`, states of
// `state_dtype`. Throws std::invalid_argument for bad arguments (null pointers, bad chunk size, a dtype pair that
// is not compiled, master weights for fp32/fp64 params); returns the first CUDA error of a launch, or cudaSuccess.
cudaError_t adam_step_cuda(const AdamTensor* tensors, int64_t num_tensors, DType param_dtype, DType state_dtype,
                           const AdamStepOptions& options, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_adam
