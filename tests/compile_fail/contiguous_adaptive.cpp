// Ada-KV gives the heads of a layer different lengths; layout::contiguous cannot
// hold that. The real budget (not a stand-in) must be rejected with the sentence.
// expect-error: this layout gives every head the same length.*but this budget gives heads different lengths
#include <kvtrim/kvtrim.hpp>

using bad_scheme = kvtrim::scheme<kvtrim::layout::contiguous, kvtrim::score::snapkv, kvtrim::budget::adaptive,
                                  kvtrim::codec::fp16, kvtrim::backend::cpu>;
bad_scheme::config instantiate_it;

int main() { return 0; }
