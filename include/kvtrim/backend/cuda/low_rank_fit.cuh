// kvtrim/backend/cuda/low_rank_fit.cuh — codec::low_rank's sequence bases
// (basis_source::sequence, the codec's default) fitted on the GPU: at every
// compaction and at every basis refresh of an append, with the CPU's rules
// (codec/low_rank.hpp: fit_basis, extend, refresh) and no host round trip.
//
// Math. The right singular vectors of a head's T × D rows X are the
// eigenvectors of its Gram matrix G = XᵀX, with σ_i² = λ_i. On the device:
//   compaction: G per (head, keys | values) in double (low_rank_gram: every input
//     is fp16/bf16/fp32, so each product of two of them is exact in double and
//     only the sums round, relative 2⁻⁵³ per addition), then every head's
//     eigen-decomposition in one
//     cusolverDnXsyevBatched call (double), then the CPU's rank rule
//     (analysis::rank_for_energy on σ = √max(λ, 0), capped by the stored rank
//     and by the "meaningful" directions σ_i > σ_0·10⁻⁷) and the basis: the
//     eigenvectors of the `rank` largest eigenvalues, rounded to float
//     (low_rank_pick_basis).
//   refresh (every update_freq appended tokens of a head): the residual R of the
//     pending rows outside the basis, the eigen-decomposition of the small Gram
//     R·Rᵀ (update_freq × update_freq ≤ 32 × 32, parallel cyclic Jacobi in double
//     in one block, low_rank_jacobi), right singular vectors v = Rᵀw / σ, the
//     CPU's growth rule and its two Gram–Schmidt passes per new column; then the
//     pending rows are encoded again with the grown bases.
// Bases from the device and from the CPU (Eigen's BDCSVD) agree to rounding
// where the spectrum has gaps; signs and the order of exactly equal singular
// values may differ (tests/cuda/codecs_test.cu compares subspaces, lifted rows
// and attention, not bytes). Known divergence: the CPU's "meaningful" floor
// σ_i > σ_0·10⁻⁷ is λ_i > λ_0·10⁻¹⁴ on the Gram, about where the Gram route's
// own error sits (~D·2⁻⁵³·λ_0: 1.4·10⁻¹⁴·λ_0 at D = 128), so for rows that are
// exactly rank-deficient with T ≥ D and a fixed rank (or energy 1) above their
// rank, the device may keep noise directions the CPU drops. The Gram's sums
// are added with atomics in no fixed order, so two runs may differ in the last
// bits of a basis (and, at an energy threshold's edge, in a rank).
//
// Why cuSOLVER for the compaction and a Jacobi kernel for the refresh: a
// compaction fits every head at once (one batched call over 2·B·H matrices of
// D × D, the library's job); a refresh is due for the heads whose pending
// buffer just filled, a data-dependent subset known only on the device, inside
// an append that must stay capturable in a CUDA graph, on matrices of at most
// 32 × 32 — one block per head decides and solves in place.
//
// Resources: the fit's Gram matrices, eigenvalues and cuSOLVER's workspace
// (2·B·H·D·(D + 1) doubles + the solver's; not counted by kvtrim::stats) live in
// a per-(host thread, device) buffer with the cuSOLVER handle (low_rank_solver),
// created and grown by prepare_low_rank_fit, which every layout's compaction
// calls with its host checks, before anything is written (cudaMalloc / cudaFree:
// a failure is a clean refusal). Calls on several streams from one thread are
// ordered on the buffer by an event; under graph capture that ordering is not
// recorded (capture one stream's compactions, and never a compaction larger
// than the buffer already is: a later growth frees what the graph points to).
// A refresh needs nothing but shared memory. Sequence bases on the device
// take update_freq ≤ 32 (low_rank_device_max_update_freq); larger ones are
// refused before anything is written.
#pragma once

#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvtrim/backend/cuda.hpp"
#include "kvtrim/codec/low_rank.hpp"

// What codec_low_rank.cuh's host checks need, ahead of codec_writes.cuh: that header includes
// codec_low_rank.cuh at its end, which includes this one, so a TU that includes this header first
// reaches codec_low_rank.cuh's checks before the rest of this file.
namespace kvtrim::cuda_detail {

/// The largest update_freq the device refreshes (the Jacobi matrix and the pending rows live in one block's
/// shared memory: 32 rows of D ≤ 256 doubles twice, ~150 KB).
inline constexpr std::int64_t low_rank_device_max_update_freq = 32;

/// Shared memory of low_rank_append_refreshing (doubles unless noted), for update_freq n ≤ 32 (padded to even m).
struct low_rank_refresh_layout {
  std::size_t rows = 0;       // [n][D]: the pending rows, then their residual
  std::size_t columns = 0;    // [n][max(D, r_max)]: P·U, then the new columns
  std::size_t gram = 0;       // [m][m]
  std::size_t vectors = 0;    // [m][m]
  std::size_t scratch = 0;    // [256]: dots and reductions
  std::size_t staged = 0;     // float [2][D]: the row being appended
  std::size_t bytes = 0;
  int even = 0;

  __host__ __device__ low_rank_refresh_layout(std::int64_t n, std::int64_t dim, std::int64_t r_max) {
    even = static_cast<int>(n + (n & 1));
    const std::int64_t wide = dim > r_max ? dim : r_max;
    std::size_t at = 0;
    rows = at;
    at += static_cast<std::size_t>(n * dim) * 8;
    columns = at;
    at += static_cast<std::size_t>(n * wide) * 8;
    gram = at;
    at += static_cast<std::size_t>(even * even) * 8;
    vectors = at;
    at += static_cast<std::size_t>(even * even) * 8;
    scratch = at;
    at += 256 * 8;
    staged = at;
    at += static_cast<std::size_t>(2 * dim) * 4;
    bytes = (at + 15) / 16 * 16;
  }
};

/// What low_rank_append_refreshing declares statically (partial sums, rotations, the order of singular
/// values, counters: ~1.6 KB), rounded up: the dynamic part may take the device's opt-in limit minus this.
inline constexpr std::size_t low_rank_refresh_static_bytes = 2048;

}  // namespace kvtrim::cuda_detail

