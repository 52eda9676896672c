// Bad input never reaches undefined behaviour: each case throws kvtrim::error
// whose message reads "<function>: argument '<name>': expected <what>, got <what came>".
// Each test asserts the function, the argument, and what was expected and what came.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <string_view>

#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace test_only {
/// A scorer that reads the observation-window queries (as SnapKV does) and
/// scores every token alike: enough to exercise compress's window checks.
struct window_reader {
  static constexpr std::string_view name = "test::window_reader";
  static constexpr bool needs_queries = true;
  static constexpr bool ragged_heads = false;
  struct config {
    void validate(std::string_view) const {}
  };
};
}  // namespace test_only

template <>
struct kvtrim::implementation<test_only::window_reader, kvtrim::backend::cpu> {
  template <class KeyT, class QueryT>
  static void score(const test_only::window_reader::config&, const model_shape&, const kv_view<KeyT>&,
                    const kv_view<KeyT>&, const window_view<QueryT>&, const score_view<>& scores, backend::host_stream) {
    for (std::int64_t b = 0; b < scores.extent(0); ++b)
      for (std::int64_t h = 0; h < scores.extent(1); ++h)
        for (std::int64_t i = 0; i < scores.extent(2); ++i) scores(b, h, i) = 0.0f;
  }
};

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
using scheme = kts::streaming_scheme<kt::codec::fp32>;
using window_scheme =
    kt::scheme<kt::layout::contiguous, test_only::window_reader, kt::budget::uniform, kt::codec::fp32, kt::backend::cpu>;

/// Runs `call`, and checks it throws kvtrim::error with the four parts of the message.
void expect_error(const std::function<void()>& call, std::string_view function, std::string_view argument,
                  std::string_view expected, std::string_view got) {
  try {
    call();
  } catch (const kt::error& e) {
    const std::string message = e.what();
    const std::string head = kt::detail::cat(function, ": argument '", argument, "': expected ");
    EXPECT_EQ(message.rfind(head, 0), 0u) << "message: " << message << "\nshould start with: " << head;
    EXPECT_NE(message.find(expected), std::string::npos) << "message: " << message << "\nlacks: " << expected;
    EXPECT_NE(message.find(kt::detail::cat(", got ", got)), std::string::npos)
        << "message: " << message << "\nlacks: , got " << got;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-kvtrim exception: " << e.what();
    return;
  }
  ADD_FAILURE() << "no exception; expected one about argument '" << argument << "'";
}

constexpr std::string_view compress_fn = "kvtrim::scheme::compress";
constexpr std::string_view append_fn = "kvtrim::scheme::append";
constexpr std::string_view attend_fn = "kvtrim::scheme::attend";
constexpr std::string_view bytes_fn = "kvtrim::layout::contiguous::view::bytes";

/// A valid setting every test breaks in one place: 2 sequences, 8 q heads over
/// 2 kv heads of dimension 64, 40 prefill tokens, capacity 16, keep 12.
struct valid {
  kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::int64_t batch = 2, tokens = 40, capacity = 16;
  scheme::config cfg;
  kts::host_tensor<float, 4> keys = kts::random_tensor<float, 4>({2, 2, 40, 64}, 1);
  kts::host_tensor<float, 4> values = kts::random_tensor<float, 4>({2, 2, 40, 64}, 2);
  kts::host_tensor<float, 3> queries = kts::random_tensor<float, 3>({2, 8, 64}, 3);
  kts::host_tensor<float, 3> out = kts::make_tensor<float, 3>({2, 8, 64});
  scheme::cache cache = scheme::make_cache(shape, batch, capacity, kt::codec::fp32::config{});
  kts::scratch_buffer scratch{1 << 20};

  valid() { cfg.budget.keep = kt::keep_tokens{12}; }
  void compress() { scheme::compress(keys.view, values.view, cache.view(), cfg, scratch.get()); }
  void compress(const kt::tensor_view<float, 4>& k, const kt::tensor_view<float, 4>& v) {
    scheme::compress(k, v, cache.view(), cfg, scratch.get());
  }
  void attend() { scheme::attend(queries.view, cache.view(), out.view, kt::workspace{}); }
};

