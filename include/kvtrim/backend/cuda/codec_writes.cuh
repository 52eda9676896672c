// kvtrim/backend/cuda/codec_writes.cuh — the device encode of the quantizing
// codecs (codec::int8, codec::int4, codec::fp8) on every layout's write paths
// (compaction and append), producing the bytes the CPU's ordered encode
// produces (backend/cpu/detail/writes.hpp), metadata of the codec included.
//
// The CPU encodes a head's tokens one after the other; the device splits that
// sequence into steps whose results do not depend on the order:
//   1. codec_head_amax (fp8 head_amax, compaction only): one block per head
//      reduces max|k| and max|v| over the head's kept rows — the CPU's
//      prepare_head — and sets the head's scales.
//   2. codec_encode_rows: one warp per token: its position, and every run of
//      one token (values; keys scaled per token; fp8 rows) — minimum and
//      maximum by warp shuffles, then the codes.
//   3. kivi_seal_groups (KIVI keys): one block per completed key group of a
//      head — the group that was filling (its fp16 residual rows) continued by
//      the new tokens, then whole groups of new tokens — fitted per channel,
//      coded into the slots of its tokens, its scales into every slot run it
//      covers, the runs marked sealed.
//   4. kivi_fill_residual (KIVI keys): the head's residual window as the CPU
//      leaves it: the new filling group's fp16 keys and slots (its runs marked
//      unsealed), the rows after it still those of the last sealed group, the count.
//   5. layered_rows (codec::layered<C>, after C's steps): the fp16 rows of the
//      sinks and newest tokens and the slot → row map, as the CPU's encode
//      leaves them (below).
// Step 3 reads the residual rows that step 4 rewrites, hence two launches.
// When the inputs allow 16-byte loads (vector_rows: aligned bases and strides, head_dim 8 … 256 a power of
// two; every tensor the engine passes), steps 1 and 2 read each row as the plain row copy does
// (codec_head_amax8, codec_encode_rows8: head_dim / 8 lanes per row, 8 channels each, one store of codes per
// lane), and at compaction steps 3–4 are one kernel, kivi_compact_groups (one warp per key group, the group's
// keys in registers; head_dim a multiple of 64). Append (a filling group continued) keeps steps 3–4.
// Every step reads its inputs through the same source as the plain writes
// (kept tokens, the compensation row in place of its placeholder, appended
// rows) and returns at once when the layout's planning kernel recorded a failure.
// The layouts guarantee the run rule of KIVI's key groups (docs/composition.md
// §3), which the CPU's encode checks: the device does not check it again.
// Non-finite inputs: the CPU refuses them (kvtrim::error); a kernel cannot
// throw, so the device stores what the arithmetic gives (NaN scales / codes).
#pragma once

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kvtrim/backend/cuda/codec_fp8.cuh"
#include "kvtrim/backend/cuda/codec_layered.cuh"
#include "kvtrim/backend/cuda/codec_quantized.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/low_rank.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/layout/detail/status.hpp"