#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"

namespace kvtrim::cuda_detail {

// ---- the cuSOLVER handle and the fit's buffer -----------------------------------

inline const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolverStatus_t (other)";
  }
}

inline void check_cusolver(cusolverStatus_t status, std::string_view function, std::string_view call) {
  if (status != CUSOLVER_STATUS_SUCCESS) detail::fail_call(function, call, cusolver_status_name(status));
}

/// One host thread's cuSOLVER handle on one device, and the device (and host) memory of its fits.
class low_rank_solver {
 public:
  /// The calling thread's solver for the current device (created on first use).
  static low_rank_solver& current(std::string_view function) {
    thread_local std::map<int, std::unique_ptr<low_rank_solver>> solvers;
    int device = 0;
    detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
    std::unique_ptr<low_rank_solver>& solver = solvers[device];
    if (!solver) solver.reset(new low_rank_solver(function));
    return *solver;
  }

  low_rank_solver(const low_rank_solver&) = delete;
  low_rank_solver& operator=(const low_rank_solver&) = delete;
  ~low_rank_solver() { release(); }

  cusolverDnHandle_t handle() const { return handle_; }
  cusolverDnParams_t params() const { return params_; }

  /// At least `bytes` of device memory (kept; grown with cudaFree + cudaMalloc, which wait for the
  /// work that may still use the old block).
  void* device_memory(std::string_view function, std::size_t bytes) {
    if (bytes > device_bytes_) {
      if (device_memory_ != nullptr) detail::check_cuda(cudaFree(device_memory_), function, "cudaFree(low_rank fit)");
      device_memory_ = nullptr;
      device_bytes_ = 0;
      detail::check_cuda(cudaMalloc(&device_memory_, bytes), function, "cudaMalloc(low_rank fit)");
      device_bytes_ = bytes;
    }
    return device_memory_;
  }
  void* host_memory(std::size_t bytes) {
    if (host_memory_.size() < bytes) host_memory_.resize(bytes);
    return host_memory_.empty() ? nullptr : host_memory_.data();
  }

  /// cuSOLVER's workspace for `matrices` eigen-decompositions of dim × dim (device, host bytes).
  std::pair<std::size_t, std::size_t> workspace_bytes(std::string_view function, std::int64_t dim,
                                                      std::int64_t matrices) const {
    std::size_t device = 0, host = 0;
    check_cusolver(cusolverDnXsyevBatched_bufferSize(handle_, params_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER,
                                                     dim, CUDA_R_64F, nullptr, dim, CUDA_R_64F, nullptr, CUDA_R_64F,
                                                     &device, &host, matrices),
                   function, "cusolverDnXsyevBatched_bufferSize");
    return {device, host};
  }

  /// Orders this call's use of the buffer after the previous call's, whatever stream that was on (not
  /// while `stream` is being captured: an event recorded outside a capture cannot be waited on inside it).
  void wait_for_previous_use(std::string_view function, cudaStream_t stream) {
    if (used_ && !capturing(function, stream))
      detail::check_cuda(cudaStreamWaitEvent(stream, last_use_, 0), function, "cudaStreamWaitEvent(low_rank fit)");
  }
  void record_use(std::string_view function, cudaStream_t stream) {
    if (capturing(function, stream)) return;
    detail::check_cuda(cudaEventRecord(last_use_, stream), function, "cudaEventRecord(low_rank fit)");
    used_ = true;
  }

 private:
  explicit low_rank_solver(std::string_view function) {
    try {
      check_cusolver(cusolverDnCreate(&handle_), function, "cusolverDnCreate");
      check_cusolver(cusolverDnCreateParams(&params_), function, "cusolverDnCreateParams");
      detail::check_cuda(cudaEventCreateWithFlags(&last_use_, cudaEventDisableTiming), function, "cudaEventCreate");
    } catch (...) {
      release();
      throw;
    }
  }
  void release() {
    // At thread exit (possibly after the context is gone): errors cannot be reported and are ignored.
    if (device_memory_ != nullptr) (void)cudaFree(device_memory_);
    if (last_use_ != nullptr) (void)cudaEventDestroy(last_use_);
    if (params_ != nullptr) (void)cusolverDnDestroyParams(params_);
    if (handle_ != nullptr) (void)cusolverDnDestroy(handle_);
    device_memory_ = nullptr, last_use_ = nullptr, params_ = nullptr, handle_ = nullptr;
  }
  static bool capturing(std::string_view function, cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    detail::check_cuda(cudaStreamIsCapturing(stream, &status), function, "cudaStreamIsCapturing");
    return status != cudaStreamCaptureStatusNone;
  }
  cudaEvent_t last_use_ = nullptr;
  bool used_ = false;
  cusolverDnHandle_t handle_ = nullptr;
  cusolverDnParams_t params_ = nullptr;
  void* device_memory_ = nullptr;
  std::size_t device_bytes_ = 0;
  std::vector<std::byte> host_memory_;
};

// ---- compaction: Gram matrices ------------------------------------------------------

inline constexpr int low_rank_gram_threads = 256;
inline constexpr int low_rank_gram_rows = 32;  // rows staged per chunk

