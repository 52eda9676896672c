// kvtrim/backend/cuda/codec_quantized.cuh — codec::int8 and codec::int4 (KIVI
// per-channel key groups with an fp16 residual window, or per-token keys;
// per-token values; symmetric or zero-point) on the GPU: the quantization
// steps the device write paths use (codec_writes.cuh) and the reader decode
// attention dequantizes its tiles with.
//
// Same arithmetic as the CPU (codec/int8.hpp), operation for operation, so the
// stored bytes are identical: a run's minimum and maximum (exact in any
// order), the scale as one IEEE division (__fdiv_rn, as the host's `/`),
// codes rint(x / s) or rint((x − z) / s) (round half to even, as
// std::nearbyint in the default rounding mode), clamped to the code range —
// the quotient taken as the product with 1/s where that rounds alike, else
// the IEEE division (code_each; integer_quantizer::rounded_quotient's proof);
// KIVI keys are rounded to fp16 (round to nearest even, as Eigen::half) before
// their group is fitted. int4 stores two codes per byte (low nibble: even
// channel): the device writes whole bytes from channel pairs, which is the
// CPU's read-modify-write of both nibbles.
// Decode: x̂ = (q − offset)·s + z (an fma; the CPU's integer_quantizer::value
// rounds the same product and sum, at most once more).
// A key of a run not yet sealed is read from the head's fp16 residual window
// at place (logical index mod key_group): a head's key groups are its logical
// tokens [kG, (k+1)G) since its compaction (codec/int8.hpp), and the filling
// group is the last one.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/int4.hpp"
#include "kvtrim/codec/int8.hpp"

namespace kvtrim::cuda_detail {

template <class CodecT>
struct codec_device;

template <int Bits>
struct codec_device<codec::quantized<Bits>> {
  using storage = typename codec::quantized<Bits>::template storage<device_space>;
  using quantizer = detail::integer_quantizer<Bits>;
  /// The CPU's step (scale, zero point) and 1 / scale, which turns code()'s division per channel into a product.
  struct step {
    float scale = 0.0f;
    float zero = 0.0f;
    float inverse = 0.0f;  // __frcp_rn(scale); 0 when scale is 0: the product is then 0 (the zero code), or NaN (divides)
  };
  static constexpr int bits = Bits;
  static constexpr bool key_groups = true;  // when the storage's key_group > 0
  static constexpr bool head_scales = false;

