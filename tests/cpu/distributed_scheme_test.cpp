// compress and the eviction step with kv heads sharded across ranks (issue 17):
// R ranks as R threads (comm::simulated), each holding a contiguous range of kv
// heads of every layer, against the one-rank scheme::compress / kvtrim::evict
// over all heads (the specifications, checked against their oracles elsewhere).
//
// compress (scheme.hpp's communicator overload, Ada-KV): every rank's kept
// token lists and cache rows equal the one-rank compress's for its heads, on
// SnapKV scores (paged) and key-norm scores with heavy ties (flat), R = 1, 2, 4,
// uneven and empty shards, replicas; a refused input on one rank makes every
// rank throw.
//
// Eviction (eviction/sharded.hpp), against the one-rank step (itself checked
// against a sort oracle in eviction_test.cpp).
// Compared exactly: every head's kept tokens (position, metric bits, stored key
// and value rows, in order), page and token counts, the reports; on awkward
// metrics (ties, ±0, NaN, ±∞), all-equal metrics (the tie rule alone decides),
// every scope, paged and flat, runs of 8 (KIVI int8 key groups), uneven, empty
// and replicated shards, retrieval heads; and refusals that every rank throws.
#include <gtest/gtest.h>

#include <kvtrim/comm/simulated.hpp>
#include <kvtrim/kvtrim.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/rank_threads.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
namespace ev = kvtrim::eviction;

template <class Layout, class Codec>
using eviction_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

struct paged_case {
  using layout = kt::layout::paged;
  static layout::pool_size pool(std::int64_t heads, std::int64_t tokens) {
    return {heads * layout::pages_for(tokens, 16) + 3, 16};
  }
};
struct flat_case {
  using layout = kt::layout::flat;
  static layout::pool_size pool(std::int64_t heads, std::int64_t tokens) { return {heads * (tokens + 40)}; }
};

enum class metrics_kind { awkward, all_equal };

/// The model, independent of how it is sharded: per (layer, sequence, kv head of
/// the layer) a length, key/value rows and metric values by token.
struct model_data {
  std::int64_t layers = 3, batch = 2, heads = 4, group = 2, head_dim = 16, longest = 150;
  std::vector<std::int64_t> lengths;          // [l][b][g]
  std::vector<std::vector<float>> metric;     // [l][b][g] → per token
  std::uint64_t seed = 0;

  model_data(std::uint64_t seed_, metrics_kind kind) : seed(seed_) {
    std::mt19937_64 random(seed);
    std::uniform_int_distribution<std::int64_t> length(1, longest);
    // Few distinct values, both zeros, ±∞ and NaN: ties at every threshold.
    static constexpr float table[] = {0.0f, -0.0f, 1.0f, 1.0f, 0.5f, 0.5f, -2.0f, 3e38f,
                                      std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity(),
                                      std::numeric_limits<float>::quiet_NaN()};
    std::uniform_int_distribution<int> pick(0, 2 * static_cast<int>(std::size(table)));
    for (std::int64_t k = 0; k < layers * batch * heads; ++k) {
      lengths.push_back(length(random));
      std::vector<float> values(static_cast<std::size_t>(lengths.back()));
      for (float& v : values) {
        const int t = pick(random);
        v = kind == metrics_kind::all_equal ? 0.25f
            : t < static_cast<int>(std::size(table)) ? table[t]
                                                     : std::normal_distribution<float>(0.0f, 1.0f)(random);
      }
      metric.push_back(std::move(values));
    }
  }
  std::int64_t index(std::int64_t l, std::int64_t b, std::int64_t g) const { return (l * batch + b) * heads + g; }
};

/// One rank's caches: kv heads [first, first + local) of every layer of the model.
template <class Case, class Codec>
struct rank_caches {
  using scheme = eviction_scheme<typename Case::layout, Codec>;
  using view_type = typename scheme::cache_view;
  std::int64_t first, local;
  std::vector<kt::cache<scheme>> caches;
  std::vector<std::vector<float>> metrics;
  std::vector<ev::metric_output<>> outputs;
  std::vector<view_type> views;

