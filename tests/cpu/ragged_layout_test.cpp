// layout::paged and layout::flat: compress then attend against the
// double-precision oracle, equality with layout::contiguous for uniform
// budgets, order after appends, and the layouts' own metadata rules.
//
// Tolerances: keys and values are stored exactly (fp32 inputs with codec::fp32,
// fp16 inputs with codec::fp16), so the only error is fp32 arithmetic in decode
// attention: a D-term dot product and a ≤ 64-term softmax sum, relative error
// ≲ (D + T)·2^-24 ≈ 5e-6 of outputs bounded by max|v| ≲ 5 → 3e-5.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "common/oracle.hpp"
#include "common/ragged_budget.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"

namespace kt = kvtrim;
using kt::testing::host_tensor;

namespace {

constexpr double tolerance = 3e-5;

template <std::int64_t PageSize>
struct paged_case {
  using layout = kt::layout::paged;
  /// A pool that holds `tokens` tokens in each of `heads` heads.
  static layout::pool_size pool(std::int64_t heads, std::int64_t tokens) {
    return {heads * layout::pages_for(tokens, PageSize), PageSize};
  }
  /// Where FlashInfer's convention puts token i of `head`, from the raw metadata
  /// arrays alone (what an engine's kernel would compute).
  template <class View>
  static std::int64_t raw_slot(const View& view, std::int64_t head, std::int64_t i) {
    return std::int64_t{view.indices[view.indptr[head] + i / PageSize]} * PageSize + i % PageSize;
  }
};
struct flat_case {
  using layout = kt::layout::flat;
  static layout::pool_size pool(std::int64_t heads, std::int64_t tokens) { return {heads * tokens}; }
  /// Where the cu_seqlens-style offsets put token i of `head`.
  template <class View>
  static std::int64_t raw_slot(const View& view, std::int64_t head, std::int64_t i) {
    return view.offsets[head] + i;
  }
};

/// Key row i of head (b, h) read from raw fp32 storage at the layout's documented place.
template <class Case, class View>
std::vector<float> raw_key(const View& view, std::int64_t b, std::int64_t h, std::int64_t i) {
  const float* row = view.storage.keys + Case::raw_slot(view, b * view.shape.kv_heads + h, i) * view.shape.head_dim;
  return {row, row + view.shape.head_dim};
}

template <class Case>
class RaggedLayout : public ::testing::Test {};
using layout_cases = ::testing::Types<paged_case<16>, paged_case<1>, paged_case<7>, flat_case>;
TYPED_TEST_SUITE(RaggedLayout, layout_cases);

template <class Layout, class Codec>
using static_scheme = kt::scheme<Layout, kt::score::static_window, kt::testing::per_head_counts, Codec, kt::backend::cpu>;

struct problem {
  std::int64_t batch = 2, tokens = 45;
  kt::model_shape shape{.q_heads = 8, .kv_heads = 4, .head_dim = 16};
  std::vector<std::int64_t> keep{5, 17, 1, 45};
  std::int64_t sinks = 4;
};

template <class Case, class Codec, class KeyT>
void compress_then_attend(const problem& p) {
  using scheme = static_scheme<typename Case::layout, Codec>;
  const auto keys = kt::testing::random_tensor<KeyT, 4>({p.batch, 4, p.tokens, 16}, 11, 1.0f, {0, 1, 2, 3});
  const auto values = kt::testing::random_tensor<KeyT, 4>({p.batch, 4, p.tokens, 16}, 12, 1.0f, {1, 0, 0, 2});
  const auto queries = kt::testing::random_tensor<float, 3>({p.batch, 8, 16}, 13);
  typename scheme::config cfg;
  cfg.score.sinks = p.sinks;
  cfg.budget.keep = p.keep;
  auto cache = scheme::make_cache(p.shape, p.batch, Case::pool(p.batch * 4, p.tokens), typename Codec::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(p.shape, p.batch, p.tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});

  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < 4; ++h)
      EXPECT_EQ(cache.view().head_length(b, h), std::min(p.tokens, p.keep[static_cast<std::size_t>(h)]));

