// kvtrim/backend/cuda/attention_mass_wgmma.cuh — the SnapKV / H2O attention-mass passes on
// Hopper's warpgroup MMA (sm_90a; wgmma.cuh says when it is compiled in). Same math,
// same scratch and the same fold and finish as attention_mass.cuh's mma.sync passes,
// which remain the path for other targets, strided or unaligned inputs and head dim 256.
//
// Why. The mma.sync passes reach ~211 TFLOP/s at W (H200, 2026-12-02): latency-bound
// at 0.6 eligible warps per scheduler, each warp waiting on its own ldmatrix → mma →
// exp chain. wgmma is asynchronous: a warpgroup issues the product of its next row
// chunk and exponentiates the current one while the tensor cores run, and one
// instruction covers a 64 × 64 × 16 product, so the issue slots go to the exponentials
// (the passes' other bound: one MUFU.EX2 per logit).
//
// Shapes (four warpgroups of 128 threads per block, one block per SM; each warpgroup
// runs its own K stream through its own two stages, on the block's one copy of Q):
//   pass 1  attention_row_stats_wgmma: block = (kv head unit, group of ≤ I row chunks,
//           4 key splits). The block's Q chunks stay in shared memory (I · 16 KB at
//           D = 128) and every K tile of a split is multiplied against each of them:
//           S = Q·Kᵀ, m64n64k16 with both operands in shared memory (descriptors). K is
//           read from L2 once per split for all I chunks — the mma.sync pass 1 read it
//           once per chunk, which at wgmma's rate would cost ~4× the L2 bandwidth.
//   pass 2  attention_column_mass_wgmma: block = (unit, 4 runs of key tiles), every row
//           chunk of the group resident (G · chunks ≤ I), Sᵀ = K·Qᵀ with the K tile in
//           registers (each warp's 16 keys by ldmatrix, once a tile) and Q in shared
//           memory: a key's mass is a sum across a thread's own columns and the 4
//           threads of its row, no reduction across warps. The fragments take the
//           registers of a second accumulator, so pass 2's chunks run one at a time
//           (issue, wait, exponentiate); its exponentials overlap the other warpgroups'
//           products. Both operands in shared memory with two accumulators was 11 %
//           slower at W (L1's wavefronts its busiest unit; docs/results.md, 2026-12-06).
// Pass 1's accumulators are double-buffered: chunk i + 1's product is issued before
// chunk i's accumulator is read (wgmma.wait_group 1), so the exponentials of one chunk
// run under the tensor work of the next.
//
// Pass 2's probabilities use one value per row, L = m' + log2 Z (written by the fold, or
// computed from the caller's normalisers as the rows are staged: given_row_lse):
// p = 2^(l·c − L), one fma and one MUFU.EX2 per logit, where the mma.sync pass
// multiplies by 1/Z — one product per logit and two values per row to load. L's
// rounding moves the exponent by ≤ u·(|m'| + 3·log2 T) (tests/cuda/scorers_test.cu
// counts it).
#pragma once

#if defined(KVTRIM_CUDA_WGMMA)

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>

#include "kvtrim/backend/cuda/attention_mass_base.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/wgmma.cuh"

