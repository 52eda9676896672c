// kvtrim/budget/pyramid.hpp — PyramidKV: lower layers keep more, higher layers
// less, the same total over the model.
//
// Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
// Information Funneling" (arXiv 2406.02069). Attention funnels from broad in the
// lower layers to a few tokens in the upper ones, so budgets fall linearly with depth.
//
// Math (the form of Ada-KV's Ada-Pyramid, REFERENCE.md), per-head average budget
// k (keep), `window` tokens every layer keeps outside the schedule, B = k − window,
// M = T − window, L layers, layer l ∈ [0, L):
//   min = B/β,  max = 2B − min;   if max ≥ M: max = M, min = 2B − max
//   B_l = max − l·(max − min)/(L − 1)            (linear in l, Σ_l B_l = L·B)
//   layer l keeps window + n_l per head, n_l = B_l rounded by largest remainder:
//   ⌊B_l⌋ for every layer, +1 for the L·B − Σ⌊B_l⌋ layers with the largest
//   fractional parts (ties to the lower layer). In exact integer arithmetic
//   (B_l·β(L−1) is an integer), so the total over layers is exactly L·k, each n_l
//   is B_l rounded down or up, and n_l never grows with depth.
// kvpress form (kvpress_compatible; PyramidKVPress.get_layer_budget, in double):
//   x = T·(1 − cr) (the keep ratio times T), max = 2x − x/β, min = x/β, capped as
//   above at T − window; if not T ≥ max ≥ min ≥ window: n = round(x) (SnapKV
//   fallback); else n = round(max − l·(max − min)/(L − 1)), round = half to even,
//   the count including the window. Its total over layers is only about L·x.
// Every head of a layer keeps the same count, so pyramid works on every layout.
//
// Defaults: β = 20 (PyramidKV, Ada-KV and kvpress); window 0 (set it to the
// scorer's observation window, e.g. 64 for score::snapkv's default).
// Backends: cpu, cuda.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

#include "kvtrim/core/error.hpp"
#include "kvtrim/core/keep.hpp"

namespace kvtrim::budget {

struct pyramid {
  static constexpr std::string_view name = "budget::pyramid";
  static constexpr bool ragged_heads = false;
  /// Bounds that keep the exact integer schedule inside 64 bits for T < 2^31.
  static constexpr std::int64_t max_beta = 1024;
  static constexpr std::int64_t max_layers = 1024;

  struct config {
    keep_amount keep = keep_tokens{1024};  ///< average per-head budget over the layers (window included)
    std::int64_t window = 0;               ///< tokens kept in every layer outside the schedule
    std::int64_t beta = 20;                ///< β: how steep the pyramid is (min = B/β)
    std::int64_t layer = 0;                ///< this layer's index l
    std::int64_t layers = 1;               ///< the model's layer count L
    bool kvpress_compatible = false;       ///< PyramidKVPress's rounding and fallback

    void validate(std::string_view function) const {
      detail::check_keep(function, "config.budget.keep", keep);
      if (window < 0) detail::fail(function, "config.budget.window", "a non-negative window", std::to_string(window));
      if (beta < 1 || beta > max_beta)
        detail::fail(function, "config.budget.beta", detail::cat("β in [1, ", max_beta, "]"), std::to_string(beta));
      if (layers < 1 || layers > max_layers)
        detail::fail(function, "config.budget.layers", detail::cat("a layer count in [1, ", max_layers, "]"),
                     std::to_string(layers));
      if (layer < 0 || layer >= layers)
        detail::fail(function, "config.budget.layer", detail::cat("a layer index in [0, ", layers, ")"),
                     std::to_string(layer));
    }
  };

  /// Tokens every head of layer cfg.layer keeps out of `tokens`.
  static std::int64_t layer_keep(const config& cfg, std::int64_t tokens) {
    cfg.validate("kvtrim::budget::pyramid");  // also reached from compress_workspace, before the scheme validates
    return cfg.kvpress_compatible ? kvpress_keep(cfg, tokens) : paper_keep(cfg, tokens);
  }
  static std::int64_t max_keep(const config& cfg, std::int64_t tokens) { return layer_keep(cfg, tokens); }

