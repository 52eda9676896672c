// An engine's life with one cache, on the CPU reference: a ragged prompt, then decode
// steps — one new token a head (scheme::append), attention with the eviction metric
// (eviction::attend), an eviction step every `interval` steps in a random scope
// (kvtrim::evict), speculative rollbacks (scheme::truncate, refused ones included) —
// over two layers of paged and flat caches, with every codec that keeps per-head
// streaming state (KIVI's filling key group, fp8's head scales, low_rank's pending
// tokens and basis refreshes, layered's fp16 ring) and the plain ones.
//
// The prompt is appended as it is, or compressed (SnapKV over an 8-query window with
// Ada-KV or uniform budgets: the kept tokens compress reports are the reference's,
// the metric is seeded from the window) — default configs of several policies meeting
// the codecs' state in one cache.
//
// Each call is tested elsewhere on its own; what breaks in an engine is their
// sequence — a side buffer that remembers slots, a count that an eviction or a
// rollback did not update (tests/cpu/eviction_test.cpp's LowRank* cases came from
// such a bug). So the invariant is checked after every call, for every held token:
// it decodes to the row the engine appended at its position, within the codec's
// bound; positions are distinct and below the head's next position; the layout's
// tables are valid (every page in exactly one table or the free list); free slots
// carry no metric (except after a tight pool's repacks); a refused call changed no
// byte; low_rank's pending buffer names the head's newest tokens. The decode check
// catches a side buffer a move forgets (low_rank's move_slot not rewriting its pending
// entry: errors ~0.7 against bounds ~0.01, a review's mutation run); the unpinned
// pending tokens of a48794a it does not — each stale entry's slot is rewritten later
// in the same refresh by the newer token that took it — so the pending-buffer check
// is what fails there.
//
// Data: keys and values of exact rank 4 per head (random coefficients on a fixed
// orthonormal basis, so low_rank at rank 4 reconstructs them up to its fp16
// coefficients); a row another token's row replaced is off by O(1), far above
// every bound below.
#include <gtest/gtest.h>

#include <kvtrim/backend/cpu/eviction.hpp>
#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/streaming.hpp"
#include "common/tensors.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
namespace ev = kvtrim::eviction;

constexpr std::int64_t layers = 2, batch = 2, kv_heads = 2, head_dim = 16, rank = 4, page_size = 8;
const kt::model_shape shape{.q_heads = 4, .kv_heads = kv_heads, .head_dim = head_dim};
constexpr std::int64_t heads = batch * kv_heads;

/// Prompt: appended as it is (static_window: no compress), or compressed by Scorer and Budget
/// (SnapKV's window queries, the kept tokens reported by compress, the metric seeded from the window).
/// Tight (flat only): a pool with little headroom, so appends repack the heads (every token,
/// and the codecs' side buffers that name slots, move); the engine's metric does not move with
/// a repack (docs/eviction.md: size the buffer so none happens between evictions), so those
/// lives skip the free-slot metric check.
template <class Layout, class Codec, class Scorer = kt::score::static_window, class Budget = kt::budget::uniform,
          bool Tight = false>
