// score::snapkv, score::h2o, score::key_norm, score::static_window (per-head and
// ALiBi windows): values the papers define, and bad inputs. (The scores of every
// scorer against its double oracle run in policy_product_test.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/given_lse.hpp"
#include "common/policy_oracle.hpp"
#include "common/tensors.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

TEST(StaticWindow, AlibiSlopesFollowPressEtAl) {
  const auto eight = score::static_window::alibi_slopes(8);
  for (std::size_t h = 0; h < 8; ++h) EXPECT_DOUBLE_EQ(eight[h], std::exp2(-static_cast<double>(h + 1)));
  // 12 heads: the 8 slopes of 8 heads, then slopes 0, 2, 4, 6 of 16 heads (2^-0.5, 2^-1.5, ...).
  const auto twelve = score::static_window::alibi_slopes(12);
  ASSERT_EQ(twelve.size(), 12u);
  for (std::size_t h = 0; h < 8; ++h) EXPECT_DOUBLE_EQ(twelve[h], eight[h]);
  for (std::size_t e = 0; e < 4; ++e) EXPECT_DOUBLE_EQ(twelve[8 + e], std::exp2(-0.5 - static_cast<double>(e)));
}

TEST(StaticWindow, AlibiWindowsAreEightyNineOverTheSlope) {
  // L_h = ⌈89 / m_h⌉ = 89·2^(h+1) for 8 heads; a GQA kv head takes its group's longest.
  EXPECT_EQ(score::static_window::alibi_windows(8, 8),
            (std::vector<std::int64_t>{178, 356, 712, 1424, 2848, 5696, 11392, 22784}));
  EXPECT_EQ(score::static_window::alibi_windows(8, 2), (std::vector<std::int64_t>{1424, 22784}));
  EXPECT_EQ(score::static_window::alibi_windows(12, 12)[8], 126);  // ⌈89·√2⌉
  EXPECT_THROW(score::static_window::alibi_windows(8, 3), kvtrim::error);
  EXPECT_THROW(score::static_window::alibi_windows(8, 8, 0.0), kvtrim::error);
}

TEST(StaticWindow, PerHeadWindowsWithPerHeadBudgetKeepSinksAndWindowExactly) {
  const model_shape shape{2, 2, 4};
  const auto keys = random_tensor<float, 4>({1, 2, 30, 4}, 3);
  const score::static_window::config cfg{.sinks = 2, .windows = {5, 11}};
  const budget::per_head::config lengths{.lengths = score::static_window::per_head_lengths(cfg), .kv_heads = 2};
  const auto result = run_selection<score::static_window, budget::per_head>(cfg, lengths, shape, keys.cview(),
                                                                            keys.cview(), tensor_view<const float, 4>{});
  const kept_sets want = {{0, 1, 25, 26, 27, 28, 29}, {0, 1, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29}};
  EXPECT_EQ(result.kept, want);
  EXPECT_THROW((run_selection<score::static_window, budget::uniform>({.windows = {1, 2, 3}}, {}, shape, keys.cview(),
                                                                      keys.cview(), tensor_view<const float, 4>{})),
               kvtrim::error)
      << "three windows for two kv heads";
  EXPECT_THROW((score::static_window::config{.windows = {1, -2}}.validate("test")), kvtrim::error);
}

TEST(SnapKV, ReadsOnlyTheLastWindowQueriesAndProtectsTheWindow) {
  const model_shape shape{2, 1, 8};
  const auto keys = random_tensor<float, 4>({1, 1, 20, 8}, 5);
  auto queries = random_tensor<float, 4>({1, 2, 12, 8}, 6);
  const score::snapkv::config cfg{.window = 4, .kernel = 3};
  const auto first = run_selection<score::snapkv, budget::uniform>(cfg, {.keep = keep_tokens{8}}, shape, keys.cview(),
                                                                   keys.cview(), queries.cview());
  for (std::int64_t t = 0; t < 8; ++t)  // queries before the window must not matter
    for (std::int64_t d = 0; d < 8; ++d) queries(0, 0, t, d) = queries(0, 1, t, d) = 1e3f;
  const auto second = run_selection<score::snapkv, budget::uniform>(cfg, {.keep = keep_tokens{8}}, shape, keys.cview(),
                                                                    keys.cview(), queries.cview());
  EXPECT_EQ(first.scores, second.scores);
  for (std::int64_t j = 16; j < 20; ++j) EXPECT_EQ(first.scores[static_cast<std::size_t>(j)], infinity);
  for (std::int64_t j = 16; j < 20; ++j)
    EXPECT_TRUE(std::binary_search(first.kept[0].begin(), first.kept[0].end(), j));
}

