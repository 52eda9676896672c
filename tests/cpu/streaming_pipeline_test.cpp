// The StreamingLLM pipeline end to end: compress(K, V) keeps exactly the sinks
// and the most recent tokens (brute force from the paper's definition), stores
// them bit for bit in order, and attending over the compressed cache equals the
// oracle over that subset. Then: strided inputs, a tokens-major (NHD) mapping,
// append after compress, and lossy storage types.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/oracle.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "common/tolerance.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

struct pipeline_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens, sinks;
  kt::keep_amount keep;
  std::int64_t expected_keep;  // what the budget must resolve to (floor, ≥ 1, ≤ T)
};

std::string case_name(const testing::TestParamInfo<pipeline_case>& info) {
  const pipeline_case& c = info.param;
  return kt::detail::cat("B", c.batch, "_Hkv", c.kv_heads, "_G", c.group, "_D", c.head_dim, "_T", c.tokens, "_S",
                         c.sinks, "_K", c.expected_keep);
}

void PrintTo(const pipeline_case& c, std::ostream* out) {
  *out << kt::detail::cat("{batch ", c.batch, ", kv_heads ", c.kv_heads, ", group ", c.group, ", head_dim ", c.head_dim,
                          ", tokens ", c.tokens, ", sinks ", c.sinks, ", keep ", c.expected_keep, "}");
}

kt::model_shape shape_of(const pipeline_case& c) {
  return {.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
}

template <class Scheme>
typename Scheme::config config_of(const pipeline_case& c) {
  typename Scheme::config cfg;
  cfg.score.sinks = c.sinks;
  cfg.budget.keep = c.keep;
  return cfg;
}

/// Compresses keys/values into `cache` with a workspace of exactly the advertised size.
template <class Scheme, class InputT>
void compress(const kt::tensor_view<InputT, 4>& keys, const kt::tensor_view<InputT, 4>& values,
              typename Scheme::cache_view& cache, const typename Scheme::config& cfg) {
  kts::scratch_buffer scratch(Scheme::compress_workspace(cache.shape, cache.batch, keys.extent(2), cfg));
  Scheme::compress(keys, values, cache, cfg, scratch.get());
}

/// Asserts the cache holds, at positions 0.., exactly rows `kept` of the inputs, bit for bit.
template <class View, class InputT>
void expect_holds_exactly(const View& cache, const kt::tensor_view<InputT, 4>& keys,
                          const kt::tensor_view<InputT, 4>& values, const std::vector<std::int64_t>& kept) {
  ASSERT_EQ(*cache.length, static_cast<std::int64_t>(kept.size()));
  for (std::int64_t b = 0; b < cache.batch; ++b)
    for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h)
      for (std::size_t n = 0; n < kept.size(); ++n) {
        const auto position = static_cast<std::int64_t>(n);
        ASSERT_EQ(kts::cached_row(cache, b, h, position, false), kts::input_row(keys, b, h, kept[n]))
            << "key of (b " << b << ", h " << h << ") at position " << n << " should be token " << kept[n];
        ASSERT_EQ(kts::cached_row(cache, b, h, position, true), kts::input_row(values, b, h, kept[n]))
            << "value of (b " << b << ", h " << h << ") at position " << n << " should be token " << kept[n];
      }
}

class StreamingPipeline : public testing::TestWithParam<pipeline_case> {};

TEST_P(StreamingPipeline, KeepsSinksAndRecentTokensInOrder) {
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const pipeline_case& c = GetParam();
  const auto cfg = config_of<scheme>(c);
  EXPECT_EQ(kt::budget::uniform::max_keep(cfg.budget, c.tokens), c.expected_keep);
  auto keys = kts::random_tensor<float, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 101);
  auto values = kts::random_tensor<float, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 102);
  auto cache = scheme::make_cache(shape_of(c), c.batch, c.expected_keep + 3, kt::codec::fp32::config{});
  compress<scheme>(keys.view, values.view, cache.view(), cfg);
  expect_holds_exactly(cache.view(), keys.view, values.view, kts::streaming_kept(c.tokens, c.sinks, c.expected_keep));
}

