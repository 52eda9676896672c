// score::retrieval_head (RazorAttention): the probe, calibration on synthetic
// attention maps with planted induction / echo heads, retrieval-head
// selection, and compression with the compensation token over layout::paged
// and layout::flat against the double-precision oracle.
//
// Tolerances: fp32 storage, so attention differs from the oracle only by fp32
// arithmetic (≲ (D + T)·2^-24 relative on outputs ≲ 5 → 3e-5). The compensation
// token's key is the mean of the dropped keys summed in double then rounded to
// fp32 once (≤ 2^-24 relative, checked at 1e-6 absolute for |mean| < 1).
// Calibration scores are double sums of the same fp32 probabilities in another
// order than the brute-force token-matching oracle: 1e-12.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "common/oracle.hpp"
#include "common/policy_oracle.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"

namespace kt = kvtrim;
using razor = kt::score::retrieval_head;

namespace {

constexpr double tolerance = 3e-5;

// ---- probe ------------------------------------------------------------------------

TEST(RetrievalHeadProbe, DefaultsFollowThePaper) {
  const razor::probe_config probe;
  EXPECT_EQ(probe.block, 2500);
  EXPECT_EQ(probe.repeats, 4);
  EXPECT_EQ(probe.first_id, 10000);
  EXPECT_EQ(probe.end_id, 12500);
  const auto sequence = razor::make_probe(probe);
  ASSERT_EQ(static_cast<std::int64_t>(sequence.size()), 1 + 2500 * 4);
  EXPECT_EQ(sequence[0], probe.bos_id);
  std::set<std::int32_t> block(sequence.begin() + 1, sequence.begin() + 2501);
  EXPECT_EQ(block.size(), 2500u) << "ids are distinct within a block";
  EXPECT_GE(*block.begin(), 10000);
  EXPECT_LT(*block.rbegin(), 12500);
  for (std::size_t p = 2501; p < sequence.size(); ++p) EXPECT_EQ(sequence[p], sequence[p - 2500]);
  std::vector<std::int32_t> sorted(sequence.begin() + 1, sequence.begin() + 2501);
  EXPECT_FALSE(std::is_sorted(sorted.begin(), sorted.end())) << "the block is shuffled";
}

TEST(RetrievalHeadProbe, SeededAndConfigurable) {
  razor::probe_config probe{.block = 50, .repeats = 3, .first_id = 7, .end_id = 60, .bos_id = 128000, .seed = 5};
  const auto a = razor::make_probe(probe);
  EXPECT_EQ(a, razor::make_probe(probe));
  probe.seed = 6;
  EXPECT_NE(a, razor::make_probe(probe));
  EXPECT_EQ(a.size(), 151u);
  EXPECT_EQ(a[0], 128000);
  for (std::size_t p = 1; p < a.size(); ++p) EXPECT_TRUE(a[p] >= 7 && a[p] < 60);
}

TEST(RetrievalHeadProbe, TooShortOrTooFewIdsThrow) {
  EXPECT_THROW(razor::make_probe({.block = 1}), kt::error);
  EXPECT_THROW(razor::make_probe({.repeats = 1}), kt::error);
  EXPECT_THROW(razor::make_probe({.block = 100, .first_id = 0, .end_id = 99}), kt::error);
  EXPECT_THROW(razor::make_probe({.first_id = -5, .end_id = 3000}), kt::error);
  try {
    razor::make_probe({.repeats = 1});
  } catch (const kt::error& failure) {
    EXPECT_NE(std::string(failure.what()).find("probe.repeats"), std::string::npos) << failure.what();
  }
}

// ---- calibration on synthetic attention maps -------------------------------------

enum class head_kind { local, induction, echo };

/// A causal attention map over the probe for one head: a local background
/// (weights e^{−distance/2}) holding 1 − mass, plus `mass` spread evenly over
/// the earlier copies' positions (echo: p − kN) or their successors
/// (induction: p − kN + 1). Rows before the second block are background only.
std::vector<float> synthetic_map(const razor::probe_config& probe, head_kind kind, float mass) {
  const std::int64_t length = probe.length(), block = probe.block;
  std::vector<float> map(static_cast<std::size_t>(length * length), 0.0f);
  for (std::int64_t p = 0; p < length; ++p) {
    float* row = &map[static_cast<std::size_t>(p * length)];
    const std::int64_t copies = p >= 1 + block ? (p - 1) / block : 0;
    const float planted = kind == head_kind::local || copies == 0 ? 0.0f : mass;
    double total = 0.0;
    for (std::int64_t j = 0; j <= p; ++j) total += std::exp(-static_cast<double>(p - j) / 2.0);
    for (std::int64_t j = 0; j <= p; ++j)
      row[j] = static_cast<float>((1.0 - planted) * std::exp(-static_cast<double>(p - j) / 2.0) / total);
    for (std::int64_t k = 1; k <= copies && planted > 0.0f; ++k)
      row[p - k * block + (kind == head_kind::induction ? 1 : 0)] += planted / static_cast<float>(copies);
  }
  return map;
}

/// Echo and induction of one map by the definition with token matching (ids are
/// distinct within a block, so "an earlier copy of my token" is unambiguous).
std::pair<double, double> brute_force_scores(const std::vector<std::int32_t>& tokens, const std::vector<float>& map,
                                             std::int64_t block) {
  const auto length = static_cast<std::int64_t>(tokens.size());
  double echo = 0.0, induction = 0.0;
  for (std::int64_t p = 1 + block; p < length; ++p)
    for (std::int64_t j = 1; j < p; ++j) {
      const float a = map[static_cast<std::size_t>(p * length + j)];
      if (tokens[static_cast<std::size_t>(j)] == tokens[static_cast<std::size_t>(p)]) echo += a;
      if (j >= 2 && tokens[static_cast<std::size_t>(j - 1)] == tokens[static_cast<std::size_t>(p)]) induction += a;
    }
  const auto rows = static_cast<double>(length - 1 - block);
  return {echo / rows, induction / rows};
}

struct planted_model {
  static constexpr std::int64_t layers = 3;
  kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
  razor::probe_config probe{.block = 16, .repeats = 3, .first_id = 100, .end_id = 200, .seed = 3};
  /// kind and planted mass of every (layer, q head): one special q head per chosen kv head.
  head_kind kind(std::int64_t layer, std::int64_t q) const {
    if (layer == 0 && q == 1) return head_kind::induction;  // kv (0, 0), strong
    if (layer == 2 && q == 2) return head_kind::induction;  // kv (2, 1), strong
    if (layer == 1 && q == 3) return head_kind::induction;  // kv (1, 1), weak: must lose the ranking
    if (layer == 1 && q == 0) return head_kind::echo;       // kv (1, 0)
    return head_kind::local;
  }
  float mass(std::int64_t layer, std::int64_t q) const { return layer == 1 && q == 3 ? 0.2f : 0.7f; }
  std::vector<float> map(std::int64_t layer, std::int64_t q) const {
    return synthetic_map(probe, kind(layer, q), mass(layer, q));
  }
};

/// The attention of every q head of `layer`, rows [first, first + rows), as [q_heads, rows, L].
std::vector<float> row_block(const planted_model& model, std::int64_t layer, std::int64_t first, std::int64_t rows) {
  const std::int64_t length = model.probe.length();
  std::vector<float> out;
  for (std::int64_t q = 0; q < model.shape.q_heads; ++q) {
    const auto map = model.map(layer, q);
    out.insert(out.end(), map.begin() + first * length, map.begin() + (first + rows) * length);
  }
  return out;
}

void feed(const planted_model& model, razor::calibration& calibration) {
  const std::int64_t length = model.probe.length();
  // Rows in three blocks, out of order, as an engine streaming chunks might.
  const std::int64_t blocks[][2] = {{30, length - 30}, {0, 10}, {10, 20}};
  for (std::int64_t layer = 0; layer < model.layers; ++layer)
    for (const auto& range : blocks) {
      auto rows = row_block(model, layer, range[0], range[1]);
      calibration.accumulate(layer,
                             kt::tensor_view<const float, 3>(kt::make_view(
                                 rows.data(), std::array<std::int64_t, 3>{model.shape.q_heads, range[1], length})),
                             range[0]);
    }
}

}  // namespace

