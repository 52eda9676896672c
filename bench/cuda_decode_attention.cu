// Decode attention on the GPU (backend::cuda) over fp16 caches of every
// layout: contiguous, paged (per-(sequence, kv head) page tables, pages
// scattered through the pool) and flat (per-head regions), with uniform or
// ragged (Ada-KV-like) per-head lengths; and over contiguous caches stored
// with the quantizing codecs (int8, int4, fp8: codec_decode_*) and low_rank
// (codec_decode_low_rank*, r = head_dim / 4), encoded on the device.
//
// Reports bytes of cache read per second and that rate as a fraction of a
// device-to-device copy's bandwidth measured in the same run (bytes read +
// written), the ceiling for a kernel that must read the whole cache once.
// Timed with CUDA events around each launch; L2 is flushed before every
// repetition (cuda_common.cuh's l2_flusher: KVTRIM_BENCH_FLUSH) so the cache is read from HBM, as in decode.
//
//   bench_cuda_decode_attention --benchmark_format=json > decode.json
// bench/compare_torch.py joins this with bench/torch_sdpa.py's timings.
#include <kvtrim/cuda.cuh>

#include <benchmark/benchmark.h>

#include "cuda_common.cuh"
#include "cuda_low_rank_bases.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace kt = kvtrim;
using kvtrim_bench::check;
using kvtrim_bench::device_copy;
using kvtrim_bench::fill_random;
using kvtrim_bench::measured_copy_bandwidth;
using kvtrim_bench::scattered_pages;

namespace {

void decode_attention(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cuda>;
  const std::int64_t batch = state.range(0), tokens = state.range(1);
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  auto cache = scheme::make_cache(shape, batch, tokens, kt::codec::fp16::config{});
  const std::int64_t cache_elements = batch * shape.kv_heads * tokens * shape.head_dim;
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(cache.view().storage.keys), cache_elements, 1);
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(cache.view().storage.values), cache_elements, 2);
  *cache.view().length = tokens;

  const std::int64_t query_elements = batch * shape.q_heads * shape.head_dim;
  __half *queries = nullptr, *out = nullptr;
  check(cudaMalloc(&queries, query_elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&out, query_elements * sizeof(__half)), "cudaMalloc");
  fill_random<<<64, 256>>>(queries, query_elements, 3);
  const std::array<std::int64_t, 3> query_extents{batch, shape.q_heads, shape.head_dim};
  const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(queries), query_extents);
  const auto out_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out), query_extents);

  const std::size_t scratch_bytes = scheme::attend_workspace(cache.view());
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(
      state, stream, [&] { scheme::attend(query_view, cache.view(), out_view, {scratch, scratch_bytes}, stream); });
  const double cache_bytes = 2.0 * static_cast<double>(cache_elements) * sizeof(__half);
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(cache_bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["cache_TBps"] = cache_bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = cache_bytes / median / measured_copy_bandwidth;
  cudaFree(queries), cudaFree(out), cudaFree(scratch);
  cudaStreamDestroy(stream);
}

