// tests/common/low_rank_sequence.hpp — codec::low_rank with basis_source::sequence in tests: rows whose
// low-rank structure makes every fit and every refresh well-posed, and the bound on how far two correct fits
// of the same rows (the CPU's Eigen SVD and the device's Gram eigen-solvers) may differ.
//
// Why structured rows. Two implementations of a basis fit agree only up to rounding, and rounding moves a
// fitted subspace by ≈ (rounding of the inputs) / (the spectral gap at the cut). iid Gaussian rows have a
// flat spectrum: neighbouring singular values differ by little, the energy threshold 0.98 falls between
// nearly equal ones, and two correct fits may pick other ranks and other subspaces. The rows here have,
// per head and per keys / values:
//   * m "old" directions u_j (random orthonormal, per head and kind) with energy fractions f_j (every one
//     ≥ 10 %, see old_fractions), the rest noise of 10⁻³ per element (the rows' elements are ~1): the
//     cumulative energy at rank m − 1 is 1 − f_min ≤ 0.90 and at m it is 1 − ~10⁻⁶, so energy 0.98 picks
//     rank m, with margins ≥ 0.08 below and ≈ 0.02 above, far beyond any rounding (~10⁻¹²);
//   * compaction rows whose coefficients on the u_j are orthogonal columns (√T·Q, QᵀQ = I) — the
//     singular values are exactly √T·√(D·f_j), whatever the random draw — or, for heads keeping
//     T < m rows, row i = √D·u_i (the fit takes all T rows' directions: the "meaningful" cap);
//   * appended rows (the t-th token appended to the head since compaction) in aligned blocks of n =
//     update_freq (16 unless the case sets another), whose coefficients are again orthogonal within the
//     block (√n·Q), so that a refresh's pending rows have exactly designed singular values. Some heads' appended rows carry k = 1 or 2 NEW
//     directions w_k (energy 30 %, or 30 % and 15 %; the old part the rest): a refresh of energy 0.98
//     adds exactly those (after the first: ≤ 0.85 captured, after all: 1 − ~10⁻⁶); others carry none
//     (the refresh adds nothing: 1 − ~10⁻⁶ captured ≥ 0.98). A head that kept one row (rank 1, its
//     row along u_0) adds every other direction at its first refresh, the smallest ≥ 5.5 % of the rows'
//     energy (the margin before the last column added: ≥ 0.035).
//     A refresh period n shorter than the m + k directions (update_freq 1, 3) cannot hold orthogonal
//     columns: appended row t is then one direction, √D·(m + k directions)[t mod (m + k)] plus noise. A
//     block's residual is its rows along directions the basis lacks (each √D·√(times it occurs), the
//     rest noise: a gap of ~10³ at the cut), and the captured energy before each addition is a multiple
//     of 1/n (0, 1/3, 2/3) up to 10⁻⁶, and ≥ 1 − 10⁻⁵ after the last: margins ≥ 0.3 and ≈ 0.02.
//   * with a fixed rank r (config.rank), m = r directions of equal energy and no new ones: heads keeping
//     ≥ r rows hold exactly those (rank r = the stored rank: never extended); heads keeping T < r rows
//     hold their T directions and grow at each refresh by min(r − rank, 16) columns: all of a pending
//     block's residual directions, or the last ones of the r-dimensional data subspace — the appended
//     coefficients are orthonormal ROWS here (16 rows in r ≥ 16 dimensions), so the residual's singular
//     values are all of the data's scale and the cut lies against the noise.
// Tokens that compaction does not keep, and the token a compensation row replaces, are "decoys" (a strong
// direction of their own): a fit over the wrong rows gives another subspace.
// Exactly rank-deficient rows (exact_rank r > 0; bases frozen after the compaction, update_freq 0): every
// kept and appended row is Σ_j c_j·u_j/16 over r directions u_j = s ⊙ h_j (s a per-head ±1 pattern, h_j
// distinct rows of the D × D Sylvester Hadamard matrix, D a power of 2: exactly orthogonal) with integer
// c_j ∈ [−8, 8]: every element is an integer multiple of 1/16 below 8r/16 in magnitude, exact in fp16, so the
// rows the backends are given span exactly r dimensions (no noise) and their Gram matrix in double is
// exact. The CPU's singular values past r are then ~10⁻¹⁶·σ_0, the device's eigenvalues past r its
// solver's rounding (~D·2⁻⁵³·λ_0, next to the "meaningful" floor 10⁻¹⁴·λ_0: the header's documented
// divergence, which the energy rule and a fixed rank ≤ r never reach). Random c gives energy fractions
// ≈ 1/r each, so energy 0.98 picks rank r (the cumulative at r − 1 is ≈ 1 − 1/r).
//
// low_rank_fit_bounds replays the CPU's rules (low_rank::fit_basis, extend) on the rows the CPU was given,
// checks the premises above on the actual numbers (every rank decision with margins, every cut with a
// spectral gap), and bounds ‖U_a U_aᵀ − U_b U_bᵀ‖₂ for two fits of those rows — derivation at
// compaction_bound and refresh_bound. It only needs the CPU's bases, never the device's.
#pragma once

