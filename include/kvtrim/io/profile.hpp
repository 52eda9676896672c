// kvtrim/io/profile.hpp — calibration profiles: what offline calibration found
// for one model, saved as a versioned JSON file and loaded by a later run.
//
// A profile holds the model's signature (layers, query heads, kv heads, head
// dimension, RoPE or ALiBi) and, per layer, per kv head: RazorAttention's
// retrieval-head flags (with the echo / induction scores they came from),
// static windows (e.g. ALiBi-derived), fixed budgets (budget::per_head), and
// references to low-rank bases stored elsewhere. retrieval_config, per_head_budget,
// static_window_config and window_budget turn a layer's entry into policy configs. The file format is described
// in docs/profiles.md; in short:
//
//   { "format": "kvtrim.profile", "version": 1,
//     "model": {"layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "positions": "rope"},
//     "calibration": {"method": "razor_attention", "probe": {...}, "induction_fraction": 0.14, ...},
//     "layers": [ {"retrieval_heads": [0, 5], "windows": [...], "budgets": [...],
//                  "echo": [...], "induction": [...], "bases": {"keys": "...", "values": "..."}}, ... ] }
//
// Reading is strict: an unknown key, a wrong type, a head outside [0, kv_heads),
// an array of the wrong length, a wrong format name or version, or a signature
// other than the one the caller expects is a kvtrim::error naming the JSON path
// ("layers[3].retrieval_heads[1]"), what was expected and what came. Profiles
// are read once at start-up, so this is host code that may allocate.
//
// Needs nlohmann-json (kvtrim::kvtrim links nlohmann_json::nlohmann_json when
// CMake finds it). Backends: host only (the data feeds every backend's config).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "kvtrim/budget/per_head.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/score/retrieval_head.hpp"
#include "kvtrim/score/static_window.hpp"

namespace kvtrim::io {

/// How the model encodes positions (ALiBi heads have slope-derived windows).
enum class positions { rope, alibi };

inline std::string_view to_string(positions encoding) { return encoding == positions::rope ? "rope" : "alibi"; }

/// What a profile was calibrated for; a profile only fits a model with the same signature.
struct model_signature {
  std::int64_t layers = 0;
  model_shape shape{};
  positions encoding = positions::rope;

  void validate(std::string_view function) const {
    if (layers < 1) detail::fail(function, "model.layers", "at least one layer", std::to_string(layers));
    shape.validate(function);
  }
  friend bool operator==(const model_signature&, const model_signature&) = default;
};

/// Per kv head data of one layer; every non-empty array has kv_heads entries.
struct layer_profile {
  std::vector<bool> retrieval;         // RazorAttention: true keeps every token (score::retrieval_head)
  std::vector<double> echo;            // the calibration scores behind it (max over the query group)
  std::vector<double> induction;
  std::vector<std::int64_t> windows;   // static window per head (tokens)
  std::vector<std::int64_t> budgets;   // fixed budget per head (tokens; budget::per_head)
  std::string key_basis;               // reference to a low-rank key basis (file / tensor name), empty: none
  std::string value_basis;

  friend bool operator==(const layer_profile&, const layer_profile&) = default;
};

/// How RazorAttention's flags were obtained (recorded for reproducibility).
struct razor_calibration {
  score::retrieval_head::probe_config probe{};
  score::retrieval_head::selection_config selection{};

  friend bool operator==(const razor_calibration& a, const razor_calibration& b) {
    return a.probe.block == b.probe.block && a.probe.repeats == b.probe.repeats &&
           a.probe.first_id == b.probe.first_id && a.probe.end_id == b.probe.end_id &&
           a.probe.bos_id == b.probe.bos_id && a.probe.seed == b.probe.seed &&
           a.selection.induction_fraction == b.selection.induction_fraction &&
           a.selection.echo_fraction == b.selection.echo_fraction;
  }
};

struct profile {
  static constexpr std::string_view format_name = "kvtrim.profile";
  static constexpr std::int64_t format_version = 1;

  model_signature model{};
  std::vector<layer_profile> layers;  // [model.layers]
  std::optional<razor_calibration> razor;

  /// A profile for `model` with one empty layer entry per layer.
  static profile for_model(const model_signature& model) {
    model.validate("kvtrim::io::profile::for_model");
    profile result;
    result.model = model;
    result.layers.resize(static_cast<std::size_t>(model.layers));
    return result;
  }

