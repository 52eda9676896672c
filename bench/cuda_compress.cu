// Compression on the GPU (backend::cuda) at workload W of issue 10: batch 8,
// 32 query heads, 8 kv heads, head dim 128, fp16, 32k tokens, keep 30%.
//
// Rows (CUDA events around each call; L2 flushed before every repetition with
// cuda_common.cuh's l2_flusher (KVTRIM_BENCH_FLUSH), so inputs come from HBM as after a prefill):
//   device_copy                      the copy bandwidth of this run (read + write)
//   select_top_k                     the selection stage alone on [8, 8, 32k] scores
//   select_segmented_sort_baseline   the selection as it was before issue 10
//                                    (cub::DeviceSegmentedSort + DeviceSelect),
//                                    kept here to show what the radix select replaced
//   adaptive_select                  budget::adaptive keep_counts + select_top_k
//   compress_static_window_uniform   the whole scheme<contiguous, static_window,
//                                    uniform, fp16, cuda>::compress
//   compress_scheme<L, S, B>         the whole compress of the seed systems, per
//                                    layout: SnapKV + uniform × {contiguous, flat,
//                                    paged 16}, Ada-SnapKV × {flat, paged 16} (Ada-KV
//                                    needs a ragged layout), RazorAttention
//                                    (one retrieval head of 8) × {flat, paged 16};
//                                    bytes: K and V read once, the kept rows written
//   adaptive_budget                  budget::adaptive keep_counts alone, one GPU, on
//                                    `heads` of the 8 kv heads (a rank's share)
//   adaptive_budget_sharded          the sharded keep_counts of one rank of `ranks`
//                                    (8 / ranks local heads of 8) with
//                                    comm::single_process: the rank's kernels
//                                    without the collectives' latency (issue 17)
//   adaptive_budget_simulated_ranks  the whole sharded step, `ranks` ranks as host
//                                    threads + streams on this one GPU
//                                    (comm::simulated_device), wall time of the
//                                    slowest rank: kernels, the simulated
//                                    all-reduces and the host barriers
//   adaptive_budget_nccl             the same over NCCL, rank r on GPU r (skipped
//                                    below `ranks` GPUs): the slowest rank's CUDA
//                                    events around its call, collectives included
//   compress_sharded/<S>/<B>/<L>     issue 17: one rank's scheme::compress with a
//                                    head_shard (comm::single_process) on kv_heads
//                                    heads, against compress/<S>/<B>/<L> on as many
//   evict_step[_sharded]/paged      issue 17: one eviction step (32 layers, cross_layer
//                                    or per_layer, keep 1024, every unit over target), one-GPU
//                                    kvtrim::evict vs one rank's sharded step
//                                    (comm::single_process) on `heads` kv heads
// Each row reports its median time, the bytes a kernel must at least move
// (see each row) per second, and that rate as a fraction of the copy's.
//
//   bench_cuda_compress --benchmark_format=json > compress.json
// bench/torch_compress.py times torch's SnapKV pipeline (and kvpress's presses,
// when installed) on the same workload.
#include <kvtrim/cuda.cuh>

#include <benchmark/benchmark.h>

#include "cuda_common.cuh"
#include "cuda_low_rank_bases.cuh"
#include "cuda_prefill_lse.cuh"

#include <cub/device/device_segmented_sort.cuh>
#include <cub/device/device_select.cuh>

#include <kvtrim/comm/simulated_device.cuh>
#include <kvtrim/comm/single_process.hpp>
#if defined(KVTRIM_HAS_NCCL)
#include <kvtrim/comm/nccl.cuh>
#endif

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <vector>

namespace kt = kvtrim;
using kvtrim_bench::check;
using kvtrim_bench::device_copy;
using kvtrim_bench::measured_copy_bandwidth;

namespace {

__device__ std::uint32_t hash(std::uint64_t i, std::uint32_t seed) {
  std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u ^ seed ^ static_cast<std::uint32_t>(i >> 32);
  x ^= x >> 15, x *= 2246822519u, x ^= x >> 13, x *= 3266489917u, x ^= x >> 16;
  return x;
}

/// Deterministic pseudo-random fp16 in [-1, 1).
__global__ void fill_random(__half* data, std::int64_t count, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    data[i] = __float2half(static_cast<float>(hash(i, seed) & 0xffff) / 32768.0f - 1.0f);
}

/// Scores like an attention scorer's: positive, heavy-tailed, on a per-head
/// scale (head h of the 8: 2^h), so Ada-KV's pool is uneven across heads; the
/// last 64 tokens of each head (the observation window) scored +∞.
__global__ void fill_scores(float* scores, std::int64_t heads, std::int64_t kv_heads, std::int64_t tokens) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < heads * tokens;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t token = i % tokens, h = (i / tokens) % kv_heads;
    const float u = (static_cast<float>(hash(i, 7) >> 8) + 0.5f) / 16777216.0f;
    scores[i] = token >= tokens - 64 ? INFINITY : -logf(u) * exp2f(static_cast<float>(h));
  }
}

/// Times `call` with events (L2 flushed first), fills the state's counters with
/// the median and `bytes` / median against the copy bandwidth.
void time_calls(benchmark::State& state, double bytes, cudaStream_t stream, const std::function<void()>& call) {
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(state, stream, call);
  const double median = seconds[seconds.size() / 2];
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["median_us"] = median * 1e6;
  state.counters["min_bytes_TBps"] = bytes / median / 1e12;
  if (measured_copy_bandwidth > 0) state.counters["fraction_of_copy"] = bytes / median / measured_copy_bandwidth;
}