TEST_P(StreamingPipeline, AttendingEqualsOracleOverKeptSubset) {
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const pipeline_case& c = GetParam();
  const kt::model_shape shape = shape_of(c);
  auto keys = kts::random_tensor<float, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 111);
  auto values = kts::random_tensor<float, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 112);
  auto queries = kts::random_tensor<float, 3>({c.batch, shape.q_heads, c.head_dim}, 113);
  auto out = kts::make_tensor<float, 3>({c.batch, shape.q_heads, c.head_dim});
  auto cache = scheme::make_cache(shape, c.batch, c.expected_keep, kt::codec::fp32::config{});
  compress<scheme>(keys.view, values.view, cache.view(), config_of<scheme>(c));
  scheme::attend(queries.view, cache.view(), out.view, kt::workspace{});

  const auto kept = [&](std::int64_t, std::int64_t) {
    return kts::kept_tokens{kts::streaming_kept(c.tokens, c.sinks, c.expected_keep), {}};
  };
  const auto oracle = kts::oracle_attention(queries.view, keys.view, values.view, c.kv_heads, kept);
  const auto bounds = kts::attention_bounds(queries.view, keys.view, values.view, c.kv_heads, kept, {});
  const auto check = kts::check_against(out.view, oracle, bounds);
  EXPECT_LE(check.worst_ratio, 1.0) << "worst |error| " << check.worst_error;
}

TEST_P(StreamingPipeline, StridedInputsGiveTheSameCacheAsDenseOnes) {
  // Padding on every axis holds NaN: a read of it would poison the cache.
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const pipeline_case& c = GetParam();
  const auto cfg = config_of<scheme>(c);
  const std::array<std::int64_t, 4> extents{c.batch, c.kv_heads, c.tokens, c.head_dim};
  auto keys = kts::random_tensor<float, 4>(extents, 121, 1.0f, {1, 2, 3, 5});
  auto values = kts::random_tensor<float, 4>(extents, 122, 1.0f, {2, 1, 1, 3});
  ASSERT_FALSE(keys.view.is_contiguous());
  auto cache = scheme::make_cache(shape_of(c), c.batch, c.expected_keep, kt::codec::fp32::config{});
  compress<scheme>(keys.view, values.view, cache.view(), cfg);
  expect_holds_exactly(cache.view(), keys.view, values.view, kts::streaming_kept(c.tokens, c.sinks, c.expected_keep));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, StreamingPipeline,
    testing::Values(
        pipeline_case{1, 2, 1, 64, 300, 4, kt::keep_tokens{64}, 64},
        pipeline_case{3, 2, 4, 128, 300, 4, kt::keep_ratio{0.2}, 60},
        pipeline_case{2, 1, 8, 64, 100, 4, kt::keep_tokens{10}, 10},
        pipeline_case{1, 1, 8, 128, 1000, 4, kt::keep_ratio{0.1}, 100},
        pipeline_case{2, 4, 1, 64, 129, 4, kt::keep_ratio{0.5}, 64},
        // one token; fewer tokens than the budget (everything is kept)
        pipeline_case{1, 2, 4, 64, 1, 4, kt::keep_tokens{16}, 1},
        pipeline_case{2, 2, 4, 128, 5, 4, kt::keep_tokens{16}, 5},
        pipeline_case{2, 2, 1, 64, 7, 4, kt::keep_ratio{0.05}, 1},
        // no sinks: the most recent only; a budget below the sink count: the first sinks only
        pipeline_case{1, 2, 1, 64, 50, 0, kt::keep_tokens{20}, 20},
        pipeline_case{1, 2, 4, 64, 50, 4, kt::keep_tokens{2}, 2},
        pipeline_case{1, 2, 4, 64, 50, 4, kt::keep_tokens{4}, 4}),
    case_name);

