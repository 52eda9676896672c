// kvtrim/backend/cuda/codec_low_rank.cuh — codec::low_rank (r fp16
// coefficients per token in a per-head orthonormal basis, codec/low_rank.hpp)
// on the GPU: the device encode of every layout's compaction and append, the
// flat layout's slot mover, the installation of a head's bases, and decode
// attention over the coefficients.
//
// Bases: both sources. basis_source::profile: fitted on the host (the CPU's
// Eigen SVD: io/low_rank_profile.hpp's calibration, or the caller's) and
// installed with set_low_rank_basis, which checks them exactly as the CPU's
// set_basis does and copies them to the device (a setup step, not a hot path).
// basis_source::sequence (the codec's default): fitted on the device at every
// compaction and grown every update_freq appended tokens, by the CPU's rules
// (low_rank_fit.cuh: Gram matrices in double, cuSOLVER's batched eigen-solver,
// a Jacobi refresh in one block per head); update_freq ≤ 32 on the device.
//
// Encode (low_rank_encode_rows, a warp per eight rows, a lane per coefficient): c_j = Σ_d U_dj·x_d for
// j < the head's rank, else 0, rounded to fp16 — the CPU's project(): the same
// summation order (d ascending from 0), each product and sum rounded to fp32
// separately (__fmul_rn / __fadd_rn: no contraction into an fma), the same
// round-to-nearest-even to fp16, so the stored coefficients are the CPU's bit
// for bit — as long as the host build does not contract the CPU's
// `sum += u·x` into an fma either (x86-64 without -march flags has no fma
// instruction, the project's builds; with one, -ffp-contract=off keeps it). At compaction
// every head's pending_counts becomes 0 and its compaction_left its kept count
// (0 with refreshes: the CPU's encodes count it down), as the CPU leaves them. A head with no basis (rank 0) stores
// zeros; NaN / Inf inputs are stored as the arithmetic gives them (the CPU
// refuses both; a kernel cannot throw).
//
// Decode (decode_attention_low_rank, one kernel for every layout, group 1–16,
// head_dim 64–256): a block reads a head's segment in tiles of 256 tokens; the
// tiles' key and value coefficient rows stream into shared memory through a
// double-buffered cp.async ring (16-byte chunks when the stored rank is a
// multiple of 8, else element copies), and every thread scores one token for
// all the group's query heads:
//   post-RoPE: s_g = (Uᵀq_g)·c — the query projected once per segment
//              (q̃_g = U_kᵀ q_g · log2(e)/√D, R·D products per query head);
//   pre-RoPE:  the CPU's method per token: k̂ = U_k c (U_k staged in shared
//              memory; sixteen channels at a time), rotated to the token's
//              stored position (the angle in double as core/rope.hpp, reduced
//              to [−π, π] and its sine and cosine in float: rope_sincos), then
//              s_g = q_g·k̂ · log2(e)/√D;
// plus the compensation bias (base 2). The softmax is online per tile with one
// running maximum per query head shared by the block; the weights go to shared
// memory and the values are mixed in coefficient space (m_g = Σ p·c^v, each
// thread one coefficient of a token subset), lifted once per segment
// (o_g = U_v m_g / Σ p) and written, or left as a partial for the split-K merge
// (merge_decode_partials: lifting is linear, so partials lift before merging).
// Everything is fp32 on CUDA cores. Post-RoPE caches of stored rank 16, 32 or 64
// (any head dim; r = head_dim / 4 at 64, 128, 256) take decode_attention_low_rank_mma
// instead: the same two products on the tensor cores (TF32 with the A operands
// split into hi + lo, so fp32's precision), a warp per 32 tokens of 128-token
// tiles, its own online softmax, a 2–4 stage cp.async ring — the CUDA-core
// kernel issued ~700 warp instructions per 32 tokens and read at 43 % of the
// copy bandwidth on its bytes (W, H200).
#pragma once

#include <cuda_fp16.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvtrim/backend/cuda/codec_fragments.cuh"
#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/decode_plan.cuh"
#include "kvtrim/backend/cuda/low_rank_fit.cuh"
#include "kvtrim/codec/low_rank.hpp"

namespace kvtrim::cuda_detail {

template <class CodecT>
struct codec_device;

/// What decode_attention.cuh's codec_tiles names for every device codec; the
/// low-rank kernel reads the coefficient rows itself (decode_attention_low_rank).
template <>
struct codec_device<codec::low_rank> {
  using storage = codec::low_rank::storage<device_space>;
  static constexpr bool key_groups = false;
  static constexpr bool head_scales = false;
  using stored = __half;
  template <int HeadDim>
  static constexpr int row_elements = HeadDim;  // unused: rows hold stored_rank coefficients
  __host__ __device__ static const stored* key_rows(const storage& store) {
    return reinterpret_cast<const stored*>(store.key_coefficients);
  }
  __host__ __device__ static const stored* value_rows(const storage& store) {
    return reinterpret_cast<const stored*>(store.value_coefficients);
  }
  struct reader {};
  __device__ static reader open(const storage&, std::int64_t) { return {}; }
};

// ---- host checks and bases ---------------------------------------------------

/// The most dynamic shared memory a block may opt in to on the current device (227 KB on H100/H200,
/// 163 KB on A100): a host attribute query, no synchronisation.
inline std::size_t device_shared_memory_limit(std::string_view function) {
  int device = 0, bytes = 0;
  detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  detail::check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), function,
                     "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return static_cast<std::size_t>(bytes);
}

inline std::size_t low_rank_decode_shared_bytes(int head_dim, int rank, int group, bool pre_rope);

// The tensor-core decode kernel's geometry (decode_attention_low_rank_mma, below).
inline constexpr int low_rank_mma_threads = 128;  // 4 warps × 32 tokens of a 128-token tile
inline constexpr int low_rank_mma_warps = low_rank_mma_threads / 32;
inline constexpr int low_rank_mma_tile = 128;

/// Ring stages per stored rank: 4 × 10 KB (r = 16), 2 × 18 KB (32), 2 × 42 KB (64) — with the
/// query, three blocks of four warps per multiprocessor at r ≤ 32 (two at 64), each with its next
/// tile in flight. r = 32 had three: two are 7.6–11 % faster (H100s, 2026-12-07, W 32k: 141.4 → 128.5
/// and 135.0 → 124.8 µs at GQA 4 on two machines, 140.5 → 124.9 at GQA 2, 141.5 → 127.2 at GQA 1;
/// sequence bases alike; the grid and occupancy unchanged; docs/results.md), as the tensor-core
/// attention kernels were at head dim 128 (decode_attention.cuh, tensor_core_geometry::stages). r = 16
/// was not measured at two.
__host__ __device__ constexpr int low_rank_mma_stages(std::int64_t rank) { return rank == 16 ? 4 : 2; }
/// Whether the tensor-core kernel reads this storage (else decode_attention_low_rank).
__host__ __device__ inline bool low_rank_mma_reads(std::int64_t stored_rank, bool pre_rope) {
  return !pre_rope && (stored_rank == 16 || stored_rank == 32 || stored_rank == 64);
}

/// Shared memory of the tensor-core kernel (bytes from the start). Row strides (bytes): keys 2r,
/// or 2r + 64 at r = 64 — a quarter warp's 16-byte reads cover two rows' 64 contiguous bytes, so the
/// second row must start 64 bytes (mod 128) after the first; at r = 16 (8-byte reads, half warps:
/// four rows of 32 bytes) and 32 the unpadded stride already does. Values 2r + 16: lanes read rows
/// 2t and 2t + 1 of an n-tile at byte g·r/4 — the rows of one read phase are 2·stride apart, and
/// 2·(2r + 16) ≡ 32 or 96 (mod 128) puts their r/4·(lanes of one row) = 32-byte spans in distinct banks.
struct low_rank_mma_layout {
  int rank = 0, key_stride = 0, value_stride = 0, stages = 0;
  std::size_t stage_bytes = 0;
  std::size_t query = 0;      // [head_dim][Group] float: the scaled query
  std::size_t projected = 0;  // [R][Group] float: U_kᵀ q, scaled
  std::size_t bytes = 0;

  __host__ __device__ low_rank_mma_layout(int head_dim, int rank_, int group) : rank(rank_) {
    key_stride = rank == 64 ? 2 * rank + 64 : 2 * rank;
    value_stride = 2 * rank + 16;
    stages = low_rank_mma_stages(rank);
    stage_bytes = static_cast<std::size_t>(low_rank_mma_tile) * static_cast<std::size_t>(key_stride + value_stride);
    // After the last tile the stages hold the segment's finish: per warp (max, sum, mix) per row,
    // the combined rows and mixes, and U_v transposed (low_rank_mma_segment).
    const std::size_t finish = 4 * (static_cast<std::size_t>(low_rank_mma_warps) * group * (rank + 2) +
                                    static_cast<std::size_t>(group) * (rank + 2) +
                                    static_cast<std::size_t>(rank) * (head_dim + 1));
    const std::size_t ring = static_cast<std::size_t>(stages) * stage_bytes;
    query = (ring > finish ? ring : finish + 15) / 16 * 16;
    projected = query + static_cast<std::size_t>(head_dim) * group * 4;
    bytes = projected + static_cast<std::size_t>(rank) * group * 4;
  }
};

