// Composition as an engine meets it (issue 9, docs/composition.md): every layout
// × codec with default configs, RazorAttention through every codec, positions
// and the selection as outputs, the strong guarantee with a failure injected
// at every head, views an engine builds by hand, absurd sizes.
//
// Shapes are deliberately awkward: 77-token prefills (not a multiple of KIVI's
// 32-token key groups nor of 16-token pages), ragged Ada-KV budgets, appends
// of 1 and 5 tokens that cross group and page boundaries.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "common/tensors.hpp"

namespace kt = kvtrim;
using namespace kvtrim::testing;

namespace {

constexpr kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
constexpr std::int64_t batch = 2, prefill = 77;

using codec_list = std::tuple<kt::codec::fp32, kt::codec::fp16, kt::codec::bf16, kt::codec::int8, kt::codec::int4,
                              kt::codec::fp8, kt::codec::low_rank, kt::codec::layered<kt::codec::int8>>;

template <class Fn, class... C>
void for_each_codec(Fn&& fn, std::tuple<C...>*) {
  (fn.template operator()<C>(), ...);
}
template <class Fn>
void for_each_codec(Fn&& fn) {
  for_each_codec(fn, static_cast<codec_list*>(nullptr));
}

kt::kv_view<const float> prefix(const host_tensor<float, 4>& x, std::int64_t begin, std::int64_t count) {
  kt::kv_view<const float> view = x.cview();
  view.data += begin * view.strides[2];
  view.extents[2] = count;
  return view;
}

/// A cache for `Scheme` sized from plan_capacity, with `headroom` tokens per head for appends.
template <class Scheme>
auto planned_cache(const typename Scheme::config& cfg, std::int64_t tokens, std::int64_t headroom,
                   const typename Scheme::codec::config& codec_config = {}) {
  const kt::capacity_plan plan = Scheme::plan_capacity(shape, batch, tokens, cfg);
  using layout = typename Scheme::layout;
  const std::int64_t heads = batch * shape.kv_heads;
  if constexpr (std::is_same_v<layout, kt::layout::paged>) {
    const std::int64_t page = kt::layout::paged::default_page_size;
    return Scheme::make_cache(shape, batch,
                              kt::layout::paged::pool_size{plan.pages(page) + heads * ((headroom + page - 1) / page + 1), page},
                              codec_config);
  } else if constexpr (std::is_same_v<layout, kt::layout::flat>) {
    const std::int64_t run = kt::codec::slot_alignment<typename Scheme::codec>(codec_config);
    return Scheme::make_cache(shape, batch, kt::layout::flat::pool_size{plan.flat_slots(run) + heads * (headroom + run)},
                              codec_config);
  } else {
    return Scheme::make_cache(shape, batch, plan.max_head_tokens + headroom, codec_config);
  }
}

template <class Layout, class Codec>
using snapkv_scheme =
    kt::scheme<Layout, kt::score::snapkv,
               std::conditional_t<Layout::ragged_heads, kt::budget::adaptive, kt::budget::uniform>, Codec,
               kt::backend::cpu>;

template <class Scheme>
typename Scheme::config snapkv_config() {
  typename Scheme::config cfg;
  cfg.score.window = 8;
  cfg.budget.keep = kt::keep_tokens{24};
  return cfg;
}

struct prefill_data {
  host_tensor<float, 4> keys = random_tensor<float, 4>({batch, shape.kv_heads, prefill + 8, shape.head_dim}, 11);
  host_tensor<float, 4> values = random_tensor<float, 4>({batch, shape.kv_heads, prefill + 8, shape.head_dim}, 12);
  host_tensor<float, 4> window = random_tensor<float, 4>({batch, shape.q_heads, 8, shape.head_dim}, 13);
  host_tensor<float, 3> queries = random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, 14);
};

