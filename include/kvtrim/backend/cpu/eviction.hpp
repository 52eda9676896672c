// kvtrim/backend/cpu/eviction.hpp — CPU reference of decode-time eviction
// (eviction/evict.hpp: the math; eviction/metric.hpp: the metric).
//
// Four entry points:
//   kvtrim::evict<backend::cpu>(layers, metrics, cfg, workspace)   the eviction step
//   eviction::attend(queries, cache, out, metric, workspace)        decode attention + metric
//   eviction::flush_metric(cache, metric, workspace)                the one-step-late metric's pending step
//   eviction::seed_metric(keys, window_queries, cache, kept, …)     the prefill's metric
//
// The threshold is a radix select (radix_threshold below): four passes of a
// 256-bin histogram over an order-preserving 32-bit key of the metric (the
// CUDA select_top_k's key: NaN lowest, −0 = +0), each fixing 8 more bits of the
// k-th largest key v*, and how many candidates equal to v* are kept (the
// first ones in (head ordinal, token) order). Nothing is sorted and nothing
// is stored per token: the kept set is "key > v*, or key = v* among the first
// r", recomputed while compacting in the same order. Scratch: O(layers · heads).
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/decode_attention.hpp"
#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/eviction/evict.hpp"
#include "kvtrim/eviction/metric.hpp"
#include "kvtrim/layout/detail/storage.hpp"
#include "kvtrim/layout/flat.hpp"
#include "kvtrim/layout/paged.hpp"

namespace kvtrim::eviction_detail {

/// An order-preserving key of a metric value: larger key ranks first; NaN is
/// 0 (below −∞), −0 has +0's key (ranks_before calls them equal). The same map
/// as backend/cuda/select_top_k.cuh's rank_key.
inline std::uint32_t rank_key(float value) {
  if (value != value) return 0u;
  const std::uint32_t bits = value == 0.0f ? 0u : std::bit_cast<std::uint32_t>(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// The kept set of a top-`need` selection: every candidate with key > key, and
/// the first `ties` (in candidate order) with key == key. `none`: keep nothing.
struct threshold {
  std::uint32_t key = 0;
  std::int64_t ties = 0;
  bool none = true;
};

/// The threshold of the `need` largest keys among the candidates `visit`
/// enumerates (visit(callback) calls callback(key) once per candidate, in any
/// order); 0 ≤ need ≤ candidates. Four 8-bit histogram passes, most significant
/// digit first: after a pass the digits of v* fixed so far are `prefix`, and
/// `remaining` is how many of the kept candidates still share that prefix.
template <class Visit>
threshold radix_threshold(std::int64_t need, Visit&& visit) {
  if (need <= 0) return {};
  std::uint32_t prefix = 0, mask = 0;
  std::int64_t remaining = need;
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<std::int64_t, 256> histogram{};
    visit([&](std::uint32_t key) {
      if ((key & mask) == prefix) ++histogram[(key >> shift) & 0xffu];
    });
    int digit = 255;
    for (; digit > 0 && histogram[digit] < remaining; --digit) remaining -= histogram[digit];
    prefix |= static_cast<std::uint32_t>(digit) << shift;
    mask |= 0xffu << shift;
  }
  return {prefix, remaining, false};
}

/// Membership of candidates visited in candidate order (the tie counter is the state).
struct threshold_walk {
  threshold limit;
  std::int64_t ties_seen = 0;
  bool keeps(std::uint32_t key) {
    if (limit.none || key < limit.key) return false;
    if (key > limit.key) return true;
    return ties_seen++ < limit.ties;
  }
};

/// The step over heads sharded across ranks (eviction/sharded.hpp): it composes this
/// backend's per-head pieces with collectives between them.
template <class Backend>
struct sharded_step;

}  // namespace kvtrim::eviction_detail

namespace kvtrim {

template <>
struct implementation<eviction::step, backend::cpu> {
  static constexpr std::string_view function = "kvtrim::evict";
  template <class>
  friend struct eviction_detail::sharded_step;

  template <class View>
  static std::size_t workspace_bytes(std::span<const View> layers) {
    if (layers.empty()) return 0;
    workspace_carver carver;
    carve(carver, layers.size(), layers[0].heads());
    return carver.bytes();
  }

