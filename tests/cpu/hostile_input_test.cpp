// Hostile input (issue 9): absurd sizes, engine-built views that lie, bad
// configs of every scorer, budget and codec, NaN/Inf in fp16/bf16 caches,
// positions out of range, outputs and workspaces too small, heads out of
// range. Each case throws kvtrim::error whose message reads
// "<function>: argument '<name>': expected <what>, got <what came>" and the
// test asserts all four parts; where a cache is involved, its bytes
// (cache.data(), cache.bytes()) are compared before and after: a refused call
// changes nothing. docs/hostile-inputs.md lists these cases with the older
// ones (bad_input_test, profile_test, composition_test).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;

constexpr kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 16};
constexpr std::int64_t batch = 2, tokens = 40;
constexpr std::int64_t big = std::int64_t{1} << 60;
const kt::codec::fp16::config fp16_config{};
const kt::codec::bf16::config bf16_config{};
const kt::codec::fp32::config fp32_config{};

using paged_fp16 = kt::scheme<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16, kt::backend::cpu>;
using flat_bf16 = kt::scheme<kt::layout::flat, kt::score::h2o, kt::budget::per_head, kt::codec::bf16, kt::backend::cpu>;
using contiguous_fp32 =
    kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::pyramid, kt::codec::fp32, kt::backend::cpu>;
using razor = kt::scheme<kt::layout::flat, kt::score::retrieval_head, kt::budget::by_scorer, kt::codec::fp32, kt::backend::cpu>;
template <class Codec>
using contiguous_with = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

/// The message of the kvtrim::error `call` throws (a failure if it throws something else or nothing).
std::string message_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const kt::error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-kvtrim exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "no exception";
  return {};
}

/// As bad_input_test's expect_error: the four parts of the message.
void expect_error(const std::function<void()>& call, std::string_view function, std::string_view argument,
                  std::string_view expected, std::string_view got) {
  const std::string message = message_of(call);
  if (message.empty()) return;
  const std::string head = kt::detail::cat(function, ": argument '", argument, "': expected ");
  EXPECT_EQ(message.rfind(head, 0), 0u) << "message: " << message << "\nshould start with: " << head;
  EXPECT_NE(message.find(expected), std::string::npos) << "message: " << message << "\nlacks: " << expected;
  EXPECT_NE(message.find(kt::detail::cat(", got ", got)), std::string::npos)
      << "message: " << message << "\nlacks: , got " << got;
}

/// expect_error, and the cache's bytes are the same afterwards.
template <class Cache>
void expect_refused(const Cache& cache, const std::function<void()>& call, std::string_view function,
                    std::string_view argument, std::string_view expected, std::string_view got) {
  std::vector<unsigned char> before(cache.bytes());
  std::memcpy(before.data(), cache.data(), cache.bytes());
  expect_error(call, function, argument, expected, got);
  EXPECT_EQ(std::memcmp(before.data(), cache.data(), cache.bytes()), 0) << "the refused call changed the cache";
}

constexpr std::string_view compress_fn = "kvtrim::scheme::compress";
constexpr std::string_view append_fn = "kvtrim::scheme::append";
constexpr std::string_view append_head_fn = "kvtrim::scheme::append_head";
constexpr std::string_view attend_fn = "kvtrim::scheme::attend";

kt::kv_view<const float> rows(const kts::host_tensor<float, 4>& x, std::int64_t begin, std::int64_t count) {
  kt::kv_view<const float> view = x.cview();
  view.data += begin * view.strides[2];
  view.extents[2] = count;
  return view;
}

/// A paged fp16 cache (pages of 8) after a SnapKV + Ada-KV compress of 40 tokens and one append.
struct paged_setup {
  paged_fp16::config cfg;
  kts::host_tensor<float, 4> keys = kts::random_tensor<float, 4>({batch, shape.kv_heads, tokens + 8, shape.head_dim}, 1);
  kts::host_tensor<float, 4> values = kts::random_tensor<float, 4>({batch, shape.kv_heads, tokens + 8, shape.head_dim}, 2);
  kts::host_tensor<float, 4> window = kts::random_tensor<float, 4>({batch, shape.q_heads, 8, shape.head_dim}, 3);
  kts::host_tensor<float, 3> queries = kts::random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, 4);
  kts::host_tensor<float, 3> out = kts::make_tensor<float, 3>({batch, shape.q_heads, shape.head_dim});
  paged_fp16::cache cache = paged_fp16::make_cache(shape, batch, kt::layout::paged::pool_size{40, 8}, fp16_config);
  std::vector<std::byte> scratch;

  paged_setup() {
    cfg.score.window = 8;
    cfg.budget.keep = kt::keep_tokens{12};
    scratch.resize(paged_fp16::compress_workspace(shape, batch, tokens, cfg));
    compress();
    paged_fp16::append(cache.view(), rows(keys, tokens, 1), rows(values, tokens, 1));
  }
  kt::workspace ws() { return {scratch.data(), scratch.size()}; }
  void compress() { compress(cache.view(), cfg); }
  void compress(paged_fp16::cache_view& view, const paged_fp16::config& c) {
    paged_fp16::compress(rows(keys, 0, tokens), rows(values, 0, tokens), window.cview(), view, c, ws());
  }
  void compress_with(const kt::compress_options<kt::host_space>& options) {
    paged_fp16::compress(rows(keys, 0, tokens), rows(values, 0, tokens), window.cview(), cache.view(), cfg, options, ws());
  }
  void append(paged_fp16::cache_view& view) {
    paged_fp16::append(view, rows(keys, tokens + 1, 2), rows(values, tokens + 1, 2));
  }
  void attend(const paged_fp16::cache_view& view) {
    std::vector<std::byte> attend_scratch(paged_fp16::attend_workspace(cache.view()));
    paged_fp16::attend(queries.cview(), view, out.view, kt::workspace{attend_scratch.data(), attend_scratch.size()});
  }
};

