// kvtrim/backend/cuda/mma.cuh — the warp-level tensor-core instructions the
// kernels share (sm_80+): ldmatrix from shared memory into mma fragments and
// mma.sync m16n8k16 with fp32 accumulators, for fp16 and bf16.
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4·g + t:
//   A (16 × 16, row-major)  a[0]: (row g, k 2t, 2t+1)   a[1]: (row g+8, k 2t…)
//                           a[2]: (row g, k 2t+8, +9)   a[3]: (row g+8, k 2t+8…)
//   B (16 × 8, column-major) b0: (k 2t, 2t+1; column g) b1: (k 2t+8, +9; column g)
//   C (16 × 8, fp32)        c[0], c[1]: (row g, columns 2t, 2t+1); c[2], c[3]: row g+8
// load_matrix_x4 fills four 8 × 8 matrices whose rows lanes 0–7, 8–15, 16–23 and
// 24–31 point at: an A fragment when lanes address rows (lane mod 16) at k offset
// 8·(lane / 16); two B fragments (16 columns) of a [columns][k] row-major tile
// when lanes address column (lane mod 8) + 8·(lane / 16) at k offset 8·((lane / 8) mod 2).
// movmatrix (transpose_matrix) transposes an 8 × 8 tile held in C's row layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace kvtrim::cuda_detail {

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
/// The same at a shared-memory address (swizzled tiles compute their addresses in that space).
__device__ __forceinline__ void load_matrix_x4_at(unsigned (&fragment)[4], unsigned shared_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address));
}
__device__ __forceinline__ void load_matrix_x4_transposed_at(unsigned (&fragment)[4], unsigned shared_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address));
}

/// The 8 × 8 matrix of 16-bit pairs a warp holds in fragment layout (lane 4·g + t: row g, columns
/// 2t, 2t + 1), transposed in the same layout: lane 4·g + t receives elements (2t, g) and (2t + 1, g).
/// Turns an accumulator tile's rows into a B operand's columns (decode's transposed product).
__device__ __forceinline__ unsigned transpose_matrix(unsigned pair) {
  unsigned transposed;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(transposed) : "r"(pair));
  return transposed;
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

}  // namespace kvtrim::cuda_detail
