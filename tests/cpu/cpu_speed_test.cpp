// The fast CPU backend (issue 13) against what it replaced and against double
// precision:
//   1. SnapKV / H2O scores (Eigen GEMM per GQA group, threads) are bit-identical
//      to the scalar fp32 reference they replaced (kept here verbatim as
//      scalar_*, with the backend's exp), over random shapes, head dims 4..1024,
//      fp16 and fp32.
//   2. The same scorers against a plain double-precision reimplementation: values
//      within 1e-4 relative (fp32 softmax over ≤ 600 keys), and on inputs built
//      with exact ties (keys drawn from a few distinct rows, so tied tokens have
//      equal scores and distinct ones are far apart) the kept sets equal the
//      double oracle's top-k under the tie rule (lower index first).
//   3. select_top_k (partition) and budget::adaptive (partition + one merge
//      partition) equal the sort-based code they replaced, with ties, ±∞ and NaN.
//   4. fp16 → fp32 row conversion equals Eigen's for all 65536 bit patterns.
//   5. With OpenMP, 1 thread and 2 threads give the same bits.
//   6. The reference's exp (the backend's own, detail/exp.hpp, since it replaced
//      std::exp): scores within a derived bound of the std::exp reference's, and
//      the same kept sets.
#include <gtest/gtest.h>

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

// ---- the scalar fp32 reference the fast path replaced (verbatim math) ----------
/// The exp of the reference: the backend's (detail/exp.hpp), and std::exp, which
/// the reference used before the backend had its own (for the test that the
/// change moved scores within a bound and kept every kept set).
struct backend_exp {
  float operator()(float x) const { return kt::detail::cpu_exp(x); }
};
struct std_exp {
  float operator()(float x) const { return std::exp(x); }
};

template <class Exp = backend_exp, class KeyT, class QueryT>
void scalar_accumulate(const kt::kv_view<const KeyT>& keys, const kt::window_view<const QueryT>& queries,
                       std::int64_t b, std::int64_t kv_head, std::int64_t q_head, std::int64_t first, float* logits,
                       float* accumulator) {
  const Exp exp;
  const std::int64_t tokens = keys.extent(2), observed = queries.extent(2), head_dim = keys.extent(3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> query(static_cast<std::size_t>(head_dim)), exps(static_cast<std::size_t>(tokens));
  std::vector<float> key_values(static_cast<std::size_t>(tokens * head_dim));  // the keys in fp32, converted once
  for (std::int64_t j = 0; j < tokens; ++j)
    for (std::int64_t d = 0; d < head_dim; ++d) key_values[j * head_dim + d] = kt::to_float(keys(b, kv_head, j, d));
  for (std::int64_t t = first; t < observed; ++t) {
    const std::int64_t position = tokens - observed + t;
    for (std::int64_t d = 0; d < head_dim; ++d) query[d] = kt::to_float(queries(b, q_head, t, d));
    float max_logit = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j <= position; ++j) {
      float dot = 0.0f;
      for (std::int64_t d = 0; d < head_dim; ++d) dot += query[d] * key_values[j * head_dim + d];
      logits[j] = dot * scale;
      max_logit = std::fmax(max_logit, logits[j]);
    }
    // Each e_j stored before it is summed, as the fast path does: a compiler that
    // contracts (-ffp-contract=fast, GCC's default with FMA targets) cannot fuse
    // exp's last product into the sum here either.
    for (std::int64_t j = 0; j <= position; ++j) exps[j] = exp(logits[j] - max_logit);
    float denominator = 0.0f;
    for (std::int64_t j = 0; j <= position; ++j) denominator += exps[j];
    for (std::int64_t j = 0; j <= position; ++j) accumulator[j] += exps[j] / denominator;
  }
}

