// budget::by_scorer takes the keep counts from the scorer; a scorer that does not
// set them (score::snapkv) would leave them unset, so the pair must not compile.
// expect-error: budget::by_scorer takes the keep counts from the scorer, but this scorer does not set them
#include <kvtrim/kvtrim.hpp>

using bad_scheme = kvtrim::scheme<kvtrim::layout::paged, kvtrim::score::snapkv, kvtrim::budget::by_scorer,
                                  kvtrim::codec::fp16, kvtrim::backend::cpu>;
bad_scheme::config instantiate_it;

int main() { return 0; }
