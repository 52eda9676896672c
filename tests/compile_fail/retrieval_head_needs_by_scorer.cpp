// score::retrieval_head decides each head's keep count itself (RazorAttention);
// pairing it with a budget that would also decide them must not compile.
// expect-error: this scorer decides how many tokens each head keeps.*use budget::by_scorer
#include <kvtrim/kvtrim.hpp>

using bad_scheme = kvtrim::scheme<kvtrim::layout::paged, kvtrim::score::retrieval_head, kvtrim::budget::uniform,
                                  kvtrim::codec::fp16, kvtrim::backend::cpu>;
bad_scheme::config instantiate_it;

int main() { return 0; }