#include <kvtrim/codec/low_rank.hpp>
#include <kvtrim/codec/rank_analysis.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace kvtrim::testing {

/// A seed from several parts (splitmix64 over each part).
inline std::uint64_t mixed_seed(std::initializer_list<std::uint64_t> parts) {
  std::uint64_t state = 0x243F6A8885A308D3ull;
  for (const std::uint64_t part : parts) {
    state += part + 0x9E3779B97F4A7C15ull;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    state = z ^ (z >> 31);
  }
  return state;
}

/// rows × cols (rows ≥ cols) with orthonormal columns: the Q of a Householder QR of a seeded Gaussian matrix.
inline Eigen::MatrixXd orthonormal_columns(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Eigen::MatrixXd gaussian(rows, cols);
  for (Eigen::Index i = 0; i < gaussian.size(); ++i) gaussian.data()[i] = normal(random);
  return Eigen::HouseholderQR<Eigen::MatrixXd>(gaussian).householderQ() * Eigen::MatrixXd::Identity(rows, cols);
}

/// The rows of the structured heads described at the top (kind 0: keys, 1: values).
class low_rank_sequence_rows {
 public:
  /// Noise per element (the rows' elements are ~1).
  static constexpr double noise = 1e-3;

  /// fixed_rank 0: energy-chosen ranks; else every head's data spans fixed_rank directions of equal energy.
  /// `block`: the refresh period (update_freq) the appended rows are designed for (with a fixed rank: at
  /// most that rank, the orthonormal rows' dimension).
  /// `exact_rank` > 0: the exactly rank-deficient rows above (spanning that many directions).
  low_rank_sequence_rows(std::int64_t head_dim, std::int64_t fixed_rank, std::uint64_t seed, std::int64_t block = 16,
                         std::int64_t exact_rank = 0)
      : dim_(head_dim), fixed_rank_(fixed_rank), seed_(seed), block_(block > 0 ? block : 16), exact_rank_(exact_rank) {}

  /// The refresh period the appended rows are designed for.
  std::int64_t block() const { return block_; }

  /// m: the directions of a head's compaction rows.
  std::int64_t old_directions(std::int64_t head, int kind) const {
    return fixed_rank_ > 0 ? fixed_rank_ : 3 + (head + kind) % 3;
  }
  /// k: the directions appended rows add (energy-chosen ranks only).
  std::int64_t new_directions(std::int64_t head, int kind) const {
    return fixed_rank_ > 0 ? 0 : (head + 2 * kind) % 3;
  }

  /// The `count` rows a head keeps at compaction, row-major count × head_dim.
  std::vector<float> kept_rows(std::int64_t head, int kind, std::int64_t count) const {
    if (exact_rank_ > 0) return exact_rows(head, kind, count, mixed_seed({seed_, 8, hash(head), hash(kind), hash(count)}));
    const std::int64_t m = old_directions(head, kind);
    const Eigen::MatrixXd directions = directions_of(head, kind);
    const std::vector<double> fractions = old_fractions(m);
    Eigen::MatrixXd rows = Eigen::MatrixXd::Zero(count, dim_);
    if (count >= m) {
      const Eigen::MatrixXd q = orthonormal_columns(count, m, mixed_seed({seed_, 2, hash(head), hash(kind), hash(count)}));
      for (std::int64_t j = 0; j < m; ++j)
        rows += std::sqrt(static_cast<double>(count) * static_cast<double>(dim_) * fractions[static_cast<std::size_t>(j)]) *
                q.col(j) * directions.col(j).transpose();
    } else {
      for (std::int64_t i = 0; i < count; ++i) rows.row(i) = std::sqrt(static_cast<double>(dim_)) * directions.col(i).transpose();
    }
    std::mt19937_64 random(mixed_seed({seed_, 3, hash(head), hash(kind), hash(count)}));
    return with_noise(rows, random);
  }

