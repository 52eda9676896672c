// kvtrim/backend/cuda/attention_mass.cuh — the attention mass shared by
// score::snapkv and score::h2o on the GPU (see score/attention_mass.hpp for the
// math, backend/cpu/attention_mass.hpp for the reference it must match).
//
// For query head g, observed query t at position p_t = T − n_q + t and key j ≤ p_t:
//   l_j = (q_t · k_j) · (1/√D)          fp32 (tensor cores: fp16/bf16 products are
//                                       exact in fp32, the sum runs in another order)
//   m   = max_j l_j,  Z = Σ_j exp(l_j − m),  mass_g[j] += exp(l_j − m) / Z
// (the GPU multiplies by 1/Z, computed once per row: one rounding more than the
// CPU's division, far inside the tolerance the tests derive)
// the CPU's normalisation: softmax over every key up to the query (window keys
// included), fp32, then the scorer's per-query-head step
// (SnapKV: mean over the window + pooling; H2O: the observed normalisation) and
// the GQA group reduction (mean: sum then one division; max).
//
// Why two passes. A key's mass sums probabilities of many queries, each divided by
// its own row's (m, Z); an online (flash-style) rescaling works along a row, but a
// column sum over rows cannot be rescaled after the fact without keeping every
// row's partial probabilities (G·w × T floats per kv head, gigabytes at 32k). So:
//   pass 1  attention_row_stats:   per (row chunk of 64 queries, key split): the
//           online (max, Σexp) of each row over its keys → partials; a small
//           kernel folds the splits into (m, Z) per row;
//   pass 2  attention_column_mass: per (kv head, tile of 64 keys): the K tile is
//           loaded once and every query row of the GQA group is multiplied
//           against it (K is never repeated per query head), probabilities use the
//           final (m, Z), and each query head's column sums are written once
//           (no atomics: the block owns its key tile);
//   finish  attention_mass_finish: the scorer's per-query-head step, pooling over
//           neighbouring tokens and the group reduction, per (kv head, tile of 1024
//           tokens), SnapKV's query-head rows staged in shared memory four at a time;
//           kernels 1–9 compiled for tiles whose windows stay inside the row (each
//           thread pools 4 consecutive tokens from registers).
// Both passes use one tile product: Q[64 × D] · K[64 × D]ᵀ on tensor cores
// (mma.sync m16n8k16, fp32 accumulators, the logits kept in registers: the
// *_mma kernels) when keys and queries share a 16-bit type; a plain fp32 loop in
// d order through a shared-memory logit tile otherwise (fp32 inputs, mixed types).
//
// Base 2. The GPU works with l'_j = l_j·log2(e) (one product by log2(e)/√D) and
// exp2f: Z = Σ 2^(l'_j − m') is the same sum, and exp2f is one MUFU.EX2 (2 ulp)
// where expf is a range reduction around it — the exponentials are the passes'
// arithmetic bottleneck next to the tensor cores (one per logit against D = 128
// multiply-adds of tensor work). The base change rounds the exponent a little
// differently from the CPU's exp(l − m) (by ≤ 9·u·max|l|; the tests' bound
// includes it). Tiles that every row of a chunk sees whole (all but a head's last
// one or two) skip the per-key causal test.
//
// Given normalisers (score/attention_mass.hpp: the engine's prefill computed each
// row's L = ln Z, natural log of the scaled logits): pass 1 and the fold are
// replaced by the base-2 form of L: m = L' = L·log2(e) (rounded once: the product in
// double, given_lse_base2), so pass 2 computes 2^(l·log2(e)/√D − L') = exp(l/√D − L).
// The wgmma pass 2 computes it itself while it stages its rows' L' (given_row_lse);
// before the scalar and mma.sync passes, attention_given_stats writes what the fold
// would have, (m, 1/Z) = (L', 1), one thread per row. A non-finite L becomes +∞ (1/Z = 1):
// every term of the row is 2^(−∞) = 0, the CPU's "contributes nothing". Rows past a
// chunk's queries are never read (the mma and wgmma passes substitute +∞ for them, the
// scalar pass loops over the chunk's queries only). The finish is unchanged; the
// workspace too (its partials are then unused). At W on the H100 the score takes 45 %
// less time, a contiguous compress 33 % (docs/results.md).
//
// Scratch (the scheme's two-phase workspace): partial (max, sum) per (row,
// split), the final (m, Z) per row, and the per-query-head mass [B, Hq, length].
// No allocation, no synchronisation, one stream; 64-bit offsets throughout.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>

#include "kvtrim/backend/cuda/attention_mass_base.cuh"
#include "kvtrim/backend/cuda/attention_mass_wgmma.cuh"  // Hopper's passes (sm_90a builds only)
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/mma.cuh"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/score/attention_mass.hpp"

