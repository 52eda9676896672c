// kvtrim/backend/cuda/attention_mass_base.cuh — what the SnapKV / H2O attention-mass
// passes share, whichever instructions multiply (attention_mass.cuh: fp32 loops and
// mma.sync; attention_mass_wgmma.cuh: Hopper's wgmma): the tile sizes, the parameters
// by value, the row chunks and their causal extents, where a row lives in a caller's
// [B, Hq, n_q] normalisers and their base-2 form, the base-2 exponential, the merge of
// two (max, Σexp) parts and the cp.async helpers. attention_mass.cuh explains the math.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kvtrim::cuda_detail {

/// Query rows and keys per tile product; threads per block of both passes.
inline constexpr int mass_tile = 64;
inline constexpr int mass_threads = 128;
/// Row stride of the fp32 path's logit tile in shared memory: with the rotated
/// column order of pass 1, the 32 rows a warp reads land in 32 different banks.
inline constexpr int mass_logit_stride = mass_tile + 4;
/// Pass 1 aims at this many blocks before it stops splitting keys: ~10 waves of
/// 3 blocks on 132 SMs (an H200), so the last partial wave costs a few per cent
/// (1024 left 2.6 waves: a third of the last wave idle).
inline constexpr std::int64_t mass_target_blocks = 4096;
inline constexpr std::int64_t mass_max_splits = 64;

__host__ __device__ __forceinline__ std::int64_t mass_ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ std::int64_t mass_min(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

/// The rows' normalisers from the caller (instead of pass 1 and the fold): the
/// fold's row order, (unit = b·kv_heads + h, chunk = g·chunks_per_head + c, r),
/// query head h·G + g, observed query t = first + 64c + r.
struct given_lse_rows {
  const float* data;  // [B, Hq, n_q], natural log
  std::int64_t batch_stride, head_stride, query_stride;
};

/// What the two passes and the finish read (FlashInfer-style parameters by value).
template <class KeyT, class QueryT>
struct attention_mass_parameters {
  const KeyT* keys;  // [B, H, T, D] strided
  std::int64_t key_batch_stride, key_head_stride, key_token_stride, key_channel_stride;
  const QueryT* queries;  // [B, Hq, n_q, D] strided
  std::int64_t query_batch_stride, query_head_stride, query_token_stride, query_channel_stride;
  bool vector_loads;  // channel strides 1, rows 16-byte aligned
  std::int64_t batch, kv_heads, group, tokens, observed;
  std::int64_t first;           // first observed query that counts: t ∈ [first, observed)
  std::int64_t chunks_per_head; // ⌈(observed − first) / 64⌉ row chunks per query head
  std::int64_t splits;          // key splits of pass 1
  std::int64_t split_tiles;     // key tiles per split
  std::int64_t length;          // keys whose mass is needed: [0, length)
  float log2_scale;             // log2(e)/√D: logits in base-2 units (see the header)
  float2* partial;              // [units · G · chunks · 64, splits]: (max, Σexp) per split
  float2* stats;                // [units · G · chunks · 64]: (m, 1/Z), the reciprocal taken once per row
  float* mass;                  // [B, Hq, length]
  float* lse;                   // [units · G · chunks · 64]: L = m + log2 Z (the wgmma pass 2), or null
  std::int64_t column_tiles;    // key tiles per block of the wgmma pass 2
  given_lse_rows given;         // the caller's normalisers, which the wgmma pass 2 stages in place of
                                // `lse` (data null: it reads `lse`)
};

/// Rows of one unit's row chunk `chunk` (g-major: chunk = g · chunks_per_head + c).
struct row_chunk {
  std::int64_t g, t0, count;  // query head in the group, first observed query, rows
  std::int64_t last_position; // position of its last row: keys ≤ this are visible to some row
};

template <class Parameters>
__device__ __forceinline__ row_chunk chunk_rows(const Parameters& p, std::int64_t chunk) {
  row_chunk rows;
  rows.g = chunk / p.chunks_per_head;
  rows.t0 = p.first + (chunk % p.chunks_per_head) * mass_tile;
  rows.count = mass_min(std::int64_t{mass_tile}, p.observed - rows.t0);
  rows.last_position = p.tokens - p.observed + rows.t0 + rows.count - 1;
  return rows;
}

/// Where plan row `row` lives in a [B, Hq, n_q] tensor of the observed queries (the fold's
/// row order, as given_lse_rows); `observed` false for the rows past a chunk's queries.
struct mass_row_place {
  std::int64_t batch, query_head, query;
  bool observed;
};
template <class Parameters>
__device__ __forceinline__ mass_row_place place_of_mass_row(const Parameters& p, std::int64_t row) {
  const std::int64_t row_chunks = p.group * p.chunks_per_head;
  const std::int64_t in_chunk = row % mass_tile, unit = row / mass_tile / row_chunks;
  const row_chunk chunk = chunk_rows(p, (row / mass_tile) % row_chunks);
  return {unit / p.kv_heads, (unit % p.kv_heads) * p.group + chunk.g, chunk.t0 + in_chunk, in_chunk < chunk.count};
}

/// A caller's natural-log normaliser in the passes' base 2: rounded once from the double
/// product (+∞ past FLT_MAX, as the CPU's float arithmetic gives; ±∞ and NaN give +∞).
__device__ __forceinline__ float given_lse_base2(float lse) {
  return isfinite(lse) ? __double2float_rn(static_cast<double>(lse) * 1.4426950408889634) : INFINITY;
}
/// The caller's normaliser of plan row `row` (an observed one), in base 2.
template <class Parameters>
__device__ __forceinline__ float given_row_lse(const Parameters& p, std::int64_t row) {
  const mass_row_place place = place_of_mass_row(p, row);
  return given_lse_base2(p.given.data[place.batch * p.given.batch_stride + place.query_head * p.given.head_stride +
                                      place.query * p.given.query_stride]);
}

/// Row chunks [this, chunks_per_head) of every query head see the key tile at
/// j0 (causal; every head has one: the chunk of the last query sees every key).
template <class Parameters>
__device__ __forceinline__ std::int64_t first_chunk_seeing(const Parameters& p, std::int64_t j0) {
  std::int64_t first = 0;
  while (first + 1 < p.chunks_per_head && chunk_rows(p, first).last_position < j0) ++first;
  return first;
}

/// (max, Σexp) of two parts of a row.
__device__ __forceinline__ float2 mass_merge_stats(float2 a, float2 b) {
  const float m = fmaxf(a.x, b.x);
  if (m == -INFINITY) return make_float2(-INFINITY, 0.0f);
  return make_float2(m, (a.x > -INFINITY ? a.y * exp2f(a.x - m) : 0.0f) + (b.x > -INFINITY ? b.y * exp2f(b.x - m) : 0.0f));
}

/// 2^x on the MUFU unit with subnormal results flushed to zero (ex2.approx.ftz:
/// 2 ulp, like exp2f, without exp2f's rescaling around subnormals). A flushed
/// term is a probability below 2⁻¹²⁶ of its row: every score it could reach
/// moves by less than rows · 2⁻¹²⁶ < 10⁻³⁵ in absolute terms.
__device__ __forceinline__ float mass_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// cp.async of 16 bytes global → shared (sm_80+), zero-filled when !valid:
/// the next tile loads while the current one is multiplied.
__device__ __forceinline__ void mass_async_copy16(void* shared, const void* global, bool valid) {
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void mass_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void mass_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

}  // namespace kvtrim::cuda_detail
