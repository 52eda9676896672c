// kvtrim/backend/cuda/contiguous.cuh — layout::contiguous on the GPU: compact
// the selected tokens into the cache, and append at decode.
//
// Both are one row-copy kernel: thread t moves 8 consecutive elements of one
// key row and the matching value row (16-byte loads and stores for 16-bit
// types), converting the engine's element type to the stored one. The number of
// tokens per head is known on the host for this layout (uniform budgets), so
// the grid is sized without reading device memory and nothing synchronises.
// The quantizing codecs (int8, int4, fp8) are encoded by codec_writes.cuh's
// kernels instead of the row copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/rollback.cuh"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/contiguous.hpp"
#include "kvtrim/layout/detail/rollback.hpp"

namespace kvtrim {

namespace cuda_detail {

/// A compaction's new next positions: out[head] = by_sequence[b] where given (a padded batch),
/// else value.
struct next_positions_update {
  std::int64_t* out = nullptr;  // null: the caller updates them
  const std::int64_t* by_sequence = nullptr;
  std::int64_t value = 0;
};

/// Where rows come from and go to. `tokens`/`offsets` null: row r reads token r.
template <class InT, class StoreT>
struct row_copy {
  const InT* keys;
  const InT* values;
  std::int64_t in_batch_stride, in_head_stride, in_token_stride;  // elements
  const std::int64_t* offsets;                                    // selection CSR (or null)
  const std::int32_t* tokens;
  StoreT* out_keys;
  StoreT* out_values;
  layout::contiguous::mapping map;
  std::int64_t kv_heads;
  std::int64_t rows_per_head;
  std::int64_t first_row;  // destination index of row 0 (cache length for append)
  std::int64_t head_dim;
  // Positions (docs/composition.md §1): compact writes start_position + token;
  // append (tokens null) writes next_position[head] + row.
  std::int32_t* slot_position;
  const std::int64_t* next_position;
  std::int64_t start_position;
  // A compaction's new next positions, written by the same launch (not read by it: compact's
  // slot positions come from start_position). out null: none (append advances them after).
  next_positions_update next;
};

template <class InT, class StoreT, bool Vectorised>
__global__ void copy_rows(const __grid_constant__ row_copy<InT, StoreT> copy) {
  const std::int64_t chunks_per_row = copy.head_dim / 8;
  const std::int64_t head = blockIdx.y;  // b · kv_heads + h
  const std::int64_t b = head / copy.kv_heads;
  const std::int64_t h = head % copy.kv_heads;
  if (copy.next.out != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
    copy.next.out[head] = copy.next.by_sequence != nullptr ? copy.next.by_sequence[b] : copy.next.value;
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
       flat < copy.rows_per_head * chunks_per_row; flat += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t row = flat / chunks_per_row;
    const std::int64_t chunk = flat % chunks_per_row;
    const std::int64_t token = copy.tokens ? copy.tokens[copy.offsets[head] + row] : row;
    const std::int64_t in_offset =
        b * copy.in_batch_stride + h * copy.in_head_stride + token * copy.in_token_stride + chunk * 8;
    const std::int64_t slot =
        b * copy.map.batch_stride + h * copy.map.head_stride + (copy.first_row + row) * copy.map.token_stride;
    const std::int64_t out_offset = slot * copy.head_dim + chunk * 8;
    if (chunk == 0)
      copy.slot_position[slot] = static_cast<std::int32_t>(
          copy.tokens ? copy.start_position + token : copy.next_position[head] + row);
    StoreT key_out[8], value_out[8];
    if constexpr (Vectorised) {
      float key_in[8], value_in[8];
      load8(copy.keys + in_offset, key_in);
      load8(copy.values + in_offset, value_in);
#pragma unroll
      for (int i = 0; i < 8; ++i) key_out[i] = from_float<StoreT>(key_in[i]), value_out[i] = from_float<StoreT>(value_in[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        key_out[i] = from_float<StoreT>(to_float(copy.keys[in_offset + i]));
        value_out[i] = from_float<StoreT>(to_float(copy.values[in_offset + i]));
      }
    }
    if constexpr (sizeof(StoreT) == 2) {
      *reinterpret_cast<uint4*>(copy.out_keys + out_offset) = *reinterpret_cast<const uint4*>(key_out);
      *reinterpret_cast<uint4*>(copy.out_values + out_offset) = *reinterpret_cast<const uint4*>(value_out);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) copy.out_keys[out_offset + i] = key_out[i], copy.out_values[out_offset + i] = value_out[i];
    }
  }
}

/// Launches copy_rows for `rows_per_head` rows of every head (codec::plain); true when that launch
/// wrote `next`: given, with rows, and a compaction (`tokens` non-null — append's rows read the
/// next positions, so the kernel must not write them there).
template <class KeyT, class CodecT>
[[nodiscard]] bool launch_plain_copy_rows(std::string_view function, layout::contiguous::view<CodecT, device_space>& cache,
                            const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>& values,
                            const std::int64_t* offsets, const std::int32_t* tokens, std::int64_t rows_per_head,
                            std::int64_t first_row, std::int64_t start_position, cudaStream_t stream,
                            next_positions_update next = {}) {
  using in_type = device_element_t<KeyT>;
  using store_type = device_element_t<typename CodecT::element>;
  const std::int64_t head_dim = cache.shape.head_dim;
  if (head_dim % 8 != 0)
    detail::fail(function, "shape.head_dim", "a multiple of 8 on backend::cuda", std::to_string(head_dim));
  check_same_strides(function, keys, values);
  check_aligned16(function, "cache.storage.keys", cache.storage.keys);
  check_aligned16(function, "cache.storage.values", cache.storage.values);
  if (rows_per_head == 0) return false;
  const bool writes_next = next.out != nullptr && tokens != nullptr;
  row_copy<in_type, store_type> copy{reinterpret_cast<const in_type*>(keys.data),
                                     reinterpret_cast<const in_type*>(values.data),
                                     keys.stride(0),
                                     keys.stride(1),
                                     keys.stride(2),
                                     offsets,
                                     tokens,
                                     reinterpret_cast<store_type*>(cache.storage.keys),
                                     reinterpret_cast<store_type*>(cache.storage.values),
                                     cache.map,
                                     cache.shape.kv_heads,
                                     rows_per_head,
                                     first_row,
                                     head_dim,
                                     cache.positions.slot_position,
                                     cache.positions.next_position,
                                     start_position,
                                     {writes_next ? next.out : nullptr, next.by_sequence, next.value}};
  // 16-byte loads need 16-byte aligned rows: an aligned base and strides that keep it so.
  const std::int64_t vector_elements = 16 / static_cast<std::int64_t>(sizeof(in_type));
  const bool aligned = reinterpret_cast<std::uintptr_t>(keys.data) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(values.data) % 16 == 0 &&
                       keys.stride(0) % vector_elements == 0 && keys.stride(1) % vector_elements == 0 &&
                       keys.stride(2) % vector_elements == 0;
  const std::int64_t heads = cache.batch * cache.shape.kv_heads;
  if (heads > 65535) detail::fail(function, "cache.batch", "batch · kv_heads ≤ 65535 on backend::cuda", std::to_string(heads));
  const dim3 grid(static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(rows_per_head * (head_dim / 8), 256), 1, 4096)),
                  static_cast<unsigned>(heads));
  if (aligned)
    copy_rows<in_type, store_type, true><<<grid, 256, 0, stream>>>(copy);
  else
    copy_rows<in_type, store_type, false><<<grid, 256, 0, stream>>>(copy);
  detail::check_launch(function, "copy_rows");
  return writes_next;
}