  /// Stores RazorAttention's scores and the retrieval heads `selection` picks from them.
  void set_retrieval_heads(const score::retrieval_head::head_scores& scores,
                           const score::retrieval_head::selection_config& selection,
                           const score::retrieval_head::probe_config& probe) {
    constexpr std::string_view function = "kvtrim::io::profile::set_retrieval_heads";
    if (scores.layers != model.layers || scores.shape != model.shape)
      detail::fail(function, "scores", detail::cat("scores of ", model.layers, " layers of the profile's model"),
                   detail::cat("scores of ", scores.layers, " layers, ", scores.shape.q_heads, " q heads, ",
                               scores.shape.kv_heads, " kv heads"));
    const std::vector<bool> flags = scores.select(selection);
    const auto kv_heads = static_cast<std::size_t>(model.shape.kv_heads);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      layer_profile& layer = layers[l];
      layer.retrieval.assign(flags.begin() + static_cast<std::ptrdiff_t>(l * kv_heads),
                             flags.begin() + static_cast<std::ptrdiff_t>((l + 1) * kv_heads));
      layer.echo.assign(scores.echo_kv.begin() + static_cast<std::ptrdiff_t>(l * kv_heads),
                        scores.echo_kv.begin() + static_cast<std::ptrdiff_t>((l + 1) * kv_heads));
      layer.induction.assign(scores.induction_kv.begin() + static_cast<std::ptrdiff_t>(l * kv_heads),
                             scores.induction_kv.begin() + static_cast<std::ptrdiff_t>((l + 1) * kv_heads));
    }
    razor = razor_calibration{probe, selection};
  }

  /// score::retrieval_head's config for `layer` (other knobs at their defaults).
  score::retrieval_head::config retrieval_config(std::int64_t layer) const {
    constexpr std::string_view function = "kvtrim::io::profile::retrieval_config";
    if (layer < 0 || layer >= model.layers)
      detail::fail(function, "layer", detail::cat("a layer in [0, ", model.layers, ")"), std::to_string(layer));
    const layer_profile& entry = layers[static_cast<std::size_t>(layer)];
    if (entry.retrieval.empty())
      detail::fail(function, detail::cat("layers[", layer, "].retrieval_heads"),
                   "retrieval-head flags (a RazorAttention calibration)", "none in this profile");
    score::retrieval_head::config cfg;
    cfg.retrieval = entry.retrieval;
    return cfg;
  }

  /// budget::per_head's config for `layer` of a model of `shape` (the engine's): the
  /// layer's calibrated budgets (`layers[layer].budgets`) as a one-layer table
  /// (config.layer = 0), so layers calibrated without budgets elsewhere do not matter.
  /// Throws when the profile is for other heads, the layer does not exist, or it has no budgets.
  budget::per_head::config per_head_budget(const model_shape& shape, std::int64_t layer) const {
    constexpr std::string_view function = "kvtrim::io::profile::per_head_budget";
    const layer_profile& entry = checked_layer(function, shape, layer);
    require(function, layer, "budgets", entry.budgets.size(), "one budget per kv head (budget::per_head)");
    return {.lengths = entry.budgets, .kv_heads = shape.kv_heads, .layer = 0};
  }

  /// score::static_window's config for `layer`: `sinks` sinks and the layer's calibrated
  /// per-head windows (`layers[layer].windows`, e.g. ALiBi-derived). Same errors as per_head_budget.
  score::static_window::config static_window_config(const model_shape& shape, std::int64_t layer,
                                                    std::int64_t sinks = 4) const {
    constexpr std::string_view function = "kvtrim::io::profile::static_window_config";
    const layer_profile& entry = checked_layer(function, shape, layer);
    require(function, layer, "windows", entry.windows.size(), "one window per kv head (score::static_window)");
    score::static_window::config cfg{.sinks = sinks, .windows = entry.windows};
    cfg.validate(function);
    return cfg;
  }

  /// The budget that goes with static_window_config: head h keeps exactly its
  /// sinks + windows[h] tokens (score::static_window::per_head_lengths), as a one-layer table.
  budget::per_head::config window_budget(const model_shape& shape, std::int64_t layer, std::int64_t sinks = 4) const {
    return {.lengths = score::static_window::per_head_lengths(static_window_config(shape, layer, sinks)),
            .kv_heads = shape.kv_heads,
            .layer = 0};
  }

