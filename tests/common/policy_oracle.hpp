// tests/common/policy_oracle.hpp — brute-force double-precision references for
// the scorers and budgets, written from the papers' formulas (not from kvtrim's
// code), plus a helper that runs scorer → budget → select_top_k without a layout
// (ragged budgets, before a ragged layout exists).
//
// Scores are dense [B, H, T] vectors of double; +∞ marks protected tokens.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "common/oracle.hpp"  // kept_tokens

namespace kvtrim::testing {

using score_table = std::vector<double>;                   // [B, H, T]
using kept_sets = std::vector<std::vector<std::int64_t>>;  // per flattened head, ascending

inline constexpr double infinity = std::numeric_limits<double>::infinity();

struct table_shape {
  std::int64_t batch = 0, heads = 0, tokens = 0;
  std::size_t at(std::int64_t b, std::int64_t h, std::int64_t j) const {
    return static_cast<std::size_t>((b * heads + h) * tokens + j);
  }
};

/// softmax_j(q·k_j/√D) over keys j ≤ position, in double, for query `t` of `queries`
/// (the last queries.extent(2) positions of the prefill).
template <class KeyT, class QueryT>
std::vector<double> attention_row(const tensor_view<KeyT, 4>& keys, const tensor_view<QueryT, 4>& queries,
                                  std::int64_t b, std::int64_t kv_head, std::int64_t q_head, std::int64_t t) {
  const std::int64_t tokens = keys.extent(2), head_dim = keys.extent(3);
  const std::int64_t position = tokens - queries.extent(2) + t;
  std::vector<double> p(static_cast<std::size_t>(position + 1));
  for (std::int64_t j = 0; j <= position; ++j) {
    double dot = 0.0;
    for (std::int64_t d = 0; d < head_dim; ++d)
      dot += static_cast<double>(to_float(queries(b, q_head, t, d))) * static_cast<double>(to_float(keys(b, kv_head, j, d)));
    p[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(head_dim));
  }
  const double top = *std::max_element(p.begin(), p.end());
  double sum = 0.0;
  for (double& x : p) sum += (x = std::exp(x - top));
  for (double& x : p) x /= sum;
  return p;
}

inline double reduce(score::group_reduction reduction, const std::vector<double>& values) {
  if (reduction == score::group_reduction::max) return *std::max_element(values.begin(), values.end());
  return std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
}

/// SnapKV from its definition: window attention over all keys, window mean/sum,
/// pooling (avg counts zero padding; max ignores it), group reduction, window = +∞.
template <class KeyT, class QueryT>
score_table snapkv_scores(const score::snapkv::config& cfg, const model_shape& shape,
                          const tensor_view<KeyT, 4>& keys, const tensor_view<QueryT, 4>& queries) {
  const table_shape s{keys.extent(0), shape.kv_heads, keys.extent(2)};
  const std::int64_t prefix = s.tokens - cfg.window, group = shape.group_size(), observed = queries.extent(2);
  score_table out(static_cast<std::size_t>(s.batch * s.heads * s.tokens), infinity);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      std::vector<std::vector<double>> pooled(static_cast<std::size_t>(group), std::vector<double>(static_cast<std::size_t>(prefix)));
      for (std::int64_t g = 0; g < group; ++g) {
        std::vector<double> mass(static_cast<std::size_t>(prefix), 0.0);
        for (std::int64_t t = observed - cfg.window; t < observed; ++t) {
          const auto p = attention_row(keys, queries, b, h, h * group + g, t);
          for (std::int64_t j = 0; j < prefix; ++j) mass[static_cast<std::size_t>(j)] += p[static_cast<std::size_t>(j)];
        }
        if (cfg.reduction == score::window_reduction::mean)
          for (double& x : mass) x /= static_cast<double>(cfg.window);
        for (std::int64_t j = 0; j < prefix; ++j) {
          double sum = 0.0, best = -infinity;
          for (std::int64_t i = j - cfg.kernel / 2; i <= j + cfg.kernel / 2; ++i) {
            const bool inside = i >= 0 && i < prefix;
            sum += inside ? mass[static_cast<std::size_t>(i)] : 0.0;
            if (inside) best = std::max(best, mass[static_cast<std::size_t>(i)]);
          }
          pooled[static_cast<std::size_t>(g)][static_cast<std::size_t>(j)] =
              cfg.pooling == score::pooling::avg ? sum / static_cast<double>(cfg.kernel) : best;
        }
      }
      for (std::int64_t j = 0; j < prefix; ++j) {
        std::vector<double> per_head;
        for (const auto& row : pooled) per_head.push_back(row[static_cast<std::size_t>(j)]);
        out[s.at(b, h, j)] = reduce(cfg.group, per_head);
      }
    }
  return out;
}

