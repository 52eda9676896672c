// kvtrim/backend/cuda/decode_attention.cuh — decode attention on the GPU:
// one new query per query head over a compressed cache (codec::fp16 / bf16 / fp32).
//
// Memory-bound by design: the cache is read exactly once per step.
//  * GQA: a block owns one (sequence, kv head) and all `Group` query heads that
//    read it, so every key/value row is loaded once for the whole group.
//  * Split-K (FlashDecoding): a head's tokens are cut into `splits` chunks, one
//    block each, sized so one wave of blocks fills the GPU even for batch 1;
//    each block writes its partial output and log-sum-exp to the workspace and
//    a second kernel merges them: out = Σ_s 2^(lse_s − lse) · o_s.
//  * K/V tiles (32 KB each for 16-bit storage) stream into shared memory
//    through a 3-stage cp.async pipeline: up to 96 KB in flight per block
//    without spending registers on it, which is what keeps HBM busy.
//  * Inside a block, `lanes_per_token = head_dim / 8` lanes share a token row,
//    each reading 8 elements (16 bytes for 16-bit types) from shared memory and
//    widening them once; the Group dot products finish with one transposed
//    shuffle reduction inside the lane group (lane_group_sum); softmax is online (running max m, sum l, accumulator) in fp32, in
//    base 2 with log2(e)/√D folded into the query.
//  * Partial states of the token groups are merged through shared memory.
// Same math as the CPU reference (backend/cpu/decode_attention.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/contiguous.hpp"

