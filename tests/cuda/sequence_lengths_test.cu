// compress_options::sequence_lengths on backend::cuda: a right-padded batch of
// prompts of different lengths (T_b ≤ T = max T_b), the lengths in host memory.
// The CPU's suite (tests/cpu/sequence_lengths_test.cpp) is the specification;
// this one holds the device to it twice.
//
// Oracle A — the definition, on the device: sequence b ends up exactly as if its
// first T_b tokens had been compressed alone (batch-1 views of the same device
// inputs, its own one-sequence cache, the same scheme on backend::cuda). The same
// kernels run on the same slices, so the scores are the same bits and every
// comparison but attention is exact: the kept-index output token for token (every
// scorer, SnapKV included), each head's positions and stored K/V rows (plain
// codecs: read back through the cache's own tables), its compensation entry, the
// next positions (start + T_b after compress, + 2 after two appends, the appended
// tokens at start + T_b and start + T_b + 1). Padded tokens (t ≥ T_b) hold NaN in
// keys, values and H2O's queries, and +inf in external scores: a read of any of
// them would be refused by the device's finiteness scan, poison the outputs, or
// rank a padded token first.
//
// Decode attention over the batch cache against the alone cache is not bit for
// bit: the device's balanced split-K (decode_plan.cuh) lays all heads of a cache
// end to end and cuts the line into chunks of ≥ 256 tokens, so a head of the
// batch cache may be split into partials (online softmax states merged after)
// where the alone cache reads it whole. The logits are the same bits (each
// token's dot product does not depend on the split); what differs is each
// segment's running max m and hence every weight's rounding, the merge's
// rescaling, and the summation order. One run against the exact weighted mean,
// per query head over n held tokens, with u = 2^-24, A = max|q|·max|k|·log2(e)/√D
// (the largest |logit| in the base-2 units the kernel uses) and V = max|v|:
//   weight ε_w ≤ 3·2^-22 + 2·(2A + log2 n)·ln2·u + u [+ 2^-11]
//       (ex2.approx and lg2.approx within 2 ulp: the segment's 2^(s − m), the
//       partial's log-sum-exp m + log2 l and the merge's 2^(lse − M); their two
//       arguments, |·| ≤ 2A + log2 n, rounded once each; the product rounded
//       once; + 2^-11 where the tensor-core path rounds the weights to fp16
//       before P·V: GQA groups above KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS (2) of
//       16-bit storage, and every quantized codec, whose codes go straight into
//       mma fragments)
//   a weighted mean with weights off by ≤ ε_w (relative) moves by ≤ 2ε_w/(1 − ε_w)·V
//   numerator and denominator: ≤ 2n terms each (n tokens, ≤ n partials), one
//       division: (4n + 1)·u·V; fp16 subnormal weights: ≤ n·2^-25·V more
// and the two runs differ by at most twice that (split_gap_bound). At group 2
// (kv_heads 4, q_heads 8, fp16) that is ~5e-5·V; on the tensor-core path ~2e-3·V.
// A token kept or dropped wrongly, a row in the wrong slot or a padded row read
// moves an output by O(V / n) ≥ 1e-2·V here, or makes it NaN.
//
// Oracle B — CUDA with lengths against the CPU with lengths (the spec), as
// combinations_test.cu: scorers whose scores are the same bits on both backends
// (score::external, static windows, RazorAttention) keep the identical CSR;
// SnapKV, H2O and key norm (fp32 sums in another order) keep the same count per
// sequence (Ada-KV's exact totals), per head where the budget fixes it, and at
// least 99 % of the same tokens (a token flips only within a few ulps of its head's
// threshold). Next positions agree exactly. Where the kept sets agree (fp16
// caches), attention agrees within gpu error + CPU error: the split bound above
// for one run, plus the logits' error on each backend (δ = (D + 5)·u·S with S the
// largest natural-log logit: the fp32 dot product and scale, tests/common/
// tolerance.hpp) and the CPU's sums, (e^(2δ + 4u) − 1)·V·2 + (2n + 1)·u·V.
//
// Refusals on the device: bad lengths (0, > T, shorter than SnapKV's window),
// H2O given fewer than T queries, a budget keeping more of T_b than of T,
// contiguous with unequal counts — thrown on the host with the CPU's message word
// for word, before anything is enqueued (every byte of the cache unchanged, nothing
// recorded in its status); a NaN inside a prompt (not its padding) and Ada-KV's
// paper-form budget refusing in sequence 1 — found on the device, raised by
// check_status with the CPU's message, the cache unchanged. A compress with lengths
// captured in a CUDA graph replays as the direct call (the lengths baked at capture).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/given_lse.hpp"
#include "common/tensors.hpp"
#include "cuda/device_memory.cuh"

namespace kt = kvtrim;
using kt::testing::device_buffer;
using kt::testing::device_tensor;
using kt::testing::host_tensor;

namespace {

using half = kt::half;
using device_view4 = kt::tensor_view<const half, 4, kt::device_space>;
using device_view3 = kt::tensor_view<const half, 3, kt::device_space>;

const float nan_value = std::numeric_limits<float>::quiet_NaN();
const float inf_value = std::numeric_limits<float>::infinity();
constexpr std::int64_t start_position = 5;
constexpr std::int64_t appended = 2;  // decode tokens appended one at a time after the compress

void check_cuda(cudaError_t status, const char* what) { kt::testing::check(status, what); }

// ---- the padded batch -----------------------------------------------------------

/// [B, H, T, D] keys and values with NaN past each T_b; window queries [B, Hq, w, D]
/// (H2O: [B, Hq, T, D], NaN past T_b); decode queries [B, Hq, D]; [B, H, 2, D] tokens
/// appended after the compress. fp16, as an engine hands them over.
struct padded_batch {
  kt::model_shape shape;
  std::vector<std::int64_t> lengths;
  std::int64_t tokens = 0;
  bool every_query = false;
  host_tensor<half, 4> keys, values, queries, new_keys, new_values;
  host_tensor<half, 3> decode_queries;

  padded_batch(const kt::model_shape& shape_, std::vector<std::int64_t> lengths_, std::int64_t window,
               bool every_query_, std::uint64_t seed)
      : shape(shape_), lengths(std::move(lengths_)), every_query(every_query_) {
    tokens = *std::max_element(lengths.begin(), lengths.end());
    const std::int64_t b = batch(), h = shape.kv_heads, q = shape.q_heads, d = shape.head_dim;
    keys = kt::testing::random_tensor<half, 4>({b, h, tokens, d}, seed);
    values = kt::testing::random_tensor<half, 4>({b, h, tokens, d}, seed + 1);
    queries = kt::testing::random_tensor<half, 4>({b, q, every_query ? tokens : std::max<std::int64_t>(window, 1), d},
                                                  seed + 2);
    decode_queries = kt::testing::random_tensor<half, 3>({b, q, d}, seed + 3);
    new_keys = kt::testing::random_tensor<half, 4>({b, h, appended, d}, seed + 4);
    new_values = kt::testing::random_tensor<half, 4>({b, h, appended, d}, seed + 5);
    const half nan = kt::from_float<half>(nan_value);
    for (std::int64_t s = 0; s < b; ++s)
      for (std::int64_t t = length(s); t < tokens; ++t)
        for (std::int64_t c = 0; c < d; ++c) {
          for (std::int64_t head = 0; head < h; ++head) keys(s, head, t, c) = values(s, head, t, c) = nan;
          if (every_query)
            for (std::int64_t head = 0; head < q; ++head) queries(s, head, t, c) = nan;
        }
  }
  // host_tensor copies keep viewing the original's storage: none are made.
  padded_batch(const padded_batch&) = delete;
  padded_batch& operator=(const padded_batch&) = delete;

