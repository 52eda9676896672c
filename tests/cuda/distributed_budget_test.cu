// budget::adaptive sharded over ranks on the GPU (tensor parallelism): the
// sharded keep_counts of backend/cuda/adaptive.cuh with R ranks against the
// one-GPU adaptive budget over all heads (and the CPU's one-rank merge, the
// specification). R ranks run as R host threads with R streams on one GPU
// (comm::simulated_device: the collectives really sum R device vectors), or,
// with 2+ GPUs and NCCL, one thread per GPU over ncclCommInitAll's
// communicators (comm::nccl). Scores are inputs, so keep counts and kept token
// lists (select_top_k on each rank's own heads) must be EQUAL: a difference is
// a tie broken in another order or a count off by one, never rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/rank_threads.hpp"
#include "cuda/device_memory.cuh"
#include "kvtrim/backend/cpu/adaptive.hpp"
#include "kvtrim/comm/simulated.hpp"
#include "kvtrim/comm/simulated_device.cuh"
#include "kvtrim/comm/single_process.hpp"
#if defined(KVTRIM_HAS_NCCL)
#include "kvtrim/comm/nccl.cuh"
#endif

namespace {

namespace kt = kvtrim;
using kt::testing::check;
using kt::testing::device_buffer;
using adaptive_cuda = kt::implementation<kt::budget::adaptive, kt::backend::cuda>;
using adaptive_cpu = kt::implementation<kt::budget::adaptive, kt::backend::cpu>;
using select_cuda = kt::implementation<kt::stage::select_top_k, kt::backend::cuda>;

enum class pattern { random, heavy_ties, all_equal, signed_zeros, specials, protected_windows };

/// Scores [batch, heads, tokens], row-major; protected windows (+∞) of (h · 3) % (window + 1) tokens.
std::vector<float> make_scores(pattern p, std::int64_t batch, std::int64_t heads, std::int64_t tokens,
                               std::uint32_t seed, std::int64_t window = 0) {
  std::vector<float> s(static_cast<std::size_t>(batch * heads * tokens));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const float inf = std::numeric_limits<float>::infinity();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t t = 0; t < tokens; ++t) {
        const float u = uniform(rng);
        float v = u;
        switch (p) {
          case pattern::random: v = u; break;
          case pattern::heavy_ties: v = std::floor(u * 4.0f) / 4.0f; break;
          case pattern::all_equal: v = 0.5f; break;
          case pattern::signed_zeros: v = u < 0.3f ? 0.0f : u < 0.6f ? -0.0f : u < 0.8f ? 1.0f : -1.0f; break;
          case pattern::specials: {
            // ±∞ and NaN at 2% each (kvpress form below: no protected-token error).
            const float r = uniform(rng);
            v = r < 0.02f ? inf : r < 0.04f ? -inf : r < 0.06f ? std::numeric_limits<float>::quiet_NaN()
                : r < 0.2f ? -0.0f : r < 0.3f ? 0.0f : std::floor(u * 8.0f) / 8.0f;
            break;
          }
          case pattern::protected_windows: {
            const std::int64_t tail = window > 0 ? (h * 3) % (window + 1) : 0;
            v = t >= tokens - tail ? inf : std::floor(u * 16.0f) / 16.0f;
            break;
          }
        }
        s[static_cast<std::size_t>((b * heads + h) * tokens + t)] = v;
      }
  return s;
}

struct problem {
  std::int64_t batch, heads, tokens;
  device_buffer<float> scores;  // [batch, heads, tokens]
  problem(std::int64_t b, std::int64_t h, std::int64_t t, const std::vector<float>& host)
      : batch(b), heads(h), tokens(t), scores(host) {}
  kt::tensor_view<const float, 3, kt::device_space> heads_view(std::int64_t first, std::int64_t count) const {
    return {scores.data() + first * tokens, {batch, count, tokens}, {heads * tokens, tokens, 1}};
  }
};

