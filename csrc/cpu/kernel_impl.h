// The CPU element loop: adam_update (csrc/adam_math.h) over one contiguous piece of one tensor, for every dtype
// and mode. Written once as scalar C++ with __restrict pointers; gcc vectorizes it for the ISA of the including
// translation unit (NOTE [cpu ISA dispatch] in kernel.h). Checked with objdump: the AVX-512 build runs on zmm
// registers (vsqrtps/vdivps %zmm), bf16 and fp16 conversions included, with a scalar tail. One exception: on CPUs
// with AVX512_BF16 the bf16 loops (torch parity, and the feature loop's bf16 params with bf16 states and no master)
// are bf16_avx512.h's, written with intrinsics (adam_chunk and adam_chunk_x below).
//
// Low-precision storage (bf16, fp16) is converted to fp32 and back with integer/float bit operations rather
// than intrinsics or c10 types, so that the conversions vectorize inside the same loop: one rounding per store,
// round-to-nearest-even, NaN stays NaN. They are bitwise c10's conversions (c10/util/BFloat16.h
// round_to_nearest_even, and c10/util/Half.h fp16_ieee_{to,from}_fp32_value from Maratyszcza's FP16 library),
// which for fp16 equal the F16C instructions torch uses except in the payload of a NaN.
//
// Two loops: adam_loop (torch parity: one storage dtype, maximize and weight decay modes as template constants) and
// adam_loop_x (the options beyond torch: states in their own dtype, an fp32 master, stochastic rounding, clip;
// NOTE [cpu feature loops] in kernel.h). Stochastic rounding hashes each element's index with rounding.h's fmix32
// in 32-bit vector lanes (multiplies, xors, shifts; no branch): measured on one AVX-512 core, cache-resident, bf16
// params and states: 0.31 ns/element rounding to nearest, 0.39 ns/element stochastically (three hashes/element).
//
// Include this file only from kernel_<isa>.cpp, inside `namespace fused_adam::cpu::<isa>`.
#ifndef FA_CPU_ISA_NAMESPACE
#error "kernel_impl.h is included by kernel_<isa>.cpp only"
#endif

// The loops inline everything they call (adam_update included: no call, and no shared out-of-line copy, can leave
// the ISA), and stay functions of their own, so that the vectorizer sees their __restrict parameters.
#define FA_LOOP __attribute__((flatten, noinline))

// FA_BOOL_SWITCH, FA_WEIGHT_DECAY_SWITCH: csrc/common/static_switch.h (included by kernel.h).

// __builtin_bit_cast, not memcpy: a memcpy through a local kept gcc from vectorizing the bf16/fp16 loops.
inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// Storage type <-> opmath type of each dtype.
template <DType K>
struct Storage;

template <>
struct Storage<DType::kFloat32> {
  using type = float;
  using opmath = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

template <>
struct Storage<DType::kFloat64> {
  using type = double;
  using opmath = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};

template <>
struct Storage<DType::kBFloat16> {
  using type = uint16_t;
  using opmath = float;
  static float load(uint16_t x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
    return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  }
};

template <>
struct Storage<DType::kFloat16> {
  using type = uint16_t;
  using opmath = float;
  static float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    // Normal numbers: rebias the exponent by scaling; subnormals: build them with a magic bias.
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    // A mask, not `?:`: gcc sinks the float ops into the arms of a `?:` and then cannot if-convert the loop
    // without AVX-512's masked ops (the AVX2 fp16 loop stayed scalar, 14x slower than AVX2 bf16).
    const uint32_t is_subnormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    const uint32_t magnitude = (float_to_bits(denormalized) & is_subnormal) | (float_to_bits(normalized) & ~is_subnormal);
    return bits_to_float(sign | magnitude);
  }
  static uint16_t store(float f) {
    // The two scalings round the mantissa to fp16's width (and overflow to inf) in the FPU's own RNE.
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);  // a mask, as in load()
    return static_cast<uint16_t>((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan));
  }
};

