// kvtrim/backend/cpu/retrieval_head.hpp — CPU reference of score::retrieval_head
// (RazorAttention): scores, per-head keep counts, and the compensation tokens.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/x86.hpp"
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

  /// The compensation token of every compressed head, computed before
  /// compaction so the layout writes it in place of the placeholder it kept at
  /// index S, through the codec's ordered encode like any other token: key and
  /// value are the means of the dropped ones (accumulated in double), its logit
  /// bias ln N_d, its position the last dropped token's (docs/composition.md §1).
  template <class KeyT>
  static void compensation_rows(const policy::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                                const kv_view<KeyT>& values, const selection_view<host_space>& kept,
                                std::int64_t start_position, const detail::compensation_rows& rows,
                                backend::host_stream) {
    const std::int64_t tokens = keys.extent(2);
    const std::int64_t dropped = policy::dropped(cfg, tokens);
    const std::int64_t first = cfg.sinks;  // dropped tokens: [S, S + N_d) = [S, T − W)
    const std::int64_t head_dim = shape.head_dim;
    // Heads on threads (backend/cpu.hpp); each sums its dropped rows in token order,
    // so the means do not depend on the thread count. A refusal is the lowest head's.
    detail::cpu_parallel_for(kept.heads, detail::cpu_threads(), [&](std::int64_t head, std::int64_t) {
      rows.index[head] = -1;
      rows.bias[head] = 0.0f;
      rows.position[head] = 0;
      if (!cfg.compensation || dropped == 0 || kept.count(head) == tokens) return;  // whole (retrieval) head
      if (kept.tokens[kept.offsets[head] + first] != first)
        detail::fail("kvtrim::score::retrieval_head::compensate", "selection",
                     detail::cat("the placeholder token ", first, " kept at index ", first),
                     detail::cat("token ", kept.tokens[kept.offsets[head] + first], " in head ", head));
      const std::int64_t b = head / shape.kv_heads, h = head % shape.kv_heads;
      std::array<double, max_head_dim> key_sum{}, value_sum{};
      std::array<float, max_head_dim> key_row{}, value_row{};
      for (std::int64_t t = first; t < first + dropped; ++t) {
        read_row(keys, b, h, t, key_row.data());
        read_row(values, b, h, t, value_row.data());
        for (std::int64_t d = 0; d < head_dim; ++d) {
          key_sum[d] += static_cast<double>(key_row[d]);
          value_sum[d] += static_cast<double>(value_row[d]);
        }
      }
      for (std::int64_t d = 0; d < head_dim; ++d) {
        rows.keys[head * head_dim + d] = static_cast<float>(key_sum[d] / static_cast<double>(dropped));
        rows.values[head * head_dim + d] = static_cast<float>(value_sum[d] / static_cast<double>(dropped));
      }
      rows.index[head] = static_cast<std::int32_t>(first);
      rows.bias[head] = static_cast<float>(std::log(static_cast<double>(dropped)));
      rows.position[head] = start_position + first + dropped - 1;
    });
  }

 private:
  /// Row t of (b, h) → fp32 (F16C for contiguous fp16 rows where the CPU has it: the same bits).
  template <class KeyT>
  static void read_row(const kv_view<KeyT>& view, std::int64_t b, std::int64_t h, std::int64_t t, float* out) {
#if KVTRIM_X86_DISPATCH
    if constexpr (std::is_same_v<std::remove_const_t<KeyT>, half>)
      if (view.stride(3) == 1 && detail::x86::has_avx2_fma_f16c()) {
        detail::x86::convert_row<detail::x86::row_format::fp16>(&view(b, h, t, 0), out, view.extent(3));
        return;
      }
#endif
    for (std::int64_t d = 0; d < view.extent(3); ++d) out[d] = to_float(view(b, h, t, d));
  }
};

}  // namespace kvtrim