/// Decode attention over a contiguous cache stored with CodecT (issue 12), on
/// the same rows as decode_attention's fp16 cache: random fp16 keys and values
/// compacted into the cache on the device (every token kept: the codec's device
/// encode), then attend timed as above. Bytes are those the codec stores per
/// token (codes, steps and KIVI run scales: codec::bytes_per_token); the
/// compaction (encode) is timed too, next to fp16's row copy in the same row set.
/// codec arg: 0 fp16, 1 int8 (KIVI groups of 32), 2 int8 (zero points), 3 int4
/// (KIVI, zero points), 4 fp8 e4m3 (head amax scales), 5 int4 (KIVI, symmetric),
/// 6 fp8 e4m3 (fixed scales: no amax pass in the encode), 7 low_rank at r =
/// head_dim / 4 (post-RoPE keys; profile bases: one random orthonormal basis
/// per head, fitted on the host with Eigen and installed before the
/// compaction), 8 the same with pre-RoPE keys (keys rebuilt and rotated per token),
/// 9 low_rank with sequence bases (the codec's default source: fitted on the
/// device to every head's rows at each compaction, low_rank_fit.cuh; max_rank
/// head_dim / 4, energy 0.98): encode_us then includes the fit.
template <class CodecT>
void codec_decode(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, CodecT,
                            kt::backend::cuda>;
  const std::int64_t batch = state.range(0), tokens = state.range(1);
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  typename CodecT::config config{};
  if constexpr (requires { config.asymmetric; }) config.asymmetric = state.range(5) == 2 || state.range(5) == 3;
  if constexpr (requires { config.scales; })
    config.scales = state.range(5) == 6 ? kt::codec::fp8_scaling::fixed : kt::codec::fp8_scaling::head_amax;
  if constexpr (std::is_same_v<CodecT, kt::codec::low_rank>) {
    config.source = state.range(5) == 9 ? kt::codec::basis_source::sequence : kt::codec::basis_source::profile;
    config.max_rank = shape.head_dim / 4;
    if (state.range(5) == 8) config.keys = kt::codec::key_space::pre_rope;
  }
  auto cache = scheme::make_cache(shape, batch, tokens, config);
  const std::int64_t heads = batch * shape.kv_heads, elements = heads * tokens * shape.head_dim;
  if constexpr (std::is_same_v<CodecT, kt::codec::low_rank>)
    if (state.range(5) != 9)
      kvtrim_bench::install_random_low_rank_bases(cache.view().storage, heads, shape.head_dim, shape.head_dim / 4);
  __half *keys = nullptr, *values = nullptr;
  check(cudaMalloc(&keys, elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&values, elements * sizeof(__half)), "cudaMalloc");
  fill_random<<<1024, 256>>>(keys, elements, 1);
  fill_random<<<1024, 256>>>(values, elements, 2);
  const kvtrim_bench::every_token_selection every_token(heads, tokens);
  const std::array<std::int64_t, 4> kv_extents{batch, shape.kv_heads, tokens, shape.head_dim};
  const auto key_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(keys), kv_extents);
  const auto value_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(values), kv_extents);
  kt::compact_args args;
  args.uniform_keep = tokens;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const auto compact = [&] {
    kt::implementation<kt::layout::contiguous, kt::backend::cuda>::compact(
        cache.view(), key_view, value_view,
        kt::selection_view<kt::device_space>{every_token.offsets, every_token.tokens, heads}, args, stream);
  };
  // The compaction (encode) alone: events around 10 calls after a warm-up, median.
  std::vector<double> encode_seconds;
  compact();
  for (int i = 0; i < 10; ++i) {
    cudaEvent_t start, stop;
    cudaEventCreate(&start), cudaEventCreate(&stop);
    cudaEventRecord(start, stream);
    compact();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    encode_seconds.push_back(ms * 1e-3);
    cudaEventDestroy(start), cudaEventDestroy(stop);
  }
  std::sort(encode_seconds.begin(), encode_seconds.end());
  check(cudaStreamSynchronize(stream), "compact");

  const std::int64_t query_elements = batch * shape.q_heads * shape.head_dim;
  __half *queries = nullptr, *out = nullptr;
  check(cudaMalloc(&queries, query_elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&out, query_elements * sizeof(__half)), "cudaMalloc");
  fill_random<<<64, 256>>>(queries, query_elements, 3);
  const std::array<std::int64_t, 3> query_extents{batch, shape.q_heads, shape.head_dim};
  const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(queries), query_extents);
  const auto out_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out), query_extents);
  const std::size_t scratch_bytes = scheme::attend_workspace(cache.view());
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc");
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(
      state, stream, [&] { scheme::attend(query_view, cache.view(), out_view, {scratch, scratch_bytes}, stream); });
  const double per_token = kt::codec::bytes_per_token<CodecT>(config, shape.head_dim, kt::codec::slot_alignment<CodecT>(config));
  const double cache_bytes = static_cast<double>(heads * tokens) * per_token;
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(cache_bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["bytes_per_token_head"] = per_token;
  state.counters["cache_TBps"] = cache_bytes / median / 1e12;
  state.counters["encode_us"] = encode_seconds[encode_seconds.size() / 2] * 1e6;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = cache_bytes / median / measured_copy_bandwidth;
  cudaFree(queries), cudaFree(out), cudaFree(scratch), cudaFree(keys), cudaFree(values);
  cudaStreamDestroy(stream);
}

/// The host fit that low_rank's sequence bases would need per head at every
/// compaction (the CPU's prepare_head: Eigen, singular values for the rank, then
/// the basis): one head's `tokens` × head_dim keys → its top head_dim / 4 right
/// singular vectors, timed on the host CPU of this run. The device path takes
/// device fits them itself (low_rank_fit.cuh: codec_decode_low_rank_sequence's
/// encode_us, every head of W at once); this row is what a host fit would cost instead.
void low_rank_host_fit(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), dim = state.range(1);
  std::mt19937_64 random(11);
  std::normal_distribution<double> normal(0.0, 1.0);
  Eigen::MatrixXd rows(tokens, dim);
  for (Eigen::Index i = 0; i < rows.size(); ++i) rows.data()[i] = normal(random);
  for (auto _ : state) {
    const Eigen::MatrixXd basis = kt::codec::low_rank::fit_basis(rows, dim / 4, 0.98, dim / 4);
    benchmark::DoNotOptimize(basis.data());
  }
}