/// The decode kernel a low-rank cache takes: the tensor-core kernel where it reads the storage and
/// its shared memory fits (the device's opt-in limit, queried once), else the CUDA-core kernel.
struct low_rank_decode_selection {
  bool tensor_cores = false;
  int threads = 0;
  std::size_t shared_bytes = 0;
  const char* kernel_name = nullptr;
};
inline constexpr int low_rank_decode_threads_cuda_cores = 256;
inline low_rank_decode_selection select_low_rank_decode(const codec::low_rank::storage<device_space>& store,
                                                        std::int64_t group, std::size_t limit) {
  const int dim = static_cast<int>(store.head_dim), rank = static_cast<int>(store.stored_rank);
  if (low_rank_mma_reads(store.stored_rank, store.pre_rope)) {
    const std::size_t bytes = low_rank_mma_layout(dim, rank, static_cast<int>(group)).bytes;
    if (bytes <= limit) return {true, low_rank_mma_threads, bytes, "decode_attention_low_rank_mma"};
  }
  return {false, low_rank_decode_threads_cuda_cores,
          low_rank_decode_shared_bytes(dim, rank, static_cast<int>(group), store.pre_rope), "decode_attention_low_rank"};
}

/// Throws unless the decode kernel this cache takes fits its tiles in a block's shared memory
/// (H200: post-RoPE ranks 16 / 32 / 64 on the tensor cores always; the CUDA-core kernel: stored
/// rank ≤ 64 at head_dim ≤ 128 for every group, at 256 ≤ 32, or 64 up to GQA 8).
/// Returns the selection (the kernel, its block and shared memory).
inline low_rank_decode_selection check_low_rank_decodable(std::string_view function,
                                                          const codec::low_rank::storage<device_space>& store,
                                                          std::int64_t group) {
  const std::size_t limit = device_shared_memory_limit(function);
  const low_rank_decode_selection selected = select_low_rank_decode(store, group, limit);
  if (selected.shared_bytes > limit)
    detail::fail(function, "config.codec.max_rank",
                 detail::cat("a stored rank whose decode tiles fit in this device's ", limit,
                             " bytes of shared memory per block (post-RoPE ranks 16, 32, 64: tensor cores; "
                             "otherwise ≤ 64 at head_dim ≤ 128; ≤ 32 at 256, or 64 up to GQA 8)"),
                 detail::cat("stored rank ", store.stored_rank, " at head_dim ", store.head_dim, ", GQA ", group, " (",
                             selected.shared_bytes, " bytes)"));
  return selected;
}

/// Throws (before any launch) for a low-rank cache the device cannot write, or could not decode.
template <class View>
void check_low_rank_writable(std::string_view function, const View& cache) {
  if constexpr (std::is_same_v<typename View::codec, codec::low_rank>) {
    if (cache.storage.from_sequence && cache.storage.update_freq > low_rank_device_max_update_freq)
      detail::fail(function, "config.codec.update_freq",
                   detail::cat("at most ", low_rank_device_max_update_freq,
                               " appended tokens between refreshes of sequence bases on backend::cuda (or 0: never)"),
                   std::to_string(cache.storage.update_freq));
    if (cache.storage.from_sequence && cache.storage.update_freq > 0) {
      // The refresh holds update_freq rows of head_dim doubles twice in one block's shared memory.
      const std::size_t needed =
          low_rank_refresh_layout(cache.storage.update_freq, cache.shape.head_dim, cache.storage.stored_rank).bytes +
          low_rank_refresh_static_bytes;
      const std::size_t limit = device_shared_memory_limit(function);
      if (needed > limit)
        detail::fail(function, "config.codec.update_freq",
                     detail::cat("an update_freq whose refresh fits in this device's ", limit,
                                 " bytes of shared memory per block at head_dim ", cache.shape.head_dim),
                     detail::cat(cache.storage.update_freq, " (", needed, " bytes)"));
    }
    check_low_rank_decodable(function, cache.storage, cache.shape.group_size());
  } else {
    (void)function, (void)cache;
  }
}

/// Installs a head's bases in a device cache: key_basis is head_dim × key_rank
/// row-major (host memory) with orthonormal columns, likewise values — the
/// CPU's set_basis, with its checks, then a copy to the device on `stream`
/// (synchronised: the host staging is freed on return; a setup step).
inline void set_low_rank_basis(const codec::low_rank::storage<device_space>& store, std::int64_t head,
                               const float* key_basis, std::int64_t key_rank, const float* value_basis,
                               std::int64_t value_rank, cudaStream_t stream) {
  constexpr std::string_view function = "kvtrim::cuda_detail::set_low_rank_basis";
  if (head < 0 || head >= store.heads) detail::fail_index(function, "head", head, store.heads);
  const std::int64_t dim = store.head_dim, r_max = store.stored_rank;
  const auto padded = [&](std::string_view argument, const float* basis, std::int64_t rank) {
    if (rank < 1 || rank > r_max)
      detail::fail(function, argument, detail::cat("a basis of rank 1 to ", r_max, " (the stored rank)"),
                   detail::cat("rank ", rank));
    if (basis == nullptr) detail::fail(function, argument, "a head_dim × rank basis", "nullptr");
    Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> columns(basis, dim, rank);
    if (!columns.allFinite()) detail::fail(function, argument, "finite entries", "NaN or Inf");
    const double deviation =
        (columns.cast<double>().transpose() * columns.cast<double>() - Eigen::MatrixXd::Identity(rank, rank))
            .cwiseAbs()
            .maxCoeff();
    if (deviation > 1e-3)
      detail::fail(function, argument, "orthonormal columns (|UᵀU − I| ≤ 1e-3)", detail::cat("|UᵀU − I| = ", deviation));
    // The CPU's write_basis: through double, rounded to float, columns from the rank on 0.
    std::vector<float> out(static_cast<std::size_t>(dim * r_max), 0.0f);
    for (std::int64_t d = 0; d < dim; ++d)
      for (std::int64_t j = 0; j < rank; ++j)
        out[static_cast<std::size_t>(d * r_max + j)] = static_cast<float>(static_cast<double>(columns(d, j)));
    return out;
  };
  const std::vector<float> keys = padded("key_basis", key_basis, key_rank);
  const std::vector<float> values = padded("value_basis", value_basis, value_rank);
  const std::int32_t ranks[2] = {static_cast<std::int32_t>(key_rank), static_cast<std::int32_t>(value_rank)};
  const std::size_t basis_bytes = keys.size() * sizeof(float);
  detail::check_cuda(cudaMemcpyAsync(store.key_bases + head * dim * r_max, keys.data(), basis_bytes,
                                     cudaMemcpyHostToDevice, stream),
                     function, "cudaMemcpyAsync(key_bases)");
  detail::check_cuda(cudaMemcpyAsync(store.value_bases + head * dim * r_max, values.data(), basis_bytes,
                                     cudaMemcpyHostToDevice, stream),
                     function, "cudaMemcpyAsync(value_bases)");
  detail::check_cuda(cudaMemcpyAsync(store.key_ranks + head, ranks, 4, cudaMemcpyHostToDevice, stream), function,
                     "cudaMemcpyAsync(key_ranks)");
  detail::check_cuda(cudaMemcpyAsync(store.value_ranks + head, ranks + 1, 4, cudaMemcpyHostToDevice, stream),
                     function, "cudaMemcpyAsync(value_ranks)");
  detail::check_cuda(cudaStreamSynchronize(stream), function, "cudaStreamSynchronize");
}

// ---- encode -------------------------------------------------------------------

inline constexpr int low_rank_encode_threads = 128;
/// Rows a warp encodes together. Each coefficient is a chain of head_dim dependent additions in the CPU's
/// order (d ascending, no fma), so a warp that encodes one row at a time waits on that chain; eight rows
/// give every lane eight independent chains, and each basis element it loads serves all eight.
inline constexpr int low_rank_encode_rows_per_warp = 8;
/// Batches of rows each warp takes per head (when the head has that many): the per-head setup (its
/// coordinates, ranks, basis pointers) is paid once for up to 32 rows.
inline constexpr int low_rank_encode_passes = 4;
static_assert(32 % low_rank_encode_rows_per_warp == 0, "low_rank_encode_rows: a lane stages one row of the batch");

/// A block's staged rows: [warps][keys, values][head_dim / 4 rounded up][rows_per_warp] float4s — the rows'
/// four-channel pieces interleaved, so the eight rows' pieces of channels 4q..4q + 3 lie at constant offsets
/// (one address per q, immediate offsets for the rows).
inline std::size_t low_rank_encode_shared_bytes(std::int64_t head_dim) {
  const std::size_t quads = static_cast<std::size_t>((head_dim + 3) / 4);
  return std::size_t{low_rank_encode_threads / 32} * 2 * quads * low_rank_encode_rows_per_warp * sizeof(float4);
}

