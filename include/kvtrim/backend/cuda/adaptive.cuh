// kvtrim/backend/cuda/adaptive.cuh — budget::adaptive (Ada-KV) on the GPU.
//
// The CPU reference (backend/cpu/adaptive.hpp) is the specification: per
// sequence, head h first keeps its guaranteed prefix g_h (protected tokens plus
// the floor; budget::adaptive::guaranteed), then the pool H·k − Σ g_h goes to
// the best remaining tokens of all heads in the order ranks_before(score,
// h·T + token). The counts come out identical without that merge:
//
//   Each head's kept set is a prefix of its rank order, so if θ is the pool's
//   last token in the cross-head order and N_h(θ) the tokens of head h ranked
//   at or before θ, head h keeps max(g_h, N_h(θ)) tokens, and
//   F(θ) = Σ_h max(g_h, N_h(θ)) rises by at most one per step of θ. So: find
//   the threshold key v* = the largest key with F(keys ≥ v*) ≥ H·k (the radix
//   search of select_top_k.cuh, with a sequence's heads as one group and g_h
//   as floors); every head keeps max(g_h, above_h) (above_h: keys > v*), and
//   the tokens AT v* — ordered by (head, token), as the CPU's flattened index
//   orders them — fill the rest head by head: head h takes what its ties add
//   over max(g_h, above_h), up to what is left.
//
// Exact totals: Σ_h counts = H·k per sequence, like the CPU. No host round trip:
// the protected counts (tokens scored +∞) come from the first histogram pass, the
// floors are computed on the device (device_guaranteed below, the same double
// arithmetic as the host's budget::adaptive::guaranteed).
//
// The paper form's error (a head whose protected tokens exceed the per-head
// budget k) is data the host never sees without a synchronisation. The CPU
// throws; the device records the first such head (in (sequence, head) order) in
// a word of the workspace (refusal_word) and clamps that head's guarantee to k,
// so the counts stay exact and bounded; scheme::compress hands the word to the
// layout's compaction (compact_args::budget_refusal), whose planning kernel then
// records the CPU's error in the cache's status words and writes nothing:
// kvtrim::check_status throws it, and the cache keeps every byte. (The sharded
// form below still clamps only: a refusal on one rank would need a collective.)
//
// Sharded (tensor parallelism; docs/tensor-parallel.md, the CPU reference's
// sharded keep_counts is the specification): F(v) is a sum over heads, so each
// rank evaluates its own heads' part and the communicator adds the ranks —
// between the passes, on the stream. Per pass one launch, sharded_radix_pass:
// each block first re-derives the prefix so far from the all-reduced totals of
// the earlier passes (≤ 3 block-wide counts over 256 values in L2: no decision
// kernel between the collective and the next pass), histograms its chunk into
// the pass's buffer (two, alternating: the last block of a group still reads
// the previous pass's), and the last block of a group (the arrival counter)
// folds the previous pass's digit into `above`, clears that buffer, and writes
// the rank's F at the 256 candidate digits: totals[pass][group]. Then
// comm.all_reduce_sum(totals[pass]). After the fourth, sharded_finish writes
// [Σ base, surplus per layer head] per sequence (zeros but this rank's slots),
// one more all-reduce, and sharded_assign replays the one-GPU tie loop over
// all H heads and writes this rank's counts. 6 launches, one memset, 5
// collectives of 4 · batch · 256 + batch · (H + 1) 64-bit counts in all; no
// host round trip, so the whole call is capturable when the communicator's
// all-reduce is (NCCL's is).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/select_top_k.cuh"
#include "kvtrim/budget/adaptive.hpp"
#include "kvtrim/comm/communicator.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

namespace cuda_detail {

/// budget::adaptive's rule for the threshold search: a group is one sequence's
/// kv heads; the target is H·k; floors are the guaranteed prefixes.
struct adaptive_rule {
  std::int64_t heads_per_group;
  std::int64_t budget;  // k, already resolved against the token count on the host
  double alpha;
  bool kvpress_compatible;
  std::int32_t* keep_counts;
  /// The paper form's refusal (compact_args::budget_refusal): the first head, in
  /// (sequence, head) order, protecting more than k tokens. Null: clamp only (sharded).
  unsigned long long* refusal = nullptr;

  __device__ long long target(std::int64_t) const { return static_cast<long long>(heads_per_group) * budget; }