  /// The head's t-th appended token since its compaction (t counts the tokens it holds beyond the kept
  /// ones: a truncation gives its indices back). `salt` varies the noise between calls.
  std::vector<float> appended_row(std::int64_t head, int kind, std::int64_t t, std::uint64_t salt) const {
    if (exact_rank_ > 0) return exact_rows(head, kind, 1, mixed_seed({seed_, 9, hash(head), hash(kind), hash(t), salt}));
    const std::int64_t m = old_directions(head, kind), k = new_directions(head, kind);
    const Eigen::MatrixXd directions = directions_of(head, kind);
    const std::int64_t block = block_, in_block = t % block;
    Eigen::MatrixXd row = Eigen::MatrixXd::Zero(1, dim_);
    const double d = static_cast<double>(dim_);
    if (fixed_rank_ > 0) {
      // Orthonormal rows: n = block coefficient rows of √m·Qᵀ (Q: m × n, orthonormal columns; m ≥ n); each
      // row has energy m·(D/m) = D.
      const Eigen::MatrixXd q = orthonormal_columns(m, block, mixed_seed({seed_, 5, hash(head), hash(kind), hash(t / block)}));
      for (std::int64_t j = 0; j < m; ++j)
        row += std::sqrt(static_cast<double>(m)) * q(j, in_block) * std::sqrt(d / static_cast<double>(m)) * directions.col(j).transpose();
    } else if (block < m + k) {
      // One direction per row (a period too short for orthogonal columns): the (t mod (m + k))-th.
      row = std::sqrt(d) * directions.col(t % (m + k)).transpose();
    } else {
      // Orthogonal columns: √n·Q (Q: n × (m + k), orthonormal columns, n = block), so a block's singular
      // values are √n·√(D·g_j) exactly, with g the appended rows' energy fractions (n = 16: 4·Q).
      const Eigen::MatrixXd q = orthonormal_columns(block, m + k, mixed_seed({seed_, 4, hash(head), hash(kind), hash(t / block)}));
      const double scale = std::sqrt(static_cast<double>(block));
      const double old_part = k == 0 ? 1.0 : k == 1 ? 0.7 : 0.55;
      const std::vector<double> fractions = old_fractions(m);
      for (std::int64_t j = 0; j < m; ++j)
        row += scale * q(in_block, j) * std::sqrt(d * old_part * fractions[static_cast<std::size_t>(j)]) *
               directions.col(j).transpose();
      static constexpr double new_fractions[] = {0.30, 0.15};
      for (std::int64_t j = 0; j < k; ++j)
        row += scale * q(in_block, m + j) * std::sqrt(d * new_fractions[j]) * directions.col(m + j).transpose();
    }
    std::mt19937_64 random(mixed_seed({seed_, 6, hash(head), hash(kind), hash(t), salt}));
    return with_noise(row, random);
  }

  /// `count` rows the head's model does not have (4√D along a direction of its own, and noise), row-major:
  /// the tokens compaction drops.
  std::vector<float> decoy_rows(std::int64_t head, int kind, std::int64_t count) const {
    const Eigen::MatrixXd directions = directions_of(head, kind);
    const Eigen::RowVectorXd decoy =
        4.0 * std::sqrt(static_cast<double>(dim_)) * directions.col(old_directions(head, kind) + 2).transpose();
    const Eigen::MatrixXd rows = Eigen::VectorXd::Ones(count) * decoy;
    std::mt19937_64 random(mixed_seed({seed_, 7, hash(head), hash(kind), hash(count)}));
    return with_noise(rows, random);
  }

  /// Energy fractions of the m old directions (each ≥ 10 %; cumulative at m − 1 ≤ 0.90).
  std::vector<double> old_fractions(std::int64_t m) const {
    if (fixed_rank_ > 0) return std::vector<double>(static_cast<std::size_t>(m), 1.0 / static_cast<double>(m));
    if (m == 3) return {0.5, 0.3, 0.2};
    if (m == 4) return {0.4, 0.3, 0.2, 0.1};
    return {0.35, 0.25, 0.18, 0.12, 0.10};
  }

 private:
  static std::uint64_t hash(std::int64_t x) { return static_cast<std::uint64_t>(x); }

  /// head_dim × (m + 3): the old directions, the two new ones, the decoy's.
  Eigen::MatrixXd directions_of(std::int64_t head, int kind) const {
    return orthonormal_columns(dim_, old_directions(head, kind) + 3, mixed_seed({seed_, 1, hash(head), hash(kind)}));
  }

