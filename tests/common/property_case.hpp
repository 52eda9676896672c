// tests/common/property_case.hpp — one randomized case of the property test
// (tests/cpu/property_test.cpp, whose header derives every tolerance used here)
// through the PUBLIC scheme API: shape, inputs, scorer / budget / codec configs,
// compress with the kept-index output, the kept sets against the brute-force
// budget rule (policy_oracle.hpp), positions, appends, and decode attention
// against the double oracle within the codec's per-element error bound.
// Shared by property_test.cpp and codec_scorer_product_test.cpp; `run_case`'s
// Variant parameter lets a test draw other codec configs (the default draws
// none: property_test's cases are exactly those it always had).
#pragma once

#include <gtest/gtest.h>

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/oracle.hpp"
#include "common/policy_oracle.hpp"
#include "common/structured.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"
#include "common/tolerance.hpp"

namespace kvtrim::testing::property {

namespace kt = ::kvtrim;

/// Scores against the double oracle: fp32 logits over D ≤ 64 channels of N(0,1)
/// data carry ≤ (D + 5)·u·S ≈ 69·6e-8·8 ≈ 3.3e-5 (S ≲ 8), which the softmax
/// doubles, and sums of ≤ 200 terms add ≤ 200·u ≈ 1.2e-5: ~8e-5 relative to the
/// largest score; 2e-4 leaves margin (a near-tie under it may flip, nothing else).
inline constexpr double score_tolerance = 2e-4;
inline constexpr double u32 = 0x1p-24;

using rng = std::mt19937_64;
inline std::int64_t pick(rng& r, std::int64_t lo, std::int64_t hi) {
  return std::uniform_int_distribution<std::int64_t>(lo, std::max(lo, hi))(r);
}
inline double pick_real(rng& r, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(r); }
inline bool coin(rng& r, double p = 0.5) { return std::bernoulli_distribution(p)(r); }

// ---- codecs: config and error model ------------------------------------------------

enum class error_kind { exact, relative, integer, fp8, low_rank };

template <class C>
struct codec_model {
  static constexpr error_kind kind = error_kind::exact;
  static constexpr double unit = 0.0, absolute = 0.0;  // relative: unit·|x| + absolute; integer: half a step = A/(2·unit)
  static constexpr bool structured = false;
  static constexpr std::int64_t min_keep = 1;
  static typename C::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::fp16> : codec_model<kt::codec::fp32> {
  static constexpr error_kind kind = error_kind::relative;
  static constexpr double unit = 0x1p-11, absolute = 0x1p-25;
  static kt::codec::fp16::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::bf16> : codec_model<kt::codec::fp32> {
  static constexpr error_kind kind = error_kind::relative;
  static constexpr double unit = 0x1p-8, absolute = 0.0;
  static kt::codec::bf16::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::int8> : codec_model<kt::codec::fp32> {
  static constexpr error_kind kind = error_kind::integer;
  static constexpr double unit = 127.0;
  static kt::codec::int8::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::int4> : codec_model<kt::codec::fp32> {
  static constexpr error_kind kind = error_kind::integer;
  static constexpr double unit = 7.0;
  static kt::codec::int4::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::layered<kt::codec::int8>> : codec_model<kt::codec::int8> {
  static kt::codec::layered<kt::codec::int8>::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::fp8> : codec_model<kt::codec::fp32> {
  static constexpr error_kind kind = error_kind::fp8;
  static kt::codec::fp8::config config() { return {}; }
};
template <>
struct codec_model<kt::codec::low_rank> : codec_model<kt::codec::fp32> {
  static constexpr error_kind kind = error_kind::low_rank;
  static constexpr bool structured = true;  // keys and values of exact rank 4
  static constexpr std::int64_t min_keep = 4;
  static kt::codec::low_rank::config config() {
    kt::codec::low_rank::config cfg;
    cfg.rank = 4;
    return cfg;
  }
};

/// |x − x̂| allowed for one element. `run_max`: max |.| over the elements sharing
/// x's integer scale; `compaction_max`: max |.| the head held at compaction (fp8).
template <class C>
double element_error(double x, double run_max, double compaction_max) {
  using model = codec_model<C>;
  const double a = std::abs(x);
  if constexpr (model::kind == error_kind::relative) {
    return model::unit * a + model::absolute + 1e-6 * a;
  } else if constexpr (model::kind == error_kind::integer) {
    return run_max * (0.5 / model::unit + 1e-6);
  } else if constexpr (model::kind == error_kind::fp8) {
    const double m = compaction_max, s = m / 448.0;
    const double within = a <= m ? std::max(0x1p-4 * a, 0x1p-10 * s) : a - m + 0x1p-4 * m;
    return within + 1e-6 * std::max(a, m);
  } else {
    return 0.0;
  }
}
inline constexpr double low_rank_relative = 0x1p-11 + 1e-5;

// ---- the case: shape, inputs, appends ------------------------------------------------

struct append_op {
  std::int64_t count = 0;
  std::int64_t b = -1, h = -1;  // −1: every head (append); else append_head(b, h)
  std::int64_t offset = 0;      // first row in the inputs' tail
};

struct case_data {
  kt::model_shape shape{};
  std::int64_t batch = 0, tokens = 0, start = 0, page_size = 16, tail = 0;
  std::vector<append_op> appends;
  host_tensor<float, 4> keys, values;  // [B, H, T + tail, D]
  host_tensor<float, 4> window;        // [B, Hq, W, D]
  host_tensor<float, 3> queries;       // decode queries [B, Hq, D]
  host_tensor<float, 3> given;         // score::external's caller-given scores [B, H, T] (strided)
  std::int64_t shared_order = 0;       // layout::shared_paged: 0 NHD, 1 HND
  bool key_runs_per_token = false;     // int8/int4 key_scaling::per_token: a key's run is its row, not its channel
  bool tight_flat = false;             // layout::flat sized to what the case needs, so append_head repacks
};

inline kt::kv_view<const float> rows(const host_tensor<float, 4>& x, std::int64_t begin, std::int64_t count) {
  kt::kv_view<const float> view = x.cview();
  view.data += begin * view.strides[2];
  view.extents[2] = count;
  return view;
}
inline kt::tensor_view<const float, 2> head_rows(const host_tensor<float, 4>& x, std::int64_t b, std::int64_t h,
                                          std::int64_t begin, std::int64_t count) {
  const auto& v = x.view;
  return {v.data + b * v.strides[0] + h * v.strides[1] + begin * v.strides[2],
          {count, v.extents[3]},
          {v.strides[2], v.strides[3]}};
}

// ---- scorers: config, protected count, oracle scores ------------------------------------

/// H2O from its definition, as policy_oracle.hpp's h2o_scores, but each query's
/// attention row computed once (O(T²·D) instead of O(T³·D)).
template <class K, class Q>
score_table h2o_oracle(const kt::score::h2o::config& cfg, const kt::model_shape& shape, const kt::tensor_view<K, 4>& keys,
                       const kt::tensor_view<Q, 4>& queries) {
  const table_shape s{keys.extent(0), shape.kv_heads, keys.extent(2)};
  const std::int64_t group = shape.group_size();
  const std::int64_t recent = cfg.protect_recent ? kt::detail::resolve_keep(cfg.recent, s.tokens) : 0;
  score_table out(static_cast<std::size_t>(s.batch * s.heads * s.tokens));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      std::vector<std::vector<double>> mass(static_cast<std::size_t>(group),
                                            std::vector<double>(static_cast<std::size_t>(s.tokens), 0.0));
      for (std::int64_t g = 0; g < group; ++g)
        for (std::int64_t t = 0; t < s.tokens; ++t) {
          const auto p = attention_row(keys, queries, b, h, h * group + g, t);
          for (std::int64_t j = 0; j <= t; ++j) mass[g][j] += p[static_cast<std::size_t>(j)];
        }
      for (std::int64_t j = 0; j < s.tokens; ++j) {
        std::vector<double> per_head;
        for (std::int64_t g = 0; g < group; ++g)
          per_head.push_back(cfg.normalisation == kt::score::h2o::normalisation::observed
                                 ? mass[g][j] / static_cast<double>(s.tokens - j)
                                 : mass[g][j]);
        out[s.at(b, h, j)] = j >= s.tokens - recent ? infinity : reduce(cfg.group, per_head);
      }
    }
  return out;
}

template <class S>
struct scorer_model;

template <>
struct scorer_model<kt::score::static_window> {
  static std::int64_t min_tokens() { return 1; }
  static kt::score::static_window::config config(rng& r, const kt::model_shape& shape, std::int64_t) {
    kt::score::static_window::config cfg;
    cfg.sinks = pick(r, 0, 6);
    if (coin(r))
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) cfg.windows.push_back(pick(r, 0, 9));
    return cfg;
  }
  static std::int64_t window_queries(rng&, const kt::score::static_window::config&, std::int64_t) { return 0; }
  static std::int64_t protected_max(const kt::score::static_window::config& cfg, std::int64_t tokens) {
    std::int64_t most = 0;
    for (std::int64_t w : cfg.windows) most = std::max(most, w);
    return std::min(tokens, cfg.sinks + most);
  }
  template <class K, class Q>
  static score_table oracle(const kt::score::static_window::config& cfg, const kt::model_shape& shape,
                            const kt::tensor_view<K, 4>& keys, const kt::tensor_view<Q, 4>&) {
    return static_window_scores(cfg, {keys.extent(0), shape.kv_heads, keys.extent(2)});
  }
};

template <>
struct scorer_model<kt::score::snapkv> {
  static std::int64_t min_tokens() { return 2; }
  static kt::score::snapkv::config config(rng& r, const kt::model_shape&, std::int64_t tokens) {
    kt::score::snapkv::config cfg;
    cfg.window = pick(r, 1, std::min<std::int64_t>(16, tokens - 1));
    cfg.kernel = 2 * pick(r, 0, 3) + 1;
    cfg.pooling = coin(r) ? kt::score::pooling::avg : kt::score::pooling::max;
    cfg.reduction = coin(r) ? kt::score::window_reduction::mean : kt::score::window_reduction::sum;
    cfg.group = coin(r) ? kt::score::group_reduction::mean : kt::score::group_reduction::max;
    return cfg;
  }
  static std::int64_t window_queries(rng& r, const kt::score::snapkv::config& cfg, std::int64_t tokens) {
    return pick(r, cfg.window, std::min(tokens, cfg.window + 4));
  }
  static std::int64_t protected_max(const kt::score::snapkv::config& cfg, std::int64_t) { return cfg.window; }
  template <class K, class Q>
  static score_table oracle(const kt::score::snapkv::config& cfg, const kt::model_shape& shape,
                            const kt::tensor_view<K, 4>& keys, const kt::tensor_view<Q, 4>& queries) {
    return snapkv_scores(cfg, shape, keys, queries);
  }
};

template <>
struct scorer_model<kt::score::h2o> {
  static std::int64_t min_tokens() { return 1; }
  static kt::score::h2o::config config(rng& r, const kt::model_shape&, std::int64_t tokens) {
    kt::score::h2o::config cfg;
    if (coin(r)) cfg.recent = kt::keep_tokens{pick(r, 1, std::min<std::int64_t>(tokens, 20))};
    else cfg.recent = kt::keep_ratio{pick_real(r, 0.02, 0.3)};
    cfg.protect_recent = coin(r, 0.8);
    cfg.normalisation = coin(r) ? kt::score::h2o::normalisation::none : kt::score::h2o::normalisation::observed;
    cfg.group = coin(r) ? kt::score::group_reduction::mean : kt::score::group_reduction::max;
    return cfg;
  }
  static std::int64_t window_queries(rng&, const kt::score::h2o::config&, std::int64_t tokens) { return tokens; }
  static std::int64_t protected_max(const kt::score::h2o::config& cfg, std::int64_t tokens) {
    return kt::score::h2o::recent_tokens(cfg, tokens);
  }
  template <class K, class Q>
  static score_table oracle(const kt::score::h2o::config& cfg, const kt::model_shape& shape,
                            const kt::tensor_view<K, 4>& keys, const kt::tensor_view<Q, 4>& queries) {
    return h2o_oracle(cfg, shape, keys, queries);
  }
};

template <>
struct scorer_model<kt::score::key_norm> {
  static std::int64_t min_tokens() { return 1; }
  static kt::score::key_norm::config config(rng&, const kt::model_shape&, std::int64_t) { return {}; }
  static std::int64_t window_queries(rng&, const kt::score::key_norm::config&, std::int64_t) { return 0; }
  static std::int64_t protected_max(const kt::score::key_norm::config&, std::int64_t) { return 0; }
  template <class K, class Q>
  static score_table oracle(const kt::score::key_norm::config&, const kt::model_shape&, const kt::tensor_view<K, 4>& keys,
                            const kt::tensor_view<Q, 4>&) {
    return key_norm_scores(keys);
  }
};

template <>
struct scorer_model<kt::score::retrieval_head> {
  static std::int64_t min_tokens() { return 1; }
  static kt::score::retrieval_head::config config(rng& r, const kt::model_shape& shape, std::int64_t tokens) {
    kt::score::retrieval_head::config cfg;
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) cfg.retrieval.push_back(coin(r, 0.35));
    cfg.sinks = pick(r, 0, 6);
    cfg.min_recent = pick(r, 1, tokens + 2);
    cfg.recent_fraction = coin(r) ? 0.0 : pick_real(r, 0.0, 0.4);
    cfg.compensation = coin(r, 0.75);
    return cfg;
  }
  static std::int64_t window_queries(rng&, const kt::score::retrieval_head::config&, std::int64_t) { return 0; }
  static std::int64_t protected_max(const kt::score::retrieval_head::config&, std::int64_t) { return 0; }
};

/// score::external: the caller's scores, drawn per case (continuous, or a few
/// values full of ties, −0 and +0 among them), with +∞ (protected) tokens, −∞
/// and NaN (ranked −∞) sprinkled in, held in a strided tensor whose padding is
/// NaN. Its oracle is the definition: s = given, NaN → −∞.
template <>
struct scorer_model<kt::score::external> {
  static std::int64_t min_tokens() { return 1; }
  static host_tensor<float, 3> given(rng& r, std::int64_t batch, std::int64_t kv_heads, std::int64_t tokens) {
    const std::array<std::int64_t, 3> padding{pick(r, 0, 1), pick(r, 0, 2), pick(r, 0, 3)};
    auto scores = make_tensor<float, 3>({batch, kv_heads, tokens}, padding);
    const int mode = static_cast<int>(pick(r, 0, 2));
    const double nan_rate = coin(r, 0.3) ? 0.1 : 0.0, minus_rate = coin(r, 0.3) ? 0.1 : 0.0;
    const std::int64_t protect = coin(r, 0.4) ? pick(r, 1, 3) : 0;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        for (std::int64_t j = 0; j < tokens; ++j) {
          float x = normal(r);
          if (mode == 1) x = std::round(2.0f * x) / 2.0f;  // a few values: ties everywhere, −0 among them
          if (mode == 2) x = static_cast<float>(pick(r, -1, 1)) * (coin(r) ? 1.0f : -0.0f);
          if (coin(r, nan_rate)) x = std::numeric_limits<float>::quiet_NaN();
          else if (coin(r, minus_rate)) x = -std::numeric_limits<float>::infinity();
          scores(b, h, j) = x;
        }
        for (std::int64_t k = 0; k < protect; ++k) scores(b, h, pick(r, 0, tokens - 1)) = std::numeric_limits<float>::infinity();
      }
    return scores;
  }
  static std::int64_t window_queries(rng&, const kt::score::external::config&, std::int64_t) { return 0; }
  static double given_at(const kt::score::external::config& cfg, std::int64_t b, std::int64_t h, std::int64_t j) {
    const float x = cfg.scores[b * cfg.strides[0] + h * cfg.strides[1] + j * cfg.strides[2]];
    return std::isnan(x) ? -infinity : static_cast<double>(x);
  }
  static std::int64_t protected_max(const kt::score::external::config& cfg, std::int64_t tokens) {
    std::int64_t most = 0;
    for (std::int64_t b = 0; b < cfg.extents[0]; ++b)
      for (std::int64_t h = 0; h < cfg.extents[1]; ++h) {
        std::int64_t count = 0;
        for (std::int64_t j = 0; j < tokens; ++j) count += given_at(cfg, b, h, j) == infinity ? 1 : 0;
        most = std::max(most, count);
      }
    return most;
  }
  template <class K, class Q>
  static score_table oracle(const kt::score::external::config& cfg, const kt::model_shape& shape,
                            const kt::tensor_view<K, 4>& keys, const kt::tensor_view<Q, 4>&) {
    const table_shape s{keys.extent(0), shape.kv_heads, keys.extent(2)};
    score_table out(static_cast<std::size_t>(s.batch * s.heads * s.tokens));
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.heads; ++h)
        for (std::int64_t j = 0; j < s.tokens; ++j) out[s.at(b, h, j)] = given_at(cfg, b, h, j);
    return out;
  }
};

// ---- budgets: config, expected counts and sets --------------------------------------

struct budget_inputs {
  std::int64_t tokens = 0, kv_heads = 0, protected_max = 0, min_keep = 1;
};

template <class B>
struct budget_model;

template <>
struct budget_model<kt::budget::uniform> {
  static kt::budget::uniform::config config(rng& r, const budget_inputs& in) {
    if (in.min_keep == 1 && coin(r, 0.3)) return {.keep = kt::keep_ratio{pick_real(r, 0.01, 1.0)}};
    return {.keep = kt::keep_tokens{pick(r, in.min_keep, in.tokens + 3)}};
  }
  static std::vector<std::int64_t> counts(const kt::budget::uniform::config& cfg, const table_shape& s) {
    return std::vector<std::int64_t>(static_cast<std::size_t>(s.batch * s.heads), kt::detail::resolve_keep(cfg.keep, s.tokens));
  }
};

template <>
struct budget_model<kt::budget::pyramid> {
  static kt::budget::pyramid::config config(rng& r, const budget_inputs& in) {
    kt::budget::pyramid::config cfg;
    const std::int64_t keep = pick(r, in.min_keep, in.tokens);
    cfg.keep = kt::keep_tokens{keep};
    cfg.window = pick(r, 0, std::min<std::int64_t>(keep, 8));
    cfg.beta = pick(r, 1, 30);
    cfg.layers = pick(r, 1, 6);
    cfg.layer = pick(r, 0, cfg.layers - 1);
    if (in.min_keep > 1) cfg.layer = 0;  // the widest layer (every layer keeps ≥ 1 token; low rank wants ≥ 4)
    return cfg;
  }
  static std::vector<std::int64_t> counts(const kt::budget::pyramid::config& cfg, const table_shape& s) {
    return std::vector<std::int64_t>(static_cast<std::size_t>(s.batch * s.heads),
                                     kt::budget::pyramid::layer_keep(cfg, s.tokens));
  }
};

template <>
struct budget_model<kt::budget::per_head> {
  static kt::budget::per_head::config config(rng& r, const budget_inputs& in) {
    kt::budget::per_head::config cfg;
    cfg.kv_heads = in.kv_heads;
    const std::int64_t layers = pick(r, 1, 3);
    for (std::int64_t i = 0; i < layers * in.kv_heads; ++i) cfg.lengths.push_back(pick(r, in.min_keep, in.tokens + 3));
    cfg.layer = pick(r, 0, layers - 1);
    return cfg;
  }
  static std::vector<std::int64_t> counts(const kt::budget::per_head::config& cfg, const table_shape& s) {
    std::vector<std::int64_t> out;
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.heads; ++h)
        out.push_back(std::min(s.tokens, cfg.lengths[static_cast<std::size_t>(cfg.layer * cfg.kv_heads + h)]));
    return out;
  }
};

template <>
struct budget_model<kt::budget::adaptive> {
  static kt::budget::adaptive::config config(rng& r, const budget_inputs& in) {
    kt::budget::adaptive::config cfg;
    const std::int64_t least = std::max<std::int64_t>({in.protected_max, in.min_keep, 1});
    const std::int64_t k = pick(r, least, in.tokens + 2);
    cfg.keep = kt::keep_tokens{k};
    if (coin(r, 0.25)) {  // a ratio when it resolves to at least the protected count
      const double ratio = pick_real(r, 0.01, 1.0);
      if (kt::detail::resolve_keep(kt::keep_ratio{ratio}, in.tokens) >= least) cfg.keep = kt::keep_ratio{ratio};
    }
    const int shape = static_cast<int>(pick(r, 0, 3));
    cfg.alpha = shape == 0 ? 0.0 : shape == 1 ? 1.0 : pick_real(r, 0.0, 1.0);
    cfg.kvpress_compatible = coin(r, 0.3);
    if (in.min_keep > 1) {  // every head keeps exactly k ≥ min_keep (low rank's bases need ≥ 4 rows)
      cfg.alpha = 1.0;
      cfg.kvpress_compatible = false;
    }
    return cfg;
  }
};

template <>
struct budget_model<kt::budget::by_scorer> {
  static kt::budget::by_scorer::config config(rng&, const budget_inputs&) { return {}; }
};

// ---- one case ---------------------------------------------------------------------------

template <class Scheme>
std::string scheme_label() {
  return kt::detail::cat(Scheme::layout::name, " × ", Scheme::scorer::name, " × ", Scheme::budget::name, " × ",
                         Scheme::codec::name);
}

/// What a head holds, as rows of the oracle's inputs (prefill [+ compensation token] + tail).
struct head_model {
  kept_tokens rows;                    // indices into the oracle tensors, with logit biases
  std::vector<std::int32_t> positions;  // expected positions, in cache order
  std::int64_t next = 0;
  std::int64_t compaction_rows = 0;  // rows held right after compress (fp8 scales)
};

/// layout::shared_paged over an engine's own page tensor (bind_pages: nothing
/// copied; kvtrim's tables in a 256-byte aligned block). The tensor starts as NaN,
/// so a read of a row nobody wrote poisons attention.
template <class Scheme>
struct engine_pages {
  using view_type = typename Scheme::cache_view;
  using element = typename view_type::element;
  std::vector<element> tensor;
  std::vector<std::byte> metadata;
  view_type bound{};

