// kvtrim/backend/cuda/eviction.cuh — decode-time eviction on the GPU: the
// metric (decode attention's side output; eviction/metric.hpp has the math) and
// the eviction step (eviction/evict.hpp).
//
// The metric. The decode kernel is split-K: a token's probability
// p_gi = 2^(s_gi − lse_g) is known only after the partial softmax states of the
// head are merged. So the attention kernel writes each logit s_gi (base 2, the
// very float its softmax uses) at the token's place on the partition's line
// (consecutive tokens, consecutive floats, whatever the layout), with an L2
// evict_last policy; finish_segment / the merge write each head's final lse_g;
// accumulate_decode_metric below — one more dependent launch, a warp per 32
// places of the line — adds c_i to metric[slot] for tokens older than the
// protected window and discards the logits' L2 lines once read, so logits that
// stayed resident are never written back. At W they mostly do not stay (1 GB of
// K/V streams through the 50 MB L2; measured in docs/results.md: +16.7 % with
// the policy; marking the K/V stream evict_first as well, +14.0 %, was removed:
// ptxas 13.0 miscompiled its hinted copies, see codec_fragments.cuh). Per token the finisher moves
// the position (4 B), the metric (8 B read + write) and the logits (4·G B, from
// L2 or HBM) and never reads K or V. Same rule and
// formulas as the CPU reference (backend/cpu/decode_attention.hpp): the
// difference is fp32 rounding of exp2 in base 2 against exp in base e
// (tests/cuda/eviction_test.cu bounds it).
//
// The eviction step (kvtrim::evict<backend::cuda>, below): every codec the device
// stores — plain (fp16, bf16, fp32), int8 / int4 (slot runs of KIVI keys evicted and moved whole,
// a filling key group pinned), fp8, layered<C> (its fp16 rows pinned) — over paged
// and flat caches, the CPU reference's result byte for byte, as a chain of
// whole-GPU kernels with no host synchronisation (described where they start).
//
// The prefill seed (eviction::seed_metric, at the end): the observation window's
// probabilities of the kept tokens, from the scorer's own row statistics.
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "kvtrim/backend/cuda/attention_mass.cuh"
#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/decode_attention.cuh"
#include "kvtrim/backend/cuda/decode_plan.cuh"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/eviction/evict.hpp"
#include "kvtrim/eviction/metric.hpp"
#include "kvtrim/layout/detail/storage.hpp"

namespace kvtrim::cuda_detail {

inline constexpr int metric_threads = 256;

/// The head holding place x of the line (x < line.total): the block that reads x
/// starts in partition.first_head(x / C); walk on past heads that end before x
/// (a block's range meets few heads). Contiguous caches: x / length.
__device__ __forceinline__ std::int64_t head_at(const uniform_partition& partition, const decode_line&, std::int64_t x) {
  return x / partition.length;
}
__device__ __forceinline__ std::int64_t head_at(const planned_partition& partition, const decode_line& line,
                                                std::int64_t x) {
  std::int64_t head = partition.first_head(x / line.chunk);
  while (partition.prefix(head + 1) <= x) ++head;
  return head;
}

/// metric[slot(i)] += factor · Σ_g term(2^(s_gi − lse_g)) for every token older than
/// the protected window, over the partition's line (grid-stride; a warp takes 32
/// consecutive places, so its G logit reads are whole 128-byte lines, which it
/// discards from L2 once read where the logits are 128-byte aligned — attend's workspace
/// need only be 16-byte aligned, and a discard covers whole lines — so dead logits are
/// not written back to HBM).
/// One place a thread a pass is the fastest form measured (H100, W: 29.5–31 µs; four places a
/// thread with every load issued first took 33–37.5 µs at 64–80 registers, two places at 32
/// registers no better: fewer resident threads hold no more loads in flight; docs/results.md).
template <int Group, class View, class Partition>
__global__ void __launch_bounds__(metric_threads)
    accumulate_decode_metric(const __grid_constant__ View cache, const __grid_constant__ Partition partition,
                             decode_metric side, float* metric, eviction::metric_kind kind, std::int64_t window,
                             int page_shift) {
  wait_for_prerequisite_grid();  // the attention kernel's logits and the merge's lse
  const decode_line line = partition.line();
  const float factor = eviction::metric_group_factor(kind, Group);
  const int lane = threadIdx.x % 32;
  for (std::int64_t base = std::int64_t{blockIdx.x} * metric_threads; base < line.total;
       base += std::int64_t{gridDim.x} * metric_threads) {
    const std::int64_t x = base + threadIdx.x;
    if (x < line.total) {
      const std::int64_t head = head_at(partition, line, x);
      const std::int64_t slot = head_rows(cache, head, page_shift).slot(x - partition.prefix(head));
      // Loads first, the window test after: the loads do not wait for the position.
      const std::int64_t position = cache.positions.slot_position[slot];
      const std::int64_t next = cache.positions.next_position[head];
      float sum = 0.0f;
#pragma unroll
      for (int g = 0; g < Group; ++g)
        sum += eviction::metric_term(kind, exp2f(side.logits[g * side.stride + x] - side.lse[head * Group + g]));
      if (eviction::outside_window(next, position, window)) metric[slot] += sum * factor;
    }
    __syncwarp();  // every lane has read its logits: the warp's lines are dead
    const std::int64_t warp_first = base + (threadIdx.x - lane);
    // discard needs whole 128-byte lines: a caller's workspace is only 16-byte aligned.
    if (side.keep_in_l2 && lane < Group && warp_first < line.total &&
        reinterpret_cast<std::uintptr_t>(side.logits) % 128 == 0)
      asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(side.logits + lane * side.stride + warp_first) : "memory");
  }
}

}  // namespace kvtrim::cuda_detail

namespace kvtrim::eviction {

/// eviction::attend's L2 policies for the metric, per call (no process-wide state: callers
/// on several threads each pass their own). bench/cuda_decode_attention.cu measures both.
struct metric_l2_hints {
  /// The logits stored with the L2 evict_last policy and discarded after use (the default).
  bool logits_in_l2 = true;
  /// The logits' range made the stream's L2 access-policy window (persisting hits, the
  /// hit ratio the set-aside covers) for the attention kernel and the finisher, the
  /// stream's previous window restored after (also when a launch throws). It keeps them
  /// resident only where the application has set L2 aside for persisting lines
  /// (cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, …): a device-wide choice kvtrim
  /// leaves to the engine). Needs logits_in_l2 (the finisher's discard then frees the
  /// lines, so dead logits do not hold the set-aside) and a stream that is not capturing
  /// (a stream attribute is set): refused otherwise. With a workspace that leaves the logits
  /// off a 128-byte line the finisher does not discard, and the lines age out instead.
  /// Measured at W: worse than the default (docs/results.md), an experiment's switch, off by default.
  bool persisting_logits = false;
};

/// Floats per query head of the metric's logits: the line's longest length (every
/// storage slot holds at most one token), rounded up to whole 128-byte lines.
template <class View>
std::int64_t metric_logit_stride(const View& cache) {
  return (::kvtrim::detail::storage_slots(cache.storage) + 31) / 32 * 32;
}

/// Scratch eviction::attend needs on the device: decode attention's, the logits
/// ([group][slots] floats) and the heads' lse ([heads · group] floats).
template <class View>
  requires std::same_as<typename View::space, device_space>
std::size_t attend_workspace(const View& cache, const metric_output<device_space>& metric) {
  workspace_carver carver;
  carver.take<std::byte>(static_cast<std::int64_t>(
      implementation<stage::decode_attention, backend::cuda>::workspace_bytes(cache)));
  if (metric.enabled()) {
    carver.take<float>(cache.shape.group_size() * metric_logit_stride(cache));
    carver.take<float>(cache.heads() * cache.shape.group_size());
  }
  return carver.bytes();
}

/// Decode attention plus the eviction metric (eviction/metric.hpp), on `stream`:
/// no host synchronisation, capturable in a CUDA graph.
template <class View, class QueryT, class OutT>
  requires std::same_as<typename View::space, device_space>
void attend(tensor_view<QueryT, 3, device_space> queries, const View& cache, tensor_view<OutT, 3, device_space> out,
            const metric_output<device_space>& metric, workspace scratch, cudaStream_t stream,
            metric_l2_hints hints = {}) {
  constexpr std::string_view function = "kvtrim::eviction::attend";
  View::layout_policy::check(function, cache);
  const model_shape& shape = cache.shape;
  ::kvtrim::detail::check_view(function, "queries", queries, {cache.batch, shape.q_heads, shape.head_dim}, true);
  ::kvtrim::detail::check_view(function, "out", out, {cache.batch, shape.q_heads, shape.head_dim}, true);
  eviction_detail::check_metric(function, metric, ::kvtrim::detail::storage_slots(cache.storage));
  if (metric.carry.enabled())
    ::kvtrim::detail::fail(function, "metric.carry",
                           "no carry on backend::cuda (the one-step-late metric runs on backend::cpu; on the "
                           "device the metric is immediate)",
                           "a carry");
  ::kvtrim::detail::check_workspace(function, scratch, attend_workspace(cache, metric));

  workspace_carver carver(scratch);
  const std::size_t attention_bytes = implementation<stage::decode_attention, backend::cuda>::workspace_bytes(cache);
  std::byte* attention_scratch = carver.take<std::byte>(static_cast<std::int64_t>(attention_bytes));
  cuda_detail::decode_metric side{};
  if (metric.enabled()) {
    side.stride = metric_logit_stride(cache);
    side.keep_in_l2 = hints.logits_in_l2;
    side.logits = carver.take<float>(shape.group_size() * side.stride);
    side.lse = carver.take<float>(cache.heads() * shape.group_size());
  }
  const tensor_view<const std::remove_const_t<QueryT>, 3, device_space> const_queries{queries.data, queries.extents,
                                                                                       queries.strides};
  // The persisting window over the logits, for this call's launches only (restored on exit).
  struct stream_window {
    cudaStream_t stream = nullptr;
    cudaStreamAttrValue saved{};
    bool set = false;
    ~stream_window() {
      if (set) cudaStreamSetAttribute(stream, cudaStreamAttributeAccessPolicyWindow, &saved);
    }
  } window{stream};
  if (metric.enabled() && hints.persisting_logits) {
    if (!hints.logits_in_l2)
      ::kvtrim::detail::fail(function, "hints.persisting_logits",
                             "logits_in_l2 as well (its discard frees the persisting lines)", "logits_in_l2 = false");
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    ::kvtrim::detail::check_cuda(cudaStreamIsCapturing(stream, &capturing), function, "cudaStreamIsCapturing");
    if (capturing != cudaStreamCaptureStatusNone)
      ::kvtrim::detail::fail(function, "hints.persisting_logits", "a stream that is not capturing",
                             "a capturing stream");
    int device = 0, largest = 0;
    std::size_t set_aside = 0;
    ::kvtrim::detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
    ::kvtrim::detail::check_cuda(cudaDeviceGetAttribute(&largest, cudaDevAttrMaxAccessPolicyWindowSize, device),
                                 function, "cudaDeviceGetAttribute(MaxAccessPolicyWindowSize)");
    ::kvtrim::detail::check_cuda(
        cudaStreamGetAttribute(stream, cudaStreamAttributeAccessPolicyWindow, &window.saved), function,
        "cudaStreamGetAttribute(AccessPolicyWindow)");
    cudaStreamAttrValue value{};
    value.accessPolicyWindow.base_ptr = side.logits;
    value.accessPolicyWindow.num_bytes = std::min<std::size_t>(
        sizeof(float) * static_cast<std::size_t>(shape.group_size() * side.stride), static_cast<std::size_t>(largest));
    ::kvtrim::detail::check_cuda(cudaDeviceGetLimit(&set_aside, cudaLimitPersistingL2CacheSize), function,
                                 "cudaDeviceGetLimit(PersistingL2CacheSize)");
    // More persisting bytes than the set-aside would evict each other: persist the share that fits.
    value.accessPolicyWindow.hitRatio = static_cast<float>(std::min(
        1.0, static_cast<double>(set_aside) / static_cast<double>(std::max<std::size_t>(value.accessPolicyWindow.num_bytes, 1))));
    value.accessPolicyWindow.hitProp = cudaAccessPropertyPersisting;
    value.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
    ::kvtrim::detail::check_cuda(cudaStreamSetAttribute(stream, cudaStreamAttributeAccessPolicyWindow, &value),
                                 function, "cudaStreamSetAttribute(AccessPolicyWindow)");
    window.set = true;
  }
  implementation<stage::decode_attention, backend::cuda>::attend(const_queries, cache, out,
                                                                 workspace{attention_scratch, attention_bytes}, stream,
                                                                 side);
  if (!metric.enabled()) return;
  int page_shift = -1;
  if constexpr (cuda_detail::is_paged_view<View>) page_shift = cuda_detail::power_of_two_shift(cache.page_size);
  // One resident wave of threads, grid-striding over the line (its length lives on the device).
  const unsigned blocks = static_cast<unsigned>(backend::cuda::multiprocessor_count()) * (2048 / cuda_detail::metric_threads);
  cuda_detail::dispatch_decode_group(shape.group_size(), function, [&](auto group_constant) {
    constexpr int group = decltype(group_constant)::value;
    const auto launch = [&](const auto& partition) {
      cuda_detail::launch_dependent(
          cuda_detail::accumulate_decode_metric<group, View, std::remove_cvref_t<decltype(partition)>>, dim3(blocks),
          dim3(cuda_detail::metric_threads), 0, stream, function, "accumulate_decode_metric", cache, partition, side,
          metric.values, metric.kind, metric.protected_window, page_shift);
    };
    if constexpr (cuda_detail::is_contiguous_view<View>)
      launch(cuda_detail::uniform_partition{cache.heads(), *cache.length, *cache.length});
    else
      launch(implementation<stage::decode_attention, backend::cuda>::planned_partition(
          cache, workspace{attention_scratch, attention_bytes}));
  });
}

}  // namespace kvtrim::eviction

