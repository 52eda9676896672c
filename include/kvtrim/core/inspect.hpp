// kvtrim/core/inspect.hpp — reading a host cache's contents through the public
// API: how many tokens a head holds and each one's position in its sequence.
//
// Engines that keep their own caches, re-rotate RoPE, or report which tokens
// survived (kvpress's masked_key_indices) read positions here; the layout keeps
// them per slot (docs/composition.md §1).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvtrim/core/error.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim {

/// Positions of the tokens head (b, kv head h) holds, in the order attention
/// reads them (host views; checks the view and the indices first).
template <class View>
  requires std::is_same_v<typename View::space, host_space>
std::vector<std::int32_t> head_positions(const View& cache, std::int64_t b, std::int64_t h) {
  constexpr std::string_view function = "kvtrim::head_positions";
  using layout_type = typename View::layout_policy;
  layout_type::validate(function, cache);
  if (b < 0 || b >= cache.batch)
    detail::fail(function, "b", detail::cat("a sequence in [0, ", cache.batch, ")"), std::to_string(b));
  if (h < 0 || h >= cache.shape.kv_heads)
    detail::fail(function, "h", detail::cat("a kv head in [0, ", cache.shape.kv_heads, ")"), std::to_string(h));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(cache.head_length(b, h)));
  for (std::size_t i = 0; i < positions.size(); ++i)
    positions[i] = cache.positions.slot_position[cache.slot(b, h, static_cast<std::int64_t>(i))];
  return positions;
}

/// The position head (b, h)'s next appended token gets.
template <class View>
  requires std::is_same_v<typename View::space, host_space>
std::int64_t next_position(const View& cache, std::int64_t b, std::int64_t h) {
  const std::int64_t head = b * cache.shape.kv_heads + h;
  if (b < 0 || b >= cache.batch || h < 0 || h >= cache.shape.kv_heads)
    detail::fail("kvtrim::next_position", "b, h", detail::cat("a head in [0, ", cache.batch, ") × [0, ", cache.shape.kv_heads, ")"),
                 detail::cat(b, ", ", h));
  return cache.positions.next_position[head];
}

}  // namespace kvtrim
