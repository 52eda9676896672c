// bench/peer_flashinfer_decode.cu — kvtrim's decode attention next to FlashInfer's
// BatchDecodeWithPagedKVCache on the identical paged cache, in one binary and one run
// (issue 11's paged goal, issue 12's fp8 peer).
//
// Built only when CMake is configured with -DKVTRIM_FLASHINFER_INCLUDE=<dir> naming
// FlashInfer's C++ headers (scripts/peer-flashinfer unpacks them from the pinned
// flashinfer-python wheel into .peers/flashinfer/include; nothing of FlashInfer is
// in this repository). FlashInfer is called through its header API the way its own
// PyTorch binding does: DecodePlan (host: split-KV chunking from the page counts,
// its tables copied to the device) once per configuration, then
// BatchDecodeWithPagedKVCacheDispatched (the decode kernel, plus the merge of the
// partial outputs when it splits) timed, with the DefaultAttention variant (no
// RoPE, no soft cap, no window), fp16 queries and output, PDL on (the Python
// wrapper's default on Hopper). Only FlashInfer's run is timed, as only kvtrim's
// attend is (which plans on the device inside the call).
//
// The cache: workload W (batch 8, 32 q heads, 8 kv heads, head dim 128) as an
// engine's head-shared page tensor [pages, 2, page, kv_heads, 128] (NHD) or
// [pages, 2, kv_heads, page, 128] (HND), pages scattered through the pool (a fixed
// shuffle), every sequence `tokens` long. kvtrim binds it with
// layout::shared_paged::view::bind_pages, and FlashInfer's paged_kv_t is built over
// the same tensor (keys at page offset 0, values at page·kv_heads·128, page stride
// 2·page·kv_heads·128) and kvtrim's own indptr / indices / last_page_len arrays:
// both kernels read exactly the same bytes through the same tables.
//
// Rows (each reports median_us, cache_TBps and fraction_of_copy, the fraction of the
// device-to-device copy bandwidth measured first in the same run; kvtrim's rows also
// speedup_vs_flashinfer = FlashInfer's median / kvtrim's on the same configuration):
//   flashinfer_batch_decode / kvtrim_shared_paged_decode   fp16, tokens 4k..32k,
//       pages of 16 and 64, NHD and HND, interleaved (FlashInfer then kvtrim for each
//       configuration, so both run at the same clocks). Before timing, the FlashInfer row runs both
//       kernels on the same queries and fails unless max |FlashInfer − kvtrim| stays
//       within the bound derived at `fp16_bound` (counters max_abs_diff, worst_diff_over_bound).
//   flashinfer_batch_decode_fp8   FlashInfer over the same pages quantized to fp8 e4m3 with
//       one per-tensor scale (1/448: the data lie in [-1, 1)), k_scale folded into
//       sm_scale and v_scale applied to the output, as FlashInfer's wrapper does.
//   kvtrim_codec_decode_fp8       kvtrim's fp8 codec over the same tokens (gathered from
//       the pages into a [batch, kv_heads, tokens, 128] buffer and encoded by compaction)
//       with fixed scales of 1/448 for every head (= the per-tensor scale), in kvtrim's
//       contiguous layout with its own codec storage (codes and per-head scales): the
//       layouts differ, the tokens, the scale and the bytes per token (2·128) do not.
//   Both fp8 rows are checked against kvtrim's fp16 output (fp8_bound).
// FlashInfer 0.7.4's header-only decode has no int8 KV cache (vec_dtypes.cuh converts
// fp8 e4m3/e5m2 and fp4 only); its int8 path is XQA (csrc/xqa in the wheel, not part of
// include/), not benchmarked here.
//
//   bench_peer_flashinfer_decode --benchmark_out=fi.json --benchmark_out_format=json
// Exits non-zero when a correctness check fails.
#include <kvtrim/cuda.cuh>

#include <cuda/cmath>