/// H2O / ObservedAttention from the definition: Σ over all T queries (÷ (T − j) when
/// observed), group reduction, last `recent` tokens = +∞.
template <class KeyT, class QueryT>
score_table h2o_scores(const score::h2o::config& cfg, const model_shape& shape, const tensor_view<KeyT, 4>& keys,
                       const tensor_view<QueryT, 4>& queries) {
  const table_shape s{keys.extent(0), shape.kv_heads, keys.extent(2)};
  const std::int64_t group = shape.group_size();
  score_table out(static_cast<std::size_t>(s.batch * s.heads * s.tokens));
  const std::int64_t recent =
      cfg.protect_recent ? std::clamp<std::int64_t>(std::holds_alternative<keep_ratio>(cfg.recent)
                                                        ? static_cast<std::int64_t>(std::floor(std::get<keep_ratio>(cfg.recent).value *
                                                                                               static_cast<double>(s.tokens)))
                                                        : std::get<keep_tokens>(cfg.recent).value,
                                                    1, s.tokens)
                         : 0;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h)
      for (std::int64_t j = 0; j < s.tokens; ++j) {
        std::vector<double> per_head;
        for (std::int64_t g = 0; g < group; ++g) {
          double mass = 0.0;
          for (std::int64_t t = j; t < s.tokens; ++t) mass += attention_row(keys, queries, b, h, h * group + g, t)[static_cast<std::size_t>(j)];
          if (cfg.normalisation == score::h2o::normalisation::observed) mass /= static_cast<double>(s.tokens - j);
          per_head.push_back(mass);
        }
        out[s.at(b, h, j)] = j >= s.tokens - recent ? infinity : reduce(cfg.group, per_head);
      }
  return out;
}

template <class KeyT>
score_table key_norm_scores(const tensor_view<KeyT, 4>& keys) {
  const table_shape s{keys.extent(0), keys.extent(1), keys.extent(2)};
  score_table out(static_cast<std::size_t>(s.batch * s.heads * s.tokens));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h)
      for (std::int64_t j = 0; j < s.tokens; ++j) {
        double squares = 0.0;
        for (std::int64_t d = 0; d < keys.extent(3); ++d) squares += std::pow(static_cast<double>(to_float(keys(b, h, j, d))), 2);
        out[s.at(b, h, j)] = -std::sqrt(squares);
      }
  return out;
}

inline score_table static_window_scores(const score::static_window::config& cfg, const table_shape& s) {
  score_table out(static_cast<std::size_t>(s.batch * s.heads * s.tokens));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h)
      for (std::int64_t j = 0; j < s.tokens; ++j) {
        const std::int64_t window = cfg.windows.empty() ? 0 : cfg.windows[static_cast<std::size_t>(h)];
        out[s.at(b, h, j)] = j < cfg.sinks || j >= s.tokens - window ? infinity : static_cast<double>(j);
      }
  return out;
}

/// Head (b, h)'s tokens in rank order: score descending, lower index first.
inline std::vector<std::int64_t> rank_order(const score_table& scores, const table_shape& s, std::int64_t b,
                                            std::int64_t h) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(s.tokens));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) {
    return scores[s.at(b, h, x)] > scores[s.at(b, h, y)];
  });
  return order;
}

/// Per-head top-k by brute force: sort, take the first counts[head], ascending.
inline kept_sets top_k_sets(const score_table& scores, const table_shape& s, const std::vector<std::int64_t>& counts) {
  kept_sets kept;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      auto order = rank_order(scores, s, b, h);
      order.resize(static_cast<std::size_t>(counts[static_cast<std::size_t>(b * s.heads + h)]));
      std::sort(order.begin(), order.end());
      kept.push_back(order);
    }
  return kept;
}

inline std::int64_t protected_count(const score_table& scores, const table_shape& s, std::int64_t b, std::int64_t h) {
  std::int64_t count = 0;
  for (std::int64_t j = 0; j < s.tokens; ++j) count += scores[s.at(b, h, j)] == infinity ? 1 : 0;
  return count;
}

/// Ada-KV's guaranteed tokens of a head with P protected tokens and per-head budget k:
/// paper form max(1, P + ⌊α(k − P)⌋), kvpress form ⌊α·k⌋.
inline std::int64_t adaptive_floor(std::int64_t k, double alpha, bool kvpress_form, std::int64_t p) {
  if (kvpress_form) return static_cast<std::int64_t>(std::floor(alpha * static_cast<double>(k)));
  return std::max<std::int64_t>(1, p + static_cast<std::int64_t>(std::floor(alpha * static_cast<double>(k - p))));
}

