// kvtrim/backend/cuda/rollback.cuh — scheme::truncate on the GPU (speculative
// decoding's rollback of rejected drafts; CPU reference: layout/detail/rollback.hpp
// and each layout's backend/cpu header).
//
// The device-planned layouts (paged, flat, shared_paged) run one planning block,
// as append does: it makes the CPU's checks on the device, in the CPU's order
// (sequence by sequence; in each, a negative count, then head by head the head's
// length and the codec's exact horizon), and on a failure writes nothing and
// records it in the status words (truncate_refused; check_status throws the
// CPU's message word for word). Otherwise it does what the CPU does, in its
// order: the codec forgets the dropped tokens (KIVI: the filling group's count),
// next positions step back, and paged tables give emptied pages back to the free
// list heads first to last, each from its last page — so CPU and GPU tables and
// free lists stay identical. Nothing is read back: stream-ordered, capturable.
//
// Codecs: every codec the device stores (plain, fp8, int8/int4 with KIVI or
// per-token keys, layered<C> over those, low_rank), with the CPU's horizons
// (codec::rollback_horizon): KIVI keys the filling group; low_rank the tokens
// since the last basis refresh (profile bases, or update_freq 0: no limit); layered<C> C's, and no further back than the head's last
// compaction. layered<C> then frees the fp16 rows of the dropped tokens as its
// CPU drop_newest does (slots read through the layout before it shortens).
#pragma once

#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "kvtrim/backend/cuda/writes.cuh"
#include "kvtrim/codec/layered.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/layout/detail/status.hpp"

