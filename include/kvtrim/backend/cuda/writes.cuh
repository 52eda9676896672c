// kvtrim/backend/cuda/writes.cuh — what the ragged layouts (paged, flat) share
// on the GPU, mirroring backend/cpu/detail/writes.hpp: the one kernel that
// writes tokens into a layout, the block-wide helpers of their planning
// kernels, and the status words through which the device reports a failure.
//
// Each device call of a ragged layout is two launches on the caller's stream
// (a flat append is one cooperative launch doing both steps, see flat.cuh):
//   1. a planning kernel (ONE block): the CPU's checks (pool size, free
//      pages, free slots, positions), then the metadata updates (page tables,
//      free list, offsets) exactly as the CPU orders them, so both backends
//      hand out the same page ids. Metadata is O(batch · kv_heads + pages):
//      one block walks it with cub::BlockScan over tiles of heads. (cub::DeviceScan would need temporary storage, and
//      append takes no workspace; the heads' data is far smaller than a block
//      can scan in microseconds.) On failure it writes nothing but the status
//      words (layout/detail/status.hpp).
//   2. write_rows (many blocks): every token of the call, through the layout's
//      view.slot(b, h, i) — which reads the tables the planning kernel just
//      wrote — with its position; it returns at once when step 1 failed.
// Nothing is read back on the host, so a call never synchronises and can be
// captured in a CUDA graph; kvtrim::check_status(cache, stream) is the one
// (synchronising) place where a failure becomes a kvtrim::error.
//
// Codecs: write_rows copies the rows of codec::plain (fp16, bf16, fp32); the
// quantizing codecs (int8, int4 with KIVI key groups, fp8) are encoded by
// codec_writes.cuh's kernels in step 2 instead, layered<C> by C's and its fp16
// rows, codec::low_rank by codec_low_rank.cuh (profile bases, or sequence
// bases fitted on the device: low_rank_fit.cuh; update_freq > 32 is refused at
// run time before any launch: check_rows).
// layered<low_rank> is refused at compile time (require_device_codec).
#pragma once

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/detail/status.hpp"

namespace kvtrim {

namespace cuda_detail {

/// Compile-time refusal of codecs the device cannot encode yet (issue 12).
template <class CodecT>
constexpr void require_device_codec() {
  static_assert(codec::is_plain<CodecT> || device_encoded_codec<CodecT>,
                "kvtrim: backend::cuda writes caches with codec::fp16 / bf16 / fp32, int8, int4, fp8_e4m3, "
                "layered over those three, and low_rank; layered<low_rank> has no device "
                "reader (issue 12)");
}

/// Threads of a layout's planning kernel (one block).
inline constexpr int plan_threads = 512;
using plan_scan = cub::BlockScan<std::int64_t, plan_threads>;

/// Block-wide exclusive scan of value(i) over i in [0, n), in tiles of the
/// block: emit(i, Σ_{j<i} value(j)) for every i; returns the total to every
/// thread. Every thread of the block must call it.
template <class Value, class Emit>
__device__ std::int64_t block_scan_tiles(typename plan_scan::TempStorage& temp, std::int64_t n, Value value,
                                         Emit emit) {
  std::int64_t running = 0;
  for (std::int64_t base = 0; base < n; base += plan_threads) {
    const std::int64_t i = base + threadIdx.x;
    const std::int64_t x = i < n ? value(i) : 0;
    std::int64_t prefix = 0, tile_total = 0;
    plan_scan(temp).ExclusiveSum(x, prefix, tile_total);
    if (i < n) emit(i, running + prefix);
    running += tile_total;
    __syncthreads();  // temp is reused by the next tile
  }
  return running;
}

/// Block-wide Σ value(i) over i in [0, n), to every thread.
template <class Value>
__device__ std::int64_t block_sum(typename plan_scan::TempStorage& temp, std::int64_t n, Value value) {
  return block_scan_tiles(temp, n, value, [](std::int64_t, std::int64_t) {});
}

/// Moves `rows` consecutive items (rows of `mover.parts()` 16-byte parts)
/// from [from, from + rows) to [to, to + rows) of one array in place, with the
/// whole block: each chunk of rows is first loaded into registers (Items parts
/// per thread), then, after a barrier, stored. Chunks go in the direction of
/// the move (ascending to the left, descending to the right), so a chunk's
/// loads never see an earlier chunk's stores and its stores only land on rows
/// already read — the CPU's sequential order, a chunk at a time, whatever the
/// distance. Every thread must call it with the same arguments.
template <int Items, class Mover>
__device__ void block_move(std::int64_t from, std::int64_t to, std::int64_t rows, const Mover& mover) {
  if (from == to || rows <= 0) return;
  const std::int64_t parts = mover.parts();
  const std::int64_t capacity = std::int64_t{Items} * blockDim.x;
  const std::int64_t chunk = capacity / parts > 0 ? capacity / parts : 1;
  for (std::int64_t done = 0; done < rows; done += chunk) {
    const std::int64_t n = rows - done < chunk ? rows - done : chunk;
    const std::int64_t first = to < from ? done : rows - done - n;
    uint4 staged[Items];
#pragma unroll
    for (int k = 0; k < Items; ++k) {
      const std::int64_t e = threadIdx.x + std::int64_t{k} * blockDim.x;
      if (e < n * parts) staged[k] = mover.load(from + first + e / parts, e % parts);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < Items; ++k) {
      const std::int64_t e = threadIdx.x + std::int64_t{k} * blockDim.x;
      if (e < n * parts) mover.store(to + first + e / parts, e % parts, staged[k]);
    }
    __syncthreads();
  }
}

/// block_move over the whole grid of a cooperative launch: each chunk (Items
/// parts per thread of the grid) is loaded, the grid synchronises, then it is
/// stored and the grid synchronises again. Same ordering argument as block_move.
template <int Items, class Mover>
__device__ void grid_move(const cooperative_groups::grid_group& grid, std::int64_t from, std::int64_t to,
                          std::int64_t rows, const Mover& mover) {
  if (from == to || rows <= 0) return;
  const std::int64_t parts = mover.parts();
  const auto threads = static_cast<std::int64_t>(grid.num_threads());
  const auto rank = static_cast<std::int64_t>(grid.thread_rank());
  const std::int64_t capacity = std::int64_t{Items} * threads;
  const std::int64_t chunk = capacity / parts > 0 ? capacity / parts : 1;
  for (std::int64_t done = 0; done < rows; done += chunk) {
    const std::int64_t n = rows - done < chunk ? rows - done : chunk;
    const std::int64_t first = to < from ? done : rows - done - n;
    uint4 staged[Items];
#pragma unroll
    for (int k = 0; k < Items; ++k) {
      const std::int64_t e = rank + std::int64_t{k} * threads;
      if (e < n * parts) staged[k] = mover.load(from + first + e / parts, e % parts);
    }
    grid.sync();
#pragma unroll
    for (int k = 0; k < Items; ++k) {
      const std::int64_t e = rank + std::int64_t{k} * threads;
      if (e < n * parts) mover.store(to + first + e / parts, e % parts, staged[k]);
    }
    grid.sync();
  }
}

/// A stored token of a codec::plain storage, as stored: its key row and value
/// row in 16-byte parts, then its position (layout::flat's repack).
template <class StoreT>
struct plain_slot_mover {
  StoreT* keys;
  StoreT* values;
  std::int32_t* slot_position;
  std::int64_t head_dim;