  rank_caches(const model_data& m, std::int64_t first_, std::int64_t local_, std::int64_t window,
              const typename Codec::config& codec_config = {})
      : first(first_), local(local_) {
    if (local == 0) return;
    const kt::model_shape shape{.q_heads = local * m.group, .kv_heads = local, .head_dim = m.head_dim};
    for (std::int64_t l = 0; l < m.layers; ++l) {
      caches.push_back(scheme::make_cache(shape, m.batch, Case::pool(m.batch * local, m.longest), codec_config));
      for (std::int64_t b = 0; b < m.batch; ++b)
        for (std::int64_t h = 0; h < local; ++h) {
          const std::int64_t k = m.index(l, b, first + h), n = m.lengths[k];
          // The same rows for the head whichever rank holds it: seeded by its model index.
          auto keys = kts::random_tensor<float, 2>({n, m.head_dim}, m.seed * 1000 + 2 * k + 1);
          auto values = kts::random_tensor<float, 2>({n, m.head_dim}, m.seed * 1000 + 2 * k + 2);
          scheme::append_head(caches.back().view(), b, h, keys.view, values.view);
        }
      const auto& cache = caches.back().view();
      metrics.emplace_back(static_cast<std::size_t>(kt::detail::storage_slots(cache.storage)), 0.0f);
      for (std::int64_t b = 0; b < m.batch; ++b)
        for (std::int64_t h = 0; h < local; ++h)
          for (std::int64_t i = 0; i < cache.head_length(b, h); ++i)
            metrics.back()[static_cast<std::size_t>(cache.slot(b, h, i))] =
                m.metric[static_cast<std::size_t>(m.index(l, b, first + h))][static_cast<std::size_t>(i)];
    }
    for (std::int64_t l = 0; l < m.layers; ++l) {
      views.push_back(caches[l].view());
      outputs.push_back({metrics[l].data(), static_cast<std::int64_t>(metrics[l].size()), ev::metric_kind::squared_sum,
                         window});
    }
  }
  std::span<const view_type> layer_views() const { return views; }
  std::span<const ev::metric_output<>> layer_metrics() const { return outputs; }
};

/// What head (b, h) of a view holds, by logical index: position, metric bits, key and value rows.
struct token_record {
  std::int32_t position;
  std::uint32_t metric_bits;
  std::vector<float> key, value;
  bool operator==(const token_record&) const = default;
};
template <class View>
std::vector<token_record> read_head(const View& cache, const std::vector<float>& metric, std::int64_t b, std::int64_t h) {
  std::vector<token_record> head;
  for (std::int64_t i = 0; i < cache.head_length(b, h); ++i) {
    const std::int64_t slot = cache.slot(b, h, i);
    head.push_back({cache.positions.slot_position[slot], std::bit_cast<std::uint32_t>(metric[slot]),
                    kts::cached_row(cache, b, h, i, false), kts::cached_row(cache, b, h, i, true)});
  }
  return head;
}

/// One rank's part in a sharded call: its heads and whether it counts them.
struct rank_shard {
  std::int64_t first, local;
  bool counted = true;
};

using kts::message_of;
using kts::run_ranks;

