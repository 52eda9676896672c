// kvtrim/io/low_rank_profile.hpp — offline-calibrated low-rank bases, saved as
// a versioned JSON profile and installed into codec::low_rank storage.
//
// Calibration (basis_source::profile): per (layer, kv head), the SVD of sample
// keys (and separately values) captured from a few prompts — all B·T sample
// tokens of that kv head stacked — gives the basis; the rank is the config's
// fixed rank or the smallest reaching its energy (≤ its max_rank), exactly as
// the sequence bases are fitted at compaction (codec::low_rank::fit_basis).
// Pre-RoPE profiles are calibrated from pre-RoPE keys and only load into a
// pre_rope codec (and post into post).
//
// File: {"format": "kvtrim.low_rank_profile", "version": 1, "layers",
// "kv_heads", "head_dim", "keys": "post_rope"|"pre_rope", "bases": [{"layer",
// "kv_head", "key_rank", "key_basis": [head_dim·key_rank floats, row-major],
// "value_rank", "value_basis": [...]}]}. A wrong version, shape, or rank is a
// kvtrim::error.
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtrim/codec/low_rank.hpp"
#include "kvtrim/codec/rank_analysis.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim::io {

struct low_rank_profile {
  static constexpr int version = 1;
  static constexpr std::string_view format = "kvtrim.low_rank_profile";

  struct head_basis {
    std::int64_t key_rank = 0;
    std::vector<float> key_basis;  // head_dim × key_rank, row-major
    std::int64_t value_rank = 0;
    std::vector<float> value_basis;
  };

  std::int64_t layers = 0;
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
  codec::key_space keys = codec::key_space::post_rope;
  std::vector<head_basis> bases;  // [layer · kv_heads + kv_head]

  static low_rank_profile empty(std::int64_t layers, std::int64_t kv_heads, std::int64_t head_dim,
                                codec::key_space keys = codec::key_space::post_rope) {
    low_rank_profile profile;
    profile.layers = layers;
    profile.kv_heads = kv_heads;
    profile.head_dim = head_dim;
    profile.keys = keys;
    profile.check("kvtrim::io::low_rank_profile::empty", false);
    profile.bases.resize(static_cast<std::size_t>(layers * kv_heads));
    return profile;
  }

  head_basis& at(std::int64_t layer, std::int64_t kv_head) {
    return bases[static_cast<std::size_t>(index("kvtrim::io::low_rank_profile::at", layer, kv_head))];
  }
  const head_basis& at(std::int64_t layer, std::int64_t kv_head) const {
    return bases[static_cast<std::size_t>(index("kvtrim::io::low_rank_profile::at", layer, kv_head))];
  }

