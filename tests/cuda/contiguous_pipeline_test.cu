// The contiguous StreamingLLM pipeline on backend::cuda against the CPU
// reference (backend::cpu, the specification): identical kept tokens (the
// stored rows must match bit for bit: both backends copy the same fp16/bf16
// values), and decode-attention outputs within a stated tolerance.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>

#include "common/oracle.hpp"
#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;
using kt::testing::device_tensor;

namespace {

struct pipeline_case {  // printed by the name generator below
  std::int64_t batch, kv_heads, group, head_dim, tokens;
  kt::keep_amount keep;
  bool strided;  // inputs padded on every axis (non-contiguous views)
  std::int64_t appended;
  // Per-head windows L_h = 40 + 10·h longer than the budget: the kept set then
  // depends on them (protected window tokens tie at +∞, lower index first).
  bool per_head_windows = false;
};

std::string describe(const pipeline_case& c) {
  return kt::detail::cat("batch ", c.batch, " kv_heads ", c.kv_heads, " group ", c.group, " head_dim ", c.head_dim,
                         " tokens ", c.tokens, c.strided ? " strided" : " dense", " append ", c.appended);
}

template <class Element>
void run_case(const pipeline_case& c) {
  SCOPED_TRACE(describe(c));
  using codec = kt::codec::plain<Element>;
  using cpu_scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cpu>;
  using gpu_scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cuda>;
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::array<std::int64_t, 4> padding = c.strided ? std::array<std::int64_t, 4>{1, 1, 3, 8} : std::array<std::int64_t, 4>{};
  auto keys = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 11, 1.0f, padding);
  auto values = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, c.tokens, c.head_dim}, 12, 1.0f, padding);
  auto new_keys = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, std::max<std::int64_t>(c.appended, 1), c.head_dim}, 13);
  auto new_values = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, std::max<std::int64_t>(c.appended, 1), c.head_dim}, 14);
  auto queries = kt::testing::random_tensor<Element, 3>({c.batch, shape.q_heads, c.head_dim}, 15, 2.0f);

  typename cpu_scheme::config cfg;
  cfg.budget.keep = c.keep;
  if (c.per_head_windows)
    for (std::int64_t h = 0; h < c.kv_heads; ++h) cfg.score.windows.push_back(40 + 10 * h);
  const std::int64_t capacity = kt::budget::uniform::max_keep(cfg.budget, c.tokens) + c.appended;

  // CPU reference.
  auto cpu_cache = cpu_scheme::make_cache(shape, c.batch, capacity, typename codec::config{});
  std::vector<std::byte> cpu_scratch(cpu_scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
  cpu_scheme::compress(keys.cview(), values.cview(), cpu_cache.view(), cfg, {cpu_scratch.data(), cpu_scratch.size()});
  if (c.appended > 0) cpu_scheme::append(cpu_cache.view(), new_keys.cview(), new_values.cview());
  auto cpu_out = kt::testing::make_tensor<float, 3>({c.batch, shape.q_heads, c.head_dim});
  cpu_scheme::attend(queries.cview(), cpu_cache.view(), cpu_out.view, {});

  // CUDA.
  device_tensor<Element, 4> device_keys(keys), device_values(values), device_new_keys(new_keys), device_new_values(new_values);
  device_tensor<Element, 3> device_queries(queries);
  auto gpu_cache = gpu_scheme::make_cache(shape, c.batch, capacity, typename codec::config{});
  cudaMemset(gpu_cache.view().storage.keys, 0xff, gpu_cache.bytes());  // poison: NaN rows if something is not written
  device_buffer<std::byte> compress_scratch(gpu_scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  gpu_scheme::compress(device_keys.view, device_values.view, gpu_cache.view(), cfg,
                       {compress_scratch.data(), compress_scratch.size()}, stream);
  if (c.appended > 0) gpu_scheme::append(gpu_cache.view(), device_new_keys.view, device_new_values.view, stream);
  device_buffer<float> device_out(static_cast<std::size_t>(c.batch * shape.q_heads * c.head_dim));
  device_out.fill_bytes(0xff);
  device_buffer<std::byte> attend_scratch(gpu_scheme::attend_workspace(gpu_cache.view()));
  gpu_scheme::attend(device_queries.view, gpu_cache.view(),
                     kt::make_view<kt::device_space>(device_out.data(), std::array<std::int64_t, 3>{c.batch, shape.q_heads, c.head_dim}),
                     {attend_scratch.data(), attend_scratch.size()}, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);

  // Identical kept tokens: the stored rows are the same bits.
  ASSERT_EQ(*gpu_cache.view().length, *cpu_cache.view().length);
  const std::int64_t rows = c.batch * c.kv_heads * capacity;
  const std::int64_t used_bytes = *cpu_cache.view().length * c.head_dim * static_cast<std::int64_t>(sizeof(Element));
  const auto gpu_keys = kt::testing::download_bytes(gpu_cache.view().storage.keys, rows * c.head_dim * sizeof(Element));
  const auto gpu_values = kt::testing::download_bytes(gpu_cache.view().storage.values, rows * c.head_dim * sizeof(Element));
  for (std::int64_t head = 0; head < c.batch * c.kv_heads; ++head) {
    const std::int64_t offset = head * capacity * c.head_dim * static_cast<std::int64_t>(sizeof(Element));
    ASSERT_EQ(std::memcmp(gpu_keys.data() + offset, reinterpret_cast<const std::byte*>(cpu_cache.view().storage.keys) + offset, used_bytes), 0)
        << "keys of head " << head << " differ";
    ASSERT_EQ(std::memcmp(gpu_values.data() + offset, reinterpret_cast<const std::byte*>(cpu_cache.view().storage.values) + offset, used_bytes), 0)
        << "values of head " << head << " differ";
  }

  // Attention: both backends read the same stored values and accumulate in fp32.
  // The CUDA-core path differs from the reference only in summation order and
  // exp2 vs exp (a few fp32 ulps per term, growing like √n; outputs are convex
  // combinations of |v| ≲ 5): 2e-5 · (1 + √n / 32). The tensor-core path (GQA
  // groups ≥ 4) also rounds each attention weight p to the storage type for the
  // P·V product (FlashAttention's choice): |Σ δp·v| / Σ p ≤ u · max|v|, with u
  // the storage type's unit roundoff.
  const auto gpu_out = device_out.download();
  // Positions (docs/composition.md §1): every used slot's position and every head's next position equal the CPU's.
  {
    const auto gpu_positions =
        kt::testing::download_bytes(gpu_cache.view().positions.slot_position, rows * sizeof(std::int32_t));
    const auto gpu_next =
        kt::testing::download_bytes(gpu_cache.view().positions.next_position, c.batch * c.kv_heads * sizeof(std::int64_t));
    for (std::int64_t head = 0; head < c.batch * c.kv_heads; ++head) {
      const std::int64_t b = head / c.kv_heads, h = head % c.kv_heads;
      const std::vector<std::int32_t> expected = kt::head_positions(cpu_cache.view(), b, h);
      for (std::size_t i = 0; i < expected.size(); ++i) {
        std::int32_t got = 0;
        std::memcpy(&got, gpu_positions.data() + (head * capacity + static_cast<std::int64_t>(i)) * sizeof(std::int32_t),
                    sizeof(got));
        ASSERT_EQ(got, expected[i]) << "position of slot " << i << " of head " << head;
      }
      std::int64_t next = 0;
      std::memcpy(&next, gpu_next.data() + head * sizeof(std::int64_t), sizeof(next));
      ASSERT_EQ(next, kt::next_position(cpu_cache.view(), b, h)) << "next position of head " << head;
    }
  }

  const double length = static_cast<double>(*cpu_cache.view().length);
  double largest_value = 0.0;
  for (const auto& tensor : {&values, &new_values})
    kt::testing::for_each_index(tensor->view.extents, [&](auto... index) {
      largest_value = std::max(largest_value, std::abs(static_cast<double>(kt::to_float(tensor->view(index...)))));
    });
  const double weight_rounding = c.group >= 4 ? kt::element_traits<Element>::unit_roundoff * largest_value : 0.0;
  const double tolerance = 2e-5 * (1.0 + std::sqrt(length) / 32.0) + weight_rounding;
  double worst = 0.0;
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t j = 0; j < shape.q_heads; ++j)
      for (std::int64_t d = 0; d < c.head_dim; ++d) {
        const float got = gpu_out[static_cast<std::size_t>((b * shape.q_heads + j) * c.head_dim + d)];
        ASSERT_FALSE(std::isnan(got)) << "unwritten or NaN output at " << b << "," << j << "," << d;
        worst = std::max(worst, std::abs(static_cast<double>(got) - cpu_out.view(b, j, d)));
      }
  EXPECT_LE(worst, tolerance) << "max |cuda − cpu| over the outputs";
}