/// A flat bf16 cache after an H2O + per-head compress of 40 tokens (heads keep 9 and 14).
struct flat_setup {
  flat_bf16::config cfg;
  kts::host_tensor<float, 4> keys = kts::random_tensor<float, 4>({batch, shape.kv_heads, tokens + 8, shape.head_dim}, 5);
  kts::host_tensor<float, 4> values = kts::random_tensor<float, 4>({batch, shape.kv_heads, tokens + 8, shape.head_dim}, 6);
  kts::host_tensor<float, 4> window = kts::random_tensor<float, 4>({batch, shape.q_heads, tokens, shape.head_dim}, 7);
  flat_bf16::cache cache = flat_bf16::make_cache(shape, batch, kt::layout::flat::pool_size{100}, bf16_config);
  std::vector<std::byte> scratch;

  flat_setup() {
    cfg.score.recent = kt::keep_tokens{4};
    cfg.budget = {.lengths = {9, 14}, .kv_heads = 2, .layer = 0};
    scratch.resize(flat_bf16::compress_workspace(shape, batch, tokens, cfg));
    compress(cfg);
  }
  void compress(const flat_bf16::config& c) {
    flat_bf16::compress(rows(keys, 0, tokens), rows(values, 0, tokens), window.cview(), cache.view(), c,
                        kt::workspace{scratch.data(), scratch.size()});
  }
  void append(flat_bf16::cache_view& view) {
    flat_bf16::append(view, rows(keys, tokens, 1), rows(values, tokens, 1));
  }
};

kts::host_tensor<float, 4> poisoned(const kts::host_tensor<float, 4>& x, std::int64_t b, std::int64_t h, std::int64_t t,
                                    std::int64_t d, float bad) {
  kts::host_tensor<float, 4> y = x;
  y.view.data = y.storage.data();
  y(b, h, t, d) = bad;
  return y;
}

// ---- absurd sizes ----------------------------------------------------------------

TEST(HostileSizes, PrefillOfTwoToTheSixtyTokens) {
  paged_setup s;
  // The scores alone would take 4·2^60 floats: refused where the bytes are counted (the message names the
  // workspace carver's 'count' rather than compress_workspace's 'tokens'; see docs/hostile-inputs.md).
  expect_error([&] { (void)paged_fp16::compress_workspace(shape, batch, big, s.cfg); }, "kvtrim::workspace_carver::take",
               "count", "sizes whose product fits in 64 bits", kt::detail::cat(batch * shape.kv_heads * big, " × 4"));
  expect_error([&] { (void)paged_fp16::plan_capacity(shape, batch, big, s.cfg); }, "kvtrim::scheme::plan_capacity",
               "tokens", "between 1 and 2147483647 tokens", std::to_string(big));
  float dummy = 0.0f;
  const kt::kv_view<const float> huge{&dummy, {batch, shape.kv_heads, big, shape.head_dim}, {0, 0, 0, 1}};
  expect_refused(s.cache, [&] { paged_fp16::compress(huge, huge, s.window.cview(), s.cache.view(), s.cfg, s.ws()); },
                 compress_fn, "keys", "sizes whose product fits in 64 bits",
                 kt::detail::cat(batch * shape.kv_heads * big, " × ", shape.head_dim));
  // 2^31 tokens: the extents fit, the 32-bit token indices do not.
  const kt::kv_view<const float> long_keys{&dummy, {batch, shape.kv_heads, std::int64_t{1} << 31, shape.head_dim}, {0, 0, 0, 1}};
  expect_refused(s.cache, [&] { paged_fp16::compress(long_keys, long_keys, s.window.cview(), s.cache.view(), s.cfg, s.ws()); },
                 compress_fn, "keys", "at most 2147483647 tokens (token indices are 32-bit)", "2147483648 tokens");
}

TEST(HostileSizes, ExtentsWhoseProductOverflows) {
  paged_setup s;
  float dummy = 0.0f;
  const std::int64_t huge_batch = std::int64_t{1} << 40;
  const kt::kv_view<const float> keys{&dummy, {huge_batch, shape.kv_heads, 1 << 23, shape.head_dim}, {0, 0, 0, 1}};
  expect_refused(s.cache, [&] { paged_fp16::append(s.cache.view(), keys, keys); }, append_fn, "new_keys",
                 kt::detail::cat("shape [", batch, ", ", shape.kv_heads, ", *, ", shape.head_dim, "]"),
                 kt::detail::cat("[", huge_batch, ", 2, 8388608, 16]"));
  // The right shape, but 2^60 tokens of stride 2^10: the farthest element's offset passes 2^63.
  const kt::kv_view<const float> far{&dummy, {batch, shape.kv_heads, big, shape.head_dim}, {0, 0, 1024, 1}};
  expect_refused(s.cache, [&] { paged_fp16::append(s.cache.view(), far, far); }, append_fn, "new_keys",
                 "sizes whose product fits in 64 bits", kt::detail::cat(big - 1, " × 1024"));
}

TEST(HostileSizes, BatchTimesCapacityOverflows) {
  expect_error([] { (void)contiguous_fp32::make_cache(shape, std::int64_t{1} << 40, std::int64_t{1} << 30, fp32_config); },
               "kvtrim::layout::contiguous::view::bytes", "batch", "sizes whose product fits in 64 bits",
               kt::detail::cat(std::int64_t{1} << 41, " × ", std::int64_t{1} << 30));
  expect_error([] { (void)contiguous_fp32::make_cache(shape, 1, std::int64_t{1} << 31, fp32_config); },
               "kvtrim::layout::contiguous::view::bytes", "capacity", "at most 2^31 − 1 slots per head",
               std::to_string(std::int64_t{1} << 31));
}

