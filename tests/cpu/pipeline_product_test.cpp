// Every layout × scorer × budget a scheme accepts (tests/common/policy_cases.hpp:
// contiguous, paged, flat × snapkv, h2o, key_norm, static_window with and without
// per-head windows, retrieval_head × uniform, pyramid, adaptive, per_head,
// by_scorer), through compress → attend, against brute force: the kept sets come
// from the oracle's double-precision scores and each budget's brute-force rule
// (policy_oracle.hpp), RazorAttention's from its definition; the oracle attends
// over them in double (oracle.hpp). Then append after compress on each layout, the
// ragged layouts against contiguous for uniform budgets, and properties read back
// from the cache (totals, Ada-KV floors, protected tokens, retrieval heads whole).
//
// Tolerances: fp32 inputs stored with codec::fp32, so the cache holds every kept
// row bit for bit (checked exactly, the compensation token included: the same
// double sum rounded once). Attention: fp32 logits, softmax and accumulation over
// ≤ 52 tokens of |v| ≲ 4 give ≲ (T + D)·2^-24·max|v| ≈ 1.3e-5; 5e-5 leaves margin.
// Ragged vs contiguous: the same tokens in the same order through the same code,
// so equal bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/oracle.hpp"
#include "common/policy_cases.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

constexpr std::int64_t batch = product_batch;
constexpr std::int64_t tokens = product_tokens;
constexpr double attention_tolerance = 5e-5;

template <class Layout, class ScorerCase, class BudgetCase>
using fp32_scheme = kvtrim::scheme<Layout, typename ScorerCase::scorer, typename BudgetCase::budget, codec::fp32,
                                   backend::cpu>;

/// Compresses the prefill into `cache` with a workspace of exactly compress_workspace bytes
/// (so the sanitizer build catches any write past what the scheme asked for).
template <class Scheme>
void compress_into(const prefill_inputs& in, typename Scheme::cache_view& cache, const typename Scheme::config& cfg) {
  std::vector<std::byte> scratch(Scheme::compress_workspace(cache.shape, cache.batch, in.keys.view.extent(2), cfg));
  Scheme::compress(in.keys.cview(), in.values.cview(), in.queries.cview(), cache, cfg,
                   workspace{scratch.data(), scratch.size()});
}

/// Which token of want.keys/values each stored row of head (b, h) is, by exact match of
/// key and value rows (fp32 storage keeps them bit for bit; N(0,1) rows are distinct); −1: none.
template <class View>
std::vector<std::int64_t> stored_tokens(const View& cache, const expected_cache& want, std::int64_t b, std::int64_t h) {
  const std::int64_t candidates = want.keys.view.extent(2);
  std::vector<std::vector<float>> keys, values;
  for (std::int64_t t = 0; t < candidates; ++t) {
    keys.push_back(input_row(want.keys.cview(), b, h, t));
    values.push_back(input_row(want.values.cview(), b, h, t));
  }
  std::vector<std::int64_t> found;
  for (std::int64_t i = 0; i < cache.head_length(b, h); ++i) {
    const auto key = stored_key(cache, b, h, i);
    const auto value = stored_value(cache, b, h, i);
    std::int64_t match = -1;
    for (std::int64_t t = 0; t < candidates && match < 0; ++t)
      if (keys[static_cast<std::size_t>(t)] == key && values[static_cast<std::size_t>(t)] == value) match = t;
    found.push_back(match);
  }
  return found;
}

/// The cache holds exactly want's tokens, in order, with want's logit biases.
template <class View>
void expect_holds(const View& cache, const expected_cache& want) {
  for (std::int64_t b = 0; b < cache.batch; ++b)
    for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) {
      SCOPED_TRACE(detail::cat("sequence ", b, ", kv head ", h));
      const kept_tokens& set = want.head(b, h, cache.shape.kv_heads);
      EXPECT_EQ(stored_tokens(cache, want, b, h), set.tokens);
      if constexpr (requires { cache.logit_bias(b, h, 0); }) {
        for (std::size_t i = 0; i < set.tokens.size(); ++i)
          EXPECT_EQ(cache.logit_bias(b, h, static_cast<std::int64_t>(i)),
                    set.bias.empty() ? 0.0f : static_cast<float>(set.bias[i]))
              << "index " << i;
      }
    }
}