  auto out = kt::testing::make_tensor<float, 3>({p.batch, 8, 16});
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
  const auto oracle = kt::testing::oracle_attention(queries.cview(), keys.cview(), values.cview(), 4,
                                                    [&](std::int64_t, std::int64_t h) {
                                                      return kt::testing::kept_tokens{kt::testing::sinks_and_recent(
                                                          p.tokens, p.keep[static_cast<std::size_t>(h)], p.sinks), {}};
                                                    });
  EXPECT_LT(kt::testing::max_abs_error(out.view, oracle), tolerance);
}

}  // namespace

TYPED_TEST(RaggedLayout, CompressThenAttendMatchesOracleWithRaggedBudget) {
  compress_then_attend<TypeParam, kt::codec::fp32, float>(problem{});
  compress_then_attend<TypeParam, kt::codec::fp16, kt::half>(problem{});
  problem one_token;  // every head keeps a single token
  one_token.keep = {1, 1, 1, 1};
  compress_then_attend<TypeParam, kt::codec::fp16, kt::half>(one_token);
}

TYPED_TEST(RaggedLayout, SameOutputAsContiguousForUniformBudget) {
  using ragged = kt::scheme<typename TypeParam::layout, kt::score::static_window, kt::budget::uniform,
                            kt::codec::fp16, kt::backend::cpu>;
  using dense = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                           kt::backend::cpu>;
  const kt::model_shape shape{.q_heads = 12, .kv_heads = 3, .head_dim = 32};
  const std::int64_t batch = 3, tokens = 77, keep = 29;
  const auto keys = kt::testing::random_tensor<kt::half, 4>({batch, 3, tokens, 32}, 21);
  const auto values = kt::testing::random_tensor<kt::half, 4>({batch, 3, tokens, 32}, 22);
  const auto queries = kt::testing::random_tensor<kt::half, 3>({batch, 12, 32}, 23);
  typename ragged::config ragged_cfg;
  ragged_cfg.budget.keep = kt::keep_tokens{keep};
  typename dense::config dense_cfg;
  dense_cfg.budget.keep = kt::keep_tokens{keep};

  auto ragged_cache = ragged::make_cache(shape, batch, TypeParam::pool(batch * 3, keep + 10), kt::codec::fp16::config{});
  auto dense_cache = dense::make_cache(shape, batch, keep + 10, kt::codec::fp16::config{});
  std::vector<std::byte> scratch(ragged::compress_workspace(shape, batch, tokens, ragged_cfg));
  const kt::workspace work{scratch.data(), scratch.size()};
  ragged::compress(keys.cview(), values.cview(), ragged_cache.view(), ragged_cfg, work);
  dense::compress(keys.cview(), values.cview(), dense_cache.view(), dense_cfg, work);
  const auto step_keys = kt::testing::random_tensor<kt::half, 4>({batch, 3, 10, 32}, 24);
  const auto step_values = kt::testing::random_tensor<kt::half, 4>({batch, 3, 10, 32}, 25);
  for (std::int64_t step = 0; step <= 10; ++step) {
    auto ragged_out = kt::testing::make_tensor<float, 3>({batch, 12, 32});
    auto dense_out = kt::testing::make_tensor<float, 3>({batch, 12, 32});
    ragged::attend(queries.cview(), ragged_cache.view(), ragged_out.view, kt::workspace{});
    dense::attend(queries.cview(), dense_cache.view(), dense_out.view, kt::workspace{});
    // The same tokens in the same order through the same arithmetic: equal bit for bit.
    EXPECT_EQ(ragged_out.storage, dense_out.storage) << "after " << step << " appends";
    if (step == 10) break;
    const auto one = [&](const host_tensor<kt::half, 4>& source) {
      return kt::tensor_view<const kt::half, 4>{&source.view(0, 0, step, 0), {batch, 3, 1, 32}, source.view.strides};
    };
    ragged::append(ragged_cache.view(), one(step_keys), one(step_values));
    dense::append(dense_cache.view(), one(step_keys), one(step_values));
  }
}

