// Stores of the fp32 math result: round-to-nearest-even to bf16, and stochastic rounding to bf16.
//
// Stochastic rounding (SR) rounds x up with probability equal to the fraction of a bf16 ulp it lies above
// the bf16 value below it, so E[SR(x)] = x: small updates that round-to-nearest would lose every step survive
// on average (Gupta et al., "Deep Learning with Limited Numerical Precision", arXiv:1502.02551).
// Implementation: add 16 random bits to the low half of x's fp32 bit pattern, then truncate. The random bits are
// a pure function of (seed, step, tensor, stream, element index), so a run resumed from a checkpoint draws the
// same bits as an uninterrupted one, and every thread/lane/block computes its own without shared RNG state.
// The Python reference (python/fused_adam/backends/reference.py: sr_salt, bf16_stochastic) computes the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace fused_adam {

// Which stored array a random stream belongs to: each gets independent bits.
enum class Stream : uint32_t { kParam = 0, kExpAvg = 1, kExpAvgSq = 2, kMaxExpAvgSq = 3 };

// MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche.
FA_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Per (seed, step, tensor, stream): computed once per tensor, outside the element loop.
FA_HOST_DEVICE uint32_t sr_salt(uint64_t seed, uint64_t step, uint64_t tensor, Stream stream) {
  uint32_t h = fmix32(static_cast<uint32_t>(seed) ^ fmix32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9u));
  h = fmix32(h ^ static_cast<uint32_t>(step));
  h = fmix32(h ^ static_cast<uint32_t>(tensor * 4u + static_cast<uint32_t>(stream)));
  return h;
}

// 16 random bits for element `index` of a tensor (64-bit index: tensors of 2^32 elements and more).
FA_HOST_DEVICE uint32_t sr_bits(uint32_t salt, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return fmix32(static_cast<uint32_t>(i) ^ salt ^ (static_cast<uint32_t>(i >> 32) * 0x27d4eb2fu)) & 0xffffu;
}

FA_HOST_DEVICE uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

// bf16 bit pattern of x, round to nearest even (NaN stays a quiet NaN).
FA_HOST_DEVICE uint16_t bf16_bits_rne(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// bf16 bit pattern of x, rounded stochastically with 16 random bits `rand` (NaN and inf are kept).
FA_HOST_DEVICE uint16_t bf16_bits_sr(float x, uint32_t rand) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return bf16_bits_rne(x);  // inf or NaN: nothing to round
  return static_cast<uint16_t>((u + rand) >> 16);
}

}  // namespace fused_adam
