// fused_adam._C: the Python binding of the native kernels. The CPU step lives in csrc/cpu/adam_cpu.cpp.
//
// The step is reachable three ways, one implementation:
//   * fused_adam._C.adam_step_ (pybind11): every list converted at every call (~50 ns per tensor per list);
//   * fused_adam._C.Partition + Partition.step_ (pybind11): what backends/cpu.py calls. The params, states and
//     steps are converted once, when the partition is made; a step converts only the grads. The same checks run
//     at every step (a param's storage swapped by `p.data = ...` is seen);
//   * torch.ops.fused_adam.adam_step_ (one op schema, CPU kernel registered here): for the dispatcher and a
//     later torch.compile integration. The CUDA extension registers its kernel for the same schema.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/adam_cpu.h"

namespace py = pybind11;
using fused_adam::cpu::kDefaultChunkSize;

namespace {

at::ScalarType scalar_type(const std::string& name) {
  for (at::ScalarType t : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    const std::string short_name(c10::getDtypeNames(t).first);
    if (name == short_name || name == "torch." + short_name) return t;
  }
  TORCH_CHECK_VALUE(false, "fused_adam: unknown dtype name '", name, "'; expected e.g. 'torch.float32'");
}

// The op's signature: the schema has no empty-list default for Tensor[], so master_params is optional there.
void adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                  double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  std::optional<double> decay, int64_t chunk_size, std::optional<at::TensorList> master_params,
                  bool stochastic_rounding, at::IntArrayRef tensor_ids, int64_t seed,
                  const std::optional<at::Tensor>& clip_coef) {
  fused_adam::cpu::adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                              eps, weight_decay, amsgrad, maximize, decoupled, grad_scale, found_inf, decay,
                              chunk_size, master_params.value_or(at::TensorList{}), stochastic_rounding, tensor_ids,
                              seed, clip_coef);
}

// The Meta (fake tensor) kernel: the op writes its arguments in place and returns nothing, so tracing it
// (torch.compile, FakeTensorMode) needs no computation; the real kernel's checks run when it runs.
void adam_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    double, double, double, double, double, bool, bool, bool, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, std::optional<double>, int64_t, std::optional<at::TensorList>,
                    bool, at::IntArrayRef, int64_t, const std::optional<at::Tensor>&) {}

// NOTE [cpu partition]: the lists of one (cpu, dtype) partition that stay the same tensors from step to step
// (the optimizer's step plan hands the same lists every step), held as at::Tensor handles. It keeps the tensors
// alive; the optimizer drops it with its step plan.
struct Partition {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params;
  std::vector<int64_t> tensor_ids;

  // NOTE [grads read in C++]: with no grads given, each param's .grad is the grad, read by the kernel's per-tensor
  // pass from the param's autograd metadata (what Python's `p.grad` returns for a plain Tensor or Parameter) along
  // with its checks and pointers, which spares the optimizer a Python list of grads (~150 ns a param once the
  // step's data pass has evicted the Python objects) and a pass over the cold objects. The pass runs holding the
  // GIL, as Python's `p.grad` would: no Python thread can replace a grad between its read and the reference the
  // pass takes. The GIL is released once the checks have passed, for the data pass (with given grads: for the
  // whole call). A param without a grad makes this return false before anything is written, and the caller takes
  // the path that handles it.
  bool step(const std::optional<std::vector<at::Tensor>>& given_grads, double lr, double beta1, double beta2,
            double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::optional<double>& decay, int64_t chunk_size, bool stochastic_rounding, int64_t seed,
            const std::optional<at::Tensor>& clip_coef) const {
    std::optional<py::gil_scoped_release> no_gil;
    if (given_grads.has_value()) no_gil.emplace();
    std::vector<at::Tensor> read;
    const at::TensorList grads = given_grads.has_value() ? at::TensorList(*given_grads) : at::TensorList();
    return fused_adam::cpu::adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                                       beta2, eps, weight_decay, amsgrad, maximize, decoupled, grad_scale, found_inf,
                                       decay, chunk_size, master_params, stochastic_rounding, tensor_ids, seed,
                                       clip_coef, given_grads.has_value() ? nullptr : &read, [&] {
                                         if (!no_gil.has_value()) no_gil.emplace();
                                       });
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_adam native kernels (CPU: SIMD loop over a chunk table spanning all tensors of a partition)";
  m.attr("DEFAULT_CHUNK_SIZE") = kDefaultChunkSize;

