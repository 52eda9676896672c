// kvtrim/backend/cuda/padded_batch.cuh — a right-padded batch's rows on the GPU
// (compress_options::sequence_lengths; the math is in core/scheme.hpp's run_compress,
// the CPU's form in backend/cpu/padded_batch.hpp).
//
// The lengths are host memory on both backends: the host slices each sequence's
// views and launches the scorer and the budget on them, so the device never needs
// them to find its work. What device kernels after the loop need — the finiteness
// scan's per-sequence bound T_b, compaction's next positions start + T_b, and the
// per-head budget k of T_b that a device refusal reports — record() writes into the
// compress workspace's detail::sequence_table, one tiny launch per sequence with the
// values as kernel parameters. Nothing is copied from host memory, so a compress with
// lengths is captured into a CUDA graph like any other (the lengths are then fixed at
// capture, as every host value of the call is).
//
// Budget::adaptive's paper form finds its refusal on the device and resets its word
// at every keep_counts: record() folds each sequence's word into the batch's, keeping
// the first refusing sequence (the CPU stops at it) with its head flattened over the batch.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"

namespace kvtrim {

namespace cuda_detail {

/// batch_rows[h · tokens + t] = t < length ? sequence_scores[h · length + t] : NaN.
template <int Unused>
__global__ void place_sequence_scores(const float* sequence_scores, float* batch_rows, std::int64_t kv_heads,
                                      std::int64_t length, std::int64_t tokens) {
  const std::int64_t total = kv_heads * tokens;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t h = i / tokens, t = i % tokens;
    batch_rows[i] = t < length ? sequence_scores[h * length + t] : __int_as_float(0x7fc00000);
  }
}

/// Sequence b's entries of the table, and the fold of its budget's refusal word.
template <int Unused>
__global__ void record_padded_sequence(detail::sequence_table table, std::int64_t b, std::int64_t length,
                                       std::int64_t next_position, std::int64_t head_budget,
                                       const unsigned long long* sequence_refusal, unsigned long long* batch_refusal,
                                       std::int64_t kv_heads) {
  table.length[b] = length;
  table.next_position[b] = next_position;
  table.head_budget[b] = head_budget;
  if (batch_refusal == nullptr) return;
  if (b == 0) *batch_refusal = ~0ull;  // sequence 0 runs first: the batch's word starts clear
  const unsigned long long word = *sequence_refusal;
  if (*batch_refusal == ~0ull && word != ~0ull)
    *batch_refusal = static_cast<unsigned long long>(b * kv_heads + static_cast<std::int64_t>(word >> 32)) << 32 |
                     (word & 0xffffffffull);
}

}  // namespace cuda_detail

template <>
struct implementation<stage::padded_batch, backend::cuda> {
  /// `sequence_scores` [kv_heads, length] into `batch_rows` [kv_heads, tokens] (sequence
  /// b's rows of the batch's scores), NaN in [length, tokens).
  static void place_scores(const float* sequence_scores, float* batch_rows, std::int64_t kv_heads,
                           std::int64_t length, std::int64_t tokens, cudaStream_t stream) {
    const std::int64_t total = kv_heads * tokens;
    if (total == 0) return;
    const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>(cuda_detail::ceil_div(total, 256), 1, 4096));
    cuda_detail::place_sequence_scores<0><<<blocks, 256, 0, stream>>>(sequence_scores, batch_rows, kv_heads, length,
                                                                      tokens);
    detail::check_launch("kvtrim::scheme::compress", "place_sequence_scores");
  }

  /// Sequence b's T_b, next position and per-head budget into `table` (device memory);
  /// with `batch_refusal`, the fold of its budget's `sequence_refusal` word (see above).
  static void record(const detail::sequence_table& table, std::int64_t b, std::int64_t length,
                     std::int64_t next_position, std::int64_t head_budget, const unsigned long long* sequence_refusal,
                     unsigned long long* batch_refusal, std::int64_t kv_heads, cudaStream_t stream) {
    cuda_detail::record_padded_sequence<0><<<1, 1, 0, stream>>>(table, b, length, next_position, head_budget,
                                                                 sequence_refusal, batch_refusal, kv_heads);
    detail::check_launch("kvtrim::scheme::compress", "record_padded_sequence");
  }
};

}  // namespace kvtrim
