// kvtrim/layout/detail/positions.hpp — each stored token's position in its
// sequence, kept by every layout (docs/composition.md §1).
//
// Compression drops tokens, so a slot's index no longer says where its token
// was: engines need the original positions (RoPE re-rotation, kvpress's masked
// indices, their own caches), pre-RoPE codecs rotate keys by them, and
// decode-time eviction reports them. The layout is their one owner:
//   slot_position[slot]   int32, indexed like the codec's storage (slot = view.slot(b, h, i))
//   next_position[head]   int64, the position the head's next appended token gets
// Plain pointers into the cache's memory, so views stay trivially copyable.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

struct position_table {
  std::int32_t* slot_position = nullptr;  // [slots]
  std::int64_t* next_position = nullptr;  // [heads]

  /// Largest position a slot can record (positions are int32, as in every engine's position ids).
  static constexpr std::int64_t max_position = std::numeric_limits<std::int32_t>::max();

  static position_table carve(workspace_carver& carver, std::int64_t slots, std::int64_t heads) {
    position_table table;
    table.slot_position = carver.take<std::int32_t>(slots);
    table.next_position = carver.take<std::int64_t>(heads);
    return table;
  }
  /// Every head starts at position 0 (host memory only).
  void clear(std::int64_t heads) const {
    for (std::int64_t head = 0; head < heads; ++head) next_position[head] = 0;
  }
  bool bound() const { return slot_position != nullptr && next_position != nullptr; }
};

static_assert(std::is_trivially_copyable_v<position_table>);

}  // namespace kvtrim::detail
