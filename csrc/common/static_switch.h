// Runtime modes made compile-time constants (flash-attention's BOOL_SWITCH): the CPU loops and the CUDA launcher
// pick their instantiation with these. Torch-free; CUDA-compilable (host code).
#pragma once

#include "common/options.h"

// A runtime bool becomes the constexpr CONST_NAME inside the lambda body.
#define FA_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                        \
    if (COND) {                                \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr static bool CONST_NAME = false;\
      return __VA_ARGS__();                    \
    }                                          \
  }()

// A runtime ::fused_adam::WeightDecay becomes the constexpr CONST_NAME inside the lambda body.
#define FA_WEIGHT_DECAY_SWITCH(WD_VALUE, CONST_NAME, ...)                                         \
  [&] {                                                                                           \
    switch (WD_VALUE) {                                                                           \
      case ::fused_adam::WeightDecay::kL2: {                                                      \
        constexpr static ::fused_adam::WeightDecay CONST_NAME = ::fused_adam::WeightDecay::kL2;   \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case ::fused_adam::WeightDecay::kDecoupled: {                                               \
        constexpr static ::fused_adam::WeightDecay CONST_NAME =                                   \
            ::fused_adam::WeightDecay::kDecoupled;                                                \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      default: {                                                                                  \
        constexpr static ::fused_adam::WeightDecay CONST_NAME = ::fused_adam::WeightDecay::kNone; \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
    }                                                                                             \
  }()
