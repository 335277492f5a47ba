// The torch side of the native boundary, shared by the CPU binding (csrc/ops.cpp, csrc/cpu) and the CUDA binding:
// a partition's lists held in C++ (TensorLists), the one per-tensor check pass (errors name the list, the index and
// the value, and are raised before anything is written), grads read from the params' autograd metadata, and the
// layout-staging helper (arrays that cannot be walked as one flat range run on copies, copied back).
// Header-only; needs ATen (not the CUDA runtime).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <array>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <random>
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
// The StorageImpl's data pointer, deleter and size span its first 0x3a bytes: two lines unless 64-byte aligned.
inline void prefetch_storage_impl(const c10::TensorImpl* t) {
  const auto* s = reinterpret_cast<const char*>(t->unsafe_storage().unsafeGetStorageImpl());
  if (s == nullptr) return;
  __builtin_prefetch(s);
  __builtin_prefetch(s + 0x3f);
}

inline void prefetch_storage(at::TensorList list, size_t i) {
  if (const char* impl = impl_at(list, i)) prefetch_storage_impl(reinterpret_cast<const c10::TensorImpl*>(impl));
}

// Each param's grad handle, looked up once (TensorImpl::grad() is two calls, one virtual) kAhead tensors ahead of
// the tensor being read and kept until it is read: the prefetch stages and the read share the lookup. The handles
// stay put while the GIL is held. Null: the param is None.
struct GradRing {
  static constexpr size_t kAhead = kPrefetchAhead / 4;
  std::array<const at::Tensor*, 2 * kAhead> slot{};

  void look_up(at::TensorList params, size_t j) {
    const char* p = impl_at(params, j);
    slot[j % slot.size()] = p == nullptr ? nullptr : &reinterpret_cast<const c10::TensorImpl*>(p)->grad();
  }
  // Before the loop over [begin, end): its first kAhead tensors.
  void start(at::TensorList params, size_t begin, size_t end) {
    for (size_t j = begin; j < std::min(begin + kAhead, end); ++j) look_up(params, j);
  }
  const at::Tensor* operator[](size_t j) const { return slot[j % slot.size()]; }
  const c10::TensorImpl* impl(size_t j) const {  // (UndefinedTensorImpl's for a param without a grad)
    const at::Tensor* g = (*this)[j];
    return g == nullptr ? nullptr : g->unsafeGetTensorImpl();
  }
};

// With many tensors the per-tensor loops run in parallel too: two threads keep twice the misses in flight
// (10,000 tensors: the loops take ~2.5 ms on one). Below kTensorsPerThread tensors a thread, a loop stays serial.
constexpr int64_t kTensorsPerThread = 1024;

