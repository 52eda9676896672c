// kvtrim/core/error.hpp — the one exception type kvtrim throws, and the helpers
// that build its message.
//
// Every message has the same four parts so a user can act on it without reading
// kvtrim's code:  "<function>: argument '<name>': expected <what>, got <what came>".
// Checks are written as plain `if (!ok) detail::fail(...)`: the message is only
// formatted on the failure path, so checks cost nothing on hot calls.
#pragma once

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

}  // namespace detail
}  // namespace kvtrim
