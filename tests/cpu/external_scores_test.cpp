// score::external on the CPU reference: the caller's scores rank the tokens as
// they are (NaN last, +∞ first), through any budget and a full scheme; bad
// score tensors are refused naming config.score.scores before anything is written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/policy_oracle.hpp"
#include "common/tensors.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

/// Tokens of one head with the `keep` highest given scores (NaN lowest, ties to
/// the lower index), ascending: the definition, written without kvtrim's code.
std::vector<std::int64_t> top_tokens(const std::vector<float>& given, std::int64_t keep) {
  std::vector<std::int64_t> order(given.size());
  std::iota(order.begin(), order.end(), std::int64_t{0});
  const auto rank = [&](std::int64_t j) {
    const float x = given[static_cast<std::size_t>(j)];
    return std::isnan(x) ? -std::numeric_limits<double>::infinity() : static_cast<double>(x);
  };
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return rank(a) > rank(b); });
  order.resize(static_cast<std::size_t>(std::min<std::int64_t>(keep, static_cast<std::int64_t>(given.size()))));
  std::sort(order.begin(), order.end());
  return order;
}

TEST(ExternalScores, UniformBudgetKeepsTheHighestGivenScoresOfEachHead) {
  const model_shape shape{4, 2, 8};
  const std::int64_t batch = 2, tokens = 37;
  const auto keys = random_tensor<float, 4>({batch, 2, tokens, 8}, 1);
  auto given = random_tensor<float, 3>({batch, 2, tokens}, 2, 1.0f, {1, 3, 2});  // strided
  given(0, 0, 5) = std::numeric_limits<float>::quiet_NaN();         // ranked last
  given(1, 1, 3) = std::numeric_limits<float>::infinity();          // kept first
  given(1, 0, 10) = given(1, 0, 20) = 5.0f;                         // a tie at the top: both kept
  const auto result = run_selection<score::external, budget::uniform>(
      score::external::config::from(given.cview()), {.keep = keep_tokens{9}}, shape, keys.cview(), keys.cview(),
      tensor_view<const float, 4>{});
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < 2; ++h) {
      std::vector<float> row;
      for (std::int64_t j = 0; j < tokens; ++j) row.push_back(given(b, h, j));
      const auto want = top_tokens(row, 9);
      EXPECT_EQ(result.kept[static_cast<std::size_t>(b * 2 + h)], want) << "sequence " << b << ", head " << h;
    }
  EXPECT_EQ(result.scores[static_cast<std::size_t>(5)], -std::numeric_limits<double>::infinity()) << "NaN → −∞";
}

TEST(ExternalScores, AdaptiveBudgetSpendsTheLayerTotalOnTheGivenScores) {
  // Ada-KV over external scores: one head's scores dominate, so it takes more than
  // k tokens while the total stays exactly H·k per sequence.
  const model_shape shape{2, 2, 4};
  const std::int64_t tokens = 40;
  const auto keys = random_tensor<float, 4>({1, 2, tokens, 4}, 3);
  auto given = random_tensor<float, 3>({1, 2, tokens}, 4);
  for (std::int64_t j = 0; j < tokens; ++j) given(0, 0, j) += 100.0f;
  const auto result = run_selection<score::external, budget::adaptive>(
      score::external::config::from(given.cview()), {.keep = keep_tokens{10}, .alpha = 0.2}, shape, keys.cview(),
      keys.cview(), tensor_view<const float, 4>{});
  EXPECT_EQ(result.kept[0].size() + result.kept[1].size(), 20u);
  EXPECT_GT(result.kept[0].size(), 10u);
}

TEST(ExternalScores, ContiguousSchemeStoresTheTokensTheScoresChose) {
  using scheme = kvtrim::scheme<layout::contiguous, score::external, budget::uniform, codec::fp16, backend::cpu>;
  const model_shape shape{2, 1, 8};
  const std::int64_t tokens = 16;
  const auto keys = random_tensor<half, 4>({1, 1, tokens, 8}, 5);
  const auto values = random_tensor<half, 4>({1, 1, tokens, 8}, 6);
  std::vector<float> given(tokens);
  for (std::int64_t j = 0; j < tokens; ++j) given[static_cast<std::size_t>(j)] = static_cast<float>((j * 7) % tokens);
  scheme::config cfg;
  cfg.score = score::external::config::from(make_view(given.data(), std::array<std::int64_t, 3>{1, 1, tokens}));
  cfg.budget.keep = keep_tokens{4};
  auto cache = scheme::make_cache(shape, 1, 4, codec::fp16::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, 1, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, {scratch.data(), scratch.size()});
  const auto positions = head_positions(cache.view(), 0, 0);
  std::vector<std::int64_t> stored(positions.begin(), positions.end());
  EXPECT_EQ(stored, top_tokens(given, 4));
}

TEST(ExternalScores, BadScoreTensorsAreRefusedNamingThem) {
  using scheme = kvtrim::scheme<layout::contiguous, score::external, budget::uniform, codec::fp16, backend::cpu>;
  const model_shape shape{2, 1, 8};
  const std::int64_t tokens = 16;
  const auto keys = random_tensor<half, 4>({1, 1, tokens, 8}, 7);
  std::vector<float> given(tokens, 1.0f);
  auto cache = scheme::make_cache(shape, 1, 4, codec::fp16::config{});
  const std::vector<half> before(cache.view().storage.keys, cache.view().storage.keys + 4 * 8);
  const auto refused = [&](const score::external::config& score_cfg, const std::string& argument) {
    scheme::config cfg;
    cfg.score = score_cfg;
    cfg.budget.keep = keep_tokens{4};
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, 1, tokens, cfg));
    try {
      scheme::compress(keys.cview(), keys.cview(), cache.view(), cfg, {scratch.data(), scratch.size()});
      ADD_FAILURE() << "expected kvtrim::error for " << argument;
    } catch (const kvtrim::error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  refused({}, "config.score.scores");  // no scores
  refused(score::external::config::from(make_view(given.data(), std::array<std::int64_t, 3>{1, 1, tokens - 1})),
          "config.score.scores");  // one token short
  auto negative = score::external::config::from(make_view(given.data(), std::array<std::int64_t, 3>{1, 1, tokens}));
  negative.strides[2] = -1;
  refused(negative, "config.score.strides");
  EXPECT_EQ(*cache.view().length, 0);
  EXPECT_TRUE(std::equal(before.begin(), before.end(), cache.view().storage.keys,
                         [](half a, half b) { return to_float(a) == to_float(b) || (std::isnan(to_float(a)) && std::isnan(to_float(b))); }))
      << "a refused call leaves the cache as it was";
}

}  // namespace
