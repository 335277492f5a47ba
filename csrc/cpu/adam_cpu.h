// Torch-facing entry points of the CPU backend (bound in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/dtype.h"
#include "common/options.h"
#include "common/tensor_pass.h"

namespace fused_adam {
namespace cpu {

// Chunks of 64K elements: 256 KiB of fp32 per array, 7 arrays in flight fit the 2 MiB L2 per core; a 64M
// tensor makes 1024 entries, enough for any thread count; small enough that a 1M-param cache-resident step
// still splits across two threads.
constexpr int64_t kDefaultChunkSize = 1 << 16;

// One Adam/AdamW step over every tensor of one (CPU, dtype) partition; see the step contract in
// python/fused_adam/backends/__init__.py. `options` holds the partition's options and this step's hyperparameters
// and AMP scalars (csrc/common/options.h; chunk_size 0: kDefaultChunkSize). The options beyond torch (NOTE [cpu
// feature loops] in kernel.h):
//   * states in a dtype of their own: exp_avgs/exp_avg_sqs/max_exp_avg_sqs share one dtype, which may differ
//     from the params' (fp32 math, one rounding per store);
//   * master_params (fp32, one per bf16/fp16 param): the update runs on the master, the param gets its rounding to
//     nearest;
//   * sr_param / sr_state: those stores round with the bits of csrc/rounding.h,
//     sr_bits(sr_salt(seed, step, tensor_ids[i], stream), element index);
//   * clip_coef: the unscaled grad is multiplied by it for the update, read once per call.
// grads: given, or read from each param's .grad in the per-tensor pass (NOTE [grads read in C++] in ops.cpp).
// `cache`: what the pass saw at the last step of these lists (NOTE [pass cache]; a fresh one checks everything).
// Returns false, having changed nothing, when a grad is read and a param has none; true otherwise. `checked`, when
// given, is called once every tensor has passed the checks, before anything is written (the binding releases the
// GIL there). `phase` (NOTE [all checked first] in optimizer.py: a step of several partitions checks them all before
// it writes any): kCheckOnly returns there, having written nothing; kChecked steps on what a kCheckOnly call of
// these lists just found (`cache` and the grads it held: nothing but other partitions' steps ran in between), without
// the pass.
enum class Phase { kFull, kCheckOnly, kChecked };
bool adam_step_(const TensorLists& lists, const Grads& grads, const StepOptions& options, PassCache& cache,
                const std::function<void()>& checked = {}, Phase phase = Phase::kFull);

// Why adam_step_ would refuse params of `param_dtype` with states of `state_dtype` with these options, or nullopt:
// the storage combinations the kernel is not instantiated for (FA_CPU_FEATURE_KINDS in kernel.h).
std::optional<std::string> unsupported_combination(DType param_dtype, DType state_dtype, bool master, bool sr_param,
                                                   bool sr_state);

// One pass with Adam's access pattern over contiguous fp32 tensors (the bandwidth roofline of this machine).
void roofline_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               int64_t chunk_size);

// The chunk table (csrc/chunk_table.h) as (tensor, start, size) tuples, for tests.
std::vector<std::tuple<int64_t, int64_t, int64_t>> chunk_table(const std::vector<int64_t>& numels, int64_t chunk_size);

// The instruction set the loops run with: "avx512bf16", "avx512", "avx2" or "baseline". set_isa() takes one of those
// or "auto" (the best this CPU supports) and refuses one the CPU lacks; tests use it to run every build of the loop.
std::string isa();
void set_isa(const std::string& name);

// The AVX512_BF16 loop's bf16 store (bf16_avx512.h) against the scalar rounding, for the float bit patterns
// [begin, end) (0 <= begin <= end <= 2^32): the number of mismatches. For tests; needs AVX512_BF16.
int64_t bf16_store_mismatches(int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace fused_adam
