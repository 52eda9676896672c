// An engine's life on both backends in lockstep (the CUDA side of
// tests/cpu/engine_life_test.cpp): two layers of paged or flat caches, a ragged
// prompt, then decode steps — one token a head appended (device encode), attention
// with the eviction metric, an eviction step every 8 steps in a rotating scope,
// speculative drafts rolled back (scheme::truncate) — each call made on a CPU cache
// and on a device copy of it. After every call the device cache's bytes (storage,
// positions, tables, free list: everything before its status words) equal the CPU
// cache's, and the attention outputs and metrics agree within the bounds below.
// The device metric is copied into the CPU's after each step, so both evict from
// the same numbers (the per-step metric agreement is eviction_test.cu's, with its
// derived bound; here a gross check catches a value written to another token's slot).
#include <gtest/gtest.h>

#include <kvtrim/backend/cpu/eviction.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/low_rank_bases.hpp"
#include "common/tensors.hpp"
#include "cuda/device_memory.cuh"

namespace {

namespace kt = kvtrim;
namespace ev = kvtrim::eviction;
using kt::testing::device_buffer;
using kt::testing::device_tensor;
using kt::testing::host_block;

constexpr std::int64_t layers = 2, batch = 2, kv_heads = 2, group = 2, head_dim = 64, page_size = 8;
constexpr std::int64_t heads = batch * kv_heads;
const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};

template <class Layout, class Codec>
struct life_case {
  using layout = Layout;
  using codec = Codec;
  using host_view = typename Layout::template view<Codec, kt::host_space>;
  using device_view = typename Layout::template view<Codec, kt::device_space>;
  static typename Codec::config config() {
    typename Codec::config cfg{};
    if constexpr (std::same_as<Codec, kt::codec::int8>) {
      cfg.key_group = 8;
    } else if constexpr (std::same_as<Codec, kt::codec::layered<kt::codec::int8>>) {
      cfg.inner.key_group = 8;
      cfg.recent = 6;
      cfg.sinks = 2;
    } else if constexpr (std::same_as<Codec, kt::codec::low_rank>) {
      // Calibrated bases (installed on the CPU before the prompt, copied with the block): the
      // device encodes their coefficients byte for byte as the CPU does. Sequence bases are not
      // compared here: the device fits and refreshes them with its own solver (low_rank_fit.cuh:
      // equal to rounding, not in bytes); eviction_test.cu evicts CPU-built sequence caches.
      cfg.source = kt::codec::basis_source::profile;
    }
    return cfg;
  }
  /// What a freshly bound CPU cache needs before its first append.
  static void prepare(const host_view& view, std::uint64_t seed) {
    if constexpr (std::same_as<Codec, kt::codec::low_rank>)
      kt::testing::install_random_bases(view.storage, heads, head_dim, seed);
    else
      (void)view, (void)seed;
  }
  static auto pool() {
    if constexpr (std::same_as<Layout, kt::layout::paged>)
      return kt::layout::paged::pool_size{heads * 14 + 6, page_size};
    else
      return kt::layout::flat::pool_size{heads * 160};
  }
  /// Attention outputs (values of magnitude ≲ 4) and per-step metric agreement: plain storage
  /// differs only in fp32 rounding (eviction_test.cu's bound: ~1e-4 relative at these sizes);
  /// quantized codes reach the tensor cores as fp16 (query × step rounded once: ≤ 2·u_h·S in the
  /// exponent, ~2e-2 relative with |logits| ≲ 10) — both bounds taken at 2.5× for the output.
  /// low_rank: both sides in fp32 from identical coefficients (codecs_test.cu's bound is far
  /// tighter), held here to the quantized codecs' gross bound.
  static constexpr double relative = kt::codec::is_plain<Codec> ? 1e-3 : 5e-2;
};

template <class C>
class EngineLifeCuda : public ::testing::Test {};
using cases = ::testing::Types<life_case<kt::layout::paged, kt::codec::fp16>, life_case<kt::layout::paged, kt::codec::int8>,
                               life_case<kt::layout::paged, kt::codec::fp8>,
                               life_case<kt::layout::paged, kt::codec::layered<kt::codec::int8>>,
                               life_case<kt::layout::paged, kt::codec::low_rank>,
                               life_case<kt::layout::flat, kt::codec::fp16>, life_case<kt::layout::flat, kt::codec::int8>,
                               life_case<kt::layout::flat, kt::codec::low_rank>>;
