// kvtrim/codec/fp8.hpp — 8-bit floating point (OCP e4m3fn) with one scale per
// head for keys and one for values, as vLLM and FlashInfer store fp8 caches.
//
// Format e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; largest finite
// 448, smallest normal 2^−6, subnormals down to 2^−9, no infinities, NaN =
// S.1111.111. Math: x̂ = s · e4m3(x / s), round to nearest even, so for |x/s| ≤
// 448
//   |x − x̂| ≤ s · max(2^−4 · |x/s|, 2^−10)   (half an ulp: 3 mantissa bits, or
//   half the subnormal step).
// Finite values beyond ±448·s saturate to ±448·s, as vLLM's conversion does;
// NaN and ±Inf are an error (kvtrim::error naming head, slot and channel).
// Scales: fp8_scaling::head_amax (default) sets each head's scale at compaction
// to max|x| / 448 over its kept tokens (at least 2^−126, the smallest normal
// float: detail::e4m3_head_scale), so the prefill uses the whole range and
// later larger tokens saturate; fp8_scaling::fixed uses key_scale / value_scale
// for every head (vLLM's default 1.0, or its calibrated k_scale / v_scale).
// fp8::set_head_scales installs per-head calibrated scales.
// Storage per slot: head_dim bytes each for key and value; per head: two fp32
// scales. Defaults: head_amax; fixed scales 1.0. Backends: cpu, cuda (backend/cuda/codec_fp8.cuh).
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

inline constexpr double e4m3_max = 448.0;

/// The smallest scale fp8_scaling::head_amax sets: 2⁻¹²⁶, the smallest normal float. A head whose max|x| is
/// positive but below 448·2⁻¹²⁶ (subnormal or tiny values) would get max|x| / 448 subnormal, or 0 once it
/// underflows (then x / 0 = ±∞ saturates and 0 / 0 = NaN is stored as code 0x7F, which decodes to NaN). At the
/// floor every such head is stored finitely and within the bound above with s = 2⁻¹²⁶: x / 2⁻¹²⁶ is exact and
/// below 448 in magnitude (nothing saturates), the decode code·2⁻¹²⁶ is exact (a subnormal scale would round
/// it), and e4m3_inverse(2⁻¹²⁶) = 2¹²⁶ is normal, so the device keeps its product path (below about 2⁻¹²⁸ the
/// inverse is infinite, e4m3_inverse's NaN: a division per element).
inline constexpr float e4m3_min_scale = 0x1p-126f;
static_assert(e4m3_min_scale == std::numeric_limits<float>::min());

/// fp8_scaling::head_amax's scale of a head whose max|x| is amax > 0: amax / 448 in double, rounded to float,
/// at least e4m3_min_scale. The CPU's prepare_head and the device's fp8_finish_scales both call it, so the
/// scales (and every code under them) are bit-identical.
KVTRIM_HOST_DEVICE inline float e4m3_head_scale(double amax) {
  const float scale = static_cast<float>(amax / e4m3_max);
  return scale < e4m3_min_scale ? e4m3_min_scale : scale;
}

/// Nearest e4m3fn code (ties to even) of a finite x; beyond ±448 saturates. NaN (0 / 0: a zero input under a
/// zero scale, which head_amax no longer sets: e4m3_head_scale) gives 0x7F, the code the device's conversion
/// stores for the device's quotient (its NaN is positive; x86's 0/0 is negative, hence no sign), and never
/// reaches a float-to-integer cast.
inline std::uint8_t to_e4m3(float x) {
  if (std::isnan(x)) return 0x7Fu;
  const unsigned sign = std::signbit(x) ? 0x80u : 0u;
  const double magnitude = std::fabs(static_cast<double>(x));
  if (magnitude >= e4m3_max) return static_cast<std::uint8_t>(sign | 0x7Eu);
  if (magnitude < 0x1p-6) {  // subnormal: multiples of 2^−9
    const double steps = std::nearbyint(magnitude * 512.0);
    return static_cast<std::uint8_t>(sign | static_cast<unsigned>(steps));  // steps = 8 is the smallest normal
  }
  int exponent = 0;
  std::frexp(magnitude, &exponent);
  exponent -= 1;                                                          // magnitude = 1.f × 2^exponent
  double mantissa = std::nearbyint(std::ldexp(magnitude, 3 - exponent));  // in [8, 16]
  if (mantissa == 16.0) {
    mantissa = 8.0;
    ++exponent;
  }
  if (exponent > 8 || (exponent == 8 && mantissa > 14.0)) return static_cast<std::uint8_t>(sign | 0x7Eu);
  return static_cast<std::uint8_t>(sign | static_cast<unsigned>(exponent + 7) << 3 |
                                   (static_cast<unsigned>(mantissa) - 8u));
}

