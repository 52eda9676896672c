// kvtrim/backend/cuda/adaptive.cuh — budget::adaptive (Ada-KV) on the GPU.
//
// The CPU reference (backend/cpu/adaptive.hpp) is the specification: per
// sequence, head h first keeps its guaranteed prefix g_h (protected tokens plus
// the floor; budget::adaptive::guaranteed), then the pool H·k − Σ g_h goes to
// the best remaining tokens of all heads in the order ranks_before(score,
// h·T + token). The counts come out identical without that merge:
//
//   Each head's kept set is a prefix of its rank order, so if θ is the pool's
//   last token in the cross-head order and N_h(θ) the tokens of head h ranked
//   at or before θ, head h keeps max(g_h, N_h(θ)) tokens, and
//   F(θ) = Σ_h max(g_h, N_h(θ)) rises by at most one per step of θ. So: find
//   the threshold key v* = the largest key with F(keys ≥ v*) ≥ H·k (the radix
//   search of select_top_k.cuh, with a sequence's heads as one group and g_h
//   as floors); every head keeps max(g_h, above_h) (above_h: keys > v*), and
//   the tokens AT v* — ordered by (head, token), as the CPU's flattened index
//   orders them — fill the rest head by head: head h takes what its ties add
//   over max(g_h, above_h), up to what is left.
//
// Exact totals: Σ_h counts = H·k per sequence, like the CPU. No host round trip:
// the protected counts (tokens scored +∞) come from the first histogram pass, the
// floors are computed on the device (device_guaranteed below, the same double
// arithmetic as the host's budget::adaptive::guaranteed).
//
// One difference, forced by "no device synchronisation": the paper form's error
// (a head whose protected tokens exceed the per-head budget k) is data the host
// never sees. The CPU throws; the device clamps that head's guarantee to k (it
// keeps its k best protected tokens, lower index first), so the total stays
// exactly H·k and the layout's capacity (planned from H·k) is never exceeded.
// Callers who need the error run the check where the scores are known (the
// scorer's protected window is a host-side configuration: window ≤ k).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/select_top_k.cuh"
#include "kvtrim/budget/adaptive.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

namespace cuda_detail {

/// budget::adaptive's rule for the threshold search: a group is one sequence's
/// kv heads; the target is H·k; floors are the guaranteed prefixes.
struct adaptive_rule {
  std::int64_t heads_per_group;
  std::int64_t budget;  // k, already resolved against the token count on the host
  double alpha;
  bool kvpress_compatible;
  std::int32_t* keep_counts;

  __device__ long long target(std::int64_t) const { return static_cast<long long>(heads_per_group) * budget; }

  /// budget::adaptive::guaranteed, on the device (same double arithmetic), except
  /// that protected tokens beyond k clamp to k instead of throwing (see above).
  __device__ long long floor(std::int64_t, std::int64_t, std::uint32_t protected_tokens) const {
    if (kvpress_compatible) return static_cast<long long>(::floor(alpha * static_cast<double>(budget)));
    if (protected_tokens > budget) return budget;
    const long long rest = budget - protected_tokens;
    const long long floor = static_cast<long long>(::floor(alpha * static_cast<double>(rest)));
    return protected_tokens + floor > 1 ? protected_tokens + floor : 1;  // never an empty head
  }

  __device__ void write_count(std::int64_t head, long long count) const {
    keep_counts[head] = static_cast<std::int32_t>(count);
  }
};

}  // namespace cuda_detail

template <>
struct implementation<budget::adaptive, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::budget::adaptive";

  static std::size_t workspace_bytes(const budget::adaptive::config&, const model_shape& shape, std::int64_t batch,
                                     std::int64_t /*tokens*/) {
    workspace_carver carver;
    cuda_detail::threshold_state::carve(carver, batch * shape.kv_heads, batch);
    return carver.bytes();
  }

  static void keep_counts(const budget::adaptive::config& cfg, const tensor_view<const float, 3, device_space>& scores,
                          std::int32_t* keep_counts, workspace scratch, cudaStream_t stream) {
    const std::int64_t batch = scores.extent(0), kv_heads = scores.extent(1), tokens = scores.extent(2);
    if (batch == 0 || kv_heads == 0) return;
    workspace_carver carver(scratch);
    const auto state = cuda_detail::threshold_state::carve(carver, batch * kv_heads, batch);
    const cuda_detail::adaptive_rule rule{kv_heads, budget::adaptive::head_budget(cfg, tokens), cfg.alpha,
                                          cfg.kvpress_compatible, keep_counts};
    cuda_detail::find_thresholds(cuda_detail::rows_of(scores), batch * kv_heads, kv_heads, rule, state, stream,
                                 function);
  }
};

}  // namespace kvtrim
