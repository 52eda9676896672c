// Where the policies of issue 6 meet the ragged layouts (part A's scorers and
// budgets on part B's paged and flat): running out of pages or slots with an
// Ada-KV budget, a kvpress-form Ada-KV head that ends empty, configs whose shape
// does not match the cache, and RazorAttention's compensation table across
// compress calls. Every failure must be a kvtrim::error that leaves the cache as
// it was — never a crash (the sanitizer build runs these too).
//
// Tolerance: fp32 storage, attention within 5e-5 of the double oracle (see
// pipeline_product_test.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common/oracle.hpp"
#include "common/policy_cases.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

constexpr double attention_tolerance = 5e-5;

template <class Layout>
class RaggedSeams : public ::testing::Test {};
using ragged_layouts = ::testing::Types<layout::paged, layout::flat>;
TYPED_TEST_SUITE(RaggedSeams, ragged_layouts);

template <class Layout, class Scorer, class Budget>
using seam_scheme = kvtrim::scheme<Layout, Scorer, Budget, codec::fp32, backend::cpu>;

/// Expects `call` to throw kvtrim::error whose message contains `text`.
template <class Call>
void expect_error(Call&& call, const std::string& text) {
  try {
    call();
    ADD_FAILURE() << "expected a kvtrim::error mentioning \"" << text << "\"";
  } catch (const kvtrim::error& failure) {
    EXPECT_NE(std::string(failure.what()).find(text), std::string::npos) << failure.what();
  }
}

/// Σ over heads of the tokens each holds.
template <class View>
std::int64_t tokens_held(const View& cache) {
  std::int64_t total = 0;
  for (std::int64_t b = 0; b < cache.batch; ++b)
    for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) total += cache.head_length(b, h);
  return total;
}

/// A pool sized for what a *uniform* budget of k per head needs (heads·⌈k/page⌉ pages,
/// or heads·k slots) is too small for Ada-KV's uneven split of the same total: compress
/// must say so and leave the empty cache untouched; attend then reports the empty heads.
TYPED_TEST(RaggedSeams, AdaptiveBudgetRunsOutOfRoomWithAnErrorNotACrash) {
  using scheme = seam_scheme<TypeParam, score::snapkv, budget::adaptive>;
  const model_shape shape{.q_heads = 8, .kv_heads = 4, .head_dim = 16};
  const std::int64_t batch = 2, tokens = 64, keep = 12;  // 3 pages of 4 per head, uniformly
  const auto in = make_prefill<snapkv_case>(shape, batch, tokens, 5);
  typename scheme::config cfg{.score = {.window = 6}, .budget = {.keep = keep_tokens{keep}, .alpha = 0.2}};
  // The split Ada-KV picks, from the selection stage alone.
  const auto selected = run_selection<score::snapkv, budget::adaptive>(cfg.score, cfg.budget, shape, in.keys.cview(),
                                                                       in.values.cview(), in.queries.cview());
  std::int64_t pages_needed = 0;
  bool uneven = false;
  for (auto count : selected.counts) {
    pages_needed += layout::paged::pages_for(count, 4);
    uneven = uneven || count != keep;
  }
  ASSERT_TRUE(uneven) << "the inputs must make Ada-KV move tokens between heads";

  const std::int64_t heads = batch * shape.kv_heads;
  typename TypeParam::pool_size pool{};
  std::string message;
  if constexpr (std::is_same_v<TypeParam, layout::paged>) {
    pool = {heads * layout::paged::pages_for(keep, 4), 4};
    ASSERT_GT(pages_needed, pool.pages) << "page rounding of uneven heads needs more pages";
    message = "pool exhausted";
  } else {
    pool = {heads * keep - 1};  // one slot short of the layer's total
    message = "buffer exhausted";
  }
  auto cache = scheme::make_cache(shape, batch, pool, codec::fp32::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  expect_error([&] { scheme::compress(in.keys.cview(), in.values.cview(), in.queries.cview(), cache.view(), cfg,
                                      workspace{scratch.data(), scratch.size()}); },
               message);
  EXPECT_EQ(tokens_held(cache.view()), 0) << "a failed compress changes nothing";
  if constexpr (std::is_same_v<TypeParam, layout::paged>) {
    EXPECT_EQ(cache.view().pages_in_use(), 0);
  }
  const auto queries = random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, 6);
  auto out = make_tensor<float, 3>({batch, shape.q_heads, shape.head_dim});
  expect_error([&] { scheme::attend(queries.cview(), cache.view(), out.view, workspace{}); }, "empty head");

  // With the pages or slots Ada-KV actually needs, the same call succeeds.
  if constexpr (std::is_same_v<TypeParam, layout::paged>)
    pool.pages = pages_needed;
  else
    pool.slots = heads * keep;
  auto enough = scheme::make_cache(shape, batch, pool, codec::fp32::config{});
  scheme::compress(in.keys.cview(), in.values.cview(), in.queries.cview(), enough.view(), cfg,
                   workspace{scratch.data(), scratch.size()});
  EXPECT_EQ(tokens_held(enough.view()), heads * keep);
  for (std::int64_t head = 0; head < heads; ++head)
    EXPECT_EQ(enough.view().head_length(head / 4, head % 4), selected.counts[static_cast<std::size_t>(head)]);
}

