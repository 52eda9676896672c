// Whole schemes on backend::cuda against the same schemes on backend::cpu, across
// scorer × budget × layout (codec::fp16): compress with the kept-index output,
// then decode attention over the compressed cache. The per-policy suites
// (scorers_test, budgets_test, layouts_test, decode_test) test each stage; this
// file tests that they compose — the defects of the past were in combinations
// nobody ran (a budget's counts on a layout that pages, a scorer's window in a
// ragged cache, a compensation row through a flat repack).
//
// What must hold:
//   - Scores that are the same bits on both backends (score::external — the
//     caller's scores; retrieval_head and static windows — integers): the kept
//     CSR is identical, token for token.
//   - SnapKV / key norm (fp32 sums in another order on the device: the scores
//     differ in the last bits, see scorers_test): every head keeps the same
//     number of tokens where the budget's counts do not depend on near-ties
//     (uniform, pyramid, per_head), the per-sequence total always (Ada-KV's exact
//     totals), and at least 99% of the kept tokens agree (a token flips only when
//     its score is within a few ulps of the threshold).
//   - Decode attention over the two caches agrees within 2e-3·max|v|: the device
//     rounds its fp16 output (≤ 2^-11·|o| ≤ 4.9e-4·max|v|) and, on the
//     tensor-core path, the probabilities to fp16 before P·V (≤ 2^-11 relative,
//     again ≤ 4.9e-4·max|v|); fp32 summation order adds ~1e-6. A row stored in the
//     wrong slot or a token missing moves the output by O(max|v| / kept).
//     (Only where the kept sets are identical: elsewhere the caches differ by design.)
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;

namespace {

constexpr std::int64_t batch = 2, kv_heads = 4, q_heads = 16, head_dim = 128, tokens = 257, window = 16;
const kt::model_shape shape{.q_heads = q_heads, .kv_heads = kv_heads, .head_dim = head_dim};

struct inputs {
  std::vector<kt::half> keys, values, queries, decode_queries;
  std::vector<float> scores;  // for score::external: [batch, kv_heads, tokens]
  explicit inputs(unsigned seed) {
    std::mt19937 random(seed);
    std::normal_distribution<float> normal;
    const auto fill = [&](std::vector<kt::half>& v, std::size_t n, float scale) {
      v.resize(n);
      for (auto& x : v) x = kt::from_float<kt::half>(scale * normal(random));
    };
    fill(keys, batch * kv_heads * tokens * head_dim, 1.0f);
    fill(values, batch * kv_heads * tokens * head_dim, 1.0f);
    fill(queries, batch * q_heads * window * head_dim, 1.0f);
    fill(decode_queries, batch * q_heads * head_dim, 1.0f);
    scores.resize(batch * kv_heads * tokens);
    // Skewed per head (so Ada-KV moves budget between heads), quantised (ties).
    for (std::size_t i = 0; i < scores.size(); ++i) {
      const auto head = static_cast<int>(i / tokens % kv_heads);
      scores[i] = std::round(8.0f * std::exp(normal(random) * (0.5f + 0.5f * static_cast<float>(head)))) / 8.0f;
    }
  }
};

template <class Layout>
auto pool() {
  if constexpr (std::is_same_v<Layout, kt::layout::paged>)
    return kt::layout::paged::pool_size{batch * kv_heads * ((tokens + 15) / 16) + 8, 16};
  else if constexpr (std::is_same_v<Layout, kt::layout::flat>)
    return kt::layout::flat::pool_size{2 * batch * kv_heads * tokens};
  else
    return tokens;
}

struct kept_sets {
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> tokens;
  std::vector<kt::half> out;
};

/// compress + attend with scheme Scheme on its backend; returns the selection and the output.
template <class Scheme>
kept_sets run(const inputs& in, typename Scheme::config cfg, const std::vector<float>* device_scores_host) {
  constexpr bool on_gpu = std::is_same_v<typename Scheme::backend, kt::backend::cuda>;
  constexpr bool external = std::is_same_v<typename Scheme::scorer, kt::score::external>;
  using space = std::conditional_t<on_gpu, kt::device_space, kt::host_space>;
  const std::int64_t heads = batch * kv_heads;
  const std::int64_t capacity = Scheme::kept_tokens_capacity(shape, batch, tokens, cfg);
  const std::array<std::int64_t, 4> kv_extents{batch, kv_heads, tokens, head_dim};
  const std::array<std::int64_t, 4> q_extents{batch, q_heads, window, head_dim};
  const std::array<std::int64_t, 3> decode_extents{batch, q_heads, head_dim};
  const std::array<std::int64_t, 3> score_extents{batch, kv_heads, tokens};
  kept_sets result;
  result.offsets.resize(static_cast<std::size_t>(heads + 1));
  result.tokens.resize(static_cast<std::size_t>(capacity));
  result.out.resize(in.decode_queries.size());
  auto cache = Scheme::make_cache(shape, batch, pool<typename Scheme::layout>(), kt::codec::fp16::config{});
  if constexpr (on_gpu) {
    device_buffer<kt::half> keys(in.keys), values(in.values), queries(in.queries), decode(in.decode_queries),
        out(in.decode_queries.size());
    device_buffer<float> scores(device_scores_host ? *device_scores_host : std::vector<float>(1));
    if constexpr (external)
      cfg.score = kt::score::external::config::from(
          kt::make_view<kt::device_space>(static_cast<const float*>(scores.data()), score_extents));
    device_buffer<std::int64_t> offsets(result.offsets.size());
    device_buffer<std::int32_t> kept(result.tokens.size());
    device_buffer<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg));
    kt::compress_options<space> options{0, offsets.data(), kept.data(), capacity};
    auto view = cache.view();
    Scheme::compress(kt::make_view<space>(static_cast<const kt::half*>(keys.data()), kv_extents),
                     kt::make_view<space>(static_cast<const kt::half*>(values.data()), kv_extents),
                     kt::make_view<space>(static_cast<const kt::half*>(queries.data()), q_extents), view, cfg, options,
                     kt::workspace{scratch.data(), scratch.size()}, cudaStream_t{});
    if constexpr (Scheme::layout::ragged_heads) kt::check_status(view, cudaStream_t{});
    device_buffer<std::byte> attend_scratch(Scheme::attend_workspace(view));
    Scheme::attend(kt::make_view<space>(static_cast<const kt::half*>(decode.data()), decode_extents), view,
                   kt::make_view<space>(out.data(), decode_extents),
                   kt::workspace{attend_scratch.data(), attend_scratch.size()}, cudaStream_t{});
    kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    result.offsets = offsets.download();
    result.tokens = kept.download();
    result.out = out.download();
  } else {
    if constexpr (external)
      cfg.score = kt::score::external::config::from(
          kt::make_view(static_cast<const float*>(device_scores_host->data()), score_extents));
    std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg));
    kt::compress_options<space> options{0, result.offsets.data(), result.tokens.data(), capacity};
    auto view = cache.view();
    Scheme::compress(kt::make_view(in.keys.data(), kv_extents), kt::make_view(in.values.data(), kv_extents),
                     kt::make_view(in.queries.data(), q_extents), view, cfg, options,
                     kt::workspace{scratch.data(), scratch.size()});
    std::vector<std::byte> attend_scratch(Scheme::attend_workspace(view));
    Scheme::attend(kt::make_view(in.decode_queries.data(), decode_extents), view,
                   kt::make_view(result.out.data(), decode_extents),
                   kt::workspace{attend_scratch.data(), attend_scratch.size()});
  }
  result.tokens.resize(static_cast<std::size_t>(result.offsets.back()));
  return result;
}

