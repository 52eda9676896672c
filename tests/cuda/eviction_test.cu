// Decode-time eviction on backend::cuda (issue 16): the eviction metric the
// split-K decode kernel writes as a side output, against the CPU reference
// (backend/cpu/decode_attention.hpp, the specification), over paged, flat and
// contiguous caches, GQA groups 1, 2 (CUDA cores for 16-bit storage), 4, 8, 16
// (tensor cores; code fragments at every group), head dims 64 / 128 / 256,
// lengths that cut across blocks and the merge, compensation tokens, every
// metric kind, and workspaces only 16-byte aligned. The attention output with
// the metric must be bit-identical to the output without it (the side output
// changes nothing).
//
// The caches are built on the host with the CPU backend and their memory block
// copied to the device (as tests/cuda/decode_test.cu does); the metric buffer
// starts from the same random values on both sides (so "+=" is tested, not "=").
#include <gtest/gtest.h>

#include <kvtrim/backend/cpu/eviction.hpp>

#include <cmath>
#include <limits>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/low_rank_bases.hpp"
#include "common/tensors.hpp"
#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
namespace ev = kvtrim::eviction;
using kt::testing::device_buffer;
using kt::testing::host_block;

namespace {

enum class layout_kind { contiguous, paged, flat };

struct metric_case {
  layout_kind layout;
  std::int64_t batch, kv_heads, group, head_dim, page_size;
  std::vector<std::int64_t> lengths;  // [batch · kv_heads] (contiguous: one length repeated)
  std::int64_t window;
};

std::string name_of(const metric_case& c) {
  const char* layout = c.layout == layout_kind::contiguous ? "contiguous" : c.layout == layout_kind::paged ? "paged" : "flat";
  return kt::detail::cat(layout, "_b", c.batch, "_kv", c.kv_heads, "_g", c.group, "_d", c.head_dim, "_n", c.lengths[0],
                         "_w", c.window);
}

template <class Layout, class Element, class Codec = kt::codec::plain<Element>>
struct harness {
  using codec = Codec;
  static constexpr bool plain = kt::codec::is_plain<Codec>;
  static constexpr bool low_rank = std::is_same_v<Codec, kt::codec::low_rank>;
  using cpu_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cpu>;
  using host_view = typename Layout::template view<codec, kt::host_space>;
  using device_view = typename Layout::template view<codec, kt::device_space>;

  const metric_case& c;
  typename Codec::config config;
  kt::model_shape shape;
  std::int64_t heads;

  explicit harness(const metric_case& c_, const typename Codec::config& config_ = {})
      : c(c_), config(config_), shape{.q_heads = c_.kv_heads * c_.group, .kv_heads = c_.kv_heads, .head_dim = c_.head_dim},
        heads(c_.batch * c_.kv_heads) {}

  auto pool() const {
    if constexpr (std::is_same_v<Layout, kt::layout::paged>) {
      std::int64_t pages = 2;
      for (const std::int64_t n : c.lengths) pages += (n + c.page_size - 1) / c.page_size;
      return kt::layout::paged::pool_size{pages, c.page_size};
    } else if constexpr (std::is_same_v<Layout, kt::layout::flat>) {
      std::int64_t slots = 0;  // whole runs of 32 slots a head (KIVI groups), 7 spare slots at least
      for (const std::int64_t n : c.lengths) slots += (n + 7 + 31) / 32 * 32;
      return kt::layout::flat::pool_size{slots};
    } else {
      return c.lengths[0] + 3;
    }
  }

  void run() {
    // Keys and values of every head, appended in rounds so pages interleave.
    const std::int64_t longest = *std::max_element(c.lengths.begin(), c.lengths.end());
    auto keys = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, longest, c.head_dim}, 11);
    auto values = kt::testing::random_tensor<Element, 4>({c.batch, c.kv_heads, longest, c.head_dim}, 12);
    auto queries = kt::testing::random_tensor<Element, 3>({c.batch, shape.q_heads, c.head_dim}, 13, 2.0f);
    const std::size_t bytes = host_view::bytes(shape, c.batch, pool(), config);
    host_block block(bytes);
    host_view view = host_view::bind(block.data, shape, c.batch, pool(), config);
    if constexpr (low_rank) kt::testing::install_random_bases(view.storage, heads, c.head_dim);
    if constexpr (std::is_same_v<Layout, kt::layout::contiguous>) {
      cpu_scheme::append(view, keys.cview(), values.cview());
    } else {
      const std::int64_t step = 37;
      std::vector<std::int64_t> done(static_cast<std::size_t>(heads), 0);
      for (bool more = true; more;) {
        more = false;
        for (std::int64_t head = 0; head < heads; ++head) {
          const std::int64_t count = std::min(step, c.lengths[head] - done[head]);
          if (count <= 0) continue;
          const std::int64_t b = head / c.kv_heads, h = head % c.kv_heads;
          const kt::tensor_view<const Element, 2> k{&keys(b, h, done[head], 0), {count, c.head_dim},
                                                    {keys.view.stride(2), keys.view.stride(3)}};
          const kt::tensor_view<const Element, 2> v{&values(b, h, done[head], 0), {count, c.head_dim},
                                                    {values.view.stride(2), values.view.stride(3)}};
          cpu_scheme::append_head(view, b, h, k, v);
          done[head] += count;
          more = true;
        }
      }
      for (std::int64_t head = 0; head < heads; ++head)  // a compensation token in every third head
        if (head % 3 == 1 && c.lengths[head] > 2) {
          view.compensation.index[head] = static_cast<std::int32_t>(c.lengths[head] / 2);
          view.compensation.bias[head] = std::log(40.0f);
        }
    }
    const std::int64_t slots = kt::detail::storage_slots(view.storage);
    std::vector<float> initial(static_cast<std::size_t>(slots));
    std::mt19937_64 random(5);
    std::uniform_real_distribution<float> uniform(0.0f, 0.01f);
    for (float& x : initial) x = uniform(random);

