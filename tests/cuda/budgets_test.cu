// Budgets and the selection stage on backend::cuda against the CPU reference
// (backend::cpu, the specification), at the stage level: the same scores go to
// implementation<budget::X, cpu/cuda>::keep_counts and then to
// implementation<stage::select_top_k, cpu/cuda>::select. Scores are inputs here,
// not computed, so the keep counts, the CSR offsets and the kept token lists
// must be EQUAL — any difference is a tie broken differently or a count off by
// one, never rounding.
//
// Scores are chosen to stress the tie rules: quantised (8 values), all equal,
// ±∞ / NaN / ±0 mixed in, per-head scales 4^h (Ada-KV's pool then goes almost
// all to a few heads), protected windows (+∞) of different lengths per head.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;

namespace {

enum class pattern { random, quantised, all_equal, specials, skewed, protected_windows };
constexpr pattern all_patterns[] = {pattern::random,   pattern::quantised, pattern::all_equal,
                                    pattern::specials, pattern::skewed,    pattern::protected_windows};

const char* name_of(pattern p) {
  switch (p) {
    case pattern::random: return "random";
    case pattern::quantised: return "quantised";
    case pattern::all_equal: return "all_equal";
    case pattern::specials: return "specials";
    case pattern::skewed: return "skewed";
    case pattern::protected_windows: return "protected_windows";
  }
  return "?";
}

/// Scores [batch, kv_heads, tokens], stored with `head_padding` NaN after each
/// head's row (a kernel that ignores the strides reads NaN and keeps other tokens).
struct host_scores {
  std::int64_t batch, kv_heads, tokens, head_padding;
  std::vector<float> storage;
  std::array<std::int64_t, 3> strides() const {
    return {kv_heads * (tokens + head_padding), tokens + head_padding, 1};
  }
  kt::tensor_view<const float, 3> view() const { return {storage.data(), {batch, kv_heads, tokens}, strides()}; }
};

host_scores make_scores(pattern p, std::int64_t batch, std::int64_t kv_heads, std::int64_t tokens,
                        std::int64_t head_padding, std::uint32_t seed) {
  host_scores s{batch, kv_heads, tokens, head_padding, {}};
  s.storage.assign(static_cast<std::size_t>(batch * kv_heads * (tokens + head_padding)),
                   std::numeric_limits<float>::quiet_NaN());
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const float inf = std::numeric_limits<float>::infinity();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h)
      for (std::int64_t t = 0; t < tokens; ++t) {
        const float u = uniform(rng);
        const float q = std::floor(u * 8.0f) / 8.0f;  // 8 values: every score is tied with ~T/8 others
        float v = 0.0f;
        switch (p) {
          case pattern::random: v = u; break;
          case pattern::quantised: v = q - 0.5f; break;
          case pattern::all_equal: v = 1.0f; break;
          case pattern::specials: {
            const float r = uniform(rng);
            v = r < 0.05f ? inf : r < 0.10f ? -inf : r < 0.15f ? std::numeric_limits<float>::quiet_NaN()
                : r < 0.25f ? -0.0f : r < 0.35f ? 0.0f : q - 0.5f;
            break;
          }
          case pattern::skewed: v = q * std::pow(4.0f, static_cast<float>((h + b) % 6)); break;
          case pattern::protected_windows: {
            const std::int64_t window = 3 + 5 * ((h + b) % 4);  // 3..18 tokens, different per head and sequence
            v = t >= tokens - window ? inf : q;
            break;
          }
        }
        s.storage[static_cast<std::size_t>(b * s.strides()[0] + h * s.strides()[1] + t)] = v;
      }
  return s;
}

struct device_scores {
  device_buffer<float> buffer;
  kt::tensor_view<const float, 3, kt::device_space> view;
  explicit device_scores(const host_scores& s)
      : buffer(s.storage), view{buffer.data(), {s.batch, s.kv_heads, s.tokens}, s.strides()} {}
};

struct stream_holder {
  cudaStream_t stream = nullptr;
  stream_holder() { kt::testing::check(cudaStreamCreate(&stream), "cudaStreamCreate"); }
  ~stream_holder() { cudaStreamDestroy(stream); }
};