namespace kvtrim::cuda_detail {

/// Whether the device encodes codec C (codec::plain has its own row copies).
template <class C>
inline constexpr bool device_encoded_codec = false;
template <int Bits>
inline constexpr bool device_encoded_codec<codec::quantized<Bits>> = true;
template <>
inline constexpr bool device_encoded_codec<codec::fp8> = true;
/// layered<C>: C's device encode, plus its fp16 rows (layered_rows below).
template <class Inner>
inline constexpr bool device_encoded_codec<codec::layered<Inner>> = device_encoded_codec<Inner>;
/// codec::low_rank: its own encode and decode (codec_low_rank.cuh, included at the end of this
/// header); layered<low_rank> has no device reader.
template <class C>
inline constexpr bool is_low_rank = std::is_same_v<C, codec::low_rank>;
template <>
inline constexpr bool device_encoded_codec<codec::low_rank> = true;
template <>
inline constexpr bool device_encoded_codec<codec::layered<codec::low_rank>> = false;
template <class View, class InT>
struct codec_write;
template <class View, class InT>
void launch_low_rank_writes(std::string_view function, const codec_write<View, InT>& w, std::int64_t rows_bound,
                            cudaStream_t stream);
inline void launch_low_rank_reset(std::string_view function, const codec::low_rank::storage<device_space>& store,
                           cudaStream_t stream);

/// The quantizing codec that encodes a codec's tokens (layered<C>: C) and its storage.
template <class C>
struct encoded_codec {
  using type = C;
  __host__ __device__ static const typename C::template storage<device_space>& of(
      const typename C::template storage<device_space>& store) {
    return store;
  }
};
template <class Inner>
struct encoded_codec<codec::layered<Inner>> {
  using type = Inner;
  __host__ __device__ static const typename Inner::template storage<device_space>& of(
      const typename codec::layered<Inner>::template storage<device_space>& store) {
    return store.inner;
  }
};
template <class C>
inline constexpr bool is_layered = false;
template <class Inner>
inline constexpr bool is_layered<codec::layered<Inner>> = true;

/// What the codec write kernels write (layout_write's fields, plus what the
/// contiguous layout knows on the host). Compaction: kept_offsets non-null.
template <class View, class InT>
struct codec_write {
  View cache;
  const InT* keys;
  const InT* values;
  std::int64_t batch_stride, head_stride, token_stride;  // elements (keys and values alike)
  const std::int64_t* kept_offsets;
  const std::int32_t* kept_tokens;
  detail::compensation_rows compensation;
  bool has_compensation;
  std::int64_t start_position;
  std::int64_t count;       // append: rows per head
  std::int64_t target;      // append: −1 every head, else that head only
  std::int64_t first_row;   // append: the logical index of row 0 (contiguous, host-known), or −1: length − count
  std::int64_t next_shift;  // append: row r's position is next_position[head] + next_shift + r
};

template <class View, class InT>
__device__ __forceinline__ bool write_failed(const codec_write<View, InT>& w) {
  if constexpr (requires { w.cache.status; })
    return w.cache.status[detail::layout_status::call_failed] != 0;
  else
    return false;
}
template <class View, class InT>
__device__ __forceinline__ bool is_compaction(const codec_write<View, InT>& w) {
  return w.kept_offsets != nullptr;
}
/// Rows this call writes to `head`.
template <class View, class InT>
__device__ __forceinline__ std::int64_t rows_of(const codec_write<View, InT>& w, std::int64_t head) {
  if (is_compaction(w)) return w.kept_offsets[head + 1] - w.kept_offsets[head];
  return w.target < 0 || w.target == head ? w.count : 0;
}
/// The logical index of the head's row 0.
template <class View, class InT>
__device__ __forceinline__ std::int64_t first_of(const codec_write<View, InT>& w, std::int64_t head) {
  if (is_compaction(w)) return 0;
  if (w.first_row >= 0) return w.first_row;
  if constexpr (requires { w.cache.status; })
    return w.cache.head_length(head / w.cache.shape.kv_heads, head % w.cache.shape.kv_heads) - w.count;
  else
    return w.first_row;
}
template <class View, class InT>
__device__ __forceinline__ std::int64_t slot_of(const codec_write<View, InT>& w, std::int64_t head, std::int64_t index) {
  return w.cache.slot(head / w.cache.shape.kv_heads, head % w.cache.shape.kv_heads, index);
}
/// What a kernel visiting many rows of a head reads once for the head: its (sequence, kv head) (64-bit
/// divisions are emulated: dozens of instructions each), where its kept tokens start and its compensation
/// row (the compiler cannot hoist these loads past the kernel's stores itself).
struct head_coordinates {
  std::int64_t b, h;
  std::int64_t kept_first;        // compaction: kept_offsets[head]; else 0
  std::int64_t compensation_row;  // the logical index of the head's compensation row, or −1
};
template <class View, class InT>
__device__ __forceinline__ head_coordinates coordinates_of(const codec_write<View, InT>& w, std::int64_t head) {
  const bool compaction = is_compaction(w);
  return {head / w.cache.shape.kv_heads, head % w.cache.shape.kv_heads, compaction ? w.kept_offsets[head] : 0,
          compaction && w.has_compensation ? std::int64_t{w.compensation.index[head]} : -1};
}
/// Channel d of row r of the head's input: (key, value); returns nothing, fills both.
template <class View, class InT>
__device__ __forceinline__ std::int64_t source_offset(const codec_write<View, InT>& w, std::int64_t head,
                                                      std::int64_t r, head_coordinates at) {
  const std::int64_t b = at.b, h = at.h;
  const std::int64_t token = is_compaction(w) ? std::int64_t{w.kept_tokens[at.kept_first + r]} : r;
  return b * w.batch_stride + h * w.head_stride + token * w.token_stride;
}
template <class View, class InT>
__device__ __forceinline__ std::int64_t source_offset(const codec_write<View, InT>& w, std::int64_t head,
                                                      std::int64_t r) {
  return source_offset(w, head, r, coordinates_of(w, head));
}
template <class View, class InT>
__device__ __forceinline__ bool is_compensation_row(const codec_write<View, InT>& w, std::int64_t head,
                                                    std::int64_t r) {
  return is_compaction(w) && w.has_compensation && w.compensation.index[head] == r;
}
/// Row r of the head's input, resolved once: its keys and values (the compensation row's, or the input's).
template <class InT>
struct source_row {
  const float* compensation_key;  // non-null: the compensation row (fp32)
  const float* compensation_value;
  const InT* key;
  const InT* value;
  __device__ __forceinline__ float key_at(std::int64_t d) const {
    return compensation_key != nullptr ? compensation_key[d] : to_float(key[d]);
  }
  __device__ __forceinline__ float value_at(std::int64_t d) const {
    return compensation_value != nullptr ? compensation_value[d] : to_float(value[d]);
  }
};
template <class View, class InT>
__device__ __forceinline__ source_row<InT> row_of(const codec_write<View, InT>& w, std::int64_t head, std::int64_t r,
                                                  head_coordinates coordinates) {
  if (coordinates.compensation_row == r) {
    const std::int64_t at = head * w.cache.shape.head_dim;
    return {w.compensation.keys + at, w.compensation.values + at, nullptr, nullptr};
  }
  const std::int64_t offset = source_offset(w, head, r, coordinates);
  return {nullptr, nullptr, w.keys + offset, w.values + offset};
}
template <class View, class InT>
__device__ __forceinline__ source_row<InT> row_of(const codec_write<View, InT>& w, std::int64_t head, std::int64_t r) {
  return row_of(w, head, r, coordinates_of(w, head));
}
template <class View, class InT>
__device__ __forceinline__ float source_key(const codec_write<View, InT>& w, std::int64_t head, std::int64_t r,
                                            std::int64_t d) {
  if (is_compensation_row(w, head, r)) return w.compensation.keys[head * w.cache.shape.head_dim + d];
  return to_float(w.keys[source_offset(w, head, r) + d]);
}
template <class View, class InT>
__device__ __forceinline__ float source_value(const codec_write<View, InT>& w, std::int64_t head, std::int64_t r,
                                              std::int64_t d) {
  if (is_compensation_row(w, head, r)) return w.compensation.values[head * w.cache.shape.head_dim + d];
  return to_float(w.values[source_offset(w, head, r) + d]);
}
template <class View, class InT>
__device__ __forceinline__ std::int64_t position_of_row(const codec_write<View, InT>& w, std::int64_t head,
                                                        std::int64_t r, head_coordinates at) {
  if (!is_compaction(w)) return w.cache.positions.next_position[head] + w.next_shift + r;
  if (at.compensation_row == r) return w.compensation.position[head];
  return w.start_position + w.kept_tokens[at.kept_first + r];
}
template <class View, class InT>
__device__ __forceinline__ std::int64_t position_of_row(const codec_write<View, InT>& w, std::int64_t head,
                                                        std::int64_t r) {
  return position_of_row(w, head, r, coordinates_of(w, head));
}

/// The heads a block visits: blockIdx.y, + gridDim.y, … (or the target only).
#define KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head)                                                          \
  for (std::int64_t head = (w).target >= 0 ? (w).target : std::int64_t{blockIdx.y}; head < (w).cache.heads(); \
       head += (w).target >= 0 ? (w).cache.heads() : std::int64_t{gridDim.y})

inline constexpr int codec_write_threads = 256;
/// Passes each warp of codec_encode_rows8 makes over a head's rows (when the head has that many). One pass per
/// warp spent most of the kernel's instructions in its setup (ncu, H200 2026-12-03: ~680 warp instructions
/// for the two rows a warp encoded, mostly index arithmetic and emulated divisions).
inline constexpr int rows8_passes = 8;

/// Benchmarks only (bench/cuda_decode_attention.cu's codec_encode_legacy_* rows, an A/B in one run): true makes
/// launch_quantized_writes use the element kernels (codec_head_amax, codec_encode_rows, kivi_seal_groups and
/// kivi_fill_residual) where it would use the 16-byte ones. Both write the same bytes.
inline bool legacy_codec_encode = false;

// 1. fp8 head_amax scales (compaction), in three launches so that every head's
// rows are read by many blocks: the scales are negated (a mark: scales are > 0),
// each block reduces max|x| over a part of a head and raises the scale's bits
// to it with atomicMax (any positive float's bits exceed a negative one's, and
// order like the floats), then a mark still negative means an all-zero head,
// which keeps its scale, and a maximum becomes max / 448 (in double, at least
// 2⁻¹²⁶: detail::e4m3_head_scale, the CPU's own call).
template <class Storage>
__global__ void fp8_mark_scales(const Storage store) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < store.heads;
       head += std::int64_t{gridDim.x} * blockDim.x) {
    store.key_scales[head] = -store.key_scales[head];
    store.value_scales[head] = -store.value_scales[head];
  }
}
template <class Storage>
__global__ void fp8_finish_scales(const Storage store) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < store.heads;
       head += std::int64_t{gridDim.x} * blockDim.x) {
    float* scales[2] = {store.key_scales + head, store.value_scales + head};
    for (float* scale : scales) *scale = *scale < 0.0f ? -*scale : detail::e4m3_head_scale(*scale);
  }
}

