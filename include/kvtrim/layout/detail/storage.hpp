// kvtrim/layout/detail/storage.hpp — carving a layout's codec storage out of
// the cache's memory, shared by the layouts whose metadata follows it in the
// same allocation (paged, flat).
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

}  // namespace kvtrim::detail