/// CPU and CUDA selection from the same scores and counts: equal offsets and lists;
/// nothing written past the device list's end.
void expect_same_selection(const host_scores& host, const device_scores& device, const std::vector<std::int32_t>& counts,
                           cudaStream_t stream) {
  using cpu_select = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;
  using gpu_select = kt::implementation<kt::stage::select_top_k, kt::backend::cuda>;
  const std::int64_t heads = host.batch * host.kv_heads;
  std::vector<std::int64_t> cpu_offsets(static_cast<std::size_t>(heads + 1));
  std::vector<std::int32_t> cpu_tokens(static_cast<std::size_t>(std::max<std::int64_t>(heads * host.tokens, 1)));
  std::vector<std::byte> cpu_scratch(cpu_select::workspace_bytes(heads, host.tokens));
  cpu_select::select(host.view(), counts.data(), cpu_offsets.data(), cpu_tokens.data(),
                     {cpu_scratch.data(), cpu_scratch.size()}, {});

  device_buffer<std::int32_t> device_counts(counts);
  device_buffer<std::int64_t> device_offsets(static_cast<std::size_t>(heads + 1));
  device_buffer<std::int32_t> device_tokens(cpu_tokens.size() + 64);
  device_tokens.fill_bytes(0xff);  // −1 everywhere: a slot the kernel forgets or overruns shows
  device_offsets.fill_bytes(0xff);
  device_buffer<std::byte> scratch(gpu_select::workspace_bytes(heads, host.tokens));
  scratch.fill_bytes(0xa5);  // the stage must not rely on zeroed scratch
  gpu_select::select(device.view, device_counts.data(), device_offsets.data(), device_tokens.data(),
                     {scratch.data(), scratch.size()}, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);

  ASSERT_EQ(device_offsets.download(), cpu_offsets);
  const auto got = device_tokens.download();
  const std::int64_t total = cpu_offsets.back();
  for (std::int64_t head = 0; head < heads; ++head)
    for (std::int64_t i = cpu_offsets[head]; i < cpu_offsets[head + 1]; ++i)
      ASSERT_EQ(got[static_cast<std::size_t>(i)], cpu_tokens[static_cast<std::size_t>(i)])
          << "kept token " << i - cpu_offsets[head] << " of head " << head << " (of " << cpu_offsets[head + 1] - cpu_offsets[head]
          << ")";
  for (std::size_t i = static_cast<std::size_t>(total); i < got.size(); ++i)
    ASSERT_EQ(got[i], -1) << "written past the list's end at " << i;
}

template <class Budget>
std::vector<std::int32_t> cpu_counts(const typename Budget::config& cfg, const host_scores& s) {
  using impl = kt::implementation<Budget, kt::backend::cpu>;
  std::vector<std::int32_t> counts(static_cast<std::size_t>(s.batch * s.kv_heads), -7);
  if constexpr (kt::detail::needs_scratch<impl, typename Budget::config>) {
    const kt::model_shape shape{.q_heads = s.kv_heads, .kv_heads = s.kv_heads, .head_dim = 64};
    std::vector<std::byte> scratch(impl::workspace_bytes(cfg, shape, s.batch, s.tokens));
    impl::keep_counts(cfg, s.view(), counts.data(), {scratch.data(), scratch.size()}, {});
  } else {
    impl::keep_counts(cfg, s.view(), counts.data(), {});
  }
  return counts;
}

template <class Budget>
std::vector<std::int32_t> gpu_counts(const typename Budget::config& cfg, const host_scores& s, const device_scores& d,
                                     cudaStream_t stream) {
  using impl = kt::implementation<Budget, kt::backend::cuda>;
  device_buffer<std::int32_t> counts(static_cast<std::size_t>(s.batch * s.kv_heads));
  counts.fill_bytes(0xff);
  if constexpr (kt::detail::needs_scratch<impl, typename Budget::config>) {
    const kt::model_shape shape{.q_heads = s.kv_heads, .kv_heads = s.kv_heads, .head_dim = 64};
    device_buffer<std::byte> scratch(impl::workspace_bytes(cfg, shape, s.batch, s.tokens));
    scratch.fill_bytes(0xa5);
    impl::keep_counts(cfg, d.view, counts.data(), {scratch.data(), scratch.size()}, stream);
    kt::testing::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return counts.download();
  } else {
    impl::keep_counts(cfg, d.view, counts.data(), stream);
    kt::testing::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return counts.download();
  }
}

