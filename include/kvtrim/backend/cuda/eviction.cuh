// kvtrim/backend/cuda/eviction.cuh — the eviction metric on the GPU: decode
// attention's side output (eviction/metric.hpp has the math).
//
// The decode kernel is split-K: a token's probability p_gi = 2^(s_gi − lse_g)
// is known only after the partial softmax states of the head are merged. So
// the attention kernel writes each logit s_gi (base 2, the very float its
// softmax uses) to the workspace by slot, finish_segment / the merge write each
// head's final lse_g, and accumulate_decode_metric below — one more dependent
// launch, reading 4·G bytes of logits, the position and the metric of each
// token, never K or V — adds c_i to metric[slot] for tokens older than the
// protected window. Same rule and formulas as the CPU reference
// (backend/cpu/decode_attention.hpp): the difference is fp32 rounding of
// exp2 in base 2 against exp in base e (tests/cuda/eviction_test.cu bounds it).
//
// The eviction step (kvtrim::evict<backend::cuda>, below): the CPU reference's
// math and order exactly (eviction/evict.hpp), for codec::plain (fp16, bf16,
// fp32: no slot runs, no side buffers) over paged and flat caches, with no host
// synchronisation: one block per unit walks the unit's heads in ordinal order,
// in chunks of tokens — the radix threshold's histograms in shared memory, the
// tie ranks by cub::BlockScan, the moves staged through shared memory (a
// token only moves to a lower index, so a chunk is read whole before it is
// written) — then one block per layer closes the page tables up and pushes the
// freed pages on the device free list in the CPU's order (head order, page-table
// order). Correctness first: one block per unit does not use the whole GPU for
// cross-layer units (docs/eviction.md).
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <type_traits>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/decode_attention.cuh"
#include "kvtrim/backend/cuda/decode_plan.cuh"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/eviction/evict.hpp"
#include "kvtrim/eviction/metric.hpp"
#include "kvtrim/layout/detail/storage.hpp"

namespace kvtrim::cuda_detail {

inline constexpr int metric_threads = 256;

/// metric[slot(i)] += factor · Σ_g term(2^(s_gi − lse_g)) for every token i of
/// head blockIdx.y older than the protected window (grid-stride over tokens).
template <int Group, class View>
__global__ void __launch_bounds__(metric_threads)
    accumulate_decode_metric(const __grid_constant__ View cache, decode_metric side, float* metric,
                             eviction::metric_kind kind, std::int64_t window, int page_shift,
                             std::int64_t uniform_length) {
  wait_for_prerequisite_grid();  // the attention kernel's logits and the merge's lse
  const std::int64_t head = blockIdx.y;
  const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
  std::int64_t length = uniform_length;  // contiguous: its one host-known length
  if constexpr (!is_contiguous_view<View>) length = cache.head_length(b, h);
  const std::int64_t next = cache.positions.next_position[head];
  const auto rows = head_rows(cache, head, page_shift);
  float lse[Group];
#pragma unroll
  for (int g = 0; g < Group; ++g) lse[g] = side.lse[head * Group + g];
  const float factor = eviction::metric_group_factor(kind, Group);
  for (std::int64_t i = std::int64_t{blockIdx.x} * metric_threads + threadIdx.x; i < length;
       i += std::int64_t{gridDim.x} * metric_threads) {
    const std::int64_t slot = rows.slot(i);
    // Loads first, the window test after: the loads do not wait for the position.
    const std::int64_t position = cache.positions.slot_position[slot];
    float logits[Group];
#pragma unroll
    for (int g = 0; g < Group; ++g) logits[g] = side.logits[g * side.stride + slot];
    const float old = metric[slot];
    if (!eviction::outside_window(next, position, window)) continue;
    float sum = 0.0f;
#pragma unroll
    for (int g = 0; g < Group; ++g) sum += eviction::metric_term(kind, exp2f(logits[g] - lse[g]));
    metric[slot] = old + sum * factor;
  }
}

}  // namespace kvtrim::cuda_detail

