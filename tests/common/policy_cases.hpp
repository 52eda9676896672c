// tests/common/policy_cases.hpp — one "case" per scorer and per budget: the
// configuration a test uses and the brute-force oracle for it, plus type-list
// helpers so tests can run the product layout × scorer × budget (only the
// combinations a scheme accepts: ragged budgets and scorers need a ragged
// layout, score::retrieval_head goes with budget::by_scorer and nothing else).
// To cover a new layout, scorer or budget, add it to the lists at the bottom.
//
// A scorer case: `scorer`, `label`, `config(shape)`, `queries(T)` (how many prefill
// queries compress needs), `oracle(cfg, shape, keys, queries)` (scores from the
// paper's math, +∞ = protected). A scorer that sets the keep counts itself also
// has `kept(cfg, h, T, placeholder)` (its kept set by definition, in cache order,
// with logit biases; a compensation token is token T of the inputs extended by
// `extended_inputs`, or the placeholder S that the selection stage keeps). A budget case: `budget`, `label`, `config(shape)`,
// `oracle(cfg, scores, table)` (kept sets by brute force) and `total(cfg, table)`
// (tokens a sequence keeps over all its heads, exactly).
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/oracle.hpp"
#include "common/policy_oracle.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"

namespace kvtrim::testing {

// ---- scorers -------------------------------------------------------------------

struct snapkv_case {
  using scorer = score::snapkv;
  static constexpr const char* label = "snapkv";
  static scorer::config config(const model_shape&) { return {.window = 6, .kernel = 5, .pooling = score::pooling::avg}; }
  /// Hands over more queries than the window, so the scorer must read the last ones.
  static std::int64_t queries(std::int64_t /*tokens*/) { return 9; }
  template <class K, class Q>
  static score_table oracle(const scorer::config& cfg, const model_shape& shape, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>& queries) {
    return snapkv_scores(cfg, shape, keys, queries);
  }
};

struct snapkv_max_case : snapkv_case {
  static constexpr const char* label = "snapkv_maxpool_maxgroup_sum";
  static scorer::config config(const model_shape&) {
    return {.window = 5, .kernel = 7, .pooling = score::pooling::max, .reduction = score::window_reduction::sum,
            .group = score::group_reduction::max};
  }
};

struct h2o_case {
  using scorer = score::h2o;
  static constexpr const char* label = "h2o";
  static scorer::config config(const model_shape&) { return {.recent = keep_tokens{5}}; }
  static std::int64_t queries(std::int64_t tokens) { return tokens; }
  template <class K, class Q>
  static score_table oracle(const scorer::config& cfg, const model_shape& shape, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>& queries) {
    return h2o_scores(cfg, shape, keys, queries);
  }
};

struct observed_attention_case : h2o_case {
  static constexpr const char* label = "h2o_observed";
  static scorer::config config(const model_shape&) { return kvpress::observed_attention(); }
};

struct key_norm_case {
  using scorer = score::key_norm;
  static constexpr const char* label = "key_norm";
  static scorer::config config(const model_shape&) { return {}; }
  static std::int64_t queries(std::int64_t) { return 0; }
  template <class K, class Q>
  static score_table oracle(const scorer::config&, const model_shape&, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>&) {
    return key_norm_scores(keys);
  }
};

struct static_window_case {
  using scorer = score::static_window;
  static constexpr const char* label = "static_window";
  static scorer::config config(const model_shape&) { return {.sinks = 3}; }
  static std::int64_t queries(std::int64_t) { return 0; }
  template <class K, class Q>
  static score_table oracle(const scorer::config& cfg, const model_shape& shape, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>&) {
    return static_window_scores(cfg, {keys.extent(0), shape.kv_heads, keys.extent(2)});
  }
};

/// static_window with a recent window per kv head (RazorAttention/ALiBi style): 2 + 3·h tokens.
struct static_window_windows_case : static_window_case {
  static constexpr const char* label = "static_window_per_head_windows";
  static scorer::config config(const model_shape& shape) {
    scorer::config cfg{.sinks = 2};
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) cfg.windows.push_back(2 + 3 * h);
    return cfg;
  }
};

