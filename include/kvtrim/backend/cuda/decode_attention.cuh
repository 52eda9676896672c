// kvtrim/backend/cuda/decode_attention.cuh — decode attention on the GPU: one
// new query per query head over a compressed cache of any layout (contiguous,
// paged, flat: decode_plan.cuh's row locators) with codec::fp16 / bf16 / fp32,
// int8 / int4 (KIVI), fp8_e4m3 and layered over those; codec::low_rank has its
// own kernel (codec_low_rank.cuh) with the same partition, bias and merge.
//
// Memory-bound by design: the cache is read exactly once per step.
//  * One kernel template over (layout addressing × head dim × group × storage
//    type): the layout enters only through head_rows(cache, head) (token → slot)
//    and its compensation token's logit bias; per-head lengths may all differ
//    (0 included: a head emptied by its budget reads nothing and outputs zeros).
//  * GQA: a block reads a head's K/V tiles once for all `Group` query heads.
//  * Balanced split-K (decode_plan.cuh): a fixed grid of one wave of blocks,
//    each reading the same number of tokens of the heads laid end to end; a
//    plan (a kernel, or up to 256 heads each block itself) scans device-side
//    lengths (paged, flat) so no host synchronisation is needed; partial
//    softmax states are merged after.
//  * K/V tiles stream into shared memory through a cp.async pipeline
//    (kv_tile_stream, shared by both kernels): several tiles in flight per
//    block without spending registers on them, which is what keeps HBM busy.
//    Whole stride-1 tiles of unpadded rows (the CUDA-core kernel) go by bulk
//    copies on sm_90, the K and the V tile an instruction each, waited for on
//    an mbarrier; the tensor-core kernel's 16-bit tiles (head dims 64, 128) sit
//    unpadded in 128-byte-swizzled panels, whole stride-1 tiles copied by 2-D
//    tensor maps (a copy per 64-channel panel) on the same barriers.
//  * CUDA cores (16-bit storage at groups 1, 2; fp32): `lanes_per_token = head_dim / 8`
//    lanes share a token row, each reading 8 elements from shared memory; the
//    Group dot products finish with one transposed shuffle reduction
//    (lane_group_sum). Tensor cores (16-bit storage, groups 4, 8, 16): mma.sync
//    m16n8k16 with the group's query heads as the 16 rows.
//  * Codecs (codec_tiles): the tiles hold rows as stored — plain elements, or a
//    quantizing codec's code bytes. int8 / int4 / fp8 codes go straight into
//    tensor-core mma fragments at every group (1–8 as the transposed product,
//    tokens as the mma rows; 16 with the heads as the rows), their steps
//    folded into the query and the weights (codec_fragments.cuh, staged with
//    the tiles as the pipeline's side data); layered codecs, KIVI runs shorter
//    than 16 slots and head_dim 256 are dequantized tile by tile into fp16 K/V
//    tiles that the mma loop reads as it reads 16-bit storage (groups ≥ 4), or,
//    at groups 1 and 2, on the CUDA cores: each lane dequantizes its 8 channels
//    in registers after the shared-memory stage (codec_device<C>::reader).
//  * Multi-query decode (speculative decoding, attend over [B, n, Hq, D], n ≤ 8):
//    the group's rows become Group × n query rows (row r: new token r / Group,
//    query head r % Group) sharing every K/V tile the block loads; query t sees
//    the head's first L − n + 1 + t tokens (logits past it are −∞). Always on
//    the tensor cores (16-bit storage; code bytes through dequantized fp16 tiles:
//    the fragment readers hold one query per row), one 16-row tile per warp:
//    Group × 8 rows need up to 8 row tiles, i.e. up to 8 warps, each warp then
//    reading more tokens of every tile (tensor_core_geometry). Not for fp32
//    storage, nor with the eviction metric (speculative queries may be rejected).
//  * Softmax is online (running max m, sum l, accumulator) in fp32, in base 2
//    with log2(e)/√D folded into the query; the compensation bias (natural log)
//    is added after the scale as the CPU does, times log2(e).
// Same math as the CPU reference (backend/cpu/decode_attention.hpp), which
// refuses empty heads (and heads shorter than n); here an empty head's output
// is 0, as is a query that sees no token (a paged / flat head shorter than n:
// the lengths live on the device, refusing would need a host sync).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>

#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime, see encode_kv_tile_maps)
#include <cudaTypedefs.h>

#include "kvtrim/backend/cuda/codec_fragments.cuh"
#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/decode_plan.cuh"
#include "kvtrim/backend/cuda/mma.cuh"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

namespace cuda_detail {

inline constexpr int decode_warps = 8;
inline constexpr int decode_threads = decode_warps * 32;
/// Tokens each lane group handles per tile.
inline constexpr int decode_unroll = 4;
/// Blocks of the CUDA-core decode kernel an SM must hold (its __launch_bounds__ minimum): 1, as
/// ever, lets ptxas take 178 registers at GQA 4 (one 256-thread block an SM); 2 caps them at 128
/// (two blocks, spills) — an experiment's switch for KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS = 4 (measured:
/// 301 µs at W against 370 with one block, both slower than the tensor-core kernel's 275).
#ifndef KVTRIM_CUDA_DECODE_CUDA_CORE_MIN_BLOCKS
#define KVTRIM_CUDA_DECODE_CUDA_CORE_MIN_BLOCKS 1
#endif

/// The tensor-core kernel's 16-bit K/V tiles (fp16 / bf16 storage, not code bytes) in unpadded,
/// 128-byte-swizzled shared memory (tensor_core_geometry::swizzled), whole stride-1 tiles copied by
/// tensor maps on sm_90 (kv_tile_stream::issue_mapped: one cp.async.bulk.tensor per 64-element
/// panel of the K and of the V tile instead of 16-byte cp.async chunks). 1: on; 0: today's padded
/// rows and cp.async (benchmarks compare the two); 2: the swizzled layout with cp.async only (no
/// tensor maps: the layout's share of a difference). Devices below compute capability 9.0, code
/// compiled below sm_90 and maps that fail to encode keep cp.async into the same layout. One value
/// per program: translation units built with different values give the same kernels different bodies.
#ifndef KVTRIM_CUDA_TENSOR_MAP_TILES
#define KVTRIM_CUDA_TENSOR_MAP_TILES 1
#endif
/// The L2 promotion of the tensor maps' copies (0, 64, 128 or 256 bytes): an experiment's knob.
#ifndef KVTRIM_CUDA_TENSOR_MAP_L2_PROMOTION
#define KVTRIM_CUDA_TENSOR_MAP_L2_PROMOTION 256
#endif

/// Tensor maps of a cache's K and V storage for the tensor-core kernel's whole tiles: each a 2-D
/// map over all the storage's rows (dim 0: head_dim elements, contiguous; dim 1: rows), boxes of
/// 64 × 64 elements (one panel of a swizzled tile), 128-byte swizzle. Built on the host per attend
/// call (encode_kv_tile_maps); `valid` 0: none (the kernel copies every tile by cp.async).
struct kv_tile_maps {
  CUtensorMap keys;
  CUtensorMap values;
  int valid;
};

/// A head's tokens [begin, end) as K/V tiles of TileTokens rows in a
/// `Stages`-deep ring of shared memory ([stage][keys, values][token][RowStride]),
/// filled by cp.async (BulkCopies: whole unpadded stride-1 tiles by bulk copies, see bulk_copies):
/// tile t + Stages − 1 is requested while tile t is read.
/// Rows past `end` are zero-filled. Every thread moves the same number of
/// 16-byte chunks; the slots of its rows of the next tile are resolved (for
/// paged caches: independent page-table loads, issued together) right after
/// the current tile's copies are issued, so their latency hides behind the
/// block's compute instead of delaying the next tile's copies. Affine rows
/// (contiguous, flat) resolve nothing ahead: whole stride-1 tiles are copied by
/// immediate offsets (issue_affine), other tiles resolve when issued. `Side`: per-tile
/// data a codec stages with the rows (codec_fragments.cuh: quantized_tile_side),
/// after the K/V tiles of each stage. `Swizzled` (16-bit rows, RowStride = HeadDim, a multiple
/// of 64): each K or V tile is HeadDim / 64 panels of [TileTokens rows][128 bytes], the 16-byte
/// chunk q of a panel's row r at r·128 + (q ⊕ r mod 8)·16 — the layout a tensor map's 128-byte
/// swizzle writes (PTX ISA, "Tensor-map swizzle modes": address bits [4:6] ⊕ bits [7:9] of a
/// 1024-byte aligned panel) — so that whole tiles can come by tensor-map copies (issue_mapped)
/// and every other copy writes the same layout; 8 rows at one logical chunk lie in 8 different
/// 16-byte bank groups, as the padding made them. The stages start at a 1024-byte boundary.
template <class StoreT, int HeadDim, int RowStride, int TileTokens, int Stages, int Threads, class Rows,
          class Side = no_tile_side, bool BulkCopies = false, bool Swizzled = false>
struct kv_tile_stream {
  static constexpr int chunk_elements = 16 / static_cast<int>(sizeof(StoreT));
  static constexpr int chunks_per_row = HeadDim / chunk_elements;
  static constexpr int chunks = TileTokens * chunks_per_row;
  // Fewer chunks than threads × k (short code rows, 256-thread multi-query blocks): the last threads copy fewer.
  static constexpr bool even = chunks % Threads == 0;
  static constexpr int chunks_per_thread = (chunks + Threads - 1) / Threads;
  static constexpr int tile_elements = TileTokens * RowStride;
  static constexpr std::size_t tiles_bytes = std::size_t{Stages} * 2 * tile_elements * sizeof(StoreT);
  static_assert(tiles_bytes % 16 == 0 && Side::bytes % 16 == 0, "kv_tile_stream: 16-byte aligned stages");
  /// Swizzled tiles: 64-element panels of TileTokens 128-byte rows.
  static constexpr int panels = Swizzled ? HeadDim / 64 : 1;
  static constexpr int panel_bytes = TileTokens * 128;
  static_assert(!Swizzled || (sizeof(StoreT) == 2 && RowStride == HeadDim && HeadDim % 64 == 0 && TileTokens % 8 == 0 &&
                              TileTokens <= 256 && Side::bytes == 0 && !BulkCopies),
                "kv_tile_stream: swizzled tiles are 16-bit rows of 64-element panels, at most 256 rows (a tensor "
                "map's box), without side data");
  /// Swizzled: slack for rounding the shared memory up to a 1024-byte boundary (the swizzle is a
  /// function of the address bits; dynamic shared memory is only 16-byte aligned).
  static constexpr std::size_t alignment_slack = Swizzled ? 1024 : 0;
  static constexpr std::size_t bytes = alignment_slack + tiles_bytes + Stages * Side::bytes;

  StoreT* tiles;
  const StoreT* keys;
  const StoreT* values;
  Rows rows;
  std::int64_t begin, end;
  int tile_count;
  Side side;
  std::int64_t source[chunks_per_thread];  // element offsets of the next tile's rows to issue (−1: past the end)
  const kv_tile_maps* maps;  // tensor maps of the storage (kernel parameters), null: none (see tensor_map_copies)

  /// `shared`: the stream's `bytes` of shared memory (Swizzled: rounded up to 1024 bytes here).
  __device__ __forceinline__ kv_tile_stream(void* shared, const StoreT* keys_, const StoreT* values_, Rows rows_,
                                            std::int64_t begin_, std::int64_t end_, Side side_ = {},
                                            const kv_tile_maps* maps_ = nullptr)
      : tiles(aligned_tiles(shared)), keys(keys_), values(values_), rows(rows_), begin(begin_), end(end_),
        tile_count(end_ > begin_ ? static_cast<int>((end_ - begin_ + TileTokens - 1) / TileTokens) : 0),
        side(side_), maps(tensor_map_copies ? maps_ : nullptr) {}

  __device__ __forceinline__ static StoreT* aligned_tiles(void* shared) {
    if constexpr (Swizzled) {
      const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
      return reinterpret_cast<StoreT*>(static_cast<unsigned char*>(shared) + ((1024u - address % 1024u) % 1024u));
    } else {
      return static_cast<StoreT*>(shared);
    }
  }
  /// Byte offset of (row, 16-byte chunk of the row) in a K or V tile: rows RowStride elements
  /// apart, or Swizzled, panel chunk / 8, its row `row`, chunk (chunk mod 8) ⊕ (row mod 8).
  __host__ __device__ static constexpr int tile_offset(int row, int chunk) {
    if constexpr (Swizzled)
      return (chunk / 8) * panel_bytes + row * 128 + (((chunk % 8) ^ (row % 8)) * 16);
    else
      return row * RowStride * static_cast<int>(sizeof(StoreT)) + chunk * 16;
  }

  /// The side data of `tile` (floats, after every stage's K/V tiles).
  __device__ __forceinline__ float* side_tile(int tile) const {
    return reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(tiles) + tiles_bytes +
                                    (tile % Stages) * Side::bytes);
  }

  __device__ __forceinline__ std::int64_t first_token(int tile) const { return begin + std::int64_t{tile} * TileTokens; }
  __device__ __forceinline__ const StoreT* key_tile(int tile) const {
    return tiles + (tile % Stages) * 2 * tile_elements;
  }
  __device__ __forceinline__ const StoreT* value_tile(int tile) const { return key_tile(tile) + tile_elements; }

  /// Resolves the slots of this thread's rows of `tile` (page-table loads, issued together and
  /// left in flight: the tile after the one just issued is resolved while the block computes).
  __device__ __forceinline__ void resolve(int tile) {
    const std::int64_t first = first_token(tile);
#pragma unroll
    for (int k = 0; k < chunks_per_thread; ++k) {
      const int chunk = threadIdx.x + k * Threads;
      const std::int64_t token = first + chunk / chunks_per_row;
      source[k] = (even || chunk < chunks) && token < end
                      ? rows.slot(token) * HeadDim + (chunk % chunks_per_row) * chunk_elements
                      : -1;
    }
    side.resolve(rows, first, end);
  }
  /// Affine rows (contiguous, flat: slot = base + token·stride) of stride 1, whole chunks per
  /// thread in every round of rows: a thread's chunks of a tile lie at fixed distances from its
  /// first one, in global and in shared memory alike, so a whole tile's copies are two addresses
  /// and immediate offsets. ncu at W (fp8, 2026-12-04): the generic path spends ~300 of ~830 warp
  /// instructions per tile on per-chunk slots, bounds, zero-fill sizes and both policy forms of
  /// every copy. Measured (docs/results.md, 2026-12-04): int8 / int4 KIVI decode 4–6 % faster,
  /// fp16 / fp8 unchanged (not issue-bound); the same whole-tile form for paged tiles (slots
  /// still resolved per row) made paged decode 1–5 % slower, so paged keeps the generic path.
  static constexpr bool affine_copies = requires { requires Rows::affine; } && even && Threads % chunks_per_row == 0;
  static constexpr int rows_per_round = Threads / chunks_per_row;  // rows one round of chunks covers

