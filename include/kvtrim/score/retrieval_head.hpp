// kvtrim/score/retrieval_head.hpp — RazorAttention: retrieval heads keep every
// token, the others keep sinks + a recent window + one compensation token.
//
// Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval
// Heads" (ICLR 2025; Huawei, shipped in Ascend MindIE / msmodelslim). Offline,
// once per model:
//  1. Probe: BOS followed by N random token ids repeated R times
//     (make_probe; N = 2500, R = 4, ids drawn without replacement from
//     [10000, 12500) as msmodelslim does). The engine runs it and hands kvtrim the
//     attention probabilities A[p, j] of every (layer, query head).
//  2. Scores (calibration): for every position p in repeats 1..R−1 the earlier
//     copies of its token sit at p − kN, k = 1..r(p):
//       echo(p)      = Σ_k A[p, p − kN]        (attends to the same token before)
//       induction(p) = Σ_k A[p, p − kN + 1]    (attends to the token that followed it)
//     averaged over those N(R−1) positions; a kv head scores the max over its
//     query group.
//  3. Selection: retrieval heads = the top 14% of all (layer, kv head) pairs by
//     induction ∪ the top 1% by echo (msmodelslim's induction_head_ratio /
//     echo_head_ratio); a fraction f of n heads is ⌈f·n⌉ heads (at least one for
//     any f > 0), ties to the lower (layer, head).
// Online, at prefill, for each layer (this scorer in a scheme):
//  4. A retrieval head keeps all T tokens. Any other head keeps S sinks, the
//     recent W = max(W_min, ⌊ρ·T⌋) tokens and one compensation token at index S
//     whose key and value are the means of the N_d = T − S − W dropped keys and
//     values and whose logit gets + ln N_d, added after the 1/√D scale:
//     exp(q·k̂/√D + ln N_d) = N_d·exp(q·k̂/√D), the weight of N_d copies of the mean
//     (ATB adds it before the scale, which weighs only N_d^{1/√D} copies). A head
//     is compressed only when T − S − W − 1 > 0, i.e. when at least two tokens
//     would be dropped; otherwise it keeps everything.
//
// In a scheme: the scorer sets the keep counts itself (sets_keep_counts; use
// budget::by_scorer) and writes the compensation tokens after compaction
// (compensates; use a layout that stores them: layout::paged or layout::flat).
// Its scores are those of static_window with S + 1 sinks — the placeholder at
// index S is kept by the selection, then overwritten with the mean token.
//
// Defaults: S = 4 sinks (40 for 70B models in the paper), W_min = 4000,
// ρ = 1/5, compensation on; probe N = 2500, R = 4, ids [10000, 12500);
// fractions 14% induction, 1% echo.
// Backends: cpu, cuda (compression); calibration is host code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/score/static_window.hpp"

namespace kvtrim::score {

struct retrieval_head {
  static constexpr std::string_view name = "score::retrieval_head";
  static constexpr bool needs_queries = false;
  static constexpr bool ragged_heads = true;
  /// scheme takes the keep counts from this scorer (with budget::by_scorer) ...
  static constexpr bool sets_keep_counts = true;
  /// ... and hands compaction a compensation token per compressed head.
  static constexpr bool compensates = true;
  static constexpr std::int64_t max_tokens = static_window::max_tokens;

  /// Compression knobs for one layer.
  struct config {
    /// One flag per kv head of the layer being compressed: true keeps every token
    /// (from a calibration profile: io::profile::layers[l].retrieval).
    std::vector<bool> retrieval;
    std::int64_t sinks = 4;
    std::int64_t min_recent = 4000;
    double recent_fraction = 0.2;
    bool compensation = true;

    void validate(std::string_view function) const {
      if (sinks < 0) detail::fail(function, "config.score.sinks", "a non-negative sink count", std::to_string(sinks));
      if (min_recent < 1)
        detail::fail(function, "config.score.min_recent", "a recent window of at least one token",
                     std::to_string(min_recent));
      if (!(recent_fraction >= 0.0 && recent_fraction <= 1.0))
        detail::fail(function, "config.score.recent_fraction", "a fraction in [0, 1]", std::to_string(recent_fraction));
    }
  };

