// The CPU element loop for AVX-512 CPUs that also have AVX512_BF16 (vcvtne2ps2bf16); picked at run time by
// adam_cpu.cpp (NOTE [cpu ISA dispatch] in kernel.h). Only the bf16 loops differ from the AVX-512 build: the
// torch-parity loop and the feature loop's bf16 params with bf16 states and no master (stochastic rounding or not)
// are written with intrinsics (bf16_avx512.h). Every other mode is kernel_avx512.cpp's loop, so this file
// instantiates those two kinds only. The shared headers come first, under the build's baseline flags.
#include <immintrin.h>

#include "cpu/kernel.h"

#pragma GCC push_options
// gcc 12's AVX-512 intrinsics warn "'__Y' may be used uninitialized" once inlined at -O3 (the `__Y = __Y` of
// _mm512_undefined_epi32 that vpslld/vpsrld/vsqrtps take as their unused merge source; GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c,bmi2,prefer-vector-width=512")

namespace fused_adam {
namespace cpu {
namespace avx512bf16 {
#define FA_CPU_ISA_NAMESPACE avx512bf16
#define FA_CPU_BF16_SIMD
#include "cpu/kernel_impl.h"
#include "cpu/bf16_avx512.h"
}  // namespace avx512bf16

ChunkFn adam_chunk_fn_avx512bf16(const Mode& mode) {
  constexpr DType kBf16 = DType::kBFloat16;
  if (mode.dtype == kBf16 && !uses_feature_loop(mode)) return avx512bf16::pick_modes<kBf16>(mode);
  if (mode.dtype == kBf16 && mode.state_dtype == kBf16 && !mode.master) {
    if (mode.sr_param && mode.sr_state) return avx512bf16::pick_feature_modes<kBf16, kBf16, false, true, true>(mode);
    if (!mode.sr_param && !mode.sr_state) return avx512bf16::pick_feature_modes<kBf16, kBf16, false, false, false>(mode);
  }
  return adam_chunk_fn_avx512(mode);
}
ChunkFn roofline_chunk_fn_avx512bf16() { return roofline_chunk_fn_avx512(); }
uint64_t bf16_store_mismatches_avx512bf16(uint64_t begin, uint64_t end) {
  return avx512bf16::bf16_store_mismatches(begin, end);
}

}  // namespace cpu
}  // namespace fused_adam

#pragma GCC diagnostic pop
#pragma GCC pop_options
