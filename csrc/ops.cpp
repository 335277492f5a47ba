// fused_adam._C: the Python binding of the native kernels. The CPU step lives in csrc/cpu/adam_cpu.cpp; the
// boundary shared with the CUDA binding (lists held in C++, the per-tensor check pass, StepOptions from Python's
// PartOptions / Hyper / Amp) in csrc/common/.
//
// The CPU step is reachable two ways, one implementation:
//   * fused_adam._C.Partition + Partition.step_ (pybind11): what backends/cpu.py calls. The params, states, steps and
//     the partition's options are converted once, when the partition is made; a step reads the grads (or converts
//     the given ones) and the step's Hyper and Amp. The same checks run at every step (a param's storage swapped by
//     `p.data = ...` is seen);
//   * torch.ops.fused_adam.adam_step_ (one op schema, CPU kernel registered here): for the dispatcher and a later
//     torch.compile integration.
// Partition.addresses runs the same check pass without stepping, for a backend that launches its own kernel (the
// triton backend, on any device).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "common/py_options.h"
#include "common/tensor_pass.h"
#include "cpu/adam_cpu.h"

namespace py = pybind11;
using fused_adam::cpu::kDefaultChunkSize;
using namespace fused_adam;

namespace {

constexpr const char* kWho = "FusedAdam (cpu backend)";

at::ScalarType scalar_type(const std::string& name) {
  for (at::ScalarType t : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    const std::string short_name(c10::getDtypeNames(t).first);
    if (name == short_name || name == "torch." + short_name) return t;
  }
  TORCH_CHECK_VALUE(false, "fused_adam: unknown dtype name '", name, "'; expected e.g. 'torch.float32'");
}

std::vector<at::Tensor> to_vector(at::TensorList list) { return std::vector<at::Tensor>(list.begin(), list.end()); }

// The op (its schema below): the same StepOptions, from the op's arguments.
void adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                  double eps, double weight_decay, int64_t wd_mode, bool amsgrad, bool maximize,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  std::optional<double> decay, int64_t chunk_size, std::optional<at::TensorList> master_params,
                  bool sr_param, bool sr_state, at::IntArrayRef tensor_ids, int64_t seed,
                  const std::optional<at::Tensor>& clip_coef) {
  TORCH_CHECK_VALUE(0 <= wd_mode && wd_mode <= 2, kWho, ": wd_mode must be 0 (none), 1 (L2) or 2 (decoupled), got ",
                    wd_mode);
  const TensorLists lists{to_vector(params),         to_vector(exp_avgs),    to_vector(exp_avg_sqs),
                          to_vector(max_exp_avg_sqs), to_vector(state_steps),
                          to_vector(master_params.value_or(at::TensorList{})),
                          std::vector<int64_t>(tensor_ids.begin(), tensor_ids.end())};
  StepOptions o;
  o.hyper = AdamHyper{lr, beta1, beta2, eps, weight_decay};
  o.decay = decay.value_or(NAN);
  o.wd_mode = static_cast<WeightDecay>(wd_mode);
  o.amsgrad = amsgrad;
  o.maximize = maximize;
  o.master = lists.master();
  o.sr_param = sr_param;
  o.sr_state = sr_state;
  o.seed = static_cast<uint64_t>(seed);
  o.chunk_size = chunk_size;
  StepInputs in;
  set_amp(o, in, grad_scale, found_inf, clip_coef, at::kCPU, kWho);
  PassCache cache;
  cpu::adam_step_(lists, Grads{grads}, o, cache);
}

// The Meta (fake tensor) kernel: the op writes its arguments in place and returns nothing, so tracing it
// (torch.compile, FakeTensorMode) needs no computation; the real kernel's checks run when it runs.
void adam_step_meta(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, op.schema().arguments().size());
}

