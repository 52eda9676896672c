// kvtrim/backend/cpu/pyramid.hpp — CPU reference of budget::pyramid.
#pragma once

#include <cstdint>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/budget/pyramid.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

template <>
struct implementation<budget::pyramid, backend::cpu> {
  static void keep_counts(const budget::pyramid::config& cfg, const tensor_view<const float, 3>& scores,
                          std::int32_t* keep_counts, backend::host_stream) {
    const auto keep = static_cast<std::int32_t>(budget::pyramid::layer_keep(cfg, scores.extent(2)));
    for (std::int64_t head = 0; head < scores.extent(0) * scores.extent(1); ++head) keep_counts[head] = keep;
  }
};

}  // namespace kvtrim
