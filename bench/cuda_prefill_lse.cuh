// bench/cuda_prefill_lse.cuh — the given-normaliser rows of the SnapKV benchmarks
// (bench/cuda_scorers.cu, bench/cuda_compress.cu): the window queries' softmax
// normalisers as an engine's prefill hands them over, made before the timed calls.
#pragma once

#include <kvtrim/cuda.cuh>

#include <algorithm>
#include <array>
#include <cstdint>

#include "cuda_common.cuh"

namespace kvtrim_bench {

/// The window queries' natural-log softmax normalisers [B, Hq, w] (what FlashAttention's
/// softmax_lse would hand over; scale 1/√D), made once by kvtrim's own pass 1 and
/// synchronised. Owns the device memory; `view()` is what `config::with_lse` takes.
class prefill_lse {
 public:
  prefill_lse(const kvtrim::kv_view<const kvtrim::half, kvtrim::device_space>& keys,
              const kvtrim::window_view<const kvtrim::half, kvtrim::device_space>& queries,
              const kvtrim::model_shape& shape)
      : extents_{queries.extent(0), shape.q_heads, queries.extent(2)} {
    check(cudaMalloc(&data_, sizeof(float) * extents_[0] * extents_[1] * extents_[2]), "cudaMalloc(lse)");
    const std::size_t bytes =
        kvtrim::cuda_detail::attention_row_lse_workspace_bytes(shape, extents_[0], keys.extent(2), extents_[2]);
    void* scratch = nullptr;
    check(cudaMalloc(&scratch, std::max<std::size_t>(bytes, 1)), "cudaMalloc(lse scratch)");
    const kvtrim::tensor_view<float, 3, kvtrim::device_space> out{data_, extents_, kvtrim::row_major_strides(extents_)};
    kvtrim::cuda_detail::attention_row_lse("bench prefill_lse", keys, queries, shape, 0, out, {scratch, bytes}, nullptr);
    check(cudaDeviceSynchronize(), "prefill_lse");
    cudaFree(scratch);
  }
  ~prefill_lse() { cudaFree(data_); }
  prefill_lse(const prefill_lse&) = delete;
  prefill_lse& operator=(const prefill_lse&) = delete;

  kvtrim::tensor_view<const float, 3, kvtrim::device_space> view() const {
    return {data_, extents_, kvtrim::row_major_strides(extents_)};
  }

 private:
  float* data_ = nullptr;
  std::array<std::int64_t, 3> extents_;
};

}  // namespace kvtrim_bench
