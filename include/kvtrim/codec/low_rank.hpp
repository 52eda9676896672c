// kvtrim/codec/low_rank.hpp — store each token as r coefficients in a per-head
// orthonormal basis from the SVD of that head's keys (and, separately, values).
//
// Papers: Eigen Attention (Saxena et al., 2024: rank by cumulative energy
// 0.98); Palu (Chang et al., 2024) and ShadowKV (Sun et al., 2024) for pre-RoPE
// bases with RoPE applied after reconstruction; xKV (Chang et al., 2025).
//
// Math, per (sequence, kv head): U (head_dim × r, UᵀU = I) spans the top right
// singular vectors of the head's T × D keys K. A key is stored as c = Uᵀk (r
// fp16 coefficients) and read as k̂ = U c, so ‖K − K̂‖_F² = Σ_{i>r} σ_i² (up to
// fp16 rounding). Attention never rebuilds full keys (post-RoPE bases):
//   score_i = q·k̂_i = (Uᵀq)·c_i        (project the query once per head)
//   out     = Σ p_i v̂_i = U_v (Σ p_i c^v_i)   (mix coefficients, lift once)
// Rank: fixed (`rank`), or the smallest r whose energy Σ_{i≤r}σ²/Σσ² reaches
// `energy` (default 0.98), at most `max_rank` (default head_dim/2, which bounds
// the memory: storage always holds max_rank coefficients per token).
//
// Post-RoPE keys (what an engine's cache holds) have a higher rank than
// pre-RoPE keys: RoPE turns each position-independent direction into a
// position-dependent pair of directions. key_space::pre_rope takes pre-RoPE
// keys with the engine's RoPE settings (core/rope.hpp) and rotates k̂ = U c by
// the token's position inside attention — the position the layout stores and
// passes to load_key / reader.dot (the score then needs the rebuilt key, since
// the rotation differs per token: O(D·r) per token, as ShadowKV). docs/codecs.md measures which wins
// on structured data.
//
// Where the basis comes from (basis_source):
//   sequence: fitted at compaction from the head's kept tokens (prepare_head),
//             then extended every `update_freq` appended tokens: the principal
//             directions of what the basis misses in those tokens are added as
//             new columns (up to the target rank), and those tokens are encoded
//             again with them. Existing columns never change, so coefficients
//             stored earlier stay valid and nothing else is re-encoded.
//   profile:  calibrated offline from sample keys/values
//   (io/low_rank_profile.hpp)
//             and installed with set_basis / load_profile before compaction.
// Positions: the codec stores none; every encode, load_key and reader.dot
// receives the token's position from the layout (docs/composition.md §1).
//
// Storage per slot: 2·max_rank fp16 coefficients. Per head: two D × max_rank fp32 bases, their ranks, and for
// sequence bases with refresh an update_freq-token fp32 buffer of raw tokens.
// NaN or ±Inf inputs are an error. Fitting a basis (an SVD, Eigen) allocates;
// it runs at compaction and at each refresh, never in a decode step without
// one. Defaults: energy 0.98, max_rank head_dim/2, sequence bases, update_freq
// 16, post-RoPE keys. Backends: cpu; cuda (backend/cuda/codec_low_rank.cuh; sequence bases
// fitted on the device, backend/cuda/low_rank_fit.cuh, with update_freq ≤ 32).
#pragma once

#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/codec/rank_analysis.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/rope.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::codec {

enum class basis_source { sequence, profile };
enum class key_space { post_rope, pre_rope };

struct low_rank {
  static constexpr std::string_view name = "low_rank";

  struct config {
    std::optional<std::int64_t> rank{};      // fixed rank; unset: smallest rank reaching `energy`
    double energy = 0.98;                    // Eigen Attention's threshold
    std::optional<std::int64_t> max_rank{};  // energy-chosen ranks stop here (unset: head_dim / 2)
    basis_source source = basis_source::sequence;
    std::int64_t update_freq = 16;  // appended tokens between basis refreshes (0: never)
    key_space keys = key_space::post_rope;
    kvtrim::rope rope{};  // the engine's RoPE, used with key_space::pre_rope