/// Stages rows [first, first + low_rank_gram_rows) of the head's keys (or values) as `Staged` in shared memory
/// (row stride `stride`, zeros past the rows and the head dim): a warp per row, so each row's source is resolved
/// once (row_of: the kept token, the compensation row) and its channels are read by consecutive lanes.
template <class Staged, class View, class InT>
__device__ __forceinline__ void stage_gram_rows(const codec_write<View, InT>& w, std::int64_t head,
                                                const head_coordinates& coordinates, std::int64_t rows,
                                                std::int64_t first, bool values, int stride, Staged* staged) {
  const std::int64_t dim = w.cache.shape.head_dim;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  for (int r = warp; r < low_rank_gram_rows; r += low_rank_gram_threads / 32) {
    Staged* out = staged + r * stride;
    if (first + r < rows) {
      const source_row<InT> source = row_of(w, head, first + r, coordinates);
      for (int d = lane; d < stride; d += 32)
        out[d] = d < dim ? static_cast<Staged>(values ? source.value_at(d) : source.key_at(d)) : Staged{0};
    } else {
      for (int d = lane; d < stride; d += 32) out[d] = Staged{0};
    }
  }
}

/// The staged rows' stride in doubles: the head dim rounded up to 16 (whole 2 × 2 blocks of 8 × 8 tiles, the
/// columns past the head dim zero) plus 4, so that the four rows and four columns a half-warp's fragment load
/// touches fall in 16 different 8-byte bank pairs (stride ≡ 4 mod 16).
inline constexpr int low_rank_gram_stride(std::int64_t head_dim) { return static_cast<int>((head_dim + 15) / 16 * 16 + 4); }
inline std::size_t low_rank_gram_shared_bytes(std::int64_t head_dim) {
  return static_cast<std::size_t>(low_rank_gram_rows) * static_cast<std::size_t>(low_rank_gram_stride(head_dim)) *
         sizeof(double);
}
/// 2 × 2 blocks of 8 × 8 tiles a warp accumulates at once (8 doubles a block and lane).
inline constexpr int low_rank_gram_blocks_per_warp = 5;

/// D += A·B on the FP64 tensor cores (mma m8n8k4: A 8 × 4, row lane / 4, column lane % 4; B 4 × 8, row lane % 4,
/// column lane / 4; D 8 × 8, row lane / 4, columns 2(lane % 4) + 0, 1). Every product and sum in double, as
/// the CUDA cores' fma: the Gram's inputs are fp16 / bf16 / fp32, so each product is exact and only sums round.
__device__ __forceinline__ void dmma_8x8x4(double (&d)[2], double a, double b) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(d[0]), "+d"(d[1])
               : "d"(a), "d"(b));
}