/// One part (keys or values) of a batch: coefficients first_coefficient + lane (lanes of one pass of 32) of the
/// batch's first Rows staged rows, each sum in the CPU's order and rounding (d ascending from 0, __fmul_rn then
/// __fadd_rn), stored for the first `count` rows. Rows: the batch's count rounded up to 1, 2, 4 or 8, so that a
/// one-token append computes one row, not eight.
template <int Rows>
__device__ __forceinline__ void low_rank_encode_part(const float4* rows_staged, const float* basis, std::int64_t rank,
                                                     std::int64_t r_max, std::int64_t dim, std::int64_t slot,
                                                     int count, int lane, __half* coefficients) {
  constexpr int batch = low_rank_encode_rows_per_warp;  // the staged layout's row stride
  const int whole_pieces = static_cast<int>(dim / 4);
  for (std::int64_t first_coefficient = 0; first_coefficient < r_max; first_coefficient += 32) {  // warp-uniform
    const std::int64_t j = first_coefficient + lane;
    float sums[Rows];
#pragma unroll
    for (int t = 0; t < Rows; ++t) sums[t] = 0.0f;
    if (j < rank) {
      const float* column = basis + j;
      int q = 0;
      for (; q < whole_pieces; ++q, column += 4 * r_max) {
        const float u0 = __ldg(column), u1 = __ldg(column + r_max), u2 = __ldg(column + 2 * r_max),
                    u3 = __ldg(column + 3 * r_max);
#pragma unroll
        for (int t = 0; t < Rows; ++t) {
          const float4 x = rows_staged[q * batch + t];
          float sum = sums[t];
          sum = __fadd_rn(sum, __fmul_rn(u0, x.x));
          sum = __fadd_rn(sum, __fmul_rn(u1, x.y));
          sum = __fadd_rn(sum, __fmul_rn(u2, x.z));
          sum = __fadd_rn(sum, __fmul_rn(u3, x.w));
          sums[t] = sum;
        }
      }
      for (std::int64_t d = 4 * std::int64_t{q}; d < dim; ++d, column += r_max) {  // head_dim % 4 channels
        const float u = __ldg(column);
#pragma unroll
        for (int t = 0; t < Rows; ++t)
          sums[t] = __fadd_rn(sums[t], __fmul_rn(u, reinterpret_cast<const float*>(rows_staged + q * batch + t)[d % 4]));
      }
    }
#pragma unroll
    for (int t = 0; t < Rows; ++t) {
      const std::int64_t row_slot = __shfl_sync(0xffffffffu, slot, t);
      if (t < count && j < r_max) coefficients[row_slot * r_max + j] = __float2half_rn(sums[t]);
    }
  }
}

/// Eight rows per warp: their keys and values staged in shared memory (fp32, as the CPU's encode receives
/// them), then lane j computes coefficient j (j + 32, … for stored ranks above 32) of all eight rows, each
/// in the CPU's order and rounding (low_rank_encode_part). The basis element U[d][j] is loaded once per d
/// for the eight rows; the rows' channels are shared-memory broadcasts, four channels per 16-byte load.
/// ~2.75 instructions per multiply-add (PTX) against ~7 for one row at a time, and eight independent
/// chains of dependent additions a lane instead of one. Five blocks an SM: without a minimum ptxas 13.0 chose 80
/// registers and spilled ~60 bytes; with 5, 96 registers and no spills (20 warps an SM).
template <class View, class InT>
__global__ void __launch_bounds__(low_rank_encode_threads, 5)
    low_rank_encode_rows(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  constexpr int warps = low_rank_encode_threads / 32, batch = low_rank_encode_rows_per_warp;
  extern __shared__ float4 staged_storage[];
  const auto& store = w.cache.storage;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const std::int64_t dim = store.head_dim, r_max = store.stored_rank;
  // Piece p (channels 4p..4p + 3) of staged row t of a part: float4 p·batch + t of the part.
  const int pieces = static_cast<int>((dim + 3) / 4);
  float4* staged = staged_storage + std::int64_t{warp} * 2 * pieces * batch;
  auto* key_coefficients = reinterpret_cast<__half*>(store.key_coefficients);
  auto* value_coefficients = reinterpret_cast<__half*>(store.value_coefficients);
  // Lane l stages row l % batch (its source resolved once a batch), pieces l / batch, + 32 / batch, …: the
  // eight rows' sources are looked up at once, and consecutive lanes write consecutive float4s.
  const int staged_row = lane % batch, first_piece = lane / batch;
  KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head) {
    const std::int64_t rows = rows_of(w, head), first = first_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    // prepare_head's bookkeeping (compaction) and what the compaction's encodes leave: with refreshes
    // (sequence bases, update_freq > 0) each encode counts compaction_left down, so it ends at 0.
    if (is_compaction(w) && blockIdx.x == 0 && threadIdx.x == 0) {
      store.compaction_left[head] = store.update_freq > 0 ? 0 : rows;
      store.pending_counts[head] = 0;
    }
    const std::int64_t key_rank = store.key_ranks[head], value_rank = store.value_ranks[head];
    const float* key_basis = store.key_bases + head * dim * r_max;
    const float* value_basis = store.value_bases + head * dim * r_max;
    for (std::int64_t r0 = (std::int64_t{blockIdx.x} * warps + warp) * batch; r0 < rows;
         r0 += std::int64_t{gridDim.x} * warps * batch) {
      const int count = static_cast<int>(min(std::int64_t{batch}, rows - r0));
      // Lane t < count resolves row r0 + t's slot (and writes its position); the stores take it by shuffle.
      std::int64_t slot = 0;
      if (lane < count) {
        slot = w.cache.slot(coordinates.b, coordinates.h, first + r0 + lane);
        w.cache.positions.slot_position[slot] = static_cast<std::int32_t>(position_of_row(w, head, r0 + lane, coordinates));
      }
      {  // stage (rows past `count`: zeros, computed on only when count rounds up, never stored)
        float4* keys_staged = staged + staged_row;
        float4* values_staged = keys_staged + pieces * batch;
        if (staged_row < count) {
          const source_row<InT> source = row_of(w, head, r0 + staged_row, coordinates);
          for (int p = first_piece; p < pieces; p += 32 / batch) {
            float key[4], value[4];
            if (source.key != nullptr && 4 * p + 4 <= dim) {  // an input row's whole piece: one branch, not eight
#pragma unroll
              for (int i = 0; i < 4; ++i) key[i] = to_float(source.key[4 * p + i]), value[i] = to_float(source.value[4 * p + i]);
            } else {
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const int d = 4 * p + i;
                key[i] = d < dim ? source.key_at(d) : 0.0f;
                value[i] = d < dim ? source.value_at(d) : 0.0f;
              }
            }
            keys_staged[p * batch] = make_float4(key[0], key[1], key[2], key[3]);
            values_staged[p * batch] = make_float4(value[0], value[1], value[2], value[3]);
          }
        } else {
          for (int p = first_piece; p < pieces; p += 32 / batch)
            keys_staged[p * batch] = values_staged[p * batch] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
      __syncwarp();
      for (int part = 0; part < 2; ++part) {
        const float4* rows_staged = staged + part * pieces * batch;
        const float* basis = part == 0 ? key_basis : value_basis;
        const std::int64_t rank = part == 0 ? key_rank : value_rank;
        __half* coefficients = part == 0 ? key_coefficients : value_coefficients;
        if (count == 1)
          low_rank_encode_part<1>(rows_staged, basis, rank, r_max, dim, slot, count, lane, coefficients);
        else if (count == 2)
          low_rank_encode_part<2>(rows_staged, basis, rank, r_max, dim, slot, count, lane, coefficients);
        else if (count <= 4)
          low_rank_encode_part<4>(rows_staged, basis, rank, r_max, dim, slot, count, lane, coefficients);
        else
          low_rank_encode_part<batch>(rows_staged, basis, rank, r_max, dim, slot, count, lane, coefficients);
      }
      __syncwarp();  // the staged rows are read before the next batch overwrites them
    }
  }
}

/// launch_codec_writes' low-rank branch (codec_writes.cuh).
template <class View, class InT>
void launch_low_rank_writes(std::string_view function, const codec_write<View, InT>& w, std::int64_t rows_bound,
                            cudaStream_t stream) {
  const bool compaction = w.kept_offsets != nullptr;
  if (rows_bound <= 0 && !compaction) return;
  const auto& store = w.cache.storage;
  if (store.from_sequence && compaction) launch_low_rank_fit(function, w, rows_bound, stream);  // then encode
  if (store.from_sequence && !compaction && store.update_freq > 0) {
    launch_low_rank_append_refreshing(function, w, stream);  // encodes, remembers and refreshes
    return;
  }
  const std::int64_t heads = w.target >= 0 ? 1 : w.cache.heads();
  constexpr std::int64_t rows_per_block =
      std::int64_t{low_rank_encode_threads / 32} * low_rank_encode_rows_per_warp * low_rank_encode_passes;
  const dim3 grid(static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(std::max<std::int64_t>(rows_bound, 1), rows_per_block), 1, 4096)),
                  static_cast<unsigned>(std::min<std::int64_t>(heads, 65535)));
  const std::size_t shared = low_rank_encode_shared_bytes(w.cache.shape.head_dim);
  if (shared > 48 * 1024)
    detail::check_cuda(cudaFuncSetAttribute(low_rank_encode_rows<View, InT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared)),
                       function, "cudaFuncSetAttribute(low_rank_encode_rows)");
  low_rank_encode_rows<View, InT><<<grid, low_rank_encode_threads, shared, stream>>>(w);
  detail::check_launch(function, "low_rank_encode_rows");
}

/// What bind does to host memory: no basis, nothing pending (the owning cache's reset).
template <class Storage>
__global__ void low_rank_reset(const Storage store) {
  const std::int64_t first = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  const std::int64_t basis = store.heads * store.head_dim * store.stored_rank;
  for (std::int64_t i = first; i < basis; i += stride) store.key_bases[i] = 0.0f, store.value_bases[i] = 0.0f;
  for (std::int64_t head = first; head < store.heads; head += stride) {
    store.key_ranks[head] = 0;
    store.value_ranks[head] = 0;
    store.compaction_left[head] = 0;
    store.pending_counts[head] = 0;
  }
}

inline void launch_low_rank_reset(std::string_view function, const codec::low_rank::storage<device_space>& store,
                                  cudaStream_t stream) {
  low_rank_reset<<<256, 256, 0, stream>>>(store);
  detail::check_launch(function, "low_rank_reset");
}

