// Compress a small cache with a StreamingLLM scheme and check one known value:
// with every value row equal to 1, attention must output exactly 1.
#include <kvtrim/kvtrim.hpp>

#include <array>
#include <cstdio>
#include <vector>

namespace kt = kvtrim;

int main() {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                            kt::backend::cpu>;
  const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
  const std::int64_t batch = 1, tokens = 32;
  std::vector<kt::half> keys(batch * 2 * tokens * 8), values(keys.size(), kt::half(1.0f));
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = kt::half(static_cast<float>(i % 5) * 0.25f);
  auto cache = scheme::make_cache(shape, batch, std::int64_t{16}, scheme::codec::config{});
  scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{12};
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  const std::array<std::int64_t, 4> extents{batch, 2, tokens, 8};
  scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});
  std::vector<float> query(batch * 4 * 8, 0.5f), out(query.size());
  scheme::attend(kt::make_view(query.data(), std::array<std::int64_t, 3>{batch, 4, 8}), cache.view(),
                 kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, 4, 8}), kt::workspace{});
  const bool ok = *cache.view().length == 12 && out[0] > 0.999f && out[0] < 1.001f;
  std::printf("downstream: kept %lld tokens per head, out[0] = %g: %s\n", static_cast<long long>(*cache.view().length),
              out[0], ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