namespace kvtrim::cuda_detail {

/// Row chunks (64 query rows each) a block keeps in shared memory: 64 KB of Q at
/// either head dim, shared by the block's warpgroups.
template <int HeadDim>
inline constexpr int wgmma_mass_chunks = HeadDim == 64 ? 8 : 4;
/// Warpgroups of a block: each runs its own key split (pass 1) or run of key tiles
/// (pass 2) through its own two K stages, all four on the block's one copy of Q. Four
/// per SM is what hides the exponentials' dependent chains: with one warpgroup a
/// block and two blocks an SM (two warps a scheduler) ncu saw the schedulers idle
/// 55 % of cycles, stalled on fixed-latency dependencies, MUFU 38 % busy (H200, W).
inline constexpr int wgmma_mass_warpgroups = 4;
inline constexpr int wgmma_mass_threads = 128 * wgmma_mass_warpgroups;
/// Pass 1 aims at this many warpgroup splits (~4 waves of 4 on 132 SMs) before it
/// stops splitting keys (plan_attention_mass).
inline constexpr std::int64_t wgmma_row_target_blocks = 2048;
/// Pass 2 aims at this many warpgroup runs (~4 waves) before it gives a run more key tiles.
inline constexpr std::int64_t wgmma_column_target_blocks = 2048;

template <int HeadDim>
inline constexpr bool wgmma_mass_head_dim = HeadDim == 64 || HeadDim == 128;

/// 1024 bytes to align the tiles by hand (the swizzle's period), the resident Q
/// chunks, two K stages per warpgroup (193 KB at D 128); pass 2 adds its rows' L in
/// thread order.
template <int HeadDim>
constexpr std::size_t wgmma_row_stats_shared_bytes() {
  return 1024 + std::size_t{wgmma_mass_chunks<HeadDim> + 2 * wgmma_mass_warpgroups} * swizzled_tile_bytes<HeadDim>;
}
template <int HeadDim>
constexpr std::size_t wgmma_column_mass_shared_bytes() {
  return wgmma_row_stats_shared_bytes<HeadDim>() + std::size_t{wgmma_mass_chunks<HeadDim>} * mass_tile * sizeof(float);
}

/// The block's first 1024-byte aligned byte of dynamic shared memory (the swizzle's period).
__device__ __forceinline__ unsigned char* wgmma_aligned_shared(unsigned char* shared) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  return shared + (((address + 1023u) & ~1023u) - address);
}
__device__ __forceinline__ unsigned shared_address(const void* pointer) {
  return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

/// S (+)= A·Bᵀ over the head dim: HeadDim/16 k-steps, A and B swizzled tiles.
template <class T, int HeadDim>
__device__ __forceinline__ void wgmma_tile_product_ss(float (&d)[32], unsigned a_tile, unsigned b_tile) {
  const unsigned a = swizzled_descriptor_low(a_tile), b = swizzled_descriptor_low(b_tile);
  wgmma_fence();
  wgmma_64x64x16_ss<T, false>(d, swizzled_descriptor_from_low(a), swizzled_descriptor_from_low(b));
#pragma unroll
  for (int s = 1; s < HeadDim / 16; ++s)
    wgmma_64x64x16_ss<T, true>(d, swizzled_descriptor_from_low(a + swizzled_step_offset(s)),
                               swizzled_descriptor_from_low(b + swizzled_step_offset(s)));
  wgmma_commit();
}

/// S (+)= A·Bᵀ with A (this warp's 16 rows, every k-step) in registers.
template <class T, int HeadDim>
__device__ __forceinline__ void wgmma_tile_product_rs(float (&d)[32], const unsigned (&a)[HeadDim / 16][4],
                                                      unsigned b_tile) {
  const unsigned b = swizzled_descriptor_low(b_tile);
  wgmma_fence();
  wgmma_64x64x16_rs<T, false>(d, a[0], swizzled_descriptor_from_low(b));
#pragma unroll
  for (int s = 1; s < HeadDim / 16; ++s)
    wgmma_64x64x16_rs<T, true>(d, a[s], swizzled_descriptor_from_low(b + swizzled_step_offset(s)));
  wgmma_commit();
}

/// `value` as lane 0 holds it, which the compiler then knows to be warp-uniform: shared
/// addresses derived from it live in uniform registers, where wgmma reads its
/// descriptors (a per-thread tile address cost two R2UR and a vector add a wgmma;
/// ~20 % of pass 2's issue slots with the descriptors' masks, ncu on the H100).
__device__ __forceinline__ unsigned warp_uniform(unsigned value) { return __shfl_sync(0xffffffffu, value, 0); }
/// This thread's warpgroup (threadIdx.x / 128), warp-uniform.
__device__ __forceinline__ int uniform_warpgroup() { return static_cast<int>(warp_uniform(threadIdx.x / 128)); }

/// Chunks 0 … chunks − 1 (≤ ChunksMax) through two accumulators: chunk i's product
/// (issue) is in flight while chunk i − 1's logits are read (consume). Every step
/// waits right after the issue it may leave pending, so on every path the
/// accumulator read and the one the next issue overwrites have retired — ptxas
/// checks that per path (a wait under a separate branch on the same condition made
/// it serialise every wgmma, C7514).
template <int ChunksMax, class Issue, class Consume>
__device__ __forceinline__ void wgmma_chunk_pipeline(int chunks, float (&accumulator)[2][32], Issue&& issue,
                                                     Consume&& consume) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (
        [&] {
          constexpr int i = I;
          if constexpr (i == 0) {
            issue(std::integral_constant<int, 0>{}, accumulator[0]);  // chunks ≥ 1
          } else {
            if (i < ChunksMax && i < chunks) {
              issue(std::integral_constant<int, i < ChunksMax ? i : 0>{}, accumulator[i & 1]);
              wgmma_wait<1>();
            } else {
              wgmma_wait<0>();
            }
            if (i - 1 < chunks) {
              wgmma_settle(accumulator[(i - 1) & 1]);
              consume(std::integral_constant<int, i - 1>{}, accumulator[(i - 1) & 1]);
            }
          }
        }(),
        ...);
  }(std::make_integer_sequence<int, ChunksMax + 1>{});
}