template <class Case, class Codec>
void expect_sharded_equals_one_rank(ev::scope scope, const std::vector<rank_shard>& shards, metrics_kind kind,
                                    std::uint64_t seed, const typename Codec::config& codec_config = {}) {
  using ranks_type = rank_caches<Case, Codec>;
  const model_data m(seed, kind);
  // A retrieval head at layer 1, kv head 2 (a shard boundary in the layouts below).
  std::vector<std::uint8_t> retrieval(static_cast<std::size_t>(m.layers * m.heads), 0);
  retrieval[static_cast<std::size_t>(1 * m.heads + 2)] = 1;
  const ev::config cfg{.scope = scope, .keep = 60, .interval = 16, .sinks = 3, .protected_window = 9, .alpha = 0.3,
                       .retrieval_heads = retrieval.data()};

  ranks_type whole(m, 0, m.heads, cfg.protected_window, codec_config);
  kts::scratch_buffer whole_scratch(kt::evict_workspace<kt::backend::cpu>(whole.layer_views()));
  const ev::report want = kt::evict<kt::backend::cpu>(whole.layer_views(), whole.layer_metrics(), cfg, whole_scratch.get());
  ASSERT_GT(want.evicted_tokens, 0) << "the case must evict to test anything";

  const int R = static_cast<int>(shards.size());
  std::vector<ranks_type> ranks;
  for (const rank_shard& s : shards) ranks.emplace_back(m, s.first, s.local, cfg.protected_window, codec_config);
  std::vector<ev::report> got(shards.size());
  kt::comm::simulated_group group(R);
  const auto errors = run_ranks(R, [&](int r) {
    const rank_shard& s = shards[static_cast<std::size_t>(r)];
    const ev::shard shard{.heads = {.first_head = s.first, .total_heads = m.heads, .counted = s.counted},
                          .batch = m.batch, .layers = m.layers};
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    kts::scratch_buffer scratch(kt::evict_workspace<kt::backend::cpu>(mine.layer_views(), shard));
    got[static_cast<std::size_t>(r)] = kt::evict<kt::backend::cpu>(mine.layer_views(), mine.layer_metrics(), cfg, shard,
                                                                    kt::comm::simulated(group, r), scratch.get());
  });
  for (int r = 0; r < R; ++r) ASSERT_FALSE(errors[r]) << "rank " << r << ": " << message_of(errors[r]);

  std::int64_t evicted = 0, freed = 0;
  for (int r = 0; r < R; ++r) {
    const rank_shard& s = shards[static_cast<std::size_t>(r)];
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    for (std::int64_t l = 0; l < m.layers && s.local > 0; ++l)
      for (std::int64_t b = 0; b < m.batch; ++b)
        for (std::int64_t h = 0; h < s.local; ++h)
          ASSERT_TRUE(read_head(mine.views[l], mine.metrics[l], b, h) ==
                      read_head(whole.views[l], whole.metrics[l], b, s.first + h))
              << "rank " << r << ", layer " << l << ", sequence " << b << ", kv head " << s.first + h << ": "
              << mine.views[l].head_length(b, h) << " tokens kept, one rank keeps "
              << whole.views[l].head_length(b, s.first + h);
    if (s.counted) {
      evicted += got[r].evicted_tokens;
      freed += got[r].freed_pages;
    }
    if (scope != ev::scope::per_head) {  // the units' counts, the same on every rank
      EXPECT_EQ(got[r].units_evicted, want.units_evicted) << "rank " << r;
      EXPECT_EQ(got[r].units_over_target, want.units_over_target) << "rank " << r;
    }
  }
  EXPECT_EQ(evicted, want.evicted_tokens);
  EXPECT_EQ(freed, want.freed_pages);
}

const std::vector<std::vector<rank_shard>>& shard_layouts() {
  static const std::vector<std::vector<rank_shard>> layouts = {
      {{0, 4}},                                     // one rank
      {{0, 2}, {2, 2}},                             // R = 2, even
      {{0, 1}, {1, 1}, {2, 1}, {3, 1}},             // R = 4, one head each
      {{0, 3}, {3, 0}, {3, 1}},                     // uneven, an empty rank in the middle
      {{0, 0}, {0, 1}, {1, 3}},                     // an empty first rank
      {{0, 2}, {0, 2, false}, {2, 2}, {2, 2, false}},  // replicas: every head on two ranks, counted once
  };
  return layouts;
}

template <class Case>
class DistributedEviction : public ::testing::Test {};
using layouts = ::testing::Types<paged_case, flat_case>;
TYPED_TEST_SUITE(DistributedEviction, layouts);

