// kvtrim/comm/simulated.hpp — R ranks of one process, one thread each (CPU).
//
// For tests and for engines' CPU fallbacks: each rank runs on its own thread
// with its own communicator from one simulated_group; all_reduce_sum really
// sums the R vectors (in rank order — integer sums, so the order does not
// change the bits), so a sharded budget exercises the same collective pattern
// as with NCCL: a rank that called fewer collectives than the others leaves
// them waiting, as it would there.
//
// Protocol of one call, on every rank: publish the vector's address; barrier;
// sum everyone's vectors into this rank's private buffer; barrier (no vector
// is overwritten while another rank still reads it); copy the sums back.
#pragma once

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/error.hpp"

namespace kvtrim::comm {

class simulated_group {
 public:
  explicit simulated_group(int ranks)
      : ranks_(ranks > 0 ? ranks : 1), sync_(ranks_), published_(static_cast<std::size_t>(ranks_)),
        lengths_(static_cast<std::size_t>(ranks_)), sums_(static_cast<std::size_t>(ranks_)) {
    if (ranks < 1) detail::fail("kvtrim::comm::simulated_group", "ranks", "at least one rank", std::to_string(ranks));
  }
  int size() const { return ranks_; }

  void all_reduce_sum(int rank, std::uint64_t* counts, std::size_t n) {
    if (rank < 0 || rank >= ranks_)  // a misuse of the group itself: no barrier reached yet
      detail::fail("kvtrim::comm::simulated::all_reduce_sum", "rank", detail::cat("a rank in [0, ", ranks_, ")"),
                   std::to_string(rank));
    const auto me = static_cast<std::size_t>(rank);
    published_[me] = counts;
    lengths_[me] = n;
    sync_.arrive_and_wait();
    for (std::size_t r = 0; r < published_.size(); ++r)
      if (lengths_[r] != n) {
        // Every rank sees the mismatch and throws; the extra barrier keeps a rank
        // that catches and calls again from overwriting lengths_ while others read.
        const std::size_t other = lengths_[r];
        sync_.arrive_and_wait();
        detail::fail("kvtrim::comm::simulated::all_reduce_sum", "n", detail::cat(n, " counts on every rank"),
                     detail::cat(other, " on rank ", r));
      }
    std::vector<std::uint64_t>& sum = sums_[me];
    sum.assign(n, 0);
    for (std::size_t r = 0; r < published_.size(); ++r)
      for (std::size_t i = 0; i < n; ++i) sum[i] += published_[r][i];
    sync_.arrive_and_wait();
    for (std::size_t i = 0; i < n; ++i) counts[i] = sum[i];
  }

 private:
  int ranks_;
  std::barrier<> sync_;
  std::vector<std::uint64_t*> published_;
  std::vector<std::size_t> lengths_;
  std::vector<std::vector<std::uint64_t>> sums_;  // per rank: allocated once per size, reused
};

/// Rank `rank` of a simulated_group (the group outlives its communicators).
class simulated {
 public:
  simulated(simulated_group& group, int rank) : group_(&group), rank_(rank) {
    if (rank < 0 || rank >= group.size())
      detail::fail("kvtrim::comm::simulated", "rank", detail::cat("a rank in [0, ", group.size(), ")"),
                   std::to_string(rank));
  }
  int rank() const { return rank_; }
  int size() const { return group_->size(); }
  void all_reduce_sum(std::uint64_t* counts, std::size_t n, backend::host_stream) const {
    group_->all_reduce_sum(rank_, counts, n);
  }

 private:
  simulated_group* group_;
  int rank_;
};

}  // namespace kvtrim::comm
