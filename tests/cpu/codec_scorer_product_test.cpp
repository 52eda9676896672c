// Every codec × every scorer (the project's rule: test every codec with every
// scorer), through the PUBLIC scheme API on backend::cpu, with the layouts and
// budgets rotated so that each appears many times across the product.
//
// The product, 48 schemes (scorer × codec is complete; layout / budget rotate,
// within what a scheme accepts: contiguous and shared_paged take uniform and
// pyramid budgets only, shared_paged only the plain codecs fp32/fp16/bf16,
// score::retrieval_head only budget::by_scorer on paged or flat):
//
//   codec \ scorer  snapkv         h2o            key_norm       static_window  external       retrieval_head
//   fp32            shared·unif    flat·per_head  paged·adapt    contig·pyr     shared·pyr     flat
//   fp16            paged·per_head shared·pyr     flat·unif      paged·adapt    contig·unif    paged
//   bf16            contig·pyr     paged·adapt    shared·unif    shared·pyr     paged·per_head paged
//   int8            flat·adapt     contig·unif    paged·pyr      flat·per_head  paged·adapt    paged
//   int4            paged·unif     flat·pyr       flat·per_head  paged·adapt    contig·unif    paged
//   fp8             flat·pyr       paged·per_head contig·unif    contig·pyr     flat·adapt     flat
//   low_rank        contig·unif    flat·adapt     paged·per_head flat·pyr       paged·unif     paged
//   layered<int8>   flat·per_head  contig·pyr     paged·adapt    paged·unif     flat·pyr       paged
//
// Layouts: paged 20, flat 14, contiguous 9, shared_paged 5 (an engine's own
// page tensor bound with bind_pages, NHD or HND, the tensor NaN before use);
// budgets: pyramid 12, uniform 11, adaptive 9, per_head 8, by_scorer 8.
//
// Each case is tests/common/property_case.hpp's run_case (property_test's): a
// random shape (GQA 1/2/4, kv heads 1–3, head_dim 16/32/64, batch 1–3), a prefill
// of 1–200 tokens, a start position up to the last 32-bit one, the scorer's and
// budget's configs drawn at random (static_window: 0–6 sinks, per-head windows
// half the time; H2O: recent tokens or ratio, protect on/off, observed
// normalisation, mean/max group; SnapKV: window, kernel, pooling, reductions;
// RazorAttention: retrieval heads, sinks, windows, compensation on/off), 0–3
// appends (append_head on paged / flat). It compresses with the kept-index
// output, then checks after every call that layout::validate passes (also after
// each attend, here), the kept sets equal the brute-force budget rule applied to
// the scorer's scores and are a top set under the double oracle's scores,
// budgets, protected tokens, positions, and decode attention against the double
// oracle over the exact kept rows, after compress and after the appends.
//
// What this file adds to property_test's draws (a second generator, so the
// case's own draws are property_test's):
//  - score::external: the caller's scores in a strided tensor with NaN padding;
//    continuous, or a few values with ties everywhere (−0 and +0 among them),
//    +∞ (protected) tokens, −∞ and NaN (ranked −∞) sprinkled in. Oracle: the
//    definition, s = given with NaN → −∞ (score/external.hpp).
//  - codec configs: int8 / int4 symmetric or asymmetric, KIVI key groups of 32,
//    16, 8 or 12 (12 divides no page size: slot runs of gcd(page, 12) = 4), or
//    per-token keys; layered<int8> with 0–4 sinks and 0–16 recent fp16 rows (or
//    the default 128) over such an int8; low_rank with basis refreshes every 0
//    (never), 1, 5 or 16 appended tokens.
//  - pyramid budgets in the kvpress form half the time (not under low rank);
//  - half the cases another head_dim, mostly no power of two: 2, 3, 7, 8, 12, 20,
//    24, 33, 40, 48, 72, 80, 96, 100 or 128 (≥ 8 under low rank);
//  - flat buffers half the time sized to exactly the whole runs each head's kept
//    and appended tokens need, so a head that append_head grows alone repacks;
//  - appended tokens scaled ×3 or ×8 half the time (fp8 saturates past the
//    compaction's amax; later KIVI groups and value rows get their own scales).
// Ada-KV's kvpress form may leave a head empty (⌊α·k⌋ = 0, documented); attend
// must then refuse the cache, and the appends give the head its tokens back.
//
// Tolerances: property_test.cpp's header derives them; in short, attention
// within
//     2·B_fp32 + max_i ε_v(i) + (e^{2·max_i δ_i} − 1)·V + (e^{8u·max bias} − 1)·V,
// B_fp32 tests/common/tolerance.hpp's fp32 bound over the exact rows, V = max|v|,
// δ_i = Σ_d |q_d|·ε_k(i, d)/√D, and ε the codec's per-element error:
//   fp32 0; fp16 2^-11·|x| + 2^-25; bf16 2^-8·|x|;
//   int8 / layered<int8>: half a step of the run sharing the scale, ≤ A/254 with A
//     the run's max |x| — symmetric s = A/127; asymmetric s = (max − min)/255 ≤
//     2A/255, so s/2 ≤ A/255. A run is a channel over a KIVI key group (bounded
//     by the channel's max over the head's rows, whatever the group size or
//     how pages split it), a token's row for per-token keys and for values;
//   int4: ≤ A/14 (symmetric s = A/7; asymmetric s/2 ≤ 2A/30);
//   fp8 e4m3 with a head amax scale: max(2^-4·|x|, 2^-10·s), s = M/448, M the
//     head's max at compaction; later larger tokens saturate (|x| − M + 2^-4·M);
//   low_rank: rank 4 over data of exact rank 4, every head keeping ≥ 4 rows
//     (RazorAttention's windows are raised to 4 here): ‖k − k̂‖ ≤ (2^-11 + 1e-5)·‖k‖.
//   Each ε carries 1e-6 relative for the fp32 scale arithmetic (asymmetric
//   dequantisation q·s + z adds ≤ 3A·2^-24, well inside it).
// Scores against the double oracle: 2e-4 of the largest finite score (fp32
// logits and sums, property_test's derivation); caller-given scores are copied
// and compared exactly by that same rule (error 0). Kept sets, counts and
// positions are integers and compared exactly. Fixed seeds: a failure names its
// seed and case.
#include <gtest/gtest.h>