  template <class View>
  static eviction::report evict(std::span<const View> layers, std::span<const eviction::metric_output<host_space>> metrics,
                                const eviction::config& cfg, workspace scratch, backend::host_stream) {
    static_assert(View::layout_policy::ragged_heads,
                  "kvtrim::evict: eviction gives heads different lengths; use layout::paged or layout::flat");
    validate(layers, metrics, cfg, scratch);
    const std::int64_t layer_count = static_cast<std::int64_t>(layers.size());
    const View& first = layers[0];
    const std::int64_t kv_heads = first.shape.kv_heads;
    workspace_carver carver(scratch);
    const parts p = carve(carver, layers.size(), first.heads());

    eviction::report result;
    // Units: the heads one threshold is taken over, as ranges of (layer, h) of one sequence.
    struct unit_range {
      std::int64_t layer_begin, layer_end, head_begin, head_end;
    };
    for (std::int64_t k = 0; k < layer_count * first.heads(); ++k) p.new_length[k] = -1;  // −1: untouched
    for (std::int64_t b = 0; b < first.batch; ++b) {
      const auto run_unit = [&](unit_range unit) {
        unit_context<View> context{layers, metrics, cfg, p, b, unit.layer_begin, unit.layer_end, unit.head_begin,
                                   unit.head_end};
        context.run(result);
      };
      switch (cfg.scope) {
        case eviction::scope::cross_layer: run_unit({0, layer_count, 0, kv_heads}); break;
        case eviction::scope::per_layer:
          for (std::int64_t l = 0; l < layer_count; ++l) run_unit({l, l + 1, 0, kv_heads});
          break;
        case eviction::scope::per_head:
          for (std::int64_t l = 0; l < layer_count; ++l)
            for (std::int64_t h = 0; h < kv_heads; ++h) run_unit({l, l + 1, h, h + 1});
          break;
      }
    }
    for (std::int64_t l = 0; l < layer_count; ++l)
      result.freed_pages += close_up(layers[static_cast<std::size_t>(l)], p.new_length + l * first.heads());
    return result;
  }

 private:
  struct parts {
    std::int64_t* new_length = nullptr;          // [layers · heads]: −1 untouched
    eviction_detail::threshold* floors = nullptr;  // [layers · kv_heads]: one unit's floor thresholds
    std::int64_t* floor_count = nullptr;         // [layers · kv_heads]
  };
  static parts carve(workspace_carver& carver, std::size_t layers, std::int64_t heads) {
    parts p;
    const std::int64_t count = static_cast<std::int64_t>(layers) * heads;
    p.new_length = carver.take<std::int64_t>(count);
    p.floors = carver.take<eviction_detail::threshold>(count);
    p.floor_count = carver.take<std::int64_t>(count);
    return p;
  }

