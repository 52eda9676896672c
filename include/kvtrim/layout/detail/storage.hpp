// kvtrim/layout/detail/storage.hpp — carving a layout's codec storage out of
// the cache's memory, shared by the layouts whose metadata follows it in the
// same allocation (paged, flat).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

/// The codec's storage for `slots` tokens over `heads` heads, taken first from
/// `carver`; an empty storage in the sizing pass (no memory yet).
template <class CodecT, class Space>
typename CodecT::template storage<Space> carve_codec_storage(workspace_carver& carver,
                                                             const typename CodecT::config& codec_config,
                                                             std::int64_t slots, std::int64_t heads,
                                                             std::int64_t head_dim) {
  const std::size_t bytes = CodecT::storage_bytes(codec_config, slots, heads, head_dim);
  std::byte* memory = carver.take<std::byte>(static_cast<std::int64_t>(bytes));
  if (memory == nullptr) return {};
  return CodecT::template bind<Space>(codec_config, memory, slots, heads, head_dim);
}

}  // namespace kvtrim::detail