/// Device counts == CPU counts, then device selection == CPU selection.
template <class Budget>
void expect_same_budget(const typename Budget::config& cfg, const host_scores& host, const device_scores& device,
                        cudaStream_t stream) {
  const auto expected = cpu_counts<Budget>(cfg, host);
  const auto got = gpu_counts<Budget>(cfg, host, device, stream);
  ASSERT_EQ(got, expected) << Budget::name;
  expect_same_selection(host, device, expected, stream);
}

struct size_case {
  std::int64_t batch, kv_heads, tokens;
};

std::string describe(const size_case& c, pattern p) {
  return kt::detail::cat("batch ", c.batch, " kv_heads ", c.kv_heads, " tokens ", c.tokens, " scores ", name_of(p));
}

class budgets : public ::testing::TestWithParam<std::tuple<std::int64_t, std::int64_t, std::int64_t>> {};

/// budget::adaptive: counts, exact totals (H·k per sequence), selection.
TEST_P(budgets, adaptive_matches_cpu) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const auto [batch, kv_heads, tokens] = GetParam();
  stream_holder stream;
  std::uint32_t seed = 1;
  for (const pattern p : all_patterns) {
    const size_case c{batch, kv_heads, tokens};
    SCOPED_TRACE(describe(c, p));
    const host_scores host = make_scores(p, batch, kv_heads, tokens, tokens == 4097 ? 3 : 0, seed++);
    const device_scores device(host);
    struct variant {
      kt::keep_amount keep;
      double alpha;
      bool kvpress;
    };
    const variant variants[] = {{kt::keep_ratio{0.3}, 0.2, false},
                                {kt::keep_ratio{0.1}, 1.0, false},
                                {kt::keep_tokens{40}, 0.0, false},
                                {kt::keep_ratio{0.3}, 0.2, true},
                                {kt::keep_tokens{3}, 0.5, true}};
    for (const variant& v : variants) {
      kt::budget::adaptive::config cfg;
      cfg.keep = v.keep;
      cfg.alpha = v.alpha;
      cfg.kvpress_compatible = v.kvpress;
      SCOPED_TRACE(kt::detail::cat("alpha ", v.alpha, v.kvpress ? " kvpress" : " paper", " keep ",
                                   kt::detail::resolve_keep(v.keep, tokens)));
      std::vector<std::int32_t> expected;
      bool cpu_threw = false;
      try {
        expected = cpu_counts<kt::budget::adaptive>(cfg, host);
      } catch (const kt::error&) {
        cpu_threw = true;  // the paper form with more protected tokens than k in some head
      }
      const auto got = gpu_counts<kt::budget::adaptive>(cfg, host, device, stream.stream);
      const std::int64_t k = kt::budget::adaptive::head_budget(cfg, tokens);
      for (std::int64_t b = 0; b < batch; ++b) {
        std::int64_t total = 0;
        for (std::int64_t h = 0; h < kv_heads; ++h) {
          const std::int32_t count = got[static_cast<std::size_t>(b * kv_heads + h)];
          ASSERT_GE(count, v.kvpress ? 0 : 1) << "sequence " << b << " head " << h;
          ASSERT_LE(count, tokens) << "sequence " << b << " head " << h;
          total += count;
        }
        ASSERT_EQ(total, kv_heads * k) << "exact total of sequence " << b;
      }
      if (cpu_threw) {
        // The device cannot throw on data (no synchronisation): it clamps the
        // guarantee to k; the total above is still exact. Selection still agrees.
        expect_same_selection(host, device, got, stream.stream);
        continue;
      }
      ASSERT_EQ(got, expected);
      expect_same_selection(host, device, expected, stream.stream);
    }
  }
}