TEST(HostileSizes, PagesTimesPageSizeOverflows) {
  expect_error(
      [] { (void)paged_fp16::make_cache(shape, batch, kt::layout::paged::pool_size{std::int64_t{1} << 30, std::int64_t{1} << 40}, fp16_config); },
      "kvtrim::layout::paged::view::bytes", "pool.pages", "sizes whose product fits in 64 bits",
      kt::detail::cat(std::int64_t{1} << 30, " × ", std::int64_t{1} << 40));
  expect_error([] { (void)paged_fp16::make_cache(shape, batch, kt::layout::paged::pool_size{std::int64_t{1} << 31, 16}, fp16_config); },
               "kvtrim::layout::paged::view::bytes", "pool.pages", "between 1 and 2^31 − 1 pages",
               std::to_string(std::int64_t{1} << 31));
  expect_error([] { (void)paged_fp16::make_cache(shape, batch, kt::layout::paged::pool_size{4, 0}, fp16_config); },
               "kvtrim::layout::paged::view::bytes", "pool.page_size", "at least one token per page", "0");
  expect_error([] { (void)flat_bf16::make_cache(shape, batch, kt::layout::flat::pool_size{0}, bf16_config); },
               "kvtrim::layout::flat::view::bytes", "pool.slots", "at least one token slot", "0");
}

TEST(HostileSizes, HeadDimZeroOrTwoToTheForty) {
  expect_error([] { (void)paged_fp16::make_cache(kt::model_shape{4, 2, 0}, batch, kt::layout::paged::pool_size{4, 8}, fp16_config); },
               "kvtrim::layout::paged::view::bytes", "shape.head_dim", "a head dimension in [1, 1024]", "0");
  expect_error(
      [] { (void)flat_bf16::make_cache(kt::model_shape{4, 2, std::int64_t{1} << 40}, batch, kt::layout::flat::pool_size{64}, bf16_config); },
      "kvtrim::layout::flat::view::bytes", "shape.head_dim", "a head dimension in [1, 1024]",
      std::to_string(std::int64_t{1} << 40));
  expect_error([] { (void)paged_fp16::plan_capacity(kt::model_shape{4, 2, std::int64_t{1} << 40}, batch, 40, {}); },
               "kvtrim::scheme::plan_capacity", "shape.head_dim", "a head dimension in [1, 1024]",
               std::to_string(std::int64_t{1} << 40));
}

TEST(HostileSizes, NegativeBatchAndKeptCapacityOverflow) {
  expect_error([] { (void)paged_fp16::make_cache(shape, -1, kt::layout::paged::pool_size{4, 8}, fp16_config); },
               "kvtrim::layout::paged::view::bytes", "batch", "at least one sequence", "-1");
  expect_error([] { (void)paged_fp16::kept_tokens_capacity(shape, std::int64_t{1} << 62, 40, {}); },
               "kvtrim::scheme::kept_tokens_capacity", "batch", "sizes whose product fits in 64 bits",
               kt::detail::cat(std::int64_t{1} << 62, " × 2"));
}

TEST(HostileSizes, NegativeStridesInPrefillKeys) {
  paged_setup s;
  kt::kv_view<const float> keys = rows(s.keys, 0, tokens);
  keys.data += (tokens - 1) * keys.strides[2];
  keys.strides[2] = -keys.strides[2];
  expect_refused(s.cache, [&] { paged_fp16::compress(keys, rows(s.values, 0, tokens), s.window.cview(), s.cache.view(), s.cfg, s.ws()); },
                 compress_fn, "keys", "non-negative strides", "strides [1536, 768, -16, 1]");
}

// ---- engine-built views ------------------------------------------------------------

TEST(HostileViews, PagedNullMetadataPointers) {
  paged_setup s;
  for (int which = 0; which < 3; ++which) {
    paged_fp16::cache_view view = s.cache.view();
    if (which == 0) view.indptr = nullptr;
    if (which == 1) view.free_count = nullptr;
    if (which == 2) view.positions.slot_position = nullptr;
    expect_refused(s.cache, [&] { s.append(view); }, append_fn, "cache",
                   "non-null page tables, free list, compensation and position tables", "a null metadata pointer");
  }
}

TEST(HostileViews, PagedPageIdNegativeOrPastThePool) {
  paged_setup s;
  const auto& view = s.cache.view();
  const std::int32_t page = view.indices[0];
  view.indices[0] = -1;
  expect_refused(s.cache, [&] { s.attend(s.cache.view()); }, attend_fn, "cache.indices", "page ids in [0, 40)",
                 "-1 at indices[0]");
  view.indices[0] = 40;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.indices", "page ids in [0, 40)",
                 "40 at indices[0]");
  view.indices[0] = page;
  const std::int32_t free_page = view.free_pages[0];
  view.free_pages[0] = -7;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.free_pages", "page ids in [0, 40)",
                 "-7 at free_pages[0]");
  view.free_pages[0] = free_page;
  EXPECT_NO_THROW(s.attend(s.cache.view()));
}

TEST(HostileViews, PagedIndptrDecreasingOrPastThePool) {
  paged_setup s;
  const auto& view = s.cache.view();
  const std::int32_t first = view.indptr[0];
  view.indptr[0] = 1;
  expect_refused(s.cache, [&] { s.attend(s.cache.view()); }, attend_fn, "cache.indptr", "indptr[0] = 0", "1");
  view.indptr[0] = first;
  const std::int32_t last = view.indptr[4];
  view.indptr[4] = 41;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.indptr",
                 "non-decreasing entries in [0, pages = 40]", kt::detail::cat("indptr[3] = ", view.indptr[3], ", indptr[4] = 41"));
  view.indptr[4] = last;
  const std::int32_t second = view.indptr[2];
  view.indptr[2] = view.indptr[1] - 1;
  expect_refused(s.cache, [&] { s.compress(); }, compress_fn, "cache.indptr", "non-decreasing entries",
                 kt::detail::cat("indptr[1] = ", view.indptr[1], ", indptr[2] = ", view.indptr[1] - 1));
  view.indptr[2] = second;
  EXPECT_NO_THROW(s.attend(s.cache.view()));
}

