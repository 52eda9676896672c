// kvtrim/backend/cuda/select_top_k.cuh — the selection stage on the GPU: a
// radix select per head, then a stable compaction.
//
// Same contract as the CPU reference (backend/cpu/select_top_k.hpp): per head,
// the keep_count tokens of highest score, ties to the lower index, NaN below
// every number, −0 equal to +0, listed in ascending token order.
//
// Why a radix select and not a sort: a head keeps "every token above a
// threshold score, and the first few (in token order) of the tokens AT the
// threshold". Finding the threshold needs only counts, and counts come from
// histograms of an order-preserving 32-bit key of the score — 4 passes of 8
// bits (CUB's radix digit width on this hardware class), each a read of the
// scores and one small decision per head. The full segmented sort it replaces
// (cub::DeviceSegmentedSort, 64 segments of 32k at workload W) moved keys and
// values through several passes and dominated the compress (issue 10); the
// sort's output order was thrown away anyway (the kept list is in token order).
//
// The same threshold search serves budget::adaptive (backend/cuda/adaptive.cuh),
// where a GROUP of heads (a sequence's kv heads) shares one threshold and the
// count at a candidate threshold is Σ_h max(floor_h, tokens of h at or above it)
// rather than a plain count; a head of select_top_k is a group of one head
// with floor 0. Everything below is written for groups.
//
// A head of at most resident_select_tokens (40960, where the device's shared memory
// holds them) takes one launch (which also writes the offsets, up to 1024 heads; more
// heads take keep_offsets' scan first): select_resident keeps its keys in
// shared memory — of one block, or split over a thread-block cluster of up to 8 on
// sm_90 — and runs the steps below there (see its comment). Longer heads, and
// budget::adaptive's groups:
// Steps (all on the stream, no host round trip; 7 launches and one memset):
//   1. keep_offsets: offsets = exclusive scan of the clamped keep counts (one
//      block, cub::BlockScan);
//   2. for pass p = 0..3, radix_pass: per head, the 256-bin histogram of key
//      digit p among the tokens whose higher digits equal the group's prefix so
//      far (shared-memory bins, one global atomic per bin and block); the block
//      that finishes a group's last chunk (an arrival counter behind a
//      threadfence) decides for the group: the largest digit whose
//      count-at-or-above still reaches the target, appended to the prefix.
//      After pass 3 the prefix is the threshold key v*, `above` counts keys
//      > v* and `ties` keys = v*;
//   3. count_selected, then compact_selected, per (head, chunk of ≤ 1/256 of
//      the head): each chunk's (keys above v*, keys equal to v*) counts; then
//      each chunk, starting from its earlier chunks' sum, a block-wide scan of
//      the packed pair in token order gives every kept token its output slot:
//      slot = above_before + min(ties_before, ties_kept).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

