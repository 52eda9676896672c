// kvtrim/codec/layered.hpp — a codec combinator: the sinks and the newest
// tokens of each head in fp16, every older token in the `Inner` codec.
//
// Source: the layered cache of the low-rank SVD article (../shared/seeds: a
// short-term fp16 window over a compressed long-term store), with
// StreamingLLM's sinks (Xiao et al., 2023) kept exact as well; KIVI's fp16
// residual and ShadowKV's exact outliers are the same idea inside one codec.
//
// Per head, in the order tokens are encoded since the head's last compaction:
//   tokens 0 … sinks−1            fp16 (attention sinks; always)
//   the newest `recent` tokens    fp16, in a ring; when a token arrives and the
//                                 ring is full, the oldest one crosses the
//                                 boundary and is read through Inner from then
//                                 on
//   every other token             Inner
// Every token is also encoded into Inner when it arrives, in arrival order, so
// Inner sees exactly the stream it would see alone (group-based codecs such as
// int8's KIVI key groups keep their in-order rule; low_rank refreshes as
// usual): the fp16 rows only shadow it. Crossing the boundary is then just
// dropping the shadow, and costs nothing on append. Keys given pre-RoPE
// (low_rank with key_space::pre_rope) are kept pre-RoPE in the fp16 rows too
// and rotated with Inner's rotate_key to the position load_key / reader.dot
// receives, so both kinds of row answer with the same key. The codec stores no
// positions: the layout passes them (docs/composition.md §1).
//
// Storage: Inner's storage for every slot (bound with the same slot run), plus
// an int32 per slot (its fp16 row or −1), plus per head (sinks + recent) fp16
// key and value rows with their slot. As a combinator it is a codec, not a layout: it composes
// with contiguous, paged and flat layouts and with every scorer. Defaults:
// recent 128 (the article's short-term size, KIVI's residual), sinks 4.
// Backends: cpu.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/workspace.hpp"

namespace kvtrim::codec {

template <Codec Inner>
struct layered {
  static constexpr std::string_view name = "layered";
  using inner_codec = Inner;

  struct config {
    typename Inner::config inner{};
    std::int64_t recent = 128;  // newest tokens per head kept fp16
    std::int64_t sinks = 4;     // first tokens per head kept fp16

    void validate(std::string_view function) const {
      inner.validate(function);
      if (recent < 0 || recent > (1 << 20))
        detail::fail(function, "config.codec.recent", "0 to 2^20 newest tokens kept fp16 (default 128)",
                     std::to_string(recent));
      if (sinks < 0 || sinks > (1 << 20))
        detail::fail(function, "config.codec.sinks", "0 to 2^20 sink tokens kept fp16 (default 4)",
                     std::to_string(sinks));
    }
    std::int64_t rows() const { return sinks + recent; }
  };

  template <MemorySpace Space>
  struct storage {
    typename Inner::template storage<Space> inner{};
    half* row_keys = nullptr;               // [heads, rows, head_dim]
    half* row_values = nullptr;             // [heads, rows, head_dim]
    std::int64_t* row_slots = nullptr;      // [heads, rows]
    std::int32_t* slot_rows = nullptr;      // [slots]: fp16 row of the slot's head, −1: read through Inner
    std::int64_t* arrived = nullptr;        // [heads]: tokens encoded since the last compaction
    std::int64_t head_dim = 0;
    std::int64_t slots = 0;  // capacity
    std::int64_t heads = 0;
    std::int64_t slot_run = 1;  // Inner's (the run it was bound with)
    std::int64_t sinks = 0;
    std::int64_t recent = 0;
  };

  /// Inner's alignment: the combinator adds no runs of its own.
  static std::int64_t slot_alignment(const config& cfg) { return codec::slot_alignment<Inner>(cfg.inner); }

  static std::size_t storage_bytes(const config& cfg, std::int64_t slots, std::int64_t heads, std::int64_t head_dim,
                                   std::int64_t slot_run) {
    workspace_carver carver;
    carve<host_space>(carver, cfg, slots, heads, head_dim, slot_run);
    return carver.bytes();
  }
  static double bytes_per_token(const config& cfg, std::int64_t head_dim, std::int64_t slot_run) {
    return codec::bytes_per_token<Inner>(cfg.inner, head_dim, slot_run) + sizeof(std::int32_t);
  }
  static double bytes_per_token(const config& cfg, std::int64_t head_dim) {
    return Inner::bytes_per_token(cfg.inner, head_dim) + sizeof(std::int32_t);
  }
  static double bytes_per_head(const config& cfg, std::int64_t head_dim) {
    const double row = 2.0 * static_cast<double>(head_dim) * sizeof(half) + 8.0;  // key, value, slot
    return codec::bytes_per_head<Inner>(cfg.inner, head_dim) + static_cast<double>(cfg.rows()) * row + 8.0;
  }