namespace kvtrim::cuda_detail {

/// The shared-memory element type of the tile product: the 16-bit input type
/// itself when keys and queries share it (tensor cores), else fp32.
template <class KeyT, class QueryT>
inline constexpr bool mass_uses_mma =
    std::is_same_v<KeyT, QueryT> && (std::is_same_v<KeyT, __half> || std::is_same_v<KeyT, __nv_bfloat16>);
template <class KeyT, class QueryT>
using mass_smem_t = std::conditional_t<mass_uses_mma<KeyT, QueryT>, KeyT, float>;

/// Row stride (elements) of a staged Q or K tile: 16 bytes of padding for the
/// 16-bit tiles (rows 16 bytes apart modulo 128: the 8 rows an ldmatrix reads
/// fall in distinct banks), one float for fp32 tiles (the fp32 loop reads K down
/// a column: D + 1 avoids conflicts).
template <class SmemT, int HeadDim>
inline constexpr int mass_row_stride = sizeof(SmemT) == 2 ? HeadDim + 8 : HeadDim + 1;

/// Three staged tiles (pass 1: Q and two K buffers; pass 2: K and two Q buffers),
/// the logit tile, and per-row scalars (pass 2: two buffers of (m, 1/Z), a fold row).
template <class KeyT, class QueryT, int HeadDim>
constexpr std::size_t mass_shared_bytes() {
  using smem_t = mass_smem_t<KeyT, QueryT>;
  return 3 * std::size_t{mass_tile} * mass_row_stride<smem_t, HeadDim> * sizeof(smem_t) +
         std::size_t{mass_tile} * mass_logit_stride * sizeof(float) + 6 * mass_tile * sizeof(float);
}

/// The tensor-core passes: three staged 16-bit tiles and a 64-entry fold row.
template <class T, int HeadDim>
constexpr std::size_t mass_mma_shared_bytes() {
  return 3 * std::size_t{mass_tile} * mass_row_stride<T, HeadDim> * sizeof(T) + mass_tile * sizeof(float2);
}

/// Stages rows [row0, row0 + 64) ∩ [0, rows) of a [rows, D] matrix (row stride,
/// channel stride) into shared memory as SmemT; rows past the end are zero.
template <int HeadDim, class SmemT, class T>
__device__ __forceinline__ void stage_tile(SmemT* tile, const T* base, std::int64_t row_stride,
                                           std::int64_t channel_stride, std::int64_t row0, std::int64_t rows,
                                           bool vector_loads) {
  constexpr int stride = mass_row_stride<SmemT, HeadDim>;
  if (vector_loads) {
    constexpr int chunks = HeadDim / 8;
    for (int i = threadIdx.x; i < mass_tile * chunks; i += mass_threads) {
      const int r = i / chunks, c = (i % chunks) * 8;
      SmemT* out = tile + r * stride + c;
      if (row0 + r < rows) {
        const packed8<T> loaded = load_packed8(base + (row0 + r) * row_stride + c);
        if constexpr (std::is_same_v<SmemT, T> && sizeof(T) == 2) {
          *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(loaded.elements);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) out[e] = static_cast<SmemT>(loaded[e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = from_float<SmemT>(0.0f);
      }
    }
  } else {
    for (int i = threadIdx.x; i < mass_tile * HeadDim; i += mass_threads) {
      const int r = i / HeadDim, c = i % HeadDim;
      const T value = row0 + r < rows ? base[(row0 + r) * row_stride + c * channel_stride] : from_float<T>(0.0f);
      if constexpr (std::is_same_v<SmemT, T>)
        tile[r * stride + c] = value;
      else
        tile[r * stride + c] = to_float(value);
    }
  }
}

/// stage_tile, asynchronously where it can be (16-bit tiles of the input type,
/// vector-aligned rows): the copies complete at mass_async_wait; other tiles are
/// staged synchronously here.
template <int HeadDim, class SmemT, class T>
__device__ __forceinline__ void stage_tile_async(SmemT* tile, const T* base, std::int64_t row_stride,
                                                 std::int64_t channel_stride, std::int64_t row0, std::int64_t rows,
                                                 bool vector_loads) {
  if constexpr (std::is_same_v<SmemT, T> && sizeof(T) == 2) {
    if (vector_loads) {
      constexpr int stride = mass_row_stride<SmemT, HeadDim>;
      constexpr int chunks = HeadDim / 8;
      for (int i = threadIdx.x; i < mass_tile * chunks; i += mass_threads) {
        const int r = i / chunks, c = (i % chunks) * 8;
        const bool valid = row0 + r < rows;
        mass_async_copy16(tile + r * stride + c, valid ? base + (row0 + r) * row_stride + c : base, valid);
      }
      return;
    }
  }
  stage_tile<HeadDim>(tile, base, row_stride, channel_stride, row0, rows, vector_loads);
}

/// logits[r][c] = Σ_d q[r][d] · k[c][d] for a staged 64 × 64 fp32 tile (the
/// path for fp32 and mixed-type inputs; 16-bit inputs take the tensor-core
/// passes below): thread → key column c = tid % 64 and rows r ≡ tid / 64
/// (mod 2), d in order, as the CPU's scalar loop.
template <int HeadDim, class SmemT, bool HoldQueries>
struct mass_product {
  static constexpr int stride = mass_row_stride<SmemT, HeadDim>;
  __device__ __forceinline__ void hold(const SmemT*) {}
  __device__ __forceinline__ void run(const SmemT* q_tile, const SmemT* k_tile, float* logits) const {
    const int c = threadIdx.x % mass_tile;
    for (int r = threadIdx.x / mass_tile; r < mass_tile; r += mass_threads / mass_tile) {
      float dot = 0.0f;
      for (int d = 0; d < HeadDim; ++d) dot += q_tile[r * stride + d] * k_tile[c * stride + d];
      logits[r * mass_logit_stride + c] = dot;
    }
  }
};

/// Pass 1: grid.x = units · row chunks (chunk fastest, so the blocks sharing a
/// K split run together and share it through L2), grid.y = key splits. Each
/// thread owns half of one row's 64 keys per tile and keeps an online
/// (max, Σexp) for it; the two halves fold at the end. K tiles are double
/// buffered: tile i + 1 loads (cp.async) while tile i is multiplied.
template <class KeyT, class QueryT, int HeadDim>
__global__ void __launch_bounds__(mass_threads)
    attention_row_stats(const __grid_constant__ attention_mass_parameters<KeyT, QueryT> p) {
  using smem_t = mass_smem_t<KeyT, QueryT>;
  constexpr int stride = mass_row_stride<smem_t, HeadDim>;
  extern __shared__ __align__(128) unsigned char mass_shared[];
  smem_t* q_tile = reinterpret_cast<smem_t*>(mass_shared);
  smem_t* k_tiles = q_tile + mass_tile * stride;  // two buffers
  float* logits = reinterpret_cast<float*>(k_tiles + 2 * mass_tile * stride);
  float* fold = logits + mass_tile * mass_logit_stride;  // [2][64]: the upper halves' (max, sum)

  const std::int64_t row_chunks = p.group * p.chunks_per_head;
  const std::int64_t unit = blockIdx.x / row_chunks, chunk = blockIdx.x % row_chunks;
  const std::int64_t b = unit / p.kv_heads, h = unit % p.kv_heads;
  const row_chunk rows = chunk_rows(p, chunk);
  const std::int64_t split = blockIdx.y;

  const QueryT* query_base =
      p.queries + b * p.query_batch_stride + (h * p.group + rows.g) * p.query_head_stride;
  stage_tile<HeadDim>(q_tile, query_base, p.query_token_stride, p.query_channel_stride, rows.t0,
                      rows.t0 + rows.count, p.vector_loads);
  const KeyT* key_base = p.keys + b * p.key_batch_stride + h * p.key_head_stride;
  mass_product<HeadDim, smem_t, true> product;
  __syncthreads();
  product.hold(q_tile);

  const int r = threadIdx.x % mass_tile, half = threadIdx.x / mass_tile;
  const std::int64_t position = p.tokens - p.observed + rows.t0 + r;  // this row sees keys ≤ position
  float running_max = -INFINITY, running_sum = 0.0f;
  const std::int64_t visible = mass_min(p.tokens, rows.last_position + 1);
  const std::int64_t tile_begin = split * p.split_tiles;
  const std::int64_t tile_end = mass_min(mass_ceil_div(visible, mass_tile), (split + 1) * p.split_tiles);
  if (tile_begin < tile_end) {
    stage_tile_async<HeadDim>(k_tiles, key_base, p.key_token_stride, p.key_channel_stride, tile_begin * mass_tile,
                              p.tokens, p.vector_loads);
    mass_async_commit();
  }
  for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const std::int64_t j0 = tile * mass_tile;
    const smem_t* k_tile = k_tiles + ((tile - tile_begin) & 1) * mass_tile * stride;
    if (tile + 1 < tile_end) {
      // Into the other buffer: its last reader (tile − 1's product) finished before tile − 1's second barrier.
      stage_tile_async<HeadDim>(k_tiles + ((tile + 1 - tile_begin) & 1) * mass_tile * stride, key_base,
                                p.key_token_stride, p.key_channel_stride, j0 + mass_tile, p.tokens, p.vector_loads);
      mass_async_commit();
      mass_async_wait<1>();
    } else {
      mass_async_wait<0>();
    }
    __syncthreads();  // this tile is staged; the previous tile's logits are consumed
    product.run(q_tile, k_tile, logits);
    __syncthreads();
    if (r < rows.count) {
      // Columns rotated by the row (see mass_logit_stride): conflict-free reads.
      float values[32];
      float tile_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int c = half * 32 + (i + r) % 32;
        const float l = j0 + c <= position ? logits[r * mass_logit_stride + c] * p.log2_scale : -INFINITY;
        values[i] = l;
        tile_max = fmaxf(tile_max, l);
      }
      if (tile_max > -INFINITY) {
        const float new_max = fmaxf(running_max, tile_max);
        float sum = running_sum * exp2f(running_max - new_max);
#pragma unroll
        for (int i = 0; i < 32; ++i) sum += exp2f(values[i] - new_max);
        running_max = new_max, running_sum = sum;
      }
    }
  }
  if (half == 1) fold[r] = running_max, fold[mass_tile + r] = running_sum;
  __syncthreads();
  if (half == 0 && r < rows.count) {
    const float other_max = fold[r], other_sum = fold[mass_tile + r];
    const float m = fmaxf(running_max, other_max);
    const float sum = (running_max > -INFINITY ? running_sum * exp2f(running_max - m) : 0.0f) +
                      (other_max > -INFINITY ? other_sum * exp2f(other_max - m) : 0.0f);
    const std::int64_t row = (unit * row_chunks + chunk) * mass_tile + r;
    p.partial[row * p.splits + split] = make_float2(m, sum);
  }
}

/// Folds pass 1's splits into (m, Z) per row: one thread per row.
template <class KeyT, class QueryT>
__global__ void attention_fold_splits(const __grid_constant__ attention_mass_parameters<KeyT, QueryT> p) {
  const std::int64_t rows = p.batch * p.kv_heads * p.group * p.chunks_per_head * mass_tile;
  for (std::int64_t row = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; row < rows;
       row += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t in_chunk = row % mass_tile;
    const row_chunk chunk = chunk_rows(p, (row / mass_tile) % (p.group * p.chunks_per_head));
    if (in_chunk >= chunk.count) continue;
    // Every block of pass 1 writes every row of its chunk (−∞, 0 where it saw no key).
    float m = -INFINITY;
    for (std::int64_t s = 0; s < p.splits; ++s) m = fmaxf(m, p.partial[row * p.splits + s].x);
    float z = 0.0f;
    for (std::int64_t s = 0; s < p.splits; ++s) {
      const float2 part = p.partial[row * p.splits + s];
      if (part.x > -INFINITY) z += part.y * exp2f(part.x - m);
    }
    p.stats[row] = make_float2(m, 1.0f / z);
    if (p.lse != nullptr) p.lse[row] = m + log2f(z);
  }
}

/// The caller's normalisers (p.given) as the fold's (m, 1/Z) = (L', 1) rows, for the scalar
/// and mma.sync column passes (the wgmma pass 2 reads p.given itself).
template <class KeyT, class QueryT>
__global__ void attention_given_stats(const __grid_constant__ attention_mass_parameters<KeyT, QueryT> p) {
  const std::int64_t rows = p.batch * p.kv_heads * p.group * p.chunks_per_head * mass_tile;
  for (std::int64_t row = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; row < rows;
       row += std::int64_t{gridDim.x} * blockDim.x) {
    if (!place_of_mass_row(p, row).observed) continue;  // as the fold: rows without a query are never read
    p.stats[row] = make_float2(given_row_lse(p, row), 1.0f);
  }
}

/// Pass 2: grid.x = units · key tiles. The block stages its K tile once, then
/// for each query head of the group and each of its row chunks that can see the
/// tile (causal: a suffix of the chunks, the same for every query head), adds
/// exp(l − m)·(1/Z) down each column; thread → column c = tid % 64 and half of
/// the chunk's rows, the halves folded before each query head's write. Q chunks
/// are double buffered (cp.async), with their (m, 1/Z).
template <class KeyT, class QueryT, int HeadDim>
__global__ void __launch_bounds__(mass_threads)
    attention_column_mass(const __grid_constant__ attention_mass_parameters<KeyT, QueryT> p) {
  using smem_t = mass_smem_t<KeyT, QueryT>;
  constexpr int stride = mass_row_stride<smem_t, HeadDim>;
  extern __shared__ __align__(128) unsigned char mass_shared[];
  smem_t* k_tile = reinterpret_cast<smem_t*>(mass_shared);
  smem_t* q_tiles = k_tile + mass_tile * stride;  // two buffers
  float* logits = reinterpret_cast<float*>(q_tiles + 2 * mass_tile * stride);
  float* row_max = logits + mass_tile * mass_logit_stride;  // [2][64]
  float* row_inverse = row_max + 2 * mass_tile;              // [2][64]: 1/Z
  float* fold = row_inverse + 2 * mass_tile;                 // [64]

  const std::int64_t key_tiles = mass_ceil_div(p.length, mass_tile);
  const std::int64_t unit = blockIdx.x / key_tiles, tile = blockIdx.x % key_tiles;
  const std::int64_t b = unit / p.kv_heads, h = unit % p.kv_heads;
  const std::int64_t j0 = tile * mass_tile;
  const std::int64_t row_chunks = p.group * p.chunks_per_head;
  const std::int64_t first_chunk = first_chunk_seeing(p, j0);
  const std::int64_t per_head = p.chunks_per_head - first_chunk, items = p.group * per_head;
  const QueryT* query_base = p.queries + b * p.query_batch_stride + h * p.group * p.query_head_stride;
  const auto stage_item = [&](std::int64_t item) {
    const std::int64_t g = item / per_head, chunk = g * p.chunks_per_head + first_chunk + item % per_head;
    const row_chunk rows = chunk_rows(p, chunk);
    stage_tile_async<HeadDim>(q_tiles + (item & 1) * mass_tile * stride, query_base + g * p.query_head_stride,
                              p.query_token_stride, p.query_channel_stride, rows.t0, rows.t0 + rows.count,
                              p.vector_loads);
    mass_async_commit();
  };
  const auto load_stats = [&](std::int64_t item) {  // threads < 64: (m, 1/Z) of the item's rows
    if (threadIdx.x < mass_tile) {
      const std::int64_t g = item / per_head, chunk = g * p.chunks_per_head + first_chunk + item % per_head;
      const float2 s = threadIdx.x < chunk_rows(p, chunk).count
                           ? p.stats[(unit * row_chunks + chunk) * mass_tile + threadIdx.x]
                           : make_float2(0.0f, 1.0f);
      row_max[(item & 1) * mass_tile + threadIdx.x] = s.x;
      row_inverse[(item & 1) * mass_tile + threadIdx.x] = s.y;
    }
  };

  stage_tile_async<HeadDim>(k_tile, p.keys + b * p.key_batch_stride + h * p.key_head_stride, p.key_token_stride,
                            p.key_channel_stride, j0, p.tokens, p.vector_loads);
  mass_async_commit();
  stage_item(0);
  load_stats(0);
  const int c = threadIdx.x % mass_tile, half = threadIdx.x / mass_tile;
  const std::int64_t j = j0 + c;
  float column = 0.0f;
  mass_product<HeadDim, smem_t, false> product;
  for (std::int64_t item = 0; item < items; ++item) {
    const std::int64_t g = item / per_head;
    const row_chunk rows = chunk_rows(p, g * p.chunks_per_head + first_chunk + item % per_head);
    if (item + 1 < items) {
      // Into the other buffer: its last reader (item − 1's product) finished before item − 1's second barrier.
      stage_item(item + 1);
      mass_async_wait<1>();
    } else {
      mass_async_wait<0>();
    }
    __syncthreads();  // K and this item's Q are staged; item − 1's logits and stats are consumed
    if (item + 1 < items) load_stats(item + 1);  // read after the next item's first barrier
    if (item == 0) product.hold(k_tile);
    product.run(q_tiles + (item & 1) * mass_tile * stride, k_tile, logits);
    __syncthreads();
    const float* maxima = row_max + (item & 1) * mass_tile;
    const float* inverses = row_inverse + (item & 1) * mass_tile;
    for (int r = half; r < rows.count; r += 2) {
      const std::int64_t position = p.tokens - p.observed + rows.t0 + r;
      if (j <= position) column += exp2f(logits[r * mass_logit_stride + c] * p.log2_scale - maxima[r]) * inverses[r];
    }
    if (item + 1 == items || (item + 1) / per_head != g) {  // the query head's last item: fold and write
      __syncthreads();
      if (half == 1) fold[c] = column;
      __syncthreads();
      if (half == 0 && j < p.length)
        p.mass[((b * p.kv_heads + h) * p.group + g) * p.length + j] = column + fold[c];
      column = 0.0f;
    }
  }
}

// ---- The tensor-core passes (fp16/bf16 keys and queries of one type) --------
// The same two passes with mma.sync m16n8k16 (mma.cuh) and the logits kept in
// registers: no fp32 logit tile goes through shared memory, one barrier per tile.
// The 64 × 64 tile product is split 2 × 2 over the 4 warps (32 rows × 32 keys
// each); a thread holds, per tile, the logits of 4 rows (2 row fragments × rows
// g, g + 8) × 8 keys (4 key fragments × columns 2t, 2t + 1). The operand fixed
// for the whole block (pass 1: the Q chunk; pass 2: the K tile) is held in
// registers for head dims ≤ 128; the other is read with ldmatrix once per warp.
// Pass 1 keeps an online (max, Σexp) per row and thread, folded over the 4
// threads of a row (shuffles) and the 2 warps of a row (shared memory) at the
// end; pass 2 keeps per-thread column sums over its rows, folded over the 8 row
// groups of a warp (shuffles) and the 2 warps of a column (shared memory) when a
// query head's last chunk is done. Same math and order of operations per
// element as the fp32 path (exp2f, l·log2(e)/√D − m, ·(1/Z)); sums run in another order.
template <class T, int HeadDim>
struct mass_mma {
  static constexpr int stride = mass_row_stride<T, HeadDim>;
  static constexpr int steps = HeadDim / 16;
  static constexpr bool resident = HeadDim <= 128;  // 64 registers of held fragments at D = 128

