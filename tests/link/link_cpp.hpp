// Shared by the two TUs of kvtrim_link_cpp: every public host header (the
// communicators of kvtrim/comm/ included: they are not in kvtrim.hpp), and one
// helper template that both TUs instantiate with the same arguments (its
// instantiations, and every inline function of the library, must merge).
#pragma once

#include <kvtrim/comm/communicator.hpp>
#include <kvtrim/comm/simulated.hpp>
#include <kvtrim/comm/single_process.hpp>
#include <kvtrim/kvpress.hpp>
#include <kvtrim/kvtrim.hpp>
#if __has_include(<nlohmann/json.hpp>)
#include <kvtrim/io/low_rank_profile.hpp>
#include <kvtrim/io/profile.hpp>
#endif

#include <array>
#include <cstdint>
#include <vector>

namespace link_test {

namespace kt = kvtrim;

using streaming = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp16,
                             kt::backend::cpu>;
inline const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
inline constexpr std::int64_t batch = 1, tokens = 32, keep = 12;

/// Compresses keys/values whose value rows are all 1 into `cache`.
template <class Scheme, class Cache>
void compress_ones(Cache& cache) {
  std::vector<kt::half> keys(batch * shape.kv_heads * tokens * shape.head_dim), values(keys.size(), kt::half(1.0f));
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = kt::half(static_cast<float>(i % 5) * 0.25f);
  typename Scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{keep};
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg));
  const std::array<std::int64_t, 4> extents{batch, shape.kv_heads, tokens, shape.head_dim};
  Scheme::compress(kt::make_view(keys.data(), extents), kt::make_view(values.data(), extents), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});
}

std::int64_t compress_in_a();  // link_cpp_a.cpp: kept tokens per head
float compress_and_attend_in_b();  // link_cpp_b.cpp: attention output (1 when value rows are 1)

}  // namespace link_test
