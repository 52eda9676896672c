// Decode attention over an uncompressed contiguous cache against the
// double-precision oracle: GQA groups 1, 4, 8; head dims 64, 128; one token to
// a few hundred; batch 1 and 3; fp32/fp16/bf16 storage; strided inputs and
// outputs. Tolerances: tests/common/tolerance.hpp.
#include <gtest/gtest.h>

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/oracle.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "common/tolerance.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

struct attention_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens;
};

std::string case_name(const testing::TestParamInfo<attention_case>& info) {
  const attention_case& c = info.param;
  return kt::detail::cat("B", c.batch, "_Hkv", c.kv_heads, "_G", c.group, "_D", c.head_dim, "_T", c.tokens);
}

void PrintTo(const attention_case& c, std::ostream* out) {
  *out << kt::detail::cat("{batch ", c.batch, ", kv_heads ", c.kv_heads, ", group ", c.group, ", head_dim ", c.head_dim,
                          ", tokens ", c.tokens, "}");
}

/// Fills a cache of exactly `tokens` slots by append (so every token is
/// attended), attends, and returns the worst error / bound ratio.
template <class Codec, class InputT, class OutT>
kts::bound_check attend_full_cache(const attention_case& c, kts::rounding extra, std::uint64_t seed,
                                   bool strided = false) {
  using scheme = kts::streaming_scheme<Codec>;
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::array<std::int64_t, 4> kv_padding = strided ? std::array<std::int64_t, 4>{1, 2, 3, 4}
                                                         : std::array<std::int64_t, 4>{};
  const std::array<std::int64_t, 3> q_padding = strided ? std::array<std::int64_t, 3>{1, 1, 3}
                                                        : std::array<std::int64_t, 3>{};
  auto keys = kts::random_tensor<InputT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed, 1.0f, kv_padding);
  auto values = kts::random_tensor<InputT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed + 1, 1.0f, kv_padding);
  auto queries = kts::random_tensor<InputT, 3>({c.batch, shape.q_heads, c.head_dim}, seed + 2, 1.0f, q_padding);
  auto out = kts::make_tensor<OutT, 3>({c.batch, shape.q_heads, c.head_dim}, q_padding);

  auto cache = scheme::make_cache(shape, c.batch, c.tokens, typename Codec::config{});
  scheme::append(cache.view(), keys.view, values.view);
  EXPECT_EQ(*cache.view().length, c.tokens);
  scheme::attend(queries.view, cache.view(), out.view, kt::workspace{});

  if (strided) {  // the padding (NaN) is never written
    std::size_t untouched = 0;
    for (const OutT& x : out.storage) untouched += std::isnan(kt::to_float(x)) ? 1 : 0;
    EXPECT_EQ(static_cast<std::int64_t>(untouched),
              static_cast<std::int64_t>(out.storage.size()) - c.batch * shape.q_heads * c.head_dim);
  }
  const auto every_token = [&](std::int64_t, std::int64_t) { return kts::kept_tokens{kts::all_tokens(c.tokens), {}}; };
  const auto oracle = kts::oracle_attention(queries.view, keys.view, values.view, c.kv_heads, every_token);
  const auto bounds = kts::attention_bounds(queries.view, keys.view, values.view, c.kv_heads, every_token, extra);
  return kts::check_against(out.view, oracle, bounds);
}

/// attend_full_cache, then the worst error must be within the bound.
template <class Codec, class InputT, class OutT>
void expect_within_bound(const attention_case& c, kts::rounding extra, std::uint64_t seed, bool strided = false) {
  const auto check = attend_full_cache<Codec, InputT, OutT>(c, extra, seed, strided);
  EXPECT_LE(check.worst_ratio, 1.0) << "storage " << Codec::name << ", inputs "
                                    << kt::element_traits<InputT>::name << ", output "
                                    << kt::element_traits<OutT>::name << ": worst |error| " << check.worst_error;
}

class DecodeAttention : public testing::TestWithParam<attention_case> {};

TEST_P(DecodeAttention, Fp32MatchesOracle) { expect_within_bound<kt::codec::fp32, float, float>(GetParam(), {}, 11); }