#if !__has_include(<cuda/__cmath/fast_modulo_division.h>)
// FlashInfer 0.7.4's uint_fastdiv (fastdiv.cuh: the page-index divmod) wraps
// cuda::fast_mod_div<uint32_t> from the CCCL 3.6 its wheel bundles; CUDA 13.0's CCCL 3.0
// lacks it. This is a minimal exact stand-in with the interface fastdiv.cuh uses
// (construction from the divisor, n / divisor): q = ⌊n·M / 2^64⌋ with M = ⌈2^64 / d⌉ is
// ⌊n / d⌋ for every 32-bit n and d ≥ 2 (the error n·(M − 2^64/d) / 2^64 < 2^-32 < 1/d
// cannot cross an integer); d = 1 is a shift by 0.
namespace cuda {
template <class T>
class fast_mod_div;
template <>
class fast_mod_div<std::uint32_t> {
 public:
  __host__ __device__ explicit fast_mod_div(std::uint32_t divisor)
      : multiplier_(divisor > 1 ? ~std::uint64_t{0} / divisor + 1 : 0) {}
  __host__ __device__ friend std::uint32_t operator/(std::uint32_t n, const fast_mod_div& d) {
    if (d.multiplier_ == 0) return n;
#ifdef __CUDA_ARCH__
    return static_cast<std::uint32_t>(__umul64hi(n, d.multiplier_));
#else
    return static_cast<std::uint32_t>((static_cast<unsigned __int128>(n) * d.multiplier_) >> 64);
#endif
  }

 private:
  std::uint64_t multiplier_;
};
}  // namespace cuda
#endif

#include <flashinfer/attention/decode.cuh>
#include <flashinfer/attention/default_decode_params.cuh>
#include <flashinfer/attention/scheduler.cuh>
#include <flashinfer/attention/variants.cuh>
#include <flashinfer/page.cuh>

#include <benchmark/benchmark.h>
#include <cuda_fp8.h>

#include "cuda_common.cuh"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace kt = kvtrim;
using kvtrim_bench::check;
using kvtrim_bench::device_copy;
using kvtrim_bench::fill_random;

namespace {

constexpr std::int64_t head_dim = 128;               // FlashInfer's decode is instantiated for this one
constexpr std::int64_t group_size = 4;               // W: 32 q heads over 8 kv heads
constexpr float e4m3_max = 448.0f;                   // the largest finite e4m3 value
constexpr float fp8_scale = 1.0f / e4m3_max;         // x is stored as e4m3(x / scale); |x| < 1
bool any_check_failed = false;                       // main's exit status
/// FlashInfer's median seconds per configuration (row arguments + storage), for kvtrim's rows'
/// speedup_vs_flashinfer counter (FlashInfer time / kvtrim time: > 1 means kvtrim is faster).
std::map<std::string, double> flashinfer_median;

std::string configuration(const benchmark::State& state, const char* storage) {
  return std::to_string(state.range(0)) + "/" + std::to_string(state.range(1)) + "/" + std::to_string(state.range(2)) +
         "/" + std::to_string(state.range(3)) + "/" + std::to_string(state.range(4)) + "/" +
         std::to_string(state.range(5)) + "/" + storage;
}

void record_flashinfer(const benchmark::State& state, const char* storage, const std::vector<double>& seconds) {
  flashinfer_median[configuration(state, storage)] = seconds[seconds.size() / 2];
}

void report_against_flashinfer(benchmark::State& state, const char* storage, const std::vector<double>& seconds) {
  const auto found = flashinfer_median.find(configuration(state, storage));
  if (found != flashinfer_median.end()) state.counters["speedup_vs_flashinfer"] = found->second / seconds[seconds.size() / 2];
}

template <class T>
struct device_array {
  T* data = nullptr;
  explicit device_array(std::int64_t count) {
    check(cudaMalloc(&data, static_cast<std::size_t>(std::max<std::int64_t>(count, 1)) * sizeof(T)), "cudaMalloc");
  }
  ~device_array() { cudaFree(data); }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
};

template <class T>
std::vector<T> download(const T* data, std::int64_t count) {
  std::vector<T> host(static_cast<std::size_t>(count));
  check(cudaMemcpy(host.data(), data, host.size() * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return host;
}

std::vector<float> to_floats(const std::vector<__half>& values) {
  std::vector<float> out(values.size());
  std::transform(values.begin(), values.end(), out.begin(), [](__half x) { return __half2float(x); });
  return out;
}

__global__ void quantize_e4m3(const __half* in, __nv_fp8_e4m3* out, std::int64_t count, float inverse_scale) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    out[i] = __nv_fp8_e4m3(__half2float(in[i]) * inverse_scale);  // cvt.rn.satfinite on sm_89+
}

/// The key (values = false) or value rows of a shared_paged view, gathered into
/// [batch, kv_heads, tokens, D] in token order.
template <class View>
__global__ void gather_rows(View view, bool values, std::int64_t tokens, __half* out) {
  const std::int64_t rows = view.batch * view.shape.kv_heads * tokens, D = view.shape.head_dim;
  const kt::half* source = values ? view.storage.values : view.storage.keys;
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const std::int64_t i = r % tokens, h = (r / tokens) % view.shape.kv_heads, b = r / (tokens * view.shape.kv_heads);
    const std::int64_t slot = view.slot(b, h, i);
    for (std::int64_t d = threadIdx.x; d < D; d += blockDim.x)
      out[r * D + d] = reinterpret_cast<const __half*>(source)[slot * D + d];
  }
}

/// Workload W's page tensor, kvtrim's shared_paged view over it, and the queries.
struct paged_workload {
  using view_type = kt::layout::shared_paged::view<kt::codec::fp16, kt::device_space>;
  kt::model_shape shape;
  std::int64_t batch, tokens, page;
  kt::layout::shared_paged::order order;
  std::int64_t pages, tensor_elements;
  device_array<__half> tensor;
  device_array<std::byte> metadata;
  device_array<__half> queries;
  view_type view;
  std::vector<std::int32_t> indptr;  // host copy: FlashInfer plans from it

