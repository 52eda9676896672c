// tests/common/given_lse.hpp — the softmax normalisers an engine's prefill hands
// to score::snapkv and score::h2o (score/attention_mass.hpp, "Given normalisers"),
// computed in double from the very inputs the scorers read and rounded once to
// float, as FlashAttention's softmax_lse would give them:
//   L[b, g, t] = ln Σ_{j ≤ T − n_q + t} exp(q_{g,t} · k_j / √D)
// Rows t < first are NaN: a scorer that reads them (SnapKV reads only the last
// `window` observed queries) makes them contribute nothing, which the tests see.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/tensors.hpp"

namespace kvtrim::testing {

template <class K, class Q>
host_tensor<float, 3> reference_lse(const tensor_view<K, 4>& keys, const tensor_view<Q, 4>& queries,
                                    std::int64_t first = 0, const std::array<std::int64_t, 3>& padding = {}) {
  const std::int64_t batch = queries.extent(0), q_heads = queries.extent(1), observed = queries.extent(2);
  const std::int64_t tokens = keys.extent(2), head_dim = keys.extent(3), group = q_heads / keys.extent(1);
  auto lse = make_tensor<float, 3>({batch, q_heads, observed}, padding);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  std::vector<double> q(static_cast<std::size_t>(head_dim)), logits(static_cast<std::size_t>(tokens));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t g = 0; g < q_heads; ++g)
      for (std::int64_t t = 0; t < observed; ++t) {
        if (t < first) {
          lse(b, g, t) = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        for (std::int64_t d = 0; d < head_dim; ++d) q[static_cast<std::size_t>(d)] = to_float(queries(b, g, t, d));
        const std::int64_t visible = tokens - observed + t + 1;
        double largest = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < visible; ++j) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < head_dim; ++d)
            dot += q[static_cast<std::size_t>(d)] * static_cast<double>(to_float(keys(b, g / group, j, d)));
          logits[static_cast<std::size_t>(j)] = dot * scale;
          largest = std::max(largest, dot * scale);
        }
        double sum = 0.0;
        for (std::int64_t j = 0; j < visible; ++j) sum += std::exp(logits[static_cast<std::size_t>(j)] - largest);
        lse(b, g, t) = static_cast<float>(largest + std::log(sum));
      }
  return lse;
}

}  // namespace kvtrim::testing