TEST(BadInput, ValidSettingThrowsNothing) {
  valid s;
  EXPECT_NO_THROW(s.compress());
  EXPECT_NO_THROW(s.attend());
}

// ---- shapes ------------------------------------------------------------------------

TEST(BadInput, KeysWithTheWrongKvHeadCount) {
  valid s;
  auto keys = kts::random_tensor<float, 4>({2, 3, 40, 64}, 4);
  expect_error([&] { s.compress(keys.view, keys.view); }, compress_fn, "keys", "shape [2, 2, *, 64]", "[2, 3, 40, 64]");
}

TEST(BadInput, ValuesWithOtherTokensThanKeys) {
  valid s;
  auto values = kts::random_tensor<float, 4>({2, 2, 39, 64}, 4);
  expect_error([&] { s.compress(s.keys.view, values.view); }, compress_fn, "values", "shape [2, 2, 40, 64]",
               "[2, 2, 39, 64]");
}

TEST(BadInput, KeysWithNoTokens) {
  valid s;
  auto keys = kts::make_tensor<float, 4>({2, 2, 0, 64});
  expect_error([&] { s.compress(keys.view, keys.view); }, compress_fn, "keys", "at least one token", "0 tokens");
}

TEST(BadInput, QueriesOfAnotherBatch) {
  valid s;
  s.compress();
  auto queries = kts::random_tensor<float, 3>({3, 8, 64}, 4);
  expect_error([&] { scheme::attend(queries.view, s.cache.view(), s.out.view, kt::workspace{}); }, attend_fn,
               "queries", "shape [2, 8, 64]", "[3, 8, 64]");
}

TEST(BadInput, OutputWithTheWrongHeadDim) {
  valid s;
  s.compress();
  auto out = kts::make_tensor<float, 3>({2, 8, 32});
  expect_error([&] { scheme::attend(s.queries.view, s.cache.view(), out.view, kt::workspace{}); }, attend_fn, "out",
               "shape [2, 8, 64]", "[2, 8, 32]");
}

TEST(BadInput, NewValuesWithOtherTokensThanNewKeys) {
  valid s;
  auto new_keys = kts::random_tensor<float, 4>({2, 2, 2, 64}, 4);
  auto new_values = kts::random_tensor<float, 4>({2, 2, 3, 64}, 5);
  expect_error([&] { scheme::append(s.cache.view(), new_keys.view, new_values.view); }, append_fn, "new_values",
               "shape [2, 2, 2, 64]", "[2, 2, 3, 64]");
}

// ---- the model shape -------------------------------------------------------------------

TEST(BadInput, QueryHeadsNotAMultipleOfKvHeads) {
  expect_error(
      [] { scheme::make_cache(kt::model_shape{.q_heads = 6, .kv_heads = 4, .head_dim = 64}, 1, 8, kt::codec::fp32::config{}); },
      bytes_fn, "shape.q_heads", "a multiple of kv_heads = 4", "6");
}

TEST(BadInput, ZeroHeadDim) {
  expect_error(
      [] { scheme::make_cache(kt::model_shape{.q_heads = 8, .kv_heads = 2, .head_dim = 0}, 1, 8, kt::codec::fp32::config{}); },
      bytes_fn, "shape.head_dim", "a head dimension in [1, 1024]", "0");
}

TEST(BadInput, HeadDimAboveTheLimit) {
  expect_error(
      [] { scheme::make_cache(kt::model_shape{.q_heads = 8, .kv_heads = 2, .head_dim = 2048}, 1, 8, kt::codec::fp32::config{}); },
      bytes_fn, "shape.head_dim", "a head dimension in [1, 1024]", "2048");
}

