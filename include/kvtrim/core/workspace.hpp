// kvtrim/core/workspace.hpp — scratch space, the CUB way.
//
// Hot calls never allocate. Each call that needs scratch has a sibling
// `*_workspace(...)` returning the bytes it needs; the caller hands that much
// memory back (host memory for backend::cpu, device memory for backend::cuda).
// Both the sizing and the real call carve the buffer with the same
// `workspace_carver` code path, so the two can never disagree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/core/error.hpp"

namespace kvtrim {

/// Caller-owned scratch memory.
struct workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

/// Cuts aligned pieces out of a workspace. Constructed without memory it only
/// counts bytes (sizing pass); with memory it hands out pointers (real pass).
class workspace_carver {
 public:
  static constexpr std::size_t alignment = 256;  // a full cache-line group; what CUB uses

  workspace_carver() = default;
  explicit workspace_carver(workspace memory) : memory_(memory) {}

  /// Reserves `count` objects of T; returns nullptr in the sizing pass. A size
  /// past 2^63 bytes (sizes computed from absurd inputs) throws instead of wrapping.
  template <class T>
  T* take(std::int64_t count) {
    constexpr std::string_view function = "kvtrim::workspace_carver::take";
    const std::int64_t bytes =
        detail::checked_mul(function, "count", count > 0 ? count : 0, static_cast<std::int64_t>(sizeof(T)));
    const std::int64_t padded = detail::checked_add(function, "count", static_cast<std::int64_t>(used_),
                                                    static_cast<std::int64_t>(alignment - 1));
    const std::size_t begin = static_cast<std::size_t>(padded) / alignment * alignment;
    used_ = static_cast<std::size_t>(
        detail::checked_add(function, "count", static_cast<std::int64_t>(begin), bytes));
    if (memory_.data == nullptr) return nullptr;
    return reinterpret_cast<T*>(static_cast<std::byte*>(memory_.data) + begin);
  }

  /// Bytes reserved so far, padding included.
  std::size_t bytes() const { return used_; }

 private:
  workspace memory_{};
  std::size_t used_ = 0;
};

/// Alignment a workspace's base pointer must have. The carver aligns pieces
/// relative to the base, so the base must suit every piece's type (what
/// malloc/new/cudaMalloc all return).
inline constexpr std::size_t workspace_base_alignment = alignof(std::max_align_t);

namespace detail {
/// Throws unless the caller's workspace holds `needed` bytes at a usable alignment.
inline void check_workspace(std::string_view function, const workspace& given, std::size_t needed) {
  if (needed > 0 && given.data == nullptr)
    fail(function, "workspace", cat("a buffer of ", needed, " bytes (ask the matching *_workspace function)"),
         "nullptr");
  if (needed > 0 && reinterpret_cast<std::uintptr_t>(given.data) % workspace_base_alignment != 0)
    fail(function, "workspace", cat("a pointer aligned to ", workspace_base_alignment, " bytes"),
         cat(given.data, " (misaligned)"));
  if (given.bytes < needed)
    fail(function, "workspace", cat("at least ", needed, " bytes"), cat(given.bytes, " bytes"));
}
}  // namespace detail
}  // namespace kvtrim
