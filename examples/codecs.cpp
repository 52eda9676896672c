// examples/codecs.cpp — one cache stored in each codec.
//
// Builds one layer's keys and values with the structure real heads have (a few
// dominant directions; pre-RoPE keys of low rank, rotated by RoPE as an
// engine's cache holds them), stores the same 512-token prefill in every codec,
// and prints per codec: bytes per token and head, the ratio against fp16, the
// measured key/value reconstruction error, and the relative error of decode
// attention against an fp32 cache. Then the rank analysis of the heads (pre-
// and post-RoPE keys, values), and the comparison of pre- and post-RoPE
// low-rank bases at several ranks (docs/codecs.md quotes these numbers).
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <kvtrim/kvtrim.hpp>
#include <random>
#include <string>
#include <vector>

namespace kt = kvtrim;

namespace {

constexpr kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 128};
constexpr std::int64_t tokens = 512, batch = 1, data_rank = 24;
const kt::rope llama_rope{.theta = 10000.0, .rotary_dim = 0, .pairs = kt::rope::pairing::half_split};

struct layer_data {
  std::vector<float> pre_keys, keys, values,
      queries;  // [1, H, T, D] ×3, [1, Hq, D]
  kt::kv_view<const float> view(const std::vector<float>& x) const {
    return kt::make_view(x.data(), std::array<std::int64_t, 4>{batch, shape.kv_heads, tokens, shape.head_dim});
  }
  kt::query_view<const float> query_view() const {
    return kt::make_view(queries.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim});
  }
};

/// Rows z·W with a spectrum falling as 0.9^j over `data_rank` directions per kv
/// head, plus noise 0.05; keys get RoPE at their positions, queries (drawn from
/// the same directions as their kv head's keys) at position `tokens`.
layer_data make_layer() {
  std::mt19937_64 random(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::int64_t dim = shape.head_dim;
  layer_data data;
  data.pre_keys.resize(static_cast<std::size_t>(shape.kv_heads * tokens * dim));
  data.values.resize(data.pre_keys.size());
  data.queries.resize(static_cast<std::size_t>(shape.q_heads * dim));
  const auto directions = [&] {
    Eigen::MatrixXf w(data_rank, dim);
    for (std::int64_t j = 0; j < data_rank; ++j)
      for (std::int64_t d = 0; d < dim; ++d) w(j, d) = normal(random) * std::pow(0.9f, static_cast<float>(j));
    return w;
  };
  const auto row = [&](const Eigen::MatrixXf& w, float* out) {
    Eigen::RowVectorXf z(data_rank);
    for (auto& x : z) x = normal(random);
    const Eigen::RowVectorXf x = z * w;
    for (std::int64_t d = 0; d < dim; ++d) out[d] = x(d) + 0.05f * normal(random);
  };
  for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
    const Eigen::MatrixXf key_w = directions(), value_w = directions();
    for (std::int64_t t = 0; t < tokens; ++t) {
      row(key_w, &data.pre_keys[static_cast<std::size_t>((h * tokens + t) * dim)]);
      row(value_w, &data.values[static_cast<std::size_t>((h * tokens + t) * dim)]);
    }
    for (std::int64_t j = h * shape.group_size(); j < (h + 1) * shape.group_size(); ++j) {
      float* q = &data.queries[static_cast<std::size_t>(j * dim)];
      row(key_w, q);
      for (std::int64_t d = 0; d < dim; ++d) q[d] *= 0.3f;  // softmax neither flat nor one-hot
      llama_rope.apply(q, dim, tokens);
    }
  }
  data.keys = data.pre_keys;
  for (std::int64_t h = 0; h < shape.kv_heads; ++h)
    for (std::int64_t t = 0; t < tokens; ++t)
      llama_rope.apply(&data.keys[static_cast<std::size_t>((h * tokens + t) * dim)], dim, t);
  return data;
}

template <class Codec>
using scheme_for =
    kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