  std::int64_t batch() const { return static_cast<std::int64_t>(lengths.size()); }
  std::int64_t length(std::int64_t b) const { return lengths[static_cast<std::size_t>(b)]; }
  std::int64_t group() const { return shape.q_heads / shape.kv_heads; }
};

/// Sequence b of a batched view: [1, …] with axis `axis` cut to `count` (no copy: the
/// batch's strides, so a read past the cut lands in the batch's NaN padding).
template <class T, std::size_t Rank, class Space>
kt::tensor_view<T, Rank, Space> sequence_slice(const kt::tensor_view<T, Rank, Space>& view, std::int64_t b,
                                               std::size_t axis = 0, std::int64_t count = 1) {
  if (view.data == nullptr) return view;
  auto extents = view.extents;
  extents[0] = 1;
  if (axis > 0) extents[axis] = count;
  return {view.data + b * view.strides[0], extents, view.strides};
}

/// Token `i` of a [B, H, n, D] view: [B, H, 1, D].
template <class T, class Space>
kt::tensor_view<T, 4, Space> token_slice(const kt::tensor_view<T, 4, Space>& view, std::int64_t i) {
  auto extents = view.extents;
  extents[2] = 1;
  return {view.data + i * view.strides[2], extents, view.strides};
}

/// The batch's inputs on the device (the same strides as the host tensors).
struct device_batch {
  device_tensor<half, 4> keys, values, queries, new_keys, new_values;
  device_tensor<half, 3> decode_queries;
  explicit device_batch(const padded_batch& in)
      : keys(in.keys), values(in.values), queries(in.queries), new_keys(in.new_keys), new_values(in.new_values),
        decode_queries(in.decode_queries) {}

  /// The views of the whole batch (b < 0) or of sequence b's first T_b tokens alone.
  struct views {
    device_view4 keys, values, queries, new_keys, new_values;
    device_view3 decode_queries;
  };
  views of(const padded_batch& in, std::int64_t b) const {
    const auto c4 = [](const device_tensor<half, 4>& t) { return kt::detail::as_const(t.view); };
    const device_view3 decode = kt::detail::as_const(decode_queries.view);
    if (b < 0) return {c4(keys), c4(values), c4(queries), c4(new_keys), c4(new_values), decode};
    const std::int64_t length = in.length(b);
    return {sequence_slice(c4(keys), b, 2, length), sequence_slice(c4(values), b, 2, length),
            in.every_query ? sequence_slice(c4(queries), b, 2, length) : sequence_slice(c4(queries), b),
            sequence_slice(c4(new_keys), b), sequence_slice(c4(new_values), b), sequence_slice(decode, b)};
  }
};

// ---- a device cache read back through its own tables ----------------------------

/// The owning device cache's allocation copied to the host, with a copy of its view
/// whose tables (positions, page tables or offsets, compensation, plain codecs' rows)
/// point into the copy. Contiguous caches keep their one length on the host already.
template <class View>
struct host_mirror {
  std::vector<std::byte> bytes;
  View view;

  template <class Cache>
  explicit host_mirror(const Cache& cache)
      : bytes(kt::testing::download_bytes(cache.data(), cache.bytes())), view(cache.view()) {
    const auto base = reinterpret_cast<std::uintptr_t>(cache.data());
    const auto move = [&](auto*& pointer) {
      using pointee = std::remove_reference_t<decltype(*pointer)>;
      if (pointer == nullptr) return;
      const auto at = reinterpret_cast<std::uintptr_t>(pointer);
      if (at < base || at >= base + bytes.size())
        throw kt::error("host_mirror: a table of the view lies outside the cache's allocation");
      pointer = reinterpret_cast<pointee*>(bytes.data() + (at - base));
    };
    move(view.positions.slot_position);
    move(view.positions.next_position);
    if constexpr (requires { view.compensation.index; }) {
      move(view.compensation.index);
      move(view.compensation.bias);
    }
    if constexpr (requires { view.indptr; }) {
      move(view.indptr);
      move(view.indices);
      move(view.last_page_len);
      move(view.free_pages);
      move(view.free_count);
    }
    if constexpr (requires { view.offsets; }) {
      move(view.offsets);
      move(view.lengths);
      move(view.repacks);
    }
    if constexpr (requires { view.status; }) move(view.status);
    if constexpr (kt::codec::is_plain<typename View::codec>) {
      move(view.storage.keys);
      move(view.storage.values);
    } else {
      view.storage = {};  // quantized rows are compared through attention only
    }
  }
  host_mirror(const host_mirror&) = delete;
};

// ---- one compress and what it left ---------------------------------------------

/// What a compress left, per head (b·H + h): kept tokens, positions, next positions,
/// compensation entry, stored rows (plain codecs); attention [B, Hq, D]; then after
/// `appended` single-token appends, the positions and attention again.
struct outcome {
  std::vector<std::vector<std::int32_t>> kept, positions, appended_positions;
  std::vector<std::int64_t> next_positions, appended_next_positions;
  std::vector<std::int32_t> compensation_index;
  std::vector<float> compensation_bias;
  std::vector<std::vector<std::byte>> rows;
  std::vector<float> attention, appended_attention;
};

template <class Cache>
void read_cache(const Cache& cache, std::vector<std::vector<std::int32_t>>& positions,
                std::vector<std::int64_t>& next_positions, outcome* extra) {
  using view_type = typename Cache::view_type;
  const host_mirror<view_type> mirror(cache);
  const view_type& view = mirror.view;
  const std::int64_t kv_heads = view.shape.kv_heads, head_dim = view.shape.head_dim;
  positions.clear();
  next_positions.clear();
  for (std::int64_t b = 0; b < view.batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      const std::int64_t head = b * kv_heads + h, length = view.head_length(b, h);
      std::vector<std::int32_t> held(static_cast<std::size_t>(length));
      std::vector<std::byte> rows;
      for (std::int64_t i = 0; i < length; ++i) {
        const std::int64_t slot = view.slot(b, h, i);
        held[static_cast<std::size_t>(i)] = view.positions.slot_position[slot];
        if constexpr (kt::codec::is_plain<typename view_type::codec>) {
          using element = typename view_type::codec::element;
          const std::size_t row = static_cast<std::size_t>(head_dim) * sizeof(element);
          const auto* k = reinterpret_cast<const std::byte*>(view.storage.keys + slot * head_dim);
          const auto* v = reinterpret_cast<const std::byte*>(view.storage.values + slot * head_dim);
          rows.insert(rows.end(), k, k + row);
          rows.insert(rows.end(), v, v + row);
        }
      }
      positions.push_back(std::move(held));
      next_positions.push_back(view.positions.next_position[head]);
      if (extra == nullptr) continue;
      extra->rows.push_back(std::move(rows));
      if constexpr (requires { view.compensation.index; }) {
        extra->compensation_index.push_back(view.compensation.index[head]);
        extra->compensation_bias.push_back(view.compensation.bias[head]);
      }
    }
}

/// One compress on the device with the kept-index output, its buffers kept so the
/// same call can be enqueued directly or captured in a graph.
template <class Scheme>
struct gpu_compress {
  typename Scheme::cache& cache;
  typename Scheme::config cfg;
  device_view4 keys, values, queries;
  const std::int64_t* lengths;
  std::int64_t heads, capacity;
  device_buffer<std::int64_t> offsets;
  device_buffer<std::int32_t> kept;
  device_buffer<std::byte> scratch;

  gpu_compress(typename Scheme::cache& cache_, const typename Scheme::config& cfg_, const device_batch::views& in,
               const std::int64_t* lengths_)
      : cache(cache_), cfg(cfg_), keys(in.keys), values(in.values), queries(in.queries), lengths(lengths_),
        heads(in.keys.extent(0) * cache_.view().shape.kv_heads),
        capacity(Scheme::kept_tokens_capacity(cache_.view().shape, in.keys.extent(0), in.keys.extent(2), cfg_)),
        offsets(static_cast<std::size_t>(heads + 1)),
        kept(static_cast<std::size_t>(capacity)),
        scratch(Scheme::compress_workspace(cache_.view().shape, in.keys.extent(0), in.keys.extent(2), cfg_)) {}

