// kvtrim/layout/flat.hpp — every head's tokens back to back in one buffer (Ada-KV).
//
// Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive
// Budget Allocation", 2024) stores a layer's ragged heads flattened: head
// head = b·kv_heads + h owns the region [offsets[head], offsets[head+1]) of one
// slot buffer, so varlen attention kernels read it with cu_seqlens-style
// offsets and no padding. Ada-KV itself packs the regions tightly and copies
// the whole layer at every decode append; kvtrim leaves headroom instead:
//   offsets[heads + 1]  region of each head; offsets[heads] = capacity
//   lengths[heads]      tokens the head holds (≤ its region); token i is slot offsets[head] + i
// (flash-attn's varlen kernels take exactly this pair as cu_seqlens_k + seqused_k).
// compact packs the kept tokens and spreads the free slots evenly over the
// heads (free / heads each, the remainder to the first heads) — the split that
// lasts longest when every head appends one token per step. append (every
// head) and append_head (one head, for engines whose heads grow unevenly) write
// into the headroom; when a growing head's region is full the layout repacks in
// place (pack left, then spread right, no scratch): each growing head gets the
// slots it asked for, then the rest is split evenly again. Each repack is
// counted in *repacks so engines that copied `offsets` know to read them again.
// Running out of slots altogether is a kvtrim::error raised before anything changes.
// With a codec that keeps state per run of slots (KIVI key groups of G), regions
// start at multiples of G and are sized in whole runs (docs/composition.md §3).
//
// The view is a trivially copyable struct of plain pointers and sizes (all
// mutable state lives in the cache's memory), so a CUDA backend can pass it to
// kernels by value and keep the metadata in device memory.
//
// On backend::cuda the same checks run on the device: a call that finds the
// buffer short writes nothing and records the failure in the view's `status`
// words (detail/status.hpp); kvtrim::check_status(cache, stream) throws the
// error the CPU would have thrown (docs/composition.md §6).
//
// Defaults: none (the capacity is the caller's choice).
// Backends: cpu, cuda (codec::plain; backend/cuda/flat.cuh).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/detail/compensation.hpp"
#include "kvtrim/layout/detail/positions.hpp"
#include "kvtrim/layout/detail/status.hpp"
#include "kvtrim/layout/detail/storage.hpp"

namespace kvtrim::layout {

struct flat {
  static constexpr std::string_view name = "layout::flat";
  static constexpr bool ragged_heads = true;
  /// Stores a compensation token and its logit bias per head (see detail/compensation.hpp).
  static constexpr bool compensation_tokens = true;

  /// The buffer: `slots` token slots shared by every head of the layer.
  struct pool_size {
    std::int64_t slots = 0;
  };

  template <Codec CodecT, MemorySpace Space>
  struct view {
    using layout_policy = flat;
    using codec = CodecT;
    using space = Space;
    using storage_type = typename CodecT::template storage<Space>;

    storage_type storage{};  // capacity slots
    model_shape shape{};
    std::int64_t batch = 0;
    std::int64_t capacity = 0;  // slots in the buffer

    std::int64_t* offsets = nullptr;  // [heads + 1]
    std::int64_t* lengths = nullptr;  // [heads]
    std::int64_t* repacks = nullptr;  // [1]: repacks since bind
    detail::compensation_table compensation{};
    detail::position_table positions{};  // slot_position [capacity], next_position [heads]
    std::int64_t* status = nullptr;      // [layout_status::words]: failures found on the device (detail/status.hpp)

    KVTRIM_HOST_DEVICE std::int64_t heads() const { return batch * shape.kv_heads; }
    KVTRIM_HOST_DEVICE std::int64_t region(std::int64_t head) const { return offsets[head + 1] - offsets[head]; }
    KVTRIM_HOST_DEVICE std::int64_t head_length(std::int64_t b, std::int64_t h) const {
      return lengths[b * shape.kv_heads + h];
    }
    KVTRIM_HOST_DEVICE std::int64_t slot(std::int64_t b, std::int64_t h, std::int64_t i) const {
      return offsets[b * shape.kv_heads + h] + i;
    }
    KVTRIM_HOST_DEVICE float logit_bias(std::int64_t b, std::int64_t h, std::int64_t i) const {
      return compensation.logit_bias(b * shape.kv_heads + h, i);
    }
    /// Tokens held by all heads together.
    KVTRIM_HOST_DEVICE std::int64_t tokens_held() const {
      std::int64_t total = 0;
      for (std::int64_t head = 0; head < heads(); ++head) total += lengths[head];
      return total;
    }
    /// Regions start at multiples of the codec's slot run (KIVI key groups: a
    /// group's slots are adjacent and its scales sit at slot / run); 1 for other codecs.
    std::int64_t run() const { return detail::storage_slot_run(storage); }
    /// Runs a head of `tokens` tokens occupies.
    std::int64_t runs_for(std::int64_t tokens) const { return (tokens + run() - 1) / run(); }

