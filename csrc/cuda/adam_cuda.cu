// Host launcher of the CUDA Adam/AdamW step (adam_cuda.h): checks the raw arguments, decides per tensor whether
// 128-bit accesses are possible, packs the chunk table into launches (NOTE [launch plan]) and hands them to the
// per-dtype kernels (adam_cuda_<dtype>.cu). Also the step-increment kernel of capturable steps.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/adam_kernel.cuh"

namespace fused_adam {
namespace cuda {

extern template cudaError_t launch_adam<float>(const AdamTensor*, const std::vector<PlannedLaunch>&,
                                               const AdamStepOptions&, cudaStream_t);
extern template cudaError_t launch_adam<double>(const AdamTensor*, const std::vector<PlannedLaunch>&,
                                                const AdamStepOptions&, cudaStream_t);
extern template cudaError_t launch_adam<__nv_bfloat16>(const AdamTensor*, const std::vector<PlannedLaunch>&,
                                                       const AdamStepOptions&, cudaStream_t);
extern template cudaError_t launch_adam<__half>(const AdamTensor*, const std::vector<PlannedLaunch>&,
                                                const AdamStepOptions&, cudaStream_t);

__global__ void increment_steps_kernel(const IncrementArgs args) { increment_steps(args, threadIdx.x); }

cudaError_t adam_step_cuda(const AdamTensor* tensors, int64_t num_tensors, DType dtype, const AdamStepOptions& options,
                           cudaStream_t stream) {
  AdamStepOptions o = options;
  const std::vector<PlannedLaunch> plan = plan_step(tensors, num_tensors, o);
  switch (dtype) {
    case DType::kFloat32: return launch_adam<float>(tensors, plan, o, stream);
    case DType::kFloat64: return launch_adam<double>(tensors, plan, o, stream);
    case DType::kBFloat16: return launch_adam<__nv_bfloat16>(tensors, plan, o, stream);
    case DType::kFloat16: return launch_adam<__half>(tensors, plan, o, stream);
  }
  throw std::invalid_argument("adam_step_cuda: unknown dtype " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace cuda
}  // namespace fused_adam
