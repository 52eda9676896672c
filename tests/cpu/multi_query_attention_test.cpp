// Multi-query decode attention (speculative decoding: n = 1..8 new tokens per
// sequence) on the CPU reference against the double-precision oracle.
//
// The n new tokens are the cache's last n tokens; query t of n must see exactly
// the head's first L − n + 1 + t tokens. For every t the oracle is the ordinary
// decode oracle over that prefix (tests/common/oracle.hpp) and the tolerance is
// tests/common/tolerance.hpp's bound over the same prefix: the masked tokens
// enter the softmax with weight exactly 0, so a query over a prefix is the same
// computation as a single query over a cache holding only the prefix. A query
// that saw one token too many or too few moves by ~p·|v| ≫ the bound (the
// tightness test of decode_attention_test shows it for one missing token).
// Codecs other than plain go through their attention reader (one query row at a
// time): checked against the oracle over the codec's decoded rows, the reader's
// folded scales counted as two more fp32 roundings per term (u_s = 2u).
#include <gtest/gtest.h>

#include <kvtrim/kvtrim.hpp>

#include <bit>
#include <cmath>
#include <functional>
#include <cstdint>
#include <string>
#include <vector>

#include "common/oracle.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "common/tolerance.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

struct multi_query_case {
  std::int64_t batch, kv_heads, group, head_dim, tokens, queries;  // queries: n new tokens per sequence
};

std::string case_name(const testing::TestParamInfo<multi_query_case>& info) {
  const multi_query_case& c = info.param;
  return kt::detail::cat("B", c.batch, "_Hkv", c.kv_heads, "_G", c.group, "_D", c.head_dim, "_T", c.tokens, "_n",
                         c.queries);
}

void PrintTo(const multi_query_case& c, std::ostream* out) {
  *out << kt::detail::cat("{batch ", c.batch, ", kv_heads ", c.kv_heads, ", group ", c.group, ", head_dim ", c.head_dim,
                          ", tokens ", c.tokens, ", queries ", c.queries, "}");
}

/// Query t of a [B, n, Hq, D] view as a [B, Hq, D] view.
template <class T>
kt::tensor_view<T, 3> query_token(const kt::tensor_view<T, 4>& view, std::int64_t t) {
  return {view.data + t * view.stride(1), {view.extent(0), view.extent(2), view.extent(3)},
          {view.stride(0), view.stride(2), view.stride(3)}};
}

/// Worst error / bound over every query token, each against the oracle over the tokens it sees.
/// `keys`, `values`: [B, Hkv, L, D], what the cache holds (decoded rows for codecs).
template <class QueryT, class KeyT, class OutT>
double worst_ratio(const kt::tensor_view<QueryT, 4>& queries, const kt::tensor_view<KeyT, 4>& keys,
                   const kt::tensor_view<KeyT, 4>& values, const kt::tensor_view<OutT, 4>& out,
                   const std::function<std::int64_t(std::int64_t, std::int64_t)>& length, kts::rounding extra) {
  const std::int64_t n = queries.extent(1), kv_heads = keys.extent(1);
  double worst = 0.0;
  for (std::int64_t t = 0; t < n; ++t) {
    const auto seen = [&](std::int64_t b, std::int64_t h) {
      return kts::kept_tokens{kts::all_tokens(length(b, h) - n + 1 + t), {}};
    };
    const auto q = query_token(queries, t);
    const auto oracle = kts::oracle_attention(q, keys, values, kv_heads, seen);
    const auto bounds = kts::attention_bounds(q, keys, values, kv_heads, seen, extra);
    worst = std::max(worst, kts::check_against(query_token(out, t), oracle, bounds).worst_ratio);
  }
  return worst;
}