  paged_workload(std::int64_t batch_, std::int64_t tokens_, std::int64_t q_heads, std::int64_t kv_heads,
                 std::int64_t page_, bool hnd)
      : shape{.q_heads = q_heads, .kv_heads = kv_heads, .head_dim = head_dim},
        batch(batch_),
        tokens(tokens_),
        page(page_),
        order(hnd ? kt::layout::shared_paged::order::hnd : kt::layout::shared_paged::order::nhd),
        pages(batch_ * kt::layout::shared_paged::pages_for(tokens_, page_)),
        tensor_elements(view_type::tensor_rows(shape, {pages, page, order}) * head_dim),
        tensor(tensor_elements),
        metadata(static_cast<std::int64_t>(view_type::metadata_bytes(shape, batch, {pages, page, order}))),
        queries(batch_ * q_heads * head_dim) {
    const kt::layout::shared_paged::pool_size pool{pages, page, order};
    // Zeroed tables (status words, positions), then the sequences' page tables written below.
    check(cudaMemset(metadata.data, 0, view_type::metadata_bytes(shape, batch, pool)), "cudaMemset(metadata)");
    view = view_type::bind_pages(reinterpret_cast<kt::half*>(tensor.data), metadata.data, shape, batch, pool);
    const std::int64_t per_sequence = pages / batch;
    std::vector<std::int32_t> permutation(static_cast<std::size_t>(pages));
    std::iota(permutation.begin(), permutation.end(), 0);
    std::shuffle(permutation.begin(), permutation.end(), std::mt19937_64(7));  // as an engine's allocator leaves them
    indptr.resize(static_cast<std::size_t>(batch + 1));
    std::vector<std::int32_t> last(static_cast<std::size_t>(batch), static_cast<std::int32_t>((tokens - 1) % page + 1));
    for (std::int64_t b = 0; b <= batch; ++b) indptr[b] = static_cast<std::int32_t>(b * per_sequence);
    const std::int32_t no_free_pages = 0;
    check(cudaMemcpy(view.indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice), "indptr");
    check(cudaMemcpy(view.indices, permutation.data(), permutation.size() * 4, cudaMemcpyHostToDevice), "indices");
    check(cudaMemcpy(view.last_page_len, last.data(), last.size() * 4, cudaMemcpyHostToDevice), "last_page_len");
    check(cudaMemcpy(view.free_count, &no_free_pages, 4, cudaMemcpyHostToDevice), "free_count");
    fill_random<<<1024, 256>>>(tensor.data, tensor_elements, 1);
    fill_random<<<64, 256>>>(queries.data, batch * q_heads * head_dim, 3);
    check(cudaDeviceSynchronize(), "fill");
    kt::layout::shared_paged::check("bench", view);
  }
  std::int64_t query_elements() const { return batch * shape.q_heads * head_dim; }
  /// K and V bytes the sequences hold at `element_bytes` per element.
  double cache_bytes(double element_bytes) const {
    return 2.0 * static_cast<double>(batch * shape.kv_heads * tokens * head_dim) * element_bytes;
  }
};

/// kvtrim's decode attention over the workload's shared_paged view.
class kvtrim_shared_paged {
 public:
  using attention = kt::implementation<kt::stage::decode_attention, kt::backend::cuda>;
  explicit kvtrim_shared_paged(const paged_workload& w)
      : w_(w), scratch_bytes_(attention::workspace_bytes(w.view)), scratch_(static_cast<std::int64_t>(scratch_bytes_)) {}
  void run(__half* out, cudaStream_t stream) {
    const std::array<std::int64_t, 3> extents{w_.batch, w_.shape.q_heads, head_dim};
    attention::attend(kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(w_.queries.data), extents), w_.view,
                      kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out), extents),
                      {scratch_.data, scratch_bytes_}, stream);
  }

 private:
  const paged_workload& w_;
  std::size_t scratch_bytes_;
  device_array<std::byte> scratch_;
};

