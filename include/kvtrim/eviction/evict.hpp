// kvtrim/eviction/evict.hpp — compression that keeps going during decode: the
// eviction step, run every `interval` decode steps (or when a sequence passes
// its budget), dropping the tokens with the lowest eviction metric.
//
// Papers: vllm-kvcompress (Rehg, arXiv 2410.00161) — per-head paged eviction
// during decode, by a metric accumulated by decode attention (eviction/metric.hpp),
// budgeted across all layers and kv heads of a sequence at once; Ada-KV (Feng
// et al., arXiv 2407.11550) — one top-k over a layer's heads with a per-head
// floor (budget::adaptive). kvtrim does both, without vllm-kvcompress's limits
// (a full sort capped at 5M entries using ~8× its input; fp16 only): the
// threshold is a radix select (four 8-bit histogram passes over the metric, no
// sort), scratch is O(heads), and every codec works.
//
// Math. A "unit" is what one threshold is taken over:
//   scope::per_head     one (sequence, layer, kv head)
//   scope::per_layer    one (sequence, layer): its kv heads (Ada-KV)
//   scope::cross_layer  one sequence: every layer and kv head (vllm-kvcompress)
// Retrieval heads (cfg.retrieval_heads, RazorAttention's) are in no unit:
// they are never evicted and their tokens are outside every budget.
// For a unit of H heads with n_h tokens, k = keep − interval per head:
//   protected tokens: sinks (position < sinks), the recent window
//     (next_position − position ≤ protected_window, the metric's own rule),
//     a compensation token, and tokens a codec still holds in a side buffer
//     (a KIVI key group that is filling; layered's fp16 rows) — P_h per head;
//   target T = H·k. A unit holding ≤ T tokens is left as it is. Otherwise it
//     keeps its protected tokens, then per head a floor of
//     f_h = ⌊α·max(0, k − P_h)⌋ of its best candidates (at least one when
//     P_h = 0: never an empty head; per_head scope: f_h = k − P_h, no pool),
//     then the best max(0, T − ΣP − Σf) of all remaining candidates of the unit,
//   "best" by the metric, higher first; ties keep the lower (head ordinal, token
//   index) — head ordinal = layer·kv_heads + h, the order everywhere in kvtrim
//   (core/rank.hpp: NaN ranks below every number, −0 = +0).
//   Codecs with slot runs U > 1 (int8/int4 KIVI key groups, docs/composition.md §3)
//   evict whole runs of U tokens (logical [jU, (j+1)U)): a run's metric is the
//   sum of its tokens', a run with a protected token or fewer than U tokens is
//   protected, and the unit keeps ⌊(T − ΣP)/U⌋ runs; moving whole runs keeps every
//   token's slot ≡ its index (mod U), so scales stay valid.
// After the step each unit holds ≤ T tokens unless its protected tokens and
// floors alone exceed T (report::units_over_target); with an eviction every
// `interval` steps, appends of one token per step keep every unit ≤ keep·H.
//
// Layouts. Each head's kept items move to its first slots without a full
// compaction: with the head's protected tail (the longest run of protected
// items at its end — the recent window, a KIVI filling group, an incomplete run)
// and K kept items before it, kept items below K stay where they are, kept items
// at K or later fill the holes below K in ascending order, and the tail shifts
// down behind them in order. A step moves at most (evicted + tail) items per head
// instead of every item after the first hole (at W over 32 layers: a few MB
// instead of ~17 GB, what makes a 2 ms step possible). Token order is not kept:
// attention is order-free (positions live per slot, RoPE'd keys carry their own,
// pre-RoPE codecs rotate by the stored position), runs move whole so every token
// keeps slot ≡ index (mod U), and the tail — the window, the codecs' side buffers,
// the newest tokens — stays a suffix in order. Keys/values move as stored by the
// codec's move_slot; positions, metric and the compensation index move along.
// paged: whole pages past a head's new length go back to the free list (pushed in
// head order, page-table order: free_pages gains them on top), the page tables
// close up (indptr, indices, last_page_len). flat: in place inside each head's
// region (offsets unchanged; the region's headroom grows). The metric of every
// slot that no longer holds a token is set to 0, the value decode attention
// expects for a new token (it accumulates only outside the window). contiguous:
// no (every head the same length; a compile-time error).
//
// Strong guarantee: every argument, view and page table is validated before the
// first write; a call that throws leaves caches and metrics as they were.
//
// Defaults: scope cross_layer, keep 1024 per kv head, interval 16, sinks 4,
// protected window 64 (vllm-kvcompress's), α = 0.2 (Ada-KV's safeguard).
// Backends: cpu (backend/cpu/eviction.hpp), cuda (backend/cuda/eviction.cuh:
// plain, int8, int4, fp8, low_rank and layered<C> over paged and flat, byte-identical to the CPU).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/core/error.hpp"
#include "kvtrim/eviction/metric.hpp"

