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

}  // namespace kvtrim
