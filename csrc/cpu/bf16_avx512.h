// The bf16 loops written with AVX-512 intrinsics, for CPUs with AVX512_BF16 (kernel_avx512bf16.cpp; NOTE [cpu ISA
// dispatch] in kernel.h): kernel_impl.h's adam_loop for DType::kBFloat16 (torch parity), and its adam_loop_x
// for bf16 params with bf16 states and no master (clip, stochastic rounding). Bitwise the same as those loops for
// every input, NaN, inf, denormals and -0 included (tests/test_cpu_backend.py, and the exhaustive check of the
// store below, bf16_store_mismatches).
//
// Why by hand: gcc vectorizes the scalar loop, but spends more on the bf16 <-> fp32 conversions than on the math.
// Per 32 elements and stored array it emits ~14 instructions for Storage<kBFloat16>::store (shifts, ands, adds,
// compares, vpermt2w, vpblendmw) and 6 per loaded array. Here a load is two instructions (vpslld and vpandd, the
// load folded into each) and a store five (vcvtne2ps2bf16, vpermw, two vfpclassps, the store) and a branch.
// Measured on one Zen 5 core, L1-resident, decoupled weight decay, interleaved in one process (standalone
// microbenchmark, best of ~100, ns/element): torch parity 0.25-0.27 with gcc's loop -> 0.153-0.156 here (the fp32
// loop: 0.14-0.16; the NaN/denormal check below costs 0.009 of it); clip 0.27-0.28 -> 0.161; stochastic rounding
// 0.33 -> 0.263 (its hash, two vpmulld per 16 elements and stream, is most of what is left). The math is
// adam_math.h's adam_update, instantiated on a 16-lane float vector (Vec16), so the update is still written once.
//
// Element order: a 64-byte block of 32 bf16 is viewed as 16 dwords; dword j holds elements 2j (low half) and
// 2j+1 (high half). `lo` = dword << 16 are the even elements as floats, `hi` = dword & 0xFFFF0000 the odd ones
// (two ALU ops, no shuffle). The store converts both with one vcvtne2ps2bf16 (evens then odds) and interleaves
// them back with one vpermw. The math is per lane, so the order does not matter between the two. (Measured against
// vpmovzxwd loads with an unpermuted store, and in-lane unpacks with a vpermq store: 2-3% slower, and within noise.)
//
// vcvtne2ps2bf16 rounds to nearest even like Storage<kBFloat16>::store, except that it reads denormal inputs as
// zero and turns a NaN into its own quiet NaN (x >> 16 | 0x40) where ours is always 0x7FC0 (c10's
// round_to_nearest_even). So a store first classifies its 32 floats (vfpclassps: NaN or denormal) and sends the
// rare block that has one to the exact integer rounding, vectorized. vfpclassps does not see denormals when
// MXCSR.DAZ is set (torch.set_flush_denormal(True)), while a bf16 denormal can still pass through the update
// unchanged (amsgrad's max); under DAZ every block takes the exact path. Both paths are checked against
// Storage<kBFloat16>::store for all 2^32 floats (bf16_store_mismatches, tests/test_cpu_backend.py). Stochastic
// rounding is integer arithmetic on the fp32 bits (no vcvtne2ps2bf16), the same as the scalar bf16_store_sr.
//
// Include this file only from kernel_avx512bf16.cpp, after kernel_impl.h, inside
// `namespace fused_adam::cpu::avx512bf16`.
#ifndef FA_CPU_BF16_SIMD
#error "bf16_avx512.h is included by kernel_avx512bf16.cpp only"
#endif