  // ---- quantization steps (the CPU's fit and code) ---------------------------
  __device__ __forceinline__ static step fit(float lowest, float highest, bool asymmetric) {
    const float scale = asymmetric ? __fdiv_rn(highest - lowest, static_cast<float>(quantizer::levels))
                                   : __fdiv_rn(fmaxf(fabsf(lowest), fabsf(highest)), static_cast<float>(quantizer::symmetric_max));
    return {scale, asymmetric ? lowest : 0.0f, scale != 0.0f ? __frcp_rn(scale) : 0.0f};
  }
  /// The CPU's code() of n numbers, each with its step: x · (1/s) rounded where that equals rounding the quotient
  /// (integer_quantizer::product_decides), else — if any of the n is near a tie — every quotient by the IEEE
  /// division. One branch for the lot, not one per number: a branch (and the division's call) per number costs
  /// more than the division saved (W 32k int8 encode 2624 µs against 1796 µs with the division, H200 2026-12-03).
  ///
  /// Branch-free otherwise, because ncu showed the encode kernels issue-bound (H200, 2026-12-03: 450 warp
  /// instructions per 8 codes a lane; ~20 per code in a floor-based tie test and in the rounding, clamp and
  /// conversion, each behind a branch on `asymmetric`). Per number now:
  ///  - e = (x − z) · (1/s): z is 0 for symmetric steps, and x − 0 = x exactly, so one expression for both;
  ///  - the tie test integer_quantizer::product_decides for the batch at once: max |e − rint(e)| < ½ − 2⁻¹²
  ///    (rint by nearest_integer's 1.5·2²³ addition), accumulated with max.NaN so a NaN e (0 · ∞) sends the
  ///    batch to the division, and max |e| < 1024;
  ///  - the code as the low bits of the float clamp(e, lo, hi) + 1.5·2²³ + offset: rounding to nearest even
  ///    in that addition is rint, and rint(clamp(e)) = clamp(rint(e)) since lo and hi are integers (a NaN
  ///    clamps to lo in both orders, fmaxf dropping it) — the CPU's clamp(nearbyint(e)) + offset. A zero step
  ///    (every number equal to the zero point, or a scale that underflowed) has 1/s = 0 and e = 0 → the zero
  ///    code, and in the division branch its quotient is taken as 0, as the CPU's `scale == 0` return.
  template <int N>
  __device__ __forceinline__ static void code_each(const float (&x)[N], const step (&s)[N], bool asymmetric,
                                               unsigned (&q)[N]) {
    constexpr float round_magic = quantizer::round_magic;  // x + it, rounded, has rint(x) in its low bits
    float estimate[N];
    float farthest = 0.0f, largest = 0.0f;  // max |e − rint(e)| (NaN if any e is), max |e|
#pragma unroll
    for (int i = 0; i < N; ++i) {
      estimate[i] = __fmul_rn(__fsub_rn(x[i], s[i].zero), s[i].inverse);  // never contracted: the proof's product
      const float nearest = quantizer::nearest_integer(estimate[i]);
      farthest = max_nan(farthest, fabsf(__fsub_rn(estimate[i], nearest)));
      largest = fmaxf(largest, fabsf(estimate[i]));
    }
    // farthest < ½ − 2⁻¹² is false for NaN.
    if (!(farthest < 0.5f - 0x1p-12f && largest < 1024.0f)) {
#pragma unroll
      for (int i = 0; i < N; ++i)
        estimate[i] = s[i].scale == 0.0f ? 0.0f : rintf(__fdiv_rn(__fsub_rn(x[i], s[i].zero), s[i].scale));
    }
    const float lowest = asymmetric ? 0.0f : -static_cast<float>(quantizer::symmetric_max);
    const float highest = asymmetric ? static_cast<float>(quantizer::levels) : static_cast<float>(quantizer::symmetric_max);
    const float biased = round_magic + (asymmetric ? 0.0f : static_cast<float>(quantizer::symmetric_offset));
#pragma unroll
    for (int i = 0; i < N; ++i)
      q[i] = __float_as_uint(__fadd_rn(fminf(fmaxf(estimate[i], lowest), highest), biased)) & quantizer_mask;
  }
  static constexpr unsigned quantizer_mask = (1u << Bits) - 1u;
  /// max(a, b), NaN if either is (PTX max.NaN, sm_80+): fmaxf would drop a NaN.
  __device__ __forceinline__ static float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float m;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
    return m;
#else
    return a != a || b != b ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
  }
  /// The CPU's code() of one number (code_each of one).
  __device__ __forceinline__ static unsigned code(float x, step s, bool asymmetric) {
    unsigned q[1];
    code_each<1>({x}, {s}, asymmetric, q);
    return q[0];
  }
  /// Stores the codes of channels d and d + 1 (d even).
  __device__ __forceinline__ static void put_pair(std::uint8_t* row, std::int64_t d, unsigned first, unsigned second) {
    if constexpr (Bits == 8) {
      *reinterpret_cast<std::uint16_t*>(row + d) = static_cast<std::uint16_t>(first | second << 8);  // d even: aligned
    } else {
      row[d / 2] = static_cast<std::uint8_t>(first | second << 4);
    }
  }

