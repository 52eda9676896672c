// kvtrim/backend/cuda/static_window.cuh — score::static_window on the GPU:
// writes score(i) = +∞ for sinks and for each head's own recent window, i
// otherwise (see score/static_window.hpp): the same function the CPU reference
// evaluates. Per-head windows travel in the kernel's parameters (up to
// max_window_heads kv heads), so scoring reads no extra memory and needs no copy.
#pragma once

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/static_window.hpp"

namespace kvtrim {

namespace cuda_detail {
inline constexpr int max_window_heads = 512;

template <int MaxWindowHeads>
struct static_window_parameters {
  float* scores;  // dense [batch, kv_heads, tokens]
  std::int64_t heads, kv_heads, tokens, sinks;
  std::int32_t window[MaxWindowHeads];  // per kv head; all 0 without per-head windows
};

// A template (over the parameter block's capacity) so that any number of
// translation units may include this header: a template's instantiations merge
// at link time, a plain __global__ function's host stub would be defined in
// every .cu file that includes it (issue 9; tests/link/).
template <int MaxWindowHeads>
__global__ void static_window_scores(const __grid_constant__ static_window_parameters<MaxWindowHeads> p) {
  const std::int64_t total = p.heads * p.tokens;
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat < total;
       flat += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t h = (flat / p.tokens) % p.kv_heads;
    p.scores[flat] = score::static_window::score(p.sinks, p.window[h], p.tokens, flat % p.tokens);
  }
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
    const std::int64_t kv_heads = scores.extent(1);
    score::static_window::check(function, cfg, kv_heads);
    if (!cfg.windows.empty() && kv_heads > cuda_detail::max_window_heads)
      detail::fail(function, "config.score.windows",
                   detail::cat("per-head windows for at most ", cuda_detail::max_window_heads, " kv heads on backend::cuda"),
                   detail::cat(kv_heads, " kv heads"));
    // scores is the dense [B, H, T] buffer the scheme carved from the workspace.
    cuda_detail::static_window_parameters<cuda_detail::max_window_heads> parameters{
        scores.data, scores.extent(0) * kv_heads, kv_heads, tokens, cfg.sinks, {}};
    for (std::int64_t h = 0; h < static_cast<std::int64_t>(cfg.windows.size()); ++h)
      parameters.window[h] = static_cast<std::int32_t>(std::min<std::int64_t>(cfg.windows[h], tokens));
    const auto blocks = static_cast<unsigned>(
        std::min<std::int64_t>(cuda_detail::ceil_div(parameters.heads * tokens, 256), 65535));
    cuda_detail::static_window_scores<cuda_detail::max_window_heads><<<blocks, 256, 0, stream>>>(parameters);
    detail::check_launch(function, "static_window_scores");
  }
};

}  // namespace kvtrim