  engine_pages(const kt::model_shape& shape, std::int64_t batch, const kt::layout::shared_paged::pool_size& pool)
      : tensor(static_cast<std::size_t>(view_type::tensor_rows(shape, pool) * shape.head_dim),
               kt::from_float<element>(std::numeric_limits<float>::quiet_NaN())),
        metadata(view_type::metadata_bytes(shape, batch, pool) + 256) {
    void* aligned = metadata.data() + (256 - reinterpret_cast<std::uintptr_t>(metadata.data()) % 256) % 256;
    bound = view_type::bind_pages(tensor.data(), aligned, shape, batch, pool);
  }
  engine_pages(const engine_pages&) = delete;
  engine_pages& operator=(const engine_pages&) = delete;
  view_type& view() { return bound; }
};

template <class Scheme>
auto make_planned_cache(const case_data& c, const typename Scheme::config& cfg,
                        const typename Scheme::codec::config& codec_config, rng& r) {
  using layout = typename Scheme::layout;
  const kt::capacity_plan plan = Scheme::plan_capacity(c.shape, c.batch, c.tokens, cfg);
  const std::int64_t heads = c.batch * c.shape.kv_heads;
  if constexpr (std::is_same_v<layout, kt::layout::paged>) {
    const std::int64_t p = c.page_size;
    return Scheme::make_cache(c.shape, c.batch,
                              kt::layout::paged::pool_size{plan.pages(p) + heads * ((c.tail + p - 1) / p + 1) + pick(r, 0, 2), p},
                              codec_config);
  } else if constexpr (std::is_same_v<layout, kt::layout::shared_paged>) {
    // Every head of a sequence shares its pages: ⌈(kept + appended)/p⌉ pages per sequence, plus 0–2 spare.
    const std::int64_t p = c.page_size;
    const kt::layout::shared_paged::pool_size pool{
        c.batch * ((plan.max_head_tokens + c.tail + p - 1) / p) + pick(r, 0, 2), p,
        c.shared_order == 0 ? kt::layout::shared_paged::order::nhd : kt::layout::shared_paged::order::hnd};
    (void)heads;
    (void)codec_config;
    return std::make_unique<engine_pages<Scheme>>(c.shape, c.batch, pool);
  } else if constexpr (std::is_same_v<layout, kt::layout::flat>) {
    if (c.tight_flat) {
      // Whole runs of the codec's slot run G for each head's kept and appended tokens:
      // ⌈(c_h + a_h)/G⌉ ≤ ⌈c_h/G⌉ + ⌈a_h/G⌉, and flat_slots(G) bounds Σ⌈c_h/G⌉·G (Ada-KV too).
      // Compaction spreads the spare slots evenly, so a head that grows alone repacks.
      const std::int64_t run = kt::codec::slot_alignment<typename Scheme::codec>(codec_config);
      std::vector<std::int64_t> appended(static_cast<std::size_t>(heads), 0);
      for (const append_op& op : c.appends)
        for (std::int64_t head = 0; head < heads; ++head)
          if (op.b < 0 || head == op.b * c.shape.kv_heads + op.h) appended[static_cast<std::size_t>(head)] += op.count;
      std::int64_t slots = plan.flat_slots(run);
      for (const std::int64_t a : appended) slots += (a + run - 1) / run * run;
      return Scheme::make_cache(c.shape, c.batch, kt::layout::flat::pool_size{slots}, codec_config);
    }
    // 64 is a multiple of every codec's slot run here (KIVI groups of 32), so this bounds the plan for any run.
    return Scheme::make_cache(c.shape, c.batch, kt::layout::flat::pool_size{plan.flat_slots(64) + heads * (c.tail + 64)},
                              codec_config);
  } else {
    return Scheme::make_cache(c.shape, c.batch, plan.max_head_tokens + c.tail + pick(r, 0, 3), codec_config);
  }
}

template <class Scheme>
void check_contents(const typename Scheme::cache_view& view, const std::vector<head_model>& model, const std::string& when) {
  SCOPED_TRACE(when);
  ASSERT_NO_THROW(Scheme::layout::validate("property_test", view));
  for (std::int64_t b = 0; b < view.batch; ++b)
    for (std::int64_t h = 0; h < view.shape.kv_heads; ++h) {
      const head_model& m = model[static_cast<std::size_t>(b * view.shape.kv_heads + h)];
      EXPECT_EQ(view.head_length(b, h), static_cast<std::int64_t>(m.positions.size())) << "head " << b << "," << h;
      EXPECT_EQ(kt::head_positions(view, b, h), m.positions) << "head " << b << "," << h;
      EXPECT_EQ(kt::next_position(view, b, h), m.next) << "head " << b << "," << h;
    }
}

/// attend() against the double oracle over the exact rows, within the codec's bound (see the top).
template <class Scheme>
void check_attention(const typename Scheme::cache_view& view, const case_data& c, const std::vector<head_model>& model,
                     const host_tensor<float, 4>& keys, const host_tensor<float, 4>& values, const std::string& when) {
  SCOPED_TRACE(when);
  using codec = typename Scheme::codec;
  const kt::model_shape& shape = c.shape;
  auto out = make_tensor<float, 3>({c.batch, shape.q_heads, shape.head_dim});
  std::vector<std::byte> scratch(Scheme::attend_workspace(view));
  if (std::any_of(model.begin(), model.end(), [](const head_model& m) { return m.rows.tokens.empty(); })) {
    // Ada-KV's kvpress form may leave a head empty (⌊α·k⌋ = 0, budget/adaptive.hpp), as
    // kvpress does; attention over it is undefined and attend refuses the cache.
    EXPECT_THROW(Scheme::attend(c.queries.cview(), view, out.view, kt::workspace{scratch.data(), scratch.size()}),
                 kt::error);
    return;
  }
  ASSERT_NO_THROW(Scheme::attend(c.queries.cview(), view, out.view, kt::workspace{scratch.data(), scratch.size()}));
  const auto head = [&](std::int64_t b, std::int64_t h) {
    return model[static_cast<std::size_t>(b * shape.kv_heads + h)].rows;
  };
  const auto oracle = oracle_attention(c.queries.cview(), keys.cview(), values.cview(), shape.kv_heads, head);
  const auto fp32 = attention_bounds(c.queries.cview(), keys.cview(), values.cview(), shape.kv_heads, head, rounding{});
  const std::int64_t D = shape.head_dim, G = shape.group_size();
  double worst = 0.0;
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t j = 0; j < shape.q_heads; ++j) {
      const std::int64_t h = j / G;
      const head_model& m = model[static_cast<std::size_t>(b * shape.kv_heads + h)];
      const auto& set = m.rows.tokens;
      std::vector<double> channel_max(static_cast<std::size_t>(D), 0.0);
      double v_max = 0.0, compaction_k = 0.0, compaction_v = 0.0, bias_max = 0.0, q_norm = 0.0;
      for (std::int64_t d = 0; d < D; ++d) q_norm += std::pow(static_cast<double>(c.queries(b, j, d)), 2);
      q_norm = std::sqrt(q_norm);
      for (std::size_t n = 0; n < set.size(); ++n) {
        for (std::int64_t d = 0; d < D; ++d) {
          const double k = std::abs(keys(b, h, set[n], d)), v = std::abs(values(b, h, set[n], d));
          channel_max[d] = std::max(channel_max[d], k);
          v_max = std::max(v_max, v);
          if (static_cast<std::int64_t>(n) < m.compaction_rows) {
            compaction_k = std::max(compaction_k, k);
            compaction_v = std::max(compaction_v, v);
          }
        }
        if (!m.rows.bias.empty()) bias_max = std::max(bias_max, std::abs(m.rows.bias[n]));
      }
      double delta = 0.0, value_error = 0.0;
      for (const std::int64_t t : set) {
        double logit = 0.0, row_value = 0.0, row_key = 0.0, k_norm = 0.0, v_norm = 0.0;
        for (std::int64_t d = 0; d < D; ++d) row_value = std::max(row_value, std::abs(static_cast<double>(values(b, h, t, d))));
        for (std::int64_t d = 0; d < D; ++d) row_key = std::max(row_key, std::abs(static_cast<double>(keys(b, h, t, d))));
        for (std::int64_t d = 0; d < D; ++d) {
          const double k = keys(b, h, t, d), v = values(b, h, t, d);
          const double key_run = c.key_runs_per_token ? row_key : channel_max[d];
          k_norm += k * k;
          v_norm += v * v;
          logit += std::abs(static_cast<double>(c.queries(b, j, d))) * element_error<codec>(k, key_run, compaction_k);
          value_error = std::max(value_error, element_error<codec>(v, row_value, compaction_v));
        }
        if constexpr (codec_model<codec>::kind == error_kind::low_rank) {
          logit = q_norm * low_rank_relative * std::sqrt(k_norm);
          value_error = std::max(value_error, low_rank_relative * std::sqrt(v_norm));
        }
        delta = std::max(delta, logit / std::sqrt(static_cast<double>(D)));
      }
      const double bound = 2.0 * fp32[static_cast<std::size_t>(b * shape.q_heads + j)] + value_error +
                           std::expm1(2.0 * delta) * v_max + std::expm1(8.0 * u32 * bias_max) * v_max;
      for (std::int64_t d = 0; d < D; ++d) {
        const double got = out(b, j, d);
        const double want = oracle[static_cast<std::size_t>((b * shape.q_heads + j) * D + d)];
        const double error = std::isfinite(got) ? std::abs(got - want) : INFINITY;
        worst = std::max(worst, error / bound);
        if (!(error <= bound)) {
          ADD_FAILURE() << "attention (" << b << ", q head " << j << ", " << d << "): |" << got << " − " << want
                        << "| = " << error << " > bound " << bound;
          return;
        }
      }
    }
  ::testing::Test::RecordProperty("worst_error_over_bound", kt::detail::cat(worst));
}