  /// `count` exactly rank-deficient rows (the design above), row-major, from `seed`'s coefficients.
  std::vector<float> exact_rows(std::int64_t head, int kind, std::int64_t count, std::uint64_t seed) const {
    // The head's directions: r distinct Hadamard rows (a seeded shuffle of 0 … D − 1) and a ±1 pattern.
    std::mt19937_64 pick(mixed_seed({seed_, 10, hash(head), hash(kind)}));
    std::vector<std::int64_t> order(static_cast<std::size_t>(dim_));
    for (std::int64_t i = 0; i < dim_; ++i) order[static_cast<std::size_t>(i)] = i;
    std::shuffle(order.begin(), order.end(), pick);
    std::vector<int> sign(static_cast<std::size_t>(dim_));
    for (int& s : sign) s = (pick() & 1) != 0 ? 1 : -1;
    // Sylvester: H[a][d] = (−1)^popcount(a & d).
    const auto hadamard = [](std::int64_t a, std::int64_t d) {
      return (std::popcount(static_cast<std::uint64_t>(a & d)) & 1) != 0 ? -1 : 1;
    };
    std::mt19937_64 random(seed);
    std::uniform_int_distribution<int> coefficient(-8, 8);
    std::vector<float> out(static_cast<std::size_t>(count * dim_));
    for (std::int64_t i = 0; i < count; ++i) {
      std::vector<int> c(static_cast<std::size_t>(exact_rank_));
      for (int& x : c) x = coefficient(random);
      for (std::int64_t d = 0; d < dim_; ++d) {
        int sum = 0;
        for (std::int64_t j = 0; j < exact_rank_; ++j)
          sum += c[static_cast<std::size_t>(j)] * hadamard(order[static_cast<std::size_t>(j)], d);
        out[static_cast<std::size_t>(i * dim_ + d)] = static_cast<float>(sign[static_cast<std::size_t>(d)] * sum) / 16.0f;
      }
    }
    return out;
  }

  std::vector<float> with_noise(const Eigen::MatrixXd& rows, std::mt19937_64& random) const {
    std::normal_distribution<double> normal(0.0, noise);
    std::vector<float> out(static_cast<std::size_t>(rows.size()));
    for (Eigen::Index i = 0; i < rows.rows(); ++i)
      for (Eigen::Index d = 0; d < rows.cols(); ++d)
        out[static_cast<std::size_t>(i * rows.cols() + d)] = static_cast<float>(rows(i, d) + normal(random));
    return out;
  }

  std::int64_t dim_;
  std::int64_t fixed_rank_;
  std::uint64_t seed_;
  std::int64_t block_;
  std::int64_t exact_rank_;
};

/// Replays codec::low_rank's sequence fits (prepare_head's fit_basis at compaction, extend at each refresh)
/// on the rows the CPU was given, with the CPU's bases, and bounds the distance between the subspaces two
/// correct implementations fit. Per (head, kind) it keeps the prefixes of the current basis — the rank
/// after the compaction and after each refresh that added columns (extend never rewrites a column it
/// wrote, so prefix r of today's basis is the basis the head had at rank r) — with a bound on
/// ‖U_a[:, :r] U_a[:, :r]ᵀ − U_b[:, :r] U_b[:, :r]ᵀ‖₂ for each.
class low_rank_fit_bounds {
 public:
  struct settings {
    std::int64_t heads = 0;
    std::int64_t head_dim = 0;
    std::int64_t stored_rank = 0;
    std::int64_t fixed_rank = 0;  // 0: energy
    double energy = 0.98;
    std::int64_t update_freq = 0;
  };
  struct prefix {
    std::int64_t rank = 0;
    double tolerance = 0.0;  // the bound on ‖ΔP‖₂ for the first `rank` columns
    double measured = -1.0;  // the distance measured at the last comparison, at most `tolerance` (−1: not yet)
  };

  /// Rank decisions must clear their thresholds by these margins: the energy fraction by 10⁻³ (two
  /// correct fits' fractions differ by ~10⁻¹²), the singular-value floor σ > σ₀·10⁻⁷ by two decades.
  static constexpr double energy_margin = 1e-3;
  static constexpr double floor_above = 1e-5, floor_below = 1e-9;

  explicit low_rank_fit_bounds(const settings& s)
      : s_(s), state_(static_cast<std::size_t>(2 * s.heads)), pending_(static_cast<std::size_t>(2 * s.heads)) {}