TEST_P(budgets, pyramid_per_head_uniform_match_cpu) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const auto [batch, kv_heads, tokens] = GetParam();
  stream_holder stream;
  std::uint32_t seed = 100;
  for (const pattern p : {pattern::random, pattern::specials, pattern::quantised}) {
    const size_case c{batch, kv_heads, tokens};
    SCOPED_TRACE(describe(c, p));
    const host_scores host = make_scores(p, batch, kv_heads, tokens, 0, seed++);
    const device_scores device(host);
    for (const bool kvpress : {false, true}) {
      kt::budget::pyramid::config cfg;
      cfg.keep = kt::keep_ratio{0.3};
      cfg.window = std::min<std::int64_t>(tokens / 8, 16);
      cfg.layer = 3;
      cfg.layers = 8;
      cfg.kvpress_compatible = kvpress;
      expect_same_budget<kt::budget::pyramid>(cfg, host, device, stream.stream);
    }
    {
      // Very different lengths per head: 1, beyond the context, everything in between.
      kt::budget::per_head::config cfg;
      cfg.kv_heads = kv_heads;
      cfg.layer = 1;
      for (std::int64_t l = 0; l < 2; ++l)
        for (std::int64_t h = 0; h < kv_heads; ++h)
          cfg.lengths.push_back(h % 4 == 0 ? 1 : h % 4 == 1 ? tokens + 5 : 1 + (tokens * (h + l)) / (kv_heads + 1));
      expect_same_budget<kt::budget::per_head>(cfg, host, device, stream.stream);
    }
    {
      kt::budget::uniform::config cfg;
      cfg.keep = kt::keep_ratio{0.3};
      expect_same_budget<kt::budget::uniform>(cfg, host, device, stream.stream);
    }
  }
}

/// select_top_k alone with arbitrary counts: negative, zero, one, past the
/// context, and everything in between, per head.
TEST_P(budgets, select_top_k_matches_cpu) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const auto [batch, kv_heads, tokens] = GetParam();
  stream_holder stream;
  std::uint32_t seed = 200;
  for (const pattern p : all_patterns) {
    SCOPED_TRACE(describe({batch, kv_heads, tokens}, p));
    const host_scores host = make_scores(p, batch, kv_heads, tokens, tokens == 17 ? 5 : 0, seed++);
    const device_scores device(host);
    std::mt19937 rng(seed);
    std::vector<std::int32_t> counts(static_cast<std::size_t>(batch * kv_heads));
    for (std::size_t i = 0; i < counts.size(); ++i) {
      const std::int64_t choices[] = {-3, 0, 1, tokens, tokens + 7, tokens / 3, tokens - 1,
                                      std::uniform_int_distribution<std::int64_t>(0, tokens)(rng)};
      counts[i] = static_cast<std::int32_t>(choices[(i + seed) % 8]);
    }
    expect_same_selection(host, device, counts, stream.stream);
  }
}

/// The device's answer to the paper form's error: a head with more protected
/// tokens than k keeps k of them (the lower indices), and the total stays H·k.
TEST(budgets_device, adaptive_clamps_protected_tokens_past_the_budget) {
  KVTRIM_SKIP_WITHOUT_GPU();
  stream_holder stream;
  const std::int64_t kv_heads = 4, tokens = 100;
  host_scores host{1, kv_heads, tokens, 0, std::vector<float>(kv_heads * tokens, 0.5f)};
  for (std::int64_t t = 0; t < 30; ++t) host.storage[static_cast<std::size_t>(t)] = std::numeric_limits<float>::infinity();
  const device_scores device(host);
  kt::budget::adaptive::config cfg;
  cfg.keep = kt::keep_tokens{20};
  cfg.alpha = 0.2;
  EXPECT_THROW(cpu_counts<kt::budget::adaptive>(cfg, host), kt::error);
  const auto got = gpu_counts<kt::budget::adaptive>(cfg, host, device, stream.stream);
  // Head 0: guarantee clamped to 20; heads 1–3: ⌊0.2·20⌋ = 4; pool 80 − 32 = 48.
  // Head 0's other 10 +∞ tokens rank first (42 kept so far), then the 0.5 ties in
  // (head, token) order: head 0's come first and take the remaining 38.
  EXPECT_EQ(got, (std::vector<std::int32_t>{68, 4, 4, 4}));
}