  /// Whole affine tiles of unpadded rows (RowStride = HeadDim: the CUDA-core kernel, fp16 / bf16 at
  /// groups 1–2, fp32, and the code tiles it dequantizes) by bulk copies (sm_90,
  /// KVTRIM_CUDA_BULK_COPIES): the K tile and the V tile are each one contiguous block in global and
  /// in shared memory, so a tile is two instructions of one thread and its bytes are counted on a
  /// transaction barrier per stage, not 2·chunks_per_thread cp.async a thread, and the L2 is asked
  /// for exactly the tile's bytes (the cp.async copies' .L2::256B prefetch asks for ~1.5× at W).
  /// Measured on the H200 (docs/results.md, 2026-12-05): fp16 at W's 32k tokens 3.6 % faster at GQA 2,
  /// 2.1 % at GQA 1 (1.3 % slower at GQA 1 over 4k tokens). Padded rows (the tensor-core kernels'
  /// 16-byte row padding that keeps ldmatrix free of bank conflicts) would need a copy per row:
  /// tried, 3.8 % slower for fp16 at GQA 4 and 45–59 % slower for the int8 / int4 / fp8 fragment
  /// tiles — the bulk-copy unit's rate in copies, not bytes, bounds 256- and 128-byte rows. Those
  /// stay on cp.async (a swizzled tensor map would be their bulk form), as do partial last tiles
  /// and paged rows.
  static constexpr bool packed_rows = RowStride == HeadDim;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr bool bulk_copies = false;
#else
  static constexpr bool bulk_copies = BulkCopies && KVTRIM_CUDA_BULK_COPIES != 0 && affine_copies && packed_rows &&
                                      tile_elements * sizeof(StoreT) % 16 == 0;
#endif
  static constexpr unsigned tile_bytes = static_cast<unsigned>(tile_elements * sizeof(StoreT));  // a K or V tile
  static_assert(!bulk_copies || 2 * std::size_t{tile_bytes} < (std::size_t{1} << 20),
                "kv_tile_stream: a tile's bytes within an mbarrier's transaction count");
  static_assert(!bulk_copies || Side::bytes == 0,
                "kv_tile_stream: bulk tiles skip the block barrier that cp.async side data needs");
  /// Whole affine stride-1 tiles of swizzled rows by tensor-map copies (sm_90,
  /// KVTRIM_CUDA_TENSOR_MAP_TILES = 1, and the kernel passed maps): the padded rows' bulk form.
  /// Per-row bulk copies of padded rows were 3.8 % slower for fp16 at GQA 4 (the bulk unit's rate
  /// in copies bounds 256-byte rows); a tensor map moves a 64-row × 128-byte panel a copy, 2·D/64
  /// copies a tile, into the swizzle that keeps ldmatrix free of bank conflicts without padding.
  /// The bytes complete on the stage's transaction barrier as bulk_copies' do. Code compiled
  /// below sm_90 never issues them (the maps are ignored: cp.async, same layout).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr bool tensor_map_copies = false;
#else
  static constexpr bool tensor_map_copies = Swizzled && KVTRIM_CUDA_TENSOR_MAP_TILES == 1 && affine_copies;
#endif
  static constexpr int mapped_copies = 2 * panels;  // one a panel of the K tile and of the V tile
  static_assert(!tensor_map_copies || (2 * std::size_t{tile_bytes} < (std::size_t{1} << 20) && mapped_copies <= 32),
                "kv_tile_stream: a tile's bytes within an mbarrier's transaction count, its copies within a warp");
  /// Whether tiles may complete on the stages' transaction barriers (the same for every thread).
  __device__ __forceinline__ bool barrier_copies() const {
    if constexpr (bulk_copies)
      return true;
    else if constexpr (tensor_map_copies)
      return maps != nullptr;
    else
      return false;
  }

  /// The transaction barrier of `stage` (static shared memory: the dynamic area is the tiles,
  /// and a kernel's merge reuses it).
  __device__ __forceinline__ static unsigned barrier_address(int stage) {
    __shared__ alignas(8) std::uint64_t barriers[Stages];
    return static_cast<unsigned>(__cvta_generic_to_shared(barriers + stage));
  }
  /// The copies of a whole stride-1 tile that complete on its stage's transaction barrier: thread 0
  /// arrives on the barrier with both tiles' bytes, then threads [0, Issuers) each run
  /// `copy(key_tile, barrier)` — key_tile the stage's K tile in shared memory (the V tile follows it).
  template <int Issuers, class Copy>
  __device__ __forceinline__ void issue_on_barrier(int tile, Copy copy) {
    if (threadIdx.x >= Issuers) return;
    const int stage = tile % Stages;
    const unsigned barrier = barrier_address(stage);
    if (threadIdx.x == 0) transaction_barrier_expect(barrier, 2 * tile_bytes);
    fence_shared_for_bulk_copies();
    copy(static_cast<unsigned>(__cvta_generic_to_shared(tiles)) + static_cast<unsigned>(stage * 2 * tile_bytes),
         barrier);
  }
  /// Bulk copies: thread 0 copies the K tile, then the V tile. One thread issues both: two lanes
  /// issuing one each were serialised by the compiler anyway (a uniform-datapath copy takes one
  /// lane's operands at a time; no speed change, H100 2026-12-05). racecheck reports write-write
  /// hazards at these copies with one issuer as with two — it does not order bulk copies by their
  /// mbarrier; builds without bulk copies report none (docs/device-testing.md).
  __device__ __forceinline__ void issue_bulk(int tile) {
    issue_on_barrier<1>(tile, [&](unsigned key_tile, unsigned barrier) {
      const std::int64_t offset = rows.slot(first_token(tile)) * HeadDim;
      copy_bulk(key_tile, keys + offset, tile_bytes, barrier);
      copy_bulk(key_tile + tile_bytes, values + offset, tile_bytes, barrier);
    });
  }
  /// Tensor-map copies: threads 0 … mapped_copies − 1 (of warp 0) copy a panel each — threads
  /// [0, panels) the K tile's, the rest the V tile's — at element coordinates (64·panel, first
  /// slot). The host encodes maps only where every slot fits the coordinates' 32 bits.
  __device__ __forceinline__ void issue_mapped(int tile) {
    issue_on_barrier<mapped_copies>(tile, [&](unsigned key_tile, unsigned barrier) {
      const int is_value = threadIdx.x >= panels ? 1 : 0, panel = threadIdx.x % panels;
      const void* map = is_value ? &maps->values : &maps->keys;
      const unsigned destination = key_tile + static_cast<unsigned>(is_value * tile_bytes + panel * panel_bytes);
      const int row = static_cast<int>(rows.slot(first_token(tile)));
      copy_tensor_2d(destination, map, panel * 64, row, barrier);
    });
  }

  /// Whether `tile` can be copied by issue_affine: stride-1 rows, every row of it before `end`.
  __device__ __forceinline__ bool affine_tile(int tile) const {
    if constexpr (affine_copies)
      return rows.stride == 1 && first_token(tile) + TileTokens <= end;
    else
      return false;
  }
  /// Swizzled: a thread's rows row0 + k·rows_per_round repeat their swizzle (row mod 8) every
  /// `swizzle_period` rounds, so a whole tile's copies take that many shared base addresses.
  static constexpr int swizzle_period = Swizzled ? 8 / std::gcd(rows_per_round, 8) : 1;
  /// The copies of a whole stride-1 tile: two global base addresses and swizzle_period shared ones,
  /// then every chunk at immediate offsets.
  __device__ __forceinline__ void issue_affine(int tile) {
    const int row = threadIdx.x / chunks_per_row, chunk = threadIdx.x % chunks_per_row;
    const std::int64_t offset = (rows.slot(first_token(tile)) + row) * HeadDim + chunk * chunk_elements;
    unsigned key_destination[swizzle_period];
    if constexpr (Swizzled) {
      const unsigned key_tile_address = static_cast<unsigned>(__cvta_generic_to_shared(tiles)) +
                                        static_cast<unsigned>((tile % Stages) * 2 * tile_elements * sizeof(StoreT));
#pragma unroll
      for (int j = 0; j < swizzle_period; ++j)
        key_destination[j] = key_tile_address + static_cast<unsigned>(tile_offset(row + j * rows_per_round, chunk));
    } else {
      key_destination[0] = static_cast<unsigned>(__cvta_generic_to_shared(
          tiles + (tile % Stages) * 2 * tile_elements + row * RowStride + chunk * chunk_elements));
    }
    const StoreT* key_source = keys + offset;
    const StoreT* value_source = values + offset;
    [&]<int... k>(std::integer_sequence<int, k...>) {
      constexpr long long global_step = std::int64_t{rows_per_round} * HeadDim * sizeof(StoreT);
      // Between rounds k and k + swizzle_period (same swizzle): their rows' distance in bytes.
      constexpr int shared_step = tile_offset(swizzle_period * rows_per_round, 0);
      constexpr int values_at = tile_elements * static_cast<int>(sizeof(StoreT));  // the value tile, in bytes
      static_assert(global_step % 16 == 0 && shared_step % 16 == 0 && values_at % 16 == 0 &&
                        values_at + (chunks_per_thread - 1) * std::int64_t{shared_step} < (std::int64_t{1} << 30) &&
                        (chunks_per_thread - 1) * global_step < (std::int64_t{1} << 30),
                    "kv_tile_stream: whole-tile copies at 16-byte aligned immediate offsets within PTX's range");
      (copy_async16_at<(k / swizzle_period) * shared_step, k * global_step>(key_destination[k % swizzle_period],
                                                                           key_source),
       ...);
      (copy_async16_at<values_at + (k / swizzle_period) * shared_step, k * global_step>(
           key_destination[k % swizzle_period], value_source),
       ...);
    }(std::make_integer_sequence<int, chunks_per_thread>{});
  }

  /// Issues the copies of `tile` (resolved before), then resolves the next one. Affine rows
  /// resolve nothing ahead: whole tiles need no slots, the last one resolves when issued.
  __device__ __forceinline__ void issue(int tile) {
    if constexpr (affine_copies) {
      if (affine_tile(tile)) {
        if constexpr (bulk_copies)
          issue_bulk(tile);
        else if (barrier_copies())
          issue_mapped(tile);
        else
          issue_affine(tile);
        side.resolve(rows, first_token(tile), end);
        side.issue(side_tile(tile));
        return;
      }
      resolve(tile);
    }
    StoreT* key_destination = tiles + (tile % Stages) * 2 * tile_elements;
    StoreT* value_destination = key_destination + tile_elements;
#pragma unroll
    for (int k = 0; k < chunks_per_thread; ++k) {
      const int chunk = threadIdx.x + k * Threads;
      if (!even && chunk >= chunks) continue;  // not a chunk of the tile
      int offset;  // in elements
      if constexpr (Swizzled)
        offset = static_cast<int>(static_cast<unsigned>(tile_offset(chunk / chunks_per_row, chunk % chunks_per_row)) /
                                  sizeof(StoreT));
      else
        offset = (chunk / chunks_per_row) * RowStride + (chunk % chunks_per_row) * chunk_elements;
      const bool valid = source[k] >= 0;
      copy_async16(key_destination + offset, keys + (valid ? source[k] : 0), valid ? 16 : 0);
      copy_async16(value_destination + offset, values + (valid ? source[k] : 0), valid ? 16 : 0);
    }
    side.issue(side_tile(tile));
    if (!affine_copies && tile + 1 < tile_count) resolve(tile + 1);
  }
  /// Requests the first Stages − 1 tiles (empty groups keep the group count uniform). Bulk copies:
  /// first the stages' transaction barriers, fresh for the segment (drain invalidates them), so a
  /// tile's phase parity is (tile / Stages) & 1.
  __device__ __forceinline__ void start() {
    if (barrier_copies()) {
      // Each thread's earlier generic-proxy writes to this shared memory (a previous segment's
      // cp.async tiles and zero-fill, the merge's stores), ordered before the async proxy's copies
      // into it by every writer, as for async-proxy reads of generic writes; the issuing threads
      // fence again before each copy (the stage's reads since).
      fence_shared_for_bulk_copies();
      if (threadIdx.x == 0) {
#pragma unroll
        for (int stage = 0; stage < Stages; ++stage) transaction_barrier_init(barrier_address(stage));
        transaction_barrier_init_fence();
      }
      __syncthreads();
    }
    if (!affine_copies && tile_count > 0) resolve(0);
#pragma unroll
    for (int tile = 0; tile < Stages - 1; ++tile) {
      if (tile < tile_count) issue(tile);
      copy_async_commit();
    }
  }
  /// Requests tile + Stages − 1, then waits until `tile` has landed for the whole block. A bulk
  /// tile is waited for on its barrier by every thread (which also makes its bytes visible to
  /// each), so without cp.async side data no block barrier is needed.
  __device__ __forceinline__ void wait(int tile) {
    if (tile + Stages - 1 < tile_count) issue(tile + Stages - 1);
    copy_async_commit();
    copy_async_wait<Stages - 1>();
    if (barrier_copies()) {
      if (affine_tile(tile)) {
        transaction_barrier_wait(barrier_address(tile % Stages), static_cast<unsigned>(tile / Stages) & 1u);
        if constexpr (Side::bytes == 0) return;
      }
    }
    __syncthreads();
  }
  /// After reading `tile`: its stage may be refilled.
  __device__ __forceinline__ void release() { __syncthreads(); }
  /// After the last tile: nothing in flight, the shared memory may be reused.
  __device__ __forceinline__ void drain() {
    copy_async_wait<0>();
    __syncthreads();
    if (barrier_copies()) {  // every bulk tile was waited for: the barriers are idle
      if (threadIdx.x == 0) {
#pragma unroll
        for (int stage = 0; stage < Stages; ++stage) transaction_barrier_invalidate(barrier_address(stage));
      }
    }
  }
};