/// gram[kind · heads + head] (column-major D × D, lower triangle) += Σ_r x_r x_rᵀ over the head's kept rows
/// (kind = blockIdx.z: 0 keys, 1 values), the compensation row in place of its placeholder, on the FP64 tensor
/// cores. The lower triangle's 8 × 8 tiles are taken in 2 × 2 blocks (block row ≥ block column; a diagonal
/// block's upper tile is skipped); each warp owns up to low_rank_gram_blocks_per_warp blocks a pass (one pass
/// at head dim ≤ 128: 36 blocks over 8 warps; four at 256), accumulates them over the chunks of 32 rows its
/// thread block visits (blockIdx.x, + gridDim.x, …) — four rows an mma, the staged rows read as the A
/// fragment of a tile row (Xᵀ) and the B fragment of a tile column (X): one 8-byte shared load each — and adds
/// them once (atomicAdd). The CUDA-core form this replaces converted every staged float to double again for
/// each 8 × 8 tile it fed and kept only 136 of 256 threads busy at head dim 128.
// One block an SM: 152 registers, no spills. Two (128 registers) spill ~100 bytes; not measured against one.
template <class View, class InT>
__global__ void __launch_bounds__(low_rank_gram_threads, 1)
    low_rank_gram(const __grid_constant__ codec_write<View, InT> w, double* gram) {
  if (write_failed(w)) return;
  extern __shared__ double staged[];  // [low_rank_gram_rows][low_rank_gram_stride(dim)]
  constexpr int warps = low_rank_gram_threads / 32, per_warp = low_rank_gram_blocks_per_warp;
  const std::int64_t dim = w.cache.shape.head_dim, heads = w.cache.heads();
  const int stride = low_rank_gram_stride(dim), block_rows = stride / 16;  // 2 × 2 tile blocks per side
  const int blocks = block_rows * (block_rows + 1) / 2;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const int fragment_row = lane % 4, fragment_column = lane / 4;  // the A / B fragment's (row, channel) in a tile
  const bool values = blockIdx.z == 1;
  for (std::int64_t head = blockIdx.y; head < heads; head += gridDim.y) {
    const std::int64_t rows = rows_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    double* out = gram + (std::int64_t{values} * heads + head) * dim * dim;
    if (std::int64_t{blockIdx.x} * low_rank_gram_rows >= rows) continue;  // no chunk for this block: nothing to add
    for (int first_block = 0; first_block < blocks; first_block += warps * per_warp) {
      // This warp's blocks first_block + warp + warps·i: block index → (block row bi ≥ block column bj).
      int block_row[per_warp], block_column[per_warp];
#pragma unroll
      for (int i = 0; i < per_warp; ++i) {
        const int index = first_block + warp + warps * i;
        int bi = 0;
        while ((bi + 1) * (bi + 2) / 2 <= index) ++bi;
        block_row[i] = bi, block_column[i] = index - bi * (bi + 1) / 2;
      }
      double sums[per_warp][2][2][2] = {};  // [block][tile row][tile column][the lane's two entries]
      for (std::int64_t chunk = blockIdx.x; chunk * low_rank_gram_rows < rows; chunk += gridDim.x) {
        __syncthreads();  // the previous chunk is read
        stage_gram_rows(w, head, coordinates, rows, chunk * low_rank_gram_rows, values, stride, staged);
        __syncthreads();
#pragma unroll 1
        for (int step = 0; step < low_rank_gram_rows / 4; ++step) {
          const double* fragment_base = staged + (4 * step + fragment_row) * stride + fragment_column;
#pragma unroll
          for (int i = 0; i < per_warp; ++i) {
            if (first_block + warp + warps * i >= blocks) break;  // warp-uniform
            const double a0 = fragment_base[16 * block_row[i]], a1 = fragment_base[16 * block_row[i] + 8];
            const bool diagonal = block_row[i] == block_column[i];
            const double b0 = diagonal ? a0 : fragment_base[16 * block_column[i]];
            const double b1 = diagonal ? a1 : fragment_base[16 * block_column[i] + 8];
            dmma_8x8x4(sums[i][0][0], a0, b0);
            if (!diagonal) dmma_8x8x4(sums[i][0][1], a0, b1);  // a diagonal block's upper tile: not needed
            dmma_8x8x4(sums[i][1][0], a1, b0);
            dmma_8x8x4(sums[i][1][1], a1, b1);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < per_warp; ++i) {
        if (first_block + warp + warps * i >= blocks) break;
#pragma unroll
        for (int ti = 0; ti < 2; ++ti)
#pragma unroll
          for (int tj = 0; tj < 2; ++tj)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int row = 16 * block_row[i] + 8 * ti + lane / 4;
              const int column = 16 * block_column[i] + 8 * tj + 2 * (lane % 4) + e;
              if (row < dim && column <= row) atomicAdd(out + row + std::int64_t{column} * dim, sums[i][ti][tj][e]);
            }
      }
    }
  }
}

/// CPU's analysis::rank_for_energy on σ² = the eigenvalues, descending (λ_desc(k) = lambda[dim − 1 − k]).
__device__ inline std::int64_t device_rank_for_energy(const double* lambda, std::int64_t dim, std::int64_t count,
                                                      double threshold) {
  const auto squared = [&](std::int64_t k) { return fmax(lambda[dim - 1 - k], 0.0); };
  if (count == 0 || squared(0) == 0.0) return 0;
  double total = 0.0;
  for (std::int64_t k = 0; k < count; ++k) total += squared(k);
  double running = 0.0;
  for (std::int64_t k = 0; k < count; ++k) {
    running += squared(k);
    if (running / total >= threshold * (1.0 - 1e-12)) return k + 1;
  }
  return count;
}

/// One block per (kind, head): the CPU's fit_basis rank rule on the eigenvalues (ascending, as cuSOLVER
/// returns them) and the basis (eigenvectors of the `rank` largest, float; columns from the rank on 0).
template <class View, class InT>
__global__ void low_rank_pick_basis(const __grid_constant__ codec_write<View, InT> w, const double* vectors,
                                    const double* eigenvalues, const int* info) {
  if (write_failed(w)) return;
  const auto& store = w.cache.storage;
  const std::int64_t dim = store.head_dim, r_max = store.stored_rank, heads = w.cache.heads();
  __shared__ std::int64_t chosen;
  for (std::int64_t matrix = blockIdx.x; matrix < 2 * heads; matrix += gridDim.x) {
    const bool values = matrix >= heads;
    const std::int64_t head = values ? matrix - heads : matrix;
    const double* lambda = eigenvalues + matrix * dim;
    if (threadIdx.x == 0) {
      // The CPU's SVD has min(T, D) singular values; the Gram has D eigenvalues, the extra ones ≈ 0.
      const std::int64_t count = std::min(rows_of(w, head), dim);
      std::int64_t rank = 0;
      if (count > 0 && info[matrix] == 0) {
        rank = store.fixed_rank > 0 ? store.fixed_rank : device_rank_for_energy(lambda, dim, count, store.energy);
        // σ_i > σ_0·10⁻⁷ ⇔ λ_i > λ_0·10⁻¹⁴ (σ ≥ 0).
        const double floor = fmax(lambda[dim - 1], 0.0) * 1e-14;
        std::int64_t meaningful = 0;
        while (meaningful < count && fmax(lambda[dim - 1 - meaningful], 0.0) > floor) ++meaningful;
        rank = std::min({rank, r_max, meaningful});
      }
      // info ≠ 0 (the solver did not converge; not seen on positive semi-definite Grams): rank 0, the head
      // stores zeros rather than a wrong basis.
      chosen = rank;
    }
    __syncthreads();
    const std::int64_t rank = chosen;
    float* bases = (values ? store.value_bases : store.key_bases) + head * dim * r_max;
    const double* matrix_vectors = vectors + matrix * dim * dim;
    for (std::int64_t i = threadIdx.x; i < dim * r_max; i += blockDim.x) {
      const std::int64_t d = i / r_max, j = i % r_max;
      bases[i] = j < rank ? static_cast<float>(matrix_vectors[d + dim * (dim - 1 - j)]) : 0.0f;
    }
    if (threadIdx.x == 0) (values ? store.value_ranks : store.key_ranks)[head] = static_cast<std::int32_t>(rank);
    __syncthreads();  // `chosen` is read before the next matrix's
  }
}

/// Bytes of the fit's device buffer before cuSOLVER's workspace: Gram matrices (then eigenvectors),
/// eigenvalues, info words.
inline std::size_t low_rank_fit_bytes(std::int64_t heads, std::int64_t dim) {
  const auto up256 = [](std::size_t n) { return (n + 255) / 256 * 256; };
  const std::size_t matrices = static_cast<std::size_t>(2 * heads);
  return up256(matrices * static_cast<std::size_t>(dim * dim) * sizeof(double)) +
         up256(matrices * static_cast<std::size_t>(dim) * sizeof(double)) + up256(matrices * sizeof(int));
}

/// What a compaction's fit needs before its layout writes anything (the solver, its buffer grown to
/// `heads` heads of `dim`): every fallible host step, so that the launches after the layout's planning
/// kernel cannot throw for want of memory. Called by every layout's compaction with its host checks.
template <class View>
void prepare_low_rank_fit(std::string_view function, const View& cache) {
  if constexpr (std::is_same_v<typename View::codec, codec::low_rank>) {
    if (!cache.storage.from_sequence) return;
    const std::int64_t heads = cache.heads(), dim = cache.shape.head_dim;
    low_rank_solver& solver = low_rank_solver::current(function);
    const auto [device, host] = solver.workspace_bytes(function, dim, 2 * heads);
    (void)solver.device_memory(function, low_rank_fit_bytes(heads, dim) + device);
    (void)solver.host_memory(host);
  } else {
    (void)function, (void)cache;
  }
}

/// Compaction of a sequence-basis cache: fit every head's key and value bases to its kept rows on `stream`,
/// before the rows are encoded (launch_low_rank_writes). `rows_bound`: a host bound on any head's rows.
/// prepare_low_rank_fit ran with the call's host checks: nothing here allocates.
template <class View, class InT>
void launch_low_rank_fit(std::string_view function, const codec_write<View, InT>& w, std::int64_t rows_bound,
                         cudaStream_t stream) {
  const std::int64_t heads = w.cache.heads(), dim = w.cache.shape.head_dim;
  const std::int64_t matrices = 2 * heads;
  low_rank_solver& solver = low_rank_solver::current(function);
  check_cusolver(cusolverDnSetStream(solver.handle(), stream), function, "cusolverDnSetStream");
  const auto [solver_device, solver_host] = solver.workspace_bytes(function, dim, matrices);
  const std::size_t gram_bytes = static_cast<std::size_t>(matrices * dim * dim) * sizeof(double);
  const std::size_t ours = low_rank_fit_bytes(heads, dim);
  auto* memory = static_cast<std::byte*>(solver.device_memory(function, ours + solver_device));
  auto* gram = reinterpret_cast<double*>(memory);
  auto* eigenvalues = reinterpret_cast<double*>(memory + (gram_bytes + 255) / 256 * 256);
  auto* info = reinterpret_cast<int*>(reinterpret_cast<std::byte*>(eigenvalues) +
                                      (static_cast<std::size_t>(matrices * dim) * sizeof(double) + 255) / 256 * 256);
  void* workspace = memory + ours;
  void* host_workspace = solver.host_memory(solver_host);

  solver.wait_for_previous_use(function, stream);
  detail::check_cuda(cudaMemsetAsync(gram, 0, gram_bytes, stream), function, "cudaMemsetAsync(gram)");
  const std::int64_t head_blocks = std::min<std::int64_t>(heads, 65535);
  // ~4 blocks per multiprocessor over both kinds (132 on the H200), each walking several chunks.
  const std::int64_t chunks = std::max<std::int64_t>(ceil_div(std::max<std::int64_t>(rows_bound, 1), low_rank_gram_rows), 1);
  const std::int64_t per_head = std::clamp<std::int64_t>(ceil_div(528, 2 * head_blocks), 1, chunks);
  const dim3 grid(static_cast<unsigned>(per_head), static_cast<unsigned>(head_blocks), 2);
  const std::size_t shared = low_rank_gram_shared_bytes(dim);
  if (shared > 48 * 1024)  // head dim 256: 66,560 bytes
    detail::check_cuda(cudaFuncSetAttribute(low_rank_gram<View, InT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared)),
                       function, "cudaFuncSetAttribute(low_rank_gram)");
  low_rank_gram<View, InT><<<grid, low_rank_gram_threads, shared, stream>>>(w, gram);
  detail::check_launch(function, "low_rank_gram");
  check_cusolver(cusolverDnXsyevBatched(solver.handle(), solver.params(), CUSOLVER_EIG_MODE_VECTOR,
                                        CUBLAS_FILL_MODE_LOWER, dim, CUDA_R_64F, gram, dim, CUDA_R_64F, eigenvalues,
                                        CUDA_R_64F, workspace, solver_device, host_workspace, solver_host, info,
                                        matrices),
                 function, "cusolverDnXsyevBatched");
  low_rank_pick_basis<View, InT>
      <<<static_cast<unsigned>(std::min<std::int64_t>(matrices, 65535)), 256, 0, stream>>>(w, gram, eigenvalues, info);
  detail::check_launch(function, "low_rank_pick_basis");
  solver.record_use(function, stream);
}