// ---- the opmath vector: adam_update<Vec16> is adam_math.h's math on 16 lanes ----------------------------------
// Every op is the lane-wise IEEE operation of the scalar one, so each lane is bitwise the scalar result: + - * /
// and sqrt are correctly rounded (vdivps, vsqrtps, as divss/sqrtss), fa_fma is one rounding (vfmadd), and unary
// minus flips the sign bit as gcc's scalar negation does (NaN included). gcc spells _mm512_mul_ps/_mm512_add_ps as
// vector-extension arithmetic, so they would contract into an fma like scalar code; the build's -ffp-contract=off
// keeps them apart here too.
struct Vec16 {
  __m512 v;
  Vec16() = default;
  Vec16(__m512 x) : v(x) {}
  explicit Vec16(float f) : v(_mm512_set1_ps(f)) {}
};
inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 operator/(Vec16 a, Vec16 b) { return _mm512_div_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a) { return _mm512_xor_ps(a.v, _mm512_set1_ps(-0.0f)); }
// Found by argument-dependent lookup from adam_update.
inline Vec16 fa_fma(Vec16 a, Vec16 b, Vec16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline Vec16 fa_sqrt(Vec16 a) { return _mm512_sqrt_ps(a.v); }
// adam_math.h's (a != a || a > b) ? a : b, lane-wise.
inline Vec16 fa_maximum_nan(Vec16 a, Vec16 b) {
  const __mmask16 take_a = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ);
  return _mm512_mask_blend_ps(take_a, b.v, a.v);
}

inline StepScalars<Vec16> broadcast(const StepScalars<float>& s) {
  StepScalars<Vec16> out;
  out.decay = Vec16(s.decay);
  out.weight_decay = Vec16(s.weight_decay);
  out.lerp_coeff = Vec16(s.lerp_coeff);
  out.lerp_small = s.lerp_small;
  out.beta2 = Vec16(s.beta2);
  out.one_minus_beta2 = Vec16(s.one_minus_beta2);
  out.neg_step_size = Vec16(s.neg_step_size);
  out.bias_correction2_sqrt = Vec16(s.bias_correction2_sqrt);
  out.eps = Vec16(s.eps);
  return out;
}

// ---- 32 bf16 <-> two Vec16 -----------------------------------------------------------------------------------

struct Bf16Pair {
  Vec16 lo;  // elements 0, 2, 4, ..., 30 of the block
  Vec16 hi;  // elements 1, 3, 5, ..., 31
};

inline Bf16Pair bf16_unpack(__m512i x) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

// Storage<kBFloat16>::store on 16 lanes: the bf16 bits in the low half of each dword, the high half zero.
inline __m512i bf16_rne_exact(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// The lanes that vcvtne2ps2bf16 may round differently from Storage<kBFloat16>::store: NaN or denormal.
inline __mmask16 bf16_needs_exact(__m512 x) {
  return _mm512_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80);  // quiet NaN, denormal, signalling NaN
}

// bf16_unpack's inverse, for blocks without such lanes: vcvtne2ps2bf16(a, b) puts b's 16 bf16 in the low 32 bytes
// and a's in the high, and vpermw interleaves them.
inline __m512i bf16_pack_fast(Bf16Pair x) {
  const __m512i evens_then_odds = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x.hi.v, x.lo.v));
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,  //
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, evens_then_odds);
}

// bf16_unpack's inverse for any block.
inline __m512i bf16_pack_exact(Bf16Pair x) {
  return _mm512_or_si512(bf16_rne_exact(x.lo.v), _mm512_slli_epi32(bf16_rne_exact(x.hi.v), 16));
}

// The 32 bf16 of a block. `exact` forces the integer rounding (all ones under MXCSR.DAZ, see above).
inline __m512i bf16_pack(Bf16Pair x, __mmask16 exact) {
  if (__builtin_expect((bf16_needs_exact(x.lo.v) | bf16_needs_exact(x.hi.v) | exact) != 0, 0)) {
    return bf16_pack_exact(x);
  }
  return bf16_pack_fast(x);
}

// A block of 32, or the first `mask` elements of the tail. The tail's missing elements read as bf16 1.0, so that
// the dead lanes compute an ordinary update (no 0/0, no trip to the exact rounding) and are not stored.
template <bool TAIL>
inline Bf16Pair bf16_load(const uint16_t* p, __mmask32 mask) {
  if constexpr (TAIL) {
    return bf16_unpack(_mm512_mask_loadu_epi16(_mm512_set1_epi16(0x3F80), mask, p));
  } else {
    return bf16_unpack(_mm512_loadu_si512(p));
  }
}

