// kvtrim/backend/cpu/h2o.hpp — CPU reference of score::h2o.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/attention_mass.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/score/h2o.hpp"

namespace kvtrim {

template <>
struct implementation<score::h2o, backend::cpu> {
  static std::size_t workspace_bytes(const score::h2o::config&, const model_shape& shape, std::int64_t batch,
                                     std::int64_t tokens) {
    return detail::attention_mass_workspace_bytes(shape, batch, tokens);
  }

  template <class KeyT, class QueryT>
  static void score(const score::h2o::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>& queries, const score_view<>& scores,
                    workspace scratch, backend::host_stream) {
    const std::int64_t tokens = keys.extent(2);
    score::h2o::check("kvtrim::score::h2o", tokens, queries.extent(2));
    detail::check_given_lse("kvtrim::score::h2o", cfg.lse, cfg.lse_extents, cfg.lse_strides, scores.extent(0),
                            shape.q_heads, queries.extent(2));
    const std::int64_t recent = score::h2o::recent_tokens(cfg, tokens);
    detail::reduce_attention_mass(keys, queries, shape, scores, cfg.group, 0, tokens,
                                  scratch, [&](float* mass, float*) {
                                    if (cfg.normalisation == score::h2o::normalisation::observed)
                                      for (std::int64_t j = 0; j < tokens; ++j) mass[j] /= static_cast<float>(tokens - j);
                                    return mass;
                                  },
                                  tensor_view<const float, 3>{cfg.lse, cfg.lse_extents, cfg.lse_strides});
    for (std::int64_t b = 0; b < scores.extent(0); ++b)  // the recent window is always kept
      for (std::int64_t h = 0; h < shape.kv_heads; ++h)
        for (std::int64_t j = tokens - recent; j < tokens; ++j) scores(b, h, j) = std::numeric_limits<float>::infinity();
  }
};

}  // namespace kvtrim
