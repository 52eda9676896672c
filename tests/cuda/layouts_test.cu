// layout::paged and layout::flat on backend::cuda against the CPU reference
// (backend::cpu, the specification). Both backends run the same operations;
// the device cache is then copied back whole and compared with the CPU's:
//  - metadata exactly (page tables, free list and free count; offsets,
//    lengths, repack count): the device replays the CPU's free-list order, so
//    page ids are identical, not merely equivalent;
//  - every token a head holds, slot by slot through the tables: key and value
//    rows bit for bit (both backends round the same float to the same storage
//    type, round to nearest even), positions, next positions, compensation entries.
// Failures (pool or buffer exhausted, positions past 2^31) leave every byte of
// the device cache but its status words unchanged, and check_status throws the
// CPU's own message. Ragged budgets have no CUDA implementation yet, so ragged
// selections (counts 0, 1, all, random) are built on the host and handed to both
// backends' compact directly; the full scheme::compress runs with budget::uniform.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;
using kt::testing::device_tensor;

namespace {

// ---- a device cache seen from the host ---------------------------------------

template <class T>
struct rebaser {
  const std::byte* device_base;
  std::byte* host_base;
  template <class P>
  P* operator()(P* pointer) const {
    if (pointer == nullptr) return nullptr;
    return reinterpret_cast<P*>(host_base + (reinterpret_cast<const std::byte*>(pointer) - device_base));
  }
};

template <class CodecT>
typename CodecT::template storage<kt::host_space> rebase_storage(const typename CodecT::template storage<kt::device_space>& d,
                                                                 const rebaser<void>& move) {
  typename CodecT::template storage<kt::host_space> h;
  h.keys = move(d.keys);
  h.values = move(d.values);
  h.head_dim = d.head_dim;
  h.slots = d.slots;
  h.slot_run = d.slot_run;
  return h;
}

template <class CodecT>
kt::layout::paged::view<CodecT, kt::host_space> rebase(const kt::layout::paged::view<CodecT, kt::device_space>& d,
                                                       const rebaser<void>& move) {
  kt::layout::paged::view<CodecT, kt::host_space> h;
  h.storage = rebase_storage<CodecT>(d.storage, move);
  h.shape = d.shape;
  h.batch = d.batch;
  h.page_size = d.page_size;
  h.pages = d.pages;
  h.indptr = move(d.indptr);
  h.indices = move(d.indices);
  h.last_page_len = move(d.last_page_len);
  h.free_pages = move(d.free_pages);
  h.free_count = move(d.free_count);
  h.compensation = {move(d.compensation.index), move(d.compensation.bias)};
  h.positions = {move(d.positions.slot_position), move(d.positions.next_position)};
  h.status = move(d.status);
  return h;
}

template <class CodecT>
kt::layout::flat::view<CodecT, kt::host_space> rebase(const kt::layout::flat::view<CodecT, kt::device_space>& d,
                                                      const rebaser<void>& move) {
  kt::layout::flat::view<CodecT, kt::host_space> h;
  h.storage = rebase_storage<CodecT>(d.storage, move);
  h.shape = d.shape;
  h.batch = d.batch;
  h.capacity = d.capacity;
  h.offsets = move(d.offsets);
  h.lengths = move(d.lengths);
  h.repacks = move(d.repacks);
  h.compensation = {move(d.compensation.index), move(d.compensation.bias)};
  h.positions = {move(d.positions.slot_position), move(d.positions.next_position)};
  h.status = move(d.status);
  return h;
}

/// The owning device cache's whole allocation, copied back, with a host view over it.
template <class Cache>
struct snapshot {
  std::vector<std::byte> bytes;
  decltype(rebase(std::declval<typename Cache::view_type>(), std::declval<rebaser<void>>())) view;