    device_buffer<std::byte> device_block(bytes);
    kt::testing::check(cudaMemcpy(device_block.data(), block.data, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    std::int64_t host_length = 0;
    const device_view gpu_view = [&] {
      if constexpr (std::is_same_v<Layout, kt::layout::contiguous>) {
        device_view bound =
            device_view::bind_with_host_length(&host_length, device_block.data(), shape, c.batch, pool(), config);
        host_length = c.lengths[0];
        return bound;
      } else {
        return device_view::bind(device_block.data(), shape, c.batch, pool(), config);
      }
    }();
    // The memory block was copied whole, but a host contiguous view carves its length (one int64, 256 bytes
    // with the carver's alignment) between the storage and the position tables, and a device view does not:
    // the device view's positions would read the host's shifted by 64 slots (the contiguous cases' failure in
    // the first device run: tokens just inside the window accumulated). Copy the tables to where the device
    // view reads them.
    kt::testing::check(cudaMemcpy(gpu_view.positions.slot_position, view.positions.slot_position,
                                  sizeof(std::int32_t) * static_cast<std::size_t>(slots), cudaMemcpyHostToDevice),
                       "cudaMemcpy H2D (slot positions)");
    kt::testing::check(cudaMemcpy(gpu_view.positions.next_position, view.positions.next_position,
                                  sizeof(std::int64_t) * static_cast<std::size_t>(heads), cudaMemcpyHostToDevice),
                       "cudaMemcpy H2D (next positions)");
    kt::testing::device_tensor<Element, 3> device_queries(queries);
    const kt::tensor_view<const Element, 3, kt::device_space> query_view{
        device_queries.view.data, device_queries.view.extents, device_queries.view.strides};
    const std::array<std::int64_t, 3> out_extents{c.batch, shape.q_heads, c.head_dim};
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);

    // Without the metric, for the bit-identity check.
    device_buffer<float> plain_out(static_cast<std::size_t>(c.batch * shape.q_heads * c.head_dim));
    {
      using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
      device_buffer<std::byte> scratch(attention::workspace_bytes(gpu_view));
      attention::attend(query_view, gpu_view, kt::make_view<kt::device_space>(plain_out.data(), out_extents),
                        {scratch.data(), scratch.size()}, stream);
    }

    for (const ev::metric_kind kind : {ev::metric_kind::squared_sum, ev::metric_kind::mean}) {
      SCOPED_TRACE(::testing::Message() << "kind " << int(kind));
      std::vector<float> cpu_metric = initial;
      const ev::metric_output<> cpu_output{cpu_metric.data(), slots, kind, c.window};
      auto cpu_out = kt::testing::make_tensor<float, 3>(out_extents);
      std::vector<std::byte> cpu_scratch(ev::attend_workspace(view, cpu_output));
      ev::attend(queries.cview(), view, cpu_out.view, cpu_output, kt::workspace{cpu_scratch.data(), cpu_scratch.size()});

      device_buffer<float> gpu_metric(initial);
      device_buffer<float> gpu_out(static_cast<std::size_t>(c.batch * shape.q_heads * c.head_dim));
      const ev::metric_output<kt::device_space> gpu_output{gpu_metric.data(), slots, kind, c.window};
      device_buffer<std::byte> scratch(ev::attend_workspace(gpu_view, gpu_output));
      ev::attend(query_view, gpu_view, kt::make_view<kt::device_space>(gpu_out.data(), out_extents), gpu_output,
                 {scratch.data(), scratch.size()}, stream);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      const std::vector<float> with_metric = gpu_out.download(), without = plain_out.download();
      ASSERT_EQ(0, std::memcmp(with_metric.data(), without.data(), with_metric.size() * sizeof(float)))
          << "the metric side output changed the attention output";
      const std::vector<float> got = gpu_metric.download();
      {  // The logits stored plainly (no L2 policy): the same floats, so the same metric bit for bit.
        device_buffer<float> plain_metric(initial);
        const ev::metric_output<kt::device_space> plain_output{plain_metric.data(), slots, kind, c.window};
        ev::attend(query_view, gpu_view, kt::make_view<kt::device_space>(gpu_out.data(), out_extents), plain_output,
                   {scratch.data(), scratch.size()}, stream, ev::metric_l2_hints{.logits_in_l2 = false});
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        const std::vector<float> plain_got = plain_metric.download();
        ASSERT_EQ(0, std::memcmp(plain_got.data(), got.data(), got.size() * sizeof(float)))
            << "plain logit stores gave another metric than evict_last ones";
      }
      {  // A workspace only 16-byte aligned (all attend asks for): the logits land off a 128-byte line,
         // where the finisher's discard.global.L2 (whole lines only) must not run: no fault, and the same
         // metric bit for bit (a smoke test: an unaligned discard is undefined, not certain to show).
        device_buffer<std::byte> wider(scratch.size() + 16);
        device_buffer<float> offset_metric(initial);
        const ev::metric_output<kt::device_space> offset_output{offset_metric.data(), slots, kind, c.window};
        ev::attend(query_view, gpu_view, kt::make_view<kt::device_space>(gpu_out.data(), out_extents), offset_output,
                   {wider.data() + 16, scratch.size()}, stream);
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        const std::vector<float> offset_got = offset_metric.download();
        ASSERT_EQ(0, std::memcmp(offset_got.data(), got.data(), got.size() * sizeof(float)))
            << "a workspace 16 bytes past a 128-byte line gave another metric";
      }

      // Bound, per token, from the two first-order error budgets (no safety factor).
      // Each backend computes p_gi with exponent error (natural-log units) at most
      //   CPU: δ = (D + 5)·u·S (the dot product and the scale), exp within 2u, the
      //        denominator's n-term sum and its ≤ n/64 + 1 rescalings: (n + 3(n/64 + 1) + 4)·u;
      //   GPU: δ = (D + 8)·u·S (plus log2 e folded into the query), exp2f within 2u, the
      //        partial sums (n terms) and the merge of at most n/256 + 2 partials (exp2f, log2f of
      //        a sum ≤ n: 2u·(|lse| + 1) with |lse| ≤ S + ln n): (n + 3(n/256 + 2) + 4)·u + 2u·(S + ln n + 1),
      // with S the largest |logit| including the compensation bias. A square doubles the
      // exponent error, the G-term group sum, factor and += add (G + 2)·u of c + M0 on each side.
      // Quantizing codecs (symmetric codes here: k̂ = q·s, no zero points): S is taken over the
      // keys as stored (load_key); each side's dequantization rounds every key element by
      // ≤ 2u·|k̂| (the product, and the fp32 path's fold), moving a logit by ≤ 2u·S; codes read
      // into the tensor cores (fragments at every group, dequantized tiles at groups ≥ 4) round the
      // query times the run's steps (or the dequantized key) to fp16 once: ≤ u_h·S more on the GPU
      // (codecs_test.cu's bound; counted for every codec, a looser bound on the CUDA-core ones). A
      // logit perturbation ε moves p's exponent by ≤ 2ε (the logit and the lse).
      const double u = kt::element_traits<float>::unit_roundoff;
      const double u_h = !plain ? kt::element_traits<kt::half>::unit_roundoff : 0.0;
      // (low_rank: no dequantization beyond the D + R products counted below; its kernels read no fp16 operand.)
      const double cpu_codec = plain || low_rank ? 0.0 : 2.0 * 2.0 * u,
                   gpu_codec = plain || low_rank ? 0.0 : 2.0 * (2.0 * u + u_h);
      double worst = 0.0;
      for (std::int64_t b = 0; b < c.batch; ++b)
        for (std::int64_t h = 0; h < c.kv_heads; ++h) {
          const std::int64_t head = b * c.kv_heads + h, n = c.lengths[head];
          double largest_logit = 0.0;
          for (std::int64_t i = 0; i < n; ++i) {
            // |k_d| per channel: the key as stored (plain: the key itself); low_rank (post-RoPE keys):
            // B_d = Σ_j |U_dj c_j|, the magnitudes of the D·R products either side sums.
            double stored[kt::max_head_dim];
            const std::int64_t slot = view.slot(b, h, i);
            if constexpr (low_rank) {
              const auto& st = view.storage;
              const std::int64_t r = st.stored_rank;
              const float* basis = st.key_bases + head * c.head_dim * r;
              for (std::int64_t d = 0; d < c.head_dim; ++d) {
                stored[d] = 0.0;
                for (std::int64_t j = 0; j < r; ++j)
                  stored[d] += std::abs(double(basis[d * r + j]) * double(kt::to_float(st.key_coefficients[slot * r + j])));
              }
            } else {
              float key[kt::max_head_dim];
              Codec::load_key(view.storage, head, slot, view.positions.slot_position[slot], key);
              for (std::int64_t d = 0; d < c.head_dim; ++d) stored[d] = key[d];
            }
            for (std::int64_t g = 0; g < c.group; ++g) {
              double magnitude = 0.0;
              for (std::int64_t d = 0; d < c.head_dim; ++d)
                magnitude += std::abs(double(kt::to_float(queries(b, h * c.group + g, d))) * stored[d]);
              largest_logit = std::max(largest_logit, magnitude / std::sqrt(double(c.head_dim)));
            }
          }
          if constexpr (!std::is_same_v<Layout, kt::layout::contiguous>)
            if (view.compensation.index[head] >= 0) largest_logit += std::abs(double(view.compensation.bias[head]));
          // low_rank: each side sums D + R products in fp32 (codecs_test.cu's low-rank bound: the two
          // logits within (2(D + R) + 12)·u·S), so D + R + 6 per side in place of D + 5 and D + 8.
          const double dn = double(n), D = double(c.head_dim);
          double R = 0.0;
          if constexpr (low_rank) R = double(view.storage.stored_rank);
          const double cpu_dot = low_rank ? D + R + 6.0 : D + 5.0, gpu_dot = low_rank ? D + R + 6.0 : D + 8.0;
          const double cpu_exponent = cpu_dot * u * largest_logit + (dn + 3.0 * (dn / 64.0 + 1.0) + 4.0) * u +
                                      cpu_codec * largest_logit;
          const double gpu_exponent = gpu_dot * u * largest_logit + (dn + 3.0 * (dn / 256.0 + 2.0) + 4.0) * u +
                                      2.0 * u * (largest_logit + std::log(dn) + 1.0) + gpu_codec * largest_logit;
          const double power = kind == ev::metric_kind::squared_sum ? 2.0 : 1.0;
          const double relative = std::expm1(power * (cpu_exponent + gpu_exponent));
          for (std::int64_t i = 0; i < n; ++i) {
            const std::int64_t slot = view.slot(b, h, i);
            const double start = initial[slot], want = cpu_metric[slot], have = got[slot];
            const double contribution = want - start;
            const double bound = relative * std::abs(contribution) +
                                 2.0 * (double(c.group) + 2.0) * u * (std::abs(contribution) + start) + 1e-38;
            worst = std::max(worst, std::abs(have - want) / bound);
            ASSERT_LE(std::abs(have - want), bound)
                << "head " << head << " (" << n << " tokens), token " << i << ": cuda " << have << ", cpu " << want;
          }
        }
      std::vector<bool> held(static_cast<std::size_t>(slots), false);
      for (std::int64_t b = 0; b < c.batch; ++b)
        for (std::int64_t h = 0; h < c.kv_heads; ++h)
          for (std::int64_t i = 0; i < c.lengths[b * c.kv_heads + h]; ++i) held[view.slot(b, h, i)] = true;
      for (std::int64_t slot = 0; slot < slots; ++slot)  // slots that hold no token are never written
        if (!held[slot]) {
          ASSERT_EQ(got[slot], initial[slot]) << "slot " << slot;
        }
      ::testing::Test::RecordProperty("worst_error_over_bound", std::to_string(worst));
    }
    cudaStreamDestroy(stream);
  }
};