  /// prepare_head's rows (count × head_dim, row-major): what the CPU fitted for (head, kind).
  void compacted(std::int64_t head, int kind, const std::vector<float>& rows, std::int64_t count) {
    head_state& st = at(head, kind);
    st = head_state{};
    st.events.push_back(event{true, to_matrix(rows.data(), count)});
    for (std::int64_t i = 0; i < count; ++i) st.largest_row = std::max(st.largest_row, norm(rows.data() + i * s_.head_dim));
    pending_of(head, kind).clear();
  }

  /// One token encoded after the compaction (append order): its raw key and value rows.
  void appended(std::int64_t head, const float* key, const float* value) {
    for (int kind = 0; kind < 2; ++kind) {
      const float* row = kind == 0 ? key : value;
      head_state& st = at(head, kind);
      st.largest_row = std::max(st.largest_row, norm(row));
      if (s_.update_freq == 0) continue;
      std::vector<std::vector<float>>& pending = pending_of(head, kind);
      pending.emplace_back(row, row + s_.head_dim);
      if (static_cast<std::int64_t>(pending.size()) == s_.update_freq) {
        std::vector<float> rows;
        for (const auto& r : pending) rows.insert(rows.end(), r.begin(), r.end());
        st.events.push_back(event{false, to_matrix(rows.data(), s_.update_freq)});
        pending.clear();
      }
    }
  }

