// torch binding of the CUDA Adam/AdamW step: module fused_adam._C_cuda, built only where torch has CUDA.
// Validates the tensor lists once, at this boundary (messages name the param index, the argument and the value),
// gives the kernel dense buffers with one element order per param (copies where a grad's, state's or master's
// strides differ from its param's, written back after the launch; the row-major order with stochastic rounding,
// whose random bits follow the element index), and calls the torch-free launcher (adam_cuda.h) on the current
// stream. Called by python/fused_adam/backends/cuda.py, which follows the step contract of backends/__init__.py,
// optional features included (master_params, state dtype, stochastic rounding, clip_coef).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/adam_cuda.h"

namespace {

using at::Tensor;
namespace fc = fused_adam::cuda;

fc::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kDouble: return fc::DType::kFloat64;
    case at::kBFloat16: return fc::DType::kBFloat16;
    case at::kHalf: return fc::DType::kFloat16;
    default:
      TORCH_CHECK(false, "fused_adam cuda: params of dtype ", t,
                  " are not supported; expected float32, float64, bfloat16 or float16");
  }
  return fc::DType::kFloat32;  // unreachable
}

// Same element -> memory offset map as `like` (strides of size-1 dims do not matter).
bool same_layout(const Tensor& t, const Tensor& like) {
  if (t.dim() != like.dim()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

// A buffer the kernel works on: the tensor itself, or a copy in the param's element order (`copied`), written
// back to `write_back` after the launch where the kernel writes it (undefined: read-only, or the tensor itself).
struct Work {
  Tensor buffer;
  Tensor write_back;
  bool copied = false;
};

// `layout` is dense (non-overlapping and dense), the element order every buffer of one param must share.
Work as_dense_like(const Tensor& t, const Tensor& layout, bool written) {
  if (same_layout(t, layout)) return {t, Tensor()};
  Tensor copy = at::empty_strided(layout.sizes(), layout.strides(), t.options());
  copy.copy_(t);
  return {copy, written ? t : Tensor(), true};
}

// `dtype`, and what it is (e.g. "the param's dtype"), for the message.
void check_like(const Tensor& t, const Tensor& param, size_t i, const char* what, at::ScalarType dtype,
                const char* dtype_is) {
  TORCH_CHECK(t.device() == param.device(), "fused_adam cuda: ", what, " of param ", i, " is on ", t.device(),
              ", expected ", param.device(), " (the param's device)");
  TORCH_CHECK(t.scalar_type() == dtype, "fused_adam cuda: ", what, " of param ", i, " has dtype ", t.scalar_type(),
              ", expected ", dtype, " (", dtype_is, ")");
  TORCH_CHECK(t.sizes() == param.sizes(), "fused_adam cuda: ", what, " of param ", i, " has shape ", t.sizes(),
              ", expected ", param.sizes(), " (the param's shape)");
  TORCH_CHECK(t.layout() == at::kStrided, "fused_adam cuda: ", what, " of param ", i, " is ", t.layout(),
              "; FusedAdam needs dense tensors (use torch.optim.SparseAdam for sparse gradients)");
}

// A 1-element float32 tensor on `device` (AMP's grad_scale and found_inf, torch's layout), or undefined.
Tensor device_scalar(const std::optional<Tensor>& t, const at::Device& device, const char* what) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->numel() == 1, "fused_adam cuda: ", what, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == device, "fused_adam cuda: ", what, " is on ", t->device(), ", expected ", device,
              " (the params' device)");
  return t->to(at::kFloat).contiguous();
}

