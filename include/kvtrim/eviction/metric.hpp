// kvtrim/eviction/metric.hpp — the importance metric decode-time eviction ranks
// tokens by, accumulated by decode attention as a side output.
//
// Paper: vllm-kvcompress (Rehg, "KV-Compress: Paged KV-Cache Compression with
// Variable Compression Rates per Attention Head", arXiv 2410.00161): each
// cached token of each kv head carries a running metric, the sum over decode
// steps and over the query heads of its GQA group of its squared attention
// probability; prefill seeds it from the last queries of the prompt (an
// observation window, SnapKV-style); the most recent tokens are protected and
// do not accumulate.
//
// Math, for kv head h of a sequence at a decode step, query heads g of h's
// group G, p_gi the softmax probability of kept token i (the attention the
// step computes anyway), n the head's next position, pos_i the token's:
//   c_i = Σ_g p_gi²        squared_sum   (L2, vllm-kvcompress's default)
//         Σ_g p_gi         sum           (L1, H2O's accumulated attention)
//         (1/G) Σ_g p_gi²  squared_mean, (1/G) Σ_g p_gi  mean   (group-averaged)
//   metric[slot(i)] += c_i   only when n − pos_i > window (older than the protected recent window)
// Tokens inside the window neither accumulate nor can be evicted (eviction/evict.hpp
// uses the same test), so a token starts accumulating when it leaves the window.
//
// Where the metric lives — an engine-owned buffer indexed by slot, not a
// cache-owned array: one float per storage slot of the layout (slot =
// view.slot(b, h, i), the index positions use), allocated by whoever owns the
// cache memory. Why: an engine porting this to vLLM owns its memory (vllm-
// kvcompress allocates its kv_metrics tensor beside the block tables); caches
// that never evict pay nothing (layouts' bytes() and views are unchanged); and
// indexing by slot keeps it next to the cache exactly like positions — the
// kernel that reads token i's key writes metric[slot(i)], no second index. The
// price: every call that moves slots must move the metric too. kvtrim::evict
// does (it is the only mover when pages are freed in place); layout::flat's
// append repack (a head out of headroom) does not know the buffer, so with flat
// either size the buffer so a repack cannot happen between evictions (evict
// leaves every head ≥ interval tokens of headroom when the buffer allows; it
// reports whether it did) or call eviction::make_room before append.
//
// One step late (metric_output::carry, optional): the step's attention does not
// keep its logits; the next step recomputes the previous step's logits
// s_{t−1,i} = q_{t−1}·k_i from the queries and softmax normaliser kept in the
// carry, over the keys as they are then, and adds that step's c_i. The point is a
// kernel that has every key on chip anyway and need not write and read back
// per-token logits (the immediate device mode's cost at W: docs/eviction.md).
// The price: after step t the metric holds steps ≤ t − 1; eviction::flush_metric
// adds the pending step (one more pass over the keys) where an eviction must see
// it. Tokens appended since the previous step never count for it (they are
// inside its window: positions ≥ its next position); tokens moved by an eviction
// carry their metric and their keys, so the pending step lands on the slots they
// moved to; evicted tokens lose it. Keys are read as they are stored at the later
// step: where a codec rewrites a key after the fact (KIVI's residual keys
// requantized when their group seals, layered<>'s recent rows re-encoded as they
// age, low_rank's recent tokens re-encoded when its basis is refreshed) the late
// term uses the newer form — measured over 40 steps at head dim 32: ≤ 0.93 %
// relative for KIVI int8 (groups of 8), ≤ 4.1 % for layered<int8> against the
// immediate metric. Otherwise, after a flush the metric equals the immediate
// mode's bit for bit (tests/cpu/eviction_test.cpp).
//
// The carry is engine-owned, zero-initialised (next = 0: nothing pending) and
// belongs to one layer's cache. Whatever replaces a head's tokens other than an
// append or kvtrim::evict — a reset, a new prefill (scheme::compress), a
// truncate — must zero that head's carry.next (eviction::seed_metric does it for
// the heads it seeds), else the old queries would be scored against new keys.
//
// The metric buffer itself is the engine's too, and only kvtrim::evict and seeding
// zero the slots they free. scheme::truncate does not know the buffer: rolling back
// the drafts of the current step is harmless (appended after the last attend that
// took the metric — multi-query attends take none — they hold 0;
// tests/cpu/engine_life_test.cpp checks the free slots after every call), but a
// rollback reaching tokens that an earlier step's metric attend counted leaves their
// metric in the freed slots, and the next token appended there would start from it —
// zero those slots (values[slot] = 0 for the dropped tokens' slots, read before the
// truncate).
//
// Backends for one step late: cpu (the specification). On cuda eviction::attend
// refuses a carry: the device kernel that recomputes the previous step's logits was
// built (branch wip/deferred-metric-cuda) and measured slower than the immediate
// metric at W (docs/eviction.md, 2026-12-03).
//
// Defaults: squared_sum, protected window 64 (vllm-kvcompress's), immediate.
// Backends: cpu (backend/cpu/decode_attention.hpp; seed: backend/cpu/eviction.hpp),
// cuda (backend/cuda/decode_attention.cuh, a side output of the split-K kernel, every
// codec; seed: backend/cuda/eviction.cuh).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim::eviction {

enum class metric_kind : int {
  squared_sum = 0,   ///< Σ_g p²  (L2; vllm-kvcompress)
  sum = 1,           ///< Σ_g p   (L1; H2O)
  squared_mean = 2,  ///< Σ_g p² / G
  mean = 3,          ///< Σ_g p / G
};

inline constexpr std::int64_t default_protected_window = 64;

