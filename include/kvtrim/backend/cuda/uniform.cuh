// kvtrim/backend/cuda/uniform.cuh — budget::uniform on the GPU: every head
// keeps the same count, known on the host (budget::uniform::max_keep).
#pragma once

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/budget/uniform.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

namespace cuda_detail {
// A template so that any number of translation units may include this header:
// a template's instantiations merge at link time, a plain __global__ function's
// host stub would be defined in every .cu file that includes it (issue 9).
template <class T>
__global__ void fill(T* out, std::int64_t count, T value) {
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
    cuda_detail::fill<std::int32_t><<<blocks, 256, 0, stream>>>(keep_counts, heads, keep);
    detail::check_launch("kvtrim::budget::uniform", "fill");
  }
};

}  // namespace kvtrim