/// RazorAttention: odd kv heads are retrieval heads; the others keep 3 sinks, the
/// compensation token and W = max(12, ⌊0.2·40⌋) = 12 recent tokens of T = 40 (N_d = 25).
struct retrieval_head_case {
  using scorer = score::retrieval_head;
  static constexpr const char* label = "retrieval_head";
  static scorer::config config(const model_shape& shape) {
    scorer::config cfg;
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) cfg.retrieval.push_back(h % 2 == 1);
    cfg.sinks = 3;
    cfg.min_recent = 12;
    return cfg;
  }
  static std::int64_t queries(std::int64_t) { return 0; }
  /// Its scores: static_window's with S + 1 sinks (the placeholder at S is kept).
  template <class K, class Q>
  static score_table oracle(const scorer::config& cfg, const model_shape& shape, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>&) {
    return static_window_scores({.sinks = cfg.sinks + (cfg.compensation ? 1 : 0)},
                                {keys.extent(0), shape.kv_heads, keys.extent(2)});
  }
  /// What head (b, h) holds, in cache order; `placeholder` names the compensation token S
  /// (what the selection stage keeps) instead of T (the mean token of extended_inputs).
  static kept_tokens kept(const scorer::config& cfg, std::int64_t h, std::int64_t tokens, bool placeholder) {
    return retrieval_head_kept(cfg, tokens, h, placeholder);
  }
  /// The inputs with the compensation token appended (token T: the mean of the dropped).
  static host_tensor<float, 4> extended_inputs(const scorer::config& cfg, const tensor_view<const float, 4>& input) {
    const std::int64_t tokens = input.extent(2);
    return with_mean_token(input, cfg.sinks, std::max<std::int64_t>(1, scorer::dropped(cfg, tokens)));
  }
};

// ---- budgets -------------------------------------------------------------------

/// Budgets are sized for the tests' T = 40 tokens and protected sets ≤ 6 tokens.
struct uniform_case {
  using budget = budget::uniform;
  static constexpr const char* label = "uniform";
  static budget::config config(const model_shape&) { return {.keep = keep_tokens{17}}; }
  static kept_sets oracle(const budget::config& cfg, const score_table& scores, const table_shape& s) {
    return top_k_sets(scores, s, std::vector<std::int64_t>(static_cast<std::size_t>(s.batch * s.heads),
                                                            detail::resolve_keep(cfg.keep, s.tokens)));
  }
  static std::int64_t total(const budget::config&, const table_shape& s) { return s.heads * 17; }
};

struct pyramid_case {
  using budget = budget::pyramid;
  static constexpr const char* label = "pyramid";
  static budget::config config(const model_shape&) {
    return {.keep = keep_tokens{17}, .window = 6, .beta = 20, .layer = 1, .layers = 4};
  }
  static kept_sets oracle(const budget::config& cfg, const score_table& scores, const table_shape& s) {
    // The count's own oracle is the hand-derived schedule in budgets_test.cpp.
    return top_k_sets(scores, s, std::vector<std::int64_t>(static_cast<std::size_t>(s.batch * s.heads),
                                                            budget::pyramid::layer_keep(cfg, s.tokens)));
  }
  /// B = 17 − 6 = 11, M = 34, β = 20: max = 21.45, min = 0.55, so the four layers get
  /// 21.45, 14.48, 7.52, 0.55; the largest remainders (.55, .52) round them to 21, 14, 8, 1
  /// (Σ = 44 = 4·11), and layer 1 keeps 6 + 14 = 20 tokens per head.
  static std::int64_t total(const budget::config&, const table_shape& s) { return s.heads * 20; }
};

struct adaptive_case {
  using budget = budget::adaptive;
  static constexpr const char* label = "adaptive";
  static budget::config config(const model_shape&) { return {.keep = keep_tokens{14}, .alpha = 0.3}; }
  static kept_sets oracle(const budget::config& cfg, const score_table& scores, const table_shape& s) {
    return adaptive_sets(scores, s, detail::resolve_keep(cfg.keep, s.tokens), cfg.alpha, cfg.kvpress_compatible);
  }
  /// H·k, k = the per-head budget, whatever the heads' shares.
  static std::int64_t total(const budget::config& cfg, const table_shape& s) {
    return s.heads * detail::resolve_keep(cfg.keep, s.tokens);
  }
};

