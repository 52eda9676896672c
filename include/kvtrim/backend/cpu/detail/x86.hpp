// kvtrim/backend/cpu/detail/x86.hpp — the decode attention's inner loops with
// AVX2, FMA and F16C, chosen at run time.
//
// Why run-time dispatch: kvtrim is header-only and its users build with their
// own flags — usually none beyond -O2, i.e. SSE2 on x86-64. Without F16C the
// fp16 → fp32 conversion is a dozen integer operations per element and bounds
// decode at ~2.5 GB/s of cache on a 2-core machine whose memory moves ~20 GB/s;
// with `vcvtph2ps` and 8-lane FMAs the same loops run at memory speed. So the
// loops decode spends its time in (q·k over a block of rows, the block's
// softmax, Σ p·v into the accumulators) exist twice: the portable form in
// decode_attention.hpp and the functions below, compiled for AVX2+FMA+F16C
// through GCC/Clang's `target` attribute (no flags needed) and called only when
// the CPU reports all three (`__builtin_cpu_supports`, checked once).
//
// What makes them fast (issue 13, measured in docs/results.md): they read the
// stored rows in place — fp16/bf16/fp32, converted in registers (no fp32 copy of
// the block written and read back), each key chunk loaded once for the whole
// GQA group and each query chunk once for several rows (up to 8 sums in
// registers); Σ p·v keeps the group's accumulators for 8–32 columns in registers
// over all rows of a block; and they name the next rows to fetch (software
// prefetch: this block's values during the dots, the next block's keys during
// Σ p·v), so the loads of one block overlap the arithmetic of the previous one.
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

#include <atomic>
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
// GCC's unroll hint; nvcc's front end parses these host functions too and warns
// on a pragma it does not know (#1675-D), so CUDA translation units go without it.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define KVTRIM_X86_UNROLL_8 _Pragma("GCC unroll 8")
#else
#define KVTRIM_X86_UNROLL_8
#endif

/// The process-wide switch for the hand-vectorised paths (default on): tests turn
/// it off to run the portable paths on a CPU that has AVX2. Flip it only while no
/// kvtrim call runs.
inline std::atomic<bool>& vector_paths_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

/// True when this CPU runs AVX2, FMA and F16C (asked once per process) and the
/// switch above is on.
inline bool has_avx2_fma_f16c() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return supported && vector_paths_enabled().load(std::memory_order_relaxed);
}

/// How a stored row's elements are laid out: the three plain codecs.
enum class row_format { fp16, bf16, fp32 };

/// Eight elements of a stored row → eight fp32 lanes (exact: vcvtph2ps, a shift, a load).
template <row_format Format>
KVTRIM_X86_AVX2 inline __m256 load8(const void* row, std::int64_t d) {
  if constexpr (Format == row_format::fp16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(row) + d)));
  } else if constexpr (Format == row_format::bf16) {
    const __m256i wide = _mm256_cvtepu16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(row) + d)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(row) + d);
  }
}

/// One element of a stored row → fp32 (the columns past the last whole eight).
template <row_format Format>
KVTRIM_X86_AVX2 inline float load1(const void* row, std::int64_t d) {
  if constexpr (Format == row_format::fp16) {
    return _cvtsh_ss(static_cast<const std::uint16_t*>(row)[d]);
  } else if constexpr (Format == row_format::bf16) {
    const std::uint32_t bits = static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(row)[d]) << 16;
    float value;
    __builtin_memcpy(&value, &bits, sizeof bits);
    return value;
  } else {
    return static_cast<const float*>(row)[d];
  }
}

/// A stored row of `count` elements → fp32 (exact: the same bits as the portable
/// conversions in decode_attention.hpp / Eigen's).
template <row_format Format>
KVTRIM_X86_AVX2 inline void convert_row(const void* row, float* out, std::int64_t count) {
  std::int64_t d = 0;
  for (; d + 8 <= count; d += 8) _mm256_storeu_ps(out + d, load8<Format>(row, d));
  for (; d < count; ++d) out[d] = load1<Format>(row, d);
}

