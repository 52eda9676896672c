// python/src/registry_cpu.hpp — the machinery of THE CPU scheme list (registry_cpu.cpp
// says what is in it). The list is compiled in one translation unit per layout
// (registry_cpu_<layout>.cpp): 44 schemes each instead of 132 in one file, so
// a parallel build compiles them at once (CI has 2 cores, the GPU machine 16).
#pragma once

#include "binding.hpp"

namespace kvtrim::python::cpu_list {

template <class... T>
struct list {};

using scorers = list<score::static_window, score::snapkv, score::h2o, score::key_norm>;
using budgets = list<budget::uniform, budget::adaptive, budget::pyramid>;
using codecs = list<codec::fp16, codec::bf16, codec::fp32, codec::int8>;

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
template <class Layout, class Scorer, class... Budget>
void add_budgets(registry& into, list<Budget...>) {
  (add_codecs<Layout, Scorer, Budget>(into, codecs{}), ...);
}
template <class Layout, class... Scorer>
void add_scorers(registry& into, list<Scorer...>) {
  (add_budgets<Layout, Scorer>(into, budgets{}), ...);
}

/// Every scorer × budget × codec the scheme accepts on `Layout`.
template <class Layout>
void add_layout(registry& into) {
  add_scorers<Layout>(into, scorers{});
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

}  // namespace kvtrim::python::cpu_list
