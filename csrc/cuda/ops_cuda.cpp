// torch binding of the CUDA Adam/AdamW step: module fused_adam._C_cuda, built only where torch has CUDA.
// A Partition (made once per partition by python/fused_adam/backends/cuda.py's prepare) keeps the partition's lists
// and options in C++ and its tables in device memory (NOTE [device table], device_table.h) for the life of the step
// plan. Each step runs the native boundary shared with the CPU binding (csrc/common/tensor_pass.h): the per-tensor
// check pass (errors name the list, the index and the value, before anything is written; only what moved since the
// last step is checked in full, NOTE [pass cache]), grads read from the params' autograd metadata, and the layout
// staging for arrays that are not flat as they stand. Then it patches the table entries that changed with one
// stream-ordered copy from pinned memory and runs one launch on the current stream (adam_cuda.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/py_options.h"
#include "common/tensor_pass.h"
#include "cuda/adam_cuda.h"

namespace {

using at::Tensor;
using namespace fused_adam;
namespace fc = fused_adam::cuda;

constexpr const char* kWho = "FusedAdam (cuda backend)";

DType dtype_of(at::ScalarType t) {
  const std::optional<DType> d = to_dtype(t);
  TORCH_CHECK_TYPE(d.has_value(), kWho, ": params of dtype ", t,
                   " are not supported; expected float32, float64, bfloat16 or float16");
  return *d;
}

DType dtype_named(const std::string& name) {
  for (DType t : {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16}) {
    if (name == dtype_name(t)) return t;
  }
  TORCH_CHECK_VALUE(false, kWho, ": unknown dtype name '", name, "'; expected float32, float64, bfloat16 or float16");
  return DType::kFloat32;  // unreachable
}

static_assert(static_cast<int>(fc::kNumBufs) == static_cast<int>(kNumRows) && static_cast<int>(fc::kMaster) ==
                  static_cast<int>(kMasterRow), "the device table's buffers are the pass's rows, in one order");

std::vector<int64_t> numels(const std::vector<Tensor>& params) {
  std::vector<int64_t> out;
  out.reserve(params.size());
  for (const Tensor& p : params) out.push_back(p.defined() ? p.numel() : 0);
  return out;
}

class Partition {
 public:
  Partition(std::vector<Tensor> params, std::vector<Tensor> exp_avgs, std::vector<Tensor> exp_avg_sqs,
            std::vector<Tensor> max_exp_avg_sqs, std::vector<Tensor> state_steps, std::vector<Tensor> master_params,
            std::vector<int64_t> tensor_ids, py::handle part_options, int64_t chunk_size)
      : l_{std::move(params),      std::move(exp_avgs),      std::move(exp_avg_sqs), std::move(max_exp_avg_sqs),
           std::move(state_steps), std::move(master_params), std::move(tensor_ids)},
        o_(partition_options(part_options)),
        table_(numels(l_.params), chunk_size > 0 ? chunk_size : fc::kDefaultChunkSize) {
    check_lists(kWho, l_, nullptr, o_.amsgrad, o_.stochastic_rounding());
    TORCH_CHECK_VALUE(o_.master == l_.master(), kWho, ": ", l_.master_params.size(), " master_params with master=",
                      o_.master ? "True" : "False");
    o_.chunk_size = table_.chunk_size();
    if (l_.size() == 0) return;
    device_ = l_.params[0].device();
    TORCH_CHECK(device_.is_cuda(), kWho, ": params[0] is on ", device_, "; the cuda backend needs CUDA tensors");
    dtype_ = dtype_of(l_.params[0].scalar_type());
    state_dtype_ = dtype_of(l_.exp_avgs[0].scalar_type());
    const std::string why = fc::unsupported(dtype_, state_dtype_, o_.master);
    TORCH_CHECK(why.empty(), kWho, ": ", why);
    const c10::cuda::CUDAGuard guard(device_);
    device_table_ = at::empty({static_cast<int64_t>(table_.bytes())},
                              at::TensorOptions().dtype(at::kByte).device(device_));
    sm_count_ = at::cuda::getDeviceProperties(device_.index())->multiProcessorCount;
  }