// ---- append: the pending buffer and the refresh -----------------------------------------

inline constexpr int low_rank_refresh_threads = 256;

/// Block-wide Σ of one double per thread, to every thread (scratch: ≥ 8 doubles, not in use).
__device__ inline double block_sum_double(double value, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();  // scratch free
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += scratch[w];
  return total;
}

/// Eigen-decomposition of the symmetric m × m `gram` (m even, row-major) by parallel cyclic Jacobi:
/// each sweep is m − 1 rounds of m/2 disjoint rotations (the circle method), each rotation the symmetric
/// Schur step of Golub & Van Loan (8.4.2) that zeroes gram[p][q]. On return gram's diagonal holds the
/// eigenvalues and `vectors`' columns the eigenvectors. Stops when the off-diagonal mass is below
/// 10⁻³⁰ of the diagonal's (double's rounding floor) or after 30 sweeps.
__device__ inline void low_rank_jacobi(double* gram, double* vectors, int m, double* scratch) {
  for (int i = threadIdx.x; i < m * m; i += blockDim.x) vectors[i] = (i / m == i % m) ? 1.0 : 0.0;
  __shared__ int rotation_p[16], rotation_q[16];
  __shared__ double rotation_c[16], rotation_s[16];
  // Rotation k on one pair of entries (rows p, q of a column, or columns p, q of a row): (x_p, x_q) ←
  // (c·x_p − s·x_q, s·x_p + c·x_q).
  const auto rotate = [&](double* p, double* q, int k) {
    const double c = rotation_c[k], s = rotation_s[k], xp = *p, xq = *q;
    *p = c * xp - s * xq;
    *q = s * xp + c * xq;
  };
  for (int sweep = 0; sweep < 30; ++sweep) {
    __syncthreads();
    double off = 0.0, diagonal = 0.0;
    for (int i = threadIdx.x; i < m * m; i += blockDim.x) {
      const double x = gram[i];
      if (i / m == i % m)
        diagonal += x * x;
      else
        off += x * x;
    }
    off = block_sum_double(off, scratch);
    diagonal = block_sum_double(diagonal, scratch);
    if (off <= 1e-30 * diagonal || off == 0.0) break;
    for (int round = 0; round < m - 1; ++round) {
      __syncthreads();
      if (threadIdx.x < m / 2) {
        const int k = threadIdx.x;
        int p = k == 0 ? m - 1 : (round + k) % (m - 1);
        int q = k == 0 ? round : (round - k + (m - 1)) % (m - 1);
        if (p > q) {
          const int t = p;
          p = q, q = t;
        }
        const double apq = gram[p * m + q];
        double c = 1.0, s = 0.0;
        if (apq != 0.0) {
          const double tau = (gram[q * m + q] - gram[p * m + p]) / (2.0 * apq);
          const double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
          c = 1.0 / sqrt(1.0 + t * t);
          s = t * c;
        }
        rotation_p[k] = p, rotation_q[k] = q, rotation_c[k] = c, rotation_s[k] = s;
      }
      __syncthreads();
      // Rows: G ← JᵀG (rows p and q of every pair; pairs are disjoint).
      for (int i = threadIdx.x; i < (m / 2) * m; i += blockDim.x) {
        const int k = i / m, column = i % m;
        rotate(gram + rotation_p[k] * m + column, gram + rotation_q[k] * m + column, k);
      }
      __syncthreads();
      // Columns: G ← GJ, and the vectors V ← VJ.
      for (int i = threadIdx.x; i < (m / 2) * m; i += blockDim.x) {
        const int k = i / m, row = i % m;
        rotate(gram + row * m + rotation_p[k], gram + row * m + rotation_q[k], k);
        rotate(vectors + row * m + rotation_p[k], vectors + row * m + rotation_q[k], k);
      }
    }
  }
  __syncthreads();
}

