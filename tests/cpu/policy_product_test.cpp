// Every scorer × budget through the selection stage, and every layout × scorer ×
// budget (the layout able to hold it) through compress → attend, against
// brute-force double-precision oracles written from the papers' formulas.
//
// Tolerances (fp32 reference vs double oracle, T = 40, D ≤ 16, N(0,1) inputs):
//  - scores: 2e-5 of the largest finite score. Logits carry ≤ D·u·Σ|q_d k_d|/√D ≈ 1e-5
//    (u = 2^-24) in the worst case; softmax, the window sum (≤ 40 terms) and pooling
//    add ≈ (T + k)·u relative; the sets are also checked against the exact oracle
//    order within this tolerance, so a near-tie may flip but nothing else.
//  - attention outputs: 5e-5 absolute: fp32 softmax and accumulation over ≤ 40 kept
//    tokens of |v| ≤ ~4 give ≤ (T + D)·u·max|v| ≈ 1.3e-5, with margin.
#include <gtest/gtest.h>

#include <algorithm>
#include <tuple>

#include "common/oracle.hpp"
#include "common/policy_cases.hpp"
#include "common/tensors.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

constexpr std::int64_t batch = 2;
constexpr std::int64_t tokens = 40;
constexpr double score_tolerance = 2e-5;
constexpr double attention_tolerance = 5e-5;

/// GQA 2, MHA (group 1), MQA (group 8); head_dim 16 or 8.
const std::vector<model_shape> shapes = {{4, 2, 16}, {3, 3, 8}, {8, 1, 16}};

struct inputs {
  host_tensor<float, 4> keys, values, queries;
};

template <class ScorerCase>
inputs make_inputs(const model_shape& shape, std::uint64_t seed) {
  const std::int64_t observed = std::max<std::int64_t>(ScorerCase::queries(tokens), 1);
  // Padded (strided) tensors: a scorer that assumes density reads NaN and fails.
  return {random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed, 1.0f, {0, 1, 0, 3}),
          random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed + 1),
          random_tensor<float, 4>({batch, shape.q_heads, observed, shape.head_dim}, seed + 2, 1.0f, {1, 0, 2, 0})};
}

// ---- scorer × budget through the selection stage ----------------------------------

template <class Pair>
class ScorerBudgetSelection : public ::testing::Test {};
using selection_pairs = as_gtest_types<pairs<all_scorers, all_budgets>::type>::type;
TYPED_TEST_SUITE(ScorerBudgetSelection, selection_pairs);

TYPED_TEST(ScorerBudgetSelection, KeepsTheOracleSet) {
  using scorer_case = std::tuple_element_t<0, TypeParam>;
  using budget_case = std::tuple_element_t<1, TypeParam>;
  SCOPED_TRACE(std::string(scorer_case::label) + " x " + budget_case::label);
  for (const model_shape& shape : shapes) {
    SCOPED_TRACE(detail::cat("shape q_heads=", shape.q_heads, " kv_heads=", shape.kv_heads));
    const inputs in = make_inputs<scorer_case>(shape, 100 + static_cast<std::uint64_t>(shape.q_heads));
    const auto score_cfg = scorer_case::config();
    const auto budget_cfg = budget_case::config(shape);
    const auto result = run_selection<typename scorer_case::scorer, typename budget_case::budget>(
        score_cfg, budget_cfg, shape, in.keys.cview(), in.values.cview(), in.queries.cview());
    const table_shape s{batch, shape.kv_heads, tokens};
    const score_table oracle = scorer_case::oracle(score_cfg, shape, in.keys.cview(), in.queries.cview());

    // The scorer's math.
    const double error = score_error(result.scores, oracle);
    EXPECT_LE(error, score_tolerance);
    ::testing::Test::RecordProperty("max_relative_score_error", detail::cat(error));
    // The budget and the selection, exactly, on kvtrim's own scores.
    EXPECT_EQ(result.kept, budget_case::oracle(budget_cfg, result.scores, s));
    // The same sets are a top set under the exact scores, up to float near-ties.
    EXPECT_TRUE(near_top_k(result.kept, oracle, s, score_tolerance));
    // Protected tokens (window, sinks, recent) are never dropped while the head keeps
    // at least as many tokens as it protects.
    std::int64_t total = 0;
    for (std::int64_t head = 0; head < batch * shape.kv_heads; ++head) {
      const auto& kept = result.kept[static_cast<std::size_t>(head)];
      total += static_cast<std::int64_t>(kept.size());
      const std::int64_t b = head / shape.kv_heads, h = head % shape.kv_heads;
      if (protected_count(oracle, s, b, h) > static_cast<std::int64_t>(kept.size())) continue;
      for (std::int64_t j = 0; j < tokens; ++j) {
        if (oracle[s.at(b, h, j)] == infinity) {
          EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), j)) << j;
        }
      }
    }
    // Layer totals are exact: uniform-per-layer budgets keep H·k, adaptive H·k too.
    if constexpr (std::is_same_v<typename budget_case::budget, budget::adaptive>) {
      EXPECT_EQ(total, batch * shape.kv_heads * detail::resolve_keep(budget_cfg.keep, tokens));
    }
  }
}

// ---- layout × scorer × budget through compress → attend ----------------------------

template <class Triple>
class LayoutScorerBudgetPipeline : public ::testing::Test {};
using pipeline_triples = as_gtest_types<triples<all_layouts, pairs<all_scorers, all_budgets>::type>::type>::type;
TYPED_TEST_SUITE(LayoutScorerBudgetPipeline, pipeline_triples);

TYPED_TEST(LayoutScorerBudgetPipeline, AttendsLikeTheOracleOverTheKeptSet) {
  using layout_type = std::tuple_element_t<0, TypeParam>;
  using scorer_case = std::tuple_element_t<1, TypeParam>;
  using budget_case = std::tuple_element_t<2, TypeParam>;
  using scheme = kvtrim::scheme<layout_type, typename scorer_case::scorer, typename budget_case::budget, codec::fp32,
                                backend::cpu>;
  SCOPED_TRACE(std::string(layout_type::name) + " x " + scorer_case::label + " x " + budget_case::label);
  for (const model_shape& shape : shapes) {
    const inputs in = make_inputs<scorer_case>(shape, 200 + static_cast<std::uint64_t>(shape.q_heads));
    typename scheme::config cfg{.score = scorer_case::config(), .budget = budget_case::config(shape)};
    const auto selected = run_selection<typename scorer_case::scorer, typename budget_case::budget>(
        cfg.score, cfg.budget, shape, in.keys.cview(), in.values.cview(), in.queries.cview());

    auto cache = scheme::make_cache(shape, batch, tokens, codec::fp32::config{});
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    scheme::compress(in.keys.view, in.values.view, in.queries.view, cache.view(), cfg,
                     workspace{scratch.data(), scratch.size()});

    const auto queries = random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, 7);
    auto out = make_tensor<float, 3>({batch, shape.q_heads, shape.head_dim});
    std::vector<std::byte> attend_scratch(scheme::attend_workspace(cache.view()) + 1);
    scheme::attend(queries.view, cache.view(), out.view, workspace{attend_scratch.data(), attend_scratch.size()});

    const auto want = oracle_attention(queries.cview(), in.keys.cview(), in.values.cview(), shape.kv_heads,
                                       [&](std::int64_t b, std::int64_t h) {
                                         return kept_tokens{selected.kept[static_cast<std::size_t>(b * shape.kv_heads + h)], {}};
                                       });
    EXPECT_LE(max_abs_error(out.view, want), attention_tolerance);
  }
}

}  // namespace
