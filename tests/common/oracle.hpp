// tests/common/oracle.hpp — brute-force double-precision references.
//
// The oracle attends over an explicit list of kept tokens, read straight from
// the uncompressed inputs, in double precision. Comparing a scheme's output
// with it checks the selection, the layout, the codec and the attention at once.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace kvtrim::testing {

/// Tokens kept for (b, h), ascending, and an optional logit bias per kept token.
struct kept_tokens {
  std::vector<std::int64_t> tokens;
  std::vector<double> bias;  // empty: no bias
};

/// Decode attention in double over the kept tokens: out[b, j, :] for every query head j.
/// Returns a dense [batch, q_heads, head_dim] array. Keys/values are rounded to
/// `StoredT` first when given (what a codec that stores StoredT exactly keeps).
template <class QueryT, class KeyT>
std::vector<double> oracle_attention(const tensor_view<QueryT, 3>& queries, const tensor_view<KeyT, 4>& keys,
                                     const tensor_view<KeyT, 4>& values, std::int64_t kv_heads,
                                     const std::function<kept_tokens(std::int64_t b, std::int64_t h)>& kept) {
  const std::int64_t batch = queries.extent(0), q_heads = queries.extent(1), head_dim = queries.extent(2);
  const std::int64_t group = q_heads / kv_heads;
  std::vector<double> out(static_cast<std::size_t>(batch * q_heads * head_dim));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t j = 0; j < q_heads; ++j) {
      const std::int64_t h = j / group;
      const kept_tokens set = kept(b, h);
      std::vector<double> logits(set.tokens.size());
      for (std::size_t n = 0; n < set.tokens.size(); ++n) {
        double dot = 0.0;
        for (std::int64_t d = 0; d < head_dim; ++d)
          dot += static_cast<double>(to_float(queries(b, j, d))) * static_cast<double>(to_float(keys(b, h, set.tokens[n], d)));
        logits[n] = dot / std::sqrt(static_cast<double>(head_dim)) + (set.bias.empty() ? 0.0 : set.bias[n]);
      }
      const double max_logit = *std::max_element(logits.begin(), logits.end());
      double denominator = 0.0;
      for (auto& logit : logits) denominator += (logit = std::exp(logit - max_logit));
      for (std::int64_t d = 0; d < head_dim; ++d) {
        double sum = 0.0;
        for (std::size_t n = 0; n < set.tokens.size(); ++n)
          sum += logits[n] * static_cast<double>(to_float(values(b, h, set.tokens[n], d)));
        out[static_cast<std::size_t>((b * q_heads + j) * head_dim + d)] = sum / denominator;
      }
    }
  return out;
}

/// max |a − b| over the elements of a [batch, q_heads, head_dim] output view and a dense oracle.
template <class OutT>
double max_abs_error(const tensor_view<OutT, 3>& out, const std::vector<double>& oracle) {
  double worst = 0.0;
  const std::int64_t q_heads = out.extent(1), head_dim = out.extent(2);
  for (std::int64_t b = 0; b < out.extent(0); ++b)
    for (std::int64_t j = 0; j < q_heads; ++j)
      for (std::int64_t d = 0; d < head_dim; ++d) {
        const double got = static_cast<double>(to_float(out(b, j, d)));
        const double want = oracle[static_cast<std::size_t>((b * q_heads + j) * head_dim + d)];
        const double error = std::isnan(got) ? INFINITY : std::abs(got - want);
        worst = std::max(worst, error);
      }
  return worst;
}

/// ‖a − b‖₂ / ‖b‖₂.
inline double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double difference = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    difference += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(difference) / std::sqrt(norm);
}

}  // namespace kvtrim::testing