/// The bits of float x, and the float of bits b, on host and device.
KVTRIM_HOST_DEVICE inline std::uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return std::bit_cast<std::uint32_t>(x);
#endif
}
KVTRIM_HOST_DEVICE inline float bits_float(std::uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  return std::bit_cast<float>(b);
#endif
}

// ---- e4m3(x / s) without a division per element (the device encode) --------
// The CPU stores to_e4m3(q) with q = fl(x / s), the IEEE quotient. The device computes instead the product
// p = fl(x · inv) with inv = fl(1 / s) (once per head, e4m3_inverse) and divides only where p might round
// to another code than q. e4m3_quotient returns p or q; converting it gives to_e4m3(q). (The division is
// only a few instructions on sm_90; the gain is small and comes with one branch per eight codes, not one per
// code: docs/results.md, "Encode, second round".)
//
// Error bound. With u = 2⁻²⁴, inv normal (e4m3_inverse makes it NaN otherwise) and no overflow:
// inv = (1/s)(1 + δ₁), p = x·inv·(1 + δ₂) + η₂, q = (x/s)(1 + δ₃) + η₃ with |δᵢ| ≤ u and |ηᵢ| ≤ 2⁻¹⁵⁰ (an
// underflowing result), so with Q = x/s exact
//   |p − q| ≤ |Q|·(3u + u²) + 2⁻¹⁴⁹.
// Rounding to e4m3 (ties to even) is monotone and steps only at the midpoints m between neighbouring e4m3
// values: if every midpoint lies farther than |p − q| from p, no midpoint lies between p and q (nor on
// either), and to_e4m3(p) = to_e4m3(q). e4m3_product_decides(p) checks that distance:
//  * |p| ≥ 2⁻⁶ (e4m3 normals), p in the float binade [2ᵉ, 2ᵉ⁺¹), U = 2ᵉ⁻²³ its ulp. The e4m3 values there
//    are 2ᵉ·(1 + j/8), the midpoints 2ᵉ·(1 + (2k+1)/16): the floats whose 20 low mantissa bits are 0x80000,
//    so p is |low20(p) − 0x80000| ulps from the nearest one inside the binade. The nearest midpoints outside
//    it, the top one of the binade below at 2ᵉ·(1 − 1/32) (e = −6: the subnormal midpoint 7.5·2⁻⁹ =
//    2ᵉ·(1 − 1/16)) and 2ᵉ⁺¹·(1 + 1/16) above, are ≥ 2¹⁸ U from p: no power of two ≥ 2⁻⁶ is near a
//    midpoint, so p and q straddling a binade edge are both far from any. (Above 2⁸ the "midpoints" are
//    not real — to_e4m3 is constant there — and the test is merely conservative.) The bound: |Q| =
//    |p|/((1+δ₁)(1+δ₂)) < 2ᵉ⁺¹(1 + 2.1u), so |p − q| < 2ᵉ⁺¹·3u·(1 + 3u) + 2⁻¹⁴⁹ < 3.01 U (U ≥ 2⁻²⁹
//    here): a distance of 4 ulps would do. p decides when the distance exceeds e4m3_product_margin = 8
//    ulps (the bound rounded up, with 2× slack); a fallback rate of 17 / 2²⁰ in the normal range.
//    Saturation: to_e4m3 is constant (448, code 0x7E) from the midpoint 432 up (432 itself rounds to the
//    even 448), through 448 … 464 and beyond, so 432 is the last midpoint that matters; and a q that
//    overflows to ∞ while p is finite (the bound needs no overflow) has |p| ≫ 448: both saturate.
//  * |p| < 2⁻⁶ (e4m3 subnormals, step 2⁻⁹; the first normal binade has the same step): midpoints
//    (k + ½)·2⁻⁹, including 2⁻¹⁰ (the one midpoint that is a power of two, between 0 and 2⁻⁹). In units of
//    2⁻⁹, t = |p|·2⁹ is exact and the distance |t − ⌊t⌋ − ½| is exact where it is below ¼ (Sterbenz); the
//    bound in those units: |p − q|·2⁹ < 2⁻⁶(1 + 3u)·3u·2⁹ + 2⁻¹⁴⁰ < 1.5·10⁻⁶ < 2⁻¹⁹. p decides when the
//    distance exceeds 2⁻¹⁶ (8× slack).
//  * p not finite (x or inv out of range, or inv NaN): never decides; the division gives what it always
//    gave (s = 0: ±∞ → 448, 0/0 = NaN → code 0x7F on the device).
// Contraction: the device multiplies with __fmul_rn, which nvcc never fuses into an fma. On the host,
// p = x * inverse is consumed only by float_bits (an integer view), fabsf, and the return value that
// to_e4m3 converts to double — no addition takes the product, so there is no a·b + c to contract
// (and |p|·2⁹ − ⌊t⌋, which could be fused, is exact either way: |p|·2⁹ is). x86-64 and CUDA evaluate
// float expressions in float (FLT_EVAL_METHOD 0). tests/cpu/codec_roundtrip_test.cpp
// (Fp8.DeviceProductRoundingMatchesTheDivision) checks it bit for bit against to_e4m3(x / s) on
// e4m3_quotient_inputs (tests/common/quantizer_ties.hpp); tests/cuda/codecs_test.cu the device's codes.