struct adaptive_kvpress_case : adaptive_case {
  static constexpr const char* label = "adaptive_kvpress";
  static budget::config config(const model_shape&) { return kvpress::adakv(0.65, 0.2); }
};

struct per_head_case {
  using budget = budget::per_head;
  static constexpr const char* label = "per_head";
  /// Two layers; this is layer 1: head h keeps 7 + 5·h tokens (capped at T).
  static budget::config config(const model_shape& shape) {
    budget::config cfg{.kv_heads = shape.kv_heads, .layer = 1};
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) cfg.lengths.push_back(30);
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) cfg.lengths.push_back(7 + 5 * h);
    return cfg;
  }
  static kept_sets oracle(const budget::config& cfg, const score_table& scores, const table_shape& s) {
    std::vector<std::int64_t> counts;
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.heads; ++h)
        counts.push_back(std::min(s.tokens, cfg.lengths[static_cast<std::size_t>(cfg.kv_heads + h)]));
    return top_k_sets(scores, s, counts);
  }
  static std::int64_t total(const budget::config&, const table_shape& s) {
    std::int64_t sum = 0;
    for (std::int64_t h = 0; h < s.heads; ++h) sum += std::min<std::int64_t>(s.tokens, 7 + 5 * h);
    return sum;
  }
};

/// The scorer decides (score::retrieval_head): its case gives the kept sets and totals.
struct by_scorer_case {
  using budget = budget::by_scorer;
  static constexpr const char* label = "by_scorer";
  static budget::config config(const model_shape&) { return {}; }
};

// ---- what a combination keeps, by brute force ----------------------------------

/// Per flattened head, the tokens the selection stage keeps for scorer × budget,
/// computed from the oracle's scores (or the scorer's own definition).
template <class ScorerCase, class BudgetCase>
kept_sets expected_sets(const typename ScorerCase::scorer::config& score_cfg,
                        const typename BudgetCase::budget::config& budget_cfg, const score_table& scores,
                        const table_shape& s) {
  if constexpr (detail::scorer_sets_keep_counts<typename ScorerCase::scorer>) {
    kept_sets kept;
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.heads; ++h) kept.push_back(ScorerCase::kept(score_cfg, h, s.tokens, true).tokens);
    return kept;
  } else {
    return BudgetCase::oracle(budget_cfg, scores, s);
  }
}

/// What a compressed cache must hold, by brute force: per flattened head the tokens
/// of `keys`/`values` in cache order with their logit biases. `keys`/`values` are
/// the prefill inputs, extended by any token compress makes up (a compensation token).
struct expected_cache {
  host_tensor<float, 4> keys, values;
  std::vector<kept_tokens> heads;
  score_table scores;  // the oracle's scores of the prefill tokens

  const kept_tokens& head(std::int64_t b, std::int64_t h, std::int64_t kv_heads) const {
    return heads[static_cast<std::size_t>(b * kv_heads + h)];
  }
  /// Appends the new tokens (rows of new_keys/new_values [B, H, n, D]) after the contents
  /// of every head, or of flattened head `only` alone.
  void append(const tensor_view<const float, 4>& new_keys, const tensor_view<const float, 4>& new_values,
              std::int64_t only = -1) {
    const std::int64_t first = keys.view.extent(2);
    keys = concat_tokens(keys.cview(), new_keys);
    values = concat_tokens(values.cview(), new_values);
    for (std::size_t head = 0; head < heads.size(); ++head) {
      if (only >= 0 && static_cast<std::int64_t>(head) != only) continue;
      kept_tokens& set = heads[head];
      for (std::int64_t t = 0; t < new_keys.extent(2); ++t) {
        set.tokens.push_back(first + t);
        if (!set.bias.empty()) set.bias.push_back(0.0);
      }
    }
  }
};