/// Sum of the eight lanes in a fixed order.
KVTRIM_X86_AVX2 inline float lane_sum(__m256 v) {
  const __m128 half_sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half_sum, _mm_movehl_ps(half_sum, half_sum));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

/// logits[i] = logits[i]·scale, or fma(logits[i], scale, bias[i]) when bias is not
/// null, for i < count; returns their maximum, ignoring NaN as std::fmax does
/// (vmaxps keeps the running maximum when the new value is NaN). −∞ when count
/// is 0 or all are NaN.
KVTRIM_X86_AVX2 inline float scale_and_max(float* logits, std::int64_t count, float scale, const float* bias) {
  const __m256 factor = _mm256_set1_ps(scale);
  __m256 largest = _mm256_set1_ps(-__builtin_inff());
  std::int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 logit = _mm256_loadu_ps(logits + i);
    const __m256 s = bias != nullptr ? _mm256_fmadd_ps(logit, factor, _mm256_loadu_ps(bias + i))
                                     : _mm256_mul_ps(logit, factor);
    _mm256_storeu_ps(logits + i, s);
    largest = _mm256_max_ps(s, largest);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  float result = -__builtin_inff();
  for (const float lane : lanes) result = lane > result ? lane : result;
  for (; i < count; ++i) {
    logits[i] = bias != nullptr ? __builtin_fmaf(logits[i], scale, bias[i]) : logits[i] * scale;
    result = logits[i] > result ? logits[i] : result;
  }
  return result;
}

/// Rows to bring into the cache while a kernel works on others (software
/// prefetch: the next rows of a head are wherever its layout put them, so the
/// hardware's stream detection cannot always find them; here they are named).
struct prefetch_rows {
  const void* const* rows = nullptr;
  std::int64_t count = 0;
  std::int64_t bytes = 0;  // per row

  /// Prefetches rows [count·part/parts, count·(part + 1)/parts): part `part` of `parts`.
  KVTRIM_X86_AVX2 void issue(std::int64_t part, std::int64_t parts) const {
    for (std::int64_t r = count * part / parts; r < count * (part + 1) / parts; ++r)
      for (std::int64_t offset = 0; offset < bytes; offset += 64)
        _mm_prefetch(static_cast<const char*>(rows[r]) + offset, _MM_HINT_T0);
  }
};

/// Rows × Heads dot products: logits[g·stride + i + r] = query_g · row_{i+r}.
/// Each eight-element chunk of a row is loaded and converted once for all heads,
/// each chunk of a query once for all rows; the Rows·Heads sums stay in registers.
template <row_format Format, int Heads, int Rows>
KVTRIM_X86_AVX2 inline void dot_tile(const float* queries, const void* const* rows, std::int64_t i, std::int64_t dim,
                                     float* logits, std::int64_t stride) {
  __m256 sum[Rows][Heads];
  KVTRIM_X86_UNROLL_8
  for (int r = 0; r < Rows; ++r)
    KVTRIM_X86_UNROLL_8
    for (int g = 0; g < Heads; ++g) sum[r][g] = _mm256_setzero_ps();
  std::int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    __m256 key[Rows];
    KVTRIM_X86_UNROLL_8
    for (int r = 0; r < Rows; ++r) key[r] = load8<Format>(rows[i + r], d);
    KVTRIM_X86_UNROLL_8
    for (int g = 0; g < Heads; ++g) {
      const __m256 query = _mm256_loadu_ps(queries + g * dim + d);
      KVTRIM_X86_UNROLL_8
      for (int r = 0; r < Rows; ++r) sum[r][g] = _mm256_fmadd_ps(query, key[r], sum[r][g]);
    }
  }
  KVTRIM_X86_UNROLL_8
  for (int r = 0; r < Rows; ++r)
    KVTRIM_X86_UNROLL_8
    for (int g = 0; g < Heads; ++g) {
      float total = lane_sum(sum[r][g]);
      for (std::int64_t e = d; e < dim; ++e) total += queries[g * dim + e] * load1<Format>(rows[i + r], e);
      logits[g * stride + i + r] = total;
    }
}

