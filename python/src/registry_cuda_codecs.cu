// python/src/registry_cuda_codecs.cu — the CUDA schemes with quantizing codecs (registry_cuda.cuh):
// StreamingLLM, SnapKV, Ada-SnapKV and RazorAttention × int8, int4 (KIVI), fp8 (e4m3) and
// layered<int4> (fp16 sinks and recent rows over int4) on flat and paged: 4 · 4 · 2 = 32.
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
}

}  // namespace kvtrim::python::cuda_list