// kernel_impl.h's sr_rand on 16 lanes (32-bit integer arithmetic: each lane is the scalar's bits).
inline __m512i sr_rand16(__m512i mixed, __m512i salt) {
  __m512i h = _mm512_mullo_epi32(_mm512_xor_si512(mixed, salt), _mm512_set1_epi32(static_cast<int>(0x85ebca6bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xc2b2ae35u)));
  return _mm512_and_si512(_mm512_xor_si512(h, _mm512_srli_epi32(h, 16)), _mm512_set1_epi32(0xFFFF));
}

// kernel_impl.h's bf16_store_sr(x, sr_rand(lo_mixed, salt_mixed)) on the 32 elements of a block: `mixed` holds each
// element's lo_mixed, index ^ (index >> 16), for the even elements (lo) and the odd ones (hi). A NaN keeps its
// payload, quieted; (u + rand) >> 16 would give the same bits for a quiet NaN with a zero low half (every NaN the
// math makes from bf16 inputs), not for a signalling one that passes through amsgrad's max, so blocks with a NaN
// take the branch.
inline __m512i bf16_pack_sr(Bf16Pair x, const __m512i mixed[2], __m512i salt) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i u_lo = _mm512_castps_si512(x.lo.v);
  const __m512i u_hi = _mm512_castps_si512(x.hi.v);
  // Even elements: (u + rand) >> 16 into the low half; odd ones: the same bits, left in the high half.
  __m512i lo = _mm512_srli_epi32(_mm512_add_epi32(u_lo, sr_rand16(mixed[0], salt)), 16);
  __m512i hi = _mm512_and_si512(_mm512_add_epi32(u_hi, sr_rand16(mixed[1], salt)), high_half);
  const __mmask16 nan_lo = _mm512_cmp_ps_mask(x.lo.v, x.lo.v, _CMP_UNORD_Q);
  const __mmask16 nan_hi = _mm512_cmp_ps_mask(x.hi.v, x.hi.v, _CMP_UNORD_Q);
  if (__builtin_expect((nan_lo | nan_hi) != 0, 0)) {
    lo = _mm512_mask_mov_epi32(lo, nan_lo, _mm512_or_si512(_mm512_srli_epi32(u_lo, 16), _mm512_set1_epi32(0x40)));
    hi = _mm512_mask_mov_epi32(hi, nan_hi,
                               _mm512_or_si512(_mm512_and_si512(u_hi, high_half), _mm512_set1_epi32(0x400000)));
  }
  return _mm512_or_si512(lo, hi);
}

// ---- the loops -------------------------------------------------------------------------------------------------

// What every block of one loop call shares.
struct BlockArgs {
  StepScalars<Vec16> s;
  Vec16 grad_scale;
  Vec16 grad_mul;     // feature loop: (maximize ? -1 : 1) * clip coefficient
  __mmask16 exact;    // all ones under MXCSR.DAZ
  __m512i salt[4];    // stochastic rounding: Salts, per Stream
};

template <bool TAIL>
inline void bf16_store_bits(uint16_t* p, __m512i bits, __mmask32 mask) {
  if constexpr (TAIL) {
    _mm512_mask_storeu_epi16(p, mask, bits);
  } else {
    _mm512_storeu_si512(p, bits);
  }
}

// One stored array: stochastically rounded where SR (its salt is a.salt[stream]), else to nearest even.
template <bool SR, bool TAIL>
inline void bf16_store(uint16_t* p, Bf16Pair x, const BlockArgs& a, Stream stream, const __m512i mixed[2],
                       __mmask32 mask) {
  if constexpr (SR) {
    bf16_store_bits<TAIL>(p, bf16_pack_sr(x, mixed, a.salt[static_cast<int>(stream)]), mask);
  } else {
    bf16_store_bits<TAIL>(p, bf16_pack(x, a.exact), mask);
  }
}

