// kvtrim/backend/cuda/paged.cuh — layout::paged on the GPU: compact the
// selected tokens into pages taken from the pool on the device, and append at
// decode (new pages from the device free list when a head's last page fills).
//
// Same operations, checks and results as the CPU reference
// (backend/cpu/paged.hpp), page ids included: one planning block replays the
// CPU's free-list order (compact: reset, then heads take pages 0, 1, 2, … in
// head order; append: heads from last to first pop the stack, shifting their
// page lists right in `indices`), then write_rows (backend/cuda/writes.cuh)
// encodes every token through the new tables. All metadata stays in device
// memory; nothing is read back, so every call is stream-ordered and
// graph-capturable. Where the CPU throws before writing (pool exhausted,
// positions past 2^31), the device writes nothing and records the failure in
// the cache's status words; kvtrim::check_status(cache, stream) raises it.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/rollback.cuh"
#include "kvtrim/backend/cuda/writes.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/paged.hpp"

namespace kvtrim {

namespace cuda_detail {

/// An empty pool: no pages in any table, the free list [pages − 1, …, 0]
/// (pages are then handed out in increasing id order, as the CPU's reset),
/// no compensation tokens, positions from 0, no failure recorded. `kept`
/// non-null (compaction): each head then takes its pages in head order, with
/// its kept count, the compensation rows and next position start + tokens.
template <class View>
__device__ void paged_fill(const View& cache, typename plan_scan::TempStorage& temp, const std::int64_t* kept,
                           const detail::compensation_rows* compensation, std::int64_t next_position,
                           std::int64_t used_pages, const detail::sequence_table& sequences = {}) {
  const std::int64_t heads = cache.heads();
  const std::int64_t page_size = cache.page_size;
  const auto count = [&](std::int64_t head) { return kept != nullptr ? kept[head + 1] - kept[head] : std::int64_t{0}; };
  if (threadIdx.x == 0) cache.indptr[0] = 0;
  block_scan_tiles(
      temp, heads, [&](std::int64_t head) { return layout::paged::pages_for(count(head), page_size); },
      [&](std::int64_t head, std::int64_t before) {
        const std::int64_t tokens = count(head);
        cache.indptr[head + 1] = static_cast<std::int32_t>(before + layout::paged::pages_for(tokens, page_size));
        cache.last_page_len[head] = static_cast<std::int32_t>(tokens == 0 ? 0 : (tokens - 1) % page_size + 1);
        const bool compensated = compensation != nullptr && compensation->index[head] >= 0;
        cache.compensation.index[head] = compensated ? compensation->index[head] : -1;
        cache.compensation.bias[head] = compensated ? compensation->bias[head] : 0.0f;
        cache.positions.next_position[head] =
            compacted_next_position(next_position, sequences, head, cache.shape.kv_heads);
      });
  for (std::int64_t k = threadIdx.x; k < cache.pages; k += blockDim.x) {
    cache.indices[k] = static_cast<std::int32_t>(k < used_pages ? k : 0);
    cache.free_pages[k] = static_cast<std::int32_t>(cache.pages - 1 - k);
  }
  if (threadIdx.x == 0) *cache.free_count = static_cast<std::int32_t>(cache.pages - used_pages);
}

template <class View>
__global__ void __launch_bounds__(plan_threads) paged_reset(const View cache) {
  __shared__ typename plan_scan::TempStorage temp;
  paged_fill(cache, temp, nullptr, nullptr, 0, 0);
  for (int k = threadIdx.x; k < detail::layout_status::words; k += blockDim.x) cache.status[k] = 0;
}

/// Compaction's planning block: the CPU's check (Σ⌈count/page_size⌉ ≤ pages),
/// then the reset and the page tables.
template <class View>
__global__ void __launch_bounds__(plan_threads)
    paged_plan_compact(const View cache, const std::int64_t* kept_offsets, detail::compensation_rows compensation,
                       bool has_compensation, std::int64_t next_position, const unsigned long long* budget_refusal,
                       std::int64_t refused_budget, detail::sequence_table sequences) {
  __shared__ typename plan_scan::TempStorage temp;
  if (input_refused(cache.status)) return;
  if (budget_refused(cache.status, budget_refusal, refused_budget, cache.shape.kv_heads, sequences)) return;
  const std::int64_t heads = cache.heads();
  const std::int64_t needed = block_sum(temp, heads, [&](std::int64_t head) {
    return layout::paged::pages_for(kept_offsets[head + 1] - kept_offsets[head], cache.page_size);
  });
  if (needed > cache.pages) {
    if (threadIdx.x == 0)
      record_failure(cache.status, detail::layout_status::paged_compact_pool, needed, *cache.free_count,
                     kept_offsets[heads], -1, cache.pages, cache.page_size);
    return;
  }
  paged_fill(cache, temp, kept_offsets, has_compensation ? &compensation : nullptr, next_position, needed, sequences);
  if (threadIdx.x == 0) cache.status[detail::layout_status::call_failed] = 0;
}

/// Append's planning block (`target` one head, or −1 for every head; `count`
/// tokens each): the CPU's grow(), in its order.
template <class View>
__global__ void __launch_bounds__(plan_threads) paged_plan_append(const View cache, std::int64_t target,
                                                                  std::int64_t count) {
  __shared__ typename plan_scan::TempStorage temp;
  __shared__ unsigned long long first_overflow;  // lowest head whose positions would pass 2^31 − 1
  if (input_refused(cache.status)) return;
  const std::int64_t heads = cache.heads();
  const std::int64_t page_size = cache.page_size;
  const auto grows = [&](std::int64_t head) { return target < 0 || head == target; };
  const auto length = [&](std::int64_t head) {
    const std::int64_t pages = std::int64_t{cache.indptr[head + 1]} - cache.indptr[head];
    return pages == 0 ? std::int64_t{0} : (pages - 1) * page_size + cache.last_page_len[head];
  };
  const auto extra_pages = [&](std::int64_t head) -> std::int64_t {
    if (!grows(head)) return 0;
    const std::int64_t tokens = length(head);
    return layout::paged::pages_for(tokens + count, page_size) - layout::paged::pages_for(tokens, page_size);
  };
  if (threadIdx.x == 0) first_overflow = ~0ull;
  __syncthreads();
  for (std::int64_t head = threadIdx.x; head < heads; head += blockDim.x)
    if (grows(head) && cache.positions.next_position[head] > detail::position_table::max_position - count + 1)
      atomicMin(&first_overflow, static_cast<unsigned long long>(head));
  const std::int64_t total_extra = block_sum(temp, heads, extra_pages);  // its barriers publish first_overflow
  const std::int64_t free_before = *cache.free_count;
  __syncthreads();  // every thread has read the free count before thread 0 rewrites it
  if (first_overflow != ~0ull || total_extra > free_before) {
    if (threadIdx.x == 0) {
      if (first_overflow != ~0ull) {
        const auto head = static_cast<std::int64_t>(first_overflow);
        record_failure(cache.status, detail::layout_status::position_overflow, 0, cache.positions.next_position[head],
                       count, head, cache.pages, page_size);
      } else {
        record_failure(cache.status, detail::layout_status::paged_append_pool, total_extra, free_before, count, target,
                       cache.pages, page_size);
      }
    }
    return;
  }
  // Heads from last to first: head j's list moves right by the pages the heads
  // before it gain (`shift`), then its new pages are popped. Once no head
  // before j gains a page, nothing below moves.
  std::int64_t shift = total_extra;
  std::int64_t popped = 0;
  for (std::int64_t head = heads; head-- > 0 && shift > 0;) {
    const std::int64_t extra = extra_pages(head);
    const std::int64_t begin = cache.indptr[head];
    const std::int64_t end = cache.indptr[head + 1];
    shift -= extra;
    __syncthreads();  // every thread has read indptr before thread 0 rewrites it below
    block_move<move_items>(begin, begin + shift, end - begin, int32_mover{cache.indices});
    for (std::int64_t k = threadIdx.x; k < extra; k += blockDim.x)
      cache.indices[end + shift + k] = cache.free_pages[free_before - 1 - popped - k];
    popped += extra;
    if (threadIdx.x == 0) cache.indptr[head + 1] = static_cast<std::int32_t>(end + shift + extra);
    __syncthreads();
  }
  for (std::int64_t head = threadIdx.x; head < heads; head += blockDim.x)
    if (grows(head)) {
      // (length + count − 1) mod page_size + 1, from the old last page alone
      // (an empty head has last_page_len 0, which the formula also covers).
      cache.last_page_len[head] = static_cast<std::int32_t>((cache.last_page_len[head] + count - 1) % page_size + 1);
      cache.positions.next_position[head] += count;
    }
  if (threadIdx.x == 0) {
    *cache.free_count = static_cast<std::int32_t>(free_before - total_extra);
    cache.status[detail::layout_status::call_failed] = 0;
  }
}

}  // namespace cuda_detail

template <>
struct implementation<layout::paged, backend::cuda> {
  /// The NaN/Inf rule on the device (writes.cuh, scan_finite): one launch before
  /// the call's planning kernel, which then refuses the call when an input is
  /// not finite (or would overflow the `Stored` storage). Called by scheme.
  static constexpr bool checks_finite_inputs = true;
  template <class Stored, class CodecT, class KeyT, class QueryT>
  static void check_finite(const layout::paged::view<CodecT, device_space>& cache, int entry,
                           const tensor_view<KeyT, 4, device_space>& keys,
                           const tensor_view<KeyT, 4, device_space>& values,
                           const tensor_view<QueryT, 4, device_space>& queries, cudaStream_t stream,
                           const detail::finite_lengths& lengths = {}) {
    cuda_detail::check_then_scan_finite<Stored>(entry == detail::layout_status::compress
                                                    ? "kvtrim::layout::paged::compact"
                                                    : "kvtrim::layout::paged::append",
                                                cache, entry, keys, values, queries, stream, lengths);
  }