/// Decode-time appends to a low_rank cache with sequence bases (update_freq 16, max_rank head_dim / 4):
/// after a compaction of `tokens` rows per head (timed once as fit_us), 16 appends of one token to every
/// head, the 16th filling the pending buffers so that every head's bases are refreshed on the device
/// (low_rank_append_refreshing); an iteration times the 16 (median reported per append and for the 16).
/// Profile: the same appends to a cache with profile bases (installed before the compaction, no fit, no
/// refresh): each append encodes one row a head through low_rank_encode_rows, as every decode step does.
template <bool Profile>
void low_rank_append(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::low_rank,
                            kt::backend::cuda>;
  const std::int64_t batch = state.range(0), tokens = state.range(1);
  const kt::model_shape shape{.q_heads = 4 * state.range(2), .kv_heads = state.range(2), .head_dim = state.range(3)};
  kt::codec::low_rank::config config{};
  config.max_rank = shape.head_dim / 4;
  if constexpr (Profile) config.source = kt::codec::basis_source::profile;
  constexpr std::int64_t steps = 16;
  const std::int64_t iterations = 12;  // 10 timed + warm-up + one spare
  auto cache = scheme::make_cache(shape, batch, tokens + steps * iterations, config);
  const std::int64_t heads = batch * shape.kv_heads, elements = heads * tokens * shape.head_dim;
  if constexpr (Profile) kvtrim_bench::install_random_low_rank_bases(cache.view().storage, heads, shape.head_dim, shape.head_dim / 4);
  __half *keys = nullptr, *values = nullptr, *new_keys = nullptr, *new_values = nullptr;
  check(cudaMalloc(&keys, elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&values, elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&new_keys, heads * shape.head_dim * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&new_values, heads * shape.head_dim * sizeof(__half)), "cudaMalloc");
  fill_random<<<1024, 256>>>(keys, elements, 1);
  fill_random<<<1024, 256>>>(values, elements, 2);
  fill_random<<<64, 256>>>(new_keys, heads * shape.head_dim, 4);
  fill_random<<<64, 256>>>(new_values, heads * shape.head_dim, 5);
  const kvtrim_bench::every_token_selection every_token(heads, tokens);
  const auto key_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(keys),
                                                         std::array<std::int64_t, 4>{batch, shape.kv_heads, tokens, shape.head_dim});
  const auto value_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(values),
                                                           std::array<std::int64_t, 4>{batch, shape.kv_heads, tokens, shape.head_dim});
  const std::array<std::int64_t, 4> one{batch, shape.kv_heads, 1, shape.head_dim};
  const auto new_key_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(new_keys), one);
  const auto new_value_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(new_values), one);
  kt::compact_args args;
  args.uniform_keep = tokens;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  cudaEvent_t start, stop;
  cudaEventCreate(&start), cudaEventCreate(&stop);
  const auto compact = [&] {
    kt::implementation<kt::layout::contiguous, kt::backend::cuda>::compact(
        cache.view(), key_view, value_view,
        kt::selection_view<kt::device_space>{every_token.offsets, every_token.tokens, heads}, args, stream);
  };
  compact();  // warm-up: creates the cuSOLVER handle and its buffer
  cudaEventRecord(start, stream);
  compact();
  cudaEventRecord(stop, stream);
  check(cudaEventSynchronize(stop), "compact");
  float fit_ms = 0.0f;
  cudaEventElapsedTime(&fit_ms, start, stop);
  const auto sixteen = [&] {
    for (std::int64_t step = 0; step < steps; ++step)
      kt::implementation<kt::layout::contiguous, kt::backend::cuda>::append(cache.view(), new_key_view, new_value_view,
                                                                          stream);
  };
  sixteen();  // warm-up
  std::vector<double> seconds;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    sixteen();
    cudaEventRecord(stop, stream);
    check(cudaEventSynchronize(stop), "append");
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms * 1e-3);
    seconds.push_back(ms * 1e-3);
  }
  std::sort(seconds.begin(), seconds.end());
  state.counters["fit_us"] = fit_ms * 1e3;
  state.counters["sixteen_appends_us"] = seconds[seconds.size() / 2] * 1e6;
  state.counters["append_us"] = seconds[seconds.size() / 2] * 1e6 / steps;
  cudaEventDestroy(start), cudaEventDestroy(stop);
  cudaFree(keys), cudaFree(values), cudaFree(new_keys), cudaFree(new_values);
  cudaStreamDestroy(stream);
}

/// Per-head lengths for `heads` heads of at most `tokens`: mode 0 every head
/// full, 1 every head 30 %, 2 Ada-KV-like — fractions in [5 %, 90 %] drawn as
/// 0.05 + 0.85·x^2.4 (x uniform; mean 0.30), then scaled so the total is
/// exactly 30 % of the full cache (± rounding), clamped to the range.
std::vector<std::int64_t> head_lengths(std::int64_t heads, std::int64_t tokens, std::int64_t mode) {
  std::vector<std::int64_t> lengths(static_cast<std::size_t>(heads), tokens);
  if (mode == 1) std::fill(lengths.begin(), lengths.end(), static_cast<std::int64_t>(0.3 * static_cast<double>(tokens)));
  if (mode == 2) {
    std::mt19937_64 random(42);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    std::vector<double> fraction(lengths.size());
    for (double& f : fraction) f = 0.05 + 0.85 * std::pow(uniform(random), 2.4);
    const double scale = 0.3 * static_cast<double>(heads) / std::accumulate(fraction.begin(), fraction.end(), 0.0);
    for (std::size_t i = 0; i < lengths.size(); ++i)
      lengths[i] = static_cast<std::int64_t>(std::clamp(fraction[i] * scale, 0.05, 0.9) * static_cast<double>(tokens));
  }
  return lengths;
}

