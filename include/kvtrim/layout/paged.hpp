// kvtrim/layout/paged.hpp — a page pool with one page table per (sequence, kv head).
//
// vLLM's PagedAttention stores a sequence's tokens in fixed-size pages taken
// from a pool (Kwon et al., SOSP 2023); vllm-kvcompress (Rehg, 2024) gives every
// (sequence, kv head) its own page table so heads can hold different numbers
// of tokens — what per-head budgets (Ada-KV, RazorAttention) need. A page holds
// `page_size` tokens of one head; a head of n tokens owns ⌈n / page_size⌉ pages.
//
// Metadata, in FlashInfer's paged_kv_t form over flattened heads head = b·kv_heads + h
// (so engines can hand it to FlashInfer-style kernels with one kv head per "request"):
//   indptr[heads + 1]     head's pages are indices[indptr[head] .. indptr[head+1])
//   indices[pages]        page ids, in token order
//   last_page_len[heads]  tokens in the head's last page (1..page_size; 0 when the head is empty)
//   length = (page count − 1)·page_size + last_page_len
// and token i of a head lives in slot indices[indptr[head] + i / page_size]·page_size + i % page_size
// of the codec's storage (keys and values [pages, page_size, head_dim] for codec::plain).
// A free list (a stack of page ids) hands out pages; asking for more pages than
// the pool holds is a kvtrim::error raised before anything is modified, never a crash.
//
// The view is a trivially copyable struct of plain pointers and sizes (all
// mutable state — page tables, free list, compensation table — lives in the
// cache's memory), so a CUDA backend can pass it to kernels by value and keep
// the metadata in device memory; the CPU backend updates it with host code.
//
// On backend::cuda the same checks run on the device: a call that finds the
// pool short writes nothing and records the failure in the view's `status`
// words (detail/status.hpp); kvtrim::check_status(cache, stream) throws the
// error the CPU would have thrown (docs/composition.md §6).
//
// Defaults: page_size = 16 (vLLM's and FlashInfer's usual choice).
// Backends: cpu, cuda (codec::plain; backend/cuda/paged.cuh).
#pragma once

#include <algorithm>
#include <concepts>
#include <numeric>
#include <cstddef>
#include <cstdint>
#include <limits>
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

struct paged {
  static constexpr std::string_view name = "layout::paged";
  static constexpr bool ragged_heads = true;
  /// Stores a compensation token and its logit bias per head (see detail/compensation.hpp).
  static constexpr bool compensation_tokens = true;
  static constexpr std::int64_t default_page_size = 16;

  /// The pool: `pages` pages of `page_size` tokens each, shared by every head of the layer.
  struct pool_size {
    std::int64_t pages = 0;
    std::int64_t page_size = default_page_size;
  };

  /// The codec's slot run over pages of `page_size`: a page holds consecutive
  /// tokens of one head starting at a multiple of page_size, so runs of
  /// gcd(page_size, alignment) slots stay inside one key group (docs/composition.md §3).
  template <class CodecT>
  static std::int64_t slot_run(std::int64_t page_size, const typename CodecT::config& codec_config) {
    return std::gcd(page_size, ::kvtrim::codec::slot_alignment<CodecT>(codec_config));
  }

  /// Pages a head of `tokens` tokens occupies.
  KVTRIM_HOST_DEVICE static constexpr std::int64_t pages_for(std::int64_t tokens, std::int64_t page_size) {
    return (tokens + page_size - 1) / page_size;
  }

  template <Codec CodecT, MemorySpace Space>
  struct view {
    using layout_policy = paged;
    using codec = CodecT;
    using space = Space;
    using storage_type = typename CodecT::template storage<Space>;

    storage_type storage{};  // pages · page_size slots
    model_shape shape{};
    std::int64_t batch = 0;
    std::int64_t page_size = 0;
    std::int64_t pages = 0;  // pages in the pool

    std::int32_t* indptr = nullptr;         // [heads + 1]
    std::int32_t* indices = nullptr;        // [pages]
    std::int32_t* last_page_len = nullptr;  // [heads]
    std::int32_t* free_pages = nullptr;     // [pages]: free page ids are free_pages[0 .. *free_count)
    std::int32_t* free_count = nullptr;     // [1]
    detail::compensation_table compensation{};
    detail::position_table positions{};     // slot_position [pages · page_size], next_position [heads]
    std::int64_t* status = nullptr;         // [layout_status::words]: failures found on the device (detail/status.hpp)