template <class Codec, class InputT>
void expect_contiguous_within_bound(const multi_query_case& c, std::uint64_t seed) {
  using scheme = kts::streaming_scheme<Codec>;
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  auto keys = kts::random_tensor<InputT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed);
  auto values = kts::random_tensor<InputT, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, seed + 1);
  // Strided queries and output (padding on every axis): the engine's [B·n, Hq, D] rows are one such view.
  auto queries = kts::random_tensor<InputT, 4>({c.batch, c.queries, shape.q_heads, c.head_dim}, seed + 2, 1.0f,
                                               {1, 2, 1, 3});
  auto out = kts::make_tensor<float, 4>({c.batch, c.queries, shape.q_heads, c.head_dim}, {2, 1, 3, 1});
  auto cache = scheme::make_cache(shape, c.batch, c.tokens, typename Codec::config{});
  scheme::append(cache.view(), keys.view, values.view);
  EXPECT_EQ(scheme::attend_workspace(cache.view(), c.queries), 0u);
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});

  std::size_t untouched = 0;  // the output's padding (NaN) is never written
  for (const float x : out.storage) untouched += std::isnan(x) ? 1 : 0;
  EXPECT_EQ(static_cast<std::int64_t>(untouched),
            static_cast<std::int64_t>(out.storage.size()) - c.batch * c.queries * shape.q_heads * c.head_dim);
  const double ratio = worst_ratio(queries.cview(), keys.cview(), values.cview(), out.cview(),
                                   [&](std::int64_t, std::int64_t) { return c.tokens; }, {});
  EXPECT_LE(ratio, 1.0) << "storage " << Codec::name;
}

class MultiQueryAttention : public testing::TestWithParam<multi_query_case> {};

TEST_P(MultiQueryAttention, Fp32MatchesOracle) { expect_contiguous_within_bound<kt::codec::fp32, float>(GetParam(), 61); }
TEST_P(MultiQueryAttention, Fp16MatchesOracle) {
  expect_contiguous_within_bound<kt::codec::fp16, kt::half>(GetParam(), 62);
}
TEST_P(MultiQueryAttention, Bf16MatchesOracle) {
  expect_contiguous_within_bound<kt::codec::bf16, kt::bfloat16>(GetParam(), 63);
}

#if KVTRIM_X86_DISPATCH
// The portable loops (what a CPU without AVX2/FMA/F16C runs) with n > 1: on an
// x86 machine with AVX2 the cases above take the vectorised path; the switch
// (backend/cpu/detail/x86.hpp) turns it off for this test's process.
TEST_P(MultiQueryAttention, PortablePathsMatchOracle) {
  struct restore_switch {
    ~restore_switch() { kt::detail::x86::vector_paths_enabled() = true; }
  } restore;
  kt::detail::x86::vector_paths_enabled() = false;
  expect_contiguous_within_bound<kt::codec::fp16, kt::half>(GetParam(), 64);
  expect_contiguous_within_bound<kt::codec::bf16, kt::bfloat16>(GetParam(), 65);
  expect_contiguous_within_bound<kt::codec::fp32, float>(GetParam(), 66);
}
#endif

INSTANTIATE_TEST_SUITE_P(
    Shapes, MultiQueryAttention,
    testing::Values(
        // n = L: the first query sees one token; every n from 1 to 8 across the cases
        multi_query_case{1, 2, 1, 64, 1, 1}, multi_query_case{2, 1, 4, 64, 2, 2}, multi_query_case{1, 2, 8, 64, 8, 8},
        multi_query_case{2, 2, 4, 128, 17, 3}, multi_query_case{1, 1, 16, 64, 17, 4},
        multi_query_case{3, 2, 1, 128, 70, 5}, multi_query_case{1, 2, 2, 64, 130, 6},
        multi_query_case{2, 1, 8, 128, 300, 7}, multi_query_case{1, 2, 16, 128, 65, 8},
        multi_query_case{1, 1, 4, 256, 129, 8}),
    case_name);

TEST(MultiQueryAttentionValues, OneQueryIsTheSingleQueryCallBitForBit) {
  using scheme = kts::streaming_scheme<kt::codec::fp16>;
  const kt::model_shape shape{.q_heads = 16, .kv_heads = 2, .head_dim = 64};
  auto keys = kts::random_tensor<kt::half, 4>({2, 2, 200, 64}, 71);
  auto values = kts::random_tensor<kt::half, 4>({2, 2, 200, 64}, 72);
  auto queries = kts::random_tensor<kt::half, 3>({2, 16, 64}, 73);
  auto cache = scheme::make_cache(shape, std::int64_t{2}, std::int64_t{200}, kt::codec::fp16::config{});
  scheme::append(cache.view(), keys.view, values.view);
  auto single = kts::make_tensor<float, 3>({2, 16, 64});
  auto multi = kts::make_tensor<float, 4>({2, 1, 16, 64});
  scheme::attend(queries.cview(), cache.view(), single.view, kt::workspace{});
  const kt::tensor_view<const kt::half, 4> as_four{queries.view.data, {2, 1, 16, 64},
                                                   {queries.view.strides[0], 0, queries.view.strides[1], 1}};
  scheme::attend(as_four, cache.view(), multi.view, kt::workspace{});
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t j = 0; j < 16; ++j)
      for (std::int64_t d = 0; d < 64; ++d) ASSERT_EQ(multi.view(b, 0, j, d), single.view(b, j, d));
}