void adam_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
               const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
               const std::vector<Tensor>& max_exp_avg_sqs, const std::vector<Tensor>& state_steps, double lr,
               const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
               bool amsgrad, bool maximize, bool decoupled, bool capturable, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf, std::optional<double> decay,
               const std::vector<Tensor>& master_params, const std::vector<int64_t>& tensor_ids,
               bool stochastic_rounding, uint64_t seed, const std::optional<Tensor>& clip_coef) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              "fused_adam cuda: list lengths differ: ", n, " params, ", grads.size(), " grads, ", exp_avgs.size(),
              " exp_avgs, ", exp_avg_sqs.size(), " exp_avg_sqs, ", state_steps.size(), " state_steps");
  TORCH_CHECK(max_exp_avg_sqs.size() == (amsgrad ? n : 0), "fused_adam cuda: ", max_exp_avg_sqs.size(),
              " max_exp_avg_sqs for ", n, " params with amsgrad=", amsgrad ? "True" : "False");
  const bool master = !master_params.empty();
  TORCH_CHECK(!master || master_params.size() == n, "fused_adam cuda: ", master_params.size(), " master_params for ",
              n, " params");
  TORCH_CHECK(!stochastic_rounding || tensor_ids.size() == n, "fused_adam cuda: ", tensor_ids.size(),
              " tensor_ids for ", n, " params with stochastic_rounding=True");
  if (n == 0) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_adam cuda: param 0 is on ", device, "; the cuda backend needs CUDA tensors");
  const at::ScalarType dtype = params[0].scalar_type();
  const fc::DType kernel_dtype = to_dtype(dtype);
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  const fc::DType kernel_state_dtype = to_dtype(state_dtype);
  TORCH_CHECK(fc::compiled_pair(kernel_dtype, kernel_state_dtype), "fused_adam cuda: ", dtype, " params with ",
              state_dtype, " states are not supported (states take the param's dtype, or float32 params have "
              "bfloat16 states, or bfloat16/float16 params have float32 states)");
  TORCH_CHECK(!master || kernel_dtype == fc::DType::kBFloat16 || kernel_dtype == fc::DType::kFloat16,
              "fused_adam cuda: master_params need bfloat16 or float16 params, got ", dtype);
  const c10::cuda::CUDAGuard guard(device);

  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, "fused_adam cuda: param ", i, " is on ", p.device(), ", expected ", device,
                " (param 0's device)");
    TORCH_CHECK(p.scalar_type() == dtype, "fused_adam cuda: param ", i, " has dtype ", p.scalar_type(),
                ", expected ", dtype, " (param 0's dtype)");
    TORCH_CHECK(p.layout() == at::kStrided, "fused_adam cuda: param ", i, " is ", p.layout(),
                "; FusedAdam needs dense params");
    check_like(grads[i], p, i, "grad", dtype, "the param's dtype");
    check_like(exp_avgs[i], p, i, "exp_avg", state_dtype, "exp_avg 0's dtype");
    check_like(exp_avg_sqs[i], p, i, "exp_avg_sq", state_dtype, "exp_avg 0's dtype");
    if (amsgrad) check_like(max_exp_avg_sqs[i], p, i, "max_exp_avg_sq", state_dtype, "exp_avg 0's dtype");
    if (master) check_like(master_params[i], p, i, "master param", at::kFloat, "masters are float32");
    const Tensor& s = state_steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat, "fused_adam cuda: step of param ", i,
                " must be a 1-element float32 tensor, got dtype ", s.scalar_type(), " and shape ", s.sizes());
    if (capturable) {
      TORCH_CHECK(s.device() == device, "fused_adam cuda: step of param ", i, " is on ", s.device(),
                  "; capturable=True needs it on ", device, " (the param's device)");
    } else {
      TORCH_CHECK(s.device().is_cpu(), "fused_adam cuda: step of param ", i, " is on ", s.device(),
                  "; capturable=False needs it on the CPU");
    }
  }

  const Tensor scale = device_scalar(grad_scale, device, "grad_scale");
  const Tensor clip = device_scalar(clip_coef, device, "clip_coef");
  Tensor inf = device_scalar(found_inf, device, "found_inf");
  Tensor lr_device;
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    TORCH_CHECK(capturable, "fused_adam cuda: a device lr tensor needs capturable=True (pass lr as a float)");
    TORCH_CHECK(lr_tensor->numel() == 1, "fused_adam cuda: lr must have one element, got shape ", lr_tensor->sizes());
    TORCH_CHECK(lr_tensor->device() == device, "fused_adam cuda: lr is on ", lr_tensor->device(), ", expected ",
                device, " (the params' device)");
    lr_device = lr_tensor->to(at::kDouble).contiguous();
  }
  if (!capturable && inf.defined()) {
    // The steps live on the CPU and must not change when found_inf is set: one host read, as torch's
    // non-fused GradScaler path does.
    if (inf.item<float>() != 0.0f) return;
    inf = Tensor();
  }

  std::vector<fc::AdamTensor> tensors(n);
  // Every copy lives until the call returns, read-only ones (a grad in another layout) too: a copy freed
  // before the launch goes back to the caching allocator, and the next param's copy_ would overwrite it
  // before the kernel reads it.
  std::vector<Work> copies;
  const bool unscale = scale.defined();
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    fc::AdamTensor& t = tensors[i];
    t.numel = p.numel();
    if (capturable) {
      t.step_device = state_steps[i].data_ptr<float>();
    } else {
      t.step = static_cast<double>(*state_steps[i].data_ptr<float>() + 1.0f);  // stored after the launch
    }
    if (stochastic_rounding) t.tensor_id = static_cast<uint64_t>(tensor_ids[i]);
    if (t.numel == 0) continue;
    // One element order for all buffers: the param's if it is dense, else contiguous (a copy, written back).
    // Stochastic rounding draws element i's bits from its row-major index i, as the reference backend does: there
    // the order is contiguous.
    const bool param_ok = stochastic_rounding ? p.is_contiguous() : p.is_non_overlapping_and_dense();
    const Work wp = param_ok ? Work{p, Tensor()} : Work{p.contiguous(), p, true};
    const Tensor& layout = wp.buffer;
    const Work wg = as_dense_like(grads[i], layout, unscale);
    const Work wm = as_dense_like(exp_avgs[i], layout, true);
    const Work wv = as_dense_like(exp_avg_sqs[i], layout, true);
    const Work wmax = amsgrad ? as_dense_like(max_exp_avg_sqs[i], layout, true) : Work{};
    const Work wmaster = master ? as_dense_like(master_params[i], layout, true) : Work{};
    t.param = wp.buffer.data_ptr();
    t.grad = wg.buffer.data_ptr();
    t.exp_avg = wm.buffer.data_ptr();
    t.exp_avg_sq = wv.buffer.data_ptr();
    t.max_exp_avg_sq = amsgrad ? wmax.buffer.data_ptr() : nullptr;
    t.master = master ? wmaster.buffer.data_ptr<float>() : nullptr;
    for (const Work* w : {&wp, &wg, &wm, &wv, &wmax, &wmaster}) {
      if (w->copied) copies.push_back(*w);
    }
  }

  fc::AdamStepOptions o;
  o.hyper = fused_adam::AdamHyper{lr, beta1, beta2, eps, weight_decay};
  o.decoupled = decoupled;
  o.amsgrad = amsgrad;
  o.maximize = maximize;
  o.capturable = capturable;
  if (decay.has_value() && !capturable) o.decay = *decay;
  o.lr_device = lr_device.defined() ? lr_device.data_ptr<double>() : nullptr;
  o.grad_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  o.found_inf = inf.defined() ? inf.data_ptr<float>() : nullptr;
  o.clip_coef = clip.defined() ? clip.data_ptr<float>() : nullptr;
  o.master_weights = master;
  o.stochastic_rounding = stochastic_rounding;
  o.seed = seed;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err;
  try {
    err = fc::adam_step_cuda(tensors.data(), static_cast<int64_t>(n), kernel_dtype, kernel_state_dtype, o, stream);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, "fused_adam cuda: ", e.what());
  }
  TORCH_CHECK(err == cudaSuccess, "fused_adam cuda: kernel launch failed: ", cudaGetErrorString(err));
  // Copies are enqueued on the same stream, after the kernel; temporaries are freed to the caching allocator,
  // which reuses them only for work ordered after it on this stream.
  for (const Work& w : copies) {
    if (w.write_back.defined()) w.write_back.copy_(w.buffer);
  }
  if (!capturable) {
    for (size_t i = 0; i < n; ++i) *state_steps[i].data_ptr<float>() = static_cast<float>(tensors[i].step);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_adam CUDA kernels (multi-tensor Adam/AdamW step); see csrc/cuda/adam_cuda.h";
  m.def("adam_step", &adam_step, "Adam/AdamW step of one (device, dtype) partition of a param group",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
        py::arg("state_steps"), py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("capturable"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("decay") = py::none(),
        py::arg("master_params") = std::vector<Tensor>(), py::arg("tensor_ids") = std::vector<int64_t>(),
        py::arg("stochastic_rounding") = false, py::arg("seed") = 0, py::arg("clip_coef") = py::none());
}