// LERP_SMALL is StepScalars::lerp_small made a constant. It is loop-invariant anyway, but gcc 12 cannot vectorize
// a select on a runtime bool between float vectors of a loop that also holds 16-bit data (bf16/fp16 stay scalar).
template <DType K, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool LERP_SMALL>
FA_LOOP void adam_loop(typename Storage<K>::type* __restrict param, typename Storage<K>::type* __restrict grad,
                       typename Storage<K>::type* __restrict exp_avg, typename Storage<K>::type* __restrict exp_avg_sq,
                       typename Storage<K>::type* __restrict max_exp_avg_sq, int64_t n,
                       StepScalars<typename Storage<K>::opmath> s, typename Storage<K>::opmath grad_scale) {
  using St = Storage<K>;
  using T = typename St::opmath;
  s.lerp_small = LERP_SMALL;
  for (int64_t i = 0; i < n; ++i) {
    T p = St::load(param[i]);
    T g = St::load(grad[i]);
    T m = St::load(exp_avg[i]);
    T v = St::load(exp_avg_sq[i]);
    T vmax = AMSGRAD ? St::load(max_exp_avg_sq[i]) : T(0);
    adam_update<T, WD, AMSGRAD, MAXIMIZE, UNSCALE>(p, g, m, v, vmax, s, grad_scale);
    param[i] = St::store(p);
    if (UNSCALE) grad[i] = St::store(g);
    exp_avg[i] = St::store(m);
    exp_avg_sq[i] = St::store(v);
    if (AMSGRAD) max_exp_avg_sq[i] = St::store(vmax);
  }
}

// NOTE [16-bit pairs]: over uint16_t arrays, gcc widens 16-bit lanes to 32 and narrows them back with lane-crossing
// shuffles (AVX2: vextracti128 + vpmovzxwd per load, vpackusdw + vpermq per store; AVX-512: vpermt2w), ~20 per 16
// elements, more than the conversions' own ALU ops. Read as dwords, a pair of elements needs none: element 2j is the
// dword's low half and 2j+1 its high half, each converted within its 32-bit lane, and the two stores are or-ed back
// into one dword. The same Storage functions and adam_update per element: adam_loop's bits (but for which NaN an op
// with two NaN operands returns, which follows the compiler's operand order; bf16's rounding to nearest makes every
// NaN 0x7FC0 anyway). Measured in bench/NOTES.md ("16-bit pairs"); bf16_avx512.h splits its blocks the same way.
typedef uint32_t Pair16 __attribute__((aligned(2), may_alias));  // two 16-bit elements, at any even address

template <DType K, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool LERP_SMALL>
FA_LOOP void adam_loop_pairs(uint16_t* __restrict param16, uint16_t* __restrict grad16,
                             uint16_t* __restrict exp_avg16, uint16_t* __restrict exp_avg_sq16,
                             uint16_t* __restrict max_exp_avg_sq16, int64_t pairs, StepScalars<float> s,
                             float grad_scale) {
  using St = Storage<K>;
  static_assert(sizeof(typename St::type) == 2, "pairs of 16-bit elements");
  Pair16 *param = reinterpret_cast<Pair16*>(param16), *grad = reinterpret_cast<Pair16*>(grad16);
  Pair16 *exp_avg = reinterpret_cast<Pair16*>(exp_avg16), *exp_avg_sq = reinterpret_cast<Pair16*>(exp_avg_sq16);
  Pair16* max_exp_avg_sq = reinterpret_cast<Pair16*>(max_exp_avg_sq16);
  s.lerp_small = LERP_SMALL;
  auto lo = [](uint32_t w) { return St::load(static_cast<uint16_t>(w)); };
  auto hi = [](uint32_t w) { return St::load(static_cast<uint16_t>(w >> 16)); };
  auto pair = [](float a, float b) {
    return static_cast<uint32_t>(St::store(a)) | static_cast<uint32_t>(St::store(b)) << 16;
  };
  for (int64_t j = 0; j < pairs; ++j) {
    const uint32_t pw = param[j], gw = grad[j], mw = exp_avg[j], vw = exp_avg_sq[j];
    const uint32_t xw = AMSGRAD ? max_exp_avg_sq[j] : 0u;
    float p0 = lo(pw), g0 = lo(gw), m0 = lo(mw), v0 = lo(vw), x0 = lo(xw);
    float p1 = hi(pw), g1 = hi(gw), m1 = hi(mw), v1 = hi(vw), x1 = hi(xw);
    adam_update<float, WD, AMSGRAD, MAXIMIZE, UNSCALE>(p0, g0, m0, v0, x0, s, grad_scale);
    adam_update<float, WD, AMSGRAD, MAXIMIZE, UNSCALE>(p1, g1, m1, v1, x1, s, grad_scale);
    param[j] = pair(p0, p1);
    if (UNSCALE) grad[j] = pair(g0, g1);
    exp_avg[j] = pair(m0, m1);
    exp_avg_sq[j] = pair(v0, v1);
    if (AMSGRAD) max_exp_avg_sq[j] = pair(x0, x1);
  }
}