using head_amax_reduce = cub::BlockReduce<float, codec_write_threads>;
/// The block's key and value maxima of |x| for `head`, merged into the head's scale slots (atomicMax on the
/// float bits: non-negative floats order as their bits). Every thread of the block calls it.
template <class Storage>
__device__ __forceinline__ void publish_head_amax(typename head_amax_reduce::TempStorage& temp, const Storage& store,
                                                  std::int64_t head, float key_amax, float value_amax) {
  const auto max_op = [](float a, float b) { return fmaxf(a, b); };
  key_amax = head_amax_reduce(temp).Reduce(key_amax, max_op);
  __syncthreads();
  value_amax = head_amax_reduce(temp).Reduce(value_amax, max_op);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (key_amax > 0.0f) atomicMax(reinterpret_cast<int*>(store.key_scales + head), __float_as_int(key_amax));
    if (value_amax > 0.0f) atomicMax(reinterpret_cast<int*>(store.value_scales + head), __float_as_int(value_amax));
  }
}

template <class View, class InT>
__global__ void __launch_bounds__(codec_write_threads) codec_head_amax(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  __shared__ typename head_amax_reduce::TempStorage temp;
  constexpr int warps = codec_write_threads / 32;
  const int lane = threadIdx.x % 32;
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  const std::int64_t head_dim = w.cache.shape.head_dim;
  for (std::int64_t head = blockIdx.y; head < w.cache.heads(); head += gridDim.y) {
    const std::int64_t rows = rows_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    float key_amax = 0.0f, value_amax = 0.0f;
    // A warp per row: the row is resolved once (no per-element index arithmetic), its channels coalesced.
    for (std::int64_t r = blockIdx.x * std::int64_t{warps} + threadIdx.x / 32; r < rows;
         r += std::int64_t{gridDim.x} * warps) {
      const source_row<InT> source = row_of(w, head, r, coordinates);
      for (int d = lane; d < head_dim; d += 32) {
        key_amax = fmaxf(key_amax, fabsf(source.key_at(d)));
        value_amax = fmaxf(value_amax, fabsf(source.value_at(d)));
      }
    }
    publish_head_amax(temp, store, head, key_amax, value_amax);
  }
}

// 2. Runs of one token, one warp per token.
template <class View, class InT>
__global__ void __launch_bounds__(codec_write_threads) codec_encode_rows(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  constexpr int warps = codec_write_threads / 32;
  const int lane = threadIdx.x % 32;
  const std::int64_t head_dim = w.cache.shape.head_dim;
  const int pairs = static_cast<int>((head_dim - 2 * lane + 63) / 64);  // channel pairs 2·lane + 64·j of this lane
  // Keys encoded here (per-token runs, fp8 rows); KIVI keys are read by kivi_seal_groups instead.
  bool row_keys = true;
  if constexpr (codec_device<typename encoded_codec<typename View::codec>::type>::key_groups)
    row_keys = encoded_codec<typename View::codec>::of(w.cache.storage).key_group == 0;
  KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head) {
    const std::int64_t rows = rows_of(w, head), first = first_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    for (std::int64_t r = blockIdx.x * std::int64_t{warps} + threadIdx.x / 32; r < rows;
         r += std::int64_t{gridDim.x} * warps) {
      const std::int64_t slot = w.cache.slot(coordinates.b, coordinates.h, first + r);
      const source_row<InT> source = row_of(w, head, r, coordinates);
      float key[8] = {}, value[8] = {};
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < pairs)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const std::int64_t d = 2 * lane + 64 * j + e;
            if (row_keys) key[2 * j + e] = source.key_at(d);
            value[2 * j + e] = source.value_at(d);
          }
      if (lane == 0) w.cache.positions.slot_position[slot] = static_cast<std::int32_t>(position_of_row(w, head, r, coordinates));
      using encoded = encoded_codec<typename View::codec>;
      codec_device<typename encoded::type>::encode_row(encoded::of(w.cache.storage), head, slot, lane, pairs, key, value);
    }
  }
}

// 2'. The same with 16-byte loads (the plain row copy's pattern): head_dim / 8 lanes per row (a power of two
// ≤ 32), 8 channels each, so a warp encodes 32 / lanes rows at once; the row's reductions are shuffles within
// its lanes, its codes one store per lane. Used when the inputs are 16-byte aligned (vector_rows).

/// Whether the 16-byte kernels can read the call's rows: aligned bases and strides (keys and values share
/// strides), and head_dim / 8 a power of two ≤ 32 (head_dim 8 … 256).
template <class View, class InT>
bool vector_rows(const codec_write<View, InT>& w) {
  const std::int64_t vector_elements = 16 / static_cast<std::int64_t>(sizeof(InT));
  const std::int64_t lanes = w.cache.shape.head_dim / 8;
  return reinterpret_cast<std::uintptr_t>(w.keys) % 16 == 0 && reinterpret_cast<std::uintptr_t>(w.values) % 16 == 0 &&
         w.batch_stride % vector_elements == 0 && w.head_stride % vector_elements == 0 &&
         w.token_stride % vector_elements == 0 && w.cache.shape.head_dim % 8 == 0 && lanes >= 1 && lanes <= 32 &&
         (lanes & (lanes - 1)) == 0;
}

/// Channels 8·chunk .. 8·chunk + 7 of row r's key (when `keys_too`, else zeros) and value.
template <class View, class InT>
__device__ __forceinline__ void load_row8(const codec_write<View, InT>& w, std::int64_t head, std::int64_t r,
                                          head_coordinates at, int chunk, bool keys_too, float (&key)[8],
                                          float (&value)[8]) {
  if (at.compensation_row == r) {  // fp32, no alignment promised: element loads
    const std::int64_t first = head * w.cache.shape.head_dim + 8 * chunk;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      key[i] = keys_too ? w.compensation.keys[first + i] : 0.0f;
      value[i] = w.compensation.values[first + i];
    }
    return;
  }
  const std::int64_t offset = source_offset(w, head, r, at) + 8 * chunk;
  if (keys_too)
    load8(w.keys + offset, key);
  else
#pragma unroll
    for (int i = 0; i < 8; ++i) key[i] = 0.0f;
  load8(w.values + offset, value);
}

template <class View, class InT>
__global__ void __launch_bounds__(codec_write_threads) codec_encode_rows8(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  using encoded = encoded_codec<typename View::codec>;
  using device = codec_device<typename encoded::type>;
  const auto& store = encoded::of(w.cache.storage);
  constexpr int warps = codec_write_threads / 32;
  const int lane = threadIdx.x % 32;
  // lanes per row: a power of two (vector_rows), so shifts and masks, not the emulated integer division.
  const int lanes = static_cast<int>(w.cache.shape.head_dim / 8), lanes_log2 = __ffs(lanes) - 1;
  const int per_warp = 32 >> lanes_log2, chunk = lane & (lanes - 1);
  bool row_keys = true;  // as codec_encode_rows: KIVI keys are encoded by the group kernels
  if constexpr (device::key_groups) row_keys = store.key_group == 0;
  KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head) {
    const std::int64_t rows = rows_of(w, head), first = first_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    // `base` is the same on every lane of the warp (the shuffles in encode8 need all 32).
    for (std::int64_t base = (blockIdx.x * std::int64_t{warps} + threadIdx.x / 32) * per_warp; base < rows;
         base += std::int64_t{gridDim.x} * warps * per_warp) {
      const std::int64_t r = base + (lane >> lanes_log2);
      const bool active = r < rows;
      float key[8] = {}, value[8] = {};
      std::int64_t slot = 0;
      if (active) {
        slot = w.cache.slot(coordinates.b, coordinates.h, first + r);
        load_row8(w, head, r, coordinates, chunk, row_keys, key, value);
        if (chunk == 0)
          w.cache.positions.slot_position[slot] = static_cast<std::int32_t>(position_of_row(w, head, r, coordinates));
      }
      device::encode8(store, head, slot, lanes, chunk, active, key, value);
    }
  }
}

