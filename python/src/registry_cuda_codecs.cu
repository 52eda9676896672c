// python/src/registry_cuda_codecs.cu — the CUDA schemes with quantizing codecs (registry_cuda.cuh):
// StreamingLLM, SnapKV, Ada-SnapKV and RazorAttention × int8, int4 (KIVI), fp8 (e4m3) and
// layered<int4> (fp16 sinks and recent rows over int4) on flat and paged: 4 · 4 · 2 = 32; and
// low_rank (profile bases, Cache.set_basis) with the same four presses on flat: 4 (36 in this TU).
// Inputs: float32 for int8/int4/fp8 (they scale any finite value), float16 for layered
// (its fp16 rows), as the CPU scheme's (detail::stored_element).
// Its own TU: the codecs' encode and decode kernels are the costliest instantiations of the list.
#include "registry_cuda.cuh"

namespace kvtrim::python::cuda_list {

template <class Layout>
void add_codec_schemes(registry& into) {
  add_codecs<Layout, score::static_window, budget::uniform>(into, quantizing_codecs{});
  add_codecs<Layout, score::snapkv, budget::uniform>(into, quantizing_codecs{});
  add_codecs<Layout, score::snapkv, budget::adaptive>(into, quantizing_codecs{});
  add_razor<Layout, quantizing_codecs>(into);
}

void add_quantizing(registry& into) {
  add_codec_schemes<layout::flat>(into);
  add_codec_schemes<layout::paged>(into);
  // codec::low_rank with profile bases (Cache.set_basis), on flat as its CPU twins (registry_cpu_codecs.cpp).
  add_codecs<layout::flat, score::static_window, budget::uniform>(into, list<codec::low_rank>{});
  add_codecs<layout::flat, score::snapkv, budget::uniform>(into, list<codec::low_rank>{});
  add_codecs<layout::flat, score::snapkv, budget::adaptive>(into, list<codec::low_rank>{});
  add_razor<layout::flat, list<codec::low_rank>>(into);
}

}  // namespace kvtrim::python::cuda_list

namespace kvtrim::python {

void set_device_low_rank_basis(const codec::low_rank::storage<device_space>& store, std::int64_t head,
                               const float* key_basis, std::int64_t key_rank, const float* value_basis,
                               std::int64_t value_rank, std::uintptr_t stream) {
  cuda_detail::set_low_rank_basis(store, head, key_basis, key_rank, value_basis, value_rank,
                                  reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace kvtrim::python
