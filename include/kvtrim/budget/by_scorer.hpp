// kvtrim/budget/by_scorer.hpp — the scorer decides how many tokens each head keeps.
//
// Some scorers carry the budget in their own math: RazorAttention keeps every
// token of a retrieval head and sinks + a recent window + one compensation
// token elsewhere (score::retrieval_head). Such a scorer declares
// `sets_keep_counts = true` and provides the keep counts itself; scheme then
// requires this budget, so no other budget's knobs sit unused in the config.
//
// Math: none (k_head comes from the scorer; at most T per head).
// Defaults: none (no knobs).
// Backends: every backend (there is nothing to run).
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/core/implementation.hpp"

namespace kvtrim::budget {

struct by_scorer {
  static constexpr std::string_view name = "budget::by_scorer";
  static constexpr bool ragged_heads = true;
  /// scheme asks the scorer for the keep counts instead of this budget.
  static constexpr bool defers_to_scorer = true;

  struct config {
    void validate(std::string_view) const {}
  };

  /// A head keeps at most its whole context.
  static std::int64_t max_keep(const config&, std::int64_t tokens) { return tokens; }
};

}  // namespace kvtrim::budget

namespace kvtrim {
/// Nothing runs for by_scorer, on any backend.
template <class Backend>
struct implementation<budget::by_scorer, Backend> {};
}  // namespace kvtrim