  // The GIL is released: the step is pure C++ on tensors the caller keeps alive for the duration of the call.
  m.def(
      "adam_step_",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
         const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps, double lr,
         double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
         const std::optional<double>& decay, int64_t chunk_size, const std::vector<at::Tensor>& master_params,
         bool stochastic_rounding, const std::vector<int64_t>& tensor_ids, int64_t seed,
         const std::optional<at::Tensor>& clip_coef) {
        fused_adam::cpu::adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                                    beta2, eps, weight_decay, amsgrad, maximize, decoupled, grad_scale, found_inf,
                                    decay, chunk_size, master_params, stochastic_rounding, tensor_ids, seed,
                                    clip_coef);
      },
      py::call_guard<py::gil_scoped_release>(),
        "One Adam/AdamW step over every tensor of one (cpu, dtype) partition, in place (see the backend step "
        "contract in fused_adam/backends/__init__.py, and csrc/cpu/adam_cpu.h for the options beyond torch).",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
        py::arg("state_steps"), py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("decay") = py::none(), py::arg("chunk_size") = kDefaultChunkSize,
        py::arg("master_params") = std::vector<at::Tensor>{}, py::arg("stochastic_rounding") = false,
        py::arg("tensor_ids") = std::vector<int64_t>{}, py::arg("seed") = 0, py::arg("clip_coef") = py::none());

  py::class_<Partition>(m, "Partition",
                        "A partition's params, states, steps (and masters, tensor ids) converted once; "
                        "Partition.step_(grads or None, ...) is adam_step_ on them.")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<int64_t>>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
           py::arg("state_steps"), py::kw_only(), py::arg("master_params") = std::vector<at::Tensor>{},
           py::arg("tensor_ids") = std::vector<int64_t>{})
      .def("step_", &Partition::step,  // releases the GIL itself (NOTE [grads read in C++])
           "adam_step_ with this partition's tensors and these grads; with grads=None, the params' .grad "
           "(NOTE [grads read in C++]). Returns False, having changed nothing, if grads=None and a param has no grad.",
          py::arg("grads"), py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
          py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"),
          py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(), py::arg("decay") = py::none(),
          py::arg("chunk_size") = kDefaultChunkSize, py::arg("stochastic_rounding") = false, py::arg("seed") = 0,
          py::arg("clip_coef") = py::none());

  m.def(
      "cpu_unsupported",
      [](const std::string& param_dtype, const std::string& state_dtype, bool master, bool stochastic_rounding) {
        return fused_adam::cpu::unsupported_combination(scalar_type(param_dtype), scalar_type(state_dtype), master,
                                                        stochastic_rounding);
      },
      "Why adam_step_ refuses params and states of these dtypes ('float32', 'bfloat16', ...) with these options, "
      "or None.",
      py::arg("param_dtype"), py::arg("state_dtype"), py::arg("master"), py::arg("stochastic_rounding"));

  const char* roofline_doc =
      "Bandwidth probe: one pass with Adam's access pattern (read p, g, m, v; write p, m, v; 28 B/param) over "
      "contiguous float32 tensors, with the step's threading and chunking. Changes the tensors' values.";
  m.def("roofline_", &fused_adam::cpu::roofline_, py::call_guard<py::gil_scoped_release>(), roofline_doc,
        py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::kw_only(), py::arg("chunk_size") = kDefaultChunkSize);
  m.def(
      "roofline_",
      [](const at::Tensor& p, const at::Tensor& g, const at::Tensor& mm, const at::Tensor& v, int64_t chunk_size) {
        fused_adam::cpu::roofline_({p}, {g}, {mm}, {v}, chunk_size);
      },
      py::call_guard<py::gil_scoped_release>(), roofline_doc, py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"),
      py::kw_only(), py::arg("chunk_size") = kDefaultChunkSize);

  m.def("chunk_table", &fused_adam::cpu::chunk_table,
        "The chunk table (csrc/chunk_table.h) of tensors with these numels: a list of (tensor, start, size).",
        py::arg("numels"), py::arg("chunk_size"));
  m.def("cpu_isa", &fused_adam::cpu::isa,
        "The instruction set the CPU loops run with: avx512bf16, avx512, avx2 or baseline.");
  m.def("set_cpu_isa", &fused_adam::cpu::set_isa,
        "Run the CPU loops with 'avx512bf16', 'avx512', 'avx2', 'baseline' or 'auto' (the best this CPU has). For "
        "tests and benchmarks; the environment variable FUSED_ADAM_CPU_ISA does the same for a whole process.",
        py::arg("isa"));
  m.def("cpu_bf16_store_mismatches", &fused_adam::cpu::bf16_store_mismatches,
        py::call_guard<py::gil_scoped_release>(),
        "Test hook: the AVX512_BF16 loop's bf16 store against the scalar rounding over the float bit patterns "
        "[begin, end); returns the number of mismatches (0). Needs a CPU with AVX512_BF16.",
        py::arg("begin"), py::arg("end"));
}

TORCH_LIBRARY(fused_adam, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, bool decoupled, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, float? decay=None, int chunk_size=65536, Tensor(g!)[]? master_params=None, "
      "bool stochastic_rounding=False, int[] tensor_ids=[], int seed=0, Tensor? clip_coef=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_adam, CPU, m) { m.impl("adam_step_", &adam_step_op); }

TORCH_LIBRARY_IMPL(fused_adam, Meta, m) { m.impl("adam_step_", &adam_step_meta); }