/// Kept token lists of `view`'s heads with device `counts`, per (b, head of the view).
std::vector<std::vector<std::int32_t>> kept_lists(const kt::tensor_view<const float, 3, kt::device_space>& view,
                                                  const std::int32_t* counts, cudaStream_t stream) {
  const std::int64_t heads = view.extent(0) * view.extent(1), tokens = view.extent(2);
  device_buffer<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
  device_buffer<std::int32_t> list(static_cast<std::size_t>(std::max<std::int64_t>(heads * tokens, 1)));
  device_buffer<std::byte> scratch(select_cuda::workspace_bytes(heads, tokens));
  select_cuda::select(view, counts, offsets.data(), list.data(), kt::workspace{scratch.data(), scratch.size()}, stream);
  check(cudaStreamSynchronize(stream), "select");
  const auto o = offsets.download();
  // Only the written prefix of the list (the rest is never written: copying it
  // would be an uninitialised read for compute-sanitizer's initcheck).
  std::vector<std::int32_t> l(static_cast<std::size_t>(o.back()));
  check(cudaMemcpy(l.data(), list.data(), sizeof(std::int32_t) * l.size(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(heads));
  for (std::int64_t h = 0; h < heads; ++h)
    out[static_cast<std::size_t>(h)].assign(l.begin() + o[static_cast<std::size_t>(h)],
                                            l.begin() + o[static_cast<std::size_t>(h + 1)]);
  return out;
}

struct result {
  std::vector<std::int32_t> counts;                     // [batch, layer heads]
  std::vector<std::vector<std::int32_t>> lists;         // per (b, layer head)
};

result one_gpu(const kt::budget::adaptive::config& cfg, const problem& p) {
  result r{std::vector<std::int32_t>(static_cast<std::size_t>(p.batch * p.heads)), {}};
  device_buffer<std::int32_t> counts(r.counts.size());
  const kt::model_shape shape{p.heads, p.heads, 128};
  device_buffer<std::byte> scratch(adaptive_cuda::workspace_bytes(cfg, shape, p.batch, p.tokens));
  const auto view = p.heads_view(0, p.heads);
  adaptive_cuda::keep_counts(cfg, view, counts.data(), kt::workspace{scratch.data(), scratch.size()}, nullptr);
  check(cudaDeviceSynchronize(), "one-GPU adaptive");
  r.counts = counts.download();
  r.lists = kept_lists(view, counts.data(), nullptr);
  return r;
}

struct rank_heads {
  std::int64_t first, count;
  bool counted = true;  // false: a replica of heads another rank counts
};
std::vector<rank_heads> even_shards(std::int64_t heads, int ranks) {
  std::vector<rank_heads> shards;
  std::int64_t first = 0;
  for (int r = 0; r < ranks; ++r) {
    const std::int64_t count = heads / ranks + (r < heads % ranks ? 1 : 0);
    shards.push_back({first, count});
    first += count;
  }
  return shards;
}

/// R simulated ranks on this GPU, one thread and stream each; counts and lists
/// written at their layer heads.
result simulated(const kt::budget::adaptive::config& cfg, const problem& p, const std::vector<rank_heads>& shards) {
  const int ranks = static_cast<int>(shards.size());
  result out{std::vector<std::int32_t>(static_cast<std::size_t>(p.batch * p.heads), -1),
             std::vector<std::vector<std::int32_t>>(static_cast<std::size_t>(p.batch * p.heads))};
  result replica = out;  // what the replica ranks (counted = false) computed, at their layer heads
  kt::comm::simulated_device_group group(ranks, static_cast<std::size_t>(p.batch * std::max<std::int64_t>(256, p.heads + 1)));
  std::vector<std::exception_ptr> errors(shards.size());
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        const rank_heads mine = shards[static_cast<std::size_t>(r)];
        const kt::budget::head_shard shard{mine.first, p.heads, mine.counted};
        cudaStream_t stream = nullptr;
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        device_buffer<std::byte> scratch(adaptive_cuda::sharded_workspace_bytes(cfg, p.batch, mine.count, p.tokens, shard));
        device_buffer<std::int32_t> counts(static_cast<std::size_t>(p.batch * mine.count));
        const auto view = p.heads_view(mine.first, mine.count);
        adaptive_cuda::keep_counts(cfg, view, shard, kt::comm::simulated_device(group, r), counts.data(),
                                   kt::workspace{scratch.data(), scratch.size()}, stream);
        check(cudaStreamSynchronize(stream), "sharded keep_counts");
        const auto host = counts.download();
        const auto lists = kept_lists(view, counts.data(), stream);
        auto& counts_out = mine.counted ? out.counts : replica.counts;
        auto& lists_out = mine.counted ? out.lists : replica.lists;
        for (std::int64_t b = 0; b < p.batch; ++b)
          for (std::int64_t h = 0; h < mine.count; ++h) {  // disjoint slots per rank: no lock needed
            const auto layer = static_cast<std::size_t>(b * p.heads + mine.first + h);
            counts_out[layer] = host[static_cast<std::size_t>(b * mine.count + h)];
            lists_out[layer] = lists[static_cast<std::size_t>(b * mine.count + h)];
          }
        check(cudaStreamDestroy(stream), "cudaStreamDestroy");
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (std::size_t i = 0; i < out.counts.size(); ++i)  // a replica computes the counts of the head it copies
    if (replica.counts[i] != -1) EXPECT_EQ(replica.counts[i], out.counts[i]) << "replica of flattened head " << i;
  return out;
}

void expect_same(const result& expected, const result& got, const std::string& what) {
  ASSERT_EQ(expected.counts, got.counts) << what;
  for (std::size_t i = 0; i < expected.lists.size(); ++i) ASSERT_EQ(expected.lists[i], got.lists[i]) << what << ", head " << i;
}

std::vector<std::int32_t> cpu_counts(const kt::budget::adaptive::config& cfg, const std::vector<float>& scores,
                                     std::int64_t batch, std::int64_t heads, std::int64_t tokens) {
  std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * heads));
  const kt::tensor_view<const float, 3> view{scores.data(), {batch, heads, tokens}, {heads * tokens, tokens, 1}};
  std::vector<std::byte> scratch(adaptive_cpu::workspace_bytes(cfg, {heads, heads, 128}, batch, tokens));
  adaptive_cpu::keep_counts(cfg, view, counts.data(), kt::workspace{scratch.data(), scratch.size()},
                            kt::backend::host_stream{});
  return counts;
}

TEST(DistributedBudgetCuda, SimulatedRanksMatchOneGpuOnAwkwardScores) {
  KVTRIM_SKIP_WITHOUT_GPU();
  struct budget_case {
    const char* name;
    kt::budget::adaptive::config cfg;
  };
  const budget_case cases[] = {{"paper_a0.2_ratio0.3", {kt::keep_ratio{0.3}, 0.2, false}},
                               {"paper_a1_tokens5", {kt::keep_tokens{5}, 1.0, false}},
                               {"kvpress_a0.5_ratio0.25", {kt::keep_ratio{0.25}, 0.5, true}}};
  const pattern patterns[] = {pattern::random,       pattern::heavy_ties, pattern::all_equal,
                              pattern::signed_zeros, pattern::specials,   pattern::protected_windows};
  const std::int64_t batch = 3, heads = 8;
  for (const std::int64_t tokens : {std::int64_t{1}, std::int64_t{3}, std::int64_t{4097}, std::int64_t{9000}})
    for (const pattern pat : patterns)
      for (const auto& bc : cases) {
        if (pat == pattern::specials && !bc.cfg.kvpress_compatible) continue;  // +∞ beyond k: the CPU throws
        const std::int64_t window = kt::budget::adaptive::head_budget(bc.cfg, tokens) / 2;
        const auto host = make_scores(pat, batch, heads, tokens, static_cast<std::uint32_t>(tokens + 17), window);
        const problem p(batch, heads, tokens, host);
        const result expected = one_gpu(bc.cfg, p);
        const std::string what = std::string(bc.name) + ", pattern " + std::to_string(static_cast<int>(pat)) +
                                 ", T = " + std::to_string(tokens);
        ASSERT_EQ(expected.counts, cpu_counts(bc.cfg, host, batch, heads, tokens)) << what << " (one GPU vs CPU)";
        for (const int ranks : {1, 2, 4, 8})
          expect_same(expected, simulated(bc.cfg, p, even_shards(heads, ranks)), what + ", R = " + std::to_string(ranks));
        // Uneven, with an empty rank.
        expect_same(expected, simulated(bc.cfg, p, {{0, 1}, {1, 0}, {1, 5}, {6, 2}}), what + ", uneven");
      }
}

