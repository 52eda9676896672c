// kvtrim/score/attention_mass.hpp — what score::snapkv and score::h2o share:
// a key's importance is the attention probability that observed queries give it.
//
// For query head g, observed query t at position p_t and key j ≤ p_t (causal):
//   A_g[t, j] = softmax_j( q_{g,t} · k_j / √D )      (fp32, over every key j ≤ p_t)
// SnapKV and H2O differ in which queries they observe and in what they do with
// Σ_t A_g[t, j]; both then reduce the G query heads of a kv head to one score per
// kv head (scores are per kv head: kvtrim never caches repeated KV per query head).
//
// The knobs and small pieces of math here are shared by every backend.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/core/config.hpp"

namespace kvtrim::score {

/// How the G query heads of one kv head become one score.
enum class group_reduction {
  mean,  ///< kvpress, Ada-KV's default for GQA (arXiv 2410.00161)
  max,   ///< Ada-KV's `gqa_func = 'max'`: a token matters if one query head needs it
};

/// How SnapKV turns the window's attention into one value per key (same ranking
/// in exact arithmetic; kept apart because the last bits differ).
enum class window_reduction {
  mean,  ///< kvpress, Ada-KV
  sum,   ///< the SnapKV reference code
};

/// 1-D pooling over tokens (stride 1, padding kernel/2 on each side).
enum class pooling {
  avg,  ///< torch avg_pool1d (count_include_pad): the zero padding counts, edges are divided by kernel
  max,  ///< torch max_pool1d: padding never wins
};

constexpr std::string_view to_string(group_reduction reduction) {
  return reduction == group_reduction::mean ? "mean" : "max";
}
constexpr std::string_view to_string(pooling kind) { return kind == pooling::avg ? "avg" : "max"; }

}  // namespace kvtrim::score

namespace kvtrim::detail {

/// Pooled value at token i of row[0, length) with an odd `kernel` (the same
/// arithmetic order on every backend: left to right, then one division).
KVTRIM_HOST_DEVICE inline float pool_at(const float* row, std::int64_t length, std::int64_t i, std::int64_t kernel,
                                        score::pooling kind) {
  const std::int64_t half_width = kernel / 2;
  const std::int64_t first = i - half_width < 0 ? 0 : i - half_width;
  const std::int64_t last = i + half_width >= length ? length - 1 : i + half_width;
  if (kind == score::pooling::avg) {
    float sum = 0.0f;
    for (std::int64_t j = first; j <= last; ++j) sum += row[j];
    return sum / static_cast<float>(kernel);
  }
  float best = row[first];
  for (std::int64_t j = first + 1; j <= last; ++j) best = row[j] > best ? row[j] : best;
  return best;
}

}  // namespace kvtrim::detail
