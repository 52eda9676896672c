// kvtrim/backend/cpu/detail/ragged_writes.hpp — the token writes shared by the
// CPU references of the ragged layouts (paged, flat): each layout decides
// where a head's logical position lives (view.slot), these loops fill them.
#pragma once

#include <cstdint>

#include "kvtrim/backend/cpu/contiguous.hpp"  // detail::encode_input_token
#include "kvtrim/core/selection.hpp"

namespace kvtrim::detail {

/// Writes the kept tokens of flattened head `head` to its logical positions 0, 1, … (ascending token order),
/// after letting a stateful codec (low-rank bases, fp8 scales, quantisation groups) prepare the head;
/// each token's prefill index is its position (pre-RoPE low-rank keys need it).
template <class View, class KeyT>
void encode_kept_tokens(const View& cache, const kv_view<KeyT>& keys, const kv_view<KeyT>& values,
                        const selection_view<host_space>& kept, std::int64_t head) {
  const std::int64_t b = head / cache.shape.kv_heads;
  const std::int64_t h = head % cache.shape.kv_heads;
  prepare_kept_head(cache, keys, values, kept, b, h);
  for (std::int64_t i = 0; i < kept.count(head); ++i) {
    const std::int64_t token = kept.tokens[kept.offsets[head] + i];
    encode_input_token(cache, keys, values, b, h, token, cache.slot(b, h, i), token);
  }
}

/// Writes tokens 0..count−1 of (b, h) in new_keys/new_values to the head's logical positions first, first + 1, ….
template <class View, class KeyT>
void encode_appended_tokens(const View& cache, const kv_view<KeyT>& new_keys, const kv_view<KeyT>& new_values,
                            std::int64_t b, std::int64_t h, std::int64_t first, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i)
    encode_input_token(cache, new_keys, new_values, b, h, i, cache.slot(b, h, first + i), first + i);
}

}  // namespace kvtrim::detail
