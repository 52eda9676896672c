// kvtrim/layout/detail/storage.hpp — carving a layout's codec storage out of
// the cache's memory, shared by the layouts whose metadata follows it in the
// same allocation (paged, flat).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

/// The codec's storage for `slots` tokens over `heads` heads, taken first from
/// `carver`; an empty storage in the sizing pass (no memory yet).
/// `slot_run` is the run length the layout guarantees (docs/composition.md §3).
template <class CodecT, class Space>
typename CodecT::template storage<Space> carve_codec_storage(workspace_carver& carver,
                                                             const typename CodecT::config& codec_config,
                                                             std::int64_t slots, std::int64_t heads,
                                                             std::int64_t head_dim, std::int64_t slot_run) {
  if constexpr (requires { CodecT::storage_bytes(codec_config, slots, heads, head_dim, slot_run); }) {
    const std::size_t bytes = CodecT::storage_bytes(codec_config, slots, heads, head_dim, slot_run);
    std::byte* memory = carver.take<std::byte>(static_cast<std::int64_t>(bytes));
    if (memory == nullptr) return {};
    return CodecT::template bind<Space>(codec_config, memory, slots, heads, head_dim, slot_run);
  } else {  // TEMPORARY until the codecs take slot runs (merge of branch codecs)
    const std::size_t bytes = CodecT::storage_bytes(codec_config, slots, heads, head_dim);
    std::byte* memory = carver.take<std::byte>(static_cast<std::int64_t>(bytes));
    if (memory == nullptr) return {};
    return CodecT::template bind<Space>(codec_config, memory, slots, heads, head_dim);
  }
}

/// Slots a codec's storage holds (every codec records it).
template <class Storage>
std::int64_t storage_slots(const Storage& store) {
  if constexpr (requires { store.slots; })
    return store.slots;
  else  // TEMPORARY until every codec records its slots (merge of branch codecs)
    return std::numeric_limits<std::int64_t>::max();
}
/// The slot run the storage was bound with (1 for codecs without group state).
template <class Storage>
std::int64_t storage_slot_run(const Storage& store) {
  if constexpr (requires { store.slot_run; })
    return store.slot_run;
  else
    return 1;
}

}  // namespace kvtrim::detail
