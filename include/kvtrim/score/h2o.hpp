// kvtrim/score/h2o.hpp — H2O: heavy hitters (accumulated attention) + a recent window.
//
// Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
// Large Language Models" (NeurIPS 2023, arXiv 2306.14048). A few tokens collect
// most of the attention of all queries; keep them and the most recent tokens.
//
// Math, for kv head h with query heads g ∈ group(h), every prefill query t ∈ [0, T):
//   A_g[t, j] = softmax over j ≤ t of q_{g,t}·k_j/√D          (fp32, causal)
//   a_g[j]    = Σ_t A_g[t, j]                 (normalisation::none: H2O's accumulated attention)
//   a_g[j]    = Σ_t A_g[t, j] / (T − j)       (normalisation::observed: kvpress's
//                                              ObservedAttentionPress, the mean over the
//                                              T − j queries that see key j)
//   s[j]      = mean_g a_g[j]                 (group_reduction::mean; ::max option)
//   s[j]      = +∞ for the last `recent` tokens when protect_recent (the recent window)
// With budget::uniform{keep_ratio{0.2}} and recent = keep_ratio{0.1} this is the
// paper's 10% heavy hitters + 10% recent tokens.
//
// Queries: H2O needs every prefill query, so `window_queries` must hold all T
// queries ([B, Hq, T, D], after RoPE); fewer is a kvtrim::error (a partial sum
// would silently favour late keys). Cost O(T²·D) per query head: a prefill-time,
// reference-grade scorer.
// Given normalisers: config.lse (with_lse(view)), [B, Hq, T], the prefill
// attention's softmax_lse of every query: the GPU then skips its first pass over K
// (score/attention_mass.hpp says which values, and what happens to non-finite ones).
// Defaults: recent = 10% of the prompt (the paper's recent ratio), no
// normalisation, mean over the group. kvpress ObservedAttention: normalisation
// observed, protect_recent = false (see kvtrim/kvpress.hpp).
// Backends: cpu, cuda.
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "kvtrim/core/error.hpp"
#include "kvtrim/core/keep.hpp"
#include "kvtrim/score/attention_mass.hpp"

namespace kvtrim::score {

struct h2o {
  static constexpr std::string_view name = "score::h2o";
  static constexpr bool needs_queries = true;
  static constexpr bool ragged_heads = false;
  /// Its queries are the prefill's own, one per token (not a window of the last w).
  static constexpr bool observes_every_query = true;

  enum class normalisation {
    none,      ///< H2O: Σ over queries
    observed,  ///< kvpress ObservedAttentionPress: Σ over queries / (T − j)
  };

  struct config {
    keep_amount recent = keep_ratio{0.1};  ///< recent window (H2O: 10% of the prompt)
    bool protect_recent = true;            ///< false: no window (kvpress ObservedAttention)
    h2o::normalisation normalisation = h2o::normalisation::none;
    score::group_reduction group = score::group_reduction::mean;
    /// Given softmax normalisers (score/attention_mass.hpp, "Given normalisers"):
    /// [batch, q_heads, n_q] ln Σ exp(q·k/√D), the backend's memory; null: computed.
    const float* lse = nullptr;
    std::array<std::int64_t, 3> lse_extents{};  ///< what the caller holds (checked against the call)
    std::array<std::int64_t, 3> lse_strides{};  ///< elements

    /// This config with the normalisers held in `view` (any memory space: the
    /// caller matches it to the backend).
    template <class T, MemorySpace Space>
      requires std::same_as<std::remove_const_t<T>, float>
    config with_lse(const tensor_view<T, 3, Space>& view) const {
      return detail::with_given_lse(*this, view);
    }

    void validate(std::string_view function) const {
      detail::validate_given_lse(function, lse, lse_strides);
      if (protect_recent) detail::check_keep(function, "config.score.recent", recent);
    }
  };

  /// Tokens of the protected recent window out of `tokens`.
  static std::int64_t recent_tokens(const config& cfg, std::int64_t tokens) {
    return cfg.protect_recent ? detail::resolve_keep(cfg.recent, tokens) : 0;
  }

  /// Throws unless every prefill query was handed over.
  static void check(std::string_view function, std::int64_t tokens, std::int64_t queries) {
    if (queries != tokens)
      detail::fail(function, "window_queries",
                   detail::cat("all ", tokens, " prefill queries (H2O accumulates the attention of every query)"),
                   detail::cat(queries, " queries"));
  }
};

}  // namespace kvtrim::score