/// Scores, counts and outputs of the selection rows.
struct selection_buffers {
  std::int64_t batch, kv_heads, tokens, heads;
  float* scores = nullptr;
  std::int32_t *counts = nullptr, *kept = nullptr;
  std::int64_t* offsets = nullptr;
  selection_buffers(std::int64_t b, std::int64_t h, std::int64_t t) : batch(b), kv_heads(h), tokens(t), heads(b * h) {
    check(cudaMalloc(&scores, sizeof(float) * heads * tokens), "cudaMalloc");
    check(cudaMalloc(&counts, sizeof(std::int32_t) * heads), "cudaMalloc");
    check(cudaMalloc(&kept, sizeof(std::int32_t) * heads * tokens), "cudaMalloc");
    check(cudaMalloc(&offsets, sizeof(std::int64_t) * (heads + 1)), "cudaMalloc");
    fill_scores<<<1024, 256>>>(scores, heads, kv_heads, tokens);
    check(cudaDeviceSynchronize(), "fill_scores");
  }
  ~selection_buffers() { cudaFree(scores), cudaFree(counts), cudaFree(kept), cudaFree(offsets); }
  kt::tensor_view<const float, 3, kt::device_space> view() const {
    return kt::make_view<kt::device_space>(static_cast<const float*>(scores),
                                           std::array<std::int64_t, 3>{batch, kv_heads, tokens});
  }
  /// Reading the scores once and writing the kept indices: what any selection moves.
  double min_bytes(double keep) const {
    return static_cast<double>(heads * tokens) * (sizeof(float) + keep * sizeof(std::int32_t));
  }
};

void select_top_k(benchmark::State& state) {
  using select = kt::implementation<kt::stage::select_top_k, kt::backend::cuda>;
  selection_buffers buffers(state.range(0), state.range(1), state.range(2));
  const double keep = 0.3;
  kt::budget::uniform::config cfg;
  cfg.keep = kt::keep_ratio{keep};
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  kt::implementation<kt::budget::uniform, kt::backend::cuda>::keep_counts(cfg, buffers.view(), buffers.counts, stream);
  const std::size_t bytes = select::workspace_bytes(buffers.heads, buffers.tokens);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
  time_calls(state, buffers.min_bytes(keep), stream, [&] {
    select::select(buffers.view(), buffers.counts, buffers.offsets, buffers.kept, {scratch, bytes}, stream);
  });
  state.counters["workspace_MiB"] = static_cast<double>(bytes) / (1 << 20);
  cudaFree(scratch);
  cudaStreamDestroy(stream);
}

// ---- the selection before issue 10, for comparison only ---------------------
template <class T>
__global__ void baseline_prepare(const float* scores, std::uint32_t* keys, std::int32_t* tokens_out,
                                 std::uint8_t* flags, std::int64_t* segment_offsets, std::int64_t heads,
                                 std::int64_t tokens) {
  const std::int64_t total = heads * tokens;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i <= total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    if (i < total) {
      keys[i] = kt::cuda_detail::rank_key(scores[i]);
      tokens_out[i] = static_cast<std::int32_t>(i % tokens);
      flags[i] = 0;
    }
    if (i % tokens == 0) segment_offsets[i / tokens] = i;
  }
}
template <class T>
__global__ void baseline_flag(const std::int32_t* sorted_tokens, const std::int32_t* counts, std::uint8_t* flags,
                              std::int64_t heads, std::int64_t tokens) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < heads * tokens;
       i += std::int64_t{gridDim.x} * blockDim.x)
    if (i % tokens < counts[i / tokens]) flags[(i / tokens) * tokens + sorted_tokens[i]] = 1;
}

void select_segmented_sort_baseline(benchmark::State& state) {
  selection_buffers buffers(state.range(0), state.range(1), state.range(2));
  const std::int64_t items = buffers.heads * buffers.tokens;
  const double keep = 0.3;
  kt::budget::uniform::config cfg;
  cfg.keep = kt::keep_ratio{keep};
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  kt::implementation<kt::budget::uniform, kt::backend::cuda>::keep_counts(cfg, buffers.view(), buffers.counts, stream);
  std::uint32_t *keys = nullptr, *sorted_keys = nullptr;
  std::int32_t *tokens = nullptr, *sorted_tokens = nullptr;
  std::uint8_t* flags = nullptr;
  std::int64_t *segments = nullptr, *selected = nullptr;
  check(cudaMalloc(&keys, 4 * items), "cudaMalloc");
  check(cudaMalloc(&sorted_keys, 4 * items), "cudaMalloc");
  check(cudaMalloc(&tokens, 4 * items), "cudaMalloc");
  check(cudaMalloc(&sorted_tokens, 4 * items), "cudaMalloc");
  check(cudaMalloc(&flags, items), "cudaMalloc");
  check(cudaMalloc(&segments, 8 * (buffers.heads + 1)), "cudaMalloc");
  check(cudaMalloc(&selected, 8), "cudaMalloc");
  std::size_t sort_bytes = 0, select_bytes = 0;
  cub::DeviceSegmentedSort::StableSortPairsDescending(nullptr, sort_bytes, keys, sorted_keys, tokens, sorted_tokens,
                                                      items, buffers.heads, segments, segments + 1);
  cub::DeviceSelect::Flagged(nullptr, select_bytes, tokens, flags, buffers.kept, selected, items);
  const std::size_t cub_bytes = std::max(sort_bytes, select_bytes);
  void* cub_scratch = nullptr;
  check(cudaMalloc(&cub_scratch, cub_bytes), "cudaMalloc");
  const unsigned blocks = 1024;
  time_calls(state, buffers.min_bytes(keep), stream, [&] {
    baseline_prepare<int><<<blocks, 256, 0, stream>>>(buffers.scores, keys, tokens, flags, segments, buffers.heads,
                                                      buffers.tokens);
    std::size_t b = cub_bytes;
    cub::DeviceSegmentedSort::StableSortPairsDescending(cub_scratch, b, keys, sorted_keys, tokens, sorted_tokens,
                                                        items, buffers.heads, segments, segments + 1, stream);
    baseline_flag<int><<<blocks, 256, 0, stream>>>(sorted_tokens, buffers.counts, flags, buffers.heads, buffers.tokens);
    b = cub_bytes;
    cub::DeviceSelect::Flagged(cub_scratch, b, tokens, flags, buffers.kept, selected, items, stream);
  });
  cudaFree(keys), cudaFree(sorted_keys), cudaFree(tokens), cudaFree(sorted_tokens), cudaFree(flags);
  cudaFree(segments), cudaFree(selected), cudaFree(cub_scratch);
  cudaStreamDestroy(stream);
}

