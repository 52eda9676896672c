// kvtrim/backend/cuda/select_top_k.cuh — the selection stage on the GPU, with CUB.
//
// Same contract as the CPU reference (backend/cpu/select_top_k.hpp): per head,
// the keep_count tokens of highest score, ties to the lower index, NaN below
// every number, listed in ascending token order. Steps, all device-wide CUB:
//   1. scores → order-preserving 32-bit keys (NaN → 0, below −∞'s key);
//   2. DeviceSegmentedSort::StableSortPairsDescending per head (stable over
//      ascending indices, so equal scores keep the lower index first);
//   3. flag the first keep_count tokens of each head;
//   4. DeviceSelect::Flagged over all heads' token indices: the kept tokens
//      come out grouped by head and ascending within it, with no second sort;
//   5. offsets = exclusive scan of keep counts (DeviceScan).
// Compression is not the decode hot path; a radix-select for very long
// contexts can replace step 2 later without changing the contract.
#pragma once

#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>
#include <cub/device/device_select.cuh>

#include <algorithm>
#include <cstdint>

#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim {

namespace cuda_detail {

__device__ __forceinline__ std::uint32_t rank_key(float score) {
  if (isnan(score)) return 0u;
  const std::uint32_t bits = __float_as_uint(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The kernels are templates (over the CSR's index types: Token and Count int32,
// Offset int64 here) so that any number of translation units may include this
// header: a template's instantiations merge at link time, while a plain
// __global__ function's host stub is an ordinary external function that two .cu
// files would both define (issue 9; tests/link/).
template <class Token, class Offset>
__global__ void prepare_selection(const float* scores, std::uint32_t* rank_keys, Token* token_indices,
                                  std::uint8_t* kept_flags, Offset* segment_offsets, std::int64_t heads,
                                  std::int64_t tokens) {
  const std::int64_t total = heads * tokens;
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat <= total;
       flat += std::int64_t{gridDim.x} * blockDim.x) {
    if (flat < total) {
      rank_keys[flat] = rank_key(scores[flat]);
      token_indices[flat] = static_cast<Token>(flat % tokens);
      kept_flags[flat] = 0;
    }
    if (flat % tokens == 0) segment_offsets[flat / tokens] = static_cast<Offset>(flat);
  }
}

template <class Token, class Count>
__global__ void flag_top_tokens(const Token* sorted_tokens, const Count* keep_counts,
                                std::uint8_t* kept_flags, std::int64_t heads, std::int64_t tokens) {
  const std::int64_t total = heads * tokens;
  for (std::int64_t flat = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; flat < total;
       flat += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t head = flat / tokens;
    const std::int64_t rank = flat % tokens;
    if (rank < keep_counts[head]) kept_flags[head * tokens + sorted_tokens[flat]] = 1;
  }
}

template <class Count, class Offset>
__global__ void clamp_counts(const Count* keep_counts, Offset* offsets_plus_one, std::int64_t heads,
                             std::int64_t tokens) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < heads;
       head += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t count = keep_counts[head];
    offsets_plus_one[head] = static_cast<Offset>(count < 0 ? 0 : (count > tokens ? tokens : count));
  }
}

inline unsigned grid_for(std::int64_t items) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(ceil_div(items, 256), 1, 65535));
}

}  // namespace cuda_detail

template <>
struct implementation<stage::select_top_k, backend::cuda> {
  static constexpr std::string_view function = "kvtrim::stage::select_top_k";

  struct parts {
    std::uint32_t* rank_keys = nullptr;
    std::uint32_t* sorted_keys = nullptr;
    std::int32_t* token_indices = nullptr;
    std::int32_t* sorted_tokens = nullptr;
    std::uint8_t* kept_flags = nullptr;
    std::int64_t* segment_offsets = nullptr;
    std::int64_t* selected_count = nullptr;
    void* cub_scratch = nullptr;
    std::size_t cub_bytes = 0;
  };