#ifdef FA_CPU_BF16_SIMD
// The bf16 loop written with intrinsics (bf16_avx512.h, which kernel_avx512bf16.cpp includes after this file).
template <WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool LERP_SMALL>
void adam_loop_bf16(uint16_t* __restrict param, uint16_t* __restrict grad, uint16_t* __restrict exp_avg,
                    uint16_t* __restrict exp_avg_sq, uint16_t* __restrict max_exp_avg_sq, int64_t n,
                    StepScalars<float> s, float grad_scale);
#endif

template <DType K, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE>
void adam_chunk(const TensorPtrs& t, int64_t begin, int64_t n, const void* scalars, const StepArgs& args) {
  using S = typename Storage<K>::type;
  using T = typename Storage<K>::opmath;
  const StepScalars<T>& s = *static_cast<const StepScalars<T>*>(scalars);
  S* p = static_cast<S*>(t.param) + begin;
  S* g = static_cast<S*>(t.grad) + begin;
  S* m = static_cast<S*>(t.exp_avg) + begin;
  S* v = static_cast<S*>(t.exp_avg_sq) + begin;
  S* vmax = AMSGRAD ? static_cast<S*>(t.max_exp_avg_sq) + begin : nullptr;
  const T scale = static_cast<T>(args.grad_scale);
#ifdef FA_CPU_BF16_SIMD
  if constexpr (K == DType::kBFloat16) {
    if (s.lerp_small) {
      adam_loop_bf16<WD, AMSGRAD, MAXIMIZE, UNSCALE, true>(p, g, m, v, vmax, n, s, scale);
    } else {
      adam_loop_bf16<WD, AMSGRAD, MAXIMIZE, UNSCALE, false>(p, g, m, v, vmax, n, s, scale);
    }
    return;
  }
#endif
  if constexpr (sizeof(S) == 2) {  // NOTE [16-bit pairs]; an odd last element takes adam_loop
    const int64_t pairs = n / 2;
    if (s.lerp_small) {
      adam_loop_pairs<K, WD, AMSGRAD, MAXIMIZE, UNSCALE, true>(p, g, m, v, vmax, pairs, s, scale);
    } else {
      adam_loop_pairs<K, WD, AMSGRAD, MAXIMIZE, UNSCALE, false>(p, g, m, v, vmax, pairs, s, scale);
    }
    const int64_t done = 2 * pairs;
    if (done == n) return;
    p += done, g += done, m += done, v += done, vmax = AMSGRAD ? vmax + done : nullptr;
    n -= done;
  }
  if (s.lerp_small) {
    adam_loop<K, WD, AMSGRAD, MAXIMIZE, UNSCALE, true>(p, g, m, v, vmax, n, s, scale);
  } else {
    adam_loop<K, WD, AMSGRAD, MAXIMIZE, UNSCALE, false>(p, g, m, v, vmax, n, s, scale);
  }
}

template <DType K>
ChunkFn pick_modes(const Mode& mode) {
  return FA_WEIGHT_DECAY_SWITCH(mode.weight_decay, WD, [&] {
    return FA_BOOL_SWITCH(mode.amsgrad, AMSGRAD, [&] {
      return FA_BOOL_SWITCH(mode.maximize, MAXIMIZE, [&] {
        return FA_BOOL_SWITCH(mode.unscale, UNSCALE, [&] {
          return static_cast<ChunkFn>(&adam_chunk<K, WD, AMSGRAD, MAXIMIZE, UNSCALE>);
        });
      });
    });
  });
}

// ---- the feature loop (NOTE [cpu feature loops] in kernel.h) ----------------------------------------------------

