// kvtrim/codec/rank_analysis.hpp — how low-rank is each head? Spectra of a
// head's keys or values, and the basis codec::low_rank stores.
//
// For the T × D matrix X of one head's keys (or values) with singular values
// σ_1 ≥ … ≥ σ_n (n = min(T, D)):
//   energy curve      e_r = Σ_{i≤r} σ_i² / Σ_i σ_i²       (fraction of ‖X‖_F²
//   rank r keeps) rank for energy   smallest r with e_r ≥ threshold      (Eigen
//   Attention: 0.98) effective rank    exp(−Σ p_i ln p_i), p_i = σ_i / Σ σ (Roy
//   & Vetterli, 2007) stable rank       Σ σ_i² / σ_1² (‖X‖_F² / ‖X‖_2²)
// Eckart–Young–Mirsky: the best rank-r approximation X·U_r·U_rᵀ (U_r: the first
// r right singular vectors) leaves exactly Σ_{i>r} σ_i² of squared error.
// Computed in double with Eigen's divide-and-conquer SVD. Analysis helpers
// allocate (they run offline or at prefill, never in a decode step).
#pragma once

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <numeric>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "kvtrim/core/element.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim::analysis {

// The functions that run Eigen's SVD are templates (over the matrix expression)
// so that only a translation unit that calls one compiles it: as inline
// functions they cost every TU that includes kvtrim.hpp ~20 s of g++.

/// Singular values of `rows` (one row per token), descending.
template <class Rows>
std::vector<double> singular_values(const Eigen::MatrixBase<Rows>& rows) {
  if (rows.size() == 0) return {};
  Eigen::BDCSVD<Eigen::MatrixXd> svd(rows.derived());  // derived(): no converting copy
  const Eigen::VectorXd& values = svd.singularValues();
  return std::vector<double>(values.data(), values.data() + values.size());
}

/// The T × D matrix of head (b, h) of keys or values [B, H, T, D], in double.
template <class T>
Eigen::MatrixXd head_matrix(const kv_view<T>& x, std::int64_t b, std::int64_t h) {
  Eigen::MatrixXd rows(x.extent(2), x.extent(3));
  for (std::int64_t t = 0; t < x.extent(2); ++t)
    for (std::int64_t d = 0; d < x.extent(3); ++d) rows(t, d) = static_cast<double>(to_float(x(b, h, t, d)));
  return rows;
}

/// e_r for r = 1 … n: the fraction of the energy Σσ² the first r singular
/// values hold.
inline std::vector<double> energy_curve(const std::vector<double>& singular) {
  double total = 0.0;
  for (double s : singular) total += s * s;
  std::vector<double> curve(singular.size());
  double running = 0.0;
  for (std::size_t i = 0; i < singular.size(); ++i) {
    running += singular[i] * singular[i];
    curve[i] = total > 0.0 ? running / total : 1.0;
  }
  return curve;
}

/// Smallest r with e_r ≥ threshold (0 for a matrix of zeros). threshold ∈ (0,
/// 1].
inline std::int64_t rank_for_energy(const std::vector<double>& singular, double threshold) {
  if (!(threshold > 0.0 && threshold <= 1.0))
    detail::fail("kvtrim::analysis::rank_for_energy", "threshold", "an energy fraction in (0, 1] (default 0.98)",
                 detail::cat(threshold));
  if (singular.empty() || singular.front() == 0.0) return 0;
  const std::vector<double> curve = energy_curve(singular);
  for (std::size_t r = 0; r < curve.size(); ++r)
    // The relative slack absorbs the rounding of the running sum (e_n is 1 in
    // exact arithmetic).
    if (curve[r] >= threshold * (1.0 - 1e-12)) return static_cast<std::int64_t>(r + 1);
  return static_cast<std::int64_t>(curve.size());
}

/// exp of the entropy of the normalised singular values (1 ≤ result ≤ n).
inline double effective_rank(const std::vector<double>& singular) {
  const double sum = std::accumulate(singular.begin(), singular.end(), 0.0);
  if (sum <= 0.0) return 0.0;
  double entropy = 0.0;
  for (double s : singular)
    if (s > 0.0) entropy -= (s / sum) * std::log(s / sum);
  return std::exp(entropy);
}

/// ‖X‖_F² / ‖X‖_2² (1 ≤ result ≤ n).
inline double stable_rank(const std::vector<double>& singular) {
  if (singular.empty() || singular.front() <= 0.0) return 0.0;
  double energy = 0.0;
  for (double s : singular) energy += s * s;
  return energy / (singular.front() * singular.front());
}

/// The first `rank` right singular vectors of `rows` as a D × rank matrix
/// (orthonormal columns).
template <class Rows>
Eigen::MatrixXd principal_basis(const Eigen::MatrixBase<Rows>& rows, std::int64_t rank) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(rows.derived(), Eigen::ComputeThinV);
  return svd.matrixV().leftCols(rank);
}

/// One head's spectrum and the numbers derived from it.
struct head_rank {
  std::int64_t batch = 0;
  std::int64_t kv_head = 0;
  std::vector<double> singular_values;
  std::int64_t rank_at_energy = 0;  // rank_for_energy at the analysis threshold
  double effective = 0.0;
  double stable = 0.0;
};

/// Spectra of every head of keys or values [B, H, T, D].
template <class T>
std::vector<head_rank> analyze_heads(const kv_view<T>& x, double energy = 0.98) {
  std::vector<head_rank> heads;
  for (std::int64_t b = 0; b < x.extent(0); ++b)
    for (std::int64_t h = 0; h < x.extent(1); ++h) {
      head_rank result;
      result.batch = b;
      result.kv_head = h;
      result.singular_values = singular_values(head_matrix(x, b, h));
      result.rank_at_energy = rank_for_energy(result.singular_values, energy);
      result.effective = effective_rank(result.singular_values);
      result.stable = stable_rank(result.singular_values);
      heads.push_back(std::move(result));
    }
  return heads;
}

/// A text table of analyze_heads' result, one row per head.
inline std::string rank_table(const std::vector<head_rank>& heads, double energy = 0.98) {
  std::ostringstream out;
  out << std::setw(5) << "batch" << std::setw(8) << "kv_head" << std::setw(10) << "dims" << std::setw(12)
      << ("r@" + std::to_string(static_cast<int>(std::lround(energy * 100))) + "%") << std::setw(11) << "eff.rank"
      << std::setw(13) << "stable rank"
      << "\n";
  out << std::fixed << std::setprecision(2);
  for (const auto& head : heads)
    out << std::setw(5) << head.batch << std::setw(8) << head.kv_head << std::setw(10) << head.singular_values.size()
        << std::setw(12) << head.rank_at_energy << std::setw(11) << head.effective << std::setw(13) << head.stable
        << "\n";
  return out.str();
}

}  // namespace kvtrim::analysis
