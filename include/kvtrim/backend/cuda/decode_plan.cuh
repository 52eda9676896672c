// kvtrim/backend/cuda/decode_plan.cuh — what decode attention reads and who
// reads it: the per-layout row locators and the balanced split-K partition
// (plan step, partition merge).
//
// Addressing (one kernel template over every layout): a `head_rows` for one
// flattened head head = b·kv_heads + h maps token i to its storage slot,
//   contiguous  base(b, h) + i·token_stride
//   paged       indices[indptr[head] + i / page]·page + i % page
//   flat        offsets[head] + i
//   shared_paged (an engine's pages: every kv head of a sequence in one page)
//               page = indices[indptr[b] + i / page], then
//               NHD (page·2·page + i % page)·kv_heads + h,  HND (page·2·kv_heads + h)·page + i % page
// plus the head's compensation token (RazorAttention): its logical index and
// logit bias (layout/detail/compensation.hpp), added after the 1/√D scale as
// the CPU does.
//
// Balanced partition (FlashDecoding's split-K, cut by tokens instead of by
// heads): the heads' tokens are laid end to end on one line of
// T = Σ_head n_head tokens (prefix[head] = Σ_{head' < head} n_head'), and block p
// of a fixed grid of P blocks (one wave of the GPU) reads the tokens
// [p·C, min(T, (p+1)·C)) with C = max(min_chunk, ⌈T / P⌉): every block reads the
// same number of bytes whatever the heads' lengths, so a ragged cache costs
// what its bytes cost. Heads of one length that a whole number of blocks splits
// evenly take C = length / s instead (uniform_decode_chunk), so no block
// straddles two. A block's range meets one or more heads; each piece
// (segment) is one online softmax whose state goes to the workspace as a
// partial (output, log-sum-exp) at index p + head — along the line each
// segment boundary moves p, head or both forward, so p + head is unique — or,
// when the segment is the whole head, straight to the output. The merge then
// combines, per query head, the partials of blocks ⌊prefix[head] / C⌋ ..
// ⌊(prefix[head+1] − 1) / C⌋ (FlashInfer's plan/run split, with the
// persistent-partition balance of its "balanced" scheduler).
//
// Where the lengths live on the device (paged, flat), a one-block plan kernel
// scans them (CUB BlockScan) into prefix[], T and C, and for each block its
// first head — no host synchronisation, so attend stays capturable in a CUDA
// graph; up to decode_block_plan_heads heads each attention block makes the
// same plan itself instead (plan_in_block), one launch fewer. Contiguous
// caches have one host-known length n: prefix[head] = head·n is arithmetic
// and no plan kernel runs.
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/layout/contiguous.hpp"
#include "kvtrim/layout/flat.hpp"
#include "kvtrim/layout/paged.hpp"
#include "kvtrim/layout/shared_paged.hpp"

namespace kvtrim::cuda_detail {

// ---- programmatic dependent launch -----------------------------------------
//
// (plan →) attention → merge run back to back on one stream; each later kernel is
// launched with programmatic stream serialisation (Hopper), so its blocks are
// scheduled while the earlier kernel drains and wait at griddepcontrol.wait —
// which returns once the earlier grid has finished and its writes are visible —
// instead of paying a launch gap. Without the launch attribute (or before sm_90)
// both instructions are no-ops and stream order alone applies.

/// Waits until the grid this one depends on has completed (its memory visible).
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
/// Lets the next kernel on the stream be scheduled now (it still waits for this grid's completion).
__device__ __forceinline__ void allow_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

/// Launches `kernel` on `stream` as a programmatic dependent of the previous kernel there.
template <class... Parameters, class... Arguments>
void launch_dependent(void (*kernel)(Parameters...), dim3 grid, dim3 block, std::size_t shared_bytes,
                      cudaStream_t stream, std::string_view function, std::string_view name, Arguments&&... arguments) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  detail::check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Arguments>(arguments)...), function,
                     detail::cat("cudaLaunchKernelEx(", name, ")"));
}

// ---- addressing -------------------------------------------------------------

/// Token i of a contiguous head: base + i·stride.
struct strided_rows {
  /// Slots are affine in the token (kv_tile_stream copies whole tiles of stride-1 rows by
  /// immediate offsets from one address, with no per-row slot arithmetic).
  static constexpr bool affine = true;
  std::int64_t base = 0;
  std::int64_t stride = 1;
  __device__ __forceinline__ std::int64_t slot(std::int64_t i) const { return base + i * stride; }
};

