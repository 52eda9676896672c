// tests/common/quantizer_ties.hpp — inputs that sit on the rounding ties of integer_quantizer's codes, for
// the tests of integer_quantizer::rounded_quotient (the device encode's x · 1/scale, dividing only near a tie):
// tests/cpu/codec_roundtrip_test.cpp checks the host evaluation against the division, tests/cuda/codecs_test.cu
// the device's codes against the CPU's.
#pragma once

#include <kvtrim/codec/int8.hpp>

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

}  // namespace kvtrim::testing
