// kvtrim/backend/cpu/detail/exp.hpp — the CPU backend's exp(x) for float: one
// definition, computed one value at a time or eight at a time, the same bits.
//
// Why not std::exp: the softmaxes of the attention-mass scorers take one exp per
// (observed query, key) — 16.7 M per layer for SnapKV at 8192 tokens and 32 query
// heads — and decode attention one per (query head, token). std::exp is a scalar
// library call (≈ 10 ns each here), C++ has no vector exp, and a compiler's vector
// math library (libmvec) is reached only under -ffast-math and returns other bits
// than the scalar call, so a vectorised loop could not reproduce the reference.
// So the backend defines exp itself, as a fixed sequence of IEEE operations;
// cpu_exp() below runs it on one float (std::fma: a single instruction wherever the
// CPU has FMA — glibc picks it at run time), cpu_exp8() on eight lanes of AVX2/FMA
// (x86 CPUs that have them, chosen at run time as in x86.hpp). Same operations,
// same order, so the same bits on every CPU and in every loop: the reference
// stays one function, whichever form computed it.
//
// The operations: x is clamped to [−104, 89] (beyond, exp is 0 resp. +∞ in float
// and the clamped value gives exactly that); k = round-to-nearest(x·log₂e) by the
// 1.5·2²³ shifter; r = x − k·ln2 with ln2 split in two parts (Cody & Waite), each
// step a fused multiply-add; exp(r) = 1 + r + r²·P(r) with P Cephes' degree-5
// minimax polynomial for expf (S. Moshier), by Horner's rule in fused
// multiply-adds; then · 2^⌊k/2⌋ · 2^(k − ⌊k/2⌋), two exact power-of-two factors, so
// results down to the subnormals are rounded once and exp(88.72) still reaches
// FLT_MAX without overflowing 2^k.
//
// Accuracy (tests/cpu/cpu_kernels_test.cpp; all 2.24·10⁹ floats in [−104, 89] checked
// against the correctly rounded double exp once, see docs/results.md): at most
// 1.013 ulp from exp(x) (at x = 59.306; glibc's expf: ≤ 0.51 ulp); 99.2 % are the
// correctly rounded float. Special values: NaN → NaN, +∞ → +∞, −∞ → +0,
// exp(±0) = 1 exactly.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cpu/detail/x86.hpp"

namespace kvtrim::detail {

/// The constants of cpu_exp(), shared by both forms.
struct exp_constants {
  static constexpr float lowest = -104.0f;  // exp < 2^-150 below: rounds to 0
  static constexpr float highest = 89.0f;   // exp > FLT_MAX above: +∞
  static constexpr float shifter = 12582912.0f;  // 1.5·2^23: x + shifter − shifter rounds x to an integer
  static constexpr float log2e = 1.44269502162933349609375f;
  static constexpr float ln2_high = 0.693145751953125f;  // ln 2 = ln2_high + ln2_low (Cody–Waite)
  static constexpr float ln2_low = 1.428606765330187045e-06f;
  static constexpr float p0 = 5.0000001201e-1f;  // Cephes expf: exp(r) ≈ 1 + r + r²·(p0 + p1·r + … + p5·r⁵)
  static constexpr float p1 = 1.6666665459e-1f;
  static constexpr float p2 = 4.1665795894e-2f;
  static constexpr float p3 = 8.3334519073e-3f;
  static constexpr float p4 = 1.3981999507e-3f;
  static constexpr float p5 = 1.9875691500e-4f;
};

/// exp(x) in float (the header comment says how, and how accurate).
inline float cpu_exp(float x) {
  using c = exp_constants;
  if (x != x) return x;                    // NaN
  x = c::highest < x ? c::highest : x;     // the clamps in the order of cpu_exp8's min/max
  x = c::lowest > x ? c::lowest : x;
  const float k = std::fma(x, c::log2e, c::shifter) - c::shifter;
  float r = std::fma(-k, c::ln2_high, x);
  r = std::fma(-k, c::ln2_low, r);
  float p = std::fma(c::p5, r, c::p4);
  p = std::fma(p, r, c::p3);
  p = std::fma(p, r, c::p2);
  p = std::fma(p, r, c::p1);
  p = std::fma(p, r, c::p0);
  p = std::fma(p, r * r, r) + 1.0f;
  const auto exponent = static_cast<std::int32_t>(k);  // in [-150, 129]
  const std::int32_t half = exponent >> 1;               // floor(k / 2), as vpsrad
  const float first = std::bit_cast<float>(static_cast<std::uint32_t>(half + 127) << 23);
  const float second = std::bit_cast<float>(static_cast<std::uint32_t>(exponent - half + 127) << 23);
  return p * first * second;
}

#if KVTRIM_X86_DISPATCH

#define KVTRIM_EXP_AVX2 __attribute__((target("avx2,fma,f16c")))  // as x86.hpp's functions: inlinable both ways

/// cpu_exp() on eight lanes: the same operations (min/max keep a NaN lane NaN, and it
/// stays NaN through every step).
KVTRIM_EXP_AVX2 inline __m256 cpu_exp8(__m256 x) {
  using c = exp_constants;
  x = _mm256_min_ps(_mm256_set1_ps(c::highest), x);  // (highest < x) ? highest : x
  x = _mm256_max_ps(_mm256_set1_ps(c::lowest), x);   // (lowest > x) ? lowest : x
  const __m256 shifter = _mm256_set1_ps(c::shifter);
  const __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(c::log2e), shifter), shifter);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(c::ln2_high), x);  // −k·ln2_high + x, rounded once
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(c::ln2_low), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(c::p5), r, _mm256_set1_ps(c::p4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c::p3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c::p2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c::p1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c::p0));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_cvttps_epi32(k);
  const __m256i half = _mm256_srai_epi32(exponent, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 second =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(exponent, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, first), second);
}

