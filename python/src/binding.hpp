// python/src/binding.hpp — the type-erased cache behind kvtrim's Python package.
//
// Python chooses a scheme at run time; C++ needs it at compile time. Between
// them sits this header: a `settings` struct (every runtime knob the Python
// presses and codecs can set), `cache_base` (one virtual interface over every
// compiled scheme), and `typed_cache<Scheme, InputT>` (the one implementation
// of that interface, written once against kvtrim::scheme). Which schemes exist
// is decided by the instantiation lists in registry_cpu.cpp and
// registry_cuda.cu, nowhere else.
//
// This header includes no nanobind (registry_cuda.cu includes it under nvcc);
// arrays arrive as `array`, a plain description of an already type-checked
// DLPack tensor (module.cpp makes them from nanobind ndarrays).
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <compare>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
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
  std::string scorer = "static_window";  // static_window | snapkv | h2o | key_norm | retrieval_head
  std::string budget = "uniform";      // uniform | adaptive | pyramid | by_scorer
  std::string codec = "fp16";          // fp16 | bf16 | fp32 | int8

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
  // codec::int8 (KIVI)
  std::int64_t key_group = 32;
  bool asymmetric = true;
  // layout::paged
  std::int64_t page_size = layout::paged::default_page_size;
};

// ---- arrays ----------------------------------------------------------------------

enum class element_type { f32, f16, bf16 };

inline std::string_view name_of(element_type type) {
  switch (type) {
    case element_type::f32: return "float32";
    case element_type::f16: return "float16";
    case element_type::bf16: return "bfloat16";
  }
  return "?";
}

template <class T>
inline constexpr element_type element_of = std::same_as<T, float>  ? element_type::f32
                                           : std::same_as<T, half> ? element_type::f16
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

/// Thrown where the C++ side does not offer something yet; module.cpp turns it into NotImplementedError.
struct not_implemented : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- what Python sees of a cache -------------------------------------------------