std::set<std::pair<std::int64_t, std::int32_t>> as_set(const kept_sets& k) {
  std::set<std::pair<std::int64_t, std::int32_t>> s;
  for (std::size_t h = 0; h + 1 < k.offsets.size(); ++h)
    for (auto i = k.offsets[h]; i < k.offsets[h + 1]; ++i) s.emplace(static_cast<std::int64_t>(h), k.tokens[static_cast<std::size_t>(i)]);
  return s;
}

enum class agreement { exact, near_ties };

template <class Layout, class Scorer, class Budget>
void check_combination(typename kt::scheme<Layout, Scorer, Budget, kt::codec::fp16, kt::backend::cpu>::config cfg,
                       agreement expected, bool counts_exact) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using cpu_scheme = kt::scheme<Layout, Scorer, Budget, kt::codec::fp16, kt::backend::cpu>;
  using gpu_scheme = kt::scheme<Layout, Scorer, Budget, kt::codec::fp16, kt::backend::cuda>;
  const inputs in(1234);
  const bool external = std::is_same_v<Scorer, kt::score::external>;
  const auto cpu = run<cpu_scheme>(in, cfg, external ? &in.scores : nullptr);
  typename gpu_scheme::config gpu_cfg;
  gpu_cfg.score = cfg.score;
  gpu_cfg.budget = cfg.budget;
  const auto gpu = run<gpu_scheme>(in, gpu_cfg, external ? &in.scores : nullptr);

  ASSERT_EQ(cpu.offsets.size(), gpu.offsets.size());
  for (std::int64_t b = 0; b < batch; ++b)  // per-sequence totals: always
    EXPECT_EQ(cpu.offsets[(b + 1) * kv_heads] - cpu.offsets[b * kv_heads],
              gpu.offsets[(b + 1) * kv_heads] - gpu.offsets[b * kv_heads])
        << "sequence " << b;
  if (counts_exact) EXPECT_EQ(cpu.offsets, gpu.offsets) << "per-head keep counts";
  const auto cpu_set = as_set(cpu), gpu_set = as_set(gpu);
  if (expected == agreement::exact) {
    EXPECT_EQ(cpu.tokens, gpu.tokens) << "kept tokens";
  } else {
    std::size_t common = 0;
    for (const auto& t : cpu_set) common += gpu_set.count(t);
    EXPECT_GE(static_cast<double>(common), 0.99 * static_cast<double>(cpu_set.size()))
        << common << " of " << cpu_set.size() << " kept tokens agree";
  }
  if (cpu_set != gpu_set)  // the caches differ by design here: attention is compared where the kept sets agree
    std::printf("  [info] %s: kept sets differ in %zu of %zu tokens (near-ties); attention not compared\n",
                ::testing::UnitTest::GetInstance()->current_test_info()->name(),
                cpu_set.size() + gpu_set.size() - 2 * [&] {
                  std::size_t common = 0;
                  for (const auto& t : cpu_set) common += gpu_set.count(t);
                  return common;
                }(),
                cpu_set.size());
  if (cpu_set == gpu_set) {
    float max_value = 0.0f;
    for (const auto v : in.values) max_value = std::max(max_value, std::abs(kt::to_float(v)));
    const float bound = 2e-3f * max_value;
    for (std::size_t i = 0; i < cpu.out.size(); ++i)
      ASSERT_NEAR(kt::to_float(gpu.out[i]), kt::to_float(cpu.out[i]), bound) << "output element " << i;
  }
}

