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
//
// Given normalisers (issue 10). An engine's prefill attention already computed
// every prompt query's softmax normaliser (FlashAttention's `softmax_lse`,
// FlashInfer's `return_lse`). Both scorers' configs take it, as score::external
// takes scores: a pointer, the extents the caller thinks it has and the strides
// (elements), in the memory space of the backend that runs (host memory for
// backend::cpu, device memory for backend::cuda, written before the call on its
// stream); `config::with_lse(view)` fills them from a tensor_view. Then
//   A_g[t, j] = exp(q_{g,t}·k_j/√D − L_g[t])
// and nothing else is computed per row: on the GPU, pass 1 of the two passes over
// K (backend/cuda/attention_mass.cuh) is skipped — at W on the H100 45 % of the
// score's time, 33 % of a contiguous SnapKV compress (docs/results.md); the CPU
// still computes every logit and skips the row's max and sum.
//   Tensor: [batch, q_heads, n_q] float, n_q = the observed queries handed to the
//   call (window_queries' extent 2: SnapKV reads the last `window` rows of it, the
//   earlier ones are not read; H2O every prefill query). Extents are checked
//   against the call when it runs (never at plan time: plan_capacity and the
//   workspace size need no normalisers); a mismatch names config.score.lse.
//   Value: the natural-log normaliser L_g[t] = ln Σ_{j ≤ p_t} exp(q_{g,t}·k_j/√D)
//   over every key up to the query's position p_t (causal), with kvtrim's scale
//   1/√D — FlashAttention's softmax_lse convention. FlashInfer's LSE is in base 2
//   (log2 Σ 2^(q·k·log2(e)/√D)): multiply it by ln 2 first. An engine that runs
//   its attention with another softmax scale (a model-specific one) has other
//   normalisers: they must not be handed in.
//   Not checked: that the values are the right ones (that needs the pass they
//   replace). A normaliser below the true one makes probabilities above 1 (scores
//   may reach +∞, which every budget treats as a protected token, as
//   score::external's +∞); one above it makes them smaller. Only their ranking matters.
//   Non-finite values (NaN, ±∞: no real prompt row has one — every query sees at
//   least its own key, so its normaliser is finite): the row contributes nothing,
//   as FlashAttention's +∞ for a row with no keys would in exact arithmetic, on
//   both backends alike. A device kernel cannot throw, and the CPU refusing what a
//   device call reads silently would make the backends disagree; so neither refuses
//   and neither reaches undefined behaviour (no NaN reaches a score).
// Null (the default): the normalisers are computed, as the papers do.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

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

/// `cfg` with the normalisers held in `view` (score::snapkv / h2o config::with_lse).
template <class Config, class T, MemorySpace Space>
Config with_given_lse(Config cfg, const tensor_view<T, 3, Space>& view) {
  cfg.lse = view.data;
  cfg.lse_extents = view.extents;
  cfg.lse_strides = view.strides;
  return cfg;
}

/// The given normalisers' knob check (config.validate): non-negative strides (the
/// strides of no normalisers are not read). `argument`: what the error names.
inline void validate_given_lse(std::string_view function, const float* lse, const std::array<std::int64_t, 3>& strides,
                               std::string_view argument = "config.score.lse") {
  if (lse == nullptr) return;
  for (std::size_t axis = 0; axis < 3; ++axis)
    if (strides[axis] < 0) fail(function, argument, "non-negative strides", cat("stride ", strides[axis], " on axis ", axis));
}

/// The given normalisers against the call (when given): [batch, q_heads, observed],
/// non-negative strides (again: a scorer called without a scheme has not validated).
inline void check_given_lse(std::string_view function, const float* lse, const std::array<std::int64_t, 3>& extents,
                            const std::array<std::int64_t, 3>& strides, std::int64_t batch, std::int64_t q_heads,
                            std::int64_t observed, std::string_view argument = "config.score.lse") {
  if (lse == nullptr) return;
  validate_given_lse(function, lse, strides, argument);
  if (extents != std::array<std::int64_t, 3>{batch, q_heads, observed})
    fail(function, argument,
         cat("normalisers of extents [", batch, ", ", q_heads, ", ", observed,
             "] (batch, q heads, observed queries of window_queries)"),
         cat("[", extents[0], ", ", extents[1], ", ", extents[2], "]"));
}

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
