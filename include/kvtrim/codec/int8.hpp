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
// packed), fp32 scales (and zero points); per aligned run of slot_run slots:
// head_dim key scales (and zero points) and a sealed flag; per head: a
// key_group × head_dim fp16 residual window and the key_group slots of its
// tokens. Codes are unsigned: symmetric codes store q + 2^(b−1).
//
// Slot runs (per_channel_group; docs/composition.md §3): a head's key groups
// are logical — group k is the head's tokens [kG, (k+1)G) in write order since
// prepare_head — and the slots they land in are the layout's business. The
// storage is bound with a slot run U dividing G (slot_alignment = key_group):
// the layout guarantees every aligned run of U slots belongs to one head and
// holds consecutive logical indices [jU, (j+1)U), written in order. Key scales
// (and zero points, and a sealed flag) are kept per U-run (slot / U), so a
// group spanning two pages of 16 stores its scales in both pages' runs. While a
// group fills, its keys wait in the head's fp16 residual window and
// residual_slots remembers where each one goes; sealing writes the codes at
// those slots and the group's scales into every run it covers. encode checks
// the run rule (slot % U = logical index % U, consecutive within a run) and
// throws otherwise.
//
// NaN or ±Inf in a key or value is an error (kvtrim::error naming head, slot
// and channel): one bad element would otherwise poison the scale of a whole
// run.
//
// Defaults: per_channel_group keys, key_group 32 (KIVI), symmetric.
// Backends: cpu, cuda (backend/cuda/codec_quantized.cuh, codec_writes.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/config.hpp"
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
  /// 1.5·2²³: for |e| < 2²², (e + it) − it is rint(e) (the addition rounds to an integer, to nearest even).
  static constexpr float round_magic = 12582912.0f;
  /// rint(e) for |e| < 2²² by round_magic: two additions, which the device encode does for every code
  /// (no floor, no conversion). Written with __fadd_rn / __fsub_rn on the device so nothing reassociates.
  KVTRIM_HOST_DEVICE static float nearest_integer(float e) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(__fadd_rn(e, round_magic), round_magic);
#else
    return (e + round_magic) - round_magic;