  void enqueue(cudaStream_t stream) {
    kt::compress_options<kt::device_space> options;
    options.start_position = start_position;
    options.kept_offsets = offsets.data();
    options.kept_tokens = kept.data();
    options.kept_tokens_capacity = capacity;
    options.sequence_lengths = lengths;
    auto& view = cache.view();
    const kt::workspace work{scratch.data(), scratch.size()};
    if constexpr (Scheme::scorer::needs_queries)
      Scheme::compress(keys, values, queries, view, cfg, options, work, stream);
    else
      Scheme::compress(keys, values, view, cfg, options, work, stream);
  }

  std::vector<std::vector<std::int32_t>> kept_per_head() const {
    const std::vector<std::int64_t> o = offsets.download();
    const std::vector<std::int32_t> t = kept.download();
    std::vector<std::vector<std::int32_t>> result;
    for (std::int64_t head = 0; head < heads; ++head)
      result.emplace_back(t.begin() + o[static_cast<std::size_t>(head)], t.begin() + o[static_cast<std::size_t>(head) + 1]);
    return result;
  }
};

template <class Scheme>
std::vector<float> gpu_attend(typename Scheme::cache& cache, const device_view3& decode_queries, cudaStream_t stream) {
  const auto& view = cache.view();
  const std::array<std::int64_t, 3> extents{view.batch, view.shape.q_heads, view.shape.head_dim};
  device_buffer<float> out(static_cast<std::size_t>(extents[0] * extents[1] * extents[2]));
  out.fill_bytes(0xff);  // NaN: an output not written fails
  device_buffer<std::byte> scratch(Scheme::attend_workspace(view));
  Scheme::attend(decode_queries, view, kt::make_view<kt::device_space>(out.data(), extents),
                 kt::workspace{scratch.data(), scratch.size()}, stream);
  check_cuda(cudaStreamSynchronize(stream), "attend");
  return out.download();
}

template <class View>
void expect_no_refusal(const View& view, cudaStream_t stream) {
  if constexpr (requires { view.status; }) kt::check_status(view, stream);  // throws what the device refused
}

/// Everything after the compress was enqueued: its results, attention, the appends.
template <class Scheme>
outcome finish(gpu_compress<Scheme>& call, const device_batch::views& in, cudaStream_t stream) {
  auto& view = call.cache.view();
  check_cuda(cudaStreamSynchronize(stream), "compress");
  expect_no_refusal(view, stream);  // padded NaN is never read: nothing refused
  outcome result;
  result.kept = call.kept_per_head();
  read_cache(call.cache, result.positions, result.next_positions, &result);
  result.attention = gpu_attend<Scheme>(call.cache, in.decode_queries, stream);
  for (std::int64_t i = 0; i < appended; ++i)
    Scheme::append(view, token_slice(in.new_keys, i), token_slice(in.new_values, i), stream);
  check_cuda(cudaStreamSynchronize(stream), "append");
  expect_no_refusal(view, stream);
  read_cache(call.cache, result.appended_positions, result.appended_next_positions, nullptr);
  result.appended_attention = gpu_attend<Scheme>(call.cache, in.decode_queries, stream);
  return result;
}

template <class Scheme>
outcome run_gpu(typename Scheme::cache& cache, const typename Scheme::config& cfg, const device_batch::views& in,
                const std::int64_t* lengths, cudaStream_t stream = nullptr) {
  gpu_compress<Scheme> call(cache, cfg, in, lengths);
  call.enqueue(stream);
  return finish(call, in, stream);
}

/// The CPU's compress of the padded batch with its lengths: kept tokens, next positions, attention.
struct cpu_outcome {
  std::vector<std::vector<std::int32_t>> kept;
  std::vector<std::int64_t> next_positions;
  std::vector<float> attention;
};

template <class Scheme>
cpu_outcome run_cpu(typename Scheme::cache& cache, const typename Scheme::config& cfg, const padded_batch& in) {
  const kt::model_shape shape = in.shape;
  const std::int64_t batch = in.batch(), heads = batch * shape.kv_heads;
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
  std::vector<std::int32_t> kept(static_cast<std::size_t>(Scheme::kept_tokens_capacity(shape, batch, in.tokens, cfg)));
  kt::compress_options<kt::host_space> options;
  options.start_position = start_position;
  options.kept_offsets = offsets.data();
  options.kept_tokens = kept.data();
  options.kept_tokens_capacity = static_cast<std::int64_t>(kept.size());
  options.sequence_lengths = in.lengths.data();
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, in.tokens, cfg));
  auto& view = cache.view();
  if constexpr (Scheme::scorer::needs_queries)
    Scheme::compress(in.keys.cview(), in.values.cview(), in.queries.cview(), view, cfg, options,
                     kt::workspace{scratch.data(), scratch.size()});
  else
    Scheme::compress(in.keys.cview(), in.values.cview(), view, cfg, options, kt::workspace{scratch.data(), scratch.size()});
  cpu_outcome result;
  for (std::int64_t head = 0; head < heads; ++head) {
    result.kept.emplace_back(kept.begin() + offsets[static_cast<std::size_t>(head)],
                             kept.begin() + offsets[static_cast<std::size_t>(head) + 1]);
    result.next_positions.push_back(kt::next_position(view, head / shape.kv_heads, head % shape.kv_heads));
  }
  result.attention.assign(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim), 0.0f);
  std::vector<std::byte> attend_scratch(Scheme::attend_workspace(view));
  Scheme::attend(in.decode_queries.cview(), view,
                 kt::make_view(result.attention.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim}),
                 kt::workspace{attend_scratch.data(), attend_scratch.size()});
  return result;
}

// ---- tolerances (derived at the top of the file) --------------------------------

struct attention_scale {
  double log2_logit = 0.0;  // A: the largest |q·k|·log2(e)/√D, by Cauchy–Schwarz
  double value = 0.0;       // V: the largest |v| the caches hold (quantized codecs: with their rounding)
  double tokens = 0.0;      // n: the most tokens a head holds
};

attention_scale scale_of(const padded_batch& in, bool quantized) {
  const auto norm = [&](auto&& element, std::int64_t count) {
    double sum = 0.0;
    for (std::int64_t d = 0; d < count; ++d) sum += std::pow(static_cast<double>(kt::to_float(element(d))), 2);
    return std::sqrt(sum);
  };
  double q = 0.0, k = 0.0, v = 0.0;
  const std::int64_t d = in.shape.head_dim;
  for (std::int64_t b = 0; b < in.batch(); ++b) {
    for (std::int64_t g = 0; g < in.shape.q_heads; ++g)
      q = std::max(q, norm([&](std::int64_t c) { return in.decode_queries(b, g, c); }, d));
    for (std::int64_t h = 0; h < in.shape.kv_heads; ++h) {
      const auto each = [&](const host_tensor<half, 4>& keys, const host_tensor<half, 4>& values, std::int64_t count) {
        for (std::int64_t t = 0; t < count; ++t) {
          k = std::max(k, norm([&](std::int64_t c) { return keys(b, h, t, c); }, d));
          for (std::int64_t c = 0; c < d; ++c) v = std::max(v, std::abs(static_cast<double>(kt::to_float(values(b, h, t, c)))));
        }
      };
      each(in.keys, in.values, in.length(b));
      each(in.new_keys, in.new_values, appended);
    }
  }
  // Quantized values are read back within their codec's step of the input: fp8 e4m3
  // rounds by ≤ 2^-4 relative, int8 by less.
  return {q * k * std::log2(std::exp(1.0)) / std::sqrt(static_cast<double>(d)), v * (quantized ? 1.0625 : 1.0),
          static_cast<double>(in.tokens + appended)};
}

/// One device run of decode attention against the exact weighted mean (see the top).
double gpu_run_error(const attention_scale& s, bool fp16_weights) {
  const double u = 0x1p-24;
  const double arguments = (2.0 * s.log2_logit + std::log2(std::max(s.tokens, 2.0))) * std::log(2.0) * u;
  const double weight = 3.0 * 0x1p-22 + 2.0 * arguments + u + (fp16_weights ? 0x1p-11 : 0.0);
  const double sums = (4.0 * s.tokens + 1.0) * u;
  const double subnormal = fp16_weights ? s.tokens * 0x1p-25 : 0.0;
  return (2.0 * weight / (1.0 - weight) + sums + subnormal) * s.value;
}

