// Every scorer on backend::cuda against the CPU reference (backend::cpu, the
// specification): SnapKV, H2O / observed attention, key norm, RazorAttention's
// retrieval heads (scores, keep counts, compensation rows) and external scores.
//
// What is compared, and why these tolerances:
// - Attention mass (SnapKV, H2O). Both backends compute the logit l = (q·k)/√D in
//   fp32 from the same 16-bit inputs; products are exact in fp32, only the order
//   of the D additions differs (CPU: d in order; GPU: tensor-core accumulation,
//   whose internal adds are not guaranteed round-to-nearest, so 2u per add). With
//   A = max‖q‖₂·max‖k‖₂ ≥ Σ_d |q_d k_d| (Cauchy–Schwarz), each logit differs by at
//   most δ_l = 3·D·u·A/√D (u = 2⁻²⁴: D·u·A for the CPU's sum, 2·D·u·A for the GPU's).
//   A probability exp(l − m)/Z then differs relatively by at most e^{3δ_l} − 1 (its
//   own logit, the row max, and Z, a positive sum of terms each off by e^{δ_l}),
//   and by e^{2δ_a} more for the exponent's own roundings (δ_a = 9·u·A/√D: the
//   GPU exponentiates in base 2, 2^(l·log2(e)/√D − m'), see attention_mass.cuh;
//   and by ≤ 2·u·A/√D more in the exponent for pass 1's online rescaling (its
//   factors 2^(fl(m_old·c) − fl(m_new·c)) are each rounded once, by ≤ u·(m_new − m_old)·c
//   in the base-2 exponent, and a row's running max of raw logits only grows within
//   [−A, A]: ≤ u·2A·c, times ln 2 with c = log2(e)/√D);
//   the wgmma pass 2 (sm_90a builds, attention_mass_wgmma.cuh) subtracts one value per
//   row, L = fl(m' + fl(log2 Z₂)), instead of multiplying by 1/Z: ≤ u·(|m'| + 3·log2 T)
//   more in the base-2 exponent (|m'| ≤ log2(e)·A/√D; log2f is within 1 ulp and
//   1 ≤ Z₂ ≤ T), and its fma's result is up to log2 Z₂ larger in magnitude (u·log2 T
//   more): ≤ u·(A/√D + 2.8·log2 T) in the natural exponent;
//   it flushes terms below 2⁻¹²⁶ to zero: < rows·2⁻¹²⁶ < 1e-35 absolute per score,
//   inside the comparison's absolute floor of 1e-30),
//   plus the rounding of Z's sums: ≤ T·u for the CPU's left-to-right sum over ≤ T
//   keys, ≤ (T/8 + 96)·u for the GPU's blocked one (a thread adds its 8 keys of
//   each 64-key tile to its running sum; then the 4 threads of a row, the two key
//   halves, the splits) and ≤ T/64·u more for its online rescaling (one exp and
//   one product per 64-key tile), plus a few u for exp (ex2.approx: 2 ulp), the
//   division (the GPU multiplies by a rounded 1/Z: 2u) and the scale. The
//   mass, window mean, pooling and group reduction are positive sums of such
//   terms: their relative error is the largest of their terms', plus (rows +
//   kernel + G + 8)·2u for their own roundings. That worst-case bound is the
//   per-score assertion (relative, scores are positive). It is loose (the CPU's
//   T·u assumes every rounding goes the same way); the measured worst ratio is
//   printed beside it.
// - Kept sets: top-k of the GPU scores vs top-k of the CPU scores (ties to the
//   lower index, both). A token may be in one and not the other only when its
//   CPU score lies within twice the tolerance of the CPU threshold (the k-th
//   score: the GPU's scores of both tokens may each be off by the tolerance).
//   That is checked, and the number of such swapped tokens is printed (≈ 0).
// - Given normalisers (config.lse, score/attention_mass.hpp): both backends compute
//   exp(l/√D − L) from the same float L (tests/common/given_lse.hpp: double, rounded
//   once), no max and no Z; the GPU skips pass 1. given_lse_tolerance derives the
//   bound; a few rows are poisoned (NaN, ±∞): both backends must drop them alike.
// - key norm: both sum squares in double and round once to float: equal, or 1 ulp
//   apart when the exact norm is within D·2⁻⁵³ of a float rounding boundary.
// - retrieval_head scores and keep counts: the same integer-valued function,
//   exact. Compensation means: double sums in different orders, one rounding to
//   float: ≤ 1 ulp. Bias, index, position: exact.
// - external: a copy (NaN → −∞): exact.
// Pipelines: scheme<contiguous, X, uniform, fp16> on both backends: the kept
// tokens (from the stored positions) agree up to the near-threshold swaps above,
// and every stored row is the input row of its token, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/given_lse.hpp"
#include "common/tensors.hpp"
#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;
using kt::testing::device_tensor;

namespace {

constexpr double u32 = 5.9604644775390625e-08;  // 2^-24

template <class S>
using cpu_impl = kt::implementation<S, kt::backend::cpu>;
template <class S>
using gpu_impl = kt::implementation<S, kt::backend::cuda>;

template <class S, class K, class Q>
std::vector<float> cpu_scores(const typename S::config& cfg, const kt::model_shape& shape,
                              const kt::testing::host_tensor<K, 4>& keys, const kt::testing::host_tensor<Q, 4>& queries) {
  const std::int64_t batch = keys.view.extent(0), tokens = keys.view.extent(2);
  std::vector<float> out(static_cast<std::size_t>(batch * shape.kv_heads * tokens));
  const std::array<std::int64_t, 3> extents{batch, shape.kv_heads, tokens};
  const kt::score_view<> view{out.data(), extents, kt::row_major_strides(extents)};
  if constexpr (kt::detail::needs_scratch<cpu_impl<S>, typename S::config>) {
    std::vector<std::byte> scratch(cpu_impl<S>::workspace_bytes(cfg, shape, batch, tokens));
    cpu_impl<S>::score(cfg, shape, keys.cview(), keys.cview(), queries.cview(), view, {scratch.data(), scratch.size()},
                       {});
  } else {
    cpu_impl<S>::score(cfg, shape, keys.cview(), keys.cview(), queries.cview(), view, {});
  }
  return out;
}

template <class S, class K, class Q>
std::vector<float> gpu_scores(const typename S::config& cfg, const kt::model_shape& shape,
                              const kt::testing::host_tensor<K, 4>& keys, const kt::testing::host_tensor<Q, 4>& queries) {
  const std::int64_t batch = keys.view.extent(0), tokens = keys.view.extent(2);
  device_tensor<K, 4> device_keys(keys);
  device_tensor<Q, 4> device_queries(queries);
  device_buffer<float> scores(static_cast<std::size_t>(batch * shape.kv_heads * tokens));
  scores.fill_bytes(0xff);  // NaN: an unwritten score fails the comparison
  const std::array<std::int64_t, 3> extents{batch, shape.kv_heads, tokens};
  const kt::score_view<kt::device_space> view{scores.data(), extents, kt::row_major_strides(extents)};
  const auto keys_view = kt::detail::as_const(device_keys.view);
  const auto queries_view = kt::detail::as_const(device_queries.view);
  if constexpr (kt::detail::needs_scratch<gpu_impl<S>, typename S::config>) {
    device_buffer<std::byte> scratch(gpu_impl<S>::workspace_bytes(cfg, shape, batch, tokens));
    scratch.fill_bytes(0xff);
    gpu_impl<S>::score(cfg, shape, keys_view, keys_view, queries_view, view, {scratch.data(), scratch.size()}, nullptr);
    kt::testing::check(cudaDeviceSynchronize(), "scorer");
  } else {
    gpu_impl<S>::score(cfg, shape, keys_view, keys_view, queries_view, view, nullptr);
    kt::testing::check(cudaDeviceSynchronize(), "scorer");
  }
  return scores.download();
}

/// Kept tokens of one head: the top `keep` scores, ties to the lower index, ascending.
std::vector<std::int32_t> top_k(const float* scores, std::int64_t tokens, std::int64_t keep) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(tokens));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return scores[a] > scores[b]; });
  order.resize(static_cast<std::size_t>(std::min(keep, tokens)));
  std::sort(order.begin(), order.end());
  return order;
}

struct set_report {
  std::int64_t swapped = 0;  // tokens kept by one backend only (all near the threshold)
  std::int64_t band = 0;     // tokens whose CPU score is within the swap band of the threshold
};

