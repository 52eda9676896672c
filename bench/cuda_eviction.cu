// One decode-time eviction step on the GPU (issue 16): kvtrim::evict<backend::cuda> over
// workload W's sequences (batch 8, 8 kv heads) across 32 layers of paged fp16 caches, in the
// cross-layer, per-layer and per-head scopes. Its own program, apart from the decode
// benchmark, so a change to the step builds in seconds (it instantiates no attention kernel).
//
// Reports the bytes any step must read (each token's metric and position, 8 bytes) per
// second and that rate as a fraction of a device-to-device copy measured in the same run.
//   bench_cuda_eviction --benchmark_counters_tabular=true
#include <kvtrim/cuda.cuh>

#include <benchmark/benchmark.h>

#include "cuda_common.cuh"

#include <cstdint>
#include <vector>

namespace kt = kvtrim;
using kvtrim_bench::check;
using kvtrim_bench::device_copy;
using kvtrim_bench::fill_random;
using kvtrim_bench::measured_copy_bandwidth;
using kvtrim_bench::scattered_pages;

BENCHMARK(device_copy)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);

namespace {

__global__ void fill_metric(float* data, std::int64_t count, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15, x *= 2246822519u, x ^= x >> 13, x *= 3266489917u, x ^= x >> 16;
    data[i] = static_cast<float>(x) * 2.3283064e-10f;  // [0, 1): ties are rare, as with real metrics
  }
}

/// W's sequences over `layers` paged fp16 caches (pages of 16, scattered), every head
/// `tokens` long, positions 0 … tokens − 1, a random metric; one eviction step with
/// keep = tokens (a step keeps keep − interval = tokens − 16 per head on average: the
/// steady state of evicting every 16 decode steps). The caches' tables, positions and
/// metrics are restored before each repetition (untimed; the K/V rows the step moves
/// are not, their bytes do not change its work). Bytes counted: what any step must
/// read — the metric and the position of every token (8 bytes a token); the rows it
/// moves are a few per head (the report's evicted_tokens per layer).
void eviction_step(benchmark::State& state) {
  using view_type = kt::layout::paged::view<kt::codec::fp16, kt::device_space>;
  const std::int64_t batch = state.range(0), tokens = state.range(1), layers = state.range(5), page = 16;
  const auto scope = static_cast<kt::eviction::scope>(state.range(6));
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  const std::int64_t heads = batch * shape.kv_heads, pages_per_head = (tokens + page - 1) / page;
  const kt::layout::paged::pool_size pool{heads * pages_per_head, page};
  const std::size_t bytes = view_type::bytes(shape, batch, pool);
  const scattered_pages tables(heads, tokens, page);
  const std::int64_t slots = pool.pages * page;

  std::vector<void*> memory(static_cast<std::size_t>(layers)), saved(static_cast<std::size_t>(layers));
  std::vector<float*> metric(static_cast<std::size_t>(layers)), saved_metric(static_cast<std::size_t>(layers));
  std::vector<view_type> views;
  std::vector<kt::eviction::metric_output<kt::device_space>> outputs;
  std::size_t tables_offset = 0;
  for (std::int64_t l = 0; l < layers; ++l) {
    check(cudaMalloc(&memory[l], bytes), "cudaMalloc(cache)");
    const view_type view = view_type::bind(memory[l], shape, batch, pool);
    tables.upload(view);
    fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(view.storage.keys), slots * shape.head_dim, 1 + 3 * l);
    fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(view.storage.values), slots * shape.head_dim, 2 + 3 * l);
    check(cudaMalloc(&metric[l], slots * sizeof(float)), "cudaMalloc(metric)");
    check(cudaMalloc(&saved_metric[l], slots * sizeof(float)), "cudaMalloc(metric copy)");
    fill_metric<<<1024, 256>>>(saved_metric[l], slots, 5 + 7 * l);
    // The tables (page tables, free list, compensation, positions) follow the storage: one copy restores them.
    tables_offset = static_cast<std::size_t>(reinterpret_cast<std::byte*>(view.indptr) - static_cast<std::byte*>(memory[l]));
    check(cudaMalloc(&saved[l], bytes - tables_offset), "cudaMalloc(tables copy)");
    check(cudaMemcpy(saved[l], static_cast<std::byte*>(memory[l]) + tables_offset, bytes - tables_offset,
                     cudaMemcpyDeviceToDevice),
          "save tables");
    views.push_back(view);
    outputs.push_back({metric[l], slots});
  }
  const kt::eviction::config cfg{.scope = scope, .keep = tokens, .interval = 16};
  const std::size_t scratch_bytes = kt::evict_workspace<kt::backend::cuda>(std::span<const view_type>(views));
  void* scratch = nullptr;
  kt::eviction::report* report = nullptr;
  check(cudaMalloc(&scratch, scratch_bytes), "cudaMalloc(scratch)");
  check(cudaMalloc(&report, sizeof(kt::eviction::report)), "cudaMalloc(report)");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const auto restore = [&] {
    for (std::int64_t l = 0; l < layers; ++l) {
      check(cudaMemcpyAsync(static_cast<std::byte*>(memory[l]) + tables_offset, saved[l], bytes - tables_offset,
                            cudaMemcpyDeviceToDevice, stream),
            "restore tables");
      check(cudaMemcpyAsync(metric[l], saved_metric[l], slots * sizeof(float), cudaMemcpyDeviceToDevice, stream),
            "restore metric");
    }
  };
  const auto step = [&] {
    kt::evict<kt::backend::cuda>(std::span<const view_type>(views),
                                 std::span<const kt::eviction::metric_output<kt::device_space>>(outputs), cfg,
                                 {scratch, scratch_bytes}, stream, report);
  };
  // restore() before each timed step (untimed): every step evicts from the same caches.
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(state, stream, step, restore);
  kt::eviction::report host_report{};
  check(cudaMemcpy(&host_report, report, sizeof host_report, cudaMemcpyDeviceToHost), "report");
  const double read_bytes = 8.0 * static_cast<double>(layers * heads * tokens);
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(read_bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["metric_position_TBps"] = read_bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = read_bytes / median / measured_copy_bandwidth;
  state.counters["evicted_tokens"] = static_cast<double>(host_report.evicted_tokens);
  state.counters["freed_pages"] = static_cast<double>(host_report.freed_pages);
  for (std::int64_t l = 0; l < layers; ++l) cudaFree(memory[l]), cudaFree(saved[l]), cudaFree(metric[l]), cudaFree(saved_metric[l]);
  cudaFree(scratch), cudaFree(report);
  cudaStreamDestroy(stream);
}

}  // namespace

// W (batch 8, 32 q heads, 8 kv heads, head dim 128, 32k tokens) over 32 layers: the issue's
// goal is ≤ 2 ms for one step; scopes cross_layer (2), per_layer (1), per_head (0).
BENCHMARK(eviction_step)
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "layers", "scope"})
    ->Args({8, 32768, 32, 8, 128, 32, 2})
    ->Args({8, 32768, 32, 8, 128, 32, 1})
    ->Args({8, 32768, 32, 8, 128, 32, 0})
    ->Args({8, 4096, 32, 8, 128, 32, 2})
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
