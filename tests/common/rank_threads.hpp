// tests/common/rank_threads.hpp — R simulated ranks as R threads (issue 17's tests).
#pragma once

#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace kvtrim::testing {

/// Runs body(rank) on one thread per rank and joins them; returns each rank's
/// exception (null: it returned), so a test can check that every rank threw.
template <class Body>
std::vector<std::exception_ptr> run_ranks(int ranks, Body&& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

/// The message of an exception_ptr (std::exception's what()).
inline std::string message_of(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "(not a std::exception)";
  }
}

}  // namespace kvtrim::testing