/// Oracle A: two device runs of the same logits with different splits.
double split_gap_bound(const attention_scale& s, bool fp16_weights) { return 2.0 * gpu_run_error(s, fp16_weights); }

/// Oracle B: a device run and the CPU's, each with its own fp32 logits.
double cpu_gap_bound(const attention_scale& s, bool fp16_weights, std::int64_t head_dim) {
  const double u = 0x1p-24;
  const double logit = s.log2_logit * std::log(2.0);  // S, natural units
  const double delta = (static_cast<double>(head_dim) + 5.0) * u * logit;
  return gpu_run_error(s, fp16_weights) + 2.0 * std::expm1(2.0 * delta + 4.0 * u) * s.value +
         (2.0 * s.tokens + 1.0) * u * s.value;
}

/// Whether decode attention over this cache rounds its weights to fp16 (the tensor-core path).
template <class Codec>
bool fp16_weights(const padded_batch& in) {
  return !kt::codec::is_plain<Codec> || in.group() > KVTRIM_CUDA_DECODE_CUDA_CORE_GROUPS;
}

// ---- the two oracles --------------------------------------------------------------

enum class agreement { exact, near_ties };

template <class T>
std::string list(const std::vector<T>& v) {
  std::string s = "{";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "}";
}

/// Oracle A for sequence b: the batch's outcome against sequence b's alone.
void expect_as_alone(const outcome& together, const outcome& alone, const padded_batch& in, std::int64_t b,
                     double bound) {
  const std::int64_t kv_heads = in.shape.kv_heads, length = in.length(b);
  for (std::int64_t h = 0; h < kv_heads; ++h) {
    SCOPED_TRACE("kv head " + std::to_string(h));
    const auto head = static_cast<std::size_t>(b * kv_heads + h), own = static_cast<std::size_t>(h);
    EXPECT_EQ(together.kept[head], alone.kept[own]) << "kept tokens";
    EXPECT_EQ(together.positions[head], alone.positions[own]) << "positions after compress";
    EXPECT_EQ(together.next_positions[head], start_position + length) << "next position after compress";
    EXPECT_EQ(alone.next_positions[own], start_position + length) << "next position after compress, alone";
    EXPECT_EQ(together.appended_positions[head], alone.appended_positions[own]) << "positions after the appends";
    EXPECT_EQ(together.appended_next_positions[head], start_position + length + appended) << "after the appends";
    const auto& held = together.appended_positions[head];
    ASSERT_GE(held.size(), static_cast<std::size_t>(appended));
    for (std::int64_t i = 0; i < appended; ++i)
      EXPECT_EQ(held[held.size() - static_cast<std::size_t>(appended - i)], start_position + length + i)
          << "appended token " << i << " (positions " << list(held) << ")";
    EXPECT_TRUE(together.rows[head] == alone.rows[own]) << "stored key/value rows";
    if (!alone.compensation_index.empty()) {
      EXPECT_EQ(together.compensation_index[head], alone.compensation_index[own]) << "compensation token";
      EXPECT_EQ(together.compensation_bias[head], alone.compensation_bias[own]) << "compensation bias";
    }
  }
  const std::size_t row = static_cast<std::size_t>(in.shape.q_heads * in.shape.head_dim);
  for (const auto& [got, want, when] : {std::tuple{&together.attention, &alone.attention, "after compress"},
                                        std::tuple{&together.appended_attention, &alone.appended_attention,
                                                   "after the appends"}})
    for (std::size_t i = 0; i < row; ++i) {
      const float a = (*got)[static_cast<std::size_t>(b) * row + i], e = (*want)[i];
      ASSERT_TRUE(std::isfinite(a) && std::isfinite(e)) << when << ", output " << i << ": " << a << " vs " << e;
      ASSERT_NEAR(a, e, bound) << when << ", output " << i << " (query head " << i / in.shape.head_dim << ")";
    }
}

/// Oracle B: the device's batch with lengths against the CPU's.
void expect_as_cpu(const outcome& gpu, const cpu_outcome& cpu, const padded_batch& in, agreement expected,
                   bool counts_exact, double bound) {
  const std::int64_t kv_heads = in.shape.kv_heads;
  ASSERT_EQ(gpu.kept.size(), cpu.kept.size());
  EXPECT_EQ(gpu.next_positions, cpu.next_positions);
  std::set<std::pair<std::size_t, std::int32_t>> gpu_set, cpu_set;
  for (std::size_t head = 0; head < gpu.kept.size(); ++head) {
    for (const std::int32_t t : gpu.kept[head]) gpu_set.emplace(head, t);
    for (const std::int32_t t : cpu.kept[head]) cpu_set.emplace(head, t);
    if (expected == agreement::exact || counts_exact)
      EXPECT_EQ(gpu.kept[head].size(), cpu.kept[head].size()) << "kept count of head " << head;
    if (expected == agreement::exact) EXPECT_EQ(gpu.kept[head], cpu.kept[head]) << "kept tokens of head " << head;
  }
  for (std::int64_t b = 0; b < in.batch(); ++b) {
    std::size_t g = 0, c = 0;
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      g += gpu.kept[static_cast<std::size_t>(b * kv_heads + h)].size();
      c += cpu.kept[static_cast<std::size_t>(b * kv_heads + h)].size();
    }
    EXPECT_EQ(g, c) << "tokens sequence " << b << " keeps";
  }
  std::size_t common = 0;
  for (const auto& t : cpu_set) common += gpu_set.count(t);
  EXPECT_GE(static_cast<double>(common), 0.99 * static_cast<double>(cpu_set.size()))
      << common << " of " << cpu_set.size() << " kept tokens agree";
  if (gpu_set != cpu_set || bound <= 0.0) {
    if (gpu_set != cpu_set)
      std::printf("  [info] %s: kept sets differ in %zu of %zu tokens (near-ties); attention not compared\n",
                  ::testing::UnitTest::GetInstance()->current_test_info()->name(),
                  cpu_set.size() + gpu_set.size() - 2 * common, cpu_set.size());
    return;
  }
  for (std::size_t i = 0; i < cpu.attention.size(); ++i)
    ASSERT_NEAR(gpu.attention[i], cpu.attention[i], bound) << "output " << i;
}

template <class Layout, class Scorer, class Budget, class Codec>
struct schemes {
  using gpu = kt::scheme<Layout, Scorer, Budget, Codec, kt::backend::cuda>;
  using cpu = kt::scheme<Layout, Scorer, Budget, Codec, kt::backend::cpu>;
};

/// Both oracles for one scheme. `make(std::type_identity<Scheme>{}, batch)` makes an empty
/// cache of either backend; `config_for(b, on_device)` the config of the batch (b < 0) or
/// of sequence b alone, with any tensor it holds in the device's or the host's memory.
template <class Layout, class Scorer, class Budget, class Codec, class Make, class ConfigFor>
void expect_each_sequence_as_if_alone(const padded_batch& in, Make&& make, ConfigFor&& config_for,
                                      agreement expected, bool counts_exact) {
  using pair = schemes<Layout, Scorer, Budget, Codec>;
  const device_batch device(in);
  auto together_cache = make(std::type_identity<typename pair::gpu>{}, in.batch());
  const outcome together = run_gpu<typename pair::gpu>(together_cache, config_for(-1, true), device.of(in, -1),
                                                       in.lengths.data());
  const attention_scale scale = scale_of(in, !kt::codec::is_plain<Codec>);
  const bool fp16 = fp16_weights<Codec>(in);
  for (std::int64_t b = 0; b < in.batch(); ++b) {
    SCOPED_TRACE("sequence " + std::to_string(b) + " of " + std::to_string(in.length(b)) + " tokens");
    auto alone_cache = make(std::type_identity<typename pair::gpu>{}, 1);
    const outcome alone = run_gpu<typename pair::gpu>(alone_cache, config_for(b, true), device.of(in, b), nullptr);
    expect_as_alone(together, alone, in, b, split_gap_bound(scale, fp16));
  }
  SCOPED_TRACE("against the CPU with the same lengths");
  auto cpu_cache = make(std::type_identity<typename pair::cpu>{}, in.batch());
  const cpu_outcome cpu = run_cpu<typename pair::cpu>(cpu_cache, config_for(-1, false), in);
  expect_as_cpu(together, cpu, in, expected, counts_exact,
                kt::codec::is_plain<Codec> ? cpu_gap_bound(scale, fp16, in.shape.head_dim) : 0.0);
}