/// The old reduce_attention_mass + snapkv/h2o post-processing, scalar.
template <class Exp, class KeyT, class QueryT, class Row>
std::vector<float> scalar_mass(const kt::kv_view<const KeyT>& keys, const kt::window_view<const QueryT>& queries,
                               const kt::model_shape& shape, kt::score::group_reduction reduction, std::int64_t first,
                               std::int64_t length, Row&& query_head_row) {
  const std::int64_t batch = keys.extent(0), tokens = keys.extent(2), group = shape.group_size();
  std::vector<float> scores(static_cast<std::size_t>(batch * shape.kv_heads * tokens), 0.0f);
  std::vector<float> logits(static_cast<std::size_t>(tokens)), accumulator(static_cast<std::size_t>(tokens));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
      float* row = scores.data() + (b * shape.kv_heads + h) * tokens;
      for (std::int64_t g = 0; g < group; ++g) {
        std::fill(accumulator.begin(), accumulator.end(), 0.0f);
        scalar_accumulate<Exp>(keys, queries, b, h, h * group + g, first, logits.data(), accumulator.data());
        const std::vector<float> head_row = query_head_row(accumulator);
        for (std::int64_t j = 0; j < length; ++j) {
          if (g == 0)
            row[j] = head_row[j];
          else if (reduction == kt::score::group_reduction::mean)
            row[j] += head_row[j];
          else
            row[j] = std::fmax(row[j], head_row[j]);
        }
      }
      if (reduction == kt::score::group_reduction::mean)
        for (std::int64_t j = 0; j < length; ++j) row[j] /= static_cast<float>(group);
    }
  return scores;
}

template <class Exp = backend_exp, class KeyT, class QueryT>
std::vector<float> scalar_snapkv(const kt::score::snapkv::config& cfg, const kt::model_shape& shape,
                                 const kt::kv_view<const KeyT>& keys, const kt::window_view<const QueryT>& queries) {
  const std::int64_t tokens = keys.extent(2), prefix = tokens - cfg.window;
  auto scores = scalar_mass<Exp>(keys, queries, shape, cfg.group, queries.extent(2) - cfg.window, prefix,
                            [&](std::vector<float> mass) {
                              if (cfg.reduction == kt::score::window_reduction::mean)
                                for (std::int64_t j = 0; j < prefix; ++j) mass[j] /= static_cast<float>(cfg.window);
                              std::vector<float> pooled(static_cast<std::size_t>(tokens));
                              for (std::int64_t j = 0; j < prefix; ++j)
                                pooled[j] = kt::detail::pool_at(mass.data(), prefix, j, cfg.kernel, cfg.pooling);
                              return pooled;
                            });
  for (std::int64_t head = 0; head < keys.extent(0) * shape.kv_heads; ++head)
    for (std::int64_t j = prefix; j < tokens; ++j) scores[head * tokens + j] = std::numeric_limits<float>::infinity();
  return scores;
}

template <class Exp = backend_exp, class KeyT, class QueryT>
std::vector<float> scalar_h2o(const kt::score::h2o::config& cfg, const kt::model_shape& shape,
                              const kt::kv_view<const KeyT>& keys, const kt::window_view<const QueryT>& queries) {
  const std::int64_t tokens = keys.extent(2);
  const std::int64_t recent = kt::score::h2o::recent_tokens(cfg, tokens);
  auto scores = scalar_mass<Exp>(keys, queries, shape, cfg.group, 0, tokens, [&](std::vector<float> mass) {
    if (cfg.normalisation == kt::score::h2o::normalisation::observed)
      for (std::int64_t j = 0; j < tokens; ++j) mass[j] /= static_cast<float>(tokens - j);
    return mass;
  });
  for (std::int64_t head = 0; head < keys.extent(0) * shape.kv_heads; ++head)
    for (std::int64_t j = tokens - recent; j < tokens; ++j) scores[head * tokens + j] = std::numeric_limits<float>::infinity();
  return scores;
}