namespace cuda_detail {

/// An order-preserving unsigned key: a larger key ranks first. NaN maps to 0,
/// below −∞ (0x007fffff); −0 maps to +0's key (ranks_before calls them equal).
__device__ __forceinline__ std::uint32_t rank_key(float score) {
  if (isnan(score)) return 0u;
  const std::uint32_t bits = score == 0.0f ? 0u : __float_as_uint(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// rank_key(+∞): the key of a scorer's protected tokens.
inline constexpr std::uint32_t infinity_key = 0xff800000u;

inline constexpr int radix_bits = 8;
inline constexpr int radix_bins = 1 << radix_bits;
inline constexpr int radix_passes = 32 / radix_bits;

/// Scores as the kernels read them: [batch, kv_heads, tokens] with any strides.
struct score_rows {
  const float* data;
  std::int64_t kv_heads, tokens;
  std::int64_t batch_stride, head_stride, token_stride;

  __device__ __forceinline__ const float* row(std::int64_t head) const {
    return data + (head / kv_heads) * batch_stride + (head % kv_heads) * head_stride;
  }
};

inline score_rows rows_of(const tensor_view<const float, 3, device_space>& scores) {
  return {scores.data, scores.extent(1), scores.extent(2), scores.stride(0), scores.stride(1), scores.stride(2)};
}

/// Per-head and per-group state of the threshold search (carved from the workspace).
struct threshold_state {
  std::uint32_t* histograms = nullptr;  // [heads × radix_bins]; zero between passes
  std::uint32_t* infinities = nullptr;  // [heads]: tokens scored +∞ (filled in pass 0)
  std::uint32_t* arrivals = nullptr;    // [groups]: blocks of this pass done with the group; zero between passes
  std::uint32_t* prefix = nullptr;      // [groups]: the key digits fixed so far; after pass 3, v*
  std::int64_t* floors = nullptr;       // [heads]: tokens a head keeps whatever the threshold
  std::int64_t* above = nullptr;        // [heads]: tokens whose key is above the prefix's range
  std::int64_t* ties = nullptr;         // [heads]: tokens whose key equals v* (after pass 3)
  std::int64_t* kept = nullptr;         // [heads]: the head's final count (after pass 3)
  std::size_t zeroed_bytes = 0;         // histograms, infinities and arrivals: adjacent, one memset

  template <class Carver>
  static threshold_state carve(Carver& carver, std::int64_t heads, std::int64_t groups) {
    threshold_state s;
    // heads·radix_bins·4 bytes is a multiple of the carver's 256-byte alignment,
    // so these three are adjacent (no padding between) and one memset zeroes them.
    s.histograms = carver.template take<std::uint32_t>(heads * radix_bins);
    s.infinities = carver.template take<std::uint32_t>(heads);
    s.arrivals = carver.template take<std::uint32_t>(groups);
    if (s.histograms != nullptr)
      s.zeroed_bytes = static_cast<std::size_t>(reinterpret_cast<const std::byte*>(s.arrivals + groups) -
                                                reinterpret_cast<const std::byte*>(s.histograms));
    s.prefix = carver.template take<std::uint32_t>(groups);
    s.floors = carver.template take<std::int64_t>(heads);
    s.above = carver.template take<std::int64_t>(heads);
    s.ties = carver.template take<std::int64_t>(heads);
    s.kept = carver.template take<std::int64_t>(heads);
    return s;
  }
};

/// What the decision of one group needs in shared memory.
struct decide_storage {
  unsigned long long reached[radix_bins];  // F at each candidate digit, from the top (index j: digit 255 − j)
  int chosen_digit;
};

/// One head's bins as a warp sees them: lane l holds the 8 digits 255 − 8l − i
/// (i = 0..7, from the top), their running sum within the lane, and the tokens
/// in the digits of the lanes before it; tokens with digit ≥ 255 − 8l − i are
/// then before + running[i] — a warp-wide suffix scan without block barriers.
struct warp_bins {
  static constexpr int per_lane = radix_bins / 32;
  unsigned long long count[per_lane], running[per_lane], before;

  __device__ void load(const std::uint32_t* histogram, int lane) {
#pragma unroll
    for (int i = 0; i < per_lane; ++i) count[i] = __ldcg(&histogram[radix_bins - 1 - (lane * per_lane + i)]);
    unsigned long long sum = 0;
#pragma unroll
    for (int i = 0; i < per_lane; ++i) running[i] = sum += count[i];
    unsigned long long inclusive = sum;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const unsigned long long other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    before = inclusive - sum;
  }
};

/// One group's decision after pass `pass`, by a whole block of radix_bins threads
/// (each warp one head at a time). F(v) = Σ_h max(floor_h, tokens of h with key
/// ≥ v) never grows with v; the search wants v* = the largest v with F(v) ≥
/// target. F is evaluated at the lowest key of every digit (prefix so far, that
/// digit, zeros); the chosen digit is the largest one whose F still reaches the
/// target. After the last pass the counts follow from above/ties/floors.
/// The histograms were written by other blocks' atomics in this same kernel:
/// they (and everything this block reads) are loaded from L2 (__ldcg).
template <class Rule>
__device__ void decide_group(const Rule& rule, std::int64_t group, std::int64_t heads_per_group, int pass,
                             const threshold_state& state, decide_storage& storage) {
  constexpr int warps = radix_bins / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int shift = 32 - radix_bits * (pass + 1);
  const std::int64_t first = group * heads_per_group;
  const long long target = rule.target(group);
  if (pass == 0)
    for (std::int64_t h = threadIdx.x; h < heads_per_group; h += radix_bins) {
      state.floors[first + h] = rule.floor(group, h, __ldcg(&state.infinities[first + h]));
      state.above[first + h] = 0;
    }
  storage.reached[threadIdx.x] = 0;
  __syncthreads();
  for (std::int64_t h = warp; h < heads_per_group; h += warps) {
    warp_bins bins;
    bins.load(state.histograms + (first + h) * radix_bins, lane);
    const unsigned long long floor = static_cast<unsigned long long>(__ldcg(&state.floors[first + h]));
    const unsigned long long above = static_cast<unsigned long long>(__ldcg(&state.above[first + h]));
#pragma unroll
    for (int i = 0; i < warp_bins::per_lane; ++i) {
      const unsigned long long tokens = above + bins.before + bins.running[i];
      atomicAdd(&storage.reached[lane * warp_bins::per_lane + i], tokens > floor ? tokens : floor);
    }
  }
  __syncthreads();
  // F falls as the digit rises, i.e. rises with the index j = 255 − digit: the
  // entries short of the target are the highest digits. F at digit 0 reaches
  // the target (the previous pass chose this prefix for that), so at most 255 fall short.
  const int short_digits =
      __syncthreads_count(static_cast<long long>(storage.reached[threadIdx.x]) < target);
  const int digit = radix_bins - 1 - (short_digits < radix_bins ? short_digits : radix_bins - 1);
  // Tokens above the new prefix: add each head's bins above the chosen digit;
  // tokens at it (the ties, once the prefix is the whole key): its own bin.
  const int j = radix_bins - 1 - digit;
  for (std::int64_t h = warp; h < heads_per_group; h += warps) {
    warp_bins bins;
    bins.load(state.histograms + (first + h) * radix_bins, lane);
#pragma unroll
    for (int i = 0; i < warp_bins::per_lane; ++i)
      if (lane * warp_bins::per_lane + i == j) {
        state.above[first + h] += static_cast<long long>(bins.before + bins.running[i] - bins.count[i]);
        state.ties[first + h] = static_cast<long long>(bins.count[i]);
      }
  }
  __syncthreads();
  for (std::int64_t h = 0; h < heads_per_group; ++h)  // zero for the next pass (this block alone reads them now)
    state.histograms[(first + h) * radix_bins + threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    const std::uint32_t prefix = (pass == 0 ? 0u : __ldcg(&state.prefix[group])) | (std::uint32_t(digit) << shift);
    state.prefix[group] = prefix;
    state.arrivals[group] = 0;  // every block of this pass has arrived; the next pass counts again
    if (pass == radix_passes - 1) {
      // v* is fixed: every head keeps max(floor, above), and the tokens at v*
      // fill the rest of the target in (head, token) order — the heads in
      // order, each taking what its ties add over its floor.
      long long remaining = target;
      for (std::int64_t h = 0; h < heads_per_group; ++h) {
        const long long floor = state.floors[first + h], above = state.above[first + h];
        remaining -= above > floor ? above : floor;
      }
      for (std::int64_t h = 0; h < heads_per_group; ++h) {
        const long long floor = state.floors[first + h], above = state.above[first + h];
        const long long base = above > floor ? above : floor;
        const long long full = above + state.ties[first + h] > floor ? above + state.ties[first + h] : floor;
        long long take = full - base < remaining ? full - base : remaining;
        take = take > 0 ? take : 0;
        remaining -= take;
        state.kept[first + h] = base + take;
        rule.write_count(first + h, base + take);
      }
    }
  }
  __syncthreads();
}

// Kernels are templates (over block shapes and the group rule) so that any
// number of translation units may include this header: a template's
// instantiations merge at link time, a plain __global__ function's host stub
// would be defined in every .cu file that includes it (issue 9; tests/link/).

/// Pass `pass` of the threshold search. Work items are (head, chunk of
/// radix_bins·Items tokens): each counts key digit `pass` (most significant
/// first) of the tokens whose higher digits equal the group's prefix, in
/// shared-memory bins added to the head's global histogram. The block that
/// completes a group's last work item (an arrival counter; the threadfence
/// pattern, so no second launch) makes the group's decision.
template <int Items, class Rule>
__global__ void __launch_bounds__(radix_bins) radix_pass(score_rows scores, std::int64_t heads,
                                                         std::int64_t heads_per_group, int pass, Rule rule,
                                                         threshold_state state) {
  __shared__ std::uint32_t bins[radix_bins];
  __shared__ std::uint32_t infinities;
  __shared__ bool last_arrival;
  __shared__ decide_storage storage;
  constexpr std::int64_t chunk_tokens = std::int64_t{radix_bins} * Items;
  const std::int64_t chunks = scores.tokens > 0 ? (scores.tokens + chunk_tokens - 1) / chunk_tokens : 1;
  const std::int64_t group_items = heads_per_group * chunks;
  const int shift = 32 - radix_bits * (pass + 1);
  const std::uint32_t high_mask = pass == 0 ? 0u : ~0u << (32 - radix_bits * pass);
  for (std::int64_t work = blockIdx.x; work < heads * chunks; work += gridDim.x) {
    const std::int64_t head = work / chunks;
    const std::int64_t group = head / heads_per_group;
    const std::int64_t begin = (work % chunks) * chunk_tokens;
    const std::int64_t end = begin + chunk_tokens < scores.tokens ? begin + chunk_tokens : scores.tokens;
    bins[threadIdx.x] = 0;
    if (threadIdx.x == 0) infinities = 0;
    __syncthreads();
    const float* row = scores.row(head);
    const std::uint32_t fixed = pass == 0 ? 0u : __ldcg(&state.prefix[group]);
    // All Items loads first (coalesced across the block, independent of each
    // other), then the counting: a loop that loads, counts and loads again keeps
    // one load in flight per thread and waits a full memory latency per token
    // (the first H200 profile: ~20 µs per pass, latency-bound).
    float values[Items];
#pragma unroll
    for (int i = 0; i < Items; ++i) {
      const std::int64_t token = begin + threadIdx.x + std::int64_t{i} * radix_bins;
      values[i] = token < end ? row[token * scores.token_stride] : 0.0f;
    }
    std::uint32_t my_infinities = 0;
#pragma unroll
    for (int i = 0; i < Items; ++i) {
      if (begin + threadIdx.x + std::int64_t{i} * radix_bins >= end) break;
      const std::uint32_t key = rank_key(values[i]);
      if (((key ^ fixed) & high_mask) == 0) atomicAdd(&bins[(key >> shift) & (radix_bins - 1)], 1u);
      my_infinities += key == infinity_key ? 1u : 0u;
    }
    if (pass == 0 && my_infinities > 0) atomicAdd(&infinities, my_infinities);
    __syncthreads();
    if (bins[threadIdx.x] > 0) atomicAdd(&state.histograms[head * radix_bins + threadIdx.x], bins[threadIdx.x]);
    if (pass == 0 && threadIdx.x == 0 && infinities > 0) atomicAdd(&state.infinities[head], infinities);
    __threadfence();  // this block's counts are visible device-wide before its arrival is
    __syncthreads();
    if (threadIdx.x == 0)
      last_arrival = atomicAdd(&state.arrivals[group], 1u) == static_cast<std::uint32_t>(group_items - 1);
    __syncthreads();
    if (last_arrival) {
      __threadfence();
      decide_group(rule, group, heads_per_group, pass, state, storage);
    }
  }
}

/// select_top_k's rule: every head its own group, floor 0, target its clamped keep count.
struct select_rule {
  const std::int32_t* keep_counts;
  std::int64_t tokens;
  __device__ long long target(std::int64_t head) const {
    const long long count = keep_counts[head];
    return count < 0 ? 0 : (count > tokens ? tokens : count);
  }
  __device__ long long floor(std::int64_t, std::int64_t, std::uint32_t) const { return 0; }
  __device__ void write_count(std::int64_t, long long) const {}
};

/// Runs the four passes of the threshold search on `stream`.
template <class Rule>
void find_thresholds(const score_rows& scores, std::int64_t heads, std::int64_t heads_per_group, const Rule& rule,
                     const threshold_state& state, cudaStream_t stream, std::string_view function) {
  constexpr int items = 16;
  detail::check_cuda(cudaMemsetAsync(state.histograms, 0, state.zeroed_bytes, stream), function,
                     "cudaMemsetAsync(histograms)");
  const std::int64_t chunks = ceil_div(std::max<std::int64_t>(scores.tokens, 1), std::int64_t{radix_bins} * items);
  const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>(heads * chunks, 1, 1 << 20));
  for (int pass = 0; pass < radix_passes; ++pass) {
    radix_pass<items, Rule><<<blocks, radix_bins, 0, stream>>>(scores, heads, heads_per_group, pass, rule, state);
    detail::check_launch(function, "radix_pass");
  }
}

/// The compaction's work split: each head into at most max_chunks chunks of a
/// whole number of tiles (radix_bins · compaction_items tokens), so a block
/// finds its chunk's place by adding at most max_chunks − 1 earlier counts.
inline constexpr int compaction_items = 16;
inline constexpr std::int64_t compaction_tile = std::int64_t{radix_bins} * compaction_items;
inline constexpr std::int64_t compaction_max_chunks = radix_bins;

inline std::int64_t compaction_chunk_tokens(std::int64_t tokens) {
  return ceil_div(ceil_div(std::max<std::int64_t>(tokens, 1), compaction_max_chunks), compaction_tile) *
         compaction_tile;
}
inline std::int64_t compaction_chunks(std::int64_t tokens) {
  return ceil_div(std::max<std::int64_t>(tokens, 1), compaction_chunk_tokens(tokens));
}

/// The packed pair counted for every token: (key above v*) in the high 32 bits,
/// (key equal to v*) in the low 32. A head has < 2^31 tokens, so sums never carry.
__device__ __forceinline__ unsigned long long selection_flags(std::uint32_t key, std::uint32_t threshold) {
  return key > threshold ? (1ull << 32) : key == threshold ? 1ull : 0ull;
}

/// Per (head, chunk): the chunk's packed (above, ties) count. Loads are
/// coalesced (token = tile + i·radix_bins + thread) and all issued before use.
template <int Items>
__global__ void __launch_bounds__(radix_bins) count_selected(score_rows scores, std::int64_t heads,
                                                             std::int64_t chunk_tokens, std::int64_t chunks,
                                                             threshold_state state, unsigned long long* chunk_counts) {
  using block_reduce = cub::BlockReduce<unsigned long long, radix_bins>;
  __shared__ typename block_reduce::TempStorage reduce_storage;
  constexpr std::int64_t tile_tokens = std::int64_t{radix_bins} * Items;
  for (std::int64_t work = blockIdx.x; work < heads * chunks; work += gridDim.x) {
    const std::int64_t head = work / chunks;
    const std::int64_t begin = (work % chunks) * chunk_tokens;
    const std::int64_t end = begin + chunk_tokens < scores.tokens ? begin + chunk_tokens : scores.tokens;
    const std::uint32_t threshold = state.prefix[head];
    const float* row = scores.row(head);
    unsigned long long mine = 0;
    for (std::int64_t tile = begin; tile < end; tile += tile_tokens) {
      float values[Items];
#pragma unroll
      for (int i = 0; i < Items; ++i) {
        const std::int64_t token = tile + threadIdx.x + std::int64_t{i} * radix_bins;
        values[i] = token < end ? row[token * scores.token_stride] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < Items; ++i)
        if (tile + threadIdx.x + std::int64_t{i} * radix_bins < end) mine += selection_flags(rank_key(values[i]), threshold);
    }
    const unsigned long long total = block_reduce(reduce_storage).Sum(mine);
    if (threadIdx.x == 0) chunk_counts[work] = total;
    __syncthreads();  // the reduce storage is reused by the next work item
  }
}

/// Per (head, chunk): writes the chunk's kept tokens, in ascending order, at
/// kept_tokens[offsets[head] + slot]: every token whose key is above v*, and
/// the first kept − above (in token order) of those at v*; slot = above_before +
/// min(ties_before, ties_kept). The chunk starts from the sum of the earlier
/// chunks' counts; each tile is loaded coalesced into shared memory (one pad
/// word per 16, so the blocked reads below hit 32 different banks), then each
/// thread takes Items consecutive tokens and a block scan orders them.
template <int Items>
__global__ void __launch_bounds__(radix_bins) compact_selected(score_rows scores, std::int64_t heads,
                                                               std::int64_t chunk_tokens, std::int64_t chunks,
                                                               threshold_state state,
                                                               const unsigned long long* chunk_counts,
                                                               const std::int64_t* offsets, std::int32_t* kept_tokens) {
  static_assert(Items == 16, "the shared tile's padding assumes 16 tokens per thread");
  using block_scan = cub::BlockScan<unsigned long long, radix_bins>;
  using block_reduce = cub::BlockReduce<unsigned long long, radix_bins>;
  constexpr std::int64_t tile_tokens = std::int64_t{radix_bins} * Items;
  __shared__ union {
    typename block_scan::TempStorage scan;
    typename block_reduce::TempStorage reduce;
  } storage;
  __shared__ std::uint32_t tile_keys[tile_tokens + tile_tokens / 16];
  __shared__ unsigned long long chunk_start;
  const auto padded = [](std::int64_t j) { return j + j / 16; };
  for (std::int64_t work = blockIdx.x; work < heads * chunks; work += gridDim.x) {
    const std::int64_t head = work / chunks, chunk = work % chunks;
    const std::int64_t begin = chunk * chunk_tokens;
    const std::int64_t end = begin + chunk_tokens < scores.tokens ? begin + chunk_tokens : scores.tokens;
    const std::uint32_t threshold = state.prefix[head];
    const std::int64_t ties_kept = state.kept[head] - state.above[head];
    std::int32_t* out = kept_tokens + offsets[head];
    const float* row = scores.row(head);
    // chunks ≤ radix_bins: one earlier chunk per thread at most.
    const unsigned long long earlier =
        threadIdx.x < chunk ? chunk_counts[head * chunks + threadIdx.x] : 0ull;
    unsigned long long running = block_reduce(storage.reduce).Sum(earlier);  // valid in thread 0
    __syncthreads();
    if (threadIdx.x == 0) chunk_start = running;
    __syncthreads();
    running = chunk_start;
    for (std::int64_t tile = begin; tile < end; tile += tile_tokens) {
      float values[Items];
#pragma unroll
      for (int i = 0; i < Items; ++i) {
        const std::int64_t token = tile + threadIdx.x + std::int64_t{i} * radix_bins;
        values[i] = token < end ? row[token * scores.token_stride] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < Items; ++i) {
        const std::int64_t j = threadIdx.x + std::int64_t{i} * radix_bins;
        tile_keys[padded(j)] = rank_key(values[i]);
      }
      __syncthreads();
      const std::int64_t first = std::int64_t{threadIdx.x} * Items;  // within the tile
      std::uint32_t keys[Items];
      unsigned long long mine = 0;
#pragma unroll
      for (int i = 0; i < Items; ++i) {
        keys[i] = tile_keys[padded(first + i)];
        mine += tile + first + i < end ? selection_flags(keys[i], threshold) : 0ull;
      }
      unsigned long long before = 0, tile_total = 0;
      block_scan(storage.scan).ExclusiveSum(mine, before, tile_total);
      __syncthreads();  // tile_keys and the scan storage are reused by the next tile
      before += running;
      running += tile_total;
#pragma unroll
      for (int i = 0; i < Items; ++i) {
        if (tile + first + i >= end) break;
        const std::int64_t above = static_cast<std::int64_t>(before >> 32);
        const std::int64_t ties = static_cast<std::int64_t>(before & 0xffffffffull);
        const auto token = static_cast<std::int32_t>(tile + first + i);
        if (keys[i] > threshold) {
          out[above + (ties < ties_kept ? ties : ties_kept)] = token;
          before += 1ull << 32;
        } else if (keys[i] == threshold) {
          if (ties < ties_kept) out[above + ties] = token;
          before += 1ull;
        }
      }
    }
  }
}

/// offsets[0] = 0, offsets[h + 1] = Σ_{h' ≤ h} clamp(keep_counts[h'], 0, tokens): one
/// block (a CUB block scan over tiles of heads with a running total), one launch —
/// heads are a few thousand at most, and the scan's result is needed by the
/// compaction anyway; a device-wide scan would be two launches and a memset.
template <int Threads>
__global__ void __launch_bounds__(Threads) keep_offsets(const std::int32_t* keep_counts, std::int64_t* offsets,
                                                        std::int64_t heads, std::int64_t tokens) {
  using block_scan = cub::BlockScan<long long, Threads>;
  __shared__ typename block_scan::TempStorage storage;
  if (threadIdx.x == 0) offsets[0] = 0;
  long long running = 0;
  for (std::int64_t tile = 0; tile < heads; tile += Threads) {
    const std::int64_t head = tile + threadIdx.x;
    long long count = head < heads ? keep_counts[head] : 0;
    count = count < 0 ? 0 : (count > tokens ? tokens : count);
    long long inclusive = 0, tile_total = 0;
    block_scan(storage).InclusiveSum(count, inclusive, tile_total);
    __syncthreads();  // the scan storage is reused by the next tile
    if (head < heads) offsets[head + 1] = running + inclusive;
    running += tile_total;
  }
}

// ---- A head's keys resident in shared memory: one block, or a cluster of blocks ----
// The threshold search above is 4 launches of short kernels whose last block
// decides for the head, then a count and a compaction: 6 launches over the scores
// and a serial decision at the end of each, ~93 µs at W (64 heads of 32768, H200,
// 2026-12-01) for 8 MB of scores. A head of up to resident_select_tokens fits in
// shared memory as its 32-bit keys (160 KB at 40960): one launch loads them once and
// runs the same four digit decisions and the same ordered compaction on them there.
// Same rule, same output, bit for bit (tests/cuda/budgets_test.cu).
//
// One block a head left W's 64 heads on 64 of 132 SMs, latency-bound at ~64 µs
// whatever the batch (H200 and H100, 2026-12-05). On sm_90 a head's keys are split
// over a thread-block cluster of `blocks_per_head` blocks (plan_resident_select:
// up to 8, so that heads × blocks fill about two blocks an SM), each holding a
// contiguous share of the tokens: every pass, each block's 256-bin histogram of its
// share, then every block sums the cluster's histograms through distributed shared
// memory and takes the same decision; the compaction orders the blocks by rank as
// it orders the warps within a block. Counts within a warp's segment fit 16 bits
// (≤ 40960 tokens): a packed (above, ties) pair is one word; across blocks, ints.

inline constexpr std::int64_t resident_select_tokens = 40960;
inline constexpr int resident_select_threads = 512;
inline constexpr int resident_select_max_blocks = 8;  // the portable cluster size
/// Up to this many heads select_resident computes the kept lists' offsets itself (each block
/// sums the counts before its head: O(heads) loads a block, a few µs of L2 traffic at this
/// bound) instead of a keep_offsets launch first (~3 µs of a launch at W).
inline constexpr std::int64_t resident_offsets_heads = 1024;
/// 0: one block a head on every device (benchmarks compare the two; one value per program).
#ifndef KVTRIM_CUDA_SELECT_CLUSTERS
#define KVTRIM_CUDA_SELECT_CLUSTERS 1
#endif

/// Tokens of a head one block of `blocks_per_head` holds: whole warps' worth (the last block fewer).
__host__ __device__ inline std::int64_t resident_select_share(std::int64_t tokens, int blocks_per_head) {
  return blocks_per_head == 1 ? tokens : ((tokens + blocks_per_head - 1) / blocks_per_head + 31) / 32 * 32;
}
inline std::size_t resident_select_shared_bytes(std::int64_t tokens, int blocks_per_head = 1) {
  return static_cast<std::size_t>(resident_select_share(tokens, blocks_per_head)) * sizeof(std::uint32_t);
}

/// The blocks that share a head: a cluster (sm_90, blocks_per_head > 1) or the block alone.
struct head_blocks {
  int count;
  __device__ __forceinline__ void sync() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (count > 1) {
      cooperative_groups::this_cluster().sync();  // also orders this block's shared stores for its peers
      return;
    }
#endif
    __syncthreads();  // below sm_90 count is 1: select_resident traps otherwise
  }
  /// `local`, a variable of this block's shared memory, in the block of cluster rank `rank`.
  template <class T>
  __device__ __forceinline__ const T* peer(const T* local, int rank) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (count > 1) return cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(local), rank);
#endif
    (void)rank;
    return local;
  }
};

