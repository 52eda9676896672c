// kvtrim/core/scheme.hpp — a compression scheme: Layout × Scorer × Budget × Codec × Backend.
//
// The whole pipeline is written here once, against implementation<Policy, Backend>:
//
//   keys, values [B,H,T,D] ─► Scorer ─► scores [B,H,T] ─► Budget ─► keep counts [B·H]
//        ─► select_top_k ─► selection (CSR, ascending tokens) ─► Layout::compact ─► cache
//   append(new keys/values) ─► Layout::append;   attend(q [B,Hq,D] or [B,n,Hq,D]) ─► decode_attention
//
// Two optional scorer hooks (RazorAttention needs both): a scorer with
// `sets_keep_counts` gives the keep counts instead of the budget (which must be
// budget::by_scorer), and one with `compensates` writes compensation tokens
// into the cache right after Layout::compact.
//
// Swapping backend::cpu for backend::cuda changes which specialisations run,
// not this code. Rules about which policies combine are static_asserts with a
// sentence each, checked when the scheme type is named.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvtrim/budget/head_shard.hpp"
#include "kvtrim/codec/layered.hpp"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/comm/communicator.hpp"
#include "kvtrim/core/cache.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"
#include "kvtrim/layout/detail/positions.hpp"
#include "kvtrim/layout/detail/status.hpp"

namespace kvtrim {

namespace detail {
/// A scorer that decides each head's keep count itself (score::retrieval_head)
/// declares `sets_keep_counts = true` and pairs with a budget that declares
/// `defers_to_scorer = true` (budget::by_scorer). Absent members read as false.
template <class S>
inline constexpr bool scorer_sets_keep_counts = requires { requires S::sets_keep_counts; };
template <class B>
inline constexpr bool budget_defers_to_scorer = requires { requires B::defers_to_scorer; };
/// A scorer that writes compensation tokens after compaction (`compensates = true`)
/// needs a layout that stores them with their logit bias (`compensation_tokens = true`).
template <class S>
inline constexpr bool scorer_compensates = requires { requires S::compensates; };
template <class L>
inline constexpr bool layout_stores_compensation = requires { requires L::compensation_tokens; };

/// The NaN/Inf rule (docs/composition.md §4): every key, value and window query
/// a call reads must be finite, for every codec; the error names the sequence,
/// head, token and channel. With `Stored` = the element type a plain codec
/// stores (fp16, bf16), a value must also stay finite once rounded to it: 1e5
/// is finite in fp32 but +Inf in fp16. Host views only (a device backend checks
/// on the device).
template <class Stored = float, class T>
void check_finite(std::string_view function, std::string_view argument, const tensor_view<T, 4, host_space>& view,
                  std::string_view head_name, const std::int64_t* lengths = nullptr) {
  for (std::int64_t b = 0; b < view.extent(0); ++b)
    for (std::int64_t h = 0; h < view.extent(1); ++h)
      for (std::int64_t t = 0; t < (lengths != nullptr ? lengths[b] : view.extent(2)); ++t) {
        // The common case without conversions (a bit test for fp16/bf16, branch-free
        // over the row): every value finite, and already in the storage type or
        // needing no range check. Otherwise the row is searched for the culprit.
        if constexpr (std::is_same_v<Stored, float> || std::is_same_v<Stored, std::remove_const_t<T>>) {
          bool finite = true;
          for (std::int64_t d = 0; d < view.extent(3); ++d) finite &= (Eigen::numext::isfinite)(view(b, h, t, d));
          if (finite) continue;
        }
        for (std::int64_t d = 0; d < view.extent(3); ++d) {
          const float x = to_float(view(b, h, t, d));
          if (!std::isfinite(x))
            fail(function, argument, "finite values (NaN and Inf are refused for every codec)",
                 cat(x, " at sequence ", b, ", ", head_name, " ", h, ", token ", t, ", channel ", d));
          if constexpr (!std::is_same_v<Stored, float>) {
            if (!std::isfinite(to_float(from_float<Stored>(x))))
              fail(function, argument,
                   cat("finite values that stay finite in the cache's ", element_traits<Stored>::name,
                       " storage (|x| below ", static_cast<double>(std::numeric_limits<Stored>::max()),
                       " after rounding)"),
                   cat(x, " at sequence ", b, ", ", head_name, " ", h, ", token ", t, ", channel ", d));
          }
        }
      }
}

/// The element type a codec stores rows in when it stores them as they are
/// (codec::plain<T>), else float (quantizing codecs scale any finite value).
template <class CodecT>
struct stored_element {
  using type = float;
};
template <class T>
struct stored_element<codec::plain<T>> {
  using type = T;
};
/// layered<C> keeps its sinks and recent tokens as fp16 rows.
template <class Inner>
struct stored_element<codec::layered<Inner>> {
  using type = half;
};

/// A budget implementation that reports its error from the device, through a
/// word of its workspace that compaction reads (compact_args::budget_refusal).
template <class Impl, class Config>
concept refuses_on_device = requires(const Config& config, const model_shape& shape, std::int64_t count,
                                     workspace scratch) {
  { Impl::refusal_word(shape, count, scratch) } -> std::convertible_to<const unsigned long long*>;
  { Impl::refused_budget(config, count) } -> std::convertible_to<std::int64_t>;
};

/// A device layout implementation that scans a call's inputs for NaN/Inf on the
/// device and refuses the call through its status words (backend/cuda/writes.cuh).
template <class Impl>
concept checks_finite_on_device = requires { requires Impl::checks_finite_inputs; };

template <class T, std::size_t Rank, class Space>
tensor_view<const std::remove_const_t<T>, Rank, Space> as_const(const tensor_view<T, Rank, Space>& view) {
  return {view.data, view.extents, view.strides};
}

/// A scorer or budget implementation that needs scratch declares
/// `workspace_bytes(config, shape, batch, tokens)` and then takes a `workspace`
/// argument just before the stream; the others take none.
template <class Impl, class Config>
concept needs_scratch = requires(const Config& config, const model_shape& shape, std::int64_t count) {
  { Impl::workspace_bytes(config, shape, count, count) } -> std::convertible_to<std::size_t>;
};

/// A budget implementation with a form over kv heads sharded across ranks
/// (sharded_workspace_bytes + keep_counts with a head_shard and a communicator).
template <class Impl, class Config>
concept shards_heads = requires(const Config& config, std::int64_t count, const budget::head_shard& shard) {
  { Impl::sharded_workspace_bytes(config, count, count, count, shard) } -> std::convertible_to<std::size_t>;
};

template <class Impl, class Config>
workspace carve_scratch(workspace_carver& carver, const Config& config, const model_shape& shape,
                        std::int64_t batch, std::int64_t tokens) {
  if constexpr (needs_scratch<Impl, Config>) {
    std::size_t bytes = Impl::workspace_bytes(config, shape, batch, tokens);
    // Also enough for a padded batch's per-sequence calls on (1, t ≤ tokens)
    // (compress_options::sequence_lengths), for a scorer whose split plan is not monotone
    // in (batch, tokens) — the device attention mass: splits = target blocks / row blocks.
    if constexpr (requires { { Impl::sequence_workspace_bytes(config, shape, tokens) } -> std::convertible_to<std::size_t>; })
      bytes = std::max(bytes, Impl::sequence_workspace_bytes(config, shape, tokens));
    return workspace{carver.template take<std::byte>(static_cast<std::int64_t>(bytes)), bytes};
  } else {
    return workspace{};
  }
}

/// Scorers whose queries are the prefill's own, one per token (H2O), not a window.
template <class ScorerT>
inline constexpr bool observes_every_query = requires { requires ScorerT::observes_every_query; };

/// A scorer's config for sequence b alone (of T_b = `tokens` tokens): per-sequence
/// inputs it holds — given softmax normalisers (SnapKV's window rows; H2O's first
/// T_b, one per prefill query), external scores — read at sequence b's rows
/// (compress_options::sequence_lengths; their extents were checked for the whole batch first).
/// A scorer whose config holds another per-sequence tensor must be sliced here too
/// (and its extents checked in scheme::check_sequence_lengths), else every sequence
/// would read sequence 0's rows.
template <class ScorerT, class Config>
Config sequence_score_config(const Config& config, std::int64_t b, std::int64_t tokens) {
  Config result = config;
  if constexpr (requires { result.lse; result.lse_extents; result.lse_strides; }) {
    if (result.lse != nullptr) {
      result.lse += b * config.lse_strides[0];
      result.lse_extents[0] = 1;
      if constexpr (observes_every_query<ScorerT>) result.lse_extents[2] = tokens;
    }
  }
  if constexpr (requires { result.scores; result.extents; result.strides; }) {
    if (result.scores != nullptr) {
      result.scores += b * config.strides[0];
      result.extents = {1, config.extents[1], tokens};
    }
  }
  return result;
}
}  // namespace detail

/// The runtime knobs of a compress call: the scorer's and the budget's. The
/// codec's knobs shape the storage, so they are given once, to make_cache (or
/// to the layout's bind), and live in the cache: one source of truth.
template <Scorer ScorerT, Budget BudgetT, Codec CodecT>
struct scheme_config {
  typename ScorerT::config score{};
  typename BudgetT::config budget{};