/// Decode attention over the cache equals the double oracle over want's tokens.
template <class Scheme>
void expect_attends(const typename Scheme::cache_view& cache, const expected_cache& want, std::uint64_t seed) {
  const model_shape& shape = cache.shape;
  const auto queries = random_tensor<float, 3>({cache.batch, shape.q_heads, shape.head_dim}, seed, 1.0f, {0, 1, 1});
  auto out = make_tensor<float, 3>({cache.batch, shape.q_heads, shape.head_dim});
  std::vector<std::byte> scratch(Scheme::attend_workspace(cache));
  Scheme::attend(queries.cview(), cache, out.view, workspace{scratch.data(), scratch.size()});
  const auto oracle = oracle_attention(queries.cview(), want.keys.cview(), want.values.cview(), shape.kv_heads,
                                       [&](std::int64_t b, std::int64_t h) { return want.head(b, h, shape.kv_heads); });
  EXPECT_LE(max_abs_error(out.view, oracle), attention_tolerance);
}

/// What the papers promise, read back from the cache (independently of want's sets):
/// each sequence keeps exactly the budget's total; Ada-KV heads keep at least their
/// floor; tokens the scorer protects (+∞: sinks, windows) are never dropped while the
/// head keeps as many as it protects; retrieval heads keep every token.
template <class ScorerCase, class BudgetCase, class View, class Config>
void expect_properties(const View& cache, const expected_cache& want, const Config& cfg) {
  const table_shape s{cache.batch, cache.shape.kv_heads, tokens};
  constexpr bool compensates = detail::scorer_compensates<typename ScorerCase::scorer>;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    std::int64_t total = 0;
    for (std::int64_t h = 0; h < s.heads; ++h) {
      SCOPED_TRACE(detail::cat("sequence ", b, ", kv head ", h));
      const auto found = stored_tokens(cache, want, b, h);
      const auto length = static_cast<std::int64_t>(found.size());
      total += length;
      const std::int64_t protected_tokens = protected_count(want.scores, s, b, h);
      std::int64_t placeholder = -1;  // the protected token that became the compensation token
      if constexpr (compensates) {
        if (length < s.tokens) placeholder = cfg.score.sinks;
      }
      if (protected_tokens <= length)
        for (std::int64_t j = 0; j < s.tokens; ++j) {
          if (want.scores[s.at(b, h, j)] != infinity || j == placeholder) continue;
          EXPECT_NE(std::find(found.begin(), found.end(), j), found.end()) << "protected token " << j << " dropped";
        }
      if constexpr (std::is_same_v<typename BudgetCase::budget, budget::adaptive>) {
        const std::int64_t k = detail::resolve_keep(cfg.budget.keep, s.tokens);
        EXPECT_GE(length, adaptive_floor(k, cfg.budget.alpha, cfg.budget.kvpress_compatible, protected_tokens));
      }
      if constexpr (compensates) {
        if (cfg.score.retrieval[static_cast<std::size_t>(h)]) {
          EXPECT_EQ(length, s.tokens) << "a retrieval head";
        }
      }
    }
    if constexpr (requires { BudgetCase::total(cfg.budget, s); }) {
      EXPECT_EQ(total, BudgetCase::total(cfg.budget, s)) << "sequence " << b;
    }
  }
}

// ---- layout × scorer × budget: compress → attend -------------------------------------

using product_list = triples<all_layouts, pairs<all_scorers, all_budgets>::type>::type;
/// contiguous: 7 scorers × {uniform, pyramid} = 14; paged and flat: 7 scorers × 5 budgets
/// + retrieval_head × by_scorer = 36 each. 86 in all, each over 3 shapes.
static_assert(list_size<product_list>::value == 86);

template <class Triple>
class LayoutScorerBudget : public ::testing::Test {};
TYPED_TEST_SUITE(LayoutScorerBudget, as_gtest_types<product_list>::type, case_names);

TYPED_TEST(LayoutScorerBudget, CompressThenAttendMatchesTheBruteForceOracle) {
  using layout_type = std::tuple_element_t<0, TypeParam>;
  using scorer_case = std::tuple_element_t<1, TypeParam>;
  using budget_case = std::tuple_element_t<2, TypeParam>;
  using scheme = fp32_scheme<layout_type, scorer_case, budget_case>;
  for (const model_shape& shape : product_shapes) {
    SCOPED_TRACE(detail::cat("q_heads=", shape.q_heads, " kv_heads=", shape.kv_heads, " head_dim=", shape.head_dim));
    const prefill_inputs in =
        make_prefill<scorer_case>(shape, batch, tokens, 200 + static_cast<std::uint64_t>(shape.q_heads));
    typename scheme::config cfg{.score = scorer_case::config(shape), .budget = budget_case::config(shape)};
    const expected_cache want = expected_contents<scorer_case, budget_case>(
        cfg.score, cfg.budget, shape, in.keys.cview(), in.values.cview(), in.queries.cview());

    auto cache = roomy_cache<scheme>(shape, batch, tokens);
    compress_into<scheme>(in, cache.view(), cfg);
    expect_holds(cache.view(), want);
    expect_properties<scorer_case, budget_case>(cache.view(), want, cfg);
    expect_attends<scheme>(cache.view(), want, 7);
  }
}

