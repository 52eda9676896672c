// kvtrim/comm/communicator.hpp — what a budget that spans ranks needs from them.
//
// Tensor parallelism shards a layer's kv heads across ranks (GPUs). Budgets
// that look at all heads at once (budget::adaptive's one top-k across heads)
// then need a few small collectives: an all-reduce (sum) of a vector of counts.
// A communicator is anything with
//
//   int rank() const;                     // this rank, 0 ≤ rank < size
//   int size() const;                     // ranks in the group
//   void all_reduce_sum(std::uint64_t* counts, std::size_t n, Stream stream) const;
//
// where Stream is the backend's stream type (backend::host_stream on the CPU:
// the call returns with the sums in place; cudaStream_t on CUDA: the sums are
// in place, in device memory, when the stream reaches them — no host wait).
// Every rank of the group calls the same collectives in the same order with
// the same n (as NCCL requires).
//
// Counts are 64-bit: a sum over ranks of Σ_h max(floor_h, tokens) never
// overflows, whatever the head count or context length.
//
// Implementations, one header each:
//   comm/single_process.hpp   one rank, the identity (any backend)
//   comm/simulated.hpp        R ranks as R threads of one process (CPU)
//   comm/simulated_device.cuh R ranks as R threads and R streams on one GPU
//   comm/nccl.cuh             the engine's ncclComm_t (target kvtrim::nccl)
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>

namespace kvtrim::comm {

template <class C, class Stream>
concept communicator = requires(const C& c, std::uint64_t* counts, std::size_t n, Stream stream) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  c.all_reduce_sum(counts, n, stream);
};

}  // namespace kvtrim::comm