// rounding.h's bf16_bits_sr(x, rand), written so that it vectorizes into a few instructions per store: inf needs
// no case of its own (its low 16 bits are zero, so adding rand <= 0xFFFF cannot carry), and a NaN is quieted as
// bf16_bits_rne does. Bitwise the same for every input (tests/test_cpu_features.py).
inline uint16_t bf16_store_sr(float f, uint32_t rand) {
  const uint32_t u = float_to_bits(f);
  return static_cast<uint16_t>(f != f ? (u >> 16) | 0x40u : (u + rand) >> 16);
}

// rounding.h's sr_bits(salt, index) for the low word `lo` of the index, with the high word folded into `salt`
// (sr_bits hashes lo ^ salt ^ hi * 0x27d4eb2f) and fmix32's first step, h ^ (h >> 16), split across the xor:
// the loop computes lo ^ (lo >> 16) once for all streams, and each stream passes salt ^ (salt >> 16).
inline uint32_t sr_rand(uint32_t lo_mixed, uint32_t salt_mixed) {
  uint32_t h = (lo_mixed ^ salt_mixed) * 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return (h ^ (h >> 16)) & 0xFFFFu;
}

// One store of an opmath value: stochastically rounded where SR (bf16 only), else to nearest even.
template <DType K, bool SR>
inline typename Storage<K>::type store_to(typename Storage<K>::opmath x, uint32_t lo_mixed, uint32_t salt_mixed) {
  if constexpr (SR && K == DType::kBFloat16) {
    return bf16_store_sr(x, sr_rand(lo_mixed, salt_mixed));
  } else {
    return Storage<K>::store(x);
  }
}

// Per stream: rounding.h's sr_salt, xor the index's high word times 0x27d4eb2f, then x ^ (x >> 16) (sr_rand).
struct Salts {
  uint32_t param, exp_avg, exp_avg_sq, max_exp_avg_sq;
};

// adam_update with storage types of its own for params/grads (PK) and states (SK), an fp32 master (MASTER), and
// stochastic rounding of the param stores (SR_PARAM) and of the state stores (SR_STATE), as the caller decided.
// fp32 math (fp64 for fp64 params), one rounding per store. `index0` is the tensor index of element 0 (low word).
template <DType PK, DType SK, bool MASTER, bool SR_PARAM, bool SR_STATE, WeightDecay WD, bool AMSGRAD, bool UNSCALE,
          bool LERP_SMALL>
FA_LOOP void adam_loop_x(typename Storage<PK>::type* __restrict param, typename Storage<PK>::type* __restrict grad,
                         typename Storage<SK>::type* __restrict exp_avg, typename Storage<SK>::type* __restrict exp_avg_sq,
                         typename Storage<SK>::type* __restrict max_exp_avg_sq, float* __restrict master, int64_t n,
                         StepScalars<typename Storage<PK>::opmath> s, typename Storage<PK>::opmath grad_scale,
                         typename Storage<PK>::opmath grad_mul, uint32_t index0, Salts salt) {
  using P = Storage<PK>;
  using S = Storage<SK>;
  using T = typename P::opmath;
  static_assert(std::is_same_v<T, typename S::opmath>, "params and states share one opmath type");
  static_assert(!MASTER || std::is_same_v<T, float>, "an fp32 master is the opmath of bf16/fp16 params");
  static_assert(!SR_PARAM || (PK == DType::kBFloat16 && !MASTER), "a param store rounds stochastically only as bf16 "
                "without a master (the master's copy rounds to nearest)");
  static_assert(!SR_STATE || SK == DType::kBFloat16, "a state store rounds stochastically only as bf16");
  s.lerp_small = LERP_SMALL;
  uint32_t index = index0;  // a 32-bit induction variable: a 64-bit one costs two vectors and a narrowing
  for (int64_t i = 0; i < n; ++i, ++index) {
    const uint32_t lo_mixed = index ^ (index >> 16);
    T p;
    if constexpr (MASTER) {
      p = master[i];
    } else {
      p = P::load(param[i]);
    }
    T g = P::load(grad[i]);
    T m = S::load(exp_avg[i]);
    T v = S::load(exp_avg_sq[i]);
    T vmax = AMSGRAD ? S::load(max_exp_avg_sq[i]) : T(0);
    adam_update<T, WD, AMSGRAD, /*MAXIMIZE=*/false, UNSCALE, /*CLIP=*/true>(p, g, m, v, vmax, s, grad_scale, grad_mul);
    if constexpr (MASTER) {
      master[i] = p;
      param[i] = P::store(p);
    } else {
      param[i] = store_to<PK, SR_PARAM>(p, lo_mixed, salt.param);
    }
    if (UNSCALE) grad[i] = P::store(g);
    exp_avg[i] = store_to<SK, SR_STATE>(m, lo_mixed, salt.exp_avg);
    exp_avg_sq[i] = store_to<SK, SR_STATE>(v, lo_mixed, salt.exp_avg_sq);
    if (AMSGRAD) max_exp_avg_sq[i] = store_to<SK, SR_STATE>(vmax, lo_mixed, salt.max_exp_avg_sq);
  }
}

