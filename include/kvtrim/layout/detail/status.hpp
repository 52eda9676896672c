// kvtrim/layout/detail/status.hpp — how a device layout reports a failure it
// finds on the device (docs/composition.md §6), shared by the ragged layouts.
//
// On the CPU, paged and flat check the pool before writing and throw. On the
// GPU the numbers those checks need (free pages, head lengths) live in device
// memory, and reading them on the host would synchronise the stream (and break
// CUDA-graph capture). So a device call's planning kernel makes the same check
// on the device; when it fails, the call writes nothing (the cache keeps every
// byte) and the kernel fills these words in the cache's own memory instead:
//   words[code]      what failed (0: nothing since the last check)
//   words[needed]    what the call needed (pages or slots)
//   words[available] what there was (free pages, free slots, or the head's next position)
//   words[count]     tokens per head the call asked for (compact: tokens selected)
//   words[target]    the one head of append_head, or −1 (every head)
//   words[pool]      the pool's size (pages or slots)
//   words[unit]      its unit (page_size, or the codec's slot run)
//   words[call_failed]  1 when the latest call failed (its write kernels then do nothing)
//   words[repack]    layout::flat: runs the latest append's repack needs (0: no repack)
// The first failure since the last check is kept (a later one does not
// overwrite it). kvtrim::check_status(cache, stream) (backend/cuda/writes.cuh)
// synchronises, clears the words and throws the very kvtrim::error the CPU
// would have thrown: raise_layout_status below builds it.
#pragma once

#include <cstdint>
#include <string>

#include "kvtrim/core/error.hpp"

namespace kvtrim::detail {

struct layout_status {
  static constexpr int words = 9;
  enum word : int {
    code = 0, needed = 1, available = 2, count = 3, target = 4, pool = 5, unit = 6, call_failed = 7,
    repack = 8,  // layout::flat: slots the latest append's repack needs (0: none), planning → repack kernel
  };
  enum failure : std::int64_t {
    none = 0,
    paged_compact_pool = 1,    // layout::paged::compact: the selection needs more pages than the pool
    paged_append_pool = 2,     // layout::paged::append(_head): too few free pages
    flat_compact_buffer = 3,   // layout::flat::compact: the selection needs more slots than the buffer
    flat_append_buffer = 4,    // layout::flat::append(_head): too few free slots
    position_overflow = 5,     // append: positions would pass 2^31 − 1
    // 6–8 are taken on main (non-finite input, input overflowing storage, Ada-KV over budget).
    shared_paged_compact_pool = 9,  // layout::shared_paged::compact: the selection needs more pages than the pool
    shared_paged_append_pool = 10,  // layout::shared_paged::append: too few free pages
  };
};

/// Throws the kvtrim::error a CPU call would have thrown for the failure
/// recorded in `words` (a copy of a device cache's status words); returns
/// when no failure is recorded.
inline void raise_layout_status(const std::int64_t (&words)[layout_status::words]) {
  using s = layout_status;
  const std::int64_t count = words[s::count];
  const char* heads = words[s::target] < 0 ? " per head" : " in one head";
  switch (words[s::code]) {
    case s::none: return;
    case s::paged_compact_pool:
      fail("kvtrim::layout::paged::compact", "cache",
           cat("a pool of at least ", words[s::needed], " pages of ", words[s::unit], " tokens for this selection (",
               count, " tokens)"),
           cat(words[s::pool], " pages (pool exhausted)"));
    case s::paged_append_pool:
      fail("kvtrim::layout::paged::append", "cache",
           cat("a pool with ", words[s::needed], " free pages for ", count, " more tokens", heads),
           cat(words[s::available], " free of ", words[s::pool], " (pool exhausted)"));
    case s::flat_compact_buffer:
      fail("kvtrim::layout::flat::compact", "cache",
           cat("at least ", words[s::needed], " slots for this selection (", count, " tokens",
               words[s::unit] > 1 ? cat(" in whole runs of ", words[s::unit]) : std::string(), ")"),
           cat(words[s::pool], " slots (buffer exhausted)"));
    case s::flat_append_buffer:
      fail("kvtrim::layout::flat::append", "cache",
           cat("a buffer with room for ", count, " more tokens", heads, " (", words[s::needed], " slots in all)"),
           cat(words[s::available], " free of ", words[s::pool], " (buffer exhausted)"));
    case s::shared_paged_compact_pool:
      fail("kvtrim::layout::shared_paged::compact", "cache",
           cat("a pool of at least ", words[s::needed], " pages of ", words[s::unit], " tokens for this selection (",
               count, " tokens)"),
           cat(words[s::pool], " pages (pool exhausted)"));
    case s::shared_paged_append_pool:
      fail("kvtrim::layout::shared_paged::append", "cache",
           cat("a pool with ", words[s::needed], " free pages for ", count, " more tokens per sequence"),
           cat(words[s::available], " free of ", words[s::pool], " (pool exhausted)"));
    case s::position_overflow:
      fail("kvtrim::scheme::append", "new_keys",
           cat(count, " tokens whose positions fit in 32 bits after head ", words[s::target], "'s position ",
               words[s::available]),
           cat("positions up to ", words[s::available] + count - 1));
    default:
      fail("kvtrim::check_status", "cache.status", "a failure code in [0, 5] or [9, 10] (the cache's status words)",
           std::to_string(words[s::code]));
  }
}

}  // namespace kvtrim::detail
