// The SnapKV scorer alone on the GPU (backend::cuda), and the whole SnapKV +
// uniform + contiguous fp16 compress around it, at the issue's workload W:
// batch 8, 32 query heads, 8 kv heads, head dim 128, fp16, 32k tokens, window 64.
//
// Reports, per call (median of CUDA-event timings, L2 flushed before each):
// bytes/s over the bytes the scorer must move at least (keys and window queries
// read once, scores written once; compress: + values read once and the kept 30%
// of keys and values written) and that rate as a fraction of a device-to-device
// copy measured in the same run; and the tensor-core work rate (the two passes
// each multiply every window query by every key: 2 · 2·B·Hq·w·T·D flops).
// The /given_lse rows hand the scorer the window queries' softmax normalisers, as an
// engine's prefill attention has them (config.lse; computed once before timing by
// kvtrim's own pass 1): pass 2 alone runs (one pass's flops).
//
//   bench_cuda_scorers --benchmark_format=json > scorers.json
#include <kvtrim/cuda.cuh>

#include <benchmark/benchmark.h>

#include "cuda_common.cuh"
#include "cuda_prefill_lse.cuh"

#include <algorithm>
#include <cstdio>
#include <optional>
#include <vector>

namespace kt = kvtrim;
using kvtrim_bench::check;
using kvtrim_bench::device_copy;
using kvtrim_bench::measured_copy_bandwidth;

namespace {

/// Deterministic pseudo-random fill (a hash of the index), values in [-1, 1) · scale.
template <int Unused>
__global__ void fill_random(__half* data, std::int64_t count, std::uint32_t seed, float scale) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15, x *= 2246822519u, x ^= x >> 13, x *= 3266489917u, x ^= x >> 16;
    data[i] = __float2half((static_cast<float>(x & 0xffff) / 32768.0f - 1.0f) * scale);
  }
}

struct workload {
  std::int64_t batch, tokens, window;
  kt::model_shape shape;
  __half *keys = nullptr, *values = nullptr, *queries = nullptr;

  explicit workload(const benchmark::State& state)
      : batch(state.range(0)), tokens(state.range(1)), window(state.range(5)),
        shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)} {
    check(cudaMalloc(&keys, key_elements() * sizeof(__half)), "cudaMalloc(keys)");
    check(cudaMalloc(&values, key_elements() * sizeof(__half)), "cudaMalloc(values)");
    check(cudaMalloc(&queries, query_elements() * sizeof(__half)), "cudaMalloc(queries)");
    fill_random<0><<<1024, 256>>>(keys, key_elements(), 1, 2.0f);
    fill_random<0><<<1024, 256>>>(values, key_elements(), 2, 1.0f);
    fill_random<0><<<1024, 256>>>(queries, query_elements(), 3, 2.0f);
    check(cudaDeviceSynchronize(), "fill");
  }
  ~workload() { cudaFree(keys), cudaFree(values), cudaFree(queries); }
  std::int64_t key_elements() const { return batch * shape.kv_heads * tokens * shape.head_dim; }
  std::int64_t query_elements() const { return batch * shape.q_heads * window * shape.head_dim; }
  kt::kv_view<const kt::half, kt::device_space> key_view(const __half* data) const {
    return kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(data),
                                           std::array<std::int64_t, 4>{batch, shape.kv_heads, tokens, shape.head_dim});
  }
  kt::window_view<const kt::half, kt::device_space> query_view() const {
    return kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(queries),
                                           std::array<std::int64_t, 4>{batch, shape.q_heads, window, shape.head_dim});
  }
  double flops() const {  // two passes, each 2·B·Hq·w·T·D
    return 2.0 * 2.0 * static_cast<double>(batch * shape.q_heads * window) * static_cast<double>(tokens) *
           static_cast<double>(shape.head_dim);
  }
};

template <class Run>
std::vector<double> time_calls(benchmark::State& state, cudaStream_t stream, Run&& run) {
  return kvtrim_bench::timed_seconds(state, stream, run);
}

void report(benchmark::State& state, double bytes, double median, double flops) {
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["moved_TBps"] = bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = bytes / median / measured_copy_bandwidth;
  state.counters["tensor_TFLOPs"] = flops / median / 1e12;
}

