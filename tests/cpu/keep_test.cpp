// How a keep amount becomes a token count: ratios round down (kvpress's
// int(T·(1 − cr))), never below one token, never above the context.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

std::int64_t keep_of(kt::keep_amount keep, std::int64_t tokens) {
  kt::budget::uniform::config cfg;
  cfg.keep = keep;
  return kt::budget::uniform::max_keep(cfg, tokens);
}

TEST(KeepAmount, RatioRoundsDown) {
  EXPECT_EQ(keep_of(kt::keep_ratio{0.35}, 10), 3);   // 3.5
  EXPECT_EQ(keep_of(kt::keep_ratio{0.999}, 10), 9);  // 9.99, not rounded to 10
  EXPECT_EQ(keep_of(kt::keep_ratio{0.5}, 7), 3);     // 3.5
  EXPECT_EQ(keep_of(kt::keep_ratio{0.25}, 4096), 1024);
}

TEST(KeepAmount, RatioKeepsAtLeastOneToken) {
  EXPECT_EQ(keep_of(kt::keep_ratio{0.01}, 10), 1);  // 0.1
  EXPECT_EQ(keep_of(kt::keep_ratio{1e-9}, 1000), 1);
  EXPECT_EQ(keep_of(kt::keep_ratio{0.5}, 1), 1);
}

TEST(KeepAmount, NeverMoreThanTheContext) {
  EXPECT_EQ(keep_of(kt::keep_ratio{1.0}, 10), 10);
  EXPECT_EQ(keep_of(kt::keep_tokens{1000}, 10), 10);
  EXPECT_EQ(keep_of(kt::keep_tokens{10}, 10), 10);
  EXPECT_EQ(keep_of(kt::keep_tokens{3}, 10), 3);
  EXPECT_EQ(keep_of(kt::keep_tokens{1}, 1), 1);
}

TEST(KeepAmount, EmptyHeadKeepsNothing) {
  EXPECT_EQ(keep_of(kt::keep_ratio{0.5}, 0), 0);
  EXPECT_EQ(keep_of(kt::keep_tokens{4}, 0), 0);
}

TEST(KeepAmount, RatioMatchesKvpressForEveryCompressionRatio) {
  // kvpress: n_kept = int(q_len * (1 - compression_ratio)) in IEEE doubles; the
  // same doubles here give the same count (where kvpress's is at least 1).
  for (int percent = 1; percent < 100; ++percent)
    for (const std::int64_t tokens : {1, 7, 100, 333, 1000, 4096, 32768, 131071}) {
      const double compression_ratio = percent / 100.0;
      const auto kvpress = static_cast<std::int64_t>(static_cast<double>(tokens) * (1.0 - compression_ratio));
      EXPECT_EQ(keep_of(kt::keep_ratio{1.0 - compression_ratio}, tokens), std::max<std::int64_t>(kvpress, 1))
          << "T " << tokens << ", cr " << compression_ratio;
    }
}

TEST(KeepAmount, CompressStoresTheResolvedCount) {
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 1, .head_dim = 64};
  auto keys = kts::random_tensor<float, 4>({1, 1, 10, 64}, 5);
  for (const auto& [keep, expected] : std::vector<std::pair<kt::keep_amount, std::int64_t>>{
           {kt::keep_ratio{0.35}, 3}, {kt::keep_ratio{0.01}, 1}, {kt::keep_ratio{1.0}, 10}, {kt::keep_tokens{99}, 10}}) {
    scheme::config cfg;
    cfg.budget.keep = keep;
    auto cache = scheme::make_cache(shape, std::int64_t{1}, std::int64_t{10}, kt::codec::fp32::config{});
    kts::scratch_buffer scratch(scheme::compress_workspace(shape, 1, 10, cfg));
    scheme::compress(keys.view, keys.view, cache.view(), cfg, scratch.get());
    EXPECT_EQ(*cache.view().length, expected);
  }
}

TEST(KeepAmount, Defaults) {
  // uniform: 1024 tokens per head; static_window: 4 sinks (StreamingLLM).
  EXPECT_EQ(keep_of(kt::budget::uniform::config{}.keep, 100000), 1024);
  EXPECT_EQ(kt::score::static_window::config{}.sinks, 4);
}

}  // namespace
