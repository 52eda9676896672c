// python/src/module.cpp — the nanobind module kvtrim._kvtrim.
//
// Arrays come in through DLPack (nanobind's ndarray): NumPy on the CPU, torch
// or CuPy on the GPU, never copied here. This file checks what every argument
// is (rank, element type, device) and hands a plain `array` to the type-erased
// cache (binding.hpp); kvtrim itself checks shapes and strides and throws
// kvtrim::error, which Python sees as kvtrim.Error (a ValueError) with the
// C++ message.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <Python.h>

#include <algorithm>
#include <functional>
#include <mutex>
#include <optional>

#include "binding.hpp"
#include "eviction.hpp"

#if __has_include(<nlohmann/json.hpp>)
#define KVTRIM_PYTHON_PROFILES 1
#include <kvtrim/io/low_rank_profile.hpp>
#include <kvtrim/io/profile.hpp>
#endif

namespace nb = nanobind;
namespace kp = kvtrim::python;

namespace {

using input_array = nb::ndarray<nb::ro>;
using output_array = nb::ndarray<>;

const kp::registry& schemes() {
  static const kp::registry all = [] {
    kp::registry into;
    kp::register_cpu_schemes(into);
#ifdef KVTRIM_PYTHON_CUDA
    kp::register_cuda_schemes(into);
#endif
    return into;
  }();
  return all;
}

std::string dtype_name(const nb::dlpack::dtype& type) {
  const auto code = static_cast<nb::dlpack::dtype_code>(type.code);
  std::string kind = code == nb::dlpack::dtype_code::Float    ? "float"
                     : code == nb::dlpack::dtype_code::Bfloat ? "bfloat"
                     : code == nb::dlpack::dtype_code::Int    ? "int"
                     : code == nb::dlpack::dtype_code::UInt   ? "uint"
                     : code == nb::dlpack::dtype_code::Bool   ? "bool"
                                                              : "complex";
  return kind + std::to_string(type.bits) + (type.lanes != 1 ? "x" + std::to_string(type.lanes) : "");
}

/// Rank, element type and device of one argument; what kvtrim checks itself (shape, strides) it checks.
template <class Array>
kp::array to_array(std::string_view function, std::string_view argument, const Array& given, std::size_t rank,
                   std::string_view layout, bool integers = false) {
  kp::array result;
  const nb::dlpack::dtype type = given.dtype();
  const auto code = static_cast<nb::dlpack::dtype_code>(type.code);
  std::string shape = "[";
  for (std::size_t axis = 0; axis < given.ndim(); ++axis)
    shape += (axis ? ", " : "") + std::to_string(given.shape(axis));
  shape += "]";
  const bool on_cpu = given.device_type() == nb::device::cpu::value;
  const bool on_cuda = given.device_type() == nb::device::cuda::value;
  const std::string device = on_cpu ? "cpu" : on_cuda ? "cuda:" + std::to_string(given.device_id()) : "an unsupported device";
  const std::string came = kvtrim::detail::cat(dtype_name(type), " ", shape, " on ", device);
  if (given.ndim() != rank)
    kvtrim::detail::fail(function, argument, kvtrim::detail::cat("a ", rank, "-d array ", layout), came);
  if (integers) {  // int32 counts (Cache.truncate's drop)
    if (type.lanes != 1 || code != nb::dlpack::dtype_code::Int || type.bits != 32)
      kvtrim::detail::fail(function, argument, kvtrim::detail::cat("int32 elements (", layout, ")"), came);
    result.type = kp::element_type::i32;
  } else if (type.lanes != 1) {
    kvtrim::detail::fail(function, argument, "float32, float16 or bfloat16 elements", came);
  } else if (code == nb::dlpack::dtype_code::Float && type.bits == 32)
    result.type = kp::element_type::f32;
  else if (code == nb::dlpack::dtype_code::Float && type.bits == 16)
    result.type = kp::element_type::f16;
  else if (code == nb::dlpack::dtype_code::Bfloat && type.bits == 16)
    result.type = kp::element_type::bf16;
  else
    kvtrim::detail::fail(function, argument, "float32, float16 or bfloat16 elements", came);
  if (!on_cpu && !on_cuda) kvtrim::detail::fail(function, argument, "an array on the cpu or a cuda device", came);
  result.on_device = on_cuda;
  result.device_id = given.device_id();
  result.data = const_cast<void*>(static_cast<const void*>(given.data()));
  result.rank = rank;
  for (std::size_t axis = 0; axis < rank; ++axis) {
    result.extents[axis] = static_cast<std::int64_t>(given.shape(axis));
    result.strides[axis] = given.stride(axis);
  }
  // A dimension of extent 1 is never stepped along, so its stride says nothing, and
  // DLPack producers disagree on it: torch calls a [B, H, 1, D] view contiguous
  // whatever its token stride, and HF's one-token keys (out of RoPE) and values (a
  // transposed projection) differ exactly there. The canonical value (the next
  // dimension's stride × extent) makes arrays that address the same elements the
  // same to kvtrim, whose CUDA ragged writes require keys and values to share every
  // stride (backend/cuda/writes.cuh check_rows; contiguous.cuh compares only extents > 1).
  for (std::size_t axis = rank; axis-- > 0;)
    if (result.extents[axis] == 1)
      result.strides[axis] = axis + 1 < rank ? result.strides[axis + 1] * result.extents[axis + 1] : 1;
  return result;
}

/// One array of the one-step-late eviction metric's carry (eviction.hpp's carry_vector): a contiguous
/// 1-d float32 (queries, normaliser) or int64 (next) array on the cpu, else kvtrim::error; None: not given.
kp::evicting::carry_vector to_carry(std::string_view function, std::string_view argument,
                                    const std::optional<output_array>& given, bool int64) {
  if (!given) return {};
  const output_array& a = *given;
  const nb::dlpack::dtype type = a.dtype();
  const auto code = static_cast<nb::dlpack::dtype_code>(type.code);
  const bool on_cpu = a.device_type() == nb::device::cpu::value;
  const bool typed = type.lanes == 1 && (int64 ? code == nb::dlpack::dtype_code::Int && type.bits == 64
                                               : code == nb::dlpack::dtype_code::Float && type.bits == 32);
  if (a.ndim() != 1 || !typed || !on_cpu || (a.shape(0) > 1 && a.stride(0) != 1)) {
    std::string shape = "[";
    for (std::size_t axis = 0; axis < a.ndim(); ++axis) shape += (axis ? ", " : "") + std::to_string(a.shape(axis));
    shape += "]";
    const bool contiguous = a.ndim() != 1 || a.shape(0) <= 1 || a.stride(0) == 1;
    kvtrim::detail::fail(function, argument,
                         kvtrim::detail::cat("a contiguous 1-d ", int64 ? "int64" : "float32", " array on the cpu"),
                         kvtrim::detail::cat(dtype_name(type), " ", shape, contiguous ? "" : " (strided)", " on ",
                                             on_cpu ? "cpu" : "another device"));
  }
  return {const_cast<void*>(static_cast<const void*>(a.data())), static_cast<std::int64_t>(a.shape(0)), true};
}
kp::evicting::carry_arrays to_carry(std::string_view function, const std::optional<output_array>& queries,
                                    const std::optional<output_array>& normaliser,
                                    const std::optional<output_array>& next) {
  return {to_carry(function, "carry_queries", queries, false), to_carry(function, "carry_normaliser", normaliser, false),
          to_carry(function, "carry_next", next, true)};
}

/// The Python-side object: one kvtrim cache of one compiled scheme.
///
/// Every call into the cache runs with the GIL released (a decode step of one layer may overlap
/// another layer's on other threads) and with this cache's mutex held: the typed cache has no lock
/// of its own (its scratch buffers, its kept-index record and its storage are shared by every call),
/// so two Python threads on one cache would otherwise race — an attend reading what a compress is
/// rewriting, two attends sharing one scratch buffer, kept() copying the selection a compress is
/// replacing. The mutex is taken after the GIL is released, never while holding it, so a thread
/// waiting for it never blocks one that needs the GIL to return.
class py_cache {
 public:
  py_cache(const kp::settings& s, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t head_dim,
           std::int64_t batch, std::int64_t capacity) {
    const kp::scheme_key key{s.device, s.layout, s.scorer, s.budget, s.codec};
    const auto found = schemes().find(key);
    const std::string asked = kvtrim::detail::cat("device=", s.device, " layout=", s.layout, " scorer=", s.scorer,
                                                  " budget=", s.budget, " codec=", s.codec);
    if (found == schemes().end() && s.device == "cuda") {
#ifndef KVTRIM_PYTHON_CUDA
      kvtrim::detail::fail("kvtrim.Cache", "scheme",
                           "a CPU scheme: this kvtrim was built without CUDA (no CUDA toolkit at build time; "
                           "KVTRIM_CUDA=ON pip install . with nvcc on PATH builds the CUDA list)",
                           asked);
#endif
      const kp::scheme_key on_cpu{"cpu", s.layout, s.scorer, s.budget, s.codec};
      if (s.codec == "low_rank")
        kvtrim::detail::fail("kvtrim.Cache", "scheme",
                             "a compiled CUDA low_rank scheme: LowRank (profile or sequence bases) with StreamingLLM, SnapKV, "
                             "Ada-SnapKV and RazorAttention on the flat layout (this scheme runs with device=\"cpu\")",
                             asked);
      if (schemes().count(on_cpu) != 0)
        kvtrim::detail::fail("kvtrim.Cache", "scheme",
                             kvtrim::detail::cat("a compiled CUDA scheme: fp16/bf16 take every scorer and budget; int8, "
                                                 "int4, fp8 and layered<int4> are compiled with StreamingLLM, SnapKV, "
                                                 "Ada-SnapKV and RazorAttention on flat and paged layouts, low_rank "
                                                 "with those on flat (this scheme runs with device=\"cpu\")"),
                             asked);
    }
    if (found == schemes().end())
      kvtrim::detail::fail("kvtrim.Cache", "scheme",
                           "one of the compiled schemes (kvtrim.schemes() lists them; contiguous layouts take "
                           "uniform and pyramid budgets and the codecs fp16/bf16/fp32/int8 only; CPU int4, fp8, "
                           "low_rank, layered<int8|int4>: every scorer and budget on flat, StreamingLLM/SnapKV/"
                           "Ada-SnapKV/RazorAttention on paged (not low_rank); CUDA: fp16/bf16 with every scorer "
                           "and budget, fp32 for StreamingLLM/uniform/contiguous, int8/int4/fp8/layered<int4> with "
                           "StreamingLLM/SnapKV/Ada-SnapKV/RazorAttention on flat and paged, low_rank (profile bases) "
                           "with those on flat)",
                           asked);
    impl_ = found->second(s, kvtrim::model_shape{q_heads, kv_heads, head_dim}, batch, capacity);
  }

