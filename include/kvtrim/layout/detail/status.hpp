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
//   words[invalid_input]  set during a call by the device's finiteness check of its inputs
//                    (backend/cuda/writes.cuh, scan_finite): ≠ 0 names the first non-finite
//                    element (its last block records the failure); the call's planning kernel
//                    then writes nothing and clears it
//   words[scan_blocks]  the scan's blocks done so far (0 between calls)
// A non-finite input (the CPU's NaN/Inf rule, docs/composition.md §4) is recorded as
//   code = non_finite_input or input_overflows_storage, needed = sequence,
//   available = head, count = token, target = channel, pool = the value's float bits,
//   unit = the entry (bits 0–3), the argument (bits 4–7) and the storage (bits 8–11),
// which is all raise_layout_status needs to rebuild the CPU's message. A budget's
// refusal (budget::adaptive's paper form) is recorded by compaction's planning as
//   code = adaptive_over_budget, needed = the head's protected tokens,
//   available = the per-head budget, count = sequence, target = kv head,
//   unit = the sequence's T_b in a padded batch (compress_options::sequence_lengths), else 0.
// The first failure since the last check is kept (a later one does not
// overwrite it). kvtrim::check_status(cache, stream) (backend/cuda/writes.cuh)
// synchronises, clears the words and throws the very kvtrim::error the CPU
// would have thrown: raise_layout_status below builds it.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "kvtrim/core/error.hpp"

namespace kvtrim::detail {

struct layout_status {
  static constexpr int words = 11;
  enum word : int {
    code = 0, needed = 1, available = 2, count = 3, target = 4, pool = 5, unit = 6, call_failed = 7,
    repack = 8,  // layout::flat: slots the latest append's repack needs (0: none), planning → repack kernel
    invalid_input = 9,  // the finiteness scan → the planning kernel of the same call (0: every input finite)
    scan_blocks = 10,   // blocks of the finiteness scan done (its last block records; back to 0 after)
  };
  enum failure : std::int64_t {
    none = 0,
    paged_compact_pool = 1,    // layout::paged::compact: the selection needs more pages than the pool
    paged_append_pool = 2,     // layout::paged::append(_head): too few free pages
    flat_compact_buffer = 3,   // layout::flat::compact: the selection needs more slots than the buffer
    flat_append_buffer = 4,    // layout::flat::append(_head): too few free slots
    position_overflow = 5,     // append: positions would pass 2^31 − 1
    non_finite_input = 6,      // compress / append: a key, value or window query is NaN or ±Inf
    input_overflows_storage = 7,  // a finite input that rounds to ±Inf in the cache's fp16/bf16 storage
    adaptive_over_budget = 8,  // budget::adaptive (paper form): a head protects more tokens than its budget
    shared_paged_compact_pool = 9,  // layout::shared_paged::compact: the selection needs more pages than the pool
    shared_paged_append_pool = 10,  // layout::shared_paged::append: too few free pages
    truncate_refused = 11,  // scheme::truncate: needed = the limit, count = the drop, target = sequence,
                            // available = kv head, unit = the rule (truncate_rule below)
  };
  /// Which limit a refused truncate passed (words[unit] of truncate_refused).
  enum truncate_rule : int { negative_drop = 0, past_head_length = 1, past_codec_horizon = 2 };
  /// The entries and arguments a non-finite input is reported for (unit's fields).
  enum entry : int { compress = 0, append = 1, append_unchecked = 2, append_head = 3 };
  enum input : int { keys = 0, values = 1, window_queries = 2 };
  enum storage : int { any = 0, fp16 = 1, bf16 = 2 };
  static constexpr std::int64_t pack_input(int entry_id, int input_id, int storage_id) {
    return entry_id | input_id << 4 | storage_id << 8;
  }
};

/// scheme::truncate's refusal, worded once for the CPU's check and the device's
/// status words: `rule` (layout_status::truncate_rule) says which limit sequence
/// b's drop count passed in kv head h (`limit`: the head's length, or the tokens
/// its codec can forget exactly).
[[noreturn]] inline void fail_truncate(std::int64_t rule, std::int64_t b, std::int64_t h, std::int64_t drop,
                                       std::int64_t limit) {
  constexpr const char* function = "kvtrim::scheme::truncate";
  if (rule == 0) fail(function, "drop", "a count ≥ 0 of tokens to remove per sequence", cat(drop, " for sequence ", b));
  if (rule == 1)
    fail(function, "drop", cat("at most the ", limit, " tokens kv head ", h, " of sequence ", b, " holds"),
         cat(drop, " for sequence ", b));
  fail(function, "drop",
       cat("at most the ", limit, " newest tokens the codec can forget exactly in kv head ", h, " of sequence ", b,
           " (tokens already folded into a quantized key group or a refreshed basis cannot be taken back; "
           "docs/composition.md §8)"),
       cat(drop, " for sequence ", b));
}

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
    case s::non_finite_input:
    case s::input_overflows_storage: {
      const std::int64_t unit = words[s::unit];
      const int entry_id = static_cast<int>(unit & 15), input_id = static_cast<int>(unit >> 4 & 15),
                storage_id = static_cast<int>(unit >> 8 & 15);
      static constexpr const char* entries[] = {"kvtrim::scheme::compress", "kvtrim::scheme::append",
                                                "kvtrim::scheme::append_unchecked", "kvtrim::scheme::append_head"};
      const bool appended = entry_id != s::compress;
      static constexpr const char* compress_inputs[] = {"keys", "values", "window_queries"};
      static constexpr const char* append_inputs[] = {"new_keys", "new_values"};
      if (entry_id > 3 || input_id > (entry_id == s::compress ? 2 : 1) || storage_id > 2) break;
      const auto bits = static_cast<std::uint32_t>(words[s::pool]);
      float x;
      std::memcpy(&x, &bits, sizeof x);
      const std::string where = cat(x, " at sequence ", words[s::needed], ", ",
                                    input_id == s::window_queries ? "query head" : "kv head", " ", words[s::available],
                                    ", token ", words[s::count], ", channel ", words[s::target]);
      const char* argument = appended ? append_inputs[input_id] : compress_inputs[input_id];
      if (words[s::code] == s::non_finite_input)
        fail(entries[entry_id], argument, "finite values (NaN and Inf are refused for every codec)", where);
      // Storage 1 = fp16, 2 = bf16: the CPU's wording, with std::numeric_limits<Stored>::max().
      fail(entries[entry_id], argument,
           cat("finite values that stay finite in the cache's ", storage_id == s::fp16 ? "fp16" : "bf16",
               " storage (|x| below ", storage_id == s::fp16 ? 65504.0 : 255.0 * 0x1p120, " after rounding)"),
           where);
    }
    case s::truncate_refused:
      if (words[s::unit] < 0 || words[s::unit] > 2) break;
      fail_truncate(words[s::unit], words[s::target], words[s::available], count, words[s::needed]);
    case s::adaptive_over_budget:
      // A padded batch (unit = T_b): the CPU's message ends naming the sequence refused.
      fail("kvtrim::budget::adaptive", "config.budget.keep",
           cat("a per-head budget of at least the ", words[s::needed],
               " tokens the scorer protects (scored +inf) in kv head ", words[s::target]),
           cat(words[s::available], " tokens",
               words[s::unit] > 0 ? cat(" (sequence ", count, " of the padded batch: its ", words[s::unit],
                                        " tokens alone)")
                                  : std::string{}));
    default:
      break;
  }
  fail("kvtrim::check_status", "cache.status", "a failure code in [0, 11] (the cache's status words)",
       std::to_string(words[s::code]));
}

}  // namespace kvtrim::detail
