// kvtrim/backend/cpu/decode_attention.hpp — CPU decode attention over any
// layout and codec.
//
// For query head j of sequence b, with kv head h = j / group_size and the n
// tokens the cache holds for (b, h):
//   s_i   = (q · k_i) / √D  + bias_i     (bias_i: the layout's logit bias, e.g.
//                                         RazorAttention's ln(N_dropped), added
//                                         after the scale so it counts tokens exactly:
//                                         exp(q·k̂/√D + ln N) = N·exp(q·k̂/√D), N copies
//                                         of the mean token; before the scale it would
//                                         weigh only N^{1/√D} copies)
//   p_i   = exp(s_i − max s) / Σ exp(s − max s)
//   out   = Σ p_i v_i
// in fp32, in one pass over the cache with an online softmax (Milakov &
// Gimelshein 2018; FlashAttention's form): tokens go in blocks; each q·k is
// computed once, and when a block raises the running max m to m', the sums so
// far are scaled by exp(m − m'). Against the two-pass textbook form (the double
// oracle of the tests) this changes only rounding: tests/cpu/decode_attention_test
// and codec_attention_test bound it (a few fp32 ulps per term).
//
// exp is the backend's own (detail/exp.hpp: ≤ 1.013 ulp, eight lanes at a time
// where the CPU has AVX2+FMA, the same bits one at a time elsewhere).
//
// Two paths:
//   - codec::plain (fp16, bf16, fp32): all query heads of a kv head's group at
//     once, so each key and value row is read and converted once per group.
//     On x86 CPUs with AVX2, FMA and F16C (chosen at run time) the stored rows
//     are read in place by detail/x86.hpp's loops — converted in registers,
//     blocks of 64 rows, the next rows prefetched while the current ones are
//     computed; elsewhere each block is first converted to fp32 (branch-free
//     fp16 → fp32, exact) and the portable loops run over it: same math, see
//     x86.hpp for rounding.
//   - every other codec: through the codec's attention reader (codec/hooks.hpp),
//     one query head at a time (low rank computes (q·U)·c and (Σ p·c)·Uᵀ without
//     rebuilding keys; pre-RoPE codecs rotate key i by its position, read from
//     the layout). The reader's interface is reached at exactly
//     two places (make_reader, reader_dot below), so a change of that interface
//     is a two-line change here.
// Threads: (sequence, kv head) units over OpenMP (backend/cpu.hpp); each unit
// is computed by one thread in a fixed order, so the result does not depend on
// the thread count. No scratch: rows live on the stack.
//
// Multi-query decode (speculative decoding: n = 1..8 new tokens per sequence,
// the same n for every sequence): queries [B, n, Hq, D]; the n new tokens are
// already the last n tokens of every head, and query t of n sees the head's
// first L − n + 1 + t tokens (itself and the tokens before it: causal among the
// new ones). A head holding fewer than n tokens cannot hold its new tokens and
// is refused. The plain path takes the group × n query rows (row r: token
// r / group, head r % group) eight at a time over rows converted once; logits
// past a row's last visible token are −∞ (weight 0). n = 1 is this path with
// one token: the same arithmetic in the same order as before.
//
// Eviction metric (optional, eviction/metric.hpp): the same call can add each
// token's c_i (Σ_g p², Σ_g p or their group means) to metric[slot] for tokens
// older than the protected window. The probabilities are the ones this pass
// computes: every logit s_gi (after scale and bias, the very float the
// softmax used) is kept in the workspace, and once the head's final max m_g and
// sum l_g are known, p_gi = exp(s_gi − m_g) / l_g — the CUDA kernel does the
// same after its split-K merge (here eight tokens at a time where the CPU has
// AVX2+FMA, the same bits: add_metric). Scratch: per thread, group × head
// length floats.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/detail/exp.hpp"
#include "kvtrim/backend/cpu/detail/x86.hpp"
#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/eviction/metric.hpp"