TEST(RetrievalHeadCalibration, ScoresMatchTheDefinition) {
  const planted_model model;
  razor::calibration calibration(model.layers, model.shape, model.probe);
  feed(model, calibration);
  const auto scores = calibration.scores();
  const auto tokens = razor::make_probe(model.probe);
  for (std::int64_t layer = 0; layer < model.layers; ++layer)
    for (std::int64_t q = 0; q < model.shape.q_heads; ++q) {
      const auto [echo, induction] = brute_force_scores(tokens, model.map(layer, q), model.probe.block);
      const auto index = static_cast<std::size_t>(layer * model.shape.q_heads + q);
      EXPECT_NEAR(scores.echo_q[index], echo, 1e-12) << "layer " << layer << " q head " << q;
      EXPECT_NEAR(scores.induction_q[index], induction, 1e-12) << "layer " << layer << " q head " << q;
    }
  // kv head score = max over its group of two query heads.
  for (std::int64_t layer = 0; layer < model.layers; ++layer)
    for (std::int64_t h = 0; h < 2; ++h) {
      const auto q0 = static_cast<std::size_t>(layer * 4 + 2 * h);
      EXPECT_EQ(scores.induction_kv[static_cast<std::size_t>(layer * 2 + h)],
                std::max(scores.induction_q[q0], scores.induction_q[q0 + 1]));
      EXPECT_EQ(scores.echo_kv[static_cast<std::size_t>(layer * 2 + h)],
                std::max(scores.echo_q[q0], scores.echo_q[q0 + 1]));
    }
  // A planted induction head scores its mass (plus a tiny background).
  EXPECT_NEAR(scores.induction_q[1], 0.7, 0.01);
  EXPECT_LT(scores.induction_q[0], 0.01);
}

