// kvtrim/score/static_window.hpp — attention sinks + the most recent tokens.
//
// StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
// Attention Sinks", ICLR 2024): the first few tokens absorb attention mass
// whatever their content ("sinks"), so a cache that keeps them plus a recent
// window stays stable at any length.
//
// Math, as a score so that it composes with every budget: for token i of T,
//   score(i) = +∞        for i < sinks,
//   score(i) = i         otherwise (newer is more important).
// A head that keeps k tokens therefore keeps min(k, sinks) sinks and the
// k − sinks newest tokens; with ties to the lower index the rule is exact for
// T ≤ 2^24 (float represents every index exactly), which is checked.
// kvpress's StreamingLLMPress keeps the same set for n_kept = int(T·(1−cr)).
//
// Defaults: sinks = 4 (the paper's choice for every model it studied).
// Backends: cpu, cuda.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"

namespace kvtrim::score {

struct static_window {
  static constexpr std::string_view name = "score::static_window";
  static constexpr bool needs_queries = false;
  static constexpr bool ragged_heads = false;
  /// Longest context the float scores rank exactly.
  static constexpr std::int64_t max_tokens = std::int64_t{1} << 24;

  struct config {
    std::int64_t sinks = 4;

    void validate(std::string_view function) const {
      if (sinks < 0) detail::fail(function, "config.score.sinks", "a non-negative sink count", std::to_string(sinks));
    }
  };

  /// The score of token `index` (host and device use this same function).
  KVTRIM_HOST_DEVICE static constexpr float score(std::int64_t sinks, std::int64_t index) {
    return index < sinks ? std::numeric_limits<float>::infinity() : static_cast<float>(index);
  }
};

}  // namespace kvtrim::score
