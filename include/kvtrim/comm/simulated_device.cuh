// kvtrim/comm/simulated_device.cuh — R ranks on one GPU: R host threads, each
// with its own stream and communicator from one simulated_device_group.
//
// For tests and benchmarks where only one GPU is lent. Why threads and streams
// and not a sequential emulation (one thread stepping every rank): the sharded
// budget is one call per rank with its collectives inside; stepping ranks in
// turn would need that call cut into phases, a code path NCCL never takes.
// With a thread per rank, each rank makes exactly the calls it makes with
// kvtrim::comm::nccl, and all_reduce_sum really sums the R device vectors.
//
// One call, on every rank (the host threads meet at barriers; the device
// work is ordered only by events, so no host thread waits for the GPU):
//   record `ready` on my stream; barrier; my stream waits for every rank's
//   `ready`; a kernel sums the R vectors into my private device buffer;
//   record `read`; barrier; my stream waits for every rank's `read` (nobody
//   still reads my vector); copy the sums into my vector.
// The barriers order the host-side event records and waits, so a wait never
// sees a later record of the same event. Not capturable (the streams wait on
// each other's events, and a graph captures one stream's work): use
// comm::single_process or comm::nccl under capture.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvtrim/backend/cuda.hpp"
#include "kvtrim/core/error.hpp"

namespace kvtrim::comm {

namespace simulated_detail {
inline constexpr int max_ranks = 16;
struct rank_vectors {
  const unsigned long long* data[max_ranks];
};
/// out[i] = Σ_r vectors.data[r][i] (a template: this header may be in many TUs).
template <int Threads>
__global__ void __launch_bounds__(Threads) sum_ranks(rank_vectors vectors, int ranks, unsigned long long* out,
                                                     std::int64_t n) {
  for (std::int64_t i = std::int64_t{blockIdx.x} * Threads + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * Threads) {
    unsigned long long sum = 0;
    for (int r = 0; r < ranks; ++r) sum += vectors.data[r][i];
    out[i] = sum;
  }
}
}  // namespace simulated_detail

class simulated_device_group {
 public:
  static constexpr std::string_view function = "kvtrim::comm::simulated_device_group";

  /// `ranks` ranks on the current device; each all-reduce may carry up to `capacity` counts.
  simulated_device_group(int ranks, std::size_t capacity)
      : ranks_(ranks), capacity_(capacity), sync_(ranks > 0 ? ranks : 1) {
    if (ranks < 1 || ranks > simulated_detail::max_ranks)
      detail::fail(function, "ranks", detail::cat("1 to ", simulated_detail::max_ranks, " ranks"), std::to_string(ranks));
    const auto count = static_cast<std::size_t>(ranks);
    published_.assign(count, nullptr);
    lengths_.assign(count, 0);
    sums_.assign(count, nullptr);
    ready_.assign(count, nullptr);
    read_.assign(count, nullptr);
    for (std::size_t r = 0; r < count; ++r) {
      detail::check_cuda(cudaMalloc(&sums_[r], std::max<std::size_t>(capacity, 1) * sizeof(unsigned long long)),
                         function, "cudaMalloc(sums)");
      detail::check_cuda(cudaEventCreateWithFlags(&ready_[r], cudaEventDisableTiming), function, "cudaEventCreate");
      detail::check_cuda(cudaEventCreateWithFlags(&read_[r], cudaEventDisableTiming), function, "cudaEventCreate");
    }
  }
  simulated_device_group(const simulated_device_group&) = delete;
  simulated_device_group& operator=(const simulated_device_group&) = delete;
  ~simulated_device_group() {
    for (std::size_t r = 0; r < sums_.size(); ++r) {
      cudaFree(sums_[r]);
      if (ready_[r] != nullptr) cudaEventDestroy(ready_[r]);
      if (read_[r] != nullptr) cudaEventDestroy(read_[r]);
    }
  }

  int size() const { return ranks_; }