/// Compresses the whole prefill (every token kept) into a `Codec` cache, then
/// attends.
template <class Codec>
struct stored_layer {
  typename scheme_for<Codec>::cache cache;
  std::vector<float> out;
  kt::cache_stats stats;

  stored_layer(const layer_data& data, const typename Codec::config& codec_config, bool pre_rope = false)
      : cache(scheme_for<Codec>::make_cache(shape, batch, tokens, codec_config)),
        out(static_cast<std::size_t>(shape.q_heads * shape.head_dim)) {
    using scheme = scheme_for<Codec>;
    typename scheme::config cfg;
    cfg.budget.keep = kt::keep_tokens{tokens};
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
    const auto& stored_keys = pre_rope ? data.pre_keys : data.keys;
    scheme::compress(data.view(stored_keys), data.view(data.values), cache.view(), cfg,
                     {scratch.data(), scratch.size()});
    scheme::attend(data.query_view(), cache.view(),
                   kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim}), {});
    // Errors against what attention must see: post-RoPE keys.
    stats = kt::stats(cache.view(), codec_config, data.view(data.keys), data.view(data.values));
  }
};

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double difference = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    difference += std::pow(got[i] - want[i], 2);
    norm += std::pow(want[i], 2);
  }
  return std::sqrt(difference / norm);
}

double mean(const std::vector<kt::head_stats>& heads, double kt::head_stats::*member) {
  double sum = 0.0;
  for (const auto& head : heads) sum += head.*member;
  return sum / static_cast<double>(heads.size());
}

/// Share of each query head's 8 highest-scoring exact tokens that are also
/// among its 8 highest scores through the codec's decoded keys ("exact
/// recall").
template <class Codec>
double top8_recall(const stored_layer<Codec>& layer, const layer_data& data) {
  double found = 0.0;
  std::vector<float> key(static_cast<std::size_t>(shape.head_dim));
  for (std::int64_t j = 0; j < shape.q_heads; ++j) {
    const std::int64_t h = j / shape.group_size();
    const float* q = &data.queries[static_cast<std::size_t>(j * shape.head_dim)];
    std::vector<std::pair<float, std::int64_t>> exact, approximate;
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float* k = &data.keys[static_cast<std::size_t>((h * tokens + t) * shape.head_dim)];
      Codec::load_key(layer.cache.view().storage, h, layer.cache.view().slot(0, h, t),
                      kt::codec::position_of(layer.cache.view(), 0, h, t), key.data());
      float exact_dot = 0.0f, approximate_dot = 0.0f;
      for (std::int64_t d = 0; d < shape.head_dim; ++d) {
        exact_dot += q[d] * k[d];
        approximate_dot += q[d] * key[static_cast<std::size_t>(d)];
      }
      exact.emplace_back(-exact_dot, t);
      approximate.emplace_back(-approximate_dot, t);
    }
    std::partial_sort(exact.begin(), exact.begin() + 8, exact.end());
    std::partial_sort(approximate.begin(), approximate.begin() + 8, approximate.end());
    for (int a = 0; a < 8; ++a)
      for (int b = 0; b < 8; ++b) found += exact[a].second == approximate[b].second ? 1.0 : 0.0;
  }
  return found / (8.0 * static_cast<double>(shape.q_heads));
}

}  // namespace

