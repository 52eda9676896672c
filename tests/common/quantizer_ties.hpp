// tests/common/quantizer_ties.hpp — inputs that sit on the rounding ties of integer_quantizer's codes, for
// the tests of integer_quantizer::rounded_quotient (the device encode's x · 1/scale, dividing only near a tie),
// and on the e4m3 midpoints, for detail::e4m3_quotient (fp8's counterpart):
// tests/cpu/codec_roundtrip_test.cpp checks the host evaluation against the division, tests/cuda/codecs_test.cu
// the device's codes against the CPU's.
#pragma once

#include <kvtrim/codec/fp8.hpp>
#include <kvtrim/codec/int8.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace kvtrim::testing {

/// One input x for the run whose fitted range is [lowest, highest]; `random` marks the uniformly drawn ones.
struct quantizer_input {
  float x, lowest, highest;
  bool random;
};

/// For a run range of every binade (amax 2^-140 … 2^127, subnormal scales included — their reciprocal
/// overflows): the float nearest every tie n + ½ of the code range, quotients k·2⁻¹⁵ to either side of it
/// (across the 2⁻¹² margin), 3 floats each side of it, the whole steps n, quotients of 300 … 1500 (inputs
/// beyond the fitted range), the range's ends and signed zeros, and 256 uniform draws; then scales that are powers of two, where
/// x = (n + ½)·scale is exact and the quotient is the tie itself (half to even decides).
template <int Bits>
std::vector<quantizer_input> quantizer_tie_inputs(bool asymmetric) {
  using quantizer = detail::integer_quantizer<Bits>;
  std::vector<quantizer_input> inputs;
  std::mt19937_64 random(static_cast<std::uint64_t>(Bits * 2 + (asymmetric ? 1 : 0)));
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  const int top = asymmetric ? quantizer::levels : quantizer::symmetric_max;
  for (int exponent = -140; exponent <= 127; ++exponent) {
    const float amax = std::ldexp(1.0f + 0.49f * (unit(random) + 1.0f), exponent);
    if (!std::isfinite(amax) || amax == 0.0f) continue;
    const float low = asymmetric ? -0.5f * amax : -amax, high = amax;
    const typename quantizer::step step = quantizer::fit(low, high, asymmetric);
    if (step.scale == 0.0f || !std::isfinite(step.scale)) continue;
    // x for the quotient q (in double; none beyond the float range: converting those would be undefined).
    const auto add_quotient = [&](double q) {
      const double x = q * static_cast<double>(step.scale) + step.zero;
      if (std::fabs(x) <= static_cast<double>(std::numeric_limits<float>::max()))
        inputs.push_back({static_cast<float>(x), low, high, false});
    };
    for (int n = asymmetric ? 0 : -top; n <= top; ++n) {
      const double tie = n + 0.5;
      add_quotient(tie);
      add_quotient(n);
      // Quotients k·2⁻¹⁵ (k = 1 … 12: 3·10⁻⁵ … 3.7·10⁻⁴) from the tie on both sides: across the product
      // path's margin 2⁻¹² (k = 8), where a margin below the error bound 1.83·10⁻⁴ would round wrongly.
      for (int k = 1; k <= 12; ++k) add_quotient(tie - k * 0x1p-15), add_quotient(tie + k * 0x1p-15);
      if (std::fabs(tie * static_cast<double>(step.scale) + step.zero) > static_cast<double>(std::numeric_limits<float>::max()))
        continue;
      float below = static_cast<float>(tie * static_cast<double>(step.scale) + step.zero), above = below;
      for (int k = 0; k < 3; ++k) {  // the float neighbours of the tie's x
        below = std::nextafter(below, -INFINITY), above = std::nextafter(above, INFINITY);
        inputs.push_back({below, low, high, false}), inputs.push_back({above, low, high, false});
      }
    }
    // Inputs beyond the fitted range (append after compaction): quotients up to and past the product path's
    // bound |e| < 1024, near their ties too.
    // There the product's error reaches its bound (|q|·2⁻²³ ≈ 1.2·10⁻⁴ near 1024, against 1.5·10⁻⁵ for |q| ≤ 127),
    // so the k·2⁻¹⁵ sweep is where a too-small margin shows.
    for (const double q : {300.5, 511.5, 700.5, 1000.5, 1020.5, 1022.5, 1023.5, 1024.5, 1500.5})
      for (int k = -12; k <= 12; ++k) add_quotient((asymmetric ? q : -q) + k * 0x1p-15);
    for (const float x : {low, high, 0.0f, -0.0f}) inputs.push_back({x, low, high, false});
    for (int i = 0; i < 256; ++i) inputs.push_back({amax * unit(random), low, high, true});
  }
  const auto range = static_cast<float>(top);
  for (const float amax : {range, 0.25f * range, 1024.0f * range, 0x1p-100f * range}) {
    const float low = asymmetric ? 0.0f : -amax;
    const typename quantizer::step step = quantizer::fit(low, amax, asymmetric);
    for (int n = asymmetric ? 0 : -top; n < top; ++n)
      inputs.push_back({static_cast<float>((n + 0.5) * static_cast<double>(step.scale)) + step.zero, low, amax, false});
  }
  return inputs;
}

/// One input x of a head whose fp8 scale is `scale`; `random` marks the randomly drawn ones.
struct e4m3_input {
  float x, scale;
  bool random;
};