namespace kvtrim::eviction {

/// Scratch eviction::attend needs on the device: decode attention's, the logits
/// ([group][slots] floats) and the heads' lse ([heads · group] floats).
template <class View>
  requires std::same_as<typename View::space, device_space>
std::size_t attend_workspace(const View& cache, const metric_output<device_space>& metric) {
  workspace_carver carver;
  carver.take<std::byte>(static_cast<std::int64_t>(
      implementation<stage::decode_attention, backend::cuda>::workspace_bytes(cache)));
  if (metric.enabled()) {
    carver.take<float>(cache.shape.group_size() * ::kvtrim::detail::storage_slots(cache.storage));
    carver.take<float>(cache.heads() * cache.shape.group_size());
  }
  return carver.bytes();
}

/// Decode attention plus the eviction metric (eviction/metric.hpp), on `stream`:
/// no host synchronisation, capturable in a CUDA graph.
template <class View, class QueryT, class OutT>
  requires std::same_as<typename View::space, device_space>
void attend(tensor_view<QueryT, 3, device_space> queries, const View& cache, tensor_view<OutT, 3, device_space> out,
            const metric_output<device_space>& metric, workspace scratch, cudaStream_t stream) {
  constexpr std::string_view function = "kvtrim::eviction::attend";
  View::layout_policy::check(function, cache);
  const model_shape& shape = cache.shape;
  ::kvtrim::detail::check_view(function, "queries", queries, {cache.batch, shape.q_heads, shape.head_dim}, true);
  ::kvtrim::detail::check_view(function, "out", out, {cache.batch, shape.q_heads, shape.head_dim}, true);
  eviction_detail::check_metric(function, metric, ::kvtrim::detail::storage_slots(cache.storage));
  ::kvtrim::detail::check_workspace(function, scratch, attend_workspace(cache, metric));
  if (cache.heads() > 65535)
    ::kvtrim::detail::fail(function, "cache", "at most 65535 (sequence, kv head) pairs with a metric on backend::cuda",
                           std::to_string(cache.heads()));

  workspace_carver carver(scratch);
  const std::size_t attention_bytes = implementation<stage::decode_attention, backend::cuda>::workspace_bytes(cache);
  std::byte* attention_scratch = carver.take<std::byte>(static_cast<std::int64_t>(attention_bytes));
  cuda_detail::decode_metric side{};
  if (metric.enabled()) {
    side.stride = ::kvtrim::detail::storage_slots(cache.storage);
    side.logits = carver.take<float>(shape.group_size() * side.stride);
    side.lse = carver.take<float>(cache.heads() * shape.group_size());
  }
  const tensor_view<const std::remove_const_t<QueryT>, 3, device_space> const_queries{queries.data, queries.extents,
                                                                                       queries.strides};
  implementation<stage::decode_attention, backend::cuda>::attend(const_queries, cache, out,
                                                                 workspace{attention_scratch, attention_bytes}, stream,
                                                                 side);
  if (!metric.enabled()) return;
  int page_shift = -1;
  if constexpr (cuda_detail::is_paged_view<View>) page_shift = cuda_detail::power_of_two_shift(cache.page_size);
  std::int64_t uniform_length = -1;
  if constexpr (cuda_detail::is_contiguous_view<View>) uniform_length = *cache.length;
  // About eight resident waves of threads over all heads: each thread's few tokens are a chain
  // of dependent loads (page table → slot → position, logits, metric), so parallelism hides them.
  const unsigned blocks_per_head = static_cast<unsigned>(std::clamp<std::int64_t>(
      16 * backend::cuda::multiprocessor_count() / std::max<std::int64_t>(cache.heads(), 1), 1, 1024));
  cuda_detail::dispatch_decode_group(shape.group_size(), function, [&](auto group_constant) {
    constexpr int group = decltype(group_constant)::value;
    cuda_detail::launch_dependent(cuda_detail::accumulate_decode_metric<group, View>,
                                  dim3(blocks_per_head, static_cast<unsigned>(cache.heads())),
                                  dim3(cuda_detail::metric_threads), 0, stream, function, "accumulate_decode_metric",
                                  cache, side, metric.values, metric.kind, metric.protected_window, page_shift,
                                  uniform_length);
  });
}

}  // namespace kvtrim::eviction