TYPED_TEST(DistributedEviction, EqualsOneRankInEveryScopeAndShardLayout) {
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer})
    for (std::size_t k = 0; k < shard_layouts().size(); ++k)
      for (const std::uint64_t seed : {1u, 2u}) {
        SCOPED_TRACE(::testing::Message() << "scope " << int(scope) << ", shard layout " << k << ", seed " << seed);
        expect_sharded_equals_one_rank<TypeParam, kt::codec::fp32>(scope, shard_layouts()[k], metrics_kind::awkward,
                                                                   seed);
      }
}

TYPED_TEST(DistributedEviction, AllEqualMetricsLeaveTheTieRuleToDecide) {
  // Every candidate ties: which ones stay is the (layer, head, token) order across ranks alone.
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer})
    for (std::size_t k = 1; k < shard_layouts().size(); ++k) {
      SCOPED_TRACE(::testing::Message() << "scope " << int(scope) << ", shard layout " << k);
      expect_sharded_equals_one_rank<TypeParam, kt::codec::fp32>(scope, shard_layouts()[k], metrics_kind::all_equal, 3);
    }
}

TYPED_TEST(DistributedEviction, GroupedInt8EvictsWholeRunsAcrossRanks) {
  kt::codec::int8::config codec_config{};
  codec_config.key_group = 8;
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    expect_sharded_equals_one_rank<TypeParam, kt::codec::int8>(scope, shard_layouts()[3], metrics_kind::awkward, 4,
                                                               codec_config);
  }
}

/// Byte images of every rank's caches and metrics (a refused call changes none).
template <class Ranks>
std::vector<std::vector<std::byte>> images(const std::vector<Ranks>& ranks) {
  std::vector<std::vector<std::byte>> out;
  for (const auto& rank : ranks) {
    for (const auto& c : rank.caches)
      out.emplace_back(static_cast<const std::byte*>(c.data()), static_cast<const std::byte*>(c.data()) + c.bytes());
    for (const auto& metric : rank.metrics)
      out.emplace_back(reinterpret_cast<const std::byte*>(metric.data()),
                       reinterpret_cast<const std::byte*>(metric.data() + metric.size()));
  }
  return out;
}

