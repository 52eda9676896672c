// kvtrim/backend/cuda/sharded_eviction.cuh — the eviction step over kv heads
// sharded across ranks, on the GPU (eviction/sharded.hpp: the collectives and
// rules; backend/cpu/sharded_eviction.hpp: the specification).
//
// codec::plain (fp16, bf16, fp32) over paged and flat caches, as the one-GPU
// step. Every phase runs over all units of the call at once, one block per
// (sequence, layer, local kv head) — "item" below — with the collectives on the
// stream between the launches and no host synchronisation:
//
//   memsets; sharded_evict_floors (C1's sums, each head's floor threshold and
//   the token index of its last kept floor tie); C1; sharded_evict_decide
//   (units: active, pool); then 4 × [sharded_evict_histogram; C(pass);
//   sharded_evict_decide (the pass's digit)]; sharded_evict_ties; C6;
//   sharded_evict_compact (the head's share of the unit's ties: what the heads
//   before it in (layer, head) order leave; the one-rank step's layout: holes
//   below K filled by the kept tokens of [K, tail), the protected tail shifted
//   down behind them, token order not kept); sharded_evict_close_up (page tables
//   closed up, pages freed in the CPU's order).
//
// Self-contained (its own layer set, key and close-up): it shares no scratch
// layout with the one-GPU step (backend/cuda/eviction.cuh), which is free to change.
//
// A rank whose own input is refused (views, metrics, shard) still makes the six
// collectives — with a refusal flag in C1, zeros elsewhere — then throws; on
// every rank the decide kernel sees the flag (or shards whose counted heads do
// not add up to H) and no unit evicts, so nobody waits and no cache changes;
// the other ranks' device report says units_evicted = 0. Only a workspace this
// rank cannot use (null, too small) throws before the collectives: it is the
// caller's programming error, as a mismatched NCCL call is.
//
// Cost: 2 memsets, 12 launches (+1 close-up per call), 6 collectives. The
// histogram passes read each candidate's metric and position (not K/V);
// compaction (one block per head) reads the metric and positions of the tokens
// before the tail three times (tail, K, the walks), moves each kept token of
// [K, tail) once, straight to its hole, and stages the tail's rows up to 48 KB a
// chunk (96 tokens of fp16 rows of 128); kept tokens below K stay put.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/decode_plan.cuh"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/eviction/evict.hpp"
#include "kvtrim/eviction/metric.hpp"
#include "kvtrim/layout/detail/storage.hpp"
#include "kvtrim/comm/communicator.hpp"
#include "kvtrim/eviction/sharded.hpp"