    void validate(std::string_view function) const {
      if (rank && *rank < 1)
        detail::fail(function, "config.codec.rank", "a rank of at least 1 (or unset: chosen by energy)",
                     std::to_string(*rank));
      if (max_rank && *max_rank < 1)
        detail::fail(function, "config.codec.max_rank", "at least 1 (or unset: head_dim / 2)",
                     std::to_string(*max_rank));
      if (!(energy > 0.0 && energy <= 1.0))
        detail::fail(function, "config.codec.energy", "an energy fraction in (0, 1] (default 0.98)",
                     detail::cat(energy));
      if (update_freq < 0 || update_freq > 65536)
        detail::fail(function, "config.codec.update_freq", "0 (never) to 65536 appended tokens",
                     std::to_string(update_freq));
    }
    void validate(std::string_view function, std::int64_t head_dim) const {
      validate(function);
      if (rank && *rank > head_dim)
        detail::fail(function, "config.codec.rank", detail::cat("a rank in [1, head_dim = ", head_dim, "]"),
                     std::to_string(*rank));
      if (!rank && max_rank && *max_rank > head_dim)
        detail::fail(function, "config.codec.max_rank", detail::cat("a rank in [1, head_dim = ", head_dim, "]"),
                     std::to_string(*max_rank));
      if (keys == key_space::pre_rope) rope.validate(function, head_dim);
    }
    /// Coefficients stored per token: the fixed rank, or the cap on
    /// energy-chosen ranks.
    std::int64_t stored_rank(std::int64_t head_dim) const {
      if (rank) return *rank;
      return max_rank ? *max_rank : std::max<std::int64_t>(1, head_dim / 2);
    }
  };

  template <MemorySpace Space>
  struct storage {
    half* key_coefficients = nullptr;    // [slots, stored_rank]
    half* value_coefficients = nullptr;  // [slots, stored_rank]
    float* key_bases = nullptr;          // [heads, head_dim, stored_rank]; columns ≥ the
                                         // head's rank are 0
    float* value_bases = nullptr;
    std::int32_t* key_ranks = nullptr;  // [heads]
    std::int32_t* value_ranks = nullptr;
    std::int64_t* compaction_left = nullptr;  // [heads]: encodes still part of the last compaction
    std::int64_t* pending_counts = nullptr;   // [heads]: tokens appended since the last refresh
    std::int64_t* pending_slots = nullptr;    // [heads, update_freq]
    float* pending_keys = nullptr;            // [heads, update_freq, head_dim], as given
    float* pending_values = nullptr;
    std::int64_t head_dim = 0;
    std::int64_t stored_rank = 0;
    std::int64_t slots = 0;  // capacity
    std::int64_t heads = 0;
    std::int64_t slot_run = 1;     // no runs: always 1
    std::int64_t update_freq = 0;  // 0: no refresh (profile bases, or update_freq 0)
    std::int64_t fixed_rank = 0;   // 0: by energy
    double energy = 0.98;
    bool from_sequence = true;
    bool pre_rope = false;
    kvtrim::rope rope{};
  };

  static std::size_t storage_bytes(const config& cfg, std::int64_t slots, std::int64_t heads, std::int64_t head_dim,
                                   std::int64_t slot_run) {
    detail::check_any_slot_run("kvtrim::codec::low_rank::storage_bytes", slot_run);
    workspace_carver carver;
    carve<host_space>(carver, cfg, slots, heads, head_dim);
    return carver.bytes();
  }
  static double bytes_per_token(const config& cfg, std::int64_t head_dim) {
    return 2.0 * static_cast<double>(cfg.stored_rank(head_dim)) * sizeof(half);
  }
  static double bytes_per_head(const config& cfg, std::int64_t head_dim) {
    // Two bases, their two int32 ranks, compaction_left and pending_counts.
    const double bases = 2.0 * static_cast<double>(head_dim * cfg.stored_rank(head_dim)) * sizeof(float) + 8.0 + 16.0;
    const std::int64_t buffered = refresh_tokens(cfg);
    return bases + (buffered > 0
                        ? static_cast<double>(buffered) * (8.0 + 2.0 * static_cast<double>(head_dim) * 4.0)
                        : 0.0);
  }