  __device__ __forceinline__ static int lane() { return threadIdx.x % 32; }
  __device__ __forceinline__ static int warp_rows() { return (threadIdx.x / 32) / 2 * 32; }
  __device__ __forceinline__ static int warp_keys() { return (threadIdx.x / 32) % 2 * 32; }
  /// Row (within the 64-row chunk) of accumulator element (row fragment i, half h).
  __device__ __forceinline__ static int row(int i, int h) { return warp_rows() + 16 * i + lane() / 4 + 8 * h; }
  /// Key (within the 64-key tile) of accumulator element (key fragment n, e).
  __device__ __forceinline__ static int key(int n, int e) { return warp_keys() + 8 * n + (lane() % 4) * 2 + e; }

  /// A fragment: rows [row0, row0 + 16) × channels [16k, 16k + 16) of a staged tile.
  __device__ __forceinline__ static void load_rows(unsigned (&a)[4], const T* tile, int row0, int k) {
    load_matrix_x4(a, tile + (row0 + lane() % 16) * stride + 16 * k + (lane() / 16) * 8);
  }
  /// B fragments of keys [key0, key0 + 16) (two key fragments: {b[0], b[1]}, {b[2], b[3]}).
  __device__ __forceinline__ static void load_keys(unsigned (&b)[4], const T* tile, int key0, int k) {
    load_matrix_x4(b, tile + (key0 + lane() % 8 + (lane() / 16) * 8) * stride + 16 * k + ((lane() / 8) % 2) * 8);
  }

  /// logits[i][n][·] = Q[rows of row fragment i] · K[keys of key fragment n]ᵀ.
  /// `held_rows` / `held_keys`: the resident operand (the other comes from its tile).
  template <bool HoldRows, class Held>
  __device__ __forceinline__ static void product(const Held& held, const T* q_tile, const T* k_tile,
                                                 float (&logits)[2][4][4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) logits[i][n][e] = 0.0f;
#pragma unroll
    for (int k = 0; k < steps; ++k) {
      unsigned a[2][4], b[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if constexpr (HoldRows && resident) {
#pragma unroll
          for (int x = 0; x < 4; ++x) a[i][x] = held[i][k][x];
        } else {
          load_rows(a[i], q_tile, warp_rows() + 16 * i, k);
        }
        if constexpr (!HoldRows && resident) {
#pragma unroll
          for (int x = 0; x < 4; ++x) b[i][x] = held[i][k][x];
        } else {
          load_keys(b[i], k_tile, warp_keys() + 16 * i, k);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int n = 0; n < 4; ++n) mma_16x8x16<T>(logits[i][n], a[i], b[n / 2][(n % 2) * 2], b[n / 2][(n % 2) * 2 + 1]);
    }
  }
};

/// cp.async staging of 64-row tiles of one [rows, D] 16-bit matrix whose rows
/// are 16-byte aligned with channel stride 1 (p.vector_loads). A thread's rows
/// (r0, r0 + rows_per_pass, …) and 16-byte channel chunk are the same for every
/// tile, so their offsets are computed once: a tile costs a pointer step and one
/// copy per owned row (stage_tile_async recomputes 64-bit addresses per copy).
template <class T, int HeadDim>
struct mass_tile_loader {
  static constexpr int chunks = HeadDim / 8;  // 16-byte chunks per row
  static constexpr int rows_per_pass = mass_threads / chunks;
  static constexpr int passes = mass_tile / rows_per_pass;
  static constexpr int stride = mass_row_stride<T, HeadDim>;
  static_assert(mass_threads % chunks == 0 && mass_tile % rows_per_pass == 0);

  const T* matrix;      // row 0, channel 0
  const T* thread_row;  // row r0, this thread's chunk
  std::int64_t row_stride;
  int r0, shared_offset;

  __device__ __forceinline__ mass_tile_loader(const T* base, std::int64_t row_stride_)
      : matrix(base), row_stride(row_stride_) {
    r0 = static_cast<int>(threadIdx.x) / chunks;
    const int c = (static_cast<int>(threadIdx.x) % chunks) * 8;
    thread_row = base + r0 * row_stride + c;
    shared_offset = r0 * stride + c;
  }
  /// Rows [row0, row0 + 64) ∩ [0, rows) of the matrix at `offset` elements from
  /// `base` into `tile`; rows past the end are zero-filled (nothing is read).
  __device__ __forceinline__ void load(T* tile, std::int64_t offset, std::int64_t row0, std::int64_t rows) const {
    const T* source = thread_row + offset + row0 * row_stride;
    const std::int64_t step = rows_per_pass * row_stride;
    T* target = tile + shared_offset;
    if (row0 + mass_tile <= rows) {
#pragma unroll
      for (int k = 0; k < passes; ++k) mass_async_copy16(target + k * rows_per_pass * stride, source + k * step, true);
    } else {
#pragma unroll
      for (int k = 0; k < passes; ++k) {
        const bool valid = row0 + r0 + k * rows_per_pass < rows;
        mass_async_copy16(target + k * rows_per_pass * stride, valid ? source + k * step : matrix, valid);
      }
    }
  }
};

/// Pass 1 on tensor cores (grid as attention_row_stats). Per tile and row the
/// running (max, Σ) works on the raw logits l (the scale 1/√D·log2(e) is
/// positive, so the max commutes with it): 2^(l·c − m·c) is one fma and one
/// MUFU.EX2 per logit; m·c is rounded once per tile, exactly as pass 2 rounds
/// the final m·c it subtracts.
template <class T, int HeadDim>
__global__ void __launch_bounds__(mass_threads, 3)
    attention_row_stats_mma(const __grid_constant__ attention_mass_parameters<T, T> p) {
  using tile = mass_mma<T, HeadDim>;
  constexpr int stride = tile::stride;
  extern __shared__ __align__(128) unsigned char mass_shared[];
  T* q_tile = reinterpret_cast<T*>(mass_shared);
  T* k_tiles = q_tile + mass_tile * stride;  // two buffers
  float2* fold = reinterpret_cast<float2*>(k_tiles + 2 * mass_tile * stride);  // [64]: the right key half's stats

  // Grid indices fit in 32 bits (the host checks the grid): no 64-bit division.
  const unsigned row_chunks = static_cast<unsigned>(p.group * p.chunks_per_head);
  const unsigned unit = blockIdx.x / row_chunks, chunk = blockIdx.x % row_chunks;
  const std::int64_t b = unit / static_cast<unsigned>(p.kv_heads), h = unit % static_cast<unsigned>(p.kv_heads);
  const row_chunk rows = chunk_rows(p, chunk);
  const std::int64_t split = blockIdx.y;

  const T* query_base = p.queries + b * p.query_batch_stride + (h * p.group + rows.g) * p.query_head_stride;
  stage_tile<HeadDim>(q_tile, query_base, p.query_token_stride, p.query_channel_stride, rows.t0,
                      rows.t0 + rows.count, p.vector_loads);
  const T* key_base = p.keys + b * p.key_batch_stride + h * p.key_head_stride;
  const mass_tile_loader<T, HeadDim> keys(key_base, p.key_token_stride);
  const auto stage_keys = [&](T* buffer, std::int64_t row0) {
    if (p.vector_loads)
      keys.load(buffer, 0, row0, p.tokens);
    else
      stage_tile<HeadDim>(buffer, key_base, p.key_token_stride, p.key_channel_stride, row0, p.tokens, false);
    mass_async_commit();
  };
  const std::int64_t visible = mass_min(p.tokens, rows.last_position + 1);
  const std::int64_t tile_begin = split * p.split_tiles;
  const std::int64_t tile_end = mass_min(mass_ceil_div(visible, mass_tile), (split + 1) * p.split_tiles);
  if (tile_begin < tile_end) stage_keys(k_tiles, tile_begin * mass_tile);
  __syncthreads();  // the Q chunk is staged
  unsigned held[tile::resident ? 2 : 1][tile::resident ? tile::steps : 1][4];
  if constexpr (tile::resident) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int k = 0; k < tile::steps; ++k) tile::load_rows(held[i][k], q_tile, tile::warp_rows() + 16 * i, k);
  }
  const float c = p.log2_scale;
  const std::int64_t first_position = p.tokens - p.observed + rows.t0;  // the chunk's first row's
  // Per row of this thread: the raw running max, and Σ 2^(l·c − max·c).
  float raw_max[2][2], sum[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) raw_max[i][hh] = -INFINITY, sum[i][hh] = 0.0f;

