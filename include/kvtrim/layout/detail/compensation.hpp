// kvtrim/layout/detail/compensation.hpp — per-head metadata for a compensation
// token (RazorAttention), shared by the ragged layouts (paged, flat).
//
// A compressed head may hold one token that stands for many dropped ones: its
// key and value are the means of the dropped keys and values, and its logit
// gets + ln(N_dropped). The layout stores that token like any other (at a
// logical index, usually S, right after the sinks) and remembers, per
// flattened head (b·kv_heads + h), which index it is and its bias. Decode
// attention asks the view for `logit_bias(b, h, i)` and adds it after the
// 1/√D scale:  exp(q·k̂/√D + ln N_d) = N_d · exp(q·k̂/√D), exactly the weight of
// N_d copies of the mean token (added before the scale it would weigh only
// N_d^{1/√D} copies).
//
// Plain pointers into the cache's own memory, so a view stays trivially
// copyable and a CUDA backend can keep the table in device memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

struct compensation_table {
  std::int32_t* index = nullptr;  // [heads]: logical index of the head's compensation token, −1 when none
  float* bias = nullptr;          // [heads]: its logit bias (ln N_dropped)

  KVTRIM_HOST_DEVICE float logit_bias(std::int64_t head, std::int64_t token) const {
    return index[head] == token ? bias[head] : 0.0f;
  }
  /// The table for `heads` heads, carved from a cache's memory (null pointers in the sizing pass).
  static compensation_table carve(workspace_carver& carver, std::int64_t heads) {
    compensation_table table;
    table.index = carver.take<std::int32_t>(heads);
    table.bias = carver.take<float>(heads);
    return table;
  }
  /// Forgets every head's compensation token (host memory only).
  void clear(std::int64_t heads) const {
    for (std::int64_t head = 0; head < heads; ++head) {
      index[head] = -1;
      bias[head] = 0.0f;
    }
  }
};

static_assert(std::is_trivially_copyable_v<compensation_table>);

}  // namespace kvtrim::detail
