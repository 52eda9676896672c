// kvtrim/core/rope.hpp — the engine's rotary position embedding (RoPE)
// settings.
//
// Codecs that store pre-RoPE keys (codec::low_rank with key_space::pre_rope, as
// Palu, ShadowKV and xKV do) rotate each key by its position after
// reconstruction, inside attention. RoFormer (Su et al., 2021):
//   inv_freq_i = theta^(−2i / rotary_dim),  angle = position · inv_freq_i,
//   (x_a, x_b) ↦ (x_a cos − x_b sin,  x_a sin + x_b cos)
// for the pairs (a, b) = (i, i + rotary_dim/2) in the half-split form (Hugging
// Face Llama/NeoX "rotate_half") or (2i, 2i + 1) in the interleaved form
// (GPT-J, Meta's original Llama). Channels from rotary_dim on are left as they
// are (partial rotary, e.g. GPT-NeoX, Phi). Defaults: theta 10000, rotary_dim 0
// (= head_dim), half-split.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"

namespace kvtrim {

struct rope {
  enum class pairing { half_split, interleaved };

  double theta = 10000.0;
  std::int64_t rotary_dim = 0;  // 0: all of head_dim
  pairing pairs = pairing::half_split;

  std::int64_t rotated(std::int64_t head_dim) const { return rotary_dim == 0 ? head_dim : rotary_dim; }

  void validate(std::string_view function, std::int64_t head_dim) const {
    if (!(theta > 1.0) || !std::isfinite(theta))
      detail::fail(function, "config.rope.theta", "a finite base above 1 (10000 for Llama 2)", detail::cat(theta));
    const std::int64_t dim = rotated(head_dim);
    if (dim < 2 || dim > head_dim || dim % 2 != 0)
      detail::fail(function, "config.rope.rotary_dim",
                   detail::cat("0 (all channels) or an even count in [2, head_dim = ", head_dim, "]"),
                   std::to_string(rotary_dim));
  }

  /// inv_freq_i = theta^(−2i / dim) for i < dim / 2, computed once per (theta,
  /// dim) and thread (the last one used is kept): apply() no longer calls pow per
  /// pair per token, with the same bits.
  const double* inverse_frequencies(std::int64_t dim) const {
    struct table {
      double theta = 0.0;
      std::int64_t dim = 0;
      std::array<double, max_head_dim / 2> inv_freq{};
    };
    thread_local table cached;
    if (cached.theta != theta || cached.dim != dim) {
      for (std::int64_t i = 0; i < dim / 2; ++i)
        cached.inv_freq[static_cast<std::size_t>(i)] =
            std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
      cached.theta = theta;
      cached.dim = dim;
    }
    return cached.inv_freq.data();
  }

  /// Rotates x (head_dim floats) in place to `position`; `sign` −1 undoes it.
  void apply(float* x, std::int64_t head_dim, std::int64_t position, int sign = 1) const {
    const std::int64_t dim = rotated(head_dim);
    const std::int64_t pair_count = dim / 2;
    const double* inv_freq = inverse_frequencies(dim);
    for (std::int64_t i = 0; i < pair_count; ++i) {
      // double: positions reach 10^6 and a float angle would lose its fraction.
      const double angle = static_cast<double>(sign) * static_cast<double>(position) * inv_freq[i];
      const double cosine = std::cos(angle), sine = std::sin(angle);
      const std::int64_t a = pairs == pairing::half_split ? i : 2 * i;
      const std::int64_t b = pairs == pairing::half_split ? i + pair_count : 2 * i + 1;
      const double xa = x[a], xb = x[b];
      x[a] = static_cast<float>(xa * cosine - xb * sine);
      x[b] = static_cast<float>(xa * sine + xb * cosine);
    }
  }
};

}  // namespace kvtrim
