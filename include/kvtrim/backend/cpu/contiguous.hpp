// kvtrim/backend/cpu/contiguous.hpp — CPU reference of layout::contiguous:
// compact the selected tokens into the cache, and append at decode.
//
// The two helpers in detail:: are what every layout's compact/append calls (see
// codec/hooks.hpp): prepare_kept_head once per head before its kept tokens are
// encoded, then encode_input_token per token, with the token's prefill index as
// its position in compact and (interim) its logical index in append.
#pragma once

#include <array>
#include <cstdint>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/layout/contiguous.hpp"

namespace kvtrim {

namespace detail {
/// Encodes token `token` of input head (b, h) into `slot` of the cache through its
/// codec; `position` (≥ 0) is the token's position in the sequence (its prefill
/// index in compact). Interim (issue 9): append passes the head's logical index
/// until the layouts store next_position.
template <class View, class KeyT>
void encode_input_token(const View& cache, const kv_view<KeyT>& keys, const kv_view<KeyT>& values, std::int64_t b,
                        std::int64_t h, std::int64_t token, std::int64_t slot, std::int64_t position) {
  std::array<float, max_head_dim> key_row{};
  std::array<float, max_head_dim> value_row{};
  for (std::int64_t d = 0; d < cache.shape.head_dim; ++d) {
    key_row[d] = to_float(keys(b, h, token, d));
    value_row[d] = to_float(values(b, h, token, d));
  }
  View::codec::encode(cache.storage, b * cache.shape.kv_heads + h, slot, position, key_row.data(),
                       value_row.data());
}

/// Tells the codec that head (b, h) is about to be rewritten with its kept
/// tokens (codec::prepare_head: resets and fits per-head state).
template <class View, class KeyT>
void prepare_kept_head(const View& cache, const kv_view<KeyT>& keys, const kv_view<KeyT>& values,
                       const selection_view<host_space>& kept, std::int64_t b, std::int64_t h) {
  const std::int64_t head = b * cache.shape.kv_heads + h;
  const auto rows = [&](std::int64_t i, float* key, float* value) {
    const std::int64_t token = kept.tokens[kept.offsets[head] + i];
    for (std::int64_t d = 0; d < cache.shape.head_dim; ++d) {
      key[d] = to_float(keys(b, h, token, d));
      value[d] = to_float(values(b, h, token, d));
    }
  };
  codec::prepare_head<typename View::codec>(cache.storage, head, keys.extent(2), kept.count(head), rows);
}
}  // namespace detail

template <>
struct implementation<layout::contiguous, backend::cpu> {
  template <class CodecT, class KeyT>
  static void compact(layout::contiguous::view<CodecT, host_space>& cache, const kv_view<KeyT>& keys,
                      const kv_view<KeyT>& values, const selection_view<host_space>& kept,
                      std::int64_t /*uniform_keep*/, backend::host_stream) {
    constexpr std::string_view function = "kvtrim::layout::contiguous::compact";
    const std::int64_t length = kept.count(0);
    for (std::int64_t head = 0; head < kept.heads; ++head)
      if (kept.count(head) != length)
        detail::fail(function, "selection", detail::cat("the same count in every head (", length, ")"),
                     detail::cat(kept.count(head), " in head ", head));
    if (length > cache.capacity)
      detail::fail(function, "selection", detail::cat("at most capacity = ", cache.capacity, " tokens per head"),
                   std::to_string(length));
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) {
        const std::int64_t head = b * cache.shape.kv_heads + h;
        detail::prepare_kept_head(cache, keys, values, kept, b, h);
        for (std::int64_t i = 0; i < length; ++i) {
          const std::int64_t token = kept.tokens[kept.offsets[head] + i];
          detail::encode_input_token(cache, keys, values, b, h, token, cache.slot(b, h, i), token);
        }
      }
    cache.length = length;
  }

  template <class CodecT, class KeyT>
  static void append(layout::contiguous::view<CodecT, host_space>& cache, const kv_view<KeyT>& new_keys,
                     const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    layout::contiguous::check_room("kvtrim::scheme::append", cache, count);
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h)
        for (std::int64_t i = 0; i < count; ++i)
          detail::encode_input_token(cache, new_keys, new_values, b, h, i, cache.slot(b, h, cache.length + i),
                                     cache.length + i);
    cache.length += count;
  }
};

}  // namespace kvtrim
