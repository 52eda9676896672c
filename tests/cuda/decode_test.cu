// Decode attention on backend::cuda over every layout (contiguous, paged,
// flat) against the CPU reference (backend::cpu, the specification).
//
// The caches are built on the host with the CPU backend (append / append_head,
// interleaved across heads so a paged head's pages are scattered through the
// pool), given compensation tokens by hand, then the cache's whole memory
// block (storage, page tables / offsets, lengths, compensation and position
// tables: the views are plain pointers into one block) is copied to the device
// and the same layout is bound over the copy. Nothing here depends on the CUDA
// compress / append of paged and flat caches.
//
// Empty heads (a budget of 0): the CPU refuses to attend over them; the GPU
// writes zeros (paged / flat lengths live on the device). The reference for the
// other heads comes from a second build of the same cache in which each empty
// head holds n extra tokens (heads are attended independently).
//
// Multi-query decode (speculative decoding, `queries` = n new tokens per
// sequence, 1..8): queries [B, n, Hq, D], the new tokens the last n of every
// head, query t seeing the head's first L − n + 1 + t tokens; every case runs
// through that entry (n = 1 forwards to the single-query kernels).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/streaming.hpp"
#include "common/tensors.hpp"
#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;
using kt::testing::host_block;

namespace {

enum class layout_kind { contiguous, paged, flat };

struct decode_case {
  layout_kind layout;
  std::int64_t batch, kv_heads, group, head_dim;
  std::int64_t page_size;             // paged only
  std::vector<std::int64_t> lengths;  // [batch · kv_heads] (contiguous: one length, repeated)
  bool compensation;                  // a compensation token with a logit bias in most heads (paged, flat)
  std::int64_t queries = 1;           // multi-query: new tokens per sequence (paged / flat heads may hold fewer: 1 ≤ L < n)
  bool nhd = false;                   // contiguous only: the map is [batch, token, kv_head] (token_stride = kv_heads)
};

std::string name_of(const decode_case& c) {
  const char* layout = c.layout == layout_kind::contiguous ? "contiguous" : c.layout == layout_kind::paged ? "paged" : "flat";
  std::string lengths;
  for (std::size_t i = 0; i < c.lengths.size() && i < 4; ++i) lengths += kt::detail::cat("_", c.lengths[i]);
  return kt::detail::cat(layout, "_b", c.batch, "_kv", c.kv_heads, "_g", c.group, "_d", c.head_dim,
                         c.layout == layout_kind::paged ? kt::detail::cat("_p", c.page_size) : std::string{}, "_n",
                         lengths, c.compensation ? "_bias" : "", c.queries > 1 ? kt::detail::cat("_q", c.queries) : "",
                         c.nhd ? "_nhd" : "");
}

/// gtest's name for case `info.index` of a suite: the case's name and its index.
std::string case_name(const ::testing::TestParamInfo<decode_case>& info) {
  return kt::detail::cat(name_of(info.param), "_", info.index);
}

/// The tokens of every head: rows [length, D], normal(0, 1), one seed per head.
template <class Element>
struct head_data {
  std::vector<kt::testing::host_tensor<Element, 2>> keys, values;
};

template <class Element>
head_data<Element> make_heads(const decode_case& c, std::int64_t extra) {
  head_data<Element> data;
  for (std::size_t head = 0; head < c.lengths.size(); ++head) {
    const std::int64_t n = std::max<std::int64_t>(c.lengths[head], 0) + extra;
    data.keys.push_back(kt::testing::random_tensor<Element, 2>({std::max<std::int64_t>(n, 1), c.head_dim}, 100 + 2 * head));
    data.values.push_back(kt::testing::random_tensor<Element, 2>({std::max<std::int64_t>(n, 1), c.head_dim}, 101 + 2 * head));
  }
  return data;
}

template <class T>
kt::tensor_view<const T, 2> rows_of(const kt::testing::host_tensor<T, 2>& tensor, std::int64_t first, std::int64_t count) {
  return {tensor.view.data + first * tensor.view.strides[0], {count, tensor.view.extents[1]}, tensor.view.strides};
}

/// The compensation entry of a head: index n / 3 and bias ln(1 + 37·(head mod 5)) (0, ln 38, …, ln 149),
/// none for heads of fewer than 2 tokens and every sixth head.
std::pair<std::int32_t, float> compensation_for(std::int64_t head, std::int64_t length) {
  if (length < 2 || head % 6 == 5) return {-1, 0.0f};
  return {static_cast<std::int32_t>(length / 3), std::log(1.0f + 37.0f * static_cast<float>(head % 5))};
}

/// Element: the inputs' and queries' type; Codec: how the cache stores them (plain: exactly).
template <class Layout, class Element, class Codec = kt::codec::plain<Element>>
struct harness {
  using codec = Codec;
  using cpu_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cpu>;
  using host_view = typename Layout::template view<codec, kt::host_space>;
  using device_view = typename Layout::template view<codec, kt::device_space>;

  const decode_case& c;
  kt::model_shape shape;
  std::int64_t heads;
  typename codec::config codec_config;  // how the cache is stored (an NHD int8 cache: per-token keys)

  explicit harness(const decode_case& c_, typename codec::config codec_config_ = {})
      : c(c_), shape{.q_heads = c_.kv_heads * c_.group, .kv_heads = c_.kv_heads, .head_dim = c_.head_dim},
        heads(c_.batch * c_.kv_heads), codec_config(codec_config_) {}

