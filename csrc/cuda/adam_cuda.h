// Host API of the CUDA Adam/AdamW step: raw device pointers, no torch. The torch binding (ops_cuda.cpp) keeps each
// partition's device tables (NOTE [device table]) across steps, validates the tensors, patches the tables and calls
// adam_step_cuda on the current stream; the .cu files include only the CUDA runtime and this header, so they compile
// with a bare toolkit (see docs/design.md, "Verifying GPU code without a GPU").
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adam_math.h"
#include "common/dtype.h"
#include "common/options.h"
#include "cuda/device_table.h"

namespace fused_adam {
namespace cuda {

// The (param, state) dtype pairs with kernels (one adam_cuda_<pair>.cu each). Math runs in float (double for
// float64), one rounding per store.
inline bool compiled_pair(DType param, DType state) {
  return param == state || (param == DType::kFloat32 && state == DType::kBFloat16) ||
         ((param == DType::kBFloat16 || param == DType::kFloat16) && state == DType::kFloat32);
}

// Why these dtypes and options have no kernel, or "" (the one place the CUDA backend's refusals are decided; the
// Python backend's supports() asks it through the binding).
inline std::string unsupported(DType param, DType state, bool master) {
  if (!compiled_pair(param, state)) {
    return std::string("no kernel for ") + dtype_name(param) + " params with " + dtype_name(state) +
           " states (states take the param's dtype, or float32 params have bfloat16 states, or bfloat16/float16 "
           "params have float32 states)";
  }
  if (master && param != DType::kBFloat16 && param != DType::kFloat16) {
    return std::string("master weights need bfloat16 or float16 params, got ") + dtype_name(param);
  }
  return "";
}

// Not capturable: where the step-dependent scalars come from this step (StepSource::kUniform with the step every
// tensor is at, or kPerTensor). Capturable steps are StepSource::kDevice.
struct HostSteps {
  StepSource source = StepSource::kUniform;
  double step = 0;  // kUniform: every tensor's step, already incremented by the caller
};

// A partition's tables in device memory: the allocation `base` holds DeviceTable::image() (copied by the caller).
struct DeviceTableRef {
  void* base = nullptr;
  int64_t num_tensors = 0;
  int64_t num_chunks = 0;
  int64_t chunk_size = 0;
  size_t tensors_offset = 0;
  size_t chunks_offset = 0;

  static DeviceTableRef of(const DeviceTable& table, void* base) {
    return DeviceTableRef{base, table.num_tensors(), table.num_chunks(), table.chunk_size(), table.tensors_offset(),
                          table.chunks_offset()};
  }
};

constexpr int64_t kDefaultChunkSize = 65536;

// Not capturable: the host has incremented every tensor's step; `steps` are the new values. All equal (the usual
// case): kUniform, and the entries carry no step (they stay unchanged from step to step). Else kPerTensor, and
// make_entry fills each entry's scalars.
inline HostSteps host_steps(const std::vector<double>& steps) {
  for (double s : steps) {
    if (s != steps[0]) return HostSteps{StepSource::kPerTensor, 0.0};
  }
  return HostSteps{StepSource::kUniform, steps.empty() ? 0.0 : steps[0]};
}

inline void set_step(TensorEntry& e, const StepOptions& o, double step) {
  const StepScalars<double> s = host_step_scalars<double>(o, step);  // the pair in double (or a Tensor's values)
  e.neg_step_size = s.neg_step_size;
  e.bias_correction2_sqrt = s.bias_correction2_sqrt;
  e.host_step = step;
}

// Tensor i's entry for this step: the buffers it reads (staged copies included), its device step (kDevice) or its
// host step (kPerTensor). Everything else stays zero, so an entry is the same bytes from step to step unless a
// buffer moved or the steps are per tensor (DeviceTable::set patches only what changed).
inline TensorEntry make_entry(void* const (&bufs)[kNumBufs], int64_t numel, float* device_step, uint64_t tensor_id,
                              StepSource steps, const StepOptions& o, double host_step) {
  TensorEntry e{};
  for (int b = 0; b < kNumBufs; ++b) e.buf[b] = bufs[b];
  e.numel = numel;
  e.tensor_id = tensor_id;
  if (steps == StepSource::kDevice) e.step = device_step;
  if (steps == StepSource::kPerTensor) set_step(e, o, host_step);
  return e;
}

// Checks the options against the table and the compiled kernels. Throws std::invalid_argument.
inline void check_step(const DeviceTableRef& t, DType param, DType state, const StepOptions& o, const HostSteps& h) {
  const std::string why = unsupported(param, state, o.master);
  if (!why.empty()) throw std::invalid_argument("adam_step_cuda: " + why);
  if (t.base == nullptr) throw std::invalid_argument("adam_step_cuda: no device table");
  if (!o.capturable && o.lr_device != nullptr) {
    throw std::invalid_argument("adam_step_cuda: lr_device needs capturable (else the host computes the scalars)");
  }
  if (!o.capturable && h.source == StepSource::kDevice) {
    throw std::invalid_argument("adam_step_cuda: device steps need capturable");
  }
  if ((o.sr_param && param != DType::kBFloat16) || (o.sr_param && o.master) ||
      (o.sr_state && state != DType::kBFloat16)) {
    throw std::invalid_argument("adam_step_cuda: stochastic rounding is for bfloat16 stores without a master");
  }
}

// Enqueues the step of every tensor of the table on `stream`, one launch: params and grads of `param_dtype`, states
// of `state_dtype`; a grid of as many blocks as `sm_count` SMs run at once. `host` is ignored when o.capturable.
// Throws std::invalid_argument for bad arguments (check_step); returns the launch's CUDA error, or cudaSuccess.
cudaError_t adam_step_cuda(const DeviceTableRef& table, DType param_dtype, DType state_dtype, const StepOptions& o,
                           const HostSteps& host, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_adam