template <class Element>
void run_case(const metric_case& c) {
  SCOPED_TRACE(name_of(c));
  switch (c.layout) {
    case layout_kind::contiguous: harness<kt::layout::contiguous, Element>(c).run(); break;
    case layout_kind::paged: harness<kt::layout::paged, Element>(c).run(); break;
    case layout_kind::flat: harness<kt::layout::flat, Element>(c).run(); break;
  }
}

class EvictionMetric : public ::testing::TestWithParam<metric_case> {};

TEST_P(EvictionMetric, MatchesCpuReferenceFp16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::half>(GetParam());
}
TEST_P(EvictionMetric, MatchesCpuReferenceBf16) {
  KVTRIM_SKIP_WITHOUT_GPU();
  run_case<kt::bfloat16>(GetParam());
}

using L = layout_kind;
INSTANTIATE_TEST_SUITE_P(
    AwkwardLengths, EvictionMetric,
    ::testing::Values(
        // GQA 4 (tensor cores), heads cut across blocks and merged, compensation tokens
        metric_case{L::paged, 2, 4, 4, 128, 16, {1, 17, 4097, 300, 3001, 31, 5, 64}, 64},
        metric_case{L::flat, 2, 4, 4, 128, 0, {70, 1, 17, 4097, 300, 3001, 31, 5}, 64},
        // GQA 1 and 2 (CUDA cores), D 64, pages of 32, window 0 (every token accumulates)
        metric_case{L::paged, 1, 2, 1, 64, 32, {5000, 333}, 0},
        metric_case{L::flat, 2, 2, 2, 128, 0, {1000, 257, 1, 64}, 7},
        // GQA 8, one long head
        metric_case{L::paged, 1, 2, 8, 128, 16, {20000, 409}, 64},
        // contiguous: the uniform partition
        metric_case{L::contiguous, 2, 2, 4, 128, 0, {2049, 2049, 2049, 2049}, 64},
        metric_case{L::contiguous, 1, 2, 2, 64, 0, {300, 300}, 3},
        // GQA 16 (both mma row blocks), D 256, heads 10× apart
        metric_case{L::flat, 1, 2, 16, 256, 0, {4097, 409}, 64},
        // A line longer than the finisher's grid takes in one pass (2048 threads an SM, a place each:
        // 270 k places on 132 SMs), so its grid-stride loop turns several times
        metric_case{L::flat, 1, 2, 1, 64, 0, {600001, 530000}, 64}),
    [](const ::testing::TestParamInfo<metric_case>& info) {
      return kt::detail::cat(name_of(info.param), "_", info.index);
    });


// The metric over quantizing codecs' caches (the same kernels' logits, whatever the codec):
// KIVI int8 (GQA 4 and 16), int4 (GQA 1, D 64) and fp8 (GQA 2) on the tensor-core fragments (every group),
// layered<int8> (fp16 rows for sinks and the newest tokens) with one long head (GQA 8);
// low_rank (post-RoPE, profile bases of ragged ranks): rank 32 at D 128 takes the tensor-core
// kernel, rank 20 the CUDA-core one.
// Symmetric codes, so the bound above needs no zero points.
enum class metric_codec { int8, int4, fp8, layered_int8, low_rank_r32, low_rank_r20 };
struct codec_metric_case {
  metric_case shape;
  metric_codec codec;
};

std::string codec_metric_name(const ::testing::TestParamInfo<codec_metric_case>& info) {
  static const char* const codecs[] = {"int8", "int4", "fp8", "layered_int8", "low_rank_r32", "low_rank_r20"};
  return kt::detail::cat(codecs[static_cast<int>(info.param.codec)], "_", name_of(info.param.shape), "_", info.index);
}

class EvictionMetricCodecs : public ::testing::TestWithParam<codec_metric_case> {};

TEST_P(EvictionMetricCodecs, MatchesCpuReference) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const codec_metric_case& p = GetParam();
  SCOPED_TRACE(name_of(p.shape));
  kt::codec::int8::config int8_config{};  // KIVI groups of 32, symmetric
  kt::codec::int4::config int4_config{};
  kt::codec::layered<kt::codec::int8>::config layered_config{};
  layered_config.sinks = 3;
  layered_config.recent = 40;
  kt::codec::low_rank::config low_rank_config{};
  low_rank_config.source = kt::codec::basis_source::profile;
  low_rank_config.max_rank = p.codec == metric_codec::low_rank_r20 ? 20 : 32;
  switch (p.codec) {
    case metric_codec::int8:
      harness<kt::layout::paged, kt::half, kt::codec::int8>(p.shape, int8_config).run();
      break;
    case metric_codec::int4:
      harness<kt::layout::paged, kt::half, kt::codec::int4>(p.shape, int4_config).run();
      break;
    case metric_codec::fp8: harness<kt::layout::flat, kt::half, kt::codec::fp8>(p.shape).run(); break;
    case metric_codec::layered_int8:
      harness<kt::layout::flat, kt::half, kt::codec::layered<kt::codec::int8>>(p.shape, layered_config).run();
      break;
    case metric_codec::low_rank_r32:
      harness<kt::layout::paged, kt::half, kt::codec::low_rank>(p.shape, low_rank_config).run();
      break;
    case metric_codec::low_rank_r20:
      harness<kt::layout::flat, kt::half, kt::codec::low_rank>(p.shape, low_rank_config).run();
      break;
  }
}

INSTANTIATE_TEST_SUITE_P(
    AwkwardLengths, EvictionMetricCodecs,
    ::testing::Values(
        codec_metric_case{metric_case{L::paged, 2, 4, 4, 128, 16, {1, 17, 4097, 300, 3001, 31, 5, 64}, 64},
                          metric_codec::int8},
        codec_metric_case{metric_case{L::paged, 1, 2, 1, 64, 32, {5000, 333}, 0}, metric_codec::int4},
        codec_metric_case{metric_case{L::flat, 2, 2, 2, 128, 0, {1000, 257, 1, 64}, 7}, metric_codec::fp8},
        codec_metric_case{metric_case{L::flat, 1, 2, 8, 128, 0, {20000, 409}, 64}, metric_codec::layered_int8},
        codec_metric_case{metric_case{L::paged, 2, 3, 4, 128, 16, {4097, 1, 17, 300, 33, 129}, 64},
                          metric_codec::low_rank_r32},
        codec_metric_case{metric_case{L::flat, 1, 3, 2, 128, 0, {1000, 31, 257}, 7}, metric_codec::low_rank_r20},
        // GQA 16: the row form over code fragments (tiles from a multiple of 32 before the segment),
        // head prefixes on the line odd and even
        codec_metric_case{metric_case{L::paged, 1, 3, 16, 128, 16, {4097, 409, 33}, 64}, metric_codec::int8}),
    codec_metric_name);

