// python/src/registry_cpu.cpp — THE list of schemes the Python package compiles for backend::cpu.
//
// Every scheme below is instantiated once (compress, append, attend, stats,
// read-back) with float32 inputs; the Python side widens float16/bfloat16
// arrays to float32 first, which is exact, so results equal those of a C++
// caller passing the 16-bit arrays (every kvtrim read goes through to_float).
//
// The list, as a product (no macros): for each layout, budget, scorer and codec
// below, every combination kvtrim::scheme accepts:
//   scorers  static_window, snapkv, h2o, key_norm
//   budgets  uniform, adaptive, pyramid          (contiguous: uniform and pyramid,
//                                                 which give every head one length)
//   layouts  contiguous, flat, paged
//   codecs   fp16, bf16, fp32, int8 (KIVI key groups)
// plus score::external (ExternalScores: the caller's scores) with uniform on every
// layout and adaptive on flat and paged, every codec (5 × 4 = 20), and
// RazorAttention: score::retrieval_head + budget::by_scorer on flat and paged, every codec (8).
// 4 scorers × (2 + 3 + 3) layout-budget pairs × 4 codecs + 20 + 8 = 156 schemes,
// plus registry_cpu_codecs.cpp's 77 with int4, fp8, low-rank and layered codecs: 233.
// Adding a policy is one word in registry_cpu.hpp; `kvtrim.schemes()` lists what was compiled.
// One translation unit per layout (registry_cpu_<layout>.cpp) so they compile in parallel.
#include "registry_cpu.hpp"

namespace kvtrim::python {

void register_cpu_schemes(registry& into) {
  cpu_list::add_contiguous(into);
  cpu_list::add_flat(into);
  cpu_list::add_paged(into);
  cpu_list::add_razor<layout::flat>(into, cpu_list::codecs{});  // RazorAttention (8 schemes, compiled here)
  cpu_list::add_razor<layout::paged>(into, cpu_list::codecs{});
  cpu_list::add_more_codecs(into);
}

}  // namespace kvtrim::python