TEST(DistributedEvictionErrors, EveryRankThrowsAndNoCacheChanges) {
  using ranks_type = rank_caches<paged_case, kt::codec::fp32>;
  const model_data m(9, metrics_kind::awkward);
  const ev::config cfg{.scope = ev::scope::cross_layer, .keep = 60, .interval = 16, .sinks = 3, .protected_window = 9};
  const std::vector<rank_shard> shards = {{0, 1}, {1, 2}, {3, 1}};
  std::vector<ranks_type> ranks;
  for (const rank_shard& s : shards) ranks.emplace_back(m, s.first, s.local, cfg.protected_window);
  const auto before = images(ranks);

  // `fault(r, shard, outputs, bytes)` spoils one rank's input; every rank must throw, and only then.
  const auto run = [&](auto&& fault) {
    kt::comm::simulated_group group(3);
    return run_ranks(3, [&](int r) {
      const auto& mine = ranks[static_cast<std::size_t>(r)];
      ev::shard shard{.heads = {.first_head = shards[r].first, .total_heads = m.heads}, .batch = m.batch,
                      .layers = m.layers};
      auto outputs = mine.outputs;
      std::size_t bytes = kt::evict_workspace<kt::backend::cpu>(mine.layer_views(), shard);
      fault(r, shard, outputs, bytes);
      std::vector<std::byte> scratch(bytes + 1);
      kt::evict<kt::backend::cpu>(mine.layer_views(), std::span<const ev::metric_output<>>(outputs), cfg, shard,
                                  kt::comm::simulated(group, r), kt::workspace{scratch.data(), bytes});
    });
  };
  const auto expect_all_throw = [&](const std::vector<std::exception_ptr>& errors, int culprit, const char* culprit_says) {
    for (int r = 0; r < 3; ++r) {
      ASSERT_TRUE(errors[r]) << "rank " << r << " returned: another rank refused its input";
      const std::string what = message_of(errors[r]);
      if (r == culprit) {
        EXPECT_NE(what.find(culprit_says), std::string::npos) << what;
      } else if (culprit >= 0) {
        EXPECT_NE(what.find("refused"), std::string::npos) << "rank " << r << ": " << what;
      }
    }
    EXPECT_TRUE(images(ranks) == before) << "a refused call changed a cache or a metric";
  };

  expect_all_throw(run([](int r, ev::shard&, auto&, std::size_t& bytes) { if (r == 1) bytes -= 8; }), 1, "workspace");
  expect_all_throw(run([](int r, ev::shard&, auto& outputs, std::size_t&) { if (r == 2) outputs[1].protected_window = 3; }),
                   2, "protected window");
  expect_all_throw(run([](int r, ev::shard& shard, auto&, std::size_t&) { if (r == 0) shard.heads.first_head = 4; }), 0,
                   "shard.first_head");
  // Shards that miss a head: found by the first collective, thrown by every rank.
  const auto uncounted = run([](int r, ev::shard& shard, auto&, std::size_t&) { if (r == 2) shard.heads.counted = false; });
  expect_all_throw(uncounted, -1, "");
  for (const auto& error : uncounted)
    if (error) {
      EXPECT_NE(message_of(error).find("counted shards"), std::string::npos) << message_of(error);
    }
  // A config every rank refuses the same way, before any collective.
  const ev::config bad{.keep = 16, .interval = 16};
  kt::comm::simulated_group group(3);
  const auto errors = run_ranks(3, [&](int r) {
    const auto& mine = ranks[static_cast<std::size_t>(r)];
    const ev::shard shard{.heads = {.first_head = shards[r].first, .total_heads = m.heads}, .batch = m.batch,
                          .layers = m.layers};
    kt::evict<kt::backend::cpu>(mine.layer_views(), mine.layer_metrics(), bad, shard, kt::comm::simulated(group, r),
                                kt::workspace{});
  });
  expect_all_throw(errors, -1, "");
}

// ---- compress with a communicator --------------------------------------------------

template <class Layout, class Scorer>
using adaptive_scheme = kt::scheme<Layout, Scorer, kt::budget::adaptive, kt::codec::fp32, kt::backend::cpu>;

/// Heads [first, first + count) of a [B, H, ·, D] tensor (the same strides).
template <class T>
kt::tensor_view<T, 4> head_slice(const kt::tensor_view<T, 4>& all, std::int64_t first, std::int64_t count) {
  return {all.data + first * all.strides[1], {all.extents[0], count, all.extents[2], all.extents[3]}, all.strides};
}

template <class Scheme>
struct compressed {
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> kept;
  kt::cache<Scheme> cache;
};

/// A compress into a fresh cache of `shape`, with the selection written out.
template <class Scheme, class Compress>
std::unique_ptr<compressed<Scheme>> compress_into(const kt::model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                                  const typename Scheme::config& cfg,
                                                  typename Scheme::layout::pool_size pool, Compress&& compress) {
  auto out = std::make_unique<compressed<Scheme>>(compressed<Scheme>{
      std::vector<std::int64_t>(static_cast<std::size_t>(batch * shape.kv_heads + 1)),
      std::vector<std::int32_t>(static_cast<std::size_t>(Scheme::kept_tokens_capacity(shape, batch, tokens, cfg))),
      Scheme::make_cache(shape, batch, pool)});
  const kt::compress_options<kt::host_space> options{.kept_offsets = out->offsets.data(),
                                                     .kept_tokens = out->kept.data(),
                                                     .kept_tokens_capacity = static_cast<std::int64_t>(out->kept.size())};
  compress(out->cache.view(), options);
  return out;
}

