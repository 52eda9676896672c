// kvtrim/backend/cuda/codec_fragments.cuh — quantized K/V read straight into
// tensor-core fragments (decode attention, every GQA group): int8 / int4 (KIVI
// per-channel key groups or per-token keys; symmetric or zero points) and
// fp8 e4m3, head_dim ≤ 128.
//
// Memory-bound by construction: the inner loops are code → fp16 conversions
// (exact) and mma.sync; every scale is folded outside them.
//  * Keys. The score of token t is Σ_d q_d k̂_td with k̂_td = c̄_td·s + z where
//    c̄ = code − offset (an exact small integer in fp16):
//      - KIVI (per-channel steps s_d, z_d of the run of U slots): the query is
//        scaled once per run, q'_d = q_d·s_d·2^e (rounded to fp16 once, 2^e
//        bringing the row's largest |q'_d| to [2^8, 2^9) so no channel leaves
//        fp16's normal range), and s_t = 2^-e·(q'·c̄_t) + Σ_d q_d z_d: the run's
//        zero points are one constant per query head. A warp's 16 tokens are
//        one run: tiles start at a multiple of a warp's step of 32 tokens
//        (tokens before the segment are read and masked) and runs are multiples of 16 slots
//        (host dispatch; other runs take the dequantize-tile path). The
//        filling group's keys are fp16 in the head's residual window: its
//        blocks (the last length − residual_count tokens, whole groups) read
//        them with the plain query.
//      - per-token keys: s_t = s_t^k·(q·c̄_t) + z_t^k·Σ_d q_d.
//      - fp8: s_t = s^k·(q·c_t) (one scale per head), c_t converted exactly
//        (cvt.rn.f16x2.e4m3x2).
//  * Values. O = Σ_t p_t (c̄_t·s_t + z_t) = Σ_t (p_t s_t)·c̄_t + Σ_t p_t z_t: the
//    weights P are scaled per token before the P·V product (p'_t = p_t·s_t,
//    rounded to fp16 once as P itself is for 16-bit storage) and the zero
//    points add one running sum per query head to every channel. fp8: the
//    head's value scale multiplies the output once.
//  * Conversions: a code byte b becomes the fp16 1024 + b by placing 0x64 above
//    it (prmt / lop3), then one half2 subtraction of 1024 + offset: two
//    integer instructions and one fp16 one per two channels, no int → float
//    conversion. int4 nibbles: one lop3 (mask | 0x6400) a register and one shift a
//    word; the odd nibbles, masked in place, are 1024 + 16·n — one half2 fma
//    (×1/16) for keys, and for values the 16-fold codes go into P·V and their
//    output channels are divided by 16 once (fragment_decoder::output). fp8: one
//    cvt per two channels.
//  * Fragment layouts (mma.cuh): a lane of quad t reads, for the S = Q·Kᵀ
//    product, one contiguous piece of each key row — channels [t·D/4,
//    (t+1)·D/4) — and the A (query) and B (key) operands use the same
//    channel permutation (key_offset), so no byte shuffling across lanes is
//    needed. For P·V, the lane of column g reads channels [g·D/8, (g+1)·D/8)
//    of its four token rows; output column tile j, column g is channel
//    g·D/8 + j (value_channel).
//  * Per-token steps (values, per-token keys) and the KIVI runs' steps of a
//    tile are staged in shared memory with the codes, by the same cp.async
//    pipeline (quantized_tile_side), so no global latency sits in the loop.
//  * Groups 1–8 take the products transposed (decode_attention.cuh): Sᵀ = K·Qᵀ
//    with the codes as A (tokens g and g + 8 of a 16-token block: the same
//    bytes key_fragments reads for two 8-token blocks) and the query as B (the
//    A registers 0 and 2 below: rows 8–15 were padding), and Oᵀ = Vᵀ·Pᵀ with the
//    value operands as A (value_fragments' registers of output tiles 2m, 2m + 1)
//    — half the mma of the row form. A lane's accumulators then hold query
//    heads 2t, 2t + 1 (columns) instead of head g (a row): the per-head score
//    steps and sums have column forms (columns, column_score, column_zero_sums;
//    weight and rescale take the column as their row block index).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kvtrim/backend/cuda/codec_fp8.cuh"
#include "kvtrim/backend/cuda/codec_quantized.cuh"
#include "kvtrim/backend/cuda/common.cuh"

namespace kvtrim::cuda_detail {

// ---- cp.async (shared by the decode pipeline) --------------------------------

/// 16-byte asynchronous global → shared copy; `bytes` = 0 zero-fills the destination. No L2
/// prefetch size: paged tiles (this path, with partial tiles, the KIVI run steps and the low-rank
/// rows) are faster without `.L2::256B` (H200, W 32k, pages of 16: 322 → 316 µs, shared_paged
/// 337 → 335; low-rank and the codecs unchanged; 2026-12-04); whole affine tiles (copy_async16_at)
/// were slower without it (contiguous 278 → 280 µs, flat 279 → 284), so they keep it.
__device__ __forceinline__ void copy_async16(void* shared_destination, const void* global_source, int bytes) {
  const auto destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(global_source), "r"(bytes));
}
/// A whole 16-byte copy at immediate offsets from two base addresses (no source size: nothing
/// zero-filled), so that a thread's copies of one tile need no address arithmetic
/// (kv_tile_stream::issue_affine). No L2 eviction-priority policy (cache_hint) form: ptxas 13.0
/// gave the hinted cp.async of the eviction metric's K/V stream (removed 2026-12-05) an
/// undefined, odd uniform register as its memory descriptor in ~80 decode kernels (D 64, code
/// bytes, three blocks an SM) — "an illegal instruction was encountered" where one ran
/// (docs/results.md, "The K/V evict_first hint removed").
template <int SharedOffset, long long GlobalOffset>
__device__ __forceinline__ void copy_async16_at(unsigned shared_base, const void* global_base) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0+%2], [%1+%3], 16;\n" ::"r"(shared_base), "l"(global_base),
               "n"(SharedOffset), "n"(GlobalOffset));
}
// ---- bulk copies and transaction barriers (sm_90: the decode pipeline's whole affine tiles) ----