  template <MemorySpace Space>
  static storage<Space> bind(const config& cfg, void* memory, std::int64_t slots, std::int64_t heads,
                             std::int64_t head_dim, std::int64_t slot_run) {
    workspace_carver carver(workspace{memory, ~std::size_t{0}});
    storage<Space> store = carve<Space>(carver, cfg, slots, heads, head_dim, slot_run);
    if constexpr (std::same_as<Space, host_space>) {
      std::fill_n(store.slot_rows, slots, -1);
      std::fill_n(store.arrived, heads, std::int64_t{0});
    }
    return store;
  }

  template <MemorySpace Space>
  static void check_storage(std::string_view function, const storage<Space>& store, std::int64_t head_dim) {
    Inner::check_storage(function, store.inner, head_dim);
    detail::check_storage_head_dim(function, store.head_dim, head_dim);
    if (!store.slot_rows || !store.arrived ||
        (store.sinks + store.recent > 0 && (!store.row_keys || !store.row_values || !store.row_slots)))
      detail::fail(function, "cache.storage", "every array of the codec bound (codec::bind)", "a null pointer");
  }

  template <class Rows>
  static void prepare_head(const storage<host_space>& store, std::int64_t head, std::int64_t sequence_length,
                           std::int64_t count, const Rows& rows) {
    check_head("kvtrim::codec::layered::prepare_head", store, head);
    store.arrived[head] = 0;
    codec::prepare_head<Inner>(store.inner, head, sequence_length, count, rows);
  }

  /// Encodes into Inner (every token, in arrival order) and keeps an fp16
  /// shadow for sinks and the newest tokens.
  static void encode(const storage<host_space>& store, std::int64_t head, std::int64_t slot, std::int64_t position,
                     const float* key, const float* value) {
    constexpr std::string_view function = "kvtrim::codec::layered::encode";
    check_head(function, store, head);
    if (slot < 0 || slot >= store.slots) detail::fail_index(function, "slot", slot, store.slots);
    Inner::encode(store.inner, head, slot, position, key, value);
    const std::int64_t order = store.arrived[head]++;
    std::int64_t row = -1;
    if (order < store.sinks) {
      row = order;
    } else if (store.recent > 0) {
      row = store.sinks + (order - store.sinks) % store.recent;
      if (order - store.sinks >= store.recent) {  // the ring is full: its oldest
                                                  // token crosses into Inner
        const std::int64_t leaving = store.row_slots[head * rows(store) + row];  // −1: a row freed by drop_newest
        if (leaving >= 0 && store.slot_rows[leaving] == row) store.slot_rows[leaving] = -1;
      }
    }
    store.slot_rows[slot] = static_cast<std::int32_t>(row);
    if (row < 0) return;
    const std::int64_t at = head * rows(store) + row;
    for (std::int64_t d = 0; d < store.head_dim; ++d) {
      store.row_keys[at * store.head_dim + d] = half(key[d]);
      store.row_values[at * store.head_dim + d] = half(value[d]);
    }
    store.row_slots[at] = slot;
  }

  /// scheme::truncate's limit: Inner's (the dropped tokens were encoded there
  /// too), and no further back than the head's last compaction.
  static std::int64_t rollback_horizon(const storage<host_space>& store, std::int64_t head) {
    return std::min(store.arrived[head], codec::rollback_horizon<Inner>(store.inner, head));
  }
  /// Forgets the newest `count` tokens: Inner forgets them, their fp16 rows are
  /// freed. A token the dropped ones pushed out of the ring when they arrived
  /// stays read through Inner (its fp16 row was overwritten): until `count` more
  /// tokens arrive, the ring holds up to `count` fewer fp16 tokens than a cache
  /// that never saw the dropped ones; from then on both hold the same
  /// (docs/policies/layered.md).
  template <class SlotOf>
  static void drop_newest(const storage<host_space>& store, std::int64_t head, std::int64_t count,
                          const SlotOf& slot_of) {
    codec::drop_newest<Inner>(store.inner, head, count, slot_of);
    for (std::int64_t k = 0; k < count; ++k) {
      const std::int64_t order = store.arrived[head] - 1 - k;
      const std::int64_t slot = slot_of(k);
      const std::int64_t row = order < store.sinks ? order
                               : store.recent > 0 ? store.sinks + (order - store.sinks) % store.recent
                                                  : -1;
      if (row >= 0 && store.slot_rows[slot] == row) store.row_slots[head * rows(store) + row] = -1;
      store.slot_rows[slot] = -1;
    }
    store.arrived[head] -= count;
  }

  static void load_key(const storage<host_space>& store, std::int64_t head, std::int64_t slot, std::int64_t position,
                       float* out) {
    const std::int32_t row = store.slot_rows[slot];
    if (row < 0) return Inner::load_key(store.inner, head, slot, position, out);
    read_row(store, store.row_keys, head, row, out);
    rotate_key(store, position, out);
  }
  static void load_value(const storage<host_space>& store, std::int64_t head, std::int64_t slot, float* out) {
    const std::int32_t row = store.slot_rows[slot];
    if (row < 0) return Inner::load_value(store.inner, head, slot, out);
    read_row(store, store.row_values, head, row, out);
  }

  static void rotate_key(const storage<host_space>& store, std::int64_t position, float* key) {
    if constexpr (requires { Inner::rotate_key(store.inner, position, key); })
      Inner::rotate_key(store.inner, position, key);
  }

