// A type that is not a Scorer (no config, no needs_queries) is rejected by the
// Scorer concept, and the compiler names the concept.
// expect-error: satisfaction of .*Scorer<ScorerT>
#include <kvtrim/kvtrim.hpp>

struct not_a_scorer {};

using bad_scheme = kvtrim::scheme<kvtrim::layout::contiguous, not_a_scorer, kvtrim::budget::uniform,
                                  kvtrim::codec::fp16, kvtrim::backend::cpu>;
bad_scheme::config instantiate_it;

int main() { return 0; }