/// Whether kv_tile_stream moves whole stride-1 tiles of unpadded rows by bulk copies (the Tensor
/// Memory Accelerator: one instruction per K or V tile, the bytes counted on an mbarrier) instead
/// of 16-byte cp.async chunks. Define KVTRIM_CUDA_BULK_COPIES=0 to keep cp.async (benchmarks
/// compare the two); architectures before sm_90 always do. One value per program: translation
/// units built with different values give the same kernel names different bodies.
#ifndef KVTRIM_CUDA_BULK_COPIES
#define KVTRIM_CUDA_BULK_COPIES 1
#endif

/// A shared-memory mbarrier expecting one arrival per phase plus the bytes its bulk copies bring.
__device__ __forceinline__ void transaction_barrier_init(unsigned barrier) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(barrier) : "memory");
#endif
}
/// Makes the barriers' initialisation visible to the async proxy (the bulk copies' completions).
__device__ __forceinline__ void transaction_barrier_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void transaction_barrier_invalidate(unsigned barrier) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(barrier) : "memory");
#endif
}
/// The phase's one arrival, announcing `bytes` that bulk copies will complete on it.
__device__ __forceinline__ void transaction_barrier_expect(unsigned barrier, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier), "r"(bytes) : "memory");
#else
  __trap();  // only kv_tile_stream::bulk_copies calls it, never true below sm_90
#endif
}
/// Waits until the phase of parity `parity` has completed (every expected byte landed).
__device__ __forceinline__ void transaction_barrier_wait(unsigned barrier, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred landed;\n"
      "wait_for_phase:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 landed, [%0], %1;\n"
      "@!landed bra wait_for_phase;\n"
      "}\n" ::"r"(barrier),
      "r"(parity)
      : "memory");
#else
  __trap();  // only kv_tile_stream::bulk_copies calls it, never true below sm_90
#endif
}
/// Orders this thread's earlier generic-proxy accesses of shared memory (reads of a stage, a
/// previous segment's cp.async zero-fill or merge stores) before its bulk copies into it.
__device__ __forceinline__ void fence_shared_for_bulk_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/// A bulk global → shared copy of `bytes` (a multiple of 16, both addresses 16-byte aligned),
/// completing its bytes on `barrier`.
__device__ __forceinline__ void copy_bulk(unsigned shared_destination, const void* global_source, unsigned bytes,
                                          unsigned barrier) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   shared_destination),
               "l"(global_source), "r"(bytes), "r"(barrier)
               : "memory");
#else
  __trap();  // only kv_tile_stream::bulk_copies calls it, never true below sm_90
#endif
}

// ---- tensor-map copies (sm_90: the tensor-core decode kernel's whole 16-bit tiles) ----

/// A 2-D tensor-map copy (cp.async.bulk.tensor, tile mode) of the box at element coordinates
/// (x: the contiguous dimension, y: rows) of the tensor `tensor_map` describes (the generic
/// address of a CUtensorMap in kernel-parameter, constant or global memory, 64-byte aligned)
/// into shared memory at `shared_destination`, laid out as the map says (its swizzle), its bytes
/// completing on `barrier`. Box rows past the tensor's end arrive as zeros.
__device__ __forceinline__ void copy_tensor_2d(unsigned shared_destination, const void* tensor_map, int x, int y,
                                               unsigned barrier) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          shared_destination),
      "l"(tensor_map), "r"(x), "r"(y), "r"(barrier)
      : "memory");
#else
  __trap();  // only kv_tile_stream's tensor-map copies call it, compiled out below sm_90
#endif
}
/// Brings a tensor map (generic address, as for copy_tensor_2d) into the descriptor cache ahead of
/// its first copy.
__device__ __forceinline__ void prefetch_tensor_map(const void* tensor_map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(tensor_map) : "memory");
#else
  (void)tensor_map;
#endif
}

/// 4-byte asynchronous copy (through L1: .cg takes only 16 bytes); `bytes` = 0 zero-fills.
__device__ __forceinline__ void copy_async4(void* shared_destination, const void* global_source, int bytes) {
  const auto destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(destination), "l"(global_source), "r"(bytes));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

/// The decode pipeline's per-tile side data: none (plain storage, the dequantize-tile path).
struct no_tile_side {
  static constexpr std::size_t bytes = 0;
  template <class Rows>
  __device__ __forceinline__ void resolve(const Rows&, std::int64_t, std::int64_t) {}
  __device__ __forceinline__ void issue(float*) const {}
};

/// int8 / int4 steps a tile of TileTokens tokens needs, staged with its codes:
/// floats [0, T) value steps, [T, 2T) value zero points, [2T, 3T) per-token key
/// steps, [3T, 4T) their zero points, then per block of 16 tokens its KIVI
/// run's head_dim key steps (padded per quad: staged_at), then their zero points, then per block the float
/// offset of its run's steps (64-bit; −1: none staged) — a warp reading two blocks
/// of one run scales its query once. Tokens past the segment's end get zero steps
/// (their weights are 0; 0·garbage could be NaN). Blocks of the filling group (or
/// past the end) copy no run steps: they are not read.
template <int HeadDim, int TileTokens, int Threads>
struct quantized_tile_side {
  static constexpr int blocks = TileTokens / 16;
  static constexpr int run_chunks = blocks * HeadDim / 4;  // 16-byte pieces of the tile's run steps
  static constexpr int run_copies = (run_chunks + Threads - 1) / Threads;  // per thread
  static_assert(TileTokens <= Threads && run_chunks % Threads % (HeadDim / 4) == 0 && blocks <= Threads,
                "quantized_tile_side: one copy of each per-token kind per thread, whole blocks per copy round");
  /// Floats of padding after each quad's pieces of a block's run steps (staged_at): 16 bytes at head
  /// dim 128, where the quads' pieces lie 128 bytes apart (4-way bank conflicts); none at 64 (2-way),
  /// where the padding would cost int8 a pipeline stage.
  static constexpr int quad_padding = HeadDim >= 128 ? 4 : 0;
  static constexpr int staged_block = HeadDim + 4 * quad_padding;  // floats a block's run steps take
  static constexpr int run_steps_at = 4 * TileTokens;
  static constexpr int run_zeros_at = run_steps_at + blocks * staged_block;
  static constexpr int run_offsets_at = run_zeros_at + blocks * staged_block;  // in floats; 8-byte slots
  static constexpr std::size_t bytes = std::size_t{4} * run_offsets_at + std::size_t{8} * blocks;
  static_assert(bytes % 16 == 0 && run_offsets_at % 2 == 0, "quantized_tile_side: aligned sections");

