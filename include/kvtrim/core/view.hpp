// kvtrim/core/view.hpp — non-owning strided views over host or device memory.
//
// Engines own their buffers; kvtrim reads and writes them in place through
// these views (mdspan's layout_stride, with the memory space in the type so a
// host function can never be handed device memory by mistake). Extents, strides
// and offsets are 64-bit because B·H·T·D passes 2^31 for long contexts.
// Strides are in elements, not bytes.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/error.hpp"

namespace kvtrim {

/// Memory that the CPU reads directly.
struct host_space {
  static constexpr std::string_view name = "host";
};
/// Memory of the current CUDA device.
struct device_space {
  static constexpr std::string_view name = "device";
};

template <class S>
concept MemorySpace = std::same_as<S, host_space> || std::same_as<S, device_space>;

/// A rank-`Rank` strided view of `T` living in `Space`.
template <class T, std::size_t Rank, MemorySpace Space = host_space>
struct tensor_view {
  using element_type = T;
  using space = Space;
  static constexpr std::size_t rank = Rank;

  T* data = nullptr;
  std::array<std::int64_t, Rank> extents{};
  std::array<std::int64_t, Rank> strides{};  // in elements

  KVTRIM_HOST_DEVICE constexpr std::int64_t extent(std::size_t axis) const { return extents[axis]; }
  KVTRIM_HOST_DEVICE constexpr std::int64_t stride(std::size_t axis) const { return strides[axis]; }

  KVTRIM_HOST_DEVICE constexpr std::int64_t size() const {
    std::int64_t count = 1;
    for (std::size_t axis = 0; axis < Rank; ++axis) count *= extents[axis];
    return count;
  }

  template <std::integral... Index>
    requires(sizeof...(Index) == Rank)
  KVTRIM_HOST_DEVICE constexpr std::int64_t offset(Index... index) const {
    const std::int64_t indices[] = {static_cast<std::int64_t>(index)...};
    std::int64_t result = 0;
    for (std::size_t axis = 0; axis < Rank; ++axis) result += indices[axis] * strides[axis];
    return result;
  }

  /// Element access. Host code must only use it on host_space views; kernels on
  /// device_space views.
  template <std::integral... Index>
    requires(sizeof...(Index) == Rank)
  KVTRIM_HOST_DEVICE constexpr T& operator()(Index... index) const {
    return data[offset(index...)];
  }

  /// Row-major strides with the last axis contiguous.
  KVTRIM_HOST_DEVICE constexpr bool is_contiguous() const {
    std::int64_t expected = 1;
    for (std::size_t axis = Rank; axis-- > 0;) {
      if (extents[axis] != 1 && strides[axis] != expected) return false;
      expected *= extents[axis];
    }
    return true;
  }

  /// A read-only view of the same memory.
  constexpr operator tensor_view<const T, Rank, Space>() const
    requires(!std::is_const_v<T>)
  {
    return {data, extents, strides};
  }
};

/// Row-major (last axis contiguous) strides for the given extents.
template <std::size_t Rank>
constexpr std::array<std::int64_t, Rank> row_major_strides(const std::array<std::int64_t, Rank>& extents) {
  std::array<std::int64_t, Rank> strides{};
  std::int64_t running = 1;
  for (std::size_t axis = Rank; axis-- > 0;) {
    strides[axis] = running;
    running *= extents[axis];
  }
  return strides;
}

/// A dense row-major view over `data`.
template <MemorySpace Space = host_space, class T, std::size_t Rank>
constexpr tensor_view<T, Rank, Space> make_view(T* data, const std::array<std::int64_t, Rank>& extents) {
  return {data, extents, row_major_strides(extents)};
}

/// Keys or values: [batch, kv_heads, tokens, head_dim].
template <class T, MemorySpace Space = host_space>
using kv_view = tensor_view<T, 4, Space>;
/// Decode queries or attention outputs: [batch, q_heads, head_dim].
template <class T, MemorySpace Space = host_space>
using query_view = tensor_view<T, 3, Space>;
/// Observation-window queries of the prefill: [batch, q_heads, window, head_dim].
template <class T, MemorySpace Space = host_space>
using window_view = tensor_view<T, 4, Space>;
/// Token scores: [batch, kv_heads, tokens].
template <MemorySpace Space = host_space>
using score_view = tensor_view<float, 3, Space>;

namespace detail {

template <std::size_t Rank>
std::string format_extents(const std::array<std::int64_t, Rank>& extents) {
  std::string text = "[";
  for (std::size_t axis = 0; axis < Rank; ++axis) {
    if (axis) text += ", ";
    text += std::to_string(extents[axis]);
  }
  return text + "]";
}

/// The extents a view must have; -1 means "any".
template <std::size_t Rank>
using expected_extents = std::array<std::int64_t, Rank>;

/// Checks a view before any backend touches it: sane extents and strides, no
/// null pointer behind a non-empty view, the expected shape, and (where a
/// backend needs it) a contiguous last axis. Throws kvtrim::error naming `argument`.
template <class T, std::size_t Rank, class Space>
void check_view(std::string_view function, std::string_view argument,
                const tensor_view<T, Rank, Space>& view, const expected_extents<Rank>& expected,
                bool last_axis_contiguous = false) {
  for (std::size_t axis = 0; axis < Rank; ++axis) {
    if (view.extents[axis] < 0) fail(function, argument, "non-negative extents", format_extents(view.extents));
    if (view.strides[axis] < 0)
      fail(function, argument, "non-negative strides", cat("strides ", format_extents(view.strides)));
  }
  bool shape_matches = true;
  for (std::size_t axis = 0; axis < Rank; ++axis)
    if (expected[axis] >= 0 && view.extents[axis] != expected[axis]) shape_matches = false;
  if (!shape_matches) {
    std::string wanted = "[";
    for (std::size_t axis = 0; axis < Rank; ++axis) {
      if (axis) wanted += ", ";
      wanted += expected[axis] < 0 ? std::string("*") : std::to_string(expected[axis]);
    }
    fail(function, argument, cat("shape ", wanted, "]"), format_extents(view.extents));
  }
  // Element count and the farthest element's offset must fit in 64 bits
  // (tokens = 2^60 is an error here, not a wrapped product later).
  std::int64_t count = 1, span = 0;
  for (std::size_t axis = 0; axis < Rank; ++axis) {
    count = checked_mul(function, argument, count, view.extents[axis]);
    if (view.extents[axis] > 0)
      span = checked_add(function, argument, span, checked_mul(function, argument, view.extents[axis] - 1,
                                                               view.strides[axis]));
  }
  if (count > 0 && view.data == nullptr)
    fail(function, argument, "a non-null data pointer for a view of " + std::to_string(view.size()) + " elements",
         "nullptr");
  if (last_axis_contiguous && Rank > 0 && view.extents[Rank - 1] > 1 && view.strides[Rank - 1] != 1)
    fail(function, argument, "a contiguous last axis (stride 1)", cat("stride ", view.strides[Rank - 1]));
}

/// Sequence b of a [B, ·, T, ·] view, its first `tokens` along axis 2 (a view of
/// the same memory; an empty view stays empty): a right-padded batch's sequence
/// as a batch of one (scheme::compress's and eviction::seed_metric's sequence_lengths).
template <class T, MemorySpace Space>
tensor_view<T, 4, Space> first_tokens(const tensor_view<T, 4, Space>& view, std::int64_t b, std::int64_t tokens) {
  if (view.data == nullptr) return view;
  return {view.data + b * view.strides[0], {1, view.extents[1], tokens, view.extents[3]}, view.strides};
}

}  // namespace detail
}  // namespace kvtrim