// adam_loop_x over 16-bit params and states without a master, two elements per dword (NOTE [16-bit pairs]):
// elements 2j and 2j+1 of the run, whose index is index0 + 2j (+1) for stochastic rounding.
template <DType PK, DType SK, bool SR_PARAM, bool SR_STATE, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool LERP_SMALL>
FA_LOOP void adam_loop_x_pairs(uint16_t* __restrict param16, uint16_t* __restrict grad16,
                               uint16_t* __restrict exp_avg16, uint16_t* __restrict exp_avg_sq16,
                               uint16_t* __restrict max_exp_avg_sq16, int64_t pairs, StepScalars<float> s,
                               float grad_scale, float grad_mul, uint32_t index0, Salts salt) {
  using P = Storage<PK>;
  using S = Storage<SK>;
  static_assert(sizeof(typename P::type) == 2 && sizeof(typename S::type) == 2, "pairs of 16-bit elements");
  Pair16 *param = reinterpret_cast<Pair16*>(param16), *grad = reinterpret_cast<Pair16*>(grad16);
  Pair16 *exp_avg = reinterpret_cast<Pair16*>(exp_avg16), *exp_avg_sq = reinterpret_cast<Pair16*>(exp_avg_sq16);
  Pair16* max_exp_avg_sq = reinterpret_cast<Pair16*>(max_exp_avg_sq16);
  s.lerp_small = LERP_SMALL;
  auto lo = [](auto st, uint32_t w) { return decltype(st)::load(static_cast<uint16_t>(w)); };
  auto hi = [](auto st, uint32_t w) { return decltype(st)::load(static_cast<uint16_t>(w >> 16)); };
  auto join = [](uint32_t a, uint32_t b) { return a | b << 16; };
  uint32_t index = index0;  // (32-bit, as adam_loop_x's)
  for (int64_t j = 0; j < pairs; ++j, index += 2) {
    const uint32_t mixed0 = index ^ (index >> 16), mixed1 = (index + 1) ^ ((index + 1) >> 16);
    const uint32_t pw = param[j], gw = grad[j], mw = exp_avg[j], vw = exp_avg_sq[j];
    const uint32_t xw = AMSGRAD ? max_exp_avg_sq[j] : 0u;
    float p0 = lo(P{}, pw), g0 = lo(P{}, gw), m0 = lo(S{}, mw), v0 = lo(S{}, vw), x0 = lo(S{}, xw);
    float p1 = hi(P{}, pw), g1 = hi(P{}, gw), m1 = hi(S{}, mw), v1 = hi(S{}, vw), x1 = hi(S{}, xw);
    adam_update<float, WD, AMSGRAD, /*MAXIMIZE=*/false, UNSCALE, /*CLIP=*/true>(p0, g0, m0, v0, x0, s, grad_scale,
                                                                                grad_mul);
    adam_update<float, WD, AMSGRAD, /*MAXIMIZE=*/false, UNSCALE, /*CLIP=*/true>(p1, g1, m1, v1, x1, s, grad_scale,
                                                                                grad_mul);
    param[j] = join(store_to<PK, SR_PARAM>(p0, mixed0, salt.param), store_to<PK, SR_PARAM>(p1, mixed1, salt.param));
    if (UNSCALE) grad[j] = join(P::store(g0), P::store(g1));
    exp_avg[j] = join(store_to<SK, SR_STATE>(m0, mixed0, salt.exp_avg),
                      store_to<SK, SR_STATE>(m1, mixed1, salt.exp_avg));
    exp_avg_sq[j] = join(store_to<SK, SR_STATE>(v0, mixed0, salt.exp_avg_sq),
                         store_to<SK, SR_STATE>(v1, mixed1, salt.exp_avg_sq));
    if (AMSGRAD) {
      max_exp_avg_sq[j] = join(store_to<SK, SR_STATE>(x0, mixed0, salt.max_exp_avg_sq),
                               store_to<SK, SR_STATE>(x1, mixed1, salt.max_exp_avg_sq));
    }
  }
}