/// A small case for the sanitizers (memcheck, racecheck): every rank count,
/// an uneven layout with an empty rank, ties across ranks.
TEST(DistributedBudgetCuda, SmallSimulatedRanks) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 2, heads = 8, tokens = 4097;
  const kt::budget::adaptive::config cfg{kt::keep_ratio{0.3}, 0.2, false};
  const auto host = make_scores(pattern::heavy_ties, batch, heads, tokens, 99);
  const problem p(batch, heads, tokens, host);
  const result expected = one_gpu(cfg, p);
  for (const int ranks : {1, 2, 4, 8})
    expect_same(expected, simulated(cfg, p, even_shards(heads, ranks)), "R = " + std::to_string(ranks));
  expect_same(expected, simulated(cfg, p, {{0, 3}, {3, 0}, {3, 5}}), "uneven");
  // Replicated heads (engines replicate kv heads when ranks outnumber them): the
  // copies on ranks 1 and 3 are not counted and must get the same counts.
  expect_same(expected, simulated(cfg, p, {{0, 4, true}, {0, 4, false}, {4, 4, true}, {4, 4, false}}), "replicas");
}

/// W: batch 8, 32 q heads / 8 kv heads, head dim 128 (the budget reads only the
/// [8, 8, 32k] scores), 32k tokens, keep 30%.
TEST(DistributedBudgetCuda, WorkloadWSimulatedRanks) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 8, heads = 8, tokens = 32768;
  const kt::budget::adaptive::config cfg{kt::keep_ratio{0.3}, 0.2, false};
  for (const pattern pat : {pattern::random, pattern::heavy_ties}) {
    const auto host = make_scores(pat, batch, heads, tokens, 2024);
    const problem p(batch, heads, tokens, host);
    const result expected = one_gpu(cfg, p);
    for (std::int64_t b = 0; b < batch; ++b) {  // exact layer total H·k
      std::int64_t total = 0;
      for (std::int64_t h = 0; h < heads; ++h) total += expected.counts[static_cast<std::size_t>(b * heads + h)];
      ASSERT_EQ(total, heads * 9830);  // k = ⌊0.3 · 32768⌋
    }
    for (const int ranks : {1, 2, 4, 8})
      expect_same(expected, simulated(cfg, p, even_shards(heads, ranks)),
                  "W, pattern " + std::to_string(static_cast<int>(pat)) + ", R = " + std::to_string(ranks));
  }
}

TEST(DistributedBudgetCuda, CapturedInAGraphWithTheSingleProcessCommunicator) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 2, heads = 8, tokens = 5000;
  const kt::budget::adaptive::config cfg{kt::keep_ratio{0.3}, 0.2, false};
  const auto host = make_scores(pattern::heavy_ties, batch, heads, tokens, 5);
  const problem p(batch, heads, tokens, host);
  const result expected = one_gpu(cfg, p);
  const kt::budget::head_shard shard{0, heads, true};
  device_buffer<std::byte> scratch(adaptive_cuda::sharded_workspace_bytes(cfg, batch, heads, tokens, shard));
  device_buffer<std::int32_t> counts(static_cast<std::size_t>(batch * heads));
  counts.fill_bytes(0xff);
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  adaptive_cuda::keep_counts(cfg, p.heads_view(0, heads), shard, kt::comm::single_process{}, counts.data(),
                             kt::workspace{scratch.data(), scratch.size()}, stream);
  check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int replay = 0; replay < 2; ++replay) {  // the second replay starts from the first's workspace
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    check(cudaStreamSynchronize(stream), "replay");
    EXPECT_EQ(expected.counts, counts.download()) << "replay " << replay;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

/// GPUs the NCCL cases can use (0 when the runtime cannot count them).
[[maybe_unused]] int visible_gpus() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess ? devices : 0;
}

TEST(DistributedBudgetCuda, NcclRanksOnSeparateGpus) {
#if !defined(KVTRIM_HAS_NCCL)
  GTEST_SKIP() << "built without NCCL (configure finds it through the CUDA toolkit or NCCL_ROOT: target kvtrim::nccl)";
#else
  const int ranks = std::min(visible_gpus(), 8);
  if (ranks < 2)
    GTEST_SKIP() << "the NCCL case needs at least 2 visible GPUs; " << ranks
                 << " visible (the simulated ranks above cover one GPU)";
  const std::int64_t batch = 8, heads = 8, tokens = 32768;  // W
  const kt::budget::adaptive::config cfg{kt::keep_ratio{0.3}, 0.2, false};
  const auto host = make_scores(pattern::heavy_ties, batch, heads, tokens, 77);
  check(cudaSetDevice(0), "cudaSetDevice");
  result expected;
  {
    const problem p(batch, heads, tokens, host);
    expected = one_gpu(cfg, p);
  }
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(ranks));
  std::vector<int> device_list(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) device_list[static_cast<std::size_t>(r)] = r;
  ASSERT_EQ(ncclCommInitAll(comms.data(), ranks, device_list.data()), ncclSuccess);
  const auto shards = even_shards(heads, ranks);
  std::vector<std::vector<std::int32_t>> rank_counts(static_cast<std::size_t>(ranks));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        check(cudaSetDevice(r), "cudaSetDevice");
        const problem p(batch, heads, tokens, host);  // every rank its copy; it reads only its heads
        const rank_heads mine = shards[static_cast<std::size_t>(r)];
        const kt::budget::head_shard shard{mine.first, heads, true};
        cudaStream_t stream = nullptr;
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        device_buffer<std::byte> scratch(adaptive_cuda::sharded_workspace_bytes(cfg, batch, mine.count, tokens, shard));
        device_buffer<std::int32_t> counts(static_cast<std::size_t>(batch * mine.count));
        adaptive_cuda::keep_counts(cfg, p.heads_view(mine.first, mine.count), shard,
                                   kt::comm::nccl(comms[static_cast<std::size_t>(r)]), counts.data(),
                                   kt::workspace{scratch.data(), scratch.size()}, stream);
        check(cudaStreamSynchronize(stream), "sharded keep_counts over NCCL");
        rank_counts[static_cast<std::size_t>(r)] = counts.download();
        cudaStreamDestroy(stream);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto c : comms) ncclCommDestroy(c);
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (int r = 0; r < ranks; ++r) {
    const rank_heads mine = shards[static_cast<std::size_t>(r)];
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < mine.count; ++h)
        ASSERT_EQ(rank_counts[static_cast<std::size_t>(r)][static_cast<std::size_t>(b * mine.count + h)],
                  expected.counts[static_cast<std::size_t>(b * heads + mine.first + h)])
            << "rank " << r << ", sequence " << b << ", layer head " << mine.first + h;
  }
