// kvtrim/core/shape.hpp — the attention shape of one layer of the model.
//
// Grouped-query attention (GQA): q_heads query heads share kv_heads key/value
// heads; query head j reads kv head j / group_size (consecutive groups, as in
// Hugging Face's repeat_kv and every engine we know). MHA is group 1, MQA is
// kv_heads = 1.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvtrim/core/error.hpp"

namespace kvtrim {

/// Largest head dimension kvtrim accepts (the CPU reference keeps a few rows of
/// this size on the stack; real models use 64 to 256).
inline constexpr std::int64_t max_head_dim = 1024;

struct model_shape {
  std::int64_t q_heads = 0;
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;

  constexpr std::int64_t group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }

  /// Throws kvtrim::error (naming `function`) unless the shape is usable.
  void validate(std::string_view function) const {
    if (head_dim <= 0 || head_dim > max_head_dim)
      detail::fail(function, "shape.head_dim", detail::cat("a head dimension in [1, ", max_head_dim, "]"),
                   std::to_string(head_dim));
    if (kv_heads <= 0) detail::fail(function, "shape.kv_heads", "at least one kv head", std::to_string(kv_heads));
    if (q_heads <= 0) detail::fail(function, "shape.q_heads", "at least one query head", std::to_string(q_heads));
    if (q_heads % kv_heads != 0)
      detail::fail(function, "shape.q_heads", detail::cat("a multiple of kv_heads = ", kv_heads),
                   std::to_string(q_heads));
  }

  friend constexpr bool operator==(const model_shape&, const model_shape&) = default;
};

}  // namespace kvtrim
