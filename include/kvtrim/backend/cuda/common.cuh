// kvtrim/backend/cuda/common.cuh — small device helpers shared by the kernels:
// element types as CUDA sees them, 16-byte vectors, launch geometry, and the
// runtime → compile-time dispatch of head_dim and group size.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kvtrim/backend/cuda.hpp"
#include "kvtrim/core/element.hpp"

namespace kvtrim::cuda_detail {

/// The CUDA type with the same bits as a kvtrim host element type.
template <class T>
struct device_element {
  using type = T;
};
template <>
struct device_element<half> {
  using type = __half;
};
template <>
struct device_element<bfloat16> {
  using type = __nv_bfloat16;
};
template <class T>
using device_element_t = typename device_element<std::remove_const_t<T>>::type;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(x);
  else
    return x;
}

/// Loads 8 consecutive elements and widens them to float (16 bytes for 16-bit types).
template <class T>
__device__ __forceinline__ void load8(const T* source, float (&out)[8]) {
  if constexpr (sizeof(T) == 2) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(source));
    const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(elements[i]);
  } else {
    const float4 low = __ldg(reinterpret_cast<const float4*>(source));
    const float4 high = __ldg(reinterpret_cast<const float4*>(source) + 1);
    out[0] = low.x, out[1] = low.y, out[2] = low.z, out[3] = low.w;
    out[4] = high.x, out[5] = high.y, out[6] = high.z, out[7] = high.w;
  }
}

/// Eight consecutive elements kept in their storage type (4 registers for
/// 16-bit types): loaded at once, widened to float only where they are used.
template <class T>
struct alignas(16) packed8 {
  T elements[8];
  __device__ __forceinline__ float operator[](int i) const { return to_float(elements[i]); }
};

/// Widens all eight elements (pairwise conversions for 16-bit types).
template <class T>
__device__ __forceinline__ void widen(const packed8<T>& packed, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    if constexpr (std::is_same_v<T, __half>) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&packed.elements[i]));
      out[i] = pair.x, out[i + 1] = pair.y;
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed.elements[i]));
      out[i] = pair.x, out[i + 1] = pair.y;
    } else {
      out[i] = packed.elements[i], out[i + 1] = packed.elements[i + 1];
    }
  }
}

/// Sums each of `values[0..Count)` over the `Lanes` consecutive lanes of a lane
/// group (Count ≤ Lanes, both powers of two) and leaves every lane with all
/// Count sums. A plain butterfly costs Count · log2(Lanes) shuffles; this one
/// first halves the values at each step (lanes with the step's bit set keep the
/// upper half, their partners the lower), so a lane ends with the sum for
/// value index lane_in_group / (Lanes / Count), then finishes the low bits and
/// gathers: (Count − 1) + log2(Lanes / Count) + Count shuffles.
template <int Lanes, int Count>
__device__ __forceinline__ void lane_group_sum(float (&values)[Count]) {
  static_assert(Count <= Lanes && (Lanes & (Lanes - 1)) == 0 && (Count & (Count - 1)) == 0);
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = Lanes / 2, remaining = Count; remaining > 1; offset /= 2, remaining /= 2) {
    const bool upper = lane & offset;
#pragma unroll
    for (int j = 0; j < remaining / 2; ++j) {
      const float send = upper ? values[j] : values[j + remaining / 2];
      const float keep = upper ? values[j + remaining / 2] : values[j];
      values[j] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
#pragma unroll
  for (int offset = Lanes / Count / 2; offset > 0; offset /= 2) values[0] += __shfl_xor_sync(0xffffffffu, values[0], offset);
  if constexpr (Count > 1) {
    const float mine = values[0];
    const int group_base = lane & ~(Lanes - 1);
#pragma unroll
    for (int j = 0; j < Count; ++j) values[j] = __shfl_sync(0xffffffffu, mine, group_base + j * (Lanes / Count));
  }
}

template <class T>
__device__ __forceinline__ packed8<T> load_packed8(const T* source) {
  packed8<T> result;
  if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<uint4*>(result.elements) = __ldg(reinterpret_cast<const uint4*>(source));
  } else {
    reinterpret_cast<float4*>(result.elements)[0] = __ldg(reinterpret_cast<const float4*>(source));
    reinterpret_cast<float4*>(result.elements)[1] = __ldg(reinterpret_cast<const float4*>(source) + 1);
  }
  return result;
}

