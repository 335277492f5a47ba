// FA_HOST_DEVICE: a function the CPU code and CUDA kernels both call (inlined on both sides).
#pragma once

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA_HOST_DEVICE inline
#endif