  void compress(const input_array& keys, const input_array& values, const std::optional<input_array>& window_queries,
                const std::optional<input_array>& scores, const std::optional<input_array>& lse,
                const std::optional<std::vector<std::int64_t>>& lengths, std::uintptr_t stream) {
    constexpr std::string_view function = "kvtrim.Cache.compress";
    const auto k = to_array(function, "keys", keys, 4, "[batch, kv_heads, tokens, head_dim]");
    const auto v = to_array(function, "values", values, 4, "[batch, kv_heads, tokens, head_dim]");
    std::optional<kp::array> q;
    if (window_queries) q = to_array(function, "window_queries", *window_queries, 4, "[batch, q_heads, window, head_dim]");
    std::optional<kp::array> s;
    if (scores) s = to_array(function, "scores", *scores, 3, "[batch, kv_heads, tokens] of float32 scores");
    std::optional<kp::array> l;
    if (lse) l = to_array(function, "lse", *lse, 3, "[batch, q_heads, window] of float32 softmax normalisers");
    nb::gil_scoped_release release;
    const auto held = lock();
    impl_->compress(k, v, q ? &*q : nullptr, s ? &*s : nullptr, l ? &*l : nullptr, lengths ? &*lengths : nullptr,
                    stream);
  }

  void append(const input_array& keys, const input_array& values, std::uintptr_t stream) {
    constexpr std::string_view function = "kvtrim.Cache.append";
    const auto k = to_array(function, "keys", keys, 4, "[batch, kv_heads, new_tokens, head_dim]");
    const auto v = to_array(function, "values", values, 4, "[batch, kv_heads, new_tokens, head_dim]");
    nb::gil_scoped_release release;
    const auto held = lock();
    impl_->append(k, v, stream);
  }

  void attend(const input_array& queries, const output_array& out, std::uintptr_t stream) {
    constexpr std::string_view function = "kvtrim.Cache.attend";
    // [B, Hq, D], or [B, Hq, L, D]: L new tokens per sequence (typed_cache::attend checks the rest).
    const std::size_t rank = queries.ndim() == 4 ? 4 : 3;
    constexpr std::string_view shapes = "[batch, q_heads, head_dim] or [batch, q_heads, new_tokens, head_dim]";
    const auto q = to_array(function, "queries", queries, rank, shapes);
    const auto o = to_array(function, "out", out, rank, "of the queries' rank");
    nb::gil_scoped_release release;
    const auto held = lock();
    impl_->attend(q, o, stream);
  }

  void truncate(const input_array& drop, std::uintptr_t stream) {
    constexpr std::string_view function = "kvtrim.Cache.truncate";
    const auto d = to_array(function, "drop", drop, 1, "[batch] counts", /*integers=*/true);
    nb::gil_scoped_release release;
    const auto held = lock();
    impl_->truncate(d, stream);
  }

  void set_basis(const input_array& key_bases, const input_array& value_bases, std::uintptr_t stream) {
    constexpr std::string_view function = "kvtrim.Cache.set_basis";
    const auto k = to_array(function, "key_bases", key_bases, 3, "[kv_heads, head_dim, rank]");
    const auto v = to_array(function, "value_bases", value_bases, 3, "[kv_heads, head_dim, rank]");
    nb::gil_scoped_release release;
    const auto held = lock();
    impl_->set_basis(k, v, stream);
  }