/// Checks that `gpu_kept` equals `cpu_kept` but for tokens whose CPU score is
/// within `band(threshold)` of the CPU threshold; counts them.
template <class Band>
void expect_same_kept(const std::vector<std::int32_t>& cpu_kept, const std::vector<std::int32_t>& gpu_kept,
                      const float* cpu_scores, std::int64_t tokens, std::int64_t keep, Band&& band, set_report& report,
                      const std::string& where) {
  ASSERT_EQ(cpu_kept.size(), gpu_kept.size()) << where;
  if (keep >= tokens || keep == 0) {
    EXPECT_EQ(cpu_kept, gpu_kept) << where;
    return;
  }
  float threshold = std::numeric_limits<float>::infinity();
  for (const std::int32_t j : cpu_kept) threshold = std::min(threshold, cpu_scores[j]);
  const double width = band(threshold);
  for (std::int64_t j = 0; j < tokens; ++j)
    if (std::abs(static_cast<double>(cpu_scores[j]) - threshold) <= width) ++report.band;
  std::vector<std::int32_t> only;
  std::set_symmetric_difference(cpu_kept.begin(), cpu_kept.end(), gpu_kept.begin(), gpu_kept.end(),
                                std::back_inserter(only));
  for (const std::int32_t j : only) {
    ++report.swapped;
    EXPECT_LE(std::abs(static_cast<double>(cpu_scores[j]) - threshold), width)
        << where << ": token " << j << " (cpu score " << cpu_scores[j] << ", threshold " << threshold
        << ") kept by one backend only";
  }
}

template <class T>
double largest_norm(const kt::testing::host_tensor<T, 4>& tensor, std::int64_t first_token = 0) {
  double largest = 0.0;
  const auto& v = tensor.view;
  for (std::int64_t b = 0; b < v.extent(0); ++b)
    for (std::int64_t h = 0; h < v.extent(1); ++h)
      for (std::int64_t t = first_token; t < v.extent(2); ++t) {
        double squares = 0.0;
        for (std::int64_t d = 0; d < v.extent(3); ++d) {
          const double x = kt::to_float(v(b, h, t, d));
          squares += x * x;
        }
        largest = std::max(largest, std::sqrt(squares));
      }
  return largest;
}

/// The relative bound of the header comment for one attention-mass configuration.
template <class K, class Q>
double mass_tolerance(const kt::testing::host_tensor<K, 4>& keys, const kt::testing::host_tensor<Q, 4>& queries,
                      std::int64_t first_query, std::int64_t rows, std::int64_t kernel, std::int64_t group) {
  const double head_dim = static_cast<double>(keys.view.extent(3));
  const double tokens = static_cast<double>(keys.view.extent(2));
  const double a = largest_norm(keys) * largest_norm(queries, first_query);
  const double logit = 3.0 * head_dim * u32 * a / std::sqrt(head_dim);
  // The exponent's own roundings: the CPU's fl(fl(l/√D) − m) is off by ≤ 3·u·A/√D
  // (|l/√D|, |m| ≤ A/√D); the GPU's base-2 argument fma(l, fl(log2 e/√D), −fl(m'))
  // by ≤ 6·u·A/√D (the rounded constant, m′'s product, the fma): 9·u·A/√D apart.
  const double argument = 9.0 * u32 * a / std::sqrt(head_dim);
  // Pass 1 rescales a row's running sum by 2^(fl(m_old·c) − fl(m_new·c)): the rounded
  // shifts cancel exactly against its terms', leaving the subtraction's own rounding,
  // ≤ u·(m_new − m_old)·c per rescale. The running max only grows, from ≥ −A/√D to
  // ≤ A/√D, so a row's rescales add ≤ u·2·(A/√D)·log2(e) to the base-2 exponent in
  // all: ≤ 2·u·A/√D in the natural one.
  const double rescale = 2.0 * u32 * a / std::sqrt(head_dim);
  // The wgmma pass 2's L = fl(m' + fl(log2 Z₂)) (header comment).
  const double row_lse = u32 * (a / std::sqrt(head_dim) + 2.8 * std::log2(std::max(tokens, 2.0)));
  return std::expm1(3.0 * logit + 2.0 * argument + rescale + row_lse) + (tokens + tokens * 9.0 / 64.0 + 96.0 + 8.0) * u32 +
         2.0 * u32 * static_cast<double>(rows + kernel + group + 8);
}

struct mass_report {
  double worst_ratio = 0.0;  // max |gpu − cpu| / (tolerance · |cpu|)
  set_report sets;
};

/// Scores within the relative tolerance; then each head's kept set for `keep`.
void compare_mass(const std::vector<float>& cpu, const std::vector<float>& gpu, std::int64_t heads,
                  std::int64_t tokens, double tolerance, std::int64_t keep, mass_report& report) {
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    if (std::isinf(cpu[i])) {
      ASSERT_EQ(cpu[i], gpu[i]) << "protected token " << i % tokens << " of head " << i / tokens;
      continue;
    }
    ASSERT_FALSE(std::isnan(gpu[i])) << "unwritten score " << i % tokens << " of head " << i / tokens;
    const double error = std::abs(static_cast<double>(gpu[i]) - cpu[i]);
    const double allowed = tolerance * std::abs(static_cast<double>(cpu[i])) + 1e-30;
    report.worst_ratio = std::max(report.worst_ratio, error / allowed);
    ASSERT_LE(error, allowed) << "token " << i % tokens << " of head " << i / tokens << ": cpu " << cpu[i]
                              << ", cuda " << gpu[i];
  }
  for (std::int64_t head = 0; head < heads; ++head) {
    const float* c = cpu.data() + head * tokens;
    const float* g = gpu.data() + head * tokens;
    expect_same_kept(top_k(c, tokens, keep), top_k(g, tokens, keep), c, tokens, keep,
                     [&](float threshold) { return 2.0 * tolerance * std::abs(static_cast<double>(threshold)); },
                     report.sets, kt::detail::cat("head ", head));
  }
}

/// The relative bound with the normalisers given. Both backends compute
/// p = exp(l/√D − L) from the same float L (no max, no Z, no online rescaling, no
/// L of their own). With a = A/√D (A as in mass_tolerance), |L| ≤ a + ln T (L ≤ the
/// row's largest logit + ln T, ≥ its own key's logit) and |l/√D − L| ≤ 2a + ln T:
///  - the logits differ by δ_l = 3·D·u·A/√D, as in mass_tolerance (each probability
///    now depends on its own logit only: no max, no Z);
///  - the exponent's roundings: the CPU's fl(fl(l·fl(1/√D)) − L) ≤ u·(a + a + (2a + ln T))
///    (the constant, the product, the difference); the GPU's l·fl(log2 e/√D) − fl(L·log2 e)
///    (L·log2 e in double, rounded once; the product and the difference one fma, or two
///    roundings on the fp32 path), in natural units ≤ u·(a + a + (a + ln T) + (2a + ln T)):
///    ≤ u·(9a + 3 ln T) apart, taken as u·(10a + 3 ln T);
///  - exp: 1.013 ulp (CPU) and 2 ulp (ex2.approx): ≤ 8u;
///  - the mass, window mean, pooling and group reduction: as mass_tolerance.
template <class K, class Q>
double given_lse_tolerance(const kt::testing::host_tensor<K, 4>& keys, const kt::testing::host_tensor<Q, 4>& queries,
                           std::int64_t first_query, std::int64_t rows, std::int64_t kernel, std::int64_t group) {
  const double head_dim = static_cast<double>(keys.view.extent(3));
  const double tokens = static_cast<double>(keys.view.extent(2));
  const double a = largest_norm(keys) * largest_norm(queries, first_query) / std::sqrt(head_dim);
  const double logit = 3.0 * head_dim * u32 * a;
  const double argument = u32 * (10.0 * a + 3.0 * std::log(std::max(tokens, 2.0)));
  return std::expm1(logit + argument) + 8.0 * u32 + 2.0 * u32 * static_cast<double>(rows + kernel + group + 8);
}

/// The CPU's and the GPU's scores of scorer S with the same given normalisers `lse`
/// (host float [B, Hq, n_q]), compared with given_lse_tolerance.
template <class S, class K, class Q>
void compare_given_lse(typename S::config cfg, const kt::model_shape& shape, const kt::testing::host_tensor<K, 4>& keys,
                       const kt::testing::host_tensor<Q, 4>& queries, const kt::testing::host_tensor<float, 3>& lse,
                       double tolerance, std::int64_t keep, const std::string& what) {
  const std::int64_t heads = keys.view.extent(0) * shape.kv_heads, tokens = keys.view.extent(2);
  kt::testing::device_tensor<float, 3> device_lse(lse);
  const auto cpu = cpu_scores<S>(cfg.with_lse(lse.cview()), shape, keys, queries);
  const auto gpu = gpu_scores<S>(cfg.with_lse(kt::detail::as_const(device_lse.view)), shape, keys, queries);
  mass_report report;
  compare_mass(cpu, gpu, heads, tokens, tolerance, keep, report);
  std::cout << "[" << what << ", normalisers given] tolerance " << tolerance << ", worst |Δ|/tolerance "
            << report.worst_ratio << ", kept-set swaps " << report.sets.swapped << " (tokens in the band "
            << report.sets.band << ")\n";
}

