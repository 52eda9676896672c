// kvtrim/backend/cuda/decode_attention.cuh — decode attention on the GPU:
// one new query per query head over a compressed cache (codec::fp16 / bf16 / fp32).
//
// Memory-bound by design: the cache is read exactly once per step.
//  * GQA: a block owns one (sequence, kv head) and all `Group` query heads that
//    read it, so every key/value row is loaded once for the whole group.
//  * Split-K (FlashDecoding): a head's tokens are cut into `splits` chunks, one
//    block each, sized so one wave of blocks fills the GPU even for batch 1;
//    each block writes its partial output and log-sum-exp to the workspace and
//    a second kernel merges them: out = Σ_s 2^(lse_s − lse) · o_s.
//  * Inside a block, `LanesPerToken = head_dim / 8` lanes share a token row,
//    each holding 8 elements (one 16-byte load for 16-bit types); a warp holds
//    32 / LanesPerToken tokens at once and `Unroll` of them are in flight per
//    lane before the first is used. Dot products finish with xor-shuffles inside
//    the lane group; softmax is online (running max m, sum l, accumulator) in
//    fp32, in base 2 with log2(e)/√D folded into the query.
//  * Partial states of the token groups are merged through shared memory.
// Same math as the CPU reference (backend/cpu/decode_attention.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/contiguous.hpp"

namespace kvtrim {

namespace cuda_detail {

inline constexpr int decode_warps = 4;
inline constexpr int decode_threads = decode_warps * 32;
inline constexpr int decode_unroll = 4;
/// A split never gets fewer tokens than this (below it the merge costs more than it saves).
inline constexpr std::int64_t decode_min_tokens_per_split = 128;
inline constexpr std::int64_t decode_max_splits = 256;

template <class View, class QueryT, class OutT>
struct decode_params {
  View cache;
  const QueryT* queries;
  std::int64_t query_batch_stride, query_head_stride;
  OutT* out;
  std::int64_t out_batch_stride, out_head_stride;
  float* partial_out;  // [batch, q_heads, splits, head_dim]   (splits > 1)
  float* partial_lse;  // [batch, q_heads, splits], base 2     (splits > 1)
  int splits;
  std::int64_t tokens_per_split;
  float query_scale;  // log2(e) / √head_dim
};

template <int HeadDim, int Group, class StoreT, class View, class QueryT, class OutT>
__global__ void __launch_bounds__(decode_threads)
    decode_attention_split(const __grid_constant__ decode_params<View, QueryT, OutT> params) {
  constexpr int lanes_per_token = HeadDim / 8;
  constexpr int tokens_per_warp = 32 / lanes_per_token;
  constexpr int token_groups = decode_warps * tokens_per_warp;
  constexpr int tokens_per_step = token_groups * decode_unroll;
  constexpr float negative_infinity = -std::numeric_limits<float>::infinity();

  __shared__ float shared_max[token_groups][Group];
  __shared__ float shared_sum[token_groups][Group];
  __shared__ float shared_accumulator[token_groups][Group][HeadDim];

  const View& cache = params.cache;
  const int split = blockIdx.x;
  const std::int64_t h = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int token_group = warp * tokens_per_warp + lane / lanes_per_token;
  const int first_dim = (lane % lanes_per_token) * 8;

  const std::int64_t length = cache.head_length(b, h);
  const std::int64_t begin = split * params.tokens_per_split;
  const std::int64_t end = std::min<std::int64_t>(length, begin + params.tokens_per_split);

  float query[Group][8];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    const QueryT* row = params.queries + b * params.query_batch_stride + (h * Group + g) * params.query_head_stride;
#pragma unroll
    for (int i = 0; i < 8; ++i) query[g][i] = to_float(row[first_dim + i]) * params.query_scale;
  }

  float running_max[Group], running_sum[Group], accumulator[Group][8];
#pragma unroll
  for (int g = 0; g < Group; ++g) {
    running_max[g] = negative_infinity;
    running_sum[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) accumulator[g][i] = 0.0f;
  }

  const auto* keys = reinterpret_cast<const StoreT*>(cache.storage.keys);
  const auto* values = reinterpret_cast<const StoreT*>(cache.storage.values);