  __device__ std::int64_t vectors() const { return head_dim * static_cast<std::int64_t>(sizeof(StoreT)) / 16; }
  __device__ std::int64_t parts() const { return 2 * vectors() + 1; }
  __device__ uint4 load(std::int64_t slot, std::int64_t part) const {
    if (part == 2 * vectors()) return make_uint4(static_cast<unsigned>(slot_position[slot]), 0u, 0u, 0u);
    const StoreT* base = part < vectors() ? keys : values;
    return reinterpret_cast<const uint4*>(base + slot * head_dim)[part % vectors()];
  }
  __device__ void store(std::int64_t slot, std::int64_t part, uint4 value) const {
    if (part == 2 * vectors()) {
      slot_position[slot] = static_cast<std::int32_t>(value.x);
      return;
    }
    StoreT* base = part < vectors() ? keys : values;
    reinterpret_cast<uint4*>(base + slot * head_dim)[part % vectors()] = value;
  }
};

/// Entries of an int32 array (layout::paged's page lists).
struct int32_mover {
  std::int32_t* entries;
  __device__ std::int64_t parts() const { return 1; }
  __device__ uint4 load(std::int64_t index, std::int64_t) const {
    return make_uint4(static_cast<unsigned>(entries[index]), 0u, 0u, 0u);
  }
  __device__ void store(std::int64_t index, std::int64_t, uint4 value) const {
    entries[index] = static_cast<std::int32_t>(value.x);
  }
};

/// Registers of staging per thread in block_move (8 × 16 bytes).
inline constexpr int move_items = 8;

/// Records a failure found by a planning kernel (call from one thread): this
/// call's write kernels skip, and the first failure since the last check is kept.
__device__ inline void record_failure(std::int64_t* status, std::int64_t code, std::int64_t needed,
                                      std::int64_t available, std::int64_t count, std::int64_t target,
                                      std::int64_t pool, std::int64_t unit) {
  using s = detail::layout_status;
  status[s::call_failed] = 1;
  if (status[s::code] != s::none) return;
  status[s::code] = code;
  status[s::needed] = needed;
  status[s::available] = available;
  status[s::count] = count;
  status[s::target] = target;
  status[s::pool] = pool;
  status[s::unit] = unit;
}

/// What write_rows writes. Compaction (kept_offsets non-null): head
/// b·kv_heads + h gets its kept tokens at logical indices 0, 1, … (the
/// compensation row instead of the kept placeholder, as the CPU's
/// kept_source), positions start_position + token. Append: `count` tokens per
/// head (or for head `target` only) after what the head holds — the planning
/// kernel already lengthened it — at positions next_position − count + i.
template <class View, class InT>
struct layout_write {
  View cache;
  const InT* keys;
  const InT* values;
  std::int64_t batch_stride, head_stride, token_stride;  // elements (keys and values alike)
  const std::int64_t* kept_offsets;
  const std::int32_t* kept_tokens;
  detail::compensation_rows compensation;
  bool has_compensation;
  std::int64_t start_position;
  std::int64_t count;
  std::int64_t target;  // −1: every head
};

/// Writes 8 elements (`chunk`) of the key and value rows of logical index
/// first + row of head b·kv_heads + h, and the token's position with chunk 0.
/// `next` is the position of appended row 0; `substitute` the kept index the
/// compensation row replaces (−1: none).
template <bool Vectorised, class View, class InT>
__device__ void write_row_chunk(const layout_write<View, InT>& w, std::int64_t head, std::int64_t row,
                                std::int64_t chunk, std::int64_t first, std::int64_t next, std::int64_t substitute) {
  using store_type = device_element_t<typename View::codec::element>;
  const std::int64_t head_dim = w.cache.shape.head_dim;
  const std::int64_t b = head / w.cache.shape.kv_heads;
  const std::int64_t h = head % w.cache.shape.kv_heads;
  const bool compact = w.kept_offsets != nullptr;
  const std::int64_t slot = w.cache.slot(b, h, first + row);
  float key[8], value[8];
  std::int64_t position = 0;
  if (row == substitute) {
    const float* key_row = w.compensation.keys + head * head_dim + chunk * 8;
    const float* value_row = w.compensation.values + head * head_dim + chunk * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) key[i] = key_row[i], value[i] = value_row[i];
    position = w.compensation.position[head];
  } else {
    const std::int64_t token = compact ? std::int64_t{w.kept_tokens[w.kept_offsets[head] + row]} : row;
    const std::int64_t in_offset = b * w.batch_stride + h * w.head_stride + token * w.token_stride + chunk * 8;
    if constexpr (Vectorised) {
      load8(w.keys + in_offset, key);
      load8(w.values + in_offset, value);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) key[i] = to_float(w.keys[in_offset + i]), value[i] = to_float(w.values[in_offset + i]);
    }
    position = compact ? w.start_position + token : next + row;
  }
  if (chunk == 0) w.cache.positions.slot_position[slot] = static_cast<std::int32_t>(position);
  packed8<store_type> key_out, value_out;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    key_out.elements[i] = from_float<store_type>(key[i]), value_out.elements[i] = from_float<store_type>(value[i]);
  const std::int64_t out_offset = slot * head_dim + chunk * 8;
  *reinterpret_cast<packed8<store_type>*>(reinterpret_cast<store_type*>(w.cache.storage.keys) + out_offset) = key_out;
  *reinterpret_cast<packed8<store_type>*>(reinterpret_cast<store_type*>(w.cache.storage.values) + out_offset) = value_out;
}

