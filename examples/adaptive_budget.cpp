// examples/adaptive_budget.cpp — uniform vs Ada-KV budgets on the same SnapKV scores.
//
// A layer with 8 kv heads whose attention ranges from sharp (a few tokens carry
// the mass) to diffuse. Both budgets keep the same total (k tokens per head on
// average); uniform gives every head k, Ada-KV moves tokens to where the scores
// are. The program prints each head's kept length and the decode-attention error
// of each choice against the full cache.
//
// Uniform runs the whole scheme on layout::contiguous. Ada-KV gives heads
// different lengths, which layout::contiguous cannot hold: until layout::flat /
// layout::paged are available it runs the same stages the scheme runs (scorer →
// budget → select_top_k, through kvtrim::implementation) and attends over the
// selection here. With a ragged layout it becomes one line:
//   scheme<layout::flat, score::snapkv, budget::adaptive, codec::fp32, backend::cpu>.
#include <kvtrim/kvtrim.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace kt = kvtrim;

namespace {

constexpr std::int64_t batch = 1, q_heads = 16, kv_heads = 8, head_dim = 64, tokens = 2048, window = 32;
constexpr std::int64_t keep_per_head = 128;

struct tensor4 {
  std::vector<float> data;
  std::array<std::int64_t, 4> extents;
  kt::tensor_view<float, 4> view() { return kt::make_view(data.data(), extents); }
};

/// Keys N(0,1); queries of kv head h are a shared "topic" direction times a
/// sharpness that grows with h, plus noise: head 0 diffuse, head 7 sharp.
void make_layer(tensor4& keys, tensor4& values, tensor4& window_queries, std::vector<float>& decode_queries) {
  std::mt19937 random(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& x : keys.data) x = normal(random);
  for (auto& x : values.data) x = normal(random);
  const std::int64_t group = q_heads / kv_heads;
  for (std::int64_t j = 0; j < q_heads; ++j) {
    const std::int64_t h = j / group;
    const float sharpness = 0.05f + 0.35f * static_cast<float>(h);
    // The topic: the mean of a few keys this head looks for.
    std::vector<float> topic(head_dim, 0.0f);
    for (int n = 0; n < 6; ++n) {
      const auto token = static_cast<std::int64_t>(random() % tokens);
      for (std::int64_t d = 0; d < head_dim; ++d) topic[d] += keys.data[((h * tokens) + token) * head_dim + d];
    }
    for (std::int64_t t = 0; t <= window; ++t)
      for (std::int64_t d = 0; d < head_dim; ++d) {
        const float q = sharpness * topic[d] + 0.3f * normal(random);
        if (t < window) window_queries.data[((j * window) + t) * head_dim + d] = q;
        else decode_queries[j * head_dim + d] = q;  // the next query: same head, same topic
      }
  }
}

/// Decode attention (fp32) of query head j over `kept` tokens of its kv head.
std::vector<float> attend(const std::vector<float>& query, const tensor4& keys, const tensor4& values, std::int64_t j,
                          const std::int32_t* kept, std::int64_t count) {
  const std::int64_t h = j / (q_heads / kv_heads);
  std::vector<float> logits(count), out(head_dim, 0.0f);
  float top = -INFINITY, sum = 0.0f;
  for (std::int64_t i = 0; i < count; ++i) {
    float dot = 0.0f;
    for (std::int64_t d = 0; d < head_dim; ++d) dot += query[j * head_dim + d] * keys.data[(h * tokens + kept[i]) * head_dim + d];
    logits[i] = dot / std::sqrt(static_cast<float>(head_dim));
    top = std::fmax(top, logits[i]);
  }
  for (std::int64_t i = 0; i < count; ++i) sum += (logits[i] = std::exp(logits[i] - top));
  for (std::int64_t i = 0; i < count; ++i)
    for (std::int64_t d = 0; d < head_dim; ++d) out[d] += logits[i] / sum * values.data[(h * tokens + kept[i]) * head_dim + d];
  return out;
}

/// ‖got − want‖₂ (Ada-KV bounds the eviction loss of the attention output, not a
/// relative error: a diffuse head's output is near zero, so relative errors explode).
double output_error(const std::vector<float>& got, const std::vector<float>& want) {
  double difference = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) difference += std::pow(got[i] - want[i], 2);
  return std::sqrt(difference);
}

}  // namespace