namespace kvtrim {

namespace cuda_detail {

inline constexpr int decode_warps = 8;
inline constexpr int decode_threads = decode_warps * 32;
/// Tokens each lane group handles per tile.
inline constexpr int decode_unroll = 4;
/// A split never gets fewer tokens than this (below it the merge costs more than it saves).
inline constexpr std::int64_t decode_min_tokens_per_split = 128;
inline constexpr std::int64_t decode_max_splits = 256;

/// Compile-time geometry of one decode block.
template <int HeadDim, class StoreT, int Group>
struct decode_geometry {
  static constexpr int lanes_per_token = HeadDim / 8;               // 8 elements per lane
  static constexpr int tokens_per_warp = 32 / lanes_per_token;
  static constexpr int token_groups = decode_warps * tokens_per_warp;
  static constexpr int tile_tokens = token_groups * decode_unroll;  // 32 KB of K+V per tile for 16-bit types
  static constexpr int tile_elements = tile_tokens * HeadDim;
  static constexpr int chunk_elements = 16 / static_cast<int>(sizeof(StoreT));  // one cp.async moves 16 bytes
  static constexpr int chunks_per_row = HeadDim / chunk_elements;
  /// Tiles in flight: 3 for 16-bit storage (96 KB: two blocks per SM), 2 for fp32.
  static constexpr int stages = sizeof(StoreT) == 2 ? 3 : 2;
  static constexpr std::size_t pipeline_bytes = std::size_t{stages} * 2 * tile_elements * sizeof(StoreT);
  static constexpr std::size_t merge_bytes = std::size_t{token_groups} * Group * (HeadDim + 2) * sizeof(float);
  static constexpr std::size_t shared_bytes = pipeline_bytes > merge_bytes ? pipeline_bytes : merge_bytes;
};

/// 16-byte asynchronous global → shared copy; `bytes` = 0 zero-fills the destination.
__device__ __forceinline__ void copy_async16(void* shared_destination, const void* global_source, int bytes) {
  const auto destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(global_source), "r"(bytes));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

template <class View, class QueryT, class OutT>
struct decode_params {
  View cache;
  const QueryT* queries;
  std::int64_t query_batch_stride, query_head_stride;
  OutT* out;
  std::int64_t out_batch_stride, out_head_stride;
  float* partial_out;  // [batch, q_heads, splits, head_dim]   (splits > 1)
  float* partial_lse;  // [batch, q_heads, splits], base 2     (splits > 1)
  int splits;
  std::int64_t tokens_per_split;
  float query_scale;  // log2(e) / √head_dim
  std::int64_t length;  // tokens every head holds (layout::contiguous keeps it on the host)
};

/// Combines the block's partial softmax states (max, sum, unnormalised output
/// per part and query head, in shared memory) and writes the block's result:
/// the output itself when there is one split, else the split's normalised
/// partial output and its log-sum-exp (base 2) for merge_decode_splits.
template <int HeadDim, int Group, int Parts, int Threads, class Params>
__device__ __forceinline__ void finish_block(const Params& params, const float* shared_max, const float* shared_sum,
                                             const float* shared_accumulator, int split, std::int64_t h,
                                             std::int64_t b) {
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();
  for (int index = threadIdx.x; index < Group * HeadDim; index += Threads) {
    const int g = index / HeadDim;
    const int d = index % HeadDim;
    float block_max = negative_infinity;
#pragma unroll
    for (int part = 0; part < Parts; ++part) block_max = fmaxf(block_max, shared_max[part * Group + g]);
    float sum = 0.0f, output = 0.0f;
    if (block_max != negative_infinity) {
#pragma unroll
      for (int part = 0; part < Parts; ++part) {
        const float part_max = shared_max[part * Group + g];
        const float scale = part_max == negative_infinity ? 0.0f : exp2f(part_max - block_max);
        sum += scale * shared_sum[part * Group + g];
        output += scale * shared_accumulator[(part * Group + g) * HeadDim + d];
      }
    }
    const std::int64_t q_head = h * Group + g;
    if (params.splits == 1) {
      params.out[b * params.out_batch_stride + q_head * params.out_head_stride + d] = from_float<std::remove_pointer_t<decltype(params.out)>>(output / sum);
    } else {
      const std::int64_t partial = (b * gridDim.y * Group + q_head) * params.splits + split;
      params.partial_out[partial * HeadDim + d] = sum > 0.0f ? output / sum : 0.0f;
      if (d == 0) params.partial_lse[partial] = sum > 0.0f ? block_max + log2f(sum) : negative_infinity;
    }
  }
}

/// One block: one (split, kv head, sequence). K/V tiles stream through a
/// `stages`-deep cp.async pipeline in shared memory (bytes in flight do not
/// cost registers); lane groups read their rows from shared memory.
template <int HeadDim, int Group, class StoreT, class View, class QueryT, class OutT>
__global__ void __launch_bounds__(decode_threads)
    decode_attention_split(const __grid_constant__ decode_params<View, QueryT, OutT> params) {
  using geometry = decode_geometry<HeadDim, StoreT, Group>;
  constexpr int lanes_per_token = geometry::lanes_per_token;
  constexpr int token_groups = geometry::token_groups;
  constexpr int tile_tokens = geometry::tile_tokens;
  constexpr int stages = geometry::stages;
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();

  extern __shared__ __align__(16) unsigned char shared_memory[];
  auto* tiles = reinterpret_cast<StoreT*>(shared_memory);  // [stages][keys, values][tile_tokens][HeadDim]

  const View& cache = params.cache;
  const int split = blockIdx.x;
  const std::int64_t h = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int token_group = warp * geometry::tokens_per_warp + lane / lanes_per_token;
  const int first_dim = (lane % lanes_per_token) * 8;

  const std::int64_t length = params.length;
  const std::int64_t begin = split * params.tokens_per_split;
  const std::int64_t end = std::min<std::int64_t>(length, begin + params.tokens_per_split);
  const int tile_count = end > begin ? static_cast<int>((end - begin + tile_tokens - 1) / tile_tokens) : 0;

  const auto* keys = reinterpret_cast<const StoreT*>(cache.storage.keys);
  const auto* values = reinterpret_cast<const StoreT*>(cache.storage.values);

  // Every thread moves tile_tokens · chunks_per_row / decode_threads 16-byte chunks of K and of V.
  const auto issue_tile = [&](int tile) {
    StoreT* key_tile = tiles + (tile % stages) * 2 * geometry::tile_elements;
    StoreT* value_tile = key_tile + geometry::tile_elements;
    const std::int64_t first_token = begin + std::int64_t{tile} * tile_tokens;
    for (int chunk = threadIdx.x; chunk < tile_tokens * geometry::chunks_per_row; chunk += decode_threads) {
      const int row = chunk / geometry::chunks_per_row;
      const int column = (chunk % geometry::chunks_per_row) * geometry::chunk_elements;
      const std::int64_t token = first_token + row;
      const bool valid = token < end;
      const std::int64_t source = valid ? cache.slot(b, h, token) * HeadDim + column : 0;
      copy_async16(key_tile + row * HeadDim + column, keys + source, valid ? 16 : 0);
      copy_async16(value_tile + row * HeadDim + column, values + source, valid ? 16 : 0);
    }
  };

#pragma unroll
  for (int tile = 0; tile < stages - 1; ++tile) {
    if (tile < tile_count) issue_tile(tile);
    copy_async_commit();  // empty groups keep the group count uniform
  }

  float query[Group][8];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    const QueryT* row = params.queries + b * params.query_batch_stride + (h * Group + g) * params.query_head_stride;
#pragma unroll
    for (int i = 0; i < 8; ++i) query[g][i] = to_float(row[first_dim + i]) * params.query_scale;
  }