namespace kvtrim::cuda_detail {

inline constexpr int sharded_threads = 256;

/// Every layer's view and metric, by value (kernel parameters, up to ~30 KB).
template <class View>
struct sharded_layer_set {
  static constexpr int capacity = static_cast<int>(30000 / (sizeof(View) + sizeof(float*)));
  View views[capacity];
  float* metrics[capacity];
  int count = 0;
};

/// The order-preserving key of a metric value (select_top_k's: NaN lowest, −0 = +0).
__device__ __forceinline__ std::uint32_t sharded_rank_key(float value) {
  if (isnan(value)) return 0u;
  const std::uint32_t bits = value == 0.0f ? 0u : __float_as_uint(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// What every sharded kernel knows about the call.
struct sharded_evict_settings {
  std::int64_t head_target = 0, sinks = 0, window = 0;
  double alpha = 0.0;
  const std::uint8_t* retrieval = nullptr;  // device [layers · total_heads] or null
  std::int64_t batch = 0, layers = 0, local = 0, first = 0, total = 0, units = 0;
  bool cross = true;
  unsigned long long counted = 1;
};

struct sharded_unit {
  std::uint32_t prefix;
  std::int64_t remaining, pool;
  int active;
};

/// The sharded step's device scratch: O(items + units · 256 + batch · layers · H).
struct sharded_evict_scratch {
  std::uint32_t* floor_key = nullptr;        // [items]
  std::int64_t* floor_cutoff = nullptr;      // [items]: last floor-kept tie's token index (−1: no floor)
  unsigned long long* sums = nullptr;        // C1: [units · unit_sums + global_sums]
  unsigned long long* bins = nullptr;        // C2..C5: [4][units · 256]
  unsigned long long* ties = nullptr;        // C6: [batch · layers · H]
  sharded_unit* units = nullptr;             // [units]
  eviction::report* report = nullptr;        // [1]
  std::int64_t* new_length = nullptr;        // [layers · batch · local], −1: untouched
  std::byte* zero_begin = nullptr;           // [zero_begin, zero_end): cleared by one memset
  std::byte* zero_end = nullptr;

  template <class Carver>
  static sharded_evict_scratch carve(Carver& carver, const eviction::shard& shard, std::int64_t local) {
    sharded_evict_scratch s;
    const std::int64_t items = shard.batch * shard.layers * local, units = shard.batch * shard.layers;
    s.floor_key = carver.template take<std::uint32_t>(items);
    s.floor_cutoff = carver.template take<std::int64_t>(items);
    s.sums = carver.template take<unsigned long long>(units * eviction_detail::unit_sums + eviction_detail::global_sums);
    s.bins = carver.template take<unsigned long long>(eviction_detail::digit_passes * units * eviction_detail::digit_bins);
    s.ties = carver.template take<unsigned long long>(shard.batch * shard.layers * shard.heads.total_heads);
    s.units = carver.template take<sharded_unit>(units);
    s.report = carver.template take<eviction::report>(1);
    s.zero_begin = reinterpret_cast<std::byte*>(s.sums);
    s.zero_end = reinterpret_cast<std::byte*>(s.report + 1);
    s.new_length = carver.template take<std::int64_t>(shard.layers * shard.batch * local);
    return s;
  }
};

/// One item's head as the sharded kernels see it.
template <class View>
struct sharded_head {
  const View* cache;
  float* metric;
  std::int64_t b, l, h, head, length, next, compensation;
  bool retrieval;

  __device__ __forceinline__ static sharded_head at(const sharded_layer_set<View>& set,
                                                    const sharded_evict_settings& s, std::int64_t item) {
    sharded_head r;
    r.b = item / (s.layers * s.local);
    r.l = item / s.local % s.layers;
    r.h = item % s.local;
    r.cache = &set.views[r.l];
    r.metric = set.metrics[r.l];
    r.head = r.b * s.local + r.h;
    r.length = r.cache->head_length(r.b, r.h);
    r.next = r.cache->positions.next_position[r.head];
    r.compensation = r.cache->compensation.index[r.head];
    r.retrieval = s.retrieval != nullptr && s.retrieval[r.l * s.total + s.first + r.h] != 0;
    return r;
  }
  __device__ __forceinline__ std::int64_t slot(std::int64_t i) const { return cache->slot(b, h, i); }
  __device__ __forceinline__ bool is_protected(const sharded_evict_settings& s, std::int64_t i, std::int64_t slot_) const {
    const std::int64_t position = cache->positions.slot_position[slot_];
    return position < s.sinks || next - position <= s.window || compensation == i;
  }
  __device__ __forceinline__ std::int64_t unit(const sharded_evict_settings& s) const {
    return s.cross ? b : b * s.layers + l;
  }
};

/// A block's CUB scratch: a sum over the block or a scan, one at a time.
union sharded_block_storage {
  typename cub::BlockReduce<std::int64_t, sharded_threads>::TempStorage reduce;
  typename cub::BlockScan<std::int64_t, sharded_threads>::TempStorage scan;
};

/// Floor membership of a candidate (key, token index) under (floor_key, cutoff).
__device__ __forceinline__ bool in_floor(std::uint32_t key, std::int64_t i, std::uint32_t floor_key,
                                         std::int64_t cutoff) {
  return cutoff >= 0 && (key > floor_key || (key == floor_key && i <= cutoff));
}

/// Per item: protected tokens, candidates, the floor (radix select over the head's
/// candidates, then the index of its last kept tie), and the item's share of C1.
template <class View>
__global__ void __launch_bounds__(sharded_threads)
    sharded_evict_floors(const __grid_constant__ sharded_layer_set<View> set, const sharded_evict_settings s,
                         const sharded_evict_scratch scratch) {
  using reduce = cub::BlockReduce<std::int64_t, sharded_threads>;
  using scan = cub::BlockScan<std::int64_t, sharded_threads>;
  __shared__ sharded_block_storage storage;
  __shared__ unsigned histogram[256];
  __shared__ std::uint32_t shared_prefix;
  __shared__ std::int64_t shared_remaining, shared_count, shared_cutoff;
  const int tid = threadIdx.x;
  const std::int64_t item = blockIdx.x;
  if (item == 0 && tid == 0) {  // this rank's heads (run 1: plain codecs)
    unsigned long long* globals = scratch.sums + s.units * eviction_detail::unit_sums;
    globals[1] = globals[2] = globals[3] = s.counted * static_cast<unsigned long long>(s.local);
  }
  const sharded_head<View> r = sharded_head<View>::at(set, s, item);
  if (r.retrieval) {
    if (tid == 0) scratch.floor_cutoff[item] = -1;
    return;
  }
  std::int64_t mine_protected = 0;
  for (std::int64_t i = tid; i < r.length; i += sharded_threads) mine_protected += r.is_protected(s, i, r.slot(i)) ? 1 : 0;
  const std::int64_t protected_tokens = reduce(storage.reduce).Sum(mine_protected);
  if (tid == 0) shared_count = protected_tokens;
  __syncthreads();
  const std::int64_t protected_count = shared_count, candidates = r.length - protected_count;
  const std::int64_t room = std::max(std::int64_t{0}, s.head_target - protected_count);
  std::int64_t floor_items = static_cast<std::int64_t>(::floor(s.alpha * static_cast<double>(room)));
  if (protected_count == 0) floor_items = std::max(floor_items, std::int64_t{1});  // never an empty head
  floor_items = std::min(floor_items, candidates);

  // The floor threshold: four 8-bit passes over the candidates' keys.
  if (tid == 0) shared_prefix = 0, shared_remaining = floor_items;
  __syncthreads();
  for (int shift = 24; shift >= 0 && floor_items > 0; shift -= 8) {
    for (int k = tid; k < 256; k += sharded_threads) histogram[k] = 0;
    __syncthreads();
    const std::uint32_t prefix = shared_prefix, mask = shift == 24 ? 0u : ~0u << (shift + 8);
    for (std::int64_t i = tid; i < r.length; i += sharded_threads) {
      const std::int64_t slot = r.slot(i);
      if (r.is_protected(s, i, slot)) continue;
      const std::uint32_t key = sharded_rank_key(r.metric[slot]);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      std::int64_t remaining = shared_remaining;
      int digit = 255;
      for (; digit > 0 && std::int64_t{histogram[digit]} < remaining; --digit) remaining -= histogram[digit];
      shared_remaining = remaining;
      shared_prefix |= static_cast<std::uint32_t>(digit) << shift;
    }
    __syncthreads();
  }
  const std::uint32_t floor_key = shared_prefix;
  const std::int64_t floor_ties = shared_remaining;
  // The last kept tie: the floor_ties-th candidate with key == floor_key, in token order.
  if (tid == 0) shared_cutoff = -1;
  __syncthreads();
  std::int64_t seen = 0;
  for (std::int64_t c0 = 0; c0 < r.length && floor_items > 0 && seen < floor_ties; c0 += sharded_threads) {
    const std::int64_t i = c0 + tid;
    bool tie = false;
    if (i < r.length) {
      const std::int64_t slot = r.slot(i);
      tie = !r.is_protected(s, i, slot) && sharded_rank_key(r.metric[slot]) == floor_key;
    }
    std::int64_t rank = 0, chunk_ties = 0;
    scan(storage.scan).ExclusiveSum(tie ? 1 : 0, rank, chunk_ties);
    if (tie && seen + rank == floor_ties - 1) shared_cutoff = i;
    seen += chunk_ties;
    __syncthreads();
  }
  if (tid == 0) {
    scratch.floor_key[item] = floor_key;
    scratch.floor_cutoff[item] = floor_items > 0 ? shared_cutoff : -1;
    unsigned long long* sums = scratch.sums + r.unit(s) * eviction_detail::unit_sums;
    atomicAdd(&sums[0], s.counted * static_cast<unsigned long long>(r.length));
    atomicAdd(&sums[1], s.counted);
    atomicAdd(&sums[2], s.counted * static_cast<unsigned long long>(protected_count));
    atomicAdd(&sums[3], s.counted * static_cast<unsigned long long>(floor_items));
    atomicAdd(&sums[4], s.counted * static_cast<unsigned long long>(candidates - floor_items));
  }
}

/// pass < 0: after C1, each unit's activity and pool (none anywhere if a rank refused
/// or the counted heads miss H); pass 0..3: the pass's digit from the all-reduced bins.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    sharded_evict_decide(const sharded_evict_settings s, const sharded_evict_scratch scratch, int pass) {
  const unsigned long long* globals = scratch.sums + s.units * eviction_detail::unit_sums;
  const bool refused = globals[0] != 0 || globals[1] != static_cast<unsigned long long>(s.total);
  for (std::int64_t u = std::int64_t{blockIdx.x} * Threads + threadIdx.x; u < s.units;
       u += std::int64_t{gridDim.x} * Threads) {
    sharded_unit& unit = scratch.units[u];
    if (pass < 0) {
      const unsigned long long* sums = scratch.sums + u * eviction_detail::unit_sums;
      const auto held = static_cast<std::int64_t>(sums[0]), heads = static_cast<std::int64_t>(sums[1]);
      const auto protected_total = static_cast<std::int64_t>(sums[2]), floor_total = static_cast<std::int64_t>(sums[3]);
      const std::int64_t target = heads * s.head_target;
      unit = sharded_unit{0u, 0, 0, 0};
      if (refused || heads == 0 || held <= target) continue;
      unit.active = 1;
      unit.pool = std::min(std::max(std::int64_t{0}, target - protected_total - floor_total),
                           static_cast<std::int64_t>(sums[4]));
      unit.remaining = unit.pool;
      atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->units_evicted), 1ull);
      if (protected_total + floor_total + unit.pool > target)
        atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->units_over_target), 1ull);
      continue;
    }
    if (unit.pool <= 0) continue;
    const int shift = 24 - 8 * pass;
    const unsigned long long* bins =
        scratch.bins + (static_cast<std::int64_t>(pass) * s.units + u) * eviction_detail::digit_bins;
    std::int64_t remaining = unit.remaining;
    int digit = 255;
    for (; digit > 0 && static_cast<std::int64_t>(bins[digit]) < remaining; --digit)
      remaining -= static_cast<std::int64_t>(bins[digit]);
    unit.remaining = remaining;
    unit.prefix |= static_cast<std::uint32_t>(digit) << shift;
  }
}

