// RazorAttention end to end: probe → (attention maps) → calibration profile →
// compress → attend.
//
// 1. kvtrim generates the probe (BOS + N random ids repeated R times) for the
//    engine to run. Here a stand-in "model" produces the attention maps an
//    engine would capture: a few heads are induction or echo heads, the rest
//    attend locally.
// 2. The calibration reads those maps row block by row block, scores every
//    (layer, kv head) and picks the retrieval heads; the result is saved as a
//    profile file and loaded back, checked against the model's signature.
// 3. At prefill, one layer is compressed into a paged cache: retrieval heads
//    keep everything, the others sinks + recent window + one compensation
//    token; decode attention runs over it.
// Usage: razor_calibrate [profile.json]
#include <kvtrim/kvtrim.hpp>
#include <kvtrim/io/profile.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace kt = kvtrim;
using razor = kt::score::retrieval_head;

namespace {

/// The stand-in model's attention on the probe for (layer, q head), rows [first, first + rows).
/// Induction heads put 60% of each row on the tokens after earlier copies of the
/// current token, echo heads on the copies themselves; everything else decays with distance.
void probe_attention(const razor::probe_config& probe, int kind, std::int64_t first, std::int64_t rows, float* out) {
  const std::int64_t length = probe.length(), block = probe.block;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t p = first + r;
    float* row = out + r * length;
    const std::int64_t copies = p > block ? (p - 1) / block : 0;
    const float planted = kind != 0 && copies > 0 ? 0.6f : 0.0f;
    double total = 0.0;
    for (std::int64_t j = 0; j <= p; ++j) total += std::exp(-0.5 * static_cast<double>(p - j));
    for (std::int64_t j = 0; j < length; ++j)
      row[j] = j <= p ? static_cast<float>((1.0 - planted) * std::exp(-0.5 * static_cast<double>(p - j)) / total) : 0.0f;
    for (std::int64_t k = 1; k <= copies && planted > 0.0f; ++k)
      row[p - k * block + (kind == 1 ? 1 : 0)] += planted / static_cast<float>(copies);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "razor_profile.json";
  const kt::io::model_signature model{
      .layers = 4, .shape = {.q_heads = 8, .kv_heads = 4, .head_dim = 64}, .encoding = kt::io::positions::rope};
  const kt::model_shape& shape = model.shape;

  // ---- 1. the probe (short here; the paper's N = 2500, R = 4 are the defaults) ----
  const razor::probe_config probe{.block = 128, .repeats = 4, .seed = 7};
  const std::vector<std::int32_t> tokens = razor::make_probe(probe);
  std::printf("probe: %zu tokens (BOS + %lld ids x %lld)\n", tokens.size(), static_cast<long long>(probe.block),
              static_cast<long long>(probe.repeats));

  // ---- 2. calibration from the captured attention, 64 rows at a time ----
  const auto kind_of = [](std::int64_t layer, std::int64_t q) {  // 1 induction, 2 echo, 0 local
    if ((layer == 1 && q == 2) || (layer == 3 && q == 7)) return 1;
    if (layer == 2 && q == 4) return 2;
    return 0;
  };
  razor::calibration calibration(model.layers, shape, probe);
  const std::int64_t length = probe.length(), chunk = 64;
  std::vector<float> rows(static_cast<std::size_t>(shape.q_heads * chunk * length));
  for (std::int64_t layer = 0; layer < model.layers; ++layer)
    for (std::int64_t first = 0; first < length; first += chunk) {
      const std::int64_t count = std::min(chunk, length - first);
      for (std::int64_t q = 0; q < shape.q_heads; ++q)
        probe_attention(probe, kind_of(layer, q), first, count, rows.data() + q * count * length);
      calibration.accumulate(layer,
                             kt::tensor_view<const float, 3>(kt::make_view(
                                 rows.data(), std::array<std::int64_t, 3>{shape.q_heads, count, length})),
                             first);
    }
  // 16 (layer, kv head) pairs: 2/16 by induction, 1/16 by echo (the paper: 14% and 1% of many more heads).
  const razor::selection_config selection{.induction_fraction = 0.125, .echo_fraction = 0.0625};
  auto profile = kt::io::profile::for_model(model);
  profile.set_retrieval_heads(calibration.scores(), selection, probe);
  kt::io::save_profile(profile, path);
  const kt::io::profile loaded = kt::io::load_profile(path, model);
  std::printf("profile %s: retrieval heads", path.c_str());
  for (std::int64_t layer = 0; layer < model.layers; ++layer)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      if (loaded.layers[static_cast<std::size_t>(layer)].retrieval[static_cast<std::size_t>(h)])
        std::printf(" (layer %lld, kv head %lld)", static_cast<long long>(layer), static_cast<long long>(h));
  std::printf("\n");

  // ---- 3. compress layer 1 of a 4096-token prefill into a paged cache, then attend ----
  using scheme = kt::scheme<kt::layout::paged, razor, kt::budget::by_scorer, kt::codec::fp16, kt::backend::cpu>;
  const std::int64_t batch = 1, prefill = 4096;
  scheme::config cfg;
  cfg.score = loaded.retrieval_config(1);
  cfg.score.min_recent = 512;  // a short demo context; the paper's 4000 applies to long ones
  std::mt19937 random(1);
  std::normal_distribution<float> normal;
  std::vector<kt::half> keys(static_cast<std::size_t>(batch * shape.kv_heads * prefill * shape.head_dim));
  std::vector<kt::half> values(keys.size());
  for (auto& x : keys) x = kt::half(normal(random));
  for (auto& x : values) x = kt::half(normal(random));
  const std::array<std::int64_t, 4> extents{batch, shape.kv_heads, prefill, shape.head_dim};
  auto cache = scheme::make_cache(shape, batch, kt::layout::paged::pool_size{.pages = 4 * prefill / 16 + 64},
                                  scheme::codec::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, prefill, cfg));
  scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});

  std::vector<float> query(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim));
  for (auto& x : query) x = normal(random);
  std::vector<float> out(query.size());
  const std::array<std::int64_t, 3> q_extents{batch, shape.q_heads, shape.head_dim};
  scheme::attend(kt::make_view(query.data(), q_extents), cache.view(), kt::make_view(out.data(), q_extents),
                 kt::workspace{});

  // Attention over the whole prefill (double), to see what compression costs.
  const auto relative_error = [&](const std::vector<float>& got) {
    double difference = 0.0, norm = 0.0;
    const std::int64_t dim = shape.head_dim;
    for (std::int64_t j = 0; j < shape.q_heads; ++j) {
      const std::int64_t h = j / shape.group_size();
      std::vector<double> weights(static_cast<std::size_t>(prefill));
      double top = -1e300, sum = 0.0;
      for (std::int64_t t = 0; t < prefill; ++t) {
        double dot = 0.0;
        for (std::int64_t d = 0; d < dim; ++d)
          dot += double{query[static_cast<std::size_t>(j * dim + d)]} *
                 static_cast<double>(keys[static_cast<std::size_t>((h * prefill + t) * dim + d)]);
        weights[static_cast<std::size_t>(t)] = dot / std::sqrt(static_cast<double>(dim));
        top = std::max(top, weights[static_cast<std::size_t>(t)]);
      }
      for (auto& w : weights) sum += (w = std::exp(w - top));
      for (std::int64_t d = 0; d < dim; ++d) {
        double want = 0.0;
        for (std::int64_t t = 0; t < prefill; ++t)
          want += weights[static_cast<std::size_t>(t)] *
                  static_cast<double>(values[static_cast<std::size_t>((h * prefill + t) * dim + d)]) / sum;
        const double delta = static_cast<double>(got[static_cast<std::size_t>(j * dim + d)]) - want;
        difference += delta * delta;
        norm += want * want;
      }
    }
    return std::sqrt(difference / norm);
  };
  const double error_with = relative_error(out);
  cfg.score.compensation = false;  // the same compression without the compensation token
  scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});
  std::vector<float> out_without(out.size());
  scheme::attend(kt::make_view(query.data(), q_extents), cache.view(), kt::make_view(out_without.data(), q_extents),
                 kt::workspace{});
  std::printf("relative error of the layer's attention output vs the full cache: %.3f with the compensation "
              "token, %.3f without\n",
              error_with, relative_error(out_without));
  cfg.score.compensation = true;
  scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});

  std::int64_t kept = 0;
  for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
    kept += cache.view().head_length(0, h);
    std::printf("layer 1, kv head %lld: %lld of %lld tokens%s\n", static_cast<long long>(h),
                static_cast<long long>(cache.view().head_length(0, h)), static_cast<long long>(prefill),
                cfg.score.retrieval[static_cast<std::size_t>(h)] ? " (retrieval head)" : "");
  }
  std::printf("kept %.1f%% of the layer's tokens in %lld pages of 16\n",
              100.0 * static_cast<double>(kept) / static_cast<double>(prefill * shape.kv_heads),
              static_cast<long long>(cache.view().pages_in_use()));
  return 0;
}
