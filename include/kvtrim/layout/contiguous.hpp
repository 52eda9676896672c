// kvtrim/layout/contiguous.hpp — one capacity and one length for every head.
//
// The padded-batch cache most engines start with: every (sequence, kv head)
// owns `capacity` slots and holds the same number of tokens, `length`. Because
// all heads are equally long it can only be combined with budgets and scorers
// that keep the same count in every head (uniform, static windows); ragged
// per-head budgets (Ada-KV, RazorAttention) need layout::paged or layout::flat.
//
// Mapping (mdspan's layout_stride over slots): slot(b, h, i) =
//   b·batch_stride + h·head_stride + i·token_stride.
// The default is [batch, kv_head, token] ("HND"); an engine whose cache is
// [batch, token, kv_head] ("NHD") sets head_stride = 1, token_stride = kv_heads.
// The codec stores whatever a token needs at that slot index.
//
// Backends: cpu, cuda.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/shape.hpp"

namespace kvtrim::layout {

struct contiguous {
  static constexpr std::string_view name = "layout::contiguous";
  static constexpr bool ragged_heads = false;

  /// Slot strides of the mapping (in slots, not bytes).
  struct mapping {
    std::int64_t batch_stride = 0;
    std::int64_t head_stride = 0;
    std::int64_t token_stride = 1;

    /// [batch, kv_head, token]: each head's tokens are adjacent.
    static constexpr mapping heads_major(std::int64_t kv_heads, std::int64_t capacity) {
      return {kv_heads * capacity, capacity, 1};
    }
    /// [batch, token, kv_head]: each token's heads are adjacent.
    static constexpr mapping tokens_major(std::int64_t kv_heads, std::int64_t capacity) {
      return {kv_heads * capacity, 1, kv_heads};
    }
  };

  /// A non-owning view of a contiguous cache stored with `CodecT`.
  template <Codec CodecT, MemorySpace Space>
  struct view {
    using layout_type = contiguous;
    using codec = CodecT;
    using space = Space;
    using storage_type = typename CodecT::template storage<Space>;

    storage_type storage{};
    model_shape shape{};
    std::int64_t batch = 0;
    std::int64_t capacity = 0;  // slots per (sequence, kv head)
    std::int64_t length = 0;    // tokens every (sequence, kv head) holds
    mapping map{};

    KVTRIM_HOST_DEVICE std::int64_t heads() const { return batch * shape.kv_heads; }
    KVTRIM_HOST_DEVICE std::int64_t slot(std::int64_t b, std::int64_t h, std::int64_t i) const {
      return b * map.batch_stride + h * map.head_stride + i * map.token_stride;
    }
    KVTRIM_HOST_DEVICE std::int64_t head_length(std::int64_t /*b*/, std::int64_t /*h*/) const { return length; }

    /// Bytes an owning cache of this shape allocates.
    /// Throws kvtrim::error for a shape, batch or capacity no cache can have.
    static std::size_t bytes(const model_shape& shape, std::int64_t batch, std::int64_t capacity,
                             const typename CodecT::config& codec_config) {
      constexpr std::string_view function = "kvtrim::layout::contiguous::view::bytes";
      shape.validate(function);
      if (batch < 1) detail::fail(function, "batch", "at least one sequence", std::to_string(batch));
      if (capacity < 1) detail::fail(function, "capacity", "at least one slot per head", std::to_string(capacity));
      codec_config.validate(function);
      // Interim (issue 9, until the layout rewrite lands): U = G.
      return CodecT::storage_bytes(codec_config, batch * shape.kv_heads * capacity, batch * shape.kv_heads,
                                   shape.head_dim, ::kvtrim::codec::slot_alignment<CodecT>(codec_config));
    }
    /// An empty heads-major view over `memory` (of bytes(...) bytes).
    static view bind(void* memory, const model_shape& shape, std::int64_t batch, std::int64_t capacity,
                     const typename CodecT::config& codec_config) {
      view result;
      result.storage = CodecT::template bind<Space>(codec_config, memory, batch * shape.kv_heads * capacity,
                                                    batch * shape.kv_heads, shape.head_dim,
                                                    ::kvtrim::codec::slot_alignment<CodecT>(codec_config));
      result.shape = shape;
      result.batch = batch;
      result.capacity = capacity;
      result.map = mapping::heads_major(shape.kv_heads, capacity);
      return result;
    }
  };

  /// Throws unless `count` more tokens fit after what every head holds.
  template <class View>
  static void check_room(std::string_view function, const View& cache, std::int64_t count) {
    if (cache.length + count > cache.capacity)
      detail::fail(function, "new_keys",
                   detail::cat("at most ", cache.capacity - cache.length, " tokens (capacity ", cache.capacity,
                               ", holding ", cache.length, ")"),
                   detail::cat(count, " tokens"));
  }

  /// Throws unless the view's sizes and storage are sane.
  template <class View>
  static void check(std::string_view function, const View& cache) {
    cache.shape.validate(function);
    if (cache.batch < 1) detail::fail(function, "cache.batch", "at least one sequence", std::to_string(cache.batch));
    if (cache.capacity < 1)
      detail::fail(function, "cache.capacity", "at least one slot per head", std::to_string(cache.capacity));
    if (cache.length < 0 || cache.length > cache.capacity)
      detail::fail(function, "cache.length", detail::cat("a length in [0, capacity = ", cache.capacity, "]"),
                   std::to_string(cache.length));
    if (cache.map.batch_stride < 0 || cache.map.head_stride < 0 || cache.map.token_stride < 0)
      detail::fail(function, "cache.map", "non-negative slot strides",
                   detail::cat("{", cache.map.batch_stride, ", ", cache.map.head_stride, ", ", cache.map.token_stride,
                               "}"));
    View::codec::check_storage(function, cache.storage, cache.shape.head_dim);
  }
};

}  // namespace kvtrim::layout