  // One step: the check pass, the table patch, one launch. NOTE [grads read in C++] (csrc/ops.cpp): with grads=None
  // each param's .grad is its grad; a param without one makes this return false before anything is written.
  // check_only: the checks of a step and nothing else (NOTE [all checked first] in optimizer.py).
  bool step(const std::optional<std::vector<Tensor>>& given, py::handle hp, py::handle amp, bool check_only = false) {
    const size_t n = l_.size();
    if (n == 0) return true;
    const std::lock_guard<std::mutex> lock(cache_.mutex);
    const at::TensorList given_list = given.has_value() ? at::TensorList(*given) : at::TensorList();
    if (given.has_value()) check_lists(kWho, l_, &given_list, o_.amsgrad, o_.stochastic_rounding());
    const c10::cuda::CUDAGuard guard(device_);
    const bool row_major = o_.stochastic_rounding();
    std::vector<Tensor> held;
    const Grads grads{given_list, !given.has_value(), given.has_value() ? nullptr : &held};
    const Placement where{device_, o_.capturable ? device_ : at::Device(at::kCPU)};
    if (!checked_pass(kWho, l_, grads, where, row_major, cache_).complete) return false;
    // The kernels were chosen for the dtypes the partition was made with (`.data` of another dtype on every param
    // would pass the pass's checks, which compare the tensors with each other).
    TORCH_CHECK_TYPE(to_dtype(l_.params[0].scalar_type()) == dtype_ && to_dtype(l_.exp_avgs[0].scalar_type()) ==
                         state_dtype_, kWho, ": params[0] has dtype ", l_.params[0].scalar_type(), " and exp_avgs[0] ",
                     l_.exp_avgs[0].scalar_type(), ", but the partition was made for ", dtype_name(dtype_), " and ",
                     dtype_name(state_dtype_));
    bool resized = false;  // the chunk table is built for the sizes the params had
    for (size_t i = 0; i < n && !resized; ++i) resized = cache_.numel[i] != table_.entry(static_cast<int64_t>(i)).numel;
    if (resized) {
      // A param (with its states: the pass compared their shapes) now has another size: the tables follow it, as
      // torch's for-loop steps the new tensors. Not while capturing: the graph would keep reading the old table.
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(device_.index()).stream(), &capture));
      TORCH_CHECK(capture == cudaStreamCaptureStatusNone, kWho,
                  ": a param's size changed under the partition during CUDA graph capture; step once eagerly first");
      table_ = fc::DeviceTable(cache_.numel, table_.chunk_size());
      device_table_ = at::empty({static_cast<int64_t>(table_.bytes())},
                                at::TensorOptions().dtype(at::kByte).device(device_));
    }

    StepOptions o = o_;
    StepInputs in;
    read_step(o, in, hp, amp, device_, kWho);
    checks_after_pass(kWho, l_, grads, cache_, o.unscale(), !o.capturable);
    if (check_only) return true;
    if (!o.capturable && o.found_inf != nullptr) {
      // The steps live on the CPU and must not change when found_inf is set: one host read, as torch's
      // non-fused GradScaler path does.
      if (in.found_inf.item<float>() != 0.0f) return true;
      o.found_inf = nullptr;
    }
    if (o.capturable) o.decay = NAN;  // computed on the device from lr_device
    fc::HostSteps host;
    std::vector<double> new_steps;
    if (o.capturable) {
      host.source = fc::StepSource::kDevice;
    } else {
      new_steps.resize(n);
      for (size_t i = 0; i < n; ++i) new_steps[i] = static_cast<double>(*cache_.step(i) + 1.0f);
      host = fc::host_steps(new_steps);
    }