/// Poisons three rows of `lse` that a scorer reads (observed queries ≥ first).
void poison_rows(kt::testing::host_tensor<float, 3>& lse, std::int64_t first) {
  const std::int64_t batch = lse.view.extent(0), q_heads = lse.view.extent(1), observed = lse.view.extent(2);
  lse(0, 0, observed - 1) = std::numeric_limits<float>::quiet_NaN();
  lse(batch - 1, q_heads - 1, first) = -std::numeric_limits<float>::infinity();
  if (observed - first > 2) lse(0, q_heads - 1, first + 1) = std::numeric_limits<float>::infinity();
}

// ---- SnapKV ------------------------------------------------------------------

struct snapkv_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens;
  std::int64_t window, kernel, observed;  // observed ≥ window queries handed over
  kt::score::pooling pooling = kt::score::pooling::avg;
  kt::score::window_reduction reduction = kt::score::window_reduction::mean;
  kt::score::group_reduction group_reduction = kt::score::group_reduction::mean;
  bool strided = false;
  bool strided_lse = false;  // the given normalisers padded, the inputs not (the wgmma passes' reads)
};

std::string describe(const snapkv_case& c) {
  return kt::detail::cat("b", c.batch, "_kv", c.kv_heads, "_g", c.group, "_d", c.head_dim, "_t", c.tokens, "_w",
                         c.window, "_k", c.kernel, "_q", c.observed, c.pooling == kt::score::pooling::max ? "_maxpool" : "",
                         c.reduction == kt::score::window_reduction::sum ? "_sum" : "",
                         c.group_reduction == kt::score::group_reduction::max ? "_groupmax" : "",
                         c.strided ? "_strided" : "", c.strided_lse ? "_stridedlse" : "");
}

template <class K, class Q>
void run_snapkv(const snapkv_case& c) {
  SCOPED_TRACE(describe(c));
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::array<std::int64_t, 4> padding = c.strided ? std::array<std::int64_t, 4>{1, 1, 3, 8} : std::array<std::int64_t, 4>{};
  const auto keys = kt::testing::random_tensor<K, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 21, 1.0f, padding);
  const auto queries = kt::testing::random_tensor<Q, 4>({c.batch, shape.q_heads, c.observed, c.head_dim}, 22, 1.0f, padding);
  const kt::score::snapkv::config cfg{.window = c.window, .kernel = c.kernel, .pooling = c.pooling,
                                      .reduction = c.reduction, .group = c.group_reduction};
  const auto cpu = cpu_scores<kt::score::snapkv>(cfg, shape, keys, queries);
  const auto gpu = gpu_scores<kt::score::snapkv>(cfg, shape, keys, queries);
  const double tolerance = mass_tolerance(keys, queries, c.observed - c.window, c.window, c.kernel, c.group);
  mass_report report;
  const std::int64_t keep = std::max<std::int64_t>(c.window + 1, c.tokens * 3 / 10);
  compare_mass(cpu, gpu, c.batch * c.kv_heads, c.tokens, tolerance, keep, report);
  std::cout << "[snapkv " << describe(c) << "] tolerance " << tolerance << ", worst |Δ|/tolerance "
            << report.worst_ratio << ", kept-set swaps " << report.sets.swapped << " (tokens in the band "
            << report.sets.band << ")\n";
}

/// run_snapkv with the normalisers given (strided like the inputs where the case is).
template <class K, class Q>
void run_snapkv_given_lse(const snapkv_case& c) {
  SCOPED_TRACE(describe(c));
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::array<std::int64_t, 4> padding = c.strided ? std::array<std::int64_t, 4>{1, 1, 3, 8} : std::array<std::int64_t, 4>{};
  const auto keys = kt::testing::random_tensor<K, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 21, 1.0f, padding);
  const auto queries = kt::testing::random_tensor<Q, 4>({c.batch, shape.q_heads, c.observed, c.head_dim}, 22, 1.0f, padding);
  const std::int64_t first = c.observed - c.window;
  auto lse = kt::testing::reference_lse(keys.cview(), queries.cview(), first,
                                        c.strided || c.strided_lse ? std::array<std::int64_t, 3>{1, 2, 5}
                                                                   : std::array<std::int64_t, 3>{});
  poison_rows(lse, first);
  const kt::score::snapkv::config cfg{.window = c.window, .kernel = c.kernel, .pooling = c.pooling,
                                      .reduction = c.reduction, .group = c.group_reduction};
  compare_given_lse<kt::score::snapkv>(cfg, shape, keys, queries, lse,
                                       given_lse_tolerance(keys, queries, first, c.window, c.kernel, c.group),
                                       std::max<std::int64_t>(c.window + 1, c.tokens * 3 / 10),
                                       "snapkv " + describe(c));
}

class SnapKVScores : public ::testing::TestWithParam<snapkv_case> {};

TEST_P(SnapKVScores, GivenLseMatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_snapkv_given_lse<kt::half, kt::half>(GetParam());
}
TEST_P(SnapKVScores, GivenLseMatchesCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_snapkv_given_lse<kt::bfloat16, kt::bfloat16>(GetParam());
}

