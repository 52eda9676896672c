// layout::shared_paged on backend::cuda (issue 11 b): an engine's head-shared page
// tensor (FlashInfer / vLLM [pages, 2, page, kv_heads, D] NHD and [pages, 2, kv_heads,
// page, D] HND) bound with bind_pages, no copy. The CUDA scheme's compress and
// append must write the CPU's bytes into the tensor and the CPU's tables; decode
// attention over the device-built cache must match the CPU's over the host cache
// (one and several queries); a refused call (NaN/Inf, pool exhausted) must leave
// the tensor and the tables as they were. Kept apart from decode_test.cu so that
// this layout's instantiations compile in their own (small) translation unit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;
using kt::testing::host_block;

namespace {

// layout::shared_paged (issue 11 b): an engine's head-shared page tensor, NHD and HND, bound with bind_pages.
// The CPU scheme and the CUDA scheme each compress (StreamingLLM) and append into their own tensor and
// tables: the device's bytes must equal the CPU's; then CUDA decode (one and several queries) over the
// device-built cache against the CPU's over the host cache, within the bound above (16-bit storage read
// exactly; the tensor cores or the CUDA cores as in decode_test.cu).
struct shared_paged_case {
  kt::layout::shared_paged::order order;
  std::int64_t batch, kv_heads, group, head_dim, page_size, tokens, keep, appended, queries;
};

class SharedPagedDecode : public ::testing::TestWithParam<shared_paged_case> {};

TEST_P(SharedPagedDecode, MatchesCpuReference) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using element = kt::half;
  using codec = kt::codec::plain<element>;
  using scheme = kt::scheme<kt::layout::shared_paged, kt::score::static_window, kt::budget::uniform, codec,
                            kt::backend::cpu>;
  using host_view = kt::layout::shared_paged::view<codec, kt::host_space>;
  using device_view = kt::layout::shared_paged::view<codec, kt::device_space>;
  const shared_paged_case& c = GetParam();
  const kt::model_shape shape{.q_heads = c.kv_heads * c.group, .kv_heads = c.kv_heads, .head_dim = c.head_dim};
  const std::int64_t held = c.keep + c.appended;
  const kt::layout::shared_paged::pool_size pool{
      c.batch * kt::layout::shared_paged::pages_for(held, c.page_size) + 2, c.page_size, c.order};
  const std::size_t tensor_elements = static_cast<std::size_t>(2 * pool.pages * c.page_size * c.kv_heads * c.head_dim);
  // Zeros, as the device tensor below: Eigen::half's default constructor leaves its bits unset under
  // nvcc, so the rows no token occupies would hold whatever the heap held.
  std::vector<element> tensor(tensor_elements, kt::from_float<element>(0.0f));
  host_block metadata(host_view::metadata_bytes(shape, c.batch, pool));
  host_view view = host_view::bind_pages(tensor.data(), metadata.data, shape, c.batch, pool);