TEST(HostileViews, PagedLastPageLengthAndFreeCount) {
  paged_setup s;
  const auto& view = s.cache.view();
  const std::int32_t last = view.last_page_len[1];
  view.last_page_len[1] = 0;  // head 1 holds pages
  expect_refused(s.cache, [&] { s.attend(s.cache.view()); }, attend_fn, "cache.last_page_len",
                 "a length in [1, page_size = 8]", "0 for head 1");
  view.last_page_len[1] = last;
  const std::int32_t free = *view.free_count;
  *view.free_count = free + 1;  // names one page more than the pool has
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.free_count",
                 kt::detail::cat("a count in [0, pages − pages in tables = ", free, "]"), std::to_string(free + 1));
  *view.free_count = -1;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.free_count", "a count in [0, ", "-1");
  *view.free_count = free;
  // An empty head whose last page length says 3.
  auto fresh = paged_fp16::make_cache(shape, batch, kt::layout::paged::pool_size{8, 8}, fp16_config);
  fresh.view().last_page_len[2] = 3;
  expect_refused(fresh, [&] { (void)kt::head_positions(fresh.view(), 0, 0); }, "kvtrim::head_positions",
                 "cache.last_page_len", "0 for a head without pages", "3 for head 2");
}

TEST(HostileViews, PagedPoolLargerThanItsStorage) {
  paged_setup s;
  paged_fp16::cache_view view = s.cache.view();
  view.pages = 41;
  expect_refused(s.cache, [&] { s.append(view); }, append_fn, "cache.storage",
                 "a codec storage of at least pages · page_size = 328 slots", "320 slots");
  view = s.cache.view();
  view.page_size = 16;  // the same storage seen as pages of 16
  expect_refused(s.cache, [&] { s.attend(view); }, attend_fn, "cache.storage",
                 "a codec storage of at least pages · page_size = 640 slots", "320 slots");
}

TEST(HostileViews, PagedCompensationIndexOutOfRange) {
  paged_setup s;
  const auto& view = s.cache.view();
  const std::int64_t length = view.head_length(0, 1);
  view.compensation.index[1] = static_cast<std::int32_t>(length);
  expect_refused(s.cache, [&] { s.attend(s.cache.view()); }, attend_fn, "cache.compensation.index",
                 kt::detail::cat("−1 or a token the head holds (< ", length, ")"), kt::detail::cat(length, " for head 1"));
  view.compensation.index[1] = -2;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.compensation.index",
                 "−1 or a token the head holds", "-2 for head 1");
  view.compensation.index[1] = -1;
}

// A page named twice (by two page tables, or by a table and the free list):
// every id is in range and the counts add up, but head 1 would write into
// head 0's page. The writers' validate marks pages in place and refuses it.
TEST(HostileViews, PagedTwoHeadsSharingAPage) {
  paged_setup s;
  const auto& view = s.cache.view();
  const std::int32_t page = view.indices[view.indptr[1]];
  view.indices[view.indptr[1]] = view.indices[0];
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.indices",
                 "each page in at most one page table or the free list",
                 kt::detail::cat("page ", view.indices[0], " named twice"));
  view.indices[view.indptr[1]] = page;
}

TEST(HostileViews, FlatOffsetsAndLengths) {
  flat_setup s;
  const auto& view = s.cache.view();
  const std::int64_t end = view.offsets[4];
  view.offsets[4] = view.capacity - 1;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.offsets",
                 kt::detail::cat("offsets[heads] = capacity = ", view.capacity), std::to_string(view.capacity - 1));
  view.offsets[4] = end;
  const std::int64_t first = view.offsets[0];
  view.offsets[0] = 1;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.offsets", "offsets[0] = 0", "1");
  view.offsets[0] = first;
  const std::int64_t length = view.lengths[3];
  view.lengths[3] = -1;
  expect_refused(s.cache, [&] { s.append(s.cache.view()); }, append_fn, "cache.lengths", "a length in [0, region = ",
                 "-1 for head 3");
  view.lengths[3] = length;
  flat_bf16::cache_view copy = s.cache.view();
  copy.lengths = nullptr;
  expect_refused(s.cache, [&] { s.append(copy); }, append_fn, "cache",
                 "non-null offsets, lengths, compensation and position tables", "a null metadata pointer");
  copy = s.cache.view();
  copy.capacity += 1;
  expect_refused(s.cache, [&] { s.append(copy); }, append_fn, "cache.storage",
                 kt::detail::cat("a codec storage of at least capacity = ", view.capacity + 1, " slots"),
                 kt::detail::cat(view.capacity, " slots"));
}

TEST(HostileViews, FlatOffsetsOffTheCodecsSlotRuns) {
  // int8 keeps KIVI key groups of 32 slots: a region must start at a multiple of 32.
  using scheme = kt::scheme<kt::layout::flat, kt::score::h2o, kt::budget::per_head, kt::codec::int8, kt::backend::cpu>;
  auto cache = scheme::make_cache(shape, batch, kt::layout::flat::pool_size{256}, kt::codec::int8::config{});
  const auto& view = cache.view();
  ASSERT_EQ(view.offsets[1] % 32, 0);
  view.offsets[1] += 1;
  expect_refused(cache, [&] { (void)kt::head_positions(cache.view(), 0, 0); }, "kvtrim::head_positions",
                 "cache.offsets", "at multiples of 32", kt::detail::cat("offsets[1] = ", view.offsets[1]));
  view.offsets[1] -= 1;
}