  auto pool(std::int64_t extra) const {
    if constexpr (std::is_same_v<Layout, kt::layout::paged>) {
      std::int64_t pages = 1;
      for (const std::int64_t n : c.lengths) pages += (n + extra + c.page_size - 1) / c.page_size;
      return kt::layout::paged::pool_size{pages, c.page_size};
    } else if constexpr (std::is_same_v<Layout, kt::layout::flat>) {
      return kt::layout::flat::pool_size{std::accumulate(c.lengths.begin(), c.lengths.end(), std::int64_t{0}) +
                                         heads * (extra + 3)};
    } else {
      return c.lengths[0] + extra;  // capacity
    }
  }

  /// The map a contiguous view of `capacity` slots gets: heads-major as bound, or [batch, token, kv_head]
  /// (token stride = kv_heads, head stride = 1: an engine's NHD cache) when the case asks for it.
  void apply_map(auto& view, std::int64_t capacity) const {
    if constexpr (std::is_same_v<Layout, kt::layout::contiguous>) {
      if (c.nhd) {
        // tokens_major assumes heads of exactly `capacity` slots (codecs with a slot run of 1)
        if (kt::layout::contiguous::head_stride_for<codec>(capacity, codec_config) != capacity)
          throw std::logic_error("decode_test: an NHD map needs a codec without slot runs");
        view.map = kt::layout::contiguous::mapping::tokens_major(c.kv_heads, capacity);
      }
    } else {
      (void)view, (void)capacity;
      if (c.nhd) throw std::logic_error("decode_test: nhd is a contiguous-only case");
    }
  }

  /// The same layout bound over the device copy of the cache's block (a contiguous view's one
  /// length in the host int64 `host_length`, set to the case's length).
  device_view bind_device(void* memory, std::int64_t* host_length) const {
    if constexpr (std::is_same_v<Layout, kt::layout::contiguous>) {
      device_view bound = device_view::bind_with_host_length(host_length, memory, shape, c.batch, pool(0), codec_config);
      apply_map(bound, pool(0));
      *host_length = c.lengths[0];
      return bound;
    } else {
      (void)host_length;
      return device_view::bind(memory, shape, c.batch, pool(0), codec_config);
    }
  }

  /// Builds the cache in `block` through the CPU backend: every head's tokens
  /// (its length, plus `extra_for_empty` for empty heads), appended in rounds.
  host_view build(host_block& block, const head_data<Element>& data, std::int64_t extra_for_empty) const {
    host_view view = host_view::bind(block.data, shape, c.batch, pool(extra_for_empty), codec_config);
    if constexpr (std::is_same_v<Layout, kt::layout::contiguous>) {
      apply_map(view, pool(extra_for_empty));
      const std::int64_t n = c.lengths[0];
      auto keys = kt::testing::make_tensor<Element, 4>({c.batch, c.kv_heads, n, c.head_dim});
      auto values = kt::testing::make_tensor<Element, 4>({c.batch, c.kv_heads, n, c.head_dim});
      for (std::int64_t head = 0; head < heads; ++head)
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t d = 0; d < c.head_dim; ++d) {
            keys(head / c.kv_heads, head % c.kv_heads, i, d) = data.keys[head](i, d);
            values(head / c.kv_heads, head % c.kv_heads, i, d) = data.values[head](i, d);
          }
      cpu_scheme::append(view, keys.cview(), values.cview());
    } else {
      // Rounds of a few pages' worth (not page-aligned) per head, so heads' pages interleave in the pool.
      const std::int64_t step = std::is_same_v<Layout, kt::layout::paged> ? 3 * c.page_size + 5 : 1000;
      std::vector<std::int64_t> wanted(c.lengths.size()), done(c.lengths.size(), 0);
      for (std::size_t head = 0; head < wanted.size(); ++head)
        wanted[head] = c.lengths[head] > 0 ? c.lengths[head] : extra_for_empty;
      // The CPU's twin (extra_for_empty = n): heads shorter than n are refused by the CPU's multi-query
      // attend, so they hold n tokens there; their rows are replaced by short_head_reference.
      if (extra_for_empty > 0)
        for (std::size_t head = 0; head < wanted.size(); ++head) wanted[head] = std::max(wanted[head], extra_for_empty);
      for (bool more = true; more;) {
        more = false;
        for (std::int64_t head = 0; head < heads; ++head) {
          const std::int64_t count = std::min(step, wanted[head] - done[head]);
          if (count <= 0) continue;
          cpu_scheme::append_head(view, head / c.kv_heads, head % c.kv_heads, rows_of(data.keys[head], done[head], count),
                                  rows_of(data.values[head], done[head], count));
          done[head] += count;
          more = true;
        }
      }
      if (c.compensation)
        for (std::int64_t head = 0; head < heads; ++head) {
          const auto [index, bias] = compensation_for(head, c.lengths[head]);
          view.compensation.index[head] = index;
          view.compensation.bias[head] = bias;
        }
    }
    return view;
  }

