// kvtrim/backend/cpu/detail/writes.hpp — the one path by which the CPU reference
// writes a token into any layout (docs/composition.md §1–2).
//
// Every layout decides where a head's logical index lives (view.slot); these
// functions fill it: the codec's ordered encode with the token's position, and
// the position in the layout's table. Compaction reads its rows from a
// `kept_source`, which substitutes a scorer's compensation token
// (RazorAttention) for the placeholder it kept, so that token goes through the
// same encode as every other — in order, with a position — never a second
// write to a slot already encoded.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"

namespace kvtrim::detail {

/// The rows compaction writes: kept token i of a head is input token kept.tokens[…],
/// at position start_position + token, unless it is the head's compensation token.
template <class KeyT>
struct kept_source {
  kv_view<KeyT> keys;
  kv_view<KeyT> values;
  selection_view<host_space> kept;
  std::int64_t start_position = 0;
  const compensation_rows* compensation = nullptr;
  const std::int64_t* sequence_lengths = nullptr;  // a padded batch's prompt lengths (null: all keys.extent(2))

  kept_source(const kv_view<KeyT>& keys_in, const kv_view<KeyT>& values_in, const selection_view<host_space>& kept_in,
              const compact_args& args)
      : keys(keys_in), values(values_in), kept(kept_in), start_position(args.start_position),
        compensation(args.compensation), sequence_lengths(args.sequence_lengths) {}

  std::int64_t count(std::int64_t head) const { return kept.count(head); }
  /// The prefill length of flattened head `head`'s sequence.
  std::int64_t sequence_length(std::int64_t head) const {
    return sequence_lengths != nullptr ? sequence_lengths[head / keys.extent(1)] : keys.extent(2);
  }

  /// Fills key/value (head_dim floats) for kept row i of (b, h); returns its position.
  std::int64_t row(std::int64_t b, std::int64_t h, std::int64_t head, std::int64_t i, float* key,
                   float* value) const {
    const std::int64_t head_dim = keys.extent(3);
    if (compensation != nullptr && compensation->index[head] == i) {
      for (std::int64_t d = 0; d < head_dim; ++d) {
        key[d] = compensation->keys[head * head_dim + d];
        value[d] = compensation->values[head * head_dim + d];
      }
      return compensation->position[head];
    }
    const std::int64_t token = kept.tokens[kept.offsets[head] + i];
    for (std::int64_t d = 0; d < head_dim; ++d) {
      key[d] = to_float(keys(b, h, token, d));
      value[d] = to_float(values(b, h, token, d));
    }
    return start_position + token;
  }
};

/// Encodes one token at `slot` of flattened head `head` and records its position.
template <class View>
void write_token(const View& cache, std::int64_t head, std::int64_t slot, std::int64_t position, const float* key,
                 const float* value) {
  View::codec::encode(cache.storage, head, slot, position, key, value);
  cache.positions.slot_position[slot] = static_cast<std::int32_t>(position);
}

/// True when the codec is codec::plain<T> and the input rows are T already.
template <class Codec, class KeyT>
inline constexpr bool stores_input_as_is = false;
template <class T, class KeyT>
inline constexpr bool stores_input_as_is<codec::plain<T>, KeyT> = std::is_same_v<T, std::remove_const_t<KeyT>>;

/// Rewrites flattened head `head` with its kept rows at logical indices 0, 1, …
/// (ascending token order), after letting a stateful codec (low-rank bases, fp8
/// scales, key groups) prepare the head from exactly those rows; sets the
/// head's next position to the end of the prefill.
template <class View, class KeyT>
void write_kept_head(const View& cache, const kept_source<KeyT>& source, std::int64_t head) {
  const std::int64_t b = head / cache.shape.kv_heads;
  const std::int64_t h = head % cache.shape.kv_heads;
  const auto rows = [&](std::int64_t i, float* key, float* value) { source.row(b, h, head, i, key, value); };
  codec::prepare_head<typename View::codec>(cache.storage, head, source.sequence_length(head), source.count(head),
                                            rows);
  std::array<float, max_head_dim> key{}, value{};
  for (std::int64_t i = 0; i < source.count(head); ++i) {
    if constexpr (stores_input_as_is<typename View::codec, KeyT>) {
      // codec::plain<T> with T the input's type: encode(to_float(x)) = x, bit for bit
      // (finite inputs: scheme checks), so the row is copied without the round trip.
      if (source.compensation == nullptr || source.compensation->index[head] != i) {
        const std::int64_t token = source.kept.tokens[source.kept.offsets[head] + i];
        const std::int64_t slot = cache.slot(b, h, i), head_dim = cache.storage.head_dim;
        auto* key_row = cache.storage.keys + slot * head_dim;
        auto* value_row = cache.storage.values + slot * head_dim;
        for (std::int64_t d = 0; d < head_dim; ++d) {
          key_row[d] = source.keys(b, h, token, d);
          value_row[d] = source.values(b, h, token, d);
        }
        cache.positions.slot_position[slot] = static_cast<std::int32_t>(source.start_position + token);
        continue;
      }
    }
    const std::int64_t position = source.row(b, h, head, i, key.data(), value.data());
    write_token(cache, head, cache.slot(b, h, i), position, key.data(), value.data());
  }
  cache.positions.next_position[head] = source.start_position + source.sequence_length(head);
}

/// Writes tokens 0..count−1 of input head (b, h) to the head's logical indices
/// first, first + 1, … at its next positions, and advances its next position.
template <class View, class KeyT>
void write_appended(const View& cache, const kv_view<KeyT>& keys, const kv_view<KeyT>& values, std::int64_t b,
                    std::int64_t h, std::int64_t first, std::int64_t count) {
  const std::int64_t head = b * cache.shape.kv_heads + h;
  std::array<float, max_head_dim> key{}, value{};
  const std::int64_t next = cache.positions.next_position[head];
  for (std::int64_t i = 0; i < count; ++i) {
    for (std::int64_t d = 0; d < cache.shape.head_dim; ++d) {
      key[d] = to_float(keys(b, h, i, d));
      value[d] = to_float(values(b, h, i, d));
    }
    write_token(cache, head, cache.slot(b, h, first + i), next + i, key.data(), value.data());
  }
  cache.positions.next_position[head] = next + count;
}

/// Copies a layout's compensation entries from the rows a scorer computed.
template <class View>
void record_compensation(const View& cache, const compensation_rows* compensation) {
  if constexpr (requires { cache.compensation; }) {
    cache.compensation.clear(cache.heads());
    if (compensation == nullptr) return;
    for (std::int64_t head = 0; head < cache.heads(); ++head)
      if (compensation->index[head] >= 0) {
        cache.compensation.index[head] = compensation->index[head];
        cache.compensation.bias[head] = compensation->bias[head];
      }
  }
}

}  // namespace kvtrim::detail
