// kvtrim/codec/hooks.hpp — the element operations every codec provides, the
// optional half of the Codec protocol, and the one-line helpers through which
// layouts and decode attention reach them (docs/composition.md §2–3).
//
// A codec is an accessor policy: it defines its storage and these static
// element operations (KVTRIM_HOST_DEVICE where the codec has no host-only
// state, so one CUDA decode kernel template can take the codec as a parameter):
//
//   encode(storage, head, slot, position, key, value)
//       Stores one token (head_dim floats each) of flattened head `head` at
//       `slot`. `position` (≥ 0) is the token's position in its sequence, given
//       by the layout (codecs never count positions). Encodes are ordered per
//       head: the layout writes a head's tokens in logical order.
//   load_key(storage, head, slot, position, out)
//       The key attention sees, dequantized to float (post-RoPE: pre-RoPE codecs
//       rotate by `position`).
//   load_value(storage, head, slot, out)
//   attention_reader(storage, head, query)            (optional, see below)
//
// Optional hooks, each detected with `requires`:
//
//   prepare_head(storage, head, sequence_length, count, rows)
//       A layout is about to replace everything head `head` holds with `count`
//       tokens of a `sequence_length`-token prefill; rows(i, key, value) fills
//       the i-th one. Per-head state is reset and fitted here (a low-rank basis,
//       an fp8 scale, the start of a KIVI key group). Layouts call
//       codec::prepare_head below before encoding the head's first kept token.
//   move_slot(storage, head, from, to)
//       Moves a stored token without decoding it (layout::flat's repack).
//   slot_alignment(config)
//       The codec's run alignment G (int8/int4 KIVI key groups: key_group;
//       default 1). A layout binds storage with a slot run U dividing G and
//       guarantees every aligned run of U slots belongs to one head and holds
//       consecutive logical indices [kU, (k+1)U) written in order (§3).
//   attention_reader(storage, head, query)
//       A reader for decode attention that need not rebuild keys (low rank).
//       Readers provide dot(slot, position), accumulate(slot, weight) and
//       finish(out). Attention calls codec::attention_reader.
//   rotate_key(storage, position, key)
//       For codecs fed pre-RoPE keys: turns a stored-form key into the key
//       attention sees (the layered cache applies it to its fp16 rows).
//   bytes_per_head(config, head_dim)
//       Bytes a codec spends per head beyond its per-token bytes.
//   rollback_horizon(storage, head) / drop_newest(storage, head, count, slot_of)
//       Speculative decoding's rollback (scheme::truncate): how many of the
//       head's newest tokens can be forgotten exactly (a codec whose newest
//       tokens wait in an exact window — KIVI's fp16 residual, low_rank's
//       pending refresh buffer — can forget those; a token already folded into
//       shared state, a sealed key group, cannot), and forgetting them: the
//       codec's per-head state returns to what it was before they were encoded.
//       slot_of(k) is the slot of the k-th dropped token, newest first (k = 0
//       is the newest). Codecs without per-head streaming state have neither:
//       every stored token can be dropped, and dropping is the layout's alone.
//
// Storage: storage_bytes(cfg, slots, heads, head_dim, slot_run) and
// bind<Space>(cfg, memory, slots, heads, head_dim, slot_run); every storage
// records `slots` (capacity) and `slot_run` (the U it was bound with; 1 for
// codecs without runs), so layouts can check slot indices and mappings.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>

#include "kvtrim/core/config.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim::codec {

/// Calls C::prepare_head when the codec has one (no-op otherwise).
template <class C, class Storage, class Rows>
void prepare_head(const Storage& store, std::int64_t head, std::int64_t sequence_length, std::int64_t count,
                  const Rows& rows) {
  if constexpr (requires { C::prepare_head(store, head, sequence_length, count, rows); })
    C::prepare_head(store, head, sequence_length, count, rows);
}

/// The codec's slot alignment G (1 when it has no runs): layouts bind its
/// storage with a slot run U that divides G (docs/composition.md §3).
template <class C>
std::int64_t slot_alignment(const typename C::config& cfg) {
  if constexpr (requires { C::slot_alignment(cfg); })
    return C::slot_alignment(cfg);
  else
    return 1;
}