TYPED_TEST_SUITE(EngineLifeCuda, cases);

TYPED_TEST(EngineLifeCuda, DeviceCacheEqualsCpuCacheAfterEveryCall) {
  using C = TypeParam;
  using Layout = typename C::layout;
  using host_view = typename C::host_view;
  using device_view = typename C::device_view;
  using cpu = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, typename C::codec, kt::backend::cpu>;
  using gpu = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, typename C::codec, kt::backend::cuda>;
  KVTRIM_SKIP_WITHOUT_GPU();
  std::mt19937_64 random(20261205);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);

  const auto config = C::config();
  const std::size_t bytes = host_view::bytes(shape, batch, C::pool(), config);
  std::vector<std::unique_ptr<host_block>> blocks;
  std::vector<host_view> cpu_views;
  std::vector<std::unique_ptr<device_buffer<std::byte>>> device_blocks;
  std::vector<device_view> gpu_views;
  std::vector<std::vector<float>> cpu_metrics;
  std::vector<std::unique_ptr<device_buffer<float>>> gpu_metrics;
  std::vector<ev::metric_output<>> cpu_outputs;
  std::vector<ev::metric_output<kt::device_space>> gpu_outputs;
  const ev::config base{.keep = 28, .interval = 8, .sinks = 2, .protected_window = 3, .alpha = 0.5};

  // The prompt on the CPU (ragged heads, appended in rounds so pages interleave), then the device copies.
  for (std::int64_t l = 0; l < layers; ++l) {
    blocks.push_back(std::make_unique<host_block>(bytes));
    cpu_views.push_back(host_view::bind(blocks.back()->data, shape, batch, C::pool(), config));
    C::prepare(cpu_views.back(), 300 + static_cast<std::uint64_t>(l));
    auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, 40, head_dim}, 100 + l);
    auto values = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, 40, head_dim}, 200 + l);
    std::vector<std::int64_t> wanted(heads), done(heads, 0);
    for (auto& n : wanted) n = static_cast<std::int64_t>(random() % 40);
    for (bool more = true; more;) {
      more = false;
      for (std::int64_t head = 0; head < heads; ++head) {
        const std::int64_t count = std::min<std::int64_t>(7, wanted[head] - done[head]);
        if (count <= 0) continue;
        const std::int64_t b = head / kv_heads, h = head % kv_heads;
        const kt::tensor_view<const kt::half, 2> k{&keys(b, h, done[head], 0), {count, head_dim},
                                                   {keys.view.stride(2), keys.view.stride(3)}};
        const kt::tensor_view<const kt::half, 2> v{&values(b, h, done[head], 0), {count, head_dim},
                                                   {values.view.stride(2), values.view.stride(3)}};
        cpu::append_head(cpu_views.back(), b, h, k, v);
        done[head] += count;
        more = true;
      }
    }
    device_blocks.push_back(std::make_unique<device_buffer<std::byte>>(bytes));
    kt::testing::check(cudaMemcpy(device_blocks.back()->data(), blocks.back()->data, bytes, cudaMemcpyHostToDevice), "H2D");
    gpu_views.push_back(device_view::bind(device_blocks.back()->data(), shape, batch, C::pool(), config));
    const std::int64_t slots = kt::detail::storage_slots(cpu_views.back().storage);
    cpu_metrics.emplace_back(static_cast<std::size_t>(slots), 0.0f);
    gpu_metrics.push_back(std::make_unique<device_buffer<float>>(cpu_metrics.back()));
  }
  for (std::int64_t l = 0; l < layers; ++l) {
    const std::int64_t slots = static_cast<std::int64_t>(cpu_metrics[l].size());
    cpu_outputs.push_back({cpu_metrics[l].data(), slots, ev::metric_kind::squared_sum, base.protected_window});
    gpu_outputs.push_back({gpu_metrics[l]->data(), slots, ev::metric_kind::squared_sum, base.protected_window});
  }

  // Everything before the device view's status words, byte for byte.
  const auto expect_same = [&](const std::string& where) {
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << where;
    for (std::int64_t l = 0; l < layers; ++l) {
      const auto got = kt::testing::download_bytes(device_blocks[l]->data(), bytes);
      const std::size_t compared = static_cast<std::size_t>(reinterpret_cast<const std::byte*>(gpu_views[l].status) -
                                                            device_blocks[l]->data());
      std::size_t first = compared;
      for (std::size_t k = 0; k < compared && first == compared; ++k)
        if (got[k] != static_cast<const std::byte*>(blocks[l]->data)[k]) first = k;
      ASSERT_EQ(first, compared) << where << ": layer " << l << " differs from byte " << first << " of " << compared;
    }
  };
  expect_same("after the prompt");

  device_buffer<std::byte> evict_scratch(kt::evict_workspace<kt::backend::cuda>(std::span<const device_view>(gpu_views)));
  std::vector<std::byte> cpu_evict_scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const host_view>(cpu_views)));
  device_buffer<ev::report> gpu_report(1);
  const std::array<std::int64_t, 3> out_extents{batch, shape.q_heads, head_dim};
  int evictions = 0, rollbacks = 0;
  for (std::int64_t step = 1; step <= 40; ++step) {
    const std::string where = kt::detail::cat("step ", step);
    // One token a head, then attention with the metric, on both.
    for (std::int64_t l = 0; l < layers; ++l) {
      auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, 1, head_dim}, 1000 * step + 10 * l);
      auto values = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, 1, head_dim}, 1000 * step + 10 * l + 1);
      device_tensor<kt::half, 4> device_keys(keys), device_values(values);
      cpu::append(cpu_views[l], keys.cview(), values.cview());
      gpu::append(gpu_views[l], kt::detail::as_const(device_keys.view), kt::detail::as_const(device_values.view), stream);
      ASSERT_NO_THROW(kt::check_status(gpu_views[l], stream)) << where;

      auto queries = kt::testing::random_tensor<kt::half, 3>({batch, shape.q_heads, head_dim}, 5000 * step + l);
      device_tensor<kt::half, 3> device_queries(queries);
      auto cpu_out = kt::testing::make_tensor<float, 3>(out_extents);
      std::vector<std::byte> cpu_scratch(ev::attend_workspace(cpu_views[l], cpu_outputs[l]));
      ev::attend(queries.cview(), cpu_views[l], cpu_out.view, cpu_outputs[l],
                 kt::workspace{cpu_scratch.data(), cpu_scratch.size()});
      device_buffer<float> gpu_out(static_cast<std::size_t>(batch * shape.q_heads * head_dim));
      device_buffer<std::byte> scratch(ev::attend_workspace(gpu_views[l], gpu_outputs[l]));
      ev::attend(kt::detail::as_const(device_queries.view), gpu_views[l],
                 kt::make_view<kt::device_space>(gpu_out.data(), out_extents), gpu_outputs[l],
                 {scratch.data(), scratch.size()}, stream);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << where;
      const std::vector<float> out = gpu_out.download();
      for (std::size_t k = 0; k < out.size(); ++k)
        ASSERT_LE(std::abs(double(out[k]) - double(cpu_out.view.data[k])), 4.0 * 2.5 * C::relative)
            << where << ": layer " << l << " output element " << k;
      std::vector<float> metric = gpu_metrics[l]->download();
      for (std::size_t slot = 0; slot < metric.size(); ++slot) {
        const double want = cpu_metrics[l][slot], got = metric[slot];
        ASSERT_LE(std::abs(got - want), C::relative * std::abs(want) + 1e-7)
            << where << ": layer " << l << " metric of slot " << slot;
      }
      std::copy(metric.begin(), metric.end(), cpu_metrics[l].begin());  // lockstep: both evict from the device's
    }
    expect_same(where + ", after append and attend");

    if (ev::due(step, base)) {
      ev::config cfg = base;
      cfg.scope = std::array{ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}[(step / 8) % 3];
      const ev::report want = kt::evict<kt::backend::cpu>(std::span<const host_view>(cpu_views),
                                                          std::span<const ev::metric_output<>>(cpu_outputs), cfg,
                                                          kt::workspace{cpu_evict_scratch.data(), cpu_evict_scratch.size()});
      kt::evict<kt::backend::cuda>(std::span<const device_view>(gpu_views),
                                   std::span<const ev::metric_output<kt::device_space>>(gpu_outputs), cfg,
                                   {evict_scratch.data(), evict_scratch.size()}, stream, gpu_report.data());
      expect_same(where + kt::detail::cat(", after an eviction step (scope ", int(cfg.scope), ")"));
      const ev::report got = gpu_report.download()[0];
      EXPECT_EQ(got.evicted_tokens, want.evicted_tokens) << where;
      EXPECT_EQ(got.freed_pages, want.freed_pages) << where;
      evictions += want.evicted_tokens > 0;
      for (std::int64_t l = 0; l < layers; ++l) {
        const std::vector<float> metric = gpu_metrics[l]->download();
        ASSERT_EQ(0, std::memcmp(metric.data(), cpu_metrics[l].data(), metric.size() * sizeof(float)))
            << where << ": layer " << l << " metric after the eviction";
      }
    }

    if (step % 4 == 2) {  // speculative decoding: 1–3 drafts a sequence, then some of them rejected
      std::vector<std::int32_t> drop(batch);
      std::vector<std::int64_t> drafts(batch);
      for (std::int64_t b = 0; b < batch; ++b) {
        drafts[b] = 1 + static_cast<std::int64_t>(random() % 3);
        drop[b] = static_cast<std::int32_t>(random() % (drafts[b] + 1));
      }
      device_buffer<std::int32_t> device_drop(drop);
      for (std::int64_t l = 0; l < layers; ++l) {
        const std::int64_t most = *std::max_element(drafts.begin(), drafts.end());
        auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, most, head_dim}, 7000 * step + 10 * l);
        auto values = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, most, head_dim}, 7000 * step + 10 * l + 1);
        for (std::int64_t head = 0; head < heads; ++head) {  // ragged drafts: head by head on both
          const std::int64_t b = head / kv_heads, h = head % kv_heads, n = drafts[b];
          const kt::tensor_view<const kt::half, 2> k{&keys(b, h, 0, 0), {n, head_dim}, {keys.view.stride(2), keys.view.stride(3)}};
          const kt::tensor_view<const kt::half, 2> v{&values(b, h, 0, 0), {n, head_dim},
                                                     {values.view.stride(2), values.view.stride(3)}};
          cpu::append_head(cpu_views[l], b, h, k, v);
        }
        device_tensor<kt::half, 4> device_keys(keys), device_values(values);
        for (std::int64_t head = 0; head < heads; ++head) {
          const std::int64_t b = head / kv_heads, h = head % kv_heads, n = drafts[b];
          const kt::tensor_view<const kt::half, 2, kt::device_space> k{&device_keys.view(b, h, 0, 0), {n, head_dim},
                                                                      {device_keys.view.stride(2), device_keys.view.stride(3)}};
          const kt::tensor_view<const kt::half, 2, kt::device_space> v{
              &device_values.view(b, h, 0, 0), {n, head_dim}, {device_values.view.stride(2), device_values.view.stride(3)}};
          gpu::append_head(gpu_views[l], b, h, k, v, stream);
        }
        ASSERT_NO_THROW(kt::check_status(gpu_views[l], stream)) << where;
        std::string cpu_refusal, gpu_refusal;
        try {
          cpu::truncate(cpu_views[l], kt::tensor_view<const std::int32_t, 1>{drop.data(), {batch}, {1}});
        } catch (const kt::error& e) {
          cpu_refusal = e.what();
        }
        try {
          gpu::truncate(gpu_views[l], kt::tensor_view<const std::int32_t, 1, kt::device_space>{device_drop.data(), {batch}, {1}},
                        stream);
          ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
          kt::check_status(gpu_views[l], stream);
        } catch (const kt::error& e) {
          gpu_refusal = e.what();
        }
        ASSERT_EQ(gpu_refusal, cpu_refusal) << where << ": layer " << l;
        rollbacks += cpu_refusal.empty();
      }
      expect_same(where + ", after drafts and a rollback");
    }
  }
  EXPECT_GT(evictions, 2) << "the life must evict to test anything";
  EXPECT_GT(rollbacks, 0);
  cudaStreamDestroy(stream);
}

}  // namespace