template <class View, class InT, bool Vectorised>
__global__ void write_rows(const __grid_constant__ layout_write<View, InT> w) {
  if (w.cache.status[detail::layout_status::call_failed] != 0) return;
  const std::int64_t chunks_per_row = w.cache.shape.head_dim / 8;
  const std::int64_t heads = w.cache.heads();
  const bool compact = w.kept_offsets != nullptr;
  for (std::int64_t head = w.target >= 0 ? w.target : std::int64_t{blockIdx.y}; head < heads;
       head += w.target >= 0 ? heads : std::int64_t{gridDim.y}) {
    const std::int64_t rows = compact ? w.kept_offsets[head + 1] - w.kept_offsets[head] : w.count;
    const std::int64_t first =
        compact ? 0 : w.cache.head_length(head / w.cache.shape.kv_heads, head % w.cache.shape.kv_heads) - w.count;
    const std::int64_t next = compact ? 0 : w.cache.positions.next_position[head] - w.count;
    const std::int64_t substitute =
        compact && w.has_compensation ? std::int64_t{w.compensation.index[head]} : std::int64_t{-1};
    for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat < rows * chunks_per_row;
         flat += std::int64_t{gridDim.x} * blockDim.x)
      write_row_chunk<Vectorised>(w, head, flat / chunks_per_row, flat % chunks_per_row, first, next, substitute);
    if (w.target >= 0) break;
  }
}

