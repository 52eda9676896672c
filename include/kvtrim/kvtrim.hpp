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
#include "kvtrim/core/keep.hpp"
#include "kvtrim/core/rope.hpp"
#include "kvtrim/core/scheme.hpp"
#include "kvtrim/core/selection.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/core/stats.hpp"
#include "kvtrim/core/view.hpp"
#include "kvtrim/core/workspace.hpp"

// policies
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
#include "kvtrim/score/static_window.hpp"

// CPU reference backend
#include "kvtrim/backend/cpu.hpp"
#include "kvtrim/backend/cpu/contiguous.hpp"
#include "kvtrim/backend/cpu/decode_attention.hpp"
#include "kvtrim/backend/cpu/select_top_k.hpp"
#include "kvtrim/backend/cpu/static_window.hpp"
#include "kvtrim/backend/cpu/uniform.hpp"
