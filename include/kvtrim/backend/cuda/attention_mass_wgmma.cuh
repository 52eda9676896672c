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
// Shapes (one warpgroup of 128 threads per block, two blocks per SM):
//   pass 1  attention_row_stats_wgmma: block = (kv head unit, group of ≤ I row chunks,
//           key split). The block's Q chunks stay in shared memory (I · 16 KB at D = 128)
//           and every K tile of the split is multiplied against each of them:
//           S = Q·Kᵀ, m64n64k16 with both operands in shared memory (descriptors). K is
//           read from L2 once per block for all I chunks — the mma.sync pass 1 read it
//           once per chunk, which at wgmma's rate would cost ~4× the L2 bandwidth.
//   pass 2  attention_column_mass_wgmma: block = (unit, run of key tiles), every row
//           chunk of the group resident (G · chunks ≤ I), Sᵀ = K·Qᵀ with the K tile as the
//           register operand (ldmatrix once per tile) and each Q chunk from shared memory:
//           a key's mass is a sum across a thread's own columns and the 4 threads of
//           its row, no reduction across warps.
// The accumulators are double-buffered: chunk i + 1's product is issued before chunk
// i's accumulator is read (wgmma.wait_group 1), so the exponentials of one chunk run
// under the tensor work of the next.
//
// Pass 2's probabilities use one value per row, L = m' + log2 Z (written by the fold):
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
/// either head dim, so two blocks fit an SM with their K stages.
template <int HeadDim>
inline constexpr int wgmma_mass_chunks = HeadDim == 64 ? 8 : 4;
/// Pass 1 aims at this many blocks (~8 waves of 2 blocks on 132 SMs) before it stops
/// splitting keys (plan_attention_mass): each block loads its Q chunks once.
inline constexpr std::int64_t wgmma_row_target_blocks = 2048;
/// Pass 2 aims at this many blocks (~8 waves of 2 blocks on 132 SMs) before it gives
/// a block more key tiles: each block loads the group's Q once.
inline constexpr std::int64_t wgmma_column_target_blocks = 2048;

template <int HeadDim>
inline constexpr bool wgmma_mass_head_dim = HeadDim == 64 || HeadDim == 128;

/// 1024 bytes to align the tiles by hand (the swizzle's period), the resident Q
/// chunks, two K stages; pass 2 adds its rows' L in thread order.
template <int HeadDim>
constexpr std::size_t wgmma_row_stats_shared_bytes() {
  return 1024 + std::size_t{wgmma_mass_chunks<HeadDim> + 2} * swizzled_tile_bytes<HeadDim>;
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
  wgmma_fence();
  wgmma_64x64x16_ss<T, false>(d, swizzled_descriptor(a_tile, 0), swizzled_descriptor(b_tile, 0));
#pragma unroll
  for (int s = 1; s < HeadDim / 16; ++s)
    wgmma_64x64x16_ss<T, true>(d, swizzled_descriptor(a_tile, s), swizzled_descriptor(b_tile, s));
  wgmma_commit();
}

/// S (+)= A·Bᵀ with A (this warp's 16 rows, every k-step) in registers.
template <class T, int HeadDim>
__device__ __forceinline__ void wgmma_tile_product_rs(float (&d)[32], const unsigned (&a)[HeadDim / 16][4],
                                                      unsigned b_tile) {
  wgmma_fence();
  wgmma_64x64x16_rs<T, false>(d, a[0], swizzled_descriptor(b_tile, 0));
#pragma unroll
  for (int s = 1; s < HeadDim / 16; ++s) wgmma_64x64x16_rs<T, true>(d, a[s], swizzled_descriptor(b_tile, s));
  wgmma_commit();
}

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