/// Ulps of p (in its binade) from the nearest e4m3 midpoint at or below which the division decides.
inline constexpr std::uint32_t e4m3_product_margin = 8;

/// Whether p = x · (1 / s) converts to the same e4m3 code as the quotient fl(x / s) (see above): false for a
/// non-finite p, for p within e4m3_product_margin ulps of a normal midpoint, or within 2⁻¹⁶·2⁻⁹ of a
/// subnormal one.
KVTRIM_HOST_DEVICE inline bool e4m3_product_decides(float p) {
  const std::uint32_t magnitude = float_bits(p) & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return false;  // ±∞, NaN
  if (magnitude >= 0x3C800000u) {              // |p| ≥ 2⁻⁶: |low20 − 0x80000| > margin (unsigned wrap)
    return (magnitude & 0xFFFFFu) - (0x80000u - e4m3_product_margin) > 2 * e4m3_product_margin;
  }
  const float t = ::fabsf(p) * 512.0f;  // exact
  return ::fabsf(t - ::floorf(t) - 0.5f) > 0x1p-16f;
}

/// 1 / scale correctly rounded (__frcp_rn on the device, the host's `/`) where that is a normal float, else
/// NaN (scale 0, ±∞, NaN, |scale| above about 2¹²⁶ — a subnormal inverse loses the error bound — or below
/// about 2⁻¹²⁸: an infinite one),
/// so that every product with it takes e4m3_quotient's division. Once per head.
KVTRIM_HOST_DEVICE inline float e4m3_inverse(float scale) {
#if defined(__CUDA_ARCH__)
  const float inverse = __frcp_rn(scale);
#else
  const float inverse = 1.0f / scale;
#endif
  const std::uint32_t exponent = (float_bits(inverse) >> 23) & 0xFFu;
  return exponent != 0u && exponent != 0xFFu ? inverse : bits_float(0x7FC00000u);
}

/// The float whose e4m3 code is the CPU's to_e4m3(x / scale): the product x · inverse where
/// e4m3_product_decides says it converts alike, else the IEEE quotient itself. inverse: e4m3_inverse(scale).
KVTRIM_HOST_DEVICE inline float e4m3_quotient(float x, float scale, float inverse) {
#if defined(__CUDA_ARCH__)
  const float product = __fmul_rn(x, inverse);  // never contracted
  return e4m3_product_decides(product) ? product : __fdiv_rn(x, scale);  // correctly rounded, as the host's `/`
#else
  const float product = x * inverse;
  return e4m3_product_decides(product) ? product : x / scale;
#endif
}

/// The fp32 bits of e4m3fn code `bits` (exact: every e4m3 value is an fp32
/// value); integer arithmetic only, so it runs on host and device.
KVTRIM_HOST_DEVICE constexpr std::uint32_t e4m3_to_fp32_bits(std::uint8_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x80u) << 24;
  const std::uint32_t exponent = (bits >> 3) & 0xFu, mantissa = bits & 0x7u;
  if (exponent == 0xF && mantissa == 0x7) return sign | 0x7FC00000u;  // NaN
  if (exponent != 0) return sign | (exponent + 120u) << 23 | mantissa << 20;  // bias 7 → 127
  if (mantissa == 0) return sign;                                             // ±0
  // Subnormal m · 2^−9: normalise on the leading bit p of m (m = 2^p + rest).
  const std::uint32_t p = mantissa >= 4 ? 2u : mantissa >= 2 ? 1u : 0u;
  return sign | (p + 118u) << 23 | (mantissa - (1u << p)) << (23 - p);
}

