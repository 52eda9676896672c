// kvtrim/backend/cpu/adaptive.hpp — CPU reference of budget::adaptive.
//
// Per sequence: rank each head's tokens (score descending, lower index first),
// fix each head's guaranteed prefix (protected + floor), then hand the rest of
// the layer's budget out by merging the heads' remaining ranked tokens — an
// H-way merge in the order ranks_before(score, h·T + token), i.e. one top-k
// across heads with ties to the lower (head, token) index.
//
// Ranking once (issue 9): nothing here sorts. The guaranteed prefix of each
// head is a partition (std::nth_element) and the merge is one partition of the
// remaining candidates at the pool size — the same counts as the sort-and-merge
// it replaced (ranks_before is a strict total order, so "the first n" is one
// set), in O(H·T). The only ordering a compress then does is select_top_k's
// partition of each head and the sort of its kept indices.
//
// Sharded (tensor parallelism; docs/tensor-parallel.md): the second
// keep_counts takes this rank's heads, a budget::head_shard and a communicator.
// The merge above needs every head's tokens; the sharded form needs only
// counts, so it is the threshold search of the CUDA backend (cuda/adaptive.cuh)
// written for ranks. Every (b, h) key is the order-preserving 32-bit
// detail::order_key of its score, and per sequence
//   F(v) = Σ_h max(g_h, N_h(v)),  N_h(v) = tokens of head h with key ≥ v,
// over ALL heads, is what decides: v* = the largest key with F(v*) ≥ H·k. F is
// a sum over heads, so each rank sums its own heads and an all-reduce adds the
// ranks. Four radix passes of 8 bits, most significant first: each rank
// histograms the digit of its tokens whose higher digits equal the prefix so
// far, evaluates its partial F at the lowest key of each of the 256 digits, one
// all-reduce gives every rank the same totals and so the same digit. Then with
// base_h = max(g_h, keys > v*) and surplus_h = max(g_h, keys ≥ v*) − base_h,
// the tokens at v* fill the rest head by head in the layer's head order —
// (head, token) over ALL heads, as the merge orders them — so each rank needs
// Σ base over all heads and every head's surplus: one more all-reduce of
// [Σ base, surplus_0 .. surplus_{H−1}] per sequence (each rank writes its own
// heads' slots, zeros elsewhere). The counts are those of the merge above.
// Traffic, all-reduced 64-bit counts per call: 4 · batch · 256 + 2 (the +2,
// on the first pass: heads whose protected tokens exceed k — every rank then
// throws, as the one-rank budget does — and heads counted, which must be H),
// then batch · (H + 1).
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/budget/adaptive.hpp"
#include "kvtrim/comm/communicator.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/rank.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

