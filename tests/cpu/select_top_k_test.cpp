// The selection stage: per head, the keep_count highest scores, equal scores to
// the lower token index, NaN below every number, listed in ascending token
// order. Hand-made cases, then random scores full of ties and NaNs against a
// brute-force rank count.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common/streaming.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
using select_stage = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;

constexpr float nan = std::numeric_limits<float>::quiet_NaN();
constexpr float inf = std::numeric_limits<float>::infinity();

/// Runs the stage over scores [batch, kv_heads, tokens] (dense) and returns each head's kept tokens.
std::vector<std::vector<std::int32_t>> select(const std::vector<float>& scores, std::int64_t batch,
                                              std::int64_t kv_heads, const std::vector<std::int32_t>& keep_counts) {
  const std::int64_t heads = batch * kv_heads;
  const std::int64_t tokens = static_cast<std::int64_t>(scores.size()) / heads;
  const kt::tensor_view<const float, 3> view = kt::make_view(scores.data(), std::array<std::int64_t, 3>{batch, kv_heads, tokens});
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1), -1);
  std::int64_t total = 0;
  for (const auto count : keep_counts) total += count;
  std::vector<std::int32_t> kept(static_cast<std::size_t>(total), -1);
  kts::scratch_buffer scratch(select_stage::workspace_bytes(heads, tokens));
  select_stage::select(view, keep_counts.data(), offsets.data(), kept.data(), scratch.get(), {});
  std::vector<std::vector<std::int32_t>> result;
  EXPECT_EQ(offsets[0], 0);
  for (std::int64_t head = 0; head < heads; ++head)
    result.emplace_back(kept.begin() + offsets[static_cast<std::size_t>(head)],
                        kept.begin() + offsets[static_cast<std::size_t>(head + 1)]);
  return result;
}

std::vector<std::int32_t> select_one(const std::vector<float>& scores, std::int32_t keep) {
  return select(scores, 1, 1, {keep})[0];
}

using tokens = std::vector<std::int32_t>;

TEST(SelectTopK, HighestScoresInAscendingTokenOrder) {
  EXPECT_EQ(select_one({0.1f, 0.9f, 0.5f, 0.7f, 0.2f}, 3), (tokens{1, 2, 3}));
  EXPECT_EQ(select_one({3.0f, -1.0f, 2.0f}, 1), (tokens{0}));
  EXPECT_EQ(select_one({3.0f, -1.0f, 2.0f}, 3), (tokens{0, 1, 2}));
  EXPECT_EQ(select_one({3.0f, -1.0f, 2.0f}, 0), (tokens{}));
}

TEST(SelectTopK, EqualScoresKeepTheLowerIndex) {
  EXPECT_EQ(select_one(std::vector<float>(8, 1.0f), 3), (tokens{0, 1, 2}));
  EXPECT_EQ(select_one({5.0f, 7.0f, 7.0f, 1.0f, 7.0f}, 2), (tokens{1, 2}));
  EXPECT_EQ(select_one({5.0f, 7.0f, 7.0f, 1.0f, 7.0f}, 3), (tokens{1, 2, 4}));
  EXPECT_EQ(select_one({inf, 0.0f, inf, inf}, 2), (tokens{0, 2}));
  EXPECT_EQ(select_one({0.0f, -0.0f, 0.0f}, 1), (tokens{0}));  // −0 == +0: a tie
  EXPECT_EQ(select_one({-0.0f, 0.0f, 0.0f}, 1), (tokens{0}));
}

TEST(SelectTopK, NanRanksBelowEveryNumber) {
  // Order: 2, 1, −∞, then the NaNs by index.
  const std::vector<float> scores{nan, 1.0f, nan, -inf, 2.0f};
  EXPECT_EQ(select_one(scores, 2), (tokens{1, 4}));
  EXPECT_EQ(select_one(scores, 3), (tokens{1, 3, 4}));
  EXPECT_EQ(select_one(scores, 4), (tokens{0, 1, 3, 4}));
  EXPECT_EQ(select_one(scores, 5), (tokens{0, 1, 2, 3, 4}));
  EXPECT_EQ(select_one({nan, nan, nan}, 2), (tokens{0, 1}));
}

TEST(SelectTopK, KeepCountsClampToTheHeadAndDifferPerHead) {
  // Two sequences × two kv heads, ragged counts: CSR offsets follow them.
  const std::vector<float> scores{1, 2, 3, 4,  4, 3, 2, 1,  0, 0, 0, 0,  9, 1, 9, 1};
  const auto kept = select(scores, 2, 2, {2, 1, 4, 3});
  EXPECT_EQ(kept[0], (tokens{2, 3}));
  EXPECT_EQ(kept[1], (tokens{0}));
  EXPECT_EQ(kept[2], (tokens{0, 1, 2, 3}));
  EXPECT_EQ(kept[3], (tokens{0, 1, 2}));
}

TEST(SelectTopK, MatchesBruteForceRankCountOnRandomTiesAndNans) {
  // Brute force: token i's rank is the number of tokens that beat it — a larger
  // score, or an equal score at a lower index, with NaN below everything; it is
  // kept iff rank < keep.
  const auto beats = [](float a, std::int32_t ia, float b, std::int32_t ib) {
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) != std::isnan(b) ? !std::isnan(a) : ia < ib;
    return a > b || (a == b && ia < ib);
  };
  std::mt19937 random(2024);
  for (int trial = 0; trial < 300; ++trial) {
    const std::int32_t length = 1 + static_cast<std::int32_t>(random() % 60);
    std::vector<float> scores(static_cast<std::size_t>(length));
    for (auto& score : scores) {  // few distinct values: many ties
      const auto pick = random() % 12;
      score = pick == 0 ? nan : pick == 1 ? inf : pick == 2 ? -inf : static_cast<float>(pick % 4);
    }
    const auto keep = static_cast<std::int32_t>(random() % static_cast<unsigned>(length + 1));
    tokens expected;
    for (std::int32_t i = 0; i < length; ++i) {
      std::int32_t rank = 0;
      for (std::int32_t j = 0; j < length; ++j) rank += beats(scores[j], j, scores[i], i) ? 1 : 0;
      if (rank < keep) expected.push_back(i);
    }
    ASSERT_EQ(select_one(scores, keep), expected) << "trial " << trial << ", keep " << keep;
  }
}

TEST(SelectTopK, StaticWindowScoresGiveSinksThenRecent) {
  // score::static_window's scores through the stage: the paper's kept set.
  for (const std::int64_t sinks : {0, 1, 4, 9})
    for (const std::int32_t keep : {1, 3, 4, 5, 12, 40}) {
      std::vector<float> scores(40);
      for (std::int64_t i = 0; i < 40; ++i) scores[static_cast<std::size_t>(i)] = kt::score::static_window::score(sinks, i);
      const auto expected = kts::streaming_kept(40, sinks, keep);
      EXPECT_EQ(select_one(scores, keep), tokens(expected.begin(), expected.end())) << "sinks " << sinks << ", keep " << keep;
    }
}

}  // namespace
