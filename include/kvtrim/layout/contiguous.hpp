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
// The codec stores whatever a token needs at that slot index; the layout keeps
// each slot's position and the one length every head has (docs/composition.md).
//
// Backends: cpu, cuda.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <string>
#include <string_view>

#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/detail/positions.hpp"
#include "kvtrim/layout/detail/storage.hpp"

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

  /// Slots between two heads of an owning cache: the capacity rounded up to the
  /// codec's slot alignment (KIVI key groups), so every head starts a slot run.
  template <Codec CodecT>
  static std::int64_t head_stride_for(std::int64_t capacity, const typename CodecT::config& codec_config) {
    const std::int64_t alignment = ::kvtrim::codec::slot_alignment<CodecT>(codec_config);
    return detail::checked_mul("kvtrim::layout::contiguous::view::bytes", "capacity",
                               (capacity + alignment - 1) / alignment, alignment);
  }

  /// A non-owning view of a contiguous cache stored with `CodecT`.
  template <Codec CodecT, MemorySpace Space>
  struct view {
    using layout_policy = contiguous;
    using codec = CodecT;
    using space = Space;
    using storage_type = typename CodecT::template storage<Space>;

    storage_type storage{};
    model_shape shape{};
    std::int64_t batch = 0;
    std::int64_t capacity = 0;  // slots per (sequence, kv head)
    mapping map{};
    /// Tokens every (sequence, kv head) holds: ONE number that every copy of the
    /// view points to. It is host memory on every backend — contiguous is the
    /// host-planned layout (the engine's scheduler knows this length; CUDA
    /// kernels receive it by value) — while positions live in the cache's
    /// memory space. (Layouts planned on the device, whose lengths live in
    /// device memory, are paged and flat.)
    std::int64_t* length = nullptr;
    detail::position_table positions{};

    KVTRIM_HOST_DEVICE std::int64_t heads() const { return batch * shape.kv_heads; }
    KVTRIM_HOST_DEVICE std::int64_t slot(std::int64_t b, std::int64_t h, std::int64_t i) const {
      return b * map.batch_stride + h * map.head_stride + i * map.token_stride;
    }
    /// Host only (the length is host memory; device code receives it by value).
    std::int64_t head_length(std::int64_t /*b*/, std::int64_t /*h*/) const { return *length; }
    KVTRIM_HOST_DEVICE float logit_bias(std::int64_t, std::int64_t, std::int64_t) const { return 0.0f; }

    /// Bytes an owning cache of this shape allocates.
    /// Throws kvtrim::error for a shape, batch or capacity no cache can have.
    static std::size_t bytes(const model_shape& shape, std::int64_t batch, std::int64_t capacity,
                             const typename CodecT::config& codec_config = {}) {
      check_arguments("kvtrim::layout::contiguous::view::bytes", shape, batch, capacity, codec_config);
      workspace_carver carver;
      carve(carver, shape, batch, capacity, codec_config);
      return carver.bytes();
    }
    /// An empty heads-major view over `memory` (of bytes(...) bytes). Host memory
    /// is initialised to an empty cache. A device view's length lives in host
    /// memory the caller provides (`host_length`; the owning cache does), and the
    /// device backend clears the device part with its own reset.
    static view bind(void* memory, const model_shape& shape, std::int64_t batch, std::int64_t capacity,
                     const typename CodecT::config& codec_config = {}) {
      return bind_with_host_length(nullptr, memory, shape, batch, capacity, codec_config);
    }
    /// bind() for a device view, whose length is the host int64 at `host_length`.
    static view bind_with_host_length(std::int64_t* host_length, void* memory, const model_shape& shape,
                                      std::int64_t batch, std::int64_t capacity,
                                      const typename CodecT::config& codec_config = {}) {
      check_arguments("kvtrim::layout::contiguous::view::bind", shape, batch, capacity, codec_config);
      workspace_carver carver(workspace{memory, ~std::size_t{0}});
      view result = carve(carver, shape, batch, capacity, codec_config);
      if constexpr (std::same_as<Space, host_space>) {
        result.positions.clear(result.heads());
      } else {
        result.length = host_length;
      }
      if (result.length != nullptr) *result.length = 0;
      return result;
    }
    /// The length of a device view is host memory outside the allocation.
    static constexpr bool length_in_host_memory = !std::same_as<Space, host_space>;

   private:
    static void check_arguments(std::string_view function, const model_shape& shape, std::int64_t batch,
                                std::int64_t capacity, const typename CodecT::config& codec_config) {
      shape.validate(function);
      if (batch < 1) detail::fail(function, "batch", "at least one sequence", std::to_string(batch));
      if (capacity < 1) detail::fail(function, "capacity", "at least one slot per head", std::to_string(capacity));
      if (capacity > detail::position_table::max_position)
        detail::fail(function, "capacity", "at most 2^31 − 1 slots per head (positions are 32-bit)",
                     std::to_string(capacity));
      codec_config.validate(function);
      detail::checked_mul(function, "batch",
                          detail::checked_mul(function, "batch", batch, shape.kv_heads),
                          head_stride_for<CodecT>(capacity, codec_config));
    }
    static view carve(workspace_carver& carver, const model_shape& shape, std::int64_t batch, std::int64_t capacity,
                      const typename CodecT::config& codec_config) {
      const std::int64_t heads = batch * shape.kv_heads;
      const std::int64_t stride = head_stride_for<CodecT>(capacity, codec_config);
      const std::int64_t slots = heads * stride;
      view result;
      result.storage = detail::carve_codec_storage<CodecT, Space>(carver, codec_config, slots, heads, shape.head_dim,
                                                                  ::kvtrim::codec::slot_alignment<CodecT>(codec_config));
      result.shape = shape;
      result.batch = batch;
      result.capacity = capacity;
      result.map = mapping{heads > 0 ? shape.kv_heads * stride : 0, stride, 1};
      if constexpr (std::same_as<Space, host_space>) result.length = carver.take<std::int64_t>(1);
      result.positions = detail::position_table::carve(carver, slots, heads);
      return result;
    }
  };

  /// Throws unless `count` more tokens fit after what every head holds (host memory).
  template <class View>
  static void check_room(std::string_view function, const View& cache, std::int64_t count) {
    const std::int64_t length = *cache.length;
    if (count > cache.capacity - length)
      detail::fail(function, "new_keys",
                   detail::cat("at most ", cache.capacity - length, " tokens (capacity ", cache.capacity,
                               ", holding ", length, ")"),
                   detail::cat(count, " tokens"));
  }

  /// Throws unless the view's sizes, pointers, mapping and storage are sane: O(1),
  /// reads no memory of the cache (usable for device views from the host).
  /// Every slot the mapping can name lies inside the codec's storage, heads do
  /// not share slots, and the mapping keeps the codec's slot runs whole.
  template <class View>
  static void check(std::string_view function, const View& cache) {
    cache.shape.validate(function);
    if (cache.batch < 1) detail::fail(function, "cache.batch", "at least one sequence", std::to_string(cache.batch));
    if (cache.capacity < 1 || cache.capacity > detail::position_table::max_position)
      detail::fail(function, "cache.capacity", "between 1 and 2^31 − 1 slots per head", std::to_string(cache.capacity));
    if (cache.length == nullptr || !cache.positions.bound())
      detail::fail(function, "cache", "non-null length and position tables (a bound view)", "a null pointer");
    const mapping& map = cache.map;
    const auto strides = [&] {
      return detail::cat("{", map.batch_stride, ", ", map.head_stride, ", ", map.token_stride, "}");
    };
    if (map.batch_stride < 0 || map.head_stride < 0 || map.token_stride < 0)
      detail::fail(function, "cache.map", "non-negative slot strides", strides());
    if ((cache.capacity > 1 && map.token_stride == 0) || (cache.shape.kv_heads > 1 && map.head_stride == 0) ||
        (cache.batch > 1 && map.batch_stride == 0))
      detail::fail(function, "cache.map", "non-zero strides on every axis longer than 1 (heads must not share slots)",
                   strides());
    {  // No two (b, h, i) share a slot: sorted by stride, each axis steps past the whole span of the smaller ones.
      std::array<std::pair<std::int64_t, std::int64_t>, 3> axes{{{map.token_stride, cache.capacity},
                                                                  {map.head_stride, cache.shape.kv_heads},
                                                                  {map.batch_stride, cache.batch}}};
      std::sort(axes.begin(), axes.end());
      std::int64_t span = 1;  // slots covered by the smaller axes
      for (const auto& [stride, extent] : axes) {
        if (extent == 1) continue;
        if (stride < span)
          detail::fail(function, "cache.map",
                       "strides under which no two (sequence, head, token) share a slot", strides());
        span = detail::checked_mul(function, "cache.map", stride, extent);
      }
    }
    const std::int64_t last_slot = detail::checked_add(
        function, "cache.map",
        detail::checked_add(function, "cache.map", detail::checked_mul(function, "cache.map", cache.batch - 1, map.batch_stride),
                            detail::checked_mul(function, "cache.map", cache.shape.kv_heads - 1, map.head_stride)),
        detail::checked_mul(function, "cache.map", cache.capacity - 1, map.token_stride));
    const std::int64_t slots = detail::storage_slots(cache.storage);
    if (slots >= 0 && last_slot >= slots)
      detail::fail(function, "cache.map",
                   detail::cat("strides whose last slot lies in the codec's storage of ", slots, " slots"),
                   detail::cat(strides(), " reaching slot ", last_slot));
    const std::int64_t run = detail::storage_slot_run(cache.storage);
    if (run > 1 && (map.token_stride != 1 || map.head_stride % run != 0 || map.batch_stride % run != 0))
      detail::fail(function, "cache.map",
                   detail::cat("token_stride 1 and head/batch strides that are multiples of the codec's slot run ",
                               run, " (its key groups span ", run, " adjacent slots of one head)"),
                   strides());
    View::codec::check_storage(function, cache.storage, cache.shape.head_dim);
  }

  /// check(), plus the length (host memory on every backend).
  template <class View>
  static void validate(std::string_view function, const View& cache, bool /*exclusive*/ = false) {
    check(function, cache);
    const std::int64_t length = *cache.length;
    if (length < 0 || length > cache.capacity)
      detail::fail(function, "cache.length", detail::cat("a length in [0, capacity = ", cache.capacity, "]"),
                   std::to_string(length));
  }
};

}  // namespace kvtrim::layout