  template <class View>
  static void validate(std::span<const View> layers, std::span<const eviction::metric_output<host_space>> metrics,
                       const eviction::config& cfg, workspace scratch) {
    cfg.validate(function);
    if (layers.empty()) ::kvtrim::detail::fail(function, "layers", "at least one layer's cache", "none");
    if (metrics.size() != layers.size())
      ::kvtrim::detail::fail(function, "metrics", ::kvtrim::detail::cat("one metric per layer (", layers.size(), ")"),
                             std::to_string(metrics.size()));
    ::kvtrim::detail::check_workspace(function, scratch, workspace_bytes(layers));
    // A unit's target is (its heads) × head_target: at most every layer's heads (cross-layer).
    ::kvtrim::detail::checked_mul(function, "config.keep",
                                  static_cast<std::int64_t>(layers.size()) * layers[0].shape.kv_heads,
                                  std::max<std::int64_t>(cfg.head_target(), 0));
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const View& cache = layers[l];
      // Two layers on one cache (or one metric buffer) would compact against stale
      // lengths and free the same pages twice.
      for (std::size_t other = 0; other < l; ++other) {
        bool shared = false;
        if constexpr (requires { cache.indptr; }) shared = layers[other].indptr == cache.indptr;    // paged
        if constexpr (requires { cache.offsets; }) shared = layers[other].offsets == cache.offsets;  // flat
        if (shared)
          ::kvtrim::detail::fail(function, "layers", "a distinct cache per layer",
                                 ::kvtrim::detail::cat("layers ", other, " and ", l, " share their page tables / offsets"));
        if (metrics[other].values == metrics[l].values)
          ::kvtrim::detail::fail(function, "metrics", "a distinct metric buffer per layer",
                                 ::kvtrim::detail::cat("layers ", other, " and ", l, " share one"));
      }
      View::layout_policy::validate(function, cache, /*exclusive=*/true);
      if (cache.shape.kv_heads != layers[0].shape.kv_heads || cache.batch != layers[0].batch)
        ::kvtrim::detail::fail(function, "layers",
                               ::kvtrim::detail::cat("every layer with layer 0's batch ", layers[0].batch, " and ",
                                                     layers[0].shape.kv_heads, " kv heads"),
                               ::kvtrim::detail::cat("layer ", l, ": batch ", cache.batch, ", ", cache.shape.kv_heads,
                                                     " kv heads"));
      if (metrics[l].values == nullptr)
        ::kvtrim::detail::fail(function, "metrics", "a metric buffer for every layer",
                               ::kvtrim::detail::cat("null for layer ", l));
      eviction_detail::check_metric(function, metrics[l], ::kvtrim::detail::storage_slots(cache.storage));
      if (metrics[l].protected_window != cfg.protected_window)
        ::kvtrim::detail::fail(function, "metrics",
                               ::kvtrim::detail::cat("the protected window the eviction uses (config.protected_window = ",
                                                     cfg.protected_window, ")"),
                               ::kvtrim::detail::cat(metrics[l].protected_window, " for layer ", l));
    }
  }

  /// One unit: its heads, their candidates (tokens or runs), the thresholds, the compaction.
  template <class View>
  struct unit_context {
    std::span<const View> layers;
    std::span<const eviction::metric_output<host_space>> metrics;
    const eviction::config& cfg;
    const parts& p;
    std::int64_t b, layer_begin, layer_end, head_begin, head_end;

    std::int64_t kv_heads() const { return layers[0].shape.kv_heads; }
    bool retrieval(std::int64_t l, std::int64_t h) const {
      return cfg.retrieval_heads != nullptr && cfg.retrieval_heads[l * kv_heads() + h] != 0;
    }
    /// Calls fn(l, h) for the unit's heads in ordinal order (l·kv_heads + h), retrieval heads skipped.
    template <class Fn>
    void for_each_head(Fn&& fn) const {
      for (std::int64_t l = layer_begin; l < layer_end; ++l)
        for (std::int64_t h = head_begin; h < head_end; ++h)
          if (!retrieval(l, h)) fn(l, h);
    }

    /// A head as eviction sees it.
    struct head_ref {
      const View& cache;
      const float* metric;
      std::int64_t head, b, h, length, run, next;
      std::int64_t sinks, window;

      std::int64_t items() const { return (length + run - 1) / run; }
      bool token_protected(std::int64_t i) const {
        const std::int64_t slot = cache.slot(b, h, i);
        const std::int64_t position = cache.positions.slot_position[slot];
        return position < sinks || !eviction::outside_window(next, position, window) ||
               cache.compensation.index[head] == i ||
               eviction_detail::codec_pins(cache.storage, head, slot, i, length);
      }
      /// Tokens of item j: [j·run, min((j+1)·run, length)).
      std::int64_t item_end(std::int64_t j) const { return std::min((j + 1) * run, length); }
      bool item_protected(std::int64_t j) const {
        if (item_end(j) - j * run < run) return true;  // an incomplete run
        for (std::int64_t i = j * run; i < item_end(j); ++i)
          if (token_protected(i)) return true;
        return false;
      }
      std::uint32_t item_key(std::int64_t j) const {
        float sum = 0.0f;
        for (std::int64_t i = j * run; i < item_end(j); ++i) sum += metric[cache.slot(b, h, i)];
        return eviction_detail::rank_key(sum);
      }
      /// Tokens in protected items (the ones that stay whatever the threshold).
      std::int64_t protected_tokens() const {
        std::int64_t count = 0;
        for (std::int64_t j = 0; j < items(); ++j)
          if (item_protected(j)) count += item_end(j) - j * run;
        return count;
      }
    };
    head_ref ref(std::int64_t l, std::int64_t h) const {
      const View& cache = layers[static_cast<std::size_t>(l)];
      const std::int64_t head = b * cache.shape.kv_heads + h;
      return head_ref{cache,
                      metrics[static_cast<std::size_t>(l)].values,
                      head,
                      b,
                      h,
                      cache.head_length(b, h),
                      ::kvtrim::detail::storage_slot_run(cache.storage),
                      cache.positions.next_position[head],
                      cfg.sinks,
                      cfg.protected_window};
    }
    std::int64_t slot_index(std::int64_t l, std::int64_t h) const { return l * kv_heads() + h; }