  /// Fits layer `layer`'s bases from sample keys/values [B, kv_heads, T,
  /// head_dim].
  template <class T>
  void calibrate_layer(std::int64_t layer, const kv_view<T>& sample_keys, const kv_view<T>& sample_values,
                       const codec::low_rank::config& cfg) {
    constexpr std::string_view function = "kvtrim::io::low_rank_profile::calibrate_layer";
    cfg.validate(function, head_dim);
    detail::check_view(function, "sample_keys", sample_keys, {-1, kv_heads, -1, head_dim});
    detail::check_view(function, "sample_values", sample_values, sample_keys.extents);
    const std::int64_t batch = sample_keys.extent(0), tokens = sample_keys.extent(2);
    if (batch * tokens < 1) detail::fail(function, "sample_keys", "at least one sample token", "none");
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      Eigen::MatrixXd keys_rows(batch * tokens, head_dim), values_rows(batch * tokens, head_dim);
      for (std::int64_t b = 0; b < batch; ++b) {
        keys_rows.middleRows(b * tokens, tokens) = analysis::head_matrix(sample_keys, b, h);
        values_rows.middleRows(b * tokens, tokens) = analysis::head_matrix(sample_values, b, h);
      }
      const std::int64_t fixed = cfg.rank.value_or(0), stored = cfg.stored_rank(head_dim);
      head_basis& basis = at(layer, h);
      store(codec::low_rank::fit_basis(keys_rows, fixed, cfg.energy, stored), basis.key_rank, basis.key_basis);
      store(codec::low_rank::fit_basis(values_rows, fixed, cfg.energy, stored), basis.value_rank, basis.value_basis);
    }
  }

  nlohmann::json to_json() const {
    nlohmann::json out = {
        {"format", format},     {"version", version},
        {"layers", layers},     {"kv_heads", kv_heads},
        {"head_dim", head_dim}, {"keys", keys == codec::key_space::pre_rope ? "pre_rope" : "post_rope"}};
    out["bases"] = nlohmann::json::array();
    for (std::int64_t layer = 0; layer < layers; ++layer)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const head_basis& basis = at(layer, h);
        out["bases"].push_back({{"layer", layer},
                                {"kv_head", h},
                                {"key_rank", basis.key_rank},
                                {"key_basis", basis.key_basis},
                                {"value_rank", basis.value_rank},
                                {"value_basis", basis.value_basis}});
      }
    return out;
  }

  static low_rank_profile from_json(const nlohmann::json& in) {
    constexpr std::string_view function = "kvtrim::io::low_rank_profile::from_json";
    try {
      if (in.at("format").get<std::string>() != format)
        detail::fail(function, "format", std::string(format), in.at("format").dump());
      if (in.at("version").get<int>() != version)
        detail::fail(function, "version", std::to_string(version), in.at("version").dump());
      const std::string keys_name = in.at("keys").get<std::string>();
      if (keys_name != "pre_rope" && keys_name != "post_rope")
        detail::fail(function, "keys", "\"pre_rope\" or \"post_rope\"", keys_name);
      low_rank_profile profile =
          empty(in.at("layers").get<std::int64_t>(), in.at("kv_heads").get<std::int64_t>(),
                in.at("head_dim").get<std::int64_t>(),
                keys_name == "pre_rope" ? codec::key_space::pre_rope : codec::key_space::post_rope);
      const auto& entries = in.at("bases");
      if (static_cast<std::int64_t>(entries.size()) != profile.layers * profile.kv_heads)
        detail::fail(function, "bases", detail::cat(profile.layers * profile.kv_heads, " entries (layers × kv_heads)"),
                     std::to_string(entries.size()));
      for (const auto& entry : entries) {
        head_basis& basis = profile.at(entry.at("layer").get<std::int64_t>(), entry.at("kv_head").get<std::int64_t>());
        basis.key_rank = entry.at("key_rank").get<std::int64_t>();
        basis.key_basis = entry.at("key_basis").get<std::vector<float>>();
        basis.value_rank = entry.at("value_rank").get<std::int64_t>();
        basis.value_basis = entry.at("value_basis").get<std::vector<float>>();
      }
      profile.check(function, true);
      return profile;
    } catch (const nlohmann::json::exception& e) {
      detail::fail(function, "profile", "a kvtrim low-rank profile (JSON)", e.what());
    }
  }

  void save(const std::string& path) const {
    std::ofstream out(path);
    if (!out) detail::fail_call("kvtrim::io::low_rank_profile::save", "open " + path, "cannot write");
    out << to_json().dump();
  }
  static low_rank_profile load(const std::string& path) {
    std::ifstream in(path);
    if (!in) detail::fail_call("kvtrim::io::low_rank_profile::load", "open " + path, "cannot read");
    nlohmann::json parsed;
    try {
      in >> parsed;
    } catch (const nlohmann::json::exception& e) {
      detail::fail("kvtrim::io::low_rank_profile::load", "file", "valid JSON", e.what());
    }
    return from_json(parsed);
  }

  /// Throws unless sizes are sane (and, with bases, every basis has its rank's
  /// shape).
  void check(std::string_view function, bool with_bases) const {
    if (layers < 1) detail::fail(function, "layers", "at least one layer", std::to_string(layers));
    if (kv_heads < 1) detail::fail(function, "kv_heads", "at least one kv head", std::to_string(kv_heads));
    if (head_dim < 1 || head_dim > max_head_dim)
      detail::fail(function, "head_dim", detail::cat("a head dimension in [1, ", max_head_dim, "]"),
                   std::to_string(head_dim));
    if (!with_bases) return;
    for (std::int64_t layer = 0; layer < layers; ++layer)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const head_basis& basis = at(layer, h);
        const auto shape_ok = [&](std::int64_t rank, const std::vector<float>& columns) {
          return rank >= 1 && rank <= head_dim && static_cast<std::int64_t>(columns.size()) == head_dim * rank;
        };
        if (!shape_ok(basis.key_rank, basis.key_basis) || !shape_ok(basis.value_rank, basis.value_basis))
          detail::fail(function, detail::cat("bases[layer ", layer, ", kv_head ", h, "]"),
                       detail::cat("ranks in [1, head_dim = ", head_dim, "] with head_dim × rank entries"),
                       detail::cat("key rank ", basis.key_rank, " with ", basis.key_basis.size(),
                                   " entries, value rank ", basis.value_rank, " with ", basis.value_basis.size()));
      }
  }

 private:
  std::int64_t index(std::string_view function, std::int64_t layer, std::int64_t kv_head) const {
    if (layer < 0 || layer >= layers)
      detail::fail(function, "layer", detail::cat("a layer in [0, ", layers, ")"), std::to_string(layer));
    if (kv_head < 0 || kv_head >= kv_heads)
      detail::fail(function, "kv_head", detail::cat("a kv head in [0, ", kv_heads, ")"), std::to_string(kv_head));
    return layer * kv_heads + kv_head;
  }

  static void store(const Eigen::MatrixXd& basis, std::int64_t& rank, std::vector<float>& columns) {
    rank = basis.cols();
    columns.resize(static_cast<std::size_t>(basis.rows() * basis.cols()));
    for (Eigen::Index d = 0; d < basis.rows(); ++d)
      for (Eigen::Index j = 0; j < basis.cols(); ++j)
        columns[static_cast<std::size_t>(d * basis.cols() + j)] = static_cast<float>(basis(d, j));
  }
};

