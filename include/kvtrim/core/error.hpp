// kvtrim/core/error.hpp — the one exception type kvtrim throws, and the helpers
// that build its message.
//
// Every message has the same four parts so a user can act on it without reading
// kvtrim's code:  "<function>: argument '<name>': expected <what>, got <what came>".
// Checks are written as plain `if (!ok) detail::fail(...)`: the message is only
// formatted on the failure path, so checks cost nothing on hot calls.
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kvtrim {

/// Thrown for every invalid input and every failed backend call.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Concatenates anything streamable into one string (used only on error paths
/// and for printing tables).
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws kvtrim::error "<function>: argument '<argument>': expected <expected>, got <got>".
[[noreturn]] inline void fail(std::string_view function, std::string_view argument,
                              std::string_view expected, std::string_view got) {
  throw error(cat(function, ": argument '", argument, "': expected ", expected, ", got ", got));
}

/// Throws kvtrim::error for a failure that is not about one argument (a backend call).
[[noreturn]] inline void fail_call(std::string_view function, std::string_view call,
                                   std::string_view reason) {
  throw error(cat(function, ": ", call, " failed: ", reason));
}

/// a · b for sizes computed from inputs (both ≥ 0); throws naming `argument`
/// instead of overflowing (UBSan: signed overflow) when the product passes 2^63 − 1.
inline std::int64_t checked_mul(std::string_view function, std::string_view argument, std::int64_t a,
                                std::int64_t b) {
  std::int64_t product = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &product))
    fail(function, argument, "sizes whose product fits in 64 bits", cat(a, " × ", b));
  return product;
}
/// a + b for sizes (both ≥ 0), checked like checked_mul.
inline std::int64_t checked_add(std::string_view function, std::string_view argument, std::int64_t a,
                                std::int64_t b) {
  std::int64_t sum = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &sum))
    fail(function, argument, "sizes whose sum fits in 64 bits", cat(a, " + ", b));
  return sum;
}

}  // namespace detail
}  // namespace kvtrim