/// FlashInfer's parameters with the per-tensor value scale its variants multiply the output by.
template <class KV>
struct scaled_decode_params : flashinfer::BatchDecodeParams<half, KV, half, std::int32_t> {
  float v_scale = 1.0f;
};

/// FlashInfer's batch decode (plan once, run timed) over the workload's pages, stored as KV
/// (`kv_tensor`: __half = the workload's own tensor, or an fp8 copy of it with the same layout).
template <class KV, class Params>
class flashinfer_decode {
 public:
  using variant = flashinfer::DefaultAttention</*custom_mask=*/false, /*sliding_window=*/false,
                                               /*logits_soft_cap=*/false, /*alibi=*/false>;
  static constexpr auto pos_encoding = flashinfer::PosEncodingMode::kNone;

  flashinfer_decode(const paged_workload& w, KV* kv_tensor, float key_scale, float value_scale, cudaStream_t stream)
      : w_(w) {
    const auto estimate = flashinfer::BatchDecodeWithPagedKVCacheWorkEstimationDispatched<group_size, head_dim, pos_encoding,
                                                                                          variant, Params>;
    std::vector<std::int32_t> indptr = w.indptr;
    const auto q_heads = static_cast<std::uint32_t>(w.shape.q_heads);
    check(flashinfer::DecodePlanWorkspaceSize<head_dim, pos_encoding, variant, Params>(
              float_bytes_, int_bytes_, indptr.data(), static_cast<std::uint32_t>(w.batch), q_heads,
              static_cast<std::uint32_t>(w.page), /*enable_cuda_graph=*/false, stream, estimate),
          "flashinfer::DecodePlanWorkspaceSize");
    check(cudaMalloc(&float_buffer_, std::max<std::size_t>(float_bytes_, 16)), "cudaMalloc(float workspace)");
    check(cudaMalloc(&int_buffer_, std::max<std::size_t>(int_bytes_, 16)), "cudaMalloc(int workspace)");
    check(cudaMallocHost(&pinned_int_buffer_, std::max<std::size_t>(int_bytes_, 16)), "cudaMallocHost");
    check(flashinfer::DecodePlan<head_dim, pos_encoding, variant, Params>(
              float_buffer_, float_bytes_, int_buffer_, pinned_int_buffer_, int_bytes_, plan_, indptr.data(),
              static_cast<std::uint32_t>(w.batch), q_heads, static_cast<std::uint32_t>(w.page),
              /*enable_cuda_graph=*/false, stream, estimate),
          "flashinfer::DecodePlan");
    check(cudaStreamSynchronize(stream), "plan");

    // The engine's tensor as FlashInfer's K and V views: [pages, page, kv_heads, D] (NHD) or
    // [pages, kv_heads, page, D] (HND) with the page stride of both halves.
    const std::int64_t kv_heads = w.shape.kv_heads, page = w.page;
    const bool hnd = w.order == kt::layout::shared_paged::order::hnd;
    const std::array<std::int64_t, 4> strides = hnd ? std::array<std::int64_t, 4>{2 * page * kv_heads * head_dim, page * head_dim, head_dim, 1}
                                                    : std::array<std::int64_t, 4>{2 * page * kv_heads * head_dim, kv_heads * head_dim, head_dim, 1};
    const flashinfer::paged_kv_t<KV, std::int32_t> paged_kv(
        static_cast<std::uint32_t>(kv_heads), static_cast<std::uint32_t>(page), head_dim,
        static_cast<std::uint32_t>(w.batch), hnd ? flashinfer::QKVLayout::kHND : flashinfer::QKVLayout::kNHD, kv_tensor,
        kv_tensor + page * kv_heads * head_dim, strides.data(), w.view.indices, w.view.indptr, w.view.last_page_len);
    params_.q = reinterpret_cast<half*>(w.queries.data);
    params_.q_rope_offset = nullptr;
    params_.paged_kv = paged_kv;
    params_.lse = nullptr;
    params_.maybe_alibi_slopes = nullptr;
    params_.num_qo_heads = q_heads;
    params_.q_stride_n = static_cast<std::int32_t>(w.shape.q_heads * head_dim);
    params_.q_stride_h = static_cast<std::int32_t>(head_dim);
    params_.window_left = -1;
    params_.logits_soft_cap = 0.0f;
    params_.sm_scale = key_scale / std::sqrt(static_cast<float>(head_dim));  // k_scale folded in, as the wrapper does
    params_.rope_rcp_scale = 1.0f;
    params_.rope_rcp_theta = 1.0f / 1e4f;
    if constexpr (requires { params_.v_scale; }) params_.v_scale = value_scale;
    else if (value_scale != 1.0f) std::abort();
    using flashinfer::GetPtrFromBaseOffset;
    params_.request_indices = GetPtrFromBaseOffset<std::int32_t>(int_buffer_, plan_.request_indices_offset);
    params_.kv_tile_indices = GetPtrFromBaseOffset<std::int32_t>(int_buffer_, plan_.kv_tile_indices_offset);
    params_.o_indptr = GetPtrFromBaseOffset<std::int32_t>(int_buffer_, plan_.o_indptr_offset);
    params_.kv_chunk_size_ptr = GetPtrFromBaseOffset<std::int32_t>(int_buffer_, plan_.kv_chunk_size_ptr_offset);
    params_.block_valid_mask = nullptr;  // only with CUDA graphs
    params_.padded_batch_size = static_cast<std::uint32_t>(plan_.padded_batch_size);
    if (plan_.split_kv) {
      tmp_v_ = GetPtrFromBaseOffset<half>(float_buffer_, plan_.v_offset);
      tmp_s_ = GetPtrFromBaseOffset<float>(float_buffer_, plan_.s_offset);
    }
  }
  ~flashinfer_decode() { cudaFree(float_buffer_), cudaFree(int_buffer_), cudaFreeHost(pinned_int_buffer_); }
  flashinfer_decode(const flashinfer_decode&) = delete;
  flashinfer_decode& operator=(const flashinfer_decode&) = delete;

