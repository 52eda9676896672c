// scheme::truncate — speculative decoding's rollback of rejected drafts — on the
// CPU reference, for every layout and the codecs with and without per-head
// streaming state (docs/composition.md §8).
//
// The property: append n drafts, attend over them, truncate d_b ≤ n per
// sequence, and the cache holds exactly what a cache that only ever appended
// the accepted n − d_b tokens holds: every head's length, every held token's
// position and decoded key and value bit for bit, the next positions, the free
// page count (page ids themselves may differ: the reference's shorter append
// popped the free stack in another interleaving of heads), every page in
// exactly one table or the free list. Then both caches take the same further appends and
// multi-query attends, bit for bit. Truncating a whole append restores the
// page tables and free list byte for byte. A refused call (negative count,
// more than a head holds, past the codec's exact horizon, wrong batch) leaves
// every byte of the cache as it was.
#include <gtest/gtest.h>

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

constexpr std::int64_t batch = 3, kv_heads = 2, head_dim = 32, page_size = 4;
const kt::model_shape shape{.q_heads = 4, .kv_heads = kv_heads, .head_dim = head_dim};

template <class Layout, class Codec>
struct combo {
  using layout = Layout;
  using codec = Codec;
  using scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

  static auto make(const typename Codec::config& cfg) {
    if constexpr (std::same_as<Layout, kt::layout::contiguous>)
      return scheme::make_cache(shape, batch, std::int64_t{256}, cfg);
    else if constexpr (std::same_as<Layout, kt::layout::paged>)
      return scheme::make_cache(shape, batch, kt::layout::paged::pool_size{160, page_size}, cfg);
    else if constexpr (std::same_as<Layout, kt::layout::flat>)
      return scheme::make_cache(shape, batch, kt::layout::flat::pool_size{1536}, cfg);
    else
      return scheme::make_cache(shape, batch, kt::layout::shared_paged::pool_size{96, page_size}, cfg);
  }
  static constexpr bool ragged = Layout::ragged_heads;
  /// Contiguous holds one length; shared_paged's append (the reference's) takes one count per call.
  static constexpr bool equal_drops = !Layout::ragged_heads;
};

template <class Codec>
typename Codec::config codec_config() {
  if constexpr (std::same_as<Codec, kt::codec::layered<kt::codec::int8>>)
    return {.inner = {}, .recent = 12, .sinks = 2};  // a ring that wraps within the test's lengths
  else
    return {};
}

/// The exact horizon the codec documents, counted independently: KIVI keys keep
/// the tokens of the filling group of 32 in fp16 (nothing here compacts, so a
/// head's group index is its length mod 32).
template <class Codec>
std::int64_t expected_horizon(std::int64_t length) {
  if constexpr (std::same_as<Codec, kt::codec::int8> || std::same_as<Codec, kt::codec::int4> ||
                std::same_as<Codec, kt::codec::layered<kt::codec::int8>>)
    return length % 32;
  else
    return length;
}

template <class Cache>
std::vector<std::byte> bytes_of(const Cache& cache) {
  const auto* begin = static_cast<const std::byte*>(cache.data());
  return {begin, begin + cache.bytes()};
}

template <class Cache>
void copy_into(Cache& to, const Cache& from) {
  ASSERT_EQ(to.bytes(), from.bytes());
  std::memcpy(const_cast<void*>(to.data()), from.data(), from.bytes());
}

template <class View>
std::vector<std::int32_t> free_set(const View& cache) {
  std::vector<std::int32_t> pages(cache.free_pages, cache.free_pages + *cache.free_count);
  std::sort(pages.begin(), pages.end());
  return pages;
}

/// Same held tokens (lengths, positions, decoded rows bit for bit), next positions and free pages.
template <class View>
void expect_same_tokens(const View& got, const View& want, const std::string& where, bool rows = true) {
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      const std::int64_t head = b * kv_heads + h;
      ASSERT_EQ(got.head_length(b, h), want.head_length(b, h)) << where << " head " << head;
      ASSERT_EQ(got.positions.next_position[head], want.positions.next_position[head]) << where << " head " << head;
      for (std::int64_t i = 0; i < got.head_length(b, h); ++i) {
        ASSERT_EQ(kt::codec::position_of(got, b, h, i), kt::codec::position_of(want, b, h, i)) << where;
        if (!rows) continue;
        for (bool value : {false, true}) {
          const auto a = kts::cached_row(got, b, h, i, value), e = kts::cached_row(want, b, h, i, value);
          ASSERT_EQ(std::memcmp(a.data(), e.data(), a.size() * sizeof(float)), 0)
              << where << " head " << head << " token " << i << (value ? " value" : " key");
        }
      }
    }
  if constexpr (requires { got.free_pages; }) {
    // Page ids may differ (the reference's shorter appends popped the stack in another
    // interleaving); the count does, and every page is in exactly one table or the free list.
    ASSERT_EQ(*got.free_count, *want.free_count) << where;
    View::layout_policy::validate("rollback_test", got, /*exclusive=*/true);
    std::vector<std::int32_t> named(got.indices, got.indices + got.pages - *got.free_count);
    const auto free_pages = free_set(got);
    named.insert(named.end(), free_pages.begin(), free_pages.end());
    std::sort(named.begin(), named.end());
    for (std::int64_t p = 0; p < got.pages; ++p) ASSERT_EQ(named[p], p) << where;
  }
}