/// codec_head_amax with the row kernel's 16-byte loads.
template <class View, class InT>
__global__ void __launch_bounds__(codec_write_threads) codec_head_amax8(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  __shared__ typename head_amax_reduce::TempStorage temp;
  constexpr int warps = codec_write_threads / 32;
  const int lane = threadIdx.x % 32;
  const int lanes = static_cast<int>(w.cache.shape.head_dim / 8), lanes_log2 = __ffs(lanes) - 1;  // as codec_encode_rows8
  const int per_warp = 32 >> lanes_log2, chunk = lane & (lanes - 1);
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  for (std::int64_t head = blockIdx.y; head < w.cache.heads(); head += gridDim.y) {
    const std::int64_t rows = rows_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    float key_amax = 0.0f, value_amax = 0.0f;
    for (std::int64_t r = (blockIdx.x * std::int64_t{warps} + threadIdx.x / 32) * per_warp + (lane >> lanes_log2); r < rows;
         r += std::int64_t{gridDim.x} * warps * per_warp) {
      float key[8], value[8];
      load_row8(w, head, r, coordinates, chunk, true, key, value);
#pragma unroll
      for (int i = 0; i < 8; ++i) key_amax = fmaxf(key_amax, fabsf(key[i])), value_amax = fmaxf(value_amax, fabsf(value[i]));
    }
    publish_head_amax(temp, store, head, key_amax, value_amax);
  }
}

// 3–4. KIVI key groups. The head's key stream this call: the rc keys of its
// filling group (none at compaction), then its new rows; element s of the stream
// is residual row s (s < rc) or new row s − rc.
template <class View, class InT>
__device__ __forceinline__ std::int64_t filling_count(const codec_write<View, InT>& w, std::int64_t head) {
  return is_compaction(w) ? 0 : encoded_codec<typename View::codec>::of(w.cache.storage).residual_count[head];
}
template <class View, class InT>
__device__ __forceinline__ std::int64_t stream_slot(const codec_write<View, InT>& w, std::int64_t head, std::int64_t rc,
                                                    std::int64_t first, std::int64_t s) {
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  return s < rc ? store.residual_slots[head * store.key_group + s] : slot_of(w, head, first + s - rc);
}
/// The key as the residual window holds it (rounded to fp16).
template <class View, class InT>
__device__ __forceinline__ float stream_key(const codec_write<View, InT>& w, std::int64_t head, std::int64_t rc,
                                            std::int64_t s, std::int64_t d) {
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  if (s < rc)
    return __half2float(reinterpret_cast<const __half*>(store.residual_keys)[(head * store.key_group + s) * store.head_dim + d]);
  return __half2float(__float2half_rn(source_key(w, head, s - rc, d)));
}

inline constexpr int kivi_threads = 128;

/// Groups of at most this many fp16 keys are staged in shared memory first
/// (all of a group's loads in flight at once); larger groups read them in place.
inline constexpr int kivi_staged_keys = 8192;
inline constexpr int kivi_staged_slots = 256;

template <class View, class InT>
__global__ void __launch_bounds__(kivi_threads) kivi_seal_groups(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  using device = codec_device<typename encoded_codec<typename View::codec>::type>;
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  const std::int64_t group = store.key_group, run = store.slot_run, head_dim = store.head_dim;
  const std::int64_t row_bytes = device::quantizer::row_bytes(head_dim);
  const bool staged = group * head_dim <= kivi_staged_keys && group <= kivi_staged_slots;
  __shared__ __half staged_keys[kivi_staged_keys];
  __shared__ std::int64_t staged_slots[kivi_staged_slots];
  KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head) {
    const std::int64_t rc = filling_count(w, head), first = first_of(w, head);
    const std::int64_t sealed = (rc + rows_of(w, head)) / group;
    const head_coordinates coordinates = coordinates_of(w, head);
    for (std::int64_t k = blockIdx.x; k < sealed; k += gridDim.x) {
      const std::int64_t base = k * group;
      if (staged) {
        __syncthreads();  // the previous group's reads are done
        // A warp per key, resolved once (a residual row or the input's row), its channels coalesced:
        // no per-element index arithmetic (64-bit divisions are emulated).
        for (std::int64_t p = threadIdx.x / 32; p < group; p += kivi_threads / 32) {
          const std::int64_t s = base + p;
          __half* staged_row = staged_keys + p * head_dim;
          if (s < rc) {
            const auto* residual = reinterpret_cast<const __half*>(store.residual_keys) + (head * group + s) * head_dim;
            for (std::int64_t d = threadIdx.x % 32; d < head_dim; d += 32) staged_row[d] = residual[d];
          } else {
            const source_row<InT> source = row_of(w, head, s - rc, coordinates);
            for (std::int64_t d = threadIdx.x % 32; d < head_dim; d += 32) staged_row[d] = __float2half_rn(source.key_at(d));
          }
        }
        for (std::int64_t p = threadIdx.x; p < group; p += kivi_threads)
          staged_slots[p] = stream_slot(w, head, rc, first, base + p);
        __syncthreads();
      }
      // The group's key p, channel d (as the residual window holds it), and its slot.
      const auto key = [&](std::int64_t p, std::int64_t d) {
        return staged ? __half2float(staged_keys[p * head_dim + d]) : stream_key(w, head, rc, base + p, d);
      };
      const auto slot_at = [&](std::int64_t p) {
        return staged ? staged_slots[p] : stream_slot(w, head, rc, first, base + p);
      };
      for (std::int64_t pair = threadIdx.x; 2 * pair < head_dim; pair += kivi_threads) {
        const std::int64_t d = 2 * pair;
        float lowest[2] = {__int_as_float(0x7f800000), __int_as_float(0x7f800000)};
        float highest[2] = {-lowest[0], -lowest[1]};
        for (std::int64_t p = 0; p < group; ++p)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = key(p, d + e);
            lowest[e] = fminf(lowest[e], x);
            highest[e] = fmaxf(highest[e], x);
          }
        const typename device::step steps[2] = {device::fit(lowest[0], highest[0], store.asymmetric),
                                                device::fit(lowest[1], highest[1], store.asymmetric)};
        for (std::int64_t p = 0; p < group; ++p) {
          const std::int64_t slot = slot_at(p);
          unsigned q[2];
          device::code_each({key(p, d), key(p, d + 1)}, steps, store.asymmetric, q);
          device::put_pair(store.key_codes + slot * row_bytes, d, q[0], q[1]);
          if (p % run == 0) {
            const std::int64_t at = slot / run * head_dim + d;
            store.key_scales[at] = steps[0].scale, store.key_scales[at + 1] = steps[1].scale;
            if (store.asymmetric) store.key_zeros[at] = steps[0].zero, store.key_zeros[at + 1] = steps[1].zero;
          }
        }
      }
      if (threadIdx.x == 0)
        for (std::int64_t p = 0; p < group; p += run) store.run_sealed[slot_at(p) / run] = 1;
    }
  }
}

