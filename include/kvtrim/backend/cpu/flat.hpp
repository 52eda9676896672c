// kvtrim/backend/cpu/flat.hpp — CPU reference of layout::flat: compact the
// selected tokens back to back with even headroom, append (to every head or to
// one head) into the headroom, and repack in place when a head's region is full.
//
// Repacking moves tokens through the codec: a codec that can move a slot as
// stored provides `move_slot(storage, head, from, to)`; otherwise the token is
// decoded and encoded again, which is exact for codec::plain (decoding is
// exact and encoding a representable value returns it).
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/ragged_writes.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/flat.hpp"

namespace kvtrim {

template <>
struct implementation<layout::flat, backend::cpu> {
  template <class CodecT, class KeyT>
  static void compact(layout::flat::view<CodecT, host_space>& cache, const kv_view<KeyT>& keys,
                      const kv_view<KeyT>& values, const selection_view<host_space>& kept,
                      std::int64_t /*uniform_keep*/, backend::host_stream) {
    const std::int64_t total = kept.offsets[kept.heads];
    if (total > cache.capacity)
      detail::fail("kvtrim::layout::flat::compact", "cache",
                   detail::cat("at least ", total, " slots for this selection"),
                   detail::cat(cache.capacity, " slots (buffer exhausted)"));
    for (std::int64_t head = 0; head < kept.heads; ++head) cache.lengths[head] = kept.count(head);
    cache.place_evenly();
    cache.compensation.clear(cache.heads());
    for (std::int64_t head = 0; head < kept.heads; ++head) detail::encode_kept_tokens(cache, keys, values, kept, head);
  }

  /// Appends new_keys/new_values [B, H, n, D] to every head.
  template <class CodecT, class KeyT>
  static void append(layout::flat::view<CodecT, host_space>& cache, const kv_view<KeyT>& new_keys,
                     const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    make_room(cache, every_head, count);
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) write_next(cache, new_keys, new_values, b, h, count);
  }

  /// Appends new_keys/new_values(b, h, ·) [n tokens] to head (b, h) only.
  template <class CodecT, class KeyT>
  static void append_head(layout::flat::view<CodecT, host_space>& cache, std::int64_t b, std::int64_t h,
                          const kv_view<KeyT>& new_keys, const kv_view<KeyT>& new_values, backend::host_stream) {
    const std::int64_t count = new_keys.extent(2);
    make_room(cache, b * cache.shape.kv_heads + h, count);
    write_next(cache, new_keys, new_values, b, h, count);
  }

  /// Moves every head to a fresh region: its tokens, `count` slots reserved when
  /// it is `target` (or for every head when target is every_head), then an even
  /// share of what is left. In place, no scratch: first pack all regions to the
  /// left (in head order, each move goes to lower slots), then spread them to
  /// their new regions from the right (in reverse head order, each move goes to
  /// higher slots). Token order within a head is kept.
  template <class CodecT>
  static void repack(layout::flat::view<CodecT, host_space>& cache, std::int64_t target, std::int64_t count) {
    const std::int64_t heads = cache.heads();
    std::int64_t packed = 0;
    for (std::int64_t head = 0; head < heads; ++head) {
      for (std::int64_t i = 0; i < cache.lengths[head]; ++i)
        move_slot(cache, head, cache.offsets[head] + i, packed + i);
      cache.offsets[head] = packed;
      packed += cache.lengths[head];
    }
    const auto reserve = [&](std::int64_t head) { return target == every_head || head == target ? count : 0; };
    const std::int64_t spare = cache.capacity - packed - (target == every_head ? heads * count : count);
    std::int64_t end = cache.capacity;
    cache.offsets[heads] = cache.capacity;
    for (std::int64_t head = heads; head-- > 0;) {
      const std::int64_t begin = end - cache.lengths[head] - reserve(head) - cache.even_share(head, heads, spare);
      for (std::int64_t i = cache.lengths[head]; i-- > 0;) move_slot(cache, head, cache.offsets[head] + i, begin + i);
      cache.offsets[head] = begin;
      end = begin;
    }
    ++*cache.repacks;
  }

  static constexpr std::int64_t every_head = -1;

 private:
  /// Ensures head `target` (or every head) has `count` free slots after its
  /// tokens, repacking when one does not. Throws, changing nothing, when the
  /// buffer as a whole lacks the slots.
  template <class CodecT>
  static void make_room(layout::flat::view<CodecT, host_space>& cache, std::int64_t target, std::int64_t count) {
    const std::int64_t heads = cache.heads();
    const std::int64_t needed = target == every_head ? heads * count : count;
    const std::int64_t free = cache.capacity - cache.tokens_held();
    if (free < needed)
      detail::fail("kvtrim::layout::flat::append", "cache",
                   detail::cat("a buffer with ", needed, " free slots for ", count, " more tokens",
                               target == every_head ? " per head" : " in one head"),
                   detail::cat(free, " free of ", cache.capacity, " (buffer exhausted)"));
    bool fits = true;
    for (std::int64_t head = 0; head < heads; ++head)
      if ((target == every_head || head == target) && cache.lengths[head] + count > cache.region(head)) fits = false;
    if (!fits) repack(cache, target, count);
  }

  template <class View, class KeyT>
  static void write_next(const View& cache, const kv_view<KeyT>& new_keys, const kv_view<KeyT>& new_values,
                         std::int64_t b, std::int64_t h, std::int64_t count) {
    const std::int64_t length = cache.head_length(b, h);
    detail::encode_appended_tokens(cache, new_keys, new_values, b, h, length, count);
    cache.lengths[b * cache.shape.kv_heads + h] = length + count;
  }

  template <class CodecT>
  static void move_slot(const layout::flat::view<CodecT, host_space>& cache, std::int64_t head, std::int64_t from,
                        std::int64_t to) {
    if (from == to) return;
    if constexpr (requires { CodecT::move_slot(cache.storage, head, from, to); }) {
      CodecT::move_slot(cache.storage, head, from, to);
    } else {
      std::array<float, max_head_dim> key{}, value{};
      // Exact for codec::plain, the only codec without move_slot; the position
      // is unused by it.
      CodecT::load_key(cache.storage, head, from, 0, key.data());
      CodecT::load_value(cache.storage, head, from, value.data());
      CodecT::encode(cache.storage, head, to, 0, key.data(), value.data());
    }
  }
};

}  // namespace kvtrim