  /// The CPU reference for a head of 1 ≤ L < n tokens, which the CPU's multi-query attend refuses:
  /// its last L queries are the multi-query case with n' = L over a cache holding the head alone
  /// (query n − L + t' sees its first t' + 1 tokens, as the device's query n − L + t' does), written
  /// into the rows of `out` for those queries of the head's q heads.
  void short_head_reference(const head_data<Element>& data, const kt::testing::host_tensor<Element, 4>& queries,
                            std::int64_t head, kt::testing::host_tensor<float, 4>& out) const {
    using single = kt::scheme<kt::layout::flat, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cpu>;
    const std::int64_t length = c.lengths[head], n = c.queries, b = head / c.kv_heads, h = head % c.kv_heads;
    const kt::model_shape one{.q_heads = c.group, .kv_heads = 1, .head_dim = c.head_dim};
    auto cache = single::make_cache(one, std::int64_t{1}, kt::layout::flat::pool_size{length + 8});
    single::append_head(cache.view(), 0, 0, rows_of(data.keys[head], 0, length), rows_of(data.values[head], 0, length));
    if (c.compensation) {
      const auto [index, bias] = compensation_for(head, length);
      cache.view().compensation.index[0] = index;
      cache.view().compensation.bias[0] = bias;
    }
    auto q = kt::testing::make_tensor<Element, 4>({1, length, c.group, c.head_dim});
    for (std::int64_t t = 0; t < length; ++t)
      for (std::int64_t g = 0; g < c.group; ++g)
        for (std::int64_t d = 0; d < c.head_dim; ++d) q(0, t, g, d) = queries(b, n - length + t, h * c.group + g, d);
    auto result = kt::testing::make_tensor<float, 4>({1, length, c.group, c.head_dim});
    single::attend(q.cview(), cache.view(), result.view, {});
    for (std::int64_t t = 0; t < length; ++t)
      for (std::int64_t g = 0; g < c.group; ++g)
        for (std::int64_t d = 0; d < c.head_dim; ++d) out(b, n - length + t, h * c.group + g, d) = result(0, t, g, d);
  }