// g(begin, end) over the tensors [0, n): in every thread's range when there are enough tensors, else in one call.
template <typename G>
void over_tensor_ranges(size_t n, const G& g, int64_t per_thread = kTensorsPerThread) {
  const int64_t count = static_cast<int64_t>(n);
  if (count >= 2 * per_thread && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, count, per_thread, g);
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

inline void check_storage(const char* who, const at::Tensor& t, const char* list, size_t i);

// Array `row` of tensor i against params[i] and the first tensors (row kNumRows: its step count).
inline void check_row(const char* who, const TensorLists& l, size_t i, const std::array<const at::Tensor*, kNumRows>& a,
                      int row, const Placement& where) {
  const at::Tensor& p = l.params[i];
  switch (row) {
    case kParamRow:
      TORCH_CHECK(p.defined(), who, ": params[", i, "] is None");
      TORCH_CHECK(p.layout() == at::kStrided, who, ": params[", i, "] has layout ", p.layout(),
                  "; only strided (dense) tensors are supported");
      TORCH_CHECK(p.device() == where.device, who, ": params[", i, "] is on ", p.device(), ", expected ", where.device);
      TORCH_CHECK_TYPE(p.scalar_type() == l.params[0].scalar_type(), who, ": params[", i, "] has dtype ",
                       p.scalar_type(), ", but params[0] has dtype ", l.params[0].scalar_type(),
                       "; one call takes one dtype");
      return;
    case kGradRow:
      return check_array(who, *a[kGradRow], kGradRow, i, p, &p, kParamRow, i, where);
    case kMasterRow:
      if (a[kMasterRow] != nullptr) check_array(who, *a[kMasterRow], kMasterRow, i, p, nullptr, 0, 0, where);
      return;
    case kNumRows: {  // the step count
      const at::Tensor& step = l.state_steps[i];
      TORCH_CHECK(step.defined(), who, ": state_steps[", i, "] is None");
      TORCH_CHECK(step.device() == where.steps && step.scalar_type() == at::kFloat && step.numel() == 1, who,
                  ": state_steps[", i, "] must be a one-element float32 tensor on ", where.steps, ", got ",
                  step.scalar_type(), " of shape ", step.sizes(), " on ", step.device());
      // read (check_counts) and written by the step: its storage must hold it (a freed step buffer)
      return check_storage(who, step, "state_steps", i);
    }
    default:  // the moments
      if (a[row] != nullptr) check_array(who, *a[row], row, i, p, &l.exp_avgs[0], kExpAvgRow, 0, where);
  }
}

// Same element -> memory offset map as `like` (strides of size-1 dims do not matter).
inline bool same_layout(const at::Tensor& t, const at::Tensor& like) {
  const c10::IntArrayRef sizes = t.sizes(), strides = t.strides(), like_strides = like.strides();
  if (strides.size() != like_strides.size()) return false;
  for (size_t d = 0; d < strides.size(); ++d) {
    if (sizes[d] != 1 && strides[d] != like_strides[d]) return false;
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

// The grads a pass sees: given (a list the caller keeps alive), or read from each param's .grad (NOTE [grads read in
// C++]) and, where `hold` is given, held there for the rest of the step (a caller that releases the GIL).
struct Grads {
  at::TensorList given;
  bool from_params = false;
  std::vector<at::Tensor>* hold = nullptr;
};

// Tensor i's grad as a pass sees it: held, read from the param's autograd metadata (the handle there, which stays
// put while the GIL is held), or given.
inline const at::Tensor& grad_of(const TensorLists& l, const Grads& grads, size_t i) {
  if (grads.hold != nullptr) return (*grads.hold)[i];
  return grads.from_params ? l.params[i].unsafeGetTensorImpl()->grad() : grads.given[i];
}

// The arrays of tensor i (null: absent), in Row order.
inline std::array<const at::Tensor*, kNumRows> arrays_of(const TensorLists& l, at::TensorList grads, size_t i) {
  return {&l.params[i], i < grads.size() ? &grads[i] : nullptr, &l.exp_avgs[i], &l.exp_avg_sqs[i],
          l.amsgrad() ? &l.max_exp_avg_sqs[i] : nullptr, l.master() ? &l.master_params[i] : nullptr};
}

// Array `row` of tensor i, which the step writes, has no two elements at one address.
inline void check_distinct_elements(const char* who, const at::Tensor& t, int row, size_t i) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, who, ": ", kRowList[row], "[", i,
              "] has elements that share memory (shape ", t.sizes(), ", strides ", t.strides(),
              "): the step writes it, so each element needs its own");
}

// Tensor i's memory: its storage holds its elements (a storage resized under it, `untyped_storage().resize_(0)` as
// FSDP does to free a param, would otherwise be read and written out of bounds), and, for an array the step writes
// (all but the grad), no two elements share an address (an expanded tensor: torch's in-place ops refuse it, and a
// step would find out only after writing other arrays).
// The bytes a strided tensor's elements reach in its storage, and the bytes the storage holds (need <= have, and
// a storage with memory, or the tensor is read out of bounds). Empty and meta tensors read nothing: {0, 0}.
inline std::pair<uint64_t, uint64_t> storage_extent(const at::Tensor& t) {
  if (t.numel() == 0 || t.is_meta()) return {0, 0};  // (meta tensors have no memory to read)
  int64_t last = t.storage_offset();
  const c10::IntArrayRef sizes = t.sizes(), strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  const c10::Storage& storage = t.unsafeGetTensorImpl()->unsafe_storage();
  const uint64_t have = storage.data() != nullptr ? storage.nbytes() : 0;
  return {static_cast<uint64_t>(last + 1) * t.element_size(), have};
}

inline void check_storage(const char* who, const at::Tensor& t, const char* list, size_t i) {
  const auto [need, have] = storage_extent(t);
  TORCH_CHECK(need <= have, who, ": ", list, "[", i, "] needs ", need, " bytes of storage for its ", t.numel(),
              " elements, but its storage holds ", have, " (was the storage resized or freed under it?)");
}

inline void check_memory(const char* who, const at::Tensor& t, int row, size_t i) {
  check_storage(who, t, kRowList[row], i);
  if (row != kGradRow && t.numel() != 0 && !t.is_meta()) check_distinct_elements(who, t, row, i);
}

// Array `row` of tensor i shares no memory with its other arrays (a state loaded as the same tensor as another, a
// grad set to its param): the step reads and writes them element by element, where torch's for-loop writes one
// whole array before it reads the next, so the two would disagree, and neither would be an Adam step.
inline void check_apart(const char* who, const std::array<const at::Tensor*, kNumRows>& a, int row, size_t i) {
  for (int other = 0; other < kNumRows; ++other) {
    if (other == row || a[other] == nullptr || a[other]->numel() == 0 || a[row]->numel() == 0) continue;
    const at::MemOverlapStatus status = at::get_overlap_status(*a[row], *a[other]);
    const int lo = std::min(row, other), hi = std::max(row, other);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, who, ": ",
                kRowList[lo], "[", i, "] and ", kRowList[hi], "[", i, "] share memory; each needs its own");
  }
}