  /// scheme::truncate dropped the head's newest `count` tokens (≤ its pending count: the horizon).
  void dropped(std::int64_t head, std::int64_t count, std::vector<std::string>& premises) {
    if (s_.update_freq == 0 || count == 0) return;
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<std::vector<float>>& pending = pending_of(head, kind);
      if (count > static_cast<std::int64_t>(pending.size())) {
        premises.push_back(describe("head ", head, ": a drop of ", count, " past its ", pending.size(), " pending rows"));
        pending.clear();
      } else {
        pending.resize(pending.size() - static_cast<std::size_t>(count));
      }
    }
  }

  /// The raw rows waiting for the head's next refresh (the CPU's pending buffer, row for row).
  const std::vector<std::vector<float>>& pending(std::int64_t head, int kind) const {
    return pending_[static_cast<std::size_t>(2 * head + kind)];
  }
  /// max ‖x‖₂ over the rows the head was given since its compaction (its kept rows included).
  double largest_row(std::int64_t head, int kind) const { return state_[static_cast<std::size_t>(2 * head + kind)].largest_row; }

  /// Replays the fits since the last call with the CPU's basis (head_dim × stored_rank, row-major) and
  /// returns the prefixes of the basis with their bounds; unmet premises are added to `premises`.
  const std::vector<prefix>& replay(std::int64_t head, int kind, const float* cpu_basis, std::int64_t cpu_rank,
                                    std::vector<std::string>& premises) {
    head_state& st = at(head, kind);
    const auto note = [&](const std::string& what) {
      premises.push_back(describe(kind == 0 ? "keys" : "values", " of head ", head, ": ", what));
    };
    for (const event& e : st.events) {
      if (e.compaction)
        st.prefixes = {compaction_bound(e.rows, note)};
      else if (!st.prefixes.empty())
        refresh_bound(st, e.rows, cpu_basis, note);
    }
    st.events.clear();
    const std::int64_t replayed = st.prefixes.empty() ? 0 : st.prefixes.back().rank;
    if (replayed != cpu_rank) note(describe("the CPU's rules replayed give rank ", replayed, ", the CPU holds ", cpu_rank));
    return st.prefixes;
  }

  /// The distance measured for prefix i after the last replay (the next refresh starts from it). The caller
  /// passes at most the prefix's bound: a distance past it is a failure already reported, and the bounds that
  /// follow are then those of a correct implementation (and the gap premises stay the data's).
  void measured(std::int64_t head, int kind, std::size_t i, double distance) { at(head, kind).prefixes[i].measured = distance; }

  static constexpr double u = 0x1p-24;   // float (the stored bases)
  static constexpr double ud = 0x1p-53;  // double (the fits)

  /// ‖U Uᵀ − Ũ Ũᵀ‖₂ for U the float rounding of Ũ (head_dim × r, orthonormal columns): U = Ũ + F with
  /// |F_ij| ≤ u|Ũ_ij|, so ‖F‖₂ ≤ ‖F‖_F ≤ u‖Ũ‖_F = u√r and ‖ŨFᵀ + FŨᵀ + FFᵀ‖₂ ≤ 2u√r + u²r.
  static double float_rounding(std::int64_t r) {
    const double rank = static_cast<double>(r);
    return 2.0 * u * std::sqrt(rank) + u * u * rank;
  }

 private:
  struct event {
    bool compaction;
    Eigen::MatrixXd rows;
  };
  struct head_state {
    std::vector<event> events;
    std::vector<prefix> prefixes;
    double largest_row = 0.0;
  };

  template <class... Parts>
  static std::string describe(const Parts&... parts) {
    std::ostringstream out;
    out.precision(6);
    (out << ... << parts);
    return out.str();
  }

  head_state& at(std::int64_t head, int kind) { return state_[static_cast<std::size_t>(2 * head + kind)]; }
  std::vector<std::vector<float>>& pending_of(std::int64_t head, int kind) {
    return pending_[static_cast<std::size_t>(2 * head + kind)];
  }
  double norm(const float* row) const {
    double sum = 0.0;
    for (std::int64_t d = 0; d < s_.head_dim; ++d) sum += static_cast<double>(row[d]) * static_cast<double>(row[d]);
    return std::sqrt(sum);
  }
  Eigen::MatrixXd to_matrix(const float* rows, std::int64_t count) const {
    Eigen::MatrixXd m(count, s_.head_dim);
    for (std::int64_t i = 0; i < count; ++i)
      for (std::int64_t d = 0; d < s_.head_dim; ++d) m(i, d) = static_cast<double>(rows[i * s_.head_dim + d]);
    return m;
  }
  static std::vector<double> singular_values(const Eigen::MatrixXd& x) {
    if (x.size() == 0) return {};
    Eigen::BDCSVD<Eigen::MatrixXd> svd(x);
    const Eigen::VectorXd& values = svd.singularValues();
    return std::vector<double>(values.data(), values.data() + values.size());
  }

  /// Compaction: the CPU's fit_basis rule on the T × D rows X, its premises, and the bound.
  ///   rank: fixed, or the smallest r whose energy Σ_{i<r} σ_i² / Σ σ_i² reaches `energy`, capped by the
  ///     stored rank and by the count of σ_i > σ_0·10⁻⁷. Premises: the deciding threshold is cleared by
  ///     energy_margin (energy), or by two decades each side (the floor).
  ///   bound: each implementation's subspace vs the exact top-r right singular subspace of X, plus the
  ///     rounding of both bases to float:
  ///     the CPU (BDCSVD, backward stable: the exact SVD of X + E, ‖E‖₂ ≤ c·u_d·σ_0 with c = 8(T + D),
  ///       generous for LAPACK-style bidiagonalisation): Wedin, sin θ ≤ √2·‖E‖ / (σ_{r−1} − σ_r − 2‖E‖);
  ///     the device (G = XᵀX in double: every product of two fp16/fp32 inputs is exact in double, only the
  ///       T-term sums round, |ΔG| ≤ γ_T·|X|ᵀ|X| entrywise, so ‖ΔG‖₂ ≤ γ_T·‖X‖_F²; a symmetric eigen-solver
  ///       adds a backward error ≤ 8·D·u_d·‖G‖₂): Davis–Kahan, sin θ ≤ ‖ΔG‖ / (σ_{r−1}² − σ_r² − 2‖ΔG‖);
  ///     float storage of either basis: float_rounding(r) each.
  ///   ‖U_cpu U_cpuᵀ − U_gpu U_gpuᵀ‖₂ ≤ sin θ_cpu + sin θ_gpu + 2·float_rounding(r) (σ_r = 0 when r = T:
  ///   all the rows' directions). With this file's rows the gaps are ≥ 10 % of σ_0² and the two
  ///   sin θ are ≤ 10⁻¹⁰: the bound is float rounding, ≈ 4u√r (≤ 1.4·10⁻⁶ at r = 32).
  template <class Note>
  prefix compaction_bound(const Eigen::MatrixXd& x, const Note& note) const {
    const std::vector<double> s = singular_values(x);
    const auto n = static_cast<std::int64_t>(s.size());
    if (n == 0 || s[0] == 0.0) return prefix{0, 0.0};
    std::int64_t meaningful = 0;
    while (meaningful < n && s[static_cast<std::size_t>(meaningful)] > s[0] * 1e-7) ++meaningful;
    const std::int64_t by_energy = analysis::rank_for_energy(s, s_.energy);
    const std::int64_t chosen = s_.fixed_rank > 0 ? s_.fixed_rank : by_energy;
    const std::int64_t rank = std::min({chosen, s_.stored_rank, meaningful});
    if (s_.fixed_rank == 0 && by_energy == rank) {
      const std::vector<double> curve = analysis::energy_curve(s);
      if (std::abs(curve[static_cast<std::size_t>(rank - 1)] - s_.energy) < energy_margin ||
          (rank >= 2 && std::abs(curve[static_cast<std::size_t>(rank - 2)] - s_.energy) < energy_margin))
        note(describe("the energy at rank ", rank, " (", curve[static_cast<std::size_t>(rank - 1)], ") or ", rank - 1,
                      " is within ", energy_margin, " of ", s_.energy));
    }
    if (meaningful == rank && (s[static_cast<std::size_t>(rank - 1)] < s[0] * floor_above ||
                               (rank < n && s[static_cast<std::size_t>(rank)] > s[0] * floor_below)))
      note(describe("σ_", rank - 1, " / σ_0 or σ_", rank, " / σ_0 is near the floor 1e-7"));
    const double t = static_cast<double>(x.rows()), d = static_cast<double>(x.cols());
    const double lower = rank < n ? s[static_cast<std::size_t>(rank)] : 0.0;
    const double gap = s[static_cast<std::size_t>(rank - 1)] - lower;
    const double svd_error = 8.0 * (t + d) * ud * s[0];
    const double gram_error = (t * ud / (1.0 - t * ud)) * x.squaredNorm() + 8.0 * d * ud * s[0] * s[0];
    const double gram_gap = s[static_cast<std::size_t>(rank - 1)] * s[static_cast<std::size_t>(rank - 1)] - lower * lower;
    if (gap <= 4.0 * svd_error || gram_gap <= 4.0 * gram_error) {
      note(describe("no spectral gap at rank ", rank, " (σ ", s[static_cast<std::size_t>(rank - 1)], " vs ", lower, ")"));
      return prefix{rank, std::numeric_limits<double>::infinity()};
    }
    const double tolerance = std::sqrt(2.0) * svd_error / (gap - 2.0 * svd_error) +
                             gram_error / (gram_gap - 2.0 * gram_error) + 2.0 * float_rounding(rank);
    return prefix{rank, tolerance};
  }

  /// Refresh: extend's rule on the pending rows X_p (update_freq × D) against the basis of the head's
  /// current prefix (the CPU's first `rank` columns), its premises, and the new prefix's bound.
  ///   rule: R = X_p − X_p U Uᵀ; nothing when rank ≥ stored or ‖R‖_F² ≤ 10⁻¹²·‖X_p‖_F²; else add the
  ///     residual's top right singular vectors while rank + add < target (fixed rank, or the stored rank),
  ///     s_add > s_0·10⁻⁷ and (fixed rank, or captured energy < energy·‖X_p‖_F²). Premises: every energy
  ///     test and every floor test it evaluates clears its threshold by the margins above.
  ///   bound: with E = ‖ΔP‖₂ of the current prefix (measured at the last comparison and at most its bound,
  ///     else its bound),
  ///     the two residuals differ by ‖ΔR‖₂ = ‖X_p ΔP‖₂ ≤ ‖X_p‖₂·E. Their top-`add` right singular
  ///     subspaces V differ by sin θ ≤ √2·‖ΔR‖ / (δ − 2‖ΔR‖) (Wedin; δ = s_{add−1} − s_add, s_add = 0 past
  ///     the last), plus each solver's own error: the CPU's BDCSVD as at compaction (c = 8(n + D), n = update_freq); the
  ///     device's Jacobi on R·Rᵀ in double, ‖Δ(R Rᵀ)‖ ≤ (γ_D + 8·32·u_d)·‖R‖_F², Davis–Kahan on
  ///     s_{add−1}² − s_add², times (1 + s_0 / s_{add−1}) for v = Rᵀw / s. Then each side's new columns
  ///     W = fl(Gram–Schmidt(V against U)): V lies in the range of I − U Uᵀ, so ‖UᵀV‖ ≤ ‖UᵀU − I‖ ≤
  ///     φ(r) = float_rounding(r) (U is float), the two passes move V by ≤ φ(r), the rounding to float by
  ///     ≤ u√add: ‖W Wᵀ − V Vᵀ‖ ≤ 2(φ(r) + u√add) + … ≤ 3φ(rank + add) per side. As the measured quantity
  ///     is M = U_a U_aᵀ − U_b U_bᵀ of the stored floats (the residuals are X_p − X_p U Uᵀ of exactly those),
  ///     E' = ‖M'‖ ≤ E + sin θ + solvers + 6φ(rank + add) (8φ here, rounded up); E' = E when nothing is
  ///     added. With this file's rows δ is of the data's scale (s_{add−1} a sizeable fraction of ‖X_p‖₂,
  ///     s_add ~ noise): one refresh multiplies E by a small factor and adds ≈ 16u√r.
  template <class Note>
  void refresh_bound(head_state& st, const Eigen::MatrixXd& x, const float* cpu_basis, const Note& note) const {
    const prefix& current = st.prefixes.back();
    const std::int64_t rank = current.rank, r_max = s_.stored_rank, dim = s_.head_dim;
    if (rank >= r_max) return;
    Eigen::MatrixXd basis(dim, rank);
    for (std::int64_t d = 0; d < dim; ++d)
      for (std::int64_t j = 0; j < rank; ++j) basis(d, j) = static_cast<double>(cpu_basis[d * r_max + j]);
    const Eigen::MatrixXd residual = x - x * basis * basis.transpose();
    const double total = x.squaredNorm(), missed = residual.squaredNorm();
    if (total == 0.0) return;
    if (missed <= total * 1e-12) {
      if (missed > total * 1e-14) note(describe("the missed energy ", missed / total, " is near extend's 1e-12"));
      return;
    }
    if (missed < total * 1e-10) note(describe("the missed energy ", missed / total, " is near extend's 1e-12"));
    const std::vector<double> s = singular_values(residual);
    const auto n = static_cast<std::int64_t>(s.size());
    const std::int64_t target = s_.fixed_rank > 0 ? s_.fixed_rank : r_max;
    std::int64_t add = 0;
    double still_missed = missed;
    while (rank + add < target && add < n) {
      const double ratio = s[static_cast<std::size_t>(add)] / s[0];
      if (ratio <= 1e-7) {
        if (ratio > floor_below) note(describe("residual σ_", add, " / σ_0 = ", ratio, " is near the floor 1e-7"));
        break;
      }
      if (ratio < floor_above) note(describe("residual σ_", add, " / σ_0 = ", ratio, " is near the floor 1e-7"));
      if (s_.fixed_rank == 0) {
        const double captured = (total - still_missed) / total;
        if (std::abs(captured - s_.energy) < energy_margin)
          note(describe("a refresh's captured energy ", captured, " is within ", energy_margin, " of ", s_.energy));
        if (captured >= s_.energy) break;
      }
      still_missed -= s[static_cast<std::size_t>(add)] * s[static_cast<std::size_t>(add)];
      ++add;
    }
    if (add == 0) return;
    const double e = current.measured >= 0.0 ? current.measured : current.tolerance;
    const double x_norm = singular_values(x)[0];
    const double delta_r = x_norm * e + 4.0 * static_cast<double>(dim) * ud * x_norm;  // + R's own rounding
    const double last = s[static_cast<std::size_t>(add - 1)], next = add < n ? s[static_cast<std::size_t>(add)] : 0.0;
    const double gap = last - next;
    const double svd_error = 8.0 * (static_cast<double>(s_.update_freq) + static_cast<double>(dim)) * ud * s[0];
    const double jacobi_error = (static_cast<double>(dim) * ud + 8.0 * 32.0 * ud) * residual.squaredNorm();
    const double jacobi_gap = last * last - next * next;
    if (gap <= 4.0 * (delta_r + svd_error) || jacobi_gap <= 4.0 * jacobi_error) {
      note(describe("no spectral gap at a refresh's cut (σ ", last, " vs ", next, ", ‖ΔR‖ ≤ ", delta_r, ")"));
      st.prefixes.push_back(prefix{rank + add, std::numeric_limits<double>::infinity()});
      return;
    }
    const double turned = std::sqrt(2.0) * (delta_r + svd_error) / (gap - 2.0 * (delta_r + svd_error)) +
                          jacobi_error / (jacobi_gap - 2.0 * jacobi_error) * (1.0 + s[0] / last);
    st.prefixes.push_back(prefix{rank + add, e + turned + 8.0 * float_rounding(rank + add)});
  }

  settings s_;
  std::vector<head_state> state_;
  std::vector<std::vector<std::vector<float>>> pending_;
};

}  // namespace kvtrim::testing