/// An append's rows (w.count per head, or for head w.target only), as items
/// `begin`, `begin + stride`, … of one flat index space (a grid-stride loop
/// in a kernel that is not laid out by heads). The heads were lengthened already.
template <bool Vectorised, class View, class InT>
__device__ void write_appended_rows(const layout_write<View, InT>& w, std::int64_t begin, std::int64_t stride) {
  const std::int64_t chunks_per_row = w.cache.shape.head_dim / 8;
  const std::int64_t per_head = w.count * chunks_per_row;
  const std::int64_t items = (w.target >= 0 ? 1 : w.cache.heads()) * per_head;
  for (std::int64_t flat = begin; flat < items; flat += stride) {
    const std::int64_t head = w.target >= 0 ? w.target : flat / per_head;
    const std::int64_t row = flat % per_head / chunks_per_row;
    const std::int64_t length = w.cache.head_length(head / w.cache.shape.kv_heads, head % w.cache.shape.kv_heads);
    write_row_chunk<Vectorised>(w, head, row, flat % chunks_per_row, length - w.count,
                                w.cache.positions.next_position[head] - w.count, -1);
  }
}

/// What write_rows needs for one call (see layout_write).
template <class View, class KeyT>
layout_write<View, device_element_t<KeyT>> make_layout_write(const View& cache, const kv_view<KeyT, device_space>& keys,
                                                             const kv_view<KeyT, device_space>& values,
                                                             const std::int64_t* kept_offsets,
                                                             const std::int32_t* kept_tokens,
                                                             const detail::compensation_rows* compensation,
                                                             std::int64_t start_position, std::int64_t count,
                                                             std::int64_t target) {
  using in_type = device_element_t<KeyT>;
  return {cache,
          reinterpret_cast<const in_type*>(keys.data),
          reinterpret_cast<const in_type*>(values.data),
          keys.stride(0),
          keys.stride(1),
          keys.stride(2),
          kept_offsets,
          kept_tokens,
          compensation != nullptr ? *compensation : detail::compensation_rows{},
          compensation != nullptr,
          start_position,
          count,
          target};
}

/// 16-byte loads need 16-byte aligned rows: aligned bases and strides that keep them so.
template <class KeyT>
bool rows_aligned(const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>& values) {
  const std::int64_t vector_elements = 16 / static_cast<std::int64_t>(sizeof(KeyT));
  return reinterpret_cast<std::uintptr_t>(keys.data) % 16 == 0 && reinterpret_cast<std::uintptr_t>(values.data) % 16 == 0 &&
         keys.stride(0) % vector_elements == 0 && keys.stride(1) % vector_elements == 0 &&
         keys.stride(2) % vector_elements == 0;
}

/// Host-side checks every ragged device call makes before its first launch
/// (O(1), no device reads): 8-element rows, aligned storage, equal strides.
template <class View, class KeyT>
void check_rows(std::string_view function, const View& cache, const kv_view<KeyT, device_space>& keys,
                const kv_view<KeyT, device_space>& values) {
  if (cache.shape.head_dim % 8 != 0)
    detail::fail(function, "shape.head_dim", "a multiple of 8 on backend::cuda", std::to_string(cache.shape.head_dim));
  check_same_strides(function, keys, values);
  check_low_rank_writable(function, cache);
  if constexpr (codec::is_plain<typename View::codec>) {
    check_aligned16(function, "cache.storage.keys", cache.storage.keys);
    check_aligned16(function, "cache.storage.values", cache.storage.values);
  }
}

/// Launches write_rows (codec::plain): `rows_bound` is a host-known bound on the rows of one
/// head (the prefill length for compaction, the appended count for append).
template <class View, class KeyT>
void launch_plain_write_rows(std::string_view function, const View& cache, const kv_view<KeyT, device_space>& keys,
                             const kv_view<KeyT, device_space>& values, const std::int64_t* kept_offsets,
                             const std::int32_t* kept_tokens, const detail::compensation_rows* compensation,
                             std::int64_t start_position, std::int64_t count, std::int64_t target,
                             std::int64_t rows_bound, cudaStream_t stream) {
  using in_type = device_element_t<KeyT>;
  const layout_write<View, in_type> w = make_layout_write(cache, keys, values, kept_offsets, kept_tokens, compensation,
                                                          start_position, count, target);
  const bool aligned = rows_aligned(keys, values);
  const std::int64_t heads = target >= 0 ? 1 : cache.heads();
  const dim3 grid(
      static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(rows_bound * (cache.shape.head_dim / 8), 256), 1, 4096)),
      static_cast<unsigned>(std::min<std::int64_t>(heads, 65535)));
  if (aligned)
    write_rows<View, in_type, true><<<grid, 256, 0, stream>>>(w);
  else
    write_rows<View, in_type, false><<<grid, 256, 0, stream>>>(w);
  detail::check_launch(function, "write_rows");
}

