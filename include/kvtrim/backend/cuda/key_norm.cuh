// kvtrim/backend/cuda/key_norm.cuh — score::key_norm on the GPU (see
// score/key_norm.hpp; backend/cpu/key_norm.hpp is the reference):
//   s[j] = −‖k_j‖₂, the squares summed in double, rounded once to float.
// Eight lanes per token each sum every eighth channel in double, then a
// shuffle tree (the CPU sums d in order: in double the two sums differ by
// ≲ D·2⁻⁵³ relative, so the float results are equal unless the exact norm lies
// that close to a float rounding boundary, then 1 ulp apart).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/key_norm.hpp"

namespace kvtrim {

namespace cuda_detail {
template <class T>
struct key_norm_parameters {
  const T* keys;
  std::int64_t batch_stride, head_stride, token_stride, channel_stride;
  std::int64_t kv_heads, tokens, head_dim;
  std::int64_t total;  // batch · kv_heads · tokens
  float* scores;       // dense [B, H, T]
};

inline constexpr int key_norm_lanes = 8;

template <class T>
__global__ void key_norm_scores(const __grid_constant__ key_norm_parameters<T> p) {
  const int lane = threadIdx.x % key_norm_lanes;
  const std::int64_t groups_per_grid = std::int64_t{gridDim.x} * blockDim.x / key_norm_lanes;
  // Every thread runs the same number of iterations (the full-warp shuffle needs all lanes).
  const std::int64_t limit = (p.total + groups_per_grid - 1) / groups_per_grid * groups_per_grid;
  for (std::int64_t flat = (blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x) / key_norm_lanes; flat < limit;
       flat += groups_per_grid) {
    double squares = 0.0;
    if (flat < p.total) {
      const std::int64_t j = flat % p.tokens, unit = flat / p.tokens;
      const std::int64_t b = unit / p.kv_heads, h = unit % p.kv_heads;
      const T* row = p.keys + b * p.batch_stride + h * p.head_stride + j * p.token_stride;
      for (std::int64_t d = lane; d < p.head_dim; d += key_norm_lanes) {
        const double x = static_cast<double>(to_float(row[d * p.channel_stride]));
        squares += x * x;
      }
    }
#pragma unroll
    for (int offset = key_norm_lanes / 2; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    if (flat < p.total && lane == 0) p.scores[flat] = static_cast<float>(-sqrt(squares));
  }
}
}  // namespace cuda_detail

template <>
struct implementation<score::key_norm, backend::cuda> {
  template <class KeyT, class QueryT>
  static void score(const score::key_norm::config&, const model_shape& shape, const kv_view<KeyT, device_space>& keys,
                    const kv_view<KeyT, device_space>&, const window_view<QueryT, device_space>&,
                    const score_view<device_space>& scores, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::key_norm";
    using element = cuda_detail::device_element_t<KeyT>;
    const std::int64_t total = scores.extent(0) * shape.kv_heads * keys.extent(2);
    if (total == 0) return;
    const cuda_detail::key_norm_parameters<element> p{reinterpret_cast<const element*>(keys.data),
                                                      keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
                                                      shape.kv_heads, keys.extent(2), keys.extent(3), total,
                                                      scores.data};
    const auto blocks = static_cast<unsigned>(
        std::min<std::int64_t>(cuda_detail::ceil_div(total * cuda_detail::key_norm_lanes, 256), 65535));
    cuda_detail::key_norm_scores<element><<<blocks, 256, 0, stream>>>(p);
    detail::check_launch(function, "key_norm_scores");
  }
};

}  // namespace kvtrim
