// examples/demo.cpp — what kvtrim is for, in one table: four ways to keep part of a
// layer's KV cache, side by side at several kept fractions, with the bytes each
// holds and how far decode attention lands from the uncompressed cache.
//
// The layer (one Llama-3-8B-like layer: 32 query heads over 8 kv heads of 128,
// 4096 prompt tokens, fp16 cache) is built to have the structure real caches have,
// in logits q·k/√D along each head's query direction:
//   - sinks: the first 4 tokens score +8 in every head;
//   - recency: +4·exp(−distance/256) toward the newest tokens;
//   - local heads (kv heads 0–2): nothing else;
//   - heavy hitters: sharp heads (3, 4) have 8 tokens at +7 somewhere in the middle,
//     diffuse heads (5, 7) 400 tokens at +3 — these need far more of the budget;
//   - a retrieval head (6): 24 tokens of a "fact" 3000 tokens back whose keys
//     point along a second direction; the prompt's last queries (SnapKV's window)
//     do not look at it, the next decode query does — the question comes after.
// Policies (each a kvtrim scheme, compress then decode attention):
//   StreamingLLM    4 sinks + the most recent tokens               (contiguous, uniform)
//   SnapKV          the last 32 queries' pooled attention           (contiguous, uniform)
//   Ada-SnapKV      SnapKV's scores, one budget shared by the heads (flat: ragged heads)
//   RazorAttention  retrieval heads keep everything, the others 4 sinks + recent +
//                   one compensation token (flat). Its retrieval-head flags come from
//                   calibration on the model (examples/razor_calibrate.cpp); here
//                   they are given: kv head 6. Its kept fraction is set through the
//                   recent window; it cannot go below 1/8 (one head keeps all).
// Error: ‖out − out_full‖₂ / ‖out_full‖₂ (out_full: the same attention over every
// token) over the 28 query heads of the seven other kv heads, and over the retrieval
// head's 4 (does the answer survive?) — kept apart, since a head that lost what it
// looks for has an error near 1 or above and would hide the rest.
//
// Run: scripts/demo (or build/cpu-release/examples/demo).
#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace kt = kvtrim;

namespace {

constexpr kt::model_shape shape{.q_heads = 32, .kv_heads = 8, .head_dim = 128};
constexpr std::int64_t batch = 1, tokens = 4096, window = 32, sinks = 4;
constexpr std::int64_t retrieval_head = 6, fact_at = tokens - 3000, fact_tokens = 24;
constexpr double query_strength = 4.0;

struct layer_inputs {
  std::vector<kt::half> keys, values;  // [1, kv_heads, tokens, head_dim]
  std::vector<float> window_queries;   // [1, q_heads, window, head_dim]: the prompt's last queries
  std::vector<float> queries;          // [1, q_heads, head_dim]: the next decode step
};

std::vector<float> unit(std::mt19937_64& random, std::int64_t dim) {
  std::normal_distribution<float> normal;
  std::vector<float> u(static_cast<std::size_t>(dim));
  float norm = 0.0f;
  for (auto& x : u) {
    x = normal(random);
    norm += x * x;
  }
  for (auto& x : u) x /= std::sqrt(norm);
  return u;
}

bool local(std::int64_t h) { return h <= 2; }
bool diffuse(std::int64_t h) { return h == 5 || h == 7; }

layer_inputs make_layer(std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal;
  const std::int64_t dim = shape.head_dim, group = shape.group_size();
  const double scale = std::sqrt(static_cast<double>(dim)) / query_strength;  // logit c ⇒ c·√D/4 along u
  layer_inputs layer;
  layer.keys.resize(static_cast<std::size_t>(shape.kv_heads * tokens * dim));
  layer.values.resize(layer.keys.size());
  layer.window_queries.resize(static_cast<std::size_t>(shape.q_heads * window * dim));
  layer.queries.resize(static_cast<std::size_t>(shape.q_heads * dim));
  for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
    const std::vector<float> u = unit(random, dim);  // where the head's queries point
    std::vector<float> w = unit(random, dim);        // the retrieval head's second direction, ⟂ u
    double dot = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) dot += u[d] * w[d];
    double norm = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) norm += (w[d] -= static_cast<float>(dot) * u[d]) * w[d];
    for (auto& x : w) x /= static_cast<float>(std::sqrt(norm));

    std::vector<double> logit(static_cast<std::size_t>(tokens));
    for (std::int64_t i = 0; i < tokens; ++i)
      logit[i] = i < sinks ? 8.0 : 4.0 * std::exp(-static_cast<double>(tokens - 1 - i) / 256.0);
    const std::int64_t heavy = local(h) || h == retrieval_head ? 0 : diffuse(h) ? 400 : 8;
    for (std::int64_t n = 0; n < heavy; ++n)
      logit[64 + static_cast<std::int64_t>(random() % (tokens - 1024))] = diffuse(h) ? 3.0 : 7.0;
    for (std::int64_t i = 0; i < tokens; ++i) {
      const bool fact = h == retrieval_head && i >= fact_at && i < fact_at + fact_tokens;
      for (std::int64_t d = 0; d < dim; ++d) {
        const std::size_t at = static_cast<std::size_t>((h * tokens + i) * dim + d);
        const double along = logit[i] * scale * u[d] + (fact ? 9.0 * scale * w[d] : 0.0);
        layer.keys[at] = kt::half(static_cast<float>(normal(random) + along));
        layer.values[at] = kt::half(normal(random));
      }
    }
    for (std::int64_t j = h * group; j < (h + 1) * group; ++j) {
      for (std::int64_t t = 0; t < window; ++t)
        for (std::int64_t d = 0; d < dim; ++d)
          layer.window_queries[static_cast<std::size_t>((j * window + t) * dim + d)] =
              static_cast<float>(query_strength * u[d] + 0.3 * normal(random));
      // The decode query: the retrieval head now asks for the fact (along w), the others go on along u.
      const auto& direction = h == retrieval_head ? w : u;
      for (std::int64_t d = 0; d < dim; ++d)
        layer.queries[static_cast<std::size_t>(j * dim + d)] =
            static_cast<float>(query_strength * direction[d] + 0.3 * normal(random));
    }
  }
  return layer;
}