namespace kvtrim::detail {

/// fp16 → fp32 for a row, exact (the same bits as Eigen::half's conversion, also
/// for subnormals, ±Inf and NaN), without branches so the loop vectorises.
inline void half_row_to_float(const half* in, float* out, std::int64_t count) {
  const auto* bits = reinterpret_cast<const std::uint16_t*>(in);
  constexpr std::uint32_t shifted_exponent = 0x7c00u << 13;
  constexpr float magic = 6.103515625e-05f;  // 2^-14: bits 113 << 23
  for (std::int64_t i = 0; i < count; ++i) {
    const std::uint32_t h = bits[i];
    std::uint32_t o = (h & 0x7fffu) << 13;
    const std::uint32_t exponent = o & shifted_exponent;
    o += (127u - 15u) << 23;
    o += exponent == shifted_exponent ? (128u - 16u) << 23 : 0u;  // Inf / NaN
    float normal, subnormal;
    std::memcpy(&normal, &o, sizeof o);
    const std::uint32_t o_subnormal = o + (1u << 23);
    std::memcpy(&subnormal, &o_subnormal, sizeof o_subnormal);
    subnormal -= magic;
    float value = exponent == 0 ? subnormal : normal;
    std::uint32_t value_bits;
    std::memcpy(&value_bits, &value, sizeof value);
    value_bits |= (h & 0x8000u) << 16;
    std::memcpy(&out[i], &value_bits, sizeof value_bits);
  }
}

/// Any element row → fp32 (fp16 branch-free, bf16 a shift, fp32 a copy).
template <class T>
inline void row_to_float(const T* in, float* out, std::int64_t count) {
  if constexpr (std::is_same_v<T, half>) {
    half_row_to_float(in, out, count);
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    const auto* bits = reinterpret_cast<const std::uint16_t*>(in);
    for (std::int64_t i = 0; i < count; ++i) {
      const std::uint32_t value = static_cast<std::uint32_t>(bits[i]) << 16;
      std::memcpy(&out[i], &value, sizeof value);
    }
  } else {
    for (std::int64_t i = 0; i < count; ++i) out[i] = to_float(in[i]);
  }
}

/// q·k over `count` floats in eight lanes (vectorises; fixed order).
inline float dot_lanes(const float* a, const float* b, std::int64_t count) {
  float lanes[8] = {};
  std::int64_t d = 0;
  for (; d + 8 <= count; d += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[d + l] * b[d + l];
  float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; d < count; ++d) sum += a[d] * b[d];
  return sum;
}

}  // namespace kvtrim::detail

namespace kvtrim {

template <>
struct implementation<stage::decode_attention, backend::cpu> {
  template <class View>
  static std::size_t workspace_bytes(const View&) {
    return 0;  // rows live on the stack (head_dim ≤ max_head_dim)
  }
  /// With an eviction metric: every thread keeps its unit's logits (group × longest head).
  template <class View>
  static std::size_t workspace_bytes(const View& cache, const eviction::metric_output<host_space>& metric) {
    if (!metric.enabled()) return 0;
    const std::int64_t units = cache.batch * cache.shape.kv_heads;
    return static_cast<std::size_t>(std::min(detail::cpu_threads(), std::max<std::int64_t>(units, 1)) *
                                    metric_thread_floats(cache, metric)) *
           sizeof(float);
  }

  template <class View>
  static std::size_t workspace_bytes(const View&, std::int64_t /*queries_per_sequence*/) {
    return 0;
  }

  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 3>& queries, const View& cache, const tensor_view<OutT, 3>& out,
                     workspace scratch, backend::host_stream stream) {
    attend(queries, cache, out, scratch, stream, eviction::metric_output<host_space>{});
  }

