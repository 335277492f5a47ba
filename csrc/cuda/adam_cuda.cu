// Host launcher of the CUDA Adam/AdamW step (adam_cuda.h): checks the raw arguments, decides per tensor whether
// 128-bit accesses are possible, packs the chunk table into launches (NOTE [launch plan]) and hands them to the
// kernels of the (param, state) dtype pair (adam_cuda_<pair>.cu). Also the step-increment kernel of capturable steps.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/adam_kernel.cuh"

namespace fused_adam {
namespace cuda {

#define FA_EXTERN_LAUNCH(P, S)                                                                                  \
  extern template cudaError_t launch_adam<P, S>(const AdamTensor*, const std::vector<PlannedLaunch>&,          \
                                                const AdamStepOptions&, cudaStream_t)
FA_EXTERN_LAUNCH(float, float);
FA_EXTERN_LAUNCH(double, double);
FA_EXTERN_LAUNCH(__nv_bfloat16, __nv_bfloat16);
FA_EXTERN_LAUNCH(__half, __half);
FA_EXTERN_LAUNCH(float, __nv_bfloat16);
FA_EXTERN_LAUNCH(__nv_bfloat16, float);
FA_EXTERN_LAUNCH(__half, float);
#undef FA_EXTERN_LAUNCH

__global__ void increment_steps_kernel(const IncrementArgs args) { increment_steps(args, threadIdx.x); }

cudaError_t adam_step_cuda(const AdamTensor* tensors, int64_t num_tensors, DType param_dtype, DType state_dtype,
                           const AdamStepOptions& options, cudaStream_t stream) {
  AdamStepOptions o = options;
  const std::vector<PlannedLaunch> plan = plan_step(tensors, num_tensors, param_dtype, state_dtype, o);
  return dispatch_pair(param_dtype, state_dtype, [&](auto param, auto state) {
    return launch_adam<typename decltype(param)::type, typename decltype(state)::type>(tensors, plan, o, stream);
  });
}

}  // namespace cuda
}  // namespace fused_adam