template <class View, class InT>
__global__ void __launch_bounds__(kivi_threads) kivi_fill_residual(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  const std::int64_t group = store.key_group, run = store.slot_run, head_dim = store.head_dim;
  auto* residual = reinterpret_cast<__half*>(store.residual_keys);
  for (std::int64_t head = w.target >= 0 ? w.target : std::int64_t{blockIdx.x}; head < w.cache.heads();
       head += w.target >= 0 ? w.cache.heads() : std::int64_t{gridDim.x}) {
    const std::int64_t rc = filling_count(w, head), first = first_of(w, head);
    const std::int64_t total = rc + rows_of(w, head), sealed = total / group, filling = total % group;
    for (std::int64_t p = 0; p < group; ++p) {
      // Place p ends with the new filling group's key p, else (after a seal) the last sealed group's.
      const std::int64_t s = p < filling ? sealed * group + p : sealed > 0 ? (sealed - 1) * group + p : -1;
      if (s < rc) continue;  // nothing written there, or that residual row is already in place
      const std::int64_t slot = slot_of(w, head, first + s - rc);
      for (std::int64_t d = threadIdx.x; d < head_dim; d += kivi_threads)
        residual[(head * group + p) * head_dim + d] = __float2half_rn(source_key(w, head, s - rc, d));
      if (threadIdx.x == 0) {
        store.residual_slots[head * group + p] = slot;
        if (p < filling && slot % run == 0) store.run_sealed[slot / run] = 0;
      }
    }
    __syncthreads();  // every thread has read residual_count before thread 0 rewrites it
    if (threadIdx.x == 0) store.residual_count[head] = filling;
  }
}

// 3'–4'. KIVI key groups at compaction (no filling group before the call), in one kernel: one warp per
// (head, group of key_group rows). Each lane owns eight channels (8·chunk … 8·chunk + 7) of every
// (32 / (head_dim / 8))-th row of the group, read with one 16-byte load (the row copy's pattern), so a row's
// index work, code store and residual copy serve eight channels, not two. Two passes over the group: the
// channels' minimum and maximum (this lane's rows, then shuffles across the sub-warps), then the codes from a
// second read of the rows (from cache: the warp read them just before). The group's rows (their input offsets
// and slots) are resolved once per 32 by the warp's lanes into shared memory. The new filling group (the last
// rows % key_group rows) and the last sealed group write the residual window as kivi_fill_residual does, so
// the result is the CPU's: codes and steps of every sealed group, the filling group's fp16 keys, slots and
// unsealed runs, the rows after it still the last sealed group's, the count.
inline constexpr int kivi_chunk_rows = 32;

/// Channels 8·chunk .. 8·chunk + 7 of a key row rounded to fp16 (as the residual window holds them), packed:
/// one 16-byte load for fp16 inputs (the row and its base aligned: vector_rows).
template <class InT>
__device__ __forceinline__ uint4 key8_half(const InT* key) {
  if constexpr (std::is_same_v<InT, __half>) {
    return __ldg(reinterpret_cast<const uint4*>(key));
  } else {
    float x[8];
    load8(key, x);
    uint4 packed;
    __half2* pairs = reinterpret_cast<__half2*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
    return packed;
  }
}
/// The same for the compensation row (fp32, no alignment promised: element loads).
__device__ __forceinline__ uint4 compensation8_half(const float* key) {
  uint4 packed;
  __half2* pairs = reinterpret_cast<__half2*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(key[2 * i], key[2 * i + 1]);
  return packed;
}
__device__ __forceinline__ void widen_half8(const uint4& packed, float (&out)[8]) {
  const __half2* pairs = reinterpret_cast<const __half2*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __half22float2(pairs[i]);
    out[2 * i] = pair.x, out[2 * i + 1] = pair.y;
  }
}

template <class View, class InT>
__global__ void __launch_bounds__(codec_write_threads) kivi_compact_groups(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  using device = codec_device<typename encoded_codec<typename View::codec>::type>;
  const auto& store = encoded_codec<typename View::codec>::of(w.cache.storage);
  const std::int64_t group = store.key_group, run = store.slot_run, head_dim = store.head_dim;
  const std::int64_t row_bytes = device::quantizer::row_bytes(head_dim);
  constexpr int warps = codec_write_threads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Eight channels per lane: `lanes` lanes cover a row (a power of two ≤ 32, vector_rows), and the warp's
  // `split` = 32 / lanes sub-warps take every split-th row of the group.
  const int lanes = static_cast<int>(head_dim / 8), lanes_log2 = __ffs(lanes) - 1;
  const int split = 32 >> lanes_log2, chunk = lane & (lanes - 1), sub = lane >> lanes_log2;
  __shared__ std::int64_t row_offset[warps][kivi_chunk_rows];  // the input offset of a row (−1: the compensation row)
  __shared__ std::int64_t row_slot[warps][kivi_chunk_rows];
  auto* residual = reinterpret_cast<uint4*>(store.residual_keys);  // 8 halves per lane and row
  KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head) {
    const std::int64_t rows = rows_of(w, head), sealed = rows / group, filling = rows % group;
    const std::int64_t groups = sealed + (filling > 0 ? 1 : 0);
    const head_coordinates at = coordinates_of(w, head);
    for (std::int64_t k = blockIdx.x * std::int64_t{warps} + warp; k < (groups > 0 ? groups : 1);
         k += std::int64_t{gridDim.x} * warps) {
      if (k == 0 && lane == 0) store.residual_count[head] = filling;
      if (k >= groups) break;
      const bool seal = k < sealed;
      const std::int64_t base = k * group, count = seal ? group : filling;
      // Residual places this group leaves: every one of the filling group, those from `filling` on of the
      // last sealed group, none of the others.
      const std::int64_t residual_from = !seal ? 0 : k == sealed - 1 ? filling : group;
      std::int64_t resolved = -1;  // the first row of the 32 in row_offset / row_slot
      unsigned run_starts = 0;     // bit p: row resolved + p starts a slot run (its place ≡ 0 mod run)
      // Rows c0 .. c0 + 31 of the group; `first_visit`: also its slots' metadata (residual slots, run flags).
      const auto resolve = [&](std::int64_t c0, bool first_visit) {
        if (resolved == c0) return;
        __syncwarp();  // the previous rows are read
        const std::int64_t p = c0 + lane;
        const bool starts = p < count && p % run == 0;
        if (p < count) {
          const std::int64_t r = base + p;
          const std::int64_t slot = w.cache.slot(at.b, at.h, r);  // compaction: the head's row r is its index r
          row_slot[warp][lane] = slot;
          row_offset[warp][lane] = at.compensation_row == r ? -1 : source_offset(w, head, r, at);
          if (first_visit) {
            if (p >= residual_from) store.residual_slots[head * group + p] = slot;
            if (starts) store.run_sealed[slot / run] = seal ? 1 : 0;  // the run rule: slot ≡ p (mod run)
          }
        }
        run_starts = __ballot_sync(0xffffffffu, starts);
        resolved = c0;
        __syncwarp();
      };
      // This lane's eight channels of row c0 + p, rounded to fp16.
      const auto key8 = [&](int p) -> uint4 {
        const std::int64_t offset = row_offset[warp][p];
        return offset < 0 ? compensation8_half(w.compensation.keys + head * head_dim + 8 * chunk)
                          : key8_half(w.keys + offset + 8 * chunk);
      };
      const auto chunk_rows = [&](std::int64_t c0) {
        return static_cast<int>(count - c0 < kivi_chunk_rows ? count - c0 : kivi_chunk_rows);
      };
      if (!seal) {  // the filling group: its fp16 keys into the residual window
        for (std::int64_t c0 = 0; c0 < count; c0 += kivi_chunk_rows) {
          resolve(c0, true);
          const int n = chunk_rows(c0);
          for (int p = sub; p < n; p += split) residual[((head * group + c0 + p) * head_dim) / 8 + chunk] = key8(p);
        }
        continue;
      }
      // Pass 1: each channel's minimum and maximum over the group (this lane's rows, then across sub-warps).
      float lowest[8], highest[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) lowest[i] = __int_as_float(0x7f800000), highest[i] = -lowest[i];
      for (std::int64_t c0 = 0; c0 < count; c0 += kivi_chunk_rows) {
        resolve(c0, true);
        const int n = chunk_rows(c0);
        // Four rows' loads in flight before their first use (ncu, H200: one load at a time left this pass
        // waiting on memory, a third of the kernel's stall samples at 24 % occupancy). A place past the
        // chunk reads row p again: harmless for a minimum and a maximum.
        for (int p = sub; p < n; p += 4 * split) {
          uint4 held[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) held[u] = key8(p + u * split < n ? p + u * split : p);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            float x[8];
            widen_half8(held[u], x);
#pragma unroll
            for (int i = 0; i < 8; ++i) lowest[i] = fminf(lowest[i], x[i]), highest[i] = fmaxf(highest[i], x[i]);
          }
        }
      }
      for (int offset = lanes; offset < 32; offset *= 2)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          lowest[i] = fminf(lowest[i], __shfl_xor_sync(0xffffffffu, lowest[i], offset));
          highest[i] = fmaxf(highest[i], __shfl_xor_sync(0xffffffffu, highest[i], offset));
        }
      typename device::step steps[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) steps[i] = device::fit(lowest[i], highest[i], store.asymmetric);
      // Pass 2: the codes (the rows read again, from cache), the steps at run starts, the residual rows.
      for (std::int64_t c0 = 0; c0 < count; c0 += kivi_chunk_rows) {
        resolve(c0, false);
        const int n = chunk_rows(c0);
        uint4 next = sub < n ? key8(sub) : uint4{};  // the next row's load in flight while this one is coded
        for (int p = sub; p < n; p += split) {
          const uint4 packed = next;
          if (p + split < n) next = key8(p + split);
          float x[8];
          widen_half8(packed, x);
          unsigned q[8];
          device::code_each(x, steps, store.asymmetric, q);
          const std::int64_t slot = row_slot[warp][p], place = c0 + p;
          device::put8(store.key_codes + slot * row_bytes, chunk, q);
          if (run_starts >> p & 1u) {
            const std::int64_t to = slot / run * head_dim + 8 * chunk;
            auto* scales = reinterpret_cast<float4*>(store.key_scales + to);
            scales[0] = make_float4(steps[0].scale, steps[1].scale, steps[2].scale, steps[3].scale);
            scales[1] = make_float4(steps[4].scale, steps[5].scale, steps[6].scale, steps[7].scale);
            if (store.asymmetric) {
              auto* zeros = reinterpret_cast<float4*>(store.key_zeros + to);
              zeros[0] = make_float4(steps[0].zero, steps[1].zero, steps[2].zero, steps[3].zero);
              zeros[1] = make_float4(steps[4].zero, steps[5].zero, steps[6].zero, steps[7].zero);
            }
          }
          if (place >= residual_from) residual[((head * group + place) * head_dim) / 8 + chunk] = packed;
        }
      }
    }
  }
}