TYPED_TEST(RaggedLayout, AppendAfterCompressKeepsTokenOrder) {
  using scheme = static_scheme<typename TypeParam::layout, kt::codec::fp32>;
  const problem p;
  const auto keys = kt::testing::random_tensor<float, 4>({p.batch, 4, p.tokens, 16}, 31);
  const auto values = kt::testing::random_tensor<float, 4>({p.batch, 4, p.tokens, 16}, 32);
  const std::int64_t appended = 20;  // 1 + 3 + 16 tokens: crosses pages and runs out of flat headroom
  const auto new_keys = kt::testing::random_tensor<float, 4>({p.batch, 4, appended, 16}, 33);
  const auto new_values = kt::testing::random_tensor<float, 4>({p.batch, 4, appended, 16}, 34);
  const auto queries = kt::testing::random_tensor<float, 3>({p.batch, 8, 16}, 35);
  typename scheme::config cfg;
  cfg.score.sinks = p.sinks;
  cfg.budget.keep = p.keep;
  // Just enough room for the kept tokens plus the appended ones.
  std::int64_t needed = 0;
  for (auto keep : p.keep) needed += std::min(keep, p.tokens) + appended;
  typename TypeParam::layout::pool_size pool = TypeParam::pool(p.batch * 4, p.tokens + appended);
  if constexpr (std::is_same_v<typename TypeParam::layout, kt::layout::flat>) pool.slots = p.batch * needed;
  auto cache = scheme::make_cache(p.shape, p.batch, pool, kt::codec::fp32::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(p.shape, p.batch, p.tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});

  const std::int64_t chunks[] = {1, 3, 16};
  std::int64_t done = 0;
  for (std::int64_t chunk : chunks) {
    const auto slice = [&](const host_tensor<float, 4>& source) {
      return kt::tensor_view<const float, 4>{&source.view(0, 0, done, 0), {p.batch, 4, chunk, 16}, source.view.strides};
    };
    scheme::append(cache.view(), slice(new_keys), slice(new_values));
    done += chunk;
  }

  const auto all_keys = kt::testing::concat_tokens(keys.cview(), new_keys.cview());
  const auto all_values = kt::testing::concat_tokens(values.cview(), new_values.cview());
  const auto kept = [&](std::int64_t, std::int64_t h) {
    kt::testing::kept_tokens set{kt::testing::sinks_and_recent(p.tokens, p.keep[static_cast<std::size_t>(h)], p.sinks), {}};
    for (std::int64_t t = 0; t < appended; ++t) set.tokens.push_back(p.tokens + t);
    return set;
  };
  // Every logical index holds exactly the token the order says (bit-exact, fp32 storage).
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < 4; ++h) {
      const auto order = kept(b, h).tokens;
      ASSERT_EQ(cache.view().head_length(b, h), static_cast<std::int64_t>(order.size()));
      for (std::size_t i = 0; i < order.size(); ++i) {
        EXPECT_EQ(raw_key<TypeParam>(cache.view(), b, h, static_cast<std::int64_t>(i)),
                  kt::testing::input_row(all_keys.cview(), b, h, order[i]))
            << "sequence " << b << ", head " << h << ", index " << i;
        EXPECT_EQ(kt::testing::stored_value(cache.view(), b, h, static_cast<std::int64_t>(i)),
                  kt::testing::input_row(all_values.cview(), b, h, order[i]));
      }
    }
  auto out = kt::testing::make_tensor<float, 3>({p.batch, 8, 16});
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
  const auto oracle = kt::testing::oracle_attention(queries.cview(), all_keys.cview(), all_values.cview(), 4, kept);
  EXPECT_LT(kt::testing::max_abs_error(out.view, oracle), tolerance);
}