    /// Headroom of `head` after the even split of `free` slots (or runs) over `heads` heads.
    KVTRIM_HOST_DEVICE static constexpr std::int64_t even_share(std::int64_t head, std::int64_t heads,
                                                                std::int64_t free) {
      return free / heads + (head < free % heads ? 1 : 0);
    }

    /// Bytes an owning cache of this shape allocates (token storage and metadata).
    static std::size_t bytes(const model_shape& shape, std::int64_t batch, const pool_size& pool,
                             const typename CodecT::config& codec_config = {}) {
      check_arguments("kvtrim::layout::flat::view::bytes", shape, batch, pool);
      workspace_carver carver;
      carve(carver, shape, batch, pool, codec_config);
      return carver.bytes();
    }

    /// A view over `memory` (of bytes(...) bytes, 256-byte aligned). Host memory
    /// is initialised to an empty cache; a device backend clears it with its own reset.
    static view bind(void* memory, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                     const typename CodecT::config& codec_config = {}) {
      check_arguments("kvtrim::layout::flat::view::bind", shape, batch, pool);
      workspace_carver carver(workspace{memory, ~std::size_t{0}});
      view result = carve(carver, shape, batch, pool, codec_config);
      if constexpr (std::same_as<Space, host_space>) {
        result.reset();
        *result.repacks = 0;
        for (int k = 0; k < detail::layout_status::words; ++k) result.status[k] = 0;
      }
      return result;
    }

    /// Empties every head and splits the whole buffer evenly (host memory).
    void reset() const {
      for (std::int64_t head = 0; head < heads(); ++head) lengths[head] = 0;
      place_evenly();
      compensation.clear(heads());
      positions.clear(heads());
    }

    /// Runs the heads occupy as they are (each head's length rounded up to whole runs).
    std::int64_t runs_held() const {
      std::int64_t total = 0;
      for (std::int64_t head = 0; head < heads(); ++head) total += runs_for(lengths[head]);
      return total;
    }

    /// Sets offsets from lengths: regions in head order, each its length (in
    /// whole runs) plus an even share of the free runs (host memory; moves no tokens).
    void place_evenly() const {
      const std::int64_t free = capacity / run() - runs_held();
      offsets[0] = 0;
      for (std::int64_t head = 0; head < heads(); ++head)
        offsets[head + 1] = offsets[head] + (runs_for(lengths[head]) + even_share(head, heads(), free)) * run();
      offsets[heads()] = capacity;
    }

   private:
    static void check_arguments(std::string_view function, const model_shape& shape, std::int64_t batch,
                                const pool_size& pool) {
      shape.validate(function);
      if (batch < 1) detail::fail(function, "batch", "at least one sequence", std::to_string(batch));
      if (pool.slots < 1) detail::fail(function, "pool.slots", "at least one token slot", std::to_string(pool.slots));
      detail::checked_mul(function, "batch", batch, shape.kv_heads);
    }

    /// The buffer's slots: pool.slots rounded up to whole slot runs of the codec.
    static std::int64_t buffer_slots(const pool_size& pool, const typename CodecT::config& codec_config) {
      const std::int64_t run = ::kvtrim::codec::slot_alignment<CodecT>(codec_config);
      constexpr std::string_view function = "kvtrim::layout::flat::view::bytes";
      return detail::checked_mul(function, "pool.slots", detail::checked_add(function, "pool.slots", pool.slots, run - 1) / run, run);
    }