/// Starts the cp.async copies of a unit's row chunks chunk0 … chunk0 + chunks − 1 into
/// the block's resident Q tiles (tile i for chunk chunk0 + i), spread over the
/// warpgroups (tile i by warpgroup i mod 4); the caller commits, waits and syncs the block.
template <class T, int HeadDim>
__device__ __forceinline__ void stage_row_chunks(const attention_mass_parameters<T, T>& p, std::int64_t b,
                                                 std::int64_t h, unsigned q_tiles, unsigned chunk0, int chunks) {
  const int warpgroup = static_cast<int>(threadIdx.x / 128);
  const swizzled_loader<T, HeadDim> queries(p.queries + b * p.query_batch_stride + h * p.group * p.query_head_stride,
                                            p.query_token_stride, static_cast<int>(threadIdx.x % 128));
  for (int i = warpgroup; i < chunks; i += wgmma_mass_warpgroups) {
    const row_chunk rows = chunk_rows(p, chunk0 + i);
    queries.load(q_tiles + i * swizzled_tile_bytes<HeadDim>, rows.g * p.query_head_stride, rows.t0,
                 rows.t0 + rows.count);
  }
}

/// Pass 1 (see the header). grid.x = units · row groups (the groups of one unit
/// adjacent: they share the unit's K through L2), grid.y = key splits / warpgroups:
/// warpgroup w of block y runs split 4y + w. Each writes every row of its chunks'
/// partial (max·c, Σ) for its split, as attention_row_stats does.
template <class T, int HeadDim>
__global__ void __launch_bounds__(wgmma_mass_threads, 1)
    attention_row_stats_wgmma(const __grid_constant__ attention_mass_parameters<T, T> p) {
#if defined(__CUDA_ARCH__) && !KVTRIM_WGMMA_DEVICE_PASS
  __trap();  // not sm_90a code: the host never launches it (see wgmma.cuh)
#else
  constexpr int chunks_max = wgmma_mass_chunks<HeadDim>;
  constexpr unsigned tile_bytes = swizzled_tile_bytes<HeadDim>;
  extern __shared__ __align__(1024) unsigned char wgmma_mass_shared[];
  const int warpgroup = uniform_warpgroup(), thread = static_cast<int>(threadIdx.x % 128);
  const unsigned q_tiles = shared_address(wgmma_aligned_shared(wgmma_mass_shared));
  const unsigned k_tiles = q_tiles + (chunks_max + 2 * warpgroup) * tile_bytes;  // this warpgroup's two stages

  // Grid indices fit in 32 bits (the host checks the grid).
  const unsigned row_chunks = static_cast<unsigned>(p.group * p.chunks_per_head);
  const unsigned row_groups = (row_chunks + chunks_max - 1) / chunks_max;
  const unsigned unit = blockIdx.x / row_groups, chunk0 = blockIdx.x % row_groups * chunks_max;
  const int chunks = static_cast<int>(row_chunks - chunk0 < chunks_max ? row_chunks - chunk0 : chunks_max);
  const std::int64_t b = unit / static_cast<unsigned>(p.kv_heads), h = unit % static_cast<unsigned>(p.kv_heads);
  // A split ≥ p.splits has no tiles (p.splits · split_tiles covers the keys) and writes nothing.
  const std::int64_t split = std::int64_t{blockIdx.y} * wgmma_mass_warpgroups + warpgroup;

  std::int64_t last_position = -1, first_position = p.tokens;  // over the block's rows
  for (int i = 0; i < chunks; ++i) {
    const row_chunk rows = chunk_rows(p, chunk0 + i);
    last_position = last_position > rows.last_position ? last_position : rows.last_position;
    const std::int64_t first = p.tokens - p.observed + rows.t0;
    first_position = first_position < first ? first_position : first;
  }
  const std::int64_t visible = mass_min(p.tokens, last_position + 1);
  const std::int64_t tile_begin = split * p.split_tiles;
  const std::int64_t tile_end = mass_min(mass_ceil_div(visible, mass_tile), (split + 1) * p.split_tiles);
  const swizzled_loader<T, HeadDim> keys(p.keys + b * p.key_batch_stride + h * p.key_head_stride, p.key_token_stride,
                                         thread);
  {  // the block's Q chunks (chunk i by warpgroup i mod 4), then this warpgroup's first K tile
    stage_row_chunks<T, HeadDim>(p, b, h, q_tiles, chunk0, chunks);
    // (a split past the block's last visible key loads no K and writes (−∞, 0))
    if (tile_begin < tile_end) keys.load(k_tiles, 0, tile_begin * mass_tile, p.tokens);
    mass_async_commit();
    mass_async_wait<0>();
    fence_shared_for_wgmma();
    __syncthreads();  // every warpgroup's Q chunks are staged; from here each warpgroup syncs alone
  }

  // The accumulator's rows follow the warp's place in its warpgroup.
  const int warp = static_cast<int>(thread / 32), lane = static_cast<int>(thread % 32);
  const int quad_row = lane / 4, quad_column = 2 * (lane % 4);
  const float c = p.log2_scale;
  // Per chunk and row of this thread (rows 16·warp + quad_row + 8·hh): the raw running
  // max and Σ 2^(l·c − fl(max·c)) over this thread's 16 keys of every tile.
  float raw_max[chunks_max][2], sum[chunks_max][2];
#pragma unroll
  for (int i = 0; i < chunks_max; ++i)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) raw_max[i][hh] = -INFINITY, sum[i][hh] = 0.0f;
  float accumulator[2][32];
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int e = 0; e < 32; ++e) accumulator[x][e] = 0.0f;

  // Chunk i's logits of tile j0 (in d) into its running statistics.
  const auto update = [&](auto chunk_constant, const float (&d)[32], std::int64_t j0, bool masked) {
    constexpr int i = decltype(chunk_constant)::value;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float values[16];
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) values[2 * n + e] = d[4 * n + 2 * hh + e];
      if (masked) {  // the tiles that reach a chunk's rows (a head's last one or two)
        const row_chunk rows = chunk_rows(p, chunk0 + i);
        const std::int64_t position = p.tokens - p.observed + rows.t0 + 16 * warp + quad_row + 8 * hh;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (j0 + 8 * n + quad_column + e > position) values[2 * n + e] = -INFINITY;
      }
      // Tree max and tree sum: short chains (see attention_row_stats_mma).
      float tree[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) tree[x] = fmaxf(values[2 * x], values[2 * x + 1]);