kt::budget::adaptive::config adaptive_budget() {
  kt::budget::adaptive::config c;
  c.keep = kt::keep_tokens{77};
  return c;
}
kt::budget::uniform::config uniform_budget() {
  kt::budget::uniform::config c;
  c.keep = kt::keep_tokens{77};
  return c;
}
kt::budget::pyramid::config pyramid_budget() {
  kt::budget::pyramid::config c;
  c.keep = kt::keep_tokens{77};
  c.layer = 3;
  c.layers = 8;
  return c;
}
kt::budget::per_head::config per_head_budget() {
  kt::budget::per_head::config c;
  c.lengths = {1, 257, 31, 100};  // a length is at least 1 (the budget refuses 0)
  c.kv_heads = kv_heads;
  return c;
}
kt::score::snapkv::config snapkv_score() {
  kt::score::snapkv::config c;
  c.window = window;
  return c;
}

template <class Layout, class Scorer, class Budget, class ScoreConfig, class BudgetConfig>
void combination(ScoreConfig score, BudgetConfig budget, agreement expected, bool counts_exact) {
  typename kt::scheme<Layout, Scorer, Budget, kt::codec::fp16, kt::backend::cpu>::config cfg;
  cfg.score = score;
  cfg.budget = budget;
  check_combination<Layout, Scorer, Budget>(cfg, expected, counts_exact);
}

}  // namespace

// Budgets × layouts with the caller's scores: identical selections, token for token.
TEST(Combinations, ExternalAdaptiveFlat) {
  combination<kt::layout::flat, kt::score::external, kt::budget::adaptive>(kt::score::external::config{}, adaptive_budget(),
                                                                           agreement::exact, true);
}
TEST(Combinations, ExternalAdaptivePaged) {
  combination<kt::layout::paged, kt::score::external, kt::budget::adaptive>(kt::score::external::config{}, adaptive_budget(),
                                                                            agreement::exact, true);
}
TEST(Combinations, ExternalPyramidPaged) {
  combination<kt::layout::paged, kt::score::external, kt::budget::pyramid>(kt::score::external::config{}, pyramid_budget(),
                                                                           agreement::exact, true);
}
TEST(Combinations, ExternalPerHeadFlat) {
  combination<kt::layout::flat, kt::score::external, kt::budget::per_head>(kt::score::external::config{}, per_head_budget(),
                                                                           agreement::exact, true);
}
TEST(Combinations, ExternalUniformContiguous) {
  combination<kt::layout::contiguous, kt::score::external, kt::budget::uniform>(kt::score::external::config{},
                                                                                uniform_budget(), agreement::exact, true);
}
// RazorAttention: retrieval heads whole, the others sinks + recent + a compensation token.
TEST(Combinations, RazorAttentionFlatAndPaged) {
  kt::score::retrieval_head::config razor;
  razor.retrieval = {false, true, false, false};
  razor.sinks = 4;
  razor.min_recent = 32;
  razor.recent_fraction = 0.1;
  combination<kt::layout::flat, kt::score::retrieval_head, kt::budget::by_scorer>(razor, kt::budget::by_scorer::config{},
                                                                                 agreement::exact, true);
  combination<kt::layout::paged, kt::score::retrieval_head, kt::budget::by_scorer>(razor, kt::budget::by_scorer::config{},
                                                                                  agreement::exact, true);
}
// Ada-SnapKV on flat and paged (the seed system), SnapKV + uniform on paged, key norm + pyramid.
TEST(Combinations, SnapKVAdaptiveFlat) {
  combination<kt::layout::flat, kt::score::snapkv, kt::budget::adaptive>(snapkv_score(), adaptive_budget(),
                                                                         agreement::near_ties, false);
}
TEST(Combinations, SnapKVAdaptivePaged) {
  combination<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive>(snapkv_score(), adaptive_budget(),
                                                                          agreement::near_ties, false);
}
TEST(Combinations, SnapKVUniformPaged) {
  combination<kt::layout::paged, kt::score::snapkv, kt::budget::uniform>(snapkv_score(), uniform_budget(),
                                                                         agreement::near_ties, true);
}
TEST(Combinations, KeyNormPyramidFlat) {
  combination<kt::layout::flat, kt::score::key_norm, kt::budget::pyramid>(kt::score::key_norm::config{}, pyramid_budget(),
                                                                          agreement::near_ties, true);
}

