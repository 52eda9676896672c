// python/src/registry_cpu.hpp — the machinery of THE CPU scheme list (registry_cpu.cpp
// says what is in it). The list is compiled in one translation unit per layout
// (registry_cpu_<layout>.cpp): 44 schemes each instead of 132 in one file, so
// a parallel build compiles them at once (CI has 2 cores, the GPU machine 16);
// the codecs beyond fp16/bf16/fp32/int8 in one more (registry_cpu_codecs.cpp).
#pragma once

#include "binding.hpp"

namespace kvtrim::python::cpu_list {

template <class... T>
struct list {};

using scorers = list<score::static_window, score::snapkv, score::h2o, score::key_norm>;
using budgets = list<budget::uniform, budget::adaptive, budget::pyramid>;
using codecs = list<codec::fp16, codec::bf16, codec::fp32, codec::int8>;
/// The other codecs (registry_cpu_codecs.cpp): every scorer and budget on flat, a few on paged.
using more_codecs = list<codec::int4, codec::fp8, codec::low_rank, codec::layered<codec::int8>, codec::layered<codec::int4>>;
/// The quantizing codecs CUDA runs (issue 12): their CPU twins on paged (flat has every combination).
using device_codecs = list<codec::int4, codec::fp8, codec::layered<codec::int4>>;

template <class Layout, class Scorer, class Budget, class Codec>
void add_if_valid(registry& into) {
  // kvtrim::scheme's own rule (a static_assert there): one length per head
  // needs a budget that keeps one length per head.
  if constexpr (Layout::ragged_heads || !Budget::ragged_heads)
    add<scheme<Layout, Scorer, Budget, Codec, backend::cpu>, float>(into, "cpu");
}

template <class Layout, class Scorer, class Budget, class... Codec>
void add_codecs(registry& into, list<Codec...>) {
  (add_if_valid<Layout, Scorer, Budget, Codec>(into), ...);
}
template <class Layout, class Scorer, class Codecs, class... Budget>
void add_budgets(registry& into, list<Budget...>) {
  (add_codecs<Layout, Scorer, Budget>(into, Codecs{}), ...);
}
template <class Layout, class Codecs, class... Scorer>
void add_scorers(registry& into, list<Scorer...>) {
  (add_budgets<Layout, Scorer, Codecs>(into, budgets{}), ...);
}

/// Every scorer × budget × codec of `Codecs` the scheme accepts on `Layout`.
template <class Layout, class Codecs = codecs>
void add_layout(registry& into) {
  add_scorers<Layout, Codecs>(into, scorers{});
}

/// The caller's scores (score::external, ExternalScores) with each budget of `Budget...`, every codec.
template <class Layout, class... Budget>
void add_external(registry& into) {
  (add_codecs<Layout, score::external, Budget>(into, codecs{}), ...);
}

/// RazorAttention on `Layout` (flat or paged), every codec.
template <class Layout, class... Codec>
void add_razor(registry& into, list<Codec...>) {
  (add<scheme<Layout, score::retrieval_head, budget::by_scorer, Codec, backend::cpu>, float>(into, "cpu"), ...);
}

void add_contiguous(registry& into);  // registry_cpu_contiguous.cpp
void add_flat(registry& into);        // registry_cpu_flat.cpp
void add_paged(registry& into);       // registry_cpu_paged.cpp
void add_more_codecs(registry& into); // registry_cpu_codecs.cpp

}  // namespace kvtrim::python::cpu_list
