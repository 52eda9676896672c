// Decode-time eviction (issue 16): the radix threshold against a sort, the
// metric decode attention accumulates against a double oracle, the eviction
// step against a sort-based restatement of its math (every scope, paged and
// flat, plain and KIVI-grouped int8 storage) with the invariants a cache must
// keep, and a 10k-token generation under a fixed budget.
//
// Tolerances are derived where the test uses them (metric: the decode
// attention bound of common/tolerance.hpp carried through p² and the group
// sum; attention over the kept set: common/tolerance.hpp itself). Selections
// and moves are compared exactly (bits of metrics, positions, stored rows).
#include <gtest/gtest.h>

#include <kvtrim/backend/cpu/eviction.hpp>
#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "common/oracle.hpp"
#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "common/tolerance.hpp"

namespace {

namespace kt = kvtrim;
namespace kts = kvtrim::testing;
namespace ev = kvtrim::eviction;

// ---- the threshold ----------------------------------------------------------

/// Values with many ties, both zeros, infinities and NaN (the awkward ones).
float awkward_value(std::mt19937_64& random) {
  static constexpr float table[] = {0.0f, -0.0f, 1.0f, 1.0f, 0.5f, -2.0f, 1e-30f, -1e-30f, 3e38f,
                                    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min()};
  std::uniform_int_distribution<int> pick(0, 2 * static_cast<int>(std::size(table)));
  const int k = pick(random);
  if (k < static_cast<int>(std::size(table))) return table[k];
  return std::normal_distribution<float>(0.0f, 1.0f)(random);
}

TEST(EvictionThreshold, RadixSelectEqualsSortOnAwkwardSizes) {
  std::mt19937_64 random(16);
  for (const std::int64_t n : {1, 2, 3, 7, 255, 256, 257, 1000, 4099}) {
    std::vector<float> values(static_cast<std::size_t>(n));
    for (float& v : values) v = awkward_value(random);
    std::vector<std::int64_t> order(values.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return kt::detail::ranks_before(values[a], a, values[b], b);
    });
    for (const std::int64_t need : {std::int64_t{0}, std::int64_t{1}, n / 3, n / 2, n - 1, n}) {
      if (need < 0 || need > n) continue;
      const auto limit = kt::eviction_detail::radix_threshold(need, [&](auto&& take) {
        for (const float v : values) take(kt::eviction_detail::rank_key(v));
      });
      kt::eviction_detail::threshold_walk walk{limit};
      std::set<std::int64_t> kept;
      for (std::int64_t i = 0; i < n; ++i)
        if (walk.keeps(kt::eviction_detail::rank_key(values[static_cast<std::size_t>(i)]))) kept.insert(i);
      const std::set<std::int64_t> expected(order.begin(), order.begin() + need);
      EXPECT_EQ(kept, expected) << "n = " << n << ", need = " << need;
    }
  }
}

TEST(EvictionThreshold, KeyOrderIsRanksBeforeOrder) {
  // −0 and +0 share a key; NaN is below −∞; otherwise the key is strictly monotone.
  using kt::eviction_detail::rank_key;
  EXPECT_EQ(rank_key(0.0f), rank_key(-0.0f));
  EXPECT_LT(rank_key(std::numeric_limits<float>::quiet_NaN()), rank_key(-std::numeric_limits<float>::infinity()));
  EXPECT_LT(rank_key(-1.0f), rank_key(-0.0f));
  EXPECT_LT(rank_key(0.0f), rank_key(std::numeric_limits<float>::denorm_min()));
  EXPECT_LT(rank_key(3e38f), rank_key(std::numeric_limits<float>::infinity()));
}

// ---- the metric ---------------------------------------------------------------

template <class Layout, class Codec>
using eviction_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

TEST(EvictionMetric, DecodeAttentionMetricMatchesDoubleOracle) {
  using scheme = eviction_scheme<kt::layout::paged, kt::codec::fp32>;
  const std::int64_t batch = 2, kv_heads = 3, head_dim = 64, window = 5;
  for (const std::int64_t group : {1, 4}) {
    const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
    const std::int64_t lengths[] = {1, 7, 70, 129, 5, 64};  // per flattened head: awkward against blocks of 64
    const std::int64_t longest = 129;
    auto cache = scheme::make_cache(shape, batch, kt::layout::paged::pool_size{batch * kv_heads * 10, 16},
                                    kt::codec::fp32::config{});
    auto keys = kts::random_tensor<float, 4>({batch, kv_heads, longest, head_dim}, 1, 1.0f);
    auto values = kts::random_tensor<float, 4>({batch, kv_heads, longest, head_dim}, 2, 1.0f);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const std::int64_t n = lengths[b * kv_heads + h];
        const kt::tensor_view<float, 2> head_keys{&keys(b, h, 0, 0), {n, head_dim}, {keys.view.stride(2), keys.view.stride(3)}};
        const kt::tensor_view<float, 2> head_values{&values(b, h, 0, 0), {n, head_dim},
                                                    {values.view.stride(2), values.view.stride(3)}};
        scheme::append_head(cache.view(), b, h, head_keys, head_values);
      }
    auto queries = kts::random_tensor<float, 3>({batch, shape.q_heads, head_dim}, 3, 1.0f);
    auto out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
    auto plain_out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
    const std::int64_t slots = cache.view().pages * cache.view().page_size;

    for (const ev::metric_kind kind :
         {ev::metric_kind::squared_sum, ev::metric_kind::sum, ev::metric_kind::squared_mean, ev::metric_kind::mean}) {
      std::vector<float> metric(static_cast<std::size_t>(slots), 0.0f);
      const ev::metric_output<> output{metric.data(), slots, kind, window};
      kts::scratch_buffer scratch(ev::attend_workspace(cache.view(), output));
      ev::attend(queries.view, cache.view(), out.view, output, scratch.get());
      scheme::attend(queries.view, cache.view(), plain_out.view, kt::workspace{});
      EXPECT_EQ(0, std::memcmp(out.storage.data(), plain_out.storage.data(), out.storage.size() * sizeof(float)))
          << "the metric must not change the attention output";

      const double u = kts::fp32_unit_roundoff;
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < kv_heads; ++h) {
          const std::int64_t n = lengths[b * kv_heads + h];
          std::vector<double> oracle(static_cast<std::size_t>(n), 0.0);
          double largest_logit = 0.0;
          for (std::int64_t g = 0; g < group; ++g) {
            std::vector<double> logits(static_cast<std::size_t>(n));
            for (std::int64_t i = 0; i < n; ++i) {
              double dot = 0.0, magnitude = 0.0;
              for (std::int64_t d = 0; d < head_dim; ++d) {
                dot += double(queries(b, h * group + g, d)) * double(keys(b, h, i, d));
                magnitude += std::abs(double(queries(b, h * group + g, d)) * double(keys(b, h, i, d)));
              }
              logits[i] = dot / std::sqrt(double(head_dim));
              largest_logit = std::max(largest_logit, magnitude / std::sqrt(double(head_dim)));
            }
            const double top = *std::max_element(logits.begin(), logits.end());
            double sum = 0.0;
            for (double& l : logits) sum += (l = std::exp(l - top));
            for (std::int64_t i = 0; i < n; ++i) {
              const double p = logits[i] / sum;
              const bool squared = kind == ev::metric_kind::squared_sum || kind == ev::metric_kind::squared_mean;
              const bool mean = kind == ev::metric_kind::squared_mean || kind == ev::metric_kind::mean;
              oracle[i] += (squared ? p * p : p) / (mean ? double(group) : 1.0);
            }
          }
          // Bound (no safety factor). Each probability: the logit error δ = (D + 5)·u·S
          // and exp's 2u as in common/tolerance.hpp (ratio e^(2δ + 4u)), the denominator's
          // n-term fp32 sum (n·u) and its rescales by exp (3u each, one per 64-token block
          // at most), the division (u): p̃ = p·(1 + ε). A square doubles it ((1 + ε)²), the
          // G-term group sum, the 1/G factor and the += into 0 add (G + 2)·u.
          const double delta = (double(head_dim) + 5.0) * u * largest_logit;
          const double epsilon =
              std::expm1(2.0 * delta + 4.0 * u + (double(n) + 3.0 * (double(n) / 64.0 + 1.0) + 1.0) * u);
          const bool squared = kind == ev::metric_kind::squared_sum || kind == ev::metric_kind::squared_mean;
          const double relative =
              (squared ? (1.0 + epsilon) * (1.0 + epsilon) : 1.0 + epsilon) * (1.0 + (double(group) + 2.0) * u) - 1.0;
          const std::int64_t next = kt::next_position(cache.view(), b, h);
          for (std::int64_t i = 0; i < n; ++i) {
            const float got = metric[static_cast<std::size_t>(cache.view().slot(b, h, i))];
            if (next - i <= window) {
              EXPECT_EQ(got, 0.0f) << "a token in the protected window accumulates nothing";
              continue;
            }
            EXPECT_LE(std::abs(double(got) - oracle[i]), relative * oracle[i] + 1e-38)
                << "G " << group << ", kind " << int(kind) << ", head " << b << "," << h << ", token " << i;
          }
        }
      // Slots holding no token are never written.
      std::set<std::int64_t> held;
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < kv_heads; ++h)
          for (std::int64_t i = 0; i < lengths[b * kv_heads + h]; ++i) held.insert(cache.view().slot(b, h, i));
      for (std::int64_t slot = 0; slot < slots; ++slot)
        if (!held.count(slot)) {
          EXPECT_EQ(metric[static_cast<std::size_t>(slot)], 0.0f);
        }
    }
  }
}