TEST_P(SnapKVScores, MatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_snapkv<kt::half, kt::half>(GetParam());
}
TEST_P(SnapKVScores, MatchesCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_snapkv<kt::bfloat16, kt::bfloat16>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(
    AwkwardSizes, SnapKVScores,
    ::testing::Values(
        // 17 tokens, short window, GQA 1 / 4, batch > 1
        snapkv_case{2, 2, 1, 64, 17, 8, 5, 8}, snapkv_case{3, 1, 4, 128, 17, 4, 3, 9, kt::score::pooling::max},
        // 4097: not a multiple of a tile; window queries not a multiple of 64; strided inputs
        snapkv_case{2, 2, 4, 128, 4097, 64, 5, 64}, snapkv_case{1, 2, 8, 64, 4097, 32, 7, 40, kt::score::pooling::max,
                                                                kt::score::window_reduction::mean,
                                                                kt::score::group_reduction::max, true},
        snapkv_case{2, 1, 16, 256, 4097, 64, 5, 64, kt::score::pooling::avg, kt::score::window_reduction::sum},
        snapkv_case{1, 2, 1, 256, 1000, 100, 1, 100},
        // 32768: many key splits
        snapkv_case{1, 2, 4, 128, 32768, 64, 5, 64}, snapkv_case{1, 1, 16, 64, 32768, 64, 5, 64},
        // The wgmma passes' shapes (sm_90a): two chunks per head, the second partial
        // (window 100, G 2: 4 resident chunks at D 128); a full block of 8 chunks at D 64;
        // 8 chunks at D 128 (pass 1 in two row groups, pass 2 on mma.sync); several key
        // tiles per pass-2 block (wgmma_column_tiles: 3 at 16 units × 511 tiles, the last
        // run of one tile; 2 at 12 units, D 128)
        snapkv_case{2, 2, 2, 128, 4097, 100, 5, 100}, snapkv_case{1, 2, 8, 64, 4097, 64, 7, 64},
        snapkv_case{2, 1, 8, 128, 1000, 64, 5, 70, kt::score::pooling::max},
        snapkv_case{4, 4, 2, 64, 32768, 64, 5, 64}, snapkv_case{3, 4, 1, 128, 32768, 64, 5, 64},
        // The finish's paths (attention_mass_finish stages a 1024-token tile and its pooling
        // halo when they fit 1280 values, four query heads at a time): kernels so wide that
        // every tile reads global memory (avg, max); a kernel of half-width 150 that the
        // first and last tiles stage (the row's ends clip the halo) and the middle ones
        // read; a group of 6 (a second, partial batch of rows) with max pooling and reduction
        snapkv_case{1, 1, 4, 64, 4097, 16, 3201, 16},
        snapkv_case{2, 2, 2, 64, 4097, 16, 3333, 16, kt::score::pooling::max},
        snapkv_case{1, 1, 4, 64, 4081, 16, 301, 16},
        snapkv_case{2, 1, 6, 64, 2100, 32, 5, 32, kt::score::pooling::max, kt::score::window_reduction::mean,
                    kt::score::group_reduction::max},
        // The finish's compiled interior path (half-widths 0–4, tiles whose windows stay in
        // the row): kernels 3, 9 and 1 with interior tiles, rows of odd length (units after the
        // first take the scalar stores) and of a multiple of 4 (float4 stores), a partial second
        // batch of rows (FinishInteriorPathIsTheGeneralPathBitForBit compares the paths bit for bit)
        snapkv_case{2, 2, 4, 128, 5003, 64, 3, 64},
        snapkv_case{1, 2, 6, 64, 3071, 32, 9, 32, kt::score::pooling::max, kt::score::window_reduction::mean,
                    kt::score::group_reduction::max},
        snapkv_case{1, 1, 4, 64, 3000, 16, 1, 16, kt::score::pooling::avg, kt::score::window_reduction::sum},
        // Contiguous inputs (the wgmma passes on sm_90a) with padded given normalisers: pass 2
        // reads the caller's strided rows itself (given_row_lse)
        snapkv_case{2, 2, 4, 128, 4097, 100, 5, 100, kt::score::pooling::avg, kt::score::window_reduction::mean,
                    kt::score::group_reduction::mean, false, true}),
    [](const ::testing::TestParamInfo<snapkv_case>& info) { return describe(info.param) + "_" + std::to_string(info.index); });

// The finish's compiled interior path (attention_mass_finish<Half>, Half = kernel / 2) against
// its general path (<-1>) on the same mass rows, bit for bit — the tolerance of the cases above
// would not see a reordered sum. Rows with ±0, ±∞, NaN, subnormals and the extremes among
// ordinary values; window divisors that are not (37: the interior path divides) and are (64: it
// multiplies by the exact reciprocal) powers of two; both poolings and both group reductions;
// kernels 1–9; groups of 6 (a partial second batch of staged rows; divided) and 4 (multiplied);
// fewer grid rows than units (a block runs a second unit); the scores offset by one float (scalar
// stores) and aligned (float4 stores); rows ending exactly where the last interior tile's windows
// end (3072 + 4 values, allocated to the byte) and the protected tokens starting exactly at a tile's
// end. A control launches each <Half> with kernel 2·Half + 3: its interior tiles then differ from
// the general path, which shows they ran.
template <int Half>
void launch_finish(const kvtrim::cuda_detail::mass_finish_parameters& p, dim3 grid) {
  kvtrim::cuda_detail::attention_mass_finish<Half><<<grid, 256>>>(p);
  kt::testing::check(cudaGetLastError(), "attention_mass_finish");
}
/// attention_mass_finish<half> for a runtime half-width 0–4 (the compiled interior paths).
void launch_finish_interior(int half, const kvtrim::cuda_detail::mass_finish_parameters& p, dim3 grid) {
  switch (half) {
    case 0: launch_finish<0>(p, grid); break;
    case 1: launch_finish<1>(p, grid); break;
    case 2: launch_finish<2>(p, grid); break;
    case 3: launch_finish<3>(p, grid); break;
    default: launch_finish<4>(p, grid); break;
  }
}

// One configuration: `tokens` prompt tokens, `window` observed, the scores protected from
// token `protected_from` (≤ length = tokens − window) on.
void finish_paths_bit_for_bit(std::int64_t group, std::int64_t window, std::int64_t tokens,
                              std::int64_t protected_from) {
  SCOPED_TRACE(kt::detail::cat("group ", group, ", window ", window, ", tokens ", tokens, ", protected from ",
                               protected_from));
  namespace kc = kt::cuda_detail;
  const std::int64_t batch = 2, kv_heads = 2, length = tokens - window;
  const std::int64_t units = batch * kv_heads;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(-1.0f, 3.0f);
  const float specials[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), 1e-40f, -1e-42f, std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()};
  std::vector<float> mass(static_cast<std::size_t>(units * group * length));
  for (auto& x : mass) x = rng() % 64 == 0 ? specials[rng() % std::size(specials)] : uniform(rng);
  device_buffer<float> device_mass(mass.size());
  device_mass.upload(mass);
  device_buffer<float> general(static_cast<std::size_t>(units * tokens + 1)), interior(general.size());
  const dim3 grid(static_cast<unsigned>((tokens + kc::finish_tile - 1) / kc::finish_tile), 3);  // 3 < 4 units
  int interior_launches = 0;
  for (int half = 0; half <= kc::finish_compiled_half_widths; ++half)
    for (const auto pooling : {kt::score::pooling::avg, kt::score::pooling::max})
      for (const auto reduction : {kt::score::group_reduction::mean, kt::score::group_reduction::max})
        for (const std::int64_t offset : {0, 1}) {
          SCOPED_TRACE(kt::detail::cat("kernel ", 2 * half + 1, pooling == kt::score::pooling::max ? " max" : " avg",
                                       reduction == kt::score::group_reduction::max ? ", group max" : ", group mean",
                                       ", scores offset by ", offset));
          kc::mass_finish_parameters p{};
          p.mass = device_mass.data();
          p.batch = batch, p.kv_heads = kv_heads, p.group = group, p.tokens = tokens, p.length = length;
          p.kind = kc::mass_finish_kind::snapkv;
          p.window_divisor = static_cast<float>(window);
          p.kernel = 2 * half + 1;
          p.pooling = pooling;
          p.reduction = reduction;
          p.protected_from = protected_from;
          general.fill_bytes(0xff), interior.fill_bytes(0xff);
          p.scores = general.data() + offset;
          launch_finish<-1>(p, grid);
          p.scores = interior.data() + offset;
          launch_finish_interior(half, p, grid);
          ++interior_launches;
          kt::testing::check(cudaDeviceSynchronize(), "attention_mass_finish");
          const auto want = general.download(), got = interior.download();
          std::int64_t differing = 0, first = -1;
          for (std::size_t i = 0; i < want.size(); ++i)
            if (std::memcmp(&want[i], &got[i], sizeof(float)) != 0 && differing++ == 0) first = static_cast<std::int64_t>(i);
          EXPECT_EQ(differing, 0) << "first at element " << first << " (unit " << (first - offset) / tokens << ", token "
                                  << (first - offset) % tokens << "): general " << want[first] << ", interior " << got[first];
          if (pooling == kt::score::pooling::avg && offset == 0) {
            // The control: kernel 2·Half + 3 on <Half>'s interior tiles (Half-wide windows) differs
            // from the general path's; equal results would mean no interior tile ran.
            p.kernel = 2 * half + 3;
            p.scores = general.data();
            launch_finish<-1>(p, grid);
            p.scores = interior.data();
            launch_finish_interior(half, p, grid);
            kt::testing::check(cudaDeviceSynchronize(), "attention_mass_finish");
            const auto general_scores = general.download(), interior_scores = interior.download();
            std::int64_t control_differing = 0;
            for (std::size_t i = 0; i < general_scores.size(); ++i)
              control_differing += std::memcmp(&general_scores[i], &interior_scores[i], sizeof(float)) != 0;
            EXPECT_GT(control_differing, 0) << "no interior tile ran";
          }
        }
  EXPECT_EQ(interior_launches, 40);
}

TEST(SnapKVScores, FinishInteriorPathIsTheGeneralPathBitForBit) {
  KVTRIM_SKIP_WITHOUT_GPU();
  finish_paths_bit_for_bit(6, 37, 4000, 4000 - 37);
  finish_paths_bit_for_bit(4, 64, 4000, 4000 - 64);
  // The last interior tile's windows end exactly at the rows' (and the allocation's) end:
  // length 3076 = 3072 + the widest half-width; then protected tokens from 3072, a tile's end.
  finish_paths_bit_for_bit(4, 64, 3140, 3076);
  finish_paths_bit_for_bit(4, 64, 4000, 3072);
}

// The finish's quotients without div.rn (attention_mass.cuh): divide_by<d> for the
// interior path's pooling divisors d = 1, 3, 5, 7, 9, and x · (1/d) where exact_reciprocal(d),
// against x / d, on every one of the 2^32 floats (NaN against NaN: the device's is canonical).
template <int Divisor>
__device__ float finish_quotient(float x) {
  return kvtrim::cuda_detail::divide_by<Divisor>(x);
}
__global__ void count_quotient_mismatches(float runtime_divisor, bool compile_time_divisors,
                                          unsigned long long* mismatches) {
  namespace kc = kvtrim::cuda_detail;
  const bool product = kc::exact_reciprocal(runtime_divisor);
  const float reciprocal = 1.0f / runtime_divisor;
  unsigned long long local[6] = {};
  const std::uint64_t stride = std::uint64_t{gridDim.x} * blockDim.x;
  for (std::uint64_t bits = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; bits <= 0xffffffffull; bits += stride) {
    const float x = __uint_as_float(static_cast<unsigned>(bits));
    const auto differ = [](float a, float b) {
      return !(a != a && b != b) && __float_as_uint(a) != __float_as_uint(b);
    };
    if (compile_time_divisors) {
      local[0] += differ(finish_quotient<1>(x), x / 1.0f);
      local[1] += differ(finish_quotient<3>(x), x / 3.0f);
      local[2] += differ(finish_quotient<5>(x), x / 5.0f);
      local[3] += differ(finish_quotient<7>(x), x / 7.0f);
      local[4] += differ(finish_quotient<9>(x), x / 9.0f);
    }
    local[5] += !product || differ(x * reciprocal, x / runtime_divisor);
  }
  for (int i = 0; i < 6; ++i)
    if (local[i] != 0) atomicAdd(&mismatches[i], local[i]);
}