#endif
}

// ---- the eviction step sharded over ranks (eviction/sharded.hpp) ----------------
//
// Each rank's caches (its kv heads of every layer) are built on the host, copied
// to the device, and evicted twice: by the CPU's sharded step (R threads,
// comm::simulated: the specification, equal to the one-rank step over all heads
// per tests/cpu/distributed_eviction_test.cpp) and by the CUDA one (R threads and
// streams, comm::simulated_device). The caches, metrics and reports must be
// byte-identical: selections are exact and moves copy stored bits.

namespace ev = kt::eviction;

float eviction_metric(std::mt19937_64& random, bool all_equal) {
  static constexpr float table[] = {0.0f, -0.0f, 1.0f, 1.0f, 0.5f, 0.5f, 3e38f,
                                    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::quiet_NaN()};
  std::uniform_int_distribution<int> pick(0, 2 * static_cast<int>(std::size(table)));
  const int k = pick(random);
  if (all_equal) return 0.25f;
  return k < static_cast<int>(std::size(table)) ? table[k] : std::uniform_real_distribution<float>(0.0f, 1.0f)(random);
}

template <class Layout>
struct evict_rank {
  using codec = kt::codec::fp16;
  using cpu_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cpu>;
  using host_view = typename cpu_scheme::cache_view;
  using device_view = typename Layout::template view<codec, kt::device_space>;
  std::vector<kt::cache<cpu_scheme>> host;
  std::vector<std::vector<float>> host_metrics;
  std::vector<host_view> host_views;
  std::vector<ev::metric_output<>> host_outputs;
  std::vector<std::unique_ptr<device_buffer<std::byte>>> blocks;
  std::vector<std::unique_ptr<device_buffer<float>>> device_metrics;
  std::vector<device_view> device_views;
  std::vector<ev::metric_output<kt::device_space>> device_outputs;
};

template <class Layout>
typename Layout::pool_size eviction_pool(std::int64_t heads, std::int64_t longest) {
  if constexpr (std::is_same_v<Layout, kt::layout::paged>)
    return kt::layout::paged::pool_size{heads * ((longest + 15) / 16) + 5, 16};
  else
    return kt::layout::flat::pool_size{heads * (longest + 9)};
}

/// Rank caches of kv heads [first, first + local) of every layer: a head's lengths,
/// rows and metrics depend only on its (layer, sequence, layer head), not on the rank.
template <class Layout>
evict_rank<Layout> make_evict_rank(std::int64_t layers, std::int64_t batch, std::int64_t total_heads,
                                   std::int64_t head_dim, std::int64_t longest, std::int64_t first, std::int64_t local,
                                   std::int64_t window, std::uint64_t seed, bool all_equal) {
  using rank_type = evict_rank<Layout>;
  rank_type r;
  if (local == 0) return r;
  const kt::model_shape shape{.q_heads = 2 * local, .kv_heads = local, .head_dim = head_dim};
  const auto pool = eviction_pool<Layout>(batch * local, longest);
  for (std::int64_t l = 0; l < layers; ++l) {
    r.host.push_back(rank_type::cpu_scheme::make_cache(shape, batch, pool));
    auto& view = r.host.back().view();
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < local; ++h) {
        const std::uint64_t head_seed = seed * 7919 + static_cast<std::uint64_t>((l * batch + b) * total_heads + first + h);
        std::mt19937_64 random(head_seed);
        const std::int64_t n = std::uniform_int_distribution<std::int64_t>(1, longest)(random);
        auto keys = kt::testing::random_tensor<kt::half, 2>({n, head_dim}, head_seed * 2 + 1);
        auto values = kt::testing::random_tensor<kt::half, 2>({n, head_dim}, head_seed * 2 + 2);
        rank_type::cpu_scheme::append_head(view, b, h, keys.view, values.view);
      }
    r.host_metrics.emplace_back(static_cast<std::size_t>(kt::detail::storage_slots(view.storage)), 0.0f);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < local; ++h) {
        std::mt19937_64 random(seed * 104729 + static_cast<std::uint64_t>((l * batch + b) * total_heads + first + h));
        for (std::int64_t i = 0; i < view.head_length(b, h); ++i)
          r.host_metrics.back()[static_cast<std::size_t>(view.slot(b, h, i))] = eviction_metric(random, all_equal);
      }
    r.blocks.push_back(std::make_unique<device_buffer<std::byte>>(r.host.back().bytes()));
    check(cudaMemcpy(r.blocks.back()->data(), r.host.back().data(), r.host.back().bytes(), cudaMemcpyHostToDevice), "H2D");
    r.device_views.push_back(rank_type::device_view::bind(r.blocks.back()->data(), shape, batch, pool));
    r.device_metrics.push_back(std::make_unique<device_buffer<float>>(r.host_metrics.back()));
  }
  for (std::int64_t l = 0; l < layers; ++l) {
    r.host_views.push_back(r.host[l].view());
    const auto slots = static_cast<std::int64_t>(r.host_metrics[l].size());
    r.host_outputs.push_back({r.host_metrics[l].data(), slots, ev::metric_kind::squared_sum, window});
    r.device_outputs.push_back({r.device_metrics[l]->data(), slots, ev::metric_kind::squared_sum, window});
  }
  return r;
}