// ---- the eviction step ------------------------------------------------------

namespace kvtrim::cuda_detail {
// ---- the eviction step ------------------------------------------------------
//
// The CPU reference's math and result, byte for byte (backend/cpu/eviction.hpp),
// as a chain of kernels over the whole GPU (no host synchronisation):
//   prepare      one block per head: each token's 32-bit rank key (the metric's
//                order-preserving key; protected tokens marked) written by slot
//                to a scratch array the size of the metric, the head's protected
//                count and tail (its protected suffix), its floor threshold (radix
//                select on the block's own copy of the keys, in shared memory),
//                floor-kept tokens marked, and the unit's pool histogram of the
//                first digit;
//   pick         one block per unit: the pool's target, then one digit of the
//                pool threshold per call (11 + 11 + 10 bits: three passes);
//   histogram    one block per head: the next digit's histogram of the pool
//                candidates that match the digits fixed so far (unit-wide atomics);
//                the last also lists the last digits of up to evict_tie_list matches;
//   count ties   one block per head: its candidates equal to the threshold and above
//                it (from that list, or a walk over its keys where it overflowed);
//   compact      one block per head: the keep decisions (tie ranks in (head
//                ordinal, token) order from the per-head tie counts), then the
//                moves of eviction/evict.hpp's "Layouts": kept tokens at K or
//                later fill the holes below K (their list is written by rank into
//                the key array, which is dead by then), the protected tail shifts
//                down behind them (staged: a chunk is read whole before written);
//   close up     paged: each head's old table entries copied aside (block per head),
//                the new tables' places and free-list places (block per layer: scans
//                over its heads, the CPU's order), the entries moved (block per head);
//                flat: the lengths.
// Scratch: one uint32 per storage slot of each layer plus O(layers · heads).

inline constexpr int evict_threads = 512;
/// Consecutive tokens a thread takes in the chunked walks (fewer block-wide scans per head).
inline constexpr int evict_per_thread = 4;
/// Keys a prepare block keeps in shared memory (96 KB: two blocks per multiprocessor);
/// longer heads read the rest back from the key array (L2).
inline constexpr int evict_cached_keys = 24576;
/// Rank keys no metric value has (rank keys are 0 for NaN, ≥ 0x007fffff otherwise).
inline constexpr std::uint32_t evict_protected_key = 1u;
inline constexpr std::uint32_t evict_floor_key = 2u;
/// The threshold's digits, most significant first: bits 31–21, 20–10, 9–0.
inline constexpr int evict_digit_passes = 3;
inline constexpr int evict_bins = 2048;
__host__ __device__ constexpr int evict_digit_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr int evict_digit_bins(int pass) { return pass == 2 ? 1024 : 2048; }
/// Pool candidates matching the threshold's first two digits that the last digit pass lists per
/// head (their last digits): a head with no more resolves its ties and count above from the list
/// once the last digit is picked; only heads with more read their keys again.
inline constexpr int evict_tie_list = 8;

/// Every layer's view, metric and key array, by value (kernel parameters, up to ~31 KB).
template <class View>
struct evict_layer_set {
  static constexpr int capacity = static_cast<int>(30000 / (sizeof(View) + sizeof(float*) + sizeof(std::uint32_t*)));
  View views[capacity];
  float* metrics[capacity];
  std::uint32_t* keys[capacity];  // [the layer's storage slots]
  int count = 0;
};

struct evict_settings {
  int scope = 2;
  std::int64_t head_target = 0, sinks = 0, window = 0;
  double alpha = 0.0;
  const std::uint8_t* retrieval = nullptr;  // device [layers · kv_heads] or null
  std::int64_t kv_heads = 0, batch = 0, heads_per_layer = 0, layers = 0;
  std::int64_t run = 1;  // U: tokens per item (a KIVI codec's slot run; 1 otherwise), every layer's

  __host__ __device__ std::int64_t unit_count() const {
    return scope == 2 ? batch : scope == 1 ? batch * layers : batch * layers * kv_heads;
  }
  __device__ __forceinline__ bool is_retrieval(std::int64_t l, std::int64_t h) const {
    return retrieval != nullptr && retrieval[l * kv_heads + h] != 0;
  }
  /// The unit of (b, l, h) and its (layer, kv head) ranges.
  __device__ __forceinline__ std::int64_t unit_of(std::int64_t b, std::int64_t l, std::int64_t h) const {
    return scope == 2 ? b : scope == 1 ? b * layers + l : (b * layers + l) * kv_heads + h;
  }
  __device__ __forceinline__ void unit_range(std::int64_t unit, std::int64_t& b, std::int64_t& l0, std::int64_t& l1,
                                             std::int64_t& h0, std::int64_t& h1) const {
    if (scope == 2) {
      b = unit, l0 = 0, l1 = layers, h0 = 0, h1 = kv_heads;
    } else if (scope == 1) {
      b = unit / layers, l0 = unit % layers, l1 = l0 + 1, h0 = 0, h1 = kv_heads;
    } else {
      b = unit / (layers * kv_heads), l0 = unit / kv_heads % layers, l1 = l0 + 1, h0 = unit % kv_heads, h1 = h0 + 1;
    }
  }
};

/// One unit's pool threshold as the pick kernel builds it.
struct evict_unit_state {
  std::int64_t remaining = 0;  // kept candidates still sharing `prefix` (after the last pass: the ties kept)
  std::uint32_t prefix = 0, mask = 0;
  int evicting = 0;  // the unit holds more than its target
  int none = 1;      // the pool keeps nothing
};

/// The eviction step's device scratch.
struct evict_scratch {
  // per head, [layers · heads_per_layer]
  std::int64_t* protected_count = nullptr;
  std::int64_t* floor_count = nullptr;
  std::int64_t* candidates = nullptr;
  std::int64_t* tail = nullptr;        // first token of the protected tail
  // pool candidates equal to the pool threshold, and above it (after the last digit pass: those
  // matching its first two digits, and those above them)
  std::int64_t* pool_ties = nullptr;
  std::int64_t* pool_above = nullptr;
  std::uint16_t* pool_last_digits = nullptr;  // [layers · heads_per_layer · evict_tie_list]
  std::int64_t* new_length = nullptr;  // −1: untouched
  std::int64_t* page_write = nullptr;  // close-up: the head's first entry in the closed-up page table
  std::int64_t* page_freed = nullptr;  // close-up: where the head's first freed page goes in the free list
  std::int64_t* page_old_begin = nullptr;  // close-up: the head's first entry in the old page table
  std::int64_t* page_old_count = nullptr;  // close-up: and its entries
  // per layer, [layers · (heads_per_layer + 1)]: each head's first key in the layer's key array
  // (lengths rounded up to 4: every head's keys start 16-byte aligned)
  std::int64_t* line = nullptr;
  // per unit
  evict_unit_state* units = nullptr;
  unsigned* histograms = nullptr;  // [passes][units][evict_bins]
  eviction::report* report = nullptr;  // [1], accumulated with atomics