// A partition in C++: its lists (NOTE [cpu partition] in common/tensor_pass.h) and its options (PartOptions), both
// converted once, and what the per-tensor pass saw at its last step (NOTE [pass cache]).
struct Partition {
  TensorLists lists;
  StepOptions options;
  mutable PassCache cache;
  mutable const int64_t* out_seen = nullptr;  // addresses(): the `out` last written in full
  mutable bool armed = false;                 // step(check_only): its pass found these lists fit to step
  mutable std::vector<at::Tensor> armed_grads;  // the grads that pass read, held until the step

  Partition(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
            std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> state_steps,
            std::vector<at::Tensor> master_params, std::vector<int64_t> tensor_ids, py::handle part_options)
      : lists{std::move(params),      std::move(exp_avgs),      std::move(exp_avg_sqs), std::move(max_exp_avg_sqs),
              std::move(state_steps), std::move(master_params), std::move(tensor_ids)} {
    if (part_options.is_none()) {  // what the lists say; no option beyond torch
      options.amsgrad = lists.amsgrad();
      options.master = lists.master();
    } else {
      options = partition_options(part_options);
    }
  }

  // NOTE [grads read in C++]: with no grads given, each param's .grad is the grad, read by the per-tensor pass from
  // the param's autograd metadata (what Python's `p.grad` returns for a plain Tensor or Parameter) along with its
  // checks and pointers, which spares the optimizer a Python list of grads (~150 ns a param once the step's data
  // pass has evicted the Python objects) and a pass over the cold objects. The pass runs holding the GIL, as
  // Python's `p.grad` would: no Python thread can replace a grad between its read and the reference the pass takes.
  // The GIL is released once the checks have passed, for the data pass (with given grads: for the whole call). A
  // param without a grad makes this return false before anything is written, and the caller takes the path that
  // handles it.
  // NOTE [all checked first] (optimizer.py): check_only runs the checks of a step and nothing else, and arms the
  // partition: a step_ with checked=True that follows (other partitions' steps in between, nothing else) steps on
  // what that pass found, without a second pass over tensors that the other partitions' data passes have evicted.
  bool step(const std::optional<std::vector<at::Tensor>>& given, py::handle hp, py::handle amp,
            int64_t chunk_size, bool check_only = false, bool checked_before = false) const {
    StepOptions o = options;
    o.chunk_size = chunk_size;
    StepInputs in;
    read_step(o, in, hp, amp, at::kCPU, kWho);
    std::optional<py::gil_scoped_release> no_gil;
    if (given.has_value()) no_gil.emplace();
    // Declared after no_gil: unlocked before the GIL is taken back (a thread waiting for it may hold the GIL).
    const std::lock_guard<std::mutex> lock(cache.mutex);
    const bool use_arm = checked_before && armed;
    armed = false;
    std::vector<at::Tensor> read = use_arm ? std::move(armed_grads) : std::vector<at::Tensor>();
    armed_grads.clear();
    const Grads grads{given.has_value() ? at::TensorList(*given) : at::TensorList(), !given.has_value(),
                      given.has_value() ? nullptr : &read};
    const cpu::Phase phase = check_only ? cpu::Phase::kCheckOnly : use_arm ? cpu::Phase::kChecked : cpu::Phase::kFull;
    const bool ok = cpu::adam_step_(
        lists, grads, o, cache, [&] {
          if (!no_gil.has_value()) no_gil.emplace();
        },
        phase);
    if (check_only && ok) {
      armed = true;
      armed_grads = std::move(read);
    }
    return ok;
  }

