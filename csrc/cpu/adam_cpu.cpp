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
#include <array>
#include <atomic>
#include <cstdlib>

#include "adam_math.h"
#include "chunk_table.h"
#include "rounding.h"
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
    case Isa::kAvx512Bf16:
      return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
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
    case Isa::kAvx512Bf16:
      return "avx512bf16";
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
  for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::kBaseline;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK(cpu_has(isa), kWho, ": ISA '", name, "' is not supported by this CPU; best available: '",
                  isa_name(best_isa()), "'");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, kWho, ": unknown ISA '", name,
                    "'; expected 'auto', 'avx512bf16', 'avx512', 'avx2' or 'baseline'");
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
    case Isa::kAvx512Bf16:
      return adam_chunk_fn_avx512bf16(mode);
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
    case Isa::kAvx512Bf16:
      return roofline_chunk_fn_avx512bf16();
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
                const char* scalars, size_t scalar_stride, const StepArgs& args, int64_t chunk_size) {
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
         scalars + chunk.tensor * scalar_stride, args);
    }
  });
}

// ---- the boundary --------------------------------------------------------------------------------------------

ScalarKind scalar_kind(at::ScalarType dtype, const char* what = "params[0]") {
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
      TORCH_CHECK_TYPE(false, kWho, ": ", what, " has dtype ", dtype,
                       "; the cpu backend supports float32, float64, bfloat16 and float16 (use backend='reference')");
  }
}

// NOTE [cpu per-tensor cost]: a step over thousands of small tensors spends most of its non-kernel time on cache
// misses: each tensor's TensorImpls (checks), StorageImpls (data pointers), the param's autograd metadata (its
// grad, when the kernel reads it) and its step's float are separate heap objects, evicted by the previous step's
// pass over the data. So one pass over the tensors does everything that reads them (grad, checks, pointers, step
// pointer), and it prefetches in stages: the TensorImpls kPrefetchAhead tensors ahead, then what they point to
// (StorageImpls, autograd metadata) half as far ahead, once the TensorImpls have arrived, then the grad's
// TensorImpl a quarter as far. The vectors of handles give the TensorImpls' addresses without touching them.
constexpr size_t kPrefetchAhead = 32;

inline const char* impl_at(at::TensorList list, size_t i) {
  return i < list.size() && list[i].defined() ? reinterpret_cast<const char*>(list[i].unsafeGetTensorImpl())
                                              : nullptr;
}

inline void prefetch_impl(const char* impl) {  // sizeof(TensorImpl) is 176: three lines (four if misaligned)
  if (impl == nullptr) return;
  __builtin_prefetch(impl);
  __builtin_prefetch(impl + 64);
  __builtin_prefetch(impl + 128);
  __builtin_prefetch(impl + sizeof(c10::TensorImpl) - 1);
}

// Reads the TensorImpl (prefetched earlier): its storage field, not the virtual has_storage(), so that no vtable
// load is on the way (a tensor without storage has a null one, and a prefetch of null is a no-op).
inline void prefetch_storage(at::TensorList list, size_t i) {
  if (const char* impl = impl_at(list, i)) {
    __builtin_prefetch(reinterpret_cast<const c10::TensorImpl*>(impl)->unsafe_storage().unsafeGetStorageImpl());
  }
}

// The TensorImpl of the grad of the param whose TensorImpl is `param` (UndefinedTensorImpl's when it has none).
inline const char* grad_impl(const char* param) {
  return reinterpret_cast<const char*>(reinterpret_cast<const c10::TensorImpl*>(param)->grad().unsafeGetTensorImpl());
}

// With many tensors the per-tensor loops run in parallel too: two threads keep twice the misses in flight
// (10,000 tensors: the loops take ~2.5 ms on one). Below kTensorsPerThread tensors a thread, a loop stays serial.
constexpr int64_t kTensorsPerThread = 1024;

// g(begin, end) over the tensors [0, n): in both threads' ranges when there are enough tensors, else in one call.
template <typename G>
void over_tensor_ranges(size_t n, const G& g) {
  const int64_t count = static_cast<int64_t>(n);
  if (count >= 2 * kTensorsPerThread && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, count, kTensorsPerThread, g);
  } else if (count > 0) {
    g(0, count);
  }
}