  /// budget::adaptive::guaranteed, on the device (same double arithmetic), except
  /// that protected tokens beyond k are reported (refusal) and clamp to k, so
  /// the counts stay within H·k even though compaction will then write nothing.
  __device__ long long floor(std::int64_t group, std::int64_t h, std::uint32_t protected_tokens) const {
    if (kvpress_compatible) return static_cast<long long>(::floor(alpha * static_cast<double>(budget)));
    if (protected_tokens > budget) {
      if (refusal != nullptr)
        atomicMin(refusal, static_cast<unsigned long long>(group * heads_per_group + h) << 32 | protected_tokens);
      return budget;
    }
    const long long rest = budget - protected_tokens;
    const long long floor = static_cast<long long>(::floor(alpha * static_cast<double>(rest)));
    return protected_tokens + floor > 1 ? protected_tokens + floor : 1;  // never an empty head
  }

  __device__ void write_count(std::int64_t head, long long count) const {
    keep_counts[head] = static_cast<std::int32_t>(count);
  }
};

/// The sharded search's state (carved from the workspace). The first five are
/// adjacent and zeroed by one memset per call: the totals and shares of a rank
/// without heads are then the zeros it must send.
struct sharded_state {
  std::uint32_t* histograms = nullptr;  // [2 × heads × radix_bins]: pass p uses half p % 2
  std::uint32_t* infinities = nullptr;  // [heads]: tokens scored +∞ (pass 0)
  std::uint32_t* arrivals = nullptr;    // [groups]
  unsigned long long* totals = nullptr;  // [radix_passes × groups × radix_bins]: F per candidate digit
  unsigned long long* shares = nullptr;  // [groups × (H + 1)]: Σ base, surplus per layer head
  std::size_t zeroed_bytes = 0;
  std::int64_t* floors = nullptr;  // [heads]
  std::int64_t* above = nullptr;   // [heads]: keys above the prefix's range
  std::int64_t* ties = nullptr;    // [heads]: keys equal to v* (after sharded_finish)

