// kvtrim/backend/cuda/flat.cuh — layout::flat on the GPU: compact the
// selected tokens back to back with even headroom, append (to every head or
// to one head) into the headroom, and repack in place when a head's region is
// full — the CPU reference's operations and results (backend/cpu/flat.hpp),
// offsets included.
//
// One planning block per call does the CPU's checks and metadata: offsets are
// an exclusive scan of the regions' sizes (cub::BlockScan over tiles of
// heads). The repack is the CPU's in-place algorithm (pack every region to the
// left in head order, then spread them to their new regions from the right)
// run by a cooperative grid, one block per SM: each head's tokens move a
// grid-wide chunk at a time, staged in registers between grid barriers
// (writes/grid_move), so nothing needs scratch. An append is therefore ONE
// cooperative launch (flat_append): block 0 plans while the others wait at a
// grid barrier, the grid repacks when the plan asks (rare: every ~free/heads
// steps), then writes the call's tokens through the new offsets. Compaction is
// a planning block and write_rows.
//
// Where the CPU throws before writing (buffer exhausted, positions past
// 2^31), the device writes nothing and records the failure in the cache's
// status words; kvtrim::check_status(cache, stream) raises it.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/rollback.cuh"
#include "kvtrim/backend/cuda/writes.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/flat.hpp"

