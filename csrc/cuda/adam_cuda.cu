// Host launcher of the CUDA Adam/AdamW step (adam_cuda.h): checks the options and hands the step to the kernels of
// the (param, state) dtype pair (adam_cuda_<pair>.cu), one launch over the partition's device tables
// (NOTE [device table]).
#include "cuda/adam_kernel.cuh"

namespace fused_adam {
namespace cuda {

#define FA_EXTERN_LAUNCH(P, S) \
  extern template cudaError_t launch_adam<P, S>(const DeviceTableRef&, const StepOptions&, const HostSteps&, int, \
                                                cudaStream_t)
FA_EXTERN_LAUNCH(float, float);
FA_EXTERN_LAUNCH(double, double);
FA_EXTERN_LAUNCH(__nv_bfloat16, __nv_bfloat16);
FA_EXTERN_LAUNCH(__half, __half);
FA_EXTERN_LAUNCH(float, __nv_bfloat16);
FA_EXTERN_LAUNCH(__nv_bfloat16, float);
FA_EXTERN_LAUNCH(__half, float);
#undef FA_EXTERN_LAUNCH

cudaError_t adam_step_cuda(const DeviceTableRef& table, DType param_dtype, DType state_dtype, const StepOptions& o,
                           const HostSteps& host, int sm_count, cudaStream_t stream) {
  check_step(table, param_dtype, state_dtype, o, host);
  return dispatch_pair(param_dtype, state_dtype, [&](auto param, auto state) {
    return launch_adam<typename decltype(param)::type, typename decltype(state)::type>(table, o, host, sm_count,
                                                                                       stream);
  });
}

}  // namespace cuda
}  // namespace fused_adam