/// The communicators of R ranks: simulated ranks sharing GPU 0, or, over NCCL, rank r
/// on GPU r (ncclCommInitAll). with(r, fn) calls fn with rank r's communicator.
struct rank_comms {
  bool over_nccl;
  mutable kt::comm::simulated_device_group group;
#if defined(KVTRIM_HAS_NCCL)
  std::vector<ncclComm_t> comms;
#endif
  rank_comms(int ranks, std::size_t capacity, bool nccl) : over_nccl(nccl), group(nccl ? 1 : ranks, capacity) {
    if (!nccl) return;
#if defined(KVTRIM_HAS_NCCL)
    comms.resize(static_cast<std::size_t>(ranks));
    std::vector<int> devices(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) devices[static_cast<std::size_t>(r)] = r;
    if (ncclCommInitAll(comms.data(), ranks, devices.data()) != ncclSuccess) throw kt::error("ncclCommInitAll failed");
#else
    throw kt::error("built without NCCL");
#endif
  }
  rank_comms(const rank_comms&) = delete;
  rank_comms& operator=(const rank_comms&) = delete;
  ~rank_comms() {
#if defined(KVTRIM_HAS_NCCL)
    for (auto c : comms) ncclCommDestroy(c);
#endif
  }
  template <class Fn>
  void with(int r, Fn&& fn) const {
#if defined(KVTRIM_HAS_NCCL)
    if (over_nccl) return fn(kt::comm::nccl(comms[static_cast<std::size_t>(r)]));
#endif
    fn(kt::comm::simulated_device(group, r));
  }
};

template <class Layout>
void check_sharded_eviction(ev::scope scope, const std::vector<rank_heads>& shards, std::int64_t layers,
                            std::int64_t batch, std::int64_t heads, std::int64_t head_dim, std::int64_t longest,
                            std::uint64_t seed, bool all_equal, bool over_nccl = false) {
  using rank_type = evict_rank<Layout>;
  const int R = static_cast<int>(shards.size());
  const auto on_device = [&](int r) {  // over NCCL rank r lives on GPU r, simulated ranks share GPU 0
    check(cudaSetDevice(over_nccl ? r : 0), "cudaSetDevice");
  };
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(layers * heads), 0);
  mask[static_cast<std::size_t>(heads / 2)] = 1;  // layer 0, the middle head (a shard boundary at R = 2)
  const ev::config cfg{.scope = scope, .keep = longest / 3, .interval = 16, .sinks = 3, .protected_window = 9,
                       .alpha = 0.3};
  std::vector<rank_type> ranks;
  for (int r = 0; r < R; ++r) {
    on_device(r);
    const rank_heads& s = shards[static_cast<std::size_t>(r)];
    ranks.push_back(make_evict_rank<Layout>(layers, batch, heads, head_dim, longest, s.first, s.count,
                                            cfg.protected_window, seed, all_equal));
  }
  const auto shard_of = [&](int r) {
    const rank_heads& s = shards[static_cast<std::size_t>(r)];
    return ev::shard{.heads = {s.first, heads, s.counted}, .batch = batch, .layers = layers};
  };

  // The CPU's sharded step on the host caches (the specification).
  std::vector<ev::report> host_reports(shards.size());
  kt::comm::simulated_group host_group(R);
  ev::config host_cfg = cfg;
  host_cfg.retrieval_heads = mask.data();
  auto errors = kt::testing::run_ranks(R, [&](int r) {
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    const auto views = std::span<const typename rank_type::host_view>(mine.host_views);
    std::vector<std::byte> scratch(kt::evict_workspace<kt::backend::cpu>(views, shard_of(r)));
    host_reports[static_cast<std::size_t>(r)] = kt::evict<kt::backend::cpu>(
        views, std::span<const ev::metric_output<>>(mine.host_outputs), host_cfg, shard_of(r),
        kt::comm::simulated(host_group, r), kt::workspace{scratch.data(), scratch.size()});
  });
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);

  // The CUDA sharded step on the device copies: simulated ranks on GPU 0, or one GPU per rank over NCCL.
  std::vector<std::unique_ptr<device_buffer<std::uint8_t>>> device_masks;
  for (int r = 0; r < R; ++r) {
    on_device(r);
    device_masks.push_back(std::make_unique<device_buffer<std::uint8_t>>(mask));
  }
  on_device(0);
  const rank_comms comms(R, static_cast<std::size_t>(batch * layers * std::max<std::int64_t>(256, heads) + 8),
                         over_nccl);
  std::vector<ev::report> device_reports(shards.size());
  errors = kt::testing::run_ranks(R, [&](int r) {
    on_device(r);
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    const auto views = std::span<const typename rank_type::device_view>(mine.device_views);
    cudaStream_t stream = nullptr;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    device_buffer<std::byte> scratch(kt::evict_workspace<kt::backend::cuda>(views, shard_of(r)));
    device_buffer<ev::report> report(1);
    const auto step = [&](const auto& comm) {
      kt::evict<kt::backend::cuda>(views, std::span<const ev::metric_output<kt::device_space>>(mine.device_outputs),
                                   cfg, shard_of(r), comm, kt::workspace{scratch.data(), scratch.size()}, stream,
                                   report.data(), device_masks[static_cast<std::size_t>(r)]->data());
    };
    comms.with(r, step);
    check(cudaStreamSynchronize(stream), "sharded evict");
    device_reports[static_cast<std::size_t>(r)] = report.download()[0];
    check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  });
  on_device(0);
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);

  std::int64_t evicted = 0;
  for (int r = 0; r < R; ++r) {
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    const ev::report& want = host_reports[static_cast<std::size_t>(r)];
    const ev::report& got = device_reports[static_cast<std::size_t>(r)];
    EXPECT_EQ(got.evicted_tokens, want.evicted_tokens) << "rank " << r;
    EXPECT_EQ(got.freed_pages, want.freed_pages) << "rank " << r;
    EXPECT_EQ(got.units_evicted, want.units_evicted) << "rank " << r;
    EXPECT_EQ(got.units_over_target, want.units_over_target) << "rank " << r;
    evicted += want.evicted_tokens;
    for (std::size_t l = 0; l < mine.host.size(); ++l) {
      const std::size_t bytes = mine.host[l].bytes();
      const auto device_bytes = kt::testing::download_bytes(mine.blocks[l]->data(), bytes);
      EXPECT_EQ(0, std::memcmp(device_bytes.data(), mine.host[l].data(), bytes)) << "rank " << r << ", layer " << l;
      const auto metric = mine.device_metrics[l]->download();
      EXPECT_EQ(0, std::memcmp(metric.data(), mine.host_metrics[l].data(), metric.size() * sizeof(float)))
          << "rank " << r << ", layer " << l << " metric";
    }
  }
  EXPECT_GT(evicted, 0) << "the case must evict to test anything";
}

