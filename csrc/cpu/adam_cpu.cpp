// CPU backend of FusedAdam: one call per (CPU, dtype) partition of a param group covers all its tensors.
//
//   1. check every tensor once, at the boundary (csrc/common/tensor_pass.h: errors name the list, the index and the
//      value), reading each param's grad where the caller gave none;
//   2. found_inf nonzero: return, nothing changed; otherwise increment every state_steps[i] and compute each
//      tensor's StepScalars from its own step (adam_math.h), in C++, with no per-parameter Python;
//   3. split the partition into the chunk table (NOTE [chunk table]) and give each thread an equal share of
//      elements, i.e. a run of table entries that may start and end inside an entry: threads divide the work
//      across tensors, not only inside each (10,000 tensors of 1,000 elements keep both cores busy);
//   4. each entry runs the SIMD loop of kernel_impl.h for this CPU's ISA and this step's modes.
//
// The loop sees flat memory (NOTE [flat layout] in csrc/common/tensor_pass.h): a tensor whose arrays do not share its
// param's dense layout (e.g. a transposed param with a contiguous grad, which torch 2.13's fused CPU Adam gets wrong)
// runs on copies of the arrays that need one, copied back after the step.
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
#include "common/tensor_pass.h"

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

// ---- the step ------------------------------------------------------------------------------------------------

// The step on lists that passed check_lists, in opmath T. The per-tensor pass (csrc/common/tensor_pass.h, NOTE [pass
// cache]) checks every tensor that moved since the last step of these lists, reads the grads where asked, and leaves
// every tensor's addresses in `cache`, writing nothing.
template <typename T>
bool step_with_opmath(const TensorLists& l, const Grads& grads, const StepOptions& o, const Mode& mode,
                      const StepArgs& args, int64_t chunk_size, PassCache& cache,
                      const std::function<void()>& checked, Phase phase) {
  const size_t n = l.size();
  const bool row_major = mode.sr_param || mode.sr_state;
  if (phase != Phase::kChecked) {
    if (!checked_pass(kWho, l, grads, Placement{at::kCPU, at::kCPU}, row_major, cache).complete) return false;
    checks_after_pass(kWho, l, grads, cache, o.unscale(), /*host_counts=*/true);
    if (phase == Phase::kCheckOnly) return true;
  }
  if (checked) checked();
  std::vector<TensorPtrs> ptrs(n);
  over_tensor_ranges(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (cache.numel[i] == 0 || cache.not_flat[i]) continue;  // empty; or staged below, outside the threads
      auto data = [&](int r) { return cache.data(i, r); };
      ptrs[i] = {data(0), data(1), data(2), data(3), data(4), static_cast<float*>(data(5)), {}};
    }
  });
  std::vector<Staged> staged;
  if (!cache.flat()) {
    const at::TensorList grad_list = grads.hold != nullptr ? at::TensorList(*grads.hold) : grads.given;
    for (size_t i = 0; i < n; ++i) {
      if (cache.numel[i] == 0 || !cache.not_flat[i]) continue;
      const Staged& st = staged.emplace_back(arrays_of(l, grad_list, i), row_major);
      ptrs[i] = {st.data(0), st.data(1), st.data(2), st.data(3), st.data(4), static_cast<float*>(st.data(5)), {}};
    }
  }

  // Every step moves on by one; each tensor's scalars come from its own count (they usually agree, so the
  // pow() calls are made once per distinct step, not once per tensor).
  std::vector<StepScalars<T>> scalars(n);
  auto count_steps = [&](int64_t begin, int64_t end) {
    float last_step = -1.0f;
    for (int64_t i = begin; i < end; ++i) {
      if (i + static_cast<int64_t>(kPrefetchAhead) < end) __builtin_prefetch(cache.step(i + kPrefetchAhead), 1);
      float* step = cache.step(i);
      *step += 1.0f;
      if (i == begin || *step != last_step) {
        scalars[i] = host_step_scalars<T>(o, static_cast<double>(*step));
        last_step = *step;
      } else {
        scalars[i] = scalars[i - 1];
      }
      if (row_major) {  // the bits of this step: a function of (seed, step, tensor, stream, element)
        const uint64_t s = static_cast<uint64_t>(*step);
        const uint64_t id = static_cast<uint64_t>(l.tensor_ids[i]);
        for (Stream k : {Stream::kParam, Stream::kExpAvg, Stream::kExpAvgSq, Stream::kMaxExpAvgSq}) {
          ptrs[i].salt[static_cast<int>(k)] = sr_salt(o.seed, s, id, k);
        }
      }
    }
  };
  over_tensor_ranges(n, count_steps);

  run_chunks(ptrs, cache.numel, adam_chunk_fn(mode), reinterpret_cast<const char*>(scalars.data()),
             sizeof(StepScalars<T>), args, chunk_size);

  for (Staged& st : staged) st.copy_back(/*grad_written=*/mode.unscale);
  if (grads.hold != nullptr) release_read_grads(*grads.hold);
  return true;
}