void adaptive_select(benchmark::State& state) {
  using select = kt::implementation<kt::stage::select_top_k, kt::backend::cuda>;
  using adaptive = kt::implementation<kt::budget::adaptive, kt::backend::cuda>;
  selection_buffers buffers(state.range(0), state.range(1), state.range(2));
  const double keep = 0.3;
  kt::budget::adaptive::config cfg;
  cfg.keep = kt::keep_ratio{keep};
  const kt::model_shape shape{.q_heads = 4 * buffers.kv_heads, .kv_heads = buffers.kv_heads, .head_dim = 128};
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::size_t select_bytes = select::workspace_bytes(buffers.heads, buffers.tokens);
  const std::size_t budget_bytes = adaptive::workspace_bytes(cfg, shape, buffers.batch, buffers.tokens);
  void *select_scratch = nullptr, *budget_scratch = nullptr;
  check(cudaMalloc(&select_scratch, std::max<std::size_t>(select_bytes, 1)), "cudaMalloc");
  check(cudaMalloc(&budget_scratch, std::max<std::size_t>(budget_bytes, 1)), "cudaMalloc");
  time_calls(state, buffers.min_bytes(keep), stream, [&] {
    adaptive::keep_counts(cfg, buffers.view(), buffers.counts, {budget_scratch, budget_bytes}, stream);
    select::select(buffers.view(), buffers.counts, buffers.offsets, buffers.kept, {select_scratch, select_bytes}, stream);
  });
  // How uneven Ada-KV made the heads of sequence 0 (kept tokens of its 8 heads).
  std::vector<std::int32_t> counts(static_cast<std::size_t>(buffers.heads));
  check(cudaMemcpy(counts.data(), buffers.counts, 4 * counts.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
  state.counters["head0_keep"] = counts[0];
  state.counters["head7_keep"] = counts[std::min<std::size_t>(7, counts.size() - 1)];
  cudaFree(select_scratch), cudaFree(budget_scratch);
  cudaStreamDestroy(stream);
}

void compress_static_window_uniform(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cuda>;
  const std::int64_t batch = state.range(0), kv_heads = state.range(1), tokens = state.range(2);
  const kt::model_shape shape{.q_heads = state.range(3), .kv_heads = kv_heads, .head_dim = state.range(4)};
  const double keep = 0.3;
  scheme::config cfg;
  cfg.budget.keep = kt::keep_ratio{keep};
  cfg.score.sinks = 4;
  cfg.score.windows.assign(static_cast<std::size_t>(kv_heads), 64);
  const std::int64_t kept = kt::budget::uniform::max_keep(cfg.budget, tokens);
  const std::int64_t elements = batch * kv_heads * tokens * shape.head_dim;
  __half *keys = nullptr, *values = nullptr;
  check(cudaMalloc(&keys, sizeof(__half) * elements), "cudaMalloc");
  check(cudaMalloc(&values, sizeof(__half) * elements), "cudaMalloc");
  fill_random<<<1024, 256>>>(keys, elements, 1);
  fill_random<<<1024, 256>>>(values, elements, 2);
  const std::array<std::int64_t, 4> extents{batch, kv_heads, tokens, shape.head_dim};
  const auto key_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(keys), extents);
  const auto value_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(values), extents);
  auto cache = scheme::make_cache(shape, batch, kept, kt::codec::fp16::config{});
  const std::size_t bytes = scheme::compress_workspace(shape, batch, tokens, cfg);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  auto view = cache.view();
  // A static window reads only the kept rows: read them and write them once.
  const double moved = 2.0 * 2.0 * static_cast<double>(batch * kv_heads * kept * shape.head_dim) * sizeof(__half);
  time_calls(state, moved, stream, [&] { scheme::compress(key_view, value_view, view, cfg, {scratch, bytes}, stream); });
  // Reading all of K and V once and writing the kept 30% (a scorer that reads K: SnapKV).
  const double full = 2.0 * static_cast<double>(elements) * sizeof(__half) * (1.0 + keep);
  if (measured_copy_bandwidth > 0)
    state.counters["snapkv_floor_us"] = full / measured_copy_bandwidth * 1e6;
  cudaFree(keys), cudaFree(values), cudaFree(scratch);
  cudaStreamDestroy(stream);
}

template <class Layout>
auto bench_pool(std::int64_t batch, std::int64_t kv_heads, std::int64_t tokens) {
  if constexpr (std::is_same_v<Layout, kt::layout::paged>)
    return kt::layout::paged::pool_size{batch * kv_heads * ((tokens + 15) / 16 + 1), 16};
  else if constexpr (std::is_same_v<Layout, kt::layout::flat>)
    return kt::layout::flat::pool_size{batch * kv_heads * tokens};
  else
    return tokens;
}

/// The whole compress of scheme<Layout, Scorer, Budget, fp16, cuda> at W, with the
/// SnapKV scorer's 64 observation-window queries (RazorAttention reads none).
/// CheckFinite = false: compress_options::check_finite off (no NaN/Inf scan of
/// K, V and the window queries before planning: what an engine that guarantees
/// finite activations pays).
/// CodecT (issue 12: what the device encode adds inside a compress): the kept rows are
/// encoded by the compaction; a sixth argument picks the variant as in
/// cuda_decode_attention.cu's codec rows (2, 3: zero points; 6: fp8 fixed scales; 7: low_rank at r =
/// head_dim / 4 with profile bases, installed before timing; 9: low_rank with sequence bases, fitted on
/// the device inside every compress).
/// GivenLse (issue 10, SnapKV): the window queries' softmax normalisers handed in
/// (config.score.lse, as an engine's prefill attention has them; made once before
/// timing by kvtrim's own pass 1): the scorer runs its second pass over K only.
/// Padded: 0 every sequence all T tokens; 1 a right-padded batch whose lengths are all T
/// (compress_options::sequence_lengths: the per-sequence launches' cost on the same work);
/// 2 lengths spread from T down to T/2 + (T/2)/B (bytes moved counted over each prompt only).
template <class Layout, class Scorer, class Budget, bool Sharded = false, bool CheckFinite = true,
          class CodecT = kt::codec::fp16, bool GivenLse = false, int Padded = 0>
