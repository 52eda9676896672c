// budget::adaptive sharded over ranks (tensor parallelism): R ranks, each a
// thread with a comm::simulated communicator holding some of the layer's kv
// heads, against the one-rank budget over all heads (the merge of
// backend/cpu/adaptive.hpp, an independent algorithm: the sharded form is a
// radix threshold search). Scores are inputs, so the keep counts and the kept
// token lists (select_top_k of each rank's own heads) must be EQUAL — a
// difference is a tie broken in another order or a count off by one.
//
// Scores stress the tie rule across ranks: heavy ties (4 values), all equal
// (every token of every head tied: the order is (head, token) over ALL heads,
// so rank r's ties wait for every earlier rank's), ±0 (one key), NaN and ±∞,
// protected windows (+∞) of different lengths, per-head scales 4^h (the pool
// goes to one rank), empty and tiny contexts (T = 0: the paper form's floor of
// one token exceeds k = 0; T = 1, 2: a head holds fewer tokens than the budget
// asks, α = 1: floors equal to the whole head). Shards: even, uneven, empty
// ranks, and replicated heads (counted = false).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvtrim/backend/cpu/adaptive.hpp"
#include "kvtrim/backend/cpu/select_top_k.hpp"
#include "kvtrim/comm/simulated.hpp"
#include "kvtrim/comm/single_process.hpp"

namespace {

namespace kt = kvtrim;
using adaptive_cpu = kt::implementation<kt::budget::adaptive, kt::backend::cpu>;
using select_cpu = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;

enum class pattern { random, heavy_ties, all_equal, signed_zeros, specials, protected_windows, skewed };
constexpr pattern all_patterns[] = {pattern::random,       pattern::heavy_ties,        pattern::all_equal,
                                    pattern::signed_zeros, pattern::specials,          pattern::protected_windows,
                                    pattern::skewed};
const char* name_of(pattern p) {
  switch (p) {
    case pattern::random: return "random";
    case pattern::heavy_ties: return "heavy_ties";
    case pattern::all_equal: return "all_equal";
    case pattern::signed_zeros: return "signed_zeros";
    case pattern::specials: return "specials";
    case pattern::protected_windows: return "protected_windows";
    case pattern::skewed: return "skewed";
  }
  return "?";
}

struct scores_3d {
  std::int64_t batch, heads, tokens;
  std::vector<float> values;  // [batch, heads, tokens], row-major
  kt::tensor_view<const float, 3> heads_view(std::int64_t first, std::int64_t count) const {
    return {values.data() + first * tokens, {batch, count, tokens}, {heads * tokens, tokens, 1}};
  }
};

/// `window` = the protected (+∞) tail of head h is (h · 3) % (window + 1) tokens (≤ window).
scores_3d make_scores(pattern p, std::int64_t batch, std::int64_t heads, std::int64_t tokens, std::uint32_t seed,
                      std::int64_t window = 0) {
  scores_3d s{batch, heads, tokens, std::vector<float>(static_cast<std::size_t>(batch * heads * tokens))};
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
            const float r = uniform(rng);
            v = r < 0.05f ? inf : r < 0.10f ? -inf : r < 0.15f ? std::numeric_limits<float>::quiet_NaN()
                : r < 0.25f ? -0.0f : r < 0.35f ? 0.0f : std::floor(u * 8.0f) / 8.0f;
            break;
          }
          case pattern::protected_windows: {
            const std::int64_t protected_tail = window > 0 ? (h * 3) % (window + 1) : 0;
            v = t >= tokens - protected_tail ? inf : std::floor(u * 16.0f) / 16.0f;
            break;
          }
          case pattern::skewed: v = std::floor(u * 8.0f) * std::pow(4.0f, static_cast<float>(h)); break;
        }
        s.values[static_cast<std::size_t>((b * heads + h) * tokens + t)] = v;
      }
  return s;
}

struct kept {
  std::vector<std::int32_t> counts;                // [batch, heads] of the layer
  std::vector<std::vector<std::int32_t>> tokens;   // per (b, layer head): kept token list
};

