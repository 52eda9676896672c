// kvtrim/codec/int8.hpp — integer quantization of kept tokens: int8 (and its
// packed 4-bit sibling codec::int4, see codec/int4.hpp).
//
// Papers: KIVI (Liu et al., 2024, "A Tuning-Free Asymmetric 2bit Quantization
// for KV Cache") for the key grouping; per-token value scales as in
// TensorRT-LLM / vLLM int8 caches.
//
// Math (b bits; a "run" is the set of numbers sharing one scale):
//   symmetric:  s = max|x| / (2^(b−1) − 1),  q = round(x / s) ∈ [−127, 127],  x̂
//   = q·s asymmetric: s = (max x − min x) / (2^b − 1), z = min x, q = round((x
//   − z)/s) ∈ [0, 255], x̂ = q·s + z so |x − x̂| ≤ s/2 (half a step) for every
//   element. values: one run per token and head (its head_dim channels). keys:
//   key_scaling::per_channel_group (KIVI, default): one run per channel
//           over each group of `key_group` tokens, because key outliers sit in
//           fixed channels; the newest tokens of a head stay fp16 in a residual
//           window until their group fills, then the group is quantized at
//           once. key_scaling::per_token: one run per token, like values.
// Storage per slot: head_dim codes each for key and value (b bits each,
// packed), fp32 scales (and zero points); per group of slots: head_dim key
// scales (and zero points); per head: a key_group × head_dim fp16 residual
// window. Codes are unsigned: symmetric codes store q + 2^(b−1).
//
// Layout contract (per_channel_group): the group of slot s is s / key_group, so
// every aligned run of key_group slots must belong to one head and be written
// in order (layout::contiguous heads-major with capacity % key_group == 0,
// layout::paged with page_size % key_group == 0). encode checks it and throws
// otherwise; layouts that place heads at arbitrary offsets (layout::flat) use
// key_scaling::per_token.
//
// NaN or ±Inf in a key or value is an error (kvtrim::error naming head, slot
// and channel): one bad element would otherwise poison the scale of a whole
// run.
//
// Defaults: per_channel_group keys, key_group 32 (KIVI), symmetric.
// Backends: cpu.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::detail {

/// b-bit codes with one scale (and zero point) per run of numbers.
template <int Bits>
struct integer_quantizer {
  static constexpr int symmetric_max = (1 << (Bits - 1)) - 1;  // 127 | 7
  static constexpr int levels = (1 << Bits) - 1;               // 255 | 15
  static constexpr int symmetric_offset = 1 << (Bits - 1);     // stored code = q + offset

  struct step {
    float scale = 0.0f;
    float zero = 0.0f;
  };

  static step fit(float lowest, float highest, bool asymmetric) {
    if (asymmetric) return {(highest - lowest) / static_cast<float>(levels), lowest};
    return {std::fmax(std::fabs(lowest), std::fabs(highest)) / static_cast<float>(symmetric_max), 0.0f};
  }
  static unsigned code(float x, step s, bool asymmetric) {
    if (asymmetric) {
      if (s.scale == 0.0f) return 0;  // every number of the run equals the zero point
      return static_cast<unsigned>(std::clamp(std::nearbyint((x - s.zero) / s.scale), 0.0f, float(levels)));
    }
    if (s.scale == 0.0f) return symmetric_offset;
    const float q = std::clamp(std::nearbyint(x / s.scale), -float(symmetric_max), float(symmetric_max));
    return static_cast<unsigned>(static_cast<int>(q) + symmetric_offset);
  }
  static float value(unsigned code, step s, bool asymmetric) {
    if (asymmetric) return static_cast<float>(code) * s.scale + s.zero;
    return static_cast<float>(static_cast<int>(code) - symmetric_offset) * s.scale;
  }

  static constexpr std::int64_t row_bytes(std::int64_t head_dim) { return (head_dim * Bits + 7) / 8; }
  static void put(std::uint8_t* row, std::int64_t d, unsigned code) {
    if constexpr (Bits == 8) {
      row[d] = static_cast<std::uint8_t>(code);
    } else {
      const int shift = d % 2 == 0 ? 0 : 4;
      row[d / 2] = static_cast<std::uint8_t>((row[d / 2] & ~(0xF << shift)) | (code << shift));
    }
  }
  static unsigned get(const std::uint8_t* row, std::int64_t d) {
    if constexpr (Bits == 8)
      return row[d];
    else
      return (row[d / 2] >> (d % 2 == 0 ? 0 : 4)) & 0xFu;
  }
};

}  // namespace kvtrim::detail

namespace kvtrim::codec {

enum class key_scaling { per_channel_group, per_token };

template <int Bits>
struct quantized {
  static_assert(Bits == 8 || Bits == 4, "kvtrim::codec::quantized: 8 or 4 bits");
  static constexpr std::string_view name = Bits == 8 ? "int8" : "int4";
  using quantizer = detail::integer_quantizer<Bits>;
  using step = typename quantizer::step;

