// Per-element Adam/AdamW update: the one source of truth for the CPU kernel (csrc/cpu) and the CUDA kernel
// (csrc/cuda). The Triton kernel (python/fused_adam/backends/triton.py) and the reference backend follow the
// same order of operations.
//
// Order of operations = torch.optim.adam._single_tensor_adam (torch 2.13, capturable=False), in opmath T
// (float for fp32/bf16/fp16 params, double for fp64):
//   g  = grad / grad_scale                       (AMP: the unscaled grad is also stored back, as torch fused does)
//   g  = g * clip_coef                           (max_grad_norm: clip_grad_norm_'s in-place mul, not stored)
//   g  = maximize ? -g : g
//   p  = p * (1 - lr*wd)                         (decoupled weight decay, AdamW)
//   g  = fma(wd, p, g)                           (L2 weight decay, Adam; at::add with alpha is one fma)
//   m  = lerp(m, g, 1 - beta1)                   (at::lerp's vector form: one fma)
//   v  = fma((1 - beta2) * g, g, v * beta2)      (at::addcmul's form)
//   vmax = max(vmax, v)                          (amsgrad; the denominator then uses vmax)
//   p  = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The per-tensor scalars are computed in double, as torch's Python code does, then rounded once to T (with a Tensor lr
// or beta: as torch's tensor ops compute them, NOTE [tensor hyperparameters] in common/options.h).
// References: Kingma & Ba, "Adam" (arXiv:1412.6980); Loshchilov & Hutter, "Decoupled Weight Decay
// Regularization" (arXiv:1711.05101); Reddi et al., "On the Convergence of Adam and Beyond" (AMSGrad).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "common/options.h"  // WeightDecay, AdamHyper

