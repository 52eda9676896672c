// kvtrim/kvpress.hpp — configurations that keep exactly what NVIDIA's kvpress
// (v0.5.4) keeps, for users who compare against it.
//
// kvpress (github.com/NVIDIA/kvpress) compresses Hugging Face caches with
// "presses". Each function below returns the kvtrim config of one press, so
//   scheme<layout, score::snapkv, budget::uniform, ...>::config{
//       .score = kvpress::snapkv(), .budget = kvpress::scorer_press(0.5)}
// keeps the token set of SnapKVPress(compression_ratio=0.5) for every
// (sequence, kv head). kvpress's choices, mirrored here (docs/kvpress.md):
//   n_kept = int(T·(1 − cr))                          keep_ratio{1 − cr} (same double product, floored)
//   SnapKV: softmax over all keys before slicing the window, mean over the window,
//           avg pooling that counts the zero padding, group mean after pooling,
//           window protected (kvpress: global max + 1; kvtrim: +∞, same ranking)
//   StreamingLLM: n_sink first tokens + the most recent
//   Knorm: −‖k‖₂;  ObservedAttention: Σ_i A[i, j] / (T − j), group mean, no window
//   AdaKV: per-head safeguard ⌊α·n_kept⌋, then one bottom-k across heads
//   PyramidKV: get_layer_budget's float schedule, round half to even, SnapKV fallback
// Where torch.topk breaks ties in an unspecified order, kvtrim keeps the lower
// index; kept sets agree whenever the boundary is not a tie (random inputs).
// Not mirrored: kvpress keeps nothing when int(T·(1 − cr)) = 0 (kvtrim keeps one
// token); PyramidKVPress divides by zero for a one-layer model (kvtrim keeps
// round(T·(1 − cr))); kvpress casts attention probabilities to the model dtype
// (bf16/fp16) before scoring, kvtrim scores in fp32 — compare in fp32.
#pragma once

#include <cstdint>
#include <string>

#include "kvtrim/budget/adaptive.hpp"
#include "kvtrim/budget/pyramid.hpp"
#include "kvtrim/budget/uniform.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/keep.hpp"
#include "kvtrim/score/h2o.hpp"
#include "kvtrim/score/key_norm.hpp"
#include "kvtrim/score/snapkv.hpp"
#include "kvtrim/score/static_window.hpp"

namespace kvtrim::kvpress {

/// kvpress's n_kept = int(T·(1 − compression_ratio)), compression_ratio ∈ [0, 1).
inline keep_amount keep(double compression_ratio) {
  if (!(compression_ratio >= 0.0 && compression_ratio < 1.0))
    detail::fail("kvtrim::kvpress::keep", "compression_ratio", "a compression ratio in [0, 1) (kvpress's assertion)",
                 std::to_string(compression_ratio));
  return keep_ratio{1.0 - compression_ratio};
}

/// StreamingLLMPress(n_sink) scores.
inline score::static_window::config streaming_llm(std::int64_t n_sink = 4) { return {.sinks = n_sink}; }

/// SnapKVPress(window_size, kernel_size) scores (also PyramidKVPress's).
inline score::snapkv::config snapkv(std::int64_t window_size = 64, std::int64_t kernel_size = 5) {
  return {.window = window_size,
          .kernel = kernel_size,
          .pooling = score::pooling::avg,
          .reduction = score::window_reduction::mean,
          .group = score::group_reduction::mean};
}

/// KnormPress scores.
inline score::key_norm::config knorm() { return {}; }

/// ObservedAttentionPress scores (hand compress() all T prefill queries).
inline score::h2o::config observed_attention() {
  return {.recent = keep_ratio{1.0},
          .protect_recent = false,
          .normalisation = score::h2o::normalisation::observed,
          .group = score::group_reduction::mean};
}

/// ScorerPress's budget: the top n_kept of every head.
inline budget::uniform::config scorer_press(double compression_ratio) { return {.keep = keep(compression_ratio)}; }

/// AdaKVPress(press, alpha_safeguard) budget.
inline budget::adaptive::config adakv(double compression_ratio, double alpha_safeguard = 0.2) {
  return {.keep = keep(compression_ratio), .alpha = alpha_safeguard, .kvpress_compatible = true};
}

/// PyramidKVPress(window_size, beta) budget for layer `layer` of `layers`.
inline budget::pyramid::config pyramidkv(double compression_ratio, std::int64_t layer, std::int64_t layers,
                                         std::int64_t window_size = 64, std::int64_t beta = 20) {
  return {.keep = keep(compression_ratio),
          .window = window_size,
          .beta = beta,
          .layer = layer,
          .layers = layers,
          .kvpress_compatible = true};
}

}  // namespace kvtrim::kvpress