/// Moves a stored token from slot `from` to slot `to` of head `head` (layout::flat's
/// repack): as stored when the codec can, else loaded and encoded again at
/// `position` (exact for codec::plain: loading is exact and encoding a
/// representable value returns it).
template <class C, class Storage>
void move_slot(const Storage& store, std::int64_t head, std::int64_t from, std::int64_t to, std::int64_t position) {
  if constexpr (requires { C::move_slot(store, head, from, to); }) {
    C::move_slot(store, head, from, to);
  } else {
    std::array<float, max_head_dim> key{}, value{};
    C::load_key(store, head, from, position, key.data());
    C::load_value(store, head, from, value.data());
    C::encode(store, head, to, position, key.data(), value.data());
  }
}

/// How many of head `head`'s newest tokens the codec can forget exactly
/// (scheme::truncate's limit; unlimited for codecs without per-head streaming state).
inline constexpr std::int64_t unlimited_rollback = std::numeric_limits<std::int64_t>::max();
template <class C, class Storage>
std::int64_t rollback_horizon(const Storage& store, std::int64_t head) {
  if constexpr (requires { C::rollback_horizon(store, head); })
    return C::rollback_horizon(store, head);
  else
    return unlimited_rollback;
}

/// Forgets head `head`'s newest `count` tokens (≤ rollback_horizon); slot_of(k)
/// is the slot of the k-th dropped token, newest first. A no-op for codecs
/// without per-head streaming state.
template <class C, class Storage, class SlotOf>
void drop_newest(const Storage& store, std::int64_t head, std::int64_t count, const SlotOf& slot_of) {
  if constexpr (requires { C::drop_newest(store, head, count, slot_of); }) C::drop_newest(store, head, count, slot_of);
}

/// Bytes the codec spends per head beyond its per-token bytes (0 when it has no
/// such state).
template <class C>
double bytes_per_head(const typename C::config& cfg, std::int64_t head_dim) {
  if constexpr (requires { C::bytes_per_head(cfg, head_dim); })
    return C::bytes_per_head(cfg, head_dim);
  else
    return 0.0;
}

/// Bytes one token of one head costs in storage bound with `slot_run` (per-run
/// state amortised over the run); codecs without runs ignore slot_run.
template <class C>
double bytes_per_token(const typename C::config& cfg, std::int64_t head_dim, std::int64_t slot_run) {
  if constexpr (requires { C::bytes_per_token(cfg, head_dim, slot_run); })
    return C::bytes_per_token(cfg, head_dim, slot_run);
  else
    return C::bytes_per_token(cfg, head_dim);
}

/// The reader decode attention uses when a codec has none of its own: it
/// loads each key and value row through the codec.
///   dot(slot, position)    q · k_slot (the key at its position)
///   accumulate(slot, w)    acc += w · v_slot
///   finish(out)            out = acc (head_dim floats, not normalised)
template <class C, class Space = host_space>
class decoding_reader {
 public:
  using storage_type = typename C::template storage<Space>;

  KVTRIM_HOST_DEVICE decoding_reader(const storage_type& store, std::int64_t head, const float* query,
                                     std::int64_t head_dim)
      : store_(store), head_(head), query_(query), head_dim_(head_dim) {
    for (std::int64_t d = 0; d < head_dim_; ++d) accumulator_[d] = 0.0f;
  }

  KVTRIM_HOST_DEVICE float dot(std::int64_t slot, std::int64_t position) {
    C::load_key(store_, head_, slot, position, row_);
    float sum = 0.0f;
    for (std::int64_t d = 0; d < head_dim_; ++d) sum += query_[d] * row_[d];
    return sum;
  }
  KVTRIM_HOST_DEVICE void accumulate(std::int64_t slot, float weight) {
    C::load_value(store_, head_, slot, row_);
    for (std::int64_t d = 0; d < head_dim_; ++d) accumulator_[d] += weight * row_[d];
  }
  KVTRIM_HOST_DEVICE void finish(float* out) const {
    for (std::int64_t d = 0; d < head_dim_; ++d) out[d] = accumulator_[d];
  }

