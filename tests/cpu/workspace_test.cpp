// The scratch-space protocol: *_workspace says how many bytes a call needs;
// that many bytes are enough, one fewer (or none, or a misaligned base) is an
// error; and the hot calls — compress, append, attend — allocate nothing.
//
// This file replaces the global operator new/delete of the test program with
// counting versions (forwarding to malloc/free), so the count is exact.
#include <gtest/gtest.h>

#include <algorithm>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>

#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace {
std::atomic<std::int64_t> allocation_count{0};

void* counted_allocation(std::size_t bytes, std::size_t alignment) {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
  void* memory = nullptr;
  if (alignment <= alignof(std::max_align_t)) {
    memory = std::malloc(bytes > 0 ? bytes : 1);
  } else if (posix_memalign(&memory, alignment, bytes > 0 ? bytes : 1) != 0) {
    memory = nullptr;
  }
  if (memory == nullptr) throw std::bad_alloc();
  return memory;
}
}  // namespace

// Every form, so that no allocation bypasses the counter and every block is
// released by the same allocator (under ASan, a form left out would come from
// the sanitizer's own operator new and then reach free() here: a mismatch).
void* operator new(std::size_t bytes) { return counted_allocation(bytes, alignof(std::max_align_t)); }
void* operator new[](std::size_t bytes) { return counted_allocation(bytes, alignof(std::max_align_t)); }
void* operator new(std::size_t bytes, std::align_val_t alignment) {
  return counted_allocation(bytes, static_cast<std::size_t>(alignment));
}
void* operator new[](std::size_t bytes, std::align_val_t alignment) {
  return counted_allocation(bytes, static_cast<std::size_t>(alignment));
}
void* operator new(std::size_t bytes, const std::nothrow_t&) noexcept {
  try {
    return counted_allocation(bytes, alignof(std::max_align_t));
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](std::size_t bytes, const std::nothrow_t& tag) noexcept { return operator new(bytes, tag); }
void* operator new(std::size_t bytes, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  try {
    return counted_allocation(bytes, static_cast<std::size_t>(alignment));
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](std::size_t bytes, std::align_val_t alignment, const std::nothrow_t& tag) noexcept {
  return operator new(bytes, alignment, tag);
}
void operator delete(void* memory) noexcept { std::free(memory); }
void operator delete[](void* memory) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete(void* memory, std::align_val_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::align_val_t) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t, std::align_val_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t, std::align_val_t) noexcept { std::free(memory); }
void operator delete(void* memory, const std::nothrow_t&) noexcept { std::free(memory); }
void operator delete[](void* memory, const std::nothrow_t&) noexcept { std::free(memory); }
void operator delete(void* memory, std::align_val_t, const std::nothrow_t&) noexcept { std::free(memory); }
void operator delete[](void* memory, std::align_val_t, const std::nothrow_t&) noexcept { std::free(memory); }

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
using scheme = kts::streaming_scheme<kt::codec::fp16>;

struct setup {
  kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 128};
  std::int64_t batch = 2, tokens = 300;
  scheme::config cfg;
  kts::host_tensor<kt::half, 4> keys = kts::random_tensor<kt::half, 4>({2, 2, 300, 128}, 1);
  kts::host_tensor<kt::half, 4> values = kts::random_tensor<kt::half, 4>({2, 2, 300, 128}, 2);
  setup() { cfg.budget.keep = kt::keep_ratio{0.25}; }
};

std::string compress_error(setup& s, kt::workspace scratch) {
  auto cache = scheme::make_cache(s.shape, s.batch, std::int64_t{75}, kt::codec::fp16::config{});
  try {
    scheme::compress(s.keys.view, s.values.view, cache.view(), s.cfg, scratch);
  } catch (const kt::error& e) {
    return e.what();
  }
  return "";
}

TEST(Workspace, AdvertisedSizeIsEnough) {
  setup s;
  const std::size_t bytes = scheme::compress_workspace(s.shape, s.batch, s.tokens, s.cfg);
  kts::scratch_buffer scratch(bytes);
  EXPECT_EQ(compress_error(s, scratch.get()), "");
}

TEST(Workspace, OneByteTooFewThrows) {
  setup s;
  const std::size_t bytes = scheme::compress_workspace(s.shape, s.batch, s.tokens, s.cfg);
  kts::scratch_buffer scratch(bytes);
  const std::string message = compress_error(s, kt::workspace{scratch.bytes.data(), bytes - 1});
  EXPECT_EQ(message, kt::detail::cat("kvtrim::scheme::compress: argument 'workspace': expected at least ", bytes,
                                     " bytes, got ", bytes - 1, " bytes"));
}

TEST(Workspace, NullWorkspaceThrows) {
  setup s;
  const std::string message = compress_error(s, kt::workspace{});
  EXPECT_NE(message.find("argument 'workspace': expected a buffer of"), std::string::npos) << message;
  EXPECT_NE(message.find("got nullptr"), std::string::npos) << message;
}

