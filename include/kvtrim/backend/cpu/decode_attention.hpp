// kvtrim/backend/cpu/decode_attention.hpp — CPU reference of decode attention
// over any layout and codec.
//
// For query head j of sequence b, with kv head h = j / group_size and the n
// tokens the cache holds for (b, h):
//   s_i   = (q · k_i) / √D  + bias_i     (bias_i: the layout's logit bias, e.g.
//                                         RazorAttention's ln(N_dropped), added
//                                         after the scale so it counts tokens exactly:
//                                         exp(q·k̂/√D + ln N) = N·exp(q·k̂/√D), N copies
//                                         of the mean token; before the scale it would
//                                         weigh only N^{1/√D} copies)
//   p_i   = exp(s_i − max s) / Σ exp(s − max s)
//   out   = Σ p_i v_i
// in fp32, two passes over the cache (the textbook form; the only scratch is a
// few head_dim rows). The cache is read through the codec's attention reader
// (codec/hooks.hpp): by default it loads rows (key i at its position, from the
// layout); a codec may compute q·k and Σ p·v its own way (low rank: (q·U)·c
// and (Σ p·c)·Uᵀ, no full keys rebuilt).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

template <>
struct implementation<stage::decode_attention, backend::cpu> {
  template <class View>
  static std::size_t workspace_bytes(const View&) {
    return 0;  // rows live on the stack (head_dim ≤ max_head_dim)
  }

  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 3>& queries, const View& cache, const tensor_view<OutT, 3>& out,
                     workspace, backend::host_stream) {
    using codec_type = typename View::codec;
    const std::int64_t head_dim = cache.shape.head_dim;
    const std::int64_t group = cache.shape.group_size();
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    std::array<float, max_head_dim> query{}, accumulator{};

    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t j = 0; j < cache.shape.q_heads; ++j) {
        const std::int64_t h = j / group;
        const std::int64_t head = b * cache.shape.kv_heads + h;
        const std::int64_t length = cache.head_length(b, h);
        if (length < 1)
          detail::fail("kvtrim::scheme::attend", "cache", detail::cat("at least one token in every head"),
                       detail::cat("an empty head (sequence ", b, ", kv head ", h, ")"));
        for (std::int64_t d = 0; d < head_dim; ++d) query[d] = to_float(queries(b, j, d));
        auto reader = codec::attention_reader<codec_type>(cache.storage, head, query.data(), head_dim);

        const auto logit = [&](std::int64_t i) {
          float value = reader.dot(cache.slot(b, h, i), codec::position_of(cache, b, h, i)) * scale;
          if constexpr (requires { cache.logit_bias(b, h, i); }) value += cache.logit_bias(b, h, i);
          return value;
        };

        float max_logit = -std::numeric_limits<float>::infinity();
        for (std::int64_t i = 0; i < length; ++i) max_logit = std::fmax(max_logit, logit(i));

        float denominator = 0.0f;
        for (std::int64_t i = 0; i < length; ++i) {
          const float weight = std::exp(logit(i) - max_logit);
          denominator += weight;
          reader.accumulate(cache.slot(b, h, i), weight);
        }
        reader.finish(accumulator.data());
        for (std::int64_t d = 0; d < head_dim; ++d) out(b, j, d) = from_float<OutT>(accumulator[d] / denominator);
      }
  }
};

}  // namespace kvtrim