TEST(HostileViews, ContiguousLengthAndMappings) {
  auto cache = contiguous_fp32::make_cache(shape, batch, 24, fp32_config);
  contiguous_fp32::cache_view view = cache.view();
  std::int64_t negative = -1;
  view.length = &negative;
  expect_refused(cache, [&] { (void)kt::head_positions(view, 0, 0); }, "kvtrim::head_positions", "cache.length",
                 "a length in [0, capacity = 24]", "-1");
  view = cache.view();
  view.map.batch_stride = 24;  // sequence 1's head 0 is sequence 0's head 1
  expect_refused(cache, [&] { (void)kt::head_positions(view, 0, 0); }, "kvtrim::head_positions", "cache.map",
                 "strides under which no two (sequence, head, token) share a slot", "{24, 24, 1}");
  view = cache.view();
  view.capacity = 25;  // one slot more per head than the mapping's strides leave room for
  expect_refused(cache, [&] { (void)kt::head_positions(view, 0, 0); }, "kvtrim::head_positions", "cache.map",
                 "strides under which no two (sequence, head, token) share a slot", "{48, 24, 1}");
  view = cache.view();
  view.capacity = 0;
  expect_refused(cache, [&] { (void)kt::head_positions(view, 0, 0); }, "kvtrim::head_positions", "cache.capacity",
                 "between 1 and 2^31 − 1 slots per head", "0");
}

// ---- configs of every scorer, budget and codec -----------------------------------------

TEST(HostileConfigs, SnapkvWindowAndKernel) {
  paged_setup s;
  for (const std::int64_t window : {std::int64_t{0}, std::int64_t{-3}}) {
    auto cfg = s.cfg;
    cfg.score.window = window;
    expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, compress_fn, "config.score.window",
                   "an observation window of at least 1 query", std::to_string(window));
  }
  auto cfg = s.cfg;
  cfg.score.kernel = 4;
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, compress_fn, "config.score.kernel",
                 "an odd pooling kernel ≥ 1", "4");
  cfg = s.cfg;
  cfg.score.window = tokens;
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, "kvtrim::score::snapkv", "config.score.window",
                 "a window shorter than the prefill (40 tokens)", "40");
  cfg = s.cfg;
  cfg.score.window = 9;  // 8 observed queries handed over
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, "kvtrim::score::snapkv", "window_queries",
                 "at least config.score.window = 9 observed queries", "8 queries");
}

// Given softmax normalisers (issue 10, score/attention_mass.hpp): extents of another
// call and negative strides are refused before anything is written.
TEST(HostileConfigs, GivenNormalisersOfAnotherCall) {
  paged_setup s;
  auto lse = kts::random_tensor<float, 3>({batch, shape.q_heads, 8}, 10);  // the 8 window queries' rows
  using lse_view = kt::tensor_view<const float, 3>;
  auto cfg = s.cfg;
  cfg.score = cfg.score.with_lse(lse_view{lse.view.data, {batch, shape.q_heads, 7}, lse.view.strides});
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, "kvtrim::score::snapkv", "config.score.lse",
                 "normalisers of extents [2, 4, 8] (batch, q heads, observed queries of window_queries)", "[2, 4, 7]");
  cfg.score = cfg.score.with_lse(lse_view{lse.view.data, {batch, shape.kv_heads, 8}, lse.view.strides});
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, "kvtrim::score::snapkv", "config.score.lse",
                 "normalisers of extents [2, 4, 8]", "[2, 2, 8]");
  cfg.score = cfg.score.with_lse(lse_view{lse.view.data + 7, {batch, shape.q_heads, 8}, {32, 8, -1}});
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, compress_fn, "config.score.lse",
                 "non-negative strides", "stride -1 on axis 2");
  cfg.score = cfg.score.with_lse(lse.cview());
  EXPECT_NO_THROW(s.compress(s.cache.view(), cfg));

  flat_setup f;
  auto h2o_lse = kts::random_tensor<float, 3>({batch, shape.q_heads, tokens}, 11);
  auto h2o_cfg = f.cfg;
  h2o_cfg.score = h2o_cfg.score.with_lse(h2o_lse.cview());
  h2o_cfg.score.lse_extents = {batch, shape.q_heads, tokens - 8};  // SnapKV's window, not every prefill query
  expect_refused(f.cache, [&] { f.compress(h2o_cfg); }, "kvtrim::score::h2o", "config.score.lse",
                 "normalisers of extents [2, 4, 40]", "[2, 4, 32]");
}

TEST(HostileConfigs, AdaptiveAlphaAndKeep) {
  paged_setup s;
  for (const double alpha : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    auto cfg = s.cfg;
    cfg.budget.alpha = alpha;
    expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, compress_fn, "config.budget.alpha",
                   "a safeguard fraction in [0, 1]", std::to_string(alpha));
  }
  auto cfg = s.cfg;
  cfg.budget.keep = kt::keep_ratio{1.01};
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, compress_fn, "config.budget.keep",
                 "a keep ratio in (0, 1]", std::to_string(1.01));
  cfg = s.cfg;
  cfg.budget.keep = kt::keep_tokens{5};  // below SnapKV's 8 protected window tokens
  expect_refused(s.cache, [&] { s.compress(s.cache.view(), cfg); }, "kvtrim::budget::adaptive", "config.budget.keep",
                 "a per-head budget of at least the 8 tokens the scorer protects", "5 tokens");
}

TEST(HostileConfigs, PyramidLayerBetaWindow) {
  auto cache = contiguous_fp32::make_cache(shape, batch, 40, fp32_config);
  const auto keys = kts::random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, 8);
  std::vector<std::byte> scratch(1 << 16);
  const auto run = [&](const contiguous_fp32::config& cfg) {
    contiguous_fp32::compress(keys.cview(), keys.cview(), cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});
  };
  contiguous_fp32::config cfg;
  cfg.budget = {.keep = kt::keep_tokens{12}, .window = 2, .beta = 20, .layer = 4, .layers = 4};
  expect_refused(cache, [&] { run(cfg); }, compress_fn, "config.budget.layer", "a layer index in [0, 4)", "4");
  cfg.budget.layer = 1;
  cfg.budget.beta = 0;
  expect_refused(cache, [&] { run(cfg); }, compress_fn, "config.budget.beta", "β in [1, 1024]", "0");
  cfg.budget.beta = 20;
  cfg.budget.window = 13;
  expect_refused(cache, [&] { run(cfg); }, "kvtrim::budget::pyramid", "config.budget.window",
                 "a window no longer than the per-head budget (12 of 40 tokens)", "13");
  cfg.budget.window = -1;
  expect_refused(cache, [&] { run(cfg); }, compress_fn, "config.budget.window", "a non-negative window", "-1");
  cfg.budget.window = 2;
  cfg.score.windows = {3, 3, 3};
  expect_refused(cache, [&] { run(cfg); }, "kvtrim::score::static_window", "config.score.windows",
                 "one window per kv head (2)", "3 windows");
  cfg.score.windows = {3, -3};
  expect_refused(cache, [&] { run(cfg); }, compress_fn, "config.score.windows[1]", "a non-negative window length", "-3");
}

