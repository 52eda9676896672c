// kvtrim/backend/cpu/adaptive.hpp — CPU reference of budget::adaptive.
//
// Per sequence: rank each head's tokens (score descending, lower index first),
// fix each head's guaranteed prefix (protected + floor), then hand the rest of
// the layer's budget out by merging the heads' remaining ranked tokens — an
// H-way merge in the order ranks_before(score, h·T + token), i.e. one top-k
// across heads with ties to the lower (head, token) index.
//
// Ranking once (issue 9): nothing here sorts. The guaranteed prefix of each
// head is a partition (std::nth_element) and the merge is one partition of the
// remaining candidates at the pool size — the same counts as the sort-and-merge
// it replaced (ranks_before is a strict total order, so "the first n" is one
// set), in O(H·T). The only ordering a compress then does is select_top_k's
// partition of each head and the sort of its kept indices.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/budget/adaptive.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/rank.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

template <>
struct implementation<budget::adaptive, backend::cpu> {
  static std::size_t workspace_bytes(const budget::adaptive::config&, const model_shape& shape,
                                     std::int64_t /*batch*/, std::int64_t tokens) {
    workspace_carver carver;
    carve(carver, shape.kv_heads, tokens);
    return carver.bytes();
  }

  static void keep_counts(const budget::adaptive::config& cfg, const tensor_view<const float, 3>& scores,
                          std::int32_t* keep_counts, workspace scratch, backend::host_stream) {
    const std::int64_t batch = scores.extent(0), heads = scores.extent(1), tokens = scores.extent(2);
    const std::int64_t budget = budget::adaptive::head_budget(cfg, tokens);
    workspace_carver carver(scratch);
    const parts p = carve(carver, heads, tokens);
    for (std::int64_t b = 0; b < batch; ++b) {
      std::int64_t pool = heads * budget;  // what the guaranteed prefixes leave to share
      std::int64_t candidates = 0;
      for (std::int64_t h = 0; h < heads; ++h) {
        std::int64_t protected_tokens = 0;
        for (std::int64_t j = 0; j < tokens; ++j) protected_tokens += scores(b, h, j) == std::numeric_limits<float>::infinity() ? 1 : 0;
        p.count[h] = budget::adaptive::guaranteed(cfg, budget, protected_tokens, h);
        pool -= p.count[h];
        const std::int64_t guaranteed = std::clamp<std::int64_t>(p.count[h], 0, tokens);
        // The head's first `guaranteed` in rank order: a partition, not a sort.
        std::int32_t* order = p.order;
        for (std::int32_t j = 0; j < tokens; ++j) order[j] = j;
        if (guaranteed > 0 && guaranteed < tokens)
          std::nth_element(order, order + guaranteed - 1, order + tokens, [&](std::int32_t left, std::int32_t right) {
            return detail::ranks_before(scores(b, h, left), left, scores(b, h, right), right);
          });
        for (std::int64_t j = guaranteed; j < tokens; ++j) p.candidates[candidates++] = h * tokens + order[j];
      }
      // Merging the heads' ranked remainders and taking `pool` of them is taking the
      // `pool` best candidates in ranks_before(score, h·T + token) order.
      const auto score_of = [&](std::int64_t index) { return scores(b, index / tokens, index % tokens); };
      const std::int64_t taken = std::clamp<std::int64_t>(pool, 0, candidates);
      if (taken > 0 && taken < candidates)
        std::nth_element(p.candidates, p.candidates + taken - 1, p.candidates + candidates,
                         [&](std::int64_t left, std::int64_t right) {
                           return detail::ranks_before(score_of(left), left, score_of(right), right);
                         });
      for (std::int64_t c = 0; c < taken; ++c) ++p.count[p.candidates[c] / tokens];
      for (std::int64_t h = 0; h < heads; ++h) keep_counts[b * heads + h] = static_cast<std::int32_t>(p.count[h]);
    }
  }

 private:
  struct parts {
    std::int32_t* order = nullptr;       // [tokens]: one head's tokens, partitioned
    std::int64_t* candidates = nullptr;  // [heads·tokens]: h·T + token past each head's guaranteed prefix
    std::int64_t* count = nullptr;       // [heads]: tokens kept
  };
  static parts carve(workspace_carver& carver, std::int64_t heads, std::int64_t tokens) {
    parts p;
    p.order = carver.take<std::int32_t>(tokens);
    p.candidates = carver.take<std::int64_t>(heads * tokens);
    p.count = carver.take<std::int64_t>(heads);
    return p;
  }
};

}  // namespace kvtrim