// ---- NaN / Inf on the device: refused before any write, the CPU's message ----
// The CPU refuses a non-finite key, value or window query (or a finite value its
// fp16 storage rounds to ±Inf) naming the first in (argument, sequence, head,
// token, channel) order, before writing. The device scans the inputs before the
// planning kernel and refuses through the status words: every byte of the cache
// stays (compared whole after check_status), and check_status throws the CPU's
// message word for word. One bad element among 2·4·257·128 per tensor, in one
// head of many; two bad elements where the CPU's order decides which is named.
namespace {

std::size_t kv_index(std::int64_t b, std::int64_t h, std::int64_t t, std::int64_t d) {
  return static_cast<std::size_t>(((b * kv_heads + h) * tokens + t) * head_dim + d);
}
std::size_t q_index(std::int64_t b, std::int64_t h, std::int64_t t, std::int64_t d) {
  return static_cast<std::size_t>(((b * q_heads + h) * window + t) * head_dim + d);
}

template <class Layout, class Budget, class BudgetConfig>
void check_non_finite_refused(BudgetConfig budget) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using cpu_scheme = kt::scheme<Layout, kt::score::snapkv, Budget, kt::codec::fp16, kt::backend::cpu>;
  using gpu_scheme = kt::scheme<Layout, kt::score::snapkv, Budget, kt::codec::fp16, kt::backend::cuda>;
  typename cpu_scheme::config cpu_cfg;
  cpu_cfg.score = snapkv_score();
  cpu_cfg.budget = budget;
  typename gpu_scheme::config gpu_cfg;
  gpu_cfg.score = cpu_cfg.score;
  gpu_cfg.budget = cpu_cfg.budget;
  const std::array<std::int64_t, 4> kv_extents{batch, kv_heads, tokens, head_dim};
  const std::array<std::int64_t, 4> q_extents{batch, q_heads, window, head_dim};
  const inputs good(4321);
  auto cpu = cpu_scheme::make_cache(shape, batch, pool<Layout>(), kt::codec::fp16::config{});
  auto gpu = gpu_scheme::make_cache(shape, batch, pool<Layout>(), kt::codec::fp16::config{});
  std::vector<std::byte> cpu_scratch(cpu_scheme::compress_workspace(shape, batch, tokens, cpu_cfg));
  device_buffer<std::byte> scratch(gpu_scheme::compress_workspace(shape, batch, tokens, gpu_cfg));
  const auto cpu_compress = [&](const inputs& in) {
    auto view = cpu.view();
    cpu_scheme::compress(kt::make_view(in.keys.data(), kv_extents), kt::make_view(in.values.data(), kv_extents),
                         kt::make_view(in.queries.data(), q_extents), view, cpu_cfg,
                         kt::workspace{cpu_scratch.data(), cpu_scratch.size()});
  };
  const auto gpu_compress = [&](const inputs& in, bool check_finite) {
    device_buffer<kt::half> keys(in.keys), values(in.values), queries(in.queries);
    kt::compress_options<kt::device_space> options;
    options.check_finite = check_finite;
    auto view = gpu.view();
    gpu_scheme::compress(kt::make_view<kt::device_space>(static_cast<const kt::half*>(keys.data()), kv_extents),
                         kt::make_view<kt::device_space>(static_cast<const kt::half*>(values.data()), kv_extents),
                         kt::make_view<kt::device_space>(static_cast<const kt::half*>(queries.data()), q_extents), view,
                         gpu_cfg, options, kt::workspace{scratch.data(), scratch.size()}, cudaStream_t{});
    kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  };
  const auto whole = [&] { return kt::testing::download_bytes(gpu.data(), gpu.bytes()); };
  const auto cpu_message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const kt::error& e) {
      return e.what();
    }
    return {};
  };
  // The device refused `call` exactly as the CPU did, and the cache kept every byte.
  const auto expect_refused = [&](const std::string& expected, auto&& call) {
    ASSERT_FALSE(expected.empty()) << "the CPU accepted the input";
    const std::vector<std::byte> before = whole();
    call();
    try {
      kt::check_status(gpu.view(), cudaStream_t{});
      ADD_FAILURE() << "check_status did not throw; expected: " << expected;
    } catch (const kt::error& e) {
      EXPECT_EQ(std::string(e.what()), expected);
    }
    EXPECT_TRUE(whole() == before) << "a refused call changed the cache (status words included, after check_status)";
  };

  cpu_compress(good);
  gpu_compress(good, true);
  ASSERT_NO_THROW(kt::check_status(gpu.view(), cudaStream_t{}));

  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct bad_element {
    int argument;  // 0 keys, 1 values, 2 window queries
    std::size_t element;
    float value;
  };
  struct bad_case {
    const char* what;
    std::vector<bad_element> where;
  };
  const std::vector<bad_case> cases = {
      {"a NaN value in sequence 1, head 3 (of 8 heads)", {{1, kv_index(1, 3, 200, 77), nan}}},
      {"a NaN value, then +Inf in a key: the keys are checked first",
       {{1, kv_index(0, 0, 3, 1), nan}, {0, kv_index(1, 2, 5, 0), inf}}},
      {"the very first key element", {{0, kv_index(0, 0, 0, 0), nan}}},
      {"the very last value element", {{1, kv_index(batch - 1, kv_heads - 1, tokens - 1, head_dim - 1), -inf}}},
      {"a window query only", {{2, q_index(1, 13, window - 1, 127), -inf}}},
      {"two bad keys in one head: the lower token", {{0, kv_index(1, 1, 250, 3), nan}, {0, kv_index(1, 1, 17, 100), inf}}},
  };
  for (const bad_case& c : cases) {
    SCOPED_TRACE(c.what);
    inputs in = good;
    for (const bad_element& e : c.where) {
      auto& tensor = e.argument == 0 ? in.keys : e.argument == 1 ? in.values : in.queries;
      tensor[e.element] = kt::from_float<kt::half>(e.value);
    }
    expect_refused(cpu_message([&] { cpu_compress(in); }), [&] { gpu_compress(in, true); });
  }

  // Appends: one token per head with a NaN in one head's value row; a float row
  // that fp16 storage rounds to +Inf (1e5 > 65504) through append_head.
  {
    const std::array<std::int64_t, 4> one{batch, kv_heads, 1, head_dim};
    std::vector<kt::half> keys(good.keys.begin(), good.keys.begin() + batch * kv_heads * head_dim);
    std::vector<kt::half> values = keys;
    values[static_cast<std::size_t>((1 * kv_heads + 2) * head_dim + 9)] = kt::from_float<kt::half>(nan);
    const std::string expected = cpu_message([&] {
      cpu_scheme::append(cpu.view(), kt::make_view(keys.data(), one), kt::make_view(values.data(), one));
    });
    device_buffer<kt::half> device_keys(keys), device_values(values);
    expect_refused(expected, [&] {
      gpu_scheme::append(gpu.view(), kt::make_view<kt::device_space>(static_cast<const kt::half*>(device_keys.data()), one),
                         kt::make_view<kt::device_space>(static_cast<const kt::half*>(device_values.data()), one),
                         cudaStream_t{});
      kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    });
    if constexpr (Layout::ragged_heads) {
      const std::array<std::int64_t, 2> rows{3, head_dim};
      std::vector<float> row_keys(3 * head_dim, 0.25f), row_values(3 * head_dim, -0.5f);
      row_keys[static_cast<std::size_t>(2 * head_dim + 64)] = 1e5f;
      const std::string overflow = cpu_message([&] {
        cpu_scheme::append_head(cpu.view(), 1, 1, kt::make_view(row_keys.data(), rows), kt::make_view(row_values.data(), rows));
      });
      EXPECT_NE(overflow.find("fp16 storage"), std::string::npos) << overflow;
      device_buffer<float> device_row_keys(row_keys), device_row_values(row_values);
      expect_refused(overflow, [&] {
        gpu_scheme::append_head(gpu.view(), 1, 1,
                                kt::make_view<kt::device_space>(static_cast<const float*>(device_row_keys.data()), rows),
                                kt::make_view<kt::device_space>(static_cast<const float*>(device_row_values.data()), rows),
                                cudaStream_t{});
        kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      });
    }
  }

  // A NaN in a call that a host-side check of the device path then refuses (values
  // with another token stride than the keys: the CUDA layouts copy rows of both with
  // one stride): the scan runs after every host check, so nothing is recorded and
  // the next good call goes through.
  {
    inputs in = good;
    in.keys[kv_index(0, 1, 2, 3)] = kt::from_float<kt::half>(nan);
    device_buffer<kt::half> keys(in.keys), queries(in.queries);
    const std::int64_t padded_row = head_dim + 8;
    device_buffer<kt::half> padded_values(std::vector<kt::half>(static_cast<std::size_t>(batch * kv_heads * tokens * padded_row)));
    const kt::tensor_view<const kt::half, 4, kt::device_space> values_view{
        padded_values.data(), kv_extents, {kv_heads * tokens * padded_row, tokens * padded_row, padded_row, 1}};
    kt::compress_options<kt::device_space> options;
    auto view = gpu.view();
    EXPECT_THROW(gpu_scheme::compress(kt::make_view<kt::device_space>(static_cast<const kt::half*>(keys.data()), kv_extents),
                                      values_view,
                                      kt::make_view<kt::device_space>(static_cast<const kt::half*>(queries.data()), q_extents),
                                      view, gpu_cfg, options, kt::workspace{scratch.data(), scratch.size()}, cudaStream_t{}),
                 kt::error);
    kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    EXPECT_NO_THROW(kt::check_status(gpu.view(), cudaStream_t{})) << "a call refused on the host recorded a device failure";
    gpu_compress(good, true);
    EXPECT_NO_THROW(kt::check_status(gpu.view(), cudaStream_t{})) << "a good call after it was refused";
  }

  // compress_options::check_finite = false skips the scan: a NaN in a value row of
  // the observation window (which SnapKV always keeps) is then stored as the engine
  // asked — the cache changes (the same compress of the good inputs is what it holds
  // now) and no refusal is recorded.
  {
    inputs in = good;
    in.values[kv_index(1, 3, tokens - 2, 77)] = kt::from_float<kt::half>(nan);
    const std::vector<std::byte> before = whole();
    gpu_compress(in, false);
    EXPECT_NO_THROW(kt::check_status(gpu.view(), cudaStream_t{}));
    EXPECT_FALSE(whole() == before) << "check_finite = false: the compress was refused anyway";
  }
}

}  // namespace