// ---- the fast scorers, called as the scheme calls them -------------------------
template <class Scorer, class KeyT, class QueryT>
std::vector<float> fast_scores(const typename Scorer::config& cfg, const kt::model_shape& shape,
                               const kt::kv_view<const KeyT>& keys, const kt::window_view<const QueryT>& queries) {
  using impl = kt::implementation<Scorer, kt::backend::cpu>;
  const std::int64_t batch = keys.extent(0), tokens = keys.extent(2);
  std::vector<float> scores(static_cast<std::size_t>(batch * shape.kv_heads * tokens), -1.0f);
  const std::array<std::int64_t, 3> extents{batch, shape.kv_heads, tokens};
  std::vector<std::byte> scratch(impl::workspace_bytes(cfg, shape, batch, tokens) + 256);
  void* aligned = scratch.data() + (256 - reinterpret_cast<std::uintptr_t>(scratch.data()) % 256) % 256;
  impl::score(cfg, shape, keys, keys, queries, kt::make_view(scores.data(), extents),
              kt::workspace{aligned, scratch.size() - 256}, kt::backend::host_stream{});
  return scores;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct mass_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens, observed;
};

const mass_case mass_cases[] = {
    {1, 1, 1, 4, 9, 3},     {1, 2, 4, 64, 200, 40},   {2, 2, 2, 128, 300, 70}, {1, 8, 4, 128, 520, 64},
    {1, 1, 8, 256, 130, 97}, {2, 3, 1, 16, 77, 20},    {1, 2, 3, 128, 33, 33},  {1, 1, 2, 1024, 40, 9},
};

/// Fast scores = the scalar reference's bits, over the mass cases with at most
/// `max_tokens` tokens.
template <class KeyT>
void check_scorers_bitwise(std::uint64_t seed, std::int64_t max_tokens = 1 << 30) {
  for (const mass_case& c : mass_cases) {
    if (c.tokens > max_tokens) continue;
    SCOPED_TRACE(kt::detail::cat("B", c.batch, " Hkv", c.kv_heads, " G", c.group, " D", c.head_dim, " T", c.tokens,
                                 " nq", c.observed));
    const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
    auto keys = kts::random_tensor<KeyT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed, 2.0f);
    auto queries = kts::random_tensor<KeyT, 4>({c.batch, shape.q_heads, c.observed, c.head_dim}, seed + 1, 2.0f);
    for (auto group : {kt::score::group_reduction::mean, kt::score::group_reduction::max}) {
      kt::score::snapkv::config snap{};
      snap.window = std::min<std::int64_t>(c.observed, c.tokens - 1);
      snap.group = group;
      snap.kernel = c.tokens > 20 ? 5 : 1;
      EXPECT_TRUE(same_bits(fast_scores<kt::score::snapkv>(snap, shape, keys.cview(), queries.cview()),
                            scalar_snapkv(snap, shape, keys.cview(), queries.cview())));
    }
    // H2O observes every query.
    auto all_queries = kts::random_tensor<KeyT, 4>({c.batch, shape.q_heads, c.tokens, c.head_dim}, seed + 2, 2.0f);
    for (auto normalisation : {kt::score::h2o::normalisation::observed, kt::score::h2o::normalisation::none}) {
      kt::score::h2o::config h2o{};
      h2o.normalisation = normalisation;
      EXPECT_TRUE(same_bits(fast_scores<kt::score::h2o>(h2o, shape, keys.cview(), all_queries.cview()),
                            scalar_h2o(h2o, shape, keys.cview(), all_queries.cview())));
    }
  }
}

TEST(CpuSpeed, AttentionMassScorersBitIdenticalToScalarReferenceFp32) { check_scorers_bitwise<float>(101); }
TEST(CpuSpeed, AttentionMassScorersBitIdenticalToScalarReferenceFp16) { check_scorers_bitwise<kt::half>(202); }
#if KVTRIM_X86_DISPATCH
// The same on the portable paths (Eigen's products, the scalar exp), which a CPU
// without AVX2 takes: switched off here for the test's duration (shapes up to 300
// tokens: the 520-token case adds seconds of scalar reference and no new path).
TEST(CpuSpeed, AttentionMassScorersBitIdenticalToScalarReferenceOnThePortablePaths) {
  kt::detail::x86::vector_paths_enabled() = false;
  check_scorers_bitwise<kt::half>(303, 300);
  kt::detail::x86::vector_paths_enabled() = true;
}
#endif