/// The one-step-late metric's state between decode steps (engine-owned, in the
/// cache's memory space, zero-initialised before the first step; one per layer).
template <MemorySpace Space = host_space>
struct metric_carry {
  float* queries = nullptr;         ///< [batch · q_heads · head_dim]: the previous step's queries, as floats
  float* normaliser = nullptr;      ///< [batch · q_heads · 2]: its softmax normaliser per query head (max logit
                                    ///< and denominator)
  std::int64_t* next = nullptr;     ///< [batch · kv_heads]: each head's next position at that step; 0: none pending

  KVTRIM_HOST_DEVICE bool enabled() const { return queries != nullptr; }
};

/// What decode attention accumulates into: one float per storage slot.
template <MemorySpace Space = host_space>
struct metric_output {
  float* values = nullptr;  ///< [slots], indexed like the cache's storage (null: no metric)
  std::int64_t slots = 0;   ///< entries of `values` (≥ the layout's storage slots)
  metric_kind kind = metric_kind::squared_sum;
  std::int64_t protected_window = default_protected_window;  ///< tokens with next − pos ≤ window do not accumulate
  metric_carry<Space> carry{};  ///< set: one step late (the header's comment); empty: immediate

  KVTRIM_HOST_DEVICE bool enabled() const { return values != nullptr; }
  KVTRIM_HOST_DEVICE bool deferred() const { return values != nullptr && carry.enabled(); }
};

/// Whether a token at `position` of a head whose next position is `next` is
/// older than the protected recent window (it accumulates and may be evicted).
KVTRIM_HOST_DEVICE constexpr bool outside_window(std::int64_t next, std::int64_t position, std::int64_t window) {
  return next - position > window;
}

/// One query head's contribution to c_i before the group's (1/G) for the mean kinds.
KVTRIM_HOST_DEVICE constexpr float metric_term(metric_kind kind, float probability) {
  return kind == metric_kind::squared_sum || kind == metric_kind::squared_mean ? probability * probability
                                                                                 : probability;
}
/// The factor applied to Σ_g terms: 1/G for the mean kinds.
KVTRIM_HOST_DEVICE constexpr float metric_group_factor(metric_kind kind, std::int64_t group) {
  return kind == metric_kind::squared_mean || kind == metric_kind::mean ? 1.0f / static_cast<float>(group) : 1.0f;
}

}  // namespace kvtrim::eviction

namespace kvtrim::eviction_detail {
/// Throws unless a metric output can be written for a layout of `slots` storage slots.
template <MemorySpace Space>
void check_metric(std::string_view function, const eviction::metric_output<Space>& metric, std::int64_t slots) {
  const auto& carry = metric.carry;
  const bool any_carry = carry.queries != nullptr || carry.normaliser != nullptr || carry.next != nullptr;
  if (metric.values == nullptr) {
    if (any_carry)
      ::kvtrim::detail::fail(function, "metric.values", "a metric buffer with a carry (one step late)", "null");
    return;
  }
  if (metric.slots < slots)
    ::kvtrim::detail::fail(function, "metric.slots",
                           ::kvtrim::detail::cat("one float per storage slot of the cache (", slots, ")"),
                           std::to_string(metric.slots));
  if (metric.protected_window < 0)
    ::kvtrim::detail::fail(function, "metric.protected_window", "a window of ≥ 0 tokens",
                           std::to_string(metric.protected_window));
  const int kind = static_cast<int>(metric.kind);
  if (kind < 0 || kind > 3)
    ::kvtrim::detail::fail(function, "metric.kind", "squared_sum, sum, squared_mean or mean", std::to_string(kind));
  if (any_carry) {
    if (carry.queries == nullptr || carry.normaliser == nullptr || carry.next == nullptr)
      ::kvtrim::detail::fail(function, "metric.carry", "queries, normaliser and next all set (or none: immediate)",
                             ::kvtrim::detail::cat("queries ", carry.queries == nullptr ? "null" : "set", ", normaliser ",
                                                   carry.normaliser == nullptr ? "null" : "set", ", next ",
                                                   carry.next == nullptr ? "null" : "set"));
    if (reinterpret_cast<std::uintptr_t>(carry.queries) % alignof(float) != 0 ||
        reinterpret_cast<std::uintptr_t>(carry.normaliser) % alignof(float) != 0 ||
        reinterpret_cast<std::uintptr_t>(carry.next) % alignof(std::int64_t) != 0)
      ::kvtrim::detail::fail(function, "metric.carry", "arrays aligned to their element types", "a misaligned array");
  }
}
/// Throws unless a padded batch's prompt lengths (host memory, `batch` entries; null: every
/// sequence has all `tokens`) each hold the `observed` window queries at their end and fit the
/// keys: eviction::seed_metric's `sequence_lengths`, on both backends.
inline void check_seed_lengths(std::string_view function, const std::int64_t* sequence_lengths, std::int64_t batch,
                               std::int64_t observed, std::int64_t tokens) {
  for (std::int64_t b = 0; sequence_lengths != nullptr && b < batch; ++b)
    if (sequence_lengths[b] < observed || sequence_lengths[b] > tokens)
      ::kvtrim::detail::fail(function, "sequence_lengths",
                             ::kvtrim::detail::cat("prompt lengths in [", observed, ", ", tokens,
                                                   "] (the window queries', the keys' tokens)"),
                             ::kvtrim::detail::cat(sequence_lengths[b], " for sequence ", b));
}
/// Throws unless the GQA group fits the metric's per-group state (at most 16 query heads).
inline void check_metric_group(std::string_view function, const model_shape& shape) {
  if (shape.group_size() > 16)
    ::kvtrim::detail::fail(function, "cache.shape", "a GQA group of at most 16 query heads with an eviction metric",
                           std::to_string(shape.group_size()));
}
}  // namespace kvtrim::eviction_detail