TEST(DistributedEvictionCuda, SimulatedRanksEvictWhatTheCpuEvicts) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<rank_heads>> layouts = {
      {{0, 4}}, {{0, 2}, {2, 2}}, {{0, 1}, {1, 1}, {2, 1}, {3, 1}}, {{0, 3}, {3, 0}, {3, 1}},
      {{0, 2, true}, {0, 2, false}, {2, 2, true}, {2, 2, false}}};
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer})
    for (std::size_t k = 0; k < layouts.size(); ++k)
      for (const bool all_equal : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "scope " << int(scope) << ", layout " << k << ", all equal " << all_equal);
        check_sharded_eviction<kt::layout::paged>(scope, layouts[k], 3, 2, 4, 64, 700, 51 + k, all_equal);
        check_sharded_eviction<kt::layout::flat>(scope, layouts[k], 2, 3, 4, 128, 1100, 61 + k, all_equal);
      }
}

/// A small case for the sanitizers (memcheck, racecheck, initcheck): both scopes and
/// layouts, R = 2 and an uneven layout with an empty rank, ties everywhere, rows of
/// 16-byte multiples and not.
TEST(DistributedEvictionCuda, SmallForSanitizers) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer}) {
    check_sharded_eviction<kt::layout::paged>(scope, {{0, 2}, {2, 2}}, 2, 2, 4, 64, 300, 91, true);
    check_sharded_eviction<kt::layout::flat>(scope, {{0, 3}, {3, 0}, {3, 1}}, 2, 2, 4, 64, 300, 92, false);
    // head dim 12: fp16 rows of 24 bytes, moved in 2-byte units (not 16-byte ones)
    check_sharded_eviction<kt::layout::paged>(scope, {{0, 1}, {1, 3}}, 2, 2, 4, 12, 300, 93, false);
  }
}

/// Long heads (up to 20k tokens, head dim 128) at R = 2 and 4: the chunked walks past one block's reach.
TEST(DistributedEvictionCuda, LongHeads) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const int ranks : {2, 4})
    check_sharded_eviction<kt::layout::paged>(ev::scope::cross_layer, even_shards(8, ranks), 4, 2, 8, 128, 20000, 71,
                                              false);
}

/// A rank whose input is refused throws after taking part in every collective; the
/// others return, evict nothing and report no unit; no cache changes anywhere.
TEST(DistributedEvictionCuda, RefusedRankThrowsAndNobodyEvicts) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using rank_type = evict_rank<kt::layout::paged>;
  const std::vector<rank_heads> shards = {{0, 1}, {1, 2}, {3, 1}};
  const std::int64_t layers = 2, batch = 2, heads = 4;
  const ev::config cfg{.scope = ev::scope::cross_layer, .keep = 100, .interval = 16, .sinks = 3, .protected_window = 9};
  std::vector<rank_type> ranks;
  for (const rank_heads& s : shards)
    ranks.push_back(make_evict_rank<kt::layout::paged>(layers, batch, heads, 64, 400, s.first, s.count,
                                                       cfg.protected_window, 81, false));
  ranks[1].device_outputs[1].protected_window = 4;  // rank 1's metric disagrees with the config
  kt::comm::simulated_device_group group(3, static_cast<std::size_t>(batch * layers * 256 + 8));
  std::vector<ev::report> reports(3);
  const auto errors = kt::testing::run_ranks(3, [&](int r) {
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    const auto views = std::span<const rank_type::device_view>(mine.device_views);
    const ev::shard shard{.heads = {shards[r].first, heads, true}, .batch = batch, .layers = layers};
    cudaStream_t stream = nullptr;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    device_buffer<std::byte> scratch(kt::evict_workspace<kt::backend::cuda>(views, shard));
    device_buffer<ev::report> report(1);
    const auto finish = [&](bool read_report) {  // a throwing rank's report is never written
      check(cudaStreamSynchronize(stream), "sharded evict");
      if (read_report) reports[static_cast<std::size_t>(r)] = report.download()[0];
      check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    };
    try {
      kt::evict<kt::backend::cuda>(views, std::span<const ev::metric_output<kt::device_space>>(mine.device_outputs),
                                   cfg, shard, kt::comm::simulated_device(group, r),
                                   kt::workspace{scratch.data(), scratch.size()}, stream, report.data());
    } catch (...) {
      finish(false);
      throw;
    }
    finish(true);
  });
  ASSERT_TRUE(errors[1]) << "rank 1 must throw";
  EXPECT_FALSE(errors[0]);
  EXPECT_FALSE(errors[2]);
  for (int r : {0, 2}) {
    EXPECT_EQ(reports[r].units_evicted, 0) << "rank " << r;
    EXPECT_EQ(reports[r].evicted_tokens, 0) << "rank " << r;
  }
  for (int r = 0; r < 3; ++r)
    for (std::size_t l = 0; l < ranks[r].host.size(); ++l) {
      const auto device_bytes = kt::testing::download_bytes(ranks[r].blocks[l]->data(), ranks[r].host[l].bytes());
      EXPECT_EQ(0, std::memcmp(device_bytes.data(), ranks[r].host[l].data(), ranks[r].host[l].bytes()))
          << "rank " << r << ", layer " << l << " changed";
    }
}