  const float* value_scales;
  const float* value_zeros;
  const float* key_scales;
  const float* key_zeros;
  std::int64_t sealed_end;  // tokens before it have sealed runs (KIVI)
  int run_shift;            // log2(slot_run)
  bool asymmetric;
  bool token_keys;          // keys scaled per token (no runs)
  std::int64_t token_slot = -1;   // threads < TileTokens: the slot of token first + threadIdx.x (−1: past the end)
  std::int64_t run_offset[run_copies];  // the float offset of this thread's pieces of run steps (−1: none)

  template <class Rows>
  __device__ __forceinline__ void resolve(const Rows& rows, std::int64_t first, std::int64_t end) {
    const int t = threadIdx.x;
    if (t < TileTokens) token_slot = first + t < end ? rows.slot(first + t) : -1;
#pragma unroll
    for (int copy = 0; copy < run_copies; ++copy) {
      const int chunk = t + copy * Threads;
      run_offset[copy] = -1;
      if (!token_keys && chunk < run_chunks) {
        const int block = chunk / (HeadDim / 4), piece = chunk % (HeadDim / 4);
        const std::int64_t block_first = first + 16 * block;
        if (block_first < end && block_first < sealed_end)
          run_offset[copy] = (rows.slot(block_first) >> run_shift) * HeadDim + 4 * piece;
      }
    }
  }
  __device__ __forceinline__ void issue(float* side) const {
    const int t = threadIdx.x;
    if (t < TileTokens) {
      const bool valid = token_slot >= 0;
      const std::int64_t slot = valid ? token_slot : 0;
      const int bytes = valid ? 4 : 0;
      copy_async4(side + t, value_scales + slot, bytes);
      if (asymmetric) copy_async4(side + TileTokens + t, value_zeros + slot, bytes);
      if (token_keys) {
        copy_async4(side + 2 * TileTokens + t, key_scales + slot, bytes);
        if (asymmetric) copy_async4(side + 3 * TileTokens + t, key_zeros + slot, bytes);
      }
    }
    auto* block_runs = reinterpret_cast<std::int64_t*>(side + run_offsets_at);
#pragma unroll
    for (int copy = 0; copy < run_copies; ++copy) {
      const int chunk = t + copy * Threads;
      if (chunk >= run_chunks) continue;
      const int block = chunk / (HeadDim / 4), piece = chunk % (HeadDim / 4);
      // The block's run (its first piece's offset; −1: none): a plain store, read after the
      // barrier that publishes the tile's copies (the stage is not read before it).
      if (piece == 0) block_runs[block] = run_offset[copy];
      if (run_offset[copy] < 0) continue;
      const int staged = staged_at(block, piece);
      copy_async16(side + run_steps_at + staged, key_scales + run_offset[copy], 16);
      if (asymmetric) copy_async16(side + run_zeros_at + staged, key_zeros + run_offset[copy], 16);
    }
  }
  /// Where piece p (channels 4p .. 4p + 3) of block b's run steps is staged, in floats: the pieces a
  /// lane of quad t reads (channels [t·D/4, (t + 1)·D/4), fragment_layout's key piece) are followed
  /// by quad_padding, so that the four quads' i-th 16-byte loads fall in distinct banks (one
  /// wavefront) rather than four addresses D bytes apart in the same banks (ncu, int4 at W: 4–7-way
  /// conflicts), while the copies read and write runs of adjacent pieces (a permuted staging that
  /// needed no padding split each eight-thread copy over four lines: int8 +6 % at W).
  static constexpr int quad_pieces = HeadDim / 16;
  __host__ __device__ static constexpr int staged_at(int block, int piece) {
    return block * staged_block + 4 * piece + quad_padding * (piece / quad_pieces);
  }
  /// Whether block `block` of a staged tile reads the same KIVI run as block − 1 (sealed, both).
  __device__ __forceinline__ static bool same_run(const float* side, int block) {
    const auto* block_runs = reinterpret_cast<const std::int64_t*>(side + run_offsets_at);
    const std::int64_t run = block_runs[block];
    return run >= 0 && run == block_runs[block - 1];
  }
};

// ---- code → fp16 conversions ---------------------------------------------------

/// Two fp16 values 1024 + b0, 1024 + b1 from bytes b0, b1 of `word` chosen by `selector`
/// (a prmt selector placing them at bytes 0 and 2, 0x64 above each).
__device__ __forceinline__ unsigned biased_halves(unsigned word, unsigned selector) {
  return __byte_perm(word, 0x64646464u, selector);
}
/// (word & Mask) | exponent in one lop3: written as C++, ptxas splits it into an AND and an OR of
/// two immediates (ncu, int4 at W: two LOP3 per converted register, 19 M of the kernel's 90 M
/// instructions). `exponent` = 0x64006400 (the fp16 exponent of 1024, both halves), kept in a register.
template <unsigned Mask>
__device__ __forceinline__ unsigned masked_or(unsigned word, unsigned exponent) {
  unsigned result;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(result) : "r"(word), "n"(Mask), "r"(exponent));  // (a & b) | c
  return result;
}
/// The fp16 exponent bits of 1024 in both halves, from a half2(1024 + offset) bias (offset < 1024):
/// derived from the runtime bias so that it stays one register rather than an immediate.
__device__ __forceinline__ unsigned exponent_of_1024(unsigned bias) { return bias & 0xFC00FC00u; }
/// half2(64 + offset) from the bias half2(1024 + offset): 1024 + 16·n (an odd nibble masked in place)
/// times 1/16 minus it is n − offset.
__device__ __forceinline__ unsigned odd_nibble_bias(unsigned bias) {
  const __half2 result = __hsub2(*reinterpret_cast<const __half2*>(&bias), __float2half2_rn(960.0f));
  return *reinterpret_cast<const unsigned*>(&result);
}
/// x / 16 − odd_bias for the halves 1024 + 16·n of an odd nibble: n − offset, exactly (one fma).
__device__ __forceinline__ unsigned sixteenth_minus(unsigned biased, unsigned odd_bias) {
  const __half2 result = __hfma2(*reinterpret_cast<const __half2*>(&biased), __float2half2_rn(0.0625f),
                                 __hneg2(*reinterpret_cast<const __half2*>(&odd_bias)));
  return *reinterpret_cast<const unsigned*>(&result);
}
__device__ __forceinline__ unsigned subtract_halves(unsigned biased, unsigned bias) {
  const __half2 result = __hsub2(*reinterpret_cast<const __half2*>(&biased), *reinterpret_cast<const __half2*>(&bias));
  return *reinterpret_cast<const unsigned*>(&result);
}
/// The two e4m3 codes of the low (high) 16 bits of `word` as f16x2, exactly.
__device__ __forceinline__ void e4m3_pairs(unsigned word, unsigned& low, unsigned& high) {
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(low), "=r"(high)
      : "r"(word));
}
template <int Bytes>
__device__ __forceinline__ void load_shared_words(const std::uint8_t* source, unsigned (&words)[Bytes / 4]) {
  if constexpr (Bytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < Bytes / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(source)[i];
      words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
    }
  } else if constexpr (Bytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(source);
    words[0] = v.x, words[1] = v.y;
  } else {
    static_assert(Bytes == 4, "load_shared_words: 4, 8 or a multiple of 16 bytes");
    words[0] = *reinterpret_cast<const unsigned*>(source);
  }
}

