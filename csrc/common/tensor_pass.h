// The torch side of the native boundary, shared by the CPU binding (csrc/ops.cpp, csrc/cpu) and the CUDA binding:
// a partition's lists held in C++ (TensorLists), the one per-tensor check pass (errors name the list, the index and
// the value, and are raised before anything is written), grads read from the params' autograd metadata, and the
// layout-staging helper (arrays that cannot be walked as one flat range run on copies, copied back).
// Header-only; needs ATen (not the CUDA runtime).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/dtype.h"

namespace fused_adam {

inline std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return std::nullopt;
  }
}

// The arrays of one tensor of a partition, in this order everywhere (Partition.addresses' rows).
enum Row : int { kParamRow = 0, kGradRow, kExpAvgRow, kExpAvgSqRow, kMaxExpAvgSqRow, kMasterRow, kNumRows };
constexpr const char* kRowList[kNumRows] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                            "master_params"};

// NOTE [cpu partition]: the lists of one partition that stay the same tensors from step to step (the step plan hands
// the same lists every step), held as at::Tensor handles (they keep the tensors alive). max_exp_avg_sqs is empty
// unless amsgrad, master_params unless master weights, tensor_ids unless stochastic rounding.
struct TensorLists {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params;
  std::vector<int64_t> tensor_ids;

  size_t size() const { return params.size(); }
  bool amsgrad() const { return !max_exp_avg_sqs.empty(); }
  bool master() const { return !master_params.empty(); }
};

// The list lengths (one per param; max_exp_avg_sqs, master_params and tensor_ids: one per param or none), and the
// first tensors that name the partition's dtypes. `grads` is checked only when given.
inline void check_lists(const char* who, const TensorLists& l, const at::TensorList* grads, bool amsgrad,
                        bool need_tensor_ids) {
  const size_t n = l.size();
  auto check_len = [&](size_t len, const char* name, const char* what) {
    TORCH_CHECK_VALUE(len == n, who, ": ", name, " has ", len, " ", what, ", expected ", n, " (one per param)");
  };
  if (grads != nullptr) check_len(grads->size(), "grads", "tensors");
  check_len(l.exp_avgs.size(), "exp_avgs", "tensors");
  check_len(l.exp_avg_sqs.size(), "exp_avg_sqs", "tensors");
  check_len(l.state_steps.size(), "state_steps", "tensors");
  if (amsgrad) {
    check_len(l.max_exp_avg_sqs.size(), "max_exp_avg_sqs", "tensors");
  } else {
    TORCH_CHECK_VALUE(l.max_exp_avg_sqs.empty(), who, ": max_exp_avg_sqs has ", l.max_exp_avg_sqs.size(),
                      " tensors, expected none when amsgrad=False");
  }
  if (l.master()) check_len(l.master_params.size(), "master_params", "tensors");
  if (need_tensor_ids) {
    TORCH_CHECK_VALUE(l.tensor_ids.size() == n, who, ": tensor_ids has ", l.tensor_ids.size(), " ids, expected ", n,
                      " (one per param: stochastic rounding draws each tensor's bits from its id)");
  }
  if (n == 0) return;
  TORCH_CHECK(l.params[0].defined(), who, ": params[0] is None");
  TORCH_CHECK(l.exp_avgs[0].defined(), who, ": exp_avgs[0] is None");
  if (l.master()) {
    const at::ScalarType dt = l.params[0].scalar_type();
    TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf, who, ": master_params given for params of dtype ", dt,
                     "; master weights are for bfloat16 and float16 params");
  }
}

// Where the tensors of a partition must live: `device` (every array), `steps` (the step counts: on the CPU, or on
// the device when capturable).
struct Placement {
  at::Device device;
  at::Device steps;
};

// ---- the per-tensor pass -----------------------------------------------------------------------------------------

// NOTE [cpu per-tensor cost]: a step over thousands of small tensors spends most of its non-kernel time on cache
// misses: each tensor's TensorImpls (checks), StorageImpls (data pointers), the param's autograd metadata (its
// grad, when the pass reads it) and its step's float are separate heap objects, evicted by the previous step's
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

// g(begin, end) over the tensors [0, n): in every thread's range when there are enough tensors, else in one call.
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
// (what writes runs only once every check has passed).
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

