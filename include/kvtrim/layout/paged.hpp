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
// Defaults: page_size = 16 (vLLM's and FlashInfer's usual choice).
// Backends: cpu.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/detail/compensation.hpp"
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

  /// Pages a head of `tokens` tokens occupies.
  KVTRIM_HOST_DEVICE static constexpr std::int64_t pages_for(std::int64_t tokens, std::int64_t page_size) {
    return (tokens + page_size - 1) / page_size;
  }

  template <Codec CodecT, MemorySpace Space>
  struct view {
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
                             const typename CodecT::config& codec_config) {
      check_arguments("kvtrim::layout::paged::view::bytes", shape, batch, pool);
      workspace_carver carver;
      carve(carver, shape, batch, pool, codec_config);
      return carver.bytes();
    }

    /// A view over `memory` (of bytes(...) bytes, 256-byte aligned). Host memory
    /// is initialised to an empty cache; a device backend clears it with its own reset.
    static view bind(void* memory, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                     const typename CodecT::config& codec_config) {
      check_arguments("kvtrim::layout::paged::view::bind", shape, batch, pool);
      workspace_carver carver(workspace{memory, ~std::size_t{0}});
      view result = carve(carver, shape, batch, pool, codec_config);
      if constexpr (std::same_as<Space, host_space>) result.reset();
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
      for (std::int64_t k = 0; k < pages; ++k) free_pages[k] = static_cast<std::int32_t>(pages - 1 - k);
      *free_count = static_cast<std::int32_t>(pages);
      compensation.clear(heads());
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
      if (batch * shape.kv_heads >= std::numeric_limits<std::int32_t>::max())
        detail::fail(function, "batch", "fewer than 2^31 − 1 (sequence, kv head) pairs",
                     std::to_string(batch * shape.kv_heads));
    }

    static view carve(workspace_carver& carver, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                      const typename CodecT::config& codec_config) {
      const std::int64_t heads = batch * shape.kv_heads;
      const std::int64_t slots = pool.pages * pool.page_size;
      view result;
      // Interim (issue 9, until the layout rewrite lands): U = gcd(page_size, G).
      const std::int64_t slot_run = std::gcd(pool.page_size, ::kvtrim::codec::slot_alignment<CodecT>(codec_config));
      result.storage =
          detail::carve_codec_storage<CodecT, Space>(carver, codec_config, slots, heads, shape.head_dim, slot_run);
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
      return result;
    }
  };

  /// Throws unless the view's sizes, metadata pointers and storage are sane.
  template <class View>
  static void check(std::string_view function, const View& cache) {
    cache.shape.validate(function);
    if (cache.batch < 1) detail::fail(function, "cache.batch", "at least one sequence", std::to_string(cache.batch));
    if (cache.page_size < 1)
      detail::fail(function, "cache.page_size", "at least one token per page", std::to_string(cache.page_size));
    if (cache.pages < 1 || cache.pages > std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "cache.pages", "between 1 and 2^31 − 1 pages", std::to_string(cache.pages));
    if (cache.indptr == nullptr || cache.indices == nullptr || cache.last_page_len == nullptr ||
        cache.free_pages == nullptr || cache.free_count == nullptr || cache.compensation.index == nullptr ||
        cache.compensation.bias == nullptr)
      detail::fail(function, "cache", "non-null page tables, free list and compensation table (a bound view)",
                   "a null metadata pointer");
    View::codec::check_storage(function, cache.storage, cache.shape.head_dim);
  }
};

}  // namespace kvtrim::layout
