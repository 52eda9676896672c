// kvtrim/backend/cpu/static_window.hpp — CPU reference of score::static_window.
#pragma once

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/static_window.hpp"

namespace kvtrim {

template <>
struct implementation<score::static_window, backend::cpu> {
  template <class KeyT, class QueryT>
  static void score(const score::static_window::config& cfg, const model_shape&, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>&, const score_view<>& scores,
                    backend::host_stream) {
    const std::int64_t tokens = keys.extent(2);
    score::static_window::check("kvtrim::score::static_window", cfg, scores.extent(1));
    if (tokens > score::static_window::max_tokens)
      detail::fail("kvtrim::score::static_window", "keys",
                   detail::cat("at most ", score::static_window::max_tokens, " tokens"), std::to_string(tokens));
    for (std::int64_t b = 0; b < scores.extent(0); ++b)
      for (std::int64_t h = 0; h < scores.extent(1); ++h)
        for (std::int64_t i = 0; i < tokens; ++i)
          scores(b, h, i) = score::static_window::score(cfg.sinks, score::static_window::window_of(cfg, h), tokens, i);
  }
};

}  // namespace kvtrim
