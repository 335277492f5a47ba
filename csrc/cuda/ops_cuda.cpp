// torch binding of the CUDA Adam/AdamW step: module fused_adam._C_cuda, built only where torch has CUDA.
// A Partition (made once per partition by python/fused_adam/backends/cuda.py's prepare) keeps the partition's lists
// and its tables in device memory (NOTE [device table], device_table.h) for the life of the step plan. Each step
// checks every tensor (messages name the param index, the argument and the value), gives the kernel dense buffers
// with one element order per param (copies where a grad's, state's or master's strides differ from its param's,
// written back after the launch; the row-major order with stochastic rounding, whose random bits follow the element
// index), patches the table entries that changed with one stream-ordered copy from pinned memory, and runs one
// launch on the current stream (adam_cuda.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/adam_cuda.h"

namespace {

using at::Tensor;
using fused_adam::DType;
namespace fc = fused_adam::cuda;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "fused_adam cuda: params of dtype ", t,
                        " are not supported; expected float32, float64, bfloat16 or float16");
  }
  return DType::kFloat32;  // unreachable
}

DType dtype_named(const std::string& name) {
  for (DType t : {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16}) {
    if (name == fused_adam::dtype_name(t)) return t;
  }
  TORCH_CHECK_VALUE(false, "fused_adam cuda: unknown dtype name '", name, "'; expected float32, float64, bfloat16 "
                    "or float16");
  return DType::kFloat32;  // unreachable
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
  TORCH_CHECK(t.defined(), "fused_adam cuda: ", what, " of param ", i, " is None");
  TORCH_CHECK(t.layout() == at::kStrided, "fused_adam cuda: ", what, " of param ", i, " is ", t.layout(),
              "; FusedAdam needs dense tensors (use torch.optim.SparseAdam for sparse gradients)");
  TORCH_CHECK(t.device() == param.device(), "fused_adam cuda: ", what, " of param ", i, " is on ", t.device(),
              ", expected ", param.device(), " (the param's device)");
  TORCH_CHECK(t.scalar_type() == dtype, "fused_adam cuda: ", what, " of param ", i, " has dtype ", t.scalar_type(),
              ", expected ", dtype, " (", dtype_is, ")");
  TORCH_CHECK(t.sizes() == param.sizes(), "fused_adam cuda: ", what, " of param ", i, " has shape ", t.sizes(),
              ", expected ", param.sizes(), " (the param's shape)");
}

// A 1-element float32 tensor on `device` (AMP's grad_scale and found_inf, torch's layout), or undefined.
Tensor device_scalar(const std::optional<Tensor>& t, const at::Device& device, const char* what) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->numel() == 1, "fused_adam cuda: ", what, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == device, "fused_adam cuda: ", what, " is on ", t->device(), ", expected ", device,
              " (the params' device)");
  return t->to(at::kFloat).contiguous();
}

