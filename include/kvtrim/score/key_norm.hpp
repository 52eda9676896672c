// kvtrim/score/key_norm.hpp — keep the keys with the smallest L2 norm.
//
// Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
// Compression" (EMNLP 2024, arXiv 2406.11430): keys with a low norm receive high
// attention, so the lowest-norm keys are the ones to keep. No queries needed, so
// it runs wherever the keys are (even after prefill, without attention weights).
//
// Math: s[j] = −‖k_j‖₂ (the norm accumulated in double, rounded once to float),
// per kv head — exactly kvpress's KnormPress score (`-keys.norm(dim=-1)`).
// Defaults: none (no knobs; pair it with static_window-style sinks via a budget
// if wanted).
// Backends: cpu, cuda.
#pragma once

#include <string_view>

namespace kvtrim::score {

struct key_norm {
  static constexpr std::string_view name = "score::key_norm";
  static constexpr bool needs_queries = false;
  static constexpr bool ragged_heads = false;

  struct config {
    void validate(std::string_view) const {}
  };
};

}  // namespace kvtrim::score