TEST(RetrievalHeadCalibration, FindsExactlyThePlantedHeads) {
  const planted_model model;
  razor::calibration calibration(model.layers, model.shape, model.probe);
  feed(model, calibration);
  // 6 (layer, kv head) pairs: top 2/6 by induction, top 1/6 by echo.
  const auto flags = calibration.scores().select({.induction_fraction = 2.0 / 6.0, .echo_fraction = 1.0 / 6.0});
  const std::vector<bool> expected{true, false,   // layer 0: induction kv 0
                                   true, false,   // layer 1: echo kv 0 (the weak induction kv 1 loses)
                                   false, true};  // layer 2: induction kv 1
  EXPECT_EQ(flags, expected);
  // With a larger induction fraction the weak induction head joins.
  const auto more = calibration.scores().select({.induction_fraction = 0.5, .echo_fraction = 1.0 / 6.0});
  EXPECT_TRUE(more[3]);
}

TEST(RetrievalHeadCalibration, MissingDuplicateOrBadRowsThrow) {
  const planted_model model;
  const std::int64_t length = model.probe.length();
  razor::calibration calibration(model.layers, model.shape, model.probe);
  EXPECT_THROW(calibration.scores(), kt::error);  // nothing yet
  auto rows = row_block(model, 0, 20, 5);
  const kt::tensor_view<const float, 3> view =
      kt::make_view(static_cast<const float*>(rows.data()), std::array<std::int64_t, 3>{4, 5, length});
  calibration.accumulate(0, view, 20);
  EXPECT_THROW(calibration.accumulate(0, view, 20), kt::error);          // the same rows twice
  EXPECT_THROW(calibration.accumulate(3, view, 40), kt::error);          // no layer 3
  EXPECT_THROW(calibration.accumulate(1, view, length - 4), kt::error);  // rows past the probe
  const kt::tensor_view<const float, 3> wrong_heads =
      kt::make_view(static_cast<const float*>(rows.data()), std::array<std::int64_t, 3>{2, 10, length});
  EXPECT_THROW(calibration.accumulate(1, wrong_heads, 20), kt::error);
  rows[static_cast<std::size_t>(length + 21 - 16)] = NAN;  // q head 0, row 21, key 21 − N: an echo position
  EXPECT_THROW(calibration.accumulate(2, view, 20), kt::error);
  EXPECT_THROW(razor::calibration(0, model.shape, model.probe), kt::error);
  EXPECT_THROW(razor::calibration(1, model.shape, razor::probe_config{.repeats = 1}), kt::error);
}

TEST(RetrievalHeadSelection, FractionsRoundUpAndTiesKeepTheLowerHead) {
  EXPECT_EQ(razor::head_count(0.14, 100), 14);  // 0.14·100 = 14.000000000000002 in double
  EXPECT_EQ(razor::head_count(0.01, 256), 3);
  EXPECT_EQ(razor::head_count(0.14, 7), 1);
  EXPECT_EQ(razor::head_count(0.0, 50), 0);
  EXPECT_EQ(razor::head_count(1.0, 7), 7);
  razor::head_scores scores;
  scores.echo_kv.assign(5, 0.5);
  scores.induction_kv.assign(5, 0.25);
  EXPECT_EQ(scores.select({.induction_fraction = 0.4, .echo_fraction = 0.0}),
            (std::vector<bool>{true, true, false, false, false}));
  EXPECT_THROW(scores.select({.induction_fraction = 1.5}), kt::error);
}

