// kvtrim/layout/shared_paged.hpp — an engine's own paged cache: pages shared by
// every kv head of a sequence, one page table per sequence.
//
// vLLM's PagedAttention (Kwon et al., SOSP 2023) and FlashInfer store a layer's
// cache as one tensor of pages, each page holding `page_size` tokens of one
// sequence for every kv head, keys and values side by side:
//   NHD  [pages, 2, page_size, kv_heads, head_dim]   (FlashInfer's default, vLLM's FlashAttention backend)
//   HND  [pages, 2, kv_heads, page_size, head_dim]
// with FlashInfer's paged_kv_t tables over sequences (not heads):
//   indptr[batch + 1]       sequence b's pages are indices[indptr[b] .. indptr[b+1])
//   indices[pages]          page ids, in token order
//   last_page_len[batch]    tokens in the sequence's last page (1..page_size; 0: no pages)
// This layout binds a kvtrim cache over such a tensor without copying it
// (view::bind_pages: the engine's page tensor, kvtrim's tables and free list in
// a small metadata block), or allocates one (view::bind). Because a page holds
// every head of a token, all heads of a sequence hold the same number of tokens:
// uniform budgets only (ragged_heads = false; per-head budgets need
// layout::paged or layout::flat, which give each head its own page table).
//
// Addressing, as codec::plain rows of head_dim elements (`slot` counts rows):
//   keys   = pages tensor,  values = pages tensor + page_size·kv_heads·head_dim
//   NHD    slot(b, h, i) = (page·2·page_size + i mod page_size)·kv_heads + h
//   HND    slot(b, h, i) = (page·2·kv_heads + h)·page_size + i mod page_size
//   with page = indices[indptr[b] + ⌊i / page_size⌋]; the value row is the same
//   slot read from `values` (the page's second half).
// Positions are kept per slot as in every layout (the table covers the
// 2·pages·page_size·kv_heads rows of the tensor: half its entries, the value
// rows', stay unused — 4 bytes per key row against 2·2·head_dim bytes of K/V).
//
// Codecs: codec::plain (fp16, bf16, fp32): the engine's tensor is plain elements.
// Backends: cpu and cuda (compress, append, decode attention; the device runs the
// CPU's checks on the device and reports through check_status).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/detail/positions.hpp"
#include "kvtrim/layout/detail/status.hpp"

namespace kvtrim::layout {

struct shared_paged {
  static constexpr std::string_view name = "layout::shared_paged";
  static constexpr bool ragged_heads = false;
  static constexpr std::int64_t default_page_size = 16;

  /// Where a page puts its tokens and heads (FlashInfer's QKVLayout).
  enum class order : std::int32_t { nhd = 0, hnd = 1 };

  /// The pool: `pages` pages of `page_size` tokens, every kv head of a token in the page.
  struct pool_size {
    std::int64_t pages = 0;
    std::int64_t page_size = default_page_size;
    shared_paged::order order = shared_paged::order::nhd;
  };

  /// Pages a sequence of `tokens` tokens occupies.
  KVTRIM_HOST_DEVICE static constexpr std::int64_t pages_for(std::int64_t tokens, std::int64_t page_size) {
    return (tokens + page_size - 1) / page_size;
  }

  template <Codec CodecT, MemorySpace Space>
  struct view {
    static_assert(::kvtrim::codec::is_plain<CodecT>,
                  "kvtrim::layout::shared_paged stores an engine's page tensor of plain elements: use codec::fp16, "
                  "codec::bf16 or codec::fp32");
    using layout_policy = shared_paged;
    using codec = CodecT;
    using space = Space;
    using storage_type = typename CodecT::template storage<Space>;
    using element = typename CodecT::element;

    storage_type storage{};  // keys: the page tensor; values: its second half of every page
    model_shape shape{};
    std::int64_t batch = 0;
    std::int64_t page_size = 0;
    std::int64_t pages = 0;
    shared_paged::order order = shared_paged::order::nhd;

    std::int32_t* indptr = nullptr;         // [batch + 1]
    std::int32_t* indices = nullptr;        // [pages]
    std::int32_t* last_page_len = nullptr;  // [batch]
    std::int32_t* free_pages = nullptr;     // [pages]: free page ids are free_pages[0 .. *free_count)
    std::int32_t* free_count = nullptr;     // [1]
    detail::position_table positions{};     // slot_position [rows of the tensor], next_position [heads]
    std::int64_t* status = nullptr;         // [layout_status::words] (device failures, detail/status.hpp)