// ---- the eviction step ------------------------------------------------------

namespace kvtrim::cuda_detail {

inline constexpr int evict_threads = 256;
/// Tokens moved per staged chunk (their K/V rows go through shared memory).
inline constexpr int evict_stage_tokens = 32;

/// Every layer's view and metric, by value (kernel parameters, up to ~31 KB).
template <class View>
struct evict_layer_set {
  static constexpr int capacity = static_cast<int>(30000 / (sizeof(View) + sizeof(float*)));
  View views[capacity];
  float* metrics[capacity];
  int count = 0;
};

struct evict_settings {
  int scope = 2;
  std::int64_t head_target = 0, sinks = 0, window = 0;
  double alpha = 0.0;
  const std::uint8_t* retrieval = nullptr;  // device [layers · kv_heads] or null
  std::int64_t kv_heads = 0, batch = 0, heads_per_layer = 0;
};

/// The eviction step's device scratch: O(layers · heads).
struct evict_scratch {
  std::uint32_t* floor_key = nullptr;   // [layers · kv_heads] (one unit at a time per sequence: indexed l·kv_heads + h
  std::int64_t* floor_ties = nullptr;   //  within the sequence's own block, so per sequence: [batch · layers · kv_heads])
  std::int8_t* floor_none = nullptr;
  std::int64_t* new_length = nullptr;   // [layers · heads_per_layer], −1: untouched
  eviction::report* report = nullptr;   // [1], accumulated with atomics