// ---- double-precision reimplementation ------------------------------------------
/// SnapKV in double, straight from the paper's formula (mean over window and group).
std::vector<double> double_snapkv(const kt::score::snapkv::config& cfg, const kt::model_shape& shape,
                                  const kts::host_tensor<float, 4>& keys, const kts::host_tensor<float, 4>& queries) {
  const std::int64_t batch = keys.view.extent(0), tokens = keys.view.extent(2), head_dim = keys.view.extent(3);
  const std::int64_t observed = queries.view.extent(2), prefix = tokens - cfg.window, group = shape.group_size();
  std::vector<double> scores(static_cast<std::size_t>(batch * shape.kv_heads * tokens),
                             std::numeric_limits<double>::infinity());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      for (std::int64_t j = 0; j < prefix; ++j) scores[(b * shape.kv_heads + h) * tokens + j] = 0.0;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      for (std::int64_t g = 0; g < group; ++g) {
        std::vector<double> mass(static_cast<std::size_t>(tokens), 0.0);
        for (std::int64_t t = observed - cfg.window; t < observed; ++t) {
          const std::int64_t position = tokens - observed + t;
          std::vector<double> logit(static_cast<std::size_t>(position + 1));
          double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
          for (std::int64_t j = 0; j <= position; ++j) {
            double dot = 0.0;
            for (std::int64_t d = 0; d < head_dim; ++d)
              dot += static_cast<double>(queries(b, h * group + g, t, d)) * static_cast<double>(keys(b, h, j, d));
            logit[j] = dot / std::sqrt(static_cast<double>(head_dim));
            top = std::max(top, logit[j]);
          }
          for (std::int64_t j = 0; j <= position; ++j) sum += std::exp(logit[j] - top);
          for (std::int64_t j = 0; j <= position; ++j) mass[j] += std::exp(logit[j] - top) / sum / static_cast<double>(cfg.window);
        }
        for (std::int64_t j = 0; j < prefix; ++j)  // kernel 1: no pooling
          scores[(b * shape.kv_heads + h) * tokens + j] += mass[j] / static_cast<double>(group);
      }
  return scores;
}

/// Top-k of one head by (score descending, index ascending), ascending indices.
template <class S>
std::vector<std::int32_t> top_k(const S* scores, std::int64_t tokens, std::int64_t keep) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(tokens));
  for (std::int32_t j = 0; j < tokens; ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return scores[a] > scores[b]; });
  order.resize(static_cast<std::size_t>(keep));
  std::sort(order.begin(), order.end());
  return order;
}

// ---- the backend's exp against std::exp: scores within a bound, kept sets unchanged
// The reference exp changed from std::exp (glibc: ≤ 0.51 ulp) to the backend's
// (≤ 1.013 ulp, vectorised). Both exponentiate the same logits, so each e_j moves
// relatively by ≤ 1.523·2⁻²³ ≈ 3.05u (u = 2⁻²⁴); Z = Σ e_j (left to right, ≤ T terms)
// by that plus both sums' roundings, ≤ 2(T − 1)u; p_j = e_j/Z by the two plus 2u for
// the divisions; the scores are positive sums and means of p (over `rows` window
// or observed rows, then pooling over `kernel`, then the G heads of a group), each
// adding at most its own 2·(terms)u: relative bound
//   δ = (2·3.05 + 2T + 2 + 2·(rows + kernel + G) + 8)·u.
// Kept sets (top-k, ties to the lower index) at three budgets must be the same.
double exp_change_bound(std::int64_t tokens, std::int64_t rows, std::int64_t kernel, std::int64_t group) {
  return (2.0 * 3.05 + 2.0 * static_cast<double>(tokens) + 2.0 +
          2.0 * static_cast<double>(rows + kernel + group) + 8.0) * 0x1p-24;
}