  // The check pass of step() without the step, for a backend that launches its own kernel (see the binding's doc).
  py::tuple addresses(const std::optional<std::vector<at::Tensor>>& given, const at::Tensor& out,
                      const std::optional<at::Tensor>& counts, bool grads_written) const {
    constexpr const char* who = "FusedAdam";
    const size_t n = lists.size();
    TORCH_CHECK_TYPE(out.scalar_type() == at::kLong, who, ": addresses: out has dtype ", out.scalar_type(),
                     ", expected int64");
    TORCH_CHECK_VALUE(out.device().is_cpu() && out.dim() == 2 && out.size(0) == kNumRows &&
                          out.size(1) == static_cast<int64_t>(n) && out.is_contiguous(),
                      who, ": addresses: out must be a contiguous cpu tensor of shape (", static_cast<int>(kNumRows),
                      ", ", n, "), got shape ", out.sizes(), " on ", out.device());
    if (counts.has_value()) {
      TORCH_CHECK_VALUE(!options.capturable, who,
                        ": addresses: counts is for step counts on the host (capturable=False)");
      TORCH_CHECK_VALUE(counts->scalar_type() == at::kFloat && counts->device().is_cpu() && counts->dim() == 1 &&
                            counts->size(0) == static_cast<int64_t>(n) && counts->is_contiguous(),
                        who, ": addresses: counts must be a contiguous float32 cpu tensor of shape (", n, "), got ",
                        counts->scalar_type(), " of shape ", counts->sizes(), " on ", counts->device());
    }
    const at::TensorList given_list = given.has_value() ? at::TensorList(*given) : at::TensorList();
    check_lists(who, lists, given.has_value() ? &given_list : nullptr, options.amsgrad, options.stochastic_rounding());
    TORCH_CHECK_VALUE(options.master == lists.master(), who, ": ", lists.master_params.size(),
                      " master_params with master=", options.master ? "True" : "False");
    constexpr int64_t kAligned = 1 << 6, kFlat = 1 << 7, kUniform = 1 << 8, kResized = 1 << 9;
    if (n == 0) return py::make_tuple(kAligned | kFlat, py::none());
    const at::Device device = lists.params[0].device();
    const Placement where{device, options.capturable ? device : at::Device(at::kCPU)};
    const std::lock_guard<std::mutex> lock(cache.mutex);
    const Grads grads{given_list, !given.has_value(), nullptr};
    const PassResult pass = checked_pass(who, lists, grads, where, /*row_major=*/false, cache);
    if (!pass.complete) return py::make_tuple(-1, py::none());
    try {  // host counts too, whether or not they are read here (a check before a step)
      checks_after_pass(who, lists, grads, cache, grads_written, !options.capturable);
    } catch (...) {
      out_seen = nullptr;  // the pass cached what moved, which `out` lacks: the next call compares every row
      throw;
    }
    int64_t* o = out.data_ptr<int64_t>();
    uint32_t rows = pass.moved_rows & ((1u << kNumRows) - 1);
    if (o != out_seen) {
      rows = (1u << kNumRows) - 1;
      out_seen = o;
    }
    uint32_t changed = 0;  // of the rows that may have moved, those that differ from what out holds
    for (int r = 0; r < kNumRows; ++r) {
      if (!(rows & (1u << r))) continue;
      int64_t* row = o + r * n;
      for (size_t i = 0; i < n; ++i) {
        const int64_t addr = cache.seen[i].addr[r];
        if (row[i] != addr) {
          row[i] = addr;
          changed |= 1u << r;
        }
      }
    }
    int64_t mask = static_cast<int64_t>(changed) | (cache.aligned() ? kAligned : 0) | (cache.flat() ? kFlat : 0) |
                   (pass.resized ? kResized : 0);
    py::object before = py::none();
    if (counts.has_value()) {  // NOTE [host steps]: read and bumped here, once every check has passed
      float* c = counts->data_ptr<float>();
      bool uniform = true;
      for (size_t i = 0; i < n; ++i) {
        float* step = cache.step(i);
        c[i] = *step;
        uniform = uniform && c[i] == c[0];
        *step += 1.0f;
      }
      if (uniform) {
        mask |= kUniform;
        before = py::float_(c[0]);
      }
    }
    return py::make_tuple(mask, before);
  }
};

