// kvtrim/eviction/sharded.hpp — the eviction step (eviction/evict.hpp) when a
// model's kv heads are sharded across ranks (tensor parallelism, issue 17).
//
// Each rank holds kv heads [first_head, first_head + local) of EVERY layer (the
// engines' layout: rank r of R holds [r·H/R, (r+1)·H/R); uneven and empty shards
// and replicas work too, as for the sharded Ada-KV budget). A per_head unit lives
// on one rank; a per_layer unit (one layer's kv heads) and a cross_layer unit
// (every layer and kv head of a sequence) span ranks, and their threshold is
// over every rank's heads. The sharded step keeps exactly the tokens the
// one-rank step keeps over all heads (ties included: the lower (head ordinal,
// token) first, ordinal = layer·H + kv head over the layer's H heads), with a
// fixed number of small collectives per call, whatever the context length:
//
//   C1      per unit [tokens held, heads, protected tokens, floor tokens,
//           candidates past the floors] + [ranks refusing their input, heads
//           counted, Σ run·heads, Σ run²·heads]: each rank's heads' sums.
//           Every unit's target, pool and activity follow, the same on every rank.
//   C2..C5  per unit a 256-bin histogram of the pool candidates' keys whose
//           higher digits match the threshold found so far (radix select, 8 bits
//           a pass, most significant first: eviction_detail::radix_threshold).
//   C6      per (sequence, layer, layer head): the pool candidates tied at the
//           threshold v*. The unit keeps its first `ties` of them in ordinal
//           order; a head's share is what its predecessors leave, so every rank
//           knows its heads' shares after one head-indexed sum (independent of
//           the shard layout, no rank-indexed prefix).
//   Then each rank compacts its own heads (floor, pool above v*, its tie
//   share) exactly as the one-rank step, and closes its page tables up.
//
// Units: per_layer batch·layers, cross_layer batch; the collectives carry
// 8·(U·(5 + 4·256) + 4 + batch·layers·H) bytes (U units) per call. per_head makes
// none (no unit spans ranks): each rank runs the one-rank step on its heads.
//
// Errors. Everything a rank checks that every rank checks the same way (the
// config, the shard's batch / layers / total_heads) throws before the first
// collective on every rank. What depends on one rank's own input (its views,
// page tables, metrics, workspace, first_head) is checked on that rank and the
// verdict travels in C1: if any rank refused its input, EVERY rank throws after
// C1 (the refusing rank its own error, the others one naming how many ranks
// refused), so no rank is left waiting in a collective and no cache changes.
// Replicas (shard.heads.counted = false) send zeros and compact their copies by
// the same thresholds. The runs (KIVI key groups) must be the same on every
// rank and layer (checked, every rank throws).
//
// Reports: evicted_tokens and freed_pages are this rank's; units_evicted and
// units_over_target count the step's units (the same on every rank) — per_head
// scope: this rank's heads' units.
//
// Backends: cpu (backend/cpu/sharded_eviction.hpp), cuda
// (backend/cuda/sharded_eviction.cuh, codec::plain as the one-GPU step).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/budget/head_shard.hpp"
#include "kvtrim/core/error.hpp"

namespace kvtrim::eviction {

/// Which kv heads of every layer this rank holds in a sharded eviction step.
/// batch and layers are given here (not read from the views) so that a rank
/// holding no heads, and passing no views, still makes every collective.
struct shard {
  budget::head_shard heads;  ///< first_head, total_heads (H per layer), counted
  std::int64_t batch = 0;    ///< sequences (every rank the same)
  std::int64_t layers = 0;   ///< layers in the step (every rank the same)

  /// The checks every rank makes identically (they throw before any collective).
  void validate_common(std::string_view function) const {
    if (heads.total_heads < 1)
      detail::fail(function, "shard.heads.total_heads", "at least one kv head per layer",
                   std::to_string(heads.total_heads));
    if (batch < 1) detail::fail(function, "shard.batch", "at least one sequence", std::to_string(batch));
    if (layers < 1) detail::fail(function, "shard.layers", "at least one layer", std::to_string(layers));
  }
  /// Units of a step in `scope` (per_layer, cross_layer).
  std::int64_t units(bool cross_layer) const { return cross_layer ? batch : batch * layers; }
};

}  // namespace kvtrim::eviction

namespace kvtrim::eviction_detail {

/// The sharded step's collective layout (the same on every backend).
inline constexpr int unit_sums = 5;     ///< C1 per unit: held, heads, protected, floor tokens, candidates left
inline constexpr int global_sums = 4;   ///< C1 tail: refused, heads counted, Σ run·heads, Σ run²·heads
inline constexpr int digit_bins = 256;  ///< C2..C5 per unit
inline constexpr int digit_passes = 4;

/// The step over sharded heads, per backend (backend/cpu/sharded_eviction.hpp,
/// backend/cuda/sharded_eviction.cuh).
template <class Backend>
struct sharded_step;

}  // namespace kvtrim::eviction_detail