TEST(Combinations, NonFiniteInputsAreRefusedIntactPaged) {
  check_non_finite_refused<kt::layout::paged, kt::budget::uniform>(uniform_budget());
}
TEST(Combinations, NonFiniteInputsAreRefusedIntactFlat) {
  check_non_finite_refused<kt::layout::flat, kt::budget::adaptive>(adaptive_budget());
}

// ---- Ada-KV's paper form on the device: a head protecting more than its budget ---
// The CPU throws (budget::adaptive::guaranteed) for the first head, in (sequence,
// head) order, whose protected tokens (scored +inf) exceed the per-head budget k.
// The device's budget records that head in its workspace and the compaction's
// planning refuses through the status words: the CPU's message, the cache intact.
namespace {

template <class Layout>
void check_adaptive_refused() {
  KVTRIM_SKIP_WITHOUT_GPU();
  using cpu_scheme = kt::scheme<Layout, kt::score::external, kt::budget::adaptive, kt::codec::fp16, kt::backend::cpu>;
  using gpu_scheme = kt::scheme<Layout, kt::score::external, kt::budget::adaptive, kt::codec::fp16, kt::backend::cuda>;
  const std::array<std::int64_t, 4> kv_extents{batch, kv_heads, tokens, head_dim};
  const std::array<std::int64_t, 3> score_extents{batch, kv_heads, tokens};
  const inputs in(777);
  auto cpu = cpu_scheme::make_cache(shape, batch, pool<Layout>(), kt::codec::fp16::config{});
  auto gpu = gpu_scheme::make_cache(shape, batch, pool<Layout>(), kt::codec::fp16::config{});
  device_buffer<kt::half> keys(in.keys), values(in.values);
  const auto compress_both = [&](const std::vector<float>& scores) -> std::string {
    typename cpu_scheme::config cpu_cfg;
    cpu_cfg.budget = adaptive_budget();
    cpu_cfg.budget.keep = kt::keep_tokens{12};
    cpu_cfg.score = kt::score::external::config::from(kt::make_view(scores.data(), score_extents));
    std::vector<std::byte> cpu_scratch(cpu_scheme::compress_workspace(shape, batch, tokens, cpu_cfg));
    std::string message;
    try {
      auto view = cpu.view();
      cpu_scheme::compress(kt::make_view(in.keys.data(), kv_extents), kt::make_view(in.values.data(), kv_extents), view,
                           cpu_cfg, kt::workspace{cpu_scratch.data(), cpu_scratch.size()});
    } catch (const kt::error& e) {
      message = e.what();
    }
    device_buffer<float> device_scores(scores);
    typename gpu_scheme::config gpu_cfg;
    gpu_cfg.budget = cpu_cfg.budget;
    gpu_cfg.score = kt::score::external::config::from(
        kt::make_view<kt::device_space>(static_cast<const float*>(device_scores.data()), score_extents));
    device_buffer<std::byte> scratch(gpu_scheme::compress_workspace(shape, batch, tokens, gpu_cfg));
    auto view = gpu.view();
    gpu_scheme::compress(kt::make_view<kt::device_space>(static_cast<const kt::half*>(keys.data()), kv_extents),
                         kt::make_view<kt::device_space>(static_cast<const kt::half*>(values.data()), kv_extents), view,
                         gpu_cfg, kt::workspace{scratch.data(), scratch.size()}, cudaStream_t{});
    kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return message;
  };
  const float inf = std::numeric_limits<float>::infinity();
  const auto protect = [&](std::vector<float>& scores, std::int64_t b, std::int64_t h, std::int64_t count) {
    for (std::int64_t t = 0; t < count; ++t)
      scores[static_cast<std::size_t>((b * kv_heads + h) * tokens + 3 * t + 1)] = inf;
  };
  // Heads protecting ≤ k tokens: accepted on both.
  std::vector<float> fits = in.scores;
  protect(fits, 0, 1, 12);
  protect(fits, 1, 0, 5);
  ASSERT_EQ(compress_both(fits), "");
  ASSERT_NO_THROW(kt::check_status(gpu.view(), cudaStream_t{}));
  // Sequence 1's kv heads 2 and 3 protect 20 and 30 > 12: the CPU names head 2.
  std::vector<float> over = fits;
  protect(over, 1, 2, 20);
  protect(over, 1, 3, 30);
  const std::vector<std::byte> before = kt::testing::download_bytes(gpu.data(), gpu.bytes());
  const std::string expected = compress_both(over);
  ASSERT_NE(expected.find("20 tokens the scorer protects"), std::string::npos) << expected;
  try {
    kt::check_status(gpu.view(), cudaStream_t{});
    ADD_FAILURE() << "check_status did not throw; expected: " << expected;
  } catch (const kt::error& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
  EXPECT_TRUE(kt::testing::download_bytes(gpu.data(), gpu.bytes()) == before) << "a refused compress changed the cache";
  // The next call that fits is accepted again (the refusal word is per call).
  ASSERT_EQ(compress_both(fits), "");
  EXPECT_NO_THROW(kt::check_status(gpu.view(), cudaStream_t{}));
}

}  // namespace

TEST(Combinations, AdaptiveHeadOverItsBudgetIsRefusedIntactFlat) { check_adaptive_refused<kt::layout::flat>(); }
TEST(Combinations, AdaptiveHeadOverItsBudgetIsRefusedIntactPaged) { check_adaptive_refused<kt::layout::paged>(); }

// ---- One past 2^31 elements: 64-bit indexing end to end ---------------------
// Every layout at a size where the inputs AND the cache hold more than 2^31
// elements per tensor (2 kv heads × (2^24 + 17) tokens × 128 channels = 2^32 +
// 4352 input elements; 14 680 078 kept tokens per head = 3.76·10^9 cache
// elements), so any element offset computed in 32 bits lands in the wrong row.
// Inputs are made on the device from a hash the host recomputes, so nothing of
// 17 GB travels: keys k[h][t][d] ∈ [-1, 1) with 10 fraction bits (exact in
// fp16); values v[h][t][d] = g(h, t) + c(d), g ∈ [-0.5, 0.5) and c(d) = (d mod
// 16)/16 (8 fraction bits, exact); external scores 1 for t mod 8 ≠ 0 and 0
// otherwise with a uniform budget of exactly that many tokens, so the kept set is
// known: every t with t mod 8 ≠ 0.
// Decode: the 4 query heads of kv head 0 are zero (uniform attention: the mean
// of the kept values), those of kv head 1 are β·e_j for channels j = 0, 5, 77,
// 127 (β = 8√128: logits β·k_j/√128 ∈ [-8, 8)); the host computes the softmax
// means in double over all 14.7 M kept tokens. Tolerance 2e-3 (outputs ≤ 1.5):
// the fp16 output rounds by ≤ 2^-11·1.5 = 7.3e-4; the tensor-core path rounds
// the weights e^{s−m} ≤ 1 to fp16 (≤ 2^-11 relative for normals, ≤ 2^-25
// absolute for subnormals against a mean weight ≥ 1/16: ≤ 4.9e-4 relative); the
// fp32 sums of 1.5·10^7 terms in partitions add rounding errors of random sign
// (a few · √n · 2^-24 ≈ 2.3e-4 per unit of sum). A row read from the wrong place
// moves the output by O(1) (g of another token, c of another channel).
namespace {

constexpr std::int64_t big_tokens = (std::int64_t{1} << 24) + 17, big_heads = 2, big_q_heads = 8, big_dim = 128;
constexpr std::array<std::int64_t, 4> big_channels{0, 5, 77, 127};  // e_j of kv head 1's four query heads

__host__ __device__ inline std::uint32_t big_hash(std::uint64_t x) {
  x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ull, x ^= x >> 33;
  return static_cast<std::uint32_t>(x);
}
__host__ __device__ inline float big_key(std::int64_t h, std::int64_t t, std::int64_t d) {
  return static_cast<float>(static_cast<std::int32_t>(big_hash(((h * big_tokens + t) << 8) | d) >> 22) - 512) / 512.0f;
}
__host__ __device__ inline float big_g(std::int64_t h, std::int64_t t) {
  return static_cast<float>(big_hash((h * big_tokens + t) * 7919 + 3) >> 24) / 256.0f - 0.5f;
}
__host__ __device__ inline float big_c(std::int64_t d) { return static_cast<float>(d % 16) / 16.0f; }

template <class Unused>
__global__ void fill_big_inputs(kt::half* keys, kt::half* values, float* scores) {
  const std::int64_t rows = big_heads * big_tokens;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < rows * big_dim;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t d = i % big_dim, row = i / big_dim, t = row % big_tokens, h = row / big_tokens;
    keys[i] = __float2half_rn(big_key(h, t, d));
    values[i] = __float2half_rn(big_g(h, t) + big_c(d));
    if (d == 0) scores[row] = t % 8 != 0 ? 1.0f : 0.0f;
  }
}

template <class Layout>
auto big_pool(std::int64_t kept) {
  if constexpr (std::is_same_v<Layout, kt::layout::paged>)
    return kt::layout::paged::pool_size{big_heads * ((kept + 15) / 16), 16};
  else if constexpr (std::is_same_v<Layout, kt::layout::flat>)
    return kt::layout::flat::pool_size{big_heads * kept};
  else
    return kept;
}

template <class Layout>
void beyond_two_to_the_31() {
  KVTRIM_SKIP_WITHOUT_GPU();
  std::size_t free_bytes = 0, total_bytes = 0;
  kt::testing::check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  const std::int64_t elements = big_heads * big_tokens * big_dim;
  const std::int64_t kept = big_tokens - (big_tokens + 7) / 8;  // t mod 8 ≠ 0
  if (free_bytes < static_cast<std::size_t>(4 * 2 * elements + (std::int64_t{2} << 30)))
    GTEST_SKIP() << "needs ~" << (8 * elements >> 30) << " GiB of device memory, " << (free_bytes >> 30) << " free";
  using scheme = kt::scheme<Layout, kt::score::external, kt::budget::uniform, kt::codec::fp16, kt::backend::cuda>;
  const kt::model_shape shape{.q_heads = big_q_heads, .kv_heads = big_heads, .head_dim = big_dim};
  std::vector<std::int64_t> offsets_host;
  std::vector<std::int32_t> kept_host;
  std::vector<kt::half> out_host;
  {
    // Inputs in optionals: they are freed before decode, so the cache alone is read.
    std::optional<device_buffer<kt::half>> keys(std::in_place, static_cast<std::size_t>(elements)),
        values(std::in_place, static_cast<std::size_t>(elements));
    std::optional<device_buffer<float>> scores(std::in_place, static_cast<std::size_t>(big_heads * big_tokens));
    fill_big_inputs<int><<<4096, 256>>>(keys->data(), values->data(), scores->data());
    kt::testing::check(cudaGetLastError(), "fill_big_inputs");
    const std::array<std::int64_t, 4> kv_extents{1, big_heads, big_tokens, big_dim};
    typename scheme::config cfg;
    cfg.score = kt::score::external::config::from(kt::make_view<kt::device_space>(
        static_cast<const float*>(scores->data()), std::array<std::int64_t, 3>{1, big_heads, big_tokens}));
    cfg.budget.keep = kt::keep_tokens{kept};
    auto cache = scheme::make_cache(shape, 1, big_pool<Layout>(kept), kt::codec::fp16::config{});
    const std::int64_t capacity = scheme::kept_tokens_capacity(shape, 1, big_tokens, cfg);
    device_buffer<std::int64_t> offsets(big_heads + 1);
    device_buffer<std::int32_t> kept_tokens(static_cast<std::size_t>(capacity));
    auto view = cache.view();
    {
      device_buffer<std::byte> scratch(scheme::compress_workspace(shape, 1, big_tokens, cfg));
      scheme::compress(kt::make_view<kt::device_space>(static_cast<const kt::half*>(keys->data()), kv_extents),
                       kt::make_view<kt::device_space>(static_cast<const kt::half*>(values->data()), kv_extents), view,
                       cfg, kt::compress_options<kt::device_space>{0, offsets.data(), kept_tokens.data(), capacity},
                       kt::workspace{scratch.data(), scratch.size()}, cudaStream_t{});
    }
    if constexpr (Layout::ragged_heads) kt::check_status(view, cudaStream_t{});
    kt::testing::check(cudaDeviceSynchronize(), "compress");
    keys.reset(), values.reset(), scores.reset();
    const float beta = 8.0f * std::sqrt(static_cast<float>(big_dim));
    std::vector<kt::half> queries(big_q_heads * big_dim, kt::from_float<kt::half>(0.0f));
    for (std::int64_t j = 0; j < 4; ++j) queries[(4 + j) * big_dim + big_channels[j]] = kt::from_float<kt::half>(beta);
    device_buffer<kt::half> query(queries), out(queries.size());
    const std::array<std::int64_t, 3> q_extents{1, big_q_heads, big_dim};
    device_buffer<std::byte> attend_scratch(scheme::attend_workspace(view));
    scheme::attend(kt::make_view<kt::device_space>(static_cast<const kt::half*>(query.data()), q_extents), view,
                   kt::make_view<kt::device_space>(out.data(), q_extents),
                   kt::workspace{attend_scratch.data(), attend_scratch.size()}, cudaStream_t{});
    kt::testing::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    offsets_host = offsets.download();
    kept_host = kept_tokens.download();
    out_host = out.download();
  }
  // The selection: every t with t mod 8 ≠ 0, ascending, per head.
  ASSERT_EQ(offsets_host.size(), static_cast<std::size_t>(big_heads + 1));
  for (std::int64_t h = 0; h < big_heads; ++h) {
    ASSERT_EQ(offsets_host[h + 1] - offsets_host[h], kept) << "head " << h;
    std::int64_t i = offsets_host[h];
    for (std::int64_t t = 0; t < big_tokens; ++t)
      if (t % 8 != 0) ASSERT_EQ(kept_host[static_cast<std::size_t>(i++)], t) << "head " << h;
  }
  // Attention: kv head 0 (q heads 0–3) the mean of g; kv head 1 softmax means.
  const auto expected = [&](std::int64_t q) {
    const std::int64_t h = q / 4;
    const double scale = 1.0 / std::sqrt(static_cast<double>(big_dim));
    const double beta = 8.0 * std::sqrt(static_cast<double>(big_dim));
    const auto logit = [&](std::int64_t t) { return h == 0 ? 0.0 : beta * scale * big_key(h, t, big_channels[q - 4]); };
    double m = -1e300;
    for (std::int64_t t = 0; t < big_tokens; ++t)
      if (t % 8 != 0) m = std::max(m, logit(t));
    double weights = 0.0, weighted = 0.0;
    for (std::int64_t t = 0; t < big_tokens; ++t) {
      if (t % 8 == 0) continue;
      const double w = std::exp(logit(t) - m);
      weights += w, weighted += w * big_g(h, t);
    }
    return weighted / weights;
  };
  for (std::int64_t q = 0; q < big_q_heads; ++q) {
    const double mean_g = expected(q);
    for (std::int64_t d = 0; d < big_dim; ++d)
      ASSERT_NEAR(kt::to_float(out_host[static_cast<std::size_t>(q * big_dim + d)]), mean_g + big_c(d), 2e-3)
          << "query head " << q << ", channel " << d;
  }
}

}  // namespace

TEST(Combinations, BeyondTwoToThe31ElementsContiguous) { beyond_two_to_the_31<kt::layout::contiguous>(); }
TEST(Combinations, BeyondTwoToThe31ElementsFlat) { beyond_two_to_the_31<kt::layout::flat>(); }
TEST(Combinations, BeyondTwoToThe31ElementsPaged) { beyond_two_to_the_31<kt::layout::paged>(); }