TEST(EvictionMetric, SeedFromThePrefillWindowMatchesDoubleOracle) {
  using scheme = kt::scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, kt::codec::fp32, kt::backend::cpu>;
  const std::int64_t batch = 2, kv_heads = 2, group = 3, head_dim = 32, tokens = 150, observed = 8, window = 20;
  const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
  auto keys = kts::random_tensor<float, 4>({batch, kv_heads, tokens, head_dim}, 31);
  auto values = kts::random_tensor<float, 4>({batch, kv_heads, tokens, head_dim}, 32);
  auto queries = kts::random_tensor<float, 4>({batch, shape.q_heads, observed, head_dim}, 33);
  scheme::config cfg;
  cfg.score.window = observed;
  cfg.budget.keep = kt::keep_tokens{60};
  auto cache = scheme::make_cache(shape, batch, kt::layout::paged::pool_size{batch * kv_heads * 4 + 1, 16});
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(batch * kv_heads + 1));
  std::vector<std::int32_t> kept(static_cast<std::size_t>(scheme::kept_tokens_capacity(shape, batch, tokens, cfg)));
  kt::compress_options<kt::host_space> options{.start_position = 5, .kept_offsets = offsets.data(),
                                               .kept_tokens = kept.data(),
                                               .kept_tokens_capacity = static_cast<std::int64_t>(kept.size())};
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(keys.view, values.view, queries.view, cache.view(), cfg, options,
                   kt::workspace{scratch.data(), scratch.size()});
  const std::int64_t slots = cache.view().pages * cache.view().page_size;
  std::vector<float> metric(static_cast<std::size_t>(slots), 7.0f);  // seeding overwrites everything
  // A carry left by an earlier request (one step late): the new prefill drops what it held pending.
  std::vector<float> carry_queries(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim), 1.0f),
      carry_normaliser(static_cast<std::size_t>(2 * batch * shape.q_heads), 1.0f);
  std::vector<std::int64_t> carry_next(static_cast<std::size_t>(batch * kv_heads), 99);
  const ev::metric_output<> output{metric.data(), slots, ev::metric_kind::squared_sum, window,
                                   {carry_queries.data(), carry_normaliser.data(), carry_next.data()}};
  ev::seed_metric(keys.cview(), queries.cview(), cache.view(), {offsets.data(), kept.data(), batch * kv_heads}, 5, output);
  for (const std::int64_t next : carry_next) EXPECT_EQ(next, 0) << "seeding clears the carry's pending steps";

  // Oracle in double: p of window query q over the keys it sees (causal), squared, summed
  // over the window and the group. Bound: per probability the exponent error of
  // common/tolerance.hpp ((D + 5)·u·S and 4u for exp) plus the T-term denominator
  // (T·u); squared (×2); the sum of w·G terms ((w·G + 1)·u).
  const double u = kts::fp32_unit_roundoff;
  std::set<std::int64_t> held;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      const std::int64_t head = b * kv_heads + h;
      const std::int64_t next = kt::next_position(cache.view(), b, h);
      EXPECT_EQ(next, 5 + tokens);
      for (std::int64_t i = 0; i < cache.view().head_length(b, h); ++i) {
        const std::int64_t t = kept[static_cast<std::size_t>(offsets[head] + i)];
        const std::int64_t slot = cache.view().slot(b, h, i);
        held.insert(slot);
        double want = 0.0, largest_logit = 0.0;
        for (std::int64_t g = 0; g < group; ++g)
          for (std::int64_t q = 0; q < observed; ++q) {
            const std::int64_t visible = tokens - observed + q + 1;
            std::vector<double> logits(static_cast<std::size_t>(visible));
            for (std::int64_t j = 0; j < visible; ++j) {
              double dot = 0.0, magnitude = 0.0;
              for (std::int64_t d = 0; d < head_dim; ++d) {
                dot += double(queries(b, h * group + g, q, d)) * double(keys(b, h, j, d));
                magnitude += std::abs(double(queries(b, h * group + g, q, d)) * double(keys(b, h, j, d)));
              }
              logits[j] = dot / std::sqrt(double(head_dim));
              largest_logit = std::max(largest_logit, magnitude / std::sqrt(double(head_dim)));
            }
            if (t >= visible) continue;
            const double top = *std::max_element(logits.begin(), logits.end());
            double sum = 0.0;
            for (double l : logits) sum += std::exp(l - top);
            const double p = std::exp(logits[t] - top) / sum;
            want += p * p;
          }
        if (next - (5 + t) <= window) want = 0.0;  // inside the protected window: not seeded
        const double exponent = (double(head_dim) + 5.0) * u * largest_logit + 4.0 * u + double(tokens) * u;
        const double bound = std::expm1(2.0 * exponent) * want + (double(observed * group) + 1.0) * u * want + 1e-38;
        EXPECT_LE(std::abs(double(metric[slot]) - want), bound) << "head " << head << ", kept token " << i << " (" << t << ")";
      }
    }
  for (std::int64_t slot = 0; slot < slots; ++slot)
    if (!held.count(slot)) {
      EXPECT_EQ(metric[static_cast<std::size_t>(slot)], 0.0f) << "slot " << slot;
    }
}