  /// One run per token, one warp per token: this lane's channel pairs
  /// (2·lane + 64·j, + 1) of x; codes into row `slot`, the step into scales[slot] (zeros[slot]).
  __device__ static void quantize_row(const storage& store, const float (&x)[8], int lane, int pairs,
                                      std::uint8_t* codes, float* scales, float* zeros, std::int64_t slot) {
    float lowest = __int_as_float(0x7f800000), highest = -lowest;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < 2 * pairs) lowest = fminf(lowest, x[i]), highest = fmaxf(highest, x[i]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      lowest = fminf(lowest, __shfl_xor_sync(0xffffffffu, lowest, offset));
      highest = fmaxf(highest, __shfl_xor_sync(0xffffffffu, highest, offset));
    }
    const step s = fit(lowest, highest, store.asymmetric);
    std::uint8_t* row = codes + slot * quantizer::row_bytes(store.head_dim);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < pairs)
        put_pair(row, 2 * lane + 64 * j, code(x[2 * j], s, store.asymmetric), code(x[2 * j + 1], s, store.asymmetric));
    if (lane == 0) {
      scales[slot] = s.scale;
      if (store.asymmetric) zeros[slot] = s.zero;
    }
  }

  /// Stores the codes of channels 8·chunk .. 8·chunk + 7 of a row: int8 one 8-byte word, int4 one 4-byte word
  /// (low nibble: even channel, as put_pair). Rows are row_bytes apart from an aligned base: aligned stores.
  __device__ __forceinline__ static void put8(std::uint8_t* row, int chunk, const unsigned (&q)[8]) {
    if constexpr (Bits == 8) {
      *reinterpret_cast<uint2*>(row + 8 * chunk) =
          make_uint2(q[0] | q[1] << 8 | q[2] << 16 | q[3] << 24, q[4] | q[5] << 8 | q[6] << 16 | q[7] << 24);
    } else {
      unsigned packed = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) packed |= q[i] << (4 * i);
      *reinterpret_cast<unsigned*>(row + 4 * chunk) = packed;
    }
  }

  /// One run per token, `lanes` consecutive lanes per row, this lane holding channels 8·chunk .. 8·chunk + 7
  /// of it (x): the row's minimum and maximum by shuffles within the lanes (exact in any order), then this
  /// lane's eight codes as one store; the chunk-0 lane stores the step. Every lane of the warp calls it
  /// (the shuffles); a lane whose group has no row (active false) stores nothing.
  __device__ __forceinline__ static void quantize8(const storage& store, const float (&x)[8], int lanes, int chunk,
                                                   bool active, std::uint8_t* codes, float* scales, float* zeros,
                                                   std::int64_t slot) {
    float lowest = x[0], highest = x[0];
#pragma unroll
    for (int i = 1; i < 8; ++i) lowest = fminf(lowest, x[i]), highest = fmaxf(highest, x[i]);
    // Unrolled, each step behind a test of the (warp-uniform) lane count: a loop on `lanes` cost a dozen
    // instructions of control per step.
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      if (offset < lanes) {
        lowest = fminf(lowest, __shfl_xor_sync(0xffffffffu, lowest, offset));
        highest = fmaxf(highest, __shfl_xor_sync(0xffffffffu, highest, offset));
      }
    if (!active) return;
    const step s = fit(lowest, highest, store.asymmetric);
    const step each[8] = {s, s, s, s, s, s, s, s};
    unsigned q[8];
    code_each(x, each, store.asymmetric, q);
    put8(codes + slot * quantizer::row_bytes(store.head_dim), chunk, q);
    if (chunk == 0) {
      scales[slot] = s.scale;
      if (store.asymmetric) zeros[slot] = s.zero;
    }
  }

  /// encode_row for the 16-byte row kernel (codec_encode_rows8): `lanes` lanes per row, 8 channels each.
  __device__ __forceinline__ static void encode8(const storage& store, std::int64_t /*head*/, std::int64_t slot,
                                                 int lanes, int chunk, bool active, const float (&key)[8],
                                                 const float (&value)[8]) {
    quantize8(store, value, lanes, chunk, active, store.value_codes, store.value_scales, store.value_zeros, slot);
    if (store.key_group == 0)
      quantize8(store, key, lanes, chunk, active, store.key_codes, store.key_scales, store.key_zeros, slot);
  }

  /// Row-wise encode: the value (and the key, when keys are scaled per token;
  /// KIVI keys go through the group kernels of codec_writes.cuh).
  __device__ static void encode_row(const storage& store, std::int64_t /*head*/, std::int64_t slot, int lane, int pairs,
                                    const float (&key)[8], const float (&value)[8]) {
    quantize_row(store, value, lane, pairs, store.value_codes, store.value_scales, store.value_zeros, slot);
    if (store.key_group == 0)
      quantize_row(store, key, lane, pairs, store.key_codes, store.key_scales, store.key_zeros, slot);
  }

  // ---- decode attention's reader ---------------------------------------------
  using stored = std::uint8_t;
  template <int HeadDim>
  static constexpr int row_elements = HeadDim * Bits / 8;  // bytes of one row of codes
  __host__ __device__ static const stored* key_rows(const storage& store) { return store.key_codes; }
  __host__ __device__ static const stored* value_rows(const storage& store) { return store.value_codes; }

  struct reader {
    storage store;
    std::int64_t head;
    int run_shift;  // log2(slot_run) when a power of two (every layout's default), else −1

    /// q − offset for the 8 codes of channels first_dim .. first_dim + 7 of a staged row, as
    /// floats: exact, built as the float 2^23 + q (its low mantissa bits are the code) minus
    /// 2^23 + offset, two full-rate instructions instead of a quarter-rate integer conversion.
    __device__ __forceinline__ static void codes8(const stored* row, int first_dim, float offset, float (&out)[8]) {
      const float bias = 8388608.0f + offset;
      if constexpr (Bits == 8) {
        const uint2 raw = *reinterpret_cast<const uint2*>(row + first_dim);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          out[i] = __int_as_float(static_cast<int>(__byte_perm(raw.x, 0x4B000000u, 0x7540u | i))) - bias;
          out[4 + i] = __int_as_float(static_cast<int>(__byte_perm(raw.y, 0x4B000000u, 0x7540u | i))) - bias;
        }
      } else {
        const unsigned raw = *reinterpret_cast<const unsigned*>(row + first_dim / 2);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = __int_as_float(static_cast<int>(0x4B000000u | ((raw >> (4 * i)) & 0xFu))) - bias;
      }
    }
    __device__ __forceinline__ float code_offset() const {
      return store.asymmetric ? 0.0f : static_cast<float>(quantizer::symmetric_offset);
    }
    /// x̂ = (q − offset)·s + z, as integer_quantizer::value.
    template <class Rows>
    __device__ __forceinline__ void key(const stored* row, int first_dim, std::int64_t token, const Rows& rows,
                                        float (&out)[8]) const {
      const std::int64_t slot = rows.slot(token);
      if (store.key_group == 0) {
        codes8(row, first_dim, code_offset(), out);
        const float scale = __ldg(store.key_scales + slot), zero = store.asymmetric ? __ldg(store.key_zeros + slot) : 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = fmaf(out[i], scale, zero);
        return;
      }
      // The run's flag and steps are loaded together (independent loads: one latency, not three);
      // a run still filling has steps that are never used.
      // A shift, not a 64-bit division (emulated in dozens of instructions) per token and lane.
      const std::int64_t run = run_shift >= 0 ? slot >> run_shift : slot / store.slot_run;
      const std::int64_t at = run * store.head_dim + first_dim;
      const bool sealed = __ldg(store.run_sealed + run) != 0;
      const float4 scale_low = __ldg(reinterpret_cast<const float4*>(store.key_scales + at));
      const float4 scale_high = __ldg(reinterpret_cast<const float4*>(store.key_scales + at) + 1);
      float4 zero_low{}, zero_high{};
      if (store.asymmetric) {
        zero_low = __ldg(reinterpret_cast<const float4*>(store.key_zeros + at));
        zero_high = __ldg(reinterpret_cast<const float4*>(store.key_zeros + at) + 1);
      }
      if (sealed) {
        codes8(row, first_dim, code_offset(), out);
        const float scales[8] = {scale_low.x,  scale_low.y,  scale_low.z,  scale_low.w,
                                 scale_high.x, scale_high.y, scale_high.z, scale_high.w};
        if (store.asymmetric) {
          const float zeros[8] = {zero_low.x, zero_low.y, zero_low.z, zero_low.w,
                                  zero_high.x, zero_high.y, zero_high.z, zero_high.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) out[i] = fmaf(out[i], scales[i], zeros[i]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) out[i] *= scales[i];
        }
        return;
      }
      // The filling group: fp16 in the head's residual window.
      const auto* residual = reinterpret_cast<const __half*>(store.residual_keys) +
                             (head * store.key_group + token % store.key_group) * store.head_dim + first_dim;
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(residual));
      const auto* halves = reinterpret_cast<const __half*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = __half2float(halves[i]);
    }
    template <class Rows>
    __device__ __forceinline__ void value(const stored* row, int first_dim, std::int64_t token, const Rows& rows,
                                          float (&out)[8]) const {
      const std::int64_t slot = rows.slot(token);
      codes8(row, first_dim, code_offset(), out);
      const float scale = __ldg(store.value_scales + slot), zero = store.asymmetric ? __ldg(store.value_zeros + slot) : 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = fmaf(out[i], scale, zero);
    }
  };
  __device__ static reader open(const storage& store, std::int64_t head) {
    const bool power_of_two = store.slot_run > 0 && (store.slot_run & (store.slot_run - 1)) == 0;
    return {store, head, power_of_two ? __ffsll(static_cast<long long>(store.slot_run)) - 1 : -1};
  }
};

}  // namespace kvtrim::cuda_detail