/// What run_case draws besides property_test's own draws (the defaults: nothing, so
/// property_test's cases are what they always were). A variant's draws come from
/// a second generator, so they never shift the case's own.
struct property_defaults {
  static constexpr bool validate_after_attend = false;
  static bool tight_flat(rng&) { return false; }
  static float tail_scale(rng&) { return 1.0f; }
  static std::int64_t head_dim(rng&, std::int64_t drawn, bool /*structured*/) { return drawn; }
  template <class C>
  static typename C::config codec_config(rng&) { return codec_model<C>::config(); }
  template <class BudgetConfig>
  static void tweak_budget(BudgetConfig&, rng&, const budget_inputs&) {}
};

/// The codec config in a trace line (reproductions name it).
template <class Config>
std::string describe_codec(const Config& cfg) {
  if constexpr (requires { cfg.key_group; cfg.asymmetric; })
    return kt::detail::cat(" keys=", static_cast<int>(cfg.keys), " group=", cfg.key_group, " asymmetric=", cfg.asymmetric);
  else if constexpr (requires { cfg.inner; cfg.sinks; cfg.recent; })
    return kt::detail::cat(" layered sinks=", cfg.sinks, " recent=", cfg.recent, describe_codec(cfg.inner));
  else if constexpr (requires { cfg.update_freq; })
    return kt::detail::cat(" update_freq=", cfg.update_freq);
  else
    return "";
}