  template <class Carver>
  static evict_scratch carve(Carver& carver, std::int64_t layers, std::int64_t heads_per_layer, std::int64_t units,
                             std::int64_t pooled_units) {
    evict_scratch s;
    const std::int64_t count = layers * heads_per_layer;
    s.protected_count = carver.template take<std::int64_t>(count);
    s.floor_count = carver.template take<std::int64_t>(count);
    s.candidates = carver.template take<std::int64_t>(count);
    s.tail = carver.template take<std::int64_t>(count);
    s.pool_ties = carver.template take<std::int64_t>(count);
    s.pool_above = carver.template take<std::int64_t>(count);
    s.new_length = carver.template take<std::int64_t>(count);
    s.page_write = carver.template take<std::int64_t>(count);
    s.page_freed = carver.template take<std::int64_t>(count);
    s.page_old_begin = carver.template take<std::int64_t>(count);
    s.page_old_count = carver.template take<std::int64_t>(count);
    s.pool_last_digits = carver.template take<std::uint16_t>(count * evict_tie_list);
    s.line = carver.template take<std::int64_t>(layers * (heads_per_layer + 1));
    s.units = carver.template take<evict_unit_state>(units);
    s.histograms = carver.template take<unsigned>(evict_digit_passes * pooled_units * evict_bins);
    s.report = carver.template take<eviction::report>(1);
    return s;
  }
};

__device__ __forceinline__ std::uint32_t evict_rank_key(float value) {
  if (isnan(value)) return 0u;
  const std::uint32_t bits = value == 0.0f ? 0u : __float_as_uint(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ bool evict_candidate(std::uint32_t key) {
  return key != evict_protected_key && key != evict_floor_key;
}

using evict_scan = cub::BlockScan<std::int64_t, evict_threads>;

/// Block-wide: the digit of a radix pass (the CPU's rule: from the top digit down, the
/// first whose count reaches `remaining`, digit 0 when reached) and the new `remaining`,
/// from a histogram in shared or global memory. Every thread gets both.
__device__ __forceinline__ void evict_pick_digit(const unsigned* histogram, int bins, std::int64_t remaining,
                                                 typename evict_scan::TempStorage& scan_storage, int* shared_digit,
                                                 std::int64_t* shared_remaining, int& digit,
                                                 std::int64_t& new_remaining) {
  const int per_thread = bins / evict_threads;  // 4 or 2: this thread's bins, in descending digit order
  const int top = bins - 1 - threadIdx.x * per_thread;
  std::int64_t mine = 0;
  for (int k = 0; k < per_thread; ++k) mine += histogram[top - k];
  std::int64_t above = 0;
  evict_scan(scan_storage).ExclusiveSum(mine, above);
  for (int k = 0; k < per_thread; ++k) {
    const int d = top - k;
    const std::int64_t count = histogram[d];
    if (above < remaining && (above + count >= remaining || d == 0)) {
      *shared_digit = d;
      *shared_remaining = remaining - above;
    }
    above += count;
  }
  __syncthreads();
  digit = *shared_digit;
  new_remaining = *shared_remaining;
  __syncthreads();
}

/// The unit's held tokens and heads (retrieval heads excluded), every thread of the block.
template <class View>
__device__ void evict_unit_totals(const evict_layer_set<View>& set, const evict_settings& settings, std::int64_t unit,
                                  typename evict_scan::TempStorage& scan_storage, std::int64_t& held,
                                  std::int64_t& unit_heads, const std::int64_t* per_head_a = nullptr,
                                  const std::int64_t* per_head_b = nullptr, const std::int64_t* per_head_c = nullptr,
                                  std::int64_t* sum_a = nullptr, std::int64_t* sum_b = nullptr,
                                  std::int64_t* sum_c = nullptr) {
  std::int64_t b, l0, l1, h0, h1;
  settings.unit_range(unit, b, l0, l1, h0, h1);
  const std::int64_t width = h1 - h0, count = (l1 - l0) * width;
  std::int64_t mine[5] = {0, 0, 0, 0, 0};
  for (std::int64_t k = threadIdx.x; k < count; k += evict_threads) {
    const std::int64_t l = l0 + k / width, h = h0 + k % width;
    if (settings.is_retrieval(l, h)) continue;
    mine[0] += set.views[l].head_length(b, h);
    mine[1] += 1;
    const std::int64_t index = l * settings.heads_per_layer + b * settings.kv_heads + h;
    if (per_head_a != nullptr) mine[2] += per_head_a[index], mine[3] += per_head_b[index], mine[4] += per_head_c[index];
  }
  std::int64_t totals[5];
  for (int k = 0; k < 5; ++k) {
    evict_scan(scan_storage).ExclusiveSum(mine[k], mine[k], totals[k]);
    __syncthreads();
  }
  held = totals[0], unit_heads = totals[1];
  if (sum_a != nullptr) *sum_a = totals[2], *sum_b = totals[3], *sum_c = totals[4];
}


/// histogram[bin] += 1 for the lanes with `active`, one shared-memory atomic per distinct
/// bin of the warp (metrics cluster in few exponents: plain atomics would serialise).
/// Every lane of the warp calls it.
__device__ __forceinline__ void evict_histogram_add(unsigned* histogram, unsigned bin, bool active) {
  const unsigned lanes = __ballot_sync(0xffffffffu, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(lanes, bin);
  if (static_cast<unsigned>(__ffs(peers) - 1) == threadIdx.x % 32) atomicAdd(&histogram[bin], __popc(peers));
}

/// The codecs the device step moves (evict_mover below): an explicit list, so a codec that
/// gains a device encode (device_encoded_codec) is refused here until its parts are listed.
template <class C>
inline constexpr bool evict_moves_codec = codec::is_plain<C>;
template <int Bits>
inline constexpr bool evict_moves_codec<codec::quantized<Bits>> = true;
template <>
inline constexpr bool evict_moves_codec<codec::fp8> = true;
template <>
inline constexpr bool evict_moves_codec<codec::low_rank> = true;
/// (layered<low_rank> has no device encode or reader: not a device cache.)
template <class Inner>
inline constexpr bool evict_moves_codec<codec::layered<Inner>> =
    !codec::is_plain<Inner> && evict_moves_codec<Inner> && device_encoded_codec<codec::layered<Inner>>;

/// How the step moves a stored token as stored (the CPU's codec::move_slot), in 16-byte
/// parts: codec::plain's key and value rows in 16-byte pieces; a quantizing codec's parts
/// through codec_writes.cuh's codec_slot_mover (code words, per-token steps, its run's key
/// steps and sealed flag when the slot starts a run, layered's slot → row entry), low_rank's
/// through codec_low_rank.cuh's (key and value coefficient rows: 16-byte pieces at ranks
/// that are multiples of 8, coefficients otherwise), without the position, which the step
/// moves itself along with the metric.
template <class View, bool Plain = codec::is_plain<typename View::codec>>
struct evict_mover {
  uint4* keys;
  uint4* values;
  std::int64_t pieces;  // 16-byte pieces of a row
  __device__ explicit evict_mover(const View& cache)
      : keys(reinterpret_cast<uint4*>(cache.storage.keys)), values(reinterpret_cast<uint4*>(cache.storage.values)),
        pieces(cache.shape.head_dim * static_cast<std::int64_t>(sizeof(*cache.storage.keys)) / 16) {}
  __device__ std::int64_t parts() const { return 2 * pieces; }
  __device__ uint4 load(std::int64_t slot, std::int64_t part) const {
    return part < pieces ? keys[slot * pieces + part] : values[slot * pieces + part - pieces];
  }
  __device__ void store(std::int64_t slot, std::int64_t part, uint4 value) const {
    (part < pieces ? keys[slot * pieces + part] : values[slot * pieces + part - pieces]) = value;
  }
};
template <class View>
struct evict_mover<View, false> {
  codec_slot_mover<typename View::codec> codec;
  __device__ explicit evict_mover(const View& cache) : codec{cache.storage, nullptr} {}
  __device__ std::int64_t parts() const { return codec.parts(); }
  __device__ uint4 load(std::int64_t slot, std::int64_t part) const { return codec.load(slot, part); }
  __device__ void store(std::int64_t slot, std::int64_t part, uint4 value) const { codec.store(slot, part, value); }
};

/// A slot list whose place p holds token length − count + p of the head (a filling KIVI group's
/// residual slots, low_rank's pending slots): token i moved from slot `from` to `to` updates its
/// own place, if it has one.
__device__ __forceinline__ void move_listed_slot(std::int64_t* slots, std::int64_t count, std::int64_t i,
                                                 std::int64_t length, std::int64_t from, std::int64_t to) {
  const std::int64_t place = i - (length - count);
  if (place >= 0 && place < count && slots[place] == from) slots[place] = to;
}

/// Token i (of the head's `length`) of flattened head `head` moves from slot `from` to `to`:
/// the codec's side buffers that remember slots follow it, as the CPU's move_slot leaves them
/// — layered's row → slot map (row_slots[slot_rows[from]] = to); a filling KIVI group's
/// slot list, whose place p holds token length − count + p (the run rule, docs/composition.md
/// §3: tokens enter the group in logical order); low_rank's pending slots (sequence bases),
/// likewise: place p holds token length − count + p, the tokens appended since the last
/// refresh in arrival order, which eviction keeps (they are pinned, so they lie in the tail,
/// which shifts down in order). Each thread updates its own token's place: no search, and no
/// race between threads whose sources and destinations overlap. Call it before any thread of
/// the block stores over `from`'s slot_rows entry.
template <class Storage>
__device__ __forceinline__ void evict_codec_moved(const Storage& st, std::int64_t head, std::int64_t i,
                                                  std::int64_t length, std::int64_t from, std::int64_t to) {
  if constexpr (requires { st.inner; st.slot_rows; st.row_slots; }) {
    evict_codec_moved(st.inner, head, i, length, from, to);
    const std::int32_t row = st.slot_rows[from];
    if (row >= 0) st.row_slots[head * (st.sinks + st.recent) + row] = to;
  } else if constexpr (requires { st.residual_count; st.residual_slots; st.key_group; }) {
    if (st.key_group == 0) return;
    move_listed_slot(st.residual_slots + head * st.key_group, st.residual_count[head], i, length, from, to);
  } else if constexpr (requires { st.pending_counts; st.pending_slots; st.update_freq; }) {
    if (st.update_freq == 0) return;  // profile bases, or no refresh: no pending buffer
    move_listed_slot(st.pending_slots + head * st.update_freq, st.pending_counts[head], i, length, from, to);
  } else {
    (void)st, (void)head, (void)i, (void)length, (void)from, (void)to;
  }
}

/// Block per layer: where each head's keys start in the layer's key array (one key per item:
/// item counts rounded up to 4).
template <class View>
__global__ void __launch_bounds__(evict_threads)
    evict_lines(const __grid_constant__ evict_layer_set<View> set, const evict_settings settings,
                const evict_scratch scratch) {
  using scan = cub::BlockScan<std::int64_t, evict_threads>;
  __shared__ typename scan::TempStorage storage;
  const View& cache = set.views[blockIdx.x];
  std::int64_t* line = scratch.line + blockIdx.x * (settings.heads_per_layer + 1);
  std::int64_t running = 0;
  for (std::int64_t tile = 0; tile < settings.heads_per_layer; tile += evict_threads) {
    const std::int64_t head = tile + threadIdx.x;
    const std::int64_t length =
        head < settings.heads_per_layer ? cache.head_length(head / settings.kv_heads, head % settings.kv_heads) : 0;
    const std::int64_t items = (length + settings.run - 1) / settings.run;
    std::int64_t before = 0, total = 0;
    scan(storage).ExclusiveSum((items + 3) / 4 * 4, before, total);
    if (head < settings.heads_per_layer) line[head] = running + before;
    running += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) line[settings.heads_per_layer] = running;
}

/// A head's rows as the chunked walks read them: token i's slot, and four consecutive
/// tokens' metrics and positions (one 16-byte load each where their slots are consecutive
/// and aligned: within a page of a paged cache).
/// Slots without the layout's generic arithmetic: a paged head's table and, for pages of a
/// power of two, shifts — View::slot divides by the page size in 64 bits (a ~70-instruction
/// sequence), four times per four tokens, which made it most of the step's first pass.
template <class View>
struct evict_rows {
  const View& cache;
  std::int64_t b, h, length;
  const std::int32_t* table = nullptr;  // paged: the head's page table
  std::int64_t first = 0;               // flat: the head's first slot
  int page_shift = -1;                  // paged: log2(page size), −1 when not a power of two
  /// paged: four tokens from a multiple of 4 share a page (pages of a multiple of 4 tokens);
  /// flat: every head's slots are consecutive.
  bool runs_of_four = false;

  __device__ evict_rows(const View& cache_, std::int64_t b_, std::int64_t h_, std::int64_t length_)
      : cache(cache_), b(b_), h(h_), length(length_) {
    const std::int64_t head = b * cache.shape.kv_heads + h;
    if constexpr (is_paged_view<View>) {
      table = cache.indices + cache.indptr[head];
      const std::int64_t page = cache.page_size;
      if (page > 0 && (page & (page - 1)) == 0) page_shift = __ffsll(static_cast<long long>(page)) - 1;
      runs_of_four = page % 4 == 0;
    } else if constexpr (is_flat_view<View>) {
      first = cache.offsets[head];
      runs_of_four = true;
    }
  }
  __device__ __forceinline__ std::int64_t slot(std::int64_t i) const {
    if constexpr (is_paged_view<View>) {
      if (page_shift >= 0)
        return (static_cast<std::int64_t>(table[i >> page_shift]) << page_shift) | (i & ((std::int64_t{1} << page_shift) - 1));
      return static_cast<std::int64_t>(table[i / cache.page_size]) * cache.page_size + i % cache.page_size;
    } else if constexpr (is_flat_view<View>) {
      return first + i;
    } else {
      return cache.slot(b, h, i);
    }
  }
  /// i0: a multiple of 4.
  __device__ __forceinline__ void load4(std::int64_t i0, const float* metric, float (&value)[4],
                                        std::int32_t (&position)[4], std::int64_t (&slots)[4]) const {
    slots[0] = i0 < length ? slot(i0) : 0;
    // (the metric is the engine's buffer: its alignment is checked, not assumed)
    // (otherwise all four slots checked: with pages of one token, i0 + 1 and i0 + 2 may lie
    // anywhere even when i0 + 3 follows i0 by three)
    const bool whole = i0 + 3 < length && slots[0] % 4 == 0 &&
                       (runs_of_four || (slot(i0 + 1) == slots[0] + 1 && slot(i0 + 2) == slots[0] + 2 &&
                                         slot(i0 + 3) == slots[0] + 3)) &&
                       reinterpret_cast<std::uintptr_t>(metric) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(cache.positions.slot_position) % 16 == 0;
    if (whole) {
      const float4 v = *reinterpret_cast<const float4*>(metric + slots[0]);
      const int4 p = *reinterpret_cast<const int4*>(cache.positions.slot_position + slots[0]);
      value[0] = v.x, value[1] = v.y, value[2] = v.z, value[3] = v.w;
      position[0] = p.x, position[1] = p.y, position[2] = p.z, position[3] = p.w;
#pragma unroll
      for (int k = 1; k < 4; ++k) slots[k] = slots[0] + k;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        slots[k] = i0 + k < length ? slot(i0 + k) : 0;
        value[k] = i0 + k < length ? metric[slots[k]] : 0.0f;
        position[k] = i0 + k < length ? cache.positions.slot_position[slots[k]] : 0;
      }
    }
  }
};

struct evict_shared {
  typename evict_scan::TempStorage scan;
  unsigned histogram[evict_bins];
  unsigned listed;                               // the last digit pass's matches listed so far
  std::uint16_t last_digits[evict_tie_list];
  int digit;
  std::int64_t remaining;
  std::int32_t compensation;
};

/// Block per head (blockIdx.x = l · heads_per_layer + head): keys, protected count, tail, floor.
/// The walks take four consecutive tokens a thread (16-byte loads and stores).
template <class View>
__global__ void __launch_bounds__(evict_threads, 2)
    evict_prepare(const __grid_constant__ evict_layer_set<View> set, const evict_settings settings,
                  const evict_scratch scratch) {
  static_assert(evict_per_thread == 4 && evict_cached_keys % 4 == 0, "evict_prepare: 16-byte groups of keys");
  constexpr std::int64_t chunk = std::int64_t{evict_threads} * evict_per_thread;
  __shared__ evict_shared shared;
  extern __shared__ uint4 cached_keys[];  // [evict_cached_keys / 4]: the head's first keys
  const std::int64_t l = blockIdx.x / settings.heads_per_layer, head = blockIdx.x % settings.heads_per_layer;
  const std::int64_t b = head / settings.kv_heads, h = head % settings.kv_heads;
  if (settings.is_retrieval(l, h)) return;
  const std::int64_t unit = settings.unit_of(b, l, h);
  if (scratch.units[unit].evicting == 0) return;  // the unit is left as it is (evict_pick, pass −1)

  const View& cache = set.views[l];
  const float* metric = set.metrics[l];
  uint4* keys = reinterpret_cast<uint4*>(set.keys[l] + scratch.line[l * (settings.heads_per_layer + 1) + head]);
  const std::int64_t length = cache.head_length(b, h), next = cache.positions.next_position[head];
  const std::int64_t run = settings.run, items = (length + run - 1) / run;
  const std::int64_t compensation = cache.compensation.index[head];
  const evict_rows<View> rows{cache, b, h, length};
  // Keys of items j0 … j0 + 3 (j0 a multiple of 4; past the head's items: protected).
  const auto keys_at = [&](std::int64_t j0) { return j0 < evict_cached_keys ? cached_keys[j0 / 4] : keys[j0 / 4]; };
  const auto key_of = [](const uint4& four, int k) { return k == 0 ? four.x : k == 1 ? four.y : k == 2 ? four.z : four.w; };
  // The CPU's token_protected: sinks, the window, the compensation token, a codec's pins.
  const auto token_protected = [&](std::int64_t i, std::int64_t slot, std::int32_t position) {
    return position < settings.sinks || !eviction::outside_window(next, position, settings.window) ||
           compensation == i || eviction_detail::codec_pins(cache.storage, head, slot, i, length);
  };

  // Keys, the protected tokens and items, and the tail (one past the last candidate item).
  // Items of one token read four tokens' metrics and positions a thread (16-byte loads); items
  // of U > 1 tokens (slot runs of KIVI keys: U = the storage's slot_run, gcd(page size, key
  // group) on paged, docs/composition.md §3; U consecutive slots) sum their tokens' metrics
  // in token order, as the CPU's item_key does, and are protected when a token is or when the
  // run is incomplete.
  // The floor threshold's first digit is counted here, from the keys in registers (a pass over
  // the keys fewer): every lane of a warp takes every iteration (evict_histogram_add is warp-wide).
  for (int k = threadIdx.x; k < evict_bins; k += evict_threads) shared.histogram[k] = 0;
  __syncthreads();
  std::int64_t mine_protected = 0, mine_protected_items = 0, mine_last = 0;
  for (std::int64_t c0 = 0; c0 < items; c0 += chunk) {
    const std::int64_t j0 = c0 + std::int64_t{threadIdx.x} * 4;
    std::uint32_t key[4] = {evict_protected_key, evict_protected_key, evict_protected_key, evict_protected_key};
    if (j0 >= items) {
      // past the head's items: protected, nothing stored
    } else if (run == 1) {
      float value[4];
      std::int32_t position[4];
      std::int64_t slots[4];
      rows.load4(j0, metric, value, position, slots);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const std::int64_t i = j0 + k;
        const bool is_protected = i >= length || token_protected(i, slots[k], position[k]);
        key[k] = is_protected ? evict_protected_key : evict_rank_key(value[k]);
        mine_protected += is_protected && i < length ? 1 : 0;
        if (!is_protected) mine_last = i + 1;
      }
      mine_protected_items = mine_protected;
    } else {
#pragma unroll 1
      for (int k = 0; k < 4; ++k) {
        const std::int64_t j = j0 + k;
        if (j >= items) {
          key[k] = evict_protected_key;
          continue;
        }
        const std::int64_t begin = j * run, end = begin + run < length ? begin + run : length;
        const std::int64_t first = rows.slot(begin);  // the run's slots are consecutive
        bool is_protected = end - begin < run;
        float sum = 0.0f;
        for (std::int64_t i = begin; i < end; ++i) {
          const std::int64_t slot = first + (i - begin);
          is_protected = is_protected || token_protected(i, slot, cache.positions.slot_position[slot]);
          sum += metric[slot];
        }
        key[k] = is_protected ? evict_protected_key : evict_rank_key(sum);
        mine_protected += is_protected ? end - begin : 0;
        mine_protected_items += is_protected ? 1 : 0;
        if (!is_protected) mine_last = j + 1;
      }
    }
    if (j0 < items) {
      const uint4 four = make_uint4(key[0], key[1], key[2], key[3]);
      keys[j0 / 4] = four;
      if (j0 < evict_cached_keys) cached_keys[j0 / 4] = four;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      evict_histogram_add(shared.histogram, key[k] >> evict_digit_shift(0), key[k] != evict_protected_key);
  }
  std::int64_t protected_tokens = 0, protected_items = 0, ignored = 0, tail = 0;
  evict_scan(shared.scan).ExclusiveSum(mine_protected, ignored, protected_tokens);
  __syncthreads();
  evict_scan(shared.scan).ExclusiveSum(mine_protected_items, ignored, protected_items);
  __syncthreads();
  evict_scan(shared.scan).InclusiveScan(mine_last, ignored,
                                        [](std::int64_t x, std::int64_t y) { return x > y ? x : y; }, tail);
  __syncthreads();

  // The floor in items (the CPU's floor_of: room in tokens, whole runs of it).
  const std::int64_t candidates = items - protected_items;
  const std::int64_t room = std::max<std::int64_t>(0, settings.head_target - protected_tokens);
  std::int64_t floor_count =
      (settings.scope == 0 ? room : static_cast<std::int64_t>(::floor(settings.alpha * static_cast<double>(room)))) /
      run;
  if (protected_tokens == 0) floor_count = std::max<std::int64_t>(floor_count, 1);  // never an empty head
  floor_count = std::min(floor_count, candidates);

  // The floor threshold: three digit passes over the head's candidates (the first's histogram
  // came with the keys; the scans above ended in barriers, so it is complete).
  std::uint32_t prefix = 0, mask = 0;
  std::int64_t remaining = floor_count;
  for (int pass = 0; pass < evict_digit_passes && floor_count > 0; ++pass) {
    const int shift = evict_digit_shift(pass), bins = evict_digit_bins(pass);
    if (pass > 0) {
      for (int k = threadIdx.x; k < evict_bins; k += evict_threads) shared.histogram[k] = 0;
      __syncthreads();
    }
    for (std::int64_t c0 = 0; pass > 0 && c0 < items; c0 += chunk) {  // every lane of a warp in every iteration
      const std::int64_t i0 = c0 + std::int64_t{threadIdx.x} * 4;
      const uint4 four = i0 < items ? keys_at(i0) : make_uint4(evict_protected_key, evict_protected_key,
                                                                 evict_protected_key, evict_protected_key);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const std::uint32_t key = key_of(four, k);
        evict_histogram_add(shared.histogram, (key >> shift) & static_cast<unsigned>(bins - 1),
                            key != evict_protected_key && (key & mask) == prefix);
      }
    }
    __syncthreads();
    int digit;
    evict_pick_digit(shared.histogram, bins, remaining, shared.scan, &shared.digit, &shared.remaining, digit,
                     remaining);
    prefix |= static_cast<std::uint32_t>(digit) << shift;
    mask |= static_cast<std::uint32_t>(bins - 1) << shift;
  }

  // Floor-kept candidates marked (ties: the first `remaining` in item order); the rest
  // go to the unit's first-digit pool histogram (scopes with a pool only). Ties are ranked
  // only in chunks that have some.
  const bool pooled = settings.scope != 0;
  for (int k = threadIdx.x; k < evict_bins; k += evict_threads) shared.histogram[k] = 0;
  __syncthreads();
  {
    using count_scan = cub::BlockScan<int, evict_threads>;
    auto& count_storage = reinterpret_cast<typename count_scan::TempStorage&>(shared.scan);
    std::int64_t ties_seen = 0;
    for (std::int64_t c0 = 0; c0 < items; c0 += chunk) {
      const std::int64_t i0 = c0 + std::int64_t{threadIdx.x} * 4;
      const uint4 four = i0 < items ? keys_at(i0) : make_uint4(evict_protected_key, evict_protected_key,
                                                                 evict_protected_key, evict_protected_key);
      int my_ties = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const std::uint32_t key = key_of(four, k);
        my_ties += key != evict_protected_key && floor_count > 0 && key == prefix ? 1 : 0;
      }
      int ties_before = 0, chunk_ties = 0;
      if (__syncthreads_or(my_ties)) {
        count_scan(count_storage).ExclusiveSum(my_ties, ties_before, chunk_ties);
        __syncthreads();
      }
      std::int64_t running = ties_seen + ties_before;
      std::uint32_t marked[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const std::uint32_t key = key_of(four, k);
        const bool candidate = key != evict_protected_key;
        const bool floor_kept = candidate && floor_count > 0 && (key > prefix || (key == prefix && running++ < remaining));
        marked[k] = floor_kept ? evict_floor_key : key;
        evict_histogram_add(shared.histogram, key >> evict_digit_shift(0), pooled && candidate && !floor_kept);
      }
      if (i0 < items && (marked[0] != four.x || marked[1] != four.y || marked[2] != four.z || marked[3] != four.w))
        keys[i0 / 4] = make_uint4(marked[0], marked[1], marked[2], marked[3]);
      ties_seen += chunk_ties;
    }
  }
  __syncthreads();
  if (pooled) {  // per head has no pool and no histograms (carve sizes them for the pooled scopes' units)
    unsigned* pool_histogram = scratch.histograms + unit * evict_bins;  // pass 0
    for (int k = threadIdx.x; k < evict_bins; k += evict_threads)
      if (shared.histogram[k] != 0) atomicAdd(pool_histogram + k, shared.histogram[k]);
  }
  if (threadIdx.x == 0) {
    const std::int64_t index = l * settings.heads_per_layer + head;
    scratch.protected_count[index] = protected_tokens;
    scratch.floor_count[index] = floor_count;
    scratch.candidates[index] = candidates;
    scratch.tail[index] = tail;
  }
}

/// Block per unit: (pass 0) whether it evicts and its pool's size, then the pass's digit.
template <class View>
__global__ void __launch_bounds__(evict_threads)
    evict_pick(const __grid_constant__ evict_layer_set<View> set, const evict_settings settings,
               const evict_scratch scratch, int pass) {
  __shared__ evict_shared shared;
  const std::int64_t unit = blockIdx.x;
  evict_unit_state& state = scratch.units[unit];
  if (pass < 0) {  // before prepare: whether the unit holds more than its target
    std::int64_t held, unit_heads;
    evict_unit_totals(set, settings, unit, shared.scan, held, unit_heads);
    if (threadIdx.x == 0) {
      state = evict_unit_state{};
      state.evicting = unit_heads > 0 && held > unit_heads * settings.head_target ? 1 : 0;
    }
    return;
  }
  if (pass == 0) {
    std::int64_t held, unit_heads, protected_total, floor_total, candidates;
    evict_unit_totals(set, settings, unit, shared.scan, held, unit_heads, scratch.protected_count, scratch.floor_count,
                      scratch.candidates, &protected_total, &floor_total, &candidates);
    const std::int64_t target = unit_heads * settings.head_target;
    const bool evicting = unit_heads > 0 && held > target;
    const std::int64_t pool_tokens =
        settings.scope == 0 ? 0 : std::max<std::int64_t>(0, target - protected_total - floor_total * settings.run);
    // In items (the CPU's run(): pool_tokens / run items; floors and candidates are items).
    const std::int64_t need = std::min(pool_tokens / settings.run, candidates - floor_total);
    if (threadIdx.x == 0) {
      state = evict_unit_state{};
      state.evicting = evicting ? 1 : 0;
      state.none = need <= 0 ? 1 : 0;
      state.remaining = need;
      if (evicting) {
        const std::int64_t kept = protected_total + (floor_total + std::max<std::int64_t>(need, 0)) * settings.run;
        auto* report = reinterpret_cast<unsigned long long*>(scratch.report);
        atomicAdd(report + 0, static_cast<unsigned long long>(held - kept));  // evicted_tokens
        atomicAdd(report + 2, 1ull);                                           // units_evicted
        if (kept > target) atomicAdd(report + 3, 1ull);                        // units_over_target
      }
    }
    __syncthreads();
  }
  if (state.evicting == 0 || state.none != 0) return;
  const int bins = evict_digit_bins(pass), shift = evict_digit_shift(pass);
  int digit;
  std::int64_t remaining;
  evict_pick_digit(scratch.histograms + (pass * std::int64_t{gridDim.x} + unit) * evict_bins, bins, state.remaining,
                   shared.scan, &shared.digit, &shared.remaining, digit, remaining);
  if (threadIdx.x == 0) {
    state.remaining = remaining;
    state.prefix |= static_cast<std::uint32_t>(digit) << shift;
    state.mask |= static_cast<std::uint32_t>(bins - 1) << shift;
  }
}

/// Block per head: the pass's digit histogram of the pool candidates matching the unit's prefix
/// (pass ≥ 1), or (pass = evict_digit_passes) the head's candidates above and at the threshold.
template <class View>
__global__ void __launch_bounds__(evict_threads)
    evict_histogram(const __grid_constant__ evict_layer_set<View> set, const evict_settings settings,
                    const evict_scratch scratch, int pass) {
  constexpr std::int64_t chunk = std::int64_t{evict_threads} * evict_per_thread;
  __shared__ evict_shared shared;
  const std::int64_t l = blockIdx.x / settings.heads_per_layer, head = blockIdx.x % settings.heads_per_layer;
  const std::int64_t b = head / settings.kv_heads, h = head % settings.kv_heads;
  if (settings.is_retrieval(l, h)) return;
  const std::int64_t unit = settings.unit_of(b, l, h);
  const evict_unit_state state = scratch.units[unit];
  if (state.evicting == 0 || state.none != 0) return;
  const std::int64_t items = (set.views[l].head_length(b, h) + settings.run - 1) / settings.run;
  const uint4* keys = reinterpret_cast<const uint4*>(set.keys[l] + scratch.line[l * (settings.heads_per_layer + 1) + head]);
  const auto key_of = [](const uint4& four, int k) { return k == 0 ? four.x : k == 1 ? four.y : k == 2 ? four.z : four.w; };
  const std::int64_t index = l * settings.heads_per_layer + head;
  if (pass == evict_digit_passes) {
    // The last digit pass left the head's matches of the first two digits (their count in
    // pool_ties, those above them in pool_above) and, up to evict_tie_list of them, their last
    // digits: enough unless it had more.
    const std::int64_t matched = scratch.pool_ties[index];
    if (matched <= evict_tie_list) {
      if (threadIdx.x == 0) {
        const unsigned digit = state.prefix & static_cast<unsigned>(evict_digit_bins(evict_digit_passes - 1) - 1);
        std::int64_t ties = 0, above = scratch.pool_above[index];
        for (std::int64_t t = 0; t < matched; ++t) {
          const unsigned last = scratch.pool_last_digits[index * evict_tie_list + t];
          ties += last == digit ? 1 : 0;
          above += last > digit ? 1 : 0;
        }
        scratch.pool_ties[index] = ties;
        scratch.pool_above[index] = above;
      }
      return;
    }
    std::int64_t ties = 0, above = 0, ties_total = 0, above_total = 0;
    uint4 next = threadIdx.x * std::int64_t{4} < items ? keys[threadIdx.x]
                                                      : make_uint4(evict_protected_key, evict_protected_key,
                                                                   evict_protected_key, evict_protected_key);
    for (std::int64_t i0 = std::int64_t{threadIdx.x} * 4; i0 < items; i0 += chunk) {
      const uint4 four = next;  // (keys past the length are protected)
      if (i0 + chunk < items) next = keys[(i0 + chunk) / 4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const std::uint32_t key = key_of(four, k);
        ties += evict_candidate(key) && key == state.prefix ? 1 : 0;
        above += evict_candidate(key) && key > state.prefix ? 1 : 0;
      }
    }
    evict_scan(shared.scan).ExclusiveSum(ties, ties, ties_total);
    __syncthreads();
    evict_scan(shared.scan).ExclusiveSum(above, above, above_total);
    if (threadIdx.x == 0) {
      scratch.pool_ties[index] = ties_total;
      scratch.pool_above[index] = above_total;
    }
    return;
  }
  const int shift = evict_digit_shift(pass);
  const unsigned digit_mask = static_cast<unsigned>(evict_digit_bins(pass) - 1);
  const bool last_pass = pass == evict_digit_passes - 1;
  for (int k = threadIdx.x; k < evict_bins; k += evict_threads) shared.histogram[k] = 0;
  if (threadIdx.x == 0) shared.listed = 0;
  __syncthreads();
  std::int64_t matched = 0, above = 0;  // the last pass: matches of the first two digits, candidates above them
  const auto keys_at = [&](std::int64_t i0) {
    return i0 < items ? keys[i0 / 4]
                      : make_uint4(evict_protected_key, evict_protected_key, evict_protected_key, evict_protected_key);
  };
  uint4 next = keys_at(std::int64_t{threadIdx.x} * 4);  // a chunk ahead
  for (std::int64_t c0 = 0; c0 < items; c0 += chunk) {  // every lane of a warp in every iteration
    const std::int64_t i0 = c0 + std::int64_t{threadIdx.x} * 4;
    const uint4 four = next;
    next = keys_at(i0 + chunk);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const std::uint32_t key = key_of(four, k);
      const bool match = evict_candidate(key) && (key & state.mask) == state.prefix;
      evict_histogram_add(shared.histogram, (key >> shift) & digit_mask, match);
      if (last_pass) {  // (block-uniform: every lane of the warp is here)
        above += evict_candidate(key) && (key & state.mask) > state.prefix ? 1 : 0;
        matched += match ? 1 : 0;
        // One shared atomic per warp with matches (a degenerate metric may match every key).
        const unsigned lanes = __ballot_sync(0xffffffffu, match);
        if (lanes != 0) {
          const unsigned lane = threadIdx.x % 32;
          unsigned base = 0;
          if (lane == static_cast<unsigned>(__ffs(lanes) - 1)) base = atomicAdd(&shared.listed, __popc(lanes));
          base = __shfl_sync(0xffffffffu, base, __ffs(lanes) - 1);
          const unsigned at = base + __popc(lanes & ((1u << lane) - 1u));
          if (match && at < static_cast<unsigned>(evict_tie_list))
            shared.last_digits[at] = static_cast<std::uint16_t>(key & digit_mask);
        }
      }
    }
  }
  __syncthreads();
  if (last_pass) {
    std::int64_t matched_total = 0, above_total = 0;
    evict_scan(shared.scan).ExclusiveSum(matched, matched, matched_total);
    __syncthreads();
    evict_scan(shared.scan).ExclusiveSum(above, above, above_total);
    if (threadIdx.x == 0) scratch.pool_ties[index] = matched_total, scratch.pool_above[index] = above_total;
    if (threadIdx.x < evict_tie_list && threadIdx.x < matched_total)
      scratch.pool_last_digits[index * evict_tie_list + threadIdx.x] = shared.last_digits[threadIdx.x];
  }
  unsigned* histogram = scratch.histograms + (pass * std::int64_t{settings.unit_count()} + unit) * evict_bins;
  for (int k = threadIdx.x; k < evict_bins; k += evict_threads)
    if (shared.histogram[k] != 0) atomicAdd(histogram + k, shared.histogram[k]);
}

