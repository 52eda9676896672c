// Decode attention through every codec × layout (contiguous, paged, flat)
// against the double-precision oracle.
//
// Each case compresses an 80-token prefill to 4 sinks + 36 recent tokens,
// appends 1 and then 5 tokens, and attends with 8 query heads over 2 kv heads
// (GQA group 4), head_dim 64, batch 2. Two checks per codec:
//  1. against the oracle over the codec's own decoded keys/values: isolates the
//     attention path (the codec's reader, e.g. low rank's (q·U)·c, must agree
//     with decoding); tolerance 1e-4 = fp32 accumulation over 64 channels and
//     46 tokens of magnitude ≤ 10 (46 · 2^-24 · 10 · a few), vs a double
//     oracle.
//  2. against the oracle over the exact keys/values: the error must stay within
//     the bound the codec's own reconstruction error implies,
//        |out − out̂| ≤ max|v − v̂| + (e^{2δ} − 1)·max|v|,  δ = max_i |q·(k_i −
//        k̂_i)|/√D
//     (softmax weights move by at most a factor e^{±2δ}), plus the same 1e-4.
// For pre-RoPE low rank the exact keys are the keys rotated (by an independent
// double-precision RoPE) to their positions: what attention must see.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <kvtrim/io/low_rank_profile.hpp>
#include <vector>

#include "common/oracle.hpp"
#include "common/structured.hpp"
#include "common/tensors.hpp"

namespace kt = kvtrim;
using namespace kvtrim::testing;

namespace {

constexpr kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
constexpr std::int64_t batch = 2, prefill = 80, keep = 40, sinks = 4, capacity = 64, appended = 6;
constexpr double fp32_tolerance = 1e-4;

template <class Codec, class Layout>
using scheme_for = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

/// A cache of `capacity` tokens per head in each layout. Pages of 32 tokens: a
/// KIVI key group (32 by default) must not straddle two pages.
template <class Scheme>
auto make_cache_for(const typename Scheme::codec::config& codec_config) {
  using layout = typename Scheme::layout;
  const std::int64_t heads = batch * shape.kv_heads;
  if constexpr (std::is_same_v<layout, kt::layout::paged>)
    return Scheme::make_cache(shape, batch, kt::layout::paged::pool_size{heads * (capacity / 32), 32}, codec_config);
  else if constexpr (std::is_same_v<layout, kt::layout::flat>)
    return Scheme::make_cache(shape, batch, kt::layout::flat::pool_size{heads * capacity}, codec_config);
  else
    return Scheme::make_cache(shape, batch, capacity, codec_config);
}

kt::kv_view<const float> tokens(const host_tensor<float, 4>& x, std::int64_t begin, std::int64_t count) {
  kt::kv_view<const float> view = x.cview();
  view.data += begin * view.strides[2];
  view.extents[2] = count;
  return view;
}

struct attention_errors {
  double to_decoded = 0.0;  // vs the oracle over the codec's decoded tokens
  double excess = 0.0;      // max over outputs of (error vs exact oracle) − bound
  double to_exact = 0.0;    // max error vs the exact oracle (reported)
};

struct inputs {
  host_tensor<float, 4> keys =
      structured_tensor({batch, shape.kv_heads, prefill + appended, shape.head_dim}, 12, 0.05, 1);
  host_tensor<float, 4> values =
      structured_tensor({batch, shape.kv_heads, prefill + appended, shape.head_dim}, 12, 0.05, 2);
  host_tensor<float, 3> queries = random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, 3);
};

std::vector<std::int64_t> kept_tokens_list() {
  std::vector<std::int64_t> kept;
  for (std::int64_t t = 0; t < sinks; ++t) kept.push_back(t);
  for (std::int64_t t = prefill - (keep - sinks); t < prefill + appended; ++t) kept.push_back(t);
  return kept;
}