// ---- caches -----------------------------------------------------------------------

const kt::model_shape shape{.q_heads = 8, .kv_heads = 4, .head_dim = 64};  // group 2: fp32 weights in decode
const std::vector<std::int64_t> prompt_lengths{37, 17, 64};

/// Enough pages of 16 for every head to hold all T tokens and the appends.
auto paged_maker(const padded_batch& in, std::int64_t page = 16) {
  const std::int64_t pages_per_head = (in.tokens + appended + page - 1) / page + 1;
  return [=, shape = in.shape](auto scheme, std::int64_t batch) {
    using S = typename decltype(scheme)::type;
    return S::make_cache(shape, batch, kt::layout::paged::pool_size{batch * shape.kv_heads * pages_per_head, page},
                         typename S::codec::config{});
  };
}
auto flat_maker(const padded_batch& in) {
  const std::int64_t slots = 2 * (in.tokens + appended) + 64;  // whole key groups of any codec
  return [=, shape = in.shape](auto scheme, std::int64_t batch) {
    using S = typename decltype(scheme)::type;
    return S::make_cache(shape, batch, kt::layout::flat::pool_size{batch * shape.kv_heads * slots},
                         typename S::codec::config{});
  };
}
const auto same_config = [](const auto& cfg) { return [cfg](std::int64_t, bool) { return cfg; }; };

/// Per-sequence rows of a [B, X, ·] float tensor held on the host and on the device:
/// the batch's view, or sequence b's first count(b) entries along the last axis.
struct given_rows {
  const host_tensor<float, 3>& host;
  device_tensor<float, 3> device;
  explicit given_rows(const host_tensor<float, 3>& rows) : host(rows), device(rows) {}
  template <class Count>
  kt::tensor_view<const float, 3, kt::device_space> device_of(std::int64_t b, Count&& count) const {
    const auto all = kt::detail::as_const(device.view);
    return b < 0 ? all : sequence_slice(all, b, 2, count(b));
  }
  kt::tensor_view<const float, 3> host_view() const { return host.cview(); }
};

// ---- Oracle A and B, a rotation over scorer × budget × layout × codec -----------

TEST(SequenceLengthsCuda, SnapKVWithAdaKVOnPagedAsIfEachSequenceWereAlone) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using pair = schemes<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16>;
  const padded_batch in(shape, prompt_lengths, 8, false, 10);
  typename pair::gpu::config cfg;
  cfg.score.window = 8;
  cfg.budget.keep = kt::keep_ratio{0.5};  // 8 of sequence 1's 17 tokens a head: its 8 protected fit (paper form)
  expect_each_sequence_as_if_alone<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16>(
      in, paged_maker(in), same_config(cfg), agreement::near_ties, false);
}

TEST(SequenceLengthsCuda, SnapKVAcrossTileBoundariesAt4097Tokens) {
  // Prompts of 4097, 4000 and 2049 tokens: SnapKV's passes tile the keys (64–128 tokens a
  // tile), so each sequence's last tile is partial at a different place; head_dim 128 and
  // group 4 (the wgmma passes on sm_90a; decode on the tensor cores).
  KVTRIM_SKIP_WITHOUT_GPU();
  const kt::model_shape wide{.q_heads = 8, .kv_heads = 2, .head_dim = 128};
  const padded_batch in(wide, {4097, 4000, 2049}, 16, false, 20);
  schemes<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16>::gpu::config cfg;
  cfg.score.window = 16;
  cfg.budget.keep = kt::keep_ratio{0.1};
  expect_each_sequence_as_if_alone<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16>(
      in, paged_maker(in), same_config(cfg), agreement::near_ties, false);
}

TEST(SequenceLengthsCuda, SnapKVWithGivenNormalisersOnFlatInt8) {
  // Normalisers [B, Hq, w] (strided), each sequence's computed from its own prompt
  // (given_lse.hpp: the last w queries against its first T_b keys); each sequence alone
  // reads its own rows.
  KVTRIM_SKIP_WITHOUT_GPU();
  constexpr std::int64_t window = 8;
  const padded_batch in(shape, prompt_lengths, window, false, 30);
  auto lse = kt::testing::make_tensor<float, 3>({in.batch(), shape.q_heads, window}, {0, 1, 2});
  for (std::int64_t b = 0; b < in.batch(); ++b) {
    const auto own_keys = sequence_slice(in.keys.cview(), b, 2, in.length(b));
    const auto own = kt::testing::reference_lse(own_keys, sequence_slice(in.queries.cview(), b));
    for (std::int64_t g = 0; g < shape.q_heads; ++g)
      for (std::int64_t t = 0; t < window; ++t) lse(b, g, t) = own(0, g, t);
  }
  const given_rows rows(lse);
  using pair = schemes<kt::layout::flat, kt::score::snapkv, kt::budget::uniform, kt::codec::int8>;
  typename pair::gpu::config cfg;
  cfg.score.window = window;
  cfg.budget.keep = kt::keep_ratio{0.3};
  const auto config_for = [&](std::int64_t b, bool on_device) {
    auto c = cfg;
    if (on_device)
      c.score = c.score.with_lse(rows.device_of(b, [](std::int64_t) { return window; }));
    else
      c.score = c.score.with_lse(rows.host_view());
    return c;
  };
  expect_each_sequence_as_if_alone<kt::layout::flat, kt::score::snapkv, kt::budget::uniform, kt::codec::int8>(
      in, flat_maker(in), config_for, agreement::near_ties, true);
}

TEST(SequenceLengthsCuda, H2OWithPyramidObservesEachSequencesOwnQueries) {
  // All T queries per sequence, NaN past T_b: H2O reads each prompt's first T_b.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, prompt_lengths, 0, true, 40);
  schemes<kt::layout::paged, kt::score::h2o, kt::budget::pyramid, kt::codec::fp16>::gpu::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.5};
  cfg.budget.layer = 2;
  cfg.budget.layers = 6;
  expect_each_sequence_as_if_alone<kt::layout::paged, kt::score::h2o, kt::budget::pyramid, kt::codec::fp16>(
      in, paged_maker(in), same_config(cfg), agreement::near_ties, true);
}

TEST(SequenceLengthsCuda, KeyNormOnContiguousKeepingEquallyMany) {
  // Contiguous heads share one length: keep_tokens 12 ≤ every T_b keeps 12 in every head.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, prompt_lengths, 0, false, 50);
  schemes<kt::layout::contiguous, kt::score::key_norm, kt::budget::uniform, kt::codec::fp16>::gpu::config cfg;
  cfg.budget.keep = kt::keep_tokens{12};
  const auto make = [](auto scheme, std::int64_t batch) {
    using S = typename decltype(scheme)::type;
    return S::make_cache(shape, batch, std::int64_t{12 + appended}, kt::codec::fp16::config{});
  };
  expect_each_sequence_as_if_alone<kt::layout::contiguous, kt::score::key_norm, kt::budget::uniform, kt::codec::fp16>(
      in, make, same_config(cfg), agreement::near_ties, true);
}