  double attend_seconds_from_cxx(const input_array& queries, const output_array& out, std::uintptr_t stream,
                                 std::int64_t calls) {
    constexpr std::string_view function = "kvtrim.Cache._attend_seconds_from_cxx";
    const auto q = to_array(function, "queries", queries, 3, "[batch, q_heads, head_dim]");
    const auto o = to_array(function, "out", out, 3, "[batch, q_heads, head_dim]");
    nb::gil_scoped_release release;
    const auto held = lock();
    return impl_->attend_seconds_from_cxx(q, o, stream, calls);
  }

  kp::cache_base& impl() { return *impl_; }
  /// This cache's lock (see the class comment): take it only with the GIL released.
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mutex_); }

 private:
  std::unique_ptr<kp::cache_base> impl_;
  std::mutex mutex_;
};

/// `call(cache.impl())` with the GIL released and the cache's lock held (py_cache's comment); its result is
/// a C++ value, turned into Python objects by the caller once the GIL is back.
template <class Call>
auto locked(py_cache& cache, Call&& call) {
  nb::gil_scoped_release release;
  const auto held = cache.lock();
  return call(cache.impl());
}

nb::ndarray<nb::numpy, float> float_matrix(std::vector<float> data, std::size_t rows, std::size_t columns) {
  auto* owned = new std::vector<float>(std::move(data));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  return nb::ndarray<nb::numpy, float>(owned->data(), {rows, columns}, owner);
}

template <class T>
nb::ndarray<nb::numpy, T> vector_array(std::vector<T> data) {
  auto* owned = new std::vector<T>(std::move(data));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), {owned->size()}, owner);
}

// ---- a direct C++ call path (tests compare the registry's results with it) ----------

/// compress → append → attend through the statically named scheme, no registry,
/// no settings: what a C++ caller writes (tests/test_direct.py).
template <class Scheme>
nb::tuple direct_run(const typename Scheme::config& cfg, nb::ndarray<const float, nb::ndim<4>, nb::c_contig> keys,
                     nb::ndarray<const float, nb::ndim<4>, nb::c_contig> values,
                     nb::ndarray<const float, nb::ndim<4>, nb::c_contig> window_queries,
                     nb::ndarray<const float, nb::ndim<4>, nb::c_contig> new_keys,
                     nb::ndarray<const float, nb::ndim<4>, nb::c_contig> new_values,
                     nb::ndarray<const float, nb::ndim<3>, nb::c_contig> queries, std::int64_t q_heads,
                     auto room) {
  namespace kt = kvtrim;
  const std::int64_t batch = static_cast<std::int64_t>(keys.shape(0)), kv_heads = static_cast<std::int64_t>(keys.shape(1));
  const std::int64_t tokens = static_cast<std::int64_t>(keys.shape(2)), dim = static_cast<std::int64_t>(keys.shape(3));
  const kt::model_shape shape{q_heads, kv_heads, dim};
  auto cache = Scheme::make_cache(shape, batch, room);
  const auto view4 = [](const auto& a) {
    return kt::make_view(a.data(), std::array<std::int64_t, 4>{static_cast<std::int64_t>(a.shape(0)), static_cast<std::int64_t>(a.shape(1)),
                                                                static_cast<std::int64_t>(a.shape(2)), static_cast<std::int64_t>(a.shape(3))});
  };
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg) + 256);
  void* aligned = scratch.data();
  std::size_t space = scratch.size();
  std::align(256, space - 256, aligned, space);
  if constexpr (Scheme::scorer::needs_queries)
    Scheme::compress(view4(keys), view4(values), view4(window_queries), cache.view(), cfg, kt::workspace{aligned, space});
  else
    Scheme::compress(view4(keys), view4(values), cache.view(), cfg, kt::workspace{aligned, space});
  if (new_keys.shape(2) > 0) Scheme::append(cache.view(), view4(new_keys), view4(new_values));
  std::vector<float> out(static_cast<std::size_t>(batch * q_heads * dim));
  std::vector<std::byte> attend_scratch(Scheme::attend_workspace(cache.view()) + 256);
  aligned = attend_scratch.data();
  space = attend_scratch.size();
  std::align(256, space - 256, aligned, space);
  Scheme::attend(kt::make_view(queries.data(), std::array<std::int64_t, 3>{batch, q_heads, dim}), cache.view(),
                 kt::make_view(out.data(), std::array<std::int64_t, 3>{batch, q_heads, dim}), kt::workspace{aligned, space});
  std::vector<std::int64_t> lengths;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) lengths.push_back(cache.view().head_length(b, h));
  return nb::make_tuple(float_matrix(std::move(out), static_cast<std::size_t>(batch * q_heads), static_cast<std::size_t>(dim)),
                        vector_array(std::move(lengths)));
}

#ifdef KVTRIM_PYTHON_PROFILES
// ---- kvtrim.LowRankProfile (io::low_rank_profile) and Cache.load_low_rank_profile ----

using low_rank_profile = kvtrim::io::low_rank_profile;

void check_profile_layer(std::string_view function, const low_rank_profile& profile, std::int64_t layer) {
  if (layer < 0 || layer >= profile.layers)
    kvtrim::detail::fail(function, "layer", kvtrim::detail::cat("a layer of the profile in [0, ", profile.layers, ")"),
                         std::to_string(layer));
}
void check_profile_head(std::string_view function, const low_rank_profile& profile, std::int64_t layer,
                        std::int64_t kv_head) {
  check_profile_layer(function, profile, layer);
  if (kv_head < 0 || kv_head >= profile.kv_heads)
    kvtrim::detail::fail(function, "kv_head", kvtrim::detail::cat("a kv head in [0, ", profile.kv_heads, ")"),
                         std::to_string(kv_head));
}

std::string path_of(nb::handle path) {  // str or os.PathLike
  return nb::cast<std::string>(nb::module_::import_("os").attr("fspath")(path));
}

/// One sample array of calibrate_layer: [batch, kv_heads, tokens, head_dim] of float32, float16 or bfloat16 on
/// the cpu, with at least one token.
kp::array sample_array(std::string_view function, std::string_view argument, const low_rank_profile& profile,
                       const input_array& given) {
  const kp::array a = to_array(function, argument, given, 4, "[batch, kv_heads, tokens, head_dim]");
  if (a.on_device || a.extents[1] != profile.kv_heads || a.extents[3] != profile.head_dim || a.extents[0] < 1 ||
      a.extents[2] < 1)
    kvtrim::detail::fail(function, argument,
                         kvtrim::detail::cat("an array [batch, ", profile.kv_heads, ", tokens, ", profile.head_dim,
                                             "] on the cpu (the profile's kv_heads and head_dim; at least one token)"),
                         a.describe());
  return a;
}

/// `a` as a view of T, every element finite (a NaN would make every basis of its head NaN).
template <class T>
kvtrim::tensor_view<const T, 4> sample_view(std::string_view function, std::string_view argument, const kp::array& a) {
  const kvtrim::tensor_view<const T, 4> view{static_cast<const T*>(a.data),
                                             {a.extents[0], a.extents[1], a.extents[2], a.extents[3]},
                                             {a.strides[0], a.strides[1], a.strides[2], a.strides[3]}};
  for (std::int64_t b = 0; b < a.extents[0]; ++b)
    for (std::int64_t h = 0; h < a.extents[1]; ++h)
      for (std::int64_t t = 0; t < a.extents[2]; ++t)
        for (std::int64_t d = 0; d < a.extents[3]; ++d)
          if (!std::isfinite(kvtrim::to_float(view(b, h, t, d))))
            kvtrim::detail::fail(function, argument, "finite entries",
                                 kvtrim::detail::cat("NaN or Inf at [", b, ", ", h, ", ", t, ", ", d, "]"));
  return view;
}