/// Block per head: the keep decisions and the moves (eviction/evict.hpp, "Layouts"), in
/// items (tokens, or slot runs of U = storage.slot_run tokens, moved whole).
/// K (kept items before the tail) is arithmetic: every candidate lies before the tail,
/// and the head keeps its floor, its pool candidates above the threshold and its share
/// of the threshold's ties. Then two walks, each thread taking evict_per_thread
/// consecutive items of a chunk: the holes below K (listed by rank in the key array,
/// dead by then: index r < holes ≤ K, already read), and the kept items in [K, tail),
/// which fill them in order; then the tail shifts down. Tokens move as stored
/// (evict_mover), with their positions, metric and the codec's slot lists (evict_codec_moved).
template <class View>
__global__ void __launch_bounds__(evict_threads, 2)
    evict_compact(const __grid_constant__ evict_layer_set<View> set, const evict_settings settings,
                  const evict_scratch scratch) {
  constexpr int per_thread = evict_per_thread;
  constexpr int chunk = evict_threads * per_thread;
  __shared__ evict_shared shared;
  __shared__ std::int64_t move_from[chunk], move_to[chunk];  // a chunk's movers: slots
  const std::int64_t l = blockIdx.x / settings.heads_per_layer, head = blockIdx.x % settings.heads_per_layer;
  const std::int64_t b = head / settings.kv_heads, h = head % settings.kv_heads;
  if (settings.is_retrieval(l, h)) return;
  const std::int64_t unit = settings.unit_of(b, l, h);
  const evict_unit_state state = scratch.units[unit];
  if (state.evicting == 0) return;
  const View& cache = set.views[l];
  float* metric = set.metrics[l];
  std::int32_t* positions = cache.positions.slot_position;
  const std::int64_t index = l * settings.heads_per_layer + head;
  const std::int64_t run = settings.run;
  const std::int64_t length = cache.head_length(b, h), tail = scratch.tail[index];  // tail: an item
  const std::int64_t compensation = cache.compensation.index[head];
  const bool pooled = state.none == 0;
  const evict_rows<View> rows{cache, b, h, length};  // slots without View::slot's 64-bit division

  // Pool ties kept before this head: the unit's heads of lower ordinal (l·kv_heads + h).
  std::int64_t tie_offset = 0;
  if (pooled) {
    std::int64_t ub, l0, l1, h0, h1;
    settings.unit_range(unit, ub, l0, l1, h0, h1);
    const std::int64_t width = h1 - h0, before = (l - l0) * width + (h - h0);
    std::int64_t mine = 0, ignored = 0;
    for (std::int64_t k = threadIdx.x; k < before; k += evict_threads) {
      const std::int64_t ol = l0 + k / width, oh = h0 + k % width;
      if (!settings.is_retrieval(ol, oh))
        mine += scratch.pool_ties[ol * settings.heads_per_layer + b * settings.kv_heads + oh];
    }
    evict_scan(shared.scan).ExclusiveSum(mine, ignored, tie_offset);
    __syncthreads();
  }
  const std::int64_t pool_kept =
      pooled ? scratch.pool_above[index] +
                   std::clamp<std::int64_t>(state.remaining - tie_offset, 0, scratch.pool_ties[index])
             : 0;
  const std::int64_t dropped = scratch.candidates[index] - scratch.floor_count[index] - pool_kept;
  const std::int64_t K = tail - dropped;

  // A chunk's decisions: this thread's tokens c0 + 4·tid + k (valid in [begin, end)) → kept[k], and
  // flag_rank[k], the block-wide exclusive rank of token k among the chunk's flagged tokens (flag:
  // kept, or not kept, as asked), `flagged` their count. `ties_seen` advances.
  static_assert(per_thread == 4, "evict_compact: 16-byte groups of keys");
  std::uint32_t* keys = set.keys[l] + scratch.line[l * (settings.heads_per_layer + 1) + head];  // the head's, by token
  using count_scan = cub::BlockScan<int, evict_threads>;
  auto& count_storage = reinterpret_cast<typename count_scan::TempStorage&>(shared.scan);
  static_assert(sizeof(typename count_scan::TempStorage) <= sizeof(typename evict_scan::TempStorage));
  std::int64_t ties_seen = 0;
  // This thread's four keys of the chunk at c0 (protected outside [begin, end)); the walks load
  // them a chunk ahead (one load in flight across the chunk's barriers).
  const auto load_keys = [&](std::int64_t c0, std::int64_t begin, std::int64_t end) {
    const std::int64_t i0 = c0 + std::int64_t{threadIdx.x} * per_thread;
    return i0 < end && i0 + per_thread > begin
               ? reinterpret_cast<const uint4*>(keys)[i0 / 4]
               : make_uint4(evict_protected_key, evict_protected_key, evict_protected_key, evict_protected_key);
  };
  const auto decide = [&](const uint4& four, std::int64_t c0, std::int64_t begin, std::int64_t end, bool flag_kept,
                          bool (&kept)[per_thread], int (&flag_rank)[per_thread], int& flagged) {
    const std::int64_t i0 = c0 + std::int64_t{threadIdx.x} * per_thread;
    const std::uint32_t key[per_thread] = {four.x, four.y, four.z, four.w};
    bool tie[per_thread], valid[per_thread];
    int my_ties = 0, my_flags = 0;  // flags: of the tokens that are not ties
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      valid[k] = i0 + k >= begin && i0 + k < end;
      const bool candidate = valid[k] && evict_candidate(key[k]);
      tie[k] = candidate && pooled && key[k] == state.prefix;
      kept[k] = valid[k] && (!candidate || (pooled && key[k] > state.prefix));
      my_ties += tie[k] ? 1 : 0;
      my_flags += valid[k] && !tie[k] && kept[k] == flag_kept ? 1 : 0;
    }
    // One scan for both counts (ties in the high half, flags in the low: each ≤ 2048 a chunk, so
    // the low half never carries). Ties are rare: a chunk without any has its flags final here;
    // one with some resolves them in rank order and scans its flags again.
    int packed_before = 0, packed_total = 0;
    count_scan(count_storage).ExclusiveSum((my_ties << 16) | my_flags, packed_before, packed_total);
    __syncthreads();
    const int ties_before = packed_before >> 16, chunk_ties = packed_total >> 16;
    int flags_before = packed_before & 0xffff;
    flagged = packed_total & 0xffff;
    if (chunk_ties != 0) {  // (block-uniform)
      std::int64_t running = tie_offset + ties_seen + ties_before;
      my_flags = 0;
#pragma unroll
      for (int k = 0; k < per_thread; ++k) {
        if (tie[k]) kept[k] = running++ < state.remaining;
        my_flags += valid[k] && kept[k] == flag_kept ? 1 : 0;
      }
      count_scan(count_storage).ExclusiveSum(my_flags, flags_before, flagged);
      __syncthreads();
    }
    ties_seen += chunk_ties;
    int mine = 0;
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      flag_rank[k] = mine;
      mine += valid[k] && kept[k] == flag_kept ? 1 : 0;
    }