/// Installs layer `layer`'s calibrated bases into every head (b, h) of a
/// low_rank storage bound for `batch` sequences (flattened head b·kv_heads +
/// h). A template (host storage only) so that a translation unit that includes
/// this header without calling it does not compile set_basis's GEMM check.
template <class Space>
void load_profile(const codec::low_rank::storage<Space>& store, const low_rank_profile& profile, std::int64_t layer,
                  std::int64_t batch) {
  static_assert(std::is_same_v<Space, host_space>, "kvtrim::io::load_profile: bases are installed on the host");
  constexpr std::string_view function = "kvtrim::io::load_profile";
  profile.check(function, true);
  if (profile.head_dim != store.head_dim)
    detail::fail(function, "profile.head_dim", detail::cat("the cache's head_dim = ", store.head_dim),
                 std::to_string(profile.head_dim));
  if (batch * profile.kv_heads != store.heads)
    detail::fail(function, "profile.kv_heads", detail::cat("the cache's heads / batch = ", store.heads, " / ", batch),
                 std::to_string(profile.kv_heads));
  if ((profile.keys == codec::key_space::pre_rope) != store.pre_rope)
    detail::fail(function, "profile.keys", store.pre_rope ? "pre_rope bases" : "post_rope bases",
                 profile.keys == codec::key_space::pre_rope ? "pre_rope" : "post_rope");
  // Every head's bases checked before the first is installed: a refused call leaves the storage as it was.
  for (std::int64_t h = 0; h < profile.kv_heads; ++h) {
    const auto& basis = profile.at(layer, h);
    codec::low_rank::check_basis(function, detail::cat("profile.key_basis (layer ", layer, ", kv head ", h, ")"), store,
                                 basis.key_basis.data(), basis.key_rank);
    codec::low_rank::check_basis(function, detail::cat("profile.value_basis (layer ", layer, ", kv head ", h, ")"),
                                 store, basis.value_basis.data(), basis.value_rank);
  }
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < profile.kv_heads; ++h) {
      const auto& basis = profile.at(layer, h);
      codec::low_rank::set_basis(store, b * profile.kv_heads + h, basis.key_basis.data(), basis.key_rank,
                                 basis.value_basis.data(), basis.value_rank);
    }
}

}  // namespace kvtrim::io