  template <MemorySpace Space>
  static storage<Space> bind(const config& cfg, void* memory, std::int64_t slots, std::int64_t heads,
                             std::int64_t head_dim, std::int64_t slot_run) {
    detail::check_any_slot_run("kvtrim::codec::low_rank::bind", slot_run);
    workspace_carver carver(workspace{memory, ~std::size_t{0}});
    storage<Space> store = carve<Space>(carver, cfg, slots, heads, head_dim);
    if constexpr (std::same_as<Space, host_space>) {
      // Every head starts with no basis and nothing pending.
      std::fill_n(store.key_bases, heads * head_dim * store.stored_rank, 0.0f);
      std::fill_n(store.value_bases, heads * head_dim * store.stored_rank, 0.0f);
      std::fill_n(store.key_ranks, heads, 0);
      std::fill_n(store.value_ranks, heads, 0);
      std::fill_n(store.compaction_left, heads, std::int64_t{0});
      std::fill_n(store.pending_counts, heads, std::int64_t{0});
    }
    return store;
  }

  template <MemorySpace Space>
  static void check_storage(std::string_view function, const storage<Space>& store, std::int64_t head_dim) {
    detail::check_storage_head_dim(function, store.head_dim, head_dim);
    const bool complete =
        store.key_coefficients && store.value_coefficients && store.key_bases && store.value_bases && store.key_ranks &&
        store.value_ranks && store.compaction_left && store.pending_counts &&
        (store.update_freq == 0 || (store.pending_slots && store.pending_keys && store.pending_values));
    if (!complete)
      detail::fail(function, "cache.storage", "every array of the codec bound (codec::bind)", "a null pointer");
    // basis_source::profile: every head needs its bases before any write (checked
    // here, before the first write, so a call never fails halfway through the heads).
    if constexpr (std::same_as<Space, host_space>) {
      if (!store.from_sequence)
        for (std::int64_t head = 0; head < store.heads; ++head)
          if (store.key_ranks[head] == 0 || store.value_ranks[head] == 0)
            detail::fail(function, "cache.storage",
                         detail::cat("a basis for every head (basis_source::profile: call set_basis or load the "
                                     "profile's bases first)"),
                         detail::cat("none for head ", head));
    }
  }

  // --- bases -----------------------------------------------------------------

  /// Installs a head's bases: key_basis is head_dim × key_rank row-major with
  /// orthonormal columns (likewise values). Throws on a wrong shape or a basis
  /// that is not orthonormal to 1e-3 — both bases checked before either is
  /// written, so a refused call leaves the head as it was.
  template <class Space>  // a template (host_space only) so that TUs that never call it skip its Eigen code
    requires std::same_as<Space, host_space>
  static void set_basis(const storage<Space>& store, std::int64_t head, const float* key_basis,
                        std::int64_t key_rank, const float* value_basis, std::int64_t value_rank) {
    constexpr std::string_view function = "kvtrim::codec::low_rank::set_basis";
    check_head(function, store, head);
    check_basis(function, "key_basis", store, key_basis, key_rank);
    check_basis(function, "value_basis", store, value_basis, value_rank);
    write_basis(store, columns_of(store, key_basis, key_rank), store.key_bases, store.key_ranks, head);
    write_basis(store, columns_of(store, value_basis, value_rank), store.value_bases, store.value_ranks, head);
  }

  /// Throws unless `basis` (head_dim × rank, row-major) is one set_basis accepts:
  /// rank 1 to the stored rank, finite, orthonormal columns to 1e-3. Writes nothing
  /// (io::load_profile checks every head with it before installing the first).
  template <class Space>
    requires std::same_as<Space, host_space>
  static void check_basis(std::string_view function, std::string_view argument, const storage<Space>& store,
                          const float* basis, std::int64_t rank) {
    if (rank < 1 || rank > store.stored_rank)
      detail::fail(function, argument, detail::cat("a basis of rank 1 to ", store.stored_rank, " (the stored rank)"),
                   detail::cat("rank ", rank));
    if (basis == nullptr) detail::fail(function, argument, "a head_dim × rank basis", "nullptr");
    const auto columns = columns_of(store, basis, rank);
    if (!columns.allFinite()) detail::fail(function, argument, "finite entries", "NaN or Inf");
    const double deviation =
        (columns.transpose() * columns - Eigen::MatrixXd::Identity(rank, rank)).cwiseAbs().maxCoeff();
    if (deviation > 1e-3)
      detail::fail(function, argument, "orthonormal columns (|UᵀU − I| ≤ 1e-3)",
                   detail::cat("|UᵀU − I| = ", deviation));
  }

