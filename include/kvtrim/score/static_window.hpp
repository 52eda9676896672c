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
// Per-head windows (optional, `config::windows`, one length L_h per kv head):
//   score_h(i) = +∞ also for i ≥ T − L_h,
// so head h protects its own last L_h tokens; budget::per_head with lengths
// sinks + L_h (per_head_lengths below) then keeps exactly sinks + window per head,
// and adaptive/pyramid count the window as protected.
// ALiBi windows (RazorAttention, Tang et al., arXiv 2407.15891, §3 and its
// ALiBi analysis): an ALiBi head with slope m_h adds −m_h·distance to its logits, so
// a head cannot attend further back than about L_h where m_h·L_h dwarfs every
// logit difference. kvtrim uses
//   L_h = ⌈c / m_h⌉,  c = 89,   m_h = ALiBi slope (2^(−8h/H), h = 1..H, for H a power of 2;
//                                Press et al.'s interleaved construction otherwise)
// c = 89 is the constant that reproduces the windows shipped for Baichuan2-13B
// in Huawei's msmodelslim RazorAttention tables (kvtrim's REFERENCE.md); a GQA
// kv head takes the longest window of its query group.
//
// Defaults: sinks = 4 (the paper's choice for every model it studied); no per-head windows.
// Backends: cpu (sinks and windows), cuda (sinks only).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

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
    /// Optional recent window per kv head (empty: none, the budget alone decides).
    std::vector<std::int64_t> windows{};

    void validate(std::string_view function) const {
      if (sinks < 0) detail::fail(function, "config.score.sinks", "a non-negative sink count", std::to_string(sinks));
      for (std::size_t h = 0; h < windows.size(); ++h)
        if (windows[h] < 0)
          detail::fail(function, detail::cat("config.score.windows[", h, "]"), "a non-negative window length",
                       std::to_string(windows[h]));
    }
  };

  /// Throws unless the per-head windows (if any) match the layer's kv heads.
  static void check(std::string_view function, const config& cfg, std::int64_t kv_heads) {
    if (!cfg.windows.empty() && static_cast<std::int64_t>(cfg.windows.size()) != kv_heads)
      detail::fail(function, "config.score.windows", detail::cat("one window per kv head (", kv_heads, ")"),
                   detail::cat(cfg.windows.size(), " windows"));
  }

  /// The window of kv head `h` (0 when there are no per-head windows).
  static std::int64_t window_of(const config& cfg, std::int64_t h) {
    return cfg.windows.empty() ? 0 : cfg.windows[static_cast<std::size_t>(h)];
  }

  /// The score of token `index` (host and device use this same function).
  KVTRIM_HOST_DEVICE static constexpr float score(std::int64_t sinks, std::int64_t index) {
    return index < sinks ? std::numeric_limits<float>::infinity() : static_cast<float>(index);
  }
  /// The score of token `index` of `tokens` in a head with its own recent `window`.
  KVTRIM_HOST_DEVICE static constexpr float score(std::int64_t sinks, std::int64_t window, std::int64_t tokens,
                                                  std::int64_t index) {
    return index >= tokens - window ? std::numeric_limits<float>::infinity() : score(sinks, index);
  }

  /// ALiBi slopes of Press et al. (ICLR 2022) for `heads` heads: 2^(−8h/H) for
  /// H a power of two; otherwise the reference code's construction (the slopes
  /// of the power of two below H, then every other slope of twice that).
  static std::vector<double> alibi_slopes(std::int64_t heads) {
    if (heads < 1) detail::fail("kvtrim::score::static_window::alibi_slopes", "heads", "at least one head",
                                std::to_string(heads));
    const auto power_of_two_slopes = [](std::int64_t count) {
      std::vector<double> slopes(static_cast<std::size_t>(count));
      for (std::int64_t h = 0; h < count; ++h)
        slopes[static_cast<std::size_t>(h)] =
            std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(count));
      return slopes;
    };
    std::int64_t closest = 1;
    while (closest * 2 <= heads) closest *= 2;
    std::vector<double> slopes = power_of_two_slopes(closest);
    const std::vector<double> doubled = power_of_two_slopes(2 * closest);
    for (std::int64_t extra = 0; extra < heads - closest; ++extra)
      slopes.push_back(doubled[static_cast<std::size_t>(2 * extra)]);
    return slopes;
  }

  /// RazorAttention's ALiBi windows, one per kv head: L = ⌈constant / m⌉ for each
  /// query head's slope m, the longest over a kv head's query group.
  static std::vector<std::int64_t> alibi_windows(std::int64_t q_heads, std::int64_t kv_heads,
                                                 double constant = 89.0) {
    constexpr std::string_view function = "kvtrim::score::static_window::alibi_windows";
    if (kv_heads < 1 || q_heads % kv_heads != 0)
      detail::fail(function, "kv_heads", detail::cat("a divisor of q_heads = ", q_heads), std::to_string(kv_heads));
    if (!(constant > 0.0)) detail::fail(function, "constant", "a positive constant", std::to_string(constant));
    const std::vector<double> slopes = alibi_slopes(q_heads);
    const std::int64_t group = q_heads / kv_heads;
    std::vector<std::int64_t> windows(static_cast<std::size_t>(kv_heads), 0);
    for (std::int64_t j = 0; j < q_heads; ++j) {
      auto& window = windows[static_cast<std::size_t>(j / group)];
      window = std::max(window, static_cast<std::int64_t>(std::ceil(constant / slopes[static_cast<std::size_t>(j)])));
    }
    return windows;
  }

  /// budget::per_head lengths that keep exactly the sinks and each head's window.
  static std::vector<std::int64_t> per_head_lengths(const config& cfg) {
    std::vector<std::int64_t> lengths(cfg.windows.size());
    for (std::size_t h = 0; h < lengths.size(); ++h) lengths[h] = cfg.sinks + cfg.windows[h];
    return lengths;
  }
};

}  // namespace kvtrim::score