/// Runs the pipeline with `Codec` and measures both errors. `prepare(storage)`
/// runs on the fresh cache (profile bases); `pre_rope` is the RoPE the codec
/// applies.
template <class Codec, class Layout, class Prepare>
attention_errors run_attention(const typename Codec::config& codec_config, const kt::rope* pre_rope,
                               Prepare&& prepare) {
  using scheme = scheme_for<Codec, Layout>;
  const inputs in;
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{keep};
  cfg.score.sinks = sinks;
  auto cache = make_cache_for<scheme>(codec_config);
  prepare(cache.view().storage);
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, prefill, cfg));
  scheme::compress(tokens(in.keys, 0, prefill), tokens(in.values, 0, prefill), cache.view(), cfg,
                   {scratch.data(), scratch.size()});
  scheme::append(cache.view(), tokens(in.keys, prefill, 1), tokens(in.values, prefill, 1));
  scheme::append(cache.view(), tokens(in.keys, prefill + 1, appended - 1),
                 tokens(in.values, prefill + 1, appended - 1));
  const std::vector<std::int64_t> kept = kept_tokens_list();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      EXPECT_EQ(cache.view().head_length(b, h), static_cast<std::int64_t>(kept.size()));

  auto out = make_tensor<float, 3>({batch, shape.q_heads, shape.head_dim});
  scheme::attend(in.queries.cview(), cache.view(), out.view, {});

  // What attention must see: keys rotated to their positions for pre-RoPE
  // codecs.
  host_tensor<float, 4> exact_keys = in.keys;
  exact_keys.view.data = exact_keys.storage.data();
  if (pre_rope)
    apply_rope_in_double(exact_keys, pre_rope->theta, pre_rope->rotary_dim,
                         pre_rope->pairs == kt::rope::pairing::interleaved);

  const std::int64_t n = static_cast<std::int64_t>(kept.size());
  auto decoded_keys = make_tensor<float, 4>({batch, shape.kv_heads, n, shape.head_dim});
  auto decoded_values = make_tensor<float, 4>({batch, shape.kv_heads, n, shape.head_dim});
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t head = b * shape.kv_heads + h, slot = cache.view().slot(b, h, i);
        Codec::load_key(cache.view().storage, head, slot, kt::codec::position_of(cache.view(), b, h, i),
                        &decoded_keys.view(b, h, i, 0));
        Codec::load_value(cache.view().storage, head, slot, &decoded_values.view(b, h, i, 0));
      }

  const auto decoded_oracle = oracle_attention(in.queries.cview(), decoded_keys.cview(), decoded_values.cview(),
                                               shape.kv_heads, [&](std::int64_t, std::int64_t) {
                                                 kept_tokens set;
                                                 for (std::int64_t i = 0; i < n; ++i) set.tokens.push_back(i);
                                                 return set;
                                               });
  const auto exact_oracle = oracle_attention(in.queries.cview(), exact_keys.cview(), in.values.cview(), shape.kv_heads,
                                             [&](std::int64_t, std::int64_t) {
                                               return kept_tokens{kept, {}};
                                             });
  attention_errors errors;
  errors.to_decoded = max_abs_error(out.cview(), decoded_oracle);
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t j = 0; j < shape.q_heads; ++j) {
      const std::int64_t h = j / shape.group_size();
      double delta = 0.0, value_error = 0.0, value_max = 0.0;
      for (std::int64_t i = 0; i < n; ++i) {
        double logit_error = 0.0;
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          const double exact_value = in.values(b, h, kept[i], d);
          logit_error +=
              static_cast<double>(in.queries(b, j, d)) * (exact_keys(b, h, kept[i], d) - decoded_keys(b, h, i, d));
          value_error = std::max(value_error, std::abs(exact_value - decoded_values(b, h, i, d)));
          value_max = std::max(value_max, std::abs(exact_value));
        }
        delta = std::max(delta, std::abs(logit_error) * scale);
      }
      const double bound = value_error + std::expm1(2.0 * delta) * value_max;
      for (std::int64_t d = 0; d < shape.head_dim; ++d) {
        const double error = std::abs(
            out(b, j, d) - exact_oracle[static_cast<std::size_t>((b * shape.q_heads + j) * shape.head_dim + d)]);
        errors.to_exact = std::max(errors.to_exact, error);
        errors.excess = std::max(errors.excess, error - bound);
      }
    }
  return errors;
}

template <class Codec, class Layout>
attention_errors run_attention(const typename Codec::config& codec_config, const kt::rope* pre_rope = nullptr) {
  return run_attention<Codec, Layout>(codec_config, pre_rope, [](const auto&) {});
}

void expect_faithful(const attention_errors& errors, double exact_limit) {
  std::printf(
      "    max |out − oracle|: %.3g over decoded tokens, %.3g over "
      "exact tokens (limit %.3g)\n",
      errors.to_decoded, errors.to_exact, exact_limit);
  EXPECT_LE(errors.to_decoded, fp32_tolerance);
  EXPECT_LE(errors.excess, fp32_tolerance);
  EXPECT_LE(errors.to_exact, exact_limit);
}

/// Whether a layout's views store each slot's position (docs/composition.md
/// §1). Until they do, the pre-RoPE cases cannot be checked: codecs no longer
/// count positions, so attention needs the layout's.
template <class Layout>
constexpr bool stores_positions =
    requires(const typename Layout::template view<kt::codec::fp16, kt::host_space>& view) {
      view.positions.slot_position[0];
    };

#define SKIP_WITHOUT_LAYOUT_POSITIONS()                                                                 \
  if constexpr (!stores_positions<TypeParam>) GTEST_SKIP() << "needs positions stored by the layout " \
                                                              "(issue 9 §1, pending the layout rewrite)"