/// Compresses, returning the selection written through compress_options.
template <class Scheme>
std::pair<std::vector<std::int64_t>, std::vector<std::int32_t>> compress_with_selection(
    typename Scheme::cache& cache, const prefill_data& in, const typename Scheme::config& cfg,
    std::int64_t start_position = 0) {
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(batch * shape.kv_heads + 1));
  std::vector<std::int32_t> kept(static_cast<std::size_t>(Scheme::kept_tokens_capacity(shape, batch, prefill, cfg)));
  kt::compress_options<kt::host_space> options;
  options.start_position = start_position;
  options.kept_offsets = offsets.data();
  options.kept_tokens = kept.data();
  options.kept_tokens_capacity = static_cast<std::int64_t>(kept.size());
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, prefill, cfg));
  if constexpr (Scheme::scorer::needs_queries)
    Scheme::compress(prefix(in.keys, 0, prefill), prefix(in.values, 0, prefill), in.window.cview(), cache.view(), cfg,
                     options, kt::workspace{scratch.data(), scratch.size()});
  else
    Scheme::compress(prefix(in.keys, 0, prefill), prefix(in.values, 0, prefill), cache.view(), cfg, options,
                     kt::workspace{scratch.data(), scratch.size()});
  kept.resize(static_cast<std::size_t>(offsets.back()));
  return {offsets, kept};
}

template <class Scheme>
std::vector<float> attend(const typename Scheme::cache& cache, const prefill_data& in) {
  std::vector<float> out(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim));
  std::vector<std::byte> scratch(Scheme::attend_workspace(cache.view()));
  Scheme::attend(in.queries.cview(), cache.view(),
                 kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim}),
                 kt::workspace{scratch.data(), scratch.size()});
  return out;
}

std::vector<std::byte> snapshot(const void* data, std::size_t bytes) {
  std::vector<std::byte> copy(bytes);
  std::memcpy(copy.data(), data, bytes);
  return copy;
}

/// A copy of `x` with one NaN in (b, h, token, channel 3).
host_tensor<float, 4> with_nan(const host_tensor<float, 4>& x, std::int64_t b, std::int64_t h, std::int64_t token) {
  host_tensor<float, 4> y = x;
  y.view.data = y.storage.data();
  y(b, h, token, 3) = std::numeric_limits<float>::quiet_NaN();
  return y;
}

template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const kt::error& e) {
    return e.what();
  }
  return "(no error)";
}

// ---- every layout × codec, default configs -----------------------------------

template <class Layout>
void defaults_work_for_every_codec() {
  for_each_codec([]<class Codec>() {
    using scheme = snapkv_scheme<Layout, Codec>;
    SCOPED_TRACE(std::string(Layout::name) + " × " + std::string(Codec::name));
    const prefill_data in;
    const auto cfg = snapkv_config<scheme>();
    auto cache = planned_cache<scheme>(cfg, prefill, 8);
    std::vector<std::int64_t> offsets;
    std::vector<std::int32_t> kept;
    ASSERT_NO_THROW(std::tie(offsets, kept) = compress_with_selection<scheme>(cache, in, cfg, 100));
    // One append crossing nothing, then five crossing a page (16) and a key group (32) boundary for some heads.
    ASSERT_NO_THROW(scheme::append(cache.view(), prefix(in.keys, prefill, 1), prefix(in.values, prefill, 1)));
    ASSERT_NO_THROW(scheme::append(cache.view(), prefix(in.keys, prefill + 1, 5), prefix(in.values, prefill + 1, 5)));
    const std::vector<float> out = attend<scheme>(cache, in);
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); }));
    // Positions: the kept prefill tokens shifted by the start position, then the six appended ones.
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        const std::int64_t head = b * shape.kv_heads + h;
        std::vector<std::int32_t> expected;
        for (std::int64_t k = offsets[head]; k < offsets[head + 1]; ++k) {
          if (k > offsets[head]) {
            EXPECT_LT(kept[k - 1], kept[k]) << "kept tokens ascend";
          }
          expected.push_back(100 + kept[static_cast<std::size_t>(k)]);
        }
        for (std::int32_t i = 0; i < 6; ++i) expected.push_back(100 + prefill + i);
        EXPECT_EQ(kt::head_positions(cache.view(), b, h), expected) << "head " << head;
        EXPECT_EQ(kt::next_position(cache.view(), b, h), 100 + prefill + 6);
      }
    // Ada-KV keeps exactly H·k tokens per sequence.
    for (std::int64_t b = 0; b < batch; ++b)
      EXPECT_EQ(offsets[(b + 1) * shape.kv_heads] - offsets[b * shape.kv_heads], shape.kv_heads * 24);
  });
}