// ---- compression -------------------------------------------------------------------

namespace {

template <class Layout>
class RetrievalHeadCompression : public ::testing::Test {};
using layouts = ::testing::Types<kt::layout::paged, kt::layout::flat>;
TYPED_TEST_SUITE(RetrievalHeadCompression, layouts);

template <class Layout>
using razor_scheme = kt::scheme<Layout, razor, kt::budget::by_scorer, kt::codec::fp32, kt::backend::cpu>;

template <class Layout>
typename Layout::pool_size roomy_pool(std::int64_t heads, std::int64_t tokens) {
  if constexpr (std::is_same_v<Layout, kt::layout::paged>)
    return {heads * kt::layout::paged::pages_for(tokens, 8), 8};
  else
    return {heads * tokens};
}

struct razor_problem {
  std::int64_t batch = 2, tokens = 60;
  kt::model_shape shape{.q_heads = 6, .kv_heads = 3, .head_dim = 8};
  razor::config cfg = [] {
    razor::config c;
    c.retrieval = {false, true, false};
    c.min_recent = 20;  // W = max(20, ⌊0.2·60⌋ = 12) = 20; N_d = 60 − 4 − 20 = 36
    return c;
  }();
};

using kt::testing::with_mean_token;

using kt::testing::retrieval_head_kept;

template <class Layout>
struct razor_run {
  razor_problem p;
  kt::testing::host_tensor<float, 4> keys, values;
  kt::testing::host_tensor<float, 3> queries;
  typename razor_scheme<Layout>::cache cache;

  explicit razor_run(const razor_problem& problem, std::int64_t headroom = 0)
      : p(problem),
        keys(kt::testing::random_tensor<float, 4>({p.batch, 3, p.tokens, 8}, 61, 1.0f, {0, 1, 0, 1})),
        values(kt::testing::random_tensor<float, 4>({p.batch, 3, p.tokens, 8}, 62)),
        queries(kt::testing::random_tensor<float, 3>({p.batch, 6, 8}, 63)),
        cache(razor_scheme<Layout>::make_cache(p.shape, p.batch, roomy_pool<Layout>(p.batch * 3, p.tokens + headroom),
                                               kt::codec::fp32::config{})) {}

  void compress() {
    typename razor_scheme<Layout>::config cfg;
    cfg.score = p.cfg;
    std::vector<std::byte> scratch(razor_scheme<Layout>::compress_workspace(p.shape, p.batch, p.tokens, cfg));
    razor_scheme<Layout>::compress(keys.cview(), values.cview(), cache.view(), cfg,
                                   kt::workspace{scratch.data(), scratch.size()});
  }
  double attend_error(const kt::tensor_view<const float, 4>& all_keys, const kt::tensor_view<const float, 4>& all_values,
                      const std::function<kt::testing::kept_tokens(std::int64_t, std::int64_t)>& kept) {
    auto out = kt::testing::make_tensor<float, 3>({p.batch, 6, 8});
    razor_scheme<Layout>::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
    return kt::testing::max_abs_error(out.view,
                                      kt::testing::oracle_attention(queries.cview(), all_keys, all_values, 3, kept));
  }
};

}  // namespace

TYPED_TEST(RetrievalHeadCompression, CompressThenAttendMatchesOracle) {
  razor_run<TypeParam> run{razor_problem{}};
  run.compress();
  const std::int64_t dropped = 36;
  const auto keys = with_mean_token(run.keys.cview(), 4, dropped);
  const auto values = with_mean_token(run.values.cview(), 4, dropped);
  EXPECT_LT(run.attend_error(keys.cview(), values.cview(),
                             [&](std::int64_t, std::int64_t h) { return retrieval_head_kept(run.p.cfg, run.p.tokens, h); }),
            tolerance);
}