/// Pass `pass`: this item's pool candidates (unprotected, not in its floor) whose higher
/// digits match the unit's prefix, counted by digit into the unit's bins.
template <class View>
__global__ void __launch_bounds__(sharded_threads)
    sharded_evict_histogram(const __grid_constant__ sharded_layer_set<View> set, const sharded_evict_settings s,
                            const sharded_evict_scratch scratch, int pass) {
  __shared__ unsigned histogram[256];
  const std::int64_t item = blockIdx.x;
  const sharded_head<View> r = sharded_head<View>::at(set, s, item);
  const sharded_unit unit = scratch.units[r.unit(s)];
  if (r.retrieval || unit.pool <= 0 || s.counted == 0) return;
  for (int k = threadIdx.x; k < 256; k += sharded_threads) histogram[k] = 0;
  __syncthreads();
  const int shift = 24 - 8 * pass;
  const std::uint32_t mask = pass == 0 ? 0u : ~0u << (shift + 8);
  const std::uint32_t floor_key = scratch.floor_key[item];
  const std::int64_t cutoff = scratch.floor_cutoff[item];
  for (std::int64_t i = threadIdx.x; i < r.length; i += sharded_threads) {
    const std::int64_t slot = r.slot(i);
    if (r.is_protected(s, i, slot)) continue;
    const std::uint32_t key = sharded_rank_key(r.metric[slot]);
    if (!in_floor(key, i, floor_key, cutoff) && (key & mask) == unit.prefix)
      atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
  }
  __syncthreads();
  unsigned long long* bins =
      scratch.bins + (static_cast<std::int64_t>(pass) * s.units + r.unit(s)) * eviction_detail::digit_bins;
  for (int k = threadIdx.x; k < 256; k += sharded_threads)
    if (histogram[k] != 0) atomicAdd(&bins[k], static_cast<unsigned long long>(histogram[k]));
}