/// Times one-query decode attention (fp16 queries and output, W's query heads)
/// over a bound device `view` of `batch` sequences, and reports `cache_bytes` read
/// per call: bytes/s, µs, TB/s and the fraction of the run's copy bandwidth.
template <class View>
void time_one_query_decode(benchmark::State& state, const View& view, std::int64_t batch, double cache_bytes) {
  const kt::model_shape& shape = view.shape;
  const std::int64_t query_elements = batch * shape.q_heads * shape.head_dim;
  __half *queries = nullptr, *out = nullptr;
  check(cudaMalloc(&queries, query_elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&out, query_elements * sizeof(__half)), "cudaMalloc");
  fill_random<<<64, 256>>>(queries, query_elements, 3);
  const std::array<std::int64_t, 3> query_extents{batch, shape.q_heads, shape.head_dim};
  const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(queries), query_extents);
  const auto out_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out), query_extents);
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
  const std::size_t scratch_bytes = attention::workspace_bytes(view);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(
      state, stream, [&] { attention::attend(query_view, view, out_view, {scratch, scratch_bytes}, stream); });
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(cache_bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["cache_TBps"] = cache_bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = cache_bytes / median / measured_copy_bandwidth;
  cudaFree(queries), cudaFree(out), cudaFree(scratch);
  cudaStreamDestroy(stream);
}

/// Times attend over an fp16 cache of Layout (paged or flat) whose heads hold `lengths` tokens.
template <class Layout>
void ragged_decode(benchmark::State& state) {
  using view_type = typename Layout::template view<kt::codec::fp16, kt::device_space>;
  const std::int64_t batch = state.range(0), tokens = state.range(1), mode = state.range(5), page = state.range(6);
  const bool scattered = state.range(7) != 0;  // paged: page ids shuffled through the pool (else in order)
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  const std::int64_t heads = batch * shape.kv_heads;
  const std::vector<std::int64_t> lengths = head_lengths(heads, tokens, mode);
  const std::int64_t held = std::accumulate(lengths.begin(), lengths.end(), std::int64_t{0});

  // The layout's tables on the host, then copied over the device view's.
  view_type view;
  void* memory = nullptr;
  std::int64_t slots = 0;
  if constexpr (std::is_same_v<Layout, kt::layout::paged>) {
    std::int64_t pages = 0;
    for (const std::int64_t n : lengths) pages += (n + page - 1) / page;
    const kt::layout::paged::pool_size pool{pages, page};
    check(cudaMalloc(&memory, view_type::bytes(shape, batch, pool)), "cudaMalloc(cache)");
    view = view_type::bind(memory, shape, batch, pool);
    // Pages scattered through the pool (a fixed permutation), as an engine's allocator leaves them.
    std::vector<std::int32_t> permutation(static_cast<std::size_t>(pages));
    std::iota(permutation.begin(), permutation.end(), 0);
    if (scattered) std::shuffle(permutation.begin(), permutation.end(), std::mt19937_64(7));
    std::vector<std::int32_t> indptr(static_cast<std::size_t>(heads + 1), 0), last(static_cast<std::size_t>(heads));
    for (std::int64_t head = 0; head < heads; ++head) {
      indptr[head + 1] = indptr[head] + static_cast<std::int32_t>((lengths[head] + page - 1) / page);
      last[head] = static_cast<std::int32_t>(lengths[head] == 0 ? 0 : (lengths[head] - 1) % page + 1);
    }
    check(cudaMemcpy(view.indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice), "indptr");
    check(cudaMemcpy(view.indices, permutation.data(), permutation.size() * 4, cudaMemcpyHostToDevice), "indices");
    check(cudaMemcpy(view.last_page_len, last.data(), last.size() * 4, cudaMemcpyHostToDevice), "last_page_len");
    slots = pages * page;
  } else {
    const kt::layout::flat::pool_size pool{held};
    check(cudaMalloc(&memory, view_type::bytes(shape, batch, pool)), "cudaMalloc(cache)");
    view = view_type::bind(memory, shape, batch, pool);
    std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1), 0);
    for (std::int64_t head = 0; head < heads; ++head) offsets[head + 1] = offsets[head] + lengths[head];
    check(cudaMemcpy(view.offsets, offsets.data(), offsets.size() * 8, cudaMemcpyHostToDevice), "offsets");
    check(cudaMemcpy(view.lengths, lengths.data(), lengths.size() * 8, cudaMemcpyHostToDevice), "lengths");
    slots = held;
  }
  check(cudaMemset(view.compensation.index, 0xff, heads * sizeof(std::int32_t)), "compensation");  // −1: none
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(view.storage.keys), slots * shape.head_dim, 1);
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(view.storage.values), slots * shape.head_dim, 2);

  Layout::check("bench", view);
  time_one_query_decode(state, view, batch, 2.0 * static_cast<double>(held * shape.head_dim) * sizeof(__half));
  state.counters["mean_tokens"] = static_cast<double>(held) / static_cast<double>(heads);
  cudaFree(memory);
}

}  // namespace

BENCHMARK(device_copy)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
// batch, tokens, q heads, kv heads, head dim: Llama-3-8B's attention shape.
BENCHMARK(decode_attention)
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim"})
    ->Args({8, 4096, 32, 8, 128})
    ->Args({8, 32768, 32, 8, 128})
    ->Args({1, 32768, 32, 8, 128})
    ->Args({8, 4096, 32, 32, 128})
    ->Args({8, 4096, 64, 8, 128})
    ->Args({8, 4097, 32, 8, 64})
    ->Args({8, 9830, 32, 8, 128})
    // time vs tokens (docs/img/decode_layouts.png): W at 8k, 16k and 64k beside 4k and 32k
    ->Args({8, 8192, 32, 8, 128})
    ->Args({8, 16384, 32, 8, 128})
    ->Args({8, 65536, 32, 8, 128})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);