namespace detail {
/// The order-preserving key of a score (cuda_detail::rank_key on the host): a
/// larger key ranks first; NaN is 0, below −∞; −0 has +0's key.
inline std::uint32_t order_key(float score) {
  if (score != score) return 0u;
  const std::uint32_t bits = score == 0.0f ? 0u : std::bit_cast<std::uint32_t>(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
inline constexpr std::uint32_t order_key_infinity = 0xff800000u;  // order_key(+∞): a protected token
}  // namespace detail

template <>
struct implementation<budget::adaptive, backend::cpu> {
  static std::size_t workspace_bytes(const budget::adaptive::config&, const model_shape& shape,
                                     std::int64_t /*batch*/, std::int64_t tokens) {
    workspace_carver carver;
    carve(carver, shape.kv_heads, tokens);
    return carver.bytes();
  }

  static void keep_counts(const budget::adaptive::config& cfg, const tensor_view<const float, 3>& scores,
                          std::int32_t* keep_counts, workspace scratch, backend::host_stream) {
    const std::int64_t batch = scores.extent(0), heads = scores.extent(1), tokens = scores.extent(2);
    const std::int64_t budget = budget::adaptive::head_budget(cfg, tokens);
    workspace_carver carver(scratch);
    const parts p = carve(carver, heads, tokens);
    for (std::int64_t b = 0; b < batch; ++b) {
      std::int64_t pool = heads * budget;  // what the guaranteed prefixes leave to share
      std::int64_t candidates = 0;
      for (std::int64_t h = 0; h < heads; ++h) {
        std::int64_t protected_tokens = 0;
        for (std::int64_t j = 0; j < tokens; ++j) protected_tokens += scores(b, h, j) == std::numeric_limits<float>::infinity() ? 1 : 0;
        p.count[h] = budget::adaptive::guaranteed(cfg, budget, protected_tokens, h);
        pool -= p.count[h];
        const std::int64_t guaranteed = std::clamp<std::int64_t>(p.count[h], 0, tokens);
        // The head's first `guaranteed` in rank order: a partition, not a sort.
        std::int32_t* order = p.order;
        for (std::int32_t j = 0; j < tokens; ++j) order[j] = j;
        if (guaranteed > 0 && guaranteed < tokens)
          std::nth_element(order, order + guaranteed - 1, order + tokens, [&](std::int32_t left, std::int32_t right) {
            return detail::ranks_before(scores(b, h, left), left, scores(b, h, right), right);
          });
        for (std::int64_t j = guaranteed; j < tokens; ++j) p.candidates[candidates++] = h * tokens + order[j];
      }
      // Merging the heads' ranked remainders and taking `pool` of them is taking the
      // `pool` best candidates in ranks_before(score, h·T + token) order.
      const auto score_of = [&](std::int64_t index) { return scores(b, index / tokens, index % tokens); };
      const std::int64_t taken = std::clamp<std::int64_t>(pool, 0, candidates);
      if (taken > 0 && taken < candidates)
        std::nth_element(p.candidates, p.candidates + taken - 1, p.candidates + candidates,
                         [&](std::int64_t left, std::int64_t right) {
                           return detail::ranks_before(score_of(left), left, score_of(right), right);
                         });
      for (std::int64_t c = 0; c < taken; ++c) ++p.count[p.candidates[c] / tokens];
      for (std::int64_t h = 0; h < heads; ++h) keep_counts[b * heads + h] = static_cast<std::int32_t>(p.count[h]);
    }
  }

  /// Workspace of the sharded keep_counts: O(batch · local heads · 256), not O(tokens).
  static std::size_t sharded_workspace_bytes(const budget::adaptive::config&, std::int64_t batch,
                                             std::int64_t local_heads, std::int64_t /*tokens*/,
                                             const budget::head_shard& shard) {
    workspace_carver carver;
    carve_sharded(carver, batch, local_heads, shard.total_heads);
    return carver.bytes();
  }

  /// This rank's keep counts [batch, local heads] (scores: [batch, local heads,
  /// tokens], the layer's heads shard.first_head ...): those of keep_counts over
  /// all ranks' heads. Every rank of `comm` calls it with the same config,
  /// batch, tokens and shard.total_heads; the call makes 5 collectives.
  template <comm::communicator<backend::host_stream> Comm>
  static void keep_counts(const budget::adaptive::config& cfg, const tensor_view<const float, 3>& scores,
                          const budget::head_shard& shard, const Comm& comm, std::int32_t* keep_counts,
                          workspace scratch, backend::host_stream stream) {
    constexpr std::string_view function = "kvtrim::budget::adaptive (sharded)";
    const std::int64_t batch = scores.extent(0), heads = scores.extent(1), tokens = scores.extent(2);
    cfg.validate(function);
    shard.validate(function, heads);
    if (batch == 0) return;  // the same on every rank: no collective
    if (keep_counts == nullptr && heads > 0) detail::fail(function, "keep_counts", "a [batch, local heads] output", "null");
    if (scores.data == nullptr && heads > 0 && tokens > 0) detail::fail(function, "scores", "scores", "null data");
    detail::check_workspace(function, scratch, sharded_workspace_bytes(cfg, batch, heads, tokens, shard));
    const std::int64_t total_heads = shard.total_heads;
    const std::int64_t budget = budget::adaptive::head_budget(cfg, tokens);
    const auto target = static_cast<std::uint64_t>(total_heads * budget);
    workspace_carver carver(scratch);
    const sharded_parts p = carve_sharded(carver, batch, heads, total_heads);
    const std::uint64_t counted = shard.counted ? 1 : 0;

    // Floors from the protected tokens (paper form: beyond k is an error, found
    // by the first collective so that every rank throws).
    std::uint64_t over_budget = 0;
    std::int64_t first_over = -1, first_over_protected = 0;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < heads; ++h) {
        std::int64_t protected_tokens = 0;
        for (std::int64_t j = 0; j < tokens; ++j)
          protected_tokens += detail::order_key(scores(b, h, j)) == detail::order_key_infinity ? 1 : 0;
        std::int64_t& floor = p.floors[b * heads + h];
        if (!cfg.kvpress_compatible && protected_tokens > budget) {
          ++over_budget;
          if (first_over < 0) {
            first_over = h;
            first_over_protected = protected_tokens;
          }
          floor = budget;
        } else {
          floor = budget::adaptive::guaranteed(cfg, budget, protected_tokens, shard.first_head + h);
        }
        p.above[b * heads + h] = 0;
      }
    for (std::int64_t b = 0; b < batch; ++b) p.prefix[b] = 0;

    for (int pass = 0; pass < digit_passes; ++pass) {
      const int shift = 32 - digit_bits * (pass + 1);
      const std::uint32_t high_mask = pass == 0 ? 0u : ~0u << (32 - digit_bits * pass);
      std::fill(p.bins, p.bins + batch * heads * digit_bins, std::uint64_t{0});
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < heads; ++h) {
          std::uint64_t* bins = p.bins + (b * heads + h) * digit_bins;
          for (std::int64_t j = 0; j < tokens; ++j) {
            const std::uint32_t key = detail::order_key(scores(b, h, j));
            if (((key ^ p.prefix[b]) & high_mask) == 0) ++bins[(key >> shift) & (digit_bins - 1)];
          }
        }
      // This rank's F at the lowest key of each digit, index j = 255 − digit.
      for (std::int64_t b = 0; b < batch; ++b) {
        std::uint64_t* reached = p.totals + b * digit_bins;
        std::fill(reached, reached + digit_bins, std::uint64_t{0});
        for (std::int64_t h = 0; h < heads; ++h) {
          const std::uint64_t* bins = p.bins + (b * heads + h) * digit_bins;
          const auto floor = static_cast<std::uint64_t>(p.floors[b * heads + h]);
          auto at_or_above = static_cast<std::uint64_t>(p.above[b * heads + h]);
          for (int j = 0; j < digit_bins; ++j) {
            at_or_above += bins[digit_bins - 1 - j];
            reached[j] += counted * std::max(floor, at_or_above);
          }
        }
      }
      std::size_t n = static_cast<std::size_t>(batch * digit_bins);
      if (pass == 0) {
        p.totals[n] = counted * over_budget;
        p.totals[n + 1] = counted * static_cast<std::uint64_t>(heads);
        n += 2;
      }
      comm.all_reduce_sum(p.totals, n, stream);
      if (pass == 0) {
        const std::size_t extra = static_cast<std::size_t>(batch * digit_bins);
        if (p.totals[extra + 1] != static_cast<std::uint64_t>(total_heads))
          detail::fail(function, "shard",
                       detail::cat("shards whose counted heads add up to total_heads = ", total_heads),
                       detail::cat(p.totals[extra + 1], " heads counted over ", comm.size(), " ranks"));
        if (p.totals[extra] > 0) {
          if (first_over >= 0)  // the one-rank budget's error, naming this rank's head
            budget::adaptive::guaranteed(cfg, budget, first_over_protected, shard.first_head + first_over);
          detail::fail("kvtrim::budget::adaptive", "config.budget.keep",
                       "a per-head budget of at least the tokens the scorer protects (scored +inf) in every kv head",
                       detail::cat(budget, " tokens (", p.totals[extra], " heads of other ranks protect more)"));
        }
      }
      for (std::int64_t b = 0; b < batch; ++b) {
        // F falls as the digit rises: the entries short of the target are the
        // highest digits (F at digit 0 reaches it: the previous passes chose so).
        int short_digits = 0;
        for (int j = 0; j < digit_bins; ++j) short_digits += p.totals[b * digit_bins + j] < target ? 1 : 0;
        const int digit = digit_bins - 1 - std::min(short_digits, digit_bins - 1);
        for (std::int64_t h = 0; h < heads; ++h) {
          const std::uint64_t* bins = p.bins + (b * heads + h) * digit_bins;
          std::uint64_t higher = 0;
          for (int d = digit + 1; d < digit_bins; ++d) higher += bins[d];
          p.above[b * heads + h] += static_cast<std::int64_t>(higher);
          p.ties[b * heads + h] = static_cast<std::int64_t>(bins[digit]);
        }
        p.prefix[b] |= static_cast<std::uint32_t>(digit) << shift;
      }
    }

    // v* fixed: Σ base over all heads and every head's surplus at v*.
    const std::int64_t row = total_heads + 1;
    std::fill(p.shares, p.shares + batch * row, std::uint64_t{0});
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t floor = p.floors[b * heads + h], above = p.above[b * heads + h];
        const std::int64_t base = std::max(floor, above), full = std::max(floor, above + p.ties[b * heads + h]);
        p.shares[b * row] += counted * static_cast<std::uint64_t>(base);
        p.shares[b * row + 1 + shard.first_head + h] = counted * static_cast<std::uint64_t>(full - base);
      }
    comm.all_reduce_sum(p.shares, static_cast<std::size_t>(batch * row), stream);
    for (std::int64_t b = 0; b < batch; ++b) {
      std::int64_t remaining = static_cast<std::int64_t>(target) - static_cast<std::int64_t>(p.shares[b * row]);
      for (std::int64_t g = 0; g < total_heads; ++g) {
        const auto surplus = static_cast<std::int64_t>(p.shares[b * row + 1 + g]);
        const std::int64_t take = std::max<std::int64_t>(0, std::min(surplus, remaining));
        remaining -= take;
        const std::int64_t h = g - shard.first_head;
        if (h >= 0 && h < heads) {
          const std::int64_t base = std::max(p.floors[b * heads + h], p.above[b * heads + h]);
          keep_counts[b * heads + h] = static_cast<std::int32_t>(base + take);
        }
      }
    }
  }

 private:
  static constexpr int digit_bits = 8;
  static constexpr int digit_bins = 1 << digit_bits;
  static constexpr int digit_passes = 32 / digit_bits;

  struct sharded_parts {
    std::uint64_t* bins = nullptr;    // [batch · heads · 256]: this pass's digit histogram
    std::uint64_t* totals = nullptr;  // [batch · 256 + 2]: F per digit (this rank's, then all ranks')
    std::uint64_t* shares = nullptr;  // [batch · (H + 1)]: Σ base, surplus per layer head
    std::int64_t* floors = nullptr;   // [batch · heads]
    std::int64_t* above = nullptr;    // [batch · heads]: keys above the prefix's range
    std::int64_t* ties = nullptr;     // [batch · heads]: keys equal to v* (after the last pass)
    std::uint32_t* prefix = nullptr;  // [batch]: the digits fixed so far
  };
  static sharded_parts carve_sharded(workspace_carver& carver, std::int64_t batch, std::int64_t heads,
                                     std::int64_t total_heads) {
    sharded_parts p;
    p.bins = carver.take<std::uint64_t>(batch * heads * digit_bins);
    p.totals = carver.take<std::uint64_t>(batch * digit_bins + 2);
    p.shares = carver.take<std::uint64_t>(batch * (total_heads + 1));
    p.floors = carver.take<std::int64_t>(batch * heads);
    p.above = carver.take<std::int64_t>(batch * heads);
    p.ties = carver.take<std::int64_t>(batch * heads);
    p.prefix = carver.take<std::uint32_t>(batch);
    return p;
  }

  struct parts {
    std::int32_t* order = nullptr;       // [tokens]: one head's tokens, partitioned
    std::int64_t* candidates = nullptr;  // [heads·tokens]: h·T + token past each head's guaranteed prefix
    std::int64_t* count = nullptr;       // [heads]: tokens kept
  };
  static parts carve(workspace_carver& carver, std::int64_t heads, std::int64_t tokens) {
    parts p;
    p.order = carver.take<std::int32_t>(tokens);
    p.candidates = carver.take<std::int64_t>(heads * tokens);
    p.count = carver.take<std::int64_t>(heads);
    return p;
  }
};

}  // namespace kvtrim
