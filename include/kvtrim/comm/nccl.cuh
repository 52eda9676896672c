// kvtrim/comm/nccl.cuh — the engine's NCCL communicator (CMake target kvtrim::nccl).
//
// An engine that shards heads over GPUs (vLLM, SGLang, TensorRT-LLM) already
// holds an ncclComm_t for its tensor-parallel group; kvtrim borrows it (never
// creates or destroys one). all_reduce_sum is ncclAllReduce(ncclUint64,
// ncclSum) in place on the caller's stream: enqueued, no host wait, and
// capturable in a CUDA graph as NCCL's collectives are. Every rank of the
// communicator must make the same collectives in the same order — the
// sharded budgets make a fixed number per call (budget::adaptive: 5).
#pragma once

#if !__has_include(<nccl.h>)
#error "kvtrim/comm/nccl.cuh needs NCCL's nccl.h: link the CMake target kvtrim::nccl (configured when NCCL is found)"
#endif

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/core/error.hpp"

namespace kvtrim::comm {

class nccl {
 public:
  static constexpr std::string_view function = "kvtrim::comm::nccl";

  /// Borrows `communicator` (it must outlive this object).
  explicit nccl(ncclComm_t communicator) : comm_(communicator) {
    if (communicator == nullptr) detail::fail(function, "communicator", "an initialised ncclComm_t", "null");
    check(ncclCommUserRank(communicator, &rank_), "ncclCommUserRank");
    check(ncclCommCount(communicator, &size_), "ncclCommCount");
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  ncclComm_t get() const { return comm_; }

  void all_reduce_sum(std::uint64_t* counts, std::size_t n, cudaStream_t stream) const {
    check(ncclAllReduce(counts, counts, n, ncclUint64, ncclSum, comm_, stream), "ncclAllReduce");
  }

 private:
  static void check(ncclResult_t result, std::string_view call) {
    if (result != ncclSuccess) detail::fail_call(function, call, ncclGetErrorString(result));
  }
  ncclComm_t comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace kvtrim::comm
