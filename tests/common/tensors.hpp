// tests/common/tensors.hpp — owning host tensors for tests: random contents,
// contiguous or deliberately strided (padding on every axis, so a view that
// assumes density reads the wrong elements and fails the test).
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <array>
#include <cstdint>
#include <random>
#include <vector>

namespace kvtrim::testing {

template <class T, std::size_t Rank>
struct host_tensor {
  std::vector<T> storage;
  tensor_view<T, Rank> view;

  T& operator()(auto... index) { return view(index...); }
  const T& operator()(auto... index) const { return view(index...); }
  tensor_view<const T, Rank> cview() const { return {view.data, view.extents, view.strides}; }
};

/// A tensor with `padding[axis]` unused elements after each run of axis `axis`
/// (padding 0 everywhere gives a dense row-major tensor). Unused elements hold NaN
/// so any read of them poisons the result.
template <class T, std::size_t Rank>
host_tensor<T, Rank> make_tensor(const std::array<std::int64_t, Rank>& extents,
                                 const std::array<std::int64_t, Rank>& padding = {}) {
  host_tensor<T, Rank> tensor;
  std::array<std::int64_t, Rank> strides{};
  std::int64_t running = 1;
  for (std::size_t axis = Rank; axis-- > 0;) {
    strides[axis] = running;
    running *= extents[axis] + padding[axis];
  }
  tensor.storage.assign(static_cast<std::size_t>(running), from_float<T>(std::numeric_limits<float>::quiet_NaN()));
  tensor.view = {tensor.storage.data(), extents, strides};
  return tensor;
}

/// Calls fn(index...) for every index of the view's extents, in row-major order.
template <std::size_t Rank, class Fn>
void for_each_index(const std::array<std::int64_t, Rank>& extents, Fn&& fn) {
  std::array<std::int64_t, Rank> index{};
  std::int64_t total = 1;
  for (auto extent : extents) total *= extent;
  for (std::int64_t flat = 0; flat < total; ++flat) {
    std::int64_t rest = flat;
    for (std::size_t axis = Rank; axis-- > 0;) {
      index[axis] = rest % extents[axis];
      rest /= extents[axis];
    }
    std::apply([&](auto... i) { fn(i...); }, index);
  }
}

/// Normal(0, scale) entries.
template <class T, std::size_t Rank>
host_tensor<T, Rank> random_tensor(const std::array<std::int64_t, Rank>& extents, std::uint64_t seed,
                                   float scale = 1.0f, const std::array<std::int64_t, Rank>& padding = {}) {
  auto tensor = make_tensor<T, Rank>(extents, padding);
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  for_each_index(extents, [&](auto... index) { tensor.view(index...) = from_float<T>(normal(random)); });
  return tensor;
}

}  // namespace kvtrim::testing