// ---- the prefill seed on the device, against the CPU's -------------------------
//
// A SnapKV compress on the host (fp16, paged, start position 5) gives the cache and its
// kept selection; both are copied to the device, and eviction::seed_metric runs on each
// side from the same prompt keys and observation window. Bound, per kept token, derived
// per side for each probability p_gq(t) = exp(l_t − m)/Σ_j exp(l_j − m) with S the largest
// Σ_d |q_d k_d|/√D: a logit is off by ≤ (D + 3)·u·S (the dot product, 1/√D, and on the
// GPU log2(e) folded in), so p's exponent by ≤ 2·((D + 3)·u·S + 2u·S) from the token's
// logit and the row maximum (with the subtraction) and as much again through the
// denominator, plus the denominator's T-term sum, its exp(2)f roundings and the GPU's
// fold of ≤ 64 splits: ε ≤ 4·(D + 5)·u·S + (T + 136)·u. Squares double it; the G·w-term
// accumulation and the factor add (G·w + 2)·u of the value on each side.
// Layout: paged (pages of 16) or flat; compensation: heads 1, 3, … get a compensation token
// (RazorAttention) at kept index keep / 3 after compress, which both backends seed 0.
// `lengths` (a right-padded batch, compress_options::sequence_lengths; empty: every sequence
// all T): the padding (tokens ≥ T_b of keys and values) holds NaN, compress and both seeds take
// the lengths, and the bound above is taken per sequence with T_b for T (its own softmax).
template <class Layout = kt::layout::paged>
void check_seed(std::int64_t batch, std::int64_t kv_heads, std::int64_t group, std::int64_t head_dim,
                std::int64_t tokens, std::int64_t observed, std::int64_t window, std::int64_t keep, ev::metric_kind kind,
                bool compensation = false, const std::vector<std::int64_t>& lengths = {}) {
  using scheme = kt::scheme<Layout, kt::score::snapkv, kt::budget::uniform, kt::codec::fp16, kt::backend::cpu>;
  using host_view = typename Layout::template view<kt::codec::fp16, kt::host_space>;
  using device_view = typename Layout::template view<kt::codec::fp16, kt::device_space>;
  const kt::model_shape shape{.q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = head_dim};
  const std::int64_t heads = batch * kv_heads, start = 5;
  auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, tokens, head_dim}, 131);
  auto values = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, tokens, head_dim}, 132);
  auto queries = kt::testing::random_tensor<kt::half, 4>({batch, shape.q_heads, observed, head_dim}, 133, 2.0f);
  ASSERT_TRUE(lengths.empty() || std::ssize(lengths) == batch) << "one length per sequence";
  const std::int64_t* sequence_lengths = lengths.empty() ? nullptr : lengths.data();
  const auto prompt = [&](std::int64_t b) { return lengths.empty() ? tokens : lengths[b]; };
  for (std::int64_t b = 0; b < batch; ++b)  // the padding: a read of it poisons the metric
    for (std::int64_t h = 0; h < kv_heads; ++h)
      for (std::int64_t t = prompt(b); t < tokens; ++t)
        for (std::int64_t d = 0; d < head_dim; ++d)
          keys(b, h, t, d) = values(b, h, t, d) = kt::half(std::numeric_limits<float>::quiet_NaN());
  typename scheme::config cfg;
  cfg.score.window = observed;
  cfg.budget.keep = kt::keep_tokens{keep};
  const auto pool = [&] {
    if constexpr (std::is_same_v<Layout, kt::layout::flat>)
      return kt::layout::flat::pool_size{heads * keep + 8};
    else
      return kt::layout::paged::pool_size{heads * ((keep + 15) / 16) + 3, 16};
  }();
  const std::size_t bytes = host_view::bytes(shape, batch, pool);
  host_block block(bytes);
  host_view view = host_view::bind(block.data, shape, batch, pool);
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
  std::vector<std::int32_t> kept(static_cast<std::size_t>(scheme::kept_tokens_capacity(shape, batch, tokens, cfg)));
  kt::compress_options<kt::host_space> options{.start_position = start, .kept_offsets = offsets.data(),
                                               .kept_tokens = kept.data(),
                                               .kept_tokens_capacity = static_cast<std::int64_t>(kept.size()),
                                               .sequence_lengths = sequence_lengths};
  std::vector<std::byte> compress_scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), queries.cview(), view, cfg, options,
                   kt::workspace{compress_scratch.data(), compress_scratch.size()});
  std::vector<std::int64_t> compensation_slots;
  if (compensation)
    for (std::int64_t head = 1; head < heads; head += 2) {
      const std::int64_t b = head / kv_heads, h = head % kv_heads, index = view.head_length(b, h) / 3;
      ASSERT_GT(view.head_length(b, h), index) << "head " << head << " keeps no token";
      view.compensation.index[head] = static_cast<std::int32_t>(index);
      view.compensation.bias[head] = std::log(40.0f);
      compensation_slots.push_back(view.slot(b, h, index));
    }
  const std::int64_t slots = kt::detail::storage_slots(view.storage);
  std::vector<float> cpu_metric(static_cast<std::size_t>(slots), 7.0f);  // seeding overwrites everything
  ev::seed_metric(keys.cview(), queries.cview(), view, {offsets.data(), kept.data(), heads}, start,
                  ev::metric_output<>{cpu_metric.data(), slots, kind, window}, sequence_lengths);

  device_buffer<std::byte> device_block(bytes);
  kt::testing::check(cudaMemcpy(device_block.data(), block.data, bytes, cudaMemcpyHostToDevice), "H2D");
  const device_view gpu_view = device_view::bind(device_block.data(), shape, batch, pool);
  kt::testing::device_tensor<kt::half, 4> device_keys(keys), device_queries(queries);
  device_buffer<std::int64_t> device_offsets(offsets);
  device_buffer<std::int32_t> device_kept(kept);
  device_buffer<float> gpu_metric(std::vector<float>(static_cast<std::size_t>(slots), 7.0f));
  const kt::kv_view<const kt::half, kt::device_space> key_view{device_keys.view.data, device_keys.view.extents,
                                                               device_keys.view.strides};
  const kt::window_view<const kt::half, kt::device_space> query_view{
      device_queries.view.data, device_queries.view.extents, device_queries.view.strides};
  device_buffer<std::byte> scratch(ev::seed_workspace(key_view, query_view, gpu_view, sequence_lengths));
  ev::seed_metric(key_view, query_view, gpu_view, kt::selection_view<kt::device_space>{device_offsets.data(), device_kept.data(), heads},
                  start, ev::metric_output<kt::device_space>{gpu_metric.data(), slots, kind, window},
                  {scratch.data(), scratch.size()}, nullptr, sequence_lengths);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = gpu_metric.download();

  const double u = kt::element_traits<float>::unit_roundoff, D = double(head_dim);
  const double power = kind == ev::metric_kind::squared_sum || kind == ev::metric_kind::squared_mean ? 2.0 : 1.0;
  std::vector<bool> held(static_cast<std::size_t>(slots), false);
  std::vector<std::int64_t> seeded(static_cast<std::size_t>(batch), 0);
  double worst = 0.0;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      const std::int64_t head = b * kv_heads + h;
      double largest_logit = 0.0;
      for (std::int64_t g = 0; g < group; ++g)
        for (std::int64_t q = 0; q < observed; ++q)
          for (std::int64_t j = 0; j < prompt(b); ++j) {
            double magnitude = 0.0;
            for (std::int64_t d = 0; d < head_dim; ++d)
              magnitude += std::abs(double(kt::to_float(queries(b, h * group + g, q, d))) *
                                    double(kt::to_float(keys(b, h, j, d))));
            largest_logit = std::max(largest_logit, magnitude / std::sqrt(D));
          }
      const double epsilon = 4.0 * (D + 5.0) * u * largest_logit + (double(prompt(b)) + 136.0) * u;
      const double relative = std::expm1(power * 2.0 * epsilon) + 2.0 * (double(group * observed) + 2.0) * u;
      for (std::int64_t i = 0; i < view.head_length(b, h); ++i) {
        const std::int64_t slot = view.slot(b, h, i);
        held[slot] = true;
        const double want = cpu_metric[slot], have = got[slot];
        seeded[b] += want != 0.0 ? 1 : 0;
        const double bound = relative * std::abs(want) + 1e-38;
        worst = std::max(worst, std::abs(have - want) / bound);
        ASSERT_LE(std::abs(have - want), bound) << "head " << head << ", kept token " << i << " (prompt token "
                                                << kept[offsets[head] + i] << "): cuda " << have << ", cpu " << want;
      }
    }
  for (std::int64_t b = 0; b < batch; ++b)
    EXPECT_GT(seeded[b], 0) << "the case must seed some tokens of sequence " << b << " (" << prompt(b) << " tokens)";
  for (const std::int64_t slot : compensation_slots) {
    EXPECT_EQ(cpu_metric[slot], 0.0f) << "the CPU seeds the compensation token 0 (slot " << slot << ")";
    EXPECT_EQ(got[slot], 0.0f) << "the compensation token is seeded 0 (slot " << slot << ")";
  }
  for (std::int64_t slot = 0; slot < slots; ++slot)
    if (!held[slot]) {
      ASSERT_EQ(got[slot], 0.0f) << "slot " << slot << " holds no token: seeded 0";
    }
  ::testing::Test::RecordProperty("worst_error_over_bound", std::to_string(worst));
}

TEST(EvictionSeed, DeviceSeedMatchesCpuSeed) {
  KVTRIM_SKIP_WITHOUT_GPU();
  {
    SCOPED_TRACE("GQA 4, D 128, 1500 prompt tokens, a window of 32 queries, L2");
    check_seed(2, 2, 4, 128, 1500, 32, 20, 300, ev::metric_kind::squared_sum);
  }
  {
    SCOPED_TRACE("GQA 1, D 64, 333 prompt tokens, a window of 70 queries (two row chunks), protected window 0, L1 mean");
    check_seed(1, 2, 1, 64, 333, 70, 0, 100, ev::metric_kind::mean);
  }
}

// Review E3 (issue 16): the flat layout, head dim 256 and the compensation token (seeded 0).
TEST(EvictionSeed, DeviceSeedMatchesCpuSeedFlatHeadDim256Compensation) {
  KVTRIM_SKIP_WITHOUT_GPU();
  {
    SCOPED_TRACE("flat, GQA 2, D 256, 700 prompt tokens, a window of 24 queries, compensation tokens, L2 mean");
    check_seed<kt::layout::flat>(2, 2, 2, 256, 700, 24, 16, 200, ev::metric_kind::squared_mean, true);
  }
  {
    SCOPED_TRACE("flat, GQA 4, D 128, 1500 prompt tokens, a window of 32 queries, L1");
    check_seed<kt::layout::flat>(1, 2, 4, 128, 1500, 32, 20, 300, ev::metric_kind::sum);
  }
  {
    SCOPED_TRACE("paged, GQA 8, D 256, 600 prompt tokens, a window of 16 queries, compensation tokens, L2");
    check_seed<kt::layout::paged>(1, 2, 8, 256, 600, 16, 8, 150, ev::metric_kind::squared_sum, true);
  }
}