  /// attend() that also adds the eviction metric of every token older than the
  /// protected window to metric.values[slot] (eviction/metric.hpp).
  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 3>& queries, const View& cache, const tensor_view<OutT, 3>& out,
                     workspace scratch, backend::host_stream stream, const eviction::metric_output<host_space>& metric) {
    attend(one_token(queries), cache, one_token(out), scratch, stream, metric);
  }

  /// Multi-query decode: queries and out [B, n, Hq, D], query t of n seeing the
  /// head's first L − n + 1 + t tokens. The metric needs n = 1: speculative
  /// queries may yet be rejected, and the metric sums the attention of accepted ones.
  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 4>& queries, const View& cache, const tensor_view<OutT, 4>& out,
                     workspace scratch, backend::host_stream,
                     const eviction::metric_output<host_space>& metric = eviction::metric_output<host_space>{}) {
    const std::int64_t queries_per_sequence = queries.extent(1);
    if (metric.enabled() && queries_per_sequence != 1)
      detail::fail("kvtrim::scheme::attend", "metric",
                   "one query per sequence with an eviction metric (speculative queries may be rejected; the metric "
                   "sums the attention of accepted tokens)",
                   detail::cat(queries_per_sequence, " queries per sequence"));
    for (std::int64_t b = 0; b < cache.batch; ++b)  // refuse before any thread starts
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h)
        if (cache.head_length(b, h) < queries_per_sequence)
          detail::fail("kvtrim::scheme::attend", "cache",
                       queries_per_sequence == 1
                           ? std::string("at least one token in every head")
                           : detail::cat("at least ", queries_per_sequence,
                                         " tokens in every head (the new tokens are the cache's last ",
                                         queries_per_sequence, ")"),
                       cache.head_length(b, h) == 0
                           ? detail::cat("an empty head (sequence ", b, ", kv head ", h, ")")
                           : detail::cat(cache.head_length(b, h), " tokens in sequence ", b, ", kv head ", h));
    const std::int64_t units = cache.batch * cache.shape.kv_heads;
    const std::int64_t thread_floats = metric.enabled() ? metric_thread_floats(cache, metric) : 0;
    const std::int64_t stride = metric.enabled() ? logit_stride(cache) : 0;
    const std::int64_t threads =
        detail::cpu_threads_for(units, static_cast<std::size_t>(thread_floats) * sizeof(float), scratch.bytes);
    detail::cpu_parallel_for(units, threads, [&](std::int64_t unit, std::int64_t thread) {
      const std::int64_t b = unit / cache.shape.kv_heads, h = unit % cache.shape.kv_heads;
      group_state state{};
      if (metric.enabled()) {
        state.logits = static_cast<float*>(scratch.data) + thread * thread_floats;
        state.stride = stride;
      }
      // One step late: the previous step's c_i first, from its queries over the keys as they are now.
      if (metric.deferred()) add_pending_metric(cache, metric, b, h, state);
      attend_unit(queries, cache, out, b, h, state);
      if (metric.deferred())
        commit_metric_carry(queries, cache, metric, b, h, state);
      else if (metric.enabled()) {
        const std::int64_t head = b * cache.shape.kv_heads + h;
        add_metric(cache, metric, b, h, state, cache.positions.next_position[head], state.max_logit.data(),
                   state.denominator.data());
      }
    });
  }

  /// eviction::flush_metric: adds the one-step-late metric's pending step (metric.carry) to
  /// metric.values and clears it (carry.next = 0), for every head that has one.
  template <class View>
  static void flush_metric(const View& cache, workspace scratch, const eviction::metric_output<host_space>& metric) {
    const std::int64_t units = cache.batch * cache.shape.kv_heads;
    const std::int64_t thread_floats = metric_thread_floats(cache, metric);
    const std::int64_t stride = logit_stride(cache);
    const std::int64_t threads =
        detail::cpu_threads_for(units, static_cast<std::size_t>(thread_floats) * sizeof(float), scratch.bytes);
    detail::cpu_parallel_for(units, threads, [&](std::int64_t unit, std::int64_t thread) {
      const std::int64_t b = unit / cache.shape.kv_heads, h = unit % cache.shape.kv_heads;
      group_state state{};
      state.logits = static_cast<float*>(scratch.data) + thread * thread_floats;
      state.stride = stride;
      add_pending_metric(cache, metric, b, h, state);
      metric.carry.next[b * cache.shape.kv_heads + h] = 0;
    });
  }

 private:
  /// A [B, Hq, D] view as [B, 1, Hq, D].
  template <class T>
  static tensor_view<T, 4> one_token(const tensor_view<T, 3>& view) {
    return {view.data, {view.extent(0), 1, view.extent(1), view.extent(2)}, {view.stride(0), 0, view.stride(1), view.stride(2)}};
  }

  /// Where a unit's logits go when the metric is asked for (logits null: not asked).
  struct group_state {
    float* logits = nullptr;  // [group][stride]: s_gi after scale and bias
    std::int64_t stride = 0;
    std::array<float, 16> max_logit{}, denominator{};  // the final m_g, l_g (GQA groups ≤ 16 with a metric)
  };

  template <class View, class QueryT, class OutT>
  static void attend_unit(const tensor_view<QueryT, 4>& queries, const View& cache, const tensor_view<OutT, 4>& out,
                          std::int64_t b, std::int64_t h, group_state& state) {
    if constexpr (codec::is_plain<typename View::codec>)
      attend_plain(queries, cache, out, b, h, state);
    else
      for (std::int64_t t = 0; t < queries.extent(1); ++t)
        for (std::int64_t g = 0; g < cache.shape.group_size(); ++g) attend_generic(queries, cache, out, b, h, t, g, state);
  }

  /// The pending step of head (b, h), if any: the logits of its queries (metric.carry) over the
  /// head's keys as they are now — computed by the same arithmetic attend uses, so a token the
  /// step saw gets the logit it had then — and c_i with the step's own normaliser and next position.
  template <class View>
  static void add_pending_metric(const View& cache, const eviction::metric_output<host_space>& metric, std::int64_t b,
                                 std::int64_t h, group_state& state) {
    const std::int64_t head = b * cache.shape.kv_heads + h;
    const std::int64_t next = metric.carry.next[head];
    // Nothing pending, or a carry the head cannot have left (its tokens were replaced: metric.hpp).
    if (next <= 0 || next > cache.positions.next_position[head]) return;
    const std::int64_t q_heads = cache.shape.q_heads, head_dim = cache.shape.head_dim;
    pending_logits(metric.carry.queries + (b * q_heads + h * cache.shape.group_size()) * head_dim, cache, b, h, state);
    std::array<float, 16> max_logit{}, denominator{};
    for (std::int64_t g = 0; g < cache.shape.group_size(); ++g) {
      const std::int64_t row = b * q_heads + h * cache.shape.group_size() + g;
      max_logit[g] = metric.carry.normaliser[2 * row];
      denominator[g] = metric.carry.normaliser[2 * row + 1];
    }
    add_metric(cache, metric, b, h, state, next, max_logit.data(), denominator.data());
  }

  /// Keeps this step's queries, normaliser and next position for the next step's pending metric.
  template <class View, class QueryT>
  static void commit_metric_carry(const tensor_view<QueryT, 4>& queries, const View& cache,
                                  const eviction::metric_output<host_space>& metric, std::int64_t b, std::int64_t h,
                                  const group_state& state) {
    const std::int64_t q_heads = cache.shape.q_heads, head_dim = cache.shape.head_dim;
    for (std::int64_t g = 0; g < cache.shape.group_size(); ++g) {
      const std::int64_t j = h * cache.shape.group_size() + g, row = b * q_heads + j;
      for (std::int64_t d = 0; d < head_dim; ++d) metric.carry.queries[row * head_dim + d] = to_float(queries(b, 0, j, d));
      metric.carry.normaliser[2 * row] = state.max_logit[g];
      metric.carry.normaliser[2 * row + 1] = state.denominator[g];
    }
    const std::int64_t head = b * cache.shape.kv_heads + h;
    metric.carry.next[head] = cache.positions.next_position[head];
  }

  /// state.logits[g·stride + i] = s_gi (after scale and bias) for the group's queries `previous`
  /// ([group][head_dim] floats) over every token of head (b, h): attend_plain's dot products and
  /// scaling (the same x86 kernels or portable loops, in blocks of the same rows) or the codec
  /// reader's dot as attend_generic takes it; no softmax, no values (half a decode step).
  template <class View>
  static void pending_logits(const float* previous, const View& cache, std::int64_t b, std::int64_t h,
                             group_state& state) {
    const std::int64_t head_dim = cache.shape.head_dim, group = cache.shape.group_size();
    const std::int64_t length = cache.head_length(b, h);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    if constexpr (codec::is_plain<typename View::codec>) {
      using element = std::remove_cvref_t<decltype(*cache.storage.keys)>;
      const auto& store = cache.storage;
#if KVTRIM_X86_DISPATCH
      constexpr auto format = x86_format<element>;
      const bool fast = x86_path<element>();
      std::array<const void*, 64> key_rows;
      std::array<float, 64> bias;
#else
      constexpr bool fast = false;
#endif
      const std::int64_t block =
          fast ? 64 : std::max<std::int64_t>(1, std::min<std::int64_t>(64, block_floats / head_dim));
      alignas(64) std::array<float, max_heads_at_once * max_head_dim> query;
      std::array<float, max_heads_at_once * 64> logits;
      for (std::int64_t r0 = 0; r0 < group; r0 += max_heads_at_once) {
        const std::int64_t heads = std::min(max_heads_at_once, group - r0);
        std::copy(previous + r0 * head_dim, previous + (r0 + heads) * head_dim, query.begin());
        for (std::int64_t i0 = 0; i0 < length; i0 += block) {
          const std::int64_t count = std::min(block, length - i0);
          const auto key_row = [&](std::int64_t i) { return store.keys + cache.slot(b, h, i0 + i) * store.head_dim; };
#if KVTRIM_X86_DISPATCH
          if (fast) {
            for (std::int64_t i = 0; i < count; ++i) key_rows[i] = key_row(i);
            detail::x86::dot_rows<format>(query.data(), heads, key_rows.data(), count, head_dim, logits.data(), 64);
            if constexpr (has_bias<View>)
              for (std::int64_t i = 0; i < count; ++i) bias[i] = bias_of(cache, b, h, i0 + i);
            for (std::int64_t g = 0; g < heads; ++g) {
              float* s = logits.data() + g * 64;
              detail::x86::scale_and_max(s, count, scale, has_bias<View> ? bias.data() : nullptr);
              std::copy(s, s + count, state.logits + (r0 + g) * state.stride + i0);
            }
            continue;
          }
#endif
          alignas(64) std::array<float, block_floats> key_block;
          for (std::int64_t i = 0; i < count; ++i) detail::row_to_float(key_row(i), key_block.data() + i * head_dim, head_dim);
          for (std::int64_t g = 0; g < heads; ++g)
            for (std::int64_t i = 0; i < count; ++i)
              state.logits[(r0 + g) * state.stride + i0 + i] =
                  detail::dot_lanes(query.data() + g * head_dim, key_block.data() + i * head_dim, head_dim) * scale +
                  bias_of(cache, b, h, i0 + i);
        }
      }
    } else {
      const std::int64_t head = b * cache.shape.kv_heads + h;
      std::array<float, max_head_dim> query{};
      for (std::int64_t g = 0; g < group; ++g) {
        std::copy(previous + g * head_dim, previous + (g + 1) * head_dim, query.begin());
        auto reader = codec::attention_reader<typename View::codec>(cache.storage, head, query.data(), head_dim);
        for (std::int64_t i = 0; i < length; ++i)
          state.logits[g * state.stride + i] =
              reader.dot(cache.slot(b, h, i), codec::position_of(cache, b, h, i)) * scale + bias_of(cache, b, h, i);
      }
    }
  }

  template <class View>
  static std::int64_t logit_stride(const View& cache) {
    std::int64_t longest = 0;
    for (std::int64_t b = 0; b < cache.batch; ++b)
      for (std::int64_t h = 0; h < cache.shape.kv_heads; ++h) longest = std::max(longest, cache.head_length(b, h));
    return (longest + 63) / 64 * 64;
  }