// Issue 12: workload W at 32k tokens with each codec, fp16 first (the same encode-by-compaction path);
// then GQA 2 (16 q heads) and GQA 1 (8 q heads) on the same cache: fp16 on the CUDA cores there,
// int8 / int4 / fp8 on the tensor-core fragments at every group, low_rank in its own kernels.
#define KVTRIM_CODEC_ROWS(codec_id)                                                                     \
  ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "codec"})                           \
      ->Args({8, 32768, 32, 8, 128, codec_id})                                                          \
      ->Args({8, 32768, 16, 8, 128, codec_id})                                                          \
      ->Args({8, 32768, 8, 8, 128, codec_id})                                                           \
      ->UseManualTime()                                                                                 \
      ->Iterations(50)                                                                                  \
      ->Unit(benchmark::kMicrosecond)
BENCHMARK(codec_decode<kt::codec::fp16>)->Name("codec_decode_fp16") KVTRIM_CODEC_ROWS(0);
BENCHMARK(codec_decode<kt::codec::int8>)->Name("codec_decode_int8") KVTRIM_CODEC_ROWS(1);
BENCHMARK(codec_decode<kt::codec::int8>)->Name("codec_decode_int8_zero_point") KVTRIM_CODEC_ROWS(2);
BENCHMARK(codec_decode<kt::codec::int4>)->Name("codec_decode_int4_zero_point") KVTRIM_CODEC_ROWS(3);
BENCHMARK(codec_decode<kt::codec::fp8>)->Name("codec_decode_fp8") KVTRIM_CODEC_ROWS(4);
BENCHMARK(codec_decode<kt::codec::int4>)->Name("codec_decode_int4") KVTRIM_CODEC_ROWS(5);
BENCHMARK(codec_decode<kt::codec::fp8>)->Name("codec_decode_fp8_fixed_scales") KVTRIM_CODEC_ROWS(6);
BENCHMARK(codec_decode<kt::codec::low_rank>)->Name("codec_decode_low_rank") KVTRIM_CODEC_ROWS(7);
// Other model shapes (each its own kernel: the stage and block counts are chosen per group and
// head dim): GQA 8 and 16 at head dim 128 (64 / 128 q heads over 8 kv heads, as Llama 3 70B's
// GQA 8), GQA 4 and 8 at head dim 64; W's batch, at 32k tokens and (fewer stages matter most there) 4k.
#define KVTRIM_CODEC_SHAPE_ROWS(codec_id)                                                               \
  ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "codec"})                           \
      ->Args({8, 32768, 64, 8, 128, codec_id})                                                          \
      ->Args({8, 32768, 128, 8, 128, codec_id})                                                         \
      ->Args({8, 32768, 32, 8, 64, codec_id})                                                           \
      ->Args({8, 32768, 64, 8, 64, codec_id})                                                           \
      ->Args({8, 4096, 64, 8, 128, codec_id})                                                           \
      ->Args({8, 4096, 32, 8, 64, codec_id})                                                            \
      ->Args({8, 4096, 64, 8, 64, codec_id})                                                            \
      ->UseManualTime()                                                                                 \
      ->Iterations(50)                                                                                  \
      ->Unit(benchmark::kMicrosecond)
BENCHMARK(codec_decode<kt::codec::fp16>)->Name("codec_shapes_fp16") KVTRIM_CODEC_SHAPE_ROWS(0);
BENCHMARK(codec_decode<kt::codec::int8>)->Name("codec_shapes_int8") KVTRIM_CODEC_SHAPE_ROWS(1);
BENCHMARK(codec_decode<kt::codec::int4>)->Name("codec_shapes_int4") KVTRIM_CODEC_SHAPE_ROWS(5);
BENCHMARK(codec_decode<kt::codec::fp8>)->Name("codec_shapes_fp8") KVTRIM_CODEC_SHAPE_ROWS(4);
// The A/B of the encode (issue 12): the same rows at GQA 4 with the element kernels that preceded the 16-byte
// ones (kvtrim::cuda_detail::legacy_codec_encode; the bytes are the same), in the same run.
template <class CodecT>
void codec_legacy_encode(benchmark::State& state) {
  kt::cuda_detail::legacy_codec_encode = true;
  codec_decode<CodecT>(state);
  kt::cuda_detail::legacy_codec_encode = false;
}
#define KVTRIM_LEGACY_ENCODE_ROWS(codec_id)                                                             \
  ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "codec"})                           \
      ->Args({8, 32768, 32, 8, 128, codec_id})                                                          \
      ->UseManualTime()                                                                                 \
      ->Iterations(50)                                                                                  \
      ->Unit(benchmark::kMicrosecond)
