// kvtrim/backend/cuda/wgmma.cuh — Hopper's warpgroup matrix multiply (sm_90a only):
// the shared-memory tile layout it reads, its matrix descriptors, and the
// m64n64k16 instructions with fp32 accumulators for fp16 and bf16.
//
// Compiled in only where KVTRIM_CUDA_WGMMA is defined, which says that the
// translation unit carries sm_90a code (cmake/kvtrimCuda.cmake defines it when a
// target's CUDA_ARCHITECTURES is 90a alone). The host cannot tell sm_90 from sm_90a
// code at compile or run time (nvcc's host pass sees __CUDA_ARCH_LIST__ 900 for
// both), so the choice is the build's, and the host takes the wgmma kernels only on
// a compute capability 9.0 device, where the runtime loads the sm_90a code. Other
// device passes of the same unit (nvcc's -arch=sm_90a also emits compute_90 PTX,
// which a newer GPU would JIT) compile the kernels to a trap they never reach.
//
// Tile layout (PTX ISA, "Shared Memory Matrix Layout", 128-byte swizzle, K-major):
// a tile of 64 rows × D 16-bit channels is D/64 panels of [64 rows][128 bytes];
// within a panel, row r's 16-byte chunk q (channels 8q … 8q + 7 of the panel) sits
// at r·128 + ((q ⊕ (r mod 8))·16). Panels are 1024-byte aligned (the swizzle is a
// function of the address bits, the pattern repeats every 8 rows = 1024 bytes), so
// the descriptor of k-step s (channels 16s … 16s + 15) is the panel s/4 plus
// 32·(s mod 4) bytes, stride between 8-row groups 1024 bytes, and the hardware
// applies the same XOR. Eight rows at one logical chunk fall in eight different
// chunks of 16 bytes: ldmatrix and the 16-byte cp.async writes are conflict-free.
//
// Fragments (PTX ISA, "Register Fragments for wgmma .m64nNk16"): warp w of the
// warpgroup owns rows 16w … 16w + 15 of A and of the accumulator; within a warp
// (lane = 4g + t) the A registers are mma.sync m16n8k16's (a0: row g, k 2t, 2t + 1;
// a1: row g + 8; a2: k + 8; a3: both), and accumulator d[4c + e] is (row g,
// column 8c + 2t + e), d[4c + 2 + e] (row g + 8, same column), c = 0 … N/8 − 1.
#pragma once

#if defined(KVTRIM_CUDA_WGMMA)