/// Writes the rows of one call: write_rows for codec::plain, else the codec's
/// encode (codec_writes.cuh). `rows_bound` is a host-known bound on the rows of
/// one head (the prefill length for compaction, the appended count for append).
template <class View, class KeyT>
void launch_write_rows(std::string_view function, const View& cache, const kv_view<KeyT, device_space>& keys,
                       const kv_view<KeyT, device_space>& values, const std::int64_t* kept_offsets,
                       const std::int32_t* kept_tokens, const detail::compensation_rows* compensation,
                       std::int64_t start_position, std::int64_t count, std::int64_t target, std::int64_t rows_bound,
                       cudaStream_t stream) {
  if constexpr (codec::is_plain<typename View::codec>) {
    launch_plain_write_rows(function, cache, keys, values, kept_offsets, kept_tokens, compensation, start_position,
                            count, target, rows_bound, stream);
  } else {
    // The planning kernel already lengthened the heads and advanced their next positions.
    launch_codec_writes(function,
                        make_codec_write(cache, keys, values, kept_offsets, kept_tokens, compensation, start_position,
                                         count, target, -1, -count),
                        rows_bound, stream);
  }
}

// ---- The NaN/Inf rule on the device ------------------------------------------
// The CPU refuses a non-finite key, value or window query (and a finite one its
// fp16/bf16 storage would round to ±Inf) before writing anything, naming the
// first in (argument, sequence, head, token, channel) order (core/scheme.hpp,
// check_finite). On the device that scan is one launch before the call's
// planning kernel: every thread checks its elements and offers the key of the
// first bad one it meets to status[invalid_input] (an atomicMax of total − key,
// so the smallest key wins and 0 means "none"); the scan's last block (a block
// counter in status[scan_blocks]) decodes the winner and records the CPU's
// failure. The planning kernel of the same call then sees status[invalid_input],
// clears it and writes nothing (call_failed is set), so the cache keeps every
// byte and kvtrim::check_status throws the CPU's error, word for word.
// Cost: one read of every input (K and V of a prefill: ≈ 2·B·H·T·D·2 bytes);
// compress_options::check_finite = false skips it for compress.

/// One input tensor of a call, as the finiteness scan reads it.
struct finite_input {
  const void* data = nullptr;
  std::int64_t extents[4] = {};
  std::int64_t strides[4] = {};  // elements
  std::int64_t first_key = 0;    // keys of the inputs before it
  int storage = 0;               // layout_status::storage: also finite once rounded to it (0: no such check)
  bool vectorised = false;       // 16-byte loads of 8 elements (contiguous, aligned channels)
  const std::int64_t* lengths = nullptr;  // [B] device: read tokens [0, lengths[b]) only (a padded batch)
};

/// The inputs of one call, in the CPU's order (keys, values, window queries).
template <class KeyT, class QueryT>
struct finite_scan {
  finite_input inputs[3];
  int count = 0;
  int entry = 0;  // layout_status::entry
  std::int64_t total = 0;  // Σ elements
  std::int64_t* status = nullptr;
  unsigned blocks = 0;
};

__device__ __forceinline__ bool overflows_storage(float x, int storage) {
  if (storage == detail::layout_status::fp16) return isinf(__half2float(__float2half_rn(x)));
  if (storage == detail::layout_status::bf16) return isinf(__bfloat162float(__float2bfloat16_rn(x)));
  return false;
}

/// The element at (b, h, t, d) of input `in`, widened to float.
template <class T>
__device__ __forceinline__ float finite_input_at(const finite_input& in, std::int64_t b, std::int64_t h,
                                                 std::int64_t t, std::int64_t d) {
  return to_float(static_cast<const T*>(in.data)[b * in.strides[0] + h * in.strides[1] + t * in.strides[2] +
                                                  d * in.strides[3]]);
}

/// Whether any of the 16 bytes `raw` holds (8 elements of T) is NaN or ±Inf, from
/// the exponent bits alone (all ones), without widening: the scan's common case.
template <class T>
__device__ __forceinline__ bool any_non_finite_bits(const uint4& raw) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      bad |= (words[i] & 0x7f800000u) == 0x7f800000u;
    } else {
      constexpr unsigned mask = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;
      bad |= (words[i] & mask) == mask || (words[i] & (mask << 16)) == (mask << 16);
    }
  }
  return bad;
}

/// The first element of chunk `u` of row (head, t) that breaks the rule, as a key
/// (see scan_finite_input), or −1.
template <class T>
__device__ std::int64_t first_bad_in_chunk(const finite_input& in, const T* row, std::int64_t key_of_row, int u) {
  float x[8];
  load8(row + std::int64_t{u} * 8, x);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (!isfinite(x[i]) || overflows_storage(x[i], in.storage)) return key_of_row + std::int64_t{u} * 8 + i;
  return -1;
}

