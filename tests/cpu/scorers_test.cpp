// score::snapkv, score::h2o, score::key_norm, score::static_window (per-head and
// ALiBi windows): values the papers define, and bad inputs. (The scores of every
// scorer against its double oracle run in policy_product_test.cpp.)
#include <gtest/gtest.h>

#include <cmath>

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