template <class Layout>
class CodecAttention : public ::testing::Test {};
using all_layouts = ::testing::Types<kt::layout::contiguous, kt::layout::paged, kt::layout::flat>;
struct layout_names {
  template <class Layout>
  static std::string GetName(int) {
    return std::string(Layout::name.substr(Layout::name.find("::") + 2));
  }
};
TYPED_TEST_SUITE(CodecAttention, all_layouts, layout_names);

}  // namespace

// Exact-oracle limits below are the measured errors rounded up about 2×: they
// catch a codec that got worse; the bound check above is the principled one.
TYPED_TEST(CodecAttention, Fp16) { expect_faithful(run_attention<kt::codec::fp16, TypeParam>({}), 5e-3); }

TYPED_TEST(CodecAttention, Int8KiviKeyGroups) { expect_faithful(run_attention<kt::codec::int8, TypeParam>({}), 0.08); }

TYPED_TEST(CodecAttention, Int8PerTokenAsymmetric) {
  expect_faithful(run_attention<kt::codec::int8, TypeParam>({.keys = kt::codec::key_scaling::per_token, .asymmetric = true}),
                  0.08);
}

TYPED_TEST(CodecAttention, Int4AsymmetricGroupsOf16) {
  expect_faithful(run_attention<kt::codec::int4, TypeParam>({.key_group = 16, .asymmetric = true}), 0.8);
}

TYPED_TEST(CodecAttention, Fp8HeadScales) { expect_faithful(run_attention<kt::codec::fp8, TypeParam>({}), 0.7); }

TYPED_TEST(CodecAttention, Fp8FixedScale) {
  expect_faithful(run_attention<kt::codec::fp8, TypeParam>({.scales = kt::codec::fp8_scaling::fixed}), 0.7);
}

TYPED_TEST(CodecAttention, LowRankPostRopeByEnergy) {
  expect_faithful(run_attention<kt::codec::low_rank, TypeParam>({.energy = 0.999, .max_rank = 32}), 0.25);
}

TYPED_TEST(CodecAttention, LowRankFixedRankWithRefresh) {
  // update_freq 2: the 6 appended tokens trigger three refreshes.
  expect_faithful(run_attention<kt::codec::low_rank, TypeParam>({.rank = 16, .update_freq = 2}), 0.25);
}

TYPED_TEST(CodecAttention, LowRankPreRope) {
  SKIP_WITHOUT_LAYOUT_POSITIONS();
  const kt::rope rope{.theta = 10000.0, .rotary_dim = 0, .pairs = kt::rope::pairing::half_split};
  const attention_errors errors = run_attention<kt::codec::low_rank, TypeParam>(
      {.energy = 0.999, .max_rank = 32, .keys = kt::codec::key_space::pre_rope, .rope = rope}, &rope);
  expect_faithful(errors, 0.25);
}

TYPED_TEST(CodecAttention, LowRankPreRopeInterleavedPartial) {
  SKIP_WITHOUT_LAYOUT_POSITIONS();
  const kt::rope rope{.theta = 500000.0, .rotary_dim = 32, .pairs = kt::rope::pairing::interleaved};
  const attention_errors errors =
      run_attention<kt::codec::low_rank, TypeParam>({.rank = 16, .keys = kt::codec::key_space::pre_rope, .rope = rope}, &rope);
  expect_faithful(errors, 0.25);
}

TYPED_TEST(CodecAttention, LowRankCalibratedProfile) {
  const kt::codec::low_rank::config cfg{.rank = 16, .source = kt::codec::basis_source::profile};
  const inputs in;
  auto profile = kt::io::low_rank_profile::empty(1, shape.kv_heads, shape.head_dim);
  profile.calibrate_layer(0, tokens(in.keys, 0, prefill), tokens(in.values, 0, prefill), cfg);
  const attention_errors errors = run_attention<kt::codec::low_rank, TypeParam>(
      cfg, nullptr, [&](const auto& storage) { kt::io::load_profile(storage, profile, 0, batch); });
  expect_faithful(errors, 0.25);
}

TYPED_TEST(CodecAttention, LayeredInt8) {
  expect_faithful(run_attention<kt::codec::layered<kt::codec::int8>, TypeParam>({.recent = 8, .sinks = 4}), 0.08);
}

TYPED_TEST(CodecAttention, LayeredLowRankPreRope) {
  SKIP_WITHOUT_LAYOUT_POSITIONS();
  const kt::rope rope{};
  const kt::codec::layered<kt::codec::low_rank>::config cfg{
      .inner = {.rank = 16, .keys = kt::codec::key_space::pre_rope, .rope = rope}, .recent = 8, .sinks = 4};
  expect_faithful(run_attention<kt::codec::layered<kt::codec::low_rank>, TypeParam>(cfg, &rope), 0.2);
}

TYPED_TEST(CodecAttention, LayeredFp8) {
  expect_faithful(run_attention<kt::codec::layered<kt::codec::fp8>, TypeParam>({.recent = 16, .sinks = 4}), 0.6);
}