template <bool GivenLse>
void snapkv_score(benchmark::State& state) {
  const workload w(state);
  using impl = kt::implementation<kt::score::snapkv, kt::backend::cuda>;
  kt::score::snapkv::config cfg{.window = w.window};
  std::optional<kvtrim_bench::prefill_lse> lse;
  if constexpr (GivenLse) cfg = cfg.with_lse(lse.emplace(w.key_view(w.keys), w.query_view(), w.shape).view());
  float* scores = nullptr;
  check(cudaMalloc(&scores, w.batch * w.shape.kv_heads * w.tokens * sizeof(float)), "cudaMalloc(scores)");
  const std::size_t scratch_bytes = impl::workspace_bytes(cfg, w.shape, w.batch, w.tokens);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc(scratch)");
  const std::array<std::int64_t, 3> extents{w.batch, w.shape.kv_heads, w.tokens};
  const kt::score_view<kt::device_space> score_view{scores, extents, kt::row_major_strides(extents)};
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const auto seconds = time_calls(state, stream, [&] {
    impl::score(cfg, w.shape, w.key_view(w.keys), w.key_view(w.values), w.query_view(), score_view,
                {scratch, scratch_bytes}, stream);
  });
  const double bytes = static_cast<double>(w.key_elements() + w.query_elements()) * sizeof(__half) +
                       static_cast<double>(w.batch * w.shape.kv_heads * w.tokens) * sizeof(float);
  report(state, bytes, seconds[seconds.size() / 2], GivenLse ? w.flops() / 2 : w.flops());
  cudaFree(scores), cudaFree(scratch);
  cudaStreamDestroy(stream);
}

template <bool GivenLse>
void snapkv_compress(benchmark::State& state) {
  const workload w(state);
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::snapkv, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cuda>;
  scheme::config cfg;
  cfg.score.window = w.window;
  std::optional<kvtrim_bench::prefill_lse> lse;
  if constexpr (GivenLse)
    cfg.score = cfg.score.with_lse(lse.emplace(w.key_view(w.keys), w.query_view(), w.shape).view());
  cfg.budget.keep = kt::keep_ratio{0.3};
  const std::int64_t capacity = kt::budget::uniform::max_keep(cfg.budget, w.tokens);
  auto cache = scheme::make_cache(w.shape, w.batch, capacity, kt::codec::fp16::config{});
  const std::size_t scratch_bytes = scheme::compress_workspace(w.shape, w.batch, w.tokens, cfg);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc(scratch)");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const auto seconds = time_calls(state, stream, [&] {
    scheme::compress(w.key_view(w.keys), w.key_view(w.values), w.query_view(), cache.view(), cfg,
                     {scratch, scratch_bytes}, stream);
  });
  const double kept = static_cast<double>(w.batch * w.shape.kv_heads * capacity * w.shape.head_dim);
  const double bytes = static_cast<double>(2 * w.key_elements() + w.query_elements()) * sizeof(__half) +
                       2.0 * kept * sizeof(__half);
  report(state, bytes, seconds[seconds.size() / 2], GivenLse ? w.flops() / 2 : w.flops());
  cudaFree(scratch);
  cudaStreamDestroy(stream);
}

}  // namespace

BENCHMARK(device_copy)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
// batch, tokens, q heads, kv heads, head dim, window: W, then shorter and GQA-8 variants.
BENCHMARK(snapkv_score<false>)
    ->Name("snapkv_score")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "window"})
    ->Args({8, 32768, 32, 8, 128, 64})
    ->Args({8, 4096, 32, 8, 128, 64})
    ->Args({1, 32768, 32, 8, 128, 64})
    ->Args({8, 32768, 64, 8, 128, 64})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
// Issue 10: the normalisers given (pass 2 only), at W and W with GQA 8.
BENCHMARK(snapkv_score<true>)
    ->Name("snapkv_score/given_lse")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "window"})
    ->Args({8, 32768, 32, 8, 128, 64})
    ->Args({8, 32768, 64, 8, 128, 64})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(snapkv_compress<false>)
    ->Name("snapkv_compress")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "window"})
    ->Args({8, 32768, 32, 8, 128, 64})
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(snapkv_compress<true>)
    ->Name("snapkv_compress/given_lse")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "window"})
    ->Args({8, 32768, 32, 8, 128, 64})
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
