// The CPU element loop compiled for baseline x86-64 (SSE2: the build's own flags; fma is a libm call here); picked at run time by adam_cpu.cpp
// (NOTE [cpu ISA dispatch] in kernel.h). The shared headers come first, under the build's baseline flags:
// only this file's own loops get the ISA, and adam_update is inlined into them (they are flatten).
#include "cpu/kernel.h"

#pragma GCC push_options
namespace fused_adam {
namespace cpu {
namespace baseline {
#define FA_CPU_ISA_NAMESPACE baseline
#include "cpu/kernel_impl.h"
}  // namespace baseline

ChunkFn adam_chunk_fn_baseline(const Mode& mode) { return baseline::pick(mode); }
ChunkFn roofline_chunk_fn_baseline() { return &baseline::roofline_chunk; }

}  // namespace cpu
}  // namespace fused_adam

#pragma GCC pop_options
