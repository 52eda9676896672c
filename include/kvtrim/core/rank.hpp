// kvtrim/core/rank.hpp — the one order in which kvtrim ranks scored tokens.
//
// Every stage that picks "the best" tokens (select_top_k, the Ada-KV pool
// across heads, the CUDA kernels) uses this order, so backends agree bit for
// bit: higher score first; equal scores keep the lower index (token index, or
// the flattened (head, token) index across heads); NaN ranks below every
// number, −∞ included, so the order is a strict weak ordering whatever the input.
#pragma once

#include <cstdint>

#include "kvtrim/core/config.hpp"

namespace kvtrim::detail {

/// True when (score a, index a) ranks strictly before (score b, index b).
KVTRIM_HOST_DEVICE constexpr bool ranks_before(float score_a, std::int64_t index_a, float score_b,
                                               std::int64_t index_b) {
  const bool nan_a = score_a != score_a;
  const bool nan_b = score_b != score_b;
  if (nan_a != nan_b) return nan_b;              // a number ranks before a NaN
  if (!nan_a && score_a != score_b) return score_a > score_b;
  return index_a < index_b;                      // ties (and NaN pairs): lower index first
}

}  // namespace kvtrim::detail