TEST(Composition, ContiguousWithEveryCodecsDefaults) { defaults_work_for_every_codec<kt::layout::contiguous>(); }
TEST(Composition, PagedWithEveryCodecsDefaults) { defaults_work_for_every_codec<kt::layout::paged>(); }
TEST(Composition, FlatWithEveryCodecsDefaults) { defaults_work_for_every_codec<kt::layout::flat>(); }

// ---- RazorAttention through every codec --------------------------------------

template <class Layout>
void razor_with_every_codec() {
  for_each_codec([]<class Codec>() {
    using scheme = kt::scheme<Layout, kt::score::retrieval_head, kt::budget::by_scorer, Codec, kt::backend::cpu>;
    SCOPED_TRACE(std::string(Layout::name) + " × " + std::string(Codec::name));
    const prefill_data in;
    typename scheme::config cfg;
    cfg.score.retrieval = {true, false};
    cfg.score.sinks = 4;
    cfg.score.min_recent = 20;
    auto cache = planned_cache<scheme>(cfg, prefill, 8);
    ASSERT_NO_THROW(compress_with_selection<scheme>(cache, in, cfg));
    ASSERT_NO_THROW(scheme::append(cache.view(), prefix(in.keys, prefill, 3), prefix(in.values, prefill, 3)));
    // Non-retrieval head: sinks 0..3, the compensation token at the last dropped position
    // (T − W − 1 = 56), the 20 recent tokens, then the appended ones at T, T + 1, T + 2.
    std::vector<std::int32_t> expected{0, 1, 2, 3, static_cast<std::int32_t>(prefill - 20 - 1)};
    for (std::int32_t t = prefill - 20; t < prefill + 3; ++t) expected.push_back(t);
    for (std::int64_t b = 0; b < batch; ++b) {
      EXPECT_EQ(kt::head_positions(cache.view(), b, 1), expected);
      std::vector<std::int32_t> whole(prefill + 3);
      std::iota(whole.begin(), whole.end(), 0);
      EXPECT_EQ(kt::head_positions(cache.view(), b, 0), whole);
    }
    const std::vector<float> out = attend<scheme>(cache, in);
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); }));
  });
}

TEST(Composition, RazorAttentionOnPagedWithEveryCodec) { razor_with_every_codec<kt::layout::paged>(); }
TEST(Composition, RazorAttentionOnFlatWithEveryCodec) { razor_with_every_codec<kt::layout::flat>(); }

// ---- the strong guarantee, a failure injected at every head --------------------