// A right-padded batch (compress_options::sequence_lengths): each sequence seeded from the window
// at the end of its own T_b tokens, its padding NaN (never read), against the CPU seed with the
// same lengths. Lengths: all T, one more than the window (SnapKV's compress needs a token to
// score: its first window query at position 1), and an awkward 4097 (one token into a 65th key
// tile); the device runs pass 1 per sequence on batch-1 views of its first T_b keys (so a kept
// token's visible queries start at T_b − w, not T − w).
TEST(EvictionSeed, PaddedBatchSeedsEachSequenceFromItsOwnWindow) {
  KVTRIM_SKIP_WITHOUT_GPU();
  {
    SCOPED_TRACE("paged, 3 sequences of 4160, 33, 4097 tokens, GQA 4, D 128, a window of 32 queries, L2");
    check_seed(3, 2, 4, 128, 4160, 32, 20, 300, ev::metric_kind::squared_sum, false, {4160, 33, 4097});
  }
  {
    SCOPED_TRACE("flat, 4 sequences of 333, 25, 701, 65 tokens, GQA 4, D 128, a window of 24, compensation, L1 mean");
    check_seed<kt::layout::flat>(4, 2, 4, 128, 701, 24, 16, 200, ev::metric_kind::mean, true, {333, 25, 701, 65});
  }
  {
    SCOPED_TRACE("paged, 2 sequences of 71 and 600 tokens, GQA 8, D 256, a window of 70 (two row chunks), compensation");
    check_seed<kt::layout::paged>(2, 2, 8, 256, 600, 70, 8, 150, ev::metric_kind::squared_mean, true, {71, 600});
  }
}

// Lengths outside [w, T] are refused on the host, before anything is enqueued, with the CPU's
// message word for word (which names the function, `sequence_lengths`, the length and its
// sequence); the metric keeps its 7s on both sides. seed_workspace sizes them without a word
// (as if clamped into [w, T]): the refusal is seed_metric's, under its name, as on the CPU —
// the Python seed sizes its scratch first. Without a GPU the device views point at host copies the refused call must
// never touch (anything it enqueued would fail for want of a device, with another message), so
// this test runs on every machine; with one, they are device buffers.
TEST(EvictionSeed, PaddedBatchLengthsOutsideTheWindowAndTheKeysAreRefused) {
  using scheme = kt::scheme<kt::layout::paged, kt::score::snapkv, kt::budget::uniform, kt::codec::fp16, kt::backend::cpu>;
  using host_view = kt::layout::paged::view<kt::codec::fp16, kt::host_space>;
  using device_view = kt::layout::paged::view<kt::codec::fp16, kt::device_space>;
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 128};
  const std::int64_t batch = 3, tokens = 100, observed = 32, heads = batch * shape.kv_heads;
  const std::vector<std::int64_t> good{100, 33, 77};
  const auto keys = kt::testing::random_tensor<kt::half, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, 141);
  const auto values = kt::testing::random_tensor<kt::half, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, 142);
  const auto queries = kt::testing::random_tensor<kt::half, 4>({batch, shape.q_heads, observed, shape.head_dim}, 143);
  typename scheme::config cfg;
  cfg.score.window = observed;
  cfg.budget.keep = kt::keep_tokens{40};
  const kt::layout::paged::pool_size pool{heads * 3 + 3, 16};
  const std::size_t bytes = host_view::bytes(shape, batch, pool);
  host_block block(bytes);
  host_view view = host_view::bind(block.data, shape, batch, pool);
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
  std::vector<std::int32_t> kept(static_cast<std::size_t>(scheme::kept_tokens_capacity(shape, batch, tokens, cfg)));
  const kt::compress_options<kt::host_space> options{.kept_offsets = offsets.data(), .kept_tokens = kept.data(),
                                                     .kept_tokens_capacity = static_cast<std::int64_t>(kept.size()),
                                                     .sequence_lengths = good.data()};
  std::vector<std::byte> compress_scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), queries.cview(), view, cfg, options,
                   kt::workspace{compress_scratch.data(), compress_scratch.size()});
  const std::int64_t slots = kt::detail::storage_slots(view.storage);
  const std::vector<float> sevens(static_cast<std::size_t>(slots), 7.0f);
  std::vector<float> cpu_metric = sevens, host_metric = sevens;

  int devices = 0;
  const bool gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  std::vector<std::unique_ptr<device_buffer<std::byte>>> owned;
  const auto place = [&](const void* host, std::size_t size) -> void* {
    if (!gpu) return const_cast<void*>(host);
    owned.push_back(std::make_unique<device_buffer<std::byte>>(size));
    kt::testing::check(cudaMemcpy(owned.back()->data(), host, size, cudaMemcpyHostToDevice), "H2D");
    return owned.back()->data();
  };
  const auto* device_keys = static_cast<const kt::half*>(place(keys.storage.data(), keys.storage.size() * sizeof(kt::half)));
  const auto* device_queries =
      static_cast<const kt::half*>(place(queries.storage.data(), queries.storage.size() * sizeof(kt::half)));
  const kt::kv_view<const kt::half, kt::device_space> key_view{device_keys, keys.view.extents, keys.view.strides};
  const kt::window_view<const kt::half, kt::device_space> query_view{device_queries, queries.view.extents,
                                                                     queries.view.strides};
  const device_view gpu_view = device_view::bind(place(block.data, bytes), shape, batch, pool);
  const kt::selection_view<kt::device_space> gpu_kept{
      static_cast<const std::int64_t*>(place(offsets.data(), offsets.size() * sizeof(std::int64_t))),
      static_cast<const std::int32_t*>(place(kept.data(), kept.size() * sizeof(std::int32_t))), heads};
  auto* gpu_metric = static_cast<float*>(place(host_metric.data(), host_metric.size() * sizeof(float)));
  std::vector<std::byte> scratch_bytes(ev::seed_workspace(key_view, query_view, gpu_view, good.data()));
  void* scratch = place(scratch_bytes.data(), scratch_bytes.size());
  const auto device_metric = [&] {
    if (!gpu) return host_metric;
    std::vector<float> now(host_metric.size());
    kt::testing::check(cudaMemcpy(now.data(), gpu_metric, now.size() * sizeof(float), cudaMemcpyDeviceToHost), "D2H");
    return now;
  };
  const auto message_of = [](auto&& call) {
    try {
      call();
    } catch (const kt::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };

  for (const auto& [lengths, refused] : std::vector<std::pair<std::vector<std::int64_t>, std::int64_t>>{
           {{100, 31, 77}, 1},    // shorter than the window
           {{100, 33, 101}, 2},   // past T
           {{0, 33, 77}, 0},      // empty
           {{-1, 33, 77}, 0}}) {  // negative
    SCOPED_TRACE(::testing::Message() << "lengths " << lengths[0] << ", " << lengths[1] << ", " << lengths[2]);
    const std::string cpu = message_of([&] {
      ev::seed_metric(keys.cview(), queries.cview(), view, {offsets.data(), kept.data(), heads}, 0,
                      ev::metric_output<>{cpu_metric.data(), slots}, lengths.data());
    });
    const std::string device = message_of([&] {
      ev::seed_metric(key_view, query_view, gpu_view, gpu_kept, 0,
                      ev::metric_output<kt::device_space>{gpu_metric, slots},
                      {scratch, scratch_bytes.size()}, nullptr, lengths.data());
    });
    EXPECT_EQ(device, cpu) << "the CPU's message, word for word";
    EXPECT_NE(device.find("kvtrim::eviction::seed_metric: argument 'sequence_lengths'"), std::string::npos) << device;
    EXPECT_NE(device.find(kt::detail::cat("prompt lengths in [", observed, ", ", tokens, "]")), std::string::npos)
        << device;
    EXPECT_NE(device.find(kt::detail::cat(lengths[refused], " for sequence ", refused)), std::string::npos) << device;
    EXPECT_NO_THROW((void)ev::seed_workspace(key_view, query_view, gpu_view, lengths.data()))
        << "sizing refuses nothing: the refusal above is seed_metric's";
    EXPECT_EQ(cpu_metric, sevens) << "the CPU's metric is unchanged";
    EXPECT_EQ(device_metric(), sevens) << "the device's metric is unchanged (nothing was enqueued)";
  }
}

