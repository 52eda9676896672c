// kvtrim/backend/cuda/uniform.cuh — budget::uniform on the GPU: every head
// keeps the same count, known on the host (budget::uniform::max_keep).
#pragma once

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/budget/uniform.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

namespace cuda_detail {
__global__ void fill_int32(std::int32_t* out, std::int64_t count, std::int32_t value) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    out[i] = value;
}
}  // namespace cuda_detail

template <>
struct implementation<budget::uniform, backend::cuda> {
  static void keep_counts(const budget::uniform::config& cfg, const tensor_view<const float, 3, device_space>& scores,
                          std::int32_t* keep_counts, cudaStream_t stream) {
    const auto keep = static_cast<std::int32_t>(budget::uniform::max_keep(cfg, scores.extent(2)));
    const std::int64_t heads = scores.extent(0) * scores.extent(1);
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cuda_detail::ceil_div(heads, 256), 65535));
    cuda_detail::fill_int32<<<blocks, 256, 0, stream>>>(keep_counts, heads, keep);
    detail::check_launch("kvtrim::budget::uniform", "fill_int32");
  }
};

}  // namespace kvtrim
