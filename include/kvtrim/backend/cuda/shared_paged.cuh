// kvtrim/backend/cuda/shared_paged.cuh — layout::shared_paged on the GPU:
// compact a uniform selection into pages of the engine's tensor taken from the
// pool on the device, and append at decode (a new page per sequence whose last
// page is full). Same operations, checks, page ids and results as the CPU
// reference (backend/cpu/shared_paged.hpp): one planning block replays the
// CPU's free-list order over sequences, then write_rows (writes.cuh) encodes
// every token of every head through the new tables (the layout's slot()).
// Nothing is read back: a pool that is too small is recorded in the cache's
// status words and the write kernels skip (kvtrim::check_status raises the
// CPU's error). The equal-count check of the CPU's compact is the scheme's
// guarantee here (budgets with ragged heads do not compile with this layout).
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/rollback.cuh"
#include "kvtrim/backend/cuda/writes.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/shared_paged.hpp"

namespace kvtrim {

namespace cuda_detail {

/// Empties the pool (the CPU's reset); `kept` non-null (compaction): each sequence then takes its
/// pages in sequence order for the count of its kv head 0, next positions `next_position`.
template <class View>
__device__ void shared_paged_fill(const View& cache, typename plan_scan::TempStorage& temp, const std::int64_t* kept,
                                  std::int64_t next_position, std::int64_t used_pages,
                                  const detail::sequence_table& sequences = {}) {
  const std::int64_t kv_heads = cache.shape.kv_heads;
  const std::int64_t page_size = cache.page_size;
  const auto count = [&](std::int64_t b) {
    return kept != nullptr ? kept[b * kv_heads + 1] - kept[b * kv_heads] : std::int64_t{0};
  };
  if (threadIdx.x == 0) cache.indptr[0] = 0;
  block_scan_tiles(
      temp, cache.batch, [&](std::int64_t b) { return layout::shared_paged::pages_for(count(b), page_size); },
      [&](std::int64_t b, std::int64_t before) {
        const std::int64_t tokens = count(b);
        cache.indptr[b + 1] = static_cast<std::int32_t>(before + layout::shared_paged::pages_for(tokens, page_size));
        cache.last_page_len[b] = static_cast<std::int32_t>(tokens == 0 ? 0 : (tokens - 1) % page_size + 1);
      });
  for (std::int64_t head = threadIdx.x; head < cache.heads(); head += blockDim.x)
    cache.positions.next_position[head] = compacted_next_position(next_position, sequences, head, kv_heads);
  for (std::int64_t k = threadIdx.x; k < cache.pages; k += blockDim.x) {
    cache.indices[k] = static_cast<std::int32_t>(k < used_pages ? k : 0);
    cache.free_pages[k] = static_cast<std::int32_t>(cache.pages - 1 - k);
  }
  if (threadIdx.x == 0) *cache.free_count = static_cast<std::int32_t>(cache.pages - used_pages);
}

template <class View>
__global__ void __launch_bounds__(plan_threads) shared_paged_reset(const View cache) {
  __shared__ typename plan_scan::TempStorage temp;
  shared_paged_fill(cache, temp, nullptr, 0, 0);
  for (int k = threadIdx.x; k < detail::layout_status::words; k += blockDim.x) cache.status[k] = 0;
}

/// Compaction's planning block: the CPU's pool check, then the reset and the page tables.
template <class View>
__global__ void __launch_bounds__(plan_threads)
    shared_paged_plan_compact(const View cache, const std::int64_t* kept_offsets, std::int64_t next_position,
                              detail::sequence_table sequences) {
  __shared__ typename plan_scan::TempStorage temp;
  if (input_refused(cache.status)) return;
  const std::int64_t kv_heads = cache.shape.kv_heads;
  const std::int64_t needed = block_sum(temp, cache.batch, [&](std::int64_t b) {
    return layout::shared_paged::pages_for(kept_offsets[b * kv_heads + 1] - kept_offsets[b * kv_heads],
                                           cache.page_size);
  });
  if (needed > cache.pages) {
    if (threadIdx.x == 0)
      record_failure(cache.status, detail::layout_status::shared_paged_compact_pool, needed, *cache.free_count,
                     kept_offsets[cache.heads()], -1, cache.pages, cache.page_size);
    return;
  }
  shared_paged_fill(cache, temp, kept_offsets, next_position, needed, sequences);
  if (threadIdx.x == 0) cache.status[detail::layout_status::call_failed] = 0;
}

/// Append's planning block (`count` tokens for every head of every sequence): the CPU's grow(), in its order.
template <class View>
__global__ void __launch_bounds__(plan_threads) shared_paged_plan_append(const View cache, std::int64_t count) {
  __shared__ typename plan_scan::TempStorage temp;
  __shared__ unsigned long long first_overflow;  // lowest head whose positions would pass 2^31 − 1
  if (input_refused(cache.status)) return;
  const std::int64_t page_size = cache.page_size;
  const auto length = [&](std::int64_t b) {
    const std::int64_t pages = std::int64_t{cache.indptr[b + 1]} - cache.indptr[b];
    return pages == 0 ? std::int64_t{0} : (pages - 1) * page_size + cache.last_page_len[b];
  };
  const auto extra_pages = [&](std::int64_t b) -> std::int64_t {
    const std::int64_t tokens = length(b);
    return layout::shared_paged::pages_for(tokens + count, page_size) -
           layout::shared_paged::pages_for(tokens, page_size);
  };
  if (threadIdx.x == 0) first_overflow = ~0ull;
  __syncthreads();
  for (std::int64_t head = threadIdx.x; head < cache.heads(); head += blockDim.x)
    if (cache.positions.next_position[head] > detail::position_table::max_position - count + 1)
      atomicMin(&first_overflow, static_cast<unsigned long long>(head));
  const std::int64_t total_extra = block_sum(temp, cache.batch, extra_pages);  // its barriers publish first_overflow
  const std::int64_t free_before = *cache.free_count;
  __syncthreads();  // every thread has read the free count before thread 0 rewrites it
  if (first_overflow != ~0ull || total_extra > free_before) {
    if (threadIdx.x == 0) {
      if (first_overflow != ~0ull) {
        const auto head = static_cast<std::int64_t>(first_overflow);
        record_failure(cache.status, detail::layout_status::position_overflow, 0, cache.positions.next_position[head],
                       count, head, cache.pages, page_size);
      } else {
        record_failure(cache.status, detail::layout_status::shared_paged_append_pool, total_extra, free_before, count,
                       -1, cache.pages, page_size);
      }
    }
    return;
  }
  // Sequences from last to first: b's list moves right by the pages the sequences before it gain.
  std::int64_t shift = total_extra;
  std::int64_t popped = 0;
  for (std::int64_t b = cache.batch; b-- > 0 && shift > 0;) {
    const std::int64_t extra = extra_pages(b);
    const std::int64_t begin = cache.indptr[b];
    const std::int64_t end = cache.indptr[b + 1];
    shift -= extra;
    __syncthreads();  // every thread has read indptr before thread 0 rewrites it below
    block_move<move_items>(begin, begin + shift, end - begin, int32_mover{cache.indices});
    for (std::int64_t k = threadIdx.x; k < extra; k += blockDim.x)
      cache.indices[end + shift + k] = cache.free_pages[free_before - 1 - popped - k];
    popped += extra;
    if (threadIdx.x == 0) cache.indptr[b + 1] = static_cast<std::int32_t>(end + shift + extra);
    __syncthreads();
  }
  for (std::int64_t b = threadIdx.x; b < cache.batch; b += blockDim.x)
    cache.last_page_len[b] = static_cast<std::int32_t>((cache.last_page_len[b] + count - 1) % page_size + 1);
  for (std::int64_t head = threadIdx.x; head < cache.heads(); head += blockDim.x)
    cache.positions.next_position[head] += count;
  if (threadIdx.x == 0) {
    *cache.free_count = static_cast<std::int32_t>(free_before - total_extra);
    cache.status[detail::layout_status::call_failed] = 0;
  }
}

}  // namespace cuda_detail

template <>
struct implementation<layout::shared_paged, backend::cuda> {
  /// The NaN/Inf rule on the device (writes.cuh, scan_finite), as layout::paged:
  /// one launch before the call's planning kernel, which then refuses the call.
  static constexpr bool checks_finite_inputs = true;
  template <class Stored, class CodecT, class KeyT, class QueryT>
  static void check_finite(const layout::shared_paged::view<CodecT, device_space>& cache, int entry,
                           const tensor_view<KeyT, 4, device_space>& keys,
                           const tensor_view<KeyT, 4, device_space>& values,
                           const tensor_view<QueryT, 4, device_space>& queries, cudaStream_t stream,
                           const detail::finite_lengths& lengths = {}) {
    cuda_detail::check_then_scan_finite<Stored>(entry == detail::layout_status::compress
                                                    ? "kvtrim::layout::shared_paged::compact"
                                                    : "kvtrim::layout::shared_paged::append",
                                                cache, entry, keys, values, queries, stream, lengths);
  }