void calibrate_profile_layer(low_rank_profile& self, std::int64_t layer, const input_array& sample_keys,
                             const input_array& sample_values, nb::handle codec) {
  constexpr std::string_view function = "kvtrim.LowRankProfile.calibrate_layer";
  check_profile_layer(function, self, layer);
  // The codec's rank / energy / max_rank as a Cache with that codec reads them: LowRank._fill → settings →
  // convert::codec (binding.hpp), the Cache constructor's conversion.
  const nb::object low_rank_type = nb::module_::import_("kvtrim.presses").attr("LowRank");
  const int is_low_rank = PyObject_IsInstance(codec.ptr(), low_rank_type.ptr());
  if (is_low_rank < 0) throw nb::python_error();
  if (is_low_rank == 0)
    kvtrim::detail::fail(function, "codec", "a kvtrim.LowRank codec (its rank, energy and max_rank pick the ranks)",
                         nb::repr(codec).c_str());
  kp::settings settings;
  codec.attr("_fill")(nb::cast(&settings, nb::rv_policy::reference));
  const kvtrim::codec::low_rank::config cfg =
      kp::convert::codec(std::type_identity<kvtrim::codec::low_rank>{}, settings);
  cfg.validate(function, self.head_dim);
  const bool pre_rope = self.keys == kvtrim::codec::key_space::pre_rope;
  if ((cfg.keys == kvtrim::codec::key_space::pre_rope) != pre_rope)
    kvtrim::detail::fail(function, "codec",
                         pre_rope ? "LowRank(pre_rope=True), as the profile's pre_rope keys"
                                  : "LowRank(pre_rope=False), as the profile's post_rope keys",
                         pre_rope ? "LowRank(pre_rope=False)" : "LowRank(pre_rope=True)");
  const kp::array keys = sample_array(function, "sample_keys", self, sample_keys);
  const kp::array values = sample_array(function, "sample_values", self, sample_values);
  if (values.type != keys.type || values.extents != keys.extents)
    kvtrim::detail::fail(function, "sample_values",
                         kvtrim::detail::cat("the sample keys' element type and shape, ", kp::name_of(keys.type), " [",
                                             keys.extents[0], ", ", keys.extents[1], ", ", keys.extents[2], ", ",
                                             keys.extents[3], "]"),
                         values.describe());
  const auto calibrate = [&]<class T>(std::type_identity<T>) {
    const auto k = sample_view<T>(function, "sample_keys", keys);
    const auto v = sample_view<T>(function, "sample_values", values);
    nb::gil_scoped_release release;
    self.calibrate_layer(layer, k, v, cfg);  // the samples widened exactly to double, as from float32
  };
  switch (keys.type) {
    case kp::element_type::f16: calibrate(std::type_identity<kvtrim::half>{}); break;
    case kp::element_type::bf16: calibrate(std::type_identity<kvtrim::bfloat16>{}); break;
    default: calibrate(std::type_identity<float>{}); break;
  }
}

/// Layer `layer` of `profile` as the cache's load_low_rank_profile takes it (pointers into the profile).
kp::profile_layer profile_layer_of(const low_rank_profile& profile, std::int64_t layer) {
  kp::profile_layer result;
  result.layers = profile.layers;
  result.kv_heads = profile.kv_heads;
  result.head_dim = profile.head_dim;
  result.layer = layer;
  result.pre_rope = profile.keys == kvtrim::codec::key_space::pre_rope;
  if (layer < 0 || layer >= profile.layers) return result;  // the cache refuses the layer
  for (std::int64_t h = 0; h < profile.kv_heads; ++h) {
    const low_rank_profile::head_basis& basis = profile.at(layer, h);
    result.heads.push_back({basis.key_basis.data(), basis.key_rank, basis.key_basis.size(), basis.value_basis.data(),
                            basis.value_rank, basis.value_basis.size()});
  }
  return result;
}

/// One basis for LowRankProfile.set_bases: float32 [head_dim, rank] on the cpu, 1 ≤ rank ≤ head_dim, finite,
/// orthonormal columns (the codec's 1e-3); returned row-major.
std::vector<float> profile_basis(std::string_view function, std::string_view argument, const low_rank_profile& profile,
                                 const input_array& given) {
  const kp::array a = to_array(function, argument, given, 2, "[head_dim, rank]");
  if (a.type != kp::element_type::f32 || a.on_device || a.extents[0] != profile.head_dim || a.extents[1] < 1 ||
      a.extents[1] > profile.head_dim)
    kvtrim::detail::fail(function, argument,
                         kvtrim::detail::cat("a float32 array [", profile.head_dim, ", rank] on the cpu with rank 1 to ",
                                             profile.head_dim),
                         a.describe());
  const std::int64_t dim = a.extents[0], rank = a.extents[1];
  std::vector<float> rows(static_cast<std::size_t>(dim * rank));
  const auto* data = static_cast<const float*>(a.data);
  for (std::int64_t d = 0; d < dim; ++d)
    for (std::int64_t j = 0; j < rank; ++j)
      rows[static_cast<std::size_t>(d * rank + j)] = data[d * a.strides[0] + j * a.strides[1]];
  const std::optional<double> deviation = kp::basis_deviation(rows.data(), dim, rank);
  if (!deviation) kvtrim::detail::fail(function, argument, "finite entries", "NaN or Inf");
  if (*deviation > 1e-3)
    kvtrim::detail::fail(function, argument, "orthonormal columns (|UᵀU − I| ≤ 1e-3)",
                         kvtrim::detail::cat("|UᵀU − I| = ", *deviation));
  return rows;
}
#endif

}  // namespace

NB_MODULE(_kvtrim, m) {
  m.doc() = "kvtrim's compiled core: type-erased caches over an explicit list of kvtrim schemes";

  // kvtrim::error → kvtrim.Error (a ValueError) with the C++ message.
  static nb::exception<kvtrim::error> error(m, "Error", PyExc_ValueError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const kp::not_implemented& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    }
  });

  m.attr("version") = nb::make_tuple(kvtrim::version_major, kvtrim::version_minor, kvtrim::version_patch);
#ifdef KVTRIM_PYTHON_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
#ifdef KVTRIM_PYTHON_PROFILES
  m.attr("has_profiles") = true;
#else
  m.attr("has_profiles") = false;
