// Randomized property test over layout × scorer × budget × codec (issue 9, Tests).
//
// Every case draws a shape (GQA group 1/2/4, kv heads 1–3, head_dim 16/32/64,
// batch 1–3), a prefill of 1–200 tokens (≥ 2 for SnapKV, whose window must
// leave something to score), a start position (0, small, or the largest the
// 32-bit positions allow), a scorer and budget config (ragged keeps that are
// not multiples of KIVI's 32-token groups nor of the 8/16/32-token pages), and
// 0–3 appends of 1–5 tokens (append_head on one head for paged/flat), then runs
// compress → append… → attend through the PUBLIC scheme API and checks, after
// every call:
//  - layout::validate passes on the cache;
//  - the kept-index output (compress_options) equals the brute-force budget
//    rule (policy_oracle.hpp: top-k per head, Ada-KV's floors + shared pool,
//    RazorAttention's definition) applied to the scorer's scores, and is a
//    top set under the double-precision oracle scores up to `score_tolerance`;
//  - budgets are exact: per-head counts for uniform / pyramid / per_head /
//    by_scorer, per-sequence totals H·k for adaptive; head_length agrees;
//  - protected tokens are never dropped (sinks, static windows, SnapKV's
//    observation window, H2O's recent window — whenever the head keeps at least
//    as many tokens as it protects), retrieval heads keep every token;
//  - positions: head_positions == start + kept index (a RazorAttention
//    compensation token: start + the last dropped token), then one more per
//    appended token; next_position == start + T + appended;
//  - decode attention over the cache equals the double oracle over the EXACT
//    kept tokens (and the compensation token, with its ln N_d bias) within
//        bound = 2·B_fp32 + max_i ε_v(i) + (e^{2·max_i δ_i} − 1)·V + (e^{8u·max bias} − 1)·V
//    where B_fp32 is tests/common/tolerance.hpp's fp32 bound over exact rows
//    (doubled: the codec's rows differ from the exact ones by ≤ ε, which moves
//    S and V by far less than 2×), V = max |v| over the head's rows,
//    δ_i = Σ_d |q_d|·ε_k(i, d)/√D the logit error the codec's key error can
//    cause (softmax weights move by ≤ e^{±2δ}), and ε the codec's documented
//    per-element error (its header's contract):
//      fp32 0;  fp16 2^-11·|x| + 2^-25;  bf16 2^-8·|x|;
//      int8 / layered<int8> (symmetric, KIVI key groups, per-token values)
//        s/2 with s = max|x|/127 over the run sharing the scale: ≤ A/254, A the
//        channel's max over the head's rows (keys) or the row's max (values);
//      int4 ≤ A/14 (s = A/7);
//      fp8 e4m3 (head amax scale s = M/448, M the max over the rows the head
//        held at compaction): max(2^-4·|x|, 2^-10·s) for |x| ≤ M, and
//        |x| − M + 2^-4·M for later larger tokens, which saturate;
//      low_rank (fixed rank 4 over keys/values of exact rank 4, every head
//        keeping ≥ 4 tokens so the fitted basis spans them): fp16 coefficients,
//        ‖k − k̂‖₂ ≤ (2^-11 + 1e-5)·‖k‖₂, so δ_i ≤ ‖q‖₂·that/√D.
//    Each ε also carries 1e-6 relative for the fp32 scale arithmetic.
//
// Instantiations (CI compiles this file under ASan too, so they are few):
// 14 scorer × budget pairs over fp32 spread over the three layouts, the 8
// codecs for paged × SnapKV × Ada-KV, RazorAttention on flat with 4 codecs, and a
// diagonal of 5 mixed ones — 31 schemes. Fixed seeds: a failure names its seed.
// The case itself (models, checks, run_case) is tests/common/property_case.hpp,
// shared with codec_scorer_product_test.cpp.
#include <gtest/gtest.h>

#include "common/property_case.hpp"

using namespace kvtrim::testing::property;

namespace {

template <class L, class S, class B, class C>
using scheme = kt::scheme<L, S, B, C, kt::backend::cpu>;
using contiguous = kt::layout::contiguous;
using paged = kt::layout::paged;
using flat = kt::layout::flat;
using static_window = kt::score::static_window;
using snapkv = kt::score::snapkv;
using h2o = kt::score::h2o;
using key_norm = kt::score::key_norm;
using razor = kt::score::retrieval_head;
using uniform = kt::budget::uniform;
using pyramid = kt::budget::pyramid;
using adaptive = kt::budget::adaptive;
using per_head = kt::budget::per_head;
using by_scorer = kt::budget::by_scorer;
using fp32 = kt::codec::fp32;

// Every scorer meets every budget it accepts at least once; each layout gets several.
TEST(Property, ScorerBudgetPairsOverFp32) {
  run_cases<scheme<contiguous, static_window, uniform, fp32>, scheme<paged, static_window, per_head, fp32>,
            scheme<flat, static_window, adaptive, fp32>, scheme<contiguous, snapkv, pyramid, fp32>,
            scheme<paged, snapkv, uniform, fp32>, scheme<flat, snapkv, per_head, fp32>,
            scheme<paged, h2o, adaptive, fp32>, scheme<flat, h2o, pyramid, fp32>, scheme<contiguous, h2o, uniform, fp32>,
            scheme<flat, key_norm, uniform, fp32>, scheme<paged, key_norm, pyramid, fp32>,
            scheme<flat, key_norm, per_head, fp32>, scheme<paged, razor, by_scorer, fp32>,
            scheme<flat, razor, by_scorer, fp32>>(1000, 12);
}

// Every codec under a ragged budget on pages of 8, 16 and 32 (KIVI groups of 32 split over pages).
TEST(Property, EveryCodecPagedSnapkvAdaptive) {
  run_cases<scheme<paged, snapkv, adaptive, fp32>, scheme<paged, snapkv, adaptive, kt::codec::fp16>,
            scheme<paged, snapkv, adaptive, kt::codec::bf16>, scheme<paged, snapkv, adaptive, kt::codec::int8>,
            scheme<paged, snapkv, adaptive, kt::codec::int4>, scheme<paged, snapkv, adaptive, kt::codec::fp8>,
            scheme<paged, snapkv, adaptive, kt::codec::low_rank>,
            scheme<paged, snapkv, adaptive, kt::codec::layered<kt::codec::int8>>>(2000, 12);
}

// RazorAttention's compensation token through the codecs' ordered encode, on flat regions.
TEST(Property, RazorAttentionFlatCodecs) {
  run_cases<scheme<flat, razor, by_scorer, kt::codec::bf16>, scheme<flat, razor, by_scorer, kt::codec::int8>,
            scheme<flat, razor, by_scorer, kt::codec::int4>,
            scheme<flat, razor, by_scorer, kt::codec::layered<kt::codec::int8>>>(3000, 10);
}

// A diagonal: every layout, scorer, budget and codec once more in other company.
TEST(Property, Diagonal) {
  run_cases<scheme<contiguous, key_norm, uniform, kt::codec::low_rank>, scheme<contiguous, static_window, pyramid, kt::codec::int8>,
            scheme<paged, h2o, per_head, kt::codec::fp16>, scheme<flat, snapkv, adaptive, kt::codec::fp8>,
            scheme<contiguous, snapkv, uniform, kt::codec::int4>>(4000, 10);
}

}  // namespace
