// python/src/eviction.cpp — the eviction binding's definitions (eviction.hpp says what and why).
#include "eviction.hpp"

#include <kvtrim/backend/cpu/eviction.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>

namespace kvtrim::python::evicting {
namespace {

constexpr std::string_view where = "kvtrim.Eviction";

/// The schemes the binding is compiled for (eviction.hpp: paged, fp16, three presses).
using supported = scheme_list<scheme<layout::paged, score::snapkv, budget::uniform, codec::fp16, backend::cpu>,
                            scheme<layout::paged, score::snapkv, budget::adaptive, codec::fp16, backend::cpu>,
                            scheme<layout::paged, score::static_window, budget::uniform, codec::fp16, backend::cpu>>;

template <class Scheme>
using typed = typed_cache<Scheme, float>;

/// Calls visit(typed<S>&) for the compiled scheme S that `cache` is; false for any other.
template <class Visit>
bool with_scheme(cache_base& cache, Visit&& visit) {
  return visit_scheme<typed>(cache, visit, supported{});
}

/// A cache of none of the compiled schemes, CPU or CUDA.
[[noreturn]] void unsupported(const cache_base& cache) { detail::fail(where, "cache", supported_schemes, cache.name()); }

/// The device twin's call where kvtrim has CUDA, else false.
template <class Call>
bool on_device_call([[maybe_unused]] Call&& call) {
#ifdef KVTRIM_PYTHON_CUDA
  return call();
#else
  return false;
#endif
}

template <std::size_t Rank>
tensor_view<const float, Rank> host_view(std::string_view argument, const array& given) {
  return array_view<Rank, const float, host_space>(where, argument, given);
}

/// The metric buffer: a contiguous float32 vector of at least the cache's storage slots.
eviction::metric_output<host_space> metric_of(const array& metric, const metric_settings& settings) {
  const auto view = host_view<1>("metric", metric);
  if (view.strides[0] != 1 && view.extents[0] > 1)
    detail::fail(where, "metric", "a contiguous float32 vector", metric.describe());
  return {.values = const_cast<float*>(view.data),
          .slots = view.extents[0],
          .kind = kind_of(settings.kind),
          .protected_window = settings.protected_window};
}

/// The bytes [begin, end) an array addresses (empty where any extent is 0); strides may be negative.
struct byte_range {
  std::uintptr_t begin = 0, end = 0;
  bool overlaps(const byte_range& other) const {
    return begin < end && other.begin < other.end && begin < other.end && other.begin < end;
  }
};
byte_range range_of(const array& given) {
  const std::int64_t element = given.type == element_type::f16 || given.type == element_type::bf16 ? 2 : 4;
  std::int64_t low = 0, high = 0;  // element offsets of the first and last addressed element
  for (std::size_t axis = 0; axis < given.rank; ++axis) {
    if (given.extents[axis] <= 0) return {};
    const std::int64_t reach = (given.extents[axis] - 1) * given.strides[axis];
    (reach < 0 ? low : high) += reach;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(given.data);
  return {base + static_cast<std::uintptr_t>(low * element), base + static_cast<std::uintptr_t>((high + 1) * element)};
}
byte_range range_of(const carry_vector& given, std::size_t element) {
  const auto base = reinterpret_cast<std::uintptr_t>(given.data);
  return {base, base + static_cast<std::uintptr_t>(given.size) * element};
}

/// The carry (one step late) for a cache of view `view`, or an empty one (immediate) where none
/// was given; kvtrim::error naming `function` for a partial carry, an array of the wrong size, or
/// one that overlaps another carry array or one of `others` (the call's other arrays: the kernel
/// writes the carry while it reads and writes those, on several threads).
template <class View>
eviction::metric_carry<host_space> carry_of(std::string_view function, const View& view, const carry_arrays& carry,
                                            std::initializer_list<std::pair<std::string_view, const array*>> others) {
  if (!carry.any()) return {};
  const model_shape& shape = view.shape;
  const std::int64_t rows = view.batch * shape.q_heads;
  struct field {
    std::string_view argument;
    const carry_vector& given;
    std::int64_t size;
    std::string_view element, layout;
    std::size_t bytes;
  };
  const std::array<field, 3> fields{{
      {"carry_queries", carry.queries, rows * shape.head_dim, "float32", "batch · q_heads · head_dim", 4},
      {"carry_normaliser", carry.normaliser, rows * 2, "float32", "batch · q_heads · 2", 4},
      {"carry_next", carry.next, view.batch * shape.kv_heads, "int64", "batch · kv_heads", 8},
  }};
  for (const field& f : fields) {
    if (!f.given.given)
      detail::fail(function, f.argument, "all three carry arrays (queries, normaliser, next) or none (immediate)",
                   "None");
    if (f.given.size != f.size)
      detail::fail(function, f.argument,
                   detail::cat("a contiguous ", f.element, " vector of ", f.size, " elements (", f.layout, ")"),
                   detail::cat(f.element, " [", f.given.size, "] on cpu"));
  }
  for (std::size_t i = 0; i < fields.size(); ++i) {
    const byte_range mine = range_of(fields[i].given, fields[i].bytes);
    for (std::size_t j = i + 1; j < fields.size(); ++j)
      if (mine.overlaps(range_of(fields[j].given, fields[j].bytes)))
        detail::fail(function, fields[i].argument, "an array of its own",
                     detail::cat("memory shared with ", fields[j].argument));
    for (const auto& [argument, other] : others)
      if (mine.overlaps(range_of(*other)))
        detail::fail(function, fields[i].argument, "an array of its own",
                     detail::cat("memory shared with ", argument));
  }
  return {static_cast<float*>(carry.queries.data), static_cast<float*>(carry.normaliser.data),
          static_cast<std::int64_t*>(carry.next.data)};
}

/// A carry (one step late) with a cache that is not one of the CPU schemes: the CUDA twin
/// refuses a carry (eviction/metric.hpp), any other scheme is unsupported.
[[noreturn]] void carry_refused(std::string_view function, cache_base& cache) {
  if (on_device_call([&] {
        std::int64_t slots = 0;
        return on_device::metric_slots(cache, slots);
      }))
    detail::fail(function, "carry",
                 "a cpu cache (the eviction metric one step late is CPU-only: CUDA eviction::attend refuses a carry)",
                 cache.name());
  unsupported(cache);
}

}  // namespace

eviction::metric_kind kind_of(const std::string& kind) {
  return convert::pick<eviction::metric_kind>("kind", kind,
                                              {{"squared_sum", eviction::metric_kind::squared_sum},
                                               {"sum", eviction::metric_kind::sum},
                                               {"squared_mean", eviction::metric_kind::squared_mean},
                                               {"mean", eviction::metric_kind::mean}});
}

std::int64_t metric_slots(cache_base& cache) {
  std::int64_t slots = 0;
  if (with_scheme(cache, [&](auto& known) { slots = detail::storage_slots(known.owned().view().storage); }))
    return slots;
  if (on_device_call([&] { return on_device::metric_slots(cache, slots); })) return slots;
  unsupported(cache);
}

void seed(cache_base& cache, const array& keys, const array& window_queries, std::int64_t start_position,
          const array& metric, const metric_settings& settings, std::uintptr_t stream, const carry_arrays& carry) {
  constexpr std::string_view function = "kvtrim.Eviction.seed";
  if (!carry.any() &&
      on_device_call([&] { return on_device::seed(cache, keys, window_queries, start_position, metric, settings, stream); }))
    return;
  const kept_indices kept = cache.kept();
  if (!with_scheme(cache, [&](auto& known) {
        const selection_view<host_space> selection{kept.offsets.data(), kept.tokens.data(),
                                                   static_cast<std::int64_t>(kept.offsets.size()) - 1};
        const auto& view = known.owned().view();
        auto output = metric_of(metric, settings);
        output.carry = carry_of(function, view, carry,
                                {{"metric", &metric}, {"keys", &keys}, {"window_queries", &window_queries}});
        eviction::seed_metric(host_view<4>("keys", keys), host_view<4>("window_queries", window_queries), view,
                              selection, start_position, output,
                              kept.sequence_lengths.empty() ? nullptr : kept.sequence_lengths.data());
      })) {
    if (carry.any()) carry_refused(function, cache);
    unsupported(cache);
  }
}

void attend(cache_base& cache, const array& queries, const array& out, const array& metric,
            const metric_settings& settings, std::uintptr_t stream, const carry_arrays& carry) {
  constexpr std::string_view function = "kvtrim.Eviction.attend";
  if (!carry.any() && on_device_call([&] { return on_device::attend(cache, queries, out, metric, settings, stream); }))
    return;
  const bool found = with_scheme(cache, [&](auto& known) {
    const auto& view = known.owned().view();
    auto output = metric_of(metric, settings);
    output.carry = carry_of(function, view, carry, {{"metric", &metric}, {"queries", &queries}, {"out", &out}});
    std::vector<std::byte> scratch(eviction::attend_workspace(view, output));
    const auto o = host_view<3>("out", out);
    eviction::attend(host_view<3>("queries", queries), view, tensor_view<float, 3>{const_cast<float*>(o.data), o.extents, o.strides},
                     output, workspace{scratch.data(), scratch.size()});
  });
  if (!found) {
    if (carry.any()) carry_refused(function, cache);
    unsupported(cache);
  }
}

void flush_metric(cache_base& cache, const array& metric, const metric_settings& settings, const carry_arrays& carry) {
  constexpr std::string_view function = "kvtrim.Eviction.flush";
  if (!carry.any())
    detail::fail(function, "carry", "the carry of the metric one step late (queries, normaliser, next)", "None");
  const bool found = with_scheme(cache, [&](auto& known) {
    const auto& view = known.owned().view();
    auto output = metric_of(metric, settings);
    output.carry = carry_of(function, view, carry, {{"metric", &metric}});
    std::vector<std::byte> scratch(eviction::attend_workspace(view, output));
    eviction::flush_metric(view, output, workspace{scratch.data(), scratch.size()});
  });
  if (!found) carry_refused(function, cache);
}

eviction::report step(const std::vector<cache_base*>& layers, const std::vector<array>& metrics,
                      const step_settings& settings, std::uintptr_t stream) {
  if (layers.empty()) detail::fail(where, "caches", "one cache per layer", "none");
  if (metrics.size() != layers.size())
    detail::fail(where, "metrics", detail::cat("one metric per cache (", layers.size(), ")"),
                 std::to_string(metrics.size()));
  eviction::config cfg;
  cfg.scope = convert::pick<eviction::scope>("scope", settings.scope,
                                             {{"per_head", eviction::scope::per_head},
                                              {"per_layer", eviction::scope::per_layer},
                                              {"cross_layer", eviction::scope::cross_layer}});
  cfg.keep = settings.keep;
  cfg.interval = settings.interval;
  cfg.sinks = settings.sinks;
  cfg.protected_window = settings.protected_window;
  cfg.alpha = settings.alpha;
  eviction::report report;
  if (on_device_call([&] { return on_device::step(layers, metrics, cfg, report, stream); })) return report;
  const bool found = with_scheme(*layers.front(), [&](auto& first) {
    const metric_settings metric{.protected_window = settings.protected_window};
    const auto [views, outputs] =
        layer_views(first, layers, metrics, [&](const array& values) { return metric_of(values, metric); });
    const std::span all(views);
    std::vector<std::byte> scratch(evict_workspace<backend::cpu>(all));
    report = evict<backend::cpu>(all, std::span<const eviction::metric_output<host_space>>(outputs), cfg,
                                 workspace{scratch.data(), scratch.size()});
  });
  if (!found) unsupported(*layers.front());
  return report;
}

}  // namespace kvtrim::python::evicting
