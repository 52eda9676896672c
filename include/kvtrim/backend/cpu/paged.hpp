// kvtrim/backend/cpu/paged.hpp — CPU reference of layout::paged: compact the
// selected tokens into freshly allocated pages, and append at decode (new pages
// from the free list when a head's last page is full).
//
// Both calls check that the pool has the pages they need before touching
// anything, so a failed call leaves the cache as it was.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/writes.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/detail/rollback.hpp"
#include "kvtrim/layout/paged.hpp"

namespace kvtrim {

template <>
struct implementation<layout::paged, backend::cpu> {
  template <class CodecT, class KeyT>
  static void compact(layout::paged::view<CodecT, host_space>& cache, const kv_view<KeyT>& keys,
                      const kv_view<KeyT>& values, const selection_view<host_space>& kept, const compact_args& args,
                      backend::host_stream) {
    constexpr std::string_view function = "kvtrim::layout::paged::compact";
    std::int64_t needed = 0;
    for (std::int64_t head = 0; head < kept.heads; ++head)
      needed += layout::paged::pages_for(kept.count(head), cache.page_size);
    if (needed > cache.pages)
      detail::fail(function, "cache",
                   detail::cat("a pool of at least ", needed, " pages of ", cache.page_size,
                               " tokens for this selection (", kept.offsets[kept.heads], " tokens)"),
                   detail::cat(cache.pages, " pages (pool exhausted)"));

    const detail::kept_source<KeyT> source(keys, values, kept, args);
    cache.reset();
    std::int32_t* free_count = cache.free_count;
    for (std::int64_t head = 0; head < kept.heads; ++head) {
      const std::int64_t count = kept.count(head);
      const std::int64_t page_count = layout::paged::pages_for(count, cache.page_size);
      const std::int32_t begin = cache.indptr[head];
      for (std::int64_t p = 0; p < page_count; ++p) cache.indices[begin + p] = cache.free_pages[--*free_count];
      cache.indptr[head + 1] = static_cast<std::int32_t>(begin + page_count);
      cache.last_page_len[head] = static_cast<std::int32_t>(count == 0 ? 0 : (count - 1) % cache.page_size + 1);
      detail::write_kept_head(cache, source, head);
    }
    detail::record_compensation(cache, args.compensation);
  }

  /// Appends new_keys/new_values [B, H, n, D] to every head.
  template <class CodecT, class KeyT>
  static void append(layout::paged::view<CodecT, host_space>& cache, const kv_view<KeyT>& new_keys,
                     const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    grow(cache, every_head, count);
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) write_last(cache, new_keys, new_values, b, h, count);
  }

  /// Appends new_keys/new_values(b, h, ·) [n tokens] to head (b, h) only.
  template <class CodecT, class KeyT>
  static void append_head(layout::paged::view<CodecT, host_space>& cache, std::int64_t b, std::int64_t h,
                          const kv_view<KeyT>& new_keys, const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    grow(cache, b * cache.shape.kv_heads + h, count);
    write_last(cache, new_keys, new_values, b, h, count);
  }

  /// scheme::truncate: each head of sequence b gives back its newest drop[b]
  /// tokens. Pages left empty return to the free list, heads in increasing
  /// order (detail::shorten_page_list: truncating all n tokens of an append of
  /// n restores the tables and the free list byte for byte).
  template <class CodecT>
  static void truncate(layout::paged::view<CodecT, host_space>& cache,
                       const tensor_view<const std::int32_t, 1, host_space>& drop, backend::host_stream) {
    detail::check_truncate(cache, drop);
    detail::forget_newest(cache, drop);
    const std::int64_t kv_heads = cache.shape.kv_heads;
    std::int64_t returned = 0;  // pages the heads before this one gave back
    for (std::int64_t head = 0; head < cache.heads(); ++head) {
      const std::int64_t kept = detail::shorten_page_list(cache, head, detail::drop_at(drop, head / kv_heads), returned);
      detail::drop_compensation_past(cache, head, kept);
    }
  }

 private:
  static constexpr std::int64_t every_head = -1;

  /// Lengthens head `target` (or every head) by `count` tokens: new pages from
  /// the free list, page lists shifted right in `indices` to make room. Throws,
  /// changing nothing, when the pool has too few free pages.
  template <class View>
  static void grow(View& cache, std::int64_t target, std::int64_t count) {
    const std::int64_t kv_heads = cache.shape.kv_heads;
    const auto extra_pages = [&](std::int64_t head) -> std::int64_t {
      if (target != every_head && head != target) return 0;
      const std::int64_t length = cache.head_length(head / kv_heads, head % kv_heads);
      return layout::paged::pages_for(length + count, cache.page_size) -
             layout::paged::pages_for(length, cache.page_size);
    };
    std::int64_t total_extra = 0;
    for (std::int64_t head = 0; head < cache.heads(); ++head) total_extra += extra_pages(head);
    if (total_extra > *cache.free_count)
      detail::fail("kvtrim::layout::paged::append", "cache",
                   detail::cat("a pool with ", total_extra, " free pages for ", count, " more tokens",
                               target == every_head ? " per head" : " in one head"),
                   detail::cat(*cache.free_count, " free of ", cache.pages, " (pool exhausted)"));

    // Heads are shifted right by the pages the heads before them gain, so the
    // walk goes from the last head to the first (each move goes to higher
    // positions, read before written).
    std::int64_t shift = total_extra;
    for (std::int64_t head = cache.heads(); head-- > 0;) {
      const std::int64_t extra = extra_pages(head);  // reads indptr[head], indptr[head + 1] before they change
      const std::int64_t length = cache.head_length(head / kv_heads, head % kv_heads);
      shift -= extra;
      const std::int64_t begin = cache.indptr[head];
      const std::int64_t end = cache.indptr[head + 1];
      for (std::int64_t k = end; k-- > begin;) cache.indices[k + shift] = cache.indices[k];
      for (std::int64_t k = 0; k < extra; ++k) cache.indices[end + shift + k] = cache.free_pages[--*cache.free_count];
      cache.indptr[head + 1] = static_cast<std::int32_t>(end + shift + extra);
      if (target == every_head || head == target)
        cache.last_page_len[head] = static_cast<std::int32_t>((length + count - 1) % cache.page_size + 1);
    }
  }

  /// Encodes tokens 0..count−1 of (b, h) into the head's last `count` positions.
  template <class View, class KeyT>
  static void write_last(const View& cache, const kv_view<KeyT>& new_keys, const kv_view<KeyT>& new_values,
                         std::int64_t b, std::int64_t h, std::int64_t count) {
    detail::write_appended(cache, new_keys, new_values, b, h, cache.head_length(b, h) - count, count);
  }
};

}  // namespace kvtrim