namespace kvtrim {

namespace cuda_detail {

__device__ __forceinline__ std::int64_t runs_for(std::int64_t tokens, std::int64_t run) {
  return (tokens + run - 1) / run;
}

template <class View>
__global__ void __launch_bounds__(plan_threads) flat_reset(const View cache, std::int64_t run) {
  const std::int64_t heads = cache.heads();
  const std::int64_t free = cache.capacity / run;
  const std::int64_t share = free / heads, extra = free % heads;
  for (std::int64_t head = threadIdx.x; head < heads; head += blockDim.x) {
    cache.lengths[head] = 0;
    // Σ_{i<head} even_share(i, heads, free) runs, in closed form.
    cache.offsets[head] = (head * share + (head < extra ? head : extra)) * run;
    cache.compensation.index[head] = -1;
    cache.compensation.bias[head] = 0.0f;
    cache.positions.next_position[head] = 0;
  }
  if (threadIdx.x == 0) {
    cache.offsets[heads] = cache.capacity;
    *cache.repacks = 0;
  }
  for (int k = threadIdx.x; k < detail::layout_status::words; k += blockDim.x) cache.status[k] = 0;
}

/// Compaction's planning block: the CPU's check (Σ runs ≤ capacity / run),
/// then lengths, even placement (place_evenly), compensation entries and next positions.
template <class View>
__global__ void __launch_bounds__(plan_threads)
    flat_plan_compact(const View cache, std::int64_t run, const std::int64_t* kept_offsets,
                      detail::compensation_rows compensation, bool has_compensation, std::int64_t next_position,
                      const unsigned long long* budget_refusal, std::int64_t refused_budget,
                      detail::sequence_table sequences) {
  __shared__ typename plan_scan::TempStorage temp;
  if (input_refused(cache.status)) return;
  if (budget_refused(cache.status, budget_refusal, refused_budget, cache.shape.kv_heads, sequences)) return;
  const std::int64_t heads = cache.heads();
  const auto count = [&](std::int64_t head) { return kept_offsets[head + 1] - kept_offsets[head]; };
  const std::int64_t needed_runs = block_sum(temp, heads, [&](std::int64_t head) { return runs_for(count(head), run); });
  if (needed_runs * run > cache.capacity) {
    if (threadIdx.x == 0)
      record_failure(cache.status, detail::layout_status::flat_compact_buffer, needed_runs * run, 0,
                     kept_offsets[heads], -1, cache.capacity, run);
    return;
  }
  const std::int64_t free = cache.capacity / run - needed_runs;
  block_scan_tiles(
      temp, heads,
      [&](std::int64_t head) { return (runs_for(count(head), run) + View::even_share(head, heads, free)) * run; },
      [&](std::int64_t head, std::int64_t before) {
        cache.offsets[head] = before;
        cache.lengths[head] = count(head);
        const bool compensated = has_compensation && compensation.index[head] >= 0;
        cache.compensation.index[head] = compensated ? compensation.index[head] : -1;
        cache.compensation.bias[head] = compensated ? compensation.bias[head] : 0.0f;
        cache.positions.next_position[head] =
            compacted_next_position(next_position, sequences, head, cache.shape.kv_heads);
      });
  if (threadIdx.x == 0) {
    cache.offsets[heads] = cache.capacity;
    cache.status[detail::layout_status::call_failed] = 0;
  }
}

/// Append's planning (block 0 of flat_append): the CPU's make_room — room in
/// the whole buffer, a repack when a growing head's region is full — then the
/// new lengths and next positions. Leaves status[repack] = the runs the
/// repacked layout needs (0: no repack) and status[call_failed].
template <class View>
__device__ void flat_plan_append(const View& cache, std::int64_t run, std::int64_t target, std::int64_t count) {
  __shared__ typename plan_scan::TempStorage temp;
  __shared__ unsigned long long first_overflow;
  __shared__ int full;  // some growing head lacks `count` free slots in its region
  if (input_refused(cache.status)) return;
  const std::int64_t heads = cache.heads();
  const auto grows = [&](std::int64_t head) { return target < 0 || head == target; };
  if (threadIdx.x == 0) first_overflow = ~0ull, full = 0;
  __syncthreads();
  for (std::int64_t head = threadIdx.x; head < heads; head += blockDim.x)
    if (grows(head)) {
      if (cache.positions.next_position[head] > detail::position_table::max_position - count + 1)
        atomicMin(&first_overflow, static_cast<unsigned long long>(head));
      if (cache.lengths[head] + count > cache.offsets[head + 1] - cache.offsets[head]) atomicOr(&full, 1);
    }
  const std::int64_t needed_runs = block_sum(
      temp, heads, [&](std::int64_t head) { return runs_for(cache.lengths[head] + (grows(head) ? count : 0), run); });
  const std::int64_t held = block_sum(temp, heads, [&](std::int64_t head) { return cache.lengths[head]; });
  if (first_overflow != ~0ull || needed_runs * run > cache.capacity) {
    if (threadIdx.x == 0) {
      cache.status[detail::layout_status::repack] = 0;
      if (first_overflow != ~0ull) {
        const auto head = static_cast<std::int64_t>(first_overflow);
        record_failure(cache.status, detail::layout_status::position_overflow, 0, cache.positions.next_position[head],
                       count, head, cache.capacity, run);
      } else {
        record_failure(cache.status, detail::layout_status::flat_append_buffer, needed_runs * run,
                       cache.capacity - held, count, target, cache.capacity, run);
      }
    }
    return;
  }
  // Lengths grow below, after every thread has read them; the repack moves lengths − reserve tokens.
  __syncthreads();
  if (threadIdx.x == 0) cache.status[detail::layout_status::repack] = full ? needed_runs : 0;
  for (std::int64_t head = threadIdx.x; head < heads; head += blockDim.x)
    if (grows(head)) {
      cache.lengths[head] += count;
      cache.positions.next_position[head] += count;
    }
  if (threadIdx.x == 0) cache.status[detail::layout_status::call_failed] = 0;
}

/// The CPU's repack (backend/cpu/flat.hpp), in order — pack left in head
/// order, then spread right in reverse head order; `count` slots reserved for
/// head `target` (every head when −1) — by the whole cooperative grid, each
/// head's move a grid-wide grid_move. The growing heads are already
/// lengthened (the tokens to move are lengths − reserve).
template <class View>
__device__ void flat_repack(const cooperative_groups::grid_group& grid, const View& cache, std::int64_t run,
                            std::int64_t target, std::int64_t count, std::int64_t needed_runs) {
  const auto mover = [&] {
    if constexpr (codec::is_plain<typename View::codec>) {
      using store_type = device_element_t<typename View::codec::element>;
      return plain_slot_mover<store_type>{reinterpret_cast<store_type*>(cache.storage.keys),
                                          reinterpret_cast<store_type*>(cache.storage.values),
                                          cache.positions.slot_position, cache.shape.head_dim};
    } else {
      return codec_slot_mover<typename View::codec>{cache.storage, cache.positions.slot_position};
    }
  }();
  // A head's filling KIVI group remembers its slots: they move with the head.
  const auto moved = [&](std::int64_t head, std::int64_t from, std::int64_t to, std::int64_t length) {
    if constexpr (!codec::is_plain<typename View::codec>)
      if (grid.thread_rank() == 0) mover.moved(head, from, to, length);
  };
  const std::int64_t heads = cache.heads();
  const auto reserve = [&](std::int64_t head) { return target < 0 || head == target ? count : std::int64_t{0}; };
  std::int64_t packed = 0;  // a multiple of run: regions start at whole runs
  for (std::int64_t head = 0; head < heads; ++head) {
    const std::int64_t length = cache.lengths[head] - reserve(head);
    grid_move<move_items>(grid, cache.offsets[head], packed, length, mover);
    moved(head, cache.offsets[head], packed, length);
    packed += runs_for(length, run) * run;
  }
  grid.sync();  // the old offsets are read; from here on they are rewritten
  const std::int64_t spare = cache.capacity / run - needed_runs;
  std::int64_t end = cache.capacity;
  for (std::int64_t head = heads; head-- > 0;) {
    const std::int64_t length = cache.lengths[head] - reserve(head);
    packed -= runs_for(length, run) * run;  // where the pack left the head
    const std::int64_t begin =
        end - (runs_for(length + reserve(head), run) + View::even_share(head, heads, spare)) * run;
    grid_move<move_items>(grid, packed, begin, length, mover);
    moved(head, packed, begin, length);
    if (grid.thread_rank() == 0) cache.offsets[head] = begin;
    end = begin;
  }
  if (grid.thread_rank() == 0) {
    cache.offsets[heads] = cache.capacity;
    ++*cache.repacks;
  }
}

/// append / append_head as ONE cooperative launch (one block per SM): block 0
/// plans; after a grid barrier every block reads the plan's verdict (the same
/// words, so every block takes the same path to every barrier); the grid
/// repacks when asked, then writes the new rows.
template <class View, class InT, bool Vectorised>
__global__ void __launch_bounds__(plan_threads) flat_append(const __grid_constant__ layout_write<View, InT> w,
                                                            std::int64_t run) {
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  if (blockIdx.x == 0) flat_plan_append(w.cache, run, w.target, w.count);
  grid.sync();
  if (w.cache.status[detail::layout_status::call_failed] != 0) return;
  const std::int64_t needed_runs = w.cache.status[detail::layout_status::repack];
  if (needed_runs != 0) {
    flat_repack(grid, w.cache, run, w.target, w.count, needed_runs);
    grid.sync();  // the new offsets are written
  }
  // Quantizing codecs encode in the launches that follow (codec_writes.cuh).
  if constexpr (codec::is_plain<typename View::codec>)
    write_appended_rows<Vectorised>(w, static_cast<std::int64_t>(grid.thread_rank()),
                                    static_cast<std::int64_t>(grid.num_threads()));
}

}  // namespace cuda_detail

template <>
struct implementation<layout::flat, backend::cuda> {
  /// The NaN/Inf rule on the device (writes.cuh, scan_finite): one launch before
  /// the call's planning kernel, which then refuses the call when an input is
  /// not finite (or would overflow the `Stored` storage). Called by scheme.
  static constexpr bool checks_finite_inputs = true;
  template <class Stored, class CodecT, class KeyT, class QueryT>
  static void check_finite(const layout::flat::view<CodecT, device_space>& cache, int entry,
                           const tensor_view<KeyT, 4, device_space>& keys,
                           const tensor_view<KeyT, 4, device_space>& values,
                           const tensor_view<QueryT, 4, device_space>& queries, cudaStream_t stream,
                           const detail::finite_lengths& lengths = {}) {
    cuda_detail::check_then_scan_finite<Stored>(entry == detail::layout_status::compress
                                                    ? "kvtrim::layout::flat::compact"
                                                    : "kvtrim::layout::flat::append",
                                                cache, entry, keys, values, queries, stream, lengths);
  }