TYPED_TEST(RaggedLayout, PerHeadAppendKeepsTokenOrder) {
  using scheme = static_scheme<typename TypeParam::layout, kt::codec::fp32>;
  const problem p;
  const auto keys = kt::testing::random_tensor<float, 4>({p.batch, 4, p.tokens, 16}, 51);
  const auto values = kt::testing::random_tensor<float, 4>({p.batch, 4, p.tokens, 16}, 52);
  const auto queries = kt::testing::random_tensor<float, 3>({p.batch, 8, 16}, 53);
  // Uneven growth: head (b, h) receives grow(b, h) tokens, in rounds of up to 3.
  const auto grow = [](std::int64_t b, std::int64_t h) { return (3 * h + 5 * b) % 11; };
  const auto rows = kt::testing::random_tensor<float, 4>({p.batch, 4, 11, 16}, 54);
  const auto row_values = kt::testing::random_tensor<float, 4>({p.batch, 4, 11, 16}, 55);
  typename scheme::config cfg;
  cfg.budget.keep = p.keep;
  std::int64_t needed = 0;
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < 4; ++h) needed += std::min(p.tokens, p.keep[static_cast<std::size_t>(h)]) + grow(b, h);
  typename TypeParam::layout::pool_size pool = TypeParam::pool(p.batch * 4, p.tokens + 11);
  if constexpr (std::is_same_v<typename TypeParam::layout, kt::layout::flat>) pool.slots = needed;  // no slack at all
  auto cache = scheme::make_cache(p.shape, p.batch, pool, kt::codec::fp32::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(p.shape, p.batch, p.tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});

  std::vector<std::int64_t> given(static_cast<std::size_t>(p.batch * 4), 0);
  for (bool any = true; any;) {
    any = false;
    for (std::int64_t b = 0; b < p.batch; ++b)
      for (std::int64_t h = 0; h < 4; ++h) {
        std::int64_t& done = given[static_cast<std::size_t>(b * 4 + h)];
        const std::int64_t chunk = std::min<std::int64_t>(3, grow(b, h) - done);
        if (chunk <= 0) continue;
        any = true;
        const auto slice = [&](const host_tensor<float, 4>& source) {
          return kt::tensor_view<float, 2>{const_cast<float*>(&source.view(b, h, done, 0)), {chunk, 16},
                                           {source.view.strides[2], source.view.strides[3]}};
        };
        scheme::append_head(cache.view(), b, h, slice(rows), slice(row_values));
        done += chunk;
      }
  }
  if constexpr (std::is_same_v<typename TypeParam::layout, kt::layout::flat>) {
    EXPECT_GE(*cache.view().repacks, 1) << "uneven growth into a buffer with no slack must repack";
    EXPECT_EQ(cache.view().tokens_held(), cache.view().capacity);
  }
  const auto all_keys = kt::testing::concat_tokens(keys.cview(), rows.cview());
  const auto all_values = kt::testing::concat_tokens(values.cview(), row_values.cview());
  const auto kept = [&](std::int64_t b, std::int64_t h) {
    kt::testing::kept_tokens set{kt::testing::sinks_and_recent(p.tokens, p.keep[static_cast<std::size_t>(h)], p.sinks), {}};
    for (std::int64_t t = 0; t < grow(b, h); ++t) set.tokens.push_back(p.tokens + t);
    return set;
  };
  for (std::int64_t b = 0; b < p.batch; ++b)
    for (std::int64_t h = 0; h < 4; ++h) {
      const auto order = kept(b, h).tokens;
      ASSERT_EQ(cache.view().head_length(b, h), static_cast<std::int64_t>(order.size()));
      for (std::size_t i = 0; i < order.size(); ++i)
        EXPECT_EQ(raw_key<TypeParam>(cache.view(), b, h, static_cast<std::int64_t>(i)),
                  kt::testing::input_row(all_keys.cview(), b, h, order[i]))
            << "sequence " << b << ", head " << h << ", index " << i;
    }
  auto out = kt::testing::make_tensor<float, 3>({p.batch, 8, 16});
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
  const auto oracle = kt::testing::oracle_attention(queries.cview(), all_keys.cview(), all_values.cview(), 4, kept);
  EXPECT_LT(kt::testing::max_abs_error(out.view, oracle), tolerance);

  const auto one = kt::testing::random_tensor<float, 2>({1, 16}, 56);
  EXPECT_THROW(scheme::append_head(cache.view(), 2, 0, one.view, one.view), kt::error);   // no sequence 2
  EXPECT_THROW(scheme::append_head(cache.view(), 0, -1, one.view, one.view), kt::error);  // no kv head -1
}

TYPED_TEST(RaggedLayout, ViewsAreTriviallyCopyable) {
  using view = typename TypeParam::layout::template view<kt::codec::fp16, kt::host_space>;
  using device_view = typename TypeParam::layout::template view<kt::codec::fp16, kt::device_space>;
  static_assert(std::is_trivially_copyable_v<view> && std::is_trivially_copyable_v<device_view>,
                "a layout view is passed to kernels by value");
  SUCCEED();
}

// ---- paged ----------------------------------------------------------------------

namespace {
using paged_scheme = static_scheme<kt::layout::paged, kt::codec::fp32>;

struct paged_fixture {
  problem p;
  host_tensor<float, 4> keys = kt::testing::random_tensor<float, 4>({2, 4, 45, 16}, 41);
  host_tensor<float, 4> values = kt::testing::random_tensor<float, 4>({2, 4, 45, 16}, 42);
  paged_scheme::config cfg;
  std::vector<std::byte> scratch;