  for (std::int64_t t = tile_begin; t < tile_end; ++t) {
    mass_async_wait<0>();
    __syncthreads();  // tile t is staged; every warp is done with tile t − 1 (the other buffer)
    if (t + 1 < tile_end) stage_keys(k_tiles + ((t + 1 - tile_begin) & 1) * mass_tile * stride, (t + 1) * mass_tile);
    float logits[2][4][4];
    tile::template product<true>(held, q_tile, k_tiles + ((t - tile_begin) & 1) * mass_tile * stride, logits);
    const std::int64_t j0 = t * mass_tile;
    // Every row of the chunk sees the whole tile (all tiles but the last one or
    // two): no per-key causal test.
    if (j0 + mass_tile - 1 > first_position) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const std::int64_t position = first_position + tile::row(i, hh);
#pragma unroll
          for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (j0 + tile::key(n, e) > position) logits[i][n][2 * hh + e] = -INFINITY;
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        // A tree max and two interleaved partial sums: short dependency chains
        // (4 rows per thread are too few to hide MUFU and FADD latencies).
        float pair_max[4];
#pragma unroll
        for (int n = 0; n < 4; ++n) pair_max[n] = fmaxf(logits[i][n][2 * hh], logits[i][n][2 * hh + 1]);
        const float tile_max =
            fmaxf(raw_max[i][hh], fmaxf(fmaxf(pair_max[0], pair_max[1]), fmaxf(pair_max[2], pair_max[3])));
        if (tile_max == -INFINITY) continue;  // nothing visible yet
        // __fmul_rn / __fsub_rn: never contracted into an fma (nvcc contracts a*b − c
        // by default, which would bring back the unrounded old shift below).
        const float shift = __fmul_rn(tile_max, c);
        // Rescale only when the max moved (the first visible tile: sum = 0 and
        // 2^(−∞) = 0, no test needed). The factor is 2^(fl(m_old·c) − fl(m_new·c)):
        // the running sum's terms were taken against the rounded old shift, so the
        // rounded shifts are what must cancel. Its one rounding is ≤ u·(m_new − m_old)·c,
        // and those differences telescope over a row (≤ u·(max − first max)·c in all),
        // where 2^(m_old·c − fl(m_new·c)) would add u·|m_old·c| at every rescale.
        float s = tile_max == raw_max[i][hh] ? sum[i][hh]
                                             : sum[i][hh] * mass_exp2(__fsub_rn(__fmul_rn(raw_max[i][hh], c), shift));
        float even = 0.0f, odd = 0.0f;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          even += mass_exp2(fmaf(logits[i][n][2 * hh], c, -shift));
          odd += mass_exp2(fmaf(logits[i][n][2 * hh + 1], c, -shift));
        }
        raw_max[i][hh] = tile_max, sum[i][hh] = s + (even + odd);
      }
  }
  // (m·c, Σ) per row, folded over the 4 threads of a row (lanes 4g … 4g + 3),
  // then the two key halves.
  float2 stats[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      stats[i][hh] = make_float2(__fmul_rn(raw_max[i][hh], c), sum[i][hh]);
#pragma unroll
      for (int offset = 1; offset <= 2; offset *= 2) {
        const float2 other = make_float2(__shfl_xor_sync(0xffffffffu, stats[i][hh].x, offset),
                                         __shfl_xor_sync(0xffffffffu, stats[i][hh].y, offset));
        stats[i][hh] = mass_merge_stats(stats[i][hh], other);
      }
    }
  const bool writer = tile::lane() % 4 == 0;
  if (tile::warp_keys() != 0 && writer)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) fold[tile::row(i, hh)] = stats[i][hh];
  __syncthreads();
  if (tile::warp_keys() == 0 && writer)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = tile::row(i, hh);
        if (r < rows.count) {
          const std::int64_t row = (std::int64_t{unit} * row_chunks + chunk) * mass_tile + r;
          p.partial[row * p.splits + split] = mass_merge_stats(stats[i][hh], fold[r]);
        }
      }
}

/// Pass 2 on tensor cores (grid as attention_column_mass). The block's items are
/// (query head g, row chunk c ≥ first) in g-major order, walked with counters
/// (no 64-bit division per item).
template <class T, int HeadDim>
__global__ void __launch_bounds__(mass_threads, 3)
    attention_column_mass_mma(const __grid_constant__ attention_mass_parameters<T, T> p) {
  using tile = mass_mma<T, HeadDim>;
  constexpr int stride = tile::stride;
  extern __shared__ __align__(128) unsigned char mass_shared[];
  T* k_tile = reinterpret_cast<T*>(mass_shared);
  T* q_tiles = k_tile + mass_tile * stride;  // two buffers
  float* fold = reinterpret_cast<float*>(q_tiles + 2 * mass_tile * stride);  // [64]: the lower rows' column sums

  // Grid indices fit in 32 bits (the host checks the grid): no 64-bit division.
  const unsigned key_tiles = static_cast<unsigned>(mass_ceil_div(p.length, mass_tile));
  const unsigned unit = blockIdx.x / key_tiles, key_tile = blockIdx.x % key_tiles;
  const std::int64_t b = unit / static_cast<unsigned>(p.kv_heads), h = unit % static_cast<unsigned>(p.kv_heads);
  const std::int64_t j0 = std::int64_t{key_tile} * mass_tile;
  const std::int64_t row_chunks = p.group * p.chunks_per_head;
  const std::int64_t first_chunk = first_chunk_seeing(p, j0);
  const std::int64_t items = p.group * (p.chunks_per_head - first_chunk);
  const T* query_base = p.queries + b * p.query_batch_stride + h * p.group * p.query_head_stride;
  const mass_tile_loader<T, HeadDim> queries(query_base, p.query_token_stride);
  // Rows of chunk c of any query head (the same for every head): first observed query and count.
  struct chunk_span {
    std::int64_t t0, count;
  };
  const auto rows_of = [&](std::int64_t c) {
    const std::int64_t t0 = p.first + c * mass_tile;
    return chunk_span{t0, mass_min(std::int64_t{mass_tile}, p.observed - t0)};
  };
  const auto stage_item = [&](std::int64_t item, std::int64_t g, std::int64_t c) {
    const auto [t0, count] = rows_of(c);
    T* buffer = q_tiles + (item & 1) * mass_tile * stride;
    if (p.vector_loads)
      queries.load(buffer, g * p.query_head_stride, t0, t0 + count);
    else
      stage_tile<HeadDim>(buffer, query_base + g * p.query_head_stride, p.query_token_stride, p.query_channel_stride,
                          t0, t0 + count, false);
    mass_async_commit();
  };

  {
    const T* key_base = p.keys + b * p.key_batch_stride + h * p.key_head_stride;
    if (p.vector_loads)
      mass_tile_loader<T, HeadDim>(key_base, p.key_token_stride).load(k_tile, 0, j0, p.tokens);
    else
      stage_tile<HeadDim>(k_tile, key_base, p.key_token_stride, p.key_channel_stride, j0, p.tokens, false);
    mass_async_commit();
  }
  std::int64_t g = 0, c = first_chunk;            // the current item
  stage_item(0, g, c);
  // (m·c, 1/Z) of this thread's 4 rows of an item, loaded one item ahead (their
  // latency hides behind the current item's product); rows past the chunk get
  // m = +∞, so 2^(l·c − m) = 0 and they add nothing without a test.
  const auto load_stats = [&](std::int64_t g_, std::int64_t c_, float2 (&out)[2][2]) {
    const std::int64_t count_ = rows_of(c_).count;
    const float2* row_stats = p.stats + (unit * row_chunks + g_ * p.chunks_per_head + c_) * mass_tile;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = tile::row(i, hh);
        out[i][hh] = r < count_ ? row_stats[r] : make_float2(INFINITY, 1.0f);
      }
  };
  float2 next_stats[2][2];
  load_stats(g, c, next_stats);
  unsigned held[tile::resident ? 2 : 1][tile::resident ? tile::steps : 1][4];
  float column[4][2] = {};
  const float scale = p.log2_scale;
  for (std::int64_t item = 0; item < items; ++item) {
    mass_async_wait<0>();
    __syncthreads();  // K and this item's Q are staged; every warp is done with item − 1 (the other buffer)
    if (tile::resident && item == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int k = 0; k < tile::steps; ++k) tile::load_keys(held[i][k], k_tile, tile::warp_keys() + 16 * i, k);
    }
    const bool head_ends = c + 1 == p.chunks_per_head;  // this item is its query head's last chunk
    const std::int64_t next_g = head_ends ? g + 1 : g, next_c = head_ends ? first_chunk : c + 1;
    if (item + 1 < items) stage_item(item + 1, next_g, next_c);
    const auto [t0, count] = rows_of(c);
    float row_max[2][2], row_inverse[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) row_max[i][hh] = next_stats[i][hh].x, row_inverse[i][hh] = next_stats[i][hh].y;
    if (item + 1 < items) load_stats(next_g, next_c, next_stats);
    float logits[2][4][4];
    tile::template product<false>(held, q_tiles + (item & 1) * mass_tile * stride, k_tile, logits);
    // Every row of the chunk sees the whole key tile (all but the last one or
    // two tiles of a head): no per-key causal test. l·c − m in one fma.
    const std::int64_t first_position = p.tokens - p.observed + t0;
    if (count < mass_tile || j0 + mass_tile - 1 > first_position) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = tile::row(i, hh);
          const std::int64_t position = r < count ? first_position + r : -1;
