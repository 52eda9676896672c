// kvtrim/backend/cpu/select_top_k.hpp — CPU reference of the selection stage.
//
// Per head: order tokens by (score descending, index ascending), keep the first
// keep_count, and list them in ascending token order. The order is
// detail::ranks_before (core/rank.hpp): NaN scores rank below every number, so
// a NaN token is kept only when the budget needs it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/rank.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

template <>
struct implementation<stage::select_top_k, backend::cpu> {
  /// One head's index list at a time.
  static std::size_t workspace_bytes(std::int64_t /*heads*/, std::int64_t tokens) {
    return static_cast<std::size_t>(tokens) * sizeof(std::int32_t);
  }

  static void select(const tensor_view<const float, 3>& scores, const std::int32_t* keep_counts,
                     std::int64_t* offsets, std::int32_t* kept_tokens, workspace scratch, backend::host_stream) {
    const std::int64_t kv_heads = scores.extent(1);
    const std::int64_t tokens = scores.extent(2);
    const std::int64_t heads = scores.extent(0) * kv_heads;
    auto* order = static_cast<std::int32_t*>(scratch.data);
    offsets[0] = 0;
    for (std::int64_t head = 0; head < heads; ++head) {
      const std::int64_t b = head / kv_heads;
      const std::int64_t h = head % kv_heads;
      const std::int64_t keep = std::clamp<std::int64_t>(keep_counts[head], 0, tokens);
      const auto more_important = [&](std::int32_t left, std::int32_t right) {
        return detail::ranks_before(scores(b, h, left), left, scores(b, h, right), right);
      };
      for (std::int32_t token = 0; token < tokens; ++token) order[token] = token;
      std::partial_sort(order, order + keep, order + tokens, more_important);
      std::sort(order, order + keep);
      std::int32_t* out = kept_tokens + offsets[head];
      std::copy(order, order + keep, out);
      offsets[head + 1] = offsets[head] + keep;
    }
  }
};

}  // namespace kvtrim