// 32 elements (or the first `mask` ones of the tail) of either loop: the torch-parity one (CLIP and SR false) or
// the feature loop's bf16 params with bf16 states and no master (MAXIMIZE false: grad_mul carries it). `index` is
// the element's index in its tensor (low word), for stochastic rounding.
template <WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool CLIP, bool SR, bool TAIL>
inline void adam_block_bf16(uint16_t* param, uint16_t* grad, uint16_t* exp_avg, uint16_t* exp_avg_sq,
                            uint16_t* max_exp_avg_sq, const BlockArgs& a, uint32_t index, __mmask32 mask) {
  Bf16Pair p = bf16_load<TAIL>(param, mask);
  Bf16Pair g = bf16_load<TAIL>(grad, mask);
  Bf16Pair m = bf16_load<TAIL>(exp_avg, mask);
  Bf16Pair v = bf16_load<TAIL>(exp_avg_sq, mask);
  Bf16Pair vmax = AMSGRAD ? bf16_load<TAIL>(max_exp_avg_sq, mask) : Bf16Pair{Vec16(0.0f), Vec16(0.0f)};
  adam_update<Vec16, WD, AMSGRAD, MAXIMIZE, UNSCALE, CLIP>(p.lo, g.lo, m.lo, v.lo, vmax.lo, a.s, a.grad_scale,
                                                            a.grad_mul);
  adam_update<Vec16, WD, AMSGRAD, MAXIMIZE, UNSCALE, CLIP>(p.hi, g.hi, m.hi, v.hi, vmax.hi, a.s, a.grad_scale,
                                                            a.grad_mul);
  __m512i mixed[2];  // sr_rand's lo_mixed of the even and the odd elements
  if constexpr (SR) {
    const __m512i even = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(index)),
                                          _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0));
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    mixed[0] = _mm512_xor_si512(even, _mm512_srli_epi32(even, 16));
    mixed[1] = _mm512_xor_si512(odd, _mm512_srli_epi32(odd, 16));
  }
  bf16_store<SR, TAIL>(param, p, a, Stream::kParam, mixed, mask);
  if (UNSCALE) bf16_store<false, TAIL>(grad, g, a, Stream::kParam, mixed, mask);  // the unscaled grad: to nearest
  bf16_store<SR, TAIL>(exp_avg, m, a, Stream::kExpAvg, mixed, mask);
  bf16_store<SR, TAIL>(exp_avg_sq, v, a, Stream::kExpAvgSq, mixed, mask);
  if (AMSGRAD) bf16_store<SR, TAIL>(max_exp_avg_sq, vmax, a, Stream::kMaxExpAvgSq, mixed, mask);
}

template <WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool CLIP, bool SR>
inline void adam_blocks_bf16(uint16_t* __restrict param, uint16_t* __restrict grad, uint16_t* __restrict exp_avg,
                             uint16_t* __restrict exp_avg_sq, uint16_t* __restrict max_exp_avg_sq, int64_t n,
                             const BlockArgs& a, uint32_t index0) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    adam_block_bf16<WD, AMSGRAD, MAXIMIZE, UNSCALE, CLIP, SR, false>(
        param + i, grad + i, exp_avg + i, exp_avg_sq + i, AMSGRAD ? max_exp_avg_sq + i : nullptr, a,
        index0 + static_cast<uint32_t>(i), 0);
  }
  if (i < n) {
    const __mmask32 mask = _bzhi_u32(0xFFFFFFFFu, static_cast<uint32_t>(n - i));
    adam_block_bf16<WD, AMSGRAD, MAXIMIZE, UNSCALE, CLIP, SR, true>(
        param + i, grad + i, exp_avg + i, exp_avg_sq + i, AMSGRAD ? max_exp_avg_sq + i : nullptr, a,
        index0 + static_cast<uint32_t>(i), mask);
  }
}

inline BlockArgs block_args(StepScalars<float> s, float grad_scale, float grad_mul) {
  BlockArgs a;
  a.s = broadcast(s);
  a.grad_scale = Vec16(grad_scale);
  a.grad_mul = Vec16(grad_mul);
  a.exact = (_mm_getcsr() & 0x0040u) != 0 ? 0xFFFF : 0;  // MXCSR.DAZ
  for (__m512i& salt : a.salt) salt = _mm512_setzero_si512();
  return a;
}