#include <cstdlib>

#include "common/property_case.hpp"

using namespace kvtrim::testing::property;

namespace {

/// The codec configs and budget forms this file draws on top of property_test's cases.
struct product_variant : property_defaults {
  static constexpr bool validate_after_attend = true;
  static bool tight_flat(rng& r) { return coin(r); }
  /// Half the cases: another head_dim, mostly no power of two (odd ones too: int4 packs
  /// two codes a byte; the AVX2 loops take 8 lanes), ≥ 8 for low rank's rank 4.
  static std::int64_t head_dim(rng& r, std::int64_t drawn, bool structured) {
    constexpr std::array<std::int64_t, 15> dims{2, 3, 7, 8, 12, 20, 24, 33, 40, 48, 72, 80, 96, 100, 128};
    if (!coin(r)) return drawn;
    const std::int64_t dim = dims[static_cast<std::size_t>(pick(r, 0, 14))];
    return structured && dim < 8 ? 8 : dim;
  }
  static float tail_scale(rng& r) { return std::array<float, 4>{1.0f, 1.0f, 3.0f, 8.0f}[static_cast<std::size_t>(pick(r, 0, 3))]; }

  template <class Config>
  static void draw_quantized(Config& cfg, rng& r) {
    cfg.asymmetric = coin(r);
    const int keys = static_cast<int>(pick(r, 0, 5));
    if (keys == 5) cfg.keys = kt::codec::key_scaling::per_token;
    else cfg.key_group = std::array<std::int64_t, 5>{32, 32, 16, 8, 12}[static_cast<std::size_t>(keys)];
  }

  template <class C>
  static typename C::config codec_config(rng& r) {
    typename C::config cfg = codec_model<C>::config();
    if constexpr (requires { cfg.key_group; cfg.asymmetric; }) {
      draw_quantized(cfg, r);
    } else if constexpr (requires { cfg.inner; cfg.sinks; cfg.recent; }) {
      draw_quantized(cfg.inner, r);
      cfg.sinks = pick(r, 0, 4);
      cfg.recent = coin(r, 0.2) ? 128 : pick(r, 0, 16);
    } else if constexpr (requires { cfg.update_freq; }) {
      cfg.update_freq = std::array<std::int64_t, 4>{0, 1, 5, 16}[static_cast<std::size_t>(pick(r, 0, 3))];
    }
    return cfg;
  }

