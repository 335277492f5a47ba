// CPU backend of FusedAdam: one call per (CPU, dtype) partition of a param group covers all its tensors.
//
//   1. check every tensor once, at the boundary (errors name the list, the index and the value);
//   2. found_inf nonzero: return, nothing changed; otherwise increment every state_steps[i] and compute each
//      tensor's StepScalars from its own step (adam_math.h), in C++, with no per-parameter Python;
//   3. split the partition into the chunk table (NOTE [chunk table]) and give each thread an equal share of
//      elements, i.e. a run of table entries that may start and end inside an entry: threads divide the work
//      across tensors, not only inside each (10,000 tensors of 1,000 elements keep both cores busy);
//   4. each entry runs the SIMD loop of kernel_impl.h for this CPU's ISA and this step's modes.
//
// NOTE [cpu layout]: the loop sees flat memory. A tensor whose param, grad and states are all
// non-overlapping-and-dense with identical strides is flat as it stands (any memory format, any permutation).
// Any other tensor (e.g. a transposed param with a contiguous grad, which torch 2.13's fused CPU Adam gets
// wrong) runs on contiguous copies of the arrays that need one, and they are copied back after the step.
#include "cpu/adam_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "adam_math.h"
#include "chunk_table.h"
#include "cpu/kernel.h"

namespace fused_adam {
namespace cpu {
namespace {

constexpr const char* kWho = "FusedAdam (cpu backend)";

// A thread gets at least this many elements: below it, waking the second thread (~5 us) costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;
// Thread boundaries fall on multiples of 16 elements (a 64-byte line of fp32), so no line is written by two cores.
constexpr int64_t kSplitAlign = 16;

// ---- ISA selection (NOTE [cpu ISA dispatch] in kernel.h) ----------------------------------------------------

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    case Isa::kBaseline:
      return true;
  }
  return false;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      return "baseline";
  }
  return "?";
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::kBaseline;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK(cpu_has(isa), kWho, ": ISA '", name, "' is not supported by this CPU; best available: '",
                  isa_name(best_isa()), "'");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, kWho, ": unknown ISA '", name, "'; expected 'auto', 'avx512', 'avx2' or 'baseline'");
}

// FUSED_ADAM_CPU_ISA=avx2 (say) pins the ISA for a whole process, e.g. to benchmark one build against another.
std::atomic<Isa>& current_isa() {
  static std::atomic<Isa> isa{[] {
    const char* env = std::getenv("FUSED_ADAM_CPU_ISA");
    return env != nullptr && *env != '\0' ? parse_isa(env) : best_isa();
  }()};
  return isa;
}

ChunkFn adam_chunk_fn(const Mode& mode) {
  switch (current_isa().load()) {
    case Isa::kAvx512:
      return adam_chunk_fn_avx512(mode);
    case Isa::kAvx2:
      return adam_chunk_fn_avx2(mode);
    case Isa::kBaseline:
      return adam_chunk_fn_baseline(mode);
  }
  return nullptr;
}

ChunkFn roofline_chunk_fn() {
  switch (current_isa().load()) {
    case Isa::kAvx512:
      return roofline_chunk_fn_avx512();
    case Isa::kAvx2:
      return roofline_chunk_fn_avx2();
    case Isa::kBaseline:
      return roofline_chunk_fn_baseline();
  }
  return nullptr;
}

// ---- threads over the chunk table -----------------------------------------------------------------------------

// Runs `fn` over every element of every tensor. `scalars + t * scalar_stride` is tensor t's StepScalars.
void run_chunks(const std::vector<TensorPtrs>& tensors, const std::vector<int64_t>& numels, ChunkFn fn,
                const char* scalars, size_t scalar_stride, double grad_scale, int64_t chunk_size) {
  const std::vector<Chunk> table = build_chunk_table(numels, chunk_size);
  if (table.empty()) return;
  std::vector<int64_t> offset(table.size() + 1);  // offset[c]: elements before entry c, over the whole partition
  offset[0] = 0;
  for (size_t c = 0; c < table.size(); ++c) offset[c + 1] = offset[c] + table[c].size;
  const int64_t total = offset.back();
  const int64_t units = (total + kSplitAlign - 1) / kSplitAlign;
  at::parallel_for(0, units, kMinElementsPerThread / kSplitAlign, [&](int64_t unit_begin, int64_t unit_end) {
    const int64_t lo = unit_begin * kSplitAlign;
    const int64_t hi = std::min(total, unit_end * kSplitAlign);
    size_t c = std::upper_bound(offset.begin(), offset.end(), lo) - offset.begin() - 1;
    for (; c < table.size() && offset[c] < hi; ++c) {
      const Chunk& chunk = table[c];
      const int64_t begin = std::max(lo, offset[c]);
      const int64_t end = std::min(hi, offset[c + 1]);
      fn(tensors[chunk.tensor], chunk.start + (begin - offset[c]), end - begin,
         scalars + chunk.tensor * scalar_stride, grad_scale);
    }
  });
}

