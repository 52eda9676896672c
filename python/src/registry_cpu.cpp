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
// plus RazorAttention: score::retrieval_head + budget::by_scorer on flat, every codec.
// 4 scorers × (2 + 3 + 3) layout-budget pairs × 4 codecs + 4 = 132 schemes.
// Adding a policy here is one word; `kvtrim.schemes()` lists what was compiled.
#include "binding.hpp"

namespace kvtrim::python {
namespace {

template <class... T>
struct list {};

using scorers = list<score::static_window, score::snapkv, score::h2o, score::key_norm>;
using budgets = list<budget::uniform, budget::adaptive, budget::pyramid>;
using layouts = list<layout::contiguous, layout::flat, layout::paged>;
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
template <class... Layout>
void add_layouts(registry& into, list<Layout...>) {
  (add_scorers<Layout>(into, scorers{}), ...);
}

template <class... Codec>
void add_razor(registry& into, list<Codec...>) {
  (add<scheme<layout::flat, score::retrieval_head, budget::by_scorer, Codec, backend::cpu>, float>(into, "cpu"), ...);
}

}  // namespace

void register_cpu_schemes(registry& into) {
  add_layouts(into, layouts{});
  add_razor(into, codecs{});
}

}  // namespace kvtrim::python