template <class Case, class Scorer>
void expect_sharded_compress_equals_one_rank(const std::vector<rank_shard>& shards, bool tied_keys) {
  using scheme = adaptive_scheme<typename Case::layout, Scorer>;
  const std::int64_t batch = 2, heads = 4, group = 2, head_dim = 16, tokens = 301, window = 8;
  const kt::model_shape shape{.q_heads = heads * group, .kv_heads = heads, .head_dim = head_dim};
  auto keys = kts::random_tensor<float, 4>({batch, heads, tokens, head_dim}, 11);
  if (tied_keys)  // four distinct rows: key norms tie across heads and ranks
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t t = 0; t < tokens; ++t)
          for (std::int64_t d = 0; d < head_dim; ++d) keys(b, h, t, d) = static_cast<float>((t * 7 + h) % 4) + 0.5f;
  const auto values = kts::random_tensor<float, 4>({batch, heads, tokens, head_dim}, 12);
  const auto queries = kts::random_tensor<float, 4>({batch, shape.q_heads, window, head_dim}, 13);
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.3};
  cfg.budget.alpha = 0.2;
  if constexpr (requires { cfg.score.window; }) cfg.score.window = window;

  // Compresses heads [first, first + s.kv_heads) with `run(keys, values, queries, cache, options)`.
  const auto compress_heads = [&](const kt::model_shape& s, std::int64_t first, auto&& run) {
    return compress_into<scheme>(s, batch, tokens, cfg, Case::pool(batch * s.kv_heads, tokens),
                                 [&](auto& cache, const auto& options) {
                                   run(head_slice(keys.cview(), first, s.kv_heads),
                                       head_slice(values.cview(), first, s.kv_heads),
                                       head_slice(queries.cview(), first * group, s.q_heads), cache, options);
                                 });
  };
  const auto whole = compress_heads(shape, 0, [&](auto k, auto v, auto q, auto& cache, const auto& options) {
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    scheme::compress(k, v, q, cache, cfg, options, kt::workspace{scratch.data(), scratch.size()});
  });

  const int R = static_cast<int>(shards.size());
  std::vector<std::unique_ptr<compressed<scheme>>> ranks(shards.size());
  kt::comm::simulated_group group_of_ranks(R);
  const auto errors = run_ranks(R, [&](int r) {
    const rank_shard& mine = shards[static_cast<std::size_t>(r)];
    const kt::budget::head_shard shard{mine.first, heads, mine.counted};
    const kt::comm::simulated comm(group_of_ranks, r);
    if (mine.local == 0) {  // no heads: the budget's collectives only
      std::vector<std::byte> scratch(scheme::compress_without_heads_workspace(batch, tokens, cfg, shard));
      scheme::compress_without_heads(batch, tokens, cfg, shard, comm, kt::workspace{scratch.data(), scratch.size()});
      return;
    }
    const kt::model_shape local{.q_heads = mine.local * group, .kv_heads = mine.local, .head_dim = head_dim};
    ranks[static_cast<std::size_t>(r)] =
        compress_heads(local, mine.first, [&](auto k, auto v, auto q, auto& cache, const auto& options) {
          std::vector<std::byte> scratch(scheme::compress_workspace(local, batch, tokens, cfg, shard));
          scheme::compress(k, v, q, cache, cfg, options, shard, comm, kt::workspace{scratch.data(), scratch.size()});
        });
  });
  for (int r = 0; r < R; ++r) ASSERT_FALSE(errors[r]) << "rank " << r << ": " << message_of(errors[r]);

  const auto& want_view = whole->cache.view();
  for (int r = 0; r < R; ++r) {
    const rank_shard& mine = shards[static_cast<std::size_t>(r)];
    for (std::int64_t b = 0; b < batch && mine.local > 0; ++b)
      for (std::int64_t h = 0; h < mine.local; ++h) {
        const compressed<scheme>& got = *ranks[static_cast<std::size_t>(r)];
        const std::int64_t g = mine.first + h, local_head = b * mine.local + h, layer_head = b * heads + g;
        const std::vector<std::int32_t> got_kept(got.kept.begin() + got.offsets[local_head],
                                                 got.kept.begin() + got.offsets[local_head + 1]);
        const std::vector<std::int32_t> want_kept(whole->kept.begin() + whole->offsets[layer_head],
                                                  whole->kept.begin() + whole->offsets[layer_head + 1]);
        ASSERT_EQ(got_kept, want_kept) << "rank " << r << ", sequence " << b << ", kv head " << g;
        const auto& got_view = got.cache.view();
        ASSERT_EQ(got_view.head_length(b, h), want_view.head_length(b, g));
        for (std::int64_t i = 0; i < got_view.head_length(b, h); ++i) {
          ASSERT_EQ(got_view.positions.slot_position[got_view.slot(b, h, i)],
                    want_view.positions.slot_position[want_view.slot(b, g, i)]);
          ASSERT_EQ(kts::cached_row(got_view, b, h, i, false), kts::cached_row(want_view, b, g, i, false));
          ASSERT_EQ(kts::cached_row(got_view, b, h, i, true), kts::cached_row(want_view, b, g, i, true));
        }
      }
  }
}