void compress_scheme(benchmark::State& state) {
  using scheme = kt::scheme<Layout, Scorer, Budget, CodecT, kt::backend::cuda>;
  const std::int64_t batch = state.range(0), kv_heads = state.range(1), tokens = state.range(2);
  const kt::model_shape shape{.q_heads = state.range(3), .kv_heads = kv_heads, .head_dim = state.range(4)};
  const std::int64_t window = 64;
  const double keep = 0.3;
  typename scheme::config cfg;
  if constexpr (std::is_same_v<Scorer, kt::score::snapkv>) {
    cfg.score.window = window;
    cfg.budget.keep = kt::keep_ratio{keep};
  } else {  // RazorAttention: head 0 of each layer a retrieval head (≈ 15 % in the paper), sinks 4, recent 20 %
    cfg.score.retrieval.assign(static_cast<std::size_t>(kv_heads), false);
    cfg.score.retrieval[0] = true;
    cfg.score.sinks = 4;
    cfg.score.min_recent = 64;
    cfg.score.recent_fraction = 0.2;
  }
  const std::int64_t elements = batch * kv_heads * tokens * shape.head_dim;
  const std::int64_t query_elements = batch * shape.q_heads * window * shape.head_dim;
  __half *keys = nullptr, *values = nullptr, *queries = nullptr;
  check(cudaMalloc(&keys, sizeof(__half) * elements), "cudaMalloc");
  check(cudaMalloc(&values, sizeof(__half) * elements), "cudaMalloc");
  check(cudaMalloc(&queries, sizeof(__half) * query_elements), "cudaMalloc");
  fill_random<<<1024, 256>>>(keys, elements, 1);
  fill_random<<<1024, 256>>>(values, elements, 2);
  fill_random<<<1024, 256>>>(queries, query_elements, 3);
  const std::array<std::int64_t, 4> extents{batch, kv_heads, tokens, shape.head_dim};
  const std::array<std::int64_t, 4> query_extents{batch, shape.q_heads, window, shape.head_dim};
  const auto key_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(keys), extents);
  const auto value_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(values), extents);
  const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(queries), query_extents);
  typename CodecT::config codec_config{};
  std::int64_t variant = 0;
  if constexpr (!std::is_same_v<CodecT, kt::codec::fp16>) variant = state.range(5);
  if constexpr (requires { codec_config.asymmetric; }) codec_config.asymmetric = variant == 2 || variant == 3;
  if constexpr (requires { codec_config.scales; })
    codec_config.scales = variant == 6 ? kt::codec::fp8_scaling::fixed : kt::codec::fp8_scaling::head_amax;
  if constexpr (std::is_same_v<CodecT, kt::codec::low_rank>) {
    codec_config.source = variant == 9 ? kt::codec::basis_source::sequence : kt::codec::basis_source::profile;
    codec_config.max_rank = shape.head_dim / 4;
  }
  std::optional<kvtrim_bench::prefill_lse> lse;
  if constexpr (GivenLse) {
    static_assert(std::is_same_v<Scorer, kt::score::snapkv>, "given normalisers are SnapKV's (and H2O's)");
    cfg.score = cfg.score.with_lse(lse.emplace(key_view, query_view, shape).view());
  }
  auto cache = scheme::make_cache(shape, batch, bench_pool<Layout>(batch, kv_heads, tokens), codec_config);
  if constexpr (std::is_same_v<CodecT, kt::codec::low_rank>)
    if (variant != 9)
      kvtrim_bench::install_random_low_rank_bases(cache.view().storage, batch * kv_heads, shape.head_dim,
                                                  shape.head_dim / 4);
  const std::int64_t capacity = scheme::kept_tokens_capacity(shape, batch, tokens, cfg);
  std::int64_t* offsets = nullptr;
  std::int32_t* kept = nullptr;
  check(cudaMalloc(&offsets, sizeof(std::int64_t) * (batch * kv_heads + 1)), "cudaMalloc");
  check(cudaMalloc(&kept, sizeof(std::int32_t) * std::max<std::int64_t>(capacity, 1)), "cudaMalloc");
  // Sharded (issue 17): one rank's compress of these heads with the layer's head_shard,
  // comm::single_process (the rank's own kernels, no collective latency).
  const kt::budget::head_shard shard{0, kv_heads, true};
  std::size_t bytes = 0;
  if constexpr (Sharded)
    bytes = scheme::compress_workspace(shape, batch, tokens, cfg, shard);
  else
    bytes = scheme::compress_workspace(shape, batch, tokens, cfg);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  auto view = cache.view();
  std::vector<std::int64_t> lengths(static_cast<std::size_t>(batch), tokens);
  if constexpr (Padded == 2)
    for (std::int64_t b = 0; b < batch; ++b) lengths[static_cast<std::size_t>(b)] = tokens - b * (tokens / 2) / batch;
  kt::compress_options<kt::device_space> none{};
  none.check_finite = CheckFinite;
  if constexpr (Padded != 0) none.sequence_lengths = lengths.data();
  const auto call = [&](const kt::compress_options<kt::device_space>& options) {
    if constexpr (Sharded)
      scheme::compress(key_view, value_view, query_view, view, cfg, options, shard, kt::comm::single_process{},
                       {scratch, bytes}, stream);
    else if constexpr (Scorer::needs_queries)
      scheme::compress(key_view, value_view, query_view, view, cfg, options, {scratch, bytes}, stream);
    else
      scheme::compress(key_view, value_view, view, cfg, options, {scratch, bytes}, stream);
  };
  // The kept total (for the bytes written), from one call with the selection output.
  kt::compress_options<kt::device_space> with_output{0, offsets, kept, capacity};
  with_output.sequence_lengths = none.sequence_lengths;
  call(with_output);
  if constexpr (Layout::ragged_heads) kt::check_status(view, stream);
  std::int64_t total_kept = 0;
  check(cudaMemcpyAsync(&total_kept, offsets + batch * kv_heads, sizeof total_kept, cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  // A K row and a V row as the codec stores them (codes, steps, KIVI's per-run key steps).
  const double row_bytes =
      kt::codec::bytes_per_token<CodecT>(codec_config, shape.head_dim, kt::codec::slot_alignment<CodecT>(codec_config));
  double prompt_elements = 0;  // K and V elements of the prompts (a padded batch's padding is never read)
  for (const std::int64_t length : lengths) prompt_elements += static_cast<double>(length * kv_heads * shape.head_dim);
  const double moved = prompt_elements * 2.0 * sizeof(__half) + static_cast<double>(total_kept) * row_bytes;
  time_calls(state, moved, stream, [&] { call(none); });
  double prompt_tokens = 0;  // a padded batch: of its prompts' tokens
  for (const std::int64_t length : lengths) prompt_tokens += static_cast<double>(length * kv_heads);
  state.counters["kept_fraction"] = static_cast<double>(total_kept) / prompt_tokens;
  cudaFree(keys), cudaFree(values), cudaFree(queries), cudaFree(scratch), cudaFree(offsets), cudaFree(kept);
  cudaStreamDestroy(stream);
}

// ---- issue 17: Ada-KV sharded over tensor-parallel ranks ----------------------
/// The first `heads` of the 8 kv heads of [batch, 8, tokens] scores.
kt::tensor_view<const float, 3, kt::device_space> first_heads(const selection_buffers& buffers, std::int64_t first,
                                                             std::int64_t heads) {
  return {buffers.scores + first * buffers.tokens,
          {buffers.batch, heads, buffers.tokens},
          {buffers.kv_heads * buffers.tokens, buffers.tokens, 1}};
}

void adaptive_budget(benchmark::State& state) {
  using adaptive = kt::implementation<kt::budget::adaptive, kt::backend::cuda>;
  selection_buffers buffers(state.range(0), 8, state.range(2));
  const std::int64_t heads = state.range(1);
  kt::budget::adaptive::config cfg;
  cfg.keep = kt::keep_ratio{0.3};
  const kt::model_shape shape{.q_heads = 4 * heads, .kv_heads = heads, .head_dim = 128};
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::size_t bytes = adaptive::workspace_bytes(cfg, shape, buffers.batch, buffers.tokens);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
  const auto view = first_heads(buffers, 0, heads);
  time_calls(state, static_cast<double>(buffers.batch * heads * buffers.tokens) * sizeof(float), stream,
             [&] { adaptive::keep_counts(cfg, view, buffers.counts, {scratch, bytes}, stream); });
  cudaFree(scratch);
  cudaStreamDestroy(stream);
}

void adaptive_budget_sharded(benchmark::State& state) {
  using adaptive = kt::implementation<kt::budget::adaptive, kt::backend::cuda>;
  selection_buffers buffers(state.range(0), 8, state.range(2));
  const std::int64_t heads = 8 / state.range(1);
  kt::budget::adaptive::config cfg;
  cfg.keep = kt::keep_ratio{0.3};
  const kt::budget::head_shard shard{0, 8, true};
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  const std::size_t bytes = adaptive::sharded_workspace_bytes(cfg, buffers.batch, heads, buffers.tokens, shard);
  void* scratch = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
  const auto view = first_heads(buffers, 0, heads);
  time_calls(state, static_cast<double>(buffers.batch * heads * buffers.tokens) * sizeof(float), stream, [&] {
    adaptive::keep_counts(cfg, view, shard, kt::comm::single_process{}, buffers.counts, {scratch, bytes}, stream);
  });
  // What the collectives would carry per call: 4 · batch · 256 + batch · (H + 1) counts of 8 bytes.
  state.counters["allreduce_bytes"] = static_cast<double>(8 * (4 * buffers.batch * 256 + buffers.batch * 9));
  cudaFree(scratch);
  cudaStreamDestroy(stream);
}

/// The whole sharded Ada-KV step of `ranks` ranks, each on its own host thread and
/// stream with its share of the 8 heads: over comm::simulated_device on this one GPU
/// (Nccl = false; host wall time of the slowest rank: kernels, the simulated
/// all-reduces, the host barriers), or over NCCL with rank r on GPU r (Nccl = true:
/// skipped below `ranks` GPUs or without NCCL; the time is the slowest rank's CUDA
/// events around its call, the collectives' waits included — issue 17's "≤ 1.3× the
/// one-GPU adaptive_budget on the same per-rank heads").
template <bool Nccl>
void adaptive_budget_ranks(benchmark::State& state) {
  using adaptive = kt::implementation<kt::budget::adaptive, kt::backend::cuda>;
  const int ranks = static_cast<int>(state.range(1));
  const std::int64_t heads = 8 / ranks;
  int devices = 0;
  cudaGetDeviceCount(&devices);
#if defined(KVTRIM_HAS_NCCL)
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(ranks));
#endif
  if constexpr (Nccl) {
#if defined(KVTRIM_HAS_NCCL)
    if (devices < ranks) {
      state.SkipWithError("needs one GPU per rank");
      return;
    }
    std::vector<int> device_list(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) device_list[static_cast<std::size_t>(r)] = r;
    if (ncclCommInitAll(comms.data(), ranks, device_list.data()) != ncclSuccess) {
      state.SkipWithError("ncclCommInitAll failed");
      return;
    }
#else
    state.SkipWithError("built without NCCL");
    return;
#endif
  }
  kt::budget::adaptive::config cfg;
  cfg.keep = kt::keep_ratio{0.3};
  kt::comm::simulated_device_group group(Nccl ? 1 : ranks, static_cast<std::size_t>(state.range(0) * 256));
  std::vector<std::unique_ptr<selection_buffers>> buffers(static_cast<std::size_t>(ranks));
  std::vector<cudaStream_t> streams(static_cast<std::size_t>(ranks));
  std::vector<cudaEvent_t> starts(static_cast<std::size_t>(ranks)), stops(static_cast<std::size_t>(ranks));
  std::vector<void*> scratch(static_cast<std::size_t>(ranks));
  std::vector<std::int32_t*> counts(static_cast<std::size_t>(ranks));
  std::size_t bytes = 0;
  for (int r = 0; r < ranks; ++r) {
    const auto i = static_cast<std::size_t>(r);
    check(cudaSetDevice(Nccl ? r : 0), "cudaSetDevice");
    if (Nccl || r == 0) buffers[i] = std::make_unique<selection_buffers>(state.range(0), 8, state.range(2));
    const kt::budget::head_shard shard{r * heads, 8, true};
    bytes = adaptive::sharded_workspace_bytes(cfg, state.range(0), heads, state.range(2), shard);
    cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking);
    cudaEventCreate(&starts[i]), cudaEventCreate(&stops[i]);
    check(cudaMalloc(&scratch[i], bytes), "cudaMalloc");
    check(cudaMalloc(&counts[i], sizeof(std::int32_t) * state.range(0) * heads), "cudaMalloc");
  }
  // Persistent rank threads; each step: every rank calls keep_counts on its stream
  // and waits for it; the step's time is the host wall time until all are done.
  const int steps = static_cast<int>(state.max_iterations) + 1;  // + a warm-up step
  std::barrier start(ranks + 1), done(ranks + 1);
  std::vector<float> rank_ms(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      const auto i = static_cast<std::size_t>(r);
      cudaSetDevice(Nccl ? r : 0);
      const kt::budget::head_shard shard{r * heads, 8, true};
      const auto view = first_heads(*buffers[Nccl ? i : 0], r * heads, heads);
      const auto call = [&](const auto& comm) {
        adaptive::keep_counts(cfg, view, shard, comm, counts[i], {scratch[i], bytes}, streams[i]);
      };
      for (int step = 0; step < steps; ++step) {
        start.arrive_and_wait();
        cudaEventRecord(starts[i], streams[i]);
#if defined(KVTRIM_HAS_NCCL)
        if constexpr (Nccl) call(kt::comm::nccl(comms[i]));
#endif
        if constexpr (!Nccl) call(kt::comm::simulated_device(group, r));
        cudaEventRecord(stops[i], streams[i]);
        cudaStreamSynchronize(streams[i]);
        cudaEventElapsedTime(&rank_ms[i], starts[i], stops[i]);
        done.arrive_and_wait();
      }
    });
  start.arrive_and_wait();  // warm-up
  done.arrive_and_wait();
  std::vector<double> seconds;
  for (auto _ : state) {
    const auto begin = std::chrono::steady_clock::now();
    start.arrive_and_wait();
    done.arrive_and_wait();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
    const double s = Nccl ? *std::max_element(rank_ms.begin(), rank_ms.end()) / 1e3 : wall;
    state.SetIterationTime(s);
    seconds.push_back(s);
  }
  for (auto& t : threads) t.join();
  std::sort(seconds.begin(), seconds.end());
  state.counters["median_us"] = seconds[seconds.size() / 2] * 1e6;
  for (int r = 0; r < ranks; ++r) {
    const auto i = static_cast<std::size_t>(r);
    cudaSetDevice(Nccl ? r : 0);
    cudaFree(scratch[i]), cudaFree(counts[i]);
    cudaEventDestroy(starts[i]), cudaEventDestroy(stops[i]);
    cudaStreamDestroy(streams[i]);
    buffers[i].reset();
  }