  void validate(std::string_view function) const {
    score.validate(function);
    budget.validate(function);
  }
};

/// Optional inputs and outputs of compress (docs/composition.md §1, §5).
template <MemorySpace Space>
struct compress_options {
  /// Position of prefill token 0 (chunked prefill; a sequence that already held tokens).
  std::int64_t start_position = 0;
  /// When non-null, the selection is written here (the backend's memory): head
  /// b·kv_heads + h kept tokens kept_tokens[kept_offsets[head] .. kept_offsets[head + 1]),
  /// ascending prefill indices. kept_offsets has B·H + 1 entries; kept_tokens
  /// holds kept_tokens_capacity entries (scheme::kept_tokens_capacity says how many suffice).
  std::int64_t* kept_offsets = nullptr;
  std::int32_t* kept_tokens = nullptr;
  std::int64_t kept_tokens_capacity = 0;
  /// Refuse NaN/Inf keys, values and window queries (docs/composition.md §4). On
  /// the host this is always done; on backend::cuda's paged and flat layouts it is
  /// one device read of every input before the first write (≈ 0.3 ms for 1 GB of
  /// prefill K/V on an H200), which engines that guarantee finite activations may skip.
  /// (layout::contiguous on the device plans on the host and cannot refuse from
  /// the device: its inputs are not checked.)
  bool check_finite = true;
  /// Prefill lengths of a padded batch (host memory, one per sequence, each in
  /// [1, T]; null: every sequence has all T tokens). Sequence b's prompt is tokens
  /// [0, T_b) of keys and values (right padding: the rest is never read, NaN or not)
  /// and its window queries are the last w queries of its own prompt, which the
  /// caller gathers. Every policy sees T_b tokens, so the result equals compressing
  /// each sequence alone into a one-sequence cache (budgets from T_b, SnapKV's window
  /// and RazorAttention's recent window at the end of each prompt, given normalisers
  /// and external scores read at each sequence's rows), and the cache holds them
  /// side by side; plan_capacity and the workspace for T = max T_b suffice (a length
  /// whose budget keeps more than T's — PyramidKV's deep layers — is refused).
  /// H2O takes all T padded queries. Both backends, not sharded; on
  /// layout::contiguous every sequence must keep the same count (its heads share
  /// one length), e.g. budget::uniform with keep_tokens ≤ min T_b. backend::cuda runs
  /// the scorer and the budget once per sequence (host-side slices of the same
  /// device tensors, no copy) and the selection and compaction once; the lengths
  /// stay host memory and reach the device as kernel parameters (capturable in a
  /// CUDA graph, with the lengths of the capture).
  const std::int64_t* sequence_lengths = nullptr;
};

/// What a compress of T tokens needs from the cache, before any scoring.
struct capacity_plan {
  std::int64_t sequences = 0;
  std::int64_t kv_heads = 0;
  std::int64_t max_head_tokens = 0;  ///< most tokens one head keeps (exact for uniform budgets)
  std::int64_t total_tokens = 0;     ///< tokens all heads keep together
  bool exact_total = false;          ///< total_tokens is exact (else an upper bound)
  std::vector<std::int64_t> head_tokens;  ///< per kv head when the budget fixes it (empty: Ada-KV)

  /// Pages of `page_size` a layout::paged pool needs: exact when per-head counts
  /// are fixed, else the bound Σ⌈c_h/p⌉ ≤ ⌊(N + H·(p − 1))/p⌋ for the exact total N.
  std::int64_t pages(std::int64_t page_size) const { return units(page_size); }
  /// Slots a layout::flat buffer needs (regions in whole runs of `run` slots; 1
  /// for codecs without key groups), before headroom for appends.
  std::int64_t flat_slots(std::int64_t run) const { return units(run) * run; }

 private:
  std::int64_t units(std::int64_t size) const {
    if (!head_tokens.empty()) {
      std::int64_t total = 0;
      for (const std::int64_t count : head_tokens) total += (count + size - 1) / size;
      return total * sequences;
    }
    const std::int64_t heads = sequences * kv_heads;
    return (total_tokens + heads * (size - 1)) / size;
  }
};

template <Layout LayoutT, Scorer ScorerT, Budget BudgetT, Codec CodecT, Backend BackendT>
struct scheme {
  static_assert(LayoutT::ragged_heads || !BudgetT::ragged_heads,
                "kvtrim::scheme: this layout gives every head the same length (e.g. layout::contiguous), but this "
                "budget gives heads different lengths (e.g. budget::adaptive, budget::per_head); use layout::paged "
                "or layout::flat, or a uniform budget.");
  static_assert(LayoutT::ragged_heads || !ScorerT::ragged_heads,
                "kvtrim::scheme: this layout gives every head the same length (e.g. layout::contiguous), but this "
                "scorer keeps different lengths per head (score::retrieval_head keeps every token of retrieval "
                "heads); use layout::paged or layout::flat.");
  static_assert(!detail::scorer_sets_keep_counts<ScorerT> || detail::budget_defers_to_scorer<BudgetT>,
                "kvtrim::scheme: this scorer decides how many tokens each head keeps (e.g. score::retrieval_head); "
                "use budget::by_scorer.");
  static_assert(detail::scorer_sets_keep_counts<ScorerT> || !detail::budget_defers_to_scorer<BudgetT>,
                "kvtrim::scheme: budget::by_scorer takes the keep counts from the scorer, but this scorer does not "
                "set them; use budget::uniform or another budget.");
  static_assert(!detail::scorer_compensates<ScorerT> || detail::layout_stores_compensation<LayoutT>,
                "kvtrim::scheme: this scorer stores a compensation token with a logit bias per head (RazorAttention), "
                "but this layout cannot hold one; use layout::paged or layout::flat.");
  static_assert(implemented_on<ScorerT, BackendT>,
                "kvtrim::scheme: this scorer has no implementation on this backend (no "
                "kvtrim::implementation<Scorer, Backend> specialisation; did you include kvtrim/kvtrim.hpp, or "
                "kvtrim/cuda.cuh for backend::cuda?).");
  static_assert(implemented_on<BudgetT, BackendT>,
                "kvtrim::scheme: this budget has no implementation on this backend (no "
                "kvtrim::implementation<Budget, Backend> specialisation).");
  static_assert(implemented_on<LayoutT, BackendT>,
                "kvtrim::scheme: this layout has no implementation on this backend (no "
                "kvtrim::implementation<Layout, Backend> specialisation).");
  static_assert(implemented_on<stage::select_top_k, BackendT> && implemented_on<stage::decode_attention, BackendT>,
                "kvtrim::scheme: this backend lacks the shared stages select_top_k / decode_attention.");

  using layout = LayoutT;
  using scorer = ScorerT;
  using budget = BudgetT;
  using codec = CodecT;
  using backend = BackendT;
  using space = typename BackendT::space;
  using stream_type = typename BackendT::stream_type;
  using cache_view = typename LayoutT::template view<CodecT, space>;
  using cache = kvtrim::cache<scheme>;