/// The thread's part of one input: heads on the grid's y axis, tokens on x, a
/// token's 8-element chunks (or elements) on consecutive lanes; four rows' loads
/// in flight per thread before any test. Returns the smallest key of a bad element
/// the thread met (blocks of rows are walked in key order), or −1.
template <class T>
__device__ std::int64_t scan_finite_input(const finite_input& in) {
  constexpr int in_flight = 4;
  const std::int64_t kv = in.extents[1], tokens = in.extents[2], dim = in.extents[3];
  const std::int64_t heads = in.extents[0] * kv;
  const int units = static_cast<int>(in.vectorised ? dim / 8 : dim);
  const int lanes = units < static_cast<int>(blockDim.x) ? units : static_cast<int>(blockDim.x);
  const int rows_per_pass = static_cast<int>(blockDim.x) / lanes;
  const int lane = static_cast<int>(threadIdx.x) % lanes, row = static_cast<int>(threadIdx.x) / lanes;
  if (row >= rows_per_pass) return -1;
  const std::int64_t stride = std::int64_t{gridDim.x} * rows_per_pass;
  // Storage overflow needs the widened value; finiteness alone reads the bits.
  const bool bits_suffice = in.storage == detail::layout_status::any;
  for (std::int64_t head = blockIdx.y; head < heads; head += gridDim.y) {
    const std::int64_t b = head / kv, h = head % kv;
    const T* base = static_cast<const T*>(in.data) + b * in.strides[0] + h * in.strides[1];
    // A padded batch's sequence b: its prompt only (the padding is never read, NaN or not).
    const std::int64_t rows = in.lengths != nullptr && in.lengths[b] < tokens ? in.lengths[b] : tokens;
    for (std::int64_t t0 = std::int64_t{blockIdx.x} * rows_per_pass + row; t0 < rows; t0 += in_flight * stride) {
      // The block of rows t0, t0 + stride, … (in_flight of them): its smallest bad key.
      // (With more units than lanes a thread's (u, row) order is not key order; every
      // later block of rows has larger keys.)
      std::int64_t found = -1;
      const auto offer = [&found](std::int64_t key) { found = found < 0 || key < found ? key : found; };
      for (int u = lane; u < units; u += lanes) {
        if (in.vectorised) {
          uint4 raw[in_flight];
#pragma unroll
          for (int k = 0; k < in_flight; ++k) {
            const std::int64_t t = t0 + k * stride;
            raw[k] = t < rows ? __ldg(reinterpret_cast<const uint4*>(base + t * in.strides[2] + std::int64_t{u} * 8))
                                : make_uint4(0u, 0u, 0u, 0u);
          }
#pragma unroll
          for (int k = 0; k < in_flight; ++k) {
            const std::int64_t t = t0 + k * stride;
            if (t >= rows) break;
            const T* row_data = base + t * in.strides[2];
            bool suspect = !bits_suffice;
            if constexpr (sizeof(T) == 4)  // 8 floats are 32 bytes: the second 16 read here
              suspect = suspect || any_non_finite_bits<T>(raw[k]) ||
                        any_non_finite_bits<T>(__ldg(reinterpret_cast<const uint4*>(row_data + std::int64_t{u} * 8) + 1));
            else
              suspect = suspect || any_non_finite_bits<T>(raw[k]);
            if (suspect) {
              const std::int64_t key = first_bad_in_chunk(in, row_data, in.first_key + (head * tokens + t) * dim, u);
              if (key >= 0) offer(key);
            }
          }
        } else {
#pragma unroll 1
          for (int k = 0; k < in_flight; ++k) {
            const std::int64_t t = t0 + k * stride;
            if (t >= rows) break;
            const float x = to_float(base[t * in.strides[2] + std::int64_t{u} * in.strides[3]]);
            if (!isfinite(x) || overflows_storage(x, in.storage)) offer(in.first_key + (head * tokens + t) * dim + u);
          }
        }
      }
      if (found >= 0) return found;
    }
  }
  return -1;
}

template <class KeyT, class QueryT>
__global__ void __launch_bounds__(256) scan_finite(const __grid_constant__ finite_scan<KeyT, QueryT> scan) {
  using s = detail::layout_status;
  std::int64_t key = -1;
  for (int a = 0; a < scan.count && key < 0; ++a)
    key = a < 2 ? scan_finite_input<KeyT>(scan.inputs[a]) : scan_finite_input<QueryT>(scan.inputs[a]);
  auto* mark = reinterpret_cast<unsigned long long*>(scan.status + s::invalid_input);
  if (key >= 0) atomicMax(mark, static_cast<unsigned long long>(scan.total - key));
  // The last block to finish decodes the smallest key (threadFenceReduction's
  // pattern): the block's offers are ordered before its count by the barrier and
  // thread 0's device-scope fence (cumulative).
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    auto* done = reinterpret_cast<unsigned long long*>(scan.status + s::scan_blocks);
    last = atomicAdd(done, 1ull) == scan.blocks - 1;
  }
  __syncthreads();
  if (!last || threadIdx.x != 0) return;
  scan.status[s::scan_blocks] = 0;
  const unsigned long long offered = atomicAdd(mark, 0ull);  // every block's offer is visible (fences above)
  if (offered == 0) return;
  std::int64_t first = scan.total - static_cast<std::int64_t>(offered);
  int a = 0;
  while (a + 1 < scan.count && first >= scan.inputs[a + 1].first_key) ++a;
  const finite_input& in = scan.inputs[a];
  first -= in.first_key;
  const std::int64_t d = first % in.extents[3];
  first /= in.extents[3];
  const std::int64_t t = first % in.extents[2];
  first /= in.extents[2];
  const std::int64_t h = first % in.extents[1], b = first / in.extents[1];
  const float x = a < 2 ? finite_input_at<KeyT>(in, b, h, t, d) : finite_input_at<QueryT>(in, b, h, t, d);
  const bool finite = isfinite(x);
  record_failure(scan.status, finite ? s::input_overflows_storage : s::non_finite_input, b, h, t, d,
                 static_cast<std::int64_t>(__float_as_uint(x)),
                 s::pack_input(scan.entry, a, finite ? in.storage : s::any));
}