/// The eviction metric's side output (backend/cuda/eviction.cuh finishes it):
/// every logit s_gi (base 2, after scale and bias) at logits[g·stride + x] with
/// x = prefix(head) + i the token's place on the partition's line (consecutive
/// tokens of a head are consecutive floats whatever the layout), and every
/// head's final log-sum-exp (base 2) at lse[head·Group + g], so that
/// p_gi = 2^(s_gi − lse_g) once the split-K merge has run. No K/V is read for it.
/// The logits are stored with an L2 evict_last policy: the finishing kernel reads
/// them back and discards the lines (discard.global.L2, where the logits are 128-byte
/// aligned), so those that stayed resident are never written back (at W most do not:
/// docs/results.md, issue 16).
struct decode_metric {
  float* logits = nullptr;  // [Group][stride], null: no metric
  float* lse = nullptr;     // [heads · Group]
  std::int64_t stride = 0;  // ≥ the line's length, a multiple of 32 (whole 128-byte lines per warp)
  bool keep_in_l2 = true;   // the evict_last store policy (false: plain stores; a benchmark's comparison)
};

/// How decode attention stages and reads a codec's rows: `stored` elements,
/// `row_elements` of them per row, and a per-head reader giving a lane the 8
/// channels first_dim.. of a staged row as floats. codec::plain: its rows as
/// they are.
template <class CodecT, int HeadDim>
struct codec_tiles {
  using stored = device_element_t<typename CodecT::element>;
  static constexpr int row_elements = HeadDim;
  using storage = typename CodecT::template storage<device_space>;
  __host__ __device__ static const stored* key_rows(const storage& store) { return reinterpret_cast<const stored*>(store.keys); }
  __host__ __device__ static const stored* value_rows(const storage& store) { return reinterpret_cast<const stored*>(store.values); }
  struct reader {
    template <class Rows>
    __device__ __forceinline__ void key(const stored* row, int first_dim, std::int64_t, const Rows&,
                                        float (&out)[8]) const {
      widen(*reinterpret_cast<const packed8<stored>*>(row + first_dim), out);
    }
    template <class Rows>
    __device__ __forceinline__ void value(const stored* row, int first_dim, std::int64_t, const Rows&,
                                          float (&out)[8]) const {
      widen(*reinterpret_cast<const packed8<stored>*>(row + first_dim), out);
    }
  };
  __device__ static reader open(const storage&, std::int64_t) { return {}; }
  /// Rows past the segment's end are zero-filled in the tiles: plain rows read them as zeros.
  static constexpr bool reads_padding = true;
};
/// Quantizing codecs: code bytes, read through codec_device<C>::reader (which
/// looks up steps by slot: rows past the segment's end are never read).
template <class CodecT, int HeadDim>
  requires device_encoded_codec<CodecT>
struct codec_tiles<CodecT, HeadDim> {
  using device = codec_device<CodecT>;
  using stored = typename device::stored;
  static constexpr int row_elements = device::template row_elements<HeadDim>;
  using storage = typename CodecT::template storage<device_space>;
  __host__ __device__ static const stored* key_rows(const storage& store) { return device::key_rows(store); }
  __host__ __device__ static const stored* value_rows(const storage& store) { return device::value_rows(store); }
  using reader = typename device::reader;
  __device__ static reader open(const storage& store, std::int64_t head) { return device::open(store, head); }
  static constexpr bool reads_padding = false;
};

template <class View, class Partition, class QueryT, class OutT>
struct decode_params {
  View cache;
  Partition partition;
  const QueryT* queries;
  std::int64_t query_batch_stride, query_head_stride;
  OutT* out;
  std::int64_t out_batch_stride, out_head_stride;
  float* partial_out;  // [(block + head) · Group + g][head_dim]   (heads read by several blocks)
  float* partial_lse;  // [(block + head) · Group + g], base 2
  float query_scale;   // log2(e) / √head_dim
  int page_shift;      // paged: log2(page_size) or −1
  decode_metric metric;  // eviction metric side output (null logits: none)
  int queries_per_sequence = 1;  // multi-query: n new tokens per sequence (query rows Group × n)
  std::int64_t query_token_stride = 0, out_token_stride = 0;  // between a sequence's new tokens
#if KVTRIM_CUDA_TENSOR_MAP_TILES == 1
  /// The tensor-core kernel's swizzled 16-bit tiles: tensor maps of the K/V storage (valid 0: none).
  /// Inside the __grid_constant__ parameter, so the copies read them where they are (64-byte aligned).
  /// Only in builds that use them: without, the parameter (and ptxas's allocation) is as before.
  kv_tile_maps tile_maps{};
#endif
};

/// Combines the block's partial softmax states of one segment (max, sum,
/// unnormalised output per part and query row, in shared memory: `Rows` rows a
/// part, Group of them at one query, else Group × params.queries_per_sequence in use) and
/// writes the output itself when the segment is the whole head, else the
/// segment's normalised partial output and log-sum-exp (base 2) for
/// merge_decode_partials. Row r is query token r / Group of head r % Group; a
/// row that saw no token (sum 0: multi-query over a head shorter than n) gets 0.
template <int HeadDim, int Group, int Parts, int Threads, class Params, int Rows = Group>
__device__ __forceinline__ void finish_segment(const Params& params, const float* shared_max, const float* shared_sum,
                                               const float* shared_accumulator, std::int64_t head, bool whole,
                                               std::int64_t partial_index) {
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();
  using out_type = std::remove_pointer_t<decltype(params.out)>;
  const std::int64_t b = head / params.cache.shape.kv_heads, h = head % params.cache.shape.kv_heads;
  const int rows = Rows == Group ? Group : Group * params.queries_per_sequence;
  for (int index = threadIdx.x; index < rows * HeadDim; index += Threads) {
    const int row = index / HeadDim;
    const int t = row / Group, g = row % Group;
    const int d = index % HeadDim;
    float block_max = negative_infinity;
#pragma unroll
    for (int part = 0; part < Parts; ++part) block_max = fmaxf(block_max, shared_max[part * Rows + row]);
    float sum = 0.0f, output = 0.0f;
    if (block_max != negative_infinity) {
#pragma unroll
      for (int part = 0; part < Parts; ++part) {
        const float part_max = shared_max[part * Rows + row];
        const float scale = part_max == negative_infinity ? 0.0f : exp2f(part_max - block_max);
        sum += scale * shared_sum[part * Rows + row];
        output += scale * shared_accumulator[(part * Rows + row) * HeadDim + d];
      }
    }
    if (whole) {
      params.out[b * params.out_batch_stride + t * params.out_token_stride + (h * Group + g) * params.out_head_stride +
                 d] = from_float<out_type>(sum > 0.0f ? output / sum : 0.0f);
      if (params.metric.logits != nullptr && d == 0)
        params.metric.lse[head * Group + g] = sum > 0.0f ? block_max + log2f(sum) : negative_infinity;
    } else {
      const std::int64_t partial = partial_index * rows + row;
      params.partial_out[partial * HeadDim + d] = sum > 0.0f ? output / sum : 0.0f;
      if (d == 0) params.partial_lse[partial] = sum > 0.0f ? block_max + log2f(sum) : negative_infinity;
    }
  }
}

// ---- CUDA-core kernel (groups 1 and 2 of 16-bit, layered or short-run storage; fp32) ----

/// Compile-time geometry of one CUDA-core decode block.
template <int HeadDim, class StoreT, int Group, int RowElements = HeadDim>
struct decode_geometry {
  static constexpr int lanes_per_token = HeadDim / 8;               // 8 elements per lane
  static constexpr int tokens_per_warp = 32 / lanes_per_token;
  static constexpr int token_groups = decode_warps * tokens_per_warp;
  static constexpr int tile_tokens = token_groups * decode_unroll;  // 32 KB of K+V per tile for 16-bit types
  /// Tiles in flight: 3 for 16-bit storage (96 KB: two blocks per SM), 2 for fp32,
  /// 4 for code bytes (8-bit: 64 KB at head_dim 128; int4 half that).
  static constexpr int stages = sizeof(StoreT) == 2 ? 3 : sizeof(StoreT) == 1 ? 4 : 2;
  /// Whole tiles by bulk copies (kv_tile_stream::bulk_copies): measured for this kernel only.
  template <class Rows>
  using stream = kv_tile_stream<StoreT, RowElements, RowElements, tile_tokens, stages, decode_threads, Rows,
                                no_tile_side, true>;
  static constexpr std::size_t pipeline_bytes = stream<strided_rows>::bytes;
  static constexpr std::size_t merge_bytes = std::size_t{token_groups} * Group * (HeadDim + 2) * sizeof(float);
  static constexpr std::size_t shared_bytes = pipeline_bytes > merge_bytes ? pipeline_bytes : merge_bytes;
};