/// The one-step-late metric (metric_output::carry) against the immediate one on a
/// twin cache: the same outputs every step; after step t the late metric equals the
/// immediate one after step t − 1 bit for bit, and after a flush the immediate one
/// after step t (the pending pass recomputes each token's logits with the same
/// code, and the carry keeps the step's own normaliser). Evictions every 8 steps
/// (after a flush) must then decide alike. Awkward: heads of 1–90 tokens against
/// blocks of 64, a window of 5, a head emptied of pending tokens by its window.
template <class Layout, class Codec>
void one_step_late_equals_immediate(std::int64_t group, std::int64_t pool_tokens) {
  using scheme = eviction_scheme<Layout, Codec>;
  using view_type = typename scheme::cache_view;
  const std::int64_t batch = 2, kv_heads = 2, head_dim = 32, steps = 40;
  const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
  const auto pool = [&] {
    if constexpr (std::is_same_v<Layout, kt::layout::paged>)
      return kt::layout::paged::pool_size{batch * kv_heads * kt::layout::paged::pages_for(pool_tokens, 16), 16};
    else
      return kt::layout::flat::pool_size{batch * kv_heads * pool_tokens};
  }();
  std::vector<kt::cache<scheme>> caches;  // [0]: immediate, [1]: one step late
  for (int c = 0; c < 2; ++c) caches.push_back(scheme::make_cache(shape, batch, pool, typename Codec::config{}));
  const std::int64_t prefill_lengths[] = {1, 90, 64, 17};
  auto keys = kts::random_tensor<float, 4>({batch, kv_heads, 90 + steps, head_dim}, 11, 1.0f);
  auto values = kts::random_tensor<float, 4>({batch, kv_heads, 90 + steps, head_dim}, 12, 1.0f);
  for (auto& cache : caches)
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const std::int64_t n = prefill_lengths[b * kv_heads + h];
        const kt::tensor_view<float, 2> k{&keys(b, h, 0, 0), {n, head_dim}, {keys.view.stride(2), keys.view.stride(3)}};
        const kt::tensor_view<float, 2> v{&values(b, h, 0, 0), {n, head_dim}, {values.view.stride(2), values.view.stride(3)}};
        scheme::append_head(cache.view(), b, h, k, v);
      }
  const std::int64_t slots = kt::detail::storage_slots(caches[0].view().storage);
  std::vector<std::vector<float>> metrics(2, std::vector<float>(static_cast<std::size_t>(slots), 0.0f));
  std::vector<float> carry_queries(static_cast<std::size_t>(batch * shape.q_heads * head_dim), 0.0f);
  std::vector<float> carry_normaliser(static_cast<std::size_t>(2 * batch * shape.q_heads), 0.0f);
  std::vector<std::int64_t> carry_next(static_cast<std::size_t>(batch * kv_heads), 0);
  const std::int64_t window = 5;
  ev::metric_output<> immediate{metrics[0].data(), slots, ev::metric_kind::squared_sum, window};
  ev::metric_output<> late{metrics[1].data(), slots, ev::metric_kind::squared_sum, window,
                           {carry_queries.data(), carry_normaliser.data(), carry_next.data()}};
  const auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  auto queries = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
  auto out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
  auto late_out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
  std::mt19937_64 random(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const ev::config cfg{.scope = ev::scope::per_head, .keep = 48, .interval = 8, .protected_window = window};
  std::vector<float> previous = metrics[0];
  for (std::int64_t step = 1; step <= steps; ++step) {
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const std::int64_t p = prefill_lengths[b * kv_heads + h] + step - 1;
        const kt::tensor_view<float, 2> k{&keys(b, h, p, 0), {1, head_dim}, {keys.view.stride(2), keys.view.stride(3)}};
        const kt::tensor_view<float, 2> v{&values(b, h, p, 0), {1, head_dim}, {values.view.stride(2), values.view.stride(3)}};
        for (auto& cache : caches) scheme::append_head(cache.view(), b, h, k, v);
      }
    kts::for_each_index(queries.view.extents, [&](auto... index) { queries.view(index...) = normal(random); });
    kts::scratch_buffer scratch(std::max(ev::attend_workspace(caches[0].view(), immediate),
                                         ev::attend_workspace(caches[1].view(), late)));
    ev::attend(queries.view, caches[0].view(), out.view, immediate, scratch.get());
    ev::attend(queries.view, caches[1].view(), late_out.view, late, scratch.get());
    ASSERT_EQ(0, std::memcmp(out.storage.data(), late_out.storage.data(), out.storage.size() * sizeof(float)))
        << "step " << step << ": the pending pass must not change the output";
    ASSERT_TRUE(same_bits(metrics[1], previous)) << "step " << step << ": late = immediate one step before";
    previous = metrics[0];
    for (std::int64_t head = 0; head < batch * kv_heads; ++head)
      ASSERT_EQ(carry_next[static_cast<std::size_t>(head)], kt::next_position(caches[1].view(), head / kv_heads, head % kv_heads));
    if (ev::due(step, cfg)) {
      ev::flush_metric(caches[1].view(), late, scratch.get());
      ASSERT_TRUE(same_bits(metrics[1], metrics[0])) << "step " << step << ": flushed = immediate";
      for (std::int64_t next : carry_next) ASSERT_EQ(next, 0) << "a flush leaves nothing pending";
      std::array<ev::report, 2> reports{};
      for (int c = 0; c < 2; ++c) {
        const std::array<view_type, 1> views{caches[c].view()};
        const std::array<ev::metric_output<>, 1> outputs{c == 0 ? immediate : late};
        kts::scratch_buffer evict_scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const view_type>(views)));
        reports[c] = kt::evict<kt::backend::cpu>(std::span<const view_type>(views),
                                                 std::span<const ev::metric_output<>>(outputs), cfg, evict_scratch.get());
      }
      EXPECT_EQ(reports[0].evicted_tokens, reports[1].evicted_tokens);
      EXPECT_GT(reports[0].evicted_tokens, 0) << "step " << step << ": the test must evict";
      ASSERT_TRUE(same_bits(metrics[1], metrics[0])) << "step " << step << ": metrics moved alike";
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < kv_heads; ++h)
          ASSERT_EQ(kt::head_positions(caches[0].view(), b, h), kt::head_positions(caches[1].view(), b, h));
      previous = metrics[0];
    }
  }
  kts::scratch_buffer scratch(ev::attend_workspace(caches[1].view(), late));
  ev::flush_metric(caches[1].view(), late, scratch.get());
  EXPECT_TRUE(same_bits(metrics[1], metrics[0])) << "the final flush";
  ev::flush_metric(caches[1].view(), late, scratch.get());  // nothing pending: a no-op
  EXPECT_TRUE(same_bits(metrics[1], metrics[0])) << "a second flush adds nothing";
}

TEST(EvictionMetric, OneStepLateEqualsImmediateFp16Paged) {
  one_step_late_equals_immediate<kt::layout::paged, kt::codec::fp16>(4, 160);
}
// The same on the portable loops (the x86 kernels switched off): the pending pass mirrors either.
TEST(EvictionMetric, OneStepLateEqualsImmediatePortableBf16Flat) {
#if KVTRIM_X86_DISPATCH
  kt::detail::x86::vector_paths_enabled().store(false);
#endif
  one_step_late_equals_immediate<kt::layout::flat, kt::codec::bf16>(16, 160);
#if KVTRIM_X86_DISPATCH
  kt::detail::x86::vector_paths_enabled().store(true);
#endif
}
// Codecs whose stored keys never change after the write (fp8 here; not KIVI's int8 / int4,
// whose residual keys are requantized when their group seals, nor layered<>, whose recent
// rows are re-encoded as they age: there the pending pass reads the keys as they are now,
// which is the metric.hpp contract, within the codec's bound rather than bit for bit).
TEST(EvictionMetric, OneStepLateEqualsImmediateFp8Flat) {
  one_step_late_equals_immediate<kt::layout::flat, kt::codec::fp8>(2, 160);
}

