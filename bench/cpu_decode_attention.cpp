// CPU decode attention over a contiguous cache (the reference backend): how
// many bytes of compressed cache it reads per second. The reference is written
// for clarity, not speed; this number is a baseline, not a goal.
#include <kvtrim/kvtrim.hpp>

#include <benchmark/benchmark.h>

#include <array>
#include <random>
#include <vector>

namespace kt = kvtrim;

template <class Codec>
static void decode_attention(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, Codec,
                            kt::backend::cpu>;
  const std::int64_t batch = 1, tokens = state.range(0);
  const kt::model_shape shape{.q_heads = 32, .kv_heads = 8, .head_dim = 128};
  auto cache = scheme::make_cache(shape, batch, tokens, typename Codec::config{});
  std::mt19937 random(7);
  std::normal_distribution<float> normal;
  std::vector<typename Codec::element> keys(batch * shape.kv_heads * tokens * shape.head_dim);
  std::vector<typename Codec::element> values(keys.size());
  for (auto& x : keys) x = kt::from_float<typename Codec::element>(normal(random));
  for (auto& x : values) x = kt::from_float<typename Codec::element>(normal(random));
  const std::array<std::int64_t, 4> extents{batch, shape.kv_heads, tokens, shape.head_dim};
  scheme::append(cache.view(), kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents));
  std::vector<float> query(batch * shape.q_heads * shape.head_dim), out(query.size());
  for (auto& x : query) x = normal(random);
  const std::array<std::int64_t, 3> query_extents{batch, shape.q_heads, shape.head_dim};
  for (auto _ : state) {
    scheme::attend(kt::make_view(query.data(), query_extents), cache.view(), kt::make_view(out.data(), query_extents),
                   kt::workspace{});
    benchmark::DoNotOptimize(out.data());
  }
  const double cache_bytes = static_cast<double>(tokens) * static_cast<double>(batch * shape.kv_heads) *
                             Codec::bytes_per_token(typename Codec::config{}, shape.head_dim);
  state.SetBytesProcessed(static_cast<std::int64_t>(cache_bytes) * state.iterations());
  state.counters["tokens"] = static_cast<double>(tokens);
}

BENCHMARK(decode_attention<kt::codec::fp16>)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(decode_attention<kt::codec::fp32>)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