/// One block: one range of the partition. Lane groups read their rows from the
/// stream's shared-memory tiles.
template <int HeadDim, int Group, class StoreT, class Params>
#if KVTRIM_CUDA_DECODE_CUDA_CORE_MIN_BLOCKS > 1
__global__ void __launch_bounds__(decode_threads, KVTRIM_CUDA_DECODE_CUDA_CORE_MIN_BLOCKS)
#else  // the bare bound: ptxas allocates differently with an explicit minimum of 1 (GQA 1, D 128: 106 registers, not 64)
__global__ void __launch_bounds__(decode_threads)
#endif
    decode_attention_cuda_core(const __grid_constant__ Params params) {
  wait_for_prerequisite_grid();  // paged / flat: the plan's partition (or the lengths, planned here)
  allow_dependent_grid();        // the merge's blocks may be scheduled; they wait for this grid
  const auto partition = block_planned_partition(params.partition, params.cache);
  using tiles = codec_tiles<typename decltype(Params::cache)::codec, HeadDim>;
  constexpr int row_elements = tiles::row_elements;
  using geometry = decode_geometry<HeadDim, StoreT, Group, row_elements>;
  constexpr int lanes_per_token = geometry::lanes_per_token;
  constexpr int token_groups = geometry::token_groups;
  static_assert(Group <= lanes_per_token, "CUDA-core decode: at most head_dim / 8 query heads per group");
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();

  extern __shared__ __align__(16) unsigned char shared_memory[];
  const auto& cache = params.cache;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int token_group = warp * geometry::tokens_per_warp + lane / lanes_per_token;
  const int first_dim = (lane % lanes_per_token) * 8;
  const StoreT* keys = tiles::key_rows(cache.storage);
  const StoreT* values = tiles::value_rows(cache.storage);

  for_each_segment(partition, [&](std::int64_t head, std::int64_t begin, std::int64_t end, bool whole,
                                  std::int64_t partial_index) {
    const auto rows = head_rows(cache, head, params.page_shift);
    typename geometry::template stream<std::remove_const_t<decltype(rows)>> stream(shared_memory, keys, values, rows,
                                                                                   begin, end);
    stream.start();
    const head_bias bias = compensation_of(cache, head);
    const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
    const typename tiles::reader reader = tiles::open(cache.storage, head);
    // The metric's logits go to the head's place on the line (eviction metric only).
    const std::int64_t metric_line = params.metric.logits != nullptr ? partition.prefix(head) : 0;
    const std::uint64_t metric_policy =
        params.metric.logits != nullptr && params.metric.keep_in_l2 ? metric_store_policy() : 0;

    float query[Group][8];
#pragma unroll
    for (int g = 0; g < Group; ++g) {
      const auto* row = params.queries + b * params.query_batch_stride + (h * Group + g) * params.query_head_stride;
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

    for (int tile = 0; tile < stream.tile_count; ++tile) {
      stream.wait(tile);
      const StoreT* key_tile = stream.key_tile(tile);
      const StoreT* value_tile = stream.value_tile(tile);
      const std::int64_t first_token = stream.first_token(tile);

      float score[Group][decode_unroll];
#pragma unroll
      for (int u = 0; u < decode_unroll; ++u) {
        const int row = u * token_groups + token_group;
        const std::int64_t token = first_token + row;
        float key_row[8] = {};
        if (tiles::reads_padding || token < end) reader.key(key_tile + row * row_elements, first_dim, token, rows, key_row);
        float dots[Group];
#pragma unroll
        for (int g = 0; g < Group; ++g) {
          dots[g] = 0.0f;
#pragma unroll
          for (int i = 0; i < 8; ++i) dots[g] = fmaf(query[g][i], key_row[i], dots[g]);
        }
        lane_group_sum<lanes_per_token>(dots);
        const float token_bias = bias.at(token);
#pragma unroll
        for (int g = 0; g < Group; ++g) score[g][u] = token < end ? dots[g] + token_bias : negative_infinity;
        if (params.metric.logits != nullptr && token < end) {  // lane g of the token's lane group writes s_g
#pragma unroll
          for (int g = 0; g < Group; ++g)
            if (lane % lanes_per_token == g)
              store_metric_logit(params.metric.logits + g * params.metric.stride + metric_line + token, score[g][u],
                                 params.metric.keep_in_l2, metric_policy);
        }
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
        const std::int64_t token = first_token + row;
        float value_row[8] = {};  // padding rows are zero-filled (plain) or not read (codecs)
        if (tiles::reads_padding || token < end)
          reader.value(value_tile + row * row_elements, first_dim, token, rows, value_row);
#pragma unroll
        for (int g = 0; g < Group; ++g)
#pragma unroll
          for (int i = 0; i < 8; ++i) accumulator[g][i] = fmaf(weight[g][u], value_row[i], accumulator[g][i]);
      }
      stream.release();
    }
    stream.drain();

    // Merge the token groups' partial states through (reused) shared memory.
    auto* shared_max = reinterpret_cast<float*>(shared_memory);   // [token_groups][Group]
    auto* shared_sum = shared_max + token_groups * Group;          // [token_groups][Group]
    auto* shared_accumulator = shared_sum + token_groups * Group;  // [token_groups][Group][HeadDim]
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
    finish_segment<HeadDim, Group, token_groups, decode_threads>(params, shared_max, shared_sum, shared_accumulator,
                                                                 head, whole, partial_index);
    __syncthreads();  // the next segment's tiles overwrite this merge area
  });
}

// ---- tensor-core kernel (16-bit storage at groups 4, 8, 16; code fragments at every group) ----
//
// At G ≥ 4 the CUDA-core kernel spends 2·G fp32 FMAs per cached element and
// can no longer keep up with HBM (half the copy bandwidth at G = 8). Here the
// products run on the tensor cores (mma.sync m16n8k16, fp32 accumulate), as in
// FlashAttention-2: S = Q·Kᵀ with the group's query heads as the 16 rows (rows
// ≥ G are zero padding; G = 16 fills all of them, as a[1]/a[3] and c[2]/c[3]:
// rows 8..15), then O += P·V with P taken straight from S's accumulator layout.
// Each warp owns 16 tokens of every tile. K/V rows are padded by 16 bytes in
// shared memory so the 8 rows an ldmatrix reads fall in distinct banks. The
// attention weights P are rounded to the storage type (fp16/bf16) for the P·V
// product — FlashAttention's choice; the softmax itself stays in fp32.
// Quantizing codecs (1-byte code tiles), Fragments: the codes become mma
// operands in registers (codec_fragments.cuh); at groups 1–8 the products are
// transposed — Sᵀ = K·Qᵀ, Oᵀ = Vᵀ·Pᵀ, tokens as the 16 rows and the heads as the
// 8 columns, Pᵀ by movmatrix — so no rows are padding. Otherwise, after a tile lands,
// the block dequantizes it through the codec's reader into one fp16 K/V tile
// (rounding each dequantized element to fp16 once), and the same mma loop reads that.

/// The blocks an SM a tensor-core decode kernel is built for: its launch bound (registers ≤ 65536 / (128 ·
/// blocks): 168 at three) and its stage budget (shared memory per block: 108 KB at two, 72 KB at three;
/// head dim 128 takes two stages whatever the budget, tensor_core_geometry::stages). Three for int4 code
/// fragments at groups ≤ 4 (KIVI and zero points, every layout): 9–10 % faster at W's 32k tokens, GQA 1, 2
/// and 4, H100, 2026-12-05 (docs/results.md), despite 80 bytes of spills at GQA 2–4. Two for the rest — one
/// block's prologue, segment switch and epilogue then overlap the other's streaming. Where three paid at 32k
/// they cost at 4k (H100, batch 8, 8 kv heads, contiguous, 2026-12-07): head dim 64 int8 −15 / −12 % at 32k
/// (GQA 4 / 8) but +11 / +15 % at 4k, int4 at GQA 8 −14 % / +17 % (head dim 64) and −2 % / +33 % (128) — a
/// choice by length the launch does not make yet (docs/results.md); fp8 at head dim 64 −3 % / 0, at 128 +1.6
/// to +2.5 % at 32k; int8 at 128 spills; fp16 contiguous or flat no faster, and paged / shared_paged fp16
/// 0.6 % faster at 32k but 2–5 % slower at 4k–8k (−8 % at 32k in an H200 build that set every kernel to
/// three, not re-measured there). Head dim 256 (one block an SM by its shared memory: 200 KB of stages) and
/// multi-query (256-thread blocks) keep their bare bound. KVTRIM_CUDA_DECODE_TC_BLOCKS (an experiment's
/// knob) sets every kernel at head dims ≤ 128 and one query to 2 or 3, so that a benchmark can compare.
template <class View, class StoreT, int HeadDim, int Group, bool Fragments, int Queries>
constexpr int tensor_core_blocks() {
  if constexpr (HeadDim > 128 || Queries > 1) {
    return 1;
  } else {
#if defined(KVTRIM_CUDA_DECODE_TC_BLOCKS)
    static_assert(KVTRIM_CUDA_DECODE_TC_BLOCKS == 2 || KVTRIM_CUDA_DECODE_TC_BLOCKS == 3,
                  "KVTRIM_CUDA_DECODE_TC_BLOCKS: 2 or 3 blocks an SM");
    return KVTRIM_CUDA_DECODE_TC_BLOCKS;
#else
    return Fragments && std::is_same_v<typename View::codec, codec::quantized<4>> && Group <= 4 ? 3 : 2;
#endif
  }
}

/// `Blocks`: tensor_core_blocks of the kernel (no default: the host's launch and the kernel must
/// size the stages alike).
template <int HeadDim, class StoreT, int Group, int RowElements, bool Fragments, class Side, int Queries, int Blocks>
struct tensor_core_geometry {
  /// Query rows: the group's heads at each of up to `Queries` new tokens, in 16-row mma tiles.
  static constexpr int rows = Group * Queries;
  static constexpr int row_tiles = (rows + 15) / 16;
  /// Four warps of 16 tokens: 64-token tiles, small enough that two blocks fit
  /// on a multiprocessor at head dims ≤ 128 — one block's prologue, segment
  /// switch and epilogue then overlap the other's streaming. Several row tiles
  /// (multi-query): a warp per row tile and token group, max(4, row tiles)
  /// warps, each reading 16 · row tiles · 4 / warps tokens of every tile.
  static constexpr int warps = row_tiles > 4 ? row_tiles : 4;
  static constexpr int token_groups = warps / row_tiles;        // warps sharing a row tile
  static constexpr int blocks_per_warp = 4 / token_groups;      // 16-token blocks a warp reads per tile
  /// Code fragments: each warp merges two 16-token blocks into one softmax step (128-token
  /// tiles). Their per-block work — the KIVI query scaling (once per run of 32 slots), the
  /// masks, the running max's shuffles and the output's rescale — is what bounded them (ncu:
  /// ~940 instructions per 16 tokens for int8 against ~510 for fp8 at W, issue-bound at two
  /// warps per scheduler), and it is paid once per 32 tokens.
  static constexpr int sub_blocks = Fragments ? 2 : 1;
  static constexpr int threads = warps * 32;
  static constexpr int tile_tokens = 64 * sub_blocks;
  static constexpr int row_stride = HeadDim + 8;  // elements of the mma tiles; +16 bytes per row
  static constexpr int tile_elements = tile_tokens * row_stride;
  /// Code bytes (quantizing codecs) are staged as stored, RowElements bytes a row, and either
  /// read straight into fragments (Fragments: codec_fragments.cuh; rows padded by 16 bytes so
  /// the lanes' 16-byte reads of 8 rows fall in distinct banks, Side staged with them) or
  /// dequantized tile by tile into one fp16 K/V tile the mma reads (dequant_bytes, after the ring).
  static constexpr bool dequantizes = sizeof(StoreT) == 1 && !Fragments;
  /// 16-bit storage (fp16 / bf16 rows as stored, at every group and query count) at head dims 64 and
  /// 128: unpadded rows in 128-byte-swizzled panels (kv_tile_stream's Swizzled layout; whole affine
  /// tiles by tensor maps on sm_90), unless KVTRIM_CUDA_TENSOR_MAP_TILES = 0. Code bytes (fragments,
  /// dequantized tiles) keep their padded rows, and so does head dim 256: its kernels sit at 255
  /// registers, and swizzled tiles made ptxas spill at GQA 4 (104 bytes, none padded) — three
  /// stages of swizzled 256-channel tiles would fit its 200 KB.
  static constexpr bool swizzled = KVTRIM_CUDA_TENSOR_MAP_TILES != 0 && sizeof(StoreT) == 2 && !Fragments &&
                                   RowElements == HeadDim && (HeadDim == 64 || HeadDim == 128);
  static constexpr int stream_row_stride =
      Fragments ? RowElements + 16 : dequantizes ? RowElements : swizzled ? HeadDim : row_stride;
  static constexpr std::size_t dequant_bytes = dequantizes ? std::size_t{2} * tile_elements * 2 : 0;
  static constexpr std::size_t stage_bytes =
      std::size_t{2} * tile_tokens * stream_row_stride * sizeof(StoreT) + Side::bytes;
  /// Head dim 128 with tiles read as stored (16-bit rows, code fragments): two stages — one tile in flight
  /// while one is read, 31–47 KB a stage. Three (fp16, fp8; int4 at groups 8 and 16) were nowhere clearly
  /// faster and up to 2.5 % slower — H100s, 2026-12-07, three machines (docs/results.md): paged /
  /// shared_paged 16 at W 4k −1.5 to −2.5 %, contiguous 4k −0.4 to −1.2 %, fp8 −0.4 to −2.6 %, the 32k rows
  /// −0.6 to +0.35 % (flat), multi-query −0.1 to −0.9 %; pages of 64 at 32k −0.1 and −0.25 % on two machines,
  /// +1.3 % on the third (main itself 371–375 µs there). The grid and occupancy did not change (ncu: two
  /// blocks an SM, bound by registers either way). int8, and int4 at groups ≤ 4, had two already (their KIVI
  /// side data); int4 at groups 8 and 16 was not measured at either. Elsewhere as many stages as fit in
  /// 108 KB of shared memory (two blocks per SM; 72 KB for three) at head dims ≤ 128, 200 KB at 256 (one
  /// block), between 2 and 4 (6 for code fragments): head dim 64's tiles are half the bytes, and two of them
  /// cost it 12 % (W 4k, 33.2 → 37.2 µs); dequantized tiles were not measured at two. Swizzled tiles set 1 KB
  /// of the budget aside for aligning the stages (D 64: 4).
  static constexpr std::size_t shared_budget = HeadDim > 128 ? 204800 : Blocks >= 3 ? 73728 : 110592;
  static constexpr std::size_t alignment_slack = swizzled ? 1024 : 0;
  static constexpr int stages =
      HeadDim == 128 && !dequantizes
          ? 2
          : static_cast<int>(std::clamp<std::size_t>((shared_budget - dequant_bytes - alignment_slack) / stage_bytes,
                                                      2, Fragments ? 6 : 4));
  template <class Rows>
  using stream = kv_tile_stream<StoreT, RowElements, stream_row_stride, tile_tokens, stages, threads, Rows, Side,
                                false, swizzled>;
  static constexpr std::size_t pipeline_bytes = stream<strided_rows>::bytes + dequant_bytes;
  static constexpr std::size_t merge_bytes = std::size_t{token_groups} * rows * (HeadDim + 2) * sizeof(float);
  static constexpr std::size_t shared_bytes = pipeline_bytes > merge_bytes ? pipeline_bytes : merge_bytes;
  static_assert(rows <= 16 * row_tiles && token_groups * row_tiles == warps && blocks_per_warp * token_groups == 4,
                "tensor-core decode: row tiles 1, 2, 4 or 8");
};

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

/// Quantizing codecs on the tensor cores: the block dequantizes a staged tile of
/// code rows (RowElements bytes each) into fp16 K and V tiles of `row_stride`
/// halves a row, 8 channels per thread and step, through the codec's reader
/// (rows past `end` become zeros: their scores are masked), then synchronises.
template <int HeadDim, int RowElements, int TileTokens, int Threads, class Reader, class Rows>
__device__ __forceinline__ void dequantize_tile(const Reader& reader, const Rows& rows, const std::uint8_t* key_codes,
                                                const std::uint8_t* value_codes, std::int64_t first_token,
                                                std::int64_t end, __half* keys, __half* values, int row_stride) {
  constexpr int chunks_per_row = HeadDim / 8;
  // Unrolled so that several chunks' step loads are in flight together.
#pragma unroll 4
  for (int chunk = threadIdx.x; chunk < TileTokens * chunks_per_row; chunk += Threads) {
    const int row = chunk / chunks_per_row, first_dim = (chunk % chunks_per_row) * 8;
    const std::int64_t token = first_token + row;
    float key[8] = {}, value[8] = {};
    if (token < end) {
      reader.key(key_codes + row * RowElements, first_dim, token, rows, key);
      reader.value(value_codes + row * RowElements, first_dim, token, rows, value);
    }
    uint4 key_out, value_out;
    auto* key_pairs = reinterpret_cast<__half2*>(&key_out);
    auto* value_pairs = reinterpret_cast<__half2*>(&value_out);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      key_pairs[i] = __floats2half2_rn(key[2 * i], key[2 * i + 1]);
      value_pairs[i] = __floats2half2_rn(value[2 * i], value[2 * i + 1]);
    }
    *reinterpret_cast<uint4*>(keys + row * row_stride + first_dim) = key_out;
    *reinterpret_cast<uint4*>(values + row * row_stride + first_dim) = value_out;
  }
  __syncthreads();
}

/// The tile a fragment decoder's side data is laid out for (0: it stages none).
template <class Decoder>
constexpr int staged_tile_tokens() {
  if constexpr (requires { Decoder::tile_tokens; })
    return Decoder::tile_tokens;
  else
    return 0;
}

/// The per-tile side data the tensor-core kernel stages for a codec (code fragments only).
template <class CodecT, int HeadDim, int Group, bool Fragments>
struct tensor_core_side {
  using type = no_tile_side;
};
template <class CodecT, int HeadDim, int Group>
struct tensor_core_side<CodecT, HeadDim, Group, true> {
  using type = typename fragment_decoder<CodecT, HeadDim, Group>::template side<4 * 32>;
};