  for (std::int64_t step = begin; step < end; step += tokens_per_step) {
    packed8<StoreT> key[decode_unroll], value[decode_unroll];
    bool valid[decode_unroll];
#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const std::int64_t token = step + u * token_groups + token_group;
      valid[u] = token < end;
      if (valid[u]) {
        const std::int64_t row = cache.slot(b, h, token) * HeadDim + first_dim;
        key[u] = load_packed8(keys + row);
        value[u] = load_packed8(values + row);
      } else {
        key[u] = value[u] = zero_packed8<StoreT>();
      }
    }
#pragma unroll
    for (int g = 0; g < Group; ++g) {
      float score[decode_unroll];
#pragma unroll
      for (int u = 0; u < decode_unroll; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(query[g][i], key[u][i], dot);
#pragma unroll
        for (int offset = lanes_per_token / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        score[u] = valid[u] ? dot : negative_infinity;
      }
      float step_max = running_max[g];
#pragma unroll
      for (int u = 0; u < decode_unroll; ++u) step_max = fmaxf(step_max, score[u]);
      if (step_max == negative_infinity) continue;  // no valid token yet for this lane group
      const float rescale = exp2f(running_max[g] - step_max);
      running_max[g] = step_max;
      running_sum[g] *= rescale;
#pragma unroll
      for (int i = 0; i < 8; ++i) accumulator[g][i] *= rescale;
#pragma unroll
      for (int u = 0; u < decode_unroll; ++u) {
        const float weight = exp2f(score[u] - step_max);  // 0 for invalid tokens
        running_sum[g] += weight;
#pragma unroll
        for (int i = 0; i < 8; ++i) accumulator[g][i] = fmaf(weight, value[u][i], accumulator[g][i]);
      }
    }
  }

  // Merge the token groups' partial states.
#pragma unroll
  for (int g = 0; g < Group; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) shared_accumulator[token_group][g][first_dim + i] = accumulator[g][i];
    if (first_dim == 0) {
      shared_max[token_group][g] = running_max[g];
      shared_sum[token_group][g] = running_sum[g];
    }
  }
  __syncthreads();

  for (int index = threadIdx.x; index < Group * HeadDim; index += decode_threads) {
    const int g = index / HeadDim;
    const int d = index % HeadDim;
    float block_max = negative_infinity;
#pragma unroll
    for (int t = 0; t < token_groups; ++t) block_max = fmaxf(block_max, shared_max[t][g]);
    float sum = 0.0f, output = 0.0f;
    if (block_max != negative_infinity) {
#pragma unroll
      for (int t = 0; t < token_groups; ++t) {
        const float weight = shared_max[t][g] == negative_infinity ? 0.0f : exp2f(shared_max[t][g] - block_max);
        sum += weight * shared_sum[t][g];
        output += weight * shared_accumulator[t][g][d];
      }
    }
    const std::int64_t q_head = h * Group + g;
    if (params.splits == 1) {
      params.out[b * params.out_batch_stride + q_head * params.out_head_stride + d] = from_float<OutT>(output / sum);
    } else {
      const std::int64_t partial = (b * gridDim.y * Group + q_head) * params.splits + split;
      params.partial_out[partial * HeadDim + d] = sum > 0.0f ? output / sum : 0.0f;
      if (d == 0) params.partial_lse[partial] = sum > 0.0f ? block_max + log2f(sum) : negative_infinity;
    }
  }
}

/// out[b, j, :] = Σ_s 2^(lse_s − max) o_s / Σ_s 2^(lse_s − max).
template <int HeadDim, class OutT>
__global__ void __launch_bounds__(HeadDim) merge_decode_splits(const float* partial_out, const float* partial_lse,
                                                              int splits, std::int64_t q_heads, OutT* out,
                                                              std::int64_t out_batch_stride,
                                                              std::int64_t out_head_stride) {
  const std::int64_t row = blockIdx.x;  // b · q_heads + j
  const std::int64_t b = row / q_heads;
  const std::int64_t j = row % q_heads;
  const int d = threadIdx.x;
  const float* lse = partial_lse + row * splits;
  float max_lse = -std::numeric_limits<float>::infinity();
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, lse[s]);
  float sum = 0.0f, output = 0.0f;
  for (int s = 0; s < splits; ++s) {
    if (lse[s] == -std::numeric_limits<float>::infinity()) continue;
    const float weight = exp2f(lse[s] - max_lse);
    sum += weight;
    output += weight * partial_out[(row * splits + s) * HeadDim + d];
  }
  out[b * out_batch_stride + j * out_head_stride + d] = from_float<OutT>(output / sum);
}

/// How many chunks each head's tokens are cut into: enough blocks for one full
/// wave of the GPU, never fewer than decode_min_tokens_per_split tokens each.
inline int decode_splits(std::int64_t heads, std::int64_t length, int resident_blocks) {
  const std::int64_t by_occupancy = std::max<std::int64_t>(1, resident_blocks / std::max<std::int64_t>(heads, 1));
  const std::int64_t by_length = std::max<std::int64_t>(1, length / decode_min_tokens_per_split);
  return static_cast<int>(std::min({by_occupancy, by_length, decode_max_splits}));
}

}  // namespace cuda_detail

