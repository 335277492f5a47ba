// Adam/AdamW step kernels for bfloat16 params with float32 states, every mode (weight decay x amsgrad x unscale x
// fp32 master weights or stochastic rounding of the params). One file per (param, state) dtype pair so
// that the instantiations compile in parallel; the kernel is in adam_kernel.cuh.
#include "cuda/adam_kernel.cuh"

namespace fused_adam {
namespace cuda {

template cudaError_t launch_adam<__nv_bfloat16, float>(const DeviceTableRef&, const StepOptions&,
                                          const HostSteps&, int, cudaStream_t);

}  // namespace cuda
}  // namespace fused_adam
