// StepOptions (csrc/common/options.h) from what Python hands a backend, in one place for every binding: the
// partition's PartOptions once (partition_options), and each step's Hyper and Amp (read_step). The Python classes
// are python/fused_adam/backends/__init__.py's; this header reads their fields by name and decides nothing.
// Also the same check for the torch op's arguments (set_amp). Needs pybind11 and torch (torch/extension.h).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "common/options.h"

namespace fused_adam {

// NOTE [tensor hyperparameters] (common/options.h): a Tensor lr, beta1 or beta2 of a step that is not capturable,
// and the scalars torch's for-loop computes from it, with its ops (torch/optim/adam.py _single_tensor_adam, the
// lines quoted). The tensors are 0-dim, detached, on the host; an undefined one is the number beside it.
struct TensorHyper final : TensorHyperValues {
  at::Tensor lr, beta1, beta2;
  double lr_value = 0, beta1_value = 0, beta2_value = 0;

  void step_pair(double step, double& neg_step_size, double& bias_correction2_sqrt) const override {
    // bias_correction{1,2} = 1 - beta ** step: a Tensor where beta is one, else Python's float math
    at::Tensor bc1_t, bc2_t;
    double bc1 = 0, bc2 = 0;
    if (beta1.defined()) bc1_t = at::rsub(at::pow(beta1, step), 1); else bc1 = 1.0 - std::pow(beta1_value, step);
    if (beta2.defined()) bc2_t = at::rsub(at::pow(beta2, step), 1); else bc2 = 1.0 - std::pow(beta2_value, step);
    // step_size = lr / bias_correction1 (a float over a Tensor is Tensor.__rtruediv__: reciprocal() * float)
    double step_size;
    if (lr.defined()) {
      step_size = (bc1_t.defined() ? at::div(lr, bc1_t) : at::div(lr, bc1)).item<double>();
    } else if (bc1_t.defined()) {
      step_size = (at::reciprocal(bc1_t) * lr_value).item<double>();
    } else {
      step_size = lr_value / bc1;
    }
    neg_step_size = -step_size;  // addcdiv_'s value=-step_size
    // bias_correction2_sqrt = bias_correction2 ** 0.5
    bias_correction2_sqrt = bc2_t.defined() ? at::pow(bc2_t, 0.5).item<double>() : std::pow(bc2, 0.5);
  }
};

// The tensors a StepOptions' pointers point into (converted to float32 where they were not), alive for the step.
struct StepInputs {
  at::Tensor grad_scale, found_inf, clip_coef;
  at::Tensor lr;         // Hyper.lr when it is a Tensor read on the host
  at::Tensor lr_device;  // Hyper.lr as float64 on the device, read there by a capturable step
  at::Tensor decay_device;  // with lr_device, AdamW's 1 - lr * weight_decay (float64, on the device)
  TensorHyper tensor_hyper;  // StepOptions::tensor_hyper, when set
};

// The partition's options (PartOptions: wd_mode, amsgrad, maximize, capturable, master, sr_param, sr_state, seed).
inline StepOptions partition_options(pybind11::handle part_options) {
  namespace py = pybind11;
  StepOptions o;
  o.wd_mode = static_cast<WeightDecay>(part_options.attr("wd_mode").cast<int>());
  o.amsgrad = part_options.attr("amsgrad").cast<bool>();
  o.maximize = part_options.attr("maximize").cast<bool>();
  o.capturable = part_options.attr("capturable").cast<bool>();
  o.master = part_options.attr("master").cast<bool>();
  o.sr_param = part_options.attr("sr_param").cast<bool>();
  o.sr_state = part_options.attr("sr_state").cast<bool>();
  const py::object seed = part_options.attr("seed");
  o.seed = PyLong_AsUnsignedLongLongMask(seed.ptr());  // the low 64 bits (two's complement of a negative seed)
  if (PyErr_Occurred()) throw py::error_already_set();
  return o;
}

// `value` as a double: a Python number, or a one-element Tensor read on the host (kept in *tensor when given).
inline double host_number(pybind11::handle value, const char* name, at::Tensor* tensor = nullptr) {
  if (THPVariable_Check(value.ptr())) {
    const at::Tensor t = THPVariable_Unpack(value.ptr());
    TORCH_CHECK_VALUE(t.numel() == 1, "FusedAdam: ", name, " must have one element, got shape ", t.sizes());
    if (tensor != nullptr) *tensor = t;
    return t.item<double>();
  }
  return value.cast<double>();
}

// A one-element tensor on `device`, as float32 (converted if it is not), or undefined for None.
inline at::Tensor device_scalar(const std::optional<at::Tensor>& t, const at::Device& device, const char* name,
                                const char* who) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->numel() == 1, who, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == device, who, ": ", name, " is on ", t->device(), ", expected ", device,
              " (the params' device)");
  return t->to(at::kFloat).contiguous();
}