/// select_top_k of `view`'s heads with `counts`, written into out for layer heads first...
void select_into(const kt::tensor_view<const float, 3>& view, const std::int32_t* counts, std::int64_t first,
                 std::int64_t layer_heads, kept& out) {
  const std::int64_t batch = view.extent(0), heads = view.extent(1), tokens = view.extent(2);
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(batch * heads + 1));
  std::vector<std::int32_t> list(static_cast<std::size_t>(std::max<std::int64_t>(batch * heads * tokens, 1)));
  std::vector<std::byte> scratch(select_cpu::workspace_bytes(batch * heads, tokens));
  select_cpu::select(view, counts, offsets.data(), list.data(), kt::workspace{scratch.data(), scratch.size()},
                     kt::backend::host_stream{});
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t i = b * heads + h;
      out.tokens[static_cast<std::size_t>(b * layer_heads + first + h)] =
          std::vector<std::int32_t>(list.begin() + offsets[static_cast<std::size_t>(i)],
                                    list.begin() + offsets[static_cast<std::size_t>(i + 1)]);
    }
}

kept one_rank(const kt::budget::adaptive::config& cfg, const scores_3d& s) {
  kept out{std::vector<std::int32_t>(static_cast<std::size_t>(s.batch * s.heads), -1),
           std::vector<std::vector<std::int32_t>>(static_cast<std::size_t>(s.batch * s.heads))};
  const kt::model_shape shape{s.heads, s.heads, 8};
  std::vector<std::byte> scratch(adaptive_cpu::workspace_bytes(cfg, shape, s.batch, s.tokens));
  const auto view = s.heads_view(0, s.heads);
  adaptive_cpu::keep_counts(cfg, view, out.counts.data(), kt::workspace{scratch.data(), scratch.size()},
                            kt::backend::host_stream{});
  select_into(view, out.counts.data(), 0, s.heads, out);
  return out;
}

/// One rank's heads: [first, first + count) of the layer; replicas are not counted.
struct rank_heads {
  std::int64_t first, count;
  bool counted = true;
};

/// Even shards of `heads` over `ranks` (the engines' rule when ranks divide heads),
/// the remainder to the first ranks otherwise.
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

/// Runs every rank on its own thread; the counts and kept lists of the counted
/// ranks are written at their layer heads (replicas must agree with them: checked).
kept sharded(const kt::budget::adaptive::config& cfg, const scores_3d& s, const std::vector<rank_heads>& shards) {
  const int ranks = static_cast<int>(shards.size());
  kept out{std::vector<std::int32_t>(static_cast<std::size_t>(s.batch * s.heads), -1),
           std::vector<std::vector<std::int32_t>>(static_cast<std::size_t>(s.batch * s.heads))};
  std::vector<std::vector<std::int32_t>> rank_counts(shards.size());
  std::vector<std::exception_ptr> errors(shards.size());
  kt::comm::simulated_group group(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        const rank_heads mine = shards[static_cast<std::size_t>(r)];
        const kt::budget::head_shard shard{mine.first, s.heads, mine.counted};
        std::vector<std::byte> scratch(adaptive_cpu::sharded_workspace_bytes(cfg, s.batch, mine.count, s.tokens, shard));
        auto& counts = rank_counts[static_cast<std::size_t>(r)];
        counts.assign(static_cast<std::size_t>(s.batch * mine.count), -1);
        adaptive_cpu::keep_counts(cfg, s.heads_view(mine.first, mine.count), shard, kt::comm::simulated(group, r),
                                  counts.data(), kt::workspace{scratch.data(), scratch.size()},
                                  kt::backend::host_stream{});
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (int r = 0; r < ranks; ++r) {
    const rank_heads mine = shards[static_cast<std::size_t>(r)];
    const auto& counts = rank_counts[static_cast<std::size_t>(r)];
    if (!mine.counted) continue;
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < mine.count; ++h)
        out.counts[static_cast<std::size_t>(b * s.heads + mine.first + h)] =
            counts[static_cast<std::size_t>(b * mine.count + h)];
    select_into(s.heads_view(mine.first, mine.count), counts.data(), mine.first, s.heads, out);
  }
  for (int r = 0; r < ranks; ++r) {  // a replica computes the counts of the rank it copies
    const rank_heads mine = shards[static_cast<std::size_t>(r)];
    if (mine.counted) continue;
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < mine.count; ++h)
        EXPECT_EQ(rank_counts[static_cast<std::size_t>(r)][static_cast<std::size_t>(b * mine.count + h)],
                  out.counts[static_cast<std::size_t>(b * s.heads + mine.first + h)])
            << "replica rank " << r << ", sequence " << b << ", head " << mine.first + h;
  }
  return out;
}

void expect_same(const kept& expected, const kept& got, const std::string& what) {
  ASSERT_EQ(expected.counts, got.counts) << what;
  for (std::size_t i = 0; i < expected.tokens.size(); ++i)
    ASSERT_EQ(expected.tokens[i], got.tokens[i]) << what << ", flattened head " << i;
}