// f(i) for every tensor i. f may throw (a check): the error is the first bad tensor's, as a serial loop's would be
// (the loops that write run only once every check has passed).
template <typename F>
void for_each_tensor(size_t n, const F& f) {
  std::atomic<size_t> first_bad{n};
  over_tensor_ranges(n, [&](int64_t begin, int64_t end) {
    for (size_t i = begin; i < static_cast<size_t>(end) && i < first_bad.load(std::memory_order_relaxed); ++i) {
      try {
        f(i);
      } catch (...) {
        size_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
        }
        return;
      }
    }
  });
  if (first_bad.load() < n) f(first_bad.load());  // throws that tensor's error again, outside the threads
}

// t must have the dtype of `like`, which is list `like_list`'s element `like_i` (grads: the param; states:
// exp_avgs[0]; masters: none, float32).
void check_like_param(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param, const at::Tensor* like,
                      const char* like_list, size_t like_i) {
  TORCH_CHECK(t.defined(), kWho, ": ", list, "[", i, "] is None");
  TORCH_CHECK(t.layout() == at::kStrided, kWho, ": ", list, "[", i, "] has layout ", t.layout(),
              "; only strided (dense) tensors are supported");
  TORCH_CHECK(t.device().is_cpu(), kWho, ": ", list, "[", i, "] is on ", t.device(), ", expected cpu");
  if (like != nullptr) {
    TORCH_CHECK_TYPE(t.scalar_type() == like->scalar_type(), kWho, ": ", list, "[", i, "] has dtype ",
                     t.scalar_type(), ", but ", like_list, "[", like_i, "] has dtype ", like->scalar_type(),
                     like == &param ? "" : " (the states share one dtype)");
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kWho, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                     ", expected float32");
  }
  TORCH_CHECK(t.sizes() == param.sizes(), kWho, ": ", list, "[", i, "] has shape ", t.sizes(), ", but params[", i,
              "] has shape ", param.sizes());
}

void check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad, at::TensorList master_params,
                 bool stochastic_rounding, at::IntArrayRef tensor_ids) {
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
  if (!master_params.empty()) check_len(master_params, "master_params");
  if (stochastic_rounding) {
    TORCH_CHECK_VALUE(tensor_ids.size() == n, kWho, ": tensor_ids has ", tensor_ids.size(), " ids, expected ", n,
                      " (one per param: stochastic rounding draws each tensor's bits from its id)");
  }
  if (n == 0) return;
  TORCH_CHECK(params[0].defined(), kWho, ": params[0] is None");
  TORCH_CHECK(exp_avgs[0].defined(), kWho, ": exp_avgs[0] is None");
  const bool master = !master_params.empty();
  if (master) {
    const at::ScalarType dt = params[0].scalar_type();
    TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf, kWho, ": master_params given for params of dtype ", dt,
                     "; master weights are for bfloat16 and float16 params");
  }
}

// Tensor i of every list, against params[i] and the first tensors (the per-tensor pass calls it).
void check_tensor(size_t i, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad,
                  at::TensorList master_params) {
  const at::Tensor& p = params[i];
  TORCH_CHECK(p.defined(), kWho, ": params[", i, "] is None");
  TORCH_CHECK(p.layout() == at::kStrided, kWho, ": params[", i, "] has layout ", p.layout(),
              "; only strided (dense) tensors are supported");
  TORCH_CHECK(p.device().is_cpu(), kWho, ": params[", i, "] is on ", p.device(), ", expected cpu");
  TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), kWho, ": params[", i, "] has dtype ",
                   p.scalar_type(), ", but params[0] has dtype ", params[0].scalar_type(),
                   "; one call takes one dtype");
  check_like_param(grads[i], "grads", i, p, &p, "params", i);
  check_like_param(exp_avgs[i], "exp_avgs", i, p, &exp_avgs[0], "exp_avgs", 0);
  check_like_param(exp_avg_sqs[i], "exp_avg_sqs", i, p, &exp_avgs[0], "exp_avgs", 0);
  if (amsgrad) check_like_param(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, &exp_avgs[0], "exp_avgs", 0);
  if (!master_params.empty()) check_like_param(master_params[i], "master_params", i, p, nullptr, nullptr, 0);
  const at::Tensor& step = state_steps[i];
  TORCH_CHECK(step.defined(), kWho, ": state_steps[", i, "] is None");
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kFloat && step.numel() == 1, kWho,
              ": state_steps[", i, "] must be a one-element float32 cpu tensor, got ", step.scalar_type(),
              " of shape ", step.sizes(), " on ", step.device());
}

double host_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, kWho, ": ", name, " must have one element, got shape ", t.sizes());
  return t.item<double>();
}

// NOTE [cpu layout]: true when the arrays of tensor i (up to six, with a master) can be walked as one flat range each.
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
  at::Tensor original[6];
  at::Tensor flat[6];
};