// ---- compress with a communicator on the GPU (scheme.hpp) ------------------------
//
// R simulated ranks each compress their kv heads' slice of the layer with the
// layer's head_shard (Ada-KV inside compress over every rank's heads): the kept
// token lists equal the one-GPU compress of all heads, per head — SnapKV scores
// (random: few ties) and external scores with 4 values (ties everywhere),
// R = 1, 2, 4, an uneven layout with an empty rank (compress_without_heads) and
// replicas; the caches' lengths agree with the lists.

template <class Scorer>
using adaptive_gpu_scheme = kt::scheme<kt::layout::paged, Scorer, kt::budget::adaptive, kt::codec::fp16, kt::backend::cuda>;

struct compress_problem {
  static constexpr std::int64_t batch = 2, heads = 8, group = 4, head_dim = 128, tokens = 4097, window = 16;
  device_buffer<kt::half> keys, values, queries;
  device_buffer<float> scores;  // [batch, heads, tokens] for score::external
  compress_problem()
      : keys(random_halves(batch * heads * tokens * head_dim, 1)), values(random_halves(batch * heads * tokens * head_dim, 2)),
        queries(random_halves(batch * heads * group * window * head_dim, 3)),
        scores(make_scores(pattern::heavy_ties, batch, heads, tokens, 4)) {}
  static std::vector<kt::half> random_halves(std::int64_t n, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<kt::half> out(static_cast<std::size_t>(n));
    for (auto& x : out) x = kt::half(normal(rng));
    return out;
  }
  /// kv heads [first, first + count) of keys or values; their query heads.
  kt::tensor_view<const kt::half, 4, kt::device_space> kv(const device_buffer<kt::half>& all, std::int64_t first,
                                                          std::int64_t count) const {
    return {all.data() + first * tokens * head_dim, {batch, count, tokens, head_dim},
            {heads * tokens * head_dim, tokens * head_dim, head_dim, 1}};
  }
  kt::tensor_view<const kt::half, 4, kt::device_space> q(std::int64_t first, std::int64_t count) const {
    return {queries.data() + first * group * window * head_dim, {batch, count * group, window, head_dim},
            {heads * group * window * head_dim, window * head_dim, head_dim, 1}};
  }
  kt::tensor_view<const float, 3, kt::device_space> score_rows(std::int64_t first, std::int64_t count) const {
    return {scores.data() + first * tokens, {batch, count, tokens}, {heads * tokens, tokens, 1}};
  }
};

template <class Scorer>
typename adaptive_gpu_scheme<Scorer>::config compress_config(const compress_problem& p, std::int64_t first,
                                                              std::int64_t count) {
  typename adaptive_gpu_scheme<Scorer>::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.3};
  cfg.budget.alpha = 0.2;
  if constexpr (std::is_same_v<Scorer, kt::score::snapkv>) cfg.score.window = compress_problem::window;
  if constexpr (std::is_same_v<Scorer, kt::score::external>)
    cfg.score = kt::score::external::config::from(p.score_rows(first, count));
  return cfg;
}

/// Kept lists per (b, local head) of a compress of kv heads [first, first + count).
template <class Scorer, class Compress>
std::vector<std::vector<std::int32_t>> compress_heads_on_gpu(const compress_problem& p, std::int64_t first,
                                                             std::int64_t count, Compress&& compress) {
  using scheme = adaptive_gpu_scheme<Scorer>;
  using P = compress_problem;
  const kt::model_shape shape{.q_heads = count * P::group, .kv_heads = count, .head_dim = P::head_dim};
  typename scheme::config cfg = compress_config<Scorer>(p, first, count);
  const std::int64_t capacity = scheme::kept_tokens_capacity(shape, P::batch, P::tokens, cfg);
  auto cache = scheme::make_cache(shape, P::batch, kt::layout::paged::pool_size{P::batch * count * ((P::tokens + 15) / 16) + 8, 16});
  device_buffer<std::int64_t> offsets(static_cast<std::size_t>(P::batch * count + 1));
  device_buffer<std::int32_t> kept(static_cast<std::size_t>(capacity));
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  auto view = cache.view();
  compress(shape, cfg, view, kt::compress_options<kt::device_space>{0, offsets.data(), kept.data(), capacity}, stream);
  kt::check_status(view, stream);
  check(cudaStreamSynchronize(stream), "compress");
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  const auto o = offsets.download();
  std::vector<std::int32_t> k(static_cast<std::size_t>(o.back()));
  check(cudaMemcpy(k.data(), kept.data(), sizeof(std::int32_t) * k.size(), cudaMemcpyDeviceToHost), "D2H");
  std::vector<std::vector<std::int32_t>> lists;
  for (std::size_t h = 0; h + 1 < o.size(); ++h) lists.emplace_back(k.begin() + o[h], k.begin() + o[h + 1]);
  return lists;
}

