// CPU compress of one layer (the reference backend): score + budget + select +
// write into the cache, per scorer and budget, at Llama-3-8B's layer shape
// (batch 1, 32 query heads, 8 kv heads, head_dim 128, fp16). Counters:
//   GFLOP/s  the scorer's attention products (2·D per query·key pair it must
//            form: SnapKV's window × every key, H2O's causal T·(T+1)/2), per second
//   GB/s     prefill keys and values read, per second
//   (the machine's memory bandwidth is measured in the same run: memory_triad)
// H2O needs every prefill query, so its attention is quadratic: it runs at 1024 tokens.
// RazorAttention (retrieval_head + by_scorer, 2 of 8 kv heads retrieval heads, the
// paper's window W = max(4000, T/5), compensation tokens) compresses at 8192; its
// offline calibration (razor_calibration) reads one layer's attention on the
// paper's probe (N = 2500, R = 4: 10001 rows of 10001 keys, 32 query heads), 64
// rows at a time, as an engine hands them over; counter rows/s.
#include <kvtrim/kvtrim.hpp>

#include "cpu_common.hpp"

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace kt = kvtrim;

namespace {

constexpr kt::model_shape shape{.q_heads = 32, .kv_heads = 8, .head_dim = 128};
constexpr std::int64_t batch = 1;

template <class Scorer>
std::int64_t observed_queries(std::int64_t tokens) {
  if constexpr (std::is_same_v<Scorer, kt::score::h2o>) return tokens;
  return 64;
}

template <class Scorer>
double attention_flops(std::int64_t tokens) {
  const double pairs_per_head =
      std::is_same_v<Scorer, kt::score::snapkv> ? 64.0 * static_cast<double>(tokens)
      : std::is_same_v<Scorer, kt::score::h2o>  ? static_cast<double>(tokens) * static_cast<double>(tokens + 1) / 2.0
                                                : 0.0;
  return 2.0 * static_cast<double>(shape.head_dim) * pairs_per_head * static_cast<double>(batch * shape.q_heads);
}


template <class Layout, class Scorer, class Budget>
void compress(benchmark::State& state) {
  using scheme = kt::scheme<Layout, Scorer, Budget, kt::codec::fp16, kt::backend::cpu>;
  const std::int64_t tokens = state.range(0);
  const std::int64_t keep = tokens / 4;
  typename scheme::config cfg{};
  if constexpr (std::is_same_v<Scorer, kt::score::retrieval_head>) {
    cfg.score.retrieval = {true, false, false, false, false, true, false, false};  // 2 of 8 retrieval heads
  } else {
    cfg.budget.keep = kt::keep_tokens{keep};
  }
  auto cache = [&] {
    if constexpr (std::is_same_v<Layout, kt::layout::flat>)
      return scheme::make_cache(shape, batch, kt::layout::flat::pool_size{batch * shape.kv_heads * tokens},
                                kt::codec::fp16::config{});
    else
      return scheme::make_cache(shape, batch, keep, kt::codec::fp16::config{});
  }();
  kvtrim_bench::fast_random random(11);
  const std::array<std::int64_t, 4> extents{batch, shape.kv_heads, tokens, shape.head_dim};
  const std::array<std::int64_t, 4> query_extents{batch, shape.q_heads, observed_queries<Scorer>(tokens),
                                                  shape.head_dim};
  std::vector<kt::half> keys(static_cast<std::size_t>(batch * shape.kv_heads * tokens * shape.head_dim)),
      values(keys.size()), queries(static_cast<std::size_t>(query_extents[1] * query_extents[2] * shape.head_dim));
  for (auto& x : keys) x = kt::half(2.0f * random());
  for (auto& x : values) x = kt::half(random());
  for (auto& x : queries) x = kt::half(2.0f * random());
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  auto view = cache.view();
  for (auto _ : state) {
    if constexpr (Scorer::needs_queries)
      scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents),
                       kt::make_view(queries.data(), query_extents), view, cfg,
                       kt::workspace{scratch.data(), scratch.size()});
    else
      scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents), view, cfg,
                       kt::workspace{scratch.data(), scratch.size()});
    benchmark::ClobberMemory();
  }
  const double iterations = static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] =
      benchmark::Counter(attention_flops<Scorer>(tokens) * iterations / 1e9, benchmark::Counter::kIsRate);
  state.counters["GB/s"] = benchmark::Counter(
      2.0 * static_cast<double>(keys.size()) * sizeof(kt::half) * iterations / 1e9, benchmark::Counter::kIsRate);
  state.counters["tokens"] = static_cast<double>(tokens);
  state.counters["threads"] = kvtrim_bench::threads();
}

/// One layer of RazorAttention's calibration on the paper's probe: the captured
/// attention rows (a synthetic block, reused: the values do not change the work)
/// go through calibration::accumulate, then the head scores are read.
void razor_calibration(benchmark::State& state) {
  using razor = kt::score::retrieval_head;
  const razor::probe_config probe{};
  const std::int64_t length = probe.length(), rows = 64;
  std::vector<float> block(static_cast<std::size_t>(shape.q_heads * rows * length), 1.0f / static_cast<float>(length));
  for (auto _ : state) {
    razor::calibration calibration(1, shape, probe);
    for (std::int64_t first = 0; first < length; first += rows) {
      const std::int64_t count = std::min(rows, length - first);
      calibration.accumulate(0,
                             kt::tensor_view<const float, 3>(kt::make_view(
                                 block.data(), std::array<std::int64_t, 3>{shape.q_heads, count, length})),
                             first);
    }
    benchmark::DoNotOptimize(calibration.scores());
  }
  state.counters["rows/s"] =
      benchmark::Counter(static_cast<double>(length * state.iterations()), benchmark::Counter::kIsRate);
}

using kt::budget::adaptive;
using kt::budget::uniform;
using kt::layout::contiguous;
using kt::layout::flat;

}  // namespace

BENCHMARK(kvtrim_bench::memory_triad)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(kvtrim_bench::memory_copy)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<contiguous, kt::score::snapkv, uniform>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<flat, kt::score::snapkv, adaptive>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<contiguous, kt::score::h2o, uniform>)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<flat, kt::score::h2o, adaptive>)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<contiguous, kt::score::key_norm, uniform>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<flat, kt::score::key_norm, adaptive>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(compress<contiguous, kt::score::static_window, uniform>)
    ->Arg(8192)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(compress<flat, kt::score::retrieval_head, kt::budget::by_scorer>)
    ->Arg(8192)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(razor_calibration)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
