// kvtrim/backend/cpu/attention_mass.hpp — CPU reference of the attention mass
// shared by score::snapkv and score::h2o (see score/attention_mass.hpp).
//
// Math (the scalar reference it replaced, kept in tests/cpu/cpu_speed_test.cpp,
// which checks these bits against it): for observed query t of query head g at
// position p = T − n_q + t,
//   l_j = (q_t · k_j) · (1/√D)   in fp32, the dot summed over d = 0, 1, …, D−1 in order,
//   m   = max_j≤p l_j,  e_j = exp(l_j − m),  Z = Σ_{j≤p} e_j left to right,
//   accumulator_g[j] += e_j / Z   (t in order; torch's fp32 softmax).
// exp is the backend's own (detail/exp.hpp: ≤ 1.013 ulp, the same bits scalar or
// eight lanes at a time); until issue 13's last step it was std::exp (≤ 0.51 ulp in
// glibc), a scalar call that took half of SnapKV's time. The scores moved by at
// most a few ulps; cpu_speed_test bounds the difference and checks that the kept
// sets did not change (docs/results.md, "CPU backend").
//
// How it runs: per (sequence, kv head) unit — units on OpenMP threads
// (backend/cpu.hpp) — the unit's keys are converted to fp32 once (K read once
// for the whole GQA group), and the group's observed queries, stacked g-major
// (rows (g, t)), are multiplied by Kᵀ a block of `row_block` rows at a time:
// logits[rows, keys ≤ the block's last position]. Each logit must be the
// reference's sum over d in order from zero, one rounded product and one
// rounded sum per step. Two ways compute exactly that:
//   - x86 CPUs with AVX2 (detail/x86.hpp's attention_logits, chosen at run
//     time): eight rows per vector, the block transposed to [d][row], compiled
//     without FMA so nothing fuses — the reference's bits.
//   - elsewhere, Eigen's matrix products, whose micro-kernel sums each dot over
//     d in order from zero when rows and columns fill its panels: rows padded
//     to a multiple of 48, products a multiple of 32 columns wide, depth ≤ 512;
//     remainders use the scalar loop (see attention_mass_column_block).
// tests/cpu/cpu_speed_test.cpp checks the bits against the scalar reference
// (on this machine's path). The softmax per row then runs on the stored logits
// with each exp computed once (the scalar reference computed it twice, with the
// same result).
//
// Given normalisers (score/attention_mass.hpp): for a row whose L is given,
//   accumulator_g[j] += exp(fl(l_j · (1/√D)) − L)
// with the same exp and nothing else (no max, no Z, no division); a non-finite L
// adds nothing (the rule both backends follow).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/exp.hpp"
#include "kvtrim/backend/cpu/detail/x86.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/score/attention_mass.hpp"