TEST_P(DecodeAttention, Fp16InputsStoredExactly) {
  // Inputs already fp16: the codec stores them exactly, only fp32 arithmetic errs.
  expect_within_bound<kt::codec::fp16, kt::half, float>(GetParam(), {}, 12);
}

TEST_P(DecodeAttention, StridedInputsAndOutput) {
  expect_within_bound<kt::codec::fp32, float, float>(GetParam(), {}, 13, /*strided=*/true);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeAttention,
                         testing::Values(attention_case{1, 2, 1, 64, 1}, attention_case{1, 2, 4, 64, 1},
                                         attention_case{1, 1, 8, 128, 1}, attention_case{1, 2, 1, 64, 37},
                                         attention_case{3, 2, 4, 64, 37}, attention_case{2, 1, 8, 64, 37},
                                         attention_case{1, 4, 1, 128, 300}, attention_case{3, 2, 4, 128, 300},
                                         attention_case{2, 2, 8, 128, 300}, attention_case{2, 8, 1, 64, 129}),
                         case_name);

// ---- storage types: what rounding into the cache costs ------------------------

template <class Codec>
class StorageTypes : public testing::Test {};
TYPED_TEST_SUITE(StorageTypes, kts::plain_codecs);

TYPED_TEST(StorageTypes, InputsOfTheStorageTypeAreStoredExactly) {
  using element = typename TypeParam::element;
  expect_within_bound<TypeParam, element, float>({2, 2, 4, 64, 50}, {}, 21);
}

TYPED_TEST(StorageTypes, Fp32InputsRoundedIntoStorage) {
  // The cache rounds fp32 keys and values to its element type: the bound grows
  // by the type's unit roundoff (keys through the logits, values directly).
  using element = typename TypeParam::element;
  expect_within_bound<TypeParam, float, float>({2, 2, 4, 128, 200}, {.storage = kts::rounding_from_fp32<element>()}, 22);
}

TYPED_TEST(StorageTypes, OutputInTheStorageType) {
  using element = typename TypeParam::element;
  expect_within_bound<TypeParam, element, element>({1, 2, 8, 64, 64}, {.output = kts::rounding_from_fp32<element>()}, 23);
}

TYPED_TEST(StorageTypes, RoundToNearestOnStore) {
  // |stored − x| ≤ u·|x| + η for every element: round to nearest, with η half the
  // smallest subnormal (gradual underflow: fp16 reaches it for |x| < 6.1e-5, which
  // N(0,1) data does now and then). No overflow for N(0,1) data.
  using codec = TypeParam;
  using scheme = kts::streaming_scheme<codec>;
  using element = typename codec::element;
  const double unit_roundoff = kt::element_traits<element>::unit_roundoff;
  const double underflow = static_cast<double>(static_cast<float>(std::numeric_limits<element>::denorm_min())) / 2;
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 2, .head_dim = 64};
  auto keys = kts::random_tensor<float, 4>({1, 2, 40, 64}, 31);
  auto values = kts::random_tensor<float, 4>({1, 2, 40, 64}, 32);
  auto cache = scheme::make_cache(shape, std::int64_t{1}, std::int64_t{40}, typename codec::config{});
  scheme::append(cache.view(), keys.view, values.view);
  double worst = 0.0;
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 0; i < 40; ++i)
      for (const bool value : {false, true}) {
        const auto stored = kts::cached_row(cache.view(), 0, h, i, value);
        const auto input = kts::input_row(value ? values.view : keys.view, 0, h, i);
        for (std::size_t d = 0; d < stored.size(); ++d)
          worst = std::max(worst, std::abs(static_cast<double>(stored[d]) - input[d]) /
                                      (unit_roundoff * std::abs(input[d]) + underflow));
      }
  EXPECT_LE(worst, 1.0);
  if (!std::is_same_v<element, float>) {
    EXPECT_GT(worst, 0.25);  // it does round, by about u at worst
  }
}

// ---- known values -----------------------------------------------------------------