template <class Layout>
void failures_leave_the_cache_unchanged() {
  for_each_codec([]<class Codec>() {
    using scheme = snapkv_scheme<Layout, Codec>;
    SCOPED_TRACE(std::string(Layout::name) + " × " + std::string(Codec::name));
    const prefill_data in;
    const auto cfg = snapkv_config<scheme>();
    auto cache = planned_cache<scheme>(cfg, prefill, 8);
    compress_with_selection<scheme>(cache, in, cfg);
    scheme::append(cache.view(), prefix(in.keys, prefill, 1), prefix(in.values, prefill, 1));
    const auto before = snapshot(cache.data(), cache.bytes());
    const auto unchanged = [&] { return snapshot(cache.data(), cache.bytes()) == before; };
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        const std::string where = "sequence " + std::to_string(b) + ", kv head " + std::to_string(h);
        const auto bad_keys = with_nan(in.keys, b, h, prefill + 2);
        const auto bad_values = with_nan(in.values, b, h, prefill + 3);
        std::string message = error_of([&] {
          scheme::append(cache.view(), prefix(bad_keys, prefill + 1, 4), prefix(in.values, prefill + 1, 4));
        });
        EXPECT_NE(message.find(where + ", token 1"), std::string::npos) << message;
        EXPECT_TRUE(unchanged()) << "append with a NaN key in " << where;
        message = error_of([&] {
          scheme::append(cache.view(), prefix(in.keys, prefill + 1, 4), prefix(bad_values, prefill + 1, 4));
        });
        EXPECT_NE(message.find("new_values"), std::string::npos) << message;
        EXPECT_TRUE(unchanged()) << "append with a NaN value in " << where;
        const auto bad_prefill = with_nan(in.keys, b, h, 40);
        std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, prefill, cfg));
        message = error_of([&] {
          scheme::compress(prefix(bad_prefill, 0, prefill), prefix(in.values, 0, prefill), in.window.cview(),
                           cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});
        });
        EXPECT_NE(message.find(where + ", token 40"), std::string::npos) << message;
        EXPECT_TRUE(unchanged()) << "compress with a NaN key in " << where;
        if constexpr (Layout::ragged_heads) {
          const auto row = [&](const host_tensor<float, 4>& x) {
            return kt::tensor_view<const float, 2>{x.view.data + b * x.view.strides[0] + h * x.view.strides[1] +
                                                       (prefill + 1) * x.view.strides[2],
                                                   {4, shape.head_dim},
                                                   {x.view.strides[2], x.view.strides[3]}};
          };
          message = error_of([&] { scheme::append_head(cache.view(), b, h, row(bad_keys), row(in.values)); });
          EXPECT_NE(message.find("new_keys"), std::string::npos) << message;
          EXPECT_TRUE(unchanged()) << "append_head with a NaN key in " << where;
        }
      }
    // A NaN window query (SnapKV reads them) is refused the same way.
    host_tensor<float, 4> bad_window = in.window;
    bad_window.view.data = bad_window.storage.data();
    bad_window(1, 5, 7, 0) = std::numeric_limits<float>::infinity();
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, prefill, cfg));
    const std::string message = error_of([&] {
      scheme::compress(prefix(in.keys, 0, prefill), prefix(in.values, 0, prefill), bad_window.cview(), cache.view(),
                       cfg, kt::workspace{scratch.data(), scratch.size()});
    });
    EXPECT_NE(message.find("window_queries"), std::string::npos) << message;
    EXPECT_NE(message.find("sequence 1, query head 5, token 7"), std::string::npos) << message;
    EXPECT_TRUE(unchanged());
    // Running out of room: append until it fails; the failing call changes nothing.
    for (int step = 0; step < 10000; ++step) {
      const auto state = snapshot(cache.data(), cache.bytes());
      const std::string failure =
          error_of([&] { scheme::append(cache.view(), prefix(in.keys, 0, 7), prefix(in.values, 0, 7)); });
      if (failure != "(no error)") {
        EXPECT_TRUE(snapshot(cache.data(), cache.bytes()) == state) << failure;
        EXPECT_NE(failure.find("kvtrim::"), std::string::npos);
        return;
      }
    }
    ADD_FAILURE() << "the cache never filled up";
  });
}

TEST(StrongGuarantee, ContiguousEveryCodecEveryHead) { failures_leave_the_cache_unchanged<kt::layout::contiguous>(); }
TEST(StrongGuarantee, PagedEveryCodecEveryHead) { failures_leave_the_cache_unchanged<kt::layout::paged>(); }
TEST(StrongGuarantee, FlatEveryCodecEveryHead) { failures_leave_the_cache_unchanged<kt::layout::flat>(); }

// ---- one source of truth -------------------------------------------------------

TEST(Composition, ACopiedContiguousViewSharesTheCachesLength) {
  using scheme = snapkv_scheme<kt::layout::contiguous, kt::codec::fp16>;
  const prefill_data in;
  const auto cfg = snapkv_config<scheme>();
  auto cache = planned_cache<scheme>(cfg, prefill, 8);
  compress_with_selection<scheme>(cache, in, cfg);
  scheme::cache_view copy = cache.view();  // an engine keeps its own copy of the view
  scheme::append(copy, prefix(in.keys, prefill, 2), prefix(in.values, prefill, 2));
  EXPECT_EQ(*cache.view().length, 26);
  scheme::append(cache.view(), prefix(in.keys, prefill, 1), prefix(in.values, prefill, 1));
  EXPECT_EQ(*copy.length, 27);
  EXPECT_EQ(kt::head_positions(copy, 1, 1).back(), prefill + 2);
}