// ---- an engine's own memory, tokens-major ----------------------------------------

TEST(StreamingPipelineLayouts, TokensMajorMappingStoresTokensHeadsInterleaved) {
  // An engine whose cache is [batch, token, kv_head, D] ("NHD") binds its memory
  // and sets the mapping; compress writes there and attend reads there, giving
  // bit-for-bit the heads-major result (same arithmetic, other addresses).
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::int64_t batch = 2, tokens = 90, capacity = 24;
  scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{20};
  auto keys = kts::random_tensor<float, 4>({batch, 2, tokens, 64}, 131);
  auto values = kts::random_tensor<float, 4>({batch, 2, tokens, 64}, 132);
  auto queries = kts::random_tensor<float, 3>({batch, 8, 64}, 133);

  std::vector<std::byte> engine_memory(scheme::cache_view::bytes(shape, batch, capacity, {}));
  scheme::cache_view nhd = scheme::cache_view::bind(engine_memory.data(), shape, batch, capacity, {});
  nhd.map = kt::layout::contiguous::mapping::tokens_major(shape.kv_heads, capacity);
  compress<scheme>(keys.view, values.view, nhd, cfg);

  // Physical placement: slot = b·H·C + i·H + h, key row at keys + slot·D.
  const auto kept = kts::streaming_kept(tokens, 4, 20);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::size_t n = 0; n < kept.size(); ++n) {
        const float* row = nhd.storage.keys + (b * 2 * capacity + static_cast<std::int64_t>(n) * 2 + h) * 64;
        ASSERT_EQ(std::vector<float>(row, row + 64), kts::input_row(keys.view, b, h, kept[n]));
      }

  auto hnd = scheme::make_cache(shape, batch, capacity, kt::codec::fp32::config{});
  compress<scheme>(keys.view, values.view, hnd.view(), cfg);
  auto out_nhd = kts::make_tensor<float, 3>({batch, 8, 64});
  auto out_hnd = kts::make_tensor<float, 3>({batch, 8, 64});
  scheme::attend(queries.view, nhd, out_nhd.view, kt::workspace{});
  scheme::attend(queries.view, hnd.view(), out_hnd.view, kt::workspace{});
  EXPECT_EQ(out_nhd.storage, out_hnd.storage);
}

// ---- append after compress -----------------------------------------------------------

template <class Codec>
class AppendAfterCompress : public testing::Test {};
TYPED_TEST_SUITE(AppendAfterCompress, kts::plain_codecs);

TYPED_TEST(AppendAfterCompress, NewTokensFollowTheKeptOnesExactly) {
  // One tensor holds the prefill (tokens 0..T−1) and three decode steps (T..T+2);
  // compress reads a strided sub-view of the first T, append the next ones. The
  // cache must then be kept ++ [T, T+1, T+2], bit for bit (inputs of the storage
  // type are stored exactly), and attention must match the oracle over that set.
  using codec = TypeParam;
  using element = typename codec::element;
  using scheme = kts::streaming_scheme<codec>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 128};
  const std::int64_t batch = 2, prefill = 40, steps = 3;
  auto keys = kts::random_tensor<element, 4>({batch, 2, prefill + steps, 128}, 141);
  auto values = kts::random_tensor<element, 4>({batch, 2, prefill + steps, 128}, 142);
  const auto tokens_from = [](const kt::tensor_view<element, 4>& all, std::int64_t first, std::int64_t count) {
    kt::tensor_view<element, 4> part = all;
    part.data += first * all.stride(2);
    part.extents[2] = count;
    return part;
  };
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{12};
  auto cache = scheme::make_cache(shape, batch, std::int64_t{16}, typename codec::config{});
  compress<scheme>(tokens_from(keys.view, 0, prefill), tokens_from(values.view, 0, prefill), cache.view(), cfg);
  scheme::append(cache.view(), tokens_from(keys.view, prefill, 2), tokens_from(values.view, prefill, 2));
  scheme::append(cache.view(), tokens_from(keys.view, prefill + 2, 1), tokens_from(values.view, prefill + 2, 1));

  auto expected = kts::streaming_kept(prefill, 4, 12);  // 0..3, 32..39
  for (std::int64_t t = prefill; t < prefill + steps; ++t) expected.push_back(t);
  expect_holds_exactly(cache.view(), keys.view, values.view, expected);

  auto queries = kts::random_tensor<element, 3>({batch, 8, 128}, 143);
  auto out = kts::make_tensor<float, 3>({batch, 8, 128});
  scheme::attend(queries.view, cache.view(), out.view, kt::workspace{});
  const auto kept = [&](std::int64_t, std::int64_t) { return kts::kept_tokens{expected, {}}; };
  const auto oracle = kts::oracle_attention(queries.view, keys.view, values.view, 2, kept);
  const auto bounds = kts::attention_bounds(queries.view, keys.view, values.view, 2, kept, {});
  const auto check = kts::check_against(out.view, oracle, bounds);
  EXPECT_LE(check.worst_ratio, 1.0) << "worst |error| " << check.worst_error;
}