// ---- the pass, incremental ---------------------------------------------------------------------------------------

// NOTE [pass cache]: the per-tensor pass runs every step over every tensor of a partition; what it finds rarely
// changes. So a partition keeps, per array, what the last pass saw: the data address and a digest of everything
// else a check reads (the storage's size and deleter, offset, shape, strides, dtype, device, dispatch keys). A step
// compares each array against it (a few loads from the TensorImpl and StorageImpl, which the pass reads anyway, and
// no calls) and runs the full checks, which word the errors, only for the tensors where something moved: a `.data`
// replaced, a grad set to a new tensor, a storage resized or made copy-on-write, a shape or stride changed in place.
// The first pass of a partition checks everything. The step counts are a seventh row (their float's address).
constexpr int kStepRow = kNumRows;
// The compare touches ~24 cache lines a tensor (seven TensorImpls, their StorageImpls, the autograd metadata) and
// writes nothing: a second thread pays off from a few hundred tensors.
constexpr int64_t kScanTensorsPerThread = 128;
constexpr int kCacheRows = kNumRows + 1;

struct Probe {
  uint64_t digest;      // 0: not checkable this way (no storage, a Python subclass): take the full checks
  int64_t addr;         // the first element's address (0 when empty)
  const void* storage;  // the StorageImpl
};

// One field's term of a digest: the field times an odd key of its position, mod 2^64 (one multiply; the terms are
// summed, so a probe's multiplies overlap). A change of one field always changes the digest (an odd key is
// invertible mod 2^64). The keys are drawn at random when the library loads (digests never leave the process), so a
// change of several fields, which cancels where sum(delta_i * key_i) = 0 mod 2^64, goes unseen with probability at
// most 2^-(63 - v) whatever the change (2^v: the largest power of two dividing every delta), where fixed keys would
// let a crafted view (as_strided, set_) solve for a cancelling change.
constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
constexpr int kDigestKeyCount = 6 + 2 * 8;  // the fixed fields, then a size and a stride for up to 8 dims
struct DigestKeys {
  uint64_t seed;
  std::array<uint64_t, kDigestKeyCount> key;
  DigestKeys() {
    try {
      std::random_device device;
      seed = static_cast<uint64_t>(device()) << 32 ^ device();
    } catch (...) {  // (no entropy source: the clock and where this object lives, which ASLR moves)
      seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
             reinterpret_cast<uintptr_t>(this);
    }
    for (int i = 0; i < kDigestKeyCount; ++i) key[i] = at(i);
  }
  uint64_t at(uint64_t position) const { return splitmix64(seed + position) | 1; }
};
inline const DigestKeys digest_keys;
inline uint64_t term(uint64_t v, uint64_t position) {
  return v * (position < kDigestKeyCount ? digest_keys.key[position] : digest_keys.at(position));
}

inline Probe probe(const c10::TensorImpl* t) {
  const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl();
  const c10::DispatchKeySet keys = t->key_set();
  if (s == nullptr || keys.has(c10::DispatchKey::Python)) return {0, 0, nullptr};
  const at::Device device = t->device();
  const caffe2::TypeMeta dtype = t->dtype();
  const int64_t numel = t->numel(), offset = t->storage_offset();
  const c10::IntArrayRef sizes = t->sizes(), strides = t->strides();
  const auto* data = static_cast<const char*>(s->data_ptr().get());
  uint64_t h = term(keys.raw_repr(), 0) +
               term(static_cast<uint64_t>(dtype.toScalarType()) |
                        static_cast<uint64_t>(static_cast<uint8_t>(device.type())) << 8 |
                        static_cast<uint64_t>(static_cast<uint8_t>(device.index())) << 16 |
                        static_cast<uint64_t>(sizes.size()) << 24, 1) +
               term(s->nbytes(), 2) +
               term(reinterpret_cast<uintptr_t>(s->data_ptr().get_deleter()), 3) +  // (copy-on-write swaps it)
               term(static_cast<uint64_t>(offset), 4) + term(static_cast<uint64_t>(numel), 5);
  for (size_t d = 0; d < sizes.size(); ++d) {
    h += term(static_cast<uint64_t>(sizes[d]), 6 + 2 * d) + term(static_cast<uint64_t>(strides[d]), 7 + 2 * d);
  }
  return {h | 1, numel == 0 ? 0 : reinterpret_cast<int64_t>(data + offset * static_cast<int64_t>(dtype.itemsize())), s};
}