  auto keys = kt::testing::random_tensor<element, 4>({c.batch, c.kv_heads, c.tokens + c.appended, c.head_dim}, 301);
  auto values = kt::testing::random_tensor<element, 4>({c.batch, c.kv_heads, c.tokens + c.appended, c.head_dim}, 302);
  const auto part = [&](const auto& x, std::int64_t first, std::int64_t count) {
    auto v = x.cview();
    v.data += first * v.strides[2];
    v.extents[2] = count;
    return v;
  };
  scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{c.keep};
  std::vector<std::byte> compress_scratch(scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
  scheme::compress(part(keys, 0, c.tokens), part(values, 0, c.tokens), view, cfg,
                   {compress_scratch.data(), compress_scratch.size()});
  if (c.appended > 0)
    scheme::append(view, part(keys, c.tokens, c.appended), part(values, c.tokens, c.appended));
  auto queries = kt::testing::random_tensor<element, 4>({c.batch, c.queries, shape.q_heads, c.head_dim}, 303, 2.0f);
  auto cpu_out = kt::testing::make_tensor<float, 4>({c.batch, c.queries, shape.q_heads, c.head_dim});
  scheme::attend(queries.cview(), view, cpu_out.view, {});

  // The same calls on the device (compress and append by the CUDA scheme, into a zeroed device tensor and
  // freshly reset tables): the tensor and the tables must come out byte for byte as the CPU wrote them.
  using cuda_scheme = kt::scheme<kt::layout::shared_paged, kt::score::static_window, kt::budget::uniform, codec,
                                 kt::backend::cuda>;
  const std::size_t metadata_bytes = host_view::metadata_bytes(shape, c.batch, pool);
  device_buffer<element> device_tensor(tensor_elements);
  device_buffer<std::byte> device_metadata(metadata_bytes);
  kt::testing::check(cudaMemset(device_tensor.data(), 0, tensor_elements * sizeof(element)), "cudaMemset");
  device_view gpu_view = device_view::bind_pages(device_tensor.data(), device_metadata.data(), shape, c.batch, pool);
  kt::implementation<kt::layout::shared_paged, kt::backend::cuda>::reset(gpu_view);
  {
    kt::testing::device_tensor<element, 4> device_keys(keys), device_values(values);
    const auto device_part = [&](const kt::testing::device_tensor<element, 4>& x, std::int64_t first,
                                 std::int64_t count) {
      kt::tensor_view<const element, 4, kt::device_space> v{x.view.data + first * x.view.strides[2], x.view.extents,
                                                            x.view.strides};
      v.extents[2] = count;
      return v;
    };
    device_buffer<std::byte> device_scratch(cuda_scheme::compress_workspace(shape, c.batch, c.tokens, cfg));
    cuda_scheme::compress(device_part(device_keys, 0, c.tokens), device_part(device_values, 0, c.tokens), gpu_view, cfg,
                          {device_scratch.data(), device_scratch.size()});
    if (c.appended > 0)
      cuda_scheme::append(gpu_view, device_part(device_keys, c.tokens, c.appended),
                          device_part(device_values, c.tokens, c.appended));
    kt::check_status(gpu_view, nullptr);
  }
  {
    const std::vector<std::byte> got_tensor =
        kt::testing::download_bytes(device_tensor.data(), tensor_elements * sizeof(element));
    EXPECT_EQ(std::memcmp(got_tensor.data(), tensor.data(), got_tensor.size()), 0)
        << "the engine's tensor as the device wrote it differs from the CPU's";
    const std::vector<std::byte> got = kt::testing::download_bytes(device_metadata.data(), metadata_bytes);
    const auto* base = static_cast<const std::byte*>(metadata.data);
    const auto same = [&](const void* host_pointer, std::size_t bytes, const char* what) {
      const std::size_t offset = static_cast<std::size_t>(static_cast<const std::byte*>(host_pointer) - base);
      EXPECT_EQ(std::memcmp(got.data() + offset, host_pointer, bytes), 0) << what;
    };
    same(view.indptr, (c.batch + 1) * 4, "indptr");
    same(view.indices, pool.pages * 4, "indices");
    same(view.last_page_len, c.batch * 4, "last_page_len");
    same(view.free_pages, pool.pages * 4, "free_pages");
    same(view.free_count, 4, "free_count");
    same(view.positions.next_position, view.heads() * 8, "next_position");
    for (std::int64_t b = 0; b < c.batch; ++b)  // positions of the rows the cache holds (the others are never written)
      for (std::int64_t h = 0; h < c.kv_heads; ++h)
        for (std::int64_t i = 0; i < held; ++i) same(view.positions.slot_position + view.slot(b, h, i), 4, "slot_position");
  }
  kt::layout::shared_paged::check("decode_test", gpu_view);
  kt::testing::device_tensor<element, 4> device_queries(queries);
  const std::array<std::int64_t, 4> extents{c.batch, c.queries, shape.q_heads, c.head_dim};
  device_buffer<float> device_out(static_cast<std::size_t>(c.batch * c.queries * shape.q_heads * c.head_dim));
  device_out.fill_bytes(0xff);
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
  device_buffer<std::byte> scratch(attention::workspace_bytes(gpu_view, c.queries));
  const kt::tensor_view<const element, 4, kt::device_space> query_view{device_queries.view.data,
                                                                      device_queries.view.extents,
                                                                      device_queries.view.strides};
  attention::attend(query_view, gpu_view, kt::make_view<kt::device_space>(device_out.data(), extents),
                    {scratch.data(), scratch.size()}, nullptr);
  kt::testing::check(cudaDeviceSynchronize(), "attend");
  const std::vector<float> gpu_out = device_out.download();

  // decode_test's bound over the tokens query t sees (its kept tokens, then the appended ones).
  std::vector<std::int64_t> kept = kt::testing::streaming_kept(c.tokens, 4, c.keep);
  for (std::int64_t a = 0; a < c.appended; ++a) kept.push_back(c.tokens + a);
  const double u = kt::element_traits<float>::unit_roundoff, u_s = kt::element_traits<element>::unit_roundoff;
  const bool tensor_cores = c.group >= 4 || c.queries > 1;
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t t = 0; t < c.queries; ++t)
      for (std::int64_t j = 0; j < shape.q_heads; ++j) {
        const std::int64_t h = j / c.group, n = held - c.queries + 1 + t;
        double largest_logit = 0.0, largest_value = 0.0;
        for (std::int64_t i = 0; i < n; ++i) {
          double magnitude = 0.0;
          for (std::int64_t d = 0; d < c.head_dim; ++d) {
            magnitude += std::abs(static_cast<double>(kt::to_float(queries(b, t, j, d))) *
                                  static_cast<double>(kt::to_float(keys(b, h, kept[i], d))));
            largest_value = std::max(largest_value, std::abs(static_cast<double>(kt::to_float(values(b, h, kept[i], d)))));
          }
          largest_logit = std::max(largest_logit, magnitude / std::sqrt(static_cast<double>(c.head_dim)));
        }
        const double logit_error = (static_cast<double>(c.head_dim) + 8.0) * u * largest_logit;
        const double tolerance = 2.0 * std::expm1(2.0 * logit_error + 4.0 * u) * largest_value +
                                 (16.0 * std::sqrt(static_cast<double>(n) + 1.0) + 8.0) * u * largest_value +
                                 (tensor_cores ? u_s * largest_value : 0.0);
        for (std::int64_t d = 0; d < c.head_dim; ++d) {
          const float got = gpu_out[static_cast<std::size_t>(((b * c.queries + t) * shape.q_heads + j) * c.head_dim + d)];
          ASSERT_LE(std::abs(static_cast<double>(got) - cpu_out.view(b, t, j, d)), tolerance)
              << "sequence " << b << ", query " << t << ", q head " << j << ", dim " << d;
        }
      }
}

