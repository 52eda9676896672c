// python/src/registry_cuda.cuh — THE list of schemes the Python package compiles for backend::cuda
// (built only when CMake found CUDA: KVTRIM_HAS_CUDA).
//
// Everything kvtrim runs on CUDA with a plain codec (issue 10), as a kvpress
// user would combine it:
//   scorers  static_window, snapkv, h2o, key_norm   (StreamingLLM, SnapKV, H2O/ObservedAttention, KeyNorm)
//   budgets  contiguous: uniform, pyramid;  flat and paged: uniform, adaptive, pyramid
//   codecs   fp16, bf16 (codec::plain)
// plus score::external (ExternalScores: the caller's scores) with uniform (and
// adaptive on flat/paged), RazorAttention (retrieval_head + by_scorer) on flat
// and paged, and StreamingLLM/uniform/contiguous in fp32.
// contiguous 4·2·2 + 2 + 1 = 19; flat and paged 4·3·2 + 2·2 + 2 = 30 each: 79 schemes.
// The quantizing codecs issue 12 runs on the device (int8 and int4 KIVI, fp8,
// layered<int4>) with the presses the fidelity study and most users combine them
// with — StreamingLLM, SnapKV, Ada-SnapKV, RazorAttention — on flat and paged:
// 4 · 4 · 2 = 32 more (registry_cuda_codecs.cu), and low_rank with profile bases (Cache.set_basis)
// with the same four presses on flat: 4 more, 115 in all.
// Inputs are the codec's element type (torch.float16 for FP16(), ...), read in
// place from the caller's tensors on the caller's stream.
// The list is compiled by nvcc in one translation unit per layout
// (registry_cuda_<layout>.cu, as the CPU list: registry_cpu.hpp); the contiguous
// one also holds the list's entry point and the read-back copy (a fourth TU
// would parse kvtrim.hpp once more for two functions: ~1 min of nvcc on CI's cores).
#pragma once

#include "binding.hpp"

#include <kvtrim/cuda.cuh>

namespace kvtrim::python {

template <> struct policy_name<backend::cuda> { static constexpr std::string_view value = "cuda"; };

/// Cache.truncate on the device: backend/cuda/rollback.cuh rolls back every codec the device writes
/// (plain, fp8, int8, int4, layered and low_rank).
template <class Codec>
struct rolls_back<Codec, device_space> : std::true_type {};

namespace cuda_list {

template <class... T>
struct list {};

/// Plain codecs for every scorer and budget; the quantizing ones (quantizing_codecs) for a few.
using codecs = list<codec::fp16, codec::bf16>;
using quantizing_codecs = list<codec::int8, codec::int4, codec::fp8, codec::layered<codec::int4>>;
/// The scorers a kvpress user picks with any budget (StreamingLLM, SnapKV, H2O / ObservedAttention, KnormPress).
using scorers = list<score::static_window, score::snapkv, score::h2o, score::key_norm>;

/// Inputs are the codec's own element type (torch.float16 for FP16(), ...), read in place.
template <class Codec>
using input_of = typename detail::stored_element<Codec>::type;

template <class Layout, class Scorer, class Budget, class... Codec>
void add_codecs(registry& into, list<Codec...>) {
  (add<scheme<Layout, Scorer, Budget, Codec, backend::cuda>, input_of<Codec>>(into, "cuda"), ...);
}
template <class Layout, class Budget, class... Scorer>
void add_scorers(registry& into, list<Scorer...>) {
  (add_codecs<Layout, Scorer, Budget>(into, codecs{}), ...);
}

/// Every scorer of `scorers` with each budget of `Budget...`, fp16 and bf16, on `Layout`.
template <class Layout, class... Budget>
void add_budgets(registry& into) {
  (add_scorers<Layout, Budget>(into, scorers{}), ...);
}

/// Scores the caller computed (score::external) with each budget of `Budget...`.
template <class Layout, class... Budget>
void add_external(registry& into) {
  (add_codecs<Layout, score::external, Budget>(into, codecs{}), ...);
}

/// RazorAttention: score::retrieval_head + budget::by_scorer (ragged layouts).
template <class Layout, class Codecs = codecs>
void add_razor(registry& into) {
  add_codecs<Layout, score::retrieval_head, budget::by_scorer>(into, Codecs{});
}

void add_contiguous(registry& into);  // registry_cuda_contiguous.cu
void add_flat(registry& into);        // registry_cuda_flat.cu
void add_paged(registry& into);       // registry_cuda_paged.cu
void add_quantizing(registry& into);  // registry_cuda_codecs.cu (with low_rank)

}  // namespace cuda_list
}  // namespace kvtrim::python