  float running_max[Group], running_sum[Group], accumulator[Group][8];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    running_max[g] = negative_infinity;
    running_sum[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) accumulator[g][i] = 0.0f;
  }

  for (int tile = 0; tile < tile_count; ++tile) {
    if (tile + stages - 1 < tile_count) issue_tile(tile + stages - 1);
    copy_async_commit();
    copy_async_wait<stages - 1>();  // this tile's group has landed
    __syncthreads();

    const StoreT* key_tile = tiles + (tile % stages) * 2 * geometry::tile_elements;
    const StoreT* value_tile = key_tile + geometry::tile_elements;
    const std::int64_t first_token = begin + std::int64_t{tile} * tile_tokens;

    float score[Group][decode_unroll];
#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const int row = u * token_groups + token_group;
      const bool valid = first_token + row < end;
      float key_row[8];
      widen(*reinterpret_cast<const packed8<StoreT>*>(key_tile + row * HeadDim + first_dim), key_row);
      float dots[Group];
#pragma unroll
      for (int g = 0; g < Group; ++g) {
        dots[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dots[g] = fmaf(query[g][i], key_row[i], dots[g]);
      }
      lane_group_sum<lanes_per_token>(dots);
#pragma unroll
      for (int g = 0; g < Group; ++g) score[g][u] = valid ? dots[g] : negative_infinity;
    }

    float weight[Group][decode_unroll];
#pragma unroll
    for (int g = 0; g < Group; ++g) {
      float tile_max = running_max[g];
#pragma unroll
      for (int u = 0; u < decode_unroll; ++u) tile_max = fmaxf(tile_max, score[g][u]);
      // A lane group that has seen only padding keeps its empty state (avoids −∞ − −∞).
      const float rescale = tile_max == negative_infinity ? 1.0f : exp2f(running_max[g] - tile_max);
      running_max[g] = tile_max;
      running_sum[g] *= rescale;
#pragma unroll
      for (int i = 0; i < 8; ++i) accumulator[g][i] *= rescale;
#pragma unroll
      for (int u = 0; u < decode_unroll; ++u) {
        weight[g][u] = tile_max == negative_infinity ? 0.0f : exp2f(score[g][u] - tile_max);
        running_sum[g] += weight[g][u];
      }
    }

#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const int row = u * token_groups + token_group;
      float value_row[8];  // padding rows are zero-filled
      widen(*reinterpret_cast<const packed8<StoreT>*>(value_tile + row * HeadDim + first_dim), value_row);
#pragma unroll
      for (int g = 0; g < Group; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) accumulator[g][i] = fmaf(weight[g][u], value_row[i], accumulator[g][i]);
    }
    __syncthreads();  // the next iteration refills this stage
  }
  copy_async_wait<0>();
  __syncthreads();

  // Merge the token groups' partial states through (reused) shared memory.
  auto* shared_max = reinterpret_cast<float*>(shared_memory);           // [token_groups][Group]
  auto* shared_sum = shared_max + token_groups * Group;                  // [token_groups][Group]
  auto* shared_accumulator = shared_sum + token_groups * Group;          // [token_groups][Group][HeadDim]