TEST(SequenceLengthsCuda, KeyNormOnFlatFp8WithAOneTokenPrompt) {
  // fp8's per-head amax scales are fitted at compaction: each from its own head's kept rows.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, {1, 40, 23}, 0, false, 60);
  schemes<kt::layout::flat, kt::score::key_norm, kt::budget::uniform, kt::codec::fp8>::gpu::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.6};  // the one-token prompt keeps its token
  expect_each_sequence_as_if_alone<kt::layout::flat, kt::score::key_norm, kt::budget::uniform, kt::codec::fp8>(
      in, flat_maker(in), same_config(cfg), agreement::near_ties, true);
}

TEST(SequenceLengthsCuda, StaticWindowsWithPerHeadBudgetsAndAOneTokenPrompt) {
  // Windows and per-head budgets longer than sequence 1's single token: it keeps it in every head.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, {37, 1, 64}, 0, false, 70);
  schemes<kt::layout::paged, kt::score::static_window, kt::budget::per_head, kt::codec::fp16>::gpu::config cfg;
  cfg.score.sinks = 3;
  cfg.score.windows = {5, 12, 2, 40};
  cfg.budget.lengths = {9, 30, 1, 50};  // head 3 keeps all of sequence 0's 37
  cfg.budget.kv_heads = shape.kv_heads;
  expect_each_sequence_as_if_alone<kt::layout::paged, kt::score::static_window, kt::budget::per_head,
                                   kt::codec::fp16>(in, paged_maker(in, 8), same_config(cfg), agreement::exact, true);
}

TEST(SequenceLengthsCuda, RazorAttentionCompensatesFromEachSequencesOwnDroppedTokens) {
  // The compensation token of a non-retrieval head: the mean of its own sequence's dropped
  // keys and values (never a padded one: NaN), its bias ln N_dropped of T_b.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, prompt_lengths, 0, false, 80);
  schemes<kt::layout::paged, kt::score::retrieval_head, kt::budget::by_scorer, kt::codec::fp16>::gpu::config cfg;
  cfg.score.retrieval = {false, true, false, false};
  cfg.score.sinks = 2;
  cfg.score.min_recent = 6;
  cfg.score.recent_fraction = 0.1;
  expect_each_sequence_as_if_alone<kt::layout::paged, kt::score::retrieval_head, kt::budget::by_scorer,
                                   kt::codec::fp16>(in, paged_maker(in), same_config(cfg), agreement::exact, true);
}

TEST(SequenceLengthsCuda, NonFiniteExternalScoresOnSharedPagedWithAOneTokenPrompt) {
  // Scores read at each sequence's rows: NaN (ranked −∞), ±∞ on real tokens, +∞ in the
  // padding — which would rank first if it were read.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, {37, 1, 64}, 0, false, 90);
  auto given = kt::testing::random_tensor<float, 3>({in.batch(), shape.kv_heads, in.tokens}, 91, 1.0f, {0, 0, 3});
  for (std::int64_t b = 0; b < in.batch(); ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      for (std::int64_t t = 0; t < in.tokens; ++t) {
        if (t >= in.length(b)) given(b, h, t) = inf_value;
        else if (t % 3 == 0) given(b, h, t) = nan_value;
        else if (t % 5 == 1) given(b, h, t) = -inf_value;
        else if (t % 7 == 2) given(b, h, t) = inf_value;
      }
  const given_rows rows(given);
  using pair = schemes<kt::layout::shared_paged, kt::score::external, kt::budget::uniform, kt::codec::fp16>;
  typename pair::gpu::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.35};
  const auto config_for = [&](std::int64_t b, bool on_device) {
    auto c = cfg;
    c.score = on_device ? kt::score::external::config::from(rows.device_of(b, [&](std::int64_t s) { return in.length(s); }))
                        : kt::score::external::config::from(rows.host_view());
    return c;
  };
  const auto make = [&](auto scheme, std::int64_t batch) {
    using S = typename decltype(scheme)::type;
    const std::int64_t page = 4, pages = batch * ((in.tokens + appended + page - 1) / page + 1);
    return S::make_cache(shape, batch, kt::layout::shared_paged::pool_size{pages, page, kt::layout::shared_paged::order::hnd},
                         kt::codec::fp16::config{});
  };
  expect_each_sequence_as_if_alone<kt::layout::shared_paged, kt::score::external, kt::budget::uniform,
                                   kt::codec::fp16>(in, make, config_for, agreement::exact, true);
}

// ---- a CUDA graph -----------------------------------------------------------------