  void run(__half* out, cudaStream_t stream) {
    Params params = params_;
    params.o = reinterpret_cast<half*>(out);
    check(flashinfer::BatchDecodeWithPagedKVCacheDispatched<head_dim, pos_encoding, variant>(params, tmp_v_, tmp_s_,
                                                                                              /*enable_pdl=*/true, stream),
          "flashinfer::BatchDecodeWithPagedKVCacheDispatched");
  }
  bool split_kv() const { return plan_.split_kv; }
  std::int64_t blocks() const { return plan_.padded_batch_size * w_.shape.kv_heads; }

 private:
  const paged_workload& w_;
  flashinfer::DecodePlanInfo plan_;
  Params params_;
  std::size_t float_bytes_ = 0, int_bytes_ = 0;
  void *float_buffer_ = nullptr, *int_buffer_ = nullptr, *pinned_int_buffer_ = nullptr;
  half* tmp_v_ = nullptr;
  float* tmp_s_ = nullptr;
};

using flashinfer_fp16 = flashinfer_decode<half, flashinfer::BatchDecodeParams<half, half, half, std::int32_t>>;
using flashinfer_fp8 = flashinfer_decode<__nv_fp8_e4m3, scaled_decode_params<__nv_fp8_e4m3>>;

// ---- the correctness bounds ----
//
// Both outputs approximate the same exact attention o = Σ p_i v_i (p = softmax(q·k / √D)) over
// the same fp16 keys and values, computing in fp32; for a query head with
// S = Σ_d |q_d| · max|k| / √D ≥ every |logit| and V = max|v| (max|k|, max|v| ≤ 1: the data are
// drawn from [-1, 1)), u = 2^-24 and u_h = 2^-11 (fp16), over n tokens (tests/common/tolerance.hpp
// and tests/cuda/decode_test.cu derive the same terms for kvtrim against the CPU):
//   logits       δ ≤ (D + 8)·u·S        (dot product, the scale and log2 e)
//   weights      p̃/p ∈ e^±(2δ + 4u) for kvtrim (exp2f within 2 ulp), e^±(2δ + 8u) for FlashInfer
//                (ex2.approx: 2^-22 relative) → (e^(2δ + 4u) − 1)·V and (e^(2δ + 8u) − 1)·V
//   sums         n weighted values and their weights, the random-rounding model with a margin
//                of 8: (16·√(n + 1) + 8)·u·V each
//   fp16         kvtrim's tensor cores round each weight to fp16 for P·V (u_h·V) and its output
//                (u_h·V); FlashInfer keeps split-KV partial outputs in fp16 (its tmp_v is DTypeO:
//                u_h·V) and rounds the merged output (u_h·V)
// so |FlashInfer − kvtrim| ≤ (e^(2δ+4u) − 1 + e^(2δ+8u) − 1 + 2·(16√(n+1) + 8)·u + 4·u_h)·V.
// With W's data that is ≈ 2.4e-3 at any n here; a wrong head, order or page table moves the
// output by far more (a misread page of 16 at 4k tokens by ~4e-3·V; at 32k the bound no longer
// resolves one page).
constexpr double u32 = 1.0 / 16777216.0, u16 = 1.0 / 2048.0, u8 = 1.0 / 16.0;  // unit roundoffs: fp32, fp16, e4m3