template <row_format Format, int Heads>
KVTRIM_X86_AVX2 inline void dot_rows_of(const float* queries, const void* const* rows, std::int64_t count,
                                        std::int64_t dim, float* logits, std::int64_t stride,
                                        const prefetch_rows& next) {
  constexpr int rows_at_once = Heads >= 8 ? 1 : 8 / Heads;  // ≤ 8 sums in registers
  const std::int64_t whole = count / rows_at_once * rows_at_once, tiles = (count + rows_at_once - 1) / rows_at_once;
  std::int64_t i = 0;
  for (; i < whole; i += rows_at_once) {
    next.issue(i / rows_at_once, tiles);
    dot_tile<Format, Heads, rows_at_once>(queries, rows, i, dim, logits, stride);
  }
  if (i < count) next.issue(tiles - 1, tiles);
  for (; i < count; ++i) dot_tile<Format, Heads, 1>(queries, rows, i, dim, logits, stride);
}

/// logits[g·stride + i] = queries[g·dim ..] · rows[i][..] for heads g < `heads`
/// (1…8) and rows i < `count`; rows[i] points at a stored row of `dim`
/// elements in `Format`. Per dot: eight lane sums over the chunks in order, then
/// the lanes (lane_sum), then the columns past the last whole eight.
template <row_format Format>
KVTRIM_X86_AVX2 inline void dot_rows(const float* queries, std::int64_t heads, const void* const* rows,
                                     std::int64_t count, std::int64_t dim, float* logits, std::int64_t stride,
                                     const prefetch_rows& next = {}) {
  switch (heads) {
    case 1: return dot_rows_of<Format, 1>(queries, rows, count, dim, logits, stride, next);
    case 2: return dot_rows_of<Format, 2>(queries, rows, count, dim, logits, stride, next);
    case 3: return dot_rows_of<Format, 3>(queries, rows, count, dim, logits, stride, next);
    case 4: return dot_rows_of<Format, 4>(queries, rows, count, dim, logits, stride, next);
    case 5: return dot_rows_of<Format, 5>(queries, rows, count, dim, logits, stride, next);
    case 6: return dot_rows_of<Format, 6>(queries, rows, count, dim, logits, stride, next);
    case 7: return dot_rows_of<Format, 7>(queries, rows, count, dim, logits, stride, next);
    default: return dot_rows_of<Format, 8>(queries, rows, count, dim, logits, stride, next);
  }
}

/// Σ over rows into Heads × (8·Chunks) accumulator columns starting at d, kept in registers over all rows.
template <row_format Format, int Heads, int Chunks>
KVTRIM_X86_AVX2 inline void accumulate_tile(float* accumulators, const float* weights, std::int64_t weight_stride,
                                            const void* const* rows, std::int64_t count, std::int64_t dim,
                                            std::int64_t d) {
  __m256 acc[Heads][Chunks];
  KVTRIM_X86_UNROLL_8
  for (int g = 0; g < Heads; ++g)
    KVTRIM_X86_UNROLL_8
    for (int c = 0; c < Chunks; ++c) acc[g][c] = _mm256_loadu_ps(accumulators + g * dim + d + 8 * c);
  for (std::int64_t i = 0; i < count; ++i) {
    __m256 value[Chunks];
    KVTRIM_X86_UNROLL_8
    for (int c = 0; c < Chunks; ++c) value[c] = load8<Format>(rows[i], d + 8 * c);
    KVTRIM_X86_UNROLL_8
    for (int g = 0; g < Heads; ++g) {
      const __m256 weight = _mm256_broadcast_ss(weights + g * weight_stride + i);
      KVTRIM_X86_UNROLL_8
      for (int c = 0; c < Chunks; ++c) acc[g][c] = _mm256_fmadd_ps(weight, value[c], acc[g][c]);
    }
  }
  KVTRIM_X86_UNROLL_8
  for (int g = 0; g < Heads; ++g)
    KVTRIM_X86_UNROLL_8
    for (int c = 0; c < Chunks; ++c) _mm256_storeu_ps(accumulators + g * dim + d + 8 * c, acc[g][c]);
}

