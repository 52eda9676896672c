// kvtrim/backend/cpu/contiguous.hpp — CPU reference of layout::contiguous:
// compact the selected tokens into the cache, and append at decode.
//
// Writes go through backend/cpu/detail/writes.hpp (codec encode + position),
// like every layout's. Every check runs before the first write, so a call that
// throws leaves the cache as it was.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/writes.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/contiguous.hpp"
#include "kvtrim/layout/detail/rollback.hpp"

namespace kvtrim {

template <>
struct implementation<layout::contiguous, backend::cpu> {
  template <class CodecT, class KeyT>
  static void compact(layout::contiguous::view<CodecT, host_space>& cache, const kv_view<KeyT>& keys,
                      const kv_view<KeyT>& values, const selection_view<host_space>& kept, const compact_args& args,
                      backend::host_stream) {
    constexpr std::string_view function = "kvtrim::layout::contiguous::compact";
    const std::int64_t length = kept.count(0);
    for (std::int64_t head = 0; head < kept.heads; ++head)
      if (kept.count(head) != length)
        detail::fail(function, "selection", detail::cat("the same count in every head (", length, ")"),
                     detail::cat(kept.count(head), " in head ", head));
    if (length > cache.capacity)
      detail::fail(function, "selection", detail::cat("at most capacity = ", cache.capacity, " tokens per head"),
                   std::to_string(length));
    const detail::kept_source<KeyT> source(keys, values, kept, args);
    for (std::int64_t head = 0; head < kept.heads; ++head) detail::write_kept_head(cache, source, head);
    *cache.length = length;
  }

  /// Plans an append of `count` tokens to every head: throws, changing nothing, when they do not fit.
  template <class CodecT>
  static void plan_append(const layout::contiguous::view<CodecT, host_space>& cache, std::int64_t count) {
    layout::contiguous::check_room("kvtrim::scheme::append", cache, count);
  }

  template <class CodecT, class KeyT>
  static void append(layout::contiguous::view<CodecT, host_space>& cache, const kv_view<KeyT>& new_keys,
                     const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    plan_append(cache, count);
    const std::int64_t length = *cache.length;
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h)
        detail::write_appended(cache, new_keys, new_values, b, h, length, count);
    *cache.length = length + count;
  }

  /// scheme::truncate: every head holds one length, so every sequence drops the same count.
  template <class CodecT>
  static void truncate(layout::contiguous::view<CodecT, host_space>& cache,
                       const tensor_view<const std::int32_t, 1, host_space>& drop, backend::host_stream) {
    detail::check_equal_drops(cache.batch, drop);
    detail::check_truncate(cache, drop);
    detail::forget_newest(cache, drop);
    *cache.length -= detail::drop_at(drop, 0);
  }
};

}  // namespace kvtrim
