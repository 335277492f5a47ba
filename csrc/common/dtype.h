// The storage dtypes of the native kernels (CPU and CUDA), torch-free. The torch binding maps at::ScalarType onto
// it (csrc/common/tensor_pass.h); the kernels' template arguments are these values.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fused_adam {

enum class DType : uint8_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

FA_HOST_DEVICE const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

FA_HOST_DEVICE constexpr int dtype_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}

}  // namespace fused_adam
