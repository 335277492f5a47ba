// The CPU element loop: adam_update (csrc/adam_math.h) over one contiguous piece of one tensor, for every dtype
// and mode. Written once as scalar C++ with __restrict pointers; gcc vectorizes it for the ISA of the including
// translation unit (NOTE [cpu ISA dispatch] in kernel.h). Checked with objdump: the AVX-512 build runs on zmm
// registers (vsqrtps/vdivps %zmm), bf16 and fp16 conversions included, with a scalar tail.
//
// Low-precision storage (bf16, fp16) is converted to fp32 and back with integer/float bit operations rather
// than intrinsics or c10 types, so that the conversions vectorize inside the same loop: one rounding per store,
// round-to-nearest-even, NaN stays NaN. They are bitwise c10's conversions (c10/util/BFloat16.h
// round_to_nearest_even, and c10/util/Half.h fp16_ieee_{to,from}_fp32_value from Maratyszcza's FP16 library),
// which for fp16 equal the F16C instructions torch uses except in the payload of a NaN.
//
// Include this file only from kernel_<isa>.cpp, inside `namespace fused_adam::cpu::<isa>`.
#ifndef FA_CPU_ISA_NAMESPACE
#error "kernel_impl.h is included by kernel_<isa>.cpp only"
#endif

// The loops inline everything they call (adam_update included: no call, and no shared out-of-line copy, can leave
// the ISA), and stay functions of their own, so that the vectorizer sees their __restrict parameters.
#define FA_LOOP __attribute__((flatten, noinline))

// flash-attention's BOOL_SWITCH: a runtime bool becomes the constexpr CONST_NAME inside the lambda.
#define FA_BOOL_SWITCH(COND, CONST_NAME, ...)     \
  [&] {                                           \
    if (COND) {                                   \
      constexpr static bool CONST_NAME = true;    \
      return __VA_ARGS__();                       \
    } else {                                      \
      constexpr static bool CONST_NAME = false;   \
      return __VA_ARGS__();                       \
    }                                             \
  }()

#define FA_WEIGHT_DECAY_SWITCH(WD_VALUE, CONST_NAME, ...)                              \
  [&] {                                                                                \
    switch (WD_VALUE) {                                                                \
      case ::fused_adam::WeightDecay::kL2: {                                           \
        constexpr static ::fused_adam::WeightDecay CONST_NAME = ::fused_adam::WeightDecay::kL2; \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::fused_adam::WeightDecay::kDecoupled: {                                    \
        constexpr static ::fused_adam::WeightDecay CONST_NAME = ::fused_adam::WeightDecay::kDecoupled; \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      default: {                                                                       \
        constexpr static ::fused_adam::WeightDecay CONST_NAME = ::fused_adam::WeightDecay::kNone; \
        return __VA_ARGS__();                                                          \
      }                                                                                \
    }                                                                                  \
  }()

// __builtin_bit_cast, not memcpy: a memcpy through a local kept gcc from vectorizing the bf16/fp16 loops.
inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// Storage type <-> opmath type of each dtype.
template <ScalarKind K>
struct Storage;

template <>
struct Storage<ScalarKind::kFloat> {
  using type = float;
  using opmath = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

template <>
struct Storage<ScalarKind::kDouble> {
  using type = double;
  using opmath = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};

template <>
struct Storage<ScalarKind::kBFloat16> {
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
struct Storage<ScalarKind::kHalf> {
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
template <ScalarKind K, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool LERP_SMALL>
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

template <ScalarKind K, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE>
void adam_chunk(const TensorPtrs& t, int64_t begin, int64_t n, const void* scalars, double grad_scale) {
  using S = typename Storage<K>::type;
  using T = typename Storage<K>::opmath;
  const StepScalars<T>& s = *static_cast<const StepScalars<T>*>(scalars);
  S* p = static_cast<S*>(t.param) + begin;
  S* g = static_cast<S*>(t.grad) + begin;
  S* m = static_cast<S*>(t.exp_avg) + begin;
  S* v = static_cast<S*>(t.exp_avg_sq) + begin;
  S* vmax = AMSGRAD ? static_cast<S*>(t.max_exp_avg_sq) + begin : nullptr;
  const T scale = static_cast<T>(grad_scale);
  if (s.lerp_small) {
    adam_loop<K, WD, AMSGRAD, MAXIMIZE, UNSCALE, true>(p, g, m, v, vmax, n, s, scale);
  } else {
    adam_loop<K, WD, AMSGRAD, MAXIMIZE, UNSCALE, false>(p, g, m, v, vmax, n, s, scale);
  }
}

template <ScalarKind K>
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

inline ChunkFn pick(const Mode& mode) {
  switch (mode.dtype) {
    case ScalarKind::kFloat:
      return pick_modes<ScalarKind::kFloat>(mode);
    case ScalarKind::kDouble:
      return pick_modes<ScalarKind::kDouble>(mode);
    case ScalarKind::kBFloat16:
      return pick_modes<ScalarKind::kBFloat16>(mode);
    case ScalarKind::kHalf:
      return pick_modes<ScalarKind::kHalf>(mode);
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

inline void roofline_chunk(const TensorPtrs& t, int64_t begin, int64_t n, const void*, double) {
  roofline_loop(static_cast<float*>(t.param) + begin, static_cast<const float*>(t.grad) + begin,
                static_cast<float*>(t.exp_avg) + begin, static_cast<float*>(t.exp_avg_sq) + begin, n);
}