/// Token i of a paged head: its page id from the head's page table, then the offset in the page.
struct paged_rows {
  const std::int32_t* pages = nullptr;  // indices + indptr[head]
  std::int64_t page_size = 1;
  int page_shift = -1;  // log2(page_size) when a power of two (16/32/64: a shift, not a division)
  __device__ __forceinline__ std::int64_t slot(std::int64_t i) const {
    if (page_shift >= 0)
      return (static_cast<std::int64_t>(__ldg(pages + (i >> page_shift))) << page_shift) + (i & (page_size - 1));
    return static_cast<std::int64_t>(__ldg(pages + i / page_size)) * page_size + i % page_size;
  }
};

/// Token i of kv head h of a sequence in an engine's head-shared pages (layout::shared_paged):
/// the page from the sequence's table, then the row of (offset, h) in the page's key half.
struct shared_page_rows {
  const std::int32_t* pages = nullptr;  // indices + indptr[b]
  std::int64_t page_size = 1;
  int page_shift = -1;
  std::int64_t kv_heads = 1;
  std::int64_t h = 0;
  bool heads_outer = false;  // HND: [2][kv_heads][page_size] per page; NHD: [2][page_size][kv_heads]
  __device__ __forceinline__ std::int64_t slot(std::int64_t i) const {
    std::int64_t page, offset;
    if (page_shift >= 0) {
      page = __ldg(pages + (i >> page_shift));
      offset = i & (page_size - 1);
    } else {
      page = __ldg(pages + i / page_size);
      offset = i % page_size;
    }
    return heads_outer ? (page * 2 * kv_heads + h) * page_size + offset : (page * 2 * page_size + offset) * kv_heads + h;
  }
};

/// log2(n) for a power of two, else −1 (host side, once per call).
inline int power_of_two_shift(std::int64_t n) {
  if (n < 1 || (n & (n - 1)) != 0) return -1;
  int shift = 0;
  while ((std::int64_t{1} << shift) < n) ++shift;
  return shift;
}

template <class View>
inline constexpr bool is_contiguous_view = std::is_same_v<typename View::layout_policy, layout::contiguous>;
template <class View>
inline constexpr bool is_paged_view = std::is_same_v<typename View::layout_policy, layout::paged>;
template <class View>
inline constexpr bool is_flat_view = std::is_same_v<typename View::layout_policy, layout::flat>;
template <class View>
inline constexpr bool is_shared_paged_view = std::is_same_v<typename View::layout_policy, layout::shared_paged>;

/// The row locator of one flattened head (b·kv_heads + h) of any layout's view.
template <class View>
__device__ __forceinline__ auto head_rows(const View& cache, std::int64_t head, int page_shift) {
  const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
  if constexpr (is_contiguous_view<View>) {
    (void)page_shift;
    return strided_rows{cache.slot(b, h, 0), cache.map.token_stride};
  } else if constexpr (is_paged_view<View>) {
    return paged_rows{cache.indices + cache.indptr[head], cache.page_size, page_shift};
  } else if constexpr (is_shared_paged_view<View>) {
    return shared_page_rows{cache.indices + cache.indptr[b], cache.page_size, page_shift, cache.shape.kv_heads, h,
                            cache.order == layout::shared_paged::order::hnd};
  } else {
    static_assert(is_flat_view<View>,
                  "kvtrim: backend::cuda decode attention reads contiguous, paged, shared_paged and flat layouts");
    (void)page_shift;
    return strided_rows{cache.offsets[head], 1};
  }
}

/// A head's compensation token: its logical index (−1: none) and its logit bias in base 2.
struct head_bias {
  std::int64_t index = -1;
  float bias_log2 = 0.0f;
  __device__ __forceinline__ float at(std::int64_t token) const { return token == index ? bias_log2 : 0.0f; }
};

template <class View>
__device__ __forceinline__ head_bias compensation_of(const View& cache, std::int64_t head) {
  if constexpr (requires { cache.compensation.index; }) {
    // ln N → log2 N: the kernels' logits are in base 2 (log2(e)/√D is folded into the query).
    return {cache.compensation.index[head], cache.compensation.bias[head] * 1.4426950408889634f};
  } else {
    (void)cache, (void)head;
    return {};
  }
}

// ---- the partition ----------------------------------------------------------