template <row_format Format, int Heads>
KVTRIM_X86_AVX2 inline void accumulate_rows_of(float* accumulators, const float* weights, std::int64_t weight_stride,
                                               const void* const* rows, std::int64_t count, std::int64_t dim,
                                               const prefetch_rows& next) {
  constexpr int chunks_at_once = Heads >= 8 ? 1 : 8 / Heads > 4 ? 4 : 8 / Heads;  // ≤ 8 accumulators
  const std::int64_t passes = dim / (8 * chunks_at_once) + (dim % (8 * chunks_at_once)) / 8 + 1;
  std::int64_t d = 0, pass = 0;
  for (; d + 8 * chunks_at_once <= dim; d += 8 * chunks_at_once) {
    next.issue(pass++, passes);
    accumulate_tile<Format, Heads, chunks_at_once>(accumulators, weights, weight_stride, rows, count, dim, d);
  }
  for (; d + 8 <= dim; d += 8) {
    next.issue(pass++, passes);
    accumulate_tile<Format, Heads, 1>(accumulators, weights, weight_stride, rows, count, dim, d);
  }
  next.issue(pass, passes);
  for (; d < dim; ++d)
    for (int g = 0; g < Heads; ++g) {
      float sum = accumulators[g * dim + d];
      for (std::int64_t i = 0; i < count; ++i) sum += weights[g * weight_stride + i] * load1<Format>(rows[i], d);
      accumulators[g * dim + d] = sum;
    }
}

/// accumulators[g·dim + d] += weights[g·weight_stride + i] · rows[i][d] for heads
/// g < `heads` (1…8), rows i < `count`, rows[i] a stored row in `Format`. Per
/// (g, d) the rows are added in order i = 0, 1, … (a fused multiply-add each for
/// whole chunks of eight columns), as the portable loop adds them.
template <row_format Format>
KVTRIM_X86_AVX2 inline void accumulate_rows(float* accumulators, const float* weights, std::int64_t weight_stride,
                                            std::int64_t heads, const void* const* rows, std::int64_t count,
                                            std::int64_t dim, const prefetch_rows& next = {}) {
  switch (heads) {
    case 1: return accumulate_rows_of<Format, 1>(accumulators, weights, weight_stride, rows, count, dim, next);
    case 2: return accumulate_rows_of<Format, 2>(accumulators, weights, weight_stride, rows, count, dim, next);
    case 3: return accumulate_rows_of<Format, 3>(accumulators, weights, weight_stride, rows, count, dim, next);
    case 4: return accumulate_rows_of<Format, 4>(accumulators, weights, weight_stride, rows, count, dim, next);
    case 5: return accumulate_rows_of<Format, 5>(accumulators, weights, weight_stride, rows, count, dim, next);
    case 6: return accumulate_rows_of<Format, 6>(accumulators, weights, weight_stride, rows, count, dim, next);
    case 7: return accumulate_rows_of<Format, 7>(accumulators, weights, weight_stride, rows, count, dim, next);
    default: return accumulate_rows_of<Format, 8>(accumulators, weights, weight_stride, rows, count, dim, next);
  }
}

// ---- the attention-mass scorers' logits (SnapKV, H2O: attention_mass.hpp) ----------
// Compiled for AVX2 *without* FMA, on purpose: each logit is the reference's
// Σ_d q_d·k_d summed from zero over d = 0, 1, …, D−1 with a rounded product and
// a rounded sum per step (what the portable build's scalar loop and Eigen's SSE
// kernel compute). Without FMA in the target the compiler cannot fuse the two,
// so these are the reference's bits — eight rows of a query block per vector.
// (A build whose own flags enable FMA, e.g. -march=native, lets the compiler
// fuse here and in the scalar reference alike.)
#define KVTRIM_X86_AVX2_NO_FMA __attribute__((target("avx2")))