TYPED_TEST(RetrievalHeadCompression, RetrievalHeadsKeepEverythingOthersSinksCompensationRecent) {
  razor_run<TypeParam> run{razor_problem{}};
  run.compress();
  const auto& view = run.cache.view();
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h) {
      const std::int64_t head = b * 3 + h;
      if (h == 1) {
        EXPECT_EQ(view.head_length(b, h), 60);
        EXPECT_EQ(view.compensation.index[head], -1);
        for (std::int64_t i = 0; i < 60; ++i)
          EXPECT_EQ(kt::testing::stored_key(view, b, h, i), kt::testing::input_row(run.keys.cview(), b, h, i));
        continue;
      }
      EXPECT_EQ(view.head_length(b, h), 4 + 1 + 20);
      for (std::int64_t i = 0; i < 4; ++i)  // sinks
        EXPECT_EQ(kt::testing::stored_key(view, b, h, i), kt::testing::input_row(run.keys.cview(), b, h, i));
      for (std::int64_t i = 0; i < 20; ++i)  // recent window, after the compensation token
        EXPECT_EQ(kt::testing::stored_key(view, b, h, 5 + i), kt::testing::input_row(run.keys.cview(), b, h, 40 + i));
    }
}

TYPED_TEST(RetrievalHeadCompression, CompensationTokenIsTheMeanOfTheDroppedWithBiasLnNd) {
  razor_run<TypeParam> run{razor_problem{}};
  run.compress();
  const auto& view = run.cache.view();
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h : {0, 2}) {
      const std::int64_t head = b * 3 + h;
      EXPECT_EQ(view.compensation.index[head], 4);
      EXPECT_EQ(view.compensation.bias[head], static_cast<float>(std::log(36.0)));
      EXPECT_EQ(view.logit_bias(b, h, 4), static_cast<float>(std::log(36.0)));
      EXPECT_EQ(view.logit_bias(b, h, 5), 0.0f);
      const auto key = kt::testing::stored_key(view, b, h, 4);
      const auto value = kt::testing::stored_value(view, b, h, 4);
      for (std::int64_t d = 0; d < 8; ++d) {
        double key_mean = 0.0, value_mean = 0.0;
        for (std::int64_t t = 4; t < 40; ++t) {
          key_mean += run.keys(b, h, t, d) / 36.0;
          value_mean += run.values(b, h, t, d) / 36.0;
        }
        EXPECT_NEAR(key[static_cast<std::size_t>(d)], key_mean, 1e-6);
        EXPECT_NEAR(value[static_cast<std::size_t>(d)], value_mean, 1e-6);
      }
    }
}

TYPED_TEST(RetrievalHeadCompression, BiasAfterScaleWeighsLikeNdCopies) {
  // When every dropped token is the same, the compensation token *is* each of
  // them, and attention over the compressed cache must equal attention over the
  // full one. Adding ln N_d before the 1/√D scale would weigh it as N_d^{1/√8}
  // copies instead and miss by far more than the tolerance.
  razor_run<TypeParam> run{razor_problem{}};
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t t = 5; t < 40; ++t)
        for (std::int64_t d = 0; d < 8; ++d) {
          run.keys(b, h, t, d) = run.keys(b, h, 4, d) * 2.0f;  // large logits make the weight visible
          run.values(b, h, t, d) = run.values(b, h, 4, d);
        }
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t d = 0; d < 8; ++d) run.keys(b, h, 4, d) *= 2.0f;
  run.compress();
  const auto everything = [&](std::int64_t, std::int64_t) {
    kt::testing::kept_tokens set;
    for (std::int64_t t = 0; t < 60; ++t) set.tokens.push_back(t);
    return set;
  };
  EXPECT_LT(run.attend_error(run.keys.cview(), run.values.cview(), everything), tolerance);
}

TYPED_TEST(RetrievalHeadCompression, CompressesOnlyWhenTwoOrMoreTokensWouldBeDropped) {
  for (std::int64_t tokens : {24, 25, 26}) {  // S + W = 24: N_d = 0, 1, 2
    razor_problem problem;
    problem.tokens = tokens;
    razor_run<TypeParam> run{problem};
    run.compress();
    const std::int64_t expected = tokens == 26 ? 25 : tokens;
    EXPECT_EQ(run.cache.view().head_length(0, 0), expected) << "T = " << tokens;
    EXPECT_EQ(run.cache.view().compensation.index[0], tokens == 26 ? 4 : -1);
    const auto keys = with_mean_token(run.keys.cview(), 4, 2);
    const auto values = with_mean_token(run.values.cview(), 4, 2);
    EXPECT_LT(run.attend_error(keys.cview(), values.cview(),
                               [&](std::int64_t, std::int64_t h) { return retrieval_head_kept(run.p.cfg, tokens, h); }),
              tolerance)
        << "T = " << tokens;
  }
}

