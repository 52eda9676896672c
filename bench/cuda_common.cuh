// bench/cuda_common.cuh — what every CUDA benchmark shares: error checks, the L2
// flush before a timed call, and the device-to-device copy whose bandwidth,
// measured in the same run (registered first, so it runs first), is the
// yardstick the other rows report a fraction of.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace kvtrim_bench {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

/// Deterministic pseudo-random fill (a hash of the index), values in [-1, 1).
static __global__ void fill_random(__half* data, std::int64_t count, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15, x *= 2246822519u, x ^= x >> 13, x *= 3266489917u, x ^= x >> 16;
    data[i] = __float2half(static_cast<float>(x & 0xffff) / 32768.0f - 1.0f);
  }
}

/// Reads `count` 16-byte words and folds them into one word that is stored only if it matches an
/// impossible value (so the loads are kept): a flush that leaves the L2 full of clean lines.
static __global__ void read_flush_kernel(const uint4* data, std::size_t count, unsigned* sink) {
  unsigned folded = 0;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const uint4 v = data[i];
    folded ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (folded == 0x9e3779b9u) *sink = folded;
}

/// How the L2 is emptied before each timed repetition (KVTRIM_BENCH_FLUSH, read once):
///  * "read" (the default): a kernel reads a 256 MiB buffer, so the timed call finds the L2 full
///    of clean lines, as a decode step does after the layer's GEMMs have streamed their weights.
///  * "memset": a 256 MiB cudaMemsetAsync (this bench's method until 2026-12-07). The memset's last
///    ~50 MB stay dirty in the L2 and are written back while the timed call reads its cache: a
///    fixed cost of extra HBM traffic in every row, largest as a share of the rows that read the
///    fewest bytes (4k caches, quantized codecs). Kept so that earlier tables can be reproduced.
/// The torch peers (bench/torch_*.py) take the same variable and flush the same way.
enum class flush_mode { read, memset };
inline flush_mode bench_flush_mode() {
  static const flush_mode mode = [] {
    const char* value = std::getenv("KVTRIM_BENCH_FLUSH");
    if (value == nullptr || std::string_view(value) == "read") return flush_mode::read;
    if (std::string_view(value) == "memset") return flush_mode::memset;
    std::fprintf(stderr, "KVTRIM_BENCH_FLUSH=%s: expected read or memset\n", value);
    std::exit(2);
  }();
  return mode;
}
inline const char* bench_flush_name() { return bench_flush_mode() == flush_mode::read ? "read" : "memset"; }

/// Empties the L2 (the H200's is 50 MiB) before each timed repetition, so caches are read from
/// HBM as in a real step: bench_flush_mode's way, over a 256 MiB buffer.
struct l2_flusher {
  void* buffer = nullptr;
  unsigned* sink = nullptr;
  std::size_t bytes = 256u << 20;
  l2_flusher() {
    check(cudaMalloc(&buffer, bytes), "cudaMalloc(flush)");
    check(cudaMalloc(&sink, sizeof(unsigned)), "cudaMalloc(flush sink)");
    check(cudaMemset(buffer, 0, bytes), "cudaMemset(flush)");
    check(cudaDeviceSynchronize(), "flush buffer");
  }
  ~l2_flusher() { cudaFree(buffer), cudaFree(sink); }
  l2_flusher(const l2_flusher&) = delete;
  l2_flusher& operator=(const l2_flusher&) = delete;
  void flush(cudaStream_t stream) {
    if (bench_flush_mode() == flush_mode::memset) {
      check(cudaMemsetAsync(buffer, 0, bytes, stream), "cudaMemsetAsync(flush)");
    } else {
      read_flush_kernel<<<1024, 512, 0, stream>>>(static_cast<const uint4*>(buffer), bytes / sizeof(uint4), sink);
      check(cudaGetLastError(), "read_flush_kernel");
    }
  }
};

/// Bytes/s of a 1 GiB device-to-device copy (read + write), set by device_copy.
inline double measured_copy_bandwidth = 0.0;

inline void device_copy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{1} << 30;
  void *source = nullptr, *target = nullptr;
  check(cudaMalloc(&source, bytes), "cudaMalloc");
  check(cudaMalloc(&target, bytes), "cudaMalloc");
  check(cudaMemset(source, 1, bytes), "cudaMemset");
  cudaEvent_t start, stop;
  cudaEventCreate(&start), cudaEventCreate(&stop);
  std::vector<double> seconds;
  for (auto _ : state) {
    cudaEventRecord(start);
    check(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float milliseconds = 0;
    cudaEventElapsedTime(&milliseconds, start, stop);
    state.SetIterationTime(milliseconds / 1e3);
    seconds.push_back(milliseconds / 1e3);
  }
  std::sort(seconds.begin(), seconds.end());
  measured_copy_bandwidth = 2.0 * static_cast<double>(bytes) / seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(2 * bytes) * state.iterations());
  state.counters["copy_TBps"] = measured_copy_bandwidth / 1e12;
  // The L2 flush this run's timed rows use (one mode a process): recorded on this row only, so a
  // run that leaves device_copy out of its filter records it nowhere.
  state.SetLabel(std::string("flush=") + bench_flush_name());
  cudaFree(source), cudaFree(target);
  cudaEventDestroy(start), cudaEventDestroy(stop);
}