// Array `row` of tensor i (`t`) against params[i]: defined, strided, on the device, the dtype of `like` (grads: the
// param; states: exp_avgs[0]; masters: none, float32), the param's shape.
inline void check_array(const char* who, const at::Tensor& t, int row, size_t i, const at::Tensor& param,
                        const at::Tensor* like, int like_row, size_t like_i, const Placement& where) {
  const char* list = kRowList[row];
  TORCH_CHECK(t.defined(), who, ": ", list, "[", i, "] is None");
  TORCH_CHECK(t.layout() == at::kStrided, who, ": ", list, "[", i, "] has layout ", t.layout(),
              "; only strided (dense) tensors are supported");
  TORCH_CHECK(t.device() == where.device, who, ": ", list, "[", i, "] is on ", t.device(), ", expected ",
              where.device);
  if (like != nullptr) {
    TORCH_CHECK_TYPE(t.scalar_type() == like->scalar_type(), who, ": ", list, "[", i, "] has dtype ",
                     t.scalar_type(), ", but ", kRowList[like_row], "[", like_i, "] has dtype ", like->scalar_type(),
                     like == &param ? "" : " (the states share one dtype)");
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, who, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                     ", expected float32");
  }
  TORCH_CHECK(t.sizes() == param.sizes(), who, ": ", list, "[", i, "] has shape ", t.sizes(), ", but params[", i,
              "] has shape ", param.sizes());
}

// Tensor i of every list, against params[i] and the first tensors. `arrays` are its six arrays (null: absent).
inline void check_tensor(const char* who, const TensorLists& l, size_t i, const std::array<const at::Tensor*, kNumRows>& a,
                         const Placement& where) {
  const at::Tensor& p = l.params[i];
  TORCH_CHECK(p.defined(), who, ": params[", i, "] is None");
  TORCH_CHECK(p.layout() == at::kStrided, who, ": params[", i, "] has layout ", p.layout(),
              "; only strided (dense) tensors are supported");
  TORCH_CHECK(p.device() == where.device, who, ": params[", i, "] is on ", p.device(), ", expected ", where.device);
  TORCH_CHECK_TYPE(p.scalar_type() == l.params[0].scalar_type(), who, ": params[", i, "] has dtype ",
                   p.scalar_type(), ", but params[0] has dtype ", l.params[0].scalar_type(),
                   "; one call takes one dtype");
  check_array(who, *a[kGradRow], kGradRow, i, p, &p, kParamRow, i, where);
  for (int row : {kExpAvgRow, kExpAvgSqRow, kMaxExpAvgSqRow}) {
    if (a[row] != nullptr) check_array(who, *a[row], row, i, p, &l.exp_avgs[0], kExpAvgRow, 0, where);
  }
  if (a[kMasterRow] != nullptr) check_array(who, *a[kMasterRow], kMasterRow, i, p, nullptr, 0, 0, where);
  const at::Tensor& step = l.state_steps[i];
  TORCH_CHECK(step.defined(), who, ": state_steps[", i, "] is None");
  TORCH_CHECK(step.device() == where.steps && step.scalar_type() == at::kFloat && step.numel() == 1, who,
              ": state_steps[", i, "] must be a one-element float32 tensor on ", where.steps, ", got ",
              step.scalar_type(), " of shape ", step.sizes(), " on ", step.device());
}

// Same element -> memory offset map as `like` (strides of size-1 dims do not matter).
inline bool same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.dim() != like.dim()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

// NOTE [flat layout]: the kernels walk each array of a tensor as one flat range. That holds as the tensors stand when
// the param is non-overlapping and dense and every other array has its layout (any memory format, any permutation).
// With stochastic rounding (`row_major`) element j's bits are drawn from j, its row-major index (as the reference
// backend does), so the param must also be contiguous.
inline bool is_flat(const std::array<const at::Tensor*, kNumRows>& a, bool row_major) {
  const at::Tensor& p = *a[kParamRow];
  if (p.numel() <= 1) return true;
  if (row_major ? !p.is_contiguous() : !p.is_non_overlapping_and_dense()) return false;
  for (int row = 1; row < kNumRows; ++row) {
    if (a[row] != nullptr && !same_layout(*a[row], p)) return false;
  }
  return true;
}

// The grads a pass sees: given (a list the caller keeps alive), or read from each param's .grad into `read`.
struct Grads {
  at::TensorList given;
  std::vector<at::Tensor>* read = nullptr;  // NOTE [grads read in C++]

  at::TensorList list() const { return read != nullptr ? at::TensorList(*read) : given; }
};

// The arrays of tensor i (null: absent), in Row order.
inline std::array<const at::Tensor*, kNumRows> arrays_of(const TensorLists& l, at::TensorList grads, size_t i) {
  return {&l.params[i], &grads[i], &l.exp_avgs[i], &l.exp_avg_sqs[i],
          l.amsgrad() ? &l.max_exp_avg_sqs[i] : nullptr, l.master() ? &l.master_params[i] : nullptr};
}