BENCHMARK(codec_legacy_encode<kt::codec::int8>)->Name("codec_legacy_encode_int8") KVTRIM_LEGACY_ENCODE_ROWS(1);
BENCHMARK(codec_legacy_encode<kt::codec::int8>)->Name("codec_legacy_encode_int8_zero_point") KVTRIM_LEGACY_ENCODE_ROWS(2);
BENCHMARK(codec_legacy_encode<kt::codec::int4>)->Name("codec_legacy_encode_int4_zero_point") KVTRIM_LEGACY_ENCODE_ROWS(3);
BENCHMARK(codec_legacy_encode<kt::codec::fp8>)->Name("codec_legacy_encode_fp8") KVTRIM_LEGACY_ENCODE_ROWS(4);
BENCHMARK(codec_legacy_encode<kt::codec::int4>)->Name("codec_legacy_encode_int4") KVTRIM_LEGACY_ENCODE_ROWS(5);
BENCHMARK(codec_legacy_encode<kt::codec::fp8>)->Name("codec_legacy_encode_fp8_fixed_scales") KVTRIM_LEGACY_ENCODE_ROWS(6);
BENCHMARK(codec_decode<kt::codec::low_rank>)->Name("codec_decode_low_rank_sequence") KVTRIM_CODEC_ROWS(9);
// The appends after a compaction of 4k and of 32k tokens per head (W's heads).
#define KVTRIM_APPEND_ROWS                                                                                   \
  ->ArgNames({"batch", "tokens", "kv_heads", "head_dim"})                                                   \
      ->Args({8, 4096, 8, 128})                                                                             \
      ->Args({8, 32768, 8, 128})                                                                            \
      ->UseManualTime()                                                                                     \
      ->Iterations(10)                                                                                      \
      ->Unit(benchmark::kMicrosecond)
BENCHMARK(low_rank_append<false>)->Name("low_rank_sequence_append") KVTRIM_APPEND_ROWS;
BENCHMARK(low_rank_append<true>)->Name("low_rank_profile_append") KVTRIM_APPEND_ROWS;
BENCHMARK(low_rank_host_fit)->ArgNames({"tokens", "head_dim"})->Args({4096, 128})->Args({32768, 128})->Iterations(2)->Unit(benchmark::kMillisecond);
// Pre-RoPE keys cost O(head_dim · r) products and head_dim / 2 rotations per token (compute-bound): fewer repetitions.
BENCHMARK(codec_decode<kt::codec::low_rank>)
    ->Name("codec_decode_low_rank_pre_rope")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "codec"})
    ->Args({8, 32768, 32, 8, 128, 8})
    ->UseManualTime()
    ->Iterations(5)
    ->Unit(benchmark::kMicrosecond);

// Workload W (batch 8, 32 q heads, 8 kv heads, D 128) over paged (pages of 16, scattered) and flat caches.
// lengths: 0 every head full, 1 every head 30 %, 2 Ada-KV-like 5–90 % (mean 30 %).
BENCHMARK(ragged_decode<kt::layout::paged>)
    ->Name("decode_attention_paged")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "lengths", "page", "scattered"})
    ->Args({8, 4096, 32, 8, 128, 0, 16, 1})
    ->Args({8, 32768, 32, 8, 128, 0, 16, 1})
    ->Args({8, 32768, 32, 8, 128, 1, 16, 1})
    ->Args({8, 32768, 32, 8, 128, 2, 16, 1})
    // the cost of scattered pages: the same pool in order, and pages of 64
    ->Args({8, 32768, 32, 8, 128, 0, 16, 0})
    ->Args({8, 32768, 32, 8, 128, 0, 64, 1})
    // time vs tokens (docs/img/decode_layouts.png), every head full
    ->Args({8, 8192, 32, 8, 128, 0, 16, 1})
    ->Args({8, 16384, 32, 8, 128, 0, 16, 1})
    ->Args({8, 65536, 32, 8, 128, 0, 16, 1})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(ragged_decode<kt::layout::flat>)
    ->Name("decode_attention_flat")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "lengths", "page", "scattered"})
    ->Args({8, 4096, 32, 8, 128, 0, 0, 0})
    ->Args({8, 32768, 32, 8, 128, 0, 0, 0})
    ->Args({8, 32768, 32, 8, 128, 1, 0, 0})
    ->Args({8, 32768, 32, 8, 128, 2, 0, 0})
    ->Args({8, 8192, 32, 8, 128, 0, 0, 0})
    ->Args({8, 16384, 32, 8, 128, 0, 0, 0})
    ->Args({8, 65536, 32, 8, 128, 0, 0, 0})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);