#if defined(KVTRIM_HAS_NCCL)
  if constexpr (Nccl)
    for (auto c : comms) ncclCommDestroy(c);
#endif
  cudaSetDevice(0);
}

// ---- issue 17: the eviction step with sharded heads -----------------------------

/// Metric values in [0, 1) on every slot.
__global__ void fill_metric(float* metric, std::int64_t count, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    metric[i] = static_cast<float>(hash(i, seed) & 0xffffff) / 16777216.0f;
}

/// One eviction step (cross-layer, keep 1024, interval 16) over `layers` paged fp16
/// caches of batch × heads heads holding `held` tokens each — every unit over its
/// target. Sharded: the sharded step of one rank holding these heads, with
/// comm::single_process (its kernels and memsets, no collective latency); else the
/// one-GPU kvtrim::evict. Before each timed call the caches and metrics are restored
/// from a snapshot, then L2 is flushed.
template <bool Sharded>
void evict_step(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::paged, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cuda>;
  using view_type = scheme::cache_view;
  const std::int64_t batch = state.range(0), heads = state.range(1), layers = state.range(2), held = state.range(3);
  const auto scope = static_cast<kt::eviction::scope>(state.range(4));
  const kt::model_shape shape{.q_heads = 4 * heads, .kv_heads = heads, .head_dim = 128};
  const kt::layout::paged::pool_size pool{batch * heads * ((held + 15) / 16) + 8, 16};
  const std::int64_t elements = batch * heads * held * shape.head_dim, slots = pool.pages * pool.page_size;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  __half *keys = nullptr, *values = nullptr;
  check(cudaMalloc(&keys, sizeof(__half) * elements), "cudaMalloc");
  check(cudaMalloc(&values, sizeof(__half) * elements), "cudaMalloc");
  fill_random<<<1024, 256, 0, stream>>>(keys, elements, 5);
  fill_random<<<1024, 256, 0, stream>>>(values, elements, 6);
  const std::array<std::int64_t, 4> extents{batch, heads, held, shape.head_dim};
  std::vector<kt::cache<scheme>> caches;
  std::vector<view_type> views;
  std::vector<float*> metrics(static_cast<std::size_t>(layers));
  std::vector<void*> snapshots(static_cast<std::size_t>(2 * layers));
  std::vector<kt::eviction::metric_output<kt::device_space>> outputs;
  const kt::eviction::config cfg{.scope = scope, .keep = 1024, .interval = 16};
  for (std::int64_t l = 0; l < layers; ++l) {
    caches.push_back(scheme::make_cache(shape, batch, pool, kt::codec::fp16::config{}));
    auto view = caches.back().view();
    scheme::append(view, kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(keys), extents),
                   kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(values), extents), stream);
    views.push_back(view);
    const auto i = static_cast<std::size_t>(l);
    check(cudaMalloc(&metrics[i], sizeof(float) * slots), "cudaMalloc");
    fill_metric<<<1024, 256, 0, stream>>>(metrics[i], slots, static_cast<std::uint32_t>(7 + l));
    outputs.push_back({metrics[i], slots, kt::eviction::metric_kind::squared_sum, cfg.protected_window});
    check(cudaMalloc(&snapshots[2 * i], caches.back().bytes()), "cudaMalloc");
    check(cudaMalloc(&snapshots[2 * i + 1], sizeof(float) * slots), "cudaMalloc");
    check(cudaMemcpyAsync(snapshots[2 * i], caches.back().data(), caches.back().bytes(), cudaMemcpyDeviceToDevice, stream),
          "snapshot");
    check(cudaMemcpyAsync(snapshots[2 * i + 1], metrics[i], sizeof(float) * slots, cudaMemcpyDeviceToDevice, stream),
          "snapshot");
  }
  const auto layer_views = std::span<const view_type>(views);
  const auto layer_metrics = std::span<const kt::eviction::metric_output<kt::device_space>>(outputs);
  const kt::eviction::shard shard{.heads = {0, heads, true}, .batch = batch, .layers = layers};
  std::size_t bytes = 0;
  if constexpr (Sharded)
    bytes = kt::evict_workspace<kt::backend::cuda>(layer_views, shard);
  else
    bytes = kt::evict_workspace<kt::backend::cuda>(layer_views);
  void* scratch = nullptr;
  kt::eviction::report* report = nullptr;
  check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
  check(cudaMalloc(&report, sizeof(kt::eviction::report)), "cudaMalloc");
  const auto call = [&] {
    if constexpr (Sharded)
      kt::evict<kt::backend::cuda>(layer_views, layer_metrics, cfg, shard, kt::comm::single_process{}, {scratch, bytes},
                                   stream, report);
    else
      kt::evict<kt::backend::cuda>(layer_views, layer_metrics, cfg, {scratch, bytes}, stream, report);
  };
  const auto restore = [&] {
    for (std::int64_t l = 0; l < layers; ++l) {
      const auto i = static_cast<std::size_t>(l);
      check(cudaMemcpyAsync(const_cast<void*>(caches[i].data()), snapshots[2 * i], caches[i].bytes(),
                            cudaMemcpyDeviceToDevice, stream), "restore");
      check(cudaMemcpyAsync(metrics[i], snapshots[2 * i + 1], sizeof(float) * slots, cudaMemcpyDeviceToDevice, stream),
            "restore");
    }
  };
  const std::vector<double> seconds = kvtrim_bench::timed_seconds(state, stream, call, restore);
  kt::eviction::report done{};  // what one step did (the last timed one: each starts from the snapshot)
  check(cudaMemcpyAsync(&done, report, sizeof done, cudaMemcpyDeviceToHost, stream), "report");
  check(cudaStreamSynchronize(stream), "report");
  state.counters["median_us"] = seconds[seconds.size() / 2] * 1e6;
  state.counters["evicted_tokens"] = static_cast<double>(done.evicted_tokens);
  state.counters["units_evicted"] = static_cast<double>(done.units_evicted);
  for (void* p : snapshots) cudaFree(p);
  for (float* p : metrics) cudaFree(p);
  cudaFree(keys), cudaFree(values), cudaFree(scratch), cudaFree(report);
  cudaStreamDestroy(stream);
}

}  // namespace