  void all_reduce_sum(int rank, std::uint64_t* counts, std::size_t n, cudaStream_t stream) {
    if (rank < 0 || rank >= ranks_)  // a misuse of the group itself: no barrier reached yet
      detail::fail("kvtrim::comm::simulated_device::all_reduce_sum", "rank",
                   detail::cat("a rank in [0, ", ranks_, ")"), std::to_string(rank));
    const auto me = static_cast<std::size_t>(rank);
    published_[me] = reinterpret_cast<unsigned long long*>(counts);
    lengths_[me] = n;
    detail::check_cuda(cudaEventRecord(ready_[me], stream), function, "cudaEventRecord(ready)");
    sync_.arrive_and_wait();
    // Mismatched or oversized n: every rank sees the same lengths_ and throws,
    // after one more barrier (no rank left waiting, none overwriting lengths_
    // while another reads them).
    for (std::size_t r = 0; r < lengths_.size(); ++r)
      if (lengths_[r] != n || n > capacity_) {
        const std::size_t other = lengths_[r];
        sync_.arrive_and_wait();
        if (n > capacity_)
          detail::fail("kvtrim::comm::simulated_device::all_reduce_sum", "n",
                       detail::cat("at most the group's capacity of ", capacity_, " counts"), std::to_string(n));
        detail::fail("kvtrim::comm::simulated_device::all_reduce_sum", "n", detail::cat(n, " counts on every rank"),
                     detail::cat(other, " on rank ", r));
      }
    simulated_detail::rank_vectors vectors{};
    for (std::size_t r = 0; r < published_.size(); ++r) {
      vectors.data[r] = published_[r];
      if (r != me) detail::check_cuda(cudaStreamWaitEvent(stream, ready_[r], 0), function, "cudaStreamWaitEvent(ready)");
    }
    if (n > 0) {
      constexpr int threads = 256;
      const auto blocks = static_cast<unsigned>(std::min<std::size_t>((n + threads - 1) / threads, 1024));
      simulated_detail::sum_ranks<threads><<<blocks, threads, 0, stream>>>(vectors, ranks_, sums_[me],
                                                                            static_cast<std::int64_t>(n));
      detail::check_launch(function, "sum_ranks");
    }
    detail::check_cuda(cudaEventRecord(read_[me], stream), function, "cudaEventRecord(read)");
    sync_.arrive_and_wait();
    for (std::size_t r = 0; r < read_.size(); ++r)
      if (r != me) detail::check_cuda(cudaStreamWaitEvent(stream, read_[r], 0), function, "cudaStreamWaitEvent(read)");
    if (n > 0)
      detail::check_cuda(cudaMemcpyAsync(counts, sums_[me], n * sizeof(std::uint64_t), cudaMemcpyDeviceToDevice, stream),
                         function, "cudaMemcpyAsync(sums)");
  }

 private:
  int ranks_;
  std::size_t capacity_;
  std::barrier<> sync_;
  std::vector<const unsigned long long*> published_;
  std::vector<std::size_t> lengths_;
  std::vector<unsigned long long*> sums_;  // per rank, device memory
  std::vector<cudaEvent_t> ready_, read_;
};

/// Rank `rank` of a simulated_device_group (the group outlives its communicators).
class simulated_device {
 public:
  simulated_device(simulated_device_group& group, int rank) : group_(&group), rank_(rank) {
    if (rank < 0 || rank >= group.size())
      detail::fail("kvtrim::comm::simulated_device", "rank", detail::cat("a rank in [0, ", group.size(), ")"),
                   std::to_string(rank));
  }
  int rank() const { return rank_; }
  int size() const { return group_->size(); }
  void all_reduce_sum(std::uint64_t* counts, std::size_t n, cudaStream_t stream) const {
    group_->all_reduce_sum(rank_, counts, n, stream);
  }

 private:
  simulated_device_group* group_;
  int rank_;
};

}  // namespace kvtrim::comm
