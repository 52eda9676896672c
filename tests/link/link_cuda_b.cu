// kvtrim_link_cuda, TU b: the same scheme as TU a, and a second combination.
#include "link/link_cuda.cuh"

namespace link_test {
std::int64_t fp16_in_b() { return compress_and_append<kt::codec::fp16, kt::half>(); }
std::int64_t bf16_in_b() { return compress_and_append<kt::codec::bf16, float>(); }
low_rank_fit_seen low_rank_in_b() { return low_rank_sequence_fit(); }
}  // namespace link_test