/// True in the device passes that can assemble wgmma (sm_90a).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KVTRIM_WGMMA_DEVICE_PASS 1
#else
#define KVTRIM_WGMMA_DEVICE_PASS 0
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace kvtrim::cuda_detail {

/// Rows of one swizzled tile (a wgmma M or N of 64) and bytes of one panel.
inline constexpr int swizzled_rows = 64;
inline constexpr int swizzled_panel_bytes = swizzled_rows * 128;

/// Bytes of a 64-row tile of D 16-bit channels.
template <int HeadDim>
inline constexpr int swizzled_tile_bytes = HeadDim / 64 * swizzled_panel_bytes;

/// Byte offset of (row, 16-byte chunk q of the row) inside a swizzled tile.
__device__ __forceinline__ unsigned swizzled_offset(int row, int chunk) {
  return static_cast<unsigned>((chunk / 8) * swizzled_panel_bytes + row * 128 + (((chunk % 8) ^ (row % 8)) * 16));
}

/// wgmma's matrix descriptor of k-step s (16 channels) of the swizzled tile at shared
/// address `tile`: start address, leading byte offset (unused by K-major swizzled
/// layouts, 1 by convention), stride byte offset 1024 (8 rows), 128-byte swizzle.
/// Built as two 32-bit words: the low one (start, leading offset) is
/// swizzled_descriptor_low(tile) + swizzled_step_offset(s), the high one a constant
/// (swizzled_descriptor_from_low). Shared addresses are below 2^18
/// (228 KB), so the start field (address >> 4, 14 bits) needs no mask and a k-step's
/// offset adds to a tile's low word without a carry out of the field: a loop over
/// k-steps builds the tile's word once and adds a constant per step (the masked 64-bit
/// form cost five uniform-datapath instructions a wgmma, ~20 % of pass 2's issue slots).
__device__ __forceinline__ unsigned swizzled_descriptor_low(unsigned tile) { return (tile >> 4) | (1u << 16); }
/// What k-step `step` adds to a tile's low descriptor word: the step's byte offset in
/// the tile, in 16-byte units.
__host__ __device__ constexpr unsigned swizzled_step_offset(int step) {
  return static_cast<unsigned>(((step / 4) * swizzled_panel_bytes + (step % 4) * 32) >> 4);
}
__device__ __forceinline__ std::uint64_t swizzled_descriptor_from_low(unsigned low) {
  constexpr unsigned high = (1024u >> 4) | (1u << 30);  // stride byte offset; bits 62–63: 128-byte swizzle
  return (static_cast<std::uint64_t>(high) << 32) | low;
}

/// ldmatrix.x4 of the A fragment of rows [row0, row0 + 16) × k-step `step` of a swizzled
/// tile (lanes 0–15 address rows at the step's first chunk, lanes 16–31 at its second).
__device__ __forceinline__ void load_swizzled_rows(unsigned (&a)[4], unsigned tile, int row0, int step) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const unsigned address = tile + swizzled_offset(row0 + lane % 16, 2 * step + lane / 16);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address));
}

/// Orders this warpgroup's register accesses before the wgmma that follows (PTX:
/// required before the first wgmma and after any other instruction touched its
/// accumulator or A registers).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
/// Makes this thread's completed generic-proxy writes to shared memory (stores,
/// cp.async) visible to the async proxy that wgmma reads through; then a barrier.
__device__ __forceinline__ void fence_shared_for_wgmma() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/// Synchronises the 128 threads of one warpgroup (named barrier 1 + `warpgroup`; 0 is
/// __syncthreads'): the warpgroups of a block then run their own K streams.
__device__ __forceinline__ void warpgroup_barrier(int warpgroup) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + warpgroup) : "memory");
}

/// Pins the accumulator registers after a wgmma_wait: the empty volatile asm "writes"
/// them, so no read of them is scheduled above the wait (the wait names no registers).
__device__ __forceinline__ void wgmma_settle(float (&d)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define KVTRIM_WGMMA_D32                                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define KVTRIM_WGMMA_D32_LIST                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"

/// d (+)= A·Bᵀ for A [64 × 16] and B [64 × 16], both K-major swizzled tiles in shared
/// memory (descriptors); `Accumulate` false overwrites d (the first k-step).
template <class T, bool Accumulate>
__device__ __forceinline__ void wgmma_64x64x16_ss(float (&d)[32], std::uint64_t a, std::uint64_t b) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " KVTRIM_WGMMA_D32_LIST
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : KVTRIM_WGMMA_D32
                 : "l"(a), "l"(b), "n"(Accumulate ? 1 : 0));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " KVTRIM_WGMMA_D32_LIST
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : KVTRIM_WGMMA_D32
                 : "l"(a), "l"(b), "n"(Accumulate ? 1 : 0));
  }
}

/// d (+)= A·Bᵀ with A [64 × 16] in registers (this warp's 16 rows, mma.sync's A
/// fragment) and B [64 × 16] a K-major swizzled tile in shared memory.
template <class T, bool Accumulate>
__device__ __forceinline__ void wgmma_64x64x16_rs(float (&d)[32], const unsigned (&a)[4], std::uint64_t b) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " KVTRIM_WGMMA_D32_LIST
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : KVTRIM_WGMMA_D32
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(Accumulate ? 1 : 0));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " KVTRIM_WGMMA_D32_LIST
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : KVTRIM_WGMMA_D32
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(Accumulate ? 1 : 0));
  }
}