TEST(SnapKVScores, FinishQuotientsAreTheDivisionsForEveryFloat) {
  KVTRIM_SKIP_WITHOUT_GPU();
  namespace kc = kt::cuda_detail;
  device_buffer<unsigned long long> mismatches(6);
  bool first = true;
  for (const float divisor : {64.0f, 32.0f, 4.0f, 1.0f, 0.5f, 0x1p126f, 0x1p-126f}) {
    SCOPED_TRACE(kt::detail::cat("runtime divisor ", divisor));
    mismatches.fill_bytes(0);
    count_quotient_mismatches<<<1024, 256>>>(divisor, first, mismatches.data());
    first = false;
    kt::testing::check(cudaDeviceSynchronize(), "count_quotient_mismatches");
    const auto counts = mismatches.download();
    EXPECT_EQ(counts[0], 0u) << "x / 1";
    EXPECT_EQ(counts[1], 0u) << "x / 3";
    EXPECT_EQ(counts[2], 0u) << "x / 5";
    EXPECT_EQ(counts[3], 0u) << "x / 7";
    EXPECT_EQ(counts[4], 0u) << "x / 9";
    EXPECT_EQ(counts[5], 0u) << "x · (1/d) against x / d";
  }
  // Not a power of two, or 1/d not normal: the finish divides.
  const auto exact = [](float d) { return kc::exact_reciprocal_bits(std::bit_cast<std::uint32_t>(d)); };
  for (const float divisor : {37.0f, 6.0f, 0.0f, -0.0f, -4.0f, 0x1p127f, 0x1p-127f, 1e-40f,
                              std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()})
    EXPECT_FALSE(exact(divisor)) << divisor;
  for (const float divisor : {1.0f, 4.0f, 64.0f, 0.5f, 0x1p126f, 0x1p-126f}) EXPECT_TRUE(exact(divisor)) << divisor;
}

#if defined(KVTRIM_CUDA_WGMMA)
// The wgmma primitives alone (backend/cuda/wgmma.cuh), so a failure of the passes can be
// told apart from one of their layouts: A and B (64 × D, row-major in global memory)
// staged into swizzled tiles by the loader, S = A·Bᵀ once with both operands in shared
// memory (SS) and once with A's fragments loaded by ldmatrix (RS), each accumulator
// element written where the documented fragment layout says it belongs.
template <class T, int HeadDim>
__global__ void wgmma_product_probe(const T* a, const T* b, float* ss, float* rs) {
#if defined(__CUDA_ARCH__) && !KVTRIM_WGMMA_DEVICE_PASS
  __trap();  // not sm_90a code (see wgmma.cuh)
#else
  namespace kc = kvtrim::cuda_detail;
  extern __shared__ __align__(1024) unsigned char probe_shared[];
  const unsigned a_tile = kc::shared_address(kc::wgmma_aligned_shared(probe_shared));
  const unsigned b_tile = a_tile + kc::swizzled_tile_bytes<HeadDim>;
  kc::swizzled_loader<T, HeadDim>(a, HeadDim, static_cast<int>(threadIdx.x)).load(a_tile, 0, 0, 64);
  kc::swizzled_loader<T, HeadDim>(b, HeadDim, static_cast<int>(threadIdx.x)).load(b_tile, 0, 0, 64);
  kc::mass_async_commit();
  kc::mass_async_wait<0>();
  kc::fence_shared_for_wgmma();
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  float d[32];
  kc::wgmma_tile_product_ss<T, HeadDim>(d, a_tile, b_tile);
  kc::wgmma_wait<0>();
  kc::wgmma_settle(d);
  const auto store = [&](float* out) {
    for (int n = 0; n < 8; ++n)
      for (int hh = 0; hh < 2; ++hh)
        for (int e = 0; e < 2; ++e)
          out[(16 * warp + lane / 4 + 8 * hh) * 64 + 8 * n + 2 * (lane % 4) + e] = d[4 * n + 2 * hh + e];
  };
  store(ss);
  unsigned held[HeadDim / 16][4];
  for (int s = 0; s < HeadDim / 16; ++s) kc::load_swizzled_rows(held[s], a_tile, 16 * warp, s);
  kc::wgmma_tile_product_rs<T, HeadDim>(d, held, b_tile);
  kc::wgmma_wait<0>();
  kc::wgmma_settle(d);
  store(rs);
#endif
}

template <int HeadDim>
void expect_wgmma_products_match() {
  SCOPED_TRACE(kt::detail::cat("head dim ", HeadDim));
  std::mt19937 rng(31 + HeadDim);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::vector<__half> a(64 * HeadDim), b(64 * HeadDim);
  for (auto& x : a) x = __float2half(uniform(rng));
  for (auto& x : b) x = __float2half(uniform(rng));
  device_buffer<__half> device_a(a.size()), device_b(b.size());
  device_a.upload(a), device_b.upload(b);
  device_buffer<float> ss(64 * 64), rs(64 * 64);
  ss.fill_bytes(0xff), rs.fill_bytes(0xff);  // NaN: an element the layout misses fails
  const std::size_t shared = 1024 + 2 * kvtrim::cuda_detail::swizzled_tile_bytes<HeadDim>;
  kt::testing::check(cudaFuncSetAttribute(wgmma_product_probe<__half, HeadDim>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
                     "cudaFuncSetAttribute");
  wgmma_product_probe<__half, HeadDim><<<1, 128, shared>>>(device_a.data(), device_b.data(), ss.data(), rs.data());
  kt::testing::check(cudaDeviceSynchronize(), "wgmma_product_probe");
  const auto got_ss = ss.download(), got_rs = rs.download();
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c) {
      double exact = 0.0, magnitude = 0.0;
      for (int k = 0; k < HeadDim; ++k) {
        const double product = static_cast<double>(__half2float(a[r * HeadDim + k])) * __half2float(b[c * HeadDim + k]);
        exact += product, magnitude += std::abs(product);
      }
      // fp16 products are exact in fp32; the D additions, ≤ 2u each (tensor-core adds).
      const double allowed = 2.0 * HeadDim * u32 * magnitude + 1e-30;
      ASSERT_LE(std::abs(got_ss[r * 64 + c] - exact), allowed) << "SS (" << r << ", " << c << ")";
      ASSERT_LE(std::abs(got_rs[r * 64 + c] - exact), allowed) << "RS (" << r << ", " << c << ")";
    }
}
#endif

TEST(SnapKVScores, WgmmaProductsFollowTheirLayouts) {
  KVTRIM_SKIP_WITHOUT_GPU();
#if !defined(KVTRIM_CUDA_WGMMA)
  GTEST_SKIP() << "not an sm_90a build";
#else
  if (!kvtrim::cuda_detail::wgmma_device("test")) GTEST_SKIP() << "not a compute capability 9.0 device";
  expect_wgmma_products_match<64>();
  expect_wgmma_products_match<128>();
#endif
}

// In an sm_90a build (KVTRIM_CUDA_WGMMA) on a compute capability 9.0 device, SnapKV's
// usual shapes take the wgmma passes: a fallback that silently kept the mma.sync passes
// would still pass every comparison above.
TEST(SnapKVScores, HopperBuildsChooseTheWgmmaPasses) {
  KVTRIM_SKIP_WITHOUT_GPU();
#if !defined(KVTRIM_CUDA_WGMMA)
  GTEST_SKIP() << "not an sm_90a build: the mma.sync passes only";
#else
  namespace kc = kt::cuda_detail;
  if (!kc::wgmma_device("test")) GTEST_SKIP() << "not a compute capability 9.0 device";
  float lse = 0.0f;  // only its address is taken
  const auto choose = [&](const kt::model_shape& shape, std::int64_t window, bool vector_loads) {
    const kc::mass_plan plan = kc::plan_attention_mass(shape, 8, 32768, window);
    kc::attention_mass_parameters<__half, __half> p{};
    p.vector_loads = vector_loads;
    const auto chosen = kc::choose_mass_kernels<__half, __half, 128>("test", p, plan, &lse, 32768 - window);
    return std::tuple{chosen, p, plan};
  };
  {  // W: 4 row chunks of 64 per kv head, both passes
    const auto [chosen, p, plan] = choose({.q_heads = 32, .kv_heads = 8, .head_dim = 128}, 64, true);
    EXPECT_TRUE(chosen.wgmma_rows);
    EXPECT_TRUE(chosen.wgmma_columns);
    EXPECT_EQ(p.lse, &lse);
    EXPECT_GE(p.column_tiles, 1);
    EXPECT_EQ(chosen.rows_grid.x, plan.units);  // one row group
    EXPECT_EQ(chosen.rows_grid.y, kc::ceil_div(plan.splits, std::int64_t{kc::wgmma_mass_warpgroups}));  // 4 splits a block
    EXPECT_EQ(chosen.columns_blocks,
              plan.units * kc::ceil_div(kc::ceil_div(kc::ceil_div(32768 - 64, 64), p.column_tiles),
                                        std::int64_t{kc::wgmma_mass_warpgroups}));
  }
  {  // 8 row chunks at D 128: pass 1 in two row groups, pass 2 on mma.sync (no L needed)
    const auto [chosen, p, plan] = choose({.q_heads = 64, .kv_heads = 8, .head_dim = 128}, 64, true);
    EXPECT_TRUE(chosen.wgmma_rows);
    EXPECT_FALSE(chosen.wgmma_columns);
    EXPECT_EQ(p.lse, nullptr);
    EXPECT_EQ(chosen.rows_grid.x, plan.units * 2);
  }
  {  // a large batch (2048 units at 4k tokens): four splits and runs a unit, none of a block's warpgroups idle
    const kc::mass_plan plan = kc::plan_attention_mass({.q_heads = 32, .kv_heads = 8, .head_dim = 128}, 256, 4096, 64);
    EXPECT_EQ(plan.splits % kc::wgmma_mass_warpgroups, 0);
    EXPECT_GE(plan.splits, kc::wgmma_mass_warpgroups);
    const std::int64_t key_tiles = kc::ceil_div(4096 - 64, 64);
    const std::int64_t runs = kc::ceil_div(key_tiles, kc::wgmma_column_tiles(plan.units, key_tiles));
    EXPECT_EQ(runs % kc::wgmma_mass_warpgroups, 0);
    EXPECT_GE(runs, kc::wgmma_mass_warpgroups);
  }
  {  // strided or unaligned rows: the mma.sync passes
    const auto [chosen, p, plan] = choose({.q_heads = 32, .kv_heads = 8, .head_dim = 128}, 64, false);
    EXPECT_FALSE(chosen.wgmma_rows);
    EXPECT_FALSE(chosen.wgmma_columns);
    EXPECT_EQ(chosen.rows_grid.x, plan.units * plan.row_chunks);
    EXPECT_EQ(chosen.rows_grid.y, plan.splits);
  }
#endif
}