/// A block never reads fewer tokens than this (below it the merge costs more than it saves).
inline constexpr std::int64_t decode_min_chunk = 256;
/// The partition's grid is one wave: multiprocessors × resident blocks, bounded
/// by this many blocks per multiprocessor (2048 threads / 256) for the workspace's size.
inline constexpr int decode_max_blocks_per_multiprocessor = 8;

/// The line's length T and block chunk C, written by the plan kernel.
struct decode_line {
  std::int64_t total = 0;
  std::int64_t chunk = decode_min_chunk;
};

__host__ __device__ inline std::int64_t decode_chunk(std::int64_t total, std::int64_t blocks) {
  const std::int64_t even = (total + blocks - 1) / blocks;
  return even > decode_min_chunk ? even : decode_min_chunk;
}

/// Heads of one length (contiguous caches; paged and flat ones whose plan finds every head equal): when
/// a whole number s of blocks a head fills at least 15/16 of the wave and cuts the length into equal
/// chunks of at least decode_min_chunk, C = length / s, so that every block reads one piece of one head —
/// one segment, one pipeline fill and one partial (s = 1: whole heads, and for contiguous caches no
/// merge) — as cuDNN's decode splits W (4 × 8192 tokens a head); otherwise the balanced C of
/// decode_chunk, whose block ranges may straddle two heads. (Contiguous fp8 fragments take decode_chunk
/// always: decode_attention.cuh, measured; paged / flat fp8 planned on the device keep this rule.)
__host__ __device__ inline std::int64_t uniform_decode_chunk(std::int64_t heads, std::int64_t length,
                                                             std::int64_t blocks) {
  for (std::int64_t splits = heads > 0 ? blocks / heads : 0; splits >= 1 && splits * heads * 16 >= blocks * 15;
       --splits)
    if (length % splits == 0 && length / splits >= decode_min_chunk) return length / splits;
  return decode_chunk(heads * length, blocks);
}

/// Contiguous: every head holds `length` tokens (host-known), so the line is arithmetic.
struct uniform_partition {
  std::int64_t heads = 0;
  std::int64_t length = 0;  // ≥ 1
  std::int64_t chunk = decode_min_chunk;
  __device__ __forceinline__ decode_line line() const { return {heads * length, chunk}; }
  __device__ __forceinline__ std::int64_t prefix(std::int64_t head) const { return head * length; }
  __device__ __forceinline__ std::int64_t first_head(std::int64_t block) const { return block * chunk / length; }
};

/// Paged / flat: the plan's scan of the device-side lengths — by the plan kernel, or (in_block) by
/// every block of the attention kernel itself (block_planned_partition), which then reads these
/// tables from its shared memory and leaves the global ones for the merge and the eviction finisher.
struct planned_partition {
  std::int64_t heads = 0;
  const decode_line* line_ = nullptr;      // [1]
  const std::int64_t* prefix_ = nullptr;   // [heads + 1]
  const std::int32_t* first_head_ = nullptr;  // [blocks]: the head holding token p·C (valid while p·C < T)
  bool in_block = false;  // heads ≤ decode_block_plan_heads and the kernel plans in its blocks: no plan kernel
  /// The block first_head_[0] belongs to: 0 for the tables of every block, blockIdx.x for a block's own
  /// plan (one entry: its own first head).
  std::int64_t first_head_block = 0;
  __device__ __forceinline__ decode_line line() const { return *line_; }
  __device__ __forceinline__ std::int64_t prefix(std::int64_t head) const { return prefix_[head]; }
  __device__ __forceinline__ std::int64_t first_head(std::int64_t block) const {
    return first_head_[block - first_head_block];
  }
};

inline constexpr int decode_plan_threads = 256;