#pragma unroll
      for (int x = 0; x < 4; ++x) tree[x] = fmaxf(tree[x], tree[x + 4]);
      const float tile_max = fmaxf(raw_max[i][hh], fmaxf(fmaxf(tree[0], tree[1]), fmaxf(tree[2], tree[3])));
      if (tile_max == -INFINITY) continue;  // nothing of this row visible yet
      const float shift = __fmul_rn(tile_max, c);
      // The same rescale as attention_row_stats_mma (rounded shifts cancel; never contracted).
      const float kept = tile_max == raw_max[i][hh]
                             ? sum[i][hh]
                             : sum[i][hh] * mass_exp2(__fsub_rn(__fmul_rn(raw_max[i][hh], c), shift));
      float terms[8];
#pragma unroll
      for (int x = 0; x < 8; ++x)
        terms[x] = mass_exp2(fmaf(values[2 * x], c, -shift)) + mass_exp2(fmaf(values[2 * x + 1], c, -shift));
#pragma unroll
      for (int x = 0; x < 4; ++x) terms[x] += terms[x + 4];
      raw_max[i][hh] = tile_max;
      sum[i][hh] = kept + ((terms[0] + terms[1]) + (terms[2] + terms[3]));
    }
  };

  for (std::int64_t t = tile_begin; t < tile_end; ++t) {
    mass_async_wait<0>();
    fence_shared_for_wgmma();
    warpgroup_barrier(warpgroup);  // tile t is staged; every warp waited for its products of tile t − 1
    if (t + 1 < tile_end) {
      keys.load_tile(k_tiles + static_cast<unsigned>((t + 1 - tile_begin) & 1) * tile_bytes, (t + 1) * mass_tile,
                     p.tokens);
      mass_async_commit();
    }
    const unsigned k_tile = warp_uniform(k_tiles + static_cast<unsigned>((t - tile_begin) & 1) * tile_bytes);
    const std::int64_t j0 = t * mass_tile;
    const bool masked = j0 + mass_tile - 1 > first_position;
    wgmma_chunk_pipeline<chunks_max>(
        chunks, accumulator,
        [&](auto i, float(&d)[32]) { wgmma_tile_product_ss<T, HeadDim>(d, q_tiles + i * tile_bytes, k_tile); },
        [&](auto i, const float(&d)[32]) { update(i, d, j0, masked); });
  }

  // (max·c, Σ) per row, folded over the 4 threads of a row; the row's first thread writes.
  if (split >= p.splits) return;