#pragma unroll
    for (int k = 0; k < per_thread; ++k) flag_rank[k] += flags_before;
  };

  // The holes below K, by rank (each chunk's keys are read before the scans, so before any write;
  // the writes go below the chunk's end, the next chunk's keys lie past it).
  std::int64_t holes = 0;
  uint4 next_keys = load_keys(0, 0, K);
  for (std::int64_t c0 = 0; c0 < K; c0 += chunk) {
    bool kept[per_thread];
    int rank[per_thread], flagged;
    const uint4 four = next_keys;
    next_keys = load_keys(c0 + chunk, 0, K);
    decide(four, c0, 0, K, false, kept, rank, flagged);
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      const std::int64_t i = c0 + std::int64_t{threadIdx.x} * per_thread + k;
      if (i < K && !kept[k]) keys[holes + rank[k]] = static_cast<std::uint32_t>(i);
    }
    holes += flagged;
  }
  __syncthreads();  // the hole list is visible to the block

  const evict_mover<View> mover(cache);
  const std::int64_t parts = mover.parts();
  // The compensation token's new index: a stayer keeps it, a mover's thread or the tail's shift sets it.
  if (threadIdx.x == 0)
    shared.compensation = static_cast<std::int32_t>(compensation >= 0 && compensation < K * run ? compensation : -1);
  // Movers: kept items in [K, tail) fill the holes in order (sources ≥ K > destinations: no overlap).
  // A chunk starting at K may start mid-group: its walk starts at the group holding K. An item's
  // U tokens lie in consecutive slots (an aligned run), so its first slot locates all of them.
  std::int64_t movers = 0;
  next_keys = load_keys(K / per_thread * per_thread, K, tail);
  for (std::int64_t c0 = K / per_thread * per_thread; c0 < tail; c0 += chunk) {
    bool kept[per_thread];
    int rank[per_thread], flagged;
    const uint4 four = next_keys;
    next_keys = load_keys(c0 + chunk, K, tail);
    decide(four, c0, K, tail, true, kept, rank, flagged);
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      const std::int64_t j = c0 + std::int64_t{threadIdx.x} * per_thread + k;
      if (j >= K && j < tail && kept[k]) {
        const std::int64_t target = keys[movers + rank[k]];
        const std::int64_t from = rows.slot(j * run), to = rows.slot(target * run);
        for (std::int64_t t = 0; t < run; ++t) {  // items before the tail are whole runs
          positions[to + t] = positions[from + t];
          metric[to + t] = metric[from + t];
          evict_codec_moved(cache.storage, head, j * run + t, length, from + t, to + t);
          if (j * run + t == compensation) shared.compensation = static_cast<std::int32_t>(target * run + t);
        }
        move_from[rank[k]] = from;
        move_to[rank[k]] = to;
      }
    }
    __syncthreads();
    // (32-bit: flagged ≤ 2048 items of run · parts ≤ a few thousand 16-byte parts)
    const unsigned item_parts = static_cast<unsigned>(run * parts), parts32 = static_cast<unsigned>(parts);
    for (unsigned e = threadIdx.x; e < static_cast<unsigned>(flagged) * item_parts; e += evict_threads) {
      const unsigned k = e / item_parts, t = e % item_parts / parts32, part = e % parts32;
      mover.store(move_to[k] + t, part, mover.load(move_from[k] + t, part));
    }
    movers += flagged;
    __syncthreads();
  }
  // The tail shifts down by (tail − K) items, a chunk of tokens at a time, each read whole
  // (registers) before written.
  const std::int64_t shift = (tail - K) * run;  // tokens
  if (shift > 0) {
    constexpr int staged_parts = 8;  // per thread
    // At most one token per thread: each thread moves one token's position, metric and slot lists.
    const std::int64_t tail_chunk = std::clamp<std::int64_t>(evict_threads * staged_parts / parts, 1, evict_threads);
    for (std::int64_t c0 = tail * run; c0 < length; c0 += tail_chunk) {
      const std::int64_t count = std::min(tail_chunk, length - c0);
      uint4 staged[staged_parts];
      std::int32_t position = 0;
      float value = 0.0f;
      std::int64_t to = 0;
      const unsigned parts32 = static_cast<unsigned>(parts), count_parts = static_cast<unsigned>(count * parts);
#pragma unroll
      for (int p = 0; p < staged_parts; ++p) {
        const unsigned e = threadIdx.x + p * evict_threads;  // < 8 · 512
        if (e < count_parts) staged[p] = mover.load(rows.slot(c0 + e / parts32), e % parts32);
      }
      if (threadIdx.x < count) {
        const std::int64_t i = c0 + threadIdx.x, from = rows.slot(i);
        to = rows.slot(i - shift);
        position = positions[from];
        value = metric[from];
        evict_codec_moved(cache.storage, head, i, length, from, to);  // reads slot_rows[from] before any store
      }
      __syncthreads();
#pragma unroll
      for (int p = 0; p < staged_parts; ++p) {
        const unsigned e = threadIdx.x + p * evict_threads;
        if (e < count_parts) mover.store(rows.slot(c0 + e / parts32 - shift), e % parts32, staged[p]);
      }
      if (threadIdx.x < count) {
        positions[to] = position;
        metric[to] = value;
      }
      __syncthreads();
    }
  }
  const std::int64_t new_length = K * run + (length - tail * run);
  for (std::int64_t i = new_length + threadIdx.x; i < length; i += evict_threads)
    metric[rows.slot(i)] = 0.0f;  // freed slots read 0
  __syncthreads();
  if (threadIdx.x == 0) {
    cache.compensation.index[head] = compensation >= tail * run && compensation < length
                                         ? static_cast<std::int32_t>(compensation - shift)
                                         : shared.compensation;
    scratch.new_length[index] = new_length;
  }
}

