// kvtrim/budget/uniform.hpp — every head keeps the same number of tokens.
//
// The budget of SnapKV, StreamingLLM and H2O as published: a fixed count per
// head (e.g. 1024 or 2048 tokens), or a fixed fraction of the context.
//
// Math: k = min(T, max(1, ⌊ρ·T⌋)) for keep_ratio ρ, or min(T, n) for keep_tokens n.
// Defaults: keep_tokens{1024} — StreamingLLM's 4 sinks + 1020 recent and SnapKV's
// smallest published budget.
// Backends: cpu, cuda.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/core/keep.hpp"

namespace kvtrim::budget {

struct uniform {
  static constexpr std::string_view name = "budget::uniform";
  static constexpr bool ragged_heads = false;

  struct config {
    keep_amount keep = keep_tokens{1024};

    void validate(std::string_view function) const { detail::check_keep(function, "config.budget.keep", keep); }
  };

  /// Tokens every head keeps out of `tokens`.
  static std::int64_t max_keep(const config& cfg, std::int64_t tokens) { return detail::resolve_keep(cfg.keep, tokens); }
};

}  // namespace kvtrim::budget