/// `offsets_here`: the kernel also writes `offsets` (keep_offsets' output) — each block sums the
/// clamped counts of the heads before its own, so the separate scan launch is saved (heads ≤
/// resident_offsets_heads: that sum is O(heads) a block); otherwise it reads them.
template <int Threads>
__global__ void __launch_bounds__(Threads) select_resident(score_rows scores, const std::int32_t* keep_counts,
                                                           std::int64_t* offsets, std::int32_t* kept_tokens,
                                                           int blocks_per_head, bool offsets_here) {
  static_assert(Threads >= radix_bins && Threads % 32 == 0);
  constexpr int warps = Threads / 32;
  using block_scan = cub::BlockScan<int, Threads>;
  extern __shared__ std::uint32_t resident_keys[];
  __shared__ std::uint32_t warp_bins[warps][radix_bins];  // one histogram per warp
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The block's histogram, read by its cluster: one buffer per pass parity, so a pass's
  // buffer is written again two passes later, after a cluster barrier every peer reaches only
  // once it has read it — the passes need one cluster barrier each, not two.
  __shared__ std::uint32_t block_bins[2][radix_bins];
  __shared__ int block_counts[2];                   // the block's (above, ties), read by its cluster
#else
  std::uint32_t (*const block_bins)[radix_bins] = nullptr;  // never read below sm_90 (one block a head)
  int* const block_counts = nullptr;
#endif
  __shared__ typename block_scan::TempStorage scan_storage;
  __shared__ int chosen_above, chosen_ties;
  __shared__ unsigned warp_counts[warps];  // packed (above << 16 | ties) of each warp's segment

  const head_blocks cluster{blocks_per_head};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
  if (blocks_per_head > 1) __trap();  // plan_resident_select launches clusters only into sm_90 code
#endif
  // A cluster's blocks are consecutive in x: block rank = blockIdx.x % blocks_per_head.
  const std::int64_t head = blockIdx.x / blocks_per_head;
  const int rank = static_cast<int>(blockIdx.x % blocks_per_head);
  const int tokens = static_cast<int>(scores.tokens);  // ≤ resident_select_tokens
  const int share = static_cast<int>(resident_select_share(tokens, blocks_per_head));
  const int first = rank * share < tokens ? rank * share : tokens;          // this block's tokens [first, first + local)
  const int local = tokens - first < share ? tokens - first : share;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const float* row = scores.row(head) + std::int64_t{first} * scores.token_stride;
  // 0. The head's place in kept_tokens, Σ clamp(keep_counts[h'], 0, tokens) over h' < head (the
  //    same sum keep_offsets' scan makes), is needed only by the compaction (step 3): the first
  //    count a thread sums is loaded now and used there, so its latency hides behind the passes.
  const int first_count = offsets_here && threadIdx.x < head ? keep_counts[threadIdx.x] : 0;
  // 1. The keys, 8 loads in flight per thread (a load, a store, a load … waits a
  //    memory latency per token).
  constexpr int batch = 8;
  for (int base = 0; base < local; base += Threads * batch) {
    float values[batch];
#pragma unroll
    for (int i = 0; i < batch; ++i) {
      const int j = base + static_cast<int>(threadIdx.x) + i * Threads;
      values[i] = j < local ? row[j * scores.token_stride] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < batch; ++i) {
      const int j = base + static_cast<int>(threadIdx.x) + i * Threads;
      if (j < local) resident_keys[j] = rank_key(values[i]);
    }
  }
  const int count = keep_counts[head];
  const int target = count < 0 ? 0 : (count > tokens ? tokens : count);

  // 2. The four digits of v*, most significant first: F(v) = tokens with key ≥ v,
  //    the largest digit whose F still reaches the target (decide_group's rule with
  //    one head and floor 0). Every block of the head sums the same histograms in the
  //    same order, so all take the same decision.
  std::uint32_t prefix = 0;
  int above = 0, ties = 0;  // tokens above the prefix's range; at its last digit
  for (int pass = 0; pass < radix_passes; ++pass) {
    const int shift = 32 - radix_bits * (pass + 1);
    const std::uint32_t high_mask = pass == 0 ? 0u : ~0u << (32 - radix_bits * pass);
    for (int b = static_cast<int>(threadIdx.x); b < warps * radix_bins; b += Threads)
      warp_bins[b / radix_bins][b % radix_bins] = 0;
    __syncthreads();  // the bins are zero (and, in pass 0, every key is stored)
    for (int base = 0; base < local; base += Threads) {  // the same trip count for every lane
      const int j = base + static_cast<int>(threadIdx.x);
      const std::uint32_t key = j < local ? resident_keys[j] : 0u;
      const bool counted = j < local && ((key ^ prefix) & high_mask) == 0;
      const unsigned counting = __ballot_sync(0xffffffffu, counted);
      if (counted) {
        // Lanes with the same digit add once (their count): equal scores would
        // otherwise serialise 32 atomics on one bin.
        const std::uint32_t digit = (key >> shift) & (radix_bins - 1);
        const unsigned peers = __match_any_sync(counting, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&warp_bins[warp][digit], static_cast<std::uint32_t>(__popc(peers)));
      }
    }
    __syncthreads();
    // Thread t < 256 holds digit 255 − t: the block's count, then the head's (a cluster's sum).
    const int digit = radix_bins - 1 - static_cast<int>(threadIdx.x);
    int bin = 0;
    if (threadIdx.x < radix_bins) {
#pragma unroll
      for (int w = 0; w < warps; ++w) bin += static_cast<int>(warp_bins[w][digit]);
    }
    if (blocks_per_head > 1) {  // uniform over the grid
      if (threadIdx.x < radix_bins) block_bins[pass & 1][digit] = static_cast<std::uint32_t>(bin);
      cluster.sync();  // every block's histogram is complete and visible to its cluster
      if (threadIdx.x < radix_bins) {
        bin = 0;
        for (int r = 0; r < blocks_per_head; ++r) bin += static_cast<int>(cluster.peer(block_bins[pass & 1], r)[digit]);
      }
    }
    int at_or_above = 0;
    block_scan(scan_storage).InclusiveSum(bin, at_or_above);
    // F at digit 255 − t is above + at_or_above(t); it grows with t, and t = 255
    // (digit 0) reaches the target: above + the prefix's range ≥ target holds at
    // the start (tokens ≥ target) and every choice keeps it.
    const int short_digits = __syncthreads_count(threadIdx.x < radix_bins && above + at_or_above < target);
    const int chosen = short_digits < radix_bins ? short_digits : radix_bins - 1;  // (never clamps: see above)
    if (static_cast<int>(threadIdx.x) == chosen) chosen_above = above + at_or_above - bin, chosen_ties = bin;
    // chosen_* are written before this and read after it; the scan storage is read before it and
    // written again only after the next pass's barriers. A block barrier suffices here:
    // block_bins[pass & 1] is written again in pass + 2, after pass + 1's cluster barrier, which each
    // peer arrives at only after its reads of this pass. That relies on the cluster barrier's arrive
    // being a release and its wait an acquire (a relaxed arrive would break it). Each costs a
    // GPU-scope fence on sm_90 (MEMBAR.ALL.GPU), hence one a pass instead of two.
    __syncthreads();
    above = chosen_above, ties = chosen_ties;
    prefix |= static_cast<std::uint32_t>(radix_bins - 1 - chosen) << shift;
  }

  // 3. Kept: every key above v* and the first target − above (in token order) at v*.
  //    Each warp walks its own contiguous segment of the block's share 32 tokens at a
  //    time (lane = token): counted by ballots, the warps' counts summed in order and
  //    the blocks' by rank, then walked again to write — shared-memory reads and
  //    output stores both consecutive across lanes.
  const std::uint32_t threshold = prefix;
  int ties_kept = target - above;
  ties_kept = ties_kept < 0 ? 0 : (ties_kept > ties ? ties : ties_kept);
  const int segment = ((local + warps - 1) / warps + 31) / 32 * 32;
  const int begin = warp * segment < local ? warp * segment : local;
  const int end = begin + segment < local ? begin + segment : local;
  unsigned mine = 0;
  for (int base = begin; base < end; base += 32) {  // warp-uniform
    const int j = base + lane;
    const std::uint32_t key = j < end ? resident_keys[j] : 0u;
    mine += static_cast<unsigned>(__popc(__ballot_sync(0xffffffffu, j < end && key > threshold))) << 16;
    mine += static_cast<unsigned>(__popc(__ballot_sync(0xffffffffu, j < end && key == threshold)));
  }
  if (lane == 0) warp_counts[warp] = mine;
  __syncthreads();
  int above_before = 0, ties_before = 0;  // kept candidates of the head's earlier blocks, then warps
  if (blocks_per_head > 1) {
    if (threadIdx.x == 0) {
      int block_above = 0, block_ties = 0;
      for (int w = 0; w < warps; ++w)
        block_above += static_cast<int>(warp_counts[w] >> 16), block_ties += static_cast<int>(warp_counts[w] & 0xffffu);
      block_counts[0] = block_above, block_counts[1] = block_ties;
    }
    cluster.sync();  // every block's counts are visible to its cluster
    for (int r = 0; r < rank; ++r) {
      const int* counts = cluster.peer(block_counts, r);
      above_before += counts[0], ties_before += counts[1];
    }
    // No block leaves (its shared memory with it) while a peer may still read its counts.
    cluster.sync();
  }
  for (int w = 0; w < warp; ++w)
    above_before += static_cast<int>(warp_counts[w] >> 16), ties_before += static_cast<int>(warp_counts[w] & 0xffffu);
  std::int64_t head_offset = 0;
  if (offsets_here) {  // uniform over the grid
    using block_reduce = cub::BlockReduce<long long, Threads>;
    __shared__ typename block_reduce::TempStorage reduce_storage;
    __shared__ long long head_prefix;
    const auto clamped = [&](long long c) { return c < 0 ? 0 : (c > tokens ? tokens : c); };
    long long partial = clamped(first_count);
    for (std::int64_t other = threadIdx.x + Threads; other < head; other += Threads) partial += clamped(keep_counts[other]);
    const long long total = block_reduce(reduce_storage).Sum(partial);
    if (threadIdx.x == 0) {
      head_prefix = total;
      if (rank == 0) offsets[head + 1] = total + target;
      if (rank == 0 && head == 0) offsets[0] = 0;
    }
    __syncthreads();
    head_offset = head_prefix;
  } else {
    head_offset = offsets[head];
  }
  std::int32_t* out = kept_tokens + head_offset;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {
    const int j = base + lane;
    const std::uint32_t key = j < end ? resident_keys[j] : 0u;
    const bool is_above = j < end && key > threshold, is_tie = j < end && key == threshold;
    const unsigned above_lanes = __ballot_sync(0xffffffffu, is_above), tie_lanes = __ballot_sync(0xffffffffu, is_tie);
    const int a = above_before + __popc(above_lanes & lanes_below), t = ties_before + __popc(tie_lanes & lanes_below);
    if (is_above)
      out[a + (t < ties_kept ? t : ties_kept)] = first + j;
    else if (is_tie && t < ties_kept)
      out[a + t] = first + j;
    above_before += __popc(above_lanes), ties_before += __popc(tie_lanes);
  }
}

