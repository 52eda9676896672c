// kvtrim/backend/cpu.hpp — the CPU reference backend.
//
// The specification every other backend is tested against: each stage is
// written from its paper's math and is deterministic. Stages live in
// include/kvtrim/backend/cpu/, one header per policy. Like the CUDA backend it
// allocates nothing in hot calls (scratch comes from the caller's workspace)
// and takes a (no-op) stream argument, so the same scheme code drives both.
//
// Speed (issue 13): the heavy stages use Eigen's matrix products (the window
// attention of SnapKV/H2O), vectorized loops (decode attention) and threads
// over independent (sequence, head) units.
//
// Threads: OpenMP, not an executor parameter. Why:
//   - every stage's signature stays as it is (the scheme and the CUDA backend
//     call the same functions; an executor would thread through all of them and
//     every engine's call site);
//   - it is optional: without -fopenmp (CMake: KVTRIM_OPENMP=OFF, or a user who
//     does not link OpenMP::OpenMP_CXX) the pragmas vanish and the loops run on
//     the calling thread;
//   - engines already steer OpenMP (OMP_NUM_THREADS, omp_set_num_threads, or
//     omp_set_max_active_levels to stay single-threaded inside their own pools),
//     and llama.cpp-class engines call from one thread per layer;
//   - results do not depend on the thread count: each unit (one sequence's kv
//     head) is computed by one thread with the same arithmetic in the same order,
//     so 1, 2 or 64 threads give the same bits (tests run both ways).
// Scratch is per thread: a stage's workspace_bytes sizes it for
// min(threads, units) threads and a call uses at most as many threads as its
// workspace holds (so a workspace sized with fewer threads still works).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>
#include <string_view>

#if defined(_OPENMP)
#include <omp.h>
#endif

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

namespace kvtrim::detail {

/// Threads a CPU stage may use (1 without OpenMP).
inline std::int64_t cpu_threads() {
#if defined(_OPENMP)
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// Threads for `units` independent units when each thread needs `bytes_per_thread`
/// of a workspace of `available` bytes (at least 1).
inline std::int64_t cpu_threads_for(std::int64_t units, std::size_t bytes_per_thread, std::size_t available) {
  std::int64_t threads = std::min(cpu_threads(), std::max<std::int64_t>(units, 1));
  if (bytes_per_thread > 0)
    threads = std::min<std::int64_t>(threads, static_cast<std::int64_t>(available / bytes_per_thread));
  return std::max<std::int64_t>(threads, 1);
}

/// Runs body(unit, thread) for unit in [0, units) on up to `threads` threads
/// (thread ∈ [0, threads): the index of the caller's per-thread scratch). Each
/// unit runs whole on one thread. If bodies throw, the exception of the lowest
/// unit is rethrown after the loop (the same one whatever the thread count).
template <class Body>
void cpu_parallel_for(std::int64_t units, std::int64_t threads, Body&& body) {
  if (threads <= 1 || units <= 1) {
    for (std::int64_t unit = 0; unit < units; ++unit) body(unit, std::int64_t{0});
    return;
  }
#if defined(_OPENMP)
  std::exception_ptr error;
  std::int64_t error_unit = units;
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads))
  for (std::int64_t unit = 0; unit < units; ++unit) {
    try {
      body(unit, static_cast<std::int64_t>(omp_get_thread_num()));
    } catch (...) {
#pragma omp critical(kvtrim_cpu_parallel_for_error)
      if (unit < error_unit) {
        error_unit = unit;
        error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  for (std::int64_t unit = 0; unit < units; ++unit) body(unit, std::int64_t{0});
#endif
}

}  // namespace kvtrim::detail