  explicit snapshot(const Cache& cache) : bytes(kt::testing::download_bytes(cache.data(), cache.bytes())) {
    view = rebase(cache.view(), rebaser<void>{static_cast<const std::byte*>(cache.data()), bytes.data()});
  }
  snapshot(const snapshot&) = delete;
  /// Bytes before the status words (carved last): all a failed call must leave as they were.
  std::size_t bytes_before_status() const { return static_cast<std::size_t>(reinterpret_cast<std::byte*>(view.status) - bytes.data()); }
};

// ---- comparisons ---------------------------------------------------------------

template <class CodecT>
void expect_same_metadata(const kt::layout::paged::view<CodecT, kt::host_space>& cpu,
                          const kt::layout::paged::view<CodecT, kt::host_space>& gpu) {
  const std::int64_t heads = cpu.heads();
  for (std::int64_t head = 0; head <= heads; ++head) ASSERT_EQ(gpu.indptr[head], cpu.indptr[head]) << "indptr[" << head << "]";
  for (std::int64_t head = 0; head < heads; ++head)
    ASSERT_EQ(gpu.last_page_len[head], cpu.last_page_len[head]) << "last_page_len[" << head << "]";
  ASSERT_EQ(*gpu.free_count, *cpu.free_count) << "free_count";
  for (std::int64_t k = 0; k < cpu.pages; ++k) ASSERT_EQ(gpu.indices[k], cpu.indices[k]) << "indices[" << k << "]";
  for (std::int64_t k = 0; k < cpu.pages; ++k) ASSERT_EQ(gpu.free_pages[k], cpu.free_pages[k]) << "free_pages[" << k << "]";
}

template <class CodecT>
void expect_same_metadata(const kt::layout::flat::view<CodecT, kt::host_space>& cpu,
                          const kt::layout::flat::view<CodecT, kt::host_space>& gpu) {
  const std::int64_t heads = cpu.heads();
  for (std::int64_t head = 0; head <= heads; ++head) ASSERT_EQ(gpu.offsets[head], cpu.offsets[head]) << "offsets[" << head << "]";
  for (std::int64_t head = 0; head < heads; ++head) ASSERT_EQ(gpu.lengths[head], cpu.lengths[head]) << "lengths[" << head << "]";
  ASSERT_EQ(*gpu.repacks, *cpu.repacks) << "repacks";
}

/// Metadata, then every held token of every head (slot, rows, position), next
/// positions and compensation entries; the device view must also pass the
/// CPU's full validation (tables, free list, no page named twice).
template <class View>
void expect_same_cache(const View& cpu, const View& gpu) {
  using element = typename View::codec::element;
  ASSERT_NO_THROW(View::layout_policy::validate("layouts_test", gpu, /*exclusive=*/true));
  expect_same_metadata(cpu, gpu);
  if (::testing::Test::HasFatalFailure()) return;
  const std::int64_t head_dim = cpu.shape.head_dim;
  const std::size_t row_bytes = static_cast<std::size_t>(head_dim) * sizeof(element);
  for (std::int64_t b = 0; b < cpu.batch; ++b)
    for (std::int64_t h = 0; h < cpu.shape.kv_heads; ++h) {
      const std::int64_t head = b * cpu.shape.kv_heads + h;
      ASSERT_EQ(gpu.head_length(b, h), cpu.head_length(b, h)) << "length of head " << head;
      for (std::int64_t i = 0; i < cpu.head_length(b, h); ++i) {
        const std::int64_t slot = cpu.slot(b, h, i);
        ASSERT_EQ(gpu.slot(b, h, i), slot) << "slot of token " << i << " of head " << head;
        ASSERT_EQ(std::memcmp(gpu.storage.keys + slot * head_dim, cpu.storage.keys + slot * head_dim, row_bytes), 0)
            << "key row of token " << i << " of head " << head;
        ASSERT_EQ(std::memcmp(gpu.storage.values + slot * head_dim, cpu.storage.values + slot * head_dim, row_bytes), 0)
            << "value row of token " << i << " of head " << head;
        ASSERT_EQ(gpu.positions.slot_position[slot], cpu.positions.slot_position[slot])
            << "position of token " << i << " of head " << head;
      }
      ASSERT_EQ(gpu.positions.next_position[head], cpu.positions.next_position[head]) << "next position of head " << head;
      ASSERT_EQ(gpu.compensation.index[head], cpu.compensation.index[head]) << "compensation index of head " << head;
      ASSERT_EQ(gpu.compensation.bias[head], cpu.compensation.bias[head]) << "compensation bias of head " << head;
    }
}

template <class GpuCache, class CpuView>
void expect_matches(const GpuCache& gpu, const CpuView& cpu, cudaStream_t stream) {
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_NO_THROW(kt::check_status(gpu.view(), stream));
  const snapshot<GpuCache> device(gpu);
  expect_same_cache(cpu, device.view);
}

/// Calls `call` (a device call expected to fail on the device) and checks the
/// cache kept every byte but its status words, and that check_status throws
/// exactly `cpu_message`.
template <class GpuCache, class Call>
void expect_refused_intact(const GpuCache& gpu, cudaStream_t stream, const std::string& cpu_message, Call&& call) {
  ASSERT_FALSE(cpu_message.empty()) << "the CPU call did not throw";
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const snapshot<GpuCache> before(gpu);
  call();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const snapshot<GpuCache> after(gpu);
  const std::size_t kept = before.bytes_before_status();
  ASSERT_EQ(std::memcmp(before.bytes.data(), after.bytes.data(), kept), 0) << "a refused call changed the cache";
  try {
    kt::check_status(gpu.view(), stream);
    FAIL() << "check_status did not throw; expected: " << cpu_message;
  } catch (const kt::error& e) {
    EXPECT_EQ(std::string(e.what()), cpu_message);
  }
  EXPECT_NO_THROW(kt::check_status(gpu.view(), stream)) << "check_status clears the record";
}

template <class Call>
std::string cpu_error(Call&& call) {
  try {
    call();
  } catch (const kt::error& e) {
    return e.what();
  }
  return {};
}

// ---- inputs ------------------------------------------------------------------

/// A ragged selection over `heads` heads of `tokens` tokens: head counts cycle
/// through 0, all, 1, a random count, so heads with very different budgets sit
/// side by side; tokens are a random ascending subset.
struct host_selection {
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> tokens;
  std::int64_t count(std::int64_t head) const { return offsets[head + 1] - offsets[head]; }
};

host_selection ragged_selection(std::int64_t heads, std::int64_t tokens, std::uint64_t seed,
                                const std::vector<std::int64_t>& fixed_counts = {}) {
  std::mt19937_64 random(seed);
  host_selection s;
  s.offsets.push_back(0);
  std::vector<std::int32_t> all(static_cast<std::size_t>(tokens));
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t head = 0; head < heads; ++head) {
    std::int64_t count = 0;
    if (!fixed_counts.empty()) {
      count = fixed_counts[static_cast<std::size_t>(head) % fixed_counts.size()];
    } else {
      switch (head % 4) {
        case 0: count = 0; break;
        case 1: count = tokens; break;
        case 2: count = 1; break;
        default: count = std::uniform_int_distribution<std::int64_t>(0, tokens)(random);
      }
    }
    std::shuffle(all.begin(), all.end(), random);
    std::vector<std::int32_t> kept(all.begin(), all.begin() + count);
    std::sort(kept.begin(), kept.end());
    s.tokens.insert(s.tokens.end(), kept.begin(), kept.end());
    s.offsets.push_back(static_cast<std::int64_t>(s.tokens.size()));
  }
  return s;
}

