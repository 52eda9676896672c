// python/src/eviction_cuda.cu — the eviction binding's CUDA twin (eviction.hpp says what and why):
// the same three schemes as eviction.cpp's CPU list on backend::cuda, whose caches
// registry_cuda_paged.cu builds (typed_cache<..., half>: float16 inputs read in place).
//
// Every call runs on the caller's stream and synchronises nothing but step(), which returns
// what the step did (the report is copied back, so step waits for its own kernels; an engine
// that wants no sync at all calls kvtrim::evict from C++ without a report). The metric is a
// float32 device vector the caller owns (torch.zeros(slots, device="cuda")), as on the CPU.
// Scratch is the cache's own (typed_cache::eviction_scratch, grown once, kept between calls):
// a cudaMalloc per decode step would synchronise the device.
#include "eviction.hpp"
#include "registry_cuda.cuh"

#include <cstddef>
#include <span>

namespace kvtrim::python::evicting::on_device {
namespace {

constexpr std::string_view where = "kvtrim.Eviction";

using fp16_input = cuda_list::input_of<codec::fp16>;
/// eviction.cpp's list on backend::cuda.
using supported = scheme_list<scheme<layout::paged, score::snapkv, budget::uniform, codec::fp16, backend::cuda>,
                            scheme<layout::paged, score::snapkv, budget::adaptive, codec::fp16, backend::cuda>,
                            scheme<layout::paged, score::static_window, budget::uniform, codec::fp16, backend::cuda>>;

template <class Scheme>
using typed = typed_cache<Scheme, fp16_input>;

/// Calls visit(typed<S>&) for the compiled scheme S that `cache` is; false for any other.
template <class Visit>
bool with_scheme(cache_base& cache, Visit&& visit) {
  return visit_scheme<typed>(cache, visit, supported{});
}

template <std::size_t Rank, class Element>
tensor_view<Element, Rank, device_space> device_view(std::string_view argument, const array& given) {
  return array_view<Rank, Element, device_space>(where, argument, given);
}

/// The metric buffer: a contiguous float32 device vector of at least the cache's storage slots.
eviction::metric_output<device_space> metric_of(const array& metric, const metric_settings& settings) {
  const auto view = device_view<1, float>("metric", metric);
  if (view.strides[0] != 1 && view.extents[0] > 1)
    detail::fail(where, "metric", "a contiguous float32 vector", metric.describe());
  return {.values = view.data,
          .slots = view.extents[0],
          .kind = kind_of(settings.kind),
          .protected_window = settings.protected_window};
}

cudaStream_t to_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

bool metric_slots(cache_base& cache, std::int64_t& slots) {
  return with_scheme(cache, [&](auto& known) { slots = detail::storage_slots(known.owned().view().storage); });
}

bool seed(cache_base& cache, const array& keys, const array& window_queries, std::int64_t start_position,
          const array& metric, const metric_settings& settings, std::uintptr_t stream) {
  return with_scheme(cache, [&](auto& known) {
    // The seed reads the selection of the cache's last compress: a refusal that "deferred"
    // checking has not raised yet must raise here, as the CPU twin raises through kept()
    // (review M2), not seed from the refused call's selection.
    // A padded batch's compress (lengths=): each sequence is seeded from the window at the end
    // of its own prompt, with the lengths that compress took, as the CPU twin does.
    known.check_status();
    const auto& view = known.owned().view();
    const auto k = device_view<4, const fp16_input>("keys", keys);
    const auto q = device_view<4, const fp16_input>("window_queries", window_queries);
    const auto output = metric_of(metric, settings);
    const std::int64_t* lengths = known.sequence_lengths();
    const workspace scratch = known.eviction_scratch().get(eviction::seed_workspace(k, q, view, lengths));
    eviction::seed_metric(k, q, view, known.kept_on_device(), start_position, output, scratch, to_stream(stream),
                          lengths);
    known.used_on(stream);
  });
}

bool attend(cache_base& cache, const array& queries, const array& out, const array& metric,
            const metric_settings& settings, std::uintptr_t stream) {
  return with_scheme(cache, [&](auto& known) {
    const auto& view = known.owned().view();
    const auto output = metric_of(metric, settings);
    const workspace scratch = known.eviction_scratch().get(eviction::attend_workspace(view, output));
    eviction::attend(device_view<3, const fp16_input>("queries", queries), view,
                     device_view<3, fp16_input>("out", out), output, scratch, to_stream(stream));
    known.used_on(stream);
  });
}

bool step(const std::vector<cache_base*>& layers, const std::vector<array>& metrics, const eviction::config& cfg,
          eviction::report& report, std::uintptr_t stream) {
  return with_scheme(*layers.front(), [&](auto& first) {
    using known_type = std::remove_reference_t<decltype(first)>;
    const metric_settings metric{.protected_window = cfg.protected_window};
    const auto [views, outputs] =
        layer_views(first, layers, metrics, [&](const array& values) { return metric_of(values, metric); });
    const std::span all(views);
    // The report lives on the device after the step's scratch (256-byte aligned), then comes back.
    const std::size_t step_bytes = (evict_workspace<backend::cuda>(all) + 255) / 256 * 256;
    const workspace scratch = first.eviction_scratch().get(step_bytes + sizeof(eviction::report));
    auto* device_report = reinterpret_cast<eviction::report*>(static_cast<std::byte*>(scratch.data) + step_bytes);
    evict<backend::cuda>(all, std::span<const eviction::metric_output<device_space>>(outputs), cfg,
                         workspace{scratch.data, step_bytes}, to_stream(stream), device_report);
    for (cache_base* layer : layers) dynamic_cast<known_type*>(layer)->used_on(stream);
    copy_to_host(&report, device_report, sizeof report, stream);
  });
}

}  // namespace kvtrim::python::evicting::on_device
