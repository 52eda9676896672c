// python/src/registry_cuda_contiguous.cu — the CUDA schemes on layout::contiguous (registry_cuda.cuh),
// and the list's entry point.
#include "registry_cuda.cuh"

namespace kvtrim::python::cuda_list {

void add_contiguous(registry& into) {
  using layout::contiguous;
  add_budgets<contiguous, budget::uniform, budget::pyramid>(into);  // one length per head: no Ada-KV
  add_external<contiguous, budget::uniform>(into);
  add<scheme<contiguous, score::static_window, budget::uniform, codec::fp32, backend::cuda>, float>(into, "cuda");
}

}  // namespace kvtrim::python::cuda_list

namespace kvtrim::python {

void register_cuda_schemes(registry& into) {
  cuda_list::add_contiguous(into);
  cuda_list::add_flat(into);
  cuda_list::add_paged(into);
  cuda_list::add_quantizing(into);
}

void copy_to_host(void* host, const void* device, std::size_t bytes, std::uintptr_t stream) {
  constexpr std::string_view function = "kvtrim.Cache (reading a device cache back)";
  if (bytes == 0) return;
  const auto on = reinterpret_cast<cudaStream_t>(stream);
  detail::check_cuda(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, on), function, "cudaMemcpyAsync");
  detail::check_cuda(cudaStreamSynchronize(on), function, "cudaStreamSynchronize");
}

void copy_to_device(void* device, const void* host, std::size_t bytes, std::uintptr_t stream) {
  if (bytes == 0) return;
  detail::check_cuda(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, reinterpret_cast<cudaStream_t>(stream)),
                     "kvtrim.Cache (copying host counts to the device)", "cudaMemcpyAsync");
}

void check_device_status(std::int64_t* status, std::uintptr_t stream) {
  /// kvtrim::check_status reads only the view's status words.
  struct status_words {
    std::int64_t* status;
  };
  kvtrim::check_status(status_words{status}, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace kvtrim::python
