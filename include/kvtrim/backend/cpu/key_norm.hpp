// kvtrim/backend/cpu/key_norm.hpp — CPU reference of score::key_norm.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/key_norm.hpp"

namespace kvtrim {

template <>
struct implementation<score::key_norm, backend::cpu> {
  template <class KeyT, class QueryT>
  static void score(const score::key_norm::config&, const model_shape& shape, const kv_view<KeyT>& keys,
                    const kv_view<KeyT>&, const window_view<QueryT>&, const score_view<>& scores,
                    backend::host_stream) {
    for (std::int64_t b = 0; b < scores.extent(0); ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h)
        for (std::int64_t j = 0; j < keys.extent(2); ++j) {
          double squares = 0.0;
          for (std::int64_t d = 0; d < keys.extent(3); ++d) {
            const double x = static_cast<double>(to_float(keys(b, h, j, d)));
            squares += x * x;
          }
          scores(b, h, j) = static_cast<float>(-std::sqrt(squares));
        }
  }
};

}  // namespace kvtrim
