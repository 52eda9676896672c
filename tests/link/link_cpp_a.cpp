// kvtrim_link_cpp, TU a (with main): see CMakeLists.txt.
#include "link/link_cpp.hpp"

#include <cstdio>

namespace link_test {
std::int64_t compress_in_a() {
  auto cache = streaming::make_cache(shape, batch, std::int64_t{16}, streaming::codec::config{});
  compress_ones<streaming>(cache);
  return *cache.view().length;
}
}  // namespace link_test

int main() {
  const std::int64_t kept = link_test::compress_in_a();
  const float out = link_test::compress_and_attend_in_b();
  const bool ok = kept == link_test::keep && out > 0.999f && out < 1.001f;
  std::printf("two C++ TUs: kept %lld, out %g: %s\n", static_cast<long long>(kept), out, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
