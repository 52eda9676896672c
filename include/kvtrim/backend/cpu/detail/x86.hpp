// kvtrim/backend/cpu/detail/x86.hpp — the decode attention's inner loops with
// AVX2, FMA and F16C, chosen at run time.
//
// Why run-time dispatch: kvtrim is header-only and its users build with their
// own flags — usually none beyond -O2, i.e. SSE2 on x86-64. Without F16C the
// fp16 → fp32 conversion is a dozen integer operations per element and bounds
// decode at ~2.5 GB/s of cache on a 2-core machine whose memory moves ~20 GB/s;
// with `vcvtph2ps` and 8-lane FMAs the same loops run at memory speed. So the
// three loops decode spends its time in (row conversion, q·k over a block of
// rows, Σ p·v into the accumulators) exist twice: the portable form in
// decode_attention.hpp and the functions below, compiled for AVX2+FMA+F16C
// through GCC/Clang's `target` attribute (no flags needed) and called only when
// the CPU reports all three (`__builtin_cpu_supports`, checked once).
//
// Results: the conversion is exact in both forms (the same bits). The dot
// products use fused multiply-adds in eight lanes, so a logit can differ from the
// portable path's in the last bits (an FMA rounds once where mul+add rounds
// twice: never further from the exact value than the bound the tests derive for
// the portable path). Which form runs depends on the CPU, not on the thread
// count, so results stay independent of the number of threads.
//
// Off when: not x86, not GCC/Clang, or KVTRIM_NO_X86_DISPATCH. nvcc's host pass
// compiles it like g++ does (checked), so a program mixing .cpp and .cu files
// gets the same inline bodies from both — which is also why the choice is made
// at run time even when the compiler was told -mavx2: an inline function whose
// body depended on each file's flags would differ between translation units.
// Define KVTRIM_NO_X86_DISPATCH in every translation unit or in none.
#pragma once

#include <cstdint>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(KVTRIM_NO_X86_DISPATCH)
#define KVTRIM_X86_DISPATCH 1
#include <immintrin.h>
#else
#define KVTRIM_X86_DISPATCH 0
#endif

namespace kvtrim::detail::x86 {

#if KVTRIM_X86_DISPATCH

#define KVTRIM_X86_AVX2 __attribute__((target("avx2,fma,f16c")))

/// True when this CPU runs AVX2, FMA and F16C (asked once per process).
inline bool has_avx2_fma_f16c() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return supported;
}

/// fp16 bits → fp32, `count` elements (vcvtph2ps: exact, like the portable form).
KVTRIM_X86_AVX2 inline void half_to_float(const std::uint16_t* in, float* out, std::int64_t count) {
  std::int64_t d = 0;
  for (; d + 8 <= count; d += 8)
    _mm256_storeu_ps(out + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + d))));
  if (d < count) {  // the tail through a zero-padded vector
    alignas(16) std::uint16_t tail[8] = {};
    alignas(32) float converted[8];
    for (std::int64_t i = d; i < count; ++i) tail[i - d] = in[i];
    _mm256_store_ps(converted, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tail))));
    for (std::int64_t i = d; i < count; ++i) out[i] = converted[i - d];
  }
}

/// bf16 bits → fp32: the 16 bits become the high half of the fp32 word (exact).
KVTRIM_X86_AVX2 inline void bfloat16_to_float(const std::uint16_t* in, float* out, std::int64_t count) {
  std::int64_t d = 0;
  for (; d + 8 <= count; d += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + d)));
    _mm256_storeu_ps(out + d, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; d < count; ++d) {
    const std::uint32_t bits = static_cast<std::uint32_t>(in[d]) << 16;
    __builtin_memcpy(out + d, &bits, sizeof bits);
  }
}

/// Sum of the eight lanes in a fixed order.
KVTRIM_X86_AVX2 inline float lane_sum(__m256 v) {
  const __m128 half_sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half_sum, _mm_movehl_ps(half_sum, half_sum));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

/// dots[i] = query · rows[i·dim ..], for `count` rows of `dim` floats.
KVTRIM_X86_AVX2 inline void dot_rows(const float* query, const float* rows, std::int64_t count, std::int64_t dim,
                                     float* dots) {
  for (std::int64_t i = 0; i < count; ++i) {
    const float* row = rows + i * dim;
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // two chains hide the FMA latency
    std::int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      even = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(row + d), even);
      odd = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8), _mm256_loadu_ps(row + d + 8), odd);
    }
    if (d + 8 <= dim) {
      even = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(row + d), even);
      d += 8;
    }
    float sum = lane_sum(_mm256_add_ps(even, odd));
    for (; d < dim; ++d) sum += query[d] * row[d];
    dots[i] = sum;
  }
}

/// accumulators[g·dim + d] += weights[g·weight_stride + i] · rows[i·dim + d]
/// for the `heads` query heads of a group and `count` rows. Eight columns at a
/// time: the group's accumulators for them stay in registers over all rows (no
/// load/store of an accumulator per row), each value row chunk is loaded once for
/// the whole group. Per (g, d) the rows are added in order i = 0, 1, …, as the
/// portable loop does.
KVTRIM_X86_AVX2 inline void accumulate_rows(float* accumulators, const float* weights, std::int64_t weight_stride,
                                            std::int64_t heads, const float* rows, std::int64_t count,
                                            std::int64_t dim) {
  constexpr std::int64_t max_heads = 8;  // decode_attention's max_heads_at_once
  std::int64_t g0 = 0;
  for (; g0 < heads; g0 += max_heads) {
    const std::int64_t group = heads - g0 < max_heads ? heads - g0 : max_heads;
    std::int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
      __m256 acc[max_heads];
      for (std::int64_t g = 0; g < group; ++g) acc[g] = _mm256_loadu_ps(accumulators + (g0 + g) * dim + d);
      for (std::int64_t i = 0; i < count; ++i) {
        const __m256 value = _mm256_loadu_ps(rows + i * dim + d);
        for (std::int64_t g = 0; g < group; ++g)
          acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + (g0 + g) * weight_stride + i), value, acc[g]);
      }
      for (std::int64_t g = 0; g < group; ++g) _mm256_storeu_ps(accumulators + (g0 + g) * dim + d, acc[g]);
    }
    for (; d < dim; ++d)
      for (std::int64_t g = 0; g < group; ++g) {
        float sum = accumulators[(g0 + g) * dim + d];
        for (std::int64_t i = 0; i < count; ++i) sum += weights[(g0 + g) * weight_stride + i] * rows[i * dim + d];
        accumulators[(g0 + g) * dim + d] = sum;
      }
  }
}

#undef KVTRIM_X86_AVX2

#else

inline bool has_avx2_fma_f16c() { return false; }

#endif

}  // namespace kvtrim::detail::x86