/// Pass 1 (see the header). grid.x = units · row groups (the groups of one unit
/// adjacent: they share the unit's K through L2), grid.y = key splits. Writes every
/// row of its chunks' partial (max·c, Σ) for its split, as attention_row_stats does.
template <class T, int HeadDim>
__global__ void __launch_bounds__(mass_threads, 2)
    attention_row_stats_wgmma(const __grid_constant__ attention_mass_parameters<T, T> p) {
#if defined(__CUDA_ARCH__) && !KVTRIM_WGMMA_DEVICE_PASS
  __trap();  // not sm_90a code: the host never launches it (see wgmma.cuh)
#else
  constexpr int chunks_max = wgmma_mass_chunks<HeadDim>;
  constexpr unsigned tile_bytes = swizzled_tile_bytes<HeadDim>;
  extern __shared__ __align__(1024) unsigned char wgmma_mass_shared[];
  const unsigned q_tiles = shared_address(wgmma_aligned_shared(wgmma_mass_shared));
  const unsigned k_tiles = q_tiles + chunks_max * tile_bytes;  // two stages

  // Grid indices fit in 32 bits (the host checks the grid).
  const unsigned row_chunks = static_cast<unsigned>(p.group * p.chunks_per_head);
  const unsigned row_groups = (row_chunks + chunks_max - 1) / chunks_max;
  const unsigned unit = blockIdx.x / row_groups, chunk0 = blockIdx.x % row_groups * chunks_max;
  const int chunks = static_cast<int>(row_chunks - chunk0 < chunks_max ? row_chunks - chunk0 : chunks_max);
  const std::int64_t b = unit / static_cast<unsigned>(p.kv_heads), h = unit % static_cast<unsigned>(p.kv_heads);
  const std::int64_t split = blockIdx.y;

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
  const swizzled_loader<T, HeadDim> keys(p.keys + b * p.key_batch_stride + h * p.key_head_stride, p.key_token_stride);
  if (tile_begin < tile_end) {  // (a split past the block's last visible key loads nothing and writes (−∞, 0))
    const swizzled_loader<T, HeadDim> queries(
        p.queries + b * p.query_batch_stride + h * p.group * p.query_head_stride, p.query_token_stride);
    for (int i = 0; i < chunks; ++i) {
      const row_chunk rows = chunk_rows(p, chunk0 + i);
      queries.load(q_tiles + i * tile_bytes, rows.g * p.query_head_stride, rows.t0, rows.t0 + rows.count);
    }
    keys.load(k_tiles, 0, tile_begin * mass_tile, p.tokens);
    mass_async_commit();
  }

  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
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
    __syncthreads();  // Q and tile t are staged; every warp waited for its products of tile t − 1
    if (t + 1 < tile_end) {
      keys.load(k_tiles + static_cast<unsigned>((t + 1 - tile_begin) & 1) * tile_bytes, 0, (t + 1) * mass_tile,
                p.tokens);
      mass_async_commit();
    }
    const unsigned k_tile = k_tiles + static_cast<unsigned>((t - tile_begin) & 1) * tile_bytes;
    const std::int64_t j0 = t * mass_tile;
    const bool masked = j0 + mass_tile - 1 > first_position;
    wgmma_chunk_pipeline<chunks_max>(
        chunks, accumulator,
        [&](auto i, float(&d)[32]) { wgmma_tile_product_ss<T, HeadDim>(d, q_tiles + i * tile_bytes, k_tile); },
        [&](auto i, const float(&d)[32]) { update(i, d, j0, masked); });
  }

  // (max·c, Σ) per row, folded over the 4 threads of a row; the row's first thread writes.
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

