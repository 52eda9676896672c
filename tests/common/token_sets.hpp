// tests/common/token_sets.hpp — building the inputs the oracle needs for caches
// that grew after compression or hold tokens that are not in the prefill
// (appended tokens, compensation tokens), and reading back what a cache stores.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <array>
#include <cstdint>
#include <vector>

#include "common/tensors.hpp"

namespace kvtrim::testing {

/// [B, H, T_a + T_b, D]: the tokens of `a` followed by those of `b`, dense.
template <class T>
host_tensor<T, 4> concat_tokens(const tensor_view<const T, 4>& a, const tensor_view<const T, 4>& b) {
  const std::int64_t ta = a.extent(2), tb = b.extent(2);
  auto out = make_tensor<T, 4>({a.extent(0), a.extent(1), ta + tb, a.extent(3)});
  for_each_index(out.view.extents, [&](std::int64_t bi, std::int64_t h, std::int64_t t, std::int64_t d) {
    out.view(bi, h, t, d) = t < ta ? a(bi, h, t, d) : b(bi, h, t - ta, d);
  });
  return out;
}

/// [B, H, T + 1, D]: the input followed by one token per head holding the mean of its
/// tokens [first, first + count) — RazorAttention's compensation token, summed in double
/// and rounded once, as score::retrieval_head computes it.
inline host_tensor<float, 4> with_mean_token(const tensor_view<const float, 4>& input, std::int64_t first,
                                             std::int64_t count) {
  auto mean = make_tensor<float, 4>({input.extent(0), input.extent(1), 1, input.extent(3)});
  for (std::int64_t b = 0; b < input.extent(0); ++b)
    for (std::int64_t h = 0; h < input.extent(1); ++h)
      for (std::int64_t d = 0; d < input.extent(3); ++d) {
        double sum = 0.0;
        for (std::int64_t t = first; t < first + count; ++t) sum += static_cast<double>(input(b, h, t, d));
        mean.view(b, h, 0, d) = static_cast<float>(sum / static_cast<double>(count));
      }
  return concat_tokens(input, mean.cview());
}

/// The tokens static_window keeps out of `tokens` with `keep` slots and `sinks` sinks.
inline std::vector<std::int64_t> sinks_and_recent(std::int64_t tokens, std::int64_t keep, std::int64_t sinks) {
  std::vector<std::int64_t> kept;
  const std::int64_t first = std::min(keep, sinks);
  for (std::int64_t t = 0; t < first; ++t) kept.push_back(t);
  for (std::int64_t t = tokens - (keep - first); t < tokens; ++t) kept.push_back(t);
  return kept;
}

/// The key the cache stores at logical index i of head (b, h), decoded to float.
template <class View>
std::vector<float> stored_key(const View& cache, std::int64_t b, std::int64_t h, std::int64_t i) {
  std::vector<float> row(static_cast<std::size_t>(cache.shape.head_dim));
  View::codec::load_key(cache.storage, b * cache.shape.kv_heads + h, cache.slot(b, h, i),
                        kvtrim::codec::position_of(cache, b, h, i), row.data());
  return row;
}
template <class View>
std::vector<float> stored_value(const View& cache, std::int64_t b, std::int64_t h, std::int64_t i) {
  std::vector<float> row(static_cast<std::size_t>(cache.shape.head_dim));
  View::codec::load_value(cache.storage, b * cache.shape.kv_heads + h, cache.slot(b, h, i), row.data());
  return row;
}

/// Token row t of head (b, h) of an input tensor, as float.
template <class T>
std::vector<float> input_row(const tensor_view<const T, 4>& tensor, std::int64_t b, std::int64_t h, std::int64_t t) {
  std::vector<float> row(static_cast<std::size_t>(tensor.extent(3)));
  for (std::int64_t d = 0; d < tensor.extent(3); ++d) row[static_cast<std::size_t>(d)] = to_float(tensor(b, h, t, d));
  return row;
}

}  // namespace kvtrim::testing