struct combo {
  using layout = Layout;
  using codec = Codec;
  using scheme = kt::scheme<Layout, Scorer, Budget, Codec, kt::backend::cpu>;
  static constexpr bool compressed_prompt = !std::same_as<Scorer, kt::score::static_window>;
  static constexpr bool tight = Tight;
  static auto make() {
    if constexpr (std::same_as<Layout, kt::layout::paged>)
      return scheme::make_cache(shape, batch, kt::layout::paged::pool_size{heads * 14 + 6, page_size}, config());
    else
      return scheme::make_cache(shape, batch, kt::layout::flat::pool_size{heads * (Tight ? 44 : 120)}, config());
  }
  static typename Codec::config config() {
    typename Codec::config cfg{};
    if constexpr (std::same_as<Codec, kt::codec::int8> || std::same_as<Codec, kt::codec::int4>) {
      cfg.key_group = 8;  // groups that fill and seal within the test's steps
    } else if constexpr (std::same_as<Codec, kt::codec::low_rank>) {
      cfg.rank = rank;
      cfg.update_freq = 6;  // > the eviction window below: pending tokens are pinned, not protected by age
    } else if constexpr (std::same_as<Codec, kt::codec::layered<kt::codec::int8>>) {
      cfg.inner.key_group = 8;
      cfg.recent = 6;
      cfg.sinks = 2;
    }
    return cfg;
  }
  /// Largest |decoded − appended| per element for data of magnitude ≤ `largest` (over all rows)
  /// under a head scale `scale` (fp8; 1 elsewhere): fp32 stores exactly; fp16 rounds (2^-11
  /// relative, plus fp16's half subnormal step); KIVI int8 / int4 steps are a group's or a row's
  /// max |x| / 127 (/ 7), half a step of error (bounded here by the whole step, the fp16 residual
  /// window inside it); fp8 e4m3: 2^-4 relative for normals plus half the subnormal step,
  /// scale·2^-10 (codec/fp8.hpp), after saturation (the caller clamps the appended value);
  /// low_rank on exact rank-4 data: c = Uᵀx exactly up to fp32, the fp16 coefficients move each
  /// element by ≤ ‖δc‖₂ ≤ 2^-11·‖c‖₂ = 2^-11·‖x‖₂ ≤ 2^-11·√head_dim·largest (+ 1e-6 for the fp32
  /// projection and lift).
  static double bound(double x, double largest, double scale) {
    if constexpr (std::same_as<Codec, kt::codec::fp32>)
      return 0.0;
    else if constexpr (std::same_as<Codec, kt::codec::fp16>)
      return std::ldexp(std::abs(x), -11) + 0x1p-25;
    else if constexpr (std::same_as<Codec, kt::codec::int8> ||
                       std::same_as<Codec, kt::codec::layered<kt::codec::int8>>)
      return largest / 127.0;
    else if constexpr (std::same_as<Codec, kt::codec::int4>)
      return largest / 7.0;
    else if constexpr (std::same_as<Codec, kt::codec::fp8>)
      return std::ldexp(std::abs(x), -4) + scale * 0x1p-10;
    else
      return largest * 0x1p-11 * std::sqrt(double(head_dim)) + 1e-6;
  }
};

/// The rows an engine appended, by (layer, head) and position.
struct appended_rows {
  std::map<std::int32_t, std::vector<float>> key, value;
};

template <class C>
class EngineLife : public ::testing::Test {};
using combos = ::testing::Types<
    combo<kt::layout::paged, kt::codec::fp32>, combo<kt::layout::paged, kt::codec::fp16>,
    combo<kt::layout::paged, kt::codec::int8>, combo<kt::layout::paged, kt::codec::int4>,
    combo<kt::layout::paged, kt::codec::fp8>, combo<kt::layout::paged, kt::codec::low_rank>,
    combo<kt::layout::paged, kt::codec::layered<kt::codec::int8>>, combo<kt::layout::flat, kt::codec::fp16>,
    combo<kt::layout::flat, kt::codec::int8>, combo<kt::layout::flat, kt::codec::fp8>,
    combo<kt::layout::flat, kt::codec::low_rank>, combo<kt::layout::flat, kt::codec::layered<kt::codec::int8>>,
    combo<kt::layout::paged, kt::codec::int8, kt::score::snapkv, kt::budget::adaptive>,
    combo<kt::layout::paged, kt::codec::low_rank, kt::score::snapkv, kt::budget::adaptive>,
    combo<kt::layout::paged, kt::codec::layered<kt::codec::int8>, kt::score::snapkv, kt::budget::uniform>,
    combo<kt::layout::flat, kt::codec::fp8, kt::score::snapkv, kt::budget::adaptive>,
    combo<kt::layout::flat, kt::codec::int4, kt::score::snapkv, kt::budget::uniform>,
    combo<kt::layout::flat, kt::codec::low_rank, kt::score::snapkv, kt::budget::uniform>,
    combo<kt::layout::flat, kt::codec::int8, kt::score::static_window, kt::budget::uniform, true>,
    combo<kt::layout::flat, kt::codec::fp8, kt::score::static_window, kt::budget::uniform, true>,
    combo<kt::layout::flat, kt::codec::low_rank, kt::score::static_window, kt::budget::uniform, true>,
    combo<kt::layout::flat, kt::codec::layered<kt::codec::int8>, kt::score::static_window, kt::budget::uniform, true>>;
