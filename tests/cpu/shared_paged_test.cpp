// layout::shared_paged: a kvtrim cache bound over an engine's own page tensor
// (FlashInfer / vLLM: [pages, 2, page_size, kv_heads, D] NHD, [pages, 2,
// kv_heads, page_size, D] HND), nothing copied.
//
// The checks read the engine's tensor with the engine's own indexing, written
// here from FlashInfer's definition (not through kvtrim's slot()): after a
// StreamingLLM compress and appends, page indices[indptr[b] + i / P] holds
// token i of sequence b at offset i mod P for every head, keys in half 0,
// values in half 1, bit for bit. Decode attention (one and several queries)
// over the bound cache must equal the double oracle over the kept tokens within
// tests/common/tolerance.hpp's bound. Plus: refusals (pool exhausted, a bad
// order) leave the cache as it was.
#include <gtest/gtest.h>

#include <kvtrim/backend/cpu/shared_paged.hpp>
#include <kvtrim/kvtrim.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/oracle.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "common/tolerance.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
using order = kt::layout::shared_paged::order;

template <class Codec>
using engine_scheme =
    kt::scheme<kt::layout::shared_paged, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

/// An engine's page tensor and kvtrim's metadata block (256-byte aligned), the view bound over both.
template <class Element>
struct engine_cache {
  using view_type = kt::layout::shared_paged::view<kt::codec::plain<Element>, kt::host_space>;
  kt::model_shape shape;
  std::int64_t batch;
  kt::layout::shared_paged::pool_size pool;
  std::vector<Element> tensor;  // [pages, 2, ...]
  std::vector<std::byte> metadata;
  view_type view;

  engine_cache(const kt::model_shape& shape_, std::int64_t batch_, kt::layout::shared_paged::pool_size pool_)
      : shape(shape_), batch(batch_), pool(pool_),
        tensor(static_cast<std::size_t>(2 * pool_.pages * pool_.page_size * shape_.kv_heads * shape_.head_dim)),
        metadata(view_type::metadata_bytes(shape_, batch_, pool_) + 256) {
    void* aligned = metadata.data() + (256 - reinterpret_cast<std::uintptr_t>(metadata.data()) % 256) % 256;
    view = view_type::bind_pages(tensor.data(), aligned, shape, batch, pool);
  }

  /// Element d of token i of (b, h), half 0 (keys) or 1 (values), by the engine's indexing.
  Element at(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t half, std::int64_t d) const {
    const std::int64_t page = view.indices[view.indptr[b] + i / pool.page_size], offset = i % pool.page_size;
    const std::int64_t H = shape.kv_heads, D = shape.head_dim, P = pool.page_size;
    const std::int64_t index = pool.order == order::nhd ? (((page * 2 + half) * P + offset) * H + h) * D + d
                                                        : (((page * 2 + half) * H + h) * P + offset) * D + d;
    return tensor[static_cast<std::size_t>(index)];
  }
};

struct shared_case {
  order layout_order;
  std::int64_t batch, kv_heads, group, head_dim, page_size, tokens, keep, appended, queries;
};

std::string case_name(const testing::TestParamInfo<shared_case>& info) {
  const shared_case& c = info.param;
  return kt::detail::cat(c.layout_order == order::nhd ? "NHD" : "HND", "_B", c.batch, "_Hkv", c.kv_heads, "_G",
                         c.group, "_D", c.head_dim, "_P", c.page_size, "_T", c.tokens, "_K", c.keep, "_A", c.appended,
                         "_n", c.queries);
}
void PrintTo(const shared_case& c, std::ostream* out) { *out << case_name({c, 0}); }

class SharedPagedLayout : public testing::TestWithParam<shared_case> {};