// ---- capacity planning ---------------------------------------------------------

TEST(CapacityPlan, UniformPagedPoolIsExact) {
  using scheme = kt::scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, kt::codec::fp16, kt::backend::cpu>;
  const prefill_data in;
  auto cfg = snapkv_config<scheme>();
  cfg.budget.keep = kt::keep_tokens{33};  // 3 pages of 16 per head
  const kt::capacity_plan plan = scheme::plan_capacity(shape, batch, prefill, cfg);
  EXPECT_TRUE(plan.exact_total);
  EXPECT_EQ(plan.total_tokens, batch * shape.kv_heads * 33);
  EXPECT_EQ(plan.pages(16), batch * shape.kv_heads * 3);
  auto fits = scheme::make_cache(shape, batch, kt::layout::paged::pool_size{plan.pages(16), 16});
  EXPECT_NO_THROW(compress_with_selection<scheme>(fits, in, cfg));
  auto short_pool = scheme::make_cache(shape, batch, kt::layout::paged::pool_size{plan.pages(16) - 1, 16});
  EXPECT_THROW(compress_with_selection<scheme>(short_pool, in, cfg), kt::error);
}

TEST(CapacityPlan, AdaptiveBoundsHoldForPagedAndFlat) {
  using paged = kt::scheme<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::int8, kt::backend::cpu>;
  using flat = kt::scheme<kt::layout::flat, kt::score::snapkv, kt::budget::adaptive, kt::codec::int8, kt::backend::cpu>;
  const prefill_data in;
  const auto cfg = snapkv_config<paged>();
  const kt::capacity_plan plan = paged::plan_capacity(shape, batch, prefill, cfg);
  EXPECT_EQ(plan.total_tokens, batch * shape.kv_heads * 24);
  auto paged_cache = paged::make_cache(shape, batch, kt::layout::paged::pool_size{plan.pages(16), 16});
  EXPECT_NO_THROW(compress_with_selection<paged>(paged_cache, in, cfg));
  auto flat_cache = flat::make_cache(shape, batch, kt::layout::flat::pool_size{plan.flat_slots(32)});
  EXPECT_NO_THROW(compress_with_selection<flat>(flat_cache, in, cfg));
}

// ---- engine-built views ----------------------------------------------------------

template <class Fn>
void expect_message(Fn&& fn, const std::string& argument, const std::string& fragment) {
  const std::string message = error_of(fn);
  EXPECT_NE(message.find("argument '" + argument + "'"), std::string::npos) << message;
  EXPECT_NE(message.find(fragment), std::string::npos) << message;
}

TEST(EngineViews, ContiguousMappingsThatLeaveTheStorageOrOverlapAreRefused) {
  using scheme = snapkv_scheme<kt::layout::contiguous, kt::codec::fp16>;
  const prefill_data in;
  auto cache = scheme::make_cache(shape, batch, 40);
  std::vector<float> out(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim));
  const auto out_view = kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim});
  scheme::cache_view view = cache.view();
  view.map.batch_stride += 1;  // the last head now ends one slot past the storage
  expect_message([&] { scheme::attend(in.queries.cview(), view, out_view, kt::workspace{}); }, "cache.map",
                 "strides whose last slot lies in the codec's storage of 160 slots");
  view = cache.view();
  view.map.head_stride = 20;  // two heads share slots 20..39
  expect_message([&] { scheme::attend(in.queries.cview(), view, out_view, kt::workspace{}); }, "cache.map",
                 "no two (sequence, head, token) share a slot");
  view = cache.view();
  view.map.token_stride = 0;
  expect_message([&] { scheme::attend(in.queries.cview(), view, out_view, kt::workspace{}); }, "cache.map",
                 "non-zero strides");
  view = cache.view();
  view.length = nullptr;
  expect_message([&] { scheme::attend(in.queries.cview(), view, out_view, kt::workspace{}); }, "cache",
                 "non-null length");
}