    // The per-head pieces of a unit's step (run below; eviction/sharded.hpp composes the
    // same pieces with collectives between them when a unit's heads span ranks).

    /// Head (l, h)'s floor: its best `items` candidates, whatever the pool does.
    struct head_floor {
      eviction_detail::threshold limit;
      std::int64_t items = 0, protected_tokens = 0, candidates = 0, run = 1;
    };
    head_floor floor_of(std::int64_t l, std::int64_t h) const {
      const head_ref r = ref(l, h);
      head_floor f;
      f.run = r.run;
      f.protected_tokens = r.protected_tokens();
      for (std::int64_t j = 0; j < r.items(); ++j) f.candidates += r.item_protected(j) ? 0 : 1;
      const std::int64_t room = std::max<std::int64_t>(0, cfg.head_target() - f.protected_tokens);
      f.items = cfg.scope == eviction::scope::per_head
                    ? room / r.run
                    : static_cast<std::int64_t>(std::floor(cfg.alpha * static_cast<double>(room))) / r.run;
      if (f.protected_tokens == 0) f.items = std::max<std::int64_t>(f.items, 1);  // never an empty head
      f.items = std::min(f.items, f.candidates);
      f.limit = eviction_detail::radix_threshold(f.items, [&](auto&& take) {
        for (std::int64_t j = 0; j < r.items(); ++j)
          if (!r.item_protected(j)) take(r.item_key(j));
      });
      return f;
    }

    /// take(key) for head (l, h)'s pool candidates (unprotected, not in its floor), in token order.
    template <class Take>
    void pool_candidates(std::int64_t l, std::int64_t h, const eviction_detail::threshold& floor_limit,
                         Take&& take) const {
      const head_ref r = ref(l, h);
      eviction_detail::threshold_walk floor{floor_limit};
      for (std::int64_t j = 0; j < r.items(); ++j) {
        if (r.item_protected(j)) continue;
        const std::uint32_t key = r.item_key(j);
        if (!floor.keeps(key)) take(key);
      }
    }