// a[i] is b[i] for every i, and the same length: PyObject pointers compared, no Python per item.
bool same_items(py::handle a, py::handle b) {
  const py::object fa = py::reinterpret_steal<py::object>(PySequence_Fast(a.ptr(), "same_items takes lists"));
  if (!fa) throw py::error_already_set();
  const py::object fb = py::reinterpret_steal<py::object>(PySequence_Fast(b.ptr(), "same_items takes lists"));
  if (!fb) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fa.ptr());
  if (PySequence_Fast_GET_SIZE(fb.ptr()) != n) return false;
  PyObject** ia = PySequence_Fast_ITEMS(fa.ptr());
  PyObject** ib = PySequence_Fast_ITEMS(fb.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (ia[i] != ib[i]) return false;
  }
  return true;
}

// NOTE [flat slot check]: a flat run (python/fused_adam/flat.py) steps a buffer's range as one tensor, which is right
// only while every param is still the view of its slot, its grad the view of its grad slot, and every state tensor
// its view. This checks that in one pass over handles held since the run was bound: per tensor, that it is strided,
// of its dtype, on its device, contiguous, with its element count, at its address (for `grads`, the same of the
// tensor's .grad, read from its autograd metadata and not held: a held reference would make autograd accumulate out
// of place). Memory-latency bound, as NOTE [cpu per-tensor cost] describes: every line it reads is prefetched
// ahead, it reads the fields directly (no virtual calls), and it runs in both threads past a few thousand tensors.
struct SlotCheck {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> ptrs, numels;
  std::vector<uint32_t> kinds;  // dtype | device type << 8 | device index << 16, as each was at construction
  bool grads;

  SlotCheck(std::vector<at::Tensor> t, std::vector<int64_t> p, std::vector<int64_t> n, bool g)
      : tensors(std::move(t)), ptrs(std::move(p)), numels(std::move(n)), grads(g) {
    TORCH_CHECK_VALUE(ptrs.size() == tensors.size() && numels.size() == tensors.size(), "SlotCheck: ", tensors.size(),
                      " tensors with ", ptrs.size(), " addresses and ", numels.size(), " element counts");
    kinds.reserve(tensors.size());
    for (const at::Tensor& x : tensors) {
      TORCH_CHECK_VALUE(x.defined(), "SlotCheck: a tensor is None");
      kinds.push_back(kind(x.unsafeGetTensorImpl()));  // a grad has its param's dtype and device
    }
  }

  static uint32_t kind(const c10::TensorImpl* t) {
    const at::Device d = t->device();
    return static_cast<uint32_t>(t->dtype().toScalarType()) |
           static_cast<uint32_t>(static_cast<uint8_t>(d.type())) << 8 |
           static_cast<uint32_t>(static_cast<uint8_t>(d.index())) << 16;
  }

  // Tensor i (with `grads`: `grad`, tensor i's .grad, the autograd metadata's handle: no reference taken).
  bool at_slot(size_t i, const at::Tensor* grad = nullptr) const {
    const c10::TensorImpl* t = tensors[i].unsafeGetTensorImpl();
    if (grads) {
      if (!grad->defined()) return false;
      t = grad->unsafeGetTensorImpl();
    }
    const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl();
    if (s == nullptr || t->key_set().has_any(c10::sparse_ks | c10::sparse_csr_ks | c10::mkldnn_ks) ||
        t->key_set().has(c10::DispatchKey::Python) || t->numel() != numels[i] || kind(t) != kinds[i]) {
      return false;
    }
    if (numels[i] == 0) return true;  // an empty slot has no address to compare
    const auto* data = static_cast<const char*>(s->data_ptr().get()) + t->storage_offset() * t->dtype().itemsize();
    return t->is_contiguous() && reinterpret_cast<int64_t>(data) == ptrs[i];
  }