// ---- the boundary --------------------------------------------------------------------------------------------

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ScalarKind::kFloat;
    case at::kDouble:
      return ScalarKind::kDouble;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kHalf;
    default:
      TORCH_CHECK_TYPE(false, kWho, ": params[0] has dtype ", dtype,
                       "; the cpu backend supports float32, float64, bfloat16 and float16 (use backend='reference')");
  }
}

void check_like_param(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param) {
  TORCH_CHECK(t.defined(), kWho, ": ", list, "[", i, "] is None");
  TORCH_CHECK(t.layout() == at::kStrided, kWho, ": ", list, "[", i, "] has layout ", t.layout(),
              "; only strided (dense) tensors are supported");
  TORCH_CHECK(t.device().is_cpu(), kWho, ": ", list, "[", i, "] is on ", t.device(), ", expected cpu");
  TORCH_CHECK_TYPE(t.scalar_type() == param.scalar_type(), kWho, ": ", list, "[", i, "] has dtype ",
                   t.scalar_type(), ", but params[", i, "] has dtype ", param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), kWho, ": ", list, "[", i, "] has shape ", t.sizes(), ", but params[", i,
              "] has shape ", param.sizes());
}

void check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad) {
  const size_t n = params.size();
  auto check_len = [&](at::TensorList list, const char* name) {
    TORCH_CHECK_VALUE(list.size() == n, kWho, ": ", name, " has ", list.size(), " tensors, expected ", n,
                      " (one per param)");
  };
  check_len(grads, "grads");
  check_len(exp_avgs, "exp_avgs");
  check_len(exp_avg_sqs, "exp_avg_sqs");
  check_len(state_steps, "state_steps");
  if (amsgrad) {
    check_len(max_exp_avg_sqs, "max_exp_avg_sqs");
  } else {
    TORCH_CHECK_VALUE(max_exp_avg_sqs.empty(), kWho, ": max_exp_avg_sqs has ", max_exp_avg_sqs.size(),
                      " tensors, expected none when amsgrad=False");
  }
  if (n == 0) return;
  TORCH_CHECK(params[0].defined(), kWho, ": params[0] is None");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), kWho, ": params[", i, "] is None");
    TORCH_CHECK(p.layout() == at::kStrided, kWho, ": params[", i, "] has layout ", p.layout(),
                "; only strided (dense) tensors are supported");
    TORCH_CHECK(p.device().is_cpu(), kWho, ": params[", i, "] is on ", p.device(), ", expected cpu");
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), kWho, ": params[", i, "] has dtype ",
                     p.scalar_type(), ", but params[0] has dtype ", params[0].scalar_type(),
                     "; one call takes one dtype");
    check_like_param(grads[i], "grads", i, p);
    check_like_param(exp_avgs[i], "exp_avgs", i, p);
    check_like_param(exp_avg_sqs[i], "exp_avg_sqs", i, p);
    if (amsgrad) check_like_param(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p);
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined(), kWho, ": state_steps[", i, "] is None");
    TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kFloat && step.numel() == 1, kWho,
                ": state_steps[", i, "] must be a one-element float32 cpu tensor, got ", step.scalar_type(),
                " of shape ", step.sizes(), " on ", step.device());
  }
}

double host_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, kWho, ": ", name, " must have one element, got shape ", t.sizes());
  return t.item<double>();
}

// NOTE [cpu layout]: true when the five arrays of tensor i can be walked as one flat range each.
bool is_flat(const at::Tensor& p, std::initializer_list<const at::Tensor*> others) {
  if (p.numel() <= 1) return true;
  if (!p.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor* t : others) {
    if (t != nullptr && (!t->is_non_overlapping_and_dense() || t->strides() != p.strides())) return false;
  }
  return true;
}

// Contiguous stand-ins for the arrays of one non-flat tensor, copied back after the step.
struct Staged {
  at::Tensor original[5];
  at::Tensor flat[5];
};