  /// The basis a config picks for `rows` (one token per row): the top right
  /// singular vectors, as many as `fixed_rank` or as `energy` needs (≤
  /// stored_rank).
  template <class Rows>  // a template so that only TUs that fit a basis compile Eigen's SVD
  static Eigen::MatrixXd fit_basis(const Eigen::MatrixBase<Rows>& rows, std::int64_t fixed_rank, double energy,
                                   std::int64_t stored_rank) {
    if (rows.rows() == 0) return Eigen::MatrixXd(rows.cols(), 0);
    const std::vector<double> singular = analysis::singular_values(rows);
    std::int64_t rank = fixed_rank > 0 ? fixed_rank : analysis::rank_for_energy(singular, energy);
    // Directions with no energy are not directions of the data (fewer tokens
    // than the rank).
    const double floor = singular.front() * 1e-7;
    std::int64_t meaningful = 0;
    while (meaningful < static_cast<std::int64_t>(singular.size()) && singular[meaningful] > floor) ++meaningful;
    rank = std::min({rank, stored_rank, meaningful});
    return analysis::principal_basis(rows, rank);
  }

  /// Sequence bases: fit the head's bases to the tokens it is about to hold.
  template <class Rows>
  static void prepare_head(const storage<host_space>& store, std::int64_t head, std::int64_t /*sequence_length*/,
                           std::int64_t count, const Rows& rows) {
    constexpr std::string_view function = "kvtrim::codec::low_rank::prepare_head";
    check_head(function, store, head);
    store.compaction_left[head] = count;
    store.pending_counts[head] = 0;
    if (!store.from_sequence) return;
    Eigen::MatrixXd keys(count, store.head_dim), values(count, store.head_dim);
    std::array<float, max_head_dim> key{}, value{};
    for (std::int64_t i = 0; i < count; ++i) {
      rows(i, key.data(), value.data());
      detail::check_finite_row(function, "key", key.data(), store.head_dim, head, i);
      detail::check_finite_row(function, "value", value.data(), store.head_dim, head, i);
      for (std::int64_t d = 0; d < store.head_dim; ++d) {
        keys(i, d) = key[d];
        values(i, d) = value[d];
      }
    }
    write_basis(store, fit_basis(keys, store.fixed_rank, store.energy, store.stored_rank), store.key_bases,
                store.key_ranks, head);
    write_basis(store, fit_basis(values, store.fixed_rank, store.energy, store.stored_rank), store.value_bases,
                store.value_ranks, head);
  }

  // --- element operations (host: the projection and refresh use Eigen) ----

  /// Stores c = Uᵀk and c^v = U_vᵀv. `position` is checked (pre-RoPE keys are
  /// rotated by it when read) but not stored: the layout keeps positions.
  template <class Space>  // a template (host_space only): refresh's SVD is compiled only where a TU encodes
    requires std::same_as<Space, host_space>
  static void encode(const storage<Space>& store, std::int64_t head, std::int64_t slot, std::int64_t position,
                     const float* key, const float* value) {
    constexpr std::string_view function = "kvtrim::codec::low_rank::encode";
    check_head(function, store, head);
    if (slot < 0 || slot >= store.slots) detail::fail_index(function, "slot", slot, store.slots);
    if (position < 0 || position > std::numeric_limits<std::int32_t>::max())
      detail::fail(function, "position", "a position in [0, 2^31)", std::to_string(position));
    detail::check_finite_row(function, "key", key, store.head_dim, head, slot);
    detail::check_finite_row(function, "value", value, store.head_dim, head, slot);
    if (!store.from_sequence && (store.key_ranks[head] == 0 || store.value_ranks[head] == 0))
      detail::fail(
          function, "cache",
          detail::cat("a basis for head ", head, " (basis_source::profile: call set_basis or load_profile first)"),
          "none");
    project(store, head, slot, key, value);

    if (store.update_freq == 0) return;
    if (store.compaction_left[head] > 0) {  // part of the compaction the basis was fitted to
      --store.compaction_left[head];
      return;
    }
    const std::int64_t pending = store.pending_counts[head];
    const std::int64_t at = head * store.update_freq + pending;
    store.pending_slots[at] = slot;
    std::copy_n(key, store.head_dim, store.pending_keys + at * store.head_dim);
    std::copy_n(value, store.head_dim, store.pending_values + at * store.head_dim);
    store.pending_counts[head] = pending + 1;
    if (pending + 1 == store.update_freq) refresh(store, head);
  }