/// Where each channel sits in the fragments of one codec format (Bits per
/// channel; Fp8: e4m3 codes) at head_dim HeadDim (mma.cuh's lane = 4·g + t).
template <int HeadDim, int Bits, bool Fp8>
struct fragment_layout {
  static constexpr int k_steps = HeadDim / 16;
  static constexpr int output_tiles = HeadDim / 8;
  static constexpr int key_channels = HeadDim / 4;   // per lane and key row: [t·D/4, (t+1)·D/4)
  static constexpr int value_channels = HeadDim / 8;  // per lane and value row: [g·D/8, (g+1)·D/8)
  static constexpr int key_bytes = key_channels * Bits / 8;
  static constexpr int value_bytes = value_channels * Bits / 8;
  static_assert(Bits == 8 || (Bits == 4 && !Fp8), "fragment_layout: 8-bit codes or int4");

  /// The channel (minus t·D/4) of A/B element j of k-step s: j = 0, 1 the low and
  /// high half of the first register (k 2t, 2t + 1), j = 2, 3 of the second (k 2t + 8, + 9).
  __host__ __device__ static constexpr int key_offset(int s, int j) {
    if constexpr (Bits == 4) return 8 * (s / 2) + 2 * (s % 2) + j / 2 + 4 * (j % 2);  // nibbles k, k + 4 of a word
    else return 4 * s + j;  // bytes 0..3 of word s
  }
  /// The channel of output column g of output tile j.
  __host__ __device__ static constexpr int value_channel(int j, int g) { return g * value_channels + j; }

  /// B operands (k-steps × 2 registers) of a key row (this lane's piece; t = quad),
  /// `bias` = half2(1024 + offset) (integer codes).
  __device__ __forceinline__ static void key_fragments(const std::uint8_t* row, int quad, unsigned bias,
                                                       unsigned (&b)[k_steps][2]) {
    unsigned words[key_bytes / 4];
    load_shared_words<key_bytes>(row + quad * key_bytes, words);
    [[maybe_unused]] const unsigned exponent = exponent_of_1024(bias);
    [[maybe_unused]] const unsigned odd_bias = odd_nibble_bias(bias);
#pragma unroll
    for (int s = 0; s < k_steps; ++s) {
      if constexpr (Fp8) {
        e4m3_pairs(words[s], b[s][0], b[s][1]);
      } else if constexpr (Bits == 8) {
        b[s][0] = subtract_halves(biased_halves(words[s], 0x4140u), bias);
        b[s][1] = subtract_halves(biased_halves(words[s], 0x4342u), bias);
      } else {
        // Nibble k = 2·(s % 2) + r (bits 4k .. 4k + 3 and 16 + 4k ..) of word s / 2, one shift a word:
        // the even nibbles of the word (or of it shifted by 8) masked in place give 1024 + n, the odd
        // ones masked in place 1024 + 16·n, which one fma brings to n − offset (both exact in fp16).
        const unsigned word = s % 2 == 0 ? words[s / 2] : words[s / 2] >> 8;
        b[s][0] = subtract_halves(masked_or<0x000F000Fu>(word, exponent), bias);
        b[s][1] = sixteenth_minus(masked_or<0x00F000F0u>(word, exponent), odd_bias);
      }
    }
  }

  /// B operands of P·V (output tiles × 2 registers) from the warp's 16 value rows
  /// (`rows`, `row_stride` bytes apart): tokens 2t, 2t + 1 (first register) and
  /// 2t + 8, 2t + 9 (second) at channels value_channel(j, g). Integer codes go in as the
  /// biased halves 1024 + code (int4's odd channels 1024 + 16·code), the bias subtracted once
  /// per row from the output (fragment_decoder::zero_sums) instead of once per code.
  __device__ __forceinline__ static void value_fragments(const std::uint8_t* rows, int row_stride, int lane,
                                                         unsigned bias, unsigned (&b)[output_tiles][2]) {
    const int quad = lane % 4, column = lane / 4;
    [[maybe_unused]] const unsigned exponent = exponent_of_1024(bias);
    unsigned words[4][value_bytes / 4];  // rows 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
    for (int r = 0; r < 4; ++r)
      load_shared_words<value_bytes>(rows + (2 * quad + (r % 2) + 8 * (r / 2)) * row_stride + column * value_bytes,
                                     words[r]);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int w = 0; w < value_bytes / 4; ++w) {
        const unsigned first = words[2 * half][w], second = words[2 * half + 1][w];
        if constexpr (Bits == 4) {
          // Channels 8w..8w + 7: the low 16 bits of both rows, then the high ones; one shift for each.
          // Even nibbles masked in place are 1024 + n, odd ones 1024 + 16·n: the output tiles of odd
          // channels (odd j) carry 16× the codes, and fragment_decoder::output divides them once.
          const unsigned low = __byte_perm(first, second, 0x5410u), high = __byte_perm(first, second, 0x7632u);
          const unsigned low8 = low >> 8, high8 = high >> 8;
          b[8 * w][half] = masked_or<0x000F000Fu>(low, exponent);
          b[8 * w + 1][half] = masked_or<0x00F000F0u>(low, exponent);
          b[8 * w + 2][half] = masked_or<0x000F000Fu>(low8, exponent);
          b[8 * w + 3][half] = masked_or<0x00F000F0u>(low8, exponent);
          b[8 * w + 4][half] = masked_or<0x000F000Fu>(high, exponent);
          b[8 * w + 5][half] = masked_or<0x00F000F0u>(high, exponent);
          b[8 * w + 6][half] = masked_or<0x000F000Fu>(high8, exponent);
          b[8 * w + 7][half] = masked_or<0x00F000F0u>(high8, exponent);
        } else {
          // Channels 4w..4w + 3: bytes interleaved (first, second) pairwise.
          const unsigned low = __byte_perm(first, second, 0x5140u), high = __byte_perm(first, second, 0x7362u);
          if constexpr (Fp8) {
            e4m3_pairs(low, b[4 * w][half], b[4 * w + 1][half]);
            e4m3_pairs(high, b[4 * w + 2][half], b[4 * w + 3][half]);
          } else {
            b[4 * w][half] = biased_halves(low, 0x4140u);
            b[4 * w + 1][half] = biased_halves(low, 0x4342u);
            b[4 * w + 2][half] = biased_halves(high, 0x4140u);
            b[4 * w + 3][half] = biased_halves(high, 0x4342u);
          }
        }
      }
  }
};