#pragma unroll
  for (int i = 0; i < chunks_max; ++i) {
    if (i >= chunks) break;
    const std::int64_t count = chunk_rows(p, chunk0 + i).count;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float2 stats = make_float2(__fmul_rn(raw_max[i][hh], c), sum[i][hh]);
#pragma unroll
      for (int offset = 1; offset <= 2; offset *= 2) {
        const float2 other = make_float2(__shfl_xor_sync(0xffffffffu, stats.x, offset),
                                         __shfl_xor_sync(0xffffffffu, stats.y, offset));
        stats = mass_merge_stats(stats, other);
      }
      const int r = 16 * warp + quad_row + 8 * hh;
      if (lane % 4 == 0 && r < count) {
        const std::int64_t row = (std::int64_t{unit} * row_chunks + chunk0 + i) * mass_tile + r;
        p.partial[row * p.splits + split] = stats;
      }
    }
  }
#endif
}

/// Pass 2 (see the header). grid.x = units · ⌈runs / 4⌉ with runs of p.column_tiles
/// key tiles: warpgroup w of a unit's block y takes run 4y + w. Every row chunk of
/// the unit's group is resident (the host checks G · chunks ≤ the chunks a block
/// holds). Each (query head, key) mass is written once.
template <class T, int HeadDim>
__global__ void __launch_bounds__(wgmma_mass_threads, 1)
    attention_column_mass_wgmma(const __grid_constant__ attention_mass_parameters<T, T> p) {
#if defined(__CUDA_ARCH__) && !KVTRIM_WGMMA_DEVICE_PASS
  __trap();  // not sm_90a code: the host never launches it (see wgmma.cuh)
#else
  constexpr int chunks_max = wgmma_mass_chunks<HeadDim>;
  constexpr unsigned tile_bytes = swizzled_tile_bytes<HeadDim>;
  extern __shared__ __align__(1024) unsigned char wgmma_mass_shared[];
  const int warpgroup = uniform_warpgroup(), thread = static_cast<int>(threadIdx.x % 128);
  unsigned char* aligned = wgmma_aligned_shared(wgmma_mass_shared);
  const unsigned q_tiles = shared_address(aligned);
  const unsigned k_tiles = q_tiles + (chunks_max + 2 * warpgroup) * tile_bytes;  // this warpgroup's two stages
  // L of chunk i's row 8n + 2t + e at [i][t][n][e]: a thread's 16 rows are 64 contiguous bytes.
  float* row_lse = reinterpret_cast<float*>(aligned + (chunks_max + 2 * wgmma_mass_warpgroups) * tile_bytes);

  const unsigned key_tiles = static_cast<unsigned>(mass_ceil_div(p.length, mass_tile));
  const unsigned runs = static_cast<unsigned>(mass_ceil_div(key_tiles, p.column_tiles));
  const unsigned unit_blocks = (runs + wgmma_mass_warpgroups - 1) / wgmma_mass_warpgroups;
  const unsigned unit = blockIdx.x / unit_blocks;
  const unsigned run = blockIdx.x % unit_blocks * wgmma_mass_warpgroups + static_cast<unsigned>(warpgroup);
  const std::int64_t b = unit / static_cast<unsigned>(p.kv_heads), h = unit % static_cast<unsigned>(p.kv_heads);
  const int chunks = static_cast<int>(p.group * p.chunks_per_head);
  const int chunks_per_head = static_cast<int>(p.chunks_per_head);  // ≤ chunks ≤ 8
  // A run ≥ runs starts past the last key tile: no tiles, nothing written.
  const std::int64_t tile_begin = std::int64_t{run} * p.column_tiles;
  const std::int64_t tile_end = mass_min(tile_begin + p.column_tiles, key_tiles);

  const swizzled_loader<T, HeadDim> keys(p.keys + b * p.key_batch_stride + h * p.key_head_stride, p.key_token_stride,
                                         thread);
  {  // the group's Q chunks (chunk i by warpgroup i mod 4), their rows' L, this warpgroup's first K tile
    stage_row_chunks<T, HeadDim>(p, b, h, q_tiles, 0, chunks);
    if (tile_begin < tile_end) keys.load(k_tiles, 0, tile_begin * mass_tile, p.tokens);
    mass_async_commit();
    // Rows past a chunk's count get L = +∞: 2^(l·c − ∞) = 0, no test per logit.
    for (int x = static_cast<int>(threadIdx.x); x < chunks * mass_tile; x += wgmma_mass_threads) {
      const int i = x / mass_tile, r = x % mass_tile;
      const std::int64_t row = (std::int64_t{unit} * chunks + i) * mass_tile + r;
      const float lse = r < chunk_rows(p, i).count ? (p.given.data != nullptr ? given_row_lse(p, row) : p.lse[row])
                                                    : INFINITY;
      row_lse[i * mass_tile + ((r % 8) / 2) * 16 + (r / 8) * 2 + r % 2] = lse;
    }
    mass_async_wait<0>();
    fence_shared_for_wgmma();
    __syncthreads();  // Q and L are staged; from here each warpgroup syncs alone
  }
  const std::int64_t first_position = p.tokens - p.observed + p.first;  // of the first chunk's first row

  // The accumulator's rows (keys) follow the warp's place in its warpgroup.
  const int warp = static_cast<int>(thread / 32), lane = static_cast<int>(thread % 32);
  const int quad_row = lane / 4, quad_column = 2 * (lane % 4);
  const float c = p.log2_scale;
  // One accumulator: the K fragments (below) hold the registers a second one would take.
  float accumulator[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) accumulator[e] = 0.0f;
  float head_mass[2] = {0.0f, 0.0f};  // this thread's two keys, the current query head

  for (std::int64_t t = tile_begin; t < tile_end; ++t) {
    mass_async_wait<0>();
    fence_shared_for_wgmma();
    warpgroup_barrier(warpgroup);  // tile t is staged; every warp's products of tile t − 1 have retired
    if (t + 1 < tile_end) {
      keys.load_tile(k_tiles + static_cast<unsigned>((t + 1 - tile_begin) & 1) * tile_bytes, (t + 1) * mass_tile,
                     p.tokens);
      mass_async_commit();
    }
    const unsigned k_tile = warp_uniform(k_tiles + static_cast<unsigned>((t - tile_begin) & 1) * tile_bytes);
    const std::int64_t j0 = t * mass_tile;
    const std::int64_t key[2] = {j0 + 16 * warp + quad_row, j0 + 16 * warp + quad_row + 8};

    // Chunk i's terms Σ_r 2^(l·c − L_r) for this thread's two keys, into head_mass;
    // written when chunk i is its query head's last. Only the tiles that reach the
    // window's rows (Masked) test causality: the others run one fma, one ex2 and one
    // add per logit.
    const auto accumulate = [&](auto masked_constant, int i, const float (&d)[32]) {
      constexpr bool masked = decltype(masked_constant)::value;
      float lse[16];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float4 four = *reinterpret_cast<const float4*>(row_lse + i * mass_tile + (lane % 4) * 16 + 4 * x);
        lse[4 * x] = four.x, lse[4 * x + 1] = four.y, lse[4 * x + 2] = four.z, lse[4 * x + 3] = four.w;
      }
      const int chunk_in_head = i % chunks_per_head;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        // Row 8n + e (of this thread's columns) sees the key iff 8n + e ≥ ahead.
        int ahead = 0;
        if constexpr (masked) {
          const std::int64_t row0_position = p.tokens - p.observed + p.first + chunk_in_head * mass_tile;
          const std::int64_t distance = key[hh] - row0_position - quad_column;
          ahead = distance <= 0 ? 0 : static_cast<int>(mass_min(distance, std::int64_t{64}));
        }
        float even = 0.0f, odd = 0.0f;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float term = mass_exp2(fmaf(d[4 * n + 2 * hh + e], c, -lse[2 * n + e]));
            if constexpr (masked) term = 8 * n + e < ahead ? 0.0f : term;
            if (e == 0)
              even += term;
            else
              odd += term;
          }
        head_mass[hh] += even + odd;
      }
      if (chunk_in_head + 1 == chunks_per_head) {  // the query head's last chunk
        const std::int64_t g = i / chunks_per_head;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float v = head_mass[hh];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          if (lane % 4 == 0 && key[hh] < p.length) p.mass[((b * p.kv_heads + h) * p.group + g) * p.length + key[hh]] = v;
          head_mass[hh] = 0.0f;
        }
      }
    };
    // Sᵀ = K·Qᵀ: the K tile is the A operand (rows = keys) in registers, chunk i's Q the B
    // operand. Each warp reads its 16 keys once a tile (ldmatrix) instead of wgmma reading
    // the shared K tile once a chunk: 5 bytes of shared memory a logit instead of 8, where
    // L1's wavefronts were pass 2's busiest unit (ncu, H100, W with given normalisers: 71 %).
    // The chunks then run one at a time (issue, wait, accumulate): a chunk's exponentials
    // overlap the other warpgroups' products, not this warpgroup's next one. Measured
    // against both operands in shared memory and two accumulators (H100, W, given
    // normalisers, 2026-12-06, medians): snapkv_score 394 → 352 µs, the whole SnapKV compress
    // 668 → 631 µs; the two-accumulator form of the same (128 registers, 48 bytes of
    // spills) 372 µs (docs/results.md).
    unsigned key_fragments[HeadDim / 16][4];