  /// W = max(W_min, ⌊ρ·T⌋).
  static std::int64_t recent_window(const config& cfg, std::int64_t tokens) {
    const auto fraction = static_cast<std::int64_t>(std::floor(cfg.recent_fraction * static_cast<double>(tokens)));
    return std::min(tokens, std::max(cfg.min_recent, fraction));  // a window of INT64_MAX means "all"
  }
  /// Tokens a non-retrieval head drops (N_d), 0 when it is left whole (T − S − W − 1 ≤ 0).
  static std::int64_t dropped(const config& cfg, std::int64_t tokens) {
    const std::int64_t drop = tokens - std::min(tokens, cfg.sinks) - recent_window(cfg, tokens);
    return drop - 1 > 0 ? drop : 0;
  }
  /// Tokens kv head h keeps out of `tokens` (scheme::plan_capacity).
  static std::int64_t head_keep(const config& cfg, const model_shape& shape, std::int64_t h, std::int64_t tokens) {
    cfg.validate("kvtrim::score::retrieval_head");
    if (static_cast<std::int64_t>(cfg.retrieval.size()) != shape.kv_heads)
      detail::fail("kvtrim::score::retrieval_head", "config.score.retrieval",
                   detail::cat("one retrieval flag per kv head (", shape.kv_heads, ")"),
                   detail::cat(cfg.retrieval.size(), " flags"));
    return keep_count(cfg, cfg.retrieval[static_cast<std::size_t>(h)], tokens);
  }
  /// Tokens head `h` keeps out of `tokens`.
  static std::int64_t keep_count(const config& cfg, bool retrieval, std::int64_t tokens) {
    const std::int64_t drop = retrieval ? 0 : dropped(cfg, tokens);
    if (drop == 0) return tokens;
    return cfg.sinks + recent_window(cfg, tokens) + (cfg.compensation ? 1 : 0);
  }
  /// Score of token `index`: sinks (and the compensation placeholder at S) first, then newest first.
  KVTRIM_HOST_DEVICE static constexpr float score(std::int64_t sinks, bool compensation, std::int64_t index) {
    return static_window::score(sinks + (compensation ? 1 : 0), index);
  }

  // ---- calibration (offline, host) -----------------------------------------

  /// The probe sequence: BOS, then `block` random ids repeated `repeats` times.
  struct probe_config {
    std::int64_t block = 2500;      // N
    std::int64_t repeats = 4;       // R
    std::int32_t first_id = 10000;  // ids come from [first_id, end_id)
    std::int32_t end_id = 12500;
    std::int32_t bos_id = 1;        // the model's BOS token (1 for Llama-2, 128000 for Llama-3)
    std::uint64_t seed = 0;

    /// 1 + N·R.
    std::int64_t length() const { return 1 + block * repeats; }

    void validate(std::string_view function) const {
      if (block < 2)
        detail::fail(function, "probe.block", "at least 2 random tokens per block (induction reads p − N + 1 < p)",
                     std::to_string(block));
      if (repeats < 2)
        detail::fail(function, "probe.repeats", "at least 2 repeats (scores read earlier copies)",
                     std::to_string(repeats));
      if (end_id <= first_id || end_id - std::int64_t{first_id} < block)
        detail::fail(function, "probe.end_id",
                     detail::cat("an id range [first_id, end_id) of at least block = ", block,
                                 " ids (ids are drawn without replacement)"),
                     detail::cat("[", first_id, ", ", end_id, ")"));
      if (first_id < 0) detail::fail(function, "probe.first_id", "a non-negative token id", std::to_string(first_id));
    }
  };

  /// BOS + N distinct random ids (a partial Fisher–Yates shuffle of the id
  /// range, driven by mt19937_64 with an explicit rejection draw so every
  /// platform gives the same probe for a seed), repeated R times.
  static std::vector<std::int32_t> make_probe(const probe_config& probe) {
    probe.validate("kvtrim::score::retrieval_head::make_probe");
    std::vector<std::int32_t> ids(static_cast<std::size_t>(probe.end_id - probe.first_id));
    std::iota(ids.begin(), ids.end(), probe.first_id);
    std::mt19937_64 random(probe.seed);
    const auto draw_below = [&](std::uint64_t bound) {  // uniform in [0, bound)
      const std::uint64_t limit = std::mt19937_64::max() - std::mt19937_64::max() % bound;
      std::uint64_t value = random();
      while (value >= limit) value = random();
      return value % bound;
    };
    for (std::size_t i = 0; i < static_cast<std::size_t>(probe.block); ++i)
      std::swap(ids[i], ids[i + draw_below(ids.size() - i)]);
    std::vector<std::int32_t> sequence;
    sequence.reserve(static_cast<std::size_t>(probe.length()));
    sequence.push_back(probe.bos_id);
    for (std::int64_t r = 0; r < probe.repeats; ++r)
      sequence.insert(sequence.end(), ids.begin(), ids.begin() + probe.block);
    return sequence;
  }