  /// scheme::truncate's limit: the tokens appended since the last basis refresh
  /// (still in the pending buffer); a refresh already extended the basis with the
  /// ones before. No limit without refreshes (update_freq 0).
  static std::int64_t rollback_horizon(const storage<host_space>& store, std::int64_t head) {
    return store.update_freq == 0 ? unlimited_rollback : store.pending_counts[head];
  }
  template <class SlotOf>
  static void drop_newest(const storage<host_space>& store, std::int64_t head, std::int64_t count, const SlotOf&) {
    if (store.update_freq != 0) store.pending_counts[head] -= count;
  }

  /// The key attention sees: U c, rotated to `position` for pre-RoPE bases.
  static void load_key(const storage<host_space>& store, std::int64_t head, std::int64_t slot, std::int64_t position,
                       float* out) {
    lift(store, store.key_bases, store.key_ranks[head], store.key_coefficients, head, slot, out);
    if (store.pre_rope) store.rope.apply(out, store.head_dim, position);
  }
  static void load_value(const storage<host_space>& store, std::int64_t head, std::int64_t slot, float* out) {
    lift(store, store.value_bases, store.value_ranks[head], store.value_coefficients, head, slot, out);
  }

  /// Pre-RoPE keys are stored unrotated: attention rotates them (layered uses
  /// this on its fp16 rows).
  static void rotate_key(const storage<host_space>& store, std::int64_t position, float* key) {
    if (store.pre_rope) store.rope.apply(key, store.head_dim, position);
  }

  static void move_slot(const storage<host_space>& store, std::int64_t head, std::int64_t from, std::int64_t to) {
    const std::int64_t r = store.stored_rank;
    std::copy_n(store.key_coefficients + from * r, r, store.key_coefficients + to * r);
    std::copy_n(store.value_coefficients + from * r, r, store.value_coefficients + to * r);
    for (std::int64_t i = 0; store.update_freq > 0 && i < store.pending_counts[head]; ++i)
      if (store.pending_slots[head * store.update_freq + i] == from)
        store.pending_slots[head * store.update_freq + i] = to;
  }

  /// Decode attention without rebuilding keys: scores (Uᵀq)·c, output U_v (Σ p
  /// c^v).
  class reader {
   public:
    reader(const storage<host_space>& store, std::int64_t head, const float* query)
        : store_(store),
          query_(query),
          key_basis_(store.key_bases + head * store.head_dim * store.stored_rank),
          value_basis_(store.value_bases + head * store.head_dim * store.stored_rank),
          key_rank_(store.key_ranks[head]),
          value_rank_(store.value_ranks[head]) {
      if (store.pre_rope) return;  // the query meets each key at its own rotation
      for (std::int64_t j = 0; j < key_rank_; ++j) {
        float sum = 0.0f;
        for (std::int64_t d = 0; d < store.head_dim; ++d) sum += query[d] * key_basis_[d * store.stored_rank + j];
        projected_[j] = sum;
      }
    }
    float dot(std::int64_t slot, std::int64_t position) {
      const half* c = store_.key_coefficients + slot * store_.stored_rank;
      float sum = 0.0f;
      if (!store_.pre_rope) {
        for (std::int64_t j = 0; j < key_rank_; ++j) sum += projected_[j] * static_cast<float>(c[j]);
        return sum;
      }
      // RoPE rotates each token by its own position, so the key is rebuilt and
      // rotated.
      for (std::int64_t d = 0; d < store_.head_dim; ++d) {
        float component = 0.0f;
        for (std::int64_t j = 0; j < key_rank_; ++j)
          component += key_basis_[d * store_.stored_rank + j] * static_cast<float>(c[j]);
        row_[d] = component;
      }
      store_.rope.apply(row_.data(), store_.head_dim, position);
      for (std::int64_t d = 0; d < store_.head_dim; ++d) sum += query_[d] * row_[d];
      return sum;
    }
    void accumulate(std::int64_t slot, float weight) {
      const half* c = store_.value_coefficients + slot * store_.stored_rank;
      for (std::int64_t j = 0; j < value_rank_; ++j) mixed_[j] += weight * static_cast<float>(c[j]);
    }
    void finish(float* out) const {
      for (std::int64_t d = 0; d < store_.head_dim; ++d) {
        float sum = 0.0f;
        for (std::int64_t j = 0; j < value_rank_; ++j) sum += value_basis_[d * store_.stored_rank + j] * mixed_[j];
        out[d] = sum;
      }
    }