  paged_fixture() {
    cfg.budget.keep = p.keep;
    scratch.resize(paged_scheme::compress_workspace(p.shape, p.batch, p.tokens, cfg));
  }
  void compress(paged_scheme::cache_view& cache) {
    paged_scheme::compress(keys.cview(), values.cview(), cache, cfg, kt::workspace{scratch.data(), scratch.size()});
  }
};

/// Pages the per-head counts {5, 17, 1, 45} need with page size 16, over two sequences.
constexpr std::int64_t pages_needed = 2 * (1 + 2 + 1 + 3);
}  // namespace

TEST(PagedLayout, MetadataIsFlashInferForm) {
  paged_fixture f;
  auto cache = paged_scheme::make_cache(f.p.shape, f.p.batch, kt::layout::paged::pool_size{pages_needed + 5},
                                        kt::codec::fp32::config{});
  f.compress(cache.view());
  const auto& view = cache.view();
  EXPECT_EQ(view.page_size, 16);  // the default
  EXPECT_EQ(view.indptr[0], 0);
  std::set<std::int32_t> pages;
  for (std::int64_t head = 0; head < view.heads(); ++head) {
    const std::int64_t length = view.head_length(head / 4, head % 4);
    EXPECT_EQ(view.page_count(head), kt::layout::paged::pages_for(length, 16));
    EXPECT_EQ(view.last_page_len[head], (length - 1) % 16 + 1);
    for (std::int32_t k = view.indptr[head]; k < view.indptr[head + 1]; ++k) {
      EXPECT_TRUE(view.indices[k] >= 0 && view.indices[k] < view.pages);
      EXPECT_TRUE(pages.insert(view.indices[k]).second) << "page " << view.indices[k] << " owned twice";
    }
  }
  EXPECT_EQ(view.indptr[view.heads()], pages_needed);
  EXPECT_EQ(view.pages_in_use(), pages_needed);
  EXPECT_EQ(*view.free_count, 5);
}

TEST(PagedLayout, PoolExhaustionIsAnErrorNotACrash) {
  paged_fixture f;
  {
    auto small = paged_scheme::make_cache(f.p.shape, f.p.batch, kt::layout::paged::pool_size{pages_needed - 1},
                                          kt::codec::fp32::config{});
    try {
      f.compress(small.view());
      FAIL() << "compress into a pool one page short must throw";
    } catch (const kt::error& failure) {
      EXPECT_NE(std::string(failure.what()).find("pool exhausted"), std::string::npos) << failure.what();
      EXPECT_NE(std::string(failure.what()).find("kvtrim::layout::paged::compact"), std::string::npos);
    }
  }
  // Exactly enough pages for compress; appends then fill the partial last pages
  // and fail, leaving the cache untouched, at the first token that needs a new page.
  auto cache = paged_scheme::make_cache(f.p.shape, f.p.batch, kt::layout::paged::pool_size{pages_needed},
                                        kt::codec::fp32::config{});
  f.compress(cache.view());
  const auto one = kt::testing::random_tensor<float, 4>({2, 4, 1, 16}, 43);
  // Free slots in last pages: head lengths 5, 17, 1, 45 → 11, 15, 15, 3 slots; the smallest is 3.
  for (int step = 0; step < 3; ++step) paged_scheme::append(cache.view(), one.cview(), one.cview());
  const std::vector<std::int32_t> before(cache.view().indices, cache.view().indices + pages_needed);
  EXPECT_THROW(paged_scheme::append(cache.view(), one.cview(), one.cview()), kt::error);
  EXPECT_EQ(std::vector<std::int32_t>(cache.view().indices, cache.view().indices + pages_needed), before);
  EXPECT_EQ(cache.view().head_length(0, 3), 48);
  EXPECT_EQ(cache.view().head_length(1, 0), 8);
}