template <class Scheme, class View>
void expect_same_attention(View& got, View& want, std::int64_t n, std::uint64_t seed, const std::string& where) {
  auto queries = kts::random_tensor<float, 4>({batch, n, shape.q_heads, head_dim}, seed);
  auto out_got = kts::make_tensor<float, 4>({batch, n, shape.q_heads, head_dim});
  auto out_want = kts::make_tensor<float, 4>({batch, n, shape.q_heads, head_dim});
  kts::scratch_buffer scratch(Scheme::attend_workspace(got, n));
  Scheme::attend(queries.cview(), got, out_got.view, scratch.get());
  Scheme::attend(queries.cview(), want, out_want.view, scratch.get());
  for (std::int64_t i = 0; i < out_got.view.size(); ++i)
    ASSERT_EQ(std::memcmp(out_got.view.data + i, out_want.view.data + i, sizeof(float)), 0) << where << " element " << i;
}

kt::tensor_view<const std::int32_t, 1> drops_view(const std::vector<std::int32_t>& drop) {
  return {drop.data(), {static_cast<std::int64_t>(drop.size())}, {1}};
}

template <class C>
class Rollback : public ::testing::Test {};

using combos = ::testing::Types<
    combo<kt::layout::contiguous, kt::codec::fp16>, combo<kt::layout::contiguous, kt::codec::int8>,
    combo<kt::layout::contiguous, kt::codec::layered<kt::codec::int8>>,
    combo<kt::layout::paged, kt::codec::bf16>, combo<kt::layout::paged, kt::codec::fp8>,
    combo<kt::layout::paged, kt::codec::int8>, combo<kt::layout::paged, kt::codec::int4>,
    combo<kt::layout::paged, kt::codec::layered<kt::codec::int8>>, combo<kt::layout::flat, kt::codec::fp32>,
    combo<kt::layout::flat, kt::codec::int8>, combo<kt::layout::flat, kt::codec::fp8>,
    combo<kt::layout::shared_paged, kt::codec::fp16>, combo<kt::layout::shared_paged, kt::codec::bf16>>;
TYPED_TEST_SUITE(Rollback, combos);

/// Appends `count` rows per head: every head the same via append, or head by head (ragged layouts).
template <class Scheme, class View>
void append_rows(View& cache, const std::vector<std::int64_t>& per_head, std::uint64_t seed) {
  const std::int64_t most = *std::max_element(per_head.begin(), per_head.end());
  if (most == 0) return;
  auto keys = kts::random_tensor<float, 4>({batch, kv_heads, most, head_dim}, seed);
  auto values = kts::random_tensor<float, 4>({batch, kv_heads, most, head_dim}, seed + 1);
  if (std::all_of(per_head.begin(), per_head.end(), [&](std::int64_t c) { return c == most; })) {
    Scheme::append(cache, keys.cview(), values.cview());
    return;
  }
  if constexpr (Scheme::layout::ragged_heads) {
    for (std::int64_t head = 0; head < batch * kv_heads; ++head) {
      const std::int64_t b = head / kv_heads, h = head % kv_heads, c = per_head[static_cast<std::size_t>(head)];
      if (c == 0) continue;
      const kt::tensor_view<const float, 2> k{&keys.view(b, h, 0, 0), {c, head_dim}, {head_dim, 1}};
      const kt::tensor_view<const float, 2> v{&values.view(b, h, 0, 0), {c, head_dim}, {head_dim, 1}};
      Scheme::append_head(cache, b, h, k, v);
    }
  } else {
    FAIL() << "uneven append on a layout without per-head lengths";
  }
}