/// codec::low_rank::extend on the device, for one head and one of its two bases, by the whole block:
/// `pending` the head's n pending rows (fp32, as given). Every thread returns after the block's last write.
__device__ inline void low_rank_extend(const codec::low_rank::storage<device_space>& store, std::int64_t head,
                                       const float* pending, float* all_bases, std::int32_t* ranks,
                                       const low_rank_refresh_layout& layout, std::byte* shared) {
  const int n = static_cast<int>(store.update_freq), m = layout.even;
  const std::int64_t dim = store.head_dim, r_max = store.stored_rank;
  const std::int64_t rank = ranks[head];
  if (rank >= r_max) return;
  auto* rows = reinterpret_cast<double*>(shared + layout.rows);
  auto* columns = reinterpret_cast<double*>(shared + layout.columns);
  auto* gram = reinterpret_cast<double*>(shared + layout.gram);
  auto* vectors = reinterpret_cast<double*>(shared + layout.vectors);
  auto* scratch = reinterpret_cast<double*>(shared + layout.scratch);
  float* basis = all_bases + head * dim * r_max;
  __syncthreads();  // shared memory is free
  double total = 0.0;
  for (std::int64_t i = threadIdx.x; i < n * dim; i += blockDim.x) {
    rows[i] = pending[i];
    total += rows[i] * rows[i];
  }
  total = block_sum_double(total, scratch);
  // P·U (n × rank), then the residual R = P − (P·U)·Uᵀ in place.
  for (std::int64_t i = threadIdx.x; i < n * rank; i += blockDim.x) {
    const std::int64_t row = i / rank, j = i % rank;
    double sum = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) sum += rows[row * dim + d] * static_cast<double>(basis[d * r_max + j]);
    columns[i] = sum;
  }
  __syncthreads();
  double missed = 0.0;
  for (std::int64_t i = threadIdx.x; i < n * dim; i += blockDim.x) {
    const std::int64_t row = i / dim, d = i % dim;
    double x = rows[i];
    for (std::int64_t j = 0; j < rank; ++j) x -= columns[row * rank + j] * static_cast<double>(basis[d * r_max + j]);
    rows[i] = x;
    missed += x * x;
  }
  missed = block_sum_double(missed, scratch);
  if (total == 0.0 || missed <= total * 1e-12) return;
  // R·Rᵀ (m × m; the padding row and column, when n is odd, are 0 and never rotate).
  for (int i = threadIdx.x; i < m * m; i += blockDim.x) {
    const int a = i / m, b = i % m;
    double sum = 0.0;
    if (a < n && b < n)
      for (std::int64_t d = 0; d < dim; ++d) sum += rows[a * dim + d] * rows[b * dim + d];
    gram[i] = sum;
  }
  low_rank_jacobi(gram, vectors, m, scratch);
  // The singular values σ = √max(λ, 0), descending (the padding index excluded): order[] in scratch.
  __shared__ int order[32];
  __shared__ int added;
  if (threadIdx.x == 0) {
    int count = 0;
    for (int a = 0; a < n; ++a) order[count++] = a;
    for (int a = 1; a < count; ++a)  // insertion sort, descending by eigenvalue (n ≤ 32)
      for (int b = a; b > 0 && gram[order[b] * m + order[b]] > gram[order[b - 1] * m + order[b - 1]]; --b) {
        const int t = order[b];
        order[b] = order[b - 1], order[b - 1] = t;
      }
    const auto sigma = [&](int k) { return sqrt(fmax(gram[order[k] * m + order[k]], 0.0)); };
    // The CPU's rule (extend): BDCSVD of R has min(n, D) singular values.
    const std::int64_t singular = std::min<std::int64_t>(n, dim);
    const std::int64_t target = store.fixed_rank > 0 ? store.fixed_rank : r_max;
    std::int64_t add = 0;
    double still_missed = missed;
    while (rank + add < target && add < singular && sigma(static_cast<int>(add)) > sigma(0) * 1e-7) {
      if (store.fixed_rank == 0 && (total - still_missed) >= store.energy * total) break;
      const double s = sigma(static_cast<int>(add));
      still_missed -= s * s;
      ++add;
    }
    added = static_cast<int>(add);
  }
  __syncthreads();
  const int add = added;
  if (add == 0) return;
  // New column a: v = Rᵀw_a / σ_a, then twice v −= G(Gᵀv) over the columns before it (the basis's rank
  // columns, in float, and the new ones, in double), then v / ‖v‖ (codec::low_rank::extend's steps).
  double* grown = columns;  // [add][dim], P·U is no longer needed
  for (int a = 0; a < add; ++a) {
    const int e = order[a];
    const double s = sqrt(fmax(gram[e * m + e], 0.0));
    for (std::int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      double sum = 0.0;
      for (int row = 0; row < n; ++row) sum += rows[row * dim + d] * vectors[row * m + e];
      grown[a * dim + d] = sum / s;
    }
    for (int pass = 0; pass < 2; ++pass) {
      __syncthreads();
      // Gᵀv: one dot per earlier column (rank + a ≤ r_max ≤ 256 = the block's threads).
      const std::int64_t earlier = rank + a;
      double dot = 0.0;
      if (threadIdx.x < earlier) {
        const std::int64_t j = threadIdx.x;
        for (std::int64_t d = 0; d < dim; ++d)
          dot += (j < rank ? static_cast<double>(basis[d * r_max + j]) : grown[(j - rank) * dim + d]) * grown[a * dim + d];
      }
      __syncthreads();
      if (threadIdx.x < earlier) scratch[threadIdx.x] = dot;
      __syncthreads();
      for (std::int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        double x = grown[a * dim + d];
        for (std::int64_t j = 0; j < earlier; ++j)
          x -= (j < rank ? static_cast<double>(basis[d * r_max + j]) : grown[(j - rank) * dim + d]) * scratch[j];
        grown[a * dim + d] = x;
      }
    }
    double norm = 0.0;
    for (std::int64_t d = threadIdx.x; d < dim; d += blockDim.x) norm += grown[a * dim + d] * grown[a * dim + d];
    norm = sqrt(block_sum_double(norm, scratch));
    for (std::int64_t d = threadIdx.x; d < dim; d += blockDim.x) grown[a * dim + d] /= norm;
    __syncthreads();
  }
  for (std::int64_t i = threadIdx.x; i < add * dim; i += blockDim.x) {
    const std::int64_t a = i / dim, d = i % dim;
    basis[d * r_max + rank + a] = static_cast<float>(grown[i]);
  }
  if (threadIdx.x == 0) ranks[head] = static_cast<std::int32_t>(rank + add);
  __syncthreads();
}