// What a step needs beyond torch's arguments (NOTE [cpu feature loops] in kernel.h).
struct Extras {
  at::TensorList master_params;  // empty unless mode.master
  at::IntArrayRef tensor_ids;    // read only when mode.stochastic_rounding
  uint64_t seed;
};

// The step on lists that passed check_lists. With `read_grads`, grads is *read_grads (n undefined handles) and the
// pass fills it from the params' .grad; a param without one makes it return false before anything is written.
template <typename T>
bool step_with_opmath(at::TensorList params, at::TensorList grads, std::vector<at::Tensor>* read_grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      at::TensorList state_steps, const AdamHyper& hyper, const std::optional<double>& decay,
                      const Mode& mode, const StepArgs& args, const Extras& extras, int64_t chunk_size,
                      const std::function<void()>& checked) {
  const size_t n = params.size();
  std::vector<TensorPtrs> ptrs(n);
  std::vector<int64_t> numels(n);
  std::vector<float*> steps(n);
  std::vector<char> not_flat(n, 0);
  std::atomic<bool> missing_grad{false};
  auto arrays_of = [&](size_t i) -> std::array<const at::Tensor*, 6> {
    return {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i], mode.amsgrad ? &max_exp_avg_sqs[i] : nullptr,
            mode.master ? &extras.master_params[i] : nullptr};
  };
  // The per-tensor pass (NOTE [cpu per-tensor cost]): everything that reads tensor i's objects, nothing that writes.
  for_each_tensor(n, [&](size_t i) {
    // (Grads being read are not in `grads` yet, and another thread may be writing them: they take the chain below.)
    const at::TensorList given_grads = read_grads == nullptr ? grads : at::TensorList();
    for (at::TensorList list :
         {params, given_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, extras.master_params}) {
      prefetch_impl(impl_at(list, i + kPrefetchAhead));
      prefetch_storage(list, i + kPrefetchAhead / 2);
    }
    if (read_grads != nullptr) {  // the chain param -> autograd metadata -> grad, in stages
      if (const char* p = impl_at(params, i + kPrefetchAhead / 2)) {
        const auto* meta = reinterpret_cast<const char*>(reinterpret_cast<const c10::TensorImpl*>(p)->autograd_meta());
        if (meta != nullptr) {
          __builtin_prefetch(meta);
          __builtin_prefetch(meta + 63);  // the grad's handle (offset 40 in torch 2.13's AutogradMeta)
        }
      }
      if (const char* p = impl_at(params, i + kPrefetchAhead / 4)) {
        const char* g = grad_impl(p);
        __builtin_prefetch(g, 1);  // the refcount, which the read below increments (a locked, serializing add)
        prefetch_impl(g);
      }
      if (params[i].defined()) {  // else check_tensor names it
        (*read_grads)[i] = params[i].unsafeGetTensorImpl()->grad();
        if (!(*read_grads)[i].defined()) {
          missing_grad = true;
          return;
        }
      }
    }
    check_tensor(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mode.amsgrad,
                 extras.master_params);
    steps[i] = state_steps[i].data_ptr<float>();
    const std::array<const at::Tensor*, 6> arrays = arrays_of(i);
    numels[i] = params[i].numel();
    ptrs[i] = {};
    if (numels[i] == 0) return;
    // Stochastic rounding draws element j's bits from j, its index in the tensor (row-major, as the reference
    // backend): a permuted-but-dense tensor is walked in memory order, so it runs on contiguous copies.
    const bool flat = is_flat(params[i], {arrays[1], arrays[2], arrays[3], arrays[4], arrays[5]}) &&
                      (!mode.stochastic_rounding || params[i].is_contiguous());
    if (!flat) {
      not_flat[i] = 1;  // staged below, outside the threads
      return;
    }
    void* data[6] = {};
    for (int a = 0; a < 6; ++a) data[a] = arrays[a] != nullptr ? arrays[a]->data_ptr() : nullptr;
    ptrs[i] = {data[0], data[1], data[2], data[3], data[4], static_cast<float*>(data[5]), {}};
  });
  if (missing_grad) return false;
  if (checked) checked();
  std::vector<Staged> staged;
  for (size_t i = 0; i < n; ++i) {
    if (!not_flat[i]) continue;
    const std::array<const at::Tensor*, 6> arrays = arrays_of(i);
    Staged st;
    void* data[6] = {};
    for (int a = 0; a < 6; ++a) {
      if (arrays[a] == nullptr) continue;
      st.original[a] = *arrays[a];
      st.flat[a] = arrays[a]->contiguous();
      data[a] = st.flat[a].data_ptr();
    }
    staged.push_back(std::move(st));
    ptrs[i] = {data[0], data[1], data[2], data[3], data[4], static_cast<float*>(data[5]), {}};
  }

  // Every step moves on by one; each tensor's scalars come from its own count (they usually agree, so the
  // pow() calls are made once per distinct step, not once per tensor).
  std::vector<StepScalars<T>> scalars(n);
  auto count_steps = [&](int64_t begin, int64_t end) {
    float last_step = -1.0f;
    for (int64_t i = begin; i < end; ++i) {
      if (i + static_cast<int64_t>(kPrefetchAhead) < end) __builtin_prefetch(steps[i + kPrefetchAhead], 1);
      float* step = steps[i];
      *step += 1.0f;
      if (i == begin || *step != last_step) {
        scalars[i] = make_step_scalars<T>(hyper, static_cast<double>(*step));
        if (decay.has_value()) scalars[i].decay = static_cast<T>(*decay);
        last_step = *step;
      } else {
        scalars[i] = scalars[i - 1];
      }
      if (mode.stochastic_rounding) {  // the bits of this step: a function of (seed, step, tensor, stream, element)
        const uint64_t s = static_cast<uint64_t>(*step);
        const uint64_t id = static_cast<uint64_t>(extras.tensor_ids[i]);
        for (Stream k : {Stream::kParam, Stream::kExpAvg, Stream::kExpAvgSq, Stream::kMaxExpAvgSq}) {
          ptrs[i].salt[static_cast<int>(k)] = sr_salt(extras.seed, s, id, k);
        }
      }
    }
  };
  over_tensor_ranges(n, count_steps);

  run_chunks(ptrs, numels, adam_chunk_fn(mode), reinterpret_cast<const char*>(scalars.data()),
             sizeof(StepScalars<T>), args, chunk_size);

  for (Staged& st : staged) {
    for (int a = 0; a < 6; ++a) {
      const bool written = a != 1 || mode.unscale;  // the grad is written only when it is unscaled
      if (st.original[a].defined() && written && !st.flat[a].is_same(st.original[a])) st.original[a].copy_(st.flat[a]);
    }
  }
  if (read_grads != nullptr) {
    // The references this call took are dropped here, where the grads' TensorImpls are cold again (the data pass
    // evicted them): a prefetched loop in both threads, not the vector's serial destructor.
    over_tensor_ranges(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i + static_cast<int64_t>(kPrefetchAhead) < end) {
          if (const char* g = impl_at(*read_grads, i + kPrefetchAhead)) __builtin_prefetch(g, 1);  // the refcount
        }
        (*read_grads)[i].reset();
      }
    });
  }
  return true;
}