  static std::size_t cub_scratch_bytes(std::int64_t heads, std::int64_t tokens) {
    const std::int64_t items = heads * tokens;
    std::size_t sort_bytes = 0, select_bytes = 0, scan_bytes = 0;
    detail::check_cuda(cub::DeviceSegmentedSort::StableSortPairsDescending(
                           nullptr, sort_bytes, static_cast<const std::uint32_t*>(nullptr),
                           static_cast<std::uint32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
                           static_cast<std::int32_t*>(nullptr), items, heads,
                           static_cast<const std::int64_t*>(nullptr), static_cast<const std::int64_t*>(nullptr)),
                       function, "cub::DeviceSegmentedSort::StableSortPairsDescending (sizing)");
    detail::check_cuda(cub::DeviceSelect::Flagged(nullptr, select_bytes, static_cast<const std::int32_t*>(nullptr),
                                                  static_cast<const std::uint8_t*>(nullptr),
                                                  static_cast<std::int32_t*>(nullptr),
                                                  static_cast<std::int64_t*>(nullptr), items),
                       function, "cub::DeviceSelect::Flagged (sizing)");
    detail::check_cuda(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<std::int64_t*>(nullptr), heads),
                       function, "cub::DeviceScan::InclusiveSum (sizing)");
    return std::max({sort_bytes, select_bytes, scan_bytes});
  }

  template <class Carver>
  static parts carve(Carver& carver, std::int64_t heads, std::int64_t tokens) {
    const std::int64_t items = heads * tokens;
    parts p;
    p.rank_keys = carver.template take<std::uint32_t>(items);
    p.sorted_keys = carver.template take<std::uint32_t>(items);
    p.token_indices = carver.template take<std::int32_t>(items);
    p.sorted_tokens = carver.template take<std::int32_t>(items);
    p.kept_flags = carver.template take<std::uint8_t>(items);
    p.segment_offsets = carver.template take<std::int64_t>(heads + 1);
    p.selected_count = carver.template take<std::int64_t>(1);
    p.cub_bytes = cub_scratch_bytes(heads, tokens);
    p.cub_scratch = carver.template take<std::byte>(static_cast<std::int64_t>(p.cub_bytes));
    return p;
  }

  static std::size_t workspace_bytes(std::int64_t heads, std::int64_t tokens) {
    workspace_carver carver;
    carve(carver, heads, tokens);
    return carver.bytes();
  }

  static void select(const tensor_view<const float, 3, device_space>& scores, const std::int32_t* keep_counts,
                     std::int64_t* offsets, std::int32_t* kept_tokens, workspace scratch, cudaStream_t stream) {
    const std::int64_t tokens = scores.extent(2);
    const std::int64_t heads = scores.extent(0) * scores.extent(1);
    const std::int64_t items = heads * tokens;
    workspace_carver carver(scratch);
    parts p = carve(carver, heads, tokens);

    cuda_detail::prepare_selection<std::int32_t, std::int64_t><<<cuda_detail::grid_for(items + 1), 256, 0, stream>>>(
        scores.data, p.rank_keys, p.token_indices, p.kept_flags, p.segment_offsets, heads, tokens);
    detail::check_launch(function, "prepare_selection");
    detail::check_cuda(cub::DeviceSegmentedSort::StableSortPairsDescending(
                           p.cub_scratch, p.cub_bytes, p.rank_keys, p.sorted_keys, p.token_indices, p.sorted_tokens,
                           items, heads, p.segment_offsets, p.segment_offsets + 1, stream),
                       function, "cub::DeviceSegmentedSort::StableSortPairsDescending");
    cuda_detail::flag_top_tokens<std::int32_t, std::int32_t><<<cuda_detail::grid_for(items), 256, 0, stream>>>(
        p.sorted_tokens, keep_counts, p.kept_flags, heads, tokens);
    detail::check_launch(function, "flag_top_tokens");
    detail::check_cuda(cub::DeviceSelect::Flagged(p.cub_scratch, p.cub_bytes, p.token_indices, p.kept_flags,
                                                  kept_tokens, p.selected_count, items, stream),
                       function, "cub::DeviceSelect::Flagged");
    detail::check_cuda(cudaMemsetAsync(offsets, 0, sizeof(std::int64_t), stream), function, "cudaMemsetAsync");
    cuda_detail::clamp_counts<std::int32_t, std::int64_t><<<cuda_detail::grid_for(heads), 256, 0, stream>>>(
        keep_counts, offsets + 1, heads, tokens);
    detail::check_launch(function, "clamp_counts");
    detail::check_cuda(cub::DeviceScan::InclusiveSum(p.cub_scratch, p.cub_bytes, offsets + 1, heads, stream),
                       function, "cub::DeviceScan::InclusiveSum");
  }
};

}  // namespace kvtrim