/// This item's pool candidates tied at the unit's threshold v* (C6's entry of its head).
template <class View>
__global__ void __launch_bounds__(sharded_threads)
    sharded_evict_ties(const __grid_constant__ sharded_layer_set<View> set, const sharded_evict_settings s,
                       const sharded_evict_scratch scratch) {
  using reduce = cub::BlockReduce<std::int64_t, sharded_threads>;
  __shared__ typename reduce::TempStorage storage;
  const std::int64_t item = blockIdx.x;
  const sharded_head<View> r = sharded_head<View>::at(set, s, item);
  const sharded_unit unit = scratch.units[r.unit(s)];
  if (r.retrieval || unit.pool <= 0 || s.counted == 0) return;
  const std::uint32_t floor_key = scratch.floor_key[item];
  const std::int64_t cutoff = scratch.floor_cutoff[item];
  std::int64_t mine = 0;
  for (std::int64_t i = threadIdx.x; i < r.length; i += sharded_threads) {
    const std::int64_t slot = r.slot(i);
    if (r.is_protected(s, i, slot)) continue;
    const std::uint32_t key = sharded_rank_key(r.metric[slot]);
    mine += !in_floor(key, i, floor_key, cutoff) && key == unit.prefix ? 1 : 0;
  }
  const std::int64_t ties = reduce(storage).Sum(mine);
  if (threadIdx.x == 0)
    scratch.ties[(r.b * s.layers + r.l) * s.total + s.first + r.h] = static_cast<unsigned long long>(ties);
}

/// Largest chunk the compaction stages (one token per thread of the block).
inline constexpr int sharded_stage_budget = 48 * 1024;  // bytes of K/V rows staged per chunk: 4 blocks per SM

/// Tokens per staged chunk for rows of `row_bytes` (a K row and a V row each).
inline int sharded_stage_tokens(std::int64_t row_bytes) {
  return static_cast<int>(std::clamp<std::int64_t>(sharded_stage_budget / (2 * row_bytes), 1, sharded_threads));
}