  template <class BudgetConfig>
  static void tweak_budget(BudgetConfig& cfg, rng& r, const budget_inputs& in) {
    if constexpr (std::is_same_v<BudgetConfig, kt::budget::pyramid::config>) {
      if (in.min_keep == 1) cfg.kvpress_compatible = coin(r);
      // The paper schedule gives a deep layer 0 tokens when B_l < 1 with no window, which
      // compress refuses (PyramidPaperScheduleEmptyingALayerIsRefused below): draw the widest layer then.
      if (kt::budget::pyramid::layer_keep(cfg, in.tokens) < 1) cfg.layer = 0;
    }
  }
};

template <class L, class S, class B, class C>
using scheme = kt::scheme<L, S, B, C, kt::backend::cpu>;
using contiguous = kt::layout::contiguous;
using paged = kt::layout::paged;
using flat = kt::layout::flat;
using shared = kt::layout::shared_paged;
using snapkv = kt::score::snapkv;
using h2o = kt::score::h2o;
using key_norm = kt::score::key_norm;
using static_window = kt::score::static_window;
using external = kt::score::external;
using razor = kt::score::retrieval_head;
using unif = kt::budget::uniform;
using pyr = kt::budget::pyramid;
using adapt = kt::budget::adaptive;
using per_head = kt::budget::per_head;
using by_scorer = kt::budget::by_scorer;
using fp32 = kt::codec::fp32;
using fp16 = kt::codec::fp16;
using bf16 = kt::codec::bf16;
using int8 = kt::codec::int8;
using int4 = kt::codec::int4;
using fp8 = kt::codec::fp8;
using low_rank = kt::codec::low_rank;
using layered = kt::codec::layered<kt::codec::int8>;

/// Cases per scheme: 6 (3 under AddressSanitizer, whose build runs the same paths about
/// ten times slower: the brute-force H2O oracle and low rank's SVDs at -Og), or
/// KVTRIM_PRODUCT_CASES for a longer hunt (the seeds of later schemes then shift).
#if defined(__SANITIZE_ADDRESS__)
constexpr int default_cases = 3;
#else
constexpr int default_cases = 6;
#endif
const int cases = [] {
  const char* text = std::getenv("KVTRIM_PRODUCT_CASES");
  return text != nullptr && std::atoi(text) > 0 ? std::atoi(text) : default_cases;
}();

TEST(CodecScorerProduct, Snapkv) {
  run_variant_cases<product_variant, scheme<shared, snapkv, unif, fp32>, scheme<paged, snapkv, per_head, fp16>,
                    scheme<contiguous, snapkv, pyr, bf16>, scheme<flat, snapkv, adapt, int8>,
                    scheme<paged, snapkv, unif, int4>, scheme<flat, snapkv, pyr, fp8>,
                    scheme<contiguous, snapkv, unif, low_rank>, scheme<flat, snapkv, per_head, layered>>(10000, cases);
}

TEST(CodecScorerProduct, H2o) {
  run_variant_cases<product_variant, scheme<flat, h2o, per_head, fp32>, scheme<shared, h2o, pyr, fp16>,
                    scheme<paged, h2o, adapt, bf16>, scheme<contiguous, h2o, unif, int8>, scheme<flat, h2o, pyr, int4>,
                    scheme<paged, h2o, per_head, fp8>, scheme<flat, h2o, adapt, low_rank>,
                    scheme<contiguous, h2o, pyr, layered>>(11000, cases);
}

TEST(CodecScorerProduct, KeyNorm) {
  run_variant_cases<product_variant, scheme<paged, key_norm, adapt, fp32>, scheme<flat, key_norm, unif, fp16>,
                    scheme<shared, key_norm, unif, bf16>, scheme<paged, key_norm, pyr, int8>,
                    scheme<flat, key_norm, per_head, int4>, scheme<contiguous, key_norm, unif, fp8>,
                    scheme<paged, key_norm, per_head, low_rank>, scheme<paged, key_norm, adapt, layered>>(12000, cases);
}

TEST(CodecScorerProduct, StaticWindow) {
  run_variant_cases<product_variant, scheme<contiguous, static_window, pyr, fp32>,
                    scheme<paged, static_window, adapt, fp16>, scheme<shared, static_window, pyr, bf16>,
                    scheme<flat, static_window, per_head, int8>, scheme<paged, static_window, adapt, int4>,
                    scheme<contiguous, static_window, pyr, fp8>, scheme<flat, static_window, pyr, low_rank>,
                    scheme<paged, static_window, unif, layered>>(13000, cases);
}

TEST(CodecScorerProduct, External) {
  run_variant_cases<product_variant, scheme<shared, external, pyr, fp32>, scheme<contiguous, external, unif, fp16>,
                    scheme<paged, external, per_head, bf16>, scheme<paged, external, adapt, int8>,
                    scheme<contiguous, external, unif, int4>, scheme<flat, external, adapt, fp8>,
                    scheme<paged, external, unif, low_rank>, scheme<flat, external, pyr, layered>>(14000, cases);
}

TEST(CodecScorerProduct, RetrievalHead) {
  run_variant_cases<product_variant, scheme<flat, razor, by_scorer, fp32>, scheme<paged, razor, by_scorer, fp16>,
                    scheme<paged, razor, by_scorer, bf16>, scheme<paged, razor, by_scorer, int8>,
                    scheme<paged, razor, by_scorer, int4>, scheme<flat, razor, by_scorer, fp8>,
                    scheme<paged, razor, by_scorer, low_rank>, scheme<paged, razor, by_scorer, layered>>(15000, cases);
}

// Found by this product: with the defaults (window 0, β = 20) and a small per-head budget,
// the paper schedule rounds a deep layer's B_l < 1 down to 0; compress used to leave every
// head of that layer empty, which attend then refused. The schedule keeps its zeros (its
// exact total L·k depends on them: budgets_test's PaperScheduleKeepsTheTotalExactlyAndFallsWithDepth,
// e.g. T = 97, k = 4, L = 80), and compress refuses a budget that keeps no token a head,
// before anything is written — as keep.hpp, adaptive.hpp and per_head never go below one.
TEST(CodecScorerProduct, PyramidPaperScheduleEmptyingALayerIsRefused) {
  using pyramid_scheme = scheme<contiguous, static_window, pyr, fp32>;
  const kt::model_shape shape{.q_heads = 1, .kv_heads = 1, .head_dim = 4};
  constexpr std::int64_t tokens = 10;
  pyramid_scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{1};  // B = 1: B_l = 1.95, 1.57, 1.19, 0.81, 0.43, 0.05 → 2, 2, 1, 1, 0, 0
  cfg.budget.layers = 6;
  cfg.budget.layer = 5;
  ASSERT_EQ(kt::budget::pyramid::layer_keep(cfg.budget, tokens), 0);  // the schedule itself (exact total L·k)
  std::vector<float> rows(static_cast<std::size_t>(tokens * 4), 0.5f);
  auto cache = pyramid_scheme::make_cache(shape, 1, tokens, fp32::config{});
  const std::vector<unsigned char> before(static_cast<const unsigned char*>(cache.data()),
                                          static_cast<const unsigned char*>(cache.data()) + cache.bytes());
  std::vector<std::byte> scratch(pyramid_scheme::compress_workspace(shape, 1, tokens, cfg));
  const std::array<std::int64_t, 4> extents{1, 1, tokens, 4};
  try {
    pyramid_scheme::compress(kt::make_view(rows.data(), extents), kt::make_view(rows.data(), extents), cache.view(),
                             cfg, kt::workspace{scratch.data(), scratch.size()});
    ADD_FAILURE() << "a layer whose schedule keeps no token was accepted (its heads would be empty)";
  } catch (const kt::error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("kvtrim::scheme::compress: argument 'config.budget'"), std::string::npos) << what;
    EXPECT_NE(what.find("got 0 of 10 tokens a head"), std::string::npos) << what;
  }
  EXPECT_TRUE(std::equal(before.begin(), before.end(), static_cast<const unsigned char*>(cache.data())))
      << "a refused compress changed the cache";
  cfg.budget.layer = 3;  // 1 token: accepted
  scratch.resize(pyramid_scheme::compress_workspace(shape, 1, tokens, cfg));
  EXPECT_NO_THROW(pyramid_scheme::compress(kt::make_view(rows.data(), extents), kt::make_view(rows.data(), extents),
                                           cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()}));
}

}  // namespace