/// Times `run` once per benchmark iteration with CUDA events on `stream`, the L2
/// flushed before each (after one untimed warm-up call); `prepare`, untimed, runs
/// before the warm-up and before each flush (e.g. restoring what `run` changes).
/// Sets the manual iteration time and returns the seconds, sorted (the median is [size / 2]).
template <class Run, class Prepare = void (*)()>
std::vector<double> timed_seconds(benchmark::State& state, cudaStream_t stream, Run&& run,
                                  Prepare&& prepare = [] {}) {
  l2_flusher flusher;
  cudaEvent_t start, stop;
  cudaEventCreate(&start), cudaEventCreate(&stop);
  prepare();
  run();  // warm-up
  check(cudaStreamSynchronize(stream), "warm-up");
  std::vector<double> seconds;
  for (auto _ : state) {
    prepare();
    flusher.flush(stream);
    cudaEventRecord(start, stream);
    run();
    cudaEventRecord(stop, stream);
    check(cudaEventSynchronize(stop), "timed call");
    float milliseconds = 0;
    cudaEventElapsedTime(&milliseconds, start, stop);
    state.SetIterationTime(milliseconds / 1e3);
    seconds.push_back(milliseconds / 1e3);
  }
  cudaEventDestroy(start), cudaEventDestroy(stop);
  std::sort(seconds.begin(), seconds.end());
  return seconds;
}

/// The counters every bandwidth row reports for `bytes` read per call, from timed_seconds'
/// sorted `seconds`: bytes/s, median µs, TB/s and the fraction of the copy bandwidth.
inline void report_bytes_read(benchmark::State& state, const std::vector<double>& seconds, double bytes) {
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["cache_TBps"] = bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = bytes / median / measured_copy_bandwidth;
}

/// A compaction's selection that keeps every token: `heads` heads of `tokens` tokens each (offsets
/// head · tokens, tokens 0 … tokens − 1 in every head), in device memory (freed at scope exit) for
/// selection_view<device_space>{offsets, tokens, heads}.
struct every_token_selection {
  std::int64_t* offsets = nullptr;  // [heads + 1]
  std::int32_t* tokens = nullptr;   // [heads · tokens]
  every_token_selection(std::int64_t heads, std::int64_t count) {
    std::vector<std::int64_t> host_offsets(static_cast<std::size_t>(heads + 1));
    for (std::int64_t head = 0; head <= heads; ++head) host_offsets[static_cast<std::size_t>(head)] = head * count;
    std::vector<std::int32_t> host_tokens(static_cast<std::size_t>(heads * count));
    for (std::int64_t i = 0; i < heads * count; ++i) host_tokens[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % count);
    check(cudaMalloc(&offsets, host_offsets.size() * 8), "cudaMalloc");
    check(cudaMalloc(&tokens, std::max<std::size_t>(host_tokens.size(), 1) * 4), "cudaMalloc");
    check(cudaMemcpy(offsets, host_offsets.data(), host_offsets.size() * 8, cudaMemcpyHostToDevice), "offsets");
    check(cudaMemcpy(tokens, host_tokens.data(), host_tokens.size() * 4, cudaMemcpyHostToDevice), "kept");
  }
  every_token_selection(const every_token_selection&) = delete;
  every_token_selection& operator=(const every_token_selection&) = delete;
  ~every_token_selection() { cudaFree(offsets), cudaFree(tokens); }
};

/// Page tables of `heads` full heads of `tokens` tokens over pages of `page` scattered
/// through the pool (a fixed shuffle), positions 0 … tokens − 1 in every head and next
/// position `tokens`: the layout's tables for W's benchmarks, uploaded into a paged view.
struct scattered_pages {
  std::vector<std::int32_t> indices, indptr, last, positions;
  std::vector<std::int64_t> next;
  scattered_pages(std::int64_t heads, std::int64_t tokens, std::int64_t page) {
    const std::int64_t pages_per_head = (tokens + page - 1) / page;
    indices.resize(static_cast<std::size_t>(heads * pages_per_head));
    std::iota(indices.begin(), indices.end(), 0);
    std::shuffle(indices.begin(), indices.end(), std::mt19937_64(7));
    indptr.resize(static_cast<std::size_t>(heads + 1));
    last.assign(static_cast<std::size_t>(heads), static_cast<std::int32_t>((tokens - 1) % page + 1));
    for (std::int64_t head = 0; head <= heads; ++head) indptr[head] = static_cast<std::int32_t>(head * pages_per_head);
    positions.assign(indices.size() * static_cast<std::size_t>(page), 0);
    for (std::int64_t head = 0; head < heads; ++head)
      for (std::int64_t i = 0; i < tokens; ++i)
        positions[static_cast<std::size_t>(indices[head * pages_per_head + i / page] * page + i % page)] =
            static_cast<std::int32_t>(i);
    next.assign(static_cast<std::size_t>(heads), tokens);
  }
  template <class View>
  void upload(const View& view) const {
    check(cudaMemcpy(view.indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice), "indptr");
    check(cudaMemcpy(view.indices, indices.data(), indices.size() * 4, cudaMemcpyHostToDevice), "indices");
    check(cudaMemcpy(view.last_page_len, last.data(), last.size() * 4, cudaMemcpyHostToDevice), "last_page_len");
    check(cudaMemset(view.free_count, 0, sizeof(std::int32_t)), "free_count");
    check(cudaMemcpy(view.positions.slot_position, positions.data(), positions.size() * 4, cudaMemcpyHostToDevice),
          "positions");
    check(cudaMemcpy(view.positions.next_position, next.data(), next.size() * 8, cudaMemcpyHostToDevice), "next");
    check(cudaMemset(view.compensation.index, 0xff, next.size() * sizeof(std::int32_t)), "compensation");
  }
};

}  // namespace kvtrim_bench
