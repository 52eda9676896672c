// tests/common/structured.hpp — keys and values with the structure real heads
// have (a few dominant directions plus noise), and RoPE written independently
// of kvtrim's (in double, from RoFormer's formula) for oracles of pre-RoPE
// codecs.
#pragma once

#include <cmath>
#include <cstdint>
#include <kvtrim/kvtrim.hpp>
#include <random>

#include "common/tensors.hpp"

namespace kvtrim::testing {

/// x[b, h, t, :] = Σ_{j<rank} z_{t,j} · w_{h,j} + noise·n, with w_{h,j} a
/// random direction of norm ~√D scaled by decay^j (so the spectrum falls off)
/// and z, n ~ N(0, 1). Each kv head h has its own directions, shared by every
/// sequence b (as a model's head is); rank ≥ head_dim gives unstructured data.
inline host_tensor<float, 4> structured_tensor(const std::array<std::int64_t, 4>& extents, std::int64_t rank,
                                               double noise, std::uint64_t seed, double decay = 0.85) {
  auto tensor = make_tensor<float, 4>(extents);
  std::mt19937_64 random(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const std::int64_t heads = extents[0] * extents[1], tokens = extents[2], dim = extents[3];
  for (std::int64_t head = 0; head < heads; ++head) {
    std::mt19937_64 head_random(seed * 7919 + static_cast<std::uint64_t>(head % extents[1]));
    std::vector<double> directions(static_cast<std::size_t>(rank * dim));
    for (std::int64_t j = 0; j < rank; ++j)
      for (std::int64_t d = 0; d < dim; ++d)
        directions[static_cast<std::size_t>(j * dim + d)] =
            normal(head_random) * std::pow(decay, static_cast<double>(j));
    for (std::int64_t t = 0; t < tokens; ++t) {
      std::vector<double> row(static_cast<std::size_t>(dim));
      for (std::int64_t j = 0; j < rank; ++j) {
        const double z = normal(random);
        for (std::int64_t d = 0; d < dim; ++d)
          row[static_cast<std::size_t>(d)] += z * directions[static_cast<std::size_t>(j * dim + d)];
      }
      for (std::int64_t d = 0; d < dim; ++d)
        tensor.view(head / extents[1], head % extents[1], t, d) =
            static_cast<float>(row[static_cast<std::size_t>(d)] + noise * normal(random));
    }
  }
  return tensor;
}

/// Rotates every token t of keys [B, H, T, D] to position t + offset (RoFormer,
/// in double).
inline void apply_rope_in_double(host_tensor<float, 4>& keys, double theta, std::int64_t rotary_dim, bool interleaved,
                                 std::int64_t offset = 0) {
  const std::int64_t dim = keys.view.extent(3), rotated = rotary_dim == 0 ? dim : rotary_dim;
  for (std::int64_t b = 0; b < keys.view.extent(0); ++b)
    for (std::int64_t h = 0; h < keys.view.extent(1); ++h)
      for (std::int64_t t = 0; t < keys.view.extent(2); ++t)
        for (std::int64_t i = 0; i < rotated / 2; ++i) {
          const double angle = static_cast<double>(t + offset) * std::pow(theta, -2.0 * double(i) / double(rotated));
          const std::int64_t a = interleaved ? 2 * i : i, c = interleaved ? 2 * i + 1 : i + rotated / 2;
          const double xa = keys.view(b, h, t, a), xc = keys.view(b, h, t, c);
          keys.view(b, h, t, a) = static_cast<float>(xa * std::cos(angle) - xc * std::sin(angle));
          keys.view(b, h, t, c) = static_cast<float>(xa * std::sin(angle) + xc * std::cos(angle));
        }
}

}  // namespace kvtrim::testing
