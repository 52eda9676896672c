// Shared by the two TUs of kvtrim_link_cuda: kvtrim/cuda.cuh and the
// communicators (kvtrim/comm/: simulated_device's sum kernel is a template, and
// nccl.cuh where NCCL is found), and one helper
// template both TUs instantiate with the same arguments, so the same kernel
// template instantiations (copy_rows<__half, __half, …>) are emitted in both
// and must merge, while every non-template kernel of the headers is emitted in
// both and must not collide.
#pragma once

#include <kvtrim/comm/simulated_device.cuh>
#include <kvtrim/comm/single_process.hpp>
#include <kvtrim/cuda.cuh>
#if defined(KVTRIM_HAS_NCCL)
#include <kvtrim/comm/nccl.cuh>
#endif

#include <array>
#include <cstdint>

namespace link_test {

namespace kt = kvtrim;

template <class Codec>
using streaming = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, Codec,
                             kt::backend::cuda>;
inline const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 64};
inline constexpr std::int64_t batch = 1, tokens = 32, keep = 12, appended = 2;

/// Zeroed device memory, freed at scope exit.
struct device_bytes {
  void* data = nullptr;
  explicit device_bytes(std::size_t bytes) {
    kt::detail::check_cuda(cudaMalloc(&data, bytes > 0 ? bytes : 1), "link test", "cudaMalloc");
    kt::detail::check_cuda(cudaMemset(data, 0, bytes > 0 ? bytes : 1), "link test", "cudaMemset");
  }
  device_bytes(const device_bytes&) = delete;
  device_bytes& operator=(const device_bytes&) = delete;
  ~device_bytes() { cudaFree(data); }
};

/// Compresses `tokens` zero rows of KeyT with scheme streaming<Codec>, appends
/// `appended` more, and returns the tokens per head the cache then holds.
template <class Codec, class KeyT>
std::int64_t compress_and_append() {
  using scheme = streaming<Codec>;
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{keep};
  auto cache = scheme::make_cache(shape, batch, keep + appended, typename Codec::config{});
  const std::array<std::int64_t, 4> extents{batch, shape.kv_heads, tokens, shape.head_dim};
  const std::array<std::int64_t, 4> new_extents{batch, shape.kv_heads, appended, shape.head_dim};
  const std::size_t rows = static_cast<std::size_t>(batch * shape.kv_heads * tokens * shape.head_dim);
  device_bytes keys(rows * sizeof(KeyT)), values(rows * sizeof(KeyT));
  device_bytes scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(kt::make_view<kt::device_space>(static_cast<KeyT*>(keys.data), extents),
                   kt::make_view<kt::device_space>(static_cast<KeyT*>(values.data), extents), cache.view(), cfg,
                   kt::workspace{scratch.data, scheme::compress_workspace(shape, batch, tokens, cfg)});
  scheme::append(cache.view(), kt::make_view<kt::device_space>(static_cast<KeyT*>(keys.data), new_extents),
                 kt::make_view<kt::device_space>(static_cast<KeyT*>(values.data), new_extents));
  kt::detail::check_cuda(cudaDeviceSynchronize(), "link test", "cudaDeviceSynchronize");
  return *cache.view().length;
}

/// codec::low_rank with sequence bases (the codec's default: fitted on the device by cuSOLVER at compaction,
/// refreshed by a kernel at append): compress_and_append's scheme over rows that all equal 1.0586 (bytes
/// 0x3c, so every fit has rank 1). What the caller needs to check that the fit ran and that the cuSOLVER
/// solver is one object per thread in the whole program: low_rank_solver::current is an inline function
/// whose thread_local map is a static of that function — one per program, whichever TU calls it (a copy
/// per TU would create a second handle and buffer, and the cross-stream event ordering would break).
struct low_rank_fit_seen {
  std::int64_t length = 0;               // tokens per head after compress + append
  std::int32_t key_rank = -1;            // head 0's fitted key rank (1)
  const void* solver = nullptr;          // &low_rank_solver::current(): the calling thread's solver
  const void* handle = nullptr;          // its cusolverDnHandle_t
};

// Internal linkage (an unnamed namespace): each TU calls its own copy of this helper, so the linker cannot
// fold the two TUs' calls into one function and make the solver's address agree whatever low_rank_solver
// does; the two copies agree only if low_rank_solver::current is one function with one static per program.
namespace {
low_rank_fit_seen low_rank_sequence_fit() {
  using scheme = streaming<kt::codec::low_rank>;
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{keep};
  auto cache = scheme::make_cache(shape, batch, keep + appended, kt::codec::low_rank::config{});
  const std::array<std::int64_t, 4> extents{batch, shape.kv_heads, tokens, shape.head_dim};
  const std::array<std::int64_t, 4> new_extents{batch, shape.kv_heads, appended, shape.head_dim};
  const std::size_t rows = static_cast<std::size_t>(batch * shape.kv_heads * tokens * shape.head_dim);
  device_bytes keys(rows * sizeof(kt::half)), values(rows * sizeof(kt::half));
  kt::detail::check_cuda(cudaMemset(keys.data, 0x3c, rows * sizeof(kt::half)), "link test", "cudaMemset");
  kt::detail::check_cuda(cudaMemset(values.data, 0x3c, rows * sizeof(kt::half)), "link test", "cudaMemset");
  device_bytes scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(kt::make_view<kt::device_space>(static_cast<kt::half*>(keys.data), extents),
                   kt::make_view<kt::device_space>(static_cast<kt::half*>(values.data), extents), cache.view(), cfg,
                   kt::workspace{scratch.data, scheme::compress_workspace(shape, batch, tokens, cfg)});
  scheme::append(cache.view(), kt::make_view<kt::device_space>(static_cast<kt::half*>(keys.data), new_extents),
                 kt::make_view<kt::device_space>(static_cast<kt::half*>(values.data), new_extents));
  kt::detail::check_cuda(cudaDeviceSynchronize(), "link test", "cudaDeviceSynchronize");
  low_rank_fit_seen seen;
  seen.length = *cache.view().length;
  kt::detail::check_cuda(cudaMemcpy(&seen.key_rank, cache.view().storage.key_ranks, sizeof seen.key_rank,
                                    cudaMemcpyDeviceToHost),
                         "link test", "cudaMemcpy(key_ranks)");
  kt::cuda_detail::low_rank_solver& solver = kt::cuda_detail::low_rank_solver::current("link test");
  seen.solver = &solver;
  seen.handle = static_cast<const void*>(solver.handle());
  return seen;
}
}  // namespace

std::int64_t fp16_in_a();   // link_cuda_a.cu
std::int64_t fp16_in_b();   // link_cuda_b.cu
std::int64_t bf16_in_b();   // link_cuda_b.cu: a second combination (fp32 rows stored as bf16)
low_rank_fit_seen low_rank_in_a();  // link_cuda_a.cu
low_rank_fit_seen low_rank_in_b();  // link_cuda_b.cu

}  // namespace link_test