/// Pass 2 (see the header). grid.x = units · key runs of p.column_tiles tiles; every
/// row chunk of the unit's group is resident (the host checks G · chunks ≤ the
/// chunks a block holds). Each (query head, key) mass is written once.
template <class T, int HeadDim>
__global__ void __launch_bounds__(mass_threads, 2)
    attention_column_mass_wgmma(const __grid_constant__ attention_mass_parameters<T, T> p) {
#if defined(__CUDA_ARCH__) && !KVTRIM_WGMMA_DEVICE_PASS
  __trap();  // not sm_90a code: the host never launches it (see wgmma.cuh)
#else
  constexpr int chunks_max = wgmma_mass_chunks<HeadDim>;
  constexpr int steps = HeadDim / 16;
  constexpr unsigned tile_bytes = swizzled_tile_bytes<HeadDim>;
  extern __shared__ __align__(1024) unsigned char wgmma_mass_shared[];
  unsigned char* aligned = wgmma_aligned_shared(wgmma_mass_shared);
  const unsigned q_tiles = shared_address(aligned);
  const unsigned k_tiles = q_tiles + chunks_max * tile_bytes;  // two stages
  // L of chunk i's row 8n + 2t + e at [i][t][n][e]: a thread's 16 rows are 64 contiguous bytes.
  float* row_lse = reinterpret_cast<float*>(aligned + (chunks_max + 2) * tile_bytes);

  const unsigned key_tiles = static_cast<unsigned>(mass_ceil_div(p.length, mass_tile));
  const unsigned runs = static_cast<unsigned>(mass_ceil_div(key_tiles, p.column_tiles));
  const unsigned unit = blockIdx.x / runs, run = blockIdx.x % runs;
  const std::int64_t b = unit / static_cast<unsigned>(p.kv_heads), h = unit % static_cast<unsigned>(p.kv_heads);
  const int chunks = static_cast<int>(p.group * p.chunks_per_head);
  const int chunks_per_head = static_cast<int>(p.chunks_per_head);  // ≤ chunks ≤ 8
  const std::int64_t tile_begin = std::int64_t{run} * p.column_tiles;
  const std::int64_t tile_end = mass_min(tile_begin + p.column_tiles, key_tiles);

  const swizzled_loader<T, HeadDim> queries(
      p.queries + b * p.query_batch_stride + h * p.group * p.query_head_stride, p.query_token_stride);
  for (int i = 0; i < chunks; ++i) {
    const row_chunk rows = chunk_rows(p, i);
    queries.load(q_tiles + i * tile_bytes, rows.g * p.query_head_stride, rows.t0, rows.t0 + rows.count);
  }
  const swizzled_loader<T, HeadDim> keys(p.keys + b * p.key_batch_stride + h * p.key_head_stride, p.key_token_stride);
  keys.load(k_tiles, 0, tile_begin * mass_tile, p.tokens);
  mass_async_commit();
  // Rows past a chunk's count get L = +∞: 2^(l·c − ∞) = 0, no test per logit.
  for (int x = static_cast<int>(threadIdx.x); x < chunks * mass_tile; x += mass_threads) {
    const int i = x / mass_tile, r = x % mass_tile;
    const float lse = r < chunk_rows(p, i).count ? p.lse[(std::int64_t{unit} * chunks + i) * mass_tile + r] : INFINITY;
    row_lse[i * mass_tile + ((r % 8) / 2) * 16 + (r / 8) * 2 + r % 2] = lse;
  }
  const std::int64_t first_position = p.tokens - p.observed + p.first;  // of the first chunk's first row

  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int quad_row = lane / 4, quad_column = 2 * (lane % 4);
  const float c = p.log2_scale;
  float accumulator[2][32];
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int e = 0; e < 32; ++e) accumulator[x][e] = 0.0f;
  float head_mass[2] = {0.0f, 0.0f};  // this thread's two keys, the current query head

  for (std::int64_t t = tile_begin; t < tile_end; ++t) {
    mass_async_wait<0>();
    fence_shared_for_wgmma();
    __syncthreads();  // Q, L and tile t are staged; every warp has read tile t − 1's stage
    if (t + 1 < tile_end) {
      keys.load(k_tiles + static_cast<unsigned>((t + 1 - tile_begin) & 1) * tile_bytes, 0, (t + 1) * mass_tile,
                p.tokens);
      mass_async_commit();
    }
    const unsigned k_tile = k_tiles + static_cast<unsigned>((t - tile_begin) & 1) * tile_bytes;
    unsigned held[steps][4];  // this warp's 16 keys of the tile: wgmma's A operand
#pragma unroll
    for (int s = 0; s < steps; ++s) load_swizzled_rows(held[s], k_tile, 16 * warp, s);
    const std::int64_t j0 = t * mass_tile;
    const std::int64_t key[2] = {j0 + 16 * warp + quad_row, j0 + 16 * warp + quad_row + 8};
    const bool masked = j0 + mass_tile - 1 > first_position;

    // Chunk i's terms Σ_r 2^(l·c − L_r) for this thread's two keys, into head_mass;
    // written when chunk i is its query head's last.
    const auto accumulate = [&](int i, const float (&d)[32]) {
      float lse[16];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float4 four = *reinterpret_cast<const float4*>(row_lse + i * mass_tile + (lane % 4) * 16 + 4 * x);
        lse[4 * x] = four.x, lse[4 * x + 1] = four.y, lse[4 * x + 2] = four.z, lse[4 * x + 3] = four.w;
      }
      const int chunk_in_head = i % chunks_per_head;
      const std::int64_t row0_position = p.tokens - p.observed + p.first + chunk_in_head * mass_tile;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float even = 0.0f, odd = 0.0f;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float term = mass_exp2(fmaf(d[4 * n + 2 * hh + e], c, -lse[2 * n + e]));
            if (masked && key[hh] > row0_position + 8 * n + quad_column + e) term = 0.0f;
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
    wgmma_chunk_pipeline<chunks_max>(
        chunks, accumulator,
        [&](auto i, float(&d)[32]) { wgmma_tile_product_rs<T, HeadDim>(d, held, q_tiles + i * tile_bytes); },
        [&](auto i, const float(&d)[32]) { accumulate(i, d); });
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

/// How many key tiles a pass-2 block takes: enough blocks to fill the GPU several
/// times over, then longer runs (each block loads the group's Q once).
inline std::int64_t wgmma_column_tiles(std::int64_t units, std::int64_t key_tiles) {
  const std::int64_t total = units * key_tiles;
  return std::max<std::int64_t>(1, total / wgmma_column_target_blocks);
}

}  // namespace kvtrim::cuda_detail

#endif  // KVTRIM_CUDA_WGMMA
