// kvtrim/backend/cpu/attention_mass.hpp — CPU reference of the attention mass
// shared by score::snapkv and score::h2o (see score/attention_mass.hpp).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvtrim/core/element.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/score/attention_mass.hpp"

namespace kvtrim::detail {

/// Scratch floats per (sequence, kv head) at a time: one row of logits, one accumulator row.
inline std::int64_t attention_mass_scratch_floats(std::int64_t tokens) { return 2 * tokens; }

/// accumulator[j] += softmax_j(q_t·k_j/√D) for each observed query t ∈ [first, n_q) of
/// query head `q_head`, keys j ≤ its position T − n_q + t (causal), in fp32: logits,
/// max, Σ exp(l − max) left to right, then p = exp(l − max) / Σ, as torch's softmax.
template <class KeyT, class QueryT>
void accumulate_attention(const kv_view<const KeyT>& keys, const window_view<const QueryT>& queries, std::int64_t b,
                          std::int64_t kv_head, std::int64_t q_head, std::int64_t first, float* logits,
                          float* accumulator) {
  const std::int64_t tokens = keys.extent(2);
  const std::int64_t observed = queries.extent(2);
  const std::int64_t head_dim = keys.extent(3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::array<float, max_head_dim> query{};
  for (std::int64_t t = first; t < observed; ++t) {
    const std::int64_t position = tokens - observed + t;
    for (std::int64_t d = 0; d < head_dim; ++d) query[static_cast<std::size_t>(d)] = to_float(queries(b, q_head, t, d));
    float max_logit = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j <= position; ++j) {
      float dot = 0.0f;
      for (std::int64_t d = 0; d < head_dim; ++d) dot += query[static_cast<std::size_t>(d)] * to_float(keys(b, kv_head, j, d));
      logits[j] = dot * scale;
      max_logit = std::fmax(max_logit, logits[j]);
    }
    float denominator = 0.0f;
    for (std::int64_t j = 0; j <= position; ++j) denominator += std::exp(logits[j] - max_logit);
    for (std::int64_t j = 0; j <= position; ++j) accumulator[j] += std::exp(logits[j] - max_logit) / denominator;
  }
}

/// The loop SnapKV and H2O share. For every (sequence b, kv head h): for each query
/// head of h's group, accumulate its attention over observed queries [first, n_q)
/// (accumulate_attention), let `query_head_row(accumulator)` turn that into the query
/// head's scores over tokens [0, length) (returning a pointer to them), and reduce
/// the group into scores(b, h, 0 .. length): mean = sum then one division, or max.
/// Scratch: `attention_mass_scratch_floats(T)` floats at `scratch`.
template <class KeyT, class QueryT, class QueryHeadRow>
void reduce_attention_mass(const kv_view<const KeyT>& keys, const window_view<const QueryT>& queries,
                           const model_shape& shape, const score_view<>& scores, score::group_reduction reduction,
                           std::int64_t first, std::int64_t length, float* scratch, QueryHeadRow&& query_head_row) {
  const std::int64_t tokens = keys.extent(2);
  const std::int64_t group = shape.group_size();
  float* logits = scratch;
  float* accumulator = scratch + tokens;
  for (std::int64_t b = 0; b < scores.extent(0); ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
      float* row = &scores(b, h, 0);
      for (std::int64_t g = 0; g < group; ++g) {
        for (std::int64_t j = 0; j < tokens; ++j) accumulator[j] = 0.0f;
        accumulate_attention(keys, queries, b, h, h * group + g, first, logits, accumulator);
        const float* head_row = query_head_row(accumulator);
        for (std::int64_t j = 0; j < length; ++j) {
          if (g == 0)
            row[j] = head_row[j];
          else if (reduction == score::group_reduction::mean)
            row[j] += head_row[j];
          else
            row[j] = std::fmax(row[j], head_row[j]);
        }
      }
      if (reduction == score::group_reduction::mean)
        for (std::int64_t j = 0; j < length; ++j) row[j] /= static_cast<float>(group);
    }
}

}  // namespace kvtrim::detail
