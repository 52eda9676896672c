// kvtrim/core/keep.hpp — how much of a head's context to keep.
//
// Budgets speak in either a fraction of the tokens (keep_ratio) or a number of
// tokens (keep_tokens). Ratios round down, as kvpress's `int(T * (1 - cr))`
// does, but never below one token: attention over an empty head is undefined.
// A budget larger than the context keeps the whole context.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

#include "kvtrim/core/error.hpp"

namespace kvtrim {

/// Keep this fraction of each head's tokens, 0 < value ≤ 1.
struct keep_ratio {
  double value = 1.0;
};
/// Keep this many tokens per head, value ≥ 1.
struct keep_tokens {
  std::int64_t value = 0;
};
using keep_amount = std::variant<keep_ratio, keep_tokens>;

namespace detail {

inline void check_keep(std::string_view function, std::string_view argument, const keep_amount& keep) {
  if (const auto* ratio = std::get_if<keep_ratio>(&keep)) {
    if (!(ratio->value > 0.0 && ratio->value <= 1.0))
      fail(function, argument, "a keep ratio in (0, 1]", std::to_string(ratio->value));
  } else if (std::get<keep_tokens>(keep).value < 1) {
    fail(function, argument, "a token count of at least 1", std::to_string(std::get<keep_tokens>(keep).value));
  }
}

/// Tokens one head keeps out of `tokens` (0 when the head is empty).
inline std::int64_t resolve_keep(const keep_amount& keep, std::int64_t tokens) {
  if (tokens <= 0) return 0;
  std::int64_t count = 0;
  if (const auto* ratio = std::get_if<keep_ratio>(&keep))
    count = static_cast<std::int64_t>(std::floor(ratio->value * static_cast<double>(tokens)));
  else
    count = std::get<keep_tokens>(keep).value;
  if (count < 1) count = 1;
  return count < tokens ? count : tokens;
}

}  // namespace detail
}  // namespace kvtrim
