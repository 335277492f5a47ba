// Adam/AdamW step kernels for float32 params with bfloat16 states, every mode (weight decay x amsgrad x unscale x
// stochastic rounding of the states). One file per (param, state) dtype pair so that the instantiations
// compile in parallel; the kernel is in adam_kernel.cuh.
#include "cuda/adam_kernel.cuh"

namespace fused_adam {
namespace cuda {

template cudaError_t launch_adam<float, __nv_bfloat16>(const DeviceTableRef&, const StepOptions&,
                                          const HostSteps&, int, cudaStream_t);

}  // namespace cuda
}  // namespace fused_adam