/// c = Uᵀx for one row by the whole block: threads [0, 128) the key, [128, 256) the value; within a half,
/// groups of r_max threads (128 / r_max of them, at least 1) sum consecutive slices of the channels, then
/// coefficient j adds the groups' partial sums in order and rounds to fp16 once. (Sequence bases only:
/// their coefficients are not the CPU's bit for bit anyway, since the bases are not; profile bases keep
/// low_rank_encode_rows and its CPU order.) A warp per coefficient slice keeps many basis loads in flight:
/// the loop over all D channels by one thread per coefficient was latency-bound (~40 µs an append at W).
__device__ inline void low_rank_project_row(const codec::low_rank::storage<device_space>& store, std::int64_t head,
                                            std::int64_t slot, const float* key, const float* value) {
  const int dim = static_cast<int>(store.head_dim), r_max = static_cast<int>(store.stored_rank);
  constexpr int half_block = low_rank_refresh_threads / 2;
  __shared__ float partial_sums[2][half_block];
  const bool is_value = threadIdx.x >= half_block;
  const int t = static_cast<int>(threadIdx.x) % half_block;
  const int groups = r_max <= half_block ? half_block / r_max : 1;
  const int group = t / r_max, per_group = (dim + groups - 1) / groups;
  const float* basis = (is_value ? store.value_bases : store.key_bases) + head * dim * r_max;
  const float* x = is_value ? value : key;
  const int rank = is_value ? store.value_ranks[head] : store.key_ranks[head];
  auto* coefficients = reinterpret_cast<__half*>(is_value ? store.value_coefficients : store.key_coefficients);
  if (r_max <= half_block) {
    if (group < groups) {
      const int j = t % r_max, begin = group * per_group, end = min(dim, begin + per_group);
      float sum = 0.0f;
      if (j < rank)
#pragma unroll 8
        for (int d = begin; d < end; ++d) sum = fmaf(basis[d * r_max + j], x[d], sum);
      partial_sums[is_value][t] = sum;
    }
    __syncthreads();
    if (t < r_max) {
      float sum = 0.0f;
      for (int g = 0; g < groups; ++g) sum += partial_sums[is_value][g * r_max + t];
      coefficients[slot * r_max + t] = __float2half_rn(sum);
    }
  } else {
    for (int j = t; j < r_max; j += half_block) {
      float sum = 0.0f;
      if (j < rank)
#pragma unroll 8
        for (int d = 0; d < dim; ++d) sum = fmaf(basis[d * r_max + j], x[d], sum);
      coefficients[slot * r_max + j] = __float2half_rn(sum);
    }
  }
  __syncthreads();  // partial_sums is free again
}