TEST(DistributedCompress, SnapKvAdaKvEqualsOneRank) {
  for (std::size_t k = 0; k < shard_layouts().size(); ++k) {
    SCOPED_TRACE(::testing::Message() << "shard layout " << k);
    expect_sharded_compress_equals_one_rank<paged_case, kt::score::snapkv>(shard_layouts()[k], false);
  }
}

TEST(DistributedCompress, KeyNormTiesAdaKvEqualsOneRank) {
  for (std::size_t k = 0; k < shard_layouts().size(); ++k) {
    SCOPED_TRACE(::testing::Message() << "shard layout " << k);
    expect_sharded_compress_equals_one_rank<flat_case, kt::score::key_norm>(shard_layouts()[k], true);
  }
}

TEST(DistributedCompress, OneRankRefusingItsInputMakesEveryRankThrow) {
  using scheme = adaptive_scheme<kt::layout::flat, kt::score::key_norm>;
  const std::int64_t batch = 1, heads = 2, head_dim = 8, tokens = 50;
  auto keys = kts::random_tensor<float, 4>({batch, heads, tokens, head_dim}, 21);
  const auto values = kts::random_tensor<float, 4>({batch, heads, tokens, head_dim}, 22);
  keys(0, 1, 7, 3) = std::numeric_limits<float>::quiet_NaN();  // in rank 1's head
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{10};
  const kt::model_shape local{.q_heads = 1, .kv_heads = 1, .head_dim = head_dim};
  std::vector<kt::cache<scheme>> caches;
  for (int r = 0; r < 2; ++r) caches.push_back(scheme::make_cache(local, batch, flat_case::pool(batch, tokens)));
  kt::comm::simulated_group group_of_ranks(2);
  const auto errors = run_ranks(2, [&](int r) {
    const kt::budget::head_shard shard{r, heads, true};
    std::vector<std::byte> scratch(scheme::compress_workspace(local, batch, tokens, cfg, shard));
    scheme::compress(head_slice(keys.cview(), r, 1), head_slice(values.cview(), r, 1), caches[r].view(), cfg,
                     kt::compress_options<kt::host_space>{}, shard, kt::comm::simulated(group_of_ranks, r),
                     kt::workspace{scratch.data(), scratch.size()});
  });
  ASSERT_TRUE(errors[0] && errors[1]) << "both ranks must throw";
  EXPECT_NE(message_of(errors[1]).find("finite"), std::string::npos) << message_of(errors[1]);
  EXPECT_NE(message_of(errors[0]).find("refused"), std::string::npos) << message_of(errors[0]);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(caches[r].view().head_length(0, 0), 0) << "rank " << r << " wrote its cache";
}

}  // namespace