TEST(MultiQueryAttentionValues, LastQueryIsTheSingleQueryCallBitForBit) {
  // The last of n queries sees every token: the same rows, blocks and order as attend over [B, Hq, D].
  using scheme = kts::streaming_scheme<kt::codec::bf16>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 128};
  const std::int64_t n = 5, tokens = 333;
  auto keys = kts::random_tensor<kt::bfloat16, 4>({1, 2, tokens, 128}, 81);
  auto values = kts::random_tensor<kt::bfloat16, 4>({1, 2, tokens, 128}, 82);
  auto queries = kts::random_tensor<kt::bfloat16, 4>({1, n, 8, 128}, 83);
  auto cache = scheme::make_cache(shape, std::int64_t{1}, tokens, kt::codec::bf16::config{});
  scheme::append(cache.view(), keys.view, values.view);
  auto multi = kts::make_tensor<float, 4>({1, n, 8, 128});
  auto single = kts::make_tensor<float, 3>({1, 8, 128});
  scheme::attend(queries.cview(), cache.view(), multi.view, kt::workspace{});
  scheme::attend(query_token(queries.cview(), n - 1), cache.view(), single.view, kt::workspace{});
  for (std::int64_t j = 0; j < 8; ++j)
    for (std::int64_t d = 0; d < 128; ++d) ASSERT_EQ(multi.view(0, n - 1, j, d), single.view(0, j, d));
}

TEST(MultiQueryAttentionValues, RaggedFlatHeads) {
  // Per-head lengths 10× apart (flat layout, appended head by head): each head's queries see its own last tokens.
  using scheme = kt::scheme<kt::layout::flat, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cpu>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::vector<std::int64_t> lengths{500, 50, 8, 80};  // [b · 2 + h]
  const std::int64_t n = 8, longest = 500;
  auto keys = kts::random_tensor<kt::half, 4>({2, 2, longest, 64}, 91);
  auto values = kts::random_tensor<kt::half, 4>({2, 2, longest, 64}, 92);
  auto queries = kts::random_tensor<kt::half, 4>({2, n, 8, 64}, 93);
  auto cache = scheme::make_cache(shape, std::int64_t{2}, kt::layout::flat::pool_size{4 * longest});
  for (std::int64_t head = 0; head < 4; ++head) {
    const std::int64_t b = head / 2, h = head % 2;
    const kt::tensor_view<const kt::half, 2> rows_k{&keys.view(b, h, 0, 0), {lengths[head], 64}, {64, 1}};
    const kt::tensor_view<const kt::half, 2> rows_v{&values.view(b, h, 0, 0), {lengths[head], 64}, {64, 1}};
    scheme::append_head(cache.view(), b, h, rows_k, rows_v);
  }
  auto out = kts::make_tensor<float, 4>({2, n, 8, 64});
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
  const double ratio = worst_ratio(queries.cview(), keys.cview(), values.cview(), out.cview(),
                                   [&](std::int64_t b, std::int64_t h) { return lengths[b * 2 + h]; }, {});
  EXPECT_LE(ratio, 1.0);
}

