// kvtrim/backend/cpu.hpp — the CPU reference backend.
//
// The specification every other backend is tested against: each stage is
// written from its paper's math, clear over fast, single-threaded and
// deterministic. Stages live in include/kvtrim/backend/cpu/, one header per
// policy. Like the CUDA backend it allocates nothing in hot calls (scratch
// comes from the caller's workspace) and takes a (no-op) stream argument, so
// the same scheme code drives both.
#pragma once

#include <cstddef>
#include <new>
#include <string_view>

#include "kvtrim/core/view.hpp"

namespace kvtrim::backend {

/// The CPU backend runs synchronously; its "stream" carries nothing.
struct host_stream {};

struct cpu {
  static constexpr std::string_view name = "backend::cpu";
  using space = host_space;
  using stream_type = host_stream;

  static constexpr std::size_t alignment = 256;
  static void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t{alignment}); }
  static void deallocate(void* pointer) { ::operator delete(pointer, std::align_val_t{alignment}); }
};

}  // namespace kvtrim::backend
