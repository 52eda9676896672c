// kvtrim/backend/cuda/h2o.cuh — score::h2o (H2O / kvpress ObservedAttention) on
// the GPU (see score/h2o.hpp for the paper, math and defaults;
// backend/cpu/h2o.hpp for the reference).
//
// Column sums of the causal attention of every prefill query, flash-style: the
// T × T attention is never stored. Pass 1 keeps each query row's online
// (max, Σexp) over 64-key tiles; pass 2 revisits each 64-key tile once per kv
// head and adds exp(l − m)/Z of every query that sees it (causal tiles that no
// row of a chunk sees are skipped). Then the observed normalisation (/(T − j)),
// the group reduction and +∞ for the protected recent tokens
// (cuda_detail::attention_mass_scores, backend/cuda/attention_mass.cuh).
// Cost O(T²·D) per query head, as on the CPU: a prefill-time scorer.
// Given normalisers (config.lse): pass 1 is skipped (attention_mass.cuh).
// Scratch: the attention mass workspace for T queries per query head.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/attention_mass.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/score/h2o.hpp"

namespace kvtrim {

template <>
struct implementation<score::h2o, backend::cuda> {
  static std::size_t workspace_bytes(const score::h2o::config&, const model_shape& shape, std::int64_t batch,
                                     std::int64_t tokens) {
    return cuda_detail::attention_mass_workspace_bytes(shape, batch, tokens, tokens, tokens);
  }

  /// Enough for every sequence of a padded batch alone, (1, t ≤ tokens) (scheme's carve).
  static std::size_t sequence_workspace_bytes(const score::h2o::config& cfg, const model_shape& shape,
                                              std::int64_t tokens) {
    return cuda_detail::largest_sequence_workspace(tokens, [&](std::int64_t t) { return workspace_bytes(cfg, shape, 1, t); });
  }

  template <class KeyT, class QueryT>
  static void score(const score::h2o::config& cfg, const model_shape& shape, const kv_view<KeyT, device_space>& keys,
                    const kv_view<KeyT, device_space>&, const window_view<QueryT, device_space>& queries,
                    const score_view<device_space>& scores, workspace scratch, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::h2o";
    const std::int64_t tokens = keys.extent(2);
    score::h2o::check(function, tokens, queries.extent(2));
    detail::check_given_lse(function, cfg.lse, cfg.lse_extents, cfg.lse_strides, scores.extent(0), shape.q_heads,
                            queries.extent(2));
    cuda_detail::mass_finish_parameters finish{};
    finish.kind = cuda_detail::mass_finish_kind::h2o;
    finish.window_divisor = 1.0f;
    finish.kernel = 1;
    finish.pooling = score::pooling::avg;
    finish.observed_normalisation = cfg.normalisation == score::h2o::normalisation::observed;
    finish.reduction = cfg.group;
    finish.protected_from = tokens - score::h2o::recent_tokens(cfg, tokens);  // the recent window is always kept
    cuda_detail::attention_mass_scores(function, keys, queries, shape, scores, 0, tokens, finish, scratch, stream,
                                       tensor_view<const float, 3, device_space>{cfg.lse, cfg.lse_extents,
                                                                                 cfg.lse_strides});
  }
};

}  // namespace kvtrim