/// Compacts this item's head to its protected tokens, its floor, the pool above v* and its
/// share of the unit's ties (what the heads before it in (layer, head) order leave), in
/// the one-rank step's layout (eviction/evict.hpp, "Layouts"; backend/cpu/eviction.hpp's
/// compact(), which the CPU sharded step calls): the protected tail [tail, length) (tail =
/// one past the last candidate) and the kept tokens below K (the kept count before the
/// tail) stay; the kept tokens of [K, tail) fill the holes below K in order; the tail
/// shifts down by tail − K. Token order is not kept. The keep decisions are made on the
/// tokens as they were (a walk reads only tokens no move has written yet), ties ranked
/// in token order across the walks. Movers go straight to their holes (sources ≥ K >
/// destinations); the tail's rows are staged `chunk` tokens at a time in shared memory
/// (read whole before written: a chunk's destinations may be its own sources), in
/// 16-byte units when rows allow.
template <class View>
__global__ void __launch_bounds__(sharded_threads)
    sharded_evict_compact(const __grid_constant__ sharded_layer_set<View> set, const sharded_evict_settings s,
                          const sharded_evict_scratch scratch, int chunk) {
  using scan = cub::BlockScan<std::int64_t, sharded_threads>;
  using reduce = cub::BlockReduce<std::int64_t, sharded_threads>;
  constexpr std::int64_t block = sharded_threads;
  __shared__ sharded_block_storage storage;
  __shared__ std::int64_t stage_from[sharded_threads], stage_to[sharded_threads];
  __shared__ std::int64_t shared_value;
  __shared__ std::int32_t shared_compensation;
  extern __shared__ __align__(16) unsigned char stage[];
  const int tid = threadIdx.x;
  const std::int64_t item = blockIdx.x;
  const sharded_head<View> r = sharded_head<View>::at(set, s, item);
  const sharded_unit unit = scratch.units[r.unit(s)];
  if (r.retrieval || unit.active == 0) return;

  // Ties of the unit's heads before this one: (b, l, g) entries from the unit's first.
  const std::int64_t own = (r.b * s.layers + r.l) * s.total + s.first + r.h;
  const std::int64_t unit_first = s.cross ? r.b * s.layers * s.total : (r.b * s.layers + r.l) * s.total;
  std::int64_t mine = 0;
  for (std::int64_t k = unit_first + tid; k < own; k += sharded_threads) mine += static_cast<std::int64_t>(scratch.ties[k]);
  const std::int64_t before_sum = reduce(storage.reduce).Sum(mine);
  if (tid == 0) shared_value = before_sum;
  __syncthreads();
  const bool pool_none = unit.pool <= 0;
  const std::int64_t quota =
      pool_none ? 0
                : std::clamp(unit.remaining - shared_value, std::int64_t{0}, static_cast<std::int64_t>(scratch.ties[own]));
  const std::uint32_t floor_key = scratch.floor_key[item];
  const std::int64_t cutoff = scratch.floor_cutoff[item];
  __syncthreads();  // shared_value read

  using store_type = device_element_t<typename View::codec::element>;
  const std::int64_t head_dim = r.cache->shape.head_dim;
  auto* keys = reinterpret_cast<unsigned char*>(r.cache->storage.keys);
  auto* values = reinterpret_cast<unsigned char*>(r.cache->storage.values);
  std::int32_t* positions = r.cache->positions.slot_position;
  // Rows copied in 16-byte units when a row is a whole number of them and the storage starts 16-byte aligned.
  const std::int64_t row_bytes = head_dim * static_cast<std::int64_t>(sizeof(store_type));
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<std::uintptr_t>(keys) % 16 == 0 &&
                    reinterpret_cast<std::uintptr_t>(values) % 16 == 0;
  const std::int64_t unit_bytes = wide ? 16 : static_cast<std::int64_t>(sizeof(store_type));
  const std::int64_t row_units = row_bytes / unit_bytes;
  const auto copy_one = [&](unsigned char* to, const unsigned char* from) {
    if (wide)
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    else
      *reinterpret_cast<store_type*>(to) = *reinterpret_cast<const store_type*>(from);
  };
  // Copies unit e of the chunk's staged rows ([token][K, V][row]) between the cache and the stage.
  const auto copy_unit = [&](std::int64_t e, bool into_stage) {
    const std::int64_t k = e / (2 * row_units), rest = e % (2 * row_units);
    unsigned char* base = rest < row_units ? keys : values;
    const std::int64_t offset = (rest % row_units) * unit_bytes;
    unsigned char* cached = base + (into_stage ? stage_from[k] : stage_to[k]) * row_bytes + offset;
    unsigned char* staged = stage + e * unit_bytes;
    if (into_stage)
      copy_one(staged, cached);
    else
      copy_one(cached, staged);
  };

  // Token i's verdict before its tie rank: kept whatever the rank (protected, floor, pool above v*), or a pool tie.
  const auto judge = [&](std::int64_t i, bool& keep, bool& tie) {
    keep = false, tie = false;
    const std::int64_t slot = r.slot(i);
    if (r.is_protected(s, i, slot)) {
      keep = true;
      return;
    }
    const std::uint32_t key = sharded_rank_key(r.metric[slot]);
    if (in_floor(key, i, floor_key, cutoff)) {
      keep = true;
      return;
    }
    keep = !pool_none && key > unit.prefix;
    tie = !pool_none && key == unit.prefix;
  };
  // Decides tokens c0 + tid of [c0, c0 + block) ∩ [·, end) (in_range), the pool ties ranked from `ties_before`
  // (the walk's ties before c0): keep, tie, and `rank` — the token's exclusive rank among the block's
  // tokens with keep == flag_kept, `flagged` their count; `block_ties` the block's ties. Every thread calls it.
  const auto decide = [&](std::int64_t c0, std::int64_t end, std::int64_t ties_before, bool flag_kept, bool& in_range,
                          bool& keep, bool& tie, std::int64_t& rank, std::int64_t& flagged, std::int64_t& block_ties) {
    const std::int64_t i = c0 + tid;
    in_range = i < end;
    keep = false, tie = false;
    if (in_range) judge(i, keep, tie);
    std::int64_t tie_rank = 0;
    scan(storage.scan).ExclusiveSum(tie ? 1 : 0, tie_rank, block_ties);
    __syncthreads();
    if (tie) keep = ties_before + tie_rank < quota;
    scan(storage.scan).ExclusiveSum(in_range && keep == flag_kept ? 1 : 0, rank, flagged);
    __syncthreads();
  };

  // The tail: one past the last candidate (protected tokens only from there on).
  std::int64_t last = 0;
  for (std::int64_t i = tid; i < r.length; i += sharded_threads)
    if (!r.is_protected(s, i, r.slot(i))) last = i + 1;
  const std::int64_t tail_max = reduce(storage.reduce).Reduce(last, [](std::int64_t x, std::int64_t y) { return x > y ? x : y; });
  if (tid == 0) shared_value = tail_max;
  __syncthreads();
  const std::int64_t tail = shared_value;
  // K: the kept tokens before the tail; then the ties below K (where the movers' walk starts).
  std::int64_t K = 0, ties = 0;
  for (std::int64_t c0 = 0; c0 < tail; c0 += block) {
    bool in_range, keep, tie;
    std::int64_t rank, flagged, block_ties;
    decide(c0, tail, ties, true, in_range, keep, tie, rank, flagged, block_ties);
    K += flagged, ties += block_ties;
  }
  std::int64_t ties_below_k = 0;
  for (std::int64_t c0 = 0; c0 < K; c0 += block) {
    bool in_range, keep, tie;
    std::int64_t rank, flagged, block_ties;
    decide(c0, K, ties_below_k, true, in_range, keep, tie, rank, flagged, block_ties);
    ties_below_k += block_ties;
  }
  // The compensation token's new index: a stayer keeps it, a mover or the tail's shift sets it.
  if (tid == 0)
    shared_compensation = static_cast<std::int32_t>(r.compensation >= 0 && r.compensation < K ? r.compensation : -1);

  // Movers: a block of [K, tail) at a time, its kept tokens listed by rank (stage_from), then as many
  // holes below K, in order, from where the holes' walk stopped (stage_to); each mover goes to its hole.
  std::int64_t hole_at = 0, hole_ties = 0, mover_ties = ties_below_k;
  for (std::int64_t c0 = K; c0 < tail; c0 += block) {
    bool in_range, keep, tie;
    std::int64_t rank, movers, block_ties;
    decide(c0, tail, mover_ties, true, in_range, keep, tie, rank, movers, block_ties);
    mover_ties += block_ties;
    if (in_range && keep) stage_from[rank] = c0 + tid;
    for (std::int64_t got = 0; got < movers && hole_at < K;) {
      bool hole_in_range, hole_keep, hole_tie;
      std::int64_t hole_rank, holes, hole_block_ties;
      decide(hole_at, K, hole_ties, false, hole_in_range, hole_keep, hole_tie, hole_rank, holes, hole_block_ties);
      const bool hole = hole_in_range && !hole_keep;
      if (hole && got + hole_rank < movers) stage_to[got + hole_rank] = hole_at + tid;
      if (got + holes <= movers) {  // the whole block's holes taken
        hole_at += block, hole_ties += hole_block_ties, got += holes;
        continue;
      }
      // Some holes left for the next movers: resume after the last one taken, with the ties before it.
      if (hole && got + hole_rank == movers - 1) shared_value = hole_at + tid + 1;
      __syncthreads();
      const std::int64_t resume = shared_value;
      std::int64_t ignored = 0, ties_taken = 0;
      scan(storage.scan).ExclusiveSum(hole_tie && hole_at + tid < resume ? 1 : 0, ignored, ties_taken);
      __syncthreads();
      hole_at = resume, hole_ties += ties_taken, got = movers;
    }
    __syncthreads();  // both lists complete
    for (std::int64_t k = tid; k < movers; k += sharded_threads) {
      const std::int64_t from = r.slot(stage_from[k]), to = r.slot(stage_to[k]);
      if (stage_from[k] == r.compensation) shared_compensation = static_cast<std::int32_t>(stage_to[k]);
      positions[to] = positions[from];
      r.metric[to] = r.metric[from];
      stage_from[k] = from, stage_to[k] = to;  // (this thread's own entries: slots from here on)
    }
    __syncthreads();
    for (std::int64_t e = tid; e < movers * 2 * row_units; e += sharded_threads) {
      const std::int64_t k = e / (2 * row_units), rest = e % (2 * row_units);
      unsigned char* base = rest < row_units ? keys : values;
      const std::int64_t offset = (rest % row_units) * unit_bytes;
      copy_one(base + stage_to[k] * row_bytes + offset, base + stage_from[k] * row_bytes + offset);
    }
    __syncthreads();  // the lists are rewritten by the next block
  }

  // The tail shifts down by tail − K, `chunk` tokens at a time, staged.
  const std::int64_t shift = tail - K;
  for (std::int64_t c0 = tail; shift > 0 && c0 < r.length; c0 += chunk) {
    const std::int64_t count = std::min<std::int64_t>(chunk, r.length - c0);
    std::int32_t position = 0;
    float value = 0.0f;
    if (tid < count) {
      stage_from[tid] = r.slot(c0 + tid);
      stage_to[tid] = r.slot(c0 + tid - shift);
      position = positions[stage_from[tid]];
      value = r.metric[stage_from[tid]];
    }
    __syncthreads();
    for (std::int64_t e = tid; e < count * 2 * row_units; e += sharded_threads) copy_unit(e, true);
    __syncthreads();  // the chunk read whole
    if (tid < count) {
      positions[stage_to[tid]] = position;
      r.metric[stage_to[tid]] = value;
    }
    for (std::int64_t e = tid; e < count * 2 * row_units; e += sharded_threads) copy_unit(e, false);
    __syncthreads();
  }
  const std::int64_t written = K + (r.length - tail);
  for (std::int64_t i = written + tid; i < r.length; i += sharded_threads) r.metric[r.slot(i)] = 0.0f;  // freed slots read 0
  __syncthreads();  // shared_compensation final
  if (tid == 0) {
    r.cache->compensation.index[r.head] = r.compensation >= tail && r.compensation < r.length
                                              ? static_cast<std::int32_t>(r.compensation - shift)
                                              : shared_compensation;
    scratch.new_length[r.l * s.batch * s.local + r.head] = written;
    atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->evicted_tokens),
              static_cast<unsigned long long>(r.length - written));
  }
}

