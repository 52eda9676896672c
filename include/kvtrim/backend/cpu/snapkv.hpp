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
  /// Per thread: the unit's fp32 keys, a block of logits, the accumulator and the pooled row.
  static std::size_t workspace_bytes(const score::snapkv::config&, const model_shape& shape, std::int64_t batch,
                                     std::int64_t tokens) {
    return detail::attention_mass_workspace_bytes(shape, batch, tokens);
  }

  template <class KeyT, class QueryT>
  static void score(const score::snapkv::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>& queries, const score_view<>& scores,
                    workspace scratch, backend::host_stream) {
    const std::int64_t tokens = keys.extent(2);
    score::snapkv::check("kvtrim::score::snapkv", cfg, tokens, queries.extent(2));
    detail::check_given_lse("kvtrim::score::snapkv", cfg.lse, cfg.lse_extents, cfg.lse_strides, scores.extent(0),
                            shape.q_heads, queries.extent(2));
    const std::int64_t window = cfg.window;
    const std::int64_t prefix = tokens - window;
    detail::reduce_attention_mass(keys, queries, shape, scores, cfg.group, queries.extent(2) - window, prefix,
                                  scratch, [&](float* mass, float* pooled) {
                                    if (cfg.reduction == score::window_reduction::mean)
                                      for (std::int64_t j = 0; j < prefix; ++j) mass[j] /= static_cast<float>(window);
                                    for (std::int64_t j = 0; j < prefix; ++j)
                                      pooled[j] = detail::pool_at(mass, prefix, j, cfg.kernel, cfg.pooling);
                                    return pooled;
                                  },
                                  tensor_view<const float, 3>{cfg.lse, cfg.lse_extents, cfg.lse_strides});
    for (std::int64_t b = 0; b < scores.extent(0); ++b)  // the window is always kept
      for (std::int64_t h = 0; h < shape.kv_heads; ++h)
        for (std::int64_t j = prefix; j < tokens; ++j) scores(b, h, j) = std::numeric_limits<float>::infinity();
  }
};

}  // namespace kvtrim