/// A compress with lengths captured in a graph (the lengths are host values, read at
/// capture: overwriting them afterwards changes nothing) replays as the direct call —
/// kept tokens, positions, rows, attention bit for bit (the same cache shapes: the same
/// split, the same arithmetic) — and again after new inputs are uploaded into the
/// graph's buffers.
TEST(SequenceLengthsCuda, CompressWithLengthsReplaysFromACudaGraph) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using scheme = schemes<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16>::gpu;
  const padded_batch first(shape, prompt_lengths, 8, false, 100), second(shape, prompt_lengths, 8, false, 101);
  scheme::config cfg;
  cfg.score.window = 8;
  cfg.budget.keep = kt::keep_ratio{0.5};
  const auto make = paged_maker(first);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  device_batch inputs(first);  // the graph's buffers
  auto captured_cache = make(std::type_identity<scheme>{}, first.batch());
  std::vector<std::int64_t> lengths = first.lengths;
  gpu_compress<scheme> captured(captured_cache, cfg, inputs.of(first, -1), lengths.data());
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  captured.enqueue(stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  std::fill(lengths.begin(), lengths.end(), std::int64_t{1});  // baked at capture: never read again

  for (const padded_batch* in : {&first, &second}) {
    SCOPED_TRACE(in == &first ? "the captured inputs" : "new inputs in the graph's buffers");
    inputs.keys.buffer.upload(in->keys.storage);
    inputs.values.buffer.upload(in->values.storage);
    inputs.queries.buffer.upload(in->queries.storage);
    inputs.new_keys.buffer.upload(in->new_keys.storage);
    inputs.new_values.buffer.upload(in->new_values.storage);
    inputs.decode_queries.buffer.upload(in->decode_queries.storage);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    const outcome replayed = finish(captured, inputs.of(*in, -1), stream);

    const device_batch direct_inputs(*in);
    auto direct_cache = make(std::type_identity<scheme>{}, in->batch());
    const outcome direct = run_gpu<scheme>(direct_cache, cfg, direct_inputs.of(*in, -1), in->lengths.data(), stream);
    EXPECT_EQ(replayed.kept, direct.kept);
    EXPECT_EQ(replayed.positions, direct.positions);
    EXPECT_EQ(replayed.next_positions, direct.next_positions);
    EXPECT_EQ(replayed.appended_next_positions, direct.appended_next_positions);
    EXPECT_TRUE(replayed.rows == direct.rows) << "stored key/value rows";
    ASSERT_EQ(replayed.attention.size(), direct.attention.size());
    EXPECT_EQ(std::memcmp(replayed.attention.data(), direct.attention.data(), direct.attention.size() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(replayed.appended_attention.data(), direct.appended_attention.data(),
                          direct.appended_attention.size() * sizeof(float)),
              0);
    for (std::int64_t b = 0; b < in->batch(); ++b)  // and they are the lengths' compress, not all-T's
      EXPECT_EQ(direct.next_positions[static_cast<std::size_t>(b * shape.kv_heads)], start_position + in->length(b));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// ---- refusals ---------------------------------------------------------------------

/// The CPU's message for a compress of `in` with `lengths` (empty: accepted).
template <class Scheme>
std::string cpu_message(const typename Scheme::config& cfg, const padded_batch& in, const std::vector<std::int64_t>& lengths,
                        typename Scheme::cache& cache, kt::tensor_view<const half, 4> queries) {
  kt::compress_options<kt::host_space> options;
  options.sequence_lengths = lengths.data();
  std::vector<std::byte> scratch(Scheme::compress_workspace(in.shape, in.batch(), in.tokens, cfg));
  auto& view = cache.view();
  try {
    if constexpr (Scheme::scorer::needs_queries)
      Scheme::compress(in.keys.cview(), in.values.cview(), queries, view, cfg, options,
                       kt::workspace{scratch.data(), scratch.size()});
    else
      Scheme::compress(in.keys.cview(), in.values.cview(), view, cfg, options, kt::workspace{scratch.data(), scratch.size()});
  } catch (const kt::error& e) {
    return e.what();
  }
  return {};
}

/// The same compress on the device.
template <class Scheme>
void gpu_compress_plain(typename Scheme::cache& cache, const typename Scheme::config& cfg, const device_batch::views& in,
                        const std::vector<std::int64_t>& lengths) {
  kt::compress_options<kt::device_space> options;
  options.sequence_lengths = lengths.data();
  device_buffer<std::byte> scratch(
      Scheme::compress_workspace(cache.view().shape, in.keys.extent(0), in.keys.extent(2), cfg));
  auto& view = cache.view();
  if constexpr (Scheme::scorer::needs_queries)
    Scheme::compress(in.keys, in.values, in.queries, view, cfg, options, kt::workspace{scratch.data(), scratch.size()},
                     cudaStream_t{});
  else
    Scheme::compress(in.keys, in.values, view, cfg, options, kt::workspace{scratch.data(), scratch.size()}, cudaStream_t{});
}

/// A compress the device refuses on the host: kvtrim::error with the CPU's message,
/// thrown before anything is enqueued — every byte of the cache (status words
/// included) as it was, nothing recorded.
template <class Pair>
void expect_refused_on_the_host(typename Pair::gpu::cache& gpu, const typename Pair::gpu::config& cfg,
                                const padded_batch& in, const device_batch::views& views,
                                const std::vector<std::int64_t>& lengths, const std::string& argument,
                                kt::tensor_view<const half, 4> host_queries) {
  SCOPED_TRACE("lengths " + list(lengths));
  auto cpu = [&] {
    if constexpr (std::is_same_v<typename Pair::gpu::layout, kt::layout::contiguous>)
      return Pair::cpu::make_cache(gpu.view().shape, in.batch(), gpu.view().capacity, typename Pair::cpu::codec::config{});
    else if constexpr (std::is_same_v<typename Pair::gpu::layout, kt::layout::paged>)
      return Pair::cpu::make_cache(gpu.view().shape, in.batch(),
                                   kt::layout::paged::pool_size{gpu.view().pages, gpu.view().page_size},
                                   typename Pair::cpu::codec::config{});
  }();
  const std::string expected = cpu_message<typename Pair::cpu>(cfg, in, lengths, cpu, host_queries);
  ASSERT_NE(expected.find("argument '" + argument + "'"), std::string::npos) << expected;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<std::byte> before = kt::testing::download_bytes(gpu.data(), gpu.bytes());
  try {
    gpu_compress_plain<typename Pair::gpu>(gpu, cfg, views, lengths);
    ADD_FAILURE() << "the device accepted what the CPU refused: " << expected;
  } catch (const kt::error& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(kt::testing::download_bytes(gpu.data(), gpu.bytes()) == before) << "a refused call changed the cache";
  expect_no_refusal(gpu.view(), nullptr);
}

/// A compress the device refuses from the device: accepted on the host, then check_status
/// throws the CPU's message; every byte of the cache as it was (the status words cleared).
template <class Pair>
void expect_refused_on_the_device(typename Pair::gpu::cache& gpu, const typename Pair::gpu::config& cfg,
                                  const padded_batch& in, const device_batch::views& views) {
  auto cpu = Pair::cpu::make_cache(gpu.view().shape, in.batch(),
                                   kt::layout::paged::pool_size{gpu.view().pages, gpu.view().page_size},
                                   typename Pair::cpu::codec::config{});
  const std::string expected = cpu_message<typename Pair::cpu>(cfg, in, in.lengths, cpu, in.queries.cview());
  ASSERT_FALSE(expected.empty()) << "the CPU accepted the input";
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<std::byte> before = kt::testing::download_bytes(gpu.data(), gpu.bytes());
  ASSERT_NO_THROW(gpu_compress_plain<typename Pair::gpu>(gpu, cfg, views, in.lengths));
  try {
    kt::check_status(gpu.view(), nullptr);
    ADD_FAILURE() << "check_status did not throw; expected: " << expected;
  } catch (const kt::error& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
  EXPECT_TRUE(kt::testing::download_bytes(gpu.data(), gpu.bytes()) == before)
      << "a refused call changed the cache (status words included, after check_status)";
}

using snapkv_paged = schemes<kt::layout::paged, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16>;

/// A first compress, so that "as it was" is a cache holding tokens.
template <class Scheme>
void fill(typename Scheme::cache& cache, const typename Scheme::config& cfg, const padded_batch& in,
          const device_batch& device) {
  gpu_compress<Scheme> call(cache, cfg, device.of(in, -1), in.lengths.data());
  call.enqueue(nullptr);
  check_cuda(cudaDeviceSynchronize(), "compress");
  expect_no_refusal(cache.view(), nullptr);
}

TEST(SequenceLengthsCuda, BadLengthsAreRefusedOnTheHostIntact) {
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, prompt_lengths, 8, false, 110);
  const device_batch device(in);
  snapkv_paged::gpu::config cfg;
  cfg.score.window = 8;
  cfg.budget.keep = kt::keep_ratio{0.5};
  auto cache = paged_maker(in)(std::type_identity<snapkv_paged::gpu>{}, in.batch());
  fill<snapkv_paged::gpu>(cache, cfg, in, device);
  const auto views = device.of(in, -1);
  const auto queries = in.queries.cview();
  for (const std::vector<std::int64_t>& lengths : {std::vector<std::int64_t>{37, 0, 64},   // 0
                                                   std::vector<std::int64_t>{37, 17, 65},  // past T
                                                   std::vector<std::int64_t>{37, 7, 64},   // shorter than the window
                                                   std::vector<std::int64_t>{-3, 17, 64}})
    expect_refused_on_the_host<snapkv_paged>(cache, cfg, in, views, lengths, "options.sequence_lengths", queries);
}

TEST(SequenceLengthsCuda, H2OShortQueriesAndPyramidKeepingMoreOfAShorterPromptAreRefused) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using pair = schemes<kt::layout::paged, kt::score::h2o, kt::budget::pyramid, kt::codec::fp16>;
  {
    // H2O reads each prompt's first T_b queries: T − 1 of them would be read past their end.
    const padded_batch in(shape, prompt_lengths, 0, true, 120);
    const device_batch device(in);
    pair::gpu::config cfg;
    cfg.budget.keep = kt::keep_ratio{0.5};
    auto cache = paged_maker(in)(std::type_identity<pair::gpu>{}, in.batch());
    fill<pair::gpu>(cache, cfg, in, device);
    auto views = device.of(in, -1);
    views.queries.extents[2] = in.tokens - 1;
    auto queries = in.queries.cview();
    queries.extents[2] = in.tokens - 1;
    expect_refused_on_the_host<pair>(cache, cfg, in, views, in.lengths, "window_queries", queries);
  }
  {
    // PyramidKV's deep layers keep more of a short prompt than of a long one (its minimum
    // 2B − M shrinks as T grows): keep_tokens 10, β 2, layer 1 of 2 keeps 8 of 12 but 5 of 40;
    // the selection's buffers hold what T keeps.
    const padded_batch in(shape, {12, 40}, 0, true, 121);
    const device_batch device(in);
    pair::gpu::config cfg;
    cfg.budget.keep = kt::keep_tokens{10};
    cfg.budget.beta = 2;
    cfg.budget.layer = 1;
    cfg.budget.layers = 2;
    ASSERT_GT(kt::budget::pyramid::max_keep(cfg.budget, 12), kt::budget::pyramid::max_keep(cfg.budget, 40));
    auto cache = paged_maker(in)(std::type_identity<pair::gpu>{}, in.batch());
    expect_refused_on_the_host<pair>(cache, cfg, in, device.of(in, -1), in.lengths, "options.sequence_lengths",
                                     in.queries.cview());
  }
}

TEST(SequenceLengthsCuda, ContiguousRefusesLengthsThatKeepDifferentCounts) {
  KVTRIM_SKIP_WITHOUT_GPU();
  using pair = schemes<kt::layout::contiguous, kt::score::key_norm, kt::budget::uniform, kt::codec::fp16>;
  const padded_batch in(shape, prompt_lengths, 0, false, 130);
  const device_batch device(in);
  pair::gpu::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.5};  // 18 of 37 but 8 of 17
  auto cache = pair::gpu::make_cache(shape, in.batch(), std::int64_t{40}, kt::codec::fp16::config{});
  expect_refused_on_the_host<pair>(cache, cfg, in, device.of(in, -1), in.lengths, "options.sequence_lengths", {});
}

TEST(SequenceLengthsCuda, NaNInAPromptIsRefusedOnTheDeviceButNotInThePadding) {
  // Every good call here and above has NaN in its padding, which the device's scan skips
  // (fill's check_status). A NaN inside sequence 1's prompt is refused naming it — where a
  // scan that read sequence 0's padding (tokens 37..63, NaN) would name sequence 0 first.
  KVTRIM_SKIP_WITHOUT_GPU();
  const padded_batch in(shape, prompt_lengths, 8, false, 140);
  snapkv_paged::gpu::config cfg;
  cfg.score.window = 8;
  cfg.budget.keep = kt::keep_ratio{0.5};
  const device_batch device(in);
  auto cache = paged_maker(in)(std::type_identity<snapkv_paged::gpu>{}, in.batch());
  fill<snapkv_paged::gpu>(cache, cfg, in, device);
  for (const int argument : {0, 1}) {
    SCOPED_TRACE(argument == 0 ? "keys" : "values");
    padded_batch poisoned(shape, prompt_lengths, 8, false, 140);  // `in` again, then one NaN
    (argument == 0 ? poisoned.keys : poisoned.values)(1, 2, 9, 5) = kt::from_float<half>(nan_value);
    const device_batch bad(poisoned);
    expect_refused_on_the_device<snapkv_paged>(cache, cfg, poisoned, bad.of(poisoned, -1));
    // The next good call is accepted again.
    fill<snapkv_paged::gpu>(cache, cfg, in, device);
  }
}

TEST(SequenceLengthsCuda, NaNInAnH2OPromptsQueriesIsRefusedButNotInItsPadding) {
  // H2O's queries are per token, NaN past each T_b (the scan's query bound, finite_lengths::queries):
  // every good call reads past none of it; a NaN in sequence 2's query 30 (< 64) is refused naming it.
  KVTRIM_SKIP_WITHOUT_GPU();
  using pair = schemes<kt::layout::paged, kt::score::h2o, kt::budget::pyramid, kt::codec::fp16>;
  const padded_batch in(shape, prompt_lengths, 0, true, 160);
  pair::gpu::config cfg;
  cfg.budget.keep = kt::keep_ratio{0.5};
  cfg.budget.layer = 2;
  cfg.budget.layers = 6;
  const device_batch device(in);
  auto cache = paged_maker(in)(std::type_identity<pair::gpu>{}, in.batch());
  fill<pair::gpu>(cache, cfg, in, device);
  padded_batch poisoned(shape, prompt_lengths, 0, true, 160);  // `in` again, then one NaN
  poisoned.queries(2, 3, 30, 7) = kt::from_float<half>(nan_value);
  const device_batch bad(poisoned);
  expect_refused_on_the_device<pair>(cache, cfg, poisoned, bad.of(poisoned, -1));
  fill<pair::gpu>(cache, cfg, in, device);  // the next good call is accepted
}

TEST(SequenceLengthsCuda, AdaKVPaperFormRefusalNamesTheFirstRefusingSequence) {
  // SnapKV protects its window of 4 (scored +inf); 20 % of a 17- or 19-token prompt is 3 < 4.
  // The CPU refuses in its per-sequence pass at the first such sequence; the device's budget runs
  // on each sequence's slice and the fold keeps the first refusal, which the compaction reports.
  // Lengths {37, 17, 64}: sequence 1 alone refuses; {37, 17, 19}: sequences 1 and 2 both do, so a
  // fold that kept the last would name sequence 2.
  KVTRIM_SKIP_WITHOUT_GPU();
  for (const std::vector<std::int64_t>& lengths : {prompt_lengths, std::vector<std::int64_t>{37, 17, 19}}) {
    SCOPED_TRACE(::testing::PrintToString(lengths));
    const padded_batch in(shape, lengths, 4, false, 150);
    snapkv_paged::gpu::config cfg;
    cfg.score.window = 4;
    cfg.budget.keep = kt::keep_ratio{0.2};
    const device_batch device(in);
    auto cache = paged_maker(in)(std::type_identity<snapkv_paged::gpu>{}, in.batch());
    snapkv_paged::gpu::config fits = cfg;
    fits.budget.keep = kt::keep_ratio{0.5};
    fill<snapkv_paged::gpu>(cache, fits, in, device);
    expect_refused_on_the_device<snapkv_paged>(cache, cfg, in, device.of(in, -1));  // the CPU's words exactly
    auto cpu = snapkv_paged::cpu::make_cache(shape, in.batch(),
                                             kt::layout::paged::pool_size{cache.view().pages, cache.view().page_size},
                                             kt::codec::fp16::config{});
    const std::string expected = cpu_message<snapkv_paged::cpu>(cfg, in, in.lengths, cpu, in.queries.cview());
    EXPECT_NE(expected.find("(sequence 1 of the padded batch: its 17 tokens alone)"), std::string::npos) << expected;
    fill<snapkv_paged::gpu>(cache, fits, in, device);  // the refusal is per call
  }
}

TEST(SequenceLengthsCuda, ScorerScratchOfTheBatchHoldsEverySequenceAlone) {
  // Host arithmetic only (no GPU): the device attention-mass plan picks its key splits from the
  // row blocks, so one sequence of T_b < T alone can need more scratch than the batch's (B, T)
  // — found by review at H2O, B = 2, T = 1088, T_b = 961 (Llama-3-8B heads). The compress
  // workspace must hold every (1, t ≤ T) call the padded batch's per-sequence loop makes.
  const auto holds_every_sequence = [](auto scorer_impl, const auto& config, const kt::model_shape& heads,
                                       std::int64_t batch, std::int64_t tokens, std::int64_t first) {
    using impl = decltype(scorer_impl);
    const std::size_t carved = std::max(impl::workspace_bytes(config, heads, batch, tokens),
                                        impl::sequence_workspace_bytes(config, heads, tokens));
    for (std::int64_t t = first; t <= tokens; ++t)
      if (impl::workspace_bytes(config, heads, 1, t) > carved) {
        ADD_FAILURE() << "batch " << batch << ", T " << tokens << ": a sequence of " << t << " tokens needs "
                      << impl::workspace_bytes(config, heads, 1, t) << " bytes, the carve holds " << carved;
        return;
      }
  };
  const kt::model_shape llama{.q_heads = 32, .kv_heads = 8, .head_dim = 128};
  const kt::model_shape narrow{.q_heads = 4, .kv_heads = 4, .head_dim = 128};
  const kt::model_shape small{.q_heads = 8, .kv_heads = 2, .head_dim = 64};
  kt::score::snapkv::config snapkv;
  snapkv.window = 64;
  for (const kt::model_shape& heads : {llama, narrow, small})
    for (const std::int64_t batch : {1, 2, 3, 8})
      for (const std::int64_t tokens : {1088, 2048, 2160, 4097}) {
        holds_every_sequence(kt::implementation<kt::score::h2o, kt::backend::cuda>{}, kt::score::h2o::config{}, heads,
                             batch, tokens, 1);
        holds_every_sequence(kt::implementation<kt::score::snapkv, kt::backend::cuda>{}, snapkv, heads, batch, tokens,
                             snapkv.window);
      }
}

}  // namespace