  /// Throws unless the profile is consistent (array lengths, values in range).
  void validate(std::string_view function) const {
    model.validate(function);
    if (static_cast<std::int64_t>(layers.size()) != model.layers)
      detail::fail(function, "layers", detail::cat(model.layers, " layer entries (model.layers)"),
                   std::to_string(layers.size()));
    const auto kv_heads = static_cast<std::size_t>(model.shape.kv_heads);
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const layer_profile& layer = layers[l];
      const auto check_length = [&](std::string_view field, std::size_t size) {
        if (size != 0 && size != kv_heads)
          detail::fail(function, detail::cat("layers[", l, "].", field),
                       detail::cat(kv_heads, " entries (one per kv head) or none"), std::to_string(size));
      };
      check_length("retrieval_heads", layer.retrieval.size());
      check_length("echo", layer.echo.size());
      check_length("induction", layer.induction.size());
      check_length("windows", layer.windows.size());
      check_length("budgets", layer.budgets.size());
      for (std::size_t h = 0; h < layer.windows.size(); ++h)
        if (layer.windows[h] < 1)
          detail::fail(function, detail::cat("layers[", l, "].windows[", h, "]"), "a window of at least 1 token",
                       std::to_string(layer.windows[h]));
      for (std::size_t h = 0; h < layer.budgets.size(); ++h)
        if (layer.budgets[h] < 1)
          detail::fail(function, detail::cat("layers[", l, "].budgets[", h, "]"), "a budget of at least 1 token",
                       std::to_string(layer.budgets[h]));
    }
    if (razor) {
      razor->probe.validate(function);
      razor->selection.validate(function);
    }
  }

  friend bool operator==(const profile&, const profile&) = default;

 private:
  /// The (validated) entry of `layer`, for a model whose heads are `shape`.
  const layer_profile& checked_layer(std::string_view function, const model_shape& shape, std::int64_t layer) const {
    validate(function);
    const auto compare = [&](std::string_view field, std::int64_t want, std::int64_t got) {
      if (want != got)
        detail::fail(function, field, detail::cat(want, " (the model's)"), detail::cat(got, " (the profile's)"));
    };
    compare("model.q_heads", shape.q_heads, model.shape.q_heads);
    compare("model.kv_heads", shape.kv_heads, model.shape.kv_heads);
    compare("model.head_dim", shape.head_dim, model.shape.head_dim);
    if (layer < 0 || layer >= model.layers)
      detail::fail(function, "layer", detail::cat("a layer in [0, ", model.layers, ")"), std::to_string(layer));
    return layers[static_cast<std::size_t>(layer)];
  }
  /// Throws when layers[layer].<field> is empty (validate already checked any other length).
  static void require(std::string_view function, std::int64_t layer, std::string_view field, std::size_t size,
                      std::string_view expected) {
    if (size == 0) detail::fail(function, detail::cat("layers[", layer, "].", field), expected, "none in this profile");
  }
};

}  // namespace kvtrim::io

namespace kvtrim::detail {

using json = nlohmann::json;

inline std::string json_type(const json& value) { return value.type_name(); }

/// Strict reading with error messages that name the JSON path.
class profile_reader {
 public:
  explicit profile_reader(std::string_view function) : function_(function) {}

