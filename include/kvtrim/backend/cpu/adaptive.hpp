// kvtrim/backend/cpu/adaptive.hpp — CPU reference of budget::adaptive.
//
// Per sequence: rank each head's tokens (score descending, lower index first),
// fix each head's guaranteed prefix (protected + floor), then hand the rest of
// the layer's budget out by merging the heads' remaining ranked tokens — an
// H-way merge in the order ranks_before(score, h·T + token), i.e. one top-k
// across heads with ties to the lower (head, token) index.
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
      for (std::int64_t h = 0; h < heads; ++h) {
        std::int32_t* order = p.order + h * tokens;
        for (std::int32_t j = 0; j < tokens; ++j) order[j] = j;
        std::sort(order, order + tokens, [&](std::int32_t left, std::int32_t right) {
          return detail::ranks_before(scores(b, h, left), left, scores(b, h, right), right);
        });
        std::int64_t protected_tokens = 0;
        for (std::int64_t j = 0; j < tokens; ++j) protected_tokens += scores(b, h, j) == std::numeric_limits<float>::infinity() ? 1 : 0;
        p.count[h] = budget::adaptive::guaranteed(cfg, budget, protected_tokens, h);
        pool -= p.count[h];
      }
      for (; pool > 0; --pool) {  // one pool token at a time: the best front among the heads
        std::int64_t best = -1;
        for (std::int64_t h = 0; h < heads; ++h) {
          if (p.count[h] >= tokens) continue;
          const std::int32_t token = p.order[h * tokens + p.count[h]];
          if (best < 0) {
            best = h;
            continue;
          }
          const std::int32_t best_token = p.order[best * tokens + p.count[best]];
          if (detail::ranks_before(scores(b, h, token), h * tokens + token, scores(b, best, best_token),
                                   best * tokens + best_token))
            best = h;
        }
        ++p.count[best];
      }
      for (std::int64_t h = 0; h < heads; ++h) keep_counts[b * heads + h] = static_cast<std::int32_t>(p.count[h]);
    }
  }

 private:
  struct parts {
    std::int32_t* order = nullptr;  // [heads, tokens]: each head's tokens in rank order
    std::int64_t* count = nullptr;  // [heads]: tokens taken so far
  };
  static parts carve(workspace_carver& carver, std::int64_t heads, std::int64_t tokens) {
    parts p;
    p.order = carver.take<std::int32_t>(heads * tokens);
    p.count = carver.take<std::int64_t>(heads);
    return p;
  }
};

}  // namespace kvtrim