/// Compensation rows on every third head that keeps at least two tokens
/// (replacing its middle kept token), as RazorAttention's scorer leaves them.
struct host_compensation {
  std::vector<std::int32_t> index;
  std::vector<float> keys, values, bias;
  std::vector<std::int64_t> position;
};

host_compensation make_compensation(const host_selection& s, std::int64_t head_dim, std::uint64_t seed) {
  const auto heads = static_cast<std::int64_t>(s.offsets.size()) - 1;
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  host_compensation c;
  for (std::int64_t head = 0; head < heads; ++head) {
    c.index.push_back(head % 3 == 1 && s.count(head) >= 2 ? static_cast<std::int32_t>(s.count(head) / 2) : -1);
    for (std::int64_t d = 0; d < head_dim; ++d) c.keys.push_back(normal(random)), c.values.push_back(normal(random));
    c.bias.push_back(std::log(1.0f + static_cast<float>(head)));
    c.position.push_back(1000 + head);
  }
  return c;
}

struct device_compensation {
  device_buffer<std::int32_t> index;
  device_buffer<float> keys, values, bias;
  device_buffer<std::int64_t> position;
  explicit device_compensation(const host_compensation& c)
      : index(c.index), keys(c.keys), values(c.values), bias(c.bias), position(c.position) {}
  kt::detail::compensation_rows rows() const { return {index.data(), keys.data(), values.data(), bias.data(), position.data()}; }
};

template <class Element>
struct token_batch {  // one append's new rows, on both sides
  kt::testing::host_tensor<Element, 4> keys, values;
  device_tensor<Element, 4> device_keys, device_values;
  token_batch(std::int64_t batch, std::int64_t kv_heads, std::int64_t count, std::int64_t head_dim, std::uint64_t seed)
      : keys(kt::testing::random_tensor<Element, 4>({batch, kv_heads, count, head_dim}, seed)),
        values(kt::testing::random_tensor<Element, 4>({batch, kv_heads, count, head_dim}, seed + 1)),
        device_keys(keys),
        device_values(values) {}
};

/// The head (b, h) rows of a token_batch as the [n, D] views append_head takes.
template <class T, class Space>
kt::tensor_view<T, 2, Space> head_rows(const kt::tensor_view<T, 4, Space>& all, std::int64_t b, std::int64_t h) {
  return {all.data + b * all.strides[0] + h * all.strides[1], {all.extents[2], all.extents[3]}, {all.strides[2], all.strides[3]}};
}

// ---- schemes and pools ---------------------------------------------------------

template <class Layout, class Element, class Backend>
using uniform_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, kt::codec::plain<Element>, Backend>;

/// A pool for the given per-head token counts (and `growth` more tokens per
/// head): paged, whole pages per head plus `spare` pages; flat, the tokens plus
/// `spare` slots (no rounding: plain codecs have runs of 1).
template <class Layout>
typename Layout::pool_size pool_for(const std::vector<std::int64_t>& counts, std::int64_t growth, std::int64_t spare,
                                    std::int64_t page_size) {
  std::int64_t units = 0;
  for (const std::int64_t count : counts)
    units += std::is_same_v<Layout, kt::layout::paged> ? kt::layout::paged::pages_for(count + growth, page_size) : count + growth;
  if constexpr (std::is_same_v<Layout, kt::layout::paged>)
    return {std::max<std::int64_t>(units + spare, 1), page_size};
  else
    return {std::max<std::int64_t>(units + spare, 1)};
}

struct layout_case {
  std::int64_t batch, kv_heads, head_dim, tokens, page_size;
  bool strided;
  std::int64_t steps;  // single-token appends to every head after compaction
};

