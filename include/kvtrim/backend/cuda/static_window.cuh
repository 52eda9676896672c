// kvtrim/backend/cuda/static_window.cuh — score::static_window on the GPU:
// writes score(i) = +∞ for sinks, i otherwise (see score/static_window.hpp),
// the same function the CPU reference evaluates.
#pragma once

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/static_window.hpp"

namespace kvtrim {

namespace cuda_detail {
__global__ void static_window_scores(float* scores, std::int64_t heads, std::int64_t tokens, std::int64_t sinks) {
  const std::int64_t total = heads * tokens;
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat < total;
       flat += std::int64_t{gridDim.x} * blockDim.x)
    scores[flat] = score::static_window::score(sinks, flat % tokens);
}
}  // namespace cuda_detail

template <>
struct implementation<score::static_window, backend::cuda> {
  template <class KeyT, class QueryT>
  static void score(const score::static_window::config& cfg, const model_shape&,
                    const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>&,
                    const window_view<QueryT, device_space>&, const score_view<device_space>& scores,
                    cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::static_window";
    const std::int64_t tokens = keys.extent(2);
    if (tokens > score::static_window::max_tokens)
      detail::fail(function, "keys", detail::cat("at most ", score::static_window::max_tokens, " tokens"),
                   std::to_string(tokens));
    // scores is the dense [B, H, T] buffer the scheme carved from the workspace.
    const std::int64_t heads = scores.extent(0) * scores.extent(1);
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cuda_detail::ceil_div(heads * tokens, 256), 65535));
    cuda_detail::static_window_scores<<<blocks, 256, 0, stream>>>(scores.data, heads, tokens, cfg.sinks);
    detail::check_launch(function, "static_window_scores");
  }
};

}  // namespace kvtrim