struct outcome {
  std::vector<float> out;
  std::int64_t kept = 0;      // tokens held over all heads
};

template <class Scheme, class Room>
outcome run(const layer_inputs& layer, const typename Scheme::config& cfg, const Room& room) {
  auto cache = Scheme::make_cache(shape, batch, room, kt::codec::fp16::config{});
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg));
  const std::array<std::int64_t, 4> kv{batch, shape.kv_heads, tokens, shape.head_dim};
  const auto keys = kt::make_view(layer.keys.data(), kv), values = kt::make_view(layer.values.data(), kv);
  if constexpr (Scheme::scorer::needs_queries)
    Scheme::compress(keys, values,
                     kt::make_view(layer.window_queries.data(),
                                   std::array<std::int64_t, 4>{batch, shape.q_heads, window, shape.head_dim}),
                     cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});
  else
    Scheme::compress(keys, values, cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});
  outcome result;
  result.out.resize(layer.queries.size());
  const std::array<std::int64_t, 3> q{batch, shape.q_heads, shape.head_dim};
  std::vector<std::byte> attend_scratch(Scheme::attend_workspace(cache.view()));
  Scheme::attend(kt::make_view(layer.queries.data(), q), cache.view(), kt::make_view(result.out.data(), q),
                 kt::workspace{attend_scratch.data(), attend_scratch.size()});
  for (std::int64_t h = 0; h < shape.kv_heads; ++h) result.kept += cache.view().head_length(0, h);
  return result;
}

/// Bytes the kept tokens occupy (keys and values, fp16).
std::size_t held_bytes(const outcome& o) {
  return static_cast<std::size_t>(o.kept) * static_cast<std::size_t>(kt::codec::fp16::bytes_per_token({}, shape.head_dim));
}

/// ‖got − want‖₂ / ‖want‖₂ over the query heads of the retrieval head (`retrieval`) or over all the others.
double relative_error(const std::vector<float>& got, const std::vector<float>& want, bool retrieval) {
  double difference = 0.0, norm = 0.0;
  for (std::int64_t j = 0; j < shape.q_heads; ++j) {
    if ((j / shape.group_size() == retrieval_head) != retrieval) continue;
    for (std::int64_t i = j * shape.head_dim; i < (j + 1) * shape.head_dim; ++i) {
      difference += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
      norm += static_cast<double>(want[i]) * want[i];
    }
  }
  return std::sqrt(difference / norm);
}

using streaming = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                             kt::backend::cpu>;
using snapkv = kt::scheme<kt::layout::contiguous, kt::score::snapkv, kt::budget::uniform, kt::codec::fp16,
                          kt::backend::cpu>;
using ada_snapkv = kt::scheme<kt::layout::flat, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16,
                              kt::backend::cpu>;
using razor = kt::scheme<kt::layout::flat, kt::score::retrieval_head, kt::budget::by_scorer, kt::codec::fp16,
                         kt::backend::cpu>;

}  // namespace