TEST(EngineViews, PagedTablesAreValidatedBeforeUse) {
  using scheme = snapkv_scheme<kt::layout::paged, kt::codec::fp16>;
  const prefill_data in;
  const auto cfg = snapkv_config<scheme>();
  auto cache = planned_cache<scheme>(cfg, prefill, 8);
  compress_with_selection<scheme>(cache, in, cfg);
  std::vector<float> out(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim));
  const auto out_view = kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim});
  const auto attend_now = [&] {
    std::vector<std::byte> scratch(scheme::attend_workspace(cache.view()));
    scheme::attend(in.queries.cview(), cache.view(), out_view, kt::workspace{scratch.data(), scratch.size()});
  };
  const auto& view = cache.view();
  const std::int32_t page = view.indices[1];
  view.indices[1] = static_cast<std::int32_t>(view.pages);  // one past the pool
  expect_message(attend_now, "cache.indices", "page ids in [0, " + std::to_string(view.pages) + ")");
  expect_message([&] { scheme::append(cache.view(), prefix(in.keys, 0, 1), prefix(in.values, 0, 1)); },
                 "cache.indices", "got " + std::to_string(view.pages) + " at indices[1]");
  view.indices[1] = page;
  const std::int32_t last = view.last_page_len[2];
  view.last_page_len[2] = 17;
  expect_message(attend_now, "cache.last_page_len", "a length in [1, page_size = 16]");
  view.last_page_len[2] = last;
  const std::int32_t next = view.indptr[3];
  view.indptr[3] = view.indptr[2] - 1;
  expect_message(attend_now, "cache.indptr", "non-decreasing");
  view.indptr[3] = next;
  const std::int32_t free = *view.free_count;
  *view.free_count = static_cast<std::int32_t>(view.pages);
  expect_message(attend_now, "cache.free_count", "a count in [0, pages − pages in tables");
  *view.free_count = free;
  EXPECT_NO_THROW(attend_now());
}

TEST(EngineViews, FlatOffsetsAreValidatedBeforeUse) {
  using scheme = snapkv_scheme<kt::layout::flat, kt::codec::fp16>;
  const prefill_data in;
  const auto cfg = snapkv_config<scheme>();
  auto cache = planned_cache<scheme>(cfg, prefill, 8);
  compress_with_selection<scheme>(cache, in, cfg);
  const auto& view = cache.view();
  const auto append_now = [&] { scheme::append(cache.view(), prefix(in.keys, 0, 1), prefix(in.values, 0, 1)); };
  const std::int64_t offset = view.offsets[2];
  view.offsets[2] = view.capacity + 5;
  expect_message(append_now, "cache.offsets", "non-decreasing offsets in [0, ");
  view.offsets[2] = offset;
  const std::int64_t length = view.lengths[1];
  view.lengths[1] = view.offsets[2] - view.offsets[1] + 1;
  expect_message(append_now, "cache.lengths", "a length in [0, region = ");
  view.lengths[1] = length;
  view.compensation.index[0] = 400;
  expect_message(append_now, "cache.compensation.index", "−1 or a token the head holds");
  view.compensation.index[0] = -1;
  EXPECT_NO_THROW(append_now());
}

// ---- absurd sizes: errors, not overflow --------------------------------------------