#pragma unroll
          for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (j0 + tile::key(n, e) > position) logits[i][n][2 * hh + e] = -INFINITY;
        }
    }
    // Per column, the 4 rows' terms as two independent fma chains, then one add.
    const auto term = [&](int i, int hh, int n, int e) {
      return mass_exp2(fmaf(logits[i][n][2 * hh + e], scale, -row_max[i][hh]));
    };
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float upper = fmaf(term(0, 1, n, e), row_inverse[0][1], term(0, 0, n, e) * row_inverse[0][0]);
        const float lower = fmaf(term(1, 1, n, e), row_inverse[1][1], term(1, 0, n, e) * row_inverse[1][0]);
        column[n][e] += upper + lower;
      }
    if (head_ends) {  // fold this query head's column sums and write them
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = column[n][e];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          column[n][e] = v;
        }
      // fold's last readers (the previous head's) passed this item's first barrier.
      if (tile::warp_rows() != 0 && tile::lane() < 4)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) fold[tile::key(n, e)] = column[n][e];
      __syncthreads();
      if (tile::warp_rows() == 0 && tile::lane() < 4)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const std::int64_t j = j0 + tile::key(n, e);
            if (j < p.length)
              p.mass[((b * p.kv_heads + h) * p.group + g) * p.length + j] = column[n][e] + fold[tile::key(n, e)];
          }
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) column[n][e] = 0.0f;
      ++g, c = first_chunk;
    } else {
      ++c;
    }
  }
}

/// What the finish does per query head before the group reduction.
enum class mass_finish_kind { snapkv, h2o };

struct mass_finish_parameters {
  const float* mass;  // [B, Hq, length]
  float* scores;      // dense [B, H, T]
  std::int64_t batch, kv_heads, group, tokens, length;
  mass_finish_kind kind;
  // snapkv: mass / window (when mean) then pooled over `kernel` neighbours of [0, length)
  float window_divisor;  // 1 for window_reduction::sum
  std::int64_t kernel;
  score::pooling pooling;
  // h2o: mass / (T − j) when observed
  bool observed_normalisation;
  score::group_reduction reduction;
  std::int64_t protected_from;  // tokens ≥ this score +∞ (SnapKV's window, H2O's recent tokens)
};

/// Tokens a block of attention_mass_finish scores: 256 threads, four tokens each.
inline constexpr std::int64_t finish_tile = 1024;
/// Query heads' rows a block stages at once, and the values of each it holds (5 KB):
/// its tile and the pooling halo either side, clipped to the row — every tile for
/// half-widths ≤ 128 (kvpress's default kernel is 5, Ada-KV's 7). A tile whose values
/// exceed 1280 reads the rows from global memory instead, the same values in the same
/// order; so does H2O (no pooling: one read per value).
inline constexpr int finish_stage_rows = 4;
inline constexpr int finish_stage_width = 1280;

/// SnapKV's pooling half-widths with a compiled interior path (kernels 1, 3, 5, 7, 9:
/// kvpress's default 5, Ada-KV's 7); wider kernels, H2O and the tiles at a row's ends
/// take the general path.
inline constexpr int finish_compiled_half_widths = 4;
/// The interior path's staged row: the tile at [pad, pad + 1024) and ≤ pad values of halo
/// either side, so each thread's 4 tokens and their windows are three aligned float4 reads.
inline constexpr int finish_interior_pad = 4;

/// Whether 1/d is exact and normal: d a positive power of two in [2⁻¹²⁶, 2¹²⁶]. Then x · (1/d)
/// and x / d are the same real number rounded once, the same float for every x (±0, ±∞,
/// NaN, subnormal results included): the finish multiplies instead of dividing (a window
/// of 64 or 32, a group of 4 or 8, kvpress's and Ada-KV's defaults). Conservative at the top:
/// 2¹²⁷ would do too.
__host__ __device__ constexpr bool exact_reciprocal_bits(std::uint32_t bits) {
  return (bits & 0x007fffffu) == 0 && bits >= 0x00800000u && bits <= 0x7e800000u;
}
__device__ __forceinline__ bool exact_reciprocal(float d) { return exact_reciprocal_bits(__float_as_uint(d)); }

/// x / Divisor rounded as the division rounds it, without div.rn's range check and slow
/// path (a compile-time odd divisor: SnapKV's pooling kernels 3, 5, 7, 9): q = x·r with
/// r = RN(1/d), then one correction q + r·(x − q·d), the remainder exact by the fma.
/// Equal to x / d for every float x — checked exhaustively for d = 3, 5, 7, 9 on the
/// device (tests/cuda/scorers_test.cu, FinishQuotientsAreTheDivisionsForEveryFloat) —
/// once ±0 and ±∞ take x·r (the correction would give +0 for −0 and NaN for ∞). Only
/// those divisors (and powers of two, where x·(1/d) is exact) are allowed: another odd
/// divisor would need its own exhaustive check. (The general path divides with `/`; a
/// build with -prec-div=false or --use_fast_math makes that an approximation, and the
/// two paths may then differ by an ulp, where IEEE builds agree bit for bit.)
template <int Divisor>
__device__ __forceinline__ float divide_by(float x) {
  static_assert(Divisor >= 1 && ((Divisor & (Divisor - 1)) == 0 || Divisor == 3 || Divisor == 5 || Divisor == 7 ||
                                 Divisor == 9),
                "divide_by is checked for 3, 5, 7, 9 and powers of two only");
  if constexpr ((Divisor & (Divisor - 1)) == 0) {
    return x * (1.0f / static_cast<float>(Divisor));
  } else {
    constexpr float reciprocal = 1.0f / static_cast<float>(Divisor);
    const float quotient = x * reciprocal;
    const float corrected = fmaf(fmaf(-quotient, static_cast<float>(Divisor), x), reciprocal, quotient);
    return x == 0.0f || fabsf(x) == INFINITY ? quotient : corrected;
  }
}