#pragma unroll
  for (int g = 0; g < Group; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      shared_accumulator[(token_group * Group + g) * HeadDim + first_dim + i] = accumulator[g][i];
    if (first_dim == 0) {
      shared_max[token_group * Group + g] = running_max[g];
      shared_sum[token_group * Group + g] = running_sum[g];
    }
  }
  __syncthreads();

  finish_block<HeadDim, Group, token_groups, decode_threads>(params, shared_max, shared_sum, shared_accumulator, split,
                                                            h, b);
}

// ---- tensor-core variant (GQA groups of 4 and 8, 16-bit storage) ------------
//
// At G ≥ 4 the CUDA-core kernel spends 2·G fp32 FMAs per cached element and
// can no longer keep up with HBM (half the copy bandwidth at G = 8). Here the
// products run on the tensor cores (mma.sync m16n8k16, fp32 accumulate), as in
// FlashAttention-2: S = Q·Kᵀ with the group's query heads as the 16 rows
// (heads ≥ G are zero padding), then O += P·V with P taken straight from S's
// accumulator layout. Each warp owns 16 tokens of every 64-token tile. K/V
// rows are padded by 16 bytes in shared memory so the 8 rows an ldmatrix reads
// fall in distinct banks. The attention weights P are rounded to the storage
// type (fp16/bf16) for the P·V product — FlashAttention's choice; the softmax
// itself (max, exp2, sums) stays in fp32.

template <int HeadDim, class StoreT, int Group>
struct tensor_core_geometry {
  static constexpr int warps = HeadDim <= 128 ? 8 : 4;
  static constexpr int threads = warps * 32;
  static constexpr int tile_tokens = warps * 16;
  static constexpr int row_stride = HeadDim + 8;  // elements; +16 bytes per row
  static constexpr int tile_elements = tile_tokens * row_stride;
  static constexpr int chunks_per_row = HeadDim / 8;
  static constexpr std::size_t stage_bytes = std::size_t{2} * tile_elements * sizeof(StoreT);
  /// As many stages as fit in ~200 KB of shared memory, between 2 and 4.
  static constexpr int stages = static_cast<int>(std::clamp<std::size_t>(204800 / stage_bytes, 2, 4));
  static constexpr std::size_t pipeline_bytes = std::size_t{stages} * 2 * tile_elements * sizeof(StoreT);
  static constexpr std::size_t merge_bytes = std::size_t{warps} * Group * (HeadDim + 2) * sizeof(float);
  static constexpr std::size_t shared_bytes = pipeline_bytes > merge_bytes ? pipeline_bytes : merge_bytes;
};

__device__ __forceinline__ void load_matrix_x4(unsigned (&fragment)[4], const void* shared_row) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
}
__device__ __forceinline__ void load_matrix_x4_transposed(unsigned (&fragment)[4], const void* shared_row) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
}

/// c += a · b for one m16n8k16 tile, 16-bit inputs, fp32 accumulators.
template <class T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Two floats rounded to T and packed as one 32-bit register (low = first).
template <class T>
__device__ __forceinline__ unsigned pack2(float low, float high) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const unsigned*>(&pair);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const unsigned*>(&pair);
  }
}