  /// Clears a freshly bound device cache (the owning cache calls it): every
  /// head empty, the buffer split evenly, no repacks, no failure recorded.
  template <class CodecT>
  static void reset(const layout::flat::view<CodecT, device_space>& cache, cudaStream_t stream = nullptr) {
    cuda_detail::flat_reset<<<1, cuda_detail::plan_threads, 0, stream>>>(cache, cache.run());
    detail::check_launch("kvtrim::layout::flat::reset", "flat_reset");
    cuda_detail::reset_codec_storage<CodecT>("kvtrim::layout::flat::reset", cache.storage, stream);
    // The owning cache calls this once, with no stream: wait, so the cache is
    // ready for any stream (a construction, not a hot path).
    if (stream == nullptr)
      detail::check_cuda(cudaStreamSynchronize(nullptr), "kvtrim::layout::flat::reset", "cudaStreamSynchronize");
  }

  template <class CodecT, class KeyT>
  static void compact(layout::flat::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& keys,
                      const kv_view<KeyT, device_space>& values, const selection_view<device_space>& kept,
                      const compact_args& args, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    constexpr std::string_view function = "kvtrim::layout::flat::compact";
    cuda_detail::check_rows(function, cache, keys, values);
    cuda_detail::prepare_low_rank_fit(function, cache);  // sequence bases: the fit's memory, before any write
    const detail::compensation_rows rows = args.compensation != nullptr ? *args.compensation : detail::compensation_rows{};
    cuda_detail::flat_plan_compact<<<1, cuda_detail::plan_threads, 0, stream>>>(
        cache, cache.run(), kept.offsets, rows, args.compensation != nullptr, args.start_position + keys.extent(2),
        args.budget_refusal, args.refused_budget, args.sequences);
    detail::check_launch(function, "flat_plan_compact");
    cuda_detail::launch_write_rows(function, cache, keys, values, kept.offsets, kept.tokens, args.compensation,
                                   args.start_position, 0, -1, keys.extent(2), stream);
  }

