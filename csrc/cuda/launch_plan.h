// NOTE [launch plan]
// How the CUDA launcher packs the chunk table (NOTE [chunk table], chunk_table.h) into kernel launches. A launch
// carries its metadata in the kernel parameters (at most 4 KB on older toolkits and archs), so it holds at most
// `max_tensors` tensor slots and `max_blocks` blocks; a block is one chunk (slot, chunk index). Tensors are packed
// in order, a new launch starts when either table is full, and a tensor whose chunks do not fit continues in the
// next launch under a new slot. Tensors whose pointers allow 128-bit accesses go to vector launches, the others to
// scalar launches, so one misaligned view does not slow down the rest of the group.
// Every tensor gets a slot, empty ones included, and exactly one of its slots is marked `first`: the launch where
// its step is incremented (capturable), before that launch's update kernel, so every block of the tensor, in this
// launch or a later one, reads the incremented step and none reads it while it changes.
// Plain host C++ (no CUDA, no torch); unit-tested on the CPU (tests/test_cuda_build.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "chunk_table.h"

namespace fused_adam {
namespace cuda {

struct PlannedSlot {
  int64_t tensor;  // index into the caller's tensor list
  bool first;      // this tensor's first slot: its step is incremented by this launch
};

struct PlannedBlock {
  int32_t slot;   // index into the launch's slots
  int32_t chunk;  // chunk index in the tensor: elements [chunk * chunk_size, min(numel, (chunk + 1) * chunk_size))
};

struct PlannedLaunch {
  bool vector;  // every tensor of the launch allows 128-bit accesses
  std::vector<PlannedSlot> slots;
  std::vector<PlannedBlock> blocks;
};

// `vector_ok[t]`: tensor t's pointers are 16-byte aligned (chunk_size keeps that alignment: a multiple of 8).
inline std::vector<PlannedLaunch> plan_launches(const std::vector<int64_t>& numels, const std::vector<bool>& vector_ok,
                                                int64_t chunk_size, int max_tensors, int max_blocks) {
  if (vector_ok.size() != numels.size()) {
    throw std::invalid_argument("plan_launches: " + std::to_string(vector_ok.size()) + " alignment flags for " +
                                std::to_string(numels.size()) + " tensors");
  }
  if (max_tensors <= 0 || max_blocks <= 0) {
    throw std::invalid_argument("plan_launches: max_tensors and max_blocks must be positive");
  }
  if (chunk_size <= 0) {
    throw std::invalid_argument("plan_launches: chunk_size must be positive, got " + std::to_string(chunk_size));
  }
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] > 0 && (numels[t] - 1) / chunk_size > INT32_MAX) {
      throw std::invalid_argument("plan_launches: tensor " + std::to_string(t) + " has " + std::to_string(numels[t]) +
                                  " elements, more than 2^31 chunks of " + std::to_string(chunk_size));
    }
  }
  const std::vector<Chunk> table = build_chunk_table(numels, chunk_size);  // validates numels
  // table is in tensor order: tensor t owns entries [begin[t], begin[t + 1]).
  std::vector<size_t> begin(numels.size() + 1, 0);
  for (size_t t = 0, c = 0; t < numels.size(); ++t) {
    begin[t] = c;
    while (c < table.size() && table[c].tensor == static_cast<int64_t>(t)) ++c;
    begin[t + 1] = c;
  }
  std::vector<PlannedLaunch> launches;
  for (const bool vector : {true, false}) {
    PlannedLaunch cur{vector, {}, {}};
    auto flush = [&] {
      if (!cur.slots.empty()) launches.push_back(std::move(cur));
      cur = PlannedLaunch{vector, {}, {}};
    };
    for (size_t t = 0; t < numels.size(); ++t) {
      if (vector_ok[t] != vector) continue;
      const bool has_chunks = begin[t + 1] > begin[t];
      if (static_cast<int>(cur.slots.size()) == max_tensors ||
          (has_chunks && static_cast<int>(cur.blocks.size()) == max_blocks)) {
        flush();
      }
      cur.slots.push_back({static_cast<int64_t>(t), true});
      for (size_t c = begin[t]; c < begin[t + 1]; ++c) {
        if (static_cast<int>(cur.blocks.size()) == max_blocks) {
          flush();
          cur.slots.push_back({static_cast<int64_t>(t), false});
        }
        cur.blocks.push_back({static_cast<int32_t>(cur.slots.size() - 1),
                              static_cast<int32_t>(table[c].start / chunk_size)});
      }
    }
    flush();
  }
  return launches;
}

}  // namespace cuda
}  // namespace fused_adam