TEST(SnapKVScores, Fp32AndMixedInputsUseTheFp32Product) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_snapkv<float, float>(snapkv_case{2, 2, 4, 64, 300, 16, 5, 20});
  run_snapkv<kt::half, float>(snapkv_case{1, 2, 2, 128, 129, 64, 5, 64});
}

TEST(SnapKVScores, GivenLseFp32AndMixedInputsUseTheFp32Product) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_snapkv_given_lse<float, float>(snapkv_case{2, 2, 4, 64, 300, 16, 5, 20});
  run_snapkv_given_lse<kt::half, float>(snapkv_case{1, 2, 2, 128, 129, 64, 5, 64});
}

// Normalisers for another call's shape are refused before anything runs, naming config.score.lse.
TEST(SnapKVScores, GivenLseOfTheWrongExtentsNamesTheLse) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 1, .head_dim = 64};
  const auto keys = kt::testing::random_tensor<kt::half, 4>({1, 1, 100, 64}, 1);
  const auto queries = kt::testing::random_tensor<kt::half, 4>({1, 2, 16, 64}, 2);
  device_buffer<float> lse(2 * 15);
  const kt::tensor_view<const float, 3, kt::device_space> view{lse.data(), {1, 2, 15}, {30, 15, 1}};
  try {
    (void)gpu_scores<kt::score::snapkv>(kt::score::snapkv::config{.window = 16}.with_lse(view), shape, keys, queries);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("config.score.lse"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("got [1, 2, 15]"), std::string::npos) << e.what();
  }
}

TEST(SnapKVScores, WindowAsLongAsThePrefillNamesTheWindow) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 1, .head_dim = 64};
  const auto keys = kt::testing::random_tensor<kt::half, 4>({1, 1, 64, 64}, 1);
  const auto queries = kt::testing::random_tensor<kt::half, 4>({1, 2, 64, 64}, 2);
  try {
    (void)gpu_scores<kt::score::snapkv>(kt::score::snapkv::config{}, shape, keys, queries);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("config.score.window"), std::string::npos) << e.what();
  }
}

// ---- H2O ---------------------------------------------------------------------

struct h2o_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens;
  bool observed_normalisation, protect_recent;
  kt::score::group_reduction group_reduction = kt::score::group_reduction::mean;
};

std::string describe(const h2o_case& c) {
  return kt::detail::cat("b", c.batch, "_kv", c.kv_heads, "_g", c.group, "_d", c.head_dim, "_t", c.tokens,
                         c.observed_normalisation ? "_observed" : "_sum", c.protect_recent ? "_recent" : "",
                         c.group_reduction == kt::score::group_reduction::max ? "_groupmax" : "");
}

template <class K>
void run_h2o(const h2o_case& c) {
  SCOPED_TRACE(describe(c));
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const auto keys = kt::testing::random_tensor<K, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 31);
  const auto queries = kt::testing::random_tensor<K, 4>({c.batch, shape.q_heads, c.tokens, c.head_dim}, 32);
  kt::score::h2o::config cfg;
  cfg.protect_recent = c.protect_recent;
  cfg.normalisation = c.observed_normalisation ? kt::score::h2o::normalisation::observed : kt::score::h2o::normalisation::none;
  cfg.group = c.group_reduction;
  const auto cpu = cpu_scores<kt::score::h2o>(cfg, shape, keys, queries);
  const auto gpu = gpu_scores<kt::score::h2o>(cfg, shape, keys, queries);
  const double tolerance = mass_tolerance(keys, queries, 0, c.tokens, 1, c.group);
  mass_report report;
  compare_mass(cpu, gpu, c.batch * c.kv_heads, c.tokens, tolerance, std::max<std::int64_t>(1, c.tokens / 5), report);
  std::cout << "[h2o " << describe(c) << "] tolerance " << tolerance << ", worst |Δ|/tolerance " << report.worst_ratio
            << ", kept-set swaps " << report.sets.swapped << " (tokens in the band " << report.sets.band << ")\n";
}

template <class K>
void run_h2o_given_lse(const h2o_case& c) {
  SCOPED_TRACE(describe(c));
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const auto keys = kt::testing::random_tensor<K, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 31);
  const auto queries = kt::testing::random_tensor<K, 4>({c.batch, shape.q_heads, c.tokens, c.head_dim}, 32);
  auto lse = kt::testing::reference_lse(keys.cview(), queries.cview());
  poison_rows(lse, 0);
  kt::score::h2o::config cfg;
  cfg.protect_recent = c.protect_recent;
  cfg.normalisation = c.observed_normalisation ? kt::score::h2o::normalisation::observed : kt::score::h2o::normalisation::none;
  cfg.group = c.group_reduction;
  compare_given_lse<kt::score::h2o>(cfg, shape, keys, queries, lse,
                                    given_lse_tolerance(keys, queries, 0, c.tokens, 1, c.group),
                                    std::max<std::int64_t>(1, c.tokens / 5), "h2o " + describe(c));
}

class H2OScores : public ::testing::TestWithParam<h2o_case> {};

TEST_P(H2OScores, GivenLseMatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_h2o_given_lse<kt::half>(GetParam());
}
TEST_P(H2OScores, GivenLseMatchesCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_h2o_given_lse<kt::bfloat16>(GetParam());
}

TEST_P(H2OScores, MatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_h2o<kt::half>(GetParam());
}
TEST_P(H2OScores, MatchesCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_h2o<kt::bfloat16>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(AwkwardSizes, H2OScores,
                         ::testing::Values(h2o_case{1, 1, 1, 64, 1, false, true}, h2o_case{2, 2, 4, 128, 17, true, false},
                                           h2o_case{3, 1, 8, 64, 17, false, true, kt::score::group_reduction::max},
                                           h2o_case{2, 2, 4, 128, 4097, true, false},
                                           h2o_case{1, 1, 16, 256, 1000, false, true}),
                         [](const ::testing::TestParamInfo<h2o_case>& info) {
                           return describe(info.param) + "_" + std::to_string(info.index);
                         });

// 32768 prefill queries: the CPU reference alone costs ~70 GFLOP, so one element type.
TEST(H2OScores, LongPrefillMatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_h2o<kt::half>(h2o_case{1, 1, 1, 64, 32768, true, false});
}

// ---- key norm ----------------------------------------------------------------

TEST(KeyNormScores, MatchCpuWithinOneUlp) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const auto& [batch, kv_heads, head_dim, tokens] :
       std::vector<std::array<std::int64_t, 4>>{{1, 1, 64, 1}, {3, 2, 128, 17}, {2, 4, 256, 4097}, {1, 2, 128, 32768}}) {
    SCOPED_TRACE(kt::detail::cat("b", batch, " kv", kv_heads, " d", head_dim, " t", tokens));
    const kt::model_shape shape{.q_heads = kv_heads, .kv_heads = kv_heads, .head_dim = head_dim};
    const auto keys = kt::testing::random_tensor<kt::bfloat16, 4>({batch, kv_heads, tokens, head_dim}, 41, 1.0f,
                                                                  {0, 1, 2, 8});
    const auto cpu = cpu_scores<kt::score::key_norm>({}, shape, keys, keys);
    const auto gpu = gpu_scores<kt::score::key_norm>({}, shape, keys, keys);
    std::int64_t off_by_one_ulp = 0;
    for (std::size_t i = 0; i < cpu.size(); ++i) {
      if (cpu[i] == gpu[i]) continue;
      ASSERT_EQ(std::nextafter(cpu[i], gpu[i]), gpu[i]) << "token " << i % tokens << " of head " << i / tokens;
      ++off_by_one_ulp;
    }
    set_report sets;
    const std::int64_t keep = std::max<std::int64_t>(1, tokens * 3 / 10);
    for (std::int64_t head = 0; head < batch * kv_heads; ++head) {
      const float* c = cpu.data() + head * tokens;
      expect_same_kept(top_k(c, tokens, keep), top_k(gpu.data() + head * tokens, tokens, keep), c, tokens, keep,
                       [](float threshold) { return 2.0 * std::abs(std::nextafter(threshold, 0.0f) - threshold); },
                       sets, kt::detail::cat("head ", head));
    }
    std::cout << "[key_norm t" << tokens << "] scores 1 ulp apart: " << off_by_one_ulp << ", kept-set swaps "
              << sets.swapped << "\n";
  }
}

