// kvtrim_link_cuda, TU a (with main): see CMakeLists.txt.
#include "link/link_cuda.cuh"

#include <cstdio>

namespace link_test {
std::int64_t fp16_in_a() { return compress_and_append<kt::codec::fp16, kt::half>(); }
}  // namespace link_test

int main() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("two CUDA TUs: linked; run skipped (no CUDA device: %s)\n", cudaGetErrorString(status));
    return 77;  // SKIP_RETURN_CODE
  }
  const std::int64_t expected = link_test::keep + link_test::appended;
  const std::int64_t a = link_test::fp16_in_a(), b = link_test::fp16_in_b(), c = link_test::bf16_in_b();
  const bool ok = a == expected && b == expected && c == expected;
  std::printf("two CUDA TUs: %lld %lld %lld tokens per head (expected %lld): %s\n", static_cast<long long>(a),
              static_cast<long long>(b), static_cast<long long>(c), static_cast<long long>(expected),
              ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