struct budget_case {
  const char* name;
  kt::budget::adaptive::config cfg;
};
std::vector<budget_case> budget_cases() {
  return {{"paper_a0.2_ratio0.3", {kt::keep_ratio{0.3}, 0.2, false}},
          {"paper_a0_tokens7", {kt::keep_tokens{7}, 0.0, false}},
          {"paper_a1_tokens5", {kt::keep_tokens{5}, 1.0, false}},
          {"kvpress_a0.5_ratio0.25", {kt::keep_ratio{0.25}, 0.5, true}},
          {"kvpress_a0.1_tokens3", {kt::keep_tokens{3}, 0.1, true}}};
}

TEST(DistributedBudget, SimulatedRanksMatchOneRankOnEveryPattern) {
  const std::int64_t batch = 3, heads = 8;
  for (const std::int64_t tokens : {std::int64_t{0}, std::int64_t{1}, std::int64_t{2}, std::int64_t{37}, std::int64_t{300}})
    for (const pattern p : all_patterns)
      for (const auto& bc : budget_cases()) {
        // Protected windows stay ≤ k (the paper form's error is tested below).
        const std::int64_t window = kt::budget::adaptive::head_budget(bc.cfg, tokens) / 2;
        const scores_3d s = make_scores(p, batch, heads, tokens, static_cast<std::uint32_t>(tokens * 31 + 7), window);
        const auto what = [&](int ranks) {
          return std::string(name_of(p)) + ", " + bc.name + ", T = " + std::to_string(tokens) +
                 ", R = " + std::to_string(ranks);
        };
        kept expected;
        try {
          expected = one_rank(bc.cfg, s);
        } catch (const kt::error&) {
          // Specials protect ~5% of tokens (+∞), beyond k in the paper form: the
          // one-rank budget refuses, and so must every shard layout.
          for (const int ranks : {1, 2, 4, 8})
            EXPECT_THROW(sharded(bc.cfg, s, even_shards(heads, ranks)), kt::error) << what(ranks);
          continue;
        }
        for (const int ranks : {1, 2, 4, 8}) expect_same(expected, sharded(bc.cfg, s, even_shards(heads, ranks)), what(ranks));
      }
}

TEST(DistributedBudget, UnevenAndEmptyShards) {
  const scores_3d s = make_scores(pattern::heavy_ties, 2, 7, 129, 11);
  const std::vector<std::vector<rank_heads>> layouts = {
      {{0, 1}, {1, 6}},                  // 1 + 6
      {{0, 3}, {3, 0}, {3, 4}},          // an empty rank in the middle
      {{0, 0}, {0, 2}, {2, 2}, {4, 3}},  // an empty first rank
      {{0, 5}, {5, 1}, {6, 1}, {7, 0}},  // an empty last rank
  };
  for (const auto& bc : budget_cases()) {
    const kept expected = one_rank(bc.cfg, s);
    for (std::size_t l = 0; l < layouts.size(); ++l)
      expect_same(expected, sharded(bc.cfg, s, layouts[l]), std::string(bc.name) + ", layout " + std::to_string(l));
  }
}

TEST(DistributedBudget, ReplicatedHeadsAreCountedOnce) {
  // 4 ranks, 2 kv heads: each head on two ranks (engines replicate kv heads
  // when ranks outnumber them); the replica is not counted, and gets the same counts.
  const scores_3d s = make_scores(pattern::all_equal, 2, 2, 50, 3);
  const std::vector<rank_heads> shards = {{0, 1, true}, {0, 1, false}, {1, 1, true}, {1, 1, false}};
  for (const auto& bc : budget_cases()) expect_same(one_rank(bc.cfg, s), sharded(bc.cfg, s, shards), bc.name);
}

TEST(DistributedBudget, SingleProcessCommunicatorIsTheOneRankBudget) {
  const scores_3d s = make_scores(pattern::heavy_ties, 4, 5, 211, 5);
  for (const auto& bc : budget_cases()) {
    const kept expected = one_rank(bc.cfg, s);
    const kt::budget::head_shard shard{0, s.heads, true};
    std::vector<std::byte> scratch(adaptive_cpu::sharded_workspace_bytes(bc.cfg, s.batch, s.heads, s.tokens, shard));
    std::vector<std::int32_t> counts(static_cast<std::size_t>(s.batch * s.heads), -1);
    adaptive_cpu::keep_counts(bc.cfg, s.heads_view(0, s.heads), shard, kt::comm::single_process{}, counts.data(),
                              kt::workspace{scratch.data(), scratch.size()}, kt::backend::host_stream{});
    EXPECT_EQ(expected.counts, counts) << bc.name;
  }
}