/// How select_resident runs on the current device, if at all (host queries only, no synchronisation):
/// resident when one block's share of a head (its keys) and the kernel's static shared memory fit
/// the device's per-block opt-in limit (227 KB on Hopper; 163 KB on an A100 and 99 KB on
/// sm_86/89, where longer heads take the multi-launch search); over a cluster of `blocks_per_head`
/// where the kernel's code is sm_90 (binary and PTX: pre-sm_90 PTX compiled by the driver has no
/// clusters) and heads alone would leave SMs idle — about two blocks an SM, each with at least
/// 2048 tokens (below that one block's load and four passes are already short), fewer where the
/// device cannot co-schedule such a cluster (MPS, green contexts: cudaOccupancyMaxActiveClusters).
struct resident_select_plan {
  bool resident = false;
  int blocks_per_head = 1;
  std::size_t shared_bytes = 0;  // one block's keys
};

inline resident_select_plan plan_resident_select(std::int64_t heads, std::int64_t tokens, std::string_view function) {
  constexpr int threads = resident_select_threads;
  const auto kernel = select_resident<threads>;
  resident_select_plan plan;
  if (tokens > resident_select_tokens || heads > 2147483647) return plan;
  int device = 0, limit = 0, multiprocessors = 0;
  detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  detail::check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), function,
                     "cudaDeviceGetAttribute(shared memory per block)");
  detail::check_cuda(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device), function,
                     "cudaDeviceGetAttribute(multiprocessors)");
  cudaFuncAttributes attributes{};
  detail::check_cuda(cudaFuncGetAttributes(&attributes, kernel), function, "cudaFuncGetAttributes(select_resident)");
  if (attributes.sharedSizeBytes + resident_select_shared_bytes(tokens) > static_cast<std::size_t>(limit)) return plan;
  // The whole opt-in, the same value on every call: a smaller one set by a later call would
  // undercut a launch still pending or captured in a graph.
  detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          limit - static_cast<int>(attributes.sharedSizeBytes)),
                     function, "cudaFuncSetAttribute(select_resident)");
  plan.resident = true;
  if (KVTRIM_CUDA_SELECT_CLUSTERS != 0 && attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90) {
    const std::int64_t by_machine = 2 * std::int64_t{multiprocessors} / std::max<std::int64_t>(heads, 1);
    int blocks = static_cast<int>(std::clamp<std::int64_t>(std::min(by_machine, tokens / 2048), 1,
                                                           resident_select_max_blocks));
    for (; blocks > 1; blocks /= 2) {
      if (heads * blocks > 2147483647) continue;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(static_cast<unsigned>(heads * blocks));
      config.blockDim = dim3(threads);
      config.dynamicSmemBytes = resident_select_shared_bytes(tokens, blocks);
      cudaLaunchAttribute cluster{};
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim.x = static_cast<unsigned>(blocks);
      cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
      config.attrs = &cluster;
      config.numAttrs = 1;
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
        (void)cudaGetLastError();  // a device or context that will not say: one block a head, as before clusters
        blocks = 1;
        break;
      }
      if (clusters > 0) break;
    }
    plan.blocks_per_head = blocks;
  }
  plan.shared_bytes = resident_select_shared_bytes(tokens, plan.blocks_per_head);
  return plan;
}

