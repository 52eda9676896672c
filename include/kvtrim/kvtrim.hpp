// kvtrim/kvtrim.hpp — everything kvtrim offers on the host: core types, every
// policy, and the CPU reference backend. CUDA users include kvtrim/cuda.cuh
// (from a .cu file) in addition.
#pragma once

#include "kvtrim/core/cache.hpp"
#include "kvtrim/core/concepts.hpp"
#include "kvtrim/core/config.hpp"
#include "kvtrim/core/element.hpp"
#include "kvtrim/core/error.hpp"
#include "kvtrim/core/implementation.hpp"
#include "kvtrim/core/inspect.hpp"
#include "kvtrim/core/keep.hpp"
#include "kvtrim/core/rank.hpp"
#include "kvtrim/core/rope.hpp"
#include "kvtrim/core/scheme.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/stats.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"

// policies
#include "kvtrim/budget/adaptive.hpp"
#include "kvtrim/budget/by_scorer.hpp"
#include "kvtrim/budget/per_head.hpp"
#include "kvtrim/budget/pyramid.hpp"
#include "kvtrim/budget/uniform.hpp"
#include "kvtrim/codec/fp8.hpp"
#include "kvtrim/codec/hooks.hpp"
#include "kvtrim/codec/int4.hpp"
#include "kvtrim/codec/int8.hpp"
#include "kvtrim/codec/layered.hpp"
#include "kvtrim/codec/low_rank.hpp"
#include "kvtrim/codec/plain.hpp"
#include "kvtrim/codec/rank_analysis.hpp"
#include "kvtrim/layout/contiguous.hpp"
#include "kvtrim/layout/flat.hpp"
#include "kvtrim/layout/paged.hpp"
#include "kvtrim/layout/shared_paged.hpp"
#include "kvtrim/score/attention_mass.hpp"
#include "kvtrim/score/external.hpp"
#include "kvtrim/score/h2o.hpp"
#include "kvtrim/score/key_norm.hpp"
#include "kvtrim/score/retrieval_head.hpp"
#include "kvtrim/score/snapkv.hpp"
#include "kvtrim/score/static_window.hpp"

// kvpress-compatible configurations
#include "kvtrim/kvpress.hpp"

// CPU reference backend
#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/adaptive.hpp"
#include "kvtrim/backend/cpu/attention_mass.hpp"
#include "kvtrim/backend/cpu/contiguous.hpp"
#include "kvtrim/backend/cpu/external.hpp"
#include "kvtrim/backend/cpu/decode_attention.hpp"
#include "kvtrim/backend/cpu/eviction.hpp"
#include "kvtrim/backend/cpu/sharded_eviction.hpp"
#include "kvtrim/backend/cpu/flat.hpp"
#include "kvtrim/backend/cpu/h2o.hpp"
#include "kvtrim/backend/cpu/key_norm.hpp"
#include "kvtrim/backend/cpu/padded_batch.hpp"
#include "kvtrim/backend/cpu/paged.hpp"
#include "kvtrim/backend/cpu/shared_paged.hpp"
#include "kvtrim/backend/cpu/per_head.hpp"
#include "kvtrim/backend/cpu/pyramid.hpp"
#include "kvtrim/backend/cpu/retrieval_head.hpp"
#include "kvtrim/backend/cpu/select_top_k.hpp"
#include "kvtrim/backend/cpu/snapkv.hpp"
#include "kvtrim/backend/cpu/static_window.hpp"
#include "kvtrim/backend/cpu/uniform.hpp"

// calibration profiles (need nlohmann-json; kvtrim::kvtrim links it when CMake finds it)
#if __has_include(<nlohmann/json.hpp>)
#include "kvtrim/io/low_rank_profile.hpp"
#include "kvtrim/io/profile.hpp"
#endif