    KVTRIM_HOST_DEVICE std::int64_t heads() const { return batch * shape.kv_heads; }
    KVTRIM_HOST_DEVICE std::int64_t page_count(std::int64_t b) const { return indptr[b + 1] - indptr[b]; }
    /// Tokens sequence b holds (every kv head of it).
    KVTRIM_HOST_DEVICE std::int64_t sequence_length(std::int64_t b) const {
      const std::int64_t count = page_count(b);
      return count == 0 ? 0 : (count - 1) * page_size + last_page_len[b];
    }
    KVTRIM_HOST_DEVICE std::int64_t head_length(std::int64_t b, std::int64_t /*h*/) const { return sequence_length(b); }
    /// The row of token i in page `page` for kv head h.
    KVTRIM_HOST_DEVICE std::int64_t page_slot(std::int64_t page, std::int64_t h, std::int64_t offset) const {
      return order == shared_paged::order::nhd ? (page * 2 * page_size + offset) * shape.kv_heads + h
                                               : (page * 2 * shape.kv_heads + h) * page_size + offset;
    }
    KVTRIM_HOST_DEVICE std::int64_t slot(std::int64_t b, std::int64_t h, std::int64_t i) const {
      return page_slot(indices[indptr[b] + i / page_size], h, i % page_size);
    }
    KVTRIM_HOST_DEVICE float logit_bias(std::int64_t, std::int64_t, std::int64_t) const { return 0.0f; }
    KVTRIM_HOST_DEVICE std::int64_t pages_in_use() const { return pages - *free_count; }

    /// Rows of head_dim elements in the page tensor (keys and values): 2·pages·page_size·kv_heads.
    static std::int64_t tensor_rows(const model_shape& shape, const pool_size& pool) {
      return 2 * pool.pages * pool.page_size * shape.kv_heads;
    }

    /// Bytes an owning cache allocates: the page tensor, then the tables.
    static std::size_t bytes(const model_shape& shape, std::int64_t batch, const pool_size& pool,
                             const typename CodecT::config& = {}) {
      check_arguments("kvtrim::layout::shared_paged::view::bytes", shape, batch, pool);
      workspace_carver carver;
      carver.take<element>(tensor_rows(shape, pool) * shape.head_dim);
      carve_tables(carver, shape, batch, pool);
      return carver.bytes();
    }
    /// Bytes of kvtrim's tables for an engine's page tensor (bind_pages).
    static std::size_t metadata_bytes(const model_shape& shape, std::int64_t batch, const pool_size& pool) {
      check_arguments("kvtrim::layout::shared_paged::view::metadata_bytes", shape, batch, pool);
      workspace_carver carver;
      carve_tables(carver, shape, batch, pool);
      return carver.bytes();
    }

    /// An owning view over `memory` (bytes(...) bytes, 256-byte aligned). Host memory is
    /// initialised to an empty cache; a device backend clears it with its own reset.
    static view bind(void* memory, const model_shape& shape, std::int64_t batch, const pool_size& pool,
                     const typename CodecT::config& = {}) {
      check_arguments("kvtrim::layout::shared_paged::view::bind", shape, batch, pool);
      workspace_carver carver(workspace{memory, ~std::size_t{0}});
      element* tensor = carver.take<element>(tensor_rows(shape, pool) * shape.head_dim);
      return finish_bind(tensor, carver, shape, batch, pool);
    }

    /// A view over an engine's page tensor `pages_tensor` ([pages, 2, page_size, kv_heads, D] for
    /// order nhd, [pages, 2, kv_heads, page_size, D] for hnd; 16-byte aligned for backend::cuda),
    /// nothing copied, with kvtrim's tables in `metadata` (metadata_bytes(...) bytes, 256-byte
    /// aligned). Host metadata is initialised to an empty cache (every page free).
    static view bind_pages(element* pages_tensor, void* metadata, const model_shape& shape, std::int64_t batch,
                           const pool_size& pool) {
      constexpr std::string_view function = "kvtrim::layout::shared_paged::view::bind_pages";
      check_arguments(function, shape, batch, pool);
      if (pages_tensor == nullptr) detail::fail(function, "pages_tensor", "the engine's page tensor", "nullptr");
      workspace_carver carver(workspace{metadata, ~std::size_t{0}});
      return finish_bind(pages_tensor, carver, shape, batch, pool);
    }