// A set of StorageImpl addresses: open addressing, linear probing, 0 marks a free slot.
class StorageSet {
 public:
  void clear() { slots_.clear(); }
  // (`storages` sorted and without repeats: the table is sized by their count, at most 2/3 full.)
  void assign(const std::vector<const void*>& storages) {
    int bits = 4;
    while ((size_t{1} << bits) * 2 < 3 * storages.size()) ++bits;
    shift_ = 64 - bits;
    slots_.assign(size_t{1} << bits, 0);
    for (const void* s : storages) {
      const auto p = reinterpret_cast<uintptr_t>(s);
      if (p == 0) continue;
      for (size_t h = slot(p);; h = (h + 1) & (slots_.size() - 1)) {
        if (slots_[h] == p) break;
        if (slots_[h] == 0) {
          slots_[h] = p;
          break;
        }
      }
    }
  }
  void prefetch(const void* s) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[slot(reinterpret_cast<uintptr_t>(s))]);
  }
  bool contains(const void* s) const {
    const auto p = reinterpret_cast<uintptr_t>(s);
    if (slots_.empty() || p == 0) return false;
    for (size_t h = slot(p);; h = (h + 1) & (slots_.size() - 1)) {
      if (slots_[h] == p) return true;
      if (slots_[h] == 0) return false;
    }
  }

 private:
  size_t slot(uintptr_t p) const { return static_cast<size_t>((p >> 4) * 0x9E3779B97F4A7C15ull >> shift_); }
  std::vector<uintptr_t> slots_;
  int shift_ = 60;
};

// A partition's NOTE [pass cache], kept with its lists. One pass at a time (`mutex`): the CPU step releases the GIL.
struct PassCache {
  struct Seen {  // one tensor's arrays as last checked: two cache lines, read in order by the pass
    uint64_t digest[kCacheRows];  // 0: not checked yet, or absent
    int64_t addr[kCacheRows];     // data addresses (kStepRow: the step count's)
  };
  size_t n = 0;
  std::vector<Seen> seen;        // n
  // n: the addresses the scan found where only an address moved (a new grad like the last), taken into `seen` once
  // every check has passed, and such a grad's StorageImpl (NOTE [arrays apart]): written and read only for those
  // rows (a static step does not touch it), one cache line a tensor
  struct alignas(64) Moved {
    int64_t addr[kCacheRows];
    const void* grad_storage;
  };
  std::vector<Moved> moved_to;
  std::vector<int64_t> numel;    // n
  std::vector<uint8_t> not_flat; // n: the arrays do not share the param's flat layout (NOTE [flat layout])
  int64_t not_flat_count = 0;
  int64_t misaligned = 0;        // addresses in rows 0..5 that are not 16-byte aligned
  // What every tensor was checked against: the first tensors' dtypes and the placement. When one of them changes
  // (`params[0].data = <other dtype>`), every tensor is checked again.
  std::optional<std::array<int64_t, 4>> context;
  // NOTE [arrays apart]: whether the last sweep is current, and the storages of the arrays the step writes as it
  // found them (a new grad in one of them is checked in full, and swept).
  bool apart = false;
  StorageSet written;
  std::mutex mutex;

  void reset(size_t count) {
    n = count;
    context.reset();
    apart = false;
    written.clear();
    seen.assign(n, Seen{});
    moved_to.resize(n);
    numel.assign(n, -1);  // (none seen yet: the first pass resizes nothing)
    not_flat.assign(n, 0);
    not_flat_count = misaligned = 0;
  }
  bool flat() const { return not_flat_count == 0; }
  bool aligned() const { return misaligned == 0; }
  void* data(size_t i, int row) const { return reinterpret_cast<void*>(seen[i].addr[row]); }
  float* step(size_t i) const { return static_cast<float*>(data(i, kStepRow)); }
};

// The storage's memory is its own allocation (the allocators' DataPtr: context == data), which no other storage
// reaches into; from_blob, numpy, DLPack and copy-on-write storages wrap memory that another may share.
inline bool owns_memory(const void* storage) {
  const c10::DataPtr& d = static_cast<const c10::StorageImpl*>(storage)->data_ptr();
  return d.get_context() == d.get();
}