TYPED_TEST(RetrievalHeadCompression, WithoutCompensationKeepsSinksAndRecent) {
  razor_problem problem;
  problem.cfg.compensation = false;
  problem.cfg.recent_fraction = 0.5;  // W = max(20, 30) = 30
  razor_run<TypeParam> run{problem};
  run.compress();
  EXPECT_EQ(run.cache.view().head_length(1, 2), 34);
  EXPECT_EQ(run.cache.view().compensation.index[5], -1);
  EXPECT_LT(run.attend_error(run.keys.cview(), run.values.cview(),
                             [&](std::int64_t, std::int64_t h) { return retrieval_head_kept(problem.cfg, 60, h); }),
            tolerance);
}

TYPED_TEST(RetrievalHeadCompression, AppendAfterCompressKeepsCompensationAndOrder) {
  razor_run<TypeParam> run{razor_problem{}, 12};
  run.compress();
  const auto new_keys = kt::testing::random_tensor<float, 4>({2, 3, 7, 8}, 64);
  const auto new_values = kt::testing::random_tensor<float, 4>({2, 3, 7, 8}, 65);
  for (std::int64_t step = 0; step < 7; ++step) {
    const auto one = [&](const kt::testing::host_tensor<float, 4>& source) {
      return kt::tensor_view<const float, 4>{&source.view(0, 0, step, 0), {2, 3, 1, 8}, source.view.strides};
    };
    razor_scheme<TypeParam>::append(run.cache.view(), one(new_keys), one(new_values));
  }
  EXPECT_EQ(run.cache.view().compensation.index[0], 4);
  // Augmented inputs: prefill (60), then the mean token (index 60), then the 7 appended (61..67).
  const auto with_mean_keys = with_mean_token(run.keys.cview(), 4, 36);
  const auto with_mean_values = with_mean_token(run.values.cview(), 4, 36);
  const auto keys = kt::testing::concat_tokens(with_mean_keys.cview(), new_keys.cview());
  const auto values = kt::testing::concat_tokens(with_mean_values.cview(), new_values.cview());
  const auto kept = [&](std::int64_t, std::int64_t h) {
    auto set = retrieval_head_kept(run.p.cfg, 60, h);
    for (std::int64_t t = 61; t < 68; ++t) {
      set.tokens.push_back(t);
      set.bias.push_back(0.0);
    }
    return set;
  };
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h) {
      const auto order = kept(b, h).tokens;
      ASSERT_EQ(run.cache.view().head_length(b, h), static_cast<std::int64_t>(order.size()));
      for (std::size_t i = 0; i < order.size(); ++i)
        EXPECT_EQ(kt::testing::stored_key(run.cache.view(), b, h, static_cast<std::int64_t>(i)),
                  kt::testing::input_row(keys.cview(), b, h, order[i]));
    }
  EXPECT_LT(run.attend_error(keys.cview(), values.cview(), kept), tolerance);
}

TYPED_TEST(RetrievalHeadCompression, BadConfigThrows) {
  razor_problem problem;
  problem.cfg.retrieval = {true, false};  // 2 flags for 3 kv heads
  razor_run<TypeParam> run{problem};
  try {
    run.compress();
    FAIL() << "a flag count other than kv_heads must throw";
  } catch (const kt::error& failure) {
    EXPECT_NE(std::string(failure.what()).find("config.score.retrieval"), std::string::npos) << failure.what();
  }
  run.p.cfg.retrieval = {true, false, true};
  run.p.cfg.min_recent = 0;
  EXPECT_THROW(run.compress(), kt::error);
  run.p.cfg.min_recent = 4;
  run.p.cfg.sinks = -1;
  EXPECT_THROW(run.compress(), kt::error);
  run.p.cfg.sinks = 4;
  run.p.cfg.recent_fraction = 1.5;
  EXPECT_THROW(run.compress(), kt::error);
}

TEST(RetrievalHead, WindowMath) {
  razor::config cfg;
  EXPECT_EQ(razor::recent_window(cfg, 10000), 4000);
  EXPECT_EQ(razor::recent_window(cfg, 100000), 20000);
  EXPECT_EQ(razor::dropped(cfg, 4005), 0);  // T − S − W − 1 = 0: left whole
  EXPECT_EQ(razor::dropped(cfg, 4006), 2);
  EXPECT_EQ(razor::keep_count(cfg, false, 100000), 4 + 20000 + 1);
  EXPECT_EQ(razor::keep_count(cfg, true, 100000), 100000);
  EXPECT_EQ(razor::keep_count(cfg, false, 3000), 3000);  // window longer than the prefix: nothing to drop
}
