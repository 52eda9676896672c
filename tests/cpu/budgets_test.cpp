// budget::adaptive, budget::pyramid, budget::per_head: hand-derived counts,
// the properties their papers promise, the tie rule, and bad inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "common/policy_oracle.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

constexpr float inf = std::numeric_limits<float>::infinity();

/// keep_counts of `Budget` on a dense [B, H, T] score array.
template <class Budget>
std::vector<std::int32_t> counts_of(const typename Budget::config& cfg, std::vector<float> scores, std::int64_t batch,
                                    std::int64_t heads, std::int64_t tokens) {
  using impl = implementation<Budget, backend::cpu>;
  cfg.validate("counts_of");
  const tensor_view<const float, 3> view{scores.data(), {batch, heads, tokens}, row_major_strides<3>({batch, heads, tokens})};
  std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * heads), -1);
  const model_shape shape{heads, heads, 8};
  if constexpr (detail::needs_scratch<impl, typename Budget::config>) {
    std::vector<std::byte> scratch(impl::workspace_bytes(cfg, shape, batch, tokens));
    impl::keep_counts(cfg, view, counts.data(), workspace{scratch.data(), scratch.size()}, backend::host_stream{});
  } else {
    impl::keep_counts(cfg, view, counts.data(), backend::host_stream{});
  }
  return counts;
}

// ---- adaptive ------------------------------------------------------------------------

TEST(Adaptive, HandDerivedCountsPaperForm) {
  // 3 heads × 6 tokens, k = 3 (layer total 9), α = 0.5; head 1 protects its last 2 tokens.
  //   head 0: P = 0, B = 3, floor ⌊1.5⌋ = 1 → guaranteed {0.9}
  //   head 1: P = 2, B = 1, floor ⌊0.5⌋ = 0 → guaranteed {+∞, +∞}
  //   head 2: P = 0, B = 3, floor 1        → guaranteed {0.2}
  //   pool = 9 − 4 = 5 from the rest: 0.8 (h0), 0.7 (h0), 0.6 (h1), 0.5 (h0), 0.15 (h2)
  const std::vector<float> scores = {0.9f, 0.8f, 0.7f, 0.5f, 0.01f, 0.02f,   //
                                     0.6f, 0.05f, 0.03f, 0.04f, inf, inf,    //
                                     0.2f, 0.15f, 0.1f, 0.11f, 0.12f, 0.13f};
  const auto counts = counts_of<budget::adaptive>({.keep = keep_tokens{3}, .alpha = 0.5}, scores, 1, 3, 6);
  EXPECT_EQ(counts, (std::vector<std::int32_t>{4, 3, 2}));
}

TEST(Adaptive, HandDerivedCountsKvpressForm) {
  // Same scores; kvpress: floor ⌊0.5·3⌋ = 1 of each head's best (head 1's best is a +∞),
  // then the remaining 6 to the best of the rest: +∞ (h1), 0.8, 0.7, 0.5 (h0), 0.15, 0.13 (h2)... in order
  // +∞, 0.8, 0.7, 0.6, 0.5, 0.15 → h0 gets 3, h1 gets 2, h2 gets 1.
  const std::vector<float> scores = {0.9f, 0.8f, 0.7f, 0.5f, 0.01f, 0.02f,   //
                                     0.6f, 0.05f, 0.03f, 0.04f, inf, inf,    //
                                     0.2f, 0.15f, 0.1f, 0.11f, 0.12f, 0.13f};
  const auto counts =
      counts_of<budget::adaptive>({.keep = keep_tokens{3}, .alpha = 0.5, .kvpress_compatible = true}, scores, 1, 3, 6);
  EXPECT_EQ(counts, (std::vector<std::int32_t>{4, 3, 2}));
  // With α = 0 the two forms part: the paper form still guarantees the protected
  // tokens (and at least one token per head); kvpress's only the global order.
  const std::vector<float> flat = {0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0.4f, 0.01f, 0.01f, 0.01f, 0.01f, 0.01f, 0.01f};
  EXPECT_EQ(counts_of<budget::adaptive>({.keep = keep_tokens{3}, .alpha = 0.0, .kvpress_compatible = true}, flat, 1, 2, 6),
            (std::vector<std::int32_t>{6, 0}));
  EXPECT_EQ(counts_of<budget::adaptive>({.keep = keep_tokens{3}, .alpha = 0.0}, flat, 1, 2, 6),
            (std::vector<std::int32_t>{5, 1}));
}