TEST(PagedLayout, CompressReturnsEveryPageToThePool) {
  paged_fixture f;
  auto cache = paged_scheme::make_cache(f.p.shape, f.p.batch, kt::layout::paged::pool_size{pages_needed + 8, 16},
                                        kt::codec::fp32::config{});
  f.compress(cache.view());
  const auto chunk = kt::testing::random_tensor<float, 4>({2, 4, 4, 16}, 44);
  paged_scheme::append(cache.view(), chunk.cview(), chunk.cview());
  EXPECT_GT(cache.view().pages_in_use(), pages_needed);
  f.compress(cache.view());  // compress again: the cache is replaced, not added to
  EXPECT_EQ(cache.view().pages_in_use(), pages_needed);
}

TEST(PagedLayout, BadPoolArgumentsThrow) {
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 1, .head_dim = 8};
  using view = kt::layout::paged::view<kt::codec::fp16, kt::host_space>;
  EXPECT_THROW(view::bytes(shape, 1, {0, 16}, {}), kt::error);
  EXPECT_THROW(view::bytes(shape, 1, {4, 0}, {}), kt::error);
  EXPECT_THROW(view::bytes(shape, 0, {4, 16}, {}), kt::error);
  EXPECT_THROW(view::bytes(shape, 1, {std::int64_t{1} << 32, 16}, {}), kt::error);
  paged_scheme::cache_view unbound;
  const auto one = kt::testing::random_tensor<float, 4>({1, 1, 1, 8}, 1);
  EXPECT_THROW(paged_scheme::append(unbound, one.cview(), one.cview()), kt::error);
}

// ---- flat -----------------------------------------------------------------------

namespace {
using flat_scheme = static_scheme<kt::layout::flat, kt::codec::fp32>;
}

TEST(FlatLayout, HeadroomIsSpreadEvenlyAndRepackKeepsContents) {
  paged_fixture f;  // same inputs; kept lengths 5, 17, 1, 45 per sequence = 68 + 68 tokens
  flat_scheme::config cfg;
  cfg.budget.keep = f.p.keep;
  auto cache = flat_scheme::make_cache(f.p.shape, f.p.batch, kt::layout::flat::pool_size{136 + 19},
                                       kt::codec::fp32::config{});
  std::vector<std::byte> scratch(flat_scheme::compress_workspace(f.p.shape, f.p.batch, f.p.tokens, cfg));
  flat_scheme::compress(f.keys.cview(), f.values.cview(), cache.view(), cfg,
                        kt::workspace{scratch.data(), scratch.size()});
  const auto& view = cache.view();
  // 19 free slots over 8 heads: 3 for the first three heads, 2 for the others.
  const std::int64_t lengths[] = {5, 17, 1, 45, 5, 17, 1, 45};
  for (std::int64_t head = 0; head < 8; ++head) {
    EXPECT_EQ(view.lengths[head], lengths[head]);
    EXPECT_EQ(view.region(head), lengths[head] + (head < 3 ? 3 : 2));
  }
  EXPECT_EQ(view.offsets[0], 0);
  EXPECT_EQ(view.offsets[8], view.capacity);
  EXPECT_EQ(*view.repacks, 0);

  const auto two = kt::testing::random_tensor<float, 4>({2, 4, 2, 16}, 45);
  flat_scheme::append(cache.view(), two.cview(), two.cview());  // fits: every head has ≥ 2 slots
  EXPECT_EQ(*view.repacks, 0);

  const auto snapshot = [&] {
    std::vector<std::vector<float>> rows;
    for (std::int64_t head = 0; head < 8; ++head)
      for (std::int64_t i = 0; i < view.lengths[head]; ++i) rows.push_back(kt::testing::stored_key(view, head / 4, head % 4, i));
    return rows;
  };
  const auto before = snapshot();
  // Head (0, 3) is full, 3 slots are free elsewhere: append_head repacks, giving
  // it the 2 slots it asks for and the 1 left over to head 0.
  const auto rows = kt::testing::random_tensor<float, 2>({2, 16}, 46);
  flat_scheme::append_head(cache.view(), 0, 3, rows.view, rows.view);
  EXPECT_EQ(*view.repacks, 1);
  EXPECT_EQ(view.lengths[3], 45 + 2 + 2);
  EXPECT_EQ(view.region(3), view.lengths[3]);
  EXPECT_EQ(view.region(0), view.lengths[0] + 1);
  const auto after = snapshot();
  std::size_t n = 0, m = 0;
  for (std::int64_t head = 0; head < 8; ++head)
    for (std::int64_t i = 0; i < view.lengths[head]; ++i, ++m) {
      if (head == 3 && i >= 47) {
        for (std::int64_t d = 0; d < 16; ++d) EXPECT_EQ(after[m][static_cast<std::size_t>(d)], rows.view(i - 47, d));
        continue;
      }
      EXPECT_EQ(after[m], before[n++]) << "head " << head << " index " << i;
    }
  for (std::int64_t head = 0; head < 8; ++head) EXPECT_LE(view.offsets[head] + view.lengths[head], view.offsets[head + 1]);

  // One slot left (head 0's): appending to head 0 needs no repack, to any other head it does.
  const auto one = kt::testing::random_tensor<float, 2>({1, 16}, 47);
  flat_scheme::append_head(cache.view(), 1, 2, one.view, one.view);
  EXPECT_EQ(*view.repacks, 2);
  EXPECT_EQ(view.tokens_held(), view.capacity);
  EXPECT_THROW(flat_scheme::append_head(cache.view(), 0, 0, one.view, one.view), kt::error);
  EXPECT_THROW(flat_scheme::append(cache.view(), two.cview(), two.cview()), kt::error);
  EXPECT_EQ(*view.repacks, 2);
  EXPECT_EQ(snapshot().size(), static_cast<std::size_t>(view.capacity));
}