namespace fused_adam {

// Math on opmath scalars, spelled the same on host and device (::sqrt on a float would be the double one).
FA_HOST_DEVICE float fa_sqrt(float x) { return sqrtf(x); }
FA_HOST_DEVICE double fa_sqrt(double x) { return sqrt(x); }
FA_HOST_DEVICE float fa_fma(float a, float b, float c) { return fmaf(a, b, c); }
FA_HOST_DEVICE double fa_fma(double a, double b, double c) { return fma(a, b, c); }
// torch.maximum(a, b): NaN propagates (a NaN `a` is kept, a NaN `b` wins over a number). A function rather than
// an expression in adam_update so that a SIMD opmath type (csrc/cpu/bf16_avx512.h) can overload it.
FA_HOST_DEVICE float fa_maximum_nan(float a, float b) { return (a != a || a > b) ? a : b; }
FA_HOST_DEVICE double fa_maximum_nan(double a, double b) { return (a != a || a > b) ? a : b; }

// Scalars of one tensor's step (they depend on that tensor's step count), in opmath T.
template <typename T>
struct StepScalars {
  T decay;                  // 1 - lr * wd                     (decoupled)
  T weight_decay;           // wd                              (L2)
  T lerp_coeff;             // w = 1 - beta1 if |w| < 0.5, else w - 1 (at::lerp's two forms)
  bool lerp_small;          // which form: uniform over a tensor, so the branch is loop-invariant
  T beta2;
  T one_minus_beta2;
  T neg_step_size;          // -lr / (1 - beta1^t)
  T bias_correction2_sqrt;  // (1 - beta2^t) ** 0.5
  T eps;
};

// at::lerp's weight w = 1 - beta1, and which of its two forms runs.
template <typename T>
FA_HOST_DEVICE void set_lerp_weight(StepScalars<T>& s, T w) {
  s.lerp_small = (w < T(0.5) && w > T(-0.5));
  s.lerp_coeff = s.lerp_small ? w : w - T(1);
}

template <typename T>
FA_HOST_DEVICE StepScalars<T> make_step_scalars(const AdamHyper& h, double step) {
  const double bias_correction1 = 1.0 - ::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - ::pow(h.beta2, step);
  StepScalars<T> s;
  s.decay = static_cast<T>(1.0 - h.lr * h.weight_decay);
  s.weight_decay = static_cast<T>(h.weight_decay);
  set_lerp_weight(s, static_cast<T>(1.0 - h.beta1));
  s.beta2 = static_cast<T>(h.beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
  s.neg_step_size = static_cast<T>(-(h.lr / bias_correction1));
  s.bias_correction2_sqrt = static_cast<T>(::pow(bias_correction2, 0.5));  // Python's `** 0.5` is pow()
  s.eps = static_cast<T>(h.eps);
  return s;
}

// The scalars of a step whose counts are on the host (not capturable): make_step_scalars', with AdamW's decay factor
// and a Tensor lr's or beta's values where the binding computed them as torch does (NOTE [tensor hyperparameters]
// in common/options.h). Host only. with_pair = false: the caller takes the step-dependent pair (neg_step_size,
// bias_correction2_sqrt) from elsewhere (per tensor), and `step` is only make_step_scalars' placeholder.
template <typename T>
inline StepScalars<T> host_step_scalars(const StepOptions& o, double step, bool with_pair = true) {
  StepScalars<T> s = make_step_scalars<T>(o.hyper, step);
  if (!std::isnan(o.decay)) s.decay = static_cast<T>(o.decay);
  if (const TensorHyperValues* t = o.tensor_hyper) {
    // torch: exp_avg.lerp_(grad, 1 - beta1.to(param.dtype)), in the dtype the kernel computes in
    if (t->beta1_tensor) set_lerp_weight(s, T(1) - static_cast<T>(o.hyper.beta1));
    if (!std::isnan(t->one_minus_beta2)) s.one_minus_beta2 = static_cast<T>(t->one_minus_beta2);
    if (with_pair) {
      double neg_step_size = 0, bias_correction2_sqrt = 0;
      t->step_pair(step, neg_step_size, bias_correction2_sqrt);
      s.neg_step_size = static_cast<T>(neg_step_size);
      s.bias_correction2_sqrt = static_cast<T>(bias_correction2_sqrt);
    }
  }
  return s;
}

// One element. `grad` is in/out: with UNSCALE it is replaced by grad / grad_scale, which the caller stores.
// `max_exp_avg_sq` is only read and written when AMSGRAD. With CLIP the (unscaled) grad is multiplied by
// clip_coef (clip_grad_norm_'s coefficient, min(1, max_norm / (norm + 1e-6))) for the update only; the stored
// grad stays unclipped.
template <typename T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool UNSCALE, bool CLIP = false>
FA_HOST_DEVICE void adam_update(T& param, T& grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                const StepScalars<T>& s, T grad_scale, T clip_coef = T(1)) {
  if (UNSCALE) grad = grad / grad_scale;
  T g = CLIP ? grad * clip_coef : grad;
  if (MAXIMIZE) g = -g;
  if (WD == WeightDecay::kDecoupled) param = param * s.decay;
  if (WD == WeightDecay::kL2) g = fa_fma(s.weight_decay, param, g);  // grad.add(param, alpha=wd): ATen's is an fma
  // at::lerp(m, g, w): m + w*(g - m) for small w, else g + (w - 1)*(g - m); one fma, as ATen's vector path.
  exp_avg = fa_fma(s.lerp_coeff, g - exp_avg, s.lerp_small ? exp_avg : g);
  // v.mul_(beta2).addcmul_(g, g, value=1 - beta2): ATen's addcmul is fma(value * g, g, v), vector and scalar paths.
  exp_avg_sq = fa_fma(s.one_minus_beta2 * g, g, exp_avg_sq * s.beta2);
  T second = exp_avg_sq;
  if (AMSGRAD) {
    max_exp_avg_sq = fa_maximum_nan(max_exp_avg_sq, exp_avg_sq);  // torch.maximum: NaN propagates
    second = max_exp_avg_sq;
  }
  const T denom = fa_sqrt(second) / s.bias_correction2_sqrt + s.eps;
  param = param + s.neg_step_size * exp_avg / denom;
}

}  // namespace fused_adam