/// values[i] = exp(values[i] − shift) for i < count, eight at a time (the last
/// few through a padded vector): the same bits as the scalar loop.
KVTRIM_EXP_AVX2 inline void cpu_exp_shifted_avx2(float* values, std::int64_t count, float shift) {
  const __m256 subtrahend = _mm256_set1_ps(shift);
  std::int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(values + i, cpu_exp8(_mm256_sub_ps(_mm256_loadu_ps(values + i), subtrahend)));
  if (i < count) {
    alignas(32) float tail[8] = {};
    for (std::int64_t j = i; j < count; ++j) tail[j - i] = values[j];
    _mm256_store_ps(tail, cpu_exp8(_mm256_sub_ps(_mm256_load_ps(tail), subtrahend)));
    for (std::int64_t j = i; j < count; ++j) values[j] = tail[j - i];
  }
}

/// values[i] = exp(values[i] − shift) as cpu_exp_shifted_avx2, returning their sum
/// — summed in eight lanes (lane i mod 8, in order of i), then across the lanes
/// (x86::lane_sum): decode attention's softmax denominator, whose order is not
/// part of the reference (decode is checked against a bound, not bits).
KVTRIM_EXP_AVX2 inline float cpu_exp_shifted_sum_avx2(float* values, std::int64_t count, float shift) {
  const __m256 subtrahend = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 e = cpu_exp8(_mm256_sub_ps(_mm256_loadu_ps(values + i), subtrahend));
    _mm256_storeu_ps(values + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < count) {  // the padding lanes hold −∞: exp gives +0, adding nothing
    alignas(32) float tail[8];
    for (std::int64_t j = 0; j < 8; ++j) tail[j] = i + j < count ? values[i + j] : -__builtin_inff();
    const __m256 e = cpu_exp8(_mm256_sub_ps(_mm256_load_ps(tail), subtrahend));
    _mm256_store_ps(tail, e);
    sum = _mm256_add_ps(sum, e);
    for (std::int64_t j = i; j < count; ++j) values[j] = tail[j - i];
  }
  return x86::lane_sum(sum);
}

/// probabilities[i] = exp(logits[i] − shift) / divisor for i < count, eight at a
/// time (the last few through a padded vector): the same bits as the scalar loop
/// (cpu_exp8's, and the division is IEEE's correctly rounded one in both forms).
KVTRIM_EXP_AVX2 inline void cpu_exp_shifted_divided_avx2(const float* logits, float* probabilities, std::int64_t count,
                                                         float shift, float divisor) {
  const __m256 subtrahend = _mm256_set1_ps(shift);
  const __m256 divisors = _mm256_set1_ps(divisor);
  std::int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(probabilities + i,
                     _mm256_div_ps(cpu_exp8(_mm256_sub_ps(_mm256_loadu_ps(logits + i), subtrahend)), divisors));
  if (i < count) {
    alignas(32) float tail[8] = {};
    for (std::int64_t j = i; j < count; ++j) tail[j - i] = logits[j];
    _mm256_store_ps(tail, _mm256_div_ps(cpu_exp8(_mm256_sub_ps(_mm256_load_ps(tail), subtrahend)), divisors));
    for (std::int64_t j = i; j < count; ++j) probabilities[j] = tail[j - i];
  }
}

#undef KVTRIM_EXP_AVX2

#endif

/// values[i] = exp(values[i] − shift) for i < count: eight lanes on CPUs with
/// AVX2+FMA, else one at a time — the same bits either way.
inline void cpu_exp_shifted(float* values, std::int64_t count, float shift) {
#if KVTRIM_X86_DISPATCH
  if (x86::has_avx2_fma_f16c()) {
    cpu_exp_shifted_avx2(values, count, shift);
    return;
  }
#endif
  for (std::int64_t i = 0; i < count; ++i) values[i] = cpu_exp(values[i] - shift);
}

/// probabilities[i] = exp(logits[i] − shift) / divisor for i < count — a softmax's
/// probabilities from its logits, maximum and denominator (the eviction metric's
/// p = exp(s − m) / l): eight lanes on CPUs with AVX2+FMA, else one at a time — the
/// same bits either way.
inline void cpu_exp_shifted_divided(const float* logits, float* probabilities, std::int64_t count, float shift,
                                    float divisor) {
#if KVTRIM_X86_DISPATCH
  if (x86::has_avx2_fma_f16c()) {
    cpu_exp_shifted_divided_avx2(logits, probabilities, count, shift, divisor);
    return;
  }
#endif
  for (std::int64_t i = 0; i < count; ++i) probabilities[i] = cpu_exp(logits[i] - shift) / divisor;
}

}  // namespace kvtrim::detail