// ---- append after compress --------------------------------------------------------

/// A cache with exactly the room `want` needs after `appended` more tokens per head
/// (contiguous: the longest head; paged: pages of 7; flat: slots), plus `spare_pages`
/// pages or `spare_slots` slots.
template <class Scheme>
typename Scheme::cache tight_cache(const model_shape& shape, const expected_cache& want, std::int64_t appended,
                                   std::int64_t spare_pages, std::int64_t spare_slots) {
  using layout_type = typename Scheme::layout;
  std::int64_t longest = 0, pages = spare_pages, slots = spare_slots;
  for (const kept_tokens& set : want.heads) {
    const auto length = static_cast<std::int64_t>(set.tokens.size()) + appended;
    longest = std::max(longest, length);
    pages += layout::paged::pages_for(length, 7);
    slots += length;
  }
  if constexpr (std::is_same_v<layout_type, layout::paged>)
    return Scheme::make_cache(shape, batch, layout::paged::pool_size{pages, 7}, codec::fp32::config{});
  else if constexpr (std::is_same_v<layout_type, layout::flat>)
    return Scheme::make_cache(shape, batch, layout::flat::pool_size{slots}, codec::fp32::config{});
  else
    return Scheme::make_cache(shape, batch, longest, codec::fp32::config{});
}

/// Tokens [first, first + count) of `source` as a [B, H, count, D] view.
tensor_view<const float, 4> token_slice(const host_tensor<float, 4>& source, std::int64_t first, std::int64_t count) {
  return {&source.view(0, 0, first, 0), {source.view.extent(0), source.view.extent(1), count, source.view.extent(3)},
          source.view.strides};
}

template <class Triple>
class AppendAfterCompress : public ::testing::Test {};
using append_triples = ::testing::Types<std::tuple<layout::contiguous, snapkv_case, pyramid_case>,
                                        std::tuple<layout::contiguous, key_norm_case, uniform_case>,
                                        std::tuple<layout::paged, h2o_case, adaptive_case>,
                                        std::tuple<layout::paged, retrieval_head_case, by_scorer_case>,
                                        std::tuple<layout::paged, static_window_windows_case, per_head_case>,
                                        std::tuple<layout::flat, snapkv_max_case, adaptive_kvpress_case>,
                                        std::tuple<layout::flat, key_norm_case, per_head_case>,
                                        std::tuple<layout::flat, retrieval_head_case, by_scorer_case>>;
TYPED_TEST_SUITE(AppendAfterCompress, append_triples, case_names);

/// Compress, append 10 tokens to every head in chunks of 1, 2 and 7 (crossing pages),
/// then (ragged layouts) 2 tokens to the last head alone — a flat buffer whose last
/// region is full must repack — then one token at a time until the layout reports it
/// is full (a kvtrim::error, with the cache left as it was). After each phase the
/// cache holds the kept tokens then the appended ones, in order, and attends like the oracle.
TYPED_TEST(AppendAfterCompress, KeepsTokenOrderUntilTheLayoutIsFull) {
  using layout_type = std::tuple_element_t<0, TypeParam>;
  using scorer_case = std::tuple_element_t<1, TypeParam>;
  using budget_case = std::tuple_element_t<2, TypeParam>;
  using scheme = fp32_scheme<layout_type, scorer_case, budget_case>;
  constexpr std::int64_t appended = 10, to_last_head = 2;
  for (const model_shape& shape : product_shapes) {
    SCOPED_TRACE(detail::cat("q_heads=", shape.q_heads, " kv_heads=", shape.kv_heads));
    const prefill_inputs in =
        make_prefill<scorer_case>(shape, batch, tokens, 300 + static_cast<std::uint64_t>(shape.q_heads));
    typename scheme::config cfg{.score = scorer_case::config(shape), .budget = budget_case::config(shape)};
    expected_cache want = expected_contents<scorer_case, budget_case>(cfg.score, cfg.budget, shape, in.keys.cview(),
                                                                      in.values.cview(), in.queries.cview());
    auto cache = tight_cache<scheme>(shape, want, appended, 1, to_last_head);
    compress_into<scheme>(in, cache.view(), cfg);

    const auto new_keys = random_tensor<float, 4>({batch, shape.kv_heads, appended + 8, shape.head_dim}, 31);
    const auto new_values = random_tensor<float, 4>({batch, shape.kv_heads, appended + 8, shape.head_dim}, 32);
    std::int64_t done = 0;
    for (std::int64_t chunk : {1, 2, 7}) {
      scheme::append(cache.view(), token_slice(new_keys, done, chunk), token_slice(new_values, done, chunk));
      want.append(token_slice(new_keys, done, chunk), token_slice(new_values, done, chunk));
      done += chunk;
    }
    expect_holds(cache.view(), want);
    expect_attends<scheme>(cache.view(), want, 8);

    if constexpr (layout_type::ragged_heads) {
      const std::int64_t b = batch - 1, h = shape.kv_heads - 1;
      const auto rows = random_tensor<float, 4>({batch, shape.kv_heads, to_last_head, shape.head_dim}, 33);
      const auto row_values = random_tensor<float, 4>({batch, shape.kv_heads, to_last_head, shape.head_dim}, 34);
      const auto head_rows = [&](const host_tensor<float, 4>& source) {
        return tensor_view<const float, 2>{&source.view(b, h, 0, 0), {to_last_head, shape.head_dim},
                                           {source.view.strides[2], source.view.strides[3]}};
      };
      scheme::append_head(cache.view(), b, h, head_rows(rows), head_rows(row_values));
      want.append(rows.cview(), row_values.cview(), b * shape.kv_heads + h);
      if constexpr (std::is_same_v<layout_type, layout::flat>) {
        EXPECT_GE(*cache.view().repacks, 1) << "the last head's region was full";
      }
      expect_holds(cache.view(), want);
    }

    bool full = false;
    for (std::int64_t step = 0; step < 8 && !full; ++step) {
      try {
        scheme::append(cache.view(), token_slice(new_keys, done, 1), token_slice(new_values, done, 1));
        want.append(token_slice(new_keys, done, 1), token_slice(new_values, done, 1));
        ++done;
      } catch (const kvtrim::error&) {
        full = true;
      }
    }
    EXPECT_TRUE(full) << "a pool sized to the byte must run out within a page of appends";
    expect_holds(cache.view(), want);
    expect_attends<scheme>(cache.view(), want, 9);
  }
}