  /// Clears a freshly bound device cache (the owning cache calls it): every
  /// page free, in the CPU's order, no tokens, no failure recorded.
  template <class CodecT>
  static void reset(const layout::paged::view<CodecT, device_space>& cache, cudaStream_t stream = nullptr) {
    cuda_detail::paged_reset<<<1, cuda_detail::plan_threads, 0, stream>>>(cache);
    detail::check_launch("kvtrim::layout::paged::reset", "paged_reset");
    cuda_detail::reset_codec_storage<CodecT>("kvtrim::layout::paged::reset", cache.storage, stream);
    // The owning cache calls this once, with no stream: wait, so the cache is
    // ready for any stream (a construction, not a hot path).
    if (stream == nullptr)
      detail::check_cuda(cudaStreamSynchronize(nullptr), "kvtrim::layout::paged::reset", "cudaStreamSynchronize");
  }

  template <class CodecT, class KeyT>
  static void compact(layout::paged::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& keys,
                      const kv_view<KeyT, device_space>& values, const selection_view<device_space>& kept,
                      const compact_args& args, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    constexpr std::string_view function = "kvtrim::layout::paged::compact";
    cuda_detail::check_rows(function, cache, keys, values);
    cuda_detail::prepare_low_rank_fit(function, cache);  // sequence bases: the fit's memory, before any write
    cuda_detail::check_page_table_heads(function, cache);
    const detail::compensation_rows rows = args.compensation != nullptr ? *args.compensation : detail::compensation_rows{};
    cuda_detail::paged_plan_compact<<<1, cuda_detail::plan_threads, 0, stream>>>(
        cache, kept.offsets, rows, args.compensation != nullptr, args.start_position + keys.extent(2),
        args.budget_refusal, args.refused_budget, args.sequences);
    detail::check_launch(function, "paged_plan_compact");
    cuda_detail::launch_write_rows(function, cache, keys, values, kept.offsets, kept.tokens, args.compensation,
                                   args.start_position, 0, -1, keys.extent(2), stream);
  }

