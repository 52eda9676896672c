// tests/common/ragged_budget.hpp — a test-local ragged budget: a fixed keep
// count per kv head (the shape of budget::per_head), so the ragged layouts can
// be tested with heads of different lengths independently of the real budgets.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kvtrim::testing {

struct per_head_counts {
  static constexpr std::string_view name = "testing::per_head_counts";
  static constexpr bool ragged_heads = true;

  struct config {
    std::vector<std::int64_t> keep;  // one count per kv head (the same for every sequence)

    void validate(std::string_view function) const {
      if (keep.empty()) detail::fail(function, "config.budget.keep", "one count per kv head", "none");
      for (std::int64_t count : keep)
        if (count < 1) detail::fail(function, "config.budget.keep", "counts of at least 1", std::to_string(count));
    }
  };

  static std::int64_t max_keep(const config& cfg, std::int64_t tokens) {
    return std::min(tokens, *std::max_element(cfg.keep.begin(), cfg.keep.end()));
  }
};

}  // namespace kvtrim::testing

template <>
struct kvtrim::implementation<kvtrim::testing::per_head_counts, kvtrim::backend::cpu> {
  static void keep_counts(const kvtrim::testing::per_head_counts::config& cfg,
                          const kvtrim::tensor_view<const float, 3>& scores, std::int32_t* keep_counts,
                          kvtrim::backend::host_stream) {
    const std::int64_t kv_heads = scores.extent(1), tokens = scores.extent(2);
    if (static_cast<std::int64_t>(cfg.keep.size()) != kv_heads)
      kvtrim::detail::fail("testing::per_head_counts", "config.budget.keep", "one count per kv head",
                           std::to_string(cfg.keep.size()));
    for (std::int64_t head = 0; head < scores.extent(0) * kv_heads; ++head)
      keep_counts[head] = static_cast<std::int32_t>(std::min(tokens, cfg.keep[static_cast<std::size_t>(head % kv_heads)]));
  }
};