// ---- paged and flat equal contiguous for budgets that treat heads alike ------------

template <class Scheme>
std::vector<std::vector<float>> attend_while_appending(const prefill_inputs& in, const model_shape& shape,
                                                       const typename Scheme::config& cfg, std::int64_t steps) {
  auto cache = roomy_cache<Scheme>(shape, batch, tokens + steps);
  compress_into<Scheme>(in, cache.view(), cfg);
  const auto queries = random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, 41);
  const auto new_keys = random_tensor<float, 4>({batch, shape.kv_heads, steps, shape.head_dim}, 42);
  const auto new_values = random_tensor<float, 4>({batch, shape.kv_heads, steps, shape.head_dim}, 43);
  std::vector<std::vector<float>> outputs;
  for (std::int64_t step = 0;; ++step) {
    auto out = make_tensor<float, 3>({batch, shape.q_heads, shape.head_dim});
    Scheme::attend(queries.cview(), cache.view(), out.view, workspace{});
    outputs.push_back(out.storage);
    if (step == steps) return outputs;
    Scheme::append(cache.view(), token_slice(new_keys, step, 1), token_slice(new_values, step, 1));
  }
}

template <class Pair>
class RaggedLayoutsMatchContiguous : public ::testing::Test {};
using uniform_pairs = as_gtest_types<pairs<all_scorers, type_list<uniform_case, pyramid_case>>::type>::type;
TYPED_TEST_SUITE(RaggedLayoutsMatchContiguous, uniform_pairs, case_names);

TYPED_TEST(RaggedLayoutsMatchContiguous, BitForBitAfterCompressAndAppends) {
  using scorer_case = std::tuple_element_t<0, TypeParam>;
  using budget_case = std::tuple_element_t<1, TypeParam>;
  for (const model_shape& shape : product_shapes) {
    SCOPED_TRACE(detail::cat("q_heads=", shape.q_heads, " kv_heads=", shape.kv_heads));
    const prefill_inputs in =
        make_prefill<scorer_case>(shape, batch, tokens, 400 + static_cast<std::uint64_t>(shape.q_heads));
    const scheme_config<typename scorer_case::scorer, typename budget_case::budget, codec::fp32> cfg{
        .score = scorer_case::config(shape), .budget = budget_case::config(shape)};
    const auto dense = attend_while_appending<fp32_scheme<layout::contiguous, scorer_case, budget_case>>(in, shape, cfg, 3);
    EXPECT_EQ((attend_while_appending<fp32_scheme<layout::paged, scorer_case, budget_case>>(in, shape, cfg, 3)), dense);
    EXPECT_EQ((attend_while_appending<fp32_scheme<layout::flat, scorer_case, budget_case>>(in, shape, cfg, 3)), dense);
  }
}

}  // namespace