    /// Empties every sequence and returns every page to the free list (host memory);
    /// pages are handed out in increasing id order afterwards. The page tensor is not touched.
    void reset() const {
      for (std::int64_t b = 0; b <= batch; ++b) indptr[b] = 0;
      for (std::int64_t b = 0; b < batch; ++b) last_page_len[b] = 0;
      for (std::int64_t k = 0; k < pages; ++k) indices[k] = 0;
      for (std::int64_t k = 0; k < pages; ++k) free_pages[k] = static_cast<std::int32_t>(pages - 1 - k);
      *free_count = static_cast<std::int32_t>(pages);
      positions.clear(heads());
    }

   private:
    static void check_arguments(std::string_view function, const model_shape& shape, std::int64_t batch,
                                const pool_size& pool) {
      shape.validate(function);
      if (batch < 1 || batch >= std::numeric_limits<std::int32_t>::max())
        detail::fail(function, "batch", "between 1 and 2^31 − 2 sequences", std::to_string(batch));
      if (pool.page_size < 1 || pool.page_size > detail::position_table::max_position)
        detail::fail(function, "pool.page_size", "between 1 and 2^31 − 1 tokens per page",
                     std::to_string(pool.page_size));
      if (pool.pages < 1 || pool.pages > std::numeric_limits<std::int32_t>::max())
        detail::fail(function, "pool.pages", "between 1 and 2^31 − 1 pages (page ids are 32-bit, as in FlashInfer)",
                     std::to_string(pool.pages));
      if (pool.order != shared_paged::order::nhd && pool.order != shared_paged::order::hnd)
        detail::fail(function, "pool.order", "order::nhd or order::hnd",
                     std::to_string(static_cast<std::int32_t>(pool.order)));
      detail::checked_mul(function, "batch", batch, shape.kv_heads);
      detail::checked_mul(function, "pool.pages",
                          detail::checked_mul(function, "pool.pages", 2 * pool.pages, pool.page_size),
                          detail::checked_mul(function, "shape.kv_heads", shape.kv_heads, shape.head_dim));
    }
    static void carve_tables(workspace_carver& carver, const model_shape& shape, std::int64_t batch,
                             const pool_size& pool) {
      carver.take<std::int32_t>(batch + 1);
      carver.take<std::int32_t>(pool.pages);
      carver.take<std::int32_t>(batch);
      carver.take<std::int32_t>(pool.pages);
      carver.take<std::int32_t>(1);
      detail::position_table::carve(carver, tensor_rows(shape, pool), batch * shape.kv_heads);
      carver.take<std::int64_t>(detail::layout_status::words);
    }
    static view finish_bind(element* tensor, workspace_carver& carver, const model_shape& shape, std::int64_t batch,
                            const pool_size& pool) {
      view result;
      const std::int64_t half_page = pool.page_size * shape.kv_heads * shape.head_dim;  // elements
      result.storage.keys = tensor;
      result.storage.values = tensor + half_page;
      result.storage.head_dim = shape.head_dim;
      // Rows reachable from `values` stay inside the tensor: the last page's value rows end it.
      result.storage.slots = tensor_rows(shape, pool) - pool.page_size * shape.kv_heads;
      result.storage.slot_run = 1;
      result.shape = shape;
      result.batch = batch;
      result.page_size = pool.page_size;
      result.pages = pool.pages;
      result.order = pool.order;
      result.indptr = carver.take<std::int32_t>(batch + 1);
      result.indices = carver.take<std::int32_t>(pool.pages);
      result.last_page_len = carver.take<std::int32_t>(batch);
      result.free_pages = carver.take<std::int32_t>(pool.pages);
      result.free_count = carver.take<std::int32_t>(1);
      result.positions = detail::position_table::carve(carver, tensor_rows(shape, pool), batch * shape.kv_heads);
      result.status = carver.take<std::int64_t>(detail::layout_status::words);
      if constexpr (std::same_as<Space, host_space>) {
        result.reset();
        for (int k = 0; k < detail::layout_status::words; ++k) result.status[k] = 0;
      }
      return result;
    }
  };