/// The metric against its definition, bit for bit. Keys and queries are multiples of 1/2 in
/// [−1, 1] at head dim 64, so every q·k is exact in fp32 whatever the order of its sum or an
/// FMA, and so is the scale (1/8): the logits s_gi are known exactly. The step's normaliser
/// (m_g, l_g) is read from the one-step-late carry (the order of l's sum is the attention's,
/// not the metric's). Then c_i is metric.hpp's arithmetic written out here: p = cpu_exp(s − m) / l,
/// Σ_g of p² or p from 0 in g's order, times 1/G for the mean kinds, added to the slot, for
/// tokens outside the window. The immediate metric after every step, and the one-step-late
/// metric one step behind and after a flush, must equal it exactly — every kind, GQA 1, 4 and
/// 16 (two chunks of 8 rows), heads of 1–134 tokens against tiles of 64, a window cutting heads,
/// plain paged fp16 and flat fp32, on the vector paths and on the portable ones.
template <class Layout, class Codec>
void metric_equals_its_definition() {
  using scheme = eviction_scheme<Layout, Codec>;
  using element = std::remove_cvref_t<decltype(*std::declval<typename scheme::cache_view>().storage.keys)>;
  const std::int64_t batch = 2, kv_heads = 2, head_dim = 64, steps = 5, window = 5;
  const std::int64_t prefill_lengths[] = {1, 130, 64, 59};  // per flattened head
  const std::int64_t capacity = 130 + steps;
  std::mt19937_64 random(23);
  std::uniform_int_distribution<int> halves(-2, 2);
  const auto exact_value = [&] { return 0.5f * static_cast<float>(halves(random)); };
  for (const std::int64_t group : {1, 4, 16})
    for (const ev::metric_kind kind :
         {ev::metric_kind::squared_sum, ev::metric_kind::sum, ev::metric_kind::squared_mean, ev::metric_kind::mean}) {
      const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
      const auto pool = [&] {
        if constexpr (std::is_same_v<Layout, kt::layout::paged>)
          return kt::layout::paged::pool_size{batch * kv_heads * kt::layout::paged::pages_for(capacity, 16), 16};
        else
          return kt::layout::flat::pool_size{batch * kv_heads * capacity};
      }();
      std::vector<kt::cache<scheme>> caches;  // [0]: immediate, [1]: one step late
      for (int c = 0; c < 2; ++c) caches.push_back(scheme::make_cache(shape, batch, pool, typename Codec::config{}));
      std::vector<std::vector<float>> keys(static_cast<std::size_t>(batch * kv_heads));  // [head][token · D]
      const auto append = [&](std::int64_t b, std::int64_t h, std::int64_t count) {
        std::vector<element> rows(static_cast<std::size_t>(count * head_dim)), values(rows.size());
        for (std::size_t e = 0; e < rows.size(); ++e) {
          const float key = exact_value();
          keys[static_cast<std::size_t>(b * kv_heads + h)].push_back(key);
          rows[e] = kt::from_float<element>(key);
          values[e] = kt::from_float<element>(exact_value());
        }
        const kt::tensor_view<element, 2> k{rows.data(), {count, head_dim}, {head_dim, 1}};
        const kt::tensor_view<element, 2> v{values.data(), {count, head_dim}, {head_dim, 1}};
        for (auto& cache : caches) scheme::append_head(cache.view(), b, h, k, v);
      };
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < kv_heads; ++h) append(b, h, prefill_lengths[b * kv_heads + h]);

      const std::int64_t slots = kt::detail::storage_slots(caches[0].view().storage);
      std::vector<float> immediate_values(static_cast<std::size_t>(slots), 0.0f), late_values = immediate_values;
      std::vector<float> carry_queries(static_cast<std::size_t>(batch * shape.q_heads * head_dim), 0.0f);
      std::vector<float> carry_normaliser(static_cast<std::size_t>(2 * batch * shape.q_heads), 0.0f);
      std::vector<std::int64_t> carry_next(static_cast<std::size_t>(batch * kv_heads), 0);
      const ev::metric_output<> immediate{immediate_values.data(), slots, kind, window};
      const ev::metric_output<> late{late_values.data(), slots, kind, window,
                                     {carry_queries.data(), carry_normaliser.data(), carry_next.data()}};
      std::vector<float> expected(static_cast<std::size_t>(slots), 0.0f);
      const bool squared = kind == ev::metric_kind::squared_sum || kind == ev::metric_kind::squared_mean;
      const bool mean = kind == ev::metric_kind::squared_mean || kind == ev::metric_kind::mean;
      const float factor = mean ? 1.0f / static_cast<float>(group) : 1.0f;
      const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
      std::vector<float> queries(static_cast<std::size_t>(batch * shape.q_heads * head_dim));
      std::vector<float> out(queries.size()), late_out(queries.size());
      const std::array<std::int64_t, 3> extents{batch, shape.q_heads, head_dim};
      for (std::int64_t step = 1; step <= steps; ++step) {
        if (step > 1)
          for (std::int64_t b = 0; b < batch; ++b)
            for (std::int64_t h = 0; h < kv_heads; ++h) append(b, h, 1);
        for (float& x : queries) x = exact_value();
        kts::scratch_buffer scratch(std::max(ev::attend_workspace(caches[0].view(), immediate),
                                             ev::attend_workspace(caches[1].view(), late)));
        ev::attend(kt::make_view(queries.data(), extents), caches[0].view(), kt::make_view(out.data(), extents),
                   immediate, scratch.get());
        ev::attend(kt::make_view(queries.data(), extents), caches[1].view(), kt::make_view(late_out.data(), extents),
                   late, scratch.get());
        ASSERT_EQ(0, std::memcmp(late_values.data(), expected.data(), expected.size() * sizeof(float)))
            << "G " << group << ", kind " << int(kind) << ", step " << step << ": late = the definition one step before";
        const auto view = caches[0].view();
        for (std::int64_t b = 0; b < batch; ++b)
          for (std::int64_t h = 0; h < kv_heads; ++h) {
            const std::vector<float>& head_keys = keys[static_cast<std::size_t>(b * kv_heads + h)];
            const std::int64_t next = kt::next_position(view, b, h);
            for (std::int64_t i = 0; i < view.head_length(b, h); ++i) {
              const std::int64_t slot = view.slot(b, h, i);
              if (next - view.positions.slot_position[slot] <= window) continue;
              float sum = 0.0f;
              for (std::int64_t g = 0; g < group; ++g) {
                const std::int64_t row = b * shape.q_heads + h * group + g;
                double dot = 0.0;  // exact: multiples of 1/4, at most 64 in magnitude
                for (std::int64_t d = 0; d < head_dim; ++d)
                  dot += double(queries[static_cast<std::size_t>(row * head_dim + d)]) *
                         double(head_keys[static_cast<std::size_t>(i * head_dim + d)]);
                const float logit = static_cast<float>(dot) * scale;
                const float max_logit = carry_normaliser[static_cast<std::size_t>(2 * row)];
                const float denominator = carry_normaliser[static_cast<std::size_t>(2 * row + 1)];
                const float p = kt::detail::cpu_exp(logit - max_logit) / denominator;
                sum += squared ? p * p : p;
              }
              expected[static_cast<std::size_t>(slot)] += sum * factor;
            }
          }
        ASSERT_EQ(0, std::memcmp(immediate_values.data(), expected.data(), expected.size() * sizeof(float)))
            << "G " << group << ", kind " << int(kind) << ", step " << step << ": immediate = the definition";
      }
      kts::scratch_buffer scratch(ev::attend_workspace(caches[1].view(), late));
      ev::flush_metric(caches[1].view(), late, scratch.get());
      EXPECT_EQ(0, std::memcmp(late_values.data(), expected.data(), expected.size() * sizeof(float)))
          << "G " << group << ", kind " << int(kind) << ": flushed = the definition";
      EXPECT_GT(*std::max_element(expected.begin(), expected.end()), 0.0f) << "the test must accumulate";
    }
}

TEST(EvictionMetric, EqualsItsDefinitionBitForBit) {
  metric_equals_its_definition<kt::layout::paged, kt::codec::fp16>();
  metric_equals_its_definition<kt::layout::flat, kt::codec::fp32>();
#if KVTRIM_X86_DISPATCH
  kt::detail::x86::vector_paths_enabled().store(false);  // the portable loops and the scalar exp
  metric_equals_its_definition<kt::layout::paged, kt::codec::fp16>();
  metric_equals_its_definition<kt::layout::flat, kt::codec::fp32>();
  kt::detail::x86::vector_paths_enabled().store(true);
#endif
}

/// A step pending through an eviction lands on the slots its tokens moved to: twin late caches,
/// B evicted without a flush and then flushed, C only flushed; every token B keeps has, by
/// position, C's metric bit for bit. One head has nothing pending (next = 0): its metric stays.
/// Kind mean (the group factor).
TEST(EvictionMetric, OneStepLatePendingStepFollowsEvictedTokens) {
  using scheme = eviction_scheme<kt::layout::paged, kt::codec::fp16>;
  using view_type = scheme::cache_view;
  const std::int64_t batch = 2, kv_heads = 2, group = 4, head_dim = 32, tokens = 150, window = 6;
  const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
  const kt::layout::paged::pool_size pool{batch * kv_heads * kt::layout::paged::pages_for(tokens + 20, 16), 16};
  auto keys = kts::random_tensor<float, 4>({batch, kv_heads, tokens + 2, head_dim}, 21, 1.0f);
  auto values = kts::random_tensor<float, 4>({batch, kv_heads, tokens + 2, head_dim}, 22, 1.0f);
  auto queries = kts::random_tensor<float, 3>({batch, shape.q_heads, head_dim}, 23, 1.0f);
  auto out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
  struct twin {
    kt::cache<scheme> cache;
    std::vector<float> metric, carry_queries, carry_normaliser;
    std::vector<std::int64_t> carry_next;
    ev::metric_output<> output;
  };
  const auto make = [&] {
    auto t = std::make_unique<twin>(twin{scheme::make_cache(shape, batch, pool, kt::codec::fp16::config{}), {}, {}, {}, {}, {}});
    const kt::tensor_view<float, 4> k{keys.view.data, {batch, kv_heads, tokens, head_dim}, keys.view.strides};
    const kt::tensor_view<float, 4> v{values.view.data, {batch, kv_heads, tokens, head_dim}, values.view.strides};
    scheme::append(t->cache.view(), k, v);
    const std::int64_t slots = kt::detail::storage_slots(t->cache.view().storage);
    t->metric.assign(static_cast<std::size_t>(slots), 0.0f);
    t->carry_queries.assign(static_cast<std::size_t>(batch * shape.q_heads * head_dim), 0.0f);
    t->carry_normaliser.assign(static_cast<std::size_t>(2 * batch * shape.q_heads), 0.0f);
    t->carry_next.assign(static_cast<std::size_t>(batch * kv_heads), 0);
    t->output = {t->metric.data(), slots, ev::metric_kind::mean, window,
                 {t->carry_queries.data(), t->carry_normaliser.data(), t->carry_next.data()}};
    return t;
  };
  auto b_twin = make(), c_twin = make();
  for (auto* t : {b_twin.get(), c_twin.get()}) {
    kts::scratch_buffer scratch(ev::attend_workspace(t->cache.view(), t->output));
    for (int step = 0; step < 3; ++step) {  // metrics to rank by, then one step pending
      const kt::tensor_view<float, 4> k{&keys(0, 0, tokens + std::min(step, 1), 0), {batch, kv_heads, 1, head_dim},
                                        keys.view.strides};
      const kt::tensor_view<float, 4> v{&values(0, 0, tokens + std::min(step, 1), 0), {batch, kv_heads, 1, head_dim},
                                        values.view.strides};
      if (step < 2) scheme::append(t->cache.view(), k, v);
      ev::attend(queries.view, t->cache.view(), out.view, t->output, scratch.get());
    }
    t->carry_next[3] = 0;  // the last head: nothing pending
  }
  const std::vector<float> before = b_twin->metric;
  const ev::config cfg{.scope = ev::scope::per_head, .keep = 120, .interval = 8, .protected_window = window};
  {
    const std::array<view_type, 1> views{b_twin->cache.view()};
    const std::array<ev::metric_output<>, 1> outputs{b_twin->output};
    kts::scratch_buffer scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const view_type>(views)));
    const auto report = kt::evict<kt::backend::cpu>(std::span<const view_type>(views),
                                                    std::span<const ev::metric_output<>>(outputs), cfg, scratch.get());
    ASSERT_GT(report.evicted_tokens, 0);
  }
  for (auto* t : {b_twin.get(), c_twin.get()}) {
    kts::scratch_buffer scratch(ev::attend_workspace(t->cache.view(), t->output));
    ev::flush_metric(t->cache.view(), t->output, scratch.get());
  }
  std::int64_t moved = 0, compared = 0;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      const auto c_view = c_twin->cache.view();
      std::map<std::int32_t, std::int64_t> c_slot_of;  // position → C's slot (C was never evicted)
      for (std::int64_t i = 0; i < c_view.head_length(b, h); ++i)
        c_slot_of[c_view.positions.slot_position[c_view.slot(b, h, i)]] = c_view.slot(b, h, i);
      const auto b_view = b_twin->cache.view();
      for (std::int64_t i = 0; i < b_view.head_length(b, h); ++i) {
        const std::int64_t slot = b_view.slot(b, h, i);
        const std::int32_t position = b_view.positions.slot_position[slot];
        const std::int64_t c_slot = c_slot_of.at(position);
        moved += slot != c_slot;
        ++compared;
        ASSERT_EQ(std::bit_cast<std::uint32_t>(b_twin->metric[slot]), std::bit_cast<std::uint32_t>(c_twin->metric[c_slot]))
            << "head " << b << "," << h << ", position " << position;
        if (b * kv_heads + h == 3) {
          EXPECT_EQ(c_twin->metric[c_slot], before[c_slot]) << "a head with nothing pending gains nothing";
        }
      }
    }
  EXPECT_GT(moved, 0) << "the eviction must move tokens for the test to mean anything";
  EXPECT_GT(compared, 0);
}

