// kvtrim_link_cuda, TU b: the same scheme as TU a, and a second combination.
#include "link/link_cuda.cuh"

namespace link_test {
std::int64_t fp16_in_b() { return compress_and_append<kt::codec::fp16, kt::half>(); }
std::int64_t bf16_in_b() { return compress_and_append<kt::codec::bf16, float>(); }
}  // namespace link_test