/// Fragments: quantized codes read straight into the mma operands (codec_fragments.cuh's
/// fragment_decoder: scales folded into the query and the weights, tiles starting at a
/// multiple of a warp's 32-token step, up to 31 tokens before a segment read and masked); otherwise 16-bit storage through ldmatrix, or code tiles
/// dequantized to fp16 tiles first (layered codecs, KIVI runs shorter than 16 slots, head_dim 256).
/// Queries > 1: multi-query decode, up to Queries new tokens per sequence (params.queries_per_sequence of them).
/// Blocks an SM: tensor_core_blocks (its launch bound and stage budget; ptxas spilled 364–700
/// bytes at D 256 with three).
template <int HeadDim, int Group, class StoreT, class Params, bool Fragments = false, int Queries = 1>
__global__ void __launch_bounds__(
    tensor_core_geometry<HeadDim, StoreT, Group, HeadDim, false, no_tile_side, Queries, 2>::threads,  // any Blocks
    tensor_core_blocks<std::remove_const_t<decltype(Params::cache)>, StoreT, HeadDim, Group, Fragments, Queries>())
    decode_attention_tensor_core(const __grid_constant__ Params params) {
  wait_for_prerequisite_grid();  // paged / flat: the plan's partition (or the lengths, planned here)
  allow_dependent_grid();        // the merge's blocks may be scheduled; they wait for this grid
  const auto partition = block_planned_partition(params.partition, params.cache);
  using codec_type = typename decltype(Params::cache)::codec;
  using tiles = codec_tiles<codec_type, HeadDim>;
  using decoder = fragment_decoder<codec_type, HeadDim, Group>;
  using side_type = typename tensor_core_side<codec_type, HeadDim, Group, Fragments>::type;
  using geometry = tensor_core_geometry<HeadDim, StoreT, Group, tiles::row_elements, Fragments, side_type, Queries,
                                        tensor_core_blocks<std::remove_const_t<decltype(Params::cache)>, StoreT, HeadDim,
                                                           Group, Fragments, Queries>()>;
  static_assert(!Fragments || decoder::supported, "tensor-core decode: no fragment decoder for this codec");
  static_assert(!Fragments || Queries == 1, "tensor-core decode: the fragment decoders hold one query per row");
  // 16-bit storage as stored, or code bytes as fp16 (dequantized tiles or fragments).
  using mma_type = std::conditional_t<sizeof(StoreT) == 1, __half, StoreT>;
  static_assert(sizeof(mma_type) == 2 && Group <= 16, "tensor-core decode: 16-bit operands, groups of at most 16");
  constexpr int query_rows = geometry::rows;      // Group × Queries
  constexpr int row_blocks = query_rows > 8 ? 2 : 1;  // accumulator rows head_row and head_row + 8
  constexpr int row_stride = geometry::row_stride;
  constexpr int code_stride = geometry::stream_row_stride;  // Fragments: bytes between staged code rows
  constexpr int k_steps = HeadDim / 16;
  constexpr int output_tiles = HeadDim / 8;
  constexpr int sub_blocks = geometry::sub_blocks;  // 16-token blocks a warp merges into one softmax step
  // Code fragments at groups ≤ 8: the transposed products (tokens as mma rows, heads as columns).
  constexpr bool transposed = Fragments && Group <= 8 && Queries == 1;
  constexpr int output_registers = transposed ? output_tiles / 2 : output_tiles;  // 16 × 8 accumulator tiles
  constexpr int lane_heads = transposed ? 2 : row_blocks;  // softmax states a lane keeps: heads 2t, 2t + 1 or rows
  static_assert(!Fragments || staged_tile_tokens<decoder>() == 0 || staged_tile_tokens<decoder>() == geometry::tile_tokens,
                "tensor-core decode: the fragment decoder's staged side data is laid out for the geometry's tiles");
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();

  extern __shared__ __align__(16) unsigned char shared_memory[];
  const auto& cache = params.cache;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const int head_row = lane / 4;  // this lane's accumulator rows: query heads head_row (+ 8) of the group when < G
  // Multi-query: the warp's 16-row tile (rows first_row + head_row (+ 8)) and its share of every tile's tokens.
  const int first_row = Queries == 1 ? 0 : (warp / geometry::token_groups) * 16;
  const int token_group = Queries == 1 ? warp : warp % geometry::token_groups;
  const int active_rows = Queries == 1 ? Group : Group * params.queries_per_sequence;
  // Rows past Group × n: the warp only helps stream the tiles.
  const bool warp_active = Queries == 1 || first_row < active_rows;
  const StoreT* keys = tiles::key_rows(cache.storage);
  const StoreT* values = tiles::value_rows(cache.storage);
  auto* dequantized = reinterpret_cast<__half*>(shared_memory + (geometry::pipeline_bytes - geometry::dequant_bytes));
  // Tensor maps of the K/V storage (whole swizzled tiles on sm_90; the stream ignores them elsewhere).
  const kv_tile_maps* tile_maps = nullptr;
  if constexpr (geometry::swizzled && KVTRIM_CUDA_TENSOR_MAP_TILES == 1) {
    if (params.tile_maps.valid != 0) {
      tile_maps = &params.tile_maps;
      if (threadIdx.x == 0) {
        prefetch_tensor_map(&tile_maps->keys);
        prefetch_tensor_map(&tile_maps->values);
      }
    }
  }
  // Swizzled tiles: a lane's ldmatrix row address. K (k-step s, not transposed): matrices 0–3 are
  // (tokens 0–7, chunk 2s), (0–7, 2s + 1), (8–15, 2s), (8–15, 2s + 1) of the warp's 16 tokens; V
  // (channel pair p, transposed): (0–7, 2p), (8–15, 2p), (0–7, 2p + 1), (8–15, 2p + 1); lanes
  // 8m … 8m + 7 address the rows of matrix m, as the padded addresses below. Chunk c of row r lies in
  // panel c / 8 at r·128 + ((c mod 8) ⊕ (r mod 8))·16; the warp's tokens start at a multiple of 16,
  // so r mod 8 = lane mod 8 and (c mod 8) ⊕ (r mod 8) = 2·(s mod 4) ⊕ a per-lane term. The tiles are
  // 1024-byte aligned, so bits 4–6 of a row's address at the per-lane term are that term alone and
  // step s's address is it ⊕ 32·(s mod 4) plus the panel: one base a tile and an XOR a k-step
  // (ptxas held the four per-lane offsets 2·(s mod 4) ⊕ term as loop invariants: 4 more registers each).
  constexpr int panel_bytes = geometry::tile_tokens * 128;
  const int key_lane_bytes = ((lane % 8) + (lane / 16) * 8) * 128 + ((((lane / 8) % 2) ^ (lane % 8)) * 16);
  const int value_lane_bytes = ((lane % 8) + ((lane / 8) % 2) * 8) * 128 + (((lane / 16) ^ (lane % 8)) * 16);
  [[maybe_unused]] const auto swizzled_key_row = [&](const StoreT* key_tile, int warp_token, int step) {
    const unsigned row = static_cast<unsigned>(__cvta_generic_to_shared(key_tile)) +
                         static_cast<unsigned>(warp_token * 128 + key_lane_bytes);
    return (row ^ static_cast<unsigned>(32 * (step % 4))) + static_cast<unsigned>((step / 4) * panel_bytes);
  };
  [[maybe_unused]] const auto swizzled_value_row = [&](const StoreT* value_tile, int warp_token, int pair) {
    const unsigned row = static_cast<unsigned>(__cvta_generic_to_shared(value_tile)) +
                         static_cast<unsigned>(warp_token * 128 + value_lane_bytes);
    return (row ^ static_cast<unsigned>(32 * (pair % 4))) + static_cast<unsigned>((pair / 4) * panel_bytes);
  };

  for_each_segment(partition, [&](std::int64_t head, std::int64_t begin, std::int64_t end, bool whole,
                                  std::int64_t partial_index) {
    const auto rows = head_rows(cache, head, params.page_shift);
    const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
    // Fragments: tiles start at a multiple of a warp's step (16 · sub_blocks tokens), so that a
    // warp's 16-token blocks are whole KIVI runs and, for runs of 32 or more, both blocks of a step
    // are one run (its query is scaled once: ncu at W saw 44 % of steps scaling twice with tiles
    // at multiples of 16 — a partition cut at 16 mod 32); the tokens before `begin` are read and masked.
    const std::int64_t first = Fragments ? begin & ~std::int64_t{16 * geometry::sub_blocks - 1} : begin;
    side_type side{};
    [[maybe_unused]] decoder fragments;
    [[maybe_unused]] std::int64_t head_length = 0;
    if constexpr (Fragments) {
      head_length = partition.prefix(head + 1) - partition.prefix(head);
      side = decoder::template make_side<geometry::threads>(cache.storage, head, head_length);
    }
    typename geometry::template stream<std::remove_const_t<decltype(rows)>> stream(shared_memory, keys, values, rows,
                                                                                   first, end, side, tile_maps);
    stream.start();
    // The decoder's query (and the head's scales) after the first tiles are requested: its loads and
    // reductions then wait under the tiles' flight instead of before it (one HBM round trip less
    // ahead of a segment's first bytes; H100, W 32k, three rounds: fp8 194.1 -> 192.3 µs, int4
    // 168.8 -> 167.6, int8 208.7 -> 209.3, docs/results.md 2026-12-07).
    if constexpr (Fragments)
      fragments.open(cache.storage, head, head_length,
                     params.queries + b * params.query_batch_stride + h * Group * params.query_head_stride,
                     params.query_head_stride, params.query_scale, lane);
    const head_bias bias = compensation_of(cache, head);
    const typename tiles::reader reader = tiles::open(cache.storage, head);
    // The metric's logits go to the head's place on the line (eviction metric only).
    const std::int64_t metric_line = params.metric.logits != nullptr ? partition.prefix(head) : 0;
    const std::uint64_t metric_policy =
        params.metric.logits != nullptr && params.metric.keep_in_l2 ? metric_store_policy() : 0;

    // Q as the A operand: query_fragment[step][rb][half] = dims step·16 + half·8 + 2·quad (+1) of row head_row + 8·rb.
    unsigned query_fragment[k_steps][row_blocks][2];
    if constexpr (!Fragments) {
#pragma unroll
      for (int step = 0; step < k_steps; ++step)
#pragma unroll
        for (int rb = 0; rb < row_blocks; ++rb)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float first_value = 0.0f, second_value = 0.0f;
            const int row = first_row + head_row + 8 * rb;  // query token row / Group, head row % Group
            if (row < active_rows) {
              const auto* q = params.queries + b * params.query_batch_stride +
                              (row / Group) * params.query_token_stride +
                              (h * Group + row % Group) * params.query_head_stride;
              const int dim = step * 16 + half * 8 + 2 * quad;
              first_value = to_float(q[dim]);
              second_value = to_float(q[dim + 1]);
            }
            query_fragment[step][rb][half] = pack2<mma_type>(first_value, second_value);
          }
    }

    // Row form: [0..1] row head_row, [2..3] row head_row + 8. Transposed: Oᵀ tile m, [2r + e] the channel
    // of row-form output tile 2m + r for query head 2t + e.
    float output[output_registers][4];
#pragma unroll
    for (int tile = 0; tile < output_registers; ++tile)
#pragma unroll
      for (int i = 0; i < 4; ++i) output[tile][i] = 0.0f;
    // Max identical across the lanes sharing the row (the quad; transposed, the column); sum: this lane's tokens.
    float running_max[lane_heads], running_sum[lane_heads];
#pragma unroll
    for (int rb = 0; rb < lane_heads; ++rb) running_max[rb] = negative_infinity, running_sum[rb] = 0.0f;
    // Multi-query: row r (new token t = r / Group) sees the head's tokens [0, L − n + 1 + t); rows past Group × n none.
    [[maybe_unused]] std::int64_t visible[row_blocks];
    if constexpr (Queries > 1) {
      const std::int64_t length = partition.prefix(head + 1) - partition.prefix(head);
#pragma unroll
      for (int rb = 0; rb < row_blocks; ++rb) {
        const int row = first_row + head_row + 8 * rb;
        visible[rb] = row < active_rows ? length - params.queries_per_sequence + 1 + row / Group : 0;
      }
    }

    for (int tile = 0; tile < stream.tile_count; ++tile) {
      stream.wait(tile);
      // Code tiles without fragment readers: the whole block dequantizes the tile once, for every warp's rows.
      if constexpr (geometry::dequantizes)
        dequantize_tile<HeadDim, tiles::row_elements, geometry::tile_tokens, geometry::threads>(
            reader, rows, stream.key_tile(tile), stream.value_tile(tile), stream.first_token(tile), end, dequantized,
            dequantized + geometry::tile_elements, row_stride);
      else
        (void)reader;
      // Each warp reads blocks_per_warp 16-token blocks of the tile (one at a single query).
#pragma unroll
      for (int warp_block = 0; warp_block < (warp_active ? geometry::blocks_per_warp : 0); ++warp_block) {
        if constexpr (transposed) {
          // Sᵀ = K·Qᵀ and Oᵀ = Vᵀ·Pᵀ: the warp's tokens as the 16 mma rows, the group's heads as the 8
          // columns — half the mma of the row form below and no padding rows in its operands (ncu, int8
          // at W: 107 register moves a 32-token step re-zeroed them). A lane holds tokens g and g + 8 of
          // each 16-token block (g = head_row) for query heads 2t and 2t + 1 (t = quad; column e = i % 2).
          const int warp_token = (token_group * geometry::blocks_per_warp + warp_block) * 16 * sub_blocks;
          const std::int64_t first_token = stream.first_token(tile) + warp_token;
          const float* side_tile = stream.side_tile(tile);
          // logit[sb][i]: token sb·16 + (i / 2)·8 + g of the warp's, head 2t + i % 2 (base 2, unmasked).
          float logit[sub_blocks][4];
          unsigned query_operand[k_steps][4];  // registers 0 and 2: the B operand (Qᵀ), 1 and 3 unused
#pragma unroll
          for (int sb = 0; sb < sub_blocks; ++sb) {
            const int block_index = warp_token / 16 + sb;
            if (sb == 0 || !fragments.reuses_query(side_tile, block_index)) {
              fragments.block(side_tile, block_index, first_token + 16 * sb, end, lane, query_operand);
              fragments.columns(lane);
            }
            const std::uint8_t* key_codes = stream.key_tile(tile) + (warp_token + 16 * sb) * code_stride;
            unsigned key_operand[2][k_steps][2];  // tokens g and g + 8: the A operand's rows
#pragma unroll
            for (int block = 0; block < 2; ++block)
              fragments.keys(key_codes + (block * 8 + head_row) * code_stride, first_token + 16 * sb + block * 8,
                             lane, key_operand[block]);
            float score_tile[4] = {};
#pragma unroll
            for (int step = 0; step < k_steps; ++step) {
              const unsigned a[4] = {key_operand[0][step][0], key_operand[1][step][0], key_operand[0][step][1],
                                     key_operand[1][step][1]};
              mma_16x8x16<mma_type>(score_tile, a, query_operand[step][0], query_operand[step][2]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
              logit[sb][i] = fragments.column_score(score_tile[i], i % 2, side_tile,
                                                    warp_token + 16 * sb + (i / 2) * 8 + head_row);
          }

          constexpr int block_tokens = 16 * sub_blocks;
          const auto place = [&](std::int64_t token) {
            const std::int64_t offset = token - first_token;
            return offset < 0 ? -1 : offset > block_tokens ? block_tokens : static_cast<int>(offset);
          };
          const int seen_from = place(begin), seen_to = place(end), bias_place = place(bias.index);
          float weight[sub_blocks][4];
          float rescale[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int column = 2 * quad + e;  // the query head
            const bool head_valid = Group == 8 || column < Group;
            float tile_max = running_max[e];
#pragma unroll
            for (int sb = 0; sb < sub_blocks; ++sb)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int index = sb * 16 + r * 8 + head_row;  // the token's place in the warp's
                const bool seen = head_valid && index >= seen_from && index < seen_to;
                float& score = logit[sb][2 * r + e];
                score = seen ? score + (index == bias_place ? bias.bias_log2 : 0.0f) : negative_infinity;
                // Tokens of the segment only ([first, begin) belongs to another block's): `seen`, which
                // is in_segment(first_token + index) in 32-bit places.
                if (params.metric.logits != nullptr && seen)
                  store_metric_logit(params.metric.logits + column * params.metric.stride + metric_line + first_token +
                                         index,
                                     score, params.metric.keep_in_l2, metric_policy);
                tile_max = fmaxf(tile_max, score);
              }
            // The head's tokens are spread over the eight lanes of its column (lanes t, t + 4, …).
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 8));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
            rescale[e] = tile_max == negative_infinity ? 1.0f : exp2f(running_max[e] - tile_max);
            running_max[e] = tile_max;
            float sum = 0.0f;
#pragma unroll
            for (int sb = 0; sb < sub_blocks; ++sb)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                float& w = weight[sb][2 * r + e];
                w = tile_max == negative_infinity ? 0.0f : exp2f(logit[sb][2 * r + e] - tile_max);
                sum += w;
              }
            running_sum[e] = running_sum[e] * rescale[e] + sum;
            fragments.rescale(e, rescale[e]);
          }
          // Once a head's first tiles are seen its running maximum rarely moves: where the decoder asks
          // (decoder::skips_unit_rescale), a warp whose lanes all rescale by exactly 1 skips the 16 or 32
          // (head dim 64 / 128) multiplications by 1 (bit-identical) for one vote.
          if (!decoder::skips_unit_rescale || __any_sync(0xffffffffu, rescale[0] != 1.0f || rescale[1] != 1.0f)) {
#pragma unroll
            for (int tile_index = 0; tile_index < output_registers; ++tile_index)
#pragma unroll
              for (int i = 0; i < 4; ++i) output[tile_index][i] *= rescale[i % 2];
          }
          // P' = P times each token's value step (zero points: Σ p z aside, rescaled as the output).
#pragma unroll
          for (int sb = 0; sb < sub_blocks; ++sb)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              weight[sb][i] = fragments.weight(weight[sb][i], i % 2, side_tile,
                                               warp_token + 16 * sb + (i / 2) * 8 + head_row);
#pragma unroll
          for (int sb = 0; sb < sub_blocks; ++sb) {
            // Pᵀ as the B operand: the 8 × 8 (token, head) tiles of the weights, transposed across the warp.
            const unsigned weights_low = transpose_matrix(pack2<mma_type>(weight[sb][0], weight[sb][1]));
            const unsigned weights_high = transpose_matrix(pack2<mma_type>(weight[sb][2], weight[sb][3]));
            unsigned value_operand[output_tiles][2];
            fragments.values(stream.value_tile(tile) + (warp_token + 16 * sb) * code_stride, code_stride, lane,
                             value_operand);
            // Vᵀ as the A operand: rows g and g + 8 of tile m are output tiles 2m and 2m + 1 of the row form.
#pragma unroll
            for (int tile_index = 0; tile_index < output_registers; ++tile_index) {
              const unsigned a[4] = {value_operand[2 * tile_index][0], value_operand[2 * tile_index + 1][0],
                                     value_operand[2 * tile_index][1], value_operand[2 * tile_index + 1][1]};
              mma_16x8x16<mma_type>(output[tile_index], a, weights_low, weights_high);
            }
          }
        } else {
          // The warp's sub_blocks consecutive 16-token blocks of the tile, one softmax step.
          const int warp_token = (token_group * geometry::blocks_per_warp + warp_block) * 16 * sub_blocks;  // in the tile
          const std::int64_t first_token = stream.first_token(tile) + warp_token;
          [[maybe_unused]] const float* side_tile = stream.side_tile(tile);
          // logit[sb][rb][i]: token sb·16 + (i / 2)·8 + 2·quad + i % 2 of the warp's, row head_row + 8·rb
          // (base 2, before masking and the compensation bias).
          float logit[sub_blocks][row_blocks][4];
          [[maybe_unused]] const mma_type* value_tile_rows = nullptr;  // 16-bit or dequantized tiles: the warp's V rows
          if constexpr (Fragments) {
            (void)reader;
            unsigned query_operand[k_steps][4];
#pragma unroll
            for (int sb = 0; sb < sub_blocks; ++sb) {
              const int block_index = warp_token / 16 + sb;
              // A block of the previous one's KIVI run keeps its scaled query (and score steps).
              if (sb == 0 || !fragments.reuses_query(side_tile, block_index))
                fragments.block(side_tile, block_index, first_token + 16 * sb, end, lane, query_operand);
              const std::uint8_t* key_codes = stream.key_tile(tile) + (warp_token + 16 * sb) * code_stride;
              float score_tile[2][4] = {};  // S for the block's 16 tokens: [token block of 8][accumulator]
#pragma unroll
              for (int block = 0; block < 2; ++block) {
                unsigned key_operand[k_steps][2];
                fragments.keys(key_codes + (block * 8 + lane / 4) * code_stride, first_token + 16 * sb + block * 8, lane,
                               key_operand);
#pragma unroll
                for (int step = 0; step < k_steps; ++step)
                  mma_16x8x16<mma_type>(score_tile[block], query_operand[step], key_operand[step][0], key_operand[step][1]);
              }
#pragma unroll
              for (int rb = 0; rb < row_blocks; ++rb)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                  logit[sb][rb][i] = fragments.score(score_tile[i / 2][rb * 2 + i % 2], rb, side_tile,
                                                     warp_token + 16 * sb + (i / 2) * 8 + 2 * quad + i % 2);
            }
          } else {
            const mma_type* key_rows = nullptr;
            const mma_type* value_rows = nullptr;
            if constexpr (geometry::dequantizes) {
              key_rows = dequantized + warp_token * row_stride;
              value_rows = dequantized + geometry::tile_elements + warp_token * row_stride;
            } else {
              key_rows = stream.key_tile(tile) + warp_token * row_stride;
              value_rows = stream.value_tile(tile) + warp_token * row_stride;
            }
            float score_tile[2][4] = {};  // S for this warp's 16 tokens: [token block of 8][accumulator]
#pragma unroll
            for (int step = 0; step < k_steps; ++step) {
              unsigned key_fragment[4];
              if constexpr (geometry::swizzled)
                load_matrix_x4_at(key_fragment, swizzled_key_row(stream.key_tile(tile), warp_token, step));
              else
                load_matrix_x4(key_fragment, key_rows + ((lane % 8) + (lane / 16) * 8) * row_stride + step * 16 +
                                                 ((lane / 8) % 2) * 8);
              const unsigned a[4] = {query_fragment[step][0][0], row_blocks > 1 ? query_fragment[step][row_blocks - 1][0] : 0u,
                                     query_fragment[step][0][1], row_blocks > 1 ? query_fragment[step][row_blocks - 1][1] : 0u};
              mma_16x8x16<mma_type>(score_tile[0], a, key_fragment[0], key_fragment[1]);
              mma_16x8x16<mma_type>(score_tile[1], a, key_fragment[2], key_fragment[3]);
            }
#pragma unroll
            for (int rb = 0; rb < row_blocks; ++rb)
#pragma unroll
              for (int i = 0; i < 4; ++i) logit[0][rb][i] = score_tile[i / 2][rb * 2 + i % 2] * params.query_scale;
            value_tile_rows = value_rows;
          }

          constexpr int block_tokens = 16 * sub_blocks;
          float weight[row_blocks][4 * sub_blocks];
          float rescale[row_blocks];
          // The warp's tokens seen, as places in its block_tokens: [seen_from, seen_to) (32-bit compares
          // per token; 64-bit ones were ~40 instructions a block), and the compensation token's place.
          const auto place = [&](std::int64_t token) {
            const std::int64_t offset = token - first_token;
            return offset < 0 ? -1 : offset > block_tokens ? block_tokens : static_cast<int>(offset);
          };
          const int seen_from = Fragments ? place(begin) : 0, seen_to = place(end);
          const int bias_place = place(bias.index);
#pragma unroll
          for (int rb = 0; rb < row_blocks; ++rb) {
            float score[4 * sub_blocks];
            [[maybe_unused]] int visible_to = seen_to;
            if constexpr (Queries > 1) visible_to = min(seen_to, place(visible[rb]));
#pragma unroll
            for (int sb = 0; sb < sub_blocks; ++sb)
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const int index = sb * 16 + (i / 2) * 8 + 2 * quad + i % 2;  // the token's place in the warp's
                const bool seen = index >= seen_from && index < (Queries > 1 ? visible_to : seen_to);
                score[4 * sb + i] =
                    seen ? logit[sb][rb][i] + (index == bias_place ? bias.bias_log2 : 0.0f) : negative_infinity;
              }
            if (Queries == 1 && params.metric.logits != nullptr && head_row + 8 * rb < Group) {
              // The segment's tokens only ([first, begin) belongs to another block's segment): places in
              // [seen_from, seen_to), which is in_segment in 32-bit compares. A lane holds tokens 2·quad and
              // 2·quad + 1 of each 8: one 8-byte store for both where their address is 8-byte aligned (tested
              // on the address: eviction::attend's logits and stride make it the line place's parity, but a
              // hand-built decode_metric need not).
              float* const step_logits =
                  params.metric.logits + (head_row + 8 * rb) * params.metric.stride + metric_line + first_token;
              const bool pairs_aligned = (reinterpret_cast<std::uintptr_t>(step_logits) & 7) == 0;
#pragma unroll
              for (int pair = 0; pair < 2 * sub_blocks; ++pair) {
                const int index = (pair / 2) * 16 + (pair % 2) * 8 + 2 * quad;
                const bool first_seen = index >= seen_from && index < seen_to;
                const bool second_seen = index + 1 >= seen_from && index + 1 < seen_to;
                if (pairs_aligned && first_seen && second_seen) {
                  store_metric_logit_pair(step_logits + index, score[2 * pair], score[2 * pair + 1],
                                          params.metric.keep_in_l2, metric_policy);
                } else {
                  if (first_seen)
                    store_metric_logit(step_logits + index, score[2 * pair], params.metric.keep_in_l2, metric_policy);
                  if (second_seen)
                    store_metric_logit(step_logits + index + 1, score[2 * pair + 1], params.metric.keep_in_l2,
                                       metric_policy);
                }
              }
            }
            float tile_max = running_max[rb];
#pragma unroll
            for (int i = 0; i < 4 * sub_blocks; ++i) tile_max = fmaxf(tile_max, score[i]);
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            rescale[rb] = tile_max == negative_infinity ? 1.0f : exp2f(running_max[rb] - tile_max);
            running_max[rb] = tile_max;
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < 4 * sub_blocks; ++i) {
              weight[rb][i] = tile_max == negative_infinity ? 0.0f : exp2f(score[i] - tile_max);
              sum += weight[rb][i];
            }
            running_sum[rb] = running_sum[rb] * rescale[rb] + sum;
          }
          // Rows 8..15 (accumulators 2, 3) hold query heads only at G = 16; below, they stay 0.
#pragma unroll
          for (int tile_index = 0; tile_index < output_tiles; ++tile_index)
#pragma unroll
            for (int i = 0; i < 2 * row_blocks; ++i) output[tile_index][i] *= rescale[row_blocks > 1 ? i / 2 : 0];
          if constexpr (Fragments) {
            // P' = P times each token's value step (zero points: Σ p z aside, rescaled as the output).
#pragma unroll
            for (int rb = 0; rb < row_blocks; ++rb) {
              fragments.rescale(rb, rescale[rb]);
#pragma unroll
              for (int i = 0; i < 4 * sub_blocks; ++i)
                weight[rb][i] = fragments.weight(weight[rb][i], rb, side_tile,
                                                 warp_token + (i / 4) * 16 + ((i % 4) / 2) * 8 + 2 * quad + i % 2);
            }
          }

#pragma unroll
          for (int sb = 0; sb < sub_blocks; ++sb) {
            // P from S's accumulator layout is already the A operand of P·V.
            const unsigned weight_fragment[4] = {
                pack2<mma_type>(weight[0][4 * sb], weight[0][4 * sb + 1]),
                row_blocks > 1 ? pack2<mma_type>(weight[row_blocks - 1][4 * sb], weight[row_blocks - 1][4 * sb + 1]) : 0u,
                pack2<mma_type>(weight[0][4 * sb + 2], weight[0][4 * sb + 3]),
                row_blocks > 1 ? pack2<mma_type>(weight[row_blocks - 1][4 * sb + 2], weight[row_blocks - 1][4 * sb + 3])
                               : 0u};
            if constexpr (Fragments) {
              unsigned value_operand[output_tiles][2];
              fragments.values(stream.value_tile(tile) + (warp_token + 16 * sb) * code_stride, code_stride, lane,
                               value_operand);
#pragma unroll
              for (int tile_index = 0; tile_index < output_tiles; ++tile_index)
                mma_16x8x16<mma_type>(output[tile_index], weight_fragment, value_operand[tile_index][0],
                                      value_operand[tile_index][1]);
            } else {
#pragma unroll
              for (int pair = 0; pair < output_tiles / 2; ++pair) {
                unsigned value_fragment[4];
                if constexpr (geometry::swizzled)
                  load_matrix_x4_transposed_at(value_fragment, swizzled_value_row(stream.value_tile(tile), warp_token, pair));
                else
                  load_matrix_x4_transposed(value_fragment, value_tile_rows +
                                                                ((lane % 8) + ((lane / 8) % 2) * 8) * row_stride +
                                                                pair * 16 + (lane / 16) * 8);
                mma_16x8x16<mma_type>(output[2 * pair], weight_fragment, value_fragment[0], value_fragment[1]);
                mma_16x8x16<mma_type>(output[2 * pair + 1], weight_fragment, value_fragment[2], value_fragment[3]);
              }
            }
          }
        }
      }
      stream.release();
    }
    stream.drain();

    constexpr int parts = geometry::token_groups;                  // partial states per row
    auto* shared_max = reinterpret_cast<float*>(shared_memory);      // [parts][query_rows]
    auto* shared_sum = shared_max + parts * query_rows;              // [parts][query_rows]
    auto* shared_accumulator = shared_sum + parts * query_rows;      // [parts][query_rows][HeadDim]
    if constexpr (transposed) {
      // Head 2t + e's state is spread over its column's eight lanes (g = 0..7), channel rows g and g + 8.
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float sum = running_sum[e];
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        sum += __shfl_xor_sync(0xffffffffu, sum, 8);
        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
        float zero_sum[2];  // per parity of the output tile (the decoder's rule: column_zero_sums)
        fragments.column_zero_sums(e, zero_sum);
        const int row = 2 * quad + e;
        if (row < query_rows) {
#pragma unroll
          for (int tile_index = 0; tile_index < output_registers; ++tile_index)
#pragma unroll
            for (int r = 0; r < 2; ++r)
              shared_accumulator[(token_group * query_rows + row) * HeadDim +
                                 decoder::layout::value_channel(2 * tile_index + r, head_row)] =
                  fragments.output(output[tile_index][2 * r + e], zero_sum[r], 2 * tile_index + r);
          if (head_row == 0) {
            shared_max[token_group * query_rows + row] = running_max[e];
            shared_sum[token_group * query_rows + row] = sum;
          }
        }
      }
    } else {
#pragma unroll
      for (int rb = 0; rb < row_blocks; ++rb) {
        float sum = running_sum[rb];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        [[maybe_unused]] float zero_sum[2] = {};  // per parity of the output tile (the decoder's zero_sums)
        if constexpr (Fragments) fragments.zero_sums(rb, zero_sum);
        const int row = first_row + head_row + 8 * rb;
        if (row < query_rows) {
#pragma unroll
          for (int tile_index = 0; tile_index < output_tiles; ++tile_index)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if constexpr (Fragments)
                shared_accumulator[(token_group * query_rows + row) * HeadDim + decoder::layout::value_channel(tile_index, 2 * quad + e)] =
                    fragments.output(output[tile_index][rb * 2 + e], zero_sum[tile_index % 2], tile_index);
              else
                shared_accumulator[(token_group * query_rows + row) * HeadDim + tile_index * 8 + 2 * quad + e] =
                    output[tile_index][rb * 2 + e];
            }
          if (quad == 0) {
            shared_max[token_group * query_rows + row] = running_max[rb];
            shared_sum[token_group * query_rows + row] = sum;
          }
        }
      }
    }
    __syncthreads();
    finish_segment<HeadDim, Group, parts, geometry::threads, Params, query_rows>(params, shared_max, shared_sum,
                                                                          shared_accumulator, head, whole, partial_index);
    __syncthreads();  // the next segment's tiles overwrite this merge area
  });
}

