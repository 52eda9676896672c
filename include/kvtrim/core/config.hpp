// kvtrim/core/config.hpp — version and the one macro kvtrim needs.
//
// KVTRIM_HOST_DEVICE marks functions that run on both sides (Eigen's
// EIGEN_DEVICE_FUNC plays the same role); it expands to nothing when the
// translation unit is not compiled by nvcc, so CPU-only builds need no CUDA headers.
#pragma once

#if defined(__CUDACC__)
#define KVTRIM_HOST_DEVICE __host__ __device__
#else
#define KVTRIM_HOST_DEVICE
#endif

namespace kvtrim {
inline constexpr int version_major = 0;
inline constexpr int version_minor = 1;
inline constexpr int version_patch = 0;
}  // namespace kvtrim
