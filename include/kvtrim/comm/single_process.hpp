// kvtrim/comm/single_process.hpp — a group of one rank.
//
// The sum over one rank is the rank's own vector: all_reduce_sum does nothing,
// on any backend's stream (so a sharded budget called with it is the whole
// layer on one device, and costs only its own kernels — the benchmark's
// baseline for the communication-free part of a rank's work).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvtrim::comm {

struct single_process {
  int rank() const { return 0; }
  int size() const { return 1; }
  template <class Stream>
  void all_reduce_sum(std::uint64_t*, std::size_t, Stream) const {}
};

}  // namespace kvtrim::comm