/// Codecs the multi-query kernels read (through the tensor-core kernel's tiles: plain elements, or code
/// bytes dequantized tile by tile); any other codec's own kernel holds one query per row and is refused.
template <class CodecT>
inline constexpr bool multi_query_codec = codec::is_plain<CodecT>;
template <int Bits>
inline constexpr bool multi_query_codec<codec::quantized<Bits>> = true;
template <>
inline constexpr bool multi_query_codec<codec::fp8> = true;
template <class Inner>
inline constexpr bool multi_query_codec<codec::layered<Inner>> = multi_query_codec<Inner>;

/// The largest GQA group whose 16-bit (or dequantized code) decode runs on the CUDA-core kernel
/// (unpadded 64-token tiles, 8 warps, whole tiles by bulk copies) rather than the tensor-core one
/// (padded tiles for ldmatrix, 4 warps). On the H200 (2026-12-05) the CUDA-core kernel read W's
/// 32k fp16 cache at GQA 1 in 265–271 µs against the tensor-core kernel's 282 at GQA 4. It does not
/// keep that at GQA 4 (4× its FMA and shuffle work): built with -DKVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS=4,
/// W at GQA 4 took 370 µs (301 with KVTRIM_CUDA_DECODE_CUDA_CORE_MIN_BLOCKS=2) against the
/// tensor-core kernel's 275 in the same call (H200, 2026-12-05, docs/results.md): 2 stays. At most
/// head_dim / 8 (a lane group's heads) at every head dim the kernels take: 8.
#ifndef KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS
#define KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS 2
#endif
static_assert(KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS >= 1 && KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS <= 8,
              "KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS: 1 to 8 (the CUDA-core lane groups hold head_dim / 8 heads)");

