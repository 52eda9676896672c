// kvtrim/backend/cpu/flat.hpp — CPU reference of layout::flat: compact the
// selected tokens back to back with even headroom, append (to every head or to
// one head) into the headroom, and repack in place when a head's region is full.
//
// Repacking moves tokens as stored (codec::move_slot) with their positions;
// regions start at whole slot runs of the codec (docs/composition.md §3).
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/writes.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/detail/rollback.hpp"
#include "kvtrim/layout/flat.hpp"

namespace kvtrim {

template <>
struct implementation<layout::flat, backend::cpu> {
  template <class CodecT, class KeyT>
  static void compact(layout::flat::view<CodecT, host_space>& cache, const kv_view<KeyT>& keys,
                      const kv_view<KeyT>& values, const selection_view<host_space>& kept, const compact_args& args,
                      backend::host_stream) {
    std::int64_t runs = 0;
    for (std::int64_t head = 0; head < kept.heads; ++head) runs += cache.runs_for(kept.count(head));
    if (runs * cache.run() > cache.capacity)
      detail::fail("kvtrim::layout::flat::compact", "cache",
                   detail::cat("at least ", runs * cache.run(), " slots for this selection (", kept.offsets[kept.heads],
                               " tokens", cache.run() > 1 ? detail::cat(" in whole runs of ", cache.run()) : "", ")"),
                   detail::cat(cache.capacity, " slots (buffer exhausted)"));
    const detail::kept_source<KeyT> source(keys, values, kept, args);
    for (std::int64_t head = 0; head < kept.heads; ++head) cache.lengths[head] = kept.count(head);
    cache.place_evenly();
    for (std::int64_t head = 0; head < kept.heads; ++head) detail::write_kept_head(cache, source, head);
    detail::record_compensation(cache, args.compensation);
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

  /// scheme::truncate: each head of sequence b gives back its newest drop[b]
  /// tokens; regions stay where they are (the slots become headroom again).
  template <class CodecT>
  static void truncate(layout::flat::view<CodecT, host_space>& cache,
                       const tensor_view<const std::int32_t, 1, host_space>& drop, backend::host_stream) {
    detail::check_truncate(cache, drop);
    detail::forget_newest(cache, drop);
    for (std::int64_t head = 0; head < cache.heads(); ++head) {
      cache.lengths[head] -= detail::drop_at(drop, head / cache.shape.kv_heads);
      detail::drop_compensation_past(cache, head, cache.lengths[head]);
    }
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
    const std::int64_t run = cache.run();
    std::int64_t packed = 0;  // a multiple of run: regions start at whole runs
    for (std::int64_t head = 0; head < heads; ++head) {
      for (std::int64_t i = 0; i < cache.lengths[head]; ++i)
        move_slot(cache, head, cache.offsets[head] + i, packed + i);
      cache.offsets[head] = packed;
      packed += cache.runs_for(cache.lengths[head]) * run;
    }
    const auto reserve = [&](std::int64_t head) { return target == every_head || head == target ? count : 0; };
    std::int64_t needed_runs = 0;
    for (std::int64_t head = 0; head < heads; ++head) needed_runs += cache.runs_for(cache.lengths[head] + reserve(head));
    const std::int64_t spare = cache.capacity / run - needed_runs;
    std::int64_t end = cache.capacity;
    cache.offsets[heads] = cache.capacity;
    for (std::int64_t head = heads; head-- > 0;) {
      const std::int64_t begin =
          end - (cache.runs_for(cache.lengths[head] + reserve(head)) + cache.even_share(head, heads, spare)) * run;
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
    std::int64_t needed_runs = 0;
    for (std::int64_t head = 0; head < heads; ++head)
      needed_runs += cache.runs_for(cache.lengths[head] + (target == every_head || head == target ? count : 0));
    if (needed_runs * cache.run() > cache.capacity)
      detail::fail("kvtrim::layout::flat::append", "cache",
                   detail::cat("a buffer with room for ", count, " more tokens",
                               target == every_head ? " per head" : " in one head", " (", needed_runs * cache.run(),
                               " slots in all)"),
                   detail::cat(cache.capacity - cache.tokens_held(), " free of ", cache.capacity, " (buffer exhausted)"));
    bool fits = true;
    for (std::int64_t head = 0; head < heads; ++head)
      if ((target == every_head || head == target) && cache.lengths[head] + count > cache.region(head)) fits = false;
    if (!fits) repack(cache, target, count);
  }

  template <class View, class KeyT>
  static void write_next(const View& cache, const kv_view<KeyT>& new_keys, const kv_view<KeyT>& new_values,
                         std::int64_t b, std::int64_t h, std::int64_t count) {
    const std::int64_t length = cache.head_length(b, h);
    detail::write_appended(cache, new_keys, new_values, b, h, length, count);
    cache.lengths[b * cache.shape.kv_heads + h] = length + count;
  }

  /// Moves one stored token and its position; the codec moves what it keeps per
  /// slot (and per run, when `from` starts one).
  template <class CodecT>
  static void move_slot(const layout::flat::view<CodecT, host_space>& cache, std::int64_t head, std::int64_t from,
                        std::int64_t to) {
    if (from == to) return;
    codec::move_slot<CodecT>(cache.storage, head, from, to, cache.positions.slot_position[from]);
    cache.positions.slot_position[to] = cache.positions.slot_position[from];
  }
};

}  // namespace kvtrim