TEST(MultiQueryAttentionValues, QuantizedCodecThroughItsReader) {
  // int8 (KIVI key groups, per-token values): the reader path, one query row at a time, against the
  // oracle over the rows the codec decodes.
  using codec = kt::codec::int8;
  using scheme = kts::streaming_scheme<codec>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::int64_t n = 6, tokens = 97;
  auto keys = kts::random_tensor<float, 4>({2, 2, tokens, 64}, 101);
  auto values = kts::random_tensor<float, 4>({2, 2, tokens, 64}, 102);
  auto queries = kts::random_tensor<float, 4>({2, n, 8, 64}, 103);
  auto cache = scheme::make_cache(shape, std::int64_t{2}, tokens, codec::config{});
  scheme::append(cache.view(), keys.view, values.view);
  auto out = kts::make_tensor<float, 4>({2, n, 8, 64});
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
  auto decoded_keys = kts::make_tensor<float, 4>({2, 2, tokens, 64});
  auto decoded_values = kts::make_tensor<float, 4>({2, 2, tokens, 64});
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < tokens; ++i) {
        const std::int64_t head = b * 2 + h, slot = cache.view().slot(b, h, i);
        codec::load_key(cache.view().storage, head, slot, kt::codec::position_of(cache.view(), b, h, i),
                        &decoded_keys.view(b, h, i, 0));
        codec::load_value(cache.view().storage, head, slot, &decoded_values.view(b, h, i, 0));
      }
  const double ratio =
      worst_ratio(queries.cview(), decoded_keys.cview(), decoded_values.cview(), out.cview(),
                  [&](std::int64_t, std::int64_t) { return tokens; }, {.storage = 2.0 * kts::fp32_unit_roundoff});
  EXPECT_LE(ratio, 1.0);
}

TEST(MultiQueryAttentionErrors, RefusedInputsNameTheArgument) {
  using scheme = kts::streaming_scheme<kt::codec::fp32>;
  const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 64};
  auto keys = kts::random_tensor<float, 4>({1, 2, 5, 64}, 111);
  auto values = kts::random_tensor<float, 4>({1, 2, 5, 64}, 112);
  auto cache = scheme::make_cache(shape, std::int64_t{1}, std::int64_t{5}, kt::codec::fp32::config{});
  scheme::append(cache.view(), keys.view, values.view);
  const auto expect_error = [&](std::int64_t n, std::int64_t out_n, const char* argument, const char* words) {
    auto queries = kts::random_tensor<float, 4>({1, n, 4, 64}, 113);
    auto out = kts::make_tensor<float, 4>({1, out_n, 4, 64});
    const std::vector<float> before = out.storage;
    try {
      scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
      ADD_FAILURE() << "expected kvtrim::error for n = " << n;
    } catch (const kt::error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(argument), std::string::npos) << message;
      EXPECT_NE(message.find(words), std::string::npos) << message;
    }
    for (std::size_t i = 0; i < before.size(); ++i)  // nothing written (NaN padding compares unequal: bits)
      EXPECT_EQ(std::bit_cast<std::uint32_t>(out.storage[i]), std::bit_cast<std::uint32_t>(before[i]));
  };
  expect_error(0, 0, "queries", "1 to 8");
  expect_error(9, 9, "queries", "1 to 8");
  expect_error(2, 3, "out", "shape");
  expect_error(6, 6, "cache", "at least 6 tokens");  // 5 tokens cannot hold 6 new ones
}

TEST(MultiQueryAttentionErrors, EvictionMetricNeedsOneQuery) {
  using scheme = kt::scheme<kt::layout::flat, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cpu>;
  const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 64};
  auto cache = scheme::make_cache(shape, std::int64_t{1}, kt::layout::flat::pool_size{64});
  auto keys = kts::random_tensor<kt::half, 4>({1, 2, 10, 64}, 121);
  auto values = kts::random_tensor<kt::half, 4>({1, 2, 10, 64}, 122);
  scheme::append(cache.view(), keys.cview(), values.cview());
  auto queries = kts::random_tensor<kt::half, 4>({1, 2, 4, 64}, 123);
  auto out = kts::make_tensor<float, 4>({1, 2, 4, 64});
  std::vector<float> metric_values(64, 0.0f);
  kt::eviction::metric_output<kt::host_space> metric;
  metric.values = metric_values.data();
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cpu>;
  std::vector<std::byte> scratch(1 << 16);
  try {
    attention::attend(queries.cview(), cache.view(), out.view, {scratch.data(), scratch.size()}, {}, metric);
    ADD_FAILURE() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("metric"), std::string::npos) << e.what();
  }
  for (const float x : metric_values) EXPECT_EQ(x, 0.0f);
}

}  // namespace
