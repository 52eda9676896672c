// python/src/registry_cpu_codecs.cpp — the CPU schemes with the codecs beyond fp16/bf16/fp32/int8
// (registry_cpu.cpp): int4 (KIVI 4-bit), fp8 (e4m3), low-rank (post- or pre-RoPE keys, fixed or
// energy-chosen rank: settings, not types) and layered<int8>, layered<int4> (fp16 sinks and recent rows).
//   flat:  every scorer × budget × these 5 codecs (4 · 3 · 5 = 60), RazorAttention × 5
//   paged: the CUDA codec list's twins (registry_cuda.cuh: StreamingLLM, SnapKV, Ada-SnapKV,
//          RazorAttention × int4, fp8, layered<int4>; int8 is everywhere already): 4 · 3 = 12
// 77 schemes. Contiguous has none of them (its budgets are flat's uniform and pyramid).
#include "registry_cpu.hpp"

namespace kvtrim::python::cpu_list {

void add_more_codecs(registry& into) {
  add_layout<layout::flat, more_codecs>(into);
  add_razor<layout::flat>(into, more_codecs{});
  add_codecs<layout::paged, score::static_window, budget::uniform>(into, device_codecs{});
  add_codecs<layout::paged, score::snapkv, budget::uniform>(into, device_codecs{});
  add_codecs<layout::paged, score::snapkv, budget::adaptive>(into, device_codecs{});
  add_razor<layout::paged>(into, device_codecs{});
}

}  // namespace kvtrim::python::cpu_list
