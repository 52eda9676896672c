// kvtrim/backend/cpu/padded_batch.hpp — a right-padded batch's rows on the CPU
// (compress_options::sequence_lengths; the math is in core/scheme.hpp's run_compress).
//
// Each sequence is scored alone over its own T_b tokens into a dense [H, T_b]
// block; place_scores sets it into the batch's [B, H, T] scores with NaN past T_b.
// NaN ranks below every score and ties keep the lower index (select_top_k), and
// every budget keeps at most T_b, so the batch's one selection never reaches a
// padded token. The CPU's compaction reads the host lengths itself: record has
// nothing to do here (backend/cuda/padded_batch.cuh fills the device's table).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"

namespace kvtrim {

template <>
struct implementation<stage::padded_batch, backend::cpu> {
  /// `sequence_scores` [kv_heads, length] into `batch_rows` [kv_heads, tokens] (sequence
  /// b's rows of the batch's scores), NaN in [length, tokens).
  static void place_scores(const float* sequence_scores, float* batch_rows, std::int64_t kv_heads,
                           std::int64_t length, std::int64_t tokens, backend::host_stream) {
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      float* row = batch_rows + h * tokens;
      std::copy_n(sequence_scores + h * length, length, row);
      std::fill(row + length, row + tokens, std::numeric_limits<float>::quiet_NaN());
    }
  }
};

}  // namespace kvtrim