// 5. layered<C>'s fp16 rows, one block per head. The CPU gives token o (its
// order since compaction) row o when o < sinks, else sinks + (o − sinks) mod
// recent, and once the ring is full clears the slot → row entry of the row's
// previous occupant (if it still points there) before taking the row. Only the
// first sinks + 2·recent tokens of a call can displace an occupant from before
// the call (stale entries included): thread 0 replays those in order. Every
// later token displaces a token of this call, which therefore ends at −1, so
// the rest is parallel: a token keeps its row iff no later token of the call
// takes it, and the rows' bytes are their last writers'.
inline constexpr int layered_threads = 128;

template <class View, class InT>
__global__ void __launch_bounds__(layered_threads) layered_rows(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  const auto& store = w.cache.storage;
  const std::int64_t sinks = store.sinks, recent = store.recent, rows = sinks + recent, head_dim = store.head_dim;
  auto* row_keys = reinterpret_cast<__half*>(store.row_keys);
  auto* row_values = reinterpret_cast<__half*>(store.row_values);
  const auto row_of_order = [&](std::int64_t order) -> std::int64_t {
    return order < sinks ? order : recent > 0 ? sinks + (order - sinks) % recent : -1;
  };
  for (std::int64_t head = w.target >= 0 ? w.target : std::int64_t{blockIdx.x}; head < w.cache.heads();
       head += w.target >= 0 ? w.cache.heads() : std::int64_t{gridDim.x}) {
    const std::int64_t arrived = is_compaction(w) ? 0 : store.arrived[head];
    const std::int64_t count = rows_of(w, head), first = first_of(w, head), end = arrived + count;
    const std::int64_t replayed = end < arrived + sinks + 2 * recent ? end : arrived + sinks + 2 * recent;
    std::int64_t* row_slots = store.row_slots + head * rows;
    if (threadIdx.x == 0)
      for (std::int64_t order = arrived; order < replayed; ++order) {
        const std::int64_t row = row_of_order(order), slot = slot_of(w, head, first + order - arrived);
        if (row >= sinks && order - sinks >= recent) {
          const std::int64_t leaving = row_slots[row];  // −1: a row truncate freed (the CPU's check)
          if (leaving >= 0 && store.slot_rows[leaving] == row) store.slot_rows[leaving] = -1;
        }
        store.slot_rows[slot] = static_cast<std::int32_t>(row);
        if (row >= 0) row_slots[row] = slot;
      }
    __syncthreads();
    for (std::int64_t order = replayed + threadIdx.x; order < end; order += layered_threads) {
      const std::int64_t row = row_of_order(order), slot = slot_of(w, head, first + order - arrived);
      const bool stays = row >= 0 && order + recent >= end;
      store.slot_rows[slot] = stays ? static_cast<std::int32_t>(row) : -1;
      if (stays) row_slots[row] = slot;
    }
    // Replayed tokens that a later token of the call displaced.
    for (std::int64_t order = (replayed - recent > arrived ? replayed - recent : arrived) + threadIdx.x; order < replayed;
         order += layered_threads)
      if (order >= sinks && recent > 0 && order + recent < end)
        store.slot_rows[slot_of(w, head, first + order - arrived)] = -1;
    // The rows' bytes: their last writers' (sinks, and the ring's last `recent` tokens).
    const std::int64_t ring_first = end - recent > sinks ? end - recent : sinks;
    for (std::int64_t order = arrived; order < end; ++order) {
      const bool written = order < sinks || (recent > 0 && order >= ring_first);
      if (!written) {
        if (order < ring_first) order = ring_first - 1;  // skip to the ring's survivors
        continue;
      }
      const std::int64_t at = (head * rows + row_of_order(order)) * head_dim;
      const source_row<InT> source = row_of(w, head, order - arrived);
      for (std::int64_t d = threadIdx.x; d < head_dim; d += layered_threads) {
        row_keys[at + d] = __float2half_rn(source.key_at(d));
        row_values[at + d] = __float2half_rn(source.value_at(d));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) store.arrived[head] = end;
  }
}

/// The quantizing codecs' write steps for `rows_bound` (a host-known bound on
/// any head's rows) rows per head.
template <class View, class InT>
void launch_quantized_writes(std::string_view function, const codec_write<View, InT>& w, std::int64_t rows_bound,
                         cudaStream_t stream) {
  using encoded = encoded_codec<typename View::codec>;
  using device = codec_device<typename encoded::type>;
  const auto& inner = encoded::of(w.cache.storage);
  const bool compaction = w.kept_offsets != nullptr;
  const std::int64_t heads = w.target >= 0 ? 1 : w.cache.heads();
  const auto head_blocks = static_cast<unsigned>(std::min<std::int64_t>(heads, 65535));
  if (rows_bound <= 0 && !compaction) return;
  // The 16-byte kernels (codec_encode_rows8, codec_head_amax8, kivi_compact_groups) unless the inputs are not
  // aligned for them (or a benchmark asks for the element kernels: legacy_codec_encode).
  const bool vector = !legacy_codec_encode && vector_rows(w);
  if constexpr (device::head_scales) {
    if (compaction && device::head_amax(inner)) {
      using storage_type = std::remove_cvref_t<decltype(inner)>;
      const auto head_grid = static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(heads, 256), 1, 1024));
      fp8_mark_scales<storage_type><<<head_grid, 256, 0, stream>>>(inner);
      detail::check_launch(function, "fp8_mark_scales");
      const dim3 grid(
          static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(rows_bound * w.cache.shape.head_dim, 16 * 256), 1, 1024)),
          head_blocks);
      if (vector) {
        const std::int64_t per_block = codec_write_threads / (w.cache.shape.head_dim / 8);  // rows per pass of a block
        const dim3 vector_grid(
            static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(rows_bound, 4 * per_block), 1, 1024)), head_blocks);
        codec_head_amax8<View, InT><<<vector_grid, codec_write_threads, 0, stream>>>(w);
        detail::check_launch(function, "codec_head_amax8");
      } else {
        codec_head_amax<View, InT><<<grid, codec_write_threads, 0, stream>>>(w);
        detail::check_launch(function, "codec_head_amax");
      }
      fp8_finish_scales<storage_type><<<head_grid, 256, 0, stream>>>(inner);
      detail::check_launch(function, "fp8_finish_scales");
    }
  }
  constexpr int warps = codec_write_threads / 32;
  if (rows_bound > 0 && vector) {
    const std::int64_t per_block = codec_write_threads / (w.cache.shape.head_dim / 8);  // rows per pass of a block
    const dim3 grid(
        static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(rows_bound, rows8_passes * per_block), 1, 4096)),
        head_blocks);
    codec_encode_rows8<View, InT><<<grid, codec_write_threads, 0, stream>>>(w);
    detail::check_launch(function, "codec_encode_rows8");
  } else if (rows_bound > 0) {
    const dim3 grid(static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(rows_bound, warps), 1, 4096)), head_blocks);
    codec_encode_rows<View, InT><<<grid, codec_write_threads, 0, stream>>>(w);
    detail::check_launch(function, "codec_encode_rows");
  }
  if constexpr (device::key_groups) {
    if (inner.key_group > 0 && compaction && vector && w.cache.shape.head_dim % 64 == 0) {
      // One warp per (head, group); a head with no rows still gets one (its residual count).
      const std::int64_t groups = std::max<std::int64_t>(ceil_div(rows_bound, inner.key_group), 1);
      const dim3 grid(static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(groups, warps), 1, 4096)), head_blocks);
      kivi_compact_groups<View, InT><<<grid, codec_write_threads, 0, stream>>>(w);
      detail::check_launch(function, "kivi_compact_groups");
    } else if (inner.key_group > 0) {
      const std::int64_t group = inner.key_group;
      // Groups sealed per head: at most (rc + rows) / G with rc < G.
      const dim3 grid(static_cast<unsigned>(std::clamp<std::int64_t>((rows_bound + group - 1) / group, 1, 4096)),
                      head_blocks);
      kivi_seal_groups<View, InT><<<grid, kivi_threads, 0, stream>>>(w);
      detail::check_launch(function, "kivi_seal_groups");
      kivi_fill_residual<View, InT><<<head_blocks, kivi_threads, 0, stream>>>(w);
      detail::check_launch(function, "kivi_fill_residual");
    }
  }
  if constexpr (is_layered<typename View::codec>) {
    layered_rows<View, InT><<<head_blocks, layered_threads, 0, stream>>>(w);
    detail::check_launch(function, "layered_rows");
  }
}