  /// Appends new_keys/new_values [B, H, n, D] to every head.
  template <class CodecT, class KeyT>
  static void append(layout::flat::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& new_keys,
                     const kv_view<KeyT, device_space>& new_values, cudaStream_t stream) {
    make_room_and_write(cache, new_keys, new_values, -1, stream);
  }

  /// Appends new_keys/new_values(b, h, ·) [n tokens] to head (b, h) only.
  template <class CodecT, class KeyT>
  static void append_head(layout::flat::view<CodecT, device_space>& cache, std::int64_t b, std::int64_t h,
                          const kv_view<KeyT, device_space>& new_keys, const kv_view<KeyT, device_space>& new_values,
                          cudaStream_t stream) {
    make_room_and_write(cache, new_keys, new_values, b * cache.shape.kv_heads + h, stream);
  }

  /// scheme::truncate (backend/cuda/rollback.cuh): one planning block checks and
  /// applies, as the CPU; a refusal goes to the status words (check_status).
  /// Regions stay where they are: the dropped slots become headroom again.
  template <class CodecT>
  static void truncate(layout::flat::view<CodecT, device_space>& cache,
                       const tensor_view<const std::int32_t, 1, device_space>& drop, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    cuda_detail::flat_plan_truncate<<<1, cuda_detail::plan_threads, 0, stream>>>(cache,
                                                                                  cuda_detail::make_drop_counts(drop));
    detail::check_launch("kvtrim::scheme::truncate", "flat_plan_truncate");
  }

 private:
  template <class CodecT, class KeyT>
  static void make_room_and_write(layout::flat::view<CodecT, device_space>& cache,
                                  const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>& values,
                                  std::int64_t target, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    constexpr std::string_view function = "kvtrim::layout::flat::append";
    cuda_detail::check_rows(function, cache, keys, values);
    using view_type = layout::flat::view<CodecT, device_space>;
    using in_type = cuda_detail::device_element_t<KeyT>;
    cuda_detail::layout_write<view_type, in_type> w =
        cuda_detail::make_layout_write(cache, keys, values, nullptr, nullptr, nullptr, 0, keys.extent(2), target);
    std::int64_t run = cache.run();
    // One block per multiprocessor: co-resident, as a cooperative launch
    // requires (512 threads of ≤ 128 registers always fit one per SM).
    const void* kernel = cuda_detail::rows_aligned(keys, values)
                             ? reinterpret_cast<const void*>(&cuda_detail::flat_append<view_type, in_type, true>)
                             : reinterpret_cast<const void*>(&cuda_detail::flat_append<view_type, in_type, false>);
    void* arguments[] = {&w, &run};
    detail::check_cuda(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(backend::cuda::multiprocessor_count())),
                                                   dim3(cuda_detail::plan_threads), arguments, 0, stream),
                       function, "cudaLaunchCooperativeKernel(flat_append)");
    if constexpr (!codec::is_plain<CodecT>)
      cuda_detail::launch_codec_writes(function,
                                       cuda_detail::make_codec_write(cache, keys, values, nullptr, nullptr, nullptr, 0,
                                                                     keys.extent(2), target, -1, -keys.extent(2)),
                                       keys.extent(2), stream);
  }
};

}  // namespace kvtrim