  /// Which fractions of all (layer, kv head) pairs count as retrieval heads.
  struct selection_config {
    double induction_fraction = 0.14;
    double echo_fraction = 0.01;

    void validate(std::string_view function) const {
      if (!(induction_fraction >= 0.0 && induction_fraction <= 1.0))
        detail::fail(function, "selection.induction_fraction", "a fraction in [0, 1]",
                     std::to_string(induction_fraction));
      if (!(echo_fraction >= 0.0 && echo_fraction <= 1.0))
        detail::fail(function, "selection.echo_fraction", "a fraction in [0, 1]", std::to_string(echo_fraction));
    }
  };

  /// ⌈f·n⌉, where f·n within 1e-9 of an integer counts as that integer (0.14·100
  /// is 14.000000000000002 in double, and means 14 heads).
  static std::int64_t head_count(double fraction, std::int64_t heads) {
    const double exact = fraction * static_cast<double>(heads);
    const double nearest = std::round(exact);
    const double count = std::abs(exact - nearest) <= 1e-9 * std::max(1.0, exact) ? nearest : std::ceil(exact);
    return std::min<std::int64_t>(heads, static_cast<std::int64_t>(count));
  }

  /// Echo and induction scores, per (layer, query head) and per (layer, kv head).
  struct head_scores {
    std::int64_t layers = 0;
    model_shape shape{};
    std::vector<double> echo_q, induction_q;    // [layers · q_heads]
    std::vector<double> echo_kv, induction_kv;  // [layers · kv_heads]: max over the query group