/// The storage kind whose rounding an input of element type T must survive
/// (none when T is the storage type itself, or the codec scales its input).
template <class T, class Stored>
int storage_check_for() {
  using s = detail::layout_status;
  if constexpr (std::is_same_v<device_element_t<T>, device_element_t<Stored>>)
    return s::any;
  else if constexpr (std::is_same_v<std::remove_const_t<Stored>, half>)
    return s::fp16;
  else if constexpr (std::is_same_v<std::remove_const_t<Stored>, bfloat16>)
    return s::bf16;
  else
    return s::any;
}

template <class T>
finite_input make_finite_input(const tensor_view<T, 4, device_space>& view, std::int64_t first_key, int storage) {
  finite_input in;
  in.data = view.data;
  for (int k = 0; k < 4; ++k) in.extents[k] = view.extent(k), in.strides[k] = view.stride(k);
  in.first_key = first_key;
  in.storage = storage;
  constexpr std::int64_t per_16_bytes = 16 / static_cast<std::int64_t>(sizeof(T));
  in.vectorised = sizeof(T) <= 4 && reinterpret_cast<std::uintptr_t>(view.data) % 16 == 0 && view.stride(3) == 1 &&
                  view.extent(3) % 8 == 0 && view.stride(0) % per_16_bytes == 0 &&
                  view.stride(1) % per_16_bytes == 0 && view.stride(2) % per_16_bytes == 0;
  return in;
}

/// Launches the scan of keys, values (element type KeyT, bound for the codec's
/// storage `Stored`) and, when `queries.data` is set, window queries. Every
/// ragged device call on `status` runs its planning kernel after this one.
template <class Stored, class KeyT, class QueryT>
void launch_scan_finite(std::string_view function, std::int64_t* status, int entry,
                        const tensor_view<KeyT, 4, device_space>& keys, const tensor_view<KeyT, 4, device_space>& values,
                        const tensor_view<QueryT, 4, device_space>& queries, cudaStream_t stream,
                        const detail::finite_lengths& lengths = {}) {
  finite_scan<device_element_t<KeyT>, device_element_t<QueryT>> scan;
  const int storage = storage_check_for<KeyT, Stored>();
  const auto elements = [](const auto& view) {
    return view.extent(0) * view.extent(1) * view.extent(2) * view.extent(3);
  };
  scan.inputs[0] = make_finite_input(keys, 0, storage);
  scan.inputs[1] = make_finite_input(values, elements(keys), storage);
  scan.inputs[0].lengths = scan.inputs[1].lengths = lengths.tokens;
  scan.count = 2;
  scan.total = elements(keys) + elements(values);
  // The grid covers the keys' heads and tokens; the window queries (more heads,
  // far fewer tokens) are walked by the same grid-stride loops.
  const std::int64_t heads = std::max(keys.extent(0) * keys.extent(1), std::int64_t{1});
  const std::int64_t tokens = std::max(keys.extent(2), std::int64_t{1});
  if (queries.data != nullptr) {
    scan.inputs[2] = make_finite_input(queries, scan.total, detail::layout_status::any);
    scan.inputs[2].lengths = lengths.queries;
    scan.count = 3;
    scan.total += elements(queries);
  }
  scan.entry = entry;
  scan.status = status;
  // Enough blocks to stream at memory speed (each thread 8 chunks per head, 4
  // loads in flight), few enough that the block counter and the grid stay small.
  const std::int64_t rows_per_pass = std::max<std::int64_t>(1, 256 / std::max<std::int64_t>(1, keys.extent(3) / 8));
  const dim3 grid(static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(tokens, 8 * rows_per_pass), 1, 1024)),
                  static_cast<unsigned>(std::min<std::int64_t>(heads, 65535)));
  scan.blocks = grid.x * grid.y;
  scan_finite<<<grid, 256, 0, stream>>>(scan);
  detail::check_launch(function, "scan_finite");
}