TEST(Adaptive, TiesGoToTheLowerHeadThenTheLowerToken) {
  // Equal scores everywhere: floors first (⌊0.5·3⌋ = 1 per head), then the pool of
  // 4 goes to head 0 (lower head index) in token order.
  const std::vector<float> equal(10, 1.0f);
  const auto counts = counts_of<budget::adaptive>({.keep = keep_tokens{3}, .alpha = 0.5}, equal, 1, 2, 5);
  EXPECT_EQ(counts, (std::vector<std::int32_t>{5, 1}));
  const table_shape s{1, 2, 5};
  const score_table widened(equal.begin(), equal.end());
  EXPECT_EQ(top_k_sets(widened, s, {5, 1}), (kept_sets{{0, 1, 2, 3, 4}, {0}}));
}

TEST(Adaptive, RandomScoresKeepExactTotalsFloorsAndOneThreshold) {
  std::mt19937_64 random(11);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int trial = 0; trial < 50; ++trial) {
    const std::int64_t batch = 1 + trial % 3, heads = 1 + trial % 7, tokens = 5 + (trial * 7) % 60;
    const std::int64_t protect = trial % 4;  // last `protect` tokens of every head are +∞
    const std::int64_t k = protect + 1 + trial % (tokens - protect);
    const double alpha = (trial % 5) * 0.25;
    const bool kvpress_form = trial % 2 == 1;
    std::vector<float> scores(static_cast<std::size_t>(batch * heads * tokens));
    for (std::size_t i = 0; i < scores.size(); ++i)
      scores[i] = static_cast<std::int64_t>(i) % tokens >= tokens - protect ? inf : uniform(random);
    const budget::adaptive::config cfg{.keep = keep_tokens{k}, .alpha = alpha, .kvpress_compatible = kvpress_form};
    const auto counts = counts_of<budget::adaptive>(cfg, scores, batch, heads, tokens);
    const table_shape s{batch, heads, tokens};
    const score_table widened(scores.begin(), scores.end());
    std::vector<std::int64_t> counts64(counts.begin(), counts.end());
    // The brute-force oracle (sort everything) gives the same sets.
    EXPECT_EQ(top_k_sets(widened, s, counts64), adaptive_sets(widened, s, k, alpha, kvpress_form)) << trial;
    for (std::int64_t b = 0; b < batch; ++b) {
      std::int64_t total = 0;
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int32_t count = counts[static_cast<std::size_t>(b * heads + h)];
        total += count;
        const std::int64_t floor = kvpress_form ? static_cast<std::int64_t>(alpha * static_cast<double>(k))
                                                : protect + static_cast<std::int64_t>(alpha * static_cast<double>(k - protect));
        EXPECT_GE(count, floor) << "the safeguard floor holds";
        EXPECT_LE(count, tokens);
      }
      EXPECT_EQ(total, heads * k) << "the layer keeps exactly H·k";
    }
  }
}

