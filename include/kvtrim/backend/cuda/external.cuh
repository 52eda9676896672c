// kvtrim/backend/cuda/external.cuh — score::external on the GPU: copies the
// caller's device scores into the scheme's dense score buffer (NaN ranked as
// −∞), the same function as backend/cpu/external.hpp (see score/external.hpp).
// The scores must be in device memory, written before compress on its stream.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/external.hpp"

namespace kvtrim {

namespace cuda_detail {
struct external_parameters {
  const float* given;
  std::int64_t batch_stride, head_stride, token_stride;
  std::int64_t kv_heads, tokens, total;
  float* scores;  // dense [B, H, T]
};

template <int Unused>
__global__ void external_scores(const __grid_constant__ external_parameters p) {
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat < p.total;
       flat += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t j = flat % p.tokens, unit = flat / p.tokens;
    const std::int64_t b = unit / p.kv_heads, h = unit % p.kv_heads;
    p.scores[flat] = score::external::rank_value(p.given[b * p.batch_stride + h * p.head_stride + j * p.token_stride]);
  }
}
}  // namespace cuda_detail

template <>
struct implementation<score::external, backend::cuda> {
  template <class KeyT, class QueryT>
  static void score(const score::external::config& cfg, const model_shape& shape,
                    const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>&,
                    const window_view<QueryT, device_space>&, const score_view<device_space>& scores,
                    cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::external";
    const std::int64_t batch = scores.extent(0), tokens = keys.extent(2);
    score::external::check(function, cfg, batch, shape.kv_heads, tokens);
    const cuda_detail::external_parameters p{cfg.scores,     cfg.strides[0], cfg.strides[1], cfg.strides[2],
                                             shape.kv_heads, tokens,         batch * shape.kv_heads * tokens,
                                             scores.data};
    if (p.total == 0) return;
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cuda_detail::ceil_div(p.total, 256), 65535));
    cuda_detail::external_scores<0><<<blocks, 256, 0, stream>>>(p);
    detail::check_launch(function, "external_scores");
  }
};

}  // namespace kvtrim
