// examples/readme_usage.cpp — the usage example of README.md, verbatim between
// the markers, so the README's code always compiles and runs.
#include <array>
#include <cstdint>
#include <cstdio>
#include <vector>

// README begin
#include <kvtrim/kvtrim.hpp>
namespace kt = kvtrim;

// StreamingLLM: 4 attention sinks + the most recent tokens, fp16 storage, CPU reference.
using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform,
                          kt::codec::fp16, kt::backend::cpu>;

void compress_then_decode(const kt::half* keys, const kt::half* values, std::int64_t tokens,
                          const float* query, float* out) {
  const kt::model_shape shape{.q_heads = 32, .kv_heads = 8, .head_dim = 128};
  scheme::config cfg;                        // the papers' defaults (4 sinks) ...
  cfg.budget.keep = kt::keep_ratio{0.25};    // ... keeping a quarter of every head
  auto cache = scheme::make_cache(shape, /*batch=*/1, /*capacity=*/tokens / 4 + 64, kt::codec::fp16::config{});

  std::vector<std::byte> scratch(scheme::compress_workspace(shape, 1, tokens, cfg));  // ask, then call
  const std::array<std::int64_t, 4> kv{1, shape.kv_heads, tokens, shape.head_dim};     // [B, H, T, D]
  scheme::compress(kt::make_view(keys, kv), kt::make_view(values, kv), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});

  const std::array<std::int64_t, 3> q{1, shape.q_heads, shape.head_dim};              // [B, Hq, D]
  scheme::attend(kt::make_view(query, q), cache.view(), kt::make_view(out, q), kt::workspace{});
  // every decode step: scheme::append(cache.view(), new_keys, new_values), then attend again
}
// README end

int main() {
  const std::int64_t tokens = 1000;
  std::vector<kt::half> keys(8 * tokens * 128, kt::half(0.0f)), values(keys.size(), kt::half(0.5f));
  std::vector<float> query(32 * 128, 1.0f), out(query.size());
  compress_then_decode(keys.data(), values.data(), tokens, query.data(), out.data());
  std::printf("every value is 0.5, so attention outputs 0.5: out[0] = %g\n", static_cast<double>(out[0]));
  return out[0] == 0.5f ? 0 : 1;
}
