// python/src/binding.hpp — the type-erased cache behind kvtrim's Python package.
//
// Python chooses a scheme at run time; C++ needs it at compile time. Between
// them sits this header: a `settings` struct (every runtime knob the Python
// presses and codecs can set), `cache_base` (one virtual interface over every
// compiled scheme), and `typed_cache<Scheme, InputT>` (the one implementation
// of that interface, written once against kvtrim::scheme). Which schemes exist
// is decided by the instantiation lists in registry_cpu.cpp and
// registry_cuda.cuh, nowhere else.
//
// This header includes no nanobind (the registry_cuda_<layout>.cu files include it under nvcc);
// arrays arrive as `array`, a plain description of an already type-checked
// DLPack tensor (module.cpp makes them from nanobind ndarrays).
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvtrim::python {

// ---- settings: every knob the Python side can turn -----------------------------

struct settings {
  // which scheme (names as in the registry)
  std::string device = "cpu";          // cpu | cuda
  std::string layout = "contiguous";   // contiguous | flat | paged
  std::string scorer = "static_window";  // static_window | snapkv | h2o | key_norm | external | retrieval_head
  std::string budget = "uniform";      // uniform | adaptive | pyramid | by_scorer
  std::string codec = "fp16";          // fp16 | bf16 | fp32 | int8 | int4 | fp8 | low_rank | layered<int8> | layered<int4>

  // how much each head keeps: a kvpress compression ratio or a token count
  double compression_ratio = 0.0;  // kvpress: keep int(T·(1 − ratio)); used when keep_tokens == 0
  std::int64_t keep_tokens = 0;    // > 0: keep this many tokens per head

  // score::static_window (and retrieval_head's sinks)
  std::int64_t sinks = 4;
  std::vector<std::int64_t> windows{};
  // score::snapkv
  std::int64_t window = 64;
  std::int64_t kernel = 5;
  std::string pooling = "avg";      // avg | max
  std::string reduction = "mean";   // mean | sum
  std::string group = "mean";       // mean | max (also h2o)
  // score::h2o
  double recent_ratio = 0.1;        // used when recent_tokens == 0
  std::int64_t recent_tokens = 0;
  bool protect_recent = true;
  std::string normalisation = "none";  // none | observed
  // score::retrieval_head
  std::vector<bool> retrieval{};
  std::int64_t min_recent = 4000;
  double recent_fraction = 0.2;
  bool compensation = true;
  // budget::adaptive
  double alpha = 0.2;
  bool kvpress_compatible = true;
  // budget::pyramid
  std::int64_t pyramid_window = 0;
  std::int64_t beta = 20;
  std::int64_t layer = 0;
  std::int64_t layers = 1;
  // codec::int8 / codec::int4 (KIVI)
  std::int64_t key_group = 32;
  bool asymmetric = true;
  // codec::fp8 (e4m3)
  std::string fp8_scales = "head_amax";  // head_amax | fixed
  double fp8_key_scale = 1.0;
  double fp8_value_scale = 1.0;
  // codec::low_rank
  std::int64_t rank = 0;      // > 0: fixed rank; 0: the smallest rank reaching `energy`
  double energy = 0.98;
  std::int64_t max_rank = 0;  // 0: head_dim / 2
  std::int64_t update_freq = 16;
  std::string key_space = "post_rope";  // post_rope | pre_rope
  double rope_theta = 10000.0;
  std::int64_t rotary_dim = 0;
  std::string rope_pairs = "half_split";  // half_split | interleaved
  std::string low_rank_source = "sequence";  // sequence (fitted at compaction) | profile (Cache.set_basis)
  // codec::layered<C>: fp16 rows for the first `layered_sinks` and the newest `layered_recent` tokens per head
  std::int64_t layered_sinks = 4;
  std::int64_t layered_recent = 128;
  // layout::paged
  std::int64_t page_size = layout::paged::default_page_size;
  // Device paged/flat caches: when a refusal the device recorded in the cache's status words
  // (pool exhausted, positions past 2^31, NaN/Inf inputs, Ada-KV's paper form over budget)
  // becomes kvtrim.Error. "sync": at the end of every compress and append (one stream
  // synchronisation each); "deferred": at Cache.check_status() and at the next call that
  // synchronises anyway (head_lengths, kept, positions, read, stats). See typed_cache::check_status.
  std::string check = "sync";  // sync | deferred
};

// ---- arrays ----------------------------------------------------------------------

enum class element_type { f32, f16, bf16, i32 };

inline std::string_view name_of(element_type type) {
  switch (type) {
    case element_type::f32: return "float32";
    case element_type::f16: return "float16";
    case element_type::bf16: return "bfloat16";
    case element_type::i32: return "int32";
  }
  return "?";
}

template <class T>
inline constexpr element_type element_of = std::same_as<T, float>          ? element_type::f32
                                           : std::same_as<T, half>         ? element_type::f16
                                           : std::same_as<T, std::int32_t> ? element_type::i32
                                                                           : element_type::bf16;

/// One argument array: a DLPack tensor whose rank and element type module.cpp checked.
struct array {
  void* data = nullptr;
  std::size_t rank = 0;
  std::array<std::int64_t, 4> extents{};
  std::array<std::int64_t, 4> strides{};  // in elements
  element_type type = element_type::f32;
  bool on_device = false;  // CUDA memory (device_id says which GPU)
  int device_id = 0;

  std::string describe() const {
    std::string shape = "[";
    for (std::size_t axis = 0; axis < rank; ++axis) shape += (axis ? ", " : "") + std::to_string(extents[axis]);
    return detail::cat(name_of(type), " ", shape, "] on ", on_device ? "cuda:" + std::to_string(device_id) : "cpu");
  }
};

/// `given` as a Rank-d view of Element in Space (host: the cpu, device: a cuda device), or a
/// kvtrim::error naming `function` and `argument` with what was expected and what came.
template <std::size_t Rank, class Element, class Space>
tensor_view<Element, Rank, Space> array_view(std::string_view function, std::string_view argument, const array& given) {
  using stored = std::remove_const_t<Element>;
  constexpr bool on_host = std::same_as<Space, host_space>;
  if (given.rank != Rank || given.type != element_of<stored> || given.on_device == on_host)
    detail::fail(function, argument,
                 detail::cat("a ", Rank, "-d ", name_of(element_of<stored>), " array on the ",
                             on_host ? "cpu" : "cuda device"),
                 given.describe());
  tensor_view<Element, Rank, Space> view;
  view.data = static_cast<Element*>(given.data);
  for (std::size_t axis = 0; axis < Rank; ++axis) {
    view.extents[axis] = given.extents[axis];
    view.strides[axis] = given.strides[axis];
  }
  return view;
}

/// Thrown where the C++ side does not offer something yet; module.cpp turns it into NotImplementedError.
struct not_implemented : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- what Python sees of a cache -------------------------------------------------

struct kept_indices {
  std::vector<std::int64_t> offsets;  // [B·H + 1]
  std::vector<std::int32_t> tokens;   // ascending per head
  std::vector<std::int64_t> sequence_lengths;  // the compress's prompt lengths (empty: every sequence all T)
};

struct stats_result {
  std::string codec;
  std::int64_t head_dim = 0;
  double bytes_per_token = 0.0;
  double bytes_per_head = 0.0;
  std::vector<std::int64_t> kept;  // per flattened head b·H + h
  std::vector<double> bytes;       // per flattened head
  double total_bytes = 0.0;
  double fp16_bytes = 0.0;
  double ratio = 0.0;
  std::size_t allocated_bytes = 0;
  std::string table;
};

/// One head's codec::low_rank storage (Cache.low_rank): its bases and the coefficients of the tokens it
/// holds, in the order read() gives the tokens.
struct low_rank_head {
  std::int64_t head_dim = 0, tokens = 0;
  std::int64_t key_rank = 0, value_rank = 0;
  std::vector<float> key_basis, value_basis;                // [head_dim, rank], row-major
  std::vector<float> key_coefficients, value_coefficients;  // [n, rank] (fp16 values, widened)
};

/// One kv head's bases as Cache.set_basis and Cache.load_low_rank_profile hand them to a cache: head_dim × rank,
/// row-major, host memory (owned by the caller for the call).
struct head_bases {
  const float* key_basis = nullptr;
  std::int64_t key_rank = 0;
  std::size_t key_entries = 0;  // elements behind key_basis (head_dim · key_rank when well formed)
  const float* value_basis = nullptr;
  std::int64_t value_rank = 0;
  std::size_t value_entries = 0;
};

/// One layer of an io::low_rank_profile for Cache.load_low_rank_profile (module.cpp fills it from the profile;
/// this header includes no JSON): the profile's sizes and key space, and layer `layer`'s bases, one per kv head
/// (empty when `layer` is not one of the profile's layers: the cache refuses it).
struct profile_layer {
  std::int64_t layers = 0, kv_heads = 0, head_dim = 0;
  std::int64_t layer = 0;
  bool pre_rope = false;
  std::vector<head_bases> heads;
};

/// max |UᵀU − I| over a head_dim × rank row-major basis (in double), or no value when an entry is NaN or Inf.
inline std::optional<double> basis_deviation(const float* basis, std::int64_t head_dim, std::int64_t rank) {
  for (std::int64_t i = 0; i < head_dim * rank; ++i)
    if (!std::isfinite(basis[i])) return std::nullopt;
  double deviation = 0.0;
  for (std::int64_t a = 0; a < rank; ++a)
    for (std::int64_t c = 0; c < rank; ++c) {
      double dot = 0.0;
      for (std::int64_t d = 0; d < head_dim; ++d)
        dot += static_cast<double>(basis[d * rank + a]) * static_cast<double>(basis[d * rank + c]);
      deviation = std::max(deviation, std::abs(dot - (a == c ? 1.0 : 0.0)));
    }
  return deviation;
}

class cache_base {
 public:
  virtual ~cache_base() = default;
  /// `scores` [B, H_kv, T] float32: the caller's scores (score::external only; null otherwise).
  /// `lse` [B, H_q, n_q] float32: the prefill's softmax normalisers of window_queries (SnapKV, H2O:
  /// score/attention_mass.hpp, "Given normalisers"; null: computed).
  /// `lengths` (host, B entries; null: every sequence has all T tokens): each sequence's prompt
  /// length in a right-padded batch (compress_options::sequence_lengths, CPU and CUDA caches).
  virtual void compress(const array& keys, const array& values, const array* window_queries, const array* scores,
                        const array* lse, const std::vector<std::int64_t>* lengths, std::uintptr_t stream) = 0;
  virtual void append(const array& keys, const array& values, std::uintptr_t stream) = 0;
  /// queries, out: [B, Hq, D] (one new token per sequence) or [B, Hq, L, D] (L new tokens per
  /// sequence, already appended; row i sees the first n − L + 1 + i tokens: scheme's multi-query attend).
  virtual void attend(const array& queries, const array& out, std::uintptr_t stream) = 0;
  /// scheme::truncate: drop [B] int32 (host, or the cache's device) — the newest drop[b] tokens of every
  /// kv head of sequence b leave the cache (speculative decoding's rejected drafts).
  virtual void truncate(const array& drop, std::uintptr_t stream) = 0;
  /// codec::low_rank with profile bases: installs key_bases / value_bases [Hkv, D, r] (host float32;
  /// orthonormal columns) into every sequence's head h.
  virtual void set_basis(const array& key_bases, const array& value_bases, std::uintptr_t stream) = 0;
  /// codec::low_rank with profile bases: installs the profile layer's bases of kv head h (ranks may differ from
  /// head to head, each ≤ the stored rank) into every sequence's head h — io::load_profile's checks, all made
  /// before the first basis is installed, then set_basis's per-head path (host or device).
  virtual void load_low_rank_profile(const profile_layer& profile, std::uintptr_t stream) = 0;
  virtual low_rank_head low_rank(std::int64_t b, std::int64_t h) const = 0;
  /// Host seconds per Scheme::attend call over `calls` calls made from C++ with the
  /// views converted once: the bare C++ cost that bench/python_overhead.py subtracts
  /// from the Python call's (issue 14's ≤ 20 µs). No synchronisation, like the
  /// Python side's timing: on a GPU it is launch time (or kernel time once the
  /// launch queue is full, equally for both).
  virtual double attend_seconds_from_cxx(const array& queries, const array& out, std::uintptr_t stream,
                                         std::int64_t calls) = 0;
  // Inspection. A device cache is copied back to the host first (cudaMemcpyAsync on
  // the stream of the cache's last compress/append/attend, then that stream is
  // synchronised): not for a hot path, and the results are those of the same
  // host code that inspects a CPU cache.
  virtual std::vector<std::int64_t> head_lengths() const = 0;
  virtual kept_indices kept() const = 0;
  virtual std::vector<std::int32_t> positions() const = 0;
  virtual stats_result stats() const = 0;
  /// The dequantized keys and values [n, D] the head (b, h) holds, as float32.
  virtual std::pair<std::vector<float>, std::vector<float>> read_head(std::int64_t b, std::int64_t h) const = 0;
  virtual bool needs_scores() const = 0;
  /// Throws, as kvtrim.Error with the CPU's message, a refusal a device paged/flat cache
  /// recorded since the last check (kvtrim::check_status: synchronises the stream of the
  /// cache's last call, clears the record). Nothing to do for CPU and contiguous caches,
  /// whose calls throw at once.
  virtual void check_status() const = 0;
  virtual std::size_t bytes() const = 0;
  virtual model_shape shape() const = 0;
  virtual std::int64_t batch() const = 0;
  virtual element_type input_type() const = 0;
  virtual bool needs_queries() const = 0;
  virtual std::string name() const = 0;
};

// ---- the registry: scheme names → factories ---------------------------------------

struct scheme_key {
  std::string device, layout, scorer, budget, codec;
  friend auto operator<=>(const scheme_key&, const scheme_key&) = default;
};

using factory = std::unique_ptr<cache_base> (*)(const settings&, const model_shape&, std::int64_t batch,
                                                std::int64_t capacity);
using registry = std::map<scheme_key, factory>;

void register_cpu_schemes(registry& into);   // registry_cpu.cpp
void register_cuda_schemes(registry& into);  // registry_cuda_contiguous.cu (only when CUDA was found at build time)

// ---- policy names (the registry's keys) -------------------------------------------

template <class P>
struct policy_name;
template <> struct policy_name<score::static_window> { static constexpr std::string_view value = "static_window"; };
template <> struct policy_name<score::snapkv> { static constexpr std::string_view value = "snapkv"; };
template <> struct policy_name<score::h2o> { static constexpr std::string_view value = "h2o"; };
template <> struct policy_name<score::key_norm> { static constexpr std::string_view value = "key_norm"; };
template <> struct policy_name<score::external> { static constexpr std::string_view value = "external"; };
template <> struct policy_name<score::retrieval_head> { static constexpr std::string_view value = "retrieval_head"; };
template <> struct policy_name<budget::uniform> { static constexpr std::string_view value = "uniform"; };
template <> struct policy_name<budget::adaptive> { static constexpr std::string_view value = "adaptive"; };
template <> struct policy_name<budget::pyramid> { static constexpr std::string_view value = "pyramid"; };
template <> struct policy_name<budget::by_scorer> { static constexpr std::string_view value = "by_scorer"; };
template <> struct policy_name<layout::contiguous> { static constexpr std::string_view value = "contiguous"; };
template <> struct policy_name<layout::flat> { static constexpr std::string_view value = "flat"; };
template <> struct policy_name<layout::paged> { static constexpr std::string_view value = "paged"; };
template <> struct policy_name<codec::fp16> { static constexpr std::string_view value = "fp16"; };
template <> struct policy_name<codec::bf16> { static constexpr std::string_view value = "bf16"; };
template <> struct policy_name<codec::fp32> { static constexpr std::string_view value = "fp32"; };
template <> struct policy_name<codec::int8> { static constexpr std::string_view value = "int8"; };
template <> struct policy_name<codec::int4> { static constexpr std::string_view value = "int4"; };
template <> struct policy_name<codec::fp8> { static constexpr std::string_view value = "fp8"; };
template <> struct policy_name<codec::low_rank> { static constexpr std::string_view value = "low_rank"; };
template <> struct policy_name<codec::layered<codec::int8>> { static constexpr std::string_view value = "layered<int8>"; };
template <> struct policy_name<codec::layered<codec::int4>> { static constexpr std::string_view value = "layered<int4>"; };
template <> struct policy_name<backend::cpu> { static constexpr std::string_view value = "cpu"; };

// ---- settings → policy configs ------------------------------------------------------

namespace convert {

inline constexpr std::string_view where = "kvtrim.Settings";

inline keep_amount keep(const settings& s) {
  if (s.keep_tokens > 0) return keep_tokens{s.keep_tokens};
  if (s.keep_tokens < 0) detail::fail(where, "tokens", "a token budget of at least 1", std::to_string(s.keep_tokens));
  return kvpress::keep(s.compression_ratio);  // kvpress's int(T·(1 − ratio)), and its check of the ratio
}

template <class Enum>
Enum pick(std::string_view field, const std::string& value, std::initializer_list<std::pair<std::string_view, Enum>> choices) {
  std::string names;
  for (const auto& [name, choice] : choices) {
    if (value == name) return choice;
    names += (names.empty() ? "" : " or ") + std::string("'") + std::string(name) + "'";
  }
  detail::fail(where, field, names, "'" + value + "'");
}

inline score::static_window::config score(std::type_identity<score::static_window>, const settings& s) {
  return {.sinks = s.sinks, .windows = s.windows};
}
inline score::snapkv::config score(std::type_identity<score::snapkv>, const settings& s) {
  return {.window = s.window,
          .kernel = s.kernel,
          .pooling = pick<score::pooling>("pooling", s.pooling, {{"avg", score::pooling::avg}, {"max", score::pooling::max}}),
          .reduction = pick<score::window_reduction>(
              "reduction", s.reduction, {{"mean", score::window_reduction::mean}, {"sum", score::window_reduction::sum}}),
          .group = pick<score::group_reduction>("group", s.group,
                                                {{"mean", score::group_reduction::mean}, {"max", score::group_reduction::max}})};
}
inline score::h2o::config score(std::type_identity<score::h2o>, const settings& s) {
  return {.recent = s.recent_tokens > 0 ? keep_amount{keep_tokens{s.recent_tokens}} : keep_amount{keep_ratio{s.recent_ratio}},
          .protect_recent = s.protect_recent,
          .normalisation = pick<score::h2o::normalisation>(
              "normalisation", s.normalisation,
              {{"none", score::h2o::normalisation::none}, {"observed", score::h2o::normalisation::observed}}),
          .group = pick<score::group_reduction>("group", s.group,
                                                {{"mean", score::group_reduction::mean}, {"max", score::group_reduction::max}})};
}
inline score::key_norm::config score(std::type_identity<score::key_norm>, const settings&) { return {}; }
/// The scores themselves come with each compress call (typed_cache::compress).
inline score::external::config score(std::type_identity<score::external>, const settings&) { return {}; }
inline score::retrieval_head::config score(std::type_identity<score::retrieval_head>, const settings& s) {
  score::retrieval_head::config cfg;
  cfg.retrieval = s.retrieval;
  cfg.sinks = s.sinks;
  cfg.min_recent = s.min_recent;
  cfg.recent_fraction = s.recent_fraction;
  cfg.compensation = s.compensation;
  return cfg;
}

inline budget::uniform::config budget(std::type_identity<budget::uniform>, const settings& s) { return {.keep = keep(s)}; }
inline budget::adaptive::config budget(std::type_identity<budget::adaptive>, const settings& s) {
  return {.keep = keep(s), .alpha = s.alpha, .kvpress_compatible = s.kvpress_compatible};
}
inline budget::pyramid::config budget(std::type_identity<budget::pyramid>, const settings& s) {
  return {.keep = keep(s),
          .window = s.pyramid_window,
          .beta = s.beta,
          .layer = s.layer,
          .layers = s.layers,
          .kvpress_compatible = s.kvpress_compatible};
}
inline budget::by_scorer::config budget(std::type_identity<budget::by_scorer>, const settings&) { return {}; }

template <class T>
typename codec::plain<T>::config codec(std::type_identity<codec::plain<T>>, const settings&) {
  return {};
}
template <int Bits>
typename codec::quantized<Bits>::config codec(std::type_identity<codec::quantized<Bits>>, const settings& s) {
  typename codec::quantized<Bits>::config cfg;
  cfg.keys = codec::key_scaling::per_channel_group;
  cfg.key_group = s.key_group;
  cfg.asymmetric = s.asymmetric;
  return cfg;
}
inline codec::fp8::config codec(std::type_identity<codec::fp8>, const settings& s) {
  codec::fp8::config cfg;
  cfg.scales = pick<codec::fp8_scaling>("fp8_scales", s.fp8_scales,
                                        {{"head_amax", codec::fp8_scaling::head_amax}, {"fixed", codec::fp8_scaling::fixed}});
  cfg.key_scale = static_cast<float>(s.fp8_key_scale);
  cfg.value_scale = static_cast<float>(s.fp8_value_scale);
  return cfg;
}
inline codec::low_rank::config codec(std::type_identity<codec::low_rank>, const settings& s) {
  codec::low_rank::config cfg;
  if (s.rank < 0) detail::fail(where, "rank", "a rank of at least 1, or 0 (chosen by energy)", std::to_string(s.rank));
  if (s.max_rank < 0) detail::fail(where, "max_rank", "at least 1, or 0 (head_dim / 2)", std::to_string(s.max_rank));
  if (s.rank > 0) cfg.rank = s.rank;
  if (s.max_rank > 0) cfg.max_rank = s.max_rank;
  cfg.energy = s.energy;
  cfg.update_freq = s.update_freq;
  cfg.source = pick<codec::basis_source>("low_rank_source", s.low_rank_source,
                                         {{"sequence", codec::basis_source::sequence},
                                          {"profile", codec::basis_source::profile}});
  cfg.keys = pick<codec::key_space>("key_space", s.key_space,
                                    {{"post_rope", codec::key_space::post_rope}, {"pre_rope", codec::key_space::pre_rope}});
  cfg.rope.theta = s.rope_theta;
  cfg.rope.rotary_dim = s.rotary_dim;
  cfg.rope.pairs = pick<rope::pairing>("rope_pairs", s.rope_pairs,
                                       {{"half_split", rope::pairing::half_split}, {"interleaved", rope::pairing::interleaved}});
  return cfg;
}
template <class Inner>
typename codec::layered<Inner>::config codec(std::type_identity<codec::layered<Inner>>, const settings& s) {
  typename codec::layered<Inner>::config cfg;
  cfg.inner = codec(std::type_identity<Inner>{}, s);
  cfg.sinks = s.layered_sinks;
  cfg.recent = s.layered_recent;
  return cfg;
}

template <class Scheme>
typename Scheme::config config(const settings& s) {
  typename Scheme::config cfg;
  cfg.score = score(std::type_identity<typename Scheme::scorer>{}, s);
  cfg.budget = budget(std::type_identity<typename Scheme::budget>{}, s);
  return cfg;
}

/// The layout's room argument of make_cache: slots per head (contiguous), slots
/// in the pool (flat), or pages of page_size slots covering `capacity` slots (paged).
template <class Layout>
auto room(const settings& s, std::int64_t capacity) {
  if constexpr (std::same_as<Layout, layout::contiguous>) {
    return capacity;
  } else if constexpr (std::same_as<Layout, layout::flat>) {
    return layout::flat::pool_size{.slots = capacity};
  } else {
    if (s.page_size < 1) detail::fail(where, "page_size", "at least one token per page", std::to_string(s.page_size));
    return layout::paged::pool_size{.pages = layout::paged::pages_for(capacity, s.page_size), .page_size = s.page_size};
  }
}

}  // namespace convert

// ---- memory the binding owns (scratch), in the backend's space -----------------------

template <class Backend>
class scratch_buffer {
 public:
  scratch_buffer() = default;
  scratch_buffer(const scratch_buffer&) = delete;
  scratch_buffer& operator=(const scratch_buffer&) = delete;
  ~scratch_buffer() { release(); }

  /// At least `bytes` bytes (grows, never shrinks; not on a path that repeats at a fixed size).
  workspace get(std::size_t bytes) {
    if (bytes == 0) return workspace{};
    if (bytes > bytes_) {
      release();
      memory_ = Backend::allocate(bytes);
      bytes_ = bytes;
    }
    return workspace{memory_, bytes_};
  }
  const void* data() const { return memory_; }
  std::size_t size() const { return bytes_; }

 private:
  void release() {
    if (memory_ != nullptr) Backend::deallocate(memory_);
    memory_ = nullptr;
    bytes_ = 0;
  }
  void* memory_ = nullptr;
  std::size_t bytes_ = 0;
};

// ---- one implementation of cache_base for every compiled scheme -------------------------

/// Copies `bytes` of device memory to the host on `stream` and waits for that
/// stream (defined in registry_cuda_contiguous.cu; host caches never call it).
void copy_to_host(void* host, const void* device, std::size_t bytes, std::uintptr_t stream);
/// kvtrim::check_status over a device cache's status words (defined in registry_cuda_contiguous.cu,
/// so that the .cpp TUs need no CUDA header; host caches never call it).
void check_device_status(std::int64_t* status, std::uintptr_t stream);
/// Copies `bytes` of host memory to the device on `stream` (pageable: the host buffer may go once it returns).
void copy_to_device(void* device, const void* host, std::size_t bytes, std::uintptr_t stream);
/// cuda_detail::set_low_rank_basis (defined in registry_cuda_codecs.cu, which compiles the CUDA low-rank schemes).
void set_device_low_rank_basis(const codec::low_rank::storage<device_space>& store, std::int64_t head,
                               const float* key_basis, std::int64_t key_rank, const float* value_basis,
                               std::int64_t value_rank, std::uintptr_t stream);

/// Whether scheme::truncate runs for Codec in Space: everywhere on the host; registry_cuda.cuh says
/// which codecs roll back on the device (backend/cuda/rollback.cuh refuses the others at compile time).
template <class Codec, class Space>
struct rolls_back : std::true_type {};

namespace readback {

/// Moves a pointer into a device allocation to the same offset in its host copy.
struct rebaser {
  const std::byte* device_base = nullptr;
  std::byte* host_base = nullptr;
  template <class P>
  P* operator()(P* pointer) const {
    if (pointer == nullptr) return nullptr;
    return reinterpret_cast<P*>(host_base + (reinterpret_cast<const std::byte*>(pointer) - device_base));
  }
};

/// The codec storage of a device cache, over its host copy: every pointer moved, every
/// count copied. One overload per codec family that runs on backend::cuda.
template <class T>
typename codec::plain<T>::template storage<host_space> storage(
    std::type_identity<codec::plain<T>>, const typename codec::plain<T>::template storage<device_space>& d,
    const rebaser& move) {
  typename codec::plain<T>::template storage<host_space> h;
  h.keys = move(d.keys);
  h.values = move(d.values);
  h.head_dim = d.head_dim;
  h.slots = d.slots;
  h.slot_run = d.slot_run;
  return h;
}
template <int Bits>
typename codec::quantized<Bits>::template storage<host_space> storage(
    std::type_identity<codec::quantized<Bits>>, const typename codec::quantized<Bits>::template storage<device_space>& d,
    const rebaser& move) {
  typename codec::quantized<Bits>::template storage<host_space> h;
  h.key_codes = move(d.key_codes);
  h.value_codes = move(d.value_codes);
  h.key_scales = move(d.key_scales);
  h.key_zeros = move(d.key_zeros);
  h.value_scales = move(d.value_scales);
  h.value_zeros = move(d.value_zeros);
  h.run_sealed = move(d.run_sealed);
  h.residual_keys = move(d.residual_keys);
  h.residual_slots = move(d.residual_slots);
  h.residual_count = move(d.residual_count);
  h.head_dim = d.head_dim;
  h.slots = d.slots;
  h.heads = d.heads;
  h.key_group = d.key_group;
  h.slot_run = d.slot_run;
  h.asymmetric = d.asymmetric;
  return h;
}
inline codec::fp8::storage<host_space> storage(std::type_identity<codec::fp8>,
                                               const codec::fp8::storage<device_space>& d, const rebaser& move) {
  codec::fp8::storage<host_space> h;
  h.key_codes = move(d.key_codes);
  h.value_codes = move(d.value_codes);
  h.key_scales = move(d.key_scales);
  h.value_scales = move(d.value_scales);
  h.head_dim = d.head_dim;
  h.slots = d.slots;
  h.heads = d.heads;
  h.slot_run = d.slot_run;
  h.head_amax = d.head_amax;
  h.initial_key_scale = d.initial_key_scale;
  h.initial_value_scale = d.initial_value_scale;
  return h;
}
inline codec::low_rank::storage<host_space> storage(std::type_identity<codec::low_rank>,
                                                    const codec::low_rank::storage<device_space>& d,
                                                    const rebaser& move) {
  codec::low_rank::storage<host_space> h;
  h.key_coefficients = move(d.key_coefficients);
  h.value_coefficients = move(d.value_coefficients);
  h.key_bases = move(d.key_bases);
  h.value_bases = move(d.value_bases);
  h.key_ranks = move(d.key_ranks);
  h.value_ranks = move(d.value_ranks);
  h.compaction_left = move(d.compaction_left);
  h.pending_counts = move(d.pending_counts);
  h.pending_slots = move(d.pending_slots);
  h.pending_keys = move(d.pending_keys);
  h.pending_values = move(d.pending_values);
  h.head_dim = d.head_dim;
  h.stored_rank = d.stored_rank;
  h.slots = d.slots;
  h.heads = d.heads;
  h.slot_run = d.slot_run;
  h.update_freq = d.update_freq;
  h.fixed_rank = d.fixed_rank;
  h.energy = d.energy;
  h.from_sequence = d.from_sequence;
  h.pre_rope = d.pre_rope;
  h.rope = d.rope;
  return h;
}
template <class Inner>
typename codec::layered<Inner>::template storage<host_space> storage(
    std::type_identity<codec::layered<Inner>>, const typename codec::layered<Inner>::template storage<device_space>& d,
    const rebaser& move) {
  typename codec::layered<Inner>::template storage<host_space> h;
  h.inner = storage(std::type_identity<Inner>{}, d.inner, move);
  h.row_keys = move(d.row_keys);
  h.row_values = move(d.row_values);
  h.row_slots = move(d.row_slots);
  h.slot_rows = move(d.slot_rows);
  h.arrived = move(d.arrived);
  h.head_dim = d.head_dim;
  h.slots = d.slots;
  h.heads = d.heads;
  h.slot_run = d.slot_run;
  h.sinks = d.sinks;
  h.recent = d.recent;
  return h;
}

/// The host view of a device cache's copy: every field of the layout's view, pointers moved
/// into the copy (the contiguous layout's length is host memory already and stays).
template <class Layout, class CodecT>
typename Layout::template view<CodecT, host_space> view(const typename Layout::template view<CodecT, device_space>& d,
                                                        const rebaser& move) {
  typename Layout::template view<CodecT, host_space> h;
  h.storage = storage(std::type_identity<CodecT>{}, d.storage, move);
  h.shape = d.shape;
  h.batch = d.batch;
  h.positions = {move(d.positions.slot_position), move(d.positions.next_position)};
  if constexpr (std::same_as<Layout, layout::contiguous>) {
    h.capacity = d.capacity;
    h.map = d.map;
    h.length = d.length;
  } else if constexpr (std::same_as<Layout, layout::flat>) {
    h.capacity = d.capacity;
    h.offsets = move(d.offsets);
    h.lengths = move(d.lengths);
    h.repacks = move(d.repacks);
    h.compensation = {move(d.compensation.index), move(d.compensation.bias)};
    h.status = move(d.status);
  } else {
    static_assert(std::same_as<Layout, layout::paged>, "kvtrim.Cache read-back: a layout without a host view here");
    h.page_size = d.page_size;
    h.pages = d.pages;
    h.indptr = move(d.indptr);
    h.indices = move(d.indices);
    h.last_page_len = move(d.last_page_len);
    h.free_pages = move(d.free_pages);
    h.free_count = move(d.free_count);
    h.compensation = {move(d.compensation.index), move(d.compensation.bias)};
    h.status = move(d.status);
  }
  return h;
}

}  // namespace readback

template <class Scheme, class InputT>
class typed_cache final : public cache_base {
 public:
  using space = typename Scheme::space;
  using backend_type = typename Scheme::backend;
  using codec_type = typename Scheme::codec;
  using layout_type = typename Scheme::layout;
  using scorer_type = typename Scheme::scorer;
  static constexpr bool on_host = std::same_as<space, host_space>;
  static constexpr bool external_scores = std::same_as<scorer_type, score::external>;
  static constexpr bool low_rank_codec = std::same_as<codec_type, codec::low_rank>;
  static constexpr bool has_status_words = !on_host && requires(const typename Scheme::cache& c) { c.view().status; };
  using host_view = typename layout_type::template view<codec_type, host_space>;

  typed_cache(const settings& s, const model_shape& shape, std::int64_t batch, std::int64_t capacity)
      : config_(validated(convert::config<Scheme>(s))),
        codec_config_(convert::codec(std::type_identity<codec_type>{}, s)),
        cache_(Scheme::make_cache(shape, batch, convert::room<layout_type>(s, capacity), codec_config_)),
        check_each_call_(convert::pick<bool>("check", s.check, {{"sync", true}, {"deferred", false}})) {
    // LowRank(source="sequence") on CUDA: bases fitted on the device (low_rank_fit.cuh); its update_freq
    // limit (≤ 32) is checked by the first compress, before anything is written.
  }

  void compress(const array& keys, const array& values, const array* window_queries, const array* scores,
                const array* lse, const std::vector<std::int64_t>* lengths, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.compress";
    if (lengths != nullptr && static_cast<std::int64_t>(lengths->size()) != batch())
      detail::fail(function, "lengths", detail::cat(batch(), " prompt lengths (one per sequence)"),
                   detail::cat(lengths->size(), " lengths"));
    const auto k = as_view<4>(function, "keys", keys);
    const auto v = as_view<4>(function, "values", values);
    tensor_view<const InputT, 4, space> q{};
    if constexpr (scorer_type::needs_queries) {
      if (window_queries == nullptr)
        detail::fail(function, "window_queries",
                     detail::cat("the last prefill queries [", batch(), ", ", shape().q_heads, ", w, ", shape().head_dim,
                                 "] (", policy_name<scorer_type>::value, " scores with them)"),
                     "None");
      q = as_view<4>(function, "window_queries", *window_queries);
    }
    typename Scheme::config cfg = config_;
    if constexpr (external_scores) {
      if (scores == nullptr)
        detail::fail(function, "scores",
                     detail::cat("the caller's scores [", batch(), ", ", shape().kv_heads, ", tokens] (ExternalScores)"),
                     "None");
      cfg.score = score::external::config::from(as_view<3, float>(function, "scores", *scores));
    }
    if (lse != nullptr) {
      if constexpr (requires { cfg.score.with_lse(as_view<3, float>(function, "lse", *lse)); })
        cfg.score = cfg.score.with_lse(as_view<3, float>(function, "lse", *lse));
      else
        detail::fail(function, "lse",
                     "None: only SnapKV and H2O take the prefill's softmax normalisers",
                     detail::cat("normalisers for ", policy_name<scorer_type>::value));
    }
    require_device_bases("kvtrim::scheme::compress");
    const std::int64_t tokens = keys.extents[2];
    const std::size_t bytes = Scheme::compress_workspace(cache_.view().shape, cache_.view().batch, tokens, cfg);
    run_compress(k, v, q, cfg, compress_scratch_.get(bytes), stream, lengths != nullptr ? lengths->data() : nullptr);
  }

  void append(const array& keys, const array& values, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.append";
    require_device_bases("kvtrim::scheme::append");
    Scheme::append(cache_.view(), as_view<4>(function, "keys", keys), as_view<4>(function, "values", values),
                   to_stream(stream));
    stream_ = stream;
    if (check_each_call_) check_status();
  }

  void attend(const array& queries, const array& out, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.attend";
    if (queries.rank == 3) {
      const auto q = as_view<3>(function, "queries", queries);
      const auto o = as_mutable_view<3>(function, "out", out);
      const workspace scratch = attend_scratch_.get(Scheme::attend_workspace(cache_.view()));
      Scheme::attend(q, cache_.view(), o, scratch, to_stream(stream));
      stream_ = stream;
      return;
    }
    // [B, Hq, L, D] (the layout of compress's window_queries, and of an HF attention layer's
    // queries): L new tokens per sequence, checked here in that order; the scheme reads the same
    // elements as [B, L, Hq, D] (axes 1 and 2 swapped through the strides, no copy).
    const model_shape s = shape();
    const std::int64_t rows = queries.extents[2];
    if (queries.rank != 4 || queries.extents[0] != batch() || queries.extents[1] != s.q_heads ||
        queries.extents[3] != s.head_dim || rows < 1 || rows > Scheme::max_queries_per_sequence)
      detail::fail(function, "queries",
                   detail::cat("[", batch(), ", ", s.q_heads, ", ", s.head_dim, "] (one new token per sequence) or [",
                               batch(), ", ", s.q_heads, ", L, ", s.head_dim, "] with L = 1 to ",
                               Scheme::max_queries_per_sequence, " new tokens per sequence, already appended"),
                   queries.describe());
    if (out.rank != 4 || out.extents != queries.extents)
      detail::fail(function, "out", detail::cat("an array of the queries' shape [", batch(), ", ", s.q_heads, ", ", rows,
                                                ", ", s.head_dim, "]"),
                   out.describe());
    const auto q = tokens_major(as_view<4>(function, "queries", queries));
    const auto o = tokens_major(as_mutable_view<4>(function, "out", out));
    const workspace scratch = attend_scratch_.get(Scheme::attend_workspace(cache_.view(), rows));
    Scheme::attend(q, cache_.view(), o, scratch, to_stream(stream));
    stream_ = stream;
  }

  void truncate(const array& drop, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.truncate";
    if constexpr (!truncatable) {
      (void)drop, (void)stream;
      detail::fail(function, "cache",
                   "a scheme whose codec rolls back on its device (backend::cuda: FP16, BF16, FP32, KIVI, FP8; "
                   "Layered and LowRank roll back on the CPU)",
                   name());
    } else {
      const std::int64_t sequences = batch();
      if (drop.rank != 1 || drop.type != element_type::i32 || drop.extents[0] != sequences)
        detail::fail(function, "drop", detail::cat("an int32 array [", sequences, "] (one count per sequence)"),
                     drop.describe());
      if (drop.on_device && on_host)
        detail::fail(function, "drop", detail::cat("an int32 array [", sequences, "] on the cpu"), drop.describe());
      tensor_view<const std::int32_t, 1, space> counts{static_cast<const std::int32_t*>(drop.data), {sequences},
                                                       {drop.strides[0]}};
      if constexpr (!on_host) {
        if (!drop.on_device) {  // host counts for a device cache: one small copy on the cache's stream
          std::vector<std::int32_t> host(static_cast<std::size_t>(sequences));
          for (std::int64_t b = 0; b < sequences; ++b)
            host[static_cast<std::size_t>(b)] = static_cast<const std::int32_t*>(drop.data)[b * drop.strides[0]];
          const workspace staged = truncate_scratch_.get(host.size() * sizeof(std::int32_t));
          copy_to_device(staged.data, host.data(), host.size() * sizeof(std::int32_t), stream);
          counts = {static_cast<const std::int32_t*>(staged.data), {sequences}, {1}};
        }
      }
      Scheme::truncate(cache_.view(), counts, to_stream(stream));
      stream_ = stream;
      if (check_each_call_) check_status();
    }
  }

  /// The storage of a LowRank(source="profile") cache (low_rank codecs only), else a kvtrim error naming `function`.
  const auto& profile_storage(std::string_view function) const {
    const auto& store = cache_.view().storage;
    if (store.from_sequence)
      detail::fail(function, "cache",
                   "a cache with codec LowRank(source=\"profile\") (sequence bases are fitted at every compress)",
                   "LowRank(source=\"sequence\")");
    return store;
  }

  void set_basis(const array& key_bases, const array& value_bases, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.set_basis";
    if constexpr (!low_rank_codec) {
      (void)key_bases, (void)value_bases, (void)stream;
      detail::fail(function, "cache", "a cache with codec LowRank(source=\"profile\")", name());
    } else {
      const auto& store = profile_storage(function);
      const model_shape s = shape();
      // Every basis is checked before the first is installed, so a refused call leaves the cache as it was.
      const auto gather = [&](std::string_view argument, const array& given) {
        if (given.rank != 3 || given.type != element_type::f32 || given.on_device || given.extents[0] != s.kv_heads ||
            given.extents[1] != s.head_dim || given.extents[2] < 1 || given.extents[2] > store.stored_rank)
          detail::fail(function, argument,
                       detail::cat("a float32 array [", s.kv_heads, ", ", s.head_dim, ", rank] on the cpu with rank 1 to ",
                                   store.stored_rank, " (the stored rank): one basis per kv head"),
                       given.describe());
        const std::int64_t rank = given.extents[2];
        std::vector<float> rows(static_cast<std::size_t>(s.kv_heads * s.head_dim * rank));
        const auto* data = static_cast<const float*>(given.data);
        for (std::int64_t h = 0; h < s.kv_heads; ++h)
          for (std::int64_t d = 0; d < s.head_dim; ++d)
            for (std::int64_t j = 0; j < rank; ++j)
              rows[static_cast<std::size_t>((h * s.head_dim + d) * rank + j)] =
                  data[h * given.strides[0] + d * given.strides[1] + j * given.strides[2]];
        for (std::int64_t h = 0; h < s.kv_heads; ++h) {
          const std::optional<double> deviation = basis_deviation(rows.data() + h * s.head_dim * rank, s.head_dim, rank);
          if (!deviation)
            detail::fail(function, argument, "finite entries", detail::cat("NaN or Inf in kv head ", h, "'s basis"));
          if (*deviation > 1e-3)
            detail::fail(function, argument, "orthonormal columns in every kv head's basis (|UᵀU − I| ≤ 1e-3)",
                         detail::cat("|UᵀU − I| = ", *deviation, " in kv head ", h));
        }
        return std::pair{std::move(rows), rank};
      };
      const auto [keys, key_rank] = gather("key_bases", key_bases);
      const auto [values, value_rank] = gather("value_bases", value_bases);
      std::vector<head_bases> heads(static_cast<std::size_t>(s.kv_heads));
      const auto per_head = static_cast<std::size_t>(s.head_dim);
      for (std::int64_t h = 0; h < s.kv_heads; ++h)
        heads[static_cast<std::size_t>(h)] = {keys.data() + h * s.head_dim * key_rank, key_rank,
                                              per_head * static_cast<std::size_t>(key_rank),
                                              values.data() + h * s.head_dim * value_rank, value_rank,
                                              per_head * static_cast<std::size_t>(value_rank)};
      install_bases(heads, stream);
    }
  }

  void load_low_rank_profile(const profile_layer& profile, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.load_low_rank_profile";
    if constexpr (!low_rank_codec) {
      (void)profile, (void)stream;
      detail::fail(function, "cache", "a cache with codec LowRank(source=\"profile\")", name());
    } else {
      const auto& store = profile_storage(function);
      // io::load_profile's checks, in its words, every one before the first basis is installed (a refused call
      // leaves the cache as it was), here for the device caches io::load_profile cannot take.
      if (profile.layer < 0 || profile.layer >= profile.layers)
        detail::fail(function, "layer", detail::cat("a layer of the profile in [0, ", profile.layers, ")"),
                     std::to_string(profile.layer));
      const model_shape s = shape();
      if (profile.head_dim != s.head_dim)
        detail::fail(function, "profile.head_dim", detail::cat("the cache's head_dim = ", s.head_dim),
                     std::to_string(profile.head_dim));
      if (profile.kv_heads != s.kv_heads || static_cast<std::int64_t>(profile.heads.size()) != s.kv_heads)
        detail::fail(function, "profile.kv_heads", detail::cat("the cache's kv_heads = ", s.kv_heads),
                     std::to_string(profile.kv_heads));
      if (profile.pre_rope != store.pre_rope)
        detail::fail(function, "profile.keys",
                     store.pre_rope ? "pre_rope bases (the cache's codec is LowRank(pre_rope=True))"
                                    : "post_rope bases (the cache's codec is LowRank(pre_rope=False))",
                     profile.pre_rope ? "pre_rope" : "post_rope");
      for (std::int64_t h = 0; h < s.kv_heads; ++h) {
        const head_bases& head = profile.heads[static_cast<std::size_t>(h)];
        const auto check = [&](std::string_view which, const float* basis, std::int64_t rank, std::size_t entries) {
          const std::string argument =
              detail::cat("profile.bases[layer ", profile.layer, ", kv_head ", h, "].", which, "_basis");
          if (rank < 1 || rank > store.stored_rank || basis == nullptr ||
              entries != static_cast<std::size_t>(s.head_dim * rank))
            detail::fail(function, argument,
                         detail::cat("a basis of rank 1 to ", store.stored_rank,
                                     " (the cache's stored rank: LowRank's rank, else max_rank, else head_dim / 2) with ",
                                     s.head_dim, " × rank entries"),
                         rank == 0 ? std::string("rank 0 (no basis: the layer was not calibrated)")
                                   : detail::cat("rank ", rank, " with ", entries, " entries"));
          const std::optional<double> deviation = basis_deviation(basis, s.head_dim, rank);
          if (!deviation) detail::fail(function, argument, "finite entries", "NaN or Inf");
          if (*deviation > 1e-3)
            detail::fail(function, argument, "orthonormal columns (|UᵀU − I| ≤ 1e-3)",
                         detail::cat("|UᵀU − I| = ", *deviation));
        };
        check("key", head.key_basis, head.key_rank, head.key_entries);
        check("value", head.value_basis, head.value_rank, head.value_entries);
      }
      install_bases(profile.heads, stream);
    }
  }

  low_rank_head low_rank(std::int64_t b, std::int64_t h) const override {
    constexpr std::string_view function = "kvtrim.Cache.low_rank";
    if constexpr (!low_rank_codec) {
      (void)b, (void)h;
      detail::fail(function, "cache", "a cache with codec LowRank", name());
    } else {
      check_head(function, b, h);
      check_status();
      return inspect([b, h](const auto& view) {
        const auto& store = view.storage;
        const std::int64_t head = b * view.shape.kv_heads + h, dim = store.head_dim, stored = store.stored_rank;
        low_rank_head result;
        result.head_dim = dim;
        result.key_rank = store.key_ranks[head];
        result.value_rank = store.value_ranks[head];
        const auto basis = [&](const float* bases, std::int64_t rank) {
          std::vector<float> out(static_cast<std::size_t>(dim * rank));
          for (std::int64_t d = 0; d < dim; ++d)
            for (std::int64_t j = 0; j < rank; ++j)
              out[static_cast<std::size_t>(d * rank + j)] = bases[(head * dim + d) * stored + j];
          return out;
        };
        result.key_basis = basis(store.key_bases, result.key_rank);
        result.value_basis = basis(store.value_bases, result.value_rank);
        const std::int64_t n = view.head_length(b, h);
        result.tokens = n;
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t slot = view.slot(b, h, i);
          for (std::int64_t j = 0; j < result.key_rank; ++j)
            result.key_coefficients.push_back(static_cast<float>(store.key_coefficients[slot * stored + j]));
          for (std::int64_t j = 0; j < result.value_rank; ++j)
            result.value_coefficients.push_back(static_cast<float>(store.value_coefficients[slot * stored + j]));
        }
        return result;
      });
    }
  }

  double attend_seconds_from_cxx(const array& queries, const array& out, std::uintptr_t stream,
                                 std::int64_t calls) override {
    constexpr std::string_view function = "kvtrim.Cache._attend_seconds_from_cxx";
    const auto q = as_view<3>(function, "queries", queries);
    const auto o = as_mutable_view<3>(function, "out", out);
    const workspace scratch = attend_scratch_.get(Scheme::attend_workspace(cache_.view()));
    Scheme::attend(q, cache_.view(), o, scratch, to_stream(stream));  // warm: first-call costs are not the steady state
    const auto start = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < calls; ++i) Scheme::attend(q, cache_.view(), o, scratch, to_stream(stream));
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    stream_ = stream;
    return elapsed.count() / static_cast<double>(std::max<std::int64_t>(calls, 1));
  }

  std::vector<std::int64_t> head_lengths() const override {
    check_status();
    return inspect([](const auto& view) {
      std::vector<std::int64_t> lengths;
      for (std::int64_t b = 0; b < view.batch; ++b)
        for (std::int64_t h = 0; h < view.shape.kv_heads; ++h) lengths.push_back(view.head_length(b, h));
      return lengths;
    });
  }

  /// The selection of the last compress (CSR over flattened heads), from
  /// compress's kept-index output (docs/composition.md §5); see run_compress.
  kept_indices kept() const override {
    check_status();
    if constexpr (!on_host) {
      if (kept_.offsets.empty() && kept_on_device_) {
        // Read back once: offsets first (they say how many tokens follow).
        const auto heads = static_cast<std::size_t>(cache_.view().heads());
        kept_.offsets.resize(heads + 1);
        const auto* device_offsets = static_cast<const std::int64_t*>(kept_scratch_[kept_active_].data());
        copy_to_host(kept_.offsets.data(), device_offsets, kept_.offsets.size() * sizeof(std::int64_t), stream_);
        kept_.tokens.resize(static_cast<std::size_t>(kept_.offsets.back()));
        copy_to_host(kept_.tokens.data(), kept_tokens_on_device(), kept_.tokens.size() * sizeof(std::int32_t),
                     stream_);
      }
    }
    if (!kept_.offsets.empty()) return kept_;
    detail::fail("kvtrim.Cache.kept", "cache", "a cache that was compressed", "no compress yet");
  }

  /// Each held token's position in its sequence, per flattened head (CSR like kept()).
  std::vector<std::int32_t> positions() const override {
    check_status();
    return inspect([](const auto& view) {
      std::vector<std::int32_t> result;
      for (std::int64_t b = 0; b < view.batch; ++b)
        for (std::int64_t h = 0; h < view.shape.kv_heads; ++h) {
          const std::vector<std::int32_t> head = kvtrim::head_positions(view, b, h);
          result.insert(result.end(), head.begin(), head.end());
        }
      return result;
    });
  }

  stats_result stats() const override {
    check_status();
    stats_result result = inspect([this](const auto& view) {
      stats_result r;
      const cache_stats s = kvtrim::stats(view, codec_config_);
      r.codec = s.codec;
      r.head_dim = s.head_dim;
      r.bytes_per_token = s.bytes_per_token;
      r.bytes_per_head = s.bytes_per_head;
      for (const auto& head : s.heads) {
        r.kept.push_back(head.kept);
        r.bytes.push_back(head.bytes);
      }
      r.total_bytes = s.bytes();
      r.fp16_bytes = s.fp16_bytes();
      r.ratio = s.kept() > 0 ? s.ratio() : 0.0;
      r.table = s.table();
      return r;
    });
    result.allocated_bytes = cache_.bytes();
    return result;
  }

  std::pair<std::vector<float>, std::vector<float>> read_head(std::int64_t b, std::int64_t h) const override {
    check_head("kvtrim.Cache.read", b, h);
    check_status();
    return inspect([b, h](const auto& view) {
      const std::int64_t n = view.head_length(b, h), dim = view.shape.head_dim;
      std::vector<float> keys(static_cast<std::size_t>(n * dim)), values(keys.size());
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t slot = view.slot(b, h, i);
        codec_type::load_key(view.storage, b * view.shape.kv_heads + h, slot, view.positions.slot_position[slot],
                             keys.data() + i * dim);
        codec_type::load_value(view.storage, b * view.shape.kv_heads + h, slot, values.data() + i * dim);
      }
      return std::pair{std::move(keys), std::move(values)};
    });
  }

  /// The owned cache and its view, for the bindings that work on several layers' caches at once
  /// (eviction.cpp: kvtrim::evict over every layer of a model) and find this type by dynamic_cast.
  using scheme_type = Scheme;
  typename Scheme::cache& owned() { return cache_; }
  /// The scheme's config as compress uses it (eviction.cpp seeds the metric with the scorer's window).
  const typename Scheme::config& scheme_config() const { return config_; }
  /// The last compress's selection in the device memory compress wrote it to (eviction_cuda.cu
  /// seeds the metric from it on the device, without a read-back).
  selection_view<space> kept_on_device() const
    requires(!on_host)
  {
    if (!kept_on_device_)
      detail::fail("kvtrim.Eviction.seed", "cache", "a cache that was compressed", "no compress yet");
    return {static_cast<const std::int64_t*>(kept_scratch_[kept_active_].data()), kept_tokens_on_device(),
            cache_.view().heads()};
  }
  /// The prompt lengths (host) the last compress took, a right-padded batch's; null without.
  /// Kept on both backends, so the eviction seed reads each sequence's own window (on a device
  /// without a read-back: eviction_cuda.cu passes them to the device seed_metric).
  const std::int64_t* sequence_lengths() const {
    return kept_.sequence_lengths.empty() ? nullptr : kept_.sequence_lengths.data();
  }
  /// Scratch for the eviction binding's device calls on this cache (kept between calls: a
  /// cudaMalloc per decode step would synchronise the device).
  scratch_buffer<backend_type>& eviction_scratch() { return eviction_scratch_; }
  /// Records that a call outside this class (the eviction binding) used the cache on `stream`,
  /// so that read-back waits for it.
  void used_on(std::uintptr_t stream) { stream_ = stream; }

  /// Device paged and flat caches record what they refuse in status words instead of throwing
  /// (layout/detail/status.hpp): a refused call wrote nothing, so the cache is as it was. With
  /// check "sync" every compress and append checks them before returning — a refusal then
  /// throws from the call that made it, exactly as on the CPU, for one stream synchronisation
  /// per call (a D2H copy of 88 bytes and the wait for the stream's work). With "deferred"
  /// nothing synchronises on the hot path (CUDA graphs, an engine's decode loop): the first
  /// refusal since the last check throws from check_status() or from the next inspection call
  /// (which synchronise anyway), and every call after the refused one ran on the cache as the
  /// refused call left it (unchanged) — but kept() then describes the last compress called,
  /// refused or not (which call was refused is not known without a synchronisation per call).
  void check_status() const override {
    if constexpr (has_status_words) check_device_status(cache_.view().status, stream_);
  }

  std::size_t bytes() const override { return cache_.bytes(); }
  model_shape shape() const override { return cache_.view().shape; }
  std::int64_t batch() const override { return cache_.view().batch; }
  element_type input_type() const override { return element_of<InputT>; }
  bool needs_queries() const override { return scorer_type::needs_queries; }
  bool needs_scores() const override { return external_scores; }
  std::string name() const override {
    return detail::cat("scheme<layout::", policy_name<layout_type>::value, ", score::", policy_name<scorer_type>::value,
                       ", budget::", policy_name<typename Scheme::budget>::value, ", codec::",
                       policy_name<codec_type>::value, ", backend::", on_host ? "cpu" : "cuda", ">");
  }

 private:
  using stream_type = typename Scheme::stream_type;

  /// `inspect(view)` over a host view of the cache: the cache's own view on the
  /// host; on a device, a view over a host copy of the cache's whole allocation
  /// (tokens and metadata), copied on the stream of the last call that used the
  /// cache, after which that stream is synchronised — so the same host code reads
  /// a CPU and a CUDA cache and the results are comparable bit for bit.
  template <class Inspect>
  auto inspect(Inspect&& inspect_view) const {
    if constexpr (on_host) {
      return inspect_view(cache_.view());
    } else {
      std::vector<std::byte> copy(cache_.bytes());
      copy_to_host(copy.data(), cache_.data(), copy.size(), stream_);
      const readback::rebaser move{static_cast<const std::byte*>(cache_.data()), copy.data()};
      const host_view view = readback::view<layout_type, codec_type>(cache_.view(), move);
      return inspect_view(view);
    }
  }

  /// Installs kv head h's bases (checked by the caller) into head (b, h) of every sequence b: codec::low_rank's
  /// set_basis on the host (io::load_profile's per-head call), cuda_detail::set_low_rank_basis on a device.
  void install_bases(const std::vector<head_bases>& heads, std::uintptr_t stream)
    requires low_rank_codec
  {
    const auto& store = cache_.view().storage;
    const std::int64_t kv_heads = shape().kv_heads;
    for (std::int64_t b = 0; b < batch(); ++b)
      for (std::int64_t h = 0; h < kv_heads; ++h) {
        const head_bases& head = heads[static_cast<std::size_t>(h)];
        if constexpr (on_host)
          codec::low_rank::set_basis<host_space>(store, b * kv_heads + h, head.key_basis, head.key_rank,
                                                 head.value_basis, head.value_rank);
        else
          set_device_low_rank_basis(store, b * kv_heads + h, head.key_basis, head.key_rank, head.value_basis,
                                    head.value_rank, stream);
      }
    bases_installed_ = true;
    stream_ = stream;
  }

  /// A device low-rank cache with profile bases encodes a head without a basis as zeros (codec_low_rank.cuh:
  /// a kernel cannot throw); the CPU's check_storage refuses it. The binding knows whether set_basis ran, so
  /// a device cache refuses too, with the CPU's words, before anything is written.
  void require_device_bases(std::string_view function) const {
    if constexpr (low_rank_codec && !on_host)
      if (!bases_installed_ && !cache_.view().storage.from_sequence)  // sequence bases: fitted by compress
        detail::fail(function, "cache.storage",
                     "a basis for every head (basis_source::profile: call set_basis or load the profile's bases "
                     "first)",
                     "none for head 0");
  }

  void check_head(std::string_view function, std::int64_t b, std::int64_t h) const {
    if (b < 0 || b >= batch())
      detail::fail(function, "b", detail::cat("a sequence in [0, ", batch(), ")"), std::to_string(b));
    if (h < 0 || h >= shape().kv_heads)
      detail::fail(function, "h", detail::cat("a kv head in [0, ", shape().kv_heads, ")"), std::to_string(h));
  }

  /// scheme::truncate compiles for this scheme (and, on a device, its codec rolls back there).
  static constexpr bool truncatable =
      rolls_back<codec_type, space>::value &&
      requires(typename Scheme::cache_view& c, tensor_view<const std::int32_t, 1, space> d) { Scheme::truncate(c, d); };

  /// [B, Hq, L, D] seen as the scheme's [B, L, Hq, D] (axes 1 and 2 swapped; the same elements).
  template <class Element>
  static tensor_view<Element, 4, space> tokens_major(const tensor_view<Element, 4, space>& v) {
    return {v.data, {v.extents[0], v.extents[2], v.extents[1], v.extents[3]},
            {v.strides[0], v.strides[2], v.strides[1], v.strides[3]}};
  }

  const std::int32_t* kept_tokens_on_device() const {
    const std::size_t heads = static_cast<std::size_t>(cache_.view().heads());
    return reinterpret_cast<const std::int32_t*>(static_cast<const std::byte*>(kept_scratch_[kept_active_].data()) +
                                                 kept_offsets_bytes(heads));
  }
  static std::size_t kept_offsets_bytes(std::size_t heads) {
    return (sizeof(std::int64_t) * (heads + 1) + 255) / 256 * 256;
  }

  /// THE one call of Scheme::compress, with compress's kept-index output
  /// (docs/composition.md §5) in the backend's memory: on the host it is kept_
  /// at once; on a device it stays there until kept() reads it back. A device
  /// compress writes its selection into the kept buffer kept() is not reading
  /// (two of them), so a compress refused on the device (check "sync") leaves
  /// kept() as it was, as a CPU compress that throws does.
  void run_compress(tensor_view<const InputT, 4, space> k, tensor_view<const InputT, 4, space> v,
                    tensor_view<const InputT, 4, space> q, const typename Scheme::config& cfg, workspace scratch,
                    std::uintptr_t stream, const std::int64_t* lengths = nullptr) {
    compress_options<space> options;
    options.sequence_lengths = lengths;
    const auto& view = cache_.view();
    const auto heads = static_cast<std::size_t>(view.batch * view.shape.kv_heads);
    const std::int64_t capacity = Scheme::kept_tokens_capacity(view.shape, view.batch, k.extent(2), cfg);
    std::vector<std::int64_t> offsets;
    std::vector<std::int32_t> tokens;
    if constexpr (on_host) {
      offsets.resize(heads + 1);
      tokens.resize(static_cast<std::size_t>(capacity));
      options.kept_offsets = offsets.data();
      options.kept_tokens = tokens.data();
    } else {
      const std::size_t kept_bytes = kept_offsets_bytes(heads) + sizeof(std::int32_t) * static_cast<std::size_t>(capacity);
      const workspace buffer = kept_scratch_[1 - kept_active_].get(kept_bytes);
      options.kept_offsets = static_cast<std::int64_t*>(buffer.data);
      options.kept_tokens = reinterpret_cast<std::int32_t*>(static_cast<std::byte*>(buffer.data) + kept_offsets_bytes(heads));
    }
    options.kept_tokens_capacity = capacity;
    if constexpr (scorer_type::needs_queries)
      Scheme::compress(k, v, q, cache_.view(), cfg, options, scratch, to_stream(stream));
    else
      Scheme::compress(k, v, cache_.view(), cfg, options, scratch, to_stream(stream));
    stream_ = stream;
    if (check_each_call_) check_status();  // throws before the selection below is taken
    kept_ = {};
    if (lengths != nullptr) kept_.sequence_lengths.assign(lengths, lengths + view.batch);
    if constexpr (on_host) {
      tokens.resize(static_cast<std::size_t>(offsets.back()));
      kept_.offsets = std::move(offsets);
      kept_.tokens = std::move(tokens);
    } else {
      kept_active_ = 1 - kept_active_;
      kept_on_device_ = true;
    }
  }

  static stream_type to_stream(std::uintptr_t stream) {
    if constexpr (std::is_pointer_v<stream_type>)
      return reinterpret_cast<stream_type>(stream);
    else
      return stream_type{};
  }

  static typename Scheme::config validated(typename Scheme::config cfg) {
    cfg.validate("kvtrim.Cache");
    return cfg;
  }

  template <std::size_t Rank, class Element = InputT>
  static tensor_view<const Element, Rank, space> as_view(std::string_view function, std::string_view argument,
                                                         const array& given) {
    return array_view<Rank, const Element, space>(function, argument, given);
  }
  template <std::size_t Rank>
  static tensor_view<InputT, Rank, space> as_mutable_view(std::string_view function, std::string_view argument,
                                                          const array& given) {
    const auto view = as_view<Rank>(function, argument, given);
    return {const_cast<InputT*>(view.data), view.extents, view.strides};
  }

  typename Scheme::config config_;
  typename codec_type::config codec_config_;
  typename Scheme::cache cache_;
  scratch_buffer<backend_type> compress_scratch_;
  scratch_buffer<backend_type> attend_scratch_;
  scratch_buffer<backend_type> eviction_scratch_;
  scratch_buffer<backend_type> truncate_scratch_;  // device caches: host drop counts copied here
  scratch_buffer<backend_type> kept_scratch_[2];  // device caches: compress's kept-index output (run_compress)
  int kept_active_ = 0;                           // the buffer of the last compress that was taken
  mutable kept_indices kept_;                     // read back lazily on a device
  bool kept_on_device_ = false;
  bool check_each_call_ = true;                   // settings::check: "sync"
  bool bases_installed_ = false;                  // low-rank device caches: set_basis ran
  std::uintptr_t stream_ = 0;  // the stream of the last call that used the cache (read-back waits for it)
};

template <class Scheme, class InputT>
std::unique_ptr<cache_base> make_typed_cache(const settings& s, const model_shape& shape, std::int64_t batch,
                                             std::int64_t capacity) {
  return std::make_unique<typed_cache<Scheme, InputT>>(s, shape, batch, capacity);
}

template <class Scheme, class InputT>
void add(registry& into, std::string_view device) {
  into[scheme_key{std::string(device), std::string(policy_name<typename Scheme::layout>::value),
                  std::string(policy_name<typename Scheme::scorer>::value),
                  std::string(policy_name<typename Scheme::budget>::value),
                  std::string(policy_name<typename Scheme::codec>::value)}] = &make_typed_cache<Scheme, InputT>;
}

}  // namespace kvtrim::python