TEST(SnapKV, SumAndMeanOverTheWindowRankAlike) {
  const model_shape shape{4, 2, 8};
  const auto keys = random_tensor<float, 4>({2, 2, 33, 8}, 8);
  const auto queries = random_tensor<float, 4>({2, 4, 7, 8}, 9);
  const auto mean = run_selection<score::snapkv, budget::uniform>({.window = 7}, {.keep = keep_tokens{15}}, shape,
                                                                  keys.cview(), keys.cview(), queries.cview());
  const auto sum = run_selection<score::snapkv, budget::uniform>(
      {.window = 7, .reduction = score::window_reduction::sum}, {.keep = keep_tokens{15}}, shape, keys.cview(),
      keys.cview(), queries.cview());
  EXPECT_EQ(mean.kept, sum.kept);
}

TEST(SnapKV, RejectsBadInputs) {
  const model_shape shape{2, 1, 8};
  const auto keys = random_tensor<float, 4>({1, 1, 10, 8}, 5);
  const auto queries = random_tensor<float, 4>({1, 2, 10, 8}, 6);
  const auto run = [&](score::snapkv::config cfg, std::int64_t observed) {
    const tensor_view<const float, 4> q{queries.view.data, {1, 2, observed, 8}, queries.view.strides};
    run_selection<score::snapkv, budget::uniform>(cfg, {.keep = keep_tokens{4}}, shape, keys.cview(), keys.cview(), q);
  };
  EXPECT_THROW(run({.window = 10}, 10), kvtrim::error) << "window as long as the prefill";
  EXPECT_THROW(run({.window = 12}, 10), kvtrim::error) << "window longer than the prefill";
  EXPECT_THROW(run({.window = 4}, 3), kvtrim::error) << "fewer queries than the window";
  EXPECT_THROW(run({.window = 4, .kernel = 4}, 4), kvtrim::error) << "even kernel";
  EXPECT_THROW(run({.window = 4, .kernel = 0}, 4), kvtrim::error) << "zero kernel";
  EXPECT_THROW(run({.window = 0}, 4), kvtrim::error) << "empty window";
  EXPECT_NO_THROW(run({.window = 4, .kernel = 1}, 4));
  try {
    run({.window = 4, .kernel = 6}, 4);
    FAIL();
  } catch (const kvtrim::error& e) {
    EXPECT_STREQ(e.what(), "run_selection: argument 'config.score.kernel': expected an odd pooling kernel ≥ 1 (1 "
                           "disables pooling), got 6");
  }
}

TEST(H2O, NeedsEveryPrefillQueryAndProtectsTheRecentWindow) {
  const model_shape shape{2, 2, 8};
  const auto keys = random_tensor<float, 4>({1, 2, 12, 8}, 5);
  const auto queries = random_tensor<float, 4>({1, 2, 12, 8}, 6);
  const tensor_view<const float, 4> fewer{queries.view.data, {1, 2, 11, 8}, queries.view.strides};
  EXPECT_THROW((run_selection<score::h2o, budget::uniform>({}, {.keep = keep_tokens{4}}, shape, keys.cview(),
                                                          keys.cview(), fewer)),
               kvtrim::error);
  const auto result = run_selection<score::h2o, budget::uniform>({.recent = keep_ratio{0.25}}, {.keep = keep_tokens{4}},
                                                                 shape, keys.cview(), keys.cview(), queries.cview());
  for (std::int64_t head = 0; head < 2; ++head)
    EXPECT_EQ(result.kept[static_cast<std::size_t>(head)].back(), 11);
  // ⌊0.25·12⌋ = 3 recent tokens + the single heaviest hitter.
  for (std::int64_t head = 0; head < 2; ++head) {
    const auto& kept = result.kept[static_cast<std::size_t>(head)];
    EXPECT_EQ(std::vector<std::int64_t>(kept.end() - 3, kept.end()), (std::vector<std::int64_t>{9, 10, 11}));
  }
  EXPECT_THROW((score::h2o::config{.recent = keep_tokens{0}}.validate("test")), kvtrim::error);
  EXPECT_NO_THROW((score::h2o::config{.recent = keep_tokens{0}, .protect_recent = false}.validate("test")));
}