    KVTRIM_HOST_DEVICE std::int64_t heads() const { return batch * shape.kv_heads; }
    KVTRIM_HOST_DEVICE std::int64_t page_count(std::int64_t head) const { return indptr[head + 1] - indptr[head]; }
    KVTRIM_HOST_DEVICE std::int64_t head_length(std::int64_t b, std::int64_t h) const {
      const std::int64_t head = b * shape.kv_heads + h;
      const std::int64_t count = page_count(head);
      return count == 0 ? 0 : (count - 1) * page_size + last_page_len[head];
    }
    KVTRIM_HOST_DEVICE std::int64_t slot(std::int64_t b, std::int64_t h, std::int64_t i) const {
      const std::int64_t head = b * shape.kv_heads + h;
      return static_cast<std::int64_t>(indices[indptr[head] + i / page_size]) * page_size + i % page_size;
    }
    KVTRIM_HOST_DEVICE float logit_bias(std::int64_t b, std::int64_t h, std::int64_t i) const {
      return compensation.logit_bias(b * shape.kv_heads + h, i);
    }
    /// Pages currently owned by some head.
    KVTRIM_HOST_DEVICE std::int64_t pages_in_use() const { return pages - *free_count; }

    /// Bytes an owning cache of this shape allocates (token storage and metadata).
    static std::size_t bytes(const model_shape& shape, std::int64_t batch, const pool_size& pool,
                             const typename CodecT::config& codec_config = {}) {
      check_arguments("kvtrim::layout::paged::view::bytes", shape, batch, pool);
      workspace_carver carver;
      carve(carver, shape, batch, pool, codec_config);
      return carver.bytes();
    }

    /// A view over `memory` (of bytes(...) bytes, 256-byte aligned). Host memory
    /// is initialised to an empty cache; a device backend clears it with its own reset.
    static view bind(void* memory, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                     const typename CodecT::config& codec_config = {}) {
      check_arguments("kvtrim::layout::paged::view::bind", shape, batch, pool);
      workspace_carver carver(workspace{memory, ~std::size_t{0}});
      view result = carve(carver, shape, batch, pool, codec_config);
      if constexpr (std::same_as<Space, host_space>) {
        result.reset();
        for (int k = 0; k < detail::layout_status::words; ++k) result.status[k] = 0;
      }
      return result;
    }

    /// Empties every head and returns every page to the free list (host memory).
    /// Pages are handed out in increasing id order afterwards.
    void reset() const {
      // GCC 12 inlines this into cache's constructor and warns about a zero-size
      // region (-Wstringop-overflow) on a path where the carver saw no memory,
      // which bind never takes; the loop itself is in bounds (indptr has heads + 1).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
      for (std::int64_t head = 0; head <= heads(); ++head) indptr[head] = 0;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
      for (std::int64_t head = 0; head < heads(); ++head) last_page_len[head] = 0;
      for (std::int64_t k = 0; k < pages; ++k) indices[k] = 0;  // unused entries stay ≥ 0 (validate's marking)
      for (std::int64_t k = 0; k < pages; ++k) free_pages[k] = static_cast<std::int32_t>(pages - 1 - k);
      *free_count = static_cast<std::int32_t>(pages);
      compensation.clear(heads());
      positions.clear(heads());
    }

   private:
    static void check_arguments(std::string_view function, const model_shape& shape, std::int64_t batch,
                                const pool_size& pool) {
      shape.validate(function);
      if (batch < 1) detail::fail(function, "batch", "at least one sequence", std::to_string(batch));
      if (pool.page_size < 1)
        detail::fail(function, "pool.page_size", "at least one token per page", std::to_string(pool.page_size));
      if (pool.pages < 1 || pool.pages > std::numeric_limits<std::int32_t>::max())
        detail::fail(function, "pool.pages", "between 1 and 2^31 − 1 pages (page ids are 32-bit, as in FlashInfer)",
                     std::to_string(pool.pages));
      if (detail::checked_mul(function, "batch", batch, shape.kv_heads) >= std::numeric_limits<std::int32_t>::max())
        detail::fail(function, "batch", "fewer than 2^31 − 1 (sequence, kv head) pairs",
                     detail::cat(batch, " × ", shape.kv_heads));
      detail::checked_mul(function, "pool.pages", pool.pages, pool.page_size);
    }

