// A contiguous layout gives every head one length; a budget that gives heads
// different lengths cannot be stored in it. This must not compile.
// expect-error: this layout gives every head the same length.*but this budget gives heads different lengths
#include <kvtrim/kvtrim.hpp>

#include <cstdint>
#include <string_view>

namespace test_only {
// A stand-in for budget::adaptive: the only property that matters here is ragged_heads.
struct ragged_budget {
  static constexpr std::string_view name = "test::ragged_budget";
  static constexpr bool ragged_heads = true;
  struct config {
    void validate(std::string_view) const {}
  };
  static std::int64_t max_keep(const config&, std::int64_t tokens) { return tokens; }
};
}  // namespace test_only

using bad_scheme = kvtrim::scheme<kvtrim::layout::contiguous, kvtrim::score::static_window, test_only::ragged_budget,
                                  kvtrim::codec::fp16, kvtrim::backend::cpu>;
bad_scheme::config instantiate_it;

int main() { return 0; }
