// kvtrim/score/external.hpp — scores the caller computed, handed in as a tensor.
//
// kvtrim implements a few scorers; many more exist (every kvpress press, KVzip's
// context reconstruction, a trained evictor, an engine's own attention
// statistics). This scorer takes their per-token scores as they are, so those
// methods get kvtrim's budgets (uniform, Ada-KV, PyramidKV, per-head), layouts
// (contiguous, paged, flat), codecs and decode attention without kvtrim knowing
// how the scores were made.
//
// Math: s[b, h, j] = given[b, h, j] for every sequence b, kv head h, token j
// (higher keeps first, as every kvtrim score; +∞ marks tokens every budget must
// keep first — a protected window). A NaN ranks as −∞ (kept only after every
// finite score): both backends map it the same way, a device kernel cannot
// throw, and a NaN in someone else's score should not be undefined behaviour.
//
// How the scores reach the scorer: by value in its config (FlashInfer's habit of
// parameters by value) — a pointer, the extents the caller thinks it has and
// the strides, all in elements, in the memory space of the backend that runs
// (host memory for backend::cpu, device memory for backend::cuda, written
// before the compress call on its stream). `config::from(view)` fills it from a
// tensor_view. The extents are checked against the call ([batch, kv_heads,
// tokens] of the keys), so a stale or mis-shaped score tensor is an error that
// names config.score.scores, not a silent misread. Per kv head: a method that
// scores per query head reduces its group first (kvtrim never caches repeated KV).
// Defaults: none (a config without scores is refused when a call runs).
// Backends: cpu, cuda.
#pragma once

#include <array>
#include <cstdint>
#include <limits>
#include <string_view>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim::score {

struct external {
  static constexpr std::string_view name = "score::external";
  static constexpr bool needs_queries = false;
  static constexpr bool ragged_heads = false;

  struct config {
    const float* scores = nullptr;          ///< [batch, kv_heads, tokens], the backend's memory
    std::array<std::int64_t, 3> extents{};  ///< what the caller holds (checked against the call)
    std::array<std::int64_t, 3> strides{};  ///< elements

    /// The config for scores held in `view` (any memory space: the caller
    /// matches it to the backend).
    template <MemorySpace Space>
    static config from(const tensor_view<const float, 3, Space>& view) {
      return {view.data, view.extents, view.strides};
    }
    template <MemorySpace Space>
    static config from(const tensor_view<float, 3, Space>& view) {
      return {view.data, view.extents, view.strides};
    }

    /// Only the knobs: the tensor itself is checked when a call runs (plan_capacity
    /// and the workspace size need no scores).
    void validate(std::string_view function) const {
      for (std::size_t axis = 0; axis < 3; ++axis)
        if (strides[axis] < 0)
          detail::fail(function, "config.score.strides", "non-negative strides",
                       detail::cat("stride ", strides[axis], " on axis ", axis));
    }
  };

  /// Throws unless the config holds scores for [batch, kv_heads, tokens].
  static void check(std::string_view function, const config& cfg, std::int64_t batch, std::int64_t kv_heads,
                    std::int64_t tokens) {
    cfg.validate(function);
    if (cfg.scores == nullptr)
      detail::fail(function, "config.score.scores", "per-token scores (score::external::config::from(view))",
                   "no scores");
    if (cfg.extents != std::array<std::int64_t, 3>{batch, kv_heads, tokens})
      detail::fail(function, "config.score.scores",
                   detail::cat("scores of extents [", batch, ", ", kv_heads, ", ", tokens, "] (batch, kv heads, tokens)"),
                   detail::cat("[", cfg.extents[0], ", ", cfg.extents[1], ", ", cfg.extents[2], "]"));
  }

  /// The rank value of a given score: itself, −∞ for a NaN.
  KVTRIM_HOST_DEVICE static float rank_value(float given) {
    return given != given ? -std::numeric_limits<float>::infinity() : given;
  }
};

}  // namespace kvtrim::score