__device__ __forceinline__ unsigned pack_halves(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<const unsigned*>(&pair);
}
__device__ __forceinline__ unsigned repeat_half(float x) { return pack_halves(x, x); }

/// The codecs decode attention reads through fragments (every other codec: the dequantize-tile path).
template <class CodecT, int HeadDim, int Group>
struct fragment_decoder {
  static constexpr bool supported = false;
  static constexpr bool always_reads = false;
  static constexpr bool skips_unit_rescale = false;
};

/// int8 / int4: KIVI runs or per-token keys, per-token values, symmetric or zero points.
/// One per (warp, segment); `open` loads the query, `block` prepares a warp block's
/// query operand, `score` / `weight` apply the per-token steps, `finish` the output.
template <int Bits, int HeadDim, int Group>
  requires(HeadDim <= 128)
struct fragment_decoder<codec::quantized<Bits>, HeadDim, Group> {
  static constexpr bool supported = true;
  using layout = fragment_layout<HeadDim, Bits, false>;
  using storage = typename codec::quantized<Bits>::template storage<device_space>;
  using quantizer = detail::integer_quantizer<Bits>;
  static constexpr int k_steps = layout::k_steps;
  static constexpr int row_blocks = Group > 8 ? 2 : 1;
  static constexpr int tile_tokens = 128;  // decode_attention.cuh's tensor_core_geometry with code fragments
  /// Whether the transposed product skips the output's rescale when no lane's running maximum moved
  /// (a warp vote in place of 32 multiplications by 1): int4 issues ~1200 instructions a 32-token
  /// step and is issue-bound there; fp8 and int8 wait on memory, and the vote's branch cost fp8 ~1.5 %
  /// (H100, W 32k, 2026-12-07; int8 was not measured with the vote alone).
  static constexpr bool skips_unit_rescale = Bits == 4;
  template <int Threads>
  using side = quantized_tile_side<HeadDim, tile_tokens, Threads>;
  using side_type = side<128>;

  /// Whether the fragments can read this storage: per-token keys, or runs of whole warp blocks
  /// (a power of two ≥ 16 slots: the run of a slot is a shift) whose per-channel steps are
  /// 16-byte aligned (they travel by 16-byte cp.async; an engine's own storage may not be:
  /// then the dequantize-tile path reads it).
  static constexpr bool always_reads = false;
  __host__ __device__ static bool reads(const storage& store) {
    if (store.key_group == 0) return true;
    const bool aligned_steps = reinterpret_cast<std::uintptr_t>(store.key_scales) % 16 == 0 &&
                               (!store.asymmetric || reinterpret_cast<std::uintptr_t>(store.key_zeros) % 16 == 0);
    return aligned_steps && store.slot_run % 16 == 0 && (store.slot_run & (store.slot_run - 1)) == 0;
  }
  template <int Threads>
  __device__ static side<Threads> make_side(const storage& store, std::int64_t head, std::int64_t length) {
    const bool token_keys = store.key_group == 0;
    const std::int64_t sealed_end = token_keys ? length : length - store.residual_count[head];
    const int run_shift = __ffsll(static_cast<long long>(store.slot_run)) - 1;
    return {store.value_scales, store.value_zeros, store.key_scales, store.key_zeros, sealed_end,
            run_shift,          store.asymmetric,  token_keys};
  }

  storage store;
  std::int64_t head;
  std::int64_t sealed_end;
  unsigned bias;  // half2(1024 + code offset)
  float value_bias;  // 1024 + code offset: the value operands are the biased halves (value_fragments)
  float query[k_steps][row_blocks][4];  // this lane's query channels (key_offset order), × log2(e)/√D
  float query_sum[row_blocks];          // Σ_d q_d over the whole row (per-token key zero points)
  // Per row block, or in the transposed product per column e (query head 2t + e): Σ_t p_t z_t and
  // Σ_t p'_t of this lane's tokens and fp16 weights (rescaled with the softmax).
  static constexpr int lane_heads = 2;  // ≥ row_blocks
  float value_zero_sum[lane_heads];
  float weight_sum[lane_heads];
  float column_query_sum[2];  // transposed: query_sum of heads 2t, 2t + 1
  // The current warp block (row form; column_* the transposed product's heads 2t, 2t + 1):
  bool residual = false;     // keys from the fp16 residual window (the filling group)
  float score_scale[row_blocks];
  float score_offset[row_blocks];
  float column_scale[2];
  float column_offset[2];

