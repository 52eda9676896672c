// kvtrim/backend/cpu/shared_paged.hpp — CPU reference of layout::shared_paged:
// compact a uniform selection into freshly allocated pages (every kv head of a
// sequence in the same pages, as the engine's attention kernels read them), and
// append at decode (a new page from the free list when a sequence's last page
// is full). Both calls check everything — equal counts across a sequence's
// heads, free pages — before writing, so a failed call leaves the cache as it was.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/writes.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/detail/rollback.hpp"
#include "kvtrim/layout/shared_paged.hpp"

namespace kvtrim {

template <>
struct implementation<layout::shared_paged, backend::cpu> {
  template <class CodecT, class KeyT>
  static void compact(layout::shared_paged::view<CodecT, host_space>& cache, const kv_view<KeyT>& keys,
                      const kv_view<KeyT>& values, const selection_view<host_space>& kept, const compact_args& args,
                      backend::host_stream) {
    constexpr std::string_view function = "kvtrim::layout::shared_paged::compact";
    const std::int64_t kv_heads = cache.shape.kv_heads;
    std::int64_t needed = 0;
    for (std::int64_t b = 0; b < cache.batch; ++b) {
      const std::int64_t count = kept.count(b * kv_heads);
      for (std::int64_t h = 1; h < kv_heads; ++h)
        if (kept.count(b * kv_heads + h) != count)
          detail::fail(function, "selection",
                       "the same kept count in every kv head of a sequence (its heads share pages: a uniform budget)",
                       detail::cat(count, " tokens in kv head 0 and ", kept.count(b * kv_heads + h), " in kv head ", h,
                                   " of sequence ", b));
      needed += layout::shared_paged::pages_for(count, cache.page_size);
    }
    if (needed > cache.pages)
      detail::fail(function, "cache",
                   detail::cat("a pool of at least ", needed, " pages of ", cache.page_size,
                               " tokens for this selection (", kept.offsets[kept.heads], " tokens)"),
                   detail::cat(cache.pages, " pages (pool exhausted)"));

    const detail::kept_source<KeyT> source(keys, values, kept, args);
    cache.reset();
    for (std::int64_t b = 0; b < cache.batch; ++b) {
      const std::int64_t count = kept.count(b * kv_heads);
      const std::int64_t page_count = layout::shared_paged::pages_for(count, cache.page_size);
      const std::int32_t begin = cache.indptr[b];
      for (std::int64_t p = 0; p < page_count; ++p) cache.indices[begin + p] = cache.free_pages[--*cache.free_count];
      cache.indptr[b + 1] = static_cast<std::int32_t>(begin + page_count);
      cache.last_page_len[b] = static_cast<std::int32_t>(count == 0 ? 0 : (count - 1) % cache.page_size + 1);
      for (std::int64_t h = 0; h < kv_heads; ++h) detail::write_kept_head(cache, source, b * kv_heads + h);
    }
  }

  /// Appends new_keys/new_values [B, H, n, D] to every sequence (all its heads).
  template <class CodecT, class KeyT>
  static void append(layout::shared_paged::view<CodecT, host_space>& cache, const kv_view<KeyT>& new_keys,
                     const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    grow(cache, count);
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h)
        detail::write_appended(cache, new_keys, new_values, b, h, cache.sequence_length(b) - count, count);
  }

  /// scheme::truncate: sequence b gives back its newest drop[b] tokens (every
  /// kv head: they share pages). Pages left empty return to kvtrim's free list
  /// (this layout's tables and free list are kvtrim's; the engine's page tensor
  /// is only storage), sequences in increasing order (detail::shorten_page_list,
  /// as layout::paged).
  template <class CodecT>
  static void truncate(layout::shared_paged::view<CodecT, host_space>& cache,
                       const tensor_view<const std::int32_t, 1, host_space>& drop, backend::host_stream) {
    detail::check_truncate(cache, drop);
    detail::forget_newest(cache, drop);
    std::int64_t returned = 0;  // pages the sequences before this one gave back
    for (std::int64_t b = 0; b < cache.batch; ++b) detail::shorten_page_list(cache, b, detail::drop_at(drop, b), returned);
  }

 private:
  /// Lengthens every sequence by `count` tokens: new pages from the free list, page lists
  /// shifted right in `indices` to make room (last sequence first). Throws, changing
  /// nothing, when the pool has too few free pages.
  template <class View>
  static void grow(View& cache, std::int64_t count) {
    const auto extra_pages = [&](std::int64_t b) {
      const std::int64_t length = cache.sequence_length(b);
      return layout::shared_paged::pages_for(length + count, cache.page_size) -
             layout::shared_paged::pages_for(length, cache.page_size);
    };
    std::int64_t total_extra = 0;
    for (std::int64_t b = 0; b < cache.batch; ++b) total_extra += extra_pages(b);
    if (total_extra > *cache.free_count)
      detail::fail("kvtrim::layout::shared_paged::append", "cache",
                   detail::cat("a pool with ", total_extra, " free pages for ", count, " more tokens per sequence"),
                   detail::cat(*cache.free_count, " free of ", cache.pages, " (pool exhausted)"));
    std::int64_t shift = total_extra;
    for (std::int64_t b = cache.batch; b-- > 0;) {
      const std::int64_t extra = extra_pages(b);  // reads indptr[b], indptr[b + 1] before they change
      const std::int64_t length = cache.sequence_length(b);
      shift -= extra;
      const std::int64_t begin = cache.indptr[b];
      const std::int64_t end = cache.indptr[b + 1];
      for (std::int64_t k = end; k-- > begin;) cache.indices[k + shift] = cache.indices[k];
      for (std::int64_t k = 0; k < extra; ++k) cache.indices[end + shift + k] = cache.free_pages[--*cache.free_count];
      cache.indptr[b + 1] = static_cast<std::int32_t>(end + shift + extra);
      cache.last_page_len[b] = static_cast<std::int32_t>((length + count - 1) % cache.page_size + 1);
    }
  }
};

}  // namespace kvtrim