/// A stored token of codec::low_rank, as stored: its key and value coefficient rows —
/// 16-byte parts when the stored rank is a multiple of 8 and both arrays are 16-byte
/// aligned (the decode's own staging condition, so a row is whole 16-byte units), one
/// coefficient (2 bytes) a part otherwise — then its position when slot_position is given
/// (layout::flat's repack, through grid_move). The eviction step passes no slot_position:
/// it moves positions itself, with the metric. Bases are per head and stay; the pending
/// slots of sequence bases follow a head's move (moved, the flat repack's range fix-up;
/// the eviction step fixes each moved token's entry instead: eviction.cuh's
/// evict_codec_moved).
template <>
struct codec_slot_mover<codec::low_rank> {
  // (the fields the moves use, not the whole storage)
  unsigned short* key_coefficients;    // fp16 bits, [slots, stored_rank]
  unsigned short* value_coefficients;
  std::int64_t* pending_slots;         // [heads, update_freq] (sequence bases with refresh)
  const std::int64_t* pending_counts;  // [heads]
  std::int64_t stored_rank;
  std::int64_t update_freq;
  std::int32_t* slot_position;  // null: the caller moves positions itself (the eviction step)
  bool vectors;                 // 16-byte parts (else 2-byte)
  std::int64_t row_parts;       // parts of one coefficient row

  __host__ __device__ codec_slot_mover(const codec::low_rank::storage<device_space>& store,
                                       std::int32_t* slot_position_)
      : key_coefficients(reinterpret_cast<unsigned short*>(store.key_coefficients)),
        value_coefficients(reinterpret_cast<unsigned short*>(store.value_coefficients)),
        pending_slots(store.pending_slots),
        pending_counts(store.pending_counts),
        stored_rank(store.stored_rank),
        update_freq(store.update_freq),
        slot_position(slot_position_),
        vectors(store.stored_rank % 8 == 0 && reinterpret_cast<std::uintptr_t>(store.key_coefficients) % 16 == 0 &&
                reinterpret_cast<std::uintptr_t>(store.value_coefficients) % 16 == 0),
        row_parts(vectors ? store.stored_rank / 8 : store.stored_rank) {}

  __device__ std::int64_t parts() const { return 2 * row_parts + (slot_position != nullptr ? 1 : 0); }
  __device__ uint4 load(std::int64_t slot, std::int64_t part) const {
    if (part == 2 * row_parts) return make_uint4(static_cast<unsigned>(slot_position[slot]), 0u, 0u, 0u);
    const unsigned short* row = (part < row_parts ? key_coefficients : value_coefficients) + slot * stored_rank;
    if (vectors) return reinterpret_cast<const uint4*>(row)[part % row_parts];
    return make_uint4(row[part % row_parts], 0u, 0u, 0u);
  }
  __device__ void store(std::int64_t slot, std::int64_t part, uint4 value) const {
    if (part == 2 * row_parts) {
      slot_position[slot] = static_cast<std::int32_t>(value.x);
      return;
    }
    unsigned short* row = (part < row_parts ? key_coefficients : value_coefficients) + slot * stored_rank;
    if (vectors)
      reinterpret_cast<uint4*>(row)[part % row_parts] = value;
    else
      row[part % row_parts] = static_cast<unsigned short>(value.x);
  }
  __device__ void moved(std::int64_t head, std::int64_t from, std::int64_t to, std::int64_t length) const {
    if (update_freq == 0 || from == to) return;
    std::int64_t* slots = pending_slots + head * update_freq;
    for (std::int64_t p = 0; p < pending_counts[head]; ++p)
      if (slots[p] >= from && slots[p] < from + length) slots[p] += to - from;
  }
};

// ---- decode attention -----------------------------------------------------------

inline constexpr int low_rank_decode_threads = low_rank_decode_threads_cuda_cores;  // = tokens per tile: one token per thread
inline constexpr int low_rank_decode_warps = low_rank_decode_threads / 32;

/// Shared memory of one block (bytes from the start), for stored rank R.
struct low_rank_decode_layout {
  std::size_t inverse_frequencies = 0;  // [head_dim / 2] double (pre-RoPE)
  std::size_t key_tiles = 0;            // [2][tile][key_stride] half
  std::size_t value_tiles = 0;          // [2][tile][R] half
  std::size_t weights = 0;              // [tile][Group] float; after the loop: per-thread mixes
  std::size_t reduced = 0;              // [warps][Group] float (maxima, then sums)
  std::size_t query = 0;                // [head_dim][Group]: the scaled query
  std::size_t projected = 0;            // post: [R][Group]: U_kᵀ q, scaled
  std::size_t key_basis = 0;            // [head_dim][R] float: U_k; after the tiles, U_vᵀ ([R][head_dim])
  std::size_t bytes = 0;
  int key_stride = 0;                   // halves between staged key rows

  __host__ __device__ static std::size_t up16(std::size_t n) { return (n + 15) / 16 * 16; }
  __host__ __device__ low_rank_decode_layout(int head_dim, int rank, int group, bool pre_rope) {
    // 16-byte chunks (rank % 8 == 0): rows of 8k halves, padded so that 8 consecutive rows'
    // 16-byte reads (one quarter warp of LDS.128) fall in distinct banks (row stride 4·odd words).
    key_stride = rank % 8 != 0 ? rank : (rank / 8) % 2 == 0 ? rank + 8 : rank;
    std::size_t at = 0;
    inverse_frequencies = at;
    at += pre_rope ? up16(static_cast<std::size_t>(head_dim / 2) * 8) : 0;
    key_tiles = at;
    at += up16(std::size_t{2} * low_rank_decode_threads * key_stride * 2);
    value_tiles = at;
    at += up16(std::size_t{2} * low_rank_decode_threads * rank * 2);
    weights = at;
    at += up16(std::size_t{low_rank_decode_threads} * group * 4);
    reduced = at;
    at += up16(std::size_t{low_rank_decode_warps} * group * 4);
    query = at;
    at += up16(static_cast<std::size_t>(head_dim) * group * 4);
    projected = at;
    at += pre_rope ? 0 : up16(static_cast<std::size_t>(rank) * group * 4);
    key_basis = at;
    at += up16(static_cast<std::size_t>(head_dim) * rank * 4);
    bytes = at;
  }
};

inline std::size_t low_rank_decode_shared_bytes(int head_dim, int rank, int group, bool pre_rope) {
  return low_rank_decode_layout(head_dim, rank, group, pre_rope).bytes;
}

/// Stages tile `tile` of [begin, end) (rows of key and value coefficients) into buffer tile % 2.
template <class Rows>
__device__ __forceinline__ void low_rank_stage_tile(const codec::low_rank::storage<device_space>& store,
                                                    const Rows& rows, std::int64_t begin, std::int64_t end, int tile,
                                                    const low_rank_decode_layout& layout, unsigned char* shared) {
  const int r = static_cast<int>(store.stored_rank);
  const std::int64_t first = begin + std::int64_t{tile} * low_rank_decode_threads;
  if (first >= end) return;
  const int count = static_cast<int>(end - first < low_rank_decode_threads ? end - first : low_rank_decode_threads);
  auto* keys = reinterpret_cast<__half*>(shared + layout.key_tiles) + (tile % 2) * low_rank_decode_threads * layout.key_stride;
  auto* values = reinterpret_cast<__half*>(shared + layout.value_tiles) + (tile % 2) * low_rank_decode_threads * r;
  const auto* key_source = reinterpret_cast<const __half*>(store.key_coefficients);
  const auto* value_source = reinterpret_cast<const __half*>(store.value_coefficients);
  if (r % 8 == 0) {
    const int chunks = r / 8;
    for (int index = threadIdx.x; index < count * chunks; index += low_rank_decode_threads) {
      const int t = index / chunks, c = index - t * chunks;
      const std::int64_t at = rows.slot(first + t) * r + 8 * c;
      copy_async16(keys + t * layout.key_stride + 8 * c, key_source + at, 16);
      copy_async16(values + t * r + 8 * c, value_source + at, 16);
    }
  } else {
    for (int index = threadIdx.x; index < count * r; index += low_rank_decode_threads) {
      const int t = index / r, j = index - t * r;
      const std::int64_t at = rows.slot(first + t) * r + j;
      keys[t * layout.key_stride + j] = key_source[at];
      values[t * r + j] = value_source[at];
    }
  }
}

/// One lifted output (query row `row` of the group, channel d) and its base-2 log-sum-exp: the output
/// (and the metric's lse) when the block read the whole head, else the split-K partial that
/// merge_decode_partials combines. Both low-rank kernels end here.
template <int Group, class Params>
__device__ __forceinline__ void low_rank_store_output(const Params& params, bool whole, std::int64_t b, std::int64_t h,
                                                      std::int64_t head, std::int64_t partial_index, int dim, int row,
                                                      int d, float output, float lse) {
  using out_type = std::remove_pointer_t<decltype(params.out)>;
  if (whole) {
    params.out[b * params.out_batch_stride + (h * Group + row) * params.out_head_stride + d] = from_float<out_type>(output);
    if (params.metric.logits != nullptr && d == 0) params.metric.lse[head * Group + row] = lse;
  } else {
    const std::int64_t partial = partial_index * Group + row;
    params.partial_out[partial * dim + d] = output;
    if (d == 0) params.partial_lse[partial] = lse;
  }
}

