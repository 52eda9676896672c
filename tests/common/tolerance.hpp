// tests/common/tolerance.hpp — how far fp32 decode attention may land from the
// double-precision oracle, derived from the element types' unit roundoff.
//
// For one query head over n kept tokens of dimension D (u = 2^-24, fp32's unit
// roundoff; u_s the storage type's when the cache rounds its inputs, else 0;
// u_o the output type's when it is narrower than fp32, else 0):
//
//   S = max_i Σ_d |q_d k_id| / √D        V = max_{i,d} |v_id|
//
//   logit error     δ ≤ (u_s + (D + 5)·u)·S
//                   (keys rounded to the storage type; a D-term fp32 dot product,
//                   γ_D ≈ D·u; the scale 1/√D: sqrt, division, product, 3u; the
//                   subtraction of the running max, 2u·S)
//   softmax weights p̃_i / p_i ∈ [e^-(2δ + 4u), e^(2δ + 4u)]   (expf within 2u)
//                   → |Σ (p̃_i − p_i) v_i| ≤ (e^(2δ + 4u) − 1)·V
//   weighted sum    numerator and denominator summed over n terms in fp32 and
//                   one division: ≤ (2n + 1)·u·V
//   values          rounded to the storage type: ≤ u_s·V
//   output          rounded to the output type: ≤ u_o·V
//
//   |out − oracle| ≤ (e^(2δ + 4u) − 1)·V + (u_s + u_o + (2n + 1)·u)·V
//
// (fp16 also rounds |x| < 6.1e-5 to subnormals with an absolute error up to
// 2^-25 ≈ 3e-8; against u_s·|x| terms of ~1e-4 for the data in these tests that
// is negligible and left out.)
//
// This is a worst-case, first-order bound (no safety factor): random data lands
// one to three orders of magnitude below it, while a wrong or missing token,
// a wrong head or a misread stride moves the output by ~p_i·|v_i| ≫ the bound
// for fp32 storage (checked by decode_attention_test's tightness test).
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "common/oracle.hpp"

namespace kvtrim::testing {

inline constexpr double fp32_unit_roundoff = element_traits<float>::unit_roundoff;

/// The unit roundoff of rounding an fp32 value into T (0 for fp32 itself, which
/// the fp32 arithmetic terms already cover).
template <class T>
constexpr double rounding_from_fp32() {
  return std::is_same_v<T, float> ? 0.0 : element_traits<T>::unit_roundoff;
}

/// Unit roundoffs of what the pipeline rounds besides its fp32 arithmetic.
struct rounding {
  double storage = 0.0;  // the cache's element type, when it rounds the inputs (0: stored exactly)
  double output = 0.0;   // the output's element type, when narrower than fp32 (0 otherwise)
};

/// The bound above for every (b, j), as a dense [batch, q_heads] array.
template <class QueryT, class KeyT>
std::vector<double> attention_bounds(const tensor_view<QueryT, 3>& queries, const tensor_view<KeyT, 4>& keys,
                                     const tensor_view<KeyT, 4>& values, std::int64_t kv_heads,
                                     const std::function<kept_tokens(std::int64_t b, std::int64_t h)>& kept,
                                     rounding extra) {
  const std::int64_t batch = queries.extent(0), q_heads = queries.extent(1), head_dim = queries.extent(2);
  const std::int64_t group = q_heads / kv_heads;
  const double u = fp32_unit_roundoff;
  std::vector<double> bounds(static_cast<std::size_t>(batch * q_heads));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t j = 0; j < q_heads; ++j) {
      const kept_tokens set = kept(b, j / group);
      double largest_logit = 0.0, largest_value = 0.0;
      for (const std::int64_t token : set.tokens) {
        double magnitude = 0.0;
        for (std::int64_t d = 0; d < head_dim; ++d) {
          magnitude += std::abs(static_cast<double>(to_float(queries(b, j, d))) *
                                static_cast<double>(to_float(keys(b, j / group, token, d))));
          largest_value = std::max(largest_value, std::abs(static_cast<double>(to_float(values(b, j / group, token, d)))));
        }
        largest_logit = std::max(largest_logit, magnitude / std::sqrt(static_cast<double>(head_dim)));
      }
      const double n = static_cast<double>(set.tokens.size()), dim = static_cast<double>(head_dim);
      const double logit_error = (extra.storage + (dim + 5.0) * u) * largest_logit;
      bounds[static_cast<std::size_t>(b * q_heads + j)] =
          std::expm1(2.0 * logit_error + 4.0 * u) * largest_value +
          (extra.storage + extra.output + (2.0 * n + 1.0) * u) * largest_value;
    }
  return bounds;
}

/// Worst |out − oracle| / bound over every element (≤ 1 means within tolerance),
/// and the worst absolute error, for the failure message.
struct bound_check {
  double worst_ratio = 0.0;
  double worst_error = 0.0;
};

template <class OutT>
bound_check check_against(const tensor_view<OutT, 3>& out, const std::vector<double>& oracle,
                          const std::vector<double>& bounds) {
  bound_check result;
  const std::int64_t q_heads = out.extent(1), head_dim = out.extent(2);
  for (std::int64_t b = 0; b < out.extent(0); ++b)
    for (std::int64_t j = 0; j < q_heads; ++j)
      for (std::int64_t d = 0; d < head_dim; ++d) {
        const double got = static_cast<double>(to_float(out(b, j, d)));
        const double want = oracle[static_cast<std::size_t>((b * q_heads + j) * head_dim + d)];
        const double error = std::isfinite(got) ? std::abs(got - want) : INFINITY;
        result.worst_error = std::max(result.worst_error, error);
        result.worst_ratio = std::max(result.worst_ratio, error / bounds[static_cast<std::size_t>(b * q_heads + j)]);
      }
  return result;
}

}  // namespace kvtrim::testing