  bool at_slots() const {
    std::atomic<bool> ok{true};
    over_tensor_ranges(tensors.size(), [&](int64_t begin, int64_t end) {
      GradRing ring;
      if (grads) ring.start(tensors, begin, end);
      constexpr int64_t kGradAhead = GradRing::kAhead;
      for (int64_t i = begin; i < end && ok.load(std::memory_order_relaxed); ++i) {
        if (i + static_cast<int64_t>(kPrefetchAhead) < end) {  // the fields read: storage_ and offset..key_set
          const auto* impl = reinterpret_cast<const char*>(tensors[i + kPrefetchAhead].unsafeGetTensorImpl());
          __builtin_prefetch(impl + 0x10);
          __builtin_prefetch(impl + 0x90);
          __builtin_prefetch(impl + sizeof(c10::TensorImpl) - 1);
        }
        if (i + static_cast<int64_t>(kPrefetchAhead / 2) < end) {
          const c10::TensorImpl* ahead = tensors[i + kPrefetchAhead / 2].unsafeGetTensorImpl();
          if (grads) {
            if (const auto* meta = reinterpret_cast<const char*>(ahead->autograd_meta())) {
              __builtin_prefetch(meta);
              __builtin_prefetch(meta + 63);
            }
          } else {
            prefetch_storage_impl(ahead);
          }
        }
        if (grads && i + kGradAhead < end) {
          ring.look_up(tensors, i + kGradAhead);
          prefetch_impl(reinterpret_cast<const char*>(ring.impl(i + kGradAhead)));
        }
        if (grads && i + kGradAhead / 2 < end) {
          if (const c10::TensorImpl* g = ring.impl(i + kGradAhead / 2)) prefetch_storage_impl(g);
        }
        if (!at_slot(i, grads ? ring[i] : nullptr)) ok = false;
      }
    });
    return ok.load();
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_adam native kernels (CPU: SIMD loop over a chunk table spanning all tensors of a partition)";
  m.attr("DEFAULT_CHUNK_SIZE") = kDefaultChunkSize;

  py::class_<Partition>(m, "Partition",
                        "A partition's params, states, steps (and masters, tensor ids) and its options (a PartOptions, "
                        "or None: amsgrad and master from the lists, no option beyond torch), converted once.")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<int64_t>, py::handle>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
           py::arg("state_steps"), py::kw_only(), py::arg("master_params") = std::vector<at::Tensor>{},
           py::arg("tensor_ids") = std::vector<int64_t>{}, py::arg("options") = py::none())
      .def("__len__", [](const Partition& p) { return p.lists.size(); })
      .def(
          "step_",  // releases the GIL itself (NOTE [grads read in C++])
          [](const Partition& p, const std::optional<std::vector<at::Tensor>>& grads, py::handle hp, py::handle amp,
             int64_t chunk_size, bool checked) { return p.step(grads, hp, amp, chunk_size, false, checked); },
           "One Adam/AdamW step of the partition on the cpu, in place (the step contract of "
           "fused_adam/backends/__init__.py): hp is a Hyper, amp an Amp or None. With grads=None each param's .grad "
           "(NOTE [grads read in C++]); returns False, having changed nothing, if a param has none.",
           py::arg("grads"), py::arg("hp"), py::arg("amp") = py::none(), py::kw_only(), py::arg("chunk_size") = 0,
           py::arg("checked") = false)
      .def(
          "check_",
          [](const Partition& p, const std::optional<std::vector<at::Tensor>>& grads, py::handle hp, py::handle amp) {
            return p.step(grads, hp, amp, 0, /*check_only=*/true);
          },
          "The checks of step_ (raising what it would raise, before it writes anything) without the step: returns "
          "False if grads is None and a param has no grad, else True. Nothing is written. A step_ with the same "
          "arguments and checked=True that follows, with nothing but other partitions' steps in between, steps "
          "on what this found (NOTE [all checked first]).",
          py::arg("grads"), py::arg("hp"), py::arg("amp") = py::none())
      .def("addresses", &Partition::addresses,
           "The check pass of step_ without the step, for tensors on any device: reads the grads (each param's .grad "
           "when grads is None), checks every tensor that moved since the last call as step_ does (NOTE [pass "
           "cache]; raising before anything is written), and writes each array's data address into out, an int64 "
           "cpu tensor of shape (6, len): rows param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without amsgrad), "
           "master (0 without). Only rows where something moved are compared and rewritten (every row when out is "
           "not the tensor of the last call). With counts (a float32 cpu tensor of shape (len,); step counts on the "
           "host), the step counts are written into it and then each incremented by one. Returns (mask, count): "
           "mask -1, nothing written, if grads is None and a param has no grad; else bit r (0..5) set when row r "
           "changed, bit 6 when every address is 16-byte aligned, bit 7 when every tensor's grad, states and "
           "master share its param's dense layout (clear: the caller stages copies), bit 8 when the counts were all "
           "equal, bit 9 when a param's element count changed since the last call; count: that count (before the "
           "increment), else None. grads_written: the caller's kernel writes the "
           "grads back (unscaled), so none may have two elements at one address.",
           py::arg("grads"), py::arg("out"), py::arg("counts") = py::none(), py::kw_only(),
           py::arg("grads_written") = false);