/// One block: prefix[] = exclusive scan of the heads' lengths, T, C = max(min_chunk, ⌈T / blocks⌉) (heads of
/// one length: uniform_decode_chunk), and first_head[p] for every block p whose range starts inside the line.
template <class View>
__global__ void __launch_bounds__(decode_plan_threads)
    plan_decode_partition(const __grid_constant__ View cache, std::int64_t blocks, decode_line* line,
                          std::int64_t* prefix, std::int32_t* first_head) {
  allow_dependent_grid();  // the attention kernel's blocks may be scheduled; they wait for this plan
  using scan = cub::BlockScan<std::int64_t, decode_plan_threads>;
  __shared__ typename scan::TempStorage scan_storage;
  __shared__ std::int64_t shared_chunk;
  const std::int64_t heads = cache.heads();
  std::int64_t running = 0;  // Σ lengths of the tiles before this one (every thread holds it)
  // Every head as long as the first (a full or uniformly compressed paged cache): the chunk that splits
  // heads evenly, as for contiguous caches (uniform_decode_chunk).
  const std::int64_t first_length = heads > 0 ? cache.head_length(0, 0) : 0;
  bool equal_lengths = true;
  for (std::int64_t tile = 0; tile < heads; tile += decode_plan_threads) {
    const std::int64_t head = tile + threadIdx.x;
    const std::int64_t length =
        head < heads ? cache.head_length(head / cache.shape.kv_heads, head % cache.shape.kv_heads) : 0;
    std::int64_t before = 0, tile_total = 0;
    scan(scan_storage).ExclusiveSum(length, before, tile_total);
    if (head < heads) prefix[head] = running + before;
    running += tile_total;
    // Also the barrier before scan_storage is reused by the next tile.
    equal_lengths = __syncthreads_and(head >= heads || length == first_length) && equal_lengths;
  }
  if (threadIdx.x == 0) {
    prefix[heads] = running;
    const std::int64_t chunk =
        equal_lengths ? uniform_decode_chunk(heads, first_length, blocks) : decode_chunk(running, blocks);
    *line = {running, chunk};
    shared_chunk = chunk;
  }
  __syncthreads();  // prefix[] (global, this block's writes) and the chunk are visible to the block
  const std::int64_t chunk = shared_chunk;
  for (std::int64_t head = threadIdx.x; head < heads; head += decode_plan_threads) {
    // Blocks whose first token p·C lies in [prefix[head], prefix[head + 1]) start in this head.
    const std::int64_t first_block = (prefix[head] + chunk - 1) / chunk;
    const std::int64_t end_block = std::min<std::int64_t>(blocks, (prefix[head + 1] + chunk - 1) / chunk);
    for (std::int64_t block = first_block; block < end_block; ++block) first_head[block] = static_cast<std::int32_t>(head);
  }
}

// ---- the plan inside the attention kernel ------------------------------------
//
// The plan kernel is one more launch on decode's critical path: its grid must complete (and the
// attention kernel's blocks see its writes) before any block knows its range, then each block's
// first loads (line, first head, prefix) depend on it. Up to decode_block_plan_heads heads every
// attention block instead reads the lengths itself (a few hundred bytes, L2-resident after the first
// block) and scans them in one warp into its shared memory, with the same T, C and first heads as
// the kernel (the same decode_chunk / uniform_decode_chunk). Block 0 also writes prefix[] and the
// line to the workspace, and block p its first_head[p], where the merge and the eviction finisher
// (launched after this grid) read them as before.

/// Heads the in-block plan takes: 8 a lane of one warp's scan; its tables are ~2 KB of shared memory a block.
inline constexpr std::int64_t decode_block_plan_heads = 256;
static_assert(decode_block_plan_heads % 32 == 0 && decode_block_plan_heads <= 32 * 32,
              "decode_block_plan_heads: whole heads a lane of plan_in_block's one-warp scan (its per-lane arrays)");

/// One block's copy of the plan (shared memory; no initialisers, as __shared__ storage needs).
struct decode_block_plan {
  std::int64_t prefix[decode_block_plan_heads + 1];
  alignas(decode_line) unsigned char line[sizeof(decode_line)];
  std::int32_t first_head;
};