TEST(BadInput, ZeroKvHeads) {
  expect_error(
      [] { scheme::make_cache(kt::model_shape{.q_heads = 8, .kv_heads = 0, .head_dim = 64}, 1, 8, kt::codec::fp32::config{}); },
      bytes_fn, "shape.kv_heads", "at least one kv head", "0");
}

TEST(BadInput, HandEditedViewWithABrokenShape) {
  // An engine's own view is checked on every call too.
  valid s;
  s.compress();
  scheme::cache_view broken = s.cache.view();
  broken.shape.q_heads = 7;
  expect_error([&] { scheme::attend(s.queries.view, broken, s.out.view, kt::workspace{}); }, attend_fn,
               "shape.q_heads", "a multiple of kv_heads = 2", "7");
}

// ---- memory ------------------------------------------------------------------------------

TEST(BadInput, NullDataWithNonZeroSize) {
  valid s;
  kt::tensor_view<float, 4> keys = s.keys.view;
  keys.data = nullptr;
  expect_error([&] { s.compress(keys, s.values.view); }, compress_fn, "keys",
               "a non-null data pointer for a view of 10240 elements", "nullptr");
}

TEST(BadInput, NegativeStrides) {
  valid s;
  s.compress();
  kt::tensor_view<float, 3> queries = s.queries.view;
  queries.data += 7 * 64;  // the last head, walked backwards
  queries.strides[1] = -64;
  expect_error([&] { scheme::attend(queries, s.cache.view(), s.out.view, kt::workspace{}); }, attend_fn, "queries",
               "non-negative strides", "strides [512, -64, 1]");
}

TEST(BadInput, LastAxisNotContiguous) {
  valid s;
  auto wide = kts::random_tensor<float, 4>({2, 2, 40, 128}, 4);
  kt::tensor_view<float, 4> keys = wide.view;
  keys.extents[3] = 64;
  keys.strides[3] = 2;  // every other element
  expect_error([&] { s.compress(keys, keys); }, compress_fn, "keys", "a contiguous last axis (stride 1)", "stride 2");
}

TEST(BadInput, NegativeMappingStride) {
  valid s;
  scheme::cache_view broken = s.cache.view();
  broken.map.token_stride = -1;
  expect_error([&] { scheme::compress(s.keys.view, s.values.view, broken, s.cfg, s.scratch.get()); }, compress_fn,
               "cache.map", "non-negative slot strides", "{32, 16, -1}");
}

TEST(BadInput, CacheStorageForAnotherHeadDim) {
  valid s;
  scheme::cache_view broken = s.cache.view();
  broken.storage.head_dim = 128;
  expect_error([&] { scheme::append(broken, s.keys.view, s.values.view); }, append_fn, "cache.storage.head_dim",
               "the model's head_dim = 64", "128");
}

// ---- budgets and capacity ----------------------------------------------------------------

TEST(BadInput, BudgetLargerThanTheCacheCapacity) {
  valid s;
  s.cfg.budget.keep = kt::keep_tokens{20};
  expect_error([&] { s.compress(); }, compress_fn, "config.budget.keep",
               "at most the cache capacity = 16 tokens per head", "20 tokens (of 40)");
}

TEST(BadInput, KeepRatioOutOfRange) {
  valid s;
  for (const double ratio : {0.0, -0.5, 1.5}) {
    s.cfg.budget.keep = kt::keep_ratio{ratio};
    expect_error([&] { s.compress(); }, compress_fn, "config.budget.keep", "a keep ratio in (0, 1]",
                 std::to_string(ratio));
  }
  s.cfg.budget.keep = kt::keep_ratio{std::numeric_limits<double>::quiet_NaN()};
  expect_error([&] { s.compress(); }, compress_fn, "config.budget.keep", "a keep ratio in (0, 1]", "nan");
}

TEST(BadInput, KeepTokensZero) {
  valid s;
  s.cfg.budget.keep = kt::keep_tokens{0};
  expect_error([&] { s.compress(); }, compress_fn, "config.budget.keep", "a token count of at least 1", "0");
}