#if KVTRIM_X86_DISPATCH
  /// The x86 kernels' row format for a plain codec's element, and whether they run on this CPU
  /// (attend_plain and pending_logits choose alike, so their logits agree bit for bit).
  template <class Element>
  static constexpr auto x86_format = std::is_same_v<Element, half>       ? detail::x86::row_format::fp16
                                     : std::is_same_v<Element, bfloat16> ? detail::x86::row_format::bf16
                                                                         : detail::x86::row_format::fp32;
  template <class Element>
  static bool x86_path() {
    if constexpr (std::is_same_v<Element, half> || std::is_same_v<Element, bfloat16> || std::is_same_v<Element, float>)
      return detail::x86::has_avx2_fma_f16c();
    else
      return false;
  }
#endif

  /// A thread's logits (group × longest head), for this step's or the pending one's.
  template <class View>
  static std::int64_t metric_thread_floats(const View& cache, const eviction::metric_output<host_space>&) {
    if (cache.shape.group_size() > 16)
      detail::fail("kvtrim::scheme::attend", "metric", "a GQA group of at most 16 query heads with an eviction metric",
                   std::to_string(cache.shape.group_size()));
    return cache.shape.group_size() * logit_stride(cache);
  }

  /// metric[slot(i)] += c_i for the unit's tokens older than the window of a step whose next
  /// position was `next`, from the logits kept and that step's normaliser (m_g, l_g).
  ///
  /// Tokens go in tiles of 64: first each query head's p_gi = cpu_exp(s_gi − m_g) / l_g over the
  /// tile's row of logits (detail::cpu_exp_shifted_divided: eight lanes where the CPU has AVX2+FMA,
  /// the scalar cpu_exp's bits either way), then per token its c_i, summed over g in g's order
  /// from 0. The exp and the division were the cost: one scalar cpu_exp (eight std::fma calls
  /// without an FMA target) and one division per (token, query head) made the immediate metric
  /// cost 2.6× the attention itself (docs/eviction.md, "The metric on the CPU"). The sums stay
  /// in this function, compiled with the caller's flags: inside an AVX2+FMA function GCC would
  /// fuse p·p + sum into one FMA (it contracts by default), rounding once where the reference
  /// rounds twice.
  template <class View>
  static void add_metric(const View& cache, const eviction::metric_output<host_space>& metric, std::int64_t b,
                         std::int64_t h, const group_state& state, std::int64_t next, const float* max_logit,
                         const float* denominator) {
    const std::int64_t group = cache.shape.group_size();
    const std::int64_t length = cache.head_length(b, h);
    const float factor = eviction::metric_group_factor(metric.kind, group);
    constexpr std::int64_t tile = 64;
    alignas(32) std::array<float, 16 * tile> probabilities;  // [g][tile]: GQA groups ≤ 16 with a metric
    for (std::int64_t i0 = 0; i0 < length; i0 += tile) {
      const std::int64_t count = std::min(tile, length - i0);
      for (std::int64_t g = 0; g < group; ++g)
        detail::cpu_exp_shifted_divided(state.logits + g * state.stride + i0, probabilities.data() + g * tile, count,
                                        max_logit[g], denominator[g]);
      for (std::int64_t i = 0; i < count; ++i) {
        const std::int64_t slot = cache.slot(b, h, i0 + i);
        if (!eviction::outside_window(next, cache.positions.slot_position[slot], metric.protected_window)) continue;
        float sum = 0.0f;
        for (std::int64_t g = 0; g < group; ++g) sum += eviction::metric_term(metric.kind, probabilities[g * tile + i]);
        metric.values[slot] += sum * factor;
      }
    }
  }

  static constexpr std::int64_t block_floats = 4096;  // a block of converted rows: 16 KiB
  static constexpr std::int64_t max_heads_at_once = 8;

  template <class View>
  static constexpr bool has_bias = requires(const View& cache) { cache.logit_bias(0, 0, 0); };

  template <class View>
  static float bias_of(const View& cache, std::int64_t b, std::int64_t h, std::int64_t i) {
    if constexpr (has_bias<View>)
      return cache.logit_bias(b, h, i);
    else
      return 0.0f;
  }

  /// codec::plain: the group × n query rows (up to 8 at a time; row r is query
  /// token r / group of head r % group) over blocks of rows. x86 with
  /// AVX2+FMA+F16C (detail/x86.hpp): the stored rows are read in place, each
  /// converted in registers once per chunk of rows; otherwise each block is first
  /// converted to fp32 (portable loops, the same conversion bits).
  template <class View, class QueryT, class OutT>
  static void attend_plain(const tensor_view<QueryT, 4>& queries, const View& cache, const tensor_view<OutT, 4>& out,
                           std::int64_t b, std::int64_t h, group_state& state) {
    using element = std::remove_cvref_t<decltype(*cache.storage.keys)>;
    const std::int64_t head_dim = cache.shape.head_dim;
    const std::int64_t group = cache.shape.group_size();
    const std::int64_t queries_per_sequence = queries.extent(1);
    const std::int64_t rows = group * queries_per_sequence;
    const std::int64_t length = cache.head_length(b, h);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const auto& store = cache.storage;
#if KVTRIM_X86_DISPATCH
    constexpr auto format = x86_format<element>;
    const bool fast = x86_path<element>();
#else
    constexpr bool fast = false;
#endif
    // A block: 64 rows read in place, or as many as 16 KiB of converted fp32 rows hold.
    const std::int64_t block = fast ? 64 : std::max<std::int64_t>(1, std::min<std::int64_t>(64, block_floats / head_dim));

#if KVTRIM_X86_DISPATCH
    std::array<const void*, 64> key_rows, next_key_rows;
    const std::int64_t row_bytes = head_dim * static_cast<std::int64_t>(sizeof(element));
#endif
    alignas(64) std::array<float, max_heads_at_once * max_head_dim> query, accumulator;
    std::array<float, max_heads_at_once * 64> logits;
    std::array<float, max_heads_at_once> max_logit, denominator;
    std::array<std::int64_t, max_heads_at_once> visible;  // tokens [0, visible) of the head each row sees

    for (std::int64_t r0 = 0; r0 < rows; r0 += max_heads_at_once) {
      const std::int64_t heads = std::min(max_heads_at_once, rows - r0);
      const std::int64_t rows_end = r0 + heads;  // rows [r0, rows_end): their tokens' last visible token bounds the blocks
      for (std::int64_t g = 0; g < heads; ++g) {
        const std::int64_t t = (r0 + g) / group, j = h * group + (r0 + g) % group;
        for (std::int64_t d = 0; d < head_dim; ++d) {
          query[g * head_dim + d] = to_float(queries(b, t, j, d));
          accumulator[g * head_dim + d] = 0.0f;
        }
        max_logit[g] = -std::numeric_limits<float>::infinity();
        denominator[g] = 0.0f;
        visible[g] = length - queries_per_sequence + 1 + t;
      }
      // The chunk's last row sees the most tokens: blocks run to its visible length.
      const std::int64_t read = length - queries_per_sequence + 1 + (rows_end - 1) / group;
      for (std::int64_t i0 = 0; i0 < read; i0 += block) {
        const std::int64_t count = std::min(block, read - i0);
        const auto key_row = [&](std::int64_t i) { return store.keys + cache.slot(b, h, i0 + i) * store.head_dim; };
        const auto value_row = [&](std::int64_t i) {
          return store.values + cache.slot(b, h, i0 + i) * store.head_dim;
        };
#if KVTRIM_X86_DISPATCH
        // The rows are read in place; while the dots run over this block's keys its
        // values are fetched, while Σ p·v runs the next block's keys.
        std::array<const void*, 64> value_rows;
        std::int64_t next_count = 0;
        if (fast) {
          if (i0 == 0)
            for (std::int64_t i = 0; i < count; ++i) key_rows[i] = key_row(i);
          for (std::int64_t i = 0; i < count; ++i) value_rows[i] = value_row(i);
          next_count = std::min(block, read - i0 - count);
          for (std::int64_t i = 0; i < next_count; ++i) next_key_rows[i] = key_row(count + i);
          detail::x86::dot_rows<format>(query.data(), heads, key_rows.data(), count, head_dim, logits.data(), 64,
                                        {value_rows.data(), count, row_bytes});
        } else
#endif
        {
          alignas(64) std::array<float, block_floats> key_block;
          for (std::int64_t i = 0; i < count; ++i)
            detail::row_to_float(key_row(i), key_block.data() + i * head_dim, head_dim);
          for (std::int64_t g = 0; g < heads; ++g)
            for (std::int64_t i = 0; i < count; ++i)
              logits[g * 64 + i] =
                  detail::dot_lanes(query.data() + g * head_dim, key_block.data() + i * head_dim, head_dim);
        }
#if KVTRIM_X86_DISPATCH
        std::array<float, 64> bias;  // the layout's logit biases of the block, if it has any
        if constexpr (has_bias<View>)
          if (fast)
            for (std::int64_t i = 0; i < count; ++i) bias[i] = bias_of(cache, b, h, i0 + i);
#endif
        for (std::int64_t g = 0; g < heads; ++g) {
          float* s = logits.data() + g * 64;
          const std::int64_t seen = std::clamp<std::int64_t>(visible[g] - i0, 0, count);  // later ones: weight 0
          float block_max = -std::numeric_limits<float>::infinity();
#if KVTRIM_X86_DISPATCH
          if (fast)
            block_max = detail::x86::scale_and_max(s, seen, scale, has_bias<View> ? bias.data() : nullptr);
          else
#endif
            for (std::int64_t i = 0; i < seen; ++i) {
              s[i] = s[i] * scale + bias_of(cache, b, h, i0 + i);
              block_max = std::fmax(block_max, s[i]);
            }
          if (state.logits != nullptr) std::copy(s, s + count, state.logits + (r0 + g) * state.stride + i0);
          if (block_max > max_logit[g]) {  // rescale what was summed against the old max
            const float factor = detail::cpu_exp(max_logit[g] - block_max);
            denominator[g] *= factor;
            for (std::int64_t d = 0; d < head_dim; ++d) accumulator[g * head_dim + d] *= factor;
            max_logit[g] = block_max;
          }
#if KVTRIM_X86_DISPATCH
          if (fast) {
            denominator[g] += detail::cpu_exp_shifted_sum_avx2(s, seen, max_logit[g]);
            std::fill(s + seen, s + count, 0.0f);
            continue;
          }
#endif
          for (std::int64_t i = 0; i < seen; ++i) {
            s[i] = detail::cpu_exp(s[i] - max_logit[g]);
            denominator[g] += s[i];
          }
          std::fill(s + seen, s + count, 0.0f);
        }
#if KVTRIM_X86_DISPATCH
        if (fast) {
          detail::x86::accumulate_rows<format>(accumulator.data(), logits.data(), 64, heads, value_rows.data(), count,
                                               head_dim, {next_key_rows.data(), next_count, row_bytes});
          std::swap(key_rows, next_key_rows);
          continue;
        }
#endif
        alignas(64) std::array<float, block_floats> value_block;
        for (std::int64_t i = 0; i < count; ++i)
          detail::row_to_float(value_row(i), value_block.data() + i * head_dim, head_dim);
        for (std::int64_t i = 0; i < count; ++i) {
          const float* v = value_block.data() + i * head_dim;
          for (std::int64_t g = 0; g < heads; ++g) {
            const float weight = logits[g * 64 + i];
            float* acc = accumulator.data() + g * head_dim;
            for (std::int64_t d = 0; d < head_dim; ++d) acc[d] += weight * v[d];
          }
        }
      }
      for (std::int64_t g = 0; g < heads; ++g) {
        const std::int64_t t = (r0 + g) / group, j = h * group + (r0 + g) % group;
        for (std::int64_t d = 0; d < head_dim; ++d)
          out(b, t, j, d) = from_float<OutT>(accumulator[g * head_dim + d] / denominator[g]);
      }
      if (state.logits != nullptr)  // n = 1: rows are the group's heads
        for (std::int64_t g = 0; g < heads; ++g) {
          state.max_logit[r0 + g] = max_logit[g];
          state.denominator[r0 + g] = denominator[g];
        }
    }
  }

  /// Every other codec, through its attention reader: one query head of query token t.
  template <class View, class QueryT, class OutT>
  static void attend_generic(const tensor_view<QueryT, 4>& queries, const View& cache, const tensor_view<OutT, 4>& out,
                             std::int64_t b, std::int64_t h, std::int64_t t, std::int64_t g, group_state& state) {
    using codec_type = typename View::codec;
    const std::int64_t head_dim = cache.shape.head_dim;
    const std::int64_t j = h * cache.shape.group_size() + g;
    const std::int64_t head = b * cache.shape.kv_heads + h;
    const std::int64_t length = cache.head_length(b, h) - queries.extent(1) + 1 + t;  // the tokens query t sees
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    std::array<float, max_head_dim> query{}, accumulator{}, partial{};
    for (std::int64_t d = 0; d < head_dim; ++d) query[d] = to_float(queries(b, t, j, d));

    // The two places that know the reader's interface.
    const auto make_reader = [&] { return codec::attention_reader<codec_type>(cache.storage, head, query.data(), head_dim); };
    const auto reader_dot = [&](auto& reader, std::int64_t i) {
      return reader.dot(cache.slot(b, h, i), codec::position_of(cache, b, h, i));  // key i at its position (pre-RoPE codecs)
    };
    using reader_type = decltype(make_reader());

    // Invariant: accumulator + (what `reader` holds) = Σ_{i seen} exp(s_i − max_logit)·v_i.
    std::optional<reader_type> reader;
    reader.emplace(make_reader());
    bool reader_used = false;
    float max_logit = -std::numeric_limits<float>::infinity(), denominator = 0.0f;
    constexpr std::int64_t block = 64;
    std::array<float, block> s;
    for (std::int64_t i0 = 0; i0 < length; i0 += block) {
      const std::int64_t count = std::min(block, length - i0);
      float block_max = -std::numeric_limits<float>::infinity();
      for (std::int64_t i = 0; i < count; ++i) {
        s[i] = reader_dot(*reader, i0 + i) * scale + bias_of(cache, b, h, i0 + i);
        block_max = std::fmax(block_max, s[i]);
      }
      if (state.logits != nullptr) std::copy(s.begin(), s.begin() + count, state.logits + g * state.stride + i0);
      if (block_max > max_logit) {  // fold the reader into the accumulator, rescaled; start a fresh reader
        const float factor = detail::cpu_exp(max_logit - block_max);
        if (reader_used) {
          reader->finish(partial.data());
          for (std::int64_t d = 0; d < head_dim; ++d) accumulator[d] += partial[d];
          reader.reset();
          reader.emplace(make_reader());
          reader_used = false;
        }
        for (std::int64_t d = 0; d < head_dim; ++d) accumulator[d] *= factor;
        denominator *= factor;
        max_logit = block_max;
      }
      for (std::int64_t i = 0; i < count; ++i) {
        const float weight = detail::cpu_exp(s[i] - max_logit);
        denominator += weight;
        reader->accumulate(cache.slot(b, h, i0 + i), weight);
      }
      reader_used = true;
    }
    reader->finish(partial.data());
    for (std::int64_t d = 0; d < head_dim; ++d)
      out(b, t, j, d) = from_float<OutT>((accumulator[d] + partial[d]) / denominator);
    if (state.logits != nullptr) {
      state.max_logit[g] = max_logit;
      state.denominator[g] = denominator;
    }
  }
};

}  // namespace kvtrim