/// The CPU's per-query-head step and group reduction, in the CPU's order of
/// operations, for the tokens [1024·x, 1024·(x + 1)) of units y, y + gridDim.y, ….
/// `Half` ≥ 0: SnapKV with pooling half-width Half; a tile whose windows all lie inside
/// the row (and none of whose tokens is protected) takes the interior path: each
/// thread pools 4 consecutive tokens from 12 staged values in registers, the window's
/// sum in the CPU's order (first to last) and the same one quotient, with no bounds in the
/// pooling (divide_by: the division's float without div.rn's checks; mass / window and the
/// group mean as products where the reciprocal is exact — the path ran issue-bound, and
/// the divisions' slow-path checks and the 64-bit bounds of its loads were ~60 % of its
/// instructions: 38.3 → 28.6 µs at W on the H100, ncu, 2026-12-06).
/// Other tiles, and `Half` = −1, take the general path below.
/// SnapKV's pooling reads each mass `kernel` times: the block stages four query
/// heads' values mass / window_divisor at once in shared memory (the quotient the CPU
/// takes per read), every load in flight together, so each element is loaded and
/// divided once. (One thread per token with 64-bit index arithmetic, every read and
/// division repeated per neighbour, took 67 µs at W on the H100 against ~14 µs of
/// bytes; staging one row at a time, 128 µs: a memory latency per row and block.)
template <int Half>
__global__ void __launch_bounds__(256, 3) attention_mass_finish(const __grid_constant__ mass_finish_parameters p) {
  static_assert(Half >= -1 && Half <= finish_compiled_half_widths && Half <= finish_interior_pad);
  static_assert(finish_tile + 2 * finish_interior_pad <= finish_stage_width);
  __shared__ __align__(16) float staged[finish_stage_rows][finish_stage_width];
  constexpr int per_thread = static_cast<int>(finish_tile / 256);
  constexpr int loads = finish_stage_width / 256;
  const std::int64_t units = p.batch * p.kv_heads;
  const std::int64_t j0 = std::int64_t{blockIdx.x} * finish_tile;
  const bool mean = p.reduction == score::group_reduction::mean;
  const int t = static_cast<int>(threadIdx.x);
  // Query head g's value at token j into the reduction (g in order: the CPU's).
  const auto reduce = [&](float (&reduced)[per_thread], std::int64_t g, int k, float value) {
    if (g == 0)
      reduced[k] = value;
    else if (mean)
      reduced[k] += value;
    else
      reduced[k] = fmaxf(reduced[k], value);
  };
  if constexpr (Half >= 0) {
    // Block-uniform and the same for every unit: every window of the tile inside [0, length),
    // every token scored. Decided before the general path's set-up, which interior blocks skip.
    const bool interior = j0 - Half >= 0 && j0 + finish_tile + Half <= p.length &&
                          j0 + finish_tile <= mass_min(p.tokens, p.protected_from);
    if (interior) {
      constexpr int pad = finish_interior_pad, staged_values = static_cast<int>(finish_tile) + 2 * pad;
      constexpr int interior_loads = (staged_values + 255) / 256;
      static_assert(per_thread == 4, "a thread's 4 tokens are one float4 of the staged row");
      const int first_token = 4 * t;  // this thread's tokens: j0 + first_token + i, i < 4
      static_assert(interior_loads == 5 && pad >= Half, "the loads' bounds below");
      // mass / window and the group mean as products where the reciprocal is exact (block-uniform).
      const bool window_product = exact_reciprocal(p.window_divisor);
      const float window_reciprocal = window_product ? 1.0f / p.window_divisor : 0.0f;
      const float group = static_cast<float>(p.group);
      const bool group_product = exact_reciprocal(group);
      const float group_reciprocal = group_product ? 1.0f / group : 0.0f;
      for (std::int64_t unit = blockIdx.y; unit < units; unit += gridDim.y) {
        float* const out = p.scores + unit * p.tokens;
        const float* const rows = p.mass + unit * p.group * p.length;
        float reduced[per_thread] = {};
        for (std::int64_t g0 = 0; g0 < p.group; g0 += finish_stage_rows) {
          const int count = static_cast<int>(p.group - g0 < finish_stage_rows ? p.group - g0 : finish_stage_rows);
          // Staged value i is token j0 − pad + i. Only i in [pad − Half, pad + 1024 + Half) is
          // pooled, and those tokens lie in [0, length) (interior): the loads test only
          // that, on the thread index, and the others stage 0 (read by the float4s, never pooled).
          const float* const group_rows = rows + g0 * p.length;
          const std::int64_t first_staged = j0 - pad + t;  // < 0 only where t < pad − Half: not loaded
          float loaded[finish_stage_rows][interior_loads];
#pragma unroll
          for (int r = 0; r < finish_stage_rows; ++r)
#pragma unroll
            for (int x = 0; x < interior_loads; ++x) {
              const bool pooled = x == 0 ? t >= pad - Half : x < interior_loads - 1 || t < pad + Half;
              loaded[r][x] = r < count && pooled ? group_rows[first_staged + r * p.length + 256 * x] : 0.0f;
            }
          __syncthreads();  // every thread is done with the previous rows' values
          // The branch outside the loops: each loop one multiplication or one division an element.
          const auto stage_divided = [&](auto&& divided) {
#pragma unroll
            for (int r = 0; r < finish_stage_rows; ++r)
#pragma unroll
              for (int x = 0; x < interior_loads; ++x)
                if (r < count && t + 256 * x < staged_values) staged[r][t + 256 * x] = divided(loaded[r][x]);
          };
          if (window_product)
            stage_divided([&](float value) { return value * window_reciprocal; });
          else
            stage_divided([&](float value) { return value / p.window_divisor; });
          __syncthreads();
#pragma unroll 1
          for (int r = 0; r < count; ++r) {
            // Staged [first_token, first_token + 12): token first_token + i at value pad + i,
            // its window at pad + i − Half … pad + i + Half.
            float v[12];
#pragma unroll
            for (int q = 0; q < 3; ++q) {
              const float4 four = *reinterpret_cast<const float4*>(&staged[r][first_token + 4 * q]);
              v[4 * q] = four.x, v[4 * q + 1] = four.y, v[4 * q + 2] = four.z, v[4 * q + 3] = four.w;
            }
#pragma unroll
            for (int i = 0; i < per_thread; ++i) {
              float value;
              if (p.pooling == score::pooling::avg) {
                float sum = 0.0f;
#pragma unroll
                for (int d = -Half; d <= Half; ++d) sum += v[pad + i + d];
                value = divide_by<2 * Half + 1>(sum);
              } else {
                value = v[pad + i - Half];
#pragma unroll
                for (int d = -Half + 1; d <= Half; ++d) value = v[pad + i + d] > value ? v[pad + i + d] : value;
              }
              reduce(reduced, g0 + r, i, value);
            }
          }
        }
        float* const tile_out = out + j0 + first_token;
        float results[per_thread];
        const auto finish_reduced = [&](auto&& finished) {
#pragma unroll
          for (int i = 0; i < per_thread; ++i) results[i] = finished(reduced[i]);
        };
        if (!mean)
          finish_reduced([](float value) { return value; });
        else if (group_product)
          finish_reduced([&](float value) { return value * group_reciprocal; });
        else
          finish_reduced([&](float value) { return value / group; });
        if ((reinterpret_cast<std::uintptr_t>(out) & 15u) == 0) {  // block-uniform (j0 and first_token are ×4)
          *reinterpret_cast<float4*>(tile_out) = make_float4(results[0], results[1], results[2], results[3]);
        } else {
#pragma unroll
          for (int i = 0; i < per_thread; ++i) tile_out[i] = results[i];
        }
      }
      return;
    }
  }
  const bool snapkv = p.kind == mass_finish_kind::snapkv;
  const std::int64_t half = snapkv ? p.kernel / 2 : 0;
  // The rows' values the tile's pooling windows read: [s0, s1) ∩ [0, length).
  const std::int64_t s0 = j0 - half < 0 ? 0 : j0 - half;
  const std::int64_t s1 = j0 + finish_tile + half < p.length ? j0 + finish_tile + half : p.length;
  const int staged_count = static_cast<int>(s1 > s0 ? s1 - s0 : 0);
  const bool stage = snapkv && s1 - s0 <= finish_stage_width;  // block-uniform
  for (std::int64_t unit = blockIdx.y; unit < units; unit += gridDim.y) {
    float* const out = p.scores + unit * p.tokens;
    if (j0 >= p.protected_from) {  // the whole tile is protected (block-uniform)
#pragma unroll
      for (int k = 0; k < per_thread; ++k)
        if (j0 + t + 256 * k < p.tokens) out[j0 + t + 256 * k] = INFINITY;
      continue;
    }
    const float* const rows = p.mass + unit * p.group * p.length;
    float reduced[per_thread] = {};
    // pool_at over the values at(first … last) (row / window_divisor, the division per
    // element first, as the CPU), whichever memory holds them.
    const auto pool = [&](auto first, auto last, auto&& at) {
      if (p.pooling == score::pooling::avg) {
        float sum = 0.0f;
        for (auto i = first; i <= last; ++i) sum += at(i);
        return sum / static_cast<float>(p.kernel);
      }
      float value = at(first);
      for (auto i = first + 1; i <= last; ++i) {
        const float v = at(i);
        value = v > value ? v : value;
      }
      return value;
    };
    if (stage) {
      // Tile-relative 32-bit indices: token j0 + jl is staged at jl − (s0 − j0); its
      // window [max(0, j − half), min(length − 1, j + half)] is staged at
      // [max(0, jr − half), min(staged_count − 1, jr + half)] with jr = j − s0.
      const int visible = static_cast<int>(
          mass_min(mass_min(p.tokens, p.protected_from) - j0, finish_tile));  // tokens of the tile to score
      // (A half-width past the staged values clips to them: any kernel stages where the
      // row is short, and windows never reach past [0, staged_count).)
      const int lead = static_cast<int>(j0 - s0),
                half_width = static_cast<int>(mass_min(half, std::int64_t{finish_stage_width}));
      for (std::int64_t g0 = 0; g0 < p.group; g0 += finish_stage_rows) {
        const int count = static_cast<int>(p.group - g0 < finish_stage_rows ? p.group - g0 : finish_stage_rows);
        const float* const first_row = rows + g0 * p.length + s0;
        float loaded[finish_stage_rows][loads];
#pragma unroll
        for (int r = 0; r < finish_stage_rows; ++r)
#pragma unroll
          for (int x = 0; x < loads; ++x) {
            const int i = t + 256 * x;
            loaded[r][x] = r < count && i < staged_count ? first_row[r * p.length + i] : 0.0f;
          }
        __syncthreads();  // every thread is done with the previous rows' values
#pragma unroll
        for (int r = 0; r < finish_stage_rows; ++r)
#pragma unroll
          for (int x = 0; x < loads; ++x)
            if (r < count && t + 256 * x < staged_count)
              staged[r][t + 256 * x] = loaded[r][x] / p.window_divisor;
        __syncthreads();
#pragma unroll 1
        for (int r = 0; r < count; ++r) {
#pragma unroll
          for (int k = 0; k < per_thread; ++k) {
            const int jl = t + 256 * k;
            if (jl >= visible) continue;
            const int jr = jl + lead;
            const int first = jr - half_width < 0 ? 0 : jr - half_width;
            const int last = jr + half_width < staged_count ? jr + half_width : staged_count - 1;
            reduce(reduced, g0 + r, k, pool(first, last, [&](int i) { return staged[r][i]; }));
          }
        }
      }
    } else {
      for (std::int64_t g = 0; g < p.group; ++g) {
        const float* const row = rows + g * p.length;
#pragma unroll 1
        for (int k = 0; k < per_thread; ++k) {
          const std::int64_t j = j0 + t + 256 * k;
          if (j >= p.tokens || j >= p.protected_from) continue;
          if (snapkv) {  // a kernel wider than the staged halo
            const std::int64_t first = j - half < 0 ? 0 : j - half;
            const std::int64_t last = j + half >= p.length ? p.length - 1 : j + half;
            reduce(reduced, g, k, pool(first, last, [&](std::int64_t i) { return row[i] / p.window_divisor; }));
          } else {
            reduce(reduced, g, k, p.observed_normalisation ? row[j] / static_cast<float>(p.tokens - j) : row[j]);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < per_thread; ++k) {
      const std::int64_t j = j0 + t + 256 * k;
      if (j >= p.tokens) continue;
      out[j] = j >= p.protected_from ? INFINITY : mean ? reduced[k] / static_cast<float>(p.group) : reduced[k];
    }
  }
}

/// Sizes of the two passes for one call (the same function sizes the workspace
/// and launches, so they cannot disagree).
struct mass_plan {
  std::int64_t units, chunks_per_head, row_chunks, rows, splits, split_tiles, q_heads;
};

/// The blocks of a launch with one thread per plan row (256 a block, grid-strided).
inline unsigned mass_row_blocks(const mass_plan& plan) {
  return static_cast<unsigned>(std::min<std::int64_t>(ceil_div(plan.rows, 256), 65535));
}

inline mass_plan plan_attention_mass(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                     std::int64_t per_head_queries) {
  mass_plan plan;
  plan.units = batch * shape.kv_heads;
  plan.q_heads = batch * shape.q_heads;
  plan.chunks_per_head = ceil_div(per_head_queries, mass_tile);
  plan.row_chunks = shape.group_size() * plan.chunks_per_head;
  plan.rows = plan.units * plan.row_chunks * mass_tile;
  const std::int64_t key_tiles = ceil_div(tokens, mass_tile);
  std::int64_t row_blocks = plan.units * plan.row_chunks, target = mass_target_blocks;
#if defined(KVTRIM_CUDA_WGMMA)
  // The wgmma pass 1 (16-bit inputs, head dim 64 or 128) takes 8 or 4 row chunks a
  // block: its splits are planned for those blocks, ~2048 warpgroup splits (a block
  // loads its Q chunks once for four, so fewer and longer splits than the mma.sync
  // pass's 4096 blocks); the other passes on the same plan (strided inputs) just split finer.
  if (shape.head_dim == 64 || shape.head_dim == 128) {
    row_blocks = plan.units * ceil_div(plan.row_chunks, shape.head_dim == 64 ? wgmma_mass_chunks<64> : wgmma_mass_chunks<128>);
    target = wgmma_row_target_blocks;
  }
#endif
  std::int64_t wanted = ceil_div(target, std::max<std::int64_t>(row_blocks, 1));
#if defined(KVTRIM_CUDA_WGMMA)
  // A wgmma block runs four splits, one a warpgroup, and holds an SM alone: a
  // multiple of four, at least four (where the keys have that many tiles), so
  // large batches (≥ 2048 row blocks: one split each) do not idle three of four.
  if (shape.head_dim == 64 || shape.head_dim == 128)
    wanted = ceil_div(std::max<std::int64_t>(wanted, wgmma_mass_warpgroups), wgmma_mass_warpgroups) * wgmma_mass_warpgroups;
#endif
  plan.splits = std::max<std::int64_t>(1, std::min({wanted, key_tiles, mass_max_splits}));
  plan.split_tiles = ceil_div(key_tiles, plan.splits);
  plan.splits = ceil_div(key_tiles, plan.split_tiles);
  return plan;
}

/// The pieces of scratch, carved the same way in the sizing and the real pass.
struct mass_scratch {
  float2* partial = nullptr;
  float2* stats = nullptr;
  float* lse = nullptr;
  float* mass = nullptr;
};

inline mass_scratch carve_attention_mass(workspace_carver& carver, const mass_plan& plan, std::int64_t length) {
  mass_scratch scratch;
  constexpr std::string_view function = "kvtrim::score::attention_mass (backend::cuda)";
  scratch.partial = carver.take<float2>(detail::checked_mul(function, "tokens", plan.rows, plan.splits));
  scratch.stats = carver.take<float2>(plan.rows);
  scratch.lse = carver.take<float>(plan.rows);
  scratch.mass = carver.take<float>(detail::checked_mul(function, "tokens", plan.q_heads, std::max<std::int64_t>(length, 1)));
  return scratch;
}

inline std::size_t attention_mass_workspace_bytes(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                                  std::int64_t per_head_queries, std::int64_t length) {
  workspace_carver carver;
  carve_attention_mass(carver, plan_attention_mass(shape, batch, tokens, per_head_queries), length);
  return carver.bytes();
}

/// The largest of bytes_of(t) over 1 ≤ t ≤ tokens, for a scorer whose plan's only
/// dependence on t is through ⌈t/64⌉ (key tiles; H2O's query chunks) and whose other
/// terms grow with t: the largest t of each tile count, t = min(64k, tokens), is the
/// largest of its tile count. A padded batch's per-sequence calls (1, T_b) can need more
/// than the batch's (B, T): fewer row blocks plan more splits, each a row of `partial`.
template <class BytesOf>
std::size_t largest_sequence_workspace(std::int64_t tokens, const BytesOf& bytes_of) {
  std::size_t largest = 0;
  for (std::int64_t t = mass_tile; t < tokens + mass_tile; t += mass_tile)
    largest = std::max(largest, bytes_of(std::min(t, tokens)));
  return largest;
}

/// Which kernels run the two passes of one call and their grids, chosen and checked
/// before anything is launched (a refused call launches nothing). The wgmma passes
/// (attention_mass_wgmma.cuh) where the build has them, for 16-bit inputs of one type
/// with 16-byte rows and head dim 64 or 128; pass 2 also needs the group's row chunks
/// to fit a block (G · ⌈n_q / 64⌉ ≤ 4 at D = 128, 8 at D = 64: SnapKV's windows).
struct mass_kernels {
  bool wgmma_rows = false, wgmma_columns = false;
  dim3 rows_grid;
  unsigned columns_blocks = 0;
};

template <class KeyT, class QueryT, int HeadDim>
mass_kernels choose_mass_kernels(std::string_view function, attention_mass_parameters<KeyT, QueryT>& p,
                                 const mass_plan& plan, float* lse, std::int64_t length) {
  mass_kernels kernels;
#if defined(KVTRIM_CUDA_WGMMA)
  if constexpr (mass_uses_mma<KeyT, QueryT> && wgmma_mass_head_dim<HeadDim>) {
    kernels.wgmma_rows = p.vector_loads && wgmma_device(function);
    kernels.wgmma_columns = kernels.wgmma_rows && plan.row_chunks <= wgmma_mass_chunks<HeadDim>;
  }
#endif
  (void)p, (void)lse;  // used by the wgmma passes only
  std::int64_t row_blocks = plan.units * plan.row_chunks;
#if defined(KVTRIM_CUDA_WGMMA)
  if constexpr (mass_uses_mma<KeyT, QueryT> && wgmma_mass_head_dim<HeadDim>) {
    if (kernels.wgmma_rows) row_blocks = plan.units * ceil_div(plan.row_chunks, wgmma_mass_chunks<HeadDim>);
  }
#endif
  if (row_blocks > 2147483647 || plan.splits > 65535)
    detail::fail(function, "keys", "fewer row chunks than a grid holds", std::to_string(row_blocks));
  std::int64_t split_blocks = plan.splits;
#if defined(KVTRIM_CUDA_WGMMA)
  if (kernels.wgmma_rows) split_blocks = ceil_div(plan.splits, std::int64_t{wgmma_mass_warpgroups});
#endif
  kernels.rows_grid = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(split_blocks));
  const std::int64_t key_tiles = ceil_div(length, mass_tile);
  std::int64_t column_blocks = plan.units * key_tiles;
#if defined(KVTRIM_CUDA_WGMMA)
  if (kernels.wgmma_columns) {
    p.column_tiles = wgmma_column_tiles(plan.units, key_tiles);
    p.lse = lse;
    column_blocks = plan.units * ceil_div(ceil_div(key_tiles, p.column_tiles), std::int64_t{wgmma_mass_warpgroups});
  }
#endif
  if (column_blocks > 2147483647)
    detail::fail(function, "keys", "fewer key tiles than a grid holds", std::to_string(column_blocks));
  kernels.columns_blocks = static_cast<unsigned>(column_blocks);
  return kernels;
}

/// Pass 1 and the fold of its splits into (m, 1/Z) (and L, where pass 2 is wgmma's).
template <class KeyT, class QueryT, int HeadDim>
void launch_attention_row_stats(std::string_view function, const attention_mass_parameters<KeyT, QueryT>& p,
                                const mass_kernels& kernels, const mass_plan& plan, cudaStream_t stream) {
  constexpr bool tensor_cores = mass_uses_mma<KeyT, QueryT>;
  const auto launch = [&](auto kernel, std::size_t shared, int threads) {
    detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared), function,
                       "cudaFuncSetAttribute(attention_row_stats)");
    kernel<<<kernels.rows_grid, threads, shared, stream>>>(p);
  };
  bool launched = false;
#if defined(KVTRIM_CUDA_WGMMA)
  if constexpr (tensor_cores && wgmma_mass_head_dim<HeadDim>) {
    if (kernels.wgmma_rows) {
      launch(attention_row_stats_wgmma<KeyT, HeadDim>, wgmma_row_stats_shared_bytes<HeadDim>(), wgmma_mass_threads);
      launched = true;
    }
  }
#endif
  if (!launched) {
    if constexpr (tensor_cores)
      launch(attention_row_stats_mma<KeyT, HeadDim>, mass_mma_shared_bytes<KeyT, HeadDim>(), mass_threads);
    else
      launch(attention_row_stats<KeyT, QueryT, HeadDim>, mass_shared_bytes<KeyT, QueryT, HeadDim>(), mass_threads);
  }
  detail::check_launch(function, "attention_row_stats");
  attention_fold_splits<KeyT, QueryT>
      <<<mass_row_blocks(plan), 256, 0, stream>>>(p);
  detail::check_launch(function, "attention_fold_splits");
}