/// Ada-KV by brute force: each head's guaranteed prefix (adaptive_floor), then ALL other
/// (head, token) pairs sorted by (score desc, head, token) and the first H·k − Σ guaranteed taken.
inline kept_sets adaptive_sets(const score_table& scores, const table_shape& s, std::int64_t k, double alpha,
                               bool kvpress_form) {
  kept_sets kept(static_cast<std::size_t>(s.batch * s.heads));
  for (std::int64_t b = 0; b < s.batch; ++b) {
    struct candidate { double score; std::int64_t head, token; };
    std::vector<candidate> pool;
    std::int64_t guaranteed_total = 0;
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const auto order = rank_order(scores, s, b, h);
      const std::int64_t p = protected_count(scores, s, b, h);
      const std::int64_t guaranteed = adaptive_floor(k, alpha, kvpress_form, p);
      guaranteed_total += guaranteed;
      auto& set = kept[static_cast<std::size_t>(b * s.heads + h)];
      for (std::int64_t i = 0; i < s.tokens; ++i) {
        const std::int64_t token = order[static_cast<std::size_t>(i)];
        if (i < guaranteed) set.push_back(token);
        else pool.push_back({scores[s.at(b, h, token)], h, token});
      }
    }
    std::stable_sort(pool.begin(), pool.end(), [](const candidate& x, const candidate& y) {
      if (x.score != y.score) return x.score > y.score;
      return x.head != y.head ? x.head < y.head : x.token < y.token;
    });
    for (std::int64_t i = 0; i < s.heads * k - guaranteed_total; ++i) {
      const auto& c = pool[static_cast<std::size_t>(i)];
      kept[static_cast<std::size_t>(b * s.heads + c.head)].push_back(c.token);
    }
    for (std::int64_t h = 0; h < s.heads; ++h) std::sort(kept[static_cast<std::size_t>(b * s.heads + h)].begin(), kept[static_cast<std::size_t>(b * s.heads + h)].end());
  }
  return kept;
}

/// The sets kvtrim's scores → budget → select_top_k pipeline keeps (no layout), with the scores.
struct selection_result {
  score_table scores;  // kvtrim's float scores, widened
  std::vector<std::int64_t> counts;
  kept_sets kept;
};

template <class ScorerT, class BudgetT, class KeyT, class QueryT>
selection_result run_selection(const typename ScorerT::config& score_cfg, const typename BudgetT::config& budget_cfg,
                               const model_shape& shape, const tensor_view<KeyT, 4>& keys,
                               const tensor_view<KeyT, 4>& values, const tensor_view<QueryT, 4>& queries) {
  using scorer_impl = implementation<ScorerT, backend::cpu>;
  using budget_impl = implementation<BudgetT, backend::cpu>;
  using select_impl = implementation<stage::select_top_k, backend::cpu>;
  score_cfg.validate("run_selection");
  budget_cfg.validate("run_selection");
  const std::int64_t batch = keys.extent(0), heads = shape.kv_heads, tokens = keys.extent(2);
  workspace_carver sizing;
  detail::carve_scratch<scorer_impl>(sizing, score_cfg, shape, batch, tokens);
  detail::carve_scratch<budget_impl>(sizing, budget_cfg, shape, batch, tokens);
  std::vector<std::byte> memory(sizing.bytes() + workspace_carver::alignment);
  workspace_carver carver(workspace{memory.data(), memory.size()});
  const workspace score_scratch = detail::carve_scratch<scorer_impl>(carver, score_cfg, shape, batch, tokens);
  const workspace budget_scratch = detail::carve_scratch<budget_impl>(carver, budget_cfg, shape, batch, tokens);

  std::vector<float> scores(static_cast<std::size_t>(batch * heads * tokens));
  const auto view = make_view(scores.data(), std::array<std::int64_t, 3>{batch, heads, tokens});
  const tensor_view<const KeyT, 4> k{keys.data, keys.extents, keys.strides};
  const tensor_view<const KeyT, 4> v{values.data, values.extents, values.strides};
  const tensor_view<const QueryT, 4> q{queries.data, queries.extents, queries.strides};
  if constexpr (detail::needs_scratch<scorer_impl, typename ScorerT::config>)
    scorer_impl::score(score_cfg, shape, k, v, q, view, score_scratch, backend::host_stream{});
  else
    scorer_impl::score(score_cfg, shape, k, v, q, view, backend::host_stream{});
  const tensor_view<const float, 3> scores_in{view.data, view.extents, view.strides};
  std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * heads));
  if constexpr (detail::scorer_sets_keep_counts<ScorerT>)
    scorer_impl::keep_counts(score_cfg, shape, scores_in, counts.data(), backend::host_stream{});
  else if constexpr (detail::needs_scratch<budget_impl, typename BudgetT::config>)
    budget_impl::keep_counts(budget_cfg, scores_in, counts.data(), budget_scratch, backend::host_stream{});
  else
    budget_impl::keep_counts(budget_cfg, scores_in, counts.data(), backend::host_stream{});
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(batch * heads + 1));
  std::vector<std::int32_t> tokens_kept(static_cast<std::size_t>(batch * heads * tokens));
  std::vector<std::int32_t> order(static_cast<std::size_t>(tokens));
  select_impl::select(scores_in, counts.data(), offsets.data(), tokens_kept.data(),
                      workspace{order.data(), order.size() * sizeof(std::int32_t)}, backend::host_stream{});
  selection_result result;
  result.scores.assign(scores.begin(), scores.end());
  for (std::int64_t head = 0; head < batch * heads; ++head) {
    result.counts.push_back(counts[static_cast<std::size_t>(head)]);
    result.kept.emplace_back(tokens_kept.begin() + offsets[static_cast<std::size_t>(head)],
                             tokens_kept.begin() + offsets[static_cast<std::size_t>(head + 1)]);
  }
  return result;
}

