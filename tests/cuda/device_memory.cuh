// tests/cuda/device_memory.cuh — test-side helpers for the CUDA suite: skip
// without a GPU, RAII device buffers, host ↔ device copies of tensor views.
#pragma once

#include <gtest/gtest.h>
#include <kvtrim/cuda.cuh>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/tensors.hpp"

namespace kvtrim::testing {

/// GTEST_SKIP()s the current test (with the reason) when no CUDA device is usable.
#define KVTRIM_SKIP_WITHOUT_GPU()                                                              \
  do {                                                                                         \
    int kvtrim_device_count = 0;                                                               \
    const cudaError_t kvtrim_status = cudaGetDeviceCount(&kvtrim_device_count);                \
    if (kvtrim_status != cudaSuccess || kvtrim_device_count == 0)                              \
      GTEST_SKIP() << "no CUDA device: " << cudaGetErrorString(kvtrim_status) << ", " << kvtrim_device_count \
                   << " devices";                                                              \
  } while (0)

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw kvtrim::error(std::string(what) + ": " + cudaGetErrorString(status));
}

/// 256-byte aligned host memory for a cache block.
struct host_block {
  std::unique_ptr<std::byte[]> raw;
  void* data = nullptr;
  explicit host_block(std::size_t bytes) : raw(new std::byte[bytes + 256]) {
    const auto address = reinterpret_cast<std::uintptr_t>(raw.get());
    data = raw.get() + ((256 - address % 256) % 256);
  }
};

/// Owning device memory.
template <class T>
class device_buffer {
 public:
  explicit device_buffer(std::size_t count) : count_(count) { check(cudaMalloc(&data_, sizeof(T) * (count ? count : 1)), "cudaMalloc"); }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) { upload(host); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { cudaFree(data_); }
  T* data() const { return data_; }
  std::size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    check(cudaMemcpy(data_, host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    check(cudaMemcpy(host.data(), data_, sizeof(T) * count_, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }
  void fill_bytes(int value) { check(cudaMemset(data_, value, sizeof(T) * count_), "cudaMemset"); }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

/// A device copy of a host tensor, strides (and padding) included.
template <class T, std::size_t Rank>
struct device_tensor {
  device_buffer<T> buffer;
  tensor_view<T, Rank, device_space> view;

  explicit device_tensor(const host_tensor<T, Rank>& host)
      : buffer(host.storage), view{buffer.data() + (host.view.data - host.storage.data()), host.view.extents, host.view.strides} {}
};

/// Copies a device byte range back to the host.
inline std::vector<std::byte> download_bytes(const void* device, std::size_t bytes) {
  std::vector<std::byte> host(bytes);
  check(cudaMemcpy(host.data(), device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  return host;
}

}  // namespace kvtrim::testing
