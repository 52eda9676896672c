// python/src/eviction.cpp — the eviction binding's definitions (eviction.hpp says what and why).
#include "eviction.hpp"

#include <kvtrim/backend/cpu/eviction.hpp>

#include <cstddef>
#include <span>

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
          const array& metric, const metric_settings& settings, std::uintptr_t stream) {
  if (on_device_call([&] { return on_device::seed(cache, keys, window_queries, start_position, metric, settings, stream); }))
    return;
  const kept_indices kept = cache.kept();
  if (!with_scheme(cache, [&](auto& known) {
        const selection_view<host_space> selection{kept.offsets.data(), kept.tokens.data(),
                                                   static_cast<std::int64_t>(kept.offsets.size()) - 1};
        eviction::seed_metric(host_view<4>("keys", keys), host_view<4>("window_queries", window_queries),
                              known.owned().view(), selection, start_position, metric_of(metric, settings));
      }))
    unsupported(cache);
}

void attend(cache_base& cache, const array& queries, const array& out, const array& metric,
            const metric_settings& settings, std::uintptr_t stream) {
  if (on_device_call([&] { return on_device::attend(cache, queries, out, metric, settings, stream); })) return;
  const bool found = with_scheme(cache, [&](auto& known) {
    const auto& view = known.owned().view();
    const auto output = metric_of(metric, settings);
    std::vector<std::byte> scratch(eviction::attend_workspace(view, output));
    const auto o = host_view<3>("out", out);
    eviction::attend(host_view<3>("queries", queries), view, tensor_view<float, 3>{const_cast<float*>(o.data), o.extents, o.strides},
                     output, workspace{scratch.data(), scratch.size()});
  });
  if (!found) unsupported(cache);
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
