// kvtrim/backend/cpu/per_head.hpp — CPU reference of budget::per_head.
#pragma once

#include <cstdint>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/budget/per_head.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

template <>
struct implementation<budget::per_head, backend::cpu> {
  static void keep_counts(const budget::per_head::config& cfg, const tensor_view<const float, 3>& scores,
                          std::int32_t* keep_counts, backend::host_stream) {
    if (scores.extent(1) != cfg.kv_heads)
      detail::fail("kvtrim::budget::per_head", "config.budget.kv_heads",
                   detail::cat("the layer's kv heads (", scores.extent(1), ")"), std::to_string(cfg.kv_heads));
    for (std::int64_t b = 0; b < scores.extent(0); ++b)
      for (std::int64_t h = 0; h < cfg.kv_heads; ++h)
        keep_counts[b * cfg.kv_heads + h] =
            static_cast<std::int32_t>(budget::per_head::head_keep(cfg, h, scores.extent(2)));
  }
};

}  // namespace kvtrim