// ---- external scores ---------------------------------------------------------

TEST(ExternalScores, CopiedWithNanRankedLast) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 2, kv_heads = 3, tokens = 4097;
  const kt::model_shape shape{.q_heads = 6, .kv_heads = kv_heads, .head_dim = 64};
  auto given = kt::testing::random_tensor<float, 3>({batch, kv_heads, tokens}, 51, 1.0f, {1, 2, 5});
  given(0, 1, 7) = std::numeric_limits<float>::quiet_NaN();
  given(1, 2, 4096) = std::numeric_limits<float>::infinity();
  const auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, tokens, 64}, 52);
  const auto cpu = cpu_scores<kt::score::external>(kt::score::external::config::from(given.cview()), shape, keys, keys);
  device_tensor<float, 3> device_given(given);
  const auto gpu = gpu_scores<kt::score::external>(kt::score::external::config::from(device_given.view), shape, keys, keys);
  ASSERT_EQ(std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(float)), 0);
  EXPECT_EQ(gpu[(0 * kv_heads + 1) * tokens + 7], -std::numeric_limits<float>::infinity());
  // A tensor of the wrong extents is refused, naming it.
  auto wrong = kt::score::external::config::from(device_given.view);
  wrong.extents[2] = tokens - 1;
  try {
    (void)gpu_scores<kt::score::external>(wrong, shape, keys, keys);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("config.score.scores"), std::string::npos) << e.what();
  }
}

// ---- RazorAttention retrieval heads -----------------------------------------

struct retrieval_case {
  std::int64_t batch, kv_heads, head_dim, tokens, sinks, min_recent;
  bool compensation;
};

template <class K>
void run_retrieval(const retrieval_case& c) {
  SCOPED_TRACE(kt::detail::cat("b", c.batch, " kv", c.kv_heads, " d", c.head_dim, " t", c.tokens, " sinks ", c.sinks,
                               " min_recent ", c.min_recent, c.compensation ? " compensation" : ""));
  using policy = kt::score::retrieval_head;
  const kt::model_shape shape{.q_heads = 2 * c.kv_heads, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const auto keys = kt::testing::random_tensor<K, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 61, 1.0f, {0, 1, 3, 0});
  const auto values = kt::testing::random_tensor<K, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 62, 1.0f, {0, 1, 3, 0});
  policy::config cfg;
  cfg.sinks = c.sinks;
  cfg.min_recent = c.min_recent;
  cfg.compensation = c.compensation;
  for (std::int64_t h = 0; h < c.kv_heads; ++h) cfg.retrieval.push_back(h % 3 == 1);
  const std::int64_t heads = c.batch * c.kv_heads;

  // Scores: exact.
  const auto cpu = cpu_scores<policy>(cfg, shape, keys, keys);
  const auto gpu = gpu_scores<policy>(cfg, shape, keys, keys);
  ASSERT_EQ(std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(float)), 0) << "scores";

  // Keep counts: exact.
  std::vector<std::int32_t> cpu_counts(static_cast<std::size_t>(heads));
  const std::array<std::int64_t, 3> extents{c.batch, c.kv_heads, c.tokens};
  cpu_impl<policy>::keep_counts(cfg, shape, kt::tensor_view<const float, 3>{cpu.data(), extents, kt::row_major_strides(extents)},
                                cpu_counts.data(), {});
  device_buffer<float> device_scores(gpu);
  device_buffer<std::int32_t> device_counts(static_cast<std::size_t>(heads));
  device_counts.fill_bytes(0xff);
  gpu_impl<policy>::keep_counts(cfg, shape,
                                kt::tensor_view<const float, 3, kt::device_space>{device_scores.data(), extents,
                                                                                  kt::row_major_strides(extents)},
                                device_counts.data(), nullptr);
  ASSERT_EQ(device_counts.download(), cpu_counts) << "keep counts";

  // The selection both backends' top-k gives (the first keep tokens by score).
  std::vector<std::int64_t> offsets{0};
  std::vector<std::int32_t> kept;
  for (std::int64_t head = 0; head < heads; ++head) {
    const auto tokens = top_k(cpu.data() + head * c.tokens, c.tokens, cpu_counts[static_cast<std::size_t>(head)]);
    kept.insert(kept.end(), tokens.begin(), tokens.end());
    offsets.push_back(static_cast<std::int64_t>(kept.size()));
  }
  const std::int64_t start = 1000;
  std::vector<std::int32_t> cpu_index(static_cast<std::size_t>(heads));
  std::vector<float> cpu_keys(static_cast<std::size_t>(heads * c.head_dim), -7.0f),
      cpu_values(static_cast<std::size_t>(heads * c.head_dim), -7.0f), cpu_bias(static_cast<std::size_t>(heads));
  std::vector<std::int64_t> cpu_position(static_cast<std::size_t>(heads));
  const kt::detail::compensation_rows cpu_rows{cpu_index.data(), cpu_keys.data(), cpu_values.data(), cpu_bias.data(),
                                               cpu_position.data()};
  cpu_impl<policy>::compensation_rows(cfg, shape, keys.cview(), values.cview(),
                                      kt::selection_view<kt::host_space>{offsets.data(), kept.data(), heads}, start,
                                      cpu_rows, {});

  device_tensor<K, 4> device_keys(keys), device_values(values);
  device_buffer<std::int64_t> device_offsets(offsets);
  device_buffer<std::int32_t> device_kept(kept.empty() ? std::vector<std::int32_t>{0} : kept);
  device_buffer<std::int32_t> index(static_cast<std::size_t>(heads));
  device_buffer<float> row_keys(std::vector<float>(static_cast<std::size_t>(heads * c.head_dim), -7.0f)),
      row_values(std::vector<float>(static_cast<std::size_t>(heads * c.head_dim), -7.0f)),
      bias(static_cast<std::size_t>(heads));
  device_buffer<std::int64_t> position(static_cast<std::size_t>(heads));
  index.fill_bytes(0x7f);
  bias.fill_bytes(0x7f);
  position.fill_bytes(0x7f);
  const kt::detail::compensation_rows gpu_rows{index.data(), row_keys.data(), row_values.data(), bias.data(),
                                               position.data()};
  gpu_impl<policy>::compensation_rows(cfg, shape, kt::detail::as_const(device_keys.view),
                                      kt::detail::as_const(device_values.view),
                                      kt::selection_view<kt::device_space>{device_offsets.data(), device_kept.data(), heads},
                                      start, gpu_rows, nullptr);
  kt::testing::check(cudaDeviceSynchronize(), "compensation_rows");
  ASSERT_EQ(index.download(), cpu_index) << "compensation index";
  ASSERT_EQ(position.download(), cpu_position) << "compensation position";
  const auto got_bias = bias.download();
  ASSERT_EQ(std::memcmp(got_bias.data(), cpu_bias.data(), heads * sizeof(float)), 0) << "compensation bias";
  const auto got_keys = row_keys.download(), got_values = row_values.download();
  std::int64_t compressed = 0;
  for (std::int64_t head = 0; head < heads; ++head) {
    if (cpu_index[head] < 0) continue;
    ++compressed;
    for (std::int64_t d = 0; d < c.head_dim; ++d) {
      const std::size_t i = static_cast<std::size_t>(head * c.head_dim + d);
      for (const auto& [want, got, what] : {std::tuple{cpu_keys[i], got_keys[i], "key"}, std::tuple{cpu_values[i], got_values[i], "value"}})
        ASSERT_TRUE(want == got || std::nextafter(want, got) == got)
            << "compensation " << what << " of head " << head << ", channel " << d << ": cpu " << want << ", cuda " << got;
    }
  }
  std::cout << "[retrieval_head t" << c.tokens << "] compressed heads " << compressed << " of " << heads << "\n";
}