/// The 256 e4m3fn values, for the host decode (one load per element).
inline constexpr std::array<float, 256> e4m3_table = [] {
  std::array<float, 256> table{};
  for (unsigned code = 0; code < 256; ++code)
    table[code] = std::bit_cast<float>(e4m3_to_fp32_bits(static_cast<std::uint8_t>(code)));
  return table;
}();

/// The value of e4m3fn code `bits`: a table on the host, the bit conversion on
/// the device.
KVTRIM_HOST_DEVICE inline float from_e4m3(std::uint8_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(e4m3_to_fp32_bits(bits));
#else
  return e4m3_table[bits];
#endif
}

}  // namespace kvtrim::detail

namespace kvtrim::codec {

enum class fp8_scaling { head_amax, fixed };

struct fp8 {
  static constexpr std::string_view name = "fp8_e4m3";

  struct config {
    fp8_scaling scales = fp8_scaling::head_amax;
    // Every head's scale before compaction, or always (fixed): finite and > 0; below 2⁻¹²⁶
    // (subnormal) it is kept as given, unlike head_amax's floor, and the device divides.
    float key_scale = 1.0f;
    float value_scale = 1.0f;

    void validate(std::string_view function) const {
      if (!(key_scale > 0.0f) || !std::isfinite(key_scale))
        detail::fail(function, "config.codec.key_scale", "a finite scale above 0", detail::cat(key_scale));
      if (!(value_scale > 0.0f) || !std::isfinite(value_scale))
        detail::fail(function, "config.codec.value_scale", "a finite scale above 0", detail::cat(value_scale));
    }
  };

  template <MemorySpace Space>
  struct storage {
    std::uint8_t* key_codes = nullptr;    // [slots, head_dim]
    std::uint8_t* value_codes = nullptr;  // [slots, head_dim]
    float* key_scales = nullptr;          // [heads]
    float* value_scales = nullptr;        // [heads]
    std::int64_t head_dim = 0;
    std::int64_t slots = 0;  // capacity
    std::int64_t heads = 0;
    std::int64_t slot_run = 1;  // no runs: always 1
    bool head_amax = true;
    float initial_key_scale = 1.0f;  // config's scales: bind fills host scales with them, a device reset likewise
    float initial_value_scale = 1.0f;
  };

  static std::size_t storage_bytes(const config& cfg, std::int64_t slots, std::int64_t heads, std::int64_t head_dim,
                                   std::int64_t slot_run) {
    detail::check_any_slot_run("kvtrim::codec::fp8::storage_bytes", slot_run);
    workspace_carver carver;
    carve<host_space>(carver, cfg, slots, heads, head_dim);
    return carver.bytes();
  }
  static double bytes_per_token(const config&, std::int64_t head_dim) { return 2.0 * static_cast<double>(head_dim); }
  static double bytes_per_head(const config&, std::int64_t) { return 2.0 * sizeof(float); }

  template <MemorySpace Space>
  static storage<Space> bind(const config& cfg, void* memory, std::int64_t slots, std::int64_t heads,
                             std::int64_t head_dim, std::int64_t slot_run) {
    detail::check_any_slot_run("kvtrim::codec::fp8::bind", slot_run);
    workspace_carver carver(workspace{memory, ~std::size_t{0}});
    storage<Space> store = carve<Space>(carver, cfg, slots, heads, head_dim);
    if constexpr (std::same_as<Space, host_space>) {
      std::fill_n(store.key_scales, heads, cfg.key_scale);
      std::fill_n(store.value_scales, heads, cfg.value_scale);
    }
    return store;
  }

  template <MemorySpace Space>
  static void check_storage(std::string_view function, const storage<Space>& store, std::int64_t head_dim) {
    detail::check_storage_head_dim(function, store.head_dim, head_dim);
    if (!store.key_codes || !store.value_codes || !store.key_scales || !store.value_scales)
      detail::fail(function, "cache.storage", "every array of the codec bound (codec::bind)", "a null pointer");
  }

  /// Installs calibrated scales for one head (x is stored as e4m3(x / scale)).
  static void set_head_scales(const storage<host_space>& store, std::int64_t head, float key_scale, float value_scale) {
    constexpr std::string_view function = "kvtrim::codec::fp8::set_head_scales";
    if (head < 0 || head >= store.heads) detail::fail_index(function, "head", head, store.heads);
    config{fp8_scaling::fixed, key_scale, value_scale}.validate(function);
    store.key_scales[head] = key_scale;
    store.value_scales[head] = value_scale;
  }