/// Close-up threads a block (the per-head copy and moves: ~2k entries a head at 32k tokens).
inline constexpr int evict_close_threads = 256;

/// Paged, block per head (before evict_close_up rewrites the tables): the head's old page-table
/// entries copied to the layer's key array (dead by now), at the same places, so that
/// evict_close_up_move can read them while the table is rewritten in place.
template <class View>
__global__ void __launch_bounds__(evict_close_threads)
    evict_close_up_copy(const __grid_constant__ evict_layer_set<View> set, std::int64_t heads_per_layer) {
  const View& cache = set.views[blockIdx.x / heads_per_layer];
  const std::int64_t head = blockIdx.x % heads_per_layer, begin = cache.indptr[head], end = cache.indptr[head + 1];
  auto* old_indices = reinterpret_cast<std::int32_t*>(set.keys[blockIdx.x / heads_per_layer]);
  for (std::int64_t k = begin + threadIdx.x; k < end; k += evict_close_threads) old_indices[k] = cache.indices[k];
}

/// One block per layer: lengths from new_length (−1: unchanged); paged: each head's place in
/// the closed-up page table and, for the pages past its new length, in the free list (head
/// order, page-table order: the CPU's), two scans over the heads; then the new indptr,
/// last_page_len and free count. The entries themselves move in evict_close_up_move.
template <class View>
__global__ void __launch_bounds__(evict_threads)
    evict_close_up(const __grid_constant__ evict_layer_set<View> set, const evict_scratch scratch,
                   std::int64_t heads_per_layer) {
  const View& cache = set.views[blockIdx.x];
  std::int64_t* lengths = scratch.new_length + blockIdx.x * heads_per_layer;  // −1: unchanged
  if constexpr (is_flat_view<View>) {
    for (std::int64_t head = threadIdx.x; head < heads_per_layer; head += evict_threads)
      if (lengths[head] >= 0) cache.lengths[head] = lengths[head];
  } else {
    static_assert(is_paged_view<View>, "kvtrim::evict: layout::paged or layout::flat");
    using scan = cub::BlockScan<std::int64_t, evict_threads>;
    __shared__ typename scan::TempStorage storage;
    const std::int64_t first = blockIdx.x * heads_per_layer;
    const std::int64_t page_size = cache.page_size;
    const std::int32_t free_base = *cache.free_count;
    std::int64_t written = 0, freed = 0;
    for (std::int64_t tile = 0; tile < heads_per_layer; tile += evict_threads) {
      const std::int64_t head = tile + threadIdx.x;
      std::int64_t pages = 0, old_count = 0;
      if (head < heads_per_layer) {
        old_count = cache.indptr[head + 1] - cache.indptr[head];
        const std::int64_t old_length = old_count == 0 ? 0 : (old_count - 1) * page_size + cache.last_page_len[head];
        const std::int64_t length = lengths[head] < 0 ? old_length : lengths[head];
        lengths[head] = length;  // resolved (this thread's own entry)
        pages = (length + page_size - 1) / page_size;
        scratch.page_old_begin[first + head] = cache.indptr[head];
        scratch.page_old_count[first + head] = old_count;
      }
      std::int64_t write_before = 0, write_total = 0, freed_before = 0, freed_total = 0;
      scan(storage).ExclusiveSum(pages, write_before, write_total);
      __syncthreads();
      scan(storage).ExclusiveSum(old_count - pages, freed_before, freed_total);
      __syncthreads();
      if (head < heads_per_layer)
        scratch.page_write[first + head] = written + write_before,
        scratch.page_freed[first + head] = free_base + freed + freed_before;
      written += write_total, freed += freed_total;
    }
    __syncthreads();  // every thread has read indptr before it changes; page_write visible to the block
    for (std::int64_t head = threadIdx.x; head < heads_per_layer; head += evict_threads) {
      const std::int64_t length = lengths[head];
      cache.indptr[head + 1] =
          static_cast<std::int32_t>(head + 1 < heads_per_layer ? scratch.page_write[first + head + 1] : written);
      cache.last_page_len[head] = static_cast<std::int32_t>(length == 0 ? 0 : (length - 1) % page_size + 1);
    }
    if (threadIdx.x == 0) {
      *cache.free_count = static_cast<std::int32_t>(free_base + freed);
      atomicAdd(reinterpret_cast<unsigned long long*>(&scratch.report->freed_pages),
                static_cast<unsigned long long>(freed));
    }
  }
}