// The pass: checks every tensor (holding nothing but references), reads the grads where asked, and calls
// on_tensor(i, arrays) for each tensor that passed its checks, from up to every thread (so it writes only its own
// tensor's slots). Returns false, having called on_tensor on none that matter, if a grad is read and missing: the
// caller then writes nothing. Throws the first bad tensor's error.
template <typename F>
bool tensor_pass(const char* who, const TensorLists& l, const Grads& grads, const Placement& where, F&& on_tensor) {
  const size_t n = l.size();
  if (grads.read != nullptr) grads.read->assign(n, at::Tensor());
  const at::TensorList gl = grads.list();
  std::atomic<bool> missing_grad{false};
  for_each_tensor(n, [&](size_t i) {
    // (Grads being read are not in the list yet, and another thread may be writing them: they take the chain below.)
    const at::TensorList given = grads.read == nullptr ? grads.given : at::TensorList();
    for (at::TensorList list : {at::TensorList(l.params), given, at::TensorList(l.exp_avgs),
                                at::TensorList(l.exp_avg_sqs), at::TensorList(l.max_exp_avg_sqs),
                                at::TensorList(l.state_steps), at::TensorList(l.master_params)}) {
      prefetch_impl(impl_at(list, i + kPrefetchAhead));
      prefetch_storage(list, i + kPrefetchAhead / 2);
    }
    if (grads.read != nullptr) {  // the chain param -> autograd metadata -> grad, in stages
      if (const char* p = impl_at(l.params, i + kPrefetchAhead / 2)) {
        const auto* meta = reinterpret_cast<const char*>(reinterpret_cast<const c10::TensorImpl*>(p)->autograd_meta());
        if (meta != nullptr) {
          __builtin_prefetch(meta);
          __builtin_prefetch(meta + 63);  // the grad's handle (offset 40 in torch 2.13's AutogradMeta)
        }
      }
      if (const char* p = impl_at(l.params, i + kPrefetchAhead / 4)) {
        const char* g = grad_impl(p);
        __builtin_prefetch(g, 1);  // the refcount, which the read below increments (a locked, serializing add)
        prefetch_impl(g);
      }
      if (l.params[i].defined()) {  // else check_tensor names it
        (*grads.read)[i] = l.params[i].unsafeGetTensorImpl()->grad();
        if (!(*grads.read)[i].defined()) {
          missing_grad = true;
          return;
        }
      }
    }
    const std::array<const at::Tensor*, kNumRows> arrays = arrays_of(l, gl, i);
    check_tensor(who, l, i, arrays, where);
    on_tensor(i, arrays);
  });
  return !missing_grad;
}

// Drops the references a pass took to the grads it read, where their TensorImpls are cold again (the data pass
// evicted them): a prefetched loop in every thread, not the vector's serial destructor.
inline void release_read_grads(std::vector<at::Tensor>& read) {
  over_tensor_ranges(read.size(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + static_cast<int64_t>(kPrefetchAhead) < end) {
        if (const char* g = impl_at(read, i + kPrefetchAhead)) __builtin_prefetch(g, 1);  // the refcount
      }
      read[i].reset();
    }
  });
}

// ---- layout staging (NOTE [flat layout]) -------------------------------------------------------------------------

// Flat stand-ins for the arrays of one tensor that is not flat as it stands: the param's own layout where it is
// dense (contiguous with `row_major`), else a contiguous copy; every other array as it stands where it has that
// layout, else a copy in it. What the kernel writes is copied back by copy_back(). Every stand-in lives until then
// (on a device, a copy freed before the launch could be handed to the next copy before the kernel reads it).
struct Staged {
  std::array<at::Tensor, kNumRows> original;  // defined where `flat` is a copy
  std::array<at::Tensor, kNumRows> flat;      // what the kernel walks (undefined: the row is absent)

  Staged(const std::array<const at::Tensor*, kNumRows>& a, bool row_major) {
    const at::Tensor& p = *a[kParamRow];
    const bool dense = row_major ? p.is_contiguous() : p.is_non_overlapping_and_dense();
    flat[kParamRow] = dense ? p : p.contiguous();
    if (!dense) original[kParamRow] = p;
    const at::Tensor& layout = flat[kParamRow];
    for (int row = 1; row < kNumRows; ++row) {
      if (a[row] == nullptr) continue;
      const at::Tensor& t = *a[row];
      if (same_layout(t, layout)) {
        flat[row] = t;
      } else {
        flat[row] = at::empty_strided(layout.sizes(), layout.strides(), t.options());
        flat[row].copy_(t);
        original[row] = t;
      }
    }
  }

  void* data(int row) const { return flat[row].defined() ? flat[row].data_ptr() : nullptr; }

  // `grad_written`: the kernel stored the grad back (unscaled); the other arrays but the grad are always written.
  void copy_back(bool grad_written) {
    for (int row = 0; row < kNumRows; ++row) {
      if (original[row].defined() && (row != kGradRow || grad_written)) original[row].copy_(flat[row]);
    }
  }
};

}  // namespace fused_adam