  template <class Carver>
  static evict_scratch carve(Carver& carver, std::int64_t layers, std::int64_t heads_per_layer) {
    evict_scratch s;
    const std::int64_t count = layers * heads_per_layer;
    s.floor_key = carver.template take<std::uint32_t>(count);
    s.floor_ties = carver.template take<std::int64_t>(count);
    s.floor_none = carver.template take<std::int8_t>(count);
    s.new_length = carver.template take<std::int64_t>(count);
    s.report = carver.template take<eviction::report>(1);
    return s;
  }
};

__device__ __forceinline__ std::uint32_t evict_rank_key(float value) {
  if (isnan(value)) return 0u;
  const std::uint32_t bits = value == 0.0f ? 0u : __float_as_uint(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// One head of a unit as the walks see it.
template <class View>
struct evict_head {
  const View* cache;
  float* metric;
  std::int64_t layer, head, length, next, compensation, scratch_index;
  __device__ __forceinline__ std::int64_t slot(std::int64_t i) const {
    return cache->slot(head / cache->shape.kv_heads, head % cache->shape.kv_heads, i);
  }
};

template <class View>
struct evict_block_state {
  using scan = cub::BlockScan<std::int64_t, evict_threads>;
  typename scan::TempStorage scan_storage;
  unsigned histogram[256];
  std::uint32_t prefix, mask;
  std::int64_t remaining;
  std::int64_t stage_slot[evict_stage_tokens];  // the staged chunk's kept tokens: old slots, then new ones
};

template <class View, class Storage>
__device__ void evict_unit(const evict_layer_set<View>& set, const evict_settings& settings, const evict_scratch& scratch,
                           Storage& shared, unsigned char* stage, std::int64_t b, std::int64_t l0, std::int64_t l1,
                           std::int64_t h0, std::int64_t h1) {
  using scan = typename Storage::scan;
  const int tid = threadIdx.x;
  const auto head_at = [&](std::int64_t l, std::int64_t h) {
    const View& cache = set.views[l];
    const std::int64_t head = b * settings.kv_heads + h;
    return evict_head<View>{&cache, set.metrics[l], l, head, cache.head_length(b, h),
                            cache.positions.next_position[head], cache.compensation.index[head],
                            b * set.count * settings.kv_heads + l * settings.kv_heads + h};
  };
  const auto retrieval = [&](std::int64_t l, std::int64_t h) {
    return settings.retrieval != nullptr && settings.retrieval[l * settings.kv_heads + h] != 0;
  };
  const auto token_protected = [&](const evict_head<View>& r, std::int64_t i, std::int64_t slot) {
    const std::int64_t position = r.cache->positions.slot_position[slot];
    return position < settings.sinks || r.next - position <= settings.window || r.compensation == i;
  };
  // A block-wide sum (every thread gets it).
  const auto block_sum = [&](std::int64_t value) {
    std::int64_t total = 0, before = 0;
    scan(shared.scan_storage).ExclusiveSum(value, before, total);
    __syncthreads();
    return total;
  };

  std::int64_t held = 0, unit_heads = 0;
  for (std::int64_t l = l0; l < l1; ++l)
    for (std::int64_t h = h0; h < h1; ++h)
      if (!retrieval(l, h)) {
        held += set.views[l].head_length(b, h);
        ++unit_heads;
      }
  const std::int64_t target = unit_heads * settings.head_target;
  if (unit_heads == 0 || held <= target) return;
  if (tid == 0) atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->units_evicted), 1ull);

  // Radix threshold over whatever `for_each_key(take)` enumerates (every thread calls take for its own keys).
  const auto radix_threshold = [&](std::int64_t need, auto&& for_each_key, std::uint32_t& key, std::int64_t& ties,
                                   bool& none) {
    none = need <= 0;
    if (none) return;
    if (tid == 0) shared.prefix = 0, shared.mask = 0, shared.remaining = need;
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int k = tid; k < 256; k += evict_threads) shared.histogram[k] = 0;
      __syncthreads();
      const std::uint32_t prefix = shared.prefix, mask = shared.mask;
      for_each_key([&](std::uint32_t candidate) {
        if ((candidate & mask) == prefix) atomicAdd(&shared.histogram[(candidate >> shift) & 0xffu], 1u);
      });
      __syncthreads();
      if (tid == 0) {
        std::int64_t remaining = shared.remaining;
        int digit = 255;
        for (; digit > 0 && std::int64_t{shared.histogram[digit]} < remaining; --digit) remaining -= shared.histogram[digit];
        shared.remaining = remaining;
        shared.prefix |= static_cast<std::uint32_t>(digit) << shift;
        shared.mask |= 0xffu << shift;
      }
      __syncthreads();
    }
    key = shared.prefix;
    ties = shared.remaining;
    __syncthreads();
  };

  // Walks head r's tokens in order, `chunk` at a time (chunk ≤ evict_threads): fn(i, valid, candidate, key,
  // floor_kept) on every thread for its token of the chunk (floor_kept: among the head's floor, by tie rank).
  const auto walk = [&](const evict_head<View>& r, int chunk, auto&& fn) {
    const bool floor_none = scratch.floor_none[r.scratch_index] != 0;
    const std::uint32_t floor_key = scratch.floor_key[r.scratch_index];
    const std::int64_t floor_ties = scratch.floor_ties[r.scratch_index];
    std::int64_t floor_seen = 0;
    for (std::int64_t c0 = 0; c0 < r.length; c0 += chunk) {
      const std::int64_t i = c0 + tid;
      const bool valid = tid < chunk && i < r.length;
      const std::int64_t slot = valid ? r.slot(i) : 0;
      const bool candidate = valid && !token_protected(r, i, slot);
      const std::uint32_t key = candidate ? evict_rank_key(r.metric[slot]) : 0u;
      const bool floor_tie = candidate && !floor_none && key == floor_key;
      std::int64_t rank = 0, ties_here = 0;
      scan(shared.scan_storage).ExclusiveSum(floor_tie ? 1 : 0, rank, ties_here);
      __syncthreads();
      const bool floor_kept = candidate && !floor_none && (key > floor_key || (floor_tie && floor_seen + rank < floor_ties));
      floor_seen += ties_here;
      fn(i, valid, slot, candidate, key, floor_kept);
    }
  };

  // Per head: protected tokens, candidates, floor.
  std::int64_t protected_total = 0, floor_total = 0, candidates_left = 0;
  for (std::int64_t l = l0; l < l1; ++l)
    for (std::int64_t h = h0; h < h1; ++h) {
      if (retrieval(l, h)) continue;
      const evict_head<View> r = head_at(l, h);
      std::int64_t mine_protected = 0, mine_candidates = 0;
      for (std::int64_t i = tid; i < r.length; i += evict_threads) {
        const bool is_protected = token_protected(r, i, r.slot(i));
        mine_protected += is_protected ? 1 : 0;
        mine_candidates += is_protected ? 0 : 1;
      }
      const std::int64_t protected_tokens = block_sum(mine_protected), candidates = block_sum(mine_candidates);
      const std::int64_t room = std::max(std::int64_t{0}, settings.head_target - protected_tokens);
      std::int64_t floor_count =
          settings.scope == 0 ? room : static_cast<std::int64_t>(::floor(settings.alpha * static_cast<double>(room)));
      if (protected_tokens == 0) floor_count = std::max(floor_count, std::int64_t{1});  // never an empty head
      floor_count = std::min(floor_count, candidates);
      std::uint32_t key = 0;
      std::int64_t ties = 0;
      bool none = true;
      radix_threshold(floor_count, [&](auto&& take) {
        for (std::int64_t i = tid; i < r.length; i += evict_threads) {
          const std::int64_t slot = r.slot(i);
          if (!token_protected(r, i, slot)) take(evict_rank_key(r.metric[slot]));
        }
      }, key, ties, none);
      if (tid == 0) {
        scratch.floor_key[r.scratch_index] = key;
        scratch.floor_ties[r.scratch_index] = ties;
        scratch.floor_none[r.scratch_index] = none ? 1 : 0;
      }
      __syncthreads();
      protected_total += protected_tokens;
      floor_total += floor_count;
      candidates_left += candidates - floor_count;
    }

  // The pool over the unit's remaining candidates.
  const std::int64_t pool =
      settings.scope == 0 ? 0 : std::min(std::max(std::int64_t{0}, target - protected_total - floor_total), candidates_left);
  std::uint32_t pool_key = 0;
  std::int64_t pool_ties = 0;
  bool pool_none = true;
  radix_threshold(pool, [&](auto&& take) {
    for (std::int64_t l = l0; l < l1; ++l)
      for (std::int64_t h = h0; h < h1; ++h) {
        if (retrieval(l, h)) continue;
        walk(head_at(l, h), evict_threads, [&](std::int64_t, bool, std::int64_t, bool candidate, std::uint32_t key, bool floor_kept) {
          if (candidate && !floor_kept) take(key);
        });
      }
  }, pool_key, pool_ties, pool_none);

  // Compaction, staged: each chunk's kept rows are read into shared memory, then written to their new slots.
  using element = typename View::codec::element;
  using store_type = device_element_t<element>;
  std::int64_t pool_seen = 0, kept_total = 0, evicted_total = 0;
  for (std::int64_t l = l0; l < l1; ++l)
    for (std::int64_t h = h0; h < h1; ++h) {
      if (retrieval(l, h)) continue;
      const evict_head<View> r = head_at(l, h);
      const std::int64_t head_dim = r.cache->shape.head_dim;
      auto* keys = reinterpret_cast<store_type*>(r.cache->storage.keys);
      auto* values = reinterpret_cast<store_type*>(r.cache->storage.values);
      auto* staged = reinterpret_cast<store_type*>(stage);  // [evict_stage_tokens][2][head_dim]
      std::int64_t written = 0;
      walk(r, evict_stage_tokens, [&](std::int64_t i, bool valid, std::int64_t slot, bool candidate, std::uint32_t key,
                                      bool floor_kept) {
        const bool pool_candidate = candidate && !floor_kept;
        const bool pool_tie = pool_candidate && !pool_none && key == pool_key;
        std::int64_t rank = 0, ties_here = 0;
        scan(shared.scan_storage).ExclusiveSum(pool_tie ? 1 : 0, rank, ties_here);
        __syncthreads();
        const bool pool_kept = pool_candidate && !pool_none && (key > pool_key || (pool_tie && pool_seen + rank < pool_ties));
        pool_seen += ties_here;
        const bool keep = valid && (!candidate || floor_kept || pool_kept);
        std::int64_t index = 0, kept_here = 0;
        scan(shared.scan_storage).ExclusiveSum(keep ? 1 : 0, index, kept_here);
        __syncthreads();
        // Stage: this chunk's kept tokens' rows (all threads), their positions and metrics (their own thread).
        const int stage_row = static_cast<int>(index);
        std::int32_t position = 0;
        float value = 0.0f;
        if (keep) {
          position = r.cache->positions.slot_position[slot];
          value = r.metric[slot];
        }
        // Every thread copies elements of the kept rows: (kept token k, element) pairs.
        std::int64_t* stage_slot = shared.stage_slot;
        if (keep) stage_slot[stage_row] = slot;
        __syncthreads();
        for (std::int64_t e = tid; e < kept_here * 2 * head_dim; e += evict_threads) {
          const std::int64_t k = e / (2 * head_dim), rest = e % (2 * head_dim);
          const store_type* source = rest < head_dim ? keys : values;
          staged[e] = source[stage_slot[k] * head_dim + rest % head_dim];
        }
        __syncthreads();
        if (keep && r.compensation == i) r.cache->compensation.index[r.head] = static_cast<std::int32_t>(written + index);
        if (keep) {
          const std::int64_t to = r.slot(written + index);
          r.cache->positions.slot_position[to] = position;
          r.metric[to] = value;
          stage_slot[stage_row] = to;
        }
        __syncthreads();
        for (std::int64_t e = tid; e < kept_here * 2 * head_dim; e += evict_threads) {
          const std::int64_t k = e / (2 * head_dim), rest = e % (2 * head_dim);
          store_type* target = rest < head_dim ? keys : values;
          target[stage_slot[k] * head_dim + rest % head_dim] = staged[e];
        }
        __syncthreads();
        written += kept_here;
      });
      for (std::int64_t i = written + tid; i < r.length; i += evict_threads) r.metric[r.slot(i)] = 0.0f;  // freed slots read 0
      if (tid == 0) scratch.new_length[r.layer * settings.heads_per_layer + r.head] = written;
      kept_total += written;
      evicted_total += r.length - written;
      __syncthreads();
    }
  if (tid == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->evicted_tokens),
              static_cast<unsigned long long>(evicted_total));
    if (kept_total > target) atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->units_over_target), 1ull);
  }
}