/// No allocation, no synchronisation: adaptive keep_counts + select_top_k
/// capture into a CUDA graph, and the graph's replay (on fresh inputs written
/// into the same buffers) equals the CPU reference.
TEST(budgets_device, adaptive_and_select_capture_in_a_cuda_graph) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using adaptive = kt::implementation<kt::budget::adaptive, kt::backend::cuda>;
  using select = kt::implementation<kt::stage::select_top_k, kt::backend::cuda>;
  stream_holder stream;
  const std::int64_t batch = 2, kv_heads = 8, tokens = 4097, heads = batch * kv_heads;
  const host_scores first = make_scores(pattern::skewed, batch, kv_heads, tokens, 0, 31);
  const host_scores second = make_scores(pattern::specials, batch, kv_heads, tokens, 0, 32);
  device_scores device(first);
  kt::budget::adaptive::config cfg;
  cfg.keep = kt::keep_ratio{0.25};
  const kt::model_shape shape{.q_heads = kv_heads, .kv_heads = kv_heads, .head_dim = 64};
  device_buffer<std::byte> budget_scratch(adaptive::workspace_bytes(cfg, shape, batch, tokens));
  device_buffer<std::byte> select_scratch(select::workspace_bytes(heads, tokens));
  device_buffer<std::int32_t> counts(static_cast<std::size_t>(heads));
  device_buffer<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
  device_buffer<std::int32_t> kept(static_cast<std::size_t>(heads * tokens));
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream.stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  adaptive::keep_counts(cfg, device.view, counts.data(), {budget_scratch.data(), budget_scratch.size()}, stream.stream);
  select::select(device.view, counts.data(), offsets.data(), kept.data(), {select_scratch.data(), select_scratch.size()},
                 stream.stream);
  ASSERT_EQ(cudaStreamEndCapture(stream.stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (const host_scores* scores : {&first, &second}) {
    device.buffer.upload(scores->storage);
    ASSERT_EQ(cudaGraphLaunch(exec, stream.stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream.stream), cudaSuccess);
    const auto expected = cpu_counts<kt::budget::adaptive>(cfg, *scores);
    ASSERT_EQ(counts.download(), expected);
    using cpu_select = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;
    std::vector<std::int64_t> cpu_offsets(static_cast<std::size_t>(heads + 1));
    std::vector<std::int32_t> cpu_kept(static_cast<std::size_t>(heads * tokens));
    std::vector<std::byte> cpu_scratch(cpu_select::workspace_bytes(heads, tokens));
    cpu_select::select(scores->view(), expected.data(), cpu_offsets.data(), cpu_kept.data(),
                       {cpu_scratch.data(), cpu_scratch.size()}, {});
    ASSERT_EQ(offsets.download(), cpu_offsets);
    auto got = kept.download();
    got.resize(static_cast<std::size_t>(cpu_offsets.back()));
    cpu_kept.resize(got.size());
    ASSERT_EQ(got, cpu_kept);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

INSTANTIATE_TEST_SUITE_P(sizes, budgets,
                         ::testing::Values(std::make_tuple(1, 1, 1), std::make_tuple(3, 1, 17),
                                           std::make_tuple(3, 8, 17), std::make_tuple(2, 32, 1),
                                           std::make_tuple(3, 8, 4097), std::make_tuple(2, 32, 4097),
                                           std::make_tuple(1, 1, 32768), std::make_tuple(3, 8, 32768),
                                           std::make_tuple(2, 32, 32768),
                                           // select_resident writes the offsets itself up to 1024 heads
                                           // (resident_offsets_heads); past it keep_offsets runs first
                                           std::make_tuple(32, 32, 17), std::make_tuple(33, 32, 17),
                                           // select_top_k's resident path ends at 40960 tokens; past it the
                                           // multi-launch threshold search runs
                                           std::make_tuple(2, 3, 40960), std::make_tuple(1, 2, 40961)),
                         [](const auto& info) {
                           return kt::detail::cat("b", std::get<0>(info.param), "_h", std::get<1>(info.param), "_t",
                                                  std::get<2>(info.param));
                         });

}  // namespace