  const json& object(const json& value, const std::string& path) const {
    if (!value.is_object()) fail(function_, path, "a JSON object", json_type(value));
    return value;
  }
  const json& array(const json& value, const std::string& path) const {
    if (!value.is_array()) fail(function_, path, "a JSON array", json_type(value));
    return value;
  }
  /// Rejects keys other than `allowed` (a typo must not be ignored silently).
  void only_keys(const json& value, const std::string& path, std::initializer_list<std::string_view> allowed) const {
    for (const auto& item : value.items()) {
      bool known = false;
      for (std::string_view key : allowed) known = known || item.key() == key;
      if (!known) {
        std::string list;
        for (std::string_view key : allowed) list += (list.empty() ? "" : ", ") + std::string(key);
        fail(function_, path.empty() ? item.key() : path + "." + item.key(), cat("one of the keys {", list, "}"),
             "an unknown key");
      }
    }
  }
  const json& member(const json& value, const std::string& path, const char* key) const {
    if (!value.contains(key)) fail(function_, path.empty() ? key : path + "." + key, "a value", "nothing (missing)");
    return value.at(key);
  }
  std::int64_t integer(const json& value, const std::string& path, std::int64_t low, std::int64_t high) const {
    if (!value.is_number_integer()) fail(function_, path, "an integer", json_type(value) + " " + value.dump());
    const bool too_big =
        value.is_number_unsigned() && value.get<std::uint64_t>() > static_cast<std::uint64_t>(high);
    const std::int64_t number = too_big ? high : value.get<std::int64_t>();
    if (too_big || number < low || number > high)
      fail(function_, path, cat("an integer in [", low, ", ", high, "]"), value.dump());
    return number;
  }
  double number(const json& value, const std::string& path) const {
    if (!value.is_number()) fail(function_, path, "a number", json_type(value) + " " + value.dump());
    return value.get<double>();
  }
  std::string string(const json& value, const std::string& path) const {
    if (!value.is_string()) fail(function_, path, "a string", json_type(value) + " " + value.dump());
    return value.get<std::string>();
  }

 private:
  std::string_view function_;
};

}  // namespace kvtrim::detail