#endif

  m.def("schemes", [] {
    std::vector<std::tuple<std::string, std::string, std::string, std::string, std::string>> result;
    for (const auto& [key, make] : schemes()) result.emplace_back(key.device, key.layout, key.scorer, key.budget, key.codec);
    return result;
  }, "Every compiled scheme as (device, layout, scorer, budget, codec).");

  nb::class_<kp::settings>(m, "Settings", "Every runtime knob of a scheme (filled by the presses and codecs).")
      .def(nb::init<>())
      .def_rw("device", &kp::settings::device)
      .def_rw("layout", &kp::settings::layout)
      .def_rw("scorer", &kp::settings::scorer)
      .def_rw("budget", &kp::settings::budget)
      .def_rw("codec", &kp::settings::codec)
      .def_rw("compression_ratio", &kp::settings::compression_ratio)
      .def_rw("keep_tokens", &kp::settings::keep_tokens)
      .def_rw("sinks", &kp::settings::sinks)
      .def_rw("windows", &kp::settings::windows)
      .def_rw("window", &kp::settings::window)
      .def_rw("kernel", &kp::settings::kernel)
      .def_rw("pooling", &kp::settings::pooling)
      .def_rw("reduction", &kp::settings::reduction)
      .def_rw("group", &kp::settings::group)
      .def_rw("recent_ratio", &kp::settings::recent_ratio)
      .def_rw("recent_tokens", &kp::settings::recent_tokens)
      .def_rw("protect_recent", &kp::settings::protect_recent)
      .def_rw("normalisation", &kp::settings::normalisation)
      .def_rw("retrieval", &kp::settings::retrieval)
      .def_rw("min_recent", &kp::settings::min_recent)
      .def_rw("recent_fraction", &kp::settings::recent_fraction)
      .def_rw("compensation", &kp::settings::compensation)
      .def_rw("alpha", &kp::settings::alpha)
      .def_rw("kvpress_compatible", &kp::settings::kvpress_compatible)
      .def_rw("pyramid_window", &kp::settings::pyramid_window)
      .def_rw("beta", &kp::settings::beta)
      .def_rw("layer", &kp::settings::layer)
      .def_rw("layers", &kp::settings::layers)
      .def_rw("key_group", &kp::settings::key_group)
      .def_rw("asymmetric", &kp::settings::asymmetric)
      .def_rw("fp8_scales", &kp::settings::fp8_scales)
      .def_rw("fp8_key_scale", &kp::settings::fp8_key_scale)
      .def_rw("fp8_value_scale", &kp::settings::fp8_value_scale)
      .def_rw("rank", &kp::settings::rank)
      .def_rw("energy", &kp::settings::energy)
      .def_rw("max_rank", &kp::settings::max_rank)
      .def_rw("update_freq", &kp::settings::update_freq)
      .def_rw("key_space", &kp::settings::key_space)
      .def_rw("rope_theta", &kp::settings::rope_theta)
      .def_rw("rotary_dim", &kp::settings::rotary_dim)
      .def_rw("rope_pairs", &kp::settings::rope_pairs)
      .def_rw("low_rank_source", &kp::settings::low_rank_source)
      .def_rw("layered_sinks", &kp::settings::layered_sinks)
      .def_rw("layered_recent", &kp::settings::layered_recent)
      .def_rw("page_size", &kp::settings::page_size)
      .def_rw("check", &kp::settings::check);

  nb::class_<py_cache>(m, "CacheImpl", "One kvtrim cache of one compiled scheme (wrapped by kvtrim.Cache).")
      .def(nb::init<const kp::settings&, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t>(),
           nb::arg("settings"), nb::arg("q_heads"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("batch"),
           nb::arg("capacity"))
      .def("compress", &py_cache::compress, nb::arg("keys"), nb::arg("values"), nb::arg("window_queries").none(),
           nb::arg("scores").none() = nb::none(), nb::arg("lse").none() = nb::none(),
           nb::arg("lengths").none() = nb::none(), nb::arg("stream") = 0)
      .def("append", &py_cache::append, nb::arg("keys"), nb::arg("values"), nb::arg("stream") = 0)
      .def("attend", &py_cache::attend, nb::arg("queries"), nb::arg("out"), nb::arg("stream") = 0)
      .def("truncate", &py_cache::truncate, nb::arg("drop"), nb::arg("stream") = 0)
      .def("set_basis", &py_cache::set_basis, nb::arg("key_bases"), nb::arg("value_bases"), nb::arg("stream") = 0)
      .def("low_rank", [](py_cache& self, std::int64_t b, std::int64_t h) {
        kp::low_rank_head head = locked(self, [&](kp::cache_base& impl) { return impl.low_rank(b, h); });
        const auto dim = static_cast<std::size_t>(head.head_dim);
        const auto key_rank = static_cast<std::size_t>(head.key_rank), value_rank = static_cast<std::size_t>(head.value_rank);
        const auto rows = static_cast<std::size_t>(head.tokens);
        nb::dict result;
        result["key_basis"] = float_matrix(std::move(head.key_basis), dim, key_rank);
        result["value_basis"] = float_matrix(std::move(head.value_basis), dim, value_rank);
        result["key_coefficients"] = float_matrix(std::move(head.key_coefficients), rows, key_rank);
        result["value_coefficients"] = float_matrix(std::move(head.value_coefficients), rows, value_rank);
        return result;
      }, nb::arg("b"), nb::arg("h"))
#ifdef KVTRIM_PYTHON_PROFILES
      .def("load_low_rank_profile", [](py_cache& self, const low_rank_profile& profile, std::int64_t layer,
                                       std::uintptr_t stream) {
        const kp::profile_layer bases = profile_layer_of(profile, layer);
        locked(self, [&](kp::cache_base& impl) { impl.load_low_rank_profile(bases, stream); });
      }, nb::arg("profile"), nb::arg("layer"), nb::arg("stream") = 0)
#endif
      .def("_attend_seconds_from_cxx", &py_cache::attend_seconds_from_cxx, nb::arg("queries"), nb::arg("out"),
           nb::arg("stream"), nb::arg("calls"),
           "Host seconds per C++ Scheme::attend call, `calls` calls in a loop (bench/python_overhead.py's baseline).")
      .def("head_lengths", [](py_cache& self) {
        return vector_array(locked(self, [](kp::cache_base& impl) { return impl.head_lengths(); }));
      })
      .def("kept", [](py_cache& self) {
        auto kept = locked(self, [](kp::cache_base& impl) { return impl.kept(); });
        return nb::make_tuple(vector_array(std::move(kept.offsets)), vector_array(std::move(kept.tokens)));
      })
      .def("positions", [](py_cache& self) {
        return vector_array(locked(self, [](kp::cache_base& impl) { return impl.positions(); }));
      })
      .def("read", [](py_cache& self, std::int64_t b, std::int64_t h) {
        auto [keys, values] = locked(self, [&](kp::cache_base& impl) { return impl.read_head(b, h); });
        const auto dim = static_cast<std::size_t>(self.impl().shape().head_dim);
        const std::size_t rows = keys.size() / dim;
        return nb::make_tuple(float_matrix(std::move(keys), rows, dim), float_matrix(std::move(values), rows, dim));
      }, nb::arg("b"), nb::arg("h"))
      .def("check_status", [](py_cache& self) {
        locked(self, [](kp::cache_base& impl) { impl.check_status(); });  // it waits for the stream: GIL released
      }, "Raises kvtrim.Error for a refusal a device paged/flat cache recorded since the last check.")
      .def("stats", [](py_cache& self) {
        const kp::stats_result s = locked(self, [](kp::cache_base& impl) { return impl.stats(); });
        nb::dict result;
        result["codec"] = s.codec;
        result["head_dim"] = s.head_dim;
        result["bytes_per_token"] = s.bytes_per_token;
        result["bytes_per_head"] = s.bytes_per_head;
        result["kept"] = s.kept;
        result["bytes"] = s.bytes;
        result["total_bytes"] = s.total_bytes;
        result["fp16_bytes"] = s.fp16_bytes;
        result["ratio"] = s.ratio;
        result["allocated_bytes"] = s.allocated_bytes;
        result["table"] = s.table;
        return result;
      })
      .def_prop_ro("bytes", [](py_cache& self) { return self.impl().bytes(); })
      .def_prop_ro("batch", [](py_cache& self) { return self.impl().batch(); })
      .def_prop_ro("input_dtype", [](py_cache& self) { return std::string(kp::name_of(self.impl().input_type())); })
      .def_prop_ro("needs_queries", [](py_cache& self) { return self.impl().needs_queries(); })
      .def_prop_ro("needs_scores", [](py_cache& self) { return self.impl().needs_scores(); })
      .def_prop_ro("name", [](py_cache& self) { return self.impl().name(); });

  // Decode-time eviction (issue 16; python/kvtrim/eviction.py wraps these; CPU and CUDA, paged, fp16: eviction.hpp).
  namespace ke = kp::evicting;
  m.def("_eviction_metric_slots", [](py_cache& cache) {
    return locked(cache, [](kp::cache_base& impl) { return ke::metric_slots(impl); });
  }, nb::arg("cache"));
  // carry_*: the metric one step late (CPU caches only; eviction.hpp's carry_arrays): all three or none.
  m.def("_eviction_seed", [](py_cache& cache, const input_array& keys, const input_array& window_queries,
                             std::int64_t start_position, const output_array& metric, const ke::metric_settings& settings,
                             std::uintptr_t stream, const std::optional<output_array>& carry_queries,
                             const std::optional<output_array>& carry_normaliser,
                             const std::optional<output_array>& carry_next) {
    constexpr std::string_view function = "kvtrim.Eviction.seed";
    const auto k = to_array(function, "keys", keys, 4, "[batch, kv_heads, tokens, head_dim]");
    const auto q = to_array(function, "window_queries", window_queries, 4, "[batch, q_heads, window, head_dim]");
    const auto out = to_array(function, "metric", metric, 1, "[slots] of float32");
    const auto carry = to_carry(function, carry_queries, carry_normaliser, carry_next);
    nb::gil_scoped_release release;
    const auto held = cache.lock();
    ke::seed(cache.impl(), k, q, start_position, out, settings, stream, carry);
  }, nb::arg("cache"), nb::arg("keys"), nb::arg("window_queries"), nb::arg("start_position"), nb::arg("metric"),
     nb::arg("settings"), nb::arg("stream") = 0, nb::arg("carry_queries") = nb::none(),
     nb::arg("carry_normaliser") = nb::none(), nb::arg("carry_next") = nb::none());
  m.def("_eviction_attend", [](py_cache& cache, const input_array& queries, const output_array& out,
                               const output_array& metric, const ke::metric_settings& settings, std::uintptr_t stream,
                               const std::optional<output_array>& carry_queries,
                               const std::optional<output_array>& carry_normaliser,
                               const std::optional<output_array>& carry_next) {
    constexpr std::string_view function = "kvtrim.Eviction.attend";
    const auto q = to_array(function, "queries", queries, 3, "[batch, q_heads, head_dim]");
    const auto o = to_array(function, "out", out, 3, "[batch, q_heads, head_dim]");
    const auto m = to_array(function, "metric", metric, 1, "[slots] of float32");
    const auto carry = to_carry(function, carry_queries, carry_normaliser, carry_next);
    nb::gil_scoped_release release;
    const auto held = cache.lock();
    ke::attend(cache.impl(), q, o, m, settings, stream, carry);
  }, nb::arg("cache"), nb::arg("queries"), nb::arg("out"), nb::arg("metric"), nb::arg("settings"), nb::arg("stream") = 0,
     nb::arg("carry_queries") = nb::none(), nb::arg("carry_normaliser") = nb::none(), nb::arg("carry_next") = nb::none());
  m.def("_eviction_flush_metric", [](py_cache& cache, const output_array& metric, const ke::metric_settings& settings,
                                     const std::optional<output_array>& carry_queries,
                                     const std::optional<output_array>& carry_normaliser,
                                     const std::optional<output_array>& carry_next) {
    constexpr std::string_view function = "kvtrim.Eviction.flush";
    const auto m = to_array(function, "metric", metric, 1, "[slots] of float32");
    const auto carry = to_carry(function, carry_queries, carry_normaliser, carry_next);
    nb::gil_scoped_release release;
    const auto held = cache.lock();
    ke::flush_metric(cache.impl(), m, settings, carry);
  }, nb::arg("cache"), nb::arg("metric"), nb::arg("settings"), nb::arg("carry_queries").none(),
     nb::arg("carry_normaliser").none(), nb::arg("carry_next").none());
  m.def("_eviction_step", [](const std::vector<py_cache*>& caches, const std::vector<output_array>& metrics,
                             const ke::step_settings& settings, std::uintptr_t stream) {
    std::vector<kp::cache_base*> layers;
    std::vector<kp::array> buffers;
    for (py_cache* cache : caches) {
      if (cache == nullptr) kvtrim::detail::fail("kvtrim.Eviction.step", "caches", "a cache per layer", "None");
      layers.push_back(&cache->impl());
    }
    for (const auto& metric : metrics)
      buffers.push_back(to_array("kvtrim.Eviction.step", "metrics", metric, 1, "[slots] of float32"));
    kvtrim::eviction::report report;
    {
      nb::gil_scoped_release release;
      // Every layer's lock (py_cache's comment), each cache once, in address order: two steps over
      // overlapping lists of caches cannot deadlock.
      std::vector<py_cache*> distinct(caches.begin(), caches.end());
      std::sort(distinct.begin(), distinct.end(), std::less<py_cache*>());
      distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
      std::vector<std::unique_lock<std::mutex>> held;
      held.reserve(distinct.size());
      for (py_cache* cache : distinct) held.push_back(cache->lock());
      report = ke::step(layers, buffers, settings, stream);
    }
    nb::dict result;
    result["evicted_tokens"] = report.evicted_tokens;
    result["freed_pages"] = report.freed_pages;
    result["units_evicted"] = report.units_evicted;
    result["units_over_target"] = report.units_over_target;
    return result;
  }, nb::arg("caches"), nb::arg("metrics"), nb::arg("settings"), nb::arg("stream") = 0);
  nb::class_<ke::metric_settings>(m, "EvictionMetricSettings")
      .def(nb::init<>())
      .def_rw("kind", &ke::metric_settings::kind)
      .def_rw("protected_window", &ke::metric_settings::protected_window);
  nb::class_<ke::step_settings>(m, "EvictionStepSettings")
      .def(nb::init<>())
      .def_rw("scope", &ke::step_settings::scope)
      .def_rw("keep", &ke::step_settings::keep)
      .def_rw("interval", &ke::step_settings::interval)
      .def_rw("sinks", &ke::step_settings::sinks)
      .def_rw("protected_window", &ke::step_settings::protected_window)
      .def_rw("alpha", &ke::step_settings::alpha);

  // The direct path for tests: two statically named schemes (also in the registry).
  namespace kt = kvtrim;
  using streaming = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp32,
                               kt::backend::cpu>;
  using adakv = kt::scheme<kt::layout::flat, kt::score::snapkv, kt::budget::adaptive, kt::codec::fp16, kt::backend::cpu>;
  m.def("_direct_streaming",
        [](std::int64_t sinks, std::int64_t keep, nb::ndarray<const float, nb::ndim<4>, nb::c_contig> keys,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> values,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> new_keys,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> new_values,
           nb::ndarray<const float, nb::ndim<3>, nb::c_contig> queries, std::int64_t q_heads, std::int64_t capacity) {
          streaming::config cfg;
          cfg.score.sinks = sinks;
          cfg.budget.keep = kt::keep_tokens{keep};
          return direct_run<streaming>(cfg, keys, values, keys, new_keys, new_values, queries, q_heads, capacity);
        });
  m.def("_direct_adakv",
        [](double compression_ratio, double alpha, std::int64_t window, std::int64_t kernel,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> keys, nb::ndarray<const float, nb::ndim<4>, nb::c_contig> values,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> window_queries,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> new_keys,
           nb::ndarray<const float, nb::ndim<4>, nb::c_contig> new_values,
           nb::ndarray<const float, nb::ndim<3>, nb::c_contig> queries, std::int64_t q_heads, std::int64_t slots) {
          adakv::config cfg;
          cfg.score = kt::kvpress::snapkv(window, kernel);
          cfg.budget = kt::kvpress::adakv(compression_ratio, alpha);
          return direct_run<adakv>(cfg, keys, values, window_queries, new_keys, new_values, queries, q_heads,
                                   kt::layout::flat::pool_size{.slots = slots});
        });

  // ---- RazorAttention calibration: probe → captured attention → retrieval heads ----
  using razor = kt::score::retrieval_head;
  nb::class_<razor::probe_config>(m, "Probe", "RazorAttention's calibration probe: BOS + `block` random ids, `repeats` times.")
      .def(nb::new_([](std::int64_t block, std::int64_t repeats, std::int32_t first_id, std::int32_t end_id,
                       std::int32_t bos_id, std::uint64_t seed) {
             razor::probe_config probe{block, repeats, first_id, end_id, bos_id, seed};
             probe.validate("kvtrim.Probe");
             return probe;
           }),
           nb::arg("block") = 2500, nb::arg("repeats") = 4, nb::arg("first_id") = 10000, nb::arg("end_id") = 12500,
           nb::arg("bos_id") = 1, nb::arg("seed") = 0)
      .def_rw("block", &razor::probe_config::block)
      .def_rw("repeats", &razor::probe_config::repeats)
      .def_rw("first_id", &razor::probe_config::first_id)
      .def_rw("end_id", &razor::probe_config::end_id)
      .def_rw("bos_id", &razor::probe_config::bos_id)
      .def_rw("seed", &razor::probe_config::seed)
      .def_prop_ro("length", &razor::probe_config::length)
      .def("tokens", [](const razor::probe_config& probe) { return vector_array(razor::make_probe(probe)); },
           "The probe's token ids (int32) for the model to run.");

  struct py_calibration {
    std::int64_t layers;
    kt::model_shape shape;
    razor::calibration impl;
  };
  nb::class_<py_calibration>(m, "Calibration",
                             "RazorAttention's head scores, accumulated from the attention the model computes on a Probe.")
      .def(nb::new_([](std::int64_t layers, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t head_dim,
                       const razor::probe_config& probe) {
             const kt::model_shape shape{q_heads, kv_heads, head_dim};
             return py_calibration{layers, shape, razor::calibration(layers, shape, probe)};
           }),
           nb::arg("layers"), nb::arg("q_heads"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("probe"))
      .def("accumulate",
           [](py_calibration& self, std::int64_t layer, nb::ndarray<nb::ro> attention, std::int64_t first_row) {
             const kp::array a = to_array("kvtrim.Calibration.accumulate", "attention", attention, 3,
                                          "[q_heads, rows, probe length] of probabilities");
             if (a.type != kp::element_type::f32 || a.on_device)
               kt::detail::fail("kvtrim.Calibration.accumulate", "attention", "a float32 array on the cpu", a.describe());
             const kt::tensor_view<const float, 3> view{static_cast<const float*>(a.data), {a.extents[0], a.extents[1], a.extents[2]},
                                                        {a.strides[0], a.strides[1], a.strides[2]}};
             self.impl.accumulate(layer, view, first_row);
           },
           nb::arg("layer"), nb::arg("attention"), nb::arg("first_row"),
           "Adds rows [first_row, first_row + rows) of one layer's attention on the probe.")
      .def("scores", [](const py_calibration& self) {
        const razor::head_scores scores = self.impl.scores();
        nb::dict result;
        result["echo"] = scores.echo_kv;
        result["induction"] = scores.induction_kv;
        return result;
      }, "Echo and induction scores per (layer, kv head), flattened layer·kv_heads + h.")
#ifdef KVTRIM_PYTHON_PROFILES
      .def("profile",
           [](const py_calibration& self, double induction_fraction, double echo_fraction) {
             auto result = kt::io::profile::for_model({.layers = self.layers, .shape = self.shape});
             result.set_retrieval_heads(self.impl.scores(), {induction_fraction, echo_fraction}, self.impl.probe());
             return result;
           },
           nb::arg("induction_fraction") = 0.14, nb::arg("echo_fraction") = 0.01,
           "A profile whose retrieval heads are the top induction and echo heads (RazorAttention's selection).")
#endif
      ;

#ifdef KVTRIM_PYTHON_PROFILES
  nb::class_<kt::io::profile>(m, "Profile", "A calibration profile (kvtrim::io::profile, versioned JSON).")
      .def_static("load", [](const std::string& path) { return kt::io::load_profile(path); }, nb::arg("path"))
      .def_static("parse", [](const std::string& text) { return kt::io::parse_profile(text); }, nb::arg("text"))
      .def("save", [](const kt::io::profile& self, const std::string& path) { kt::io::save_profile(self, path); },
           nb::arg("path"))
      .def_prop_ro("layers", [](const kt::io::profile& self) { return self.model.layers; })
      .def_prop_ro("q_heads", [](const kt::io::profile& self) { return self.model.shape.q_heads; })
      .def_prop_ro("kv_heads", [](const kt::io::profile& self) { return self.model.shape.kv_heads; })
      .def_prop_ro("head_dim", [](const kt::io::profile& self) { return self.model.shape.head_dim; })
      .def_prop_ro("positions", [](const kt::io::profile& self) { return std::string(kt::io::to_string(self.model.encoding)); })
      .def("retrieval", [](const kt::io::profile& self, std::int64_t layer) { return self.retrieval_config(layer).retrieval; },
           nb::arg("layer"), "RazorAttention's retrieval-head flags of `layer` (one per kv head).")
      .def_static("for_retrieval_heads",
                  [](const std::vector<std::vector<bool>>& flags, std::int64_t q_heads, std::int64_t head_dim) {
                    if (flags.empty()) kt::detail::fail("kvtrim.Profile.for_retrieval_heads", "flags", "at least one layer", "none");
                    const auto kv_heads = static_cast<std::int64_t>(flags.front().size());
                    auto result = kt::io::profile::for_model(
                        {.layers = static_cast<std::int64_t>(flags.size()), .shape = {q_heads, kv_heads, head_dim}});
                    for (std::size_t l = 0; l < flags.size(); ++l) {
                      if (static_cast<std::int64_t>(flags[l].size()) != kv_heads)
                        kt::detail::fail("kvtrim.Profile.for_retrieval_heads", kt::detail::cat("flags[", l, "]"),
                                         kt::detail::cat(kv_heads, " flags (one per kv head)"),
                                         kt::detail::cat(flags[l].size(), " flags"));
                      result.layers[l].retrieval = flags[l];
                    }
                    return result;
                  },
                  nb::arg("flags"), nb::arg("q_heads"), nb::arg("head_dim"),
                  "A profile holding only retrieval-head flags [layer][kv head] (RazorAttention without calibration data).");

  nb::class_<low_rank_profile>(
      m, "LowRankProfile",
      "Offline-calibrated low-rank bases for LowRank(source=\"profile\") caches (kvtrim::io::low_rank_profile,\n"
      "versioned JSON): one orthonormal key basis [head_dim, r_k] and value basis [head_dim, r_v] per (layer, kv head),\n"
      "ranks free to differ from head to head.\n\n"
      "Workflow (Palu / Eigen Attention style): capture sample K/V [B, H_kv, T, D] of each layer from a few prompts ->\n"
      "calibrate_layer(layer, keys, values, LowRank(...)) -> save(path); at serving time LowRankProfile.load(path) ->\n"
      "Cache(press, LowRank(..., source=\"profile\"), ..., layer=l).load_low_rank_profile(profile) -> compress,\n"
      "append, attend. A pre_rope profile is calibrated from pre-RoPE keys and loads only into LowRank(pre_rope=True)\n"
      "caches (a post_rope one only into pre_rope=False caches).")
      .def(nb::new_([](std::int64_t layers, std::int64_t kv_heads, std::int64_t head_dim, bool pre_rope) {
             return low_rank_profile::empty(layers, kv_heads, head_dim,
                                            pre_rope ? kt::codec::key_space::pre_rope : kt::codec::key_space::post_rope);
           }),
           nb::arg("layers"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("pre_rope") = false,
           "An empty profile (no bases yet: every head's ranks are 0 until calibrate_layer or set_bases).")
      .def("calibrate_layer", &calibrate_profile_layer, nb::arg("layer"), nb::arg("sample_keys"),
           nb::arg("sample_values"), nb::arg("codec"),
           "Fits layer `layer`'s bases from sample keys/values [B, kv_heads, T, head_dim] (float32, on the cpu; all\n"
           "B·T tokens of a kv head stacked): the top right singular vectors of each head's samples, as many as the\n"
           "codec's fixed `rank`, or the fewest reaching its `energy` (at most `max_rank`, else head_dim / 2) -- the\n"
           "fit LowRank(source=\"sequence\") makes at compress. `codec`: the kvtrim.LowRank the serving caches use\n"
           "(its pre_rope must match the profile's). Replaces the layer's bases.")
      .def("set_bases",
           [](low_rank_profile& self, std::int64_t layer, std::int64_t kv_head, const input_array& key_basis,
              const input_array& value_basis) {
             constexpr std::string_view function = "kvtrim.LowRankProfile.set_bases";
             check_profile_head(function, self, layer, kv_head);
             std::vector<float> keys = profile_basis(function, "key_basis", self, key_basis);
             std::vector<float> values = profile_basis(function, "value_basis", self, value_basis);
             low_rank_profile::head_basis& basis = self.at(layer, kv_head);
             basis.key_rank = static_cast<std::int64_t>(keys.size()) / self.head_dim;
             basis.key_basis = std::move(keys);
             basis.value_rank = static_cast<std::int64_t>(values.size()) / self.head_dim;
             basis.value_basis = std::move(values);
           },
           nb::arg("layer"), nb::arg("kv_head"), nb::arg("key_basis"), nb::arg("value_basis"),
           "Sets one head's bases: key_basis [head_dim, r_k], value_basis [head_dim, r_v] (float32, orthonormal\n"
           "columns to 1e-3; bases computed elsewhere, or a head's rank changed by hand).")
      .def("bases",
           [](const low_rank_profile& self, std::int64_t layer, std::int64_t kv_head) {
             check_profile_head("kvtrim.LowRankProfile.bases", self, layer, kv_head);
             const low_rank_profile::head_basis& basis = self.at(layer, kv_head);
             const auto dim = static_cast<std::size_t>(self.head_dim);
             return nb::make_tuple(float_matrix(basis.key_basis, dim, static_cast<std::size_t>(basis.key_rank)),
                                   float_matrix(basis.value_basis, dim, static_cast<std::size_t>(basis.value_rank)));
           },
           nb::arg("layer"), nb::arg("kv_head"),
           "(key_basis [head_dim, r_k], value_basis [head_dim, r_v]) of one head, float32 copies (rank 0: not\n"
           "calibrated yet).")
      .def("to_json",
           [](const low_rank_profile& self) {
             self.check("kvtrim.LowRankProfile.to_json", true);  // what from_json would refuse is not written
             return self.to_json().dump();
           },
           "The profile as JSON text (save's format). Every (layer, kv head) must have its bases.")
      .def_static("from_json",
                  [](const std::string& text) {
                    nlohmann::json parsed;
                    try {
                      parsed = nlohmann::json::parse(text);
                    } catch (const nlohmann::json::exception& e) {
                      kt::detail::fail("kvtrim.LowRankProfile.from_json", "text", "valid JSON", e.what());
                    }
                    return low_rank_profile::from_json(parsed);
                  },
                  nb::arg("text"), "A profile from to_json's text (its format, version, shape and ranks checked).")
      .def("save",
           [](const low_rank_profile& self, nb::handle path) {
             self.check("kvtrim.LowRankProfile.save", true);  // what load would refuse is not written
             self.save(path_of(path));
           },
           nb::arg("path"),
           "Writes the profile as JSON (float32 bases written exactly: load gives them back bit for bit). Every\n"
           "(layer, kv head) must have its bases (calibrate every layer first).")
      .def_static("load", [](nb::handle path) { return low_rank_profile::load(path_of(path)); }, nb::arg("path"),
                  "Reads a profile save wrote (its format, version, shape and ranks checked).")
      .def_prop_ro("layers", [](const low_rank_profile& self) { return self.layers; })
      .def_prop_ro("kv_heads", [](const low_rank_profile& self) { return self.kv_heads; })
      .def_prop_ro("head_dim", [](const low_rank_profile& self) { return self.head_dim; })
      .def_prop_ro("pre_rope", [](const low_rank_profile& self) { return self.keys == kt::codec::key_space::pre_rope; })
      .def("__repr__", [](const low_rank_profile& self) {
        return kt::detail::cat("kvtrim.LowRankProfile(layers=", self.layers, ", kv_heads=", self.kv_heads,
                               ", head_dim=", self.head_dim, ", pre_rope=",
                               self.keys == kt::codec::key_space::pre_rope ? "True" : "False", ")");
      });
#endif
}