  void run() {
    const std::int64_t n_queries = c.queries;
    const head_data<Element> data = make_heads<Element>(c, n_queries);
    auto queries = kt::testing::random_tensor<Element, 4>({c.batch, n_queries, shape.q_heads, c.head_dim}, 7, 2.0f);
    const bool any_empty = std::any_of(c.lengths.begin(), c.lengths.end(), [&](std::int64_t n) { return n < n_queries; });

    // The cache the GPU reads, and the CPU's reference (over the same cache, or its twin with the empty heads filled).
    const std::size_t bytes = host_view::bytes(shape, c.batch, pool(0), codec_config);
    host_block block(bytes);
    const host_view view = build(block, data, 0);
    std::unique_ptr<host_block> twin_block;
    host_view reference_view = view;
    if (any_empty) {
      twin_block = std::make_unique<host_block>(host_view::bytes(shape, c.batch, pool(n_queries), codec_config));
      reference_view = build(*twin_block, data, n_queries);
    }
    auto cpu_out = kt::testing::make_tensor<float, 4>({c.batch, n_queries, shape.q_heads, c.head_dim});
    cpu_scheme::attend(queries.cview(), reference_view, cpu_out.view, {});
    if constexpr (!std::is_same_v<Layout, kt::layout::contiguous>)
      for (std::int64_t head = 0; head < heads; ++head)
        if (c.lengths[head] >= 1 && c.lengths[head] < n_queries) short_head_reference(data, queries, head, cpu_out);

    // The same bytes on the device, the same layout bound over them.
    device_buffer<std::byte> device_block(bytes);
    kt::testing::check(cudaMemcpy(device_block.data(), block.data, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    std::int64_t host_length = 0;
    const device_view gpu_view = bind_device(device_block.data(), &host_length);
    Layout::check("decode_test", gpu_view);

    kt::testing::device_tensor<Element, 4> device_queries(queries);
    device_buffer<float> device_out(static_cast<std::size_t>(c.batch * n_queries * shape.q_heads * c.head_dim));
    device_out.fill_bytes(0xff);  // NaN: an unwritten output fails
    using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
    device_buffer<std::byte> scratch(attention::workspace_bytes(gpu_view, n_queries));
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    const kt::tensor_view<const Element, 4, kt::device_space> query_view{device_queries.view.data, device_queries.view.extents,
                                                                        device_queries.view.strides};
    attention::attend(query_view, gpu_view,
                      kt::make_view<kt::device_space>(
                          device_out.data(), std::array<std::int64_t, 4>{c.batch, n_queries, shape.q_heads, c.head_dim}),
                      {scratch.data(), scratch.size()}, stream);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    cudaStreamDestroy(stream);
    const std::vector<float> gpu_out = device_out.download();

    // Tolerance, per query head (b, j) over its n tokens, with S = max_i Σ_d |q_d k_id| / √D + |bias_i|
    // (the largest logit magnitude) and V = max |v_id|. Both backends read the same stored values and
    // compute in fp32; each lands within the first-order bound of tests/common/tolerance.hpp of the exact
    // result: logits off by δ ≤ (D + 8)·u·S (the dot product, the scale, log2(e) and the bias's addition),
    // weights by e^(2δ + 4u) (exp / exp2f within 2 ulp), so |Σ (p̃ − p) v| ≤ (e^(2δ + 4u) − 1)·V for each.
    // The summations of n weighted values: the worst case (2n + 1)·u·V is ~0.03 at n = 32768, too loose to
    // catch a misread page (16 of 32768 tokens move the output by ~5e-4·V), so — as the contiguous test —
    // the random-rounding model (Higham, Accuracy and Stability, §2.8: ~√n·u for independent roundings)
    // with a margin of 8 on each side: 16·√(n + 1)·u·V, plus 8u·V for the split merges' rescalings.
    // The tensor-core path (16-bit storage, groups ≥ 4, every multi-query call) also rounds each weight
    // to the storage type for P·V (FlashAttention's choice): |Σ δp·v| / Σ p ≤ u_s·V.
    // Multi-query: query t of a head of L tokens is the single-query case over its first L − n + 1 + t
    // tokens (the later ones enter with weight exactly 0), so n below is that count.
    // Quantizing codecs (symmetric codes: no zero points): both backends read the same codes and steps;
    // dequantizing x̂ = c·s costs each side ≤ 2u|x̂| (tests/cuda/codecs_test.cu), so the rows they see
    // differ by ≤ 4u|x̂|; on the tensor cores each dequantized key and value is also rounded to fp16
    // once (u_h), or — read as fragments — the query times the key steps and the weights times the
    // value steps are (the same terms): logits move by ≤ (4u + u_h)·S, outputs by ≤ (4u + u_h)·V, and
    // P is rounded to fp16 (u_s below). S and V come from the rows the codec decodes.
    const double u = kt::element_traits<float>::unit_roundoff;
    const double u_s = kt::codec::is_plain<Codec> ? kt::element_traits<Element>::unit_roundoff
                                                  : kt::element_traits<kt::half>::unit_roundoff;
    // Code bytes go into the tensor-core fragments at every group (int8 / int4 / fp8).
    const bool tensor_cores = c.group >= 4 || n_queries > 1 || !kt::codec::is_plain<Codec>;
    const double codec_extra =
        kt::codec::is_plain<Codec> ? 0.0 : 4.0 * u + (tensor_cores ? kt::element_traits<kt::half>::unit_roundoff : 0.0);
    // What the cache holds, as floats: the inputs (plain codecs store them exactly) or the decoded rows.
    std::vector<std::vector<float>> held_keys(static_cast<std::size_t>(heads)), held_values(held_keys.size());
    for (std::int64_t head = 0; head < heads; ++head) {
      const std::int64_t length = c.lengths[head], b = head / c.kv_heads, h = head % c.kv_heads;
      auto& keys_of = held_keys[static_cast<std::size_t>(head)];
      auto& values_of = held_values[static_cast<std::size_t>(head)];
      keys_of.resize(static_cast<std::size_t>(length * c.head_dim));
      values_of.resize(keys_of.size());
      for (std::int64_t i = 0; i < length; ++i) {
        float* key = keys_of.data() + i * c.head_dim;
        float* value = values_of.data() + i * c.head_dim;
        if constexpr (kt::codec::is_plain<Codec>) {
          for (std::int64_t d = 0; d < c.head_dim; ++d)
            key[d] = kt::to_float(data.keys[head](i, d)), value[d] = kt::to_float(data.values[head](i, d));
        } else {
          const std::int64_t slot = view.slot(b, h, i);
          Codec::load_key(view.storage, head, slot, view.positions.slot_position[slot], key);
          Codec::load_value(view.storage, head, slot, value);
        }
      }
    }
    double worst_ratio = 0.0;
    for (std::int64_t b = 0; b < c.batch; ++b)
      for (std::int64_t t = 0; t < n_queries; ++t)
        for (std::int64_t j = 0; j < shape.q_heads; ++j) {
          const std::int64_t head = b * c.kv_heads + j / c.group;
          // A head shorter than n (paged / flat): the first n − L queries see no token and output 0.
          const std::int64_t n = c.lengths[head] == 0 ? 0 : std::max<std::int64_t>(0, c.lengths[head] - n_queries + 1 + t);
          const std::size_t row = static_cast<std::size_t>(((b * n_queries + t) * shape.q_heads + j) * c.head_dim);
          for (std::int64_t d = 0; d < c.head_dim; ++d) {
            const float got = gpu_out[row + static_cast<std::size_t>(d)];
            if (n == 0) ASSERT_EQ(got, 0.0f) << "empty head or unseen query, head " << head << ": output " << t << "," << j << "," << d << " should be 0";
          }
          if (n == 0) continue;
          double largest_logit = 0.0, largest_value = 0.0;
          const auto [bias_index, bias] =
              c.compensation ? compensation_for(head, c.lengths[head]) : std::pair<std::int32_t, float>{-1, 0.0f};
          for (std::int64_t i = 0; i < n; ++i) {
            double magnitude = 0.0;
            for (std::int64_t d = 0; d < c.head_dim; ++d) {
              const std::size_t at = static_cast<std::size_t>(i * c.head_dim + d);
              magnitude += std::abs(static_cast<double>(kt::to_float(queries(b, t, j, d))) *
                                    static_cast<double>(held_keys[head][at]));
              largest_value = std::max(largest_value, std::abs(static_cast<double>(held_values[head][at])));
            }
            largest_logit = std::max(largest_logit, magnitude / std::sqrt(static_cast<double>(c.head_dim)) +
                                                        (i == bias_index ? std::abs(bias) : 0.0));
          }
          const double logit_error = ((static_cast<double>(c.head_dim) + 8.0) * u + codec_extra) * largest_logit;
          const double tolerance = 2.0 * std::expm1(2.0 * logit_error + 4.0 * u) * largest_value +
                                   (16.0 * std::sqrt(static_cast<double>(n) + 1.0) + 8.0) * u * largest_value +
                                   (tensor_cores ? u_s * largest_value : 0.0) + codec_extra * largest_value;
          for (std::int64_t d = 0; d < c.head_dim; ++d) {
            const float got = gpu_out[row + static_cast<std::size_t>(d)];
            ASSERT_FALSE(std::isnan(got)) << "unwritten or NaN output at " << b << "," << t << "," << j << "," << d;
            const double error = std::abs(static_cast<double>(got) - cpu_out.view(b, t, j, d));
            worst_ratio = std::max(worst_ratio, error / tolerance);
            ASSERT_LE(error, tolerance) << "|cuda − cpu| at sequence " << b << ", query " << t << ", q head " << j
                                        << ", dim " << d << " (" << n << " tokens seen)";
          }
        }
    ::testing::Test::RecordProperty("worst_error_over_tolerance", std::to_string(worst_ratio));
  }
};

template <class Element>
void run_case(const decode_case& c) {
  SCOPED_TRACE(name_of(c));
  switch (c.layout) {
    case layout_kind::contiguous: harness<kt::layout::contiguous, Element>(c).run(); break;
    case layout_kind::paged: harness<kt::layout::paged, Element>(c).run(); break;
    case layout_kind::flat: harness<kt::layout::flat, Element>(c).run(); break;
  }
}

class DecodeAttention : public ::testing::TestWithParam<decode_case> {};
class MultiQueryDecodeCodecs : public ::testing::TestWithParam<decode_case> {};

TEST_P(DecodeAttention, MatchesCpuReferenceFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::half>(GetParam());
}
TEST_P(DecodeAttention, MatchesCpuReferenceBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::bfloat16>(GetParam());
}

using L = layout_kind;
/// n heads of 0 to 1336 tokens in no order (every 11th empty), for caches with many heads.
std::vector<std::int64_t> ragged_lengths(std::int64_t n) {
  std::vector<std::int64_t> lengths(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) lengths[static_cast<std::size_t>(i)] = i % 11 == 0 ? 0 : (i * 389) % 1337;
  return lengths;
}
INSTANTIATE_TEST_SUITE_P(
    AwkwardLengths, DecodeAttention,
    ::testing::Values(
        // lengths 0, 1, 17, 4097 and mixed in one batch, with compensation tokens; GQA 4 (tensor cores)
        decode_case{L::paged, 2, 4, 4, 128, 16, {0, 1, 17, 4097, 300, 3001, 31, 5}, true},
        decode_case{L::flat, 2, 4, 4, 128, 0, {0, 1, 17, 4097, 300, 3001, 31, 5}, true},
        // heads of one sequence 10× apart; one 32768-token head; GQA 1, pages of 32
        decode_case{L::paged, 1, 2, 1, 64, 32, {32768, 3277}, true},
        decode_case{L::flat, 2, 2, 2, 128, 0, {32768, 3277, 1, 0}, true},
        // D 256, pages of 64, GQA 2 (CUDA cores)
        decode_case{L::paged, 3, 2, 2, 256, 64, {17, 1000, 0, 64, 65, 129}, true},
        // GQA 8 and 16 (tensor cores, 16 rows filled), D 64 / 256
        decode_case{L::flat, 2, 2, 8, 64, 0, {10000, 1000, 1, 4097}, true},
        decode_case{L::paged, 1, 2, 16, 256, 16, {4097, 409}, true},
        decode_case{L::flat, 1, 1, 16, 128, 0, {32768}, false},
        decode_case{L::paged, 2, 1, 16, 64, 64, {1, 2000}, true},
        // contiguous: one length for every head, through the same kernels
        decode_case{L::contiguous, 2, 2, 16, 128, 0, {4097, 4097, 4097, 4097}, false},
        decode_case{L::contiguous, 1, 4, 1, 256, 0, {17, 17, 17, 17}, false},
        decode_case{L::contiguous, 3, 1, 8, 64, 0, {1, 1, 1}, false},
        // small caches cut across several blocks (the partition's 256-token minimum): blocks that read
        // pieces of two heads, and the merge (the sanitizer runs take these)
        decode_case{L::paged, 2, 2, 4, 64, 16, {300, 0, 33, 700}, true},
        decode_case{L::flat, 1, 2, 2, 128, 0, {600, 70}, true},
        decode_case{L::paged, 1, 2, 16, 128, 32, {513, 200}, true},
        // 32 ragged heads (0 to 7770 tokens): heads over one to ~30 blocks and blocks over several heads
        decode_case{L::flat, 4, 8, 4, 128, 0, {0, 1, 17, 255, 256, 257, 511, 513, 700, 1000, 3, 0, 2000, 129, 64, 65,
                                               4097, 10, 300, 30, 0, 1, 777, 7770, 250, 260, 100, 1000, 33, 333, 3333, 16},
                    true},
        // the same 32 ragged heads at GQA 2 (CUDA cores: whole tiles by bulk copies on sm_90, the stages'
        // transaction barriers set up afresh for each of a block's heads, partial last tiles on cp.async)
        decode_case{L::flat, 4, 8, 2, 128, 0, {0, 1, 17, 255, 256, 257, 511, 513, 700, 1000, 3, 0, 2000, 129, 64, 65,
                                               4097, 10, 300, 30, 0, 1, 777, 7770, 250, 260, 100, 1000, 33, 333, 3333, 16},
                    true},
        // D 256 (32-token tiles, 3 stages) at GQA 2 over a flat cache: segments of 8 and more whole tiles, so every
        // stage's transaction barrier passes phases 0, 1 and 2 (parity back to 0), then a partial last tile
        decode_case{L::flat, 2, 2, 2, 256, 0, {4097, 700, 1, 300}, true},
        // Tensor-core kernel, swizzled 16-bit tiles (whole stride-1 tiles by tensor maps on sm_90, the rest by
        // cp.async into the same layout): W's shape at GQA 4 over a contiguous cache (split-K segments starting
        // mid-head, whole tiles then a partial one per segment; heads of 4096 rows end on a tile boundary)
        decode_case{L::contiguous, 2, 4, 4, 128, 0, {4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096}, false},
        // D 64 (two 64-element panels a tile, 4 stages) at GQA 4, contiguous, heads not a multiple of 64
        decode_case{L::contiguous, 1, 2, 4, 64, 0, {1000, 1000}, false},
        // Contiguous heads that a whole number of blocks splits evenly (uniform_decode_chunk; on 132
        // multiprocessors at two blocks each, where the balanced chunks of 497 and 311 tokens would straddle
        // heads): 32 heads of 4096 tokens, 8 blocks of 512 a head, each block one segment; 256 heads of 320
        // tokens, one whole head a block and no merge
        decode_case{L::contiguous, 4, 8, 4, 128, 0, std::vector<std::int64_t>(32, 4096), false},
        decode_case{L::contiguous, 32, 8, 4, 128, 0, std::vector<std::int64_t>(256, 320), false},
        // the same through the plan (in the attention blocks), which finds every head equal: paged (pages of
        // 16) and flat
        decode_case{L::paged, 4, 8, 4, 128, 16, std::vector<std::int64_t>(32, 4096), false},
        decode_case{L::flat, 32, 8, 4, 128, 0, std::vector<std::int64_t>(256, 320), false},
        // D 64 at GQA 16, flat heads one short of, at, and one past a tile, and a long one
        decode_case{L::flat, 2, 2, 16, 64, 0, {63, 64, 65, 4160}, true},
        // Past decode_block_plan_heads (256) the plan kernel plans instead of the attention blocks: 264
        // ragged heads (0 to 1336 tokens, empty ones among them) and 264 equal ones over pages of 16
        decode_case{L::flat, 33, 8, 4, 128, 0, ragged_lengths(264), true},
        decode_case{L::paged, 33, 8, 4, 128, 16, std::vector<std::int64_t>(264, 320), false},
        // 256 ragged heads, the most the attention blocks plan themselves: every lane of the plan's scan holds
        // 8 heads, and blocks span several heads
        decode_case{L::flat, 32, 8, 4, 128, 0, ragged_lengths(256), true}),
    case_name);

// review (a): contiguous caches whose map is [batch, token, kv_head] ("NHD": token stride = kv_heads,
// head stride = 1), so kv_tile_stream's tiles have stride ≠ 1 and take the generic path; lengths 4097
// and 300 (not multiples of 64 / 128: a partial last tile), GQA 1 (CUDA cores) and 8 / 16 (tensor cores).
INSTANTIATE_TEST_SUITE_P(
    NhdMap, DecodeAttention,
    ::testing::Values(decode_case{L::contiguous, 2, 4, 1, 128, 0, {4097, 4097, 4097, 4097, 4097, 4097, 4097, 4097}, false, 1, true},
                      decode_case{L::contiguous, 1, 2, 8, 128, 0, {4097, 4097}, false, 1, true},
                      decode_case{L::contiguous, 1, 8, 1, 64, 0, {300, 300, 300, 300, 300, 300, 300, 300}, false, 1, true},
                      decode_case{L::contiguous, 2, 2, 8, 64, 0, {300, 300, 300, 300}, false, 1, true},
                      decode_case{L::contiguous, 1, 2, 16, 256, 0, {300, 300}, false, 1, true}),
    case_name);

// int8 over an NHD contiguous map: KIVI key groups need token_stride 1 (layout::contiguous::check refuses
// a map that splits a key group's slot run), so these caches scale keys per token (symmetric, slot run 1).
// One query at GQA 8 reads the codes through the fragment decoder; GQA 1 (one query) the CUDA-core reader;
// four queries at GQA 4 the dequantized fp16 tiles. Lengths 4097 and 300.
class NhdDecodeCodecs : public ::testing::TestWithParam<decode_case> {};

TEST_P(NhdDecodeCodecs, Int8PerTokenKeysMatchesCpuReference) {
  KVTRIM_SKIP_WITHOUT_GPU();
  SCOPED_TRACE(name_of(GetParam()));
  kt::codec::int8::config per_token;
  per_token.keys = kt::codec::key_scaling::per_token;
  harness<kt::layout::contiguous, kt::half, kt::codec::int8>(GetParam(), per_token).run();
}

INSTANTIATE_TEST_SUITE_P(
    NhdMap, NhdDecodeCodecs,
    ::testing::Values(decode_case{L::contiguous, 1, 2, 8, 128, 0, {4097, 4097}, false, 1, true},
                      decode_case{L::contiguous, 2, 2, 8, 64, 0, {300, 300, 300, 300}, false, 1, true},
                      decode_case{L::contiguous, 1, 4, 1, 128, 0, {300, 300, 300, 300}, false, 1, true},
                      decode_case{L::contiguous, 1, 2, 4, 128, 0, {300, 300}, false, 4, true}),
    case_name);

// Multi-query decode: n = 2..8 new tokens per sequence, every layout, GQA 1/2/4/8/16 (query rows Group × n
// from 2 to 128: one to eight 16-row tiles), D 64/128/256, pages 16/32/64, lengths 0 (zeros), n (the first
// query sees one token), 17, 4097, 32768 and heads 10× apart, compensation tokens.
class MultiQueryDecode : public ::testing::TestWithParam<decode_case> {};

TEST_P(MultiQueryDecode, MatchesCpuReferenceFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::half>(GetParam());
}
TEST_P(MultiQueryDecode, MatchesCpuReferenceBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::bfloat16>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(
    SpeculativeTokens, MultiQueryDecode,
    ::testing::Values(
        decode_case{L::paged, 2, 4, 4, 128, 16, {0, 4, 17, 4097, 300, 3001, 31, 8}, true, 4},
        decode_case{L::flat, 2, 2, 8, 64, 0, {10000, 1000, 8, 4097}, true, 8},
        decode_case{L::paged, 1, 2, 1, 64, 32, {32768, 3277}, true, 2},
        decode_case{L::flat, 1, 2, 16, 256, 0, {4097, 409}, true, 3},
        decode_case{L::paged, 1, 2, 16, 128, 64, {513, 200}, true, 8},
        decode_case{L::paged, 2, 2, 8, 256, 16, {1000, 100, 0, 17}, true, 5},
        decode_case{L::flat, 1, 2, 2, 128, 0, {600, 70}, true, 6},
        decode_case{L::contiguous, 2, 2, 4, 128, 0, {4097, 4097, 4097, 4097}, false, 8},
        decode_case{L::contiguous, 1, 2, 16, 64, 0, {17, 17}, false, 5},
        decode_case{L::contiguous, 2, 1, 1, 256, 0, {7, 7}, false, 7},
        // small: blocks reading pieces of two heads and the merge (the sanitizer runs take these)
        decode_case{L::paged, 2, 2, 4, 64, 16, {300, 0, 33, 700}, true, 2},
        decode_case{L::flat, 1, 2, 16, 64, 0, {600, 70}, true, 8},
        // review D3: heads of 1 ≤ L < n tokens next to long ones (the first n − L queries see nothing:
        // output 0; the others their causal prefix), GQA 1 / 4 / 8, pages of 16, compensation on heads ≥ 2
        decode_case{L::paged, 2, 2, 4, 128, 16, {1, 300, 5, 7}, true, 8},
        decode_case{L::flat, 2, 2, 8, 64, 0, {3, 4097, 2, 1}, true, 6},
        decode_case{L::paged, 1, 3, 1, 64, 16, {1, 2, 40}, false, 3},
        decode_case{L::flat, 1, 2, 4, 256, 0, {7, 6}, true, 8}),
    case_name);

// int8 (KIVI key groups of 32, symmetric; pages of 32 so that a key group never straddles two pages):
// several queries read the codes through dequantized fp16 tiles (the fragment readers hold one query
// per row); one query (last case) through the fragments. Groups 1 (a tensor-core kernel the single
// query never uses) to 16, D 64 / 128.
TEST_P(MultiQueryDecodeCodecs, Int8MatchesCpuReference) {
  KVTRIM_SKIP_WITHOUT_GPU();
  SCOPED_TRACE(name_of(GetParam()));
  harness<kt::layout::paged, kt::half, kt::codec::int8>(GetParam()).run();
}

INSTANTIATE_TEST_SUITE_P(
    SpeculativeTokens, MultiQueryDecodeCodecs,
    ::testing::Values(decode_case{L::paged, 2, 2, 4, 128, 32, {0, 40, 4097, 300}, true, 4},
                      decode_case{L::paged, 1, 2, 1, 64, 32, {33, 700}, true, 8},
                      decode_case{L::paged, 1, 2, 16, 64, 32, {600, 70}, true, 8},
                      decode_case{L::paged, 1, 2, 8, 128, 32, {1000, 100}, true, 1}),
    case_name);

TEST(MultiQueryDecodeErrors, RefusalsNameTheArgument) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
  const kt::model_shape shape{.q_heads = 4, .kv_heads = 1, .head_dim = 64};
  const std::array<std::int64_t, 4> extents{1, 3, 4, 64};
  device_buffer<float> out(3 * 4 * 64);
  const auto expect_error = [](auto&& call, const char* argument) {
    try {
      call();
      ADD_FAILURE() << "expected kvtrim::error naming " << argument;
    } catch (const kt::error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  {  // fp32 storage: no tensor-core path for several query rows
    using view_type = kt::layout::paged::view<kt::codec::fp32, kt::device_space>;
    device_buffer<std::byte> memory(view_type::bytes(shape, 1, {4, 16}));
    const view_type view = view_type::bind(memory.data(), shape, 1, {4, 16});
    device_buffer<float> queries(3 * 4 * 64);
    device_buffer<std::byte> scratch(attention::workspace_bytes(view, 3));
    expect_error([&] {
      attention::attend(kt::make_view<kt::device_space>(static_cast<const float*>(queries.data()), extents), view,
                        kt::make_view<kt::device_space>(out.data(), extents), {scratch.data(), scratch.size()}, nullptr);
    }, "cache.codec");
  }
  using view_type = kt::layout::flat::view<kt::codec::fp16, kt::device_space>;
  device_buffer<std::byte> memory(view_type::bytes(shape, 1, {64}));
  const view_type view = view_type::bind(memory.data(), shape, 1, {64});
  device_buffer<kt::half> queries(9 * 4 * 64);
  device_buffer<std::byte> scratch(attention::workspace_bytes(view, 8));
  expect_error([&] {  // the eviction metric sums accepted queries' attention: one query
    device_buffer<float> logits(64), lse(4);
    kt::cuda_detail::decode_metric metric;
    metric.logits = logits.data();
    metric.lse = lse.data();
    metric.stride = 64;
    attention::attend(kt::make_view<kt::device_space>(static_cast<const kt::half*>(queries.data()), extents), view,
                      kt::make_view<kt::device_space>(out.data(), extents), {scratch.data(), scratch.size()}, nullptr,
                      metric);
  }, "metric");
  expect_error([&] {  // more than 8 new tokens
    const std::array<std::int64_t, 4> nine{1, 9, 4, 64};
    attention::attend(kt::make_view<kt::device_space>(static_cast<const kt::half*>(queries.data()), nine), view,
                      kt::make_view<kt::device_space>(out.data(), nine), {scratch.data(), scratch.size()}, nullptr);
  }, "queries");
  EXPECT_EQ(attention::workspace_bytes(view, 9), 0u);
}

TEST(DecodeAttentionErrors, UnsupportedGroupNamesTheArgument) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using view_type = kt::layout::flat::view<kt::codec::fp16, kt::device_space>;
  const kt::model_shape shape{.q_heads = 6, .kv_heads = 2, .head_dim = 64};
  device_buffer<std::byte> memory(view_type::bytes(shape, 1, {64}));
  const view_type view = view_type::bind(memory.data(), shape, 1, {64});
  device_buffer<kt::half> queries(6 * 64), out(6 * 64);
  const std::array<std::int64_t, 3> extents{1, 6, 64};
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
  EXPECT_EQ(attention::workspace_bytes(view), 0u);
  try {
    attention::attend(kt::make_view<kt::device_space>(static_cast<const kt::half*>(queries.data()), extents), view,
                      kt::make_view<kt::device_space>(out.data(), extents), {}, nullptr);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("group size"), std::string::npos) << e.what();
  }
}

TEST(DecodeAttentionErrors, Fp32StorageAtGroupSixteenIsRefused) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using view_type = kt::layout::paged::view<kt::codec::fp32, kt::device_space>;
  const kt::model_shape shape{.q_heads = 16, .kv_heads = 1, .head_dim = 64};
  device_buffer<std::byte> memory(view_type::bytes(shape, 1, {4, 16}));
  const view_type view = view_type::bind(memory.data(), shape, 1, {4, 16});
  device_buffer<float> queries(16 * 64), out(16 * 64);
  const std::array<std::int64_t, 3> extents{1, 16, 64};
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
  device_buffer<std::byte> scratch(attention::workspace_bytes(view));
  try {
    attention::attend(kt::make_view<kt::device_space>(static_cast<const float*>(queries.data()), extents), view,
                      kt::make_view<kt::device_space>(out.data(), extents), {scratch.data(), scratch.size()}, nullptr);
    FAIL() << "expected kvtrim::error";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("cache.codec"), std::string::npos) << e.what();
  }
}