/// The plan of `partition.heads` (≤ decode_block_plan_heads) heads for a grid of gridDim.x blocks, into
/// `plan`; returns the partition reading it. Every thread of the block calls it (it holds two barriers).
template <class View>
__device__ planned_partition plan_in_block(const planned_partition& partition, const View& cache,
                                           decode_block_plan& plan) {
  constexpr int per_lane = static_cast<int>(decode_block_plan_heads / 32);
  const std::int64_t heads = partition.heads;
  const std::int64_t blocks = gridDim.x;
  for (std::int64_t head = threadIdx.x; head < heads; head += blockDim.x)
    plan.prefix[head + 1] = cache.head_length(head / cache.shape.kv_heads, head % cache.shape.kv_heads);
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = static_cast<int>(threadIdx.x);
    // Lane 0 alone reads head 0's length (it rewrites that entry below).
    const std::int64_t first_length = __shfl_sync(~0u, lane == 0 && heads > 0 ? plan.prefix[1] : 0, 0);
    std::int64_t inclusive[per_lane];  // Σ lengths of this lane's heads up to and including each
    std::int64_t sum = 0;
    bool equal = true;
#pragma unroll
    for (int k = 0; k < per_lane; ++k) {
      const std::int64_t head = std::int64_t{lane} * per_lane + k;
      const std::int64_t length = head < heads ? plan.prefix[head + 1] : 0;
      equal = equal && (head >= heads || length == first_length);
      sum += length;
      inclusive[k] = sum;
    }
    std::int64_t scanned = sum;  // the warp's inclusive scan of the lanes' sums
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const std::int64_t other = __shfl_up_sync(~0u, scanned, offset);
      if (lane >= offset) scanned += other;
    }
    const std::int64_t before = scanned - sum;
    const std::int64_t total = __shfl_sync(~0u, scanned, 31);
    const std::int64_t chunk = __all_sync(~0u, equal) ? uniform_decode_chunk(heads, first_length, blocks)
                                                       : decode_chunk(total, blocks);
    // Each lane rewrites only its own heads' entries (read above by the same lane): no hazard.
    const std::int64_t start = std::int64_t{blockIdx.x} * chunk;
    std::int32_t found = -1;
#pragma unroll
    for (int k = 0; k < per_lane; ++k) {
      const std::int64_t head = std::int64_t{lane} * per_lane + k;
      const std::int64_t head_begin = before + (k > 0 ? inclusive[k - 1] : 0);
      if (head < heads) {
        plan.prefix[head + 1] = before + inclusive[k];
        if (head_begin <= start && start < before + inclusive[k]) found = static_cast<std::int32_t>(head);
      }
    }
    // At most one head holds token `start` (non-empty heads are disjoint on the line); none when start ≥ T.
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) found = max(found, __shfl_xor_sync(~0u, found, offset));
    if (lane == 0) {
      plan.prefix[0] = 0;
      *reinterpret_cast<decode_line*>(plan.line) = {total, chunk};
      plan.first_head = found < 0 ? 0 : found;
    }
  }
  __syncthreads();
  // The workspace's tables for the merge and the eviction finisher (they run after this grid); the
  // plan kernel writes them otherwise.
  if (blockIdx.x == 0) {
    auto* prefix = const_cast<std::int64_t*>(partition.prefix_);
    for (std::int64_t head = threadIdx.x; head <= heads; head += blockDim.x) prefix[head] = plan.prefix[head];
    if (threadIdx.x == 0) *const_cast<decode_line*>(partition.line_) = *reinterpret_cast<const decode_line*>(plan.line);
  }
  const decode_line& line = *reinterpret_cast<const decode_line*>(plan.line);
  if (threadIdx.x == 0 && std::int64_t{blockIdx.x} * line.chunk < line.total)
    const_cast<std::int32_t*>(partition.first_head_)[blockIdx.x] = plan.first_head;
  return {heads, &line, plan.prefix, &plan.first_head, false, std::int64_t{blockIdx.x}};
}

/// The partition an attention block reads: a planned one whose plan is in the block (in_block) is
/// planned here into shared memory; every other one as given.
template <class Partition, class View>
__device__ __forceinline__ Partition block_planned_partition(const Partition& partition, const View& cache) {
  if constexpr (std::is_same_v<Partition, planned_partition>) {
    __shared__ decode_block_plan plan;
    if (partition.in_block) return plan_in_block(partition, cache, plan);
  }
  return partition;
}

/// Calls body(head, begin, end, whole, partial_index) for every piece of a
/// head that this block's range [p·C, min(T, (p+1)·C)) holds, in head order.
template <class Partition, class Body>
__device__ __forceinline__ void for_each_segment(const Partition& partition, Body&& body) {
  const decode_line line = partition.line();
  const std::int64_t block = blockIdx.x;
  const std::int64_t start = block * line.chunk;
  if (start >= line.total) return;
  const std::int64_t stop = std::min(line.total, start + line.chunk);
  for (std::int64_t head = partition.first_head(block); head < partition.heads; ++head) {
    const std::int64_t head_begin = partition.prefix(head);
    if (head_begin >= stop) break;
    const std::int64_t head_end = partition.prefix(head + 1);
    const std::int64_t begin = std::max(start, head_begin) - head_begin;
    const std::int64_t end = std::min(stop, head_end) - head_begin;
    if (end <= begin) continue;  // an empty head
    body(head, begin, end, begin == 0 && end == head_end - head_begin, block + head);
  }
}

