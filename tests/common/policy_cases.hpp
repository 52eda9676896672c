// tests/common/policy_cases.hpp — one "case" per scorer and per budget: the
// configuration a test uses and the brute-force oracle for it, plus type-list
// helpers so tests can run the product layout × scorer × budget. To cover a new
// layout, scorer or budget, add it to the lists at the bottom.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/policy_oracle.hpp"

namespace kvtrim::testing {

// ---- scorers -------------------------------------------------------------------

struct snapkv_case {
  using scorer = score::snapkv;
  static constexpr const char* label = "snapkv";
  static scorer::config config() { return {.window = 6, .kernel = 5, .pooling = score::pooling::avg}; }
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
  static scorer::config config() {
    return {.window = 5, .kernel = 7, .pooling = score::pooling::max, .reduction = score::window_reduction::sum,
            .group = score::group_reduction::max};
  }
};

struct h2o_case {
  using scorer = score::h2o;
  static constexpr const char* label = "h2o";
  static scorer::config config() { return {.recent = keep_tokens{5}}; }
  static std::int64_t queries(std::int64_t tokens) { return tokens; }
  template <class K, class Q>
  static score_table oracle(const scorer::config& cfg, const model_shape& shape, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>& queries) {
    return h2o_scores(cfg, shape, keys, queries);
  }
};

struct observed_attention_case : h2o_case {
  static constexpr const char* label = "h2o_observed";
  static scorer::config config() { return kvpress::observed_attention(); }
};

struct key_norm_case {
  using scorer = score::key_norm;
  static constexpr const char* label = "key_norm";
  static scorer::config config() { return {}; }
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
  static scorer::config config() { return {.sinks = 3}; }
  static std::int64_t queries(std::int64_t) { return 0; }
  template <class K, class Q>
  static score_table oracle(const scorer::config& cfg, const model_shape& shape, const tensor_view<K, 4>& keys,
                            const tensor_view<Q, 4>&) {
    return static_window_scores(cfg, {keys.extent(0), shape.kv_heads, keys.extent(2)});
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
};

struct adaptive_case {
  using budget = budget::adaptive;
  static constexpr const char* label = "adaptive";
  static budget::config config(const model_shape&) { return {.keep = keep_tokens{14}, .alpha = 0.3}; }
  static kept_sets oracle(const budget::config& cfg, const score_table& scores, const table_shape& s) {
    return adaptive_sets(scores, s, detail::resolve_keep(cfg.keep, s.tokens), cfg.alpha, cfg.kvpress_compatible);
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
};

// ---- type lists ----------------------------------------------------------------

template <class... Ts>
struct type_list {};

template <class A, class B>
struct concat;
template <class... As, class... Bs>
struct concat<type_list<As...>, type_list<Bs...>> {
  using type = type_list<As..., Bs...>;
};

/// All (S, B) pairs as std::tuple<S, B>.
template <class Scorers, class Budgets>
struct pairs;
template <class... Ss, class Budgets>
struct pairs<type_list<Ss...>, Budgets> {
  template <class S, class L>
  struct with;
  template <class S, class... Bs>
  struct with<S, type_list<Bs...>> {
    using type = type_list<std::tuple<S, Bs>...>;
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

/// (Layout, S, B) triples whose layout can hold the budget's head lengths.
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
    using type = std::conditional_t<L::ragged_heads || !B::budget::ragged_heads,
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

template <class List>
struct as_gtest_types;
template <class... Ts>
struct as_gtest_types<type_list<Ts...>> {
  using type = ::testing::Types<Ts...>;
};

// The lists every product test runs. Part B's layouts (paged, flat) and the
// retrieval_head scorer join here.
using all_scorers = type_list<snapkv_case, snapkv_max_case, h2o_case, observed_attention_case, key_norm_case,
                              static_window_case>;
using all_budgets = type_list<uniform_case, pyramid_case, adaptive_case, adaptive_kvpress_case, per_head_case>;
using all_layouts = type_list<layout::contiguous>;

}  // namespace kvtrim::testing