TYPED_TEST(Rollback, TruncatedEqualsAppendingOnlyTheAccepted) {
  using C = TypeParam;
  using scheme = typename C::scheme;
  std::mt19937_64 rng(20261202);
  int compared = 0, refused = 0;
  for (int round = 0; round < 24; ++round) {
    auto got = C::make(codec_config<typename C::codec>());
    auto want = C::make(codec_config<typename C::codec>());
    // A prefix: ragged layouts get per-head lengths 0..45, the others one length.
    std::vector<std::int64_t> prefix(batch * kv_heads);
    const std::int64_t common = static_cast<std::int64_t>(rng() % 46);
    for (auto& p : prefix) p = C::ragged ? static_cast<std::int64_t>(rng() % 46) : common;
    append_rows<scheme>(got.view(), prefix, 1000 + round);
    copy_into(want, got);

    const std::int64_t n = 1 + static_cast<std::int64_t>(rng() % 8);
    std::vector<std::int32_t> drop(batch);
    const auto same = static_cast<std::int32_t>(rng() % (n + 1));
    for (auto& d : drop) d = C::equal_drops ? same : static_cast<std::int32_t>(rng() % (n + 1));
    if (round % 6 == 0) std::fill(drop.begin(), drop.end(), static_cast<std::int32_t>(n));  // all rejected

    auto drafts_k = kts::random_tensor<float, 4>({batch, kv_heads, n, head_dim}, 2000 + round);
    auto drafts_v = kts::random_tensor<float, 4>({batch, kv_heads, n, head_dim}, 3000 + round);
    scheme::append(got.view(), drafts_k.cview(), drafts_v.cview());
    {
      auto queries = kts::random_tensor<float, 4>({batch, n, shape.q_heads, head_dim}, 4000 + round);
      auto out = kts::make_tensor<float, 4>({batch, n, shape.q_heads, head_dim});
      kts::scratch_buffer scratch(scheme::attend_workspace(got.view(), n));
      scheme::attend(queries.cview(), got.view(), out.view, scratch.get());
    }
    bool refusal_expected = false;
    for (std::int64_t head = 0; head < batch * kv_heads; ++head)
      if (drop[head / kv_heads] > expected_horizon<typename C::codec>(prefix[head] + n)) refusal_expected = true;
    const auto before = bytes_of(got);
    if (refusal_expected) {
      try {
        scheme::truncate(got.view(), drops_view(drop));
        FAIL() << "round " << round << ": a truncation past the codec's horizon was accepted";
      } catch (const kt::error& e) {
        EXPECT_NE(std::string(e.what()).find("kvtrim::scheme::truncate"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("can forget exactly"), std::string::npos) << e.what();
      }
      ASSERT_EQ(bytes_of(got), before) << "round " << round << ": a refused truncate wrote";
      ++refused;
      continue;
    }
    scheme::truncate(got.view(), drops_view(drop));
    // The reference: the accepted drafts only (the first n − d_b of sequence b's).
    std::vector<std::int64_t> accepted(batch * kv_heads);
    for (std::int64_t head = 0; head < batch * kv_heads; ++head) accepted[head] = n - drop[head / kv_heads];
    {
      const std::int64_t most = *std::max_element(accepted.begin(), accepted.end());
      if (most > 0) {
        auto k = kts::make_tensor<float, 4>({batch, kv_heads, most, head_dim});
        auto v = kts::make_tensor<float, 4>({batch, kv_heads, most, head_dim});
        for (std::int64_t b = 0; b < batch; ++b)
          for (std::int64_t h = 0; h < kv_heads; ++h)
            for (std::int64_t i = 0; i < most; ++i)
              for (std::int64_t d = 0; d < head_dim; ++d) {
                k.view(b, h, i, d) = drafts_k.view(b, h, i, d);
                v.view(b, h, i, d) = drafts_v.view(b, h, i, d);
              }
        if (std::all_of(accepted.begin(), accepted.end(), [&](std::int64_t c) { return c == most; })) {
          scheme::append(want.view(), k.cview(), v.cview());
        } else if constexpr (C::ragged) {
          for (std::int64_t head = 0; head < batch * kv_heads; ++head) {
            const std::int64_t b = head / kv_heads, h = head % kv_heads, c = accepted[head];
            if (c == 0) continue;
            scheme::append_head(want.view(), b, h,
                                kt::tensor_view<const float, 2>{&k.view(b, h, 0, 0), {c, head_dim}, {head_dim, 1}},
                                kt::tensor_view<const float, 2>{&v.view(b, h, 0, 0), {c, head_dim}, {head_dim, 1}});
          }
        }
      }
    }
    const std::string where = "round " + std::to_string(round) + " (n " + std::to_string(n) + ")";
    // layered: a token the drafts pushed out of the fp16 ring stays read through the inner codec
    // until as many tokens arrive again (docs/policies/layered.md); everything else is exact now.
    constexpr bool ring = std::same_as<typename C::codec, kt::codec::layered<kt::codec::int8>>;
    expect_same_tokens(got.view(), want.view(), where, !ring);
    // The same further tokens (≥ 8 ≥ d, crossing KIVI group boundaries) and queries: bit for bit.
    const std::int64_t more = 8 + static_cast<std::int64_t>(rng() % 30);
    std::vector<std::int64_t> further(batch * kv_heads, more);
    append_rows<scheme>(got.view(), further, 5000 + round);
    append_rows<scheme>(want.view(), further, 5000 + round);
    expect_same_tokens(got.view(), want.view(), where + " after appends");
    expect_same_attention<scheme>(got.view(), want.view(), std::min<std::int64_t>(8, more), 6000 + round, where);
    ++compared;
  }
  EXPECT_GT(compared, 0);
  ::testing::Test::RecordProperty("compared", compared);
  ::testing::Test::RecordProperty("refused", refused);
}

TYPED_TEST(Rollback, TruncatingTheWholeAppendRestoresTheTables) {
  using C = TypeParam;
  using scheme = typename C::scheme;
  {
    auto cache = C::make(codec_config<typename C::codec>());
    std::vector<std::int64_t> prefix(batch * kv_heads, 0);
    // ≤ 18 + 8 tokens: KIVI's first group of 32 never seals, so every n rolls back.
    for (std::int64_t head = 0; head < batch * kv_heads; ++head) prefix[head] = C::ragged ? 3 + 3 * head : 13;
    append_rows<scheme>(cache.view(), prefix, 77);
    const auto& v = cache.view();
    const auto tables = [&] {
      std::vector<std::int64_t> all;
      for (std::int64_t head = 0; head < v.heads(); ++head) all.push_back(v.positions.next_position[head]);
      if constexpr (requires { v.indptr; }) {
        const std::int64_t rows = std::same_as<typename C::layout, kt::layout::paged> ? v.heads() : batch;
        all.insert(all.end(), v.indptr, v.indptr + rows + 1);
        all.insert(all.end(), v.indices, v.indices + v.indptr[rows]);
        all.insert(all.end(), v.last_page_len, v.last_page_len + rows);
        all.insert(all.end(), v.free_pages, v.free_pages + *v.free_count);
        all.push_back(*v.free_count);
      }
      if constexpr (requires { v.offsets; }) {
        all.insert(all.end(), v.offsets, v.offsets + v.heads() + 1);
        all.insert(all.end(), v.lengths, v.lengths + v.heads());
      }
      if constexpr (requires { v.length; }) all.push_back(*v.length);
      return all;
    };
    const auto before = tables();
    for (std::int64_t n = 1; n <= 8; ++n) {
      auto k = kts::random_tensor<float, 4>({batch, kv_heads, n, head_dim}, 90 + n);
      scheme::append(cache.view(), k.cview(), k.cview());
      scheme::truncate(cache.view(), drops_view(std::vector<std::int32_t>(batch, static_cast<std::int32_t>(n))));
      ASSERT_EQ(tables(), before) << "n = " << n;
    }
  }
}

TYPED_TEST(Rollback, RefusalsNameTheArgumentAndLeaveEveryByte) {
  using C = TypeParam;
  using scheme = typename C::scheme;
  auto cache = C::make(codec_config<typename C::codec>());
  std::vector<std::int64_t> prefix(batch * kv_heads, 5);
  if constexpr (C::ragged) prefix[3] = 2;  // sequence 1, kv head 1 holds 2 (+ 3 drafts below)
  append_rows<scheme>(cache.view(), prefix, 11);
  auto k = kts::random_tensor<float, 4>({batch, kv_heads, 3, head_dim}, 12);
  scheme::append(cache.view(), k.cview(), k.cview());
  const auto before = bytes_of(cache);
  const auto refused = [&](std::vector<std::int32_t> drop, const std::string& expected) {
    try {
      scheme::truncate(cache.view(), drops_view(drop));
      ADD_FAILURE() << "accepted: " << expected;
    } catch (const kt::error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find("kvtrim::scheme::truncate"), std::string::npos) << message;
      EXPECT_NE(message.find("drop"), std::string::npos) << message;
      EXPECT_NE(message.find(expected), std::string::npos) << message;
    }
    EXPECT_EQ(bytes_of(cache), before) << expected;
  };
  refused({0, -1, 0}, "-1 for sequence 1");
  refused({0, 0, 1 << 30}, C::equal_drops ? "sequence 2" : "1073741824 for sequence 2");
  refused({0, 0}, "shape [3]");
  refused({0, 0, 0, 0}, "shape [3]");
  if constexpr (C::ragged) {
    refused({0, 6, 0}, "at most the 5 tokens kv head 1 of sequence 1 holds");
  } else {
    refused({9, 9, 9}, "at most the 8 tokens kv head 0 of sequence 0 holds");
  }
  if constexpr (std::same_as<typename C::layout, kt::layout::contiguous>) refused({1, 2, 1}, "the same count for every sequence");
  // Accepted: nothing to drop is a no-op.
  scheme::truncate(cache.view(), drops_view({0, 0, 0}));
  EXPECT_EQ(bytes_of(cache), before);
}