template <int HeadDim, int Group, class StoreT, class View, class QueryT, class OutT>
__global__ void __launch_bounds__(tensor_core_geometry<HeadDim, StoreT, Group>::threads)
    decode_attention_tensor_core(const __grid_constant__ decode_params<View, QueryT, OutT> params) {
  using geometry = tensor_core_geometry<HeadDim, StoreT, Group>;
  static_assert(sizeof(StoreT) == 2 && Group <= 8, "tensor-core decode: 16-bit storage, groups of at most 8");
  constexpr int tile_tokens = geometry::tile_tokens;
  constexpr int row_stride = geometry::row_stride;
  constexpr int stages = geometry::stages;
  constexpr int k_steps = HeadDim / 16;
  constexpr int output_tiles = HeadDim / 8;
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();

  extern __shared__ __align__(16) unsigned char shared_memory[];
  auto* tiles = reinterpret_cast<StoreT*>(shared_memory);  // [stages][keys, values][tile_tokens][row_stride]

  const View& cache = params.cache;
  const int split = blockIdx.x;
  const std::int64_t h = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const int head_row = lane / 4;  // this lane's accumulator row: query head h·G + head_row when < G

  const std::int64_t length = params.length;
  const std::int64_t begin = split * params.tokens_per_split;
  const std::int64_t end = std::min<std::int64_t>(length, begin + params.tokens_per_split);
  const int tile_count = end > begin ? static_cast<int>((end - begin + tile_tokens - 1) / tile_tokens) : 0;
  const auto* keys = reinterpret_cast<const StoreT*>(cache.storage.keys);
  const auto* values = reinterpret_cast<const StoreT*>(cache.storage.values);

  const auto issue_tile = [&](int tile) {
    StoreT* key_tile = tiles + (tile % stages) * 2 * geometry::tile_elements;
    StoreT* value_tile = key_tile + geometry::tile_elements;
    const std::int64_t first_token = begin + std::int64_t{tile} * tile_tokens;
    for (int chunk = threadIdx.x; chunk < tile_tokens * geometry::chunks_per_row; chunk += geometry::threads) {
      const int row = chunk / geometry::chunks_per_row;
      const int column = (chunk % geometry::chunks_per_row) * 8;
      const std::int64_t token = first_token + row;
      const bool valid = token < end;
      const std::int64_t source = valid ? cache.slot(b, h, token) * HeadDim + column : 0;
      copy_async16(key_tile + row * row_stride + column, keys + source, valid ? 16 : 0);
      copy_async16(value_tile + row * row_stride + column, values + source, valid ? 16 : 0);
    }
  };
#pragma unroll
  for (int tile = 0; tile < stages - 1; ++tile) {
    if (tile < tile_count) issue_tile(tile);
    copy_async_commit();
  }

  // Q as the A operand (rows = query heads of the group; rows ≥ G and 8..15 are zero).
  unsigned query_fragment[k_steps][2];  // a0 (dims k..k+7), a2 (dims k+8..k+15) of row head_row
#pragma unroll
  for (int step = 0; step < k_steps; ++step)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float first = 0.0f, second = 0.0f;
      if (head_row < Group) {
        const QueryT* row =
            params.queries + b * params.query_batch_stride + (h * Group + head_row) * params.query_head_stride;
        const int dim = step * 16 + half * 8 + 2 * quad;
        first = to_float(row[dim]);
        second = to_float(row[dim + 1]);
      }
      query_fragment[step][half] = pack2<StoreT>(first, second);
    }

  float output[output_tiles][4];