int main() {
  const layer_data data = make_layer();
  const stored_layer<kt::codec::fp32> reference(data, {});

  std::printf(
      "One layer: %lld tokens, %lld kv heads (GQA group %lld), "
      "head_dim %lld; every token kept.\n\n",
      static_cast<long long>(tokens), static_cast<long long>(shape.kv_heads),
      static_cast<long long>(shape.group_size()), static_cast<long long>(shape.head_dim));
  std::printf("%-34s %10s %8s %10s %10s %11s\n", "codec", "B/token", "vs fp16", "key err", "value err", "attn err");
  const auto report = [&](const char* label, const auto& layer) {
    const double per_token = layer.stats.bytes() / static_cast<double>(layer.stats.kept());
    std::printf("%-34s %10.1f %8.3f %10.2e %10.2e %11.2e\n", label, per_token, layer.stats.ratio(),
                mean(layer.stats.heads, &kt::head_stats::key_error),
                mean(layer.stats.heads, &kt::head_stats::value_error), relative_error(layer.out, reference.out));
  };
  report("fp16", stored_layer<kt::codec::fp16>(data, {}));
  report("bf16", stored_layer<kt::codec::bf16>(data, {}));
  report("int8 (KIVI key groups of 32)", stored_layer<kt::codec::int8>(data, {}));
  report("int8 per-token, asymmetric",
         stored_layer<kt::codec::int8>(data, {.keys = kt::codec::key_scaling::per_token, .asymmetric = true}));
  report("int4 (key groups of 32, asym.)", stored_layer<kt::codec::int4>(data, {.asymmetric = true}));
  report("fp8 e4m3 (per-head scales)", stored_layer<kt::codec::fp8>(data, {}));
  report("low_rank post-RoPE (0.98, r<=32)",
         stored_layer<kt::codec::low_rank>(data, {.max_rank = 32, .update_freq = 0}));
  report(
      "low_rank pre-RoPE (0.98, r<=32)",
      stored_layer<kt::codec::low_rank>(
          data, {.max_rank = 32, .update_freq = 0, .keys = kt::codec::key_space::pre_rope, .rope = llama_rope}, true));
  report("layered: 4+128 fp16, int4 rest",
         stored_layer<kt::codec::layered<kt::codec::int4>>(data, {.inner = {.asymmetric = true}}));
  report(
      "layered: 4+128 fp16, low_rank r=24",
      stored_layer<kt::codec::layered<kt::codec::low_rank>>(
          data, {.inner = {.rank = 24, .update_freq = 0, .keys = kt::codec::key_space::pre_rope, .rope = llama_rope}},
          true));

  std::printf(
      "\n(B/token: bytes per token per kv head, per-head state "
      "included; errors are relative L2.)\n");
  std::printf("\nRank analysis of the heads, pre-RoPE keys:\n%s",
              kt::analysis::rank_table(kt::analysis::analyze_heads(data.view(data.pre_keys))).c_str());
  std::printf("post-RoPE keys:\n%s",
              kt::analysis::rank_table(kt::analysis::analyze_heads(data.view(data.keys))).c_str());
  std::printf("values:\n%s", kt::analysis::rank_table(kt::analysis::analyze_heads(data.view(data.values))).c_str());

  std::printf(
      "\nPre- vs post-RoPE bases at a fixed rank (keys only differ; "
      "values use the same bases):\n");
  std::printf("%6s | %10s %10s %8s | %10s %10s %8s\n", "rank", "post: key", "attn", "top-8", "pre: key", "attn",
              "top-8");
  for (std::int64_t rank : {8, 16, 24, 32, 48, 64, 96}) {
    const stored_layer<kt::codec::low_rank> post(data, {.rank = rank, .update_freq = 0});
    const stored_layer<kt::codec::low_rank> pre(
        data, {.rank = rank, .update_freq = 0, .keys = kt::codec::key_space::pre_rope, .rope = llama_rope}, true);
    std::printf("%6lld | %10.2e %10.2e %8.3f | %10.2e %10.2e %8.3f\n", static_cast<long long>(rank),
                mean(post.stats.heads, &kt::head_stats::key_error), relative_error(post.out, reference.out),
                top8_recall(post, data), mean(pre.stats.heads, &kt::head_stats::key_error),
                relative_error(pre.out, reference.out), top8_recall(pre, data));
  }
  const float concentration_example[6] = {0.6f, 0.2f, 0.1f, 0.05f, 0.03f, 0.02f};
  std::printf(
      "\nAda-KV concentration of a head with attention {0.6, 0.2, 0.1, "
      "0.05, 0.03, 0.02}: %.3f of its tokens "
      "hold 90%% of the mass\n",
      kt::attention_concentration(concentration_example, 6));
  return 0;
}