/// Rows [r0, r0 + 16) × keys [j, j + Keys): queries_t is the query block
/// transposed ([d][row], `row_stride` floats per d), keys row-major [key][d].
template <int Keys>
KVTRIM_X86_AVX2_NO_FMA inline void logit_tile(const float* queries_t, std::int64_t row_stride, std::int64_t r0,
                                              std::int64_t rows, const float* keys, std::int64_t j, std::int64_t dim,
                                              float* logits, std::int64_t logit_stride) {
  __m256 sum[2][Keys];
  KVTRIM_X86_UNROLL_8
  for (int k = 0; k < Keys; ++k) sum[0][k] = sum[1][k] = _mm256_setzero_ps();
  const float* key = keys + j * dim;
  for (std::int64_t d = 0; d < dim; ++d) {
    const __m256 low = _mm256_loadu_ps(queries_t + d * row_stride + r0);
    const __m256 high = _mm256_loadu_ps(queries_t + d * row_stride + r0 + 8);
    KVTRIM_X86_UNROLL_8
    for (int k = 0; k < Keys; ++k) {
      const __m256 value = _mm256_broadcast_ss(key + k * dim + d);
      sum[0][k] = _mm256_add_ps(sum[0][k], _mm256_mul_ps(low, value));
      sum[1][k] = _mm256_add_ps(sum[1][k], _mm256_mul_ps(high, value));
    }
  }
  alignas(32) float tile[Keys][16];
  KVTRIM_X86_UNROLL_8
  for (int k = 0; k < Keys; ++k) {
    _mm256_store_ps(tile[k], sum[0][k]);
    _mm256_store_ps(tile[k] + 8, sum[1][k]);
  }
  for (std::int64_t r = 0; r < 16 && r0 + r < rows; ++r)
    for (int k = 0; k < Keys; ++k) logits[(r0 + r) * logit_stride + j + k] = tile[k][r];
}

/// logits[r·logit_stride + j] = Σ_d q_r[d]·k_j[d] for rows r < `rows` and keys
/// j < `keys_count`, in the reference's order and rounding (see above).
/// queries_t: [dim][row_stride] with row_stride ≥ rows rounded up to 16 (the
/// padding rows zero or anything: their logits are not written).
KVTRIM_X86_AVX2_NO_FMA inline void attention_logits(const float* queries_t, std::int64_t row_stride, std::int64_t rows,
                                                    const float* keys, std::int64_t keys_count, std::int64_t dim,
                                                    float* logits, std::int64_t logit_stride) {
  constexpr std::int64_t keys_at_once = 6;        // 12 sums + 2 query vectors + 1 key in registers
  constexpr std::int64_t keys_per_pass = 48;      // 48 keys (≤ 192 KiB at D = 1024) stay cached over all rows
  for (std::int64_t j0 = 0; j0 < keys_count; j0 += keys_per_pass) {
    const std::int64_t end = keys_count - j0 < keys_per_pass ? keys_count : j0 + keys_per_pass;
    for (std::int64_t r0 = 0; r0 < rows; r0 += 16) {
      std::int64_t j = j0;
      for (; j + keys_at_once <= end; j += keys_at_once)
        logit_tile<keys_at_once>(queries_t, row_stride, r0, rows, keys, j, dim, logits, logit_stride);
      switch (end - j) {
        case 5: logit_tile<5>(queries_t, row_stride, r0, rows, keys, j, dim, logits, logit_stride); break;
        case 4: logit_tile<4>(queries_t, row_stride, r0, rows, keys, j, dim, logits, logit_stride); break;
        case 3: logit_tile<3>(queries_t, row_stride, r0, rows, keys, j, dim, logits, logit_stride); break;
        case 2: logit_tile<2>(queries_t, row_stride, r0, rows, keys, j, dim, logits, logit_stride); break;
        case 1: logit_tile<1>(queries_t, row_stride, r0, rows, keys, j, dim, logits, logit_stride); break;
        default: break;
      }
    }
  }
}

#undef KVTRIM_X86_AVX2_NO_FMA
#undef KVTRIM_X86_UNROLL_8

#undef KVTRIM_X86_AVX2

#else

inline bool has_avx2_fma_f16c() { return false; }

#endif

}  // namespace kvtrim::detail::x86