#pragma unroll
  for (int tile = 0; tile < output_tiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) output[tile][i] = 0.0f;
  float running_max = negative_infinity;  // of row head_row, identical across the quad
  float running_sum = 0.0f;               // this lane's columns only; summed over the quad at the end

  for (int tile = 0; tile < tile_count; ++tile) {
    if (tile + stages - 1 < tile_count) issue_tile(tile + stages - 1);
    copy_async_commit();
    copy_async_wait<stages - 1>();
    __syncthreads();

    const StoreT* key_rows = tiles + (tile % stages) * 2 * geometry::tile_elements + warp * 16 * row_stride;
    const StoreT* value_rows = key_rows + geometry::tile_elements;

    float score_tile[2][4] = {};  // S for this warp's 16 tokens: [token block of 8][accumulator]
#pragma unroll
    for (int step = 0; step < k_steps; ++step) {
      unsigned key_fragment[4];
      load_matrix_x4(key_fragment, key_rows + ((lane % 8) + (lane / 16) * 8) * row_stride + step * 16 + ((lane / 8) % 2) * 8);
      const unsigned a[4] = {query_fragment[step][0], 0u, query_fragment[step][1], 0u};
      mma_16x8x16<StoreT>(score_tile[0], a, key_fragment[0], key_fragment[1]);
      mma_16x8x16<StoreT>(score_tile[1], a, key_fragment[2], key_fragment[3]);
    }

    const std::int64_t first_token = begin + std::int64_t{tile} * tile_tokens + warp * 16;
    float score[4];
#pragma unroll
    for (int block = 0; block < 2; ++block)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool valid = first_token + block * 8 + 2 * quad + e < end;
        score[block * 2 + e] = valid ? score_tile[block][e] * params.query_scale : negative_infinity;
      }
    float tile_max = running_max;
#pragma unroll
    for (int i = 0; i < 4; ++i) tile_max = fmaxf(tile_max, score[i]);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float rescale = tile_max == negative_infinity ? 1.0f : exp2f(running_max - tile_max);
    running_max = tile_max;
    float weight[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) weight[i] = tile_max == negative_infinity ? 0.0f : exp2f(score[i] - tile_max);
    running_sum = running_sum * rescale + (weight[0] + weight[1] + weight[2] + weight[3]);
#pragma unroll
    for (int tile_index = 0; tile_index < output_tiles; ++tile_index)
#pragma unroll
      for (int i = 0; i < 4; ++i) output[tile_index][i] *= rescale;

    // P from S's accumulator layout is already the A operand of P·V (rows 8..15 zero).
    const unsigned weight_fragment[4] = {pack2<StoreT>(weight[0], weight[1]), 0u, pack2<StoreT>(weight[2], weight[3]), 0u};
#pragma unroll
    for (int pair = 0; pair < output_tiles / 2; ++pair) {
      unsigned value_fragment[4];
      load_matrix_x4_transposed(value_fragment,
                                value_rows + ((lane % 8) + ((lane / 8) % 2) * 8) * row_stride + pair * 16 + (lane / 16) * 8);
      mma_16x8x16<StoreT>(output[2 * pair], weight_fragment, value_fragment[0], value_fragment[1]);
      mma_16x8x16<StoreT>(output[2 * pair + 1], weight_fragment, value_fragment[2], value_fragment[3]);
    }
    __syncthreads();
  }
  copy_async_wait<0>();
  __syncthreads();

  running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 1);
  running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 2);

  auto* shared_max = reinterpret_cast<float*>(shared_memory);             // [warps][Group]
  auto* shared_sum = shared_max + geometry::warps * Group;                 // [warps][Group]
  auto* shared_accumulator = shared_sum + geometry::warps * Group;         // [warps][Group][HeadDim]
  if (head_row < Group) {
#pragma unroll
    for (int tile_index = 0; tile_index < output_tiles; ++tile_index)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        shared_accumulator[(warp * Group + head_row) * HeadDim + tile_index * 8 + 2 * quad + e] = output[tile_index][e];
    if (quad == 0) {
      shared_max[warp * Group + head_row] = running_max;
      shared_sum[warp * Group + head_row] = running_sum;
    }
  }
  __syncthreads();
  finish_block<HeadDim, Group, geometry::warps, geometry::threads>(params, shared_max, shared_sum, shared_accumulator,
                                                                   split, h, b);
}