/// Launches the codec's write steps for `rows_bound` (a host-known bound on
/// any head's rows) rows per head.
template <class View, class InT>
void launch_codec_writes(std::string_view function, const codec_write<View, InT>& w, std::int64_t rows_bound,
                         cudaStream_t stream) {
  if constexpr (is_low_rank<typename View::codec>)
    launch_low_rank_writes(function, w, rows_bound, stream);
  else
    launch_quantized_writes(function, w, rows_bound, stream);
}

/// The codec_write of one call.
template <class View, class KeyT>
codec_write<View, device_element_t<KeyT>> make_codec_write(const View& cache, const kv_view<KeyT, device_space>& keys,
                                                           const kv_view<KeyT, device_space>& values,
                                                           const std::int64_t* kept_offsets,
                                                           const std::int32_t* kept_tokens,
                                                           const detail::compensation_rows* compensation,
                                                           std::int64_t start_position, std::int64_t count,
                                                           std::int64_t target, std::int64_t first_row,
                                                           std::int64_t next_shift) {
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
          target,
          first_row,
          next_shift};
}

// ---- a freshly bound device cache -------------------------------------------

/// What codec::bind does to host memory, on the device: fp8 scales set to the
/// config's, KIVI runs unsealed and no head's group filling.
template <class CodecT>
__global__ void codec_reset(const typename CodecT::template storage<device_space> store) {
  const std::int64_t first = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  if constexpr (is_layered<CodecT>) {
    for (std::int64_t slot = first; slot < store.slots; slot += stride) store.slot_rows[slot] = -1;
    for (std::int64_t head = first; head < store.heads; head += stride) store.arrived[head] = 0;
  } else if constexpr (std::is_same_v<CodecT, codec::fp8>) {
    for (std::int64_t head = first; head < store.heads; head += stride) {
      store.key_scales[head] = store.initial_key_scale;
      store.value_scales[head] = store.initial_value_scale;
    }
  } else {
    if (store.key_group == 0) return;
    for (std::int64_t run = first; run < store.slots / store.slot_run; run += stride) store.run_sealed[run] = 0;
    for (std::int64_t head = first; head < store.heads; head += stride) store.residual_count[head] = 0;
  }
}

/// Called by every layout's device reset (a construction, not a hot path).
template <class CodecT>
void reset_codec_storage(std::string_view function, const typename CodecT::template storage<device_space>& store,
                         cudaStream_t stream) {
  if constexpr (is_low_rank<CodecT>) {
    launch_low_rank_reset(function, store, stream);
  } else if constexpr (device_encoded_codec<CodecT>) {
    if constexpr (is_layered<CodecT>) reset_codec_storage<typename CodecT::inner_codec>(function, store.inner, stream);
    codec_reset<CodecT><<<256, 256, 0, stream>>>(store);
    detail::check_launch(function, "codec_reset");
  } else {
    (void)function, (void)store, (void)stream;
  }
}