    static view carve(workspace_carver& carver, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                      const typename CodecT::config& codec_config) {
      const std::int64_t heads = batch * shape.kv_heads;
      const std::int64_t slots = buffer_slots(pool, codec_config);
      view result;
      result.storage = detail::carve_codec_storage<CodecT, Space>(carver, codec_config, slots, heads, shape.head_dim,
                                                                  ::kvtrim::codec::slot_alignment<CodecT>(codec_config));
      result.shape = shape;
      result.batch = batch;
      result.capacity = slots;
      result.offsets = carver.take<std::int64_t>(heads + 1);
      result.lengths = carver.take<std::int64_t>(heads);
      result.repacks = carver.take<std::int64_t>(1);
      result.compensation = detail::compensation_table::carve(carver, heads);
      result.positions = detail::position_table::carve(carver, slots, heads);
      result.status = carver.take<std::int64_t>(detail::layout_status::words);
      return result;
    }
  };

  /// Throws unless the view's sizes, metadata pointers and storage are sane:
  /// O(1), reads none of the cache's memory (usable for device views from the host).
  template <class View>
  static void check(std::string_view function, const View& cache) {
    cache.shape.validate(function);
    if (cache.batch < 1) detail::fail(function, "cache.batch", "at least one sequence", std::to_string(cache.batch));
    detail::checked_mul(function, "cache.batch", cache.batch, cache.shape.kv_heads);
    if (cache.capacity < 1)
      detail::fail(function, "cache.capacity", "at least one token slot", std::to_string(cache.capacity));
    if (cache.offsets == nullptr || cache.lengths == nullptr || cache.repacks == nullptr ||
        cache.compensation.index == nullptr || cache.compensation.bias == nullptr || !cache.positions.bound())
      detail::fail(function, "cache", "non-null offsets, lengths, compensation and position tables (a bound view)",
                   "a null metadata pointer");
    if (!std::same_as<typename View::space, host_space> && cache.status == nullptr)
      detail::fail(function, "cache.status", "non-null status words on a device view (device failures are reported there)",
                   "a null pointer");
    if (detail::storage_slots(cache.storage) < cache.capacity)
      detail::fail(function, "cache.storage", detail::cat("a codec storage of at least capacity = ", cache.capacity, " slots"),
                   detail::cat(detail::storage_slots(cache.storage), " slots"));
    if (cache.run() < 1)
      detail::fail(function, "cache.storage.slot_run", "a slot run of at least 1", std::to_string(cache.run()));
    if (cache.capacity % cache.run() != 0)
      detail::fail(function, "cache.capacity", detail::cat("a multiple of the codec's slot run ", cache.run()),
                   std::to_string(cache.capacity));
    View::codec::check_storage(function, cache.storage, cache.shape.head_dim);
  }

  /// check(), plus offsets and lengths (host views, O(heads)): regions in head
  /// order inside the buffer, starting at whole slot runs, each holding its length.
  template <class View>
  static void validate(std::string_view function, const View& cache, bool /*exclusive*/ = false) {
    check(function, cache);
    if constexpr (std::same_as<typename View::space, host_space>) {
      if (cache.offsets[0] != 0) detail::fail(function, "cache.offsets", "offsets[0] = 0", std::to_string(cache.offsets[0]));
      if (cache.offsets[cache.heads()] != cache.capacity)
        detail::fail(function, "cache.offsets", detail::cat("offsets[heads] = capacity = ", cache.capacity),
                     std::to_string(cache.offsets[cache.heads()]));
      for (std::int64_t head = 0; head < cache.heads(); ++head) {
        const std::int64_t begin = cache.offsets[head], end = cache.offsets[head + 1];
        if (end < begin || end > cache.capacity || begin % cache.run() != 0)
          detail::fail(function, "cache.offsets",
                       detail::cat("non-decreasing offsets in [0, ", cache.capacity, "] at multiples of ", cache.run()),
                       detail::cat("offsets[", head, "] = ", begin, ", offsets[", head + 1, "] = ", end));
        const std::int64_t length = cache.lengths[head];
        if (length < 0 || length > end - begin)
          detail::fail(function, "cache.lengths", detail::cat("a length in [0, region = ", end - begin, "]"),
                       detail::cat(length, " for head ", head));
        const std::int64_t index = cache.compensation.index[head];
        if (index != -1 && (index < 0 || index >= length))
          detail::fail(function, "cache.compensation.index",
                       detail::cat("−1 or a token the head holds (< ", length, ")"),
                       detail::cat(index, " for head ", head));
      }
    }
  }
};

}  // namespace kvtrim::layout