    /// Compacts head (l, h) to its protected items and the candidates its floor or the
    /// pool keeps (eviction/evict.hpp, "Layouts"): the protected tail (the longest run of
    /// protected items at the end, the recent window among them) and the kept items before
    /// it that already lie below K (the kept count before the tail) stay; the kept items at
    /// K or later fill the holes below K in order; the tail shifts down to follow. Token
    /// order is not kept. `floor_limit` is the head's floor threshold, `pool` the pool's walk
    /// as it reaches this head (its tie counter continues across the unit's heads; the
    /// sharded step passes a walk of this head's own tie share). The keep decisions are the
    /// walks', so each pass over the head restarts from copies of their state at its first
    /// item; `pool` leaves as the counting pass leaves it. Returns the tokens it keeps.
    std::int64_t compact(std::int64_t l, std::int64_t h, const eviction_detail::threshold& floor_limit,
                         eviction_detail::threshold_walk& pool, eviction::report& result) const {
      const head_ref r = ref(l, h);
      const eviction_detail::threshold_walk floor_start{floor_limit};
      const eviction_detail::threshold_walk pool_start = pool;
      float* metric = metrics[static_cast<std::size_t>(l)].values;
      // A cursor over the head's items before the tail: keeps() decides item j and moves on.
      struct cursor {
        const head_ref& r;
        eviction_detail::threshold_walk floor, pool;
        std::int64_t j = 0;
        bool keeps() {
          const bool keep = r.item_protected(j) || [&] {
            const std::uint32_t key = r.item_key(j);
            return floor.keeps(key) || pool.keeps(key);
          }();
          ++j;
          return keep;
        }
      };
      const std::int64_t items = r.items();
      std::int64_t tail = items;  // first item of the protected tail
      while (tail > 0 && r.item_protected(tail - 1)) --tail;
      cursor count{r, floor_start, pool_start};
      std::int64_t kept = 0;  // K: kept items before the tail
      while (count.j < tail) kept += count.keeps() ? 1 : 0;
      pool = count.pool;  // the unit's walk continues after this head
      cursor holes{r, floor_start, pool_start}, movers{r, floor_start, pool_start};
      while (movers.j < kept) movers.keeps();  // the movers' cursor starts at item K
      std::int32_t new_compensation = -1;
      const std::int32_t compensation = r.cache.compensation.index[r.head];
      const auto move_item = [&](std::int64_t from, std::int64_t to) {  // item → item, token by token
        for (std::int64_t k = 0; k < r.item_end(from) - from * r.run; ++k) {
          const std::int64_t i = from * r.run + k, destination = to * r.run + k;
          if (i == compensation) new_compensation = static_cast<std::int32_t>(destination);
          if (destination != i) move_token(r.cache, metric, r.head, r.cache.slot(b, h, i), r.cache.slot(b, h, destination));
        }
      };
      for (std::int64_t j = 0; j < kept; ++j)  // the stayers: only the compensation index to note
        if (compensation >= j * r.run && compensation < r.item_end(j)) new_compensation = compensation;
      while (movers.j < tail) {
        const std::int64_t from = movers.j;
        if (!movers.keeps()) continue;
        while (holes.keeps()) {}  // the next hole below K (there are as many as movers)
        move_item(from, holes.j - 1);
      }
      for (std::int64_t j = tail; j < items; ++j) move_item(j, kept + (j - tail));
      const std::int64_t write = kept * r.run + (r.length - tail * r.run);
      for (std::int64_t i = write; i < r.length; ++i) metric[r.cache.slot(b, h, i)] = 0.0f;  // free slots read 0
      r.cache.compensation.index[r.head] = new_compensation;
      p.new_length[l * layers[0].heads() + r.head] = write;
      result.evicted_tokens += r.length - write;
      return write;
    }

    void run(eviction::report& result) const {
      const std::int64_t per_head_target = cfg.head_target();
      std::int64_t held = 0, unit_heads = 0, protected_total = 0, run = 1;
      for_each_head([&](std::int64_t l, std::int64_t h) {
        const head_ref r = ref(l, h);
        held += r.length;
        ++unit_heads;
        run = std::max(run, r.run);
      });
      const std::int64_t target = unit_heads * per_head_target;
      if (unit_heads == 0 || held <= target) return;
      ++result.units_evicted;

      // Floors: each head's best candidates it keeps whatever the pool does.
      std::int64_t floor_total = 0, candidates_left = 0;
      for_each_head([&](std::int64_t l, std::int64_t h) {
        const head_floor f = floor_of(l, h);
        p.floors[slot_index(l, h)] = f.limit;
        p.floor_count[slot_index(l, h)] = f.items;
        protected_total += f.protected_tokens;
        floor_total += f.items * f.run;
        candidates_left += f.candidates - f.items;
      });

      // The pool: the best of the remaining candidates of every head of the unit.
      const std::int64_t pool_tokens = cfg.scope == eviction::scope::per_head
                                           ? 0
                                           : std::max<std::int64_t>(0, target - protected_total - floor_total);
      const std::int64_t pool = std::min(pool_tokens / run, candidates_left);
      const eviction_detail::threshold pool_limit = eviction_detail::radix_threshold(pool, [&](auto&& take) {
        for_each_head([&](std::int64_t l, std::int64_t h) { pool_candidates(l, h, p.floors[slot_index(l, h)], take); });
      });

      // Compaction, head by head (compact() above), in the walks' order: the tie counters are
      // their state, in (head ordinal, item) order.
      eviction_detail::threshold_walk pool_walk{pool_limit};
      std::int64_t kept_total = 0;
      for_each_head([&](std::int64_t l, std::int64_t h) {
        kept_total += compact(l, h, p.floors[slot_index(l, h)], pool_walk, result);
      });
      if (kept_total > target) ++result.units_over_target;
    }
  };

