// Every scorer × budget a scheme accepts, through the selection stage, against
// brute-force double-precision oracles written from the papers' formulas. (The
// layouts join in pipeline_product_test.cpp: compress → append → attend.)
//
// Tolerances (fp32 reference vs double oracle, T = 40, D ≤ 16, N(0,1) inputs):
//  - scores: 2e-5 of the largest finite score. Logits carry ≤ D·u·Σ|q_d k_d|/√D ≈ 1e-5
//    (u = 2^-24) in the worst case; softmax, the window sum (≤ 40 terms) and pooling
//    add ≈ (T + k)·u relative; the sets are also checked against the exact oracle
//    order within this tolerance, so a near-tie may flip but nothing else.
#include <gtest/gtest.h>

#include <algorithm>
#include <tuple>

#include "common/policy_cases.hpp"
#include "common/tensors.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

constexpr std::int64_t batch = product_batch;
constexpr std::int64_t tokens = product_tokens;
constexpr double score_tolerance = 2e-5;

// ---- scorer × budget through the selection stage ----------------------------------

template <class Pair>
class ScorerBudgetSelection : public ::testing::Test {};
using selection_pairs = as_gtest_types<pairs<all_scorers, all_budgets>::type>::type;
TYPED_TEST_SUITE(ScorerBudgetSelection, selection_pairs, case_names);

TYPED_TEST(ScorerBudgetSelection, KeepsTheOracleSet) {
  using scorer_case = std::tuple_element_t<0, TypeParam>;
  using budget_case = std::tuple_element_t<1, TypeParam>;
  SCOPED_TRACE(std::string(scorer_case::label) + " x " + budget_case::label);
  for (const model_shape& shape : product_shapes) {
    SCOPED_TRACE(detail::cat("shape q_heads=", shape.q_heads, " kv_heads=", shape.kv_heads));
    const prefill_inputs in = make_prefill<scorer_case>(shape, batch, tokens, 100 + static_cast<std::uint64_t>(shape.q_heads));
    const auto score_cfg = scorer_case::config(shape);
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
    EXPECT_EQ(result.kept, (expected_sets<scorer_case, budget_case>(score_cfg, budget_cfg, result.scores, s)));
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
    // Layer totals are exact (hand-derived in each budget case).
    if constexpr (requires { budget_case::total(budget_cfg, s); }) {
      EXPECT_EQ(total, batch * budget_case::total(budget_cfg, s));
    }
  }
}

}  // namespace