namespace {

/// Decode attention over layout::shared_paged: an engine's own head-shared page
/// tensor (FlashInfer / vLLM [pages, 2, page, kv_heads, D] for NHD, [pages, 2,
/// kv_heads, page, D] for HND) bound with bind_pages, every sequence `tokens`
/// long (a uniform budget), pages scattered through the pool or in order.
/// Bytes: the K and V rows the sequences hold, as ragged_decode.
void shared_paged_decode(benchmark::State& state) {
  using view_type = kt::layout::shared_paged::view<kt::codec::fp16, kt::device_space>;
  const std::int64_t batch = state.range(0), tokens = state.range(1), page = state.range(5);
  const auto order = state.range(6) == 0 ? kt::layout::shared_paged::order::nhd : kt::layout::shared_paged::order::hnd;
  const bool scattered = state.range(7) != 0;
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  const std::int64_t per_sequence = kt::layout::shared_paged::pages_for(tokens, page), pages = batch * per_sequence;
  const kt::layout::shared_paged::pool_size pool{pages, page, order};
  const std::int64_t tensor_elements = view_type::tensor_rows(shape, pool) * shape.head_dim;
  __half* tensor = nullptr;
  void* metadata = nullptr;
  check(cudaMalloc(&tensor, tensor_elements * sizeof(__half)), "cudaMalloc(page tensor)");
  check(cudaMalloc(&metadata, view_type::metadata_bytes(shape, batch, pool)), "cudaMalloc(metadata)");
  const view_type view = view_type::bind_pages(reinterpret_cast<kt::half*>(tensor), metadata, shape, batch, pool);
  std::vector<std::int32_t> permutation(static_cast<std::size_t>(pages));
  std::iota(permutation.begin(), permutation.end(), 0);
  if (scattered) std::shuffle(permutation.begin(), permutation.end(), std::mt19937_64(7));
  std::vector<std::int32_t> indptr(static_cast<std::size_t>(batch + 1)), last(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b <= batch; ++b) indptr[b] = static_cast<std::int32_t>(b * per_sequence);
  for (std::int64_t b = 0; b < batch; ++b) last[b] = static_cast<std::int32_t>((tokens - 1) % page + 1);
  const std::int32_t no_free_pages = 0;
  check(cudaMemcpy(view.indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice), "indptr");
  check(cudaMemcpy(view.indices, permutation.data(), permutation.size() * 4, cudaMemcpyHostToDevice), "indices");
  check(cudaMemcpy(view.last_page_len, last.data(), last.size() * 4, cudaMemcpyHostToDevice), "last_page_len");
  check(cudaMemcpy(view.free_count, &no_free_pages, 4, cudaMemcpyHostToDevice), "free_count");
  fill_random<<<1024, 256>>>(tensor, tensor_elements, 1);
  kt::layout::shared_paged::check("bench", view);
  time_one_query_decode(state, view, batch,
                        2.0 * static_cast<double>(batch * shape.kv_heads * tokens * shape.head_dim) * sizeof(__half));
  cudaFree(tensor), cudaFree(metadata);
}

}  // namespace

// An engine's head-shared pages (layout::shared_paged, bound with no copy): W at 4k and 32k, NHD and HND,
// pages of 16 scattered; 32k with pages in order, and pages of 64.
BENCHMARK(shared_paged_decode)
    ->Name("decode_attention_shared_paged")
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "page", "hnd", "scattered"})
    ->Args({8, 4096, 32, 8, 128, 16, 0, 1})
    ->Args({8, 32768, 32, 8, 128, 16, 0, 1})
    ->Args({8, 32768, 32, 8, 128, 16, 1, 1})
    ->Args({8, 32768, 32, 8, 128, 16, 0, 0})
    ->Args({8, 32768, 32, 8, 128, 64, 1, 1})
    // time vs tokens (docs/img/decode_layouts.png), NHD pages of 16 scattered
    ->Args({8, 8192, 32, 8, 128, 16, 0, 1})
    ->Args({8, 16384, 32, 8, 128, 16, 0, 1})
    ->Args({8, 65536, 32, 8, 128, 16, 0, 1})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();

// ---- issue 16: the eviction metric's cost (eviction::attend with and without it) ----
namespace {

/// Workload W over a paged fp16 cache (pages of 16, scattered), every head `tokens` long:
/// decode attention through eviction::attend, with the metric side output (metric = 1)
/// or without (metric = 0); metric = 2 stores the logits without the L2 evict_last policy
/// (metric_l2_hints::logits_in_l2 off: what keeping them in L2 saves); (metric = 3, the K/V
/// stream's lines marked evict_first, was removed with that hint on 2026-12-05); metric = 4 makes
/// the logits a persisting L2 window (metric_l2_hints::persisting_logits) with the device's
/// largest persisting set-aside for the row (cudaLimitPersistingL2CacheSize, reset after). The bytes counted
/// are the cache's K/V only, so the rows' median_us give the metric's cost directly.
void decode_attention_metric(benchmark::State& state) {
  using view_type = kt::layout::paged::view<kt::codec::fp16, kt::device_space>;
  const std::int64_t batch = state.range(0), tokens = state.range(1), page = 16;
  const bool with_metric = state.range(5) != 0;
  const kt::eviction::metric_l2_hints hints{.logits_in_l2 = state.range(5) != 2,
                                            .persisting_logits = state.range(5) == 4};
  if (hints.persisting_logits) {
    int device = 0, largest = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&largest, cudaDevAttrMaxPersistingL2CacheSize, device), "MaxPersistingL2CacheSize");
    check(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, static_cast<std::size_t>(largest)), "set-aside");
    state.counters["persisting_set_aside_MB"] = largest / 1e6;
  }
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  const std::int64_t heads = batch * shape.kv_heads, pages_per_head = (tokens + page - 1) / page;
  const kt::layout::paged::pool_size pool{heads * pages_per_head, page};
  void* memory = nullptr;
  check(cudaMalloc(&memory, view_type::bytes(shape, batch, pool)), "cudaMalloc(cache)");
  const view_type view = view_type::bind(memory, shape, batch, pool);
  scattered_pages(heads, tokens, page).upload(view);  // positions 0 … tokens − 1: a 64-token window protected
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(view.storage.keys), pool.pages * page * shape.head_dim, 1);
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(view.storage.values), pool.pages * page * shape.head_dim, 2);

  const std::int64_t query_elements = batch * shape.q_heads * shape.head_dim;
  __half *queries = nullptr, *out = nullptr;
  float* metric = nullptr;
  check(cudaMalloc(&queries, query_elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&out, query_elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&metric, pool.pages * page * sizeof(float)), "cudaMalloc(metric)");
  check(cudaMemset(metric, 0, pool.pages * page * sizeof(float)), "cudaMemset(metric)");
  fill_random<<<64, 256>>>(queries, query_elements, 3);
  const std::array<std::int64_t, 3> query_extents{batch, shape.q_heads, shape.head_dim};
  const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(queries), query_extents);
  const auto out_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out), query_extents);
  const kt::eviction::metric_output<kt::device_space> output{with_metric ? metric : nullptr, pool.pages * page};
  const std::size_t scratch_bytes = kt::eviction::attend_workspace(view, output);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(state, stream, [&] {
    kt::eviction::attend(query_view, view, out_view, output, {scratch, scratch_bytes}, stream, hints);
  });
  const double cache_bytes = 2.0 * static_cast<double>(heads * tokens * shape.head_dim) * sizeof(__half);
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(cache_bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["cache_TBps"] = cache_bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = cache_bytes / median / measured_copy_bandwidth;
  cudaFree(queries), cudaFree(out), cudaFree(metric), cudaFree(scratch), cudaFree(memory);
  cudaStreamDestroy(stream);
  if (hints.persisting_logits) {
    check(cudaCtxResetPersistingL2Cache(), "cudaCtxResetPersistingL2Cache");
    check(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, 0), "set-aside off");
  }
}

}  // namespace