    static view carve(workspace_carver& carver, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                      const typename CodecT::config& codec_config) {
      const std::int64_t heads = batch * shape.kv_heads;
      const std::int64_t slots = pool.pages * pool.page_size;
      view result;
      result.storage = detail::carve_codec_storage<CodecT, Space>(carver, codec_config, slots, heads, shape.head_dim,
                                                                  slot_run<CodecT>(pool.page_size, codec_config));
      result.shape = shape;
      result.batch = batch;
      result.page_size = pool.page_size;
      result.pages = pool.pages;
      result.indptr = carver.take<std::int32_t>(heads + 1);
      result.indices = carver.take<std::int32_t>(pool.pages);
      result.last_page_len = carver.take<std::int32_t>(heads);
      result.free_pages = carver.take<std::int32_t>(pool.pages);
      result.free_count = carver.take<std::int32_t>(1);
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
    if (cache.page_size < 1 || cache.page_size > detail::position_table::max_position)
      detail::fail(function, "cache.page_size", "between 1 and 2^31 − 1 tokens per page",
                   std::to_string(cache.page_size));
    if (cache.pages < 1 || cache.pages > std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "cache.pages", "between 1 and 2^31 − 1 pages", std::to_string(cache.pages));
    if (detail::checked_mul(function, "cache.batch", cache.batch, cache.shape.kv_heads) >=
        std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "cache.batch", "fewer than 2^31 − 1 (sequence, kv head) pairs",
                   detail::cat(cache.batch, " × ", cache.shape.kv_heads));
    if (cache.indptr == nullptr || cache.indices == nullptr || cache.last_page_len == nullptr ||
        cache.free_pages == nullptr || cache.free_count == nullptr || cache.compensation.index == nullptr ||
        cache.compensation.bias == nullptr || !cache.positions.bound())
      detail::fail(function, "cache", "non-null page tables, free list, compensation and position tables (a bound view)",
                   "a null metadata pointer");
    if (!std::same_as<typename View::space, host_space> && cache.status == nullptr)
      detail::fail(function, "cache.status", "non-null status words on a device view (device failures are reported there)",
                   "a null pointer");
    const std::int64_t slots = detail::checked_mul(function, "cache.pages", cache.pages, cache.page_size);
    if (detail::storage_slots(cache.storage) < slots)
      detail::fail(function, "cache.storage", detail::cat("a codec storage of at least pages · page_size = ", slots, " slots"),
                   detail::cat(detail::storage_slots(cache.storage), " slots"));
    const std::int64_t run = detail::storage_slot_run(cache.storage);
    if (run < 1) detail::fail(function, "cache.storage.slot_run", "a slot run of at least 1", std::to_string(run));
    if (cache.page_size % run != 0)
      detail::fail(function, "cache.page_size",
                   detail::cat("a multiple of the codec's slot run ", run, " (the storage was bound for other pages)"),
                   std::to_string(cache.page_size));
    View::codec::check_storage(function, cache.storage, cache.shape.head_dim);
  }

  /// Throws when a page id appears twice among the tables' `used` entries and
  /// the `free` free pages (see validate). In place: indices[p] < 0 marks page p.
  template <class View>
  static void check_pages_distinct(std::string_view function, const View& cache, std::int64_t used,
                                   std::int64_t free) {
    const auto original = [](std::int32_t entry) { return entry < 0 ? ~entry : entry; };
    std::int64_t repeated = -1;
    const auto mark = [&](std::int32_t page) {
      if (cache.indices[page] < 0) return false;
      cache.indices[page] = ~cache.indices[page];
      return true;
    };
    for (std::int64_t k = 0; k < used && repeated < 0; ++k)
      if (!mark(original(cache.indices[k]))) repeated = original(cache.indices[k]);
    for (std::int64_t k = 0; k < free && repeated < 0; ++k)
      if (!mark(cache.free_pages[k])) repeated = cache.free_pages[k];
    for (std::int64_t k = 0; k < cache.pages; ++k) cache.indices[k] = original(cache.indices[k]);
    if (repeated >= 0)
      detail::fail(function, "cache.indices", "each page in at most one page table or the free list",
                   detail::cat("page ", repeated, " named twice"));
  }