namespace kvtrim::io {

/// The profile as JSON (validated first).
inline nlohmann::json to_json(const profile& data) {
  data.validate("kvtrim::io::to_json");
  using json = nlohmann::json;
  json out;
  out["format"] = profile::format_name;
  out["version"] = profile::format_version;
  out["model"] = {{"layers", data.model.layers},
                  {"q_heads", data.model.shape.q_heads},
                  {"kv_heads", data.model.shape.kv_heads},
                  {"head_dim", data.model.shape.head_dim},
                  {"positions", to_string(data.model.encoding)}};
  if (data.razor) {
    const auto& probe = data.razor->probe;
    out["calibration"] = {{"method", "razor_attention"},
                          {"probe",
                           {{"block", probe.block},
                            {"repeats", probe.repeats},
                            {"first_id", probe.first_id},
                            {"end_id", probe.end_id},
                            {"bos_id", probe.bos_id},
                            {"seed", probe.seed}}},
                          {"induction_fraction", data.razor->selection.induction_fraction},
                          {"echo_fraction", data.razor->selection.echo_fraction}};
  }
  json layers = json::array();
  for (const layer_profile& layer : data.layers) {
    json entry = json::object();
    if (!layer.retrieval.empty()) {
      json heads = json::array();
      for (std::size_t h = 0; h < layer.retrieval.size(); ++h)
        if (layer.retrieval[h]) heads.push_back(h);
      entry["retrieval_heads"] = heads;
    }
    if (!layer.echo.empty()) entry["echo"] = layer.echo;
    if (!layer.induction.empty()) entry["induction"] = layer.induction;
    if (!layer.windows.empty()) entry["windows"] = layer.windows;
    if (!layer.budgets.empty()) entry["budgets"] = layer.budgets;
    if (!layer.key_basis.empty() || !layer.value_basis.empty()) {
      entry["bases"] = json::object();
      if (!layer.key_basis.empty()) entry["bases"]["keys"] = layer.key_basis;
      if (!layer.value_basis.empty()) entry["bases"]["values"] = layer.value_basis;
    }
    layers.push_back(entry);
  }
  out["layers"] = layers;
  return out;
}

/// Reads a profile from JSON; throws kvtrim::error naming the first thing wrong.
inline profile from_json(const nlohmann::json& in) {
  constexpr std::string_view function = "kvtrim::io::load_profile";
  const detail::profile_reader read(function);
  constexpr std::int64_t int64_max = std::numeric_limits<std::int64_t>::max();
  constexpr std::int64_t int32_max = std::numeric_limits<std::int32_t>::max();
  read.object(in, "(file)");
  read.only_keys(in, "", {"format", "version", "model", "calibration", "layers"});
  const std::string format = read.string(read.member(in, "", "format"), "format");
  if (format != profile::format_name)
    detail::fail(function, "format", detail::cat("\"", profile::format_name, "\""), "\"" + format + "\"");
  const std::int64_t version = read.integer(read.member(in, "", "version"), "version", 0, int64_max);
  if (version != profile::format_version)
    detail::fail(function, "version", detail::cat("format version ", profile::format_version),
                 detail::cat("version ", version));

  profile result;
  const auto& model = read.object(read.member(in, "", "model"), "model");
  read.only_keys(model, "model", {"layers", "q_heads", "kv_heads", "head_dim", "positions"});
  result.model.layers = read.integer(read.member(model, "model", "layers"), "model.layers", 1, int32_max);
  result.model.shape.q_heads = read.integer(read.member(model, "model", "q_heads"), "model.q_heads", 1, int32_max);
  result.model.shape.kv_heads = read.integer(read.member(model, "model", "kv_heads"), "model.kv_heads", 1, int32_max);
  result.model.shape.head_dim = read.integer(read.member(model, "model", "head_dim"), "model.head_dim", 1, int32_max);
  const std::string encoding = read.string(read.member(model, "model", "positions"), "model.positions");
  if (encoding != "rope" && encoding != "alibi")
    detail::fail(function, "model.positions", "\"rope\" or \"alibi\"", "\"" + encoding + "\"");
  result.model.encoding = encoding == "rope" ? positions::rope : positions::alibi;
  result.model.validate(function);

  if (in.contains("calibration")) {
    const auto& calibration = read.object(in.at("calibration"), "calibration");
    read.only_keys(calibration, "calibration", {"method", "probe", "induction_fraction", "echo_fraction"});
    const std::string method = read.string(read.member(calibration, "calibration", "method"), "calibration.method");
    if (method != "razor_attention")
      detail::fail(function, "calibration.method", "\"razor_attention\"", "\"" + method + "\"");
    razor_calibration razor;
    const auto& probe = read.object(read.member(calibration, "calibration", "probe"), "calibration.probe");
    read.only_keys(probe, "calibration.probe", {"block", "repeats", "first_id", "end_id", "bos_id", "seed"});
    const auto probe_int = [&](const char* key, std::int64_t high) {
      return read.integer(read.member(probe, "calibration.probe", key), std::string("calibration.probe.") + key, 0,
                          high);
    };
    razor.probe.block = probe_int("block", int32_max);
    razor.probe.repeats = probe_int("repeats", int32_max);
    razor.probe.first_id = static_cast<std::int32_t>(probe_int("first_id", int32_max));
    razor.probe.end_id = static_cast<std::int32_t>(probe_int("end_id", int32_max));
    razor.probe.bos_id = static_cast<std::int32_t>(probe_int("bos_id", int32_max));
    const auto& seed = read.member(probe, "calibration.probe", "seed");
    if (!seed.is_number_unsigned() && !(seed.is_number_integer() && seed.get<std::int64_t>() >= 0))
      detail::fail(function, "calibration.probe.seed", "a non-negative integer", seed.dump());
    razor.probe.seed = seed.get<std::uint64_t>();
    razor.selection.induction_fraction = read.number(
        read.member(calibration, "calibration", "induction_fraction"), "calibration.induction_fraction");
    razor.selection.echo_fraction =
        read.number(read.member(calibration, "calibration", "echo_fraction"), "calibration.echo_fraction");
    result.razor = razor;
  }

  const auto& layers = read.array(read.member(in, "", "layers"), "layers");
  if (static_cast<std::int64_t>(layers.size()) != result.model.layers)
    detail::fail(function, "layers", detail::cat(result.model.layers, " entries (model.layers)"),
                 detail::cat(layers.size(), " entries"));
  const std::int64_t kv_heads = result.model.shape.kv_heads;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const std::string path = detail::cat("layers[", l, "]");
    const auto& entry = read.object(layers[l], path);
    read.only_keys(entry, path, {"retrieval_heads", "echo", "induction", "windows", "budgets", "bases"});
    layer_profile layer;
    const auto per_head = [&](const char* key, auto&& convert, auto& out) {
      if (!entry.contains(key)) return;
      const std::string field = path + "." + key;
      const auto& values = read.array(entry.at(key), field);
      if (static_cast<std::int64_t>(values.size()) != kv_heads)
        detail::fail(function, field, detail::cat(kv_heads, " entries (one per kv head)"),
                     detail::cat(values.size(), " entries"));
      for (std::size_t h = 0; h < values.size(); ++h) out.push_back(convert(values[h], detail::cat(field, "[", h, "]")));
    };
    if (entry.contains("retrieval_heads")) {
      const std::string field = path + ".retrieval_heads";
      const auto& heads = read.array(entry.at("retrieval_heads"), field);
      layer.retrieval.assign(static_cast<std::size_t>(kv_heads), false);
      for (std::size_t k = 0; k < heads.size(); ++k) {
        const std::string item = detail::cat(field, "[", k, "]");
        if (!heads[k].is_number_integer())
          detail::fail(function, item, "a kv head index (an integer)", heads[k].dump());
        const bool known = heads[k].is_number_unsigned() ? heads[k].get<std::uint64_t>() < static_cast<std::uint64_t>(kv_heads)
                                                         : heads[k].get<std::int64_t>() >= 0 &&
                                                               heads[k].get<std::int64_t>() < kv_heads;
        if (!known)
          detail::fail(function, item, detail::cat("a kv head in [0, ", kv_heads, ")"),
                       detail::cat("unknown head ", heads[k].dump()));
        const auto head = static_cast<std::size_t>(heads[k].get<std::int64_t>());
        if (layer.retrieval[head])
          detail::fail(function, item, "each head listed once", detail::cat("head ", head, " again"));
        layer.retrieval[head] = true;
      }
    }
    const auto as_number = [&](const nlohmann::json& value, const std::string& at) { return read.number(value, at); };
    const auto as_tokens = [&](const nlohmann::json& value, const std::string& at) {
      return read.integer(value, at, 1, int64_max);
    };
    per_head("echo", as_number, layer.echo);
    per_head("induction", as_number, layer.induction);
    per_head("windows", as_tokens, layer.windows);
    per_head("budgets", as_tokens, layer.budgets);
    if (entry.contains("bases")) {
      const auto& bases = read.object(entry.at("bases"), path + ".bases");
      read.only_keys(bases, path + ".bases", {"keys", "values"});
      if (bases.contains("keys")) layer.key_basis = read.string(bases.at("keys"), path + ".bases.keys");
      if (bases.contains("values")) layer.value_basis = read.string(bases.at("values"), path + ".bases.values");
    }
    result.layers.push_back(std::move(layer));
  }
  result.validate(function);
  return result;
}

