// bench/cpu_common.hpp — what the CPU benchmarks share: fast deterministic fill
// and the machine's memory bandwidth, measured in the same run (a STREAM-style
// triad and a memcpy over arrays far larger than the last-level cache), so
// every GB/s printed next to it can be read as a fraction of what the memory
// system delivers (rows report it as "%triad" / "%copy" when those rows ran
// first in the same process: the default order).
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kvtrim_bench {

/// Uniform in [-1, 1): a 64-bit LCG, fast enough to fill gigabytes.
struct fast_random {
  std::uint64_t state;
  explicit fast_random(std::uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 1) {}
  float operator()() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(static_cast<std::int64_t>(state >> 40) - (1ll << 23)) / static_cast<float>(1 << 23);
  }
};

inline int threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// The bandwidths measured by memory_triad and memory_copy in this run (bytes per
/// second of real time; 0 until they ran), for rows that report a fraction of them.
inline double triad_bytes_per_second = 0.0;
inline double copy_bytes_per_second = 0.0;

/// Adds "%triad" and "%copy" counters (bytes per second as a percentage of the
/// bandwidths measured earlier in the same run), when those rows ran.
inline void report_fraction_of_memory(benchmark::State& state, double bytes_per_second) {
  if (triad_bytes_per_second > 0.0) state.counters["%triad"] = 100.0 * bytes_per_second / triad_bytes_per_second;
  if (copy_bytes_per_second > 0.0) state.counters["%copy"] = 100.0 * bytes_per_second / copy_bytes_per_second;
}

/// a[i] = b[i] + s·c[i] over three arrays of `state.range(0)` MiB each: 3 streams of
/// bytes per element (STREAM counts reads and writes, not write-allocate traffic).
inline void memory_triad(benchmark::State& state) {
  const std::int64_t n = state.range(0) * (1 << 20) / static_cast<std::int64_t>(sizeof(float));
  std::unique_ptr<float[]> a(new float[static_cast<std::size_t>(n)]), b(new float[static_cast<std::size_t>(n)]),
      c(new float[static_cast<std::size_t>(n)]);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) a[i] = 0.0f, b[i] = 1.0f, c[i] = 2.0f;
  const float s = 3.0f;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
    benchmark::DoNotOptimize(a.get());
    benchmark::ClobberMemory();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  triad_bytes_per_second = 3.0 * static_cast<double>(n) * sizeof(float) * static_cast<double>(state.iterations()) / seconds;
  state.SetBytesProcessed(3 * n * static_cast<std::int64_t>(sizeof(float)) * state.iterations());
  state.counters["threads"] = threads();
}

/// memcpy of `state.range(0)` MiB (bytes counted once read, once written).
inline void memory_copy(benchmark::State& state) {
  const std::size_t bytes = static_cast<std::size_t>(state.range(0)) << 20;
  std::vector<char> from(bytes, 1), to(bytes, 0);
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    std::memcpy(to.data(), from.data(), bytes);
    benchmark::DoNotOptimize(to.data());
    benchmark::ClobberMemory();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  copy_bytes_per_second = 2.0 * static_cast<double>(bytes) * static_cast<double>(state.iterations()) / seconds;
  state.SetBytesProcessed(2 * static_cast<std::int64_t>(bytes) * state.iterations());
}

}  // namespace kvtrim_bench
