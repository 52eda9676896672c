// kvtrim's kvpress-compatible configurations (kvtrim/kvpress.hpp) against
// brute-force re-implementations of kvpress v0.5.4's formulas, written here in
// double precision line by line from its presses (snapkv_press.py, scorer_press.py,
// streaming_llm_press.py, knorm_press.py, observed_attention_press.py,
// adakv_press.py, pyramidkv_press.py). The comparison with kvpress itself (torch)
// is tests/kvpress/compare_kvpress.py.
//
// Kept sets are compared exactly. kvpress's torch.topk breaks ties in no stated
// order; on these random inputs the only ties are the protected window (all
// "max + 1") and the AdaKV safeguard ("finfo.max"), which are kept whole.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/policy_oracle.hpp"
#include "common/tensors.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

struct press_inputs {
  model_shape shape;
  std::int64_t batch, tokens;
  host_tensor<float, 4> keys, values, queries;  // queries: all T (ObservedAttention) — SnapKV reads the last w
};

press_inputs make(model_shape shape, std::int64_t batch, std::int64_t tokens, std::uint64_t seed) {
  return {shape,
          batch,
          tokens,
          random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed),
          random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed + 1),
          random_tensor<float, 4>({batch, shape.q_heads, tokens, shape.head_dim}, seed + 2)};
}

/// The full causal attention matrix A[b, q_head, i, j] (eager attention), double.
std::vector<double> eager_attentions(const press_inputs& in) {
  const std::int64_t T = in.tokens, Hq = in.shape.q_heads, G = in.shape.group_size();
  std::vector<double> a(static_cast<std::size_t>(in.batch * Hq * T * T), 0.0);
  for (std::int64_t b = 0; b < in.batch; ++b)
    for (std::int64_t q = 0; q < Hq; ++q)
      for (std::int64_t i = 0; i < T; ++i) {
        const auto row = attention_row(in.keys.cview(), in.queries.cview(), b, q / G, q, i);
        for (std::int64_t j = 0; j <= i; ++j)
          a[static_cast<std::size_t>(((b * Hq + q) * T + i) * T + j)] = row[static_cast<std::size_t>(j)];
      }
  return a;
}

/// ScorerPress.compress: scores.topk(n_kept) per (b, h) — sets, ascending.
kept_sets scorer_press_topk(const score_table& scores, const table_shape& s, std::int64_t n_kept) {
  return top_k_sets(scores, s, std::vector<std::int64_t>(static_cast<std::size_t>(s.batch * s.heads), n_kept));
}

std::int64_t n_kept_of(std::int64_t T, double cr) { return static_cast<std::int64_t>(static_cast<double>(T) * (1 - cr)); }

/// SnapKVPress.score: softmax over ALL keys (causal in the window), slice off the
/// window's keys, mean over the window, avg_pool1d(count_include_pad), group mean,
/// then pad the window with scores.max() + 1 (the max over the whole tensor).
score_table kvpress_snapkv(const press_inputs& in, std::int64_t w, std::int64_t kernel) {
  const auto a = eager_attentions(in);  // its last w rows are compute_window_attention's
  const std::int64_t T = in.tokens, n = T - w, Hq = in.shape.q_heads, G = in.shape.group_size(), H = in.shape.kv_heads;
  std::vector<double> pooled(static_cast<std::size_t>(in.batch * Hq * n));
  for (std::int64_t b = 0; b < in.batch; ++b)
    for (std::int64_t q = 0; q < Hq; ++q) {
      std::vector<double> mean(static_cast<std::size_t>(n), 0.0);
      for (std::int64_t i = T - w; i < T; ++i)
        for (std::int64_t j = 0; j < n; ++j) mean[static_cast<std::size_t>(j)] += a[static_cast<std::size_t>(((b * Hq + q) * T + i) * T + j)] / static_cast<double>(w);
      for (std::int64_t j = 0; j < n; ++j) {
        double sum = 0.0;
        for (std::int64_t i = j - kernel / 2; i <= j + kernel / 2; ++i) sum += i >= 0 && i < n ? mean[static_cast<std::size_t>(i)] : 0.0;
        pooled[static_cast<std::size_t>((b * Hq + q) * n + j)] = sum / static_cast<double>(kernel);
      }
    }
  score_table scores(static_cast<std::size_t>(in.batch * H * T));
  double top = -infinity;
  for (std::int64_t b = 0; b < in.batch; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = 0; j < n; ++j) {
        double sum = 0.0;
        for (std::int64_t g = 0; g < G; ++g) sum += pooled[static_cast<std::size_t>((b * Hq + h * G + g) * n + j)];
        top = std::max(top, scores[static_cast<std::size_t>((b * H + h) * T + j)] = sum / static_cast<double>(G));
      }
  for (std::int64_t b = 0; b < in.batch; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = n; j < T; ++j) scores[static_cast<std::size_t>((b * H + h) * T + j)] = top + 1;
  return scores;
}

