// kvtrim/backend/cuda/pyramid.cuh — budget::pyramid (PyramidKV) on the GPU.
//
// Every head of a layer keeps the same count, a function of the layer index and
// the token count only (budget::pyramid::layer_keep: the exact integer schedule
// or kvpress's rounding); the host computes it, as the CPU reference does, and
// one fill writes it — nothing depends on the scores, so there is no round trip.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/uniform.cuh"
#include "kvtrim/budget/pyramid.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

template <>
struct implementation<budget::pyramid, backend::cuda> {
  static void keep_counts(const budget::pyramid::config& cfg, const tensor_view<const float, 3, device_space>& scores,
                          std::int32_t* keep_counts, cudaStream_t stream) {
    const auto keep = static_cast<std::int32_t>(budget::pyramid::layer_keep(cfg, scores.extent(2)));
    const std::int64_t heads = scores.extent(0) * scores.extent(1);
    if (heads == 0) return;
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cuda_detail::ceil_div(heads, 256), 65535));
    cuda_detail::fill<std::int32_t><<<blocks, 256, 0, stream>>>(keep_counts, heads, keep);
    detail::check_launch("kvtrim::budget::pyramid", "fill");
  }
};

}  // namespace kvtrim