  template <class Carver>
  static sharded_state carve(Carver& carver, std::int64_t heads, std::int64_t groups, std::int64_t layer_heads) {
    sharded_state s;
    s.histograms = carver.template take<std::uint32_t>(2 * heads * radix_bins);
    s.infinities = carver.template take<std::uint32_t>(heads);
    s.arrivals = carver.template take<std::uint32_t>(groups);
    s.totals = carver.template take<unsigned long long>(radix_passes * groups * radix_bins);
    s.shares = carver.template take<unsigned long long>(groups * (layer_heads + 1));
    if (s.histograms != nullptr)
      s.zeroed_bytes = static_cast<std::size_t>(reinterpret_cast<const std::byte*>(s.shares + groups * (layer_heads + 1)) -
                                                reinterpret_cast<const std::byte*>(s.histograms));
    s.floors = carver.template take<std::int64_t>(heads);
    s.above = carver.template take<std::int64_t>(heads);
    s.ties = carver.template take<std::int64_t>(heads);
    return s;
  }
};

/// The digit the all-reduced totals of one pass choose for a group: the largest
/// whose F still reaches the target (decide_group's rule). Every thread of the
/// block (radix_bins threads) calls it and gets the same digit.
__device__ __forceinline__ int chosen_digit(const unsigned long long* totals, long long target) {
  const int short_digits = __syncthreads_count(static_cast<long long>(__ldcg(&totals[threadIdx.x])) < target);
  return radix_bins - 1 - (short_digits < radix_bins ? short_digits : radix_bins - 1);
}

/// Pass `pass` of the sharded search on this rank's heads (see the top of the file).
template <int Items>
__global__ void __launch_bounds__(radix_bins) sharded_radix_pass(score_rows scores, std::int64_t heads,
                                                                 std::int64_t heads_per_group, int pass,
                                                                 adaptive_rule rule, unsigned long long counted,
                                                                 sharded_state state) {
  __shared__ std::uint32_t bins[radix_bins];
  __shared__ std::uint32_t infinities;
  __shared__ bool last_arrival;
  __shared__ unsigned long long reached[radix_bins];
  constexpr std::int64_t chunk_tokens = std::int64_t{radix_bins} * Items;
  const std::int64_t chunks = scores.tokens > 0 ? (scores.tokens + chunk_tokens - 1) / chunk_tokens : 1;
  const std::int64_t group_items = heads_per_group * chunks;
  const std::int64_t groups = heads_per_group > 0 ? heads / heads_per_group : 0;
  const int shift = 32 - radix_bits * (pass + 1);
  const std::uint32_t high_mask = pass == 0 ? 0u : ~0u << (32 - radix_bits * pass);
  const long long target = rule.target(0);
  std::uint32_t* histograms = state.histograms + (pass % 2) * heads * radix_bins;
  for (std::int64_t work = blockIdx.x; work < heads * chunks; work += gridDim.x) {
    const std::int64_t head = work / chunks;
    const std::int64_t group = head / heads_per_group;
    const std::int64_t begin = (work % chunks) * chunk_tokens;
    const std::int64_t end = begin + chunk_tokens < scores.tokens ? begin + chunk_tokens : scores.tokens;
    // The digits the earlier passes' all-reduced totals chose (the same on every rank).
    std::uint32_t fixed = 0;
    int previous_digit = 0;
    for (int q = 0; q < pass; ++q) {
      previous_digit = chosen_digit(state.totals + (q * groups + group) * radix_bins, target);
      fixed |= std::uint32_t(previous_digit) << (32 - radix_bits * (q + 1));
    }
    bins[threadIdx.x] = 0;
    if (threadIdx.x == 0) infinities = 0;
    __syncthreads();
    const float* row = scores.row(head);
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
    if (bins[threadIdx.x] > 0) atomicAdd(&histograms[head * radix_bins + threadIdx.x], bins[threadIdx.x]);
    if (pass == 0 && threadIdx.x == 0 && infinities > 0) atomicAdd(&state.infinities[head], infinities);
    __threadfence();  // this block's counts are visible device-wide before its arrival is
    __syncthreads();
    if (threadIdx.x == 0)
      last_arrival = atomicAdd(&state.arrivals[group], 1u) == static_cast<std::uint32_t>(group_items - 1);
    __syncthreads();
    if (!last_arrival) continue;
    __threadfence();
    // The group's last block: fold the previous pass's digit into `above` (keys
    // of the digits above it), clear that pass's half for the pass after this,
    // then this rank's F at the lowest key of each candidate digit.
    const std::int64_t first = group * heads_per_group;
    constexpr int warps = radix_bins / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (pass == 0) {
      for (std::int64_t h = threadIdx.x; h < heads_per_group; h += radix_bins) {
        state.floors[first + h] = rule.floor(group, h, __ldcg(&state.infinities[first + h]));
        state.above[first + h] = 0;
      }
    } else {
      std::uint32_t* previous = state.histograms + ((pass - 1) % 2) * heads * radix_bins;
      const int j = radix_bins - 1 - previous_digit;
      for (std::int64_t h = warp; h < heads_per_group; h += warps) {
        warp_bins wb;
        wb.load(previous + (first + h) * radix_bins, lane);
#pragma unroll
        for (int i = 0; i < warp_bins::per_lane; ++i)
          if (lane * warp_bins::per_lane + i == j)
            state.above[first + h] += static_cast<long long>(wb.before + wb.running[i] - wb.count[i]);
      }
      __syncthreads();
      for (std::int64_t h = 0; h < heads_per_group; ++h) previous[(first + h) * radix_bins + threadIdx.x] = 0;
    }
    reached[threadIdx.x] = 0;
    __syncthreads();
    for (std::int64_t h = warp; h < heads_per_group; h += warps) {
      warp_bins wb;
      wb.load(histograms + (first + h) * radix_bins, lane);
      const auto floor = static_cast<unsigned long long>(__ldcg(&state.floors[first + h]));
      const auto above = static_cast<unsigned long long>(__ldcg(&state.above[first + h]));
#pragma unroll
      for (int i = 0; i < warp_bins::per_lane; ++i) {
        const unsigned long long tokens = above + wb.before + wb.running[i];
        atomicAdd(&reached[lane * warp_bins::per_lane + i], tokens > floor ? tokens : floor);
      }
    }
    __syncthreads();
    state.totals[(std::int64_t{pass} * groups + group) * radix_bins + threadIdx.x] = counted * reached[threadIdx.x];
    if (threadIdx.x == 0) state.arrivals[group] = 0;  // the next pass counts again
    __syncthreads();
  }
}

/// After the last all-reduce of totals: per group (one block), v*'s last digit,
/// each local head's above and ties, and this rank's shares: Σ base at slot 0,
/// each local head's surplus at 1 + its layer index. (A template only so that
/// any number of translation units may include this header.)
template <int Threads>
__global__ void __launch_bounds__(radix_bins) sharded_finish(std::int64_t heads, std::int64_t heads_per_group,
                                                             std::int64_t first_head, std::int64_t layer_heads,
                                                             adaptive_rule rule, unsigned long long counted,
                                                             sharded_state state) {
  const std::int64_t group = blockIdx.x;
  const std::int64_t groups = gridDim.x;
  const long long target = rule.target(0);
  const int digit = chosen_digit(state.totals + ((radix_passes - 1) * groups + group) * radix_bins, target);
  const std::uint32_t* last = state.histograms + ((radix_passes - 1) % 2) * heads * radix_bins;
  const std::int64_t first = group * heads_per_group;
  constexpr int warps = radix_bins / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int j = radix_bins - 1 - digit;
  for (std::int64_t h = warp; h < heads_per_group; h += warps) {
    warp_bins wb;
    wb.load(last + (first + h) * radix_bins, lane);
#pragma unroll
    for (int i = 0; i < warp_bins::per_lane; ++i)
      if (lane * warp_bins::per_lane + i == j) {
        const long long floor = state.floors[first + h];
        const long long above = state.above[first + h] + static_cast<long long>(wb.before + wb.running[i] - wb.count[i]);
        const long long ties = static_cast<long long>(wb.count[i]);
        state.above[first + h] = above;
        state.ties[first + h] = ties;
        const long long base = above > floor ? above : floor;
        const long long full = above + ties > floor ? above + ties : floor;
        unsigned long long* shares = state.shares + group * (layer_heads + 1);
        atomicAdd(&shares[0], counted * static_cast<unsigned long long>(base));
        shares[1 + first_head + h] = counted * static_cast<unsigned long long>(full - base);
      }
  }
}

/// After the all-reduce of the shares: per group (one thread), the one-GPU tie
/// loop over all H layer heads in order; this rank writes its heads' counts.
template <int Threads>
__global__ void __launch_bounds__(Threads) sharded_assign(std::int64_t groups, std::int64_t heads_per_group,
                                                           std::int64_t first_head, std::int64_t layer_heads,
                                                           adaptive_rule rule, sharded_state state) {
  const std::int64_t group = std::int64_t{blockIdx.x} * Threads + threadIdx.x;
  if (group >= groups) return;
  const unsigned long long* shares = state.shares + group * (layer_heads + 1);
  long long remaining = rule.target(group) - static_cast<long long>(shares[0]);
  for (std::int64_t g = 0; g < layer_heads; ++g) {
    const auto surplus = static_cast<long long>(shares[1 + g]);
    long long take = surplus < remaining ? surplus : remaining;
    take = take > 0 ? take : 0;
    remaining -= take;
    const std::int64_t h = g - first_head;
    if (h >= 0 && h < heads_per_group) {
      const std::int64_t head = group * heads_per_group + h;
      const long long floor = state.floors[head], above = state.above[head];
      rule.write_count(head, (above > floor ? above : floor) + take);
    }
  }
}

}  // namespace cuda_detail

