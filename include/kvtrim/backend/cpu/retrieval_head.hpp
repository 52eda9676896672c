// kvtrim/backend/cpu/retrieval_head.hpp — CPU reference of score::retrieval_head
// (RazorAttention): scores, per-head keep counts, and the compensation tokens.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/retrieval_head.hpp"

namespace kvtrim {

template <>
struct implementation<score::retrieval_head, backend::cpu> {
  using policy = score::retrieval_head;

  template <class KeyT, class QueryT>
  static void score(const policy::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>&, const score_view<>& scores,
                    backend::host_stream) {
    constexpr std::string_view function = "kvtrim::score::retrieval_head";
    if (static_cast<std::int64_t>(cfg.retrieval.size()) != shape.kv_heads)
      detail::fail(function, "config.score.retrieval",
                   detail::cat("one retrieval flag per kv head (", shape.kv_heads,
                               "), e.g. from a calibration profile"),
                   detail::cat(cfg.retrieval.size(), " flags"));
    const std::int64_t tokens = keys.extent(2);
    if (tokens > policy::max_tokens)
      detail::fail(function, "keys", detail::cat("at most ", policy::max_tokens, " tokens"), std::to_string(tokens));
    for (std::int64_t b = 0; b < scores.extent(0); ++b)
      for (std::int64_t h = 0; h < scores.extent(1); ++h)
        for (std::int64_t i = 0; i < tokens; ++i) scores(b, h, i) = policy::score(cfg.sinks, cfg.compensation, i);
  }

  static void keep_counts(const policy::config& cfg, const model_shape& shape,
                          const tensor_view<const float, 3>& scores, std::int32_t* keep_counts, backend::host_stream) {
    const std::int64_t tokens = scores.extent(2);
    for (std::int64_t head = 0; head < scores.extent(0) * scores.extent(1); ++head)
      keep_counts[head] = static_cast<std::int32_t>(
          policy::keep_count(cfg, cfg.retrieval[static_cast<std::size_t>(head % shape.kv_heads)], tokens));
  }

  /// Overwrites the placeholder at index S of every compressed head with the
  /// mean of its dropped keys and values (accumulated in double) and records
  /// the logit bias ln N_d in the layout's compensation table.
  template <class View, class KeyT>
  static void compensate(const policy::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                         const kv_view<KeyT>& values, const selection_view<host_space>& kept, View& cache,
                         backend::host_stream) {
    if (!cfg.compensation) return;
    const std::int64_t tokens = keys.extent(2);
    const std::int64_t dropped = policy::dropped(cfg, tokens);
    if (dropped == 0) return;
    const std::int64_t first = cfg.sinks;  // dropped tokens: [S, S + N_d) = [S, T − W)
    std::array<double, max_head_dim> key_sum{}, value_sum{};
    std::array<float, max_head_dim> key_mean{}, value_mean{};
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        const std::int64_t head = b * shape.kv_heads + h;
        if (kept.count(head) == tokens) continue;  // a retrieval head
        if (kept.tokens[kept.offsets[head] + first] != first)
          detail::fail("kvtrim::score::retrieval_head::compensate", "selection",
                       detail::cat("the placeholder token ", first, " kept at index ", first),
                       detail::cat("token ", kept.tokens[kept.offsets[head] + first], " in head ", head));
        for (std::int64_t d = 0; d < shape.head_dim; ++d) key_sum[d] = value_sum[d] = 0.0;
        for (std::int64_t t = first; t < first + dropped; ++t)
          for (std::int64_t d = 0; d < shape.head_dim; ++d) {
            key_sum[d] += static_cast<double>(to_float(keys(b, h, t, d)));
            value_sum[d] += static_cast<double>(to_float(values(b, h, t, d)));
          }
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          key_mean[d] = static_cast<float>(key_sum[d] / static_cast<double>(dropped));
          value_mean[d] = static_cast<float>(value_sum[d] / static_cast<double>(dropped));
        }
        // Position: the last dropped token's (docs/composition.md §1).
        View::codec::encode(cache.storage, head, cache.slot(b, h, first), first + dropped - 1, key_mean.data(),
                            value_mean.data());
        cache.compensation.index[head] = static_cast<std::int32_t>(first);
        cache.compensation.bias[head] = static_cast<float>(std::log(static_cast<double>(dropped)));
      }
  }
};

}  // namespace kvtrim