TEST(AbsurdSizes, SizesThatOverflowAreErrors) {
  using scheme = snapkv_scheme<kt::layout::flat, kt::codec::int8>;
  const auto cfg = snapkv_config<scheme>();
  EXPECT_THROW(scheme::compress_workspace(shape, batch, std::int64_t{1} << 60, cfg), kt::error);
  EXPECT_THROW(scheme::compress_workspace(shape, std::int64_t{1} << 62, 100, cfg), kt::error);
  EXPECT_THROW(scheme::plan_capacity(shape, std::int64_t{1} << 62, 100, cfg), kt::error);
  using contiguous = snapkv_scheme<kt::layout::contiguous, kt::codec::int8>;
  EXPECT_THROW(contiguous::make_cache(shape, std::int64_t{1} << 40, std::int64_t{1} << 30), kt::error);
  EXPECT_THROW(contiguous::make_cache(shape, 1, std::numeric_limits<std::int64_t>::max()), kt::error);
  EXPECT_THROW(scheme::make_cache(shape, batch, kt::layout::flat::pool_size{std::numeric_limits<std::int64_t>::max()}),
               kt::error);
  using paged = snapkv_scheme<kt::layout::paged, kt::codec::fp16>;
  EXPECT_THROW(paged::make_cache(shape, batch, kt::layout::paged::pool_size{std::int64_t{1} << 30, std::int64_t{1} << 40}),
               kt::error);
  // A view whose extents multiply past 2^63.
  float dummy = 0.0f;
  const kt::kv_view<const float> huge{&dummy, {1, 2, std::int64_t{1} << 60, 64}, {0, 0, 64, 1}};
  auto cache = scheme::make_cache(shape, 1, kt::layout::flat::pool_size{256});
  std::vector<std::byte> scratch(64);
  const std::string message = error_of([&] {
    scheme::compress(huge, huge, huge, cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});
  });
  EXPECT_NE(message.find("argument 'keys'"), std::string::npos) << message;
  // RazorAttention with a window of INT64_MAX keeps every token rather than overflowing.
  using razor = kt::scheme<kt::layout::flat, kt::score::retrieval_head, kt::budget::by_scorer, kt::codec::fp16,
                           kt::backend::cpu>;
  razor::config razor_cfg;
  razor_cfg.score.retrieval = {false, false};
  razor_cfg.score.min_recent = std::numeric_limits<std::int64_t>::max();
  razor_cfg.score.sinks = std::numeric_limits<std::int64_t>::max();
  const kt::capacity_plan plan = razor::plan_capacity(shape, batch, prefill, razor_cfg);
  EXPECT_EQ(plan.max_head_tokens, prefill);
}

// ---- selection output and chunked prefill -----------------------------------------

TEST(Selection, KeptIndicesMatchPositionsAndTheBudget) {
  using scheme = snapkv_scheme<kt::layout::paged, kt::codec::fp32>;
  const prefill_data in;
  const auto cfg = snapkv_config<scheme>();
  auto cache = planned_cache<scheme>(cfg, prefill, 0);
  const auto [offsets, kept] = compress_with_selection<scheme>(cache, in, cfg, 4096);
  for (std::int64_t head = 0; head < batch * shape.kv_heads; ++head) {
    std::vector<std::int32_t> expected;
    for (std::int64_t k = offsets[head]; k < offsets[head + 1]; ++k) expected.push_back(4096 + kept[k]);
    EXPECT_EQ(kt::head_positions(cache.view(), head / shape.kv_heads, head % shape.kv_heads), expected);
    // SnapKV protects the observation window: the last 8 prefill tokens are kept in every head.
    for (std::int32_t t = prefill - 8; t < prefill; ++t)
      EXPECT_TRUE(std::binary_search(kept.begin() + offsets[head], kept.begin() + offsets[head + 1], t));
  }
  // Too small an output buffer is refused before anything is written.
  std::vector<std::int64_t> small_offsets(5);
  std::vector<std::int32_t> small_tokens(10);
  kt::compress_options<kt::host_space> options;
  options.kept_offsets = small_offsets.data();
  options.kept_tokens = small_tokens.data();
  options.kept_tokens_capacity = 10;
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, prefill, cfg));
  const auto before = snapshot(cache.data(), cache.bytes());
  expect_message(
      [&] {
        scheme::compress(prefix(in.keys, 0, prefill), prefix(in.values, 0, prefill), in.window.cview(), cache.view(),
                         cfg, options, kt::workspace{scratch.data(), scratch.size()});
      },
      "options.kept_tokens", "room for " + std::to_string(scheme::kept_tokens_capacity(shape, batch, prefill, cfg)));
  EXPECT_TRUE(snapshot(cache.data(), cache.bytes()) == before);
  options.kept_tokens_capacity = 1 << 20;
  options.start_position = std::numeric_limits<std::int32_t>::max() - 10;
  expect_message(
      [&] {
        scheme::compress(prefix(in.keys, 0, prefill), prefix(in.values, 0, prefill), in.window.cview(), cache.view(),
                         cfg, options, kt::workspace{scratch.data(), scratch.size()});
      },
      "options.start_position", "positions of the 77 tokens are 32-bit");
}

}  // namespace