BENCHMARK(device_copy)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
// batch, kv heads, tokens (workload W: 8, 8, 32k).
BENCHMARK(select_top_k)
    ->ArgNames({"batch", "kv_heads", "tokens"})
    ->Args({8, 8, 32768})
    ->Args({1, 8, 32768})
    ->Args({8, 8, 4096})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(select_segmented_sort_baseline)
    ->ArgNames({"batch", "kv_heads", "tokens"})
    ->Args({8, 8, 32768})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(adaptive_select)
    ->ArgNames({"batch", "kv_heads", "tokens"})
    ->Args({8, 8, 32768})
    ->Args({1, 8, 32768})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
// batch, kv heads, tokens, q heads, head dim.
BENCHMARK(compress_static_window_uniform)
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->UseManualTime()
    ->Iterations(30)
    ->Unit(benchmark::kMicrosecond);
// issue 17 — batch, kv heads on this GPU (of 8), tokens.
BENCHMARK(adaptive_budget)
    ->ArgNames({"batch", "heads", "tokens"})
    ->Args({8, 8, 32768})
    ->Args({8, 4, 32768})
    ->Args({8, 2, 32768})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
// batch, ranks (8 / ranks kv heads each), tokens.
BENCHMARK(adaptive_budget_sharded)
    ->ArgNames({"batch", "ranks", "tokens"})
    ->Args({8, 1, 32768})
    ->Args({8, 2, 32768})
    ->Args({8, 4, 32768})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(adaptive_budget_ranks<false>)
    ->Name("adaptive_budget_simulated_ranks")
    ->ArgNames({"batch", "ranks", "tokens"})
    ->Args({8, 1, 32768})
    ->Args({8, 2, 32768})
    ->Args({8, 4, 32768})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);