TYPED_TEST_SUITE(EngineLife, combos);

TYPED_TEST(EngineLife, EveryHeldTokenDecodesToItsOwnRowThroughAppendsEvictionsAndRollbacks) {
  using C = TypeParam;
  using scheme = typename C::scheme;
  using view_type = typename scheme::cache_view;
  for (const std::uint64_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    std::mt19937_64 random(seed * 7919);
    std::normal_distribution<float> normal(0.0f, 1.0f);

    // A fixed orthonormal basis of rank 4 per (layer, head) for keys and for values.
    std::vector<Eigen::MatrixXf> bases;
    for (std::int64_t i = 0; i < 2 * layers * heads; ++i) {
      Eigen::MatrixXf m(head_dim, rank);
      for (std::int64_t r = 0; r < rank; ++r)
        for (std::int64_t d = 0; d < head_dim; ++d) m(d, r) = normal(random);
      bases.push_back(Eigen::HouseholderQR<Eigen::MatrixXf>(m).householderQ() * Eigen::MatrixXf::Identity(head_dim, rank));
    }
    const auto row_of = [&](std::int64_t basis) {
      Eigen::VectorXf c(rank);
      for (std::int64_t r = 0; r < rank; ++r) c(r) = 2.0f * normal(random);
      const Eigen::VectorXf x = bases[static_cast<std::size_t>(basis)] * c;
      return std::vector<float>(x.data(), x.data() + head_dim);
    };

    std::vector<kt::cache<scheme>> caches;
    std::vector<view_type> views;
    std::vector<std::vector<float>> metrics;
    std::vector<ev::metric_output<>> outputs;
    std::vector<appended_rows> rows(static_cast<std::size_t>(layers * heads));
    const ev::config base_config{.keep = 28, .interval = 8, .sinks = 2, .protected_window = 3, .alpha = 0.5};
    for (std::int64_t l = 0; l < layers; ++l) {
      caches.push_back(C::make());
      views.push_back(caches.back().view());
    }
    for (std::int64_t l = 0; l < layers; ++l) {
      metrics.emplace_back(static_cast<std::size_t>(kt::detail::storage_slots(views[l].storage)), 0.0f);
      outputs.push_back({metrics[l].data(), static_cast<std::int64_t>(metrics[l].size())});
      outputs.back().protected_window = base_config.protected_window;
    }
    double largest = 0.0;

    // Appends `count[head]` new rows per head (head by head: ragged counts) and records them.
    const auto append = [&](std::int64_t l, const std::vector<std::int64_t>& count) {
      for (std::int64_t head = 0; head < heads; ++head) {
        const std::int64_t n = count[static_cast<std::size_t>(head)];
        if (n == 0) continue;
        std::vector<float> k(static_cast<std::size_t>(n * head_dim)), v(k.size());
        auto& record = rows[static_cast<std::size_t>(l * heads + head)];
        const auto next = static_cast<std::int32_t>(views[l].positions.next_position[head]);
        for (std::int64_t t = 0; t < n; ++t) {
          const auto key = row_of(2 * (l * heads + head)), value = row_of(2 * (l * heads + head) + 1);
          std::copy(key.begin(), key.end(), k.begin() + t * head_dim);
          std::copy(value.begin(), value.end(), v.begin() + t * head_dim);
          for (float x : key) largest = std::max(largest, double(std::abs(x)));
          for (float x : value) largest = std::max(largest, double(std::abs(x)));
          record.key[next + static_cast<std::int32_t>(t)] = key;
          record.value[next + static_cast<std::int32_t>(t)] = value;
        }
        const kt::tensor_view<const float, 2> kv{k.data(), {n, head_dim}, {head_dim, 1}};
        const kt::tensor_view<const float, 2> vv{v.data(), {n, head_dim}, {head_dim, 1}};
        scheme::append_head(views[l], head / kv_heads, head % kv_heads, kv, vv);
      }
    };

    int checked_tokens = 0;
    const auto check = [&](const std::string& where) {
      for (std::int64_t l = 0; l < layers; ++l) {
        const view_type& cache = views[l];
        ASSERT_NO_THROW(view_type::layout_policy::validate("engine_life_test", cache, /*exclusive=*/true)) << where;
        std::set<std::int64_t> held_slots;
        for (std::int64_t head = 0; head < heads; ++head) {
          const std::int64_t b = head / kv_heads, h = head % kv_heads, n = cache.head_length(b, h);
          const auto& record = rows[static_cast<std::size_t>(l * heads + head)];
          std::set<std::int32_t> positions;
          // low_rank's pending tokens decode through the basis of the moment (zero before a head's
          // first refresh); they are re-encoded at the refresh, so they are checked from then on.
          std::int64_t unsettled = 0;
          if constexpr (std::same_as<typename C::codec, kt::codec::low_rank>) {
            // The pending buffer names the head's newest tokens in order: the refresh re-encodes each
            // entry into the slot it names, and truncate's horizon is its count.
            const auto& store = cache.storage;
            unsettled = store.pending_counts[head];
            ASSERT_LE(unsettled, n) << where << ": layer " << l << " head " << head;
            for (std::int64_t p = 0; p < unsettled; ++p)
              ASSERT_EQ(store.pending_slots[head * store.update_freq + p], cache.slot(b, h, n - unsettled + p))
                  << where << ": layer " << l << " head " << head << " pending entry " << p;
          }
          for (std::int64_t i = 0; i < n; ++i) {
            const std::int64_t slot = cache.slot(b, h, i);
            held_slots.insert(slot);
            const std::int32_t position = cache.positions.slot_position[slot];
            ASSERT_TRUE(positions.insert(position).second) << where << ": layer " << l << " head " << head
                                                           << " holds position " << position << " twice";
            ASSERT_LT(position, cache.positions.next_position[head]) << where;
            ASSERT_TRUE(record.key.count(position)) << where << ": layer " << l << " head " << head
                                                    << " holds position " << position << " never appended";
            if (i >= n - unsettled) continue;
            for (const bool value : {false, true}) {
              const auto got = kts::cached_row(cache, b, h, i, value);
              auto want = (value ? record.value : record.key).at(position);
              double scale = 1.0;
              if constexpr (std::same_as<typename C::codec, kt::codec::fp8>) {
                // head_amax scales come from the compressed prompt (appended prompts keep the bind's
                // 1.0); a later token beyond ±448·s saturates there (codec/fp8.hpp, as vLLM's does).
                scale = (value ? cache.storage.value_scales : cache.storage.key_scales)[head];
                for (float& x : want) x = static_cast<float>(std::clamp(double(x), -448.0 * scale, 448.0 * scale));
              }
              for (std::int64_t d = 0; d < head_dim; ++d) {
                const double error = std::abs(double(got[d]) - double(want[d]));
                ASSERT_LE(error, C::bound(want[d], largest, scale))
                    << where << ": layer " << l << " head " << head << " token " << i << " (position " << position
                    << ", slot " << slot << ") " << (value ? "value" : "key") << " channel " << d << ": got " << got[d]
                    << ", appended " << want[d];
              }
            }
            ++checked_tokens;
          }
        }
        for (std::int64_t slot = 0; !C::tight && slot < std::ssize(metrics[l]); ++slot)
          if (!held_slots.count(slot)) {
            ASSERT_EQ(metrics[l][slot], 0.0f) << where << ": layer " << l << " free slot " << slot << " has a metric";
          }
      }
    };

    if constexpr (C::compressed_prompt) {
      // The prompt of 60 tokens compressed to ~24 a head (SnapKV over an 8-query window), its
      // kept tokens recorded at their positions, the metric seeded from the window.
      constexpr std::int64_t tokens = 60, observed = 8;
      typename scheme::config cfg;
      cfg.score.window = observed;
      cfg.budget.keep = kt::keep_tokens{24};
      for (std::int64_t l = 0; l < layers; ++l) {
        auto keys = kts::make_tensor<float, 4>({batch, kv_heads, tokens, head_dim});
        auto values = kts::make_tensor<float, 4>({batch, kv_heads, tokens, head_dim});
        for (std::int64_t head = 0; head < heads; ++head)
          for (std::int64_t t = 0; t < tokens; ++t) {
            const auto key = row_of(2 * (l * heads + head)), value = row_of(2 * (l * heads + head) + 1);
            for (std::int64_t d = 0; d < head_dim; ++d) {
              keys.view(head / kv_heads, head % kv_heads, t, d) = key[d];
              values.view(head / kv_heads, head % kv_heads, t, d) = value[d];
              largest = std::max({largest, double(std::abs(key[d])), double(std::abs(value[d]))});
            }
          }
        auto queries = kts::random_tensor<float, 4>({batch, shape.q_heads, observed, head_dim}, seed * 100 + l);
        std::vector<std::int64_t> offsets(heads + 1);
        std::vector<std::int32_t> kept(static_cast<std::size_t>(scheme::kept_tokens_capacity(shape, batch, tokens, cfg)));
        const kt::compress_options<kt::host_space> options{.start_position = 3, .kept_offsets = offsets.data(),
                                                           .kept_tokens = kept.data(),
                                                           .kept_tokens_capacity = static_cast<std::int64_t>(kept.size())};
        kts::scratch_buffer scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
        scheme::compress(keys.view, values.view, queries.view, views[l], cfg, options, scratch.get());
        for (std::int64_t head = 0; head < heads; ++head)
          for (std::int64_t k = offsets[head]; k < offsets[head + 1]; ++k) {
            const std::int64_t t = kept[static_cast<std::size_t>(k)];
            auto& record = rows[static_cast<std::size_t>(l * heads + head)];
            for (const bool value : {false, true}) {
              std::vector<float> row(head_dim);
              for (std::int64_t d = 0; d < head_dim; ++d)
                row[d] = (value ? values : keys).view(head / kv_heads, head % kv_heads, t, d);
              (value ? record.value : record.key)[static_cast<std::int32_t>(3 + t)] = row;
            }
          }
        ev::seed_metric(keys.cview(), queries.cview(), views[l], {offsets.data(), kept.data(), heads}, 3, outputs[l]);
      }
    } else {
      // The prompt: ragged heads (an empty one included where the draw gives 0). A tight pool gets
      // one long head (60 tokens) among short ones: its appends outgrow its share and repack.
      for (std::int64_t l = 0; l < layers; ++l) {
        std::vector<std::int64_t> prompt(heads);
        for (auto& n : prompt) n = static_cast<std::int64_t>(random() % (C::tight ? 11 : 40));
        if constexpr (C::tight) {
          prompt[static_cast<std::size_t>(l % heads)] = 60;
          for (std::int64_t done = 0; done < 60; done += 12) {  // in pieces, as an engine's chunked prefill
            std::vector<std::int64_t> piece(heads, 0);
            for (std::int64_t head = 0; head < heads; ++head)
              piece[head] = std::clamp<std::int64_t>(prompt[head] - done, 0, 12);
            append(l, piece);
          }
          continue;
        }
        append(l, prompt);
      }
    }
    check("after the prompt");

    kts::scratch_buffer evict_scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const view_type>(views)));
    int evictions = 0, rollbacks = 0, refusals = 0;
    for (std::int64_t step = 1; step <= 48; ++step) {
      const std::string where = kt::detail::cat("step ", step);
      for (std::int64_t l = 0; l < layers; ++l) {
        append(l, std::vector<std::int64_t>(heads, 1));
        auto queries = kts::random_tensor<float, 3>({batch, shape.q_heads, head_dim}, seed * 1000 + step * 10 + l);
        auto out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
        kts::scratch_buffer scratch(ev::attend_workspace(views[l], outputs[l]));
        ev::attend(queries.cview(), views[l], out.view, outputs[l], scratch.get());
      }
      check(where + ", after append and attend");

      if (ev::due(step, base_config)) {
        ev::config cfg = base_config;
        cfg.scope = std::array{ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}[random() % 3];
        const ev::report report = kt::evict<kt::backend::cpu>(std::span<const view_type>(views),
                                                              std::span<const ev::metric_output<>>(outputs), cfg,
                                                              evict_scratch.get());
        evictions += report.evicted_tokens > 0;
        check(where + kt::detail::cat(", after an eviction step (scope ", int(cfg.scope), ")"));
      }

      if (random() % 4 == 0) {  // speculative decoding: 1–3 drafts a sequence, then 0..n of them rejected
        std::vector<std::int32_t> drafts(batch), drop(batch);
        for (std::int64_t b = 0; b < batch; ++b) {
          drafts[b] = 1 + static_cast<std::int32_t>(random() % 3);
          drop[b] = static_cast<std::int32_t>(random() % (drafts[b] + 1));
        }
        const kt::tensor_view<const std::int32_t, 1> drops{drop.data(), {batch}, {1}};
        for (std::int64_t l = 0; l < layers; ++l) {
          std::vector<std::int64_t> count(heads);
          for (std::int64_t head = 0; head < heads; ++head) count[head] = drafts[head / kv_heads];
          append(l, count);  // (attended without the metric: rejected drafts must not count)
          const auto* bytes = static_cast<const std::byte*>(caches[l].data());
          const std::vector<std::byte> before(bytes, bytes + caches[l].bytes());
          std::vector<std::int64_t> next(views[l].positions.next_position, views[l].positions.next_position + heads);
          try {
            scheme::truncate(views[l], drops);
            ++rollbacks;
            for (std::int64_t head = 0; head < heads; ++head)
              ASSERT_EQ(views[l].positions.next_position[head], next[head] - drop[head / kv_heads]) << where;
          } catch (const kt::error& e) {  // past a codec's exact horizon: the drafts stay, as an engine would keep them
            ++refusals;
            ASSERT_NE(std::string(e.what()).find("kvtrim::scheme::truncate"), std::string::npos) << e.what();
            ASSERT_EQ(std::memcmp(before.data(), caches[l].data(), before.size()), 0) << where << ": a refused truncate wrote";
          }
        }
        check(where + ", after a rollback");
      }
    }
    EXPECT_GT(evictions, 2) << "the life must evict to test anything";
    EXPECT_GT(rollbacks, 0);
    EXPECT_GT(checked_tokens, 1000);
    long long repacks = 0;
    if constexpr (std::same_as<typename C::layout, kt::layout::flat>)
      for (const auto& view : views) repacks += *view.repacks;
    if constexpr (C::tight) {
      EXPECT_GT(repacks, 0) << "a tight pool must repack to test anything";
    }
    std::printf("[ life     ] seed %llu: %d eviction steps that evicted, %d rollbacks, %d refused, %d token checks, %lld repacks\n",
                static_cast<unsigned long long>(seed), evictions, rollbacks, refusals, checked_tokens, repacks);
  }
}

}  // namespace