TEST_P(SharedPagedLayout, CompressAppendAndAttendOverTheEnginesTensor) {
  using scheme = engine_scheme<kt::codec::fp16>;
  const shared_case& c = GetParam();
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::int64_t sinks = 4, held = c.keep + c.appended;
  const std::int64_t pages = c.batch * kt::layout::shared_paged::pages_for(held, c.page_size) + 3;
  engine_cache<kt::half> engine(shape, c.batch, {pages, c.page_size, c.layout_order});

  auto keys = kts::random_tensor<kt::half, 4>({c.batch, c.kv_heads, c.tokens + c.appended, c.head_dim}, 201);
  auto values = kts::random_tensor<kt::half, 4>({c.batch, c.kv_heads, c.tokens + c.appended, c.head_dim}, 202);
  const auto prefix = [&](const auto& x, std::int64_t first, std::int64_t count) {
    auto view = x.cview();
    view.data += first * view.strides[2];
    view.extents[2] = count;
    return view;
  };
  scheme::config cfg;
  cfg.score.sinks = sinks;
  cfg.budget.keep = kt::keep_tokens{c.keep};
  kts::scratch_buffer scratch(scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
  scheme::compress(prefix(keys, 0, c.tokens), prefix(values, 0, c.tokens), engine.view, cfg, scratch.get());
  for (std::int64_t a = 0; a < c.appended; ++a)  // one decode step at a time, as an engine appends
    scheme::append(engine.view, prefix(keys, c.tokens + a, 1), prefix(values, c.tokens + a, 1));

  // What each sequence holds: StreamingLLM's kept tokens, then the appended ones.
  std::vector<std::int64_t> kept = kts::streaming_kept(c.tokens, sinks, c.keep);
  for (std::int64_t a = 0; a < c.appended; ++a) kept.push_back(c.tokens + a);
  for (std::int64_t b = 0; b < c.batch; ++b) {
    ASSERT_EQ(engine.view.sequence_length(b), held);
    for (std::int64_t h = 0; h < c.kv_heads; ++h)
      for (std::int64_t i = 0; i < held; ++i)
        for (std::int64_t d = 0; d < c.head_dim; ++d) {
          ASSERT_EQ(std::bit_cast<std::uint16_t>(engine.at(b, h, i, 0, d)),
                    std::bit_cast<std::uint16_t>(keys(b, h, kept[i], d)))
              << "key of sequence " << b << ", head " << h << ", token " << i;
          ASSERT_EQ(std::bit_cast<std::uint16_t>(engine.at(b, h, i, 1, d)),
                    std::bit_cast<std::uint16_t>(values(b, h, kept[i], d)))
              << "value of sequence " << b << ", head " << h << ", token " << i;
        }
  }
  EXPECT_EQ(engine.view.pages_in_use(), c.batch * kt::layout::shared_paged::pages_for(held, c.page_size));

  // Decode attention, n new tokens per sequence (the last n appended), over the engine's tensor.
  auto queries = kts::random_tensor<kt::half, 4>({c.batch, c.queries, shape.q_heads, c.head_dim}, 203);
  auto out = kts::make_tensor<float, 4>({c.batch, c.queries, shape.q_heads, c.head_dim});
  scheme::attend(queries.cview(), engine.view, out.view, kt::workspace{});
  for (std::int64_t t = 0; t < c.queries; ++t) {
    const kt::tensor_view<const kt::half, 3> q{queries.view.data + t * queries.view.strides[1],
                                               {c.batch, shape.q_heads, c.head_dim},
                                               {queries.view.strides[0], queries.view.strides[2], 1}};
    const kt::tensor_view<const float, 3> o{out.view.data + t * out.view.strides[1], {c.batch, shape.q_heads, c.head_dim},
                                            {out.view.strides[0], out.view.strides[2], 1}};
    const auto seen = [&](std::int64_t, std::int64_t) {
      return kts::kept_tokens{std::vector<std::int64_t>(kept.begin(), kept.end() - (c.queries - 1 - t)), {}};
    };
    const auto oracle = kts::oracle_attention(q, keys.cview(), values.cview(), c.kv_heads, seen);
    const auto bounds = kts::attention_bounds(q, keys.cview(), values.cview(), c.kv_heads, seen, {});
    EXPECT_LE(kts::check_against(o, oracle, bounds).worst_ratio, 1.0) << "query " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(Engines, SharedPagedLayout,
                         testing::Values(shared_case{order::nhd, 2, 2, 4, 64, 16, 100, 40, 5, 1},
                                         shared_case{order::hnd, 2, 2, 4, 64, 16, 100, 40, 5, 4},
                                         shared_case{order::nhd, 3, 4, 2, 128, 32, 300, 64, 1, 1},
                                         shared_case{order::hnd, 1, 8, 1, 128, 64, 70, 70, 9, 8},
                                         shared_case{order::nhd, 1, 1, 8, 64, 1, 20, 7, 3, 3}),
                         case_name);

TEST(SharedPagedLayoutErrors, ExhaustedPoolLeavesTheCacheAsItWas) {
  using scheme = engine_scheme<kt::codec::fp16>;
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 2, .head_dim = 64};
  engine_cache<kt::half> engine(shape, 2, {5, 16, order::nhd});  // 2 pages per sequence + 1 spare
  auto keys = kts::random_tensor<kt::half, 4>({2, 2, 40, 64}, 211);
  auto values = kts::random_tensor<kt::half, 4>({2, 2, 40, 64}, 212);
  scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{32};
  kts::scratch_buffer scratch(scheme::compress_workspace(shape, 2, 40, cfg));
  scheme::compress(keys.cview(), values.cview(), engine.view, cfg, scratch.get());
  const std::vector<kt::half> tensor_before = engine.tensor;
  const std::vector<std::byte> metadata_before = engine.metadata;
  auto one = kts::random_tensor<kt::half, 4>({2, 2, 1, 64}, 213);
  try {
    scheme::append(engine.view, one.cview(), one.cview());  // both sequences need a new page: 1 free
    ADD_FAILURE() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("pool exhausted"), std::string::npos) << e.what();
  }
  EXPECT_EQ(std::memcmp(engine.tensor.data(), tensor_before.data(), tensor_before.size() * sizeof(kt::half)), 0);
  EXPECT_EQ(engine.metadata, metadata_before);
}

TEST(SharedPagedLayoutErrors, BadArgumentsNameThemselves) {
  using view_type = kt::layout::shared_paged::view<kt::codec::fp16, kt::host_space>;
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 2, .head_dim = 64};
  const auto expect_error = [](auto&& call, const char* argument) {
    try {
      call();
      ADD_FAILURE() << "expected kvtrim::error naming " << argument;
    } catch (const kt::error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  expect_error([&] { (void)view_type::metadata_bytes(shape, 1, {4, 16, static_cast<order>(7)}); }, "pool.order");
  expect_error([&] { (void)view_type::metadata_bytes(shape, 1, {0, 16, order::nhd}); }, "pool.pages");
  expect_error([&] { (void)view_type::metadata_bytes(shape, 0, {4, 16, order::nhd}); }, "batch");
  std::vector<std::byte> metadata(view_type::metadata_bytes(shape, 1, {4, 16, order::hnd}) + 256);
  expect_error([&] { (void)view_type::bind_pages(nullptr, metadata.data(), shape, 1, {4, 16, order::hnd}); },
               "pages_tensor");
}

}  // namespace
