// kvtrim/backend/cuda/codec_fp8.cuh — codec::fp8 (OCP e4m3fn, one scale per
// head for keys and one for values) on the GPU: the device encode the write
// paths call, and the reader decode attention dequantizes its tiles with.
//
// Encode: c = e4m3(x / s) with the hardware conversion (cvt.rn.satfinite.e4m3x2.f32
// through cuda_fp8.h's __nv_cvt_float_to_fp8 with __NV_SATFINITE): round to
// nearest even, finite values beyond ±448 saturate to ±448 — the CPU's
// detail::to_e4m3 on every finite input (tests/cuda/codecs_test.cu checks
// every e4m3 value, the midpoints between neighbours and their float
// neighbours, the saturation range, signed zeros and fp32 subnormals). The
// converted float is detail::e4m3_quotient (codec/fp8.hpp): the product
// x · inv with inv = __frcp_rn(s) (detail::e4m3_inverse, once per head and
// row), or the IEEE division __fdiv_rn(x, s) (the host's `/`) where the
// product lies within 8 ulps of an e4m3 midpoint (2⁻¹⁶ of the subnormal step
// below 2⁻⁶) or is not finite (e4m3x8: all eight divided when one is; no test at
// all under a power-of-two scale, whose inverse is exact) — fp8.hpp derives why the codes then equal
// to_e4m3(x / s), so the stored bytes equal the CPU's (tests/cuda/codecs_test.cu,
// Fp8Conversion.ProductWithReciprocalMatchesCpuDivision). NaN: the CPU refuses it
// (kvtrim::error); the device cannot throw from a kernel and stores the
// conversion's NaN code 0x7F (as does a scale of 0 with x = 0).
// Scales (fp8_scaling::head_amax): at compaction each head's scale becomes
// max|x| / 448 over its kept rows (the division in double, rounded to float,
// at least 2⁻¹²⁶: detail::e4m3_head_scale, the CPU's own call), an all-zero
// head keeping its scale; fixed scales are left as bound (a subnormal one is
// legal: its reciprocal is not normal, so every element takes the division).
// Decode: x̂ = e4m3→f32(c) · s, the exact conversion then one rounding, as the CPU.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/fp8.hpp"

namespace kvtrim::cuda_detail {

/// The nearest e4m3fn code of x (ties to even), saturating beyond ±448.
__device__ __forceinline__ std::uint8_t e4m3_of(float x) {
  return static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

/// The value of e4m3fn code c (exact).
__device__ __forceinline__ float e4m3_value(std::uint8_t c) {
  const __half_raw raw = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E4M3);
  return __half2float(__half(raw));
}

template <class CodecT>
struct codec_device;

template <>
struct codec_device<codec::fp8> {
  using storage = codec::fp8::storage<device_space>;
  static constexpr bool key_groups = false;
  static constexpr bool head_scales = true;

  static bool head_amax(const storage& store) { return store.head_amax; }

  /// Row-wise encode, one warp per token: this lane's `pairs` channel pairs
  /// (channels 2·lane + 64·j, + 1) of the key and the value.
  __device__ static void encode_row(const storage& store, std::int64_t head, std::int64_t slot, int lane, int pairs,
                                    const float (&key)[8], const float (&value)[8]) {
    const float key_scale = store.key_scales[head], value_scale = store.value_scales[head];
    const float key_inverse = detail::e4m3_inverse(key_scale), value_inverse = detail::e4m3_inverse(value_scale);
    std::uint8_t* key_row = store.key_codes + slot * store.head_dim;
    std::uint8_t* value_row = store.value_codes + slot * store.head_dim;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < pairs) {
        const std::int64_t d = 2 * lane + 64 * j;
        key_row[d] = e4m3_of(detail::e4m3_quotient(key[2 * j], key_scale, key_inverse));
        key_row[d + 1] = e4m3_of(detail::e4m3_quotient(key[2 * j + 1], key_scale, key_inverse));
        value_row[d] = e4m3_of(detail::e4m3_quotient(value[2 * j], value_scale, value_inverse));
        value_row[d + 1] = e4m3_of(detail::e4m3_quotient(value[2 * j + 1], value_scale, value_inverse));
      }
  }

