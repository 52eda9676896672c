// kvtrim/backend/cuda.hpp — the CUDA backend tag, and CUDA error handling.
//
// Host-only (needs the CUDA runtime headers, not nvcc): the kernels live in
// include/kvtrim/backend/cuda/*.cuh, one header per policy, pulled in by
// kvtrim/cuda.cuh from a .cu translation unit. Every entry point takes a
// cudaStream_t, launches asynchronously, never synchronises the device, and
// turns a CUDA error into kvtrim::error naming the call and the error string.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string_view>

#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim {

namespace detail {
/// Throws kvtrim::error "<function>: <call> failed: <cudaGetErrorName>: <cudaGetErrorString>".
inline void check_cuda(cudaError_t status, std::string_view function, std::string_view call) {
  if (status != cudaSuccess)
    fail_call(function, call, cat(cudaGetErrorName(status), ": ", cudaGetErrorString(status)));
}

/// After a kernel launch: a launch error (bad configuration, no device, …) surfaces here.
inline void check_launch(std::string_view function, std::string_view kernel) {
  check_cuda(cudaGetLastError(), function, cat("launch of ", kernel));
}
}  // namespace detail

namespace backend {

struct cuda {
  static constexpr std::string_view name = "backend::cuda";
  using space = device_space;
  using stream_type = cudaStream_t;

  /// Device memory for owning caches (not a hot path: synchronous cudaMalloc).
  static void* allocate(std::size_t bytes) {
    void* pointer = nullptr;
    detail::check_cuda(cudaMalloc(&pointer, bytes > 0 ? bytes : 1), "kvtrim::backend::cuda::allocate", "cudaMalloc");
    return pointer;
  }
  static void deallocate(void* pointer) { cudaFree(pointer); }

  /// Multiprocessors of the current device (sizes split-K grids).
  static int multiprocessor_count() {
    int device = 0, count = 0;
    detail::check_cuda(cudaGetDevice(&device), "kvtrim::backend::cuda", "cudaGetDevice");
    detail::check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "kvtrim::backend::cuda",
                       "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
    return count;
  }
};

}  // namespace backend
}  // namespace kvtrim