// issue 17's acceptance row (two GPUs): compare with adaptive_budget at heads = 8 / ranks.
BENCHMARK(adaptive_budget_ranks<true>)
    ->Name("adaptive_budget_nccl")
    ->ArgNames({"batch", "ranks", "tokens"})
    ->Args({8, 2, 32768})
    ->Args({8, 4, 32768})
    ->Args({8, 8, 32768})
    ->UseManualTime()
    ->Iterations(50)
    ->Unit(benchmark::kMicrosecond);

#define KVTRIM_COMPRESS_ROW(L, S, B)                                         \
  BENCHMARK(compress_scheme<kt::layout::L, kt::score::S, kt::budget::B>)     \
      ->Name("compress/" #S "/" #B "/" #L)                                   \
      ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})     \
      ->Args({8, 8, 32768, 32, 128})                                         \
      ->UseManualTime()                                                      \
      ->Iterations(20)                                                       \
      ->Unit(benchmark::kMicrosecond)
KVTRIM_COMPRESS_ROW(contiguous, snapkv, uniform);
KVTRIM_COMPRESS_ROW(flat, snapkv, uniform);
KVTRIM_COMPRESS_ROW(paged, snapkv, uniform);
KVTRIM_COMPRESS_ROW(flat, snapkv, adaptive);
KVTRIM_COMPRESS_ROW(paged, snapkv, adaptive);
KVTRIM_COMPRESS_ROW(flat, retrieval_head, by_scorer);
KVTRIM_COMPRESS_ROW(paged, retrieval_head, by_scorer);