const char* kind_name(ScalarKind k) {
  switch (k) {
    case ScalarKind::kFloat:
      return "float32";
    case ScalarKind::kDouble:
      return "float64";
    case ScalarKind::kBFloat16:
      return "bfloat16";
    case ScalarKind::kHalf:
      return "float16";
  }
  return "?";
}

// The storage combinations the feature loop is instantiated for, as text (for error messages).
std::string feature_kinds_text() {
  std::string out;
#define FA_CPU_KIND_TEXT(PK, SK, MASTER, SR)                                                                \
  if (!(SR)) {                                                                                              \
    out += out.empty() ? "" : ", ";                                                                         \
    out += std::string(kind_name(PK)) + (MASTER ? " + fp32 master" : "") + " with " + kind_name(SK) + " states"; \
  }
  FA_CPU_FEATURE_KINDS(FA_CPU_KIND_TEXT)
#undef FA_CPU_KIND_TEXT
  return out;
}

}  // namespace

std::optional<std::string> unsupported_combination(at::ScalarType param_dtype, at::ScalarType state_dtype,
                                                   bool master, bool stochastic_rounding) {
  ScalarKind pk, sk;
  try {
    pk = scalar_kind(param_dtype);
    sk = scalar_kind(state_dtype, "exp_avgs[0]");
  } catch (const c10::Error& e) {
    return std::string(e.what_without_backtrace());
  }
  if (master && pk != ScalarKind::kBFloat16 && pk != ScalarKind::kHalf) {
    return std::string("master weights are for bfloat16 and float16 params, not ") + kind_name(pk);
  }
  Mode mode{pk, sk, WeightDecay::kNone, false, false, false, master, stochastic_rounding, false};
  // Stochastic rounding changes only bf16 stores that are the only copy of a value.
  mode.stochastic_rounding = stochastic_rounding && ((pk == ScalarKind::kBFloat16 && !master) || sk == ScalarKind::kBFloat16);
  if (!uses_feature_loop(mode) || feature_kind_instantiated(mode)) return std::nullopt;
  return std::string("the cpu kernel is not instantiated for ") + kind_name(pk) + " params" +
         (master ? " with an fp32 master" : "") + " and " + kind_name(sk) + " states" +
         (mode.stochastic_rounding ? " with stochastic rounding" : "") + " (it has: " + feature_kinds_text() +
         "; each also with stochastic rounding where a bfloat16 store is the only copy)";
}