  /// encode_row for the 16-byte row kernel (codec_encode_rows8): channels 8·chunk .. 8·chunk + 7 of the key
  /// and the value, converted two at a time (cvt.rn.satfinite.e4m3x2.f32, the instruction e4m3_of uses for
  /// one: the same code per element; the first element in the low byte), each row's eight codes one store.
  __device__ __forceinline__ static void encode8(const storage& store, std::int64_t head, std::int64_t slot,
                                                 int /*lanes*/, int chunk, bool active, const float (&key)[8],
                                                 const float (&value)[8]) {
    if (!active) return;
    const float key_scale = store.key_scales[head], value_scale = store.value_scales[head];
    *reinterpret_cast<uint2*>(store.key_codes + slot * store.head_dim + 8 * chunk) =
        e4m3x8(key, key_scale, detail::e4m3_inverse(key_scale));
    *reinterpret_cast<uint2*>(store.value_codes + slot * store.head_dim + 8 * chunk) =
        e4m3x8(value, value_scale, detail::e4m3_inverse(value_scale));
  }
  /// The codes of x[i] / scale (the CPU's), packed in memory order: the eight products with 1/scale, or — when
  /// any of them lies near an e4m3 midpoint (detail::e4m3_product_decides) — the eight IEEE quotients. One
  /// branch for the eight, as codec_device<quantized>::code_each: a branch per element cost more than the
  /// division it saved there (H200, 2026-12-03). Under a power-of-two scale the products are the quotients
  /// (an exact inverse) and nothing is tested. inverse: detail::e4m3_inverse(scale).
  __device__ __forceinline__ static uint2 e4m3x8(const float (&x)[8], float scale, float inverse) {
    float quotient[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) quotient[i] = __fmul_rn(x[i], inverse);  // detail::e4m3_quotient's product: never contracted
    // A power-of-two scale (fixed scales usually are; 1.0 is the default) has an exact inverse, so each
    // product is the correctly rounded x / scale itself — the quotient — and needs no test (the branch is the
    // same for the whole warp: one head). Without this, fp16 inputs under scale 1 sit exactly on e4m3
    // midpoints one time in 128 (their 4th–10th mantissa bits 1000000), and most warps divided.
    const bool exact = (__float_as_uint(scale) & 0x7FFFFFu) == 0u && inverse == inverse;
    if (!exact) {
      bool decided = true;
#pragma unroll
      for (int i = 0; i < 8; ++i) decided &= detail::e4m3_product_decides(quotient[i]);
      if (!decided) {
#pragma unroll
        for (int i = 0; i < 8; ++i) quotient[i] = __fdiv_rn(x[i], scale);
      }
    }
    unsigned words[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const unsigned low = __nv_cvt_float2_to_fp8x2(make_float2(quotient[4 * w], quotient[4 * w + 1]),
                                                    __NV_SATFINITE, __NV_E4M3);
      const unsigned high = __nv_cvt_float2_to_fp8x2(make_float2(quotient[4 * w + 2], quotient[4 * w + 3]),
                                                     __NV_SATFINITE, __NV_E4M3);
      words[w] = low | high << 16;
    }
    return make_uint2(words[0], words[1]);
  }

  // ---- decode attention's reader ----------------------------------------
  using stored = std::uint8_t;
  template <int HeadDim>
  static constexpr int row_elements = HeadDim;  // one byte per channel
  __host__ __device__ static const stored* key_rows(const storage& store) { return store.key_codes; }
  __host__ __device__ static const stored* value_rows(const storage& store) { return store.value_codes; }

  /// The per-head state a block reads once per segment.
  struct reader {
    float key_scale, value_scale;
    /// Channels first_dim .. first_dim + 7 of a staged key row.
    template <class Rows>
    __device__ __forceinline__ void key(const stored* row, int first_dim, std::int64_t, const Rows&,
                                        float (&out)[8]) const {
      decode8(row + first_dim, key_scale, out);
    }
    template <class Rows>
    __device__ __forceinline__ void value(const stored* row, int first_dim, std::int64_t, const Rows&,
                                          float (&out)[8]) const {
      decode8(row + first_dim, value_scale, out);
    }
    /// Two codes per conversion (cvt.rn.f16x2.e4m3x2: exact), then one rounding by the scale.
    __device__ __forceinline__ static void decode8(const stored* codes, float scale, float (&out)[8]) {
      const uint2 raw = *reinterpret_cast<const uint2*>(codes);
      const unsigned words[2] = {raw.x, raw.y};
#pragma unroll
      for (int w = 0; w < 2; ++w)
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
          const __half2_raw halves = __nv_cvt_fp8x2_to_halfraw2(
              static_cast<__nv_fp8x2_storage_t>(words[w] >> (16 * pair)), __NV_E4M3);
          const float2 values = __half22float2(__half2(halves));
          out[4 * w + 2 * pair] = values.x * scale;
          out[4 * w + 2 * pair + 1] = values.y * scale;
        }
    }
  };
  __device__ static reader open(const storage& store, std::int64_t head) {
    return {store.key_scales[head], store.value_scales[head]};
  }
};

}  // namespace kvtrim::cuda_detail