TEST(EvictionMetric, OneStepLateRefusals) {
  using scheme = eviction_scheme<kt::layout::paged, kt::codec::fp16>;
  const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 32};
  auto cache = scheme::make_cache(shape, 1, kt::layout::paged::pool_size{8, 16}, kt::codec::fp16::config{});
  std::vector<float> metric(static_cast<std::size_t>(kt::detail::storage_slots(cache.view().storage)), 0.0f);
  std::vector<float> queries(4 * 32), normaliser(8);
  ev::metric_output<> partial{metric.data(), static_cast<std::int64_t>(metric.size())};
  partial.carry.queries = queries.data();  // normaliser and next missing
  kts::scratch_buffer scratch(1 << 20);
  EXPECT_THROW(ev::flush_metric(cache.view(), partial, scratch.get()), kt::error);
  auto queries_in = kts::make_tensor<float, 3>({1, 4, 32});
  auto out = kts::make_tensor<float, 3>({1, 4, 32});
  EXPECT_THROW(ev::attend(queries_in.view, cache.view(), out.view, partial, scratch.get()), kt::error)
      << "a partial carry";
  ev::metric_output<> carry_only{};
  carry_only.carry = {queries.data(), normaliser.data(), nullptr};
  std::vector<std::int64_t> next(2, 0);
  carry_only.carry.next = next.data();
  try {
    ev::attend(queries_in.view, cache.view(), out.view, carry_only, scratch.get());
    ADD_FAILURE() << "a carry without a metric buffer must throw";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("metric.values"), std::string::npos) << e.what();
  }
  const ev::metric_output<> immediate{metric.data(), static_cast<std::int64_t>(metric.size())};
  try {
    ev::flush_metric(cache.view(), immediate, scratch.get());
    ADD_FAILURE() << "flush_metric without a carry must throw";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("kvtrim::eviction::flush_metric"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("carry"), std::string::npos) << e.what();
  }
}

TEST(EvictionMetric, DueEveryIntervalSteps) {
  const ev::config cfg{.interval = 16};
  EXPECT_FALSE(ev::due(0, cfg));
  EXPECT_FALSE(ev::due(15, cfg));
  EXPECT_TRUE(ev::due(16, cfg));
  EXPECT_TRUE(ev::due(32, cfg));
}

// ---- the eviction step ----------------------------------------------------------

struct paged_layout {
  using layout = kt::layout::paged;
  static layout::pool_size pool(std::int64_t heads, std::int64_t tokens) {
    return {heads * layout::pages_for(tokens, 16) + 3, 16};
  }
};
struct flat_layout {
  using layout = kt::layout::flat;
  static layout::pool_size pool(std::int64_t heads, std::int64_t tokens) { return {heads * (tokens + 40)}; }
};

/// A model of `layers` layers whose heads hold random numbers of tokens, with
/// random metrics (ties, ±0, NaN, ∞) on the held slots and 0 elsewhere.
template <class Case, class Codec>
struct model {
  using scheme = eviction_scheme<typename Case::layout, Codec>;
  using view_type = typename scheme::cache_view;
  kt::model_shape shape;
  std::int64_t batch, layers, longest;
  std::vector<kt::cache<scheme>> caches;
  std::vector<std::vector<float>> metrics;
  std::vector<ev::metric_output<>> outputs;
  std::vector<view_type> views;

  model(kt::model_shape shape_, std::int64_t batch_, std::int64_t layers_, std::int64_t longest_, std::uint64_t seed,
        const typename Codec::config& codec_config = {})
      : shape(shape_), batch(batch_), layers(layers_), longest(longest_) {
    std::mt19937_64 random(seed);
    std::uniform_int_distribution<std::int64_t> length(1, longest);
    for (std::int64_t l = 0; l < layers; ++l) {
      caches.push_back(scheme::make_cache(shape, batch, Case::pool(batch * shape.kv_heads, longest), codec_config));
      auto keys = kts::random_tensor<float, 4>({batch, shape.kv_heads, longest, shape.head_dim}, seed + 10 * l + 1);
      auto values = kts::random_tensor<float, 4>({batch, shape.kv_heads, longest, shape.head_dim}, seed + 10 * l + 2);
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
          const std::int64_t n = length(random);
          const kt::tensor_view<float, 2> k{&keys(b, h, 0, 0), {n, shape.head_dim}, {keys.view.stride(2), keys.view.stride(3)}};
          const kt::tensor_view<float, 2> v{&values(b, h, 0, 0), {n, shape.head_dim},
                                            {values.view.stride(2), values.view.stride(3)}};
          scheme::append_head(caches.back().view(), b, h, k, v);
        }
      const std::int64_t slots = kt::detail::storage_slots(caches.back().view().storage);
      metrics.emplace_back(static_cast<std::size_t>(slots), 0.0f);
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < shape.kv_heads; ++h)
          for (std::int64_t i = 0; i < caches.back().view().head_length(b, h); ++i)
            metrics.back()[static_cast<std::size_t>(caches.back().view().slot(b, h, i))] = awkward_value(random);
    }
    for (std::int64_t l = 0; l < layers; ++l) {
      views.push_back(caches[l].view());
      outputs.push_back({metrics[l].data(), static_cast<std::int64_t>(metrics[l].size())});
    }
  }
};

/// What a head holds, by logical index: position, metric bits, stored key and value rows.
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