    // Stand-ins for the tensors that are not flat as they stand; each lives until the call returns, read-only ones
    // too (a copy freed before the launch goes back to the caching allocator, and the next copy_ could overwrite it
    // before the kernel reads it).
    std::vector<Staged> staged;
    const at::TensorList grad_list = given.has_value() ? given_list : at::TensorList(held);
    for (size_t i = 0; i < n; ++i) {
      void* bufs[fc::kNumBufs] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
      if (cache_.numel[i] > 0) {
        if (cache_.not_flat[i]) {
          const Staged& st = staged.emplace_back(arrays_of(l_, grad_list, i), row_major);
          for (int b = 0; b < fc::kNumBufs; ++b) bufs[b] = st.data(b);
        } else {
          for (int b = 0; b < fc::kNumBufs; ++b) bufs[b] = cache_.data(i, b);
        }
      }
      float* device_step = o.capturable ? cache_.step(i) : nullptr;
      const uint64_t id = l_.tensor_ids.empty() ? 0 : static_cast<uint64_t>(l_.tensor_ids[i]);
      table_.set(static_cast<int64_t>(i), fc::make_entry(bufs, cache_.numel[i], device_step, id, host.source,
                                                         o, o.capturable ? 0.0 : new_steps[i]));
    }

    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_.index()).stream();
    upload(stream);
    cudaError_t err;
    try {
      err = fc::adam_step_cuda(fc::DeviceTableRef::of(table_, device_table_.data_ptr()), dtype_, state_dtype_, o,
                               host, sm_count_, stream);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, kWho, ": ", e.what());
    }
    TORCH_CHECK(err == cudaSuccess, kWho, ": kernel launch failed: ", cudaGetErrorString(err));
    // Copies back are enqueued on the same stream, after the kernel; temporaries are freed to the caching
    // allocator, which reuses them only for work ordered after it on this stream.
    for (Staged& st : staged) st.copy_back(/*grad_written=*/o.unscale());
    if (!o.capturable) {
      for (size_t i = 0; i < n; ++i) *cache_.step(i) = static_cast<float>(new_steps[i]);
    }
    return true;
  }

  int64_t num_chunks() const { return table_.num_chunks(); }
  int64_t table_bytes() const { return static_cast<int64_t>(table_.bytes()); }

 private:
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

  TensorLists l_;
  StepOptions o_;
  PassCache cache_;
  fc::DeviceTable table_;
  at::Device device_ = at::Device(at::kCPU);
  DType dtype_ = DType::kFloat32, state_dtype_ = DType::kFloat32;
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
                        "A partition's lists, options (PartOptions) and device tables, kept across steps "
                        "(NOTE [device table]).")
      .def(py::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                    std::vector<Tensor>, std::vector<Tensor>, std::vector<int64_t>, py::handle, int64_t>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
           py::arg("state_steps"), py::kw_only(), py::arg("master_params") = std::vector<Tensor>{},
           py::arg("tensor_ids") = std::vector<int64_t>{}, py::arg("options"), py::arg("chunk_size") = 0)
      .def(
          "step_",
          [](Partition& p, const std::optional<std::vector<Tensor>>& grads, py::handle hp, py::handle amp) {
            return p.step(grads, hp, amp);
          },
           "One step of every tensor, in place, one launch on the current stream. grads=None: the params' .grad; "
           "returns False, having changed nothing, if a param has none. hp: the step's Hyper; amp: its Amp or None.",
           py::arg("grads"), py::arg("hp"), py::arg("amp") = py::none())
      .def(
          "check_",
          [](Partition& p, const std::optional<std::vector<Tensor>>& grads, py::handle hp, py::handle amp) {
            return p.step(grads, hp, amp, /*check_only=*/true);
          },
          "The checks of step_ (raising what it would raise, before it writes anything) without the step: returns "
          "False if grads is None and a param has no grad, else True. Nothing is written or launched.",
          py::arg("grads"), py::arg("hp"), py::arg("amp") = py::none())
      .def_property_readonly("num_chunks", &Partition::num_chunks)
      .def_property_readonly("table_bytes", &Partition::table_bytes);
}
