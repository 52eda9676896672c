// examples/quickstart.cpp — compress one layer's KV cache with StreamingLLM
// (attention sinks + the most recent tokens) at several ratios and see what it
// costs: bytes kept, and how far decode attention lands from the uncompressed cache.
//
// The keys imitate what a real model's cache looks like, in logits (q·k/√D):
//   - sinks: the first 4 tokens score about +8 for every query of their head
//     (they soak up half the attention whatever their content);
//   - heavy hitters: 8 tokens in the middle of the context score about +6.5;
//   - recency: a bias of +4·exp(−distance/256) toward the newest tokens;
//   - everything else: random keys, logits of spread about 0.5.
// StreamingLLM keeps the sinks and the recent tokens but not the heavy hitters
// in the middle, so its error grows as the budget shrinks: the gap that
// attention-guided scorers (SnapKV, H2O, Ada-KV) close.
//
// Run: scripts/demo (or build/cpu-release/examples/quickstart).
#include <kvtrim/kvtrim.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace kt = kvtrim;

namespace {

// One layer of a Llama-3-8B-like model: 32 query heads over 8 kv heads of 128.
constexpr kt::model_shape shape{.q_heads = 32, .kv_heads = 8, .head_dim = 128};
constexpr std::int64_t batch = 1, tokens = 4096, sinks = 4, heavy_hitters = 8;

struct layer_inputs {
  std::vector<kt::half> keys, values;  // [batch, kv_heads, tokens, head_dim], fp16 as an engine stores them
  std::vector<float> queries;          // [batch, q_heads, head_dim]: the next decode step
};

layer_inputs make_layer(std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal;
  const std::int64_t dim = shape.head_dim, group = shape.group_size();
  const float root_dim = std::sqrt(static_cast<float>(dim));
  const float query_strength = 4.0f;  // q = 4·u + noise, so q·u ≈ 4
  layer_inputs layer;
  layer.keys.resize(batch * shape.kv_heads * tokens * dim);
  layer.values.resize(layer.keys.size());
  layer.queries.resize(batch * shape.q_heads * dim);

  for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
    // The direction this head's queries point along (a unit vector).
    std::vector<float> direction(dim);
    float norm = 0.0f;
    for (auto& x : direction) {
      x = normal(random);
      norm += x * x;
    }
    for (auto& x : direction) x /= std::sqrt(norm);

    std::vector<std::int64_t> heavy(heavy_hitters);
    for (auto& position : heavy) position = 64 + static_cast<std::int64_t>(random() % (tokens - 1024));

    for (std::int64_t i = 0; i < tokens; ++i) {
      // Target logit offset along the head's direction (k += c·√D/|q·u| · u gives q·k/√D ≈ c).
      float logit = 4.0f * std::exp(-static_cast<float>(tokens - 1 - i) / 256.0f);
      if (i < sinks) logit = 8.0f;
      for (const auto position : heavy)
        if (position == i) logit = 6.5f;
      const float along = logit * root_dim / query_strength;
      for (std::int64_t d = 0; d < dim; ++d) {
        const std::int64_t index = (h * tokens + i) * dim + d;
        layer.keys[index] = kt::half(normal(random) + along * direction[d]);
        layer.values[index] = kt::half(normal(random));
      }
    }
    for (std::int64_t j = h * group; j < (h + 1) * group; ++j)
      for (std::int64_t d = 0; d < dim; ++d)
        layer.queries[j * dim + d] = query_strength * direction[d] + 0.3f * normal(random);
  }
  return layer;
}

using streaming_llm = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform,
                                 kt::codec::fp16, kt::backend::cpu>;

/// Compresses the layer to `ratio` of its tokens and attends the decode queries.
/// Returns the output and the bytes the compressed cache occupies.
std::vector<float> compress_and_attend(const layer_inputs& layer, double ratio, std::size_t& cache_bytes,
                                       std::int64_t& kept) {
  streaming_llm::config cfg;  // 4 sinks (the paper's default)
  cfg.budget.keep = kt::keep_ratio{ratio};
  kept = kt::budget::uniform::max_keep(cfg.budget, tokens);
  auto cache = streaming_llm::make_cache(shape, batch, kept, kt::codec::fp16::config{});  // capacity = what is kept

  std::vector<std::byte> scratch(streaming_llm::compress_workspace(shape, batch, tokens, cfg));
  const std::array<std::int64_t, 4> kv_extents{batch, shape.kv_heads, tokens, shape.head_dim};
  streaming_llm::compress(kt::make_view(layer.keys.data(), kv_extents), kt::make_view(layer.values.data(), kv_extents),
                          cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});

  std::vector<float> out(layer.queries.size());
  const std::array<std::int64_t, 3> query_extents{batch, shape.q_heads, shape.head_dim};
  streaming_llm::attend(kt::make_view(layer.queries.data(), query_extents), cache.view(),
                        kt::make_view(out.data(), query_extents), kt::workspace{});
  cache_bytes = cache.bytes();
  return out;
}

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double difference = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    difference += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(difference / norm);
}

}  // namespace

int main() {
  const layer_inputs layer = make_layer(2024);
  std::size_t full_bytes = 0;
  std::int64_t full_kept = 0;
  const std::vector<float> full = compress_and_attend(layer, 1.0, full_bytes, full_kept);

  std::printf("kvtrim quickstart: StreamingLLM (4 sinks + recent), one layer of %lld tokens,\n"
              "%lld query heads over %lld kv heads of %lld, fp16 cache, fp32 attention\n\n",
              static_cast<long long>(tokens), static_cast<long long>(shape.q_heads),
              static_cast<long long>(shape.kv_heads), static_cast<long long>(shape.head_dim));
  std::printf("%10s  %12s  %14s  %10s  %22s\n", "keep ratio", "tokens/head", "KV bytes", "of full", "attention rel. error");
  for (const double ratio : {1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125}) {
    std::size_t bytes = 0;
    std::int64_t kept = 0;
    const std::vector<float> out = compress_and_attend(layer, ratio, bytes, kept);
    std::printf("%10.4g  %12lld  %14zu  %9.1f%%  %22.4f\n", ratio, static_cast<long long>(kept), bytes,
                100.0 * static_cast<double>(bytes) / static_cast<double>(full_bytes), relative_error(out, full));
  }
  std::printf("\nrel. error = ||out - out_full||_2 / ||out_full||_2 over all %lld query heads.\n",
              static_cast<long long>(shape.q_heads));
  return 0;
}
