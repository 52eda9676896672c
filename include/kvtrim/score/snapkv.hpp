// kvtrim/score/snapkv.hpp — SnapKV: the prompt's last queries vote for the keys
// they attend to.
//
// Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation"
// (NeurIPS 2024, arXiv 2404.14469). The last w queries of the prefill (the
// "observation window") already attend to what generation will need; keys they
// ignore can go. Scores are per kv head, so GQA models never repeat their cache.
//
// Math, for kv head h with query heads g ∈ group(h), prefix length n = T − w,
// window query t ∈ [0, w) at position n + t:
//   A_g[t, j] = softmax over j ≤ n + t of q_{g,t}·k_j/√D     (fp32, over ALL keys
//               up to the query, window keys included, before slicing them off)
//   a_g[j]    = (1/w) Σ_t A_g[t, j]   (window_reduction::mean; ::sum drops 1/w), j < n
//   p_g[j]    = pool_k(a_g)[j]        (stride 1, padding k/2; avg counts the zero padding)
//   s[j]      = mean_g p_g[j]         (group_reduction::mean after pooling; ::max option)
//   s[j]      = +∞ for j ≥ n          (the window itself is always kept)
// Every budget composes: uniform keeps the window + the top k − w of the
// prefix; adaptive and pyramid treat +∞ tokens as the protected window.
//
// Defaults: window 64, kernel 5, avg pooling, mean over the window, mean over the
// group — the SnapKV reference code's defaults and kvpress's SnapKVPress (so the
// defaults are kvpress-compatible). Ada-KV's experiments use window 32, kernel 7,
// max pooling.
// Queries: `window_queries` [B, Hq, n_q, D] are the last n_q ≥ window queries of
// the prefill (after RoPE); SnapKV reads the last `window` of them.
// Given normalisers: config.lse (with_lse(view)), [B, Hq, n_q], the prefill
// attention's softmax_lse of those queries (only the last `window` rows are read):
// the GPU then skips its first pass over K (score/attention_mass.hpp says which
// values, and what happens to non-finite ones).
// Backends: cpu, cuda.
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "kvtrim/core/error.hpp"
#include "kvtrim/score/attention_mass.hpp"

namespace kvtrim::score {

struct snapkv {
  static constexpr std::string_view name = "score::snapkv";
  static constexpr bool needs_queries = true;
  static constexpr bool ragged_heads = false;

  struct config {
    std::int64_t window = 64;  ///< observation window w (queries, and keys always kept)
    std::int64_t kernel = 5;   ///< pooling kernel, odd; 1 disables pooling
    score::pooling pooling = score::pooling::avg;
    score::window_reduction reduction = score::window_reduction::mean;
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
      if (window < 1)
        detail::fail(function, "config.score.window", "an observation window of at least 1 query",
                     std::to_string(window));
      if (kernel < 1 || kernel % 2 == 0)
        detail::fail(function, "config.score.kernel", "an odd pooling kernel ≥ 1 (1 disables pooling)",
                     std::to_string(kernel));
    }
  };

  /// Throws unless `tokens` keys and `queries` observed queries fit the window.
  static void check(std::string_view function, const config& cfg, std::int64_t tokens, std::int64_t queries) {
    if (cfg.window >= tokens)
      detail::fail(function, "config.score.window",
                   detail::cat("a window shorter than the prefill (", tokens, " tokens), so something is left to score"),
                   std::to_string(cfg.window));
    if (queries < cfg.window)
      detail::fail(function, "window_queries",
                   detail::cat("at least config.score.window = ", cfg.window, " observed queries"),
                   detail::cat(queries, " queries"));
  }
};

}  // namespace kvtrim::score
