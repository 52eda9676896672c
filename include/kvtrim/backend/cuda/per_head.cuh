// kvtrim/backend/cuda/per_head.cuh — budget::per_head on the GPU.
//
// The lengths are configuration (a calibration profile, RazorAttention's or
// DuoAttention's head split), known on the host before the call. They travel
// as kernel arguments, in slices of `slice_heads` heads per launch — no device
// buffer to fill, no host-to-device copy (a pageable cudaMemcpyAsync would
// neither be asynchronous nor capturable in a CUDA graph), no allocation.
// Head h of every sequence keeps min(T, lengths[layer·kv_heads + h]).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/budget/per_head.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

namespace cuda_detail {

/// A slice of per-head counts passed by value (1 KiB of kernel parameters).
struct head_counts_slice {
  static constexpr int capacity = 256;
  std::int32_t counts[capacity];
};

/// keep_counts[b·kv_heads + first + i] = slice.counts[i] for i < slice_heads, every sequence b.
template <class Count>
__global__ void fill_head_counts(Count* keep_counts, std::int64_t batch, std::int64_t kv_heads, std::int64_t first,
                                 std::int64_t slice_heads, head_counts_slice slice) {
  const std::int64_t total = batch * slice_heads;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t b = i / slice_heads, h = i % slice_heads;
    keep_counts[b * kv_heads + first + h] = static_cast<Count>(slice.counts[h]);
  }
}

}  // namespace cuda_detail

template <>
struct implementation<budget::per_head, backend::cuda> {
  static void keep_counts(const budget::per_head::config& cfg, const tensor_view<const float, 3, device_space>& scores,
                          std::int32_t* keep_counts, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::budget::per_head";
    if (scores.extent(1) != cfg.kv_heads)
      detail::fail(function, "config.budget.kv_heads", detail::cat("the layer's kv heads (", scores.extent(1), ")"),
                   std::to_string(cfg.kv_heads));
    const std::int64_t batch = scores.extent(0), tokens = scores.extent(2);
    if (batch == 0) return;
    constexpr std::int64_t capacity = cuda_detail::head_counts_slice::capacity;
    for (std::int64_t first = 0; first < cfg.kv_heads; first += capacity) {
      const std::int64_t slice_heads = std::min(capacity, cfg.kv_heads - first);
      cuda_detail::head_counts_slice slice{};
      for (std::int64_t h = 0; h < slice_heads; ++h)
        slice.counts[h] = static_cast<std::int32_t>(budget::per_head::head_keep(cfg, first + h, tokens));
      const auto blocks =
          static_cast<unsigned>(std::clamp<std::int64_t>(cuda_detail::ceil_div(batch * slice_heads, 256), 1, 65535));
      cuda_detail::fill_head_counts<std::int32_t>
          <<<blocks, 256, 0, stream>>>(keep_counts, batch, cfg.kv_heads, first, slice_heads, slice);
      detail::check_launch(function, "fill_head_counts");
    }
  }
};

}  // namespace kvtrim