/// Writes `rows_per_head` rows of every head: copy_rows for codec::plain, the
/// codec's device encode (codec_writes.cuh) for int8 / int4 / fp8. True when the launch also
/// wrote `next` (codec::plain with rows); otherwise the caller updates the next positions.
template <class KeyT, class CodecT>
[[nodiscard]] bool launch_copy_rows(std::string_view function, layout::contiguous::view<CodecT, device_space>& cache,
                      const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>& values,
                      const std::int64_t* offsets, const std::int32_t* tokens, std::int64_t rows_per_head,
                      std::int64_t first_row, std::int64_t start_position, cudaStream_t stream,
                      next_positions_update next = {}) {
  static_assert(codec::is_plain<CodecT> || device_encoded_codec<CodecT>,
                "kvtrim: backend::cuda stores layout::contiguous caches with codec::fp16 / bf16 / fp32, int8, int4, "
                "fp8_e4m3, layered over those three, and low_rank; layered<low_rank> has no "
                "device reader (issue 12)");
  if constexpr (codec::is_plain<CodecT>) {
    return launch_plain_copy_rows(function, cache, keys, values, offsets, tokens, rows_per_head, first_row,
                                  start_position, stream, next);
  } else {
    if (cache.shape.head_dim % 8 != 0)
      detail::fail(function, "shape.head_dim", "a multiple of 8 on backend::cuda", std::to_string(cache.shape.head_dim));
    check_same_strides(function, keys, values);
    check_low_rank_writable(function, cache);
    if (tokens != nullptr) prepare_low_rank_fit(function, cache);  // a compaction: the fit's memory first
    if (cache.heads() > 65535)
      detail::fail(function, "cache.batch", "batch · kv_heads ≤ 65535 on backend::cuda", std::to_string(cache.heads()));
    // Compaction with no rows still starts every head's key group afresh; next positions advance after this call.
    if (rows_per_head == 0 && tokens == nullptr) return false;
    launch_codec_writes(function,
                        make_codec_write(cache, keys, values, offsets, tokens, nullptr, start_position, rows_per_head,
                                         -1, first_row, 0),
                        rows_per_head, stream);
    return false;
  }
}

