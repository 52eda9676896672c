// kvtrim/core/stats.hpp — what a cache costs and how faithful it is: memory
// accounting per head, measured reconstruction error, and Ada-KV's attention
// concentration, printable as tables.
//
// Bytes: a codec's cost is bytes_per_token(config, head_dim, slot_run) per
// stored token of one head (codes, per-token scales and zero points, per-run
// key scales and flags amortised over the slot run the storage was bound with)
// plus bytes_per_head(config, head_dim) per head (bases,
// fp16 residual windows and rows, refresh buffers). Per head:
//   bytes_h = kept_h · bytes_per_token + bytes_per_head,
// and the ratio compares Σ bytes_h with fp16 storage of the same tokens
// (kept · 2 · head_dim · 2 bytes). The stats take the layout's view and walk it
// through head_length(b, h) and slot(b, h, i), so they work for every layout.
// Reconstruction error per head (when the original keys/values are given):
//   ‖K̂ − K‖_F / ‖K‖_F  over the tokens the head holds (likewise values),
// K̂ decoded through the codec (for pre-RoPE low rank, pass post-RoPE keys: the
// codec answers with the key attention sees).
// Ada-KV (Feng et al., 2024) concentration of a head: the fraction of its
// tokens needed to hold `mass` (0.9) of its attention, i.e. the smallest k with
// (sum of the k largest weights) ≥ mass · (sum of all weights), divided by T.
// All of this runs on the host (analysis, not a hot path; it allocates).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iomanip>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim {

struct head_stats {
  std::int64_t batch = 0;
  std::int64_t kv_head = 0;
  std::int64_t kept = 0;                                        // tokens the head holds
  double bytes = 0.0;                                           // kept · bytes_per_token + bytes_per_head
  double key_error = std::numeric_limits<double>::quiet_NaN();  // relative, when measured
  double value_error = std::numeric_limits<double>::quiet_NaN();
};

struct cache_stats {
  std::string codec;
  std::int64_t head_dim = 0;
  double bytes_per_token = 0.0;  // per token of one head, per-token parts only
  double bytes_per_head = 0.0;   // per head, fixed parts
  std::vector<head_stats> heads;

  std::int64_t kept() const {
    std::int64_t total = 0;
    for (const auto& head : heads) total += head.kept;
    return total;
  }
  /// Bytes of every head's tokens and state.
  double bytes() const {
    double total = 0.0;
    for (const auto& head : heads) total += head.bytes;
    return total;
  }
  /// The same tokens stored as fp16 keys and values.
  double fp16_bytes() const { return static_cast<double>(kept()) * 2.0 * static_cast<double>(head_dim) * 2.0; }
  /// bytes() / fp16_bytes(): below 1 saves memory.
  double ratio() const { return bytes() / fp16_bytes(); }

  /// One row per head, then the totals.
  std::string table() const {
    std::ostringstream out;
    out << "codec " << codec << ": " << std::fixed << std::setprecision(2) << bytes_per_token
        << " bytes per token per head + " << bytes_per_head << " per head\n";
    out << std::setw(5) << "batch" << std::setw(8) << "kv_head" << std::setw(8) << "kept" << std::setw(14) << "bytes"
        << std::setw(10) << "vs fp16" << std::setw(11) << "key err" << std::setw(11) << "value err"
        << "\n";
    for (const auto& head : heads) {
      const double fp16 = static_cast<double>(head.kept) * 4.0 * static_cast<double>(head_dim);
      out << std::setw(5) << head.batch << std::setw(8) << head.kv_head << std::setw(8) << head.kept << std::setw(14)
          << std::setprecision(0) << head.bytes << std::setw(10) << std::setprecision(3)
          << (fp16 > 0 ? head.bytes / fp16 : 0.0) << std::setw(11) << std::setprecision(4) << head.key_error
          << std::setw(11) << head.value_error << "\n";
    }
    out << std::setw(13) << "total" << std::setw(8) << kept() << std::setw(14) << std::setprecision(0) << bytes()
        << std::setw(10) << std::setprecision(3) << ratio() << "\n";
    return out.str();
  }
  friend std::ostream& operator<<(std::ostream& out, const cache_stats& stats) { return out << stats.table(); }
};

/// Memory accounting of a host cache view stored with `codec_config`.
template <class View>
cache_stats stats(const View& cache, const typename View::codec::config& codec_config) {
  using codec_type = typename View::codec;
  cache_stats result;
  result.codec = std::string(codec_type::name);
  result.head_dim = cache.shape.head_dim;
  result.bytes_per_token =
      codec::bytes_per_token<codec_type>(codec_config, cache.shape.head_dim, cache.storage.slot_run);
  result.bytes_per_head = codec::bytes_per_head<codec_type>(codec_config, cache.shape.head_dim);
  for (std::int64_t b = 0; b < cache.batch; ++b)
    for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) {
      head_stats head;
      head.batch = b;
      head.kv_head = h;
      head.kept = cache.head_length(b, h);
      head.bytes = static_cast<double>(head.kept) * result.bytes_per_token + result.bytes_per_head;
      result.heads.push_back(head);
    }
  return result;
}