// ---- given normalisers (config.lse, score/attention_mass.hpp) --------------------
// The same scores with the prefill's normalisers handed in (tests/common/given_lse.hpp:
// double, rounded once to float) as with them computed. Both paths share the
// logits' bits (fl(q·k)·fl(1/√D)); with a = max‖q‖·max‖k‖/√D, |L| ≤ a + ln T:
//   computed: exp(fl(l − m))/Z — the argument ≤ 2au off, exp ≤ 1.013 ulp (2.03u),
//     Z's left-to-right sum ≤ T·u and its terms' own errors, the division u;
//   given: exp(fl(l − L_f)) — L_f is the double LSE of the exact logits rounded
//     once (≤ u·(a + ln T)), ≠ the LSE of the float logits by ≤ δ_l = (D + 2)·u·a
//     (their sum over d in order and the scale), the subtraction ≤ u·(2a + ln T).
// The relative difference per probability is below expm1(δ_l + u·(7a + 2 ln T + T + 9));
// the mass, window mean, pooling and group reduction (positive sums) add their own
// roundings in each path, 2u per operation. Taken twice as large (a bound to hold,
// not a measurement). Kept sets: the same but for tokens whose score lies within
// twice the tolerance of the threshold.
template <class K, class Q>
double given_lse_tolerance(const host_tensor<K, 4>& keys, const host_tensor<Q, 4>& queries, std::int64_t first,
                           std::int64_t rows, std::int64_t kernel, std::int64_t group) {
  constexpr double u = 5.9604644775390625e-08;
  const auto largest = [](const auto& tensor, std::int64_t first_token) {
    double norm = 0.0;
    const auto& v = tensor.view;
    for (std::int64_t b = 0; b < v.extent(0); ++b)
      for (std::int64_t h = 0; h < v.extent(1); ++h)
        for (std::int64_t t = first_token; t < v.extent(2); ++t) {
          double squares = 0.0;
          for (std::int64_t d = 0; d < v.extent(3); ++d)
            squares += std::pow(static_cast<double>(to_float(v(b, h, t, d))), 2);
          norm = std::max(norm, std::sqrt(squares));
        }
    return norm;
  };
  const double head_dim = static_cast<double>(keys.view.extent(3)), tokens = static_cast<double>(keys.view.extent(2));
  const double a = largest(keys, 0) * largest(queries, first) / std::sqrt(head_dim);
  const double per_probability =
      std::expm1((head_dim + 2.0) * u * a + u * (7.0 * a + 2.0 * std::log(tokens) + tokens + 9.0));
  return 2.0 * (per_probability + 2.0 * u * static_cast<double>(rows + kernel + group + 8));
}

void expect_scores_within(const selection_result& computed, const selection_result& given, double tolerance,
                          std::int64_t tokens, std::int64_t keep) {
  ASSERT_EQ(computed.scores.size(), given.scores.size());
  for (std::size_t i = 0; i < computed.scores.size(); ++i) {
    const double c = static_cast<double>(computed.scores[i]), g = static_cast<double>(given.scores[i]);
    if (std::isinf(c)) {
      EXPECT_EQ(c, g) << "protected token " << i;
      continue;
    }
    ASSERT_LE(std::abs(c - g), tolerance * std::abs(c) + 1e-30) << "token " << i % static_cast<std::size_t>(tokens)
                                                                  << ": computed " << c << ", given " << g;
  }
  ASSERT_EQ(computed.kept.size(), given.kept.size());
  for (std::size_t head = 0; head < computed.kept.size(); ++head) {
    const auto& a = computed.kept[head];
    const auto& b = given.kept[head];
    ASSERT_EQ(a.size(), b.size()) << "head " << head;
    if (static_cast<std::int64_t>(a.size()) >= tokens || static_cast<std::int64_t>(a.size()) < keep) continue;
    double threshold = std::numeric_limits<double>::infinity();
    for (const auto j : a)
      threshold = std::min(threshold, static_cast<double>(computed.scores[head * static_cast<std::size_t>(tokens) +
                                                                          static_cast<std::size_t>(j)]));
    std::vector<std::int64_t> only;
    std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(only));
    for (const auto j : only)
      EXPECT_LE(std::abs(static_cast<double>(computed.scores[head * static_cast<std::size_t>(tokens) +
                                                             static_cast<std::size_t>(j)]) - threshold),
                2.0 * tolerance * std::abs(threshold))
          << "head " << head << ": token " << j << " kept by one path only, far from the threshold";
  }
}