TEST(HostileConfigs, PerHeadLengthsAndH2oWindow) {
  flat_setup s;
  auto cfg = s.cfg;
  cfg.budget.lengths = {9, 14, 3};
  expect_refused(s.cache, [&] { s.compress(cfg); }, compress_fn, "config.budget.lengths",
                 "a non-empty multiple of kv_heads = 2 lengths", "3 lengths");
  cfg.budget.lengths = {9, 0};
  expect_refused(s.cache, [&] { s.compress(cfg); }, compress_fn,
                 "config.budget.lengths[1] (layer 0, kv head 1)", "a length of at least 1 token", "0");
  cfg.budget = {.lengths = {9, 14, 2}, .kv_heads = 3, .layer = 0};  // a config for a model of 3 kv heads
  expect_refused(s.cache, [&] { s.compress(cfg); }, "kvtrim::budget::per_head", "config.budget.kv_heads", "2", "3");
  cfg = s.cfg;
  cfg.budget.layer = 1;
  expect_refused(s.cache, [&] { s.compress(cfg); }, compress_fn, "config.budget.layer",
                 "a layer index in [0, 1)", "1");
  cfg = s.cfg;
  cfg.score.recent = kt::keep_ratio{0.0};
  expect_refused(s.cache, [&] { s.compress(cfg); }, compress_fn, "config.score.recent", "a keep ratio in (0, 1]",
                 std::to_string(0.0));
  auto few = kts::random_tensor<float, 4>({batch, shape.q_heads, tokens - 1, shape.head_dim}, 9);
  expect_refused(s.cache,
                 [&] {
                   flat_bf16::compress(rows(s.keys, 0, tokens), rows(s.values, 0, tokens), few.cview(), s.cache.view(),
                                       s.cfg, kt::workspace{s.scratch.data(), s.scratch.size()});
                 },
                 "kvtrim::score::h2o", "window_queries", "all 40 prefill queries", "39 queries");
}

TEST(HostileConfigs, RetrievalHeadFlagsAndWindows) {
  razor::config cfg;
  cfg.score.retrieval = {true, false, true};
  expect_error([&] { (void)razor::plan_capacity(shape, batch, tokens, cfg); }, "kvtrim::score::retrieval_head",
               "config.score.retrieval", "one retrieval flag per kv head (2)", "3 flags");
  cfg.score.retrieval = {true, false};
  cfg.score.min_recent = 0;
  expect_error([&] { (void)razor::plan_capacity(shape, batch, tokens, cfg); }, "kvtrim::scheme::plan_capacity",
               "config.score.min_recent", "a recent window of at least one token", "0");
  cfg.score.min_recent = 8;
  cfg.score.recent_fraction = 1.5;
  expect_error([&] { (void)razor::plan_capacity(shape, batch, tokens, cfg); }, "kvtrim::scheme::plan_capacity",
               "config.score.recent_fraction", "a fraction in [0, 1]", std::to_string(1.5));
  cfg.score.recent_fraction = 0.2;
  cfg.score.sinks = -2;
  expect_error([&] { (void)razor::plan_capacity(shape, batch, tokens, cfg); }, "kvtrim::scheme::plan_capacity",
               "config.score.sinks", "a non-negative sink count", "-2");
}

TEST(HostileConfigs, CodecConfigs) {
  const std::string_view bytes_fn = "kvtrim::layout::contiguous::view::bytes";
  expect_error([] { (void)contiguous_with<kt::codec::int8>::make_cache(shape, 1, 64, kt::codec::int8::config{.key_group = 0}); },
               bytes_fn, "config.codec.key_group", "a group of 1 to 65536 tokens (KIVI: 32)", "0");
  expect_error(
      [] { (void)contiguous_with<kt::codec::int4>::make_cache(shape, 1, 64, kt::codec::int4::config{.key_group = 70000}); },
      bytes_fn, "config.codec.key_group", "a group of 1 to 65536 tokens", "70000");
  kt::codec::low_rank::config low_rank;
  low_rank.rank = shape.head_dim + 1;
  expect_error([&] { (void)contiguous_with<kt::codec::low_rank>::make_cache(shape, 1, 64, low_rank); },
               "kvtrim::codec::low_rank::bind", "config.codec.rank", "a rank in [1, head_dim = 16]", "17");
  low_rank = {};
  low_rank.energy = 0.0;
  expect_error([&] { (void)contiguous_with<kt::codec::low_rank>::make_cache(shape, 1, 64, low_rank); }, bytes_fn,
               "config.codec.energy", "an energy fraction in (0, 1]", "0");
  low_rank = {};
  low_rank.max_rank = 40;
  expect_error([&] { (void)contiguous_with<kt::codec::low_rank>::make_cache(shape, 1, 64, low_rank); },
               "kvtrim::codec::low_rank::bind", "config.codec.max_rank", "a rank in [1, head_dim = 16]", "40");
  expect_error([] { (void)contiguous_with<kt::codec::fp8>::make_cache(shape, 1, 64, kt::codec::fp8::config{.key_scale = 0.0f}); },
               bytes_fn, "config.codec.key_scale", "a finite scale above 0", "0");
  expect_error(
      [] {
        (void)contiguous_with<kt::codec::fp8>::make_cache(
            shape, 1, 64, kt::codec::fp8::config{.value_scale = std::numeric_limits<float>::infinity()});
      },
      bytes_fn, "config.codec.value_scale", "a finite scale above 0", "inf");
  expect_error(
      [] {
        (void)contiguous_with<kt::codec::layered<kt::codec::int8>>::make_cache(
            shape, 1, 64, kt::codec::layered<kt::codec::int8>::config{.recent = -1});
      },
      bytes_fn, "config.codec.recent", "0 to 2^20 newest tokens kept fp16", "-1");
}