   private:
    const storage<host_space>& store_;
    const float* query_;
    const float* key_basis_;
    const float* value_basis_;
    std::int64_t key_rank_;
    std::int64_t value_rank_;
    std::array<float, max_head_dim> projected_{};
    std::array<float, max_head_dim> mixed_{};
    std::array<float, max_head_dim> row_{};
  };

  static reader attention_reader(const storage<host_space>& store, std::int64_t head, const float* query) {
    return reader(store, head, query);
  }

 private:
  static std::int64_t refresh_tokens(const config& cfg) {
    return cfg.source == basis_source::sequence ? cfg.update_freq : 0;
  }

  template <MemorySpace Space>
  static storage<Space> carve(workspace_carver& carver, const config& cfg, std::int64_t slots, std::int64_t heads,
                              std::int64_t head_dim) {
    cfg.validate("kvtrim::codec::low_rank::bind", head_dim);
    storage<Space> store;
    const std::int64_t r = cfg.stored_rank(head_dim);
    const std::int64_t buffered = refresh_tokens(cfg);
    store.key_coefficients = carver.take<half>(slots * r);
    store.value_coefficients = carver.take<half>(slots * r);
    store.key_bases = carver.take<float>(heads * head_dim * r);
    store.value_bases = carver.take<float>(heads * head_dim * r);
    store.key_ranks = carver.take<std::int32_t>(heads);
    store.value_ranks = carver.take<std::int32_t>(heads);
    store.compaction_left = carver.take<std::int64_t>(heads);
    store.pending_counts = carver.take<std::int64_t>(heads);
    if (buffered > 0) {
      store.pending_slots = carver.take<std::int64_t>(heads * buffered);
      store.pending_keys = carver.take<float>(heads * buffered * head_dim);
      store.pending_values = carver.take<float>(heads * buffered * head_dim);
    }
    store.head_dim = head_dim;
    store.stored_rank = r;
    store.slots = slots;
    store.heads = heads;
    store.update_freq = buffered;
    store.fixed_rank = cfg.rank.value_or(0);
    store.energy = cfg.energy;
    store.from_sequence = cfg.source == basis_source::sequence;
    store.pre_rope = cfg.keys == key_space::pre_rope;
    store.rope = cfg.rope;
    return store;
  }

  static void check_head(std::string_view function, const storage<host_space>& store, std::int64_t head) {
    if (head < 0 || head >= store.heads) detail::fail_index(function, "head", head, store.heads);
  }

  /// A head_dim × rank row-major basis as double columns (finite or not: check_basis decides).
  /// A template for set_basis's reason (only TUs that install bases compile it).
  template <class Space>
    requires std::same_as<Space, host_space>
  static Eigen::MatrixXd columns_of(const storage<Space>& store, const float* basis, std::int64_t rank) {
    return Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(basis, store.head_dim,
                                                                                                 rank)
        .cast<double>();
  }

  static void write_basis(const storage<host_space>& store, const Eigen::MatrixXd& basis, float* bases,
                          std::int32_t* ranks, std::int64_t head) {
    float* out = bases + head * store.head_dim * store.stored_rank;
    for (std::int64_t d = 0; d < store.head_dim; ++d)
      for (std::int64_t j = 0; j < store.stored_rank; ++j)
        out[d * store.stored_rank + j] = j < basis.cols() ? static_cast<float>(basis(d, j)) : 0.0f;
    ranks[head] = static_cast<std::int32_t>(basis.cols());
  }