bool adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<double>& decay,
                int64_t chunk_size, at::TensorList master_params, bool stochastic_rounding,
                at::IntArrayRef tensor_ids, int64_t seed, const std::optional<at::Tensor>& clip_coef,
                std::vector<at::Tensor>* read_grads, const std::function<void()>& checked) {
  TORCH_CHECK_VALUE(chunk_size > 0, kWho, ": chunk_size must be positive, got ", chunk_size);
  if (read_grads != nullptr) {
    TORCH_CHECK_VALUE(grads.empty(), kWho, ": grads given as well as read_grads");
    read_grads->assign(params.size(), at::Tensor());
    grads = *read_grads;
  }
  check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, master_params,
              stochastic_rounding, tensor_ids);
  if (params.empty()) return true;
  const bool master = !master_params.empty();
  if (auto why = unsupported_combination(params[0].scalar_type(), exp_avgs[0].scalar_type(), master,
                                         stochastic_rounding)) {
    TORCH_CHECK_TYPE(false, kWho, ": ", *why, "; use backend='reference'");
  }
  const ScalarKind kind = scalar_kind(params[0].scalar_type());
  const ScalarKind state_kind = scalar_kind(exp_avgs[0].scalar_type(), "exp_avgs[0]");
  const double scale = grad_scale.has_value() ? host_scalar(*grad_scale, "grad_scale") : 1.0;
  double clip = 1.0;
  if (clip_coef.has_value()) {  // read once per call
    TORCH_CHECK(clip_coef->device().is_cpu() && clip_coef->scalar_type() == at::kFloat, kWho,
                ": clip_coef must be a float32 cpu tensor, got ", clip_coef->scalar_type(), " on ",
                clip_coef->device());
    clip = host_scalar(*clip_coef, "clip_coef");
  }
  if (found_inf.has_value() && host_scalar(*found_inf, "found_inf") != 0.0) return true;

  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::kNone
                         : decoupled         ? WeightDecay::kDecoupled
                                             : WeightDecay::kL2;
  const bool sr = stochastic_rounding &&
                  ((kind == ScalarKind::kBFloat16 && !master) || state_kind == ScalarKind::kBFloat16);
  const Mode mode{kind, state_kind, wd, amsgrad, maximize, grad_scale.has_value(), master, sr, clip_coef.has_value()};
  const StepArgs args{scale, (maximize ? -1.0 : 1.0) * clip};
  const Extras extras{master_params, tensor_ids, static_cast<uint64_t>(seed)};
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay};
  if (kind == ScalarKind::kDouble) {
    return step_with_opmath<double>(params, grads, read_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                    hyper, decay, mode, args, extras, chunk_size, checked);
  }
  return step_with_opmath<float>(params, grads, read_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                 hyper, decay, mode, args, extras, chunk_size, checked);
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
    ptrs[i] = {params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), nullptr,
               nullptr, {}};
  }
  const char no_scalars = 0;
  run_chunks(ptrs, numels, roofline_chunk_fn(), &no_scalars, 0, StepArgs{1.0, 1.0}, chunk_size);
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

int64_t bf16_store_mismatches(int64_t begin, int64_t end) {
  TORCH_CHECK(cpu_has(Isa::kAvx512Bf16), kWho, ": bf16_store_mismatches needs a CPU with AVX512_BF16");
  TORCH_CHECK_VALUE(0 <= begin && begin <= end && end <= (int64_t{1} << 32), kWho,
                    ": bf16_store_mismatches takes 0 <= begin <= end <= 2**32, got ", begin, ", ", end);
  return static_cast<int64_t>(
      bf16_store_mismatches_avx512bf16(static_cast<uint64_t>(begin), static_cast<uint64_t>(end)));
}

}  // namespace cpu
}  // namespace fused_adam