/// out[b, j, :] = Σ_s 2^(lse_s − max) o_s / Σ_s 2^(lse_s − max).
template <int HeadDim, class OutT>
__global__ void __launch_bounds__(HeadDim) merge_decode_splits(const float* partial_out, const float* partial_lse,
                                                              int splits, std::int64_t q_heads, OutT* out,
                                                              std::int64_t out_batch_stride,
                                                              std::int64_t out_head_stride) {
  const std::int64_t row = blockIdx.x;  // b · q_heads + j
  const std::int64_t b = row / q_heads;
  const std::int64_t j = row % q_heads;
  const int d = threadIdx.x;
  const float* lse = partial_lse + row * splits;
  float max_lse = -std::numeric_limits<float>::infinity();
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, lse[s]);
  float sum = 0.0f, output = 0.0f;
  for (int s = 0; s < splits; ++s) {
    if (lse[s] == -std::numeric_limits<float>::infinity()) continue;
    const float weight = exp2f(lse[s] - max_lse);
    sum += weight;
    output += weight * partial_out[(row * splits + s) * HeadDim + d];
  }
  out[b * out_batch_stride + j * out_head_stride + d] = from_float<OutT>(output / sum);
}

/// How many chunks each head's tokens are cut into: enough blocks for one full
/// wave of the GPU, never fewer than decode_min_tokens_per_split tokens each.
inline int decode_splits(std::int64_t heads, std::int64_t length, int resident_blocks) {
  // More splits than one wave measured no faster (2×, 4×, 8× the wave: within
  // 1%) and half a wave 25% slower; see docs/results.md.
  const std::int64_t by_occupancy = std::max<std::int64_t>(1, resident_blocks / std::max<std::int64_t>(heads, 1));
  const std::int64_t by_length = std::max<std::int64_t>(1, length / decode_min_tokens_per_split);
  return static_cast<int>(std::min({by_occupancy, by_length, decode_max_splits}));
}

}  // namespace cuda_detail