// The tensor-core kernel's whole tiles come by tensor maps only where the host could encode them; a
// failed encoding falls back to cp.async silently (same results), so the tests above pass either
// way. This says which: on compute capability 9.0 and above the maps must encode (fp16 and bf16
// storage, head dims 64 and 128, 64-row boxes), and an impossible row count (past the copies'
// signed 32-bit coordinates) must fall back; below 9.0 nothing encodes.
#if KVTRIM_CUDA_TENSOR_MAP_TILES == 1
TEST(DecodeAttentionTensorMaps, EncodeWhereTheDeviceCopiesByTensorMaps) {
  KVTRIM_SKIP_WITHOUT_GPU();
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  const std::int64_t slots = 4097;
  device_buffer<std::uint16_t> keys(slots * 128), values(slots * 128);
  const int expected = major >= 9 ? 1 : 0;
  for (const int head_dim : {64, 128}) {
    EXPECT_EQ(kt::cuda_detail::encode_kv_tile_maps<__half>(keys.data(), values.data(), slots, head_dim, 64, "test").valid,
              expected)
        << "fp16, head_dim " << head_dim;
    EXPECT_EQ(
        kt::cuda_detail::encode_kv_tile_maps<__nv_bfloat16>(keys.data(), values.data(), slots, head_dim, 64, "test").valid,
        expected)
        << "bf16, head_dim " << head_dim;
  }
  EXPECT_EQ(kt::cuda_detail::encode_kv_tile_maps<__half>(keys.data(), values.data(), std::int64_t{1} << 31, 128, 64,
                                                         "test")
                .valid,
            0);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // a refused lookup or encoding leaves no error behind
}
#endif

}  // namespace
