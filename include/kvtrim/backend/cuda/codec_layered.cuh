// kvtrim/backend/cuda/codec_layered.cuh — codec::layered<C> (fp16 sinks and
// newest tokens over a quantizing codec C) on the GPU: decode attention's
// reader. Its device encode (C's, then the fp16 rows) is layered_rows in
// codec_writes.cuh.
//
// Decode: a token whose slot maps to an fp16 row (slot_rows[slot] ≥ 0) is read
// from that row, every other token through C's reader, as the CPU's
// load_key / load_value. Inner codecs with pre-RoPE keys (low_rank) have no
// device support, so rows need no rotation here.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kvtrim/backend/cuda/codec_fp8.cuh"
#include "kvtrim/backend/cuda/codec_quantized.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/layered.hpp"

namespace kvtrim::cuda_detail {

template <class CodecT>
struct codec_device;

template <class Inner>
struct codec_device<codec::layered<Inner>> {
  using storage = typename codec::layered<Inner>::template storage<device_space>;
  using inner_device = codec_device<Inner>;
  using stored = typename inner_device::stored;
  template <int HeadDim>
  static constexpr int row_elements = inner_device::template row_elements<HeadDim>;
  __host__ __device__ static const stored* key_rows(const storage& store) { return inner_device::key_rows(store.inner); }
  __host__ __device__ static const stored* value_rows(const storage& store) {
    return inner_device::value_rows(store.inner);
  }

  struct reader {
    typename inner_device::reader inner;
    const std::int32_t* slot_rows;
    const __half* row_keys;    // the head's rows: [sinks + recent, head_dim]
    const __half* row_values;
    std::int64_t head_dim;

    __device__ __forceinline__ static void widen_row(const __half* row, float (&out)[8]) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row));
      const auto* halves = reinterpret_cast<const __half*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = __half2float(halves[i]);
    }
    template <class Rows>
    __device__ __forceinline__ void key(const stored* row, int first_dim, std::int64_t token, const Rows& rows,
                                        float (&out)[8]) const {
      const std::int32_t fp16_row = __ldg(slot_rows + rows.slot(token));
      if (fp16_row >= 0)
        widen_row(row_keys + fp16_row * head_dim + first_dim, out);
      else
        inner.key(row, first_dim, token, rows, out);
    }
    template <class Rows>
    __device__ __forceinline__ void value(const stored* row, int first_dim, std::int64_t token, const Rows& rows,
                                          float (&out)[8]) const {
      const std::int32_t fp16_row = __ldg(slot_rows + rows.slot(token));
      if (fp16_row >= 0)
        widen_row(row_values + fp16_row * head_dim + first_dim, out);
      else
        inner.value(row, first_dim, token, rows, out);
    }
  };
  __device__ static reader open(const storage& store, std::int64_t head) {
    const std::int64_t first_row = head * (store.sinks + store.recent) * store.head_dim;
    return {inner_device::open(store.inner, head), store.slot_rows,
            reinterpret_cast<const __half*>(store.row_keys) + first_row,
            reinterpret_cast<const __half*>(store.row_values) + first_row, store.head_dim};
  }
};

}  // namespace kvtrim::cuda_detail