  /// head_amax: the head's scales become max|x| / 448 over the tokens it is
  /// about to hold, at least 2⁻¹²⁶ (detail::e4m3_head_scale).
  template <class Rows>
  static void prepare_head(const storage<host_space>& store, std::int64_t head, std::int64_t /*sequence_length*/,
                           std::int64_t count, const Rows& rows) {
    if (!store.head_amax) return;
    std::array<float, max_head_dim> key{}, value{};
    float key_amax = 0.0f, value_amax = 0.0f;
    for (std::int64_t i = 0; i < count; ++i) {
      rows(i, key.data(), value.data());
      detail::check_finite_row("kvtrim::codec::fp8::prepare_head", "key", key.data(), store.head_dim, head, i);
      detail::check_finite_row("kvtrim::codec::fp8::prepare_head", "value", value.data(), store.head_dim, head, i);
      for (std::int64_t d = 0; d < store.head_dim; ++d) {
        key_amax = std::fmax(key_amax, std::fabs(key[d]));
        value_amax = std::fmax(value_amax, std::fabs(value[d]));
      }
    }
    // An all-zero head keeps its scale: any scale stores zeros exactly.
    if (key_amax > 0.0f) store.key_scales[head] = detail::e4m3_head_scale(key_amax);
    if (value_amax > 0.0f) store.value_scales[head] = detail::e4m3_head_scale(value_amax);
  }

  // --- element operations -------------------------------------------------
  /// Host only (it validates; the e4m3 rounding uses frexp).
  static void encode(const storage<host_space>& store, std::int64_t head, std::int64_t slot,
                     std::int64_t /*position*/, const float* key, const float* value) {
    constexpr std::string_view function = "kvtrim::codec::fp8::encode";
    if (slot < 0 || slot >= store.slots) detail::fail_index(function, "slot", slot, store.slots);
    if (head < 0 || head >= store.heads) detail::fail_index(function, "head", head, store.heads);
    detail::check_finite_row(function, "key", key, store.head_dim, head, slot);
    detail::check_finite_row(function, "value", value, store.head_dim, head, slot);
    std::uint8_t* key_row = store.key_codes + slot * store.head_dim;
    std::uint8_t* value_row = store.value_codes + slot * store.head_dim;
    for (std::int64_t d = 0; d < store.head_dim; ++d) {
      key_row[d] = detail::to_e4m3(key[d] / store.key_scales[head]);
      value_row[d] = detail::to_e4m3(value[d] / store.value_scales[head]);
    }
  }
  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void load_key(const storage<Space>& store, std::int64_t head, std::int64_t slot,
                                          std::int64_t /*position*/, float* out) {
    const std::uint8_t* row = store.key_codes + slot * store.head_dim;
    const float scale = store.key_scales[head];
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = detail::from_e4m3(row[d]) * scale;
  }
  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void load_value(const storage<Space>& store, std::int64_t head, std::int64_t slot,
                                            float* out) {
    const std::uint8_t* row = store.value_codes + slot * store.head_dim;
    const float scale = store.value_scales[head];
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = detail::from_e4m3(row[d]) * scale;
  }
  static void move_slot(const storage<host_space>& store, std::int64_t /*head*/, std::int64_t from, std::int64_t to) {
    const auto bytes = static_cast<std::size_t>(store.head_dim);
    std::memmove(store.key_codes + to * store.head_dim, store.key_codes + from * store.head_dim, bytes);
    std::memmove(store.value_codes + to * store.head_dim, store.value_codes + from * store.head_dim, bytes);
  }

 private:
  template <MemorySpace Space>
  static storage<Space> carve(workspace_carver& carver, const config& cfg, std::int64_t slots, std::int64_t heads,
                              std::int64_t head_dim) {
    cfg.validate("kvtrim::codec::fp8::bind");
    storage<Space> store;
    store.key_codes = carver.take<std::uint8_t>(slots * head_dim);
    store.value_codes = carver.take<std::uint8_t>(slots * head_dim);
    store.key_scales = carver.take<float>(heads);
    store.value_scales = carver.take<float>(heads);
    store.head_dim = head_dim;
    store.slots = slots;
    store.heads = heads;
    store.head_amax = cfg.scales == fp8_scaling::head_amax;
    store.initial_key_scale = cfg.key_scale;
    store.initial_value_scale = cfg.value_scale;
    return store;
  }
};

}  // namespace kvtrim::codec