  py::class_<SlotCheck>(m, "SlotCheck",
                        "NOTE [flat slot check]: tensors (or, with grads=True, their .grad) still at these addresses, "
                        "with these element counts, contiguous.")
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, bool>(), py::arg("tensors"),
           py::arg("ptrs"), py::arg("numels"), py::kw_only(), py::arg("grads") = false)
      .def("__call__", &SlotCheck::at_slots, "True if every tensor (or grad) is still its slot.");

  m.def("same_items", &same_items,
        "len(a) == len(b) and a[i] is b[i] for every i (the step plan's check that a params list still holds the "
        "same objects).",
        py::arg("a"), py::arg("b"));

  m.def(
      "first_unreadable",
      [](py::handle tensors) -> int64_t {
        const py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(tensors.ptr(), "takes a list"));
        if (!seq) throw py::error_already_set();
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq.ptr()); ++i) {
          if (items[i] == Py_None) continue;
          if (!THPVariable_Check(items[i])) return i;
          const at::Tensor& t = THPVariable_Unpack(items[i]);
          // A wrapper subclass (DTensor) holds no memory of its own: its local tensor is checked by the step.
          if (t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) continue;
          if (t.layout() != at::kStrided || !(at::isFloatingType(t.scalar_type()) || at::isComplexType(t.scalar_type()))) {
            return i;
          }
          const auto [need, have] = storage_extent(t);
          if (need > have) return i;
        }
        return -1;
      },
      "The index of the first item that is neither None, a tensor subclass with Python dispatch (DTensor), nor a "
      "strided floating-point or complex tensor whose storage holds its elements (a grad a norm pass may read: "
      "args.check_readable words the error), or -1.",
      py::arg("tensors"));

  m.def(
      "cpu_unsupported",
      [](const std::string& param_dtype, const std::string& state_dtype, bool master, bool sr_param, bool sr_state)
          -> std::optional<std::string> {
        const std::optional<DType> p = to_dtype(scalar_type(param_dtype)), st = to_dtype(scalar_type(state_dtype));
        return cpu::unsupported_combination(*p, *st, master, sr_param, sr_state);
      },
      "Why the cpu kernel refuses params and states of these dtypes ('float32', 'bfloat16', ...) with these "
      "options (PartOptions' master, sr_param, sr_state), or None.",
      py::arg("param_dtype"), py::arg("state_dtype"), py::arg("master"), py::arg("sr_param"), py::arg("sr_state"));

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
      "float weight_decay, int wd_mode, bool amsgrad, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, float? decay=None, int chunk_size=0, Tensor(g!)[]? master_params=None, "
      "bool sr_param=False, bool sr_state=False, int[] tensor_ids=[], int seed=0, Tensor? clip_coef=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_adam, CPU, m) { m.impl("adam_step_", &adam_step_op); }

TORCH_LIBRARY_IMPL(fused_adam, Meta, m) {
  m.impl("adam_step_", torch::CppFunction::makeFromBoxedFunction<&adam_step_meta>());
}
