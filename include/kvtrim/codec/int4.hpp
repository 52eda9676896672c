// kvtrim/codec/int4.hpp — 4-bit integer quantization, two codes per byte.
//
// The same codec as codec::int8 (codec/int8.hpp: KIVI per-channel key groups
// with an fp16 residual window, per-token value scales, optional zero points)
// with b = 4: symmetric codes q ∈ [−7, 7], asymmetric q ∈ [0, 15], so the
// half-step bound |x − x̂| ≤ s/2 holds with a step s 18× (symmetric) or 17×
// (asymmetric) coarser than int8's. Element d of a row sits in byte d/2, low
// nibble for even d. KIVI reports 4-bit asymmetric keys and values as lossless
// on LongBench (Mistral-7B 43.54 → 43.53); prefer asymmetric = true here.
// Defaults: as int8. Backends: cpu, cuda (as int8).
#pragma once

#include "kvtrim/codec/int8.hpp"

namespace kvtrim::codec {
using int4 = quantized<4>;
}  // namespace kvtrim::codec
