// kvtrim/budget/per_head.hpp — fixed lengths per (layer, kv head).
//
// For budgets decided offline: RazorAttention's windows (retrieval heads keep
// everything, the others a window), DuoAttention's streaming heads, ALiBi
// windows (score::static_window::alibi_windows), or any calibration profile.
// The lengths are a plain vector so a calibration profile (kvtrim/io/) fills it.
//
// Math: head h of layer l keeps min(T, lengths[l·kv_heads + h]) tokens.
// Defaults: none — the lengths are the policy.
// Backends: cpu, cuda.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvtrim/core/error.hpp"

namespace kvtrim::budget {

struct per_head {
  static constexpr std::string_view name = "budget::per_head";
  static constexpr bool ragged_heads = true;

  struct config {
    std::vector<std::int64_t> lengths{};  ///< [layers × kv_heads], row-major: lengths[l·kv_heads + h]
    std::int64_t kv_heads = 0;            ///< kv heads per layer (the row length)
    std::int64_t layer = 0;               ///< the layer this call compresses

    std::int64_t layers() const {
      return kv_heads > 0 ? static_cast<std::int64_t>(lengths.size()) / kv_heads : 0;
    }

    void validate(std::string_view function) const {
      if (kv_heads < 1) detail::fail(function, "config.budget.kv_heads", "at least one kv head", std::to_string(kv_heads));
      if (lengths.empty() || static_cast<std::int64_t>(lengths.size()) % kv_heads != 0)
        detail::fail(function, "config.budget.lengths",
                     detail::cat("a non-empty multiple of kv_heads = ", kv_heads, " lengths (layers × kv heads)"),
                     detail::cat(lengths.size(), " lengths"));
      if (layer < 0 || layer >= layers())
        detail::fail(function, "config.budget.layer", detail::cat("a layer index in [0, ", layers(), ")"),
                     std::to_string(layer));
      for (std::size_t i = 0; i < lengths.size(); ++i)
        if (lengths[i] < 1)
          detail::fail(function, detail::cat("config.budget.lengths[", i, "] (layer ", static_cast<std::int64_t>(i) / kv_heads,
                                             ", kv head ", static_cast<std::int64_t>(i) % kv_heads, ")"),
                       "a length of at least 1 token", std::to_string(lengths[i]));
    }
  };

  /// Tokens kv head h of cfg.layer keeps out of `tokens`.
  static std::int64_t head_keep(const config& cfg, std::int64_t h, std::int64_t tokens) {
    return std::min(tokens, cfg.lengths[static_cast<std::size_t>(cfg.layer * cfg.kv_heads + h)]);
  }

  static std::int64_t max_keep(const config& cfg, std::int64_t tokens) {
    cfg.validate("kvtrim::budget::per_head");  // also reached from compress_workspace, before the scheme validates
    std::int64_t longest = 0;
    for (std::int64_t h = 0; h < cfg.kv_heads; ++h) longest = std::max(longest, head_keep(cfg, h, tokens));
    return longest;
  }
};

}  // namespace kvtrim::budget
