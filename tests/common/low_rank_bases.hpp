// tests/common/low_rank_bases.hpp — calibrated (profile) bases for codec::low_rank caches in tests:
// random orthonormal bases (the Q of a Householder QR of a Gaussian matrix) of ragged ranks per head —
// the stored rank, one less, two less — so that heads whose rank is below the storage's are covered.
// tests/cuda/codecs_test.cu and tests/cuda/eviction_test.cu install them with the CPU's set_basis before
// the block is copied, so both backends hold the same bases.
#pragma once

#include <kvtrim/codec/low_rank.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace kvtrim::testing {

/// Installs a key and a value basis in each of `heads` heads of `storage` (head_dim rows each).
template <class Storage>
void install_random_bases(const Storage& storage, std::int64_t heads, std::int64_t head_dim, std::uint64_t seed = 71) {
  const std::int64_t stored = storage.stored_rank;
  std::mt19937_64 random(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto basis = [&](std::int64_t rank) {
    Eigen::MatrixXd gaussian(head_dim, rank);
    for (Eigen::Index i = 0; i < gaussian.size(); ++i) gaussian.data()[i] = normal(random);
    const Eigen::MatrixXd q =
        Eigen::HouseholderQR<Eigen::MatrixXd>(gaussian).householderQ() * Eigen::MatrixXd::Identity(head_dim, rank);
    std::vector<float> rows(static_cast<std::size_t>(head_dim * rank));
    for (std::int64_t d = 0; d < head_dim; ++d)
      for (std::int64_t j = 0; j < rank; ++j) rows[static_cast<std::size_t>(d * rank + j)] = static_cast<float>(q(d, j));
    return rows;
  };
  for (std::int64_t head = 0; head < heads; ++head) {
    const std::int64_t key_rank = std::max<std::int64_t>(1, stored - head % 3);
    const std::int64_t value_rank = std::max<std::int64_t>(1, stored - (head + 1) % 3);
    const std::vector<float> keys = basis(key_rank), values = basis(value_rank);
    kvtrim::codec::low_rank::set_basis(storage, head, keys.data(), key_rank, values.data(), value_rank);
  }
}

}  // namespace kvtrim::testing