/// As above, plus the measured relative reconstruction error of every head
/// against the original keys/values [B, H, T, D]; token_of(b, h, i) names the
/// original token the head's i-th stored token came from (default: i itself).
template <class View, class KeyT>
cache_stats stats(const View& cache, const typename View::codec::config& codec_config, const kv_view<KeyT>& keys,
                  const kv_view<KeyT>& values,
                  const std::function<std::int64_t(std::int64_t, std::int64_t, std::int64_t)>& token_of = {}) {
  using codec_type = typename View::codec;
  cache_stats result = stats(cache, codec_config);
  const std::int64_t head_dim = cache.shape.head_dim;
  std::vector<float> row(static_cast<std::size_t>(head_dim));
  for (auto& head : result.heads) {
    double key_difference = 0.0, key_norm = 0.0, value_difference = 0.0, value_norm = 0.0;
    const std::int64_t flat = head.batch * cache.shape.kv_heads + head.kv_head;
    for (std::int64_t i = 0; i < head.kept; ++i) {
      const std::int64_t token = token_of ? token_of(head.batch, head.kv_head, i) : i;
      if (token < 0 || token >= keys.extent(2))
        detail::fail("kvtrim::stats", "token_of", detail::cat("a token in [0, ", keys.extent(2), ")"),
                     std::to_string(token));
      const std::int64_t slot = cache.slot(head.batch, head.kv_head, i);
      codec_type::load_key(cache.storage, flat, slot, codec::position_of(cache, head.batch, head.kv_head, i),
                           row.data());
      for (std::int64_t d = 0; d < head_dim; ++d) {
        const double want = to_float(keys(head.batch, head.kv_head, token, d));
        key_difference += (row[d] - want) * (row[d] - want);
        key_norm += want * want;
      }
      codec_type::load_value(cache.storage, flat, slot, row.data());
      for (std::int64_t d = 0; d < head_dim; ++d) {
        const double want = to_float(values(head.batch, head.kv_head, token, d));
        value_difference += (row[d] - want) * (row[d] - want);
        value_norm += want * want;
      }
    }
    head.key_error = key_norm > 0 ? std::sqrt(key_difference / key_norm) : std::sqrt(key_difference);
    head.value_error = value_norm > 0 ? std::sqrt(value_difference / value_norm) : std::sqrt(value_difference);
  }
  return result;
}

/// Ada-KV's concentration of one head: the fraction of its `count` tokens whose
/// largest attention weights hold `mass` of the total (weights ≥ 0).
inline double attention_concentration(const float* weights, std::int64_t count, double mass = 0.9) {
  constexpr std::string_view function = "kvtrim::attention_concentration";
  if (!(mass > 0.0 && mass <= 1.0))
    detail::fail(function, "mass", "a fraction in (0, 1] (Ada-KV: 0.9)", detail::cat(mass));
  if (count < 1) detail::fail(function, "count", "at least one token", std::to_string(count));
  std::vector<double> sorted(weights, weights + count);
  for (double w : sorted)
    if (!(w >= 0.0) || !std::isfinite(w))
      detail::fail(function, "weights", "finite non-negative weights", detail::cat(w));
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  double total = 0.0;
  for (double w : sorted) total += w;
  if (total == 0.0) return 1.0;  // no token stands out: all are needed
  double running = 0.0;
  for (std::int64_t k = 0; k < count; ++k) {
    running += sorted[static_cast<std::size_t>(k)];
    if (running >= mass * total * (1.0 - 1e-12)) return static_cast<double>(k + 1) / static_cast<double>(count);
  }
  return 1.0;
}

/// Concentration of every head of an attention-mass tensor [B, H, T] (e.g. the
/// scores of score::attention_mass), flattened b·H + h.
inline std::vector<double> head_concentration(const tensor_view<const float, 3>& attention, double mass = 0.9) {
  detail::check_view("kvtrim::head_concentration", "attention", attention, {-1, -1, -1}, true);
  std::vector<double> result;
  for (std::int64_t b = 0; b < attention.extent(0); ++b)
    for (std::int64_t h = 0; h < attention.extent(1); ++h)
      result.push_back(attention_concentration(&attention(b, h, 0), attention.extent(2), mass));
  return result;
}

}  // namespace kvtrim