/// next_position[head] = value (set) or += value (advance), for every head.
template <bool Advance>
__global__ void update_next_positions(std::int64_t* next_position, std::int64_t heads, std::int64_t value) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < heads;
       head += std::int64_t{gridDim.x} * blockDim.x)
    next_position[head] = Advance ? next_position[head] + value : value;
}

/// next_position[head] = next_by_sequence[head / kv_heads] (a padded batch's start + T_b).
/// (A template, so that every translation unit that includes this header may define it.)
template <int Unused>
__global__ void set_next_positions_by_sequence(std::int64_t* next_position, std::int64_t heads, std::int64_t kv_heads,
                                               const std::int64_t* next_by_sequence) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < heads;
       head += std::int64_t{gridDim.x} * blockDim.x)
    next_position[head] = next_by_sequence[head / kv_heads];
}

template <bool Advance>
void launch_update_next_positions(std::string_view function, std::int64_t* next_position, std::int64_t heads,
                                  std::int64_t value, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(heads, 256), 1, 1024));
  update_next_positions<Advance><<<blocks, 256, 0, stream>>>(next_position, heads, value);
  detail::check_launch(function, "update_next_positions");
}

}  // namespace cuda_detail

/// layout::contiguous on the GPU. Its one length is host memory (the
/// host-planned layout); positions are device memory, written by the same
/// kernels that write the rows.
template <>
struct implementation<layout::contiguous, backend::cuda> {
  /// Clears a fresh owning cache's device metadata (next positions 0).
  template <class CodecT>
  static void reset(const layout::contiguous::view<CodecT, device_space>& cache) {
    detail::check_cuda(cudaMemset(cache.positions.next_position, 0, sizeof(std::int64_t) * cache.heads()),
                       "kvtrim::cache", "cudaMemset(next_position)");
    cuda_detail::reset_codec_storage<CodecT>("kvtrim::cache", cache.storage, nullptr);
    detail::check_cuda(cudaStreamSynchronize(nullptr), "kvtrim::cache", "cudaStreamSynchronize");
  }

  template <class CodecT, class KeyT>
  static void compact(layout::contiguous::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& keys,
                      const kv_view<KeyT, device_space>& values, const selection_view<device_space>& kept,
                      const compact_args& args, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::layout::contiguous::compact";
    const std::int64_t uniform_keep = args.uniform_keep;
    if (uniform_keep < 0 || uniform_keep > cache.capacity)
      detail::fail(function, "selection", detail::cat("one keep count in [0, capacity = ", cache.capacity, "] for every head"),
                   std::to_string(uniform_keep));
    // The new next positions: start + T_b per sequence for a padded batch, else start + T.
    const cuda_detail::next_positions_update next{
        cache.positions.next_position, args.sequences.given() ? args.sequences.next_position : nullptr,
        args.start_position + keys.extent(2)};
    // codec::plain writes them in the row copy's launch (one launch fewer, issue 10); else a kernel after.
    const bool positions_written = cuda_detail::launch_copy_rows(
        function, cache, keys, values, kept.offsets, kept.tokens, uniform_keep, 0, args.start_position, stream, next);
    if (!positions_written) {
      if (next.by_sequence != nullptr) {
        const auto blocks =
            static_cast<unsigned>(std::clamp<std::int64_t>(cuda_detail::ceil_div(cache.heads(), 256), 1, 1024));
        cuda_detail::set_next_positions_by_sequence<0><<<blocks, 256, 0, stream>>>(
            next.out, cache.heads(), cache.shape.kv_heads, next.by_sequence);
        detail::check_launch(function, "set_next_positions_by_sequence");
      } else {
        cuda_detail::launch_update_next_positions<false>(function, next.out, cache.heads(), next.value, stream);
      }
    }
    *cache.length = uniform_keep;
  }

  template <class CodecT, class KeyT>
  static void append(layout::contiguous::view<CodecT, device_space>& cache, const kv_view<KeyT, device_space>& new_keys,
                     const kv_view<KeyT, device_space>& new_values, cudaStream_t stream) {
    const std::int64_t count = new_keys.extent(2);
    layout::contiguous::check_room("kvtrim::scheme::append", cache, count);
    (void)cuda_detail::launch_copy_rows("kvtrim::scheme::append", cache, new_keys, new_values, nullptr, nullptr, count,
                                        *cache.length, 0, stream);
    cuda_detail::launch_update_next_positions<true>("kvtrim::scheme::append", cache.positions.next_position,
                                                    cache.heads(), count, stream);
    *cache.length += count;
  }