template <typename T>
void step_with_opmath(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                      const AdamHyper& hyper, const std::optional<double>& decay, const Mode& mode, double grad_scale,
                      int64_t chunk_size) {
  const size_t n = params.size();
  std::vector<TensorPtrs> ptrs(n);
  std::vector<int64_t> numels(n);
  std::vector<Staged> staged;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* arrays[5] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i],
                                   mode.amsgrad ? &max_exp_avg_sqs[i] : nullptr};
    numels[i] = params[i].numel();
    if (numels[i] == 0) {
      ptrs[i] = {};
      continue;
    }
    void* data[5] = {};
    if (is_flat(params[i], {arrays[1], arrays[2], arrays[3], arrays[4]})) {
      for (int a = 0; a < 5; ++a) data[a] = arrays[a] != nullptr ? arrays[a]->data_ptr() : nullptr;
    } else {
      Staged s;
      for (int a = 0; a < 5; ++a) {
        if (arrays[a] == nullptr) continue;
        s.original[a] = *arrays[a];
        s.flat[a] = arrays[a]->contiguous();
        data[a] = s.flat[a].data_ptr();
      }
      staged.push_back(std::move(s));
    }
    ptrs[i] = {data[0], data[1], data[2], data[3], data[4]};
  }

  // Every step moves on by one; each tensor's scalars come from its own count (they usually agree, so the
  // pow() calls are made once per distinct step, not once per tensor).
  std::vector<StepScalars<T>> scalars(n);
  float last_step = -1.0f;
  for (size_t i = 0; i < n; ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    if (i == 0 || *step != last_step) {
      scalars[i] = make_step_scalars<T>(hyper, static_cast<double>(*step));
      if (decay.has_value()) scalars[i].decay = static_cast<T>(*decay);
      last_step = *step;
    } else {
      scalars[i] = scalars[i - 1];
    }
  }

  run_chunks(ptrs, numels, adam_chunk_fn(mode), reinterpret_cast<const char*>(scalars.data()),
             sizeof(StepScalars<T>), grad_scale, chunk_size);

  for (Staged& s : staged) {
    for (int a = 0; a < 5; ++a) {
      const bool written = a != 1 || mode.unscale;  // the grad is written only when it is unscaled
      if (s.original[a].defined() && written && !s.flat[a].is_same(s.original[a])) s.original[a].copy_(s.flat[a]);
    }
  }
}

}  // namespace

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<double>& decay,
                int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size > 0, kWho, ": chunk_size must be positive, got ", chunk_size);
  check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  if (params.empty()) return;
  const ScalarKind kind = scalar_kind(params[0].scalar_type());
  const double scale = grad_scale.has_value() ? host_scalar(*grad_scale, "grad_scale") : 1.0;
  if (found_inf.has_value() && host_scalar(*found_inf, "found_inf") != 0.0) return;

  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::kNone
                         : decoupled         ? WeightDecay::kDecoupled
                                             : WeightDecay::kL2;
  const Mode mode{kind, wd, amsgrad, maximize, grad_scale.has_value()};
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay};
  if (kind == ScalarKind::kDouble) {
    step_with_opmath<double>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hyper, decay, mode, scale,
                             chunk_size);
  } else {
    step_with_opmath<float>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hyper, decay, mode, scale,
                            chunk_size);
  }
}

void roofline_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size > 0, "roofline_: chunk_size must be positive, got ", chunk_size);
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
                    "roofline_: expected four lists of equal length, got ", n, ", ", grads.size(), ", ",
                    exp_avgs.size(), ", ", exp_avg_sqs.size());
  std::vector<TensorPtrs> ptrs(n);
  std::vector<int64_t> numels(n);
  const char* names[4] = {"p", "g", "m", "v"};
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* arrays[4] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
    for (int a = 0; a < 4; ++a) {
      const at::Tensor& t = *arrays[a];
      TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                  "roofline_: ", names[a], "[", i, "] must be a contiguous float32 cpu tensor");
      TORCH_CHECK(t.numel() == params[i].numel(), "roofline_: ", names[a], "[", i, "] has ", t.numel(),
                  " elements, but p[", i, "] has ", params[i].numel());
    }
    numels[i] = params[i].numel();
    ptrs[i] = {params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), nullptr};
  }
  const char no_scalars = 0;
  run_chunks(ptrs, numels, roofline_chunk_fn(), &no_scalars, 0, 1.0, chunk_size);
}

std::vector<std::tuple<int64_t, int64_t, int64_t>> chunk_table(const std::vector<int64_t>& numels,
                                                                int64_t chunk_size) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  try {
    for (const Chunk& c : build_chunk_table(numels, chunk_size)) out.emplace_back(c.tensor, c.start, c.size);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return out;
}

std::string isa() { return isa_name(current_isa().load()); }

void set_isa(const std::string& name) { current_isa().store(parse_isa(name)); }

}  // namespace cpu
}  // namespace fused_adam