/// kvpress's AdaKVPress floor ⌊α·k⌋ can be 0, and then a head may keep nothing (kvpress
/// does the same). The ragged layouts store the empty head, attend reports it as an
/// error, and an append gives the head its first token — after which attention works.
TYPED_TEST(RaggedSeams, KvpressAdaptiveHeadLeftEmptyIsAnErrorAtAttendThenAppendable) {
  using scheme = seam_scheme<TypeParam, score::key_norm, budget::adaptive>;
  const model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
  const std::int64_t batch = 1, tokens = 40;
  auto keys = random_tensor<float, 4>({batch, 2, tokens, 8}, 11);
  const auto values = random_tensor<float, 4>({batch, 2, tokens, 8}, 12);
  for (std::int64_t t = 0; t < tokens; ++t)  // head 0's keys are 10× longer: key_norm ranks all of them last
    for (std::int64_t d = 0; d < 8; ++d) keys(0, 0, t, d) *= 10.0f;
  typename scheme::config cfg{.budget = kvpress::adakv(0.65, 0.05)};  // k = 14, ⌊0.05·14⌋ = 0
  auto cache = roomy_cache<scheme>(shape, batch, tokens + 1);
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, workspace{scratch.data(), scratch.size()});
  ASSERT_EQ(cache.view().head_length(0, 0), 0);
  ASSERT_EQ(cache.view().head_length(0, 1), 28);

  const auto queries = random_tensor<float, 3>({batch, 4, 8}, 13);
  auto out = make_tensor<float, 3>({batch, 4, 8});
  expect_error([&] { scheme::attend(queries.cview(), cache.view(), out.view, workspace{}); }, "empty head");

  const auto new_keys = random_tensor<float, 4>({batch, 2, 1, 8}, 14);
  const auto new_values = random_tensor<float, 4>({batch, 2, 1, 8}, 15);
  scheme::append(cache.view(), new_keys.cview(), new_values.cview());
  scheme::attend(queries.cview(), cache.view(), out.view, workspace{});
  const auto all_keys = concat_tokens(keys.cview(), new_keys.cview());
  const auto all_values = concat_tokens(values.cview(), new_values.cview());
  const auto want = oracle_attention(queries.cview(), all_keys.cview(), all_values.cview(), 2,
                                     [&](std::int64_t, std::int64_t h) {
                                       kept_tokens set;
                                       if (h == 1) {  // key_norm: head 1 keeps its 28 lowest-norm keys
                                         const auto scores = key_norm_scores(keys.cview());
                                         const auto order = rank_order(scores, {1, 2, tokens}, 0, 1);
                                         set.tokens.assign(order.begin(), order.begin() + 28);
                                         std::sort(set.tokens.begin(), set.tokens.end());
                                       }
                                       set.tokens.push_back(tokens);
                                       return set;
                                     });
  EXPECT_LE(max_abs_error(out.view, want), attention_tolerance);
}

/// Part A's configs carry per-head data sized for one model; handing them a cache of
/// another shape must fail with a kvtrim::error naming the config, before any write.
TYPED_TEST(RaggedSeams, PerHeadConfigsOfAnotherShapeAreErrors) {
  const model_shape shape{.q_heads = 6, .kv_heads = 3, .head_dim = 8};
  const std::int64_t batch = 2, tokens = 30;
  const auto keys = random_tensor<float, 4>({batch, 3, tokens, 8}, 21);
  const auto values = random_tensor<float, 4>({batch, 3, tokens, 8}, 22);
  {
    using scheme = seam_scheme<TypeParam, score::key_norm, budget::per_head>;
    typename scheme::config cfg;
    cfg.budget = {.lengths = {5, 6, 7, 8}, .kv_heads = 4, .layer = 0};  // a 4-kv-head profile
    auto cache = roomy_cache<scheme>(shape, batch, tokens);
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    expect_error([&] { scheme::compress(keys.cview(), values.cview(), cache.view(), cfg,
                                        workspace{scratch.data(), scratch.size()}); },
                 "config.budget.kv_heads");
    EXPECT_EQ(tokens_held(cache.view()), 0);
    cfg.budget = {.lengths = {5, 6, 7}, .kv_heads = 3, .layer = 1};  // one layer only
    expect_error([&] { (void)scheme::compress_workspace(shape, batch, tokens, cfg); }, "config.budget.layer");
  }
  {
    using scheme = seam_scheme<TypeParam, score::static_window, budget::adaptive>;
    typename scheme::config cfg{.score = {.sinks = 2, .windows = {4, 4}}, .budget = {.keep = keep_tokens{10}}};
    auto cache = roomy_cache<scheme>(shape, batch, tokens);
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    const auto compress = [&] {
      scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, workspace{scratch.data(), scratch.size()});
    };
    expect_error(compress, "config.score.windows");  // two windows for three kv heads
    // Windows that protect more than Ada-KV's per-head budget: the paper form cannot keep them.
    cfg.score.windows = {4, 20, 4};
    expect_error(compress, "config.budget.keep");
    EXPECT_EQ(tokens_held(cache.view()), 0);
  }
  {
    using scheme = seam_scheme<TypeParam, score::retrieval_head, budget::by_scorer>;
    typename scheme::config cfg;
    cfg.score.retrieval = {true, false};  // two flags for three kv heads
    auto cache = roomy_cache<scheme>(shape, batch, tokens);
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    expect_error([&] { scheme::compress(keys.cview(), values.cview(), cache.view(), cfg,
                                        workspace{scratch.data(), scratch.size()}); },
                 "config.score.retrieval");
  }
}