template <class T>
__device__ __forceinline__ packed8<T> zero_packed8() {
  packed8<T> result;
#pragma unroll
  for (int i = 0; i < 8; ++i) result.elements[i] = from_float<T>(0.0f);
  return result;
}

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

/// Binds a runtime head_dim to a compile-time constant (FlashInfer's habit).
template <class Fn>
void dispatch_head_dim(std::int64_t head_dim, std::string_view function, Fn&& fn) {
  switch (head_dim) {
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    case 256: fn(std::integral_constant<int, 256>{}); break;
    default: detail::fail(function, "shape.head_dim", "64, 128 or 256 on backend::cuda", std::to_string(head_dim));
  }
}

/// Binds a runtime GQA group size to a compile-time constant.
template <class Fn>
void dispatch_group_size(std::int64_t group, std::string_view function, Fn&& fn) {
  switch (group) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default:
      detail::fail(function, "shape.q_heads / shape.kv_heads", "a GQA group size of 1, 2, 4 or 8 on backend::cuda",
                   std::to_string(group));
  }
}

/// Throws unless keys and values step with the same strides: the kernels address
/// both with one set. A dimension of extent 1 is never stepped along, so its
/// stride may differ (torch calls [B, H, 1, D] views with any token stride
/// contiguous: HF's one-token keys and values during decode are such views).
template <class View>
void check_same_strides(std::string_view function, const View& keys, const View& values) {
  for (std::size_t d = 0; d < 4; ++d)
    if (keys.extent(d) > 1 && keys.stride(d) != values.stride(d))
      detail::fail(function, "values", "the same strides as keys on backend::cuda (dimensions of extent > 1)",
                   detail::cat("stride ", values.stride(d), " against ", keys.stride(d), " in dimension ", d));
}

/// Throws unless `pointer` is aligned for 16-byte vector access.
inline void check_aligned16(std::string_view function, std::string_view argument, const void* pointer) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % 16 != 0)
    detail::fail(function, argument, "16-byte aligned rows on backend::cuda", "a misaligned pointer");
}

// L2 cache policies of the decode kernels (plain, fragment and low-rank alike), here so that
// every kernel writing the eviction metric's logits stores them the same way.

/// Stores one metric logit: with an L2 evict_last policy (`policy` from metric_store_policy) or plainly.
/// No "memory" clobber: nothing in the kernel that stores a logit reads it back (the finisher is a
/// later launch), so the store need not order the kernel's other loads and stores — with the clobber
/// the compiler could not move a shared-memory read of the next block across it.
__device__ __forceinline__ void store_metric_logit(float* address, float value, bool keep_in_l2,
                                                   std::uint64_t policy) {
  if (keep_in_l2)
    asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;\n" ::"l"(address), "f"(value), "l"(policy));
  else
    *address = value;
}
/// Stores the logits of two consecutive tokens at an 8-byte aligned `address`, as store_metric_logit.
__device__ __forceinline__ void store_metric_logit_pair(float* address, float first, float second, bool keep_in_l2,
                                                        std::uint64_t policy) {
  if (keep_in_l2)
    asm volatile("st.global.L2::cache_hint.v2.f32 [%0], {%1, %2}, %3;\n" ::"l"(address), "f"(first), "f"(second),
                 "l"(policy));
  else
    *reinterpret_cast<float2*>(address) = make_float2(first, second);
}
__device__ __forceinline__ std::uint64_t metric_store_policy() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

}  // namespace kvtrim::cuda_detail
