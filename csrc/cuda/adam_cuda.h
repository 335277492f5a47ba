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

// Storage dtype of params, grads and states (one dtype for all of them). Math runs in float for the 16- and 32-bit
// types and in double for float64, with one rounding per store.
enum class DType : uint8_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// One parameter's tensors: dense device buffers of `numel` elements, all with the same element order. The binding
// makes them so (contiguous copies where strides differ).
struct AdamTensor {
  void* param;
  void* grad;            // written back unscaled when grad_scale is given
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad only, else ignored
  int64_t numel;
  float* step_device;    // capturable: the float32 step on the device, incremented by the launch
  double step;           // not capturable: the step value the update uses (the caller has already incremented it)
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
  int64_t chunk_size = 0;            // elements per block; 0 picks kDefaultChunkSize (must be a multiple of 8)
  // AdamW's decay factor 1 - lr*wd when the caller computed it (with a Tensor lr torch computes it in the lr's
  // dtype, and fp64 parity needs the same value); NaN: computed from `hyper` in double. Not capturable.
  double decay = NAN;
};

constexpr int64_t kDefaultChunkSize = 65536;

// Enqueues the step of `num_tensors` tensors on `stream`. Throws std::invalid_argument for bad arguments (null
// pointers, bad chunk size); returns the first CUDA error of a launch, or cudaSuccess.
cudaError_t adam_step_cuda(const AdamTensor* tensors, int64_t num_tensors, DType dtype, const AdamStepOptions& options,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_adam
