// python/src/eviction.hpp — decode-time eviction (issue 16) from Python: the metric buffer, the
// prefill's seed, decode attention that accumulates the metric, and kvtrim::evict over every
// layer's cache at once (kvtrim.Eviction in python/kvtrim/eviction.py drives them).
//
// For the schemes an engine evicts with today: layout::paged (its pages are freed; flat's append
// repack does not move an engine-owned metric, eviction/metric.hpp), codec fp16, with
// StreamingLLM, SnapKV or Ada-SnapKV prefill compression — on the CPU (eviction.cpp: float32
// NumPy arrays) and on CUDA (eviction_cuda.cu: the device seed_metric, eviction::attend and
// kvtrim::evict<backend::cuda> on the caller's stream, float16 tensors, a float32 device metric).
// The same Python API drives both; the cache's backend picks.
// No nanobind here: module.cpp converts arrays (binding.hpp's `array`) and binds these.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "binding.hpp"

namespace kvtrim::python::evicting {

/// The metric's settings (eviction/metric.hpp) as Python passes them.
struct metric_settings {
  std::string kind = "squared_sum";  // squared_sum | sum | squared_mean | mean
  std::int64_t protected_window = eviction::default_protected_window;
};

/// The settings of one eviction step (eviction/evict.hpp), as Python passes them.
struct step_settings {
  std::string scope = "cross_layer";  // per_head | per_layer | cross_layer
  std::int64_t keep = 1024;
  std::int64_t interval = 16;
  std::int64_t sinks = 4;
  std::int64_t protected_window = eviction::default_protected_window;
  double alpha = 0.2;
};

/// One array of the one-step-late metric's carry as module.cpp hands it over: it checked the
/// rank (1), the element type (float32 or int64, as the field wants), the device (the cpu) and
/// contiguity; the extent against the cache is checked here (eviction.cpp), which knows the shape.
struct carry_vector {
  void* data = nullptr;
  std::int64_t size = 0;  // elements
  bool given = false;
};
/// The one-step-late metric's carry (eviction/metric.hpp's metric_carry), one layer's: queries
/// [B·Hq·D] float32, normaliser [B·Hq·2] float32, next [B·Hkv] int64. None given: immediate mode;
/// some but not all: refused. CPU caches only (CUDA eviction::attend refuses a carry).
struct carry_arrays {
  carry_vector queries, normaliser, next;
  bool any() const { return queries.given || normaliser.given || next.given; }
};

/// Floats the metric of `cache` needs (one per storage slot).
std::int64_t metric_slots(cache_base& cache);
/// The prefill's metric: eviction::seed_metric over the selection of the cache's last compress,
/// with the prompt lengths it took (a padded batch; CPU and CUDA caches) (with a carry: its
/// pending step is dropped, carry.next = 0).
void seed(cache_base& cache, const array& keys, const array& window_queries, std::int64_t start_position,
          const array& metric, const metric_settings& settings, std::uintptr_t stream, const carry_arrays& carry = {});
/// Decode attention that also accumulates the metric (eviction::attend); with a carry, one step
/// late: the previous step's metric is added, this step's is kept in the carry.
void attend(cache_base& cache, const array& queries, const array& out, const array& metric,
            const metric_settings& settings, std::uintptr_t stream, const carry_arrays& carry = {});
/// The one-step-late metric's pending step (eviction::flush_metric; CPU caches only).
void flush_metric(cache_base& cache, const array& metric, const metric_settings& settings, const carry_arrays& carry);
/// One eviction step over every layer's cache (same scheme, batch and kv heads) and metric.
eviction::report step(const std::vector<cache_base*>& layers, const std::vector<array>& metrics,
                      const step_settings& settings, std::uintptr_t stream);

/// The schemes eviction is compiled for, in words (the error a cache of another scheme gets).
inline constexpr std::string_view supported_schemes =
    "a cache on the paged layout with codec fp16 and StreamingLLM, SnapKV or AdaKV(SnapKV), on the cpu or "
    "(where kvtrim was built with CUDA) a cuda device (the schemes eviction is compiled for in Python)";

/// The CUDA twins (eviction_cuda.cu, compiled only with CUDA): each returns false, doing nothing,
/// where the cache (the first layer's for step) is not one of the CUDA schemes eviction is compiled for.
namespace on_device {
bool metric_slots(cache_base& cache, std::int64_t& slots);
bool seed(cache_base& cache, const array& keys, const array& window_queries, std::int64_t start_position,
          const array& metric, const metric_settings& settings, std::uintptr_t stream);
bool attend(cache_base& cache, const array& queries, const array& out, const array& metric,
            const metric_settings& settings, std::uintptr_t stream);
bool step(const std::vector<cache_base*>& layers, const std::vector<array>& metrics, const eviction::config& cfg,
          eviction::report& report, std::uintptr_t stream);
}  // namespace on_device

/// A list of compiled schemes; visit_scheme calls visit(Typed<S>&) for the one S that `cache` is
/// (false for a cache of none of them). eviction.cpp's CPU list and eviction_cuda.cu's CUDA one.
template <class... S>
struct scheme_list {};
template <template <class> class Typed, class Visit, class... S>
bool visit_scheme(cache_base& cache, Visit&& visit, scheme_list<S...>) {
  return (... || [&] {
    auto* known = dynamic_cast<Typed<S>*>(&cache);
    if (known != nullptr) visit(*known);
    return known != nullptr;
  }());
}

/// Every layer's cache view (all of `first`'s scheme, else kvtrim::error naming the layer) and its
/// metric output, for one eviction step over all layers (eviction.cpp's and eviction_cuda.cu's step).
template <class Known, class MetricOf>
auto layer_views(Known& first, const std::vector<cache_base*>& layers, const std::vector<array>& metrics,
                 MetricOf&& metric_of) {
  using view_type = std::remove_cvref_t<decltype(first.owned().view())>;
  using output_type = std::remove_cvref_t<decltype(metric_of(metrics.front()))>;
  std::pair<std::vector<view_type>, std::vector<output_type>> out;
  for (std::size_t layer = 0; layer < layers.size(); ++layer) {
    auto* same = dynamic_cast<Known*>(layers[layer]);
    if (same == nullptr)
      detail::fail("kvtrim.Eviction", "caches", detail::cat("every layer's cache of one scheme (", first.name(), ")"),
                   detail::cat(layers[layer]->name(), " at layer ", layer));
    out.first.push_back(same->owned().view());
    out.second.push_back(metric_of(metrics[layer]));
  }
  return out;
}

/// metric_settings' kind as eviction::metric_kind, and step_settings as eviction::config (eviction.cpp).
eviction::metric_kind kind_of(const std::string& kind);

}  // namespace kvtrim::python::evicting