// issue 12 — the same compress with each codec's device encode in the compaction (SnapKV + uniform,
// contiguous; compare with compress/snapkv/uniform/contiguous in the same run: the goal is ≤ 15 % added).
// Last argument: 1 int8 (KIVI groups of 32), 5 int4 (KIVI), 4 fp8 (head amax scales), 6 fp8 (fixed scales),
// 7 low_rank (r = 32, profile bases), 9 low_rank (sequence bases: the fit inside the compress).
#define KVTRIM_COMPRESS_CODEC_ROW(C, name, variant)                                                   \
  BENCHMARK(compress_scheme<kt::layout::contiguous, kt::score::snapkv, kt::budget::uniform, false, true, \
                            kt::codec::C>)                                                             \
      ->Name("compress/snapkv/uniform/contiguous/" name)                                              \
      ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim", "codec"})                     \
      ->Args({8, 8, 32768, 32, 128, variant})                                                          \
      ->UseManualTime()                                                                                \
      ->Iterations(20)                                                                                 \
      ->Unit(benchmark::kMicrosecond)
KVTRIM_COMPRESS_CODEC_ROW(int8, "int8", 1);
KVTRIM_COMPRESS_CODEC_ROW(int4, "int4", 5);
KVTRIM_COMPRESS_CODEC_ROW(fp8, "fp8", 4);
KVTRIM_COMPRESS_CODEC_ROW(fp8, "fp8_fixed_scales", 6);
KVTRIM_COMPRESS_CODEC_ROW(low_rank, "low_rank", 7);
KVTRIM_COMPRESS_CODEC_ROW(low_rank, "low_rank_sequence", 9);

// issue 10 — SnapKV with the prefill's softmax normalisers given (pass 2 only); compare with
// compress/snapkv/uniform/contiguous and /paged in the same run.
BENCHMARK(compress_scheme<kt::layout::contiguous, kt::score::snapkv, kt::budget::uniform, false, true, kt::codec::fp16,
                          true>)
    ->Name("compress/snapkv/uniform/contiguous/given_lse")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(compress_scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, false, true, kt::codec::fp16,
                          true>)
    ->Name("compress/snapkv/uniform/paged/given_lse")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);

// issue 10 — a right-padded batch (compress_options::sequence_lengths) with given normalisers: lengths
// all T (the B per-sequence scorer and budget launches against the batched call in the row above),
// and spread from T down to ~T/2.
BENCHMARK(compress_scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, false, true, kt::codec::fp16,
                          true, 1>)
    ->Name("compress/snapkv/uniform/paged/given_lse/padded_all_T")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(compress_scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, false, true, kt::codec::fp16,
                          true, 2>)
    ->Name("compress/snapkv/uniform/paged/given_lse/padded_spread")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);

// issue 10 — the device's NaN/Inf scan (on by default on paged/flat) switched off.
BENCHMARK(compress_scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, false, false>)
    ->Name("compress/snapkv/uniform/paged/unchecked")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);

// issue 17 — a rank's share of W's compress (Ada-SnapKV, paged 16): one GPU on
// `kv_heads` heads vs the sharded compress of those heads (comm::single_process).
BENCHMARK(compress_scheme<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive>)
    ->Name("compress/snapkv/adaptive/paged")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 4, 32768, 16, 128})
    ->Args({8, 2, 32768, 8, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(compress_scheme<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, true>)
    ->Name("compress_sharded/snapkv/adaptive/paged")
    ->ArgNames({"batch", "kv_heads", "tokens", "q_heads", "head_dim"})
    ->Args({8, 8, 32768, 32, 128})
    ->Args({8, 4, 32768, 16, 128})
    ->Args({8, 2, 32768, 8, 128})
    ->UseManualTime()
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
// issue 17 — the eviction step: batch, kv heads on this GPU, layers, tokens held per head,
// scope (1 per_layer, 2 cross_layer).
BENCHMARK(evict_step<false>)
    ->Name("evict_step/paged")
    ->ArgNames({"batch", "heads", "layers", "held", "scope"})
    ->Args({8, 8, 32, 1040, 2})
    ->Args({8, 4, 32, 1040, 2})
    ->Args({8, 2, 32, 1040, 2})
    ->Args({8, 8, 32, 1040, 1})
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(evict_step<true>)
    ->Name("evict_step_sharded/paged")
    ->ArgNames({"batch", "heads", "layers", "held", "scope"})
    ->Args({8, 8, 32, 1040, 2})
    ->Args({8, 4, 32, 1040, 2})
    ->Args({8, 2, 32, 1040, 2})
    ->Args({8, 8, 32, 1040, 1})
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