  /// c = Uᵀx for key and value (fp16), zero beyond the head's ranks.
  static void project(const storage<host_space>& store, std::int64_t head, std::int64_t slot, const float* key,
                      const float* value) {
    const auto one = [&](const float* x, const float* bases, std::int64_t rank, half* coefficients) {
      const float* basis = bases + head * store.head_dim * store.stored_rank;
      half* c = coefficients + slot * store.stored_rank;
      for (std::int64_t j = 0; j < store.stored_rank; ++j) {
        float sum = 0.0f;
        for (std::int64_t d = 0; j < rank && d < store.head_dim; ++d) sum += basis[d * store.stored_rank + j] * x[d];
        c[j] = half(sum);
      }
    };
    one(key, store.key_bases, store.key_ranks[head], store.key_coefficients);
    one(value, store.value_bases, store.value_ranks[head], store.value_coefficients);
  }

  static void lift(const storage<host_space>& store, const float* bases, std::int64_t rank, const half* coefficients,
                   std::int64_t head, std::int64_t slot, float* out) {
    const float* basis = bases + head * store.head_dim * store.stored_rank;
    const half* c = coefficients + slot * store.stored_rank;
    for (std::int64_t d = 0; d < store.head_dim; ++d) {
      float sum = 0.0f;
      for (std::int64_t j = 0; j < rank; ++j) sum += basis[d * store.stored_rank + j] * static_cast<float>(c[j]);
      out[d] = sum;
    }
  }

  /// Extends one basis with the principal directions the pending tokens have
  /// outside it, until the target rank (fixed) or energy is reached.
  template <class Space>
  static void extend(const storage<Space>& store, std::int64_t head, const float* pending, float* bases,
                     std::int32_t* ranks) {
    const std::int64_t count = store.pending_counts[head], dim = store.head_dim, r_max = store.stored_rank;
    const std::int64_t rank = ranks[head];
    if (rank >= r_max) return;
    Eigen::MatrixXd rows(count, dim);
    for (std::int64_t i = 0; i < count; ++i)
      for (std::int64_t d = 0; d < dim; ++d) rows(i, d) = pending[i * dim + d];
    Eigen::MatrixXd basis(dim, rank);
    const float* stored = bases + head * dim * r_max;
    for (std::int64_t d = 0; d < dim; ++d)
      for (std::int64_t j = 0; j < rank; ++j) basis(d, j) = stored[d * r_max + j];
    const Eigen::MatrixXd residual = rows - rows * basis * basis.transpose();
    const double total = rows.squaredNorm(), missed = residual.squaredNorm();
    if (total == 0.0 || missed <= total * 1e-12) return;
    Eigen::BDCSVD<Eigen::MatrixXd> svd(residual, Eigen::ComputeThinV);
    const Eigen::VectorXd& singular = svd.singularValues();
    std::int64_t add = 0;
    double still_missed = missed;
    const std::int64_t target = store.fixed_rank > 0 ? store.fixed_rank : r_max;
    while (rank + add < target && add < singular.size() && singular(add) > singular(0) * 1e-7) {
      if (store.fixed_rank == 0 && (total - still_missed) >= store.energy * total) break;
      still_missed -= singular(add) * singular(add);
      ++add;
    }
    if (add == 0) return;
    Eigen::MatrixXd grown(dim, rank + add);
    grown.leftCols(rank) = basis;
    for (std::int64_t j = 0; j < add; ++j) {
      Eigen::VectorXd column = svd.matrixV().col(j);
      for (int pass = 0; pass < 2; ++pass)  // re-orthogonalise against the columns before it
        column -= grown.leftCols(rank + j) * (grown.leftCols(rank + j).transpose() * column);
      grown.col(rank + j) = column.normalized();
    }
    write_basis(store, grown, bases, ranks, head);
  }

  /// Every update_freq appended tokens: grow the bases, re-encode those tokens.
  template <class Space>
  static void refresh(const storage<Space>& store, std::int64_t head) {
    const std::int64_t first = head * store.update_freq;
    extend(store, head, store.pending_keys + first * store.head_dim, store.key_bases, store.key_ranks);
    extend(store, head, store.pending_values + first * store.head_dim, store.value_bases, store.value_ranks);
    for (std::int64_t i = 0; i < store.pending_counts[head]; ++i)
      project(store, head, store.pending_slots[first + i], store.pending_keys + (first + i) * store.head_dim,
              store.pending_values + (first + i) * store.head_dim);
    store.pending_counts[head] = 0;
  }
};

}  // namespace kvtrim::codec