#endif
  }
  /// Whether the product e = x · (1/scale) rounds as the quotient does (rounded_quotient says why): |e| < 1024
  /// and e farther than 2⁻¹² from every tie n + ½, measured as |e − rint(e)| < ½ − 2⁻¹² — exact, since e and
  /// rint(e) are multiples of e's ulp less than 2¹⁰ apart (an earlier form, |e − ⌊e⌋ − ½|, rounded e + 1 for
  /// e in (−½, −¼): the two differ at e = −(½ − 2⁻¹² − 2⁻²⁵) alone, which both bounds accept). False for a
  /// non-finite e (NaN compares false). codec_device<quantized>::code_each evaluates the same test for a batch
  /// as max |e − rint(e)| (max.NaN: a NaN anywhere fails it) and max |e|.
  KVTRIM_HOST_DEVICE static bool product_decides(float estimate) {
    return ::fabsf(estimate) < 1024.0f && ::fabsf(estimate - nearest_integer(estimate)) < 0.5f - 0x1p-12f;
  }
  /// round(x / scale) — code()'s rounding of the IEEE quotient — from the product e = x · inverse, where
  /// inverse = 1 / scale correctly rounded: the rule the device encode follows per batch
  /// (codec_device<quantized>::code_each takes the products when every number of the batch decides, else
  /// divides them all — so each code is this function's).
  /// Why they agree: e and q = x / scale differ by at most |q|·(2⁻²⁴ + 2⁻²⁴ + 2⁻⁴⁸) ≤ 1.3·10⁻⁴ for
  /// |q| < 1024, and the rounded quotient fl(q) from q by half an ulp below 1024, 2⁻¹⁵ = 3.1·10⁻⁵: together
  /// ≤ 1.83·10⁻⁴ < 2⁻¹² = 2.4·10⁻⁴. Rounding changes value only at n + ½, so when e lies farther than 2⁻¹²
  /// from every n + ½, e and fl(q) round alike. Otherwise (a near-tie, |e| ≥ 1024, a non-finite e: x or
  /// 1/scale out of range) the division decides. tests/cpu/codec_roundtrip_test.cpp
  /// samples it against the division (ties of every binade, quotients at distances around the
  /// margin on both sides); tests/cuda/codecs_test.cu the device's codes. An inverse of 0 with a non-zero scale
  /// (a scale above 2¹²⁶ flushed by -ftz) gives 0: fit() never makes such a scale.
  KVTRIM_HOST_DEVICE static float rounded_quotient(float x, float scale, float inverse) {
    const float estimate = x * inverse;
    if (product_decides(estimate)) return ::rintf(estimate);
#ifdef __CUDA_ARCH__
    return ::rintf(__fdiv_rn(x, scale));  // correctly rounded, never the approximate division (-use_fast_math);
                                          // subnormals still flush under -ftz, as before
#else
    return ::rintf(x / scale);
#endif
  }

  KVTRIM_HOST_DEVICE static float value(unsigned code, step s, bool asymmetric) {
    if (asymmetric) return static_cast<float>(code) * s.scale + s.zero;
    return static_cast<float>(static_cast<int>(code) - symmetric_offset) * s.scale;
  }

  KVTRIM_HOST_DEVICE static constexpr std::int64_t row_bytes(std::int64_t head_dim) { return (head_dim * Bits + 7) / 8; }
  static void put(std::uint8_t* row, std::int64_t d, unsigned code) {
    if constexpr (Bits == 8) {
      row[d] = static_cast<std::uint8_t>(code);
    } else {
      const int shift = d % 2 == 0 ? 0 : 4;
      row[d / 2] = static_cast<std::uint8_t>((row[d / 2] & ~(0xF << shift)) | (code << shift));
    }
  }
  KVTRIM_HOST_DEVICE static unsigned get(const std::uint8_t* row, std::int64_t d) {
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
    float* key_scales = nullptr;             // per_token: [slots]; per_channel_group: [slots / slot_run, head_dim]
    float* key_zeros = nullptr;              // as key_scales, asymmetric only
    float* value_scales = nullptr;           // [slots]
    float* value_zeros = nullptr;            // [slots], asymmetric only
    std::uint8_t* run_sealed = nullptr;      // [slots / slot_run]: 1 once the run's keys are quantized
    half* residual_keys = nullptr;           // [heads, key_group, head_dim]: the filling group, fp16
    std::int64_t* residual_slots = nullptr;  // [heads, key_group]: the slots of the filling group's tokens
    std::int64_t* residual_count = nullptr;  // [heads]: tokens of the filling group written so far
    std::int64_t head_dim = 0;
    std::int64_t slots = 0;  // capacity
    std::int64_t heads = 0;
    std::int64_t key_group = 0;  // 0 when keys are scaled per token
    std::int64_t slot_run = 1;   // U: key scales per aligned run of U slots (1 for per-token keys)
    bool asymmetric = false;
  };

  /// KIVI key groups need runs of slots that divide key_group (1 for per-token keys).
  static std::int64_t slot_alignment(const config& cfg) { return cfg.grouped() ? cfg.key_group : 1; }

  static std::size_t storage_bytes(const config& cfg, std::int64_t slots, std::int64_t heads, std::int64_t head_dim,
                                   std::int64_t slot_run) {
    workspace_carver carver;
    carve<host_space>(carver, cfg, slots, heads, head_dim, slot_run);
    return carver.bytes();
  }

  /// Per token of one head: codes, value scale (+ zero), and the key scales (+
  /// zeros) and sealed flag of its run amortised over the run's slot_run slots
  /// (per-token keys: one scale each).
  static double bytes_per_token(const config& cfg, std::int64_t head_dim, std::int64_t slot_run) {
    const double per_run = cfg.asymmetric ? 8.0 : 4.0;  // fp32 scale (+ zero point)
    const double key_params = cfg.grouped()
                                  ? (static_cast<double>(head_dim) * per_run + 1.0) / static_cast<double>(slot_run)
                                  : per_run;
    return 2.0 * static_cast<double>(quantizer::row_bytes(head_dim)) + per_run + key_params;
  }
  /// As above for runs of the full key_group (the contiguous and flat layouts).
  static double bytes_per_token(const config& cfg, std::int64_t head_dim) {
    return bytes_per_token(cfg, head_dim, slot_alignment(cfg));
  }
  /// Per head: the fp16 residual window, its slots and its count.
  static double bytes_per_head(const config& cfg, std::int64_t head_dim) {
    return cfg.grouped() ? static_cast<double>(cfg.key_group) * (static_cast<double>(head_dim) * sizeof(half) + 8.0) +
                               8.0
                         : 0.0;
  }

  template <MemorySpace Space>
  static storage<Space> bind(const config& cfg, void* memory, std::int64_t slots, std::int64_t heads,
                             std::int64_t head_dim, std::int64_t slot_run) {
    workspace_carver carver(workspace{memory, ~std::size_t{0}});
    storage<Space> store = carve<Space>(carver, cfg, slots, heads, head_dim, slot_run);
    if constexpr (std::same_as<Space, host_space>) {
      // No run is quantized and no head has a filling group yet. (A device
      // port clears the same arrays with cudaMemsetAsync.)
      if (cfg.grouped()) {
        std::fill_n(store.run_sealed, slots / store.slot_run, std::uint8_t{0});
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
                           (store.run_sealed && store.residual_keys && store.residual_slots && store.residual_count));
    if (!complete)
      detail::fail(function, "cache.storage", "every array of the codec bound (codec::bind)", "a null pointer");
    if (store.slot_run < 1 || (store.key_group > 0 && store.key_group % store.slot_run != 0))
      detail::fail(function, "cache.storage.slot_run",
                   detail::cat("a run dividing key_group = ", store.key_group, " (codec::bind)"),
                   std::to_string(store.slot_run));
  }

  /// A head is about to be rewritten (compaction): its next token starts a new
  /// key group. (Whatever the head's filling group held is dropped.)
  template <class Rows>
  static void prepare_head(const storage<host_space>& store, std::int64_t head, std::int64_t /*sequence_length*/,
                           std::int64_t /*count*/, const Rows& /*rows*/) {
    if (head < 0 || head >= store.heads) detail::fail_index(prepare_function, "head", head, store.heads);
    if (store.key_group != 0) store.residual_count[head] = 0;
  }

  // --- element operations ---------------------------------------------------
  /// Host only (it validates and seals groups).
  static void encode(const storage<host_space>& store, std::int64_t head, std::int64_t slot, std::int64_t position,
                     const float* key, const float* value) {
    constexpr std::string_view function = encode_function;
    check_place(function, store, head, slot);
    if (position < 0) detail::fail(function, "position", "a position ≥ 0", std::to_string(position));
    detail::check_finite_row(function, "key", key, store.head_dim, head, slot);
    detail::check_finite_row(function, "value", value, store.head_dim, head, slot);
    const std::int64_t place = store.key_group == 0 ? 0 : store.residual_count[head];
    const std::int64_t run = store.slot_run;
    if (store.key_group != 0) {
      // The run rule: logical index ≡ slot (mod U), consecutive within a run.
      const bool starts_run = place % run == 0;
      const bool in_order = slot % run == place % run &&
                            (starts_run || store.residual_slots[head * store.key_group + place - 1] == slot - 1);
      if (!in_order)
        detail::fail(function, "slot",
                     detail::cat("slot ", slot, " is not where head ", head, "'s token ", place,
                                 " of its key group can go: every aligned run of slot_run = ", run,
                                 " slots must belong to one head and hold consecutive tokens, written in order "
                                 "(expected a slot ≡ ",
                                 place % run, " mod ", run,
                                 starts_run ? "" : detail::cat(", right after slot ",
                                                               store.residual_slots[head * store.key_group + place - 1]),
                                 "; or use key_scaling::per_token)"),
                     std::to_string(slot));
    }
    quantize_row(store, value, store.value_codes, store.value_scales, store.value_zeros, slot);
    if (store.key_group == 0) {
      quantize_row(store, key, store.key_codes, store.key_scales, store.key_zeros, slot);
      return;
    }
    // KIVI: the key waits in the head's fp16 residual window until its group
    // fills.
    if (slot % run == 0) store.run_sealed[slot / run] = 0;
    half* residual = residual_row(store, head, place);
    for (std::int64_t d = 0; d < store.head_dim; ++d) residual[d] = half(key[d]);
    store.residual_slots[head * store.key_group + place] = slot;
    store.residual_count[head] = place + 1;
    if (place + 1 == store.key_group) seal_group(store, head);
  }

  /// scheme::truncate's limit: KIVI keys can forget exactly the tokens of the
  /// head's filling group (still fp16 in the residual window); a sealed group's
  /// shared per-channel scales cannot be undone. Per-token keys: no limit.
  static std::int64_t rollback_horizon(const storage<host_space>& store, std::int64_t head) {
    return store.key_group == 0 ? unlimited_rollback : store.residual_count[head];
  }
  /// Forgets the newest `count` (≤ rollback_horizon) tokens of the filling group:
  /// their fp16 rows and slots become unused places of the window.
  template <class SlotOf>
  static void drop_newest(const storage<host_space>& store, std::int64_t head, std::int64_t count, const SlotOf&) {
    if (store.key_group != 0) store.residual_count[head] -= count;
  }

  /// The stored key, dequantized (a key of a filling group: its fp16 residual
  /// row, found by slot).
  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void load_key(const storage<Space>& store, std::int64_t head, std::int64_t slot,
                                          std::int64_t /*position*/, float* out) {
    const std::uint8_t* codes = store.key_codes + slot * quantizer::row_bytes(store.head_dim);
    if (store.key_group == 0) {
      const step s{store.key_scales[slot], store.asymmetric ? store.key_zeros[slot] : 0.0f};
      for (std::int64_t d = 0; d < store.head_dim; ++d)
        out[d] = quantizer::value(quantizer::get(codes, d), s, store.asymmetric);
      return;
    }
    const std::int64_t run = slot / store.slot_run;
    if (store.run_sealed[run]) {
      const float* scales = store.key_scales + run * store.head_dim;
      const float* zeros = store.asymmetric ? store.key_zeros + run * store.head_dim : nullptr;
      for (std::int64_t d = 0; d < store.head_dim; ++d) {
        const step s{scales[d], zeros ? zeros[d] : 0.0f};
        out[d] = quantizer::value(quantizer::get(codes, d), s, store.asymmetric);
      }
      return;
    }
    const std::int64_t* slots = store.residual_slots + head * store.key_group;
    for (std::int64_t place = store.residual_count[head]; place-- > 0;)
      if (slots[place] == slot) {
        const half* residual = store.residual_keys + (head * store.key_group + place) * store.head_dim;
        for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = static_cast<float>(residual[d]);
        return;
      }
#if defined(__CUDA_ARCH__)
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = __int_as_float(0x7fc00000);  // never written
#else
    detail::fail(load_key_function, "slot", detail::cat("a slot head ", head, " has written"),
                 std::to_string(slot));
#endif
  }

  template <MemorySpace Space>
  KVTRIM_HOST_DEVICE static void load_value(const storage<Space>& store, std::int64_t /*head*/, std::int64_t slot,
                                            float* out) {
    const std::uint8_t* codes = store.value_codes + slot * quantizer::row_bytes(store.head_dim);
    const step s{store.value_scales[slot], store.asymmetric ? store.value_zeros[slot] : 0.0f};
    for (std::int64_t d = 0; d < store.head_dim; ++d)
      out[d] = quantizer::value(quantizer::get(codes, d), s, store.asymmetric);
  }

  /// Moves a token as stored (layout::flat's repack): its codes and per-token
  /// scales, its run's key scales and sealed flag when `from` starts a run, and
  /// its place in the head's filling group. Key groups need from ≡ to (mod
  /// slot_run): a layout moves whole aligned runs.
  static void move_slot(const storage<host_space>& store, std::int64_t head, std::int64_t from, std::int64_t to) {
    constexpr std::string_view function = move_function;
    check_place(function, store, head, from);
    check_place(function, store, head, to);
    const std::int64_t run = store.slot_run;
    if (store.key_group != 0 && from % run != to % run)
      detail::fail(function, "to",
                   detail::cat("a slot ≡ ", from % run, " mod slot_run = ", run,
                               " (key groups move by whole aligned runs)"),
                   std::to_string(to));
    const std::int64_t bytes = quantizer::row_bytes(store.head_dim);
    std::memmove(store.key_codes + to * bytes, store.key_codes + from * bytes, static_cast<std::size_t>(bytes));
    std::memmove(store.value_codes + to * bytes, store.value_codes + from * bytes, static_cast<std::size_t>(bytes));
    store.value_scales[to] = store.value_scales[from];
    if (store.asymmetric) store.value_zeros[to] = store.value_zeros[from];
    if (store.key_group == 0) {
      store.key_scales[to] = store.key_scales[from];
      if (store.asymmetric) store.key_zeros[to] = store.key_zeros[from];
      return;
    }
    if (from % run == 0) {
      const std::int64_t source = from / run, target = to / run;
      std::copy_n(store.key_scales + source * store.head_dim, store.head_dim, store.key_scales + target * store.head_dim);
      if (store.asymmetric)
        std::copy_n(store.key_zeros + source * store.head_dim, store.head_dim, store.key_zeros + target * store.head_dim);
      store.run_sealed[target] = store.run_sealed[source];
    }
    std::int64_t* slots = store.residual_slots + head * store.key_group;
    for (std::int64_t place = 0; place < store.residual_count[head]; ++place)
      if (slots[place] == from) slots[place] = to;
  }

  /// The quantization step (scale) of element d of the stored key at `slot`, or
  /// 0 while the key still waits in the fp16 residual window (tests and stats).
  static float key_step(const storage<host_space>& store, std::int64_t slot, std::int64_t d) {
    if (store.key_group == 0) return store.key_scales[slot];
    const std::int64_t run = slot / store.slot_run;
    return store.run_sealed[run] ? store.key_scales[run * store.head_dim + d] : 0.0f;
  }
  static float value_step(const storage<host_space>& store, std::int64_t slot) { return store.value_scales[slot]; }

 private:
  // Names in messages.
  static constexpr std::string_view encode_function = Bits == 8 ? "kvtrim::codec::int8::encode" : "kvtrim::codec::int4::encode";
  static constexpr std::string_view load_key_function =
      Bits == 8 ? "kvtrim::codec::int8::load_key" : "kvtrim::codec::int4::load_key";
  static constexpr std::string_view move_function =
      Bits == 8 ? "kvtrim::codec::int8::move_slot" : "kvtrim::codec::int4::move_slot";
  static constexpr std::string_view prepare_function =
      Bits == 8 ? "kvtrim::codec::int8::prepare_head" : "kvtrim::codec::int4::prepare_head";
  static constexpr std::string_view bind_function = Bits == 8 ? "kvtrim::codec::int8::bind" : "kvtrim::codec::int4::bind";

  template <MemorySpace Space>
  static storage<Space> carve(workspace_carver& carver, const config& cfg, std::int64_t slots, std::int64_t heads,
                              std::int64_t head_dim, std::int64_t slot_run) {
    constexpr std::string_view function = bind_function;
    cfg.validate(function);
    if (cfg.grouped())
      detail::check_slot_run(function, slots, slot_run, cfg.key_group);
    else
      detail::check_any_slot_run(function, slot_run);
    const std::int64_t run = cfg.grouped() ? slot_run : 1;
    storage<Space> store;
    const std::int64_t bytes = quantizer::row_bytes(head_dim);
    const std::int64_t key_runs = cfg.grouped() ? slots / run * head_dim : slots;
    store.key_codes = carver.take<std::uint8_t>(slots * bytes);
    store.value_codes = carver.take<std::uint8_t>(slots * bytes);
    store.key_scales = carver.take<float>(key_runs);
    store.value_scales = carver.take<float>(slots);
    if (cfg.asymmetric) {
      store.key_zeros = carver.take<float>(key_runs);
      store.value_zeros = carver.take<float>(slots);
    }
    if (cfg.grouped()) {
      store.run_sealed = carver.take<std::uint8_t>(slots / run);
      store.residual_keys = carver.take<half>(heads * cfg.key_group * head_dim);
      store.residual_slots = carver.take<std::int64_t>(heads * cfg.key_group);
      store.residual_count = carver.take<std::int64_t>(heads);
    }
    store.head_dim = head_dim;
    store.slots = slots;
    store.heads = heads;
    store.key_group = cfg.grouped() ? cfg.key_group : 0;
    store.slot_run = run;
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

  /// The head's group is full: one run of numbers per channel over its
  /// key_group fp16 residual keys; codes go to the slots the tokens were
  /// written at, the channel scales into every slot run the group covers.
  static void seal_group(const storage<host_space>& store, std::int64_t head) {
    const std::int64_t bytes = quantizer::row_bytes(store.head_dim), run = store.slot_run;
    const std::int64_t* slots = store.residual_slots + head * store.key_group;
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
        quantizer::put(store.key_codes + slots[place] * bytes, d, quantizer::code(x, s, store.asymmetric));
      }
      for (std::int64_t place = 0; place < store.key_group; place += run) {
        store.key_scales[slots[place] / run * store.head_dim + d] = s.scale;
        if (store.asymmetric) store.key_zeros[slots[place] / run * store.head_dim + d] = s.zero;
      }
    }
    for (std::int64_t place = 0; place < store.key_group; place += run) store.run_sealed[slots[place] / run] = 1;
    store.residual_count[head] = 0;
  }
};

using int8 = quantized<8>;

}  // namespace kvtrim::codec
