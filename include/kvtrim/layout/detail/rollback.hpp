// kvtrim/layout/detail/rollback.hpp — scheme::truncate on host views, shared by
// the CPU backends of every layout: speculative decoding's rollback of rejected
// draft tokens (docs/composition.md §8).
//
// truncate removes the newest drop[b] tokens of every kv head of sequence b
// (the drafts were appended to every head). The checks, all before the first
// write, in this order (the device reports the first failure in the same order):
//   for b = 0, 1, …: drop[b] ≥ 0; then for h = 0, 1, …: drop[b] ≤ the head's
//   length, and drop[b] ≤ what the codec can forget exactly (codec::rollback_horizon).
// A head shorter than drop[b] is refused, not emptied: the drafts were appended
// to every head after any eviction, so every head holds them; a shorter head
// means the counts are not the drafts' (an engine's bookkeeping error).
#pragma once

#include <cstdint>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/layout/detail/status.hpp"

namespace kvtrim::detail {

inline std::int64_t drop_at(const tensor_view<const std::int32_t, 1, host_space>& drop, std::int64_t b) {
  return drop.data[b * drop.strides[0]];
}

/// layout::contiguous's own rule for truncate: one count for every sequence
/// (checked first; a negative count is left to check_truncate's wording).
inline void check_equal_drops(std::int64_t batch, const tensor_view<const std::int32_t, 1, host_space>& drop) {
  for (std::int64_t b = 1; b < batch; ++b)
    if (drop_at(drop, b) != drop_at(drop, 0) && drop_at(drop, b) >= 0 && drop_at(drop, 0) >= 0)
      fail("kvtrim::scheme::truncate", "drop",
           cat("the same count for every sequence (layout::contiguous holds one length; ", drop_at(drop, 0),
               " for sequence 0)"),
           cat(drop_at(drop, b), " for sequence ", b));
}

/// Throws (fail_truncate) unless every drop count is one the cache can take back exactly.
template <class View>
void check_truncate(const View& cache, const tensor_view<const std::int32_t, 1, host_space>& drop) {
  using s = layout_status;
  for (std::int64_t b = 0; b < cache.batch; ++b) {
    const std::int64_t d = drop_at(drop, b);
    if (d < 0) fail_truncate(s::negative_drop, b, 0, d, 0);
    for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) {
      const std::int64_t length = cache.head_length(b, h);
      if (d > length) fail_truncate(s::past_head_length, b, h, d, length);
      const std::int64_t horizon =
          codec::rollback_horizon<typename View::codec>(cache.storage, b * cache.shape.kv_heads + h);
      if (d > horizon) fail_truncate(s::past_codec_horizon, b, h, d, horizon);
    }
  }
}

/// The codec forgets each head's dropped tokens (their slots read through the
/// layout's tables as they are before the truncation) and the head's next
/// position steps back: call before the layout shortens its tables.
template <class View>
void forget_newest(const View& cache, const tensor_view<const std::int32_t, 1, host_space>& drop) {
  for (std::int64_t b = 0; b < cache.batch; ++b) {
    const std::int64_t d = drop_at(drop, b);
    if (d == 0) continue;
    for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) {
      const std::int64_t head = b * cache.shape.kv_heads + h;
      const std::int64_t length = cache.head_length(b, h);
      codec::drop_newest<typename View::codec>(cache.storage, head, d,
                                               [&](std::int64_t k) { return cache.slot(b, h, length - 1 - k); });
      cache.positions.next_position[head] -= d;
    }
  }
}

/// Shortens page list `list` of a paged view (layout::paged: one list per kv head;
/// shared_paged: one per sequence) by `drop` tokens, for truncate's walk over the
/// lists in increasing order: `returned` is how many pages the lists before it gave
/// back (its indptr entry was moved left by that much already). Pages left empty go
/// to the free list from the list's last page to its first — the reverse of the
/// order append popped them, so truncating all n tokens of an append of n restores
/// the tables and the free list byte for byte — and the kept pages shift left over
/// the earlier lists' returned entries. Returns the list's new length in tokens;
/// `returned` grows by the pages this list gave back.
template <class View>
std::int64_t shorten_page_list(const View& cache, std::int64_t list, std::int64_t drop, std::int64_t& returned) {
  const std::int64_t begin = cache.indptr[list] + returned;  // indptr[list] was moved left already
  const std::int64_t end = cache.indptr[list + 1];
  const std::int64_t length = end == begin ? 0 : (end - begin - 1) * cache.page_size + cache.last_page_len[list];
  const std::int64_t kept = length - drop;
  const std::int64_t kept_pages = (kept + cache.page_size - 1) / cache.page_size;
  for (std::int64_t k = end; k-- > begin + kept_pages;) cache.free_pages[(*cache.free_count)++] = cache.indices[k];
  for (std::int64_t k = begin; k < begin + kept_pages; ++k) cache.indices[k - returned] = cache.indices[k];
  returned += end - begin - kept_pages;
  cache.indptr[list + 1] = static_cast<std::int32_t>(end - returned);
  cache.last_page_len[list] = static_cast<std::int32_t>(kept == 0 ? 0 : (kept - 1) % cache.page_size + 1);
  return kept;
}

/// A compensation token among the dropped ones leaves the head with it
/// (paged, flat: the table must name a token the head holds).
template <class View>
void drop_compensation_past(const View& cache, std::int64_t head, std::int64_t new_length) {
  if (cache.compensation.index[head] >= new_length) {
    cache.compensation.index[head] = -1;
    cache.compensation.bias[head] = 0.0f;
  }
}

}  // namespace kvtrim::detail