TEST(SnapKV, GivenNormalisersGiveTheComputedScores) {
  struct shape_case {
    std::int64_t batch, kv_heads, group, head_dim, tokens, window, observed, kernel;
    score::pooling pooling;
  };
  for (const auto& c : {shape_case{2, 2, 2, 32, 300, 16, 24, 5, score::pooling::avg},
                        shape_case{1, 1, 4, 64, 129, 32, 32, 7, score::pooling::max},
                        shape_case{1, 2, 1, 16, 70, 8, 20, 1, score::pooling::avg}}) {
    SCOPED_TRACE(detail::cat("b", c.batch, " kv", c.kv_heads, " g", c.group, " d", c.head_dim, " t", c.tokens, " w",
                             c.window, " q", c.observed));
    const model_shape shape{c.kv_heads * c.group, c.kv_heads, c.head_dim};
    const auto keys = random_tensor<half, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 11, 1.0f, {0, 1, 2, 4});
    const auto queries = random_tensor<half, 4>({c.batch, shape.q_heads, c.observed, c.head_dim}, 12);
    const std::int64_t first = c.observed - c.window;
    // Rows before the window are NaN: SnapKV must not read them.
    const auto lse = reference_lse(keys.cview(), queries.cview(), first, {1, 0, 3});
    const score::snapkv::config cfg{.window = c.window, .kernel = c.kernel, .pooling = c.pooling};
    const std::int64_t keep = c.tokens / 3;
    const auto computed = run_selection<score::snapkv, budget::uniform>(cfg, {.keep = keep_tokens{keep}}, shape,
                                                                        keys.cview(), keys.cview(), queries.cview());
    const auto given = run_selection<score::snapkv, budget::uniform>(
        cfg.with_lse(lse.cview()), {.keep = keep_tokens{keep}}, shape, keys.cview(), keys.cview(), queries.cview());
    expect_scores_within(computed, given, given_lse_tolerance(keys, queries, first, c.window, c.kernel, c.group),
                         c.tokens, keep);
    EXPECT_NE(computed.scores, given.scores) << "the given normalisers were not used";
  }
}

TEST(H2O, GivenNormalisersGiveTheComputedScores) {
  for (const auto normalisation : {score::h2o::normalisation::none, score::h2o::normalisation::observed}) {
    const model_shape shape{4, 2, 16};
    const auto keys = random_tensor<bfloat16, 4>({2, 2, 150, 16}, 13);
    const auto queries = random_tensor<bfloat16, 4>({2, 4, 150, 16}, 14, 1.0f, {0, 0, 1, 0});
    const auto lse = reference_lse(keys.cview(), queries.cview());
    score::h2o::config cfg{.recent = keep_tokens{10}, .normalisation = normalisation};
    const auto computed = run_selection<score::h2o, budget::uniform>(cfg, {.keep = keep_tokens{40}}, shape, keys.cview(),
                                                                     keys.cview(), queries.cview());
    const auto given = run_selection<score::h2o, budget::uniform>(cfg.with_lse(lse.cview()), {.keep = keep_tokens{40}},
                                                                  shape, keys.cview(), keys.cview(), queries.cview());
    expect_scores_within(computed, given, given_lse_tolerance(keys, queries, 0, 150, 1, 2), 150, 40);
    EXPECT_NE(computed.scores, given.scores) << "the given normalisers were not used";
  }
}

// A non-finite normaliser (NaN, +∞, −∞) drops its row, on every backend: the very
// scores of a normaliser so large (1e30) that every exp(l − L) of the row is 0.
TEST(SnapKV, NonFiniteGivenNormalisersDropTheirRow) {
  const model_shape shape{4, 2, 16};
  const auto keys = random_tensor<float, 4>({1, 2, 60, 16}, 15);
  const auto queries = random_tensor<float, 4>({1, 4, 12, 16}, 16);
  const auto lse = reference_lse(keys.cview(), queries.cview());
  const score::snapkv::config cfg{.window = 12, .kernel = 3};
  const auto run = [&](float row_value) {
    auto poisoned = lse;
    poisoned.view.data = poisoned.storage.data();
    poisoned(0, 1, 11) = row_value;  // query head 1 (kv head 0), the window's last query
    return run_selection<score::snapkv, budget::uniform>(cfg.with_lse(poisoned.cview()), {.keep = keep_tokens{20}},
                                                         shape, keys.cview(), keys.cview(), queries.cview());
  };
  const auto intact = run(lse(0, 1, 11));
  const auto dropped = run(1e30f);
  EXPECT_NE(intact.scores, dropped.scores) << "the row should matter";
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()}) {
    SCOPED_TRACE(bad);
    const auto result = run(bad);
    EXPECT_EQ(result.scores, dropped.scores);
    EXPECT_EQ(result.kept, dropped.kept);
    for (const double value : result.scores) EXPECT_FALSE(std::isnan(value));
  }
}

