// kvtrim/backend/cuda/snapkv.cuh — score::snapkv on the GPU (see score/snapkv.hpp
// for the paper, math and defaults; backend/cpu/snapkv.hpp for the reference).
//
// The last `window` queries' softmax over all keys up to each query (fp32, the
// window's own keys included), summed per query head over the window, divided by
// the window (mean), pooled over `kernel` neighbouring prefix tokens, reduced over
// the GQA group, and +∞ for the window itself: cuda_detail::attention_mass_scores
// (backend/cuda/attention_mass.cuh) with SnapKV's finish. q·k runs on tensor
// cores when keys and queries are both fp16 or both bf16; each K tile is read
// once for the whole GQA group per pass.
// Given normalisers (config.lse): pass 1 is skipped (attention_mass.cuh).
// Scratch: the attention mass workspace for `window` queries per query head.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/backend/cuda/attention_mass.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/score/snapkv.hpp"

namespace kvtrim {

template <>
struct implementation<score::snapkv, backend::cuda> {
  static std::size_t workspace_bytes(const score::snapkv::config& cfg, const model_shape& shape, std::int64_t batch,
                                     std::int64_t tokens) {
    const std::int64_t window = std::max<std::int64_t>(1, std::min(cfg.window, tokens));
    return cuda_detail::attention_mass_workspace_bytes(shape, batch, tokens, window, std::max<std::int64_t>(tokens - window, 0));
  }

  /// Enough for every sequence of a padded batch alone, (1, t ≤ tokens) (scheme's carve).
  static std::size_t sequence_workspace_bytes(const score::snapkv::config& cfg, const model_shape& shape,
                                              std::int64_t tokens) {
    return cuda_detail::largest_sequence_workspace(tokens, [&](std::int64_t t) { return workspace_bytes(cfg, shape, 1, t); });
  }

  template <class KeyT, class QueryT>
  static void score(const score::snapkv::config& cfg, const model_shape& shape,
                    const kv_view<KeyT, device_space>& keys, const kv_view<KeyT, device_space>&,
                    const window_view<QueryT, device_space>& queries, const score_view<device_space>& scores,
                    workspace scratch, cudaStream_t stream) {
    constexpr std::string_view function = "kvtrim::score::snapkv";
    const std::int64_t tokens = keys.extent(2);
    score::snapkv::check(function, cfg, tokens, queries.extent(2));
    detail::check_given_lse(function, cfg.lse, cfg.lse_extents, cfg.lse_strides, scores.extent(0), shape.q_heads,
                            queries.extent(2));
    const std::int64_t prefix = tokens - cfg.window;
    cuda_detail::mass_finish_parameters finish{};
    finish.kind = cuda_detail::mass_finish_kind::snapkv;
    finish.window_divisor = cfg.reduction == score::window_reduction::mean ? static_cast<float>(cfg.window) : 1.0f;
    finish.kernel = cfg.kernel;
    finish.pooling = cfg.pooling;
    finish.observed_normalisation = false;
    finish.reduction = cfg.group;
    finish.protected_from = prefix;  // the window is always kept
    cuda_detail::attention_mass_scores(function, keys, queries, shape, scores, queries.extent(2) - cfg.window, prefix,
                                       finish, scratch, stream,
                                       tensor_view<const float, 3, device_space>{cfg.lse, cfg.lse_extents,
                                                                                 cfg.lse_strides});
  }
};

}  // namespace kvtrim
