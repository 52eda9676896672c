// python/src/eviction.hpp — decode-time eviction (issue 16) from Python: the metric buffer, the
// prefill's seed, decode attention that accumulates the metric, and kvtrim::evict over every
// layer's cache at once (kvtrim.Eviction in python/kvtrim/eviction.py drives them).
//
// CPU only, and for the schemes an engine evicts with today: layout::paged (its pages are freed;
// flat's append repack does not move an engine-owned metric, eviction/metric.hpp), codec fp16,
// with StreamingLLM, SnapKV or Ada-SnapKV prefill compression. What CUDA lacks for the same
// binding: kvtrim::evict<backend::cuda> exists for plain codecs on paged and flat, and decode
// attention writes the metric on the device, but no device seed_metric (the prefill's metric)
// and no device run of the eviction step has been recorded yet (docs/eviction.md).
// No nanobind here: module.cpp converts arrays (binding.hpp's `array`) and binds these.
#pragma once

#include <cstdint>
#include <string>
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

/// Floats the metric of `cache` needs (one per storage slot).
std::int64_t metric_slots(cache_base& cache);
/// The prefill's metric: eviction::seed_metric over the selection of the cache's last compress.
void seed(cache_base& cache, const array& keys, const array& window_queries, std::int64_t start_position,
          const array& metric, const metric_settings& settings);
/// Decode attention that also accumulates the metric (eviction::attend).
void attend(cache_base& cache, const array& queries, const array& out, const array& metric,
            const metric_settings& settings);
/// One eviction step over every layer's cache (same scheme, batch and kv heads) and metric.
eviction::report step(const std::vector<cache_base*>& layers, const std::vector<array>& metrics,
                      const step_settings& settings);

}  // namespace kvtrim::python::evicting