// The storage combinations the feature loop is instantiated for, as text (for error messages).
std::string feature_kinds_text() {
  std::string out;
#define FA_CPU_KIND_TEXT(PK, SK, MASTER, SR_PARAM, SR_STATE)                                                \
  if (!(SR_PARAM) && !(SR_STATE)) {                                                                        \
    out += out.empty() ? "" : ", ";                                                                         \
    out += std::string(dtype_name(PK)) + (MASTER ? " + fp32 master" : "") + " with " + dtype_name(SK) + " states"; \
  }
  FA_CPU_FEATURE_KINDS(FA_CPU_KIND_TEXT)
#undef FA_CPU_KIND_TEXT
  return out;
}

// The dtype of `what` (params[0], exp_avgs[0]) as a DType, or the error that names it.
DType kernel_dtype(at::ScalarType dtype, const char* what) {
  const std::optional<DType> d = to_dtype(dtype);
  TORCH_CHECK_TYPE(d.has_value(), kWho, ": ", what, " has dtype ", dtype,
                   "; the cpu backend supports float32, float64, bfloat16 and float16 (use backend='reference')");
  return *d;
}

}  // namespace

std::optional<std::string> unsupported_combination(DType pk, DType sk, bool master, bool sr_param, bool sr_state) {
  if (master && pk != DType::kBFloat16 && pk != DType::kFloat16) {
    return std::string("master weights are for bfloat16 and float16 params, not ") + dtype_name(pk);
  }
  const Mode mode{pk, sk, WeightDecay::kNone, false, false, false, master, sr_param, sr_state, false};
  if (!uses_feature_loop(mode) || feature_kind_instantiated(mode)) return std::nullopt;
  const char* sr = sr_param && sr_state ? " with stochastic rounding of the param and state stores"
                   : sr_param           ? " with stochastic rounding of the param stores"
                   : sr_state           ? " with stochastic rounding of the state stores"
                                        : "";
  return std::string("the cpu kernel is not instantiated for ") + dtype_name(pk) + " params" +
         (master ? " with an fp32 master" : "") + " and " + dtype_name(sk) + " states" + sr + " (it has: " +
         feature_kinds_text() + "; each also with stochastic rounding where a bfloat16 store is the only copy)";
}

bool adam_step_(const TensorLists& l, const Grads& grads, const StepOptions& o, PassCache& cache,
                const std::function<void()>& checked, Phase phase) {
  const int64_t chunk_size = o.chunk_size == 0 ? kDefaultChunkSize : o.chunk_size;
  TORCH_CHECK_VALUE(chunk_size > 0, kWho, ": chunk_size must be positive, got ", chunk_size);
  check_lists(kWho, l, grads.from_params ? nullptr : &grads.given, o.amsgrad, o.stochastic_rounding());
  TORCH_CHECK_VALUE(o.master == l.master(), kWho, ": ", l.master_params.size(), " master_params with master=",
                    o.master ? "True" : "False");
  TORCH_CHECK_VALUE(o.lr_device == nullptr, kWho, ": lr on a device is for capturable CUDA steps");
  if (l.size() == 0) return true;
  const DType kind = kernel_dtype(l.params[0].scalar_type(), "params[0]");
  const DType state_kind = kernel_dtype(l.exp_avgs[0].scalar_type(), "exp_avgs[0]");
  if (auto why = unsupported_combination(kind, state_kind, o.master, o.sr_param, o.sr_state)) {
    TORCH_CHECK_TYPE(false, kWho, ": ", *why, "; use backend='reference'");
  }
  if (o.found_inf != nullptr && *o.found_inf != 0.0f) return true;
  const double scale = o.unscale() ? static_cast<double>(*o.grad_scale) : 1.0;
  const double clip = o.clip() ? static_cast<double>(*o.clip_coef) : 1.0;  // read once per call
  const Mode mode{kind, state_kind, o.wd_mode, o.amsgrad, o.maximize, o.unscale(), o.master, o.sr_param, o.sr_state,
                  o.clip()};
  const StepArgs args{scale, (o.maximize ? -1.0 : 1.0) * clip};
  if (kind == DType::kFloat64) {
    return step_with_opmath<double>(l, grads, o, mode, args, chunk_size, cache, checked, phase);
  }
  return step_with_opmath<float>(l, grads, o, mode, args, chunk_size, cache, checked, phase);
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
