// python/src/registry_cuda.cu — THE list of schemes the Python package compiles for backend::cuda
// (built only when CMake found CUDA: KVTRIM_HAS_CUDA).
//
// What kvtrim runs on CUDA today: StreamingLLM (score::static_window) with a
// uniform budget in a contiguous cache, stored as fp16, bf16 or fp32
// (codec::plain). Inputs are the codec's own element type (torch.float16 for
// fp16, ...), read in place from the caller's tensors on the caller's stream.
// 3 schemes.
#include "binding.hpp"

#include <kvtrim/cuda.cuh>

namespace kvtrim::python {

template <> struct policy_name<backend::cuda> { static constexpr std::string_view value = "cuda"; };

void copy_to_host(void* host, const void* device, std::size_t bytes) {
  detail::check_cuda(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "kvtrim.Cache", "cudaMemcpy");
}

namespace {
template <class Element>
void add_streaming(registry& into) {
  add<scheme<layout::contiguous, score::static_window, budget::uniform, codec::plain<Element>, backend::cuda>, Element>(
      into, "cuda");
}
}  // namespace

void register_cuda_schemes(registry& into) {
  add_streaming<half>(into);
  add_streaming<bfloat16>(into);
  add_streaming<float>(into);
}

}  // namespace kvtrim::python
