// kvtrim/budget/head_shard.hpp — which of a layer's kv heads one rank holds
// when tensor parallelism shards them (docs/tensor-parallel.md): the sharded
// Ada-KV budget, scheme::compress with a communicator and the sharded eviction
// step (eviction/sharded.hpp) take it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/core/error.hpp"

namespace kvtrim::budget {

/// Which of a layer's kv heads one rank holds, for the sharded budget. The
/// rank's scores are [batch, heads, tokens]; its head j is the layer's head
/// first_head + j. Every rank passes the same total_heads, config, batch and
/// tokens. `counted` is false on a rank whose heads are replicas of heads
/// another rank counts (engines replicate kv heads when ranks outnumber them):
/// it sends zeros and still receives the totals, so it computes the same counts.
/// The counted shards together must hold each of the total_heads exactly once.
struct head_shard {
  std::int64_t first_head = 0;   ///< the layer's index of this rank's first kv head
  std::int64_t total_heads = 0;  ///< kv heads of the layer, all ranks together (H)
  bool counted = true;           ///< false: replicas of heads counted elsewhere

  void validate(std::string_view function, std::int64_t local_heads) const {
    if (total_heads < 1)
      detail::fail(function, "shard.total_heads", "at least one kv head", std::to_string(total_heads));
    if (first_head < 0 || local_heads > total_heads - first_head)
      detail::fail(function, "shard.first_head",
                   detail::cat("a first head with first_head + ", local_heads, " local heads ≤ total_heads = ",
                               total_heads),
                   std::to_string(first_head));
  }
};

}  // namespace kvtrim::budget