// ---- layout::flat's repack of codec storage ---------------------------------

/// A stored token of a quantizing codec, as stored, in 16-byte parts for
/// grid_move: its key and value codes (4-byte words, one per part), its
/// position and per-token steps, and — when the slot starts a slot run of KIVI
/// keys — the run's key scales (zero points) and sealed flag (parts of a slot
/// that starts no run carry nothing). The CPU's move_slot, field for field.
template <class CodecT>
struct codec_slot_mover {
  typename CodecT::template storage<device_space> st;
  std::int32_t* slot_position;  // null: the caller moves positions itself (the eviction step)

  static constexpr bool quantized = !std::is_same_v<CodecT, codec::fp8>;
  __device__ std::int64_t row_bytes() const {
    if constexpr (quantized)
      return CodecT::quantizer::row_bytes(st.head_dim);
    else
      return st.head_dim;
  }
  __device__ std::int64_t words() const { return row_bytes() / 4; }
  __device__ bool grouped() const {
    if constexpr (quantized)
      return st.key_group > 0;
    else
      return false;
  }
  __device__ std::int64_t run_parts() const {
    if constexpr (quantized)
      return grouped() ? st.head_dim / 4 * (st.asymmetric ? 2 : 1) + 1 : 0;
    else
      return 0;
  }
  __device__ std::int64_t parts() const { return 2 * words() + 2 + run_parts(); }

  __device__ uint4 load(std::int64_t slot, std::int64_t part) const {
    const std::int64_t w = words();
    if (part < 2 * w) {
      const std::uint8_t* base = part < w ? st.key_codes : st.value_codes;
      return make_uint4(reinterpret_cast<const unsigned*>(base + slot * row_bytes())[part % w], 0u, 0u, 0u);
    }
    part -= 2 * w;
    if (part == 0) {
      uint4 meta = make_uint4(slot_position ? static_cast<unsigned>(slot_position[slot]) : 0u, 0u, 0u, 0u);
      if constexpr (quantized) {
        meta.y = __float_as_uint(st.value_scales[slot]);
        if (st.asymmetric) meta.z = __float_as_uint(st.value_zeros[slot]);
        if (!grouped()) meta.w = __float_as_uint(st.key_scales[slot]);
      }
      return meta;
    }
    if (part == 1) {
      if constexpr (quantized)
        if (!grouped() && st.asymmetric) return make_uint4(__float_as_uint(st.key_zeros[slot]), 0u, 0u, 0u);
      return make_uint4(0u, 0u, 0u, 0u);
    }
    if constexpr (quantized) {
      part -= 2;
      if (slot % st.slot_run != 0) return make_uint4(0u, 0u, 0u, 0u);
      const std::int64_t r = slot / st.slot_run;
      if (part == run_parts() - 1) return make_uint4(st.run_sealed[r], 0u, 0u, 0u);
      const float* source = part < st.head_dim / 4 ? st.key_scales : st.key_zeros;
      return reinterpret_cast<const uint4*>(source + r * st.head_dim)[part % (st.head_dim / 4)];
    }
    return make_uint4(0u, 0u, 0u, 0u);
  }
  __device__ void store_part(std::int64_t slot, std::int64_t part, uint4 value) const {
    const std::int64_t w = words();
    if (part < 2 * w) {
      std::uint8_t* base = part < w ? st.key_codes : st.value_codes;
      reinterpret_cast<unsigned*>(base + slot * row_bytes())[part % w] = value.x;
      return;
    }
    part -= 2 * w;
    if (part == 0) {
      if (slot_position) slot_position[slot] = static_cast<std::int32_t>(value.x);
      if constexpr (quantized) {
        st.value_scales[slot] = __uint_as_float(value.y);
        if (st.asymmetric) st.value_zeros[slot] = __uint_as_float(value.z);
        if (!grouped()) st.key_scales[slot] = __uint_as_float(value.w);
      }
      return;
    }
    if (part == 1) {
      if constexpr (quantized)
        if (!grouped() && st.asymmetric) st.key_zeros[slot] = __uint_as_float(value.x);
      return;
    }
    if constexpr (quantized) {
      part -= 2;
      if (slot % st.slot_run != 0) return;
      const std::int64_t r = slot / st.slot_run;
      if (part == run_parts() - 1) {
        st.run_sealed[r] = static_cast<std::uint8_t>(value.x);
        return;
      }
      float* target = part < st.head_dim / 4 ? st.key_scales : st.key_zeros;
      reinterpret_cast<uint4*>(target + r * st.head_dim)[part % (st.head_dim / 4)] = value;
    }
  }
  // grid_move's interface.
  __device__ void store(std::int64_t slot, std::int64_t part, uint4 value) const { store_part(slot, part, value); }

  /// After head `head`'s tokens moved from [from, from + length) to [to, …):
  /// the slots its filling group remembers move with them (move_slot's fix-up).
  __device__ void moved(std::int64_t head, std::int64_t from, std::int64_t to, std::int64_t length) const {
    if constexpr (quantized) {
      if (!grouped() || from == to) return;
      std::int64_t* slots = st.residual_slots + head * st.key_group;
      for (std::int64_t p = 0; p < st.residual_count[head]; ++p)
        if (slots[p] >= from && slots[p] < from + length) slots[p] += to - from;
    } else {
      (void)head, (void)from, (void)to, (void)length;
    }
  }
};

/// layered<C>: C's parts, then one with the slot's fp16 row (−1: none), which
/// follows the slot; the row then remembers its new slot (moved), as the CPU's
/// move_slot (row_slots[row] = to for a slot that holds a row).
template <class Inner>
struct codec_slot_mover<codec::layered<Inner>> {
  codec_slot_mover<Inner> inner;
  std::int32_t* slot_rows;
  std::int64_t* row_slots;
  std::int64_t rows;

  __host__ __device__ codec_slot_mover(const typename codec::layered<Inner>::template storage<device_space>& store,
                   std::int32_t* slot_position)
      : inner{store.inner, slot_position}, slot_rows(store.slot_rows), row_slots(store.row_slots),
        rows(store.sinks + store.recent) {}

  __device__ std::int64_t parts() const { return inner.parts() + 1; }
  __device__ uint4 load(std::int64_t slot, std::int64_t part) const {
    if (part < inner.parts()) return inner.load(slot, part);
    return make_uint4(static_cast<unsigned>(slot_rows[slot]), 0u, 0u, 0u);
  }
  __device__ void store(std::int64_t slot, std::int64_t part, uint4 value) const {
    if (part < inner.parts()) return inner.store(slot, part, value);
    slot_rows[slot] = static_cast<std::int32_t>(value.x);
  }
  __device__ void moved(std::int64_t head, std::int64_t from, std::int64_t to, std::int64_t length) const {
    inner.moved(head, from, to, length);
    if (from == to) return;
    for (std::int64_t row = 0; row < rows; ++row) {
      std::int64_t& slot = row_slots[head * rows + row];
      if (slot >= from && slot < from + length && slot_rows[slot - from + to] == row) slot += to - from;
    }
  }
};

}  // namespace kvtrim::cuda_detail

// codec::low_rank's device encode and decode use the write helpers above.
#include "kvtrim/backend/cuda/codec_low_rank.cuh"
