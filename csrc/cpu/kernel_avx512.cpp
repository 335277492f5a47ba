// The CPU element loop compiled for AVX-512 (F, VL, BW, DQ) with FMA; picked at run time by adam_cpu.cpp
// (NOTE [cpu ISA dispatch] in kernel.h). The shared headers come first, under the build's baseline flags:
// only this file's own loops get the ISA, and adam_update is inlined into them (they are flatten).
#include "cpu/kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512")

namespace fused_adam {
namespace cpu {
namespace avx512 {
#define FA_CPU_ISA_NAMESPACE avx512
#include "cpu/kernel_impl.h"
}  // namespace avx512

ChunkFn adam_chunk_fn_avx512(const Mode& mode) { return avx512::pick(mode); }
ChunkFn roofline_chunk_fn_avx512() { return &avx512::roofline_chunk; }

}  // namespace cpu
}  // namespace fused_adam

#pragma GCC pop_options
