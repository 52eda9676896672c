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
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/device_memory.cuh"
#include "kvtrim/backend/cpu/adaptive.hpp"
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

TEST(DistributedBudgetCuda, NcclRanksOnSeparateGpus) {
#if !defined(KVTRIM_HAS_NCCL)
  GTEST_SKIP() << "built without NCCL (configure finds it through the CUDA toolkit or NCCL_ROOT: target kvtrim::nccl)";
#else
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 2)
    GTEST_SKIP() << "the NCCL case needs at least 2 visible GPUs; " << devices
                 << " visible (the simulated ranks above cover one GPU)";
  const int ranks = std::min(devices, 8);
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

}  // namespace