// Host arithmetic only (no GPU): with lengths, the seed's pass 1 runs per sequence, (1, T_b), in
// seed_workspace's scratch, which must hold each sequence's own batch-1 seed_workspace (its first
// T_b keys and its window alone), for every T_b in [w, T]; and seed_workspace without lengths,
// what an engine allocates once, must hold every such lengths' need. The batch's own (B, T)
// pass alone would not do: the plan's key splits grow as the row blocks shrink (not monotone in
// (batch, tokens)), and the sweep must hold such a case — at D 256 (G 8, w 65, B 2, T 4097:
// 2146432 bytes alone against the batch pass's 1540352), where the sm_90a wgmma plan does not
// apply, so any build has it.
TEST(EvictionSeed, WorkspaceWithLengthsHoldsEverySequenceAlone) {
  using device_view = kt::layout::paged::view<kt::codec::fp16, kt::device_space>;
  const auto keys_of = [](const kt::model_shape& shape, std::int64_t batch, std::int64_t tokens) {
    return kt::kv_view<const kt::half, kt::device_space>{
        nullptr, {batch, shape.kv_heads, tokens, shape.head_dim},
        {shape.kv_heads * tokens * shape.head_dim, tokens * shape.head_dim, shape.head_dim, 1}};
  };
  const auto window_of = [](const kt::model_shape& shape, std::int64_t batch, std::int64_t observed) {
    return kt::window_view<const kt::half, kt::device_space>{
        nullptr, {batch, shape.q_heads, observed, shape.head_dim},
        {shape.q_heads * observed * shape.head_dim, observed * shape.head_dim, shape.head_dim, 1}};
  };
  const auto cache_of = [](const kt::model_shape& shape, std::int64_t batch) {
    device_view view;  // seed_workspace reads the shape and batch only
    view.shape = shape;
    view.batch = batch;
    return view;
  };
  std::int64_t batch_size_short = 0;
  for (const kt::model_shape& shape : {kt::model_shape{.q_heads = 8, .kv_heads = 2, .head_dim = 128},
                                       kt::model_shape{.q_heads = 32, .kv_heads = 8, .head_dim = 128},
                                       kt::model_shape{.q_heads = 32, .kv_heads = 4, .head_dim = 128},
                                       kt::model_shape{.q_heads = 32, .kv_heads = 4, .head_dim = 256}})
    for (const std::int64_t observed : {32, 65, 129})
      for (const std::int64_t batch : {2, 3})
        for (const std::int64_t tokens : {1088, 4097, 5633}) {
          const auto keys = keys_of(shape, batch, tokens);
          const auto window = window_of(shape, batch, observed);
          const auto cache = cache_of(shape, batch);
          const std::size_t bound = ev::seed_workspace(keys, window, cache);  // any lengths
          const std::size_t batch_pass = kt::cuda_detail::seed_pass{0, batch, tokens, false}.bytes(shape, observed);
          ASSERT_GE(bound, batch_pass) << "without lengths, enough for the batch's own pass";
          for (std::int64_t length = observed; length <= tokens; ++length) {
            std::vector<std::int64_t> lengths(static_cast<std::size_t>(batch), length);
            lengths[0] = tokens;  // T_b = T, then the others at `length`
            const std::size_t given = ev::seed_workspace(keys, window, cache, lengths.data());
            if (given > bound) {
              ADD_FAILURE() << "q_heads " << shape.q_heads << ", kv_heads " << shape.kv_heads << ", D "
                            << shape.head_dim << ", w " << observed << ", B " << batch << ", T " << tokens
                            << ": lengths (" << tokens << ", " << length << "…) need " << given
                            << " bytes, seed_workspace without lengths gives " << bound;
              return;
            }
            for (const std::int64_t own : {tokens, length}) {
              const std::int64_t alone_lengths[1] = {own};  // exactly its own (1, T_b) pass
              const std::size_t alone = ev::seed_workspace(keys_of(shape, 1, own), window_of(shape, 1, observed),
                                                           cache_of(shape, 1), alone_lengths);
              if (alone > given) {
                ADD_FAILURE() << "q_heads " << shape.q_heads << ", kv_heads " << shape.kv_heads << ", D "
                              << shape.head_dim << ", w " << observed << ", B " << batch << ", T " << tokens
                              << ": a sequence of " << own << " tokens alone needs " << alone
                              << " bytes, seed_workspace with the lengths gives " << given;
                return;
              }
              batch_size_short += alone > batch_pass ? 1 : 0;
            }
          }
        }
  EXPECT_GT(batch_size_short, 0) << "the sweep must hold a sequence the batch's (B, T) size is too small for";
}

// ---- the eviction step: CPU and CUDA evict the same tokens, byte for byte -------

/// Metrics with ties, signed zeros, NaN, ∞, and a cluster just above 1 (1 + k·2⁻²³: the same
/// first two radix digits as 1.0, different last digits — the pool's last digit pass lists
/// them, so the tie pass resolves "above" and "tie" from the list in short heads and walks the
/// keys in long ones).
float awkward_metric(std::mt19937_64& random) {
  static constexpr float table[] = {0.0f,        -0.0f,       1.0f,  1.0f, 0x1.000002p0f, 0x1.000004p0f,
                                    0x1.000006p0f, 0.5f,      1e-30f, 3e38f, std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::quiet_NaN()};
  std::uniform_int_distribution<int> pick(0, 2 * static_cast<int>(std::size(table)));
  const int k = pick(random);
  return k < static_cast<int>(std::size(table)) ? table[k] : std::uniform_real_distribution<float>(0.0f, 1.0f)(random);
}