    /// Retrieval flags [layers · kv_heads]: top induction ∪ top echo.
    std::vector<bool> select(const selection_config& selection) const {
      selection.validate("kvtrim::score::retrieval_head::head_scores::select");
      const auto heads = static_cast<std::int64_t>(echo_kv.size());
      std::vector<bool> flags(echo_kv.size(), false);
      const auto mark_top = [&](const std::vector<double>& scores, double fraction) {
        std::vector<std::int64_t> order(scores.size());
        std::iota(order.begin(), order.end(), std::int64_t{0});
        std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
          return scores[static_cast<std::size_t>(a)] > scores[static_cast<std::size_t>(b)];
        });
        for (std::int64_t k = 0; k < head_count(fraction, heads); ++k) flags[static_cast<std::size_t>(order[k])] = true;
      };
      mark_top(induction_kv, selection.induction_fraction);
      mark_top(echo_kv, selection.echo_fraction);
      return flags;
    }
  };

  /// Accumulates echo and induction evidence from the attention the engine
  /// captured on the probe, a block of query rows at a time (a full L×L map per
  /// head need never exist at once). Host code, allocates once at construction.
  class calibration {
   public:
    calibration(std::int64_t layers, const model_shape& shape, const probe_config& probe)
        : layers_(layers), shape_(shape), probe_(probe) {
      constexpr std::string_view function = "kvtrim::score::retrieval_head::calibration";
      shape.validate(function);
      probe.validate(function);
      if (layers < 1) detail::fail(function, "layers", "at least one layer", std::to_string(layers));
      const auto per_layer = static_cast<std::size_t>(shape.q_heads);
      echo_sum_.assign(static_cast<std::size_t>(layers) * per_layer, 0.0);
      induction_sum_.assign(echo_sum_.size(), 0.0);
      seen_.assign(static_cast<std::size_t>(layers * scored_rows()), false);
      rows_seen_.assign(static_cast<std::size_t>(layers), 0);
    }

    const probe_config& probe() const { return probe_; }
    /// Positions that are scored: p ∈ [1 + N, L), N(R − 1) of them.
    std::int64_t scored_rows() const { return probe_.block * (probe_.repeats - 1); }

    /// Adds rows [first_row, first_row + rows) of layer `layer`'s attention
    /// probabilities, `attention` = [q_heads, rows, L] (row p over keys 0..L−1,
    /// causal: only keys ≤ p are read). Rows before 1 + N carry no evidence and
    /// are skipped; a scored row given twice is an error.
    template <Element T>
    void accumulate(std::int64_t layer, const tensor_view<const T, 3>& attention, std::int64_t first_row) {
      constexpr std::string_view function = "kvtrim::score::retrieval_head::calibration::accumulate";
      const std::int64_t length = probe_.length(), block = probe_.block;
      if (layer < 0 || layer >= layers_)
        detail::fail(function, "layer", detail::cat("a layer in [0, ", layers_, ")"), std::to_string(layer));
      detail::check_view(function, "attention", attention, {shape_.q_heads, -1, length});
      const std::int64_t rows = attention.extent(1);
      if (first_row < 0 || first_row + rows > length)
        detail::fail(function, "first_row", detail::cat("rows inside the probe [0, ", length, ")"),
                     detail::cat("rows [", first_row, ", ", first_row + rows, ")"));
      for (std::int64_t row = 0; row < rows; ++row) {
        const std::int64_t p = first_row + row;
        if (p < 1 + block) continue;
        const auto seen = static_cast<std::size_t>(layer * scored_rows() + (p - 1 - block));
        if (seen_[seen])
          detail::fail(function, "first_row", detail::cat("each probe row once per layer"),
                       detail::cat("row ", p, " of layer ", layer, " a second time"));
        seen_[seen] = true;
        ++rows_seen_[static_cast<std::size_t>(layer)];
        const std::int64_t copies = (p - 1) / block;  // earlier copies of p's token
        for (std::int64_t j = 0; j < shape_.q_heads; ++j) {
          double echo = 0.0, induction = 0.0;
          for (std::int64_t k = 1; k <= copies; ++k) {
            echo += static_cast<double>(to_float(attention(j, row, p - k * block)));
            induction += static_cast<double>(to_float(attention(j, row, p - k * block + 1)));
          }
          if (!std::isfinite(echo) || !std::isfinite(induction))
            detail::fail(function, "attention", "finite probabilities",
                         detail::cat("a NaN or infinity in row ", p, ", query head ", j, " of layer ", layer));
          const auto index = static_cast<std::size_t>(layer * shape_.q_heads + j);
          echo_sum_[index] += echo;
          induction_sum_[index] += induction;
        }
      }
    }

    /// The scores, once every scored row of every layer has been added.
    head_scores scores() const {
      for (std::int64_t layer = 0; layer < layers_; ++layer)
        if (rows_seen_[static_cast<std::size_t>(layer)] != scored_rows())
          detail::fail("kvtrim::score::retrieval_head::calibration::scores", "attention",
                       detail::cat("all ", scored_rows(), " scored probe rows [", 1 + probe_.block, ", ",
                                   probe_.length(), ") of layer ", layer),
                       detail::cat(rows_seen_[static_cast<std::size_t>(layer)], " rows"));
      head_scores result;
      result.layers = layers_;
      result.shape = shape_;
      const auto rows = static_cast<double>(scored_rows());
      for (std::size_t i = 0; i < echo_sum_.size(); ++i) {
        result.echo_q.push_back(echo_sum_[i] / rows);
        result.induction_q.push_back(induction_sum_[i] / rows);
      }
      const std::int64_t group = shape_.group_size();
      for (std::int64_t layer = 0; layer < layers_; ++layer)
        for (std::int64_t h = 0; h < shape_.kv_heads; ++h) {
          double echo = -std::numeric_limits<double>::infinity(), induction = echo;
          for (std::int64_t j = h * group; j < (h + 1) * group; ++j) {
            echo = std::max(echo, result.echo_q[static_cast<std::size_t>(layer * shape_.q_heads + j)]);
            induction = std::max(induction, result.induction_q[static_cast<std::size_t>(layer * shape_.q_heads + j)]);
          }
          result.echo_kv.push_back(echo);
          result.induction_kv.push_back(induction);
        }
      return result;
    }

   private:
    std::int64_t layers_;
    model_shape shape_;
    probe_config probe_;
    std::vector<double> echo_sum_, induction_sum_;  // [layers · q_heads]
    std::vector<bool> seen_;                        // [layers · N(R − 1)]
    std::vector<std::int64_t> rows_seen_;           // [layers]
  };
};

}  // namespace kvtrim::score
