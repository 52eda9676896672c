// tests/common/streaming.hpp — the StreamingLLM scheme of the first slice
// (contiguous × static_window × uniform × plain codec × cpu), its kept set
// computed by brute force from the paper's definition, and small helpers to run
// it and read a cache back.
#pragma once

#include <gtest/gtest.h>
#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/oracle.hpp"

namespace kvtrim::testing {

/// The three plain codecs, for typed tests.
using plain_codecs = ::testing::Types<codec::fp32, codec::fp16, codec::bf16>;

template <class Codec>
using streaming_scheme =
    scheme<layout::contiguous, score::static_window, budget::uniform, Codec, backend::cpu>;

/// StreamingLLM's kept set for a head of `tokens` tokens that keeps `keep`:
/// token i stays when it is one of the first min(keep, sinks) tokens ("sinks")
/// or one of the last keep − min(keep, sinks) ("recent"). Tested one token at a
/// time against that sentence, not derived from kvtrim's scores.
inline std::vector<std::int64_t> streaming_kept(std::int64_t tokens, std::int64_t sinks, std::int64_t keep) {
  const std::int64_t kept_sinks = std::min({keep, sinks, tokens});
  const std::int64_t recent = std::min(keep, tokens) - kept_sinks;
  std::vector<std::int64_t> kept;
  for (std::int64_t i = 0; i < tokens; ++i)
    if (i < kept_sinks || i >= tokens - recent) kept.push_back(i);
  return kept;
}

/// Every token 0 .. tokens−1.
inline std::vector<std::int64_t> all_tokens(std::int64_t tokens) {
  std::vector<std::int64_t> kept(static_cast<std::size_t>(tokens));
  for (std::int64_t i = 0; i < tokens; ++i) kept[static_cast<std::size_t>(i)] = i;
  return kept;
}

/// A heap buffer usable as a workspace (operator new aligns to at least
/// alignof(max_align_t), what kvtrim asks of a workspace's base).
struct scratch_buffer {
  std::vector<std::byte> bytes;
  explicit scratch_buffer(std::size_t size) : bytes(size) {}
  workspace get() { return {bytes.empty() ? nullptr : bytes.data(), bytes.size()}; }
};

/// The key (or value) row the cache holds at position `index` of head (b, h), decoded to float.
template <class View>
std::vector<float> cached_row(const View& cache, std::int64_t b, std::int64_t h, std::int64_t index, bool value) {
  std::vector<float> row(static_cast<std::size_t>(cache.shape.head_dim));
  const std::int64_t head = b * cache.shape.kv_heads + h;
  if (value)
    View::codec::load_value(cache.storage, head, cache.slot(b, h, index), row.data());
  else
    View::codec::load_key(cache.storage, head, cache.slot(b, h, index), kvtrim::codec::position_of(cache, b, h, index),
                          row.data());
  return row;
}

/// The input's row (b, h, token) as float.
template <class T>
std::vector<float> input_row(const tensor_view<T, 4>& tensor, std::int64_t b, std::int64_t h, std::int64_t token) {
  std::vector<float> row(static_cast<std::size_t>(tensor.extent(3)));
  for (std::int64_t d = 0; d < tensor.extent(3); ++d) row[static_cast<std::size_t>(d)] = to_float(tensor(b, h, token, d));
  return row;
}

}  // namespace kvtrim::testing