TEST(RetrievalHead, ScoresCountsAndCompensationMatchCpu) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_retrieval<kt::half>({1, 1, 64, 1, 4, 4000, true});          // one token: every head whole
  run_retrieval<kt::half>({2, 3, 64, 17, 4, 8, true});            // 17: S + W + 1 = 13 kept
  run_retrieval<kt::bfloat16>({2, 4, 128, 4097, 4, 400, true});   // W = ⌊0.2·T⌋ = 819
  run_retrieval<kt::half>({1, 3, 256, 4097, 40, 4000, false});    // no compensation token
  run_retrieval<kt::bfloat16>({1, 8, 128, 32768, 4, 4000, true});
}

// ---- pipelines ---------------------------------------------------------------

/// compress through scheme<contiguous, Scorer, uniform, fp16> on both backends:
/// kept tokens (from the stored positions) agree up to near-threshold swaps,
/// every stored row is its token's input row.
template <class Scorer>
void run_pipeline(const typename Scorer::config& score_cfg, std::int64_t batch, std::int64_t kv_heads,
                  std::int64_t group, std::int64_t head_dim, std::int64_t tokens, std::int64_t observed,
                  kt::keep_amount keep) {
  SCOPED_TRACE(kt::detail::cat(Scorer::name, " b", batch, " kv", kv_heads, " g", group, " d", head_dim, " t", tokens));
  using codec = kt::codec::fp16;
  using cpu_scheme = kt::scheme<kt::layout::contiguous, Scorer, kt::budget::uniform, codec, kt::backend::cpu>;
  using gpu_scheme = kt::scheme<kt::layout::contiguous, Scorer, kt::budget::uniform, codec, kt::backend::cuda>;
  const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
  const auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, tokens, head_dim}, 71);
  const auto values = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, tokens, head_dim}, 72);
  const auto queries = kt::testing::random_tensor<kt::half, 4>({batch, shape.q_heads, observed, head_dim}, 73);
  typename cpu_scheme::config cfg;
  cfg.score = score_cfg;
  cfg.budget.keep = keep;
  const std::int64_t capacity = kt::budget::uniform::max_keep(cfg.budget, tokens);
  const auto cpu_reference = cpu_scores<Scorer>(cfg.score, shape, keys, queries);
  // The swap band: twice the scorer's score tolerance (see the header comment).
  double relative_band = 2.0 * std::ldexp(1.0, -23);  // key norm: 1 ulp each way
  if constexpr (std::is_same_v<Scorer, kt::score::external>) relative_band = 0.0;  // a copy: no swap allowed
  if constexpr (std::is_same_v<Scorer, kt::score::snapkv>)
    relative_band = 2.0 * mass_tolerance(keys, queries, observed - score_cfg.window, score_cfg.window, score_cfg.kernel, group);
  else if constexpr (std::is_same_v<Scorer, kt::score::h2o>)
    relative_band = 2.0 * mass_tolerance(keys, queries, 0, tokens, 1, group);

  auto cpu_cache = cpu_scheme::make_cache(shape, batch, capacity, typename codec::config{});
  std::vector<std::byte> cpu_scratch(cpu_scheme::compress_workspace(shape, batch, tokens, cfg));
  cpu_scheme::compress(keys.cview(), values.cview(), queries.cview(), cpu_cache.view(), cfg,
                       {cpu_scratch.data(), cpu_scratch.size()});

  device_tensor<kt::half, 4> device_keys(keys), device_values(values), device_queries(queries);
  auto gpu_cache = gpu_scheme::make_cache(shape, batch, capacity, typename codec::config{});
  cudaMemset(gpu_cache.view().storage.keys, 0xff, gpu_cache.bytes());
  device_buffer<std::byte> scratch(gpu_scheme::compress_workspace(shape, batch, tokens, cfg));
  auto gpu_cfg = cfg;
  std::vector<float> given_host;
  if constexpr (std::is_same_v<Scorer, kt::score::external>) {  // the same scores, in device memory
    for (std::int64_t i = 0; i < batch * kv_heads * tokens; ++i)
      given_host.push_back(score_cfg.scores[score_cfg.strides[0] * (i / (kv_heads * tokens)) +
                                            score_cfg.strides[1] * (i / tokens % kv_heads) +
                                            score_cfg.strides[2] * (i % tokens)]);
  }
  device_buffer<float> given_device(given_host.empty() ? std::vector<float>{0.0f} : given_host);
  if constexpr (std::is_same_v<Scorer, kt::score::external>)
    gpu_cfg.score = kt::score::external::config::from(kt::make_view<kt::device_space>(
        given_device.data(), std::array<std::int64_t, 3>{batch, kv_heads, tokens}));
  gpu_scheme::compress(device_keys.view, device_values.view, device_queries.view, gpu_cache.view(), gpu_cfg,
                       {scratch.data(), scratch.size()}, nullptr);
  kt::testing::check(cudaDeviceSynchronize(), "compress");

  ASSERT_EQ(*gpu_cache.view().length, *cpu_cache.view().length);
  const std::int64_t length = *cpu_cache.view().length;
  const std::int64_t rows = batch * kv_heads * capacity;
  const auto gpu_keys = kt::testing::download_bytes(gpu_cache.view().storage.keys, rows * head_dim * sizeof(kt::half));
  const auto gpu_values = kt::testing::download_bytes(gpu_cache.view().storage.values, rows * head_dim * sizeof(kt::half));
  const auto gpu_positions =
      kt::testing::download_bytes(gpu_cache.view().positions.slot_position, rows * sizeof(std::int32_t));
  set_report sets;
  for (std::int64_t head = 0; head < batch * kv_heads; ++head) {
    const std::int64_t b = head / kv_heads, h = head % kv_heads;
    const std::vector<std::int32_t> cpu_kept = kt::head_positions(cpu_cache.view(), b, h);
    std::vector<std::int32_t> gpu_kept(static_cast<std::size_t>(length));
    std::memcpy(gpu_kept.data(), gpu_positions.data() + head * capacity * sizeof(std::int32_t),
                static_cast<std::size_t>(length) * sizeof(std::int32_t));
    const float* c = cpu_reference.data() + head * tokens;
    expect_same_kept(cpu_kept, gpu_kept, c, tokens, length,
                     [&](float threshold) { return relative_band * std::abs(static_cast<double>(threshold)); }, sets,
                     kt::detail::cat("head ", head));
    for (std::int64_t i = 0; i < length; ++i) {  // stored rows: the input rows of their tokens, bit for bit
      const std::int32_t token = gpu_kept[static_cast<std::size_t>(i)];
      ASSERT_TRUE(token >= 0 && token < tokens) << "slot " << i << " of head " << head << " holds position " << token;
      const std::size_t offset = static_cast<std::size_t>((head * capacity + i) * head_dim) * sizeof(kt::half);
      ASSERT_EQ(std::memcmp(gpu_keys.data() + offset, &keys(b, h, token, 0), head_dim * sizeof(kt::half)), 0)
          << "key row of slot " << i << " of head " << head;
      ASSERT_EQ(std::memcmp(gpu_values.data() + offset, &values(b, h, token, 0), head_dim * sizeof(kt::half)), 0)
          << "value row of slot " << i << " of head " << head;
    }
  }
  std::cout << "[pipeline " << Scorer::name << " t" << tokens << "] kept-set swaps " << sets.swapped
            << " (tokens in the band " << sets.band << ")\n";
}

TEST(ScorerPipelines, SnapKVUniformContiguousFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_pipeline<kt::score::snapkv>(kt::kvpress::snapkv(), 2, 2, 4, 128, 4097, 64, kt::keep_ratio{0.3});
  run_pipeline<kt::score::snapkv>({.window = 16, .kernel = 7, .pooling = kt::score::pooling::max}, 3, 1, 8, 64, 17,
                                  16, kt::keep_tokens{12});
  run_pipeline<kt::score::snapkv>(kt::kvpress::snapkv(), 1, 2, 16, 64, 32768, 64, kt::keep_ratio{0.3});
}

TEST(ScorerPipelines, H2OUniformContiguousFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_pipeline<kt::score::h2o>({}, 2, 2, 4, 128, 1000, 1000, kt::keep_ratio{0.3});
  run_pipeline<kt::score::h2o>(kt::kvpress::observed_attention(), 1, 1, 1, 64, 1, 1, kt::keep_tokens{1});
}

TEST(ScorerPipelines, KeyNormUniformContiguousFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_pipeline<kt::score::key_norm>({}, 2, 2, 4, 128, 4097, 1, kt::keep_ratio{0.3});
  run_pipeline<kt::score::key_norm>({}, 1, 1, 1, 64, 1, 1, kt::keep_tokens{4});
}

TEST(ScorerPipelines, ExternalUniformContiguousFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  auto given = kt::testing::random_tensor<float, 3>({2, 2, 4097}, 81, 1.0f, {0, 1, 3});
  given(1, 0, 100) = std::numeric_limits<float>::quiet_NaN();
  run_pipeline<kt::score::external>(kt::score::external::config::from(given.cview()), 2, 2, 4, 128, 4097, 1,
                                    kt::keep_ratio{0.3});
}

}  // namespace
