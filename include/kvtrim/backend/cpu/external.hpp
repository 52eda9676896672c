// kvtrim/backend/cpu/external.hpp — CPU reference of score::external: copies the
// caller's scores (NaN ranked as −∞), see score/external.hpp.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/external.hpp"

namespace kvtrim {

template <>
struct implementation<score::external, backend::cpu> {
  template <class KeyT, class QueryT>
  static void score(const score::external::config& cfg, const model_shape& shape, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>&, const score_view<>& scores,
                    backend::host_stream) {
    const std::int64_t batch = scores.extent(0), tokens = keys.extent(2);
    score::external::check("kvtrim::score::external", cfg, batch, shape.kv_heads, tokens);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h)
        for (std::int64_t j = 0; j < tokens; ++j)
          scores(b, h, j) =
              score::external::rank_value(cfg.scores[b * cfg.strides[0] + h * cfg.strides[1] + j * cfg.strides[2]]);
  }
};

}  // namespace kvtrim