TEST(Workspace, MisalignedBaseThrows) {
  setup s;
  const std::size_t bytes = scheme::compress_workspace(s.shape, s.batch, s.tokens, s.cfg);
  kts::scratch_buffer scratch(bytes + 8);
  const std::string message = compress_error(s, kt::workspace{scratch.bytes.data() + 8, bytes});
  EXPECT_NE(message.find("argument 'workspace': expected a pointer aligned to"), std::string::npos) << message;
}

TEST(Workspace, SizeCoversEveryPieceAtItsAlignment) {
  // Scores (T floats per head), one sequence's scores (T floats per kv head: the
  // per-sequence scoring of compress_options::sequence_lengths), keep counts, CSR
  // offsets and kept tokens, and the selection's scratch (T int32 per thread that
  // selects at once: min(threads, heads)), each starting on a 256-byte boundary.
  setup s;
  const std::int64_t heads = s.batch * s.shape.kv_heads, keep = 75;
  const auto aligned = [](std::size_t bytes) { return (bytes + 255) / 256 * 256; };
  const std::int64_t selecting_threads = std::min(kt::detail::cpu_threads(), heads);
  const std::size_t expected = aligned(heads * s.tokens * sizeof(float)) +
                               aligned(s.shape.kv_heads * s.tokens * sizeof(float)) +
                               aligned(heads * sizeof(std::int32_t)) +
                               aligned((heads + 1) * sizeof(std::int64_t)) +
                               aligned(heads * keep * sizeof(std::int32_t)) +
                               selecting_threads * ((s.tokens + 63) / 64 * 64) * sizeof(std::int32_t);
  EXPECT_EQ(scheme::compress_workspace(s.shape, s.batch, s.tokens, s.cfg), expected);
}

TEST(Workspace, CarverSizesAndCarvesAlike) {
  kt::workspace_carver sizing;
  EXPECT_EQ(sizing.take<float>(10), nullptr);
  EXPECT_EQ(sizing.take<std::int64_t>(3), nullptr);
  EXPECT_EQ(sizing.take<char>(0), nullptr);
  EXPECT_EQ(sizing.bytes(), 512u);  // 40 → 256 + 24 → 512 + 0
  alignas(256) static std::byte memory[1024];
  kt::workspace_carver carving(kt::workspace{memory, sizeof memory});
  EXPECT_EQ(static_cast<void*>(carving.take<float>(10)), static_cast<void*>(memory));
  EXPECT_EQ(static_cast<void*>(carving.take<std::int64_t>(3)), static_cast<void*>(memory + 256));
  EXPECT_EQ(static_cast<void*>(carving.take<char>(0)), static_cast<void*>(memory + 512));
  EXPECT_EQ(carving.bytes(), sizing.bytes());
}

TEST(Workspace, AttendNeedsNone) {
  setup s;
  auto cache = scheme::make_cache(s.shape, s.batch, std::int64_t{300}, kt::codec::fp16::config{});
  scheme::append(cache.view(), s.keys.view, s.values.view);
  EXPECT_EQ(scheme::attend_workspace(cache.view()), 0u);
  auto queries = kts::random_tensor<float, 3>({2, 8, 128}, 3);
  auto out = kts::make_tensor<float, 3>({2, 8, 128});
  EXPECT_NO_THROW(scheme::attend(queries.view, cache.view(), out.view, kt::workspace{}));
}

TEST(Workspace, HotCallsAllocateNothing) {
  setup s;
  auto cache = scheme::make_cache(s.shape, s.batch, std::int64_t{80}, kt::codec::fp16::config{});
  kts::scratch_buffer scratch(scheme::compress_workspace(s.shape, s.batch, s.tokens, s.cfg));
  auto step = kts::random_tensor<kt::half, 4>({2, 2, 1, 128}, 4);
  auto queries = kts::random_tensor<kt::half, 3>({2, 8, 128}, 5);
  auto out = kts::make_tensor<kt::half, 3>({2, 8, 128});
  const kt::workspace compress_scratch = scratch.get();

  const std::int64_t before = allocation_count.load();
  scheme::compress(s.keys.view, s.values.view, cache.view(), s.cfg, compress_scratch);
  for (int decode_step = 0; decode_step < 5; ++decode_step) {
    scheme::append(cache.view(), step.view, step.view);
    scheme::attend(queries.view, cache.view(), out.view, kt::workspace{});
  }
  const std::int64_t allocations = allocation_count.load() - before;
  EXPECT_EQ(allocations, 0);
  EXPECT_EQ(*cache.view().length, 80);

  // The counter does count: building an error message allocates.
  const std::int64_t before_error = allocation_count.load();
  EXPECT_THROW(scheme::append(cache.view(), step.view, step.view), kt::error);  // full
  EXPECT_GT(allocation_count.load(), before_error);
}

}  // namespace
