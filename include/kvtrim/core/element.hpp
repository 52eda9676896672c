// kvtrim/core/element.hpp — the element types kvtrim stores and reads.
//
// On the host these are float, Eigen::half and Eigen::bfloat16; the two 16-bit
// types have exactly the bits of CUDA's __half and __nv_bfloat16, so a buffer
// written by an engine's kernels is read here as is (and the CUDA backend
// reinterprets them back). Arithmetic always happens in float (or double in
// tests); elements are only storage.
#pragma once

#include <Eigen/Core>

#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kvtrim/core/config.hpp"

namespace kvtrim {

using half = Eigen::half;
using bfloat16 = Eigen::bfloat16;

static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>,
              "kvtrim relies on Eigen::half having the bits of IEEE binary16");
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>,
              "kvtrim relies on Eigen::bfloat16 having the bits of bfloat16");

/// Facts about one storage element type. Specialised for the three types below.
template <class T>
struct element_traits;

template <>
struct element_traits<float> {
  static constexpr std::string_view name = "fp32";
  /// Unit roundoff (half the distance from 1 to the next number): tolerances in
  /// tests are stated as multiples of it.
  static constexpr double unit_roundoff = 5.9604644775390625e-08;  // 2^-24
  static float to_float(float x) { return x; }
  static float from_float(float x) { return x; }
};

template <>
struct element_traits<half> {
  static constexpr std::string_view name = "fp16";
  static constexpr double unit_roundoff = 4.8828125e-04;  // 2^-11
  static float to_float(half x) { return static_cast<float>(x); }
  static half from_float(float x) { return half(x); }  // round to nearest even
};

template <>
struct element_traits<bfloat16> {
  static constexpr std::string_view name = "bf16";
  static constexpr double unit_roundoff = 3.90625e-03;  // 2^-8
  static float to_float(bfloat16 x) { return static_cast<float>(x); }
  static bfloat16 from_float(float x) { return bfloat16(x); }  // round to nearest even
};

/// A type kvtrim can store keys, values, queries or outputs in.
template <class T>
concept Element = requires(T x, float f) {
  { element_traits<std::remove_const_t<T>>::name } -> std::convertible_to<std::string_view>;
  { element_traits<std::remove_const_t<T>>::to_float(x) } -> std::same_as<float>;
};

template <Element T>
float to_float(T x) {
  return element_traits<std::remove_const_t<T>>::to_float(x);
}

template <Element T>
T from_float(float x) {
  return element_traits<T>::from_float(x);
}

}  // namespace kvtrim