double largest_logit(const std::vector<float>& queries, std::int64_t row) {
  double sum = 0.0;
  for (std::int64_t d = 0; d < head_dim; ++d) sum += std::abs(static_cast<double>(queries[row * head_dim + d]));
  return sum / std::sqrt(static_cast<double>(head_dim));  // max|k| ≤ 1
}

double fp16_bound(double S, std::int64_t n) {
  const double delta = (static_cast<double>(head_dim) + 8.0) * u32 * S, V = 1.0;
  return (std::expm1(2.0 * delta + 4.0 * u32) + std::expm1(2.0 * delta + 8.0 * u32) +
          2.0 * (16.0 * std::sqrt(static_cast<double>(n) + 1.0) + 8.0) * u32 + 4.0 * u16) * V;
}

// fp8 against kvtrim's fp16 output: the cache's rows are e4m3(x / s)·s, each off by ≤ u8·|x| (above
// e4m3's normal range for every |x| ≥ 2^-6·s; below it by ≤ 2^-10·s ≈ 2e-6, left out) — logits by
// ≤ u8·S, values by ≤ u8·V — on top of the fp16 bound: (e^(2·u8·S) − 1)·V + u8·V + fp16_bound. This
// worst case is loose (~1 for W's queries): it catches a missing scale (outputs × 448) or
// unreadable codes, not small errors; max_abs_diff shows how close they really are.
double fp8_bound(double S, std::int64_t n) { return std::expm1(2.0 * u8 * S) + u8 + fp16_bound(S, n); }

/// max |got − want| and the worst ratio to `bound(S of the row, n)` over every output element.
template <class Bound>
std::pair<double, double> compare(const std::vector<float>& got, const std::vector<float>& want,
                                  const std::vector<float>& queries, std::int64_t n, Bound bound) {
  double worst = 0.0, worst_ratio = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double diff = std::isfinite(got[i]) && std::isfinite(want[i]) ? std::abs(static_cast<double>(got[i]) - want[i])
                                                                         : INFINITY;  // unwritten (NaN) fails
    const auto row = static_cast<std::int64_t>(i) / head_dim;
    worst = std::max(worst, diff);
    worst_ratio = std::max(worst_ratio, diff / bound(largest_logit(queries, row), n));
  }
  return {worst, worst_ratio};
}

/// Records the comparison; a failure stops the row and makes the program exit non-zero.
bool report_check(benchmark::State& state, std::pair<double, double> result, const char* what) {
  state.counters["max_abs_diff"] = result.first;
  state.counters["worst_diff_over_bound"] = result.second;
  if (result.second <= 1.0) return true;
  any_check_failed = true;
  std::fprintf(stderr, "%s: max |diff| %.3g is %.3g× the derived bound\n", what, result.first, result.second);
  state.SkipWithError(what);
  return false;
}

paged_workload workload_from(const benchmark::State& state) {
  return paged_workload(state.range(0), state.range(1), state.range(2), state.range(3), state.range(4), state.range(5) != 0);
}

bool supported(benchmark::State& state) {
  if (state.range(2) != group_size * state.range(3)) {
    state.SkipWithError("this binary instantiates FlashInfer's decode for GQA groups of 4 (W) only");
    return false;
  }
  return true;
}

/// FlashInfer fp16 over the workload's own page tensor, checked against kvtrim first.
void flashinfer_batch_decode(benchmark::State& state) {
  if (!supported(state)) return;
  const paged_workload w = workload_from(state);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  {
    flashinfer_fp16 flashinfer(w, reinterpret_cast<half*>(w.tensor.data), 1.0f, 1.0f, stream);
    kvtrim_shared_paged kvtrim(w);
    device_array<__half> out(w.query_elements()), reference(w.query_elements());
    check(cudaMemset(out.data, 0xff, w.query_elements() * sizeof(__half)), "poison");  // NaN until written
    flashinfer.run(out.data, stream);
    kvtrim.run(reference.data, stream);
    check(cudaStreamSynchronize(stream), "check run");
    const auto queries = to_floats(download(w.queries.data, w.query_elements()));
    if (report_check(state,
                     compare(to_floats(download(out.data, w.query_elements())),
                             to_floats(download(reference.data, w.query_elements())), queries, w.tokens, fp16_bound),
                     "flashinfer_batch_decode: FlashInfer and kvtrim disagree beyond the fp16 bound")) {
      const auto seconds = kvtrim_bench::timed_seconds(state, stream, [&] { flashinfer.run(out.data, stream); });
      kvtrim_bench::report_bytes_read(state, seconds, w.cache_bytes(2.0));
      record_flashinfer(state, "fp16", seconds);
      state.counters["split_kv"] = flashinfer.split_kv();
      state.counters["blocks"] = static_cast<double>(flashinfer.blocks());
    }
  }
  cudaStreamDestroy(stream);
}