// NOTE [arrays apart]: the arrays a step writes (a param, its moments and master, its step count) of one param
// share no memory with any array of another param of the partition, its grad included. A kernel updates every
// param of a call at once (in chunks, in threads, on a GPU in any order), where torch's for-loop updates one param
// after the other: with a grad set to another param, or two params overlapping, the two disagree, and the kernel's
// result depends on timing. Grads may share memory with each other: a step reads them. (Under grad_scale a step
// also writes them back unscaled: a grad shared by two params is then unscaled twice, in an order a kernel does not
// fix, as by torch's fused step; not checked, which would take a set of every grad's storage at every step.)
// As at::get_overlap_status, only arrays whose elements fill one byte range (non-overlapping and dense) are
// compared; the others run on staged copies (NOTE [flat layout]).
// After a pass's checks and commit: the byte ranges from the cache, sorted, swept once (O(n log n), only where
// something moved beyond a grad's address); then the storages of the written arrays, which the next passes look a
// moved grad up in (one probe: checked in full and swept if found). A conflict raises naming both arrays, and the
// cache is dropped (the next pass checks everything). The lookup finds a grad in a written array's storage, not in
// memory that two storages share (from_blob, numpy, DLPack over another tensor's memory): so a moved grad whose
// storage does not own its memory (owns_memory) is checked in full and swept instead.
inline void check_arrays_apart(const char* who, const TensorLists& l, const Grads& grads, const Placement& where,
                               PassCache& c) {
  c.apart = false;
  c.written.clear();
  if (c.n == 0 || where.device.is_meta()) {  // (meta tensors have no memory)
    c.apart = true;
    return;
  }
  struct Span {
    int64_t lo, hi;
    uint32_t i;
    int row;
    bool written() const { return row != kGradRow; }
  };
  const int64_t param_bytes = l.params[0].element_size(), state_bytes = l.exp_avgs[0].element_size();
  const int64_t row_bytes[kCacheRows] = {param_bytes, param_bytes, state_bytes, state_bytes, state_bytes, 4, 4};
  std::vector<Span> spans;
  spans.reserve(c.n * 5);
  std::vector<const void*> storages;
  storages.reserve(c.n * 4);
  for (size_t i = 0; i < c.n; ++i) {
    std::array<const at::Tensor*, kNumRows> a = arrays_of(l, at::TensorList(), i);
    a[kGradRow] = &grad_of(l, grads, i);
    for (int r = 0; r < kCacheRows; ++r) {
      const at::Tensor* t = r == kStepRow ? &l.state_steps[i] : a[r];
      if (t == nullptr) continue;
      if (r != kGradRow) storages.push_back(t->unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
      const int64_t numel = r == kStepRow ? 1 : c.numel[i];
      if (numel == 0 || (c.not_flat[i] && r < kNumRows && !t->is_non_overlapping_and_dense())) continue;
      const int64_t lo = c.seen[i].addr[r];
      spans.push_back({lo, lo + numel * row_bytes[r], static_cast<uint32_t>(i), r});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.lo < y.lo; });
  const Span* reach = nullptr;          // the span reaching furthest so far
  const Span* written_reach = nullptr;  // the written span reaching furthest so far
  for (const Span& s : spans) {
    // s overlaps an earlier span exactly when it starts before the furthest one ends (which then overlaps it too)
    const Span* other = s.written() ? reach : written_reach;
    if (other != nullptr && s.lo < other->hi) {
      const Span& x = other->i < s.i || (other->i == s.i && other->row < s.row) ? *other : s;
      const Span& y = &x == &s ? *other : s;
      auto name = [](int row) { return row == kStepRow ? "state_steps" : kRowList[row]; };
      c.reset(c.n);
      TORCH_CHECK(false, who, ": ", name(x.row), "[", x.i, "] and ", name(y.row), "[", y.i,
                  "] share memory: a step updates every param of a call at once, where torch's for-loop updates one "
                  "after the other, so what a step writes (a param, its states, its step count) needs memory apart "
                  "from every other param's arrays");
    }
    if (reach == nullptr || s.hi > reach->hi) reach = &s;
    if (s.written() && (written_reach == nullptr || s.hi > written_reach->hi)) written_reach = &s;
  }
  std::sort(storages.begin(), storages.end());
  storages.erase(std::unique(storages.begin(), storages.end()), storages.end());
  c.written.assign(storages);
  c.apart = true;
}

struct PassResult {
  bool complete;       // false: a grad was read and a param has none (nothing checked, nothing cached)
  uint32_t moved_rows; // bit r: an address in row r changed (bit kStepRow: a step count's)
  bool resized;        // a param's element count changed (its address may not have): a chunk table is stale
};

// The pass: every tensor compared against the cache, the moved arrays checked in full (throwing the first bad
// tensor's error, before the caller writes anything) and cached again. `row_major`: stochastic rounding's layout
// rule (NOTE [flat layout]). Afterwards `c` holds every tensor's addresses, numel and flatness.
inline PassResult checked_pass(const char* who, const TensorLists& l, const Grads& grads, const Placement& where,
                               bool row_major, PassCache& c) {
  const size_t n = l.size();
  if (c.n != n) c.reset(n);
  if (grads.hold != nullptr) grads.hold->assign(n, at::Tensor());
  constexpr uint64_t kAllRows = (1u << kCacheRows) - 1;
  constexpr int kLight = 8;
  std::atomic<bool> missing_grad{false};
  // Moved tensors as (i << 16 | light << 8 | rows): bit r of rows, array r differs from what was cached beyond its
  // address and is checked in full (a param that did takes every row); bit r of light, only its address moved.
  std::vector<std::vector<uint64_t>> moved_by_range;
  std::mutex moved_lock;
  over_tensor_ranges(n, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> moved;
    GradRing ring;
    if (grads.from_params) ring.start(l.params, begin, end);
    for (size_t i = begin; i < static_cast<size_t>(end); ++i) {
      // (Prefetches: NOTE [cpu per-tensor cost]. The grads, where read, take the chain below.)
      for (at::TensorList list : {at::TensorList(l.params), grads.given, at::TensorList(l.exp_avgs),
                                  at::TensorList(l.exp_avg_sqs), at::TensorList(l.max_exp_avg_sqs),
                                  at::TensorList(l.state_steps), at::TensorList(l.master_params)}) {
        prefetch_impl(impl_at(list, i + kPrefetchAhead));
        prefetch_storage(list, i + kPrefetchAhead / 2);
      }
      if (grads.from_params) {  // param -> autograd metadata -> grad -> its storage, in stages
        if (const char* p = impl_at(l.params, i + kPrefetchAhead / 2)) {
          const auto* meta = reinterpret_cast<const char*>(reinterpret_cast<const c10::TensorImpl*>(p)->autograd_meta());
          if (meta != nullptr) {
            __builtin_prefetch(meta);
            __builtin_prefetch(meta + 63);  // the grad's handle (offset 40 in torch 2.13's AutogradMeta)
          }
        }
        if (i + GradRing::kAhead < static_cast<size_t>(end)) {
          ring.look_up(l.params, i + GradRing::kAhead);
          if (const auto* g = reinterpret_cast<const char*>(ring.impl(i + GradRing::kAhead))) {
            if (grads.hold != nullptr) __builtin_prefetch(g, 1);  // the refcount, which the hold increments
            prefetch_impl(g);
          }
        }
        if (i + GradRing::kAhead / 2 < static_cast<size_t>(end)) {
          if (const c10::TensorImpl* g = ring.impl(i + GradRing::kAhead / 2)) prefetch_storage_impl(g);
        }
      }
      // Every array present must still be what was cached (an undefined one takes the full checks, which name it).
      uint64_t rows = kAllRows;
      if (l.params[i].defined()) {
        const at::Tensor& g = grads.from_params ? *ring[i] : grads.given[i];
        if (grads.from_params && !g.defined()) {
          missing_grad = true;
          return;
        }
        if (grads.hold != nullptr) (*grads.hold)[i] = g;
        const at::Tensor* arrays[kCacheRows] = {&l.params[i], &g, &l.exp_avgs[i], &l.exp_avg_sqs[i],
                                                l.amsgrad() ? &l.max_exp_avg_sqs[i] : nullptr,
                                                l.master() ? &l.master_params[i] : nullptr, &l.state_steps[i]};
        const PassCache::Seen& seen = c.seen[i];
        const void* param_storage = nullptr;
        rows = 0;
        for (int r = 0; r < kCacheRows; ++r) {
          if (arrays[r] == nullptr) continue;
          if (!arrays[r]->defined()) {
            rows |= kAllRows;
            continue;
          }
          const Probe pr = probe(arrays[r]->unsafeGetTensorImpl());
          if (r == kParamRow) param_storage = pr.storage;
          const bool addr_moved = pr.addr != seen.addr[r];
          // A grad in its param's storage (never legitimate), or moved into memory its storage does not own (which
          // another storage may reach, NOTE [arrays apart]), takes the full checks, which say whether they overlap.
          if (pr.digest != 0 && pr.digest == seen.digest[r] &&
              !(r == kGradRow && (pr.storage == param_storage || (addr_moved && !owns_memory(pr.storage))))) {
            // Only the address moved (a new grad like the last, a `.data` of the same kind): it passes the same
            // checks, and the address is taken once every check has passed.
            if (addr_moved) {
              rows |= uint64_t{1} << (r + kLight);
              c.moved_to[i].addr[r] = pr.addr;
              if (r == kGradRow) c.moved_to[i].grad_storage = pr.storage;  // (NOTE [arrays apart], below)
            }
          } else {
            rows |= r == kParamRow ? kAllRows : uint64_t{1} << r;
          }
        }
      }
      if (rows != 0) moved.push_back(static_cast<uint64_t>(i) << 16 | rows);
    }
    std::lock_guard<std::mutex> lock(moved_lock);
    moved_by_range.push_back(std::move(moved));
  }, kScanTensorsPerThread);
  if (missing_grad) {
    if (grads.hold != nullptr) grads.hold->clear();
    return {false, 0, false};
  }
  // In tensor order (the first bad tensor's error, whichever thread saw it): each range's list is, and the ranges
  // are disjoint, so they are put in order of their first entries (sorting every entry cost ~0.1 ms at 10,000).
  std::sort(moved_by_range.begin(), moved_by_range.end(), [](const auto& x, const auto& y) {
    return (x.empty() ? UINT64_MAX : x.front()) < (y.empty() ? UINT64_MAX : y.front());
  });
  std::vector<uint64_t> moved;
  for (const auto& m : moved_by_range) moved.insert(moved.end(), m.begin(), m.end());
  if (moved.empty()) return {true, 0, false};
  // NOTE [arrays apart]: a grad whose address moved into the storage of an array the step writes is checked in
  // full, and swept. (A loop of its own over the moved grads, each lookup prefetched ahead: in the scan, a lookup
  // would wait at the end of the grad's chain of misses.)
  if (c.apart) {
    constexpr uint64_t kLightGrad = uint64_t{1} << (kGradRow + kLight);
    constexpr size_t kAhead = 8;
    for (size_t k = 0; k < moved.size(); ++k) {
      if (k + kAhead < moved.size() && (moved[k + kAhead] & kLightGrad)) {
        c.written.prefetch(c.moved_to[moved[k + kAhead] >> 16].grad_storage);
      }
      if ((moved[k] & kLightGrad) && c.written.contains(c.moved_to[moved[k] >> 16].grad_storage)) {
        moved[k] = (moved[k] & ~kLightGrad) | uint64_t{1} << kGradRow;
      }
    }
  }
  // Every tensor was checked against the first tensors' dtypes and the placement: if those moved, check them all.
  const std::array<int64_t, 4> context{
      l.params[0].defined() ? static_cast<int64_t>(l.params[0].scalar_type()) : -1,
      l.exp_avgs[0].defined() ? static_cast<int64_t>(l.exp_avgs[0].scalar_type()) : -1,
      static_cast<int64_t>(where.device.type()) << 8 | static_cast<uint8_t>(where.device.index()),
      static_cast<int64_t>(where.steps.type()) << 8 | static_cast<uint8_t>(where.steps.index())};
  if (c.context != context) {
    moved.resize(n);
    for (size_t i = 0; i < n; ++i) moved[i] = static_cast<uint64_t>(i) << 16 | kAllRows;
  }

  // The arrays of tensor i, its grad where the scan found it (grad_of).
  auto arrays = [&](size_t i) {
    std::array<const at::Tensor*, kNumRows> a = arrays_of(l, at::TensorList(), i);
    a[kGradRow] = &grad_of(l, grads, i);
    return a;
  };
  for_each_tensor(moved.size(), [&](size_t k) {
    if (!(moved[k] & kAllRows)) return;  // only addresses moved: nothing to check
    const size_t i = moved[k] >> 16;
    const auto a = arrays(i);
    for (int r = 0; r < kCacheRows; ++r) {
      if (!(moved[k] & (uint64_t{1} << r))) continue;
      check_row(who, l, i, a, r, where);
      if (r < kNumRows && a[r] != nullptr) {
        check_memory(who, *a[r], r, i);
        check_apart(who, a, r, i);
      }
    }
  });

  // Everything passed: cache the moved arrays (materializing copy-on-write storages, as a write would).
  std::atomic<uint32_t> moved_rows{0};
  std::atomic<bool> any_resized{false};
  std::atomic<int64_t> d_not_flat{0}, d_misaligned{0};
  over_tensor_ranges(moved.size(), [&](int64_t begin, int64_t end) {
    uint32_t changed = 0;
    bool resized = false;
    int64_t not_flat = 0, misaligned = 0;
    for (int64_t k = begin; k < end; ++k) {
      const size_t i = moved[k] >> 16;
      const bool full = (moved[k] & kAllRows) != 0;
      std::array<const at::Tensor*, kNumRows> a{};
      if (full) a = arrays(i);
      for (int r = 0; r < kCacheRows; ++r) {
        if (!(moved[k] & (uint64_t{1} << r))) {
          if (moved[k] & (uint64_t{1} << (r + kLight))) {
            int64_t& addr = c.seen[i].addr[r];
            const int64_t now = c.moved_to[i].addr[r];
            if (r < kNumRows) {
              misaligned += static_cast<int64_t>((now & 15) != 0) - static_cast<int64_t>((addr & 15) != 0);
            }
            addr = now;
            changed |= 1u << r;
          }
          continue;
        }
        const at::Tensor* t = r == kStepRow ? &l.state_steps[i] : a[r];
        uint64_t& digest = c.seen[i].digest[r];
        int64_t& addr = c.seen[i].addr[r];
        const int64_t before = addr;
        if (r < kNumRows && (before & 15) != 0) --misaligned;
        if (t == nullptr) {
          digest = 0;
          addr = 0;
        } else {
          if (t->numel() != 0 && !t->is_meta()) t->mutable_data_ptr();
          const Probe pr = probe(t->unsafeGetTensorImpl());
          digest = pr.digest;
          addr = pr.addr;
          if (r < kNumRows && (addr & 15) != 0) ++misaligned;
        }
        if (addr != before) changed |= 1u << r;
      }
      if (!full) continue;  // only addresses moved: the same shapes and strides
      // A param resized in place of its address (`p.data = p.data[:k]`, its states alike) moves no address, but a
      // chunk table made for the old size would step the wrong elements: PassResult::resized says so.
      if (c.numel[i] >= 0 && a[kParamRow]->numel() != c.numel[i]) resized = true;
      c.numel[i] = a[kParamRow]->numel();
      const uint8_t nf = c.numel[i] != 0 && !is_flat(a, row_major);
      not_flat += static_cast<int64_t>(nf) - c.not_flat[i];
      c.not_flat[i] = nf;
    }
    moved_rows |= changed;
    if (resized) any_resized = true;
    d_not_flat += not_flat;
    d_misaligned += misaligned;
  });
  c.not_flat_count += d_not_flat;
  c.misaligned += d_misaligned;
  c.context = context;
  // NOTE [arrays apart]: swept again when an array moved in full, or any array but a grad moved at all.
  constexpr uint64_t kLightNotGrad = (kAllRows & ~(uint64_t{1} << kGradRow)) << kLight;
  bool sweep = !c.apart;
  for (size_t k = 0; k < moved.size() && !sweep; ++k) sweep = (moved[k] & (kAllRows | kLightNotGrad)) != 0;
  if (sweep) check_arrays_apart(who, l, grads, where, c);
  return {true, moved_rows.load(), any_resized.load()};
}

