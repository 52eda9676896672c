// kvtrim/core/concepts.hpp — the five policy concepts.
//
// A scheme is a Layout × Scorer × Budget × Codec × Backend. The concepts check
// the *shape* of a policy type (the names a scheme relies on); which policies
// may be combined is checked by `scheme` itself with sentences a person can read.
//
//   Layout  : where each kept token of each (sequence, kv head) lives
//             (mdspan's LayoutPolicy: slot(b, h, i) → storage index).
//   Scorer  : how important each token is for each head.
//   Budget  : how many tokens each head keeps.
//   Codec   : how one kept token is stored (mdspan's AccessorPolicy).
//   Backend : where it runs (memory space, stream type, allocation).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvtrim/core/view.hpp"

namespace kvtrim {

template <class P>
concept named_policy = requires {
  { P::name } -> std::convertible_to<std::string_view>;
};

template <class L>
concept Layout = named_policy<L> && requires {
  /// false when every head of the layout must hold the same number of tokens.
  { L::ragged_heads } -> std::convertible_to<bool>;
};

template <class S>
concept Scorer = named_policy<S> && requires {
  typename S::config;
  /// true when the scorer needs the prefill's observation-window queries.
  { S::needs_queries } -> std::convertible_to<bool>;
  /// true when the scorer itself gives heads different lengths (RazorAttention).
  { S::ragged_heads } -> std::convertible_to<bool>;
};

template <class B>
concept Budget = named_policy<B> && requires(const typename B::config& config, std::int64_t tokens) {
  typename B::config;
  /// true when heads may keep different numbers of tokens (Ada-KV, per-head).
  { B::ragged_heads } -> std::convertible_to<bool>;
  /// Most tokens one head can keep out of `tokens` (exact when !ragged_heads).
  { B::max_keep(config, tokens) } -> std::convertible_to<std::int64_t>;
};

template <class C>
concept Codec = named_policy<C> && requires(const typename C::config& config, std::int64_t n) {
  typename C::config;
  typename C::template storage<host_space>;
  typename C::template storage<device_space>;
  /// Bytes of storage for `slots` tokens spread over `heads` flattened heads,
  /// bound with slot run `slot_run` (codec/hooks.hpp).
  { C::storage_bytes(config, n, n, n, n) } -> std::convertible_to<std::size_t>;
  /// Bytes one token of one head costs on average, everything included.
  { C::bytes_per_token(config, n) } -> std::convertible_to<double>;
  /// Throws kvtrim::error unless a storage view is usable for this head_dim.
  C::check_storage(std::string_view{}, typename C::template storage<host_space>{}, n);
};

template <class X>
concept Backend = named_policy<X> && MemorySpace<typename X::space> && requires(std::size_t bytes, void* pointer) {
  typename X::stream_type;
  { X::allocate(bytes) } -> std::same_as<void*>;
  X::deallocate(pointer);
};

}  // namespace kvtrim
