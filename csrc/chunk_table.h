// NOTE [chunk table]
// A multi-tensor step splits every tensor of a group into chunks of at most `chunk_size` elements and lists
// them in one table that spans all tensors. Workers (CPU threads, CUDA blocks) take table entries, so the
// work divides across tensors as well as inside them: 10,000 tensors of 1,000 elements make 10,000 entries
// shared by all threads, where a per-tensor loop would parallelize inside 1,000 elements at a time.
// Plain host C++ (no torch), shared by the CPU kernel and the CUDA launcher, and unit-tested on the CPU.
// Sizes and offsets are int64: a tensor of 2^31 elements and more is fine.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fused_adam {

struct Chunk {
  int64_t tensor;  // index into the group's tensor lists
  int64_t start;   // first element of the chunk, in the tensor
  int64_t size;    // number of elements, 1..chunk_size
};

// Chunks of every tensor, in tensor order. Empty tensors contribute no chunk.
inline std::vector<Chunk> build_chunk_table(const std::vector<int64_t>& numels, int64_t chunk_size) {
  if (chunk_size <= 0) {
    throw std::invalid_argument("build_chunk_table: chunk_size must be positive, got " + std::to_string(chunk_size));
  }
  int64_t total = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] < 0) {
      throw std::invalid_argument("build_chunk_table: tensor " + std::to_string(t) + " has negative numel " +
                                  std::to_string(numels[t]));
    }
    total += (numels[t] + chunk_size - 1) / chunk_size;
  }
  std::vector<Chunk> table;
  table.reserve(static_cast<size_t>(total));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t start = 0; start < numels[t]; start += chunk_size) {
      const int64_t left = numels[t] - start;
      table.push_back({static_cast<int64_t>(t), start, left < chunk_size ? left : chunk_size});
    }
  }
  return table;
}

}  // namespace fused_adam