int main() {
  const kt::model_shape shape{q_heads, kv_heads, head_dim};
  tensor4 keys{std::vector<float>(batch * kv_heads * tokens * head_dim), {batch, kv_heads, tokens, head_dim}};
  tensor4 values{keys.data, keys.extents};
  tensor4 window_queries{std::vector<float>(batch * q_heads * window * head_dim), {batch, q_heads, window, head_dim}};
  std::vector<float> decode_queries(batch * q_heads * head_dim);
  make_layer(keys, values, window_queries, decode_queries);

  // ---- full cache and uniform budget: the scheme on a contiguous layout --------------
  const auto run_uniform = [&](kt::keep_amount keep) {
    using scheme = kt::scheme<kt::layout::contiguous, kt::score::snapkv, kt::budget::uniform, kt::codec::fp32,
                              kt::backend::cpu>;
    scheme::config cfg{.score = {.window = window}, .budget = {.keep = keep}};
    auto cache = scheme::make_cache(shape, batch, tokens, kt::codec::fp32::config{});
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    scheme::compress(keys.view(), values.view(), window_queries.view(), cache.view(), cfg,
                     kt::workspace{scratch.data(), scratch.size()});
    std::vector<float> out(decode_queries.size());
    scheme::attend(kt::make_view(decode_queries.data(), std::array<std::int64_t, 3>{batch, q_heads, head_dim}), cache.view(),
                   kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, q_heads, head_dim}), kt::workspace{});
    return out;
  };
  const std::vector<float> full = run_uniform(kt::keep_ratio{1.0});
  const std::vector<float> uniform = run_uniform(kt::keep_tokens{keep_per_head});

  // ---- Ada-KV: the scheme's stages, then attention over the selection ---------------
  using scorer = kt::implementation<kt::score::snapkv, kt::backend::cpu>;
  using budget = kt::implementation<kt::budget::adaptive, kt::backend::cpu>;
  using select = kt::implementation<kt::stage::select_top_k, kt::backend::cpu>;
  const kt::score::snapkv::config score_cfg{.window = window};
  const kt::budget::adaptive::config budget_cfg{.keep = kt::keep_tokens{keep_per_head}, .alpha = 0.2};
  std::vector<float> scores(batch * kv_heads * tokens);
  const auto score_view = kt::make_view(scores.data(), std::array<std::int64_t, 3>{batch, kv_heads, tokens});
  std::vector<std::byte> score_scratch(scorer::workspace_bytes(score_cfg, shape, batch, tokens));
  std::vector<std::byte> budget_scratch(budget::workspace_bytes(budget_cfg, shape, batch, tokens));
  const auto keys_in = kt::tensor_view<const float, 4>(keys.view());
  const auto queries_in = kt::tensor_view<const float, 4>(window_queries.view());
  scorer::score(score_cfg, shape, keys_in, keys_in, queries_in, score_view,
                kt::workspace{score_scratch.data(), score_scratch.size()}, {});
  std::vector<std::int32_t> counts(batch * kv_heads), kept(batch * kv_heads * tokens), order(tokens);
  std::vector<std::int64_t> offsets(batch * kv_heads + 1);
  budget::keep_counts(budget_cfg, score_view, counts.data(), kt::workspace{budget_scratch.data(), budget_scratch.size()}, {});
  select::select(score_view, counts.data(), offsets.data(), kept.data(),
                 kt::workspace{order.data(), order.size() * sizeof(std::int32_t)}, {});

  std::printf("%lld tokens, %lld kv heads (%lld query heads), head_dim %lld; SnapKV window %lld; budget %lld tokens "
              "per head on average\n\n",
              static_cast<long long>(tokens), static_cast<long long>(kv_heads), static_cast<long long>(q_heads),
              static_cast<long long>(head_dim), static_cast<long long>(window), static_cast<long long>(keep_per_head));
  std::printf("kv head  sharpness  uniform: kept  ‖Δout‖₂   Ada-KV: kept  ‖Δout‖₂\n");
  const std::int64_t group = q_heads / kv_heads;
  double uniform_total = 0.0, adaptive_total = 0.0;
  for (std::int64_t h = 0; h < kv_heads; ++h) {
    std::vector<float> want, got_uniform, got_adaptive;
    for (std::int64_t j = h * group; j < (h + 1) * group; ++j) {
      want.insert(want.end(), full.begin() + j * head_dim, full.begin() + (j + 1) * head_dim);
      got_uniform.insert(got_uniform.end(), uniform.begin() + j * head_dim, uniform.begin() + (j + 1) * head_dim);
      const auto out = attend(decode_queries, keys, values, j, kept.data() + offsets[h], offsets[h + 1] - offsets[h]);
      got_adaptive.insert(got_adaptive.end(), out.begin(), out.end());
    }
    const double e_uniform = output_error(got_uniform, want), e_adaptive = output_error(got_adaptive, want);
    uniform_total += e_uniform * e_uniform;
    adaptive_total += e_adaptive * e_adaptive;
    std::printf("%7lld  %9.2f  %13lld  %8.4f   %12d  %8.4f\n", static_cast<long long>(h), 0.05 + 0.35 * static_cast<double>(h),
                static_cast<long long>(keep_per_head), e_uniform, counts[h], e_adaptive);
  }
  std::printf("\nlayer output error ‖Δout‖₂ over all heads: uniform %.4f, Ada-KV %.4f (both keep %lld tokens)\n",
              std::sqrt(uniform_total), std::sqrt(adaptive_total),
              static_cast<long long>(offsets[kv_heads]));
  return 0;
}