/// The eviction step restated with sorts (eviction/evict.hpp's math, literally):
/// which logical indices each (layer, b, h) keeps and, in `tail`, where its
/// protected tail (the longest run of protected items at its end) starts.
template <class View>
std::map<std::array<std::int64_t, 3>, std::vector<std::int64_t>> oracle_kept(
    const std::vector<View>& layers, const std::vector<std::vector<float>>& metrics, const ev::config& cfg,
    std::map<std::array<std::int64_t, 3>, std::int64_t>& tail) {
  const std::int64_t kv_heads = layers[0].shape.kv_heads, batch = layers[0].batch, L = std::ssize(layers);
  std::map<std::array<std::int64_t, 3>, std::vector<std::int64_t>> kept;
  struct item {
    std::int64_t l, h, j, ordinal;
    float metric;
  };
  const auto run_unit = [&](std::int64_t b, std::int64_t l0, std::int64_t l1, std::int64_t h0, std::int64_t h1) {
    std::vector<std::array<std::int64_t, 2>> heads;
    for (std::int64_t l = l0; l < l1; ++l)
      for (std::int64_t h = h0; h < h1; ++h)
        if (cfg.retrieval_heads == nullptr || !cfg.retrieval_heads[l * kv_heads + h]) heads.push_back({l, h});
    std::int64_t held = 0;
    for (auto [l, h] : heads) held += layers[l].head_length(b, h);
    const std::int64_t k = cfg.keep - cfg.interval, target = std::ssize(heads) * k;
    for (auto [l, h] : heads) {  // by default a head keeps everything
      auto& list = kept[{l, b, h}];
      list.resize(layers[l].head_length(b, h));
      std::iota(list.begin(), list.end(), 0);
    }
    if (heads.empty() || held <= target) return;
    std::vector<item> pool_candidates;
    std::map<std::array<std::int64_t, 2>, std::set<std::int64_t>> keep_items;
    std::int64_t protected_total = 0, floor_total = 0, run = 1;
    for (auto [l, h] : heads) {
      const View& cache = layers[l];
      const std::int64_t head = b * kv_heads + h, n = cache.head_length(b, h), U = cache.storage.slot_run;
      run = std::max(run, U);
      const auto token_protected = [&](std::int64_t i) {
        const std::int64_t slot = cache.slot(b, h, i), position = cache.positions.slot_position[slot];
        return position < cfg.sinks || cache.positions.next_position[head] - position <= cfg.protected_window ||
               cache.compensation.index[head] == i || kt::eviction_detail::codec_pins(cache.storage, head, slot, i, n);
      };
      std::vector<item> candidates;
      std::int64_t protected_tokens = 0;
      tail[{l, b, h}] = 0;
      for (std::int64_t j = 0; j * U < n; ++j) {
        const std::int64_t end = std::min((j + 1) * U, n);
        bool is_protected = end - j * U < U;
        float sum = 0.0f;
        for (std::int64_t i = j * U; i < end; ++i) {
          is_protected = is_protected || token_protected(i);
          sum += metrics[l][cache.slot(b, h, i)];
        }
        if (is_protected) {
          protected_tokens += end - j * U;
          keep_items[{l, h}].insert(j);
        } else {
          tail[{l, b, h}] = end;  // the tail starts after the last candidate
          candidates.push_back({l, h, j, (l * kv_heads + h) * (std::int64_t{1} << 32) + j, sum});
        }
      }
      protected_total += protected_tokens;
      const std::int64_t room = std::max<std::int64_t>(0, k - protected_tokens);
      std::int64_t floor = cfg.scope == ev::scope::per_head
                               ? room / U
                               : static_cast<std::int64_t>(std::floor(cfg.alpha * double(room))) / U;
      if (protected_tokens == 0) floor = std::max<std::int64_t>(floor, 1);
      floor = std::min<std::int64_t>(floor, std::ssize(candidates));
      std::sort(candidates.begin(), candidates.end(), [](const item& a, const item& c) {
        return kt::detail::ranks_before(a.metric, a.j, c.metric, c.j);
      });
      for (std::int64_t f = 0; f < floor; ++f) keep_items[{l, h}].insert(candidates[f].j);
      floor_total += floor * U;
      pool_candidates.insert(pool_candidates.end(), candidates.begin() + floor, candidates.end());
    }
    if (cfg.scope != ev::scope::per_head) {
      const std::int64_t pool = std::min<std::int64_t>(
          std::max<std::int64_t>(0, target - protected_total - floor_total) / run, std::ssize(pool_candidates));
      std::sort(pool_candidates.begin(), pool_candidates.end(), [](const item& a, const item& c) {
        return kt::detail::ranks_before(a.metric, a.ordinal, c.metric, c.ordinal);
      });
      for (std::int64_t c = 0; c < pool; ++c) keep_items[{pool_candidates[c].l, pool_candidates[c].h}].insert(pool_candidates[c].j);
    }
    for (auto [l, h] : heads) {
      const std::int64_t U = layers[l].storage.slot_run, n = layers[l].head_length(b, h);
      auto& list = kept[{l, b, h}];
      list.clear();
      for (std::int64_t j : keep_items[{l, h}])
        for (std::int64_t i = j * U; i < std::min((j + 1) * U, n); ++i) list.push_back(i);
    }
  };
  for (std::int64_t l = 0; l < L; ++l)  // heads outside every unit (retrieval heads) keep everything
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        auto& list = kept[{l, b, h}];
        list.resize(static_cast<std::size_t>(layers[l].head_length(b, h)));
        std::iota(list.begin(), list.end(), 0);
      }
  for (std::int64_t b = 0; b < batch; ++b) {
    if (cfg.scope == ev::scope::cross_layer) run_unit(b, 0, L, 0, kv_heads);
    if (cfg.scope == ev::scope::per_layer)
      for (std::int64_t l = 0; l < L; ++l) run_unit(b, l, l + 1, 0, kv_heads);
    if (cfg.scope == ev::scope::per_head)
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t h = 0; h < kv_heads; ++h) run_unit(b, l, l + 1, h, h + 1);
  }
  return kept;
}

/// Where the kept tokens end up (eviction/evict.hpp, "Layouts"): kept items before the
/// tail below K (their count) stay, those at K or later fill the holes below K in
/// ascending order, the tail follows in order. `kept`: ascending logical indices.
std::vector<std::int64_t> arranged(const std::vector<std::int64_t>& kept, std::int64_t run, std::int64_t tail) {
  std::vector<std::int64_t> items;  // kept items before the tail, ascending
  for (std::int64_t i : kept)
    if (i < tail && (items.empty() || items.back() != i / run)) items.push_back(i / run);
  const std::int64_t K = std::ssize(items);
  std::vector<std::int64_t> order(static_cast<std::size_t>(K), -1);  // new item → old item
  std::vector<std::int64_t> movers;
  for (std::int64_t j : items) (j < K ? order[j] : movers.emplace_back(j)) = j;
  std::size_t next = 0;
  for (auto& slot : order)
    if (slot < 0) slot = movers[next++];
  std::vector<std::int64_t> tokens;
  for (std::int64_t j : order)
    for (std::int64_t i = j * run; i < (j + 1) * run; ++i) tokens.push_back(i);
  for (std::int64_t i : kept)
    if (i >= tail) tokens.push_back(i);
  return tokens;
}

/// Every page exactly once in the tables or the free list; page counts fit the lengths.
template <class CodecT>
void expect_page_accounting(const kt::layout::paged::view<CodecT, kt::host_space>& cache) {
  std::vector<int> named(static_cast<std::size_t>(cache.pages), 0);
  for (std::int64_t k = 0; k < cache.indptr[cache.heads()]; ++k) ++named[cache.indices[k]];
  for (std::int64_t k = 0; k < *cache.free_count; ++k) ++named[cache.free_pages[k]];
  for (std::int64_t page = 0; page < cache.pages; ++page) EXPECT_EQ(named[page], 1) << "page " << page;
  for (std::int64_t head = 0; head < cache.heads(); ++head)
    EXPECT_EQ(cache.page_count(head),
              kt::layout::paged::pages_for(cache.head_length(head / cache.shape.kv_heads, head % cache.shape.kv_heads),
                                           cache.page_size));
  EXPECT_NO_THROW(kt::layout::paged::validate("test", cache, /*exclusive=*/true));
}
template <class CodecT>
void expect_page_accounting(const kt::layout::flat::view<CodecT, kt::host_space>& cache) {
  EXPECT_NO_THROW(kt::layout::flat::validate("test", cache, true));
}