/// Paged, block per head (after evict_close_up): the head's kept pages to its place in the
/// closed-up table, the rest to its place in the free list, from evict_close_up_copy's copy.
template <class View>
__global__ void __launch_bounds__(evict_close_threads)
    evict_close_up_move(const __grid_constant__ evict_layer_set<View> set, const evict_scratch scratch,
                        std::int64_t heads_per_layer) {
  const std::int64_t l = blockIdx.x / heads_per_layer, index = blockIdx.x;
  const View& cache = set.views[l];
  const auto* old_indices = reinterpret_cast<const std::int32_t*>(set.keys[l]);
  const std::int64_t old_begin = scratch.page_old_begin[index], old_count = scratch.page_old_count[index];
  const std::int64_t write = scratch.page_write[index], freed_at = scratch.page_freed[index];
  const std::int64_t pages = (scratch.new_length[index] + cache.page_size - 1) / cache.page_size;
  for (std::int64_t k = threadIdx.x; k < old_count; k += evict_close_threads) {
    const std::int32_t page = old_indices[old_begin + k];
    if (k < pages)
      cache.indices[write + k] = page;
    else
      cache.free_pages[freed_at + (k - pages)] = page;
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
    carve(carver, layers);
    return carver.bytes();
  }

  /// `report` (device memory, optional): what the step did, written when the stream reaches it.
  template <class View>
  static void evict(std::span<const View> layers, std::span<const eviction::metric_output<device_space>> metrics,
                    const eviction::config& cfg, workspace scratch, cudaStream_t stream,
                    eviction::report* report = nullptr, const std::uint8_t* device_retrieval_heads = nullptr) {
    static_assert(cuda_detail::is_paged_view<View> || cuda_detail::is_flat_view<View>,
                  "kvtrim::evict: eviction gives heads different lengths; use layout::paged or layout::flat");
    using codec_type = typename View::codec;
    static_assert(cuda_detail::evict_moves_codec<codec_type>,
                  "kvtrim::evict on backend::cuda: codec::plain, int8, int4, fp8, low_rank or "
                  "layered<int8 | int4 | fp8> (the codecs whose stored parts evict_mover moves)");
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
    detail::checked_mul(function, "config.keep", static_cast<std::int64_t>(layers.size()) * layers[0].shape.kv_heads,
                        std::max<std::int64_t>(cfg.head_target(), 0));
    auto set = std::make_unique<set_type>();
    for (std::size_t l = 0; l < layers.size(); ++l) {
      View::layout_policy::check(function, layers[l]);
      if (layers[l].shape.kv_heads != layers[0].shape.kv_heads || layers[l].batch != layers[0].batch ||
          layers[l].shape.head_dim != layers[0].shape.head_dim)
        detail::fail(function, "layers", "every layer with layer 0's batch, kv heads and head_dim",
                     detail::cat("layer ", l, " differs"));
      for (std::size_t other = 0; other < l; ++other) {
        bool shared = false;
        if constexpr (requires { layers[l].indptr; }) shared = layers[other].indptr == layers[l].indptr;
        if constexpr (requires { layers[l].offsets; }) shared = layers[other].offsets == layers[l].offsets;
        if (shared)
          detail::fail(function, "layers", "a distinct cache per layer",
                       detail::cat("layers ", other, " and ", l, " share their page tables / offsets"));
        if (metrics[other].values == metrics[l].values)
          detail::fail(function, "metrics", "a distinct metric buffer per layer",
                       detail::cat("layers ", other, " and ", l, " share one"));
      }
      if (metrics[l].values == nullptr)
        detail::fail(function, "metrics", "a metric buffer for every layer", detail::cat("null for layer ", l));
      eviction_detail::check_metric(function, metrics[l], detail::storage_slots(layers[l].storage));
      if (metrics[l].protected_window != cfg.protected_window)
        detail::fail(function, "metrics", "the protected window the eviction uses (config.protected_window)",
                     detail::cat(metrics[l].protected_window, " for layer ", l));
      set->views[l] = layers[l];
      set->metrics[l] = metrics[l].values;
    }
    check_rows(layers);
    set->count = static_cast<int>(layers.size());
    const std::int64_t layer_count = static_cast<std::int64_t>(layers.size());
    const std::int64_t kv_heads = layers[0].shape.kv_heads, batch = layers[0].batch, heads = layers[0].heads();
    const cuda_detail::evict_settings settings{static_cast<int>(cfg.scope), cfg.head_target(), cfg.sinks,
                                               cfg.protected_window, cfg.alpha, device_retrieval_heads, kv_heads,
                                               batch, heads, layer_count, detail::storage_slot_run(layers[0].storage)};
    workspace_carver carver(scratch);
    const cuda_detail::evict_scratch tables = carve(carver, layers, set->keys);
    const std::int64_t units = settings.unit_count();
    const bool pooled = cfg.scope != eviction::scope::per_head;
    detail::check_cuda(cudaMemsetAsync(tables.new_length, 0xff, sizeof(std::int64_t) * layer_count * heads, stream),
                       function, "cudaMemsetAsync(new_length)");
    detail::check_cuda(cudaMemsetAsync(tables.report, 0, sizeof(eviction::report), stream), function,
                       "cudaMemsetAsync(report)");
    if (pooled)
      detail::check_cuda(cudaMemsetAsync(tables.histograms, 0,
                                         sizeof(unsigned) * cuda_detail::evict_digit_passes * units *
                                             cuda_detail::evict_bins,
                                         stream),
                         function, "cudaMemsetAsync(histograms)");
    const auto head_grid = static_cast<unsigned>(layer_count * heads);
    const auto unit_grid = static_cast<unsigned>(units);
    constexpr int threads = cuda_detail::evict_threads;
    constexpr std::size_t cached_bytes = sizeof(std::uint32_t) * cuda_detail::evict_cached_keys;
    const auto prepare = cuda_detail::evict_prepare<View>;
    detail::check_cuda(cudaFuncSetAttribute(prepare, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(cached_bytes)),
                       function, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    cuda_detail::evict_lines<View><<<static_cast<unsigned>(layer_count), threads, 0, stream>>>(*set, settings, tables);
    detail::check_launch(function, "evict_lines");
    cuda_detail::evict_pick<View><<<unit_grid, threads, 0, stream>>>(*set, settings, tables, -1);
    detail::check_launch(function, "evict_pick");
    prepare<<<head_grid, threads, cached_bytes, stream>>>(*set, settings, tables);
    detail::check_launch(function, "evict_prepare");
    cuda_detail::evict_pick<View><<<unit_grid, threads, 0, stream>>>(*set, settings, tables, 0);
    detail::check_launch(function, "evict_pick");
    if (pooled) {
      for (int pass = 1; pass < cuda_detail::evict_digit_passes; ++pass) {
        cuda_detail::evict_histogram<View><<<head_grid, threads, 0, stream>>>(*set, settings, tables, pass);
        detail::check_launch(function, "evict_histogram");
        cuda_detail::evict_pick<View><<<unit_grid, threads, 0, stream>>>(*set, settings, tables, pass);
        detail::check_launch(function, "evict_pick");
      }
      cuda_detail::evict_histogram<View><<<head_grid, threads, 0, stream>>>(*set, settings, tables,
                                                                           cuda_detail::evict_digit_passes);
      detail::check_launch(function, "evict_histogram (ties)");
    }
    cuda_detail::evict_compact<View><<<head_grid, threads, 0, stream>>>(*set, settings, tables);
    detail::check_launch(function, "evict_compact");
    if constexpr (cuda_detail::is_paged_view<View>) {
      cuda_detail::evict_close_up_copy<View><<<head_grid, cuda_detail::evict_close_threads, 0, stream>>>(*set, heads);
      detail::check_launch(function, "evict_close_up_copy");
    }
    cuda_detail::evict_close_up<View><<<static_cast<unsigned>(layer_count), threads, 0, stream>>>(*set, tables, heads);
    detail::check_launch(function, "evict_close_up");
    if constexpr (cuda_detail::is_paged_view<View>) {
      cuda_detail::evict_close_up_move<View><<<head_grid, cuda_detail::evict_close_threads, 0, stream>>>(*set, tables,
                                                                                                         heads);
      detail::check_launch(function, "evict_close_up_move");
    }
    if (report != nullptr)
      detail::check_cuda(cudaMemcpyAsync(report, tables.report, sizeof(eviction::report), cudaMemcpyDeviceToDevice,
                                         stream),
                         function, "cudaMemcpyAsync(report)");
  }

 private:
  /// What the device moves (evict_mover), checked before anything is written:
  ///  - codec::plain rows in 16-byte units: head_dim · element size a multiple of 16 and the
  ///    storage 16-byte aligned (the sharded step, sharded_eviction.cuh, moves rows element by
  ///    element);
  ///  - a quantizing codec's code rows in 4-byte words and a KIVI run's key steps in 16-byte
  ///    units (codec_slot_mover): code row bytes a multiple of 4, the arrays aligned;
  ///  - low_rank's coefficient rows: any rank and alignment (the mover takes 16-byte parts where
  ///    it can, 2-byte ones otherwise), nothing to refuse;
  ///  - one item size U for every layer (the storages' slot runs): the pool's whole runs are
  ///    one count (the CPU takes the largest U of a unit; layers of one model share it).
  template <class View>
  static void check_rows(std::span<const View> layers) {
    using codec_type = typename View::codec;
    const std::int64_t head_dim = layers[0].shape.head_dim;
    for (std::size_t l = 0; l < layers.size(); ++l)
      if (detail::storage_slot_run(layers[l].storage) != detail::storage_slot_run(layers[0].storage))
        detail::fail(function, "layers", "one slot run (codec::slot_alignment, page size) for every layer",
                     detail::cat("layer ", l, ": ", detail::storage_slot_run(layers[l].storage), ", layer 0: ",
                                 detail::storage_slot_run(layers[0].storage)));
    if constexpr (codec::is_plain<codec_type>) {
      using store_type = cuda_detail::device_element_t<typename codec_type::element>;
      const std::int64_t row_bytes = head_dim * static_cast<std::int64_t>(sizeof(store_type));
      if (row_bytes % 16 != 0)
        detail::fail(function, "layers", "head_dim · element size a multiple of 16 bytes on backend::cuda",
                     detail::cat(head_dim, " · ", sizeof(store_type), " = ", row_bytes, " bytes"));
      for (std::size_t l = 0; l < layers.size(); ++l)
        if (reinterpret_cast<std::uintptr_t>(layers[l].storage.keys) % 16 != 0 ||
            reinterpret_cast<std::uintptr_t>(layers[l].storage.values) % 16 != 0)
          detail::fail(function, "layers", "keys and values 16-byte aligned on backend::cuda",
                       detail::cat("layer ", l, " storage not aligned"));
    } else if constexpr (cuda_detail::is_low_rank<codec_type>) {
      // (evict_mover's low_rank parts fit any stored rank: nothing to check)
    } else {
      using encoded = cuda_detail::encoded_codec<codec_type>;
      using inner_type = typename encoded::type;
      std::int64_t row_bytes = head_dim;  // fp8
      if constexpr (requires { inner_type::quantizer::row_bytes(head_dim); })
        row_bytes = inner_type::quantizer::row_bytes(head_dim);
      if (row_bytes % 4 != 0)
        detail::fail(function, "layers",
                     detail::cat("code rows of whole 4-byte words on backend::cuda (", codec_type::name, ")"),
                     detail::cat("head_dim ", head_dim, ": ", row_bytes, " bytes a row"));
      for (std::size_t l = 0; l < layers.size(); ++l) {
        const auto& store = encoded::of(layers[l].storage);
        bool aligned = reinterpret_cast<std::uintptr_t>(store.key_codes) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(store.value_codes) % 16 == 0;
        if constexpr (requires { store.key_group; store.key_zeros; })
          if (store.key_group != 0)
            aligned = aligned && reinterpret_cast<std::uintptr_t>(store.key_scales) % 16 == 0 &&
                      (store.key_zeros == nullptr || reinterpret_cast<std::uintptr_t>(store.key_zeros) % 16 == 0);
        if (!aligned)
          detail::fail(function, "layers", "codec arrays 16-byte aligned (codec::bind) on backend::cuda",
                       detail::cat("layer ", l, " storage not aligned"));
      }
    }
  }

  /// The scratch: the per-head and per-unit tables (for the scope with the most units:
  /// per head; pool histograms for per layer's), then one key array per layer (one
  /// uint32 per storage slot; `keys`, when given, receives their addresses).
  template <class View>
  static cuda_detail::evict_scratch carve(workspace_carver& carver, std::span<const View> layers,
                                          std::uint32_t** keys = nullptr) {
    const std::int64_t layer_count = static_cast<std::int64_t>(layers.size()), heads = layers[0].heads();
    const cuda_detail::evict_scratch tables =
        cuda_detail::evict_scratch::carve(carver, layer_count, heads, layer_count * heads, layer_count * layers[0].batch);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      std::uint32_t* layer_keys =
          carver.take<std::uint32_t>(detail::storage_slots(layers[l].storage) + 4 * (layers[l].heads() + 1));
      if (keys != nullptr) keys[l] = layer_keys;
    }
    return tables;
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

// ---- the prefill seed on the device ----------------------------------------------

namespace kvtrim::cuda_detail {

inline constexpr int seed_warps = 8;

/// One warp per kept token (blockIdx.x: a head of p's batch, the sequences from
/// `first_sequence` on — the whole batch, or one sequence of a padded batch whose p reads
/// its first T_b keys and its window as a batch of one; warps stride over its kept tokens):
/// metric[slot(i)] = factor · Σ_g Σ_{window queries q that see t} term(p_gq(t)), the token's
/// key held in registers (HeadDim / 32 channels a lane), each query row's logit a warp
/// reduction, p = 2^(l' − m') · (1/Z) with the row's (m', 1/Z) from the scorer's pass 1
/// (attention_row_stats: the same base-2 softmax over all visible keys). Tokens the CPU does
/// not seed (inside the protected window, the compensation token) and entries that are not a
/// kept token of the head (past its length, outside [0, p.tokens) — T, or T_b — bad input
/// the CPU refuses, found only in device memory here) are left at 0.
template <int HeadDim, class View, class KeyT, class QueryT>
__global__ void __launch_bounds__(seed_warps * 32)
    seed_decode_metric(const __grid_constant__ View cache,
                       const __grid_constant__ attention_mass_parameters<KeyT, QueryT> p,
                       const std::int64_t* kept_offsets, const std::int32_t* kept_tokens, std::int64_t start_position,
                       float* metric, eviction::metric_kind kind, std::int64_t window, std::int64_t first_sequence) {
  constexpr int per_lane = HeadDim / 32;
  const std::int64_t unit = blockIdx.x, in_batch = unit / p.kv_heads, h = unit % p.kv_heads;
  const std::int64_t b = first_sequence + in_batch, head = b * p.kv_heads + h;  // the cache's
  const int lane = threadIdx.x % 32;
  const std::int64_t length = cache.head_length(b, h);
  const std::int64_t offset = kept_offsets[head];
  const std::int64_t count = std::min(kept_offsets[head + 1] - offset, length);
  const std::int64_t next = cache.positions.next_position[head];
  const std::int64_t compensation = cache.compensation.index[head];
  const std::int64_t first_row = p.tokens - p.observed;  // window query q sees keys ≤ first_row + q
  const std::int64_t row_chunks = p.group * p.chunks_per_head;
  const float factor = eviction::metric_group_factor(kind, p.group);
  for (std::int64_t i = std::int64_t{blockIdx.y} * seed_warps + threadIdx.x / 32; i < count;
       i += std::int64_t{gridDim.y} * seed_warps) {
    const std::int64_t t = kept_tokens[offset + i];
    if (t < 0 || t >= p.tokens || i == compensation ||
        !eviction::outside_window(next, start_position + t, window))
      continue;  // warp-uniform
    float key[per_lane];
    const KeyT* key_row = p.keys + in_batch * p.key_batch_stride + h * p.key_head_stride + t * p.key_token_stride;
#pragma unroll
    for (int c = 0; c < per_lane; ++c) key[c] = to_float(key_row[(lane + 32 * c) * p.key_channel_stride]);
    float sum = 0.0f;
    for (std::int64_t g = 0; g < p.group; ++g) {
      const QueryT* query_rows = p.queries + in_batch * p.query_batch_stride + (h * p.group + g) * p.query_head_stride;
      for (std::int64_t q = t > first_row ? t - first_row : 0; q < p.observed; ++q) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < per_lane; ++c)
          dot += to_float(query_rows[q * p.query_token_stride + (lane + 32 * c) * p.query_channel_stride]) * key[c];
#pragma unroll
        for (int step = 16; step > 0; step /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, step);
        const float2 stats = p.stats[(unit * row_chunks + g * p.chunks_per_head + q / mass_tile) * mass_tile + q % mass_tile];
        sum += eviction::metric_term(kind, exp2f(dot * p.log2_scale - stats.x) * stats.y);
      }
    }
    if (lane == 0) metric[cache.slot(b, h, i)] = sum * factor;
  }
}

/// The seed's pass 1 over `batch` sequences from `first` on `tokens` prompt keys: the whole
/// batch, or (`sequence`) one sequence of a padded batch, a batch of one on its first T_b
/// keys. One plan sizes and runs it (seed_workspace and seed_metric cannot disagree).
struct seed_pass {
  std::int64_t first, batch, tokens;
  bool sequence;

  mass_plan plan(const model_shape& shape, std::int64_t observed) const {
    return plan_attention_mass(shape, batch, tokens, observed);
  }
  /// Its scratch: pass 1's statistics (no column pass: length 0).
  std::size_t bytes(const model_shape& shape, std::int64_t observed) const {
    return attention_mass_workspace_bytes(shape, batch, tokens, observed, 0);
  }

  /// Its parameters over views of the same memory (no copy) and `scratch`, which every pass
  /// of one seed uses from its start (they run in stream order).
  template <class KeyT, class QueryT>
  auto parameters(const kv_view<const KeyT, device_space>& keys, const window_view<const QueryT, device_space>& window,
                  const model_shape& shape, const mass_plan& plan, workspace scratch) const {
    workspace_carver carver(scratch);
    const mass_scratch pieces = carve_attention_mass(carver, plan, 0);
    if (!sequence) return make_mass_parameters(keys, window, shape, batch, 0, 0, plan, pieces);
    return make_mass_parameters(::kvtrim::detail::first_tokens(keys, first, tokens),
                                ::kvtrim::detail::first_tokens(window, first, window.extent(2)), shape, 1, 0, 0, plan,
                                pieces);
  }
};

/// Calls visit(seed_pass) for each pass of a seed: the batch, or each sequence b of a padded
/// batch (`sequence_lengths`, host) on its first T_b keys.
template <class Visit>
void for_each_seed_pass(std::int64_t batch, std::int64_t tokens, const std::int64_t* sequence_lengths, Visit&& visit) {
  if (sequence_lengths == nullptr) {
    visit(seed_pass{0, batch, tokens, false});
    return;
  }
  for (std::int64_t b = 0; b < batch; ++b) visit(seed_pass{b, 1, sequence_lengths[b], true});
}

}  // namespace kvtrim::cuda_detail