struct kept_indices {
  std::vector<std::int64_t> offsets;  // [B·H + 1]
  std::vector<std::int32_t> tokens;   // ascending per head
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

class cache_base {
 public:
  virtual ~cache_base() = default;
  virtual void compress(const array& keys, const array& values, const array* window_queries,
                        std::uintptr_t stream) = 0;
  virtual void append(const array& keys, const array& values, std::uintptr_t stream) = 0;
  virtual void attend(const array& queries, const array& out, std::uintptr_t stream) = 0;
  /// Host seconds per Scheme::attend call over `calls` calls made from C++ with the
  /// views converted once: the bare C++ cost that bench/python_overhead.py subtracts
  /// from the Python call's (issue 14's ≤ 20 µs). No synchronisation, like the
  /// Python side's timing: on a GPU it is launch time (or kernel time once the
  /// launch queue is full, equally for both).
  virtual double attend_seconds_from_cxx(const array& queries, const array& out, std::uintptr_t stream,
                                         std::int64_t calls) = 0;
  virtual std::vector<std::int64_t> head_lengths() const = 0;
  virtual kept_indices kept() const = 0;
  virtual std::vector<std::int32_t> positions() const = 0;
  virtual stats_result stats() const = 0;
  /// The dequantized keys and values [n, D] the head (b, h) holds, as float32 (host caches).
  virtual std::pair<std::vector<float>, std::vector<float>> read_head(std::int64_t b, std::int64_t h) const = 0;
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
void register_cuda_schemes(registry& into);  // registry_cuda.cu (only when CUDA was found at build time)

// ---- policy names (the registry's keys) -------------------------------------------

template <class P>
struct policy_name;
template <> struct policy_name<score::static_window> { static constexpr std::string_view value = "static_window"; };
template <> struct policy_name<score::snapkv> { static constexpr std::string_view value = "snapkv"; };
template <> struct policy_name<score::h2o> { static constexpr std::string_view value = "h2o"; };
template <> struct policy_name<score::key_norm> { static constexpr std::string_view value = "key_norm"; };
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
inline codec::int8::config codec(std::type_identity<codec::int8>, const settings& s) {
  codec::int8::config cfg;
  cfg.keys = codec::key_scaling::per_channel_group;
  cfg.key_group = s.key_group;
  cfg.asymmetric = s.asymmetric;
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

/// Reads device memory into host memory (defined by the CUDA translation unit; host caches never call it).
void copy_to_host(void* host, const void* device, std::size_t bytes);

template <class Scheme, class InputT>
class typed_cache final : public cache_base {
 public:
  using space = typename Scheme::space;
  using backend_type = typename Scheme::backend;
  using codec_type = typename Scheme::codec;
  using layout_type = typename Scheme::layout;
  using scorer_type = typename Scheme::scorer;
  static constexpr bool on_host = std::same_as<space, host_space>;

  typed_cache(const settings& s, const model_shape& shape, std::int64_t batch, std::int64_t capacity)
      : config_(validated(convert::config<Scheme>(s))),
        codec_config_(convert::codec(std::type_identity<codec_type>{}, s)),
        cache_(Scheme::make_cache(shape, batch, convert::room<layout_type>(s, capacity), codec_config_)) {}

  void compress(const array& keys, const array& values, const array* window_queries, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.compress";
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
    const std::int64_t tokens = keys.extents[2];
    const std::size_t bytes = Scheme::compress_workspace(cache_.view().shape, cache_.view().batch, tokens, config_);
    run_compress(k, v, q, compress_scratch_.get(bytes), to_stream(stream));
  }

  void append(const array& keys, const array& values, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.append";
    Scheme::append(cache_.view(), as_view<4>(function, "keys", keys), as_view<4>(function, "values", values),
                   to_stream(stream));
  }

  void attend(const array& queries, const array& out, std::uintptr_t stream) override {
    constexpr std::string_view function = "kvtrim.Cache.attend";
    const auto q = as_view<3>(function, "queries", queries);
    const auto o = as_mutable_view<3>(function, "out", out);
    const workspace scratch = attend_scratch_.get(Scheme::attend_workspace(cache_.view()));
    Scheme::attend(q, cache_.view(), o, scratch, to_stream(stream));
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
    return elapsed.count() / static_cast<double>(std::max<std::int64_t>(calls, 1));
  }

  std::vector<std::int64_t> head_lengths() const override {
    std::vector<std::int64_t> lengths;
    if constexpr (on_host || !layout_type::ragged_heads) {
      const auto& view = cache_.view();
      for (std::int64_t b = 0; b < view.batch; ++b)
        for (std::int64_t h = 0; h < view.shape.kv_heads; ++h) lengths.push_back(view.head_length(b, h));
    } else {
      throw not_implemented("kvtrim.Cache.head_lengths: ragged layouts in device memory are not read back yet");
    }
    return lengths;
  }

  /// The selection of the last compress (CSR over flattened heads), from
  /// compress's kept-index output (docs/composition.md §5); see run_compress.
  kept_indices kept() const override {
    if (!kept_.offsets.empty()) return kept_;
    detail::fail("kvtrim.Cache.kept", "cache", "a cache that was compressed", "no compress yet");
  }

  /// Each held token's position in its sequence, per flattened head (CSR like kept()).
  std::vector<std::int32_t> positions() const override {
    const auto& view = cache_.view();
    std::vector<std::int32_t> result;
    if constexpr (on_host) {
      for (std::int64_t b = 0; b < view.batch; ++b)
        for (std::int64_t h = 0; h < view.shape.kv_heads; ++h) {
          const std::vector<std::int32_t> head = kvtrim::head_positions(view, b, h);
          result.insert(result.end(), head.begin(), head.end());
        }
    } else if constexpr (!layout_type::ragged_heads) {
      for (std::int64_t b = 0; b < view.batch; ++b)
        for (std::int64_t h = 0; h < view.shape.kv_heads; ++h)
          for (std::int64_t i = 0; i < view.head_length(b, h); ++i) result.push_back(read_position(view.slot(b, h, i)));
    } else {
      throw not_implemented("kvtrim.Cache.positions: ragged layouts in device memory are not read back yet");
    }
    return result;
  }

  stats_result stats() const override {
    stats_result result;
    if constexpr (on_host || !layout_type::ragged_heads) {
      const cache_stats s = kvtrim::stats(cache_.view(), codec_config_);
      result.codec = s.codec;
      result.head_dim = s.head_dim;
      result.bytes_per_token = s.bytes_per_token;
      result.bytes_per_head = s.bytes_per_head;
      for (const auto& head : s.heads) {
        result.kept.push_back(head.kept);
        result.bytes.push_back(head.bytes);
      }
      result.total_bytes = s.bytes();
      result.fp16_bytes = s.fp16_bytes();
      result.ratio = s.kept() > 0 ? s.ratio() : 0.0;
      result.table = s.table();
    } else {
      throw not_implemented("kvtrim.Cache.stats: ragged layouts in device memory are not read back yet");
    }
    result.allocated_bytes = cache_.bytes();
    return result;
  }

  std::pair<std::vector<float>, std::vector<float>> read_head(std::int64_t b, std::int64_t h) const override {
    constexpr std::string_view function = "kvtrim.Cache.read";
    const auto& view = cache_.view();
    if (b < 0 || b >= view.batch)
      detail::fail(function, "b", detail::cat("a sequence in [0, ", view.batch, ")"), std::to_string(b));
    if (h < 0 || h >= view.shape.kv_heads)
      detail::fail(function, "h", detail::cat("a kv head in [0, ", view.shape.kv_heads, ")"), std::to_string(h));
    if constexpr (on_host) {
      const std::int64_t n = view.head_length(b, h), dim = view.shape.head_dim;
      std::vector<float> keys(static_cast<std::size_t>(n * dim)), values(keys.size());
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t slot = view.slot(b, h, i);
        codec_type::load_key(view.storage, b * view.shape.kv_heads + h, slot, view.positions.slot_position[slot],
                             keys.data() + i * dim);
        codec_type::load_value(view.storage, b * view.shape.kv_heads + h, slot, values.data() + i * dim);
      }
      return {std::move(keys), std::move(values)};
    } else {
      throw not_implemented("kvtrim.Cache.read: reading rows back from a device cache is not offered yet");
    }
  }

  std::size_t bytes() const override { return cache_.bytes(); }
  model_shape shape() const override { return cache_.view().shape; }
  std::int64_t batch() const override { return cache_.view().batch; }
  element_type input_type() const override { return element_of<InputT>; }
  bool needs_queries() const override { return scorer_type::needs_queries; }
  std::string name() const override {
    return detail::cat("scheme<layout::", policy_name<layout_type>::value, ", score::", policy_name<scorer_type>::value,
                       ", budget::", policy_name<typename Scheme::budget>::value, ", codec::",
                       policy_name<codec_type>::value, ", backend::", on_host ? "cpu" : "cuda", ">");
  }

 private:
  using stream_type = typename Scheme::stream_type;

  /// THE one call of Scheme::compress. On the host the selection comes back
  /// through compress_options (docs/composition.md §5); on the GPU (contiguous
  /// only today) it is read back from the positions the layout stores.
  void run_compress(tensor_view<const InputT, 4, space> k, tensor_view<const InputT, 4, space> v,
                    tensor_view<const InputT, 4, space> q, workspace scratch, stream_type stream) {
    kept_ = {};
    compress_options<space> options;
    std::vector<std::int64_t> offsets;
    std::vector<std::int32_t> tokens;
    const auto& view = cache_.view();
    if constexpr (on_host) {
      offsets.resize(static_cast<std::size_t>(view.batch * view.shape.kv_heads + 1));
      tokens.resize(static_cast<std::size_t>(
          Scheme::kept_tokens_capacity(view.shape, view.batch, k.extent(2), config_)));
      options.kept_offsets = offsets.data();
      options.kept_tokens = tokens.data();
      options.kept_tokens_capacity = static_cast<std::int64_t>(tokens.size());
    }
    if constexpr (scorer_type::needs_queries)
      Scheme::compress(k, v, q, cache_.view(), config_, options, scratch, stream);
    else
      Scheme::compress(k, v, cache_.view(), config_, options, scratch, stream);
    if constexpr (on_host) {
      tokens.resize(static_cast<std::size_t>(offsets.back()));
      kept_.offsets = std::move(offsets);
      kept_.tokens = std::move(tokens);
    } else if constexpr (!layout_type::ragged_heads) {
      kept_.offsets.push_back(0);
      for (std::int64_t b = 0; b < view.batch; ++b)
        for (std::int64_t h = 0; h < view.shape.kv_heads; ++h) {
          for (std::int64_t i = 0; i < view.head_length(b, h); ++i)
            kept_.tokens.push_back(read_position(view.slot(b, h, i)));
          kept_.offsets.push_back(static_cast<std::int64_t>(kept_.tokens.size()));
        }
    }
  }

  std::int32_t read_position(std::int64_t slot) const {
    const std::int32_t* where = cache_.view().positions.slot_position + slot;
    if constexpr (on_host) {
      return *where;
    } else {
      std::int32_t value = 0;
      copy_to_host(&value, where, sizeof(value));
      return value;
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

  template <std::size_t Rank>
  static void check_array(std::string_view function, std::string_view argument, const array& given) {
    const bool device_ok = given.on_device != on_host;
    if (given.rank != Rank || given.type != element_of<InputT> || !device_ok)
      detail::fail(function, argument,
                   detail::cat("a ", Rank, "-d ", name_of(element_of<InputT>), " array on the ",
                               on_host ? "cpu" : "cuda device"),
                   given.describe());
  }

  template <std::size_t Rank>
  static tensor_view<const InputT, Rank, space> as_view(std::string_view function, std::string_view argument,
                                                        const array& given) {
    check_array<Rank>(function, argument, given);
    tensor_view<const InputT, Rank, space> view;
    view.data = static_cast<const InputT*>(given.data);
    for (std::size_t axis = 0; axis < Rank; ++axis) {
      view.extents[axis] = given.extents[axis];
      view.strides[axis] = given.strides[axis];
    }
    return view;
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
  kept_indices kept_;
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