template <class Case, class Codec>
void check_eviction_step(ev::scope scope, const typename Codec::config& codec_config, std::uint64_t seed) {
  using model_type = model<Case, Codec>;
  const kt::model_shape shape{.q_heads = 6, .kv_heads = 3, .head_dim = 16};
  model_type m(shape, 2, 3, 150, seed, codec_config);
  const std::vector<std::uint8_t> retrieval = {0, 0, 0, 0, 1, 0, 0, 0, 0};  // layer 1, kv head 1
  ev::config cfg{.scope = scope, .keep = 60, .interval = 16, .sinks = 3, .protected_window = 9, .alpha = 0.3,
                 .retrieval_heads = retrieval.data()};
  for (auto& output : m.outputs) output.protected_window = cfg.protected_window;

  std::map<std::array<std::int64_t, 3>, std::int64_t> tails;
  const auto expected_sets = oracle_kept(m.views, m.metrics, cfg, tails);
  std::map<std::array<std::int64_t, 3>, std::vector<token_record>> before;
  std::int64_t pages_before = 0, tokens_before = 0;
  for (std::int64_t l = 0; l < m.layers; ++l) {
    if constexpr (std::is_same_v<typename Case::layout, kt::layout::paged>) pages_before += m.views[l].pages_in_use();
    for (std::int64_t b = 0; b < m.batch; ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        before[{l, b, h}] = read_head(m.views[l], m.metrics[l], b, h);
        tokens_before += m.views[l].head_length(b, h);
      }
  }

  kts::scratch_buffer scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const typename model_type::view_type>(m.views)));
  const ev::report report = kt::evict<kt::backend::cpu>(std::span<const typename model_type::view_type>(m.views),
                                                        std::span<const ev::metric_output<>>(m.outputs), cfg,
                                                        scratch.get());

  std::int64_t tokens_after = 0, pages_after = 0;
  for (std::int64_t l = 0; l < m.layers; ++l) {
    const auto& cache = m.views[l];
    expect_page_accounting(cache);
    if constexpr (std::is_same_v<typename Case::layout, kt::layout::paged>) pages_after += cache.pages_in_use();
    std::set<std::int64_t> held;
    for (std::int64_t b = 0; b < m.batch; ++b)
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
        const auto& old = before[{l, b, h}];
        const auto& keep = expected_sets.at({l, b, h});
        std::vector<token_record> want;  // heads of units that evict nothing stay as they are
        for (std::int64_t i : tails.count({l, b, h}) ? arranged(keep, m.views[l].storage.slot_run, tails.at({l, b, h}))
                                                     : keep)
          want.push_back(old[i]);
        const auto got = read_head(cache, m.metrics[l], b, h);
        ASSERT_EQ(got.size(), want.size()) << "layer " << l << ", head " << b << "," << h;
        for (std::size_t i = 0; i < got.size(); ++i)
          ASSERT_TRUE(got[i] == want[i]) << "layer " << l << ", head " << b << "," << h << ", kept token " << i
                                         << ": position " << got[i].position << " vs " << want[i].position;
        const std::int64_t next = kt::next_position(cache, b, h);
        // The recent window stays a suffix in position order (the metric's window test relies on nothing
        // else, but a suffix keeps decode's newest tokens together), and movers are whole runs.
        for (std::size_t i = 1; i < got.size(); ++i)
          if (next - got[i - 1].position <= cfg.protected_window) {
            EXPECT_LE(next - got[i].position, cfg.protected_window) << "window suffix";
            EXPECT_LT(got[i - 1].position, got[i].position) << "window order";
          }
        for (const auto& token : old)  // sinks and the window survive; retrieval heads keep everything
          if (token.position < cfg.sinks || next - token.position <= cfg.protected_window || retrieval[l * 3 + h]) {
            EXPECT_TRUE(std::any_of(got.begin(), got.end(), [&](const token_record& t) { return t.position == token.position; }));
          }
        tokens_after += std::ssize(got);
        for (std::int64_t i = 0; i < cache.head_length(b, h); ++i) held.insert(cache.slot(b, h, i));
      }
    for (std::int64_t slot = 0; slot < std::ssize(m.metrics[l]); ++slot)
      if (!held.count(slot)) {
        EXPECT_EQ(std::bit_cast<std::uint32_t>(m.metrics[l][slot]), 0u) << "free slot " << slot;
      }
  }
  EXPECT_EQ(report.evicted_tokens, tokens_before - tokens_after);
  EXPECT_EQ(report.freed_pages, pages_before - pages_after);
  EXPECT_GT(report.evicted_tokens, 0) << "the case must evict something to test anything";
}

template <class Case>
class EvictionStep : public ::testing::Test {};
using layouts = ::testing::Types<paged_layout, flat_layout>;
TYPED_TEST_SUITE(EvictionStep, layouts);

TYPED_TEST(EvictionStep, EqualsSortOracleInEveryScope) {
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer})
    for (std::uint64_t seed : {1u, 2u, 3u}) {
      SCOPED_TRACE(::testing::Message() << "scope " << int(scope) << ", seed " << seed);
      check_eviction_step<TypeParam, kt::codec::fp32>(scope, {}, seed);
    }
}

TYPED_TEST(EvictionStep, GroupedInt8EvictsWholeRuns) {
  // KIVI key groups of 8: storage runs of 8 (flat) or gcd(16, 8) = 8 (paged); the
  // filling group is pinned, and everything moved is compared bit for bit.
  kt::codec::int8::config codec_config{};
  codec_config.key_group = 8;
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_eviction_step<TypeParam, kt::codec::int8>(scope, codec_config, 7);
  }
}

TYPED_TEST(EvictionStep, OtherCodecs) {
  check_eviction_step<TypeParam, kt::codec::fp16>(ev::scope::per_layer, {}, 11);
  check_eviction_step<TypeParam, kt::codec::fp8>(ev::scope::cross_layer, {}, 12);
  // layered: sinks and the newest tokens in fp16 rows (pinned), the rest in KIVI-grouped int8.
  kt::codec::layered<kt::codec::int8>::config layered_config{};
  layered_config.inner.key_group = 8;
  layered_config.recent = 12;
  layered_config.sinks = 2;
  check_eviction_step<TypeParam, kt::codec::layered<kt::codec::int8>>(ev::scope::cross_layer, layered_config, 13);
}

/// low_rank with sequence bases (rank 4, a refresh every 16 appends): the tokens appended since
/// a head's last refresh sit in its pending buffer by slot, so they are pinned like KIVI's
/// filling group — with a window (9) shorter than update_freq, some of them are otherwise
/// the lowest-metric candidates. Everything kept is compared bit for bit with the oracle —
/// which asks the same codec_pins, so this checks the moves of low_rank tokens (coefficients,
/// positions, metrics), not the pin: the next test checks the pin on its own.
kt::codec::low_rank::config low_rank_sequence_config() {
  kt::codec::low_rank::config config{};
  config.rank = 4;
  config.update_freq = 16;
  return config;
}

TYPED_TEST(EvictionStep, LowRankPinsItsPendingTokens) {
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_eviction_step<TypeParam, kt::codec::low_rank>(scope, low_rank_sequence_config(), 17);
  }
}

/// After a step, each head's pending buffer still names its newest pending_counts tokens in
/// arrival order: the refresh re-encodes every entry into the slot it names, and scheme::truncate
/// rolls back as many tokens as it counts. Unpinned (before 2026-12-05) an evicted pending token
/// left its slot in the buffer — on a paged cache a slot whose page another head may take next —
/// and its count: 46 stale entries in the cross-layer step of this case (window 4 < update_freq 16).
TYPED_TEST(EvictionStep, LowRankPendingBufferNamesTheNewestTokens) {
  using model_type = model<TypeParam, kt::codec::low_rank>;
  const kt::model_shape shape{.q_heads = 6, .kv_heads = 3, .head_dim = 16};
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    model_type m(shape, 2, 3, 150, 21, low_rank_sequence_config());
    const ev::config cfg{.scope = scope, .keep = 60, .interval = 16, .sinks = 3, .protected_window = 4, .alpha = 0.3};
    for (auto& output : m.outputs) output.protected_window = cfg.protected_window;
    // The case must offer pending tokens older than the window, or it tests nothing.
    std::int64_t exposed = 0;
    for (const auto& cache : m.views)
      for (std::int64_t head = 0; head < cache.heads(); ++head)
        exposed += std::max<std::int64_t>(0, cache.storage.pending_counts[head] - cfg.protected_window);
    ASSERT_GT(exposed, 0);

    kts::scratch_buffer scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const typename model_type::view_type>(m.views)));
    const ev::report report = kt::evict<kt::backend::cpu>(std::span<const typename model_type::view_type>(m.views),
                                                          std::span<const ev::metric_output<>>(m.outputs), cfg,
                                                          scratch.get());
    EXPECT_GT(report.evicted_tokens, 0);
    for (std::int64_t l = 0; l < m.layers; ++l) {
      const auto& cache = m.views[l];
      const auto& store = cache.storage;
      for (std::int64_t b = 0; b < m.batch; ++b)
        for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
          const std::int64_t head = b * shape.kv_heads + h, n = cache.head_length(b, h);
          ASSERT_LE(store.pending_counts[head], n) << "layer " << l << ", head " << head;
          for (std::int64_t p = 0; p < store.pending_counts[head]; ++p)
            EXPECT_EQ(store.pending_slots[head * store.update_freq + p], cache.slot(b, h, n - store.pending_counts[head] + p))
                << "layer " << l << ", head " << head << ", pending entry " << p;
        }
    }
  }
}