void expect_close_and_same_kept(const std::vector<float>& now, const std::vector<float>& before, std::int64_t tokens,
                                double bound, double& worst_ratio, std::int64_t& moved) {
  ASSERT_EQ(now.size(), before.size());
  for (std::size_t i = 0; i < now.size(); ++i) {
    if (std::isinf(before[i])) {
      ASSERT_EQ(now[i], before[i]) << "at " << i;
      continue;
    }
    const double difference = std::abs(static_cast<double>(now[i]) - static_cast<double>(before[i]));
    moved += difference > 0.0 ? 1 : 0;
    const double ratio = difference / (bound * std::abs(static_cast<double>(before[i])) + 1e-37);
    worst_ratio = std::max(worst_ratio, ratio);
    EXPECT_LE(ratio, 1.0) << "score " << i << ": " << now[i] << " vs " << before[i];
  }
  for (std::int64_t head = 0; head < static_cast<std::int64_t>(now.size()) / tokens; ++head)
    for (const std::int64_t keep : {tokens / 8 + 1, tokens / 3, tokens / 2})
      EXPECT_EQ(top_k(now.data() + head * tokens, tokens, keep), top_k(before.data() + head * tokens, tokens, keep))
          << "head " << head << " keep " << keep;
}

TEST(CpuSpeed, BackendExpMovesScoresWithinBoundAndKeepsTheKeptSets) {
  double worst_ratio = 0.0;
  std::int64_t moved = 0, compared = 0;
  for (const mass_case& c : mass_cases) {
    SCOPED_TRACE(kt::detail::cat("Hkv", c.kv_heads, " G", c.group, " D", c.head_dim, " T", c.tokens));
    const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
    auto keys = kts::random_tensor<kt::half, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 303, 2.0f);
    auto queries = kts::random_tensor<kt::half, 4>({c.batch, shape.q_heads, c.observed, c.head_dim}, 304, 2.0f);
    kt::score::snapkv::config snap{};
    snap.window = std::min<std::int64_t>(c.observed, c.tokens - 1);
    snap.kernel = c.tokens > 20 ? 5 : 1;
    const auto now = fast_scores<kt::score::snapkv>(snap, shape, keys.cview(), queries.cview());
    expect_close_and_same_kept(now, scalar_snapkv<std_exp>(snap, shape, keys.cview(), queries.cview()), c.tokens,
                               exp_change_bound(c.tokens, snap.window, snap.kernel, c.group), worst_ratio, moved);
    compared += static_cast<std::int64_t>(now.size());
    if (c.tokens > 300) continue;  // H2O's scalar reference is quadratic in T
    auto all_queries = kts::random_tensor<kt::half, 4>({c.batch, shape.q_heads, c.tokens, c.head_dim}, 305, 2.0f);
    const kt::score::h2o::config h2o{};
    const auto heavy = fast_scores<kt::score::h2o>(h2o, shape, keys.cview(), all_queries.cview());
    expect_close_and_same_kept(heavy, scalar_h2o<std_exp>(h2o, shape, keys.cview(), all_queries.cview()), c.tokens,
                               exp_change_bound(c.tokens, c.tokens, 1, c.group), worst_ratio, moved);
    compared += static_cast<std::int64_t>(heavy.size());
  }
  std::cout << "[exp change] " << moved << " of " << compared << " scores moved; worst |Δ| / bound " << worst_ratio
            << "\n";
}

