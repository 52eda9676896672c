// kvtrim_link_cpp, TU b: the same scheme's compress, and attend.
#include "link/link_cpp.hpp"

namespace link_test {
float compress_and_attend_in_b() {
  auto cache = streaming::make_cache(shape, batch, std::int64_t{16}, streaming::codec::config{});
  compress_ones<streaming>(cache);
  std::vector<float> query(batch * shape.q_heads * shape.head_dim, 0.5f), out(query.size());
  const std::array<std::int64_t, 3> extents{batch, shape.q_heads, shape.head_dim};
  streaming::attend(kt::make_view(query.data(), extents), cache.view(), kt::make_view(out.data(), extents),
                    kt::workspace{});
  return out[0];
}
}  // namespace link_test
