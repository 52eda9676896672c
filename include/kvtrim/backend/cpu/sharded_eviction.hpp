// kvtrim/backend/cpu/sharded_eviction.hpp — the eviction step over kv heads
// sharded across ranks, CPU (eviction/sharded.hpp: the collectives, the rules).
//
// Composes the one-rank step's per-head pieces (backend/cpu/eviction.hpp:
// floor_of, pool_candidates, compact, close_up) with the collectives between
// them, for every unit of the call at once: C1 after the floors, one histogram
// all-reduce per radix pass, one of the tie counts, then the compaction. The
// one-rank step is the specification: tests/cpu/distributed_eviction_test.cpp
// compares every kept token, bit for bit, with R simulated ranks.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <string_view>
#include <vector>

#include "kvtrim/backend/cpu/eviction.hpp"
#include "kvtrim/comm/communicator.hpp"
#include "kvtrim/eviction/sharded.hpp"

namespace kvtrim::eviction_detail {

template <>
struct sharded_step<backend::cpu> {
  using step = implementation<eviction::step, backend::cpu>;
  static constexpr std::string_view function = "kvtrim::evict (sharded)";

  struct unit_state {
    std::uint32_t prefix = 0;     // the threshold's digits fixed so far
    std::int64_t remaining = 0;   // pool candidates still to keep at the prefix (after pass 4: the ties kept)
    std::int64_t pool = 0;        // pool candidates the unit keeps (0: none)
    bool active = false;          // over its target: evicts
  };
  struct parts {
    workspace step_region{};                   // the one-rank step's parts (carved first: its evict carves from 0)
    std::uint8_t* retrieval = nullptr;         // [layers · local]: this rank's slice of cfg.retrieval_heads
    threshold* floors = nullptr;               // [batch · layers · local]
    std::uint64_t* sums = nullptr;             // C1: [U · unit_sums + global_sums]
    std::uint64_t* bins = nullptr;             // C2..C5: [U · 256]
    std::uint64_t* ties = nullptr;             // C6: [batch · layers · H]
    unit_state* units = nullptr;               // [U]
  };

  template <class View>
  static std::int64_t local_heads(std::span<const View> layers) {
    return layers.empty() ? 0 : layers[0].shape.kv_heads;
  }

  template <class View>
  static parts carve(workspace_carver& carver, std::span<const View> layers, const eviction::shard& shard) {
    parts p;
    const std::size_t step_bytes = step::workspace_bytes(layers);
    p.step_region = workspace{carver.take<std::byte>(static_cast<std::int64_t>(step_bytes)), step_bytes};
    const std::int64_t local = local_heads(layers), units = shard.batch * shard.layers;  // the larger scope's
    p.retrieval = carver.take<std::uint8_t>(shard.layers * local);
    p.floors = carver.take<threshold>(shard.batch * shard.layers * local);
    p.sums = carver.take<std::uint64_t>(units * unit_sums + global_sums);
    p.bins = carver.take<std::uint64_t>(units * digit_bins);
    p.ties = carver.take<std::uint64_t>(shard.batch * shard.layers * shard.heads.total_heads);
    p.units = carver.take<unit_state>(units);
    return p;
  }

  template <class View>
  static std::size_t workspace_bytes(std::span<const View> layers, const eviction::shard& shard) {
    shard.validate_common("kvtrim::evict_workspace (sharded)");
    workspace_carver carver;
    carve(carver, layers, shard);
    return carver.bytes();
  }

  /// This rank's own checks: its views against the shard, the one-rank step's
  /// validation (retrieval heads aside: they are indexed over all ranks' heads), the workspace.
  template <class View>
  static void check_local(std::span<const View> layers, std::span<const eviction::metric_output<host_space>> metrics,
                          const eviction::config& cfg, const eviction::shard& shard, workspace scratch) {
    shard.heads.validate(function, local_heads(layers));
    if (!layers.empty()) {
      if (static_cast<std::int64_t>(layers.size()) != shard.layers)
        detail::fail(function, "layers", detail::cat("one view per layer of the step (shard.layers = ", shard.layers, ")"),
                     std::to_string(layers.size()));
      if (layers[0].batch != shard.batch)
        detail::fail(function, "layers", detail::cat("views of shard.batch = ", shard.batch, " sequences"),
                     std::to_string(layers[0].batch));
    } else if (!metrics.empty()) {
      detail::fail(function, "metrics", "none on a rank without heads", std::to_string(metrics.size()));
    }
    detail::check_workspace(function, scratch, workspace_bytes(layers, shard));
    if (layers.empty()) return;
    eviction::config unmasked = cfg;
    unmasked.retrieval_heads = nullptr;
    step::validate(layers, metrics, unmasked, scratch);
    for (const View& cache : layers)  // one run per step (the one-rank step takes a unit's largest)
      if (detail::storage_slot_run(cache.storage) != detail::storage_slot_run(layers[0].storage))
        detail::fail(function, "layers", "the same slot run (KIVI key group) in every layer",
                     detail::cat(detail::storage_slot_run(cache.storage), " and ",
                                 detail::storage_slot_run(layers[0].storage)));
  }