  /// Clears a freshly bound device cache's tables (the owning cache calls it): every page free,
  /// in the CPU's order. The page tensor is not touched (an engine's pages keep their bytes).
  template <class CodecT>
  static void reset(const layout::shared_paged::view<CodecT, device_space>& cache, cudaStream_t stream = nullptr) {
    cuda_detail::shared_paged_reset<<<1, cuda_detail::plan_threads, 0, stream>>>(cache);
    detail::check_launch("kvtrim::layout::shared_paged::reset", "shared_paged_reset");
    if (stream == nullptr)
      detail::check_cuda(cudaStreamSynchronize(nullptr), "kvtrim::layout::shared_paged::reset",
                         "cudaStreamSynchronize");
  }

  template <class CodecT, class KeyT>
  static void compact(layout::shared_paged::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& keys,
                      const kv_view<KeyT, device_space>& values, const selection_view<device_space>& kept,
                      const compact_args& args, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::layout::shared_paged::compact";
    cuda_detail::check_rows(function, cache, keys, values);
    cuda_detail::prepare_low_rank_fit(function, cache);  // sequence bases: the fit's memory, before any write
    cuda_detail::check_page_table_heads(function, cache);
    cuda_detail::shared_paged_plan_compact<<<1, cuda_detail::plan_threads, 0, stream>>>(
        cache, kept.offsets, args.start_position + keys.extent(2), args.sequences);
    detail::check_launch(function, "shared_paged_plan_compact");
    cuda_detail::launch_write_rows(function, cache, keys, values, kept.offsets, kept.tokens, nullptr,
                                   args.start_position, 0, -1, keys.extent(2), stream);
  }