TEST(Adaptive, RejectsBadInputs) {
  const std::vector<float> scores = {inf, inf, inf, 0.5f, 0.2f, 0.1f};
  EXPECT_THROW(counts_of<budget::adaptive>({.keep = keep_tokens{2}}, scores, 1, 1, 6), kvtrim::error)
      << "3 protected tokens do not fit a budget of 2 (paper form)";
  for (double alpha : {-0.1, 1.5, std::nan("")})
    EXPECT_THROW(budget::adaptive::config{.alpha = alpha}.validate("test"), kvtrim::error) << alpha;
  EXPECT_THROW(budget::adaptive::config{.keep = keep_ratio{0.0}}.validate("test"), kvtrim::error);
  try {
    budget::adaptive::config{.alpha = 2.0}.validate("kvtrim::scheme::compress");
    FAIL();
  } catch (const kvtrim::error& e) {
    EXPECT_STREQ(e.what(), "kvtrim::scheme::compress: argument 'config.budget.alpha': expected a safeguard fraction in "
                           "[0, 1], got 2.000000");
  }
}

// ---- pyramid -------------------------------------------------------------------------

std::vector<std::int64_t> schedule(budget::pyramid::config cfg, std::int64_t tokens) {
  std::vector<std::int64_t> keeps;
  for (cfg.layer = 0; cfg.layer < cfg.layers; ++cfg.layer) keeps.push_back(budget::pyramid::layer_keep(cfg, tokens));
  return keeps;
}

TEST(Pyramid, HandDerivedPaperSchedule) {
  // T = 1000, k = 200, no window, β = 20, L = 4: min = 10, max = 390,
  // B_l = 390, 263⅓, 136⅔, 10; cumulative 390, 653⅓, 790, 800 → 390, 263, 137, 10.
  EXPECT_EQ(schedule({.keep = keep_tokens{200}, .beta = 20, .layers = 4}, 1000),
            (std::vector<std::int64_t>{390, 263, 137, 10}));
  // Capped: T = 300, k = 200, window 20: B = 180, M = 280, max = 351 ≥ M → max = 280,
  // min = 80: B_l = 280, 180, 80 (+ the window each).
  EXPECT_EQ(schedule({.keep = keep_tokens{200}, .window = 20, .beta = 20, .layers = 3}, 300),
            (std::vector<std::int64_t>{300, 200, 100}));
  // β = 1: min = max = B, a flat schedule.
  EXPECT_EQ(schedule({.keep = keep_tokens{50}, .beta = 1, .layers = 5}, 100), (std::vector<std::int64_t>(5, 50)));
}

TEST(Pyramid, PaperScheduleKeepsTheTotalExactlyAndFallsWithDepth) {
  for (std::int64_t layers : {2, 3, 7, 32, 80})
    for (std::int64_t tokens : {97, 1000, 4099})
      for (double ratio : {0.05, 0.3, 0.77})
        for (std::int64_t window : {0, 8}) {
          const budget::pyramid::config cfg{.keep = keep_ratio{ratio}, .window = window, .beta = 20, .layers = layers};
          const std::int64_t k = detail::resolve_keep(cfg.keep, tokens);
          if (window > k) continue;  // an error (RejectsBadInputs)
          const auto keeps = schedule(cfg, tokens);
          EXPECT_EQ(std::accumulate(keeps.begin(), keeps.end(), std::int64_t{0}), layers * k);
          EXPECT_TRUE(std::is_sorted(keeps.rbegin(), keeps.rend()));
          EXPECT_LE(keeps.front(), tokens);
          EXPECT_GE(keeps.back(), window);
          // Each layer is B_l (the real-valued schedule) rounded down or up.
          const double B = static_cast<double>(k - window), M = static_cast<double>(tokens - window);
          double min = B / 20.0, max = 2.0 * B - min;
          if (max >= M) max = M, min = 2.0 * B - max;
          for (std::int64_t l = 0; l < layers; ++l) {
            const double real = max - static_cast<double>(l) * (max - min) / static_cast<double>(layers - 1);
            const double n = static_cast<double>(keeps[static_cast<std::size_t>(l)] - window);
            EXPECT_GE(n, std::floor(real - 1e-9));
            EXPECT_LE(n, std::ceil(real + 1e-9));
          }
        }
}