// A flat buffer is sized for what a layer keeps in all — Ada-KV's H·k plus the
// window, README's example — not for the per-head bound of an adaptive budget
// (a head may take the whole context): compress must accept it, and only a
// selection larger than the buffer is refused (by flat's compact). Found through
// the Python README example when a scheme-level capacity check confused flat's
// whole-buffer capacity with contiguous's per-head one.
TEST(FlatLayout, BufferSmallerThanThePerHeadBoundTakesAnAdaptiveSelection) {
  using scheme = kt::scheme<kt::layout::flat, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16,
                            kt::backend::cpu>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::int64_t tokens = 1024, window = 64;
  const auto keys = kt::testing::random_tensor<kt::half, 4>({1, 2, tokens, 64}, 91);
  const auto values = kt::testing::random_tensor<kt::half, 4>({1, 2, tokens, 64}, 92);
  const auto queries = kt::testing::random_tensor<kt::half, 4>({1, 8, window, 64}, 93);
  scheme::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.25};
  const std::int64_t slots = shape.kv_heads * (tokens / 4 + window);  // 640 < 1024 tokens one head may take
  auto cache = scheme::make_cache(shape, 1, kt::layout::flat::pool_size{slots}, kt::codec::fp16::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, 1, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), queries.cview(), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});
  EXPECT_EQ(cache.view().tokens_held(), shape.kv_heads * tokens / 4);  // H·k in all, however the heads share it
  auto small = scheme::make_cache(shape, 1, kt::layout::flat::pool_size{shape.kv_heads * tokens / 4 - 1},
                                  kt::codec::fp16::config{});
  try {
    scheme::compress(keys.cview(), values.cview(), queries.cview(), small.view(), cfg,
                     kt::workspace{scratch.data(), scratch.size()});
    FAIL() << "511 slots cannot take 512 kept tokens";
  } catch (const kt::error& failure) {
    EXPECT_NE(std::string(failure.what()).find("buffer exhausted"), std::string::npos) << failure.what();
  }
}

TEST(FlatLayout, ExhaustionIsAnError) {
  paged_fixture f;
  flat_scheme::config cfg;
  cfg.budget.keep = f.p.keep;
  auto cache = flat_scheme::make_cache(f.p.shape, f.p.batch, kt::layout::flat::pool_size{135},
                                       kt::codec::fp32::config{});
  std::vector<std::byte> scratch(flat_scheme::compress_workspace(f.p.shape, f.p.batch, f.p.tokens, cfg));
  try {
    flat_scheme::compress(f.keys.cview(), f.values.cview(), cache.view(), cfg,
                          kt::workspace{scratch.data(), scratch.size()});
    FAIL() << "136 kept tokens cannot fit 135 slots";
  } catch (const kt::error& failure) {
    EXPECT_NE(std::string(failure.what()).find("buffer exhausted"), std::string::npos) << failure.what();
  }
  EXPECT_THROW((kt::layout::flat::view<kt::codec::fp32, kt::host_space>::bytes(f.p.shape, 1, {0}, {})), kt::error);
}