// W at 32k and 4k tokens, without and with the metric (the issue's goal: ≤ 5 % more at 32k).
BENCHMARK(decode_attention_metric)
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "metric"})
    ->Args({8, 32768, 32, 8, 128, 0})
    ->Args({8, 32768, 32, 8, 128, 1})
    ->Args({8, 32768, 32, 8, 128, 2})
    ->Args({8, 32768, 32, 8, 128, 4})
    ->Args({8, 4096, 32, 8, 128, 0})
    ->Args({8, 4096, 32, 8, 128, 1})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);

// ---- issue 11: multi-query decode (speculative decoding: n new tokens per sequence) ----
namespace {

/// Workload W's contiguous fp16 cache attended by n = 1..8 new query tokens per sequence
/// (queries [B, n, Hq, D]; the new tokens are the cache's last n): the same cache bytes as
/// one query, read once for the Group × n query rows, so bytes/s is counted on the cache
/// alone and should stay near n = 1's.
void decode_attention_multi_query(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cuda>;
  const std::int64_t batch = state.range(0), tokens = state.range(1), queries_per_sequence = state.range(5);
  const kt::model_shape shape{.q_heads = state.range(2), .kv_heads = state.range(3), .head_dim = state.range(4)};
  auto cache = scheme::make_cache(shape, batch, tokens, kt::codec::fp16::config{});
  const std::int64_t cache_elements = batch * shape.kv_heads * tokens * shape.head_dim;
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(cache.view().storage.keys), cache_elements, 1);
  fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(cache.view().storage.values), cache_elements, 2);
  *cache.view().length = tokens;

  const std::int64_t query_elements = batch * queries_per_sequence * shape.q_heads * shape.head_dim;
  __half *queries = nullptr, *out = nullptr;
  check(cudaMalloc(&queries, query_elements * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&out, query_elements * sizeof(__half)), "cudaMalloc");
  fill_random<<<64, 256>>>(queries, query_elements, 3);
  const std::array<std::int64_t, 4> extents{batch, queries_per_sequence, shape.q_heads, shape.head_dim};
  const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(queries), extents);
  const auto out_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out), extents);

  const std::size_t scratch_bytes = scheme::attend_workspace(cache.view(), queries_per_sequence);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(scratch_bytes, 1)), "cudaMalloc");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(
      state, stream, [&] { scheme::attend(query_view, cache.view(), out_view, {scratch, scratch_bytes}, stream); });
  const double cache_bytes = 2.0 * static_cast<double>(cache_elements) * sizeof(__half);
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(cache_bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["cache_TBps"] = cache_bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = cache_bytes / median / measured_copy_bandwidth;
  cudaFree(queries), cudaFree(out), cudaFree(scratch);
  cudaStreamDestroy(stream);
}

}  // namespace

// Workload W at 32k and 4k tokens, n = 1, 2, 4, 8 (n = 1 through the multi-query entry: the single-query kernel).
BENCHMARK(decode_attention_multi_query)
    ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "head_dim", "queries"})
    ->Args({8, 32768, 32, 8, 128, 1})
    ->Args({8, 32768, 32, 8, 128, 2})
    ->Args({8, 32768, 32, 8, 128, 4})
    ->Args({8, 32768, 32, 8, 128, 8})
    ->Args({8, 4096, 32, 8, 128, 1})
    ->Args({8, 4096, 32, 8, 128, 8})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