  /// Longest prefill one compress() call takes (kept token indices are int32).
  static constexpr std::int64_t max_tokens = 2147483647;

  /// Every runtime knob of the scheme, with the papers' defaults (the same
  /// type for every backend, so one config drives the CPU and the GPU).
  using config = scheme_config<ScorerT, BudgetT, CodecT>;

  /// An owning cache (allocated through the backend) with capacity slots per head.
  template <class... Args>
  static cache make_cache(const Args&... args) {
    return cache(args...);
  }

  // ---- planning --------------------------------------------------------------

  /// Entries kept_tokens needs in compress_options for `batch` sequences of `tokens` tokens.
  static std::int64_t kept_tokens_capacity(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                           const config& cfg) {
    constexpr std::string_view function = "kvtrim::scheme::kept_tokens_capacity";
    return detail::checked_mul(function, "batch", detail::checked_mul(function, "batch", batch, shape.kv_heads),
                               BudgetT::max_keep(cfg.budget, tokens));
  }

  /// What a compress of `tokens` tokens keeps, known before scoring: per-head
  /// counts where the budget fixes them (uniform, pyramid, per_head,
  /// RazorAttention), the exact total for Ada-KV. Size the cache from it
  /// (plan.pages(page_size), plan.flat_slots(run), plan.max_head_tokens).
  static capacity_plan plan_capacity(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                     const config& cfg) {
    constexpr std::string_view function = "kvtrim::scheme::plan_capacity";
    cfg.validate(function);
    shape.validate(function);
    if (batch < 1) detail::fail(function, "batch", "at least one sequence", std::to_string(batch));
    if (tokens < 1 || tokens > max_tokens)
      detail::fail(function, "tokens", detail::cat("between 1 and ", max_tokens, " tokens"), std::to_string(tokens));
    detail::checked_mul(function, "batch", batch, shape.kv_heads);
    capacity_plan plan;
    plan.sequences = batch;
    plan.kv_heads = shape.kv_heads;
    if constexpr (detail::scorer_sets_keep_counts<ScorerT>) {
      for (std::int64_t h = 0; h < shape.kv_heads; ++h)
        plan.head_tokens.push_back(ScorerT::head_keep(cfg.score, shape, h, tokens));
    } else if constexpr (requires { BudgetT::head_keep(cfg.budget, std::int64_t{}, tokens); }) {
      for (std::int64_t h = 0; h < shape.kv_heads; ++h) plan.head_tokens.push_back(BudgetT::head_keep(cfg.budget, h, tokens));
    } else if constexpr (!BudgetT::ragged_heads) {
      plan.head_tokens.assign(static_cast<std::size_t>(shape.kv_heads), BudgetT::max_keep(cfg.budget, tokens));
    } else {
      static_assert(requires { BudgetT::head_budget(cfg.budget, tokens); },
                    "kvtrim::scheme::plan_capacity: a ragged budget must fix per-head counts (head_keep) or a "
                    "per-head average whose total is exact (head_budget, as Ada-KV)");
      // Ada-KV: each sequence keeps exactly kv_heads · k; one head may take up to all its tokens.
      const std::int64_t k = std::min(tokens, BudgetT::head_budget(cfg.budget, tokens));
      plan.total_tokens =
          detail::checked_mul(function, "batch", detail::checked_mul(function, "batch", batch, shape.kv_heads), k);
      plan.max_head_tokens = BudgetT::max_keep(cfg.budget, tokens);
      plan.exact_total = true;
    }
    if (!plan.head_tokens.empty()) {
      std::int64_t per_sequence = 0;
      for (const std::int64_t count : plan.head_tokens) per_sequence += count;
      plan.total_tokens = detail::checked_mul(function, "batch", per_sequence, batch);
      plan.max_head_tokens = *std::max_element(plan.head_tokens.begin(), plan.head_tokens.end());
      plan.exact_total = true;
    }
    return plan;
  }

  // ---- compress --------------------------------------------------------------

  /// Scratch bytes compress() needs for `batch` sequences of `tokens` tokens.
  static std::size_t compress_workspace(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                        const config& cfg) {
    constexpr std::string_view function = "kvtrim::scheme::compress_workspace";
    detail::checked_mul(function, "tokens", detail::checked_mul(function, "batch", batch, shape.kv_heads), tokens);
    workspace_carver carver;
    carve_compress(carver, shape, batch, tokens, cfg);
    return carver.bytes();
  }

  /// Scores the prefill's keys, keeps each head's budget, and writes the kept
  /// tokens into `cache` (replacing what it held). `window_queries` are the
  /// last queries of the prefill (only scorers with needs_queries read them).
  /// Strong guarantee: everything is checked before the first write; a call
  /// that throws leaves the cache as it was.
  template <class KeyT, class QueryT>
  static void compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values,
                       tensor_view<QueryT, 4, space> window_queries, cache_view& cache, const config& cfg,
                       const compress_options<space>& options, workspace scratch, stream_type stream = {}) {
    run_compress(keys, values, window_queries, cache, cfg, options, one_rank{}, scratch, stream);
  }

  // ---- compress with a layer's kv heads sharded across ranks ------------------
  //
  // Tensor parallelism (docs/tensor-parallel.md): each rank holds kv heads
  // [shard.first_head, + cache.shape.kv_heads) of the layer (its cache, keys,
  // values and window queries are those heads' and their query heads'), and
  // calls compress with the layer's head_shard and its communicator. The
  // budget's top-k spans every rank's heads (budget::adaptive's sharded
  // keep_counts), so each rank keeps exactly the tokens the one-device compress
  // of all heads keeps for its heads. Scorer, selection and layout run on the
  // rank's own heads. Budgets without a sharded form are refused at compile time.
  // Every rank makes the same collectives: on the CPU one vote (1 count: every
  // rank's checks passed) then the budget's 5; on CUDA the budget's 5 (the
  // device cannot vote without a host wait: the checks there are on shapes,
  // pointers and sizes, the same on every rank of a consistent engine; one
  // failing alone leaves the others in the first all-reduce, as a mismatched
  // NCCL call does). Capacity: a rank's heads may keep up to min(H·k, local·T)
  // tokens together (the pool goes where the scores are), not local·k.

  /// Scratch bytes the sharded compress needs on this rank (shape: its local heads).
  static std::size_t compress_workspace(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                        const config& cfg, const ::kvtrim::budget::head_shard& shard)
    requires detail::shards_heads<implementation<BudgetT, BackendT>, typename BudgetT::config>
  {
    constexpr std::string_view function = "kvtrim::scheme::compress_workspace";
    detail::checked_mul(function, "tokens", detail::checked_mul(function, "batch", batch, shape.kv_heads), tokens);
    workspace_carver carver;
    carve_compress(carver, shape, batch, tokens, cfg, &shard);
    return carver.bytes();
  }