 private:
  static std::int64_t paper_keep(const config& cfg, std::int64_t tokens) {
    const std::int64_t keep = detail::resolve_keep(cfg.keep, tokens);
    if (cfg.window > keep)
      detail::fail("kvtrim::budget::pyramid", "config.budget.window",
                   detail::cat("a window no longer than the per-head budget (", keep, " of ", tokens, " tokens)"),
                   std::to_string(cfg.window));
    const std::int64_t budget = keep - cfg.window;  // B
    const std::int64_t room = tokens - cfg.window;  // M
    if (cfg.layers == 1) return keep;
    // B_i = (a − i·b) / c, exactly.
    const std::int64_t steps = cfg.layers - 1;
    std::int64_t a = 0, b = 0, c = 0;
    if (budget * (2 * cfg.beta - 1) < cfg.beta * room) {  // max = 2B − B/β below the cap
      a = budget * (2 * cfg.beta - 1) * steps;
      b = 2 * budget * (cfg.beta - 1);
      c = cfg.beta * steps;
    } else {  // max = M, min = 2B − M
      a = room * steps;
      b = 2 * (room - budget);
      c = steps;
    }
    // Largest remainder (Hamilton): every layer gets ⌊B_l⌋, the R = L·B − Σ⌊B_l⌋
    // layers with the largest fractional parts (ties: the lower layer) one more.
    // Exact total, n_l ∈ {⌊B_l⌋, ⌈B_l⌉}, and still non-increasing with depth.
    const auto numerator = [&](std::int64_t l) { return a - l * b; };  // B_l = numerator / c
    std::int64_t floors = 0;
    for (std::int64_t l = 0; l < cfg.layers; ++l) floors += numerator(l) / c;
    const std::int64_t remainder_layers = cfg.layers * budget - floors;
    const std::int64_t own = numerator(cfg.layer) % c;
    std::int64_t rank = 0;  // layers whose fractional part comes first
    for (std::int64_t l = 0; l < cfg.layers; ++l) {
      const std::int64_t other = numerator(l) % c;
      rank += other > own || (other == own && l < cfg.layer) ? 1 : 0;
    }
    return cfg.window + numerator(cfg.layer) / c + (rank < remainder_layers ? 1 : 0);
  }

  /// Python's round(): to nearest, ties to even.
  static double round_half_even(double x) {
    const double down = std::floor(x);
    const double fraction = x - down;
    if (fraction > 0.5) return down + 1.0;
    if (fraction < 0.5) return down;
    return std::fmod(down, 2.0) == 0.0 ? down : down + 1.0;
  }

  static std::int64_t kvpress_keep(const config& cfg, std::int64_t tokens) {
    const double length = static_cast<double>(tokens);
    const double window = static_cast<double>(cfg.window);
    const double target = std::holds_alternative<keep_ratio>(cfg.keep)
                              ? length * std::get<keep_ratio>(cfg.keep).value
                              : static_cast<double>(std::get<keep_tokens>(cfg.keep).value);
    const double capacity = window + target;  // max_capacity_prompt
    double min_num = (capacity - window) / static_cast<double>(cfg.beta);
    double max_num = (capacity - window) * 2.0 - min_num;
    if (max_num >= length - window) {
      max_num = length - window;
      min_num = (capacity - window) * 2.0 - max_num;
    }
    double count = 0.0;
    if (!(length >= max_num && max_num >= min_num && min_num >= window) || cfg.layers == 1)
      count = round_half_even(target);
    else
      count = round_half_even(max_num - static_cast<double>(cfg.layer) * ((max_num - min_num) /
                                                                          static_cast<double>(cfg.layers - 1)));
    const auto kept = static_cast<std::int64_t>(count);
    return kept < 1 ? 1 : (kept > tokens ? tokens : kept);
  }
};

}  // namespace kvtrim::budget