/// batch · kv_heads ≤ 2^30 for the page-table layouts: write_rows strides over
/// heads on the grid's y axis and the page tables are int32.
template <class View>
void check_page_table_heads(std::string_view function, const View& cache) {
  if (cache.heads() > std::int64_t{1} << 30)
    detail::fail(function, "cache.batch", "batch · kv_heads ≤ 2^30 on backend::cuda", std::to_string(cache.heads()));
}

/// A ragged layout's `check_finite` hook (scheme calls it right before compact /
/// append; `function` names that call): the host checks the call makes next,
/// first — a scan whose call then threw would leave its mark for the next call —
/// then the finiteness scan, which the call's planning kernel reads.
template <class Stored, class View, class KeyT, class QueryT>
void check_then_scan_finite(std::string_view function, const View& cache, int entry,
                            const tensor_view<KeyT, 4, device_space>& keys,
                            const tensor_view<KeyT, 4, device_space>& values,
                            const tensor_view<QueryT, 4, device_space>& queries, cudaStream_t stream,
                            const detail::finite_lengths& lengths = {}) {
  check_rows(function, cache, keys, values);
  if constexpr (requires { cache.indptr; }) check_page_table_heads(function, cache);
  launch_scan_finite<Stored>(function, cache.status, entry, keys, values, queries, stream, lengths);
}

/// Compaction's planning, second step (all threads of its one block): a budget
/// that refused on the device (compact_args::budget_refusal) is recorded as the
/// CPU's error, and nothing is written. The budget resets its word every call.
/// With a padded batch's `sequences`, the word names the first refusing sequence's head
/// (flattened over the batch) and the budget is that sequence's own (of its T_b tokens),
/// recorded with T_b so the message names the sequence as the CPU's does.
__device__ inline bool budget_refused(std::int64_t* status, const unsigned long long* refusal, std::int64_t budget,
                                      std::int64_t kv_heads, const detail::sequence_table& sequences = {}) {
  if (refusal == nullptr) return false;
  const unsigned long long word = __ldcg(refusal);
  if (word == ~0ull) return false;
  if (threadIdx.x == 0) {
    const auto head = static_cast<std::int64_t>(word >> 32);
    const auto protected_tokens = static_cast<std::int64_t>(word & 0xffffffffull);
    const std::int64_t b = head / kv_heads;
    record_failure(status, detail::layout_status::adaptive_over_budget, protected_tokens,
                   sequences.given() ? sequences.head_budget[b] : budget, b, head % kv_heads, 0,
                   sequences.given() ? sequences.length[b] : 0);
  }
  return true;
}

/// Head `head`'s next position after a compaction: start + T, or start + T_b of its
/// sequence in a padded batch (compact_args::sequences).
__device__ __forceinline__ std::int64_t compacted_next_position(std::int64_t start_plus_tokens,
                                                                const detail::sequence_table& sequences,
                                                                std::int64_t head, std::int64_t kv_heads) {
  return sequences.given() ? sequences.next_position[head / kv_heads] : start_plus_tokens;
}

/// Every planning kernel's first step (all threads of its one block): when this
/// call's finiteness scan found a bad input, clear the mark and write nothing
/// (the scan recorded the failure and set call_failed).
__device__ inline bool input_refused(std::int64_t* status) {
  using s = detail::layout_status;
  if (status[s::invalid_input] == 0) return false;
  __syncthreads();  // every thread has read the mark before thread 0 clears it
  if (threadIdx.x == 0) status[s::invalid_input] = 0;
  return true;
}

}  // namespace cuda_detail

/// Throws the kvtrim::error a CPU call would have thrown when a device call on
/// `cache` (layout::paged, flat or shared_paged on backend::cuda) found the pool or
/// buffer short, positions past 2^31, or a non-finite input, since the last check; clears the
/// record. Synchronises `stream` (call it where a host sync is acceptable: after
/// compress, every few decode steps, or after replaying a graph).
template <class View>
  requires requires(const View& view) { view.status; }
void check_status(const View& cache, cudaStream_t stream) {
  constexpr std::string_view function = "kvtrim::check_status";
  if (cache.status == nullptr) detail::fail(function, "cache.status", "a bound cache view", "a null pointer");
  std::int64_t words[detail::layout_status::words] = {};
  detail::check_cuda(cudaMemcpyAsync(words, cache.status, sizeof words, cudaMemcpyDeviceToHost, stream), function,
                     "cudaMemcpyAsync(status)");
  detail::check_cuda(cudaStreamSynchronize(stream), function, "cudaStreamSynchronize");
  if (words[detail::layout_status::code] == detail::layout_status::none) return;
  detail::check_cuda(cudaMemsetAsync(cache.status, 0, sizeof words, stream), function, "cudaMemsetAsync(status)");
  detail::check_cuda(cudaStreamSynchronize(stream), function, "cudaStreamSynchronize");
  detail::raise_layout_status(words);
}

}  // namespace kvtrim