// ---- NaN and Inf in fp16 / bf16 caches ------------------------------------------------------

TEST(HostileValues, NanAndInfIntoAnFp16Cache) {
  paged_setup s;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const auto bad_keys = poisoned(s.keys, 1, 0, 5, 2, nan);
  expect_refused(s.cache,
                 [&] { paged_fp16::compress(rows(bad_keys, 0, tokens), rows(s.values, 0, tokens), s.window.cview(), s.cache.view(), s.cfg, s.ws()); },
                 compress_fn, "keys", "finite values", "nan at sequence 1, kv head 0, token 5, channel 2");
  const auto bad_values = poisoned(s.values, 0, 1, tokens + 2, 0, -inf);
  expect_refused(s.cache, [&] { paged_fp16::append(s.cache.view(), rows(s.keys, tokens + 1, 3), rows(bad_values, tokens + 1, 3)); },
                 append_fn, "new_values", "finite values", "-inf at sequence 0, kv head 1, token 1, channel 0");
  auto bad_window = s.window;
  bad_window.view.data = bad_window.storage.data();
  bad_window(0, 3, 7, 15) = inf;
  expect_refused(s.cache,
                 [&] { paged_fp16::compress(rows(s.keys, 0, tokens), rows(s.values, 0, tokens), bad_window.cview(), s.cache.view(), s.cfg, s.ws()); },
                 compress_fn, "window_queries", "finite values", "inf at sequence 0, query head 3, token 7, channel 15");
}

TEST(HostileValues, NanAndInfIntoABf16Cache) {
  flat_setup s;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const auto bad_values = poisoned(s.values, 1, 1, tokens, 9, nan);
  const auto head_rows = [&](const kts::host_tensor<float, 4>& x, std::int64_t b, std::int64_t h) {
    const auto& v = x.view;
    return kt::tensor_view<const float, 2>{v.data + b * v.strides[0] + h * v.strides[1] + tokens * v.strides[2],
                                           {2, shape.head_dim}, {v.strides[2], v.strides[3]}};
  };
  expect_refused(s.cache, [&] { flat_bf16::append_head(s.cache.view(), 1, 1, head_rows(s.keys, 1, 1), head_rows(bad_values, 1, 1)); },
                 append_head_fn, "new_values", "finite values", "nan at sequence 0, kv head 0, token 0, channel 9");
  const auto bad_keys = poisoned(s.keys, 0, 0, 39, 1, inf);
  auto cfg = s.cfg;
  expect_refused(s.cache,
                 [&] {
                   flat_bf16::compress(rows(bad_keys, 0, tokens), rows(s.values, 0, tokens), s.window.cview(), s.cache.view(),
                                       cfg, kt::workspace{s.scratch.data(), s.scratch.size()});
                 },
                 compress_fn, "keys", "finite values", "inf at sequence 0, kv head 0, token 39, channel 1");
  // Inputs already in bf16: a bf16 NaN is refused the same way.
  auto keys16 = kts::make_tensor<kt::bfloat16, 4>({batch, shape.kv_heads, 1, shape.head_dim});
  auto values16 = kts::make_tensor<kt::bfloat16, 4>({batch, shape.kv_heads, 1, shape.head_dim});
  kts::for_each_index(keys16.view.extents, [&](auto... i) { keys16.view(i...) = values16.view(i...) = kt::bfloat16(0.5f); });
  values16(1, 0, 0, 4) = kt::bfloat16(nan);
  expect_refused(s.cache, [&] { flat_bf16::append(s.cache.view(), keys16.cview(), values16.cview()); }, append_fn,
                 "new_values", "finite values", "nan at sequence 1, kv head 0, token 0, channel 4");
}

// 1e5 is finite in fp32 but rounds to +Inf in fp16 (largest finite 65504): the
// NaN/Inf rule (docs/composition.md §4) refuses it before any write, so later
// attention stays finite.
TEST(HostileValues, FiniteInputsBeyondTheFp16Range) {
  paged_setup s;
  const auto large = poisoned(s.values, 0, 0, tokens + 1, 3, 1e5f);
  expect_refused(s.cache, [&] { paged_fp16::append(s.cache.view(), rows(s.keys, tokens + 1, 1), rows(large, tokens + 1, 1)); },
                 append_fn, "new_values", "finite values that stay finite in the cache's fp16 storage",
                 "100000 at sequence 0, kv head 0, token 0, channel 3");
  s.attend(s.cache.view());
  for (std::int64_t j = 0; j < shape.group_size(); ++j) EXPECT_TRUE(std::isfinite(s.out(0, j, 3))) << "query head " << j;
}

// ---- positions, outputs, workspaces, heads ----------------------------------------------------

TEST(HostileCalls, StartPositionOutOfRange) {
  paged_setup s;
  kt::compress_options<kt::host_space> options;
  options.start_position = -1;
  expect_refused(s.cache, [&] { s.compress_with(options); }, compress_fn, "options.start_position",
                 "a position in [0, 2^31 − 40]", "-1");
  options.start_position = (std::int64_t{1} << 31) - tokens + 1;
  expect_refused(s.cache, [&] { s.compress_with(options); }, compress_fn, "options.start_position",
                 "a position in [0, 2^31 − 40]", std::to_string(options.start_position));
  options.start_position = (std::int64_t{1} << 31) - tokens;  // the last token at 2^31 − 1: accepted
  EXPECT_NO_THROW(s.compress_with(options));
  // ... and then no room for one more position.
  expect_refused(s.cache, [&] { paged_fp16::append(s.cache.view(), rows(s.keys, tokens, 1), rows(s.values, tokens, 1)); },
                 append_fn, "new_keys", "1 tokens whose positions fit in 32 bits after head 0's position 2147483648",
                 "positions up to 2147483648");
}