/// kvtrim's layout::shared_paged decode over the identical pages.
void kvtrim_shared_paged_decode(benchmark::State& state) {
  const paged_workload w = workload_from(state);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  {
    kvtrim_shared_paged kvtrim(w);
    device_array<__half> out(w.query_elements());
    const auto seconds = kvtrim_bench::timed_seconds(state, stream, [&] { kvtrim.run(out.data, stream); });
    kvtrim_bench::report_bytes_read(state, seconds, w.cache_bytes(2.0));
    report_against_flashinfer(state, "fp16", seconds);
  }
  cudaStreamDestroy(stream);
}

/// kvtrim's fp16 output on the workload (the fp8 rows' reference) and the queries as floats.
std::pair<std::vector<float>, std::vector<float>> fp16_reference(const paged_workload& w, cudaStream_t stream) {
  kvtrim_shared_paged kvtrim(w);
  device_array<__half> reference(w.query_elements());
  kvtrim.run(reference.data, stream);
  check(cudaStreamSynchronize(stream), "reference");
  return {to_floats(download(reference.data, w.query_elements())), to_floats(download(w.queries.data, w.query_elements()))};
}

/// FlashInfer over the same pages in fp8 e4m3, one per-tensor scale.
void flashinfer_batch_decode_fp8(benchmark::State& state) {
  if (!supported(state)) return;
  const paged_workload w = workload_from(state);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  {
    const auto [reference, queries] = fp16_reference(w, stream);
    device_array<__nv_fp8_e4m3> codes(w.tensor_elements);
    quantize_e4m3<<<1024, 256, 0, stream>>>(w.tensor.data, codes.data, w.tensor_elements, 1.0f / fp8_scale);
    flashinfer_fp8 flashinfer(w, codes.data, fp8_scale, fp8_scale, stream);
    device_array<__half> out(w.query_elements());
    check(cudaMemsetAsync(out.data, 0xff, w.query_elements() * sizeof(__half), stream), "poison");
    flashinfer.run(out.data, stream);
    check(cudaStreamSynchronize(stream), "check run");
    if (report_check(state, compare(to_floats(download(out.data, w.query_elements())), reference, queries, w.tokens, fp8_bound),
                     "flashinfer_batch_decode_fp8: beyond the fp8 bound of kvtrim's fp16 output")) {
      const auto seconds = kvtrim_bench::timed_seconds(state, stream, [&] { flashinfer.run(out.data, stream); });
      kvtrim_bench::report_bytes_read(state, seconds, w.cache_bytes(1.0));
      record_flashinfer(state, "fp8", seconds);
      state.counters["bytes_per_token_head"] = 2.0 * head_dim;
    }
  }
  cudaStreamDestroy(stream);
}