  /// `queries`: the group's first query row; `length`: the head's.
  template <class QueryT>
  __device__ __forceinline__ void open(const storage& store_, std::int64_t head_, std::int64_t length,
                                       const QueryT* queries, std::int64_t head_stride, float query_scale, int lane) {
    store = store_, head = head_;
    sealed_end = store.key_group == 0 ? length : length - store.residual_count[head];
    value_bias = 1024.0f + (store.asymmetric ? 0.0f : static_cast<float>(quantizer::symmetric_offset));
    bias = repeat_half(value_bias);
    const int quad = lane % 4, head_row = lane / 4;
    // split_query: lanes 16–31 (columns 4–7, padding) hold the query of head lane / 4 − 4 with its two
    // halves of k-steps swapped (scale_query's half of that head).
    const bool back = split_query && lane >= 16;
#pragma unroll
    for (int rb = 0; rb < row_blocks; ++rb) {
      const int row = (back ? head_row - 4 : head_row) + 8 * rb;
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < k_steps; ++s)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int step = back ? (s + k_steps / 2) % k_steps : s;
          const float q = row < Group ? to_float(queries[row * head_stride + quad * layout::key_channels +
                                                         layout::key_offset(step, j)]) * query_scale
                                      : 0.0f;
          query[s][rb][j] = q;
          sum += q;
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      query_sum[rb] = sum;
    }
#pragma unroll
    for (int e = 0; e < lane_heads; ++e) value_zero_sum[e] = 0.0f, weight_sum[e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 2; ++e) column_query_sum[e] = __shfl_sync(0xffffffffu, query_sum[0], column_lane(lane, e));
  }

  /// Transposed product: the lane holding head 2t + e's row state (the quad of row 2t + e).
  __device__ __forceinline__ static int column_lane(int lane, int e) { return 8 * (lane % 4) + 4 * e; }
  /// Transposed product, after `block`: this lane's columns' score steps (warp-uniform call).
  __device__ __forceinline__ void columns(int lane) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      column_scale[e] = __shfl_sync(0xffffffffu, score_scale[0], column_lane(lane, e));
      column_offset[e] = __shfl_sync(0xffffffffu, score_offset[0], column_lane(lane, e));
    }
  }

  /// The query operand of the warp block of 16 tokens starting at `first`: a[step][4] (mma.cuh's A).
  /// A block past the segment's end (its scores are masked) reads codes with the plain query:
  /// its run's steps were not staged. Every branch packs straight into `a` (no intermediate
  /// copy of the query: the ncu source counters showed 32 register moves per block from one).
  /// `block_index`: the block's place in the tile (its staged run steps).
  __device__ __forceinline__ void block(const float* side_tile, int block_index, std::int64_t first,
                                        std::int64_t end, int lane, unsigned (&a)[k_steps][4]) {
    residual = store.key_group != 0 && first >= sealed_end;
    if (store.key_group != 0 && !residual && first < end) {
      // One branch on the zero points per block, not one per staged piece.
      if (store.asymmetric)
        scale_query<true>(side_tile, block_index, lane, a);
      else
        scale_query<false>(side_tile, block_index, lane, a);
      return;
    }
#pragma unroll
    for (int rb = 0; rb < row_blocks; ++rb) score_scale[rb] = 1.0f, score_offset[rb] = 0.0f;
#pragma unroll
    for (int s = 0; s < k_steps; ++s) {
      a[s][0] = pack_halves(query[s][0][0], query[s][0][1]);
      a[s][2] = pack_halves(query[s][0][2], query[s][0][3]);
      a[s][1] = row_blocks > 1 ? pack_halves(query[s][row_blocks - 1][0], query[s][row_blocks - 1][1]) : 0u;
      a[s][3] = row_blocks > 1 ? pack_halves(query[s][row_blocks - 1][2], query[s][row_blocks - 1][3]) : 0u;
    }
  }

  /// KIVI: q'_d = q_d·s_d·2^e per row, e from the row's largest |q_d·s_d|; zero points: Σ_d q_d z_d.
  /// Whether block `block_index` (> 0) of the tile reads with the query operand (and score steps)
  /// of block_index − 1: per-token keys always (their operand is the plain query), KIVI blocks of
  /// one sealed run.
  __device__ __forceinline__ bool reuses_query(const float* side_tile, int block_index) const {
    return store.key_group == 0 || side_type::same_run(side_tile, block_index);
  }

  /// int4 at groups of at most 4 (the transposed product, query heads as mma columns 0–7): columns
  /// 4–7 are padding, so each head's run scaling is split between the lane of its column (k-steps of
  /// the first half) and the padding lane 16 above it (the second half; open() stored its query with
  /// the halves swapped), each half's operand then passed across — the products, maxima, conversions
  /// and step loads halved for 8–10 shuffles more (head dim 128; 5–6 at 64). H100, W 32k (2026-12-07): int4 zero points −1.5 % at
  /// GQA 4, −2.8 % at GQA 1, symmetric int4 unchanged; int8, which waits on memory rather than on
  /// issue, was 0.3–1.3 % slower with it, so it keeps the whole row per lane.
  static constexpr bool split_query = Bits == 4 && Group <= 4;
  static_assert(!split_query || k_steps % 4 == 0, "split_query: halves of whole k-step pairs (a word's nibbles)");

  template <bool Asymmetric>
  __device__ __forceinline__ void scale_query(const float* side_tile, int block_index, int lane,
                                              unsigned (&a)[k_steps][4]) {
    // This lane's channels' steps (and zero points): 16-byte shared loads (16-byte aligned pieces) —
    // of its half of the k-steps when split (the back lane's: the second half, staged after the first).
    const int quad = lane % 4;
    static_assert(side_type::quad_pieces == layout::key_channels / 4, "scale_query: a quad's pieces of the run steps");
    constexpr int own_steps = split_query ? k_steps / 2 : k_steps;
    constexpr int own_channels = split_query ? layout::key_channels / 2 : layout::key_channels;
    const int first_piece = quad * side_type::quad_pieces + (split_query && lane >= 16 ? own_channels / 4 : 0);
    float steps[own_channels];
    [[maybe_unused]] float zeros[Asymmetric ? own_channels : 1];
    // The lane's pieces lie within its quad's (first_piece + i < (quad + 1)·quad_pieces), so piece
    // first_piece + i is staged 4·i floats after piece first_piece: one address, then immediate
    // offsets (ncu, int4 at W: per-piece staged_at took ~30 IMAD / LEA a 32-token step).
    const float* own_pieces = side_tile + side_type::run_steps_at + side_type::staged_at(block_index, first_piece);
#pragma unroll
    for (int i = 0; i < own_channels / 4; ++i) {
      *reinterpret_cast<float4*>(steps + 4 * i) = *reinterpret_cast<const float4*>(own_pieces + 4 * i);
      if constexpr (Asymmetric)
        *reinterpret_cast<float4*>(zeros + 4 * i) = *reinterpret_cast<const float4*>(
            own_pieces + (side_type::run_zeros_at - side_type::run_steps_at) + 4 * i);
    }
    float up[row_blocks];
#pragma unroll
    for (int rb = 0; rb < row_blocks; ++rb) {
      float largest = 0.0f, zero_dot = 0.0f;
#pragma unroll
      for (int s = 0; s < own_steps; ++s)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          largest = fmaxf(largest, fabsf(query[s][rb][j] * steps[layout::key_offset(s, j)]));
          if constexpr (Asymmetric) zero_dot = fmaf(query[s][rb][j], zeros[layout::key_offset(s, j)], zero_dot);
        }
      if constexpr (split_query) {
        largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 16));
        if constexpr (Asymmetric) zero_dot += __shfl_xor_sync(0xffffffffu, zero_dot, 16);
      }
      largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 1));
      largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 2));
      if constexpr (Asymmetric) {
        zero_dot += __shfl_xor_sync(0xffffffffu, zero_dot, 1);
        zero_dot += __shfl_xor_sync(0xffffffffu, zero_dot, 2);
      }
      // 2^e with largest·2^e in [2^8, 2^9): exact powers of two (largest = 0 or below fp32's normals: e = 0).
      const int exponent = (__float_as_int(largest) >> 23) & 0xFF;
      const int e = exponent == 0 ? 0 : min(135 - exponent, 126);
      up[rb] = __int_as_float((127 + e) << 23);
      score_scale[rb] = __int_as_float((127 - e) << 23);
      score_offset[rb] = zero_dot;
    }
    // (q·s)·2^e: the product is recomputed rather than kept (32 more live registers per row block);
    // multiplying by the exact power of two rounds exactly as scaling the kept product would.
    const auto scaled = [&](int s, int rb, int j) { return query[s][rb][j] * steps[layout::key_offset(s, j)] * up[rb]; };
