// examples/adaptive_budget.cpp — uniform vs Ada-KV budgets on the same SnapKV scores.
//
// A layer with 8 kv heads whose attention ranges from diffuse (head 0) to sharp
// (head 7: a few tokens carry the mass). Both budgets keep the same total, k tokens
// per head on average: uniform gives every head k, Ada-KV moves tokens to where
// the scores are. Two real schemes, compress then decode attention:
//   uniform: scheme<layout::contiguous, score::snapkv, budget::uniform,  codec::fp16, backend::cpu>
//   Ada-KV:  scheme<layout::flat,       score::snapkv, budget::adaptive, codec::fp16, backend::cpu>
// (layout::contiguous gives every head one length, so Ada-KV's ragged heads live in
// layout::flat: all heads back to back, offsets per head). The program prints each
// head's kept length and its decode-attention error against the uncompressed cache
// (the same scheme keeping every token), and the bytes each cache holds.
#include <kvtrim/kvtrim.hpp>

#include <array>
#include <cmath>
#include <cstddef>
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

/// ‖got − want‖₂ (Ada-KV bounds the eviction loss of the attention output, not a
/// relative error: a diffuse head's output is near zero, so relative errors explode).
double output_error(const std::vector<float>& got, const std::vector<float>& want) {
  double difference = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) difference += std::pow(got[i] - want[i], 2);
  return std::sqrt(difference);
}

struct layer_inputs {
  tensor4 keys, values, window_queries;
  std::vector<float> decode_queries;
};

/// What one scheme kept and computed.
struct run_result {
  std::vector<float> out;            // [q_heads · head_dim] decode attention
  std::vector<std::int64_t> kept;    // tokens per kv head
  double bytes_held = 0.0;           // codec bytes of the kept tokens
  std::size_t bytes_allocated = 0;   // what the owning cache allocated
};

/// compress → attend with `Scheme`, its cache built from `room` (a capacity or a pool).
template <class Scheme, class Room>
run_result run(layer_inputs& in, const typename Scheme::config& cfg, const Room& room) {
  const kt::model_shape shape{q_heads, kv_heads, head_dim};
  auto cache = Scheme::make_cache(shape, batch, room, kt::codec::fp16::config{});
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg));
  Scheme::compress(in.keys.view(), in.values.view(), in.window_queries.view(), cache.view(), cfg,
                   kt::workspace{scratch.data(), scratch.size()});
  run_result result;
  result.out.resize(in.decode_queries.size());
  std::vector<std::byte> attend_scratch(Scheme::attend_workspace(cache.view()));
  Scheme::attend(kt::make_view(in.decode_queries.data(), std::array<std::int64_t, 3>{batch, q_heads, head_dim}),
                 cache.view(), kt::make_view(result.out.data(), std::array<std::int64_t, 3>{batch, q_heads, head_dim}),
                 kt::workspace{attend_scratch.data(), attend_scratch.size()});
  for (std::int64_t h = 0; h < kv_heads; ++h) result.kept.push_back(cache.view().head_length(0, h));
  for (auto count : result.kept)
    result.bytes_held += static_cast<double>(count) * kt::codec::fp16::bytes_per_token({}, head_dim);
  result.bytes_allocated = cache.bytes();
  return result;
}

}  // namespace

int main() {
  layer_inputs in;
  in.keys = {std::vector<float>(batch * kv_heads * tokens * head_dim), {batch, kv_heads, tokens, head_dim}};
  in.values = in.keys;
  in.window_queries = {std::vector<float>(batch * q_heads * window * head_dim), {batch, q_heads, window, head_dim}};
  in.decode_queries.assign(batch * q_heads * head_dim, 0.0f);
  make_layer(in.keys, in.values, in.window_queries, in.decode_queries);

  using uniform_scheme = kt::scheme<kt::layout::contiguous, kt::score::snapkv, kt::budget::uniform, kt::codec::fp16,
                                    kt::backend::cpu>;
  using adaptive_scheme = kt::scheme<kt::layout::flat, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16,
                                     kt::backend::cpu>;
  const kt::score::snapkv::config snapkv{.window = window};
  // The reference: the same scheme keeping every token (only fp16 storage, no eviction).
  const run_result full = run<uniform_scheme>(in, {.score = snapkv, .budget = {.keep = kt::keep_ratio{1.0}}}, tokens);
  const run_result uniform =
      run<uniform_scheme>(in, {.score = snapkv, .budget = {.keep = kt::keep_tokens{keep_per_head}}}, keep_per_head);
  // The flat buffer holds exactly the layer's budget: H·k slots, however Ada-KV splits them.
  const run_result adaptive = run<adaptive_scheme>(
      in, {.score = snapkv, .budget = {.keep = kt::keep_tokens{keep_per_head}, .alpha = 0.2}},
      kt::layout::flat::pool_size{kv_heads * keep_per_head});

  std::printf("%lld tokens, %lld kv heads (%lld query heads), head_dim %lld, fp16 storage; SnapKV window %lld; "
              "budget %lld tokens per head on average (Ada-KV: alpha 0.2)\n\n",
              static_cast<long long>(tokens), static_cast<long long>(kv_heads), static_cast<long long>(q_heads),
              static_cast<long long>(head_dim), static_cast<long long>(window), static_cast<long long>(keep_per_head));
  std::printf("kv head  sharpness  uniform: kept  |dout|_2   Ada-KV: kept  |dout|_2\n");
  const std::int64_t group = q_heads / kv_heads;
  double uniform_total = 0.0, adaptive_total = 0.0;
  const auto group_rows = [&](const std::vector<float>& out, std::int64_t h) {
    return std::vector<float>(out.begin() + h * group * head_dim, out.begin() + (h + 1) * group * head_dim);
  };
  for (std::int64_t h = 0; h < kv_heads; ++h) {
    const auto want = group_rows(full.out, h);
    const double e_uniform = output_error(group_rows(uniform.out, h), want);
    const double e_adaptive = output_error(group_rows(adaptive.out, h), want);
    uniform_total += e_uniform * e_uniform;
    adaptive_total += e_adaptive * e_adaptive;
    std::printf("%7lld  %9.2f  %13lld  %8.4f   %12lld  %8.4f\n", static_cast<long long>(h),
                0.05 + 0.35 * static_cast<double>(h), static_cast<long long>(uniform.kept[h]), e_uniform,
                static_cast<long long>(adaptive.kept[h]), e_adaptive);
  }
  std::int64_t uniform_tokens = 0, adaptive_tokens = 0;
  for (std::int64_t h = 0; h < kv_heads; ++h) {
    uniform_tokens += uniform.kept[h];
    adaptive_tokens += adaptive.kept[h];
  }
  std::printf("\nlayer output error |dout|_2 over all heads: uniform %.4f, Ada-KV %.4f\n", std::sqrt(uniform_total),
              std::sqrt(adaptive_total));
  std::printf("tokens kept: uniform %lld, Ada-KV %lld (of %lld)\n", static_cast<long long>(uniform_tokens),
              static_cast<long long>(adaptive_tokens), static_cast<long long>(kv_heads * tokens));
  std::printf("bytes of kept tokens: uniform %.0f, Ada-KV %.0f (full cache %.0f); allocated: uniform %zu "
              "(contiguous, capacity %lld per head), Ada-KV %zu (flat, %lld slots + offsets)\n",
              uniform.bytes_held, adaptive.bytes_held, full.bytes_held, uniform.bytes_allocated,
              static_cast<long long>(keep_per_head), adaptive.bytes_allocated,
              static_cast<long long>(kv_heads * keep_per_head));
  return 0;
}