/// Pre-RoPE keys: channels channel[0, count) of one token's k̂ = U c (U: [head_dim][r] floats in shared memory,
/// c: the token's staged coefficient row), each one fmaf chain over j ascending — the CPU's reader order.
/// Beyond the key rank U's columns and c are 0, so the 16-byte path may read up to the next multiple of 8.
__device__ __forceinline__ void low_rank_rebuild_channels(const __half* c, const float* key_basis, int r, int key_rank,
                                                          const int (&channel)[16], int count, float (&k)[16]) {
#pragma unroll
  for (int m = 0; m < 16; ++m) k[m] = 0.0f;
  if (r % 8 == 0) {  // 16-byte reads: the row's (padded: conflict-free) and U's (broadcast)
    for (int j8 = 0; j8 < key_rank; j8 += 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(c + j8);
      const auto* pairs = reinterpret_cast<const __half2*>(&raw);
      const float2 c01 = __half22float2(pairs[0]), c23 = __half22float2(pairs[1]);
      const float2 c45 = __half22float2(pairs[2]), c67 = __half22float2(pairs[3]);
#pragma unroll
      for (int m = 0; m < 16; ++m) {
        if (m >= count) break;
        const float* u = key_basis + channel[m] * r + j8;
        const float4 low = *reinterpret_cast<const float4*>(u);
        const float4 high = *reinterpret_cast<const float4*>(u + 4);
        float value = k[m];
        value = fmaf(low.x, c01.x, value), value = fmaf(low.y, c01.y, value);
        value = fmaf(low.z, c23.x, value), value = fmaf(low.w, c23.y, value);
        value = fmaf(high.x, c45.x, value), value = fmaf(high.y, c45.y, value);
        value = fmaf(high.z, c67.x, value), value = fmaf(high.w, c67.y, value);
        k[m] = value;
      }
    }
  } else {
    for (int j = 0; j < key_rank; ++j) {
      const float coefficient = __half2float(c[j]);
#pragma unroll
      for (int m = 0; m < 16; ++m) {
        if (m >= count) break;
        k[m] = fmaf(key_basis[channel[m] * r + j], coefficient, k[m]);
      }
    }
  }
}

/// sin and cos of a RoPE angle (position · theta^(−2i/rotary_dim), in double as the CPU forms it), for
/// the pre-RoPE keys' rotation. The CPU takes std::sin / std::cos of the double angle; here the angle is
/// reduced to [−π, π] in double (Cody–Waite with 2π = hi + lo: exact for the angles positions of 2^31
/// and frequencies ≤ 1 reach, up to one rounding of the small result) and rounded to float (absolute
/// error ≤ 2^−23 = 2u below 4, u = 2^−24), then the hardware's sine and cosine (__sincosf: absolute error
/// ≤ 2^−21.41 and 2^−21.19 ≈ 7.0u on [−π, π], CUDA's programming guide). Each is within 9.1u of the CPU's —
/// codecs_test.cu's pre-RoPE bound counts 10u per sine and cosine, and RopeSincos checks it — for a
/// fraction of double sincos's cost (~60 double operations a pair at the FP64 units' rate before). Both
/// sides' angles are the same double only where the device's pow gives the CPU's theta^(−2i/dim) (CUDA's
/// pow is within 2 ulp, glibc's nearly correctly rounded): an ulp of a frequency near 1 moves the angle
/// at position p by up to p·2^−52 — 8u at p = 2^31, 2^−13 u at 32k, less at the tests' positions (< 2^13)
/// — as before this change.
__device__ __forceinline__ void rope_sincos(double angle, float& sine, float& cosine) {
  constexpr double inverse_two_pi = 0.15915494309189533577;
  constexpr double two_pi_hi = 6.28318530717958623200;   // the double nearest 2π
  constexpr double two_pi_lo = 2.44929359829470635445e-16;  // 2π − two_pi_hi
  const double turns = rint(angle * inverse_two_pi);
  const double reduced = fma(-turns, two_pi_lo, fma(-turns, two_pi_hi, angle));
  __sincosf(static_cast<float>(reduced), &sine, &cosine);
}