#ifdef FA_CPU_BF16_SIMD
// bf16 params with bf16 states and no master, written with intrinsics (bf16_avx512.h).
template <bool SR, WeightDecay WD, bool AMSGRAD, bool UNSCALE, bool LERP_SMALL>
void adam_loop_x_bf16(uint16_t* __restrict param, uint16_t* __restrict grad, uint16_t* __restrict exp_avg,
                      uint16_t* __restrict exp_avg_sq, uint16_t* __restrict max_exp_avg_sq, int64_t n,
                      StepScalars<float> s, float grad_scale, float grad_mul, uint32_t index0, Salts salt);
#endif

template <DType PK, DType SK, bool MASTER, bool SR_PARAM, bool SR_STATE, WeightDecay WD, bool AMSGRAD, bool UNSCALE>
void adam_chunk_x(const TensorPtrs& t, int64_t begin, int64_t n, const void* scalars, const StepArgs& args) {
  using PS = typename Storage<PK>::type;
  using SS = typename Storage<SK>::type;
  using T = typename Storage<PK>::opmath;
  const StepScalars<T>& s = *static_cast<const StepScalars<T>*>(scalars);
  const T scale = static_cast<T>(args.grad_scale);
  const T mul = static_cast<T>(args.grad_mul);
  auto run = [&](int64_t off, int64_t len, uint32_t index0, Salts salts) {
    const int64_t at = begin + off;
    PS* p = static_cast<PS*>(t.param) + at;
    PS* g = static_cast<PS*>(t.grad) + at;
    SS* m = static_cast<SS*>(t.exp_avg) + at;
    SS* v = static_cast<SS*>(t.exp_avg_sq) + at;
    SS* vmax = AMSGRAD ? static_cast<SS*>(t.max_exp_avg_sq) + at : nullptr;
    float* master = MASTER ? t.master + at : nullptr;
#ifdef FA_CPU_BF16_SIMD
    if constexpr (PK == DType::kBFloat16 && SK == DType::kBFloat16 && !MASTER) {
      static_assert(SR_PARAM == SR_STATE, "bf16 params and states without a master: all stores alike");
      constexpr bool SR = SR_PARAM;
      if (s.lerp_small) {
        adam_loop_x_bf16<SR, WD, AMSGRAD, UNSCALE, true>(p, g, m, v, vmax, len, s, scale, mul, index0, salts);
      } else {
        adam_loop_x_bf16<SR, WD, AMSGRAD, UNSCALE, false>(p, g, m, v, vmax, len, s, scale, mul, index0, salts);
      }
      return;
    }
#endif
    if constexpr (sizeof(PS) == 2 && sizeof(SS) == 2 && !MASTER) {  // NOTE [16-bit pairs]; an odd last one below
      const int64_t pairs = len / 2;
      if (s.lerp_small) {
        adam_loop_x_pairs<PK, SK, SR_PARAM, SR_STATE, WD, AMSGRAD, UNSCALE, true>(p, g, m, v, vmax, pairs, s, scale,
                                                                                  mul, index0, salts);
      } else {
        adam_loop_x_pairs<PK, SK, SR_PARAM, SR_STATE, WD, AMSGRAD, UNSCALE, false>(p, g, m, v, vmax, pairs, s, scale,
                                                                                   mul, index0, salts);
      }
      const int64_t done = 2 * pairs;
      if (done == len) return;
      p += done, g += done, m += done, v += done, vmax = AMSGRAD ? vmax + done : nullptr;
      len -= done, index0 += static_cast<uint32_t>(done);
    }
    if (s.lerp_small) {
      adam_loop_x<PK, SK, MASTER, SR_PARAM, SR_STATE, WD, AMSGRAD, UNSCALE, true>(p, g, m, v, vmax, master, len, s, scale, mul, index0, salts);
    } else {
      adam_loop_x<PK, SK, MASTER, SR_PARAM, SR_STATE, WD, AMSGRAD, UNSCALE, false>(p, g, m, v, vmax, master, len, s, scale, mul, index0, salts);
    }
  };
  if constexpr (!SR_PARAM && !SR_STATE) {
    run(0, n, 0, Salts{});
  } else {
    // sr_bits(salt, index) = fmix32(lo ^ salt ^ hi * 0x27d4eb2f) (rounding.h): over a run of elements with one
    // high word (index >> 32) the hi term joins the salt, and the loop hashes the 32-bit low word only.
    for (int64_t off = 0; off < n;) {
      const uint64_t index = static_cast<uint64_t>(begin + off);
      const uint32_t lo = static_cast<uint32_t>(index);
      const uint32_t hi = static_cast<uint32_t>(index >> 32) * 0x27d4eb2fu;
      const int64_t len = std::min<int64_t>(n - off, (int64_t{1} << 32) - lo);
      auto mixed = [&](int k) {
        const uint32_t salt = t.salt[k] ^ hi;
        return salt ^ (salt >> 16);
      };
      run(off, len, lo, Salts{mixed(0), mixed(1), mixed(2), mixed(3)});
      off += len;
    }
  }
}

