// tests/kvpress/kvpress_driver.cpp — runs one kvpress-compatible kvtrim
// configuration (kvtrim/kvpress.hpp) on inputs written by compare_kvpress.py and
// prints the kept token set of every (sequence, kv head).
//
// Usage: kvpress_driver <dir>
//   <dir>/config.txt   "key value" lines: press (snapkv | streaming_llm | knorm |
//                      observed_attention | adakv_snapkv | adakv_knorm | pyramidkv),
//                      batch, q_heads, kv_heads, head_dim, tokens, compression_ratio,
//                      window, kernel, n_sink, alpha, layer, layers, beta
//   <dir>/keys.f32, values.f32  float32 [B, H_kv, T, D], little-endian, dense
//   <dir>/queries.f32           float32 [B, H_q, T, D] (all prefill queries, after RoPE)
// Output (stdout): one line per (b, h): "b h t0 t1 ..." in ascending token order.
#include <kvtrim/kvtrim.hpp>

#include "common/policy_oracle.hpp"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

using namespace kvtrim;

std::vector<float> read_floats(const std::string& path, std::size_t count) {
  std::ifstream file(path, std::ios::binary);
  std::vector<float> data(count);
  file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!file) throw std::runtime_error("cannot read " + std::to_string(count) + " floats from " + path);
  return data;
}

template <class Scorer, class Budget>
void run(const typename Scorer::config& score_cfg, const typename Budget::config& budget_cfg, const model_shape& shape,
         std::int64_t batch, std::int64_t tokens, std::int64_t observed, const std::vector<float>& keys,
         const std::vector<float>& values, const std::vector<float>& queries) {
  const std::array<std::int64_t, 4> kv_extents{batch, shape.kv_heads, tokens, shape.head_dim};
  // The last `observed` of the T queries.
  const tensor_view<const float, 4> q{queries.data() + (tokens - observed) * shape.head_dim,
                                      {batch, shape.q_heads, observed, shape.head_dim},
                                      row_major_strides<4>({batch, shape.q_heads, tokens, shape.head_dim})};
  // The same stages scheme::compress runs, up to the selection (no layout needed).
  const auto result = testing::run_selection<Scorer, Budget>(score_cfg, budget_cfg, shape,
                                                             make_view(keys.data(), kv_extents),
                                                             make_view(values.data(), kv_extents), q);
  for (std::size_t head = 0; head < result.kept.size(); ++head) {
    std::cout << static_cast<std::int64_t>(head) / shape.kv_heads << ' ' << static_cast<std::int64_t>(head) % shape.kv_heads;
    for (const std::int64_t token : result.kept[head]) std::cout << ' ' << token;
    std::cout << '\n';
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: kvpress_driver <dir with config.txt, keys.f32, values.f32, queries.f32>\n";
    return 2;
  }
  try {
    const std::string dir = argv[1];
    std::map<std::string, std::string> config;
    std::ifstream file(dir + "/config.txt");
    for (std::string key, value; file >> key >> value;) config[key] = value;
    const auto integer = [&](const char* key) { return std::stoll(config.at(key)); };
    const auto real = [&](const char* key) { return std::stod(config.at(key)); };
    const model_shape shape{integer("q_heads"), integer("kv_heads"), integer("head_dim")};
    shape.validate("kvpress_driver");
    const std::int64_t batch = integer("batch"), tokens = integer("tokens");
    const auto kv_count = static_cast<std::size_t>(batch * shape.kv_heads * tokens * shape.head_dim);
    const auto keys = read_floats(dir + "/keys.f32", kv_count);
    const auto values = read_floats(dir + "/values.f32", kv_count);
    const auto queries =
        read_floats(dir + "/queries.f32", static_cast<std::size_t>(batch * shape.q_heads * tokens * shape.head_dim));
    const double cr = real("compression_ratio");
    const std::string press = config.at("press");
    const auto snapkv = kvpress::snapkv(integer("window"), integer("kernel"));
    const std::int64_t window = integer("window");
    if (press == "snapkv")
      run<score::snapkv, budget::uniform>(snapkv, kvpress::scorer_press(cr), shape, batch, tokens, window, keys, values, queries);
    else if (press == "streaming_llm")
      run<score::static_window, budget::uniform>(kvpress::streaming_llm(integer("n_sink")), kvpress::scorer_press(cr),
                                                 shape, batch, tokens, 1, keys, values, queries);
    else if (press == "knorm")
      run<score::key_norm, budget::uniform>(kvpress::knorm(), kvpress::scorer_press(cr), shape, batch, tokens, 1, keys,
                                            values, queries);
    else if (press == "observed_attention")
      run<score::h2o, budget::uniform>(kvpress::observed_attention(), kvpress::scorer_press(cr), shape, batch, tokens,
                                       tokens, keys, values, queries);
    else if (press == "adakv_snapkv")
      run<score::snapkv, budget::adaptive>(snapkv, kvpress::adakv(cr, real("alpha")), shape, batch, tokens, window, keys,
                                           values, queries);
    else if (press == "adakv_knorm")
      run<score::key_norm, budget::adaptive>(kvpress::knorm(), kvpress::adakv(cr, real("alpha")), shape, batch, tokens,
                                             1, keys, values, queries);
    else if (press == "pyramidkv")
      run<score::snapkv, budget::pyramid>(
          snapkv, kvpress::pyramidkv(cr, integer("layer"), integer("layers"), window, integer("beta")), shape, batch,
          tokens, window, keys, values, queries);
    else
      throw std::runtime_error("unknown press '" + press + "'");
  } catch (const std::exception& e) {
    std::cerr << "kvpress_driver: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
