// bench/cuda_low_rank_bases.cuh — profile bases for codec::low_rank benchmark caches: one random
// orthonormal basis (Householder QR of a Gaussian matrix, seed 7) installed on every head, for keys and
// values, as an engine installs calibrated bases before its compactions. Include after <kvtrim/cuda.cuh>.
#pragma once

#include <Eigen/Dense>

#include <cstdint>
#include <random>
#include <vector>

namespace kvtrim_bench {

inline void install_random_low_rank_bases(const kvtrim::codec::low_rank::storage<kvtrim::device_space>& store,
                                          std::int64_t heads, std::int64_t head_dim, std::int64_t rank) {
  std::mt19937_64 random(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  Eigen::MatrixXd gaussian(head_dim, rank);
  for (Eigen::Index i = 0; i < gaussian.size(); ++i) gaussian.data()[i] = normal(random);
  const Eigen::MatrixXd q =
      Eigen::HouseholderQR<Eigen::MatrixXd>(gaussian).householderQ() * Eigen::MatrixXd::Identity(head_dim, rank);
  std::vector<float> basis(static_cast<std::size_t>(head_dim * rank));
  for (std::int64_t d = 0; d < head_dim; ++d)
    for (std::int64_t j = 0; j < rank; ++j) basis[static_cast<std::size_t>(d * rank + j)] = static_cast<float>(q(d, j));
  for (std::int64_t head = 0; head < heads; ++head)
    kvtrim::cuda_detail::set_low_rank_basis(store, head, basis.data(), rank, basis.data(), rank, nullptr);
}

}  // namespace kvtrim_bench