std::string name_of(const layout_case& c, std::size_t index) {
  return kt::detail::cat("b", c.batch, "_kv", c.kv_heads, "_d", c.head_dim, "_t", c.tokens, "_p", c.page_size,
                         c.strided ? "_strided" : "_dense", "_steps", c.steps, "_", index);
}

/// compact (ragged selection, compensation rows) then appends — `steps` single
/// tokens to every head, three at once, two to one head several times — on
/// both backends, compared after compaction and at the end.
template <class Layout, class Element>
void run_ragged(const layout_case& c) {
  SCOPED_TRACE(name_of(c, 0));
  using cpu_scheme = uniform_scheme<Layout, Element, kt::backend::cpu>;
  using gpu_scheme = uniform_scheme<Layout, Element, kt::backend::cuda>;
  using codec = kt::codec::plain<Element>;
  const kt::model_shape shape{.q_heads = c.kv_heads, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::int64_t heads = c.batch * c.kv_heads;
  const std::array<std::int64_t, 4> padding = c.strided ? std::array<std::int64_t, 4>{1, 1, 3, 8} : std::array<std::int64_t, 4>{};
  const auto keys = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 21, 1.0f, padding);
  const auto values = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 22, 1.0f, padding);
  const host_selection selection = ragged_selection(heads, c.tokens, 23);
  const host_compensation compensation = make_compensation(selection, c.head_dim, 24);
  std::vector<std::int64_t> counts;
  for (std::int64_t head = 0; head < heads; ++head) counts.push_back(selection.count(head));
  const std::int64_t repeats = 4;  // append_head of 2 tokens to head 1 % heads
  // Paged: room for everything with 2 spare pages. Flat: 3 spare slots beyond the
  // steps, so the uneven append_head calls run out of headroom and repack.
  const auto pool = std::is_same_v<Layout, kt::layout::paged>
                        ? pool_for<Layout>(counts, c.steps + 3 + 2 * repeats, 2, c.page_size)
                        : pool_for<Layout>(counts, c.steps + 3, 3 + 2 * repeats, c.page_size);

  auto cpu = cpu_scheme::make_cache(shape, c.batch, pool, typename codec::config{});
  auto gpu = gpu_scheme::make_cache(shape, c.batch, pool, typename codec::config{});
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);

  kt::detail::compensation_rows cpu_rows{const_cast<std::int32_t*>(compensation.index.data()),
                                         const_cast<float*>(compensation.keys.data()),
                                         const_cast<float*>(compensation.values.data()),
                                         const_cast<float*>(compensation.bias.data()),
                                         const_cast<std::int64_t*>(compensation.position.data())};
  kt::compact_args cpu_args;
  cpu_args.start_position = 7;
  cpu_args.compensation = &cpu_rows;
  kt::implementation<Layout, kt::backend::cpu>::compact(
      cpu.view(), keys.cview(), values.cview(),
      kt::selection_view<kt::host_space>{selection.offsets.data(), selection.tokens.data(), heads}, cpu_args, {});

  device_tensor<Element, 4> device_keys(keys), device_values(values);
  device_buffer<std::int64_t> device_offsets(selection.offsets);
  device_buffer<std::int32_t> device_tokens(selection.tokens);
  const device_compensation device_rows(compensation);
  const kt::detail::compensation_rows gpu_rows = device_rows.rows();
  kt::compact_args gpu_args = cpu_args;
  gpu_args.compensation = &gpu_rows;
  const auto as_const = [](const auto& view) { return kt::detail::as_const(view); };
  kt::implementation<Layout, kt::backend::cuda>::compact(
      gpu.view(), as_const(device_keys.view), as_const(device_values.view),
      kt::selection_view<kt::device_space>{device_offsets.data(), device_tokens.data(), heads}, gpu_args, stream);
  expect_matches(gpu, cpu.view(), stream);
  if (::testing::Test::HasFatalFailure()) return;

  for (std::int64_t step = 0; step < c.steps; ++step) {
    const token_batch<Element> batch(c.batch, c.kv_heads, 1, c.head_dim, 100 + 2 * step);
    cpu_scheme::append(cpu.view(), batch.keys.cview(), batch.values.cview());
    gpu_scheme::append(gpu.view(), batch.device_keys.view, batch.device_values.view, stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);  // the batch's buffers are freed next iteration
  }
  {
    const token_batch<Element> batch(c.batch, c.kv_heads, 3, c.head_dim, 300);
    cpu_scheme::append(cpu.view(), batch.keys.cview(), batch.values.cview());
    gpu_scheme::append(gpu.view(), batch.device_keys.view, batch.device_values.view, stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  }
  const std::int64_t target = 1 % heads;
  for (std::int64_t r = 0; r < repeats; ++r) {
    const token_batch<Element> batch(c.batch, c.kv_heads, 2, c.head_dim, 400 + 2 * r);
    const std::int64_t b = target / c.kv_heads, h = target % c.kv_heads;
    cpu_scheme::append_head(cpu.view(), b, h, head_rows(batch.keys.cview(), b, h), head_rows(batch.values.cview(), b, h));
    gpu_scheme::append_head(gpu.view(), b, h, head_rows(batch.device_keys.view, b, h), head_rows(batch.device_values.view, b, h),
                            stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  }
  expect_matches(gpu, cpu.view(), stream);
  if constexpr (std::is_same_v<Layout, kt::layout::flat>)
    if (heads > 1) EXPECT_GE(*cpu.view().repacks, 1) << "the case was meant to repack";
  cudaStreamDestroy(stream);
}

/// The whole scheme: static window + uniform budget compress on both backends,
/// then `steps` single-token appends (crossing page boundaries).
template <class Layout, class Element>
void run_pipeline(const layout_case& c, kt::keep_amount keep) {
  SCOPED_TRACE(name_of(c, 0));
  using cpu_scheme = uniform_scheme<Layout, Element, kt::backend::cpu>;
  using gpu_scheme = uniform_scheme<Layout, Element, kt::backend::cuda>;
  using codec = kt::codec::plain<Element>;
  const kt::model_shape shape{.q_heads = c.kv_heads, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::array<std::int64_t, 4> padding = c.strided ? std::array<std::int64_t, 4>{1, 1, 3, 8} : std::array<std::int64_t, 4>{};
  const auto keys = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 31, 1.0f, padding);
  const auto values = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 32, 1.0f, padding);
  typename cpu_scheme::config cfg;
  cfg.budget.keep = keep;
  const std::int64_t kept = kt::budget::uniform::max_keep(cfg.budget, c.tokens);
  const auto pool = pool_for<Layout>(std::vector<std::int64_t>(static_cast<std::size_t>(c.batch * c.kv_heads), kept),
                                     c.steps, 1, c.page_size);
  auto cpu = cpu_scheme::make_cache(shape, c.batch, pool, typename codec::config{});
  auto gpu = gpu_scheme::make_cache(shape, c.batch, pool, typename codec::config{});
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  std::vector<std::byte> cpu_scratch(cpu_scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
  cpu_scheme::compress(keys.cview(), values.cview(), cpu.view(), cfg, {cpu_scratch.data(), cpu_scratch.size()});
  device_tensor<Element, 4> device_keys(keys), device_values(values);
  device_buffer<std::byte> scratch(gpu_scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
  gpu_scheme::compress(device_keys.view, device_values.view, gpu.view(), cfg, {scratch.data(), scratch.size()}, stream);
  expect_matches(gpu, cpu.view(), stream);
  if (::testing::Test::HasFatalFailure()) return;
  for (std::int64_t step = 0; step < c.steps; ++step) {
    const token_batch<Element> batch(c.batch, c.kv_heads, 1, c.head_dim, 500 + 2 * step);
    cpu_scheme::append(cpu.view(), batch.keys.cview(), batch.values.cview());
    gpu_scheme::append(gpu.view(), batch.device_keys.view, batch.device_values.view, stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  }
  expect_matches(gpu, cpu.view(), stream);
  cudaStreamDestroy(stream);
}

// ---- suites ----------------------------------------------------------------------

const auto layout_cases = ::testing::Values(
    // one token; a single head; a page of one token's worth
    layout_case{1, 1, 64, 1, 16, false, 17},
    layout_case{2, 3, 128, 1, 32, true, 33},
    // 17 tokens: one page plus one at page size 16; batch 3 with 4 kv heads (counts 0, all, 1, random)
    layout_case{3, 4, 64, 17, 16, false, 20},
    layout_case{2, 4, 128, 17, 64, true, 5},
    // 4097 tokens: 256 pages + 1 at page size 16; page sizes 32 and 64
    layout_case{2, 4, 128, 4097, 16, false, 18},
    layout_case{3, 2, 64, 4097, 32, true, 33},
    layout_case{1, 8, 128, 4097, 64, false, 3});

class PagedCuda : public ::testing::TestWithParam<layout_case> {};
class FlatCuda : public ::testing::TestWithParam<layout_case> {};

TEST_P(PagedCuda, RaggedCompactAndAppendsMatchCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_ragged<kt::layout::paged, kt::half>(GetParam());
}
TEST_P(PagedCuda, RaggedCompactAndAppendsMatchCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_ragged<kt::layout::paged, kt::bfloat16>(GetParam());
}
TEST_P(PagedCuda, SchemePipelineMatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_pipeline<kt::layout::paged, kt::half>(GetParam(), kt::keep_ratio{0.3});
}
TEST_P(PagedCuda, SchemePipelineMatchesCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_pipeline<kt::layout::paged, kt::bfloat16>(GetParam(), kt::keep_tokens{20});
}
TEST_P(FlatCuda, RaggedCompactAppendsAndRepacksMatchCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_ragged<kt::layout::flat, kt::half>(GetParam());
}
TEST_P(FlatCuda, RaggedCompactAppendsAndRepacksMatchCpuBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_ragged<kt::layout::flat, kt::bfloat16>(GetParam());
}
TEST_P(FlatCuda, SchemePipelineMatchesCpuFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_pipeline<kt::layout::flat, kt::half>(GetParam(), kt::keep_ratio{0.3});
}

TEST(LayoutsCuda, Fp32RaggedCompactAppendsAndRepacksMatchCpu) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_ragged<kt::layout::paged, float>(layout_case{2, 3, 64, 17, 16, true, 20});
  run_ragged<kt::layout::flat, float>(layout_case{2, 3, 128, 17, 16, true, 20});
}

INSTANTIATE_TEST_SUITE_P(AwkwardSizes, PagedCuda, layout_cases,
                         [](const ::testing::TestParamInfo<layout_case>& info) { return name_of(info.param, info.index); });
INSTANTIATE_TEST_SUITE_P(AwkwardSizes, FlatCuda, layout_cases,
                         [](const ::testing::TestParamInfo<layout_case>& info) { return name_of(info.param, info.index); });

// ---- fresh caches, failures, graphs ---------------------------------------------------

using paged_cpu = uniform_scheme<kt::layout::paged, kt::half, kt::backend::cpu>;
using paged_gpu = uniform_scheme<kt::layout::paged, kt::half, kt::backend::cuda>;
using flat_cpu = uniform_scheme<kt::layout::flat, kt::half, kt::backend::cpu>;
using flat_gpu = uniform_scheme<kt::layout::flat, kt::half, kt::backend::cuda>;
const kt::model_shape small_shape{.q_heads = 2, .kv_heads = 2, .head_dim = 64};

TEST(LayoutsCuda, FreshOwningCachesEqualTheCpus) {
  KVTRIM_SKIP_WITHOUT_GPU();
  {
    auto cpu = paged_cpu::make_cache(small_shape, std::int64_t{3}, kt::layout::paged::pool_size{37, 16}, kt::codec::fp16::config{});
    auto gpu = paged_gpu::make_cache(small_shape, std::int64_t{3}, kt::layout::paged::pool_size{37, 16}, kt::codec::fp16::config{});
    expect_matches(gpu, cpu.view(), nullptr);
  }
  {
    auto cpu = flat_cpu::make_cache(small_shape, std::int64_t{3}, kt::layout::flat::pool_size{101}, kt::codec::fp16::config{});
    auto gpu = flat_gpu::make_cache(small_shape, std::int64_t{3}, kt::layout::flat::pool_size{101}, kt::codec::fp16::config{});
    expect_matches(gpu, cpu.view(), nullptr);
  }
}

/// Compacts `selection` into both caches (no compensation), starting at `start`.
template <class Layout, class CpuCache, class GpuCache>
void compact_both(CpuCache& cpu, GpuCache& gpu, const host_selection& selection, std::int64_t tokens,
                  std::int64_t start, cudaStream_t stream, std::string* cpu_message = nullptr) {
  const std::int64_t heads = static_cast<std::int64_t>(selection.offsets.size()) - 1;
  const auto keys = kt::testing::random_tensor<kt::half, 4>({heads / small_shape.kv_heads, small_shape.kv_heads, tokens, 64}, 41);
  const auto values = kt::testing::random_tensor<kt::half, 4>({heads / small_shape.kv_heads, small_shape.kv_heads, tokens, 64}, 42);
  kt::compact_args args;
  args.start_position = start;
  const std::string message = cpu_error([&] {
    kt::implementation<Layout, kt::backend::cpu>::compact(
        cpu.view(), keys.cview(), values.cview(),
        kt::selection_view<kt::host_space>{selection.offsets.data(), selection.tokens.data(), heads}, args, {});
  });
  if (cpu_message != nullptr) *cpu_message = message;
  device_tensor<kt::half, 4> device_keys(keys), device_values(values);
  device_buffer<std::int64_t> offsets(selection.offsets);
  device_buffer<std::int32_t> tokens_buffer(selection.tokens);
  kt::implementation<Layout, kt::backend::cuda>::compact(
      gpu.view(), kt::detail::as_const(device_keys.view), kt::detail::as_const(device_values.view),
      kt::selection_view<kt::device_space>{offsets.data(), tokens_buffer.data(), heads}, args, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
}

TEST(LayoutsCuda, PagedCompactBeyondThePoolIsRefusedIntact) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::layout::paged::pool_size pool{11, 16};
  auto cpu = paged_cpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  auto gpu = paged_gpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  compact_both<kt::layout::paged>(cpu, gpu, ragged_selection(4, 40, 1, {10, 3, 17, 0}), 40, 0, nullptr);
  expect_matches(gpu, cpu.view(), nullptr);
  // 3 + 3 + 3 + 3 = 12 pages of 16 for 33 tokens per head: one more than the pool.
  const host_selection big = ragged_selection(4, 40, 2, {33});
  std::string message;
  expect_refused_intact(gpu, nullptr, cpu_error([&] {
    const auto keys = kt::testing::random_tensor<kt::half, 4>({2, 2, 40, 64}, 1);
    kt::implementation<kt::layout::paged, kt::backend::cpu>::compact(
        cpu.view(), keys.cview(), keys.cview(), kt::selection_view<kt::host_space>{big.offsets.data(), big.tokens.data(), 4}, {}, {});
  }), [&] { compact_both<kt::layout::paged>(cpu, gpu, big, 40, 0, nullptr, &message); });
  expect_matches(gpu, cpu.view(), nullptr);  // both kept their first compaction
}

TEST(LayoutsCuda, PagedAppendWithOneHeadShortOfAPageIsRefusedIntact) {
  KVTRIM_SKIP_WITHOUT_GPU();
  // Head 0's last page is full (16 tokens), the others have room; the pool has
  // exactly the 4 pages compaction takes, so one token for every head needs a
  // fifth page — for one head of four.
  const kt::layout::paged::pool_size pool{4, 16};
  auto cpu = paged_cpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  auto gpu = paged_gpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  compact_both<kt::layout::paged>(cpu, gpu, ragged_selection(4, 20, 3, {16, 5, 7, 9}), 20, 0, nullptr);
  const token_batch<kt::half> batch(2, 2, 1, 64, 7);
  const std::string message = cpu_error([&] { paged_cpu::append(cpu.view(), batch.keys.cview(), batch.values.cview()); });
  expect_refused_intact(gpu, nullptr, message,
                        [&] { paged_gpu::append(gpu.view(), batch.device_keys.view, batch.device_values.view, nullptr); });
  expect_matches(gpu, cpu.view(), nullptr);
  // Head (0, 1) has room: the next call succeeds on both.
  paged_cpu::append_head(cpu.view(), 0, 1, head_rows(batch.keys.cview(), 0, 1), head_rows(batch.values.cview(), 0, 1));
  paged_gpu::append_head(gpu.view(), 0, 1, head_rows(batch.device_keys.view, 0, 1), head_rows(batch.device_values.view, 0, 1), nullptr);
  expect_matches(gpu, cpu.view(), nullptr);
  // append_head to the full head: refused as well.
  const std::string one_head = cpu_error([&] {
    paged_cpu::append_head(cpu.view(), 0, 0, head_rows(batch.keys.cview(), 0, 0), head_rows(batch.values.cview(), 0, 0));
  });
  expect_refused_intact(gpu, nullptr, one_head, [&] {
    paged_gpu::append_head(gpu.view(), 0, 0, head_rows(batch.device_keys.view, 0, 0), head_rows(batch.device_values.view, 0, 0), nullptr);
  });
}

TEST(LayoutsCuda, FlatBeyondTheBufferIsRefusedIntact) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::layout::flat::pool_size pool{3 + 5 + 0 + 8 + 1};
  auto cpu = flat_cpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  auto gpu = flat_gpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  compact_both<kt::layout::flat>(cpu, gpu, ragged_selection(4, 20, 4, {3, 5, 0, 8}), 20, 0, nullptr);
  expect_matches(gpu, cpu.view(), nullptr);
  // One free slot: a token for every head does not fit ...
  const token_batch<kt::half> batch(2, 2, 1, 64, 9);
  const std::string message = cpu_error([&] { flat_cpu::append(cpu.view(), batch.keys.cview(), batch.values.cview()); });
  expect_refused_intact(gpu, nullptr, message,
                        [&] { flat_gpu::append(gpu.view(), batch.device_keys.view, batch.device_values.view, nullptr); });
  // ... one for the empty head (1, 0) does (after a repack: its region is empty).
  flat_cpu::append_head(cpu.view(), 1, 0, head_rows(batch.keys.cview(), 1, 0), head_rows(batch.values.cview(), 1, 0));
  flat_gpu::append_head(gpu.view(), 1, 0, head_rows(batch.device_keys.view, 1, 0), head_rows(batch.device_values.view, 1, 0), nullptr);
  expect_matches(gpu, cpu.view(), nullptr);
  // A selection of 18 tokens into 17 slots.
  std::string cpu_message;
  const host_selection big = ragged_selection(4, 20, 5, {3, 5, 2, 8});
  expect_refused_intact(gpu, nullptr, cpu_error([&] {
    const auto keys = kt::testing::random_tensor<kt::half, 4>({2, 2, 20, 64}, 1);
    kt::implementation<kt::layout::flat, kt::backend::cpu>::compact(
        cpu.view(), keys.cview(), keys.cview(), kt::selection_view<kt::host_space>{big.offsets.data(), big.tokens.data(), 4}, {}, {});
  }), [&] { compact_both<kt::layout::flat>(cpu, gpu, big, 20, 0, nullptr, &cpu_message); });
  expect_matches(gpu, cpu.view(), nullptr);
}

TEST(LayoutsCuda, PositionsPast32BitsAreRefusedIntact) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const std::int64_t start = kt::detail::position_table::max_position - 20 + 1;  // next position 2^31 after 20 tokens
  {
    auto cpu = paged_cpu::make_cache(small_shape, std::int64_t{2}, kt::layout::paged::pool_size{8, 16}, kt::codec::fp16::config{});
    auto gpu = paged_gpu::make_cache(small_shape, std::int64_t{2}, kt::layout::paged::pool_size{8, 16}, kt::codec::fp16::config{});
    compact_both<kt::layout::paged>(cpu, gpu, ragged_selection(4, 20, 6, {4}), 20, start, nullptr);
    expect_matches(gpu, cpu.view(), nullptr);
    const token_batch<kt::half> batch(2, 2, 1, 64, 11);
    const std::string message = cpu_error([&] { paged_cpu::append(cpu.view(), batch.keys.cview(), batch.values.cview()); });
    expect_refused_intact(gpu, nullptr, message,
                          [&] { paged_gpu::append(gpu.view(), batch.device_keys.view, batch.device_values.view, nullptr); });
  }
  {
    auto cpu = flat_cpu::make_cache(small_shape, std::int64_t{2}, kt::layout::flat::pool_size{40}, kt::codec::fp16::config{});
    auto gpu = flat_gpu::make_cache(small_shape, std::int64_t{2}, kt::layout::flat::pool_size{40}, kt::codec::fp16::config{});
    compact_both<kt::layout::flat>(cpu, gpu, ragged_selection(4, 20, 6, {4}), 20, start, nullptr);
    const token_batch<kt::half> batch(2, 2, 1, 64, 11);
    const std::string message = cpu_error([&] { flat_cpu::append(cpu.view(), batch.keys.cview(), batch.values.cview()); });
    expect_refused_intact(gpu, nullptr, message,
                          [&] { flat_gpu::append(gpu.view(), batch.device_keys.view, batch.device_values.view, nullptr); });
  }
}