/// ObservedAttentionPress.score: attentions.sum(2) / arange(T, 0, -1), group mean.
score_table kvpress_observed(const press_inputs& in) {
  const auto a = eager_attentions(in);
  const std::int64_t T = in.tokens, Hq = in.shape.q_heads, G = in.shape.group_size(), H = in.shape.kv_heads;
  score_table scores(static_cast<std::size_t>(in.batch * H * T), 0.0);
  for (std::int64_t b = 0; b < in.batch; ++b)
    for (std::int64_t q = 0; q < Hq; ++q)
      for (std::int64_t j = 0; j < T; ++j) {
        double sum = 0.0;
        for (std::int64_t i = 0; i < T; ++i) sum += a[static_cast<std::size_t>(((b * Hq + q) * T + i) * T + j)];
        scores[static_cast<std::size_t>((b * H + q / G) * T + j)] += sum / static_cast<double>(T - j) / static_cast<double>(G);
      }
  return scores;
}

/// AdaKVPress.compress: protect each head's top n_safe = int(n_kept·α) (finfo.max),
/// then remove the bottom H·(T − n_kept) across the heads of each sequence.
kept_sets kvpress_adakv(score_table scores, const table_shape& s, double cr, double alpha) {
  const std::int64_t n_kept = n_kept_of(s.tokens, cr);
  const auto n_safe = static_cast<std::int64_t>(static_cast<double>(n_kept) * alpha);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const auto order = rank_order(scores, s, b, h);
      for (std::int64_t i = 0; i < n_safe; ++i) scores[s.at(b, h, order[static_cast<std::size_t>(i)])] = std::numeric_limits<float>::max();
    }
  kept_sets kept(static_cast<std::size_t>(s.batch * s.heads));
  for (std::int64_t b = 0; b < s.batch; ++b) {
    std::vector<std::int64_t> flat(static_cast<std::size_t>(s.heads * s.tokens));
    std::iota(flat.begin(), flat.end(), 0);
    std::stable_sort(flat.begin(), flat.end(), [&](std::int64_t x, std::int64_t y) {
      return scores[s.at(b, 0, x)] < scores[s.at(b, 0, y)];  // bottom-k: ascending
    });
    const std::int64_t n_pruned = s.heads * (s.tokens - n_kept);
    for (std::size_t i = static_cast<std::size_t>(n_pruned); i < flat.size(); ++i)
      kept[static_cast<std::size_t>(b * s.heads + flat[i] / s.tokens)].push_back(flat[i] % s.tokens);
    for (std::int64_t h = 0; h < s.heads; ++h)
      std::sort(kept[static_cast<std::size_t>(b * s.heads + h)].begin(), kept[static_cast<std::size_t>(b * s.heads + h)].end());
  }
  return kept;
}

/// PyramidKVPress.get_layer_budget, as its Python computes it.
std::int64_t kvpress_pyramid_budget(std::int64_t q_len, double cr, std::int64_t window, double beta,
                                    std::int64_t layers, std::int64_t layer) {
  const auto python_round = [](double x) { return static_cast<std::int64_t>(std::nearbyint(x)); };  // half to even
  const double capacity = static_cast<double>(window) + static_cast<double>(q_len) * (1 - cr);
  double min_num = (capacity - static_cast<double>(window)) / beta;
  double max_num = (capacity - static_cast<double>(window)) * 2 - min_num;
  if (max_num >= static_cast<double>(q_len - window)) {
    max_num = static_cast<double>(q_len - window);
    min_num = (capacity - static_cast<double>(window)) * 2 - max_num;
  }
  if (!(static_cast<double>(q_len) >= max_num && max_num >= min_num && min_num >= static_cast<double>(window)))
    return python_round(static_cast<double>(q_len) * (1 - cr));
  const double steps = (max_num - min_num) / static_cast<double>(layers - 1);
  return python_round(max_num - static_cast<double>(layer) * steps);
}

template <class Scorer, class Budget>
kept_sets kvtrim_sets(const press_inputs& in, const typename Scorer::config& score_cfg,
                      const typename Budget::config& budget_cfg, std::int64_t observed) {
  const tensor_view<const float, 4> q{in.queries.view.data + (in.tokens - observed) * in.shape.head_dim,
                                      {in.batch, in.shape.q_heads, observed, in.shape.head_dim}, in.queries.view.strides};
  return run_selection<Scorer, Budget>(score_cfg, budget_cfg, in.shape, in.keys.cview(), in.values.cview(), q).kept;
}

const std::vector<model_shape> shapes = {{8, 2, 16}, {4, 4, 8}, {4, 1, 16}};

