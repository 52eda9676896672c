// kvtrim/layout/detail/storage.hpp — carving a layout's codec storage out of
// the cache's memory, shared by every layout (its metadata follows the storage
// in the same allocation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <numeric>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

/// The codec's storage for `slots` tokens over `heads` heads, bound with slot
/// run `slot_run` (docs/composition.md §3: U divides codec::slot_alignment),
/// taken first from `carver`; an empty storage in the sizing pass (no memory yet).
template <class CodecT, class Space>
typename CodecT::template storage<Space> carve_codec_storage(workspace_carver& carver,
                                                             const typename CodecT::config& codec_config,
                                                             std::int64_t slots, std::int64_t heads,
                                                             std::int64_t head_dim, std::int64_t slot_run) {
  const std::size_t bytes = CodecT::storage_bytes(codec_config, slots, heads, head_dim, slot_run);
  std::byte* memory = carver.take<std::byte>(static_cast<std::int64_t>(bytes));
  if (memory == nullptr) return {};
  return CodecT::template bind<Space>(codec_config, memory, slots, heads, head_dim, slot_run);
}

/// Slots a codec's storage holds (every codec records it).
template <class Storage>
std::int64_t storage_slots(const Storage& store) {
  return store.slots;
}
/// The slot run the storage was bound with (1 for codecs without runs).
template <class Storage>
std::int64_t storage_slot_run(const Storage& store) {
  return store.slot_run;
}

}  // namespace kvtrim::detail