TEST(DecodeAttentionValues, TwoTokensWithKnownWeights) {
  // D = 4, √D = 2. q = e0; k0 = 0 (logit 0), k1 = 2·ln3·e0 (logit ln 3): weights
  // 1/4 and 3/4. v0 = 1, v1 = 5 in every dimension: out = 1/4 + 15/4 = 4.
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const kt::model_shape shape{.q_heads = 1, .kv_heads = 1, .head_dim = 4};
  std::vector<float> keys(8, 0.0f), values{1, 1, 1, 1, 5, 5, 5, 5}, query{1, 0, 0, 0}, out(4);
  keys[4] = 2.0f * std::log(3.0f);
  auto cache = scheme::make_cache(shape, std::int64_t{1}, std::int64_t{2}, kt::codec::fp32::config{});
  scheme::append(cache.view(), kt::make_view(keys.data(), std::array<std::int64_t, 4>{1, 1, 2, 4}),
                 kt::make_view(values.data(), std::array<std::int64_t, 4>{1, 1, 2, 4}));
  scheme::attend(kt::make_view(query.data(), std::array<std::int64_t, 3>{1, 1, 4}), cache.view(),
                 kt::make_view(out.data(), std::array<std::int64_t, 3>{1, 1, 4}), kt::workspace{});
  for (const float x : out) EXPECT_NEAR(x, 4.0f, 8 * kts::fp32_unit_roundoff * 4.0);
}

TEST(DecodeAttentionValues, QueryHeadReadsItsOwnGroupsKvHead) {
  // Two kv heads whose values are constant 0 and 1, group 4: query heads 0-3 must
  // output exactly 0, heads 4-7 exactly 1 (consecutive groups, as repeat_kv does).
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  auto keys = kts::random_tensor<float, 4>({1, 2, 10, 64}, 41);
  auto values = kts::make_tensor<float, 4>({1, 2, 10, 64});
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 0; i < 10; ++i)
      for (std::int64_t d = 0; d < 64; ++d) values(std::int64_t{0}, h, i, d) = static_cast<float>(h);
  auto queries = kts::random_tensor<float, 3>({1, 8, 64}, 42);
  auto out = kts::make_tensor<float, 3>({1, 8, 64});
  auto cache = scheme::make_cache(shape, std::int64_t{1}, std::int64_t{10}, kt::codec::fp32::config{});
  scheme::append(cache.view(), keys.view, values.view);
  scheme::attend(queries.view, cache.view(), out.view, kt::workspace{});
  for (std::int64_t j = 0; j < 8; ++j)
    for (std::int64_t d = 0; d < 64; ++d) EXPECT_NEAR(out(std::int64_t{0}, j, d), j < 4 ? 0.0f : 1.0f, 1e-6f);
}

TEST(DecodeAttentionValues, ToleranceCatchesOneMissingToken) {
  // The bound is tight enough to fail a test when any single token is dropped:
  // the oracle without token t differs from the full one by more than the bound.
  const std::int64_t batch = 2, kv_heads = 2, q_heads = 8, head_dim = 128, tokens = 37;
  auto keys = kts::random_tensor<float, 4>({batch, kv_heads, tokens, head_dim}, 51);
  auto values = kts::random_tensor<float, 4>({batch, kv_heads, tokens, head_dim}, 52);
  auto queries = kts::random_tensor<float, 3>({batch, q_heads, head_dim}, 53);
  const auto every_token = [&](std::int64_t, std::int64_t) { return kts::kept_tokens{kts::all_tokens(tokens), {}}; };
  const auto full = kts::oracle_attention(queries.view, keys.view, values.view, kv_heads, every_token);
  const auto bounds = kts::attention_bounds(queries.view, keys.view, values.view, kv_heads, every_token, {});
  for (std::int64_t missing = 0; missing < tokens; ++missing) {
    const auto without = [&](std::int64_t, std::int64_t) {
      auto kept = kts::all_tokens(tokens);
      kept.erase(kept.begin() + missing);
      return kts::kept_tokens{kept, {}};
    };
    const auto dropped = kts::oracle_attention(queries.view, keys.view, values.view, kv_heads, without);
    double worst_ratio = 0.0;
    for (std::size_t e = 0; e < full.size(); ++e)
      worst_ratio = std::max(worst_ratio, std::abs(full[e] - dropped[e]) / bounds[e / head_dim]);
    EXPECT_GT(worst_ratio, 1.0) << "dropping token " << missing << " stays within the tolerance";
  }
}

}  // namespace

// The AVX2/FMA/F16C loops of decode attention (backend/cpu/detail/x86.hpp) on their
// own: cpu_kernels_test.cpp.

