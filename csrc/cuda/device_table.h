// NOTE [device table]
// How the CUDA step finds its work: one launch per step per partition over two tables in device memory, built once
// per partition (when the step plan is built) and kept across steps:
//   * the tensor table: one TensorEntry per tensor (its buffers' addresses, numel, step, tensor id);
//   * the chunk table: one ChunkEntry (tensor, chunk index) per chunk of `chunk_size` elements, every tensor's chunks
//     in tensor order (NOTE [chunk table], chunk_table.h; empty tensors have none).
// The launch runs a grid of persistent blocks sized to the device (grid_size: the blocks that fit at once), each
// striding the chunk list, so a step of 10,000 small tensors or of one large one is one stream of chunks with no
// launch boundary; there is no cap on tensors or chunks per launch (int64 counts; a chunk index is int32, so a tensor
// has at most 2^31 chunks).
// The host keeps an image of the tables (this class). Each step writes every tensor's entry again (the addresses of
// the buffers the step reads: a grad allocated anew, a `.data` replaced, a staging copy) and set() records the range
// of entries that changed; that byte range, usually empty, goes to the device in one stream-ordered copy before the
// launch. The chunk table depends only on the numels, which the per-step checks hold fixed.
// Capturable steps keep their step counts on the device: every chunk computes with *step + 1, and the launch's last
// block to finish (a counter in the table's header, reset by that block, so a CUDA graph can replay the launch)
// stores *step + 1 for every tensor, after every block has read it: each step is counted once per tensor, empty
// tensors included, and none is read while it changes.
// Plain host C++ (no CUDA, no torch); unit-tested on the CPU (tests/test_cuda_build.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fused_adam {
namespace cuda {

// Named slots of a tensor's buffers (PyTorch's kParamIdx habit).
enum Buf : int { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kMaster = 5, kNumBufs = 6 };

// One tensor of the partition as the kernel sees it. Every buffer holds `numel` elements in one element order (the
// binding stages copies where a grad's or state's strides differ from the param's).
struct TensorEntry {
  void* buf[kNumBufs];  // kMaxExpAvgSq: amsgrad only; kMaster: master weights only (float32); else null
  float* step;          // capturable: the step count on the device (the update uses *step + 1)
  int64_t numel;
  uint64_t tensor_id;   // stochastic rounding's tensor id (its index over all param groups)
  // Not capturable, steps not all equal (StepSource::kPerTensor): this tensor's step, already incremented on the
  // host, and its two step-dependent scalars in double (make_step_scalars), rounded to opmath by the kernel.
  double neg_step_size;
  double bias_correction2_sqrt;
  double host_step;
};
static_assert(sizeof(TensorEntry) == 96, "no padding: set() compares entries bytewise");

struct ChunkEntry {
  int32_t tensor;  // index into the tensor table (tensors per partition < 2^31)
  int32_t chunk;   // elements [chunk * chunk_size, min(numel, (chunk + 1) * chunk_size)) of that tensor
};

// Where a launch's step-dependent scalars come from.
enum class StepSource : uint8_t {
  kUniform = 0,    // not capturable, every tensor at the same step: the kernel parameters carry them
  kPerTensor = 1,  // not capturable, steps differ: each TensorEntry carries its own (host-computed)
  kDevice = 2,     // capturable: *entry.step + 1, and the launch stores it (NOTE [device table])
};

// The device tables' memory: [header][tensor table][chunk table], one allocation, 16-byte aligned sections.
struct TableHeader {
  uint32_t blocks_done;  // capturable: blocks that finished this launch; its last block resets it to 0
  uint32_t pad[3];
};

inline size_t align16(size_t n) { return (n + 15) / 16 * 16; }

class DeviceTable {
 public:
  DeviceTable(const std::vector<int64_t>& numels, int64_t chunk_size) : chunk_size_(chunk_size) {
    if (chunk_size <= 0 || chunk_size % 8 != 0 || chunk_size > (int64_t{1} << 30)) {
      throw std::invalid_argument("device table: chunk_size must be a positive multiple of 8 up to 2^30, got " +
                                  std::to_string(chunk_size));
    }
    if (numels.size() > static_cast<size_t>(INT32_MAX)) {
      throw std::invalid_argument("device table: " + std::to_string(numels.size()) + " tensors, more than 2^31 - 1");
    }
    num_tensors_ = static_cast<int64_t>(numels.size());
    int64_t chunks = 0;
    for (size_t t = 0; t < numels.size(); ++t) {
      if (numels[t] < 0) {
        throw std::invalid_argument("device table: tensor " + std::to_string(t) + " has negative numel " +
                                    std::to_string(numels[t]));
      }
      const int64_t n = (numels[t] + chunk_size - 1) / chunk_size;
      if (n - 1 > INT32_MAX) {
        throw std::invalid_argument("device table: tensor " + std::to_string(t) + " has " +
                                    std::to_string(numels[t]) + " elements, more than 2^31 chunks of " +
                                    std::to_string(chunk_size));
      }
      chunks += n;
    }
    num_chunks_ = chunks;
    tensors_offset_ = align16(sizeof(TableHeader));
    chunks_offset_ = tensors_offset_ + align16(sizeof(TensorEntry) * numels.size());
    bytes_ = chunks_offset_ + align16(sizeof(ChunkEntry) * static_cast<size_t>(chunks));
    image_.assign((bytes_ + 15) / 16, Words16{});
    TensorEntry* entries = tensors();
    ChunkEntry* out = reinterpret_cast<ChunkEntry*>(data() + chunks_offset_);
    for (size_t t = 0; t < numels.size(); ++t) {
      entries[t].numel = numels[t];
      for (int64_t c = 0; c * chunk_size < numels[t]; ++c) {
        *out++ = ChunkEntry{static_cast<int32_t>(t), static_cast<int32_t>(c)};
      }
    }
    dirty_begin_ = 0;  // the first upload is the whole image
    dirty_end_ = bytes_;
  }