template <int Group, class Params>
__global__ void __launch_bounds__(low_rank_decode_threads)
    decode_attention_low_rank(const __grid_constant__ Params params) {
  wait_for_prerequisite_grid();  // paged / flat: the plan's partition
  allow_dependent_grid();
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();
  constexpr int T = low_rank_decode_threads;
  extern __shared__ __align__(16) unsigned char shared[];
  const auto& cache = params.cache;
  const auto& store = cache.storage;
  const int dim = static_cast<int>(store.head_dim), r = static_cast<int>(store.stored_rank);
  const bool pre_rope = store.pre_rope;
  const low_rank_decode_layout layout(dim, r, Group, pre_rope);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto* inverse_frequencies = reinterpret_cast<double*>(shared + layout.inverse_frequencies);
  auto* weights = reinterpret_cast<float*>(shared + layout.weights);
  auto* reduced = reinterpret_cast<float*>(shared + layout.reduced);
  auto* query = reinterpret_cast<float*>(shared + layout.query);
  auto* projected = reinterpret_cast<float*>(shared + layout.projected);
  auto* key_basis = reinterpret_cast<float*>(shared + layout.key_basis);
  const int rotary = !pre_rope ? 0 : store.rope.rotary_dim == 0 ? dim : static_cast<int>(store.rope.rotary_dim);
  const int pair_count = rotary / 2;
  const bool half_split = store.rope.pairs == rope::pairing::half_split;
  if (pre_rope)  // rope::inverse_frequencies: theta^(−2i / rotary_dim), in double
    for (int i = threadIdx.x; i < pair_count; i += T)
      inverse_frequencies[i] = pow(store.rope.theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary));
  // Value mixing: thread = (subset, coefficient j); subsets split a tile's tokens.
  const int subsets = T / r;
  const int mix_j = threadIdx.x % r, mix_subset = threadIdx.x / r;
  const bool mixes = mix_subset < subsets;

  for_each_segment(params.partition, [&](std::int64_t head, std::int64_t begin, std::int64_t end, bool whole,
                                         std::int64_t partial_index) {
    const auto rows = head_rows(cache, head, params.page_shift);
    const head_bias bias = compensation_of(cache, head);
    const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
    const int key_rank = store.key_ranks[head], value_rank = store.value_ranks[head];
    const float* head_key_basis = store.key_bases + head * static_cast<std::int64_t>(dim) * r;
    const float* head_value_basis = store.value_bases + head * static_cast<std::int64_t>(dim) * r;
    const int tiles = static_cast<int>((end - begin + T - 1) / T);
    low_rank_stage_tile(store, rows, begin, end, 0, layout, shared);
    copy_async_commit();

    // The scaled query ([d][g]) and U_k, staged (coalesced); post-RoPE: the projection
    // q̃_jg = Σ_d U_dj q_gd·scale from them (four partial sums per thread).
    for (int index = threadIdx.x; index < dim * Group; index += T) {
      const int g = index % Group, d = index / Group;
      const auto* row = params.queries + b * params.query_batch_stride + (h * Group + g) * params.query_head_stride;
      query[index] = to_float(row[d]) * params.query_scale;
    }
    for (int index = threadIdx.x; index < dim * r; index += T) key_basis[index] = head_key_basis[index];
    __syncthreads();
    if (!pre_rope)
      for (int index = threadIdx.x; index < r * Group; index += T) {
        const int j = index / Group, g = index % Group;
        float partial[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (j < key_rank)
          for (int d = 0; d < dim; d += 4)  // head_dim is a multiple of 8
#pragma unroll
            for (int e = 0; e < 4; ++e)
              partial[e] = fmaf(key_basis[(d + e) * r + j], query[(d + e) * Group + g], partial[e]);
        projected[index] = (partial[0] + partial[1]) + (partial[2] + partial[3]);
      }
    // Bookkeeping: the running maximum (the same in every thread), this thread's weight sums, its mix.
    float running_max[Group], sum[Group], mix[Group];
#pragma unroll
    for (int g = 0; g < Group; ++g) running_max[g] = negative_infinity, sum[g] = 0.0f, mix[g] = 0.0f;
    const std::int64_t metric_line = params.metric.logits != nullptr ? params.partition.prefix(head) : 0;
    const std::uint64_t metric_policy =
        params.metric.logits != nullptr && params.metric.keep_in_l2 ? metric_store_policy() : 0;

    for (int tile = 0; tile < tiles; ++tile) {
      low_rank_stage_tile(store, rows, begin, end, tile + 1, layout, shared);
      copy_async_commit();
      copy_async_wait<1>();
      __syncthreads();  // tile `tile` has landed for the whole block (and the query on the first)
      const std::int64_t first = begin + std::int64_t{tile} * T;
      const int count = static_cast<int>(end - first < T ? end - first : T);
      const auto* keys = reinterpret_cast<const __half*>(shared + layout.key_tiles) + (tile % 2) * T * layout.key_stride;
      const auto* values = reinterpret_cast<const __half*>(shared + layout.value_tiles) + (tile % 2) * T * r;

      // 1. This thread's token: its score for every query head.
      float score[Group];
#pragma unroll
      for (int g = 0; g < Group; ++g) score[g] = negative_infinity;
      if (static_cast<int>(threadIdx.x) < count) {
        const std::int64_t token = first + threadIdx.x;
        const __half* c = keys + threadIdx.x * layout.key_stride;
        float dot[Group];
#pragma unroll
        for (int g = 0; g < Group; ++g) dot[g] = 0.0f;
        if (!pre_rope) {
          const auto add = [&](int j, float coefficient) {
            if constexpr (Group % 4 == 0) {
#pragma unroll
              for (int g = 0; g < Group; g += 4) {
                const float4 q = *reinterpret_cast<const float4*>(projected + j * Group + g);
                dot[g] = fmaf(q.x, coefficient, dot[g]);
                dot[g + 1] = fmaf(q.y, coefficient, dot[g + 1]);
                dot[g + 2] = fmaf(q.z, coefficient, dot[g + 2]);
                dot[g + 3] = fmaf(q.w, coefficient, dot[g + 3]);
              }
            } else {
#pragma unroll
              for (int g = 0; g < Group; ++g) dot[g] = fmaf(projected[j * Group + g], coefficient, dot[g]);
            }
          };
          if (r % 8 == 0) {
            for (int j8 = 0; j8 < key_rank; j8 += 8) {
              const uint4 raw = *reinterpret_cast<const uint4*>(c + j8);
              const auto* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const float2 two = __half22float2(pairs[i]);
                add(j8 + 2 * i, two.x);  // beyond the key rank: coefficient 0 (and q̃ 0)
                add(j8 + 2 * i + 1, two.y);
              }
            }
          } else {
            for (int j = 0; j < key_rank; ++j) add(j, __half2float(c[j]));
          }
        } else {
          // The CPU's reader.dot: k̂_d = Σ_j U_dj c_j (j ascending, one fma chain a channel, as before),
          // rotated by the token's position, then q·k̂. Sixteen channels are rebuilt at once — eight
          // rotation pairs (a, e), or sixteen unrotated channels — so each 16-byte piece of the row is
          // read once per sixteen channels instead of once per channel (the row's reads were two
          // thirds of this loop's shared-memory wavefronts: per channel one conflict-free 512-byte
          // warp read of c against two broadcasts of U).
          const auto add = [&](int d, float k) {
#pragma unroll
            for (int g = 0; g < Group; ++g) dot[g] = fmaf(query[d * Group + g], k, dot[g]);
          };
          const double position = static_cast<double>(cache.positions.slot_position[rows.slot(token)]);
          int channel[16];
          float k[16];
          for (int i0 = 0; i0 < pair_count; i0 += 8) {
            const int pairs_here = pair_count - i0 < 8 ? pair_count - i0 : 8;
#pragma unroll
            for (int m = 0; m < 8; ++m) {
              const int i = i0 + (m < pairs_here ? m : 0);
              channel[m] = half_split ? i : 2 * i;
              channel[8 + m] = half_split ? i + pair_count : 2 * i + 1;
            }
            // Members a of the pairs in k[0, 8), their partners e in k[8, 16) (a tail chunk rebuilds
            // its first pair again in the unused places: its results are not read).
            low_rank_rebuild_channels(c, key_basis, r, key_rank, channel, 16, k);
#pragma unroll
            for (int m = 0; m < 8; ++m) {
              if (m >= pairs_here) break;
              float sine, cosine;
              rope_sincos(position * inverse_frequencies[i0 + m], sine, cosine);
              const float xa = k[m], xb = k[8 + m];
              add(channel[m], fmaf(xa, cosine, -xb * sine));
              add(channel[8 + m], fmaf(xa, sine, xb * cosine));
            }
          }
          for (int d0 = rotary; d0 < dim; d0 += 16) {  // channels past the rotary dims: as rebuilt
            const int count = dim - d0 < 16 ? dim - d0 : 16;
#pragma unroll
            for (int m = 0; m < 16; ++m) channel[m] = d0 + (m < count ? m : 0);
            low_rank_rebuild_channels(c, key_basis, r, key_rank, channel, count, k);
#pragma unroll
            for (int m = 0; m < 16; ++m) {
              if (m >= count) break;
              add(d0 + m, k[m]);
            }
          }
        }
        const float token_bias = bias.at(token);
#pragma unroll
        for (int g = 0; g < Group; ++g) score[g] = dot[g] + token_bias;
        if (params.metric.logits != nullptr)
#pragma unroll
          for (int g = 0; g < Group; ++g)
            store_metric_logit(params.metric.logits + g * params.metric.stride + metric_line + token, score[g],
                               params.metric.keep_in_l2, metric_policy);
      }

      // 2. The tile's maximum per query head: warps, then the block (every thread ends with it).
      float tile_max[Group];
#pragma unroll
      for (int g = 0; g < Group; ++g) {
        float m = score[g];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
        if (lane == 0) reduced[warp * Group + g] = m;
      }
      __syncthreads();
#pragma unroll
      for (int g = 0; g < Group; ++g) {
        float m = running_max[g];
#pragma unroll
        for (int w = 0; w < low_rank_decode_warps; ++w) m = fmaxf(m, reduced[w * Group + g]);
        tile_max[g] = m;
      }
      // 3. Weights 2^(s − m), the rescale of what was summed before.
      float rescale[Group];
#pragma unroll
      for (int g = 0; g < Group; ++g) {
        rescale[g] = tile_max[g] == negative_infinity ? 1.0f : exp2f(running_max[g] - tile_max[g]);
        running_max[g] = tile_max[g];
        const float p = score[g] == negative_infinity ? 0.0f : exp2f(score[g] - tile_max[g]);
        sum[g] = sum[g] * rescale[g] + p;
        weights[threadIdx.x * Group + g] = p;
      }
      __syncthreads();
      // 4. Mix the values in coefficient space: this thread's coefficient over its subset's tokens.
      if (mixes) {
#pragma unroll
        for (int g = 0; g < Group; ++g) mix[g] *= rescale[g];
        for (int t = mix_subset; t < count; t += subsets) {
          const float v = __half2float(values[t * r + mix_j]);
          if constexpr (Group % 4 == 0) {
#pragma unroll
            for (int g = 0; g < Group; g += 4) {
              const float4 p = *reinterpret_cast<const float4*>(weights + t * Group + g);
              mix[g] = fmaf(p.x, v, mix[g]);
              mix[g + 1] = fmaf(p.y, v, mix[g + 1]);
              mix[g + 2] = fmaf(p.z, v, mix[g + 2]);
              mix[g + 3] = fmaf(p.w, v, mix[g + 3]);
            }
          } else {
#pragma unroll
            for (int g = 0; g < Group; ++g) mix[g] = fmaf(weights[t * Group + g], v, mix[g]);
          }
        }
      }
      __syncthreads();  // the tile's buffers and weights are read before they are refilled
    }
    copy_async_wait<0>();

    // The segment's state: sums over the block, mixes over the subsets, then lift and normalise.
#pragma unroll
    for (int g = 0; g < Group; ++g) {
      float s = sum[g];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0) reduced[warp * Group + g] = s;
      weights[threadIdx.x * Group + g] = mixes ? mix[g] : 0.0f;
    }
    __syncthreads();
    // [Group][R] in the drained value tiles (T·R halves ≥ Group·R floats); U_v transposed
    // ([R][head_dim]: the lift's lanes read consecutive channels) where U_k was.
    float* mixed = reinterpret_cast<float*>(shared + layout.value_tiles);
    float* value_basis = key_basis;
    for (int index = threadIdx.x; index < Group * r; index += T) {
      const int g = index / r, j = index % r;
      float total = 0.0f;
      for (int s = 0; s < subsets; ++s) total += weights[(s * r + j) * Group + g];
      mixed[index] = total;
    }
    for (int index = threadIdx.x; index < dim * r; index += T) {
      const int d = index / r, j = index % r;
      value_basis[j * dim + d] = head_value_basis[index];
    }
    __syncthreads();
    for (int index = threadIdx.x; index < Group * dim; index += T) {
      const int g = index / dim, d = index % dim;
      float total_sum = 0.0f;
#pragma unroll
      for (int w = 0; w < low_rank_decode_warps; ++w) total_sum += reduced[w * Group + g];
      float lifted = 0.0f;
      for (int j = 0; j < value_rank; ++j) lifted = fmaf(value_basis[j * dim + d], mixed[g * r + j], lifted);
      low_rank_store_output<Group>(params, whole, b, h, head, partial_index, dim, g, d, total_sum > 0.0f ? lifted / total_sum : 0.0f,
                                   total_sum > 0.0f ? running_max[g] + log2f(total_sum) : negative_infinity);
    }
    __syncthreads();  // the next segment reuses every buffer
  });
}

// ---- decode attention on the tensor cores (post-RoPE, stored rank 16, 32 or 64) -----------------
//
// Post-RoPE low-rank decode is attention with head dimension r over the coefficients: s_g = q̃_g·c
// and m_g = Σ p·c^v are two small products per tile, (G × r)·(r × tokens) and (G × tokens)·(tokens
// × r). On CUDA cores they cost ~700 warp instructions per 32 tokens (the kernel above: 43 % of the
// copy bandwidth on its bytes at W, H200); here each is a handful of mma.sync m16n8k8 TF32 per warp
// and 32 tokens, so the kernel streams at memory speed. Precision is kept at fp32's: the B operands
// (fp16 coefficients) are exact in TF32, and each A operand (q̃, the weights p) is split into
// hi = tf32(x) and lo = tf32(x − hi) with two products each (|x − hi − lo| ≤ 2⁻²² |x|). The tensor
// cores' fp32 accumulation may truncate, so each 32-token block's mix is accumulated from zero and
// added to the running sums with a rounded fp32 add (the online softmax's rescale goes with it).
// Layout per warp (mma.cuh's lane = 4·g + t): the warp owns 32 tokens of each 128-token tile (four
// n-tiles of 8). Scores: lane t reads one contiguous piece of its token row — coefficients
// w·(4i + t) + [0, w), w = min(8, r/4) — and the query operand uses the same permutation of k. Mix:
// the k index of the P·V product runs over the n-tile's tokens in the order (2t, 2t + 1), so the
// score accumulators become the A operand in place; output column N of j-tile n is coefficient
// N·(r/8) + n, so lane g reads r/8 contiguous value coefficients of each of its two token rows.
// Row strides are padded so that every shared read is conflict-free (derivation at low_rank_mma_layout).