int main() {
  const layer_inputs layer = make_layer(2024);
  const kt::score::snapkv::config snap{.window = window, .kernel = 5};
  const outcome full = run<streaming>(layer, {.budget = {.keep = kt::keep_ratio{1.0}}}, tokens);

  std::printf("kvtrim demo: one layer, %lld prompt tokens, %lld query heads over %lld kv heads of %lld, fp16 cache "
              "(%.1f MiB uncompressed)\n",
              static_cast<long long>(tokens), static_cast<long long>(shape.q_heads),
              static_cast<long long>(shape.kv_heads), static_cast<long long>(shape.head_dim),
              static_cast<double>(held_bytes(full)) / (1 << 20));
  std::printf("structure: 4 sinks and recency in every head; local heads 0-2; heavy hitters (sharp heads 3-4,\n"
              "diffuse 5, 7); a retrieval head (6) whose next query asks for 24 tokens 3000 back that the prompt's\n"
              "last 32 queries never looked at.\n\n");
  std::printf("error: relative L2 error of decode attention against the full cache, over the other heads and\n"
              "[over the retrieval head]; KiB: bytes held\n\n");
  std::printf("%5s | %-22s | %-22s | %-22s | %-28s\n", "kept", "StreamingLLM", "SnapKV", "Ada-SnapKV",
              "RazorAttention");
  std::printf("%5s | %6s %7s %7s | %6s %7s %7s | %6s %7s %7s | %5s %6s %7s %7s\n", "", "KiB", "error", "[retr]", "KiB",
              "error", "[retr]", "KiB", "error", "[retr]", "kept", "KiB", "error", "[retr]");
  const auto cell = [&](const outcome& o) {
    std::printf(" %6zu %7.4f %7.4f |", held_bytes(o) >> 10, relative_error(o.out, full.out, false),
                relative_error(o.out, full.out, true));
  };
  for (const double fraction : {0.05, 0.1, 0.2, 0.3, 0.5}) {
    const std::int64_t keep = static_cast<std::int64_t>(fraction * tokens);
    std::printf("%4.0f%% |", 100 * fraction);
    cell(run<streaming>(layer, {.score = {.sinks = sinks}, .budget = {.keep = kt::keep_tokens{keep}}}, keep));
    cell(run<snapkv>(layer, {.score = snap, .budget = {.keep = kt::keep_tokens{keep}}}, keep));
    cell(run<ada_snapkv>(layer, {.score = snap, .budget = {.keep = kt::keep_tokens{keep}, .alpha = 0.2}},
                         kt::layout::flat::pool_size{.slots = shape.kv_heads * keep}));
    // RazorAttention: the retrieval head keeps all `tokens`; the other 7 share the rest of the same budget,
    // each keeping sinks + a recent window + the compensation token.
    razor::config cfg;
    cfg.score.retrieval.assign(static_cast<std::size_t>(shape.kv_heads), false);
    cfg.score.retrieval[retrieval_head] = true;
    cfg.score.sinks = sinks;
    const std::int64_t others = (shape.kv_heads * keep - tokens) / (shape.kv_heads - 1) - sinks - 1;
    if (others < 1) {
      std::printf(" %5s %6s %7s %7s\n", "-", "", "(<1/8)", "");
      continue;
    }
    cfg.score.min_recent = others;
    cfg.score.recent_fraction = 0.0;
    const outcome r = run<razor>(layer, cfg, kt::layout::flat::pool_size{.slots = shape.kv_heads * tokens});
    std::printf(" %4.0f%% %6zu %7.4f %7.4f\n", 100.0 * static_cast<double>(r.kept) / (shape.kv_heads * tokens),
                held_bytes(r) >> 10,
                relative_error(r.out, full.out, false), relative_error(r.out, full.out, true));
  }
  std::printf("\nReading it: StreamingLLM keeps sinks and recent tokens, so it loses the heavy hitters and the fact.\n"
              "SnapKV keeps what the prompt's last queries looked at: the heavy hitters, not the fact asked for later.\n"
              "Ada-SnapKV shares one budget by those scores: diffuse heads gain, sharp heads give; what the retrieval\n"
              "head gets follows its window, not the question (less than SnapKV's at 20%%, more at 30-50%%).\n"
              "RazorAttention keeps the retrieval head whole (the answer survives, error 0)\n"
              "and pays on the heads whose heavy hitters sit outside its recent window.\n");
  std::printf("\nOn a trained model: docs/fidelity.md (every policy and codec, with accuracy and needle recall).\n");
  return 0;
}