/// kvtrim's fp8 codec (contiguous layout, fixed scale 1/448 for every head) over the same tokens.
void kvtrim_codec_decode_fp8(benchmark::State& state) {
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::fp8,
                            kt::backend::cuda>;
  const paged_workload w = workload_from(state);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  {
    const auto [reference, queries] = fp16_reference(w, stream);
    const kt::codec::fp8::config config{.scales = kt::codec::fp8_scaling::fixed, .key_scale = fp8_scale, .value_scale = fp8_scale};
    auto cache = scheme::make_cache(w.shape, w.batch, w.tokens, config);
    const std::int64_t heads = w.batch * w.shape.kv_heads, elements = heads * w.tokens * head_dim;
    device_array<__half> keys(elements), values(elements);
    gather_rows<<<4096, 128, 0, stream>>>(w.view, false, w.tokens, keys.data);
    gather_rows<<<4096, 128, 0, stream>>>(w.view, true, w.tokens, values.data);
    // Every token kept: the compaction is the device encode.
    std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
    for (std::int64_t head = 0; head <= heads; ++head) offsets[head] = head * w.tokens;
    std::vector<std::int32_t> kept(static_cast<std::size_t>(heads * w.tokens));
    for (std::int64_t i = 0; i < heads * w.tokens; ++i) kept[i] = static_cast<std::int32_t>(i % w.tokens);
    device_array<std::int64_t> device_offsets(heads + 1);
    device_array<std::int32_t> device_kept(heads * w.tokens);
    check(cudaMemcpy(device_offsets.data, offsets.data(), offsets.size() * 8, cudaMemcpyHostToDevice), "offsets");
    check(cudaMemcpy(device_kept.data, kept.data(), kept.size() * 4, cudaMemcpyHostToDevice), "kept");
    const std::array<std::int64_t, 4> kv_extents{w.batch, w.shape.kv_heads, w.tokens, head_dim};
    kt::compact_args args;
    args.uniform_keep = w.tokens;
    kt::implementation<kt::layout::contiguous, kt::backend::cuda>::compact(
        cache.view(), kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(keys.data), kv_extents),
        kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(values.data), kv_extents),
        kt::selection_view<kt::device_space>{device_offsets.data, device_kept.data, heads}, args, stream);
    check(cudaStreamSynchronize(stream), "compact");

    const std::array<std::int64_t, 3> query_extents{w.batch, w.shape.q_heads, head_dim};
    const auto query_view = kt::make_view<kt::device_space>(reinterpret_cast<const kt::half*>(w.queries.data), query_extents);
    device_array<__half> out(w.query_elements());
    const auto out_view = kt::make_view<kt::device_space>(reinterpret_cast<kt::half*>(out.data), query_extents);
    const std::size_t scratch_bytes = scheme::attend_workspace(cache.view());
    device_array<std::byte> scratch(static_cast<std::int64_t>(scratch_bytes));
    const auto attend = [&] { scheme::attend(query_view, cache.view(), out_view, {scratch.data, scratch_bytes}, stream); };
    check(cudaMemsetAsync(out.data, 0xff, w.query_elements() * sizeof(__half), stream), "poison");
    attend();
    check(cudaStreamSynchronize(stream), "check run");
    if (report_check(state, compare(to_floats(download(out.data, w.query_elements())), reference, queries, w.tokens, fp8_bound),
                     "kvtrim_codec_decode_fp8: beyond the fp8 bound of kvtrim's fp16 output")) {
      const auto seconds = kvtrim_bench::timed_seconds(state, stream, attend);
      const double per_token = kt::codec::bytes_per_token<kt::codec::fp8>(config, head_dim,
                                                                          kt::codec::slot_alignment<kt::codec::fp8>(config));
      kvtrim_bench::report_bytes_read(state, seconds, static_cast<double>(heads * w.tokens) * per_token);
      report_against_flashinfer(state, "fp8", seconds);  // against FlashInfer's NHD fp8 row (pages of 16)
      state.counters["bytes_per_token_head"] = per_token;
    }
  }
  cudaStreamDestroy(stream);
}

}  // namespace

// Workload W: tokens 4k–32k, pages of 16 and 64, NHD (0) and HND (1), each configuration's
// FlashInfer row followed by kvtrim's (registered in main: interleaved, so both see the same
// clocks); then fp8 at 32k tokens, pages of 16 (FlashInfer NHD and HND, kvtrim's contiguous codec).
void register_rows() {
  benchmark::RegisterBenchmark("device_copy", device_copy)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
  const auto row = [](const char* name, void (*function)(benchmark::State&), std::vector<std::int64_t> args) {
    benchmark::RegisterBenchmark(name, function)
        ->ArgNames({"batch", "tokens", "q_heads", "kv_heads", "page", "hnd"})
        ->Args(args)
        ->UseManualTime()
        ->Iterations(50)
        ->Unit(benchmark::kMicrosecond);
  };
  for (const std::int64_t tokens : {4096, 8192, 16384, 32768})
    for (const std::int64_t page : {16, 64})
      for (const std::int64_t hnd : {0, 1}) {
        row("flashinfer_batch_decode", flashinfer_batch_decode, {8, tokens, 32, 8, page, hnd});
        row("kvtrim_shared_paged_decode", kvtrim_shared_paged_decode, {8, tokens, 32, 8, page, hnd});
      }
  row("flashinfer_batch_decode_fp8", flashinfer_batch_decode_fp8, {8, 32768, 32, 8, 16, 0});
  row("flashinfer_batch_decode_fp8", flashinfer_batch_decode_fp8, {8, 32768, 32, 8, 16, 1});
  row("kvtrim_codec_decode_fp8", kvtrim_codec_decode_fp8, {8, 32768, 32, 8, 16, 0});
}

int main(int argc, char** argv) {
  register_rows();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (any_check_failed) std::fprintf(stderr, "a FlashInfer / kvtrim correctness check failed (see above)\n");
  return any_check_failed ? 1 : 0;
}