// After checked_pass, for step counts on the host: each a number >= 0, read where it lives before anything is
// written (a count of -1 makes both bias corrections 0, and the step divide by zero; NaN makes every element NaN;
// torch's for-loop raises ZeroDivisionError halfway or writes the NaNs). See checks_after_pass.
inline void check_counts(const char* who, const PassCache& c) {
  for (size_t i = 0; i < c.n; ++i) {
    const float count = *c.step(i);
    TORCH_CHECK_VALUE(count >= 0.0f, who, ": state_steps[", i, "] is ", count, "; a step count is a number >= 0");
  }
}

// After checked_pass, for a step that writes the grads back (unscaled by grad_scale): no grad has two elements at
// one address (check_memory spares grads, which a step only reads otherwise). Such a grad never has its param's
// layout, so only the tensors that are not flat are looked at, at every step that unscales: the pass cache does
// not know whether the last step did.
inline void check_written_grads(const char* who, const TensorLists& l, const Grads& grads, const PassCache& c) {
  if (c.flat()) return;
  for (size_t i = 0; i < c.n; ++i) {
    if (c.not_flat[i]) check_distinct_elements(who, grad_of(l, grads, i), kGradRow, i);
  }
}

// What every step checks after checked_pass and before it writes anything, whichever binding runs it: the grads
// when the step writes them back (`grads_written`: unscaled by grad_scale), the step counts when they live on the
// host (`host_counts`: not capturable).
inline void checks_after_pass(const char* who, const TensorLists& l, const Grads& grads, const PassCache& c,
                              bool grads_written, bool host_counts) {
  if (grads_written) check_written_grads(who, l, grads, c);
  if (host_counts) check_counts(who, c);
}

// Drops the references a pass held to the grads it read, where their TensorImpls are cold again (the data pass
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