/// R ranks' sharded compress of their heads against the one-GPU compress of all heads:
/// simulated ranks on GPU 0 sharing `p`, or (over_nccl) rank r on GPU r with its own
/// copy of the inputs (the same seeds) and NCCL between them.
template <class Scorer>
void expect_sharded_compress_on_gpu(const compress_problem& p, const std::vector<rank_heads>& shards,
                                    bool over_nccl = false) {
  using scheme = adaptive_gpu_scheme<Scorer>;
  using P = compress_problem;
  check(cudaSetDevice(0), "cudaSetDevice");
  const auto whole = compress_heads_on_gpu<Scorer>(p, 0, P::heads, [&](const kt::model_shape& shape, const auto& cfg,
                                                                       auto& view, const auto& options, cudaStream_t stream) {
    device_buffer<std::byte> scratch(scheme::compress_workspace(shape, P::batch, P::tokens, cfg));
    scheme::compress(p.kv(p.keys, 0, P::heads), p.kv(p.values, 0, P::heads), p.q(0, P::heads), view, cfg, options,
                     kt::workspace{scratch.data(), scratch.size()}, stream);
    check(cudaStreamSynchronize(stream), "one-GPU compress");
  });
  const int R = static_cast<int>(shards.size());
  std::vector<std::unique_ptr<compress_problem>> copies(shards.size());  // over NCCL: rank r's inputs on GPU r
  for (int r = 0; r < R && over_nccl; ++r) {
    check(cudaSetDevice(r), "cudaSetDevice");
    copies[static_cast<std::size_t>(r)] = std::make_unique<compress_problem>();
  }
  check(cudaSetDevice(0), "cudaSetDevice");
  const rank_comms comms(R, static_cast<std::size_t>(P::batch * 256 + 8), over_nccl);
  std::vector<std::vector<std::vector<std::int32_t>>> got(shards.size());
  const auto errors = kt::testing::run_ranks(R, [&](int r) {
    check(cudaSetDevice(over_nccl ? r : 0), "cudaSetDevice");
    const compress_problem& mine_p = over_nccl ? *copies[static_cast<std::size_t>(r)] : p;
    const rank_heads mine = shards[static_cast<std::size_t>(r)];
    const kt::budget::head_shard shard{mine.first, P::heads, mine.counted};
    const auto run_with = [&](const auto& comm) {
      if (mine.count == 0) {
        const auto cfg = compress_config<Scorer>(mine_p, 0, 1);
        cudaStream_t stream = nullptr;
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        device_buffer<std::byte> scratch(scheme::compress_without_heads_workspace(P::batch, P::tokens, cfg, shard));
        scheme::compress_without_heads(P::batch, P::tokens, cfg, shard, comm,
                                       kt::workspace{scratch.data(), scratch.size()}, stream);
        check(cudaStreamSynchronize(stream), "compress_without_heads");
        check(cudaStreamDestroy(stream), "cudaStreamDestroy");
        return;
      }
      got[static_cast<std::size_t>(r)] = compress_heads_on_gpu<Scorer>(
          mine_p, mine.first, mine.count,
          [&](const kt::model_shape& shape, const auto& cfg, auto& view, const auto& options, cudaStream_t stream) {
            device_buffer<std::byte> scratch(scheme::compress_workspace(shape, P::batch, P::tokens, cfg, shard));
            scheme::compress(mine_p.kv(mine_p.keys, mine.first, mine.count),
                             mine_p.kv(mine_p.values, mine.first, mine.count), mine_p.q(mine.first, mine.count), view,
                             cfg, options, shard, comm, kt::workspace{scratch.data(), scratch.size()}, stream);
            check(cudaStreamSynchronize(stream), "sharded compress");
          });
    };
    comms.with(r, run_with);
  });
  check(cudaSetDevice(0), "cudaSetDevice");
  for (int r = 0; r < R; ++r)
    if (errors[r]) std::rethrow_exception(errors[r]);
  for (int r = 0; r < R; ++r) {
    const rank_heads mine = shards[static_cast<std::size_t>(r)];
    for (std::int64_t b = 0; b < P::batch; ++b)
      for (std::int64_t h = 0; h < mine.count; ++h)
        ASSERT_EQ(got[r][static_cast<std::size_t>(b * mine.count + h)],
                  whole[static_cast<std::size_t>(b * P::heads + mine.first + h)])
            << "rank " << r << ", sequence " << b << ", kv head " << mine.first + h;
  }
}

/// The sanitizers' compress case: R = 2, both scorers.
TEST(DistributedCompressCuda, SmallForSanitizers) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const compress_problem p;
  expect_sharded_compress_on_gpu<kt::score::snapkv>(p, even_shards(8, 2));
  expect_sharded_compress_on_gpu<kt::score::external>(p, {{0, 3}, {3, 0}, {3, 5}});
}

TEST(DistributedCompressCuda, SimulatedRanksKeepWhatOneGpuKeeps) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const compress_problem p;
  const std::vector<std::vector<rank_heads>> layouts = {
      even_shards(8, 1), even_shards(8, 2), even_shards(8, 4), {{0, 3}, {3, 0}, {3, 5}},
      {{0, 4, true}, {0, 4, false}, {4, 4, true}, {4, 4, false}}};
  for (std::size_t k = 0; k < layouts.size(); ++k) {
    SCOPED_TRACE(::testing::Message() << "layout " << k);
    expect_sharded_compress_on_gpu<kt::score::snapkv>(p, layouts[k]);
    expect_sharded_compress_on_gpu<kt::score::external>(p, layouts[k]);
  }
}

/// The sharded eviction step and compress over NCCL, one rank per GPU (2 to 8):
/// the same comparisons as the simulated cases above. Skips below 2 GPUs.
TEST(DistributedEvictionCuda, NcclRanksOnSeparateGpus) {
#if !defined(KVTRIM_HAS_NCCL)
  GTEST_SKIP() << "built without NCCL (configure finds it through the CUDA toolkit or NCCL_ROOT: target kvtrim::nccl)";
#else
  const int ranks = std::min(visible_gpus(), 8);
  if (ranks < 2)
    GTEST_SKIP() << "the NCCL case needs at least 2 visible GPUs; " << ranks
                 << " visible (the simulated ranks above cover one GPU)";
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope) << ", " << ranks << " GPUs");
    check_sharded_eviction<kt::layout::paged>(scope, even_shards(8, ranks), 4, 2, 8, 128, 5000, 101, false, true);
    check_sharded_eviction<kt::layout::flat>(scope, even_shards(8, ranks), 2, 2, 8, 64, 900, 102, true, true);
  }
  check(cudaSetDevice(0), "cudaSetDevice");
  const compress_problem p;
  expect_sharded_compress_on_gpu<kt::score::snapkv>(p, even_shards(8, ranks), true);
  expect_sharded_compress_on_gpu<kt::score::external>(p, even_shards(8, ranks), true);
#endif
}

}  // namespace