  /// Appends new_keys/new_values [B, H, n, D] to every sequence (all its heads).
  template <class CodecT, class KeyT>
  static void append(layout::shared_paged::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& new_keys,
                     const kv_view<KeyT, device_space>& new_values, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::layout::shared_paged::append";
    cuda_detail::check_rows(function, cache, new_keys, new_values);
    cuda_detail::check_page_table_heads(function, cache);
    const std::int64_t count = new_keys.extent(2);
    cuda_detail::shared_paged_plan_append<<<1, cuda_detail::plan_threads, 0, stream>>>(cache, count);
    detail::check_launch(function, "shared_paged_plan_append");
    cuda_detail::launch_write_rows(function, cache, new_keys, new_values, nullptr, nullptr, nullptr, 0, count, -1,
                                   count, stream);
  }

  /// scheme::truncate (backend/cuda/rollback.cuh): one planning block checks and
  /// applies, as the CPU; a refusal goes to the status words (check_status).
  template <class CodecT>
  static void truncate(layout::shared_paged::view<CodecT, device_space>& cache,
                       const tensor_view<const std::int32_t, 1, device_space>& drop, cudaStream_t stream) {
    cuda_detail::check_page_table_heads("kvtrim::scheme::truncate", cache);
    cuda_detail::shared_paged_plan_truncate<<<1, cuda_detail::plan_threads, 0, stream>>>(
        cache, cuda_detail::make_drop_counts(drop));
    detail::check_launch("kvtrim::scheme::truncate", "shared_paged_plan_truncate");
  }
};

}  // namespace kvtrim