template <DType PK, DType SK, bool MASTER, bool SR_PARAM, bool SR_STATE>
ChunkFn pick_feature_modes(const Mode& mode) {
  return FA_BOOL_SWITCH(mode.weight_decay == WeightDecay::kL2, L2, [&] {
    constexpr WeightDecay WD = L2 ? WeightDecay::kL2 : WeightDecay::kDecoupled;  // none: decoupled by 1
    return FA_BOOL_SWITCH(mode.amsgrad, AMSGRAD, [&] {
      return FA_BOOL_SWITCH(mode.unscale, UNSCALE, [&] {
        return static_cast<ChunkFn>(&adam_chunk_x<PK, SK, MASTER, SR_PARAM, SR_STATE, WD, AMSGRAD, UNSCALE>);
      });
    });
  });
}

inline ChunkFn pick_feature(const Mode& mode) {
#define FA_CPU_PICK_KIND(PK, SK, MASTER, SR_PARAM, SR_STATE)                                          \
  if (mode.dtype == PK && mode.state_dtype == SK && mode.master == MASTER && mode.sr_param == SR_PARAM && \
      mode.sr_state == SR_STATE)                                                                          \
    return pick_feature_modes<PK, SK, MASTER, SR_PARAM, SR_STATE>(mode);
  FA_CPU_FEATURE_KINDS(FA_CPU_PICK_KIND)
#undef FA_CPU_PICK_KIND
  return nullptr;
}

inline ChunkFn pick(const Mode& mode) {
  if (uses_feature_loop(mode)) return pick_feature(mode);
  switch (mode.dtype) {
    case DType::kFloat32:
      return pick_modes<DType::kFloat32>(mode);
    case DType::kFloat64:
      return pick_modes<DType::kFloat64>(mode);
    case DType::kBFloat16:
      return pick_modes<DType::kBFloat16>(mode);
    case DType::kFloat16:
      return pick_modes<DType::kFloat16>(mode);
  }
  return nullptr;
}

// Adam's traffic (read p, g, m, v; write p, m, v: 28 B/param) with an add per array, so that the time is
// memory time. Kept in the same file and the same threading as the real loop so the two compare honestly.
FA_LOOP void roofline_loop(float* __restrict p, const float* __restrict g, float* __restrict m,
                                     float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i] + gi;
    const float vi = v[i] + gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] + (mi - vi);
  }
}

inline void roofline_chunk(const TensorPtrs& t, int64_t begin, int64_t n, const void*, const StepArgs&) {
  roofline_loop(static_cast<float*>(t.param) + begin, static_cast<const float*>(t.grad) + begin,
                static_cast<float*>(t.exp_avg) + begin, static_cast<float*>(t.exp_avg_sq) + begin, n);
}