inline unsigned grid_for(std::int64_t items) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(items, 256), 1, 65535));
}

}  // namespace cuda_detail

template <>
struct implementation<stage::select_top_k, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::stage::select_top_k";

  /// O(heads): the search's histograms and state, and ≤ 256 chunk counts per head — not O(heads · tokens).
  static std::size_t workspace_bytes(std::int64_t heads, std::int64_t tokens) {
    workspace_carver carver;
    cuda_detail::threshold_state::carve(carver, heads, heads);
    carver.take<unsigned long long>(heads * cuda_detail::compaction_chunks(tokens));
    return carver.bytes();
  }

  static void select(const tensor_view<const float, 3, device_space>& scores, const std::int32_t* keep_counts,
                     std::int64_t* offsets, std::int32_t* kept_tokens, workspace scratch, cudaStream_t stream) {
    const std::int64_t tokens = scores.extent(2);
    const std::int64_t heads = scores.extent(0) * scores.extent(1);
    constexpr int offset_threads = 1024;
    const auto plan = heads == 0 || tokens == 0 ? cuda_detail::resident_select_plan{}
                                                : cuda_detail::plan_resident_select(heads, tokens, function);
    const bool offsets_here = plan.resident && heads <= cuda_detail::resident_offsets_heads;
    if (!offsets_here) {
      cuda_detail::keep_offsets<offset_threads><<<1, offset_threads, 0, stream>>>(keep_counts, offsets, heads, tokens);
      detail::check_launch(function, "keep_offsets");
    }
    if (heads == 0 || tokens == 0) return;
    if (plan.resident) {
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(static_cast<unsigned>(heads * plan.blocks_per_head));
      config.blockDim = dim3(cuda_detail::resident_select_threads);
      config.dynamicSmemBytes = plan.shared_bytes;
      config.stream = stream;
      cudaLaunchAttribute cluster{};
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim.x = static_cast<unsigned>(plan.blocks_per_head);
      cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
      config.attrs = &cluster;
      config.numAttrs = plan.blocks_per_head > 1 ? 1 : 0;  // one block a head: a plain launch
      detail::check_cuda(cudaLaunchKernelEx(&config, cuda_detail::select_resident<cuda_detail::resident_select_threads>,
                                            cuda_detail::rows_of(scores), keep_counts, offsets, kept_tokens,
                                            plan.blocks_per_head, offsets_here),
                         function, "cudaLaunchKernelEx(select_resident)");
      detail::check_launch(function, "select_resident");
      return;
    }

    workspace_carver carver(scratch);
    const auto state = cuda_detail::threshold_state::carve(carver, heads, heads);
    const std::int64_t chunk_tokens = cuda_detail::compaction_chunk_tokens(tokens);
    const std::int64_t chunks = cuda_detail::compaction_chunks(tokens);
    auto* chunk_counts = carver.take<unsigned long long>(heads * chunks);
    const cuda_detail::score_rows rows = cuda_detail::rows_of(scores);
    cuda_detail::find_thresholds(rows, heads, 1, cuda_detail::select_rule{keep_counts, tokens}, state, stream,
                                 function);
    constexpr int items = cuda_detail::compaction_items;
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(heads * chunks, 1 << 20));
    cuda_detail::count_selected<items><<<blocks, cuda_detail::radix_bins, 0, stream>>>(rows, heads, chunk_tokens, chunks,
                                                                                       state, chunk_counts);
    detail::check_launch(function, "count_selected");
    cuda_detail::compact_selected<items><<<blocks, cuda_detail::radix_bins, 0, stream>>>(
        rows, heads, chunk_tokens, chunks, state, chunk_counts, offsets, kept_tokens);
    detail::check_launch(function, "compact_selected");
  }
};

}  // namespace kvtrim