#pragma unroll
    for (int s = 0; s < own_steps; ++s) {
      a[s][0] = pack_halves(scaled(s, 0, 0), scaled(s, 0, 1));
      a[s][2] = pack_halves(scaled(s, 0, 2), scaled(s, 0, 3));
      a[s][1] = row_blocks > 1 ? pack_halves(scaled(s, row_blocks - 1, 0), scaled(s, row_blocks - 1, 1)) : 0u;
      a[s][3] = row_blocks > 1 ? pack_halves(scaled(s, row_blocks - 1, 2), scaled(s, row_blocks - 1, 3)) : 0u;
    }
    if constexpr (split_query) {
      // The column lane takes the second half from the padding lane; the padding lane's column (4–7,
      // masked) gets the first half in the second half's place.
#pragma unroll
      for (int s = 0; s < own_steps; ++s) {
        a[own_steps + s][0] = __shfl_xor_sync(0xffffffffu, a[s][0], 16);
        a[own_steps + s][2] = __shfl_xor_sync(0xffffffffu, a[s][2], 16);
        a[own_steps + s][1] = a[own_steps + s][3] = 0u;
      }
    }
  }

  /// Key operands of the 8 tokens [first, first + 8) of the block: this lane's token first + lane / 4,
  /// `row` its staged code row.
  __device__ __forceinline__ void keys(const std::uint8_t* row, std::int64_t first, int lane,
                                       unsigned (&b)[k_steps][2]) const {
    const int quad = lane % 4;
    if (!residual) {
      layout::key_fragments(row, quad, bias, b);
      return;
    }
    // The filling group: fp16 keys at place (logical index mod G) of the head's residual window.
    const std::int64_t token = first + lane / 4;
    const auto* source = reinterpret_cast<const __half*>(store.residual_keys) +
                         (head * store.key_group + token % store.key_group) * HeadDim + quad * layout::key_channels;
    __half channel[layout::key_channels];
#pragma unroll
    for (int i = 0; i < layout::key_channels / 8; ++i)
      *reinterpret_cast<uint4*>(channel + 8 * i) = __ldg(reinterpret_cast<const uint4*>(source) + i);
#pragma unroll
    for (int s = 0; s < k_steps; ++s)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const __half2 pair = __halves2half2(channel[layout::key_offset(s, 2 * r)], channel[layout::key_offset(s, 2 * r + 1)]);
        b[s][r] = *reinterpret_cast<const unsigned*>(&pair);
      }
  }

  /// The logit (base 2, before the compensation bias) of a token from its accumulator;
  /// `index` its place in the tile (side data), row block rb's steps.
  __device__ __forceinline__ float score(float accumulator, int rb, const float* side_tile, int index) const {
    return logit(accumulator, side_tile, index, query_sum[rb], score_scale[rb], score_offset[rb]);
  }
  /// `score` for the transposed product's column e (query head 2t + e).
  __device__ __forceinline__ float column_score(float accumulator, int e, const float* side_tile, int index) const {
    return logit(accumulator, side_tile, index, column_query_sum[e], column_scale[e], column_offset[e]);
  }
  /// Per-token keys: the token's step and zero point (times the head's Σ_d q_d); KIVI runs: the
  /// run's score step and offset of the head.
  __device__ __forceinline__ float logit(float accumulator, const float* side_tile, int index, float head_query_sum,
                                         float scale, float offset) const {
    if (store.key_group == 0) {
      const float step = side_tile[2 * tile_tokens + index];
      const float zero = store.asymmetric ? side_tile[3 * tile_tokens + index] : 0.0f;
      return fmaf(accumulator, step, zero * head_query_sum);
    }
    return fmaf(accumulator, scale, offset);
  }
  /// p' = p·s_t for the P·V product, rounded to the fp16 the product reads (the kernel's pack
  /// keeps it exactly); Σ p' kept for the value bias, Σ p z aside.
  /// The P·V product reads the biased codes 1024 + b = c̄ + β (β = 1024 + offset), so it sums
  /// Σ p'(c̄ + β) = Σ p' c̄ + β Σ p': zero_sum subtracts β Σ p' once per row — one fp32 product in
  /// place of a half2 subtraction per two codes (64 a warp step at head_dim 128). The
  /// accumulator then carries β Σ p' ≈ 1151 Σ p' beside Σ p' c̄ (|c̄| ≤ 127): its fp32 rounding,
  /// ~β·2⁻²⁴ of a step per addition, stays orders below the codec's half-step error. (int4's odd
  /// output tiles carry 1024 + 16·code, at most 1264 a step, and are divided by 16 once: less.)
  __device__ __forceinline__ float weight(float p, int rb, const float* side_tile, int index) {
    if (store.asymmetric) value_zero_sum[rb] = fmaf(p, side_tile[tile_tokens + index], value_zero_sum[rb]);
    const float scaled = __half2float(__float2half_rn(p * side_tile[index]));
    weight_sum[rb] += scaled;
    return scaled;
  }
  __device__ __forceinline__ void rescale(int rb, float factor) {
    value_zero_sum[rb] *= factor;
    weight_sum[rb] *= factor;
  }
  /// int4's value operands of odd output tiles j (odd channels within their word's nibbles) are
  /// 1024 + 16·code (value_fragments): their accumulators hold Σ p'(1024 + 16·c̄ + 16·offset).
  static constexpr bool sixteenfold_odd_tiles = Bits == 4;
  /// The output of row block rb at output tile j's channel: the P·V accumulator (odd tiles of int4
  /// divided by 16, exactly) plus Σ p z minus the bias times Σ p' (`zero_sum`: zero_sums(rb)[j % 2]).
  __device__ __forceinline__ float output(float accumulator, float zero_sum, int j) const {
    return sixteenfold_odd_tiles && j % 2 != 0 ? fmaf(accumulator, 0.0625f, zero_sum) : accumulator + zero_sum;
  }
  /// The value bias the accumulators of output tiles of parity `odd` carry per unit of Σ p': 1024 + offset,
  /// or (1024 + 16·offset) / 16 = 64 + offset for int4's odd tiles.
  __device__ __forceinline__ float carried_bias(int odd) const {
    return sixteenfold_odd_tiles && odd ? value_bias - 960.0f : value_bias;
  }
  /// Row block rb's `output` argument per output-tile parity — sums[j % 2] for tile j: Σ p z − bias·Σ p',
  /// this lane's part summed over the quad. Only int4's odd tiles carry a bias of their own; every
  /// other codec's odd tiles take the even tiles' sum (an epilogue that chose per parity itself once
  /// gave int8's odd tiles 0 at GQA 16, 2026-12-07).
  __device__ __forceinline__ void zero_sums(int rb, float (&sums)[2]) const {
    parity_sums<1, 2>(weight_sum[rb], value_zero_sum[rb], sums);
  }
  /// Transposed product: zero_sums of column e (query head 2t + e), summed over the lanes holding
  /// that head (the eight g).
  __device__ __forceinline__ void column_zero_sums(int e, float (&sums)[2]) const {
    parity_sums<4, 8, 16>(weight_sum[e], value_zero_sum[e], sums);
  }
  /// Σ p z − bias·Σ p' per parity from this lane's parts, summed over the lanes `LaneMasks` reach.
  template <unsigned... LaneMasks>
  __device__ __forceinline__ void parity_sums(float weights, float zeros, float (&sums)[2]) const {
#pragma unroll
    for (int odd = 0; odd < (sixteenfold_odd_tiles ? 2 : 1); ++odd) {
      float sum = fmaf(-carried_bias(odd), weights, zeros);
      ((sum += __shfl_xor_sync(0xffffffffu, sum, LaneMasks)), ...);
      sums[odd] = sum;
    }
    if constexpr (!sixteenfold_odd_tiles) sums[1] = sums[0];
  }
  __device__ __forceinline__ void values(const std::uint8_t* rows, int row_stride, int lane,
                                         unsigned (&b)[layout::output_tiles][2]) const {
    layout::value_fragments(rows, row_stride, lane, bias, b);
  }
};