template <>
struct implementation<budget::adaptive, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::budget::adaptive";

  static std::size_t workspace_bytes(const budget::adaptive::config&, const model_shape& shape, std::int64_t batch,
                                     std::int64_t /*tokens*/) {
    workspace_carver carver;
    cuda_detail::threshold_state::carve(carver, batch * shape.kv_heads, batch);
    carver.take<unsigned long long>(1);  // refusal_word
    return carver.bytes();
  }

  /// The word keep_counts leaves the paper form's refusal in (compact_args::budget_refusal):
  /// flattened head · 2^32 + its protected tokens, ~0 when every head fits its budget.
  static const unsigned long long* refusal_word(const model_shape& shape, std::int64_t batch, workspace scratch) {
    workspace_carver carver(scratch);
    cuda_detail::threshold_state::carve(carver, batch * shape.kv_heads, batch);
    return carver.take<unsigned long long>(1);
  }
  /// The per-head budget k the refusal is measured against (compact_args::refused_budget).
  static std::int64_t refused_budget(const budget::adaptive::config& cfg, std::int64_t tokens) {
    return budget::adaptive::head_budget(cfg, tokens);
  }

  static void keep_counts(const budget::adaptive::config& cfg, const tensor_view<const float, 3, device_space>& scores,
                          std::int32_t* keep_counts, workspace scratch, cudaStream_t stream) {
    const std::int64_t batch = scores.extent(0), kv_heads = scores.extent(1), tokens = scores.extent(2);
    workspace_carver carver(scratch);
    const auto state = cuda_detail::threshold_state::carve(carver, batch * kv_heads, batch);
    unsigned long long* refusal = carver.take<unsigned long long>(1);
    // Reset every call, before anything else: compaction reads it (compact_args::budget_refusal).
    detail::check_cuda(cudaMemsetAsync(refusal, 0xff, sizeof *refusal, stream), function,
                       "cudaMemsetAsync(refusal_word)");
    if (batch == 0 || kv_heads == 0) return;
    const cuda_detail::adaptive_rule rule{kv_heads,   budget::adaptive::head_budget(cfg, tokens),
                                          cfg.alpha,  cfg.kvpress_compatible,
                                          keep_counts, refusal};
    cuda_detail::find_thresholds(cuda_detail::rows_of(scores), batch * kv_heads, kv_heads, rule, state, stream,
                                 function);
  }

  /// Workspace of the sharded keep_counts: O(batch · (local heads + H) · 256), not O(tokens).
  static std::size_t sharded_workspace_bytes(const budget::adaptive::config&, std::int64_t batch,
                                             std::int64_t local_heads, std::int64_t /*tokens*/,
                                             const budget::head_shard& shard) {
    workspace_carver carver;
    cuda_detail::sharded_state::carve(carver, batch * local_heads, batch, shard.total_heads);
    return carver.bytes();
  }

  /// This rank's keep counts [batch, local heads] (device memory), equal to
  /// those of keep_counts over all ranks' heads; the CPU's sharded keep_counts
  /// is the specification. Every rank calls it with the same config, batch,
  /// tokens and shard.total_heads. All on `stream`: the communicator's
  /// all-reduces (5) are enqueued on it between the kernels. Unlike the CPU, a
  /// head protecting more than k tokens (paper form) is clamped to k, as the
  /// one-GPU budget does (the device never reports data to the host), and the
  /// shards' consistency is the caller's (budget::head_shard).
  template <comm::communicator<cudaStream_t> Comm>
  static void keep_counts(const budget::adaptive::config& cfg, const tensor_view<const float, 3, device_space>& scores,
                          const budget::head_shard& shard, const Comm& comm, std::int32_t* keep_counts,
                          workspace scratch, cudaStream_t stream) {
    constexpr std::string_view sharded_function = "kvtrim::budget::adaptive (sharded)";
    const std::int64_t batch = scores.extent(0), heads = scores.extent(1), tokens = scores.extent(2);
    cfg.validate(sharded_function);
    shard.validate(sharded_function, heads);
    if (batch == 0) return;  // the same on every rank: no collective
    if (keep_counts == nullptr && heads > 0)
      detail::fail(sharded_function, "keep_counts", "a [batch, local heads] output", "null");
    if (scores.data == nullptr && heads > 0 && tokens > 0)
      detail::fail(sharded_function, "scores", "scores", "null data");
    detail::check_workspace(sharded_function, scratch, sharded_workspace_bytes(cfg, batch, heads, tokens, shard));
    const std::int64_t layer_heads = shard.total_heads;
    workspace_carver carver(scratch);
    const auto state = cuda_detail::sharded_state::carve(carver, batch * heads, batch, layer_heads);
    const cuda_detail::adaptive_rule rule{layer_heads, budget::adaptive::head_budget(cfg, tokens), cfg.alpha,
                                          cfg.kvpress_compatible, keep_counts};
    const unsigned long long counted = shard.counted ? 1ull : 0ull;
    detail::check_cuda(cudaMemsetAsync(state.histograms, 0, state.zeroed_bytes, stream), sharded_function,
                       "cudaMemsetAsync(sharded state)");
    constexpr int items = 16;
    const auto rows = cuda_detail::rows_of(scores);
    const std::int64_t chunks =
        cuda_detail::ceil_div(std::max<std::int64_t>(tokens, 1), std::int64_t{cuda_detail::radix_bins} * items);
    const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>(batch * heads * chunks, 1, 1 << 20));
    const auto digits = static_cast<std::size_t>(batch * cuda_detail::radix_bins);
    for (int pass = 0; pass < cuda_detail::radix_passes; ++pass) {
      cuda_detail::sharded_radix_pass<items><<<blocks, cuda_detail::radix_bins, 0, stream>>>(
          rows, batch * heads, heads, pass, rule, counted, state);
      detail::check_launch(sharded_function, "sharded_radix_pass");
      comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(state.totals) + pass * digits, digits, stream);
    }
    cuda_detail::sharded_finish<cuda_detail::radix_bins><<<static_cast<unsigned>(batch), cuda_detail::radix_bins, 0,
                                                           stream>>>(batch * heads, heads, shard.first_head,
                                                                     layer_heads, rule, counted, state);
    detail::check_launch(sharded_function, "sharded_finish");
    comm.all_reduce_sum(reinterpret_cast<std::uint64_t*>(state.shares),
                        static_cast<std::size_t>(batch * (layer_heads + 1)), stream);
    constexpr int assign_threads = 128;
    cuda_detail::sharded_assign<assign_threads>
        <<<static_cast<unsigned>(cuda_detail::ceil_div(batch, assign_threads)), assign_threads, 0, stream>>>(
            batch, heads, shard.first_head, layer_heads, rule, state);
    detail::check_launch(sharded_function, "sharded_assign");
  }
};

}  // namespace kvtrim