namespace kvtrim::eviction {

/// Scratch eviction::seed_metric needs on the device: the scorer's row statistics
/// (attention_mass.cuh's pass 1: partial and final (m, Z) per window query row).
///  * With `sequence_lengths` (host, the ones seed_metric will take): exactly what a seed
///    with them needs — each sequence's pass runs alone, (1, T_b), in the same scratch, so
///    the largest of those. Not the (B, T) size: the pass's split plan is not monotone in
///    (batch, tokens) — one sequence has fewer row blocks, so more key splits, each a row
///    of `partial` (as for compress: scheme.hpp's carve_scratch).
///  * Without: enough for a seed of the whole batch *and* for one with any lengths in
///    [w, T] (like compress_workspace), so an engine sizes its scratch once per (B, T, w).
/// Refuses nothing (lengths outside [w, T] are sized as if clamped): seed_metric checks its
/// arguments, under its own name, before it checks the scratch.
template <class View, class KeyT, class QueryT>
  requires std::same_as<typename View::space, device_space>
std::size_t seed_workspace(const kv_view<const KeyT, device_space>& keys,
                           const window_view<const QueryT, device_space>& window_queries, const View& cache,
                           const std::int64_t* sequence_lengths = nullptr) {
  const std::int64_t tokens = keys.extent(2), observed = window_queries.extent(2);
  const auto pass_bytes = [&](std::int64_t batch, std::int64_t pass_tokens) {
    return cuda_detail::seed_pass{0, batch, pass_tokens, false}.bytes(cache.shape, observed);
  };
  if (sequence_lengths == nullptr)
    return std::max(pass_bytes(cache.batch, tokens),
                    cuda_detail::largest_sequence_workspace(tokens, [&](std::int64_t t) { return pass_bytes(1, t); }));
  std::size_t bytes = 0;
  for (std::int64_t b = 0; b < cache.batch; ++b)
    bytes = std::max(bytes, pass_bytes(1, std::max({std::int64_t{1}, std::min(observed, tokens),
                                                    std::min(sequence_lengths[b], tokens)})));
  return bytes;
}

/// The prefill's metric on the device: the CPU reference's eviction::seed_metric
/// (backend/cpu/eviction.hpp — every slot set to 0, then each kept token older than the
/// protected window gets factor · Σ_g Σ_q term(p_gq(t)) over the observation window's
/// causal softmax), on `stream`, no host synchronisation, no allocation (capturable in a
/// CUDA graph, the lengths baked at capture). `kept` is the selection compress wrote
/// (compress_options' kept_offsets / kept_tokens, device memory).
///
/// `sequence_lengths` (host memory, `batch` entries; null: every sequence has all T) are the
/// ones compress took (a right-padded batch, compress_options::sequence_lengths), as on the
/// CPU: sequence b's window queries sit at the end of its own T_b tokens (query q at prompt
/// position T_b − w + q sees keys 0..T_b − w + q) and only its first T_b keys are read
/// (padding may hold NaN). Lengths outside [w, T] are refused on the host before anything
/// is enqueued, with the CPU's message. A kept token ≥ T_b (or < 0, or past its head's
/// length), which the CPU refuses, lies in device memory: it is not read and its slot
/// stays 0, as for the batch without lengths (tokens ≥ T). With lengths the pass runs per
/// sequence (memset once, then B × (pass 1 on batch-1 views of its first T_b tokens, no copy,
/// + the seed for its kv heads)): three launches a sequence instead of three in all (pass 1
/// and its fold, the seed), each 1/B of the work.
///
/// Its own pass, not the scorer's: score::snapkv's column pass (attention_mass.cuh) sums
/// p over the window per query head for every one of the T prompt tokens before the
/// selection exists; the metric needs Σ p² (the L2 default), for the kept tokens only,
/// at their slots — a second column sum and a kept-token map inside the scorer's kernel
/// and scheme::compress's interface. What is shared is the expensive half: the row
/// statistics (m, Z) of every window query over all T keys run through the scorer's own
/// pass-1 kernels (tensor cores for fp16/bf16); the seed then costs one warp per kept
/// token (G·w dot products of D), O(kept · G · w · D) instead of the scorer's
/// O(T · G · w · D) — ~1/ratio of a second scoring pass.
template <class View, class KeyT, class QueryT>
  requires std::same_as<typename View::space, device_space>
void seed_metric(const kv_view<const KeyT, device_space>& keys,
                 const window_view<const QueryT, device_space>& window_queries, const View& cache,
                 const selection_view<device_space>& kept, std::int64_t start_position,
                 const metric_output<device_space>& metric, workspace scratch, cudaStream_t stream,
                 const std::int64_t* sequence_lengths = nullptr) {
  constexpr std::string_view function = "kvtrim::eviction::seed_metric";
  const model_shape& shape = cache.shape;
  const std::int64_t tokens = keys.extent(2), observed = window_queries.extent(2);
  ::kvtrim::detail::check_view(function, "keys", keys, {cache.batch, shape.kv_heads, -1, shape.head_dim}, true);
  ::kvtrim::detail::check_view(function, "window_queries", window_queries,
                               {cache.batch, shape.q_heads, -1, shape.head_dim}, true);
  if (observed < 1 || observed > tokens)
    ::kvtrim::detail::fail(function, "window_queries", ::kvtrim::detail::cat("1 to ", tokens, " observed queries"),
                           std::to_string(observed));
  eviction_detail::check_seed_lengths(function, sequence_lengths, cache.batch, observed, tokens);
  if (tokens > 2147483647)
    ::kvtrim::detail::fail(function, "keys", "fewer than 2^31 prompt tokens (kept tokens are int32)",
                           std::to_string(tokens));
  View::layout_policy::check(function, cache);
  if (metric.values == nullptr) ::kvtrim::detail::fail(function, "metric", "a metric buffer", "null");
  eviction_detail::check_metric(function, metric, ::kvtrim::detail::storage_slots(cache.storage));
  if (kept.offsets == nullptr || kept.tokens == nullptr)
    ::kvtrim::detail::fail(function, "kept", "the selection's offsets and tokens", "null");
  if (kept.heads != cache.heads())
    ::kvtrim::detail::fail(function, "kept", ::kvtrim::detail::cat("a selection over ", cache.heads(), " heads"),
                           std::to_string(kept.heads));
  std::size_t needed = 0;  // the exact need of these passes (seed_workspace without lengths is a bound)
  cuda_detail::for_each_seed_pass(cache.batch, tokens, sequence_lengths, [&](const cuda_detail::seed_pass& pass) {
    needed = std::max(needed, pass.bytes(shape, observed));
  });
  ::kvtrim::detail::check_workspace(function, scratch, needed);

  using key_t = cuda_detail::device_element_t<KeyT>;
  using query_t = cuda_detail::device_element_t<QueryT>;
  cuda_detail::dispatch_head_dim(shape.head_dim, function, [&](auto head_dim_constant) {
    constexpr int D = decltype(head_dim_constant)::value;
    // Pass 1 only (no column pass: length 0). Every pass's grid is checked before anything runs.
    const auto prepare = [&](const cuda_detail::seed_pass& pass) {
      const cuda_detail::mass_plan plan = pass.plan(shape, observed);
      auto p = pass.parameters(keys, window_queries, shape, plan, scratch);
      const cuda_detail::mass_kernels kernels =
          cuda_detail::choose_mass_kernels<key_t, query_t, D>(function, p, plan, nullptr, 0);
      return std::tuple{plan, p, kernels};
    };
    cuda_detail::for_each_seed_pass(cache.batch, tokens, sequence_lengths, prepare);
    ::kvtrim::detail::check_cuda(
        cudaMemsetAsync(metric.values, 0, sizeof(float) * ::kvtrim::detail::storage_slots(cache.storage), stream),
        function, "cudaMemsetAsync(metric)");
    cuda_detail::for_each_seed_pass(cache.batch, tokens, sequence_lengths, [&](const cuda_detail::seed_pass& pass) {
      const auto [plan, p, kernels] = prepare(pass);
      cuda_detail::launch_attention_row_stats<key_t, query_t, D>(function, p, kernels, plan, stream);
      const auto warps_y = static_cast<unsigned>(
          std::clamp<std::int64_t>(cuda_detail::ceil_div(pass.tokens, cuda_detail::seed_warps), 1, 65535));
      cuda_detail::seed_decode_metric<D, View, key_t, query_t>
          <<<dim3(static_cast<unsigned>(pass.batch * shape.kv_heads), warps_y), cuda_detail::seed_warps * 32, 0,
             stream>>>(cache, p, kept.offsets, kept.tokens, start_position, metric.values, metric.kind,
                       metric.protected_window, pass.first);
      ::kvtrim::detail::check_launch(function, "seed_decode_metric");
    });
  });
}

}  // namespace kvtrim::eviction
