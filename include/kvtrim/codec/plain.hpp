// kvtrim/codec/plain.hpp — store kept tokens as they are: fp16, bf16 or fp32.
//
// The identity codec: key and value rows of head_dim elements per slot, the
// element type of the engine's own cache. It is what every other codec is
// measured against (bytes per token = 2 · head_dim · sizeof(T)).
//
// Math: encode x ↦ round_T(x) (round to nearest even), decode exact.
// Defaults: none (no knobs).
// Backends: cpu (all three), cuda (all three; fp16/bf16 with tensor cores for GQA groups of 4 and 8).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::codec {

template <Element T>
struct plain {
  static constexpr std::string_view name = element_traits<T>::name;
  using element = T;

  struct config {
    void validate(std::string_view) const {}
  };

  /// Key and value rows of `head_dim` elements per slot: slot s's key starts at keys + s·head_dim.
  template <MemorySpace Space>
  struct storage {
    T* keys = nullptr;
    T* values = nullptr;
    std::int64_t head_dim = 0;
    std::int64_t slots = 0;     // capacity
    std::int64_t slot_run = 1;  // no runs: always 1
  };

  static std::size_t storage_bytes(const config&, std::int64_t slots, std::int64_t /*heads*/, std::int64_t head_dim,
                                   std::int64_t slot_run) {
    detail::check_any_slot_run("kvtrim::codec::plain::storage_bytes", slot_run);
    workspace_carver carver;
    carve<host_space>(carver, slots, head_dim);
    return carver.bytes();
  }

  static double bytes_per_token(const config&, std::int64_t head_dim) {
    return 2.0 * static_cast<double>(head_dim) * sizeof(T);
  }

  /// Lays storage for `slots` tokens over `memory` (of storage_bytes bytes).
  /// slot_run is accepted for the common protocol and ignored (no runs).
  template <MemorySpace Space>
  static storage<Space> bind(const config&, void* memory, std::int64_t slots, std::int64_t /*heads*/,
                             std::int64_t head_dim, std::int64_t slot_run) {
    detail::check_any_slot_run("kvtrim::codec::plain::bind", slot_run);
    workspace_carver carver(workspace{memory, ~std::size_t{0}});
    return carve<Space>(carver, slots, head_dim);
  }

  /// Throws unless `store` can hold tokens of `head_dim` elements.
  template <MemorySpace Space>
  static void check_storage(std::string_view function, const storage<Space>& store, std::int64_t head_dim) {
    if (store.head_dim != head_dim)
      detail::fail(function, "cache.storage.head_dim", detail::cat("the model's head_dim = ", head_dim),
                   std::to_string(store.head_dim));
    if (store.keys == nullptr) detail::fail(function, "cache.storage.keys", "a non-null pointer", "nullptr");
    if (store.values == nullptr) detail::fail(function, "cache.storage.values", "a non-null pointer", "nullptr");
  }

  // --- element operations (host and device) ---------------------------------
  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void encode(const storage<Space>& store, std::int64_t /*head*/, std::int64_t slot,
                                        std::int64_t /*position*/, const float* key, const float* value) {
    T* key_row = store.keys + slot * store.head_dim;
    T* value_row = store.values + slot * store.head_dim;
    for (std::int64_t d = 0; d < store.head_dim; ++d) {
      key_row[d] = static_cast<T>(key[d]);  // round to nearest even
      value_row[d] = static_cast<T>(value[d]);
    }
  }
  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void load_key(const storage<Space>& store, std::int64_t /*head*/, std::int64_t slot,
                                          std::int64_t /*position*/, float* out) {
    const T* row = store.keys + slot * store.head_dim;
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = static_cast<float>(row[d]);
  }
  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void load_value(const storage<Space>& store, std::int64_t /*head*/, std::int64_t slot,
                                            float* out) {
    const T* row = store.values + slot * store.head_dim;
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = static_cast<float>(row[d]);
  }

 private:
  template <MemorySpace Space>
  static storage<Space> carve(workspace_carver& carver, std::int64_t slots, std::int64_t head_dim) {
    storage<Space> store;
    store.keys = carver.take<T>(slots * head_dim);
    store.values = carver.take<T>(slots * head_dim);
    store.head_dim = head_dim;
    store.slots = slots;
    return store;
  }
};

/// True for codec::plain<T> (kernels that read rows as they are specialise on it).
template <class CodecT>
inline constexpr bool is_plain = false;
template <class T>
inline constexpr bool is_plain<plain<T>> = true;

using fp32 = plain<float>;
using fp16 = plain<half>;
using bf16 = plain<bfloat16>;

}  // namespace kvtrim::codec
