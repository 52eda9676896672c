// kvtrim/backend/cuda/retrieval_head.cuh — score::retrieval_head (RazorAttention)
// on the GPU: scores, per-head keep counts and the compensation tokens, the same
// functions as backend/cpu/retrieval_head.hpp evaluates (see
// score/retrieval_head.hpp for the paper, math and defaults).
//
// - score: s(i) = static_window's score with S + 1 sinks (the placeholder at S
//   is kept, then replaced by the compensation token).
// - keep_counts: T for a retrieval head (or when fewer than two tokens would be
//   dropped), S + W (+1) otherwise. Both counts and the retrieval flags are known
//   on the host from the config and travel in the kernel's parameters: no copy,
//   no host round trip.
// - compensation_rows: per compressed head, the means of the N_d dropped keys and
//   values [S, S + N_d), accumulated in double as the CPU does (the order differs:
//   each thread sums every 16th token, then a fixed tree; in double the float
//   result is the CPU's except within 1 ulp at a rounding boundary), the bias
//   ln N_d and the position of the last dropped token. A head is "compressed"
//   when the selection keeps fewer than T tokens — read on the device from the
//   selection's offsets. The rows go to detail::compensation_rows
//   (core/selection.hpp), the layout-independent hand-off that the paged and flat
//   layouts' compact write through the codec. The CPU also checks that the
//   selection kept the placeholder at index S; the scores make that so (S is a
//   sink), and a device kernel cannot throw, so the device relies on it.
// Grid: (heads, ⌈D/32⌉) blocks of 32 channels × 16 token lanes: every block reads
// 32 consecutive channels of every dropped token of one head.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/retrieval_head.hpp"

namespace kvtrim {

namespace cuda_detail {
inline constexpr int max_retrieval_heads = 1024;

template <int MaxHeads>
struct retrieval_head_parameters {
  float* scores;  // dense [B, H, T]
  std::int32_t* keep_counts;
  std::int64_t heads, kv_heads, tokens, sinks;
  bool compensation;
  std::int32_t retrieval_keep, other_keep;  // tokens a retrieval / another head keeps
  std::uint32_t retrieval[MaxHeads / 32];   // one bit per kv head
};

template <int MaxHeads>
__global__ void retrieval_head_scores(const __grid_constant__ retrieval_head_parameters<MaxHeads> p) {
  const std::int64_t total = p.heads * p.tokens;
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat < total;
       flat += std::int64_t{gridDim.x} * blockDim.x)
    p.scores[flat] = score::retrieval_head::score(p.sinks, p.compensation, flat % p.tokens);
}

template <int MaxHeads>
__global__ void retrieval_head_keep_counts(const __grid_constant__ retrieval_head_parameters<MaxHeads> p) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < p.heads;
       head += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t h = head % p.kv_heads;
    p.keep_counts[head] = (p.retrieval[h / 32] >> (h % 32)) & 1u ? p.retrieval_keep : p.other_keep;
  }
}

template <class T>
struct compensation_parameters {
  const T* keys;
  const T* values;
  std::int64_t batch_stride, head_stride, token_stride, channel_stride;  // shared by keys and values
  std::int64_t kv_heads, head_dim, tokens;
  const std::int64_t* offsets;  // the selection's [heads + 1]
  detail::compensation_rows rows;
  bool active;                  // compensation on and N_d > 0
  std::int64_t first, dropped;  // dropped tokens [first, first + dropped)
  float bias;                   // ln N_d
  std::int64_t position;        // start + first + dropped − 1
};

inline constexpr int compensation_channels = 32, compensation_lanes = 16;

