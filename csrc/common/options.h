// What one step of one partition is given beyond its tensors, for the CPU and CUDA kernels alike. Torch-free and
// CUDA-compilable. The torch binding fills it once per step from the partition's PartOptions (decided once, in
// python/fused_adam/backends/__init__.py: PartOptions.of) and the step's Hyper and Amp; kernels read it and never
// re-derive a rule from it (which stores round stochastically, which weight-decay mode applies).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fused_adam {

// PartOptions.wd_mode (python's WeightDecay has the same values): none, L2 (Adam: grad += wd * param), decoupled
// (AdamW: param *= 1 - lr * wd).
enum class WeightDecay : uint8_t { kNone = 0, kL2 = 1, kDecoupled = 2 };

// A param group's hyperparameters at this step, as doubles (a Tensor lr or beta is read on the host by the binding,
// or on the device through StepOptions::lr_device for capturable steps).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

// NOTE [tensor hyperparameters]: with a Tensor lr, beta1 or beta2, torch's for-loop (torch/optim/adam.py
// _single_tensor_adam, capturable=False) computes the step's scalars as 0-dim tensor math in the tensors' dtype
// where a Tensor enters them, not in double as with Python floats: bias_correction{1,2} = 1 - beta ** step,
// step_size = lr / bias_correction1 (float / Tensor is Tensor.reciprocal() * float), bias_correction2 ** 0.5,
// addcmul's value 1 - beta2, AdamW's 1 - lr * weight_decay (StepOptions::decay), and lerp's weight
// 1 - beta1.to(param dtype). fp64 parity needs those values (and fp32 parity with beta2 near 1). The binding
// computes them with torch's ops on the host (csrc/common/py_options.h: TensorHyper; the triton backend:
// backends/__init__.py's TensorHyper) and the kernels take them in place of make_step_scalars' double ones
// (host_step_scalars in adam_math.h). Not with float hyperparameters (StepOptions::tensor_hyper is null: the double
// path, unchanged), nor capturable steps (their scalars are computed on the device, in double).
struct TensorHyperValues {
  bool beta1_tensor = false;     // beta1 is a Tensor: lerp's weight is 1 - beta1 in opmath (torch: in the param's dtype)
  double one_minus_beta2 = NAN;  // 1 - beta2 in beta2's dtype (addcmul's value), or NaN: beta2 is a number
  // This step's -lr / (1 - beta1 ** step) and (1 - beta2 ** step) ** 0.5, as torch's ops compute them.
  virtual void step_pair(double step, double& neg_step_size, double& bias_correction2_sqrt) const = 0;

 protected:
  ~TensorHyperValues() = default;
};

struct StepOptions {
  AdamHyper hyper{};
  // AdamW's decay factor 1 - lr * weight_decay when the caller computed it (with a Tensor lr torch computes it in
  // the lr's dtype, and fp64 parity needs that value); NaN: computed from `hyper` in double.
  double decay = NAN;
  // Not capturable, a Tensor lr or beta: the scalars torch computes from it (NOTE [tensor hyperparameters]); read on
  // the host only. Null: every scalar from `hyper` (and `decay`), in double.
  const TensorHyperValues* tensor_hyper = nullptr;

  // The partition's options (PartOptions), the same every step.
  WeightDecay wd_mode = WeightDecay::kNone;
  bool amsgrad = false;
  bool maximize = false;
  bool capturable = false;  // steps (and lr_device) are read on the device: no host sync
  bool master = false;      // every tensor has an fp32 master (bf16/fp16 params); the param gets it rounded to nearest
  bool sr_param = false;    // the param stores round stochastically (csrc/rounding.h)
  bool sr_state = false;    // the state stores (exp_avg, exp_avg_sq, max_exp_avg_sq) round stochastically
  uint64_t seed = 0;        // stochastic rounding's seed
  int64_t chunk_size = 0;   // elements per work item (chunk table entry); 0: the backend's default

  // On the partition's device (host memory for the CPU), or null. float32 scalars, read by the kernel.
  const float* grad_scale = nullptr;  // AMP: grads are divided by it, and stored back unscaled
  const float* found_inf = nullptr;   // AMP: nonzero: nothing changes (params, grads, states, steps)
  const float* clip_coef = nullptr;   // the unscaled grad is multiplied by it for the update only
  const double* lr_device = nullptr;  // capturable: lr on the device (else hyper.lr)
  // capturable AdamW with lr_device: 1 - lr * weight_decay on the device, in the lr's dtype as torch computes it
  // (else from hyper and *lr_device, in double)
  const double* decay_device = nullptr;

  FA_HOST_DEVICE bool stochastic_rounding() const { return sr_param || sr_state; }
  FA_HOST_DEVICE bool unscale() const { return grad_scale != nullptr; }
  FA_HOST_DEVICE bool clip() const { return clip_coef != nullptr; }
};

}  // namespace fused_adam