#pragma unroll
    for (int s = 0; s < HeadDim / 16; ++s) load_swizzled_rows(key_fragments[s], k_tile, 16 * warp, s);
    const auto run_chunks = [&](auto masked) {
#pragma unroll
      for (int i = 0; i < chunks_max; ++i) {
        if (i >= chunks) break;
        wgmma_tile_product_rs<T, HeadDim>(accumulator, key_fragments, q_tiles + i * tile_bytes);
        wgmma_wait<0>();
        wgmma_settle(accumulator);
        accumulate(masked, i, accumulator);
      }
    };
    if (j0 + mass_tile - 1 > first_position)
      run_chunks(std::true_type{});
    else
      run_chunks(std::false_type{});
  }
#endif
}

/// Whether the current device runs the sm_90a code (compute capability 9.0): the
/// only devices the wgmma kernels are launched on. Two attribute queries, no
/// synchronisation (capturable).
inline bool wgmma_device(std::string_view function) {
  int device = 0, major = 0, minor = 0;
  detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  detail::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), function,
                     "cudaDeviceGetAttribute(compute capability)");
  detail::check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), function,
                     "cudaDeviceGetAttribute(compute capability)");
  return major == 9 && minor == 0;
}

/// How many key tiles a pass-2 warpgroup takes: a unit's keys in ⌈target / units⌉
/// runs rounded up to a multiple of four (at least four: a block runs four, one a
/// warpgroup, and holds an SM alone), never fewer than one tile a run. Rounding the
/// tiles per run up keeps the runs of a unit a multiple of four where the division
/// allows it, so no block idles warpgroups (W: 511 tiles in 32 runs of 16, 512
/// blocks; the floor of total / target gave runs of 15 and 576 blocks, a fifth wave
/// 36 % full; large batches, ≥ 2048 units, got one run a unit and three idle warpgroups).
inline std::int64_t wgmma_column_tiles(std::int64_t units, std::int64_t key_tiles) {
  const std::int64_t wanted = std::max<std::int64_t>(wgmma_mass_warpgroups, mass_ceil_div(wgmma_column_target_blocks, units));
  const std::int64_t runs_per_unit = mass_ceil_div(wanted, wgmma_mass_warpgroups) * wgmma_mass_warpgroups;
  return std::max<std::int64_t>(1, mass_ceil_div(key_tiles, runs_per_unit));
}

}  // namespace kvtrim::cuda_detail

#endif  // KVTRIM_CUDA_WGMMA
