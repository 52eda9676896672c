// kvtrim_link_cuda, TU a (with main): see CMakeLists.txt.
#include "link/link_cuda.cuh"

#include <cstdio>

namespace link_test {
std::int64_t fp16_in_a() { return compress_and_append<kt::codec::fp16, kt::half>(); }
low_rank_fit_seen low_rank_in_a() { return low_rank_sequence_fit(); }
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
  // low_rank sequence bases in both TUs: the fit ran (rank 1 over rows of one value), and both TUs reached
  // the same cuSOLVER solver object and handle (one per thread in the program, not one per TU).
  const link_test::low_rank_fit_seen la = link_test::low_rank_in_a(), lb = link_test::low_rank_in_b();
  const bool low_rank_ok = la.length == expected && lb.length == expected && la.key_rank == 1 && lb.key_rank == 1 &&
                           la.solver != nullptr && la.solver == lb.solver && la.handle != nullptr &&
                           la.handle == lb.handle;
  const bool ok = a == expected && b == expected && c == expected && low_rank_ok;
  std::printf("two CUDA TUs: %lld %lld %lld tokens per head (expected %lld); low_rank sequence bases: %lld %lld "
              "tokens, key ranks %d %d (expected 1), solver %p / %p, handle %p / %p: %s\n",
              static_cast<long long>(a), static_cast<long long>(b), static_cast<long long>(c),
              static_cast<long long>(expected), static_cast<long long>(la.length), static_cast<long long>(lb.length),
              la.key_rank, lb.key_rank, la.solver, lb.solver, la.handle, lb.handle, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