#undef KVTRIM_WGMMA_D32
#undef KVTRIM_WGMMA_D32_LIST

/// cp.async staging of 64-row tiles of a [rows, D] 16-bit matrix (channel stride 1,
/// rows 16-byte aligned) into the swizzled layout, by the 128 threads of a warpgroup.
/// A thread's 16-byte chunk and its rows (r0, r0 + 128/(D/8), …) are fixed, and so is
/// its swizzled chunk (the rows it owns are ≡ r0 mod 8): one base offset, then a
/// constant step per row it copies. Rows past the end are zero-filled.
template <class T, int HeadDim>
struct swizzled_loader {
  static constexpr int chunks = HeadDim / 8;
  static constexpr int rows_per_pass = 128 / chunks;
  static constexpr int passes = swizzled_rows / rows_per_pass;
  static_assert(HeadDim == 64 || HeadDim == 128, "swizzled tiles of head dims 64 and 128");
  static_assert(rows_per_pass % 8 == 0);

  const T* thread_row;  // row r0 of the matrix, this thread's chunk
  const T* matrix;      // row 0 (a valid address for zero-filled copies)
  std::int64_t row_stride;
  int r0;
  unsigned offset;  // swizzled byte offset of (r0, chunk) in a tile

  /// `thread`: this thread's index in the warpgroup that loads (0 … 127).
  __device__ __forceinline__ swizzled_loader(const T* base, std::int64_t row_stride_, int thread)
      : matrix(base), row_stride(row_stride_) {
    r0 = thread / chunks;
    const int chunk = thread % chunks;
    thread_row = base + r0 * row_stride + chunk * 8;
    offset = swizzled_offset(r0, chunk);
  }
  /// Rows [row0, row0 + 64) ∩ [0, rows) at `shift` elements from the base into the
  /// tile at shared address `tile`.
  __device__ __forceinline__ void load(unsigned tile, std::int64_t shift, std::int64_t row0, std::int64_t rows) const {
    const T* source = thread_row + shift + row0 * row_stride;
    const std::int64_t step = rows_per_pass * row_stride;
#pragma unroll
    for (int k = 0; k < passes; ++k) {
      const bool valid = row0 + r0 + k * rows_per_pass < rows;
      const unsigned target = tile + offset + static_cast<unsigned>(k * rows_per_pass * 128);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(target),
                   "l"(valid ? source + k * step : matrix), "r"(valid ? 16 : 0));
    }
  }
  /// load() for a tile whose 64 rows all exist (row0 + 64 ≤ rows): no bounds tests
  /// and no pointer selects — the per-row form spent ~200 instructions a tile on
  /// them, a fifth of pass 2's issue slots (ncu, H100, 2026-12-05).
  __device__ __forceinline__ void load_whole(unsigned tile, std::int64_t shift, std::int64_t row0) const {
    const char* source = reinterpret_cast<const char*>(thread_row + shift + row0 * row_stride);
    const std::int64_t step_bytes = rows_per_pass * row_stride * static_cast<std::int64_t>(sizeof(T));
    const unsigned target = tile + offset;
#pragma unroll
    for (int k = 0; k < passes; ++k)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(target + static_cast<unsigned>(k * rows_per_pass * 128)),
                   "l"(source + k * step_bytes));
  }
  /// Rows [row0, row0 + 64) ∩ [0, rows): load_whole where all 64 exist, else load.
  __device__ __forceinline__ void load_tile(unsigned tile, std::int64_t row0, std::int64_t rows) const {
    if (row0 + swizzled_rows <= rows)
      load_whole(tile, 0, row0);
    else
      load(tile, 0, row0, rows);
  }
};

}  // namespace kvtrim::cuda_detail

#endif  // KVTRIM_CUDA_WGMMA
