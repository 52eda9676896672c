// The CPU backend's hand-vectorised pieces (issue 13) against their definitions:
//   1. detail/exp.hpp: cpu_exp (one float) and cpu_exp8 (eight lanes) give the
//      same bits for a dense sample of every float in [−104, 89] and for the
//      special values; both are within 1.013 ulp of the correctly rounded exp
//      (the whole range was checked once exhaustively, docs/results.md); the row
//      helpers (cpu_exp_shifted, cpu_exp_shifted_sum_avx2) equal the scalar loop.
//   2. detail/x86.hpp, decode attention's inner loops over stored rows read in
//      place (fp16, bf16, fp32; any head count 1–8, row count, head dim):
//      conversions exact for every fp16 / bf16 bit pattern; q·k and Σ p·v within
//      the summation bound; scale_and_max equal to fma(s, scale, bias) per
//      element, its maximum ignoring NaN as std::fmax does.
//   3. Whole decode attention on both paths (vectorised, and portable with the
//      switch x86::vector_paths_enabled off) within the double oracle's bound
//      (tests/common/tolerance.hpp); every other shape: decode_attention_test.cpp.
#include <gtest/gtest.h>

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/oracle.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "common/tolerance.hpp"

namespace {

namespace kd = kvtrim::detail;

/// |got − exp(x)| in units in the last place of the correctly rounded float exp(x)
/// (subnormal results: in units of the smallest subnormal).
double ulp_error(float got, float x) {
  const double exact = std::exp(static_cast<double>(x));
  const float rounded = static_cast<float>(exact);
  if (std::isinf(rounded)) return std::isinf(got) ? 0.0 : INFINITY;
  const double ulp = rounded == 0.0f ? 0x1p-149 : std::ldexp(1.0, std::max(std::ilogb(rounded) - 23, -149));
  return std::abs(static_cast<double>(got) - exact) / ulp;
}

/// Floats in [−104, 89] by walking their bit patterns with a fixed stride (both signs).
std::vector<float> sampled_floats(std::uint32_t stride) {
  std::vector<float> floats;
  for (std::uint64_t bits = 0; bits < 0x100000000ull; bits += stride) {
    const float x = std::bit_cast<float>(static_cast<std::uint32_t>(bits));
    if (x >= -104.0f && x <= 89.0f) floats.push_back(x);
  }
  return floats;
}

TEST(CpuExp, WithinOnePointZeroOneThreeUlpOfExp) {
  double worst = 0.0;
  float worst_at = 0.0f;
  for (const float x : sampled_floats(4099)) {
    const double error = ulp_error(kd::cpu_exp(x), x);
    if (error > worst) worst = error, worst_at = x;
  }
  EXPECT_LE(worst, 1.013) << "at x = " << worst_at;
  // Exact points and the range ends.
  EXPECT_EQ(kd::cpu_exp(0.0f), 1.0f);
  EXPECT_EQ(kd::cpu_exp(-0.0f), 1.0f);
  EXPECT_EQ(kd::cpu_exp(std::numeric_limits<float>::infinity()), std::numeric_limits<float>::infinity());
  EXPECT_EQ(std::bit_cast<std::uint32_t>(kd::cpu_exp(-std::numeric_limits<float>::infinity())), 0u);  // +0
  EXPECT_TRUE(std::isnan(kd::cpu_exp(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(kd::cpu_exp(88.72283f), std::exp(88.72283f));                  // just below FLT_MAX
  EXPECT_EQ(kd::cpu_exp(88.7228394f), std::numeric_limits<float>::infinity());  // just above
  EXPECT_EQ(kd::cpu_exp(1e30f), std::numeric_limits<float>::infinity());
  EXPECT_EQ(kd::cpu_exp(-103.5f), std::numeric_limits<float>::denorm_min());  // subnormal, rounded once
  EXPECT_EQ(kd::cpu_exp(-87.5f), std::exp(-87.5f));                        // near the normal range's end
  EXPECT_EQ(kd::cpu_exp(-105.0f), 0.0f);
  EXPECT_EQ(kd::cpu_exp(-1e30f), 0.0f);
}

#if KVTRIM_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"))) void exp_eight(const float* in, float* out) {
  _mm256_storeu_ps(out, kd::cpu_exp8(_mm256_loadu_ps(in)));
}

TEST(CpuExp, EightLanesGiveTheScalarBits) {
  if (!kd::x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA";
  std::vector<float> inputs = sampled_floats(1021);
  for (const float x : {0.0f, -0.0f, 1.0f, -1.0f, 88.72283f, 88.7228394f, 89.0f, 89.5f, -87.5f, -103.5f, -104.0f,
                        -105.0f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min(),
                        -std::numeric_limits<float>::denorm_min()})
    inputs.push_back(x);
  while (inputs.size() % 8 != 0) inputs.push_back(0.5f);
  std::vector<float> lanes(inputs.size());
  for (std::size_t i = 0; i < inputs.size(); i += 8) exp_eight(inputs.data() + i, lanes.data() + i);
  for (std::size_t i = 0; i < inputs.size(); ++i)
    ASSERT_EQ(std::bit_cast<std::uint32_t>(lanes[i]), std::bit_cast<std::uint32_t>(kd::cpu_exp(inputs[i])))
        << "x = " << inputs[i];
  const float nans[8] = {NAN, 1.0f, NAN, -NAN, 2.0f, NAN, 0.0f, NAN};
  float out[8];
  exp_eight(nans, out);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(std::isnan(out[i]), std::isnan(nans[i])) << "lane " << i;
}

TEST(CpuExp, RowHelpersEqualTheScalarLoop) {
  if (!kd::x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA";
  std::mt19937 random(5);
  std::normal_distribution<float> normal(0.0f, 6.0f);
  for (const std::int64_t count : {0, 1, 7, 8, 9, 15, 64, 100}) {
    std::vector<float> values(static_cast<std::size_t>(count));
    for (float& v : values) v = normal(random);
    const float shift = count > 0 ? *std::max_element(values.begin(), values.end()) : 0.0f;
    std::vector<float> scalar = values, rows = values, summed = values;
    for (float& v : scalar) v = kd::cpu_exp(v - shift);
    kd::cpu_exp_shifted(rows.data(), count, shift);
    const float sum = kd::cpu_exp_shifted_sum_avx2(summed.data(), count, shift);
    double exact = 0.0;
    for (std::int64_t i = 0; i < count; ++i) {
      ASSERT_EQ(std::bit_cast<std::uint32_t>(rows[i]), std::bit_cast<std::uint32_t>(scalar[i])) << count << " " << i;
      ASSERT_EQ(std::bit_cast<std::uint32_t>(summed[i]), std::bit_cast<std::uint32_t>(scalar[i])) << count << " " << i;
      exact += scalar[i];
    }
    // A sum of n positive floats in any order is within (n − 1)·u of the exact one;
    // n·u more if the compiler fused a term's last product into its addition.
    EXPECT_NEAR(sum, exact, static_cast<double>(2 * count) * 0x1p-24 * exact) << count;
  }
}

// ---- decode attention's loops over stored rows (detail/x86.hpp) -------------------
namespace x86 = kd::x86;

__attribute__((target("avx2,fma,f16c"))) void load_eight_fp16(const std::uint16_t* in, float* out) {
  _mm256_storeu_ps(out, x86::load8<x86::row_format::fp16>(in, 0));
}
__attribute__((target("avx2,fma,f16c"))) void load_eight_bf16(const std::uint16_t* in, float* out) {
  _mm256_storeu_ps(out, x86::load8<x86::row_format::bf16>(in, 0));
}

TEST(DecodeAttentionX86, ConversionsExactForEveryBitPattern) {
  if (!x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  std::vector<std::uint16_t> all(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<std::uint16_t>(i);
  std::vector<float> portable(all.size()), eight(8);
  kd::half_row_to_float(reinterpret_cast<const kvtrim::half*>(all.data()), portable.data(), 65536);
  for (std::uint32_t i = 0; i < 65536; i += 8) {
    load_eight_fp16(all.data() + i, eight.data());
    for (std::uint32_t l = 0; l < 8; ++l) {
      if (std::isnan(portable[i + l]))  // vcvtph2ps quiets signalling NaNs; NaN never reaches a cache
        ASSERT_TRUE(std::isnan(eight[l])) << "half bits " << i + l;
      else
        ASSERT_EQ(std::bit_cast<std::uint32_t>(eight[l]), std::bit_cast<std::uint32_t>(portable[i + l]))
            << "half bits " << i + l;
      ASSERT_EQ(std::bit_cast<std::uint32_t>(x86::load1<x86::row_format::fp16>(all.data(), i + l)),
                std::bit_cast<std::uint32_t>(eight[l]))
          << "half bits " << i + l << " (the tail's conversion)";
    }
  }
  kd::row_to_float(reinterpret_cast<const kvtrim::bfloat16*>(all.data()), portable.data(), 65536);
  for (std::uint32_t i = 0; i < 65536; i += 8) {
    load_eight_bf16(all.data() + i, eight.data());
    for (std::uint32_t l = 0; l < 8; ++l) {
      ASSERT_EQ(std::bit_cast<std::uint32_t>(eight[l]), std::bit_cast<std::uint32_t>(portable[i + l]))
          << "bf16 bits " << i + l;
      ASSERT_EQ(std::bit_cast<std::uint32_t>(x86::load1<x86::row_format::bf16>(all.data(), i + l)),
                std::bit_cast<std::uint32_t>(eight[l]))
          << "bf16 bits " << i + l;
    }
  }
}

/// Rows of `dim` elements in storage type T, scattered (every other slot of a pool,
/// so no two consecutive rows touch), with their exact fp32 values.
template <class T>
struct stored_rows {
  std::vector<T> pool;
  std::vector<const void*> rows;
  std::vector<float> values;  // [count, dim]: what the stored elements are in fp32

  stored_rows(std::int64_t count, std::int64_t dim, std::mt19937& random) {
    std::normal_distribution<float> normal;
    pool.resize(static_cast<std::size_t>(2 * count * dim + 1));
    for (std::int64_t i = 0; i < count; ++i)
      for (std::int64_t d = 0; d < dim; ++d) {
        const T stored = kvtrim::from_float<T>(normal(random));
        pool[static_cast<std::size_t>((2 * i + 1) * dim + d)] = stored;
        values.push_back(kvtrim::to_float(stored));
      }
    for (std::int64_t i = 0; i < count; ++i) rows.push_back(pool.data() + (2 * i + 1) * dim);
  }
};

template <class T, x86::row_format Format>
void check_dots_and_sums() {
  std::mt19937 random(11);
  std::normal_distribution<float> normal;
  for (const std::int64_t dim : {1, 7, 8, 24, 100, 128, 256})
    for (const std::int64_t heads : {1, 2, 3, 4, 5, 8})
      for (const std::int64_t count : {1, 3, 13, 64}) {
        SCOPED_TRACE(kd::cat("dim ", dim, ", heads ", heads, ", rows ", count));
        const std::int64_t stride = 64;
        stored_rows<T> keys(count, dim, random), next(count, dim, random);
        std::vector<float> queries(static_cast<std::size_t>(heads * dim)), logits(static_cast<std::size_t>(heads * stride));
        for (float& x : queries) x = normal(random);
        const x86::prefetch_rows ahead{next.rows.data(), count, dim * static_cast<std::int64_t>(sizeof(T))};
        x86::dot_rows<Format>(queries.data(), heads, keys.rows.data(), count, dim, logits.data(), stride, ahead);
        // Bound: a sum of n products in fp32, any order, with or without FMA, is within
        // n·u·Σ|terms| of the exact value (u = 2⁻²⁴; Jeannerod & Rump 2013).
        for (std::int64_t g = 0; g < heads; ++g)
          for (std::int64_t i = 0; i < count; ++i) {
            double exact = 0.0, magnitude = 0.0;
            for (std::int64_t d = 0; d < dim; ++d) {
              const double term = static_cast<double>(queries[g * dim + d]) * keys.values[i * dim + d];
              exact += term;
              magnitude += std::abs(term);
            }
            ASSERT_NEAR(logits[g * stride + i], exact, static_cast<double>(dim) * 0x1p-24 * magnitude + 1e-30)
                << "head " << g << " row " << i;
          }
        std::vector<float> weights(static_cast<std::size_t>(heads * stride)), sums(static_cast<std::size_t>(heads * dim));
        for (float& x : weights) x = std::abs(normal(random));
        for (float& x : sums) x = normal(random);
        const std::vector<float> start = sums;
        x86::accumulate_rows<Format>(sums.data(), weights.data(), stride, heads, keys.rows.data(), count, dim, ahead);
        for (std::int64_t g = 0; g < heads; ++g)
          for (std::int64_t d = 0; d < dim; ++d) {
            double exact = start[g * dim + d], magnitude = std::abs(exact);
            for (std::int64_t i = 0; i < count; ++i) {
              const double term = static_cast<double>(weights[g * stride + i]) * keys.values[i * dim + d];
              exact += term;
              magnitude += std::abs(term);
            }
            ASSERT_NEAR(sums[g * dim + d], exact, static_cast<double>(count + 1) * 0x1p-24 * magnitude)
                << "head " << g << " column " << d;
          }
      }
}

TEST(DecodeAttentionX86, DotsAndWeightedSumsWithinTheSummationBoundFp16) {
  if (!x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  check_dots_and_sums<kvtrim::half, x86::row_format::fp16>();
}
TEST(DecodeAttentionX86, DotsAndWeightedSumsWithinTheSummationBoundBf16) {
  if (!x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  check_dots_and_sums<kvtrim::bfloat16, x86::row_format::bf16>();
}
TEST(DecodeAttentionX86, DotsAndWeightedSumsWithinTheSummationBoundFp32) {
  if (!x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  check_dots_and_sums<float, x86::row_format::fp32>();
}

TEST(DecodeAttentionX86, ScaleAndMaxEqualsTheScalarLoopAndIgnoresNaN) {
  if (!x86::has_avx2_fma_f16c()) GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C";
  std::mt19937 random(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (const std::int64_t count : {1, 5, 8, 17, 64})
    for (const bool with_bias : {false, true}) {
      std::vector<float> logits(static_cast<std::size_t>(count)), bias(logits.size());
      for (float& x : logits) x = normal(random);
      for (float& x : bias) x = std::abs(normal(random));
      logits[static_cast<std::size_t>(count / 2)] = std::numeric_limits<float>::quiet_NaN();
      std::vector<float> scaled = logits;
      const float largest = x86::scale_and_max(scaled.data(), count, 0.125f, with_bias ? bias.data() : nullptr);
      float want = -std::numeric_limits<float>::infinity();
      for (std::int64_t i = 0; i < count; ++i) {
        const float expected = with_bias ? std::fma(logits[i], 0.125f, bias[i]) : logits[i] * 0.125f;
        if (std::isnan(expected))
          EXPECT_TRUE(std::isnan(scaled[i]));
        else  // s·scale + bias as one fused multiply-add, in every lane and the tail
          EXPECT_EQ(scaled[i], expected) << count << " " << i;
        want = std::fmax(want, expected);
      }
      EXPECT_EQ(largest, want) << count << (with_bias ? " with bias" : "");
    }
  float all_nan[3] = {NAN, NAN, NAN};
  EXPECT_EQ(x86::scale_and_max(all_nan, 3, 1.0f, nullptr), -std::numeric_limits<float>::infinity());
}

// ---- whole decode attention, both paths --------------------------------------------
namespace kts = kvtrim::testing;

struct decode_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens;
};

/// Appends `tokens` tokens, attends once, returns the worst |error| / bound against the oracle.
template <class Codec, class InputT>
double decode_worst_ratio(const decode_case& c, std::uint64_t seed) {
  using scheme = kts::streaming_scheme<Codec>;
  const kvtrim::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  auto keys = kts::random_tensor<InputT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed, 1.0f);
  auto values = kts::random_tensor<InputT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed + 1, 1.0f);
  auto queries = kts::random_tensor<InputT, 3>({c.batch, shape.q_heads, c.head_dim}, seed + 2, 1.0f);
  auto out = kts::make_tensor<float, 3>({c.batch, shape.q_heads, c.head_dim});
  auto cache = scheme::make_cache(shape, c.batch, c.tokens, typename Codec::config{});
  scheme::append(cache.view(), keys.view, values.view);
  scheme::attend(queries.view, cache.view(), out.view, kvtrim::workspace{});
  const auto every_token = [&](std::int64_t, std::int64_t) { return kts::kept_tokens{kts::all_tokens(c.tokens), {}}; };
  const auto oracle = kts::oracle_attention(queries.view, keys.view, values.view, c.kv_heads, every_token);
  const auto bounds = kts::attention_bounds(queries.view, keys.view, values.view, c.kv_heads, every_token, {});
  return kts::check_against(out.view, oracle, bounds).worst_ratio;
}

TEST(DecodeAttentionX86, VectorisedAndPortablePathsWithinTheOracleBound) {
  // Blocks of 64 rows with tails (65, 300), head dims with tails (24, 100), every
  // GQA width the kernels specialise (1 … 8 heads at once), one token.
  const decode_case cases[] = {{1, 2, 4, 128, 300}, {2, 1, 8, 64, 129}, {1, 3, 1, 100, 65}, {1, 2, 3, 24, 1},
                               {1, 1, 5, 64, 70},   {1, 1, 6, 32, 64},  {1, 1, 7, 16, 3},   {1, 2, 2, 128, 200}};
  for (const bool vectorised : {true, false}) {
    x86::vector_paths_enabled() = vectorised;
    for (const decode_case& c : cases) {
      SCOPED_TRACE(kd::cat(vectorised ? "vectorised" : "portable", ", B", c.batch, " Hkv", c.kv_heads, " G", c.group,
                           " D", c.head_dim, " T", c.tokens));
      EXPECT_LE((decode_worst_ratio<kvtrim::codec::fp16, kvtrim::half>(c, 41)), 1.0) << "fp16";
      EXPECT_LE((decode_worst_ratio<kvtrim::codec::bf16, kvtrim::bfloat16>(c, 42)), 1.0) << "bf16";
      EXPECT_LE((decode_worst_ratio<kvtrim::codec::fp32, float>(c, 43)), 1.0) << "fp32";
    }
  }
  x86::vector_paths_enabled() = true;
}
#endif

}  // namespace