  struct config {
    key_scaling keys = key_scaling::per_channel_group;
    std::int64_t key_group = 32;  // tokens per key group (KIVI's G)
    bool asymmetric = false;      // zero points (KIVI's choice) instead of symmetric scales

    void validate(std::string_view function) const {
      if (keys == key_scaling::per_channel_group && (key_group < 1 || key_group > 65536))
        detail::fail(function, "config.codec.key_group", "a group of 1 to 65536 tokens (KIVI: 32)",
                     std::to_string(key_group));
    }
    bool grouped() const { return keys == key_scaling::per_channel_group; }
  };

  template <MemorySpace Space>
  struct storage {
    std::uint8_t* key_codes = nullptr;       // [slots, row_bytes]
    std::uint8_t* value_codes = nullptr;     // [slots, row_bytes]
    float* key_scales = nullptr;             // per_token: [slots]; per_channel_group: [groups, head_dim]
    float* key_zeros = nullptr;              // as key_scales, asymmetric only
    float* value_scales = nullptr;           // [slots]
    float* value_zeros = nullptr;            // [slots], asymmetric only
    std::uint8_t* group_sealed = nullptr;    // [groups]: 1 once the group is quantized
    half* residual_keys = nullptr;           // [heads, key_group, head_dim]: the filling group, fp16
    std::int64_t* residual_group = nullptr;  // [heads]: group being filled, −1 none
    std::int64_t* residual_count = nullptr;  // [heads]: tokens of it written so far
    std::int64_t head_dim = 0;
    std::int64_t slots = 0;
    std::int64_t heads = 0;
    std::int64_t key_group = 0;  // 0 when keys are scaled per token
    bool asymmetric = false;
  };

  static std::size_t storage_bytes(const config& cfg, std::int64_t slots, std::int64_t heads, std::int64_t head_dim) {
    workspace_carver carver;
    carve<host_space>(carver, cfg, slots, heads, head_dim);
    return carver.bytes();
  }

  static double bytes_per_token(const config& cfg, std::int64_t head_dim) {
    const double per_run = cfg.asymmetric ? 8.0 : 4.0;  // fp32 scale (+ zero point)
    const double key_params =
        cfg.grouped() ? (static_cast<double>(head_dim) * per_run + 1.0) / static_cast<double>(cfg.key_group) : per_run;
    return 2.0 * static_cast<double>(quantizer::row_bytes(head_dim)) + per_run + key_params;
  }
  static double bytes_per_head(const config& cfg, std::int64_t head_dim) {
    return cfg.grouped() ? static_cast<double>(cfg.key_group * head_dim) * sizeof(half) + 16.0 : 0.0;
  }

  template <MemorySpace Space>
  static storage<Space> bind(const config& cfg, void* memory, std::int64_t slots, std::int64_t heads,
                             std::int64_t head_dim) {
    workspace_carver carver(workspace{memory, ~std::size_t{0}});
    storage<Space> store = carve<Space>(carver, cfg, slots, heads, head_dim);
    if constexpr (std::same_as<Space, host_space>) {
      // No group is quantized and no head has a filling group yet. (A device
      // port clears the same arrays with cudaMemsetAsync.)
      if (cfg.grouped()) {
        std::fill_n(store.group_sealed, slots / cfg.key_group, std::uint8_t{0});
        std::fill_n(store.residual_group, heads, std::int64_t{-1});
        std::fill_n(store.residual_count, heads, std::int64_t{0});
      }
    }
    return store;
  }

  template <MemorySpace Space>
  static void check_storage(std::string_view function, const storage<Space>& store, std::int64_t head_dim) {
    detail::check_storage_head_dim(function, store.head_dim, head_dim);
    const bool complete = store.key_codes && store.value_codes && store.key_scales && store.value_scales &&
                          (!store.asymmetric || (store.key_zeros && store.value_zeros)) &&
                          (store.key_group == 0 ||
                           (store.group_sealed && store.residual_keys && store.residual_group && store.residual_count));
    if (!complete)
      detail::fail(function, "cache.storage", "every array of the codec bound (codec::bind)", "a null pointer");
  }