template <>
struct implementation<stage::decode_attention, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::scheme::attend";

  /// The workspace holds partials for the most splits any instantiation can
  /// choose: the occupancy bound of 2048 threads per SM (16 blocks of 128).
  template <class View>
  static std::size_t workspace_bytes(const View& cache) {
    const int most_resident = backend::cuda::multiprocessor_count() * (2048 / cuda_detail::decode_threads);
    const int splits = cuda_detail::decode_splits(cache.batch * cache.shape.kv_heads, cache.length, most_resident);
    if (splits == 1) return 0;
    workspace_carver carver;
    carve(carver, cache, splits);
    return carver.bytes();
  }

  template <class View, class QueryT, class OutT>
  static void attend(const tensor_view<QueryT, 3, device_space>& queries, const View& cache,
                     const tensor_view<OutT, 3, device_space>& out, workspace scratch, cudaStream_t stream) {
    static_assert(std::is_same_v<typename View::layout_type, layout::contiguous>,
                  "kvtrim: backend::cuda decode attention reads layout::contiguous caches for now");
    static_assert(cuda_detail::is_plain_codec<typename View::codec>::value,
                  "kvtrim: backend::cuda decode attention reads codec::fp16 / bf16 / fp32 for now");
    using store_type = cuda_detail::device_element_t<typename View::codec::element>;
    using query_type = cuda_detail::device_element_t<QueryT>;
    using out_type = cuda_detail::device_element_t<OutT>;
    if (cache.length < 1)
      detail::fail(function, "cache", "at least one token in every head", "an empty cache (length 0)");
    if (cache.batch > 65535 || cache.shape.kv_heads > 65535)
      detail::fail(function, "cache", "batch and kv_heads ≤ 65535 on backend::cuda",
                   detail::cat("batch ", cache.batch, ", kv_heads ", cache.shape.kv_heads));
    cuda_detail::check_aligned16(function, "cache.storage.keys", cache.storage.keys);
    cuda_detail::check_aligned16(function, "cache.storage.values", cache.storage.values);

    cuda_detail::dispatch_head_dim(cache.shape.head_dim, function, [&](auto head_dim_constant) {
      constexpr int head_dim = decltype(head_dim_constant)::value;
      cuda_detail::dispatch_group_size(cache.shape.group_size(), function, [&](auto group_constant) {
        constexpr int group = decltype(group_constant)::value;
        const auto kernel = cuda_detail::decode_attention_split<head_dim, group, store_type, View, query_type, out_type>;
        // One wave of blocks fills the GPU: size the split count by this
        // kernel's real occupancy (registers differ with head_dim and group).
        int blocks_per_multiprocessor = 0;
        detail::check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel,
                                                                         cuda_detail::decode_threads, 0),
                           function, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
        const int splits = cuda_detail::decode_splits(
            cache.batch * cache.shape.kv_heads, cache.length,
            backend::cuda::multiprocessor_count() * std::max(blocks_per_multiprocessor, 1));
        workspace_carver carver(scratch);
        const auto [partial_out, partial_lse] = carve(carver, cache, splits);
        const std::int64_t tokens_per_split = cuda_detail::ceil_div(cache.length, splits);
        using params_type = cuda_detail::decode_params<View, query_type, out_type>;
        const params_type params{cache,
                                 reinterpret_cast<const query_type*>(queries.data),
                                 queries.stride(0),
                                 queries.stride(1),
                                 reinterpret_cast<out_type*>(out.data),
                                 out.stride(0),
                                 out.stride(1),
                                 partial_out,
                                 partial_lse,
                                 splits,
                                 tokens_per_split,
                                 static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)))};
        const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(cache.shape.kv_heads),
                        static_cast<unsigned>(cache.batch));
        kernel<<<grid, cuda_detail::decode_threads, 0, stream>>>(params);
        detail::check_launch(function, "decode_attention_split");
        if (splits > 1) {
          const auto rows = static_cast<unsigned>(cache.batch * cache.shape.q_heads);
          cuda_detail::merge_decode_splits<head_dim, out_type><<<rows, head_dim, 0, stream>>>(
              partial_out, partial_lse, splits, cache.shape.q_heads, reinterpret_cast<out_type*>(out.data),
              out.stride(0), out.stride(1));
          detail::check_launch(function, "merge_decode_splits");
        }
      });
    });
  }

 private:
  template <class Carver, class View>
  static std::pair<float*, float*> carve(Carver& carver, const View& cache, int splits) {
    if (splits == 1) return {nullptr, nullptr};
    const std::int64_t rows = cache.batch * cache.shape.q_heads * splits;
    float* partial_out = carver.template take<float>(rows * cache.shape.head_dim);
    float* partial_lse = carver.template take<float>(rows);
    return {partial_out, partial_lse};
  }
};

}  // namespace kvtrim
