// kvtrim/budget/adaptive.hpp — Ada-KV: the heads of a layer share one budget,
// handed out by one top-k across all of them, with a floor per head.
//
// Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
// Allocation for Efficient LLM Inference" (NeurIPS 2025, arXiv 2407.11550).
// Heads differ in how concentrated their attention is; a layer's budget is
// better spent where scores are high, whatever the head. Scores are compared raw
// across heads; the safeguard floor keeps every head from collapsing.
//
// Math, per sequence, for a layer of H kv heads, per-head budget k (keep; the
// layer keeps exactly H·k tokens) and T tokens. Tokens scored +∞ are the
// scorer's protected set (SnapKV's window, sinks, H2O's recent window); P_h of them
// in head h. Each head's tokens in rank order: score descending, lower index first.
//   paper form (default; the window sits outside the budget B, as in Ada-KV's code):
//     B_h = k − P_h,  floor f_h = ⌊α·B_h⌋
//     head h first keeps its P_h protected tokens and its next f_h best tokens;
//     the remaining Σ_h (B_h − f_h) go to the best of all heads' other tokens,
//     one top-k over them, ties to the lower (head, token) index.
//   kvpress form (kvpress_compatible; AdaKVPress): floor f = ⌊α·k⌋ of each head's
//     best tokens (the protected ones among them), then the remaining H·(k − f)
//     to the best of the rest across heads (kvpress: one bottom-k across heads).
// The paper form also gives every head at least one token (attention over an
// empty head is undefined; kvtrim's budgets never go below one token); the
// kvpress form keeps kvpress's rule exactly (a head may end empty when
// ⌊α·k⌋ = 0, and attend then throws).
// Both keep exactly H·k tokens per sequence (Ada-KV's own code rounds each
// head's count, so its total drifts; kvtrim's does not) and every head keeps at
// least its floor. Each head's kept set is a prefix of its rank order, so the
// budget only writes per-head counts; select_top_k picks the same tokens.
//
// Defaults: α = 0.2 (the paper's safeguard and kvpress's alpha_safeguard; the
// AdaKV README suggests 0.5, its author ~0.05 at small budgets; α = 0 lets a head
// fall to its protected tokens). keep = 1024 tokens per head on average.
// Errors: a head whose protected tokens exceed k (paper form) — the budget cannot
// keep them all.
// Backends: cpu, cuda.
//
// Tensor parallelism (docs/tensor-parallel.md): when a layer's kv heads are
// sharded across ranks, each rank calls the backend's sharded keep_counts on
// its own heads with a head_shard and a communicator (kvtrim/comm/); the ranks
// find the same threshold by a radix select whose per-digit totals F are
// all-reduced, and each rank's counts equal those of the one-rank budget over
// all heads (ties in (head, token) order over ALL heads included).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/core/error.hpp"
#include "kvtrim/budget/head_shard.hpp"
#include "kvtrim/core/keep.hpp"

namespace kvtrim::budget {

struct adaptive {
  static constexpr std::string_view name = "budget::adaptive";
  static constexpr bool ragged_heads = true;

  struct config {
    keep_amount keep = keep_tokens{1024};  ///< per-head budget k (protected tokens included); layer total H·k
    double alpha = 0.2;                    ///< safeguard fraction α ∈ [0, 1]
    bool kvpress_compatible = false;       ///< floor ⌊α·k⌋ over all tokens (AdaKVPress) instead of ⌊α·(k − P_h)⌋

    void validate(std::string_view function) const {
      detail::check_keep(function, "config.budget.keep", keep);
      if (!(alpha >= 0.0 && alpha <= 1.0))
        detail::fail(function, "config.budget.alpha", "a safeguard fraction in [0, 1]", std::to_string(alpha));
    }
  };

  /// A head may take up to the whole context from the shared pool.
  static std::int64_t max_keep(const config&, std::int64_t tokens) { return tokens; }

  /// The per-head budget k out of `tokens`.
  static std::int64_t head_budget(const config& cfg, std::int64_t tokens) {
    return detail::resolve_keep(cfg.keep, tokens);
  }

  /// The tokens head h keeps before the pool: its protected ones and its floor.
  /// Throws when the paper form's budget cannot hold the protected tokens.
  static std::int64_t guaranteed(const config& cfg, std::int64_t budget, std::int64_t protected_tokens,
                                 std::int64_t head) {
    if (cfg.kvpress_compatible)
      return static_cast<std::int64_t>(std::floor(cfg.alpha * static_cast<double>(budget)));
    if (protected_tokens > budget)
      detail::fail("kvtrim::budget::adaptive", "config.budget.keep",
                   detail::cat("a per-head budget of at least the ", protected_tokens,
                               " tokens the scorer protects (scored +inf) in kv head ", head),
                   detail::cat(budget, " tokens"));
    const std::int64_t rest = budget - protected_tokens;
    const std::int64_t floor = static_cast<std::int64_t>(std::floor(cfg.alpha * static_cast<double>(rest)));
    return std::max<std::int64_t>(1, protected_tokens + floor);  // never an empty head
  }
};

}  // namespace kvtrim::budget