/// Append to a sequence-basis cache with refreshes (update_freq > 0): one block per head, its rows in order,
/// as codec::low_rank::encode does token by token — project with the current bases, remember the row (slot,
/// fp32 key and value) in the pending buffer; when it holds update_freq rows, extend both bases
/// (low_rank_extend) and encode the pending rows again. The CPU's encode first counts compaction_left down
/// (rows of the compaction the basis was fitted to); on the device that count is 0 whenever update_freq > 0:
/// its only writers are low_rank_reset (0) and the compaction's encode (0 with refreshes: every kept row was
/// encoded by it; a CPU cache's bytes hold 0 too after every call, its compaction counting its own rows
/// down), so an append never meets a row of the compaction and does not read the count.
template <class View, class InT>
__global__ void __launch_bounds__(low_rank_refresh_threads)
    low_rank_append_refreshing(const __grid_constant__ codec_write<View, InT> w) {
  if (write_failed(w)) return;
  extern __shared__ __align__(16) std::byte refresh_shared[];
  const auto& store = w.cache.storage;
  const std::int64_t dim = store.head_dim, n = store.update_freq;
  const low_rank_refresh_layout layout(n, dim, store.stored_rank);
  auto* key = reinterpret_cast<float*>(refresh_shared + layout.staged);
  float* value = key + dim;
  __shared__ std::int64_t slot_shared, pending_shared;
  KVTRIM_FOR_EACH_WRITTEN_HEAD(w, head) {
    const std::int64_t rows = rows_of(w, head), first = first_of(w, head);
    const head_coordinates coordinates = coordinates_of(w, head);
    for (std::int64_t r = 0; r < rows; ++r) {
      __syncthreads();  // the previous row's staging and counters are read
      const source_row<InT> source = row_of(w, head, r, coordinates);
      for (std::int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        key[d] = source.key_at(d);
        value[d] = source.value_at(d);
      }
      if (threadIdx.x == 0) {
        const std::int64_t slot = w.cache.slot(coordinates.b, coordinates.h, first + r);
        w.cache.positions.slot_position[slot] = static_cast<std::int32_t>(position_of_row(w, head, r, coordinates));
        slot_shared = slot;
        pending_shared = store.pending_counts[head];
      }
      __syncthreads();
      const std::int64_t slot = slot_shared;
      low_rank_project_row(store, head, slot, key, value);
      const std::int64_t at = head * n + pending_shared;
      for (std::int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        store.pending_keys[at * dim + d] = key[d];
        store.pending_values[at * dim + d] = value[d];
      }
      if (threadIdx.x == 0) {
        store.pending_slots[at] = slot;
        store.pending_counts[head] = pending_shared + 1;
      }
      if (pending_shared + 1 < n) continue;
      __syncthreads();  // the pending buffer is complete (global writes of this block, visible after the barrier)
      const float* pending_keys = store.pending_keys + head * n * dim;
      const float* pending_values = store.pending_values + head * n * dim;
      low_rank_extend(store, head, pending_keys, store.key_bases, store.key_ranks, layout, refresh_shared);
      low_rank_extend(store, head, pending_values, store.value_bases, store.value_ranks, layout, refresh_shared);
      __syncthreads();  // the grown bases and ranks are written
      for (std::int64_t i = 0; i < n; ++i)
        low_rank_project_row(store, head, store.pending_slots[head * n + i], pending_keys + i * dim,
                             pending_values + i * dim);
      __syncthreads();
      if (threadIdx.x == 0) store.pending_counts[head] = 0;
    }
  }
}

/// Launches the refreshing append (one block per written head).
template <class View, class InT>
void launch_low_rank_append_refreshing(std::string_view function, const codec_write<View, InT>& w,
                                       cudaStream_t stream) {
  const auto& store = w.cache.storage;
  const low_rank_refresh_layout layout(store.update_freq, store.head_dim, store.stored_rank);
  const auto kernel = low_rank_append_refreshing<View, InT>;
  // The same value from every thread and call (the opt-in limit less the static part; check_low_rank_writable
  // refused a layout larger than that before the call wrote anything), so concurrent callers cannot undo
  // each other's setting.
  int device = 0, limit = 0;
  detail::check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  detail::check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), function,
                     "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          limit - static_cast<int>(low_rank_refresh_static_bytes)),
                     function, "cudaFuncSetAttribute(low_rank_append_refreshing)");
  const std::int64_t heads = w.target >= 0 ? 1 : w.cache.heads();
  kernel<<<dim3(1, static_cast<unsigned>(std::min<std::int64_t>(heads, 65535))), low_rank_refresh_threads, layout.bytes,
           stream>>>(w);
  detail::check_launch(function, "low_rank_append_refreshing");
}

}  // namespace kvtrim::cuda_detail