TEST(CpuSpeed, SnapKVAgainstDoublePrecisionValuesAndTies) {
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::int64_t batch = 2, tokens = 600, observed = 48;
  kt::score::snapkv::config cfg{};
  cfg.window = 32;
  cfg.kernel = 1;
  // Random values.
  {
    auto keys = kts::random_tensor<float, 4>({batch, 2, tokens, 64}, 5, 1.5f);
    auto queries = kts::random_tensor<float, 4>({batch, 8, observed, 64}, 6, 1.5f);
    const auto fast = fast_scores<kt::score::snapkv>(cfg, shape, keys.cview(), queries.cview());
    const auto exact = double_snapkv(cfg, shape, keys, queries);
    for (std::size_t i = 0; i < fast.size(); ++i) {
      if (std::isinf(exact[i])) {
        EXPECT_TRUE(std::isinf(fast[i]));
        continue;
      }
      EXPECT_NEAR(fast[i], exact[i], 1e-4 * exact[i] + 1e-12) << "at " << i;  // stated tolerance: 1e-4 relative
    }
  }
  // Ties: keys drawn from 6 distinct rows, so tokens sharing a row have the same
  // score (bit for bit) and different rows are far apart; the kept sets must be
  // the double oracle's under "lower index first".
  {
    auto distinct = kts::random_tensor<float, 2>({6, 64}, 7, 3.0f);
    auto keys = kts::make_tensor<float, 4>({batch, 2, tokens, 64});
    std::mt19937 random(8);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t j = 0; j < tokens; ++j) {
          const auto row = static_cast<std::int64_t>(random() % 6);
          for (std::int64_t d = 0; d < 64; ++d) keys(b, h, j, d) = distinct(row, d);
        }
    auto queries = kts::random_tensor<float, 4>({batch, 8, observed, 64}, 9, 1.0f);
    const auto fast = fast_scores<kt::score::snapkv>(cfg, shape, keys.cview(), queries.cview());
    const auto exact = double_snapkv(cfg, shape, keys, queries);
    for (std::int64_t keep : {40, 150, 333}) {
      std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * 2), static_cast<std::int32_t>(keep));
      std::vector<std::int64_t> offsets(counts.size() + 1);
      std::vector<std::int32_t> kept(static_cast<std::size_t>(batch * 2 * keep));
      using select = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;
      std::vector<std::byte> scratch(select::workspace_bytes(batch * 2, tokens));
      select::select(kt::tensor_view<const float, 3>{fast.data(), {batch, 2, tokens},
                                                     kt::row_major_strides<3>({batch, 2, tokens})},
                     counts.data(), offsets.data(), kept.data(), kt::workspace{scratch.data(), scratch.size()},
                     kt::backend::host_stream{});
      for (std::int64_t head = 0; head < batch * 2; ++head) {
        // Tokens with the same key row have bit-equal scores in double too (the
        // same arithmetic), so the oracle's stable sort applies the tie rule.
        const auto want = top_k(exact.data() + head * tokens, tokens, keep);
        const std::vector<std::int32_t> got(kept.begin() + offsets[head], kept.begin() + offsets[head + 1]);
        EXPECT_EQ(got, want) << "head " << head << " keep " << keep;
        for (std::int64_t a = 0; a < tokens; ++a)  // exact ties in double are exact ties in fp32
          for (std::int64_t c = a + 1; c < tokens; ++c)
            if (exact[head * tokens + a] == exact[head * tokens + c]) {
              ASSERT_EQ(fast[head * tokens + a], fast[head * tokens + c]) << a << " " << c;
            }
      }
    }
  }
}

// ---- selection and the adaptive budget against the sort-based code --------------
std::vector<float> hostile_scores(std::int64_t batch, std::int64_t heads, std::int64_t tokens, std::uint64_t seed) {
  std::mt19937 random(static_cast<std::uint32_t>(seed));
  std::vector<float> scores(static_cast<std::size_t>(batch * heads * tokens));
  for (float& x : scores) {
    const auto kind = random() % 20;
    x = kind == 0   ? std::numeric_limits<float>::infinity()
        : kind == 1 ? -std::numeric_limits<float>::infinity()
        : kind == 2 ? std::numeric_limits<float>::quiet_NaN()
        : kind < 8  ? static_cast<float>(random() % 4)  // many exact ties
                    : std::uniform_real_distribution<float>(-1.0f, 1.0f)(random);
  }
  return scores;
}