  // --- reference (host) encode / decode -----------------------------------
  static void encode(const storage<host_space>& store, std::int64_t head, std::int64_t slot, const float* key,
                     const float* value) {
    constexpr std::string_view function = Bits == 8 ? "kvtrim::codec::int8::encode" : "kvtrim::codec::int4::encode";
    check_place(function, store, head, slot);
    detail::check_finite_row(function, "key", key, store.head_dim, head, slot);
    detail::check_finite_row(function, "value", value, store.head_dim, head, slot);
    quantize_row(store, value, store.value_codes, store.value_scales, store.value_zeros, slot);
    if (store.key_group == 0) {
      quantize_row(store, key, store.key_codes, store.key_scales, store.key_zeros, slot);
      return;
    }
    // KIVI: the key waits in the head's fp16 residual window until its group
    // fills.
    const std::int64_t group = slot / store.key_group, place = slot % store.key_group;
    if (place == 0) {
      store.residual_group[head] = group;
      store.residual_count[head] = 0;
    } else if (store.residual_group[head] != group || store.residual_count[head] != place) {
      detail::fail(
          function, "slot",
          detail::cat("the next slot of head ", head, "'s key group (slot ",
                      store.residual_group[head] < 0
                          ? std::string("at a multiple of key_group = ") + std::to_string(store.key_group)
                          : std::to_string(store.residual_group[head] * store.key_group + store.residual_count[head]),
                      "): per-channel key groups need each aligned run of key_group "
                      "slots to belong to one "
                      "head and be written in order (or use key_scaling::per_token)"),
          std::to_string(slot));
    }
    half* residual = residual_row(store, head, place);
    for (std::int64_t d = 0; d < store.head_dim; ++d) residual[d] = half(key[d]);
    store.residual_count[head] = place + 1;
    store.group_sealed[group] = 0;
    if (place + 1 == store.key_group) seal_group(store, head, group);
  }

  static void decode_key(const storage<host_space>& store, std::int64_t head, std::int64_t slot, float* out) {
    const std::uint8_t* codes = store.key_codes + slot * quantizer::row_bytes(store.head_dim);
    if (store.key_group == 0) {
      const step s{store.key_scales[slot], store.asymmetric ? store.key_zeros[slot] : 0.0f};
      for (std::int64_t d = 0; d < store.head_dim; ++d)
        out[d] = quantizer::value(quantizer::get(codes, d), s, store.asymmetric);
      return;
    }
    const std::int64_t group = slot / store.key_group, place = slot % store.key_group;
    if (store.group_sealed[group]) {
      for (std::int64_t d = 0; d < store.head_dim; ++d) {
        const std::int64_t channel = group * store.head_dim + d;
        const step s{store.key_scales[channel], store.asymmetric ? store.key_zeros[channel] : 0.0f};
        out[d] = quantizer::value(quantizer::get(codes, d), s, store.asymmetric);
      }
      return;
    }
    if (store.residual_group[head] != group || place >= store.residual_count[head])
      detail::fail(Bits == 8 ? "kvtrim::codec::int8::decode_key" : "kvtrim::codec::int4::decode_key", "slot",
                   detail::cat("a slot head ", head, " has written"), std::to_string(slot));
    const half* residual = residual_row(store, head, place);
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = static_cast<float>(residual[d]);
  }

  static void decode_value(const storage<host_space>& store, std::int64_t /*head*/, std::int64_t slot, float* out) {
    const std::uint8_t* codes = store.value_codes + slot * quantizer::row_bytes(store.head_dim);
    const step s{store.value_scales[slot], store.asymmetric ? store.value_zeros[slot] : 0.0f};
    for (std::int64_t d = 0; d < store.head_dim; ++d)
      out[d] = quantizer::value(quantizer::get(codes, d), s, store.asymmetric);
  }

  /// Moves a token as stored (layout::flat's repack). Per-token key scales
  /// only: a key group cannot be split.
  static void move_slot(const storage<host_space>& store, std::int64_t /*head*/, std::int64_t from, std::int64_t to) {
    if (store.key_group != 0)
      detail::fail(Bits == 8 ? "kvtrim::codec::int8::move_slot" : "kvtrim::codec::int4::move_slot", "config.codec.keys",
                   "key_scaling::per_token (per-channel key groups cannot move "
                   "slot by slot)",
                   "key_scaling::per_channel_group");
    const std::int64_t bytes = quantizer::row_bytes(store.head_dim);
    std::memmove(store.key_codes + to * bytes, store.key_codes + from * bytes, static_cast<std::size_t>(bytes));
    std::memmove(store.value_codes + to * bytes, store.value_codes + from * bytes, static_cast<std::size_t>(bytes));
    store.key_scales[to] = store.key_scales[from];
    store.value_scales[to] = store.value_scales[from];
    if (store.asymmetric) {
      store.key_zeros[to] = store.key_zeros[from];
      store.value_zeros[to] = store.value_zeros[from];
    }
  }

  /// The quantization step (scale) of element d of the stored key at `slot`, or
  /// 0 while the key still waits in the fp16 residual window (tests and stats).
  static float key_step(const storage<host_space>& store, std::int64_t slot, std::int64_t d) {
    if (store.key_group == 0) return store.key_scales[slot];
    const std::int64_t group = slot / store.key_group;
    return store.group_sealed[group] ? store.key_scales[group * store.head_dim + d] : 0.0f;
  }
  static float value_step(const storage<host_space>& store, std::int64_t slot) { return store.value_scales[slot]; }