/// Parses profile text (the contents of a profile file).
inline profile parse_profile(std::string_view text) {
  nlohmann::json in;
  try {
    in = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& failure) {
    detail::fail("kvtrim::io::load_profile", "(file)", "well-formed JSON", failure.what());
  }
  return from_json(in);
}

/// Throws unless the profile was calibrated for `expected`, naming the first field that differs.
inline void check_signature(const profile& data, const model_signature& expected) {
  constexpr std::string_view function = "kvtrim::io::check_signature";
  const auto compare = [&](std::string_view field, std::int64_t want, std::int64_t got) {
    if (want != got)
      detail::fail(function, field, detail::cat(want, " (the model's)"), detail::cat(got, " (the profile's)"));
  };
  compare("model.layers", expected.layers, data.model.layers);
  compare("model.q_heads", expected.shape.q_heads, data.model.shape.q_heads);
  compare("model.kv_heads", expected.shape.kv_heads, data.model.shape.kv_heads);
  compare("model.head_dim", expected.shape.head_dim, data.model.shape.head_dim);
  if (expected.encoding != data.model.encoding)
    detail::fail(function, "model.positions", detail::cat("\"", to_string(expected.encoding), "\" (the model's)"),
                 detail::cat("\"", to_string(data.model.encoding), "\" (the profile's)"));
}

/// Reads a profile file.
inline profile load_profile(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) detail::fail("kvtrim::io::load_profile", "path", "a readable file", path.string());
  std::ostringstream text;
  text << file.rdbuf();
  return parse_profile(text.str());
}

/// Reads a profile file and checks it was calibrated for `expected`.
inline profile load_profile(const std::filesystem::path& path, const model_signature& expected) {
  profile result = load_profile(path);
  check_signature(result, expected);
  return result;
}

/// Writes `data` to `path` (pretty-printed, two-space indent).
inline void save_profile(const profile& data, const std::filesystem::path& path) {
  const std::string text = to_json(data).dump(2) + "\n";
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) detail::fail("kvtrim::io::save_profile", "path", "a writable file", path.string());
  file << text;
  if (!file) detail::fail_call("kvtrim::io::save_profile", "writing " + path.string(), "the stream failed");
}

}  // namespace kvtrim::io