namespace kvtrim::cuda_detail {

/// The codec's exact horizon for head `head` on the device (codec::rollback_horizon's device twin).
template <class Store>
__device__ std::int64_t rollback_horizon(const Store& store, std::int64_t head) {
  constexpr std::int64_t unlimited = std::numeric_limits<std::int64_t>::max();
  if constexpr (requires { store.inner; store.arrived; }) {  // layered<C>
    const std::int64_t inner = rollback_horizon(store.inner, head);
    return store.arrived[head] < inner ? store.arrived[head] : inner;
  } else if constexpr (requires { store.residual_count; store.key_group; }) {  // int8 / int4
    return store.key_group == 0 ? unlimited : store.residual_count[head];
  } else if constexpr (requires { store.pending_counts; store.update_freq; }) {  // low_rank
    return store.update_freq == 0 ? unlimited : store.pending_counts[head];
  } else {
    return unlimited;
  }
}

/// Forgets head `head`'s newest `count` tokens (≤ the horizon): codec::drop_newest's device
/// twin, in the CPU's order. slot_of(k): the slot of the head's k-th newest token (k = 0: the
/// newest), read through the layout's tables as they are before the truncation.
template <class Store, class SlotOf>
__device__ void drop_newest(const Store& store, std::int64_t head, std::int64_t count, const SlotOf& slot_of) {
  if constexpr (requires { store.inner; store.arrived; }) {  // layered<C>: C forgets, then the fp16 rows go
    drop_newest(store.inner, head, count, slot_of);
    const std::int64_t sinks = store.sinks, recent = store.recent, arrived = store.arrived[head];
    std::int64_t* row_slots = store.row_slots + head * (sinks + recent);
    for (std::int64_t k = 0; k < count; ++k) {
      const std::int64_t order = arrived - 1 - k, slot = slot_of(k);
      const std::int64_t row = order < sinks ? order : recent > 0 ? sinks + (order - sinks) % recent : -1;
      if (row >= 0 && store.slot_rows[slot] == row) row_slots[row] = -1;
      store.slot_rows[slot] = -1;
    }
    store.arrived[head] = arrived - count;
  } else if constexpr (requires { store.residual_count; store.key_group; }) {
    if (store.key_group != 0) store.residual_count[head] -= count;
  } else if constexpr (requires { store.pending_counts; store.update_freq; }) {
    if (store.update_freq != 0) store.pending_counts[head] -= count;
  }
}

/// The drop count of sequence b.
struct drop_counts {
  const std::int32_t* data;
  std::int64_t stride;
  __device__ std::int64_t operator()(std::int64_t b) const { return data[b * stride]; }
};

/// The CPU's check_truncate on the device (every thread of the one block):
/// true, with the first failure recorded, when the call must write nothing.
/// A failure's rank is head·3 + rule, which orders failures as the CPU's loops
/// find them (a negative count is ranked at its sequence's first head).
template <class View, class Length>
__device__ bool truncate_refused(const View& cache, const drop_counts& drop, const Length& length,
                                 unsigned long long& first) {
  using s = detail::layout_status;
  const std::int64_t kv_heads = cache.shape.kv_heads;
  if (threadIdx.x == 0) first = ~0ull;
  __syncthreads();
  for (std::int64_t head = threadIdx.x; head < cache.heads(); head += blockDim.x) {
    const std::int64_t b = head / kv_heads, d = drop(b);
    std::int64_t rule = -1;
    if (d < 0) {
      if (head % kv_heads == 0) rule = s::negative_drop;
    } else if (d > length(head)) {
      rule = s::past_head_length;
    } else if (d > rollback_horizon(cache.storage, head)) {
      rule = s::past_codec_horizon;
    }
    if (rule >= 0) atomicMin(&first, static_cast<unsigned long long>(head * 3 + rule));
  }
  __syncthreads();
  const unsigned long long found = first;
  if (found == ~0ull) return false;
  if (threadIdx.x == 0) {
    const auto head = static_cast<std::int64_t>(found / 3);
    const auto rule = static_cast<std::int64_t>(found % 3);
    const std::int64_t b = head / kv_heads, d = drop(b);
    const std::int64_t limit = rule == s::past_head_length     ? length(head)
                               : rule == s::past_codec_horizon ? rollback_horizon(cache.storage, head)
                                                               : 0;
    record_failure(cache.status, s::truncate_refused, limit, head % kv_heads, d, b, 0, rule);
  }
  return true;
}

/// Per head: the codec forgets, the next position steps back, and (layouts with
/// compensation tokens) a compensation token among the dropped ones goes. Every
/// thread of the block; reads lengths before the caller's barrier and table updates.
template <class View, class Length>
__device__ void forget_newest(const View& cache, const drop_counts& drop, const Length& length) {
  for (std::int64_t head = threadIdx.x; head < cache.heads(); head += blockDim.x) {
    const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads, d = drop(b);
    if (d == 0) continue;
    const std::int64_t held = length(head);
    drop_newest(cache.storage, head, d, [&](std::int64_t k) { return cache.slot(b, h, held - 1 - k); });
    cache.positions.next_position[head] -= d;
    if constexpr (requires { cache.compensation; })
      if (cache.compensation.index[head] >= held - d) {
        cache.compensation.index[head] = -1;
        cache.compensation.bias[head] = 0.0f;
      }
  }
}

/// layout::paged and layout::shared_paged: `rows` page lists (heads, or
/// sequences), row r dropping drop_of_row(r) tokens. Pages left empty go to the
/// free list rows first to last, each from its last page; lists move left over
/// the pages returned before them — the CPU's loop, a row at a time.
template <class View, class DropOfRow>
__device__ void return_pages(const View& cache, std::int64_t rows, const DropOfRow& drop_of_row) {
  const std::int64_t page_size = cache.page_size;
  const std::int64_t free_before = *cache.free_count;
  std::int64_t returned = 0;
  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t begin = cache.indptr[row] + returned;  // indptr[row] was moved left already
    const std::int64_t end = cache.indptr[row + 1];
    const std::int64_t length = end == begin ? 0 : (end - begin - 1) * page_size + cache.last_page_len[row];
    const std::int64_t kept = length - drop_of_row(row);
    const std::int64_t kept_pages = (kept + page_size - 1) / page_size;
    const std::int64_t freed = end - begin - kept_pages;
    for (std::int64_t j = threadIdx.x; j < freed; j += blockDim.x)
      cache.free_pages[free_before + returned + j] = cache.indices[end - 1 - j];
    __syncthreads();  // every thread has read indptr, last_page_len and the freed entries
    block_move<move_items>(begin, begin - returned, kept_pages, int32_mover{cache.indices});
    returned += freed;
    if (threadIdx.x == 0) {
      cache.indptr[row + 1] = static_cast<std::int32_t>(end - returned);
      cache.last_page_len[row] = static_cast<std::int32_t>(kept == 0 ? 0 : (kept - 1) % page_size + 1);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *cache.free_count = static_cast<std::int32_t>(free_before + returned);
}

template <class View>
__global__ void __launch_bounds__(plan_threads) paged_plan_truncate(const View cache, const drop_counts drop) {
  __shared__ unsigned long long first;
  const auto length = [&](std::int64_t head) {
    const std::int64_t pages = std::int64_t{cache.indptr[head + 1]} - cache.indptr[head];
    return pages == 0 ? std::int64_t{0} : (pages - 1) * cache.page_size + cache.last_page_len[head];
  };
  if (truncate_refused(cache, drop, length, first)) return;
  forget_newest(cache, drop, length);
  __syncthreads();
  return_pages(cache, cache.heads(), [&](std::int64_t head) { return drop(head / cache.shape.kv_heads); });
  if (threadIdx.x == 0) cache.status[detail::layout_status::call_failed] = 0;
}

template <class View>
__global__ void __launch_bounds__(plan_threads) shared_paged_plan_truncate(const View cache, const drop_counts drop) {
  __shared__ unsigned long long first;
  const auto length = [&](std::int64_t head) { return cache.sequence_length(head / cache.shape.kv_heads); };
  if (truncate_refused(cache, drop, length, first)) return;
  forget_newest(cache, drop, length);
  __syncthreads();
  return_pages(cache, cache.batch, drop);
  if (threadIdx.x == 0) cache.status[detail::layout_status::call_failed] = 0;
}

template <class View>
__global__ void __launch_bounds__(plan_threads) flat_plan_truncate(const View cache, const drop_counts drop) {
  __shared__ unsigned long long first;
  const auto length = [&](std::int64_t head) { return cache.lengths[head]; };
  if (truncate_refused(cache, drop, length, first)) return;
  forget_newest(cache, drop, length);
  __syncthreads();  // every compensation check has read its head's length
  for (std::int64_t head = threadIdx.x; head < cache.heads(); head += blockDim.x)
    cache.lengths[head] -= drop(head / cache.shape.kv_heads);
  if (threadIdx.x == 0) cache.status[detail::layout_status::call_failed] = 0;
}

/// layout::contiguous (host-planned: the checks ran on the host): every head of
/// `length` tokens drops `count`.
template <class View>
__global__ void contiguous_truncate(const View cache, std::int64_t length, std::int64_t count) {
  for (std::int64_t head = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; head < cache.heads();
       head += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t b = head / cache.shape.kv_heads, h = head % cache.shape.kv_heads;
    drop_newest(cache.storage, head, count, [&](std::int64_t k) { return cache.slot(b, h, length - 1 - k); });
    cache.positions.next_position[head] -= count;
  }
}

/// The device arrays whose per-head minimum is the codec's horizon (none: no
/// limit) — what a host-planned truncate reads back: layered<C> C's and its
/// arrival counts; KIVI keys the filling groups' counts; low_rank with
/// refreshes its pending counts.
template <class Store>
void horizon_arrays(const Store& store, std::vector<const std::int64_t*>& arrays) {
  if constexpr (requires { store.inner; store.arrived; }) {
    horizon_arrays(store.inner, arrays);
    arrays.push_back(store.arrived);
  } else if constexpr (requires { store.residual_count; store.key_group; }) {
    if (store.key_group != 0) arrays.push_back(store.residual_count);
  } else if constexpr (requires { store.pending_counts; store.update_freq; }) {
    if (store.update_freq != 0) arrays.push_back(store.pending_counts);
  }
}

inline drop_counts make_drop_counts(const tensor_view<const std::int32_t, 1, device_space>& drop) {
  return {drop.data, drop.strides[0]};
}

}  // namespace kvtrim::cuda_detail