  /// Fp16 slots are read here; the rest through Inner's own reader (low rank:
  /// no keys rebuilt).
  class reader {
   public:
    reader(const storage<host_space>& store, std::int64_t head, const float* query)
        : store_(store),
          head_(head),
          query_(query),
          inner_(codec::attention_reader<Inner>(store.inner, head, query, store.head_dim)) {}

    float dot(std::int64_t slot, std::int64_t position) {
      const std::int32_t row = store_.slot_rows[slot];
      if (row < 0) return inner_.dot(slot, position);
      read_row(store_, store_.row_keys, head_, row, row_.data());
      rotate_key(store_, position, row_.data());
      float sum = 0.0f;
      for (std::int64_t d = 0; d < store_.head_dim; ++d) sum += query_[d] * row_[d];
      return sum;
    }
    void accumulate(std::int64_t slot, float weight) {
      const std::int32_t row = store_.slot_rows[slot];
      if (row < 0) return inner_.accumulate(slot, weight);
      read_row(store_, store_.row_values, head_, row, row_.data());
      for (std::int64_t d = 0; d < store_.head_dim; ++d) accumulator_[d] += weight * row_[d];
    }
    void finish(float* out) const {
      inner_.finish(out);
      for (std::int64_t d = 0; d < store_.head_dim; ++d) out[d] += accumulator_[d];
    }

   private:
    const storage<host_space>& store_;
    std::int64_t head_;
    const float* query_;
    decltype(codec::attention_reader<Inner>(std::declval<const typename Inner::template storage<host_space>&>(), 0,
                                            nullptr, 0)) inner_;
    std::array<float, max_head_dim> row_{};
    std::array<float, max_head_dim> accumulator_{};
  };

  static reader attention_reader(const storage<host_space>& store, std::int64_t head, const float* query) {
    return reader(store, head, query);
  }

  /// Moves a token (layout::flat's repack): Inner's copy, and the fp16 row
  /// follows the slot.
  static void move_slot(const storage<host_space>& store, std::int64_t head, std::int64_t from, std::int64_t to) {
    if constexpr (requires { Inner::move_slot(store.inner, head, from, to); }) {
      Inner::move_slot(store.inner, head, from, to);
    } else {
      // Only codecs whose load is exact and stateless may move this way (plain).
      static_assert(is_plain<Inner>, "kvtrim::codec::layered::move_slot: the inner codec needs a move_slot");
      std::array<float, max_head_dim> key{}, value{};
      Inner::load_key(store.inner, head, from, 0, key.data());
      Inner::load_value(store.inner, head, from, value.data());
      Inner::encode(store.inner, head, to, 0, key.data(), value.data());
    }
    const std::int32_t row = store.slot_rows[from];
    store.slot_rows[to] = row;
    if (row >= 0) store.row_slots[head * rows(store) + row] = to;
  }

  /// Whether `slot` is currently read from an fp16 row (tests and stats).
  static bool in_fp16(const storage<host_space>& store, std::int64_t slot) { return store.slot_rows[slot] >= 0; }

 private:
  template <MemorySpace Space>
  static std::int64_t rows(const storage<Space>& store) {
    return store.sinks + store.recent;
  }

  template <MemorySpace Space>
  static storage<Space> carve(workspace_carver& carver, const config& cfg, std::int64_t slots, std::int64_t heads,
                              std::int64_t head_dim, std::int64_t slot_run) {
    cfg.validate("kvtrim::codec::layered::bind");
    storage<Space> store;
    const std::size_t inner_bytes = Inner::storage_bytes(cfg.inner, slots, heads, head_dim, slot_run);
    std::byte* inner_memory = carver.take<std::byte>(static_cast<std::int64_t>(inner_bytes));
    if (inner_memory != nullptr) {
      store.inner = Inner::template bind<Space>(cfg.inner, inner_memory, slots, heads, head_dim, slot_run);
      store.slot_run = store.inner.slot_run;
    }
    store.row_keys = carver.take<half>(heads * cfg.rows() * head_dim);
    store.row_values = carver.take<half>(heads * cfg.rows() * head_dim);
    store.row_slots = carver.take<std::int64_t>(heads * cfg.rows());
    store.slot_rows = carver.take<std::int32_t>(slots);
    store.arrived = carver.take<std::int64_t>(heads);
    store.head_dim = head_dim;
    store.slots = slots;
    store.heads = heads;
    store.sinks = cfg.sinks;
    store.recent = cfg.recent;
    return store;
  }

  static void check_head(std::string_view function, const storage<host_space>& store, std::int64_t head) {
    if (head < 0 || head >= store.heads) detail::fail_index(function, "head", head, store.heads);
  }

  static void read_row(const storage<host_space>& store, const half* table, std::int64_t head, std::int64_t row,
                       float* out) {
    const half* source = table + (head * rows(store) + row) * store.head_dim;
    for (std::int64_t d = 0; d < store.head_dim; ++d) out[d] = static_cast<float>(source[d]);
  }
};

}  // namespace kvtrim::codec