TEST(CpuSpeed, SelectTopKEqualsPartialSort) {
  using select = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;
  for (std::uint64_t seed = 0; seed < 20; ++seed) {
    const std::int64_t batch = 2, heads = 3, tokens = 1 + static_cast<std::int64_t>(seed * 37 % 300);
    const auto scores = hostile_scores(batch, heads, tokens, seed);
    std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * heads));
    for (std::size_t i = 0; i < counts.size(); ++i) counts[i] = static_cast<std::int32_t>((seed * 7 + i * 13) % (tokens + 2));
    std::vector<std::int64_t> offsets(counts.size() + 1);
    std::vector<std::int32_t> kept(static_cast<std::size_t>(batch * heads * tokens));
    std::vector<std::byte> scratch(select::workspace_bytes(batch * heads, tokens));
    select::select(kt::tensor_view<const float, 3>{scores.data(), {batch, heads, tokens},
                                                   kt::row_major_strides<3>({batch, heads, tokens})},
                   counts.data(), offsets.data(), kept.data(), kt::workspace{scratch.data(), scratch.size()},
                   kt::backend::host_stream{});
    for (std::int64_t head = 0; head < batch * heads; ++head) {
      const std::int64_t keep = std::clamp<std::int64_t>(counts[head], 0, tokens);
      std::vector<std::int32_t> order(static_cast<std::size_t>(tokens));
      for (std::int32_t j = 0; j < tokens; ++j) order[j] = j;
      const float* row = scores.data() + head * tokens;
      std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](std::int32_t a, std::int32_t b) {
        return kt::detail::ranks_before(row[a], a, row[b], b);
      });
      order.resize(static_cast<std::size_t>(keep));
      std::sort(order.begin(), order.end());
      ASSERT_EQ(offsets[head + 1] - offsets[head], keep);
      EXPECT_EQ(std::vector<std::int32_t>(kept.begin() + offsets[head], kept.begin() + offsets[head + 1]), order)
          << "seed " << seed << " head " << head;
    }
  }
}

/// The sort-and-merge adaptive budget the partition replaced (verbatim logic).
std::vector<std::int32_t> sorted_adaptive(const kt::budget::adaptive::config& cfg, const std::vector<float>& scores,
                                          std::int64_t batch, std::int64_t heads, std::int64_t tokens) {
  const std::int64_t budget = kt::budget::adaptive::head_budget(cfg, tokens);
  std::vector<std::int32_t> result(static_cast<std::size_t>(batch * heads));
  const auto at = [&](std::int64_t b, std::int64_t h, std::int64_t j) { return scores[(b * heads + h) * tokens + j]; };
  for (std::int64_t b = 0; b < batch; ++b) {
    std::vector<std::vector<std::int32_t>> order(static_cast<std::size_t>(heads));
    std::vector<std::int64_t> count(static_cast<std::size_t>(heads));
    std::int64_t pool = heads * budget;
    for (std::int64_t h = 0; h < heads; ++h) {
      order[h].resize(static_cast<std::size_t>(tokens));
      for (std::int32_t j = 0; j < tokens; ++j) order[h][j] = j;
      std::sort(order[h].begin(), order[h].end(), [&](std::int32_t l, std::int32_t r) {
        return kt::detail::ranks_before(at(b, h, l), l, at(b, h, r), r);
      });
      std::int64_t protected_tokens = 0;
      for (std::int64_t j = 0; j < tokens; ++j) protected_tokens += at(b, h, j) == std::numeric_limits<float>::infinity();
      count[h] = kt::budget::adaptive::guaranteed(cfg, budget, protected_tokens, h);
      pool -= count[h];
    }
    for (; pool > 0; --pool) {
      std::int64_t best = -1;
      for (std::int64_t h = 0; h < heads; ++h) {
        if (count[h] >= tokens) continue;
        const std::int32_t token = order[h][count[h]];
        if (best < 0) {
          best = h;
          continue;
        }
        const std::int32_t best_token = order[best][count[best]];
        if (kt::detail::ranks_before(at(b, h, token), h * tokens + token, at(b, best, best_token), best * tokens + best_token))
          best = h;
      }
      if (best < 0) break;
      ++count[best];
    }
    for (std::int64_t h = 0; h < heads; ++h) result[b * heads + h] = static_cast<std::int32_t>(count[h]);
  }
  return result;
}