template <class T>
__global__ void __launch_bounds__(compensation_channels* compensation_lanes)
    compensation_means(const __grid_constant__ compensation_parameters<T> p) {
  __shared__ double key_sums[compensation_lanes][compensation_channels];
  __shared__ double value_sums[compensation_lanes][compensation_channels];
  const std::int64_t head = blockIdx.x;
  const bool compressed = p.active && p.offsets[head + 1] - p.offsets[head] != p.tokens;
  if (blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
    p.rows.index[head] = compressed ? static_cast<std::int32_t>(p.first) : -1;
    p.rows.bias[head] = compressed ? p.bias : 0.0f;
    p.rows.position[head] = compressed ? p.position : 0;
  }
  if (!compressed) return;  // the CPU leaves those heads' rows untouched too
  const std::int64_t b = head / p.kv_heads, h = head % p.kv_heads;
  const std::int64_t d = std::int64_t{blockIdx.y} * compensation_channels + threadIdx.x;
  double key_sum = 0.0, value_sum = 0.0;
  if (d < p.head_dim) {
    const std::int64_t base = b * p.batch_stride + h * p.head_stride + d * p.channel_stride;
    for (std::int64_t t = p.first + threadIdx.y; t < p.first + p.dropped; t += compensation_lanes) {
      key_sum += static_cast<double>(to_float(p.keys[base + t * p.token_stride]));
      value_sum += static_cast<double>(to_float(p.values[base + t * p.token_stride]));
    }
  }
  key_sums[threadIdx.y][threadIdx.x] = key_sum;
  value_sums[threadIdx.y][threadIdx.x] = value_sum;
  __syncthreads();
  for (int width = compensation_lanes / 2; width > 0; width /= 2) {
    if (threadIdx.y < width) {
      key_sums[threadIdx.y][threadIdx.x] += key_sums[threadIdx.y + width][threadIdx.x];
      value_sums[threadIdx.y][threadIdx.x] += value_sums[threadIdx.y + width][threadIdx.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && d < p.head_dim) {
    p.rows.keys[head * p.head_dim + d] = static_cast<float>(key_sums[0][threadIdx.x] / static_cast<double>(p.dropped));
    p.rows.values[head * p.head_dim + d] =
        static_cast<float>(value_sums[0][threadIdx.x] / static_cast<double>(p.dropped));
  }
}
}  // namespace cuda_detail

template <>
struct implementation<score::retrieval_head, backend::cuda> {
  using policy = score::retrieval_head;
  using parameters = cuda_detail::retrieval_head_parameters<cuda_detail::max_retrieval_heads>;

  template <class KeyT, class QueryT>
  static void score(const policy::config& cfg, const model_shape& shape, const kv_view<KeyT, device_space>& keys,
                    const kv_view<KeyT, device_space>&, const window_view<QueryT, device_space>&,
                    const score_view<device_space>& scores, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::retrieval_head";
    const std::int64_t tokens = keys.extent(2);
    const parameters p = make_parameters(function, cfg, shape, scores.data, nullptr, scores.extent(0), tokens);
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cuda_detail::ceil_div(p.heads * tokens, 256), 65535));
    cuda_detail::retrieval_head_scores<cuda_detail::max_retrieval_heads><<<blocks, 256, 0, stream>>>(p);
    detail::check_launch(function, "retrieval_head_scores");
  }

  static void keep_counts(const policy::config& cfg, const model_shape& shape,
                          const tensor_view<const float, 3, device_space>& scores, std::int32_t* keep_counts,
                          cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::retrieval_head::keep_counts";
    const parameters p = make_parameters(function, cfg, shape, nullptr, keep_counts, scores.extent(0), scores.extent(2));
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cuda_detail::ceil_div(p.heads, 256), 65535));
    cuda_detail::retrieval_head_keep_counts<cuda_detail::max_retrieval_heads><<<blocks, 256, 0, stream>>>(p);
    detail::check_launch(function, "retrieval_head_keep_counts");
  }

  /// The compensation token of every compressed head (see the header comment).
  template <class KeyT>
  static void compensation_rows(const policy::config& cfg, const model_shape& shape,
                                const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>& values,
                                const selection_view<device_space>& kept, std::int64_t start_position,
                                const detail::compensation_rows& rows, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::retrieval_head::compensate";
    using element = cuda_detail::device_element_t<KeyT>;
    cuda_detail::check_same_strides(function, keys, values);
    if (kept.heads < 1) return;
    if (kept.heads > 2147483647)
      detail::fail(function, "selection", "fewer heads than a grid holds", std::to_string(kept.heads));
    const std::int64_t tokens = keys.extent(2);
    const std::int64_t dropped = policy::dropped(cfg, tokens);
    cuda_detail::compensation_parameters<element> p{
        reinterpret_cast<const element*>(keys.data), reinterpret_cast<const element*>(values.data), keys.stride(0),
        keys.stride(1), keys.stride(2), keys.stride(3), shape.kv_heads, shape.head_dim, tokens, kept.offsets, rows,
        cfg.compensation && dropped > 0, cfg.sinks, dropped,
        dropped > 0 ? static_cast<float>(std::log(static_cast<double>(dropped))) : 0.0f,
        start_position + cfg.sinks + dropped - 1};
    const dim3 grid(static_cast<unsigned>(kept.heads),
                    static_cast<unsigned>(cuda_detail::ceil_div(shape.head_dim, cuda_detail::compensation_channels)));
    cuda_detail::compensation_means<element>
        <<<grid, dim3(cuda_detail::compensation_channels, cuda_detail::compensation_lanes), 0, stream>>>(p);
    detail::check_launch(function, "compensation_means");
  }

 private:
  static parameters make_parameters(std::string_view function, const policy::config& cfg, const model_shape& shape,
                                    float* scores, std::int32_t* keep_counts, std::int64_t batch,
                                    std::int64_t tokens) {
    if (static_cast<std::int64_t>(cfg.retrieval.size()) != shape.kv_heads)
      detail::fail(function, "config.score.retrieval",
                   detail::cat("one retrieval flag per kv head (", shape.kv_heads, "), e.g. from a calibration profile"),
                   detail::cat(cfg.retrieval.size(), " flags"));
    if (tokens > policy::max_tokens)
      detail::fail(function, "keys", detail::cat("at most ", policy::max_tokens, " tokens"), std::to_string(tokens));
    if (shape.kv_heads > cuda_detail::max_retrieval_heads)
      detail::fail(function, "config.score.retrieval",
                   detail::cat("at most ", cuda_detail::max_retrieval_heads, " kv heads on backend::cuda"),
                   detail::cat(shape.kv_heads, " kv heads"));
    parameters p{};
    p.scores = scores;
    p.keep_counts = keep_counts;
    p.heads = batch * shape.kv_heads;
    p.kv_heads = shape.kv_heads;
    p.tokens = tokens;
    p.sinks = cfg.sinks;
    p.compensation = cfg.compensation;
    p.retrieval_keep = static_cast<std::int32_t>(policy::keep_count(cfg, true, tokens));
    p.other_keep = static_cast<std::int32_t>(policy::keep_count(cfg, false, tokens));
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      if (cfg.retrieval[static_cast<std::size_t>(h)]) p.retrieval[h / 32] |= 1u << (h % 32);
    return p;
  }
};

}  // namespace kvtrim
