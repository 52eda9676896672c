// kvtrim/core/implementation.hpp — where a policy meets a backend.
//
// A policy type (a layout, scorer, budget, codec, or one of the shared stages
// below) says *what* is computed; `implementation<Policy, Backend>` says *how*
// on one backend. Backends specialise it in include/kvtrim/backend/<name>/, one
// header per policy. `scheme` is written once against this trait, so adding a
// backend never copies the API, and a missing specialisation is a compile-time
// error that names the policy and the backend.
#pragma once

#include <string_view>

namespace kvtrim {

/// Specialised for every (policy, backend) pair that exists.
template <class Policy, class Backend>
struct implementation;

/// True when `Backend` implements `Policy` (the specialisation is complete).
template <class Policy, class Backend>
concept implemented_on = requires { sizeof(implementation<Policy, Backend>); };

/// Pipeline stages shared by every scheme; not chosen by the user.
namespace stage {
/// Per head, the `keep_count` highest-scoring tokens, ties to the lower index,
/// returned in ascending token order (so the cache keeps positional order).
struct select_top_k {
  static constexpr std::string_view name = "stage::select_top_k";
};
/// A right-padded batch (compress_options::sequence_lengths): each sequence's
/// scores set into the batch's rows (NaN past its T_b), and on the device the
/// per-sequence values compaction and the finiteness scan read.
struct padded_batch {
  static constexpr std::string_view name = "stage::padded_batch";
};
/// One new query per query head attends over the compressed cache.
struct decode_attention {
  static constexpr std::string_view name = "stage::decode_attention";
};
}  // namespace stage

}  // namespace kvtrim