 private:
  template <MemorySpace Space>
  static storage<Space> carve(workspace_carver& carver, const config& cfg, std::int64_t slots, std::int64_t heads,
                              std::int64_t head_dim) {
    constexpr std::string_view function = "kvtrim::codec::int8::bind";
    cfg.validate(function);
    if (cfg.grouped() && slots % cfg.key_group != 0)
      detail::fail(function, "slots",
                   detail::cat("a multiple of key_group = ", cfg.key_group,
                               " (key groups are aligned runs of slots; make "
                               "the capacity or page "
                               "size a multiple of key_group)"),
                   std::to_string(slots));
    storage<Space> store;
    const std::int64_t bytes = quantizer::row_bytes(head_dim);
    const std::int64_t key_runs = cfg.grouped() ? slots / cfg.key_group * head_dim : slots;
    store.key_codes = carver.take<std::uint8_t>(slots * bytes);
    store.value_codes = carver.take<std::uint8_t>(slots * bytes);
    store.key_scales = carver.take<float>(key_runs);
    store.value_scales = carver.take<float>(slots);
    if (cfg.asymmetric) {
      store.key_zeros = carver.take<float>(key_runs);
      store.value_zeros = carver.take<float>(slots);
    }
    if (cfg.grouped()) {
      store.group_sealed = carver.take<std::uint8_t>(slots / cfg.key_group);
      store.residual_keys = carver.take<half>(heads * cfg.key_group * head_dim);
      store.residual_group = carver.take<std::int64_t>(heads);
      store.residual_count = carver.take<std::int64_t>(heads);
    }
    store.head_dim = head_dim;
    store.slots = slots;
    store.heads = heads;
    store.key_group = cfg.grouped() ? cfg.key_group : 0;
    store.asymmetric = cfg.asymmetric;
    return store;
  }

  static void check_place(std::string_view function, const storage<host_space>& store, std::int64_t head,
                          std::int64_t slot) {
    if (slot < 0 || slot >= store.slots) detail::fail_index(function, "slot", slot, store.slots);
    if (head < 0 || head >= store.heads) detail::fail_index(function, "head", head, store.heads);
  }

  static half* residual_row(const storage<host_space>& store, std::int64_t head, std::int64_t place) {
    return store.residual_keys + (head * store.key_group + place) * store.head_dim;
  }

  /// One run per token: codes into row `slot`, its step into scales[slot] (and
  /// zeros[slot]).
  static void quantize_row(const storage<host_space>& store, const float* x, std::uint8_t* codes, float* scales,
                           float* zeros, std::int64_t slot) {
    float lowest = x[0], highest = x[0];
    for (std::int64_t d = 1; d < store.head_dim; ++d) {
      lowest = std::fmin(lowest, x[d]);
      highest = std::fmax(highest, x[d]);
    }
    const step s = quantizer::fit(lowest, highest, store.asymmetric);
    std::uint8_t* row = codes + slot * quantizer::row_bytes(store.head_dim);
    for (std::int64_t d = 0; d < store.head_dim; ++d)
      quantizer::put(row, d, quantizer::code(x[d], s, store.asymmetric));
    scales[slot] = s.scale;
    if (store.asymmetric) zeros[slot] = s.zero;
  }

  /// The group is full: one run per channel over its key_group fp16 residual
  /// keys.
  static void seal_group(const storage<host_space>& store, std::int64_t head, std::int64_t group) {
    const std::int64_t bytes = quantizer::row_bytes(store.head_dim);
    for (std::int64_t d = 0; d < store.head_dim; ++d) {
      float lowest = std::numeric_limits<float>::infinity(), highest = -lowest;
      for (std::int64_t place = 0; place < store.key_group; ++place) {
        const float x = static_cast<float>(residual_row(store, head, place)[d]);
        lowest = std::fmin(lowest, x);
        highest = std::fmax(highest, x);
      }
      const step s = quantizer::fit(lowest, highest, store.asymmetric);
      for (std::int64_t place = 0; place < store.key_group; ++place) {
        const float x = static_cast<float>(residual_row(store, head, place)[d]);
        quantizer::put(store.key_codes + (group * store.key_group + place) * bytes, d,
                       quantizer::code(x, s, store.asymmetric));
      }
      store.key_scales[group * store.head_dim + d] = s.scale;
      if (store.asymmetric) store.key_zeros[group * store.head_dim + d] = s.zero;
    }
    store.group_sealed[group] = 1;
    store.residual_group[head] = -1;
    store.residual_count[head] = 0;
  }
};

using int8 = quantized<8>;

}  // namespace kvtrim::codec