TEST(HostileCalls, KeptOutputTooSmallOrHalfGiven) {
  paged_setup s;
  const std::int64_t needed = paged_fp16::kept_tokens_capacity(shape, batch, tokens, s.cfg);
  std::vector<std::int64_t> offsets(batch * shape.kv_heads + 1);
  std::vector<std::int32_t> kept(static_cast<std::size_t>(needed));
  kt::compress_options<kt::host_space> options;
  options.kept_offsets = offsets.data();
  options.kept_tokens = kept.data();
  options.kept_tokens_capacity = needed - 1;
  expect_refused(s.cache, [&] { s.compress_with(options); }, compress_fn, "options.kept_tokens",
                 kt::detail::cat("room for ", needed, " tokens"), kt::detail::cat("kept_offsets, kept_tokens with capacity ", needed - 1));
  options.kept_tokens_capacity = needed;
  options.kept_offsets = nullptr;
  expect_refused(s.cache, [&] { s.compress_with(options); }, compress_fn, "options.kept_tokens",
                 "both kept_offsets and kept_tokens", kt::detail::cat("no kept_offsets, kept_tokens with capacity ", needed));
}

TEST(HostileCalls, WorkspaceShortOrMisaligned) {
  paged_setup s;
  const std::size_t needed = s.scratch.size();
  std::vector<std::byte> buffer(needed + 64);
  expect_refused(s.cache,
                 [&] {
                   paged_fp16::compress(rows(s.keys, 0, tokens), rows(s.values, 0, tokens), s.window.cview(), s.cache.view(),
                                        s.cfg, kt::workspace{buffer.data(), needed - 1});
                 },
                 compress_fn, "workspace", kt::detail::cat("at least ", needed, " bytes"), kt::detail::cat(needed - 1, " bytes"));
  expect_refused(s.cache,
                 [&] {
                   paged_fp16::compress(rows(s.keys, 0, tokens), rows(s.values, 0, tokens), s.window.cview(), s.cache.view(),
                                        s.cfg, kt::workspace{buffer.data() + 1, needed});
                 },
                 compress_fn, "workspace", kt::detail::cat("a pointer aligned to ", alignof(std::max_align_t), " bytes"),
                 kt::detail::cat(static_cast<const void*>(buffer.data() + 1), " (misaligned)"));
  const std::size_t attend_needed = paged_fp16::attend_workspace(s.cache.view());
  if (attend_needed > 0) {
    expect_refused(s.cache,
                   [&] {
                     paged_fp16::attend(s.queries.cview(), s.cache.view(), s.out.view,
                                        kt::workspace{buffer.data(), attend_needed - 1});
                   },
                   attend_fn, "workspace", kt::detail::cat("at least ", attend_needed, " bytes"),
                   kt::detail::cat(attend_needed - 1, " bytes"));
  }
}

TEST(HostileCalls, AppendHeadOutOfRange) {
  flat_setup s;
  const auto& v = s.keys.view;
  const kt::tensor_view<const float, 2> two{v.data + tokens * v.strides[2], {2, shape.head_dim}, {v.strides[2], 1}};
  expect_refused(s.cache, [&] { flat_bf16::append_head(s.cache.view(), batch, 0, two, two); }, append_head_fn, "b",
                 "a sequence in [0, 2)", "2");
  expect_refused(s.cache, [&] { flat_bf16::append_head(s.cache.view(), 0, -1, two, two); }, append_head_fn, "h",
                 "a kv head in [0, 2)", "-1");
  const kt::tensor_view<const float, 2> none{v.data, {0, shape.head_dim}, {v.strides[2], 1}};
  expect_refused(s.cache, [&] { flat_bf16::append_head(s.cache.view(), 0, 0, none, none); }, append_head_fn, "new_keys",
                 "at least one token", "0 tokens");
  const kt::tensor_view<const float, 2> narrow{v.data, {2, 8}, {v.strides[2], 1}};
  expect_refused(s.cache, [&] { flat_bf16::append_head(s.cache.view(), 0, 0, narrow, narrow); }, append_head_fn,
                 "new_keys", "shape [*, 16]", "[2, 8]");
  expect_refused(s.cache, [&] { (void)kt::head_positions(s.cache.view(), 0, 2); }, "kvtrim::head_positions", "h",
                 "a kv head in [0, 2)", "2");
  expect_refused(s.cache, [&] { (void)kt::next_position(s.cache.view(), -1, 0); }, "kvtrim::next_position", "b, h",
                 "a head in [0, 2) × [0, 2)", "-1, 0");
}

TEST(HostileCalls, PoolExhaustedByOneHead) {
  // append_head into a flat buffer with no free slot left: refused before any repack.
  flat_setup s;
  const auto& v = s.keys.view;
  std::int64_t free = s.cache.view().capacity - s.cache.view().tokens_held();
  const kt::tensor_view<const float, 2> one{v.data, {1, shape.head_dim}, {v.strides[2], 1}};
  for (; free > 0; --free) flat_bf16::append_head(s.cache.view(), 0, 1, one, one);
  const kt::tensor_view<const float, 2> more{v.data, {3, shape.head_dim}, {v.strides[2], 1}};
  const std::string message = [&] {
    std::vector<unsigned char> before(s.cache.bytes());
    std::memcpy(before.data(), s.cache.data(), s.cache.bytes());
    const std::string m = message_of([&] { flat_bf16::append_head(s.cache.view(), 1, 0, more, more); });
    EXPECT_EQ(std::memcmp(before.data(), s.cache.data(), s.cache.bytes()), 0);
    return m;
  }();
  EXPECT_NE(message.find("argument 'cache'"), std::string::npos) << message;
}

}  // namespace