/// Inputs of detail::e4m3_quotient (the fp8 device encode's x · 1/scale, dividing only near an e4m3 midpoint),
/// grouped by scale (each scale's inputs are consecutive). Scales: powers of two 2⁻¹⁴⁹ … 2¹²⁷ (every 7th
/// binade; exact quotients, so ties meet half to even), fp32 subnormal ones (reciprocal finite or infinite),
/// ones above 2¹²⁶ (subnormal reciprocal: the division decides), 1/3, 0.1, 1/448, 448/3 and random ones of
/// random binades. Per scale, for every e4m3 midpoint m (the 8 subnormal ones (k + ½)·2⁻⁹ and the 8 of each
/// normal binade 2⁻⁶ … 2⁸, so 432 and the saturation edge 464 too), both signs: x nearest m·scale and its
/// float neighbours ±1 … ±64 ulps, and x for the quotients m ± j ulps of m (j ≤ 24: across the 8-ulp
/// margin); for every e4m3 value v: x nearest v·scale and ±1 … ±3 ulps; then quotients 440 … 480 in steps
/// of 1/8, signed zeros, ±FLT_MAX and its neighbours, 1024 uniform quotients in the e4m3 subnormal range,
/// 2048 uniform in ±448 and 2048 log-uniform over 2⁻¹² … 2¹⁰. Finally 2¹⁸ random float bit patterns (the
/// finite ones) for each of four scales.
inline std::vector<e4m3_input> e4m3_quotient_inputs() {
  std::vector<e4m3_input> inputs;
  std::mt19937_64 random(448);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<float> scales;
  for (int exponent = -149; exponent <= 127; exponent += 7) scales.push_back(std::ldexp(1.0f, exponent));
  for (const float scale : {0x1.8p-127f, 0x1.fffffep-127f, 0x1.4p-128f, 0x1p-130f, 0x1.8p-140f, 0x1.8p+126f,
                            0x1.fffffep+127f, 1.0f / 3.0f, 0.1f, 1.0f / 448.0f, 448.0f / 3.0f, 1.0f, 0.75f})
    scales.push_back(scale);
  for (int i = 0; i < 24; ++i)
    scales.push_back(static_cast<float>(std::ldexp(1.0 + unit(random), static_cast<int>(unit(random) * 60.0) - 40)));
  struct point {
    double value;
    int reach;  // float neighbours each side
  };
  std::vector<point> points;  // the positive midpoints (64 neighbours) and values (3) of e4m3
  for (int k = 0; k < 8; ++k) points.push_back({(k + 0.5) * 0x1p-9, 64}), points.push_back({k * 0x1p-9, 3});
  for (int e = -6; e <= 8; ++e)
    for (int k = 0; k < 8; ++k)
      points.push_back({std::ldexp(1.0 + (2 * k + 1) / 16.0, e), 64}),
          points.push_back({std::ldexp(1.0 + k / 8.0, e), 3});
  constexpr double largest = std::numeric_limits<float>::max();
  for (const float scale : scales) {
    const double s = scale;
    const auto add_x = [&](double x, bool drawn = false) {
      if (std::fabs(x) <= largest) inputs.push_back({static_cast<float>(x), scale, drawn});
    };
    for (const point& p : points)
      for (const double m : {p.value, -p.value}) {
        if (std::fabs(m * s) > largest) continue;
        const float x = static_cast<float>(m * s);
        inputs.push_back({x, scale, false});
        float below = x, above = x;
        for (int k = 1; k <= p.reach; ++k) {
          below = std::nextafter(below, -INFINITY), above = std::nextafter(above, INFINITY);
          if (std::isfinite(below)) inputs.push_back({below, scale, false});
          if (std::isfinite(above)) inputs.push_back({above, scale, false});
        }
        // Quotients j ulps (of the float m) from m: x = (m ± j·ulp)·s, rounded.
        const float mf = static_cast<float>(m);
        if (p.reach < 64 || mf == 0.0f) continue;
        const double ulp = static_cast<double>(std::nextafter(std::fabs(mf), INFINITY)) - std::fabs(mf);
        for (int j = 1; j <= 24; ++j) add_x((m + j * ulp) * s), add_x((m - j * ulp) * s);
      }
    for (double q = 440.0; q <= 480.0; q += 0.125) add_x(q * s), add_x(-q * s);
    for (const float x : {0.0f, -0.0f}) inputs.push_back({x, scale, false});
    float top = std::numeric_limits<float>::max();
    for (int k = 0; k < 4; ++k, top = std::nextafter(top, 0.0f))
      inputs.push_back({top, scale, false}), inputs.push_back({-top, scale, false});
    for (int i = 0; i < 1024; ++i) add_x((unit(random) * 2.0 - 1.0) * 0x1p-6 * s, true);
    for (int i = 0; i < 2048; ++i) add_x((unit(random) * 2.0 - 1.0) * 448.0 * s, true);
    for (int i = 0; i < 2048; ++i) {
      const double sign = unit(random) < 0.5 ? -1.0 : 1.0;
      add_x(sign * std::exp2(-12.0 + 22.0 * unit(random)) * s, true);
    }
  }
  for (const float scale : {1.0f / 3.0f, 0x1.8p-100f, 0x1.5p+90f, 1e-3f}) {
    for (int i = 0; i < (1 << 18); ++i) {
      const float x = std::bit_cast<float>(static_cast<std::uint32_t>(random()));
      if (std::isfinite(x)) inputs.push_back({x, scale, true});
    }
  }
  return inputs;
}

}  // namespace kvtrim::testing