 private:
  const storage_type& store_;
  std::int64_t head_;
  const float* query_;
  std::int64_t head_dim_;
  float row_[max_head_dim];
  float accumulator_[max_head_dim];
};

/// Whether codec C brings its own attention reader (host only: low_rank, layered).
template <class C, class Space>
concept has_own_reader = requires(const typename C::template storage<Space>& store, const float* query) {
  C::attention_reader(store, std::int64_t{}, query);
};

/// The codec's own reader when it has one (host) ...
template <class C, class Space = host_space>
  requires has_own_reader<C, Space>
auto attention_reader(const typename C::template storage<Space>& store, std::int64_t head, const float* query,
                      std::int64_t /*head_dim*/) {
  return C::attention_reader(store, head, query);
}
/// ... else a decoding_reader (host and device).
template <class C, class Space = host_space>
  requires(!has_own_reader<C, Space>)
KVTRIM_HOST_DEVICE auto attention_reader(const typename C::template storage<Space>& store, std::int64_t head,
                                         const float* query, std::int64_t head_dim) {
  return decoding_reader<C, Space>(store, head, query, head_dim);
}

/// The position of the i-th token of head (b, h) of a (host) layout view: the
/// layout's `positions.slot_position[slot]` (docs/composition.md §1).
template <class View>
std::int64_t position_of(const View& cache, std::int64_t b, std::int64_t h, std::int64_t i) {
  return cache.positions.slot_position[cache.slot(b, h, i)];
}

}  // namespace kvtrim::codec

namespace kvtrim::detail {
/// Throws unless all `count` values are finite: quantizing codecs refuse NaN
/// and ±Inf rather than store a silently wrong scale for a whole row or group.
inline void check_finite_row(std::string_view function, std::string_view argument, const float* values,
                             std::int64_t count, std::int64_t head, std::int64_t slot) {
  for (std::int64_t d = 0; d < count; ++d)
    if (!std::isfinite(values[d]))
      fail(function, argument, "finite values (NaN and Inf cannot be quantized)",
           cat(values[d], " at channel ", d, " of head ", head, ", slot ", slot));
}

/// Throws for a codec's head or slot argument outside [0, count). Callers test
/// the range themselves, so the compiler sees that an index past it never reaches memory.
[[noreturn]] inline void fail_index(std::string_view function, std::string_view argument, std::int64_t index,
                                    std::int64_t count) {
  fail(function, argument, cat("a ", argument, " in [0, ", count, ")"), std::to_string(index));
}

/// Throws unless `slot_run` is a run a codec of slot alignment `alignment` can
/// be bound with (U ≥ 1 dividing the alignment) and `slots` is a whole number
/// of runs (docs/composition.md §3).
inline void check_slot_run(std::string_view function, std::int64_t slots, std::int64_t slot_run,
                           std::int64_t alignment) {
  if (slot_run < 1 || alignment % slot_run != 0)
    fail(function, "slot_run",
         cat("a run of slots dividing the codec's slot alignment ", alignment,
             " (codec::slot_alignment; paged: gcd(page_size, alignment))"),
         std::to_string(slot_run));
  if (slots < 0 || slots % slot_run != 0)
    fail(function, "slots", cat("a multiple of slot_run = ", slot_run, " (whole runs of slots)"),
         std::to_string(slots));
}

/// Throws unless slot_run ≥ 1: codecs without runs accept any U and ignore it.
inline void check_any_slot_run(std::string_view function, std::int64_t slot_run) {
  if (slot_run < 1) fail(function, "slot_run", "a run of at least 1 slot", std::to_string(slot_run));
}

/// Throws unless a codec's storage was bound for the model's head_dim.
inline void check_storage_head_dim(std::string_view function, std::int64_t bound, std::int64_t head_dim) {
  if (bound != head_dim)
    fail(function, "cache.storage.head_dim", cat("the model's head_dim = ", head_dim), std::to_string(bound));
}
}  // namespace kvtrim::detail