  /// Moves one stored token (as stored, codec::move_slot), its position and its metric.
  template <class View>
  static void move_token(const View& cache, float* metric, std::int64_t head, std::int64_t from, std::int64_t to) {
    codec::move_slot<typename View::codec>(cache.storage, head, from, to, cache.positions.slot_position[from]);
    cache.positions.slot_position[to] = cache.positions.slot_position[from];
    metric[to] = metric[from];
  }

  /// Sets the layer's head lengths to new_length (−1: unchanged) after the tokens moved.
  /// paged: whole pages past a head's new length go back to the free list, in head
  /// order then page-table order, and the tables close up. Returns the pages freed.
  template <class CodecT>
  static std::int64_t close_up(const layout::paged::view<CodecT, host_space>& cache, const std::int64_t* new_length) {
    std::int64_t freed = 0, write = 0, old_end = 0;
    for (std::int64_t head = 0; head < cache.heads(); ++head) {
      const std::int64_t old_begin = old_end;
      old_end = cache.indptr[head + 1];
      const std::int64_t old_length =
          old_end == old_begin ? 0 : (old_end - old_begin - 1) * cache.page_size + cache.last_page_len[head];
      const std::int64_t length = new_length[head] < 0 ? old_length : new_length[head];
      const std::int64_t pages = layout::paged::pages_for(length, cache.page_size);
      for (std::int64_t k = old_begin + pages; k < old_end; ++k) {
        cache.free_pages[(*cache.free_count)++] = cache.indices[k];
        ++freed;
      }
      for (std::int64_t k = old_begin; k < old_begin + pages; ++k) cache.indices[write++] = cache.indices[k];
      cache.indptr[head + 1] = static_cast<std::int32_t>(write);
      cache.last_page_len[head] = static_cast<std::int32_t>(length == 0 ? 0 : (length - 1) % cache.page_size + 1);
    }
    return freed;
  }
  /// flat: in place; the regions keep their offsets.
  template <class CodecT>
  static std::int64_t close_up(const layout::flat::view<CodecT, host_space>& cache, const std::int64_t* new_length) {
    for (std::int64_t head = 0; head < cache.heads(); ++head)
      if (new_length[head] >= 0) cache.lengths[head] = new_length[head];
    return 0;
  }
};

/// The scratch kvtrim::evict needs for these layers' caches.
template <class Backend, class View>
  requires std::same_as<Backend, backend::cpu>
std::size_t evict_workspace(std::span<const View> layers) {
  return implementation<eviction::step, Backend>::workspace_bytes(layers);
}

/// One eviction step over `layers` (one cache view per layer, the same batch and
/// kv heads) and their metrics (one per layer, indexed by slot): see eviction/evict.hpp.
template <class Backend, class View>
  requires std::same_as<Backend, backend::cpu>
eviction::report evict(std::span<const View> layers, std::span<const eviction::metric_output<host_space>> metrics,
                       const eviction::config& cfg, workspace scratch, typename Backend::stream_type stream = {}) {
  return implementation<eviction::step, Backend>::evict(layers, metrics, cfg, scratch, stream);
}

namespace eviction {

/// Scratch eviction::attend needs (decode attention's plus the logits the metric is computed from).
template <class View>
  requires std::same_as<typename View::space, host_space>
std::size_t attend_workspace(const View& cache, const metric_output<host_space>& metric) {
  return implementation<stage::decode_attention, backend::cpu>::workspace_bytes(cache, metric);
}

/// scheme::attend plus the eviction metric (eviction/metric.hpp): out as attend
/// computes it, and metric.values[slot] += c_i for every token older than the
/// protected window. The cache's tables are validated as attend validates them.
template <class View, class QueryT, class OutT>
  requires std::same_as<typename View::space, host_space>
void attend(tensor_view<QueryT, 3> queries, const View& cache, tensor_view<OutT, 3> out,
            const metric_output<host_space>& metric, workspace scratch, backend::host_stream stream = {}) {
  constexpr std::string_view function = "kvtrim::eviction::attend";
  View::layout_policy::validate(function, cache);
  const model_shape& shape = cache.shape;
  ::kvtrim::detail::check_view(function, "queries", queries, {cache.batch, shape.q_heads, shape.head_dim}, true);
  ::kvtrim::detail::check_view(function, "out", out, {cache.batch, shape.q_heads, shape.head_dim}, true);
  eviction_detail::check_metric(function, metric, ::kvtrim::detail::storage_slots(cache.storage));
  if (metric.enabled()) eviction_detail::check_metric_group(function, cache.shape);
  ::kvtrim::detail::check_workspace(function, scratch, attend_workspace(cache, metric));
  const tensor_view<const std::remove_const_t<QueryT>, 3> const_queries{queries.data, queries.extents, queries.strides};
  implementation<stage::decode_attention, backend::cpu>::attend(const_queries, cache, out, scratch, stream, metric);
}

/// The one-step-late metric's pending step (metric.carry, eviction/metric.hpp): adds the
/// previous decode step's c_i to metric.values for every head that has one pending and
/// clears it (carry.next = 0), so that an eviction sees every step. The keys are read
/// once more (the cost of one decode step's key pass). Scratch: attend_workspace's.
template <class View>
  requires std::same_as<typename View::space, host_space>
void flush_metric(const View& cache, const metric_output<host_space>& metric, workspace scratch,
                  backend::host_stream = {}) {
  constexpr std::string_view function = "kvtrim::eviction::flush_metric";
  View::layout_policy::validate(function, cache);
  eviction_detail::check_metric(function, metric, ::kvtrim::detail::storage_slots(cache.storage));
  if (!metric.deferred())
    ::kvtrim::detail::fail(function, "metric", "a metric buffer with its carry (one step late)",
                           metric.enabled() ? "no carry (immediate mode: nothing is pending)" : "no metric buffer");
  eviction_detail::check_metric_group(function, cache.shape);
  ::kvtrim::detail::check_workspace(function, scratch, attend_workspace(cache, metric));
  implementation<stage::decode_attention, backend::cpu>::flush_metric(cache, scratch, metric);
}

/// The prefill's metric (vllm-kvcompress seeds it from the last queries of the
/// prompt): every slot of `metric` is set to 0, then for each kept token i of
/// head (b, h) — prefill token t = kept.tokens[kept.offsets[head] + i] at
/// position start_position + t, older than the protected window —
///   metric[slot(i)] = factor · Σ_{window queries q} Σ_g term(p_gq(t)),
/// p the causal softmax of window query q (at position T − w + q) over all T
/// prefill keys, exactly the probabilities score::snapkv's window attention
/// takes (backend/cpu/attention_mass.hpp's arithmetic: l = (q·k)/√D, max, exp,
/// sum left to right). The compensation token (RazorAttention) is seeded 0. With a
/// carry (one step late) every head's pending step is dropped (carry.next = 0).
/// `kept` is the selection compress wrote (compress_options); the cache is the
/// one it filled. `sequence_lengths`: the ones compress took (a right-padded batch,
/// compress_options::sequence_lengths; null: every sequence has all T): sequence b's
/// window queries sit at the end of its own T_b tokens, and only those are read.
/// This is a second pass over the window (O(B·Hq·w·T·D), the scorer's cost):
/// handing the scorer's probabilities over needs a hook in scheme::compress
/// (docs/eviction.md).
template <class View, class KeyT, class QueryT>
  requires std::same_as<typename View::space, host_space>
void seed_metric(const kv_view<const KeyT>& keys, const window_view<const QueryT>& window_queries, const View& cache,
                 const selection_view<host_space>& kept, std::int64_t start_position,
                 const metric_output<host_space>& metric, const std::int64_t* sequence_lengths = nullptr) {
  constexpr std::string_view function = "kvtrim::eviction::seed_metric";
  const model_shape& shape = cache.shape;
  const std::int64_t tokens = keys.extent(2), observed = window_queries.extent(2);
  ::kvtrim::detail::check_view(function, "keys", keys, {cache.batch, shape.kv_heads, -1, shape.head_dim}, true);
  ::kvtrim::detail::check_view(function, "window_queries", window_queries,
                               {cache.batch, shape.q_heads, -1, shape.head_dim}, true);
  if (observed < 1 || observed > tokens)
    ::kvtrim::detail::fail(function, "window_queries", ::kvtrim::detail::cat("1 to ", tokens, " observed queries"),
                           std::to_string(observed));
  // Sequence b's prompt: its first prompt(b) tokens.
  const auto prompt = [&](std::int64_t b) { return sequence_lengths != nullptr ? sequence_lengths[b] : tokens; };
  eviction_detail::check_seed_lengths(function, sequence_lengths, cache.batch, observed, tokens);
  View::layout_policy::validate(function, cache);
  if (metric.values == nullptr) ::kvtrim::detail::fail(function, "metric", "a metric buffer", "null");
  eviction_detail::check_metric(function, metric, ::kvtrim::detail::storage_slots(cache.storage));
  if (kept.offsets == nullptr || kept.tokens == nullptr)
    ::kvtrim::detail::fail(function, "kept", "the selection's offsets and tokens", "null");
  if (kept.heads != cache.heads())
    ::kvtrim::detail::fail(function, "kept", ::kvtrim::detail::cat("a selection over ", cache.heads(), " heads"),
                           std::to_string(kept.heads));
  for (std::int64_t head = 0; head < cache.heads(); ++head)
    if (kept.count(head) != cache.head_length(head / shape.kv_heads, head % shape.kv_heads))
      ::kvtrim::detail::fail(function, "kept", "the selection the cache was compressed with",
                             ::kvtrim::detail::cat(kept.count(head), " tokens for head ", head, ", the cache holds ",
                                                   cache.head_length(head / shape.kv_heads, head % shape.kv_heads)));
  if (cache.heads() > 0 && kept.offsets[0] < 0)  // counts match the cache's lengths (≥ 0): offsets ascend from here
    ::kvtrim::detail::fail(function, "kept", "offsets from 0 or more", std::to_string(kept.offsets[0]));
  for (std::int64_t head = 0; head < cache.heads(); ++head)
    for (std::int64_t i = kept.offsets[head]; i < kept.offsets[head + 1]; ++i)
      if (kept.tokens[i] < 0 || kept.tokens[i] >= prompt(head / shape.kv_heads))
        ::kvtrim::detail::fail(function, "kept",
                               ::kvtrim::detail::cat("tokens in [0, ", prompt(head / shape.kv_heads), ")"),
                               ::kvtrim::detail::cat(kept.tokens[i], " for head ", head));
  std::fill_n(metric.values, ::kvtrim::detail::storage_slots(cache.storage), 0.0f);
  // A new prefill: no decode step of the tokens it replaced is pending (one step late).
  if (metric.carry.next != nullptr) std::fill_n(metric.carry.next, cache.heads(), std::int64_t{0});

  const std::int64_t group = shape.group_size(), head_dim = shape.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const float factor = metric_group_factor(metric.kind, group);
  std::array<float, max_head_dim> query{};
  for (std::int64_t b = 0; b < cache.batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
      const std::int64_t head = b * shape.kv_heads + h;
      const std::int64_t next = cache.positions.next_position[head];
      const std::int64_t count = kept.count(head);
      // logits of one (query head, window query) row, then its terms for the kept tokens
      for (std::int64_t g = 0; g < group; ++g)
        for (std::int64_t q = 0; q < observed; ++q) {
          for (std::int64_t d = 0; d < head_dim; ++d) query[d] = to_float(window_queries(b, h * group + g, q, d));
          const std::int64_t visible = prompt(b) - observed + q + 1;
          float max_logit = -std::numeric_limits<float>::infinity(), denominator = 0.0f;
          const auto logit = [&](std::int64_t j) {
            float dot = 0.0f;
            for (std::int64_t d = 0; d < head_dim; ++d) dot += query[d] * to_float(keys(b, h, j, d));
            return dot * scale;
          };
          for (std::int64_t j = 0; j < visible; ++j) max_logit = std::fmax(max_logit, logit(j));
          for (std::int64_t j = 0; j < visible; ++j) denominator += std::exp(logit(j) - max_logit);
          for (std::int64_t i = 0; i < count; ++i) {
            const std::int64_t t = kept.tokens[kept.offsets[head] + i];
            if (t >= visible || cache.compensation.index[head] == i) continue;
            if (!outside_window(next, start_position + t, metric.protected_window)) continue;
            const float probability = std::exp(logit(t) - max_logit) / denominator;
            metric.values[cache.slot(b, h, i)] += metric_term(metric.kind, probability) * factor;
          }
        }
    }
}

}  // namespace eviction
}  // namespace kvtrim
