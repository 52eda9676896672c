// kvtrim/cuda.cuh — kvtrim with the CUDA backend. Include from a .cu file
// (compiled by nvcc with --expt-relaxed-constexpr; CMake users link kvtrim::cuda,
// which sets it). Everything in kvtrim/kvtrim.hpp comes along.
#pragma once

#include "kvtrim/kvtrim.hpp"

#include "kvtrim/backend/cuda.hpp"
#include "kvtrim/backend/cuda/adaptive.cuh"
#include "kvtrim/backend/cuda/codec_fp8.cuh"
#include "kvtrim/backend/cuda/codec_layered.cuh"
#include "kvtrim/backend/cuda/codec_low_rank.cuh"
#include "kvtrim/backend/cuda/codec_quantized.cuh"
#include "kvtrim/backend/cuda/codec_writes.cuh"
#include "kvtrim/backend/cuda/common.cuh"
#include "kvtrim/backend/cuda/contiguous.cuh"
#include "kvtrim/backend/cuda/decode_attention.cuh"
#include "kvtrim/backend/cuda/eviction.cuh"
#include "kvtrim/backend/cuda/external.cuh"
#include "kvtrim/backend/cuda/flat.cuh"
#include "kvtrim/backend/cuda/h2o.cuh"
#include "kvtrim/backend/cuda/key_norm.cuh"
#include "kvtrim/backend/cuda/paged.cuh"
#include "kvtrim/backend/cuda/per_head.cuh"
#include "kvtrim/backend/cuda/pyramid.cuh"
#include "kvtrim/backend/cuda/retrieval_head.cuh"
#include "kvtrim/backend/cuda/padded_batch.cuh"
#include "kvtrim/backend/cuda/select_top_k.cuh"
#include "kvtrim/backend/cuda/shared_paged.cuh"
#include "kvtrim/backend/cuda/sharded_eviction.cuh"
#include "kvtrim/backend/cuda/snapkv.cuh"
#include "kvtrim/backend/cuda/static_window.cuh"
#include "kvtrim/backend/cuda/uniform.cuh"
#include "kvtrim/backend/cuda/writes.cuh"