TEST(RollbackSharedPaged, SequencesDropDifferentCounts) {
  // shared_paged takes a count per sequence (its heads share pages): lengths and freed pages follow.
  using C = combo<kt::layout::shared_paged, kt::codec::fp16>;
  using scheme = C::scheme;
  auto cache = C::make({});
  append_rows<scheme>(cache.view(), std::vector<std::int64_t>(batch * kv_heads, 6), 31);
  auto k = kts::random_tensor<float, 4>({batch, kv_heads, 7, head_dim}, 32);
  scheme::append(cache.view(), k.cview(), k.cview());  // 13 tokens: 4 pages of 4 per sequence
  const std::int32_t free_before = *cache.view().free_count;
  scheme::truncate(cache.view(), drops_view({0, 5, 7}));  // 13, 8, 6 tokens: 4, 2, 2 pages
  EXPECT_EQ(cache.view().sequence_length(0), 13);
  EXPECT_EQ(cache.view().sequence_length(1), 8);
  EXPECT_EQ(cache.view().sequence_length(2), 6);
  EXPECT_EQ(*cache.view().free_count, free_before + 4);
  EXPECT_EQ(cache.view().last_page_len[1], 4);
  EXPECT_EQ(cache.view().last_page_len[2], 2);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < cache.view().sequence_length(b); ++i)
      EXPECT_EQ(kt::codec::position_of(cache.view(), b, 1, i), i);
  kt::layout::shared_paged::validate("test", cache.view(), true);
}