namespace kvtrim::detail {

/// Query rows multiplied by Kᵀ per product. Rows are padded to a multiple of 48
/// (three packets of 16, 8 or 4 floats: Eigen's widest row panel on AVX-512, AVX
/// and SSE), so every row goes through the micro-kernel's full panel.
inline constexpr std::int64_t attention_mass_row_block = 96;
inline constexpr std::int64_t attention_mass_row_pad = 48;

/// Key columns per product: Eigen packs [head_dim, columns] of Kᵀ, kept ≤ 96 KiB
/// so its packing buffer stays on the stack (no allocation in a hot call). Products
/// are a multiple of 32 columns wide (narrower remainders take Eigen paths that sum
/// in another order; the last < 32 columns of a block use the scalar loop), and
/// only for head_dim ≤ 512 (deeper products are split along d by Eigen's blocking:
/// head dims above 512, which no current model has, use the scalar loop).
inline constexpr std::int64_t attention_mass_column_pad = 32;
inline constexpr std::int64_t attention_mass_max_gemm_depth = 512;
inline std::int64_t attention_mass_column_block(std::int64_t head_dim) {
  return std::max<std::int64_t>(attention_mass_column_pad, 24576 / std::max<std::int64_t>(head_dim, 1) /
                                                               attention_mass_column_pad * attention_mass_column_pad);
}

/// Scratch floats one thread needs: the unit's fp32 keys [T, D], a block of
/// queries [row_block, D], a block of logits [row_block, T], the accumulator [T]
/// and a spare row [T] the scorer may use (SnapKV's pooled row), each rounded to
/// 64 floats (256-byte alignment).
inline std::int64_t attention_mass_round(std::int64_t n) { return (n + 63) / 64 * 64; }
inline std::int64_t attention_mass_thread_floats(std::int64_t tokens, std::int64_t head_dim) {
  return attention_mass_round(tokens * head_dim) + attention_mass_round(attention_mass_row_block * head_dim) +
         attention_mass_round(attention_mass_row_block * tokens) + 2 * attention_mass_round(tokens);
}

/// Workspace bytes for the attention mass of `batch` sequences: one thread's
/// floats for each thread that can run (at most one per unit).
inline std::size_t attention_mass_workspace_bytes(const model_shape& shape, std::int64_t batch,
                                                  std::int64_t tokens) {
  const std::int64_t threads = std::min(cpu_threads(), std::max<std::int64_t>(batch * shape.kv_heads, 1));
  return static_cast<std::size_t>(threads * attention_mass_thread_floats(tokens, shape.head_dim)) * sizeof(float);
}

/// One softmax row: `logits[0..count)` hold q·k (unscaled); adds softmax(l·scale)
/// to accumulator[0..count) in the reference's arithmetic (see the header comment).
inline void accumulate_softmax_row(float* logits, std::int64_t count, float scale, float* accumulator) {
  for (std::int64_t j = 0; j < count; ++j) logits[j] *= scale;
  // max is exact whatever the order: eight lanes, then fold (vectorises). A NaN
  // logit is skipped, as std::fmax skips it (x > lane is false for NaN); a
  // comparison, unlike fmax, compiles to maxps in a portable build.
  float lanes[8];
  for (float& lane : lanes) lane = -std::numeric_limits<float>::infinity();
  std::int64_t j = 0;
  for (; j + 8 <= count; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = logits[j + l] > lanes[l] ? logits[j + l] : lanes[l];
  float max_logit = -std::numeric_limits<float>::infinity();
  for (float lane : lanes) max_logit = lane > max_logit ? lane : max_logit;
  for (; j < count; ++j) max_logit = logits[j] > max_logit ? logits[j] : max_logit;
  cpu_exp_shifted(logits, count, max_logit);  // detail/exp.hpp: eight lanes where AVX2+FMA, the same bits
  float denominator = 0.0f;                    // left to right, as the reference
  for (j = 0; j < count; ++j) denominator += logits[j];
  for (j = 0; j < count; ++j) accumulator[j] += logits[j] / denominator;
}

/// One row with its normaliser given (natural log, the scaled logits' LSE): adds
/// exp(l·scale − lse) to accumulator[0..count); nothing when lse is not finite
/// (score/attention_mass.hpp: such a row contributes nothing, on every backend).
inline void accumulate_given_row(float* logits, std::int64_t count, float scale, float lse, float* accumulator) {
  if (!std::isfinite(lse)) return;
  for (std::int64_t j = 0; j < count; ++j) logits[j] *= scale;
  cpu_exp_shifted(logits, count, lse);
  for (std::int64_t j = 0; j < count; ++j) accumulator[j] += logits[j];
}

/// The loop SnapKV and H2O share. For every (sequence b, kv head h): for each query
/// head of h's group, accumulate its attention over observed queries [first, n_q)
/// (causal: query t sees keys j ≤ T − n_q + t), let
/// `query_head_row(accumulator, spare)` turn that into the query head's scores over
/// tokens [0, length) (returning a pointer to them; `spare` is a free row of T floats
/// of the same thread), and reduce the group into scores(b, h, 0 .. length): mean =
/// sum then one division, or max. `given` ([B, Hq, n_q], checked by the caller):
/// the rows' normalisers when its data is set, else computed. Scratch:
/// attention_mass_workspace_bytes.
template <class KeyT, class QueryT, class QueryHeadRow>
void reduce_attention_mass(const kv_view<const KeyT>& keys, const window_view<const QueryT>& queries,
                           const model_shape& shape, const score_view<>& scores, score::group_reduction reduction,
                           std::int64_t first, std::int64_t length, workspace scratch, QueryHeadRow&& query_head_row,
                           const tensor_view<const float, 3>& given = {}) {
  using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const std::int64_t tokens = keys.extent(2);
  const std::int64_t head_dim = keys.extent(3);
  const std::int64_t observed = queries.extent(2);
  const std::int64_t group = shape.group_size();
  const std::int64_t per_query_head = observed - first;
  const std::int64_t rows = group * per_query_head;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const std::int64_t thread_floats = attention_mass_thread_floats(tokens, head_dim);
  const std::int64_t units = scores.extent(0) * shape.kv_heads;
  const std::int64_t threads = cpu_threads_for(units, static_cast<std::size_t>(thread_floats) * sizeof(float),
                                               scratch.bytes);

  const std::int64_t column_block = attention_mass_column_block(head_dim);
#if KVTRIM_X86_DISPATCH
  const bool vectorised_logits = x86::has_avx2_fma_f16c();  // x86.hpp's attention_logits: the same bits
#endif

  cpu_parallel_for(units, threads, [&](std::int64_t unit, std::int64_t thread) {
    const std::int64_t b = unit / shape.kv_heads;
    const std::int64_t h = unit % shape.kv_heads;
    float* key_rows = static_cast<float*>(scratch.data) + thread * thread_floats;
    float* query_rows = key_rows + attention_mass_round(tokens * head_dim);
    float* logits = query_rows + attention_mass_round(attention_mass_row_block * head_dim);
    float* accumulator = logits + attention_mass_round(attention_mass_row_block * tokens);
    float* spare = accumulator + attention_mass_round(tokens);

    for (std::int64_t j = 0; j < tokens; ++j) {  // K read once for the whole group
#if KVTRIM_X86_DISPATCH
      if constexpr (std::is_same_v<std::remove_const_t<KeyT>, half>)  // F16C where the CPU has it: the same bits
        if (keys.stride(3) == 1 && x86::has_avx2_fma_f16c()) {
          x86::convert_row<x86::row_format::fp16>(&keys(b, h, j, 0), key_rows + j * head_dim, head_dim);
          continue;
        }
#endif
      for (std::int64_t d = 0; d < head_dim; ++d) key_rows[j * head_dim + d] = to_float(keys(b, h, j, d));
    }
    const Eigen::Map<const row_matrix> key_matrix(key_rows, tokens, head_dim);

    float* row = &scores(b, h, 0);
    const auto finish_query_head = [&](std::int64_t g) {
      const float* head_row = query_head_row(accumulator, spare);
      for (std::int64_t j = 0; j < length; ++j) {
        if (g == 0)
          row[j] = head_row[j];
        else if (reduction == score::group_reduction::mean)
          row[j] += head_row[j];
        else
          row[j] = std::fmax(row[j], head_row[j]);
      }
    };

    // logits[r, j] for r < count, j < columns from query_rows (row-major, `padded`
    // rows) by Eigen's products, and the scalar loop where Eigen would sum in
    // another order.
    const auto eigen_logits = [&](std::int64_t count, std::int64_t padded, std::int64_t columns) {
      const Eigen::Map<const row_matrix> query_matrix(query_rows, padded, head_dim);
      const auto scalar_columns = [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t r = 0; r < count; ++r)
          for (std::int64_t j = begin; j < end; ++j) {
            float dot = 0.0f;
            for (std::int64_t d = 0; d < head_dim; ++d) dot += query_rows[r * head_dim + d] * key_rows[j * head_dim + d];
            logits[r * tokens + j] = dot;
          }
      };
      for (std::int64_t c0 = 0; c0 < columns; c0 += column_block) {
        const std::int64_t width = std::min(column_block, columns - c0);
        const std::int64_t gemm_width =
            head_dim <= attention_mass_max_gemm_depth ? width / attention_mass_column_pad * attention_mass_column_pad : 0;
        if (gemm_width > 0) {
          Eigen::Map<row_matrix, 0, Eigen::OuterStride<>> logit_block(logits + c0, padded, gemm_width,
                                                                      Eigen::OuterStride<>(tokens));
          logit_block.noalias() = query_matrix * key_matrix.middleRows(c0, gemm_width).transpose();
        }
        scalar_columns(c0 + gemm_width, c0 + width);
      }
    };

    std::int64_t current_g = -1;
    for (std::int64_t r0 = 0; r0 < rows; r0 += attention_mass_row_block) {
      const std::int64_t count = std::min(attention_mass_row_block, rows - r0);
      const std::int64_t padded = (count + attention_mass_row_pad - 1) / attention_mass_row_pad * attention_mass_row_pad;
      std::int64_t columns = 0;  // the block's last position bounds the keys it reads (causal)
      for (std::int64_t r = r0; r < r0 + count; ++r)
        columns = std::max(columns, tokens - observed + first + r % per_query_head + 1);
#if KVTRIM_X86_DISPATCH
      if (vectorised_logits) {  // the block transposed, [d][row]; logits in AVX2 lanes of 8 rows
        for (std::int64_t r = 0; r < attention_mass_row_block; ++r) {
          const bool used = r < count;
          const std::int64_t g = (r0 + r) / per_query_head, t = first + (r0 + r) % per_query_head;
          for (std::int64_t d = 0; d < head_dim; ++d)
            query_rows[d * attention_mass_row_block + r] = used ? to_float(queries(b, h * group + g, t, d)) : 0.0f;
        }
        x86::attention_logits(query_rows, attention_mass_row_block, count, key_rows, columns, head_dim, logits,
                              tokens);
      } else
#endif
      {
        std::fill(query_rows, query_rows + padded * head_dim, 0.0f);
        for (std::int64_t r = 0; r < count; ++r) {
          const std::int64_t g = (r0 + r) / per_query_head, t = first + (r0 + r) % per_query_head;
          for (std::int64_t d = 0; d < head_dim; ++d)
            query_rows[r * head_dim + d] = to_float(queries(b, h * group + g, t, d));
        }
        eigen_logits(count, padded, columns);
      }
      for (std::int64_t r = 0; r < count; ++r) {
        const std::int64_t g = (r0 + r) / per_query_head, t = first + (r0 + r) % per_query_head;
        if (g != current_g) {
          if (current_g >= 0) finish_query_head(current_g);
          current_g = g;
          std::fill(accumulator, accumulator + tokens, 0.0f);
        }
        if (given.data != nullptr)
          accumulate_given_row(logits + r * tokens, tokens - observed + t + 1, scale, given(b, h * group + g, t),
                               accumulator);
        else
          accumulate_softmax_row(logits + r * tokens, tokens - observed + t + 1, scale, accumulator);
      }
    }
    if (current_g >= 0) finish_query_head(current_g);
    if (reduction == score::group_reduction::mean)
      for (std::int64_t j = 0; j < length; ++j) row[j] /= static_cast<float>(group);
  });
}

}  // namespace kvtrim::detail