TEST(BadInput, NegativeSinks) {
  valid s;
  s.cfg.score.sinks = -1;
  expect_error([&] { s.compress(); }, compress_fn, "config.score.sinks", "a non-negative sink count", "-1");
}

TEST(BadInput, AppendPastCapacity) {
  valid s;
  s.compress();  // 12 of 16 slots
  auto step = kts::random_tensor<float, 4>({2, 2, 5, 64}, 4);
  expect_error([&] { scheme::append(s.cache.view(), step.view, step.view); }, append_fn, "new_keys",
               "at most 4 tokens (capacity 16, holding 12)", "5 tokens");
  EXPECT_EQ(*s.cache.view().length, 12);  // nothing was written
}

TEST(BadInput, CacheLengthBeyondCapacity) {
  valid s;
  scheme::cache_view broken = s.cache.view();
  std::int64_t too_long = 17;  // an engine-built view whose length counter says 17
  broken.length = &too_long;
  expect_error([&] { scheme::attend(s.queries.view, broken, s.out.view, kt::workspace{}); }, attend_fn,
               "cache.length", "a length in [0, capacity = 16]", "17");
}

TEST(BadInput, AttendOverAnEmptyCache) {
  valid s;
  expect_error([&] { s.attend(); }, attend_fn, "cache", "at least one token in every head",
               "an empty head (sequence 0, kv head 0)");
}

// ---- workspace -----------------------------------------------------------------------------

TEST(BadInput, TooSmallWorkspace) {
  valid s;
  const std::size_t needed = scheme::compress_workspace(s.shape, s.batch, s.tokens, s.cfg);
  expect_error([&] { scheme::compress(s.keys.view, s.values.view, s.cache.view(), s.cfg, kt::workspace{s.scratch.bytes.data(), 100}); },
               compress_fn, "workspace", kt::detail::cat("at least ", needed, " bytes"), "100 bytes");
}

TEST(BadInput, NullWorkspace) {
  valid s;
  expect_error([&] { scheme::compress(s.keys.view, s.values.view, s.cache.view(), s.cfg, kt::workspace{}); },
               compress_fn, "workspace", "(ask the matching *_workspace function)", "nullptr");
}

// ---- observation-window queries (scorers that read them) -----------------------------------------

TEST(BadInput, WindowQueriesOfTheWrongShape) {
  valid s;
  window_scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{12};
  auto window = kts::random_tensor<float, 4>({2, 4, 8, 64}, 4);  // 4 query heads, not 8
  expect_error([&] { window_scheme::compress(s.keys.view, s.values.view, window.view, s.cache.view(), cfg, s.scratch.get()); },
               compress_fn, "window_queries", "shape [2, 8, *, 64]", "[2, 4, 8, 64]");
}

TEST(BadInput, WindowLongerThanThePrefill) {
  valid s;
  window_scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{12};
  auto window = kts::random_tensor<float, 4>({2, 8, 41, 64}, 4);
  expect_error([&] { window_scheme::compress(s.keys.view, s.values.view, window.view, s.cache.view(), cfg, s.scratch.get()); },
               compress_fn, "window_queries", "between 1 and 40 (the prefill length) queries", "41 queries");
  auto fitting = kts::random_tensor<float, 4>({2, 8, 40, 64}, 5);
  EXPECT_NO_THROW(window_scheme::compress(s.keys.view, s.values.view, fitting.view, s.cache.view(), cfg, s.scratch.get()));
}

TEST(BadInput, MissingWindowQueries) {
  valid s;
  window_scheme::config cfg;
  expect_error(
      [&] {
        window_scheme::compress(s.keys.view, s.values.view, kt::tensor_view<const float, 4>{}, s.cache.view(), cfg,
                                s.scratch.get());
      },
      compress_fn, "window_queries", "shape [2, 8, *, 64]", "[0, 0, 0, 0]");
}

}  // namespace