  /// scheme::truncate. The host-planned layout: its length is host memory, so the
  /// drop counts (and the arrays that bound the codec's horizon: KIVI filling
  /// groups, layered arrival counts, low_rank pending counts) are read back and
  /// checked on the host, in the CPU's order and words — one synchronisation,
  /// whatever the counts (0 included: they are only known once read), as
  /// contiguous's scheduler-side length already implies. Hence not capturable in a
  /// CUDA graph: called on a capturing stream it throws (kvtrim::error naming
  /// `stream`) before enqueuing anything, so the capture stays valid
  /// (docs/composition.md §8; paged, flat and shared_paged plan on the device).
  template <class CodecT>
  static void truncate(layout::contiguous::view<CodecT, device_space>& cache,
                       const tensor_view<const std::int32_t, 1, device_space>& drop, cudaStream_t stream) {
    cuda_detail::require_device_codec<CodecT>();
    constexpr std::string_view function = "kvtrim::scheme::truncate";
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    detail::check_cuda(cudaStreamIsCapturing(stream, &capture), function, "cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone)
      detail::fail(function, "stream",
                   "a stream that is not capturing a CUDA graph (layout::contiguous reads drop back to the host: its "
                   "one length is host memory; paged, flat and shared_paged truncate on the device)",
                   "a capturing stream");
    if (cache.batch == 0) return;
    std::vector<std::int32_t> host(static_cast<std::size_t>(cache.batch));
    // Any stride the view check accepts (0: one count for every sequence, which is contiguous's
    // own rule; negative; larger than 1): one copy when the counts are adjacent, else one small
    // copy per sequence (a pitched 2-D copy refuses pitches below its 4-byte row).
    if (drop.strides[0] == 1 || cache.batch == 1)
      detail::check_cuda(cudaMemcpyAsync(host.data(), drop.data, host.size() * sizeof(std::int32_t),
                                         cudaMemcpyDeviceToHost, stream),
                         function, "cudaMemcpyAsync(drop)");
    else
      for (std::int64_t b = 0; b < cache.batch; ++b)
        detail::check_cuda(cudaMemcpyAsync(&host[static_cast<std::size_t>(b)], drop.data + b * drop.strides[0],
                                           sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream),
                           function, "cudaMemcpyAsync(drop)");
    std::vector<const std::int64_t*> arrays;
    cuda_detail::horizon_arrays(cache.storage, arrays);
    std::vector<std::vector<std::int64_t>> bounds(arrays.size(), std::vector<std::int64_t>(static_cast<std::size_t>(cache.heads())));
    for (std::size_t i = 0; i < arrays.size(); ++i)
      detail::check_cuda(cudaMemcpyAsync(bounds[i].data(), arrays[i], bounds[i].size() * sizeof(std::int64_t),
                                         cudaMemcpyDeviceToHost, stream),
                         function, "cudaMemcpyAsync(codec horizon)");
    detail::check_cuda(cudaStreamSynchronize(stream), function, "cudaStreamSynchronize");
    const tensor_view<const std::int32_t, 1, host_space> counts{host.data(), {cache.batch}, {1}};
    detail::check_equal_drops(cache.batch, counts);
    using s = detail::layout_status;
    for (std::int64_t b = 0; b < cache.batch; ++b) {
      const std::int64_t d = host[static_cast<std::size_t>(b)];
      if (d < 0) detail::fail_truncate(s::negative_drop, b, 0, d, 0);
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) {
        if (d > *cache.length) detail::fail_truncate(s::past_head_length, b, h, d, *cache.length);
        std::int64_t horizon = std::numeric_limits<std::int64_t>::max();
        for (const std::vector<std::int64_t>& bound : bounds)
          horizon = std::min(horizon, bound[static_cast<std::size_t>(b * cache.shape.kv_heads + h)]);
        if (d > horizon) detail::fail_truncate(s::past_codec_horizon, b, h, d, horizon);
      }
    }
    const std::int64_t count = host[0];
    if (count == 0) return;
    const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>(cuda_detail::ceil_div(cache.heads(), 256), 1, 1024));
    cuda_detail::contiguous_truncate<<<blocks, 256, 0, stream>>>(cache, *cache.length, count);
    detail::check_launch(function, "contiguous_truncate");
    *cache.length -= count;
  }
};

}  // namespace kvtrim