class Partition {
 public:
  Partition(std::vector<Tensor> params, std::vector<Tensor> exp_avgs, std::vector<Tensor> exp_avg_sqs,
            std::vector<Tensor> max_exp_avg_sqs, std::vector<Tensor> state_steps, std::vector<Tensor> master_params,
            std::vector<int64_t> tensor_ids, int64_t wd_mode, bool amsgrad, bool maximize, bool capturable,
            bool sr_param, bool sr_state, uint64_t seed, int64_t chunk_size)
      : params_(std::move(params)),
        exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)),
        max_exp_avg_sqs_(std::move(max_exp_avg_sqs)),
        state_steps_(std::move(state_steps)),
        master_params_(std::move(master_params)),
        tensor_ids_(std::move(tensor_ids)),
        table_(numels(params_), chunk_size > 0 ? chunk_size : fc::kDefaultChunkSize) {
    const size_t n = params_.size();
    TORCH_CHECK(exp_avgs_.size() == n && exp_avg_sqs_.size() == n && state_steps_.size() == n,
                      "fused_adam cuda: list lengths differ: ", n, " params, ", exp_avgs_.size(), " exp_avgs, ",
                      exp_avg_sqs_.size(), " exp_avg_sqs, ", state_steps_.size(), " state_steps");
    TORCH_CHECK(max_exp_avg_sqs_.size() == (amsgrad ? n : 0), "fused_adam cuda: ", max_exp_avg_sqs_.size(),
                      " max_exp_avg_sqs for ", n, " params with amsgrad=", amsgrad ? "True" : "False");
    TORCH_CHECK(master_params_.empty() || master_params_.size() == n, "fused_adam cuda: ",
                      master_params_.size(), " master_params for ", n, " params");
    TORCH_CHECK(tensor_ids_.empty() || tensor_ids_.size() == n, "fused_adam cuda: ", tensor_ids_.size(),
                      " tensor_ids for ", n, " params");
    TORCH_CHECK(wd_mode >= 0 && wd_mode <= 2, "fused_adam cuda: wd_mode must be 0, 1 or 2, got ", wd_mode);
    o_.wd_mode = static_cast<fused_adam::WeightDecay>(wd_mode);
    o_.amsgrad = amsgrad;
    o_.maximize = maximize;
    o_.capturable = capturable;
    o_.master = !master_params_.empty();
    o_.sr_param = sr_param;
    o_.sr_state = sr_state;
    o_.seed = seed;
    o_.chunk_size = table_.chunk_size();
    if (n == 0) return;
    device_ = params_[0].device();
    TORCH_CHECK(device_.is_cuda(), "fused_adam cuda: param 0 is on ", device_,
                      "; the cuda backend needs CUDA tensors");
    dtype_ = params_[0].scalar_type();
    state_dtype_ = exp_avgs_[0].scalar_type();
    const std::string why = fc::unsupported(to_dtype(dtype_), to_dtype(state_dtype_), o_.master);
    TORCH_CHECK(why.empty(), "fused_adam cuda: ", why);
    const c10::cuda::CUDAGuard guard(device_);
    device_table_ = at::empty({static_cast<int64_t>(table_.bytes())},
                              at::TensorOptions().dtype(at::kByte).device(device_));
    sm_count_ = at::cuda::getDeviceProperties(device_.index())->multiProcessorCount;
  }

  // NOTE [grads read in C++] (csrc/ops.cpp): with grads=None each param's .grad is its grad; a param without one
  // makes this return false before anything is written.
  bool step(const std::optional<std::vector<Tensor>>& given_grads, double lr, const std::optional<Tensor>& lr_tensor,
            double beta1, double beta2, double eps, double weight_decay, const std::optional<double>& decay,
            const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
            const std::optional<Tensor>& clip_coef) {
    const size_t n = params_.size();
    if (n == 0) return true;
    std::vector<Tensor> grads;
    if (given_grads.has_value()) {
      TORCH_CHECK(given_grads->size() == n, "fused_adam cuda: ", given_grads->size(), " grads for ", n,
                        " params");
      grads = *given_grads;
    } else {
      grads.reserve(n);
      for (const Tensor& p : params_) {
        grads.push_back(p.grad());
        if (!grads.back().defined()) return false;
      }
    }
    const c10::cuda::CUDAGuard guard(device_);
    check(grads);

    fused_adam::StepOptions o = o_;
    o.hyper = fused_adam::AdamHyper{lr, beta1, beta2, eps, weight_decay};
    const Tensor scale = device_scalar(grad_scale, device_, "grad_scale");
    const Tensor clip = device_scalar(clip_coef, device_, "clip_coef");
    Tensor inf = device_scalar(found_inf, device_, "found_inf");
    Tensor lr_device;
    if (lr_tensor.has_value() && lr_tensor->defined()) {
      TORCH_CHECK(o.capturable, "fused_adam cuda: a device lr tensor needs capturable=True (pass lr as a float)");
      TORCH_CHECK(lr_tensor->numel() == 1, "fused_adam cuda: lr must have one element, got shape ",
                        lr_tensor->sizes());
      TORCH_CHECK(lr_tensor->device() == device_, "fused_adam cuda: lr is on ", lr_tensor->device(),
                        ", expected ", device_, " (the params' device)");
      lr_device = lr_tensor->to(at::kDouble).contiguous();
    }
    if (!o.capturable && inf.defined()) {
      // The steps live on the CPU and must not change when found_inf is set: one host read, as torch's
      // non-fused GradScaler path does.
      if (inf.item<float>() != 0.0f) return true;
      inf = Tensor();
    }
    if (decay.has_value() && !o.capturable) o.decay = *decay;
    o.lr_device = lr_device.defined() ? lr_device.data_ptr<double>() : nullptr;
    o.grad_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
    o.found_inf = inf.defined() ? inf.data_ptr<float>() : nullptr;
    o.clip_coef = clip.defined() ? clip.data_ptr<float>() : nullptr;

    fc::HostSteps host;
    std::vector<double> new_steps;
    if (o.capturable) {
      host.source = fused_adam::cuda::StepSource::kDevice;
    } else {
      new_steps.resize(n);
      for (size_t i = 0; i < n; ++i) new_steps[i] = static_cast<double>(*state_steps_[i].data_ptr<float>() + 1.0f);
      host = fc::host_steps(new_steps);
    }

    // Every copy lives until the call returns, read-only ones (a grad in another layout) too: a copy freed before
    // the launch goes back to the caching allocator, and the next param's copy_ would overwrite it before the
    // kernel reads it.
    std::vector<Work> copies;
    const bool sr = o.sr_param || o.sr_state;
    for (size_t i = 0; i < n; ++i) {
      const Tensor& p = params_[i];
      void* bufs[fc::kNumBufs] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
      if (p.numel() > 0) {
        // One element order for all buffers: the param's if it is dense, else contiguous (a copy, written back).
        // Stochastic rounding draws element i's bits from its row-major index i, as the reference backend does:
        // there the order is contiguous.
        const bool param_ok = sr ? p.is_contiguous() : p.is_non_overlapping_and_dense();
        const Work wp = param_ok ? Work{p, Tensor()} : Work{p.contiguous(), p, true};
        const Tensor& layout = wp.buffer;
        const Work work[fc::kNumBufs] = {
            wp,
            as_dense_like(grads[i], layout, scale.defined()),
            as_dense_like(exp_avgs_[i], layout, true),
            as_dense_like(exp_avg_sqs_[i], layout, true),
            o.amsgrad ? as_dense_like(max_exp_avg_sqs_[i], layout, true) : Work{},
            o.master ? as_dense_like(master_params_[i], layout, true) : Work{},
        };
        for (int b = 0; b < fc::kNumBufs; ++b) {
          if (!work[b].buffer.defined()) continue;
          bufs[b] = work[b].buffer.data_ptr();
          if (work[b].copied) copies.push_back(work[b]);
        }
      }
      float* device_step = o.capturable ? state_steps_[i].data_ptr<float>() : nullptr;
      const uint64_t id = tensor_ids_.empty() ? 0 : static_cast<uint64_t>(tensor_ids_[i]);
      table_.set(static_cast<int64_t>(i), fc::make_entry(bufs, p.numel(), device_step, id, host.source, o.hyper,
                                                         o.capturable ? 0.0 : new_steps[i]));
    }

    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_.index()).stream();
    upload(stream);
    cudaError_t err;
    try {
      err = fc::adam_step_cuda(fc::DeviceTableRef::of(table_, device_table_.data_ptr()), to_dtype(dtype_),
                               to_dtype(state_dtype_), o, host, sm_count_, stream);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, "fused_adam cuda: ", e.what());
    }
    TORCH_CHECK(err == cudaSuccess, "fused_adam cuda: kernel launch failed: ", cudaGetErrorString(err));
    // Copies are enqueued on the same stream, after the kernel; temporaries are freed to the caching allocator,
    // which reuses them only for work ordered after it on this stream.
    for (const Work& w : copies) {
      if (w.write_back.defined()) w.write_back.copy_(w.buffer);
    }
    if (!o.capturable) {
      for (size_t i = 0; i < n; ++i) *state_steps_[i].data_ptr<float>() = static_cast<float>(new_steps[i]);
    }
    return true;
  }

  int64_t num_chunks() const { return table_.num_chunks(); }
  int64_t table_bytes() const { return static_cast<int64_t>(table_.bytes()); }

 private:
  static std::vector<int64_t> numels(const std::vector<Tensor>& params) {
    std::vector<int64_t> out;
    out.reserve(params.size());
    for (const Tensor& p : params) out.push_back(p.numel());
    return out;
  }

  // The per-tensor checks, every step, before anything is written.
  void check(const std::vector<Tensor>& grads) const {
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      TORCH_CHECK(p.layout() == at::kStrided, "fused_adam cuda: param ", i, " is ", p.layout(),
                        "; FusedAdam needs dense params");
      TORCH_CHECK(p.device() == device_, "fused_adam cuda: param ", i, " is on ", p.device(), ", expected ",
                        device_, " (param 0's device)");
      TORCH_CHECK(p.scalar_type() == dtype_, "fused_adam cuda: param ", i, " has dtype ", p.scalar_type(),
                        ", expected ", dtype_, " (param 0's dtype)");
      TORCH_CHECK(p.numel() == table_.entry(static_cast<int64_t>(i)).numel, "fused_adam cuda: param ", i,
                        " has ", p.numel(), " elements, the partition was made with ",
                        table_.entry(static_cast<int64_t>(i)).numel);
      check_like(grads[i], p, i, "grad", dtype_, "the param's dtype");
      check_like(exp_avgs_[i], p, i, "exp_avg", state_dtype_, "exp_avg 0's dtype");
      check_like(exp_avg_sqs_[i], p, i, "exp_avg_sq", state_dtype_, "exp_avg 0's dtype");
      if (o_.amsgrad) check_like(max_exp_avg_sqs_[i], p, i, "max_exp_avg_sq", state_dtype_, "exp_avg 0's dtype");
      if (o_.master) check_like(master_params_[i], p, i, "master param", at::kFloat, "masters are float32");
      const Tensor& s = state_steps_[i];
      TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat, "fused_adam cuda: step of param ", i,
                        " must be a 1-element float32 tensor, got dtype ", s.scalar_type(), " and shape ", s.sizes());
      if (o_.capturable) {
        TORCH_CHECK(s.device() == device_, "fused_adam cuda: step of param ", i, " is on ", s.device(),
                          "; capturable=True needs it on ", device_, " (the param's device)");
      } else {
        TORCH_CHECK(s.device().is_cpu(), "fused_adam cuda: step of param ", i, " is on ", s.device(),
                          "; capturable=False needs it on the CPU");
      }
    }
  }

  // The table bytes the device lacks, in one copy from pinned memory ordered before the launch on `stream`. Eager:
  // torch's pinned-memory allocator keeps the staging buffer until the copy has run. Under CUDA graph capture the
  // copy is a node of the graph that reads the staging buffer at every replay: the partition keeps it (and it keeps
  // this step's bytes: the replays' tensors are the captured ones).
  void upload(cudaStream_t stream) {
    const auto dirty = table_.take_dirty();
    if (dirty.first == dirty.second) return;
    const int64_t len = static_cast<int64_t>(dirty.second - dirty.first);
    try {
      Tensor staging = at::empty({len}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(staging.data_ptr(), table_.image() + dirty.first, static_cast<size_t>(len));
      Tensor target = device_table_.narrow(0, static_cast<int64_t>(dirty.first), len);
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
      if (capture == cudaStreamCaptureStatusNone) {
        target.copy_(staging, /*non_blocking=*/true);
      } else {
        C10_CUDA_CHECK(cudaMemcpyAsync(target.data_ptr(), staging.data_ptr(), static_cast<size_t>(len),
                                       cudaMemcpyHostToDevice, stream));
        captured_staging_.push_back(staging);
      }
    } catch (...) {
      table_.mark_all_dirty();  // the device's copy is unknown now
      throw;
    }
  }

  std::vector<Tensor> params_, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, state_steps_, master_params_;
  std::vector<int64_t> tensor_ids_;
  fc::DeviceTable table_;
  fused_adam::StepOptions o_;
  at::Device device_ = at::Device(at::kCPU);
  at::ScalarType dtype_ = at::kFloat, state_dtype_ = at::kFloat;
  Tensor device_table_;
  std::vector<Tensor> captured_staging_;
  int sm_count_ = 1;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_adam CUDA kernels (one launch a step over a partition's device tables); see csrc/cuda/adam_cuda.h";
  m.attr("DEFAULT_CHUNK_SIZE") = fc::kDefaultChunkSize;
  m.def(
      "unsupported",
      [](const std::string& param_dtype, const std::string& state_dtype, bool master) {
        return fc::unsupported(dtype_named(param_dtype), dtype_named(state_dtype), master);
      },
      "Why the CUDA kernels cannot step params and states of these dtypes ('float32', 'bfloat16', ...) with or "
      "without master weights, or ''.",
      py::arg("param_dtype"), py::arg("state_dtype"), py::arg("master"));
  py::class_<Partition>(m, "Partition",
                        "A partition's lists and its device tables, kept across steps (NOTE [device table]).")
      .def(py::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                    std::vector<Tensor>, std::vector<Tensor>, std::vector<int64_t>, int64_t, bool, bool, bool, bool,
                    bool, uint64_t, int64_t>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
           py::arg("state_steps"), py::kw_only(), py::arg("master_params") = std::vector<Tensor>{},
           py::arg("tensor_ids") = std::vector<int64_t>{}, py::arg("wd_mode"), py::arg("amsgrad"),
           py::arg("maximize"), py::arg("capturable"), py::arg("sr_param") = false, py::arg("sr_state") = false,
           py::arg("seed") = 0, py::arg("chunk_size") = 0)
      .def("step_", &Partition::step,
           "One step of every tensor, in place, one launch on the current stream. grads=None: the params' .grad; "
           "returns False, having changed nothing, if a param has none.",
           py::arg("grads"), py::kw_only(), py::arg("lr"), py::arg("lr_tensor") = py::none(), py::arg("beta1"),
           py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decay") = py::none(),
           py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(), py::arg("clip_coef") = py::none())
      .def_property_readonly("num_chunks", &Partition::num_chunks)
      .def_property_readonly("table_bytes", &Partition::table_bytes);
}