/// One block per unit (sequence; sequence × layer; sequence × layer × kv head).
template <class View>
__global__ void __launch_bounds__(evict_threads)
    evict_units(const __grid_constant__ evict_layer_set<View> set, const evict_settings settings,
                const evict_scratch scratch) {
  __shared__ evict_block_state<View> shared;
  extern __shared__ __align__(16) unsigned char stage[];
  const std::int64_t unit = blockIdx.x;
  const std::int64_t layers = set.count, kv_heads = settings.kv_heads;
  if (settings.scope == 2) {
    evict_unit(set, settings, scratch, shared, stage, unit, 0, layers, 0, kv_heads);
  } else if (settings.scope == 1) {
    const std::int64_t b = unit / layers, l = unit % layers;
    evict_unit(set, settings, scratch, shared, stage, b, l, l + 1, 0, kv_heads);
  } else {
    const std::int64_t b = unit / (layers * kv_heads), l = unit / kv_heads % layers, h = unit % kv_heads;
    evict_unit(set, settings, scratch, shared, stage, b, l, l + 1, h, h + 1);
  }
}

/// One block per layer: lengths from new_length (−1: unchanged); paged: pages past a head's
/// new length pushed on the free list (head order, page-table order), tables closed up.
template <class View>
__global__ void __launch_bounds__(evict_threads)
    evict_close_up(const __grid_constant__ evict_layer_set<View> set, const evict_scratch scratch,
                   std::int64_t heads_per_layer) {
  const View& cache = set.views[blockIdx.x];
  const std::int64_t* new_length = scratch.new_length + blockIdx.x * heads_per_layer;
  if constexpr (is_flat_view<View>) {
    for (std::int64_t head = threadIdx.x; head < heads_per_layer; head += evict_threads)
      if (new_length[head] >= 0) cache.lengths[head] = new_length[head];
  } else {
    static_assert(is_paged_view<View>, "kvtrim::evict: layout::paged or layout::flat");
    __shared__ std::int64_t shared_write, shared_freed;
    if (threadIdx.x == 0) shared_write = 0, shared_freed = 0;
    __syncthreads();
    const std::int64_t page_size = cache.page_size;
    const std::int32_t free_base = *cache.free_count;
    std::int64_t old_end_prev = 0;
    for (std::int64_t head = 0; head < heads_per_layer; ++head) {  // in order: the CPU's order
      const std::int64_t old_begin = old_end_prev, old_end = cache.indptr[head + 1];
      const std::int64_t old_count = old_end - old_begin;
      const std::int64_t old_length =
          old_count == 0 ? 0 : (old_count - 1) * page_size + cache.last_page_len[head];
      const std::int64_t length = new_length[head] < 0 ? old_length : new_length[head];
      const std::int64_t pages = (length + page_size - 1) / page_size;
      const std::int64_t write = shared_write, freed = shared_freed;
      __syncthreads();
      for (std::int64_t k = pages + threadIdx.x; k < old_count; k += evict_threads)
        cache.free_pages[free_base + freed + (k - pages)] = cache.indices[old_begin + k];
      // Kept pages move left (write ≤ old_begin): chunk by chunk, each chunk read whole before written.
      for (std::int64_t c0 = 0; c0 < pages; c0 += evict_threads) {
        const std::int64_t k = c0 + threadIdx.x;
        const std::int32_t page = k < pages ? cache.indices[old_begin + k] : 0;
        __syncthreads();
        if (k < pages) cache.indices[write + k] = page;
        __syncthreads();
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        cache.indptr[head + 1] = static_cast<std::int32_t>(write + pages);
        cache.last_page_len[head] = static_cast<std::int32_t>(length == 0 ? 0 : (length - 1) % page_size + 1);
        shared_write = write + pages;
        shared_freed = freed + (old_count - pages);
      }
      old_end_prev = old_end;
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      *cache.free_count = static_cast<std::int32_t>(free_base + shared_freed);
      atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->freed_pages),
                static_cast<unsigned long long>(shared_freed));
    }
  }
}

}  // namespace kvtrim::cuda_detail