TEST(Pyramid, KvpressScheduleMatchesPyramidKVPress) {
  // Values of kvpress v0.5.4 PyramidKVPress.get_layer_budget (its Python, run by hand).
  const std::vector<std::int64_t> expected_4096 = {3994, 3868, 3743, 3617, 3492, 3366, 3240, 3115, 2989, 2864, 2738,
                                                   2613, 2487, 2362, 2236, 2111, 1985, 1860, 1734, 1609, 1483, 1358,
                                                   1232, 1107, 981,  856,  730,  604,  479,  353,  228,  102};
  EXPECT_EQ(schedule(kvpress::pyramidkv(0.5, 0, 32), 4096), expected_4096);
  const std::vector<std::int64_t> expected_3000 = {1755, 1692, 1628, 1565, 1502, 1438, 1375, 1312, 1248, 1185,
                                                   1122, 1058, 995,  932,  868,  805,  742,  678,  615,  552,
                                                   488,  425,  362,  298,  235,  172,  108,  45};
  EXPECT_EQ(schedule(kvpress::pyramidkv(0.7, 0, 28, 32), 3000), expected_3000);
  // min = x/β < window: kvpress falls back to SnapKV's round(T·(1 − cr)).
  EXPECT_EQ(schedule(kvpress::pyramidkv(0.8, 0, 4), 1000), (std::vector<std::int64_t>(4, 200)));
}

TEST(Pyramid, RejectsBadInputs) {
  EXPECT_THROW((budget::pyramid::config{.beta = 0}.validate("test")), kvtrim::error);
  EXPECT_THROW((budget::pyramid::config{.layer = 4, .layers = 4}.validate("test")), kvtrim::error);
  EXPECT_THROW((budget::pyramid::config{.layers = 0}.validate("test")), kvtrim::error);
  EXPECT_THROW((budget::pyramid::config{.window = -1}.validate("test")), kvtrim::error);
  EXPECT_THROW(budget::pyramid::layer_keep({.keep = keep_tokens{10}, .window = 11, .layers = 2}, 100), kvtrim::error)
      << "window longer than the budget";
  EXPECT_THROW(budget::pyramid::max_keep({.layer = -1}, 100), kvtrim::error) << "max_keep validates too";
}

// ---- per_head ------------------------------------------------------------------------

TEST(PerHead, KeepsEachHeadsLengthCappedAtTheContext) {
  const budget::per_head::config cfg{.lengths = {5, 6, 7, 1, 90, 3}, .kv_heads = 3, .layer = 1};
  const auto counts = counts_of<budget::per_head>(cfg, std::vector<float>(2 * 3 * 40, 0.0f), 2, 3, 40);
  EXPECT_EQ(counts, (std::vector<std::int32_t>{1, 40, 3, 1, 40, 3}));
  EXPECT_EQ(budget::per_head::max_keep(cfg, 40), 40);
  EXPECT_EQ(budget::per_head::max_keep({.lengths = {5, 6, 7, 1, 90, 3}, .kv_heads = 3, .layer = 0}, 40), 7);
}

TEST(PerHead, RejectsBadInputs) {
  EXPECT_THROW((budget::per_head::config{.lengths = {}, .kv_heads = 2}.validate("test")), kvtrim::error);
  EXPECT_THROW((budget::per_head::config{.lengths = {1, 2, 3}, .kv_heads = 2}.validate("test")), kvtrim::error);
  EXPECT_THROW((budget::per_head::config{.lengths = {1, 2}, .kv_heads = 2, .layer = 1}.validate("test")),
               kvtrim::error);
  EXPECT_THROW((budget::per_head::config{.lengths = {1, 0}, .kv_heads = 2}.validate("test")), kvtrim::error);
  EXPECT_THROW((budget::per_head::config{.lengths = {1, 2}, .kv_heads = 0}.validate("test")), kvtrim::error);
  EXPECT_THROW(counts_of<budget::per_head>({.lengths = {1, 2}, .kv_heads = 2}, std::vector<float>(30), 1, 3, 10),
               kvtrim::error)
      << "the config's kv heads differ from the layer's";
}

}  // namespace