template <class ScorerCase, class BudgetCase>
expected_cache expected_contents(const typename ScorerCase::scorer::config& score_cfg,
                                 const typename BudgetCase::budget::config& budget_cfg, const model_shape& shape,
                                 const tensor_view<const float, 4>& keys, const tensor_view<const float, 4>& values,
                                 const tensor_view<const float, 4>& queries) {
  const table_shape s{keys.extent(0), shape.kv_heads, keys.extent(2)};
  expected_cache out;
  out.scores = ScorerCase::oracle(score_cfg, shape, keys, queries);
  if constexpr (detail::scorer_sets_keep_counts<typename ScorerCase::scorer>) {
    out.keys = ScorerCase::extended_inputs(score_cfg, keys);
    out.values = ScorerCase::extended_inputs(score_cfg, values);
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.heads; ++h) out.heads.push_back(ScorerCase::kept(score_cfg, h, s.tokens, false));
  } else {
    const auto none = make_tensor<float, 4>({s.batch, s.heads, 0, keys.extent(3)});
    out.keys = concat_tokens(keys, none.cview());  // a dense copy
    out.values = concat_tokens(values, none.cview());
    for (auto& set : expected_sets<ScorerCase, BudgetCase>(score_cfg, budget_cfg, out.scores, s))
      out.heads.push_back(kept_tokens{std::move(set), {}});
  }
  return out;
}

// ---- inputs --------------------------------------------------------------------

/// The product tests' problem: 2 sequences of 40 tokens, GQA 2, MHA (group 1) and
/// MQA (group 8), head_dim 16 or 8.
inline constexpr std::int64_t product_batch = 2;
inline constexpr std::int64_t product_tokens = 40;
inline const std::vector<model_shape> product_shapes = {{4, 2, 16}, {3, 3, 8}, {8, 1, 16}};

struct prefill_inputs {
  host_tensor<float, 4> keys, values, queries;
};

/// N(0, 1) keys, values and as many prefill queries as the scorer needs (at least one).
/// Keys and queries are padded (strided), so a scorer that assumes density reads NaN and fails.
template <class ScorerCase>
prefill_inputs make_prefill(const model_shape& shape, std::int64_t batch, std::int64_t tokens, std::uint64_t seed) {
  const std::int64_t observed = std::max<std::int64_t>(ScorerCase::queries(tokens), 1);
  return {random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed, 1.0f, {0, 1, 0, 3}),
          random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed + 1),
          random_tensor<float, 4>({batch, shape.q_heads, observed, shape.head_dim}, seed + 2, 1.0f, {1, 0, 2, 0})};
}

// ---- caches --------------------------------------------------------------------

/// An owning cache of `Scheme` with room for `tokens` tokens in every head: a
/// contiguous capacity, pages of 7 tokens (a size that divides nothing in the
/// tests), or as many flat slots.
template <class Scheme>
typename Scheme::cache roomy_cache(const model_shape& shape, std::int64_t batch, std::int64_t tokens) {
  using layout_type = typename Scheme::layout;
  const typename Scheme::codec::config codec_config{};
  const std::int64_t heads = batch * shape.kv_heads;
  if constexpr (std::is_same_v<layout_type, layout::paged>)
    return Scheme::make_cache(shape, batch, layout::paged::pool_size{heads * layout::paged::pages_for(tokens, 7), 7},
                              codec_config);
  else if constexpr (std::is_same_v<layout_type, layout::flat>)
    return Scheme::make_cache(shape, batch, layout::flat::pool_size{heads * tokens}, codec_config);
  else
    return Scheme::make_cache(shape, batch, tokens, codec_config);
}

// ---- type lists ----------------------------------------------------------------

template <class... Ts>
struct type_list {};

template <class List>
struct list_size;
template <class... Ts>
struct list_size<type_list<Ts...>> : std::integral_constant<std::size_t, sizeof...(Ts)> {};

template <class A, class B>
struct concat;
template <class... As, class... Bs>
struct concat<type_list<As...>, type_list<Bs...>> {
  using type = type_list<As..., Bs...>;
};