namespace kvtrim {

template <>
struct implementation<eviction::step, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::evict";

  template <class View>
  static std::size_t workspace_bytes(std::span<const View> layers) {
    if (layers.empty()) return 0;
    workspace_carver carver;
    cuda_detail::evict_scratch::carve(carver, static_cast<std::int64_t>(layers.size()), layers[0].heads());
    return carver.bytes();
  }

  /// `report` (device memory, optional): what the step did, written when the stream reaches it.
  template <class View>
  static void evict(std::span<const View> layers, std::span<const eviction::metric_output<device_space>> metrics,
                    const eviction::config& cfg, workspace scratch, cudaStream_t stream,
                    eviction::report* report = nullptr, const std::uint8_t* device_retrieval_heads = nullptr) {
    static_assert(cuda_detail::is_paged_view<View> || cuda_detail::is_flat_view<View>,
                  "kvtrim::evict: eviction gives heads different lengths; use layout::paged or layout::flat");
    static_assert(codec::is_plain<typename View::codec>,
                  "kvtrim::evict on backend::cuda moves codec::fp16 / bf16 / fp32 rows for now");
    cfg.validate(function);
    if (cfg.retrieval_heads != nullptr)
      detail::fail(function, "config.retrieval_heads",
                   "null on backend::cuda (pass the device copy as device_retrieval_heads)", "a host pointer");
    using set_type = cuda_detail::evict_layer_set<View>;
    if (layers.empty() || static_cast<int>(layers.size()) > set_type::capacity)
      detail::fail(function, "layers", detail::cat("1 to ", set_type::capacity, " layers on backend::cuda"),
                   std::to_string(layers.size()));
    if (metrics.size() != layers.size())
      detail::fail(function, "metrics", detail::cat("one metric per layer (", layers.size(), ")"),
                   std::to_string(metrics.size()));
    detail::check_workspace(function, scratch, workspace_bytes(layers));
    auto set = std::make_unique<set_type>();
    for (std::size_t l = 0; l < layers.size(); ++l) {
      View::layout_policy::check(function, layers[l]);
      if (layers[l].shape.kv_heads != layers[0].shape.kv_heads || layers[l].batch != layers[0].batch ||
          layers[l].shape.head_dim != layers[0].shape.head_dim)
        detail::fail(function, "layers", "every layer with layer 0's batch, kv heads and head_dim",
                     detail::cat("layer ", l, " differs"));
      if (metrics[l].values == nullptr)
        detail::fail(function, "metrics", "a metric buffer for every layer", detail::cat("null for layer ", l));
      eviction_detail::check_metric(function, metrics[l], detail::storage_slots(layers[l].storage));
      if (metrics[l].protected_window != cfg.protected_window)
        detail::fail(function, "metrics", "the protected window the eviction uses (config.protected_window)",
                     detail::cat(metrics[l].protected_window, " for layer ", l));
      set->views[l] = layers[l];
      set->metrics[l] = metrics[l].values;
    }
    set->count = static_cast<int>(layers.size());
    const std::int64_t kv_heads = layers[0].shape.kv_heads, batch = layers[0].batch;
    const cuda_detail::evict_settings settings{static_cast<int>(cfg.scope), cfg.head_target(), cfg.sinks,
                                               cfg.protected_window, cfg.alpha, device_retrieval_heads, kv_heads,
                                               batch, layers[0].heads()};
    workspace_carver carver(scratch);
    const auto tables = cuda_detail::evict_scratch::carve(carver, static_cast<std::int64_t>(layers.size()),
                                                          layers[0].heads());
    detail::check_cuda(cudaMemsetAsync(tables.new_length, 0xff,
                                       sizeof(std::int64_t) * layers.size() * layers[0].heads(), stream),
                       function, "cudaMemsetAsync(new_length)");
    detail::check_cuda(cudaMemsetAsync(tables.report, 0, sizeof(eviction::report), stream), function,
                       "cudaMemsetAsync(report)");
    const std::int64_t units = cfg.scope == eviction::scope::cross_layer ? batch
                               : cfg.scope == eviction::scope::per_layer
                                   ? batch * static_cast<std::int64_t>(layers.size())
                                   : batch * static_cast<std::int64_t>(layers.size()) * kv_heads;
    using store_type = cuda_detail::device_element_t<typename View::codec::element>;
    const std::size_t stage_bytes =
        std::size_t{cuda_detail::evict_stage_tokens} * 2 * static_cast<std::size_t>(layers[0].shape.head_dim) *
        sizeof(store_type);
    const auto kernel = cuda_detail::evict_units<View>;
    detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(stage_bytes)),
                       function, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    kernel<<<static_cast<unsigned>(units), cuda_detail::evict_threads, stage_bytes, stream>>>(*set, settings, tables);
    detail::check_launch(function, "evict_units");
    cuda_detail::evict_close_up<View><<<static_cast<unsigned>(layers.size()), cuda_detail::evict_threads, 0, stream>>>(
        *set, tables, layers[0].heads());
    detail::check_launch(function, "evict_close_up");
    if (report != nullptr)
      detail::check_cuda(cudaMemcpyAsync(report, tables.report, sizeof(eviction::report), cudaMemcpyDeviceToDevice,
                                         stream),
                         function, "cudaMemcpyAsync(report)");
  }
};

template <class Backend, class View>
  requires std::same_as<Backend, backend::cuda>
std::size_t evict_workspace(std::span<const View> layers) {
  return implementation<eviction::step, Backend>::workspace_bytes(layers);
}

/// The eviction step on the device (see eviction/evict.hpp; config.retrieval_heads must be null here:
/// pass a device copy of the mask as `device_retrieval_heads`).
template <class Backend, class View>
  requires std::same_as<Backend, backend::cuda>
void evict(std::span<const View> layers, std::span<const eviction::metric_output<device_space>> metrics,
           const eviction::config& cfg, workspace scratch, cudaStream_t stream, eviction::report* report = nullptr,
           const std::uint8_t* device_retrieval_heads = nullptr) {
  implementation<eviction::step, Backend>::evict(layers, metrics, cfg, scratch, stream, report, device_retrieval_heads);
}

}  // namespace kvtrim