/// Partials of a head the merge loads in one go (more: two passes, the lse first).
inline constexpr int merge_loads_at_once = 8;

/// out[b, t, j] = Σ_s 2^(lse_s − max) o_s / Σ_s 2^(lse_s − max) over the blocks
/// that read head b·kv_heads + j / Group (t: the new token, multi-query; a block's
/// partials hold Group × queries rows, row t·Group + j % Group); heads read by one
/// block were written by it; empty heads (a budget of 0) get zeros, as does a
/// query that saw no token (every partial −∞: a head shorter than n). With an
/// eviction metric (metric_lse non-null; one query) the head's merged
/// log-sum-exp goes to metric_lse[head · Group + g].
template <int HeadDim, int Group, class Partition, class OutT>
__global__ void __launch_bounds__(HeadDim)
    merge_decode_partials(const __grid_constant__ Partition partition, const float* partial_out,
                          const float* partial_lse, std::int64_t q_heads, std::int64_t kv_heads,
                          std::int64_t queries, OutT* out, std::int64_t out_batch_stride,
                          std::int64_t out_token_stride, std::int64_t out_head_stride, float* metric_lse) {
  wait_for_prerequisite_grid();  // the attention kernel's partials
  const std::int64_t row = blockIdx.x;  // (b · queries + t) · q_heads + j
  const std::int64_t b = row / (queries * q_heads), t = (row / q_heads) % queries, j = row % q_heads;
  const std::int64_t head = b * kv_heads + j / Group;
  const std::int64_t query_row = t * Group + j % Group;  // the row within a partial's Group × queries
  const int d = threadIdx.x;
  OutT* target = out + b * out_batch_stride + t * out_token_stride + j * out_head_stride + d;
  const decode_line line = partition.line();
  const std::int64_t head_begin = partition.prefix(head), head_end = partition.prefix(head + 1);
  if (head_end <= head_begin) {
    *target = from_float<OutT>(0.0f);
    return;
  }
  const std::int64_t first = head_begin / line.chunk, last = (head_end - 1) / line.chunk;
  if (first == last) return;  // one block read the whole head and wrote the output
  const std::int64_t rows = Group * queries;
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();
  float max_lse = negative_infinity, sum = 0.0f, output = 0.0f;
  if (last - first < merge_loads_at_once) {
    // Up to merge_loads_at_once partials (W: 4–5 a head): every lse and output loaded at once, one
    // round trip after the attention grid instead of two (the loop below reads the outputs only once
    // the maximum is known); the same operations in the same order, so the same bits.
    const int count = static_cast<int>(last - first) + 1;
    float lse[merge_loads_at_once], value[merge_loads_at_once];
#pragma unroll
    for (int i = 0; i < merge_loads_at_once; ++i)
      if (i < count) {
        const std::int64_t index = (first + i + head) * rows + query_row;
        lse[i] = partial_lse[index];
        // Every block of a split head writes its partial (0 where it saw no token); unused where lse[i] is −∞.
        value[i] = partial_out[index * HeadDim + d];
      }
#pragma unroll
    for (int i = 0; i < merge_loads_at_once; ++i)
      if (i < count) max_lse = fmaxf(max_lse, lse[i]);
#pragma unroll
    for (int i = 0; i < merge_loads_at_once; ++i)
      if (i < count && lse[i] != negative_infinity) {
        const float weight = exp2f(lse[i] - max_lse);
        sum += weight;
        output += weight * value[i];
      }
  } else {
    for (std::int64_t block = first; block <= last; ++block)
      max_lse = fmaxf(max_lse, partial_lse[(block + head) * rows + query_row]);
    for (std::int64_t block = first; block <= last; ++block) {
      const std::int64_t index = (block + head) * rows + query_row;
      const float lse = partial_lse[index];
      if (lse == negative_infinity) continue;
      const float weight = exp2f(lse - max_lse);
      sum += weight;
      output += weight * partial_out[index * HeadDim + d];
    }
  }
  *target = from_float<OutT>(sum > 0.0f ? output / sum : 0.0f);
  if (metric_lse != nullptr && d == 0) metric_lse[head * Group + query_row] = max_lse + log2f(sum);
}

}  // namespace kvtrim::cuda_detail