/// Pass 2: the per-query-head column sums into p.mass.
template <class KeyT, class QueryT, int HeadDim>
void launch_attention_column_mass(std::string_view function, const attention_mass_parameters<KeyT, QueryT>& p,
                                  const mass_kernels& kernels, cudaStream_t stream) {
  constexpr bool tensor_cores = mass_uses_mma<KeyT, QueryT>;
  const auto launch = [&](auto kernel, std::size_t shared, int threads) {
    detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared), function,
                       "cudaFuncSetAttribute(attention_column_mass)");
    kernel<<<kernels.columns_blocks, threads, shared, stream>>>(p);
  };
  bool launched = false;
#if defined(KVTRIM_CUDA_WGMMA)
  if constexpr (tensor_cores && wgmma_mass_head_dim<HeadDim>) {
    if (kernels.wgmma_columns) {
      launch(attention_column_mass_wgmma<KeyT, HeadDim>, wgmma_column_mass_shared_bytes<HeadDim>(), wgmma_mass_threads);
      launched = true;
    }
  }
#endif
  if (!launched) {
    if constexpr (tensor_cores)
      launch(attention_column_mass_mma<KeyT, HeadDim>, mass_mma_shared_bytes<KeyT, HeadDim>(), mass_threads);
    else
      launch(attention_column_mass<KeyT, QueryT, HeadDim>, mass_shared_bytes<KeyT, QueryT, HeadDim>(), mass_threads);
  }
  detail::check_launch(function, "attention_column_mass");
}