/// One block per layer: lengths from new_length (−1: unchanged); paged: pages past a head's
/// new length pushed on the free list (head order, page-table order: the CPU's), tables
/// closed up. (The one-GPU step's close-up as of issue 16's first version, kept here so
/// this step does not depend on that step's scratch layout.)
template <class View>
__global__ void __launch_bounds__(sharded_threads)
    sharded_evict_close_up(const __grid_constant__ sharded_layer_set<View> set, const sharded_evict_scratch scratch,
                   std::int64_t heads_per_layer) {
  const View& cache = set.views[blockIdx.x];
  const std::int64_t* new_length = scratch.new_length + blockIdx.x * heads_per_layer;
  if constexpr (is_flat_view<View>) {
    for (std::int64_t head = threadIdx.x; head < heads_per_layer; head += sharded_threads)
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
      for (std::int64_t k = pages + threadIdx.x; k < old_count; k += sharded_threads)
        cache.free_pages[free_base + freed + (k - pages)] = cache.indices[old_begin + k];
      // Kept pages move left (write ≤ old_begin): chunk by chunk, each chunk read whole before written.
      for (std::int64_t c0 = 0; c0 < pages; c0 += sharded_threads) {
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

namespace eviction_detail {

template <>
struct sharded_step<backend::cuda> {
  static constexpr std::string_view function = "kvtrim::evict (sharded)";

  template <class View>
  static std::size_t workspace_bytes(std::span<const View> layers, const eviction::shard& shard) {
    shard.validate_common("kvtrim::evict_workspace (sharded)");
    workspace_carver carver;
    cuda_detail::sharded_evict_scratch::carve(carver, shard, layers.empty() ? 0 : layers[0].shape.kv_heads);
    return carver.bytes();
  }

  /// This rank's own checks: its views against the shard, as the one-GPU step checks them.
  template <class View>
  static void check_local(std::span<const View> layers, std::span<const eviction::metric_output<device_space>> metrics,
                          const eviction::config& cfg, const eviction::shard& shard) {
    using set_type = cuda_detail::sharded_layer_set<View>;
    const std::int64_t local = layers.empty() ? 0 : layers[0].shape.kv_heads;
    shard.heads.validate(function, local);
    if (cfg.retrieval_heads != nullptr)
      detail::fail(function, "config.retrieval_heads",
                   "null on backend::cuda (pass the device copy as device_retrieval_heads)", "a host pointer");
    if (metrics.size() != layers.size())
      detail::fail(function, "metrics", detail::cat("one metric per layer (", layers.size(), ")"),
                   std::to_string(metrics.size()));
    if (layers.empty()) return;
    if (static_cast<std::int64_t>(layers.size()) != shard.layers || shard.layers > set_type::capacity)
      detail::fail(function, "layers",
                   detail::cat("one view per layer of the step (shard.layers = ", shard.layers, ", at most ",
                               set_type::capacity, ")"),
                   std::to_string(layers.size()));
    for (std::size_t l = 0; l < layers.size(); ++l) {
      View::layout_policy::check(function, layers[l]);
      if (layers[l].shape.kv_heads != local || layers[l].batch != shard.batch ||
          layers[l].shape.head_dim != layers[0].shape.head_dim)
        detail::fail(function, "layers",
                     detail::cat("every layer with shard.batch = ", shard.batch, " sequences, ", local,
                                 " kv heads and layer 0's head_dim"),
                     detail::cat("layer ", l, " differs"));
      if (metrics[l].values == nullptr)
        detail::fail(function, "metrics", "a metric buffer for every layer", detail::cat("null for layer ", l));
      check_metric(function, metrics[l], detail::storage_slots(layers[l].storage));
      if (metrics[l].protected_window != cfg.protected_window)
        detail::fail(function, "metrics", "the protected window the eviction uses (config.protected_window)",
                     detail::cat(metrics[l].protected_window, " for layer ", l));
    }
  }

  template <class View, class Comm>
  static void evict(std::span<const View> layers, std::span<const eviction::metric_output<device_space>> metrics,
                    const eviction::config& cfg, const eviction::shard& shard, const Comm& comm, workspace scratch,
                    cudaStream_t stream, eviction::report* report, const std::uint8_t* device_retrieval_heads) {
    static_assert(cuda_detail::is_paged_view<View> || cuda_detail::is_flat_view<View>,
                  "kvtrim::evict: eviction gives heads different lengths; use layout::paged or layout::flat");
    static_assert(codec::is_plain<typename View::codec>,
                  "kvtrim::evict on backend::cuda moves codec::fp16 / bf16 / fp32 rows for now");
    // Identical on every rank: thrown before any collective.
    cfg.validate(function);
    shard.validate_common(function);
    if (cfg.scope == eviction::scope::per_head)
      detail::fail(function, "config.scope",
                   "per_layer or cross_layer (per_head units live on one rank: call the one-GPU kvtrim::evict)",
                   "per_head");
    const std::int64_t H = shard.heads.total_heads;
    detail::checked_mul(function, "config.keep", detail::checked_mul(function, "shard.layers", shard.layers, H),
                        std::max<std::int64_t>(cfg.head_target(), 0));
    const std::int64_t local = layers.empty() ? 0 : layers[0].shape.kv_heads;
    // A workspace this rank cannot use cannot carry its part of the collectives: thrown here.
    detail::check_workspace(function, scratch, workspace_bytes(layers, shard));
    workspace_carver carver(scratch);
    const auto tables = cuda_detail::sharded_evict_scratch::carve(carver, shard, local);
    const bool cross = cfg.scope == eviction::scope::cross_layer;
    const cuda_detail::sharded_evict_settings settings{
        cfg.head_target(), cfg.sinks, cfg.protected_window, cfg.alpha, device_retrieval_heads, shard.batch,
        shard.layers, local, shard.heads.first_head, H, shard.units(cross), cross, shard.heads.counted ? 1ull : 0ull};
    const std::int64_t units = settings.units, items = shard.batch * shard.layers * local;
    const auto c1 = static_cast<std::size_t>(units * unit_sums + global_sums);
    const auto digit_counts = static_cast<std::size_t>(units * digit_bins);
    const auto tie_counts = static_cast<std::size_t>(shard.batch * shard.layers * H);

    detail::check_cuda(cudaMemsetAsync(tables.zero_begin, 0, static_cast<std::size_t>(tables.zero_end - tables.zero_begin),
                                       stream),
                       function, "cudaMemsetAsync(tables)");
    const auto decide = [&](int pass) {
      cuda_detail::sharded_evict_decide<cuda_detail::sharded_threads><<<static_cast<unsigned>(std::max<std::int64_t>(1, (units + cuda_detail::sharded_threads - 1) / cuda_detail::sharded_threads)),
                                          cuda_detail::sharded_threads, 0, stream>>>(settings, tables, pass);
      detail::check_launch(function, "sharded_evict_decide");
    };

    try {
      check_local(layers, metrics, cfg, shard);
    } catch (...) {  // this rank's collectives carry a refusal flag and zeros; then it throws
      detail::check_cuda(cudaMemsetAsync(tables.sums + units * unit_sums, 1, sizeof(unsigned long long), stream),
                         function, "cudaMemsetAsync(refusal)");
      comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(tables.sums), c1, stream);
      for (int pass = 0; pass < digit_passes; ++pass)
        comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(tables.bins + pass * units * digit_bins), digit_counts,
                            stream);
      comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(tables.ties), tie_counts, stream);
      throw;
    }

    using set_type = cuda_detail::sharded_layer_set<View>;
    auto set = std::make_unique<set_type>();
    for (std::size_t l = 0; l < layers.size(); ++l) {
      set->views[l] = layers[l];
      set->metrics[l] = metrics[l].values;
    }
    set->count = static_cast<int>(layers.size());
    if (!layers.empty())
      detail::check_cuda(cudaMemsetAsync(tables.new_length, 0xff, sizeof(std::int64_t) * static_cast<std::size_t>(items),
                                         stream),
                         function, "cudaMemsetAsync(new_length)");
    const unsigned grid = static_cast<unsigned>(items);
    if (items > 0) {
      cuda_detail::sharded_evict_floors<View><<<grid, cuda_detail::sharded_threads, 0, stream>>>(*set, settings, tables);
      detail::check_launch(function, "sharded_evict_floors");
    }
    comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(tables.sums), c1, stream);
    decide(-1);
    for (int pass = 0; pass < digit_passes; ++pass) {
      unsigned long long* bins = tables.bins + static_cast<std::int64_t>(pass) * units * digit_bins;
      if (items > 0) {
        cuda_detail::sharded_evict_histogram<View><<<grid, cuda_detail::sharded_threads, 0, stream>>>(*set, settings, tables,
                                                                                                  pass);
        detail::check_launch(function, "sharded_evict_histogram");
      }
      comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(bins), digit_counts, stream);
      decide(pass);
    }
    if (items > 0) {
      cuda_detail::sharded_evict_ties<View><<<grid, cuda_detail::sharded_threads, 0, stream>>>(*set, settings, tables);
      detail::check_launch(function, "sharded_evict_ties");
    }
    comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(tables.ties), tie_counts, stream);
    if (items > 0) {
      using store_type = cuda_detail::device_element_t<typename View::codec::element>;
      const std::int64_t row_bytes = layers[0].shape.head_dim * static_cast<std::int64_t>(sizeof(store_type));
      const int chunk = cuda_detail::sharded_stage_tokens(row_bytes);
      const auto stage_bytes = static_cast<std::size_t>(2 * row_bytes * chunk);
      const auto kernel = cuda_detail::sharded_evict_compact<View>;
      detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(stage_bytes)),
                         function, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
      kernel<<<grid, cuda_detail::sharded_threads, stage_bytes, stream>>>(*set, settings, tables, chunk);
      detail::check_launch(function, "sharded_evict_compact");
      cuda_detail::sharded_evict_close_up<View>
          <<<static_cast<unsigned>(layers.size()), cuda_detail::sharded_threads, 0, stream>>>(*set, tables,
                                                                                            layers[0].heads());
      detail::check_launch(function, "sharded_evict_close_up");
    }
    if (report != nullptr)
      detail::check_cuda(cudaMemcpyAsync(report, tables.report, sizeof(eviction::report), cudaMemcpyDeviceToDevice, stream),
                         function, "cudaMemcpyAsync(report)");
  }
};

}  // namespace eviction_detail

