// kvtrim/backend/cpu/select_top_k.hpp — CPU reference of the selection stage.
//
// Per head: order tokens by (score descending, index ascending), keep the first
// keep_count, and list them in ascending token order. Runs as a partition
// (std::nth_element, linear) and a sort of the kept indices only; heads on
// OpenMP threads (backend/cpu.hpp). The order is
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
  /// One index list of `tokens` per thread.
  static std::size_t workspace_bytes(std::int64_t heads, std::int64_t tokens) {
    return static_cast<std::size_t>(std::min(detail::cpu_threads(), std::max<std::int64_t>(heads, 1)) *
                                    order_ints(tokens)) *
           sizeof(std::int32_t);
  }

  static void select(const tensor_view<const float, 3>& scores, const std::int32_t* keep_counts,
                     std::int64_t* offsets, std::int32_t* kept_tokens, workspace scratch, backend::host_stream) {
    const std::int64_t kv_heads = scores.extent(1);
    const std::int64_t tokens = scores.extent(2);
    const std::int64_t heads = scores.extent(0) * kv_heads;
    offsets[0] = 0;  // the CSR offsets first (a prefix sum), then every head's list in parallel
    for (std::int64_t head = 0; head < heads; ++head)
      offsets[head + 1] = offsets[head] + std::clamp<std::int64_t>(keep_counts[head], 0, tokens);
    const std::size_t per_thread = static_cast<std::size_t>(order_ints(tokens)) * sizeof(std::int32_t);
    detail::cpu_parallel_for(heads, detail::cpu_threads_for(heads, per_thread, scratch.bytes),
                             [&](std::int64_t head, std::int64_t thread) {
      const std::int64_t b = head / kv_heads;
      const std::int64_t h = head % kv_heads;
      const std::int64_t keep = offsets[head + 1] - offsets[head];
      std::int32_t* order = static_cast<std::int32_t*>(scratch.data) + thread * order_ints(tokens);
      const auto more_important = [&](std::int32_t left, std::int32_t right) {
        return detail::ranks_before(scores(b, h, left), left, scores(b, h, right), right);
      };
      for (std::int32_t token = 0; token < tokens; ++token) order[token] = token;
      // ranks_before is a strict total order (indices break every tie), so the
      // first `keep` after a partition are exactly the first `keep` of a sort.
      if (keep > 0 && keep < tokens) std::nth_element(order, order + keep - 1, order + tokens, more_important);
      std::sort(order, order + keep);
      std::copy(order, order + keep, kept_tokens + offsets[head]);
    });
  }

 private:
  static std::int64_t order_ints(std::int64_t tokens) { return (tokens + 63) / 64 * 64; }
};

}  // namespace kvtrim
