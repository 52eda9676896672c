// kvtrim/core/cache.hpp — an owning cache for examples, tests and quick use.
//
// Engines usually hand kvtrim views over their own memory; this type allocates
// the memory itself (through the scheme's backend: host memory for cpu, device
// memory for cuda) and exposes the very same view, so nothing downstream knows
// the difference. Allocation happens once, here, never on a hot path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "kvtrim/core/error.hpp"
#include "kvtrim/core/implementation.hpp"

namespace kvtrim {

template <class Scheme>
class cache {
 public:
  using scheme_type = Scheme;
  using view_type = typename Scheme::cache_view;
  using backend = typename Scheme::backend;

  /// Arguments are those of the layout's view::bytes / view::bind (for
  /// layout::contiguous: shape, batch, capacity, codec config). bytes() checks
  /// them, so nothing is allocated for a bad shape. (The constraint keeps this
  /// template from posing as a copy constructor for a non-const cache.)
  template <class... Args>
    requires requires(const Args&... args) { view_type::bytes(args...); }
  explicit cache(const Args&... args) : bytes_(nonzero(view_type::bytes(args...))), memory_(backend::allocate(bytes_)) {
    try {
      bind_view(args...);
    } catch (...) {
      release();  // a constructor that throws runs no destructor
      throw;
    }
  }

 private:
  template <class... Args>
  void bind_view(const Args&... args) {
    if constexpr (requires { requires view_type::length_in_host_memory; }) {
      // A device contiguous cache keeps its one length on the host (layout/contiguous.hpp).
      host_length_ = std::make_unique<std::int64_t>(0);
      view_ = view_type::bind_with_host_length(host_length_.get(), memory_, args...);
    } else {
      view_ = view_type::bind(memory_, args...);
    }
    // Device memory is cleared by the backend (bind initialises host memory itself).
    if constexpr (requires { implementation<typename Scheme::layout, backend>::reset(view_); })
      implementation<typename Scheme::layout, backend>::reset(view_);
  }

 public:
  cache(const cache&) = delete;
  cache& operator=(const cache&) = delete;
  cache(cache&& other) noexcept
      : bytes_(std::exchange(other.bytes_, 0)),
        memory_(std::exchange(other.memory_, nullptr)),
        host_length_(std::move(other.host_length_)),
        view_(std::exchange(other.view_, view_type{})) {}
  cache& operator=(cache&& other) noexcept {
    if (this != &other) {
      release();
      bytes_ = std::exchange(other.bytes_, 0);
      memory_ = std::exchange(other.memory_, nullptr);
      host_length_ = std::move(other.host_length_);
      // The moved-from cache keeps an empty view (capacity 0), which every
      // call rejects, instead of one that still writes into our memory.
      view_ = std::exchange(other.view_, view_type{});
    }
    return *this;
  }
  ~cache() { release(); }

  view_type& view() { return view_; }
  const view_type& view() const { return view_; }
  operator view_type&() { return view_; }
  operator const view_type&() const { return view_; }

  /// Bytes allocated for the stored tokens (what the cache costs in memory).
  std::size_t bytes() const { return bytes_; }
  /// The allocation itself (backend memory): tokens, codec state and layout metadata.
  const void* data() const { return memory_; }

 private:
  void release() {
    if (memory_ != nullptr) backend::deallocate(memory_);
    memory_ = nullptr;
  }

  /// Every layout needs some memory; a zero here is a layout bug, and saying so
  /// also keeps the compiler from reasoning about a 1-byte allocation path.
  static std::size_t nonzero(std::size_t bytes) {
    if (bytes == 0) detail::fail_call("kvtrim::cache", "view_type::bytes", "a layout asked for 0 bytes");
    return bytes;
  }

  std::size_t bytes_ = 0;
  void* memory_ = nullptr;
  std::unique_ptr<std::int64_t> host_length_;  // device contiguous caches only
  view_type view_{};
};

}  // namespace kvtrim