TEST(DistributedBudget, LayerTotalIsExact) {
  // Σ counts = H·k per sequence whatever the shards (k ≤ T here, so the pool fills).
  const scores_3d s = make_scores(pattern::random, 2, 8, 1000, 9);
  const kt::budget::adaptive::config cfg{kt::keep_ratio{0.3}, 0.2, false};
  const kept got = sharded(cfg, s, even_shards(8, 4));
  for (std::int64_t b = 0; b < s.batch; ++b) {
    std::int64_t total = 0;
    for (std::int64_t h = 0; h < s.heads; ++h) total += got.counts[static_cast<std::size_t>(b * s.heads + h)];
    EXPECT_EQ(total, 8 * 300) << "sequence " << b;
  }
}

TEST(DistributedBudget, ProtectedBeyondBudgetThrowsOnEveryRank) {
  // Head 5 (on rank 2 of 4) protects 10 tokens with k = 4: the one-rank budget
  // throws; every sharded rank must throw too (none may be left in a collective).
  scores_3d s = make_scores(pattern::random, 1, 8, 40, 1);
  for (std::int64_t t = 0; t < 10; ++t) s.values[static_cast<std::size_t>(5 * 40 + t)] = std::numeric_limits<float>::infinity();
  const kt::budget::adaptive::config cfg{kt::keep_tokens{4}, 0.2, false};
  EXPECT_THROW(one_rank(cfg, s), kt::error);
  const auto shards = even_shards(8, 4);
  kt::comm::simulated_group group(4);
  int thrown = 0;
  std::vector<std::thread> threads;
  std::vector<int> threw(4, 0);
  std::vector<std::string> messages(4);
  for (int r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      const rank_heads mine = shards[static_cast<std::size_t>(r)];
      const kt::budget::head_shard shard{mine.first, 8, true};
      std::vector<std::byte> scratch(adaptive_cpu::sharded_workspace_bytes(cfg, 1, mine.count, 40, shard));
      std::vector<std::int32_t> counts(static_cast<std::size_t>(mine.count));
      try {
        adaptive_cpu::keep_counts(cfg, s.heads_view(mine.first, mine.count), shard, kt::comm::simulated(group, r),
                                  counts.data(), kt::workspace{scratch.data(), scratch.size()},
                                  kt::backend::host_stream{});
      } catch (const kt::error& e) {
        threw[static_cast<std::size_t>(r)] = 1;
        messages[static_cast<std::size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 4; ++r) thrown += threw[static_cast<std::size_t>(r)];
  EXPECT_EQ(thrown, 4);
  EXPECT_NE(messages[2].find("kv head 5"), std::string::npos) << messages[2];  // the owner names its head
}

TEST(DistributedBudget, ShardsThatMissAHeadThrowOnEveryRank) {
  const scores_3d s = make_scores(pattern::random, 1, 4, 16, 2);
  const kt::budget::adaptive::config cfg{kt::keep_tokens{4}, 0.2, false};
  // Heads 0-1 and 1-2 (head 1 twice, head 3 never): 4 counted heads, but the wrong ones?
  // The check is on the number counted: 2 + 1 = 3 ≠ 4.
  EXPECT_THROW(sharded(cfg, s, {{0, 2}, {2, 1}}), kt::error);
}

TEST(DistributedBudget, RefusesAShardOutsideTheLayer) {
  const scores_3d s = make_scores(pattern::random, 1, 4, 16, 2);
  const kt::budget::adaptive::config cfg{kt::keep_tokens{4}, 0.2, false};
  std::vector<std::int32_t> counts(4);
  std::vector<std::byte> scratch(adaptive_cpu::sharded_workspace_bytes(cfg, 1, 4, 16, {0, 8, true}));
  EXPECT_THROW(adaptive_cpu::keep_counts(cfg, s.heads_view(0, 4), kt::budget::head_shard{6, 8, true},
                                         kt::comm::single_process{}, counts.data(),
                                         kt::workspace{scratch.data(), scratch.size()}, kt::backend::host_stream{}),
               kt::error);
  EXPECT_THROW(adaptive_cpu::keep_counts(cfg, s.heads_view(0, 4), kt::budget::head_shard{0, 0, true},
                                         kt::comm::single_process{}, counts.data(),
                                         kt::workspace{scratch.data(), scratch.size()}, kt::backend::host_stream{}),
               kt::error);
}

}  // namespace