TEST(KvpressCompat, SnapKVPress) {
  for (const auto& shape : shapes)
    for (double cr : {0.25, 0.5, 0.8}) {
      const auto in = make(shape, 2, 70, 40 + static_cast<std::uint64_t>(shape.q_heads));
      const table_shape s{2, shape.kv_heads, 70};
      EXPECT_EQ((kvtrim_sets<score::snapkv, budget::uniform>(in, kvpress::snapkv(8, 5), kvpress::scorer_press(cr), 8)),
                scorer_press_topk(kvpress_snapkv(in, 8, 5), s, n_kept_of(70, cr)))
          << cr;
    }
}

TEST(KvpressCompat, StreamingLLMPress) {
  const auto in = make({4, 2, 8}, 1, 37, 3);
  for (double cr : {0.1, 0.5, 0.85}) {
    // scores = 1, except 0 on [n_sink, n_sink + n_pruned)
    const std::int64_t n_pruned = 37 - n_kept_of(37, cr);
    kept_sets want;
    for (int h = 0; h < 2; ++h) {
      std::vector<std::int64_t> set;
      for (std::int64_t j = 0; j < 37; ++j)
        if (j < 4 || j >= 4 + n_pruned) set.push_back(j);
      want.push_back(set);
    }
    EXPECT_EQ((kvtrim_sets<score::static_window, budget::uniform>(in, kvpress::streaming_llm(4), kvpress::scorer_press(cr), 0)),
              want);
  }
}

TEST(KvpressCompat, KnormPress) {
  for (const auto& shape : shapes) {
    const auto in = make(shape, 2, 45, 9);
    EXPECT_EQ((kvtrim_sets<score::key_norm, budget::uniform>(in, kvpress::knorm(), kvpress::scorer_press(0.3), 0)),
              scorer_press_topk(key_norm_scores(in.keys.cview()), {2, shape.kv_heads, 45}, n_kept_of(45, 0.3)));
  }
}

TEST(KvpressCompat, ObservedAttentionPress) {
  for (const auto& shape : shapes) {
    const auto in = make(shape, 2, 30, 21);
    EXPECT_EQ((kvtrim_sets<score::h2o, budget::uniform>(in, kvpress::observed_attention(), kvpress::scorer_press(0.6), 30)),
              scorer_press_topk(kvpress_observed(in), {2, shape.kv_heads, 30}, n_kept_of(30, 0.6)));
  }
}

TEST(KvpressCompat, AdaKVPressOverSnapKVAndKnorm) {
  for (const auto& shape : shapes)
    for (double cr : {0.3, 0.7}) {
      const auto in = make(shape, 2, 80, 60 + static_cast<std::uint64_t>(shape.kv_heads));
      const table_shape s{2, shape.kv_heads, 80};
      const auto want_snapkv = kvpress_adakv(kvpress_snapkv(in, 8, 5), s, cr, 0.2);
      EXPECT_EQ((kvtrim_sets<score::snapkv, budget::adaptive>(in, kvpress::snapkv(8, 5), kvpress::adakv(cr), 8)),
                want_snapkv);
      EXPECT_EQ((kvtrim_sets<score::key_norm, budget::adaptive>(in, kvpress::knorm(), kvpress::adakv(cr, 0.5), 0)),
                kvpress_adakv(key_norm_scores(in.keys.cview()), s, cr, 0.5));
    }
}

TEST(KvpressCompat, PyramidKVPress) {
  const model_shape shape{4, 2, 8};
  const auto in = make(shape, 1, 400, 77);
  const table_shape s{1, 2, 400};
  const auto scores = kvpress_snapkv(in, 8, 5);
  for (std::int64_t layer : {0, 3, 7}) {
    const std::int64_t n = kvpress_pyramid_budget(400, 0.5, 8, 20, 8, layer);
    EXPECT_EQ(budget::pyramid::layer_keep(kvpress::pyramidkv(0.5, layer, 8, 8), 400), n);
    EXPECT_EQ((kvtrim_sets<score::snapkv, budget::pyramid>(in, kvpress::snapkv(8, 5), kvpress::pyramidkv(0.5, layer, 8, 8), 8)),
              scorer_press_topk(scores, s, n))
        << layer;
  }
  // A sweep of the schedule alone, fallback included.
  for (std::int64_t T : {100, 1000, 4096, 7777})
    for (double cr : {0.1, 0.5, 0.75, 0.9})
      for (std::int64_t layers : {2, 32})
        for (std::int64_t layer = 0; layer < layers; layer += 5)
          EXPECT_EQ(budget::pyramid::layer_keep(kvpress::pyramidkv(cr, layer, layers), T),
                    std::clamp<std::int64_t>(kvpress_pyramid_budget(T, cr, 64, 20, layers, layer), 1, T))
              << T << " " << cr << " " << layers << " " << layer;
}

TEST(KvpressCompat, RejectsCompressionRatiosKvpressRejects) {
  EXPECT_THROW(kvpress::keep(1.0), kvtrim::error);
  EXPECT_THROW(kvpress::keep(-0.1), kvtrim::error);
  EXPECT_NO_THROW(kvpress::keep(0.0));
}

}  // namespace
