// The owning cache: what it allocates (bytes()), move semantics (the memory
// moves, the moved-from cache is empty and rejected by every call), and that it
// validates its shape before allocating.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
using fp32_scheme = kts::streaming_scheme<kt::codec::fp32>;
using fp16_scheme = kts::streaming_scheme<kt::codec::fp16>;
using fp32_cache = fp32_scheme::cache;

static_assert(!std::is_copy_constructible_v<fp32_cache> && !std::is_copy_assignable_v<fp32_cache>);
static_assert(std::is_nothrow_move_constructible_v<fp32_cache> && std::is_nothrow_move_assignable_v<fp32_cache>);
static_assert(std::is_base_of_v<std::runtime_error, kt::error>);

const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};

TEST(OwningCache, BytesAreKeysThenValuesAtTheCarversAlignment) {
  // 3 sequences × 2 kv heads × 100 slots × 64 dims: keys, then values, then the
  // layout's metadata — the one length (int64), a position per slot (int32), a
  // next position per head (int64) — each piece on the next 256-byte boundary.
  const auto align = [](std::size_t bytes) { return (bytes + 255) / 256 * 256; };
  const auto expected = [&](std::size_t element_bytes) {
    const std::size_t rows = 3 * 2 * 100 * 64 * element_bytes;
    std::size_t end = align(rows) + rows;
    end = align(end) + sizeof(std::int64_t);           // length
    end = align(end) + 3 * 2 * 100 * sizeof(std::int32_t);  // slot positions
    return align(end) + 3 * 2 * sizeof(std::int64_t);        // next positions
  };
  EXPECT_EQ(fp32_scheme::make_cache(shape, std::int64_t{3}, std::int64_t{100}, kt::codec::fp32::config{}).bytes(),
            expected(sizeof(float)));
  EXPECT_EQ(fp16_scheme::make_cache(shape, std::int64_t{3}, std::int64_t{100}, kt::codec::fp16::config{}).bytes(),
            expected(2));
  EXPECT_EQ(kt::codec::fp16::bytes_per_token({}, 64), 2.0 * 64 * 2);
}

TEST(OwningCache, StartsEmptyWithTheRequestedShape) {
  auto cache = fp32_scheme::make_cache(shape, std::int64_t{3}, std::int64_t{100}, kt::codec::fp32::config{});
  const auto& view = cache.view();
  EXPECT_EQ(view.shape, shape);
  EXPECT_EQ(view.batch, 3);
  EXPECT_EQ(view.capacity, 100);
  EXPECT_EQ(*view.length, 0);
  EXPECT_EQ(view.map.head_stride, 100);
  EXPECT_EQ(view.map.batch_stride, 200);
  EXPECT_EQ(view.map.token_stride, 1);
  fp32_scheme::cache_view& as_view = cache;  // converts to its view, the type every call takes
  EXPECT_EQ(&as_view, &cache.view());
}

TEST(OwningCache, MoveTransfersMemoryAndContents) {
  auto keys = kts::random_tensor<float, 4>({1, 2, 10, 64}, 7);
  auto queries = kts::random_tensor<float, 3>({1, 8, 64}, 8);
  auto before = kts::make_tensor<float, 3>({1, 8, 64});
  auto after = kts::make_tensor<float, 3>({1, 8, 64});

  auto source = fp32_scheme::make_cache(shape, std::int64_t{1}, std::int64_t{16}, kt::codec::fp32::config{});
  fp32_scheme::append(source.view(), keys.view, keys.view);
  fp32_scheme::attend(queries.view, source.view(), before.view, kt::workspace{});
  const float* const memory = source.view().storage.keys;
  const std::size_t bytes = source.bytes();

  fp32_cache moved(std::move(source));
  EXPECT_EQ(moved.view().storage.keys, memory);
  EXPECT_EQ(moved.bytes(), bytes);
  EXPECT_EQ(*moved.view().length, 10);
  fp32_scheme::attend(queries.view, moved.view(), after.view, kt::workspace{});
  EXPECT_EQ(before.storage, after.storage);

  // The moved-from cache owns nothing and its view is rejected, never written through.
  EXPECT_EQ(source.bytes(), 0u);  // NOLINT(bugprone-use-after-move): that is the point
  EXPECT_EQ(source.view().storage.keys, nullptr);
  try {
    fp32_scheme::append(source.view(), keys.view, keys.view);
    ADD_FAILURE() << "append to a moved-from cache did not throw";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'shape.head_dim'"), std::string::npos) << e.what();
  }
}

TEST(OwningCache, MoveAssignmentReleasesTheOldMemory) {
  // ASan's leak checker fails this test if the target's old memory leaks.
  auto target = fp32_scheme::make_cache(shape, std::int64_t{2}, std::int64_t{50}, kt::codec::fp32::config{});
  auto source = fp32_scheme::make_cache(shape, std::int64_t{1}, std::int64_t{16}, kt::codec::fp32::config{});
  const float* const memory = source.view().storage.keys;
  target = std::move(source);
  EXPECT_EQ(target.view().storage.keys, memory);
  EXPECT_EQ(target.view().batch, 1);
  EXPECT_EQ(source.bytes(), 0u);  // NOLINT(bugprone-use-after-move)
  auto& self = target;
  target = std::move(self);  // self-move leaves it intact
  EXPECT_EQ(target.view().storage.keys, memory);
}

TEST(OwningCache, ValidatesBeforeAllocating) {
  const auto message = [](auto&& make) -> std::string {
    try {
      make();
    } catch (const kt::error& e) {
      return e.what();
    }
    return "no kvtrim::error";
  };
  EXPECT_EQ(message([] {
              fp32_scheme::make_cache(kt::model_shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64}, std::int64_t{1},
                                      std::int64_t{-5}, kt::codec::fp32::config{});
            }),
            "kvtrim::layout::contiguous::view::bytes: argument 'capacity': expected at least one slot per head, got -5");
  EXPECT_EQ(message([] {
              fp32_scheme::make_cache(kt::model_shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64}, std::int64_t{0},
                                      std::int64_t{5}, kt::codec::fp32::config{});
            }),
            "kvtrim::layout::contiguous::view::bytes: argument 'batch': expected at least one sequence, got 0");
}

}  // namespace
