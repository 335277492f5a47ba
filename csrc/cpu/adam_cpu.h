// Torch-facing entry points of the CPU backend (bound in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fused_adam {
namespace cpu {

// Chunks of 64K elements: 256 KiB of fp32 per array, 7 arrays in flight fit the 2 MiB L2 per core; a 64M
// tensor makes 1024 entries, enough for any thread count; small enough that a 1M-param cache-resident step
// still splits across two threads.
constexpr int64_t kDefaultChunkSize = 1 << 16;

// One Adam/AdamW step over every tensor of one (CPU, dtype) partition; see the step contract in
// python/fused_adam/backends/__init__.py. Hyperparameters are host values (Tensor lr/betas read by the caller).
// `decay`, when given, replaces AdamW's 1 - lr * weight_decay: with a Tensor lr torch computes that factor in the
// tensor's dtype (float32), which is 3e-8 away from the double one, too far for fp64 parity over many steps.
// The options beyond torch (NOTE [cpu feature loops] in kernel.h):
//   * states in a dtype of their own: exp_avgs/exp_avg_sqs/max_exp_avg_sqs share one dtype, which may differ
//     from the params' (fp32 math, one rounding per store);
//   * master_params (fp32, one per bf16/fp16 param, or empty): the update runs on the master, the param gets its
//     rounding to nearest;
//   * stochastic_rounding: bf16 stores that are the only copy of a value (params without a master, states) round
//     with the bits of csrc/rounding.h, sr_bits(sr_salt(seed, step, tensor_ids[i], stream), element index);
//     `seed` is the 64-bit seed's two's complement (the op schema has no unsigned int);
//   * clip_coef (0-dim float32): the unscaled grad is multiplied by it for the update, read once per call.
// read_grads: when given, `grads` is empty and each param's .grad is the grad, read in the per-tensor pass (NOTE
// [grads read in C++] in ops.cpp); *read_grads holds them during the call. Returns false, having changed nothing,
// when a param has no grad; true otherwise. checked, when given, is called once every tensor has passed the
// checks, before anything is written (the caller then releases the GIL it held while the grads were read).
bool adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                bool maximize, bool decoupled, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<double>& decay,
                int64_t chunk_size, at::TensorList master_params = {}, bool stochastic_rounding = false,
                at::IntArrayRef tensor_ids = {}, int64_t seed = 0,
                const std::optional<at::Tensor>& clip_coef = std::nullopt,
                std::vector<at::Tensor>* read_grads = nullptr, const std::function<void()>& checked = {});

// Why adam_step_ would refuse params of `param_dtype` with states of `state_dtype` (and a master, and stochastic
// rounding), or nullopt: the storage combinations the kernel is not instantiated for.
std::optional<std::string> unsupported_combination(at::ScalarType param_dtype, at::ScalarType state_dtype,
                                                   bool master, bool stochastic_rounding);

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
