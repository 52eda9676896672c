// RazorAttention keeps every token of retrieval heads and a window elsewhere (and
// a compensation token): heads differ in length, so layout::contiguous is refused.
// expect-error: this layout gives every head the same length.*use layout::paged or layout::flat
#include <kvtrim/kvtrim.hpp>

using bad_scheme = kvtrim::scheme<kvtrim::layout::contiguous, kvtrim::score::retrieval_head, kvtrim::budget::by_scorer,
                                  kvtrim::codec::fp16, kvtrim::backend::cpu>;
bad_scheme::config instantiate_it;

int main() { return 0; }