class ContiguousPipeline : public ::testing::TestWithParam<pipeline_case> {};

TEST_P(ContiguousPipeline, MatchesCpuReferenceFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::half>(GetParam());
}
TEST_P(ContiguousPipeline, MatchesCpuReferenceBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::bfloat16>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(
    AwkwardSizes, ContiguousPipeline,
    ::testing::Values(
        // one token; keep more than there is
        pipeline_case{1, 1, 1, 64, 1, kt::keep_tokens{16}, false, 0},
        pipeline_case{2, 2, 4, 128, 1, kt::keep_tokens{16}, true, 1},
        // 17 tokens, sinks + recent, GQA 1 / 4 / 8, both head dims, batch > 1
        pipeline_case{3, 2, 1, 64, 17, kt::keep_tokens{9}, false, 1},
        pipeline_case{2, 2, 4, 128, 17, kt::keep_tokens{9}, true, 5},
        pipeline_case{2, 1, 8, 128, 17, kt::keep_ratio{0.5}, false, 0},
        // 4097: not a multiple of any tile
        pipeline_case{2, 4, 4, 128, 4097, kt::keep_ratio{0.3}, false, 3},
        pipeline_case{1, 2, 8, 64, 4097, kt::keep_tokens{1024}, true, 1},
        pipeline_case{3, 2, 1, 128, 4097, kt::keep_ratio{1.0}, false, 0},
        // 32768: a long head split across many blocks
        pipeline_case{1, 2, 4, 128, 32768, kt::keep_ratio{1.0}, false, 1},
        pipeline_case{2, 1, 8, 64, 32768, kt::keep_ratio{0.25}, false, 0},
        pipeline_case{1, 1, 1, 128, 32768, kt::keep_tokens{4100}, true, 2},
        // per-head windows (static_window's RazorAttention/ALiBi extension)
        pipeline_case{2, 4, 2, 128, 4097, kt::keep_tokens{30}, false, 1, true},
        pipeline_case{1, 2, 4, 64, 50, kt::keep_tokens{45}, true, 0, true}),
    [](const ::testing::TestParamInfo<pipeline_case>& info) {
      const pipeline_case& c = info.param;
      return kt::detail::cat("b", c.batch, "_kv", c.kv_heads, "_g", c.group, "_d", c.head_dim, "_t", c.tokens,
                             c.strided ? "_strided" : "_dense", "_append", c.appended, c.per_head_windows ? "_windows" : "",
                             "_", info.index);
    });

TEST(ContiguousPipelineErrors, UnsupportedHeadDimNamesTheArgument) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using gpu_scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16, kt::backend::cuda>;
  const kt::model_shape shape{.q_heads = 2, .kv_heads = 1, .head_dim = 96};
  auto cache = gpu_scheme::make_cache(shape, std::int64_t{1}, std::int64_t{8}, kt::codec::fp16::config{});
  *cache.view().length = 4;
  device_buffer<kt::half> queries(2 * 96), out(2 * 96);
  const std::array<std::int64_t, 3> extents{1, 2, 96};
  try {
    gpu_scheme::attend(kt::make_view<kt::device_space>(queries.data(), extents), cache.view(),
                       kt::make_view<kt::device_space>(out.data(), extents), {}, nullptr);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("shape.head_dim"), std::string::npos) << e.what();
  }
}

TEST(ContiguousPipelineErrors, UnsupportedGroupSizeNamesTheArgument) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using gpu_scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16, kt::backend::cuda>;
  const kt::model_shape shape{.q_heads = 3, .kv_heads = 1, .head_dim = 64};
  auto cache = gpu_scheme::make_cache(shape, std::int64_t{1}, std::int64_t{8}, kt::codec::fp16::config{});
  *cache.view().length = 4;
  device_buffer<kt::half> queries(3 * 64), out(3 * 64);
  const std::array<std::int64_t, 3> extents{1, 3, 64};
  try {
    gpu_scheme::attend(kt::make_view<kt::device_space>(queries.data(), extents), cache.view(),
                       kt::make_view<kt::device_space>(out.data(), extents), {}, nullptr);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("group size"), std::string::npos) << e.what();
  }
}

}  // namespace
