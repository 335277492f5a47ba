// Adam/AdamW step kernels for float64 params and states, every mode (weight decay x amsgrad x unscale).
// One file per (param, state) dtype pair so that the instantiations compile in parallel; the kernel is in
// adam_kernel.cuh.
#include "cuda/adam_kernel.cuh"

namespace fused_adam {
namespace cuda {

template cudaError_t launch_adam<double, double>(const DeviceTableRef&, const StepOptions&,
                                          const HostSteps&, int, cudaStream_t);

}  // namespace cuda
}  // namespace fused_adam