/// The driver's cuTensorMapEncodeTiled through the runtime (no libcuda link), looked up once;
/// null where the driver has none (a failed lookup's error is cleared: check_launch must not see it).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &function, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess || function == nullptr) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encoder;
}

/// Tensor maps of 16-bit K/V storage of `slots` rows of `head_dim` elements for kv_tile_stream's
/// tensor-map copies: boxes of 64 elements × `box_rows` rows landing as one 128-byte-swizzled
/// panel. Host only (no synchronisation: capturable). Where a map cannot be made — no encoder, a
/// device below compute capability 9.0 (no tensor-map copies), more rows than the copies' signed
/// 32-bit coordinates reach, the driver refusing the encoding — `valid` stays 0 and the kernel
/// copies every tile by cp.async into the same layout.
template <class StoreT>
kv_tile_maps encode_kv_tile_maps(const void* keys, const void* values, std::int64_t slots, int head_dim, int box_rows,
                                 std::string_view function) {
  static_assert(sizeof(StoreT) == 2, "encode_kv_tile_maps: 16-bit storage");
  kv_tile_maps maps{};
  int device = 0, major = 0;
  detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  detail::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), function,
                     "cudaDeviceGetAttribute(compute capability)");
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (major < 9 || encode == nullptr || slots < 1 || slots > std::numeric_limits<std::int32_t>::max() ||
      head_dim % 64 != 0)
    return maps;
  const CUtensorMapDataType type =
      std::is_same_v<StoreT, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  constexpr int promotion_bytes = KVTRIM_CUDA_TENSOR_MAP_L2_PROMOTION;
  static_assert(promotion_bytes == 0 || promotion_bytes == 64 || promotion_bytes == 128 || promotion_bytes == 256,
                "KVTRIM_CUDA_TENSOR_MAP_L2_PROMOTION: 0, 64, 128 or 256");
  const CUtensorMapL2promotion promotion = promotion_bytes == 256   ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B
                                           : promotion_bytes == 128 ? CU_TENSOR_MAP_L2_PROMOTION_L2_128B
                                           : promotion_bytes == 64  ? CU_TENSOR_MAP_L2_PROMOTION_L2_64B
                                                                    : CU_TENSOR_MAP_L2_PROMOTION_NONE;
  const cuuint64_t extents[2] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(slots)};
  const cuuint64_t row_bytes[1] = {static_cast<cuuint64_t>(head_dim) * sizeof(StoreT)};  // dim 1's stride
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};  // 64 elements: the swizzle's 128 bytes
  const cuuint32_t element_strides[2] = {1, 1};
  const auto encode_one = [&](CUtensorMap& map, const void* storage) {
    return encode(&map, type, 2, const_cast<void*>(storage), extents, row_bytes, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, promotion,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  maps.valid = encode_one(maps.keys, keys) && encode_one(maps.values, values) ? 1 : 0;
  return maps;
}

/// Binds a runtime GQA group size to a compile-time constant (1, 2, 4, 8, 16).
template <class Fn>
void dispatch_decode_group(std::int64_t group, std::string_view function, Fn&& fn) {
  switch (group) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    default:
      detail::fail(function, "shape.q_heads / shape.kv_heads",
                   "a GQA group size of 1, 2, 4, 8 or 16 on backend::cuda", std::to_string(group));
  }
}

/// The kernel, its block size and shared memory for one (head dim, group, storage) instantiation;
/// Fragments (tensor cores over code bytes): the codec's fragment decoder, `Side` its staged steps;
/// Queries > 1: multi-query decode of up to that many new tokens per sequence.
template <int HeadDim, int Group, class StoreT, int RowElements, bool Fragments, class Side, int Queries, int Blocks>
struct decode_kernel_choice {
  // 16-bit storage at groups above KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS (2), code bytes at groups ≥ 4,
  // several queries, and code fragments at every group (their transposed product) run on the tensor
  // cores; the rest on CUDA cores.
  static constexpr int cuda_core_groups = sizeof(StoreT) == 2 ? KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS : 2;
  static constexpr bool tensor_cores = sizeof(StoreT) <= 2 && (Group > cuda_core_groups || Queries > 1 || Fragments);
  // fp32 storage at group 16 has no kernel: the CUDA-core lane groups hold at most head_dim / 8 heads;
  // nor for several queries (fp32 storage has no tensor-core path).
  static constexpr bool supported = tensor_cores || (Queries == 1 && Group <= HeadDim / 8);
  using tensor_geometry = tensor_core_geometry<HeadDim, StoreT, Group, RowElements, Fragments, Side, Queries, Blocks>;
  static constexpr int threads = tensor_cores ? tensor_geometry::threads : decode_threads;
  static constexpr std::size_t shared_bytes =
      tensor_cores ? tensor_geometry::shared_bytes : decode_geometry<HeadDim, StoreT, Group, RowElements>::shared_bytes;
  template <class Params>
  static auto kernel() {
    if constexpr (tensor_cores)
      return decode_attention_tensor_core<HeadDim, Group, StoreT, Params, Fragments, Queries>;
    else
      return decode_attention_cuda_core<HeadDim, Group, StoreT, Params>;
  }
};

}  // namespace cuda_detail

