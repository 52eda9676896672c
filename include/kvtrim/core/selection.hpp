// kvtrim/core/selection.hpp — which tokens each head keeps.
//
// The hand-off between the Budget/selection stages and Layout::compact: a CSR
// list over flattened heads (b·kv_heads + h). Head `i` keeps tokens
// `tokens[offsets[i] .. offsets[i+1])`, strictly increasing. Lives in the
// backend's memory space (it is written into the caller's workspace).
#pragma once

#include <cstdint>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim {

template <MemorySpace Space>
struct selection_view {
  const std::int64_t* offsets = nullptr;  // [heads + 1]
  const std::int32_t* tokens = nullptr;   // [offsets[heads]]
  std::int64_t heads = 0;                 // batch · kv_heads

  KVTRIM_HOST_DEVICE std::int64_t count(std::int64_t head) const { return offsets[head + 1] - offsets[head]; }
};

namespace detail {
/// Compensation tokens a scorer computes before compaction (RazorAttention), per
/// flattened head, in the backend's memory (carved from the compress workspace).
struct compensation_rows {
  std::int32_t* index = nullptr;     // [heads]: logical index of the kept placeholder it replaces, −1 none
  float* keys = nullptr;             // [heads, head_dim]
  float* values = nullptr;           // [heads, head_dim]
  float* bias = nullptr;             // [heads]: its logit bias (ln N_dropped)
  std::int64_t* position = nullptr;  // [heads]: its position (the last dropped token's)
};
/// A right-padded batch's per-sequence values on backend::cuda
/// (compress_options::sequence_lengths), device memory the compress fills on its
/// stream before compaction (the lengths themselves are host memory: the device
/// cannot read them). All null: every sequence has all the keys' tokens.
struct sequence_table {
  std::int64_t* length = nullptr;         // [B]: T_b (the finiteness scan reads tokens [0, T_b))
  std::int64_t* next_position = nullptr;  // [B]: start + T_b, every head's next position after compaction
  std::int64_t* head_budget = nullptr;    // [B]: the budget's per-head k of T_b (a device refusal's message)

  KVTRIM_HOST_DEVICE bool given() const { return length != nullptr; }
};

/// The device finiteness scan's per-sequence bounds in a padded batch (device
/// memory, [B]; null: every token): keys and values read tokens [0, tokens[b]),
/// the queries [0, queries[b]) (H2O's per-token queries; a window is never padded).
struct finite_lengths {
  const std::int64_t* tokens = nullptr;
  const std::int64_t* queries = nullptr;
};
}  // namespace detail

/// What Layout::compact needs besides the rows and the selection.
struct compact_args {
  std::int64_t start_position = 0;  // position of prefill token 0
  std::int64_t uniform_keep = -1;   // tokens every head keeps when the budget is uniform, else −1
  const detail::compensation_rows* compensation = nullptr;  // null: no compensation tokens
  /// A budget's refusal found on the device (backend memory; null: none). Ada-KV's
  /// paper form cannot hold a head that protects more tokens than its budget
  /// `refused_budget`: the word is (flattened head · 2^32 + its protected tokens)
  /// of the first such head, ~0 when none. Compaction's planning then records the
  /// CPU's error in the cache's status words and writes nothing.
  const unsigned long long* budget_refusal = nullptr;
  std::int64_t refused_budget = 0;
  /// A right-padded batch's prompt lengths (host memory, one per sequence; null: every
  /// sequence has all the keys' tokens): each head's next position is start + its T_b
  /// (compress_options::sequence_lengths). backend::cpu reads these; backend::cuda's
  /// kernels read `sequences` (the same values, filled on the device by the compress).
  const std::int64_t* sequence_lengths = nullptr;
  detail::sequence_table sequences{};
};

}  // namespace kvtrim
