// kvtrim/backend/cpu/snapkv.hpp — CPU reference of score::snapkv.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/attention_mass.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/score/snapkv.hpp"

namespace kvtrim {

template <>
struct implementation<score::snapkv, backend::cpu> {
  /// Logits and accumulator rows, plus the window-reduced row the pooling reads.
  static std::size_t workspace_bytes(const score::snapkv::config&, const model_shape&, std::int64_t /*batch*/,
                                     std::int64_t tokens) {
    return static_cast<std::size_t>(detail::attention_mass_scratch_floats(tokens) + tokens) * sizeof(float);
  }

  template <class KeyT, class QueryT>
  static void score(const score::snapkv::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>& queries, const score_view<>& scores,
                    workspace scratch, backend::host_stream) {
    const std::int64_t tokens = keys.extent(2);
    score::snapkv::check("kvtrim::score::snapkv", cfg, tokens, queries.extent(2));
    const std::int64_t window = cfg.window;
    const std::int64_t prefix = tokens - window;
    const std::int64_t group = shape.group_size();
    auto* logits = static_cast<float*>(scratch.data);
    float* accumulator = logits + tokens;
    float* pooled = accumulator + tokens;
    for (std::int64_t b = 0; b < scores.extent(0); ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        float* row = &scores(b, h, 0);
        for (std::int64_t g = 0; g < group; ++g) {
          for (std::int64_t j = 0; j < tokens; ++j) accumulator[j] = 0.0f;
          detail::accumulate_attention(keys, queries, b, h, h * group + g, queries.extent(2) - window, logits,
                                       accumulator);
          if (cfg.reduction == score::window_reduction::mean)
            for (std::int64_t j = 0; j < prefix; ++j) accumulator[j] /= static_cast<float>(window);
          for (std::int64_t j = 0; j < prefix; ++j)
            pooled[j] = detail::pool_at(accumulator, prefix, j, cfg.kernel, cfg.pooling);
          detail::reduce_group(cfg.group, g == 0, pooled, row, prefix);
        }
        detail::finish_group(cfg.group, group, row, prefix);
        for (std::int64_t j = prefix; j < tokens; ++j) row[j] = std::numeric_limits<float>::infinity();
      }
  }
};

}  // namespace kvtrim