/// All (S, B) pairs a scheme accepts, as std::tuple<S, B>.
template <class Scorers, class Budgets>
struct pairs;
template <class... Ss, class Budgets>
struct pairs<type_list<Ss...>, Budgets> {
  template <class S, class L>
  struct with;
  /// score::retrieval_head pairs with budget::by_scorer only, and by_scorer with it only.
  template <class S, class B>
  static constexpr bool valid = detail::scorer_sets_keep_counts<typename S::scorer> ==
                                detail::budget_defers_to_scorer<typename B::budget>;
  template <class S, class List>
  struct keep_valid;
  template <class S>
  struct keep_valid<S, type_list<>> {
    using type = type_list<>;
  };
  template <class S, class B, class... Rest>
  struct keep_valid<S, type_list<B, Rest...>> {
    using tail = typename keep_valid<S, type_list<Rest...>>::type;
    using type = std::conditional_t<valid<S, B>, typename concat<type_list<std::tuple<S, B>>, tail>::type, tail>;
  };
  template <class S, class... Bs>
  struct with<S, type_list<Bs...>> {
    using type = typename keep_valid<S, type_list<Bs...>>::type;
  };
  template <class... Lists>
  struct join {
    using type = type_list<>;
  };
  template <class First, class... Rest>
  struct join<First, Rest...> {
    using type = typename concat<First, typename join<Rest...>::type>::type;
  };
  using type = typename join<typename with<Ss, Budgets>::type...>::type;
};

/// (Layout, S, B) triples whose layout can hold the budget's and the scorer's head lengths.
template <class Layouts, class Pairs>
struct triples;
template <class... Ls, class Pairs>
struct triples<type_list<Ls...>, Pairs> {
  template <class L, class P>
  struct filter;
  template <class L>
  struct filter<L, type_list<>> {
    using type = type_list<>;
  };
  template <class L, class S, class B, class... Rest>
  struct filter<L, type_list<std::tuple<S, B>, Rest...>> {
    using tail = typename filter<L, type_list<Rest...>>::type;
    static constexpr bool fits = L::ragged_heads || (!B::budget::ragged_heads && !S::scorer::ragged_heads);
    using type = std::conditional_t<fits,
                                    typename concat<type_list<std::tuple<L, S, B>>, tail>::type, tail>;
  };
  template <class... Lists>
  struct join {
    using type = type_list<>;
  };
  template <class First, class... Rest>
  struct join<First, Rest...> {
    using type = typename concat<First, typename join<Rest...>::type>::type;
  };
  using type = typename join<typename filter<Ls, Pairs>::type...>::type;
};

/// "paged" for layout::paged: a name GoogleTest accepts in a test name.
template <class L>
std::string layout_label() {
  const std::string_view name = L::name;
  return std::string(name.substr(name.rfind(':') + 1));
}

/// GoogleTest names for std::tuple<Layout, ScorerCase, BudgetCase> and std::tuple<ScorerCase, BudgetCase>.
struct case_names {
  template <class T>
  static std::string GetName(int) {
    if constexpr (std::tuple_size_v<T> == 3)
      return layout_label<std::tuple_element_t<0, T>>() + "_" + std::tuple_element_t<1, T>::label + "_" +
             std::tuple_element_t<2, T>::label;
    else
      return std::string(std::tuple_element_t<0, T>::label) + "_" + std::tuple_element_t<1, T>::label;
  }
};

template <class List>
struct as_gtest_types;
template <class... Ts>
struct as_gtest_types<type_list<Ts...>> {
  using type = ::testing::Types<Ts...>;
};

// The lists every product test runs.
using all_scorers = type_list<snapkv_case, snapkv_max_case, h2o_case, observed_attention_case, key_norm_case,
                              static_window_case, static_window_windows_case, retrieval_head_case>;
using all_budgets =
    type_list<uniform_case, pyramid_case, adaptive_case, adaptive_kvpress_case, per_head_case, by_scorer_case>;
using all_layouts = type_list<layout::contiguous, layout::paged, layout::flat>;

}  // namespace kvtrim::testing