TYPED_TEST(EvictionStep, RefusesBadInputAndChangesNothing) {
  using model_type = model<TypeParam, kt::codec::fp32>;
  model_type m({.q_heads = 2, .kv_heads = 2, .head_dim = 16}, 1, 2, 100, 5);
  std::vector<std::vector<std::byte>> bytes;
  for (auto& c : m.caches) bytes.emplace_back(static_cast<const std::byte*>(c.data()), static_cast<const std::byte*>(c.data()) + c.bytes());
  const auto metrics = m.metrics;
  kts::scratch_buffer scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const typename model_type::view_type>(m.views)));
  const auto call = [&](const ev::config& cfg, std::vector<ev::metric_output<>> outputs) {
    return kt::evict<kt::backend::cpu>(std::span<const typename model_type::view_type>(m.views),
                                       std::span<const ev::metric_output<>>(outputs), cfg, scratch.get());
  };
  EXPECT_THROW(call(ev::config{.keep = 16}, m.outputs), kt::error);  // keep ≤ interval
  EXPECT_THROW(call(ev::config{.keep = 40, .protected_window = 3}, m.outputs), kt::error);  // window ≠ the metric's
  auto short_metric = m.outputs;
  short_metric[1].slots -= 1;
  EXPECT_THROW(call(ev::config{.keep = 40}, short_metric), kt::error);
  short_metric.pop_back();
  EXPECT_THROW(call(ev::config{.keep = 40}, short_metric), kt::error);
  for (std::size_t l = 0; l < m.caches.size(); ++l)
    EXPECT_EQ(0, std::memcmp(bytes[l].data(), m.caches[l].data(), bytes[l].size())) << "layer " << l;
  for (std::size_t l = 0; l < metrics.size(); ++l)  // bytes: NaN entries compare unequal as floats
    EXPECT_EQ(0, std::memcmp(metrics[l].data(), m.metrics[l].data(), metrics[l].size() * sizeof(float)));
}

// ---- a long generation ------------------------------------------------------------

TEST(EvictionGeneration, TenThousandTokensStayUnderBudgetAndAttendOverTheKeptSet) {
  using scheme = eviction_scheme<kt::layout::paged, kt::codec::fp16>;
  using view_type = scheme::cache_view;
  const std::int64_t layers = 2, batch = 2, kv_heads = 2, group = 2, head_dim = 32, prefill = 200, steps = 10000;
  const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
  const ev::config cfg{.scope = ev::scope::cross_layer, .keep = 160, .interval = 16};
  const std::int64_t budget = cfg.keep * kv_heads * layers;  // tokens per sequence, all layers
  const std::int64_t page_budget = layers * batch * kv_heads * kt::layout::paged::pages_for(cfg.keep + 64, 16);
  const std::int64_t total = prefill + steps;

  std::vector<kt::cache<scheme>> caches;
  std::vector<std::vector<float>> metrics;
  std::vector<ev::metric_output<>> outputs;
  std::vector<view_type> views;
  std::vector<kts::host_tensor<kt::half, 4>> keys, values;  // the whole history, by position
  for (std::int64_t l = 0; l < layers; ++l) {
    keys.push_back(kts::random_tensor<kt::half, 4>({batch, kv_heads, total, head_dim}, 100 + l));
    values.push_back(kts::random_tensor<kt::half, 4>({batch, kv_heads, total, head_dim}, 200 + l));
    caches.push_back(scheme::make_cache(shape, batch, kt::layout::paged::pool_size{page_budget + 64, 16},
                                        kt::codec::fp16::config{}));
    kt::tensor_view<kt::half, 4> k{keys[l].view.data, {batch, kv_heads, prefill, head_dim}, keys[l].view.strides};
    kt::tensor_view<kt::half, 4> v{values[l].view.data, {batch, kv_heads, prefill, head_dim}, values[l].view.strides};
    scheme::append(caches[l].view(), k, v);
    metrics.emplace_back(static_cast<std::size_t>(caches[l].view().pages * 16), 0.0f);
    outputs.push_back({metrics[l].data(), static_cast<std::int64_t>(metrics[l].size())});
    views.push_back(caches[l].view());
  }
  std::mt19937_64 random(77);
  auto queries = kts::make_tensor<kt::half, 3>({batch, shape.q_heads, head_dim});
  auto out = kts::make_tensor<float, 3>({batch, shape.q_heads, head_dim});
  kts::scratch_buffer evict_scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const view_type>(views)));
  const auto evict = [&] {
    return kt::evict<kt::backend::cpu>(std::span<const view_type>(views), std::span<const ev::metric_output<>>(outputs),
                                       cfg, evict_scratch.get());
  };
  const auto held = [&](std::int64_t b) {
    std::int64_t sum = 0;
    for (const auto& view : views)
      for (std::int64_t h = 0; h < kv_heads; ++h) sum += view.head_length(b, h);
    return sum;
  };
  evict();  // the prefill is over budget
  std::int64_t comparisons = 0, evictions = 1;
  double worst_ratio = 0.0;
  for (std::int64_t step = 1; step <= steps; ++step) {
    const std::int64_t position = prefill + step - 1;
    for (std::int64_t l = 0; l < layers; ++l) {
      kt::tensor_view<kt::half, 4> k{&keys[l](0, 0, position, 0), {batch, kv_heads, 1, head_dim}, keys[l].view.strides};
      kt::tensor_view<kt::half, 4> v{&values[l](0, 0, position, 0), {batch, kv_heads, 1, head_dim}, values[l].view.strides};
      scheme::append(views[l], k, v);
    }
    for (std::int64_t b = 0; b < batch; ++b) ASSERT_LE(held(b), budget) << "step " << step;
    std::int64_t pages = 0;
    for (const auto& view : views) pages += view.pages_in_use();
    ASSERT_LE(pages, page_budget) << "step " << step;
    for (std::int64_t l = 0; l < layers; ++l) {
      // A few dominant directions so the metric has something to find.
      std::normal_distribution<float> normal(0.0f, 1.0f);
      kts::for_each_index(queries.view.extents, [&](auto... index) { queries.view(index...) = kt::half(normal(random)); });
      kts::scratch_buffer scratch(ev::attend_workspace(views[l], outputs[l]));
      ev::attend(queries.view, views[l], out.view, outputs[l], scratch.get());
      if (step % 997 == 0 || step == steps) {  // attention over exactly the kept set
        const auto kept = [&](std::int64_t b, std::int64_t h) {
          kts::kept_tokens set;
          for (std::int32_t p : kt::head_positions(views[l], b, h)) set.tokens.push_back(p);
          return set;
        };
        const auto oracle = kts::oracle_attention(queries.view, keys[l].view, values[l].view, kv_heads, kept);
        const auto bounds = kts::attention_bounds(queries.view, keys[l].view, values[l].view, kv_heads, kept, {});
        const auto check = kts::check_against(out.view, oracle, bounds);
        worst_ratio = std::max(worst_ratio, check.worst_ratio);
        EXPECT_LE(check.worst_ratio, 1.0) << "step " << step << ", layer " << l;
        ++comparisons;
      }
    }
    if (ev::due(step, cfg)) {
      const auto report = evict();
      EXPECT_EQ(report.units_over_target, 0);
      ++evictions;
    }
  }
  EXPECT_EQ(evictions, 1 + steps / cfg.interval);
  EXPECT_GT(comparisons, 10);
  for (std::int64_t b = 0; b < batch; ++b)
    for (const auto& view : views)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const auto positions = kt::head_positions(view, b, h);
        // Eviction keeps the protected tail (the window) a sorted suffix; movers fill holes out of order.
        const auto window = std::find_if(positions.begin(), positions.end(),
                                         [&](std::int32_t p) { return total - p <= cfg.protected_window; });
        EXPECT_TRUE(std::is_sorted(window, positions.end()));
        EXPECT_TRUE(std::all_of(window, positions.end(), [&](std::int32_t p) { return total - p <= cfg.protected_window; }));
        for (std::int64_t p = 0; p < cfg.sinks; ++p) EXPECT_EQ(positions[p], p) << "sinks survive 10k tokens";
        EXPECT_EQ(positions.back(), total - 1);
      }
}

}  // namespace