TEST(CpuSpeed, AdaptiveBudgetEqualsSortAndMerge) {
  using impl = kt::implementation<kt::budget::adaptive, kt::backend::cpu>;
  for (std::uint64_t seed = 0; seed < 30; ++seed) {
    const std::int64_t batch = 2, heads = 1 + static_cast<std::int64_t>(seed % 5), tokens = 8 + static_cast<std::int64_t>(seed * 53 % 400);
    auto scores = hostile_scores(batch, heads, tokens, seed + 100);
    if (seed % 3 == 0)  // no NaN: the kvpress-style inputs
      for (float& x : scores) x = std::isnan(x) ? 0.5f : x;
    kt::budget::adaptive::config cfg{};
    std::int64_t most_protected = 0;  // the budget refuses a keep below a head's protected (+inf) tokens
    for (std::int64_t head = 0; head < batch * heads; ++head)
      most_protected = std::max<std::int64_t>(
          most_protected, std::count(scores.begin() + head * tokens, scores.begin() + (head + 1) * tokens,
                                     std::numeric_limits<float>::infinity()));
    cfg.keep = kt::keep_tokens{std::min<std::int64_t>(
        tokens, most_protected + static_cast<std::int64_t>(seed * 11 % static_cast<std::uint64_t>(tokens)))};
    cfg.alpha = static_cast<double>(seed % 4) / 4.0;
    cfg.kvpress_compatible = seed % 2 == 1;
    const kt::model_shape shape{.q_heads = heads, .kv_heads = heads, .head_dim = 8};
    std::vector<std::byte> scratch(impl::workspace_bytes(cfg, shape, batch, tokens));
    std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * heads));
    impl::keep_counts(cfg, kt::tensor_view<const float, 3>{scores.data(), {batch, heads, tokens},
                                                           kt::row_major_strides<3>({batch, heads, tokens})},
                      counts.data(), kt::workspace{scratch.data(), scratch.size()}, kt::backend::host_stream{});
    EXPECT_EQ(counts, sorted_adaptive(cfg, scores, batch, heads, tokens)) << "seed " << seed;
  }
}

// ---- fp16 conversion ---------------------------------------------------------------
TEST(CpuSpeed, HalfRowConversionMatchesEigenForEveryBitPattern) {
  std::vector<kt::half> all(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) all[i] = Eigen::numext::bit_cast<kt::half>(static_cast<std::uint16_t>(i));
  std::vector<float> fast(all.size());
  kt::detail::half_row_to_float(all.data(), fast.data(), static_cast<std::int64_t>(all.size()));
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const float want = static_cast<float>(all[i]);
    std::uint32_t a, b;
    std::memcpy(&a, &fast[i], 4);
    std::memcpy(&b, &want, 4);
    if (std::isnan(want))
      ASSERT_TRUE(std::isnan(fast[i])) << i;
    else
      ASSERT_EQ(a, b) << "half bits " << i;
  }
}

// ---- threads ---------------------------------------------------------------------------
#if defined(_OPENMP)
TEST(CpuSpeed, ResultsDoNotDependOnTheThreadCount) {
  const kt::model_shape shape{.q_heads = 16, .kv_heads = 4, .head_dim = 64};
  auto keys = kts::random_tensor<kt::half, 4>({2, 4, 257, 64}, 31, 2.0f);
  auto queries = kts::random_tensor<kt::half, 4>({2, 16, 257, 64}, 32, 2.0f);
  const int saved = omp_get_max_threads();
  std::vector<float> by_threads[2];
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    kt::score::h2o::config cfg{};
    by_threads[threads - 1] = fast_scores<kt::score::h2o>(cfg, shape, keys.cview(), queries.cview());
  }
  omp_set_num_threads(saved);
  EXPECT_TRUE(same_bits(by_threads[0], by_threads[1]));
}
#endif

}  // namespace