  int64_t num_tensors() const { return num_tensors_; }
  int64_t num_chunks() const { return num_chunks_; }
  int64_t chunk_size() const { return chunk_size_; }
  size_t bytes() const { return bytes_; }
  size_t tensors_offset() const { return tensors_offset_; }
  size_t chunks_offset() const { return chunks_offset_; }
  const unsigned char* image() const { return data(); }
  const TensorEntry& entry(int64_t i) const { return tensors()[i]; }
  const ChunkEntry& chunk(int64_t c) const {
    return reinterpret_cast<const ChunkEntry*>(data() + chunks_offset_)[c];
  }

  // Entry i as this step needs it; the numel must be the table's (a tensor's size is fixed for the table's life).
  void set(int64_t i, const TensorEntry& e) {
    TensorEntry& cur = tensors()[i];
    if (e.numel != cur.numel) {
      throw std::invalid_argument("device table: tensor " + std::to_string(i) + " has " + std::to_string(e.numel) +
                                  " elements, the table was built for " + std::to_string(cur.numel));
    }
    if (std::memcmp(&cur, &e, sizeof(TensorEntry)) == 0) return;
    std::memcpy(&cur, &e, sizeof(TensorEntry));
    const size_t begin = tensors_offset_ + sizeof(TensorEntry) * static_cast<size_t>(i);
    dirty_begin_ = std::min(dirty_begin_, begin);
    dirty_end_ = std::max(dirty_end_, begin + sizeof(TensorEntry));
  }

  // The byte range [first, second) of the image that the device's copy lacks (empty: first == second), and from
  // now on the device is taken to have it (the caller copies it before the next launch).
  std::pair<size_t, size_t> take_dirty() {
    const std::pair<size_t, size_t> range = dirty_begin_ < dirty_end_ ? std::make_pair(dirty_begin_, dirty_end_)
                                                                      : std::make_pair(size_t{0}, size_t{0});
    dirty_begin_ = bytes_;
    dirty_end_ = 0;
    return range;
  }

  // Set again (an upload that failed): the device's copy is unknown.
  void mark_all_dirty() {
    dirty_begin_ = 0;
    dirty_end_ = bytes_;
  }

 private:
  struct alignas(16) Words16 {
    unsigned char b[16];
  };
  unsigned char* data() { return reinterpret_cast<unsigned char*>(image_.data()); }
  const unsigned char* data() const { return reinterpret_cast<const unsigned char*>(image_.data()); }
  TensorEntry* tensors() { return reinterpret_cast<TensorEntry*>(data() + tensors_offset_); }
  const TensorEntry* tensors() const { return reinterpret_cast<const TensorEntry*>(data() + tensors_offset_); }

  int64_t chunk_size_;
  int64_t num_tensors_ = 0;
  int64_t num_chunks_ = 0;
  size_t tensors_offset_ = 0, chunks_offset_ = 0, bytes_ = 0;
  size_t dirty_begin_ = 0, dirty_end_ = 0;
  std::vector<Words16> image_;
};

// Blocks of one launch: as many as the device runs at once (persistent blocks striding the chunk list), fewer when
// there are fewer chunks, and at least one (a capturable step of empty tensors still counts its steps).
inline unsigned grid_size(int64_t num_chunks, int sm_count, int blocks_per_sm) {
  const int64_t resident = static_cast<int64_t>(std::max(sm_count, 1)) * std::max(blocks_per_sm, 1);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(num_chunks, resident)));
}

}  // namespace cuda
}  // namespace fused_adam