  /// check(), plus the page tables and the free list (host views, O(heads + pages)):
  /// indptr starts at 0 and never decreases, every page id is in range, last
  /// page lengths fit their pages, and the tables and free list together name
  /// at most `pages` pages. An engine's hand-built table that fails this would
  /// otherwise send a read or write outside the pool.
  ///
  /// With `exclusive` (the writers: compress, append, append_head, which own the
  /// cache for the call) it also checks that no page is named twice — by two
  /// tables, or by a table and the free list — which would let two heads
  /// overwrite each other's tokens. It marks pages in place (the sign bit of
  /// indices[page], restored before returning, so the cache's bytes are
  /// unchanged and nothing is allocated); unused entries of `indices` (beyond
  /// indptr[heads]) must therefore be ≥ 0 (bind and reset write zeros).
  /// Readers (attend) skip this part: they may run concurrently.
  template <class View>
  static void validate(std::string_view function, const View& cache, bool exclusive = false) {
    check(function, cache);
    if constexpr (std::same_as<typename View::space, host_space>) {
      const std::int64_t heads = cache.heads();
      if (cache.indptr[0] != 0) detail::fail(function, "cache.indptr", "indptr[0] = 0", std::to_string(cache.indptr[0]));
      for (std::int64_t head = 0; head < heads; ++head) {
        const std::int64_t count = std::int64_t{cache.indptr[head + 1]} - cache.indptr[head];
        if (count < 0 || cache.indptr[head + 1] > cache.pages)
          detail::fail(function, "cache.indptr",
                       detail::cat("non-decreasing entries in [0, pages = ", cache.pages, "]"),
                       detail::cat("indptr[", head, "] = ", cache.indptr[head], ", indptr[", head + 1,
                                   "] = ", cache.indptr[head + 1]));
        const std::int64_t last = cache.last_page_len[head];
        if (count == 0 ? last != 0 : (last < 1 || last > cache.page_size))
          detail::fail(function, "cache.last_page_len",
                       count == 0 ? std::string("0 for a head without pages")
                                  : detail::cat("a length in [1, page_size = ", cache.page_size, "]"),
                       detail::cat(last, " for head ", head));
      }
      const std::int64_t used = cache.indptr[heads];
      for (std::int64_t k = 0; k < used; ++k)
        if (cache.indices[k] < 0 || cache.indices[k] >= cache.pages)
          detail::fail(function, "cache.indices", detail::cat("page ids in [0, ", cache.pages, ")"),
                       detail::cat(cache.indices[k], " at indices[", k, "]"));
      const std::int64_t free = *cache.free_count;
      if (free < 0 || used + free > cache.pages)
        detail::fail(function, "cache.free_count",
                     detail::cat("a count in [0, pages − pages in tables = ", cache.pages - used, "]"),
                     std::to_string(free));
      for (std::int64_t k = 0; k < free; ++k)
        if (cache.free_pages[k] < 0 || cache.free_pages[k] >= cache.pages)
          detail::fail(function, "cache.free_pages", detail::cat("page ids in [0, ", cache.pages, ")"),
                       detail::cat(cache.free_pages[k], " at free_pages[", k, "]"));
      for (std::int64_t k = used; k < cache.pages; ++k)
        if (cache.indices[k] < 0)
          detail::fail(function, "cache.indices",
                       detail::cat("unused entries (beyond indptr[heads] = ", used, ") ≥ 0"),
                       detail::cat(cache.indices[k], " at indices[", k, "]"));
      if (exclusive) check_pages_distinct(function, cache, used, free);
      for (std::int64_t head = 0; head < heads; ++head) {
        const std::int64_t index = cache.compensation.index[head];
        const std::int64_t length = cache.head_length(head / cache.shape.kv_heads, head % cache.shape.kv_heads);
        if (index != -1 && (index < 0 || index >= length))
          detail::fail(function, "cache.compensation.index",
                       detail::cat("−1 or a token the head holds (< ", length, ")"),
                       detail::cat(index, " for head ", head));
      }
    }
  }
};

}  // namespace kvtrim::layout