template <>
struct implementation<stage::decode_attention, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::scheme::attend";

  /// Partials for the most blocks any instantiation launches (one wave at the
  /// occupancy bound) plus, for paged / flat caches, the plan's tables.
  /// 0 for shapes attend refuses, so attend can name the argument.
  template <class View>
  static std::size_t workspace_bytes(const View& cache) {
    return workspace_bytes(cache, 1);
  }
  /// Multi-query decode: partials for every query row (Group × n per head and block).
  template <class View>
  static std::size_t workspace_bytes(const View& cache, std::int64_t queries_per_sequence) {
    if (!supported_shape(cache) || queries_per_sequence < 1 || queries_per_sequence > max_queries) return 0;
    workspace_carver carver;
    carve(carver, cache, queries_per_sequence);
    return carver.bytes();
  }

  /// Where attend laid a paged / flat cache's heads on the partition's line (the eviction
  /// metric's logits are indexed by it): the plan's tables in `scratch`, filled on the
  /// stream by attend's plan kernel or its attention blocks.
  template <class View>
  static cuda_detail::planned_partition planned_partition(const View& cache, workspace scratch) {
    workspace_carver carver(scratch);
    const scratch_tables tables = carve(carver, cache);
    return {cache.heads(), tables.line, tables.prefix, tables.first_head};
  }

  /// `metric`: the eviction metric's side output (backend/cuda/eviction.cuh), none by default.
  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 3, device_space>& queries, const View& cache,
                     const tensor_view<OutT, 3, device_space>& out, workspace scratch, cudaStream_t stream,
                     const cuda_detail::decode_metric& metric = {}) {
    attend_rows<false>(one_token(queries), cache, one_token(out), scratch, stream, metric);
  }

  /// Multi-query decode: queries, out [B, n, Hq, D] (n ≤ 8, the cache's last n tokens being the
  /// new ones): query t sees the head's first L − n + 1 + t tokens. n = 1 is the call above. The
  /// eviction metric needs n = 1 (speculative queries may be rejected; the metric sums the
  /// attention of accepted tokens).
  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 4, device_space>& queries, const View& cache,
                     const tensor_view<OutT, 4, device_space>& out, workspace scratch, cudaStream_t stream,
                     const cuda_detail::decode_metric& metric = {}) {
    const std::int64_t queries_per_sequence = queries.extent(1);
    if (queries_per_sequence < 1 || queries_per_sequence > max_queries)
      detail::fail(function, "queries", detail::cat("1 to ", max_queries, " new tokens per sequence (axis 1)"),
                   std::to_string(queries_per_sequence));
    if (queries_per_sequence == 1) {
      attend_rows<false>(queries, cache, out, scratch, stream, metric);
      return;
    }
    if (metric.logits != nullptr)
      detail::fail(function, "metric",
                   "one query per sequence with an eviction metric (speculative queries may be rejected; the metric "
                   "sums the attention of accepted tokens)",
                   detail::cat(queries_per_sequence, " queries per sequence"));
    if constexpr (cuda_detail::multi_query_codec<typename View::codec>)
      attend_rows<true>(queries, cache, out, scratch, stream, metric);
    else
      detail::fail(function, "cache.codec",
                   "codec::fp16 / bf16, int8, int4, fp8_e4m3 or layered over those for several queries per sequence "
                   "on backend::cuda",
                   detail::cat(View::codec::name, " with ", queries_per_sequence, " queries per sequence"));
  }

 private:
  static constexpr std::int64_t max_queries = 8;

  /// A [B, Hq, D] view as [B, 1, Hq, D].
  template <class T>
  static tensor_view<T, 4, device_space> one_token(const tensor_view<T, 3, device_space>& view) {
    return {view.data, {view.extent(0), 1, view.extent(1), view.extent(2)}, {view.stride(0), 0, view.stride(1), view.stride(2)}};
  }

  /// The checks and the dispatch of both entries; MultiQuery: the Queries = 8 kernels (n ≥ 2),
  /// which only a multi-query call instantiates.
  template <bool MultiQuery, class View, class QueryT, class OutT>
  static void attend_rows(const tensor_view<QueryT, 4, device_space>& queries, const View& cache,
                          const tensor_view<OutT, 4, device_space>& out, workspace scratch, cudaStream_t stream,
                          const cuda_detail::decode_metric& metric) {
    static_assert(codec::is_plain<typename View::codec> || cuda_detail::device_encoded_codec<typename View::codec>,
                  "kvtrim: backend::cuda decode attention reads codec::fp16 / bf16 / fp32, int8, int4, fp8_e4m3, "
                  "layered over those three, and low_rank (codec_low_rank.cuh); layered<low_rank> has no device "
                  "reader (issue 12)");
    constexpr bool uniform = cuda_detail::is_contiguous_view<View>;
    const std::int64_t queries_per_sequence = queries.extent(1);
    std::int64_t length = 0;  // contiguous: every head's length (host memory)
    if constexpr (uniform) {
      length = *cache.length;
      if (length < 1) detail::fail(function, "cache", "at least one token in every head", "an empty cache (length 0)");
      if (length < queries_per_sequence)
        detail::fail(function, "cache",
                     detail::cat("at least ", queries_per_sequence, " tokens in every head (the new tokens are the "
                                 "cache's last ", queries_per_sequence, ")"),
                     detail::cat(length, " tokens"));
    }
    const std::int64_t heads = cache.batch * cache.shape.kv_heads;
    if (heads >= std::numeric_limits<std::int32_t>::max() ||
        cache.batch * queries_per_sequence * cache.shape.q_heads >= std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "cache", "fewer than 2^31 − 1 (sequence, head) pairs on backend::cuda",
                   detail::cat("batch ", cache.batch, " × queries ", queries_per_sequence, " × q_heads ",
                               cache.shape.q_heads));
    // cp.async copies 16-byte chunks of rows (of 16-byte multiples: head_dim 64, 128, 256).
    cuda_detail::check_aligned16(function, "cache.storage.keys",
                                 cuda_detail::codec_tiles<typename View::codec, 64>::key_rows(cache.storage));
    cuda_detail::check_aligned16(function, "cache.storage.values",
                                 cuda_detail::codec_tiles<typename View::codec, 64>::value_rows(cache.storage));
    int page_shift = -1;
    if constexpr (cuda_detail::is_paged_view<View> || cuda_detail::is_shared_paged_view<View>)
      page_shift = cuda_detail::power_of_two_shift(cache.page_size);

    cuda_detail::dispatch_head_dim(cache.shape.head_dim, function, [&](auto head_dim_constant) {
      constexpr int head_dim = decltype(head_dim_constant)::value;
      cuda_detail::dispatch_decode_group(cache.shape.group_size(), function, [&](auto group_constant) {
        constexpr int group = decltype(group_constant)::value;
        if constexpr (MultiQuery) {
          // Code bytes through dequantized fp16 tiles: the fragment decoders hold one query per row.
          launch<head_dim, group, false, max_queries>(queries, cache, out, scratch, stream, metric, length, page_shift);
        } else {
          // Code bytes on the tensor cores: straight into the mma fragments where the codec's fragment
          // decoder reads the storage (a runtime property: KIVI runs of whole warp blocks), else through
          // dequantized fp16 tiles.
          using decoder = cuda_detail::fragment_decoder<typename View::codec, head_dim, group>;
          // Every group: below 16 the transposed product, whose unused columns cost nothing the group-4
          // case does not pay (the CUDA-core kernel it replaces at groups 1 and 2 dequantized every
          // element per lane: int8 at W's bytes 511 µs at group 1 and 566 at group 2, against 226 at
          // group 4 on the fragments; H200 2026-12-04).
          if constexpr (decoder::supported) {
            if (decoder::always_reads || decoder::reads(cache.storage))
              launch<head_dim, group, decoder::supported, 1>(queries, cache, out, scratch, stream, metric, length,
                                                             page_shift);
            else if constexpr (!decoder::always_reads)
              launch<head_dim, group, false, 1>(queries, cache, out, scratch, stream, metric, length, page_shift);
          } else {
            launch<head_dim, group, false, 1>(queries, cache, out, scratch, stream, metric, length, page_shift);
          }
        }
      });
    });
  }

  /// One kernel instantiation: its partition, launch and the merge of partials.
  template <int head_dim, int group, bool fragments, int queries_capacity, class View, class QueryT, class OutT>
  static void launch(const tensor_view<QueryT, 4, device_space>& queries, const View& cache,
                     const tensor_view<OutT, 4, device_space>& out, workspace scratch, cudaStream_t stream,
                     const cuda_detail::decode_metric& metric, std::int64_t length, int page_shift) {
    using query_type = cuda_detail::device_element_t<QueryT>;
    using out_type = cuda_detail::device_element_t<OutT>;
    constexpr bool uniform = cuda_detail::is_contiguous_view<View>;
    const std::int64_t heads = cache.batch * cache.shape.kv_heads;
    using tiles = cuda_detail::codec_tiles<typename View::codec, head_dim>;
    using store_type = typename tiles::stored;
    // codec::low_rank: its own kernel (codec_low_rank.cuh), shared memory sized by the stored rank,
    // one query per sequence.
    using choice = std::conditional_t<
        cuda_detail::is_low_rank<typename View::codec>, cuda_detail::low_rank_decode_choice<group>,
        cuda_detail::decode_kernel_choice<
            head_dim, group, store_type, tiles::row_elements, fragments,
            typename cuda_detail::tensor_core_side<typename View::codec, head_dim, group, fragments>::type,
            queries_capacity,
            cuda_detail::tensor_core_blocks<View, store_type, head_dim, group, fragments, queries_capacity>()>>;
    const std::int64_t queries_per_sequence = queries.extent(1);
    if constexpr (queries_capacity > 1 && (!choice::supported || cuda_detail::is_low_rank<typename View::codec>)) {
      detail::fail(function, "cache.codec",
                   "fp16, bf16 or a quantizing codec's storage for multi-query decode on backend::cuda",
                   detail::cat(View::codec::name, " storage"));
    } else if constexpr (!choice::supported) {
      detail::fail(function, "cache.codec",
                   "fp16 or bf16 storage for a GQA group of 16 at head_dim 64 on backend::cuda",
                   detail::cat(View::codec::name, " storage"));
    } else {
      using partition_type =
          std::conditional_t<uniform, cuda_detail::uniform_partition, cuda_detail::planned_partition>;
      using params_type = cuda_detail::decode_params<View, partition_type, query_type, out_type>;
      // low_rank picks its kernel (tensor cores or CUDA cores), block size and shared memory from the
      // storage; every other codec's choice is fixed at compile time.
      void (*kernel)(params_type) = nullptr;
      int threads = 0;
      std::size_t shared_bytes = 0;
      const char* kernel_name = nullptr;
      if constexpr (requires { choice::select(cache); }) {
        const auto selected = choice::select(cache);
        kernel = choice::template kernel_for<params_type>(selected, cache);
        threads = selected.threads;
        shared_bytes = selected.shared_bytes;
        kernel_name = selected.kernel_name;
      } else {
        kernel = choice::template kernel<params_type>();
        threads = choice::threads;
        shared_bytes = choice::shared_bytes;
        kernel_name = choice::tensor_cores ? "decode_attention_tensor_core" : "decode_attention_cuda_core";
      }
      // Above 48 KB a kernel must opt in to dynamic shared memory (per device, so on every call;
      // it is a host-side attribute write, no synchronisation).
      detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(shared_bytes)),
                         function, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
      // One wave of blocks: this kernel's real occupancy (shared memory and registers differ per instantiation).
      int blocks_per_multiprocessor = 0;
      detail::check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel,
                                                                       threads, shared_bytes),
                         function, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
      const std::int64_t blocks =
          std::int64_t{backend::cuda::multiprocessor_count()} *
          std::clamp(blocks_per_multiprocessor, 1, cuda_detail::decode_max_blocks_per_multiprocessor);

      workspace_carver carver(scratch);
      const scratch_tables tables = carve(carver, cache, queries_per_sequence);
      partition_type partition{};
      std::int64_t grid = blocks;
      bool merge = true;
      if constexpr (uniform) {
        // fp8 code fragments take the balanced chunk (every slot of the wave; blocks may straddle two
        // heads) instead of whole-head splits that leave a few slots empty (W on 132 SMs: 256 of 264):
        // the kernel is latency-bound, not at the copy rate, so the last 3 % of blocks are worth more
        // than a second segment's start (H100, 2026-12-07: W 32k 208.6 -> 205.2 µs, three rounds; docs/results.md).
        // int8 measured the other way (its segment start opens a KIVI run: 228.5 -> 221 µs with the splits).
        constexpr bool balanced = fragments && std::is_same_v<typename View::codec, codec::fp8>;
        const std::int64_t chunk = balanced ? cuda_detail::decode_chunk(heads * length, blocks)
                                            : cuda_detail::uniform_decode_chunk(heads, length, blocks);
        partition = {heads, length, chunk};
        grid = cuda_detail::ceil_div(heads * length, chunk);
        merge = chunk % length != 0;  // else every block starts a head and reads whole heads
      } else {
        // Up to decode_block_plan_heads heads the attention kernel's blocks plan themselves
        // (block_planned_partition: one launch fewer on the critical path); the low-rank kernels read
        // the plan kernel's tables.
        const bool in_block =
            heads <= cuda_detail::decode_block_plan_heads && !cuda_detail::is_low_rank<typename View::codec>;
        partition = {heads, tables.line, tables.prefix, tables.first_head, in_block};
        if (!in_block) {
          cuda_detail::plan_decode_partition<View><<<1, cuda_detail::decode_plan_threads, 0, stream>>>(
              cache, blocks, tables.line, tables.prefix, tables.first_head);
          detail::check_launch(function, "plan_decode_partition");
        }
      }
      params_type params{cache,
                               partition,
                               reinterpret_cast<const query_type*>(queries.data),
                               queries.stride(0),
                               queries.stride(2),
                               reinterpret_cast<out_type*>(out.data),
                               out.stride(0),
                               out.stride(2),
                               tables.partial_out,
                               tables.partial_lse,
                               static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim))),
                               page_shift,
                               metric,
                               static_cast<int>(queries_per_sequence),
                               queries.stride(1),
                               out.stride(1)};
      // Whole stride-1 tiles of 16-bit storage by tensor maps (the kernel's swizzled tiles; contiguous
      // caches whose tokens are adjacent rows, flat caches). Anything else: cp.async, same layout.
      if constexpr (choice_maps_tiles<choice, View>()) {
        bool adjacent_tokens = true;
        if constexpr (uniform) adjacent_tokens = cache.map.token_stride == 1;
        if (adjacent_tokens)
          params.tile_maps = cuda_detail::encode_kv_tile_maps<store_type>(
              tiles::key_rows(cache.storage), tiles::value_rows(cache.storage), cache.storage.slots, head_dim,
              choice::tensor_geometry::tile_tokens, function);
      }
      if constexpr (uniform) {
        kernel<<<static_cast<unsigned>(grid), threads, shared_bytes, stream>>>(params);
        detail::check_launch(function, kernel_name);
      } else {
        cuda_detail::launch_dependent(kernel, dim3(static_cast<unsigned>(grid)), dim3(threads),
                                      shared_bytes, stream, function, kernel_name, params);
      }
      if (merge) {
        const auto rows = static_cast<unsigned>(cache.batch * queries_per_sequence * cache.shape.q_heads);
        cuda_detail::launch_dependent(cuda_detail::merge_decode_partials<head_dim, group, partition_type, out_type>,
                                      dim3(rows), dim3(head_dim), 0, stream, function, "merge_decode_partials",
                                      partition, static_cast<const float*>(tables.partial_out),
                                      static_cast<const float*>(tables.partial_lse), cache.shape.q_heads,
                                      cache.shape.kv_heads, queries_per_sequence, reinterpret_cast<out_type*>(out.data),
                                      out.stride(0), out.stride(1), out.stride(2), metric.lse);
      }
    }
  }

  /// Whether a kernel choice reads whole tiles by tensor maps where the device can
  /// (KVTRIM_CUDA_TENSOR_MAP_TILES = 1, the tensor-core kernel's swizzled tiles, plain 16-bit storage
  /// of affine rows: contiguous or flat).
  template <class Choice, class View>
  static constexpr bool choice_maps_tiles() {
    if constexpr (KVTRIM_CUDA_TENSOR_MAP_TILES == 1 && codec::is_plain<typename View::codec> &&
                  (cuda_detail::is_contiguous_view<View> || cuda_detail::is_flat_view<View>) &&
                  requires { Choice::tensor_geometry::swizzled; })
      return Choice::tensor_cores && Choice::tensor_geometry::swizzled;
    else
      return false;
  }

  struct scratch_tables {
    float* partial_out = nullptr;  // [(blocks + heads) · group · n][head_dim]
    float* partial_lse = nullptr;  // [(blocks + heads) · group · n]
    cuda_detail::decode_line* line = nullptr;  // paged / flat: the plan's outputs
    std::int64_t* prefix = nullptr;            // [heads + 1]
    std::int32_t* first_head = nullptr;        // [blocks]
  };

  template <class View>
  static bool supported_shape(const View& cache) {
    const std::int64_t d = cache.shape.head_dim, g = cache.shape.group_size();
    return (d == 64 || d == 128 || d == 256) && (g == 1 || g == 2 || g == 4 || g == 8 || g == 16);
  }

  template <class View>
  static scratch_tables carve(workspace_carver& carver, const View& cache, std::int64_t queries_per_sequence = 1) {
    const std::int64_t blocks =
        std::int64_t{backend::cuda::multiprocessor_count()} * cuda_detail::decode_max_blocks_per_multiprocessor;
    const std::int64_t heads = cache.batch * cache.shape.kv_heads;
    const std::int64_t rows = (blocks + heads) * cache.shape.group_size() * queries_per_sequence;
    scratch_tables tables;
    tables.partial_out = carver.take<float>(rows * cache.shape.head_dim);
    tables.partial_lse = carver.take<float>(rows);
    if constexpr (!cuda_detail::is_contiguous_view<View>) {
      tables.line = carver.take<cuda_detail::decode_line>(1);
      tables.prefix = carver.take<std::int64_t>(heads + 1);
      tables.first_head = carver.take<std::int32_t>(blocks);
    }
    return tables;
  }
};

}  // namespace kvtrim