/// hi = tf32(x) (round to nearest, ties away), lo = tf32(x − hi): x = hi + lo within 2⁻²² |x|.
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(x));
  const float rest = x - __uint_as_float(hi);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(rest));
}
/// c += a · b for one m16n8k8 tile, TF32 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_16x8x8_tf32(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
/// Shared halves → fp32 bit patterns (exact in TF32).
template <int Count>
__device__ __forceinline__ void load_halves_as_tf32(const unsigned char* source, unsigned (&out)[Count]) {
  static_assert(Count == 2 || Count == 4 || Count == 8, "load_halves_as_tf32: 4, 8 or 16 bytes");
  alignas(16) __half2 pairs[Count / 2];
  if constexpr (Count == 8)
    *reinterpret_cast<uint4*>(pairs) = *reinterpret_cast<const uint4*>(source);
  else if constexpr (Count == 4)
    *reinterpret_cast<uint2*>(pairs) = *reinterpret_cast<const uint2*>(source);
  else
    *reinterpret_cast<unsigned*>(pairs) = *reinterpret_cast<const unsigned*>(source);
#pragma unroll
  for (int i = 0; i < Count / 2; ++i) {
    const float2 two = __half22float2(pairs[i]);
    out[2 * i] = __float_as_uint(two.x), out[2 * i + 1] = __float_as_uint(two.y);
  }
}

/// Stages tile `tile` of [begin, end) into stage tile % stages: key and value coefficient rows,
/// zero-filled past the end (their weights are 0, and 0·garbage could be NaN in the product).
template <class Rows>
__device__ __forceinline__ void low_rank_mma_stage(const codec::low_rank::storage<device_space>& store,
                                                   const Rows& rows, std::int64_t begin, std::int64_t end, int tile,
                                                   const low_rank_mma_layout& layout, int chunk_shift,
                                                   unsigned char* shared) {
  const int r = layout.rank;
  const std::int64_t first = begin + std::int64_t{tile} * low_rank_mma_tile;
  unsigned char* stage = shared + static_cast<std::size_t>(tile % layout.stages) * layout.stage_bytes;
  unsigned char* keys = stage;
  unsigned char* values = stage + static_cast<std::size_t>(low_rank_mma_tile) * layout.key_stride;
  const auto* key_source = reinterpret_cast<const unsigned char*>(store.key_coefficients);
  const auto* value_source = reinterpret_cast<const unsigned char*>(store.value_coefficients);
  const int chunks = low_rank_mma_tile << chunk_shift;  // 16-byte chunks of a tile's key rows (r / 8 a row)
  for (int index = threadIdx.x; index < chunks; index += low_rank_mma_threads) {
    const int t = index >> chunk_shift, c = index & ((1 << chunk_shift) - 1);
    const bool valid = first + t < end;
    const std::int64_t at = valid ? rows.slot(first + t) * (2 * r) + 16 * c : 0;
    copy_async16(keys + t * layout.key_stride + 16 * c, key_source + at, valid ? 16 : 0);
    copy_async16(values + t * layout.value_stride + 16 * c, value_source + at, valid ? 16 : 0);
  }
}