template <class Layout>
void expect_dropped_compensation_leaves_the_head() {
  // RazorAttention's compensation token (a kept slot with a logit bias) is a token like any
  // other for truncate: dropped with the drafts, it leaves the head (index −1, bias 0); kept,
  // it stays where it was (review L1: no test dropped one). The truncated cache then attends
  // bit for bit as one that never held the drafts or the dropped bias.
  using C = combo<Layout, kt::codec::fp16>;
  using scheme = typename C::scheme;
  auto got = C::make({});
  auto want = C::make({});
  auto got_view = got.view();
  auto want_view = want.view();
  append_rows<scheme>(got_view, std::vector<std::int64_t>(batch * kv_heads, 6), 41);
  append_rows<scheme>(want_view, std::vector<std::int64_t>(batch * kv_heads, 6), 41);
  append_rows<scheme>(got_view, std::vector<std::int64_t>(batch * kv_heads, 3), 42);  // the drafts
  // Head 0: compensation at the newest draft (dropped below); head 3: at token 2 (kept).
  got_view.compensation.index[0] = 8;
  got_view.compensation.bias[0] = 1.5f;
  for (auto* v : {&got_view, &want_view}) {
    v->compensation.index[3] = 2;
    v->compensation.bias[3] = 2.5f;
  }
  scheme::truncate(got_view, drops_view({3, 3, 3}));
  EXPECT_EQ(got_view.compensation.index[0], -1) << "the dropped compensation token left head 0";
  EXPECT_EQ(got_view.compensation.bias[0], 0.0f);
  EXPECT_EQ(got_view.compensation.index[3], 2) << "head 3's compensation token was kept";
  EXPECT_EQ(got_view.compensation.bias[3], 2.5f);
  expect_same_tokens(got_view, want_view, "after dropping a compensation token");
  expect_same_attention<scheme>(got_view, want_view, 1, 43, "after dropping a compensation token");
}

TEST(RollbackCompensation, DroppedTokenLeavesThePagedHead) { expect_dropped_compensation_leaves_the_head<kt::layout::paged>(); }
TEST(RollbackCompensation, DroppedTokenLeavesTheFlatHead) { expect_dropped_compensation_leaves_the_head<kt::layout::flat>(); }

}  // namespace