/// fp8 e4m3: one key and one value scale per head.
template <int HeadDim, int Group>
  requires(HeadDim <= 128)
struct fragment_decoder<codec::fp8, HeadDim, Group> {
  static constexpr bool supported = true;
  using layout = fragment_layout<HeadDim, 8, true>;
  using storage = codec::fp8::storage<device_space>;
  static constexpr int k_steps = layout::k_steps;
  static constexpr int row_blocks = Group > 8 ? 2 : 1;
  static constexpr bool skips_unit_rescale = false;  // see the integer codecs' decoder
  template <int Threads>
  using side = no_tile_side;

  static constexpr bool always_reads = true;
  __host__ __device__ static bool reads(const storage&) { return true; }
  template <int Threads>
  __device__ static side<Threads> make_side(const storage&, std::int64_t, std::int64_t) {
    return {};
  }

  unsigned query_fragment[k_steps][4];
  float key_scale, value_scale;

  template <class QueryT>
  __device__ __forceinline__ void open(const storage& store, std::int64_t head, std::int64_t,
                                       const QueryT* queries, std::int64_t head_stride, float query_scale, int lane) {
    key_scale = store.key_scales[head] * query_scale;
    value_scale = store.value_scales[head];
    const int quad = lane % 4, head_row = lane / 4;
    const auto q = [&](int row, int s, int j) {
      return row < Group ? to_float(queries[row * head_stride + quad * layout::key_channels + layout::key_offset(s, j)])
                         : 0.0f;
    };
#pragma unroll
    for (int s = 0; s < k_steps; ++s) {
      query_fragment[s][0] = pack_halves(q(head_row, s, 0), q(head_row, s, 1));
      query_fragment[s][2] = pack_halves(q(head_row, s, 2), q(head_row, s, 3));
      query_fragment[s][1] = row_blocks > 1 ? pack_halves(q(head_row + 8, s, 0), q(head_row + 8, s, 1)) : 0u;
      query_fragment[s][3] = row_blocks > 1 ? pack_halves(q(head_row + 8, s, 2), q(head_row + 8, s, 3)) : 0u;
    }
  }
  __device__ __forceinline__ bool reuses_query(const float*, int) const { return true; }
  __device__ __forceinline__ void block(const float*, int, std::int64_t, std::int64_t, int,
                                        unsigned (&a)[k_steps][4]) const {
#pragma unroll
    for (int s = 0; s < k_steps; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[s][i] = query_fragment[s][i];
  }
  __device__ __forceinline__ void keys(const std::uint8_t* row, std::int64_t, int lane, unsigned (&b)[k_steps][2]) const {
    layout::key_fragments(row, lane % 4, 0u, b);
  }
  __device__ __forceinline__ float score(float accumulator, int, const float*, int) const { return accumulator * key_scale; }
  __device__ __forceinline__ void columns(int) const {}
  __device__ __forceinline__ float column_score(float accumulator, int, const float*, int) const {
    return accumulator * key_scale;
  }
  __device__ __forceinline__ float weight(float p, int, const float*, int) const { return p; }
  __device__ __forceinline__ void rescale(int, float) const {}
  __device__ __forceinline__ void zero_sums(int, float (&sums)[2]) const { sums[0] = sums[1] = 0.0f; }
  __device__ __forceinline__ void column_zero_sums(int, float (&sums)[2]) const { sums[0] = sums[1] = 0.0f; }
  __device__ __forceinline__ float output(float accumulator, float, int) const { return accumulator * value_scale; }
  __device__ __forceinline__ void values(const std::uint8_t* rows, int row_stride, int lane,
                                         unsigned (&b)[layout::output_tiles][2]) const {
    layout::value_fragments(rows, row_stride, lane, 0u, b);
  }
};

}  // namespace kvtrim::cuda_detail