// Amp's three scalars into `o` (pointers into `in`).
inline void set_amp(StepOptions& o, StepInputs& in, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                    const at::Device& device, const char* who) {
  in.grad_scale = device_scalar(grad_scale, device, "grad_scale", who);
  // found_inf as read: nonzero or not (1e-300 in float64 is a skipped step, and 0 in float32)
  const bool exact = !found_inf.has_value() || !found_inf->defined() || found_inf->scalar_type() == at::kFloat;
  in.found_inf = device_scalar(exact ? found_inf : std::optional<at::Tensor>(found_inf->ne(0)), device, "found_inf", who);
  in.clip_coef = device_scalar(clip_coef, device, "clip_coef", who);
  o.grad_scale = in.grad_scale.defined() ? in.grad_scale.data_ptr<float>() : nullptr;
  o.found_inf = in.found_inf.defined() ? in.found_inf.data_ptr<float>() : nullptr;
  o.clip_coef = in.clip_coef.defined() ? in.clip_coef.data_ptr<float>() : nullptr;
}

inline std::optional<at::Tensor> optional_tensor(pybind11::handle obj) {
  if (obj.is_none()) return std::nullopt;
  return obj.cast<at::Tensor>();
}

// This step's Hyper (lr, beta1, beta2, eps, weight_decay: numbers or one-element Tensors, read on the host) and Amp
// (None, or grad_scale / found_inf / clip_coef: None or Tensors on `device`) into `o`. A capturable step on a GPU
// reads a Tensor lr that lives there on the device (StepOptions::lr_device): no host sync, and a CUDA graph replays
// whatever a scheduler wrote into it.
inline void read_step(StepOptions& o, StepInputs& in, pybind11::handle hp, pybind11::handle amp,
                      const at::Device& device, const char* who) {
  const pybind11::handle lr = hp.attr("lr");
  at::Tensor lr_on_device;
  if (o.capturable && !device.is_cpu() && THPVariable_Check(lr.ptr()) &&
      THPVariable_Unpack(lr.ptr()).device() == device) {
    const at::Tensor t = THPVariable_Unpack(lr.ptr());
    TORCH_CHECK_VALUE(t.numel() == 1, who, ": lr must have one element, got shape ", t.sizes());
    lr_on_device = t;
    in.lr_device = t.to(at::kDouble).contiguous();
    o.lr_device = in.lr_device.data_ptr<double>();
    o.hyper.lr = 0.0;
  } else {
    o.hyper.lr = host_number(lr, "lr", &in.lr);
  }
  at::Tensor beta1, beta2;
  o.hyper.beta1 = host_number(hp.attr("beta1"), "beta1", &beta1);
  o.hyper.beta2 = host_number(hp.attr("beta2"), "beta2", &beta2);
  o.hyper.eps = host_number(hp.attr("eps"), "eps");
  o.hyper.weight_decay = host_number(hp.attr("weight_decay"), "weight_decay");
  o.decay = NAN;
  if (in.lr.defined() && o.wd_mode == WeightDecay::kDecoupled) {
    // torch.optim.AdamW computes 1 - lr * wd in lr's dtype when lr is a Tensor; a double factor drifts from it by
    // more than fp64 parity allows over a few steps.
    o.decay = at::rsub(in.lr * o.hyper.weight_decay, 1).item<double>();
  } else if (lr_on_device.defined() && o.wd_mode == WeightDecay::kDecoupled) {
    // The same factor on the device: stream-ordered ops, captured with the step (no host sync)
    in.decay_device = at::rsub(lr_on_device * o.hyper.weight_decay, 1).to(at::kDouble).contiguous();
    o.decay_device = in.decay_device.data_ptr<double>();
  }
  if (!o.capturable && (in.lr.defined() || beta1.defined() || beta2.defined())) {
    // NOTE [tensor hyperparameters]: the scalars as torch's ops compute them from the Tensors (numbers: as before)
    TensorHyper& t = in.tensor_hyper;
    const auto host = [](const at::Tensor& x) { return x.defined() ? x.detach().to(at::kCPU).reshape({}) : x; };
    t.lr = host(in.lr);
    t.beta1 = host(beta1);
    t.beta2 = host(beta2);
    t.lr_value = o.hyper.lr;
    t.beta1_value = o.hyper.beta1;
    t.beta2_value = o.hyper.beta2;
    t.beta1_tensor = beta1.defined();
    t.one_minus_beta2 = beta2.defined() ? at::rsub(t.beta2, 1).item<double>() : NAN;
    o.tensor_hyper = &t;
  }
  if (amp.is_none()) {
    set_amp(o, in, std::nullopt, std::nullopt, std::nullopt, device, who);
  } else {
    set_amp(o, in, optional_tensor(amp.attr("grad_scale")), optional_tensor(amp.attr("found_inf")),
            optional_tensor(amp.attr("clip_coef")), device, who);
  }
}

}  // namespace fused_adam
