// kvtrim/codec/hooks.hpp — the optional half of the Codec protocol, and the
// one-line helpers through which layouts and decode attention reach it.
//
// Every codec has per-token `encode(storage, head, slot, key, value)` and
// `decode_key` / `decode_value` (core/concepts.hpp). Codecs that keep state per
// head or per group of slots (KIVI key groups, fp8 per-head scales, low-rank
// bases, the layered cache's fp16 rows) may add any of these static members;
// each is detected with `requires`, so codec::plain and every layout written
// before them keep working unchanged:
//
//   prepare_head(storage, head, sequence_length, count, rows)
//       A layout is about to replace everything head `head` holds with `count`
//       tokens of a `sequence_length`-token prefill; rows(i, key, value) fills
//       the i-th one (head_dim floats each). Per-head state is reset here and
//       fitted here (a low-rank basis from the head's keys, an fp8 scale from
//       their largest magnitude). Layouts call codec::prepare_head below in
//       compact, before encoding the head's first kept token.
//   encode(storage, head, slot, key, value, position)
//       As encode, with the token's position in the sequence (its prefill index
//       in compact). Without a position a codec assumes the token follows the
//       last one it saw for the head (append). Layouts call codec::encode_at.
//   move_slot(storage, head, from, to)
//       Moves a stored token without decoding it (layout::flat's repack).
//   attention_reader(storage, head, query)
//       A reader for decode attention that need not rebuild keys (low rank:
//       scores (q·U)·c, output (Σ p·c)·Uᵀ). Attention calls
//       codec::attention_reader.
//   rotate_key(storage, position, key)
//       For codecs fed pre-RoPE keys: turns a stored-form key into the key
//       attention sees (the layered cache applies it to its fp16 rows).
//   bytes_per_head(config, head_dim)
//       Bytes a codec spends per head beyond its per-token bytes (bases, fp16
//       residual windows); memory accounting adds them (core/stats.hpp).
//
// The rules a layout must follow for group-based codecs (int8/int4 with KIVI
// per-channel key groups): every aligned run of `key_group` slots belongs to
// one head and is written in order; the codec checks this and throws otherwise.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>

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

/// Encodes one token; passes `position` (≥ 0) to codecs that take positions.
/// A negative position means "the token after the head's last one" (append).
template <class C, class Storage>
void encode_at(const Storage& store, std::int64_t head, std::int64_t slot, const float* key, const float* value,
               std::int64_t position) {
  if constexpr (requires { C::encode(store, head, slot, key, value, position); }) {
    if (position >= 0) {
      C::encode(store, head, slot, key, value, position);
      return;
    }
  }
  C::encode(store, head, slot, key, value);
}

/// Moves a stored token from slot `from` to slot `to` of head `head` (layout::flat's
/// repack): as stored when the codec can, else decoded and encoded again at
/// `position` (exact for codec::plain: decoding is exact and encoding a
/// representable value returns it).
template <class C, class Storage>
void move_slot(const Storage& store, std::int64_t head, std::int64_t from, std::int64_t to, std::int64_t position) {
  if constexpr (requires { C::move_slot(store, head, from, to); }) {
    C::move_slot(store, head, from, to);
  } else {
    std::array<float, max_head_dim> key{}, value{};
    C::decode_key(store, head, from, key.data());
    C::decode_value(store, head, from, value.data());
    encode_at<C>(store, head, to, key.data(), value.data(), position);
  }
}

/// Slots a codec wants in one aligned run of one head (KIVI: its key group); 1 when it has no such state.
template <class C>
std::int64_t slot_alignment(const typename C::config& cfg) {
  if constexpr (requires { C::slot_alignment(cfg); })
    return C::slot_alignment(cfg);
  else
    return 1;
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

/// The reader decode attention uses when a codec has none of its own: it
/// decodes each key and value row through the codec.
///   dot(slot)              q · k_slot
///   accumulate(slot, w)    acc += w · v_slot
///   finish(out)            out = acc (head_dim floats, not normalised)
template <class C>
class decoding_reader {
 public:
  using storage_type = typename C::template storage<host_space>;

  decoding_reader(const storage_type& store, std::int64_t head, const float* query, std::int64_t head_dim)
      : store_(store), head_(head), query_(query), head_dim_(head_dim) {}

  float dot(std::int64_t slot) {
    C::decode_key(store_, head_, slot, row_.data());
    float sum = 0.0f;
    for (std::int64_t d = 0; d < head_dim_; ++d) sum += query_[d] * row_[d];
    return sum;
  }
  void accumulate(std::int64_t slot, float weight) {
    C::decode_value(store_, head_, slot, row_.data());
    for (std::int64_t d = 0; d < head_dim_; ++d) accumulator_[d] += weight * row_[d];
  }
  void finish(float* out) const {
    for (std::int64_t d = 0; d < head_dim_; ++d) out[d] = accumulator_[d];
  }

 private:
  const storage_type& store_;
  std::int64_t head_;
  const float* query_;
  std::int64_t head_dim_;
  std::array<float, max_head_dim> row_{};
  std::array<float, max_head_dim> accumulator_{};
};

/// The codec's own reader when it has one, else a decoding_reader.
template <class C>
auto attention_reader(const typename C::template storage<host_space>& store, std::int64_t head, const float* query,
                      std::int64_t head_dim) {
  if constexpr (requires { C::attention_reader(store, head, query); })
    return C::attention_reader(store, head, query);
  else
    return decoding_reader<C>(store, head, query, head_dim);
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

/// Throws unless a codec's storage was bound for the model's head_dim.
inline void check_storage_head_dim(std::string_view function, std::int64_t bound, std::int64_t head_dim) {
  if (bound != head_dim)
    fail(function, "cache.storage.head_dim", cat("the model's head_dim = ", head_dim), std::to_string(bound));
}
}  // namespace kvtrim::detail