template <>
struct implementation<stage::decode_attention, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::scheme::attend";

  /// The workspace holds partials for the most splits any instantiation can
  /// choose: the occupancy bound of 2048 threads per SM (16 blocks of 128).
  template <class View>
  static std::size_t workspace_bytes(const View& cache) {
    const int most_resident = backend::cuda::multiprocessor_count() * (2048 / 128);  // 128 = fewest threads per block
    const int splits = cuda_detail::decode_splits(cache.batch * cache.shape.kv_heads, *cache.length, most_resident);
    if (splits == 1) return 0;
    workspace_carver carver;
    carve(carver, cache, splits);
    return carver.bytes();
  }

  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 3, device_space>& queries, const View& cache,
                     const tensor_view<OutT, 3, device_space>& out, workspace scratch, cudaStream_t stream) {
    static_assert(std::is_same_v<typename View::layout_policy, layout::contiguous>,
                  "kvtrim: backend::cuda decode attention reads layout::contiguous caches for now");
    static_assert(codec::is_plain<typename View::codec>,
                  "kvtrim: backend::cuda decode attention reads codec::fp16 / bf16 / fp32 for now");
    using store_type = cuda_detail::device_element_t<typename View::codec::element>;
    using query_type = cuda_detail::device_element_t<QueryT>;
    using out_type = cuda_detail::device_element_t<OutT>;
    const std::int64_t length = *cache.length;
    if (length < 1)
      detail::fail(function, "cache", "at least one token in every head", "an empty cache (length 0)");
    if (cache.batch > 65535 || cache.shape.kv_heads > 65535)
      detail::fail(function, "cache", "batch and kv_heads ≤ 65535 on backend::cuda",
                   detail::cat("batch ", cache.batch, ", kv_heads ", cache.shape.kv_heads));
    cuda_detail::check_aligned16(function, "cache.storage.keys", cache.storage.keys);
    cuda_detail::check_aligned16(function, "cache.storage.values", cache.storage.values);

    cuda_detail::dispatch_head_dim(cache.shape.head_dim, function, [&](auto head_dim_constant) {
      constexpr int head_dim = decltype(head_dim_constant)::value;
      cuda_detail::dispatch_group_size(cache.shape.group_size(), function, [&](auto group_constant) {
        constexpr int group = decltype(group_constant)::value;
        // Groups of 4 and 8 over 16-bit storage run on the tensor cores; the rest on CUDA cores.
        constexpr bool tensor_cores = sizeof(store_type) == 2 && group >= 4;
        using tensor_core_geometry = cuda_detail::tensor_core_geometry<head_dim, store_type, group>;
        using cuda_core_geometry = cuda_detail::decode_geometry<head_dim, store_type, group>;
        constexpr std::size_t shared_bytes =
            tensor_cores ? tensor_core_geometry::shared_bytes : cuda_core_geometry::shared_bytes;
        constexpr int threads = tensor_cores ? tensor_core_geometry::threads : cuda_detail::decode_threads;
        const auto kernel = [&] {
          if constexpr (tensor_cores)
            return cuda_detail::decode_attention_tensor_core<head_dim, group, store_type, View, query_type, out_type>;
          else
            return cuda_detail::decode_attention_split<head_dim, group, store_type, View, query_type, out_type>;
        }();
        // Above 48 KB a kernel must opt in to dynamic shared memory (per device, so on every call;
        // it is a host-side attribute write, no synchronisation).
        detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(shared_bytes)),
                           function, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
        // One wave of blocks fills the GPU: size the split count by this
        // kernel's real occupancy (shared memory and registers differ per instantiation).
        int blocks_per_multiprocessor = 0;
        detail::check_cuda(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, threads, shared_bytes),
            function, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
        const int splits = cuda_detail::decode_splits(
            cache.batch * cache.shape.kv_heads, length,
            backend::cuda::multiprocessor_count() * std::max(blocks_per_multiprocessor, 1));
        workspace_carver carver(scratch);
        const auto [partial_out, partial_lse] = carve(carver, cache, splits);
        const std::int64_t tokens_per_split = cuda_detail::ceil_div(length, splits);
        using params_type = cuda_detail::decode_params<View, query_type, out_type>;
        const params_type params{cache,
                                 reinterpret_cast<const query_type*>(queries.data),
                                 queries.stride(0),
                                 queries.stride(1),
                                 reinterpret_cast<out_type*>(out.data),
                                 out.stride(0),
                                 out.stride(1),
                                 partial_out,
                                 partial_lse,
                                 splits,
                                 tokens_per_split,
                                 static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim))),
                                 length};
        const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(cache.shape.kv_heads),
                        static_cast<unsigned>(cache.batch));
        kernel<<<grid, threads, shared_bytes, stream>>>(params);
        detail::check_launch(function, tensor_cores ? "decode_attention_tensor_core" : "decode_attention_split");
        if (splits > 1) {
          const auto rows = static_cast<unsigned>(cache.batch * cache.shape.q_heads);
          cuda_detail::merge_decode_splits<head_dim, out_type><<<rows, head_dim, 0, stream>>>(
              partial_out, partial_lse, splits, cache.shape.q_heads, reinterpret_cast<out_type*>(out.data),
              out.stride(0), out.stride(1));
          detail::check_launch(function, "merge_decode_splits");
        }
      });
    });
  }

 private:
  template <class Carver, class View>
  static std::pair<float*, float*> carve(Carver& carver, const View& cache, int splits) {
    if (splits == 1) return {nullptr, nullptr};
    const std::int64_t rows = cache.batch * cache.shape.q_heads * splits;
    float* partial_out = carver.template take<float>(rows * cache.shape.head_dim);
    float* partial_lse = carver.template take<float>(rows);
    return {partial_out, partial_lse};
  }
};

}  // namespace kvtrim