TEST(SnapKV, GivenNormalisersOfTheWrongExtentsOrStridesAreRefused) {
  const model_shape shape{2, 1, 8};
  const auto keys = random_tensor<float, 4>({1, 1, 20, 8}, 5);
  const auto queries = random_tensor<float, 4>({1, 2, 12, 8}, 6);
  const auto lse = reference_lse(keys.cview(), queries.cview());
  const auto message = [&](const score::snapkv::config& cfg) {
    try {
      run_selection<score::snapkv, budget::uniform>(cfg, {.keep = keep_tokens{8}}, shape, keys.cview(), keys.cview(),
                                                    queries.cview());
    } catch (const kvtrim::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const score::snapkv::config cfg{.window = 4};
  // 11 rows for 12 observed queries (one short: a window_queries of another call).
  EXPECT_EQ(message(cfg.with_lse(tensor_view<const float, 3>{lse.view.data, {1, 2, 11}, lse.view.strides})),
            "kvtrim::score::snapkv: argument 'config.score.lse': expected normalisers of extents [1, 2, 12] (batch, "
            "q heads, observed queries of window_queries), got [1, 2, 11]");
  EXPECT_EQ(message(cfg.with_lse(tensor_view<const float, 3>{lse.view.data, {2, 1, 12}, lse.view.strides})),
            "kvtrim::score::snapkv: argument 'config.score.lse': expected normalisers of extents [1, 2, 12] (batch, "
            "q heads, observed queries of window_queries), got [2, 1, 12]");
  EXPECT_EQ(message(cfg.with_lse(tensor_view<const float, 3>{lse.view.data + 11, {1, 2, 12}, {24, 12, -1}})),
            "run_selection: argument 'config.score.lse': expected non-negative strides, got stride -1 on axis 2");
  EXPECT_EQ(message(cfg.with_lse(lse.cview())), "no error");
  // H2O: every prefill query's normaliser.
  score::h2o::config h2o_cfg{};
  const auto few = reference_lse(keys.cview(), queries.cview());  // 12 rows, 20 prefill queries
  const auto all_queries = random_tensor<float, 4>({1, 2, 20, 8}, 7);
  try {
    run_selection<score::h2o, budget::uniform>(h2o_cfg.with_lse(few.cview()), {.keep = keep_tokens{8}}, shape,
                                               keys.cview(), keys.cview(), all_queries.cview());
    FAIL() << "expected kvtrim::error";
  } catch (const kvtrim::error& e) {
    EXPECT_STREQ(e.what(), "kvtrim::score::h2o: argument 'config.score.lse': expected normalisers of extents [1, 2, "
                           "20] (batch, q heads, observed queries of window_queries), got [1, 2, 12]");
  }
}

TEST(KeyNorm, KeepsTheLowestNormKeys) {
  auto keys = make_tensor<float, 4>({1, 1, 5, 2});
  const float rows[5][2] = {{3, 4}, {0.1f, 0}, {1, 1}, {0, 0.2f}, {6, 8}};  // norms 5, 0.1, 1.41, 0.2, 10
  for (std::int64_t j = 0; j < 5; ++j)
    for (std::int64_t d = 0; d < 2; ++d) keys(0, 0, j, d) = rows[j][d];
  const auto result = run_selection<score::key_norm, budget::uniform>({}, {.keep = keep_tokens{3}}, {1, 1, 2},
                                                                      keys.cview(), keys.cview(),
                                                                      tensor_view<const float, 4>{});
  EXPECT_EQ(result.kept, (kept_sets{{1, 2, 3}}));
  EXPECT_FLOAT_EQ(static_cast<float>(result.scores[0]), -5.0f);
}

}  // namespace