  /// compress() on this rank's kv heads of the layer, with the budget over every rank's heads.
  template <class KeyT, class QueryT, class Comm>
    requires detail::shards_heads<implementation<BudgetT, BackendT>, typename BudgetT::config> &&
             comm::communicator<Comm, stream_type>
  static void compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values,
                       tensor_view<QueryT, 4, space> window_queries, cache_view& cache, const config& cfg,
                       const compress_options<space>& options, const ::kvtrim::budget::head_shard& shard, const Comm& comm,
                       workspace scratch, stream_type stream = {}) {
    run_compress(keys, values, window_queries, cache, cfg, options, sharded_ranks<Comm>{shard, comm}, scratch, stream);
  }
  /// The sharded compress() for scorers that read no queries.
  template <class KeyT, class Comm>
    requires(!ScorerT::needs_queries) &&
            detail::shards_heads<implementation<BudgetT, BackendT>, typename BudgetT::config> &&
            comm::communicator<Comm, stream_type>
  static void compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values, cache_view& cache,
                       const config& cfg, const compress_options<space>& options,
                       const ::kvtrim::budget::head_shard& shard, const Comm& comm, workspace scratch,
                       stream_type stream = {}) {
    run_compress(keys, values, tensor_view<const std::remove_const_t<KeyT>, 4, space>{}, cache, cfg, options,
                 sharded_ranks<Comm>{shard, comm}, scratch, stream);
  }

  /// Scratch of compress_without_heads.
  static std::size_t compress_without_heads_workspace(std::int64_t batch, std::int64_t tokens, const config& cfg,
                                                      const ::kvtrim::budget::head_shard& shard)
    requires detail::shards_heads<implementation<BudgetT, BackendT>, typename BudgetT::config>
  {
    return implementation<BudgetT, BackendT>::sharded_workspace_bytes(cfg.budget, batch, 0, tokens, shard);
  }

  /// A rank holding none of the layer's kv heads (uneven shards) takes part in the
  /// sharded compress of `batch` sequences of `tokens` tokens: the same collectives, nothing kept.
  template <class Comm>
    requires detail::shards_heads<implementation<BudgetT, BackendT>, typename BudgetT::config> &&
             comm::communicator<Comm, stream_type>
  static void compress_without_heads(std::int64_t batch, std::int64_t tokens, const config& cfg,
                                     const ::kvtrim::budget::head_shard& shard, const Comm& comm, workspace scratch,
                                     stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::compress";
    const auto check = [&] {
      cfg.validate(function);
      shard.validate(function, 0);
      if (batch < 1 || tokens < 1 || tokens > max_tokens)
        detail::fail(function, "tokens", "at least one sequence of 1 to 2^31 − 1 tokens",
                     detail::cat(batch, " sequences of ", tokens));
      detail::check_workspace(function, scratch, compress_without_heads_workspace(batch, tokens, cfg, shard));
    };
    if constexpr (std::same_as<space, host_space>)
      vote(function, comm, stream, check);
    else
      check();
    const score_view<space> none{nullptr, {batch, 0, tokens}, {0, tokens, 1}};
    implementation<BudgetT, BackendT>::keep_counts(cfg.budget, detail::as_const(none), shard, comm, nullptr, scratch,
                                                   stream);
  }

  /// compress() with default options (positions from 0, no selection output).
  template <class KeyT, class QueryT>
  static void compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values,
                       tensor_view<QueryT, 4, space> window_queries, cache_view& cache, const config& cfg,
                       workspace scratch, stream_type stream = {}) {
    compress(keys, values, window_queries, cache, cfg, compress_options<space>{}, scratch, stream);
  }

  /// compress() for scorers that read no queries.
  template <class KeyT>
    requires(!ScorerT::needs_queries)
  static void compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values, cache_view& cache,
                       const config& cfg, workspace scratch, stream_type stream = {}) {
    compress(keys, values, tensor_view<const std::remove_const_t<KeyT>, 4, space>{}, cache, cfg,
             compress_options<space>{}, scratch, stream);
  }
  template <class KeyT>
    requires(!ScorerT::needs_queries)
  static void compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values, cache_view& cache,
                       const config& cfg, const compress_options<space>& options, workspace scratch,
                       stream_type stream = {}) {
    compress(keys, values, tensor_view<const std::remove_const_t<KeyT>, 4, space>{}, cache, cfg, options, scratch,
             stream);
  }

  // ---- append ----------------------------------------------------------------

  /// Appends `new_keys`/`new_values` [B, H, n, D] to every head, after what it
  /// holds, at each head's next positions. Strong guarantee, as compress.
  template <class KeyT>
  static void append(cache_view& cache, tensor_view<KeyT, 4, space> new_keys, tensor_view<KeyT, 4, space> new_values,
                     stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::append";
    layout::validate(function, cache, /*exclusive=*/true);
    check_append(function, cache, new_keys, new_values, {cache.batch, cache.shape.kv_heads, -1, cache.shape.head_dim},
                 -1);
    check_finite_on_device(cache, detail::layout_status::append, detail::as_const(new_keys),
                           detail::as_const(new_values), stream);
    implementation<LayoutT, BackendT>::append(cache, detail::as_const(new_keys), detail::as_const(new_values), stream);
  }

  /// append() without the O(pages) validation of the cache's tables (layout::check still runs):
  /// for engines that validated their view once and call this every decode step. On the
  /// device it also skips the NaN/Inf scan of the new rows (one more launch per layer
  /// and step); the host's check_finite still runs on the CPU.
  template <class KeyT>
  static void append_unchecked(cache_view& cache, tensor_view<KeyT, 4, space> new_keys,
                               tensor_view<KeyT, 4, space> new_values, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::append_unchecked";
    layout::check(function, cache);
    check_append(function, cache, new_keys, new_values, {cache.batch, cache.shape.kv_heads, -1, cache.shape.head_dim},
                 -1);
    implementation<LayoutT, BackendT>::append(cache, detail::as_const(new_keys), detail::as_const(new_values), stream);
  }

  /// Appends `new_keys`/`new_values` [n, D] to the one head (b, h), after what it
  /// holds (layouts whose heads have their own lengths: paged, flat).
  template <class KeyT>
    requires(LayoutT::ragged_heads)
  static void append_head(cache_view& cache, std::int64_t b, std::int64_t h, tensor_view<KeyT, 2, space> new_keys,
                          tensor_view<KeyT, 2, space> new_values, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::append_head";
    layout::validate(function, cache, /*exclusive=*/true);
    if (b < 0 || b >= cache.batch)
      detail::fail(function, "b", detail::cat("a sequence in [0, ", cache.batch, ")"), std::to_string(b));
    if (h < 0 || h >= cache.shape.kv_heads)
      detail::fail(function, "h", detail::cat("a kv head in [0, ", cache.shape.kv_heads, ")"), std::to_string(h));
    detail::check_view(function, "new_keys", new_keys, {-1, cache.shape.head_dim}, true);
    const std::int64_t count = new_keys.extent(0);
    // The rows seen as [batch, kv_heads, n, D] with zero strides on the first two
    // axes, so the layout's append code reads them for head (b, h).
    const auto as_head = [&](const tensor_view<KeyT, 2, space>& rows) {
      return tensor_view<const std::remove_const_t<KeyT>, 4, space>{
          rows.data, {cache.batch, cache.shape.kv_heads, count, cache.shape.head_dim}, {0, 0, rows.strides[0], rows.strides[1]}};
    };
    detail::check_view(function, "new_values", new_values, {count, cache.shape.head_dim}, true);
    const auto keys_in = as_head(new_keys);
    const auto values_in = as_head(new_values);
    check_append(function, cache, keys_in, values_in, {cache.batch, cache.shape.kv_heads, -1, cache.shape.head_dim},
                 b * cache.shape.kv_heads + h);
    // The CPU checks the rows as a [1, 1, n, D] view (its error names sequence 0, kv head 0).
    const auto row = [&](const tensor_view<KeyT, 2, space>& rows) {
      return tensor_view<const std::remove_const_t<KeyT>, 4, space>{
          rows.data, {1, 1, count, cache.shape.head_dim}, {0, 0, rows.strides[0], rows.strides[1]}};
    };
    check_finite_on_device(cache, detail::layout_status::append_head, row(new_keys), row(new_values), stream);
    implementation<LayoutT, BackendT>::append_head(cache, b, h, keys_in, values_in, stream);
  }

  // ---- rollback (speculative decoding) ----------------------------------------

  /// Removes the newest drop[b] tokens of every kv head of sequence b: the draft
  /// tokens a verifier rejected, after append(drafts) and a multi-query attend.
  /// The cache then holds what it would hold had only the accepted tokens been
  /// appended (docs/composition.md §8): the same tokens, positions and lengths;
  /// paged layouts give emptied pages back to the free list (in the reverse of
  /// append's order, so truncating a whole append restores the tables exactly).
  /// Refused (kvtrim::error before any write; on a device-planned layout, status
  /// words that check_status raises with the same message) when a drop is
  /// negative, exceeds a head's length, or reaches past what the codec can
  /// forget exactly (KIVI keys: the fp16 residual window; low_rank: the tokens
  /// since the last basis refresh; layered: its inner codec's limit).
  /// layout::contiguous holds one length: every drop must be equal. Dropped
  /// slots keep their bytes (nothing reads them) until appends overwrite them.
  /// backend::cuda: paged, flat and shared_paged plan on the device (no
  /// synchronisation, capturable in a CUDA graph); contiguous's length is host
  /// memory, so it reads `drop` back (one synchronisation) and refuses a
  /// capturing stream (docs/composition.md §8).
  static void truncate(cache_view& cache, tensor_view<const std::int32_t, 1, space> drop, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::truncate";
    layout::validate(function, cache, /*exclusive=*/true);
    detail::check_view(function, "drop", drop, {cache.batch});
    implementation<LayoutT, BackendT>::truncate(cache, drop, stream);
  }
  static void truncate(cache_view& cache, tensor_view<std::int32_t, 1, space> drop, stream_type stream = {}) {
    truncate(cache, detail::as_const(drop), stream);
  }

  // ---- decode attention ------------------------------------------------------

  /// Scratch bytes attend() needs for this cache as it is now.
  static std::size_t attend_workspace(const cache_view& cache) {
    return implementation<stage::decode_attention, BackendT>::workspace_bytes(cache);
  }

  /// out[b, j] = softmax_i(q[b, j]·k_i / √D) · v_i over every token i the cache
  /// holds for kv head j / group_size (fp32 softmax and accumulation).
  template <class QueryT, class OutT>
  static void attend(tensor_view<QueryT, 3, space> queries, const cache_view& cache, tensor_view<OutT, 3, space> out,
                     workspace scratch, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::attend";
    layout::validate(function, cache);
    attend_checked_view(function, queries, cache, out, scratch, stream);
  }

  /// attend() without the O(pages) validation of the cache's tables (layout::check still runs).
  template <class QueryT, class OutT>
  static void attend_unchecked(tensor_view<QueryT, 3, space> queries, const cache_view& cache,
                               tensor_view<OutT, 3, space> out, workspace scratch, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::attend_unchecked";
    layout::check(function, cache);
    attend_checked_view(function, queries, cache, out, scratch, stream);
  }

  /// Most new query tokens per sequence multi-query attend() takes (speculative decoding's drafts).
  static constexpr std::int64_t max_queries_per_sequence = 8;

  /// Scratch bytes multi-query attend() needs for n = queries_per_sequence new tokens per sequence.
  static std::size_t attend_workspace(const cache_view& cache, std::int64_t queries_per_sequence) {
    return implementation<stage::decode_attention, BackendT>::workspace_bytes(cache, queries_per_sequence);
  }

  /// Multi-query decode (speculative decoding): queries, out [B, n, Hq, D], n in
  /// 1..8 new tokens per sequence, the same n for every sequence (a vLLM / FlashInfer
  /// engine's flat [B·n, Hq, D] query rows are this view with strides {n·Hq·D, Hq·D, D, 1}).
  /// The n new tokens must already be appended: they are the last n tokens of every head,
  /// and query t sees the head's first L − n + 1 + t tokens (causal among the new tokens):
  ///   out[b, t, j] = softmax_{i ≤ L − n + t}(q[b, t, j]·k_i / √D) · v_i.
  /// n = 1 is attend() over [B, Hq, D].
  template <class QueryT, class OutT>
  static void attend(tensor_view<QueryT, 4, space> queries, const cache_view& cache, tensor_view<OutT, 4, space> out,
                     workspace scratch, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::attend";
    layout::validate(function, cache);
    attend_checked_view(function, queries, cache, out, scratch, stream);
  }

  /// Multi-query attend() without the O(pages) validation of the cache's tables.
  template <class QueryT, class OutT>
  static void attend_unchecked(tensor_view<QueryT, 4, space> queries, const cache_view& cache,
                               tensor_view<OutT, 4, space> out, workspace scratch, stream_type stream = {}) {
    constexpr std::string_view function = "kvtrim::scheme::attend_unchecked";
    layout::check(function, cache);
    attend_checked_view(function, queries, cache, out, scratch, stream);
  }

 private:
  template <class QueryT, class OutT>
  static void attend_checked_view(std::string_view function, tensor_view<QueryT, 3, space> queries,
                                  const cache_view& cache, tensor_view<OutT, 3, space> out, workspace scratch,
                                  stream_type stream) {
    const model_shape& shape = cache.shape;
    detail::check_view(function, "queries", queries, {cache.batch, shape.q_heads, shape.head_dim}, true);
    detail::check_view(function, "out", out, {cache.batch, shape.q_heads, shape.head_dim}, true);
    detail::check_workspace(function, scratch, attend_workspace(cache));
    implementation<stage::decode_attention, BackendT>::attend(detail::as_const(queries), cache, out, scratch, stream);
  }

  template <class QueryT, class OutT>
  static void attend_checked_view(std::string_view function, tensor_view<QueryT, 4, space> queries,
                                  const cache_view& cache, tensor_view<OutT, 4, space> out, workspace scratch,
                                  stream_type stream) {
    const model_shape& shape = cache.shape;
    detail::check_view(function, "queries", queries, {cache.batch, -1, shape.q_heads, shape.head_dim}, true);
    const std::int64_t queries_per_sequence = queries.extent(1);
    if (queries_per_sequence < 1 || queries_per_sequence > max_queries_per_sequence)
      detail::fail(function, "queries", detail::cat("1 to ", max_queries_per_sequence, " new tokens per sequence (axis 1)"),
                   std::to_string(queries_per_sequence));
    detail::check_view(function, "out", out, {cache.batch, queries_per_sequence, shape.q_heads, shape.head_dim}, true);
    detail::check_workspace(function, scratch, attend_workspace(cache, queries_per_sequence));
    implementation<stage::decode_attention, BackendT>::attend(detail::as_const(queries), cache, out, scratch, stream);
  }

  /// The argument checks of append/append_head, all before the first write:
  /// shapes, room for the positions, finite rows (host). `target` is one
  /// flattened head (append_head) or −1 (every head).
  template <class KeyT>
  static void check_append(std::string_view function, const cache_view& cache, const tensor_view<KeyT, 4, space>& keys,
                           const tensor_view<KeyT, 4, space>& values, const detail::expected_extents<4>& shape_wanted,
                           std::int64_t target) {
    detail::check_view(function, "new_keys", keys, shape_wanted, true);
    const std::int64_t count = keys.extent(2);
    if (count < 1) detail::fail(function, "new_keys", "at least one token", "0 tokens");
    detail::check_view(function, "new_values", values, {cache.batch, cache.shape.kv_heads, count, cache.shape.head_dim},
                       true);
    if constexpr (std::same_as<space, host_space>) {
      using stored = typename detail::stored_element<CodecT>::type;
      for (std::int64_t head = 0; head < cache.heads(); ++head) {
        if (target >= 0 && head != target) continue;
        const std::int64_t next = cache.positions.next_position[head];
        if (next < 0 || next > detail::position_table::max_position - count + 1)
          detail::fail(function, "new_keys",
                       detail::cat(count, " tokens whose positions fit in 32 bits after head ", head, "'s position ", next),
                       detail::cat("positions up to ", next + count - 1));
      }
      if (target >= 0) {
        const auto row = [&](const tensor_view<KeyT, 4, space>& all) {
          return tensor_view<KeyT, 4, space>{all.data + (target / cache.shape.kv_heads) * all.strides[0] +
                                                 (target % cache.shape.kv_heads) * all.strides[1],
                                             {1, 1, count, cache.shape.head_dim},
                                             {0, 0, all.strides[2], all.strides[3]}};
        };
        detail::check_finite<stored>(function, "new_keys", row(keys), "kv head");
        detail::check_finite<stored>(function, "new_values", row(values), "kv head");
      } else {
        detail::check_finite<stored>(function, "new_keys", keys, "kv head");
        detail::check_finite<stored>(function, "new_values", values, "kv head");
      }
    }
  }

  /// The device's NaN/Inf check of appended rows (where the layout has one; the
  /// host's check_append did it on the CPU). Called last before the layout's append,
  /// whose host checks it runs first: nothing can throw between the scan and the
  /// planning kernel that honours it.
  template <class KeyT>
  static void check_finite_on_device(const cache_view& cache, int entry, const tensor_view<KeyT, 4, space>& keys,
                                     const tensor_view<KeyT, 4, space>& values, stream_type stream) {
    if constexpr (detail::checks_finite_on_device<implementation<LayoutT, BackendT>>)
      implementation<LayoutT, BackendT>::template check_finite<typename detail::stored_element<CodecT>::type>(
          cache, entry, keys, values, tensor_view<KeyT, 4, space>{}, stream);
  }

  /// compress over all of a layer's heads on this device.
  struct one_rank {
    static constexpr bool sharded = false;
    const ::kvtrim::budget::head_shard* shard_or_null() const { return nullptr; }
  };
  /// compress over this rank's heads, the budget over every rank's.
  template <class Comm>
  struct sharded_ranks {
    static constexpr bool sharded = true;
    const ::kvtrim::budget::head_shard& shard;
    const Comm& comm;
    const ::kvtrim::budget::head_shard* shard_or_null() const { return &shard; }
  };

  template <class Ranks>
  static std::size_t workspace_needed(const model_shape& shape, std::int64_t batch, std::int64_t tokens,
                                      const config& cfg, const Ranks& ranks) {
    if constexpr (Ranks::sharded)
      return compress_workspace(shape, batch, tokens, cfg, ranks.shard);
    else
      return compress_workspace(shape, batch, tokens, cfg);
  }

  /// Runs `checks` on this rank, then one all-reduce of every rank's verdict (host
  /// communicators): if any rank refused, every rank throws — the refusing rank its
  /// own error, the others one saying so — and no rank is left waiting in a later collective.
  template <class Comm, class Checks>
  static void vote(std::string_view function, const Comm& comm, stream_type stream, Checks&& checks) {
    std::uint64_t refused = 0;
    try {
      checks();
    } catch (...) {
      refused = 1;
      comm.all_reduce_sum(&refused, 1, stream);
      throw;
    }
    comm.all_reduce_sum(&refused, 1, stream);
    if (refused > 0)
      detail::fail(function, "(another rank's input)", "every rank's arguments accepted",
                   detail::cat(refused, " of ", comm.size(), " ranks refused theirs (their own errors say why)"));
  }

  template <class KeyT, class QueryT, class Ranks>
  static void run_compress(tensor_view<KeyT, 4, space> keys, tensor_view<KeyT, 4, space> values,
                           tensor_view<QueryT, 4, space> window_queries, cache_view& cache, const config& cfg,
                           const compress_options<space>& options, const Ranks& ranks, workspace scratch,
                           stream_type stream) {
    constexpr std::string_view function = "kvtrim::scheme::compress";
    const model_shape& shape = cache.shape;
    const std::int64_t batch = cache.batch;
    const std::int64_t tokens = keys.extent(2);
    const std::int64_t heads = batch * shape.kv_heads;
    // Every check, before the first write (and, sharded on the host, before the first collective).
    const auto check = [&] {
      cfg.validate(function);
      layout::validate(function, cache, /*exclusive=*/true);
      detail::check_view(function, "keys", keys, {batch, shape.kv_heads, -1, shape.head_dim}, true);
      if (tokens < 1) detail::fail(function, "keys", "at least one token", "0 tokens");
      if (tokens > max_tokens)
        detail::fail(function, "keys", detail::cat("at most ", max_tokens, " tokens (token indices are 32-bit)"),
                     detail::cat(tokens, " tokens"));
      detail::check_view(function, "values", values, {batch, shape.kv_heads, tokens, shape.head_dim}, true);
      if constexpr (ScorerT::needs_queries) {
        detail::check_view(function, "window_queries", window_queries, {batch, shape.q_heads, -1, shape.head_dim},
                           true);
        const std::int64_t window = window_queries.extent(2);
        if (window < 1 || window > tokens)
          detail::fail(function, "window_queries", detail::cat("between 1 and ", tokens, " (the prefill length) queries"),
                       detail::cat(window, " queries"));
      }
      if (options.start_position < 0 || options.start_position > detail::position_table::max_position - tokens + 1)
        detail::fail(function, "options.start_position",
                     detail::cat("a position in [0, 2^31 − ", tokens, "] (positions of the ", tokens,
                                 " tokens are 32-bit)"),
                     std::to_string(options.start_position));
      const std::int64_t keep_bound = BudgetT::max_keep(cfg.budget, tokens);
      // A head left empty cannot be attended (decode attention refuses it): a budget that
      // fixes every head's count must keep one token at least. PyramidKV's paper schedule
      // rounds a deep layer's B_l < 1 down to 0 (its exact total L·k counts on it).
      if (!BudgetT::ragged_heads && !ScorerT::ragged_heads && keep_bound < 1)
        detail::fail(function, "config.budget",
                     detail::cat("a budget that keeps at least one token a head (", BudgetT::name,
                                 "; for PyramidKV's paper schedule: a larger keep, a window, or a smaller beta)"),
                     detail::cat("0 of ", tokens, " tokens a head"));
      if constexpr (!std::same_as<space, host_space> && !LayoutT::ragged_heads && requires { cache.capacity; }) {
        // Device contiguous caches advance positions on the device, unchecked: refuse
        // here a start position whose later appends (up to the capacity) would pass 2^31.
        if (options.start_position > detail::position_table::max_position - tokens - (cache.capacity - std::min(keep_bound, cache.capacity)) + 1)
          detail::fail(function, "options.start_position",
                       detail::cat("a position whose prefill and appends up to the capacity stay below 2^31"),
                       std::to_string(options.start_position));
      }
      // Contiguous only: its capacity is per head. flat's is its whole buffer and a pool
      // (paged, shared_paged) is checked by the layout's compact.
      if constexpr (!LayoutT::ragged_heads && requires { cache.capacity; }) {
        if (keep_bound > cache.capacity)
          detail::fail(function, "config.budget.keep", detail::cat("at most the cache capacity = ", cache.capacity,
                                                                   " tokens per head"),
                       detail::cat(keep_bound, " tokens (of ", tokens, ")"));
      }
      if (options.kept_offsets != nullptr || options.kept_tokens != nullptr) {
        const std::int64_t needed = kept_tokens_capacity(shape, batch, tokens, cfg);
        if (options.kept_offsets == nullptr || options.kept_tokens == nullptr || options.kept_tokens_capacity < needed)
          detail::fail(function, "options.kept_tokens",
                       detail::cat("both kept_offsets and kept_tokens, with room for ", needed,
                                   " tokens (scheme::kept_tokens_capacity)"),
                       detail::cat(options.kept_offsets ? "kept_offsets" : "no kept_offsets", ", ",
                                   options.kept_tokens ? "kept_tokens" : "no kept_tokens", " with capacity ",
                                   options.kept_tokens_capacity));
      }
      if constexpr (Ranks::sharded) ranks.shard.validate(function, shape.kv_heads);
      if (options.sequence_lengths != nullptr) check_sequence_lengths<Ranks>(function, cache, cfg, options, tokens,
                                                                             window_queries.extent(2));
      detail::check_workspace(function, scratch, workspace_needed(shape, batch, tokens, cfg, ranks));
      if constexpr (std::same_as<space, host_space>) {
        using stored = typename detail::stored_element<CodecT>::type;
        detail::check_finite<stored>(function, "keys", keys, "kv head", options.sequence_lengths);
        detail::check_finite<stored>(function, "values", values, "kv head", options.sequence_lengths);
        if constexpr (ScorerT::needs_queries)
          detail::check_finite(function, "window_queries", window_queries, "query head",
                               detail::observes_every_query<ScorerT> ? options.sequence_lengths : nullptr);
      }
    };
    if constexpr (Ranks::sharded && std::same_as<space, host_space>)
      vote(function, ranks.comm, stream, check);
    else
      check();
    const std::int64_t keep_bound = BudgetT::max_keep(cfg.budget, tokens);

    workspace_carver carver(scratch);
    auto parts = carve_compress(carver, shape, batch, tokens, cfg, ranks.shard_or_null());
    if (options.kept_offsets != nullptr) {
      parts.offsets = options.kept_offsets;
      parts.tokens = options.kept_tokens;
    }
    const auto keys_in = detail::as_const(keys);
    const auto values_in = detail::as_const(values);
    const auto queries_in = detail::as_const(window_queries);
    const score_view<space> scores{parts.scores, {batch, shape.kv_heads, tokens},
                                   row_major_strides<3>({batch, shape.kv_heads, tokens})};

    using scorer_impl = implementation<ScorerT, BackendT>;
    using budget_impl = implementation<BudgetT, BackendT>;
    using padded_impl = implementation<stage::padded_batch, BackendT>;
    constexpr bool budget_refuses_on_device =
        !Ranks::sharded && detail::refuses_on_device<budget_impl, typename BudgetT::config>;
    std::int64_t uniform_keep = keep_bound;
    if (options.sequence_lengths != nullptr) {  // host memory on both backends (check_sequence_lengths)
      // Each sequence alone over its own T_b tokens (a dense [1, H, T_b] score block),
      // its rows then set into the batch's scores with NaN past T_b: NaN ranks below
      // every score and ties keep the lower index (select_top_k), and every budget
      // keeps at most T_b, so the one selection below never reaches a padded token.
      const std::int64_t* lengths = options.sequence_lengths;
      for (std::int64_t b = 0; b < batch; ++b) {
        const std::int64_t length = lengths[b];
        const score_view<space> sequence_scores{parts.sequence_scores, {1, shape.kv_heads, length},
                                                row_major_strides<3>({1, shape.kv_heads, length})};
        std::remove_const_t<decltype(queries_in)> sequence_queries{};  // (nvcc's front end refuses `auto x = T{}` here)
        if constexpr (ScorerT::needs_queries)
          sequence_queries = detail::first_tokens(
              queries_in, b, detail::observes_every_query<ScorerT> ? length : queries_in.extent(2));
        try {
          score_and_count(detail::sequence_score_config<ScorerT>(cfg.score, b, length), cfg.budget, shape,
                          detail::first_tokens(keys_in, b, length), detail::first_tokens(values_in, b, length),
                          sequence_queries, sequence_scores, parts.keep_counts + b * shape.kv_heads, parts, ranks,
                          stream);
        } catch (const error& e) {  // only scratch is written so far: name the sequence the policy refused
          throw error(detail::cat(e.what(), " (sequence ", b, " of the padded batch: its ", length, " tokens alone)"));
        }
        padded_impl::place_scores(parts.sequence_scores, parts.scores + b * shape.kv_heads * tokens, shape.kv_heads,
                                  length, tokens, stream);
        if constexpr (!std::same_as<space, host_space>) {
          // What the device's kernels after this loop read of sequence b (padded_batch.cuh).
          const unsigned long long* sequence_refusal = nullptr;
          std::int64_t head_budget = 0;
          if constexpr (budget_refuses_on_device) {
            sequence_refusal = budget_impl::refusal_word(shape, 1, parts.budget_scratch);
            head_budget = budget_impl::refused_budget(cfg.budget, length);
          }
          padded_impl::record(parts.sequences, b, length, options.start_position + length, head_budget,
                              sequence_refusal, budget_refuses_on_device ? parts.batch_refusal : nullptr,
                              shape.kv_heads, stream);
        }
      }
      // One count for every head only when every sequence keeps as many (contiguous checks it).
      uniform_keep = BudgetT::max_keep(cfg.budget, lengths[0]);
      for (std::int64_t b = 1; b < batch; ++b)
        if (BudgetT::max_keep(cfg.budget, lengths[b]) != uniform_keep) uniform_keep = -1;
    } else {
      score_and_count(cfg.score, cfg.budget, shape, keys_in, values_in, queries_in, scores, parts.keep_counts, parts,
                      ranks, stream);
    }
    implementation<stage::select_top_k, BackendT>::select(detail::as_const(scores), parts.keep_counts, parts.offsets,
                                                          parts.tokens, parts.select_scratch, stream);
    const selection_view<space> kept{parts.offsets, parts.tokens, heads};
    compact_args args;
    args.start_position = options.start_position;
    args.sequence_lengths = options.sequence_lengths;
    if constexpr (!std::same_as<space, host_space>)
      if (options.sequence_lengths != nullptr) args.sequences = parts.sequences;
    args.uniform_keep = BudgetT::ragged_heads || ScorerT::ragged_heads ? -1 : uniform_keep;
    if constexpr (budget_refuses_on_device) {
      // A budget that finds its error on the device (Ada-KV's paper form) leaves it
      // in its workspace; the layout's compaction refuses instead of writing. (A padded
      // batch's: the fold of every sequence's word, with each sequence's own budget.)
      args.budget_refusal = options.sequence_lengths != nullptr
                                ? parts.batch_refusal
                                : budget_impl::refusal_word(shape, batch, parts.budget_scratch);
      args.refused_budget = budget_impl::refused_budget(cfg.budget, tokens);
    }
    if constexpr (detail::scorer_compensates<ScorerT>) {
      if (options.sequence_lengths != nullptr) {
        // Each sequence's compensation rows from its own T_b tokens and its heads' selection.
        for (std::int64_t b = 0; b < batch; ++b) {
          const std::int64_t first = b * shape.kv_heads, length = options.sequence_lengths[b];
          const detail::compensation_rows rows{parts.compensation.index + first,
                                               parts.compensation.keys + first * shape.head_dim,
                                               parts.compensation.values + first * shape.head_dim,
                                               parts.compensation.bias + first, parts.compensation.position + first};
          scorer_impl::compensation_rows(cfg.score, shape, detail::first_tokens(keys_in, b, length),
                                         detail::first_tokens(values_in, b, length),
                                         selection_view<space>{parts.offsets + first, parts.tokens, shape.kv_heads},
                                         options.start_position, rows, stream);
        }
      } else {
        scorer_impl::compensation_rows(cfg.score, shape, keys_in, values_in, kept, options.start_position,
                                       parts.compensation, stream);
      }
      args.compensation = &parts.compensation;
    }
    if constexpr (detail::checks_finite_on_device<implementation<LayoutT, BackendT>>) {
      // The device's NaN/Inf scan, after every host-side check of the call (none can
      // throw between it and compaction's planning kernel, which honours it).
      if (options.check_finite) {
        detail::finite_lengths prompt_lengths{};  // a padded batch: each sequence's prompt only
        if (options.sequence_lengths != nullptr) {
          prompt_lengths.tokens = parts.sequences.length;
          if (detail::observes_every_query<ScorerT>) prompt_lengths.queries = parts.sequences.length;
        }
        implementation<LayoutT, BackendT>::template check_finite<typename detail::stored_element<CodecT>::type>(
            cache, detail::layout_status::compress, keys_in, values_in,
            ScorerT::needs_queries ? queries_in : decltype(queries_in){}, stream, prompt_lengths);
      }
    }
    implementation<LayoutT, BackendT>::compact(cache, keys_in, values_in, kept, args, stream);
  }

  /// compress_options::sequence_lengths, checked before anything is written.
  template <class Ranks>
  static void check_sequence_lengths(std::string_view function, const cache_view& cache, const config& cfg,
                                     const compress_options<space>& options, std::int64_t tokens,
                                     std::int64_t window) {
    constexpr std::string_view argument = "options.sequence_lengths";
    if constexpr (Ranks::sharded)
      detail::fail(function, argument, "null in a sharded compress (per-sequence lengths are not sharded yet)",
                   "lengths given");
    const std::int64_t* lengths = options.sequence_lengths;
    const std::int64_t batch = cache.batch;
    // What the budget keeps of sequence b alone (a budget refusing its length says which sequence).
    const auto keep_of = [&](std::int64_t b) {
      try {
        return BudgetT::max_keep(cfg.budget, lengths[b]);
      } catch (const error& e) {
        throw error(detail::cat(e.what(), " (sequence ", b, " of the padded batch: its ", lengths[b], " tokens alone)"));
      }
    };
    // H2O's queries are sliced to each prompt's first T_b: all T must be there (its own check,
    // per sequence, would only see the slices).
    if (detail::observes_every_query<ScorerT> && window != tokens)
      detail::fail(function, "window_queries",
                   detail::cat("all ", tokens, " prefill queries (", ScorerT::name, " observes every query)"),
                   detail::cat(window, " queries"));
    for (std::int64_t b = 0; b < batch; ++b) {
      if (lengths[b] < 1 || lengths[b] > tokens)
        detail::fail(function, argument, detail::cat("a prefill length in [1, ", tokens, "] (the keys' tokens) per sequence"),
                     detail::cat(lengths[b], " for sequence ", b));
      if (ScorerT::needs_queries && !detail::observes_every_query<ScorerT> && window > lengths[b])
        detail::fail(function, argument,
                     detail::cat("at least the ", window, " window queries' tokens for every sequence"),
                     detail::cat(lengths[b], " for sequence ", b));
      // The selection's buffers (kept_tokens_capacity, the workspace) hold max_keep(T) a head;
      // a budget may keep more of a shorter prompt (PyramidKV's deep layers: 2B − M shrinks as
      // T grows), which they could not hold.
      if (keep_of(b) > BudgetT::max_keep(cfg.budget, tokens))
        detail::fail(function, argument,
                     detail::cat("lengths whose budgets keep at most the ", BudgetT::max_keep(cfg.budget, tokens),
                                 " tokens a head that T = ", tokens, " keeps (the selection's buffers hold that many)"),
                     detail::cat(keep_of(b), " for sequence ", b, " (", lengths[b], " tokens)"));
    }
    // Per-sequence inputs a scorer holds are sliced per sequence: their whole extents first.
    if constexpr (requires { cfg.score.lse; cfg.score.lse_extents; }) {
      const std::array<std::int64_t, 3> expected{batch, cache.shape.q_heads, window};
      if (cfg.score.lse != nullptr && cfg.score.lse_extents != expected)
        detail::fail(function, "config.score.lse",
                     detail::cat("normalisers of extents [", batch, ", ", cache.shape.q_heads, ", ", window, "]"),
                     detail::cat("[", cfg.score.lse_extents[0], ", ", cfg.score.lse_extents[1], ", ",
                                 cfg.score.lse_extents[2], "]"));
    }
    if constexpr (requires { ScorerT::check(function, cfg.score, batch, cache.shape.kv_heads, tokens); })
      ScorerT::check(function, cfg.score, batch, cache.shape.kv_heads, tokens);
    if constexpr (!LayoutT::ragged_heads && requires { cache.capacity; }) {
      // One length for every head of the cache: every sequence must keep as many.
      for (std::int64_t b = 1; b < batch; ++b)
        if (keep_of(b) != keep_of(0))
          detail::fail(function, argument,
                       detail::cat("lengths whose budgets keep equally many tokens on ", LayoutT::name,
                                   " (one length for every head): ", keep_of(0), " for sequence 0"),
                       detail::cat(keep_of(b), " for sequence ", b, " (", lengths[b], " tokens)"));
    }
  }

  /// The scorer's scores of a batch (or of one sequence: a one-sequence batch) and the
  /// keep counts of its heads: the budget's, or the scorer's own (RazorAttention).
  template <class ScoreConfig, class KeysView, class QueriesView, class Parts, class Ranks>
  static void score_and_count(const ScoreConfig& score_config, const typename BudgetT::config& budget_config,
                              const model_shape& shape, const KeysView& keys, const KeysView& values,
                              const QueriesView& queries, const score_view<space>& scores, std::int32_t* keep_counts,
                              const Parts& parts, const Ranks& ranks, stream_type stream) {
    using scorer_impl = implementation<ScorerT, BackendT>;
    using budget_impl = implementation<BudgetT, BackendT>;
    if constexpr (detail::needs_scratch<scorer_impl, typename ScorerT::config>)
      scorer_impl::score(score_config, shape, keys, values, queries, scores, parts.score_scratch, stream);
    else
      scorer_impl::score(score_config, shape, keys, values, queries, scores, stream);
    if constexpr (detail::scorer_sets_keep_counts<ScorerT>)
      scorer_impl::keep_counts(score_config, shape, detail::as_const(scores), keep_counts, stream);
    else if constexpr (Ranks::sharded)
      budget_impl::keep_counts(budget_config, detail::as_const(scores), ranks.shard, ranks.comm, keep_counts,
                               parts.budget_scratch, stream);
    else if constexpr (detail::needs_scratch<budget_impl, typename BudgetT::config>)
      budget_impl::keep_counts(budget_config, detail::as_const(scores), keep_counts, parts.budget_scratch, stream);
    else
      budget_impl::keep_counts(budget_config, detail::as_const(scores), keep_counts, stream);
  }

  struct compress_parts {
    float* scores = nullptr;
    float* sequence_scores = nullptr;  // [H, T]: one sequence's scores (compress_options::sequence_lengths)
    detail::sequence_table sequences{};          // device: [B] each (padded_batch.cuh)
    unsigned long long* batch_refusal = nullptr;  // device: the padded batch's budget refusal word
    std::int32_t* keep_counts = nullptr;
    std::int64_t* offsets = nullptr;
    std::int32_t* tokens = nullptr;
    workspace select_scratch{};
    workspace score_scratch{};
    workspace budget_scratch{};
    detail::compensation_rows compensation{};
  };

  template <class Carver>
  static compress_parts carve_compress(Carver& carver, const model_shape& shape, std::int64_t batch,
                                       std::int64_t tokens, const config& cfg,
                                       const ::kvtrim::budget::head_shard* shard = nullptr) {
    const std::int64_t heads = batch * shape.kv_heads;
    compress_parts parts;
    parts.scores = carver.template take<float>(heads * tokens);
    // compress_options::sequence_lengths: one sequence's scores (H·T floats, 1/B of the
    // batch's) and, on the device, the per-sequence table the kernels after the loop read.
    parts.sequence_scores = carver.template take<float>(shape.kv_heads * tokens);
    if constexpr (!std::same_as<space, host_space>) {
      parts.sequences.length = carver.template take<std::int64_t>(batch);
      parts.sequences.next_position = carver.template take<std::int64_t>(batch);
      parts.sequences.head_budget = carver.template take<std::int64_t>(batch);
      parts.batch_refusal = carver.template take<unsigned long long>(1);
    }
    parts.keep_counts = carver.template take<std::int32_t>(heads);
    parts.offsets = carver.template take<std::int64_t>(heads + 1);
    parts.tokens = carver.template take<std::int32_t>(
        detail::checked_mul("kvtrim::scheme::compress_workspace", "tokens", heads, BudgetT::max_keep(cfg.budget, tokens)));
    const std::size_t select_bytes = implementation<stage::select_top_k, BackendT>::workspace_bytes(heads, tokens);
    parts.select_scratch = workspace{carver.template take<std::byte>(static_cast<std::int64_t>(select_bytes)),
                                     select_bytes};
    parts.score_scratch =
        detail::carve_scratch<implementation<ScorerT, BackendT>>(carver, cfg.score, shape, batch, tokens);
    parts.budget_scratch = carve_budget_scratch(carver, shape, batch, tokens, cfg, shard);
    if constexpr (detail::scorer_compensates<ScorerT>) {
      parts.compensation.index = carver.template take<std::int32_t>(heads);
      parts.compensation.keys = carver.template take<float>(heads * shape.head_dim);
      parts.compensation.values = carver.template take<float>(heads * shape.head_dim);
      parts.compensation.bias = carver.template take<float>(heads);
      parts.compensation.position = carver.template take<std::int64_t>(heads);
    }
    return parts;
  }

  /// The budget's scratch: its sharded form's when `shard` is given.
  template <class Carver>
  static workspace carve_budget_scratch(Carver& carver, const model_shape& shape, std::int64_t batch,
                                        std::int64_t tokens, const config& cfg, const ::kvtrim::budget::head_shard* shard) {
    using budget_impl = implementation<BudgetT, BackendT>;
    if constexpr (detail::shards_heads<budget_impl, typename BudgetT::config>) {
      if (shard != nullptr) {
        const std::size_t bytes = budget_impl::sharded_workspace_bytes(cfg.budget, batch, shape.kv_heads, tokens, *shard);
        return workspace{carver.template take<std::byte>(static_cast<std::int64_t>(bytes)), bytes};
      }
    }
    return detail::carve_scratch<budget_impl>(carver, cfg.budget, shape, batch, tokens);
  }
};

}  // namespace kvtrim