TYPED_TEST(AppendAfterCompress, CompressReplacesWhatTheCacheHeld) {
  using codec = TypeParam;
  using element = typename codec::element;
  using scheme = kts::streaming_scheme<codec>;
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 2, .head_dim = 64};
  auto first = kts::random_tensor<element, 4>({1, 2, 30, 64}, 151);
  auto second = kts::random_tensor<element, 4>({1, 2, 20, 64}, 152);
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{8};
  auto cache = scheme::make_cache(shape, std::int64_t{1}, std::int64_t{10}, typename codec::config{});
  compress<scheme>(first.view, first.view, cache.view(), cfg);
  ASSERT_EQ(*cache.view().length, 8);
  compress<scheme>(second.view, second.view, cache.view(), cfg);  // a new prefill: not 8 + 8
  expect_holds_exactly(cache.view(), second.view, second.view, kts::streaming_kept(20, 4, 8));
}

// ---- lossy storage through the whole pipeline ------------------------------------------

TYPED_TEST(AppendAfterCompress, Fp32InputsRoundedIntoStorageStayWithinBound) {
  using codec = TypeParam;
  using element = typename codec::element;
  using scheme = kts::streaming_scheme<codec>;
  const double unit_roundoff = kts::rounding_from_fp32<element>();
  const kt::model_shape shape{.q_heads = 16, .kv_heads = 4, .head_dim = 128};
  const std::int64_t batch = 2, tokens = 500;
  auto keys = kts::random_tensor<float, 4>({batch, 4, tokens, 128}, 161);
  auto values = kts::random_tensor<float, 4>({batch, 4, tokens, 128}, 162);
  auto queries = kts::random_tensor<float, 3>({batch, 16, 128}, 163);
  auto out = kts::make_tensor<float, 3>({batch, 16, 128});
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.25};
  auto cache = scheme::make_cache(shape, batch, std::int64_t{125}, typename codec::config{});
  compress<scheme>(keys.view, values.view, cache.view(), cfg);
  scheme::attend(queries.view, cache.view(), out.view, kt::workspace{});
  const auto kept = [&](std::int64_t, std::int64_t) { return kts::kept_tokens{kts::streaming_kept(tokens, 4, 125), {}}; };
  const auto oracle = kts::oracle_attention(queries.view, keys.view, values.view, 4, kept);
  const auto bounds = kts::attention_bounds(queries.view, keys.view, values.view, 4, kept, {.storage = unit_roundoff});
  const auto check = kts::check_against(out.view, oracle, bounds);
  EXPECT_LE(check.worst_ratio, 1.0) << kt::element_traits<element>::name << ": worst |error| " << check.worst_error;
}

}  // namespace