// kernel_impl.h's adam_loop for bf16.
template <WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool LERP_SMALL>
FA_LOOP void adam_loop_bf16(uint16_t* __restrict param, uint16_t* __restrict grad, uint16_t* __restrict exp_avg,
                            uint16_t* __restrict exp_avg_sq, uint16_t* __restrict max_exp_avg_sq, int64_t n,
                            StepScalars<float> s, float grad_scale) {
  s.lerp_small = LERP_SMALL;
  const BlockArgs a = block_args(s, grad_scale, 1.0f);
  adam_blocks_bf16<WD, AMSGRAD, MAXIMIZE, UNSCALE, false, false>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                                                  n, a, 0);
}

// kernel_impl.h's adam_loop_x for bf16 params and bf16 states without a master (SR: all four stores stochastic).
template <bool SR, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool LERP_SMALL>
FA_LOOP void adam_loop_x_bf16(uint16_t* __restrict param, uint16_t* __restrict grad, uint16_t* __restrict exp_avg,
                              uint16_t* __restrict exp_avg_sq, uint16_t* __restrict max_exp_avg_sq, int64_t n,
                              StepScalars<float> s, float grad_scale, float grad_mul, uint32_t index0, Salts salt) {
  s.lerp_small = LERP_SMALL;
  BlockArgs a = block_args(s, grad_scale, grad_mul);
  const uint32_t salts[4] = {salt.param, salt.exp_avg, salt.exp_avg_sq, salt.max_exp_avg_sq};
  for (int k = 0; k < 4; ++k) a.salt[k] = _mm512_set1_epi32(static_cast<int>(salts[k]));
  adam_blocks_bf16<WD, AMSGRAD, /*MAXIMIZE=*/false, UNSCALE, /*CLIP=*/true, SR>(param, grad, exp_avg, exp_avg_sq,
                                                                                max_exp_avg_sq, n, a, index0);
}

// The exhaustive check of the stores against Storage<kBFloat16>::store, over the float bit patterns [begin, end)
// taken 32 consecutive patterns per block: for every element, (1) the exact path agrees, (2) the fast path agrees
// unless bf16_needs_exact flags that element, (3) bf16_pack, the function the loop calls, agrees. (2) holds for
// any block whatever its other elements, so (1)-(3) cover every block the loop can meet. Returns the number of
// failed checks (0).
inline uint64_t bf16_store_mismatches(uint64_t begin, uint64_t end) {
  const unsigned int mxcsr = _mm_getcsr();
  _mm_setcsr(mxcsr & ~0x0040u);  // (2) is vfpclassps's view without DAZ, which bf16_pack's callers pass as `exact`
  uint64_t bad = 0;
  alignas(64) uint16_t fast[32], exact[32], packed[32];
  const __m512i even_offsets = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (uint64_t base = begin & ~uint64_t{31}; base < end; base += 32) {
    const __m512i base_bits = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    const __m512i even = _mm512_add_epi32(base_bits, even_offsets);
    const Bf16Pair x{_mm512_castsi512_ps(even), _mm512_castsi512_ps(_mm512_add_epi32(even, _mm512_set1_epi32(1)))};
    const uint32_t flagged =  // bit k: element k (even elements are lo's lanes, odd ones hi's)
        _pdep_u32(bf16_needs_exact(x.lo.v), 0x55555555u) | _pdep_u32(bf16_needs_exact(x.hi.v), 0xAAAAAAAAu);
    _mm512_store_si512(fast, bf16_pack_fast(x));
    _mm512_store_si512(exact, bf16_pack_exact(x));
    _mm512_store_si512(packed, bf16_pack(x, 0));
    for (uint32_t k = 0; k < 32; ++k) {
      const uint64_t u = base + k;
      if (u < begin || u >= end) continue;
      const uint16_t want = Storage<DType::kBFloat16>::store(bits_to_float(static_cast<uint32_t>(u)));
      bad += (exact[k] != want) + (fast[k] != want && !((flagged >> k) & 1u)) + (packed[k] != want);
    }
  }
  _mm_setcsr(mxcsr);
  return bad;
}