template <class S>
auto& view_of(std::unique_ptr<engine_pages<S>>& pages) {
  return pages->view();
}
template <class C>
auto& view_of(C& cache) {
  return cache.view();
}

template <class Scheme, class Variant = property_defaults>
void run_case(std::uint64_t seed) {
  using scorer = typename Scheme::scorer;
  using budget = typename Scheme::budget;
  using codec = typename Scheme::codec;
  using layout = typename Scheme::layout;
  using cmodel = codec_model<codec>;
  using smodel = scorer_model<scorer>;
  constexpr bool scorer_decides = kt::detail::scorer_sets_keep_counts<scorer>;
  SCOPED_TRACE(kt::detail::cat(scheme_label<Scheme>(), ", seed ", seed));
  rng r(seed);
  rng extra(seed ^ 0x9e3779b97f4a7c15ULL);  // the variant's draws and shared_paged's order

  // Shape and sizes.
  case_data c;
  const std::int64_t group = std::int64_t{1} << pick(r, 0, 2);
  c.shape.kv_heads = pick(r, 1, 3);
  c.shape.q_heads = c.shape.kv_heads * group;
  c.shape.head_dim = std::int64_t{16} << pick(r, 0, 2);
  c.batch = pick(r, 1, 3);
  c.shape.head_dim = Variant::head_dim(extra, c.shape.head_dim, cmodel::structured);
  const std::int64_t least = std::max(smodel::min_tokens(), cmodel::structured ? std::int64_t{8} : std::int64_t{1});
  c.tokens = coin(r, 0.15) ? pick(r, least, 6) : pick(r, least, 200);
  c.page_size = std::int64_t{8} << pick(r, 0, 2);
  const std::int64_t steps = pick(r, 0, 3);
  for (std::int64_t k = 0; k < steps; ++k) {
    append_op op;
    op.count = pick(r, 1, 5);
    op.offset = c.tail;
    if (layout::ragged_heads && coin(r, 0.4)) {
      op.b = pick(r, 0, c.batch - 1);
      op.h = pick(r, 0, c.shape.kv_heads - 1);
    }
    c.tail += op.count;
    c.appends.push_back(op);
  }
  const std::int64_t last_start = kt::detail::position_table::max_position + 1 - c.tokens - c.tail;
  const int start_kind = static_cast<int>(pick(r, 0, 2));
  c.start = start_kind == 0 ? 0 : start_kind == 1 ? pick(r, 1, 5000) : last_start;

  if constexpr (std::is_same_v<layout, kt::layout::shared_paged>) c.shared_order = pick(extra, 0, 1);
  if constexpr (std::is_same_v<layout, kt::layout::flat>) c.tight_flat = Variant::tight_flat(extra);

  // Configs.
  typename Scheme::config cfg;
  if constexpr (std::is_same_v<scorer, kt::score::external>) {
    c.given = smodel::given(r, c.batch, c.shape.kv_heads, c.tokens);
    cfg.score = kt::score::external::config::from(c.given.cview());
  } else {
    cfg.score = smodel::config(r, c.shape, c.tokens);
  }
  if constexpr (scorer_decides && cmodel::min_keep > 1) {
    // Every head keeps ≥ min_keep rows (low rank's fitted bases span the data).
    cfg.score.min_recent = std::max(cfg.score.min_recent, cmodel::min_keep);
  }
  if constexpr (!scorer_decides) {
    cfg.budget = budget_model<budget>::config(
        r, {c.tokens, c.shape.kv_heads, smodel::protected_max(cfg.score, c.tokens), cmodel::min_keep});
    Variant::tweak_budget(cfg.budget, extra,
                          budget_inputs{c.tokens, c.shape.kv_heads, smodel::protected_max(cfg.score, c.tokens), cmodel::min_keep});
  }
  const typename codec::config codec_config = Variant::template codec_config<codec>(extra);
  if constexpr (requires { codec_config.inner.keys; })
    c.key_runs_per_token = codec_config.inner.keys == kt::codec::key_scaling::per_token;
  else if constexpr (requires { codec_config.keys == kt::codec::key_scaling::per_token; })
    c.key_runs_per_token = codec_config.keys == kt::codec::key_scaling::per_token;

  // Inputs: one tensor for the prefill and every appended token (low rank: exact rank 4).
  const std::array<std::int64_t, 4> extents{c.batch, c.shape.kv_heads, c.tokens + c.tail, c.shape.head_dim};
  if constexpr (cmodel::structured) {
    c.keys = structured_tensor(extents, 4, 0.0, seed * 3 + 1);
    c.values = structured_tensor(extents, 4, 0.0, seed * 3 + 2);
  } else {
    c.keys = random_tensor<float, 4>(extents, seed * 3 + 1);
    c.values = random_tensor<float, 4>(extents, seed * 3 + 2);
  }
  // Appended tokens larger than the prefill (fp8 saturates past the compaction's amax,
  // KIVI's later groups get their own scales).
  if (const float scale = Variant::tail_scale(extra); scale != 1.0f) {
    for (host_tensor<float, 4>* x : {&c.keys, &c.values})
      for_each_index(x->view.extents, [&](std::int64_t b, std::int64_t h, std::int64_t t, std::int64_t d) {
        if (t >= c.tokens) (*x)(b, h, t, d) *= scale;
      });
  }
  const std::int64_t observed = std::max<std::int64_t>(1, smodel::window_queries(r, cfg.score, c.tokens));
  c.window = random_tensor<float, 4>({c.batch, c.shape.q_heads, observed, c.shape.head_dim}, seed * 3 + 3);
  c.queries = random_tensor<float, 3>({c.batch, c.shape.q_heads, c.shape.head_dim}, seed * 7 + 5);
  const auto prefill_keys = rows(c.keys, 0, c.tokens), prefill_values = rows(c.values, 0, c.tokens);
  SCOPED_TRACE(kt::detail::cat("B=", c.batch, " Hq=", c.shape.q_heads, " H=", c.shape.kv_heads, " D=", c.shape.head_dim,
                               " T=", c.tokens, " start=", c.start, " page=", c.page_size, " appends=", c.appends.size(),
                               c.tight_flat ? " tight" : "",
                               std::is_same_v<layout, kt::layout::shared_paged> ? (c.shared_order ? " HND" : " NHD") : "",
                               describe_codec(codec_config)));

  // Compress, with the selection written out.
  auto cache = make_planned_cache<Scheme>(c, cfg, codec_config, r);
  typename Scheme::cache_view& view = view_of(cache);
  const std::int64_t heads = c.batch * c.shape.kv_heads;
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1), -1);
  std::vector<std::int32_t> kept(static_cast<std::size_t>(Scheme::kept_tokens_capacity(c.shape, c.batch, c.tokens, cfg)));
  kt::compress_options<kt::host_space> options;
  options.start_position = c.start;
  options.kept_offsets = offsets.data();
  options.kept_tokens = kept.data();
  options.kept_tokens_capacity = static_cast<std::int64_t>(kept.size());
  std::vector<std::byte> scratch(Scheme::compress_workspace(c.shape, c.batch, c.tokens, cfg));
  const kt::workspace ws{scratch.data(), scratch.size()};
  if constexpr (scorer::needs_queries)
    ASSERT_NO_THROW(Scheme::compress(prefill_keys, prefill_values, c.window.cview(), view, cfg, options, ws));
  else
    ASSERT_NO_THROW(Scheme::compress(prefill_keys, prefill_values, view, cfg, options, ws));
  ASSERT_NO_THROW(Scheme::layout::validate("property_test", view));

  kept_sets got;
  for (std::int64_t head = 0; head < heads; ++head) {
    ASSERT_LE(offsets[head], offsets[head + 1]);
    got.emplace_back(kept.begin() + offsets[head], kept.begin() + offsets[head + 1]);
    EXPECT_TRUE(std::is_sorted(got.back().begin(), got.back().end()) &&
                std::adjacent_find(got.back().begin(), got.back().end()) == got.back().end())
        << "kept tokens of head " << head << " ascend";
  }
  const table_shape s{c.batch, c.shape.kv_heads, c.tokens};

  // Kept sets, budgets, protected tokens.
  if constexpr (scorer_decides) {
    for (std::int64_t head = 0; head < heads; ++head) {
      const std::int64_t h = head % c.shape.kv_heads;
      const auto want = retrieval_head_kept(cfg.score, c.tokens, h, true).tokens;
      EXPECT_EQ(got[head], want) << "head " << head;
      if (cfg.score.retrieval[static_cast<std::size_t>(h)]) {
        EXPECT_EQ(static_cast<std::int64_t>(got[head].size()), c.tokens) << "retrieval head " << head << " is whole";
      }
    }
  } else {
    const auto selection = run_selection<scorer, budget>(cfg.score, cfg.budget, c.shape, prefill_keys, prefill_values,
                                                         c.window.cview());
    const score_table oracle = smodel::oracle(cfg.score, c.shape, prefill_keys, c.window.cview());
    EXPECT_LE(score_error(selection.scores, oracle), score_tolerance) << "kvtrim's scores vs the double oracle";
    kept_sets want;
    if constexpr (std::is_same_v<budget, kt::budget::adaptive>) {
      const std::int64_t k = kt::detail::resolve_keep(cfg.budget.keep, c.tokens);
      want = adaptive_sets(selection.scores, s, k, cfg.budget.alpha, cfg.budget.kvpress_compatible);
      for (std::int64_t b = 0; b < c.batch; ++b) {
        std::int64_t total = 0;
        for (std::int64_t h = 0; h < c.shape.kv_heads; ++h) total += static_cast<std::int64_t>(got[b * c.shape.kv_heads + h].size());
        EXPECT_EQ(total, c.shape.kv_heads * k) << "Ada-KV keeps H·k tokens in sequence " << b;
      }
    } else {
      const std::vector<std::int64_t> counts = budget_model<budget>::counts(cfg.budget, s);
      want = top_k_sets(selection.scores, s, counts);
      for (std::int64_t head = 0; head < heads; ++head)
        EXPECT_EQ(static_cast<std::int64_t>(got[head].size()), counts[head]) << "budget of head " << head;
    }
    EXPECT_EQ(got, want) << "kept sets vs the brute-force budget rule";
    EXPECT_TRUE(near_top_k(got, oracle, s, score_tolerance)) << "kept sets vs the double oracle's order";
    for (std::int64_t head = 0; head < heads; ++head) {
      const std::int64_t b = head / c.shape.kv_heads, h = head % c.shape.kv_heads;
      if (protected_count(oracle, s, b, h) > static_cast<std::int64_t>(got[head].size())) continue;
      for (std::int64_t j = 0; j < c.tokens; ++j)
        if (oracle[s.at(b, h, j)] == infinity) {
          EXPECT_TRUE(std::binary_search(got[head].begin(), got[head].end(), j))
              << "protected token " << j << " of head " << head << " dropped";
        }
    }
  }

  // The oracle's rows: the prefill (+ RazorAttention's mean token at index T) then the tail.
  host_tensor<float, 4> prefill_k = concat_tokens(prefill_keys, rows(c.keys, 0, 0));
  host_tensor<float, 4> prefill_v = concat_tokens(prefill_values, rows(c.values, 0, 0));
  std::int64_t dropped = 0, last_dropped = 0;
  if constexpr (scorer_decides) {
    dropped = kt::score::retrieval_head::dropped(cfg.score, c.tokens);
    last_dropped = c.tokens - kt::score::retrieval_head::recent_window(cfg.score, c.tokens) - 1;
    if (cfg.score.compensation && dropped > 0) {  // the mean of the dropped tokens [S, T − W) becomes token T
      prefill_k = with_mean_token(prefill_keys, cfg.score.sinks, dropped);
      prefill_v = with_mean_token(prefill_values, cfg.score.sinks, dropped);
    }
  }
  const std::int64_t tail_base = prefill_k.view.extent(2);
  host_tensor<float, 4> all_k = concat_tokens(prefill_k.cview(), rows(c.keys, c.tokens, c.tail));
  host_tensor<float, 4> all_v = concat_tokens(prefill_v.cview(), rows(c.values, c.tokens, c.tail));

  std::vector<head_model> model(static_cast<std::size_t>(heads));
  for (std::int64_t head = 0; head < heads; ++head) {
    head_model& m = model[head];
    if constexpr (scorer_decides) {
      m.rows = retrieval_head_kept(cfg.score, c.tokens, head % c.shape.kv_heads, false);
      for (const std::int64_t t : m.rows.tokens)
        m.positions.push_back(static_cast<std::int32_t>(c.start + (t == c.tokens ? last_dropped : t)));
    } else {
      m.rows.tokens = got[head];
      for (const std::int64_t t : got[head]) m.positions.push_back(static_cast<std::int32_t>(c.start + t));
    }
    m.next = c.start + c.tokens;
    m.compaction_rows = static_cast<std::int64_t>(m.rows.tokens.size());
  }
  check_contents<Scheme>(view, model, "after compress");
  check_attention<Scheme>(view, c, model, all_k, all_v, "attend after compress");
  if constexpr (Variant::validate_after_attend) {
    ASSERT_NO_THROW(Scheme::layout::validate("property_test", view));
  }

  // Appends.
  for (std::size_t k = 0; k < c.appends.size(); ++k) {
    const append_op& op = c.appends[k];
    const std::string when = kt::detail::cat("after append ", k, " of ", op.count, " tokens",
                                             op.b >= 0 ? kt::detail::cat(" to head (", op.b, ", ", op.h, ")") : "");
    if constexpr (layout::ragged_heads) {
      if (op.b >= 0) {
        ASSERT_NO_THROW(Scheme::append_head(view, op.b, op.h, head_rows(c.keys, op.b, op.h, c.tokens + op.offset, op.count),
                                            head_rows(c.values, op.b, op.h, c.tokens + op.offset, op.count)))
            << when;
      }
    }
    if (op.b < 0) {
      ASSERT_NO_THROW(Scheme::append(view, rows(c.keys, c.tokens + op.offset, op.count),
                                     rows(c.values, c.tokens + op.offset, op.count)))
          << when;
    }
    for (std::int64_t head = 0; head < heads; ++head) {
      if (op.b >= 0 && head != op.b * c.shape.kv_heads + op.h) continue;
      head_model& m = model[head];
      for (std::int64_t t = 0; t < op.count; ++t) {
        m.rows.tokens.push_back(tail_base + op.offset + t);
        if (!m.rows.bias.empty()) m.rows.bias.push_back(0.0);
        m.positions.push_back(static_cast<std::int32_t>(m.next++));
      }
    }
    check_contents<Scheme>(view, model, when);
  }
#ifdef PROPERTY_CASE_DEBUG
  if constexpr (std::is_same_v<layout, kt::layout::flat>) std::printf("repacks %lld tight %d\n", static_cast<long long>(*view.repacks), int(c.tight_flat));
#endif
  if (!c.appends.empty()) {
    check_attention<Scheme>(view, c, model, all_k, all_v, "attend after the appends");
    if constexpr (Variant::validate_after_attend) {
    ASSERT_NO_THROW(Scheme::layout::validate("property_test", view));
  }
  }
}

template <class Variant, class... Schemes>
void run_variant_cases(std::uint64_t seed, int cases) {
  std::uint64_t next = seed;
  (
      [&] {
        for (int i = 0; i < cases; ++i) {
          run_case<Schemes, Variant>(next++);
          if (::testing::Test::HasFatalFailure()) return;
        }
      }(),
      ...);
}

template <class... Schemes>
void run_cases(std::uint64_t seed, int cases) {
  run_variant_cases<property_defaults, Schemes...>(seed, cases);
}

}  // namespace kvtrim::testing::property