  /// Appends new_keys/new_values [B, H, n, D] to every head.
  template <class CodecT, class KeyT>
  static void append(layout::paged::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& new_keys,
                     const kv_view<KeyT, device_space>& new_values, cudaStream_t stream) {
    grow_and_write(cache, new_keys, new_values, -1, stream);
  }

  /// Appends new_keys/new_values(b, h, ·) [n tokens] to head (b, h) only.
  template <class CodecT, class KeyT>
  static void append_head(layout::paged::view<CodecT, device_space>& cache, std::int64_t b, std::int64_t h,
                          const kv_view<KeyT, device_space>& new_keys, const kv_view<KeyT, device_space>& new_values,
                          cudaStream_t stream) {
    grow_and_write(cache, new_keys, new_values, b * cache.shape.kv_heads + h, stream);
  }

  /// scheme::truncate (backend/cuda/rollback.cuh): one planning block checks and
  /// applies, as the CPU; a refusal goes to the status words (check_status).
  template <class CodecT>
  static void truncate(layout::paged::view<CodecT, device_space>& cache,
                       const tensor_view<const std::int32_t, 1, device_space>& drop, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    cuda_detail::check_page_table_heads("kvtrim::scheme::truncate", cache);
    cuda_detail::paged_plan_truncate<<<1, cuda_detail::plan_threads, 0, stream>>>(cache,
                                                                                   cuda_detail::make_drop_counts(drop));
    detail::check_launch("kvtrim::scheme::truncate", "paged_plan_truncate");
  }

 private:
  template <class CodecT, class KeyT>
  static void grow_and_write(layout::paged::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& keys,
                             const kv_view<KeyT, device_space>& values, std::int64_t target, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    constexpr std::string_view function = "kvtrim::layout::paged::append";
    cuda_detail::check_rows(function, cache, keys, values);
    cuda_detail::check_page_table_heads(function, cache);
    const std::int64_t count = keys.extent(2);
    cuda_detail::paged_plan_append<<<1, cuda_detail::plan_threads, 0, stream>>>(cache, target, count);
    detail::check_launch(function, "paged_plan_append");
    cuda_detail::launch_write_rows(function, cache, keys, values, nullptr, nullptr, nullptr, 0, count, target, count,
                                   stream);
  }
};

}  // namespace kvtrim
