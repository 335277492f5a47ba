// The CPU element loop compiled for AVX2 with FMA; picked at run time by adam_cpu.cpp
// (NOTE [cpu ISA dispatch] in kernel.h). The shared headers come first, under the build's baseline flags:
// only this file's own loops get the ISA, and adam_update is inlined into them (they are flatten).
#include "cpu/kernel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")

namespace fused_adam {
namespace cpu {
namespace avx2 {
#define FA_CPU_ISA_NAMESPACE avx2
#include "cpu/kernel_impl.h"
}  // namespace avx2

ChunkFn adam_chunk_fn_avx2(const Mode& mode) { return avx2::pick(mode); }
ChunkFn roofline_chunk_fn_avx2() { return &avx2::roofline_chunk; }

}  // namespace cpu
}  // namespace fused_adam

#pragma GCC pop_options