/// Throws unless keys [B, kv_heads, T, D] and the observed queries [B, q_heads, n_q, D] match
/// the shape: before anything is sized from them (the workspace check would name the wrong argument).
template <class KeyT, class QueryT>
void check_mass_inputs(std::string_view function, const kv_view<KeyT, device_space>& keys,
                       const window_view<QueryT, device_space>& queries, const model_shape& shape, std::int64_t batch) {
  const std::int64_t head_dim = keys.extent(3);
  if (keys.extent(0) != batch || keys.extent(1) != shape.kv_heads || queries.extent(0) != batch ||
      queries.extent(1) != shape.q_heads || queries.extent(3) != head_dim || head_dim != shape.head_dim)
    detail::fail(function, "window_queries", "[batch, q_heads, n_q, head_dim] queries matching the keys",
                 detail::cat("[", queries.extent(0), ", ", queries.extent(1), ", ", queries.extent(2), ", ",
                             queries.extent(3), "]"));
}

/// The parameters of one call's passes (keys, the observed queries [first, n_q),
/// the scratch pieces; inputs checked by check_mass_inputs), as attention_mass_scores
/// and attention_row_lse set them up.
template <class KeyT, class QueryT>
attention_mass_parameters<device_element_t<KeyT>, device_element_t<QueryT>> make_mass_parameters(
    const kv_view<KeyT, device_space>& keys, const window_view<QueryT, device_space>& queries,
    const model_shape& shape, std::int64_t batch, std::int64_t first, std::int64_t length, const mass_plan& plan,
    const mass_scratch& pieces) {
  using key_t = device_element_t<KeyT>;
  using query_t = device_element_t<QueryT>;
  const std::int64_t tokens = keys.extent(2), observed = queries.extent(2), head_dim = keys.extent(3);
  const auto aligned = [](const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; };
  const bool vector_loads = keys.stride(3) == 1 && queries.stride(3) == 1 && aligned(keys.data) &&
                            aligned(queries.data) && keys.stride(0) % 8 == 0 && keys.stride(1) % 8 == 0 &&
                            keys.stride(2) % 8 == 0 && queries.stride(0) % 8 == 0 && queries.stride(1) % 8 == 0 &&
                            queries.stride(2) % 8 == 0;
  return attention_mass_parameters<key_t, query_t>{
      reinterpret_cast<const key_t*>(keys.data), keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
      reinterpret_cast<const query_t*>(queries.data), queries.stride(0), queries.stride(1), queries.stride(2),
      queries.stride(3), vector_loads, batch, shape.kv_heads, shape.group_size(), tokens, observed, first,
      plan.chunks_per_head, plan.splits, plan.split_tiles, length,
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim))), pieces.partial, pieces.stats,
      pieces.mass, nullptr, 0, given_lse_rows{}};
}

/// Runs both passes and the finish: scores(b, h, ·) from keys and the observed
/// queries [first, n_q). `finish` carries the scorer's step; its mass, scores
/// and shape fields are filled here. `given` ([B, Hq, n_q] device floats, checked
/// by the caller): the rows' normalisers when its data is set (pass 1 is skipped).
template <class KeyT, class QueryT>
void attention_mass_scores(std::string_view function, const kv_view<KeyT, device_space>& keys,
                           const window_view<QueryT, device_space>& queries, const model_shape& shape,
                           const score_view<device_space>& scores, std::int64_t first, std::int64_t length,
                           mass_finish_parameters finish, workspace scratch, cudaStream_t stream,
                           const tensor_view<const float, 3, device_space>& given = {}) {
  using key_t = device_element_t<KeyT>;
  using query_t = device_element_t<QueryT>;
  const std::int64_t batch = scores.extent(0), tokens = keys.extent(2), observed = queries.extent(2);
  const std::int64_t head_dim = keys.extent(3);
  check_mass_inputs(function, keys, queries, shape, batch);
  const mass_plan plan = plan_attention_mass(shape, batch, tokens, observed - first);
  const std::size_t needed = attention_mass_workspace_bytes(shape, batch, tokens, observed - first, length);
  detail::check_workspace(function, scratch, needed);
  workspace_carver carver(scratch);
  const mass_scratch pieces = carve_attention_mass(carver, plan, length);
  auto p = make_mass_parameters(keys, queries, shape, batch, first, length, plan, pieces);

  dispatch_head_dim(head_dim, function, [&](auto head_dim_constant) {
    constexpr int D = decltype(head_dim_constant)::value;
    const mass_kernels kernels = choose_mass_kernels<key_t, query_t, D>(function, p, plan, pieces.lse, length);
    if (given.data != nullptr) {
      // Read by pass 2 only (none runs for length 0). The wgmma pass 2 stages the caller's
      // normalisers itself (its rows' L', once a block): one launch fewer than the (m, 1/Z)
      // rows the other passes read (3.6 µs at W on the H100).
      p.given = given_lse_rows{given.data, given.stride(0), given.stride(1), given.stride(2)};
      if (!kernels.wgmma_columns && length > 0) {
        attention_given_stats<key_t, query_t><<<mass_row_blocks(plan), 256, 0, stream>>>(p);
        detail::check_launch(function, "attention_given_stats");
      }
    } else {
      launch_attention_row_stats<key_t, query_t, D>(function, p, kernels, plan, stream);
    }
    if (length > 0) launch_attention_column_mass<key_t, query_t, D>(function, p, kernels, stream);
  });

  finish.mass = pieces.mass;
  finish.scores = scores.data;
  finish.batch = batch;
  finish.kv_heads = shape.kv_heads;
  finish.group = shape.group_size();
  finish.tokens = tokens;
  finish.length = length;
  if (tokens > 0 && batch * shape.kv_heads > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(tokens, finish_tile)),
                    static_cast<unsigned>(std::min<std::int64_t>(batch * shape.kv_heads, 65535)));
    // (SnapKV's kernels are odd — score::snapkv refuses others — and the interior path takes
    // divide_by<2·Half + 1>, the quotient by the kernel; an even one would take the general path.)
    const std::int64_t half =
        finish.kind == mass_finish_kind::snapkv && finish.kernel % 2 == 1 ? finish.kernel / 2 : -1;
    switch (half) {  // a compiled interior path for the common kernels (finish_compiled_half_widths)
      case 0: attention_mass_finish<0><<<grid, 256, 0, stream>>>(finish); break;
      case 1: attention_mass_finish<1><<<grid, 256, 0, stream>>>(finish); break;
      case 2: attention_mass_finish<2><<<grid, 256, 0, stream>>>(finish); break;
      case 3: attention_mass_finish<3><<<grid, 256, 0, stream>>>(finish); break;
      case 4: attention_mass_finish<4><<<grid, 256, 0, stream>>>(finish); break;
      default: attention_mass_finish<-1><<<grid, 256, 0, stream>>>(finish); break;
    }
    static_assert(finish_compiled_half_widths == 4, "the cases above");
  }
  detail::check_launch(function, "attention_mass_finish");
}

/// The fold's L' rows (base 2) as natural-log normalisers out[b, h·G + g, t] for the
/// observed queries t ≥ first (the inverse of attention_given_stats's mapping).
template <class KeyT, class QueryT>
__global__ void attention_rows_to_lse(const __grid_constant__ attention_mass_parameters<KeyT, QueryT> p, float* out,
                                      std::int64_t batch_stride, std::int64_t head_stride, std::int64_t query_stride) {
  const std::int64_t rows = p.batch * p.kv_heads * p.group * p.chunks_per_head * mass_tile;
  for (std::int64_t row = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; row < rows;
       row += std::int64_t{gridDim.x} * blockDim.x) {
    const mass_row_place place = place_of_mass_row(p, row);
    if (!place.observed) continue;
    out[place.batch * batch_stride + place.query_head * head_stride + place.query * query_stride] =
        __double2float_rn(static_cast<double>(p.lse[row]) * 0.6931471805599453);
  }
}

/// Scratch bytes of attention_row_lse (the attention mass workspace of the same call).
inline std::size_t attention_row_lse_workspace_bytes(const model_shape& shape, std::int64_t batch,
                                                     std::int64_t tokens, std::int64_t per_head_queries) {
  return attention_mass_workspace_bytes(shape, batch, tokens, per_head_queries, 0);
}

/// Pass 1 and the fold alone: the natural-log normaliser of every observed query
/// [first, n_q) into out[b, q head, t] (device floats [B, Hq, n_q]; rows t < first are
/// not written) — what an engine's prefill hands to config.lse, computed by kvtrim's
/// own pass (benchmarks use it to make their given normalisers; an engine has its own).
template <class KeyT, class QueryT>
void attention_row_lse(std::string_view function, const kv_view<KeyT, device_space>& keys,
                       const window_view<QueryT, device_space>& queries, const model_shape& shape, std::int64_t first,
                       const tensor_view<float, 3, device_space>& out, workspace scratch, cudaStream_t stream) {
  using key_t = device_element_t<KeyT>;
  using query_t = device_element_t<QueryT>;
  const std::int64_t batch = keys.extent(0), tokens = keys.extent(2), observed = queries.extent(2);
  check_mass_inputs(function, keys, queries, shape, batch);
  if (out.data == nullptr) detail::fail(function, "out", "a device tensor [batch, q_heads, n_q] of floats", "null");
  detail::check_given_lse(function, out.data, out.extents, out.strides, batch, shape.q_heads, observed, "out");
  const mass_plan plan = plan_attention_mass(shape, batch, tokens, observed - first);
  detail::check_workspace(function, scratch, attention_row_lse_workspace_bytes(shape, batch, tokens, observed - first));
  workspace_carver carver(scratch);
  const mass_scratch pieces = carve_attention_mass(carver, plan, 0);
  auto p = make_mass_parameters(keys, queries, shape, batch, first, 0, plan, pieces);
  dispatch_head_dim(keys.extent(3), function, [&](auto head_dim_constant) {
    constexpr int D = decltype(head_dim_constant)::value;
    const mass_kernels kernels = choose_mass_kernels<key_t, query_t, D>(function, p, plan, pieces.lse, 0);
    p.lse = pieces.lse;  // the fold writes L' for every row
    launch_attention_row_stats<key_t, query_t, D>(function, p, kernels, plan, stream);
  });
  attention_rows_to_lse<key_t, query_t><<<mass_row_blocks(plan), 256, 0, stream>>>(p, out.data, out.stride(0),
                                                                                  out.stride(1), out.stride(2));
  detail::check_launch(function, "attention_rows_to_lse");
}

}  // namespace kvtrim::cuda_detail