/// Scratch the sharded kvtrim::evict needs on this rank, on the device.
template <class Backend, class View>
  requires std::same_as<Backend, backend::cuda>
std::size_t evict_workspace(std::span<const View> layers, const eviction::shard& shard) {
  return eviction_detail::sharded_step<Backend>::workspace_bytes(layers, shard);
}

/// One eviction step over this rank's kv heads of every layer, on `stream`
/// (eviction/sharded.hpp; per_layer and cross_layer scopes; 6 collectives, no
/// host synchronisation). `report` (device, optional): the units and this rank's
/// evicted tokens and freed pages. config.retrieval_heads must be null: pass the
/// device copy of the [layers · total_heads] mask as device_retrieval_heads.
template <class Backend, class View, comm::communicator<cudaStream_t> Comm>
  requires std::same_as<Backend, backend::cuda>
void evict(std::span<const View> layers, std::span<const eviction::metric_output<device_space>> metrics,
           const eviction::config& cfg, const eviction::shard& shard, const Comm& comm, workspace scratch,
           cudaStream_t stream, eviction::report* report = nullptr,
           const std::uint8_t* device_retrieval_heads = nullptr) {
  eviction_detail::sharded_step<Backend>::evict(layers, metrics, cfg, shard, comm, scratch, stream, report,
                                                device_retrieval_heads);
}

}  // namespace kvtrim