  /// Throws unless the view's sizes, order, tables and storage are sane: O(1), reads none
  /// of the cache's memory (usable for device views from the host).
  template <class View>
  static void check(std::string_view function, const View& cache) {
    cache.shape.validate(function);
    if (cache.batch < 1) detail::fail(function, "cache.batch", "at least one sequence", std::to_string(cache.batch));
    if (cache.page_size < 1 || cache.page_size > detail::position_table::max_position)
      detail::fail(function, "cache.page_size", "between 1 and 2^31 − 1 tokens per page",
                   std::to_string(cache.page_size));
    if (cache.pages < 1 || cache.pages > std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "cache.pages", "between 1 and 2^31 − 1 pages", std::to_string(cache.pages));
    if (cache.order != order::nhd && cache.order != order::hnd)
      detail::fail(function, "cache.order", "order::nhd or order::hnd",
                   std::to_string(static_cast<std::int32_t>(cache.order)));
    if (cache.indptr == nullptr || cache.indices == nullptr || cache.last_page_len == nullptr ||
        cache.free_pages == nullptr || cache.free_count == nullptr || !cache.positions.bound())
      detail::fail(function, "cache", "non-null page tables, free list and position tables (a bound view)",
                   "a null metadata pointer");
    if (!std::same_as<typename View::space, host_space> && cache.status == nullptr)
      detail::fail(function, "cache.status", "non-null status words on a device view", "a null pointer");
    // A hand-built view's sizes: products checked before they are used (bind checks its own).
    if (detail::checked_mul(function, "cache.batch", cache.batch, cache.shape.kv_heads) >=
        std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "cache.batch", "batch · kv_heads below 2^31 − 1",
                   std::to_string(cache.batch * cache.shape.kv_heads));
    const std::int64_t page_rows = detail::checked_mul(function, "cache.page_size", cache.page_size, cache.shape.kv_heads);
    const std::int64_t half_page = detail::checked_mul(function, "cache.page_size", page_rows, cache.shape.head_dim);
    detail::checked_mul(function, "cache.pages", detail::checked_mul(function, "cache.pages", 2 * cache.pages, page_rows),
                        cache.shape.head_dim);
    if (cache.storage.keys == nullptr || cache.storage.values != cache.storage.keys + half_page)
      detail::fail(function, "cache.storage",
                   detail::cat("keys = the page tensor and values = keys + page_size·kv_heads·head_dim = keys + ",
                               half_page, " elements"),
                   "other pointers");
    if (cache.storage.head_dim != cache.shape.head_dim)
      detail::fail(function, "cache.storage.head_dim", std::to_string(cache.shape.head_dim),
                   std::to_string(cache.storage.head_dim));
    const std::int64_t rows = 2 * cache.pages * page_rows;
    if (cache.storage.slots != rows - page_rows)
      detail::fail(function, "cache.storage.slots",
                   detail::cat("the page tensor's rows reachable from keys and values: ", rows - page_rows),
                   std::to_string(cache.storage.slots));
  }

  /// check(), plus the page tables and the free list (host views, O(batch + pages)):
  /// indptr starts at 0 and never decreases, page ids in range, last page lengths
  /// fit their pages, tables and free list name at most `pages` pages; with
  /// `exclusive` (the writers) no page is named twice.
  template <class View>
  static void validate(std::string_view function, const View& cache, bool exclusive = false) {
    check(function, cache);
    if constexpr (std::same_as<typename View::space, host_space>) {
      if (cache.indptr[0] != 0) detail::fail(function, "cache.indptr", "indptr[0] = 0", std::to_string(cache.indptr[0]));
      for (std::int64_t b = 0; b < cache.batch; ++b) {
        const std::int64_t count = std::int64_t{cache.indptr[b + 1]} - cache.indptr[b];
        if (count < 0 || cache.indptr[b + 1] > cache.pages)
          detail::fail(function, "cache.indptr", detail::cat("non-decreasing entries in [0, pages = ", cache.pages, "]"),
                       detail::cat("indptr[", b, "] = ", cache.indptr[b], ", indptr[", b + 1, "] = ", cache.indptr[b + 1]));
        const std::int64_t last = cache.last_page_len[b];
        if (count == 0 ? last != 0 : (last < 1 || last > cache.page_size))
          detail::fail(function, "cache.last_page_len",
                       count == 0 ? std::string("0 for a sequence without pages")
                                  : detail::cat("a length in [1, page_size = ", cache.page_size, "]"),
                       detail::cat(last, " for sequence ", b));
      }
      const std::int64_t used = cache.indptr[cache.batch];
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
      if (exclusive) {  // no page twice: the same in-place marking as layout::paged
        for (std::int64_t k = used; k < cache.pages; ++k)
          if (cache.indices[k] < 0)
            detail::fail(function, "cache.indices", detail::cat("unused entries (beyond indptr[batch] = ", used, ") ≥ 0"),
                         detail::cat(cache.indices[k], " at indices[", k, "]"));
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
    }
  }
};

}  // namespace kvtrim::layout