INSTANTIATE_TEST_SUITE_P(
    Engines, SharedPagedDecode,
    ::testing::Values(shared_paged_case{kt::layout::shared_paged::order::nhd, 2, 8, 4, 128, 16, 5000, 1200, 3, 1},
                      shared_paged_case{kt::layout::shared_paged::order::hnd, 2, 8, 4, 128, 16, 5000, 1200, 3, 4},
                      shared_paged_case{kt::layout::shared_paged::order::nhd, 1, 2, 1, 64, 32, 700, 300, 8, 8},
                      shared_paged_case{kt::layout::shared_paged::order::hnd, 3, 1, 16, 256, 64, 400, 129, 1, 1},
                      shared_paged_case{kt::layout::shared_paged::order::nhd, 1, 4, 2, 64, 16, 40000, 32768, 0, 1}),
    [](const ::testing::TestParamInfo<shared_paged_case>& info) {
      const shared_paged_case& c = info.param;
      return kt::detail::cat(c.order == kt::layout::shared_paged::order::nhd ? "nhd" : "hnd", "_b", c.batch, "_kv",
                             c.kv_heads, "_g", c.group, "_d", c.head_dim, "_p", c.page_size, "_n", c.keep + c.appended,
                             "_q", c.queries);
    });

// A refused device call on an engine's tensor (issue 10's rule on layout::shared_paged): a NaN in
// a compress's keys and in an append's rows (the device's finiteness scan, refused by either
// planning kernel), a compaction that needs more pages than the pool and an append past the free
// pages (the planning kernels' checks) each write nothing — the engine's page tensor and kvtrim's
// tables keep every byte — and check_status throws the CPU's error. The cache then takes a valid
// append that needs new pages from the free list.
TEST(SharedPagedDecodeErrors, RefusedCallsLeaveTheEnginesTensorAsItWas) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using element = kt::half;
  using codec = kt::codec::plain<element>;
  using cuda_scheme = kt::scheme<kt::layout::shared_paged, kt::score::static_window, kt::budget::uniform, codec,
                                 kt::backend::cuda>;
  using device_view = kt::layout::shared_paged::view<codec, kt::device_space>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const std::int64_t batch = 2, tokens = 100, keep = 40, page_size = 16;
  // 8 pages: the compaction below takes 3 per sequence (40 tokens), leaving 2 free.
  const kt::layout::shared_paged::pool_size pool{8, page_size, kt::layout::shared_paged::order::hnd};
  const std::size_t tensor_elements =
      static_cast<std::size_t>(2 * pool.pages * page_size * shape.kv_heads * shape.head_dim);
  const std::size_t metadata_bytes = device_view::metadata_bytes(shape, batch, pool);
  device_buffer<element> tensor(tensor_elements);
  device_buffer<std::byte> metadata(metadata_bytes);
  kt::testing::check(cudaMemset(tensor.data(), 0, tensor_elements * sizeof(element)), "cudaMemset");
  device_view view = device_view::bind_pages(tensor.data(), metadata.data(), shape, batch, pool);
  kt::implementation<kt::layout::shared_paged, kt::backend::cuda>::reset(view);

  auto keys = kt::testing::random_tensor<element, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, 311);
  auto values = kt::testing::random_tensor<element, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, 312);
  kt::testing::device_tensor<element, 4> device_keys(keys), device_values(values);
  const auto part = [](const kt::testing::device_tensor<element, 4>& x, std::int64_t count) {
    kt::tensor_view<const element, 4, kt::device_space> v{x.view.data, x.view.extents, x.view.strides};
    v.extents[2] = count;
    return v;
  };
  cuda_scheme::config cfg, keep_80 = cfg;
  cfg.budget.keep = kt::keep_tokens{keep};
  keep_80.budget.keep = kt::keep_tokens{80};  // 5 pages per sequence: 10 of a pool of 8 (refused below)
  device_buffer<std::byte> scratch(std::max(cuda_scheme::compress_workspace(shape, batch, tokens, cfg),
                                            cuda_scheme::compress_workspace(shape, batch, tokens, keep_80)));
  const auto compress = [&](const kt::testing::device_tensor<element, 4>& k,
                            const kt::testing::device_tensor<element, 4>& v, const cuda_scheme::config& c) {
    cuda_scheme::compress(part(k, tokens), part(v, tokens), view, c, {scratch.data(), scratch.size()});
  };
  compress(device_keys, device_values, cfg);
  kt::check_status(view, nullptr);
  const std::vector<std::byte> tensor_before = kt::testing::download_bytes(tensor.data(), tensor_elements * sizeof(element));
  const std::vector<std::byte> metadata_before = kt::testing::download_bytes(metadata.data(), metadata_bytes);
  const auto expect_refused = [&](auto&& call, const char* function, const char* argument, const char* expected) {
    call();  // a device call does not throw: it records the failure and writes nothing
    try {
      kt::check_status(view, nullptr);
      ADD_FAILURE() << "expected check_status to throw naming " << argument;
    } catch (const kt::error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(function), std::string::npos) << what;
      EXPECT_NE(what.find(argument), std::string::npos) << what;
      EXPECT_NE(what.find(expected), std::string::npos) << what;
    }
    EXPECT_EQ(kt::testing::download_bytes(tensor.data(), tensor_elements * sizeof(element)), tensor_before)
        << "the refused call wrote into the engine's page tensor";
    // Tables, positions, free list as they were; the status words back to zero after check_status.
    EXPECT_EQ(kt::testing::download_bytes(metadata.data(), metadata_bytes), metadata_before)
        << "the refused call changed kvtrim's tables";
  };
  {  // compress: a NaN in sequence 1, kv head 1, token 70 of the keys (compaction's planning refuses)
    auto bad = kt::testing::random_tensor<element, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, 311);  // = keys
    bad(1, 1, 70, 5) = kt::from_float<element>(std::numeric_limits<float>::quiet_NaN());
    kt::testing::device_tensor<element, 4> device_bad(bad);
    expect_refused([&] { compress(device_bad, device_values, cfg); }, "kvtrim::scheme::compress", "keys",
                   "finite values");
  }
  {  // compress keeping 80 tokens: 5 pages per sequence, 10 of a pool of 8
    expect_refused([&] { compress(device_keys, device_values, keep_80); }, "kvtrim::layout::shared_paged::compact", "cache",
                   "pool exhausted");
  }
  {  // append: a NaN in sequence 1, kv head 1, token 2 of the appended rows (keys and values alike: keys are named)
    auto bad = kt::testing::random_tensor<element, 4>({batch, shape.kv_heads, 3, shape.head_dim}, 313);
    bad(1, 1, 2, 5) = kt::from_float<element>(std::numeric_limits<float>::quiet_NaN());
    kt::testing::device_tensor<element, 4> device_bad(bad);
    expect_refused([&] { cuda_scheme::append(view, part(device_bad, 3), part(device_bad, 3)); }, "kvtrim::scheme::append",
                   "new_keys", "finite values");
  }
  {  // append 60: 100 tokens are 7 pages per sequence, 8 more than the 2 free
    auto many = kt::testing::random_tensor<element, 4>({batch, shape.kv_heads, 60, shape.head_dim}, 314);
    kt::testing::device_tensor<element, 4> device_many(many);
    expect_refused([&] { cuda_scheme::append(view, part(device_many, 60), part(device_many, 60)); },
                   "kvtrim::layout::shared_paged::append", "cache", "pool exhausted");
  }
  // Still usable: 9 more tokens (49, one new page per sequence from the free list) are written.
  auto more = kt::testing::random_tensor<element, 4>({batch, shape.kv_heads, 9, shape.head_dim}, 315);
  kt::testing::device_tensor<element, 4> device_more(more);
  cuda_scheme::append(view, part(device_more, 9), part(device_more, 9));
  kt::check_status(view, nullptr);
  std::int32_t free_count = -1;
  std::vector<std::int32_t> last_page_len(batch), indptr(batch + 1);
  kt::testing::check(cudaMemcpy(&free_count, view.free_count, 4, cudaMemcpyDeviceToHost), "free_count");
  kt::testing::check(cudaMemcpy(last_page_len.data(), view.last_page_len, batch * 4, cudaMemcpyDeviceToHost), "last");
  kt::testing::check(cudaMemcpy(indptr.data(), view.indptr, (batch + 1) * 4, cudaMemcpyDeviceToHost), "indptr");
  EXPECT_EQ(free_count, 0);
  EXPECT_EQ(last_page_len, (std::vector<std::int32_t>{1, 1}));
  EXPECT_EQ(indptr, (std::vector<std::int32_t>{0, 4, 8}));
  // Token 48 of every head (the appended row 8) sits at row 0 of its sequence's new page, as the tables say.
  std::vector<std::int32_t> indices(8);
  kt::testing::check(cudaMemcpy(indices.data(), view.indices, 8 * 4, cudaMemcpyDeviceToHost), "indices");
  const std::vector<std::byte> after = kt::testing::download_bytes(tensor.data(), tensor_elements * sizeof(element));
  const auto* stored = reinterpret_cast<const element*>(after.data());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
      const std::int64_t page = indices[static_cast<std::size_t>(indptr[b] + 3)];
      const std::int64_t key_row = (page * 2 * shape.kv_heads + h) * page_size;  // HND, offset 0
      const std::int64_t value_row = key_row + shape.kv_heads * page_size;
      for (std::int64_t d = 0; d < shape.head_dim; ++d) {
        EXPECT_EQ(kt::to_float(stored[key_row * shape.head_dim + d]), kt::to_float(more(b, h, 8, d)));
        EXPECT_EQ(kt::to_float(stored[value_row * shape.head_dim + d]), kt::to_float(more(b, h, 8, d)));
      }
    }
}

}  // namespace