  /// The parts of a checked workspace, and cfg with retrieval_heads sliced to this rank's heads.
  template <class View>
  static parts carve_checked(std::span<const View> layers, const eviction::config& cfg, const eviction::shard& shard,
                             workspace scratch, eviction::config& local_cfg) {
    workspace_carver carver(scratch);
    const parts p = carve(carver, layers, shard);
    const std::int64_t local = local_heads(layers);
    local_cfg = cfg;
    local_cfg.retrieval_heads = nullptr;
    if (cfg.retrieval_heads != nullptr && local > 0) {
      for (std::int64_t l = 0; l < shard.layers; ++l)
        for (std::int64_t h = 0; h < local; ++h)
          p.retrieval[l * local + h] = cfg.retrieval_heads[l * shard.heads.total_heads + shard.heads.first_head + h];
      local_cfg.retrieval_heads = p.retrieval;
    }
    return p;
  }

  template <class View, class Comm>
  static eviction::report evict(std::span<const View> layers,
                                std::span<const eviction::metric_output<host_space>> metrics,
                                const eviction::config& cfg, const eviction::shard& shard, const Comm& comm,
                                workspace scratch, backend::host_stream stream) {
    static_assert(View::layout_policy::ragged_heads,
                  "kvtrim::evict: eviction gives heads different lengths; use layout::paged or layout::flat");
    // Identical on every rank: thrown before any collective.
    cfg.validate(function);
    shard.validate_common(function);
    const std::int64_t H = shard.heads.total_heads, L = shard.layers, batch = shard.batch;
    detail::checked_mul(function, "config.keep", detail::checked_mul(function, "shard.layers", L, H),
                        std::max<std::int64_t>(cfg.head_target(), 0));
    const std::int64_t local = local_heads(layers), first = shard.heads.first_head;
    eviction::config local_cfg;

    if (cfg.scope == eviction::scope::per_head) {  // no unit spans ranks: no collective, local errors stay local
      check_local(layers, metrics, cfg, shard, scratch);
      if (layers.empty()) return {};
      const parts p = carve_checked(layers, cfg, shard, scratch, local_cfg);
      return step::evict(layers, metrics, local_cfg, p.step_region, stream);
    }

    const bool cross = cfg.scope == eviction::scope::cross_layer;
    const std::int64_t U = shard.units(cross);
    const std::size_t c1_size = static_cast<std::size_t>(U * unit_sums + global_sums);
    try {
      check_local(layers, metrics, cfg, shard, scratch);
    } catch (...) {  // take part in C1 with the verdict only, then throw with every other rank
      std::vector<std::uint64_t> verdict(c1_size, 0);
      verdict[c1_size - global_sums] = 1;
      comm.all_reduce_sum(verdict.data(), verdict.size(), stream);
      throw;
    }
    const parts p = carve_checked(layers, cfg, shard, scratch, local_cfg);

    workspace_carver step_carver(p.step_region);
    const auto step_parts = layers.empty() ? decltype(step::carve(step_carver, 0, 0)){}
                                           : step::carve(step_carver, layers.size(), layers[0].heads());
    using context_type = typename step::template unit_context<View>;
    const auto context = [&](std::int64_t b) {
      return context_type{layers, metrics, local_cfg, step_parts, b, 0, L, 0, local};
    };
    const auto unit_of = [&](std::int64_t b, std::int64_t l) { return cross ? b : b * L + l; };
    const auto floor_index = [&](std::int64_t b, std::int64_t l, std::int64_t h) { return (b * L + l) * local + h; };
    const std::uint64_t counted = shard.heads.counted ? 1 : 0;
    const std::int64_t run = layers.empty() ? 1 : detail::storage_slot_run(layers[0].storage);

    // C1: each unit's sums over this rank's heads (floors are per head: found here).
    std::fill(p.sums, p.sums + c1_size, std::uint64_t{0});
    for (std::int64_t b = 0; b < batch && local > 0; ++b) {
      const context_type ctx = context(b);
      ctx.for_each_head([&](std::int64_t l, std::int64_t h) {
        const auto f = ctx.floor_of(l, h);
        p.floors[floor_index(b, l, h)] = f.limit;
        std::uint64_t* sums = p.sums + unit_of(b, l) * unit_sums;
        sums[0] += counted * static_cast<std::uint64_t>(ctx.ref(l, h).length);
        sums[1] += counted;
        sums[2] += counted * static_cast<std::uint64_t>(f.protected_tokens);
        sums[3] += counted * static_cast<std::uint64_t>(f.items * f.run);
        sums[4] += counted * static_cast<std::uint64_t>(f.candidates - f.items);
      });
    }
    std::uint64_t* globals = p.sums + U * unit_sums;
    globals[1] = counted * static_cast<std::uint64_t>(local);
    globals[2] = globals[1] * static_cast<std::uint64_t>(run);
    globals[3] = globals[2] * static_cast<std::uint64_t>(run);
    comm.all_reduce_sum(p.sums, c1_size, stream);
    if (globals[0] > 0)
      detail::fail(function, "(another rank's input)", "every rank's views, metrics and workspace accepted",
                   detail::cat(globals[0], " of ", comm.size(), " ranks refused theirs (their own errors say why)"));
    if (globals[1] != static_cast<std::uint64_t>(H))
      detail::fail(function, "shard.heads", detail::cat("counted shards that add up to total_heads = ", H),
                   detail::cat(globals[1], " heads counted over ", comm.size(), " ranks"));
    const std::uint64_t runs = globals[2];
    if (runs * runs != globals[1] * globals[3])  // Cauchy–Schwarz: equal iff every counted rank has one run
      detail::fail(function, "layers", "the same slot run (KIVI key group) on every rank", "different runs");
    const auto unit_run = static_cast<std::int64_t>(runs / globals[1]);

    eviction::report result;
    const std::int64_t per_head_target = cfg.head_target();
    for (std::int64_t u = 0; u < U; ++u) {
      const std::uint64_t* sums = p.sums + u * unit_sums;
      const auto held = static_cast<std::int64_t>(sums[0]), heads = static_cast<std::int64_t>(sums[1]);
      const auto protected_total = static_cast<std::int64_t>(sums[2]), floor_total = static_cast<std::int64_t>(sums[3]);
      const std::int64_t target = heads * per_head_target;
      unit_state& s = p.units[u];
      s = unit_state{};
      s.active = heads > 0 && held > target;
      if (!s.active) continue;
      s.pool = std::min(std::max<std::int64_t>(0, target - protected_total - floor_total) / unit_run,
                        static_cast<std::int64_t>(sums[4]));
      s.remaining = s.pool;
      ++result.units_evicted;
      if (protected_total + floor_total + s.pool * unit_run > target) ++result.units_over_target;
    }

    // C2..C5: the pool threshold, 8 bits a pass (eviction_detail::radix_threshold over all ranks).
    for (int pass = 0; pass < digit_passes; ++pass) {
      const int shift = 24 - 8 * pass;
      const std::uint32_t mask = pass == 0 ? 0u : ~0u << (shift + 8);
      std::fill(p.bins, p.bins + U * digit_bins, std::uint64_t{0});
      for (std::int64_t b = 0; b < batch && local > 0 && counted; ++b) {
        const context_type ctx = context(b);
        ctx.for_each_head([&](std::int64_t l, std::int64_t h) {
          const std::int64_t u = unit_of(b, l);
          if (p.units[u].pool <= 0) return;
          std::uint64_t* bins = p.bins + u * digit_bins;
          const std::uint32_t prefix = p.units[u].prefix;
          ctx.pool_candidates(l, h, p.floors[floor_index(b, l, h)], [&](std::uint32_t key) {
            if ((key & mask) == prefix) ++bins[(key >> shift) & 0xffu];
          });
        });
      }
      comm.all_reduce_sum(p.bins, static_cast<std::size_t>(U * digit_bins), stream);
      for (std::int64_t u = 0; u < U; ++u) {
        unit_state& s = p.units[u];
        if (s.pool <= 0) continue;
        const std::uint64_t* bins = p.bins + u * digit_bins;
        int digit = 255;
        for (; digit > 0 && static_cast<std::int64_t>(bins[digit]) < s.remaining; --digit)
          s.remaining -= static_cast<std::int64_t>(bins[digit]);
        s.prefix |= static_cast<std::uint32_t>(digit) << shift;
      }
    }

    // C6: pool candidates tied at v*, per (sequence, layer, layer head).
    const std::int64_t tie_count = batch * L * H;
    std::fill(p.ties, p.ties + tie_count, std::uint64_t{0});
    for (std::int64_t b = 0; b < batch && local > 0 && counted; ++b) {
      const context_type ctx = context(b);
      ctx.for_each_head([&](std::int64_t l, std::int64_t h) {
        const unit_state& s = p.units[unit_of(b, l)];
        if (s.pool <= 0) return;
        std::uint64_t& ties = p.ties[(b * L + l) * H + first + h];
        ctx.pool_candidates(l, h, p.floors[floor_index(b, l, h)], [&](std::uint32_t key) { ties += key == s.prefix; });
      });
    }
    comm.all_reduce_sum(p.ties, static_cast<std::size_t>(tie_count), stream);

    // Compaction of this rank's heads: a head keeps the ties its predecessors in the unit's
    // (layer, head) order leave of the unit's s.remaining.
    if (layers.empty()) return result;
    for (std::int64_t k = 0; k < L * layers[0].heads(); ++k) step_parts.new_length[k] = -1;  // −1: untouched
    for (std::int64_t b = 0; b < batch; ++b) {
      const context_type ctx = context(b);
      std::int64_t before = 0;  // ties of the unit's earlier heads
      for (std::int64_t l = 0; l < L; ++l) {
        if (!cross) before = 0;
        const unit_state& s = p.units[unit_of(b, l)];
        for (std::int64_t g = 0; g < H; ++g) {
          const auto ties = static_cast<std::int64_t>(p.ties[(b * L + l) * H + g]);
          const std::int64_t h = g - first;
          if (s.active && h >= 0 && h < local && !ctx.retrieval(l, h)) {
            const threshold pool_limit{s.prefix, std::clamp<std::int64_t>(s.remaining - before, 0, ties), s.pool <= 0};
            threshold_walk pool{pool_limit};
            ctx.compact(l, h, p.floors[floor_index(b, l, h)], pool, result);
          }
          before += ties;
        }
      }
    }
    for (std::int64_t l = 0; l < L; ++l)
      result.freed_pages += step::close_up(layers[static_cast<std::size_t>(l)], step_parts.new_length + l * layers[0].heads());
    return result;
  }
};

}  // namespace kvtrim::eviction_detail