namespace kvtrim::eviction {

enum class scope : int {
  per_head = 0,     ///< each (sequence, layer, kv head) alone
  per_layer = 1,    ///< one threshold over a layer's kv heads, with per-head floors (Ada-KV)
  cross_layer = 2,  ///< one threshold over every layer and kv head of a sequence (vllm-kvcompress)
};

/// Protected tokens are kept whatever the target: sinks, the window, the compensation token
/// and the codecs' pins (up to key_group − 1 for KIVI, update_freq − 1 for low_rank's sequence
/// bases, layered's fp16 rows). With keep − interval below their sum a head keeps more than
/// the target (the step counts it in report::units_over_target) and a tight pool may run out
/// at the next appends: size keep − interval above sinks + protected_window + the codec's pins.
struct config {
  eviction::scope scope = scope::cross_layer;
  std::int64_t keep = 1024;      ///< tokens per kv head on average: the cap between evictions
  std::int64_t interval = 16;    ///< decode steps between evictions: a step keeps keep − interval per head
  std::int64_t sinks = 4;        ///< positions < sinks are never evicted (StreamingLLM)
  std::int64_t protected_window = default_protected_window;  ///< the metric's window (must match the decode side's)
  double alpha = 0.2;            ///< per-head floor fraction (per_layer, cross_layer); 0: vllm-kvcompress's form
  const std::uint8_t* retrieval_heads = nullptr;  ///< [layers · kv_heads] (host), nonzero: never evicted; null: none

  /// Tokens per head a step keeps.
  std::int64_t head_target() const { return keep - interval; }

  void validate(std::string_view function) const {
    const int s = static_cast<int>(scope);
    if (s < 0 || s > 2)
      detail::fail(function, "config.scope", "per_head, per_layer or cross_layer", std::to_string(s));
    if (interval < 1) detail::fail(function, "config.interval", "at least one decode step", std::to_string(interval));
    if (keep <= interval)
      detail::fail(function, "config.keep",
                   detail::cat("more tokens per head than interval = ", interval,
                               " (a step keeps keep − interval so the next interval's appends fit)"),
                   std::to_string(keep));
    if (sinks < 0) detail::fail(function, "config.sinks", "≥ 0 sink tokens", std::to_string(sinks));
    if (protected_window < 0)
      detail::fail(function, "config.protected_window", "a window of ≥ 0 tokens", std::to_string(protected_window));
    if (!(alpha >= 0.0 && alpha <= 1.0))
      detail::fail(function, "config.alpha", "a floor fraction in [0, 1]", std::to_string(alpha));
  }
};

/// What one eviction step did (host memory).
struct report {
  std::int64_t evicted_tokens = 0;     ///< tokens dropped, all layers
  std::int64_t freed_pages = 0;        ///< pages returned to free lists (paged)
  std::int64_t units_evicted = 0;      ///< units that were over their target
  std::int64_t units_over_target = 0;  ///< units still over it (protected tokens and floors exceed T)
};

/// The eviction step's tag: implementation<eviction::step, Backend> (backend/cpu/eviction.hpp,
/// backend/cuda/eviction.cuh).
struct step {
  static constexpr std::string_view name = "eviction::step";
};

/// Whether decode step `decode_step` (counted from 1 after the prefill) is an eviction step.
constexpr bool due(std::int64_t decode_step, const config& cfg) {
  return cfg.interval > 0 && decode_step > 0 && decode_step % cfg.interval == 0;
}

}  // namespace kvtrim::eviction

namespace kvtrim::eviction_detail {

/// Whether the codec still holds token `i` (of `length`) of flattened head `head`
/// in a side buffer that records slots by arrival — a filling KIVI key group
/// (int8/int4), layered's fp16 rows, low_rank's tokens appended since its last basis
/// refresh (pending_slots: the refresh re-encodes each into the slot it recorded, so
/// an evicted one would be written over whichever token later took its slot). Such
/// tokens move with move_slot but cannot be dropped without corrupting that buffer,
/// so eviction protects them. They are a head's newest tokens (appends arrive in
/// token order, and eviction keeps that order), hence the test by index. (Host and
/// device: backend/cpu/eviction.hpp and backend/cuda/eviction.cuh ask the same.)
template <class Storage>
KVTRIM_HOST_DEVICE bool codec_pins(const Storage& store, std::int64_t head, std::int64_t slot, std::int64_t i,
                                   std::int64_t length) {
  bool pinned = false;
  if constexpr (requires { store.inner; }) pinned = codec_pins(store.inner, head, slot, i, length);
  if constexpr (requires { store.slot_rows[slot]; })
    if (store.slot_rows != nullptr && store.slot_rows[slot] >= 0) pinned = true;
  if constexpr (requires { store.residual_count[head]; store.key_group; })
    if (store.key_group != 0 && i >= length - store.residual_count[head]) pinned = true;
  if constexpr (requires { store.pending_counts[head]; store.update_freq; })
    if (store.update_freq != 0 && i >= length - store.pending_counts[head]) pinned = true;
  return pinned;
}

}  // namespace kvtrim::eviction_detail