/// One append captured in a CUDA graph, replayed across page boundaries and
/// past the pool's end: the planning kernel decides everything on the device.
TEST(LayoutsCuda, AppendsReplayFromACudaGraph) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::layout::paged::pool_size pool{4 + 4, 16};  // 4 pages after compaction, 4 more: 16 more tokens per head
  auto cpu = paged_cpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  auto gpu = paged_gpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  compact_both<kt::layout::paged>(cpu, gpu, ragged_selection(4, 20, 8, {14, 16, 1, 9}), 20, 0, stream);
  const token_batch<kt::half> batch(2, 2, 1, 64, 13);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  paged_gpu::append_unchecked(gpu.view(), batch.device_keys.view, batch.device_values.view, stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  std::string message;
  for (int step = 0; step < 20; ++step) {  // pages run out at step 16 (head 2, 1 + 16 tokens); head 1 needs one more at 17
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    if (message.empty()) message = cpu_error([&] { paged_cpu::append(cpu.view(), batch.keys.cview(), batch.values.cview()); });
  }
  ASSERT_FALSE(message.empty()) << "the pool was meant to run dry";
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  try {
    kt::check_status(gpu.view(), stream);
    FAIL() << "check_status did not throw; expected: " << message;
  } catch (const kt::error& e) {
    EXPECT_EQ(std::string(e.what()), message);  // the first failure is the one kept
  }
  expect_matches(gpu, cpu.view(), stream);  // later replays were refused too: the CPU stopped at its first error
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

/// One append_head captured in a CUDA graph and replayed: the planning block
/// decides on the device when to repack (a cooperative launch inside the
/// graph) and, once the buffer is full, refuses.
TEST(LayoutsCuda, FlatAppendHeadRepacksFromACudaGraph) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::layout::flat::pool_size pool{5 + 3 + 0 + 7 + 12};  // 12 free slots, 3 per head after compaction
  auto cpu = flat_cpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  auto gpu = flat_gpu::make_cache(small_shape, std::int64_t{2}, pool, kt::codec::fp16::config{});
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  compact_both<kt::layout::flat>(cpu, gpu, ragged_selection(4, 20, 9, {5, 3, 0, 7}), 20, 0, stream);
  const token_batch<kt::half> batch(2, 2, 2, 64, 15);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  flat_gpu::append_head(gpu.view(), 0, 0, head_rows(batch.device_keys.view, 0, 0), head_rows(batch.device_values.view, 0, 0),
                        stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  std::string message;
  for (int step = 0; step < 8; ++step) {  // repacks from the second call; the 12 free slots are spent after six
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    if (message.empty())
      message = cpu_error([&] {
        flat_cpu::append_head(cpu.view(), 0, 0, head_rows(batch.keys.cview(), 0, 0), head_rows(batch.values.cview(), 0, 0));
      });
  }
  ASSERT_FALSE(message.empty()) << "the buffer was meant to fill";
  EXPECT_GE(*cpu.view().repacks, 2);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  try {
    kt::check_status(gpu.view(), stream);
    FAIL() << "check_status did not throw; expected: " << message;
  } catch (const kt::error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
  expect_matches(gpu, cpu.view(), stream);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