namespace kvtrim {

/// Scratch the sharded kvtrim::evict needs on this rank (`layers`: its views, empty
/// on a rank without heads): O(batch · layers · (local + total heads) + units · 256).
template <class Backend, class View>
  requires std::same_as<Backend, backend::cpu>
std::size_t evict_workspace(std::span<const View> layers, const eviction::shard& shard) {
  return eviction_detail::sharded_step<Backend>::workspace_bytes(layers, shard);
}

/// One eviction step over this rank's kv heads of every layer (eviction/sharded.hpp):
/// the tokens the one-rank kvtrim::evict keeps over all ranks' heads. Every rank of
/// `comm` calls it with the same config and shard batch / layers / total_heads;
/// per_layer and cross_layer scopes make 6 collectives, per_head none.
template <class Backend, class View, comm::communicator<backend::host_stream> Comm>
  requires std::same_as<Backend, backend::cpu>
eviction::report evict(std::span<const View> layers, std::span<const eviction::metric_output<host_space>> metrics,
                       const eviction::config& cfg, const eviction::shard& shard, const Comm& comm, workspace scratch,
                       typename Backend::stream_type stream = {}) {
  return eviction_detail::sharded_step<Backend>::evict(layers, metrics, cfg, shard, comm, scratch, stream);
}

}  // namespace kvtrim