template <int Group, int Rank, class Params>
__device__ __forceinline__ void low_rank_mma_segment(const Params& params, unsigned char* shared,
                                                     const low_rank_mma_layout& layout, std::int64_t head,
                                                     std::int64_t begin, std::int64_t end, bool whole,
                                                     std::int64_t partial_index) {
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();
  constexpr int T = low_rank_mma_threads;
  constexpr int row_blocks = Group > 8 ? 2 : 1;
  constexpr int k_steps = Rank / 8;          // score k-steps and mix j-tiles
  constexpr int piece = Rank / 4 < 8 ? Rank / 4 : 8;  // contiguous key coefficients per lane read
  constexpr int pieces = Rank / 4 / piece;   // key reads per lane and row
  constexpr int value_piece = Rank / 8;      // value coefficients per lane and row
  constexpr int chunk_shift = Rank == 16 ? 1 : Rank == 32 ? 2 : 3;
  constexpr int stages = low_rank_mma_stages(Rank);
  const auto& cache = params.cache;
  const auto& store = cache.storage;
  const int dim = static_cast<int>(store.head_dim);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  auto* query = reinterpret_cast<float*>(shared + layout.query);
  auto* projected = reinterpret_cast<float*>(shared + layout.projected);
  const auto rows = head_rows(cache, head, params.page_shift);
  const head_bias bias = compensation_of(cache, head);
  const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
  const int key_rank = store.key_ranks[head], value_rank = store.value_ranks[head];
  const float* head_key_basis = store.key_bases + head * static_cast<std::int64_t>(dim) * Rank;
  const float* head_value_basis = store.value_bases + head * static_cast<std::int64_t>(dim) * Rank;
  const int tiles = static_cast<int>((end - begin + low_rank_mma_tile - 1) / low_rank_mma_tile);
  for (int tile = 0; tile < stages - 1; ++tile) {
    if (tile < tiles) low_rank_mma_stage(store, rows, begin, end, tile, layout, chunk_shift, shared);
    copy_async_commit();
  }
  // The scaled query and its projection q̃_jg = Σ_d U_dj q_gd·scale (the CUDA-core kernel's order).
  for (int index = threadIdx.x; index < dim * Group; index += T) {
    const int gg = index % Group, d = index / Group;
    const auto* row = params.queries + b * params.query_batch_stride + (h * Group + gg) * params.query_head_stride;
    query[index] = to_float(row[d]) * params.query_scale;
  }
  __syncthreads();
  for (int index = threadIdx.x; index < Rank * Group; index += T) {
    const int j = index / Group, gg = index % Group;
    float partial[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // Four rows of U_k per step, four steps unrolled: sixteen independent loads in flight (one
    // dependent load per step left the block's first ~8 µs to L2 latency at W).
    if (j < key_rank)
#pragma unroll 4
      for (int d = 0; d < dim; d += 4)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          partial[e] = fmaf(__ldg(head_key_basis + (d + e) * Rank + j), query[(d + e) * Group + gg], partial[e]);
    projected[index] = (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }
  __syncthreads();
  // The query operand (A, hi and lo) of every k-step: rows g, g + 8; k index t ↔ coefficient
  // piece·(4i + t) + 2s', t + 4 ↔ the next one (i = s / (piece / 2), s' = s % (piece / 2)).
  unsigned query_hi[k_steps][row_blocks][2], query_lo[k_steps][row_blocks][2];
#pragma unroll
  for (int s = 0; s < k_steps; ++s) {
    const int j = piece * (4 * (s / (piece / 2)) + t) + 2 * (s % (piece / 2));
#pragma unroll
    for (int rb = 0; rb < row_blocks; ++rb) {
      const int row = g + 8 * rb;
#pragma unroll
      for (int e = 0; e < 2; ++e)
        split_tf32(row < Group ? projected[(j + e) * Group + row] : 0.0f, query_hi[s][rb][e], query_lo[s][rb][e]);
    }
  }
  const bool metric = params.metric.logits != nullptr;
  const std::int64_t metric_line = metric ? params.partition.prefix(head) : 0;
  const std::uint64_t metric_policy = metric && params.metric.keep_in_l2 ? metric_store_policy() : 0;
  float running_max[row_blocks], row_sum[row_blocks], mix[k_steps][4];
#pragma unroll
  for (int rb = 0; rb < row_blocks; ++rb) running_max[rb] = negative_infinity, row_sum[rb] = 0.0f;
#pragma unroll
  for (int n = 0; n < k_steps; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) mix[n][i] = 0.0f;

  for (int tile = 0; tile < tiles; ++tile) {
    // One barrier per tile: once `tile` has landed and every warp is past tile − 1, the stage of
    // tile − 1 takes tile + stages − 1 (groups stay one per tile, empty past the end).
    copy_async_wait<stages - 2>();
    __syncthreads();
    if (tile + stages - 1 < tiles)
      low_rank_mma_stage(store, rows, begin, end, tile + stages - 1, layout, chunk_shift, shared);
    copy_async_commit();
    const unsigned char* stage = shared + static_cast<std::size_t>(tile % stages) * layout.stage_bytes;
    const unsigned char* keys = stage + static_cast<std::size_t>(32 * warp) * layout.key_stride;
    const unsigned char* values =
        stage + static_cast<std::size_t>(low_rank_mma_tile) * layout.key_stride + static_cast<std::size_t>(32 * warp) * layout.value_stride;
    const std::int64_t first = begin + std::int64_t{tile} * low_rank_mma_tile + 32 * warp;
    // The warp's tokens as offsets from `first`: valid below `left`, the compensation token at `biased`.
    const int left = static_cast<int>(end - first < 32 ? (end - first > 0 ? end - first : 0) : 32);
    const int biased = bias.index >= first && bias.index < first + 32 ? static_cast<int>(bias.index - first) : -1;
    // 1. Scores of the warp's 32 tokens (n-tile nt: tokens 8nt + 2t, + 1 in this lane's columns).
    float score[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) score[nt][i] = 0.0f;
      const unsigned char* row = keys + (8 * nt + g) * layout.key_stride;
#pragma unroll
      for (int i = 0; i < pieces; ++i) {
        unsigned coefficient[piece];
        load_halves_as_tf32<piece>(row + 2 * piece * (4 * i + t), coefficient);
#pragma unroll
        for (int sp = 0; sp < piece / 2; ++sp) {
          const int s = i * (piece / 2) + sp;
          const unsigned b0 = coefficient[2 * sp], b1 = coefficient[2 * sp + 1];
          mma_16x8x8_tf32(score[nt], query_hi[s][0][0], row_blocks > 1 ? query_hi[s][row_blocks - 1][0] : 0u,
                          query_hi[s][0][1], row_blocks > 1 ? query_hi[s][row_blocks - 1][1] : 0u, b0, b1);
          mma_16x8x8_tf32(score[nt], query_lo[s][0][0], row_blocks > 1 ? query_lo[s][row_blocks - 1][0] : 0u,
                          query_lo[s][0][1], row_blocks > 1 ? query_lo[s][row_blocks - 1][1] : 0u, b0, b1);
        }
      }
      // Bias, the segment's end, the metric's logits (rows < Group).
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int offset = 8 * nt + 2 * t + (i % 2);
        const int row = g + 8 * (i / 2);
        score[nt][i] = offset < left ? score[nt][i] + (offset == biased ? bias.bias_log2 : 0.0f) : negative_infinity;
        if (metric && offset < left && row < Group && (i < 2 || row_blocks > 1))
          store_metric_logit(params.metric.logits + row * params.metric.stride + metric_line + first + offset,
                             score[nt][i], params.metric.keep_in_l2, metric_policy);
      }
    }
    // 2. The online softmax per query row (a quad holds a row's 32 tokens).
    float rescale[row_blocks];
#pragma unroll
    for (int rb = 0; rb < row_blocks; ++rb) {
      float m = running_max[rb];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) m = fmaxf(m, fmaxf(score[nt][2 * rb], score[nt][2 * rb + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      rescale[rb] = m == negative_infinity ? 1.0f : exp2f(running_max[rb] - m);
      running_max[rb] = m;
      float added = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = score[nt][2 * rb + e];
          x = x == negative_infinity ? 0.0f : exp2f(x - m);
          added += x;
        }
      row_sum[rb] = row_sum[rb] * rescale[rb] + added;
    }
    // 3. The mix of the 32 tokens from zero: k index t ↔ token 8nt + 2t, t + 4 ↔ 8nt + 2t + 1.
    float block_mix[k_steps][4];
#pragma unroll
    for (int n = 0; n < k_steps; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) block_mix[n][i] = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      unsigned weight_hi[4], weight_lo[4];  // a0 (row g, token 2t), a1 (g + 8, 2t), a2 (g, 2t + 1), a3 (g + 8, 2t + 1)
      split_tf32(score[nt][0], weight_hi[0], weight_lo[0]);
      split_tf32(score[nt][1], weight_hi[2], weight_lo[2]);
      if constexpr (row_blocks > 1) {
        split_tf32(score[nt][2], weight_hi[1], weight_lo[1]);
        split_tf32(score[nt][3], weight_hi[3], weight_lo[3]);
      } else {
        weight_hi[1] = weight_hi[3] = weight_lo[1] = weight_lo[3] = 0u;
      }
      unsigned first_row[value_piece], second_row[value_piece];
      const unsigned char* row = values + (8 * nt + 2 * t) * layout.value_stride + 2 * value_piece * g;
      load_halves_as_tf32<value_piece>(row, first_row);
      load_halves_as_tf32<value_piece>(row + layout.value_stride, second_row);
#pragma unroll
      for (int n = 0; n < k_steps; ++n) {
        mma_16x8x8_tf32(block_mix[n], weight_hi[0], weight_hi[1], weight_hi[2], weight_hi[3], first_row[n], second_row[n]);
        mma_16x8x8_tf32(block_mix[n], weight_lo[0], weight_lo[1], weight_lo[2], weight_lo[3], first_row[n], second_row[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < k_steps; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) mix[n][i] = fmaf(mix[n][i], rescale[i / 2 < row_blocks ? i / 2 : 0], block_mix[n][i]);
  }
  copy_async_wait<0>();
  __syncthreads();

  // The segment's state: each warp's (max, sum, mix) per row, combined over the warps, lifted.
  auto* warp_max = reinterpret_cast<float*>(shared);                    // [warps][Group]
  auto* warp_sum = warp_max + low_rank_mma_warps * Group;               // [warps][Group]
  auto* warp_mix = warp_sum + low_rank_mma_warps * Group;               // [warps][Group][R]
  auto* row_max = warp_mix + low_rank_mma_warps * Group * Rank;         // [Group]
  auto* row_total = row_max + Group;                                    // [Group]
  auto* mixed = row_total + Group;                                      // [Group][R]
  auto* value_basis = mixed + Group * Rank;                             // [R][head_dim + 1]
#pragma unroll
  for (int rb = 0; rb < row_blocks; ++rb) {
    float s = row_sum[rb];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    const int row = g + 8 * rb;
    if (row < Group) {
      if (t == 0) warp_max[warp * Group + row] = running_max[rb], warp_sum[warp * Group + row] = s;
#pragma unroll
      for (int n = 0; n < k_steps; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          warp_mix[(warp * Group + row) * Rank + (2 * t + e) * (Rank / 8) + n] = mix[n][2 * rb + e];
    }
  }
  __syncthreads();
  if (threadIdx.x < Group) {
    const int row = threadIdx.x;
    float m = negative_infinity;
#pragma unroll
    for (int w = 0; w < low_rank_mma_warps; ++w) m = fmaxf(m, warp_max[w * Group + row]);
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < low_rank_mma_warps; ++w) {
      const float wm = warp_max[w * Group + row];
      total += wm == negative_infinity ? 0.0f : warp_sum[w * Group + row] * exp2f(wm - m);
    }
    row_max[row] = m, row_total[row] = total;
  }
  for (int index = threadIdx.x; index < Group * Rank; index += T) {
    const int row = index / Rank, j = index % Rank;
    float m = negative_infinity;
#pragma unroll
    for (int w = 0; w < low_rank_mma_warps; ++w) m = fmaxf(m, warp_max[w * Group + row]);
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < low_rank_mma_warps; ++w) {
      const float wm = warp_max[w * Group + row];
      total += wm == negative_infinity ? 0.0f : warp_mix[(w * Group + row) * Rank + j] * exp2f(wm - m);
    }
    mixed[index] = total;
  }
  // U_v transposed, rows padded to head_dim + 1: consecutive lanes store consecutive j (stride
  // head_dim + 1 floats: distinct banks), the lift's lanes read consecutive d.
  const int basis_stride = dim + 1;
  for (int index = threadIdx.x; index < dim * Rank; index += T) {
    const int d = index / Rank, j = index % Rank;
    value_basis[j * basis_stride + d] = head_value_basis[index];
  }
  __syncthreads();
  for (int index = threadIdx.x; index < Group * dim; index += T) {
    const int row = index / dim, d = index % dim;
    const float total_sum = row_total[row];
    float lifted = 0.0f;
    for (int j = 0; j < value_rank; ++j) lifted = fmaf(value_basis[j * basis_stride + d], mixed[row * Rank + j], lifted);
    low_rank_store_output<Group>(params, whole, b, h, head, partial_index, dim, row, d, total_sum > 0.0f ? lifted / total_sum : 0.0f,
                                 total_sum > 0.0f ? row_max[row] + log2f(total_sum) : negative_infinity);
  }
  __syncthreads();  // the next segment reuses every buffer
}

/// One kernel per stored rank (its registers: three blocks per multiprocessor at r ≤ 32).
template <int Group, int Rank, class Params>
__global__ void __launch_bounds__(low_rank_mma_threads, Rank == 64 ? 2 : 3)
    decode_attention_low_rank_mma(const __grid_constant__ Params params) {
  wait_for_prerequisite_grid();  // paged / flat: the plan's partition
  allow_dependent_grid();
  extern __shared__ __align__(16) unsigned char shared[];
  const low_rank_mma_layout layout(static_cast<int>(params.cache.storage.head_dim), Rank, Group);
  for_each_segment(params.partition, [&](std::int64_t head, std::int64_t begin, std::int64_t end, bool whole,
                                         std::int64_t partial_index) {
    low_rank_mma_segment<Group, Rank>(params, shared, layout, head, begin, end, whole, partial_index);
  });
}

/// decode_attention.cuh's kernel choice for low-rank caches, made per call from the storage:
/// the tensor-core kernel for post-RoPE ranks 16/32/64, else the CUDA-core one (select), and
/// the instantiation of the chosen kernel for the stored rank (kernel_for).
template <int Group>
struct low_rank_decode_choice {
  static constexpr bool supported = true;
  /// The kernel this cache takes, its block and shared memory (one device query per launch): above
  /// the device's opt-in limit a kvtrim::error naming the stored rank (compaction and append refuse
  /// such caches first).
  template <class View>
  static low_rank_decode_selection select(const View& cache) {
    return check_low_rank_decodable("kvtrim::scheme::attend", cache.storage, Group);
  }
  template <class Params, class View>
  static auto kernel_for(const low_rank_decode_selection& selected, const View& cache) {
    if (!selected.tensor_cores) return decode_attention_low_rank<Group, Params>;
    const std::int64_t rank = cache.storage.stored_rank;
    return rank == 16   ? decode_attention_low_rank_mma<Group, 16, Params>
           : rank == 32 ? decode_attention_low_rank_mma<Group, 32, Params>
                        : decode_attention_low_rank_mma<Group, 64, Params>;
  }
};

}  // namespace kvtrim::cuda_detail