/// RazorAttention's kept set of kv head h by the paper's definition (score::retrieval_head):
/// a retrieval head, or one that would drop fewer than two tokens, keeps all T; any other
/// keeps the S sinks, the compensation token (when on) and the recent W = max(W_min, ⌊ρT⌋).
/// The compensation token is token T of inputs extended by with_mean_token (token_sets.hpp),
/// with logit bias ln N_d, N_d = T − S − W. `placeholder` names it S instead (the selection
/// stage keeps token S, which compress then overwrites).
inline kept_tokens retrieval_head_kept(const score::retrieval_head::config& cfg, std::int64_t tokens, std::int64_t h,
                                       bool placeholder = false) {
  kept_tokens set;
  const std::int64_t window = std::max(cfg.min_recent, static_cast<std::int64_t>(std::floor(cfg.recent_fraction *
                                                                                             static_cast<double>(tokens))));
  const std::int64_t dropped = tokens - cfg.sinks - window;
  if (cfg.retrieval[static_cast<std::size_t>(h)] || dropped < 2) {
    for (std::int64_t t = 0; t < tokens; ++t) set.tokens.push_back(t);
    set.bias.assign(set.tokens.size(), 0.0);
    return set;
  }
  for (std::int64_t t = 0; t < cfg.sinks; ++t) set.tokens.push_back(t);
  if (cfg.compensation) set.tokens.push_back(placeholder ? cfg.sinks : tokens);
  for (std::int64_t t = tokens - window; t < tokens; ++t) set.tokens.push_back(t);
  set.bias.assign(set.tokens.size(), 0.0);
  if (cfg.compensation) set.bias[static_cast<std::size_t>(cfg.sinks)] = std::log(static_cast<double>(dropped));
  return set;
}

/// Largest |kvtrim − oracle| over finite oracle scores, relative to the largest |oracle|;
/// also fails (returns +∞) when the two disagree on which tokens are +∞.
inline double score_error(const score_table& got, const score_table& want) {
  double worst = 0.0, scale = 0.0;
  for (double x : want) if (std::isfinite(x)) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (got[i] != want[i]) return infinity;
      continue;
    }
    worst = std::max(worst, std::abs(got[i] - want[i]));
  }
  return scale > 0.0 ? worst / scale : worst;
}

/// True when `kept` is a top-count set of each head under the oracle's scores up to
/// `tolerance` (relative to the largest finite score): every kept token scores at
/// least every dropped one, minus the tolerance — what survives float rounding.
inline bool near_top_k(const kept_sets& kept, const score_table& oracle, const table_shape& s, double tolerance) {
  double scale = 0.0;
  for (double x : oracle) if (std::isfinite(x)) scale = std::max(scale, std::abs(x));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const auto& set = kept[static_cast<std::size_t>(b * s.heads + h)];
      double lowest_kept = infinity, highest_dropped = -infinity;
      for (std::int64_t j = 0; j < s.tokens; ++j) {
        const double x = oracle[s.at(b, h, j)];
        if (std::binary_search(set.begin(), set.end(), j)) lowest_kept = std::min(lowest_kept, x);
        else highest_dropped = std::max(highest_dropped, x);
      }
      if (lowest_kept < highest_dropped - tolerance * scale) return false;
    }
  return true;
}

}  // namespace kvtrim::testing