/// compress replaces the cache: a head compressed with a compensation token, then
/// compressed again as a retrieval head, must lose its logit bias (a stale ln N_d
/// would silently reweigh a real token).
TYPED_TEST(RaggedSeams, CompressAgainForgetsCompensationTokens) {
  using scheme = seam_scheme<TypeParam, score::retrieval_head, budget::by_scorer>;
  const model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
  const std::int64_t batch = 2, tokens = 40;
  const auto keys = random_tensor<float, 4>({batch, 2, tokens, 8}, 31);
  const auto values = random_tensor<float, 4>({batch, 2, tokens, 8}, 32);
  typename scheme::config cfg;
  cfg.score.retrieval = {false, false};
  cfg.score.min_recent = 10;
  auto cache = roomy_cache<scheme>(shape, batch, tokens);
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  const auto compress = [&] {
    scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, workspace{scratch.data(), scratch.size()});
  };
  compress();
  EXPECT_EQ(cache.view().logit_bias(1, 1, 4), static_cast<float>(std::log(26.0)));  // N_d = 40 − 4 − 10
  cfg.score.retrieval = {true, true};
  compress();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < 2; ++h) {
      EXPECT_EQ(cache.view().head_length(b, h), tokens);
      for (std::int64_t i = 0; i < tokens; ++i) EXPECT_EQ(cache.view().logit_bias(b, h, i), 0.0f);
    }
  const auto queries = random_tensor<float, 3>({batch, 4, 8}, 33);
  auto out = make_tensor<float, 3>({batch, 4, 8});
  scheme::attend(queries.cview(), cache.view(), out.view, workspace{});
  const auto want = oracle_attention(queries.cview(), keys.cview(), values.cview(), 2, [&](std::int64_t, std::int64_t) {
    kept_tokens set;
    for (std::int64_t t = 0; t < tokens; ++t) set.tokens.push_back(t);
    return set;
  });
  EXPECT_LE(max_abs_error(out.view, want), attention_tolerance);
}

}  // namespace

namespace {

/// A compress that does not fit fails before touching the cache: what the previous
/// compress stored is still there and still attends the same (engines may retry with
/// a smaller budget without losing the layer).
TYPED_TEST(RaggedSeams, FailedCompressKeepsThePreviousCache) {
  using scheme = seam_scheme<TypeParam, score::static_window, budget::per_head>;
  const model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
  const std::int64_t batch = 2, tokens = 40;
  const auto keys = random_tensor<float, 4>({batch, 2, tokens, 8}, 51);
  const auto values = random_tensor<float, 4>({batch, 2, tokens, 8}, 52);
  typename scheme::config cfg{.budget = {.lengths = {4, 8}, .kv_heads = 2, .layer = 0}};
  typename TypeParam::pool_size pool{};  // room for 2·(4 + 8) = 24 tokens and a little more
  if constexpr (std::is_same_v<TypeParam, layout::paged>)
    pool = {8, 4};  // 2·(1 + 2) = 6 pages of 4 needed
  else
    pool = {30};
  auto cache = scheme::make_cache(shape, batch, pool, codec::fp32::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, workspace{scratch.data(), scratch.size()});
  const auto queries = random_tensor<float, 3>({batch, 4, 8}, 53);
  auto before = make_tensor<float, 3>({batch, 4, 8});
  scheme::attend(queries.cview(), cache.view(), before.view, workspace{});

  cfg.budget.lengths = {10, 20};  // paged: 2·(3 + 5) = 16 pages > 8; flat: 60 slots > 30
  std::vector<std::byte> bigger(scheme::compress_workspace(shape, batch, tokens, cfg));
  EXPECT_THROW(scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, workspace{bigger.data(), bigger.size()}),
               kvtrim::error);
  EXPECT_EQ(cache.view().head_length(1, 0), 4);
  EXPECT_EQ(cache.view().head_length(1, 1), 8);
  auto after = make_tensor<float, 3>({batch, 4, 8});
  scheme::attend(queries.cview(), cache.view(), after.view, workspace{});
  EXPECT_EQ(after.storage, before.storage);
}

}  // namespace