/// Builds `layers` caches on the host (rounds of 23 tokens per head so pages interleave, a
/// compensation token in every third head, awkward metrics), copies their memory blocks to the
/// device, evicts both copies (CPU reference, CUDA) and compares every byte of every block
/// (codes, steps, the codecs' side buffers and slot lists, positions, page tables, free lists),
/// every metric and the reports.
template <class Layout, class Codec = kt::codec::fp16>
void check_same_eviction(ev::scope scope, std::int64_t layers, std::int64_t batch, std::int64_t kv_heads,
                         std::int64_t longest, std::uint64_t seed, bool retrieval, std::int64_t shortest = 1,
                         std::int64_t page_size = 16, std::int64_t head_dim = 64, std::int64_t window = 9,
                         const typename Codec::config& codec_config = {}, std::int64_t keep = 60) {
  using codec = Codec;
  using cpu_scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, codec, kt::backend::cpu>;
  using host_view = typename Layout::template view<codec, kt::host_space>;
  using device_view = typename Layout::template view<codec, kt::device_space>;
  const kt::model_shape shape{.q_heads = kv_heads * 2, .kv_heads = kv_heads, .head_dim = head_dim};
  const auto pool = [&] {
    if constexpr (std::is_same_v<Layout, kt::layout::paged>)
      return kt::layout::paged::pool_size{batch * kv_heads * ((longest + page_size - 1) / page_size) + 5, page_size};
    else  // whole runs of up to 32 slots (KIVI groups), and room for the appends' repacks
      return kt::layout::flat::pool_size{batch * kv_heads * ((longest + 40 + 31) / 32 * 32)};
  }();
  const std::size_t bytes = host_view::bytes(shape, batch, pool, codec_config);
  std::mt19937_64 random(seed);
  std::uniform_int_distribution<std::int64_t> length(shortest, longest);
  std::vector<std::unique_ptr<host_block>> blocks;
  std::vector<host_view> host_views;
  std::vector<std::vector<float>> metrics;
  for (std::int64_t l = 0; l < layers; ++l) {
    blocks.push_back(std::make_unique<host_block>(bytes));
    host_views.push_back(host_view::bind(blocks.back()->data, shape, batch, pool, codec_config));
    if constexpr (std::is_same_v<Codec, kt::codec::low_rank>)  // calibrated bases: installed before any append
      if (codec_config.source == kt::codec::basis_source::profile)
        kt::testing::install_random_bases(host_views.back().storage, batch * kv_heads, head_dim, seed + l);
    auto keys = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, longest, shape.head_dim}, seed + 3 * l);
    auto values = kt::testing::random_tensor<kt::half, 4>({batch, kv_heads, longest, shape.head_dim}, seed + 3 * l + 1);
    // Rounds of 23 tokens per head, so pages interleave in the pool.
    std::vector<std::int64_t> wanted(static_cast<std::size_t>(batch * kv_heads)), done(wanted.size(), 0);
    for (auto& n : wanted) n = length(random);
    if (shortest == 0) wanted[0] = 0;  // an empty head in every layer
    for (bool more = true; more;) {
      more = false;
      for (std::int64_t head = 0; head < batch * kv_heads; ++head) {
        const std::int64_t count = std::min<std::int64_t>(23, wanted[head] - done[head]);
        if (count <= 0) continue;
        const std::int64_t b = head / kv_heads, h = head % kv_heads;
        const kt::tensor_view<const kt::half, 2> k{&keys(b, h, done[head], 0), {count, shape.head_dim},
                                                   {keys.view.stride(2), keys.view.stride(3)}};
        const kt::tensor_view<const kt::half, 2> v{&values(b, h, done[head], 0), {count, shape.head_dim},
                                                   {values.view.stride(2), values.view.stride(3)}};
        cpu_scheme::append_head(host_views.back(), b, h, k, v);
        done[head] += count;
        more = true;
      }
    }
    if constexpr (std::is_same_v<Layout, kt::layout::paged>) {
      // Pages of one token: swap the page-table entries of tokens 4j + 1 and 4j + 2 of every head,
      // so that four tokens whose first and last slots are 3 apart (a 23-token round is consecutive
      // slots) have their middle two out of order — the device walks' 16-byte loads must not take them.
      if (page_size == 1)
        for (std::int64_t head = 0; head < batch * kv_heads; ++head) {
          std::int32_t* table = host_views.back().indices + host_views.back().indptr[head];
          const std::int64_t pages = host_views.back().indptr[head + 1] - host_views.back().indptr[head];
          for (std::int64_t j = 0; 4 * j + 2 < pages; ++j) std::swap(table[4 * j + 1], table[4 * j + 2]);
        }
    }
    for (std::int64_t head = 0; head < batch * kv_heads; ++head) {  // a compensation token in every third head
      const std::int64_t n = host_views.back().head_length(head / kv_heads, head % kv_heads);
      if (head % 3 == 1 && n > 2) host_views.back().compensation.index[head] = static_cast<std::int32_t>(n / 2);
    }
    const std::int64_t slots = kt::detail::storage_slots(host_views.back().storage);
    metrics.emplace_back(static_cast<std::size_t>(slots), 0.0f);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h)
        for (std::int64_t i = 0; i < host_views.back().head_length(b, h); ++i)
          metrics.back()[host_views.back().slot(b, h, i)] = awkward_metric(random);
  }
  // The device copies, before the CPU evicts the host ones.
  std::vector<std::unique_ptr<device_buffer<std::byte>>> device_blocks;
  std::vector<std::unique_ptr<device_buffer<float>>> device_metrics;
  std::vector<device_view> device_views;
  std::vector<ev::metric_output<kt::device_space>> device_outputs;
  std::vector<ev::metric_output<>> host_outputs;
  ev::config cfg{.scope = scope, .keep = keep, .interval = 16, .sinks = 3, .protected_window = window, .alpha = 0.3};
  for (std::int64_t l = 0; l < layers; ++l) {
    device_blocks.push_back(std::make_unique<device_buffer<std::byte>>(bytes));
    kt::testing::check(cudaMemcpy(device_blocks.back()->data(), blocks[l]->data, bytes, cudaMemcpyHostToDevice), "H2D");
    device_views.push_back(device_view::bind(device_blocks.back()->data(), shape, batch, pool, codec_config));
    device_metrics.push_back(std::make_unique<device_buffer<float>>(metrics[l]));
    device_outputs.push_back({device_metrics.back()->data(), static_cast<std::int64_t>(metrics[l].size()),
                              ev::metric_kind::squared_sum, cfg.protected_window});
    host_outputs.push_back({metrics[l].data(), static_cast<std::int64_t>(metrics[l].size()),
                            ev::metric_kind::squared_sum, cfg.protected_window});
  }
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(layers * kv_heads), 0);
  if (retrieval) mask[1] = 1, mask.back() = 1;
  device_buffer<std::uint8_t> device_mask(mask);

  device_buffer<std::byte> scratch(kt::evict_workspace<kt::backend::cuda>(std::span<const device_view>(device_views)));
  device_buffer<ev::report> device_report(1);
  const auto device_evict = [&] {
    kt::evict<kt::backend::cuda>(std::span<const device_view>(device_views),
                                 std::span<const ev::metric_output<kt::device_space>>(device_outputs), cfg,
                                 {scratch.data(), scratch.size()}, nullptr, device_report.data(), device_mask.data());
  };
  if (kt::codec::is_plain<Codec> && head_dim * static_cast<std::int64_t>(sizeof(kt::half)) % 16 != 0) {
    // Rows the device step does not move (16-byte units): refused before anything is written.
    EXPECT_THROW(device_evict(), kt::error);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (std::int64_t l = 0; l < layers; ++l) {
      const auto device_bytes = kt::testing::download_bytes(device_blocks[l]->data(), bytes);
      EXPECT_EQ(0, std::memcmp(device_bytes.data(), blocks[l]->data, bytes)) << "layer " << l << ": the cache changed";
      const std::vector<float> got_metric = device_metrics[l]->download();
      EXPECT_EQ(0, std::memcmp(got_metric.data(), metrics[l].data(), metrics[l].size() * sizeof(float)))
          << "layer " << l << ": the metric changed";
    }
    return;
  }

  // low_rank's pending slots before the step: the case must move some pending tokens (the
  // device's fix-up of their entries is what the byte comparison then checks).
  std::vector<std::vector<std::int64_t>> pending_before;
  if constexpr (std::is_same_v<Codec, kt::codec::low_rank>)
    for (const host_view& view : host_views)
      if (view.storage.update_freq > 0)
        pending_before.emplace_back(view.storage.pending_slots,
                                    view.storage.pending_slots + view.storage.heads * view.storage.update_freq);

  ev::config host_cfg = cfg;
  host_cfg.retrieval_heads = mask.data();
  std::vector<std::byte> host_scratch(kt::evict_workspace<kt::backend::cpu>(std::span<const host_view>(host_views)));
  const ev::report host_report = kt::evict<kt::backend::cpu>(
      std::span<const host_view>(host_views), std::span<const ev::metric_output<>>(host_outputs), host_cfg,
      kt::workspace{host_scratch.data(), host_scratch.size()});

  device_evict();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const ev::report got_report = device_report.download()[0];
  EXPECT_EQ(got_report.evicted_tokens, host_report.evicted_tokens);
  EXPECT_EQ(got_report.freed_pages, host_report.freed_pages);
  EXPECT_EQ(got_report.units_evicted, host_report.units_evicted);
  EXPECT_EQ(got_report.units_over_target, host_report.units_over_target);
  EXPECT_GT(host_report.evicted_tokens, 0) << "the case must evict something";
  if constexpr (std::is_same_v<Codec, kt::codec::low_rank>)
    if (!pending_before.empty()) {
      std::int64_t moved = 0;  // pending entries the CPU's move_slot rewrote
      for (std::size_t l = 0; l < host_views.size(); ++l) {
        const auto& store = host_views[l].storage;
        for (std::int64_t head = 0; head < store.heads; ++head)
          for (std::int64_t p = 0; p < store.pending_counts[head]; ++p) {
            const std::size_t at = static_cast<std::size_t>(head * store.update_freq + p);
            moved += store.pending_slots[at] != pending_before[l][at] ? 1 : 0;
          }
      }
      EXPECT_GT(moved, 0) << "the case must move pending tokens (low_rank's sequence bases)";
    }
  for (std::int64_t l = 0; l < layers; ++l) {
    const auto device_bytes = kt::testing::download_bytes(device_blocks[l]->data(), bytes);
    std::size_t first_difference = bytes;
    for (std::size_t k = 0; k < bytes && first_difference == bytes; ++k)
      if (device_bytes[k] != static_cast<const std::byte*>(blocks[l]->data)[k]) first_difference = k;
    EXPECT_EQ(first_difference, bytes) << "layer " << l << ": the caches differ from byte " << first_difference
                                       << " of " << bytes;
    const std::vector<float> got_metric = device_metrics[l]->download();
    EXPECT_EQ(0, std::memcmp(got_metric.data(), metrics[l].data(), metrics[l].size() * sizeof(float))) << "layer " << l;
  }
}

TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsPaged) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_same_eviction<kt::layout::paged>(scope, 3, 2, 3, 700, 41, true);
  }
}
// Heads longer than the prepare kernel's shared-memory key cache (24576 keys): the rest of
// their keys are read back from the key array; keep 60 of ~30000 evicts nearly everything,
// so the hole list and the moves are long.
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsLongHeads) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_same_eviction<kt::layout::paged>(scope, 2, 1, 2, 30000, 47, false, 25000);
  }
}
// Long heads keeping 6000: the holes below K span several 2048-key chunks of compact's walk
// (keys loaded a chunk ahead while the hole list is written behind; ties ranked across chunks).
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsLongHeadsKeepingMany) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const ev::scope scope : {ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_same_eviction<kt::layout::paged>(scope, 2, 1, 2, 30000, 83, false, 25000, 16, 64, 9, {}, 6000);
  }
}
// Per head with 8 kv heads: units up to batch · layers · 8, more than the pooled scopes'
// histograms are sized for (per head has no pool: prepare must not touch them).
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsPerHeadEightHeads) {
  KVTRIM_SKIP_WITHOUT_GPU();
  check_same_eviction<kt::layout::paged>(ev::scope::per_head, 2, 2, 8, 400, 53, false);
}
// Pages of one token, their tables permuted within groups of four (see check_same_eviction):
// the walks' 16-byte metric/position loads only where all four slots are consecutive.
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsPagesOfOne) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_same_eviction<kt::layout::paged>(scope, 2, 2, 2, 300, 59, false, 1, 1);
  }
}
// Pages of 12 tokens (a multiple of four, not a power of two: four aligned tokens share a page,
// slots found by division) and of 6 (neither: every 16-byte load checks its four slots), heads
// of up to 700 tokens across pages, the first head of every layer empty.
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsPagesOfTwelveAndSix) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const std::int64_t page : {12, 6})
    for (const ev::scope scope : {ev::scope::per_head, ev::scope::cross_layer}) {
      SCOPED_TRACE(::testing::Message() << "page " << page << ", scope " << int(scope));
      check_same_eviction<kt::layout::paged>(scope, 2, 2, 2, 700, 71 + page, scope == ev::scope::cross_layer, 0, page);
    }
}
// Head dims whose fp16 rows are not whole 16-byte units: 12 (24 bytes) is refused with
// kvtrim::error and nothing written; 8 (16 bytes, one unit a row: 2048 / 1 tail rows per
// chunk before the cap) is moved, the tail in chunks of at most one token per thread.
TEST(EvictionStep, CudaRowsNotWhole16ByteUnitsAreRefused) {
  KVTRIM_SKIP_WITHOUT_GPU();
  check_same_eviction<kt::layout::paged>(ev::scope::per_layer, 1, 1, 2, 300, 61, false, 1, 16, 12);
}
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsSixteenByteRows) {
  KVTRIM_SKIP_WITHOUT_GPU();
  // A protected window of 1500 tokens: tails of ~1500 tokens shift down past the evicted ones,
  // in chunks that rows of one 16-byte unit would have made 2048 tokens long (> 512 threads).
  check_same_eviction<kt::layout::flat>(ev::scope::per_layer, 1, 1, 2, 2500, 67, false, 2000, 16, 8, 1500);
}
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsFlat) {
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_same_eviction<kt::layout::flat>(scope, 2, 3, 2, 1500, 43, scope == ev::scope::cross_layer);
  }
}

// ---- the quantizing codecs: items of U tokens (KIVI runs), pins, codec parts moved ----
//
// KIVI key groups of 32 over pages of 16 (U = 16), groups of 8 (U = 8), flat's whole groups
// (U = 32), per-token keys (U = 1), zero points, int4's packed codes, fp8, and layered<C>'s
// fp16 rows (3 sinks, a ring of 40, pinned) over KIVI int8 and fp8: the tokens of a filling
// group and of the fp16 rows are pinned, runs are evicted and moved whole, and the codecs'
// slot lists (residual_slots, row_slots) follow the moves. Heads of 1 … 400 tokens built in
// rounds of 23 (groups sealed across rounds, residual windows of every fill), every scope.

template <class Layout, class Codec>
void check_codec_eviction(const typename Codec::config& config, std::int64_t page_size, std::int64_t keep,
                          std::uint64_t seed) {
  for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}) {
    SCOPED_TRACE(::testing::Message() << "scope " << int(scope));
    check_same_eviction<Layout, Codec>(scope, 2, 2, 2, 400, seed, scope == ev::scope::cross_layer, 1, page_size, 64, 9,
                                       config, keep);
  }
}

kt::codec::int8::config kivi8(std::int64_t group, bool zero_points) {
  kt::codec::int8::config c{};
  c.key_group = group;
  c.asymmetric = zero_points;
  return c;
}

TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsInt8) {
  KVTRIM_SKIP_WITHOUT_GPU();
  {
    SCOPED_TRACE("paged, groups of 32 over pages of 16 (U = 16)");
    check_codec_eviction<kt::layout::paged, kt::codec::int8>(kivi8(32, false), 16, 150, 71);
  }
  {
    SCOPED_TRACE("paged, groups of 8 with zero points (U = 8)");
    check_codec_eviction<kt::layout::paged, kt::codec::int8>(kivi8(8, true), 16, 90, 72);
  }
  {
    SCOPED_TRACE("paged, per-token keys with zero points (U = 1)");
    kt::codec::int8::config c = kivi8(32, true);
    c.keys = kt::codec::key_scaling::per_token;
    check_codec_eviction<kt::layout::paged, kt::codec::int8>(c, 16, 60, 73);
  }
  {
    SCOPED_TRACE("flat, groups of 32 (U = 32)");
    check_codec_eviction<kt::layout::flat, kt::codec::int8>(kivi8(32, true), 16, 100, 74);
  }
  {
    SCOPED_TRACE("flat, per-token keys (U = 1)");
    kt::codec::int8::config c = kivi8(32, false);
    c.keys = kt::codec::key_scaling::per_token;
    check_codec_eviction<kt::layout::flat, kt::codec::int8>(c, 16, 60, 75);
  }
}

TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsInt4) {
  KVTRIM_SKIP_WITHOUT_GPU();
  kt::codec::int4::config c{};
  c.key_group = 32;
  c.asymmetric = true;
  {
    SCOPED_TRACE("paged, groups of 32 with zero points over pages of 16 (U = 16)");
    check_codec_eviction<kt::layout::paged, kt::codec::int4>(c, 16, 150, 81);
  }
  c.asymmetric = false;
  {
    SCOPED_TRACE("flat, symmetric groups of 32 (U = 32)");
    check_codec_eviction<kt::layout::flat, kt::codec::int4>(c, 16, 200, 82);
  }
}

TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsFp8) {
  KVTRIM_SKIP_WITHOUT_GPU();
  check_codec_eviction<kt::layout::paged, kt::codec::fp8>({}, 16, 60, 91);
  check_codec_eviction<kt::layout::flat, kt::codec::fp8>({}, 16, 60, 92);
}

TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsLayered) {
  KVTRIM_SKIP_WITHOUT_GPU();
  kt::codec::layered<kt::codec::int8>::config int8_rows{};
  int8_rows.inner = kivi8(8, true);
  int8_rows.sinks = 3;
  int8_rows.recent = 40;
  {
    SCOPED_TRACE("paged, layered<int8> (groups of 8, U = 8)");
    check_codec_eviction<kt::layout::paged, kt::codec::layered<kt::codec::int8>>(int8_rows, 16, 120, 101);
  }
  {
    SCOPED_TRACE("flat, layered<int8> (U = 8)");
    check_codec_eviction<kt::layout::flat, kt::codec::layered<kt::codec::int8>>(int8_rows, 16, 120, 102);
  }
  kt::codec::layered<kt::codec::fp8>::config fp8_rows{};
  fp8_rows.sinks = 3;
  fp8_rows.recent = 40;
  {
    SCOPED_TRACE("paged, layered<fp8>");
    check_codec_eviction<kt::layout::paged, kt::codec::layered<kt::codec::fp8>>(fp8_rows, 16, 100, 103);
  }
  {
    SCOPED_TRACE("flat, layered<fp8>");
    check_codec_eviction<kt::layout::flat, kt::codec::layered<kt::codec::fp8>>(fp8_rows, 16, 100, 104);
  }
}

// low_rank: key and value coefficient rows moved as stored (16-byte parts at stored rank 32,
// 2-byte parts at 20), bases left in place. Sequence bases refreshed every 16 appended tokens
// (the CPU builds the caches: rounds of 23 tokens leave 0–15 pending a head) under a window of
// 5, shorter than update_freq, so the pending tokens are pinned by codec_pins alone and their
// pending_slots entries must follow the tail's shift; profile bases (ragged ranks per head, no
// pending buffer).
TEST(EvictionStep, CudaEvictsWhatTheCpuEvictsLowRank) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const auto low_rank = [](kt::codec::basis_source source, std::int64_t max_rank) {
    kt::codec::low_rank::config c{};
    c.source = source;
    c.max_rank = max_rank;
    c.update_freq = 16;
    return c;
  };
  using kt::codec::basis_source;
  const struct {
    const char* what;
    bool paged;
    kt::codec::low_rank::config config;
    std::uint64_t seed;
  } cases[] = {
      {"paged, sequence bases, stored rank 32 (16-byte parts)", true, low_rank(basis_source::sequence, 32), 111},
      {"flat, sequence bases, stored rank 20 (2-byte parts)", false, low_rank(basis_source::sequence, 20), 112},
      {"paged, profile bases, stored rank 20", true, low_rank(basis_source::profile, 20), 113},
      {"flat, profile bases, stored rank 32", false, low_rank(basis_source::profile, 32), 114},
  };
  for (const auto& c : cases)
    for (const ev::scope scope : {ev::scope::per_head, ev::scope::per_layer, ev::scope::cross_layer}) {
      SCOPED_TRACE(::testing::Message() << c.what << ", scope " << int(scope));
      const bool retrieval = scope == ev::scope::cross_layer;
      if (c.paged)
        check_same_eviction<kt::layout::paged, kt::codec::low_rank>(scope, 2, 2, 2, 400, c.seed, retrieval, 1, 16, 64,
                                                                    5, c.config, 60);
      else
        check_same_eviction<kt::layout::flat, kt::codec::low_rank>(scope, 2, 2, 2, 400, c.seed, retrieval, 1, 16, 64,
                                                                   5, c.config, 60);
    }
}

}  // namespace
